//! The behaviour every [`EntityStore`] backend must show. A backend's own tests
//! call [`run_all`] (and [`survives_reopen`] with a way to reopen it); a
//! backend is done when they pass.

use crate::{DEFAULT_TENANT, EntityStore, Expect, Notice, RecordChange, RecordKind, RecordStore};
use borough_core::entity::parse_entity;
use borough_core::subscription::SubscriptionRecord;
use borough_core::{Context, Entity, EntityOp, OpOutcome, ProblemKind};
use serde_json::json;

fn entity(id: &str, speed: i64) -> Entity {
    parse_entity(
        &json!({"id": id, "type": "Vehicle", "speed": {"type": "Property", "value": speed}}),
        &Context::core(),
        0,
    )
    .expect("valid test entity")
}

fn speed(e: &Entity) -> serde_json::Value {
    e.attrs["https://uri.etsi.org/ngsi-ld/default-context/speed"][0]
        .value
        .clone()
}

/// Runs every check that needs only one open store. Each check uses its own tenant.
pub async fn run_all(store: &dyn EntityStore) {
    create_get_delete(store).await;
    batch_results_are_per_operation(store).await;
    operations_in_one_write_see_each_other(store).await;
    tenants_are_isolated(store).await;
    concurrent_writes_lose_nothing(store).await;
    history_follows_writes(store).await;
    change_feed_carries_commits(store).await;
    within_box_visits_located_entities(store).await;
    subscription_writes_check_what_they_replace(store).await;
    matching_changes_wait_in_the_outbox_until_done(store).await;
    temporal_writes_and_retention(store).await;
    writes_apply_in_the_order_they_were_first_polled(store).await;
}

fn vehicle_subscription(id: &str, modified_at: i64) -> SubscriptionRecord {
    let body = json!({"type": "Subscription", "entities": [{"type": "Vehicle"}],
        "notification": {"endpoint": {"uri": "http://127.0.0.1:9/notify"}}});
    SubscriptionRecord {
        id: id.into(),
        body: body.as_object().cloned().expect("an object"),
        context: serde_json::Value::Null,
        context_objects: Vec::new(),
        notification_context_objects: None,
        created_at: 0,
        modified_at,
        stats: Default::default(),
    }
}

pub async fn subscription_writes_check_what_they_replace(store: &dyn EntityStore) {
    let t = "suite-subscriptions";
    let put = |record, expect| store.put_subscription(t, record, expect);
    assert!(
        put(vehicle_subscription("urn:s:1", 10), Expect::Absent)
            .await
            .expect("put")
    );
    assert!(
        !put(vehicle_subscription("urn:s:1", 11), Expect::Absent)
            .await
            .expect("put"),
        "a second creation of the same id is refused"
    );
    assert!(
        !put(vehicle_subscription("urn:s:1", 12), Expect::ModifiedAt(9))
            .await
            .expect("put"),
        "an update of a version that is not the stored one is refused"
    );
    assert_eq!(
        store
            .subscription(t, "urn:s:1")
            .map(|s| s.record.modified_at),
        Some(10)
    );
    assert!(
        put(vehicle_subscription("urn:s:1", 13), Expect::ModifiedAt(10))
            .await
            .expect("put")
    );
    assert_eq!(
        store
            .subscription(t, "urn:s:1")
            .map(|s| s.record.modified_at),
        Some(13)
    );
    assert!(
        store
            .delete_subscription(t, "urn:s:1")
            .await
            .expect("delete")
    );
    assert!(
        !put(vehicle_subscription("urn:s:1", 14), Expect::ModifiedAt(13))
            .await
            .expect("put"),
        "an update racing a deletion does not bring the subscription back"
    );
    assert!(store.subscription(t, "urn:s:1").is_none());
    assert!(
        !store
            .delete_subscription(t, "urn:s:1")
            .await
            .expect("delete")
    );
}

fn owed(store: &dyn EntityStore, tenant: &str) -> Vec<(u64, Notice)> {
    store
        .pending_notices(0, 100_000)
        .expect("outbox")
        .into_iter()
        .filter(|(_, n)| n.tenant == tenant)
        .collect()
}

