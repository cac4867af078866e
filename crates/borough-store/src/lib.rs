//! Storage traits that every backend implements, and the test suite that every
//! backend must pass. Nothing here names an engine's types: the embedded engine
//! and a future PostgreSQL backend plug in behind the same trait.

use borough_core::query::EntityQuery;
use borough_core::subscription::{CompiledSubscription, Stats, SubscriptionRecord};
use borough_core::temporal::{
    EntityHistory, HistoryOp, HistoryOutcome, HistoryRequest, ImportSeries, Retention,
};
use borough_core::{Entity, EntityOp, NgsiError, OpOutcome};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub mod testsuite;

/// Where a store takes the time of its writes from (microseconds since the
/// epoch): the system clock, or one a test sets.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    fn now_micros(&self) -> i64;
}

/// The system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> i64 {
        borough_core::validate::now_micros()
    }
}

/// The name of the tenant used when a request names none.
pub const DEFAULT_TENANT: &str = "";

/// A failure of the storage itself (not of the request): the write was not made.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage failure: {0}")]
    Io(String),
    /// The storage cannot be reached for now (a database server is down or
    /// unreachable): nothing was changed, and the same request may succeed later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("the store is shut down")]
    Closed,
}

/// The state of a store's write path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WriterState {
    /// Writes commit.
    #[default]
    Ok,
    /// The last write failed (a storage error, or a fault in the writer); the
    /// store tries again with the next one.
    Failing,
    /// The store is closed, or its writer is gone: no write can commit.
    Stopped,
}

/// What `/health` tells of the store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StoreHealth {
    pub writer: WriterState,
    /// The last failure, while the writer is not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Since when (microseconds) the writer is not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
}

impl StoreHealth {
    pub fn is_ok(&self) -> bool {
        self.writer == WriterState::Ok
    }
}

/// The outcome of each operation of one write, in order.
pub type WriteResults = Vec<Result<OpOutcome, NgsiError>>;

/// A notification owed to a subscription, written to the outbox in the same
/// durable write as the change that caused it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    pub tenant: String,
    pub subscription: String,
    pub trigger: String,
    /// The entity after the change (before it, for a deletion).
    pub entity: Entity,
    pub deleted: bool,
    /// When the change was committed (microseconds).
    pub at: i64,
    /// The entity before the change, for subscriptions that show changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Entity>,
}

/// What a bulk import stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ImportCounts {
    pub points: u64,
    pub series: u64,
}

/// Which kind of management record a [`RecordChange`] concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordKind {
    /// A registered device, keyed by (tenant, device id).
    Device,
    /// A device command, keyed by (tenant, "{device id}/{command id}").
    Command,
    /// A tenant of the operator, keyed by ("", tenant name).
    Tenant,
    /// An API key, keyed by (tenant, key id).
    ApiKey,
    /// An entry of the audit log, keyed by ("", its sequence number as 20
    /// zero-padded digits, so that key order is log order).
    Audit,
    /// A server setting, keyed by ("", its name): the key that signs sessions.
    Setting,
    /// A context source registration, keyed by (tenant, registration id).
    Registration,
    /// A subscription to context source registrations, keyed by (tenant, id).
    RegistrationSubscription,
}

impl RecordKind {
    pub const ALL: [RecordKind; 8] = [
        Self::Device,
        Self::Command,
        Self::Tenant,
        Self::ApiKey,
        Self::Audit,
        Self::Setting,
        Self::Registration,
        Self::RegistrationSubscription,
    ];
}

/// One write of a management record: `value: None` deletes the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordChange {
    pub kind: RecordKind,
    pub tenant: String,
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// What a subscription write expects to replace, so that concurrent changes
/// are never lost: the store checks it under its writer, in order with every
/// other change of subscriptions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Nothing: the write creates the subscription.
    Absent,
    /// The version that was read before the change (its `modified_at`).
    ModifiedAt(i64),
}

/// A stored management record: (tenant, key, serialized value).
pub type StoredRecord = (String, String, Vec<u8>);

