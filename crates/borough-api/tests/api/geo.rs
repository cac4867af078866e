//! Geo-queries over HTTP: each georel against hand-checked fixtures, combined
//! filters, distance ordering, GeoJSON output, bad input, and the spatial
//! index after a restart.

use crate::common::{ENTITIES, TestApp};
use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

/// A small district: a square park with a pond (hole), lamps at known places,
/// a street crossing it, and a bus stop outside.
async fn district() -> TestApp {
    let app = TestApp::new();
    let lamp = |i: u32, x: f64, y: f64, state: &str| {
        json!({"id": format!("urn:ngsi-ld:Streetlight:{i}"), "type": "Streetlight", "powerState": state,
               "location": {"type": "Point", "coordinates": [x, y]}})
    };
    let batch = json!([
        // 0.001° of latitude is about 111 m here; 0.001° of longitude about 73 m.
        lamp(1, 2.3500, 48.8500, "on"),   // the reference point
        lamp(2, 2.3500, 48.8510, "on"),   // ~111 m north
        lamp(3, 2.3500, 48.8530, "off"),  // ~334 m north
        lamp(4, 2.3600, 48.8500, "on"),   // ~733 m east
        lamp(5, 2.3450, 48.8500, "on"),   // on the park's west edge
        lamp(6, 2.3475, 48.8475, "on"),   // in the pond (the park's hole)
        {"id": "urn:ngsi-ld:Park:1", "type": "Park", "location": {"type": "Polygon", "coordinates": [
            [[2.345, 48.845], [2.355, 48.845], [2.355, 48.855], [2.345, 48.855], [2.345, 48.845]],
            [[2.347, 48.847], [2.348, 48.847], [2.348, 48.848], [2.347, 48.848], [2.347, 48.847]]]}},
        {"id": "urn:ngsi-ld:Street:1", "type": "Street", "location": {"type": "LineString", "coordinates": [[2.340, 48.850], [2.360, 48.850]]}},
        {"id": "urn:ngsi-ld:BusStop:1", "type": "BusStop", "location": {"type": "Point", "coordinates": [2.370, 48.860]},
         "area": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [2.3500, 48.8500]}}}
    ]);
    let r = app
        .json(Method::POST, "/ngsi-ld/v1/entityOperations/create", &batch)
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
                .trim_start_matches("urn:ngsi-ld:")
                .to_string()
        })
        .collect()
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn geo(app: &TestApp, extra: &str, georel: &str, geometry: &str, coords: &str) -> Value {
    let uri = format!(
        "{ENTITIES}?georel={}&geometry={geometry}&coordinates={}{extra}",
        enc(georel),
        enc(coords)
    );
    let r = app.get(&uri).await;
    assert_eq!(r.status, StatusCode::OK, "{uri}: {}", r.body);
    r.body
}

const PARK: &str = "[[[2.345,48.845],[2.355,48.845],[2.355,48.855],[2.345,48.855],[2.345,48.845]],[[2.347,48.847],[2.348,48.847],[2.348,48.848],[2.347,48.848],[2.347,48.847]]]";

#[tokio::test]
async fn near_orders_by_distance_and_honours_both_bounds() {
    let app = district().await;
    let b = geo(
        &app,
        "&type=Streetlight",
        "near;maxDistance==400",
        "Point",
        "[2.35,48.85]",
    )
    .await;
    // Exact order, hand-computed: 1 (0 m), 2 (111 m), 6 (~333 m: 0.0025° W and S), 3 (334 m), 5 (367 m).
    assert_eq!(
        ids(&b),
        [
            "Streetlight:1",
            "Streetlight:2",
            "Streetlight:6",
            "Streetlight:3",
            "Streetlight:5"
        ]
    );
    let b = geo(
        &app,
        "&type=Streetlight",
        "near;maxDistance==110",
        "Point",
        "[2.35,48.85]",
    )
    .await;
    assert_eq!(ids(&b), ["Streetlight:1"], "111 m is beyond 110 m");
    let b = geo(
        &app,
        "&type=Streetlight",
        "near;minDistance==200;maxDistance==800",
        "Point",
        "[2.35,48.85]",
    )
    .await;
    assert_eq!(
        ids(&b),
        [
            "Streetlight:6",
            "Streetlight:3",
            "Streetlight:5",
            "Streetlight:4"
        ]
    );
    // The street passes through the point: distance 0, like lamp 1; ties go by id.
    let b = geo(
        &app,
        "&limit=3",
        "near;maxDistance==50",
        "Point",
        "[2.35,48.85]",
    )
    .await;
    assert_eq!(ids(&b), ["Park:1", "Street:1", "Streetlight:1"]);
}

