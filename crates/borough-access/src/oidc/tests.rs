//! Every way a token can be refused, against a provider served in-process
//! with keys generated for the run.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

use super::*;

const AUDIENCE: &str = "urn:borough:api";
/// The refresh intervals of the timing tests: long enough that a loaded
/// machine finishes a step's verifications well within one.
const TIME_STEP: Duration = Duration::from_millis(400);

struct TestKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    /// The public JWK as a provider would publish it.
    jwk: Value,
}

impl TestKey {
    fn rsa(kid: &str) -> TestKey {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::traits::PublicKeyParts;
        let key = rsa::PrivateKey::new(&mut getrandom04::SysRng, 2048).expect("RSA key");
        let der = key.to_pkcs1_der().expect("PKCS#1");
        let b64 = |bytes: &[u8]| {
            let start = bytes.iter().position(|&b| b != 0).unwrap_or(0);
            URL_SAFE_NO_PAD.encode(&bytes[start..])
        };
        TestKey {
            kid: kid.into(),
            alg: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_der(der.as_bytes()),
            jwk: json!({
                "kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
                "n": b64(&key.n().to_be_bytes()), "e": b64(&key.e().to_be_bytes()),
            }),
        }
    }

    fn es256(kid: &str) -> TestKey {
        use p256::pkcs8::EncodePrivateKey;
        let secret = loop {
            if let Ok(secret) = p256::SecretKey::from_slice(&random_bytes::<32>()) {
                break secret;
            }
        };
        let point = secret.public_key().to_sec1_bytes();
        assert_eq!(point.len(), 65, "uncompressed P-256 point");
        TestKey {
            kid: kid.into(),
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_der(secret.to_pkcs8_der().expect("PKCS#8").as_bytes()),
            jwk: json!({
                "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
                "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&point[33..]),
            }),
        }
    }

    fn ed25519(kid: &str) -> TestKey {
        let seed = random_bytes::<32>();
        let public = ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .to_bytes();
        // PKCS#8 of an Ed25519 seed is a fixed 16-byte prefix (RFC 8410).
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&seed);
        TestKey {
            kid: kid.into(),
            alg: Algorithm::EdDSA,
            encoding: EncodingKey::from_ed_der(&der),
            jwk: json!({
                "kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA",
                "x": URL_SAFE_NO_PAD.encode(public),
            }),
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        self.sign_with(header, claims)
    }

    fn sign_with(&self, header: Header, claims: &Value) -> String {
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign")
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0; N];
    getrandom::fill(&mut bytes).expect("OS randomness");
    bytes
}

// RSA key generation takes a while in a debug build: two keys serve all tests.
static RSA_A: LazyLock<TestKey> = LazyLock::new(|| TestKey::rsa("rsa-a"));
static RSA_B: LazyLock<TestKey> = LazyLock::new(|| TestKey::rsa("rsa-b"));

fn jwks(keys: &[&TestKey]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() })
}

/// An OpenID Provider reduced to discovery and JWKS, with knobs.
struct FakeIdp {
    url: String,
    /// The `issuer` its discovery document names.
    discovery_issuer: Mutex<String>,
    jwks: Mutex<String>,
    jwks_fetches: AtomicUsize,
    up: AtomicBool,
}

impl FakeIdp {
    async fn start(jwks: Value) -> Arc<FakeIdp> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let idp = Arc::new(FakeIdp {
            discovery_issuer: Mutex::new(url.clone()),
            url,
            jwks: Mutex::new(jwks.to_string()),
            jwks_fetches: AtomicUsize::new(0),
            up: AtomicBool::new(true),
        });
        let app = axum::Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(serve_jwks))
            .with_state(idp.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        idp
    }

    fn publish(&self, jwks: Value) {
        *self.jwks.lock().unwrap() = jwks.to_string();
    }

    fn fetches(&self) -> usize {
        self.jwks_fetches.load(Ordering::SeqCst)
    }

    fn claims(&self) -> Value {
        let now = unix_now() as i64;
        json!({
            "iss": self.url, "sub": "city-editor", "aud": AUDIENCE,
            "iat": now, "exp": now + 300,
            "tenant": "city", "roles": ["editor"],
        })
    }

    async fn verifier(&self, adjust: impl FnOnce(&mut OidcConfig)) -> OidcVerifier {
        let mut config = OidcConfig::new(&self.url);
        config.audience = Some(AUDIENCE.into());
        adjust(&mut config);
        OidcVerifier::discover(config, reqwest::Client::new())
            .await
            .expect("discovery")
    }
}

