//! Three `borough serve` processes over one PostgreSQL schema (the machine's
//! PostgreSQL, or `BOROUGH_TEST_PG`): a write on any node is read, queried
//! and notified on the others; a notification is sent once, not once per
//! node; a node killed with SIGKILL has its pending notifications sent by
//! another.

mod support;

use axum::http::StatusCode;
use reqwest::Method;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::receiver::{call, receiver};
use support::{Server, start};

fn pg_url() -> String {
    std::env::var("BOROUGH_TEST_PG")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into())
}

/// A schema of the test's own, dropped when it ends.
struct Schema(String);

impl Schema {
    fn new(test: &str) -> Self {
        let schema = Schema(format!("borough_test_{test}_{}", std::process::id()));
        schema.drop_it();
        schema
    }

    fn drop_it(&self) {
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0);
        let url = pg_url();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect to PostgreSQL");
            tokio::spawn(conn);
            client.batch_execute(&sql).await.expect("drop schema");
        });
    }

    /// A node over this schema.
    fn node(&self, dir: &tempfile::TempDir) -> Server {
        start(dir.path(), &["--store", &pg_url(), "--pg-schema", &self.0])
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        self.drop_it();
    }
}

/// Waits up to `secs` for `check`.
fn eventually(what: &str, secs: u64, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "not within {secs} s: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lamp(i: usize, power: &str) -> Value {
    json!({"id": format!("urn:ngsi-ld:Lamp:{i}"), "type": "Lamp",
           "power": {"type": "Property", "value": power},
           "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [2.35, 48.85]}}})
}

#[test]
fn three_nodes_serve_one_city() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let schema = Schema::new("three");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes: Vec<Server> = dirs.iter().map(|d| schema.node(d)).collect();
    let url = |n: usize, path: &str| format!("{}/ngsi-ld/v1{path}", nodes[n].base);

    // A subscription made on node 1 ...
    let (inbox_url, inbox) = receiver(&rt, StatusCode::OK, Duration::ZERO);
    let (s, b) = call(
        &rt,
        Method::POST,
        &url(1, "/subscriptions"),
        Some(
            json!({"id": "urn:ngsi-ld:Subscription:lamps", "type": "Subscription",
                    "entities": [{"type": "Lamp"}],
                    "notification": {"format": "keyValues", "endpoint": {"uri": inbox_url}}}),
        ),
    );
    assert_eq!(s, 201, "{b}");
    std::thread::sleep(Duration::from_millis(300));

    // ... a write on node 0, read on nodes 1 and 2, in a geo-query too.
    let written = Instant::now();
    let (s, b) = call(&rt, Method::POST, &url(0, "/entities"), Some(lamp(1, "on")));
    assert_eq!(s, 201, "{b}");
    for n in [1, 2] {
        eventually(
            &format!("node {n} serves the lamp written on node 0"),
            5,
            || {
                call(
                    &rt,
                    Method::GET,
                    &url(n, "/entities/urn:ngsi-ld:Lamp:1"),
                    None,
                )
                .0 == 200
            },
        );
    }
    let lag = written.elapsed();
    let (s, found) = call(
        &rt,
        Method::GET,
        &url(
            2,
            "/entities?type=Lamp&georel=near;maxDistance==100&geometry=Point&coordinates=%5B2.35,48.85%5D",
        ),
        None,
    );
    assert_eq!(
        (s, found.as_array().map(Vec::len)),
        (200, Some(1)),
        "{found}"
    );
    eprintln!("visible on the other nodes after {lag:?}");

    // A change on node 2 is what node 0 serves next, with its history.
    let (s, b) = call(
        &rt,
        Method::PATCH,
        &url(2, "/entities/urn:ngsi-ld:Lamp:1/attrs"),
        Some(json!({"power": {"type": "Property", "value": "off"}})),
    );
    assert_eq!(s, 204, "{b}");
    eventually("node 0 serves node 2's change", 5, || {
        call(
            &rt,
            Method::GET,
            &url(0, "/entities/urn:ngsi-ld:Lamp:1?options=keyValues"),
            None,
        )
        .1["power"]
            == "off"
    });
    let (_, history) = call(
        &rt,
        Method::GET,
        &url(
            1,
            "/temporal/entities/urn:ngsi-ld:Lamp:1?attrs=power&options=temporalValues",
        ),
        None,
    );
    assert_eq!(
        history["power"]["values"].as_array().map(Vec::len),
        Some(2),
        "{history}"
    );

    // Each change was notified once, by one node, though three serve it.
    inbox.wait_for("two notifications", Duration::from_secs(10), |got| {
        got.len() >= 2
    });
    std::thread::sleep(Duration::from_secs(2));
    let got = inbox.entities();
    let powers: Vec<&Value> = got.iter().map(|e| &e["power"]).collect();
    assert_eq!(powers, vec!["on", "off"], "once each, in order: {got:?}");
}

#[test]
fn a_killed_nodes_notifications_are_sent_by_another() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let schema = Schema::new("takeover");
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let survivor = schema.node(&dirs[0]);
    let mut doomed = schema.node(&dirs[1]);
    // The receiver is not there yet: the port is taken and released.
    let port = support::free_port();
    let endpoint = format!("http://127.0.0.1:{port}/notify");
    let (s, b) = call(
        &rt,
        Method::POST,
        &format!("{}/ngsi-ld/v1/subscriptions", survivor.base),
        Some(
            json!({"type": "Subscription", "entities": [{"type": "Lamp"}],
                    "notification": {"format": "keyValues", "endpoint": {"uri": endpoint}}}),
        ),
    );
    assert_eq!(s, 201, "{b}");
    std::thread::sleep(Duration::from_millis(300));
    // The doomed node commits a change (its notice is its own to send) and dies.
    let (s, b) = call(
        &rt,
        Method::POST,
        &format!("{}/ngsi-ld/v1/entities", doomed.base),
        Some(lamp(7, "on")),
    );
    assert_eq!(s, 201, "{b}");
    doomed.child.kill().expect("SIGKILL");
    doomed.child.wait().expect("reap");
    // The receiver comes up; the survivor takes the notice over and sends it.
    let (_, inbox) = support::receiver::receiver_at(&rt, port, StatusCode::OK, Duration::ZERO);
    let got = inbox.wait_for(
        "the killed node's notification",
        Duration::from_secs(40),
        |got| !got.is_empty(),
    );
    assert_eq!(got[0]["id"], "urn:ngsi-ld:Lamp:7");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(inbox.entities().len(), 1, "sent once");
}

