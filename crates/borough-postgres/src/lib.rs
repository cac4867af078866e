//! The PostgreSQL backend of the engine (`borough_engine::Backend`).
//!
//! The engine keeps the current state in memory and commits each write group
//! through [`PgBackend::commit`] in one PostgreSQL transaction (committed
//! with the server's `synchronous_commit`, so durable when it returns).
//! Everything lives in one schema (`borough` unless told otherwise), whose
//! layout is versioned: [`MIGRATIONS`] are applied in order at open, under an
//! advisory lock, and a schema newer than this build is refused.
//!
//! The `Backend` calls block. The backend runs its own small tokio runtime
//! for its connections and waits for answers on plain channels, so a call
//! works from the engine's writer thread, the blocking pool or (like a redb
//! read) an async worker alike.

use borough_core::subscription::SubscriptionRecord;
use borough_core::temporal::{
    AttrHistory, EntityHistory, HistoryOp, HistoryOutcome, HistoryRequest, ImportSeries, Retention,
    TimeProperty,
};
use borough_core::{Attribute, Entity};
use borough_engine::temporal::{
    Row, imported_instance, same_instance, select, time_key, widen_cut,
};
use borough_engine::{
    Backend, Committed, DoneNotices, Engine, EngineOptions, EntitySink, Followed, OutboxState,
    WriteSet,
};
use borough_store::{
    ImportCounts, Notice, RecordChange, RecordKind, RecordStore, StoreError, StoredRecord,
};
use futures_util::future::BoxFuture;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use tokio_postgres::{Client, GenericClient, NoTls};

/// The engine over PostgreSQL.
pub type PgStore = Engine<PgBackend>;

/// The schema versions this build knows, each the SQL that makes it from the
/// one before. Those a schema lacks are applied in order, in one transaction.
pub const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    r#"
-- Every commit that changes entities or subscriptions takes the next commit
-- number (counters), and rows carry the number of the commit that wrote
-- them, deletions as tombstones: each node reads what the others committed
-- after what it holds.
CREATE TABLE counters (name text PRIMARY KEY, value bigint NOT NULL);
INSERT INTO counters (name, value) VALUES ('commit', 0), ('notice', 0);
CREATE TABLE entities (
    tenant text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    doc bytea NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX entities_by_version ON entities (version);
CREATE TABLE entity_deletions (
    tenant text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX entity_deletions_by_version ON entity_deletions (version);
CREATE TABLE tenants (name text COLLATE "C" PRIMARY KEY);
CREATE TABLE contexts (id text COLLATE "C" PRIMARY KEY, doc bytea NOT NULL);
CREATE TABLE subscriptions (
    tenant text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    record bytea NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX subscriptions_by_version ON subscriptions (version);
CREATE TABLE subscription_deletions (
    tenant text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX subscription_deletions_by_version ON subscription_deletions (version);
-- Each node delivers the notices of its own commits; those of a node that
-- stopped answering are taken over by another (nodes.seen).
CREATE TABLE outbox (
    seq bigint PRIMARY KEY,
    node text COLLATE "C" NOT NULL,
    tenant text COLLATE "C" NOT NULL,
    subscription text COLLATE "C" NOT NULL,
    notice bytea NOT NULL
);
CREATE INDEX outbox_by_node ON outbox (node, seq);
CREATE TABLE nodes (id text COLLATE "C" PRIMARY KEY, seen timestamptz NOT NULL);
-- Periodic work that runs once among the nodes runs where its lease is held.
CREATE TABLE leases (name text PRIMARY KEY, holder text NOT NULL, until timestamptz NOT NULL);
CREATE TABLE dead_letters (
    seq bigint PRIMARY KEY,
    tenant text COLLATE "C" NOT NULL,
    subscription text COLLATE "C" NOT NULL,
    notice bytea NOT NULL,
    error text NOT NULL
);
CREATE INDEX dead_letters_by_subscription ON dead_letters (tenant, subscription, seq);
CREATE TABLE records (
    kind text COLLATE "C" NOT NULL,
    tenant text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,
    value bytea NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (kind, tenant, key)
);
CREATE INDEX records_by_version ON records (version);
CREATE TABLE record_deletions (
    kind text COLLATE "C" NOT NULL,
    tenant text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (kind, tenant, key)
);
CREATE INDEX record_deletions_by_version ON record_deletions (version);
CREATE TABLE history_entities (
    tenant text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    types text[] NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE TABLE history_series (
    series bigserial PRIMARY KEY,
    tenant text COLLATE "C" NOT NULL,
    entity text COLLATE "C" NOT NULL,
    name text COLLATE "C" NOT NULL,
    dataset text COLLATE "C" NOT NULL,
    UNIQUE (tenant, entity, name, dataset)
);
CREATE SEQUENCE history_seq;
CREATE TABLE history (
    series bigint NOT NULL,
    at bigint NOT NULL,
    seq bigint NOT NULL,
    modified_at bigint NOT NULL,
    attr bytea NOT NULL,
    PRIMARY KEY (series, at, seq)
);
CREATE INDEX history_by_write_time ON history (series, modified_at);
CREATE TABLE retention (tenant text COLLATE "C" PRIMARY KEY, policy bytea NOT NULL);
"#,
)];

/// Most instances of one attribute an aggregation reads from this backend
/// (about 40 MB decoded); a wider range is refused with a clear error.
const MAX_AGGREGATED_ROWS: i64 = 200_000;

/// Entity rows handed from the connection to the parser at a time.
const LOAD_BATCH: usize = 1024;

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

fn db(e: tokio_postgres::Error) -> StoreError {
    // The server's own message (e.g. "relation does not exist"), not only "db error".
    match e.as_db_error() {
        // The server is going away (shutdown, restart, terminated connection).
        Some(d) if d.code().code().starts_with("57P") => {
            StoreError::Unavailable(format!("PostgreSQL: {}", d.message()))
        }
        Some(d) => StoreError::Io(format!("PostgreSQL: {}", d.message())),
        // No answer from the server at all: a lost or refused connection.
        None => StoreError::Unavailable(format!("PostgreSQL cannot be reached: {e}")),
    }
}

fn kind_of(name: &str) -> Option<RecordKind> {
    RecordKind::ALL.into_iter().find(|k| kind_name(*k) == name)
}

fn kind_name(kind: RecordKind) -> &'static str {
    match kind {
        RecordKind::Device => "device",
        RecordKind::Command => "command",
        RecordKind::Tenant => "tenant",
        RecordKind::ApiKey => "api_key",
        RecordKind::Audit => "audit",
        RecordKind::Setting => "setting",
        RecordKind::Registration => "registration",
        RecordKind::RegistrationSubscription => "registration_subscription",
    }
}

/// Where the backend connects, and to which schema.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// A libpq-style URL or key=value string.
    pub url: String,
    /// The schema that holds Borough's tables, created if missing.
    pub schema: String,
}

/// Two connections: one for the writer's transactions, one shared by
/// readers (tokio-postgres pipelines concurrent queries on it). Either is
/// made again when it is lost.
struct Connections {
    options: PgOptions,
    config: tokio_postgres::Config,
    writer: tokio::sync::Mutex<Option<Client>>,
    reader: RwLock<Option<Arc<Client>>>,
}

impl Connections {
    async fn connect(&self) -> Result<Client, StoreError> {
        let (client, connection) = self.config.connect(NoTls).await.map_err(db)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "a PostgreSQL connection ended");
            }
        });
        // A lock held by a node that lost its network ends the wait with a
        // clear error (503) instead of stalling every node's writes.
        client
            .batch_execute(&format!(
                "SET search_path TO {}; SET lock_timeout TO '10s'",
                quote_ident(&self.options.schema)
            ))
            .await
            .map_err(db)?;
        Ok(client)
    }

    async fn reader(&self) -> Result<Arc<Client>, StoreError> {
        if let Some(c) = self
            .reader
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|c| !c.is_closed())
        {
            return Ok(c);
        }
        let c = Arc::new(self.connect().await?);
        *self.reader.write().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
        Ok(c)
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// What this node's memory holds, so that it can tell what other nodes
/// committed: the commit number of each entity and subscription it has
/// (deletions included), and the commit up to which it has taken in all.
#[derive(Default)]
struct Known {
    entities: HashMap<(String, String), i64>,
    subscriptions: HashMap<(String, String), i64>,
    /// Records this node wrote since it started (others' are followed).
    records: HashMap<RecordKey, i64>,
    watermark: i64,
}

/// The PostgreSQL backend.
pub struct PgBackend {
    runtime: Option<tokio::runtime::Runtime>,
    conns: Arc<Connections>,
    known: Arc<std::sync::Mutex<Known>>,
    /// This node's name in `nodes` and `outbox.node`: new at every start.
    node: String,
    /// Since when the writer's connection holds the commit lock between a
    /// stale try and the next one (so that the next one cannot lose again).
    lock_held: std::sync::Mutex<Option<std::time::Instant>>,
}

