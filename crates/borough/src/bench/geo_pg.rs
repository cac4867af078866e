//! Baseline of the `geo` scenario, "postgis": the same entities in a
//! PostgreSQL table `(id, type, geom geometry(Geometry, 4326), doc jsonb)`
//! with a GiST index on `geom`, queried with the same geo-queries in SQL
//! through prepared statements (one per shape, the position as parameters).

use super::chain;
use super::postgres::{Param, Table, bounded, connect, refs};
use tokio_postgres::Client;

pub const TABLE: &str = "borough_bench_geo";
pub const GEOM_INDEX: &str = "borough_bench_geo_geom";

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

/// The table, loaded with [`super::postgres::load`] (the GiST index after
/// the rows). Its columns, in order: id, type, geom (from GeoJSON), doc.
pub fn table() -> Table {
    // `COLLATE "C"`: byte order, as Borough orders ids. One multi-row INSERT
    // per batch: the arrays unnested into rows, each geometry parsed from
    // its GeoJSON.
    Table {
        name: TABLE,
        create: format!(
            "DROP TABLE IF EXISTS {TABLE}; \
             CREATE TABLE {TABLE} (id text COLLATE \"C\" PRIMARY KEY, type text NOT NULL, \
             geom geometry(Geometry, 4326) NOT NULL, doc jsonb NOT NULL)"
        ),
        insert: format!(
            "INSERT INTO {TABLE} (id, type, geom, doc) \
             SELECT i, t, ST_SetSRID(ST_GeomFromGeoJSON(g), 4326), d::jsonb \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS r(i, t, g, d)"
        ),
        index: format!("CREATE INDEX {GEOM_INDEX} ON {TABLE} USING gist (geom); ANALYZE {TABLE}"),
    }
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
