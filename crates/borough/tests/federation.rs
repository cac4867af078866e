//! Federation end to end: real `borough serve` processes registered as each
//! other's context sources (clauses 4.3.6, 5.9), and sources that fail the
//! way remote systems do: no answer, an error, an answer that is not NGSI-LD.

mod support;

use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};
use support::{Answer, Client, Server, start, start_public_only};

const NGSI: &str = "/ngsi-ld/v1";

fn client(s: &Server) -> Client {
    Client::new(&s.base)
}

fn call(c: &Client, method: &str, path: &str, body: Option<Value>) -> Answer {
    c.call(method, &format!("{NGSI}{path}"), None, None, body)
}

fn create(c: &Client, entity: Value) {
    let r = call(c, "POST", "/entities", Some(entity));
    assert_eq!(r.status, 201, "{:?}", r.body);
}

/// Registers `endpoint` on `c`; answers the registration's id.
fn register(c: &Client, body: Value) -> String {
    let r = call(c, "POST", "/csourceRegistrations", Some(body));
    assert_eq!(r.status, 201, "registration refused: {:?}", r.body);
    let location = r.headers["location"].to_str().unwrap().to_string();
    location.rsplit('/').next().unwrap().to_string()
}

fn inclusive(type_name: &str, endpoint: &str) -> Value {
    json!({
        "type": "ContextSourceRegistration",
        "information": [{"entities": [{"type": type_name}]}],
        "endpoint": endpoint,
    })
}

