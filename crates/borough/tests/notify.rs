//! Notifications end to end: the real binary, a real HTTP receiver on
//! loopback, and the failures a city lives with: a receiver that fails, one
//! that hangs, and a server killed with SIGKILL in the middle of a stream.

mod support;

use axum::http::StatusCode;
use serde_json::{Value, json};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::receiver::{call, receiver, receiver_at};
use support::{Mosquitto, free_port, start};

fn subscribe(rt: &tokio::runtime::Runtime, base: &str, id: &str, uri: &str, extra: Value) {
    let mut body = json!({
        "id": id, "type": "Subscription",
        "entities": [{"type": "ParkingSpot"}],
        "notification": {"format": "keyValues", "endpoint": {"uri": uri}}
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (s, b) = call(
        rt,
        reqwest::Method::POST,
        &format!("{base}/ngsi-ld/v1/subscriptions"),
        Some(body),
    );
    assert_eq!(s, 201, "{b}");
}

fn spot(i: u32, status: &str, n: u64) -> Value {
    json!({"id": format!("urn:ngsi-ld:ParkingSpot:{i}"), "type": "ParkingSpot", "status": status, "n": n})
}

#[test]
fn delivers_to_a_real_receiver_with_triggers_filters_and_stats() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let base = server.base.clone();
    let (uri, inbox) = receiver(&rt, StatusCode::OK, Duration::ZERO);
    subscribe(
        &rt,
        &base,
        "urn:ngsi-ld:Subscription:free",
        &uri,
        json!({
            "watchedAttributes": ["status"], "q": "status==\"free\"",
            "notification": {"format": "keyValues", "attributes": ["status"], "endpoint": {"uri": uri}}
        }),
    );
    let ops = format!("{base}/ngsi-ld/v1/entityOperations");
    call(
        &rt,
        reqwest::Method::POST,
        &format!("{ops}/upsert"),
        Some(json!([spot(1, "free", 0), spot(2, "occupied", 0)])),
    );
    // Spot 1 created free: notified. Spot 2 created occupied: q fails.
    let got = inbox.wait_for("spot 1", Duration::from_secs(10), |g| !g.is_empty());
    assert_eq!(
        got,
        vec![json!({"id": "urn:ngsi-ld:ParkingSpot:1", "type": "ParkingSpot", "status": "free"})]
    );
    // Only status is watched: a change of n alone does not notify; spot 2 turning free does.
    call(
        &rt,
        reqwest::Method::POST,
        &format!("{ops}/update"),
        Some(json!([{"id": "urn:ngsi-ld:ParkingSpot:1", "n": 5}])),
    );
    call(
        &rt,
        reqwest::Method::POST,
        &format!("{ops}/update"),
        Some(json!([{"id": "urn:ngsi-ld:ParkingSpot:2", "status": "free"}])),
    );
    let got = inbox.wait_for("spot 2", Duration::from_secs(10), |g| g.len() >= 2);
    std::thread::sleep(Duration::from_millis(500));
    let got_now = inbox.entities();
    assert_eq!(got_now.len(), 2, "{got_now:?}");
    assert_eq!(got[1]["id"], "urn:ngsi-ld:ParkingSpot:2");
    let body = inbox.bodies.lock().unwrap()[0].clone();
    assert_eq!(body["type"], "Notification");
    assert_eq!(body["subscriptionId"], "urn:ngsi-ld:Subscription:free");
    assert!(body["notifiedAt"].is_string());

    // The statistics follow the receiver's answer, a moment after the receipt.
    let url = format!("{base}/ngsi-ld/v1/subscriptions/urn:ngsi-ld:Subscription:free");
    let start = Instant::now();
    let sub = loop {
        let (_, sub) = call(&rt, reqwest::Method::GET, &url, None);
        if sub["notification"]["timesSent"] == 2 {
            break sub;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timesSent never reached 2: {sub}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(sub["notification"]["lastSuccess"].is_string());
    assert_eq!(sub["notification"]["status"], "ok");

    // The same figures, and the lag, for Prometheus.
    let text = rt.block_on(async {
        reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains("urn:ngsi-ld:Subscription:free"))
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(line("borough_subscription_notifications_sent"), "2");
    assert_eq!(line("borough_subscription_pending_notifications"), "0");
    assert!(text.contains("borough_entities{tenant=\"\"} 2"), "{text}");
}

#[test]
fn failing_receivers_are_retried_then_dead_lettered_and_do_not_delay_others() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        &["--notify-attempts", "3", "--notify-retry-ms", "100"],
    );
    let base = server.base.clone();
    let (bad_uri, bad_inbox) = receiver(&rt, StatusCode::INTERNAL_SERVER_ERROR, Duration::ZERO);
    let (slow_uri, slow_inbox) = receiver(&rt, StatusCode::OK, Duration::from_secs(5));
    let (fast_uri, fast_inbox) = receiver(&rt, StatusCode::OK, Duration::ZERO);
    subscribe(
        &rt,
        &base,
        "urn:ngsi-ld:Subscription:bad",
        &bad_uri,
        json!({}),
    );
    subscribe(
        &rt,
        &base,
        "urn:ngsi-ld:Subscription:slow",
        &slow_uri,
        json!({}),
    );
    subscribe(
        &rt,
        &base,
        "urn:ngsi-ld:Subscription:fast",
        &fast_uri,
        json!({}),
    );
    let ops = format!("{base}/ngsi-ld/v1/entityOperations/upsert");
    for n in 0..20 {
        let (s, _) = call(
            &rt,
            reqwest::Method::POST,
            &ops,
            Some(json!([spot(1, "free", n)])),
        );
        assert!(s == 201 || s == 204);
    }
    // The fast receiver gets every change while the slow one is still on its first.
    let got = fast_inbox.wait_for(
        "20 changes at the fast receiver",
        Duration::from_secs(10),
        |g| g.iter().any(|e| e["n"] == 19),
    );
    let ns: Vec<u64> = got.iter().map(|e| e["n"].as_u64().unwrap()).collect();
    for n in 0..20 {
        assert!(
            ns.contains(&n),
            "change {n} missing at the fast receiver: {ns:?}"
        );
    }
    assert!(
        slow_inbox.entities().len() < 20,
        "the slow receiver cannot have kept up"
    );

    // The failing endpoint is tried 3 times, then its notices are dead letters.
    let url = format!("{base}/ngsi-ld/v1/subscriptions/urn:ngsi-ld:Subscription:bad");
    let start = Instant::now();
    loop {
        let (_, dead) = call(
            &rt,
            reqwest::Method::GET,
            &format!("{url}/deadLetters"),
            None,
        );
        if dead.as_array().is_some_and(|d| !d.is_empty()) {
            assert!(dead[0]["error"].as_str().unwrap().contains("500"), "{dead}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no dead letter after 15 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, sub) = call(&rt, reqwest::Method::GET, &url, None);
    assert!(
        sub["notification"]["timesFailed"].as_u64().unwrap() >= 3,
        "{sub}"
    );
    assert_eq!(sub["notification"]["status"], "failed");
    assert!(
        sub["notification"]["lastFailureReason"]
            .as_str()
            .unwrap()
            .contains("500")
    );
    assert!(
        bad_inbox.bodies.lock().unwrap().len() >= 3,
        "the failing endpoint was tried at least 3 times"
    );
    // Writes were acknowledged throughout: the entity holds the last value.
    let (_, e) = call(
        &rt,
        reqwest::Method::GET,
        &format!("{base}/ngsi-ld/v1/entities/urn:ngsi-ld:ParkingSpot:1?options=keyValues"),
        None,
    );
    assert_eq!(e["n"], 19);
}

#[test]
fn no_notification_is_lost_across_kill_9() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (uri, inbox) = receiver(&rt, StatusCode::OK, Duration::ZERO);
    let mut acked: Vec<u64> = Vec::new();
    let mut n = 0u64;
    for round in 0..4 {
        let mut server = start(dir.path(), &[]);
        if round == 0 {
            subscribe(
                &rt,
                &server.base,
                "urn:ngsi-ld:Subscription:all",
                &uri,
                json!({}),
            );
        }
        let ops = format!("{}/ngsi-ld/v1/entityOperations/upsert", server.base);
        let deadline = Instant::now() + Duration::from_millis(300 + 150 * round);
        while Instant::now() < deadline {
            n += 1;
            let (s, _) = call(
                &rt,
                reqwest::Method::POST,
                &ops,
                Some(json!([spot(1, "free", n)])),
            );
            if s == 201 || s == 204 {
                acked.push(n);
            }
        }
        server.child.kill().unwrap();
        server.child.wait().unwrap();
    }
    // After a last restart the outbox drains: every acknowledged change was notified.
    let _server = start(dir.path(), &[]);
    let got = inbox.wait_for("every acknowledged change", Duration::from_secs(30), |g| {
        let seen: std::collections::HashSet<u64> =
            g.iter().filter_map(|e| e["n"].as_u64()).collect();
        acked.iter().all(|n| seen.contains(n))
    });
    assert!(
        acked.len() > 20,
        "the test must write: {} acknowledged",
        acked.len()
    );
    assert!(got.len() >= acked.len());
}

/// The broker the tests use: the local Mosquitto unless told otherwise.
fn mqtt_broker() -> (String, u16) {
    let addr = std::env::var("BOROUGH_TEST_MQTT").unwrap_or_else(|_| "127.0.0.1:1883".into());
    let (h, p) = addr
        .rsplit_once(':')
        .expect("BOROUGH_TEST_MQTT is host:port");
    (h.to_string(), p.parse().expect("port"))
}

/// A real MQTT client subscribed to `topic` (SUBACK received) that hands on
/// every JSON message it gets.
fn mqtt_subscriber(
    rt: &tokio::runtime::Runtime,
    host: &str,
    port: u16,
    topic: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<Value> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let mut opts = rumqttc::MqttOptions::new(
        format!("borough-test-{port}-{}", std::process::id()),
        host,
        port,
    );
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 16);
    let subscribed = Arc::new(tokio::sync::Notify::new());
    let ready = subscribed.clone();
    let broker = format!("{host}:{port}");
    rt.spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Incoming::SubAck(_))) => ready.notify_one(),
                Ok(rumqttc::Event::Incoming(rumqttc::Incoming::Publish(p))) => {
                    if let Ok(v) = serde_json::from_slice(&p.payload) {
                        let _ = tx.send(v);
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("cannot reach the MQTT broker at {broker}: {e}"),
            }
        }
    });
    rt.block_on(async {
        client
            .subscribe(topic, rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), subscribed.notified())
            .await
            .expect("SUBACK");
    });
    rx
}

