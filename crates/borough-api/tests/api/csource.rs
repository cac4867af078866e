//! Context source registrations (clause 5.9) and subscriptions to them
//! (clause 5.11) over HTTP: create, read, query, update, delete, their
//! errors, persistence, tenancy, and the notifications subscribers receive.

use crate::common::TestApp;
use axum::Router;
use axum::body::Bytes;
use axum::http::{Method, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::sync::mpsc;

const CSR: &str = "/ngsi-ld/v1/csourceRegistrations";
const SUBS: &str = "/ngsi-ld/v1/csourceSubscriptions";
const CORE: &str = "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context.jsonld";

fn rid(name: &str) -> String {
    format!("urn:ngsi-ld:ContextSourceRegistration:{name}")
}

fn url(id: &str) -> String {
    format!("{CSR}/{id}")
}

/// A registration of `speed` of the entities of one type.
fn reg(id: &str, entity_type: &str, endpoint: &str) -> Value {
    json!({
        "id": id,
        "type": "ContextSourceRegistration",
        "information": [{"entities": [{"type": entity_type}], "propertyNames": ["speed"]}],
        "endpoint": endpoint
    })
}

/// A subscription to the registrations of Vehicles.
fn csub(id: &str, uri: &str) -> Value {
    json!({
        "id": id,
        "type": "Subscription",
        "entities": [{"type": "Vehicle"}],
        "notification": {"endpoint": {"uri": uri, "accept": "application/json"}}
    })
}

/// The ids of a list of registrations, sorted.
fn ids(body: &Value) -> Vec<String> {
    let mut out: Vec<String> = body
        .as_array()
        .unwrap_or_else(|| panic!("a list: {body}"))
        .iter()
        .map(|r| r["id"].as_str().unwrap_or_default().to_string())
        .collect();
    out.sort();
    out
}

/// Percent-encodes a query parameter value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn create(app: &TestApp, body: &Value) {
    let r = app.json(Method::POST, CSR, body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{body}: {}", r.body);
}

/// A notification receiver on loopback: every JSON body POSTed to it.
async fn receiver() -> (String, mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = mpsc::unbounded_channel::<Value>();
    let app = Router::new().route(
        "/notify",
        post(move |body: Bytes| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(serde_json::from_slice(&body).unwrap_or(Value::Null));
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("http://{}/notify", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (uri, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a notification within 5 s")
        .expect("the receiver is running")
}

async fn quiet(rx: &mut mpsc::UnboundedReceiver<Value>, why: &str) {
    if let Ok(Some(n)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        panic!("{why}, yet a notification came: {n}");
    }
}

#[tokio::test]
async fn registrations_are_created_read_back_and_refused_twice() {
    let app = TestApp::new();
    // Without an id, the broker makes one and says where it is.
    let mut anonymous = reg("", "Vehicle", "http://127.0.0.1:9/anonymous");
    anonymous.as_object_mut().unwrap().remove("id");
    let r = app.json(Method::POST, CSR, &anonymous).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let location = r.header("location").expect("a Location header").to_string();
    assert!(location.starts_with(&url(&rid(""))), "{location}");
    let r = app.get(&location).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(url(r.body["id"].as_str().unwrap()), location);

    let id = rid("fleet");
    let mut body = reg(&id, "Vehicle", "http://127.0.0.1:9/fleet");
    body["mode"] = json!("inclusive");
    let r = app.json(Method::POST, CSR, &body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.header("location"), Some(url(&id).as_str()));

    let r = app.get(&url(&id)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["id"], id.as_str());
    assert_eq!(r.body["type"], "ContextSourceRegistration");
    assert_eq!(r.body["information"], body["information"]);
    assert_eq!(r.body["endpoint"], "http://127.0.0.1:9/fleet");
    assert_eq!(r.body["mode"], "inclusive");
    assert!(r.body.get("createdAt").is_none(), "{}", r.body);
    assert!(r.body.get("modifiedAt").is_none(), "{}", r.body);
    let r = app.get(&format!("{}?options=sysAttrs", url(&id))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    for member in ["createdAt", "modifiedAt"] {
        let t = r.body[member].as_str().unwrap_or_default();
        assert!(
            chrono::DateTime::parse_from_rfc3339(t).is_ok(),
            "{member}: {}",
            r.body
        );
    }

    let r = app.json(Method::POST, CSR, &body).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.problem(), "AlreadyExists");

    let r = app.get(&url(&rid("nobody"))).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.problem(), "ResourceNotFound");

    let r = app
        .json(
            Method::POST,
            CSR,
            &reg("not a uri", "Vehicle", "http://127.0.0.1:9/x"),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert_eq!(r.problem(), "BadRequestData");
    assert!(
        r.body["detail"].as_str().unwrap().contains("URI"),
        "{}",
        r.body
    );
    let r = app.get(&url("nonsense")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
}

#[tokio::test]
async fn invalid_registrations_are_400_naming_the_member_and_store_nothing() {
    let app = TestApp::new();
    type Change = Box<dyn Fn(&mut Value)>;
    let remove = |key: &'static str| -> Change {
        Box::new(move |v: &mut Value| {
            v.as_object_mut().unwrap().remove(key);
        })
    };
    let variants: Vec<(Change, &str)> = vec![
        (remove("information"), "information"),
        (Box::new(|v| v["information"] = json!([])), "information"),
        (
            Box::new(|v| {
                v["information"][0]["entities"] = json!([{"id": "urn:ngsi-ld:Vehicle:1"}]);
            }),
            "information[0].entities[0]",
        ),
        (remove("endpoint"), "endpoint"),
        (
            Box::new(|v| v["endpoint"] = json!("ftp://x.org/s")),
            "endpoint",
        ),
        (Box::new(|v| v["mode"] = json!("sometimes")), "mode"),
        (Box::new(|v| v["operations"] = json!(["fly"])), "operations"),
        (
            Box::new(|v| {
                v["mode"] = json!("auxiliary");
                v["operations"] = json!(["updateOps"]);
            }),
            "auxiliary",
        ),
        (Box::new(|v| v["mode"] = json!("exclusive")), "by id"),
        (
            Box::new(|v| v["expiresAt"] = json!("2001-01-01T00:00:00Z")),
            "expiresAt",
        ),
        (
            Box::new(|v| v["management"] = json!({"timeout": -1})),
            "management.timeout",
        ),
    ];
    for (change, word) in variants {
        let mut body = reg(&rid("bad"), "Vehicle", "http://127.0.0.1:9/source");
        change(&mut body);
        let r = app.json(Method::POST, CSR, &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.body);
        assert_eq!(r.problem(), "BadRequestData", "{body}");
        assert!(
            r.body["detail"].as_str().unwrap().contains(word),
            "{body}: {}",
            r.body["detail"]
        );
    }
    // JSON-LD without its @context.
    let body = reg(&rid("bad"), "Vehicle", "http://127.0.0.1:9/source");
    let r = app
        .send(
            Method::POST,
            CSR,
            &[("content-type", "application/ld+json")],
            Some(body.to_string()),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert_eq!(r.problem(), "BadRequestData");
    assert!(
        r.body["detail"].as_str().unwrap().contains("@context"),
        "{}",
        r.body
    );

    let r = app.get(&format!("{CSR}?type=Vehicle")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, json!([]), "a refused registration is not stored");
    assert_eq!(
        app.get(&url(&rid("bad"))).await.status,
        StatusCode::NOT_FOUND
    );
}

fn exclusive(name: &str, attrs: &[&str]) -> Value {
    json!({
        "id": rid(name),
        "type": "ContextSourceRegistration",
        "information": [{"entities": [{"id": "urn:ngsi-ld:Vehicle:A", "type": "Vehicle"}],
                         "propertyNames": attrs}],
        "endpoint": format!("http://127.0.0.1:9/{name}"),
        "mode": "exclusive"
    })
}

#[tokio::test]
async fn two_exclusive_registrations_of_one_attribute_conflict() {
    let app = TestApp::new();
    create(&app, &exclusive("first", &["speed"])).await;
    let r = app
        .json(Method::POST, CSR, &exclusive("second", &["speed", "fuel"]))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(r.problem(), "Conflict");
    let detail = r.body["detail"].as_str().unwrap();
    assert!(
        detail.contains("speed") && detail.contains(&rid("first")),
        "{detail}"
    );
    assert_eq!(
        app.get(&url(&rid("second"))).await.status,
        StatusCode::NOT_FOUND
    );
    // Another attribute of the same entity is free.
    create(&app, &exclusive("third", &["fuel"])).await;
    assert_eq!(app.get(&url(&rid("third"))).await.status, StatusCode::OK);
}

#[tokio::test]
async fn iot_agent_registrations_with_bare_operations_and_source_info_are_accepted() {
    let app = TestApp::new();
    let id = rid("iota");
    create(
        &app,
        &json!({
            "id": id,
            "type": "ContextSourceRegistration",
            "information": [{"entities": [{"id": "urn:ngsi-ld:Device:thermo1", "type": "Device"}],
                             "propertyNames": ["temperature"]}],
            "endpoint": "http://127.0.0.1:4041",
            "operations": "updateOps",
            "contextSourceInfo": {"key": "jsonldContext", "value": CORE}
        }),
    )
    .await;
    let r = app.get(&url(&id)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let ops = &r.body["operations"];
    assert!(
        *ops == json!("updateOps") || *ops == json!(["updateOps"]),
        "{ops}"
    );
    let info = &r.body["contextSourceInfo"];
    let pair = if info.is_array() { &info[0] } else { info };
    assert_eq!(pair["key"], "jsonldContext", "{info}");
    assert_eq!(pair["value"], CORE, "{info}");
}

#[tokio::test]
async fn registrations_are_found_by_type_attrs_id_and_csf_page_by_page() {
    let app = TestApp::new();
    let info = |entities: Value, attrs: Option<Value>| {
        let mut i = json!({"entities": entities});
        if let Some(a) = attrs {
            i["propertyNames"] = a;
        }
        i
    };
    let regs = [
        (
            "r1",
            info(
                json!([{"id": "urn:ngsi-ld:Vehicle:A", "type": "Vehicle"}]),
                Some(json!(["speed"])),
            ),
        ),
        (
            "r2",
            info(json!([{"type": "Vehicle"}]), Some(json!(["fuel"]))),
        ),
        ("r3", info(json!([{"type": "Vehicle"}]), None)),
        (
            "r4",
            info(
                json!([{"id": "urn:ngsi-ld:Building:1", "type": "Building"}]),
                Some(json!(["height"])),
            ),
        ),
    ];
    for (name, information) in regs {
        create(
            &app,
            &json!({"id": rid(name), "type": "ContextSourceRegistration",
                    "information": [information], "endpoint": format!("http://127.0.0.1:9/{name}")}),
        )
        .await;
    }
    let (r1, r2, r3, r4) = (rid("r1"), rid("r2"), rid("r3"), rid("r4"));

    let r = app.get(CSR).await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "a query must select: {}",
        r.body
    );
    assert_eq!(r.problem(), "BadRequestData");

    let r = app.get(&format!("{CSR}?type=Vehicle")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(ids(&r.body), [r1.clone(), r2.clone(), r3.clone()]);

    // Those naming speed, and those naming no attribute (all of them).
    let r = app.get(&format!("{CSR}?attrs=speed")).await;
    assert_eq!(ids(&r.body), [r1.clone(), r3.clone()]);

    let r = app.get(&format!("{CSR}?id=urn:ngsi-ld:Vehicle:A")).await;
    let found = ids(&r.body);
    assert!(found.contains(&r1) && !found.contains(&r4), "{found:?}");

    let csf = enc("endpoint==\"http://127.0.0.1:9/r2\"");
    let r = app.get(&format!("{CSR}?csf={csf}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(ids(&r.body), std::slice::from_ref(&r2));

    let r = app.get(&format!("{CSR}?type=Vehicle&count=true")).await;
    assert_eq!(r.header("ngsild-results-count"), Some("3"));
    assert_eq!(r.body.as_array().unwrap().len(), 3);

    let first = app.get(&format!("{CSR}?type=Vehicle&limit=2")).await;
    let second = app
        .get(&format!("{CSR}?type=Vehicle&limit=2&offset=2"))
        .await;
    assert_eq!(first.body.as_array().unwrap().len(), 2, "{}", first.body);
    assert_eq!(second.body.as_array().unwrap().len(), 1, "{}", second.body);
    let mut all = ids(&first.body);
    all.extend(ids(&second.body));
    all.sort();
    assert_eq!(all, [r1, r2, r3], "the pages together hold each once");
}

#[tokio::test]
async fn patching_a_registration_merges_members_and_refuses_bad_changes() {
    let app = TestApp::new();
    let id = rid("fleet");
    let mut body = reg(&id, "Vehicle", "http://127.0.0.1:9/old");
    body["description"] = json!("the old fleet");
    create(&app, &body).await;

    let patch = json!({"endpoint": "http://127.0.0.1:9/new", "registrationName": "fleet", "description": null});
    let r = app.json(Method::PATCH, &url(&id), &patch).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let r = app.get(&url(&id)).await;
    assert_eq!(r.body["endpoint"], "http://127.0.0.1:9/new");
    assert_eq!(r.body["registrationName"], "fleet");
    assert!(
        r.body.get("description").is_none(),
        "null removes: {}",
        r.body
    );
    assert_eq!(
        r.body["information"], body["information"],
        "the rest is kept"
    );

    let r = app
        .json(Method::PATCH, &url(&id), &json!({"mode": "bad"}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert_eq!(r.problem(), "BadRequestData");
    let r = app.get(&url(&id)).await;
    assert!(
        r.body.get("mode").is_none(),
        "a refused update changes nothing: {}",
        r.body
    );
    assert_eq!(r.body["endpoint"], "http://127.0.0.1:9/new");

    let r = app
        .json(Method::PATCH, &url(&id), &json!({"id": rid("other")}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert_eq!(app.get(&url(&id)).await.status, StatusCode::OK);
    assert_eq!(
        app.get(&url(&rid("other"))).await.status,
        StatusCode::NOT_FOUND
    );

    assert_eq!(app.delete(&url(&id)).await.status, StatusCode::NO_CONTENT);
    assert_eq!(app.get(&url(&id)).await.status, StatusCode::NOT_FOUND);
    assert_eq!(app.delete(&url(&id)).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn registrations_survive_a_restart() {
    let app = TestApp::new();
    let (keep, gone) = (rid("keep"), rid("gone"));
    create(&app, &reg(&keep, "Vehicle", "http://127.0.0.1:9/keep")).await;
    create(&app, &reg(&gone, "Vehicle", "http://127.0.0.1:9/gone")).await;
    let r = app
        .json(
            Method::PATCH,
            &url(&keep),
            &json!({"registrationName": "kept"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    assert_eq!(app.delete(&url(&gone)).await.status, StatusCode::NO_CONTENT);

    let app = app.restart().await;
    let r = app.get(&url(&keep)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["endpoint"], "http://127.0.0.1:9/keep");
    assert_eq!(r.body["registrationName"], "kept");
    assert_eq!(app.get(&url(&gone)).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        ids(&app.get(&format!("{CSR}?type=Vehicle")).await.body),
        [keep]
    );
}

#[tokio::test]
async fn a_tenants_registrations_are_invisible_to_other_tenants() {
    let app = TestApp::new();
    let (a, b) = ([("ngsild-tenant", "a")], [("ngsild-tenant", "b")]);
    let (of_a, of_b) = (rid("of-a"), rid("of-b"));
    for (h, id) in [(&a, &of_a), (&b, &of_b)] {
        let r = app
            .json_with(
                Method::POST,
                CSR,
                h,
                &reg(id, "Vehicle", "http://127.0.0.1:9/t"),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }
    assert_eq!(app.get_with(&url(&of_a), &a).await.status, StatusCode::OK);
    let r = app.get_with(&url(&of_a), &b).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert_eq!(app.get(&url(&of_a)).await.status, StatusCode::NOT_FOUND);
    let list = format!("{CSR}?type=Vehicle");
    assert_eq!(
        ids(&app.get_with(&list, &b).await.body),
        std::slice::from_ref(&of_b)
    );
    assert_eq!(
        ids(&app.get_with(&list, &a).await.body),
        std::slice::from_ref(&of_a)
    );
    let r = app.send(Method::DELETE, &url(&of_a), &b, None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(app.get_with(&url(&of_a), &a).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_hear_of_new_changed_and_removed_registrations_of_their_type() {
    let app = TestApp::new();
    let (uri, mut rx) = receiver().await;
    let sub_id = "urn:ngsi-ld:Subscription:vehicle-sources";
    let r = app.json(Method::POST, SUBS, &csub(sub_id, &uri)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);

    let fleet = rid("fleet");
    create(&app, &reg(&fleet, "Vehicle", "http://127.0.0.1:9/fleet")).await;
    let n = next(&mut rx).await;
    assert_eq!(n["subscriptionId"], sub_id, "{n}");
    assert_eq!(n["triggerReason"], "newlyMatching", "{n}");
    assert_eq!(n["data"].as_array().map(Vec::len), Some(1), "{n}");
    assert_eq!(n["data"][0]["id"], fleet.as_str(), "{n}");

    let patch = json!({"registrationName": "fleet sources"});
    let r = app.json(Method::PATCH, &url(&fleet), &patch).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let n = next(&mut rx).await;
    assert_eq!(n["triggerReason"], "updated", "{n}");
    assert_eq!(n["data"][0]["id"], fleet.as_str(), "{n}");
    assert_eq!(n["data"][0]["registrationName"], "fleet sources", "{n}");

    assert_eq!(
        app.delete(&url(&fleet)).await.status,
        StatusCode::NO_CONTENT
    );
    let n = next(&mut rx).await;
    assert_eq!(n["triggerReason"], "noLongerMatching", "{n}");
    assert_eq!(n["data"][0]["id"], fleet.as_str(), "{n}");

    // A Building's source is none of its business.
    let (building, fleet2) = (rid("building"), rid("fleet2"));
    create(
        &app,
        &reg(&building, "Building", "http://127.0.0.1:9/building"),
    )
    .await;
    create(&app, &reg(&fleet2, "Vehicle", "http://127.0.0.1:9/fleet2")).await;
    let mut seen = vec![next(&mut rx).await];
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(n) = rx.try_recv() {
        seen.push(n);
    }
    assert!(
        seen.iter().all(|n| n["data"][0]["id"] != building.as_str()),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|n| n["data"][0]["id"] == fleet2.as_str() && n["triggerReason"] == "newlyMatching"),
        "{seen:?}"
    );

    // A deleted subscription hears nothing more.
    let sub_url = format!("{SUBS}/{sub_id}");
    assert_eq!(app.delete(&sub_url).await.status, StatusCode::NO_CONTENT);
    create(
        &app,
        &reg(&rid("fleet3"), "Vehicle", "http://127.0.0.1:9/fleet3"),
    )
    .await;
    quiet(&mut rx, "the subscription was deleted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_notifications_are_context_source_notifications() {
    let app = TestApp::new();
    let (uri, mut rx) = receiver().await;
    let fleet = rid("fleet");
    create(&app, &reg(&fleet, "Vehicle", "http://127.0.0.1:9/fleet")).await;
    // Registrations that already match are notified when the subscription is made.
    let sub_id = "urn:ngsi-ld:Subscription:late";
    let r = app.json(Method::POST, SUBS, &csub(sub_id, &uri)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let n = next(&mut rx).await;
    assert_eq!(n["subscriptionId"], sub_id, "{n}");
    assert_eq!(n["triggerReason"], "newlyMatching", "{n}");
    assert_eq!(n["data"][0]["id"], fleet.as_str(), "{n}");
    assert_eq!(n["data"][0]["type"], "ContextSourceRegistration", "{n}");
    let at = n["notifiedAt"].as_str().unwrap_or_default();
    assert!(chrono::DateTime::parse_from_rfc3339(at).is_ok(), "{n}");
    assert!(n["id"].as_str().is_some_and(|i| i.contains(':')), "{n}");
    // Clause 5.3.2: a CsourceNotification's type is ContextSourceNotification.
    assert_eq!(n["type"], "ContextSourceNotification", "{n}");
}

#[tokio::test]
async fn context_source_subscriptions_are_read_updated_and_deleted() {
    let app = TestApp::new();
    let id = "urn:ngsi-ld:Subscription:crud";
    let sub_url = format!("{SUBS}/{id}");
    let r = app
        .json(Method::POST, SUBS, &csub(id, "http://127.0.0.1:9/notify"))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.header("location"), Some(sub_url.as_str()));

    let r = app.get(&sub_url).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["id"], id);
    assert_eq!(r.body["entities"], json!([{"type": "Vehicle"}]));
    assert_eq!(
        r.body["notification"]["endpoint"]["uri"],
        "http://127.0.0.1:9/notify"
    );
    let r = app
        .json(Method::POST, SUBS, &csub(id, "http://127.0.0.1:9/notify"))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert_eq!(ids(&app.get(SUBS).await.body), [id]);

    let patch = json!({"description": "vehicle sources",
                       "notification": {"endpoint": {"uri": "http://127.0.0.1:9/other"}}});
    let r = app.json(Method::PATCH, &sub_url, &patch).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let r = app.get(&sub_url).await;
    assert_eq!(r.body["description"], "vehicle sources");
    assert_eq!(
        r.body["notification"]["endpoint"]["uri"],
        "http://127.0.0.1:9/other"
    );

    assert_eq!(app.delete(&sub_url).await.status, StatusCode::NO_CONTENT);
    assert_eq!(app.get(&sub_url).await.status, StatusCode::NOT_FOUND);
    assert_eq!(app.delete(&sub_url).await.status, StatusCode::NOT_FOUND);
}
