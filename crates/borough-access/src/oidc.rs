//! Bearer tokens from an external OpenID Provider.
//!
//! [`OidcVerifier::discover`] reads the provider's discovery document and
//! its key set (JWKS) once; [`OidcVerifier::verify`] then checks JWT access
//! tokens against the cached keys without calling the provider. The key set
//! is fetched again when it is older than `jwks_max_age`, or when a token
//! names a key it does not hold (a rotation), at most once per
//! `jwks_min_refresh` and never twice at the same time.

mod jwks;
pub mod provider;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use jwks::{Key, KeySet, Selection};

/// Longest token accepted; real access tokens are a few KiB at most.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Longest clock skew honoured, whatever the configuration says.
const MAX_LEEWAY_SECS: u64 = 24 * 60 * 60;

/// What to trust and how to read the tokens.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    /// The provider's issuer identifier, e.g. `https://id.example.org/realms/city`.
    /// Discovery is at `{issuer}/.well-known/openid-configuration`, and the
    /// tokens' `iss` must equal it exactly.
    pub issuer: String,
    /// The `aud` value tokens must contain, when set.
    pub audience: Option<String>,
    /// The claim naming the caller's tenant(s): a string or an array of
    /// strings. A dotted path (`borough.tenant`) reaches into objects.
    pub tenant_claim: String,
    /// The claim naming the caller's roles: a space-separated string or an
    /// array of strings; dotted paths as for `tenant_claim`.
    pub roles_claim: String,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// A token naming an unknown key fetches the JWKS at most this often.
    pub jwks_min_refresh: Duration,
    /// The JWKS is fetched again, at the next use, once it is this old (yet
    /// never sooner than `jwks_min_refresh` after the previous attempt).
    pub jwks_max_age: Duration,
}

impl OidcConfig {
    /// The defaults: no audience check, claims `tenant` and `roles`, 60 s of
    /// leeway, refetches at most every 30 s, keys kept 10 minutes.
    pub fn new(issuer: impl Into<String>) -> Self {
        OidcConfig {
            issuer: issuer.into(),
            audience: None,
            tenant_claim: "tenant".into(),
            roles_claim: "roles".into(),
            leeway: Duration::from_secs(60),
            jwks_min_refresh: Duration::from_secs(30),
            jwks_max_age: Duration::from_secs(600),
        }
    }
}

/// A token that passed every check, reduced to what Borough uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub subject: String,
    /// Never empty.
    pub tenants: Vec<String>,
    pub roles: Vec<String>,
    /// `exp`, in Unix seconds.
    pub expires_at: i64,
    pub issuer: String,
}

/// Why a token was refused. `Display` is short and safe to send back to
/// the client; `ProviderUnavailable`'s detail is for the log only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// Not a compact JWS, too long, or with an unreadable header or claims.
    Malformed,
    /// The header's `alg` is not accepted, or not the one its key was published for.
    UnsupportedAlgorithm(String),
    /// No published key matches the token's `kid`.
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    MissingClaim(String),
    /// The key set had to be fetched and could not be.
    ProviderUnavailable(String),
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Malformed => f.write_str("malformed token"),
            TokenError::UnsupportedAlgorithm(alg) => write!(f, "unsupported algorithm {alg}"),
            TokenError::UnknownKey => f.write_str("unknown signing key"),
            TokenError::BadSignature => f.write_str("invalid signature"),
            TokenError::Expired => f.write_str("token expired"),
            TokenError::NotYetValid => f.write_str("token not yet valid"),
            TokenError::WrongIssuer => f.write_str("wrong issuer"),
            TokenError::WrongAudience => f.write_str("wrong audience"),
            TokenError::MissingClaim(claim) => write!(f, "missing claim {claim}"),
            TokenError::ProviderUnavailable(_) => f.write_str("identity provider unavailable"),
        }
    }
}

impl std::error::Error for TokenError {}

