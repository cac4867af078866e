//! The embedded storage engine: one redb file on disk, the current state of
//! every entity in memory, and a single writer thread that commits writes in
//! groups.
//!
//! Invariants:
//! - The redb file is the truth; the in-memory maps are rebuilt from it at open.
//! - Only the writer thread changes state. It applies each operation to the
//!   latest state (committed, or staged earlier in the same group), so
//!   concurrent read-modify-write requests never lose an update.
//! - A write's future resolves only after the transaction that holds it has
//!   been committed with `Durability::Immediate` (fsync), and readers see a
//!   change only after that commit.

use borough_core::ops::{Change, apply};
use borough_core::query::EntityQuery;
use borough_core::validate::now_micros;
use borough_core::{Entity, EntityOp};
use borough_store::{
    DEFAULT_TENANT, EntityStore, QueryPage, StoreError, StoreHealth, WriteResults, WriterState,
};
use futures_util::future::BoxFuture;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use state::TenantState;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use tokio::sync::{mpsc, oneshot};

mod chunk;
mod devices;
mod faults;
mod feed;
mod history;
mod hotlog;
mod notices;
mod series;
mod state;

use borough_core::subscription::{CompiledSubscription, Stats, SubscriptionRecord};
use borough_core::temporal::{
    EntityHistory, HistoryOp, HistoryOutcome, HistoryRequest, ImportSeries, Retention,
};
use borough_store::{ImportCounts, Notice};
use history::{History, Recorded};
use notices::{MetaOp, Registry};

pub use faults::Faults;

/// (tenant, entity id) → the entity, serialized.
const ENTITIES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("entities");
/// Tenants that have been written to.
const TENANTS: TableDefinition<&str, ()> = TableDefinition::new("tenants");
/// Hosted @context documents by local id.
const CONTEXTS: TableDefinition<&str, &[u8]> = TableDefinition::new("contexts");

/// ("format") → the version of the on-disk layout.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The on-disk layout this build reads and writes. A file of an older format
/// is upgraded in place when opened; a newer one is refused, untouched.
///
/// - 1: the first layout, before the version was recorded.
/// - 2: the same tables, with the version recorded in `meta`.
/// - 3: new history instances are appended to a log (`history_log`,
///   `history_log_moved`); the hot rows of format 2 stay valid as they are.
pub const FORMAT_VERSION: u64 = 3;

/// redb's page cache.
const REDB_CACHE_BYTES: usize = 64 << 20;
/// Most operations committed in one transaction; a larger backlog waits for the next.
const MAX_GROUP_OPS: usize = 20_000;
/// Writes that may wait for the writer before callers are made to wait.
const QUEUE_DEPTH: usize = 4096;

type TenantMap = RwLock<TenantState>;

/// Settings of the embedded store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Most notices pending per subscription; further ones are dropped and
    /// counted in its statistics, so a dead receiver cannot fill the disk.
    pub max_pending_notices: u64,
    /// Faults to inject, for tests of failure handling.
    pub faults: Option<Arc<Faults>>,
    /// The time of writes (write times, expiry, retention).
    pub clock: Arc<dyn borough_store::Clock>,
    /// Instances the history log keeps before the series holding its oldest
    /// rows leave it (sealed, or moved to rows keyed by series).
    pub history_log_window: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_pending_notices: notices::DEFAULT_MAX_PENDING,
            faults: None,
            clock: Arc::new(borough_store::SystemClock),
            history_log_window: hotlog::DEFAULT_WINDOW,
        }
    }
}

/// The open database. After a storage error redb refuses every transaction
/// ("Previous I/O error") until the database is closed and opened again, so
/// the writer closes it on a failed commit and opens it before its next job;
/// meanwhile readers get a clear error instead of a stale handle.
struct DbHandle {
    path: PathBuf,
    faults: Option<Arc<Faults>>,
    current: RwLock<Option<Arc<Database>>>,
    /// The database closed after an error, until its last reader lets go.
    closed: Mutex<Option<Weak<Database>>>,
}

