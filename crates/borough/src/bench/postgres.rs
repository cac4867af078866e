//! The PostgreSQL side of the baselines: connections, statements bounded in
//! time, batch writes over several connections, loading and dropping a
//! table, and timed query runs. Also baseline (a) of the `entities`
//! scenario, "postgres-jsonb": the same documents upserted into a `jsonb`
//! table, one transaction per batch, with the same concurrency as Borough's
//! upsert phase.

use super::chain;
use super::load::{Failures, micros, run_workers};
use super::report::Phase;
use rand::Rng;
use rand::rngs::SmallRng;
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for one statement outside the timed runs (loads, index
/// builds, verification queries).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(600);

/// Opens one connection, or fails with a one-line message naming the
/// connection string.
pub async fn connect(conn_str: &str) -> Result<Client, String> {
    let mut config: tokio_postgres::Config = conn_str.parse().map_err(|e| {
        format!(
            "invalid PostgreSQL connection string '{conn_str}': {}",
            chain(&e)
        )
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let (client, connection) = config.connect(NoTls).await.map_err(|e| {
        format!(
            "PostgreSQL is unreachable at '{conn_str}' (set BOROUGH_BENCH_PG or --pg): {}",
            chain(&e)
        )
    })?;
    tokio::spawn(async move {
        // Errors surface on the client side.
        let _ = connection.await;
    });
    Ok(client)
}

/// Checks that PostgreSQL answers, before the long Borough phases run.
pub async fn check(conn_str: &str) -> Result<(), String> {
    let client = connect(conn_str).await?;
    client
        .simple_query("SELECT 1")
        .await
        .map_err(|e| format!("PostgreSQL at '{conn_str}' does not answer: {}", chain(&e)))?;
    Ok(())
}

/// `f` with [`STATEMENT_TIMEOUT`], its error on one line prefixed by `what`.
pub async fn bounded<T, E>(what: &str, f: impl Future<Output = Result<T, E>>) -> Result<T, String>
where
    E: std::error::Error + 'static,
{
    match tokio::time::timeout(STATEMENT_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {}", chain(&e))),
        Err(_) => Err(format!(
            "{what}: no answer within {} s",
            STATEMENT_TIMEOUT.as_secs()
        )),
    }
}

/// One parameter of a prepared statement.
#[derive(Clone, Debug)]
pub enum Param {
    Float(f64),
    Text(String),
    TextArray(Vec<String>),
}

impl Param {
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Float(x) => x,
            Param::Text(s) => s,
            Param::TextArray(v) => v,
        }
    }

    /// The SQL type of the parameter.
    pub fn sql_type(&self) -> &'static str {
        match self {
            Param::Float(_) => "float8",
            Param::Text(_) => "text",
            Param::TextArray(_) => "text[]",
        }
    }

    /// The value as an SQL literal.
    pub fn literal(&self) -> String {
        let text = |s: &str| format!("'{}'", s.replace('\'', "''"));
        match self {
            Param::Float(x) => format!("{x:?}::float8"),
            Param::Text(s) => format!("{}::text", text(s)),
            Param::TextArray(v) => {
                let items: Vec<String> = v.iter().map(|s| text(s)).collect();
                format!("ARRAY[{}]::text[]", items.join(", "))
            }
        }
    }
}

pub fn refs(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(Param::as_sql).collect()
}

/// One column of rows to write: text values, index-aligned with the other
/// columns.
#[derive(Clone)]
pub enum Column {
    Strings(Arc<Vec<String>>),
    Names(Arc<Vec<&'static str>>),
}

impl Column {
    fn len(&self) -> usize {
        match self {
            Column::Strings(v) => v.len(),
            Column::Names(v) => v.len(),
        }
    }

