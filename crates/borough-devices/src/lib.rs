//! Devices: the registry (who may send what to which entity), ingestion of
//! measurements over MQTT and HTTP, and commands to actuators.
//!
//! A measurement is mapped (`payload`) onto upserts of the device's own
//! entity and written with [`EntityStore::write`], so state, history and
//! subscriptions follow from the one durable write, as for any NGSI-LD update.
//! Devices and commands are kept with [`RecordStore`] and cached in memory.

pub mod broker;
pub mod commands;
pub mod external;
pub mod http;
pub mod metrics;
pub mod model;
pub mod payload;
pub mod store;
pub mod token;

use borough_core::validate::now_micros;
use borough_core::{Context, EntityOp, NgsiError};
use borough_store::{EntityStore, RecordChange, RecordKind, RecordStore, StoreError};
use commands::CommandQueue;
use metrics::Metrics;
use model::{Device, DeviceInput};
use payload::{Dropped, Rejected};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// The default tenant's name in MQTT topics (the default tenant's own name is empty).
pub const DEFAULT_TENANT_TOPIC: &str = "default";

/// Limits and timings of the devices layer.
#[derive(Clone, Debug)]
pub struct DevicesConfig {
    /// Largest measurement payload; larger ones are refused.
    pub max_payload_bytes: usize,
    /// Most readings in one batch payload.
    pub max_readings: usize,
    /// Messages per second a device may send (token bucket refill rate).
    pub rate_limit: f64,
    /// Messages a device may send in a burst.
    pub rate_burst: f64,
    /// Lifetime of a command that names none.
    pub command_ttl: Duration,
    /// Wait for a device's acknowledgement before a command is sent again.
    pub ack_timeout: Duration,
    /// Deliveries of a command before it fails.
    pub max_attempts: u32,
    /// How often expiry and retries are checked.
    pub sweep_interval: Duration,
    /// Finished commands kept per device (with their idempotency keys).
    pub keep_finished: usize,
    /// Open (queued or sent) commands a device may have; more are refused
    /// (429), so that a device that never answers cannot grow the queue
    /// without bound.
    pub max_open_per_device: usize,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 64 << 10,
            max_readings: 1000,
            rate_limit: 50.0,
            rate_burst: 100.0,
            command_ttl: Duration::from_secs(86_400),
            ack_timeout: Duration::from_secs(30),
            max_attempts: 3,
            sweep_interval: Duration::from_secs(1),
            keep_finished: 50,
            max_open_per_device: 100,
        }
    }
}

/// The MQTT topic segment of a tenant.
pub fn tenant_topic(tenant: &str) -> &str {
    if tenant.is_empty() {
        DEFAULT_TENANT_TOPIC
    } else {
        tenant
    }
}

/// The tenant a topic segment names.
pub fn topic_tenant(segment: &str) -> &str {
    if segment == DEFAULT_TENANT_TOPIC {
        ""
    } else {
        segment
    }
}

/// A device's topic: `{tenant}/devices/{id}/{leaf}` with leaf `attrs`, `cmd` or `cmdack`.
pub fn topic(tenant: &str, device: &str, leaf: &str) -> String {
    format!("{}/devices/{device}/{leaf}", tenant_topic(tenant))
}

/// Splits a device topic into (tenant, device id, leaf).
pub fn parse_topic(topic: &str) -> Option<(&str, &str, &str)> {
    let mut parts = topic.split('/');
    let (t, d, id, leaf) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if d != "devices" || parts.next().is_some() || id.is_empty() {
        return None;
    }
    Some((topic_tenant(t), id, leaf))
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A registered device with its rate limiter.
pub struct Entry {
    pub tenant: String,
    pub device: Device,
    bucket: Mutex<Bucket>,
}

impl Entry {
    fn new(tenant: String, device: Device, burst: f64) -> Self {
        Self {
            tenant,
            device,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
            }),
        }
    }

    /// Takes one message from the device's allowance.
    fn allow(&self, rate: f64, burst: f64) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Default)]
struct Registry {
    devices: HashMap<(String, String), Arc<Entry>>,
    /// (tenant, entity id) → the device that feeds it.
    by_entity: HashMap<(String, String), String>,
    /// device id → the tenants that have a device of that id.
    tenants_of: HashMap<String, Vec<String>>,
    /// Devices that have commands (none: API writes need no command check).
    commanded: usize,
}

