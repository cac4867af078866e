//! Delivers notifications from the durable outbox (clause 5.8 and 5.11).
//!
//! The store writes a notice in the same transaction as the change that
//! causes it; this crate reads the outbox and delivers. Every endpoint has its
//! own queue and task, so a receiver that hangs or fails only delays itself.
//! A notice leaves the outbox only after its endpoint answered 2xx, or after
//! the last retry failed (then it goes to the dead letters): delivery is at
//! least once, across restarts.

use borough_access::outbound::{OutboundError, OutboundPolicy};
use borough_core::entity::NGSI_LD_NULL;
use borough_core::render::EntityListView;
use borough_core::subscription::CompiledSubscription;
use borough_core::validate::{format_datetime, now_micros};
use borough_core::{Context, Entity};
use borough_store::{EntityStore, Notice};
use serde_json::{Map, Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

mod mqtt;
use mqtt::MqttEndpoint;
/// The TLS settings of `mqtts://` endpoints, shared with the devices' external broker client.
pub use mqtt::tls_config as mqtt_tls_config;

/// How deliveries are paced and bounded.
#[derive(Clone, Debug)]
pub struct NotifierConfig {
    /// Attempts per notification before it is dead-lettered.
    pub max_attempts: u32,
    /// Wait before the first retry; doubled at each further one.
    pub first_retry: Duration,
    /// Longest wait between retries.
    pub max_retry: Duration,
    /// Timeout of one HTTP delivery.
    pub timeout: Duration,
    /// Most notices sent in one notification.
    pub batch: usize,
    /// Notices queued per endpoint; beyond that they wait in the outbox.
    pub queue: usize,
    /// PEM certificates of CAs trusted for `mqtts://` endpoints besides the
    /// usual public roots.
    pub mqtt_ca_pem: Option<Vec<u8>>,
    /// Where endpoints may be; the default refuses internal addresses
    /// (loopback, private ranges, link-local).
    pub outbound: OutboundPolicy,
}

impl Default for NotifierConfig {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            first_retry: Duration::from_millis(500),
            max_retry: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
            batch: 200,
            queue: 10_000,
            mqtt_ca_pem: None,
            outbound: OutboundPolicy::default(),
        }
    }
}

/// A subscription by tenant and id.
type SubKey = (String, String);
/// Notices with their sequence numbers.
type Batch = Vec<(u64, Notice)>;

/// Notices read from the outbox per scan.
const SCAN: usize = 20_000;

struct Shared {
    store: Arc<dyn EntityStore>,
    client: reqwest::Client,
    /// TLS settings of `mqtts://` endpoints.
    mqtt_tls: Arc<rustls::ClientConfig>,
    config: NotifierConfig,
    /// Sequence numbers handed to an endpoint and not yet done.
    in_flight: Mutex<HashSet<u64>>,
    /// Sequence numbers an endpoint finished (removed from the outbox, or
    /// failed to be); the dispatcher clears them from `in_flight` before it
    /// next reads the outbox, so it never sees a finished notice as new.
    completed: Mutex<Vec<u64>>,
    /// Woken when an endpoint finishes a batch (room in its queue).
    freed: Notify,
}

/// Runs the notifier until `stop` resolves. Notices still undelivered stay
/// in the outbox and are delivered after the next start. Fails at once if the
/// MQTT CA certificates cannot be read or the HTTP client cannot be set up.
pub fn start(
    store: Arc<dyn EntityStore>,
    config: NotifierConfig,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let mqtt_tls = mqtt::tls_config(config.mqtt_ca_pem.as_deref())?;
    let client = config
        .outbound
        .guard(
            reqwest::Client::builder()
                .timeout(config.timeout)
                .connect_timeout(config.timeout),
            10,
        )
        .build()
        .map_err(|e| format!("cannot set up the notification HTTP client: {e}"))?;
    Ok(tokio::spawn(run(store, config, client, mqtt_tls, stop)))
}

