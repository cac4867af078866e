//! What the scenarios share: their options, how a run names itself in its
//! report, the load generator's runtime, the server under test and its
//! loading through the batch upsert, timed GET phases, query shapes measured
//! on Borough and on a baseline, reading the ids of an answer, and a few
//! helpers of the generated documents.

use super::load::{self, BatchRun, Conn, Mix, percent_encode};
use super::postgres::{self, TimedQuery};
use super::report::{Phase, ShapeRun, Target, target_table};
use super::server::Server;
use bytes::Bytes;
use hyper::{Method, StatusCode, Uri};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Runtime;

/// Wait for a fresh, empty server to print its `listening on` line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
pub const ENTITIES_PATH: &str = "/ngsi-ld/v1/entities";
pub const UPSERT_PATH: &str = "/ngsi-ld/v1/entityOperations/upsert";
/// Connections of the upsert phase (and of the baselines' loads).
pub const UPSERT_WORKERS: usize = 4;
/// Answers of a successful upsert: 201 (some created) or 204 (all updated).
const UPSERT_OK: &[StatusCode] = &[StatusCode::CREATED, StatusCode::NO_CONTENT];

/// The command line of every scenario.
pub struct Options {
    pub quick: bool,
    pub out: PathBuf,
    /// PostgreSQL connection string of the baselines (`notify` has none).
    pub pg: String,
    /// `entities` and `query`: measure the phases with access control too.
    pub auth: bool,
}

/// How a scenario was run: the start of its table's title, its last line,
/// and the first fields of its JSON.
pub struct RunInfo {
    scenario: &'static str,
    quick: bool,
    build: &'static str,
}

impl RunInfo {
    /// Also warns, on stderr, that a debug build measures nothing meaningful.
    pub fn new(scenario: &'static str, quick: bool) -> RunInfo {
        let build = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        };
        if build == "debug" {
            eprintln!(
                "note: debug build; the figures are not representative (build with --release)"
            );
        }
        RunInfo {
            scenario,
            quick,
            build,
        }
    }

    /// `"\nborough bench <scenario> (quick, debug build): "`, followed by
    /// the sizes of the scenario.
    pub fn title(&self) -> String {
        format!(
            "\nborough bench {} ({}, {} build): ",
            self.scenario,
            if self.quick { "quick" } else { "full" },
            self.build
        )
    }

    /// The end of the table: the targets, the scenario's `note` on them, and
    /// a warning when the figures mean nothing.
    pub fn targets_section(&self, targets: &[Target], note: &str) -> String {
        self.titled_targets_section("targets (from the issue)", targets, note)
    }

    /// [`RunInfo::targets_section`] under another title.
    pub fn titled_targets_section(&self, title: &str, targets: &[Target], note: &str) -> String {
        let mut out = target_table(title, targets);
        out.push_str(note);
        if self.quick || self.build == "debug" {
            out.push_str("(quick runs and debug builds measure nothing meaningful; targets are informative only)\n");
        }
        out
    }

    /// The results as JSON: what was run, where and when, then `fields` (an
    /// object) in their order.
    pub fn json(&self, fields: Value) -> Value {
        let unix_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut out = json!({
            "scenario": self.scenario,
            "quick": self.quick,
            "build": self.build,
            "version": env!("CARGO_PKG_VERSION"),
            "unix_time": unix_time,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        });
        if let (Some(out), Value::Object(fields)) = (out.as_object_mut(), fields) {
            out.extend(fields);
        }
        out
    }
}

/// The load generator's runtime (the server under test is a child process).
pub fn load_runtime() -> Result<Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-load")
        .build()
        .map_err(|e| format!("cannot start the load generator runtime: {e}"))
}

/// A fresh server without the static body of the HTTP-ceiling baseline.
pub fn start_server() -> Result<Server, String> {
    let server = Server::spawn(None, READY_TIMEOUT)?;
    eprintln!("server listening on http://{}", server.addr());
    Ok(server)
}

/// Loads the server: the upsert `batches` (`entities` in all, `batch` each)
/// POSTed by [`UPSERT_WORKERS`] workers, with the server's headers. The
/// phase records the server's memory right after.
pub async fn upsert(
    server: &mut Server,
    name: &'static str,
    batches: Arc<Vec<Bytes>>,
    entities: usize,
    batch: usize,
) -> Result<Phase, String> {
    eprintln!("upsert: {entities} entities in batches of {batch}, {UPSERT_WORKERS} workers");
    let run = upsert_part(server, batches).await?;
    let phase = Phase::entities_written(name, entities, "batch", run.elapsed, run.latencies_us);
    Ok(phase.with_memory(server.memory()))
}

