//! `borough simulate`: provisions a simulated city on a running server and
//! streams its devices' measurements at a given rate.

use borough_sim::City;
use chrono::Utc;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Base URL of the Borough server.
    #[arg(long, default_value = "http://127.0.0.1:1026")]
    pub target: String,
    /// Tenant to write to (the default tenant when not given).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Number of devices in the city.
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Measurements per second, across the city.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// How long to stream: e.g. 30s, 5m, 2h (0 provisions only).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Seed of the city: one seed, one city.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Load this much past history first (every device's readings every 15
    /// minutes up to now) through the bulk import, when the city is new: e.g. 1d, 7d.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub history: Duration,
    /// Hide the progress bar (for logs and scripts).
    #[arg(long)]
    pub quiet: bool,
    /// API key (or token) to send; the server's access control needs one
    /// that may write the tenant and register devices.
    #[arg(long, env = "BOROUGH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// Parses `30s`, `5m`, `2h`, `1d` or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 30s, 5m or 2h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(format!("'{s}' has an unknown unit; use ms, s, m, h or d")),
    };
    if !secs.is_finite() || !(0.0..=365.0 * 86_400.0).contains(&secs) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// What a simulation did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    /// Historic points loaded by `--history`.
    pub history: u64,
    /// Actuators registered as devices with commands.
    pub actuators: usize,
    pub created: usize,
    pub existing: usize,
    pub sent: usize,
    pub failed: usize,
    pub elapsed: Duration,
}

pub fn run(args: SimulateArgs) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let summary = runtime.block_on(simulate(&args, std::future::pending(), |_| {}))?;
    if summary.actuators > 0 {
        println!(
            "registered {} actuators as devices with commands",
            summary.actuators
        );
    }
    if summary.history > 0 {
        println!("loaded {} historic points", summary.history);
    }
    println!(
        "provisioned {} devices ({} created, {} already there); sent {} measurements in {:.1} s ({:.0}/s), {} failed",
        summary.created + summary.existing,
        summary.created,
        summary.existing,
        summary.sent,
        summary.elapsed.as_secs_f64(),
        summary.sent as f64 / summary.elapsed.as_secs_f64().max(1e-9),
        summary.failed
    );
    Ok(())
}

/// A client for one server and tenant.
struct Target {
    client: reqwest::Client,
    base: String,
    tenant: Option<String>,
    api_key: Option<String>,
}

impl Target {
    /// Sends a request with the tenant header; answers its status and JSON body.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<(u16, Value), String> {
        let req = match &self.tenant {
            Some(t) => req.header("NGSILD-Tenant", t),
            None => req,
        };
        let req = match &self.api_key {
            Some(k) => req.bearer_auth(k),
            None => req,
        };
        let resp = req
            .send()
            .await
            .map_err(|e| format!("cannot reach {}: {}", self.base, crate::bench::chain(&e)))?;
        let status = resp.status().as_u16();
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    async fn post(&self, path: &str, body: &Value) -> Result<(u16, Value), String> {
        let url = format!("{}/ngsi-ld/v1{path}", self.base);
        self.send(self.client.post(url).json(body)).await
    }

    /// Sends CSV lines to the bulk history import; returns the points stored.
    async fn import(&self, csv: String) -> Result<u64, String> {
        let url = format!("{}/api/v1/history/import", self.base);
        let req = self
            .client
            .post(url)
            .header("content-type", "text/csv")
            .body(csv);
        let (status, body) = self.send(req).await?;
        if status != 200 {
            return Err(format!(
                "the server refused the history with {status}: {body}"
            ));
        }
        Ok(body["points"].as_u64().unwrap_or(0))
    }
}

/// Provisions the city, calls `on_ready`, then streams measurements until
/// `duration` passes or `stop` resolves.
pub async fn simulate(
    args: &SimulateArgs,
    stop: impl std::future::Future<Output = ()>,
    on_ready: impl FnOnce(&Summary),
) -> Result<Summary, String> {
    if args.devices == 0 {
        return Err("--devices must be at least 1".into());
    }
    if !(args.rate > 0.0 && args.rate <= 1_000_000.0) {
        return Err("--rate must be between 0 and 1,000,000 measurements per second".into());
    }
    let target = Target {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| e.to_string())?,
        base: args.target.trim_end_matches('/').to_string(),
        tenant: args.tenant.clone(),
        api_key: args.api_key.clone(),
    };
    let city = City::generate(args.seed, args.devices);
    let mut summary = provision(&target, &city, args.quiet).await?;
    if summary.existing == 0 {
        summary.actuators = register_actuators(&target, &city).await?;
    }
    // History is loaded for a new city only: a second run would repeat it.
    if !args.history.is_zero() && summary.existing == 0 {
        summary.history = backlog(&target, &city, args.history, args.quiet).await?;
    }
    on_ready(&summary);
    if args.duration.is_zero() {
        return Ok(summary);
    }
    tokio::pin!(stop);
    // Measurements go out as batch updates, ten times a second.
    let tick = Duration::from_millis(100);
    let per_tick = args.rate / 10.0;
    let bar = progress(args.quiet, args.duration.as_secs(), "streaming (s)");
    let started = Instant::now();
    let mut owed = 0.0;
    let mut next = 0usize;
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while started.elapsed() < args.duration {
        tokio::select! {
            _ = &mut stop => break,
            _ = interval.tick() => {}
        }
        owed += per_tick;
        let n = owed.floor() as usize;
        owed -= n as f64;
        if n == 0 {
            continue;
        }
        let now = Utc::now();
        let batch: Vec<Value> = (0..n)
            .map(|_| {
                let d = &city.devices[next % city.devices.len()];
                next += 1;
                let mut m = d.measurement(now);
                m.insert("id".into(), json!(d.id));
                Value::Object(m)
            })
            .collect();
        match target
            .post("/entityOperations/update", &Value::Array(batch))
            .await
        {
            Ok((204, _)) => summary.sent += n,
            Ok((207, body)) => {
                let failed = body["errors"].as_array().map_or(n, Vec::len);
                summary.failed += failed;
                summary.sent += n - failed.min(n);
            }
            Ok((status, body)) => {
                return Err(format!(
                    "the server refused measurements with {status}: {body}"
                ));
            }
            Err(e) => return Err(e),
        }
        bar.set_position(started.elapsed().as_secs());
        bar.set_message(format!("{} sent", summary.sent));
    }
    bar.finish_and_clear();
    summary.elapsed = started.elapsed();
    Ok(summary)
}