pub async fn matching_changes_wait_in_the_outbox_until_done(store: &dyn EntityStore) {
    let t = "suite-outbox";
    let watch = store.notice_watch();
    let before = *watch.borrow();
    assert!(
        store
            .put_subscription(t, vehicle_subscription("urn:s:o", 1), Expect::Absent)
            .await
            .expect("put")
    );
    let write = |id: &str, n: i64| {
        store.write(
            t,
            vec![EntityOp::Upsert {
                entity: entity(id, n),
                replace: false,
            }],
        )
    };
    write("urn:v:1", 1).await.expect("write");
    let notices = owed(store, t);
    assert_eq!(notices.len(), 1, "a matching change leaves one notice");
    let (_, n) = &notices[0];
    assert_eq!(
        (n.subscription.as_str(), n.entity.id.as_str()),
        ("urn:s:o", "urn:v:1")
    );
    assert_eq!(speed(&n.entity), json!(1));
    assert!(*watch.borrow() > before, "the watch tells the notifier");
    assert_eq!(store.stats(t, "urn:s:o").pending, 1);
    // A write that does not match leaves none.
    store
        .write(
            t,
            vec![EntityOp::Upsert {
                entity: located("urn:l:1", 1.0, 1.0),
                replace: false,
            }],
        )
        .await
        .expect("write");
    assert_eq!(owed(store, t).len(), 1);

    // Delivered: gone from the outbox.
    store.notices_done(notices, None).await.expect("done");
    assert!(owed(store, t).is_empty());
    assert_eq!(store.stats(t, "urn:s:o").pending, 0);

    // Given up on: kept as a dead letter with the last error.
    write("urn:v:1", 2).await.expect("write");
    let notices = owed(store, t);
    store
        .notices_done(notices, Some("receiver answered 500".into()))
        .await
        .expect("done");
    assert!(owed(store, t).is_empty());
    let dead = store.dead_letters(t, "urn:s:o").expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(speed(&dead[0].0.entity), json!(2));
    assert_eq!(dead[0].1, "receiver answered 500");

    // After a deletion, changes owe it nothing more.
    assert!(
        store
            .delete_subscription(t, "urn:s:o")
            .await
            .expect("delete")
    );
    write("urn:v:1", 3).await.expect("write");
    assert!(owed(store, t).is_empty());
}

