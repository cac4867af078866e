//! The engine: what every Borough store does whatever keeps its bytes.
//!
//! One writer thread takes writes in groups, applies them to the latest state
//! (`borough_core::ops::apply`), works out the history they make and the
//! notices they trigger, and hands the whole group to a [`Backend`] to commit
//! in one durable transaction. Only then does it publish the new state to the
//! in-memory indexes and the change feed, and answer the callers.
//!
//! The [`Backend`] is the storage seam: commit a write set, load what the
//! engine keeps in memory, read history and the outbox, keep records and
//! hosted contexts. The embedded redb engine (`borough-embedded`), the
//! PostgreSQL backend (`borough-postgres`) and [`memory::MemoryBackend`] (for
//! tests) implement it; all three pass the shared suite
//! (`borough_store::testsuite`).

use borough_core::Entity;
use borough_core::query::EntityQuery;
use borough_core::subscription::{CompiledSubscription, Stats, SubscriptionRecord};
use borough_core::temporal::{
    EntityHistory, HistoryOp, HistoryOutcome, HistoryRequest, ImportSeries, Retention,
};
use borough_core::validate::now_micros;
use borough_store::{
    Clock, DEFAULT_TENANT, EntityStore, ImportCounts, Notice, QueryPage, RecordChange, RecordKind,
    RecordStore, StoreError, StoreHealth, StoredRecord, WriterState,
};
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::{mpsc, oneshot};

mod feed;
pub mod memory;
mod state;
mod subscriptions;
pub mod temporal;
mod writer;

pub use subscriptions::DEFAULT_MAX_PENDING;

use state::{TenantLoader, TenantState};
use subscriptions::Registry;
use writer::{HistoryJob, Job, MetaOp, WriteJob};

/// The state of one entity in a group's write set: `None` means deleted.
pub type Staged = Option<Arc<Entity>>;

/// The attribute instances one change of an entity made, to be recorded in
/// the same transaction: (attribute index, instance index) into `entity.attrs`.
pub struct Recorded {
    pub tenant: String,
    pub entity: Arc<Entity>,
    pub instances: Vec<(usize, usize)>,
}

/// Everything one write group changes, committed by the backend in one
/// durable transaction.
pub struct WriteSet<'a> {
    /// (tenant, entity id) → the entity after the group, or `None` if deleted.
    pub entities: &'a HashMap<(String, String), Staged>,
    /// Tenants the group writes to first.
    pub new_tenants: &'a [String],
    /// Notices for the outbox, numbered from `first_notice` on.
    pub notices: &'a [Notice],
    pub first_notice: u64,
    /// History instances.
    pub history: &'a [Recorded],
    /// Management records linked to the group's operations (device commands).
    pub records: &'a [RecordChange],
}

impl WriteSet<'_> {
    /// True when the group changes nothing that must be stored.
    pub fn is_empty(&self) -> bool {
        self.entities.is_empty() && self.new_tenants.is_empty() && self.records.is_empty()
    }
}

/// How a backend's commit ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Committed {
    /// Durable; the group's notices got the numbers from `first_notice` on.
    Done { first_notice: u64 },
    /// Another node changed entities of the group after this node read them:
    /// nothing was written. The engine catches up ([`Backend::follow`]) and
    /// applies the group again.
    Stale,
}

/// What other nodes committed since this node last looked.
#[derive(Debug, Default)]
pub struct Followed {
    /// (tenant, entity id, the entity now; `None` if deleted).
    pub entities: Vec<(String, String, Option<Entity>)>,
    /// (tenant, subscription id, the subscription now; `None` if deleted).
    pub subscriptions: Vec<(String, String, Option<SubscriptionRecord>)>,
    /// Management records written or deleted.
    pub records: Vec<RecordChange>,
}

impl Followed {
    pub fn is_empty(&self) -> bool {
        self.entities.is_empty() && self.subscriptions.is_empty() && self.records.is_empty()
    }
}

/// The outbox as the engine finds it at start-up.
#[derive(Debug, Default)]
pub struct OutboxState {
    /// Notices waiting, per (tenant, subscription id).
    pub pending: HashMap<(String, String), u64>,
    /// The number the next notice gets: above every notice ever written,
    /// dead letters included.
    pub next_notice: u64,
}