fn progress(quiet: bool, len: u64, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!("{what} {{bar:40}} {{pos}}/{{len}} {{msg}}"))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// The commands an actuator of the simulated city takes.
fn actuator_commands(kind: borough_sim::Kind) -> &'static [&'static str] {
    match kind {
        borough_sim::Kind::Streetlight => &["switch", "dim"],
        borough_sim::Kind::EVChargingStation => &["start", "stop"],
        _ => &[],
    }
}

/// Registers the city's actuators in the device registry with their commands
/// (each device feeds its entity), so that operators can command them from
/// the dashboard. No simulated device connects: commands wait, queued, as for
/// an offline device. Returns the number registered.
async fn register_actuators(target: &Target, city: &City) -> Result<usize, String> {
    let actuators: Vec<Value> = city
        .devices
        .iter()
        .filter(|d| d.kind.is_actuator() && !actuator_commands(d.kind).is_empty())
        .map(|d| {
            json!({
                "id": d.id.rsplit(':').next().unwrap_or(&d.id),
                "entityId": d.id,
                "entityType": d.kind.type_name(),
                "commands": actuator_commands(d.kind),
            })
        })
        .collect();
    let mut registered = 0;
    for chunk in actuators.chunks(1000) {
        let url = format!("{}/api/v1/devices/import", target.base);
        let req = target.client.post(url).json(&Value::Array(chunk.to_vec()));
        let (status, body) = target.send(req).await?;
        match status {
            201 | 207 => registered += body["created"].as_array().map_or(0, Vec::len),
            // A server without the device registry: nothing to command.
            404 => return Ok(0),
            other => {
                return Err(format!(
                    "the server refused the actuators with {other}: {body}"
                ));
            }
        }
    }
    Ok(registered)
}

/// Readings of the backlog are this far apart.
const BACKLOG_STEP_SECS: i64 = 900;
/// Lines per import request.
const BACKLOG_PART_LINES: usize = 200_000;

/// Loads every device's readings of the past `span`, one per 15 minutes,
/// through the bulk history import. Returns the points stored.
async fn backlog(target: &Target, city: &City, span: Duration, quiet: bool) -> Result<u64, String> {
    let now = Utc::now().timestamp();
    let first = now - span.as_secs() as i64;
    let steps = (span.as_secs() as i64 / BACKLOG_STEP_SECS).max(1) as u64;
    let bar = progress(quiet, steps, "history (steps)");
    let mut stored = 0;
    let mut part = String::new();
    let mut lines = 0;
    let mut t = first - first.rem_euclid(BACKLOG_STEP_SECS);
    while t < now {
        let at = chrono::DateTime::from_timestamp(t, 0).unwrap_or_default();
        for d in &city.devices {
            for (attr, v) in d.measurement(at) {
                let value = &v["value"];
                part.push_str(&format!(
                    "{},{},{attr},{},{value}\n",
                    d.id,
                    d.kind.type_name(),
                    t * 1000
                ));
                lines += 1;
            }
        }
        if lines >= BACKLOG_PART_LINES {
            stored += target.import(std::mem::take(&mut part)).await?;
            lines = 0;
        }
        bar.inc(1);
        t += BACKLOG_STEP_SECS;
    }
    if !part.is_empty() {
        stored += target.import(part).await?;
    }
    bar.finish_and_clear();
    Ok(stored)
}

/// Creates the entities that are missing; existing ones are left as they are.
async fn provision(target: &Target, city: &City, quiet: bool) -> Result<Summary, String> {
    let mut summary = Summary::default();
    let bar = progress(quiet, city.devices.len() as u64, "provisioning");
    let now = Utc::now();
    for chunk in city.devices.chunks(500) {
        let batch: Vec<Value> = chunk.iter().map(|d| d.entity(now)).collect();
        let (status, body) = target
            .post("/entityOperations/create", &Value::Array(batch))
            .await?;
        match status {
            201 => summary.created += chunk.len(),
            207 => {
                summary.created += body["success"].as_array().map_or(0, Vec::len);
                for e in body["errors"].as_array().into_iter().flatten() {
                    let kind = e["error"]["type"].as_str().unwrap_or_default();
                    if kind.ends_with("AlreadyExists") {
                        summary.existing += 1;
                    } else {
                        return Err(format!(
                            "the server refused device {}: {}",
                            e["entityId"], e["error"]["detail"]
                        ));
                    }
                }
            }
            other => return Err(format!("the server refused the city with {other}: {body}")),
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