/// With access control on: the operator key of the first node's first start
/// works on every node; a tenant and a key made on one node work on the
/// other at once; revoking it there refuses it here; and the audit log of
/// both nodes is one intact chain.
#[test]
fn keys_and_tenants_made_on_one_node_work_on_the_others() {
    let schema = Schema::new("access");
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let secured = |d: &tempfile::TempDir| {
        start(
            d.path(),
            &[
                "--auth",
                "on",
                "--store",
                &pg_url(),
                "--pg-schema",
                &schema.0,
            ],
        )
    };
    let first = secured(&dirs[0]);
    let op = first
        .operator_key
        .clone()
        .expect("the first start prints an operator key");
    let second = secured(&dirs[1]);
    assert!(second.operator_key.is_none(), "one operator key per city");
    let (a, b) = (
        support::Client::new(&first.base),
        support::Client::new(&second.base),
    );
    assert_eq!(b.get("/api/v1/tenants", &op, None).status, 200);

    let r = a.call(
        "POST",
        "/api/v1/tenants",
        Some(&op),
        None,
        Some(json!({"name": "city"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = a.call(
        "POST",
        "/api/v1/keys",
        Some(&op),
        Some("city"),
        Some(json!({"roles": ["editor"]})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let key = r.body["key"].as_str().expect("the new key").to_string();
    let key_id = r.body["id"].as_str().expect("its id").to_string();
    let mut answered = 0;
    eventually("node B accepts the key made on node A", 5, || {
        answered = b
            .post("/ngsi-ld/v1/entities", &key, Some("city"), lamp(3, "on"))
            .status;
        answered == 201
    });
    let r = b.call(
        "DELETE",
        &format!("/api/v1/keys/{key_id}"),
        Some(&op),
        Some("city"),
        None,
    );
    assert!(r.status < 300, "revoke: {} {}", r.status, r.body);
    eventually("node A refuses the key revoked on node B", 5, || {
        a.get(
            "/ngsi-ld/v1/entities/urn:ngsi-ld:Lamp:3",
            &key,
            Some("city"),
        )
        .status
            == 401
    });
    let verify = a.get("/api/v1/audit/verify", &op, None);
    assert_eq!(verify.status, 200, "{}", verify.body);
    assert_eq!(verify.body["intact"], true, "{}", verify.body);
    assert!(
        verify.body["entries"].as_u64().unwrap_or(0) >= 3,
        "both nodes' actions are logged: {}",
        verify.body
    );
}

/// A device registered on node A connects to node B's broker: its readings
/// reach node A, and a command sent through node A reaches it through node
/// B, whose acknowledgement node A then reports.
#[test]
fn a_device_on_one_node_is_commanded_through_another() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let schema = Schema::new("devices");
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let with_broker = |d: &tempfile::TempDir| {
        start(
            d.path(),
            &[
                "--mqtt",
                "127.0.0.1:0",
                "--store",
                &pg_url(),
                "--pg-schema",
                &schema.0,
            ],
        )
    };
    let (a, b) = (with_broker(&dirs[0]), with_broker(&dirs[1]));
    let (s, device) = call(
        &rt,
        Method::POST,
        &format!("{}/api/v1/devices", a.base),
        Some(json!({"id": "valve-9", "entityType": "Valve",
                    "attributes": [{"key": "p", "attribute": "pressure"}],
                    "commands": ["open"]})),
    );
    assert_eq!(s, 201, "{device}");
    let token = device["token"].as_str().expect("token").to_string();
    std::thread::sleep(Duration::from_millis(300));

    rt.block_on(async {
        let mut opts = rumqttc::MqttOptions::new("valve-9", "127.0.0.1", b.mqtt_port);
        opts.set_credentials("valve-9", &token);
        let (client, mut events) = rumqttc::AsyncClient::new(opts, 16);
        client
            .subscribe("default/devices/valve-9/cmd", rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        client
            .publish(
                "default/devices/valve-9/attrs",
                rumqttc::QoS::AtLeastOnce,
                false,
                json!({"p": 4.5}).to_string(),
            )
            .await
            .unwrap();
        // Drive the connection until the command arrives; meanwhile send it through node A.
        let entity = format!("{}/ngsi-ld/v1/entities/urn:ngsi-ld:Valve:valve-9", a.base);
        let commands = format!("{}/api/v1/devices/valve-9/commands", a.base);
        let http = reqwest::Client::new();
        let mut sent: Option<String> = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        let command = loop {
            assert!(
                Instant::now() < deadline,
                "the command never reached the device"
            );
            if sent.is_none() {
                let e: Value = http
                    .get(&entity)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap_or_default();
                if e["pressure"]["value"] == 4.5 {
                    let r: Value = http
                        .post(&commands)
                        .json(&json!({"name": "open", "value": {"percent": 30}}))
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    sent = r["id"].as_str().map(str::to_string);
                }
            }
            match tokio::time::timeout(Duration::from_millis(200), events.poll()).await {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))))
                    if p.topic == "default/devices/valve-9/cmd" =>
                {
                    break serde_json::from_slice::<Value>(&p.payload).unwrap();
                }
                Ok(Err(e)) => panic!("the device lost node B: {e}"),
                _ => {}
            }
        };
        let id = sent.expect("node A queued the command");
        assert_eq!(command["id"], id.as_str());
        assert_eq!(command["value"], json!({"percent": 30}));
        client
            .publish(
                "default/devices/valve-9/cmdack",
                rumqttc::QoS::AtLeastOnce,
                false,
                json!({"id": id, "status": "ok"}).to_string(),
            )
            .await
            .unwrap();
        let status_url = format!("{commands}/{id}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let _ = tokio::time::timeout(Duration::from_millis(100), events.poll()).await;
            let status: Value = http
                .get(&status_url)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap_or_default();
            if status["status"] == "acknowledged" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node A never saw the acknowledgement: {status}"
            );
        }
    });
}

/// A TCP relay to PostgreSQL that the test can cut and restore, as a
/// database restart or a network failure would.
struct Relay {
    port: u16,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    rt: tokio::runtime::Runtime,
}

impl Relay {
    fn start(port: u16) -> Relay {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut relay = Relay {
            port,
            stop: None,
            rt,
        };
        relay.restore();
        relay
    }

    /// Accepts connections again and relays them to 127.0.0.1:5432.
    fn restore(&mut self) {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let listener = self
            .rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", self.port)))
            .expect("the relay's port");
        self.rt.spawn(async move {
            loop {
                let mut stopped_accept = stopped.clone();
                let (mut client, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(c) => c, Err(_) => return },
                    _ = stopped_accept.changed() => return,
                };
                let mut stopped_conn = stopped.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect("127.0.0.1:5432").await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = stopped_conn.changed() => {}
                    }
                });
            }
        });
        self.stop = Some(stop);
    }

    /// Closes the port and every relayed connection.
    fn cut(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// PostgreSQL out of reach: writes get a 503 problem that says so, reads
/// go on from memory, and once it is back the node writes again by itself,
/// with everything acknowledged before still there.
#[test]
fn postgresql_out_of_reach_gives_503_and_the_node_recovers_alone() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let schema = Schema::new("outage");
    let port = support::free_port();
    let mut relay = Relay::start(port);
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2");
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path(), &["--store", &url, "--pg-schema", &schema.0]);
    let entities = format!("{}/ngsi-ld/v1/entities", node.base);
    let (s, b) = call(&rt, Method::POST, &entities, Some(lamp(1, "on")));
    assert_eq!(s, 201, "{b}");

    relay.cut();
    let (s, problem) = call(&rt, Method::POST, &entities, Some(lamp(2, "on")));
    assert_eq!(s, 503, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("PostgreSQL")),
        "{problem}"
    );
    let (s, _) = call(
        &rt,
        Method::GET,
        &format!("{entities}/urn:ngsi-ld:Lamp:1"),
        None,
    );
    assert_eq!(s, 200, "reads are served from memory meanwhile");
    let (s, health) = call(&rt, Method::GET, &format!("{}/health", node.base), None);
    assert_eq!(s, 503, "{health}");

    relay.restore();
    eventually("the node writes again once PostgreSQL is back", 15, || {
        call(&rt, Method::POST, &entities, Some(lamp(3, "on"))).0 == 201
    });
    for i in [1, 3] {
        let (s, _) = call(
            &rt,
            Method::GET,
            &format!("{entities}/urn:ngsi-ld:Lamp:{i}"),
            None,
        );
        assert_eq!(s, 200, "lamp {i}");
    }
    let (s, _) = call(
        &rt,
        Method::GET,
        &format!("{entities}/urn:ngsi-ld:Lamp:2"),
        None,
    );
    assert_eq!(s, 404, "the refused write changed nothing");
    // And a restart reads it all back from PostgreSQL.
    drop(node);
    let node = start(dir.path(), &["--store", &url, "--pg-schema", &schema.0]);
    let (s, _) = call(
        &rt,
        Method::GET,
        &format!("{}/ngsi-ld/v1/entities/urn:ngsi-ld:Lamp:3", node.base),
        None,
    );
    assert_eq!(s, 200);
}

