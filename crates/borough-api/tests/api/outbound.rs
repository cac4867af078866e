//! The outbound guard over HTTP: with the default configuration, clients
//! cannot make the server connect to internal addresses, neither for a
//! notification endpoint nor for a remote `@context`.

use crate::common::{ENTITIES, TestApp, test_config};
use axum::Router;
use axum::http::{Method, StatusCode};
use axum::routing::get;
use borough_api::ApiConfig;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

const SUBS: &str = "/ngsi-ld/v1/subscriptions";

fn subscription(id: &str, uri: &str) -> Value {
    json!({
        "id": id, "type": "Subscription",
        "entities": [{"type": "ParkingSpot"}],
        "notification": {"endpoint": {"uri": uri}}
    })
}

/// Serves `/ctx.jsonld` on loopback and counts the requests it gets.
async fn context_server() -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ctx.jsonld", listener.local_addr().unwrap());
    let app = Router::new().route(
        "/ctx.jsonld",
        get(move || async move {
            counted.fetch_add(1, Ordering::SeqCst);
            axum::Json(json!({"@context": {"speed": "https://example.org/speed"}}))
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, hits)
}

fn link(url: &str) -> String {
    format!("<{url}>; rel=\"http://www.w3.org/ns/json-ld#context\"; type=\"application/ld+json\"")
}

#[tokio::test]
async fn subscriptions_to_internal_addresses_are_bad_requests() {
    let app = TestApp::with_config(ApiConfig::default());
    for (i, uri) in [
        "http://10.0.0.1/x",
        "http://169.254.169.254/",
        "http://127.0.0.1:9/notify",
        "http://localhost:9/notify",
        "https://[::1]/notify",
        "http://[::ffff:192.168.0.1]/n",
        "http://2130706433/",
        "mqtt://10.0.0.5/topic",
        "mqtts://100.64.0.1/topic",
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("urn:ngsi-ld:Subscription:internal-{i}");
        let r = app.json(Method::POST, SUBS, &subscription(&id, uri)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{uri}: {}", r.body);
        assert_eq!(r.problem(), "BadRequestData", "{uri}");
        let detail = r.body["detail"].as_str().unwrap_or_default();
        assert!(
            detail.starts_with("notification endpoint ") && detail.contains("--allow-outbound"),
            "{uri}: {detail}"
        );
        assert_eq!(
            app.get(&format!("{SUBS}/{id}")).await.status,
            StatusCode::NOT_FOUND,
            "{uri} must not be stored"
        );
    }
    let r = app
        .json(
            Method::POST,
            SUBS,
            &subscription("urn:ngsi-ld:Subscription:meta", "http://169.254.169.254/"),
        )
        .await;
    assert!(
        r.body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("link-local")),
        "{}",
        r.body
    );

    // Public addresses, and names that do not resolve yet, are accepted.
    for (i, uri) in ["http://8.8.8.8/notify", "https://receiver.invalid/n"]
        .into_iter()
        .enumerate()
    {
        let id = format!("urn:ngsi-ld:Subscription:public-{i}");
        let r = app.json(Method::POST, SUBS, &subscription(&id, uri)).await;
        assert_eq!(r.status, StatusCode::CREATED, "{uri}: {}", r.body);
    }

    // An update cannot move an endpoint inside either.
    let url = format!("{SUBS}/urn:ngsi-ld:Subscription:public-0");
    let r = app
        .json(
            Method::PATCH,
            &url,
            &json!({"notification": {"endpoint": {"uri": "http://192.168.1.10/x"}}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert_eq!(
        app.get(&url).await.body["notification"]["endpoint"]["uri"],
        "http://8.8.8.8/notify"
    );
}

#[tokio::test]
async fn the_operator_allowlist_admits_internal_endpoints() {
    let app = TestApp::with_config(ApiConfig {
        outbound: "10.0.0.0/8, loopback".parse().unwrap(),
        ..ApiConfig::default()
    });
    for (i, uri) in [
        "http://10.0.0.1/x",
        "http://127.0.0.1:9/n",
        "mqtt://10.1.2.3/t",
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("urn:ngsi-ld:Subscription:allowed-{i}");
        let r = app.json(Method::POST, SUBS, &subscription(&id, uri)).await;
        assert_eq!(r.status, StatusCode::CREATED, "{uri}: {}", r.body);
    }
    let r = app
        .json(
            Method::POST,
            SUBS,
            &subscription("urn:ngsi-ld:Subscription:no", "http://192.168.0.1/x"),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_on_internal_addresses_are_not_fetched() {
    let (url, hits) = context_server().await;
    let body = json!({"id": "urn:ngsi-ld:Car:1", "type": "Car", "speed": 5});

    let guarded = TestApp::with_config(ApiConfig::default());
    let l = link(&url);
    let r = guarded
        .json_with(Method::POST, ENTITIES, &[("link", &l)], &body)
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(r.problem(), "LdContextNotAvailable");
    let detail = r.body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&url) && detail.contains("loopback range"),
        "{detail}"
    );
    // By name too (through the resolver), and inline in a JSON-LD body.
    let by_name = url.replace("127.0.0.1", "localhost");
    let l = link(&by_name);
    let r = guarded
        .json_with(Method::POST, ENTITIES, &[("link", &l)], &body)
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert!(
        r.body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("loopback")),
        "{}",
        r.body
    );
    let mut ld = body.clone();
    ld["@context"] = json!(url);
    let r = guarded
        .send(
            Method::POST,
            ENTITIES,
            &[("content-type", "application/ld+json")],
            Some(ld.to_string()),
        )
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    // A subscription's jsonldContext goes the same way.
    let mut s = subscription("urn:ngsi-ld:Subscription:ctx", "http://8.8.8.8/n");
    s["jsonldContext"] = json!(url);
    let r = guarded.json(Method::POST, SUBS, &s).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "nothing may reach the server"
    );

    // Allowed, the same context is fetched.
    let open = TestApp::with_config(test_config());
    let l = link(&url);
    let r = open
        .json_with(Method::POST, ENTITIES, &[("link", &l)], &body)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}