async fn discovery(State(idp): State<Arc<FakeIdp>>) -> Response {
    let issuer = idp.discovery_issuer.lock().unwrap().clone();
    axum::Json(json!({ "issuer": issuer, "jwks_uri": format!("{}/jwks", idp.url) })).into_response()
}

async fn serve_jwks(State(idp): State<Arc<FakeIdp>>) -> Response {
    idp.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    if !idp.up.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let body = idp.jwks.lock().unwrap().clone();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn with(mut claims: Value, name: &str, value: Value) -> Value {
    claims[name] = value;
    claims
}

fn without(mut claims: Value, name: &str) -> Value {
    claims.as_object_mut().unwrap().remove(name);
    claims
}

fn b64(json: &Value) -> String {
    URL_SAFE_NO_PAD.encode(json.to_string())
}

#[test]
fn the_verifier_is_shareable_across_tasks() {
    fn send_sync<T: Send + Sync>() {}
    // Never called: it only has to compile, as axum handlers need a Send future.
    fn verify_is_send(verifier: &OidcVerifier) -> impl Send + '_ {
        verifier.verify("")
    }
    send_sync::<OidcVerifier>();
    let _ = verify_is_send;
}

#[tokio::test]
async fn a_valid_token_maps_subject_tenant_and_roles() {
    let idp = FakeIdp::start(jwks(&[&RSA_A])).await;
    let verifier = idp.verifier(|_| {}).await;
    let claims = idp.claims();
    let token = verifier.verify(&RSA_A.sign(&claims)).await.unwrap();
    assert_eq!(
        token,
        VerifiedToken {
            subject: "city-editor".into(),
            tenants: vec!["city".into()],
            roles: vec!["editor".into()],
            expires_at: claims["exp"].as_i64().unwrap(),
            issuer: idp.url.clone(),
        }
    );
    assert_eq!(idp.fetches(), 1, "verifying needs no further fetch");
}

#[tokio::test]
async fn garbled_tokens_are_malformed() {
    let idp = FakeIdp::start(jwks(&[&RSA_A])).await;
    let verifier = idp.verifier(|_| {}).await;
    let good = RSA_A.sign(&idp.claims());
    let header = json!({ "alg": "RS256", "kid": "rsa-a" });
    let too_long = format!("{good}{}", "A".repeat(MAX_TOKEN_LEN));
    let bearer = format!("Bearer {good}");
    let spaced = format!(" {good}");
    let four_parts = format!("{good}.xyz");
    let not_json = format!("{}.{}.sig", URL_SAFE_NO_PAD.encode("{alg"), b64(&json!({})));
    let no_alg = format!("{}.{}.sig", b64(&json!({"kid": "rsa-a"})), b64(&json!({})));
    let no_signature = format!("{}.{}.", b64(&header), b64(&idp.claims()));
    for token in [
        "",
        "abc",
        "a.b",
        "..",
        "!!!.???.###",
        &too_long,
        &bearer,
        &spaced,
        &four_parts,
        &not_json,
        &no_alg,
        &no_signature,
    ] {
        assert_eq!(
            verifier.verify(token).await,
            Err(TokenError::Malformed),
            "{token:.60}"
        );
    }
    // Correctly signed, but the claims are not a JSON object.
    let array = RSA_A.sign(&json!(["iss", "exp"]));
    assert_eq!(verifier.verify(&array).await, Err(TokenError::Malformed));
}