fn warnings(a: &Answer) -> Vec<String> {
    a.headers
        .get_all("ngsild-warning")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

fn ids(a: &Answer) -> Vec<String> {
    a.body
        .as_array()
        .unwrap_or_else(|| panic!("a list: {:?}", a.body))
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn an_inclusive_source_adds_its_entities_and_attributes() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (start(da.path(), &[]), start(db.path(), &[]));
    let (ca, cb) = (client(&a), client(&b));
    create(
        &ca,
        json!({"id": "urn:ngsi-ld:Vehicle:1", "type": "Vehicle", "speed": {"type": "Property", "value": 10}}),
    );
    create(
        &cb,
        json!({"id": "urn:ngsi-ld:Vehicle:1", "type": "Vehicle", "fuel": {"type": "Property", "value": 55}}),
    );
    create(
        &cb,
        json!({"id": "urn:ngsi-ld:Vehicle:2", "type": "Vehicle", "fuel": {"type": "Property", "value": 12}}),
    );
    create(
        &cb,
        json!({"id": "urn:ngsi-ld:Building:1", "type": "Building", "height": {"type": "Property", "value": 30}}),
    );
    let reg = register(&ca, inclusive("Vehicle", &b.base));

    // One entity, its attributes from both brokers.
    let v1 = call(&ca, "GET", "/entities/urn:ngsi-ld:Vehicle:1", None);
    assert_eq!(v1.status, 200, "{:?}", v1.body);
    assert_eq!(v1.body["speed"]["value"], 10);
    assert_eq!(v1.body["fuel"]["value"], 55);
    assert!(warnings(&v1).is_empty());
    // An entity held only by the source is found through the broker.
    let v2 = call(&ca, "GET", "/entities/urn:ngsi-ld:Vehicle:2", None);
    assert_eq!(v2.status, 200, "{:?}", v2.body);
    assert_eq!(v2.body["fuel"]["value"], 12);
    // attrs narrows what comes back from both.
    let fuel = call(
        &ca,
        "GET",
        "/entities/urn:ngsi-ld:Vehicle:1?attrs=fuel",
        None,
    );
    assert_eq!(fuel.body["fuel"]["value"], 55);
    assert!(fuel.body.get("speed").is_none(), "{:?}", fuel.body);

    // A query merges both brokers' entities, paged and counted over the merged set.
    let q = call(&ca, "GET", "/entities?type=Vehicle&count=true", None);
    assert_eq!(q.status, 200);
    assert_eq!(ids(&q), ["urn:ngsi-ld:Vehicle:1", "urn:ngsi-ld:Vehicle:2"]);
    assert_eq!(q.headers["ngsild-results-count"], "2");
    assert_eq!(q.body[0]["fuel"]["value"], 55);
    assert_eq!(q.body[0]["speed"]["value"], 10);
    let second = call(&ca, "GET", "/entities?type=Vehicle&limit=1&offset=1", None);
    assert_eq!(ids(&second), ["urn:ngsi-ld:Vehicle:2"]);
    let filtered = call(&ca, "GET", "/entities?type=Vehicle&q=fuel<20", None);
    assert_eq!(ids(&filtered), ["urn:ngsi-ld:Vehicle:2"]);
    // The registration covers vehicles only: the source's buildings stay there.
    let buildings = call(&ca, "GET", "/entities?type=Building", None);
    assert_eq!(buildings.body, json!([]));

    // local=true answers from this broker alone.
    let local = call(
        &ca,
        "GET",
        "/entities/urn:ngsi-ld:Vehicle:1?local=true",
        None,
    );
    assert!(local.body.get("fuel").is_none(), "{:?}", local.body);
    let local_q = call(&ca, "GET", "/entities?type=Vehicle&local=true", None);
    assert_eq!(ids(&local_q), ["urn:ngsi-ld:Vehicle:1"]);
    // Sources answer the first 1,000 entities: a page beyond them is local, and says so.
    let deep = call(
        &ca,
        "GET",
        "/entities?type=Vehicle&offset=1000&limit=1",
        None,
    );
    assert_eq!(deep.status, 200);
    assert!(
        warnings(&deep).iter().any(|w| w.starts_with("199 ")),
        "{:?}",
        deep.headers
    );

    // The registration counts what was sent to its source.
    let r = call(&ca, "GET", &format!("/csourceRegistrations/{reg}"), None);
    assert_eq!(r.body["status"], "ok");
    assert!(r.body["timesSent"].as_u64().unwrap() >= 5, "{:?}", r.body);
    assert_eq!(r.body["timesFailed"], 0);
}

#[test]
fn exclusive_attributes_are_read_and_changed_at_their_source_only() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (start(da.path(), &[]), start(db.path(), &[]));
    let (ca, cb) = (client(&a), client(&b));
    let light = "urn:ngsi-ld:Streetlight:7";
    create(
        &ca,
        json!({"id": light, "type": "Streetlight", "power": {"type": "Property", "value": 40}}),
    );
    create(
        &cb,
        json!({"id": light, "type": "Streetlight", "switch": {"type": "Property", "value": "off"}, "power": {"type": "Property", "value": 999}}),
    );
    register(
        &ca,
        json!({
            "type": "ContextSourceRegistration",
            "information": [{"entities": [{"id": light, "type": "Streetlight"}], "propertyNames": ["switch"]}],
            "endpoint": b.base,
            "mode": "exclusive",
            "operations": ["updateOps", "retrieveOps"],
        }),
    );
    // A second exclusive claim on the same attribute is a conflict.
    let twice = call(
        &ca,
        "POST",
        "/csourceRegistrations",
        Some(json!({
            "type": "ContextSourceRegistration",
            "information": [{"entities": [{"id": light, "type": "Streetlight"}], "propertyNames": ["switch"]}],
            "endpoint": "http://127.0.0.1:9",
            "mode": "exclusive",
        })),
    );
    assert_eq!(twice.status, 409, "{:?}", twice.body);
    // So is one of an attribute this broker holds itself.
    let held = call(
        &ca,
        "POST",
        "/csourceRegistrations",
        Some(json!({
            "type": "ContextSourceRegistration",
            "information": [{"entities": [{"id": light, "type": "Streetlight"}], "propertyNames": ["power"]}],
            "endpoint": b.base,
            "mode": "exclusive",
        })),
    );
    assert_eq!(held.status, 409, "{:?}", held.body);
    assert!(
        held.body["detail"].as_str().unwrap().contains("power"),
        "{:?}",
        held.body
    );

    // Reads take the registered attribute from the source, the rest from here.
    let got = call(&ca, "GET", &format!("/entities/{light}"), None);
    assert_eq!(got.body["switch"]["value"], "off");
    assert_eq!(
        got.body["power"]["value"], 40,
        "only switch is the source's"
    );

    // A change of the registered attribute goes to the source, not here.
    let patch = call(
        &ca,
        "PATCH",
        &format!("/entities/{light}/attrs/switch"),
        Some(json!({"type": "Property", "value": "on"})),
    );
    assert_eq!(patch.status, 204, "{:?}", patch.body);
    let at_source = call(&cb, "GET", &format!("/entities/{light}"), None);
    assert_eq!(at_source.body["switch"]["value"], "on");
    let here = call(&ca, "GET", &format!("/entities/{light}?local=true"), None);
    assert!(here.body.get("switch").is_none(), "{:?}", here.body);

    // A fragment is split: switch to the source, power here.
    let both = call(
        &ca,
        "PATCH",
        &format!("/entities/{light}/attrs"),
        Some(
            json!({"switch": {"type": "Property", "value": "off"}, "power": {"type": "Property", "value": 60}}),
        ),
    );
    assert_eq!(both.status, 204, "{:?}", both.body);
    let at_source = call(&cb, "GET", &format!("/entities/{light}"), None);
    assert_eq!(at_source.body["switch"]["value"], "off");
    assert_eq!(
        at_source.body["power"]["value"], 999,
        "power is not the source's"
    );
    let here = call(&ca, "GET", &format!("/entities/{light}?local=true"), None);
    assert_eq!(here.body["power"]["value"], 60);

    // With the source gone, a change only it could make fails as a gateway
    // error, a split one reports the part that failed, and reads still answer.
    drop(b);
    let gone = call(
        &ca,
        "PATCH",
        &format!("/entities/{light}/attrs/switch"),
        Some(json!({"type": "Property", "value": "on"})),
    );
    assert!(
        matches!(gone.status, 502 | 504),
        "{} {:?}",
        gone.status,
        gone.body
    );
    assert!(
        gone.body["detail"]
            .as_str()
            .unwrap()
            .contains("context source")
    );
    let split = call(
        &ca,
        "PATCH",
        &format!("/entities/{light}/attrs"),
        Some(
            json!({"switch": {"type": "Property", "value": "on"}, "power": {"type": "Property", "value": 70}}),
        ),
    );
    assert_eq!(split.status, 207, "{:?}", split.body);
    assert_eq!(split.body["updated"], json!(["power"]));
    assert_eq!(split.body["notUpdated"][0]["attributeName"], "switch");
    assert!(split.body["notUpdated"][0]["registrationId"].is_string());
    let read = call(&ca, "GET", &format!("/entities/{light}"), None);
    assert_eq!(read.status, 200);
    assert_eq!(read.body["power"]["value"], 70);
    assert_eq!(warnings(&read).len(), 1, "{:?}", read.headers);
}

