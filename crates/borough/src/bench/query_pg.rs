//! Baseline of the `query` scenario, "postgres-jsonb": the same documents in
//! a PostgreSQL table `(id, type, doc jsonb)` with a GIN index on `doc` and a
//! btree on `(type, id)`, queried with the same shapes in SQL, ordered by id.

use super::chain;
use super::postgres::{Table, bounded};
use tokio_postgres::Client;

pub const TABLE: &str = "borough_bench_query";

/// The table, loaded with [`super::postgres::load`] (the indexes after the
/// rows). Its columns, in order: id, type, doc.
pub fn table() -> Table {
    // `COLLATE "C"`: byte order, as Borough orders ids, and left-anchored
    // regular expressions can use the primary key index.
    Table {
        name: TABLE,
        create: format!(
            "DROP TABLE IF EXISTS {TABLE}; \
             CREATE TABLE {TABLE} (id text COLLATE \"C\" PRIMARY KEY, type text NOT NULL, doc jsonb NOT NULL)"
        ),
        insert: format!(
            "INSERT INTO {TABLE} (id, type, doc) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[]::jsonb[])"
        ),
        index: format!(
            "CREATE INDEX {TABLE}_doc ON {TABLE} USING gin (doc jsonb_path_ops); \
             CREATE INDEX {TABLE}_type_id ON {TABLE} (type, id); \
             ANALYZE {TABLE}"
        ),
    }
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