/// How long the writer waits for readers of a closed database to finish.
const REOPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl DbHandle {
    fn open(path: PathBuf, faults: Option<Arc<Faults>>) -> Result<Self, StoreError> {
        let db = open_database(&path, faults.as_ref())?;
        Ok(Self {
            path,
            faults,
            current: RwLock::new(Some(Arc::new(db))),
            closed: Mutex::new(None),
        })
    }

    /// The database, for one read or write.
    fn get(&self) -> Result<Arc<Database>, StoreError> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                StoreError::Io("the storage is being reopened after an error; try again".into())
            })
    }

    /// Closes the database after a storage error.
    fn close_after_error(&self) {
        let old = self
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(old) = old {
            *self.closed.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::downgrade(&old));
        }
    }

    /// Opens the database again once the readers of the closed one are done.
    fn reopen(&self) -> Result<Arc<Database>, StoreError> {
        if let Some(db) = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(db);
        }
        let closed = self
            .closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(closed) = closed {
            let started = std::time::Instant::now();
            while closed.strong_count() > 0 {
                if started.elapsed() > REOPEN_WAIT {
                    return Err(StoreError::Io(
                        "the storage cannot be reopened: a reader still holds it".into(),
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        let db = Arc::new(open_database(&self.path, self.faults.as_ref())?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(db.clone());
        *self.closed.lock().unwrap_or_else(|e| e.into_inner()) = None;
        tracing::warn!(path = %self.path.display(), "storage reopened after an error");
        Ok(db)
    }
}

fn open_database(path: &Path, faults: Option<&Arc<Faults>>) -> Result<Database, StoreError> {
    let builder = {
        let mut b = Database::builder();
        // The entities live in memory already; redb's page cache only
        // needs the B-tree's upper levels and the pages being written.
        b.set_cache_size(REDB_CACHE_BYTES);
        b
    };
    let opened = match faults {
        Some(f) => {
            let file = faults::FaultyFile::open(path, f.clone())
                .map_err(|e| io(format!("cannot open {}: {e}", path.display())))?;
            builder.create_with_backend(file)
        }
        None => builder.create(path),
    };
    opened.map_err(|e| io(format!("cannot open {}: {e}", path.display())))
}

#[derive(Default)]
struct Shared {
    tenants: RwLock<HashMap<String, Arc<TenantMap>>>,
    subscriptions: Registry,
    feed: feed::Feed,
    health: Mutex<StoreHealth>,
    /// The history log's live rows, for the writer and readers.
    history_log: Arc<hotlog::LogIndex>,
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
}

struct WriteJob {
    tenant: String,
    ops: Vec<EntityOp>,
    /// Record changes committed with the operation of their index, if it succeeds.
    linked: Vec<(usize, borough_store::RecordChange)>,
    reply: oneshot::Sender<Result<WriteResults, StoreError>>,
}

/// One write of a group, as the writer applies it.
type GroupWrite = (
    String,
    Vec<EntityOp>,
    Vec<(usize, borough_store::RecordChange)>,
);

/// A change to history alone, ordered with the writes.
enum HistoryJob {
    Op(
        String,
        HistoryOp,
        oneshot::Sender<Result<HistoryOutcome, StoreError>>,
    ),
    Import(
        String,
        Vec<ImportSeries>,
        oneshot::Sender<Result<ImportCounts, StoreError>>,
    ),
    SetRetention(String, Retention, oneshot::Sender<Result<(), StoreError>>),
    /// Seals old hot rows and applies retention; answers the instances removed.
    Maintain(oneshot::Sender<Result<u64, StoreError>>),
}

impl HistoryJob {
    /// Answers the job's caller with an error, the job not run.
    fn refuse(self, e: StoreError) {
        match self {
            HistoryJob::Op(_, _, reply) => drop(reply.send(Err(e))),
            HistoryJob::Import(_, _, reply) => drop(reply.send(Err(e))),
            HistoryJob::SetRetention(_, _, reply) => drop(reply.send(Err(e))),
            HistoryJob::Maintain(reply) => drop(reply.send(Err(e))),
        }
    }
}

enum Job {
    Write(WriteJob),
    Meta(MetaOp, oneshot::Sender<Result<bool, StoreError>>),
    History(HistoryJob),
    Close(oneshot::Sender<Result<(), StoreError>>),
}

/// The embedded store. Cheap to share behind an `Arc`.
pub struct EmbeddedStore {
    db: Arc<DbHandle>,
    shared: Arc<Shared>,
    sender: mpsc::Sender<Job>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, loading every entity into memory.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, StoreOptions::default())
    }

    /// Opens (or creates) the store in `dir` with `options`.
    pub fn open_with(dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| io(format!("cannot create {}: {e}", dir.display())))?;
        let handle = Arc::new(DbHandle::open(
            dir.join("borough.redb"),
            options.faults.clone(),
        )?);
        let db = handle.get()?;
        let shared = Arc::new(Shared {
            subscriptions: Registry::new(options.max_pending_notices),
            history_log: Arc::new(hotlog::LogIndex::new(options.history_log_window)),
            ..Shared::default()
        });
        prepare(&db)?;
        // History's writer state is read while the entities load.
        let (entities, history) = std::thread::scope(|scope| {
            let history = scope.spawn(|| History::load(&db, shared.history_log.clone()));
            (load(&db, &shared), history.join())
        });
        entities?;
        let history = history.map_err(|_| io("loading history failed: a thread panicked"))??;
        let next_notice = notices::load(&db, &shared.subscriptions, options.clock.now_micros())?;
        drop(db);
        let (sender, receiver) = mpsc::channel(QUEUE_DEPTH);
        let w = Writer {
            handle: handle.clone(),
            shared: shared.clone(),
            faults: options.faults,
            clock: options.clock,
            next_notice,
            history,
        };
        let writer = std::thread::Builder::new()
            .name("borough-writer".into())
            .spawn(move || run_writer(receiver, w))
            .map_err(io)?;
        spawn_maintenance(sender.clone())?;
        Ok(Self {
            db: handle,
            shared,
            sender,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// The version of the on-disk format of the open file.
    pub fn format_version(&self) -> Result<u64, StoreError> {
        let read = self.db.get()?.begin_read().map_err(io)?;
        let meta = read.open_table(META).map_err(io)?;
        Ok(meta.get("format").map_err(io)?.map_or(1, |v| v.value()))
    }

    /// Sends a history job to the writer thread and waits for its answer.
    fn history_job<T: Send + 'static>(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> HistoryJob,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let sender = self.sender.clone();
        let (reply, answer) = oneshot::channel();
        let job = job(reply);
        Box::pin(async move {
            sender
                .send(Job::History(job))
                .await
                .map_err(|_| StoreError::Closed)?;
            answer.await.map_err(|_| dropped_answer(&sender))?
        })
    }

    /// Sends a meta operation to the writer thread, so it is ordered with writes.
    fn meta(&self, op: MetaOp) -> BoxFuture<'static, Result<bool, StoreError>> {
        let sender = self.sender.clone();
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            sender
                .send(Job::Meta(op, reply))
                .await
                .map_err(|_| StoreError::Closed)?;
            answer.await.map_err(|_| dropped_answer(&sender))?
        })
    }
}

/// Checks the file's format and upgrades it to [`FORMAT_VERSION`].
fn upgrade(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let fresh = txn.list_tables().map_err(io)?.next().is_none();
    let mut meta = txn.open_table(META).map_err(io)?;
    let found = match meta.get("format").map_err(io)? {
        Some(v) => v.value(),
        // Files of format 1 have tables but no version.
        None if fresh => FORMAT_VERSION,
        None => 1,
    };
    if found > FORMAT_VERSION {
        return Err(io(format!(
            "the data is in format {found}, written by a newer Borough; this one reads formats up to \
             {FORMAT_VERSION}: run the newer version, or restore a backup"
        )));
    }
    // Each step converts one format to the next; 1 -> 2 only records the
    // version, 2 -> 3 adds tables, which `prepare` creates.
    if found < FORMAT_VERSION {
        tracing::info!(
            from = found,
            to = FORMAT_VERSION,
            "upgrading the data's on-disk format"
        );
    }
    meta.insert("format", FORMAT_VERSION).map_err(io)?;
    Ok(())
}

/// Checks the file's format and creates the tables on first open, so that
/// reads never miss them.
fn prepare(db: &Database) -> Result<(), StoreError> {
    let mut txn = db.begin_write().map_err(io)?;
    upgrade(&txn)?;
    txn.open_table(ENTITIES).map_err(io)?;
    txn.open_table(TENANTS).map_err(io)?;
    txn.open_table(CONTEXTS).map_err(io)?;
    txn.open_table(notices::SUBSCRIPTIONS).map_err(io)?;
    txn.open_table(notices::OUTBOX).map_err(io)?;
    txn.open_table(notices::DEAD_LETTERS).map_err(io)?;
    history::create_tables(&txn)?;
    devices::create_tables(&txn)?;
    txn.set_durability(redb::Durability::Immediate)
        .map_err(io)?;
    txn.commit().map_err(io)
}

/// Rows handed from the reader to the parsers at a time.
const LOAD_BATCH: usize = 2048;