/// Verifies access tokens of one provider. Share it in an `Arc`.
pub struct OidcVerifier {
    config: OidcConfig,
    http: reqwest::Client,
    jwks_uri: String,
    /// Read on every verification, written only by a fetch: the lock is held
    /// just long enough to clone the `Arc`.
    keys: RwLock<Arc<KeySet>>,
    /// Taken by whoever fetches the JWKS, so fetches never overlap.
    refresh: tokio::sync::Mutex<RefreshState>,
    /// Tokens already verified, by the SHA-256 of their text, with the key
    /// set generation that verified them: a client sends the same token with
    /// every request, and an RSA check per request would cost more than the
    /// request itself. An entry holds until the token expires or the key set
    /// changes or grows old (so a withdrawn key stops working as before).
    verified: std::sync::Mutex<std::collections::HashMap<String, (VerifiedToken, u64)>>,
}

/// Most verified tokens remembered.
const MAX_VERIFIED: usize = 10_000;

struct RefreshState {
    last_attempt: Instant,
    /// Why the last attempt failed, if it did.
    last_error: Option<String>,
}

impl fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OidcVerifier")
            .field("issuer", &self.config.issuer)
            .field("jwks_uri", &self.jwks_uri)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: Option<String>,
}

#[derive(Deserialize)]
struct JoseHeader {
    alg: String,
    kid: Option<String>,
}