#[tokio::test]
async fn alg_none_and_unknown_algorithms_are_refused() {
    let idp = FakeIdp::start(jwks(&[&RSA_A])).await;
    let verifier = idp.verifier(|_| {}).await;
    let payload = b64(&idp.claims());
    for alg in ["none", "None", "", "ES512", "RSA-OAEP"] {
        let header = b64(&json!({ "alg": alg, "kid": "rsa-a" }));
        for token in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}.c2ln"),
        ] {
            let err = verifier.verify(&token).await.unwrap_err();
            assert!(
                matches!(err, TokenError::UnsupportedAlgorithm(_)),
                "{alg}: {err:?}"
            );
        }
    }
    // What goes back to the client is cleaned of anything header-breaking.
    let header = b64(&json!({ "alg": "RS256\r\nX-Evil: yes and much more text" }));
    let err = verifier
        .verify(&format!("{header}.{payload}.c2ln"))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        TokenError::UnsupportedAlgorithm("RS256X-Evilyesan".into())
    );
    assert_eq!(err.to_string(), "unsupported algorithm RS256X-Evilyesan");
}

#[tokio::test]
async fn hmac_tokens_are_refused_even_when_keyed_with_the_public_key() {
    let oct = json!({ "kty": "oct", "kid": "shared", "alg": "HS256",
                      "k": URL_SAFE_NO_PAD.encode(b"a published shared secret") });
    let mut keys = jwks(&[&RSA_A]);
    keys["keys"].as_array_mut().unwrap().push(oct);
    let idp = FakeIdp::start(keys).await;
    let verifier = idp.verifier(|_| {}).await;
    let claims = idp.claims();
    let n = RSA_A.jwk["n"].as_str().unwrap();
    let (modulus, jwk_text) = (URL_SAFE_NO_PAD.decode(n).unwrap(), RSA_A.jwk.to_string());
    let secrets: [&[u8]; 4] = [
        &modulus,
        n.as_bytes(),
        jwk_text.as_bytes(),
        b"a published shared secret",
    ];
    for (alg, secret) in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512]
        .into_iter()
        .flat_map(|alg| secrets.iter().map(move |s| (alg, s)))
    {
        for kid in [Some("rsa-a"), Some("shared"), None] {
            let mut header = Header::new(alg);
            header.kid = kid.map(str::to_owned);
            let token =
                jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret).unwrap())
                    .unwrap();
            assert_eq!(
                verifier.verify(&token).await,
                Err(TokenError::UnsupportedAlgorithm(format!("{alg:?}"))),
            );
        }
    }
}

#[tokio::test]
async fn the_tokens_alg_must_be_the_keys() {
    let es = TestKey::es256("ec-1");
    // rsa-b's key, published without `alg` under another kid.
    let mut rsa_any = RSA_B.jwk.clone();
    rsa_any["kid"] = json!("rsa-any");
    rsa_any.as_object_mut().unwrap().remove("alg");
    let mut keys = jwks(&[&RSA_A, &es]);
    keys["keys"].as_array_mut().unwrap().push(rsa_any);
    let idp = FakeIdp::start(keys).await;
    let verifier = idp.verifier(|_| {}).await;
    let claims = idp.claims();

    // rsa-a is published for RS256 only.
    let mut ps256 = Header::new(Algorithm::PS256);
    ps256.kid = Some("rsa-a".into());
    assert_eq!(
        verifier.verify(&RSA_A.sign_with(ps256, &claims)).await,
        Err(TokenError::UnsupportedAlgorithm("PS256".into()))
    );
    // An RSA kid with an EC algorithm, and the other way round.
    let mut es_on_rsa = Header::new(Algorithm::ES256);
    es_on_rsa.kid = Some("rsa-a".into());
    assert_eq!(
        verifier.verify(&es.sign_with(es_on_rsa, &claims)).await,
        Err(TokenError::UnsupportedAlgorithm("ES256".into()))
    );
    let mut rs_on_ec = Header::new(Algorithm::RS256);
    rs_on_ec.kid = Some("ec-1".into());
    assert_eq!(
        verifier.verify(&RSA_A.sign_with(rs_on_ec, &claims)).await,
        Err(TokenError::UnsupportedAlgorithm("RS256".into()))
    );
    // A key published without `alg` takes any algorithm of its type.
    for alg in [
        Algorithm::RS256,
        Algorithm::PS256,
        Algorithm::RS512,
        Algorithm::PS384,
    ] {
        let mut header = Header::new(alg);
        header.kid = Some("rsa-any".into());
        let token = RSA_B.sign_with(header, &claims);
        assert!(verifier.verify(&token).await.is_ok(), "{alg:?}");
    }
    assert!(verifier.verify(&es.sign(&claims)).await.is_ok());
}

