//! The devices layer on the embedded store, without the network: the
//! registry's rules, a reading's way to the entity, and a command's lifecycle
//! through a recording sink.

use borough_core::entity::AttrPatch;
use borough_core::temporal::{HistoryBody, HistoryRequest, TimeProperty, TimeRange};
use borough_core::{Context, EntityOp};
use borough_devices::commands::{CommandInput, CommandSink, Status};
use borough_devices::model::DeviceInput;
use borough_devices::store::CommandingStore;
use borough_devices::{Devices, DevicesConfig};
use borough_embedded::EmbeddedStore;
use borough_store::EntityStore;
use bytes::Bytes;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Recorder {
    online: Mutex<bool>,
    sent: Mutex<Vec<Value>>,
}

impl CommandSink for Recorder {
    fn deliver(&self, _tenant: &str, _device: &str, message: Bytes) -> bool {
        if !*self.online.lock().unwrap() {
            return false;
        }
        self.sent
            .lock()
            .unwrap()
            .push(serde_json::from_slice(&message).unwrap());
        true
    }
}

fn input(v: Value) -> DeviceInput {
    serde_json::from_value(v).unwrap()
}

fn attr(store: &EmbeddedStore, entity: &str, name: &str) -> Value {
    let e = store.get("", entity).expect("the entity");
    let iri = Context::core().expand(name).into_owned();
    e.attrs
        .get(&iri)
        .map(|a| a[0].value.clone())
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_and_commands_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(borough_embedded::open(dir.path()).unwrap());
    let devices = Devices::start(
        store.clone(),
        store.clone(),
        DevicesConfig {
            sweep_interval: Duration::from_millis(50),
            ack_timeout: Duration::from_millis(200),
            max_attempts: 2,
            ..DevicesConfig::default()
        },
    )
    .unwrap();

    let (d, token) = devices
        .create(
            "",
            input(json!({"id": "v1", "entityType": "Valve",
                "attributes": [{"key": "p", "attribute": "pressure"}], "commands": ["open"]})),
        )
        .await
        .unwrap();
    assert!(devices.authenticate("v1", &token).is_some());
    assert!(devices.authenticate("v1", "wrong").is_none());
    assert!(
        devices
            .create("", input(json!({"id": "v1", "entityType": "Valve"})))
            .await
            .is_err()
    );
    // The command attribute exists from the start, so that NGSI-LD can patch it.
    assert_eq!(attr(&store, &d.entity_id, "open"), json!(""));

    // A reading reaches the entity.
    let entry = devices.get("", "v1").unwrap();
    let a = devices
        .ingest("test", &entry, br#"{"p": 2.5}"#)
        .await
        .unwrap();
    assert_eq!((a.readings, a.values), (1, 1));
    assert_eq!(attr(&store, &d.entity_id, "pressure"), json!(2.5));

    // A batch of timestamped readings: each one is in the entity's history,
    // at the device's time, from the same durable write.
    let a = devices
        .ingest(
            "test",
            &entry,
            br#"[{"p": 3.0, "observedAt": "2026-01-01T00:00:00Z"},
                 {"p": 3.5, "observedAt": "2026-01-01T00:05:00Z"},
                 {"p": 4.0, "observedAt": "2026-01-01T00:10:00Z"}]"#,
        )
        .await
        .unwrap();
    assert_eq!(a.readings, 3);
    let pressure = Context::core().expand("pressure").into_owned();
    let h = store
        .history(
            "",
            &d.entity_id,
            &HistoryRequest {
                attrs: Some(vec![pressure]),
                time_property: TimeProperty::ObservedAt,
                range: TimeRange {
                    from: borough_core::validate::parse_datetime("2026-01-01T00:00:00Z").unwrap(),
                    to: borough_core::validate::parse_datetime("2026-01-02T00:00:00Z").unwrap(),
                },
                last_n: None,
                max_instances: 100,
                aggregation: None,
            },
        )
        .unwrap()
        .expect("the entity has history");
    let HistoryBody::Instances(list) = &h.attrs[0].body else {
        panic!("instances expected");
    };
    let values: Vec<Value> = list.iter().map(|i| i.attr.value.clone()).collect();
    assert_eq!(values, vec![json!(3.0), json!(3.5), json!(4.0)]);

    // Offline: queued. Online: sent. Acknowledged: shown on the entity.
    let sink = Arc::new(Recorder::default());
    devices.commands.set_sink(sink.clone());
    let (c, created) = devices
        .send_command(
            "",
            "v1",
            CommandInput {
                name: "open".into(),
                value: json!(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(created);
    assert_eq!(c.status, Status::Queued);
    *sink.online.lock().unwrap() = true;
    devices.deliver_pending("", "v1").await;
    assert_eq!(sink.sent.lock().unwrap()[0]["id"], json!(c.id));
    assert_eq!(
        devices.commands.get("", "v1", &c.id).unwrap().status,
        Status::Sent
    );
    assert!(
        devices
            .acknowledge("", "v1", &c.id, true, Some(json!("done")))
            .await
            .unwrap()
    );
    assert!(
        !devices
            .acknowledge("", "v1", &c.id, true, None)
            .await
            .unwrap()
    );
    assert_eq!(
        attr(&store, &d.entity_id, "open_status"),
        json!("acknowledged")
    );

    // An NGSI-LD partial update of the command attribute, through the API's store, sends it.
    let api = CommandingStore::new(devices.clone());
    let patch = AttrPatch {
        value: Some(json!(7)),
        ..Default::default()
    };
    let r = api
        .write(
            "",
            vec![EntityOp::PatchAttr {
                id: d.entity_id.clone(),
                attr: Context::core().expand("open").into_owned(),
                patch,
            }],
        )
        .await
        .unwrap();
    assert!(r[0].is_ok());
    assert_eq!(sink.sent.lock().unwrap().len(), 2);
    assert_eq!(sink.sent.lock().unwrap()[1]["value"], json!(7));
    // Never acknowledged: sent again once, then failed.
    let id = sink.sent.lock().unwrap()[1]["id"]
        .as_str()
        .unwrap()
        .to_string();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let c = devices.commands.get("", "v1", &id).unwrap();
    assert_eq!((c.status, c.attempts), (Status::Failed, 2), "{c:?}");

    // Offline with a TTL of zero: expired.
    *sink.online.lock().unwrap() = false;
    let (c, _) = devices
        .send_command(
            "",
            "v1",
            CommandInput {
                name: "open".into(),
                ttl: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        devices.commands.get("", "v1", &c.id).unwrap().status,
        Status::Expired
    );
    assert_eq!(attr(&store, &d.entity_id, "open_status"), json!("expired"));

    // Deleting the device forgets its commands; its entity stays.
    assert!(devices.delete("", "v1").await.unwrap());
    assert!(devices.commands.list("", "v1").is_empty());
    assert!(store.get("", &d.entity_id).is_some());
}
