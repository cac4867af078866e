//! OpenID Connect end to end, on the real binary: `borough serve --auth on
//! --oidc-issuer ...` trusting a real, certified OpenID Provider (panva's
//! oidc-provider from scripts/oidc-provider, run by Node.js), with access
//! tokens from its token endpoint (client_credentials grant). What a caller
//! sees: a token's tenant and roles decide what it may do; a token that is
//! garbage, unsigned, tampered with, expired or meant for another API is a
//! 401 problem; a rotated signing key is picked up without a restart.
//! Without Node.js this test fails: it is never skipped.

mod support;

use borough_access::oidc::provider::{self, AUDIENCE, Provider};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::{Answer, Client, start};

/// Borough fetches the key set again for an unknown key at most this often
/// (`--oidc-jwks-refresh-secs`, shorter than its default of 30 s).
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(10);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// New private signing keys (RS256), as oidc-provider wants them in its JWKS.
fn keygen(kids: &[&str]) -> Vec<Value> {
    kids.iter()
        .map(|kid| provider::keygen(&repo_root(), kid, "RS256").expect("node provider.mjs keygen"))
        .collect()
}

/// Starts panva's oidc-provider on `port` (0: any) with `keys` (private
/// JWKs; the first one signs, the others are only published).
fn start_provider(dir: &Path, port: u16, keys: &[&Value]) -> Provider {
    Provider::start(&repo_root(), dir, port, keys)
        .unwrap_or_else(|e| panic!("oidc-provider did not start: {e}"))
}

/// Tokens signed with `key` (a private JWK of the provider's) for `claims`:
/// what the provider itself would never issue, such as an expired token.
fn sign(key: &Value, claims: &[Value]) -> Vec<String> {
    const SCRIPT: &str = r#"
const { createPrivateKey, sign } = require('node:crypto');
const jwk = JSON.parse(process.env.JWK);
const key = createPrivateKey({ key: jwk, format: 'jwk' });
const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
for (const claims of JSON.parse(process.env.CLAIMS)) {
  const input = b64({ alg: 'RS256', typ: 'at+jwt', kid: jwk.kid }) + '.' + b64(claims);
  console.log(input + '.' + sign('sha256', Buffer.from(input), key).toString('base64url'));
}
"#;
    let out = Command::new("node")
        .args(["-e", SCRIPT])
        .env("JWK", key.to_string())
        .env("CLAIMS", Value::from(claims.to_vec()).to_string())
        .output()
        .expect("node -e (sign)");
    assert!(
        out.status.success(),
        "signing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tokens: Vec<String> = String::from_utf8(out.stdout)
        .expect("tokens are ASCII")
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(tokens.len(), claims.len());
    tokens
}

// ------------------------------------------------------------ tokens by hand

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn b64url_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(B64URL[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

fn b64url_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut bits, mut n) = (0u32, 0u32);
    for c in text.bytes() {
        let v = B64URL.iter().position(|&x| x == c).expect("base64url") as u32;
        n = n << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((n >> bits & 0xff) as u8);
        }
    }
    out
}

fn segment(value: &Value) -> String {
    b64url_encode(value.to_string().as_bytes())
}

/// The JOSE header and the claims of a compact JWS.
fn decode(token: &str) -> (Value, Value) {
    let mut parts = token.split('.');
    let mut next = || {
        let part = parts.next().expect("a JWS has three parts");
        serde_json::from_slice(&b64url_decode(part)).expect("a JSON segment")
    };
    (next(), next())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

// ---------------------------------------------------------------- the API

fn ok(answer: &Answer, status: u16, what: &str) {
    assert_eq!(answer.status, status, "{what}: {}", answer.body);
}

/// A refusal as the caller sees it: the status, Borough's problem type, a
/// detail that says why, and for a 401 the challenge.
fn refused(answer: &Answer, status: u16, detail: &str, what: &str) {
    assert_eq!(answer.status, status, "{what}: {}", answer.body);
    let kind = if status == 401 {
        "Unauthorized"
    } else {
        "Forbidden"
    };
    assert_eq!(
        answer.body["type"],
        format!("urn:borough:problem:{kind}"),
        "{what}: {}",
        answer.body
    );
    let said = answer.body["detail"].as_str().unwrap_or_default();
    assert!(
        said.contains(detail),
        "{what}: the detail {said:?} should say {detail:?}"
    );
    if status == 401 {
        assert_eq!(
            answer
                .headers
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap()),
            Some("Bearer realm=\"borough\""),
            "{what}"
        );
    }
}

const ENTITIES: &str = "/ngsi-ld/v1/entities";
const SPOTS: &str = "/ngsi-ld/v1/entities?type=ParkingSpot";

fn spot(n: u32) -> Value {
    json!({
        "id": format!("urn:ngsi-ld:ParkingSpot:{n}"),
        "type": "ParkingSpot",
        "status": {"type": "Property", "value": "free"},
    })
}

