//! `bench entities --auth` and `bench query --auth`: Borough's phases run
//! on three servers, one per leg: without access control (`--auth off`, the
//! baseline), with it and a tenant editor's API key, and with it and a JWT
//! access token of a real OpenID Provider (scripts/oidc-provider, run by
//! Node.js; without Node.js that leg is skipped, and the report says why).
//! The legs take turns at each phase (none, api-key, jwt, none, ...), each
//! turn a slice of the phase, and each leg's turns are merged: a slow moment
//! of a shared machine then falls on every leg alike. Every leg sends
//! `NGSILD-Tenant: city`, so that only the credential differs; the report
//! compares each leg's throughput and p50 with the baseline's.

use super::common::{self, READY_TIMEOUT, RunInfo};
use super::load::{BatchRun, Conn, Endpoint, ms, quote};
use super::report::{Bound, Phase, Target, round_to, thousands};
use super::server::Server;
use borough_access::oidc::provider::{self, AUDIENCE, InstallError, Provider};
use bytes::Bytes;
use hyper::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode, Uri};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::runtime::Runtime;

/// The tenant of every leg: the provider's `city-editor` client is its editor.
pub const TENANT: &str = "city";
/// The provider's client whose tokens the jwt leg sends.
const CLIENT: &str = "city-editor";
/// Requests per second per key or token: far above what the load generator
/// reaches, so the rate limiter keeps its books without ever refusing.
const KEY_RATE_LIMIT: &str = "1000000000";
/// Turns each leg takes at a phase, in a full run and in a quick one.
const TURNS: usize = 5;
const QUICK_TURNS: usize = 2;

// Targets from the issue: reported, never enforced.
const TARGET_COST_PERCENT: f64 = 5.0;
const TARGET_P50_DELTA_MS: f64 = 0.2;
/// What the access-control targets measure.
const TARGETS_NOTE: &str = "(cost = 1 - leg throughput ÷ none throughput; Δp50 = leg p50 - none p50, \
     for the phases timed per request: a batch's time varies by far more than one check)\n";

/// How a leg's requests prove who sends them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    /// `--auth off`: the baseline.
    Off,
    ApiKey,
    Jwt,
}

impl Auth {
    pub fn name(self) -> &'static str {
        match self {
            Auth::Off => "none",
            Auth::ApiKey => "api-key",
            Auth::Jwt => "jwt",
        }
    }
}

enum Credential {
    None,
    Key(HeaderValue),
    /// A token is fetched before every phase: a full run outlasts one.
    Token(Arc<Jwt>),
}

/// A server under test and how the load generator calls it.
pub struct Leg {
    pub auth: Auth,
    pub server: Server,
    /// Whether requests name [`TENANT`] (every leg of a comparison does).
    tenant: bool,
    credential: Credential,
}

/// Every leg of a run: the baseline on `server` (`--auth off`), then, with
/// `secured`, a fresh server for each of its variants.
pub fn legs(
    secured: Option<&SecuredLegs>,
    server: Server,
    runtime: &Runtime,
) -> Result<Vec<Leg>, String> {
    let mut legs = vec![Leg {
        auth: Auth::Off,
        server,
        // The baseline names the tenant only when it is compared.
        tenant: secured.is_some(),
        credential: Credential::None,
    }];
    if let Some(secured) = secured {
        for variant in secured.variants() {
            legs.push(secured.spawn(variant, runtime)?);
        }
    }
    Ok(legs)
}

/// How many turns each leg takes at a phase: one when there is a single leg
/// (the phase then runs as it did before `--auth`).
pub fn turns(legs: &[Leg], quick: bool) -> usize {
    match (legs.len(), quick) {
        (0 | 1, _) => 1,
        (_, true) => QUICK_TURNS,
        (_, false) => TURNS,
    }
}

