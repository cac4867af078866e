//! The registry of tenants and API keys, the sessions of the dashboard, and
//! the admission of requests (who is calling, within which limits). State is
//! kept in memory and written through to the store's records before a change
//! is answered.

use crate::audit::{AuditEvent, AuditLog};
use crate::limits::{Buckets, FailedAuth};
use crate::model::{
    ApiKey, Credential, Principal, Quotas, Role, Tenant, TenantScope, TenantStatus,
    internal_tenant, public_tenant,
};
use crate::oidc::OidcVerifier;
use crate::secret;
use borough_core::validate::now_micros;
use borough_core::{NgsiError, ProblemKind};
use borough_store::{RecordChange, RecordKind, RecordStore};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// How access control is set up.
#[derive(Clone)]
pub struct AccessConfig {
    /// Off: every request is the operator (`borough demo`, `--auth off`).
    pub enabled: bool,
    /// Let a write to an unregistered tenant register it (as before tenants
    /// were managed); off by default.
    pub auto_create_tenants: bool,
    /// Requests per second per API key or token subject (bursts of twice as many).
    pub key_rate: f64,
    /// Failed sign-ins from one address before it is refused for a while.
    pub failed_auth_max: u32,
    pub failed_auth_window: Duration,
    pub failed_auth_block: Duration,
    /// How long a dashboard session lasts.
    pub session_ttl: Duration,
    pub oidc: Option<Arc<OidcVerifier>>,
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            auto_create_tenants: false,
            key_rate: 1000.0,
            failed_auth_max: 10,
            failed_auth_window: Duration::from_secs(60),
            failed_auth_block: Duration::from_secs(60),
            session_ttl: Duration::from_secs(12 * 3600),
            oidc: None,
        }
    }
}

/// Most signed-out sessions remembered until their expiry.
const MAX_SESSIONS: usize = 100_000;
/// The setting that holds the key that signs dashboard sessions.
const SESSION_SECRET: &str = "session-secret";
/// The id of the operator key given by file or environment.
const OPERATOR_KEY_ID: &str = "operator";

pub type AccessResult<T> = Result<T, NgsiError>;

fn problem(kind: ProblemKind, detail: impl Into<String>) -> NgsiError {
    NgsiError::new(kind, detail)
}

fn storage(e: impl std::fmt::Display) -> NgsiError {
    NgsiError::internal(format!("access records cannot be written: {e}"))
}

/// A tenant name as clients write it: letters, digits, `_` and `-`.
pub fn check_tenant_name(name: &str) -> AccessResult<()> {
    if crate::model::is_tenant_name(name) {
        Ok(())
    } else {
        Err(NgsiError::bad_data(format!(
            "tenant name '{}' is not valid: use 1 to 64 letters, digits, '_' or '-'",
            name.chars().take(80).collect::<String>()
        )))
    }
}

