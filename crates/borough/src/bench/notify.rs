//! Scenario `notify`: the cost of subscriptions on writes, and the delivery
//! of their notifications to a receiver running inside the bench process.
//!
//! 1. `writes`: random `PATCH /entities/{id}/attrs` (a new `reading` and the
//!    send time as `sentAt`) with no subscription at all.
//! 2. The receiver starts, then the subscriptions are created.
//! 3. `writes+subs`: the same load for the same time; every acknowledged
//!    update that matches a subscription is remembered as (id, sentAt).
//! 4. `notifications`: waits (bounded) until the receiver has seen every
//!    remembered pair; latency is receipt time − `sentAt`, on the same clock
//!    (`SystemTime`) in the same process.
//!
//! Matching scheme. Entity `i` is in zone `i % 1000` (zones 0..=999, 100
//! entities per zone at full size, 5 in quick runs). The issue asks for 1,000
//! subscriptions of which about 10% of the updates hit one, each matching
//! update hitting exactly one. With 1,000 zones, 1,000 subscriptions on
//! distinct existing zones would match every update, so: the first
//! [`LIVE_ZONES`] (100) subscriptions watch `zone==0` .. `zone==99`, which
//! hold 10% of the entities; the other 900 watch `zone==1000` ..
//! `zone==1899`, zones no entity is in. All of them select `type Meter`, so
//! the server evaluates every one of them against every write (the cost of
//! matching), but only the live ones ever notify. The updates pick entities
//! uniformly at random in both phases (the same load), so 10% of them match
//! exactly one subscription. Quick runs have 100 subscriptions, all live.

use super::common::{self, ENTITIES_PATH, Options, RunInfo, UPSERT_WORKERS};
use super::load::{self, Conn, Failures, Summary, ms};
use super::report::{
    Bound, Phase, Target, per_second, phase_table, publish, ratio, round_to, targets_json,
    thousands,
};
use super::server::Server;
use axum::Router;
use axum::extract::State;
use axum::routing::post;
use bytes::Bytes;
use hyper::{Method, StatusCode, Uri};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Seed of the documents and of the update picks: runs are reproducible.
const SEED: u64 = 0x5EED_4071;
const SUBSCRIPTIONS_PATH: &str = "/ngsi-ld/v1/subscriptions";
const RECEIVER_PATH: &str = "/notify";
const ENTITY_TYPE: &str = "Meter";
const BATCH: usize = 1_000;
const CONCURRENCY: usize = 32;
/// Zones of the entities: entity `i` is in zone `i % ZONES`.
const ZONES: usize = 1_000;
/// Percentage of the updates that match a subscription.
const MATCH_PERCENT: usize = 10;
/// Zones with a subscription (0..LIVE_ZONES): [`MATCH_PERCENT`] % of the zones.
const LIVE_ZONES: usize = ZONES * MATCH_PERCENT / 100;
/// Longest wait for the receiver to see every expected notification.
const DELIVERY_WAIT: Duration = Duration::from_secs(60);
/// How often the wait checks the receiver.
const DELIVERY_POLL: Duration = Duration::from_millis(50);
/// How often the wait reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

// Targets from the issue: reported, never enforced (but lost notifications
// fail the run).
const TARGET_NOTIFY_PER_S: f64 = 20_000.0;
const TARGET_NOTIFY_P99_MS: f64 = 50.0;
/// Writes keep at least 80% of their throughput with the subscriptions active.
const TARGET_WRITE_RATIO: f64 = 0.8;
/// Size at which the issue states the targets.
const TARGET_SUBSCRIPTIONS: usize = 1_000;

struct Sizes {
    entities: usize,
    subscriptions: usize,
    duration: Duration,
}

/// Tiny sizes (`--quick`): they check the harness, and measure nothing.
const QUICK: Sizes = Sizes {
    entities: 5_000,
    subscriptions: 100,
    duration: Duration::from_secs(2),
};

const FULL: Sizes = Sizes {
    entities: 100_000,
    subscriptions: TARGET_SUBSCRIPTIONS,
    duration: Duration::from_secs(10),
};