/// Longest the commit lock is kept for a stale group's next try.
const LOCK_KEPT_AT_MOST: std::time::Duration = std::time::Duration::from_secs(1);

/// How often a node says it is alive.
const HEARTBEAT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a node may be silent before another takes over its notices.
const NODE_TIMEOUT_SECS: f64 = 10.0;

/// A name for this node that no other start shares.
fn node_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos:x}", std::process::id())
}

/// The advisory locks of a schema: `hashtext(schema)` and one of these.
/// Advisory locks are per database, so each schema has its own pair.
const MIGRATION_LOCK: i32 = 0;
const COMMIT_LOCK: i32 = 1;

/// Most rows one call of `follow` reads: above a group's largest
/// (`MAX_GROUP_OPS`), so that each call gets at least one whole commit.
const FOLLOW_ROWS: i64 = 50_000;

/// Takes the schema's commit lock for the transaction, and the next commit
/// number. The lock keeps a stale group's second try first in line (it is
/// then kept past the transaction); the counter's row lock orders commits.
async fn next_commit(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
) -> Result<i64, StoreError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1), $2)",
        &[&schema, &COMMIT_LOCK],
    )
    .await
    .map_err(db)?;
    Ok(tx
        .query_one(
            "UPDATE counters SET value = value + 1 WHERE name = 'commit' RETURNING value",
            &[],
        )
        .await
        .map_err(db)?
        .get(0))
}

fn lock_known(known: &std::sync::Mutex<Known>) -> std::sync::MutexGuard<'_, Known> {
    known.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Opens the store on PostgreSQL, loading every entity into memory.
pub fn open(options: PgOptions, engine: EngineOptions) -> Result<PgStore, StoreError> {
    Engine::start(PgBackend::open(options)?, engine)
}

impl PgBackend {
    /// Connects, creates the schema if missing and brings it to the newest
    /// version this build knows.
    pub fn open(options: PgOptions) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config = options
            .url
            .parse()
            .map_err(|e| io(format!("the PostgreSQL address is not valid: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("borough-postgres")
            .enable_all()
            .build()
            .map_err(io)?;
        let backend = Self {
            runtime: Some(runtime),
            conns: Arc::new(Connections {
                options,
                config,
                writer: tokio::sync::Mutex::new(None),
                reader: RwLock::new(None),
            }),
            known: Arc::default(),
            node: node_name(),
            lock_held: std::sync::Mutex::new(None),
        };
        backend.block(|c| Box::pin(async move { migrate(&c).await }))?;
        let (conns, node) = (backend.conns.clone(), backend.node.clone());
        backend.block(move |_| {
            Box::pin(async move {
                let client = conns.connect().await?;
                heartbeat(&client, &node).await?;
                // From now on on its own connection and task: slow commits,
                // reads or a full writer queue never delay it.
                tokio::spawn(keep_alive(conns, node, client));
                Ok(())
            })
        })?;
        Ok(backend)
    }

    /// Since when the commit lock is kept for a stale group's next try.
    fn lock_held(&self) -> Option<std::time::Instant> {
        *self.lock_held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets go of the session's commit lock (a lost connection has let go already).
    fn release_commit_lock(&self) {
        *self.lock_held.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let released = self.block(|c| {
            Box::pin(async move {
                let guard = c.writer.lock().await;
                if let Some(client) = guard.as_ref().filter(|c| !c.is_closed()) {
                    client
                        .execute(
                            "SELECT pg_advisory_unlock(hashtext($1), $2)",
                            &[&c.options.schema, &COMMIT_LOCK],
                        )
                        .await
                        .map_err(db)?;
                }
                Ok(())
            })
        });
        if let Err(e) = released {
            tracing::warn!(error = %e, "cannot let go of the commit lock");
        }
    }

    /// Marks records as being written by this node, so that `follow` does
    /// not hand its own writes back to it (nor an older version over them);
    /// answers what each held before.
    fn claim_records(&self, keys: Vec<RecordKey>) -> Vec<(RecordKey, Option<i64>)> {
        let mut known = lock_known(&self.known);
        keys.into_iter()
            .map(|k| {
                let before = known.records.insert(k.clone(), i64::MAX);
                (k, before)
            })
            .collect()
    }

    /// Ends a claim: the commit's number, or what was held before if nothing
    /// was written.
    fn settle_records(&self, claimed: Vec<(RecordKey, Option<i64>)>, version: Option<i64>) {
        let mut known = lock_known(&self.known);
        for (k, before) in claimed {
            match version.or(before) {
                Some(v) => known.records.insert(k, v),
                None => known.records.remove(&k),
            };
        }
    }

    /// This node's name, as `outbox.node` holds it.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The schema version of the database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.read(|c| {
            Box::pin(async move {
                let row = c
                    .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
                    .await
                    .map_err(db)?;
                Ok(row.get(0))
            })
        })
    }

    /// Runs `f` on the backend's runtime and waits for it, from any thread.
    fn block<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<Connections>) -> BoxFuture<'static, Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let Some(rt) = &self.runtime else {
            return Err(StoreError::Closed);
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let conns = self.conns.clone();
        rt.spawn(async move {
            let _ = tx.send(f(conns).await);
        });
        rx.recv()
            .map_err(|_| io("the PostgreSQL backend stopped before answering"))?
    }

    /// Runs a read on the shared reader connection.
    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<Client>) -> BoxFuture<'static, Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.block(move |c| {
            Box::pin(async move {
                let client = c.reader().await?;
                f(client).await
            })
        })
    }

    /// Runs `f` in one transaction of the writer's connection; nothing of it
    /// stays when it fails. A lost connection is made again by `ready`.
    fn transact<T: Send + 'static>(
        &self,
        f: impl for<'t> FnOnce(
            &'t tokio_postgres::Transaction<'t>,
        ) -> BoxFuture<'t, Result<T, StoreError>>
        + Send
        + 'static,
    ) -> Result<T, StoreError> {
        self.block(move |c| {
            Box::pin(async move {
                let mut guard = c.writer.lock().await;
                let Some(client) = guard.as_mut() else {
                    return Err(StoreError::Unavailable(
                        "the PostgreSQL connection is being made again".into(),
                    ));
                };
                let result = async {
                    let tx = client.transaction().await.map_err(db)?;
                    let out = f(&tx).await?;
                    tx.commit().await.map_err(db)?;
                    Ok(out)
                }
                .await;
                if result.is_err() && client.is_closed() {
                    *guard = None;
                }
                result
            })
        })
    }
}

