//! The provider's published keys: fetching them within bounds, and turning
//! each JWK into a verification key with the algorithms it may verify.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Every fetch from the provider gives up after this long.
pub(super) const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest discovery document or JWKS read.
pub(super) const MAX_DOCUMENT: usize = 1 << 20;

const RSA_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// The token-header `alg` values accepted at all: asymmetric only, so a
/// published key can never serve as an HMAC secret.
pub(super) fn accepted_algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// One usable verification key.
pub(super) struct Key {
    pub kid: Option<String>,
    /// What this key may verify: the JWK's `alg` alone when it names one,
    /// otherwise what its type allows.
    pub algorithms: Vec<Algorithm>,
    pub key: DecodingKey,
}

/// A JWKS as fetched, keeping only the keys this verifier can use.
pub(super) struct KeySet {
    pub keys: Vec<Arc<Key>>,
    pub fetched_at: Instant,
    /// Bumped by every successful fetch, so a caller can tell whether the set
    /// changed while it waited for a refresh.
    pub generation: u64,
}

pub(super) enum Selection<'a> {
    Found(&'a Arc<Key>),
    /// The key exists but was not published for this algorithm.
    WrongAlgorithm,
    /// No key for this kid (or, without a kid, no key for this algorithm).
    NotFound,
    /// No kid and several keys could verify: refusing beats guessing.
    Ambiguous,
}

impl KeySet {
    pub fn select(&self, alg: Algorithm, kid: Option<&str>) -> Selection<'_> {
        let fits = |k: &Key| k.algorithms.contains(&alg);
        match kid {
            Some(kid) => {
                let mut named = self.keys.iter().filter(|k| k.kid.as_deref() == Some(kid));
                let Some(first) = named.next() else {
                    return Selection::NotFound;
                };
                std::iter::once(first)
                    .chain(named)
                    .find(|k| fits(k))
                    .map_or(Selection::WrongAlgorithm, Selection::Found)
            }
            None => {
                let mut fitting = self.keys.iter().filter(|k| fits(k));
                match (fitting.next(), fitting.next()) {
                    (Some(key), None) => Selection::Found(key),
                    (None, _) => Selection::NotFound,
                    (Some(_), Some(_)) => Selection::Ambiguous,
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    key_ops: Option<Vec<String>>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// Parses a JWKS document. Keys this verifier cannot or must not use
/// (encryption keys, symmetric keys, unknown types or curves, weak RSA) are
/// skipped rather than failing the whole set: providers publish such keys
/// next to their signing keys.
pub(super) fn parse_jwks(body: &[u8]) -> Result<Vec<Arc<Key>>, String> {
    let raw: RawJwks =
        serde_json::from_slice(body).map_err(|e| format!("JWKS is not a JSON key set: {e}"))?;
    let mut keys = Vec::new();
    for value in raw.keys {
        let parsed = serde_json::from_value::<RawJwk>(value)
            .map_err(|e| e.to_string())
            .and_then(|jwk| to_key(&jwk).map(|key| (jwk.kid, key)));
        match parsed {
            Ok((_, Some(key))) => keys.push(Arc::new(key)),
            Ok((kid, None)) => tracing::debug!(?kid, "JWKS key skipped: not a usable signing key"),
            Err(e) => tracing::debug!("JWKS key skipped: {e}"),
        }
    }
    Ok(keys)
}

fn to_key(jwk: &RawJwk) -> Result<Option<Key>, String> {
    if jwk.use_.as_deref().is_some_and(|u| u != "sig")
        || jwk
            .key_ops
            .as_ref()
            .is_some_and(|ops| !ops.iter().any(|op| op == "verify"))
    {
        return Ok(None);
    }
    let (allowed, key): (&[Algorithm], DecodingKey) = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("RSA", _) => {
            let n = decode_component(&jwk.n, "n")?;
            let e = decode_component(&jwk.e, "e")?;
            let bits = significant_bits(&n);
            // Under 2048 bits is forgeable in practice; the upper bound caps
            // the cost of one verification.
            if !(2048..=8192).contains(&bits) {
                return Err(format!("RSA modulus of {bits} bits"));
            }
            (RSA_ALGORITHMS, DecodingKey::from_rsa_raw_components(&n, &e))
        }
        ("EC", Some(curve @ ("P-256" | "P-384"))) => {
            let (alg, len) = if curve == "P-256" {
                (&[Algorithm::ES256][..], 32)
            } else {
                (&[Algorithm::ES384][..], 48)
            };
            let x = decode_component(&jwk.x, "x")?;
            let y = decode_component(&jwk.y, "y")?;
            if x.len() != len || y.len() != len {
                return Err(format!("{curve} coordinates of the wrong length"));
            }
            let key = DecodingKey::from_ec_components(
                jwk.x.as_deref().unwrap_or_default(),
                jwk.y.as_deref().unwrap_or_default(),
            )
            .map_err(|e| e.to_string())?;
            (alg, key)
        }
        ("OKP", Some("Ed25519")) => {
            let x = decode_component(&jwk.x, "x")?;
            if x.len() != 32 {
                return Err("Ed25519 key of the wrong length".into());
            }
            let key = DecodingKey::from_ed_components(jwk.x.as_deref().unwrap_or_default())
                .map_err(|e| e.to_string())?;
            (&[Algorithm::EdDSA][..], key)
        }
        _ => return Ok(None),
    };
    let algorithms = match jwk.alg.as_deref() {
        None => allowed.to_vec(),
        // RFC 9864 names Ed25519 keys' algorithm `Ed25519`; tokens still say EdDSA.
        Some("Ed25519") if allowed == [Algorithm::EdDSA] => allowed.to_vec(),
        Some(name) => match accepted_algorithm(name) {
            Some(alg) if allowed.contains(&alg) => vec![alg],
            _ => return Ok(None),
        },
    };
    Ok(Some(Key {
        kid: jwk.kid.clone(),
        algorithms,
        key,
    }))
}

fn decode_component(value: &Option<String>, name: &str) -> Result<Vec<u8>, String> {
    let value = value
        .as_deref()
        .ok_or_else(|| format!("missing `{name}`"))?;
    URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map_err(|e| format!("`{name}` is not base64url: {e}"))
}

fn significant_bits(big_endian: &[u8]) -> usize {
    match big_endian.iter().position(|&b| b != 0) {
        Some(i) => (big_endian.len() - i - 1) * 8 + (8 - big_endian[i].leading_zeros() as usize),
        None => 0,
    }
}

/// GETs `url` and parses its JSON body, within [`FETCH_TIMEOUT`] and
/// [`MAX_DOCUMENT`]. Errors name the URL: they are for the operator's log.
pub(super) async fn fetch_json<T: DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
) -> Result<T, String> {
    let body = fetch_bytes(http, url).await?;
    serde_json::from_slice(&body).map_err(|e| format!("{url}: not the expected JSON: {e}"))
}

pub(super) async fn fetch_bytes(http: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let mut response = http
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .timeout(FETCH_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("{url}: HTTP {}", response.status()));
    }
    let too_large = || format!("{url}: larger than {MAX_DOCUMENT} bytes");
    if response
        .content_length()
        .is_some_and(|n| n > MAX_DOCUMENT as u64)
    {
        return Err(too_large());
    }
    // Read by chunks: a missing or lying Content-Length must not let the
    // provider fill memory.
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| format!("{url}: {e}"))? {
        if body.len() + chunk.len() > MAX_DOCUMENT {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