/// Loads every entity into memory: one thread reads the rows, parsers turn
/// them into entities on every core, one thread indexes them per tenant.
/// Start-up time is mostly JSON parsing, which this spreads out.
fn load(db: &Database, shared: &Shared) -> Result<(), StoreError> {
    let read = db.begin_read().map_err(io)?;
    let mut names = Vec::new();
    for row in read.open_table(TENANTS).map_err(io)?.iter().map_err(io)? {
        names.push(row.map_err(io)?.0.value().to_string());
    }
    let entities = read.open_table(ENTITIES).map_err(io)?;
    let parsers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8));
    type Raw = Vec<(String, String, Vec<u8>)>;
    type Parsed = Result<Vec<(String, String, Entity)>, StoreError>;
    let (raw_tx, raw_rx) = std::sync::mpsc::sync_channel::<Raw>(parsers * 2);
    let raw_rx = Mutex::new(raw_rx);
    let (parsed_tx, parsed_rx) = std::sync::mpsc::sync_channel::<Parsed>(parsers * 2);
    let loaded = std::thread::scope(|scope| {
        for _ in 0..parsers {
            let parsed_tx = parsed_tx.clone();
            let raw_rx = &raw_rx;
            scope.spawn(move || {
                loop {
                    let batch = match raw_rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                        Ok(batch) => batch,
                        Err(_) => return,
                    };
                    let parsed: Parsed = batch
                        .into_iter()
                        .map(|(tenant, id, bytes)| {
                            let mut entity: Entity =
                                serde_json::from_slice(&bytes).map_err(|e| {
                                    io(format!(
                                        "entity '{id}' of tenant '{tenant}' cannot be read: {e}"
                                    ))
                                })?;
                            entity.shrink_to_fit();
                            Ok((tenant, id, entity))
                        })
                        .collect();
                    if parsed_tx.send(parsed).is_err() {
                        return;
                    }
                }
            });
        }
        drop(parsed_tx);
        let indexer = scope.spawn(
            move || -> Result<HashMap<String, TenantState>, StoreError> {
                let mut maps: HashMap<String, state::TenantLoader> = HashMap::new();
                let mut failed = None;
                for batch in parsed_rx {
                    match batch {
                        Ok(batch) => {
                            for (tenant, id, entity) in batch {
                                let map = match maps.get_mut(&tenant) {
                                    Some(m) => m,
                                    None => maps.entry(tenant).or_default(),
                                };
                                map.add(&id, Arc::new(entity));
                            }
                        }
                        // Keep draining, so that the parsers never block on a full channel.
                        Err(e) => failed = failed.or(Some(e)),
                    }
                }
                match failed {
                    Some(e) => Err(e),
                    None => Ok(maps.into_iter().map(|(t, m)| (t, m.finish())).collect()),
                }
            },
        );
        let read_rows = (|| -> Result<(), StoreError> {
            let mut batch = Vec::with_capacity(LOAD_BATCH);
            for row in entities.iter().map_err(io)? {
                let (key, value) = row.map_err(io)?;
                let (tenant, id) = key.value();
                batch.push((tenant.to_string(), id.to_string(), value.value().to_vec()));
                if batch.len() == LOAD_BATCH
                    && raw_tx
                        .send(std::mem::replace(
                            &mut batch,
                            Vec::with_capacity(LOAD_BATCH),
                        ))
                        .is_err()
                {
                    break;
                }
            }
            if !batch.is_empty() {
                let _ = raw_tx.send(batch);
            }
            Ok(())
        })();
        drop(raw_tx);
        let indexed = indexer
            .join()
            .map_err(|_| io("loading the entities failed: an indexer panicked"))?;
        read_rows.and(indexed)
    })?;
    let mut maps = shared.tenants.write().unwrap_or_else(|e| e.into_inner());
    for name in names {
        maps.entry(name).or_default();
    }
    for (tenant, state) in loaded {
        maps.insert(tenant, Arc::new(RwLock::new(state)));
    }
    maps.entry(DEFAULT_TENANT.to_string()).or_default();
    Ok(())
}

/// What only the writer thread keeps.
struct Writer {
    handle: Arc<DbHandle>,
    shared: Arc<Shared>,
    faults: Option<Arc<Faults>>,
    clock: Arc<dyn borough_store::Clock>,
    next_notice: u64,
    history: History,
}

impl Writer {
    /// The open database; after a storage error, opened again first, with
    /// the writer's history state read again from it (the file is the truth).
    fn database(&mut self) -> Result<Arc<Database>, StoreError> {
        if let Ok(db) = self.handle.get() {
            return Ok(db);
        }
        let db = self.handle.reopen()?;
        self.history = History::load(&db, self.shared.history_log.clone())?;
        Ok(db)
    }

    /// Records how a transaction ended. A failed one closes the database,
    /// so that the next job opens it again.
    fn outcome<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Ok(_) => self.shared.set_health(WriterState::Ok, None),
            Err(e) => {
                self.shared
                    .set_health(WriterState::Failing, Some(e.to_string()));
                // The log index may hold what did not commit: readers wait
                // for it to be read again with the file.
                self.shared.history_log.poison();
                self.handle.close_after_error();
            }
        }
    }

    /// Runs one job of the writer; a panic in it is caught, its callers are
    /// answered with an error (their reply channels close), and the in-memory
    /// state is read again from the file, which holds only what committed.
    ///
    /// When the database cannot be opened, the job gets the error to answer with.
    fn guarded(&mut self, job: impl FnOnce(&mut Writer, Result<&Database, StoreError>)) {
        let db = match self.database() {
            Ok(db) => db,
            Err(e) => {
                tracing::error!(error = %e, "the storage cannot be opened; the job is refused");
                self.shared
                    .set_health(WriterState::Failing, Some(e.to_string()));
                job(self, Err(e));
                return;
            }
        };
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(self, Ok(&db))));
        if let Err(panic) = run {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            tracing::error!(panic = %what, "the writer panicked; its jobs were refused, state is reloaded");
            self.shared
                .tenants
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            let reloaded = load(&db, &self.shared)
                .and_then(|()| History::load(&db, self.shared.history_log.clone()));
            match reloaded {
                Ok(h) => self.history = h,
                Err(e) => tracing::error!(error = %e, "state cannot be reloaded after a panic"),
            }
            self.shared.set_health(
                WriterState::Failing,
                Some(format!("the writer panicked: {what}")),
            );
        }
    }
}

/// How often maintenance (sealing old hot rows, retention) runs.
const MAINTENANCE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