impl Registry {
    fn insert(&mut self, e: Arc<Entry>) {
        let key = (e.tenant.clone(), e.device.id.clone());
        if !e.device.commands.is_empty() {
            self.commanded += 1;
        }
        if let Some(old) = self.devices.insert(key, e.clone()) {
            self.by_entity
                .remove(&(old.tenant.clone(), old.device.entity_id.clone()));
            if !old.device.commands.is_empty() {
                self.commanded -= 1;
            }
        }
        self.by_entity.insert(
            (e.tenant.clone(), e.device.entity_id.clone()),
            e.device.id.clone(),
        );
        let ts = self.tenants_of.entry(e.device.id.clone()).or_default();
        if !ts.contains(&e.tenant) {
            ts.push(e.tenant.clone());
        }
    }

    fn remove(&mut self, tenant: &str, id: &str) -> Option<Arc<Entry>> {
        let old = self.devices.remove(&(tenant.to_string(), id.to_string()))?;
        if !old.device.commands.is_empty() {
            self.commanded -= 1;
        }
        self.by_entity
            .remove(&(tenant.to_string(), old.device.entity_id.clone()));
        if let Some(ts) = self.tenants_of.get_mut(id) {
            ts.retain(|t| t != tenant);
            if ts.is_empty() {
                self.tenants_of.remove(id);
            }
        }
        Some(old)
    }
}

/// Why a registry operation failed.
#[derive(Debug)]
pub enum DeviceError {
    Ngsi(NgsiError),
    Store(StoreError),
}

impl From<NgsiError> for DeviceError {
    fn from(e: NgsiError) -> Self {
        Self::Ngsi(e)
    }
}

impl From<StoreError> for DeviceError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// Why a measurement was not written.
#[derive(Debug)]
pub enum IngestError {
    Rejected(Rejected),
    TooLarge(usize),
    RateLimited,
    /// The device's tenant refuses it: suspended, or over its message rate.
    Tenant(String),
    Store(String),
}

impl IngestError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Rejected(r) => r.reason(),
            Self::TooLarge(_) => "too_large",
            Self::RateLimited => "rate_limited",
            Self::Tenant(_) => "tenant",
            Self::Store(_) => "store",
        }
    }

    pub fn detail(&self) -> String {
        match self {
            Self::Rejected(r) => r.detail(),
            Self::TooLarge(n) => format!("the payload is larger than {n} bytes"),
            Self::RateLimited => "the device sends faster than its rate limit".into(),
            Self::Tenant(why) => why.clone(),
            Self::Store(e) => format!("the measurement could not be stored: {e}"),
        }
    }
}

/// What was written of one message.
#[derive(Debug)]
pub struct Accepted {
    pub readings: usize,
    pub values: usize,
    pub dropped: Vec<Dropped>,
}

struct IngestJob {
    tenant: String,
    ops: Vec<EntityOp>,
    values: usize,
    reply: Option<oneshot::Sender<Result<(), String>>>,
}

/// Messages waiting for the batcher; a full queue makes publishers wait.
const INGEST_QUEUE: usize = 8192;
/// Most readings the batcher puts into one store write.
const INGEST_BATCH: usize = 16_384;

/// The devices layer. Cheap to share behind an `Arc`.
pub struct Devices {
    store: Arc<dyn EntityStore>,
    records: Arc<dyn RecordStore>,
    ctx: Arc<Context>,
    registry: RwLock<Registry>,
    /// Serializes registry changes (check, persist, publish).
    admin: tokio::sync::Mutex<()>,
    pub metrics: Metrics,
    pub config: DevicesConfig,
    ingest: mpsc::Sender<IngestJob>,
    pub commands: CommandQueue,
    /// Tenants' status, device quotas and message rates, once wired.
    access: std::sync::OnceLock<Arc<borough_access::Access>>,
}