/// The zone of entity `i`.
fn zone(i: usize) -> usize {
    i % ZONES
}

/// The zone watched by subscription `k`: the live zones first, then zones
/// past the last one any entity is in.
fn watched_zone(k: usize) -> usize {
    if k < LIVE_ZONES {
        k
    } else {
        ZONES + k - LIVE_ZONES
    }
}

/// Whether an update of entity `i` notifies (exactly one subscription).
fn notifies(i: usize, subscriptions: usize) -> bool {
    let z = zone(i);
    z < LIVE_ZONES && z < subscriptions
}

fn subscription_id(k: usize) -> String {
    format!("urn:ngsi-ld:Subscription:bench-notify-{k:04}")
}

/// Microseconds since the epoch: the clock of `sentAt` and of the receiver.
pub(super) fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The documents and request URIs, built once before anything is measured.
struct Dataset {
    ids: Vec<String>,
    /// `PATCH` URIs, index-aligned with `ids`.
    patch: Vec<Uri>,
    /// Upsert bodies: JSON arrays of [`BATCH`] documents.
    batches: Arc<Vec<Bytes>>,
}

impl Dataset {
    fn generate(n: usize) -> Result<Dataset, String> {
        let mut rng = SmallRng::seed_from_u64(SEED);
        let mut ids = Vec::with_capacity(n);
        let mut docs = Vec::with_capacity(n);
        let mut patch = Vec::with_capacity(n);
        for i in 0..n {
            let id = format!("urn:ngsi-ld:{ENTITY_TYPE}:{i:06}");
            let doc = json!({
                "id": id,
                "type": ENTITY_TYPE,
                "zone": zone(i),
                "reading": reading(&mut rng),
                "sentAt": 0,
            });
            let doc = serde_json::to_string(&doc)
                .map_err(|e| format!("cannot serialize entity {id}: {e}"))?;
            let uri = Uri::try_from(format!("{ENTITIES_PATH}/{id}/attrs"))
                .map_err(|e| format!("invalid request URI for {id}: {e}"))?;
            ids.push(id);
            docs.push(doc);
            patch.push(uri);
        }
        let batches = load::json_arrays(&docs, BATCH);
        Ok(Dataset {
            ids,
            patch,
            batches: Arc::new(batches),
        })
    }
}

fn reading(rng: &mut SmallRng) -> f64 {
    round_to(rng.random_range(0.0..10_000.0), 1e3)
}

/// The receiver's record of one (entity id, sentAt) pair.
pub(super) struct Receipt {
    pub(super) count: u32,
    /// Receipt time − `sentAt` at the first receipt, in microseconds.
    pub(super) latency_us: u64,
    /// Time of the first receipt, microseconds since the epoch.
    at_us: i64,
}

/// What the receiver got.
#[derive(Default)]
pub(super) struct Inbox {
    /// Notification requests (each one may carry several entities).
    posts: u64,
    /// Entities in those notifications.
    entities: u64,
    /// Bodies that were not JSON, and entities without `id` or integer `sentAt`.
    malformed: Failures,
    pub(super) seen: HashMap<(String, i64), Receipt>,
}

impl Inbox {
    fn record(&mut self, body: &[u8], now: i64) {
        self.posts += 1;
        let data = match serde_json::from_slice::<Value>(body) {
            Ok(mut v) => match v.get_mut("data").map(Value::take) {
                Some(Value::Array(data)) => data,
                _ => {
                    self.malformed
                        .record(|| format!("no data array: {}", load::quote(body)));
                    return;
                }
            },
            Err(e) => {
                self.malformed
                    .record(|| format!("invalid JSON ({e}): {}", load::quote(body)));
                return;
            }
        };
        for entity in data {
            self.entities += 1;
            let id = entity.get("id").and_then(Value::as_str);
            let sent = entity.get("sentAt").and_then(Value::as_i64);
            let (Some(id), Some(sent)) = (id, sent) else {
                self.malformed
                    .record(|| format!("entity without id or integer sentAt: {entity}"));
                continue;
            };
            self.seen
                .entry((id.to_string(), sent))
                .and_modify(|r| r.count += 1)
                .or_insert_with(|| Receipt {
                    count: 1,
                    latency_us: u64::try_from(now - sent).unwrap_or(0),
                    at_us: now,
                });
        }
    }