fn located(id: &str, lon: f64, lat: f64) -> Entity {
    parse_entity(
        &json!({"id": id, "type": "Lamp",
            "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [lon, lat]}}}),
        &Context::core(),
        0,
    )
    .expect("valid test entity")
}

pub async fn change_feed_carries_commits(store: &dyn EntityStore) {
    let t = "suite-feed";
    let mut feed = store.changes();
    store
        .write(t, vec![EntityOp::Create(entity("urn:f", 1))])
        .await
        .expect("write");
    store
        .write(t, vec![EntityOp::Delete { id: "urn:f".into() }])
        .await
        .expect("write");
    let created = feed.recv().await.expect("a change");
    assert_eq!(created.len(), 1);
    assert_eq!((&*created[0].tenant, &*created[0].id), (t, "urn:f"));
    assert_eq!(created[0].entity.as_deref().map(speed), Some(json!(1)));
    let deleted = feed.recv().await.expect("a change");
    assert_eq!(&*deleted[0].id, "urn:f");
    assert!(deleted[0].entity.is_none());
    // A write that fails changes nothing and publishes nothing.
    let r = store
        .write(t, vec![EntityOp::Delete { id: "urn:f".into() }])
        .await
        .expect("write");
    assert!(r[0].is_err());
    assert!(feed.try_recv().is_err());

    // One large write reaches a listener whole: the feed never drops a
    // write's changes because the write is large.
    let many = 17_000;
    let ops = (0..many)
        .map(|i| EntityOp::Create(entity(&format!("urn:big:{i}"), i as i64)))
        .collect();
    let r = store.write(t, ops).await.expect("write");
    assert!(r.iter().all(Result::is_ok));
    let mut seen = std::collections::HashSet::new();
    while seen.len() < many {
        match feed.try_recv() {
            Ok(batch) => seen.extend(batch.iter().map(|c| c.id.clone())),
            Err(e) => panic!("{} of {many} changes, then {e:?}", seen.len()),
        }
    }
}

pub async fn within_box_visits_located_entities(store: &dyn EntityStore) {
    let t = "suite-box";
    let loc = "https://uri.etsi.org/ngsi-ld/location";
    let ops = vec![
        EntityOp::Create(located("urn:in1", 2.30, 48.80)),
        EntityOp::Create(located("urn:in2", 2.35, 48.85)),
        EntityOp::Create(located("urn:out", 3.5, 48.85)),
        EntityOp::Create(entity("urn:nowhere", 1)),
    ];
    store.write(t, ops).await.expect("write");
    let mut seen = Vec::new();
    store.within_box(t, loc, [2.0, 48.0, 3.0, 49.0], &mut |e, c| {
        assert!((2.0..=3.0).contains(&c[0]) && (48.0..=49.0).contains(&c[1]));
        seen.push(e.id.clone());
        true
    });
    seen.sort();
    assert_eq!(seen, ["urn:in1", "urn:in2"]);
    let mut n = 0;
    store.within_box(t, loc, [2.0, 48.0, 3.0, 49.0], &mut |_, _| {
        n += 1;
        false
    });
    assert_eq!(n, 1, "stops when the visitor says so");
    store.within_box(
        "suite-box-none",
        loc,
        [-180.0, -90.0, 180.0, 90.0],
        &mut |_, _| panic!("an unknown tenant has no entities"),
    );
}

pub async fn create_get_delete(store: &dyn EntityStore) {
    let t = "suite-crud";
    assert!(store.get(t, "urn:a").is_none());
    let r = store
        .write(t, vec![EntityOp::Create(entity("urn:a", 1))])
        .await
        .expect("write");
    assert_eq!(r[0], Ok(OpOutcome::Created));
    let got = store.get(t, "urn:a").expect("created entity is readable");
    assert_eq!(speed(&got), json!(1));
    assert!(got.created_at > 0, "the store stamps creation time");
    let r = store
        .write(t, vec![EntityOp::Delete { id: "urn:a".into() }])
        .await
        .expect("write");
    assert_eq!(r[0], Ok(OpOutcome::Deleted));
    assert!(store.get(t, "urn:a").is_none());
    let r = store
        .write(t, vec![EntityOp::Delete { id: "urn:a".into() }])
        .await
        .expect("write");
    assert_eq!(
        r[0].as_ref().unwrap_err().kind,
        ProblemKind::ResourceNotFound
    );
}

pub async fn batch_results_are_per_operation(store: &dyn EntityStore) {
    let t = "suite-batch";
    let ops = vec![
        EntityOp::Create(entity("urn:b1", 1)),
        EntityOp::Create(entity("urn:b1", 2)),
        EntityOp::Create(entity("urn:b2", 3)),
    ];
    let r = store.write(t, ops).await.expect("write");
    assert_eq!(r[0], Ok(OpOutcome::Created));
    assert_eq!(r[1].as_ref().unwrap_err().kind, ProblemKind::AlreadyExists);
    assert_eq!(r[2], Ok(OpOutcome::Created));
    assert_eq!(speed(&store.get(t, "urn:b1").unwrap()), json!(1));
    assert_eq!(store.entity_count(t), 2);
}

pub async fn operations_in_one_write_see_each_other(store: &dyn EntityStore) {
    let t = "suite-sequence";
    let ops = vec![
        EntityOp::Create(entity("urn:s", 1)),
        EntityOp::Upsert {
            entity: entity("urn:s", 2),
            replace: false,
        },
        EntityOp::Delete { id: "urn:s".into() },
        EntityOp::Create(entity("urn:s", 3)),
    ];
    let r = store.write(t, ops).await.expect("write");
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    assert_eq!(speed(&store.get(t, "urn:s").unwrap()), json!(3));
}

pub async fn tenants_are_isolated(store: &dyn EntityStore) {
    store
        .write("suite-t1", vec![EntityOp::Create(entity("urn:iso", 1))])
        .await
        .expect("write");
    assert!(store.get("suite-t2", "urn:iso").is_none());
    assert!(store.get(DEFAULT_TENANT, "urn:iso").is_none());
    assert!(store.tenant_exists("suite-t1"));
    assert!(!store.tenant_exists("suite-never-written"));
    assert!(store.tenant_exists(DEFAULT_TENANT));
    let mut seen = 0;
    store.scan("suite-t2", &mut |_| {
        seen += 1;
        true
    });
    assert_eq!(seen, 0);
}

pub async fn concurrent_writes_lose_nothing(store: &dyn EntityStore) {
    let t = "suite-concurrent";
    store
        .write(t, vec![EntityOp::Create(entity("urn:c", 0))])
        .await
        .expect("write");
    // Many appends of distinct attributes to one entity, all in flight at once:
    // none may be lost to a read-modify-write race.
    let futures: Vec<_> = (0..50)
        .map(|i| {
            let frag = borough_core::entity::parse_fragment(
                &json!({ format!("a{i}"): i }),
                &Context::core(),
                borough_core::ParseMode::Full,
            )
            .expect("fragment");
            store.write(
                t,
                vec![EntityOp::Append {
                    id: "urn:c".into(),
                    frag,
                    no_overwrite: false,
                }],
            )
        })
        .collect();
    for r in futures_util::future::join_all(futures).await {
        assert!(r.expect("write")[0].is_ok());
    }
    assert_eq!(store.get(t, "urn:c").unwrap().attrs.len(), 51);
}

/// Writes through one store, closes it, reopens it with `reopen`, and checks
/// that everything acknowledged is there.
pub async fn survives_reopen<S: EntityStore>(store: S, reopen: impl FnOnce() -> S) {
    let t = "suite-reopen";
    let ops = (0..100)
        .map(|i| EntityOp::Create(entity(&format!("urn:r{i}"), i)))
        .collect();
    store.write(t, ops).await.expect("write");
    store
        .write(
            DEFAULT_TENANT,
            vec![EntityOp::Create(entity("urn:default", 7))],
        )
        .await
        .expect("write");
    store.close().await.expect("close");
    drop(store);
    let store = reopen();
    assert_eq!(store.entity_count(t), 100);
    assert_eq!(speed(&store.get(t, "urn:r42").unwrap()), json!(42));
    assert_eq!(
        speed(&store.get(DEFAULT_TENANT, "urn:default").unwrap()),
        json!(7)
    );
    assert!(store.tenants().contains(&t.to_string()));
}

/// Checks one query against the reference: every entity of the tenant filtered
/// with `EntityQuery::matches`, ordered by id (by distance, then id, for
/// `near`), then paged.
pub fn assert_query_matches_scan(
    store: &dyn EntityStore,
    tenant: &str,
    query: &borough_core::query::EntityQuery,
    offset: usize,
    limit: usize,
) {
    let mut all: Vec<std::sync::Arc<Entity>> = Vec::new();
    store.scan(tenant, &mut |e| {
        all.push(e.clone());
        true
    });
    all.retain(|e| query.matches(e));
    if query.orders_by_distance() {
        let d = |e: &Entity| query.distance(e).unwrap_or(f64::INFINITY);
        all.sort_by(|a, b| d(a).total_cmp(&d(b)).then_with(|| a.id.cmp(&b.id)));
    } else {
        all.sort_by(|a, b| a.id.cmp(&b.id));
    }
    let expected: Vec<&str> = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|e| e.id.as_str())
        .collect();
    let page = store.query(tenant, query, offset, limit, true);
    let got: Vec<&str> = page.entities.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        got, expected,
        "query {query:?} offset {offset} limit {limit}"
    );
    assert_eq!(page.total, Some(all.len()), "count of query {query:?}");
    let uncounted = store.query(tenant, query, offset, limit, false);
    let got: Vec<&str> = uncounted.entities.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        got, expected,
        "uncounted query {query:?} offset {offset} limit {limit}"
    );
    assert_eq!(uncounted.total, None);
}