#[test]
fn delivers_to_an_mqtt_broker() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (host, port) = mqtt_broker();
    let topic = format!("borough-test/{}", std::process::id());
    // A real MQTT client subscribed to the topic before anything is sent.
    let mut rx = mqtt_subscriber(&rt, &host, port, &topic);

    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let uri = format!("mqtt://{}:{}/{topic}", mqtt_broker().0, port);
    subscribe(
        &rt,
        &server.base,
        "urn:ngsi-ld:Subscription:mqtt",
        &uri,
        json!({
            "notification": {"format": "keyValues", "endpoint": {"uri": uri,
                "receiverInfo": [{"key": "city", "value": "borough"}],
                "notifierInfo": [{"key": "MQTT-QoS", "value": "1"}]}}
        }),
    );
    let ops = format!("{}/ngsi-ld/v1/entityOperations/upsert", server.base);
    call(
        &rt,
        reqwest::Method::POST,
        &ops,
        Some(json!([spot(7, "free", 1)])),
    );
    let msg = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), rx.recv()).await })
        .expect("an MQTT notification within 10 s")
        .expect("message");
    assert_eq!(msg["metadata"]["city"], "borough");
    assert_eq!(msg["metadata"]["Content-Type"], "application/json");
    assert_eq!(msg["body"]["type"], "Notification");
    assert_eq!(
        msg["body"]["subscriptionId"],
        "urn:ngsi-ld:Subscription:mqtt"
    );
    assert_eq!(msg["body"]["data"][0]["id"], "urn:ngsi-ld:ParkingSpot:7");
    assert_eq!(msg["body"]["data"][0]["status"], "free");
    // The broker's acknowledgement, and so the statistics, may trail the message itself.
    let url = format!(
        "{}/ngsi-ld/v1/subscriptions/urn:ngsi-ld:Subscription:mqtt",
        server.base
    );
    let start = Instant::now();
    loop {
        let (_, sub) = call(&rt, reqwest::Method::GET, &url, None);
        // Sent once, and no longer pending once the outbox has let it go.
        if sub["notification"]["timesSent"] == 1 && sub["notification"]["pending"] == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not delivered once in 10 s: {sub}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn periodic_subscriptions_notify_every_interval() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let ops = format!("{}/ngsi-ld/v1/entityOperations/upsert", server.base);
    call(
        &rt,
        reqwest::Method::POST,
        &ops,
        Some(json!([spot(1, "free", 1), spot(2, "occupied", 1)])),
    );
    let (uri, inbox) = receiver(&rt, StatusCode::OK, Duration::ZERO);
    subscribe(
        &rt,
        &server.base,
        "urn:ngsi-ld:Subscription:periodic",
        &uri,
        json!({"timeInterval": 1, "q": "status==\"free\""}),
    );
    let start = Instant::now();
    inbox.wait_for("two periods", Duration::from_secs(10), |g| g.len() >= 2);
    let bodies = inbox.bodies.lock().unwrap().clone();
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "the second period came too soon"
    );
    for b in &bodies {
        let ids: Vec<&str> = b["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            ["urn:ngsi-ld:ParkingSpot:1"],
            "only entities matching q, each period"
        );
    }
}

