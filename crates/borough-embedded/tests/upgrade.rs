//! On-disk formats: a file written by an earlier Borough opens, with all its
//! data, and is upgraded; a file of a newer format is refused untouched.
//!
//! `fixtures/format-1.redb` was written by the release before the format was
//! versioned, through its HTTP API: a parking spot with three status
//! readings (observed 00:00, 01:00, 02:00 on 2026-01-01) and a location, a
//! streetlight in tenant `city`, a subscription to parking spots and a
//! registered device `meter-1`.

use borough_core::temporal::{HistoryBody, HistoryRequest, TimeProperty, TimeRange};
use borough_embedded::{EmbeddedStore, FORMAT_VERSION};
use borough_store::{EntityStore, RecordKind, RecordStore};
use redb::{ReadableDatabase, ReadableTableMetadata};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/format-1.redb");
const STATUS: &str = "https://uri.etsi.org/ngsi-ld/status";

fn copy_of_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(FIXTURE, dir.path().join("borough.redb")).unwrap();
    dir
}

/// The error of opening a store that must not open.
fn open_error(dir: &std::path::Path) -> String {
    match borough_embedded::open(dir) {
        Ok(_) => panic!("the store must refuse to open"),
        Err(e) => e.to_string(),
    }
}

fn status_history(store: &EmbeddedStore) -> Vec<serde_json::Value> {
    let request = HistoryRequest {
        attrs: Some(vec![STATUS.into()]),
        time_property: TimeProperty::ObservedAt,
        range: TimeRange::ALL,
        last_n: None,
        max_instances: 100,
        aggregation: None,
    };
    let history = store
        .history("", "urn:ngsi-ld:Spot:1", &request)
        .unwrap()
        .expect("the spot has history");
    let HistoryBody::Instances(instances) = &history.attrs[0].body else {
        panic!("instances expected");
    };
    instances.iter().map(|i| i.attr.value.clone()).collect()
}

fn assert_fixture_data(store: &EmbeddedStore) {
    let spot = store.get("", "urn:ngsi-ld:Spot:1").expect("the spot");
    let names: Vec<&String> = spot.attrs.keys().collect();
    assert_eq!(
        spot.attrs.get(STATUS).map(|a| &a[0].value),
        Some(&serde_json::json!("free")),
        "{names:?}"
    );
    assert!(store.get("city", "urn:ngsi-ld:Lamp:7").is_some());
    assert_eq!(store.tenants(), ["", "city"]);
    assert_eq!(status_history(store), ["free", "occupied", "free"]);
    let subscriptions = store.subscriptions("");
    assert_eq!(subscriptions.len(), 1);
    assert_eq!(subscriptions[0].record.id, "urn:ngsi-ld:Subscription:fx");
    let devices = store.records(RecordKind::Device).unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].1, "meter-1");
    let bbox = [2.0, 48.0, 3.0, 49.0];
    let mut located = 0;
    store.within_box(
        "",
        "https://uri.etsi.org/ngsi-ld/location",
        bbox,
        &mut |_, _| {
            located += 1;
            true
        },
    );
    assert_eq!(located, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_1_file_opens_with_all_its_data_and_is_upgraded() {
    let dir = copy_of_fixture();
    let store = borough_embedded::open(dir.path()).unwrap();
    assert_eq!(store.backend().format_version().unwrap(), FORMAT_VERSION);
    assert_fixture_data(&store);

    // It takes writes, and keeps everything across another restart.
    let reading = borough_core::entity::parse_entity(
        &serde_json::json!({"id": "urn:ngsi-ld:Spot:1", "type": "ParkingSpot",
            "status": {"type": "Property", "value": "occupied", "observedAt": "2026-01-01T03:00:00Z"}}),
        &borough_core::Context::core(),
        0,
    )
    .unwrap();
    let results = store
        .write(
            "",
            vec![borough_core::EntityOp::Upsert {
                entity: reading,
                replace: false,
            }],
        )
        .await
        .unwrap();
    assert!(results[0].is_ok());
    store.close().await.unwrap();
    drop(store);
    let store = borough_embedded::open(dir.path()).unwrap();
    assert_eq!(store.backend().format_version().unwrap(), FORMAT_VERSION);
    assert_eq!(
        status_history(&store),
        ["free", "occupied", "free", "occupied"]
    );
}

#[test]
fn a_file_of_a_newer_format_is_refused_and_left_untouched() {
    let dir = copy_of_fixture();
    let path = dir.path().join("borough.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(redb::TableDefinition::<&str, u64>::new("meta"))
            .unwrap()
            .insert("format", FORMAT_VERSION + 1)
            .unwrap();
        txn.commit().unwrap();
    }
    let error = open_error(dir.path());
    assert!(error.contains("newer Borough"), "{error}");
    // Nothing was changed: the version and the data are as they were.
    let db = redb::Database::create(&path).unwrap();
    let read = db.begin_read().unwrap();
    let meta = read
        .open_table(redb::TableDefinition::<&str, u64>::new("meta"))
        .unwrap();
    assert_eq!(
        meta.get("format").unwrap().unwrap().value(),
        FORMAT_VERSION + 1
    );
    let entities = read
        .open_table(redb::TableDefinition::<(&str, &str), &[u8]>::new(
            "entities",
        ))
        .unwrap();
    assert_eq!(entities.len().unwrap(), 2);
}

#[test]
fn an_unreadable_entity_fails_the_open_and_names_the_entity() {
    let dir = copy_of_fixture();
    let path = dir.path().join("borough.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(redb::TableDefinition::<(&str, &str), &[u8]>::new(
            "entities",
        ))
        .unwrap()
        .insert(("city", "urn:ngsi-ld:Broken:1"), b"{not json".as_slice())
        .unwrap();
        txn.commit().unwrap();
    }
    let error = open_error(dir.path());
    assert!(error.contains("urn:ngsi-ld:Broken:1"), "{error}");
    assert!(error.contains("city"), "{error}");
}