/// Every change records its attribute instances; history outlives the entity
/// and is deleted only through history operations.
pub async fn history_follows_writes(store: &dyn EntityStore) {
    use borough_core::temporal::{
        AggrMethod, Aggregation, HistoryBody, HistoryOp, HistoryOutcome, HistoryRequest,
        ImportSeries, TimeProperty, TimeRange,
    };
    let t = "suite-history";
    const SPEED: &str = "https://uri.etsi.org/ngsi-ld/default-context/speed";
    for v in [1, 2, 3] {
        let op = EntityOp::Upsert {
            entity: entity("urn:h", v),
            replace: false,
        };
        store.write(t, vec![op]).await.expect("write")[0]
            .as_ref()
            .expect("upsert");
    }
    let all = HistoryRequest {
        attrs: None,
        time_property: TimeProperty::ModifiedAt,
        range: TimeRange::ALL,
        last_n: None,
        max_instances: 100,
        aggregation: None,
    };
    let h = store
        .history(t, "urn:h", &all)
        .expect("read")
        .expect("has history");
    let HistoryBody::Instances(list) = &h.attrs[0].body else {
        panic!("instances expected");
    };
    let values: Vec<_> = list.iter().map(|i| i.attr.value.clone()).collect();
    assert_eq!(values, vec![json!(1), json!(2), json!(3)]);
    assert!(store.history(t, "urn:none", &all).expect("read").is_none());
    store
        .write(t, vec![EntityOp::Delete { id: "urn:h".into() }])
        .await
        .expect("write");
    assert!(store.history(t, "urn:h", &all).expect("read").is_some());
    let imported = store
        .import_history(
            t,
            vec![ImportSeries {
                entity: "urn:h".into(),
                entity_type: "https://uri.etsi.org/ngsi-ld/default-context/Vehicle".into(),
                name: SPEED.into(),
                points: vec![(10, json!(4.5)), (20, json!(5.5))],
            }],
        )
        .await
        .expect("import");
    assert_eq!(imported.points, 2);
    let sum = HistoryRequest {
        time_property: TimeProperty::ObservedAt,
        range: TimeRange { from: 0, to: 100 },
        aggregation: Some(Aggregation {
            methods: vec![AggrMethod::Sum],
            period: None,
        }),
        ..all.clone()
    };
    let h = store
        .history(t, "urn:h", &sum)
        .expect("read")
        .expect("history");
    let HistoryBody::Aggregated { buckets, .. } = &h.attrs[0].body else {
        panic!("aggregated expected");
    };
    assert_eq!(buckets[0].values, vec![json!(10.0)]);
    assert_eq!(
        store.history_entities(t, None).expect("list")[0].0,
        "urn:h".to_string()
    );
    let r = store
        .write_history(t, HistoryOp::DeleteEntity { id: "urn:h".into() })
        .await
        .expect("delete");
    assert_eq!(r, HistoryOutcome::Changed);
    assert!(store.history(t, "urn:h", &all).expect("read").is_none());
}