#[test]
fn show_changes_carries_the_previous_value() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    let (uri, inbox) = receiver(&rt, StatusCode::OK, Duration::ZERO);
    subscribe(
        &rt,
        &server.base,
        "urn:ngsi-ld:Subscription:changes",
        &uri,
        json!({
            "notification": {"format": "normalized", "showChanges": true, "attributes": ["status"], "endpoint": {"uri": uri}}
        }),
    );
    let ops = format!("{}/ngsi-ld/v1/entityOperations", server.base);
    call(
        &rt,
        reqwest::Method::POST,
        &format!("{ops}/upsert"),
        Some(json!([spot(3, "free", 0)])),
    );
    inbox.wait_for("the creation", Duration::from_secs(10), |g| !g.is_empty());
    call(
        &rt,
        reqwest::Method::POST,
        &format!("{ops}/update"),
        Some(json!([{"id": "urn:ngsi-ld:ParkingSpot:3", "status": "occupied"}])),
    );
    let got = inbox.wait_for("the update", Duration::from_secs(10), |g| g.len() >= 2);
    assert!(
        got[0]["status"].get("previousValue").is_none(),
        "a creation has nothing before it"
    );
    assert_eq!(
        got[1]["status"],
        json!({"type": "Property", "value": "occupied", "previousValue": "free"})
    );
}

