//! The @context registry: built-in, hosted (durable) and cached contexts.

use crate::common::{ENTITIES, TestApp};
use axum::Router;
use axum::http::{Method, StatusCode};
use axum::routing::get;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

const REG: &str = "/ngsi-ld/v1/jsonldContexts";

fn link(url: &str) -> String {
    format!("<{url}>; rel=\"http://www.w3.org/ns/json-ld#context\"; type=\"application/ld+json\"")
}

#[tokio::test]
async fn core_contexts_are_listed_and_cannot_be_deleted() {
    let app = TestApp::new();
    let r = app.get(REG).await;
    let urls: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(urls.contains(&"https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.8.jsonld"));
    assert!(urls.contains(&"https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.6.jsonld"));
    let r = app.get(&format!("{REG}?details=true&kind=Cached")).await;
    let core = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["URL"].as_str().unwrap().ends_with("v1.8.jsonld"))
        .unwrap()
        .clone();
    assert_eq!(core["kind"], "Cached");
    let id = core["localId"].as_str().unwrap().to_string();
    let r = app.get(&format!("{REG}/{id}")).await;
    assert!(
        r.body["@context"]["Property"].is_string(),
        "serves the document"
    );
    let r = app.delete(&format!("{REG}/{id}")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(app.get(&format!("{REG}?kind=Hosted")).await.body, json!([]));
    assert_eq!(
        app.get(&format!("{REG}?kind=Sideways")).await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        app.get(&format!("{REG}/nope")).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn hosted_contexts_are_served_used_and_kept_across_restarts() {
    let app = TestApp::new();
    let doc = json!({"@context": {"speed": "https://example.org/speed", "Bus": "https://example.org/Bus"}});
    let r = app.json(Method::POST, REG, &doc).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let location = r.header("location").unwrap().to_string();
    assert!(
        location.starts_with("http://localhost/ngsi-ld/v1/jsonldContexts/"),
        "{location}"
    );
    let path = location.trim_start_matches("http://localhost");
    assert_eq!(app.get(path).await.body, doc);

    // Entities can be written and read through the hosted context.
    let l = link(&location);
    let e = json!({"id": "urn:ngsi-ld:Bus:1", "type": "Bus", "speed": 30});
    assert_eq!(
        app.json_with(Method::POST, ENTITIES, &[("link", &l)], &e)
            .await
            .status,
        StatusCode::CREATED
    );
    let r = app.get("/ngsi-ld/v1/entities/urn:ngsi-ld:Bus:1").await;
    assert_eq!(r.body["type"], "https://example.org/Bus");

    let app = app.restart().await;
    let r = app.get(&format!("{REG}?kind=Hosted&details=true")).await;
    assert_eq!(r.body.as_array().unwrap().len(), 1, "{}", r.body);
    assert_eq!(r.body[0]["kind"], "Hosted");
    let r = app
        .get_with("/ngsi-ld/v1/entities/urn:ngsi-ld:Bus:1", &[("link", &l)])
        .await;
    assert_eq!(
        r.body["type"], "Bus",
        "the hosted context still compacts after a restart"
    );
    assert_eq!(r.body["speed"]["value"], 30);

    let id = path.rsplit('/').next().unwrap();
    assert_eq!(
        app.delete(&format!("{REG}/{id}?reload=true")).await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        app.delete(&format!("{REG}/{id}")).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.get(path).await.status, StatusCode::NOT_FOUND);
    let app = app.restart().await;
    assert_eq!(app.get(&format!("{REG}?kind=Hosted")).await.body, json!([]));
}

#[tokio::test]
async fn bad_context_documents_are_refused() {
    let app = TestApp::new();
    let r = app.json(Method::POST, REG, &json!({"speed": "x"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body["detail"].as_str().unwrap().contains("@context"));
    let r = app.json(Method::POST, REG, &json!({"@context": 5})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(app.get(&format!("{REG}?kind=Hosted")).await.body, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_contexts_are_counted_and_reloaded_without_restart() {
    // A context server whose document changes when `version` does.
    let version = Arc::new(AtomicU32::new(1));
    let v = version.clone();
    let server = Router::new().route(
        "/ctx.jsonld",
        get(move || {
            let n = v.load(Ordering::SeqCst);
            async move {
                axum::Json(
                    json!({"@context": {"speed": format!("https://example.org/v{n}/speed")}}),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ctx.jsonld", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, server).await });

    let app = TestApp::new();
    let l = link(&url);
    let post = |i: u32| json!({"id": format!("urn:ngsi-ld:Car:{i}"), "type": "Car", "speed": i});
    app.json_with(Method::POST, ENTITIES, &[("link", &l)], &post(1))
        .await;
    app.json_with(Method::POST, ENTITIES, &[("link", &l)], &post(2))
        .await;
    let r = app.get(&format!("{REG}?details=true&kind=Cached")).await;
    let entry: Value = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["URL"] == url.as_str())
        .unwrap()
        .clone();
    assert!(entry["numberOfHits"].as_u64().unwrap() >= 2, "{entry}");
    assert!(entry["lastUsage"].is_string());

    version.store(2, Ordering::SeqCst);
    let enc: String = url
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let r = app.delete(&format!("{REG}/{enc}?reload=true")).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    app.json_with(Method::POST, ENTITIES, &[("link", &l)], &post(3))
        .await;
    let r = app.get("/ngsi-ld/v1/entities/urn:ngsi-ld:Car:1").await;
    assert_eq!(r.body["https://example.org/v1/speed"]["value"], 1);
    let r = app.get("/ngsi-ld/v1/entities/urn:ngsi-ld:Car:3").await;
    assert_eq!(
        r.body["https://example.org/v2/speed"]["value"], 3,
        "the reloaded context applies at once"
    );
}
