//! Context source registrations (clause 5.9) and subscriptions to them
//! (clause 5.11): the routes, and the registry every distributed operation
//! asks which sources concern it. Registrations are records of the store,
//! written before a change is answered and kept in memory for lookups.

use crate::contexts::ActiveContext;
use crate::entities::{body_with_context, existing_tenant, options, with_tenant};
use crate::problem::ApiResult;
use crate::query::paging;
use crate::request::{
    ResponseType, encode_path_segment, link_context, list_param, negotiate, tenant,
};
use crate::subscriptions::{context_record, respond};
use crate::{AppState, SharedState};
use axum::body::Body;
use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use borough_core::query::{EntityQuery, compile_id_pattern, parse_q, parse_type_expr};
use borough_core::registration::{CompiledRegistration, Mode, RegistrationRecord};
use borough_core::subscription::{CompiledSubscription, SubscriptionRecord};
use borough_core::validate::{check_uri, format_datetime, now_micros};
use borough_core::{NgsiError, NgsiResult, ProblemKind};
use borough_store::{RecordChange, RecordKind, RecordStore, StoreError};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

type Params = Query<HashMap<String, String>>;
type Key = (String, String);

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Most registrations (and subscriptions to them) of one tenant: a
/// stranger must not grow the registry without bound.
pub const MAX_PER_TENANT: usize = 10_000;

/// How a source has answered distributed operations so far (clause 5.2.9:
/// status, timesSent, timesFailed, lastSuccess, lastFailure).
#[derive(Clone, Debug, Default)]
pub struct SourceStatus {
    pub times_sent: u64,
    pub times_failed: u64,
    pub last_success: Option<i64>,
    pub last_failure: Option<i64>,
    pub last_error: Option<String>,
    /// No request goes to the source before this, after a failure.
    pub cooling_until: Option<Instant>,
}

/// A subscription to registrations, compiled, with its delivery statistics.
#[derive(Debug)]
pub struct RegistrationSubscription {
    pub compiled: CompiledSubscription,
    pub stats: Mutex<borough_core::subscription::Stats>,
}

/// Every tenant's registrations and subscriptions to them.
pub struct Registry {
    records: Option<Arc<dyn RecordStore>>,
    registrations: RwLock<BTreeMap<Key, Arc<CompiledRegistration>>>,
    subscriptions: RwLock<BTreeMap<Key, Arc<RegistrationSubscription>>>,
    status: Mutex<HashMap<Key, SourceStatus>>,
    /// Registration writes one at a time: the conflict check of exclusive
    /// registrations and read-modify-write updates must not interleave.
    writes: tokio::sync::Mutex<()>,
    /// Notifications to subscribers of registrations in flight at once.
    deliveries: Arc<tokio::sync::Semaphore>,
}

/// Most notifications of registration changes in flight at once.
const MAX_DELIVERIES: usize = 64;

fn poisoned<T>(e: std::sync::PoisonError<T>) -> T {
    e.into_inner()
}

