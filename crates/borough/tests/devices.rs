//! Devices end to end: the real binary, real MQTT clients (rumqttc, 3.1.1
//! and 5) against the embedded broker and against the local Mosquitto in
//! external mode, and the HTTP device API.

mod support;

use serde_json::{Value, json};
use std::process::Command;
use std::time::{Duration, Instant};
use support::{Mosquitto, free_port, start};

async fn call(
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    request(method, url, token, None, body).await
}

/// [`call`] in `tenant` (`NGSILD-Tenant`), without a credential.
async fn call_in(
    tenant: &str,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> (u16, Value) {
    request(method, url, None, Some(tenant), body).await
}

async fn request(
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    tenant: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(t) = tenant {
        req = req.header("NGSILD-Tenant", t);
    }
    if let Some(b) = body {
        req = req
            .body(b.to_string())
            .header("content-type", "application/json");
    }
    let r = req.send().await.expect("request");
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn raw_post(url: &str, token: &str, body: &'static str) -> u16 {
    reqwest::Client::new()
        .post(url)
        .bearer_auth(token)
        .body(body)
        .send()
        .await
        .expect("request")
        .status()
        .as_u16()
}

async fn get(url: &str) -> Value {
    call(reqwest::Method::GET, url, None, None).await.1
}

async fn register(base: &str, id: &str, commands: &[&str]) -> String {
    let (s, b) = call(
        reqwest::Method::POST,
        &format!("{base}/api/v1/devices"),
        None,
        Some(json!({
            "id": id, "entityType": "WeatherObserved",
            "attributes": [
                {"key": "t", "attribute": "temperature", "unitCode": "CEL"},
                {"key": "h", "attribute": "relativeHumidity", "type": "integer"}
            ],
            "commands": commands
        })),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    b["token"].as_str().expect("token").to_string()
}

fn entity_url(base: &str, id: &str) -> String {
    format!("{base}/ngsi-ld/v1/entities/urn:ngsi-ld:WeatherObserved:{id}")
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A 3.1.1 device client: returns it once connected, or the refusal.
async fn device_v4(
    port: u16,
    user: &str,
    pass: &str,
) -> Result<(rumqttc::AsyncClient, rumqttc::EventLoop), rumqttc::ConnectionError> {
    let mut opts = rumqttc::MqttOptions::new(format!("c-{user}"), "127.0.0.1", port);
    opts.set_credentials(user, pass);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 64);
    loop {
        match events.poll().await? {
            rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => return Ok((client, events)),
            _ => continue,
        }
    }
}

/// Polls until a packet matching `want` arrives (or the connection ends).
async fn until<T>(
    events: &mut rumqttc::EventLoop,
    mut want: impl FnMut(&rumqttc::Packet) -> Option<T>,
) -> Result<T, rumqttc::ConnectionError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no such packet in time");
        if let rumqttc::Event::Incoming(p) =
            tokio::time::timeout(Duration::from_secs(10), events.poll())
                .await
                .expect("an MQTT event")?
            && let Some(t) = want(&p)
        {
            return Ok(t);
        }
    }
}

async fn publish_acked(
    client: &rumqttc::AsyncClient,
    events: &mut rumqttc::EventLoop,
    topic: &str,
    payload: Value,
) {
    client
        .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.to_string())
        .await
        .unwrap();
    until(events, |p| {
        matches!(p, rumqttc::Packet::PubAck(_)).then_some(())
    })
    .await
    .expect("PUBACK");
}