    /// Expected pairs not received yet.
    fn missing(&self, expected: &HashMap<(String, i64), u32>) -> u64 {
        expected
            .iter()
            .map(|(key, &n)| u64::from(n.saturating_sub(self.seen.get(key).map_or(0, |r| r.count))))
            .sum()
    }
}

pub(super) type SharedInbox = Arc<Mutex<Inbox>>;

pub(super) fn lock(inbox: &SharedInbox) -> MutexGuard<'_, Inbox> {
    inbox.lock().unwrap_or_else(|p| p.into_inner())
}

/// The notification receiver: an HTTP server on loopback, on its own
/// runtime (one thread) so that the load generator does not delay receipts.
/// Dropping it stops it; it must be dropped outside any runtime.
pub(super) struct Receiver {
    /// Kept for its `Drop`, which stops the server task's connections.
    _runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
    pub(super) inbox: SharedInbox,
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Receiver {
    pub(super) fn start() -> Result<Receiver, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("bench-receiver")
            .build()
            .map_err(|e| format!("cannot start the receiver runtime: {e}"))?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .map_err(|e| format!("cannot bind the notification receiver: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot read the receiver address: {e}"))?;
        let inbox = SharedInbox::default();
        let app = Router::new()
            .route(RECEIVER_PATH, post(receive))
            .with_state(inbox.clone());
        // Every notification comes from this machine: no per-address cap.
        let defaults = borough_api::server::ServerLimits::default();
        let limits = borough_api::server::ServerLimits {
            max_connections_per_ip: defaults.max_connections,
            ..defaults
        };
        let serving = runtime.spawn(borough_api::server::serve(
            listener,
            app,
            limits,
            std::future::pending(),
        ));
        Ok(Receiver {
            _runtime: runtime,
            addr,
            inbox,
            serving,
        })
    }

    pub(super) fn uri(&self) -> String {
        format!("http://{}{RECEIVER_PATH}", self.addr)
    }