/// Runs `turn(leg, n)` for each turn `n` of `turns`, on every leg in order
/// (authorized first); answers each leg's turns, in the order of `legs`.
pub async fn take_turns<T>(
    legs: &mut [Leg],
    turns: usize,
    mut turn: impl AsyncFnMut(&mut Leg, usize) -> Result<T, String>,
) -> Result<Vec<Vec<T>>, String> {
    let mut out: Vec<Vec<T>> = legs.iter().map(|_| Vec::with_capacity(turns)).collect();
    for n in 0..turns {
        for (leg, done) in legs.iter_mut().zip(&mut out) {
            leg.authorize().await?;
            done.push(turn(leg, n).await?);
        }
    }
    Ok(out)
}

/// How a phase is run, for progress lines: `, 3 legs taking 5 turns`.
pub fn describe_turns(legs: &[Leg], turns: usize) -> String {
    if legs.len() > 1 {
        format!(", {} legs taking {turns} turns", legs.len())
    } else {
        String::new()
    }
}

/// Loads every leg's server with the upsert `batches` (`entities` in all),
/// the legs taking `turns` turns: each leg's phase `name`, with its server's
/// memory right after.
pub async fn upsert_in_turns(
    legs: &mut [Leg],
    batches: &[Bytes],
    turns: usize,
    name: &'static str,
    entities: usize,
) -> Result<Vec<Phase>, String> {
    let parts = split(batches, turns);
    let uploads = take_turns(legs, turns, async |leg, n| {
        common::upsert_part(&mut leg.server, parts[n].clone()).await
    })
    .await?;
    Ok(legs
        .iter()
        .zip(uploads)
        .map(|(leg, runs)| {
            let run = BatchRun::merge(runs);
            Phase::entities_written(name, entities, "batch", run.elapsed, run.latencies_us)
                .with_memory(leg.server.memory())
        })
        .collect())
}

/// `items` in `parts` consecutive parts of (nearly) equal size.
pub fn split<T: Clone>(items: &[T], parts: usize) -> Vec<Arc<Vec<T>>> {
    let parts = parts.max(1);
    (0..parts)
        .map(|k| {
            let (from, to) = (items.len() * k / parts, items.len() * (k + 1) / parts);
            Arc::new(items[from..to].to_vec())
        })
        .collect()
}

impl Leg {
    /// ` (api-key)` and the like for progress lines, when legs are compared.
    pub fn label(&self) -> String {
        if self.tenant {
            format!(" ({})", self.auth.name())
        } else {
            String::new()
        }
    }

    /// Sets the headers of the phase to come: the tenant and the credential.
    /// Call it before every phase (it fetches a fresh token).
    pub async fn authorize(&mut self) -> Result<(), String> {
        let mut headers = HeaderMap::new();
        if self.tenant {
            headers.insert(
                HeaderName::from_static("ngsild-tenant"),
                HeaderValue::from_static(TENANT),
            );
        }
        match &self.credential {
            Credential::None => {}
            Credential::Key(value) => {
                headers.insert(AUTHORIZATION, value.clone());
            }
            Credential::Token(jwt) => {
                // A blocking request to the local provider: a few
                // milliseconds, between phases.
                let token = jwt.provider.token(CLIENT)?;
                headers.insert(AUTHORIZATION, bearer(&token)?);
            }
        }
        self.server.set_headers(headers);
        Ok(())
    }
}

fn bearer(secret: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(&format!("Bearer {secret}"))
        .map_err(|e| format!("the credential cannot be sent in a header: {e}"))
}

/// The secured legs' shared part: the OpenID Provider, when it can run.
pub struct SecuredLegs {
    /// `Err`: why the jwt leg is skipped.
    provider: Result<Arc<Jwt>, String>,
}

impl SecuredLegs {
    /// Starts the OpenID Provider. Without Node.js (or the provider's
    /// folder), the jwt leg is skipped and the reason printed.
    pub fn start() -> Result<SecuredLegs, String> {
        let provider = Jwt::start()?.map(Arc::new);
        match &provider {
            Ok(p) => eprintln!("oidc-provider listening on {}", p.provider.issuer()),
            Err(why) => eprintln!("auth: the jwt leg is SKIPPED: {why}"),
        }
        Ok(SecuredLegs { provider })
    }