/// Says every [`HEARTBEAT_EVERY`] that this node is alive, and takes over
/// the notices of nodes that stopped saying so; makes its connection again
/// when it is lost. Ends with the backend's runtime.
async fn keep_alive(conns: Arc<Connections>, node: String, client: Client) {
    let mut client = Some(client);
    let mut failing = false;
    loop {
        tokio::time::sleep(HEARTBEAT_EVERY).await;
        if client.as_ref().is_none_or(Client::is_closed) {
            client = conns.connect().await.ok();
        }
        let Some(c) = &client else { continue };
        match heartbeat(c, &node).await {
            Ok(()) if failing => {
                tracing::info!("this node says it is alive again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!(error = %e, "this node cannot say it is alive; others take over its notifications after 10 s");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// One heartbeat: this node is alive; the notices of nodes silent for
/// [`NODE_TIMEOUT_SECS`] become this node's.
async fn heartbeat(c: &Client, node: &str) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO nodes (id, seen) VALUES ($1, now()) ON CONFLICT (id) DO UPDATE SET seen = now()",
        &[&node],
    )
    .await
    .map_err(db)?;
    let taken = c
        .execute(
            "UPDATE outbox SET node = $1 WHERE node NOT IN (
                 SELECT id FROM nodes WHERE seen >= now() - make_interval(secs => $2))",
            &[&node, &NODE_TIMEOUT_SECS],
        )
        .await
        .map_err(db)?;
    if taken > 0 {
        tracing::info!(
            notices = taken,
            "took over the notifications of a node that stopped"
        );
    }
    // Nodes long gone, whose notices are all delivered or taken over.
    c.execute(
        "DELETE FROM nodes WHERE seen < now() - interval '1 day'
            AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.node = nodes.id)",
        &[],
    )
    .await
    .map_err(db)?;
    Ok(())
}

/// Creates the schema and applies the migrations it lacks.
async fn migrate(c: &Connections) -> Result<(), StoreError> {
    let mut client = c.connect().await.map_err(|e| {
        io(format!(
            "cannot connect to PostgreSQL at the address given: {e}"
        ))
    })?;
    let schema = quote_ident(&c.options.schema);
    let tx = client.transaction().await.map_err(db)?;
    // One Borough at a time migrates; the others wait, then find it done.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1), $2)",
        &[&c.options.schema, &MIGRATION_LOCK],
    )
    .await
    .map_err(db)?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema}; SET LOCAL search_path TO {schema};
         CREATE TABLE IF NOT EXISTS schema_version (version bigint PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());"
    ))
    .await
    .map_err(db)?;
    let found: i64 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
        .await
        .map_err(db)?
        .get(0);
    let newest = MIGRATIONS.last().map_or(0, |m| m.0);
    if found > newest {
        return Err(io(format!(
            "the PostgreSQL schema '{}' is at version {found}, written by a newer Borough; this one \
             knows versions up to {newest}: run the newer version",
            c.options.schema
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
        tracing::info!(version, schema = %c.options.schema, "migrating the PostgreSQL schema");
        tx.batch_execute(sql).await.map_err(db)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[version],
        )
        .await
        .map_err(db)?;
    }
    tx.commit().await.map_err(db)?;
    *c.writer.lock().await = Some(client);
    Ok(())
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A history series' number, made on first use.
async fn series_for(
    tx: &impl GenericClient,
    tenant: &str,
    entity: &str,
    types: &[String],
    name: &str,
    dataset: Option<&str>,
) -> Result<i64, StoreError> {
    let dataset = dataset.unwrap_or("");
    tx.execute(
        "INSERT INTO history_entities (tenant, id, types) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        &[&tenant, &entity, &types],
    )
    .await
    .map_err(db)?;
    let row = tx
        .query_one(
            "WITH made AS (
                 INSERT INTO history_series (tenant, entity, name, dataset) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING RETURNING series)
             SELECT series FROM made
             UNION ALL
             SELECT series FROM history_series
              WHERE tenant = $1 AND entity = $2 AND name = $3 AND dataset = $4",
            &[&tenant, &entity, &name, &dataset],
        )
        .await
        .map_err(db)?;
    Ok(row.get(0))
}

/// A stored document of `what` (entity, subscription), read; the error names it.
fn parse<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
    tenant: &str,
    id: &str,
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| {
        io(format!(
            "{what} '{id}' of tenant '{tenant}' cannot be read: {e}"
        ))
    })
}

fn encode_attr(attr: &Attribute) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(attr).map_err(io)
}

fn decode_attr(bytes: &[u8]) -> Result<Attribute, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| io(format!("a history instance cannot be read: {e}")))
}

/// Appends instances to one series: (time key, write time, instance).
async fn insert_rows(
    tx: &impl GenericClient,
    series: i64,
    rows: &[Attribute],
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut at = Vec::with_capacity(rows.len());
    let mut modified = Vec::with_capacity(rows.len());
    let mut attrs = Vec::with_capacity(rows.len());
    for a in rows {
        at.push(time_key(a));
        modified.push(a.modified_at);
        attrs.push(encode_attr(a)?);
    }
    tx.execute(
        "INSERT INTO history (series, at, seq, modified_at, attr)
         SELECT $1, t.at, nextval('history_seq'), t.modified_at, t.attr
           FROM unnest($2::bigint[], $3::bigint[], $4::bytea[]) AS t(at, modified_at, attr)",
        &[&series, &at, &modified, &attrs],
    )
    .await
    .map_err(db)?;
    Ok(())
}

/// Whether the series is the entity's, under that attribute name.
async fn owns(
    tx: &impl GenericClient,
    tenant: &str,
    id: &str,
    name: &str,
    series: u64,
) -> Result<bool, StoreError> {
    Ok(tx
        .query_opt(
            "SELECT 1 FROM history_series WHERE series = $1 AND tenant = $2 AND entity = $3 AND name = $4",
            &[&to_i64(series), &tenant, &id, &name],
        )
        .await
        .map_err(db)?
        .is_some())
}

/// Removes series with their instances.
async fn drop_series(tx: &impl GenericClient, series: &[i64]) -> Result<(), StoreError> {
    tx.execute("DELETE FROM history WHERE series = ANY($1)", &[&series])
        .await
        .map_err(db)?;
    tx.execute(
        "DELETE FROM history_series WHERE series = ANY($1)",
        &[&series],
    )
    .await
    .map_err(db)?;
    Ok(())
}