/// POSTs upsert `batches` (all of a load, or a part) as [`upsert`] does,
/// without making a phase of it.
pub async fn upsert_part(
    server: &mut Server,
    batches: Arc<Vec<Bytes>>,
) -> Result<BatchRun, String> {
    let uri = Uri::from_static(UPSERT_PATH);
    let run = load::post_all(server.endpoint(), uri, batches, UPSERT_WORKERS, UPSERT_OK)
        .await
        .map_err(|e| format!("upsert: {e}"))?;
    server.check_alive()?;
    Ok(run)
}

/// A phase of GETs (`mix`) for `duration` at `concurrency`, with the
/// server's memory right after.
pub async fn timed_gets(
    server: &mut Server,
    name: &'static str,
    mix: Mix,
    concurrency: usize,
    duration: Duration,
    seed: u64,
) -> Result<Phase, String> {
    let run = load::run_timed(
        server.endpoint(),
        Arc::new(mix),
        concurrency,
        duration,
        seed,
    )
    .await?;
    server.check_alive()?;
    let phase = Phase::timed(name, "req/s", "request", run.elapsed, run.get_us);
    Ok(phase
        .with_failures(run.failures)
        .with_memory(server.memory()))
}

/// `GET /entities` with `params` (a query shape's) and `limit` last: the
/// parameters as written, for the report, and the request URI.
pub fn entities_query(params: &[(&str, String)], limit: usize) -> Result<(String, Uri), String> {
    let display = params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let encoded: String = params
        .iter()
        .map(|(k, v)| format!("{k}={}&", percent_encode(v)))
        .collect();
    let uri = Uri::try_from(format!("{ENTITIES_PATH}?{encoded}limit={limit}"))
        .map_err(|e| format!("invalid request URI for {display}: {e}"))?;
    Ok((display, uri))
}

/// One query shape as each system runs it.
pub struct BothSystems {
    pub shape: &'static str,
    /// Borough's GETs, one picked at random per request.
    pub uris: Vec<Uri>,
    /// Phase name of the baseline.
    pub baseline: &'static str,
    /// The baseline's prepared statements, and its queries over them.
    pub sqls: Vec<String>,
    pub queries: Vec<TimedQuery>,
}

/// One query shape for `duration` at `concurrency`, on Borough then on the
/// baseline (both with the same `seed`).
pub async fn measure_shape(
    server: &mut Server,
    pg: &str,
    both: BothSystems,
    concurrency: usize,
    duration: Duration,
    seed: u64,
) -> Result<ShapeRun, String> {
    let mix = Mix::Gets(both.uris);
    let borough = timed_gets(server, "borough", mix, concurrency, duration, seed)
        .await
        .map_err(|e| format!("{}: {e}", both.shape))?;
    let queries = Arc::new(both.queries);
    let run = postgres::run_timed(pg, &both.sqls, queries, concurrency, duration, seed)
        .await
        .map_err(|e| format!("{} ({}): {e}", both.shape, both.baseline))?;
    Ok(ShapeRun {
        borough,
        baseline: run.phase(both.baseline),
    })
}

/// GETs `uri`, which must answer 200 with a JSON array of entities, and
/// returns their ids. `what` starts every error message.
pub async fn fetch_ids(conn: &mut Conn, uri: &Uri, what: &str) -> Result<Vec<String>, String> {
    let (status, body) = conn
        .request_with_timeout(Method::GET, uri.clone(), None, true)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    if status != StatusCode::OK {
        return Err(format!(
            "{what}: Borough answered {status}: {}",
            load::quote(&body)
        ));
    }
    entity_ids(&body).map_err(|e| format!("{what}: {e}"))
}

/// The `id` of each entity of a JSON array.
fn entity_ids(body: &[u8]) -> Result<Vec<String>, String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("Borough answered invalid JSON ({e}): {}", load::quote(body)))?;
    let items = v
        .as_array()
        .ok_or_else(|| format!("Borough answered no array: {}", load::quote(body)))?;
    items
        .iter()
        .map(|e| {
            e.get("id")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("Borough answered an entity without id: {e}"))
        })
        .collect()
}

/// Mean length of the serialized documents, in bytes.
pub fn mean_len(docs: &[String]) -> f64 {
    let total: usize = docs.iter().map(String::len).sum();
    total as f64 / docs.len().max(1) as f64
}

/// An NGSI-LD Property with just a value.
pub fn property(value: Value) -> Value {
    json!({"type": "Property", "value": value})
}

/// An NGSI-LD Relationship to the entity `object`.
pub fn relationship(object: String) -> Value {
    json!({"type": "Relationship", "object": object})
}
