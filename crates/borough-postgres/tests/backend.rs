//! The PostgreSQL backend against the machine's PostgreSQL (127.0.0.1:5432,
//! or `BOROUGH_TEST_PG`): the whole shared backend suite, restarts, and the
//! versioned schema. Each test works in a schema of its own, dropped after.

use borough_engine::EngineOptions;
use borough_postgres::{MIGRATIONS, PgBackend, PgOptions, PgStore};
use borough_store::EntityStore;
use std::sync::atomic::{AtomicUsize, Ordering};

fn url() -> String {
    std::env::var("BOROUGH_TEST_PG")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into())
}

/// A schema of this test's own, dropped when it ends.
struct Schema(PgOptions);

impl Schema {
    fn new(test: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "borough_test_{test}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let schema = Schema(PgOptions {
            url: url(),
            schema: name,
        });
        schema.sql(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            schema.0.schema
        ));
        schema
    }

    fn open(&self) -> PgStore {
        borough_postgres::open(self.0.clone(), EngineOptions::default()).expect("open")
    }

    /// Runs SQL on a connection of its own.
    fn sql(&self, sql: &str) {
        let url = url();
        let sql = sql.to_string();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .expect("connect to PostgreSQL");
                tokio::spawn(conn);
                client.batch_execute(&sql).await.expect("sql");
            });
        })
        .join()
        .expect("sql thread");
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        self.sql(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0.schema));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_shared_backend_suite() {
    let schema = Schema::new("suite");
    let store = schema.open();
    borough_store::testsuite::run_all(&store).await;
    store.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_and_subscriptions_survive_a_restart() {
    let schema = Schema::new("reopen");
    let store = schema.open();
    borough_store::testsuite::survives_reopen(store, || schema.open()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_follow_the_record_suites() {
    let schema = Schema::new("records");
    let store = schema.open();
    borough_store::testsuite::device_records(&store);
    borough_store::testsuite::record_pages(&store);
    borough_store::testsuite::linked_records_commit_with_their_operation(store, || schema.open())
        .await;
    // This one expects an empty store.
    let fresh = Schema::new("records_reopen");
    let store = fresh.open();
    borough_store::testsuite::device_records_survive_reopen(store, || fresh.open()).await;
}

#[test]
fn the_schema_is_versioned_and_a_newer_one_is_refused() {
    let schema = Schema::new("versions");
    let newest = MIGRATIONS.last().expect("a migration").0;
    let backend = PgBackend::open(schema.0.clone()).expect("first open migrates");
    assert_eq!(backend.schema_version().expect("version"), newest);
    drop(backend);
    // Opening again applies nothing twice.
    let backend = PgBackend::open(schema.0.clone()).expect("second open");
    assert_eq!(backend.schema_version().expect("version"), newest);
    drop(backend);
    schema.sql(&format!(
        "INSERT INTO {}.schema_version (version) VALUES ({})",
        schema.0.schema,
        newest + 1
    ));
    let refused = PgBackend::open(schema.0.clone())
        .err()
        .expect("a newer schema is refused");
    assert!(
        refused.to_string().contains("newer Borough"),
        "the error says why: {refused}"
    );
}

#[test]
fn a_wrong_address_is_a_clear_error() {
    let refused = PgBackend::open(PgOptions {
        url: "host=127.0.0.1 port=1 user=postgres dbname=postgres connect_timeout=2".into(),
        schema: "borough".into(),
    })
    .err()
    .expect("nothing listens on port 1");
    assert!(
        refused.to_string().contains("cannot connect to PostgreSQL"),
        "{refused}"
    );
}