/// Notices whose delivery ended: delivered, or given up with an error
/// (kept as dead letters).
#[derive(Clone, Copy, Debug)]
pub struct DoneNotices<'a> {
    pub notices: &'a [(u64, Notice)],
    pub dead: Option<&'a str>,
}

/// Receives the stored entities at start-up, from one thread, each with its
/// spare capacity released (`Entity::shrink_to_fit`): a backend does that
/// where it parses, on as many threads as it likes.
pub type EntitySink<'a> = dyn FnMut(String, String, Entity) + Send + 'a;

/// What a storage backend does for the engine.
///
/// Methods marked *writer* are called only from the engine's writer thread,
/// one at a time, in the order of the writes; each is durable when it returns
/// `Ok`, and changes nothing when it returns `Err`. The others may be called
/// from any thread at any time and block: callers run them off async workers.
pub trait Backend: RecordStore {
    /// Hands every stored entity to `sink`; returns the names of the tenants
    /// written to (some may hold no entity).
    fn load_entities(&self, sink: &mut EntitySink<'_>) -> Result<Vec<String>, StoreError>;

    /// Every stored subscription, with its tenant.
    fn load_subscriptions(&self) -> Result<Vec<(String, SubscriptionRecord)>, StoreError>;

    /// What the outbox holds.
    fn load_outbox(&self) -> Result<OutboxState, StoreError>;

    /// *Writer*: commits one group in one durable transaction. A backend
    /// that other nodes share answers [`Committed::Stale`] when they changed
    /// one of the group's entities since this node read it.
    fn commit(&self, set: &WriteSet<'_>) -> Result<Committed, StoreError>;

    /// Whether other nodes may commit to the same storage. The engine then
    /// follows their changes (every [`FOLLOW_EVERY`], and before applying a
    /// stale group again).
    fn shared(&self) -> bool {
        false
    }

    /// *Writer*: what other nodes committed since the last call (or since
    /// the load), in commit order.
    fn follow(&self) -> Result<Followed, StoreError> {
        Ok(Followed::default())
    }

    /// *Writer*: the engine gave up on a group it was told was stale (it
    /// lost too many races, or could not catch up): whatever the backend
    /// kept for its next try is let go.
    fn abandon_stale(&self) {}

    /// *Writer*: stores a subscription (new or replacing the stored one).
    fn put_subscription(&self, tenant: &str, record: &SubscriptionRecord)
    -> Result<(), StoreError>;

    /// *Writer*: removes a subscription; false if it was not there.
    fn delete_subscription(&self, tenant: &str, id: &str) -> Result<bool, StoreError>;

    /// *Writer*: removes delivered notices from the outbox in one transaction;
    /// those given with an error are kept as dead letters with it. Forgetting
    /// a delivered notice need not wait for the disk (delivery is at least
    /// once); a dead letter must be durable.
    fn notices_done(&self, done: &[DoneNotices<'_>]) -> Result<(), StoreError>;

    /// *Writer*: one change to history alone (temporal API). `new_tenant`
    /// says the tenant holds nothing yet: it exists once history is created.
    fn write_history(
        &self,
        tenant: &str,
        op: HistoryOp,
        now: i64,
        new_tenant: bool,
    ) -> Result<HistoryOutcome, StoreError>;

    /// *Writer*: imports series of instances into history.
    fn import_history(
        &self,
        tenant: &str,
        series: Vec<ImportSeries>,
        now: i64,
        new_tenant: bool,
    ) -> Result<ImportCounts, StoreError>;

    /// *Writer*: sets a tenant's history retention.
    fn set_retention(&self, tenant: &str, retention: &Retention) -> Result<(), StoreError>;

    /// *Writer*: compacts history and applies retention; returns the number of
    /// instances removed.
    fn maintain_history(&self, now: i64) -> Result<u64, StoreError>;

    /// *Writer*: called before every job. After a failed transaction a backend
    /// may need to reconnect or reopen; `Err` while it cannot (the job is
    /// refused with it).
    fn ready(&self) -> Result<(), StoreError>;

    /// *Writer*: reads the backend's own writer state again from storage,
    /// after a panic in the middle of a job left it unknown.
    fn reset(&self) -> Result<(), StoreError>;

    /// The oldest `limit` notices of the outbox numbered above `after`.
    fn pending_notices(&self, after: u64, limit: usize) -> Result<Vec<(u64, Notice)>, StoreError>;

    /// Dead-lettered notices of one subscription, with their errors.
    fn dead_letters(&self, tenant: &str, id: &str) -> Result<Vec<(Notice, String)>, StoreError>;

    /// The history of one entity, or `None` if it has none.
    fn history(
        &self,
        tenant: &str,
        id: &str,
        request: &HistoryRequest,
    ) -> Result<Option<EntityHistory>, StoreError>;

    /// Entities with history (and their types), optionally of some types.
    fn history_entities(
        &self,
        tenant: &str,
        types: Option<&[String]>,
    ) -> Result<Vec<(String, Vec<String>)>, StoreError>;

    /// A tenant's history retention.
    fn retention(&self, tenant: &str) -> Result<Retention, StoreError>;

    /// Stores a hosted @context document, durably.
    fn put_context(&self, id: &str, doc: &[u8]) -> Result<(), StoreError>;

    /// Removes a hosted @context document; false if it was not there.
    fn delete_context(&self, id: &str) -> Result<bool, StoreError>;

    /// Every hosted @context document.
    fn contexts(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Whether this node holds the lease `name` (see `EntityStore::lease`).
    fn lease(&self, name: &str, ttl: std::time::Duration) -> Result<bool, StoreError> {
        let _ = (name, ttl);
        Ok(true)
    }
}

/// Settings of the engine.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Most notices pending per subscription; further ones are dropped and
    /// counted in its statistics, so a dead receiver cannot fill the disk.
    pub max_pending_notices: u64,
    /// The time of writes (write times, expiry, retention).
    pub clock: Arc<dyn Clock>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_pending_notices: DEFAULT_MAX_PENDING,
            clock: Arc::new(borough_store::SystemClock),
        }
    }
}

/// How often a node asks a shared backend for what other nodes committed.
pub const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// Writes that may wait for the writer before callers are made to wait.
const QUEUE_DEPTH: usize = 4096;

type TenantMap = RwLock<TenantState>;

/// Record batches kept for layers that follow them and are behind.
const RECORD_FEED_CAPACITY: usize = 1024;

/// What the writer and readers share.
struct Shared {
    tenants: RwLock<HashMap<String, Arc<TenantMap>>>,
    subscriptions: Registry,
    feed: feed::Feed,
    /// Records other nodes committed, for the layers that cache them.
    records: tokio::sync::broadcast::Sender<borough_store::RecordBatch>,
    health: Mutex<StoreHealth>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            tenants: RwLock::default(),
            subscriptions: Registry::default(),
            feed: feed::Feed::default(),
            records: tokio::sync::broadcast::channel(RECORD_FEED_CAPACITY).0,
            health: Mutex::default(),
        }
    }
}