#[tokio::test]
async fn es256_and_eddsa_tokens_verify() {
    let es = TestKey::es256("ec-1");
    let ed = TestKey::ed25519("ed-1");
    let idp = FakeIdp::start(jwks(&[&es, &ed])).await;
    let verifier = idp.verifier(|_| {}).await;
    for key in [&es, &ed] {
        let token = verifier.verify(&key.sign(&idp.claims())).await;
        assert_eq!(
            token.map(|t| t.subject),
            Ok("city-editor".into()),
            "{}",
            key.kid
        );
    }
    // Another Ed25519 key under the same kid.
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("ed-1".into());
    let forged = TestKey::ed25519("ed-1").sign_with(header, &idp.claims());
    assert_eq!(
        verifier.verify(&forged).await,
        Err(TokenError::BadSignature)
    );
}

#[tokio::test]
async fn wrong_signatures_are_refused() {
    let idp = FakeIdp::start(jwks(&[&RSA_A])).await;
    let verifier = idp.verifier(|_| {}).await;
    let claims = idp.claims();

    // Signed by another key under rsa-a's kid.
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-a".into());
    let forged = RSA_B.sign_with(header, &claims);
    assert_eq!(
        verifier.verify(&forged).await,
        Err(TokenError::BadSignature)
    );

    // A genuine signature over other claims.
    let genuine = RSA_A.sign(&claims);
    let admin = RSA_A.sign(&with(claims.clone(), "roles", json!(["tenant-admin"])));
    let (head, rest) = genuine.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let admin_payload = admin.split('.').nth(1).unwrap();
    let spliced = format!("{head}.{admin_payload}.{signature}");
    assert_eq!(
        verifier.verify(&spliced).await,
        Err(TokenError::BadSignature)
    );

    // A damaged signature.
    let damaged = format!("{}AAAAAAAA", &genuine[..genuine.len() - 8]);
    assert_eq!(
        verifier.verify(&damaged).await,
        Err(TokenError::BadSignature)
    );
}