pub struct Access {
    config: AccessConfig,
    records: Arc<dyn RecordStore>,
    /// By internal name ("" is the default tenant).
    /// Shared, so that the lookups every request makes cost no copy.
    tenants: RwLock<HashMap<String, Arc<Tenant>>>,
    /// By key id.
    keys: RwLock<HashMap<String, ApiKey>>,
    /// Signs dashboard sessions; kept in the records, so sessions outlive a restart.
    session_secret: Vec<u8>,
    /// Sessions signed out before their expiry (hash → expiry, seconds).
    closed_sessions: Mutex<HashMap<String, i64>>,
    pub audit: AuditLog,
    callers: Buckets,
    tenant_requests: Buckets,
    tenant_messages: Buckets,
    failures: FailedAuth,
    /// Last use of each key, written to the records now and then.
    last_used: Mutex<HashMap<String, i64>>,
    /// Refusals by (tenant, reason), for `/metrics`.
    refusals: Mutex<HashMap<(String, &'static str), u64>>,
}

impl Access {
    /// Loads tenants, keys and the audit log's head. Blocking.
    pub fn open(records: Arc<dyn RecordStore>, config: AccessConfig) -> Result<Self, String> {
        let read = |kind| records.records(kind).map_err(|e| e.to_string());
        let mut tenants = HashMap::new();
        for (_, key, bytes) in read(RecordKind::Tenant)? {
            let t: Tenant = serde_json::from_slice(&bytes)
                .map_err(|e| format!("tenant record '{key}' is unreadable: {e}"))?;
            tenants.insert(key, Arc::new(t));
        }
        let session_secret = match records
            .records_page(RecordKind::Setting, "", None, 100, false)
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|(_, k, _)| k == SESSION_SECRET)
        {
            Some((_, _, v)) if v.len() >= 32 => v,
            _ => {
                let fresh = secret::random_hex(32)?.into_bytes();
                records
                    .write_records(&[RecordChange {
                        kind: RecordKind::Setting,
                        tenant: String::new(),
                        key: SESSION_SECRET.into(),
                        value: Some(fresh.clone()),
                    }])
                    .map_err(|e| e.to_string())?;
                fresh
            }
        };
        let mut keys = HashMap::new();
        for (_, id, bytes) in read(RecordKind::ApiKey)? {
            let k: ApiKey = serde_json::from_slice(&bytes)
                .map_err(|e| format!("API key record '{id}' is unreadable: {e}"))?;
            keys.insert(id, k);
        }
        Ok(Self {
            failures: FailedAuth::new(
                config.failed_auth_max.max(1),
                config.failed_auth_window,
                config.failed_auth_block,
            ),
            config,
            audit: AuditLog::open(records.clone())?,
            records,
            tenants: RwLock::new(tenants),
            keys: RwLock::new(keys),
            session_secret,
            closed_sessions: Mutex::new(HashMap::new()),
            callers: Buckets::new(),
            tenant_requests: Buckets::new(),
            tenant_messages: Buckets::new(),
            last_used: Mutex::new(HashMap::new()),
            refusals: Mutex::new(HashMap::new()),
        })
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// Takes in tenants and keys that other nodes sharing the store changed.
    pub fn apply_records(&self, changes: &[RecordChange]) {
        for c in changes {
            match c.kind {
                RecordKind::Tenant => {
                    let mut tenants = self.tenants.write().unwrap_or_else(|e| e.into_inner());
                    match c.value.as_deref().map(serde_json::from_slice::<Tenant>) {
                        Some(Ok(t)) => {
                            tenants.insert(c.key.clone(), Arc::new(t));
                        }
                        Some(Err(e)) => {
                            tracing::error!(tenant = %c.key, error = %e, "a followed tenant record is unreadable")
                        }
                        None => {
                            tenants.remove(&c.key);
                        }
                    }
                }
                RecordKind::ApiKey => {
                    let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
                    match c.value.as_deref().map(serde_json::from_slice::<ApiKey>) {
                        Some(Ok(k)) => {
                            keys.insert(c.key.clone(), k);
                        }
                        Some(Err(e)) => {
                            tracing::error!(key = %c.key, error = %e, "a followed API key record is unreadable")
                        }
                        None => {
                            keys.remove(&c.key);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Follows, in the background, the tenants and keys that other nodes
    /// sharing the store change, so that a key made on one node works on all.
    pub fn follow(
        self: &Arc<Self>,
        changes: tokio::sync::broadcast::Receiver<borough_store::RecordBatch>,
    ) {
        let access = Arc::downgrade(self);
        borough_store::follow_records(changes, move |batch| {
            let access = access.clone();
            async move {
                let Some(a) = access.upgrade() else {
                    return false;
                };
                match batch {
                    Some(batch) => a.apply_records(&batch),
                    None => a.reload_records().await,
                }
                true
            }
        });
    }

    /// Reads tenants and keys again, after changes of other nodes were
    /// missed; what is held is replaced at once, never emptied first.
    async fn reload_records(&self) {
        let records = self.records.clone();
        let read = tokio::task::spawn_blocking(move || {
            let tenants = records.records(RecordKind::Tenant)?;
            let keys = records.records(RecordKind::ApiKey)?;
            Ok::<_, borough_store::StoreError>((tenants, keys))
        })
        .await;
        let Ok(Ok((tenant_rows, key_rows))) = read else {
            tracing::warn!(
                "cannot read tenants and keys again after missing changes of other nodes"
            );
            return;
        };
        let tenants: HashMap<String, Arc<Tenant>> = tenant_rows
            .into_iter()
            .filter_map(|(_, name, bytes)| {
                Some((name, Arc::new(serde_json::from_slice(&bytes).ok()?)))
            })
            .collect();
        let keys: HashMap<String, ApiKey> = key_rows
            .into_iter()
            .filter_map(|(_, id, bytes)| Some((id, serde_json::from_slice(&bytes).ok()?)))
            .collect();
        *self.tenants.write().unwrap_or_else(|e| e.into_inner()) = tenants;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
    }

    pub fn auto_create_tenants(&self) -> bool {
        !self.config.enabled || self.config.auto_create_tenants
    }

    async fn write(&self, changes: Vec<RecordChange>) -> AccessResult<()> {
        let records = self.records.clone();
        tokio::task::spawn_blocking(move || records.write_records(&changes))
            .await
            .map_err(storage)?
            .map_err(storage)
    }

    fn tenant_change(internal: &str, t: Option<&Tenant>) -> AccessResult<RecordChange> {
        Ok(RecordChange {
            kind: RecordKind::Tenant,
            tenant: String::new(),
            key: internal.to_string(),
            value: t.map(serde_json::to_vec).transpose().map_err(storage)?,
        })
    }

    fn key_change(k: &ApiKey, delete: bool) -> AccessResult<RecordChange> {
        Ok(RecordChange {
            kind: RecordKind::ApiKey,
            tenant: k.tenant.clone().unwrap_or_default(),
            key: k.id.clone(),
            value: if delete {
                None
            } else {
                Some(serde_json::to_vec(k).map_err(storage)?)
            },
        })
    }

    /// Appends to the audit log; a failure to do so is logged, never hidden.
    pub async fn record(&self, event: AuditEvent) {
        if let Err(e) = self.audit.append(event, now_micros()).await {
            tracing::error!(error = %e, "cannot append to the audit log");
        }
    }

    // ---------------------------------------------------------------- start-up

    /// Registers tenants that hold data but no record (a store from before
    /// tenants were managed, or `--auto-create-tenants`), and the default one.
    pub async fn adopt_tenants(&self, existing: &[String]) -> AccessResult<()> {
        let now = now_micros();
        let mut added = Vec::new();
        {
            let mut tenants = self.tenants.write().unwrap_or_else(|e| e.into_inner());
            for name in std::iter::once(&String::new()).chain(existing) {
                if !tenants.contains_key(name) {
                    let t = new_tenant(public_tenant(name), now);
                    tenants.insert(name.clone(), Arc::new(t.clone()));
                    added.push((name.clone(), t));
                }
            }
        }
        let changes = added
            .iter()
            .map(|(n, t)| Self::tenant_change(n, Some(t)))
            .collect::<AccessResult<Vec<_>>>()?;
        if !changes.is_empty() {
            self.write(changes).await?;
        }
        Ok(())
    }

    /// Makes sure an operator key exists. With `given`, that key (created if
    /// new); without, a new one when there is none at all, answered so that
    /// it can be shown once.
    pub async fn bootstrap_operator(&self, given: Option<&str>) -> AccessResult<Option<String>> {
        let now = now_micros();
        if let Some(secret) = given {
            let secret = secret.trim();
            if secret.len() < 32 {
                return Err(NgsiError::bad_data(
                    "the operator key must be at least 32 characters",
                ));
            }
            let id = secret::api_key_id(secret)
                .unwrap_or(OPERATOR_KEY_ID)
                .to_string();
            let exists = self
                .keys
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .is_some_and(|k| secret::verify(secret, &k.secret_hash) && k.usable(now));
            if !exists {
                let key = operator_key(id, secret::hash(secret), now);
                self.write(vec![Self::key_change(&key, false)?]).await?;
                self.keys
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key.id.clone(), key);
            }
            return Ok(None);
        }
        let any = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|k| k.roles.contains(&Role::OperatorAdmin) && k.usable(now));
        if any {
            return Ok(None);
        }
        let (id, full) = secret::new_api_key().map_err(NgsiError::internal)?;
        let key = operator_key(id, secret::hash(&full), now);
        self.write(vec![Self::key_change(&key, false)?]).await?;
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.id.clone(), key.clone());
        self.record(AuditEvent {
            actor: "borough".into(),
            action: "key.create".into(),
            target: Some(key.id),
            outcome: "ok".into(),
            detail: serde_json::json!({"roles": ["operator-admin"], "reason": "first start"}),
            ..AuditEvent::default()
        })
        .await;
        Ok(Some(full))
    }

    // ---------------------------------------------------------- authentication

    /// Whether `addr` is refused for failing to sign in too often.
    pub fn throttled(&self, addr: &str) -> Option<Duration> {
        self.failures.blocked(addr, Instant::now())
    }

    /// Who the bearer credential proves the caller to be.
    pub async fn authenticate(&self, credential: &str, addr: &str) -> AccessResult<Principal> {
        match self.verify_credential(credential).await {
            Ok(p) => {
                self.failures.succeeded(addr);
                Ok(p)
            }
            Err(e) => {
                if self.failures.failed(addr, Instant::now()) {
                    tracing::warn!(%addr, "refusing an address after repeated failed sign-ins");
                    self.record(AuditEvent {
                        actor: "anonymous".into(),
                        action: "auth.throttled".into(),
                        outcome: "denied".into(),
                        detail: serde_json::json!({"reason": e.detail}),
                        source: Some(addr.to_string()),
                        ..AuditEvent::default()
                    })
                    .await;
                }
                Err(e)
            }
        }
    }

    async fn verify_credential(&self, credential: &str) -> AccessResult<Principal> {
        let unauthorized = |d: &str| problem(ProblemKind::Unauthorized, d);
        let now = now_micros();
        if credential.len() > 16 * 1024 {
            return Err(unauthorized("the credential is too long"));
        }
        if let Some(id) = secret::api_key_id(credential) {
            return self.key_principal(id, credential, now);
        }
        if credential.split('.').count() == 3 {
            let Some(oidc) = &self.config.oidc else {
                return Err(unauthorized(
                    "bearer tokens are not accepted: no OpenID provider is configured",
                ));
            };
            let token = oidc
                .verify(credential)
                .await
                .map_err(|e| unauthorized(&format!("the token is not valid: {e}")))?;
            let roles: Vec<Role> = token.roles.iter().filter_map(|r| Role::parse(r)).collect();
            if roles.is_empty() {
                return Err(problem(
                    ProblemKind::Forbidden,
                    "the token carries no Borough role",
                ));
            }
            let tenants = token
                .tenants
                .iter()
                .map(|t| internal_tenant(t).to_string())
                .collect();
            return Ok(Principal {
                subject: token.subject,
                credential: Credential::Token {
                    issuer: token.issuer,
                },
                tenants: if roles.contains(&Role::OperatorAdmin) {
                    TenantScope::All
                } else {
                    TenantScope::Only(tenants)
                },
                roles,
                entity_types: None,
            });
        }
        // An operator key given by file or environment in a free form.
        if self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(OPERATOR_KEY_ID)
        {
            return self.key_principal(OPERATOR_KEY_ID, credential, now);
        }
        Err(unauthorized(
            "the credential is neither an API key nor a token",
        ))
    }

    fn key_principal(&self, id: &str, credential: &str, now: i64) -> AccessResult<Principal> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        // The same answer for an unknown id and a wrong secret: nothing to
        // tell an attacker which ids exist.
        let refused = || problem(ProblemKind::Unauthorized, "the API key is not valid");
        let Some(k) = keys.get(id) else {
            // Spend the time a comparison takes all the same.
            let _ = secret::verify(credential, &"0".repeat(64));
            return Err(refused());
        };
        if !secret::verify(credential, &k.secret_hash) {
            return Err(refused());
        }
        if k.revoked_at.is_some() {
            return Err(problem(
                ProblemKind::Unauthorized,
                "the API key was revoked",
            ));
        }
        if k.expires_at.is_some_and(|e| now >= e) {
            return Err(problem(
                ProblemKind::Unauthorized,
                "the API key has expired",
            ));
        }
        self.last_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(k.id.clone(), now);
        Ok(key_to_principal(k))
    }

    /// Writes the keys' last use; run now and then, and at shutdown.
    pub async fn flush_last_used(&self) -> AccessResult<()> {
        let used: Vec<(String, i64)> = self
            .last_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        // Each key is written only over the copy held here: a key another
        // node revoked or changed meanwhile is never written back as it was.
        let mut changes = Vec::new();
        {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            for (id, at) in used {
                if let Some(k) = keys.get(&id) {
                    let held = Self::key_change(k, false)?;
                    let mut newer = k.clone();
                    newer.last_used_at = Some(at);
                    changes.push((
                        held.value.unwrap_or_default(),
                        Self::key_change(&newer, false)?,
                        id,
                    ));
                }
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        let records = self.records.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut written = Vec::new();
            for (held, change, id) in changes {
                if records.replace_record_if(&change, &held)? {
                    written.push((id, change));
                }
            }
            Ok::<_, borough_store::StoreError>(written)
        })
        .await
        .map_err(storage)?
        .map_err(storage)?;
        // Only the time of use: anything else may have been followed since.
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        for (id, change) in written {
            if let Some(k) = keys.get_mut(&id)
                && let Some(Ok(stored)) = change
                    .value
                    .as_deref()
                    .map(serde_json::from_slice::<ApiKey>)
            {
                k.last_used_at = stored.last_used_at;
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- sessions

    /// A dashboard session for an API key's principal: the cookie value to
    /// set. The session is signed rather than stored, so it outlives a
    /// restart; it ends at its expiry, when the key stops working, or when
    /// it is closed.
    pub fn open_session(&self, principal: &Principal) -> AccessResult<String> {
        let Credential::ApiKey { id } = &principal.credential else {
            return Err(NgsiError::bad_data(
                "the dashboard signs in with an API key",
            ));
        };
        let expires = now_micros() / 1_000_000 + self.config.session_ttl.as_secs() as i64;
        let body = format!("{id}.{expires}");
        Ok(format!("{body}.{}", self.sign(&body)))
    }

    fn sign(&self, body: &str) -> String {
        let mut input = Vec::with_capacity(self.session_secret.len() + body.len() + 1);
        input.extend_from_slice(&self.session_secret);
        input.push(b'.');
        input.extend_from_slice(body.as_bytes());
        secret::sha256_hex(&input)
    }

    /// The principal of a session cookie, if it is a live session whose key still holds.
    pub fn session(&self, token: &str) -> Option<Principal> {
        if token.len() > 256 {
            return None;
        }
        let (body, signature) = token.rsplit_once('.')?;
        if !secret::constant_time_eq(self.sign(body).as_bytes(), signature.as_bytes()) {
            return None;
        }
        let (id, expires) = body.split_once('.')?;
        let expires: i64 = expires.parse().ok()?;
        let now = now_micros();
        if expires <= now / 1_000_000 {
            return None;
        }
        if self
            .closed_sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&secret::hash(token))
        {
            return None;
        }
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let k = keys.get(id).filter(|k| k.usable(now))?;
        let mut p = key_to_principal(k);
        p.credential = Credential::Session {
            key_id: id.to_string(),
        };
        Some(p)
    }

    /// Ends a session before its expiry (sign-out).
    pub fn close_session(&self, token: &str) {
        let mut closed = self
            .closed_sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let now = now_micros() / 1_000_000;
        closed.retain(|_, expires| *expires > now);
        if closed.len() < MAX_SESSIONS {
            let expires = token
                .split('.')
                .nth(1)
                .and_then(|e| e.parse().ok())
                .unwrap_or(now);
            closed.insert(secret::hash(token), expires);
        }
    }

    // --------------------------------------------------------------- admission

    /// The tenant's record, by internal name.
    pub fn tenant(&self, internal: &str) -> Option<Arc<Tenant>> {
        self.tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(internal)
            .cloned()
    }

    /// Every tenant, by public name order.
    pub fn tenants(&self) -> Vec<Tenant> {
        let mut list: Vec<Tenant> = self
            .tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|t| Tenant::clone(t))
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Counts a refusal for `/metrics`.
    pub fn refused(&self, tenant: &str, reason: &'static str) {
        *self
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((public_tenant(tenant).to_string(), reason))
            .or_default() += 1;
    }

    /// Takes one request from the caller's and the tenant's rate limits.
    pub fn admit_request(&self, principal: &Principal, tenant: Option<&str>) -> AccessResult<()> {
        let now = Instant::now();
        let rate = self.config.key_rate;
        if rate > 0.0
            && let Err(wait) = self.callers.take(&principal.subject, rate, rate * 2.0, now)
        {
            if let Some(t) = tenant {
                self.refused(t, "key-rate");
            }
            return Err(too_many(
                &format!("this key or token may make {rate} requests per second; slow down"),
                wait,
            ));
        }
        if let Some(t) = tenant
            && let Some(rate) = self.tenant(t).and_then(|t| t.quotas.requests_per_second)
            && let Err(wait) = self.tenant_requests.take(t, rate, rate * 2.0, now)
        {
            self.refused(t, "tenant-rate");
            return Err(too_many(
                &format!(
                    "tenant '{}' may make {rate} requests per second (its plan's quota)",
                    public_tenant(t)
                ),
                wait,
            ));
        }
        Ok(())
    }

    /// Takes `n` device messages from the tenant's message rate.
    pub fn admit_messages(&self, tenant: &str, n: usize) -> AccessResult<()> {
        let Some(rate) = self
            .tenant(tenant)
            .and_then(|t| t.quotas.messages_per_second)
        else {
            return Ok(());
        };
        let now = Instant::now();
        for _ in 0..n.max(1) {
            if let Err(wait) = self.tenant_messages.take(tenant, rate, rate * 2.0, now) {
                self.refused(tenant, "message-rate");
                return Err(too_many(
                    &format!(
                        "tenant '{}' may send {rate} device messages per second",
                        public_tenant(tenant)
                    ),
                    wait,
                ));
            }
        }
        Ok(())
    }

    /// Refuses when `current + adding` would pass the quota `which` picks.
    pub fn check_quota(
        &self,
        tenant: &str,
        what: &'static str,
        which: impl Fn(&Quotas) -> Option<u64>,
        current: u64,
        adding: u64,
    ) -> AccessResult<()> {
        if !self.config.enabled {
            return Ok(());
        }
        let Some(max) = self.tenant(tenant).and_then(|t| which(&t.quotas)) else {
            return Ok(());
        };
        if current.saturating_add(adding) > max {
            self.refused(tenant, what);
            return Err(problem(
                ProblemKind::QuotaExceeded,
                format!(
                    "tenant '{}' may keep at most {max} {what} and has {current}",
                    public_tenant(tenant)
                ),
            ));
        }
        Ok(())
    }

    /// Prometheus text: tenants and their state, refusals by tenant and reason.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        out.push_str("# HELP borough_tenant_active Registered tenants: 1 active, 0 suspended.\n");
        out.push_str("# TYPE borough_tenant_active gauge\n");
        for t in self.tenants() {
            let _ = writeln!(
                out,
                "borough_tenant_active{{tenant=\"{}\"}} {}",
                t.name,
                u8::from(t.status == TenantStatus::Active)
            );
        }
        out.push_str(
            "# HELP borough_access_refused_total Requests refused by rate limits and quotas.\n",
        );
        out.push_str("# TYPE borough_access_refused_total counter\n");
        let refusals = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<_> = refusals.iter().collect();
        rows.sort();
        for ((tenant, reason), n) in rows {
            let _ = writeln!(
                out,
                "borough_access_refused_total{{tenant=\"{tenant}\",reason=\"{reason}\"}} {n}"
            );
        }
        out
    }

    // ----------------------------------------------------------------- tenants

    /// Registers a tenant from its JSON description.
    pub async fn create_tenant(&self, body: &Value) -> AccessResult<Tenant> {
        let name = body
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| NgsiError::bad_data("a tenant needs a \"name\""))?;
        check_tenant_name(name)?;
        let internal = internal_tenant(name).to_string();
        let now = now_micros();
        let mut t = new_tenant(name, now);
        apply_tenant_patch(&mut t, body, true)?;
        {
            let tenants = self.tenants.read().unwrap_or_else(|e| e.into_inner());
            if tenants.contains_key(&internal) {
                return Err(problem(
                    ProblemKind::AlreadyExists,
                    format!("tenant '{name}' already exists"),
                ));
            }
        }
        self.write(vec![Self::tenant_change(&internal, Some(&t))?])
            .await?;
        self.tenants
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(internal, Arc::new(t.clone()));
        Ok(t)
    }

    /// Registers a tenant by name alone (auto-creation on first write).
    pub async fn ensure_tenant(&self, internal: &str) -> AccessResult<()> {
        if self.tenant(internal).is_some() {
            return Ok(());
        }
        let t = new_tenant(public_tenant(internal), now_micros());
        self.write(vec![Self::tenant_change(internal, Some(&t))?])
            .await?;
        self.tenants
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(internal.to_string())
            .or_insert_with(|| Arc::new(t));
        Ok(())
    }

    /// Changes a tenant's description, quotas or status.
    pub async fn update_tenant(&self, name: &str, patch: &Value) -> AccessResult<Tenant> {
        let internal = internal_tenant(name);
        let mut t = self
            .tenant(internal)
            .map(|t| Tenant::clone(&t))
            .ok_or_else(|| NgsiError::not_found(format!("tenant '{name}' does not exist")))?;
        apply_tenant_patch(&mut t, patch, false)?;
        t.modified_at = now_micros();
        self.write(vec![Self::tenant_change(internal, Some(&t))?])
            .await?;
        self.tenants
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(internal.to_string(), Arc::new(t.clone()));
        Ok(t)
    }

    /// Forgets a tenant and every key of it (its data is the caller's to purge).
    pub async fn delete_tenant(&self, name: &str) -> AccessResult<Tenant> {
        let internal = internal_tenant(name);
        let t = self
            .tenant(internal)
            .map(|t| Tenant::clone(&t))
            .ok_or_else(|| NgsiError::not_found(format!("tenant '{name}' does not exist")))?;
        let keys: Vec<ApiKey> = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|k| k.tenant.as_deref() == Some(internal))
            .cloned()
            .collect();
        let mut changes = vec![Self::tenant_change(internal, None)?];
        for k in &keys {
            changes.push(Self::key_change(k, true)?);
        }
        self.write(changes).await?;
        {
            let mut all = self.keys.write().unwrap_or_else(|e| e.into_inner());
            for k in &keys {
                all.remove(&k.id);
            }
        }
        self.tenants
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(internal);
        Ok(t)
    }

    // -------------------------------------------------------------------- keys

    /// Creates a key: its record and the secret to show once. `tenant` is the
    /// internal name, `None` for an operator key.
    pub async fn create_key(
        &self,
        tenant: Option<&str>,
        body: &Value,
    ) -> AccessResult<(ApiKey, String)> {
        let roles = parse_roles(body.get("roles"))?;
        if tenant.is_none() != roles.contains(&Role::OperatorAdmin) {
            return Err(NgsiError::bad_data(
                "operator-admin keys belong to no tenant, and every other key to one",
            ));
        }
        if let Some(t) = tenant
            && self.tenant(t).is_none()
        {
            return Err(problem(
                ProblemKind::NonexistentTenant,
                format!("tenant '{}' does not exist", public_tenant(t)),
            ));
        }
        let entity_types = match body.get("entityTypes") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) if !a.is_empty() && a.len() <= 100 => Some(
                a.iter()
                    .map(|v| {
                        let s = v.as_str().ok_or_else(|| {
                            NgsiError::bad_data("entityTypes must hold type names")
                        })?;
                        borough_core::validate::check_name("entity type", s)?;
                        Ok(borough_core::Context::core().expand(s).into_owned())
                    })
                    .collect::<AccessResult<Vec<_>>>()?,
            ),
            Some(_) => {
                return Err(NgsiError::bad_data(
                    "entityTypes must be a non-empty array of at most 100 type names",
                ));
            }
        };
        let expires_at = match body.get("expiresAt") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => {
                Some(borough_core::validate::parse_datetime(s).ok_or_else(|| {
                    NgsiError::bad_data(format!("expiresAt '{s}' is not a date-time"))
                })?)
            }
            Some(_) => return Err(NgsiError::bad_data("expiresAt must be a date-time")),
        };
        let now = now_micros();
        if expires_at.is_some_and(|e| e <= now) {
            return Err(NgsiError::bad_data("expiresAt is in the past"));
        }
        let name = match body.get("name") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.len() <= 200 => Some(s.clone()),
            Some(_) => {
                return Err(NgsiError::bad_data(
                    "name must be a string of at most 200 characters",
                ));
            }
        };
        if let Some(k) = body.as_object().and_then(|o| {
            o.keys()
                .find(|k| !["roles", "entityTypes", "expiresAt", "name"].contains(&k.as_str()))
        }) {
            return Err(NgsiError::bad_data(format!("unknown key member '{k}'")));
        }
        let (id, full) = secret::new_api_key().map_err(NgsiError::internal)?;
        let key = ApiKey {
            id,
            tenant: tenant.map(str::to_string),
            name,
            roles,
            entity_types,
            secret_hash: secret::hash(&full),
            created_at: now,
            expires_at,
            last_used_at: None,
            rotated_at: None,
            revoked_at: None,
        };
        self.write(vec![Self::key_change(&key, false)?]).await?;
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.id.clone(), key.clone());
        Ok((key, full))
    }

    pub fn key(&self, id: &str) -> Option<ApiKey> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Keys of one tenant (internal name), or every key with `None`; newest first.
    pub fn keys(&self, tenant: Option<&str>) -> Vec<ApiKey> {
        let mut list: Vec<ApiKey> = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|k| tenant.is_none_or(|t| k.tenant.as_deref() == Some(t)))
            .cloned()
            .collect();
        list.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        list
    }

    /// Revokes a key: it stops working at once.
    pub async fn revoke_key(&self, id: &str) -> AccessResult<ApiKey> {
        self.change_key(id, |k, now| {
            k.revoked_at.get_or_insert(now);
            Ok(())
        })
        .await
        .map(|(k, _)| k)
    }

    /// Gives a key a new secret (the old one stops working): answers it once.
    pub async fn rotate_key(&self, id: &str) -> AccessResult<(ApiKey, String)> {
        let mut fresh = String::new();
        let (k, _) = self
            .change_key(id, |k, now| {
                if k.revoked_at.is_some() {
                    return Err(NgsiError::bad_data("a revoked key cannot be rotated"));
                }
                let (_, full) = secret::new_api_key().map_err(NgsiError::internal)?;
                // The id stays: the secret part changes.
                let secret_part = full.rsplit('_').next().unwrap_or_default().to_string();
                fresh = format!("{}{}_{secret_part}", secret::KEY_PREFIX, k.id);
                k.secret_hash = secret::hash(&fresh);
                k.rotated_at = Some(now);
                Ok(())
            })
            .await?;
        Ok((k, fresh))
    }

    async fn change_key(
        &self,
        id: &str,
        change: impl FnOnce(&mut ApiKey, i64) -> AccessResult<()>,
    ) -> AccessResult<(ApiKey, ())> {
        let mut k = self
            .key(id)
            .ok_or_else(|| NgsiError::not_found(format!("key '{id}' does not exist")))?;
        change(&mut k, now_micros())?;
        self.write(vec![Self::key_change(&k, false)?]).await?;
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(k.id.clone(), k.clone());
        Ok((k, ()))
    }
}

