use crate::common::{ENTITIES, TestApp};
use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

fn vehicle() -> Value {
    json!({
        "id": "urn:ngsi-ld:Vehicle:A1",
        "type": "Vehicle",
        "speed": {"type": "Property", "value": 80, "unitCode": "KMH", "observedAt": "2024-05-01T10:00:00.000Z",
                  "accuracy": {"type": "Property", "value": 0.95}},
        "owner": {"type": "Relationship", "object": "urn:ngsi-ld:Person:P1"},
        "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [2.35, 48.85]}},
        "name": {"type": "LanguageProperty", "languageMap": {"en": "Bus", "fr": "Autobus"}},
        "category": {"type": "VocabProperty", "vocab": "municipal"},
        "config": {"type": "JsonProperty", "json": {"doors": 3}},
        "stops": {"type": "ListProperty", "valueList": ["a", "b"]},
        "drivers": {"type": "ListRelationship", "objectList": [{"object": "urn:ngsi-ld:Person:P2"}]},
        "temperature": [
            {"type": "Property", "value": 20},
            {"type": "Property", "value": 35, "datasetId": "urn:ngsi-ld:Dataset:engine"}
        ]
    })
}

const A1: &str = "/ngsi-ld/v1/entities/urn:ngsi-ld:Vehicle:A1";

async fn app_with_vehicle() -> TestApp {
    let app = TestApp::new();
    let r = app.json(Method::POST, ENTITIES, &vehicle()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    app
}

#[tokio::test]
async fn create_then_retrieve_returns_what_was_written() {
    let app = TestApp::new();
    let r = app.json(Method::POST, ENTITIES, &vehicle()).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.header("location"), Some(A1));
    let r = app.get(A1).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, vehicle());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.header("link").unwrap().contains("ngsi-ld-core-context"));
}

#[tokio::test]
async fn retrieve_options_and_representations() {
    let app = app_with_vehicle().await;

    let kv = app.get(&format!("{A1}?options=keyValues")).await.body;
    assert_eq!(kv["speed"], json!(80));
    assert_eq!(kv["owner"], json!("urn:ngsi-ld:Person:P1"));
    assert_eq!(kv["location"]["type"], "Point");
    assert_eq!(kv["category"], "municipal");

    let concise = app.get(&format!("{A1}?options=concise")).await.body;
    assert!(concise["owner"].get("type").is_none());
    assert_eq!(concise["owner"]["object"], "urn:ngsi-ld:Person:P1");
    assert_eq!(concise["speed"]["value"], 80);

    let sys = app.get(&format!("{A1}?options=sysAttrs")).await.body;
    assert!(sys["createdAt"].as_str().unwrap().ends_with('Z'));
    assert!(sys["speed"]["modifiedAt"].is_string());

    let picked = app.get(&format!("{A1}?attrs=speed,owner")).await.body;
    let keys: Vec<&str> = picked
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["id", "type", "speed", "owner"]);

    let ld = app.get_with(A1, &[("accept", "application/ld+json")]).await;
    assert_eq!(ld.header("content-type"), Some("application/ld+json"));
    assert!(
        ld.body["@context"]
            .as_str()
            .unwrap()
            .contains("ngsi-ld-core-context")
    );
    assert!(ld.header("link").is_none());

    let geo = app
        .get_with(A1, &[("accept", "application/geo+json")])
        .await;
    assert_eq!(geo.header("content-type"), Some("application/geo+json"));
    assert_eq!(geo.body["type"], "Feature");
    assert_eq!(geo.body["geometry"]["coordinates"], json!([2.35, 48.85]));
    assert_eq!(geo.body["properties"]["speed"]["value"], 80);

    let bad = app.get(&format!("{A1}?options=keyValues,concise")).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let bad = app.get(&format!("{A1}?options=fancy")).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.body["detail"].as_str().unwrap().contains("fancy"));
}

