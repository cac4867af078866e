use crate::common::{ENTITIES, TestApp};
use axum::http::{Method, StatusCode};
use serde_json::json;

const E: &str = "/ngsi-ld/v1/entities/urn:ngsi-ld:Meter:1";

#[tokio::test]
async fn a_tenant_never_sees_another_tenants_entities() {
    let app = TestApp::new();
    let body = json!({"id": "urn:ngsi-ld:Meter:1", "type": "ElectricityMeter", "kwh": 5});
    let r = app
        .json_with(
            Method::POST,
            ENTITIES,
            &[("NGSILD-Tenant", "utility")],
            &body,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.header("ngsild-tenant"), Some("utility"));

    let r = app.get_with(E, &[("NGSILD-Tenant", "utility")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["kwh"]["value"], 5);

    // Not in the default tenant.
    assert_eq!(app.get(E).await.status, StatusCode::NOT_FOUND);

    // A tenant that was never written to does not exist.
    let r = app.get_with(E, &[("NGSILD-Tenant", "parking")]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.problem(), "NonexistentTenant");

    // The same id in another tenant is another entity.
    let other = json!({"id": "urn:ngsi-ld:Meter:1", "type": "ElectricityMeter", "kwh": 9});
    let r = app
        .json_with(
            Method::POST,
            ENTITIES,
            &[("NGSILD-Tenant", "parking")],
            &other,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(
        app.get_with(E, &[("NGSILD-Tenant", "utility")]).await.body["kwh"]["value"],
        5
    );
    assert_eq!(
        app.get_with(E, &[("NGSILD-Tenant", "parking")]).await.body["kwh"]["value"],
        9
    );

    // Deleting in one tenant leaves the other alone.
    let r = app
        .send(Method::DELETE, E, &[("NGSILD-Tenant", "parking")], None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        app.get_with(E, &[("NGSILD-Tenant", "utility")])
            .await
            .status,
        StatusCode::OK
    );

    // Batch operations are tenant-scoped too.
    let r = app
        .json_with(
            Method::POST,
            "/ngsi-ld/v1/entityOperations/delete",
            &[("NGSILD-Tenant", "parking")],
            &json!(["urn:ngsi-ld:Meter:1"]),
        )
        .await;
    assert_eq!(r.status, StatusCode::MULTI_STATUS);
    assert_eq!(
        app.get_with(E, &[("NGSILD-Tenant", "utility")])
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn invalid_tenant_names_are_rejected() {
    let app = TestApp::new();
    let body = json!({"id": "urn:ngsi-ld:Meter:1", "type": "ElectricityMeter"});
    for bad in ["has space", "a/b", &"x".repeat(65)] {
        let r = app
            .json_with(Method::POST, ENTITIES, &[("NGSILD-Tenant", bad)], &body)
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(r.body["detail"].as_str().unwrap().contains("tenant"));
    }
}