#[test]
fn three_brokers_answer_through_a_chain_and_a_cycle_ends() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let servers: Vec<_> = dirs.iter().map(|d| start(d.path(), &[])).collect();
    let c: Vec<_> = servers.iter().map(client).collect();
    create(
        &c[2],
        json!({"id": "urn:ngsi-ld:Bus:9", "type": "Bus", "line": {"type": "Property", "value": "42"}}),
    );
    create(
        &c[1],
        json!({"id": "urn:ngsi-ld:Bus:8", "type": "Bus", "line": {"type": "Property", "value": "7"}}),
    );
    // A → B → C, and C → A closes a cycle.
    register(&c[0], inclusive("Bus", &servers[1].base));
    register(&c[1], inclusive("Bus", &servers[2].base));
    register(&c[2], inclusive("Bus", &servers[0].base));
    let started = Instant::now();
    let q = call(&c[0], "GET", "/entities?type=Bus", None);
    assert_eq!(q.status, 200, "{:?}", q.body);
    assert_eq!(ids(&q), ["urn:ngsi-ld:Bus:8", "urn:ngsi-ld:Bus:9"]);
    let one = call(&c[0], "GET", "/entities/urn:ngsi-ld:Bus:9", None);
    assert_eq!(one.body["line"]["value"], "42");
    // The cycle is cut by Via, not by a timeout.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_request_that_already_passed_here_is_not_forwarded_again() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (start(da.path(), &[]), start(db.path(), &[]));
    let (ca, cb) = (client(&a), client(&b));
    let alias = call(&ca, "GET", "/info/sourceIdentity", None).body["contextSourceAlias"]
        .as_str()
        .unwrap()
        .to_string();
    create(
        &cb,
        json!({"id": "urn:ngsi-ld:Pump:1", "type": "Pump", "on": {"type": "Property", "value": false}}),
    );
    register(
        &ca,
        json!({
            "type": "ContextSourceRegistration",
            "information": [{"entities": [{"id": "urn:ngsi-ld:Pump:1", "type": "Pump"}], "propertyNames": ["on"]}],
            "endpoint": b.base,
            "mode": "exclusive",
            "operations": ["updateOps", "retrieveOps"],
        }),
    );
    let via = format!("1.1 other-broker, 1.1 {alias}");
    let patch = ca
        .http
        .patch(format!(
            "{}{NGSI}/entities/urn:ngsi-ld:Pump:1/attrs/on",
            a.base
        ))
        .header("Content-Type", "application/json")
        .header("Via", &via)
        .body(json!({"type": "Property", "value": true}).to_string())
        .send()
        .unwrap();
    assert_eq!(patch.status().as_u16(), 508);
    let read = ca
        .http
        .get(format!("{}{NGSI}/entities?type=Pump", a.base))
        .header("Via", &via)
        .send()
        .unwrap();
    assert_eq!(read.status().as_u16(), 200);
    assert_eq!(read.text().unwrap(), "[]", "answered here only");
    // The source's value is unchanged; without the loop it changes.
    assert_eq!(
        call(&cb, "GET", "/entities/urn:ngsi-ld:Pump:1", None).body["on"]["value"],
        false
    );
    let ok = call(
        &ca,
        "PATCH",
        "/entities/urn:ngsi-ld:Pump:1/attrs/on",
        Some(json!({"type": "Property", "value": true})),
    );
    assert_eq!(ok.status, 204, "{:?}", ok.body);
    assert_eq!(
        call(&cb, "GET", "/entities/urn:ngsi-ld:Pump:1", None).body["on"]["value"],
        true
    );
}