async fn apply_history(
    tx: &tokio_postgres::Transaction<'_>,
    tenant: &str,
    op: HistoryOp,
    now: i64,
    new_tenant: bool,
) -> Result<HistoryOutcome, StoreError> {
    Ok(match op {
        HistoryOp::Append {
            id,
            types,
            instances,
        } => {
            let existed = tx
                .query_opt(
                    "SELECT 1 FROM history_entities WHERE tenant = $1 AND id = $2",
                    &[&tenant, &id],
                )
                .await
                .map_err(db)?
                .is_some();
            for (name, mut attr) in instances {
                let s =
                    series_for(tx, tenant, &id, &types, &name, attr.dataset_id.as_deref()).await?;
                attr.dataset_id = None;
                if attr.observed_at.is_some() {
                    // Sending a temporal representation again adds nothing new.
                    let same_time = tx
                        .query(
                            "SELECT attr FROM history WHERE series = $1 AND at = $2",
                            &[&s, &time_key(&attr)],
                        )
                        .await
                        .map_err(db)?;
                    let mut repeated = false;
                    for r in same_time {
                        repeated |= same_instance(&decode_attr(r.get(0))?, &attr);
                    }
                    if repeated {
                        continue;
                    }
                }
                insert_rows(tx, s, std::slice::from_ref(&attr)).await?;
            }
            if existed {
                HistoryOutcome::Changed
            } else {
                if new_tenant {
                    tx.execute(
                        "INSERT INTO tenants (name) VALUES ($1) ON CONFLICT DO NOTHING",
                        &[&tenant],
                    )
                    .await
                    .map_err(db)?;
                }
                HistoryOutcome::Created
            }
        }
        HistoryOp::DeleteEntity { id } => {
            let gone = tx
                .execute(
                    "DELETE FROM history_entities WHERE tenant = $1 AND id = $2",
                    &[&tenant, &id],
                )
                .await
                .map_err(db)?;
            if gone == 0 {
                return Ok(HistoryOutcome::NotFound);
            }
            let series: Vec<i64> = tx
                .query(
                    "SELECT series FROM history_series WHERE tenant = $1 AND entity = $2",
                    &[&tenant, &id],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            drop_series(tx, &series).await?;
            HistoryOutcome::Changed
        }
        HistoryOp::DeleteAttr {
            id,
            name,
            dataset_id,
            all,
        } => {
            let dataset = dataset_id.unwrap_or_default();
            let series: Vec<i64> = tx
                .query(
                    "SELECT series FROM history_series
                      WHERE tenant = $1 AND entity = $2 AND name = $3 AND ($4 OR dataset = $5)",
                    &[&tenant, &id, &name, &all, &dataset],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if series.is_empty() {
                return Ok(HistoryOutcome::NotFound);
            }
            drop_series(tx, &series).await?;
            HistoryOutcome::Changed
        }
        HistoryOp::DeleteInstance { id, name, instance } => {
            if !owns(tx, tenant, &id, &name, instance.series).await? {
                return Ok(HistoryOutcome::NotFound);
            }
            let gone = tx
                .execute(
                    "DELETE FROM history WHERE series = $1 AND seq = $2",
                    &[&to_i64(instance.series), &to_i64(instance.seq)],
                )
                .await
                .map_err(db)?;
            if gone == 0 {
                HistoryOutcome::NotFound
            } else {
                HistoryOutcome::Changed
            }
        }
        HistoryOp::ModifyInstance {
            id,
            name,
            instance,
            attr,
        } => {
            if !owns(tx, tenant, &id, &name, instance.series).await? {
                return Ok(HistoryOutcome::NotFound);
            }
            let (series, seq) = (to_i64(instance.series), to_i64(instance.seq));
            let Some(row) = tx
                .query_opt(
                    "SELECT attr FROM history WHERE series = $1 AND seq = $2",
                    &[&series, &seq],
                )
                .await
                .map_err(db)?
            else {
                return Ok(HistoryOutcome::NotFound);
            };
            let old = decode_attr(row.get(0))?;
            let mut new = *attr;
            // The time key stays: an instance keeps its place in time.
            new.observed_at = old.observed_at;
            new.dataset_id = None;
            new.created_at = old.created_at;
            new.modified_at = if old.observed_at.is_none() {
                old.modified_at
            } else {
                now
            };
            tx.execute(
                "UPDATE history SET attr = $3, modified_at = $4 WHERE series = $1 AND seq = $2",
                &[&series, &seq, &encode_attr(&new)?, &new.modified_at],
            )
            .await
            .map_err(db)?;
            HistoryOutcome::Changed
        }
    })
}

/// Every row a commit after `watermark` wrote, in commit order, and the
/// commit up to which they are complete.
async fn read_commits_after(
    c: &Client,
    watermark: i64,
) -> Result<(i64, Vec<tokio_postgres::Row>), StoreError> {
    // Most of the time nothing moved: one row says so.
    let committed: i64 = c
        .query_one("SELECT value FROM counters WHERE name = 'commit'", &[])
        .await
        .map_err(db)?
        .get(0);
    if committed <= watermark {
        return Ok((committed, Vec::new()));
    }
    // One statement: one snapshot, which holds every commit up to some
    // number (at least `committed`, read before).
    const CHANGES: &str = "
        SELECT 0, tenant, id, doc, version, NULL::text FROM entities WHERE version > $1 AND version <= $2
        UNION ALL SELECT 1, tenant, id, NULL, version, NULL FROM entity_deletions WHERE version > $1 AND version <= $2
        UNION ALL SELECT 2, tenant, id, record, version, NULL FROM subscriptions WHERE version > $1 AND version <= $2
        UNION ALL SELECT 3, tenant, id, NULL, version, NULL FROM subscription_deletions WHERE version > $1 AND version <= $2
        UNION ALL SELECT 4, tenant, key, value, version, kind FROM records WHERE version > $1 AND version <= $2
        UNION ALL SELECT 5, tenant, key, NULL, version, kind FROM record_deletions WHERE version > $1 AND version <= $2
        ORDER BY 5 LIMIT $3";
    let rows = c
        .query(CHANGES, &[&watermark, &i64::MAX, &FOLLOW_ROWS])
        .await
        .map_err(db)?;
    if (rows.len() as i64) < FOLLOW_ROWS {
        // Some numbers were taken by tries that wrote nothing.
        let last = rows.last().map_or(watermark, |r| r.get::<_, i64>(4));
        return Ok((last.max(committed), rows));
    }
    let first: i64 = rows[0].get(4);
    let last: i64 = rows[rows.len() - 1].get(4);
    if first < last {
        // Cut inside commit `last`: it is read again, whole, next time.
        return Ok((last - 1, rows));
    }
    // One commit larger than a page: read it whole.
    let rows = c
        .query(CHANGES, &[&(first - 1), &first, &i64::MAX])
        .await
        .map_err(db)?;
    Ok((first, rows))
}

/// One change another node committed, read.
struct FollowedRow {
    version: i64,
    change: FollowedChange,
}

enum FollowedChange {
    Entity(String, String, Option<Entity>),
    Subscription(String, String, Option<SubscriptionRecord>),
    Record(RecordChange),
}

impl FollowedRow {
    fn of(r: &tokio_postgres::Row) -> Result<Self, StoreError> {
        let (kind, tenant, id, version): (i32, String, String, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(4));
        let bytes: Option<Vec<u8>> = r.get(3);
        let change = match kind {
            0 | 1 => {
                let entity = match &bytes {
                    Some(doc) => Some(parse(doc, "entity", &tenant, &id)?),
                    None => None,
                };
                FollowedChange::Entity(tenant, id, entity)
            }
            2 | 3 => {
                let record = match &bytes {
                    Some(b) => Some(parse(b, "subscription", &tenant, &id)?),
                    None => None,
                };
                FollowedChange::Subscription(tenant, id, record)
            }
            _ => {
                let name: String = r.get(5);
                let kind = kind_of(&name)
                    .ok_or_else(|| io(format!("a record of unknown kind '{name}'")))?;
                FollowedChange::Record(RecordChange {
                    kind,
                    tenant,
                    key: id,
                    value: bytes,
                })
            }
        };
        Ok(Self { version, change })
    }
}

/// What the load of the entities sends, in order.
enum Loading {
    /// (tenant, id, the stored entity, its commit number).
    Entities(Vec<(String, String, Vec<u8>, i64)>),
    /// Tombstones: (tenant, id, the commit that deleted it).
    Deleted(Vec<(String, String, i64)>),
    /// The tenants, and the commit up to which the snapshot holds everything.
    Done {
        tenants: Vec<String>,
        watermark: i64,
    },
}

/// Streams the entities of one snapshot to `out`.
async fn load_snapshot(
    conns: &Connections,
    out: &std::sync::mpsc::SyncSender<Result<Loading, StoreError>>,
) -> Result<(), StoreError> {
    let mut client = conns.connect().await?;
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(db)?;
    let watermark: i64 = tx
        .query_one("SELECT value FROM counters WHERE name = 'commit'", &[])
        .await
        .map_err(db)?
        .get(0);
    let rows = tx
        .query_raw(
            "SELECT tenant, id, doc, version FROM entities",
            std::iter::empty::<i64>(),
        )
        .await
        .map_err(db)?;
    futures_util::pin_mut!(rows);
    let mut batch = Vec::with_capacity(LOAD_BATCH);
    while let Some(row) = futures_util::StreamExt::next(&mut rows).await {
        let row = row.map_err(db)?;
        batch.push((row.get(0), row.get(1), row.get(2), row.get(3)));
        if batch.len() == LOAD_BATCH {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(LOAD_BATCH));
            if out.send(Ok(Loading::Entities(full))).is_err() {
                return Ok(());
            }
        }
    }
    let _ = out.send(Ok(Loading::Entities(batch)));
    let deleted = tx
        .query("SELECT tenant, id, version FROM entity_deletions", &[])
        .await
        .map_err(db)?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let _ = out.send(Ok(Loading::Deleted(deleted)));
    let tenants = tx
        .query("SELECT name FROM tenants", &[])
        .await
        .map_err(db)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let _ = out.send(Ok(Loading::Done { tenants, watermark }));
    Ok(())
}

impl RecordStore for PgBackend {
    fn write_records(&self, changes: &[RecordChange]) -> Result<(), StoreError> {
        let changes = changes.to_vec();
        let claimed = self.claim_records(changes.iter().map(record_key).collect());
        let schema = self.conns.options.schema.clone();
        let version = self.transact(move |tx| {
            Box::pin(async move {
                let version = next_commit(tx, &schema).await?;
                write_records(tx, &changes, version).await?;
                Ok(version)
            })
        });
        self.settle_records(claimed, version.as_ref().ok().copied());
        version.map(drop)
    }

    fn insert_record_if_absent(&self, change: &RecordChange) -> Result<bool, StoreError> {
        let Some(value) = change.value.clone() else {
            return Ok(false);
        };
        let key = record_key(change);
        let (kind, tenant, name) = key.clone();
        let claimed = self.claim_records(vec![key]);
        let schema = self.conns.options.schema.clone();
        let version = self.transact(move |tx| {
            Box::pin(async move {
                let version = next_commit(tx, &schema).await?;
                let n = tx
                    .execute(
                        "INSERT INTO records (kind, tenant, key, value, version) VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (kind, tenant, key) DO NOTHING",
                        &[&kind, &tenant, &name, &value, &version],
                    )
                    .await
                    .map_err(db)?;
                Ok((n > 0).then_some(version))
            })
        });
        let written = version.as_ref().ok().copied().flatten();
        self.settle_records(claimed, written);
        Ok(version?.is_some())
    }

    fn replace_record_if(
        &self,
        change: &RecordChange,
        expected: &[u8],
    ) -> Result<bool, StoreError> {
        let Some(value) = change.value.clone() else {
            return Ok(false);
        };
        let key = record_key(change);
        let (kind, tenant, name) = key.clone();
        let expected = expected.to_vec();
        let claimed = self.claim_records(vec![key]);
        let schema = self.conns.options.schema.clone();
        let version = self.transact(move |tx| {
            Box::pin(async move {
                let version = next_commit(tx, &schema).await?;
                let n = tx
                    .execute(
                        "UPDATE records SET value = $4, version = $6
                          WHERE kind = $1 AND tenant = $2 AND key = $3 AND value = $5",
                        &[&kind, &tenant, &name, &value, &expected, &version],
                    )
                    .await
                    .map_err(db)?;
                Ok((n > 0).then_some(version))
            })
        });
        let written = version.as_ref().ok().copied().flatten();
        self.settle_records(claimed, written);
        Ok(version?.is_some())
    }

    fn records(&self, kind: RecordKind) -> Result<Vec<StoredRecord>, StoreError> {
        self.read(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT tenant, key, value FROM records WHERE kind = $1 ORDER BY tenant, key",
                        &[&kind_name(kind)],
                    )
                    .await
                    .map_err(db)?;
                Ok(rows
                    .iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2)))
                    .collect())
            })
        })
    }

    fn records_page(
        &self,
        kind: RecordKind,
        tenant: &str,
        after: Option<&str>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let tenant = tenant.to_string();
        let after = after.map(str::to_string);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| {
            Box::pin(async move {
                let sql = if reverse {
                    "SELECT tenant, key, value FROM records
                      WHERE kind = $1 AND tenant = $2 AND ($3::text IS NULL OR key < $3)
                      ORDER BY key DESC LIMIT $4"
                } else {
                    "SELECT tenant, key, value FROM records
                      WHERE kind = $1 AND tenant = $2 AND ($3::text IS NULL OR key > $3)
                      ORDER BY key LIMIT $4"
                };
                let rows = c
                    .query(sql, &[&kind_name(kind), &tenant, &after, &limit])
                    .await
                    .map_err(db)?;
                Ok(rows
                    .iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2)))
                    .collect())
            })
        })
    }
}

