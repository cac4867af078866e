//! Access control end to end, on the real binary with `--auth on` (the
//! default of `borough serve`): every route against every kind of caller,
//! keys and their lifecycle, tenants, quotas, rate limits, suspension, the
//! audit chain, and the hardening cases found by probing from outside.

mod support;

use borough_access::policy::{Need, POLICIES, TenantFrom};
use borough_access::{Permission, Role};
use serde_json::{Value, json};
use std::time::Duration;
use support::{Client, start};

fn secured(dir: &std::path::Path, extra: &[&str]) -> (support::Server, Client, String) {
    let mut args = vec!["--auth", "on"];
    args.extend(extra);
    let server = start(dir, &args);
    let key = server
        .operator_key
        .clone()
        .expect("the first start prints an operator key");
    let client = Client::new(&server.base);
    (server, client, key)
}

fn new_key(c: &Client, op: &str, tenant: &str, body: Value) -> String {
    let r = c.call("POST", "/api/v1/keys", Some(op), Some(tenant), Some(body));
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["key"].as_str().unwrap().to_string()
}

fn create_tenant(c: &Client, op: &str, body: Value) {
    let r = c.call("POST", "/api/v1/tenants", Some(op), None, Some(body));
    assert_eq!(r.status, 201, "{}", r.body);
}

/// A path for a route template with its parameters filled in with names that
/// exist nowhere, so that allowed calls change nothing.
fn sample_path(route: &str) -> String {
    route
        .replace("{*path}", "app.js")
        .replace("{id}", "urn:ngsi-ld:Nothing:0")
        .replace("{attr}", "nothing")
        .replace("{type}", "Nothing")
        .replace("{instance}", "urn:ngsi-ld:Instance:0")
        .replace("{cmd}", "no-command")
        .replace("{name}", "no-such-tenant")
}