#[tokio::test]
async fn replace_entity_swaps_all_attributes() {
    let app = app_with_vehicle().await;
    let r = app
        .json(
            Method::PUT,
            A1,
            &json!({"type": "Vehicle", "speed": {"type": "Property", "value": 10}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let e = app.get(A1).await.body;
    assert_eq!(
        e,
        json!({"id": "urn:ngsi-ld:Vehicle:A1", "type": "Vehicle", "speed": {"type": "Property", "value": 10}})
    );
    let r = app
        .json(
            Method::PUT,
            A1,
            &json!({"id": "urn:ngsi-ld:Vehicle:OTHER", "type": "Vehicle"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = app
        .json(
            Method::PUT,
            "/ngsi-ld/v1/entities/urn:ngsi-ld:Vehicle:none",
            &json!({"type": "Vehicle"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn merge_patch_changes_only_what_it_names() {
    let app = app_with_vehicle().await;
    let r = app
        .send(
            Method::PATCH,
            A1,
            &[("content-type", "application/merge-patch+json")],
            Some(json!({"speed": {"value": 55}, "owner": null, "color": "red"}).to_string()),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let e = app.get(A1).await.body;
    assert_eq!(e["speed"]["value"], 55);
    assert_eq!(e["speed"]["unitCode"], "KMH", "unmentioned members stay");
    assert_eq!(e["speed"]["accuracy"]["value"], 0.95);
    assert!(e.get("owner").is_none(), "null removes");
    assert_eq!(e["color"], json!({"type": "Property", "value": "red"}));
    assert_eq!(e["name"], vehicle()["name"]);
}

#[tokio::test]
async fn append_attributes_with_and_without_no_overwrite() {
    let app = app_with_vehicle().await;
    let attrs = format!("{A1}/attrs");
    let body = json!({"speed": {"type": "Property", "value": 1}, "fuel": {"type": "Property", "value": 40}});
    let r = app
        .json(Method::POST, &format!("{attrs}?options=noOverwrite"), &body)
        .await;
    assert_eq!(r.status, StatusCode::MULTI_STATUS);
    assert_eq!(r.body["updated"], json!(["fuel"]));
    assert_eq!(r.body["notUpdated"][0]["attributeName"], "speed");
    assert_eq!(app.get(A1).await.body["speed"]["value"], 80);

    let r = app.json(Method::POST, &attrs, &body).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        app.get(A1).await.body["speed"],
        json!({"type": "Property", "value": 1})
    );
}

#[tokio::test]
async fn update_attributes_reports_the_ones_that_do_not_exist() {
    let app = app_with_vehicle().await;
    let attrs = format!("{A1}/attrs");
    let r = app
        .json(Method::PATCH, &attrs, &json!({"speed": {"type": "Property", "value": 2}, "ghost": {"type": "Property", "value": 1}}))
        .await;
    assert_eq!(r.status, StatusCode::MULTI_STATUS, "{}", r.body);
    assert_eq!(r.body["updated"], json!(["speed"]));
    assert_eq!(r.body["notUpdated"][0]["attributeName"], "ghost");
    let e = app.get(A1).await.body;
    assert_eq!(e["speed"]["value"], 2);
    assert!(e.get("ghost").is_none());

    let r = app
        .json(
            Method::PATCH,
            &attrs,
            &json!({"speed": {"type": "Property", "value": 3}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn partial_attribute_update_and_replace_attribute() {
    let app = app_with_vehicle().await;
    let speed = format!("{A1}/attrs/speed");
    let r = app.json(Method::PATCH, &speed, &json!({"value": 99})).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let e = app.get(A1).await.body;
    assert_eq!(e["speed"]["value"], 99);
    assert_eq!(e["speed"]["unitCode"], "KMH");

    let r = app
        .json(
            Method::PUT,
            &speed,
            &json!({"type": "Property", "value": 7}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        app.get(A1).await.body["speed"],
        json!({"type": "Property", "value": 7})
    );

    let r = app
        .json(
            Method::PATCH,
            &format!("{A1}/attrs/ghost"),
            &json!({"value": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.problem(), "ResourceNotFound");

    // A targeted instance of a multi-instance attribute.
    let r = app
        .json(
            Method::PATCH,
            &format!("{A1}/attrs/temperature"),
            &json!({"value": 40, "datasetId": "urn:ngsi-ld:Dataset:engine"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let t = app.get(A1).await.body["temperature"].clone();
    assert_eq!(t[0]["value"], 20);
    assert_eq!(t[1]["value"], 40);
}

#[tokio::test]
async fn delete_attribute_by_dataset_id_default_and_all() {
    let app = app_with_vehicle().await;
    let temp = format!("{A1}/attrs/temperature");
    let r = app
        .delete(&format!("{temp}?datasetId=urn:ngsi-ld:Dataset:engine"))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        app.get(A1).await.body["temperature"],
        json!({"type": "Property", "value": 20})
    );
    let r = app
        .delete(&format!("{temp}?datasetId=urn:ngsi-ld:Dataset:engine"))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let r = app.delete(&format!("{A1}/attrs/speed")).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(app.get(A1).await.body.get("speed").is_none());

    // deleteAll removes every instance.
    let r = app
        .json(
            Method::POST,
            &format!("{A1}/attrs"),
            &json!({"temperature": [
            {"type": "Property", "value": 1, "datasetId": "urn:d:1"},
            {"type": "Property", "value": 2, "datasetId": "urn:d:2"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    assert_eq!(
        app.get(A1).await.body["temperature"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let r = app.delete(&format!("{temp}?deleteAll=true")).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(app.get(A1).await.body.get("temperature").is_none());
}

#[tokio::test]
async fn delete_entity() {
    let app = app_with_vehicle().await;
    assert_eq!(app.delete(A1).await.status, StatusCode::NO_CONTENT);
    let r = app.get(A1).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.problem(), "ResourceNotFound");
    assert_eq!(app.delete(A1).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn concise_input_is_accepted() {
    let app = TestApp::new();
    let body = json!({"id": "urn:ngsi-ld:Lamp:1", "type": "Streetlight", "status": "on",
        "powerState": {"value": "on", "observedAt": "2024-01-01T00:00:00.000Z"},
        "location": {"type": "Point", "coordinates": [2.0, 48.0]},
        "refPole": {"object": "urn:ngsi-ld:Pole:9"}});
    assert_eq!(
        app.json(Method::POST, ENTITIES, &body).await.status,
        StatusCode::CREATED
    );
    let e = app
        .get("/ngsi-ld/v1/entities/urn:ngsi-ld:Lamp:1")
        .await
        .body;
    assert_eq!(e["status"], json!({"type": "Property", "value": "on"}));
    assert_eq!(e["location"]["type"], "GeoProperty");
    assert_eq!(e["refPole"]["type"], "Relationship");
    let concise = app
        .get("/ngsi-ld/v1/entities/urn:ngsi-ld:Lamp:1?options=concise")
        .await
        .body;
    assert_eq!(concise, body);
}

#[tokio::test]
async fn system_times_move_on_update_and_created_at_stays() {
    let app = app_with_vehicle().await;
    let before = app.get(&format!("{A1}?options=sysAttrs")).await.body;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    app.json(
        Method::PATCH,
        &format!("{A1}/attrs/speed"),
        &json!({"value": 1}),
    )
    .await;
    let after = app.get(&format!("{A1}?options=sysAttrs")).await.body;
    assert_eq!(before["createdAt"], after["createdAt"]);
    assert_eq!(before["speed"]["createdAt"], after["speed"]["createdAt"]);
    assert_ne!(before["speed"]["modifiedAt"], after["speed"]["modifiedAt"]);
    assert_ne!(before["modifiedAt"], after["modifiedAt"]);
}

#[tokio::test]
async fn trailing_slashes_address_the_same_collections() {
    let app = TestApp::new();
    let e =
        json!({"id": "urn:ngsi-ld:T:slash", "type": "T", "p": {"type": "Property", "value": 1}});
    let r = app.json(Method::POST, "/ngsi-ld/v1/entities/", &e).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = app
        .json(
            Method::POST,
            "/ngsi-ld/v1/entityOperations/upsert/?options=update",
            &json!([{"id": "urn:ngsi-ld:T:slash", "type": "T", "p": {"type": "Property", "value": 2}}]),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    let r = app.get("/ngsi-ld/v1/entities/?type=T").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body[0]["p"]["value"], json!(2));
    let r = app.get("/ngsi-ld/v1/types/").await;
    assert_eq!(r.body["typeList"], json!(["T"]));
}

#[tokio::test]
async fn ngsi_ld_null_in_a_merge_patch_deletes_the_attribute() {
    let app = TestApp::new();
    let e = json!({"id": "urn:ngsi-ld:T:n", "type": "T",
        "p": {"type": "Property", "value": 1},
        "q": [{"type": "Property", "value": 1}, {"type": "Property", "value": 2, "datasetId": "urn:d:2"}]});
    assert_eq!(
        app.json(Method::POST, "/ngsi-ld/v1/entities", &e)
            .await
            .status,
        StatusCode::CREATED
    );
    let r = app
        .send(
            Method::PATCH,
            "/ngsi-ld/v1/entities/urn:ngsi-ld:T:n",
            &[("content-type", "application/merge-patch+json")],
            Some(json!({"p": "urn:ngsi-ld:null", "q": {"value": "urn:ngsi-ld:null", "datasetId": "urn:d:2"}}).to_string()),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    let r = app.get("/ngsi-ld/v1/entities/urn:ngsi-ld:T:n").await;
    assert!(r.body.get("p").is_none(), "{}", r.body);
    assert_eq!(r.body["q"]["value"], json!(1));
    assert!(r.body["q"].get("datasetId").is_none());
    // A null cannot create an attribute: 400, nothing changed.
    let r = app
        .json(
            Method::POST,
            "/ngsi-ld/v1/entities",
            &json!({"id": "urn:ngsi-ld:T:m", "type": "T", "p": "urn:ngsi-ld:null"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.problem(), "BadRequestData");
    assert_eq!(
        app.get("/ngsi-ld/v1/entities/urn:ngsi-ld:T:m").await.status,
        StatusCode::NOT_FOUND
    );
}