fn change(kind: RecordKind, tenant: &str, key: &str, value: Option<&str>) -> RecordChange {
    RecordChange {
        kind,
        tenant: tenant.into(),
        key: key.into(),
        value: value.map(|v| v.as_bytes().to_vec()),
    }
}

/// Device and command records: written together, listed per kind in key
/// order, replaced, deleted, and kept apart by tenant.
pub fn device_records(store: &dyn RecordStore) {
    use RecordKind::{Command, Device};
    store
        .write_records(&[
            change(Device, "t1", "d2", Some("two")),
            change(Device, "t1", "d1", Some("one")),
            change(Device, "t2", "d1", Some("other tenant")),
            change(Command, "t1", "d1/c1", Some("cmd")),
        ])
        .expect("write records");
    let devices = store.records(Device).expect("list devices");
    let keys: Vec<(&str, &str)> = devices
        .iter()
        .map(|(t, k, _)| (t.as_str(), k.as_str()))
        .collect();
    assert_eq!(keys, [("t1", "d1"), ("t1", "d2"), ("t2", "d1")]);
    assert_eq!(devices[2].2, b"other tenant");
    let commands = store.records(Command).expect("list commands");
    assert_eq!(commands.len(), 1);
    assert_eq!(commands[0].2, b"cmd");
    store
        .write_records(&[
            change(Device, "t1", "d1", Some("one, changed")),
            change(Device, "t1", "d2", None),
            change(Command, "t1", "d1/c1", None),
            // Deleting what does not exist is not an error.
            change(Command, "t1", "d9/c9", None),
        ])
        .expect("update records");
    let devices = store.records(Device).expect("list devices");
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[0].2, b"one, changed");
    assert!(store.records(Command).expect("list commands").is_empty());
}