#[tokio::test]
async fn within_contains_intersects_disjoint_overlaps_equals() {
    let app = district().await;
    let b = geo(&app, "&type=Streetlight", "within", "Polygon", PARK).await;
    assert_eq!(
        ids(&b),
        ["Streetlight:1", "Streetlight:2", "Streetlight:3"],
        "not 5 (on the edge), not 6 (in the pond), not 4 (outside)"
    );
    let b = geo(&app, "&type=Streetlight", "intersects", "Polygon", PARK).await;
    assert_eq!(
        ids(&b),
        [
            "Streetlight:1",
            "Streetlight:2",
            "Streetlight:3",
            "Streetlight:5"
        ],
        "the edge intersects"
    );
    let b = geo(&app, "&type=Streetlight", "disjoint", "Polygon", PARK).await;
    assert_eq!(ids(&b), ["Streetlight:4", "Streetlight:6"]);
    let b = geo(&app, "", "contains", "Point", "[2.352,48.852]").await;
    assert_eq!(ids(&b), ["Park:1"]);
    let b = geo(&app, "", "contains", "Point", "[2.3475,48.8475]").await;
    assert_eq!(
        ids(&b),
        ["Streetlight:6"],
        "the pond is not part of the park; the lamp there contains its own position"
    );
    let b = geo(
        &app,
        "",
        "intersects",
        "LineString",
        "[[2.351,48.84],[2.351,48.86]]",
    )
    .await;
    assert_eq!(ids(&b), ["Park:1", "Street:1"]);
    let b = geo(
        &app,
        "",
        "overlaps",
        "Polygon",
        "[[[2.35,48.85],[2.36,48.85],[2.36,48.86],[2.35,48.86],[2.35,48.85]]]",
    )
    .await;
    assert_eq!(ids(&b), ["Park:1"]);
    let b = geo(&app, "", "equals", "Point", "[2.36,48.85]").await;
    assert_eq!(ids(&b), ["Streetlight:4"]);
    let b = geo(&app, "&geoproperty=area", "equals", "Point", "[2.35,48.85]").await;
    assert_eq!(
        ids(&b),
        ["BusStop:1"],
        "geoproperty picks another GeoProperty"
    );
}

#[tokio::test]
async fn combined_with_q_paging_count_and_geojson() {
    let app = district().await;
    let b = geo(
        &app,
        "&type=Streetlight&q=powerState==%22on%22",
        "within",
        "Polygon",
        PARK,
    )
    .await;
    assert_eq!(ids(&b), ["Streetlight:1", "Streetlight:2"]);
    let uri = format!(
        "{ENTITIES}?type=Streetlight&georel={}&geometry=Point&coordinates={}&limit=2&offset=1&count=true",
        enc("near;maxDistance==1000"),
        enc("[2.35,48.85]")
    );
    let r = app.get(&uri).await;
    assert_eq!(ids(&r.body), ["Streetlight:2", "Streetlight:6"]);
    assert_eq!(r.header("ngsild-results-count"), Some("6"));
    let r = app
        .get_with(
            &format!("{uri}&options=keyValues"),
            &[("accept", "application/geo+json")],
        )
        .await;
    assert_eq!(r.body["type"], "FeatureCollection");
    assert_eq!(
        r.body["features"][0]["geometry"]["coordinates"],
        json!([2.35, 48.851])
    );
    assert_eq!(r.body["features"][0]["properties"]["powerState"], "on");

    let body = json!({"type": "Query", "entities": [{"type": "Streetlight"}],
        "geoQ": {"georel": "near;maxDistance==120", "geometry": "Point", "coordinates": [2.35, 48.85]}});
    let r = app
        .json(Method::POST, "/ngsi-ld/v1/entityOperations/query", &body)
        .await;
    assert_eq!(ids(&r.body), ["Streetlight:1", "Streetlight:2"]);
}