fn too_many(detail: &str, wait: Duration) -> NgsiError {
    problem(
        ProblemKind::TooManyRequests,
        format!("{detail} (retry in {} ms)", wait.as_millis().max(1)),
    )
}

fn operator_key(id: String, secret_hash: String, now: i64) -> ApiKey {
    ApiKey {
        id,
        tenant: None,
        name: Some("operator".into()),
        roles: vec![Role::OperatorAdmin],
        entity_types: None,
        secret_hash,
        created_at: now,
        expires_at: None,
        last_used_at: None,
        rotated_at: None,
        revoked_at: None,
    }
}

fn key_to_principal(k: &ApiKey) -> Principal {
    Principal {
        subject: format!("key:{}", k.id),
        credential: Credential::ApiKey { id: k.id.clone() },
        tenants: match &k.tenant {
            _ if k.roles.contains(&Role::OperatorAdmin) => TenantScope::All,
            Some(t) => TenantScope::Only(vec![t.clone()]),
            None => TenantScope::Only(Vec::new()),
        },
        roles: k.roles.clone(),
        entity_types: k.entity_types.clone(),
    }
}

fn new_tenant(name: &str, now: i64) -> Tenant {
    Tenant {
        name: name.to_string(),
        display_name: None,
        city: None,
        contacts: Vec::new(),
        plan: None,
        quotas: Quotas::default(),
        status: TenantStatus::Active,
        reads_while_suspended: false,
        created_at: now,
        modified_at: now,
    }
}