#[test]
fn every_route_answers_each_kind_of_caller_as_its_policy_says() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, c, op) = secured(dir.path(), &[]);
    create_tenant(&c, &op, json!({"name": "city"}));
    create_tenant(&c, &op, json!({"name": "other"}));
    let mut callers: Vec<(String, Option<String>, Vec<Role>)> = vec![
        ("anonymous".into(), None, vec![]),
        (
            "operator".into(),
            Some(op.clone()),
            vec![Role::OperatorAdmin],
        ),
    ];
    for role in [
        Role::TenantAdmin,
        Role::Editor,
        Role::Viewer,
        Role::DeviceManager,
    ] {
        let key = new_key(&c, &op, "city", json!({"roles": [role.name()]}));
        callers.push((role.name().into(), Some(key), vec![role]));
    }
    let mut checked = 0;
    for policy in POLICIES {
        // The dashboard's `/` and `/bench/static` need nothing special; the
        // sample path of `{*path}` is a real asset.
        for (name, key, roles) in &callers {
            for tenant in ["city", "other"] {
                let mut path = sample_path(policy.route);
                if let TenantFrom::Query(q) = policy.tenant {
                    path.push_str(&format!("?{q}={tenant}"));
                }
                let body = matches!(policy.method, "POST" | "PUT" | "PATCH").then(|| json!({}));
                let r = c.call(policy.method, &path, key.as_deref(), Some(tenant), body);
                let what = format!(
                    "{} {} as {name} in {tenant}: {} {}",
                    policy.method, path, r.status, r.body
                );
                let allowed = match policy.need {
                    Need::Public => true,
                    Need::DeviceToken => {
                        // The route checks the device's own token: an API
                        // key is no device token.
                        assert_eq!(r.status, 401, "{what}");
                        continue;
                    }
                    Need::Authenticated => key.is_some(),
                    Need::Permission(p) => {
                        let operator = roles.contains(&Role::OperatorAdmin);
                        let in_tenant = match policy.tenant {
                            TenantFrom::None => true,
                            _ => tenant == "city",
                        };
                        operator
                            || (p != Permission::Operator
                                && in_tenant
                                && roles.iter().any(|r| r.grants(p)))
                    }
                };
                if allowed {
                    assert!(
                        r.status != 401 && r.status != 403,
                        "should be allowed: {what}"
                    );
                    // And the route is there (not the router's fallback);
                    // /bench/static answers only in a benchmark's server.
                    assert!(
                        policy.route == "/bench/static"
                            || (r.body["detail"] != "no such resource: see /ngsi-ld/v1/entities"
                                && r.status != 405),
                        "the route should exist: {what}"
                    );
                } else if key.is_none() {
                    assert_eq!(r.status, 401, "anonymous must be refused: {what}");
                    assert!(r.headers.contains_key("www-authenticate"), "{what}");
                } else {
                    assert_eq!(r.status, 403, "should be refused: {what}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 500, "only {checked} calls were checked");
}

#[test]
fn keys_are_scoped_rotated_revoked_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, c, op) = secured(dir.path(), &[]);
    create_tenant(&c, &op, json!({"name": "city"}));
    let admin = new_key(&c, &op, "city", json!({"roles": ["tenant-admin"]}));
    // A tenant administrator makes keys for its tenant, not operator keys.
    let r = c.call(
        "POST",
        "/api/v1/keys",
        Some(&admin),
        Some("city"),
        Some(json!({"roles": ["operator-admin"]})),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    let r = c.call(
        "POST",
        "/api/v1/keys",
        Some(&admin),
        Some("city"),
        Some(json!({"roles": ["editor"], "entityTypes": ["ParkingSpot"], "name": "parking app"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let parking = r.body["key"].as_str().unwrap().to_string();
    let parking_id = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(r.body["entityTypes"], json!(["ParkingSpot"]));
    // Listed without its secret.
    let r = c.call("GET", "/api/v1/keys", Some(&admin), Some("city"), None);
    assert!(r.body.to_string().find(&parking).is_none());
    assert!(
        r.body
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["id"] == parking_id.as_str())
    );

    // Scoped to entity types: its own types only.
    let spot = json!({"id": "urn:ngsi-ld:ParkingSpot:1", "type": "ParkingSpot"});
    let light = json!({"id": "urn:ngsi-ld:Streetlight:1", "type": "Streetlight"});
    assert_eq!(
        c.call(
            "POST",
            "/ngsi-ld/v1/entities",
            Some(&parking),
            Some("city"),
            Some(spot)
        )
        .status,
        201
    );
    assert_eq!(
        c.call(
            "POST",
            "/ngsi-ld/v1/entities",
            Some(&parking),
            Some("city"),
            Some(light.clone())
        )
        .status,
        404
    );
    assert_eq!(
        c.call(
            "POST",
            "/ngsi-ld/v1/entities",
            Some(&admin),
            Some("city"),
            Some(light)
        )
        .status,
        201
    );
    let r = c.call(
        "GET",
        "/ngsi-ld/v1/entities?local=true",
        Some(&parking),
        Some("city"),
        None,
    );
    assert_eq!(r.body.as_array().unwrap().len(), 1, "{}", r.body);
    let r = c.call(
        "GET",
        "/ngsi-ld/v1/entities/urn:ngsi-ld:Streetlight:1",
        Some(&parking),
        Some("city"),
        None,
    );
    assert_eq!(r.status, 404);
    let r = c.call(
        "DELETE",
        "/ngsi-ld/v1/entities/urn:ngsi-ld:Streetlight:1",
        Some(&parking),
        Some("city"),
        None,
    );
    assert_eq!(r.status, 404, "a scoped key cannot delete another type");
    let r = c.call(
        "GET",
        "/ngsi-ld/v1/subscriptions",
        Some(&parking),
        Some("city"),
        None,
    );
    assert_eq!(r.status, 403);

    // Rotation: the old secret stops working, the new one works.
    let r = c.call(
        "POST",
        &format!("/api/v1/keys/{parking_id}/rotate"),
        Some(&admin),
        Some("city"),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let rotated = r.body["key"].as_str().unwrap().to_string();
    assert_eq!(
        c.call("GET", "/api/v1/me", Some(&parking), None, None)
            .status,
        401
    );
    assert_eq!(
        c.call("GET", "/api/v1/me", Some(&rotated), None, None)
            .status,
        200
    );
    // Revocation.
    let r = c.call(
        "DELETE",
        &format!("/api/v1/keys/{parking_id}"),
        Some(&admin),
        Some("city"),
        None,
    );
    assert_eq!(r.status, 204);
    let r = c.call("GET", "/api/v1/me", Some(&rotated), None, None);
    assert_eq!(r.status, 401);
    assert!(r.body["detail"].as_str().unwrap().contains("revoked"));
    // Expiry.
    let at = chrono::Utc::now() + chrono::Duration::seconds(2);
    let short = new_key(
        &c,
        &op,
        "city",
        json!({"roles": ["viewer"], "expiresAt": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)}),
    );
    assert_eq!(
        c.call("GET", "/api/v1/me", Some(&short), None, None).status,
        200
    );
    std::thread::sleep(Duration::from_millis(2500));
    let r = c.call("GET", "/api/v1/me", Some(&short), None, None);
    assert_eq!(r.status, 401);
    assert!(r.body["detail"].as_str().unwrap().contains("expired"));
    // Bad input: unknown role, unknown member, past expiry.
    for bad in [
        json!({"roles": ["root"]}),
        json!({"roles": ["viewer"], "colour": "red"}),
        json!({"roles": ["viewer"], "expiresAt": "2001-01-01T00:00:00Z"}),
        json!({"roles": []}),
    ] {
        let r = c.call(
            "POST",
            "/api/v1/keys",
            Some(&op),
            Some("city"),
            Some(bad.clone()),
        );
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
}

#[test]
fn tenants_quotas_rates_suspension_and_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, c, op) = secured(dir.path(), &[]);
    create_tenant(
        &c,
        &op,
        json!({"name": "city", "city": "Lavasa", "plan": "silver",
               "contacts": [{"name": "Ops", "email": "ops@city.example"}],
               "quotas": {"maxEntities": 2, "maxSubscriptions": 1, "requestsPerSecond": 5}}),
    );
    let editor = new_key(&c, &op, "city", json!({"roles": ["editor"]}));
    let create = |i: u32| {
        c.call(
            "POST",
            "/ngsi-ld/v1/entities",
            Some(&editor),
            Some("city"),
            Some(json!({"id": format!("urn:ngsi-ld:T:{i}"), "type": "T"})),
        )
    };
    assert_eq!(create(1).status, 201);
    assert_eq!(create(2).status, 201);
    let r = create(3);
    assert_eq!(r.status, 403);
    assert_eq!(r.body["type"], "urn:borough:problem:QuotaExceeded");
    let sub = json!({"type": "Subscription", "entities": [{"type": "T"}],
                     "notification": {"endpoint": {"uri": "http://127.0.0.1:9/n"}}});
    assert_eq!(
        c.call(
            "POST",
            "/ngsi-ld/v1/subscriptions",
            Some(&editor),
            Some("city"),
            Some(sub.clone())
        )
        .status,
        201
    );
    assert_eq!(
        c.call(
            "POST",
            "/ngsi-ld/v1/subscriptions",
            Some(&editor),
            Some("city"),
            Some(sub)
        )
        .status,
        403
    );
    // The tenant's request rate: bursts of twice the rate, then 429.
    std::thread::sleep(Duration::from_secs(2));
    let statuses: Vec<u16> = (0..30)
        .map(|_| {
            c.call(
                "GET",
                "/ngsi-ld/v1/entities?type=T",
                Some(&editor),
                Some("city"),
                None,
            )
            .status
        })
        .collect();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(limited >= 15, "{statuses:?}");
    let r = c.call(
        "GET",
        "/ngsi-ld/v1/entities?type=T",
        Some(&editor),
        Some("city"),
        None,
    );
    if r.status == 429 {
        assert!(r.headers.contains_key("retry-after"));
    }
    // Metered.
    let metrics = c
        .http
        .get(format!("{}/metrics", c.base))
        .bearer_auth(&op)
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("borough_access_refused_total{tenant=\"city\",reason=\"tenant-rate\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("reason=\"entities\""), "{metrics}");
    let r = c.call(
        "PATCH",
        "/api/v1/tenants/city",
        Some(&op),
        None,
        Some(json!({"quotas": {}, "status": "suspended"})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // Suspended: nothing changes, and reads are refused too unless allowed.
    let r = create(4);
    assert_eq!(r.status, 403);
    assert!(r.body["detail"].as_str().unwrap().contains("suspended"));
    let read = || {
        c.call(
            "GET",
            "/ngsi-ld/v1/entities?type=T",
            Some(&editor),
            Some("city"),
            None,
        )
    };
    assert_eq!(read().status, 403);
    c.call(
        "PATCH",
        "/api/v1/tenants/city",
        Some(&op),
        None,
        Some(json!({"readsWhileSuspended": true})),
    );
    assert_eq!(read().status, 200);
    assert_eq!(create(5).status, 403);
    // An unregistered tenant does not appear by a first write.
    let r = c.call(
        "POST",
        "/ngsi-ld/v1/entities",
        Some(&op),
        Some("newcomer"),
        Some(json!({"id": "urn:ngsi-ld:T:9", "type": "T"})),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(
        r.body["type"],
        "https://uri.etsi.org/ngsi-ld/errors/NonexistentTenant"
    );
    // Deleting a tenant takes its data, its registrations and its keys with it.
    let r = c.call(
        "PATCH",
        "/api/v1/tenants/city",
        Some(&op),
        None,
        Some(json!({"status": "active"})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let registration = json!({
        "type": "ContextSourceRegistration",
        "information": [{"entities": [{"type": "T"}]}],
        "endpoint": "http://127.0.0.1:9",
    });
    let r = c.call(
        "POST",
        "/ngsi-ld/v1/csourceRegistrations",
        Some(&op),
        Some("city"),
        Some(registration),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = c.call("DELETE", "/api/v1/tenants/city", Some(&op), None, None);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(
        c.call("GET", "/api/v1/me", Some(&editor), None, None)
            .status,
        401
    );
    create_tenant(&c, &op, json!({"name": "city"}));
    let r = c.call(
        "GET",
        "/ngsi-ld/v1/entities?local=true",
        Some(&op),
        Some("city"),
        None,
    );
    assert_eq!(r.body, json!([]), "the old tenant's data is gone");
    let r = c.call(
        "GET",
        "/ngsi-ld/v1/subscriptions",
        Some(&op),
        Some("city"),
        None,
    );
    assert_eq!(r.body, json!([]));
    let r = c.call(
        "GET",
        "/ngsi-ld/v1/csourceRegistrations?type=T",
        Some(&op),
        Some("city"),
        None,
    );
    assert_eq!(r.body, json!([]), "the old tenant's registrations are gone");
    // Bad tenant input.
    for bad in [
        json!({"name": "no spaces"}),
        json!({"city": "nameless"}),
        json!({"name": "x", "quotas": {"maxEntities": -1}}),
        json!({"name": "y", "quotas": {"requestsPerSecond": 0}}),
        json!({"name": "z", "owner": "me"}),
    ] {
        let r = c.call(
            "POST",
            "/api/v1/tenants",
            Some(&op),
            None,
            Some(bad.clone()),
        );
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    assert_eq!(
        c.call(
            "POST",
            "/api/v1/tenants",
            Some(&op),
            None,
            Some(json!({"name": "city"}))
        )
        .status,
        409
    );
}

#[test]
fn the_audit_log_is_chained_and_shown_per_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let (server, c, op) = secured(dir.path(), &[]);
    create_tenant(&c, &op, json!({"name": "city"}));
    create_tenant(&c, &op, json!({"name": "other"}));
    let admin = new_key(&c, &op, "city", json!({"roles": ["tenant-admin"]}));
    new_key(&c, &op, "other", json!({"roles": ["viewer"]}));
    let r = c.call(
        "PUT",
        "/api/v1/history/retention",
        Some(&admin),
        Some("city"),
        Some(json!({"default": "P30D"})),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    // A retention that would erase history as it is written is refused.
    let r = c.call(
        "PUT",
        "/api/v1/history/retention",
        Some(&admin),
        Some("city"),
        Some(json!({"default": "PT1S"})),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        c.call("GET", "/api/v1/me", Some("bk_00_11"), None, None)
            .status,
        401
    );
    let r = c.call(
        "POST",
        "/api/v1/devices",
        Some(&admin),
        Some("city"),
        Some(json!({"id": "ws-1", "entityType": "WeatherObserved",
                    "attributes": [{"key": "t", "attribute": "temperature"}]})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = c.call("GET", "/api/v1/audit", Some(&admin), Some("city"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let actions: Vec<&str> = r.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"tenant.create"), "{actions:?}");
    assert!(actions.contains(&"key.create"), "{actions:?}");
    assert!(actions.contains(&"retention.set"), "{actions:?}");
    assert!(actions.contains(&"device.create"), "{actions:?}");
    for e in r.body["entries"].as_array().unwrap() {
        assert_eq!(e["tenant"], "city", "a tenant sees its own entries only");
    }
    let r = c.call("GET", "/api/v1/audit", Some(&op), None, None);
    let all: Vec<&str> = r.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(all.contains(&"auth.failure"), "{all:?}");
    let r = c.call("GET", "/api/v1/audit/verify", Some(&op), None, None);
    assert_eq!(r.body["intact"], true, "{}", r.body);
    assert!(r.body["entries"].as_u64().unwrap() >= 6);
    // The chain survives a restart, and goes on from where it was.
    drop(server);
    let server = start(dir.path(), &["--auth", "on"]);
    assert!(
        server.operator_key.is_none(),
        "the operator key is made once"
    );
    let c = Client::new(&server.base);
    create_tenant(&c, &op, json!({"name": "third"}));
    let r = c.call("GET", "/api/v1/audit/verify", Some(&op), None, None);
    assert_eq!(r.body["intact"], true, "{}", r.body);
}

#[test]
fn hardening_against_what_an_attacker_tries() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, c, op) = secured(dir.path(), &[]);
    create_tenant(&c, &op, json!({"name": "city"}));
    create_tenant(&c, &op, json!({"name": "other"}));
    let city = new_key(&c, &op, "city", json!({"roles": ["tenant-admin"]}));
    let other = new_key(&c, &op, "other", json!({"roles": ["tenant-admin"]}));

    // Hosted @contexts are their tenant's.
    let r = c.call(
        "POST",
        "/ngsi-ld/v1/jsonldContexts",
        Some(&city),
        Some("city"),
        Some(json!({"@context": {"speed": "https://example.org/speed"}})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let location = r.headers["location"].to_str().unwrap().to_string();
    let id = location.rsplit('/').next().unwrap().to_string();
    let hosted = |key: &str, tenant: &str| {
        c.call(
            "GET",
            "/ngsi-ld/v1/jsonldContexts?kind=Hosted",
            Some(key),
            Some(tenant),
            None,
        )
        .body
        .as_array()
        .unwrap()
        .len()
    };
    assert_eq!(hosted(&city, "city"), 1);
    assert_eq!(hosted(&other, "other"), 0);
    let path = format!("/ngsi-ld/v1/jsonldContexts/{id}");
    assert_eq!(
        c.call("GET", &path, Some(&other), Some("other"), None)
            .status,
        404
    );
    assert_eq!(
        c.call("DELETE", &path, Some(&other), Some("other"), None)
            .status,
        404
    );
    assert_eq!(
        c.call("GET", &path, Some(&city), Some("city"), None).status,
        200
    );

    // No CSRF through text/plain or forms on Borough's own API.
    for (path, ct) in [
        ("/api/v1/devices", "text/plain"),
        ("/api/v1/keys", "application/x-www-form-urlencoded"),
        ("/dashboard/api/login", "text/plain"),
    ] {
        let r = c
            .http
            .post(format!("{}{path}", c.base))
            .bearer_auth(&city)
            .header("NGSILD-Tenant", "city")
            .header("Content-Type", ct)
            .body(r#"{"id":"d1","entityType":"T","roles":["viewer"],"apiKey":"x"}"#)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 415, "{path} with {ct}");
    }
    // No CORS unless the operator names origins.
    let r = c
        .http
        .get(format!("{}/ngsi-ld/v1/entities?local=true", c.base))
        .bearer_auth(&city)
        .header("NGSILD-Tenant", "city")
        .header("Origin", "https://evil.example")
        .send()
        .unwrap();
    assert!(!r.headers().contains_key("access-control-allow-origin"));

    // Guessing keys: after a few failures the address is refused for a while.
    let mut statuses = Vec::new();
    for i in 0..12 {
        let r = c.call(
            "GET",
            "/api/v1/me",
            Some(&format!("bk_{i:016x}_{}", "ab".repeat(32))),
            None,
            None,
        );
        statuses.push(r.status);
    }
    assert_eq!(statuses[0], 401);
    assert_eq!(*statuses.last().unwrap(), 429, "{statuses:?}");
    // Even a good key from that address waits.
    assert_eq!(
        c.call("GET", "/api/v1/me", Some(&city), None, None).status,
        429
    );
}

#[test]
fn cors_is_opened_to_the_named_origins_only() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, c, op) = secured(dir.path(), &["--cors-origins", "https://app.city.example"]);
    let preflight = |origin: &str| {
        c.http
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/ngsi-ld/v1/entities", c.base),
            )
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization,content-type",
            )
            .send()
            .unwrap()
    };
    let r = preflight("https://app.city.example");
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.city.example"
    );
    let r = preflight("https://evil.example");
    assert!(!r.headers().contains_key("access-control-allow-origin"));
    let r = c
        .http
        .get(format!("{}/api/v1/me", c.base))
        .bearer_auth(&op)
        .header("Origin", "https://app.city.example")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.city.example"
    );
}

#[test]
fn an_operator_key_from_a_file_is_used_and_not_printed() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("operator.key");
    let secret = format!("bk_{}_{}", "0123456789abcdef", "cd".repeat(32));
    std::fs::write(&key_file, &secret).unwrap();
    let data = dir.path().join("data");
    let server = start(
        &data,
        &[
            "--auth",
            "on",
            "--operator-key-file",
            key_file.to_str().unwrap(),
        ],
    );
    assert!(server.operator_key.is_none());
    let c = Client::new(&server.base);
    let r = c.call("GET", "/api/v1/me", Some(&secret), None, None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["roles"], json!(["operator-admin"]));
    // With no file yet, the first start writes one.
    let fresh = dir.path().join("fresh.key");
    let server = start(
        &dir.path().join("data2"),
        &[
            "--auth",
            "on",
            "--operator-key-file",
            fresh.to_str().unwrap(),
        ],
    );
    let written = std::fs::read_to_string(&fresh).unwrap();
    assert_eq!(Some(written.trim().to_string()), server.operator_key);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "only its owner may read the key file");
    }
}

#[test]
fn the_dashboard_signs_in_with_a_key_and_shows_only_the_users_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, c, op) = secured(dir.path(), &[]);
    create_tenant(&c, &op, json!({"name": "city"}));
    create_tenant(&c, &op, json!({"name": "other"}));
    let viewer = new_key(&c, &op, "city", json!({"roles": ["viewer"]}));
    // The browser's side: the session cookie the login sets, sent back.
    let http = reqwest::blocking::Client::new();
    let get = |path: &str, cookie: Option<&str>| {
        let mut req = http.get(format!("{}{path}", c.base));
        if let Some(cookie) = cookie {
            req = req.header("Cookie", cookie);
        }
        req.send().unwrap()
    };
    let config: Value = get("/dashboard/api/config", None).json().unwrap();
    assert_eq!(config["auth"], true);
    assert_eq!(config["signedIn"], false);
    assert_eq!(get("/dashboard/api/tenants", None).status(), 401);
    let login = |key: &str| {
        http.post(format!("{}/dashboard/api/login", c.base))
            .json(&json!({"apiKey": key}))
            .send()
            .unwrap()
    };
    assert_eq!(login("bk_00_11").status(), 401);
    let r = login(&viewer);
    assert_eq!(r.status(), 204);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    let config: Value = get("/dashboard/api/config", Some(&cookie)).json().unwrap();
    assert_eq!(config["signedIn"], true);
    let tenants: Value = get("/dashboard/api/tenants", Some(&cookie)).json().unwrap();
    let names: Vec<&str> = tenants["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["city"]);
    assert_eq!(
        get("/dashboard/api/summary?tenant=other", Some(&cookie)).status(),
        403
    );
    assert_eq!(
        get("/dashboard/api/summary?tenant=city", Some(&cookie)).status(),
        200
    );
    http.post(format!("{}/dashboard/api/logout", c.base))
        .header("Cookie", &cookie)
        .send()
        .unwrap();
    assert_eq!(
        get("/dashboard/api/summary?tenant=city", Some(&cookie)).status(),
        401
    );
}