#[test]
fn deletions_notify_with_ngsi_ld_null_previous_values_and_the_notification_context() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]);
    // A context hosted by the server itself, naming `n` `level`, for notifications.
    let (s, _) = call(
        &rt,
        reqwest::Method::POST,
        &format!("{}/ngsi-ld/v1/jsonldContexts", server.base),
        Some(json!({"@context": {"level": "https://uri.etsi.org/ngsi-ld/default-context/n"}})),
    );
    assert_eq!(s, 201);
    let (_, listed) = call(
        &rt,
        reqwest::Method::GET,
        &format!("{}/ngsi-ld/v1/jsonldContexts?kind=Hosted", server.base),
        None,
    );
    let context_url = listed[0].as_str().unwrap().to_string();
    let (uri, inbox) = receiver(&rt, StatusCode::OK, Duration::ZERO);
    subscribe(
        &rt,
        &server.base,
        "urn:ngsi-ld:Subscription:deletions",
        &uri,
        json!({
            "notificationTrigger": ["attributeDeleted", "entityDeleted"],
            "jsonldContext": context_url,
            "notification": {"format": "normalized", "showChanges": true, "endpoint": {"uri": uri}}
        }),
    );
    let (kv_uri, kv_inbox) = receiver(&rt, StatusCode::OK, Duration::ZERO);
    subscribe(
        &rt,
        &server.base,
        "urn:ngsi-ld:Subscription:kv-sys",
        &kv_uri,
        json!({"notification": {"format": "keyValues", "sysAttrs": true, "endpoint": {"uri": kv_uri}}}),
    );
    let ops = format!("{}/ngsi-ld/v1/entityOperations", server.base);
    call(
        &rt,
        reqwest::Method::POST,
        &format!("{ops}/upsert"),
        Some(json!([spot(5, "free", 7)])),
    );
    let kv = kv_inbox.wait_for("the creation", Duration::from_secs(10), |g| !g.is_empty());
    assert!(
        kv[0]["createdAt"].is_string(),
        "keyValues with sysAttrs: {}",
        kv[0]
    );
    assert!(kv[0]["modifiedAt"].is_string(), "{}", kv[0]);
    // NGSI-LD Null in a merge deletes the attribute and notifies as a deletion.
    let (s, b) = call(
        &rt,
        reqwest::Method::PATCH,
        &format!(
            "{}/ngsi-ld/v1/entities/urn:ngsi-ld:ParkingSpot:5",
            server.base
        ),
        Some(json!({"n": "urn:ngsi-ld:null"})),
    );
    assert_eq!(s, 204, "{b}");
    let got = inbox.wait_for("the attribute deletion", Duration::from_secs(10), |g| {
        !g.is_empty()
    });
    let level = &got[0]["level"];
    assert_eq!(level["value"], "urn:ngsi-ld:null", "{}", got[0]);
    assert_eq!(level["previousValue"], 7, "{}", got[0]);
    assert!(level["deletedAt"].is_string());
    let (s, _) = call(
        &rt,
        reqwest::Method::DELETE,
        &format!(
            "{}/ngsi-ld/v1/entities/urn:ngsi-ld:ParkingSpot:5",
            server.base
        ),
        None,
    );
    assert_eq!(s, 204);
    let got = inbox.wait_for("the entity deletion", Duration::from_secs(10), |g| {
        g.len() >= 2
    });
    let gone = &got[1];
    assert_eq!(gone["id"], "urn:ngsi-ld:ParkingSpot:5");
    assert!(gone["deletedAt"].is_string(), "{gone}");
    assert_eq!(gone["status"]["value"], "urn:ngsi-ld:null", "{gone}");
    assert_eq!(gone["status"]["previousValue"], "free", "{gone}");
}