fn parse_roles(v: Option<&Value>) -> AccessResult<Vec<Role>> {
    let list = v
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| NgsiError::bad_data("a key needs \"roles\": a non-empty array"))?;
    let mut roles = Vec::new();
    for r in list {
        let name = r.as_str().unwrap_or_default();
        let role = Role::parse(name).ok_or_else(|| {
            NgsiError::bad_data(format!(
                "unknown role '{name}'; use operator-admin, tenant-admin, editor, viewer or device-manager"
            ))
        })?;
        if !roles.contains(&role) {
            roles.push(role);
        }
    }
    roles.sort();
    Ok(roles)
}

/// Applies the members of a tenant description; on creation `name` is expected.
fn apply_tenant_patch(t: &mut Tenant, body: &Value, creating: bool) -> AccessResult<()> {
    let obj = body
        .as_object()
        .ok_or_else(|| NgsiError::bad_data("a tenant must be a JSON object"))?;
    let text = |v: &Value, what: &str| -> AccessResult<Option<String>> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) if s.len() <= 200 => Ok(Some(s.clone())),
            _ => Err(NgsiError::bad_data(format!(
                "{what} must be a string of at most 200 characters"
            ))),
        }
    };
    for (k, v) in obj {
        match k.as_str() {
            "name" if creating => {}
            "name" => {
                if v.as_str() != Some(t.name.as_str()) {
                    return Err(NgsiError::bad_data("a tenant's name cannot change"));
                }
            }
            "displayName" => t.display_name = text(v, "displayName")?,
            "city" => t.city = text(v, "city")?,
            "plan" => t.plan = text(v, "plan")?,
            "contacts" => {
                t.contacts = serde_json::from_value(v.clone()).map_err(|e| {
                    NgsiError::bad_data(format!(
                        "contacts must be a list of {{name, email, phone, role}}: {e}"
                    ))
                })?;
                if t.contacts.len() > 20 {
                    return Err(NgsiError::bad_data("at most 20 contacts"));
                }
            }
            "quotas" => {
                let q: Quotas = serde_json::from_value(v.clone())
                    .map_err(|e| NgsiError::bad_data(format!("quotas: {e}")))?;
                let rates = [q.requests_per_second, q.messages_per_second];
                if rates.iter().flatten().any(|r| !r.is_finite() || *r <= 0.0) {
                    return Err(NgsiError::bad_data(
                        "quotas: rates must be positive numbers",
                    ));
                }
                t.quotas = q;
            }
            "status" => {
                t.status = match v.as_str() {
                    Some("active") => TenantStatus::Active,
                    Some("suspended") => TenantStatus::Suspended,
                    _ => return Err(NgsiError::bad_data("status must be active or suspended")),
                }
            }
            "readsWhileSuspended" => {
                t.reads_while_suspended = v.as_bool().ok_or_else(|| {
                    NgsiError::bad_data("readsWhileSuspended must be true or false")
                })?
            }
            "createdAt" | "modifiedAt" => {}
            other => {
                return Err(NgsiError::bad_data(format!(
                    "unknown tenant member '{other}'"
                )));
            }
        }
    }
    Ok(())
}
