//! Baseline of the `query` scenario, "postgres-jsonb": the same documents in
//! a PostgreSQL table `(id, type, doc jsonb)` with a GIN index on `doc` and a
//! btree on `(type, id)`, queried with the same shapes in SQL, ordered by id.

use super::chain;
use super::postgres::connect;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_postgres::Client;

pub const TABLE: &str = "borough_bench_query";
/// Longest wait for one statement outside the timed runs (loads, index
/// builds, verification queries).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(600);

/// The rows to load: index-aligned ids, types and serialized documents.
pub struct Rows {
    pub ids: Arc<Vec<String>>,
    pub types: Arc<Vec<&'static str>>,
    pub docs: Arc<Vec<String>>,
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

/// What [`run_timed`] measured. Queries cut off by the time limit are not
/// counted.
#[derive(Default)]
pub struct PgTimed {
    pub elapsed: Duration,
    pub latencies_us: Vec<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// `f` with [`STATEMENT_TIMEOUT`], its error on one line prefixed by `what`.
pub(super) async fn bounded<T, E>(
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, String>
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

pub(super) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The administration connection (creates, checks and drops the table).
pub async fn admin(conn_str: &str) -> Result<Client, String> {
    connect(conn_str).await
}

/// Creates the table afresh, inserts the rows `batch` per statement over
/// `workers` connections, then builds the indexes and runs `ANALYZE`. The
/// caller drops the table with [`drop_table`], also when this fails.
pub async fn load(
    admin: &Client,
    conn_str: &str,
    rows: &Rows,
    batch: usize,
    workers: usize,
) -> Result<Loaded, String> {
    // `COLLATE "C"`: byte order, as Borough orders ids, and left-anchored
    // regular expressions can use the primary key index.
    bounded(
        &format!("cannot create {TABLE}"),
        admin.batch_execute(&format!(
            "DROP TABLE IF EXISTS {TABLE}; \
             CREATE TABLE {TABLE} (id text COLLATE \"C\" PRIMARY KEY, type text NOT NULL, doc jsonb NOT NULL)"
        )),
    )
    .await?;

    let sql = format!(
        "INSERT INTO {TABLE} (id, type, doc) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[]::jsonb[])"
    );
    let mut clients = Vec::with_capacity(workers);
    for _ in 0..workers.max(1) {
        let client = connect(conn_str).await?;
        let statement =
            bounded("cannot prepare the insert statement", client.prepare(&sql)).await?;
        clients.push((client, statement));
    }

    let n = rows.ids.len();
    let batch = batch.max(1);
    let batches = n.div_ceil(batch);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for (client, statement) in clients {
        let (ids, types, docs) = (rows.ids.clone(), rows.types.clone(), rows.docs.clone());
        let next = next.clone();
        set.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= batches {
                    break;
                }
                let range = b * batch..((b + 1) * batch).min(n);
                let batch_ids: Vec<&str> = ids[range.clone()].iter().map(String::as_str).collect();
                let batch_types: Vec<&str> = types[range.clone()].to_vec();
                let batch_docs: Vec<&str> = docs[range].iter().map(String::as_str).collect();
                let t = Instant::now();
                bounded(
                    &format!("batch {b}: insert failed"),
                    client.execute(&statement, &[&batch_ids, &batch_types, &batch_docs]),
                )
                .await?;
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
    let elapsed = start.elapsed();

    let t = Instant::now();
    bounded(
        &format!("cannot index {TABLE}"),
        admin.batch_execute(&format!(
            "CREATE INDEX {TABLE}_doc ON {TABLE} USING gin (doc jsonb_path_ops); \
             CREATE INDEX {TABLE}_type_id ON {TABLE} (type, id); \
             ANALYZE {TABLE}"
        )),
    )
    .await?;
    let index_elapsed = t.elapsed();

    let count: i64 = bounded(
        &format!("cannot count the rows of {TABLE}"),
        admin.query_one(&format!("SELECT count(*) FROM {TABLE}"), &[]),
    )
    .await?
    .try_get(0)
    .map_err(|e| format!("cannot read the row count of {TABLE}: {}", chain(&e)))?;
    if usize::try_from(count).ok() != Some(n) {
        return Err(format!(
            "{TABLE} holds {count} rows after loading, expected {n}"
        ));
    }
    Ok(Loaded {
        elapsed,
        latencies_us,
        index_elapsed,
    })
}

/// The ids (first column) that `sql` answers, in order.
pub async fn ids(admin: &Client, sql: &str) -> Result<Vec<String>, String> {
    let rows = bounded(&format!("query failed: {sql}"), admin.query(sql, &[])).await?;
    rows.iter()
        .map(|row| {
            row.try_get::<_, String>(0)
                .map_err(|e| format!("cannot read an id answered by {sql}: {}", chain(&e)))
        })
        .collect()
}

/// Runs the statements `sqls` (one picked at random per query) for
/// `duration` over `concurrency` connections, each in a loop. Every
/// connection prepares every statement before the clock starts; every query
/// is bounded by the deadline, and each connection stops by itself when it
/// passes.
pub async fn run_timed(
    conn_str: &str,
    sqls: &[String],
    concurrency: usize,
    duration: Duration,
    seed: u64,
) -> Result<PgTimed, String> {
    if sqls.is_empty() {
        return Err("no SQL statement to run".to_string());
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
    let sqls = Arc::new(sqls.to_vec());
    let start = Instant::now();
    let deadline = start + duration;
    let mut set = JoinSet::new();
    for (n, (client, statements)) in clients.into_iter().enumerate() {
        let sqls = sqls.clone();
        let mut rng = SmallRng::seed_from_u64(seed.wrapping_add(n as u64));
        set.spawn(async move {
            let mut run = PgTimed::default();
            while Instant::now() < deadline {
                let i = rng.random_range(0..statements.len());
                let t = Instant::now();
                let Ok(result) =
                    tokio::time::timeout_at(deadline, client.query(&statements[i], &[])).await
                else {
                    break; // cut off by the time limit
                };
                run.latencies_us.push(micros(t.elapsed()));
                if let Err(e) = result {
                    run.errors += 1;
                    if run.first_error.is_none() {
                        run.first_error = Some(format!("{}: {}", sqls[i], chain(&e)));
                    }
                    if client.is_closed() {
                        return Err(format!(
                            "the PostgreSQL connection closed during the run: {}",
                            chain(&e)
                        ));
                    }
                }
            }
            Ok::<_, String>(run)
        });
    }
    let mut total = PgTimed::default();
    while let Some(joined) = set.join_next().await {
        let mut run =
            joined.map_err(|e| format!("a PostgreSQL worker crashed: {}", chain(&e)))??;
        total.latencies_us.append(&mut run.latencies_us);
        total.errors += run.errors;
        if total.first_error.is_none() {
            total.first_error = run.first_error;
        }
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

/// Drops the table.
pub async fn drop_table(admin: &Client) -> Result<(), String> {
    bounded(
        &format!("cannot drop {TABLE}"),
        admin.batch_execute(&format!("DROP TABLE IF EXISTS {TABLE}")),
    )
    .await
}