impl Devices {
    /// Loads the registry and the command queue and starts the ingest
    /// batcher and the command sweeper. Needs a Tokio runtime.
    pub fn start(
        store: Arc<dyn EntityStore>,
        records: Arc<dyn RecordStore>,
        config: DevicesConfig,
    ) -> Result<Arc<Self>, String> {
        let mut registry = Registry::default();
        let rows = records
            .records(RecordKind::Device)
            .map_err(|e| format!("cannot read the device registry: {e}"))?;
        for (tenant, key, bytes) in rows {
            let device: Device = serde_json::from_slice(&bytes)
                .map_err(|e| format!("device '{key}' of tenant '{tenant}' cannot be read: {e}"))?;
            registry.insert(Arc::new(Entry::new(tenant, device, config.rate_burst)));
        }
        let command_rows = records
            .records(RecordKind::Command)
            .map_err(|e| format!("cannot read the command queue: {e}"))?;
        let commands = CommandQueue::load(command_rows)?;
        let (tx, rx) = mpsc::channel(INGEST_QUEUE);
        let devices = Arc::new(Self {
            store: store.clone(),
            records,
            ctx: Context::core(),
            registry: RwLock::new(registry),
            admin: tokio::sync::Mutex::new(()),
            metrics: Metrics::default(),
            config,
            ingest: tx,
            commands,
            access: std::sync::OnceLock::new(),
        });
        tokio::spawn(run_batcher(devices.clone(), rx));
        tokio::spawn(commands::run_sweeper(Arc::downgrade(&devices)));
        Ok(devices)
    }

    /// Takes in devices that other nodes sharing the store registered,
    /// changed or removed, so that a device can connect to any node.
    pub fn apply_records(&self, changes: &[RecordChange]) {
        let mut reg = self.registry.write().unwrap_or_else(|e| e.into_inner());
        for c in changes.iter().filter(|c| c.kind == RecordKind::Device) {
            reg.remove(&c.tenant, &c.key);
            let Some(bytes) = &c.value else { continue };
            match serde_json::from_slice::<Device>(bytes) {
                Ok(device) => reg.insert(Arc::new(Entry::new(
                    c.tenant.clone(),
                    device,
                    self.config.rate_burst,
                ))),
                Err(e) => {
                    tracing::error!(tenant = %c.tenant, device = %c.key, error = %e, "a followed device record is unreadable")
                }
            }
        }
    }

    /// Follows, in the background, the device and command records other
    /// nodes change: a device may connect to any node, and a command set on
    /// one node reaches the device on the node it is connected to.
    pub fn follow(
        self: &Arc<Self>,
        changes: tokio::sync::broadcast::Receiver<borough_store::RecordBatch>,
    ) {
        let devices = Arc::downgrade(self);
        borough_store::follow_records(changes, move |batch| {
            let devices = devices.clone();
            async move {
                let Some(d) = devices.upgrade() else {
                    return false;
                };
                let Some(batch) = batch else {
                    tracing::warn!(
                        "device changes of other nodes were missed; they show after a restart"
                    );
                    return true;
                };
                d.apply_records(&batch);
                for c in batch.iter().filter(|c| c.kind == RecordKind::Command) {
                    d.follow_command(c).await;
                }
                true
            }
        });
    }

    /// The entity store the devices write to (without the command hook).
    pub fn store(&self) -> &Arc<dyn EntityStore> {
        &self.store
    }

    /// Wires access control: a suspended tenant's devices are refused, and
    /// tenants' device quotas and message rates apply.
    pub fn set_access(&self, access: Arc<borough_access::Access>) {
        let _ = self.access.set(access);
    }

    fn access(&self) -> Option<&Arc<borough_access::Access>> {
        self.access.get().filter(|a| a.enabled())
    }

    /// Records a change of the registry in the audit log, as the request's caller.
    pub async fn audit(&self, tenant: &str, action: &str, target: &str, detail: serde_json::Value) {
        let Some(access) = self.access() else {
            return;
        };
        borough_api::auth::audit_change(
            access,
            Some(tenant),
            action,
            Some(target.into()),
            detail,
            None,
        )
        .await;
    }

    /// Removes every device and command of a tenant (the tenant is being
    /// deleted); answers how many devices there were.
    pub async fn purge_tenant(&self, tenant: &str) -> Result<usize, DeviceError> {
        let ids: Vec<String> = self
            .list(tenant)
            .iter()
            .map(|e| e.device.id.clone())
            .collect();
        for id in &ids {
            self.delete(tenant, id).await?;
        }
        Ok(ids.len())
    }

    pub fn get(&self, tenant: &str, id: &str) -> Option<Arc<Entry>> {
        self.registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .devices
            .get(&(tenant.to_string(), id.to_string()))
            .cloned()
    }

    /// A tenant's devices, ordered by id.
    pub fn list(&self, tenant: &str) -> Vec<Arc<Entry>> {
        let mut out: Vec<Arc<Entry>> = self
            .registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .devices
            .values()
            .filter(|e| e.tenant == tenant)
            .cloned()
            .collect();
        out.sort_by(|a, b| a.device.id.cmp(&b.device.id));
        out
    }