impl Shared {
    fn set_health(&self, writer: WriterState, error: Option<String>) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if writer == WriterState::Ok {
            *h = StoreHealth::default();
            return;
        }
        let since = if h.writer == writer {
            h.since
        } else {
            Some(now_micros())
        };
        *h = StoreHealth {
            writer,
            error,
            since,
        };
    }

    fn tenant(&self, tenant: &str) -> Option<Arc<TenantMap>> {
        self.tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
            .cloned()
    }

    fn tenant_or_create(&self, tenant: &str) -> Arc<TenantMap> {
        if let Some(t) = self.tenant(tenant) {
            return t;
        }
        self.tenants
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tenant.to_string())
            .or_default()
            .clone()
    }

    /// Loads every stored entity into memory, replacing what was there.
    fn load_entities<B: Backend>(&self, backend: &B) -> Result<(), StoreError> {
        let mut loaders: HashMap<String, TenantLoader> = HashMap::new();
        let names = backend.load_entities(&mut |tenant, id, entity| {
            let loader = match loaders.get_mut(&tenant) {
                Some(l) => l,
                None => loaders.entry(tenant).or_default(),
            };
            loader.add(&id, Arc::new(entity));
        })?;
        let mut maps = self.tenants.write().unwrap_or_else(|e| e.into_inner());
        maps.clear();
        for (tenant, loader) in loaders {
            maps.insert(tenant, Arc::new(RwLock::new(loader.finish())));
        }
        for name in names {
            maps.entry(name).or_default();
        }
        maps.entry(DEFAULT_TENANT.to_string()).or_default();
        Ok(())
    }
}

