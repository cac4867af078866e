//! `OidcVerifier` against a real, certified OpenID Provider: panva's
//! oidc-provider, run by Node.js from scripts/oidc-provider. Access tokens
//! come from its token endpoint (client_credentials grant); keys rotate by
//! restarting it on the same port with another key set. Without node and
//! npm this test fails: it is never skipped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use borough_access::oidc::{OidcConfig, OidcVerifier, TokenError};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const AUDIENCE: &str = "urn:borough:api";

fn provider_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/oidc-provider")
}

/// Installs the provider's npm packages when missing or outdated.
fn ensure_installed() {
    match std::process::Command::new("node").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        other => panic!("this test needs Node.js (`node`) on PATH: {other:?}"),
    }
    let out = std::process::Command::new("bash")
        .arg(provider_dir().join("ensure.sh"))
        .output()
        .expect("run scripts/oidc-provider/ensure.sh");
    assert!(
        out.status.success(),
        "ensure.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new private signing key, as oidc-provider wants it in its JWKS.
async fn keygen(kid: &str) -> Value {
    let out = Command::new("node")
        .args(["provider.mjs", "keygen", kid])
        .current_dir(provider_dir())
        .output()
        .await
        .expect("node provider.mjs keygen");
    assert!(
        out.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("keygen prints a JWK")
}

struct Provider {
    child: Child,
    issuer: String,
    port: u16,
    log: PathBuf,
}

impl Provider {
    /// Starts the provider with `keys` (private JWKs, the first one signs).
    async fn start(dir: &Path, port: u16, keys: &[&Value]) -> Provider {
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let keys_file = dir.join(format!("jwks-{run}.json"));
        std::fs::write(&keys_file, json!({ "keys": keys }).to_string()).expect("write JWKS");
        let log = dir.join(format!("provider-{run}.log"));
        let mut child = Command::new("node")
            .args(["provider.mjs", &port.to_string()])
            .current_dir(provider_dir())
            .env("OIDC_KEYS_FILE", &keys_file)
            .env("OIDC_AUDIENCE", AUDIENCE)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("start node provider.mjs");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let ready = tokio::time::timeout(Duration::from_secs(15), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("listening on ") {
                    return Some(url.to_owned());
                }
            }
            None
        })
        .await;
        let Ok(Some(issuer)) = ready else {
            panic!(
                "oidc-provider did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        // Keep reading so the provider never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let port = issuer
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("issuer has a port");
        Provider {
            child,
            issuer,
            port,
            log,
        }
    }

    /// SIGTERM, and the provider must exit 0 promptly.
    async fn stop(mut self) {
        let pid = self.child.id().expect("provider still running");
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(kill.success());
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("provider stops within 10 s of SIGTERM")
            .expect("wait for provider");
        assert!(
            status.success(),
            "provider exited with {status}:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// An access token for a test client, by the client_credentials grant.
    async fn token(&self, http: &reqwest::Client, client: &str) -> String {
        let response = http
            .post(format!("{}/token", self.issuer))
            .basic_auth(client, Some(format!("{client}-secret")))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .expect("token request");
        let status = response.status();
        let body: Value = response.json().await.expect("token response is JSON");
        assert!(status.is_success(), "token endpoint: {status} {body}");
        assert_eq!(body["token_type"], "Bearer");
        body["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    }
}

fn kid(token: &str) -> Option<String> {
    jsonwebtoken::decode_header(token).ok()?.kid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_oidc_provider_verify_across_key_rotation() {
    ensure_installed();
    let dir = tempfile::tempdir().expect("temp dir");
    let (old_key, new_key) = (keygen("key-1").await, keygen("key-2").await);
    let http = reqwest::Client::new();

    let provider = Provider::start(dir.path(), 0, &[&old_key]).await;
    let mut config = OidcConfig::new(&provider.issuer);
    config.audience = Some(AUDIENCE.into());
    // Short enough that a restart of the provider outlasts both.
    config.jwks_min_refresh = Duration::from_millis(300);
    config.jwks_max_age = Duration::from_secs(1);
    let verifier = OidcVerifier::discover(config.clone(), http.clone())
        .await
        .expect("discovery against oidc-provider");

    let editor = provider.token(&http, "city-editor").await;
    assert_eq!(kid(&editor).as_deref(), Some("key-1"));
    for (client, tenant, role) in [
        ("city-editor", "city", "editor"),
        ("city-viewer", "city", "viewer"),
        ("other-admin", "other", "tenant-admin"),
    ] {
        let token = if client == "city-editor" {
            editor.clone()
        } else {
            provider.token(&http, client).await
        };
        let verified = verifier.verify(&token).await.expect(client);
        assert_eq!(verified.subject, client);
        assert_eq!(verified.tenants, [tenant]);
        assert_eq!(verified.roles, [role]);
        assert_eq!(verified.issuer, provider.issuer);
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
    let port = provider.port;
    provider.stop().await;
    let provider = Provider::start(dir.path(), port, &[&new_key, &old_key]).await;
    let rotated = provider.token(&http, "city-editor").await;
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
    provider.stop().await;
    let provider = Provider::start(dir.path(), port, &[&new_key]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(verifier.verify(&editor).await, Err(TokenError::UnknownKey));
    verifier.verify(&rotated).await.expect("new-key token");
    let fresh = provider.token(&http, "other-admin").await;
    let verified = verifier.verify(&fresh).await.expect("fresh token");
    assert_eq!(verified.tenants, ["other"]);
    assert_eq!(verified.roles, ["tenant-admin"]);

    provider.stop().await;
}