    /// Fails if the receiver has stopped serving.
    fn check_alive(&self) -> Result<(), String> {
        if self.serving.is_finished() {
            Err("the notification receiver stopped serving".to_string())
        } else {
            Ok(())
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // Connections still open end with the runtime, dropped right after.
        self.serving.abort();
    }
}

/// Answers 204 at once; the body is recorded under the lock, the time is
/// read before anything else.
async fn receive(State(inbox): State<SharedInbox>, body: Bytes) -> StatusCode {
    let now = now_us();
    lock(&inbox).record(&body, now);
    StatusCode::NO_CONTENT
}

/// What one write phase measured. Updates cut off by the time limit are not
/// counted (nor expected to notify).
#[derive(Default)]
struct WriteRun {
    elapsed: Duration,
    /// Send time of the first update, microseconds since the epoch.
    started_us: i64,
    latencies_us: Vec<u64>,
    failures: Failures,
    /// Acknowledged updates that match a subscription: (entity index, sentAt).
    expected: Vec<(usize, i64)>,
}

/// `PATCH`es random entities for `duration` with [`CONCURRENCY`] workers,
/// each on its own keep-alive connection.
async fn write_phase(
    addr: SocketAddr,
    data: &Arc<Dataset>,
    subscriptions: usize,
    duration: Duration,
    seed: u64,
) -> Result<WriteRun, String> {
    let conns = load::open_conns(addr, CONCURRENCY).await?;
    let started_us = now_us();
    let (runs, elapsed) = load::run_workers(conns, duration, seed, |conn, deadline, rng| {
        write_worker(conn, data.clone(), subscriptions, deadline, rng)
    })
    .await?;
    let mut total = WriteRun {
        elapsed,
        started_us,
        ..WriteRun::default()
    };
    for mut run in runs {
        total.latencies_us.append(&mut run.latencies_us);
        total.expected.append(&mut run.expected);
        total.failures.merge(run.failures);
    }
    Ok(total)
}

async fn write_worker(
    mut conn: Conn,
    data: Arc<Dataset>,
    subscriptions: usize,
    deadline: Instant,
    mut rng: SmallRng,
) -> Result<WriteRun, String> {
    let mut run = WriteRun::default();
    while Instant::now() < deadline {
        let i = rng.random_range(0..data.ids.len());
        let uri = data.patch[i].clone();
        let value = reading(&mut rng);
        let sent = now_us();
        let body = format!("{{\"reading\":{value},\"sentAt\":{sent}}}");
        let request = conn.request_before(deadline, Method::PATCH, uri, Some(Bytes::from(body)));
        let Some((result, us)) = request.await else {
            break; // cut off by the time limit
        };
        match result {
            Ok((status, reply)) => {
                run.latencies_us.push(us);
                if !status.is_success() {
                    run.failures.record(|| {
                        format!(
                            "PATCH {} answered {status}: {}",
                            data.patch[i],
                            load::quote(&reply)
                        )
                    });
                } else if notifies(i, subscriptions) {
                    run.expected.push((i, sent));
                }
            }
            Err(e) => {
                run.failures
                    .record(|| format!("PATCH {}: {e}", data.patch[i]));
                if !conn.reopen_before(deadline).await? {
                    break;
                }
            }
        }
    }
    Ok(run)
}

fn write_phase_record(name: &'static str, run: &mut WriteRun, server: &Server) -> Phase {
    let latencies_us = std::mem::take(&mut run.latencies_us);
    Phase::timed(name, "updates/s", "PATCH", run.elapsed, latencies_us)
        .with_failures(run.failures.clone())
        .with_memory(server.memory())
}

/// Delivery figures, from the expected pairs and the receiver's record.
#[derive(Default)]
struct Delivery {
    /// Acknowledged updates that should notify.
    expected: usize,
    /// Expected pairs received at least once.
    delivered: usize,
    /// Expected pairs never received.
    lost: u64,
    /// Receipts beyond the first of a pair.
    duplicates: u64,
    /// Pairs received that no acknowledged update sent: updates cut off by
    /// the end of the phase but applied by the server.
    unacknowledged: usize,
    malformed: Failures,
    posts: u64,
    entities_received: u64,
    /// From the first update of the phase to the last first receipt of an
    /// expected pair.
    window: Duration,
    /// From the end of the write phase to the end of the wait.
    wait: Duration,
    /// Expected pairs per second of the write phase: the notification load
    /// offered to the server.
    offered_per_s: f64,
    /// Update → receipt latency of every delivered pair (first receipt).
    latency: Summary,
    /// Summed over the subscriptions, from `GET /subscriptions/{id}`.
    times_sent: u64,
    times_failed: u64,
    pending: u64,
}

impl Delivery {
    fn per_second(&self) -> f64 {
        per_second(self.delivered, self.window)
    }