/// A store: the engine over a backend. Cheap to share behind an `Arc`.
pub struct Engine<B: Backend> {
    backend: Arc<B>,
    shared: Arc<Shared>,
    sender: mpsc::Sender<Job>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl<B: Backend> Engine<B> {
    /// Loads what the engine keeps in memory from `backend` and starts the
    /// writer thread.
    pub fn start(backend: B, options: EngineOptions) -> Result<Self, StoreError> {
        let backend = Arc::new(backend);
        let shared = Arc::new(Shared {
            subscriptions: Registry::new(options.max_pending_notices),
            ..Shared::default()
        });
        shared.load_entities(backend.as_ref())?;
        let now = options.clock.now_micros();
        for (tenant, record) in backend.load_subscriptions()? {
            shared.subscriptions.load(&tenant, record, now);
        }
        let outbox = backend.load_outbox()?;
        for ((tenant, id), n) in &outbox.pending {
            shared
                .subscriptions
                .pending(tenant, id, i64::try_from(*n).unwrap_or(i64::MAX));
        }
        let next_notice = outbox.next_notice.max(1);
        shared.subscriptions.watch.send_replace(next_notice - 1);
        let (sender, receiver) = mpsc::channel(QUEUE_DEPTH);
        let writer = writer::spawn(
            receiver,
            sender.clone(),
            writer::Writer {
                backend: backend.clone(),
                shared: shared.clone(),
                clock: options.clock,
                next_notice,
                follow_failing: false,
                follow_queued: Arc::default(),
            },
        )?;
        Ok(Self {
            backend,
            shared,
            sender,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// The backend, for what only it knows (its format, its files).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Sends a job to the writer thread and waits for its answer.
    fn job<T: Send + 'static>(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Job,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let sender = self.sender.clone();
        let (reply, answer) = oneshot::channel();
        let job = job(reply);
        Box::pin(async move {
            sender.send(job).await.map_err(|_| StoreError::Closed)?;
            answer.await.map_err(|_| writer::dropped_answer(&sender))?
        })
    }
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

impl<B: Backend> EntityStore for Engine<B> {
    fn get(&self, tenant: &str, id: &str) -> Option<Arc<Entity>> {
        let map = self.shared.tenant(tenant)?;
        let map = map.read().unwrap_or_else(|e| e.into_inner());
        map.get(id).cloned()
    }

    fn tenant_exists(&self, tenant: &str) -> bool {
        tenant == DEFAULT_TENANT || self.shared.tenant(tenant).is_some()
    }

    fn tenants(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .shared
            .tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    fn entity_count(&self, tenant: &str) -> usize {
        self.shared
            .tenant(tenant)
            .map_or(0, |m| m.read().unwrap_or_else(|e| e.into_inner()).len())
    }

    fn scan(&self, tenant: &str, visit: &mut dyn FnMut(&Arc<Entity>) -> bool) {
        let Some(map) = self.shared.tenant(tenant) else {
            return;
        };
        let map = map.read().unwrap_or_else(|e| e.into_inner());
        for e in map.entities() {
            if !visit(e) {
                break;
            }
        }
    }

    fn within_box(
        &self,
        tenant: &str,
        geoproperty: &str,
        bbox: borough_store::GeoBox,
        visit: &mut dyn FnMut(&Arc<Entity>, [f64; 2]) -> bool,
    ) {
        if let Some(map) = self.shared.tenant(tenant) {
            let map = map.read().unwrap_or_else(|e| e.into_inner());
            map.within_box(geoproperty, bbox, visit);
        }
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<borough_store::ChangeBatch> {
        self.shared.feed.subscribe()
    }

    fn query(
        &self,
        tenant: &str,
        query: &EntityQuery,
        offset: usize,
        limit: usize,
        count: bool,
    ) -> QueryPage {
        match self.shared.tenant(tenant) {
            Some(map) => map
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .query(query, offset, limit, count),
            None => QueryPage {
                entities: Vec::new(),
                total: count.then_some(0),
            },
        }
    }

    fn type_counts(&self, tenant: &str) -> Vec<(String, usize)> {
        self.shared.tenant(tenant).map_or_else(Vec::new, |m| {
            let m = m.read().unwrap_or_else(|e| e.into_inner());
            m.type_counts().map(|(t, n)| (t.clone(), n)).collect()
        })
    }

    fn attribute_counts(&self, tenant: &str) -> Vec<(String, usize)> {
        self.shared.tenant(tenant).map_or_else(Vec::new, |m| {
            let m = m.read().unwrap_or_else(|e| e.into_inner());
            m.attribute_counts().map(|(a, n)| (a.clone(), n)).collect()
        })
    }

    fn write(
        &self,
        tenant: &str,
        ops: Vec<borough_core::EntityOp>,
    ) -> BoxFuture<'static, Result<borough_store::WriteResults, StoreError>> {
        self.write_linked(tenant, ops, Vec::new())
    }

    fn write_linked(
        &self,
        tenant: &str,
        ops: Vec<borough_core::EntityOp>,
        linked: Vec<(usize, RecordChange)>,
    ) -> BoxFuture<'static, Result<borough_store::WriteResults, StoreError>> {
        let tenant = tenant.to_string();
        self.job(|reply| {
            Job::Write(WriteJob {
                tenant,
                ops,
                linked,
                reply,
            })
        })
    }

    fn put_context(&self, id: &str, doc: &[u8]) -> Result<(), StoreError> {
        self.backend.put_context(id, doc)
    }

    fn delete_context(&self, id: &str) -> Result<bool, StoreError> {
        self.backend.delete_context(id)
    }

    fn contexts(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.backend.contexts()
    }

    fn put_subscription(
        &self,
        tenant: &str,
        record: SubscriptionRecord,
        expect: borough_store::Expect,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        let op = MetaOp::PutSubscription(tenant.to_string(), Box::new(record), expect);
        self.job(|reply| Job::Meta(op, reply))
    }

    fn delete_subscription(
        &self,
        tenant: &str,
        id: &str,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        let op = MetaOp::DeleteSubscription(tenant.to_string(), id.to_string());
        self.job(|reply| Job::Meta(op, reply))
    }

    fn subscription(&self, tenant: &str, id: &str) -> Option<Arc<CompiledSubscription>> {
        self.shared
            .subscriptions
            .tenant(tenant)?
            .by_id
            .get(id)
            .cloned()
    }

    fn subscriptions(&self, tenant: &str) -> Vec<Arc<CompiledSubscription>> {
        self.shared
            .subscriptions
            .tenant(tenant)
            .map(|t| t.by_id.values().cloned().collect())
            .unwrap_or_default()
    }

    fn all_subscriptions(&self) -> Vec<(String, Arc<CompiledSubscription>)> {
        self.shared.subscriptions.all()
    }

    fn pending_notices(&self, after: u64, limit: usize) -> Result<Vec<(u64, Notice)>, StoreError> {
        self.backend.pending_notices(after, limit)
    }

    fn notices_done(
        &self,
        done: Vec<(u64, Notice)>,
        dead: Option<String>,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let op = MetaOp::NoticesDone(done, dead);
        let answer = self.job(|reply| Job::Meta(op, reply));
        Box::pin(async move { answer.await.map(|_| ()) })
    }

    fn dead_letters(&self, tenant: &str, id: &str) -> Result<Vec<(Notice, String)>, StoreError> {
        self.backend.dead_letters(tenant, id)
    }

    fn notice_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.subscriptions.watch.subscribe()
    }

    fn record_delivery(
        &self,
        tenant: &str,
        id: &str,
        notices: u64,
        at: i64,
        error: Option<String>,
    ) {
        self.shared
            .subscriptions
            .record_delivery(tenant, id, notices, at, error);
    }

    fn stats(&self, tenant: &str, id: &str) -> Stats {
        self.shared.subscriptions.stats(tenant, id)
    }

    fn history(
        &self,
        tenant: &str,
        id: &str,
        request: &HistoryRequest,
    ) -> Result<Option<EntityHistory>, StoreError> {
        self.backend.history(tenant, id, request)
    }

    fn history_entities(
        &self,
        tenant: &str,
        types: Option<&[String]>,
    ) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        self.backend.history_entities(tenant, types)
    }

    fn write_history(
        &self,
        tenant: &str,
        op: HistoryOp,
    ) -> BoxFuture<'static, Result<HistoryOutcome, StoreError>> {
        let tenant = tenant.to_string();
        self.job(|reply| Job::History(HistoryJob::Op(tenant, op, reply)))
    }

    fn import_history(
        &self,
        tenant: &str,
        series: Vec<ImportSeries>,
    ) -> BoxFuture<'static, Result<ImportCounts, StoreError>> {
        let tenant = tenant.to_string();
        self.job(|reply| Job::History(HistoryJob::Import(tenant, series, reply)))
    }

