//! Subscription management over HTTP: create, read, list, update, delete and
//! the errors of each. Delivery is tested against the real binary.

use crate::common::TestApp;
use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

const SUBS: &str = "/ngsi-ld/v1/subscriptions";

fn sub() -> Value {
    json!({
        "id": "urn:ngsi-ld:Subscription:parking",
        "type": "Subscription",
        "subscriptionName": "free spots",
        "entities": [{"type": "ParkingSpot"}],
        "watchedAttributes": ["status"],
        "q": "status==\"free\"",
        "notification": {"format": "keyValues", "attributes": ["status"],
                         "endpoint": {"uri": "http://127.0.0.1:9/notify", "accept": "application/json"}},
        "throttling": 1
    })
}

#[tokio::test]
async fn create_read_list_update_delete() {
    let app = TestApp::new();
    let r = app.json(Method::POST, SUBS, &sub()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(
        r.header("location"),
        Some("/ngsi-ld/v1/subscriptions/urn:ngsi-ld:Subscription:parking")
    );
    let url = format!("{SUBS}/urn:ngsi-ld:Subscription:parking");
    let r = app.get(&url).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["id"], "urn:ngsi-ld:Subscription:parking");
    assert_eq!(r.body["status"], "active");
    assert_eq!(r.body["q"], "status==\"free\"");
    assert_eq!(r.body["notification"]["timesSent"], 0);
    assert_eq!(
        r.body["notification"]["endpoint"]["uri"],
        "http://127.0.0.1:9/notify"
    );

    let r = app.json(Method::POST, SUBS, &sub()).await;
    assert_eq!(r.status, StatusCode::CONFLICT);

    let mut other = sub();
    other.as_object_mut().unwrap().remove("id");
    let r = app.json(Method::POST, SUBS, &other).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = app.get(&format!("{SUBS}?count=true")).await;
    assert_eq!(r.body.as_array().unwrap().len(), 2);
    assert_eq!(r.header("ngsild-results-count"), Some("2"));

    let r = app
        .json(
            Method::PATCH,
            &url,
            &json!({"isActive": false, "throttling": null, "description": "paused for works"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let r = app.get(&url).await;
    assert_eq!(r.body["status"], "paused");
    assert!(r.body.get("throttling").is_none());
    assert_eq!(r.body["description"], "paused for works");

    let r = app
        .json(Method::PATCH, &url, &json!({"timeInterval": 5}))
        .await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "timeInterval with watchedAttributes: {}",
        r.body
    );
    assert_eq!(
        app.get(&url).await.body["status"],
        "paused",
        "a refused update changes nothing"
    );

    let r = app
        .get_with(&url, &[("accept", "application/ld+json")])
        .await;
    assert!(
        r.body["@context"]
            .as_str()
            .unwrap()
            .contains("core-context")
    );

    assert_eq!(app.delete(&url).await.status, StatusCode::NO_CONTENT);
    assert_eq!(app.get(&url).await.status, StatusCode::NOT_FOUND);
    assert_eq!(app.delete(&url).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn invalid_subscriptions_are_400_and_change_nothing() {
    let app = TestApp::new();
    type Change = Box<dyn Fn(&mut Value)>;
    let variants: Vec<(Change, &str)> = vec![
        (
            Box::new(|v| v["notification"]["format"] = json!("xml")),
            "format",
        ),
        (Box::new(|v| v["q"] = json!("status=>1")), "position"),
        (
            Box::new(|v| {
                v["timeInterval"] = json!(10);
                v.as_object_mut().unwrap().remove("watchedAttributes");
            }),
            "exclude",
        ),
        (
            Box::new(|v| v["expiresAt"] = json!("2001-01-01T00:00:00Z")),
            "past",
        ),
        (
            Box::new(|v| v["notification"]["endpoint"]["uri"] = json!("ftp://x.org/n")),
            "scheme",
        ),
        (
            Box::new(
                |v| v["geoQ"] = json!({"georel": "within", "geometry": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]}),
            ),
            "closed",
        ),
        (
            Box::new(|v| v["type"] = json!("Subscriptions")),
            "Subscription",
        ),
        (
            Box::new(|v| v["watchedAttributes"] = json!([])),
            "watchedAttributes",
        ),
        (Box::new(|v| v["id"] = json!("not a uri")), "URI"),
    ];
    for (change, word) in variants {
        let mut body = sub();
        change(&mut body);
        let r = app.json(Method::POST, SUBS, &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.body);
        assert_eq!(r.problem(), "BadRequestData");
        assert!(
            r.body["detail"].as_str().unwrap().contains(word),
            "{body}: {}",
            r.body["detail"]
        );
    }
    assert_eq!(app.get(SUBS).await.body, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_of_a_subscription_are_all_kept() {
    let app = TestApp::new();
    let url = format!("{SUBS}/urn:ngsi-ld:Subscription:parking");
    for round in 0..10 {
        let r = app.json(Method::POST, SUBS, &sub()).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        // Four clients change four different members at the same time.
        let patches = [
            json!({"description": format!("round {round}")}),
            json!({"q": "status==\"occupied\""}),
            json!({"watchedAttributes": ["category"]}),
            json!({"throttling": 7}),
        ];
        let (a, b, c, d) = tokio::join!(
            app.json(Method::PATCH, &url, &patches[0]),
            app.json(Method::PATCH, &url, &patches[1]),
            app.json(Method::PATCH, &url, &patches[2]),
            app.json(Method::PATCH, &url, &patches[3]),
        );
        for r in [a, b, c, d] {
            assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
        }
        let r = app.get(&url).await;
        assert_eq!(r.body["description"], format!("round {round}"));
        assert_eq!(r.body["q"], "status==\"occupied\"");
        assert_eq!(r.body["watchedAttributes"], json!(["category"]));
        assert_eq!(r.body["throttling"], 7);
        assert_eq!(app.delete(&url).await.status, StatusCode::NO_CONTENT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_racing_a_deletion_never_brings_the_subscription_back() {
    let app = TestApp::new();
    let url = format!("{SUBS}/urn:ngsi-ld:Subscription:parking");
    for _ in 0..20 {
        let r = app.json(Method::POST, SUBS, &sub()).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        let patch = json!({"throttling": 9});
        let (patched, deleted) =
            tokio::join!(app.json(Method::PATCH, &url, &patch), app.delete(&url));
        assert_eq!(deleted.status, StatusCode::NO_CONTENT);
        assert!(
            [StatusCode::NO_CONTENT, StatusCode::NOT_FOUND].contains(&patched.status),
            "{}",
            patched.body
        );
        assert_eq!(app.get(&url).await.status, StatusCode::NOT_FOUND);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_creations_of_one_id_at_once_create_one() {
    let app = TestApp::new();
    for round in 0..10 {
        let id = format!("urn:ngsi-ld:Subscription:twice:{round}");
        let mut body = sub();
        body["id"] = json!(id);
        let (a, b) = tokio::join!(
            app.json(Method::POST, SUBS, &body),
            app.json(Method::POST, SUBS, &body),
        );
        let mut statuses = [a.status, b.status];
        statuses.sort();
        assert_eq!(statuses, [StatusCode::CREATED, StatusCode::CONFLICT]);
    }
}