    /// Whether any device has commands.
    pub fn any_commands(&self) -> bool {
        self.registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .commanded
            > 0
    }

    /// The device that feeds an entity, if any.
    pub fn device_for_entity(&self, tenant: &str, entity_id: &str) -> Option<Arc<Entry>> {
        let reg = self.registry.read().unwrap_or_else(|e| e.into_inner());
        let id = reg
            .by_entity
            .get(&(tenant.to_string(), entity_id.to_string()))?;
        reg.devices.get(&(tenant.to_string(), id.clone())).cloned()
    }

    /// The device whose id is `username` and whose token is `password`, in
    /// whichever tenant holds it.
    pub fn authenticate(&self, username: &str, password: &str) -> Option<Arc<Entry>> {
        let reg = self.registry.read().unwrap_or_else(|e| e.into_inner());
        let tenants = reg.tenants_of.get(username)?;
        tenants.iter().find_map(|t| {
            let e = reg.devices.get(&(t.clone(), username.to_string()))?;
            token::verify(password, &e.device.token_hash).then(|| e.clone())
        })
    }

    /// The device of a tenant, if `token` is its token.
    pub fn authenticate_in(&self, tenant: &str, id: &str, token: &str) -> Option<Arc<Entry>> {
        self.get(tenant, id)
            .filter(|e| token::verify(token, &e.device.token_hash))
    }

    async fn persist(&self, changes: Vec<RecordChange>) -> Result<(), StoreError> {
        let records = self.records.clone();
        tokio::task::spawn_blocking(move || records.write_records(&changes))
            .await
            .map_err(|e| StoreError::Io(e.to_string()))?
    }

    fn device_change(tenant: &str, d: &Device) -> Result<RecordChange, DeviceError> {
        Ok(RecordChange {
            kind: RecordKind::Device,
            tenant: tenant.to_string(),
            key: d.id.clone(),
            value: Some(serde_json::to_vec(d).map_err(|e| NgsiError::internal(e.to_string()))?),
        })
    }

    fn check_free(&self, tenant: &str, d: &Device, creating: bool) -> Result<(), DeviceError> {
        let reg = self.registry.read().unwrap_or_else(|e| e.into_inner());
        if creating
            && reg
                .devices
                .contains_key(&(tenant.to_string(), d.id.clone()))
        {
            return Err(NgsiError::new(
                borough_core::ProblemKind::AlreadyExists,
                format!("device '{}' already exists", d.id),
            )
            .into());
        }
        if let Some(other) = reg
            .by_entity
            .get(&(tenant.to_string(), d.entity_id.clone()))
            && other != &d.id
        {
            return Err(NgsiError::new(
                borough_core::ProblemKind::AlreadyExists,
                format!(
                    "entity '{}' is already fed by device '{other}': a device writes only its own entity",
                    d.entity_id
                ),
            )
            .into());
        }
        Ok(())
    }

    /// Registers devices; each succeeds or fails on its own, and those that
    /// succeed are stored in one durable transaction. Returns each new
    /// device with its token (shown only now).
    pub async fn create_many(
        &self,
        tenant: &str,
        inputs: Vec<DeviceInput>,
    ) -> Result<Vec<Result<(Device, String), NgsiError>>, DeviceError> {
        let _admin = self.admin.lock().await;
        if let Some(a) = self.access() {
            a.check_quota(
                tenant,
                "devices",
                |q| q.max_devices,
                self.list(tenant).len() as u64,
                inputs.len() as u64,
            )?;
        }
        let now = now_micros();
        let mut results = Vec::with_capacity(inputs.len());
        let mut ok = Vec::new();
        let mut changes = Vec::new();
        let mut seen_ids = std::collections::HashSet::new();
        let mut seen_entities = std::collections::HashSet::new();
        for input in inputs {
            let made = (|| {
                let token = token::generate().map_err(NgsiError::internal)?;
                let d = input.into_device(token::hash(&token), now)?;
                match self.check_free(tenant, &d, true) {
                    Ok(()) => {}
                    Err(DeviceError::Ngsi(e)) => return Err(e),
                    Err(DeviceError::Store(e)) => return Err(NgsiError::internal(e.to_string())),
                }
                if !seen_ids.insert(d.id.clone()) || !seen_entities.insert(d.entity_id.clone()) {
                    return Err(NgsiError::new(
                        borough_core::ProblemKind::AlreadyExists,
                        format!("device '{}' or its entity is listed twice", d.id),
                    ));
                }
                Ok((d, token))
            })();
            if let Ok((d, _)) = &made {
                match Self::device_change(tenant, d) {
                    Ok(c) => changes.push(c),
                    Err(DeviceError::Ngsi(e)) => {
                        results.push(Err(e));
                        continue;
                    }
                    Err(DeviceError::Store(e)) => return Err(e.into()),
                }
                ok.push(d.clone());
            }
            results.push(made);
        }
        self.persist(changes).await?;
        {
            let mut reg = self.registry.write().unwrap_or_else(|e| e.into_inner());
            for d in &ok {
                reg.insert(Arc::new(Entry::new(
                    tenant.to_string(),
                    d.clone(),
                    self.config.rate_burst,
                )));
            }
        }
        self.add_command_attributes(tenant, &ok).await;
        Ok(results)
    }