/// A source that misbehaves: `reply` is what it writes to each connection
/// (`None`: it accepts and never answers). It stops with the test process.
fn bad_source(reply: Option<&'static str>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            match reply {
                None => held.push(conn),
                Some(text) => {
                    let mut buf = [0u8; 4096];
                    let _ = conn.read(&mut buf);
                    let _ = conn.write_all(
                        format!(
                            "{text}\r\nContent-Type: application/json\r\nContent-Length: 11\r\nConnection: close\r\n\r\nnot-ngsi-ld"
                        )
                        .as_bytes(),
                    );
                }
            }
        }
    });
    format!("http://{addr}")
}

#[test]
fn failing_sources_give_a_partial_answer_in_time_and_cool_down() {
    let da = tempfile::tempdir().unwrap();
    let a = start(da.path(), &[]);
    let ca = client(&a);
    create(
        &ca,
        json!({"id": "urn:ngsi-ld:Sensor:1", "type": "Sensor", "t": {"type": "Property", "value": 21}}),
    );
    let hanging = bad_source(None);
    let failing = bad_source(Some("HTTP/1.1 500 Internal Server Error"));
    let garbage = bad_source(Some("HTTP/1.1 200 OK"));
    for (name, endpoint) in [
        ("hanging", &hanging),
        ("failing", &failing),
        ("garbage", &garbage),
    ] {
        register(
            &ca,
            json!({
                "id": format!("urn:ngsi-ld:ContextSourceRegistration:{name}"),
                "type": "ContextSourceRegistration",
                "information": [{"entities": [{"type": "Sensor"}]}],
                "endpoint": endpoint,
                "management": {"timeout": 400, "cooldown": 60000},
            }),
        );
    }
    let started = Instant::now();
    let q = call(&ca, "GET", "/entities?type=Sensor", None);
    let took = started.elapsed();
    assert_eq!(q.status, 200);
    assert_eq!(ids(&q), ["urn:ngsi-ld:Sensor:1"], "the local answer stands");
    assert!(
        took < Duration::from_millis(2000),
        "a hanging source held the answer {took:?}"
    );
    let mut w = warnings(&q);
    w.sort();
    assert_eq!(w.len(), 3, "{w:?}");
    assert!(
        w[0].starts_with("111 urn:ngsi-ld:ContextSourceRegistration:garbage"),
        "{w:?}"
    );
    assert!(
        w[1].starts_with("199 urn:ngsi-ld:ContextSourceRegistration:hanging"),
        "{w:?}"
    );
    assert!(
        w[2].starts_with("299 urn:ngsi-ld:ContextSourceRegistration:failing"),
        "{w:?}"
    );

    // Cooling down: the sources are not asked again, and the answer is immediate.
    let started = Instant::now();
    let again = call(&ca, "GET", "/entities/urn:ngsi-ld:Sensor:1", None);
    assert!(started.elapsed() < Duration::from_millis(300));
    assert_eq!(again.body["t"]["value"], 21);
    assert!(
        warnings(&again).iter().all(|w| w.contains("cooling down")),
        "{:?}",
        warnings(&again)
    );
    let reg = call(
        &ca,
        "GET",
        "/csourceRegistrations/urn:ngsi-ld:ContextSourceRegistration:hanging",
        None,
    );
    assert_eq!(reg.body["status"], "failed");
    assert_eq!(reg.body["timesSent"], 1, "not asked while cooling down");
    assert_eq!(reg.body["timesFailed"], 1);
    assert!(reg.body["lastFailure"].is_string());
}