async fn metrics(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_ingests_both_forms_with_auth_and_acls() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        &["--mqtt", "127.0.0.1:0", "--device-rate-limit", "5"],
    );
    let base = server.base.clone();
    let port = server.mqtt_port;
    let t1 = register(&base, "ws-1", &[]).await;
    let t2 = register(&base, "ws-2", &[]).await;

    // A second device cannot claim the first one's entity.
    let (s, _) = call(
        reqwest::Method::POST,
        &format!("{base}/api/v1/devices"),
        None,
        Some(json!({"id": "ws-x", "entityType": "WeatherObserved",
            "entityId": "urn:ngsi-ld:WeatherObserved:ws-1"})),
    )
    .await;
    assert_eq!(s, 409);
    let listed = get(&format!("{base}/api/v1/devices")).await;
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert!(listed[0].get("token").is_none() && listed[0].get("tokenHash").is_none());

    // One reading over MQTT 3.1.1, QoS 1: acknowledged once durable.
    let (c1, mut e1) = device_v4(port, "ws-1", &t1).await.expect("ws-1 connects");
    publish_acked(
        &c1,
        &mut e1,
        "default/devices/ws-1/attrs",
        json!({"t": 21.5, "h": 40}),
    )
    .await;
    let e = get(&entity_url(&base, "ws-1")).await;
    assert_eq!(e["temperature"]["value"], json!(21.5), "{e}");
    assert_eq!(e["temperature"]["unitCode"], json!("CEL"));
    assert_eq!(e["relativeHumidity"]["value"], json!(40));

    // The batch form: each reading with its own time; the last is the state.
    publish_acked(
        &c1,
        &mut e1,
        "default/devices/ws-1/attrs",
        json!([{"t": 1, "observedAt": "2026-01-01T00:00:00Z"}, {"t": 2, "observedAt": "2026-01-01T00:01:00Z"}]),
    )
    .await;
    let e = get(&entity_url(&base, "ws-1")).await;
    assert_eq!(e["temperature"]["value"], json!(2));
    assert_eq!(
        e["temperature"]["observedAt"],
        json!("2026-01-01T00:01:00.000Z")
    );

    // Bad payloads are refused and counted; the connection and the entity stay.
    publish_acked(&c1, &mut e1, "default/devices/ws-1/attrs", json!("x")).await;
    c1.publish(
        "default/devices/ws-1/attrs",
        rumqttc::QoS::AtLeastOnce,
        false,
        "{not json",
    )
    .await
    .unwrap();
    until(&mut e1, |p| {
        matches!(p, rumqttc::Packet::PubAck(_)).then_some(())
    })
    .await
    .unwrap();
    publish_acked(
        &c1,
        &mut e1,
        "default/devices/ws-1/attrs",
        json!({"t": "warm", "zzz": 1}),
    )
    .await;
    assert_eq!(
        get(&entity_url(&base, "ws-1")).await["temperature"]["value"],
        json!(2)
    );
    let m = metrics(&base).await;
    for reason in ["not_json", "bad_shape", "wrong_type", "unmapped_key"] {
        assert!(
            m.contains(&format!("reason=\"{reason}\"")),
            "{reason} not counted:\n{m}"
        );
    }

    // A device may not subscribe to another device's commands...
    c1.subscribe("default/devices/ws-2/cmd", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let codes = until(&mut e1, |p| match p {
        rumqttc::Packet::SubAck(s) => Some(s.return_codes.clone()),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(codes, [rumqttc::SubscribeReasonCode::Failure]);
    // ...nor publish to another device's topic: it is disconnected, and nothing is written.
    c1.publish(
        "default/devices/ws-2/attrs",
        rumqttc::QoS::AtLeastOnce,
        false,
        r#"{"t": 99}"#,
    )
    .await
    .unwrap();
    assert!(
        until(&mut e1, |p| matches!(p, rumqttc::Packet::PubAck(_))
            .then_some(()))
        .await
        .is_err(),
        "an ACL violation must end the connection"
    );
    let (s, _) = call(reqwest::Method::GET, &entity_url(&base, "ws-2"), None, None).await;
    assert_eq!(s, 404);

    // Wrong token, unknown device: refused at CONNECT.
    assert!(device_v4(port, "ws-1", &t2).await.is_err());
    assert!(device_v4(port, "nobody", &t1).await.is_err());
    assert!(metrics(&base).await.contains("reason=\"auth\""));

    // MQTT 5, QoS 1.
    {
        use rumqttc::v5::{AsyncClient, Event, MqttOptions, mqttbytes::QoS, mqttbytes::v5::Packet};
        let mut opts = MqttOptions::new("c5", "127.0.0.1", port);
        opts.set_credentials("ws-2", &t2);
        let (c, mut ev) = AsyncClient::new(opts, 16);
        c.publish(
            "default/devices/ws-2/attrs",
            QoS::AtLeastOnce,
            false,
            r#"{"t": 5.5}"#,
        )
        .await
        .unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ev.poll())
                .await
                .expect("v5 event")
            {
                Ok(Event::Incoming(Packet::PubAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("MQTT 5 client failed: {e}"),
            }
        }
        let e = get(&entity_url(&base, "ws-2")).await;
        assert_eq!(e["temperature"]["value"], json!(5.5));
    }

    // HTTP ingestion with the device token.
    let measures = format!("{base}/api/v1/devices/ws-2/measures");
    let (s, b) = call(
        reqwest::Method::POST,
        &measures,
        Some(&t2),
        Some(json!({"t": 7, "nope": 1})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["values"], json!(1));
    assert_eq!(
        get(&entity_url(&base, "ws-2")).await["temperature"]["value"],
        json!(7)
    );
    assert_eq!(raw_post(&measures, &t1, r#"{"t": 8}"#).await, 401);
    assert_eq!(raw_post(&measures, &t2, "{not json").await, 400);
    assert_eq!(raw_post(&measures, &t2, r#"{"h": 1.5}"#).await, 400);
    // A flood from one device hits its rate limit; the other device is unaffected.
    let mut limited = 0;
    for _ in 0..30 {
        if raw_post(&measures, &t2, r#"{"t": 9}"#).await == 429 {
            limited += 1;
        }
    }
    assert!(limited > 0, "no request was rate-limited");
    let (c1, mut e1) = device_v4(port, "ws-1", &t1).await.expect("ws-1 reconnects");
    publish_acked(&c1, &mut e1, "default/devices/ws-1/attrs", json!({"t": 3})).await;
    assert_eq!(
        get(&entity_url(&base, "ws-1")).await["temperature"]["value"],
        json!(3)
    );
    assert!(metrics(&base).await.contains("reason=\"rate_limited\""));
}

async fn command_status(base: &str, device: &str, id: &str) -> String {
    get(&format!("{base}/api/v1/devices/{device}/commands/{id}")).await["status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_wait_for_offline_devices_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--mqtt",
        "127.0.0.1:0",
        "--command-ack-timeout-secs",
        "1",
        "--command-attempts",
        "2",
    ];
    let server = start(dir.path(), &args);
    let base = server.base.clone();
    let token = register(&base, "valve-1", &["open"]).await;
    let cmds = format!("{base}/api/v1/devices/valve-1/commands");

    // Sent while the device is offline: queued, and the key makes a retry harmless.
    let body = json!({"name": "open", "value": {"percent": 50}, "idempotencyKey": "k1"});
    let (s, c) = call(reqwest::Method::POST, &cmds, None, Some(body.clone())).await;
    assert_eq!(s, 201, "{c}");
    assert_eq!(c["status"], json!("queued"));
    let id = c["id"].as_str().unwrap().to_string();
    let (s, again) = call(reqwest::Method::POST, &cmds, None, Some(body)).await;
    assert_eq!((s, again["id"].as_str()), (200, Some(id.as_str())));
    let (s, _) = call(
        reqwest::Method::POST,
        &cmds,
        None,
        Some(json!({"name": "close"})),
    )
    .await;
    assert_eq!(s, 400);
    let e = get(&entity_url(&base, "valve-1")).await;
    assert_eq!(e["open_status"]["value"], json!("queued"), "{e}");

    // Borough is killed and started again: the command is still queued.
    drop(server);
    let server = start(dir.path(), &args);
    let base = server.base.clone();
    let cmds = format!("{base}/api/v1/devices/valve-1/commands");
    assert_eq!(command_status(&base, "valve-1", &id).await, "queued");

    // The device connects and subscribes: it receives the command, then acknowledges it.
    let (c, mut ev) = device_v4(server.mqtt_port, "valve-1", &token)
        .await
        .unwrap();
    c.subscribe("default/devices/valve-1/cmd", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let msg: Value = until(&mut ev, |p| match p {
        rumqttc::Packet::Publish(p) if p.topic == "default/devices/valve-1/cmd" => {
            serde_json::from_slice(&p.payload).ok()
        }
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(msg["id"].as_str(), Some(id.as_str()));
    assert_eq!(msg["value"], json!({"percent": 50}));
    assert_eq!(command_status(&base, "valve-1", &id).await, "sent");
    c.publish(
        "default/devices/valve-1/cmdack",
        rumqttc::QoS::AtLeastOnce,
        false,
        json!({"id": id, "status": "ok", "info": "opened"}).to_string(),
    )
    .await
    .unwrap();
    until(&mut ev, |p| {
        matches!(p, rumqttc::Packet::PubAck(_)).then_some(())
    })
    .await
    .unwrap();
    wait_for("acknowledged", async || {
        command_status(&base, "valve-1", &id).await == "acknowledged"
    })
    .await;
    let e = get(&entity_url(&base, "valve-1")).await;
    assert_eq!(e["open_status"]["value"], json!("acknowledged"));
    assert_eq!(e["open_info"]["value"]["info"], json!("opened"));

    // An NGSI-LD PATCH of the command attribute sends the command too.
    let (s, b) = call(
        reqwest::Method::PATCH,
        &format!("{}/attrs/open", entity_url(&base, "valve-1")),
        None,
        Some(json!({"type": "Property", "value": {"percent": 10}})),
    )
    .await;
    assert_eq!(s, 204, "{b}");
    let msg: Value = until(&mut ev, |p| match p {
        rumqttc::Packet::Publish(p) => serde_json::from_slice(&p.payload).ok(),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(msg["value"], json!({"percent": 10}));
    let patched = msg["id"].as_str().unwrap().to_string();
    // Not acknowledged: sent again after the ack timeout, then failed after the last attempt.
    let resent: Value = until(&mut ev, |p| match p {
        rumqttc::Packet::Publish(p) => serde_json::from_slice(&p.payload).ok(),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(resent["id"].as_str(), Some(patched.as_str()));
    wait_for("failed", async || {
        command_status(&base, "valve-1", &patched).await == "failed"
    })
    .await;

    // A command with a short TTL for a device that went away expires.
    drop(c);
    drop(ev);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, short) = call(
        reqwest::Method::POST,
        &cmds,
        None,
        Some(json!({"name": "open", "ttl": 1})),
    )
    .await;
    let short = short["id"].as_str().unwrap().to_string();
    wait_for("expired", async || {
        command_status(&base, "valve-1", &short).await == "expired"
    })
    .await;

    // The HTTP pick-up: a polling device gets queued commands and acknowledges over HTTP.
    let (_, q) = call(
        reqwest::Method::POST,
        &cmds,
        None,
        Some(json!({"name": "open", "value": 1})),
    )
    .await;
    let qid = q["id"].as_str().unwrap().to_string();
    let (s, picked) = call(
        reqwest::Method::GET,
        &format!("{cmds}/pending"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(picked[0]["id"].as_str(), Some(qid.as_str()));
    let (s, _) = call(
        reqwest::Method::POST,
        &format!("{cmds}/{qid}/ack"),
        Some(&token),
        Some(json!({"status": "error", "info": "jammed"})),
    )
    .await;
    assert_eq!(s, 204);
    assert_eq!(command_status(&base, "valve-1", &qid).await, "failed");
    let (s, _) = call(
        reqwest::Method::GET,
        &format!("{cmds}/pending"),
        Some("wrong"),
        None,
    )
    .await;
    assert_eq!(s, 401);
}

/// The local Mosquitto (BOROUGH_TEST_MQTT, default 127.0.0.1:1883).
fn mosquitto() -> (String, u16) {
    let addr = std::env::var("BOROUGH_TEST_MQTT").unwrap_or_else(|_| "127.0.0.1:1883".into());
    let (h, p) = addr.rsplit_once(':').expect("host:port");
    (h.to_string(), p.parse().expect("port"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_broker_mode_with_mosquitto() {
    let (host, port) = mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("--mqtt-broker=mqtt://{host}:{port}");
    let server = start(dir.path(), &[&url]);
    let base = server.base.clone();
    // A tenant of its own, so that parallel runs on the same Mosquitto do not meet.
    let tenant = format!("ext{}", std::process::id());
    let (s, b) = call_in(
        &tenant,
        reqwest::Method::POST,
        &format!("{base}/api/v1/devices"),
        Some(json!({"id": "lamp-1", "entityType": "Streetlight",
            "attributes": [{"key": "on", "attribute": "powerState", "type": "boolean"}],
            "commands": ["dim"]})),
    )
    .await;
    assert_eq!(s, 201, "{b}");

    let mut opts = rumqttc::MqttOptions::new(format!("lamp-{tenant}"), host.clone(), port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (c, mut ev) = rumqttc::AsyncClient::new(opts, 64);
    // The client's event loop runs on its own; incoming packets come through a channel.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(rumqttc::Event::Incoming(p)) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    let mut next = async |want: &dyn Fn(&rumqttc::Packet) -> bool| -> rumqttc::Packet {
        loop {
            let p = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("a packet from Mosquitto in time")
                .expect("the client runs");
            if want(&p) {
                return p;
            }
        }
    };
    c.subscribe(
        format!("{tenant}/devices/lamp-1/cmd"),
        rumqttc::QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    next(&|p| matches!(p, rumqttc::Packet::SubAck(_))).await;
    let entity = format!("{base}/ngsi-ld/v1/entities/urn:ngsi-ld:Streetlight:lamp-1");
    let state = async || {
        call_in(&tenant, reqwest::Method::GET, &entity, None)
            .await
            .1
    };
    // Borough subscribes in the background: publish until the measurement arrives.
    let start_at = Instant::now();
    loop {
        c.publish(
            format!("{tenant}/devices/lamp-1/attrs"),
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"on": true}"#,
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        if state().await["powerState"]["value"] == json!(true) {
            break;
        }
        assert!(
            start_at.elapsed() < Duration::from_secs(15),
            "no measurement arrived through Mosquitto"
        );
    }

    // A command goes out through Mosquitto and comes back acknowledged.
    let cmds = format!("{base}/api/v1/devices/lamp-1/commands");
    let (_, r) = call_in(
        &tenant,
        reqwest::Method::POST,
        &cmds,
        Some(json!({"name": "dim", "value": 30})),
    )
    .await;
    let id = r["id"].as_str().expect("command id").to_string();
    let rumqttc::Packet::Publish(p) = next(&|p| matches!(p, rumqttc::Packet::Publish(_))).await
    else {
        unreachable!()
    };
    let msg: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(msg["id"].as_str(), Some(id.as_str()));
    c.publish(
        format!("{tenant}/devices/lamp-1/cmdack"),
        rumqttc::QoS::AtLeastOnce,
        false,
        json!({"id": id, "status": "ok"}).to_string(),
    )
    .await
    .unwrap();
    let status = async || -> String {
        let url = format!("{cmds}/{id}");
        let v = call_in(&tenant, reqwest::Method::GET, &url, None).await.1;
        v["status"].as_str().unwrap_or_default().to_string()
    };
    let start_at = Instant::now();
    while status().await != "acknowledged" {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            start_at.elapsed() < Duration::from_secs(15),
            "the acknowledgement did not arrive"
        );
    }
    driver.abort();
}

#[test]
fn a_taken_mqtt_port_stops_serve_with_one_line() {
    let (host, port) = mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_borough"))
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--log-level",
            "error",
            "--data",
        ])
        .arg(dir.path())
        .args(["--mqtt", &format!("{host}:{port}")])
        .output()
        .expect("run borough");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot listen for MQTT") && err.contains("--mqtt off"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_provisioning_from_csv_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &["--mqtt", "off"]);
    let base = server.base.clone();
    let import = format!("{base}/api/v1/devices/import");
    let csv = "id,entityType,attributes,commands\n\
               pk-1,ParkingSpot,status:status::text,\n\
               pk-2,ParkingSpot,status:status::text occ:occupancy::integer,reserve\n\
               bad/id,ParkingSpot,,\n";
    let r = reqwest::Client::new()
        .post(&import)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 207);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["created"].as_array().unwrap().len(), 2, "{b}");
    assert_eq!(b["errors"][0]["index"], json!(2));
    let token = b["created"][1]["token"].as_str().unwrap().to_string();
    let (s, _) = call(
        reqwest::Method::POST,
        &import,
        None,
        Some(json!([{"id": "pk-3", "entityType": "ParkingSpot"}])),
    )
    .await;
    assert_eq!(s, 201);
    assert_eq!(
        get(&format!("{base}/api/v1/devices"))
            .await
            .as_array()
            .unwrap()
            .len(),
        3
    );
    // A CSV-provisioned device ingests with its mapping.
    let (s, b) = call(
        reqwest::Method::POST,
        &format!("{base}/api/v1/devices/pk-2/measures"),
        Some(&token),
        Some(json!({"status": "free", "occ": 0})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let e = get(&format!(
        "{base}/ngsi-ld/v1/entities/urn:ngsi-ld:ParkingSpot:pk-2"
    ))
    .await;
    assert_eq!(e["status"]["value"], json!("free"));
    assert_eq!(e["occupancy"]["value"], json!(0));
}

/// A Mosquitto of the test's own, configured as the README's external
/// broker section says: no anonymous clients, a password file, and the ACL
/// that binds a device's username (`{tenant}/devices/{id}`) to its own topics.
struct AclBroker {
    _broker: Mosquitto,
    port: u16,
}

const DEVICE_ACL: &str = "\
# Each device's username is its topic base: {tenant}/devices/{id}
pattern write %u/attrs
pattern write %u/cmdack
pattern read %u/cmd

user borough
topic read +/devices/+/attrs
topic read +/devices/+/cmdack
topic write +/devices/+/cmd
";

fn acl_broker(users: &[(&str, &str)]) -> AclBroker {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let passwd = d.join("passwd");
    for (i, (user, password)) in users.iter().enumerate() {
        let mut cmd = Command::new("mosquitto_passwd");
        cmd.arg("-b");
        if i == 0 {
            cmd.arg("-c");
        }
        let out = cmd
            .arg(&passwd)
            .args([user, password])
            .output()
            .expect("mosquitto_passwd (Debian's mosquitto package) must be installed");
        assert!(out.status.success(), "mosquitto_passwd {user}");
    }
    std::fs::write(d.join("acl"), DEVICE_ACL).unwrap();
    let port = free_port();
    let conf = format!(
        "allow_anonymous false\npersistence false\nlistener {port} 127.0.0.1\npassword_file {}\nacl_file {}\n",
        passwd.display(),
        d.join("acl").display(),
    );
    AclBroker {
        _broker: Mosquitto::start(dir, &conf, port),
        port,
    }
}

type V5Packet = rumqttc::v5::mqttbytes::v5::Packet;

/// An MQTT 5 device client (MQTT 5, so that the broker's refusals show as
/// reason codes); returns it once connected, with its incoming packets.
async fn v5_device(
    port: u16,
    user: &str,
    password: &str,
) -> Result<
    (
        rumqttc::v5::AsyncClient,
        tokio::sync::mpsc::UnboundedReceiver<V5Packet>,
    ),
    String,
> {
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut opts = MqttOptions::new(format!("c-{}", user.replace('/', "-")), "127.0.0.1", port);
    opts.set_credentials(user, password);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(opts, 64);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
            Ok(Ok(Event::Incoming(V5Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no CONNACK".into()),
        }
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(p)) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    Ok((client, rx))
}

/// The next packet that `want` takes, within `within`.
async fn next_v5<T>(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<V5Packet>,
    within: Duration,
    want: impl Fn(&V5Packet) -> Option<T>,
) -> Option<T> {
    tokio::time::timeout(within, async {
        loop {
            let p = rx.recv().await?;
            if let Some(t) = want(&p) {
                return Some(t);
            }
        }
    })
    .await
    .ok()
    .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_broker_acls_keep_tenants_apart() {
    let broker = acl_broker(&[
        ("borough", "borough-secret"),
        ("a/devices/d1", "secret-a"),
        ("b/devices/d1", "secret-b"),
    ]);
    let port = broker.port;
    let dir = tempfile::tempdir().unwrap();
    // Borough's own client authenticates with the URL's credentials.
    let url = format!("--mqtt-broker=mqtt://borough:borough-secret@127.0.0.1:{port}");
    let server = start(dir.path(), &[&url]);
    let base = server.base.clone();
    // The same device id in two tenants.
    for tenant in ["a", "b"] {
        let (s, b) = call_in(
            tenant,
            reqwest::Method::POST,
            &format!("{base}/api/v1/devices"),
            Some(json!({"id": "d1", "entityType": "Meter",
                "attributes": [{"key": "v", "attribute": "level", "type": "integer"}],
                "commands": ["reset"]})),
        )
        .await;
        assert_eq!(s, 201, "{tenant}: {b}");
    }
    let entity = format!("{base}/ngsi-ld/v1/entities/urn:ngsi-ld:Meter:d1");
    let level = async |tenant: &str| -> Value {
        let e = call_in(tenant, reqwest::Method::GET, &entity, None).await.1;
        e["level"]["value"].clone()
    };
    let (a, mut a_rx) = v5_device(port, "a/devices/d1", "secret-a").await.unwrap();
    let (b, mut b_rx) = v5_device(port, "b/devices/d1", "secret-b").await.unwrap();
    let qos1 = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;

    // Each device's own reading lands in its own tenant's entity. Borough
    // subscribes in the background: publish until the reading arrives.
    for (dev, tenant, v) in [(&a, "a", 1), (&b, "b", 2)] {
        let start_at = Instant::now();
        while level(tenant).await != json!(v) {
            dev.publish(
                format!("{tenant}/devices/d1/attrs"),
                qos1,
                false,
                json!({ "v": v }).to_string(),
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(
                start_at.elapsed() < Duration::from_secs(15),
                "no reading of tenant {tenant} arrived through Mosquitto"
            );
        }
    }
    assert_eq!(level("a").await, json!(1));

    // Device b's credentials cannot write into tenant a's device of the same id:
    // the broker refuses the publish (once the earlier PUBACKs are read)...
    while next_v5(&mut b_rx, Duration::from_millis(300), |_| Some(()))
        .await
        .is_some()
    {}
    b.publish("a/devices/d1/attrs", qos1, false, r#"{"v": 666}"#)
        .await
        .unwrap();
    let reason = next_v5(&mut b_rx, Duration::from_secs(10), |p| match p {
        V5Packet::PubAck(ack) => Some(ack.reason),
        _ => None,
    })
    .await
    .expect("a PUBACK");
    assert_eq!(
        reason,
        rumqttc::v5::mqttbytes::v5::PubAckReason::NotAuthorized
    );
    // ...and b's next own reading, published after it, arrives while a's entity stays as it was.
    b.publish("b/devices/d1/attrs", qos1, false, r#"{"v": 3}"#)
        .await
        .unwrap();
    wait_for("b's reading", async || level("b").await == json!(3)).await;
    assert_eq!(level("a").await, json!(1));

    // Commands: a receives its own; b, subscribed to a's topic, receives nothing.
    for (dev, rx) in [(&a, &mut a_rx), (&b, &mut b_rx)] {
        dev.subscribe("a/devices/d1/cmd", qos1).await.unwrap();
        next_v5(rx, Duration::from_secs(10), |p| {
            matches!(p, V5Packet::SubAck(_)).then_some(())
        })
        .await
        .expect("a SUBACK");
    }
    let (_, r) = call_in(
        "a",
        reqwest::Method::POST,
        &format!("{base}/api/v1/devices/d1/commands"),
        Some(json!({"name": "reset", "value": 1})),
    )
    .await;
    let id = r["id"].as_str().expect("a command id").to_string();
    let got = next_v5(&mut a_rx, Duration::from_secs(10), |p| match p {
        V5Packet::Publish(p) => serde_json::from_slice::<Value>(&p.payload).ok(),
        _ => None,
    })
    .await
    .expect("device a receives its command");
    assert_eq!(got["id"].as_str(), Some(id.as_str()));
    let leaked = next_v5(&mut b_rx, Duration::from_millis(500), |p| {
        matches!(p, V5Packet::Publish(_)).then_some(())
    })
    .await;
    assert!(leaked.is_none(), "device b received tenant a's command");

    // The broker refuses a wrong password and anonymous clients.
    assert!(v5_device(port, "a/devices/d1", "secret-b").await.is_err());
    assert!(v5_device(port, "", "").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_has_a_bounded_number_of_open_commands() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &["--max-device-commands", "2"]);
    let base = server.base.clone();
    let token = register(&base, "valve-1", &["open"]).await;
    let cmds = format!("{base}/api/v1/devices/valve-1/commands");
    let send = async |body: Value| call(reqwest::Method::POST, &cmds, None, Some(body)).await;

    // No device is connected: commands stay queued, up to the bound.
    let (s, first) = send(json!({"name": "open", "value": 1, "idempotencyKey": "k1"})).await;
    assert_eq!(s, 201, "{first}");
    let (s, _) = send(json!({"name": "open", "value": 2})).await;
    assert_eq!(s, 201);
    let (s, refused) = send(json!({"name": "open", "value": 3})).await;
    assert_eq!(s, 429, "{refused}");
    assert_eq!(refused["status"], json!(429));
    let detail = refused["detail"].as_str().unwrap();
    assert!(
        detail.contains("valve-1") && detail.contains("2 commands waiting"),
        "{detail}"
    );
    // A retry with a known idempotency key still answers the existing command.
    let (s, again) = send(json!({"name": "open", "value": 1, "idempotencyKey": "k1"})).await;
    assert_eq!((s, &again["id"]), (200, &first["id"]));

    // An NGSI-LD PATCH of the command attribute is refused too, and changes nothing.
    let attr = format!("{}/attrs/open", entity_url(&base, "valve-1"));
    let patch = async |v: i64| {
        call(
            reqwest::Method::PATCH,
            &attr,
            None,
            Some(json!({"type": "Property", "value": v})),
        )
        .await
    };
    let (s, b) = patch(4).await;
    assert_eq!(s, 429, "{b}");
    assert!(
        b["detail"].as_str().unwrap().contains("commands waiting"),
        "{b}"
    );
    assert_eq!(
        get(&entity_url(&base, "valve-1")).await["open"]["value"],
        json!("")
    );
    // In a batch, only the operation that would queue a command is refused.
    let (s, b) = call(
        reqwest::Method::POST,
        &format!("{base}/ngsi-ld/v1/entityOperations/update"),
        None,
        Some(json!([
            {"id": "urn:ngsi-ld:WeatherObserved:valve-1", "type": "WeatherObserved",
             "open": {"type": "Property", "value": 5}},
            {"id": "urn:ngsi-ld:WeatherObserved:valve-1", "type": "WeatherObserved",
             "temperature": {"type": "Property", "value": 20}}
        ])),
    )
    .await;
    assert_eq!(s, 207, "{b}");
    assert_eq!(b["errors"][0]["error"]["status"], json!(429), "{b}");
    assert_eq!(b["success"].as_array().map(Vec::len), Some(1), "{b}");
    assert_eq!(
        get(&entity_url(&base, "valve-1")).await["temperature"]["value"],
        json!(20)
    );
    assert_eq!(get(&cmds).await.as_array().unwrap().len(), 2);

    // Sent commands are still open; an answered one makes room.
    let (s, picked) = call(
        reqwest::Method::GET,
        &format!("{cmds}/pending"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!((s, picked.as_array().unwrap().len()), (200, 2));
    assert_eq!(send(json!({"name": "open"})).await.0, 429);
    let id = first["id"].as_str().unwrap();
    let (s, _) = call(
        reqwest::Method::POST,
        &format!("{cmds}/{id}/ack"),
        Some(&token),
        Some(json!({"status": "ok"})),
    )
    .await;
    assert_eq!(s, 204);
    let (s, b) = patch(6).await;
    assert_eq!(s, 204, "{b}");
    let all = get(&cmds).await;
    assert_eq!(all.as_array().unwrap().len(), 3, "{all}");
    assert_eq!(all[2]["value"], json!(6));
    assert_eq!(all[2]["status"], json!("queued"));
    assert_eq!(patch(7).await.0, 429);
}
