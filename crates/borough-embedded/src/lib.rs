//! The embedded storage backend: one redb file on disk, behind the engine
//! (`borough-engine`), which keeps the current state of every entity in
//! memory and commits writes in groups from a single writer thread.
//!
//! Invariants:
//! - The redb file is the truth; the engine's in-memory maps are rebuilt from
//!   it at open.
//! - Every commit is made with `Durability::Immediate` (fsync) before the
//!   engine answers the writes it holds or shows them to readers.
//! - After a failed transaction redb refuses every later one until the file
//!   is closed and opened again: the backend closes it at once and opens it
//!   again before the writer's next job (`Backend::ready`).

use borough_core::Entity;
use borough_core::subscription::SubscriptionRecord;
use borough_core::temporal::{
    EntityHistory, HistoryOp, HistoryOutcome, HistoryRequest, ImportSeries, Retention,
};
use borough_engine::{
    Backend, Committed, DoneNotices, Engine, EngineOptions, EntitySink, OutboxState, WriteSet,
};
use borough_store::{ImportCounts, Notice, StoreError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};

mod chunk;
mod devices;
mod faults;
mod history;
mod hotlog;
mod notices;
mod series;

use history::History;

pub use faults::Faults;

/// The embedded store: the engine over a redb file.
pub type EmbeddedStore = Engine<RedbBackend>;

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
        let engine = EngineOptions::default();
        Self {
            max_pending_notices: engine.max_pending_notices,
            faults: None,
            clock: engine.clock,
            history_log_window: hotlog::DEFAULT_WINDOW,
        }
    }
}

/// Opens (or creates) the store in `dir`, loading every entity into memory.
pub fn open(dir: &Path) -> Result<EmbeddedStore, StoreError> {
    open_with(dir, StoreOptions::default())
}