    /// Registers one device; returns it with its token.
    pub async fn create(
        &self,
        tenant: &str,
        input: DeviceInput,
    ) -> Result<(Device, String), DeviceError> {
        let mut r = self.create_many(tenant, vec![input]).await?;
        match r.pop() {
            Some(Ok(made)) => Ok(made),
            Some(Err(e)) => Err(e.into()),
            None => Err(NgsiError::internal("no result").into()),
        }
    }

    /// Changes a device's mapping, commands or entity.
    pub async fn update(
        &self,
        tenant: &str,
        id: &str,
        input: DeviceInput,
    ) -> Result<Device, DeviceError> {
        let _admin = self.admin.lock().await;
        let current = self
            .get(tenant, id)
            .ok_or_else(|| NgsiError::not_found(format!("device '{id}' does not exist")))?;
        let next = input.apply_to(&current.device, now_micros())?;
        self.check_free(tenant, &next, false)?;
        self.persist(vec![Self::device_change(tenant, &next)?])
            .await?;
        self.registry
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(Arc::new(Entry::new(
                tenant.to_string(),
                next.clone(),
                self.config.rate_burst,
            )));
        self.add_command_attributes(tenant, std::slice::from_ref(&next))
            .await;
        Ok(next)
    }

    /// Gives a device a new token; the old one stops working at once.
    pub async fn rotate_token(&self, tenant: &str, id: &str) -> Result<String, DeviceError> {
        let _admin = self.admin.lock().await;
        let current = self
            .get(tenant, id)
            .ok_or_else(|| NgsiError::not_found(format!("device '{id}' does not exist")))?;
        let token = token::generate().map_err(NgsiError::internal)?;
        let mut next = current.device.clone();
        next.token_hash = token::hash(&token);
        next.modified_at = now_micros();
        self.persist(vec![Self::device_change(tenant, &next)?])
            .await?;
        self.registry
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(Arc::new(Entry::new(
                tenant.to_string(),
                next,
                self.config.rate_burst,
            )));
        Ok(token)
    }

    /// Deletes a device and its commands; its entity stays. True if it existed.
    pub async fn delete(&self, tenant: &str, id: &str) -> Result<bool, DeviceError> {
        let _admin = self.admin.lock().await;
        if self.get(tenant, id).is_none() {
            return Ok(false);
        }
        let mut changes = vec![RecordChange {
            kind: RecordKind::Device,
            tenant: tenant.to_string(),
            key: id.to_string(),
            value: None,
        }];
        changes.extend(self.commands.forget_device(tenant, id));
        self.persist(changes).await?;
        self.registry
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(tenant, id);
        Ok(true)
    }