fn spawn_maintenance(sender: mpsc::Sender<Job>) -> Result<(), StoreError> {
    std::thread::Builder::new()
        .name("borough-maintenance".into())
        .spawn(move || {
            loop {
                std::thread::sleep(MAINTENANCE_EVERY);
                let (reply, _) = oneshot::channel();
                if sender
                    .blocking_send(Job::History(HistoryJob::Maintain(reply)))
                    .is_err()
                {
                    break;
                }
            }
        })
        .map_err(io)?;
    Ok(())
}

fn run_writer(mut receiver: mpsc::Receiver<Job>, mut w: Writer) {
    let mut close_reply = None;
    while close_reply.is_none() {
        let Some(first) = receiver.blocking_recv() else {
            break;
        };
        let mut group = Vec::new();
        let mut ops = 0;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Write(job) => {
                    ops += job.ops.len();
                    group.push(job);
                }
                Job::Meta(op, reply) => {
                    // Keep the order: writes queued before it commit first.
                    commit_pending(&mut w, &mut group);
                    if let MetaOp::NoticesDone(..) = op {
                        // Deliveries finish in bursts: forget all that are waiting in one transaction.
                        let mut done = vec![(op, reply)];
                        loop {
                            match receiver.try_recv() {
                                Ok(Job::Meta(m @ MetaOp::NoticesDone(..), r)) => done.push((m, r)),
                                Ok(other) => {
                                    next = Some(other);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        w.guarded(|w, db| match db {
                            Ok(db) => {
                                let result = notices::apply_done(db, &w.shared.subscriptions, done);
                                w.outcome(&result);
                            }
                            Err(e) => {
                                for (_, reply) in done {
                                    let _ = reply.send(Err(copy(&e)));
                                }
                            }
                        });
                    } else {
                        meta(&mut w, op, reply);
                    }
                }
                Job::History(job) => {
                    commit_pending(&mut w, &mut group);
                    w.guarded(|w, db| apply_history(db, w, job));
                }
                Job::Close(r) => {
                    close_reply = Some(r);
                    break;
                }
            }
            if next.is_none() && ops < MAX_GROUP_OPS {
                next = receiver.try_recv().ok();
            }
        }
        commit_pending(&mut w, &mut group);
    }
    // Refuse new writes, then finish the ones already queued.
    receiver.close();
    let mut rest = Vec::new();
    while let Ok(job) = receiver.try_recv() {
        match job {
            Job::Write(job) => rest.push(job),
            Job::Meta(op, reply) => {
                commit_pending(&mut w, &mut rest);
                meta(&mut w, op, reply);
            }
            Job::History(job) => {
                commit_pending(&mut w, &mut rest);
                w.guarded(|w, db| apply_history(db, w, job));
            }
            Job::Close(r) => {
                let _ = r.send(Ok(()));
            }
        }
    }
    commit_pending(&mut w, &mut rest);
    w.shared
        .set_health(WriterState::Stopped, Some("the store is closed".into()));
    drop(w);
    if let Some(r) = close_reply {
        let _ = r.send(Ok(()));
    }
}

/// Commits the writes gathered so far, if any.
fn commit_pending(w: &mut Writer, group: &mut Vec<WriteJob>) {
    if group.is_empty() {
        return;
    }
    let (work, replies): (Vec<_>, Vec<_>) = std::mem::take(group)
        .into_iter()
        .map(|job| ((job.tenant, job.ops, job.linked), job.reply))
        .unzip();
    let mut outcome = None;
    w.guarded(|w, db| outcome = Some(db.and_then(|db| commit_group(db, work, w))));
    // Answered here, after `guarded` has recorded the writer's health.
    match outcome {
        Some(Ok(results)) => {
            for (reply, results) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(results));
            }
        }
        Some(Err(e)) => {
            for reply in replies {
                let _ = reply.send(Err(copy(&e)));
            }
        }
        None => {
            for reply in replies {
                let _ = reply.send(Err(StoreError::Io(
                    "the write failed inside the store and was not committed".into(),
                )));
            }
        }
    }
}

/// The same storage error, for another caller.
fn copy(e: &StoreError) -> StoreError {
    match e {
        StoreError::Closed => StoreError::Closed,
        StoreError::Io(m) => StoreError::Io(m.clone()),
    }
}

fn meta(w: &mut Writer, op: MetaOp, reply: oneshot::Sender<Result<bool, StoreError>>) {
    w.guarded(|w, db| {
        let result = db.and_then(|db| {
            let now = w.clock.now_micros();
            let result = notices::apply_meta(db, &w.shared.subscriptions, op, now);
            w.outcome(&result);
            result
        });
        let _ = reply.send(result);
    });
}

type Key = (String, String);
/// The staged state of one entity in a group: `None` means deleted.
type Staged = Option<Arc<Entity>>;

