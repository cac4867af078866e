//! Baseline of the `temporal` scenario, "postgres": the readings in a table
//! `(entity text, attr text, ts timestamptz, value double precision)` with a
//! B-tree on `(entity, attr, ts)`, loaded with `COPY … FROM STDIN` over one
//! connection per stream (the index built after), and the four queries in
//! SQL: `date_bin` aggregation for (a) and (b), `ORDER BY ts DESC LIMIT 100`
//! for (c), a time range for (d).

use super::chain;
use super::postgres::{bounded, connect};
use super::temporal_data::{ATTR, Format, Readings};
use futures_util::SinkExt;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_postgres::Client;

pub const TABLE: &str = "borough_bench_temporal";

/// The table's definition, for the report.
pub fn describe() -> String {
    format!(
        "{TABLE} (entity text, attr text, ts timestamptz, value double precision), \
         btree (entity, attr, ts); COPY text format"
    )
}

/// What [`load`] measured.
pub struct Loaded {
    /// The `COPY` of every stream, from the first byte to the last commit.
    pub copy_elapsed: Duration,
    /// `CREATE INDEX` and `ANALYZE`.
    pub index_elapsed: Duration,
    /// `pg_total_relation_size` of the table (heap, index, TOAST).
    pub total_bytes: i64,
}

/// Creates the table afresh and loads every reading with `COPY`, `streams`
/// connections at once, then indexes it and checks the row count. The caller
/// drops the table with [`super::postgres::drop_table`], also when this fails.
pub async fn load(
    admin: &Client,
    conn_str: &str,
    readings: Readings,
    streams: usize,
) -> Result<Loaded, String> {
    let create = format!(
        "DROP TABLE IF EXISTS {TABLE}; \
         CREATE TABLE {TABLE} (entity text NOT NULL, attr text NOT NULL, \
         ts timestamptz NOT NULL, value double precision NOT NULL)"
    );
    bounded(
        &format!("cannot create {TABLE}"),
        admin.batch_execute(&create),
    )
    .await?;

    let mut clients = Vec::with_capacity(streams);
    for _ in 0..streams {
        clients.push(connect(conn_str).await?);
    }
    let copy = format!("COPY {TABLE} (entity, attr, ts, value) FROM STDIN");
    let start = Instant::now();
    let mut set = JoinSet::new();
    for (k, client) in clients.into_iter().enumerate() {
        let sensors = readings.stream_sensors(k, streams);
        let copy = copy.clone();
        set.spawn(async move {
            let sink = bounded(
                "COPY failed to start",
                client.copy_in::<_, bytes::Bytes>(&copy),
            )
            .await?;
            let mut sink = Box::pin(sink);
            let (tx, mut rx) = mpsc::channel(16);
            let generator = std::thread::spawn(move || {
                readings.generate(sensors, Format::PgCopy, |chunk| tx.blocking_send(chunk))
            });
            while let Some(chunk) = rx.recv().await {
                sink.send(chunk)
                    .await
                    .map_err(|e| format!("COPY failed: {}", chain(&e)))?;
            }
            let _ = generator.join();
            let rows = sink
                .as_mut()
                .finish()
                .await
                .map_err(|e| format!("COPY failed to finish: {}", chain(&e)))?;
            drop(client);
            Ok::<u64, String>(rows)
        });
    }
    let mut rows = 0u64;
    while let Some(joined) = set.join_next().await {
        rows += joined.map_err(|e| format!("a COPY worker crashed: {e}"))??;
    }
    let copy_elapsed = start.elapsed();
    if rows != readings.points() as u64 {
        return Err(format!(
            "COPY wrote {rows} rows, expected {}",
            readings.points()
        ));
    }

    let t = Instant::now();
    let index = format!(
        "CREATE INDEX {TABLE}_entity_attr_ts ON {TABLE} (entity, attr, ts); ANALYZE {TABLE}"
    );
    bounded(
        &format!("cannot index {TABLE}"),
        admin.batch_execute(&index),
    )
    .await?;
    let index_elapsed = t.elapsed();

    let total_bytes: i64 = bounded(
        "cannot read the table size",
        admin.query_one(&format!("SELECT pg_total_relation_size('{TABLE}')"), &[]),
    )
    .await?
    .try_get(0)
    .map_err(|e| format!("cannot read the table size: {}", chain(&e)))?;
    Ok(Loaded {
        copy_elapsed,
        index_elapsed,
        total_bytes,
    })
}

/// Milliseconds since the epoch of a `timestamptz` expression, as `int8`.
fn epoch_ms(expr: &str) -> String {
    format!("(extract(epoch FROM {expr}) * 1000)::int8")
}

/// The SQL of the four queries. Parameters: (a) entity, start s, end s;
/// (b) start s, end s; (c) entity; (d) entity, start s, end s (times as
/// `float8` seconds since the epoch). Every answer's rows are (entity or
/// nothing, time ms, value).
pub fn sql_a() -> String {
    let bucket = "date_bin('1 day', ts, to_timestamp($2::float8))";
    format!(
        "SELECT {} AS b, avg(value) FROM {TABLE} \
         WHERE entity = $1 AND attr = '{ATTR}' AND ts >= to_timestamp($2::float8) AND ts < to_timestamp($3::float8) \
         GROUP BY b ORDER BY b",
        epoch_ms(bucket)
    )
}

pub fn sql_b() -> String {
    let bucket = "date_bin('1 hour', ts, to_timestamp($1::float8))";
    format!(
        "SELECT entity, {} AS b, avg(value) FROM {TABLE} \
         WHERE attr = '{ATTR}' AND ts >= to_timestamp($1::float8) AND ts < to_timestamp($2::float8) \
         GROUP BY entity, b ORDER BY entity, b",
        epoch_ms(bucket)
    )
}

pub fn sql_c() -> String {
    format!(
        "SELECT {}, value FROM {TABLE} WHERE entity = $1 AND attr = '{ATTR}' \
         ORDER BY ts DESC LIMIT 100",
        epoch_ms("ts")
    )
}

pub fn sql_d() -> String {
    format!(
        "SELECT {}, value FROM {TABLE} \
         WHERE entity = $1 AND attr = '{ATTR}' AND ts >= to_timestamp($2::float8) AND ts < to_timestamp($3::float8) \
         ORDER BY ts",
        epoch_ms("ts")
    )
}

/// One row of an answer: the entity (for (b)), the time in ms, the value.
pub type Row = (Option<String>, i64, f64);

/// Reads the rows of a query; `with_entity` when the first column is the entity.
pub fn rows(result: &[tokio_postgres::Row], with_entity: bool) -> Result<Vec<Row>, String> {
    result
        .iter()
        .map(|row| {
            let read = |e: tokio_postgres::Error| format!("cannot read a row: {}", chain(&e));
            let offset = usize::from(with_entity);
            let entity = if with_entity {
                Some(row.try_get::<_, String>(0).map_err(read)?)
            } else {
                None
            };
            let ms = row.try_get::<_, i64>(offset).map_err(read)?;
            let value = row.try_get::<_, f64>(offset + 1).map_err(read)?;
            Ok((entity, ms, value))
        })
        .collect()
}