/// Two nodes take writes; one is killed with SIGKILL in the middle: every
/// write either node acknowledged is served by the survivor.
#[test]
fn a_node_killed_under_load_loses_no_acknowledged_write() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let schema = Schema::new("kill");
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let survivor = schema.node(&dirs[0]);
    let mut doomed = schema.node(&dirs[1]);
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let writer = |base: String, tag: &'static str| {
        let acked = acked.clone();
        rt.spawn(async move {
            let client = reqwest::Client::new();
            for seq in 0..10_000 {
                let ids: Vec<String> = (0..10).map(|k| format!("urn:ngsi-ld:Lamp:{tag}-{seq}-{k}")).collect();
                let batch: Vec<Value> = ids
                    .iter()
                    .map(|id| json!({"id": id, "type": "Lamp", "power": {"type": "Property", "value": "on"}}))
                    .collect();
                let sent = client
                    .post(format!("{base}/ngsi-ld/v1/entityOperations/upsert"))
                    .json(&batch)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => acked.lock().unwrap().extend(ids),
                    // Killed mid-request: not acknowledged.
                    _ => return,
                }
            }
        })
    };
    let on_survivor = writer(survivor.base.clone(), "a");
    let on_doomed = writer(doomed.base.clone(), "b");
    std::thread::sleep(Duration::from_millis(800));
    doomed.child.kill().expect("SIGKILL");
    doomed.child.wait().expect("reap");
    rt.block_on(on_doomed).expect("the doomed node's writer");
    on_survivor.abort();
    let _ = rt.block_on(on_survivor);
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.iter().filter(|id| id.contains(":b-")).count() > 20,
        "the killed node acknowledged writes before it died"
    );
    let client = support::Client::new(&survivor.base);
    eventually("the survivor holds every acknowledged write", 10, || {
        let r = client.call(
            "GET",
            "/ngsi-ld/v1/entities?type=Lamp&count=true&limit=1",
            None,
            None,
            None,
        );
        r.headers
            .get("NGSILD-Results-Count")
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .is_some_and(|n| n >= acked.len())
    });
    for id in &acked {
        let r = client.call(
            "GET",
            &format!("/ngsi-ld/v1/entities/{id}"),
            None,
            None,
            None,
        );
        assert_eq!(r.status, 200, "acknowledged {id} is lost");
    }
}