#[tokio::test]
async fn a_token_without_kid_needs_exactly_one_fitting_key() {
    let ed = TestKey::ed25519("ed-1");
    let idp = FakeIdp::start(jwks(&[&RSA_A, &ed])).await;
    let verifier = idp.verifier(|_| {}).await;
    let claims = idp.claims();
    // One RSA key, one Ed25519 key: each algorithm has one candidate.
    let rs = RSA_A.sign_with(Header::new(Algorithm::RS256), &claims);
    let eddsa = ed.sign_with(Header::new(Algorithm::EdDSA), &claims);
    assert!(verifier.verify(&rs).await.is_ok());
    assert!(verifier.verify(&eddsa).await.is_ok());

    let idp = FakeIdp::start(jwks(&[&RSA_A, &RSA_B])).await;
    let verifier = idp.verifier(|_| {}).await;
    let rs = RSA_A.sign_with(Header::new(Algorithm::RS256), &idp.claims());
    assert_eq!(verifier.verify(&rs).await, Err(TokenError::UnknownKey));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kid_refetches_once_and_not_too_often() {
    let idp = FakeIdp::start(jwks(&[&RSA_A])).await;
    // Signed first: generating the key must not eat into the intervals.
    let (a_token, b_token) = (RSA_A.sign(&idp.claims()), RSA_B.sign(&idp.claims()));
    let min_refresh = TIME_STEP;
    let verifier = Arc::new(idp.verifier(|c| c.jwks_min_refresh = min_refresh).await);
    assert_eq!(idp.fetches(), 1);

    // Right after discovery: too soon to fetch again.
    assert_eq!(verifier.verify(&b_token).await, Err(TokenError::UnknownKey));
    assert_eq!(idp.fetches(), 1);

    // A burst of unknown kids makes one fetch between them.
    tokio::time::sleep(min_refresh + Duration::from_millis(50)).await;
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (verifier, token) = (verifier.clone(), b_token.clone());
        burst.spawn(async move { verifier.verify(&token).await });
    }
    while let Some(result) = burst.join_next().await {
        assert_eq!(result.unwrap(), Err(TokenError::UnknownKey));
    }
    assert_eq!(idp.fetches(), 2);

    // The provider rotates in rsa-b: found once the limit allows a fetch.
    idp.publish(jwks(&[&RSA_B, &RSA_A]));
    assert_eq!(verifier.verify(&b_token).await, Err(TokenError::UnknownKey));
    assert_eq!(idp.fetches(), 2);
    tokio::time::sleep(min_refresh + Duration::from_millis(50)).await;
    assert!(verifier.verify(&b_token).await.is_ok());
    assert!(verifier.verify(&a_token).await.is_ok());
    assert_eq!(idp.fetches(), 3);
}

#[tokio::test]
async fn an_old_key_set_is_refreshed_at_use() {
    let idp = FakeIdp::start(jwks(&[&RSA_A])).await;
    let (a_token, b_token) = (RSA_A.sign(&idp.claims()), RSA_B.sign(&idp.claims()));
    let max_age = TIME_STEP;
    let verifier = idp
        .verifier(|c| {
            c.jwks_max_age = max_age;
            c.jwks_min_refresh = max_age;
        })
        .await;
    assert!(verifier.verify(&a_token).await.is_ok());

    // rsa-a is withdrawn: trusted until the set is old, refused after.
    idp.publish(jwks(&[&RSA_B]));
    assert!(verifier.verify(&a_token).await.is_ok());
    tokio::time::sleep(max_age + Duration::from_millis(50)).await;
    assert_eq!(verifier.verify(&a_token).await, Err(TokenError::UnknownKey));
    assert_eq!(idp.fetches(), 2);
    assert!(verifier.verify(&b_token).await.is_ok());
    assert_eq!(idp.fetches(), 2);
}

#[tokio::test]
async fn a_provider_outage_keeps_the_known_keys() {
    let idp = FakeIdp::start(jwks(&[&RSA_A])).await;
    let (a_token, b_token) = (RSA_A.sign(&idp.claims()), RSA_B.sign(&idp.claims()));
    let verifier = idp
        .verifier(|c| {
            c.jwks_max_age = TIME_STEP;
            c.jwks_min_refresh = TIME_STEP;
        })
        .await;
    let past_step = TIME_STEP + Duration::from_millis(50);
    idp.up.store(false, Ordering::SeqCst);
    tokio::time::sleep(past_step).await;

    // The stale set cannot be refreshed: its keys still verify.
    assert!(verifier.verify(&a_token).await.is_ok());
    assert_eq!(idp.fetches(), 2);
    // An unknown key needs the provider; too soon to ask again, the last
    // failure is the answer.
    let err = verifier.verify(&b_token).await.unwrap_err();
    assert!(
        matches!(err, TokenError::ProviderUnavailable(ref why) if why.contains("503")),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "identity provider unavailable");
    assert_eq!(idp.fetches(), 2);
    tokio::time::sleep(past_step).await;
    let err = verifier.verify(&b_token).await.unwrap_err();
    assert!(matches!(err, TokenError::ProviderUnavailable(_)), "{err:?}");
    assert_eq!(idp.fetches(), 3);
    // Back up: the key set is fetched again and the provider forgiven.
    idp.up.store(true, Ordering::SeqCst);
    tokio::time::sleep(past_step).await;
    assert_eq!(verifier.verify(&b_token).await, Err(TokenError::UnknownKey));
    assert_eq!(idp.fetches(), 4);
}

