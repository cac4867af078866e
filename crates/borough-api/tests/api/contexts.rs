//! `@context` handling: Link header, inline JSON-LD, built-in core contexts,
//! remote contexts served by a real local HTTP server, and failures.

use crate::common::{ENTITIES, TestApp};
use axum::Router;
use axum::http::{Method, StatusCode};
use axum::routing::get;
use borough_api::ApiConfig;
use serde_json::json;
use std::time::Duration;

/// Serves context documents on a loopback port; returns its base URL.
async fn context_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let own = format!("{base}/ctx.jsonld");
    let app = Router::new()
        .route(
            "/ctx.jsonld",
            get(|| async {
                axum::Json(json!({"@context": {
                    "ex": "https://example.org/",
                    "speed": "ex:speed",
                    "Car": "https://example.org/Car"
                }}))
            }),
        )
        .route(
            "/nested.jsonld",
            get(move || async move {
                // Refers to the other document by its URL, which the resolver must fetch too.
                axum::Json(json!({"@context": [own, {"brand": "https://example.org/brand"}]}))
            }),
        )
        .route(
            "/slow.jsonld",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                axum::Json(json!({"@context": {}}))
            }),
        )
        .route("/not-json.jsonld", get(|| async { "<html>" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

fn link(url: &str) -> String {
    format!("<{url}>; rel=\"http://www.w3.org/ns/json-ld#context\"; type=\"application/ld+json\"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_context_expands_on_write_and_compacts_on_read() {
    let base = context_server().await;
    let app = TestApp::new();
    let ctx = format!("{base}/ctx.jsonld");
    let l = link(&ctx);
    let body = json!({"id": "urn:ngsi-ld:Car:1", "type": "Car", "speed": {"type": "Property", "value": 50}});
    let r = app
        .json_with(Method::POST, ENTITIES, &[("link", &l)], &body)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);

    let r = app
        .get_with("/ngsi-ld/v1/entities/urn:ngsi-ld:Car:1", &[("link", &l)])
        .await;
    assert_eq!(r.body, body);
    assert!(
        r.header("link").unwrap().contains(&ctx),
        "the response names the context used"
    );

    // Without the user context the names come back as full IRIs.
    let r = app.get("/ngsi-ld/v1/entities/urn:ngsi-ld:Car:1").await;
    assert_eq!(r.body["type"], "https://example.org/Car");
    assert_eq!(r.body["https://example.org/speed"]["value"], 50);

    // The attribute is addressed through the context too.
    let r = app
        .json_with(
            Method::PATCH,
            "/ngsi-ld/v1/entities/urn:ngsi-ld:Car:1/attrs/speed",
            &[("link", &l)],
            &json!({"value": 60}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app.get("/ngsi-ld/v1/entities/urn:ngsi-ld:Car:1").await;
    assert_eq!(r.body["https://example.org/speed"]["value"], 60);

    // A context that refers to another one.
    let nested = link(&format!("{base}/nested.jsonld"));
    let body = json!({"id": "urn:ngsi-ld:Car:2", "type": "Car", "brand": "Tram", "speed": 1});
    let r = app
        .json_with(Method::POST, ENTITIES, &[("link", &nested)], &body)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = app.get("/ngsi-ld/v1/entities/urn:ngsi-ld:Car:2").await;
    assert_eq!(r.body["https://example.org/brand"]["value"], "Tram");
    assert_eq!(r.body["https://example.org/speed"]["value"], 1);
}

#[tokio::test]
async fn inline_json_ld_context() {
    let app = TestApp::new();
    let body = json!({
        "@context": [{"temp": "https://example.org/temperature"}, "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.8.jsonld"],
        "id": "urn:ngsi-ld:Room:1", "type": "Room", "temp": {"type": "Property", "value": 21}
    });
    let r = app
        .send(
            Method::POST,
            ENTITIES,
            &[("content-type", "application/ld+json")],
            Some(body.to_string()),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = app
        .get_with(
            "/ngsi-ld/v1/entities/urn:ngsi-ld:Room:1",
            &[("accept", "application/ld+json")],
        )
        .await;
    assert_eq!(r.body["https://example.org/temperature"]["value"], 21);
}

#[tokio::test]
async fn core_contexts_are_built_in_and_never_fetched() {
    // No network is needed for any core context version.
    let app = TestApp::new();
    for v in ["v1.6", "v1.7", "v1.8", "v1.9"] {
        let l = link(&format!(
            "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-{v}.jsonld"
        ));
        let id = format!("urn:ngsi-ld:T:{v}");
        let r = app
            .json_with(
                Method::POST,
                ENTITIES,
                &[("link", &l)],
                &json!({"id": id, "type": "T", "p": 1}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{v}: {}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_contexts_fail_fast_with_ld_context_not_available() {
    let base = context_server().await;
    let app = TestApp::with_config(ApiConfig {
        context_fetch_timeout: Duration::from_millis(500),
        ..crate::common::test_config()
    });
    let body = json!({"id": "urn:ngsi-ld:T:1", "type": "T"});
    for url in [
        "http://127.0.0.1:1/ctx.jsonld".to_string(),
        format!("{base}/missing.jsonld"),
        format!("{base}/not-json.jsonld"),
        format!("{base}/slow.jsonld"),
    ] {
        let l = link(&url);
        // The guard only stops a hang from blocking the suite; the fetch timeout is what answers.
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            app.json_with(Method::POST, ENTITIES, &[("link", &l)], &body),
        )
        .await
        .expect("an unreachable context must not hang the request");
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{url}: {}",
            r.body
        );
        assert_eq!(r.problem(), "LdContextNotAvailable");
        assert!(r.body["detail"].as_str().unwrap().contains(&url));
    }
    assert_eq!(
        app.get("/ngsi-ld/v1/entities/urn:ngsi-ld:T:1").await.status,
        StatusCode::NOT_FOUND
    );
}