/// Applies a group of writes to the latest state, commits them in one
/// transaction, then publishes the new state; answers each write's results.
fn commit_group(
    db: &Database,
    group: Vec<GroupWrite>,
    w: &mut Writer,
) -> Result<Vec<WriteResults>, StoreError> {
    if w.faults.as_ref().is_some_and(|f| f.take_panic()) {
        panic!("injected fault in the writer");
    }
    let shared = w.shared.clone();
    let shared = shared.as_ref();
    let now = w.clock.now_micros();
    let mut staged: HashMap<Key, Staged> = HashMap::new();
    let mut notices: Vec<Notice> = Vec::new();
    let mut recorded: Vec<Recorded> = Vec::new();
    let mut new_tenants: Vec<String> = Vec::new();
    let mut answers = Vec::with_capacity(group.len());
    let mut records = Vec::new();
    for (tenant, ops, linked) in group {
        let committed = shared.tenant(&tenant);
        let subscriptions = shared.subscriptions.tenant(&tenant);
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            let key = (tenant.clone(), op.entity_id().to_string());
            let current = match staged.get(&key) {
                Some(s) => s.clone(),
                None => committed.as_ref().and_then(|m| {
                    m.read()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&key.1)
                        .cloned()
                }),
            };
            match apply(op, current.as_deref(), now) {
                Ok((change, outcome)) => {
                    let after = match change {
                        Change::Put(mut e) => {
                            e.shrink_to_fit();
                            let e = Arc::new(e);
                            staged.insert(key, Some(e.clone()));
                            Some(Some(e))
                        }
                        Change::Delete => {
                            staged.insert(key, None);
                            Some(None)
                        }
                        Change::Unchanged => None,
                    };
                    if let Some(Some(after)) = &after {
                        record_history(&tenant, current.as_deref(), after, &mut recorded);
                    }
                    if let (Some(after), Some(subs)) = (after, &subscriptions) {
                        notices::match_change(
                            subs,
                            &tenant,
                            current.as_ref(),
                            after.as_ref(),
                            now,
                            &mut notices,
                        );
                    }
                    results.push(Ok(outcome));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        for (i, record) in linked {
            if results.get(i).is_some_and(Result::is_ok) {
                records.push(record);
            }
        }
        if committed.is_none()
            && !new_tenants.contains(&tenant)
            && results.iter().any(Result::is_ok)
        {
            new_tenants.push(tenant.clone());
        }
        answers.push(results);
    }

    // A subscription with its bound of pending notices gets no more.
    let admitted = shared.subscriptions.admit(&mut notices);
    let first_notice = w.next_notice;
    let persisted = persist(
        db,
        &GroupChanges {
            staged: &staged,
            new_tenants: &new_tenants,
            notices: &notices,
            first_notice,
            recorded: &recorded,
            records: &records,
        },
        &mut w.history,
    );
    w.outcome(&persisted);
    if let Err(e) = persisted {
        tracing::error!(error = %e, "commit failed; the group's writes are rejected");
        return Err(e);
    }

    // Publish: readers see the group only now that it is durable.
    let mut by_tenant: HashMap<&str, Vec<(&str, &Staged)>> = HashMap::new();
    for ((tenant, id), v) in &staged {
        by_tenant.entry(tenant).or_default().push((id, v));
    }
    for t in &new_tenants {
        shared.tenant_or_create(t);
    }
    for (tenant, changes) in by_tenant {
        let map = shared.tenant_or_create(tenant);
        let mut map = map.write().unwrap_or_else(|e| e.into_inner());
        for (id, v) in changes {
            map.put(id, v.clone());
        }
    }
    shared.feed.publish(&staged);
    shared.subscriptions.admitted(admitted);
    if !notices.is_empty() {
        w.next_notice = first_notice + notices.len() as u64;
        shared.subscriptions.watch.send_replace(w.next_notice - 1);
    }
    Ok(answers)
}

/// Everything one group writes.
struct GroupChanges<'a> {
    staged: &'a HashMap<Key, Staged>,
    new_tenants: &'a [String],
    notices: &'a [Notice],
    first_notice: u64,
    /// History instances.
    recorded: &'a [Recorded],
    /// Management records linked to the group's operations.
    records: &'a [borough_store::RecordChange],
}

/// Commits a group's changes in one durable transaction.
fn persist(db: &Database, c: &GroupChanges, history: &mut History) -> Result<(), StoreError> {
    if c.staged.is_empty() && c.new_tenants.is_empty() && c.records.is_empty() {
        return Ok(());
    }
    let log = history.log_index();
    let _no_history_readers_alone = log.barrier();
    let mut txn = db.begin_write().map_err(io)?;
    txn.set_durability(redb::Durability::Immediate)
        .map_err(io)?;
    {
        let mut table = txn.open_table(ENTITIES).map_err(io)?;
        let mut buf = Vec::with_capacity(1024);
        for ((tenant, id), v) in c.staged {
            match v {
                Some(e) => {
                    buf.clear();
                    serde_json::to_writer(&mut buf, e.as_ref()).map_err(io)?;
                    table
                        .insert((tenant.as_str(), id.as_str()), buf.as_slice())
                        .map_err(io)?;
                }
                None => {
                    table.remove((tenant.as_str(), id.as_str())).map_err(io)?;
                }
            }
        }
        let mut tenants = txn.open_table(TENANTS).map_err(io)?;
        for t in c.new_tenants {
            tenants.insert(t.as_str(), ()).map_err(io)?;
        }
    }
    notices::write_notices(&txn, c.notices, c.first_notice)?;
    history.record(&txn, c.recorded)?;
    devices::write_changes(&txn, c.records)?;
    txn.commit().map_err(io)?;
    log.committed();
    Ok(())
}

/// Adds to `out` every attribute instance that `after` holds and `before` did
/// not: new, or rewritten. Operations of one group share a write time, so a
/// rewrite is told by content, not by modifiedAt alone. This is the history of a write.
fn record_history(
    tenant: &str,
    before: Option<&Entity>,
    after: &Arc<Entity>,
    out: &mut Vec<Recorded>,
) {
    let mut instances = Vec::new();
    for (a, (name, list)) in after.attrs.iter().enumerate() {
        let old = before.and_then(|b| b.attrs.get(name));
        for (i, attr) in list.iter().enumerate() {
            if !old.is_some_and(|o| o.iter().any(|x| x == attr)) {
                instances.push((a, i));
            }
        }
    }
    if !instances.is_empty() {
        out.push(Recorded {
            tenant: tenant.to_string(),
            entity: after.clone(),
            instances,
        });
    }
}

/// Runs one history job in its own durable transaction.
fn apply_history(db: Result<&Database, StoreError>, w: &mut Writer, job: HistoryJob) {
    let db = match db {
        Ok(db) => db,
        Err(e) => return job.refuse(e),
    };
    /// A failed transaction closes the database; the writer's history state,
    /// which may be ahead of the file, is read again when it reopens.
    fn run<T>(
        db: &Database,
        w: &mut Writer,
        f: impl FnOnce(&redb::WriteTransaction, &mut History) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let log = w.history.log_index();
        let result = (|| {
            let _no_history_readers_alone = log.barrier();
            let mut txn = db.begin_write().map_err(io)?;
            txn.set_durability(redb::Durability::Immediate)
                .map_err(io)?;
            let out = f(&txn, &mut w.history)?;
            txn.commit().map_err(io)?;
            log.committed();
            Ok(out)
        })();
        w.outcome(&result);
        result
    }
    let shared = w.shared.clone();
    // History can be a tenant's first data: the tenant then exists.
    let add_tenant = |txn: &redb::WriteTransaction, tenant: &str| -> Result<(), StoreError> {
        if shared.tenant(tenant).is_none() {
            txn.open_table(TENANTS)
                .map_err(io)?
                .insert(tenant, ())
                .map_err(io)?;
        }
        Ok(())
    };
    let now = w.clock.now_micros();
    match job {
        HistoryJob::Op(tenant, op, reply) => {
            let result = run(db, w, |txn, h| {
                let out = h.apply(txn, &tenant, op, now)?;
                if out == HistoryOutcome::Created {
                    add_tenant(txn, &tenant)?;
                }
                Ok(out)
            });
            if matches!(result, Ok(HistoryOutcome::Created)) {
                shared.tenant_or_create(&tenant);
            }
            let _ = reply.send(result);
        }
        HistoryJob::Import(tenant, series, reply) => {
            let result = run(db, w, |txn, h| {
                add_tenant(txn, &tenant)?;
                let (points, series) = h.import(txn, &tenant, series, now)?;
                Ok(ImportCounts { points, series })
            });
            if result.is_ok() {
                shared.tenant_or_create(&tenant);
            }
            let _ = reply.send(result);
        }
        HistoryJob::SetRetention(tenant, r, reply) => {
            let _ = reply.send(run(db, w, |txn, _| {
                history::set_retention(txn, &tenant, &r)
            }));
        }
        HistoryJob::Maintain(reply) => {
            let _ = reply.send(run(db, w, |txn, h| {
                h.seal_old(txn, now - history::SEAL_AGE_MICROS)?;
                h.apply_retention(txn, now)
            }));
        }
    }
}