/// A record by (kind, tenant, key).
type RecordKey = (String, String, String);

fn record_key(c: &RecordChange) -> RecordKey {
    (
        kind_name(c.kind).to_string(),
        c.tenant.clone(),
        c.key.clone(),
    )
}

/// Writes record changes as part of commit `version` (deletions leave tombstones).
async fn write_records(
    tx: &impl GenericClient,
    changes: &[RecordChange],
    version: i64,
) -> Result<(), StoreError> {
    for c in changes {
        let kind = kind_name(c.kind);
        match &c.value {
            Some(v) => {
                tx.execute(
                    "INSERT INTO records (kind, tenant, key, value, version) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (kind, tenant, key) DO UPDATE SET value = EXCLUDED.value, version = EXCLUDED.version",
                    &[&kind, &c.tenant, &c.key, v, &version],
                )
                .await
                .map_err(db)?;
                tx.execute(
                    "DELETE FROM record_deletions WHERE kind = $1 AND tenant = $2 AND key = $3",
                    &[&kind, &c.tenant, &c.key],
                )
                .await
                .map_err(db)?;
            }
            None => {
                tx.execute(
                    "DELETE FROM records WHERE kind = $1 AND tenant = $2 AND key = $3",
                    &[&kind, &c.tenant, &c.key],
                )
                .await
                .map_err(db)?;
                tx.execute(
                    "INSERT INTO record_deletions (kind, tenant, key, version) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (kind, tenant, key) DO UPDATE SET version = EXCLUDED.version",
                    &[&kind, &c.tenant, &c.key, &version],
                )
                .await
                .map_err(db)?;
            }
        }
    }
    Ok(())
}

/// A history series by (tenant, entity, attribute, datasetId).
type SeriesKey = (String, String, String, String);

/// One group's rows, serialized before the transaction starts.
struct GroupRows {
    put_tenants: Vec<String>,
    put_ids: Vec<String>,
    put_docs: Vec<Vec<u8>>,
    del_tenants: Vec<String>,
    del_ids: Vec<String>,
    new_tenants: Vec<String>,
    notice_tenants: Vec<String>,
    notice_subs: Vec<String>,
    notices: Vec<Vec<u8>>,
    /// The node that delivers the notices.
    node: String,
    /// Series → the entity's types and the new instances.
    history: BTreeMap<SeriesKey, (Vec<String>, Vec<Attribute>)>,
    records: Vec<RecordChange>,
}

impl GroupRows {
    fn of(set: &WriteSet<'_>, node: &str) -> Result<Self, StoreError> {
        let mut g = GroupRows {
            put_tenants: Vec::new(),
            put_ids: Vec::new(),
            put_docs: Vec::new(),
            del_tenants: Vec::new(),
            del_ids: Vec::new(),
            new_tenants: set.new_tenants.to_vec(),
            notice_tenants: Vec::new(),
            notice_subs: Vec::new(),
            notices: Vec::new(),
            node: node.to_string(),
            history: BTreeMap::new(),
            records: set.records.to_vec(),
        };
        for ((tenant, id), entity) in set.entities {
            match entity {
                Some(e) => {
                    g.put_tenants.push(tenant.clone());
                    g.put_ids.push(id.clone());
                    g.put_docs.push(serde_json::to_vec(e.as_ref()).map_err(io)?);
                }
                None => {
                    g.del_tenants.push(tenant.clone());
                    g.del_ids.push(id.clone());
                }
            }
        }
        for n in set.notices {
            g.notice_tenants.push(n.tenant.clone());
            g.notice_subs.push(n.subscription.clone());
            g.notices.push(serde_json::to_vec(n).map_err(io)?);
        }
        for r in set.history {
            for &(a, i) in &r.instances {
                let Some((name, list)) = r.entity.attrs.get_index(a) else {
                    continue;
                };
                let Some(attr) = list.get(i) else { continue };
                let key = (
                    r.tenant.clone(),
                    r.entity.id.clone(),
                    name.clone(),
                    attr.dataset_id.clone().unwrap_or_default(),
                );
                let mut attr = attr.clone();
                attr.dataset_id = None;
                g.history
                    .entry(key)
                    .or_insert_with(|| (r.entity.types.clone(), Vec::new()))
                    .1
                    .push(attr);
            }
        }
        Ok(g)
    }

    /// Whether every entity of the group is still as this node read it.
    async fn current(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        expected: &HashMap<(String, String), i64>,
    ) -> Result<bool, StoreError> {
        let (tenants, ids): (Vec<&String>, Vec<&String>) = self
            .put_tenants
            .iter()
            .zip(&self.put_ids)
            .chain(self.del_tenants.iter().zip(&self.del_ids))
            .unzip();
        let stored = tx
            .query(
                "SELECT k.tenant, k.id, coalesce(e.version, d.version, 0)
                   FROM unnest($1::text[], $2::text[]) AS k(tenant, id)
                   LEFT JOIN entities e ON e.tenant = k.tenant AND e.id = k.id
                   LEFT JOIN entity_deletions d ON d.tenant = k.tenant AND d.id = k.id",
                &[&tenants, &ids],
            )
            .await
            .map_err(db)?;
        Ok(stored.iter().all(|r| {
            let key: (String, String) = (r.get(0), r.get(1));
            let version: i64 = r.get(2);
            expected.get(&key).copied().unwrap_or(0) == version
        }))
    }

    async fn write(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        version: i64,
        first_notice: i64,
    ) -> Result<(), StoreError> {
        if !self.put_ids.is_empty() {
            tx.execute(
                "INSERT INTO entities (tenant, id, doc, version)
                 SELECT t.tenant, t.id, t.doc, $4 FROM unnest($1::text[], $2::text[], $3::bytea[]) AS t(tenant, id, doc)
                 ON CONFLICT (tenant, id) DO UPDATE SET doc = EXCLUDED.doc, version = EXCLUDED.version",
                &[&self.put_tenants, &self.put_ids, &self.put_docs, &version],
            )
            .await
            .map_err(db)?;
            tx.execute(
                "DELETE FROM entity_deletions e USING unnest($1::text[], $2::text[]) AS d(tenant, id)
                  WHERE e.tenant = d.tenant AND e.id = d.id",
                &[&self.put_tenants, &self.put_ids],
            )
            .await
            .map_err(db)?;
        }
        if !self.del_ids.is_empty() {
            tx.execute(
                "DELETE FROM entities e USING unnest($1::text[], $2::text[]) AS d(tenant, id)
                  WHERE e.tenant = d.tenant AND e.id = d.id",
                &[&self.del_tenants, &self.del_ids],
            )
            .await
            .map_err(db)?;
            tx.execute(
                "INSERT INTO entity_deletions (tenant, id, version)
                 SELECT t.tenant, t.id, $3 FROM unnest($1::text[], $2::text[]) AS t(tenant, id)
                 ON CONFLICT (tenant, id) DO UPDATE SET version = EXCLUDED.version",
                &[&self.del_tenants, &self.del_ids, &version],
            )
            .await
            .map_err(db)?;
        }
        if !self.new_tenants.is_empty() {
            tx.execute(
                "INSERT INTO tenants (name) SELECT * FROM unnest($1::text[]) ON CONFLICT DO NOTHING",
                &[&self.new_tenants],
            )
            .await
            .map_err(db)?;
        }
        if !self.notices.is_empty() {
            let seqs: Vec<i64> = (0..self.notices.len())
                .map(|i| first_notice + i as i64)
                .collect();
            tx.execute(
                "INSERT INTO outbox (seq, node, tenant, subscription, notice)
                 SELECT t.seq, $5, t.tenant, t.subscription, t.notice
                   FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bytea[])
                     AS t(seq, tenant, subscription, notice)",
                &[
                    &seqs,
                    &self.notice_tenants,
                    &self.notice_subs,
                    &self.notices,
                    &self.node,
                ],
            )
            .await
            .map_err(db)?;
        }
        write_series(tx, &self.history).await?;
        write_records(tx, &self.records, version).await
    }
}