/// Durable storage of management records: the device registry and command
/// queue, tenants, API keys and the audit log. Records are opaque bytes:
/// their shape belongs to the layer that owns them, so a backend only has to
/// keep them. Every call blocks: run them off the async executor.
pub trait RecordStore: Send + Sync + 'static {
    /// Applies every change in one transaction, durable when it returns.
    fn write_records(&self, changes: &[RecordChange]) -> Result<(), StoreError>;

    /// Every record of a kind, ordered by (tenant, key).
    fn records(&self, kind: RecordKind) -> Result<Vec<StoredRecord>, StoreError>;

    /// At most `limit` records of a kind and tenant with a key above `after`
    /// (from the first when `None`), in key order; with `reverse`, those below
    /// `after`, newest first.
    fn records_page(
        &self,
        kind: RecordKind,
        tenant: &str,
        after: Option<&str>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<StoredRecord>, StoreError>;

    /// Writes `change` only if no record has its key yet; false if one has.
    /// Appends that must not overwrite each other (the audit log) use it.
    /// A store that one process owns writes (that process orders its own
    /// appends); one that several nodes share checks in the same transaction.
    fn insert_record_if_absent(&self, change: &RecordChange) -> Result<bool, StoreError> {
        self.write_records(std::slice::from_ref(change))?;
        Ok(true)
    }

    /// Writes `change` only if the stored record still holds `expected`;
    /// false if it changed meanwhile (another node wrote it). A store that
    /// one process owns writes: that process holds the latest copy.
    fn replace_record_if(
        &self,
        change: &RecordChange,
        expected: &[u8],
    ) -> Result<bool, StoreError> {
        let _ = expected;
        self.write_records(std::slice::from_ref(change))?;
        Ok(true)
    }

    /// Record changes other nodes commit to a store they share with this
    /// one, for the layers that keep records in memory (keys, devices,
    /// registrations). `None` when no other node shares the store.
    fn followed_records(&self) -> Option<tokio::sync::broadcast::Receiver<RecordBatch>> {
        None
    }
}

/// Record changes that arrived together.
pub type RecordBatch = Arc<Vec<RecordChange>>;

/// Follows record changes of other nodes in the background (needs a Tokio
/// runtime): `take` gets each batch, or `None` after some were missed (its
/// layer should then read what it keeps again), and answers false once its
/// layer is gone.
pub fn follow_records<F, Fut>(
    mut changes: tokio::sync::broadcast::Receiver<RecordBatch>,
    mut take: F,
) where
    F: FnMut(Option<RecordBatch>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    use tokio::sync::broadcast::error::RecvError;
    tokio::spawn(async move {
        loop {
            let batch = match changes.recv().await {
                Ok(batch) => Some(batch),
                Err(RecvError::Lagged(_)) => None,
                Err(RecvError::Closed) => break,
            };
            if !take(batch).await {
                break;
            }
        }
    });
}

/// One page of a query's results, in entity id order.
#[derive(Debug, Default)]
pub struct QueryPage {
    pub entities: Vec<Arc<Entity>>,
    /// The number of matching entities, when it was asked for.
    pub total: Option<usize>,
}

/// A committed change of one entity, as the change feed carries it.
#[derive(Clone, Debug)]
pub struct EntityChange {
    pub tenant: Arc<str>,
    pub id: Arc<str>,
    /// The entity after the change; `None` when it was deleted.
    pub entity: Option<Arc<Entity>>,
}

/// The changes of one committed write group, in commit order. The feed
/// carries groups, not single changes, so that its buffer is counted in
/// commits: one large batch can never overflow it by itself.
pub type ChangeBatch = Arc<Vec<EntityChange>>;

/// A box in longitude/latitude degrees: `[min_lon, min_lat, max_lon, max_lat]`.
pub type GeoBox = [f64; 4];