/// Every kind of record is kept apart from the others, and pages of one
/// tenant's records come in key order, forwards and backwards.
pub fn record_pages(store: &dyn RecordStore) {
    let key = |n: u32| format!("{n:020}");
    let mut changes: Vec<RecordChange> = (1..=5)
        .map(|n| change(RecordKind::Audit, "", &key(n), Some(&format!("entry {n}"))))
        .collect();
    changes.push(change(RecordKind::ApiKey, "", &key(3), Some("not audit")));
    changes.push(change(
        RecordKind::Audit,
        "z",
        &key(1),
        Some("other tenant"),
    ));
    changes.push(change(RecordKind::Tenant, "", "city", Some("tenant")));
    store.write_records(&changes).expect("write records");
    let page = |after: Option<&str>, limit, reverse| -> Vec<String> {
        store
            .records_page(RecordKind::Audit, "", after, limit, reverse)
            .expect("page")
            .into_iter()
            .map(|(_, _, v)| String::from_utf8(v).expect("utf-8"))
            .collect()
    };
    assert_eq!(page(None, 2, false), ["entry 1", "entry 2"]);
    assert_eq!(page(Some(&key(2)), 2, false), ["entry 3", "entry 4"]);
    assert_eq!(page(Some(&key(4)), 10, false), ["entry 5"]);
    assert_eq!(page(None, 2, true), ["entry 5", "entry 4"]);
    assert_eq!(
        page(Some(&key(4)), 10, true),
        ["entry 3", "entry 2", "entry 1"]
    );
    assert!(page(None, 0, false).is_empty());
    assert_eq!(store.records(RecordKind::Tenant).expect("tenants").len(), 1);
    assert_eq!(store.records(RecordKind::ApiKey).expect("keys").len(), 1);
    assert_eq!(store.records(RecordKind::Audit).expect("audit").len(), 6);
}

/// Device records written before a reopen are there after it.
pub async fn device_records_survive_reopen<S: RecordStore + EntityStore>(
    store: S,
    reopen: impl FnOnce() -> S,
) {
    store
        .write_records(&[change(RecordKind::Command, "t", "d/c", Some("queued"))])
        .expect("write");
    store.close().await.expect("close");
    drop(store);
    let store = reopen();
    let commands = store.records(RecordKind::Command).expect("list");
    assert_eq!(commands, [("t".into(), "d/c".into(), b"queued".to_vec())]);
}

