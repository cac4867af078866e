//! The reference OpenID Provider: panva's certified oidc-provider, run by
//! Node.js from `scripts/oidc-provider`, that the OIDC tests and
//! `borough bench --auth` start to get real access tokens. It needs `node`
//! and `npm` on PATH ([`ensure_installed`] installs its npm packages). The
//! server never uses it: it trusts whatever provider `--oidc-issuer` names.
//!
//! Everything here is synchronous (std processes, threads and a plain
//! HTTP/1.1 request), so that it serves async tests and the bench alike
//! without a runtime of its own and without another dependency.

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

/// The `aud` of the provider's access tokens: Borough's API.
pub const AUDIENCE: &str = "urn:borough:api";
/// Longest wait for the `listening on` line (Node.js loads its modules).
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for the provider to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a token request's connection, write or read.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// The provider's folder: `scripts/oidc-provider` of the repository.
pub fn dir(repo_root: &Path) -> PathBuf {
    repo_root.join("scripts/oidc-provider")
}

/// Why [`ensure_installed`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallError {
    /// `node` or `npm` is not installed: the provider cannot run here.
    NoNode(String),
    /// Anything else (`npm ci` failed, the script is missing, ...).
    Failed(String),
}

impl fmt::Display for InstallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InstallError::NoNode(why) | InstallError::Failed(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for InstallError {}

/// Installs the provider's npm packages when missing or outdated
/// (`scripts/oidc-provider/ensure.sh`).
pub fn ensure_installed(repo_root: &Path) -> Result<(), InstallError> {
    let out = Command::new("bash")
        .arg(dir(repo_root).join("ensure.sh"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            InstallError::Failed(format!("cannot run scripts/oidc-provider/ensure.sh: {e}"))
        })?;
    let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
    match out.status.code() {
        Some(0) => Ok(()),
        // ensure.sh's code for a missing node or npm.
        Some(2) => Err(InstallError::NoNode(said)),
        _ => Err(InstallError::Failed(format!(
            "scripts/oidc-provider/ensure.sh failed: {said}"
        ))),
    }
}

/// A new private signing key `kid` for `alg` (RS256, PS256 or ES256), as the
/// provider wants it in its JWKS.
pub fn keygen(repo_root: &Path, kid: &str, alg: &str) -> Result<Value, String> {
    let out = Command::new("node")
        .args(["provider.mjs", "keygen", kid, alg])
        .current_dir(dir(repo_root))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run node provider.mjs keygen: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "node provider.mjs keygen failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("node provider.mjs keygen printed no JWK: {e}"))
}

/// A running provider; killed when dropped.
pub struct Provider {
    child: Child,
    issuer: String,
    port: u16,
    /// The provider's stderr.
    log: PathBuf,
}

impl Provider {
    /// Starts the provider on `port` (0: any free port) with `keys` (private
    /// JWKs: the first one signs, the others are only published), its
    /// tokens for [`AUDIENCE`]. The key set and the provider's log are
    /// written into `dir`, which must outlive the provider. Key rotation is
    /// a [`Provider::stop`] and a start on the same port with other keys.
    pub fn start(
        repo_root: &Path,
        dir: &Path,
        port: u16,
        keys: &[&Value],
    ) -> Result<Provider, String> {
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let keys_file = dir.join(format!("jwks-{run}.json"));
        std::fs::write(&keys_file, json!({ "keys": keys }).to_string())
            .map_err(|e| format!("cannot write {}: {e}", keys_file.display()))?;
        let log = dir.join(format!("provider-{run}.log"));
        let stderr = std::fs::File::create(&log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let mut child = Command::new("node")
            .args(["provider.mjs", &port.to_string()])
            .current_dir(self::dir(repo_root))
            .env("OIDC_KEYS_FILE", &keys_file)
            .env("OIDC_AUDIENCE", AUDIENCE)
            .env_remove("OIDC_TOKEN_ALG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start node provider.mjs: {e}"))?;
        let (tx, ready) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            // Reads on after the line, so the provider never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(url) = line.strip_prefix("listening on ") {
                        let _ = tx.send(url.trim().to_string());
                    }
                }
            });
        }
        let mut provider = Provider {
            child,
            issuer: String::new(),
            port: 0,
            log,
        };
        let issuer = ready.recv_timeout(READY_TIMEOUT).map_err(|_| {
            format!(
                "oidc-provider printed no 'listening on' line within {} s:\n{}",
                READY_TIMEOUT.as_secs(),
                provider.log_text()
            )
        })?;
        provider.port = issuer
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("oidc-provider's issuer {issuer} names no port"))?;
        provider.issuer = issuer;
        Ok(provider)
    }

    /// The issuer: `http://127.0.0.1:PORT`.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The port the provider listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// An access token of `client` (`city-editor`, `city-viewer` or
    /// `other-admin`), by the client_credentials grant: the client's secret
    /// is its id and `-secret`, and the token is for [`AUDIENCE`].
    pub fn token(&self, client: &str) -> Result<String, String> {
        let url = format!("{}/token", self.issuer);
        let what = |e: &dyn fmt::Display| format!("token from {url}: {e}");
        let credentials = STANDARD.encode(format!("{client}:{client}-secret"));
        let (status, body) = post_form(
            &self.issuer,
            "/token",
            &credentials,
            "grant_type=client_credentials",
        )
        .map_err(|e| what(&e))?;
        let body: Value = serde_json::from_str(&body)
            .map_err(|e| what(&format!("{status}, not JSON ({e}): {body}")))?;
        if !(200..300).contains(&status) {
            return Err(what(&format!("{status} {body}")));
        }
        if body["token_type"] != "Bearer" {
            return Err(what(&format!("not a Bearer token: {body}")));
        }
        body["access_token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| what(&format!("no access_token in {body}")))
    }

    /// SIGTERM; the provider must exit 0 promptly (its port is then free).
    pub fn stop(mut self) -> Result<(), String> {
        let pid = self.child.id().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status();
        if !killed.as_ref().is_ok_and(|s| s.success()) {
            return Err(format!("kill -TERM {pid}: {killed:?}"));
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => {
                    return Err(format!(
                        "oidc-provider still runs {} s after SIGTERM",
                        STOP_TIMEOUT.as_secs()
                    ));
                }
                Err(e) => return Err(format!("cannot wait for oidc-provider: {e}")),
            }
        };
        if !status.success() {
            return Err(format!(
                "oidc-provider exited with {status}:\n{}",
                self.log_text()
            ));
        }
        Ok(())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// POSTs the form `body` to `path` of `base` (`http://HOST:PORT`) with
/// Basic `credentials`, by one HTTP/1.1 request on its own connection;
/// answers the status and the body.
fn post_form(
    base: &str,
    path: &str,
    credentials: &str,
    body: &str,
) -> Result<(u16, String), String> {
    let authority = base
        .strip_prefix("http://")
        .filter(|a| !a.contains('/'))
        .ok_or_else(|| format!("{base} is not http://HOST:PORT"))?;
    let mut stream =
        TcpStream::connect(authority).map_err(|e| format!("cannot connect to {authority}: {e}"))?;
    let io = |e: std::io::Error| format!("{authority}: {e}");
    stream.set_read_timeout(Some(HTTP_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT)).map_err(io)?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Basic {credentials}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
         Accept: application/json\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(io)?;
    let text = String::from_utf8_lossy(&response);
    let (head, payload) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{authority} answered no HTTP response"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{authority} answered no status line"))?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let payload = if chunked {
        dechunk(payload).ok_or_else(|| format!("{authority} answered a broken chunked body"))?
    } else {
        payload.to_string()
    };
    Ok((status, payload))
}

/// The body of a `Transfer-Encoding: chunked` response.
fn dechunk(mut rest: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

#[cfg(test)]
mod tests {
    use super::dechunk;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\n\r\n").as_deref(),
            Some("hello, world")
        );
        assert_eq!(dechunk("5\r\nhel"), None);
    }
}