#[tokio::test]
async fn bad_geo_queries_are_400_and_say_which_part() {
    let app = district().await;
    for (query, word) in [
        (
            "georel=near%3BmaxDistance%3D%3D10&geometry=Point",
            "coordinates",
        ),
        ("georel=within&coordinates=%5B0%2C0%5D", "geometry"),
        ("geometry=Point&coordinates=%5B0%2C0%5D", "georel"),
        (
            "georel=around&geometry=Point&coordinates=%5B0%2C0%5D",
            "unknown georel",
        ),
        (
            "georel=within&geometry=Polygon&coordinates=%5B%5B%5B0%2C0%5D%2C%5B1%2C0%5D%2C%5B1%2C1%5D%5D%5D",
            "four positions",
        ),
        (
            "georel=within&geometry=Polygon&coordinates=%5B%5B%5B0%2C0%5D%2C%5B1%2C0%5D%2C%5B1%2C1%5D%2C%5B0%2C1%5D%5D%5D",
            "closed",
        ),
        (
            "georel=within&geometry=Point&coordinates=%5B0%2C91%5D",
            "latitude",
        ),
        ("georel=within&geometry=Point&coordinates=%5B0%2C", "JSON"),
        (
            "georel=near&geometry=Point&coordinates=%5B0%2C0%5D",
            "maxDistance",
        ),
    ] {
        let r = app
            .get(&format!("{ENTITIES}?type=Streetlight&{query}"))
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{query}: {}", r.body);
        assert_eq!(r.problem(), "BadRequestData");
        assert!(
            r.body["detail"].as_str().unwrap().contains(word),
            "{query}: {}",
            r.body["detail"]
        );
    }
}

#[tokio::test]
async fn writes_keep_the_spatial_index_in_step_and_it_is_rebuilt_on_restart() {
    let app = district().await;
    // Move lamp 4 into the park, delete lamp 2.
    let r = app
        .json(
            Method::PATCH,
            "/ngsi-ld/v1/entities/urn:ngsi-ld:Streetlight:4/attrs/location",
            &json!({"value": {"type": "Point", "coordinates": [2.352, 48.852]}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    assert_eq!(
        app.delete("/ngsi-ld/v1/entities/urn:ngsi-ld:Streetlight:2")
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    let b = geo(&app, "&type=Streetlight", "within", "Polygon", PARK).await;
    assert_eq!(ids(&b), ["Streetlight:1", "Streetlight:3", "Streetlight:4"]);
    let b = geo(
        &app,
        "&type=Streetlight",
        "near;minDistance==700",
        "Point",
        "[2.35,48.85]",
    )
    .await;
    assert_eq!(
        ids(&b),
        Vec::<String>::new(),
        "the old position is gone from the index"
    );

    let app = app.restart().await;
    let b = geo(&app, "&type=Streetlight", "within", "Polygon", PARK).await;
    assert_eq!(ids(&b), ["Streetlight:1", "Streetlight:3", "Streetlight:4"]);
    let b = geo(&app, "", "near;maxDistance==10", "Point", "[2.352,48.852]").await;
    assert_eq!(ids(&b), ["Park:1", "Streetlight:4"]);
}