/// Records linked to operations of a write commit with them: those of an
/// operation that succeeds (changed or not), never those of one that fails,
/// and they survive a restart like the write.
pub async fn linked_records_commit_with_their_operation<S: RecordStore + EntityStore>(
    store: S,
    reopen: impl FnOnce() -> S,
) {
    let t = "suite-linked";
    let ops = vec![
        EntityOp::Create(entity("urn:l:1", 1)),
        // Fails: nothing to delete.
        EntityOp::Delete {
            id: "urn:l:none".into(),
        },
        EntityOp::Upsert {
            entity: entity("urn:l:2", 2),
            replace: false,
        },
    ];
    let linked = vec![
        (
            0,
            change(RecordKind::Command, t, "d/1", Some("with the create")),
        ),
        (
            1,
            change(
                RecordKind::Command,
                t,
                "d/2",
                Some("with the failed delete"),
            ),
        ),
        (
            2,
            change(RecordKind::Command, t, "d/3", Some("with the upsert")),
        ),
    ];
    let results = store.write_linked(t, ops, linked).await.expect("write");
    assert!(results[0].is_ok() && results[1].is_err() && results[2].is_ok());
    // An operation that changes nothing still succeeds: its records commit.
    let same = vec![EntityOp::Upsert {
        entity: entity("urn:l:2", 2),
        replace: false,
    }];
    let linked = vec![(0, change(RecordKind::Command, t, "d/4", Some("unchanged")))];
    let results = store.write_linked(t, same, linked).await.expect("write");
    assert!(results[0].is_ok());
    // A write that fails altogether commits none.
    let failing = vec![EntityOp::Create(entity("urn:l:1", 9))];
    let linked = vec![(0, change(RecordKind::Command, t, "d/5", Some("never")))];
    let results = store.write_linked(t, failing, linked).await.expect("write");
    assert!(results[0].is_err());

    let keys = |s: &S| -> Vec<String> {
        s.records(RecordKind::Command)
            .expect("list")
            .into_iter()
            .filter(|(tenant, _, _)| tenant == t)
            .map(|(_, key, _)| key)
            .collect()
    };
    assert_eq!(keys(&store), ["d/1", "d/3", "d/4"]);
    store.close().await.expect("close");
    drop(store);
    let store = reopen();
    assert_eq!(keys(&store), ["d/1", "d/3", "d/4"]);
    assert!(store.get(t, "urn:l:1").is_some());
}