/// A Mosquitto of the test's own with a plain and a TLS listener, and a CA of
/// the test's own that signed the TLS listener's certificate.
struct TlsBroker {
    plain: u16,
    tls: u16,
    ca: std::path::PathBuf,
    _broker: Mosquitto,
}

fn tls_broker() -> TlsBroker {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=borough-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(d.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    ]);
    let (plain, tls) = (free_port(), free_port());
    let conf = format!(
        "allow_anonymous true\npersistence false\nlistener {plain} 127.0.0.1\nlistener {tls} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n",
        ca = d.join("ca.pem").display(),
        cert = d.join("server.pem").display(),
        key = d.join("server.key").display(),
    );
    TlsBroker {
        plain,
        tls,
        ca: d.join("ca.pem"),
        _broker: Mosquitto::start(dir, &conf, tls),
    }
}

#[test]
fn delivers_to_an_mqtts_broker_with_a_private_ca() {
    let broker = tls_broker();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let topic = "borough-test/tls";
    let mut rx = mqtt_subscriber(&rt, "127.0.0.1", broker.plain, topic);

    let dir = tempfile::tempdir().unwrap();
    let ca = broker.ca.to_str().unwrap().to_string();
    let server = start(dir.path(), &["--mqtt-ca-file", &ca]);
    let uri = format!("mqtts://127.0.0.1:{}/{topic}", broker.tls);
    subscribe(
        &rt,
        &server.base,
        "urn:ngsi-ld:Subscription:tls",
        &uri,
        json!({
            "notification": {"format": "keyValues", "endpoint": {"uri": uri,
                "notifierInfo": [{"key": "MQTT-QoS", "value": "1"}]}}
        }),
    );
    let ops = format!("{}/ngsi-ld/v1/entityOperations/upsert", server.base);
    call(
        &rt,
        reqwest::Method::POST,
        &ops,
        Some(json!([spot(9, "free", 1)])),
    );
    let msg = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(15), rx.recv()).await })
        .expect("a notification over TLS within 15 s")
        .expect("message");
    assert_eq!(msg["body"]["data"][0]["id"], "urn:ngsi-ld:ParkingSpot:9");

    // Without the private CA the broker's certificate is not trusted: delivery fails.
    let dir2 = tempfile::tempdir().unwrap();
    let untrusting = start(dir2.path(), &["--notify-attempts", "1"]);
    subscribe(
        &rt,
        &untrusting.base,
        "urn:ngsi-ld:Subscription:tls",
        &uri,
        json!({
            "notification": {"format": "keyValues", "endpoint": {"uri": uri}}
        }),
    );
    let ops = format!("{}/ngsi-ld/v1/entityOperations/upsert", untrusting.base);
    call(
        &rt,
        reqwest::Method::POST,
        &ops,
        Some(json!([spot(10, "free", 1)])),
    );
    let url = format!(
        "{}/ngsi-ld/v1/subscriptions/urn:ngsi-ld:Subscription:tls",
        untrusting.base
    );
    let start_at = Instant::now();
    loop {
        let (_, sub) = call(&rt, reqwest::Method::GET, &url, None);
        if sub["notification"]["timesFailed"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(
            start_at.elapsed() < Duration::from_secs(15),
            "an untrusted broker must fail: {sub}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        rt.block_on(async { tokio::time::timeout(Duration::from_millis(500), rx.recv()).await })
            .is_err(),
        "nothing may reach the broker without trust"
    );
}

#[test]
fn without_an_allowlist_loopback_receivers_are_refused_and_never_reached() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (uri, inbox) = receiver(&rt, StatusCode::OK, Duration::ZERO);
    let by_name = uri.replace("127.0.0.1", "localhost");
    let dir = tempfile::tempdir().unwrap();
    // Subscriptions made while loopback was allowed...
    {
        let allowing = start(dir.path(), &[]);
        subscribe(
            &rt,
            &allowing.base,
            "urn:ngsi-ld:Subscription:literal",
            &uri,
            json!({}),
        );
        subscribe(
            &rt,
            &allowing.base,
            "urn:ngsi-ld:Subscription:name",
            &by_name,
            json!({}),
        );
    }
    // ...meet a server started without --allow-outbound.
    let server = support::start_public_only(
        dir.path(),
        &["--notify-attempts", "2", "--notify-retry-ms", "50"],
    );
    let base = server.base.clone();
    for (id, u) in [("new-literal", &uri), ("new-name", &by_name)] {
        let (s, b) = call(
            &rt,
            reqwest::Method::POST,
            &format!("{base}/ngsi-ld/v1/subscriptions"),
            Some(json!({
                "id": format!("urn:ngsi-ld:Subscription:{id}"), "type": "Subscription",
                "entities": [{"type": "ParkingSpot"}],
                "notification": {"endpoint": {"uri": u}}
            })),
        );
        assert_eq!(s, 400, "{u}: {b}");
        assert!(
            b["detail"]
                .as_str()
                .is_some_and(|d| d.contains("loopback range") && d.contains("--allow-outbound")),
            "{b}"
        );
    }

    // Delivery refuses them too: retried, then dead-lettered with the reason.
    let (s, _) = call(
        &rt,
        reqwest::Method::POST,
        &format!("{base}/ngsi-ld/v1/entityOperations/upsert"),
        Some(json!([spot(1, "free", 1)])),
    );
    assert!(s == 201 || s == 204);
    for id in ["literal", "name"] {
        let url = format!("{base}/ngsi-ld/v1/subscriptions/urn:ngsi-ld:Subscription:{id}");
        let started = Instant::now();
        loop {
            let (_, dead) = call(
                &rt,
                reqwest::Method::GET,
                &format!("{url}/deadLetters"),
                None,
            );
            if let Some(error) = dead[0]["error"].as_str() {
                assert!(
                    error.contains("after 2 attempts") && error.contains("loopback range"),
                    "{id}: {error}"
                );
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{id}: no dead letter after 15 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert!(
        inbox.bodies.lock().unwrap().is_empty(),
        "nothing may reach the receiver"
    );
}

#[test]
fn pending_notices_stop_at_the_bound_and_the_rest_are_counted_as_dropped() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The receiver is down: nothing listens on its port yet.
    let port = free_port();
    let uri = format!("http://127.0.0.1:{port}/notify");
    // Retried for long enough that nothing is dead-lettered during the test.
    let args = [
        "--max-pending-notices",
        "5",
        "--notify-attempts",
        "1000",
        "--notify-retry-ms",
        "100",
    ];
    let server = start(dir.path(), &args);
    let id = "urn:ngsi-ld:Subscription:down";
    subscribe(&rt, &server.base, id, &uri, json!({}));
    let write = |base: &str, n: u64| {
        let (s, b) = call(
            &rt,
            reqwest::Method::POST,
            &format!("{base}/ngsi-ld/v1/entityOperations/upsert"),
            Some(json!([spot(1, "free", n)])),
        );
        assert!(s == 201 || s == 204, "{s} {b}");
    };
    let stats = |base: &str| {
        let (_, sub) = call(
            &rt,
            reqwest::Method::GET,
            &format!("{base}/ngsi-ld/v1/subscriptions/{id}"),
            None,
        );
        (
            sub["notification"]["pending"].as_u64().unwrap(),
            sub["notification"]["dropped"].as_u64().unwrap(),
        )
    };
    for n in 0..12 {
        write(&server.base, n);
    }
    // Pending stops at the bound; the rest are counted, and the writes were
    // acknowledged throughout.
    assert_eq!(stats(&server.base), (5, 7));
    let metrics = rt.block_on(async {
        reqwest::get(format!("{}/metrics", server.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("borough_subscription_notifications_dropped_total{") && l.contains(id)
        })
        .unwrap_or_else(|| panic!("no dropped counter:\n{metrics}"));
    assert!(line.ends_with(" 7"), "{line}");

    // After a restart the pending notices are counted again from the outbox:
    // the bound still holds.
    drop(server);
    let server = start(dir.path(), &args);
    assert_eq!(stats(&server.base).0, 5);
    for n in 12..15 {
        write(&server.base, n);
    }
    assert_eq!(stats(&server.base), (5, 3));

    // The receiver comes back: every pending notice is delivered, oldest first.
    let (_, inbox) = receiver_at(&rt, port, StatusCode::OK, Duration::ZERO);
    let got = inbox.wait_for("the 5 pending notices", Duration::from_secs(30), |g| {
        g.len() >= 5
    });
    let ns: Vec<u64> = got.iter().map(|e| e["n"].as_u64().unwrap()).collect();
    assert_eq!(ns, [0, 1, 2, 3, 4]);
    let start_at = Instant::now();
    while stats(&server.base).0 != 0 {
        assert!(
            start_at.elapsed() < Duration::from_secs(10),
            "pending did not drop to 0"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // And new changes are queued again.
    write(&server.base, 99);
    inbox.wait_for("the next change", Duration::from_secs(10), |g| {
        g.iter().any(|e| e["n"] == 99)
    });
}

#[test]
fn devices_reach_borough_through_an_external_broker_over_mqtts() {
    let broker = tls_broker();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = broker.ca.to_str().unwrap().to_string();
    // Borough's client connects over TLS (the private CA), under a topic prefix.
    let url = format!("--mqtt-broker=mqtts://127.0.0.1:{}", broker.tls);
    let server = start(
        dir.path(),
        &["--mqtt-ca-file", &ca, &url, "--mqtt-topic-prefix", "city1"],
    );
    let base = server.base.clone();
    let (s, b) = call(
        &rt,
        reqwest::Method::POST,
        &format!("{base}/api/v1/devices"),
        Some(json!({"id": "m-1", "entityType": "Meter",
            "attributes": [{"key": "v", "attribute": "level", "type": "integer"}],
            "commands": ["reset"]})),
    );
    assert_eq!(s, 201, "{b}");
    // The device side, on the broker's plain listener.
    let mut commands = mqtt_subscriber(
        &rt,
        "127.0.0.1",
        broker.plain,
        "city1/default/devices/m-1/cmd",
    );
    let mut opts = rumqttc::MqttOptions::new("m-1", "127.0.0.1", broker.plain);
    opts.set_keep_alive(Duration::from_secs(10));
    let (device, mut events) = rumqttc::AsyncClient::new(opts, 64);
    rt.spawn(async move { while events.poll().await.is_ok() {} });
    let entity = format!("{base}/ngsi-ld/v1/entities/urn:ngsi-ld:Meter:m-1");
    let start_at = Instant::now();
    // Borough subscribes in the background: publish until the reading arrives.
    while call(&rt, reqwest::Method::GET, &entity, None).1["level"]["value"] != json!(7) {
        rt.block_on(device.publish(
            "city1/default/devices/m-1/attrs",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"v": 7}"#,
        ))
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            start_at.elapsed() < Duration::from_secs(15),
            "no reading arrived through the TLS connection"
        );
    }
    // Commands go out under the prefix.
    let (s, c) = call(
        &rt,
        reqwest::Method::POST,
        &format!("{base}/api/v1/devices/m-1/commands"),
        Some(json!({"name": "reset"})),
    );
    assert_eq!(s, 201, "{c}");
    let got = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), commands.recv()).await })
        .expect("the command in time")
        .expect("the subscriber runs");
    assert_eq!(got["id"], c["id"]);
}