/// Instances of many series in four statements, whatever their number: the
/// entities and series that are new, the series' numbers, the instances.
async fn write_series(
    tx: &tokio_postgres::Transaction<'_>,
    history: &BTreeMap<SeriesKey, (Vec<String>, Vec<Attribute>)>,
) -> Result<(), StoreError> {
    if history.is_empty() {
        return Ok(());
    }
    let mut entities: BTreeMap<(&str, &str), String> = BTreeMap::new();
    let (mut tenants, mut ids, mut names, mut datasets) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((tenant, entity, name, dataset), (types, _)) in history {
        entities
            .entry((tenant.as_str(), entity.as_str()))
            .or_insert_with(|| serde_json::to_string(types).unwrap_or_else(|_| "[]".into()));
        tenants.push(tenant.as_str());
        ids.push(entity.as_str());
        names.push(name.as_str());
        datasets.push(dataset.as_str());
    }
    let (e_tenants, e_ids, e_types): (Vec<&str>, Vec<&str>, Vec<&str>) = entities
        .iter()
        .map(|((t, e), types)| (*t, *e, types.as_str()))
        .fold(
            (Vec::new(), Vec::new(), Vec::new()),
            |mut acc, (t, e, ty)| {
                acc.0.push(t);
                acc.1.push(e);
                acc.2.push(ty);
                acc
            },
        );
    tx.execute(
        "INSERT INTO history_entities (tenant, id, types)
             SELECT t.tenant, t.id, ARRAY(SELECT jsonb_array_elements_text(t.types::jsonb))
               FROM unnest($1::text[], $2::text[], $3::text[]) AS t(tenant, id, types)
             ON CONFLICT DO NOTHING",
        &[&e_tenants, &e_ids, &e_types],
    )
    .await
    .map_err(db)?;
    tx.execute(
        "INSERT INTO history_series (tenant, entity, name, dataset)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
             ON CONFLICT DO NOTHING",
        &[&tenants, &ids, &names, &datasets],
    )
    .await
    .map_err(db)?;
    let numbered = tx
        .query(
            "SELECT k.n, s.series
                   FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                        WITH ORDINALITY AS k(tenant, entity, name, dataset, n)
                   JOIN history_series s USING (tenant, entity, name, dataset)",
            &[&tenants, &ids, &names, &datasets],
        )
        .await
        .map_err(db)?;
    let mut series_of = vec![0i64; history.len()];
    for r in numbered {
        let (n, series): (i64, i64) = (r.get(0), r.get(1));
        if let Some(slot) = usize::try_from(n - 1)
            .ok()
            .and_then(|i| series_of.get_mut(i))
        {
            *slot = series;
        }
    }
    let (mut series, mut at, mut modified, mut attrs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((_, (_, rows)), s) in history.iter().zip(&series_of) {
        for a in rows {
            series.push(*s);
            at.push(time_key(a));
            modified.push(a.modified_at);
            attrs.push(encode_attr(a)?);
        }
    }
    tx.execute(
        "INSERT INTO history (series, at, seq, modified_at, attr)
             SELECT t.series, t.at, nextval('history_seq'), t.modified_at, t.attr
               FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bytea[])
                 AS t(series, at, modified_at, attr)",
        &[&series, &at, &modified, &attrs],
    )
    .await
    .map_err(db)?;
    Ok(())
}

impl Backend for PgBackend {
    fn load_entities(&self, sink: &mut EntitySink<'_>) -> Result<Vec<String>, StoreError> {
        let Some(rt) = &self.runtime else {
            return Err(StoreError::Closed);
        };
        // One snapshot, read on a connection of its own; the rows stream in
        // batches and are parsed here.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Loading, StoreError>>(4);
        let conns = self.conns.clone();
        rt.spawn(async move {
            if let Err(e) = load_snapshot(&conns, &tx).await {
                let _ = tx.send(Err(e));
            }
        });
        let mut known = Known::default();
        let mut tenants = Vec::new();
        let mut finished = false;
        for message in rx {
            match message? {
                Loading::Entities(batch) => {
                    for (tenant, id, doc, version) in batch {
                        let mut entity: Entity = parse(&doc, "entity", &tenant, &id)?;
                        entity.shrink_to_fit();
                        known.entities.insert((tenant.clone(), id.clone()), version);
                        sink(tenant, id, entity);
                    }
                }
                Loading::Deleted(batch) => {
                    for (tenant, id, version) in batch {
                        known.entities.insert((tenant, id), version);
                    }
                }
                Loading::Done {
                    tenants: names,
                    watermark,
                } => {
                    tenants = names;
                    known.watermark = watermark;
                    finished = true;
                }
            }
        }
        if !finished {
            return Err(io("loading from PostgreSQL stopped before the end"));
        }
        let mut current = lock_known(&self.known);
        known.subscriptions = std::mem::take(&mut current.subscriptions);
        known.records = std::mem::take(&mut current.records);
        // Loaded again (after a panic in the writer): subscriptions and
        // records other nodes changed since the last follow are still to be
        // read, so the watermark does not jump ahead of them.
        if current.watermark > 0 {
            known.watermark = known.watermark.min(current.watermark);
        }
        *current = known;
        Ok(tenants)
    }

    fn load_subscriptions(&self) -> Result<Vec<(String, SubscriptionRecord)>, StoreError> {
        let known = self.known.clone();
        self.read(move |c| {
            Box::pin(async move {
                let rows = c
                    .query("SELECT tenant, id, record, version FROM subscriptions", &[])
                    .await
                    .map_err(db)?;
                let mut out = Vec::with_capacity(rows.len());
                for r in &rows {
                    let (tenant, id, version): (String, String, i64) =
                        (r.get(0), r.get(1), r.get(3));
                    let record = parse(r.get(2), "subscription", &tenant, &id)?;
                    known
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .subscriptions
                        .insert((tenant.clone(), id), version);
                    out.push((tenant, record));
                }
                Ok(out)
            })
        })
    }

    fn load_outbox(&self) -> Result<OutboxState, StoreError> {
        let node = self.node.clone();
        self.read(move |c| {
            Box::pin(async move {
                let mut state = OutboxState::default();
                // This node's own (none at a start: its name is new); those
                // it takes over later are delivered without being counted.
                for r in c
                    .query(
                        "SELECT tenant, subscription, count(*) FROM outbox WHERE node = $1
                          GROUP BY tenant, subscription",
                        &[&node],
                    )
                    .await
                    .map_err(db)?
                {
                    let n: i64 = r.get(2);
                    state.pending.insert((r.get(0), r.get(1)), to_u64(n));
                }
                let last: i64 = c
                    .query_one("SELECT value FROM counters WHERE name = 'notice'", &[])
                    .await
                    .map_err(db)?
                    .get(0);
                state.next_notice = to_u64(last) + 1;
                Ok(state)
            })
        })
    }

    fn commit(&self, set: &WriteSet<'_>) -> Result<Committed, StoreError> {
        let rows = GroupRows::of(set, &self.node)?;
        let expected: HashMap<(String, String), i64> = {
            let known = lock_known(&self.known);
            set.entities
                .keys()
                .map(|k| (k.clone(), known.entities.get(k).copied().unwrap_or(0)))
                .collect()
        };
        let claimed = self.claim_records(set.records.iter().map(record_key).collect());
        let notices = to_i64(set.notices.len() as u64);
        let schema = self.conns.options.schema.clone();
        let outcome = self.transact(move |tx| {
            Box::pin(async move {
                let version = next_commit(tx, &schema).await?;
                if !rows.current(tx, &expected).await? {
                    // Kept past this transaction: the next try of the group,
                    // once this node caught up, comes before any other commit.
                    tx.execute(
                        "SELECT pg_advisory_lock(hashtext($1), $2)",
                        &[&schema, &COMMIT_LOCK],
                    )
                    .await
                    .map_err(db)?;
                    return Ok(None);
                }
                let first_notice: i64 = tx
                    .query_one(
                        "UPDATE counters SET value = value + $1 WHERE name = 'notice'
                         RETURNING value - $1 + 1",
                        &[&notices],
                    )
                    .await
                    .map_err(db)?
                    .get(0);
                rows.write(tx, version, first_notice).await?;
                Ok(Some((version, first_notice, expected)))
            })
        });
        let was_held = self.lock_held().is_some();
        let (version, first_notice, written) = match outcome {
            Ok(Some(done)) => done,
            Ok(None) => {
                self.settle_records(claimed, None);
                if !was_held {
                    *self.lock_held.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(std::time::Instant::now());
                }
                return Ok(Committed::Stale);
            }
            Err(e) => {
                self.settle_records(claimed, None);
                if was_held {
                    self.release_commit_lock();
                }
                return Err(e);
            }
        };
        if was_held {
            self.release_commit_lock();
        }
        self.settle_records(claimed, Some(version));
        let mut known = lock_known(&self.known);
        for key in written.into_keys() {
            known.entities.insert(key, version);
        }
        Ok(Committed::Done {
            first_notice: to_u64(first_notice),
        })
    }