    /// The secured legs that run.
    pub fn variants(&self) -> Vec<Auth> {
        match self.provider {
            Ok(_) => vec![Auth::ApiKey, Auth::Jwt],
            Err(_) => vec![Auth::ApiKey],
        }
    }

    /// Why the jwt leg is skipped, if it is.
    pub fn jwt_skipped(&self) -> Option<String> {
        self.provider.as_ref().err().cloned()
    }

    /// A fresh server for `auth` (one of [`SecuredLegs::variants`]) with [`TENANT`]
    /// registered by the operator, and a credential checked to work.
    fn spawn(&self, auth: Auth, runtime: &Runtime) -> Result<Leg, String> {
        let mut flags = vec![
            "--auth".to_string(),
            "on".to_string(),
            "--key-rate-limit".to_string(),
            KEY_RATE_LIMIT.to_string(),
        ];
        let jwt = match (auth, &self.provider) {
            (Auth::Jwt, Ok(p)) => Some(p.clone()),
            (Auth::Jwt, Err(why)) => return Err(format!("no jwt leg: {why}")),
            (Auth::Off, _) => return Err("the baseline is not a secured leg".into()),
            (Auth::ApiKey, _) => None,
        };
        if let Some(jwt) = &jwt {
            let issuer = jwt.provider.issuer();
            flags.extend(["--oidc-issuer", issuer, "--oidc-audience", AUDIENCE].map(String::from));
        }
        let server = Server::spawn_with(None, &flags, READY_TIMEOUT)?;
        eprintln!(
            "server ({}) listening on http://{}",
            auth.name(),
            server.addr()
        );
        let mut leg = Leg {
            auth,
            server,
            tenant: true,
            credential: Credential::None,
        };
        runtime
            .block_on(self.set_up(&mut leg, jwt))
            .map_err(|e| format!("{} leg: {e}", auth.name()))?;
        Ok(leg)
    }

    /// Registers the tenant, makes the leg's credential and checks that the
    /// server takes it for an editor of the tenant.
    async fn set_up(&self, leg: &mut Leg, jwt: Option<Arc<Jwt>>) -> Result<(), String> {
        let operator = leg
            .server
            .operator_key()
            .ok_or("the server printed no operator key")?;
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, bearer(operator)?);
        headers.insert(
            HeaderName::from_static("ngsild-tenant"),
            HeaderValue::from_static(TENANT),
        );
        let mut conn = Conn::open(Endpoint {
            addr: leg.server.addr(),
            headers,
        })
        .await?;
        call(
            &mut conn,
            Method::POST,
            "/api/v1/tenants",
            json!({ "name": TENANT }),
            StatusCode::CREATED,
        )
        .await?;
        leg.credential = match jwt {
            None => {
                let body = json!({"name": "bench", "roles": ["editor"]});
                let made = call(
                    &mut conn,
                    Method::POST,
                    "/api/v1/keys",
                    body,
                    StatusCode::CREATED,
                )
                .await?;
                let key = made["key"]
                    .as_str()
                    .ok_or_else(|| format!("POST /api/v1/keys answered no key: {made}"))?;
                Credential::Key(bearer(key)?)
            }
            Some(jwt) => Credential::Token(jwt),
        };
        leg.authorize().await?;
        let mut conn = Conn::open(leg.server.endpoint()).await?;
        let me = call(
            &mut conn,
            Method::GET,
            "/api/v1/me",
            Value::Null,
            StatusCode::OK,
        )
        .await?;
        let editor = me["roles"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r == "editor"));
        if !editor || me["tenants"] != json!([TENANT]) {
            return Err(format!(
                "the credential is not a {TENANT} editor's: /api/v1/me answered {me}"
            ));
        }
        Ok(())
    }
}

