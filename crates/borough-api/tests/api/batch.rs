use crate::common::TestApp;
use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

const OPS: &str = "/ngsi-ld/v1/entityOperations";

fn e(i: u32, v: i64) -> Value {
    json!({"id": format!("urn:ngsi-ld:Bin:{i}"), "type": "WasteContainer", "fillingLevel": {"type": "Property", "value": v}})
}

async fn level(app: &TestApp, i: u32) -> Value {
    app.get(&format!("/ngsi-ld/v1/entities/urn:ngsi-ld:Bin:{i}"))
        .await
        .body["fillingLevel"]["value"]
        .clone()
}

#[tokio::test]
async fn batch_create_reports_each_entity() {
    let app = TestApp::new();
    let r = app
        .json(
            Method::POST,
            &format!("{OPS}/create"),
            &json!([e(1, 10), e(2, 20)]),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.body, json!(["urn:ngsi-ld:Bin:1", "urn:ngsi-ld:Bin:2"]));

    let r = app
        .json(
            Method::POST,
            &format!("{OPS}/create"),
            &json!([e(1, 99), e(3, 30), {"id": "bad id", "type": "X"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::MULTI_STATUS);
    assert_eq!(r.body["success"], json!(["urn:ngsi-ld:Bin:3"]));
    let errors = r.body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2);
    assert_eq!(errors[0]["entityId"], "urn:ngsi-ld:Bin:1");
    assert!(
        errors[0]["error"]["type"]
            .as_str()
            .unwrap()
            .ends_with("AlreadyExists")
    );
    assert_eq!(errors[1]["entityId"], "bad id");
    assert!(
        errors[1]["error"]["type"]
            .as_str()
            .unwrap()
            .ends_with("BadRequestData")
    );
    assert_eq!(
        level(&app, 1).await,
        10,
        "the failed create left the first version"
    );
    assert_eq!(level(&app, 3).await, 30);
}

#[tokio::test]
async fn batch_upsert_creates_updates_and_replaces() {
    let app = TestApp::new();
    let r = app
        .json(Method::POST, &format!("{OPS}/upsert"), &json!([e(1, 10)]))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.body, json!(["urn:ngsi-ld:Bin:1"]));

    let mut with_extra = e(1, 11);
    with_extra["temperature"] = json!({"type": "Property", "value": 4});
    let r = app
        .json(Method::POST, &format!("{OPS}/upsert"), &json!([with_extra]))
        .await;
    assert_eq!(
        r.status,
        StatusCode::NO_CONTENT,
        "all updated, none created"
    );
    assert_eq!(level(&app, 1).await, 11);

    // update (default) keeps attributes not in the body; replace drops them.
    let r = app
        .json(
            Method::POST,
            &format!("{OPS}/upsert?options=update"),
            &json!([e(1, 12), e(2, 1)]),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.body, json!(["urn:ngsi-ld:Bin:2"]));
    let ent = app.get("/ngsi-ld/v1/entities/urn:ngsi-ld:Bin:1").await.body;
    assert_eq!(ent["temperature"]["value"], 4);
    let r = app
        .json(
            Method::POST,
            &format!("{OPS}/upsert?options=replace"),
            &json!([e(1, 13)]),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let ent = app.get("/ngsi-ld/v1/entities/urn:ngsi-ld:Bin:1").await.body;
    assert!(ent.get("temperature").is_none());
    assert_eq!(ent["fillingLevel"]["value"], 13);

    let r = app
        .json(
            Method::POST,
            &format!("{OPS}/upsert?options=sideways"),
            &json!([e(1, 13)]),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn batch_update_merge_and_delete() {
    let app = TestApp::new();
    app.json(
        Method::POST,
        &format!("{OPS}/create"),
        &json!([e(1, 10), e(2, 20)]),
    )
    .await;

    let r = app
        .json(
            Method::POST,
            &format!("{OPS}/update"),
            &json!([
            {"id": "urn:ngsi-ld:Bin:1", "fillingLevel": {"type": "Property", "value": 15}},
            {"id": "urn:ngsi-ld:Bin:404", "fillingLevel": {"type": "Property", "value": 1}}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::MULTI_STATUS);
    assert_eq!(r.body["success"], json!(["urn:ngsi-ld:Bin:1"]));
    assert!(
        r.body["errors"][0]["error"]["type"]
            .as_str()
            .unwrap()
            .ends_with("ResourceNotFound")
    );
    assert_eq!(level(&app, 1).await, 15);

    let r = app
        .json(
            Method::POST,
            &format!("{OPS}/update?options=noOverwrite"),
            &json!([
            {"id": "urn:ngsi-ld:Bin:1", "fillingLevel": {"type": "Property", "value": 99}}]),
        )
        .await;
    // An attribute left as it was is reported: 207 with the entity in errors.
    assert_eq!(r.status, StatusCode::MULTI_STATUS, "{}", r.body);
    assert_eq!(r.body["success"], json!([]));
    assert_eq!(r.body["errors"][0]["entityId"], "urn:ngsi-ld:Bin:1");
    assert!(
        r.body["errors"][0]["error"]["detail"]
            .as_str()
            .unwrap()
            .contains("fillingLevel"),
        "{}",
        r.body
    );
    assert_eq!(
        level(&app, 1).await,
        15,
        "noOverwrite keeps the existing value"
    );

    let r = app
        .json(
            Method::POST,
            &format!("{OPS}/merge"),
            &json!([
            {"id": "urn:ngsi-ld:Bin:2", "fillingLevel": {"value": 25}, "status": "ok"}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    assert_eq!(level(&app, 2).await, 25);

    let r = app
        .json(
            Method::POST,
            &format!("{OPS}/delete"),
            &json!(["urn:ngsi-ld:Bin:1", "urn:ngsi-ld:Bin:404"]),
        )
        .await;
    assert_eq!(r.status, StatusCode::MULTI_STATUS);
    assert_eq!(r.body["success"], json!(["urn:ngsi-ld:Bin:1"]));
    assert_eq!(r.body["errors"][0]["entityId"], "urn:ngsi-ld:Bin:404");
    assert_eq!(
        app.get("/ngsi-ld/v1/entities/urn:ngsi-ld:Bin:1")
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    let r = app
        .json(
            Method::POST,
            &format!("{OPS}/delete"),
            &json!(["urn:ngsi-ld:Bin:2"]),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn batch_body_must_be_a_bounded_array() {
    let app = TestApp::new();
    let r = app
        .json(
            Method::POST,
            &format!("{OPS}/create"),
            &json!({"id": "urn:a"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.problem(), "BadRequestData");
    let r = app
        .json(Method::POST, &format!("{OPS}/create"), &json!([]))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let many: Vec<Value> = (0..10_001).map(|i| e(i, 1)).collect();
    let r = app
        .json(Method::POST, &format!("{OPS}/create"), &Value::Array(many))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body["detail"].as_str().unwrap().contains("at most"));
    assert_eq!(
        app.get("/ngsi-ld/v1/entities/urn:ngsi-ld:Bin:1")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
}