    fn abandon_stale(&self) {
        if self.lock_held().is_some() {
            self.release_commit_lock();
        }
    }

    fn shared(&self) -> bool {
        true
    }

    fn follow(&self) -> Result<Followed, StoreError> {
        // A stale group's next try comes at once; a lock kept longer was
        // left by a try that never came.
        if self
            .lock_held()
            .is_some_and(|t| t.elapsed() > LOCK_KEPT_AT_MOST)
        {
            self.release_commit_lock();
        }
        let watermark = lock_known(&self.known).watermark;
        // On the writer's connection: the writer thread is its only user, so
        // slow reads of others never hold following up.
        let (through, rows) = self.block(move |c| {
            Box::pin(async move {
                let guard = c.writer.lock().await;
                let Some(client) = guard.as_ref() else {
                    return Err(StoreError::Unavailable(
                        "the PostgreSQL connection is being made again".into(),
                    ));
                };
                read_commits_after(client, watermark).await
            })
        })?;
        // Everything is read before anything is taken in: a row that cannot
        // be read leaves this node where it was, to try again.
        let mut parsed = Vec::with_capacity(rows.len());
        for r in &rows {
            parsed.push(FollowedRow::of(r)?);
        }
        let mut followed = Followed::default();
        let mut known = lock_known(&self.known);
        for row in parsed {
            let version = row.version;
            let held = match &row.change {
                FollowedChange::Entity(t, id, _) => known.entities.get(&(t.clone(), id.clone())),
                FollowedChange::Subscription(t, id, _) => {
                    known.subscriptions.get(&(t.clone(), id.clone()))
                }
                FollowedChange::Record(c) => known.records.get(&record_key(c)),
            };
            // What this node wrote itself, or holds newer, is in memory already.
            if held.is_some_and(|v| *v >= version) {
                continue;
            }
            match row.change {
                FollowedChange::Entity(t, id, e) => {
                    known.entities.insert((t.clone(), id.clone()), version);
                    followed.entities.push((t, id, e));
                }
                FollowedChange::Subscription(t, id, r) => {
                    known.subscriptions.insert((t.clone(), id.clone()), version);
                    followed.subscriptions.push((t, id, r));
                }
                FollowedChange::Record(c) => {
                    known.records.insert(record_key(&c), version);
                    followed.records.push(c);
                }
            }
        }
        known.watermark = known.watermark.max(through);
        Ok(followed)
    }

    fn put_subscription(
        &self,
        tenant: &str,
        record: &SubscriptionRecord,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(io)?;
        let key = (tenant.to_string(), record.id.clone());
        let (tenant, id) = key.clone();
        let schema = self.conns.options.schema.clone();
        let version = self.transact(move |tx| {
            Box::pin(async move {
                let version = next_commit(tx, &schema).await?;
                tx.execute(
                    "INSERT INTO subscriptions (tenant, id, record, version) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (tenant, id) DO UPDATE SET record = EXCLUDED.record, version = EXCLUDED.version",
                    &[&tenant, &id, &bytes, &version],
                )
                .await
                .map_err(db)?;
                tx.execute(
                    "DELETE FROM subscription_deletions WHERE tenant = $1 AND id = $2",
                    &[&tenant, &id],
                )
                .await
                .map_err(db)?;
                Ok(version)
            })
        })?;
        lock_known(&self.known).subscriptions.insert(key, version);
        Ok(())
    }

    fn delete_subscription(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        let key = (tenant.to_string(), id.to_string());
        let (tenant, id) = key.clone();
        let schema = self.conns.options.schema.clone();
        let (existed, version) = self.transact(move |tx| {
            Box::pin(async move {
                let version = next_commit(tx, &schema).await?;
                let n = tx
                    .execute(
                        "DELETE FROM subscriptions WHERE tenant = $1 AND id = $2",
                        &[&tenant, &id],
                    )
                    .await
                    .map_err(db)?;
                tx.execute(
                    "INSERT INTO subscription_deletions (tenant, id, version) VALUES ($1, $2, $3)
                     ON CONFLICT (tenant, id) DO UPDATE SET version = EXCLUDED.version",
                    &[&tenant, &id, &version],
                )
                .await
                .map_err(db)?;
                Ok((n > 0, version))
            })
        })?;
        lock_known(&self.known).subscriptions.insert(key, version);
        Ok(existed)
    }