impl OidcVerifier {
    /// Reads `{issuer}/.well-known/openid-configuration` (whose `issuer` must
    /// equal the configured one, OIDC Discovery §4.3), then its `jwks_uri`,
    /// which must hold at least one usable signing key.
    pub async fn discover(config: OidcConfig, http: reqwest::Client) -> Result<Self, String> {
        if config.issuer.is_empty() || config.tenant_claim.is_empty() {
            return Err("OIDC issuer and tenant claim must not be empty".into());
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            config.issuer.trim_end_matches('/')
        );
        let discovery: Discovery = jwks::fetch_json(&http, &url).await?;
        if discovery.issuer != config.issuer {
            return Err(format!(
                "{url} names issuer {:?}, not the configured {:?}",
                discovery.issuer, config.issuer
            ));
        }
        let jwks_uri = discovery
            .jwks_uri
            .ok_or_else(|| format!("{url} has no jwks_uri"))?;
        if !(jwks_uri.starts_with("https://") || jwks_uri.starts_with("http://")) {
            return Err(format!("{url}: jwks_uri {jwks_uri:?} is not an HTTP URL"));
        }
        let fetched_at = Instant::now();
        let keys = fetch_keys(&http, &jwks_uri).await?;
        Ok(OidcVerifier {
            config,
            http,
            jwks_uri,
            keys: RwLock::new(Arc::new(KeySet {
                keys,
                fetched_at,
                generation: 0,
            })),
            refresh: tokio::sync::Mutex::new(RefreshState {
                last_attempt: fetched_at,
                last_error: None,
            }),
            verified: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    pub fn config(&self) -> &OidcConfig {
        &self.config
    }

    /// Checks a bearer token (without the `Bearer ` prefix): signature by a
    /// published key, algorithm, issuer, audience, validity times; then reads
    /// subject, tenants and roles.
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let digest = crate::secret::sha256_hex(token.as_bytes());
        let now = i64::try_from(unix_now()).unwrap_or(i64::MAX);
        let keys = self.current_keys();
        let fresh = keys.fetched_at.elapsed() < self.config.jwks_max_age;
        if fresh
            && let Some((t, _)) = self
                .verified
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&digest)
                .filter(|(t, generation)| t.expires_at > now && *generation == keys.generation)
        {
            return Ok(t.clone());
        }
        let verified = self.verify_uncached(token).await?;
        let generation = self.current_keys().generation;
        let mut cache = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= MAX_VERIFIED {
            cache.retain(|_, (t, g)| t.expires_at > now && *g == generation);
            if cache.len() >= MAX_VERIFIED {
                cache.clear();
            }
        }
        cache.insert(digest, (verified.clone(), generation));
        Ok(verified)
    }

    async fn verify_uncached(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        let header = read_header(token)?;
        let alg = jwks::accepted_algorithm(&header.alg)
            .ok_or_else(|| TokenError::UnsupportedAlgorithm(printable(&header.alg)))?;
        if token.ends_with('.') {
            return Err(TokenError::Malformed);
        }
        let key = self.find_key(alg, header.kid.as_deref()).await?;
        let claims = self.check(token, alg, &key)?;
        self.map_claims(&claims)
    }

    fn current_keys(&self) -> Arc<KeySet> {
        // A poisoned lock still holds a complete set: writers only swap the Arc.
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The key for this token, refreshing the set when it is stale or lacks
    /// the token's key.
    async fn find_key(&self, alg: Algorithm, kid: Option<&str>) -> Result<Arc<Key>, TokenError> {
        let mut set = self.current_keys();
        if set.fetched_at.elapsed() >= self.config.jwks_max_age {
            // Only one caller refreshes a stale set; the others go on with it.
            if let Ok(mut state) = self.refresh.try_lock() {
                let still_stale = self.current_keys().generation == set.generation;
                if still_stale && state.last_attempt.elapsed() >= self.config.jwks_min_refresh {
                    // On failure keep using the old keys: the provider being
                    // down must not lock everyone out.
                    let _ = self.fetch(&mut state).await;
                }
                set = self.current_keys();
            }
        }
        match set.select(alg, kid) {
            Selection::NotFound => {}
            other => return resolve(other, alg),
        }

        // Unknown key: maybe the provider rotated. Wait for any fetch under
        // way; if none happened since `set` was read, fetch unless one was
        // tried too recently.
        let mut state = self.refresh.lock().await;
        let latest = self.current_keys();
        let set = if latest.generation != set.generation {
            latest
        } else if state.last_attempt.elapsed() < self.config.jwks_min_refresh {
            // While the provider is down, say so rather than blame the token.
            return Err(match &state.last_error {
                Some(why) => TokenError::ProviderUnavailable(why.clone()),
                None => TokenError::UnknownKey,
            });
        } else {
            self.fetch(&mut state)
                .await
                .map_err(TokenError::ProviderUnavailable)?
        };
        drop(state);
        resolve(set.select(alg, kid), alg)
    }

    /// Fetches the JWKS and installs it. The caller holds `refresh`.
    async fn fetch(&self, state: &mut RefreshState) -> Result<Arc<KeySet>, String> {
        state.last_attempt = Instant::now();
        let fetched = fetch_keys(&self.http, &self.jwks_uri).await;
        state.last_error = fetched.as_ref().err().cloned();
        match fetched {
            Ok(keys) => {
                let mut current = self.keys.write().unwrap_or_else(PoisonError::into_inner);
                let set = Arc::new(KeySet {
                    keys,
                    fetched_at: state.last_attempt,
                    generation: current.generation + 1,
                });
                *current = set.clone();
                tracing::debug!(issuer = %self.config.issuer, keys = set.keys.len(), "OIDC keys refreshed");
                Ok(set)
            }
            Err(e) => {
                tracing::warn!(issuer = %self.config.issuer, "OIDC key refresh failed: {e}");
                Err(e)
            }
        }
    }

    /// Verifies the signature and the registered claims; returns all claims.
    fn check(
        &self,
        token: &str,
        alg: Algorithm,
        key: &Key,
    ) -> Result<Map<String, Value>, TokenError> {
        let mut validation = Validation::new(alg);
        // jsonwebtoken adds and subtracts the leeway to and from the clock:
        // bound it so no configuration can overflow that.
        validation.leeway = self.config.leeway.as_secs().min(MAX_LEEWAY_SECS);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.config.issuer]);
        match &self.config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.set_required_spec_claims(&["exp", "iss", "aud"]);
            }
            None => {
                validation.validate_aud = false;
                validation.set_required_spec_claims(&["exp", "iss"]);
            }
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation)
            .map_err(|e| match e.into_kind() {
                ErrorKind::InvalidSignature
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidEddsaKey => TokenError::BadSignature,
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
                ErrorKind::InvalidAudience => TokenError::WrongAudience,
                ErrorKind::MissingRequiredClaim(claim) => TokenError::MissingClaim(claim),
                ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => {
                    TokenError::UnsupportedAlgorithm(format!("{alg:?}"))
                }
                _ => TokenError::Malformed,
            })?;
        let claims = data.claims;
        // jsonwebtoken ignores `iat`; a token issued in the future is as
        // suspect as one with a future `nbf`.
        match claims.get("iat") {
            None | Some(Value::Null) => {}
            Some(iat) => {
                let iat = iat.as_f64().ok_or(TokenError::Malformed)?;
                if iat > (unix_now() + validation.leeway) as f64 {
                    return Err(TokenError::NotYetValid);
                }
            }
        }
        Ok(claims)
    }

    fn map_claims(&self, claims: &Map<String, Value>) -> Result<VerifiedToken, TokenError> {
        let text = |name: &str| -> Result<String, TokenError> {
            match claims.get(name) {
                Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                None | Some(Value::Null) | Some(Value::String(_)) => {
                    Err(TokenError::MissingClaim(name.into()))
                }
                Some(_) => Err(TokenError::Malformed),
            }
        };
        let subject = text("sub")?;
        let issuer = text("iss")?;
        let expires_at = claims
            .get("exp")
            .and_then(|exp| exp.as_i64().or_else(|| exp.as_f64().map(|f| f as i64)))
            .ok_or_else(|| TokenError::MissingClaim("exp".into()))?;

        let tenant_claim = &self.config.tenant_claim;
        let tenants = string_list(claim(claims, tenant_claim), false)?;
        if tenants.is_empty() {
            return Err(TokenError::MissingClaim(tenant_claim.clone()));
        }
        let roles = string_list(claim(claims, &self.config.roles_claim), true)?;
        Ok(VerifiedToken {
            subject,
            tenants,
            roles,
            expires_at,
            issuer,
        })
    }
}