    fn slice(&self, range: Range<usize>) -> Vec<&str> {
        match self {
            Column::Strings(v) => v[range].iter().map(String::as_str).collect(),
            Column::Names(v) => v[range].to_vec(),
        }
    }
}

/// How [`write_batches`] commits.
#[derive(Clone, Copy)]
pub enum Commit {
    /// Each statement by itself.
    EachStatement,
    /// In a transaction per batch: its latency includes `BEGIN` and `COMMIT`.
    Transaction,
}

/// What [`write_batches`] measured.
pub struct Written {
    pub elapsed: Duration,
    /// Latency of each batch, in microseconds.
    pub latencies_us: Vec<u64>,
}

/// Writes the rows of `columns` with the statement `sql` (one `text[]`
/// parameter per column), `batch` rows at a time over `workers`
/// connections, each taking the next batch. `verb` names the statement in
/// error messages.
pub async fn write_batches(
    conn_str: &str,
    sql: &str,
    verb: &'static str,
    columns: Vec<Column>,
    batch: usize,
    workers: usize,
    commit: Commit,
) -> Result<Written, String> {
    let mut clients = Vec::with_capacity(workers);
    for _ in 0..workers.max(1) {
        let client = connect(conn_str).await?;
        let what = format!("cannot prepare the {verb} statement");
        let statement = bounded(&what, client.prepare(sql)).await?;
        clients.push((client, statement));
    }

    let n = columns.first().map_or(0, Column::len);
    let batch = batch.max(1);
    let batches = n.div_ceil(batch);
    let columns = Arc::new(columns);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for (mut client, statement) in clients {
        let (columns, next) = (columns.clone(), next.clone());
        set.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= batches {
                    break;
                }
                let range = b * batch..((b + 1) * batch).min(n);
                let values: Vec<Vec<&str>> =
                    columns.iter().map(|c| c.slice(range.clone())).collect();
                let params: Vec<&(dyn ToSql + Sync)> =
                    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
                let t = Instant::now();
                let failed = format!("batch {b}: {verb} failed");
                match commit {
                    Commit::EachStatement => {
                        bounded(&failed, client.execute(&statement, &params)).await?;
                    }
                    Commit::Transaction => {
                        let begin = format!("batch {b}: cannot begin");
                        let tx = bounded(&begin, client.transaction()).await?;
                        bounded(&failed, tx.execute(&statement, &params)).await?;
                        bounded(&format!("batch {b}: commit failed"), tx.commit()).await?;
                    }
                }
                latencies.push(micros(t.elapsed()));
            }
            Ok::<_, String>(latencies)
        });
    }
    let mut latencies_us = Vec::with_capacity(batches);
    while let Some(joined) = set.join_next().await {
        let mut worker =
            joined.map_err(|e| format!("a PostgreSQL worker crashed: {}", chain(&e)))??;
        latencies_us.append(&mut worker);
    }
    Ok(Written {
        elapsed: start.elapsed(),
        latencies_us,
    })
}

/// `SELECT count(*)` of `table`.
pub async fn count_rows(admin: &Client, table: &str) -> Result<i64, String> {
    bounded(
        &format!("cannot count the rows of {table}"),
        admin.query_one(&format!("SELECT count(*) FROM {table}"), &[]),
    )
    .await?
    .try_get(0)
    .map_err(|e| format!("cannot read the row count of {table}: {}", chain(&e)))
}

/// A baseline table of the query scenarios and the SQL that loads it.
pub struct Table {
    pub name: &'static str,
    /// Drops any table of that name and creates it afresh.
    pub create: String,
    /// One statement per batch, one `text[]` parameter per column.
    pub insert: String,
    /// Builds the indexes and analyzes the table.
    pub index: String,
}

/// What [`load`] measured.
pub struct Loaded {
    /// Inserting the rows.
    pub elapsed: Duration,
    /// Latency of each batch insert, in microseconds.
    pub latencies_us: Vec<u64>,
    /// Building the indexes and analyzing the table.
    pub index_elapsed: Duration,
}

/// Creates `table` afresh, inserts the rows of `columns` `batch` per
/// statement over `workers` connections, builds the indexes, and checks that
/// every row is there. The caller drops the table with [`drop_table`], also
/// when this fails.
pub async fn load(
    admin: &Client,
    conn_str: &str,
    table: &Table,
    columns: Vec<Column>,
    batch: usize,
    workers: usize,
) -> Result<Loaded, String> {
    let name = table.name;
    let n = columns.first().map_or(0, Column::len);
    let what = format!("cannot create {name}");
    bounded(&what, admin.batch_execute(&table.create)).await?;

    let written = write_batches(
        conn_str,
        &table.insert,
        "insert",
        columns,
        batch,
        workers,
        Commit::EachStatement,
    )
    .await?;

    let t = Instant::now();
    let what = format!("cannot index {name}");
    bounded(&what, admin.batch_execute(&table.index)).await?;
    let index_elapsed = t.elapsed();

    let count = count_rows(admin, name).await?;
    if usize::try_from(count).ok() != Some(n) {
        return Err(format!(
            "{name} holds {count} rows after loading, expected {n}"
        ));
    }
    Ok(Loaded {
        elapsed: written.elapsed,
        latencies_us: written.latencies_us,
        index_elapsed,
    })
}

/// Drops `table`.
pub async fn drop_table(admin: &Client, table: &str) -> Result<(), String> {
    bounded(
        &format!("cannot drop {table}"),
        admin.batch_execute(&format!("DROP TABLE IF EXISTS {table}")),
    )
    .await
}

/// One query of a timed run: a prepared statement and its parameters.
pub struct TimedQuery {
    /// Index of the statement in the run's `sqls`.
    pub statement: usize,
    pub params: Vec<Param>,
    /// Names the query in an error message.
    pub label: String,
}