/// One setup request, which must answer `expected` with JSON.
async fn call(
    conn: &mut Conn,
    method: Method,
    path: &'static str,
    body: Value,
    expected: StatusCode,
) -> Result<Value, String> {
    let what = format!("{method} {path}");
    let body = (!body.is_null()).then(|| Bytes::from(body.to_string()));
    let (status, reply) = conn
        .request_with_timeout(method, Uri::from_static(path), body, true)
        .await?;
    if status != expected {
        return Err(format!("{what} answered {status}: {}", quote(&reply)));
    }
    serde_json::from_slice(&reply)
        .map_err(|e| format!("{what} answered invalid JSON ({e}): {}", quote(&reply)))
}

/// The jwt legs' OpenID Provider: the reference one
/// ([`borough_access::oidc::provider`]), with a key of its own.
struct Jwt {
    provider: Provider,
    // Removed after the provider is killed: it holds the provider's keys.
    _keys: tempfile::TempDir,
}

impl Jwt {
    /// `Ok(Err(why))` when the provider cannot run here (no Node.js, not in
    /// the repository); `Err` when it should have and did not.
    fn start() -> Result<Result<Jwt, String>, String> {
        let Some(root) = repo_root() else {
            return Ok(Err(
                "scripts/oidc-provider not found (run the bench from the repository)".into(),
            ));
        };
        match provider::ensure_installed(&root) {
            Ok(()) => {}
            Err(InstallError::NoNode(why)) => return Ok(Err(why)),
            Err(e) => return Err(e.to_string()),
        }
        let key = provider::keygen(&root, "bench-key", "RS256")?;
        let keys = tempfile::Builder::new()
            .prefix("borough-bench-oidc-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let provider = Provider::start(&root, keys.path(), 0, &[&key])?;
        Ok(Ok(Jwt {
            provider,
            _keys: keys,
        }))
    }
}

/// The repository holding scripts/oidc-provider: the working directory or
/// where this binary was built.
fn repo_root() -> Option<PathBuf> {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    [PathBuf::from("."), built].into_iter().find(|root| {
        let dir = provider::dir(root);
        dir.join("provider.mjs").is_file() && dir.join("ensure.sh").is_file()
    })
}

// --------------------------------------------------------------- the report

/// The baseline's figures of one phase.
#[derive(Clone, Copy)]
struct Figures {
    throughput: f64,
    p50_us: u64,
    p99_us: u64,
    errors: u64,
}

impl Figures {
    fn of(p: &Phase) -> Figures {
        Figures {
            throughput: p.throughput(),
            p50_us: p.latency.p50_us,
            p99_us: p.latency.p99_us,
            errors: p.failures.count,
        }
    }
}

/// One phase on the baseline and on each secured leg.
struct Comparison {
    phase: &'static str,
    unit: &'static str,
    latency_of: &'static str,
    none: Figures,
    legs: Vec<(Auth, Phase)>,
}

impl Comparison {
    /// The leg's throughput ÷ the baseline's.
    fn ratio(&self, p: &Phase) -> f64 {
        super::report::ratio(p.throughput(), self.none.throughput)
    }

    /// What access control costs in throughput, in percent of the baseline's.
    fn cost_percent(&self, p: &Phase) -> f64 {
        (1.0 - self.ratio(p)) * 100.0
    }

