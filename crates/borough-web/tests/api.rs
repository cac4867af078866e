//! The dashboard's endpoints over HTTP, against the embedded store.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use borough_core::entity::parse_entity;
use borough_core::{Context, EntityOp};
use borough_embedded::EmbeddedStore;
use borough_store::EntityStore;
use borough_web::{WebConfig, router};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<EmbeddedStore>,
    app: Router,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(borough_embedded::open(dir.path()).expect("open store"));
    let app = router(store.clone(), WebConfig::default());
    Fixture {
        _dir: dir,
        store,
        app,
    }
}

fn entity(id: &str, t: &str, lon: f64, lat: f64, status: &str) -> EntityOp {
    EntityOp::Create(
        parse_entity(
            &json!({"id": id, "type": t,
                "status": {"type": "Property", "value": status},
                "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [lon, lat]}}}),
            &Context::core(),
            0,
        )
        .expect("valid entity"),
    )
}

/// A 20 x 20 grid of lamps and of parking spots 10 m apart, a few of them faulty.
async fn city(store: &EmbeddedStore, tenant: &str) {
    let mut ops = Vec::new();
    for i in 0..20 {
        for j in 0..20 {
            let (lon, lat) = (
                2.30 + f64::from(i) * 0.000_13,
                48.85 + f64::from(j) * 0.000_09,
            );
            let n = i * 20 + j;
            let status = if n % 50 == 0 { "defectiveLamp" } else { "ok" };
            ops.push(entity(
                &format!("urn:ngsi-ld:Streetlight:{n}"),
                "Streetlight",
                lon,
                lat,
                status,
            ));
            ops.push(entity(
                &format!("urn:ngsi-ld:ParkingSpot:{n}"),
                "ParkingSpot",
                lon + 0.00005,
                lat,
                "free",
            ));
        }
    }
    let r = store.write(tenant, ops).await.expect("write");
    assert!(r.iter().all(Result::is_ok));
}

async fn get(app: &Router, uri: &str) -> (StatusCode, String, Value) {
    let resp = app
        .clone()
        .oneshot(Request::get(uri).body(Body::empty()).expect("request"))
        .await
        .expect("response");
    let status = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, ct, v)
}

fn counted(v: &Value) -> u64 {
    let clusters: u64 = v["clusters"]
        .as_array()
        .expect("clusters")
        .iter()
        .map(|c| c["count"].as_u64().expect("count"))
        .sum();
    clusters + v["markers"].as_array().expect("markers").len() as u64
}

#[tokio::test]
async fn cluster_counts_add_up_to_the_entities_in_the_box() {
    let f = fixture();
    city(&f.store, "t").await;
    let whole = "2.29,48.84,2.31,48.86";
    for zoom in [3, 10, 14, 16, 17, 18, 20] {
        let (s, _, v) = get(
            &f.app,
            &format!("/dashboard/api/clusters?tenant=t&bbox={whole}&zoom={zoom}"),
        )
        .await;
        if s == StatusCode::BAD_REQUEST {
            // At the highest zooms this box is larger than a screen.
            assert!(zoom >= 18, "zoom {zoom}: {v}");
            continue;
        }
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["total"], 800, "zoom {zoom}");
        assert_eq!(counted(&v), 800, "zoom {zoom}");
        assert_eq!(v["alerts"], 8, "zoom {zoom}");
    }
    // Zoomed out everything is one cluster, with counts per type; zoomed in, single markers.
    let (_, _, v) = get(
        &f.app,
        &format!("/dashboard/api/clusters?tenant=t&bbox={whole}&zoom=10"),
    )
    .await;
    assert_eq!(v["clusters"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        v["clusters"][0]["types"],
        json!([{"type": "ParkingSpot", "count": 400}, {"type": "Streetlight", "count": 400}])
    );
    assert!(v["markers"].as_array().is_some_and(Vec::is_empty));
    let part = "2.3,48.85,2.3013,48.8509";
    let (s, _, v) = get(
        &f.app,
        &format!("/dashboard/api/clusters?tenant=t&bbox={part}&zoom=20"),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let expected = {
        let mut n = 0;
        for i in 0..20 {
            for j in 0..20 {
                let (lon, lat) = (
                    2.30 + f64::from(i) * 0.000_13,
                    48.85 + f64::from(j) * 0.000_09,
                );
                for lon in [lon, lon + 0.00005] {
                    if (2.3..=2.3013).contains(&lon) && (48.85..=48.8509).contains(&lat) {
                        n += 1;
                    }
                }
            }
        }
        n
    };
    assert_eq!(v["total"], expected);
    assert_eq!(counted(&v), expected);
    let marker = &v["markers"][0];
    assert!(
        marker["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("urn:ngsi-ld:"))
    );
    assert!(marker["state"].is_string());
    // A layer filter counts only its type.
    let (_, _, v) = get(
        &f.app,
        &format!("/dashboard/api/clusters?tenant=t&bbox={whole}&zoom=14&types=Streetlight"),
    )
    .await;
    assert_eq!(v["total"], 400);
    for c in v["clusters"].as_array().expect("clusters") {
        assert_eq!(
            c["types"],
            json!([{"type": "Streetlight", "count": c["count"]}])
        );
    }
    // An empty box.
    let (_, _, v) = get(
        &f.app,
        "/dashboard/api/clusters?tenant=t&bbox=10,10,11,11&zoom=8",
    )
    .await;
    assert_eq!(v["total"], 0);
}

#[tokio::test]
async fn bad_requests_are_400_problems() {
    let f = fixture();
    city(&f.store, "t").await;
    for q in [
        "bbox=1,2,3&zoom=3",
        "bbox=a,b,c,d&zoom=3",
        "bbox=3,2,1,4&zoom=3",
        "bbox=-181,2,1,4&zoom=3",
        "bbox=1,2,3,4&zoom=21",
        "bbox=1,2,3,4&zoom=-1",
        "bbox=1,2,3,4&zoom=x",
        "bbox=1,2,3,4",
        "zoom=3",
        "bbox=-180,-85,180,85&zoom=18",
        "bbox=1,2,3,4&zoom=3&types=Unicorn",
        "bbox=1,2,3,4&zoom=3&types=has%20space",
    ] {
        let (s, ct, v) = get(&f.app, &format!("/dashboard/api/clusters?tenant=t&{q}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert_eq!(ct, "application/problem+json", "{q}");
        assert_eq!(
            v["type"], "https://uri.etsi.org/ngsi-ld/errors/BadRequestData",
            "{q}"
        );
        assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()), "{q}");
    }
    let (s, ct, _) = get(&f.app, "/dashboard/api/alerts?tenant=t&limit=0").await;
    assert_eq!(
        (s, ct.as_str()),
        (StatusCode::BAD_REQUEST, "application/problem+json")
    );
    let (s, _, _) = get(&f.app, "/dashboard/api/summary?tenant=bad%20name").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn unknown_tenants_are_404_and_the_empty_default_tenant_is_empty() {
    let f = fixture();
    for path in ["summary", "clusters", "alerts", "events"] {
        let (s, ct, v) = get(
            &f.app,
            &format!("/dashboard/api/{path}?tenant=nowhere&bbox=1,2,3,4&zoom=3"),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(ct, "application/problem+json");
        assert_eq!(
            v["type"],
            "https://uri.etsi.org/ngsi-ld/errors/NonexistentTenant"
        );
    }
    let (s, _, v) = get(&f.app, "/dashboard/api/summary").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["entities"], 0);
    assert_eq!(v["extent"], Value::Null);
    let (_, _, v) = get(&f.app, "/dashboard/api/tenants").await;
    assert_eq!(v["tenants"][0]["name"], "");
}

#[tokio::test]
async fn summary_and_alerts() {
    let f = fixture();
    city(&f.store, "t").await;
    let (_, _, v) = get(&f.app, "/dashboard/api/summary?tenant=t").await;
    assert_eq!(v["entities"], 800);
    assert_eq!(v["located"], 800);
    assert_eq!(v["alerts"]["critical"], 8);
    assert_eq!(v["types"].as_array().map(Vec::len), Some(2));
    let (_, _, v) = get(&f.app, "/dashboard/api/alerts?tenant=t&limit=5").await;
    assert_eq!(v["total"], 8);
    assert_eq!(v["alerts"].as_array().map(Vec::len), Some(5));
    let a = &v["alerts"][0];
    assert_eq!(a["alert"]["severity"], "critical");
    assert_eq!(a["alert"]["reason"], "status is defectiveLamp");
    assert_eq!(a["type"], "Streetlight");
    assert!(a["lon"].is_number());
}

#[tokio::test]
async fn the_page_and_its_assets_are_served() {
    let f = fixture();
    let resp = f
        .app
        .clone()
        .oneshot(Request::get("/").body(Body::empty()).expect("request"))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .is_ok_and(|c| c.starts_with("text/html"))
    );
    let (s, _, _) = get(&f.app, "/dashboard/nothing-here.js").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn live_events_are_coalesced_per_tenant() {
    let f = fixture();
    city(&f.store, "t").await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let app = router(
        f.store.clone(),
        WebConfig {
            stop: Some(stopped),
            ..WebConfig::default()
        },
    );
    let resp = app
        .oneshot(
            Request::get("/dashboard/api/events?tenant=t")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut text = String::new();
    let mut next = async |text: &mut String| {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("an event in time");
        match frame {
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    text.push_str(&String::from_utf8_lossy(&d));
                }
                true
            }
            _ => false,
        }
    };
    next(&mut text).await;
    assert!(text.contains("event: hello"), "{text}");
    // Another tenant's change is not sent; three changes of one entity are sent once.
    f.store
        .write(
            "other",
            vec![entity("urn:x", "Streetlight", 1.0, 1.0, "ok")],
        )
        .await
        .expect("write");
    for status in ["ok", "defectiveLamp", "outOfService"] {
        let frag = borough_core::entity::parse_fragment(
            &json!({"status": {"type": "Property", "value": status}}),
            &Context::core(),
            borough_core::ParseMode::Patch,
        )
        .expect("fragment");
        f.store
            .write(
                "t",
                vec![EntityOp::Update {
                    id: "urn:ngsi-ld:Streetlight:1".into(),
                    frag,
                }],
            )
            .await
            .expect("write");
    }
    text.clear();
    while !text.contains("\n\n") {
        assert!(next(&mut text).await, "stream ended early");
    }
    assert!(text.contains("event: changes"), "{text}");
    let data = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("data line");
    let changes: Value = serde_json::from_str(data).expect("json");
    let changes = changes.as_array().expect("array");
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0]["id"], "urn:ngsi-ld:Streetlight:1");
    assert_eq!(changes[0]["state"], "outOfService");
    assert_eq!(changes[0]["alert"]["severity"], "critical");
    // Shutting down ends the stream.
    stop.send(true).expect("stop");
    let mut ended = false;
    for _ in 0..10 {
        if !next(&mut text).await {
            ended = true;
            break;
        }
    }
    assert!(ended, "the stream ends at shutdown");
}

/// The grid cells' answer covers the box widened to cell edges: its counts are
/// those of the entities in the answer's `bbox`.
#[tokio::test]
async fn pyramid_counts_match_the_widened_box_and_follow_changes() {
    let f = fixture();
    city(&f.store, "t").await;
    let points: Vec<(f64, f64)> = (0..20)
        .flat_map(|i| (0..20).map(move |j| (i, j)))
        .flat_map(|(i, j)| {
            let (lon, lat) = (
                2.30 + f64::from(i) * 0.000_13,
                48.85 + f64::from(j) * 0.000_09,
            );
            [(lon, lat), (lon + 0.00005, lat)]
        })
        .collect();
    for zoom in [15, 16, 17] {
        let (s, _, v) = get(
            &f.app,
            &format!(
                "/dashboard/api/clusters?tenant=t&bbox=2.3005,48.8505,2.3015,48.8512&zoom={zoom}"
            ),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let b: Vec<f64> = v["bbox"]
            .as_array()
            .expect("bbox")
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        assert!(
            b[0] <= 2.3005 && b[1] <= 48.8505 && b[2] >= 2.3015 && b[3] >= 48.8512,
            "{b:?}"
        );
        let inside = points
            .iter()
            .filter(|(x, y)| (b[0]..b[2]).contains(x) && (b[1]..b[3]).contains(y))
            .count() as u64;
        assert_eq!(v["total"], inside, "zoom {zoom}");
        assert_eq!(counted(&v), inside, "zoom {zoom}");
    }
    let whole = "/dashboard/api/clusters?tenant=t&bbox=2.29,48.84,2.31,48.86&zoom=12";
    let (_, _, v) = get(&f.app, whole).await;
    assert_eq!(v["alerts"], 8);
    // A fault reported after the pyramid was built shows up in it.
    let frag = borough_core::entity::parse_fragment(
        &json!({"status": {"type": "Property", "value": "defectiveLamp"}}),
        &Context::core(),
        borough_core::ParseMode::Patch,
    )
    .expect("fragment");
    f.store
        .write(
            "t",
            vec![EntityOp::Update {
                id: "urn:ngsi-ld:Streetlight:1".into(),
                frag,
            }],
        )
        .await
        .expect("write");
    f.store
        .write(
            "t",
            vec![EntityOp::Delete {
                id: "urn:ngsi-ld:ParkingSpot:1".into(),
            }],
        )
        .await
        .expect("write");
    let mut seen = Value::Null;
    for _ in 0..50 {
        let (_, _, v) = get(&f.app, whole).await;
        if v["alerts"] == 9 && v["total"] == 799 {
            return;
        }
        seen = v;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "the pyramid did not follow the changes: alerts {}, total {}",
        seen["alerts"], seen["total"]
    );
}
