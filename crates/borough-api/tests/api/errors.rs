//! Bad input gets a 4xx problem that says what was wrong, and changes nothing.

use crate::common::{ENTITIES, TestApp};
use axum::http::{Method, StatusCode};
use borough_api::ApiConfig;
use serde_json::json;

const E1: &str = "/ngsi-ld/v1/entities/urn:ngsi-ld:T:1";

async fn assert_nothing_stored(app: &TestApp) {
    let r = app.get(E1).await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "a rejected write must change nothing"
    );
}

#[tokio::test]
async fn malformed_bodies_are_rejected_with_problem_details() {
    let app = TestApp::new();
    let cases: Vec<(Option<&str>, String, StatusCode, &str, &str)> = vec![
        (Some("application/json"), "{\"id\": ".into(), StatusCode::BAD_REQUEST, "InvalidRequest", "not valid JSON"),
        (Some("application/json"), String::new(), StatusCode::BAD_REQUEST, "InvalidRequest", "empty"),
        (Some("application/json"), "[1,2]".into(), StatusCode::BAD_REQUEST, "BadRequestData", "JSON object"),
        (Some("application/json"), json!({"id": "urn:ngsi-ld:T:1"}).to_string(), StatusCode::BAD_REQUEST, "BadRequestData", "type"),
        (Some("application/json"), json!({"id": "not a uri", "type": "T"}).to_string(), StatusCode::BAD_REQUEST, "BadRequestData", "URI"),
        (Some("application/json"), json!({"id": "urn:ngsi-ld:T:1", "type": "T", "bad(name)": 1}).to_string(), StatusCode::BAD_REQUEST, "BadRequestData", "forbidden"),
        (Some("application/json"), json!({"id": "urn:ngsi-ld:T:1", "type": "T", "p": {"type": "Property"}}).to_string(), StatusCode::BAD_REQUEST, "BadRequestData", "value"),
        (Some("application/json"), json!({"id": "urn:ngsi-ld:T:1", "type": "T", "location": {"type": "GeoProperty", "value": {"type": "Polygon", "coordinates": [[[0,0],[1,0],[1,1],[0,1]]]}}}).to_string(), StatusCode::BAD_REQUEST, "BadRequestData", "closed"),
        (Some("text/plain"), json!({"id": "urn:ngsi-ld:T:1", "type": "T"}).to_string(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "InvalidRequest", "text/plain"),
        (None, json!({"id": "urn:ngsi-ld:T:1", "type": "T"}).to_string(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "InvalidRequest", "Content-Type"),
        (Some("application/ld+json"), json!({"id": "urn:ngsi-ld:T:1", "type": "T"}).to_string(), StatusCode::BAD_REQUEST, "BadRequestData", "@context"),
        (Some("application/json"), json!({"@context": {}, "id": "urn:ngsi-ld:T:1", "type": "T"}).to_string(), StatusCode::BAD_REQUEST, "BadRequestData", "@context"),
    ];
    for (ct, body, status, kind, word) in cases {
        let headers: Vec<(&str, &str)> = ct.map(|c| ("content-type", c)).into_iter().collect();
        let r = app
            .send(Method::POST, ENTITIES, &headers, Some(body.clone()))
            .await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert_eq!(r.problem(), kind, "{body}");
        let detail = r.body["detail"].as_str().unwrap();
        assert!(
            detail.contains(word),
            "{body}: detail '{detail}' should mention '{word}'"
        );
        assert_eq!(r.body["status"], status.as_u16());
        assert_nothing_stored(&app).await;
    }
}

#[tokio::test]
async fn oversized_and_too_deep_bodies_are_refused() {
    let app = TestApp::with_config(ApiConfig {
        max_body_bytes: 1024,
        ..ApiConfig::default()
    });
    let big = json!({"id": "urn:ngsi-ld:T:1", "type": "T", "p": "x".repeat(2000)});
    let r = app.json(Method::POST, ENTITIES, &big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(r.body["detail"].as_str().unwrap().contains("1024"));
    assert_nothing_stored(&app).await;

    let mut deep = json!(1);
    for _ in 0..40 {
        deep = json!([deep]);
    }
    let body =
        json!({"id": "urn:ngsi-ld:T:1", "type": "T", "p": {"type": "Property", "value": deep}});
    let r = app.json(Method::POST, ENTITIES, &body).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body["detail"].as_str().unwrap().contains("nested"));
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn duplicate_create_is_a_conflict_and_keeps_the_first() {
    let app = TestApp::new();
    let e = json!({"id": "urn:ngsi-ld:T:1", "type": "T", "p": 1});
    assert_eq!(
        app.json(Method::POST, ENTITIES, &e).await.status,
        StatusCode::CREATED
    );
    let r = app
        .json(
            Method::POST,
            ENTITIES,
            &json!({"id": "urn:ngsi-ld:T:1", "type": "T", "p": 2}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.problem(), "AlreadyExists");
    assert_eq!(app.get(E1).await.body["p"]["value"], 1);
}

#[tokio::test]
async fn bad_paths_methods_and_accept_headers() {
    let app = TestApp::new();
    let r = app.get("/ngsi-ld/v1/entities/not-a-uri").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.problem(), "BadRequestData");

    let r = app.get_with(E1, &[("accept", "text/html")]).await;
    assert_eq!(r.status, StatusCode::NOT_ACCEPTABLE);
    r.problem();

    let r = app.get("/ngsi-ld/v1/nothing-here").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    r.problem();

    let r = app
        .send(
            Method::PUT,
            "/ngsi-ld/v1/entityOperations/create",
            &[],
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    r.problem();

    let r = app.delete(&format!("{E1}/attrs/p?deleteAll=maybe")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_failed_update_leaves_the_entity_as_it_was() {
    let app = TestApp::new();
    let e = json!({"id": "urn:ngsi-ld:T:1", "type": "T", "p": 1, "q": 2});
    app.json(Method::POST, ENTITIES, &e).await;
    let before = app.get(E1).await.body;
    // One good attribute and one invalid one: the whole request is refused.
    let r = app
        .json(
            Method::POST,
            &format!("{E1}/attrs"),
            &json!({"p": 5, "r": {"type": "Relationship", "object": "not a uri"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(app.get(E1).await.body, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_a_500_and_unhealthy_until_space_returns() {
    let faults = std::sync::Arc::new(borough_embedded::Faults::default());
    let app = TestApp::with_store_options(
        crate::common::test_config(),
        borough_embedded::StoreOptions {
            faults: Some(faults.clone()),
            ..Default::default()
        },
    );
    let entity = |n: i64| json!({"id": "urn:ngsi-ld:T:1", "type": "T", "n": n});
    assert_eq!(app.get("/health").await.status, StatusCode::OK);

    faults.set_disk_full(true);
    let r = app.json(Method::POST, ENTITIES, &entity(1)).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(r.problem(), "InternalError");
    assert!(
        r.body["detail"].as_str().unwrap().contains("No space left"),
        "{}",
        r.body
    );
    let health = app.get("/health").await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health.body["status"], "unavailable");
    assert_eq!(health.body["writer"]["writer"], "failing");
    assert!(
        health.body["writer"]["error"]
            .as_str()
            .unwrap()
            .contains("No space left")
    );
    assert_nothing_stored(&app).await;

    faults.set_disk_full(false);
    let r = app.json(Method::POST, ENTITIES, &entity(2)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let health = app.get("/health").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.body["writer"]["writer"], "ok");
    assert_eq!(app.get(E1).await.body["n"]["value"], 2);
}