async fn run(
    store: Arc<dyn EntityStore>,
    config: NotifierConfig,
    client: reqwest::Client,
    mqtt_tls: Arc<rustls::ClientConfig>,
    stop: impl std::future::Future<Output = ()>,
) {
    let shared = Arc::new(Shared {
        store,
        client,
        mqtt_tls,
        config,
        in_flight: Mutex::new(HashSet::new()),
        completed: Mutex::new(Vec::new()),
        freed: Notify::new(),
    });
    let mut watch = shared.store.notice_watch();
    let mut endpoints: HashMap<String, mpsc::Sender<(u64, Notice)>> = HashMap::new();
    let periodic = tokio::spawn(periodic(shared.clone()));
    tokio::pin!(stop);
    // New notices are read from `cursor` on; a full rescan every tick picks up
    // those a full endpoint queue left behind.
    let mut cursor = 0u64;
    let mut full_scan = true;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        let from = if full_scan { 0 } else { cursor };
        let (last, skipped) = dispatch(&shared, &mut endpoints, from).await;
        cursor = cursor.max(last);
        full_scan = false;
        tokio::select! {
            _ = &mut stop => break,
            changed = watch.changed() => if changed.is_err() { break },
            _ = shared.freed.notified() => full_scan = skipped,
            _ = tick.tick() => full_scan = true,
        }
    }
    periodic.abort();
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Hands pending notices numbered above `after` to their endpoints' queues.
/// Returns the highest number seen and whether a full queue left some behind.
async fn dispatch(
    shared: &Arc<Shared>,
    endpoints: &mut HashMap<String, mpsc::Sender<(u64, Notice)>>,
    after: u64,
) -> (u64, bool) {
    {
        let done = std::mem::take(&mut *lock(&shared.completed));
        let mut in_flight = lock(&shared.in_flight);
        for seq in done {
            in_flight.remove(&seq);
        }
    }
    // The outbox is read from the store's file: off the async workers.
    let store = shared.store.clone();
    let read = tokio::task::spawn_blocking(move || store.pending_notices(after, SCAN)).await;
    let pending = match read {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot read the notification outbox");
            return (after, true);
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read the notification outbox");
            return (after, true);
        }
    };
    let mut last = after;
    let mut skipped = pending.len() == SCAN;
    let mut orphans = Vec::new();
    for (seq, notice) in pending {
        last = last.max(seq);
        if lock(&shared.in_flight).contains(&seq) {
            continue;
        }
        let Some(sub) = shared
            .store
            .subscription(&notice.tenant, &notice.subscription)
        else {
            // The subscription was deleted: nobody is owed this notice any more.
            orphans.push((seq, notice));
            continue;
        };
        let uri = sub.endpoint.uri.clone();
        let queue = endpoints.entry(uri.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(shared.config.queue);
            tokio::spawn(endpoint_worker(shared.clone(), uri.clone(), rx));
            tx
        });
        match queue.try_send((seq, notice)) {
            Ok(()) => {
                lock(&shared.in_flight).insert(seq);
            }
            // Full: it stays in the outbox until the endpoint catches up.
            Err(mpsc::error::TrySendError::Full(_)) => skipped = true,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                endpoints.remove(&uri);
                skipped = true;
            }
        }
    }
    if !orphans.is_empty()
        && let Err(e) = shared.store.notices_done(orphans, None).await
    {
        tracing::error!(error = %e, "cannot drop notices of deleted subscriptions");
    }
    (last, skipped)
}

/// Deliveries in flight at once to one HTTP endpoint (one per subscription).
const PARALLEL_PER_ENDPOINT: usize = 16;

/// Delivers one endpoint's notices. A batch is split per subscription; each
/// subscription's notices go out in order, batch after batch. Over HTTP the
/// subscriptions of a batch are delivered in parallel; over MQTT one at a
/// time on the endpoint's connection.
async fn endpoint_worker(shared: Arc<Shared>, uri: String, mut rx: mpsc::Receiver<(u64, Notice)>) {
    let mut last_sent: HashMap<SubKey, tokio::time::Instant> = HashMap::new();
    // The endpoint's MQTT connection, opened at the first notification.
    let mut mqtt: Option<MqttEndpoint> = None;
    let is_mqtt = uri.starts_with("mqtt://") || uri.starts_with("mqtts://");
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < shared.config.batch {
            match rx.try_recv() {
                Ok(n) => batch.push(n),
                Err(_) => break,
            }
        }
        // Group by subscription, keeping the order of first appearance.
        let mut groups: Vec<(SubKey, Batch)> = Vec::new();
        for (seq, n) in batch {
            let key = (n.tenant.clone(), n.subscription.clone());
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push((seq, n)),
                None => groups.push((key, vec![(seq, n)])),
            }
        }
        let mut running = tokio::task::JoinSet::new();
        for (key, notices) in groups {
            // Throttling: not before the subscription's last notification plus its interval.
            let not_before = shared
                .store
                .subscription(&key.0, &key.1)
                .and_then(|sub| sub.throttling)
                .and_then(|t| last_sent.get(&key).map(|l| *l + Duration::from_secs(t)));
            last_sent.insert(
                key.clone(),
                not_before.unwrap_or_else(tokio::time::Instant::now),
            );
            if is_mqtt {
                let seqs = deliver_group(&shared, key, notices, not_before, &mut mqtt).await;
                lock(&shared.completed).extend(seqs);
            } else {
                if running.len() >= PARALLEL_PER_ENDPOINT
                    && let Some(Ok(seqs)) = running.join_next().await
                {
                    lock(&shared.completed).extend(seqs);
                }
                let shared = shared.clone();
                running.spawn(async move {
                    deliver_group(&shared, key, notices, not_before, &mut None).await
                });
            }
        }
        while let Some(done) = running.join_next().await {
            if let Ok(seqs) = done {
                lock(&shared.completed).extend(seqs);
            }
        }
        shared.freed.notify_one();
        tracing::trace!(%uri, "endpoint batch done");
    }
}