    /// Gives each device's entity its command attributes (empty text, as FIWARE
    /// does), creating the entity if needed, so that an NGSI-LD PATCH of a
    /// command attribute finds it. Attributes that exist are left alone.
    async fn add_command_attributes(&self, tenant: &str, devices: &[Device]) {
        let mut ops = Vec::new();
        for d in devices {
            let current = self.store.get(tenant, &d.entity_id);
            let mut attrs = indexmap::IndexMap::new();
            for c in &d.commands {
                let iri = self.ctx.expand(c).into_owned();
                if current.as_ref().is_some_and(|e| e.attrs.contains_key(&iri)) {
                    continue;
                }
                attrs.insert(
                    iri,
                    vec![borough_core::Attribute {
                        kind: borough_core::AttrKind::Property,
                        value: serde_json::json!(""),
                        dataset_id: None,
                        observed_at: None,
                        unit_code: None,
                        object_type: None,
                        sub: Default::default(),
                        created_at: 0,
                        modified_at: 0,
                    }],
                );
            }
            if attrs.is_empty() {
                continue;
            }
            ops.push(EntityOp::Upsert {
                entity: borough_core::Entity {
                    id: d.entity_id.clone(),
                    types: vec![self.ctx.expand(&d.entity_type).into_owned()],
                    scopes: Vec::new(),
                    attrs,
                    created_at: 0,
                    modified_at: 0,
                },
                replace: false,
            });
        }
        if ops.is_empty() {
            return;
        }
        if let Err(e) = self.store.write(tenant, ops).await {
            tracing::error!(error = %e, "command attributes could not be added to device entities");
        }
    }

    /// Checks size and rate and maps a payload; counts and logs a refusal.
    pub fn prepare(
        &self,
        transport: &str,
        entry: &Entry,
        payload: &[u8],
    ) -> Result<payload::Mapped, IngestError> {
        let tenant_refusal = self.access().and_then(|a| {
            let suspended = a
                .tenant(&entry.tenant)
                .is_none_or(|t| t.status == borough_access::model::TenantStatus::Suspended);
            if suspended {
                return Some(IngestError::Tenant(format!(
                    "tenant '{}' is suspended or not registered",
                    borough_access::public_tenant(&entry.tenant)
                )));
            }
            a.admit_messages(&entry.tenant, 1)
                .err()
                .map(|e| IngestError::Tenant(e.detail))
        });
        let result = if let Some(refusal) = tenant_refusal {
            Err(refusal)
        } else if payload.len() > self.config.max_payload_bytes {
            Err(IngestError::TooLarge(self.config.max_payload_bytes))
        } else if !entry.allow(self.config.rate_limit, self.config.rate_burst) {
            Err(IngestError::RateLimited)
        } else {
            payload::map_payload(&entry.device, &self.ctx, payload, self.config.max_readings)
                .map_err(IngestError::Rejected)
        };
        match &result {
            Err(IngestError::Rejected(Rejected::NothingValid(dropped))) if !dropped.is_empty() => {
                for d in dropped {
                    self.metrics.reject(
                        transport,
                        d.reason.label(),
                        &entry.tenant,
                        &entry.device.id,
                        &d.to_string(),
                    );
                }
            }
            Err(e) => self.metrics.reject(
                transport,
                e.reason(),
                &entry.tenant,
                &entry.device.id,
                &e.detail(),
            ),
            Ok(m) => {
                for d in &m.dropped {
                    self.metrics.reject(
                        transport,
                        d.reason.label(),
                        &entry.tenant,
                        &entry.device.id,
                        &d.to_string(),
                    );
                }
            }
        }
        result
    }

    /// Queues mapped readings for writing. With `wait`, the receiver
    /// resolves once they are durable.
    pub async fn submit(
        &self,
        tenant: &str,
        mapped: payload::Mapped,
        wait: bool,
    ) -> Result<Option<oneshot::Receiver<Result<(), String>>>, IngestError> {
        let (reply, answer) = if wait {
            let (s, r) = oneshot::channel();
            (Some(s), Some(r))
        } else {
            (None, None)
        };
        self.ingest
            .send(IngestJob {
                tenant: tenant.to_string(),
                ops: mapped.ops,
                values: mapped.values,
                reply,
            })
            .await
            .map_err(|_| IngestError::Store("the server is shutting down".into()))?;
        Ok(answer)
    }

    /// Maps, writes and waits until the readings are durable.
    pub async fn ingest(
        &self,
        transport: &str,
        entry: &Entry,
        payload: &[u8],
    ) -> Result<Accepted, IngestError> {
        let mapped = self.prepare(transport, entry, payload)?;
        let readings = mapped.ops.len();
        let values = mapped.values;
        let dropped = mapped.dropped.clone();
        let answer = self.submit(&entry.tenant, mapped, true).await?;
        if let Some(a) = answer {
            match a.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(IngestError::Store(e)),
                Err(_) => return Err(IngestError::Store("the write was abandoned".into())),
            }
        }
        Ok(Accepted {
            readings,
            values,
            dropped,
        })
    }
}