#[test]
fn registrations_survive_a_crash_and_sources_must_be_allowed() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let b = start(db.path(), &[]);
    create(
        &client(&b),
        json!({"id": "urn:ngsi-ld:Meter:1", "type": "Meter", "kwh": {"type": "Property", "value": 5}}),
    );
    let mut a = start(da.path(), &[]);
    let id = register(&client(&a), inclusive("Meter", &b.base));
    // Acknowledged, then killed without a chance to flush.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let a = start(da.path(), &[]);
    let ca = client(&a);
    let r = call(&ca, "GET", &format!("/csourceRegistrations/{id}"), None);
    assert_eq!(r.status, 200, "{:?}", r.body);
    let m = call(&ca, "GET", "/entities/urn:ngsi-ld:Meter:1", None);
    assert_eq!(m.body["kwh"]["value"], 5);

    // A broker that may reach public addresses only refuses a loopback source.
    let dc = tempfile::tempdir().unwrap();
    let public = start_public_only(dc.path(), &[]);
    let refused = call(
        &client(&public),
        "POST",
        "/csourceRegistrations",
        Some(inclusive("Meter", &b.base)),
    );
    assert_eq!(refused.status, 400, "{:?}", refused.body);
    assert!(
        refused.body["detail"]
            .as_str()
            .unwrap()
            .contains("allow-outbound"),
        "{:?}",
        refused.body
    );

    // With a list of source hosts, only those can be registered.
    let dd = tempfile::tempdir().unwrap();
    let listed = start(
        dd.path(),
        &["--source-hosts", "broker.transport.example,127.0.0.2:1026"],
    );
    let cl = client(&listed);
    let refused = call(
        &cl,
        "POST",
        "/csourceRegistrations",
        Some(inclusive("Meter", &b.base)),
    );
    assert_eq!(refused.status, 400, "{:?}", refused.body);
    assert!(
        refused.body["detail"]
            .as_str()
            .unwrap()
            .contains("--source-hosts"),
        "{:?}",
        refused.body
    );
    register(&cl, inclusive("Meter", "http://broker.transport.example"));
    register(&cl, inclusive("Meter", "http://127.0.0.2:1026/"));
}

#[test]
fn a_secured_source_is_reached_with_the_credential_its_registration_carries() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(da.path(), &[]);
    let b = start(db.path(), &["--auth", "on"]);
    let key = b
        .operator_key
        .clone()
        .expect("the secured source's operator key");
    let cb = client(&b);
    let made = cb.post(
        &format!("{NGSI}/entities"),
        &key,
        None,
        json!({"id": "urn:ngsi-ld:Valve:1", "type": "Valve", "open": {"type": "Property", "value": true}}),
    );
    assert_eq!(made.status, 201, "{:?}", made.body);
    let ca = client(&a);
    // Without the credential the source refuses, and the answer says so.
    register(&ca, inclusive("Valve", &b.base));
    let refused = call(&ca, "GET", "/entities?type=Valve", None);
    assert_eq!(refused.body, json!([]));
    let w = warnings(&refused);
    assert!(w.len() == 1 && w[0].starts_with("299 "), "{w:?}");
    // A refusal is about the request, not the source: no cooldown.
    let again = call(&ca, "GET", "/entities?type=Valve", None);
    let w = warnings(&again);
    assert!(w.len() == 1 && !w[0].contains("cooling"), "{w:?}");
    let reg = call(&ca, "GET", "/csourceRegistrations?type=Valve", None);
    assert_eq!(reg.body[0]["timesSent"], 2, "asked again: {:?}", reg.body);
    // A registration cannot have the broker hand it its clients' credentials.
    let mut copying = inclusive("Valve", &b.base);
    copying["contextSourceInfo"] =
        json!([{"key": "Authorization", "value": "urn:ngsi-ld:request"}]);
    let copying_id = register(&ca, copying);
    let with_my_key = ca
        .http
        .get(format!("{}{NGSI}/entities?type=Valve", a.base))
        .bearer_auth(&key)
        .send()
        .unwrap();
    let refusals = with_my_key
        .headers()
        .get_all("ngsild-warning")
        .iter()
        .count();
    assert_eq!(refusals, 2, "both registrations asked, both refused");
    assert_eq!(
        with_my_key.text().unwrap(),
        "[]",
        "the client's key reached the source"
    );
    let r = call(
        &ca,
        "DELETE",
        &format!("/csourceRegistrations/{copying_id}"),
        None,
    );
    assert_eq!(r.status, 204);
    // With it, in contextSourceInfo, the source answers.
    let mut with_key = inclusive("Valve", &b.base);
    with_key["contextSourceInfo"] =
        json!([{"key": "Authorization", "value": format!("Bearer {key}")}]);
    with_key["id"] = json!("urn:ngsi-ld:ContextSourceRegistration:keyed");
    register(&ca, with_key);
    let found = call(&ca, "GET", "/entities?type=Valve", None);
    assert_eq!(ids(&found), ["urn:ngsi-ld:Valve:1"], "{:?}", found.body);
    assert_eq!(found.body[0]["open"]["value"], true);
}