    fn notices_done(&self, done: &[DoneNotices<'_>]) -> Result<(), StoreError> {
        let mut forget = Vec::new();
        let mut dead: Vec<(i64, String, String, Vec<u8>, String)> = Vec::new();
        for batch in done {
            for (seq, n) in batch.notices {
                forget.push(to_i64(*seq));
                if let Some(error) = batch.dead {
                    dead.push((
                        to_i64(*seq),
                        n.tenant.clone(),
                        n.subscription.clone(),
                        serde_json::to_vec(n).map_err(io)?,
                        error.to_string(),
                    ));
                }
            }
        }
        self.transact(move |tx| {
            Box::pin(async move {
                if dead.is_empty() {
                    // Forgetting a delivered notice need not wait for the disk:
                    // delivery is at least once.
                    tx.batch_execute("SET LOCAL synchronous_commit TO off")
                        .await
                        .map_err(db)?;
                }
                tx.execute("DELETE FROM outbox WHERE seq = ANY($1)", &[&forget])
                    .await
                    .map_err(db)?;
                for (seq, tenant, sub, notice, error) in &dead {
                    tx.execute(
                        "INSERT INTO dead_letters (seq, tenant, subscription, notice, error)
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO NOTHING",
                        &[seq, tenant, sub, notice, error],
                    )
                    .await
                    .map_err(db)?;
                }
                Ok(())
            })
        })
    }

    fn write_history(
        &self,
        tenant: &str,
        op: HistoryOp,
        now: i64,
        new_tenant: bool,
    ) -> Result<HistoryOutcome, StoreError> {
        let tenant = tenant.to_string();
        self.transact(move |tx| {
            Box::pin(async move { apply_history(tx, &tenant, op, now, new_tenant).await })
        })
    }

    fn import_history(
        &self,
        tenant: &str,
        series: Vec<ImportSeries>,
        now: i64,
        new_tenant: bool,
    ) -> Result<ImportCounts, StoreError> {
        let tenant = tenant.to_string();
        self.transact(move |tx| {
            Box::pin(async move {
                if new_tenant {
                    tx.execute(
                        "INSERT INTO tenants (name) VALUES ($1) ON CONFLICT DO NOTHING",
                        &[&tenant],
                    )
                    .await
                    .map_err(db)?;
                }
                let mut counts = ImportCounts {
                    points: 0,
                    series: series.len() as u64,
                };
                let mut rows: BTreeMap<SeriesKey, (Vec<String>, Vec<Attribute>)> = BTreeMap::new();
                for one in series {
                    counts.points += one.points.len() as u64;
                    let key = (tenant.clone(), one.entity, one.name, String::new());
                    let (_, instances) = rows
                        .entry(key)
                        .or_insert_with(|| (vec![one.entity_type], Vec::new()));
                    instances.extend(
                        one.points
                            .into_iter()
                            .map(|(at, value)| imported_instance(at, value, now)),
                    );
                }
                write_series(tx, &rows).await?;
                Ok(counts)
            })
        })
    }

    fn set_retention(&self, tenant: &str, retention: &Retention) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(retention).map_err(io)?;
        let tenant = tenant.to_string();
        self.transact(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "INSERT INTO retention (tenant, policy) VALUES ($1, $2)
                     ON CONFLICT (tenant) DO UPDATE SET policy = EXCLUDED.policy",
                    &[&tenant, &bytes],
                )
                .await
                .map_err(db)?;
                Ok(())
            })
        })
    }

    fn maintain_history(&self, now: i64) -> Result<u64, StoreError> {
        // Once among the nodes: where the lease is (maintenance comes every 30 s).
        if !self.lease("history-maintenance", std::time::Duration::from_secs(90))? {
            return Ok(0);
        }
        self.transact(move |tx| {
            Box::pin(async move {
                let mut removed = 0;
                for policy in tx
                    .query("SELECT tenant, policy FROM retention", &[])
                    .await
                    .map_err(db)?
                {
                    let tenant: String = policy.get(0);
                    let Ok(policy) = serde_json::from_slice::<Retention>(policy.get(1)) else {
                        continue;
                    };
                    // Entities grouped by the cutoff their types give.
                    let mut by_cutoff: HashMap<i64, Vec<String>> = HashMap::new();
                    for e in tx
                        .query(
                            "SELECT id, types FROM history_entities WHERE tenant = $1",
                            &[&tenant],
                        )
                        .await
                        .map_err(db)?
                    {
                        let types: Vec<String> = e.get(1);
                        if let Some(keep) = policy.keep_for(&types) {
                            by_cutoff
                                .entry(now.saturating_sub(keep))
                                .or_default()
                                .push(e.get(0));
                        }
                    }
                    for (cutoff, ids) in by_cutoff {
                        removed += tx
                            .execute(
                                "DELETE FROM history h USING history_series s
                                  WHERE h.series = s.series AND s.tenant = $1
                                    AND s.entity = ANY($2) AND h.at < $3",
                                &[&tenant, &ids, &cutoff],
                            )
                            .await
                            .map_err(db)?;
                    }
                }
                Ok(removed)
            })
        })
    }

    fn ready(&self) -> Result<(), StoreError> {
        // Before every writer job: no trip to the runtime while connected.
        if let Ok(writer) = self.conns.writer.try_lock()
            && writer.as_ref().is_some_and(|w| !w.is_closed())
        {
            return Ok(());
        }
        let reconnected = self.block(|c| {
            Box::pin(async move {
                let mut guard = c.writer.lock().await;
                if guard.as_ref().is_some_and(|w| !w.is_closed()) {
                    return Ok(false);
                }
                *guard = Some(c.connect().await?);
                tracing::warn!("the writer's PostgreSQL connection was made again");
                Ok(true)
            })
        })?;
        if reconnected {
            // A lost connection let go of the locks it held.
            *self.lock_held.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        Ok(())
    }

    fn reset(&self) -> Result<(), StoreError> {
        // The writer keeps no state of its own beyond its connection.
        Ok(())
    }

    fn pending_notices(&self, after: u64, limit: usize) -> Result<Vec<(u64, Notice)>, StoreError> {
        let (after, limit) = (to_i64(after), i64::try_from(limit).unwrap_or(i64::MAX));
        let node = self.node.clone();
        self.read(move |c| {
            Box::pin(async move {
                // Each notice is delivered by one node: the one that owns it.
                c.query(
                    "SELECT seq, notice FROM outbox WHERE node = $3 AND seq > $1 ORDER BY seq LIMIT $2",
                    &[&after, &limit, &node],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|r| {
                    let seq: i64 = r.get(0);
                    Ok((to_u64(seq), serde_json::from_slice(r.get(1)).map_err(io)?))
                })
                .collect()
            })
        })
    }

    fn dead_letters(&self, tenant: &str, id: &str) -> Result<Vec<(Notice, String)>, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        self.read(move |c| {
            Box::pin(async move {
                c.query(
                    "SELECT notice, error FROM dead_letters
                      WHERE tenant = $1 AND subscription = $2 ORDER BY seq",
                    &[&tenant, &id],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|r| Ok((serde_json::from_slice(r.get(0)).map_err(io)?, r.get(1))))
                .collect()
            })
        })
    }

    fn history(
        &self,
        tenant: &str,
        id: &str,
        req: &HistoryRequest,
    ) -> Result<Option<EntityHistory>, StoreError> {
        let (tenant, id, req) = (tenant.to_string(), id.to_string(), req.clone());
        self.read(move |c| Box::pin(async move { read_history(&c, &tenant, &id, &req).await }))
    }

    fn history_entities(
        &self,
        tenant: &str,
        types: Option<&[String]>,
    ) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        let tenant = tenant.to_string();
        let types = types.map(<[String]>::to_vec);
        self.read(move |c| {
            Box::pin(async move {
                Ok(c.query(
                    "SELECT id, types FROM history_entities
                      WHERE tenant = $1 AND ($2::text[] IS NULL OR types && $2) ORDER BY id",
                    &[&tenant, &types],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect())
            })
        })
    }

    fn retention(&self, tenant: &str) -> Result<Retention, StoreError> {
        let tenant = tenant.to_string();
        self.read(move |c| {
            Box::pin(async move {
                Ok(
                    c.query_opt("SELECT policy FROM retention WHERE tenant = $1", &[&tenant])
                        .await
                        .map_err(db)?
                        .and_then(|r| serde_json::from_slice(r.get(0)).ok())
                        .unwrap_or_default(),
                )
            })
        })
    }

    fn put_context(&self, id: &str, doc: &[u8]) -> Result<(), StoreError> {
        let (id, doc) = (id.to_string(), doc.to_vec());
        self.transact(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "INSERT INTO contexts (id, doc) VALUES ($1, $2)
                     ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc",
                    &[&id, &doc],
                )
                .await
                .map_err(db)?;
                Ok(())
            })
        })
    }

    fn delete_context(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.transact(move |tx| {
            Box::pin(async move {
                Ok(tx
                    .execute("DELETE FROM contexts WHERE id = $1", &[&id])
                    .await
                    .map_err(db)?
                    > 0)
            })
        })
    }

    fn lease(&self, name: &str, ttl: std::time::Duration) -> Result<bool, StoreError> {
        let (name, node, secs) = (name.to_string(), self.node.clone(), ttl.as_secs_f64());
        self.read(move |c| {
            Box::pin(async move {
                // Taken when free or expired, renewed by its holder.
                Ok(c.query_opt(
                    "INSERT INTO leases (name, holder, until)
                     VALUES ($1, $2, now() + make_interval(secs => $3))
                     ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until
                      WHERE leases.holder = EXCLUDED.holder OR leases.until < now()
                     RETURNING holder",
                    &[&name, &node, &secs],
                )
                .await
                .map_err(db)?
                .is_some())
            })
        })
    }

    fn contexts(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read(|c| {
            Box::pin(async move {
                Ok(c.query("SELECT id, doc FROM contexts ORDER BY id", &[])
                    .await
                    .map_err(db)?
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect())
            })
        })
    }
}

/// The history of one entity: its series, each read in the request's range
/// (the newest `lastN`, or the first `max_instances` and one more to tell a
/// cut), then selected as every backend selects.
async fn read_history(
    c: &Client,
    tenant: &str,
    id: &str,
    req: &HistoryRequest,
) -> Result<Option<EntityHistory>, StoreError> {
    let Some(entity) = c
        .query_opt(
            "SELECT types FROM history_entities WHERE tenant = $1 AND id = $2",
            &[&tenant, &id],
        )
        .await
        .map_err(db)?
    else {
        return Ok(None);
    };
    let mut out = EntityHistory {
        id: id.to_string(),
        types: entity.get(0),
        attrs: Vec::new(),
        truncated: None,
    };
    let series = c
        .query(
            "SELECT series, name, dataset FROM history_series
              WHERE tenant = $1 AND entity = $2 ORDER BY name, dataset",
            &[&tenant, &id],
        )
        .await
        .map_err(db)?;
    let key = match req.time_property {
        TimeProperty::ObservedAt => "at",
        _ => "modified_at",
    };
    let (from, to) = (req.range.from, req.range.to);
    let max = i64::try_from(req.max_instances.max(1)).unwrap_or(i64::MAX);
    for s in series {
        let (number, name, dataset): (i64, String, String) = (s.get(0), s.get(1), s.get(2));
        if req.attrs.as_ref().is_some_and(|w| !w.contains(&name)) {
            continue;
        }
        let (order, limit) = match (&req.aggregation, req.last_n) {
            (Some(_), _) => ("ASC", MAX_AGGREGATED_ROWS + 1),
            (None, Some(n)) => ("DESC", i64::try_from(n.max(1)).unwrap_or(i64::MAX)),
            (None, None) => ("ASC", max.saturating_add(1)),
        };
        let sql = format!(
            "SELECT at, seq, attr FROM history
              WHERE series = $1 AND {key} >= $2 AND {key} < $3
              ORDER BY {key} {order}, seq {order} LIMIT $4"
        );
        let fetched = c
            .query(&sql, &[&number, &from, &to, &limit])
            .await
            .map_err(db)?;
        if req.aggregation.is_some() && fetched.len() as i64 > MAX_AGGREGATED_ROWS {
            return Err(io(format!(
                "the aggregation covers more than {MAX_AGGREGATED_ROWS} instances of '{name}'; \
                 narrow the time range"
            )));
        }
        let mut rows: Vec<Row> = Vec::with_capacity(fetched.len());
        for r in fetched {
            let (at, seq): (i64, i64) = (r.get(0), r.get(1));
            rows.push((at, to_u64(seq), decode_attr(r.get(2))?));
        }
        let dataset_id = (!dataset.is_empty()).then_some(dataset);
        let (body, cut) = select(&rows, to_u64(number), req, dataset_id.as_deref());
        widen_cut(&mut out.truncated, cut);
        out.attrs.push(AttrHistory {
            name,
            dataset_id,
            body,
        });
    }
    Ok(Some(out))
}