    /// The leg's p50 minus the baseline's, in milliseconds.
    fn p50_delta_ms(&self, p: &Phase) -> f64 {
        ms(p.latency.p50_us as f64 - self.none.p50_us as f64)
    }
}

/// The comparison of a scenario's phases with and without access control.
pub struct AuthReport {
    comparisons: Vec<Comparison>,
    jwt_skipped: Option<String>,
}

impl AuthReport {
    /// `baseline`: the phases (name, phase) measured without access
    /// control; `legs`: the same phases, in the same order, on each leg.
    pub fn new(
        baseline: &[(&'static str, &Phase)],
        legs: Vec<(Auth, Vec<Phase>)>,
        jwt_skipped: Option<String>,
    ) -> Result<AuthReport, String> {
        let mut comparisons: Vec<Comparison> = baseline
            .iter()
            .map(|(name, p)| Comparison {
                phase: name,
                unit: p.unit,
                latency_of: p.latency_of,
                none: Figures::of(p),
                legs: Vec::new(),
            })
            .collect();
        for (auth, phases) in legs {
            if phases.len() != comparisons.len() {
                return Err(format!(
                    "the {} leg measured {} phases, the baseline {}",
                    auth.name(),
                    phases.len(),
                    comparisons.len()
                ));
            }
            for (c, p) in comparisons.iter_mut().zip(phases) {
                c.legs.push((auth, p));
            }
        }
        Ok(AuthReport {
            comparisons,
            jwt_skipped,
        })
    }

    pub fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        for c in &self.comparisons {
            for (auth, p) in &c.legs {
                let cost = c.cost_percent(p);
                targets.push(Target::new(
                    format!("{} {} cost", c.phase, auth.name()),
                    cost,
                    format!("{cost:.1} % ({:.3}x)", c.ratio(p)),
                    Bound::AtMost(TARGET_COST_PERCENT),
                    format!("≤ {TARGET_COST_PERCENT} % {}", c.unit),
                ));
                // A batch's p50 varies by far more than 0.2 ms from run to
                // run, and it carries one credential check, as a request does.
                if c.latency_of != "request" {
                    continue;
                }
                let delta = c.p50_delta_ms(p);
                targets.push(Target::new(
                    format!("{} {} Δp50", c.phase, auth.name()),
                    delta,
                    format!("{delta:+.3} ms"),
                    Bound::AtMost(TARGET_P50_DELTA_MS),
                    format!("≤ {TARGET_P50_DELTA_MS} ms"),
                ));
            }
        }
        targets
    }

    /// The report's section on access control: the comparison table, then
    /// its targets.
    pub fn section(&self, info: &RunInfo) -> String {
        let mut out = format!("\n{}\n", self.table());
        out.push_str(&info.titled_targets_section(
            "access-control targets (from the issue)",
            &self.targets(),
            TARGETS_NOTE,
        ));
        out
    }

    /// The comparison table.
    fn table(&self) -> String {
        let mut out = format!(
            "access control: a server per leg, the legs taking turns at each phase, tenant {TENANT}; \
             none = --auth off, api-key = a {TENANT} editor's API key, jwt = a {CLIENT} RS256 token \
             of oidc-provider\n"
        );
        if let Some(why) = &self.jwt_skipped {
            out.push_str(&format!("  (jwt leg skipped: {why})\n"));
        }
        out.push_str(&format!(
            "{:<14} {:<8} {:>20}   {:<8} {:>8} {:>8} {:>7} {:>8} {:>9}\n",
            "phase",
            "auth",
            "throughput",
            "latency",
            "p50 ms",
            "p99 ms",
            "errors",
            "÷ none",
            "Δ p50 ms"
        ));
        for c in &self.comparisons {
            let line = |name: &str, auth: &str, tp: f64, p50: u64, p99: u64, errors: u64| {
                format!(
                    "{:<14} {:<8} {:>20}   {:<8} {:>8.2} {:>8.2} {:>7}",
                    name,
                    auth,
                    format!("{} {}", thousands(tp), c.unit),
                    c.latency_of,
                    ms(p50 as f64),
                    ms(p99 as f64),
                    errors
                )
            };
            let n = &c.none;
            out.push_str(&line(
                c.phase,
                Auth::Off.name(),
                n.throughput,
                n.p50_us,
                n.p99_us,
                n.errors,
            ));
            out.push('\n');
            for (auth, p) in &c.legs {
                out.push_str(&line(
                    "",
                    auth.name(),
                    p.throughput(),
                    p.latency.p50_us,
                    p.latency.p99_us,
                    p.failures.count,
                ));
                out.push_str(&format!(
                    " {:>8} {:>9}\n",
                    format!("{:.3}x", c.ratio(p)),
                    format!("{:+.3}", c.p50_delta_ms(p))
                ));
            }
        }
        out
    }

    pub fn to_json(&self) -> Value {
        let phases: serde_json::Map<String, Value> = self
            .comparisons
            .iter()
            .map(|c| {
                let n = &c.none;
                let mut v = json!({
                    "unit": c.unit,
                    "latency_of": c.latency_of,
                    "none": {
                        "throughput": round_to(n.throughput, 10.0),
                        "p50_ms": ms(n.p50_us as f64),
                        "p99_ms": ms(n.p99_us as f64),
                        "errors": n.errors,
                    },
                });
                for (auth, p) in &c.legs {
                    let mut leg = p.to_json();
                    leg["throughput_vs_none"] = json!(round_to(c.ratio(p), 1e3));
                    leg["throughput_cost_percent"] = json!(round_to(c.cost_percent(p), 100.0));
                    leg["p50_delta_ms"] = json!(c.p50_delta_ms(p));
                    v[auth.name()] = leg;
                }
                (c.phase.to_string(), v)
            })
            .collect();
        json!({
            "tenant": TENANT,
            "legs": {
                "none": "--auth off",
                "api-key": format!("--auth on, an API key of a {TENANT} editor"),
                "jwt": format!("--auth on --oidc-issuer (oidc-provider), an RS256 access token of {CLIENT}, fetched before each phase"),
            },
            "key_rate_limit": KEY_RATE_LIMIT.parse::<f64>().ok(),
            "jwt_skipped": self.jwt_skipped,
            "phases": phases,
            "targets": super::report::targets_json(&self.targets()),
        })
    }

    /// Fails when requests of a secured leg failed.
    pub fn check_failures(&self) -> Result<(), String> {
        for c in &self.comparisons {
            for (auth, p) in &c.legs {
                p.check_failures(&format!("{} ({})", c.phase, auth.name()), "requests")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::load::{BatchRun, TimedRun};
    use super::split;
    use std::time::Duration;

    #[test]
    fn a_load_splits_into_turns_that_cover_it_once() {
        let items: Vec<u32> = (0..103).collect();
        for parts in [1, 2, 5, 200] {
            let split = split(&items, parts);
            assert_eq!(split.len(), parts);
            let joined: Vec<u32> = split.iter().flat_map(|p| p.iter().copied()).collect();
            assert_eq!(joined, items, "{parts} parts");
            let sizes: Vec<usize> = split.iter().map(|p| p.len()).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        }
    }

    #[test]
    fn turns_merge_into_one_run() {
        let batches = BatchRun::merge(vec![
            BatchRun {
                elapsed: Duration::from_secs(1),
                latencies_us: vec![1, 2],
            },
            BatchRun {
                elapsed: Duration::from_secs(2),
                latencies_us: vec![3],
            },
        ]);
        assert_eq!(batches.elapsed, Duration::from_secs(3));
        assert_eq!(batches.latencies_us, [1, 2, 3]);

        let mut first = TimedRun {
            elapsed: Duration::from_millis(500),
            get_us: vec![10],
            patch_us: vec![20],
            ..TimedRun::default()
        };
        first.failures.record(|| "first".into());
        let mut second = TimedRun {
            elapsed: Duration::from_millis(700),
            get_us: vec![11, 12],
            ..TimedRun::default()
        };
        second.failures.record(|| "second".into());
        let run = TimedRun::merge(vec![first, second]);
        assert_eq!(run.elapsed, Duration::from_millis(1200));
        assert_eq!((run.get_us, run.patch_us), (vec![10, 11, 12], vec![20]));
        assert_eq!(run.failures.count, 2);
        assert_eq!(run.failures.first.as_deref(), Some("first"));
    }
}
