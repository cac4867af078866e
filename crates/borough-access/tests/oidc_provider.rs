//! `OidcVerifier` against a real, certified OpenID Provider: panva's
//! oidc-provider, run by Node.js from scripts/oidc-provider. Access tokens
//! come from its token endpoint (client_credentials grant); keys rotate by
//! restarting it on the same port with another key set. Without node and
//! npm this test fails: it is never skipped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use borough_access::oidc::provider::{self, AUDIENCE, Provider};
use borough_access::oidc::{OidcConfig, OidcVerifier, TokenError};
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A new private signing key (RS256), as oidc-provider wants it in its JWKS.
fn keygen(kid: &str) -> Value {
    provider::keygen(&repo_root(), kid, "RS256").expect("node provider.mjs keygen")
}

/// Starts the provider with `keys` (private JWKs, the first one signs).
fn start(dir: &Path, port: u16, keys: &[&Value]) -> Provider {
    Provider::start(&repo_root(), dir, port, keys)
        .unwrap_or_else(|e| panic!("oidc-provider did not start: {e}"))
}

fn kid(token: &str) -> Option<String> {
    jsonwebtoken::decode_header(token).ok()?.kid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_oidc_provider_verify_across_key_rotation() {
    provider::ensure_installed(&repo_root())
        .unwrap_or_else(|e| panic!("this test needs Node.js and npm: {e}"));
    let dir = tempfile::tempdir().expect("temp dir");
    let (old_key, new_key) = (keygen("key-1"), keygen("key-2"));
    let http = reqwest::Client::new();

    let provider = start(dir.path(), 0, &[&old_key]);
    let mut config = OidcConfig::new(provider.issuer());
    config.audience = Some(AUDIENCE.into());
    // Short enough that a restart of the provider outlasts both.
    config.jwks_min_refresh = Duration::from_millis(300);
    config.jwks_max_age = Duration::from_secs(1);
    let verifier = OidcVerifier::discover(config.clone(), http.clone())
        .await
        .expect("discovery against oidc-provider");

    let editor = provider.token("city-editor").expect("token request");
    assert_eq!(kid(&editor).as_deref(), Some("key-1"));
    for (client, tenant, role) in [
        ("city-editor", "city", "editor"),
        ("city-viewer", "city", "viewer"),
        ("other-admin", "other", "tenant-admin"),
    ] {
        let token = if client == "city-editor" {
            editor.clone()
        } else {
            provider.token(client).expect("token request")
        };
        let verified = verifier.verify(&token).await.expect(client);
        assert_eq!(verified.subject, client);
        assert_eq!(verified.tenants, [tenant]);
        assert_eq!(verified.roles, [role]);
        assert_eq!(verified.issuer, provider.issuer());
        assert!(verified.expires_at > 0);
    }

    // A verifier for another API refuses these tokens.
    let mut other_api = config.clone();
    other_api.audience = Some("urn:other:api".into());
    let other_api = OidcVerifier::discover(other_api, http.clone())
        .await
        .expect("discovery");
    assert_eq!(
        other_api.verify(&editor).await,
        Err(TokenError::WrongAudience)
    );
    // And a tampered token is refused.
    let mut tampered = editor.clone();
    tampered.replace_range(tampered.len() - 6.., "AAAAAA");
    assert_eq!(
        verifier.verify(&tampered).await,
        Err(TokenError::BadSignature)
    );

    // Rotation, step 1: the new key signs, the old one is still published.
    let port = provider.port();
    // SIGTERM, and the provider must exit 0 promptly.
    provider.stop().expect("provider stops");
    let provider = start(dir.path(), port, &[&new_key, &old_key]);
    let rotated = provider.token("city-editor").expect("token request");
    assert_eq!(kid(&rotated).as_deref(), Some("key-2"));
    // Unknown kid: the verifier fetches the JWKS again and finds it.
    let verified = verifier.verify(&rotated).await.expect("new-key token");
    assert_eq!(verified.tenants, ["city"]);
    verifier
        .verify(&editor)
        .await
        .expect("old-key token still verifies");

    // Step 2: the old key is withdrawn. Once the key set is older than
    // jwks_max_age it is fetched again and old-key tokens are refused.
    provider.stop().expect("provider stops");
    let provider = start(dir.path(), port, &[&new_key]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(verifier.verify(&editor).await, Err(TokenError::UnknownKey));
    verifier.verify(&rotated).await.expect("new-key token");
    let fresh = provider.token("other-admin").expect("token request");
    let verified = verifier.verify(&fresh).await.expect("fresh token");
    assert_eq!(verified.tenants, ["other"]);
    assert_eq!(verified.roles, ["tenant-admin"]);

    provider.stop().expect("provider stops");
}