/// The error of a job whose answer never came: a fault in the writer (caught:
/// nothing of the job was committed), or the store closed.
fn dropped_answer(sender: &mpsc::Sender<Job>) -> StoreError {
    if sender.is_closed() {
        StoreError::Closed
    } else {
        StoreError::Io("the write failed inside the store and was not committed".into())
    }
}

impl EntityStore for EmbeddedStore {
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
        ops: Vec<EntityOp>,
    ) -> BoxFuture<'static, Result<WriteResults, StoreError>> {
        self.write_linked(tenant, ops, Vec::new())
    }

    fn write_linked(
        &self,
        tenant: &str,
        ops: Vec<EntityOp>,
        linked: Vec<(usize, borough_store::RecordChange)>,
    ) -> BoxFuture<'static, Result<WriteResults, StoreError>> {
        let sender = self.sender.clone();
        let tenant = tenant.to_string();
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            sender
                .send(Job::Write(WriteJob {
                    tenant,
                    ops,
                    linked,
                    reply,
                }))
                .await
                .map_err(|_| StoreError::Closed)?;
            answer.await.map_err(|_| dropped_answer(&sender))?
        })
    }

    fn put_context(&self, id: &str, doc: &[u8]) -> Result<(), StoreError> {
        let mut txn = self.db.get()?.begin_write().map_err(io)?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(io)?;
        txn.open_table(CONTEXTS)
            .map_err(io)?
            .insert(id, doc)
            .map_err(io)?;
        txn.commit().map_err(io)
    }

    fn delete_context(&self, id: &str) -> Result<bool, StoreError> {
        let mut txn = self.db.get()?.begin_write().map_err(io)?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(io)?;
        let existed = txn
            .open_table(CONTEXTS)
            .map_err(io)?
            .remove(id)
            .map_err(io)?
            .is_some();
        txn.commit().map_err(io)?;
        Ok(existed)
    }

    fn contexts(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let read = self.db.get()?.begin_read().map_err(io)?;
        let table = read.open_table(CONTEXTS).map_err(io)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(io)? {
            let (k, v) = row.map_err(io)?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn put_subscription(
        &self,
        tenant: &str,
        record: SubscriptionRecord,
        expect: borough_store::Expect,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        self.meta(MetaOp::PutSubscription(
            tenant.to_string(),
            Box::new(record),
            expect,
        ))
    }

    fn delete_subscription(
        &self,
        tenant: &str,
        id: &str,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        self.meta(MetaOp::DeleteSubscription(
            tenant.to_string(),
            id.to_string(),
        ))
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
        notices::pending(&*self.db.get()?, after, limit)
    }

    fn notices_done(
        &self,
        done: Vec<(u64, Notice)>,
        dead: Option<String>,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let meta = self.meta(MetaOp::NoticesDone(done, dead));
        Box::pin(async move { meta.await.map(|_| ()) })
    }

    fn dead_letters(&self, tenant: &str, id: &str) -> Result<Vec<(Notice, String)>, StoreError> {
        notices::dead_letters(&*self.db.get()?, tenant, id)
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
        history::read(
            &*self.db.get()?,
            &self.shared.history_log,
            tenant,
            id,
            request,
        )
    }

    fn history_entities(
        &self,
        tenant: &str,
        types: Option<&[String]>,
    ) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        history::entities(&*self.db.get()?, tenant, types)
    }

    fn write_history(
        &self,
        tenant: &str,
        op: HistoryOp,
    ) -> BoxFuture<'static, Result<HistoryOutcome, StoreError>> {
        let tenant = tenant.to_string();
        self.history_job(|reply| HistoryJob::Op(tenant, op, reply))
    }

    fn import_history(
        &self,
        tenant: &str,
        series: Vec<ImportSeries>,
    ) -> BoxFuture<'static, Result<ImportCounts, StoreError>> {
        let tenant = tenant.to_string();
        self.history_job(|reply| HistoryJob::Import(tenant, series, reply))
    }

    fn set_retention(
        &self,
        tenant: &str,
        retention: Retention,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let tenant = tenant.to_string();
        self.history_job(|reply| HistoryJob::SetRetention(tenant, retention, reply))
    }

    fn retention(&self, tenant: &str) -> Result<Retention, StoreError> {
        history::retention(&*self.db.get()?, tenant)
    }

    fn maintain_history(&self) -> BoxFuture<'static, Result<u64, StoreError>> {
        self.history_job(HistoryJob::Maintain)
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

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Ask the writer to finish what it has; the file closes when it exits.
        let _ = self.sender.try_send(Job::Close(oneshot::channel().0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_shared_backend_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        borough_store::testsuite::run_all(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let store = EmbeddedStore::open(&path).unwrap();
        borough_store::testsuite::survives_reopen(store, || EmbeddedStore::open(&path).unwrap())
            .await;
    }

    fn spot_subscription(id: &str) -> SubscriptionRecord {
        let body = serde_json::json!({"type": "Subscription", "entities": [{"type": "Spot"}],
            "notification": {"endpoint": {"uri": "http://127.0.0.1:9/n"}}});
        SubscriptionRecord {
            id: id.into(),
            body: body.as_object().cloned().unwrap(),
            context: serde_json::Value::Null,
            context_objects: Vec::new(),
            notification_context_objects: None,
            created_at: 0,
            modified_at: 0,
            stats: Stats::default(),
        }
    }

    /// An upsert of the entity `doc` (core context).
    fn upsert(doc: serde_json::Value) -> EntityOp {
        let e =
            borough_core::entity::parse_entity(&doc, &borough_core::Context::core(), 0).unwrap();
        EntityOp::Upsert {
            entity: e,
            replace: false,
        }
    }

    fn spot(n: i64) -> EntityOp {
        upsert(serde_json::json!({"id": "urn:spot:1", "type": "Spot", "n": n}))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_notices_are_bounded_per_subscription_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            max_pending_notices: 3,
            ..StoreOptions::default()
        };
        let store = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
        for id in ["urn:s:1", "urn:s:2"] {
            store
                .put_subscription("t", spot_subscription(id), borough_store::Expect::Absent)
                .await
                .unwrap();
        }
        // One change alone, then four in one write (one group): five notices each.
        store.write("t", vec![spot(0)]).await.unwrap();
        store.write("t", (1..5).map(spot).collect()).await.unwrap();
        for id in ["urn:s:1", "urn:s:2"] {
            let s = store.stats("t", id);
            assert_eq!((s.pending, s.dropped), (3, 2), "{id}");
        }
        let queued = store.pending_notices(0, 100).unwrap();
        assert_eq!(queued.len(), 6);
        // The oldest are kept: the first three changes.
        let ns: Vec<i64> = queued
            .iter()
            .filter(|(_, n)| n.subscription == "urn:s:1")
            .map(|(_, n)| {
                n.entity.attrs["https://uri.etsi.org/ngsi-ld/default-context/n"][0]
                    .value
                    .as_i64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ns, [0, 1, 2]);
        store.close().await.unwrap();
        drop(store);

        // Reopened: pending is counted from the outbox again, so the bound holds.
        let store = EmbeddedStore::open_with(dir.path(), options).unwrap();
        assert_eq!(store.stats("t", "urn:s:1").pending, 3);
        let one: Vec<_> = store
            .pending_notices(0, 100)
            .unwrap()
            .into_iter()
            .filter(|(_, n)| n.subscription == "urn:s:1")
            .take(1)
            .collect();
        store.notices_done(one, None).await.unwrap();
        assert_eq!(store.stats("t", "urn:s:1").pending, 2);
        store.write("t", vec![spot(5), spot(6)]).await.unwrap();
        let s = store.stats("t", "urn:s:1");
        assert_eq!((s.pending, s.dropped), (3, 1));
        assert_eq!(store.pending_notices(0, 100).unwrap().len(), 6);
    }

    fn located(id: &str, n: i64) -> EntityOp {
        upsert(serde_json::json!({"id": id, "type": "Spot", "n": n,
            "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [2.0, 48.0]}}}))
    }

    async fn write_ok(store: &EmbeddedStore, op: EntityOp) {
        let results = store.write("t", vec![op]).await.unwrap();
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }

    /// Instances of the entity's history, over all its attributes.
    fn history_len(store: &EmbeddedStore, id: &str) -> usize {
        let request = HistoryRequest {
            attrs: None,
            time_property: borough_core::temporal::TimeProperty::ModifiedAt,
            range: borough_core::temporal::TimeRange::ALL,
            last_n: None,
            max_instances: 1000,
            aggregation: None,
        };
        let Some(h) = store.history("t", id, &request).unwrap() else {
            return 0;
        };
        h.attrs
            .iter()
            .map(|a| match &a.body {
                borough_core::temporal::HistoryBody::Instances(i) => i.len(),
                _ => 0,
            })
            .sum()
    }

    fn meter(id: &str, n: i64) -> EntityOp {
        upsert(serde_json::json!({"id": id, "type": "Meter", "n": n}))
    }

    /// The instances of `n` in an entity's history: (value, instance id).
    fn n_history(
        store: &EmbeddedStore,
        id: &str,
    ) -> Vec<(i64, borough_core::temporal::InstanceId)> {
        let request = HistoryRequest {
            attrs: None,
            time_property: borough_core::temporal::TimeProperty::ModifiedAt,
            range: borough_core::temporal::TimeRange::ALL,
            last_n: None,
            max_instances: 10_000,
            aggregation: None,
        };
        let Some(h) = store.history("t", id, &request).unwrap() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for a in &h.attrs {
            if let borough_core::temporal::HistoryBody::Instances(list) = &a.body {
                out.extend(list.iter().map(|i| (i.attr.value.as_i64().unwrap(), i.id)));
            }
        }
        out
    }

    /// The values of `n` in an entity's history, in time order.
    fn n_values(store: &EmbeddedStore, id: &str) -> Vec<i64> {
        n_history(store, id).iter().map(|v| v.0).collect()
    }

    fn rows_in<V: redb::Value + 'static>(
        store: &EmbeddedStore,
        table: TableDefinition<u64, V>,
    ) -> u64 {
        let db = store.db.get().unwrap();
        let read = db.begin_read().unwrap();
        redb::ReadableTableMetadata::len(&read.open_table(table).unwrap()).unwrap()
    }

    fn watermarks(store: &EmbeddedStore) -> u64 {
        rows_in(store, hotlog::LOG_MOVED)
    }

    fn log_rows(store: &EmbeddedStore) -> u64 {
        rows_in(store, hotlog::LOG)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn history_leaves_the_log_whole_and_survives_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            history_log_window: 40,
            ..StoreOptions::default()
        };
        let meters: Vec<String> = (0..20).map(|i| format!("urn:meter:{i}")).collect();
        let store = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
        for round in 0..30 {
            let ops = meters.iter().map(|m| meter(m, round)).collect();
            store.write("t", ops).await.unwrap();
        }
        // One series of 600 instances in one group: 512 of them are sealed at once.
        let busy: Vec<EntityOp> = (0..600).map(|n| meter("urn:meter:busy", n)).collect();
        store.write("t", busy).await.unwrap();
        let expected: Vec<i64> = (0..30).collect();
        for m in &meters {
            let values = n_values(&store, m);
            assert_eq!(values, expected, "{m}");
        }
        let busy = n_values(&store, "urn:meter:busy");
        assert_eq!(busy, (0..600).collect::<Vec<_>>());
        // 1,200 instances were written; the log kept only its window and what
        // truncation has not reached yet.
        assert!(
            log_rows(&store) < 1_200,
            "{} rows in the log",
            log_rows(&store)
        );
        // Maintenance forgets the watermarks of series whose moved rows are
        // all truncated.
        let marked = watermarks(&store);
        assert!(marked > 0);
        store.maintain_history().await.unwrap();
        assert!(watermarks(&store) < marked, "{marked} watermarks kept");

        // Instances that left the log are still edited and deleted by their id.
        let first = n_history(&store, &meters[0])[0].1;
        let gone = store
            .write_history(
                "t",
                HistoryOp::DeleteInstance {
                    id: meters[0].clone(),
                    name: "https://uri.etsi.org/ngsi-ld/default-context/n".into(),
                    instance: first,
                },
            )
            .await
            .unwrap();
        assert_eq!(gone, HistoryOutcome::Changed);
        store.close().await.unwrap();
        drop(store);

        let store = EmbeddedStore::open_with(dir.path(), options).unwrap();
        let values = n_values(&store, &meters[0]);
        assert_eq!(values, (1..30).collect::<Vec<_>>());
        for m in &meters[1..] {
            let values = n_values(&store, m);
            assert_eq!(values, expected, "{m} after reopening");
        }
        // New instances after the restart join the old ones.
        for round in 30..40 {
            let ops = meters.iter().map(|m| meter(m, round)).collect();
            store.write("t", ops).await.unwrap();
        }
        let values = n_values(&store, &meters[5]);
        assert_eq!(values, (0..40).collect::<Vec<_>>());
        let busy = n_values(&store, "urn:meter:busy");
        assert_eq!(busy.len(), 600);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_see_whole_histories_while_series_leave_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            history_log_window: 8,
            ..StoreOptions::default()
        };
        let store = Arc::new(EmbeddedStore::open_with(dir.path(), options).unwrap());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                let mut longest = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let values = n_values(&store, "urn:meter:watched");
                    // Every read is a whole prefix of the writes: no instance
                    // missing while its series moves between tables.
                    assert_eq!(values, (0..values.len() as i64).collect::<Vec<_>>());
                    assert!(values.len() >= longest, "a read lost instances");
                    longest = values.len();
                    reads += 1;
                }
                reads
            })
        };
        for round in 0..200 {
            let mut ops: Vec<EntityOp> = (0..10)
                .map(|i| meter(&format!("urn:meter:{i}"), round))
                .collect();
            ops.push(meter("urn:meter:watched", round));
            store.write("t", ops).await.unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let reads = reader.join().unwrap();
        assert!(reads > 0);
        assert_eq!(n_history(&store, "urn:meter:watched").len(), 200);
    }

    /// A store in `dir` whose faults the test switches.
    fn with_faults(dir: &Path) -> (EmbeddedStore, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        let options = StoreOptions {
            faults: Some(faults.clone()),
            ..StoreOptions::default()
        };
        (EmbeddedStore::open_with(dir, options).unwrap(), faults)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_fails_writes_clearly_and_the_store_recovers_when_space_returns() {
        let dir = tempfile::tempdir().unwrap();
        let (store, faults) = with_faults(dir.path());
        write_ok(&store, located("urn:spot:1", 1)).await;
        assert!(store.health().is_ok());

        faults.set_disk_full(true);
        for n in [2, 3] {
            let failed = store.write("t", vec![located("urn:spot:2", n)]).await;
            match failed {
                Err(StoreError::Io(m)) => assert!(m.contains("No space left"), "{m}"),
                other => panic!("expected a storage error, got {other:?}"),
            }
        }
        let health = store.health();
        assert_eq!(health.writer, WriterState::Failing);
        assert!(health.since.is_some());
        assert!(
            store.get("t", "urn:spot:2").is_none(),
            "nothing of a failed write is visible"
        );

        // Space is back: the next write commits, without a restart.
        faults.set_disk_full(false);
        write_ok(&store, located("urn:spot:3", 3)).await;
        assert!(store.health().is_ok(), "{:?}", store.health());
        assert_eq!(
            history_len(&store, "urn:spot:3"),
            2,
            "history is recorded again"
        );
        write_ok(&store, spot(10)).await;
        assert_eq!(history_len(&store, "urn:spot:1"), 3, "one more instance: n");
        store.close().await.unwrap();
        drop(store);

        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert!(store.get("t", "urn:spot:1").is_some());
        assert!(store.get("t", "urn:spot:3").is_some());
        assert!(store.get("t", "urn:spot:2").is_none());
        assert_eq!(history_len(&store, "urn:spot:1"), 3);
        assert_eq!(history_len(&store, "urn:spot:2"), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_in_the_writer_fails_its_group_only() {
        let dir = tempfile::tempdir().unwrap();
        let (store, faults) = with_faults(dir.path());
        write_ok(&store, located("urn:spot:1", 1)).await;
        faults.panic_in_next_group();
        match store.write("t", vec![located("urn:spot:9", 9)]).await {
            Err(StoreError::Io(m)) => assert!(m.contains("not committed"), "{m}"),
            other => panic!("expected an error, got {other:?}"),
        }
        let health = store.health();
        assert_eq!(health.writer, WriterState::Failing);
        assert!(health.error.unwrap_or_default().contains("panicked"));
        assert!(store.get("t", "urn:spot:9").is_none());
        assert_eq!(store.entity_count("t"), 1);

        write_ok(&store, located("urn:spot:2", 2)).await;
        assert!(store.health().is_ok());
        assert_eq!(store.entity_count("t"), 2);
        let q = EntityQuery::default();
        assert_eq!(store.query("t", &q, 0, 10, true).total, Some(2));
    }

    /// A clock a test moves by hand.
    #[derive(Debug)]
    struct ManualClock(std::sync::atomic::AtomicI64);

    impl borough_store::Clock for ManualClock {
        fn now_micros(&self) -> i64 {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_times_and_retention_follow_the_store_clock() {
        const DAY: i64 = 86_400_000_000;
        let start = 1_700_000_000_000_000;
        let clock = Arc::new(ManualClock(start.into()));
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            clock: clock.clone(),
            ..StoreOptions::default()
        };
        let store = EmbeddedStore::open_with(dir.path(), options).unwrap();
        write_ok(&store, spot(1)).await;
        let created = store.get("t", "urn:spot:1").unwrap();
        assert_eq!((created.created_at, created.modified_at), (start, start));

        clock
            .0
            .store(start + 40 * DAY, std::sync::atomic::Ordering::SeqCst);
        write_ok(&store, spot(2)).await;
        let updated = store.get("t", "urn:spot:1").unwrap();
        assert_eq!(updated.modified_at, start + 40 * DAY);
        assert_eq!(history_len(&store, "urn:spot:1"), 2);

        // Kept for 30 days: the first reading is 40 days old by the store's clock.
        let keep = Retention {
            default: Some(30 * DAY),
            types: Vec::new(),
        };
        store.set_retention("t", keep).await.unwrap();
        assert_eq!(store.maintain_history().await.unwrap(), 1);
        assert_eq!(history_len(&store, "urn:spot:1"), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_after_close_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.close().await.unwrap();
        let r = store
            .write("t", vec![EntityOp::Delete { id: "urn:x".into() }])
            .await;
        assert!(matches!(r, Err(StoreError::Closed)));
        assert_eq!(store.health().writer, WriterState::Stopped);
    }
}