/// Opens (or creates) the store in `dir` with `options`.
pub fn open_with(dir: &Path, options: StoreOptions) -> Result<EmbeddedStore, StoreError> {
    let backend = RedbBackend::open(dir, &options)?;
    Engine::start(
        backend,
        EngineOptions {
            max_pending_notices: options.max_pending_notices,
            clock: options.clock,
        },
    )
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
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

/// Hands every stored entity to `sink`; returns the tenants' names. One
/// thread reads the rows, parsers turn them into entities on every core, one
/// thread hands them on. Start-up time is mostly JSON parsing, which this
/// spreads out.
fn load(db: &Database, sink: &mut EntitySink<'_>) -> Result<Vec<String>, StoreError> {
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
    std::thread::scope(|scope| {
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
        let indexer = scope.spawn(move || -> Result<(), StoreError> {
            let mut failed = None;
            for batch in parsed_rx {
                match batch {
                    Ok(batch) => {
                        for (tenant, id, entity) in batch {
                            sink(tenant, id, entity);
                        }
                    }
                    // Keep draining, so that the parsers never block on a full channel.
                    Err(e) => failed = failed.or(Some(e)),
                }
            }
            failed.map_or(Ok(()), Err)
        });
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
    Ok(names)
}

/// The embedded backend: a redb file.
pub struct RedbBackend {
    db: DbHandle,
    faults: Option<Arc<Faults>>,
    /// The history log's live rows, for the writer and readers.
    log: Arc<hotlog::LogIndex>,
    /// History's writer state: loaded alongside the entities, and again after
    /// a failed transaction or a panic.
    history: Mutex<Option<History>>,
}

impl RedbBackend {
    /// Opens (or creates) the file in `dir`, upgrading an older format.
    pub fn open(dir: &Path, options: &StoreOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| io(format!("cannot create {}: {e}", dir.display())))?;
        let db = DbHandle::open(dir.join("borough.redb"), options.faults.clone())?;
        prepare(&*db.get()?)?;
        Ok(Self {
            db,
            faults: options.faults.clone(),
            log: Arc::new(hotlog::LogIndex::new(options.history_log_window)),
            history: Mutex::new(None),
        })
    }

    /// The version of the on-disk format of the open file.
    pub fn format_version(&self) -> Result<u64, StoreError> {
        let read = self.db.get()?.begin_read().map_err(io)?;
        let meta = read.open_table(META).map_err(io)?;
        Ok(meta.get("format").map_err(io)?.map_or(1, |v| v.value()))
    }

    /// History's writer state, read from the file if it is not in memory.
    fn history_state(&self, db: &Database) -> Result<MutexGuard<'_, Option<History>>, StoreError> {
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        if h.is_none() {
            *h = Some(History::load(db, self.log.clone())?);
        }
        Ok(h)
    }

    /// Runs `f` in one write transaction of the writer. A failure closes the
    /// database (redb refuses every later transaction until it is opened
    /// again) and marks history's log index as unknown.
    fn transact<T>(
        &self,
        durability: redb::Durability,
        f: impl FnOnce(&redb::WriteTransaction, &mut History) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let db = self.db.get()?;
        let mut guard = self.history_state(&db)?;
        let Some(history) = guard.as_mut() else {
            return Err(io("history's state is not loaded"));
        };
        let result = (|| {
            let _no_history_readers_alone = self.log.barrier();
            let mut txn = db.begin_write().map_err(io)?;
            txn.set_durability(durability).map_err(io)?;
            let out = f(&txn, history)?;
            txn.commit().map_err(io)?;
            self.log.committed();
            Ok(out)
        })();
        if result.is_err() {
            // The log index may hold what did not commit: readers wait for
            // it to be read again with the file.
            self.log.poison();
            *guard = None;
            self.db.close_after_error();
        }
        result
    }

    /// Adds a tenant that history made.
    fn add_tenant(txn: &redb::WriteTransaction, tenant: &str) -> Result<(), StoreError> {
        txn.open_table(TENANTS)
            .map_err(io)?
            .insert(tenant, ())
            .map_err(io)?;
        Ok(())
    }
}

impl Backend for RedbBackend {
    fn load_entities(&self, sink: &mut EntitySink<'_>) -> Result<Vec<String>, StoreError> {
        let db = self.db.get()?;
        let loads_history = self
            .history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none();
        // History's writer state is read while the entities load.
        let (tenants, history) = std::thread::scope(|scope| {
            let history =
                loads_history.then(|| scope.spawn(|| History::load(&db, self.log.clone())));
            (load(&db, sink), history.map(|h| h.join()))
        });
        let tenants = tenants?;
        if let Some(history) = history {
            let history =
                history.map_err(|_| io("loading history failed: a thread panicked"))??;
            *self.history.lock().unwrap_or_else(|e| e.into_inner()) = Some(history);
        }
        Ok(tenants)
    }

    fn load_subscriptions(&self) -> Result<Vec<(String, SubscriptionRecord)>, StoreError> {
        notices::subscriptions(&*self.db.get()?)
    }

    fn load_outbox(&self) -> Result<OutboxState, StoreError> {
        notices::outbox(&*self.db.get()?)
    }

    fn commit(&self, set: &WriteSet<'_>) -> Result<Committed, StoreError> {
        if self.faults.as_ref().is_some_and(|f| f.take_panic()) {
            panic!("injected fault in the writer");
        }
        self.transact(redb::Durability::Immediate, |txn, history| {
            {
                let mut table = txn.open_table(ENTITIES).map_err(io)?;
                let mut buf = Vec::with_capacity(1024);
                for ((tenant, id), v) in set.entities {
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
                for t in set.new_tenants {
                    tenants.insert(t.as_str(), ()).map_err(io)?;
                }
            }
            notices::write_notices(txn, set.notices, set.first_notice)?;
            history.record(txn, set.history)?;
            devices::write_changes(txn, set.records)
        })?;
        Ok(Committed::Done {
            first_notice: set.first_notice,
        })
    }

    fn put_subscription(
        &self,
        tenant: &str,
        record: &SubscriptionRecord,
    ) -> Result<(), StoreError> {
        self.transact(redb::Durability::Immediate, |txn, _| {
            notices::put_subscription(txn, tenant, record)
        })
    }

    fn delete_subscription(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        self.transact(redb::Durability::Immediate, |txn, _| {
            notices::delete_subscription(txn, tenant, id)
        })
    }

    fn notices_done(&self, done: &[DoneNotices<'_>]) -> Result<(), StoreError> {
        // A delivered notice may be delivered again after a crash (at least
        // once), so forgetting it need not wait for the disk; a dead letter must be kept.
        let durability = if done.iter().any(|d| d.dead.is_some()) {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        };
        self.transact(durability, |txn, _| notices::done(txn, done))
    }

    fn write_history(
        &self,
        tenant: &str,
        op: HistoryOp,
        now: i64,
        new_tenant: bool,
    ) -> Result<HistoryOutcome, StoreError> {
        self.transact(redb::Durability::Immediate, |txn, h| {
            let out = h.apply(txn, tenant, op, now)?;
            if new_tenant && out == HistoryOutcome::Created {
                Self::add_tenant(txn, tenant)?;
            }
            Ok(out)
        })
    }

    fn import_history(
        &self,
        tenant: &str,
        series: Vec<ImportSeries>,
        now: i64,
        new_tenant: bool,
    ) -> Result<ImportCounts, StoreError> {
        self.transact(redb::Durability::Immediate, |txn, h| {
            if new_tenant {
                Self::add_tenant(txn, tenant)?;
            }
            let (points, series) = h.import(txn, tenant, series, now)?;
            Ok(ImportCounts { points, series })
        })
    }

    fn set_retention(&self, tenant: &str, retention: &Retention) -> Result<(), StoreError> {
        self.transact(redb::Durability::Immediate, |txn, _| {
            history::set_retention(txn, tenant, retention)
        })
    }

    fn maintain_history(&self, now: i64) -> Result<u64, StoreError> {
        self.transact(redb::Durability::Immediate, |txn, h| {
            h.seal_old(txn, now - history::SEAL_AGE_MICROS)?;
            h.apply_retention(txn, now)
        })
    }

    fn ready(&self) -> Result<(), StoreError> {
        let db = match self.db.get() {
            Ok(db) => db,
            Err(_) => self.db.reopen()?,
        };
        // The file is the truth: history's state is read again after a failure.
        self.history_state(&db).map(drop)
    }

    fn reset(&self) -> Result<(), StoreError> {
        let db = self.db.get()?;
        let history = History::load(&db, self.log.clone())?;
        *self.history.lock().unwrap_or_else(|e| e.into_inner()) = Some(history);
        Ok(())
    }

    fn pending_notices(&self, after: u64, limit: usize) -> Result<Vec<(u64, Notice)>, StoreError> {
        notices::pending(&*self.db.get()?, after, limit)
    }

    fn dead_letters(&self, tenant: &str, id: &str) -> Result<Vec<(Notice, String)>, StoreError> {
        notices::dead_letters(&*self.db.get()?, tenant, id)
    }

    fn history(
        &self,
        tenant: &str,
        id: &str,
        request: &HistoryRequest,
    ) -> Result<Option<EntityHistory>, StoreError> {
        history::read(&*self.db.get()?, &self.log, tenant, id, request)
    }

    fn history_entities(
        &self,
        tenant: &str,
        types: Option<&[String]>,
    ) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        history::entities(&*self.db.get()?, tenant, types)
    }

    fn retention(&self, tenant: &str) -> Result<Retention, StoreError> {
        history::retention(&*self.db.get()?, tenant)
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use borough_core::EntityOp;
    use borough_core::query::EntityQuery;
    use borough_core::subscription::Stats;
    use borough_store::{EntityStore, WriterState};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_shared_backend_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        borough_store::testsuite::run_all(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let store = open(&path).unwrap();
        borough_store::testsuite::survives_reopen(store, || open(&path).unwrap()).await;
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
        let store = open_with(dir.path(), options.clone()).unwrap();
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
        let store = open_with(dir.path(), options).unwrap();
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
        let db = store.backend().db.get().unwrap();
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
        let store = open_with(dir.path(), options.clone()).unwrap();
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

        let store = open_with(dir.path(), options).unwrap();
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
        let store = Arc::new(open_with(dir.path(), options).unwrap());
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
        (open_with(dir, options).unwrap(), faults)
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

        let store = open(dir.path()).unwrap();
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
        let store = open_with(dir.path(), options).unwrap();
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
        let store = open(dir.path()).unwrap();
        store.close().await.unwrap();
        let r = store
            .write("t", vec![EntityOp::Delete { id: "urn:x".into() }])
            .await;
        assert!(matches!(r, Err(StoreError::Closed)));
        assert_eq!(store.health().writer, WriterState::Stopped);
    }
}