#[tokio::test]
async fn validity_times_are_checked_with_leeway() {
    let idp = FakeIdp::start(jwks(&[&RSA_A])).await;
    let verifier = idp.verifier(|_| {}).await;
    let strict = idp.verifier(|c| c.leeway = Duration::ZERO).await;
    let now = unix_now() as i64;
    let claims = idp.claims();
    #[rustfmt::skip]
    let cases = [
        (with(claims.clone(), "exp", json!(now - 120)), Err(TokenError::Expired), Err(TokenError::Expired)),
        (with(claims.clone(), "exp", json!(now - 30)), Ok(()), Err(TokenError::Expired)),
        (with(claims.clone(), "nbf", json!(now + 120)), Err(TokenError::NotYetValid), Err(TokenError::NotYetValid)),
        (with(claims.clone(), "nbf", json!(now + 30)), Ok(()), Err(TokenError::NotYetValid)),
        (with(claims.clone(), "nbf", json!(now - 30)), Ok(()), Ok(())),
        (with(claims.clone(), "iat", json!(now + 120)), Err(TokenError::NotYetValid), Err(TokenError::NotYetValid)),
        (with(claims.clone(), "iat", json!(now + 30)), Ok(()), Err(TokenError::NotYetValid)),
        (with(claims.clone(), "iat", json!("yesterday")), Err(TokenError::Malformed), Err(TokenError::Malformed)),
        (with(claims.clone(), "exp", json!("tomorrow")), Err(TokenError::MissingClaim("exp".into())), Err(TokenError::MissingClaim("exp".into()))),
        (without(claims.clone(), "exp"), Err(TokenError::MissingClaim("exp".into())), Err(TokenError::MissingClaim("exp".into()))),
    ];
    for (claims, lenient, exact) in cases {
        let token = RSA_A.sign(&claims);
        assert_eq!(verifier.verify(&token).await.map(drop), lenient, "{claims}");
        assert_eq!(
            strict.verify(&token).await.map(drop),
            exact,
            "leeway 0: {claims}"
        );
    }
}

#[tokio::test]
async fn issuer_and_audience_must_match() {
    let idp = FakeIdp::start(jwks(&[&RSA_A])).await;
    let verifier = idp.verifier(|_| {}).await;
    let any_audience = idp.verifier(|c| c.audience = None).await;
    let claims = idp.claims();
    let other_issuer = format!("{}/", idp.url);
    #[rustfmt::skip]
    let cases = [
        (with(claims.clone(), "iss", json!(other_issuer)), Err(TokenError::WrongIssuer)),
        (with(claims.clone(), "iss", json!("https://evil.example")), Err(TokenError::WrongIssuer)),
        (without(claims.clone(), "iss"), Err(TokenError::MissingClaim("iss".into()))),
        (with(claims.clone(), "aud", json!("urn:other:api")), Err(TokenError::WrongAudience)),
        (with(claims.clone(), "aud", json!(["urn:other:api"])), Err(TokenError::WrongAudience)),
        (with(claims.clone(), "aud", json!(["urn:other:api", AUDIENCE])), Ok(())),
        (without(claims.clone(), "aud"), Err(TokenError::MissingClaim("aud".into()))),
    ];
    for (claims, expected) in cases {
        assert_eq!(
            verifier.verify(&RSA_A.sign(&claims)).await.map(drop),
            expected,
            "{claims}"
        );
    }
    // Without a configured audience any `aud`, or none, passes.
    for claims in [
        with(claims.clone(), "aud", json!("urn:other:api")),
        without(claims, "aud"),
    ] {
        assert!(
            any_audience.verify(&RSA_A.sign(&claims)).await.is_ok(),
            "{claims}"
        );
    }
}