#[test]
fn history_held_elsewhere_is_merged_into_temporal_answers() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (start(da.path(), &[]), start(db.path(), &[]));
    let (ca, cb) = (client(&a), client(&b));
    let id = "urn:ngsi-ld:AirQuality:1";
    let at = |h: u32| format!("2026-01-01T{h:02}:00:00Z");
    let reading = |v: i64, h: u32| json!({"type": "Property", "value": v, "observedAt": at(h)});
    // The source kept the night's readings, this broker the morning's.
    let r = call(
        &cb,
        "POST",
        "/temporal/entities",
        Some(json!({"id": id, "type": "AirQuality", "no2": [reading(10, 1), reading(12, 2)]})),
    );
    assert!(matches!(r.status, 201 | 204), "{:?}", r.body);
    let r = call(
        &ca,
        "POST",
        "/temporal/entities",
        Some(json!({"id": id, "type": "AirQuality", "no2": [reading(30, 8)]})),
    );
    assert!(matches!(r.status, 201 | 204), "{:?}", r.body);
    // Temporal registrations name their interval and the temporal operations.
    register(
        &ca,
        json!({
            "type": "ContextSourceRegistration",
            "information": [{"entities": [{"type": "AirQuality"}]}],
            "endpoint": b.base,
            "observationInterval": {"startAt": "2025-01-01T00:00:00Z"},
            "operations": ["retrieveTemporal", "queryTemporal"],
        }),
    );
    let values = |a: &Answer| -> Vec<i64> {
        a.body["no2"]
            .as_array()
            .unwrap_or_else(|| panic!("{:?}", a.body))
            .iter()
            .map(|i| i["value"].as_i64().unwrap())
            .collect()
    };
    let one = call(&ca, "GET", &format!("/temporal/entities/{id}"), None);
    assert_eq!(one.status, 200, "{:?}", one.body);
    assert_eq!(values(&one), [10, 12, 30], "in time order");
    let q = call(&ca, "GET", "/temporal/entities?type=AirQuality", None);
    assert_eq!(q.status, 200, "{:?}", q.body);
    assert_eq!(q.body.as_array().unwrap().len(), 1);
    assert_eq!(q.body[0]["no2"].as_array().unwrap().len(), 3);
    let posted = call(
        &ca,
        "POST",
        "/temporal/entityOperations/query",
        Some(json!({"type": "Query", "entities": [{"type": "AirQuality"}]})),
    );
    assert_eq!(posted.status, 200, "{:?}", posted.body);
    assert_eq!(posted.body[0]["no2"].as_array().unwrap().len(), 3);
    // A registration for temporal operations is not asked for the latest state.
    create(
        &cb,
        json!({"id": id, "type": "AirQuality", "pm10": {"type": "Property", "value": 7}}),
    );
    let latest = call(&ca, "GET", &format!("/entities/{id}"), None);
    assert_eq!(latest.status, 404, "{:?}", latest.body);
    let local = call(
        &ca,
        "GET",
        &format!("/temporal/entities/{id}?local=true"),
        None,
    );
    assert_eq!(values(&local), [30]);
}

