//! Querying entities: filters, projection, representations, paging and errors,
//! plus type and attribute discovery.

use crate::common::{ENTITIES, TestApp};
use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

async fn city() -> TestApp {
    let app = TestApp::new();
    let mut batch = Vec::new();
    for i in 0..30 {
        batch.push(json!({
            "id": format!("urn:ngsi-ld:ParkingSpot:{i:03}"),
            "type": "ParkingSpot",
            "scope": if i < 10 { "/city/north" } else { "/city/south" },
            "status": {"type": "Property", "value": if i % 3 == 0 { "free" } else { "occupied" }},
            "occupancy": {"type": "Property", "value": i, "unitCode": "P1"},
            "name": {"type": "LanguageProperty", "languageMap": {"en": format!("Spot {i}"), "fr": format!("Place {i}")}},
            "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [2.0 + f64::from(i) / 100.0, 48.0]}},
            "temperature": [
                {"type": "Property", "value": 10 + i},
                {"type": "Property", "value": 50 + i, "datasetId": "urn:ngsi-ld:Dataset:sensor"}
            ]
        }));
    }
    for i in 0..5 {
        batch.push(json!({
            "id": format!("urn:ngsi-ld:Streetlight:{i}"),
            "type": "Streetlight",
            "powerState": if i == 2 { "off" } else { "on" },
            "refPole": {"type": "Relationship", "object": format!("urn:ngsi-ld:Pole:{i}")}
        }));
    }
    let r = app
        .json(
            Method::POST,
            "/ngsi-ld/v1/entityOperations/create",
            &Value::Array(batch),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    app
}

fn ids(body: &Value) -> Vec<String> {
    body.as_array()
        .unwrap_or_else(|| panic!("expected an array, got {body}"))
        .iter()
        .map(|e| {
            e["id"]
                .as_str()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn by_type_in_id_order_with_default_page() {
    let app = city().await;
    let r = app.get(&format!("{ENTITIES}?type=ParkingSpot")).await;
    assert_eq!(r.status, StatusCode::OK);
    let got = ids(&r.body);
    assert_eq!(got.len(), 20, "default limit");
    assert_eq!(got[0], "000");
    assert_eq!(got[19], "019");
    assert!(r.header("link").unwrap().contains("ngsi-ld-core-context"));
    let r = app.get(&format!("{ENTITIES}?type=Streetlight,Bus")).await;
    assert_eq!(ids(&r.body), ["0", "1", "2", "3", "4"]);
    let r = app.get(&format!("{ENTITIES}?type=Nothing")).await;
    assert_eq!(r.body, json!([]));
}

#[tokio::test]
async fn pagination_with_count_and_links() {
    let app = city().await;
    let r = app
        .get(&format!(
            "{ENTITIES}?type=ParkingSpot&limit=7&offset=14&count=true"
        ))
        .await;
    assert_eq!(
        ids(&r.body),
        ["014", "015", "016", "017", "018", "019", "020"]
    );
    assert_eq!(r.header("ngsild-results-count"), Some("30"));
    let links: Vec<&str> = r
        .headers
        .get_all("link")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(
        links
            .iter()
            .any(|l| l.contains("offset=21&limit=7") && l.contains("rel=\"next\"")),
        "{links:?}"
    );
    assert!(
        links
            .iter()
            .any(|l| l.contains("offset=7&limit=7") && l.contains("rel=\"prev\"")),
        "{links:?}"
    );
    assert!(links.iter().any(|l| l.contains("type=ParkingSpot")));
    // The links are usable as they are: the full path, and they lead to the next page.
    let next = links
        .iter()
        .find(|l| l.contains("rel=\"next\""))
        .and_then(|l| l.strip_prefix('<'))
        .and_then(|l| l.split('>').next())
        .unwrap();
    assert!(next.starts_with("/ngsi-ld/v1/entities?"), "{next}");
    let page = app.get(next).await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.body[0]["id"], "urn:ngsi-ld:ParkingSpot:021");

    // The last page has no next link; past the end is an empty page.
    let r = app
        .get(&format!("{ENTITIES}?type=ParkingSpot&limit=10&offset=20"))
        .await;
    assert_eq!(ids(&r.body).len(), 10);
    let links: Vec<&str> = r
        .headers
        .get_all("link")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(
        !links.iter().any(|l| l.contains("rel=\"next\"")),
        "{links:?}"
    );
    let r = app
        .get(&format!("{ENTITIES}?type=ParkingSpot&offset=100"))
        .await;
    assert_eq!(r.body, json!([]));

    let r = app
        .get(&format!("{ENTITIES}?type=ParkingSpot&limit=0&count=true"))
        .await;
    assert_eq!(r.body, json!([]));
    assert_eq!(r.header("ngsild-results-count"), Some("30"));
}

#[tokio::test]
async fn q_filters() {
    let app = city().await;
    let cases = [
        ("occupancy>26", vec!["027", "028", "029"]),
        ("occupancy==3..5;status==\"free\"", vec!["003"]),
        ("occupancy<2|occupancy==29", vec!["000", "001", "029"]),
        (
            "status==\"free\";(occupancy<4|occupancy>26)",
            vec!["000", "003", "027"],
        ),
        ("occupancy==1,2,28", vec!["001", "002", "028"]),
        ("name~=Place 1[12]", vec!["011", "012"]),
        (
            "occupancy.unitCode==\"P1\";occupancy>=28",
            vec!["028", "029"],
        ),
        ("temperature==58", vec!["008"]),
        ("temperature>=78", vec!["028", "029"]),
        ("temperature<11", vec!["000"]),
    ];
    for (q, expected) in cases {
        let enc: String = q
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"=.:".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let r = app
            .get(&format!("{ENTITIES}?type=ParkingSpot&q={enc}"))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{q}: {}", r.body);
        assert_eq!(ids(&r.body), expected, "{q}");
    }
    let r = app
        .get(&format!("{ENTITIES}?q=powerState==%22off%22"))
        .await;
    assert_eq!(ids(&r.body), ["2"]);
    let r = app
        .get(&format!("{ENTITIES}?q=refPole==urn:ngsi-ld:Pole:3"))
        .await;
    assert_eq!(ids(&r.body), ["3"]);
}

#[tokio::test]
async fn ids_patterns_attrs_and_scopes() {
    let app = city().await;
    let r = app
        .get(&format!(
            "{ENTITIES}?id=urn:ngsi-ld:Streetlight:4,urn:ngsi-ld:ParkingSpot:002"
        ))
        .await;
    assert_eq!(ids(&r.body), ["002", "4"]);
    let r = app
        .get(&format!("{ENTITIES}?idPattern=Spot:00%5B5-7%5D$"))
        .await;
    assert_eq!(ids(&r.body), ["005", "006", "007"]);
    let r = app.get(&format!("{ENTITIES}?attrs=refPole")).await;
    assert_eq!(
        ids(&r.body).len(),
        5,
        "attrs selects entities that have one of them"
    );
    let keys: Vec<&String> = r.body[0].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["id", "type", "refPole"], "and projects onto them");
    let r = app
        .get(&format!(
            "{ENTITIES}?type=ParkingSpot&scopeQ=/city/north&count=true"
        ))
        .await;
    assert_eq!(r.header("ngsild-results-count"), Some("10"));
    let r = app
        .get(&format!("{ENTITIES}?scopeQ=/city/%23&count=true&limit=1"))
        .await;
    assert_eq!(r.header("ngsild-results-count"), Some("30"));
}

#[tokio::test]
async fn projection_language_and_datasets() {
    let app = city().await;
    let base = format!("{ENTITIES}?id=urn:ngsi-ld:ParkingSpot:001");
    let r = app.get(&format!("{base}&pick=id,status")).await;
    assert_eq!(
        r.body,
        json!([{"id": "urn:ngsi-ld:ParkingSpot:001", "status": {"type": "Property", "value": "occupied"}}])
    );
    let r = app
        .get(&format!(
            "{base}&omit=name,location,temperature,type,occupancy"
        ))
        .await;
    assert_eq!(
        r.body,
        json!([{"id": "urn:ngsi-ld:ParkingSpot:001", "scope": "/city/north", "status": {"type": "Property", "value": "occupied"}}])
    );
    let r = app.get(&format!("{base}&pick=name&lang=fr")).await;
    assert_eq!(
        r.body[0]["name"],
        json!({"type": "Property", "value": "Place 1", "lang": "fr"})
    );
    let r = app
        .get(&format!(
            "{base}&pick=name&lang=de,en;q=0.5&options=keyValues"
        ))
        .await;
    assert_eq!(r.body[0]["name"], json!("Spot 1"));
    let r = app
        .get(&format!(
            "{base}&pick=temperature&datasetId=urn:ngsi-ld:Dataset:sensor"
        ))
        .await;
    assert_eq!(
        r.body[0]["temperature"],
        json!({"type": "Property", "value": 51, "datasetId": "urn:ngsi-ld:Dataset:sensor"})
    );
    let r = app
        .get(&format!("{base}&pick=temperature&datasetId=@none"))
        .await;
    assert_eq!(
        r.body[0]["temperature"],
        json!({"type": "Property", "value": 11})
    );
    let r = app
        .get(&format!("{base}&pick=status,occupancy&options=concise"))
        .await;
    assert_eq!(
        r.body[0],
        json!({"status": "occupied", "occupancy": {"value": 1, "unitCode": "P1"}})
    );
    // The same projection works on a single entity.
    let r = app
        .get("/ngsi-ld/v1/entities/urn:ngsi-ld:ParkingSpot:001?pick=id,occupancy&options=keyValues")
        .await;
    assert_eq!(
        r.body,
        json!({"id": "urn:ngsi-ld:ParkingSpot:001", "occupancy": 1})
    );
}

#[tokio::test]
async fn representations_json_ld_and_geojson() {
    let app = city().await;
    let r = app
        .get_with(
            &format!("{ENTITIES}?type=ParkingSpot&limit=2"),
            &[("accept", "application/ld+json")],
        )
        .await;
    assert_eq!(r.header("content-type"), Some("application/ld+json"));
    assert!(
        r.body[0]["@context"]
            .as_str()
            .unwrap()
            .contains("core-context")
    );
    let r = app
        .get_with(
            &format!("{ENTITIES}?type=ParkingSpot&limit=3&options=keyValues"),
            &[("accept", "application/geo+json")],
        )
        .await;
    assert_eq!(r.header("content-type"), Some("application/geo+json"));
    assert_eq!(r.body["type"], "FeatureCollection");
    let features = r.body["features"].as_array().unwrap();
    assert_eq!(features.len(), 3);
    assert_eq!(features[1]["geometry"]["coordinates"], json!([2.01, 48.0]));
    assert_eq!(features[1]["properties"]["occupancy"], 1);
}

#[tokio::test]
async fn post_query_with_entity_selectors() {
    let app = city().await;
    let body = json!({"type": "Query",
        "entities": [{"type": "Streetlight", "idPattern": ":[0-1]$"}, {"id": "urn:ngsi-ld:ParkingSpot:020", "type": "ParkingSpot"}],
        "attrs": ["powerState", "status"]});
    let r = app
        .json(
            Method::POST,
            "/ngsi-ld/v1/entityOperations/query?count=true",
            &body,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(ids(&r.body), ["020", "0", "1"]);
    assert_eq!(r.header("ngsild-results-count"), Some("3"));
    let body =
        json!({"type": "Query", "entities": [{"type": "ParkingSpot"}], "q": "occupancy>=28"});
    let r = app
        .json(
            Method::POST,
            "/ngsi-ld/v1/entityOperations/query?options=keyValues",
            &body,
        )
        .await;
    assert_eq!(ids(&r.body), ["028", "029"]);
    let r = app
        .json(
            Method::POST,
            "/ngsi-ld/v1/entityOperations/query",
            &json!({"type": "Other"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn query_errors() {
    let app = city().await;
    let r = app
        .get(&format!("{ENTITIES}?type=ParkingSpot&q=occupancy%3D%3E3"))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.problem(), "BadRequestData");
    assert!(
        r.body["detail"].as_str().unwrap().contains("position 10"),
        "{}",
        r.body
    );
    let r = app
        .get(&format!("{ENTITIES}?type=ParkingSpot&limit=5000"))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.problem(), "TooManyResults");
    let r = app.get(ENTITIES).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body["detail"].as_str().unwrap().contains("too broad"));
    for bad in [
        "limit=-1",
        "limit=0",
        "offset=x",
        "count=maybe",
        "idPattern=(",
        "scopeQ=city",
        "type=A;;B",
        "pick=id&omit=id",
        "pick=id;name",
        "pick=name{",
        "pick=name{}",
        "omit=,",
        "attrs=id,type",
        "attrs=name&pick=name",
        "q=temperature%3E%3E%3E(",
    ] {
        let r = app.get(&format!("{ENTITIES}?type=ParkingSpot&{bad}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.body);
        r.problem();
    }
    let r = app
        .get_with(
            &format!("{ENTITIES}?type=ParkingSpot"),
            &[("NGSILD-Tenant", "nobody")],
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.problem(), "NonexistentTenant");
}

#[tokio::test]
async fn type_and_attribute_discovery() {
    let app = city().await;
    let r = app.get("/ngsi-ld/v1/types").await;
    assert_eq!(r.body["type"], "EntityTypeList");
    assert_eq!(r.body["typeList"], json!(["ParkingSpot", "Streetlight"]));
    let r = app.get("/ngsi-ld/v1/types?details=true").await;
    let spot = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["typeName"] == "ParkingSpot")
        .unwrap()
        .clone();
    assert_eq!(
        spot["id"],
        "https://uri.etsi.org/ngsi-ld/default-context/ParkingSpot"
    );
    assert!(
        spot["attributeNames"]
            .as_array()
            .unwrap()
            .contains(&json!("occupancy"))
    );
    let r = app.get("/ngsi-ld/v1/types/Streetlight").await;
    assert_eq!(r.body["type"], "EntityTypeInfo");
    assert_eq!(r.body["entityCount"], 5);
    let details = r.body["attributeDetails"].as_array().unwrap();
    let rel = details
        .iter()
        .find(|a| a["attributeName"] == "refPole")
        .unwrap();
    assert_eq!(rel["attributeTypes"], json!(["Relationship"]));
    assert_eq!(
        app.get("/ngsi-ld/v1/types/Bus").await.status,
        StatusCode::NOT_FOUND
    );

    let r = app.get("/ngsi-ld/v1/attributes").await;
    assert_eq!(r.body["type"], "AttributeList");
    let names = r.body["attributeList"].as_array().unwrap();
    assert!(names.contains(&json!("powerState")) && names.contains(&json!("location")));
    let r = app.get("/ngsi-ld/v1/attributes/occupancy").await;
    assert_eq!(r.body["attributeCount"], 30);
    assert_eq!(r.body["typeNames"], json!(["ParkingSpot"]));
    assert_eq!(r.body["attributeTypes"], json!(["Property"]));
    let r = app.get("/ngsi-ld/v1/attributes?details=true").await;
    assert!(r.body.as_array().unwrap().iter().any(
        |a| a["attributeName"] == "name" && a["attributeTypes"] == json!(["LanguageProperty"])
    ));
    assert_eq!(
        app.get("/ngsi-ld/v1/attributes/ghost").await.status,
        StatusCode::NOT_FOUND
    );
}