    fn set_retention(
        &self,
        tenant: &str,
        retention: Retention,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let tenant = tenant.to_string();
        self.job(|reply| Job::History(HistoryJob::SetRetention(tenant, retention, reply)))
    }

    fn retention(&self, tenant: &str) -> Result<Retention, StoreError> {
        self.backend.retention(tenant)
    }

    fn maintain_history(&self) -> BoxFuture<'static, Result<u64, StoreError>> {
        self.job(|reply| Job::History(HistoryJob::Maintain(reply)))
    }

    fn lease(&self, name: &str, ttl: std::time::Duration) -> Result<bool, StoreError> {
        self.backend.lease(name, ttl)
    }

    fn health(&self) -> StoreHealth {
        if self.sender.is_closed() {
            return StoreHealth {
                writer: WriterState::Stopped,
                error: Some("the store's writer is not running".into()),
                since: None,
            };
        }
        self.shared
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn close(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        let sender = self.sender.clone();
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            if sender.send(Job::Close(reply)).await.is_ok() {
                answer.await.map_err(|_| StoreError::Closed)??;
            }
            if let Some(handle) = writer {
                tokio::task::spawn_blocking(move || handle.join())
                    .await
                    .map_err(io)?
                    .map_err(|_| io("the writer thread panicked"))?;
            }
            Ok(())
        })
    }
}