/// Delivers one subscription's notices (after `not_before`); returns their numbers.
async fn deliver_group(
    shared: &Shared,
    (tenant, id): SubKey,
    notices: Batch,
    not_before: Option<tokio::time::Instant>,
    mqtt: &mut Option<MqttEndpoint>,
) -> Vec<u64> {
    let seqs: Vec<u64> = notices.iter().map(|(s, _)| *s).collect();
    if let Some(t) = not_before {
        tokio::time::sleep_until(t).await;
    }
    match shared.store.subscription(&tenant, &id) {
        Some(sub) => deliver(shared, &sub, &tenant, notices, mqtt).await,
        None => {
            let _ = shared.store.notices_done(notices, None).await;
        }
    }
    seqs
}

/// Sends one notification for `notices`, retrying with backoff; records the
/// outcome and removes the notices from the outbox (or dead-letters them).
async fn deliver(
    shared: &Shared,
    sub: &CompiledSubscription,
    tenant: &str,
    notices: Vec<(u64, Notice)>,
    mqtt: &mut Option<MqttEndpoint>,
) {
    let items: Vec<Item> = notices
        .iter()
        .map(|(_, n)| (&n.entity, n.deleted, n.previous.as_ref()))
        .collect();
    let id = format!(
        "urn:ngsi-ld:Notification:{}",
        notices.first().map_or(0, |(s, _)| *s)
    );
    let mut wait = shared.config.first_retry;
    let mut last_error = String::new();
    for attempt in 1..=shared.config.max_attempts {
        let now = now_micros();
        let body = notification(sub, &id, &items, now);
        let result = send(shared, sub, tenant, &body, mqtt).await;
        shared.store.record_delivery(
            tenant,
            &sub.record.id,
            notices.len() as u64,
            now,
            result.clone().err(),
        );
        match result {
            Ok(()) => {
                if let Err(e) = shared.store.notices_done(notices, None).await {
                    tracing::error!(error = %e, "cannot mark notices delivered; they will be sent again");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(subscription = %sub.record.id, endpoint = %sub.endpoint.uri, attempt, error = %e, "notification failed");
                last_error = e;
                if attempt < shared.config.max_attempts {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(shared.config.max_retry);
                }
            }
        }
    }
    if let Err(e) = shared
        .store
        .notices_done(
            notices,
            Some(format!(
                "after {} attempts: {last_error}",
                shared.config.max_attempts
            )),
        )
        .await
    {
        tracing::error!(error = %e, "cannot dead-letter notices; they will be sent again");
    }
}

/// The notification body (clause 5.3.1).
/// An entity to notify: its state, whether it was deleted, and its previous
/// state when the subscription shows changes.
type Item<'a> = (&'a Entity, bool, Option<&'a Entity>);

fn notification(sub: &CompiledSubscription, id: &str, items: &[Item<'_>], now: i64) -> Value {
    let ld = sub.endpoint.accept == "application/ld+json";
    let data: Vec<Value> = items
        .iter()
        .map(|(e, gone, previous)| render(sub, e, *gone, *previous, now))
        .collect();
    let mut n = Map::new();
    if ld {
        n.insert("@context".into(), notification_context(sub));
    }
    n.insert("id".into(), json!(id));
    n.insert("type".into(), json!("Notification"));
    n.insert("subscriptionId".into(), json!(sub.record.id));
    n.insert("notifiedAt".into(), json!(format_datetime(now)));
    n.insert("data".into(), Value::Array(data));
    Value::Object(n)
}

/// The `@context` notifications carry: `jsonldContext` when the subscription
/// names one, else the subscription's own.
fn notification_context(sub: &CompiledSubscription) -> Value {
    match sub.record.body.get("jsonldContext") {
        Some(Value::String(u)) => json!(u),
        _ => sub.record.context.clone(),
    }
}

fn render(
    sub: &CompiledSubscription,
    e: &Entity,
    deleted: bool,
    previous: Option<&Entity>,
    now: i64,
) -> Value {
    let (ctx, opts) = (&sub.notify_ctx, &sub.render);
    if deleted {
        // An entity deletion shows the entity with each of its attributes
        // deleted: NGSI-LD Null, deletedAt and, with showChanges, the value it had.
        let types: Vec<Value> = e.types.iter().map(|t| json!(ctx.compact(t))).collect();
        let t = if types.len() == 1 {
            types[0].clone()
        } else {
            Value::Array(types)
        };
        let mut out = json!({"id": e.id, "type": t, "deletedAt": format_datetime(now)});
        let gone = Entity {
            attrs: Default::default(),
            ..e.clone()
        };
        show_deleted(&mut out, &gone, e, sub, now);
        return out;
    }
    let list = [e];
    let view = EntityListView {
        entities: &list[..],
        ctx,
        opts,
        context: None,
    };
    let mut out = match serde_json::to_value(&view) {
        Ok(Value::Array(mut v)) if !v.is_empty() => v.swap_remove(0),
        _ => Value::Null,
    };
    if let Some(before) = previous {
        if sub.show_changes {
            show_changes(&mut out, e, before, ctx);
        }
        show_deleted(&mut out, e, before, sub, now);
    }
    out
}

/// `previousValue`, `previousObject`, … for an attribute kind's value member.
fn previous_key(a: &borough_core::entity::Attribute) -> String {
    let key = a.kind.value_key();
    format!("previous{}{}", key[..1].to_uppercase(), &key[1..])
}

/// Adds every attribute instance that the change deleted, as the spec shows a
/// deletion: NGSI-LD Null as its value, `deletedAt`, and with `showChanges`
/// the value it had. keyValues shows the bare NGSI-LD Null.
fn show_deleted(
    out: &mut Value,
    e: &Entity,
    before: &Entity,
    sub: &CompiledSubscription,
    now: i64,
) {
    let (ctx, opts) = (&sub.notify_ctx, &sub.render);
    let Value::Object(members) = out else {
        return;
    };
    for (name, old) in &before.attrs {
        if !opts.wants(name) {
            continue;
        }
        let remaining = e.attrs.get(name);
        let gone: Vec<&borough_core::entity::Attribute> = old
            .iter()
            .filter(|a| opts.wants_instance(a))
            .filter(|a| remaining.is_none_or(|r| !r.iter().any(|x| x.dataset_id == a.dataset_id)))
            .collect();
        if gone.is_empty() {
            continue;
        }
        let rendered: Vec<Value> = gone
            .iter()
            .map(|a| {
                if opts.format == borough_core::Format::KeyValues {
                    return json!(NGSI_LD_NULL);
                }
                let key = a.kind.value_key();
                let mut m = Map::new();
                m.insert("type".into(), json!(a.kind.name()));
                m.insert(key.into(), json!(NGSI_LD_NULL));
                if let Some(d) = &a.dataset_id {
                    m.insert("datasetId".into(), json!(d));
                }
                m.insert("deletedAt".into(), json!(format_datetime(now)));
                if sub.show_changes {
                    m.insert(previous_key(a), borough_core::render::render_value(a, ctx));
                }
                Value::Object(m)
            })
            .collect();
        let short = ctx.compact(name).into_owned();
        let value = if rendered.len() == 1 {
            rendered.into_iter().next().unwrap_or(Value::Null)
        } else {
            Value::Array(rendered)
        };
        members.entry(short).or_insert(value);
    }
}

/// Adds the previous value (`previousValue`, `previousObject`, …) to every
/// attribute instance whose value changed (clause 5.2.12, `showChanges`).
/// keyValues, and concise attributes shown as bare values, have no room for it.
fn show_changes(out: &mut Value, e: &Entity, before: &Entity, ctx: &Context) {
    for (name, instances) in &e.attrs {
        let Some(old) = before.attrs.get(name) else {
            continue;
        };
        let Some(rendered) = out.get_mut(ctx.compact(name).as_ref()) else {
            continue;
        };
        for (i, a) in instances.iter().enumerate() {
            let Some(prev) = old.iter().find(|o| o.dataset_id == a.dataset_id) else {
                continue;
            };
            if prev.value == a.value {
                continue;
            }
            let slot = match &mut *rendered {
                Value::Array(items) => items.get_mut(i),
                other => Some(other),
            };
            if let Some(Value::Object(m)) = slot {
                m.insert(
                    previous_key(a),
                    borough_core::render::render_value(prev, ctx),
                );
            }
        }
    }
}

async fn send(
    shared: &Shared,
    sub: &CompiledSubscription,
    tenant: &str,
    body: &Value,
    mqtt: &mut Option<MqttEndpoint>,
) -> Result<(), String> {
    let uri = &sub.endpoint.uri;
    let media = if sub.endpoint.accept == "application/ld+json" {
        "application/ld+json"
    } else {
        "application/json"
    };
    if uri.starts_with("mqtt://") || uri.starts_with("mqtts://") {
        // The MQTT binding wraps the notification with its metadata.
        let mut metadata = Map::new();
        metadata.insert("Content-Type".into(), json!(media));
        if !tenant.is_empty() {
            metadata.insert("NGSILD-Tenant".into(), json!(tenant));
        }
        for (k, v) in &sub.endpoint.receiver_info {
            metadata.insert(k.clone(), json!(v));
        }
        let payload = serde_json::to_vec(&json!({"metadata": metadata, "body": body}))
            .map_err(|e| e.to_string())?;
        if mqtt.is_none() {
            *mqtt = Some(
                MqttEndpoint::connect(
                    uri,
                    &sub.endpoint.notifier_info,
                    &shared.mqtt_tls,
                    &shared.config.outbound,
                )
                .await?,
            );
        }
        let Some(conn) = mqtt.as_mut() else {
            return Err("no MQTT connection".into());
        };
        let result = conn.publish(payload, shared.config.timeout).await;
        if result.is_err() {
            // Start afresh on the next attempt.
            *mqtt = None;
        }
        return result;
    }
    // The client's resolver checks names; address literals are checked here.
    shared
        .config
        .outbound
        .check_url_literal(uri)
        .map_err(|e| format!("notification endpoint {e}"))?;
    let mut req = shared
        .client
        .post(uri)
        .header("Content-Type", media)
        .body(body.to_string());
    if media == "application/json" {
        let link = match notification_context(sub) {
            Value::String(u) => u,
            _ => borough_core::context::CORE_CONTEXT_URL.to_string(),
        };
        req = req.header(
            "Link",
            format!("<{link}>; rel=\"http://www.w3.org/ns/json-ld#context\"; type=\"application/ld+json\""),
        );
    }
    if !tenant.is_empty() {
        req = req.header("NGSILD-Tenant", tenant);
    }
    for (k, v) in &sub.endpoint.receiver_info {
        req = req.header(k.as_str(), v.as_str());
    }
    let resp = req
        .send()
        .await
        .map_err(|e| match OutboundError::find(&e) {
            Some(refused) => format!("notification endpoint {refused}"),
            None => e.to_string(),
        })?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("the endpoint answered {}", resp.status()))
    }
}