/// Store writes of readings in flight at once.
const INGEST_IN_FLIGHT: usize = 4;

/// Takes queued readings in batches and writes each tenant's batch with one
/// store write. Several writes are in flight, so that the next batch is
/// gathered and queued while the store commits the last one; each is handed
/// to the store (its future polled once) before the next is made, and the
/// store applies writes in that order, so a device's readings still reach
/// its entity in the order they were sent.
async fn run_batcher(devices: Arc<Devices>, mut rx: mpsc::Receiver<IngestJob>) {
    use futures_util::StreamExt;
    let mut in_flight = futures_util::stream::FuturesOrdered::new();
    loop {
        let first = if in_flight.is_empty() {
            match rx.recv().await {
                Some(job) => job,
                None => break,
            }
        } else {
            tokio::select! {
                _ = in_flight.next() => continue,
                job = rx.recv(), if in_flight.len() < INGEST_IN_FLIGHT => match job {
                    Some(job) => job,
                    None => break,
                },
            }
        };
        let mut n = first.ops.len();
        let mut jobs = vec![first];
        while n < INGEST_BATCH {
            match rx.try_recv() {
                Ok(j) => {
                    n += j.ops.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        let mut by_tenant: Vec<(String, Vec<IngestJob>)> = Vec::new();
        for j in jobs {
            match by_tenant.iter_mut().find(|(t, _)| *t == j.tenant) {
                Some((_, list)) => list.push(j),
                None => by_tenant.push((j.tenant.clone(), vec![j])),
            }
        }
        for (tenant, jobs) in by_tenant {
            let mut write = Box::pin(write_batch(devices.clone(), tenant, jobs));
            // Polled once here, the write is in the store's queue before the next one.
            let done = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(write.as_mut().poll(cx).is_ready())
            })
            .await;
            if !done {
                in_flight.push_back(write);
            }
        }
    }
    // The queue is closed: finish what is in flight.
    while in_flight.next().await.is_some() {}
}

async fn write_batch(devices: Arc<Devices>, tenant: String, jobs: Vec<IngestJob>) {
    let tenant = tenant.as_str();
    let mut ops = Vec::new();
    let mut parts = Vec::with_capacity(jobs.len());
    for j in jobs {
        parts.push((j.ops.len(), j.values, j.reply));
        ops.extend(j.ops);
    }
    let result = devices.store.write(tenant, ops).await;
    let mut results = match result {
        Ok(r) => r.into_iter(),
        Err(e) => {
            tracing::error!(error = %e, tenant, "device readings could not be stored");
            devices
                .metrics
                .rejected
                .with_label_values(&["any", "store"])
                .inc_by(parts.len() as u64);
            for (_, _, reply) in parts {
                if let Some(r) = reply {
                    let _ = r.send(Err(e.to_string()));
                }
            }
            return;
        }
    };
    let mut readings = 0u64;
    let mut values = 0u64;
    for (n, v, reply) in parts {
        let mut error = None;
        for r in results.by_ref().take(n) {
            if let Err(e) = r {
                error = Some(e.detail);
            }
        }
        match &error {
            None => {
                readings += n as u64;
                values += v as u64;
            }
            Some(e) => {
                devices
                    .metrics
                    .rejected
                    .with_label_values(&["any", "store"])
                    .inc();
                tracing::warn!(tenant, error = %e, "a device reading was not applied");
            }
        }
        if let Some(r) = reply {
            let _ = r.send(error.map_or(Ok(()), Err));
        }
    }
    devices
        .metrics
        .readings
        .with_label_values(&[tenant])
        .inc_by(readings);
    devices
        .metrics
        .values
        .with_label_values(&[tenant])
        .inc_by(values);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_name_tenant_device_and_leaf() {
        assert_eq!(topic("", "d1", "attrs"), "default/devices/d1/attrs");
        assert_eq!(topic("city", "d1", "cmd"), "city/devices/d1/cmd");
        assert_eq!(
            parse_topic("default/devices/d1/attrs"),
            Some(("", "d1", "attrs"))
        );
        assert_eq!(
            parse_topic("city/devices/d1/cmdack"),
            Some(("city", "d1", "cmdack"))
        );
        assert_eq!(parse_topic("city/devices/d1/attrs/x"), None);
        assert_eq!(parse_topic("city/things/d1/attrs"), None);
        assert_eq!(parse_topic("city/devices//attrs"), None);
    }
}
