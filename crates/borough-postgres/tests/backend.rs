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

/// Waits up to 5 s for `check` to hold.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !check() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "not seen within 5 s: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn entity(doc: serde_json::Value) -> borough_core::Entity {
    borough_core::entity::parse_entity(&doc, &borough_core::Context::core(), 0).expect("entity")
}

fn upsert(doc: serde_json::Value) -> borough_core::EntityOp {
    borough_core::EntityOp::Upsert {
        entity: entity(doc),
        replace: false,
    }
}

const NS: &str = "https://uri.etsi.org/ngsi-ld/default-context/";

/// Two nodes over one schema: what one commits, the other holds shortly after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_see_each_others_writes_and_deletions() {
    let schema = Schema::new("follow");
    let (a, b) = (schema.open(), schema.open());
    a.write(
        "t",
        vec![upsert(
            serde_json::json!({"id": "urn:l:1", "type": "Lamp", "power": "on"}),
        )],
    )
    .await
    .expect("write")[0]
        .as_ref()
        .expect("upsert");
    eventually("node B holds node A's entity", || {
        b.get("t", "urn:l:1").is_some()
    })
    .await;
    b.write(
        "t",
        vec![upsert(
            serde_json::json!({"id": "urn:l:1", "type": "Lamp", "power": "off"}),
        )],
    )
    .await
    .expect("write");
    let power = |s: &PgStore| {
        s.get("t", "urn:l:1").and_then(|e| {
            e.attrs
                .get(&format!("{NS}power"))
                .map(|a| a[0].value.clone())
        })
    };
    eventually("node A holds node B's change", || {
        power(&a) == Some(serde_json::json!("off"))
    })
    .await;
    // Queries on B use the indexes built from what it followed.
    let page = b.query(
        "t",
        &borough_core::query::EntityQuery::default(),
        0,
        10,
        true,
    );
    assert_eq!(page.total, Some(1));
    a.write(
        "t",
        vec![borough_core::EntityOp::Delete {
            id: "urn:l:1".into(),
        }],
    )
    .await
    .expect("delete");
    eventually("node B drops the entity node A deleted", || {
        b.get("t", "urn:l:1").is_none()
    })
    .await;
    // Each node's history holds every change, whoever made it.
    let all = borough_core::temporal::HistoryRequest {
        attrs: None,
        time_property: borough_core::temporal::TimeProperty::ModifiedAt,
        range: borough_core::temporal::TimeRange::ALL,
        last_n: None,
        max_instances: 100,
        aggregation: None,
    };
    let h = b
        .history("t", "urn:l:1", &all)
        .expect("read")
        .expect("history");
    let borough_core::temporal::HistoryBody::Instances(list) = &h.attrs[0].body else {
        panic!("instances expected");
    };
    assert_eq!(list.len(), 2, "on, then off");
}

/// Both nodes add attributes to one entity at the same time: each applies
/// its change to the latest committed entity, so none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_on_two_nodes_lose_nothing() {
    let schema = Schema::new("race");
    let (a, b) = (schema.open(), schema.open());
    const ROUNDS: usize = 30;
    let node = |store: std::sync::Arc<PgStore>, prefix: &'static str| async move {
        for i in 0..ROUNDS {
            let doc =
                serde_json::json!({"id": "urn:c:1", "type": "Counter", format!("{prefix}{i}"): i});
            store.write("t", vec![upsert(doc)]).await.expect("write")[0]
                .as_ref()
                .expect("upsert");
        }
    };
    let (a, b) = (std::sync::Arc::new(a), std::sync::Arc::new(b));
    let (ra, rb) = tokio::join!(
        tokio::spawn(node(a.clone(), "a")),
        tokio::spawn(node(b.clone(), "b"))
    );
    ra.expect("node A");
    rb.expect("node B");
    for (name, store) in [("A", &a), ("B", &b)] {
        eventually(
            &format!("node {name} holds all {} attributes", ROUNDS * 2),
            || {
                store
                    .get("t", "urn:c:1")
                    .is_some_and(|e| e.attrs.len() == ROUNDS * 2)
            },
        )
        .await;
    }
    // And so does the database: a third node starting now loads them all.
    let c = schema.open();
    assert_eq!(
        c.get("t", "urn:c:1").expect("entity").attrs.len(),
        ROUNDS * 2
    );
}

/// A subscription made on one node is matched by writes on the other; the
/// notices of both nodes are numbered apart, and each node hands out only
/// its own, until it stops and another takes them over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_and_notices_span_nodes() {
    let schema = Schema::new("notices");
    let (a, b) = (schema.open(), schema.open());
    let body = serde_json::json!({"type": "Subscription", "entities": [{"type": "Lamp"}],
        "notification": {"endpoint": {"uri": "http://127.0.0.1:9/notify"}}});
    let record = borough_core::subscription::SubscriptionRecord {
        id: "urn:s:1".into(),
        body: body.as_object().cloned().expect("object"),
        context: serde_json::Value::Null,
        context_objects: Vec::new(),
        notification_context_objects: None,
        created_at: 0,
        modified_at: 0,
        stats: Default::default(),
    };
    assert!(
        a.put_subscription("t", record, borough_store::Expect::Absent)
            .await
            .expect("subscribe")
    );
    eventually("node B knows node A's subscription", || {
        b.subscription("t", "urn:s:1").is_some()
    })
    .await;
    for (i, store) in [&a, &b, &a, &b].into_iter().enumerate() {
        let doc = serde_json::json!({"id": format!("urn:l:{i}"), "type": "Lamp", "power": "on"});
        store.write("t", vec![upsert(doc)]).await.expect("write");
    }
    let (on_a, on_b) = (
        a.pending_notices(0, 100).expect("outbox"),
        b.pending_notices(0, 100).expect("outbox"),
    );
    assert_eq!(
        (on_a.len(), on_b.len()),
        (2, 2),
        "each node has its own two"
    );
    let mut seqs: Vec<u64> = on_a.iter().chain(&on_b).map(|(s, _)| *s).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 4, "numbered apart: {seqs:?}");
    // Node B stops for good: after its silence node A delivers its notices too.
    b.close().await.expect("close");
    drop(b);
    schema.sql(&format!(
        "UPDATE {}.nodes SET seen = now() - interval '1 minute' WHERE id <> '{}'",
        schema.0.schema,
        a.backend().node()
    ));
    eventually("node A takes over node B's notices", || {
        a.pending_notices(0, 100).is_ok_and(|n| n.len() == 4)
    })
    .await;
}

/// Periodic work runs where its lease is: one node holds it and renews it;
/// another gets it only once it has lapsed.
#[test]
fn a_lease_is_held_by_one_node_until_it_lapses() {
    use borough_engine::Backend;
    let schema = Schema::new("lease");
    let (a, b) = (
        PgBackend::open(schema.0.clone()).expect("node A"),
        PgBackend::open(schema.0.clone()).expect("node B"),
    );
    let ttl = std::time::Duration::from_millis(800);
    assert!(a.lease("periodic", ttl).expect("lease"), "free: A takes it");
    assert!(!b.lease("periodic", ttl).expect("lease"), "held by A");
    assert!(a.lease("periodic", ttl).expect("lease"), "A renews it");
    assert!(b.lease("other", ttl).expect("lease"), "leases are apart");
    std::thread::sleep(std::time::Duration::from_millis(1000));
    assert!(
        b.lease("periodic", ttl).expect("lease"),
        "lapsed: B takes it"
    );
    assert!(!a.lease("periodic", ttl).expect("lease"), "now held by B");
}