    fn to_json(&self) -> Value {
        json!({
            "expected": self.expected,
            "delivered": self.delivered,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "unacknowledged_received": self.unacknowledged,
            "malformed": self.malformed.count,
            "first_malformed": self.malformed.first,
            "notification_requests": self.posts,
            "entities_received": self.entities_received,
            "mean_entities_per_request": round_to(ratio(self.entities_received as f64, self.posts as f64), 100.0),
            "notifications_per_s": round_to(self.per_second(), 10.0),
            "offered_per_s": round_to(self.offered_per_s, 10.0),
            "window_s": round_to(self.window.as_secs_f64(), 1e3),
            "wait_after_writes_s": round_to(self.wait.as_secs_f64(), 1e3),
            "latency_of": "update sent → notification received",
            "latency": self.latency.to_json(),
            "subscriptions": {
                "times_sent": self.times_sent,
                "times_failed": self.times_failed,
                "pending": self.pending,
            },
        })
    }
}

/// Everything measured, before the report.
struct Measured {
    upsert: Phase,
    without: Phase,
    with: Phase,
    notifications: Phase,
    delivery: Delivery,
    subscribe_elapsed: Duration,
}

pub fn run(opts: &Options) -> Result<(), String> {
    let sizes = if opts.quick { QUICK } else { FULL };
    let info = RunInfo::new("notify", opts.quick);
    eprintln!(
        "generating {} {ENTITY_TYPE} entities in {ZONES} zones (seed {SEED:#x})",
        sizes.entities
    );
    let data = Arc::new(Dataset::generate(sizes.entities)?);
    let live = LIVE_ZONES.min(sizes.subscriptions);
    if sizes.entities < ZONES || live == 0 {
        return Err(format!(
            "the scenario needs at least {ZONES} entities and one live subscription"
        ));
    }

    let runtime = common::load_runtime()?;
    let mut server = common::start_server()?;

    let (upsert, without) = runtime.block_on(load_and_write(&mut server, &data, &sizes))?;

    let receiver = Receiver::start()?;
    eprintln!("receiver listening on {}", receiver.uri());
    let measured = runtime.block_on(with_subscriptions(
        &mut server,
        &receiver,
        &data,
        &sizes,
        upsert,
        without,
    ));
    drop(server);
    drop(receiver);
    let measured = measured?;

    let report = Report {
        info,
        sizes: &sizes,
        live,
        measured,
    };
    publish(&report.table(), &report.to_json(), &opts.out)?;

    let m = &report.measured;
    for phase in [&m.without, &m.with] {
        phase.check_failures(phase.name, "updates")?;
    }
    let d = &m.delivery;
    if d.lost > 0 {
        return Err(format!(
            "{} of {} notifications lost (not received within {} s after the writes){}",
            d.lost,
            d.expected,
            DELIVERY_WAIT.as_secs(),
            d.malformed
                .first
                .as_deref()
                .map(|m| format!("; first malformed: {m}"))
                .unwrap_or_default()
        ));
    }
    if d.expected == 0 {
        return Err("no acknowledged update matched a subscription".to_string());
    }
    Ok(())
}

/// Upsert, then the write phase without subscriptions.
async fn load_and_write(
    server: &mut Server,
    data: &Arc<Dataset>,
    sizes: &Sizes,
) -> Result<(Phase, Phase), String> {
    let batches = data.batches.clone();
    let upsert = common::upsert(server, "upsert", batches, sizes.entities, BATCH).await?;

    eprintln!(
        "writes: {} s at concurrency {CONCURRENCY}, PATCH of random entities, no subscription",
        sizes.duration.as_secs()
    );
    let mut run = write_phase(server.addr(), data, 0, sizes.duration, SEED ^ 0x5752).await?;
    server.check_alive()?;
    let without = write_phase_record("writes", &mut run, server);
    Ok((upsert, without))
}

/// Subscriptions, the write phase with them, the wait for delivery and the
/// subscriptions' statistics.
async fn with_subscriptions(
    server: &mut Server,
    receiver: &Receiver,
    data: &Arc<Dataset>,
    sizes: &Sizes,
    upsert: Phase,
    without: Phase,
) -> Result<Measured, String> {
    let addr = server.addr();
    eprintln!(
        "subscriptions: {} (zone==0..{} live, the rest on zones no entity is in) -> {}",
        sizes.subscriptions,
        LIVE_ZONES.min(sizes.subscriptions) - 1,
        receiver.uri()
    );
    let started = Instant::now();
    subscribe(addr, &receiver.uri(), sizes.subscriptions).await?;
    let subscribe_elapsed = started.elapsed();
    server.check_alive()?;

    eprintln!(
        "writes+subs: {} s at concurrency {CONCURRENCY}, the same load",
        sizes.duration.as_secs()
    );
    // The same seed as the first write phase: the same entities in the same order.
    let mut run = write_phase(
        addr,
        data,
        sizes.subscriptions,
        sizes.duration,
        SEED ^ 0x5752,
    )
    .await?;
    let writes_done = Instant::now();
    server.check_alive()?;
    let with = write_phase_record("writes+subs", &mut run, server);

    let mut expected: HashMap<(String, i64), u32> = HashMap::with_capacity(run.expected.len());
    for &(i, sent) in &run.expected {
        *expected.entry((data.ids[i].clone(), sent)).or_default() += 1;
    }
    eprintln!(
        "delivery: waiting up to {} s for {} notifications",
        DELIVERY_WAIT.as_secs(),
        run.expected.len()
    );
    let deadline = writes_done + DELIVERY_WAIT;
    let mut next_progress = Instant::now() + PROGRESS_EVERY;
    loop {
        let missing = lock(&receiver.inbox).missing(&expected);
        if missing == 0 {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            eprintln!("delivery: {missing} notifications still missing, giving up");
            break;
        }
        if now >= next_progress {
            eprintln!("delivery: {missing} notifications still missing");
            next_progress = now + PROGRESS_EVERY;
        }
        server.check_alive()?;
        receiver.check_alive()?;
        tokio::time::sleep(DELIVERY_POLL).await;
    }
    let wait = writes_done.elapsed();
    let memory = server.memory();

    let mut delivery = {
        let inbox = lock(&receiver.inbox);
        delivery_figures(&inbox, &expected, run.started_us)
    };
    delivery.wait = wait;
    delivery.offered_per_s = per_second(delivery.expected, run.elapsed);
    (delivery.times_sent, delivery.times_failed, delivery.pending) =
        subscription_stats(addr, sizes.subscriptions).await?;
    server.check_alive()?;

    let notifications = Phase {
        name: "notifications",
        unit: "notices/s",
        count: delivery.delivered,
        elapsed: delivery.window,
        latency_of: "update→recv",
        latency: delivery.latency,
        failures: Failures::default(),
        memory,
        ops: Vec::new(),
    };
    Ok(Measured {
        upsert,
        without,
        with,
        notifications,
        delivery,
        subscribe_elapsed,
    })
}

fn delivery_figures(
    inbox: &Inbox,
    expected: &HashMap<(String, i64), u32>,
    started_us: i64,
) -> Delivery {
    let mut d = Delivery {
        expected: expected.values().map(|&n| n as usize).sum(),
        malformed: inbox.malformed.clone(),
        posts: inbox.posts,
        entities_received: inbox.entities,
        ..Delivery::default()
    };
    let mut latencies = Vec::with_capacity(expected.len());
    let mut last_us = started_us;
    for (key, &n) in expected {
        match inbox.seen.get(key) {
            Some(r) => {
                d.delivered += n.min(r.count) as usize;
                d.lost += u64::from(n.saturating_sub(r.count));
                latencies.push(r.latency_us);
                last_us = last_us.max(r.at_us);
            }
            None => d.lost += u64::from(n),
        }
    }
    for (key, r) in &inbox.seen {
        let n = expected.get(key).copied().unwrap_or(0);
        if n == 0 {
            d.unacknowledged += 1;
        }
        d.duplicates += u64::from(r.count.saturating_sub(n.max(1)));
    }
    d.window = Duration::from_micros(u64::try_from(last_us - started_us).unwrap_or(0));
    d.latency = Summary::of(&mut latencies);
    d
}

/// Creates the subscriptions, one request at a time; each must answer 201.
async fn subscribe(addr: SocketAddr, endpoint: &str, n: usize) -> Result<(), String> {
    let mut conn = Conn::open(addr).await?;
    for k in 0..n {
        let body = json!({
            "id": subscription_id(k),
            "type": "Subscription",
            "entities": [{"type": ENTITY_TYPE}],
            "q": format!("zone=={}", watched_zone(k)),
            "notification": {
                "format": "keyValues",
                "attributes": ["reading", "sentAt"],
                "endpoint": {"uri": endpoint},
            },
        });
        let body = serde_json::to_vec(&body)
            .map_err(|e| format!("cannot serialize subscription {k}: {e}"))?;
        let (status, reply) = conn
            .request_with_timeout(
                Method::POST,
                Uri::from_static(SUBSCRIPTIONS_PATH),
                Some(Bytes::from(body)),
                false,
            )
            .await
            .map_err(|e| format!("subscription {k}: {e}"))?;
        if status != StatusCode::CREATED {
            return Err(format!(
                "subscription {k}: POST {SUBSCRIPTIONS_PATH} answered {status}: {}",
                load::quote(&reply)
            ));
        }
    }
    Ok(())
}

/// `timesSent`, `timesFailed` and `pending`, summed over the subscriptions.
async fn subscription_stats(addr: SocketAddr, n: usize) -> Result<(u64, u64, u64), String> {
    let mut conn = Conn::open(addr).await?;
    let (mut sent, mut failed, mut pending) = (0, 0, 0);
    for k in 0..n {
        let id = subscription_id(k);
        let uri = Uri::try_from(format!("{SUBSCRIPTIONS_PATH}/{id}"))
            .map_err(|e| format!("invalid URI for {id}: {e}"))?;
        let (status, body) = conn
            .request_with_timeout(Method::GET, uri, None, true)
            .await
            .map_err(|e| format!("subscription stats: {e}"))?;
        if status != StatusCode::OK {
            return Err(format!(
                "subscription stats: GET {id} answered {status}: {}",
                load::quote(&body)
            ));
        }
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| format!("subscription stats: GET {id} answered invalid JSON: {e}"))?;
        let field = |name: &str| {
            v.get("notification")
                .and_then(|n| n.get(name))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        sent += field("timesSent");
        failed += field("timesFailed");
        pending += field("pending");
    }
    Ok((sent, failed, pending))
}

struct Report<'a> {
    info: RunInfo,
    sizes: &'a Sizes,
    /// Subscriptions on zones that hold entities.
    live: usize,
    measured: Measured,
}

