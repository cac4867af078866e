//! Behaviours of ETSI GS CIM 009 that third-party clients and conformance
//! suites check: each test is one clause's expectation, taken literally.

use crate::common::{ENTITIES, TestApp};
use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

const SUBS: &str = "/ngsi-ld/v1/subscriptions";

fn link(url: &str) -> String {
    format!("<{url}>; rel=\"http://www.w3.org/ns/json-ld#context\"; type=\"application/ld+json\"")
}

async fn create(app: &TestApp, e: Value) {
    let r = app.json(Method::POST, ENTITIES, &e).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
}

fn entity(id: &str) -> String {
    format!("{ENTITIES}/{id}")
}

#[tokio::test]
async fn trailing_slashes_address_the_same_resource_everywhere() {
    let app = TestApp::new();
    create(
        &app,
        json!({"id": "urn:ngsi-ld:T:1", "type": "T", "v": {"type": "Property", "value": 1, "observedAt": "2026-01-01T00:00:00Z"}}),
    )
    .await;
    for path in [
        "/ngsi-ld/v1/entities/?type=T",
        "/ngsi-ld/v1/entities/urn:ngsi-ld:T:1/",
        "/ngsi-ld/v1/types/",
        "/ngsi-ld/v1/temporal/entities/?type=T",
        "/ngsi-ld/v1/temporal/entities/urn:ngsi-ld:T:1/",
        "/ngsi-ld/v1/subscriptions/",
        "/api/v1/history/retention/",
    ] {
        let r = app.get(path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
    }
}

#[tokio::test]
async fn merge_patch_media_type_and_ngsi_ld_null() {
    let app = TestApp::new();
    create(
        &app,
        json!({"id": "urn:ngsi-ld:T:2", "type": "T",
               "a": {"type": "Property", "value": 1},
               "b": {"type": "Property", "value": 2},
               "place": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [1, 2]}},
               "m": [{"type": "Property", "value": 1, "datasetId": "urn:ds:1"},
                     {"type": "Property", "value": 2, "datasetId": "urn:ds:2"}]}),
    )
    .await;
    let mp = [("content-type", "application/merge-patch+json")];
    // Update of attributes and of one attribute under merge-patch+json.
    let r = app
        .send(
            Method::PATCH,
            &format!("{}/attrs", entity("urn:ngsi-ld:T:2")),
            &mp,
            Some(json!({"a": {"type": "Property", "value": 10}}).to_string()),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let r = app
        .send(
            Method::PATCH,
            &format!("{}/attrs/b", entity("urn:ngsi-ld:T:2")),
            &mp,
            Some(json!({"value": 20}).to_string()),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    // NGSI-LD Null deletes a GeoProperty and one datasetId instance in a merge.
    let r = app
        .send(
            Method::PATCH,
            &entity("urn:ngsi-ld:T:2"),
            &mp,
            Some(
                json!({"place": "urn:ngsi-ld:null",
                       "m": {"type": "Property", "value": "urn:ngsi-ld:null", "datasetId": "urn:ds:1"}})
                .to_string(),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let e = app.get(&entity("urn:ngsi-ld:T:2")).await.body;
    assert_eq!(e["a"]["value"], 10);
    assert_eq!(e["b"]["value"], 20);
    assert!(e.get("place").is_none(), "{e}");
    assert_eq!(e["m"]["datasetId"], "urn:ds:2", "{e}");
    // A partial update cannot change an attribute's type.
    let r = app
        .json(
            Method::PATCH,
            &format!("{}/attrs/a", entity("urn:ngsi-ld:T:2")),
            &json!({"type": "Relationship", "object": "urn:x:1"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.problem(), "BadRequestData");
}

#[tokio::test]
async fn unknown_parameters_and_bad_option_values_are_invalid_requests() {
    let app = TestApp::new();
    create(&app, json!({"id": "urn:ngsi-ld:T:3", "type": "T"})).await;
    for path in [
        "/ngsi-ld/v1/types?colour=red",
        "/ngsi-ld/v1/subscriptions?colour=red",
        "/ngsi-ld/v1/entities?type=T&tpye=T",
        "/ngsi-ld/v1/entities?type=T&options=fast",
        "/ngsi-ld/v1/entities?type=T&format=xml",
        "/ngsi-ld/v1/entities/urn:ngsi-ld:T:3?join=deep",
    ] {
        let r = app.get(path).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(r.problem(), "InvalidRequest", "{path}");
    }
    let r = app
        .json(
            Method::POST,
            &format!("{ENTITIES}?type=T"),
            &json!({"id": "urn:ngsi-ld:T:4", "type": "T"}),
        )
        .await;
    assert_eq!(r.problem(), "InvalidRequest");
    assert!(r.body["detail"].as_str().unwrap().contains("'type'"));
    assert_eq!(
        app.get(&entity("urn:ngsi-ld:T:4")).await.status,
        StatusCode::NOT_FOUND,
        "a refused request changes nothing"
    );
    // An empty body is an invalid request too.
    let r = app
        .send(
            Method::POST,
            ENTITIES,
            &[("content-type", "application/json")],
            None,
        )
        .await;
    assert_eq!(r.problem(), "InvalidRequest");
    // Problem details are application/json unless asked for as problem+json.
    let r = app
        .get_with(
            "/ngsi-ld/v1/entities/urn:ngsi-ld:T:404",
            &[("accept", "application/json, application/problem+json")],
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
}

#[tokio::test]
async fn representation_options_and_projections() {
    let app = TestApp::new();
    create(
        &app,
        json!({"id": "urn:ngsi-ld:T:5", "type": "T",
               "temperature": {"type": "Property", "value": 21,
                               "accuracy": {"type": "Property", "value": 0.5},
                               "source": {"type": "Property", "value": "probe"}},
               "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [2, 48]}},
               "name": {"type": "LanguageProperty", "languageMap": {"en": "Hall", "fr": "Salle"}}}),
    )
    .await;
    let url = entity("urn:ngsi-ld:T:5");
    // `simplified` is keyValues.
    let r = app.get(&format!("{url}?options=simplified")).await;
    assert_eq!(r.body["temperature"], 21);
    // keyValues with sysAttrs shows the entity's timestamps.
    let r = app.get(&format!("{url}?options=keyValues,sysAttrs")).await;
    assert!(r.body["createdAt"].is_string(), "{}", r.body);
    assert!(r.body["modifiedAt"].is_string(), "{}", r.body);
    // lang=* keeps every language.
    let r = app.get(&format!("{url}?lang=*")).await;
    assert_eq!(r.body["name"]["languageMap"]["fr"], "Salle");
    // pick with nested sub-attributes; omit of one sub-attribute.
    let r = app
        .get(&format!("{url}?pick=id,temperature%7Baccuracy%7D"))
        .await;
    assert_eq!(
        r.body,
        json!({"id": "urn:ngsi-ld:T:5", "temperature": {"type": "Property", "value": 21,
               "accuracy": {"type": "Property", "value": 0.5}}})
    );
    let r = app
        .get(&format!("{url}?omit=temperature%7Bsource%7D,location,name"))
        .await;
    assert!(r.body["temperature"].get("source").is_none(), "{}", r.body);
    assert!(
        r.body["temperature"].get("accuracy").is_some(),
        "{}",
        r.body
    );
    assert!(r.body.get("location").is_none());
    // Selecting nothing that exists is not found.
    let r = app.get(&format!("{url}?attrs=humidity")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.problem(), "ResourceNotFound");
    let r = app.get(&format!("{url}?pick=humidity")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    for bad in [
        "pick=id;name",
        "pick=name%7B",
        "pick=name%7B%7D",
        "attrs=id,type",
    ] {
        let r = app.get(&format!("{url}?{bad}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(r.body["detail"].is_string());
    }
    // GeoJSON carries its @context in the body, for one entity and for a query.
    let geo = [("accept", "application/geo+json")];
    let r = app.get_with(&url, &geo).await;
    assert_eq!(r.body["type"], "Feature");
    assert!(r.body["@context"].is_string(), "{}", r.body);
    let r = app.get_with(&format!("{ENTITIES}?type=T"), &geo).await;
    assert_eq!(r.body["type"], "FeatureCollection");
    assert!(r.body["@context"].is_string(), "{}", r.body);
}

#[tokio::test]
async fn scope_is_updated_and_deleted_like_an_attribute() {
    let app = TestApp::new();
    create(
        &app,
        json!({"id": "urn:ngsi-ld:T:6", "type": "T", "scope": "/city/north"}),
    )
    .await;
    let url = entity("urn:ngsi-ld:T:6");
    let r = app
        .json(
            Method::PATCH,
            &format!("{url}/attrs"),
            &json!({"scope": "/city/south", "type": "Extra"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let e = app.get(&url).await.body;
    assert_eq!(e["scope"], "/city/south");
    assert_eq!(e["type"], json!(["T", "Extra"]));
    assert_eq!(
        app.delete(&format!("{url}/attrs/scope")).await.status,
        StatusCode::NO_CONTENT
    );
    assert!(app.get(&url).await.body.get("scope").is_none());
    assert_eq!(
        app.delete(&format!("{url}/attrs/scope")).await.status,
        StatusCode::NOT_FOUND
    );
    let r = app.json(Method::PATCH, &url, &json!({"scope": "/a"})).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app
        .json(Method::PATCH, &url, &json!({"scope": "urn:ngsi-ld:null"}))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(app.get(&url).await.body.get("scope").is_none());
}

#[tokio::test]
async fn linked_entities_join_flat_and_inline() {
    let app = TestApp::new();
    create(
        &app,
        json!({"id": "urn:ngsi-ld:Building:1", "type": "Building",
               "owner": {"type": "Relationship", "object": "urn:ngsi-ld:Person:1"}}),
    )
    .await;
    create(
        &app,
        json!({"id": "urn:ngsi-ld:Person:1", "type": "Person",
               "name": {"type": "Property", "value": "Ada"},
               "employer": {"type": "Relationship", "object": "urn:ngsi-ld:Company:1"}}),
    )
    .await;
    create(
        &app,
        json!({"id": "urn:ngsi-ld:Company:1", "type": "Company",
               "name": {"type": "Property", "value": "Acme"}}),
    )
    .await;
    let url = entity("urn:ngsi-ld:Building:1");
    let r = app.get(&format!("{url}?join=flat")).await;
    let ids: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["urn:ngsi-ld:Building:1", "urn:ngsi-ld:Person:1"]);
    let r = app.get(&format!("{url}?join=flat&joinLevel=2")).await;
    assert_eq!(r.body.as_array().unwrap().len(), 3, "{}", r.body);
    let r = app.get(&format!("{url}?join=inline&joinLevel=2")).await;
    assert_eq!(
        r.body["owner"]["entity"]["name"]["value"], "Ada",
        "{}",
        r.body
    );
    assert_eq!(
        r.body["owner"]["entity"]["employer"]["entity"]["name"]["value"],
        "Acme"
    );
    let r = app
        .get(&format!(
            "{ENTITIES}?type=Building&join=inline&options=keyValues"
        ))
        .await;
    assert_eq!(r.body[0]["owner"]["name"], "Ada", "{}", r.body);
    let r = app.get(&format!("{url}?join=flat&joinLevel=9")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn purge_and_the_minimal_query() {
    let app = TestApp::new();
    for i in 0..3 {
        create(
            &app,
            json!({"id": format!("urn:ngsi-ld:P:{i}"), "type": "P"}),
        )
        .await;
    }
    create(&app, json!({"id": "urn:ngsi-ld:Q:1", "type": "Q"})).await;
    // local=true alone lists every local entity.
    let r = app.get(&format!("{ENTITIES}?local=true")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.as_array().unwrap().len(), 4);
    assert_eq!(app.delete(ENTITIES).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        app.delete(&format!("{ENTITIES}?type=P")).await.status,
        StatusCode::NO_CONTENT
    );
    let r = app.get(&format!("{ENTITIES}?local=true")).await;
    assert_eq!(r.body.as_array().unwrap().len(), 1);
    assert_eq!(r.body[0]["id"], "urn:ngsi-ld:Q:1");
}

#[tokio::test]
async fn names_and_types_that_the_grammar_refuses() {
    let app = TestApp::new();
    for (body, what) in [
        (
            json!({"id": "urn:ngsi-ld:X:1", "type": "id"}),
            "keyword alias",
        ),
        (
            json!({"id": "urn:ngsi-ld:X:1", "type": "type"}),
            "keyword alias",
        ),
        (
            json!({"id": "urn:ngsi-ld:X:1", "type": "X", "@invalid": {"type": "Property", "value": 1}}),
            "reserved",
        ),
    ] {
        let r = app.json(Method::POST, ENTITIES, &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            r.body["detail"].as_str().unwrap().contains(what),
            "{}",
            r.body
        );
    }
    // A Link header together with a JSON-LD body is refused for the whole batch.
    let r = app
        .send(
            Method::POST,
            "/ngsi-ld/v1/entityOperations/create",
            &[
                ("content-type", "application/ld+json"),
                ("link", &link("https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.8.jsonld")),
            ],
            Some(
                json!([{"id": "urn:ngsi-ld:X:2", "type": "X",
                        "@context": "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.8.jsonld"}])
                .to_string(),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        app.get(&entity("urn:ngsi-ld:X:2")).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn compaction_falls_back_to_curies() {
    let app = TestApp::new();
    create(
        &app,
        json!({"id": "urn:ngsi-ld:C:1", "type": "C", "speed": {"type": "Property", "value": 3}}),
    )
    .await;
    // A context with its own vocabulary hides the default one: the
    // attribute comes back as a CURIE of the core context's prefix.
    let r = app
        .json(
            Method::POST,
            "/ngsi-ld/v1/jsonldContexts",
            &json!({"@context": {"@vocab": "https://example.org/terms/"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let l = link(r.header("location").unwrap());
    let r = app
        .get_with(&entity("urn:ngsi-ld:C:1"), &[("link", &l)])
        .await;
    assert_eq!(
        r.body["ngsi-ld:default-context/speed"]["value"], 3,
        "{}",
        r.body
    );
    assert_eq!(r.body["type"], "ngsi-ld:default-context/C");
}

#[tokio::test]
async fn subscriptions_as_clients_send_them() {
    let app = TestApp::new();
    let base = json!({"type": "Subscription", "entities": [{"type": "Monument"}],
                      "notification": {"endpoint": {"uri": "http://127.0.0.1:9/n"}}});
    let with = |extra: Value| {
        let mut b = base.clone();
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    // A percent-encoded q (ngsildclient) is decoded and kept decoded.
    let r = app
        .json(
            Method::POST,
            SUBS,
            &with(
                json!({"q": "name%3D%3D%22Eiffel%20Tower%22", "name": "legacy",
                         "datasetId": ["urn:ds:1", "@none"]}),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let id = r.header("location").unwrap().to_string();
    let r = app.get(&id).await;
    assert_eq!(r.body["q"], "name==\"Eiffel Tower\"");
    assert_eq!(r.body["name"], "legacy");
    assert!(
        r.header("link")
            .is_some_and(|l| l.contains("json-ld#context")),
        "GET /subscriptions/{{id}} names its context"
    );
    for bad in [
        json!({"q": "name==="}),
        json!({"datasetId": ["not a uri"]}),
        json!({"jsonldContext": 5}),
        json!({"jsonldContext": "not a uri"}),
        json!({"name": "a", "subscriptionName": "b"}),
    ] {
        let r = app.json(Method::POST, SUBS, &with(bad.clone())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.body);
    }
    // Pages of subscriptions link to each other.
    for _ in 0..2 {
        assert_eq!(
            app.json(Method::POST, SUBS, &base).await.status,
            StatusCode::CREATED
        );
    }
    let r = app.get(&format!("{SUBS}?limit=2")).await;
    assert_eq!(r.body.as_array().unwrap().len(), 2);
    let links = |r: &crate::common::Resp| -> Vec<String> {
        r.headers
            .get_all("link")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    };
    assert!(
        links(&r)
            .iter()
            .any(|l| l.contains("rel=\"next\"") && l.contains("offset=2")),
        "{:?}",
        links(&r)
    );
    let r = app
        .get(&format!("{SUBS}?limit=2&offset=2&count=true"))
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 1);
    assert_eq!(r.header("ngsild-results-count"), Some("3"));
    assert!(links(&r).iter().any(|l| l.contains("rel=\"prev\"")));
}
