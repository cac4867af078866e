//! Baseline (a) "postgres-jsonb": the same documents upserted into a
//! PostgreSQL `jsonb` table, one transaction per batch, with the same
//! concurrency as Borough's upsert phase.

use super::chain;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};

const TABLE: &str = "borough_bench_entities";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`run`] measured.
pub struct PgRun {
    pub elapsed: Duration,
    /// Latency of each batch transaction, in microseconds.
    pub latencies_us: Vec<u64>,
    /// Rows in the table at the end (must equal the distinct ids).
    pub rows: i64,
}

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

/// Upserts `docs` (keyed by `ids`) `batch` rows per transaction over
/// `workers` connections, then drops the table (also when the run fails).
pub async fn run(
    conn_str: &str,
    ids: Arc<Vec<String>>,
    docs: Arc<Vec<String>>,
    batch: usize,
    workers: usize,
) -> Result<PgRun, String> {
    let admin = connect(conn_str).await?;
    let result = upsert_all(&admin, conn_str, ids, docs, batch, workers).await;
    let dropped = admin
        .batch_execute(&format!("DROP TABLE IF EXISTS {TABLE}"))
        .await
        .map_err(|e| format!("cannot drop {TABLE}: {}", chain(&e)));
    let run = result?;
    dropped?;
    Ok(run)
}

async fn upsert_all(
    admin: &Client,
    conn_str: &str,
    ids: Arc<Vec<String>>,
    docs: Arc<Vec<String>>,
    batch: usize,
    workers: usize,
) -> Result<PgRun, String> {
    admin
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, doc jsonb NOT NULL); TRUNCATE {TABLE}"
        ))
        .await
        .map_err(|e| format!("cannot prepare {TABLE}: {}", chain(&e)))?;

    let sql = format!(
        "INSERT INTO {TABLE} (id, doc) SELECT * FROM unnest($1::text[], $2::text[]::jsonb[]) \
         ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc"
    );
    let mut clients = Vec::with_capacity(workers);
    for _ in 0..workers {
        let client = connect(conn_str).await?;
        let statement = client
            .prepare(&sql)
            .await
            .map_err(|e| format!("cannot prepare the upsert statement: {}", chain(&e)))?;
        clients.push((client, statement));
    }

    let batches = ids.len().div_ceil(batch.max(1));
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for (mut client, statement) in clients {
        let (ids, docs, next) = (ids.clone(), docs.clone(), next.clone());
        set.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= batches {
                    break;
                }
                let range = b * batch..((b + 1) * batch).min(ids.len());
                let batch_ids: Vec<&str> = ids[range.clone()].iter().map(String::as_str).collect();
                let batch_docs: Vec<&str> = docs[range].iter().map(String::as_str).collect();
                let t = Instant::now();
                let tx = client
                    .transaction()
                    .await
                    .map_err(|e| format!("batch {b}: cannot begin: {}", chain(&e)))?;
                tx.execute(&statement, &[&batch_ids, &batch_docs])
                    .await
                    .map_err(|e| format!("batch {b}: upsert failed: {}", chain(&e)))?;
                tx.commit()
                    .await
                    .map_err(|e| format!("batch {b}: commit failed: {}", chain(&e)))?;
                latencies.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
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

    let rows: i64 = admin
        .query_one(&format!("SELECT count(*) FROM {TABLE}"), &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| format!("cannot count the rows of {TABLE}: {}", chain(&e)))?;
    Ok(PgRun {
        elapsed,
        latencies_us,
        rows,
    })
}