#[test]
fn tokens_of_a_real_openid_provider_through_the_binary() {
    provider::ensure_installed(&repo_root())
        .unwrap_or_else(|e| panic!("this test needs Node.js and npm: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let keys = keygen(&["key-1", "key-2"]);
    let (old_key, new_key) = (&keys[0], &keys[1]);
    let provider = start_provider(dir.path(), 0, &[old_key]);

    let issuer = provider.issuer().to_owned();
    let oidc = |audience: &str| {
        [
            "--auth",
            "on",
            "--oidc-issuer",
            issuer.as_str(),
            "--oidc-audience",
            audience,
            "--oidc-tenant-claim",
            "tenant",
            "--oidc-roles-claim",
            "roles",
            "--oidc-jwks-refresh-secs",
            "10",
        ]
        .map(str::to_owned)
    };
    let data = dir.path().join("data");
    let args = oidc(AUDIENCE);
    let server = start(&data, &args.iter().map(String::as_str).collect::<Vec<_>>());
    // Borough read the key set before it printed its address: from here on
    // it will not fetch it again for JWKS_MIN_REFRESH.
    let keys_fetched = Instant::now();
    let api = Client::new(&server.base);
    let op = server.operator_key.clone().expect("an operator key");
    for name in ["city", "other"] {
        ok(
            &api.post("/api/v1/tenants", &op, None, json!({ "name": name })),
            201,
            name,
        );
    }

    let editor = provider.token("city-editor").expect("a token");
    let viewer = provider.token("city-viewer").expect("a token");
    let admin = provider.token("other-admin").expect("a token");

    // The token's tenant and roles are the caller's.
    for (token, subject, tenant, role) in [
        (&editor, "city-editor", "city", "editor"),
        (&viewer, "city-viewer", "city", "viewer"),
        (&admin, "other-admin", "other", "tenant-admin"),
    ] {
        let me = api.get("/api/v1/me", token, None);
        ok(&me, 200, subject);
        assert_eq!(me.body["subject"], subject);
        assert_eq!(me.body["tenants"], json!([tenant]));
        assert_eq!(me.body["roles"], json!([role]));
    }

    // An editor of city reads and writes city, and nothing else.
    let city = Some("city");
    ok(
        &api.post(ENTITIES, &editor, city, spot(1)),
        201,
        "editor creates",
    );
    let read = api.get(
        &format!("{ENTITIES}/urn:ngsi-ld:ParkingSpot:1"),
        &editor,
        city,
    );
    ok(&read, 200, "editor reads");
    assert_eq!(read.body["status"]["value"], "free");
    refused(
        &api.post(ENTITIES, &editor, Some("other"), spot(2)),
        403,
        "city-editor may not use tenant 'other'",
        "editor writes in other",
    );
    refused(
        &api.get(SPOTS, &editor, Some("other")),
        403,
        "may not use tenant 'other'",
        "editor reads other",
    );
    refused(
        &api.get("/api/v1/keys", &editor, city),
        403,
        "may not administer the tenant here: its roles (editor)",
        "editor lists keys",
    );
    refused(
        &api.post("/api/v1/keys", &editor, city, json!({"roles": ["editor"]})),
        403,
        "may not administer the tenant",
        "editor makes a key",
    );
    refused(
        &api.get("/api/v1/tenants", &editor, None),
        403,
        "may not do what only the operator does",
        "editor lists tenants",
    );
    refused(
        &api.post("/api/v1/tenants", &editor, None, json!({"name": "mine"})),
        403,
        "may not do what only the operator does",
        "editor makes a tenant",
    );

    // A viewer of city reads it and changes nothing.
    let read = api.get(SPOTS, &viewer, city);
    ok(&read, 200, "viewer queries");
    assert_eq!(read.body.as_array().map(Vec::len), Some(1), "{}", read.body);
    refused(
        &api.post(ENTITIES, &viewer, city, spot(3)),
        403,
        "city-viewer may not write here: its roles (viewer)",
        "viewer creates",
    );
    refused(
        &api.call(
            "PATCH",
            &format!("{ENTITIES}/urn:ngsi-ld:ParkingSpot:1/attrs"),
            Some(&viewer),
            city,
            Some(json!({"status": {"type": "Property", "value": "occupied"}})),
        ),
        403,
        "may not write",
        "viewer patches",
    );

    // The administrator of other runs other: its keys and its data; not city,
    // not the tenants.
    let other = Some("other");
    ok(
        &api.get("/api/v1/keys", &admin, other),
        200,
        "admin lists keys",
    );
    let made = api.post("/api/v1/keys", &admin, other, json!({"roles": ["viewer"]}));
    ok(&made, 201, "admin makes a key");
    assert_eq!(made.body["tenant"], "other");
    ok(
        &api.post(ENTITIES, &admin, other, spot(4)),
        201,
        "admin writes",
    );
    let key = made.body["key"].as_str().expect("the new key");
    let read = api.get(&format!("{ENTITIES}/urn:ngsi-ld:ParkingSpot:4"), key, other);
    ok(&read, 200, "the admin's new key reads other");
    refused(
        &api.get("/api/v1/keys", &admin, city),
        403,
        "other-admin may not use tenant 'city'",
        "admin lists city's keys",
    );
    refused(
        &api.get(SPOTS, &admin, city),
        403,
        "may not use tenant 'city'",
        "admin reads city",
    );
    refused(
        &api.call(
            "PATCH",
            "/api/v1/tenants/other",
            Some(&admin),
            None,
            Some(json!({"plan": "gold"})),
        ),
        403,
        "may not do what only the operator does",
        "admin changes its tenant's record",
    );

    // Roles are Borough's names; names it does not know give nothing, and a
    // token with none of its roles is refused. Signed with the provider's
    // own key: only the claims are wrong.
    let (_, claims) = decode(&editor);
    let with = |changes: Value| {
        let mut c = claims.clone();
        c.as_object_mut()
            .unwrap()
            .extend(changes.as_object().unwrap().clone());
        c
    };
    let now = unix_now();
    let signed = sign(
        old_key,
        &[
            with(json!({"roles": ["viewer", "device-manager", "superuser"]})),
            with(json!({"roles": ["city-planner"]})),
            // Beyond Borough's 60 s of clock-skew leeway.
            with(json!({"iat": now - 900, "exp": now - 600})),
        ],
    );
    let me = api.get("/api/v1/me", &signed[0], None);
    ok(&me, 200, "known roles of three");
    assert_eq!(me.body["roles"], json!(["viewer", "device-manager"]));
    refused(
        &api.get(SPOTS, &signed[1], city),
        403,
        "the token carries no Borough role",
        "no Borough role",
    );
    let expired = &signed[2];

    // Tokens that prove nothing: 401 with a problem that says why.
    let (header, _) = decode(&editor);
    assert_eq!(header["alg"], "RS256");
    let unsigned = format!(
        "{}.{}.",
        segment(&json!({"alg": "none", "typ": "JWT"})),
        segment(&claims)
    );
    let mut parts: Vec<&str> = editor.split('.').collect();
    let promoted = segment(&with(json!({"tenant": "other", "roles": ["tenant-admin"]})));
    parts[1] = &promoted;
    let tampered = parts.join(".");
    for (token, tenant, detail, what) in [
        (
            "not-a-token",
            city,
            "the credential is neither an API key nor a token",
            "garbage",
        ),
        (
            "eyJhbGciOi.garbage.x",
            city,
            "the token is not valid: malformed token",
            "garbage in three parts",
        ),
        (
            unsigned.as_str(),
            city,
            "the token is not valid: unsupported algorithm none",
            "alg none",
        ),
        (
            tampered.as_str(),
            other,
            "the token is not valid: invalid signature",
            "payload changed",
        ),
        (
            expired.as_str(),
            city,
            "the token is not valid: token expired",
            "expired",
        ),
    ] {
        refused(&api.get(SPOTS, token, tenant), 401, detail, what);
    }
    // Refusals change nothing: the genuine token still works.
    ok(&api.get(SPOTS, &editor, city), 200, "editor after refusals");

    // A Borough serving another API refuses tokens meant for this one.
    let other_api = start(
        &dir.path().join("data-other"),
        &oidc("urn:other")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    refused(
        &Client::new(&other_api.base).get(SPOTS, &editor, city),
        401,
        "the token is not valid: wrong audience",
        "another audience",
    );
    drop(other_api);

    // Key rotation: the provider restarts on its port with a new signing
    // key, the old one still published. Borough has never seen the new key:
    // it fetches the key set again, at most once per JWKS_MIN_REFRESH.
    let port = provider.port();
    // SIGTERM; the provider must exit 0 promptly (its port is then free).
    provider.stop().expect("the provider stops");
    let provider = start_provider(dir.path(), port, &[new_key, old_key]);
    assert_eq!(provider.issuer(), issuer);
    let rotated = provider.token("city-editor").expect("a token");
    assert_eq!(decode(&rotated).0["kid"], "key-2");
    let spot_1 = format!("{ENTITIES}/urn:ngsi-ld:ParkingSpot:1");
    if keys_fetched.elapsed() + Duration::from_secs(5) < JWKS_MIN_REFRESH {
        refused(
            &api.get(&spot_1, &rotated, city),
            401,
            "the token is not valid: unknown signing key",
            "new key before a refetch is allowed",
        );
    }
    let refetch_allowed = keys_fetched + JWKS_MIN_REFRESH + Duration::from_millis(500);
    std::thread::sleep(refetch_allowed.saturating_duration_since(Instant::now()));
    let read = api.get(&spot_1, &rotated, city);
    ok(&read, 200, "a token signed with the new key");
    assert_eq!(read.body["id"], "urn:ngsi-ld:ParkingSpot:1");
    ok(
        &api.get(&spot_1, &editor, city),
        200,
        "old key, still published",
    );
    provider.stop().expect("the provider stops");
}