#[test]
fn auxiliary_sources_only_fill_gaps_and_redirect_sources_take_every_change() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let s: Vec<_> = dirs.iter().map(|d| start(d.path(), &[])).collect();
    let c: Vec<_> = s.iter().map(client).collect();
    let v = "urn:ngsi-ld:Vehicle:5";
    create(
        &c[0],
        json!({"id": v, "type": "Vehicle", "speed": {"type": "Property", "value": 10}}),
    );
    create(
        &c[1],
        json!({"id": v, "type": "Vehicle", "speed": {"type": "Property", "value": 99}, "colour": {"type": "Property", "value": "red"}, "year": {"type": "Property", "value": 2019}}),
    );
    create(
        &c[2],
        json!({"id": v, "type": "Vehicle", "colour": {"type": "Property", "value": "blue"}}),
    );
    let mut aux = inclusive("Vehicle", &s[1].base);
    aux["mode"] = json!("auxiliary");
    aux["operations"] = json!(["retrieveOps"]);
    register(&c[0], aux);
    let mut inc = inclusive("Vehicle", &s[2].base);
    inc["operations"] = json!(["retrieveOps", "updateOps"]);
    register(&c[0], inc);
    let got = call(&c[0], "GET", &format!("/entities/{v}"), None);
    assert_eq!(
        got.body["speed"]["value"], 10,
        "local data wins over auxiliary"
    );
    assert_eq!(
        got.body["colour"]["value"], "blue",
        "inclusive data wins over auxiliary"
    );
    assert_eq!(
        got.body["year"]["value"], 2019,
        "auxiliary fills what no one else has"
    );
    // Changes never go to an auxiliary source; inclusive ones get them too.
    let patch = call(
        &c[0],
        "PATCH",
        &format!("/entities/{v}/attrs"),
        Some(json!({"colour": {"type": "Property", "value": "green"}})),
    );
    assert!(
        matches!(patch.status, 204 | 207),
        "{} {:?}",
        patch.status,
        patch.body
    );
    assert_eq!(
        call(&c[1], "GET", &format!("/entities/{v}"), None).body["colour"]["value"],
        "red"
    );
    assert_eq!(
        call(&c[2], "GET", &format!("/entities/{v}"), None).body["colour"]["value"],
        "green"
    );

    // Two redirect sources of parcels: this broker holds none of them, and
    // a change goes to both.
    let p = "urn:ngsi-ld:Parcel:1";
    for k in [1, 2] {
        create(
            &c[k],
            json!({"id": p, "type": "Parcel", "status": {"type": "Property", "value": "sorting"}}),
        );
        let mut redirect = inclusive("Parcel", &s[k].base);
        redirect["mode"] = json!("redirect");
        redirect["operations"] = json!(["redirectionOps"]);
        register(&c[0], redirect);
    }
    let patch = call(
        &c[0],
        "PATCH",
        &format!("/entities/{p}/attrs/status"),
        Some(json!({"type": "Property", "value": "delivered"})),
    );
    assert_eq!(patch.status, 204, "{:?}", patch.body);
    for k in [1, 2] {
        assert_eq!(
            call(&c[k], "GET", &format!("/entities/{p}"), None).body["status"]["value"],
            "delivered"
        );
    }
    assert_eq!(
        call(&c[0], "GET", &format!("/entities/{p}?local=true"), None).status,
        404
    );
    assert_eq!(
        call(&c[0], "GET", &format!("/entities/{p}"), None).body["status"]["value"],
        "delivered"
    );
    let del = call(&c[0], "DELETE", &format!("/entities/{p}"), None);
    assert_eq!(del.status, 204, "{:?}", del.body);
    for k in [1, 2] {
        assert_eq!(
            call(&c[k], "GET", &format!("/entities/{p}"), None).status,
            404
        );
    }
}