fn resolve(selection: Selection<'_>, alg: Algorithm) -> Result<Arc<Key>, TokenError> {
    match selection {
        Selection::Found(key) => Ok(key.clone()),
        Selection::WrongAlgorithm => Err(TokenError::UnsupportedAlgorithm(format!("{alg:?}"))),
        Selection::NotFound | Selection::Ambiguous => Err(TokenError::UnknownKey),
    }
}

async fn fetch_keys(http: &reqwest::Client, jwks_uri: &str) -> Result<Vec<Arc<Key>>, String> {
    let body = jwks::fetch_bytes(http, jwks_uri).await?;
    let keys = jwks::parse_jwks(&body).map_err(|e| format!("{jwks_uri}: {e}"))?;
    if keys.is_empty() {
        // Most likely a broken response: keep whatever keys we had.
        return Err(format!("{jwks_uri}: no usable signing key"));
    }
    Ok(keys)
}

/// Decodes the JOSE header without trusting anything in it yet.
fn read_header(token: &str) -> Result<JoseHeader, TokenError> {
    let mut parts = token.split('.');
    // An empty signature is judged later, after `alg`, so that `alg: none`
    // tokens are reported as such.
    let (Some(header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    if header.is_empty() || payload.is_empty() {
        return Err(TokenError::Malformed);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

/// The token's `alg` goes back to the client in an error: keep it short and
/// free of anything that could break a header or a log line.
fn printable(alg: &str) -> String {
    let clean: String = alg
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '+'))
        .take(16)
        .collect();
    if clean.is_empty() {
        "(empty)".into()
    } else {
        clean
    }
}

/// A claim by name; a name absent as such is read as a dotted path, since
/// claim names themselves may contain dots (`https://example.org/tenant`).
fn claim<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(value) = claims.get(name) {
        return Some(value);
    }
    let mut path = name.split('.');
    let mut value = claims.get(path.next()?)?;
    for step in path {
        value = value.as_object()?.get(step)?;
    }
    Some(value)
}

/// A string or an array of strings as a list; `split` also splits strings
/// at whitespace (OAuth's `scope` style). Absent is empty; other types are
/// refused rather than guessed at.
fn string_list(value: Option<&Value>, split: bool) -> Result<Vec<String>, TokenError> {
    let mut out = Vec::new();
    let mut push = |s: &str| {
        if split {
            out.extend(s.split_whitespace().map(str::to_owned));
        } else if !s.is_empty() {
            out.push(s.to_owned());
        }
    };
    match value {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => push(s),
        Some(Value::Array(items)) => {
            for item in items {
                push(item.as_str().ok_or(TokenError::Malformed)?);
            }
        }
        Some(_) => return Err(TokenError::Malformed),
    }
    Ok(out)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