impl Report<'_> {
    /// Write throughput with the subscriptions ÷ without.
    fn write_ratio(&self) -> f64 {
        ratio(
            self.measured.with.throughput(),
            self.measured.without.throughput(),
        )
    }

    fn targets(&self) -> Vec<Target> {
        let d = &self.measured.delivery;
        let rate = d.per_second();
        let p99 = ms(d.latency.p99_us as f64);
        let write_ratio = self.write_ratio();
        vec![
            Target::rate_at_least("notifications/s", rate, TARGET_NOTIFY_PER_S, "/s"),
            Target::latency_below("notification p99", p99, TARGET_NOTIFY_P99_MS),
            Target::new(
                "writes+subs ÷ writes",
                write_ratio,
                format!("{write_ratio:.2}x"),
                Bound::AtLeast(TARGET_WRITE_RATIO),
                format!("≥ {TARGET_WRITE_RATIO}x (≤ 20% lost)"),
            ),
            Target::new(
                "lost notifications",
                d.lost as f64,
                d.lost.to_string(),
                Bound::Below(1.0),
                "0".into(),
            ),
        ]
    }

    fn table(&self) -> String {
        let s = self.sizes;
        let m = &self.measured;
        let d = &m.delivery;
        let mut out = format!(
            "{}{} {ENTITY_TYPE} entities in {ZONES} zones, \
             {} subscriptions ({} live); writes {} s at concurrency {CONCURRENCY}\n\n",
            self.info.title(),
            thousands(s.entities as f64),
            thousands(s.subscriptions as f64),
            self.live,
            s.duration.as_secs(),
        );
        out.push_str(&phase_table([
            &m.upsert,
            &m.without,
            &m.with,
            &m.notifications,
        ]));
        out.push_str(&format!(
            "\ndelivery (to a receiver in the bench process, answering 204)\n\
             \x20 expected        {:>10}   acknowledged updates that match a subscription ({:.1}% of {})\n\
             \x20 delivered       {:>10}   in {:.2} s from the first update to the last receipt\n\
             \x20 offered         {:>10}   /s (expected ÷ write time: the most that can be delivered)\n\
             \x20 lost            {:>10}\n\
             \x20 duplicates      {:>10}   (allowed: delivery is at least once)\n\
             \x20 unacknowledged  {:>10}   (updates cut off by the end of the phase, notified anyway)\n\
             \x20 requests        {:>10}   notifications received, {:.1} entities each\n\
             \x20 server stats    {:>10}   timesSent; timesFailed {}, pending {}\n\
             \x20 drained         {:>10.2}   s after the last write\n\
             \x20 subscribing     {:>10.2}   s for {} subscriptions\n",
            thousands(d.expected as f64),
            100.0 * ratio(d.expected as f64, m.with.count as f64),
            thousands(m.with.count as f64),
            thousands(d.delivered as f64),
            d.window.as_secs_f64(),
            thousands(d.offered_per_s),
            d.lost,
            d.duplicates,
            d.unacknowledged,
            thousands(d.posts as f64),
            ratio(d.entities_received as f64, d.posts as f64),
            thousands(d.times_sent as f64),
            d.times_failed,
            d.pending,
            d.wait.as_secs_f64(),
            m.subscribe_elapsed.as_secs_f64(),
            s.subscriptions,
        ));
        if d.malformed.count > 0 {
            out.push_str(&format!(
                "  malformed       {:>10}   first: {}\n",
                d.malformed.count,
                d.malformed.first.as_deref().unwrap_or("-")
            ));
        }
        out.push_str(&format!(
            "\nratios\n  writes+subs ÷ writes     {:.2}x (updates/s; the cost of matching {} subscriptions)\n\n",
            self.write_ratio(),
            s.subscriptions
        ));
        let note = format!(
            "(baseline: none external; the only comparison is the same server without subscriptions, \
             which the issue defines as the write ratio. The targets apply at {} subscriptions; \
             notifications/s cannot exceed the offered rate, {MATCH_PERCENT}% of the write rate)\n",
            thousands(TARGET_SUBSCRIPTIONS as f64)
        );
        out.push_str(&self.info.targets_section(&self.targets(), &note));
        out
    }

    fn to_json(&self) -> Value {
        let m = &self.measured;
        self.info.json(json!({
            "config": {
                "seed": SEED,
                "entities": self.sizes.entities,
                "entity_type": ENTITY_TYPE,
                "batch": BATCH,
                "upsert_workers": UPSERT_WORKERS,
                "duration_s": self.sizes.duration.as_secs_f64(),
                "concurrency": CONCURRENCY,
                "zones": ZONES,
                "subscriptions": self.sizes.subscriptions,
                "live_subscriptions": self.live,
                "match_percent": MATCH_PERCENT,
                "matching_scheme": format!(
                    "entity i is in zone i % {ZONES}; subscription k watches zone==k for k < {LIVE_ZONES} \
                     (zones holding {MATCH_PERCENT}% of the entities) and zone=={ZONES}+k-{LIVE_ZONES} \
                     otherwise (a zone no entity is in); updates pick entities uniformly at random, so \
                     {MATCH_PERCENT}% of them match exactly one subscription"
                ),
                "subscription": {
                    "entities": [{"type": ENTITY_TYPE}],
                    "q": "zone==<k>",
                    "notification": {"format": "keyValues", "attributes": ["reading", "sentAt"]},
                },
                "delivery_wait_s": DELIVERY_WAIT.as_secs_f64(),
            },
            "phases": {
                "upsert": m.upsert.to_json(),
                "writes": m.without.to_json(),
                "writes+subs": m.with.to_json(),
                "notifications": m.notifications.to_json(),
            },
            "subscribe_s": round_to(m.subscribe_elapsed.as_secs_f64(), 1e3),
            "delivery": m.delivery.to_json(),
            "ratios": {
                "writes_with_vs_without_subscriptions": round_to(self.write_ratio(), 1e3),
            },
            "baseline": "none external: the only comparison is the same server without \
                         subscriptions (the write ratio, as the issue defines it)",
            "targets": targets_json(&self.targets()),
            "targets_apply_at_subscriptions": TARGET_SUBSCRIPTIONS,
        }))
    }
}