#[test]
fn creations_and_batches_give_sources_their_attributes() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (start(da.path(), &[]), start(db.path(), &[]));
    let (ca, cb) = (client(&a), client(&b));
    let light = "urn:ngsi-ld:Streetlight:20";
    register(
        &ca,
        json!({
            "type": "ContextSourceRegistration",
            "information": [{"entities": [{"id": light, "type": "Streetlight"}], "propertyNames": ["switch"]}],
            "endpoint": b.base,
            "mode": "exclusive",
            "operations": ["createEntity", "updateOps", "retrieveOps", "deleteEntity"],
            // updateOps holds replaceEntity.
        }),
    );
    let made = call(
        &ca,
        "POST",
        "/entities",
        Some(
            json!({"id": light, "type": "Streetlight", "switch": {"type": "Property", "value": "off"}, "power": {"type": "Property", "value": 10}}),
        ),
    );
    assert_eq!(made.status, 201, "{:?}", made.body);
    let at_source = call(&cb, "GET", &format!("/entities/{light}"), None);
    assert_eq!(at_source.body["switch"]["value"], "off");
    assert!(
        at_source.body.get("power").is_none(),
        "{:?}",
        at_source.body
    );
    let here = call(&ca, "GET", &format!("/entities/{light}?local=true"), None);
    assert_eq!(here.body["power"]["value"], 10);
    assert!(here.body.get("switch").is_none(), "{:?}", here.body);

    // A batch upsert splits each entity the same way.
    let other = "urn:ngsi-ld:Streetlight:21";
    let upsert = call(
        &ca,
        "POST",
        "/entityOperations/upsert",
        Some(json!([
            {"id": light, "type": "Streetlight", "switch": {"type": "Property", "value": "on"}, "power": {"type": "Property", "value": 15}},
            {"id": other, "type": "Streetlight", "power": {"type": "Property", "value": 3}},
        ])),
    );
    // Only the other light is new.
    assert_eq!(upsert.status, 201, "{:?}", upsert.body);
    assert_eq!(upsert.body, json!([other]));
    assert_eq!(
        call(&cb, "GET", &format!("/entities/{light}"), None).body["switch"]["value"],
        "on"
    );
    let merged = call(&ca, "GET", &format!("/entities/{light}"), None);
    assert_eq!(merged.body["switch"]["value"], "on");
    assert_eq!(merged.body["power"]["value"], 15);
    assert_eq!(
        call(&ca, "GET", &format!("/entities/{other}"), None).body["power"]["value"],
        3
    );
    assert_eq!(
        call(&cb, "GET", &format!("/entities/{other}"), None).status,
        404
    );

    // A replacement too: the source's part replaces its entity, the rest is here.
    let replaced = call(
        &ca,
        "PUT",
        &format!("/entities/{light}"),
        Some(
            json!({"type": "Streetlight", "switch": {"type": "Property", "value": "dim"}, "colour": {"type": "Property", "value": "amber"}}),
        ),
    );
    assert_eq!(replaced.status, 204, "{:?}", replaced.body);
    assert_eq!(
        call(&cb, "GET", &format!("/entities/{light}"), None).body["switch"]["value"],
        "dim"
    );
    let here = call(&ca, "GET", &format!("/entities/{light}?local=true"), None);
    assert_eq!(here.body["colour"]["value"], "amber");
    assert!(
        here.body.get("power").is_none() && here.body.get("switch").is_none(),
        "{:?}",
        here.body
    );

    // A batch delete removes the entity here and at its source.
    let deleted = call(
        &ca,
        "POST",
        "/entityOperations/delete",
        Some(json!([light])),
    );
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);
    assert_eq!(
        call(&cb, "GET", &format!("/entities/{light}"), None).status,
        404
    );
    assert_eq!(
        call(&ca, "GET", &format!("/entities/{light}"), None).status,
        404
    );

    // With the source gone, a batch reports the entity's failed part by registration.
    drop(b);
    let partial = call(
        &ca,
        "POST",
        "/entityOperations/upsert",
        Some(
            json!([{"id": light, "type": "Streetlight", "switch": {"type": "Property", "value": "on"}, "power": {"type": "Property", "value": 1}}]),
        ),
    );
    assert_eq!(partial.status, 207, "{:?}", partial.body);
    assert_eq!(partial.body["errors"][0]["entityId"], light);
    assert!(
        partial.body["errors"][0]["registrationId"].is_string(),
        "{:?}",
        partial.body
    );
    // The local part was done: the entity is in both lists.
    assert_eq!(partial.body["success"], json!([light]));
    let here = call(&ca, "GET", &format!("/entities/{light}?local=true"), None);
    assert_eq!(here.body["power"]["value"], 1);
}