/// Records pass straight to the backend: they never wait behind the writer.
impl<B: Backend> RecordStore for Engine<B> {
    fn write_records(&self, changes: &[RecordChange]) -> Result<(), StoreError> {
        self.backend.write_records(changes)
    }

    fn records(&self, kind: RecordKind) -> Result<Vec<StoredRecord>, StoreError> {
        self.backend.records(kind)
    }

    fn records_page(
        &self,
        kind: RecordKind,
        tenant: &str,
        after: Option<&str>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        self.backend
            .records_page(kind, tenant, after, limit, reverse)
    }

    fn insert_record_if_absent(&self, change: &RecordChange) -> Result<bool, StoreError> {
        self.backend.insert_record_if_absent(change)
    }

    fn replace_record_if(
        &self,
        change: &RecordChange,
        expected: &[u8],
    ) -> Result<bool, StoreError> {
        self.backend.replace_record_if(change, expected)
    }

    fn followed_records(
        &self,
    ) -> Option<tokio::sync::broadcast::Receiver<borough_store::RecordBatch>> {
        self.backend
            .shared()
            .then(|| self.shared.records.subscribe())
    }
}

impl<B: Backend> Drop for Engine<B> {
    fn drop(&mut self) {
        // Ask the writer to finish what it has; the backend closes when it exits.
        let _ = self.sender.try_send(Job::Close(oneshot::channel().0));
    }
}