/// Periodic subscriptions (`timeInterval`): every interval, the matching
/// entities as they are, delivered directly (a missed period is not replayed).
/// The lease of periodic notifications: among nodes sharing a store, one
/// sends them; another takes over once its holder has been silent this long.
const PERIODIC_LEASE: Duration = Duration::from_secs(5);

/// Whether this node sends the periodic notifications now.
async fn holds_periodic_lease(store: &Arc<dyn EntityStore>) -> bool {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || store.lease("periodic-notifications", PERIODIC_LEASE))
        .await
    {
        Ok(Ok(held)) => held,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot renew the lease of periodic notifications");
            false
        }
        Err(_) => false,
    }
}

async fn periodic(shared: Arc<Shared>) {
    let mut due: HashMap<(String, String), i64> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if !holds_periodic_lease(&shared.store).await {
            // Another node sends them; start afresh if the lease comes here.
            due.clear();
            continue;
        }
        let now = now_micros();
        for (tenant, sub) in shared.store.all_subscriptions() {
            let Some(interval) = sub.time_interval else {
                continue;
            };
            if sub.status(now) != "active" {
                continue;
            }
            let key = (tenant.clone(), sub.record.id.clone());
            let next = *due.entry(key.clone()).or_insert(now);
            if now < next {
                continue;
            }
            due.insert(key, now + interval as i64 * 1_000_000);
            let page = shared
                .store
                .query(&tenant, &sub.query, 0, shared.config.batch, false);
            if page.entities.is_empty() {
                continue;
            }
            let items: Vec<Item> = page
                .entities
                .iter()
                .map(|e| (e.as_ref(), false, None))
                .collect();
            let body = notification(
                &sub,
                &format!("urn:ngsi-ld:Notification:periodic-{now}"),
                &items,
                now,
            );
            let result = send(&shared, &sub, &tenant, &body, &mut None).await;
            shared.store.record_delivery(
                &tenant,
                &sub.record.id,
                items.len() as u64,
                now,
                result.err(),
            );
        }
    }
}