/// The current state of every tenant's entities.
///
/// Writes are sequences of [`EntityOp`]s applied in order; each operation
/// succeeds or fails on its own (batch semantics), and the future resolves only
/// once every successful change is durable. Reads see only committed state.
pub trait EntityStore: Send + Sync + 'static {
    /// The committed state of one entity.
    fn get(&self, tenant: &str, id: &str) -> Option<Arc<Entity>>;

    /// Whether a tenant has ever been written to (the default tenant always exists).
    fn tenant_exists(&self, tenant: &str) -> bool;

    /// Every tenant that exists, the default one included.
    fn tenants(&self) -> Vec<String>;

    /// The number of entities of a tenant.
    fn entity_count(&self, tenant: &str) -> usize;

    /// Visits the committed entities of a tenant in no set order until `visit` returns false.
    fn scan(&self, tenant: &str, visit: &mut dyn FnMut(&Arc<Entity>) -> bool);

    /// Visits the entities of a tenant that have a `geoproperty` (expanded name)
    /// whose bounding box intersects `bbox`, with the centre of that bounding box,
    /// in no set order, until `visit` returns false. An entity with several
    /// instances of the GeoProperty is visited once per instance.
    fn within_box(
        &self,
        tenant: &str,
        geoproperty: &str,
        bbox: GeoBox,
        visit: &mut dyn FnMut(&Arc<Entity>, [f64; 2]) -> bool,
    );

    /// The change feed: every entity change, in commit order, one batch per
    /// committed group, published once it is committed and visible to
    /// readers. A receiver that falls behind loses the oldest batches
    /// (`RecvError::Lagged`); it never slows the writer.
    fn changes(&self) -> tokio::sync::broadcast::Receiver<ChangeBatch>;

    /// The entities matching `query`, ordered by id, skipping `offset` and
    /// returning at most `limit`; with `count`, also the total number of matches.
    /// Must return exactly what filtering every entity with `EntityQuery::matches` would.
    fn query(
        &self,
        tenant: &str,
        query: &EntityQuery,
        offset: usize,
        limit: usize,
        count: bool,
    ) -> QueryPage;

    /// Entity types (expanded) with the number of entities of each.
    fn type_counts(&self, tenant: &str) -> Vec<(String, usize)>;

    /// Attribute names (expanded) with the number of entities that have each.
    fn attribute_counts(&self, tenant: &str) -> Vec<(String, usize)>;

    /// Applies `ops` to `tenant` (creating the tenant when a change is made)
    /// and makes the result durable before resolving. Writes are applied in
    /// the order their futures are first polled: a caller may keep several
    /// in flight (polling each once before making the next) and still have
    /// them applied in order.
    fn write(
        &self,
        tenant: &str,
        ops: Vec<EntityOp>,
    ) -> BoxFuture<'static, Result<WriteResults, StoreError>>;

    /// [`EntityStore::write`], and with each operation that succeeds, the
    /// record changes `linked` to it (by operation index) in the same
    /// transaction: a command set through NGSI-LD and the write that set it
    /// are committed together or not at all.
    fn write_linked(
        &self,
        tenant: &str,
        ops: Vec<EntityOp>,
        linked: Vec<(usize, RecordChange)>,
    ) -> BoxFuture<'static, Result<WriteResults, StoreError>>;

    /// Stores a hosted `@context` document (clause 5.13) durably under its local id.
    /// Blocking: call it off the async executor.
    fn put_context(&self, id: &str, doc: &[u8]) -> Result<(), StoreError>;

    /// Deletes a hosted `@context` document; true if it existed. Blocking.
    fn delete_context(&self, id: &str) -> Result<bool, StoreError>;

    /// Every hosted `@context` document, by local id.
    fn contexts(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Creates or replaces a subscription durably, if what is stored is what
    /// `expect` says; answers false (and writes nothing) when it is not.
    /// Changes committed after this resolves are matched against it.
    fn put_subscription(
        &self,
        tenant: &str,
        record: SubscriptionRecord,
        expect: Expect,
    ) -> BoxFuture<'static, Result<bool, StoreError>>;

    /// Deletes a subscription; true if it existed. Notices already in the
    /// outbox for it are not delivered: the notifier drops them.
    fn delete_subscription(
        &self,
        tenant: &str,
        id: &str,
    ) -> BoxFuture<'static, Result<bool, StoreError>>;

    /// One subscription.
    fn subscription(&self, tenant: &str, id: &str) -> Option<Arc<CompiledSubscription>>;

    /// A tenant's subscriptions, ordered by id.
    fn subscriptions(&self, tenant: &str) -> Vec<Arc<CompiledSubscription>>;

    /// Every tenant's subscriptions (for periodic notifications).
    fn all_subscriptions(&self) -> Vec<(String, Arc<CompiledSubscription>)>;

    /// Notices not yet delivered with a sequence number above `after`, oldest first.
    fn pending_notices(&self, after: u64, limit: usize) -> Result<Vec<(u64, Notice)>, StoreError>;

    /// Removes delivered notices; with `dead`, keeps those (with the last
    /// error) in the dead-letter table instead.
    fn notices_done(
        &self,
        notices: Vec<(u64, Notice)>,
        dead: Option<String>,
    ) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Dead-lettered notices of a subscription, with their last error.
    fn dead_letters(&self, tenant: &str, id: &str) -> Result<Vec<(Notice, String)>, StoreError>;

    /// The sequence number of the newest notice; changes when notices are written.
    fn notice_watch(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Records a delivery attempt's outcome in the subscription's statistics.
    fn record_delivery(&self, tenant: &str, id: &str, notices: u64, at: i64, error: Option<String>);

    /// A subscription's delivery statistics.
    fn stats(&self, tenant: &str, id: &str) -> Stats;

    /// The history of one entity (`None` if it has none). Every change made
    /// through [`EntityStore::write`] records the attribute instances it wrote
    /// in the same durable write. Blocking: call it off the async executor.
    fn history(
        &self,
        tenant: &str,
        id: &str,
        request: &HistoryRequest,
    ) -> Result<Option<EntityHistory>, StoreError>;

    /// Entities that have history (id, types), ordered by id; with `types`,
    /// only those of one of them. Blocking.
    fn history_entities(
        &self,
        tenant: &str,
        types: Option<&[String]>,
    ) -> Result<Vec<(String, Vec<String>)>, StoreError>;

    /// Applies a temporal API write, durably, ordered with other writes.
    fn write_history(
        &self,
        tenant: &str,
        op: HistoryOp,
    ) -> BoxFuture<'static, Result<HistoryOutcome, StoreError>>;

    /// Stores a batch of historic points durably (the bulk path).
    fn import_history(
        &self,
        tenant: &str,
        series: Vec<ImportSeries>,
    ) -> BoxFuture<'static, Result<ImportCounts, StoreError>>;

    /// Sets a tenant's history retention durably.
    fn set_retention(
        &self,
        tenant: &str,
        retention: Retention,
    ) -> BoxFuture<'static, Result<(), StoreError>>;

    /// A tenant's history retention.
    fn retention(&self, tenant: &str) -> Result<Retention, StoreError>;

    /// Runs history maintenance now (sealing, retention); answers the number
    /// of instances retention removed. It also runs periodically by itself.
    fn maintain_history(&self) -> BoxFuture<'static, Result<u64, StoreError>>;

    /// The state of the write path: whether writes commit, and the last failure if not.
    fn health(&self) -> StoreHealth;

    /// Whether this node holds the lease `name` now, taking it (for `ttl`)
    /// if nobody else does. Periodic work that must run once among several
    /// nodes sharing a store runs only where the lease is held; a single
    /// node always holds it. Blocks: run it off the async executor.
    fn lease(&self, name: &str, ttl: std::time::Duration) -> Result<bool, StoreError> {
        let _ = (name, ttl);
        Ok(true)
    }

    /// Finishes every write already accepted and flushes the store.
    fn close(&self) -> BoxFuture<'static, Result<(), StoreError>>;
}