/// What [`run_timed`] measured. Queries cut off by the time limit are not
/// counted.
#[derive(Default)]
pub struct PgTimed {
    pub elapsed: Duration,
    pub latencies_us: Vec<u64>,
    pub failures: Failures,
}

impl PgTimed {
    /// The baseline's phase of a query shape.
    pub fn phase(self, name: &'static str) -> Phase {
        Phase::timed(name, "req/s", "query", self.elapsed, self.latencies_us)
            .with_failures(self.failures)
    }
}

/// Runs `queries` (one picked at random per query) for `duration` over
/// `concurrency` connections, each in a loop. Every connection prepares
/// every statement of `sqls` before the clock starts; every query is bounded
/// by the deadline, and each connection stops by itself when it passes.
pub async fn run_timed(
    conn_str: &str,
    sqls: &[String],
    queries: Arc<Vec<TimedQuery>>,
    concurrency: usize,
    duration: Duration,
    seed: u64,
) -> Result<PgTimed, String> {
    if queries.is_empty() {
        return Err("no query to run".to_string());
    }
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency.max(1) {
        let client = connect(conn_str).await?;
        let mut statements = Vec::with_capacity(sqls.len());
        for sql in sqls {
            let what = format!("cannot prepare {sql}");
            statements.push(bounded(&what, client.prepare(sql)).await?);
        }
        clients.push((client, statements));
    }
    let (runs, elapsed) = run_workers(clients, duration, seed, |client, deadline, rng| {
        query_worker(client, queries.clone(), deadline, rng)
    })
    .await?;
    let mut total = PgTimed {
        elapsed,
        ..PgTimed::default()
    };
    for mut run in runs {
        total.latencies_us.append(&mut run.latencies_us);
        total.failures.merge(run.failures);
    }
    Ok(total)
}

async fn query_worker(
    (client, statements): (Client, Vec<Statement>),
    queries: Arc<Vec<TimedQuery>>,
    deadline: Instant,
    mut rng: SmallRng,
) -> Result<PgTimed, String> {
    let mut run = PgTimed::default();
    while Instant::now() < deadline {
        let query = &queries[rng.random_range(0..queries.len())];
        let values = refs(&query.params);
        let t = Instant::now();
        let request = client.query(&statements[query.statement], &values);
        let Ok(result) = tokio::time::timeout_at(deadline, request).await else {
            break; // cut off by the time limit
        };
        run.latencies_us.push(micros(t.elapsed()));
        if let Err(e) = result {
            run.failures
                .record(|| format!("{}: {}", query.label, chain(&e)));
            if client.is_closed() {
                return Err(format!(
                    "the PostgreSQL connection closed during the run: {}",
                    chain(&e)
                ));
            }
        }
    }
    Ok(run)
}

// ---------------------------------------------------------------------------
// Baseline (a) of the `entities` scenario

const ENTITIES_TABLE: &str = "borough_bench_entities";

/// What [`upsert_entities`] measured.
pub struct PgRun {
    pub elapsed: Duration,
    /// Latency of each batch transaction, in microseconds.
    pub latencies_us: Vec<u64>,
    /// Rows in the table at the end (must equal the distinct ids).
    pub rows: i64,
}

/// Upserts `docs` (keyed by `ids`) `batch` rows per transaction over
/// `workers` connections, then drops the table (also when the run fails).
pub async fn upsert_entities(
    conn_str: &str,
    ids: Arc<Vec<String>>,
    docs: Arc<Vec<String>>,
    batch: usize,
    workers: usize,
) -> Result<PgRun, String> {
    let table = ENTITIES_TABLE;
    let admin = connect(conn_str).await?;
    let upserted = async {
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {table} (id text PRIMARY KEY, doc jsonb NOT NULL); TRUNCATE {table}"
        );
        let what = format!("cannot prepare {table}");
        bounded(&what, admin.batch_execute(&create)).await?;
        let sql = format!(
            "INSERT INTO {table} (id, doc) SELECT * FROM unnest($1::text[], $2::text[]::jsonb[]) \
             ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc"
        );
        let columns = vec![Column::Strings(ids), Column::Strings(docs)];
        let commit = Commit::Transaction;
        let written =
            write_batches(conn_str, &sql, "upsert", columns, batch, workers, commit).await?;
        Ok::<_, String>(PgRun {
            elapsed: written.elapsed,
            latencies_us: written.latencies_us,
            rows: count_rows(&admin, table).await?,
        })
    }
    .await;
    let dropped = drop_table(&admin, table).await;
    let run = upserted?;
    dropped?;
    Ok(run)
}