impl Registry {
    /// Takes in registrations (and subscriptions to them) that other nodes
    /// sharing the store made, changed or deleted.
    pub fn apply_records(&self, changes: &[RecordChange]) {
        let now = now_micros();
        for c in changes {
            let key = (c.tenant.clone(), c.key.clone());
            match c.kind {
                RecordKind::Registration => {
                    let compiled = c.value.as_deref().map(|bytes| {
                        serde_json::from_slice::<RegistrationRecord>(bytes)
                            .map_err(|e| e.to_string())
                            .and_then(|r| {
                                CompiledRegistration::compile(r, now, false).map_err(|e| e.detail)
                            })
                    });
                    let mut all = self.registrations.write().unwrap_or_else(poisoned);
                    match compiled {
                        Some(Ok(r)) => {
                            all.insert(key, Arc::new(r));
                        }
                        Some(Err(e)) => {
                            tracing::error!(registration = %c.key, error = %e, "a followed registration is unreadable")
                        }
                        None => {
                            all.remove(&key);
                        }
                    }
                }
                RecordKind::RegistrationSubscription => {
                    let compiled = c.value.as_deref().map(|bytes| {
                        serde_json::from_slice::<SubscriptionRecord>(bytes)
                            .map_err(|e| e.to_string())
                            .and_then(|r| {
                                CompiledSubscription::compile(r, now, false).map_err(|e| e.detail)
                            })
                    });
                    let mut all = self.subscriptions.write().unwrap_or_else(poisoned);
                    match compiled {
                        Some(Ok(compiled)) => {
                            all.insert(
                                key,
                                Arc::new(RegistrationSubscription {
                                    compiled,
                                    stats: Mutex::default(),
                                }),
                            );
                        }
                        Some(Err(e)) => {
                            tracing::error!(subscription = %c.key, error = %e, "a followed subscription to registrations is unreadable")
                        }
                        None => {
                            all.remove(&key);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Follows, in the background, the registrations other nodes change.
    pub fn follow(
        self: &Arc<Self>,
        changes: tokio::sync::broadcast::Receiver<borough_store::RecordBatch>,
    ) {
        let registry = Arc::downgrade(self);
        borough_store::follow_records(changes, move |batch| {
            let registry = registry.clone();
            async move {
                let Some(r) = registry.upgrade() else {
                    return false;
                };
                match batch {
                    Some(batch) => r.apply_records(&batch),
                    None => tracing::warn!(
                        "registration changes of other nodes were missed; they show after a restart"
                    ),
                }
                true
            }
        });
    }

    /// Loads the stored registrations and subscriptions (blocking).
    pub fn load(records: Option<Arc<dyn RecordStore>>) -> Result<Self, String> {
        let mut registrations = BTreeMap::new();
        let mut subscriptions = BTreeMap::new();
        if let Some(store) = &records {
            let now = now_micros();
            for (tenant, id, bytes) in store
                .records(RecordKind::Registration)
                .map_err(|e| format!("cannot read registrations: {e}"))?
            {
                let record: RegistrationRecord = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("registration '{id}' is unreadable: {e}"))?;
                let compiled = CompiledRegistration::compile(record, now, false)
                    .map_err(|e| format!("registration '{id}': {}", e.detail))?;
                registrations.insert((tenant, id), Arc::new(compiled));
            }
            for (tenant, id, bytes) in store
                .records(RecordKind::RegistrationSubscription)
                .map_err(|e| format!("cannot read registration subscriptions: {e}"))?
            {
                let record: SubscriptionRecord = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("subscription '{id}' is unreadable: {e}"))?;
                let compiled = CompiledSubscription::compile(record, now, false)
                    .map_err(|e| format!("subscription '{id}': {}", e.detail))?;
                subscriptions.insert(
                    (tenant, id),
                    Arc::new(RegistrationSubscription {
                        compiled,
                        stats: Mutex::default(),
                    }),
                );
            }
        }
        Ok(Self {
            records,
            registrations: RwLock::new(registrations),
            subscriptions: RwLock::new(subscriptions),
            status: Mutex::default(),
            writes: tokio::sync::Mutex::new(()),
            deliveries: Arc::new(tokio::sync::Semaphore::new(MAX_DELIVERIES)),
        })
    }

    /// Whether a tenant has any registration: most requests find none and
    /// pay nothing more for federation.
    pub fn has_any(&self, tenant: &str) -> bool {
        let regs = self.registrations.read().unwrap_or_else(poisoned);
        regs.range((tenant.to_string(), String::new())..)
            .next()
            .is_some_and(|((t, _), _)| t == tenant)
    }

    /// A tenant's live (unexpired) registrations, ordered by id.
    pub fn of_tenant(&self, tenant: &str) -> Vec<Arc<CompiledRegistration>> {
        let now = now_micros();
        let regs = self.registrations.read().unwrap_or_else(poisoned);
        regs.range((tenant.to_string(), String::new())..)
            .take_while(|((t, _), _)| t == tenant)
            .map(|(_, r)| r.clone())
            .filter(|r| !r.is_expired(now))
            .collect()
    }

    pub fn get(&self, tenant: &str, id: &str) -> Option<Arc<CompiledRegistration>> {
        let regs = self.registrations.read().unwrap_or_else(poisoned);
        regs.get(&(tenant.to_string(), id.to_string()))
            .filter(|r| !r.is_expired(now_micros()))
            .cloned()
    }

    pub fn status(&self, tenant: &str, id: &str) -> SourceStatus {
        let status = self.status.lock().unwrap_or_else(poisoned);
        status
            .get(&(tenant.to_string(), id.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    /// Whether a source is cooling down after a failure.
    pub fn cooling(&self, tenant: &str, id: &str) -> bool {
        let status = self.status.lock().unwrap_or_else(poisoned);
        status
            .get(&(tenant.to_string(), id.to_string()))
            .and_then(|s| s.cooling_until)
            .is_some_and(|t| Instant::now() < t)
    }

    /// Records a request's outcome; a failure starts the cooldown.
    pub fn record_outcome(
        &self,
        tenant: &str,
        id: &str,
        error: Option<String>,
        cooldown: Duration,
    ) {
        let mut status = self.status.lock().unwrap_or_else(poisoned);
        let s = status
            .entry((tenant.to_string(), id.to_string()))
            .or_default();
        let now = now_micros();
        s.times_sent += 1;
        match error {
            None => {
                s.last_success = Some(now);
                s.cooling_until = None;
            }
            Some(e) => {
                s.times_failed += 1;
                s.last_failure = Some(now);
                s.last_error = Some(e);
                s.cooling_until = Some(Instant::now() + cooldown);
            }
        }
    }

    /// Turns the last request's success into a failure: the source answered,
    /// but not with what it should have.
    pub fn mark_failed(&self, tenant: &str, id: &str, error: String, cooldown: Option<Duration>) {
        let mut status = self.status.lock().unwrap_or_else(poisoned);
        let s = status
            .entry((tenant.to_string(), id.to_string()))
            .or_default();
        let now = now_micros();
        s.times_failed += 1;
        s.last_failure = Some(now);
        s.last_error = Some(error);
        if let Some(c) = cooldown {
            s.cooling_until = Some(Instant::now() + c);
        }
    }

    async fn persist(
        &self,
        kind: RecordKind,
        tenant: &str,
        id: &str,
        value: Option<Vec<u8>>,
    ) -> ApiResult<()> {
        let Some(store) = self.records.clone() else {
            return Ok(());
        };
        let change = RecordChange {
            kind,
            tenant: tenant.to_string(),
            key: id.to_string(),
            value,
        };
        tokio::task::spawn_blocking(move || store.write_records(&[change]))
            .await
            .map_err(|e| StoreError::Io(format!("a registry write failed: {e}")))??;
        Ok(())
    }

    /// Removes a tenant's registrations and subscriptions to them (the
    /// tenant is being deleted); answers how many there were.
    pub async fn purge(&self, tenant: &str) -> ApiResult<usize> {
        let _one_at_a_time = self.writes.lock().await;
        let regs: Vec<String> = self
            .of_tenant_all(tenant)
            .into_iter()
            .map(|r| r.id().to_string())
            .collect();
        let subs: Vec<String> = self
            .subscriptions_of(tenant)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let count = regs.len() + subs.len();
        if let Some(store) = self.records.clone() {
            let changes: Vec<RecordChange> = regs
                .iter()
                .map(|id| (RecordKind::Registration, id))
                .chain(
                    subs.iter()
                        .map(|id| (RecordKind::RegistrationSubscription, id)),
                )
                .map(|(kind, id)| RecordChange {
                    kind,
                    tenant: tenant.to_string(),
                    key: id.clone(),
                    value: None,
                })
                .collect();
            if !changes.is_empty() {
                let written = tokio::task::spawn_blocking(move || store.write_records(&changes))
                    .await
                    .map_err(|e| StoreError::Io(format!("a registry write failed: {e}")))?;
                written?;
            }
        }
        let in_tenant = |k: &Key| k.0 == tenant;
        self.registrations
            .write()
            .unwrap_or_else(poisoned)
            .retain(|k, _| !in_tenant(k));
        self.subscriptions
            .write()
            .unwrap_or_else(poisoned)
            .retain(|k, _| !in_tenant(k));
        self.status
            .lock()
            .unwrap_or_else(poisoned)
            .retain(|k, _| !in_tenant(k));
        Ok(count)
    }

    /// Removes a tenant's expired registrations (they match nothing and only
    /// take room); call it holding `writes`.
    async fn sweep_expired(&self, tenant: &str) -> ApiResult<()> {
        let now = now_micros();
        let expired: Vec<String> = self
            .of_tenant_all(tenant)
            .into_iter()
            .filter(|r| r.is_expired(now))
            .map(|r| r.id().to_string())
            .collect();
        for id in expired {
            self.persist(RecordKind::Registration, tenant, &id, None)
                .await?;
            let key = (tenant.to_string(), id);
            self.registrations
                .write()
                .unwrap_or_else(poisoned)
                .remove(&key);
            self.status.lock().unwrap_or_else(poisoned).remove(&key);
        }
        Ok(())
    }

    /// A tenant's registrations, expired ones included.
    fn of_tenant_all(&self, tenant: &str) -> Vec<Arc<CompiledRegistration>> {
        let regs = self.registrations.read().unwrap_or_else(poisoned);
        regs.range((tenant.to_string(), String::new())..)
            .take_while(|((t, _), _)| t == tenant)
            .map(|(_, r)| r.clone())
            .collect()
    }

    fn subscriptions_of(&self, tenant: &str) -> Vec<(String, Arc<RegistrationSubscription>)> {
        let subs = self.subscriptions.read().unwrap_or_else(poisoned);
        subs.range((tenant.to_string(), String::new())..)
            .take_while(|((t, _), _)| t == tenant)
            .map(|((_, id), s)| (id.clone(), s.clone()))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Registrations

fn bad(detail: impl Into<String>) -> NgsiError {
    NgsiError::bad_data(detail.into())
}

/// Whether the operator's list of source hosts (`--source-hosts`) admits
/// `uri`; an empty list admits any host.
pub fn source_host_allowed(state: &AppState, uri: &str) -> bool {
    let hosts = &state.config.source_hosts;
    if hosts.is_empty() {
        return true;
    }
    let Ok(url) = reqwest::Url::parse(uri) else {
        return false;
    };
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let with_port = url
        .port_or_known_default()
        .map(|p| format!("{host}:{p}"))
        .unwrap_or_else(|| host.clone());
    hosts.iter().any(|h| *h == host || *h == with_port)
}

/// Refuses an endpoint the operator has not allowed: a host outside
/// `--source-hosts` when it is given, and an internal address outside
/// `--allow-outbound`.
async fn check_source_endpoint(state: &AppState, uri: &str) -> ApiResult<()> {
    if !source_host_allowed(state, uri) {
        return Err(bad(format!(
            "endpoint: '{uri}' is not on this broker's list of context source hosts (--source-hosts)"
        ))
        .into());
    }
    match state.config.outbound.check_url(uri).await {
        Err(e) if e.is_refusal() => {
            Err(bad(format!("endpoint: {e}; the operator's --allow-outbound list decides which sources Borough may forward to")).into())
        }
        _ => Ok(()),
    }
}

/// The exclusive registration `reg` would overlap, or the local data it
/// would contradict (clause 5.9.2.4: an exclusive source holds its
/// attributes alone), as a 409 problem.
fn check_conflicts(state: &AppState, tenant: &str, reg: &CompiledRegistration) -> ApiResult<()> {
    if reg.mode == Mode::Exclusive {
        for info in &reg.information {
            for e in &info.entities {
                let Some(id) = &e.id else { continue };
                let Some(local) = state.store.get(tenant, id) else {
                    continue;
                };
                if let Some(name) = local.attrs.keys().find(|n| info.covers_attribute(n)) {
                    return Err(NgsiError::new(
                        ProblemKind::Conflict,
                        format!(
                            "entity '{id}' holds attribute '{}' here: an exclusive registration of it would hide it",
                            reg.ctx.compact(name)
                        ),
                    )
                    .into());
                }
            }
        }
    }
    for other in state.sources.of_tenant(tenant) {
        if other.id() == reg.id() {
            continue;
        }
        if let Some((entity, attr)) = reg.conflicts_with(&other) {
            return Err(NgsiError::new(
                ProblemKind::Conflict,
                format!(
                    "attribute '{}' of entity '{entity}' is already registered exclusively by '{}'",
                    reg.ctx.compact(&attr),
                    other.id()
                ),
            )
            .into());
        }
    }
    Ok(())
}

/// The id a creation names in its body (taken out of it), or a new one.
fn new_id(
    body: &mut Map<String, Value>,
    what: &str,
    urn_type: &str,
    now: i64,
) -> ApiResult<String> {
    match body.remove("id") {
        Some(Value::String(id)) => {
            check_uri(&format!("{what} id"), &id)?;
            Ok(id)
        }
        Some(_) => Err(bad(format!("{what} id must be a string")).into()),
        None => Ok(format!(
            "urn:ngsi-ld:{urn_type}:{:x}{:04x}",
            now,
            NEXT.fetch_add(1, Ordering::Relaxed) & 0xffff
        )),
    }
}

/// 201 with the new resource's Location.
fn created(collection: &str, id: &str, tenant: &str) -> Response {
    let mut resp = StatusCode::CREATED.into_response();
    if let Ok(l) = HeaderValue::from_str(&format!(
        "/ngsi-ld/v1/{collection}/{}",
        encode_path_segment(id)
    )) {
        resp.headers_mut().insert(header::LOCATION, l);
    }
    with_tenant(resp, tenant)
}

/// Writes a record of the registry durably.
async fn store<T: serde::Serialize>(
    state: &AppState,
    kind: RecordKind,
    tenant: &str,
    id: &str,
    record: &T,
) -> ApiResult<()> {
    let bytes = serde_json::to_vec(record)
        .map_err(|e| NgsiError::internal(format!("cannot store '{id}': {e}")))?;
    state.sources.persist(kind, tenant, id, Some(bytes)).await
}

/// `POST /csourceRegistrations`
pub async fn create(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = tenant(&headers)?;
    let (v, actx) =
        body_with_context(&state, &headers, body, state.config.max_body_bytes, false).await?;
    let Value::Object(mut body) = v else {
        return Err(bad("a registration must be a JSON object").into());
    };
    let now = now_micros();
    let id = new_id(&mut body, "registration", "ContextSourceRegistration", now)?;
    borough_core::registration::drop_system_members(&mut body);
    let (context, context_objects) = context_record(&state, &actx).await?;
    let record = RegistrationRecord {
        id: id.clone(),
        body,
        context,
        context_objects,
        created_at: now,
        modified_at: now,
    };
    let compiled = CompiledRegistration::compile(record.clone(), now, true)?;
    check_source_endpoint(&state, &compiled.endpoint).await?;
    let _one_at_a_time = state.sources.writes.lock().await;
    if state.sources.get(&tenant, &id).is_some() {
        return Err(NgsiError::new(
            ProblemKind::AlreadyExists,
            format!("registration '{id}' already exists"),
        )
        .into());
    }
    state.sources.sweep_expired(&tenant).await?;
    if state.sources.of_tenant_all(&tenant).len() >= MAX_PER_TENANT {
        return Err(NgsiError::new(
            ProblemKind::QuotaExceeded,
            format!("a tenant may hold at most {MAX_PER_TENANT} registrations"),
        )
        .into());
    }
    check_conflicts(&state, &tenant, &compiled)?;
    store(&state, RecordKind::Registration, &tenant, &id, &record).await?;
    let compiled = Arc::new(compiled);
    state
        .sources
        .registrations
        .write()
        .unwrap_or_else(poisoned)
        .insert((tenant.clone(), id.clone()), compiled.clone());
    notify_change(&state, &tenant, None, Some(&compiled));
    Ok(created("csourceRegistrations", &id, &tenant))
}

/// A registration as clients read it: what they wrote, with the broker's
/// members (clause 5.2.9), and `@context` in JSON-LD.
pub fn render(
    reg: &CompiledRegistration,
    status: &SourceStatus,
    ld: bool,
    sys_attrs: bool,
) -> Value {
    let mut out = Map::new();
    out.insert("id".into(), json!(reg.record.id));
    out.insert("type".into(), json!("ContextSourceRegistration"));
    for (k, v) in &reg.record.body {
        if k != "type" {
            out.insert(k.clone(), v.clone());
        }
    }
    if status.times_sent > 0 {
        let failing = status.last_failure > status.last_success;
        out.insert(
            "status".into(),
            json!(if failing { "failed" } else { "ok" }),
        );
        out.insert("timesSent".into(), json!(status.times_sent));
        out.insert("timesFailed".into(), json!(status.times_failed));
        if let Some(t) = status.last_success {
            out.insert("lastSuccess".into(), json!(format_datetime(t)));
        }
        if let Some(t) = status.last_failure {
            out.insert("lastFailure".into(), json!(format_datetime(t)));
        }
    }
    if sys_attrs {
        out.insert(
            "createdAt".into(),
            json!(format_datetime(reg.record.created_at)),
        );
        out.insert(
            "modifiedAt".into(),
            json!(format_datetime(reg.record.modified_at)),
        );
    }
    if ld {
        out.insert("@context".into(), reg.record.context.clone());
    }
    Value::Object(out)
}

/// The selection of `GET /csourceRegistrations` (clause 5.10.2).
struct RegistrationFilter {
    ids: Vec<String>,
    types: Option<borough_core::query::TypeExpr>,
    id_pattern: Option<regex::Regex>,
    attrs: Vec<String>,
    /// `q` and `csf` on the registration's own members, and the geo-query
    /// on its location.
    members: EntityQuery,
    time: Option<(String, borough_core::temporal::TimeRange)>,
}

impl RegistrationFilter {
    fn parse(params: &HashMap<String, String>, actx: &ActiveContext) -> NgsiResult<Self> {
        let ids: Vec<String> = list_param(params.get("id").map(String::as_str))
            .into_iter()
            .map(|id| check_uri("id", id).map(|()| id.to_string()))
            .collect::<NgsiResult<_>>()?;
        let types = params
            .get("type")
            .map(|t| parse_type_expr(t, &actx.ctx))
            .transpose()?;
        let id_pattern = params
            .get("idPattern")
            .map(|p| compile_id_pattern(p))
            .transpose()?;
        let attrs = list_param(params.get("attrs").map(String::as_str))
            .into_iter()
            .map(|a| {
                borough_core::validate::check_name("attribute name", a)?;
                Ok(actx.ctx.expand(a).into_owned())
            })
            .collect::<NgsiResult<_>>()?;
        let mut members = EntityQuery::default();
        let q = match (params.get("q"), params.get("csf")) {
            (Some(q), Some(csf)) => Some(format!("({q});({csf})")),
            (Some(q), None) => Some(q.clone()),
            (None, Some(csf)) => Some(csf.clone()),
            (None, None) => None,
        };
        if let Some(q) = q {
            members.q = Some(parse_q(&q, &actx.ctx)?);
        }
        if crate::query::GEO_PARAMS
            .iter()
            .any(|p| params.contains_key(*p))
        {
            let get = |k: &str| params.get(k).map(String::as_str);
            members.geo = Some(borough_core::query::geo::parse_geo_query(
                get("georel"),
                get("geometry"),
                get("coordinates"),
                Some(get("geoproperty").unwrap_or("location")),
                &actx.ctx,
            )?);
        }
        let time = match params.get("timerel") {
            None => None,
            Some(_) => {
                let window = borough_core::temporal::TimeRange::parse(
                    params.get("timerel").map(String::as_str),
                    params.get("timeAt").map(String::as_str),
                    params.get("endTimeAt").map(String::as_str),
                )?;
                // observedAt reads the observation interval; the system
                // times read the management interval (clause 5.12).
                let property = match params.get("timeproperty").map(String::as_str) {
                    None | Some("observedAt") => "observationInterval",
                    Some("createdAt" | "modifiedAt" | "deletedAt") => "managementInterval",
                    Some(other) => {
                        return Err(bad(format!(
                            "timeproperty '{other}' is not one of observedAt, createdAt, modifiedAt, deletedAt"
                        )));
                    }
                };
                Some((property.to_string(), window))
            }
        };
        Ok(Self {
            ids,
            types,
            id_pattern,
            attrs,
            members,
            time,
        })
    }

    fn matches(&self, reg: &CompiledRegistration) -> bool {
        if !reg.concerns(
            &self.ids,
            self.types.as_ref(),
            self.id_pattern.as_ref(),
            &self.attrs,
        ) {
            return false;
        }
        if (self.members.q.is_some() || self.members.geo.is_some())
            && !self.members.matches(&reg.as_entity())
        {
            return false;
        }
        if let Some((property, window)) = &self.time {
            let Some(interval) = reg.record.body.get(property) else {
                return false;
            };
            let at = |k: &str| {
                interval
                    .get(k)
                    .and_then(Value::as_str)
                    .and_then(borough_core::validate::parse_datetime)
            };
            let start = at("startAt").unwrap_or(i64::MIN);
            let end = at("endAt").unwrap_or(i64::MAX);
            if !window.overlaps(start, end) {
                return false;
            }
        }
        true
    }
}

/// `GET /csourceRegistrations`
pub async fn list(
    State(state): State<SharedState>,
    Query(params): Params,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let rt = negotiate(&headers, false)?;
    let tenant = existing_tenant(&state, &headers)?;
    let actx = state
        .contexts
        .for_link(link_context(&headers)?.as_deref())
        .await?;
    let page = paging(&params)?;
    let sys_attrs = options(&params, &["sysAttrs"])?
        .iter()
        .any(|o| o == "sysAttrs");
    // Clause 5.10.2.4: a query of registrations names what it looks for.
    if !["id", "type", "idPattern", "attrs", "q", "csf", "georel"]
        .iter()
        .any(|p| params.contains_key(*p))
    {
        return Err(bad(
            "the query is too broad: give at least one of type, attrs, q, csf, georel, id or idPattern",
        )
        .into());
    }
    let filter = RegistrationFilter::parse(&params, &actx)?;
    let matching: Vec<_> = state
        .sources
        .of_tenant(&tenant)
        .into_iter()
        .filter(|r| filter.matches(r))
        .collect();
    let body: Vec<Value> = matching
        .iter()
        .skip(page.offset)
        .take(page.limit)
        .map(|r| {
            render(
                r,
                &state.sources.status(&tenant, r.id()),
                rt == ResponseType::LdJson,
                sys_attrs,
            )
        })
        .collect();
    let resp = respond(rt, &Value::Array(body), &tenant, &actx.source.as_value());
    let result = borough_store::QueryPage {
        entities: Vec::new(),
        total: page.count.then_some(matching.len()),
    };
    let has_next = matching.len() > page.offset.saturating_add(page.limit);
    Ok(crate::query::paged(resp, &result, has_next, page, &uri))
}

fn find(state: &AppState, tenant: &str, id: &str) -> ApiResult<Arc<CompiledRegistration>> {
    check_uri("registration id", id)?;
    state
        .sources
        .get(tenant, id)
        .ok_or_else(|| NgsiError::not_found(format!("registration '{id}' does not exist")).into())
}

/// `GET /csourceRegistrations/{id}`
pub async fn retrieve(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    Query(params): Params,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let rt = negotiate(&headers, false)?;
    let tenant = existing_tenant(&state, &headers)?;
    let sys_attrs = options(&params, &["sysAttrs"])?
        .iter()
        .any(|o| o == "sysAttrs");
    let reg = find(&state, &tenant, &id)?;
    let body = render(
        &reg,
        &state.sources.status(&tenant, &id),
        rt == ResponseType::LdJson,
        sys_attrs,
    );
    Ok(respond(rt, &body, &tenant, &reg.record.context))
}

/// `PATCH /csourceRegistrations/{id}`: the given members replace theirs
/// (clause 5.9.3); `null` removes one.
pub async fn update(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = existing_tenant(&state, &headers)?;
    find(&state, &tenant, &id)?;
    let (v, actx) =
        body_with_context(&state, &headers, body, state.config.max_body_bytes, true).await?;
    let Value::Object(patch) = v else {
        return Err(bad("a registration update must be a JSON object").into());
    };
    if patch.is_empty() {
        return Err(bad("the update names no member").into());
    }
    // Remote contexts and the endpoint's name are resolved before the
    // registry is locked; under the lock, the registration must still be
    // the version this change was made from.
    let old = find(&state, &tenant, &id)?;
    let mut record = old.record.clone();
    let mut patch = patch;
    borough_core::registration::drop_system_members(&mut patch);
    patch_body(
        &mut record.body,
        patch,
        &id,
        "registration",
        Some("ContextSourceRegistration"),
    )?;
    if let Some((context, objects)) = context_update(&state, &headers, &actx).await? {
        record.context = context;
        record.context_objects = objects;
    }
    let now = now_micros().max(record.modified_at + 1);
    record.modified_at = now;
    let compiled = CompiledRegistration::compile(record.clone(), now, true)?;
    check_source_endpoint(&state, &compiled.endpoint).await?;
    let _one_at_a_time = state.sources.writes.lock().await;
    if find(&state, &tenant, &id)?.record.modified_at != old.record.modified_at {
        return Err(changed_meanwhile("registration", &id).into());
    }
    check_conflicts(&state, &tenant, &compiled)?;
    store(&state, RecordKind::Registration, &tenant, &id, &record).await?;
    let compiled = Arc::new(compiled);
    state
        .sources
        .registrations
        .write()
        .unwrap_or_else(poisoned)
        .insert((tenant.clone(), id.clone()), compiled.clone());
    notify_change(&state, &tenant, Some(&old), Some(&compiled));
    Ok(with_tenant(StatusCode::NO_CONTENT.into_response(), &tenant))
}

/// Applies an update's members to a stored body (clause 5.5.8): each
/// replaces its namesake, `null` removes it; the id, and a fixed `type`,
/// cannot change; `status` is the broker's.
fn patch_body(
    body: &mut Map<String, Value>,
    patch: Map<String, Value>,
    id: &str,
    what: &str,
    fixed_type: Option<&str>,
) -> ApiResult<()> {
    for (k, v) in patch {
        match (k.as_str(), fixed_type) {
            ("id", _) if v != json!(id) => {
                return Err(bad(format!("a {what}'s id cannot change")).into());
            }
            ("type", Some(t)) if v != json!(t) => {
                return Err(bad(format!("a {what}'s type cannot change")).into());
            }
            ("id" | "status", _) | ("type", Some(_)) => {}
            _ if v.is_null() => {
                body.remove(&k);
            }
            _ => {
                body.insert(k, v);
            }
        }
    }
    Ok(())
}

/// The context an update brings, resolved, when it brings one: it replaces
/// the stored one.
async fn context_update(
    state: &AppState,
    headers: &HeaderMap,
    actx: &ActiveContext,
) -> ApiResult<Option<(Value, Vec<Map<String, Value>>)>> {
    if link_context(headers)?.is_some() || actx.source != crate::contexts::ContextSource::Core {
        return Ok(Some(context_record(state, actx).await?));
    }
    Ok(None)
}

/// A 409 for an update that lost the race with another one.
fn changed_meanwhile(what: &str, id: &str) -> NgsiError {
    NgsiError::new(
        ProblemKind::Conflict,
        format!("{what} '{id}' changed while this update was prepared; read it and try again"),
    )
}

/// `DELETE /csourceRegistrations/{id}`
pub async fn delete(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let tenant = existing_tenant(&state, &headers)?;
    let _one_at_a_time = state.sources.writes.lock().await;
    let old = find(&state, &tenant, &id)?;
    state
        .sources
        .persist(RecordKind::Registration, &tenant, &id, None)
        .await?;
    let key = (tenant.clone(), id.clone());
    state
        .sources
        .registrations
        .write()
        .unwrap_or_else(poisoned)
        .remove(&key);
    state
        .sources
        .status
        .lock()
        .unwrap_or_else(poisoned)
        .remove(&key);
    notify_change(&state, &tenant, Some(&old), None);
    Ok(with_tenant(StatusCode::NO_CONTENT.into_response(), &tenant))
}

// ---------------------------------------------------------------------------
// Subscriptions to registrations (clause 5.11)

/// Whether a subscription to registrations selects `reg` (clause 5.11.6).
fn selects(sub: &CompiledSubscription, reg: &CompiledRegistration) -> bool {
    let query = &sub.query;
    let entities_ok = query.selectors.is_empty()
        || query.selectors.iter().any(|s| {
            reg.information.iter().any(|info| {
                info.entities.is_empty()
                    || info.entities.iter().any(|e| {
                        s.types.as_ref().is_none_or(|t| {
                            e.types
                                .iter()
                                .any(|et| t.eval(&mut |name: &String| name == et))
                        }) && match (&s.id, &e.id) {
                            (Some(a), Some(b)) => a == b,
                            (Some(a), None) => e.id_pattern.as_ref().is_none_or(|r| r.is_match(a)),
                            (None, Some(b)) => s.id_pattern.as_ref().is_none_or(|r| r.is_match(b)),
                            (None, None) => true,
                        }
                    })
            })
        });
    let watched_ok = sub.watched.is_empty()
        || reg
            .information
            .iter()
            .any(|info| sub.watched.iter().any(|w| info.covers_attribute(w)));
    let members_ok =
        (query.q.is_none() && query.geo.is_none()) || query.content_matches(&reg.as_entity());
    entities_ok && watched_ok && members_ok
}

/// Sends the notifications a registration change owes (clause 5.11.6):
/// `newlyMatching`, `updated` or `noLongerMatching`. Delivery runs in the
/// background; the change is already answered.
fn notify_change(
    state: &SharedState,
    tenant: &str,
    before: Option<&CompiledRegistration>,
    after: Option<&CompiledRegistration>,
) {
    let now = now_micros();
    for (id, sub) in state.sources.subscriptions_of(tenant) {
        let c = &sub.compiled;
        if !c.is_active || c.expires_at.is_some_and(|t| t <= now) {
            continue;
        }
        let was = before.is_some_and(|r| selects(c, r));
        let is = after.is_some_and(|r| selects(c, r));
        let (reason, reg) = match (was, is, before, after) {
            (false, true, _, Some(r)) => ("newlyMatching", r),
            (true, true, _, Some(r)) => ("updated", r),
            (true, false, Some(r), _) => ("noLongerMatching", r),
            _ => continue,
        };
        deliver(
            state,
            tenant,
            &id,
            &sub,
            reason,
            vec![reg_json(state, tenant, reg, c)],
        );
    }
}

fn reg_json(
    state: &AppState,
    tenant: &str,
    reg: &CompiledRegistration,
    sub: &CompiledSubscription,
) -> Value {
    let ld = sub.endpoint.accept == "application/ld+json";
    render(reg, &state.sources.status(tenant, reg.id()), ld, false)
}

/// Timeout of one notification delivery.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(5);

fn deliver(
    state: &SharedState,
    tenant: &str,
    sub_id: &str,
    sub: &Arc<RegistrationSubscription>,
    reason: &str,
    data: Vec<Value>,
) {
    let notification = json!({
        "id": format!("urn:ngsi-ld:Notification:{:x}{:04x}", now_micros(), NEXT.fetch_add(1, Ordering::Relaxed) & 0xffff),
        // The core context's term (table 5.3.2-1); the OpenAPI of 1.7.1
        // spells it CsourceNotification.
        "type": "ContextSourceNotification",
        "subscriptionId": sub_id,
        "notifiedAt": format_datetime(now_micros()),
        "data": data,
        "triggerReason": reason,
    });
    let (state, sub, tenant) = (state.clone(), sub.clone(), tenant.to_string());
    tokio::spawn(async move {
        // Waiting for a slot bounds the connections, not the changes.
        let Ok(_slot) = state.sources.deliveries.clone().acquire_owned().await else {
            return;
        };
        let endpoint = &sub.compiled.endpoint;
        let ld = endpoint.accept == "application/ld+json";
        let mut request = state
            .federation
            .client()
            .post(&endpoint.uri)
            .timeout(NOTIFY_TIMEOUT)
            .header(
                header::CONTENT_TYPE,
                if ld {
                    "application/ld+json"
                } else {
                    "application/json"
                },
            )
            .json(&notification);
        if !ld {
            request = request.header(header::LINK, core_link());
        }
        if !tenant.is_empty() {
            request = request.header(crate::request::TENANT_HEADER, tenant.as_str());
        }
        for (k, v) in &endpoint.receiver_info {
            request = request.header(k.as_str(), v.as_str());
        }
        let outcome = match state.config.outbound.check_url_literal(&endpoint.uri) {
            Err(e) => Err(e.to_string()),
            Ok(()) => match request.send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("the endpoint answered {}", r.status())),
                Err(e) => Err(e.to_string()),
            },
        };
        let now = now_micros();
        let mut stats = sub.stats.lock().unwrap_or_else(poisoned);
        stats.times_sent += 1;
        stats.last_notification = Some(now);
        match outcome {
            Ok(()) => stats.last_success = Some(now),
            Err(e) => {
                tracing::warn!(subscription = sub_id_of(&sub), error = %e, "a registration notification failed");
                stats.times_failed += 1;
                stats.last_failure = Some(now);
                stats.last_error = Some(e);
            }
        }
    });
}

fn sub_id_of(sub: &RegistrationSubscription) -> &str {
    &sub.compiled.record.id
}

fn core_link() -> String {
    format!(
        "<{}>; rel=\"{}\"; type=\"application/ld+json\"",
        borough_core::context::CORE_CONTEXT_URL,
        crate::request::JSONLD_CONTEXT_REL
    )
}

/// Validates a subscription to registrations: a subscription body whose
/// entities and attributes select registrations, not entities.
fn compile_subscription(record: SubscriptionRecord, now: i64) -> NgsiResult<CompiledSubscription> {
    for k in [
        "notificationTrigger",
        "timeInterval",
        "scopeQ",
        "jsonldContext",
        "datasetId",
    ] {
        if record.body.contains_key(k) {
            return Err(bad(format!(
                "{k} is not a member of subscriptions to registrations"
            )));
        }
    }
    CompiledSubscription::compile(record, now, true)
}

/// `POST /csourceSubscriptions`
pub async fn subscribe(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = tenant(&headers)?;
    let (v, actx) =
        body_with_context(&state, &headers, body, state.config.max_body_bytes, false).await?;
    let Value::Object(mut body) = v else {
        return Err(bad("a subscription must be a JSON object").into());
    };
    let now = now_micros();
    let id = new_id(&mut body, "subscription", "Subscription", now)?;
    body.remove("status");
    borough_core::subscription::normalize_body(&mut body);
    let (context, context_objects) = context_record(&state, &actx).await?;
    let record = SubscriptionRecord {
        id: id.clone(),
        body,
        context,
        context_objects,
        notification_context_objects: None,
        created_at: now,
        modified_at: now,
        stats: Default::default(),
    };
    let compiled = compile_subscription(record.clone(), now)?;
    check_source_endpoint(&state, &compiled.endpoint.uri).await?;
    let _one_at_a_time = state.sources.writes.lock().await;
    let key = (tenant.clone(), id.clone());
    if state
        .sources
        .subscriptions
        .read()
        .unwrap_or_else(poisoned)
        .contains_key(&key)
    {
        return Err(NgsiError::new(
            ProblemKind::AlreadyExists,
            format!("subscription '{id}' already exists"),
        )
        .into());
    }
    if state.sources.subscriptions_of(&tenant).len() >= MAX_PER_TENANT {
        return Err(NgsiError::new(
            ProblemKind::QuotaExceeded,
            format!("a tenant may hold at most {MAX_PER_TENANT} subscriptions to registrations"),
        )
        .into());
    }
    store(
        &state,
        RecordKind::RegistrationSubscription,
        &tenant,
        &id,
        &record,
    )
    .await?;
    let sub = Arc::new(RegistrationSubscription {
        compiled,
        stats: Mutex::default(),
    });
    state
        .sources
        .subscriptions
        .write()
        .unwrap_or_else(poisoned)
        .insert(key, sub.clone());
    // The registrations that match now are notified at once (clause 5.11.2).
    let matching: Vec<Value> = state
        .sources
        .of_tenant(&tenant)
        .iter()
        .filter(|r| selects(&sub.compiled, r))
        .map(|r| reg_json(&state, &tenant, r, &sub.compiled))
        .collect();
    if !matching.is_empty() && sub.compiled.is_active {
        deliver(&state, &tenant, &id, &sub, "newlyMatching", matching);
    }
    Ok(created("csourceSubscriptions", &id, &tenant))
}

fn find_subscription(
    state: &AppState,
    tenant: &str,
    id: &str,
) -> ApiResult<Arc<RegistrationSubscription>> {
    check_uri("subscription id", id)?;
    state
        .sources
        .subscriptions
        .read()
        .unwrap_or_else(poisoned)
        .get(&(tenant.to_string(), id.to_string()))
        .cloned()
        .ok_or_else(|| NgsiError::not_found(format!("subscription '{id}' does not exist")).into())
}

fn render_subscription(sub: &RegistrationSubscription, rt: ResponseType) -> Value {
    let stats = sub.stats.lock().unwrap_or_else(poisoned).clone();
    sub.compiled
        .to_json(now_micros(), rt == ResponseType::LdJson, &stats)
}

/// `GET /csourceSubscriptions`
pub async fn subscriptions(
    State(state): State<SharedState>,
    Query(params): Params,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let rt = negotiate(&headers, false)?;
    let tenant = tenant(&headers)?;
    let page = paging(&params)?;
    let subs = state.sources.subscriptions_of(&tenant);
    let body: Vec<Value> = subs
        .iter()
        .skip(page.offset)
        .take(page.limit)
        .map(|(_, s)| render_subscription(s, rt))
        .collect();
    let resp = respond(rt, &Value::Array(body), &tenant, &Value::Null);
    let result = borough_store::QueryPage {
        entities: Vec::new(),
        total: page.count.then_some(subs.len()),
    };
    let has_next = subs.len() > page.offset.saturating_add(page.limit);
    Ok(crate::query::paged(resp, &result, has_next, page, &uri))
}

/// `GET /csourceSubscriptions/{id}`
pub async fn subscription(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let rt = negotiate(&headers, false)?;
    let tenant = tenant(&headers)?;
    let sub = find_subscription(&state, &tenant, &id)?;
    Ok(respond(
        rt,
        &render_subscription(&sub, rt),
        &tenant,
        &sub.compiled.record.context,
    ))
}

/// `PATCH /csourceSubscriptions/{id}`
pub async fn update_subscription(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = tenant(&headers)?;
    find_subscription(&state, &tenant, &id)?;
    let (v, actx) =
        body_with_context(&state, &headers, body, state.config.max_body_bytes, true).await?;
    let Value::Object(mut patch) = v else {
        return Err(bad("a subscription update must be a JSON object").into());
    };
    borough_core::subscription::normalize_body(&mut patch);
    let old = find_subscription(&state, &tenant, &id)?;
    let mut record = old.compiled.record.clone();
    patch_body(&mut record.body, patch, &id, "subscription", None)?;
    if let Some((context, objects)) = context_update(&state, &headers, &actx).await? {
        record.context = context;
        record.context_objects = objects;
    }
    let now = now_micros().max(record.modified_at + 1);
    record.modified_at = now;
    let compiled = compile_subscription(record.clone(), now)?;
    check_source_endpoint(&state, &compiled.endpoint.uri).await?;
    let _one_at_a_time = state.sources.writes.lock().await;
    if find_subscription(&state, &tenant, &id)?
        .compiled
        .record
        .modified_at
        != old.compiled.record.modified_at
    {
        return Err(changed_meanwhile("subscription", &id).into());
    }
    store(
        &state,
        RecordKind::RegistrationSubscription,
        &tenant,
        &id,
        &record,
    )
    .await?;
    let stats = old.stats.lock().unwrap_or_else(poisoned).clone();
    state
        .sources
        .subscriptions
        .write()
        .unwrap_or_else(poisoned)
        .insert(
            (tenant.clone(), id),
            Arc::new(RegistrationSubscription {
                compiled,
                stats: Mutex::new(stats),
            }),
        );
    Ok(with_tenant(StatusCode::NO_CONTENT.into_response(), &tenant))
}

/// `DELETE /csourceSubscriptions/{id}`
pub async fn delete_subscription(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let tenant = tenant(&headers)?;
    let _one_at_a_time = state.sources.writes.lock().await;
    find_subscription(&state, &tenant, &id)?;
    state
        .sources
        .persist(RecordKind::RegistrationSubscription, &tenant, &id, None)
        .await?;
    state
        .sources
        .subscriptions
        .write()
        .unwrap_or_else(poisoned)
        .remove(&(tenant.clone(), id));
    Ok(with_tenant(StatusCode::NO_CONTENT.into_response(), &tenant))
}

/// Registrations of a tenant that an operation on one entity concerns, in
/// the order the spec merges them: exclusive and redirect first, then
/// inclusive, then auxiliary.
pub fn for_entity(
    state: &AppState,
    tenant: &str,
    operation: &str,
    id: &str,
    types: Option<&[String]>,
    wanted: Option<&[String]>,
) -> Vec<(
    Arc<CompiledRegistration>,
    borough_core::registration::Supplied,
)> {
    if !state.sources.has_any(tenant) {
        return Vec::new();
    }
    let mut out: Vec<_> = state
        .sources
        .of_tenant(tenant)
        .into_iter()
        .filter(|r| r.allows(operation))
        .filter(|r| r.is_temporal_only() == operation.ends_with("Temporal"))
        .filter_map(|r| r.supplies(id, types, wanted).map(|s| (r, s)))
        .collect();
    out.sort_by_key(|(r, _)| mode_rank(r.mode));
    out
}

pub fn mode_rank(mode: Mode) -> u8 {
    match mode {
        Mode::Exclusive | Mode::Redirect => 0,
        Mode::Inclusive => 1,
        Mode::Auxiliary => 2,
    }
}