#[tokio::test]
async fn tenant_and_roles_claims_are_mapped() {
    let idp = FakeIdp::start(jwks(&[&RSA_A])).await;
    let nested = idp
        .verifier(|c| {
            c.tenant_claim = "borough.tenant".into();
            c.roles_claim = "realm_access.roles".into();
        })
        .await;
    let dotted_name = idp
        .verifier(|c| {
            c.tenant_claim = "https://borough.example/tenant".into();
            c.roles_claim = "scope".into();
        })
        .await;
    let flat = idp.verifier(|_| {}).await;
    let base = without(without(idp.claims(), "tenant"), "roles");

    #[rustfmt::skip]
    let cases = vec![
        check("flat", with(with(base.clone(), "tenant", json!("city")), "roles", json!("editor viewer")), &["city"], &["editor", "viewer"]),
        check("flat", with(with(base.clone(), "tenant", json!(["city", "other"])), "roles", json!(["editor", "tenant-admin"])), &["city", "other"], &["editor", "tenant-admin"]),
        check("flat", with(with(base.clone(), "tenant", json!("city")), "roles", json!("  a   b ")), &["city"], &["a", "b"]),
        check("flat", with(base.clone(), "tenant", json!("city")), &["city"], &[]),
        check("flat", with(with(base.clone(), "tenant", json!("city")), "roles", json!([])), &["city"], &[]),
        refuse("flat", base.clone(), TokenError::MissingClaim("tenant".into())),
        refuse("flat", with(base.clone(), "tenant", json!([])), TokenError::MissingClaim("tenant".into())),
        refuse("flat", with(base.clone(), "tenant", json!("")), TokenError::MissingClaim("tenant".into())),
        refuse("flat", with(base.clone(), "tenant", json!(null)), TokenError::MissingClaim("tenant".into())),
        refuse("flat", with(base.clone(), "tenant", json!(7)), TokenError::Malformed),
        refuse("flat", with(base.clone(), "tenant", json!(["city", 7])), TokenError::Malformed),
        refuse("flat", with(with(base.clone(), "tenant", json!("city")), "roles", json!({"a": 1})), TokenError::Malformed),
        refuse("flat", without(with(base.clone(), "tenant", json!("city")), "sub"), TokenError::MissingClaim("sub".into())),
        check("nested", with(with(base.clone(), "borough", json!({"tenant": "city"})), "realm_access", json!({"roles": ["editor"]})), &["city"], &["editor"]),
        check("nested", with(with(base.clone(), "borough", json!({"tenant": ["city", "other"]})), "realm_access", json!({"roles": "a b"})), &["city", "other"], &["a", "b"]),
        check("nested", with(base.clone(), "borough.tenant", json!("literal")), &["literal"], &[]),
        refuse("nested", with(base.clone(), "borough", json!("city")), TokenError::MissingClaim("borough.tenant".into())),
        refuse("nested", with(base.clone(), "borough", json!({"other": "city"})), TokenError::MissingClaim("borough.tenant".into())),
        check("dotted", with(with(base.clone(), "https://borough.example/tenant", json!("city")), "scope", json!("entities:read entities:write")), &["city"], &["entities:read", "entities:write"]),
    ];
    for (which, claims, expected) in cases {
        let verifier = match which {
            "flat" => &flat,
            "nested" => &nested,
            _ => &dotted_name,
        };
        let got = verifier
            .verify(&RSA_A.sign(&claims))
            .await
            .map(|t| (t.tenants, t.roles));
        assert_eq!(got, expected, "{which}: {claims}");
    }
}

type Mapped = Result<(Vec<String>, Vec<String>), TokenError>;

fn check(
    verifier: &'static str,
    claims: Value,
    tenants: &[&str],
    roles: &[&str],
) -> (&'static str, Value, Mapped) {
    let owned = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
    (verifier, claims, Ok((owned(tenants), owned(roles))))
}