/// The temporal API's writes (append, modify and delete instances, delete
/// attributes) and retention, on a backend's own history.
pub async fn temporal_writes_and_retention(store: &dyn EntityStore) {
    use borough_core::temporal::{
        HistoryBody, HistoryOp, HistoryOutcome, HistoryRequest, Instance, Retention, TimeProperty,
        TimeRange,
    };
    use borough_core::{AttrKind, Attribute};
    let t = "suite-temporal";
    const SPEED: &str = "https://uri.etsi.org/ngsi-ld/default-context/speed";
    const VEHICLE: &str = "https://uri.etsi.org/ngsi-ld/default-context/Vehicle";
    let reading = |at: i64, v: i64, dataset: Option<&str>| Attribute {
        kind: AttrKind::Property,
        value: json!(v),
        dataset_id: dataset.map(str::to_string),
        observed_at: Some(at),
        unit_code: None,
        object_type: None,
        sub: Default::default(),
        created_at: 0,
        modified_at: 0,
    };
    let append = |instances: Vec<Attribute>| {
        store.write_history(
            t,
            HistoryOp::Append {
                id: "urn:t".into(),
                types: vec![VEHICLE.into()],
                instances: instances
                    .into_iter()
                    .map(|a| (SPEED.to_string(), a))
                    .collect(),
            },
        )
    };
    let read = || -> Vec<(Option<String>, Vec<Instance>)> {
        let all = HistoryRequest {
            attrs: None,
            time_property: TimeProperty::ObservedAt,
            range: TimeRange::ALL,
            last_n: None,
            max_instances: 100,
            aggregation: None,
        };
        let Some(h) = store.history(t, "urn:t", &all).expect("read") else {
            return Vec::new();
        };
        h.attrs
            .into_iter()
            .map(|a| match a.body {
                HistoryBody::Instances(list) => (a.dataset_id, list),
                _ => panic!("instances expected"),
            })
            .collect()
    };
    let values = |list: &[Instance]| -> Vec<serde_json::Value> {
        list.iter().map(|i| i.attr.value.clone()).collect()
    };

    let first = append(vec![reading(100, 1, None), reading(200, 2, None)]);
    assert_eq!(first.await.expect("append"), HistoryOutcome::Created);
    // Sent again: nothing is added twice.
    let again = append(vec![reading(100, 1, None), reading(200, 2, None)]);
    assert_eq!(again.await.expect("append"), HistoryOutcome::Changed);
    let other = append(vec![reading(300, 3, Some("urn:d:x"))]);
    assert_eq!(other.await.expect("append"), HistoryOutcome::Changed);
    let attrs = read();
    assert_eq!(attrs.len(), 2, "one series per datasetId");
    let default = &attrs.iter().find(|(d, _)| d.is_none()).expect("default").1;
    assert_eq!(values(default), [json!(1), json!(2)]);

    // One instance changed, then another removed.
    let modify = HistoryOp::ModifyInstance {
        id: "urn:t".into(),
        name: SPEED.into(),
        instance: default[0].id,
        attr: Box::new(reading(100, 10, None)),
    };
    assert_eq!(
        store.write_history(t, modify).await.expect("modify"),
        HistoryOutcome::Changed
    );
    let remove = HistoryOp::DeleteInstance {
        id: "urn:t".into(),
        name: SPEED.into(),
        instance: default[1].id,
    };
    assert_eq!(
        store.write_history(t, remove).await.expect("delete"),
        HistoryOutcome::Changed
    );
    let attrs = read();
    let default = &attrs.iter().find(|(d, _)| d.is_none()).expect("default").1;
    assert_eq!(values(default), [json!(10)]);
    assert_eq!(
        default[0].attr.observed_at,
        Some(100),
        "an instance keeps its time"
    );

    // An attribute's one datasetId, then one that is not there.
    let drop_dataset = HistoryOp::DeleteAttr {
        id: "urn:t".into(),
        name: SPEED.into(),
        dataset_id: Some("urn:d:x".into()),
        all: false,
    };
    assert_eq!(
        store.write_history(t, drop_dataset).await.expect("delete"),
        HistoryOutcome::Changed
    );
    assert_eq!(read().len(), 1);
    let missing = HistoryOp::DeleteAttr {
        id: "urn:t".into(),
        name: "https://uri.etsi.org/ngsi-ld/default-context/none".into(),
        dataset_id: None,
        all: true,
    };
    assert_eq!(
        store.write_history(t, missing).await.expect("delete"),
        HistoryOutcome::NotFound
    );

    let by_type = |types: &[String]| store.history_entities(t, Some(types)).expect("list");
    assert_eq!(by_type(&[VEHICLE.to_string()]).len(), 1);
    assert!(by_type(&["https://uri.etsi.org/ngsi-ld/default-context/Lamp".to_string()]).is_empty());

    // Kept for a day: readings observed in 1970 go at the next maintenance.
    let keep = Retention {
        default: Some(86_400_000_000),
        types: Vec::new(),
    };
    store
        .set_retention(t, keep.clone())
        .await
        .expect("retention");
    assert_eq!(store.retention(t).expect("retention"), keep);
    assert!(store.maintain_history().await.expect("maintain") >= 1);
    assert!(read().iter().all(|(_, list)| list.is_empty()));
}

/// Several writes in flight from one caller are applied in the order their
/// futures were first polled, whatever order they are awaited in (the
/// devices layer keeps readings in order this way).
pub async fn writes_apply_in_the_order_they_were_first_polled(store: &dyn EntityStore) {
    let t = "suite-order";
    let mut writes = Vec::new();
    for v in 0..64 {
        let op = EntityOp::Upsert {
            entity: entity("urn:o", v),
            replace: false,
        };
        let mut write = store.write(t, vec![op]);
        std::future::poll_fn(|cx| {
            let _ = write.as_mut().poll(cx);
            std::task::Poll::Ready(())
        })
        .await;
        writes.push(write);
    }
    // Awaited last first.
    while let Some(write) = writes.pop() {
        assert!(write.await.expect("write")[0].is_ok());
    }
    let last = store.get(t, "urn:o").expect("entity");
    assert_eq!(speed(&last), json!(63));
}
