//! Baseline of the `geo` scenario, "postgis": the same entities in a
//! PostgreSQL table `(id, type, geom geometry(Geometry, 4326), doc jsonb)`
//! with a GiST index on `geom`, queried with the same geo-queries in SQL
//! through prepared statements (one per shape, the position as parameters).

use super::chain;
use super::postgres::connect;
use super::query_pg::{bounded, micros};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

pub const TABLE: &str = "borough_bench_geo";
pub const GEOM_INDEX: &str = "borough_bench_geo_geom";

/// The rows to load, index-aligned: ids, types, GeoJSON geometries
/// (`location.value`) and serialized documents.
pub struct Rows {
    pub ids: Arc<Vec<String>>,
    pub types: Arc<Vec<&'static str>>,
    pub geometries: Arc<Vec<String>>,
    pub docs: Arc<Vec<String>>,
}

/// What [`load`] measured.
pub struct Loaded {
    /// Inserting the rows.
    pub elapsed: Duration,
    /// Latency of each batch insert, in microseconds.
    pub latencies_us: Vec<u64>,
    /// Building the GiST index and analyzing the table.
    pub index_elapsed: Duration,
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
}

impl Param {
    /// The SQL type of the parameter.
    fn sql_type(&self) -> &'static str {
        match self {
            Param::Float(_) => "float8",
            Param::Text(_) => "text",
            Param::TextArray(_) => "text[]",
        }
    }

    /// The value as an SQL literal.
    fn literal(&self) -> String {
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

fn refs(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(Param::as_sql).collect()
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

/// The administration connection, with PostGIS enabled in its database.
pub async fn admin(conn_str: &str) -> Result<Client, String> {
    let client = connect(conn_str).await?;
    bounded(
        "PostGIS is not available (run scripts/setup-postgis.sh as root, then retry)",
        client.batch_execute("CREATE EXTENSION IF NOT EXISTS postgis"),
    )
    .await?;
    Ok(client)
}

/// Creates the table afresh, inserts the rows `batch` per statement over
/// `workers` connections, then builds the GiST index and runs `ANALYZE`.
/// The caller drops the table with [`drop_table`], also when this fails.
pub async fn load(
    admin: &Client,
    conn_str: &str,
    rows: &Rows,
    batch: usize,
    workers: usize,
) -> Result<Loaded, String> {
    // `COLLATE "C"`: byte order, as Borough orders ids.
    bounded(
        &format!("cannot create {TABLE}"),
        admin.batch_execute(&format!(
            "DROP TABLE IF EXISTS {TABLE}; \
             CREATE TABLE {TABLE} (id text COLLATE \"C\" PRIMARY KEY, type text NOT NULL, \
             geom geometry(Geometry, 4326) NOT NULL, doc jsonb NOT NULL)"
        )),
    )
    .await?;

    // One multi-row INSERT per batch: the arrays unnested into rows, each
    // geometry parsed from its GeoJSON.
    let sql = format!(
        "INSERT INTO {TABLE} (id, type, geom, doc) \
         SELECT i, t, ST_SetSRID(ST_GeomFromGeoJSON(g), 4326), d::jsonb \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS r(i, t, g, d)"
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
        let (ids, types) = (rows.ids.clone(), rows.types.clone());
        let (geometries, docs) = (rows.geometries.clone(), rows.docs.clone());
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
                let batch_geoms: Vec<&str> = geometries[range.clone()]
                    .iter()
                    .map(String::as_str)
                    .collect();
                let batch_docs: Vec<&str> = docs[range].iter().map(String::as_str).collect();
                let t = Instant::now();
                bounded(
                    &format!("batch {b}: insert failed"),
                    client.execute(
                        &statement,
                        &[&batch_ids, &batch_types, &batch_geoms, &batch_docs],
                    ),
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
            "CREATE INDEX {GEOM_INDEX} ON {TABLE} USING gist (geom); ANALYZE {TABLE}"
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

/// The rows that `sql` answers with `params`: the id (first column) and,
/// when `with_number` is set, the second column as `float8`.
pub async fn rows(
    admin: &Client,
    sql: &str,
    params: &[Param],
    with_number: bool,
) -> Result<Vec<(String, f64)>, String> {
    let rows = bounded(
        &format!("query failed: {sql}"),
        admin.query(sql, &refs(params)),
    )
    .await?;
    rows.iter()
        .map(|row| {
            let id = row
                .try_get::<_, String>(0)
                .map_err(|e| format!("cannot read an id answered by {sql}: {}", chain(&e)))?;
            let number = if with_number {
                row.try_get::<_, f64>(1)
                    .map_err(|e| format!("cannot read a number answered by {sql}: {}", chain(&e)))?
            } else {
                0.0
            };
            Ok((id, number))
        })
        .collect()
}

/// Name of the SQL-level prepared statement that [`explain`] plans.
const EXPLAINED: &str = "borough_bench_geo_explained";

/// The plans of `sql` as a prepared statement executed with `params`: the
/// custom plan (planned for these values) and the generic plan, which a
/// prepared statement may switch to after a few executions.
pub async fn explain(
    admin: &Client,
    sql: &str,
    params: &[Param],
) -> Result<(String, String), String> {
    let types: Vec<&str> = params.iter().map(Param::sql_type).collect();
    bounded(
        &format!("cannot prepare {sql}"),
        admin.batch_execute(&format!(
            "PREPARE {EXPLAINED} ({}) AS {sql}",
            types.join(", ")
        )),
    )
    .await?;
    let custom = explain_execute(admin, "force_custom_plan", params).await;
    let generic = explain_execute(admin, "force_generic_plan", params).await;
    let reset = bounded(
        "cannot reset plan_cache_mode",
        admin.batch_execute(&format!("RESET plan_cache_mode; DEALLOCATE {EXPLAINED}")),
    )
    .await;
    let plans = (custom?, generic?);
    reset?;
    Ok(plans)
}

/// `EXPLAIN EXECUTE` of the [`EXPLAINED`] statement under `plan_cache_mode`.
async fn explain_execute(admin: &Client, mode: &str, params: &[Param]) -> Result<String, String> {
    let literals: Vec<String> = params.iter().map(Param::literal).collect();
    let sql = format!(
        "SET plan_cache_mode = {mode}; EXPLAIN EXECUTE {EXPLAINED} ({})",
        literals.join(", ")
    );
    let messages = bounded(
        &format!("cannot explain ({mode})"),
        admin.simple_query(&sql),
    )
    .await?;
    let lines: Vec<&str> = messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0),
            _ => None,
        })
        .collect();
    Ok(lines.join("\n"))
}

/// Runs the prepared statement `sql` (with one parameter set of `params`
/// picked at random per query) for `duration` over `concurrency`
/// connections, each in a loop. Every connection prepares the statement
/// before the clock starts; every query is bounded by the deadline, and each
/// connection stops by itself when it passes.
pub async fn run_timed(
    conn_str: &str,
    sql: &str,
    params: Arc<Vec<Vec<Param>>>,
    concurrency: usize,
    duration: Duration,
    seed: u64,
) -> Result<PgTimed, String> {
    if params.is_empty() {
        return Err("no parameters to run the statement with".to_string());
    }
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency.max(1) {
        let client = connect(conn_str).await?;
        let statement = bounded(&format!("cannot prepare {sql}"), client.prepare(sql)).await?;
        clients.push((client, statement));
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut set = JoinSet::new();
    for (n, (client, statement)) in clients.into_iter().enumerate() {
        let params = params.clone();
        let mut rng = SmallRng::seed_from_u64(seed.wrapping_add(n as u64));
        set.spawn(async move {
            let mut run = PgTimed::default();
            while Instant::now() < deadline {
                let i = rng.random_range(0..params.len());
                let values = refs(&params[i]);
                let t = Instant::now();
                let Ok(result) =
                    tokio::time::timeout_at(deadline, client.query(&statement, &values)).await
                else {
                    break; // cut off by the time limit
                };
                run.latencies_us.push(micros(t.elapsed()));
                if let Err(e) = result {
                    run.errors += 1;
                    if run.first_error.is_none() {
                        run.first_error = Some(format!("{:?}: {}", params[i], chain(&e)));
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