fn refuse(verifier: &'static str, claims: Value, err: TokenError) -> (&'static str, Value, Mapped) {
    (verifier, claims, Err(err))
}

#[tokio::test]
async fn discovery_checks_the_provider() {
    // The discovery document must name the configured issuer.
    let idp = FakeIdp::start(jwks(&[&RSA_A])).await;
    *idp.discovery_issuer.lock().unwrap() = "https://elsewhere.example".into();
    let err = OidcVerifier::discover(OidcConfig::new(&idp.url), reqwest::Client::new())
        .await
        .unwrap_err();
    assert!(err.contains("elsewhere"), "{err}");

    // A JWKS over 1 MiB is not read.
    let idp = FakeIdp::start(jwks(&[&RSA_A])).await;
    let mut huge = jwks(&[&RSA_A]);
    huge["padding"] = json!("x".repeat(jwks::MAX_DOCUMENT));
    idp.publish(huge);
    let err = OidcVerifier::discover(OidcConfig::new(&idp.url), reqwest::Client::new())
        .await
        .unwrap_err();
    assert!(err.contains("larger than"), "{err}");

    // Nothing usable: symmetric, encryption-only, weak or unknown keys.
    let weak_n = URL_SAFE_NO_PAD.encode([0xc5; 128]);
    let unusable = json!({ "keys": [
        { "kty": "oct", "k": "c2VjcmV0", "kid": "s" },
        { "kty": "RSA", "use": "enc", "n": RSA_A.jwk["n"], "e": "AQAB" },
        { "kty": "RSA", "key_ops": ["encrypt"], "n": RSA_A.jwk["n"], "e": "AQAB" },
        { "kty": "RSA", "alg": "RSA-OAEP", "n": RSA_A.jwk["n"], "e": "AQAB" },
        { "kty": "RSA", "n": weak_n, "e": "AQAB" },
        { "kty": "EC", "crv": "P-521", "x": "AA", "y": "AA" },
        { "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA" },
        { "kty": "OKP", "crv": "X25519", "x": "AA" },
        { "kid": "no-type" },
        "not even an object",
    ]});
    idp.publish(unusable.clone());
    let err = OidcVerifier::discover(OidcConfig::new(&idp.url), reqwest::Client::new())
        .await
        .unwrap_err();
    assert!(err.contains("no usable signing key"), "{err}");

    // ...but they do not spoil a set that also has a good key.
    let mut mixed = unusable;
    mixed["keys"]
        .as_array_mut()
        .unwrap()
        .push(RSA_A.jwk.clone());
    idp.publish(mixed);
    let verifier = idp.verifier(|_| {}).await;
    assert!(verifier.verify(&RSA_A.sign(&idp.claims())).await.is_ok());

    // No provider at all.
    let err = OidcVerifier::discover(
        OidcConfig::new("http://127.0.0.1:1"),
        reqwest::Client::new(),
    )
    .await
    .unwrap_err();
    assert!(err.contains("127.0.0.1:1"), "{err}");
}

#[test]
fn errors_read_well() {
    let cases = [
        (TokenError::Malformed, "malformed token"),
        (
            TokenError::UnsupportedAlgorithm("HS256".into()),
            "unsupported algorithm HS256",
        ),
        (TokenError::UnknownKey, "unknown signing key"),
        (TokenError::BadSignature, "invalid signature"),
        (TokenError::Expired, "token expired"),
        (TokenError::NotYetValid, "token not yet valid"),
        (TokenError::WrongIssuer, "wrong issuer"),
        (TokenError::WrongAudience, "wrong audience"),
        (
            TokenError::MissingClaim("tenant".into()),
            "missing claim tenant",
        ),
        (
            TokenError::ProviderUnavailable("http://10.0.0.1/jwks: refused".into()),
            "identity provider unavailable",
        ),
    ];
    for (err, text) in cases {
        assert_eq!(err.to_string(), text);
    }
}
