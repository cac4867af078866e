//! Scenario `temporal`: a year of 15-minute temperature readings of 1,000
//! sensors (35,040,000 points) bulk-imported into Borough's history
//! (`POST /api/v1/history/import`, CSV streamed over one connection per
//! CPU), then four queries of the NGSI-LD temporal API:
//!
//! - (a) one entity, daily averages over the year;
//! - (b) every entity, hourly averages over one month (the `Link` pages of
//!   `limit=100` followed to the end, timed as one query);
//! - (c) `lastN=100` of one entity;
//! - (d) the raw values of one entity over one day.
//!
//! Baselines in the same run: PostgreSQL (`COPY` into a B-tree indexed table,
//! the same four queries in SQL) and VictoriaMetrics (the same points
//! through its InfluxDB line-protocol endpoint: ingest rate and bytes per
//! point). Every query is checked before it is timed: Borough's averages
//! against PostgreSQL's, the raw values against the generator.

use super::common::{self, Options, RunInfo};
use super::load::{micros, ms, quote};
use super::postgres::{self, bounded};
use super::report::{
    Bound, Phase, ShapeRun, Target, memory_json, memory_text, publish, ratio, round_to,
    shape_table, targets_json, thousands,
};
use super::server::{Memory, Server};
use super::temporal_data::{
    ATTR, DAY_MS, ENTITY_TYPE, Format, PER_DAY, Readings, START_MS, month_start_ms, rfc3339,
};
use super::temporal_http::{self, ChannelBody, GetConn, Upload};
use super::temporal_pg::{self, TABLE};
use super::temporal_vm::{self, Victoria};
use hyper::StatusCode;
use hyper::header::{HeaderName, HeaderValue};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

/// Seed of the readings and of the query picks: runs are reproducible.
const SEED: u64 = 0x7E3F_0A11_2025;
const TENANT: &str = "bench";
const IMPORT_PATH: &str = "/api/v1/history/import";
const API_ROOT: &str = "/ngsi-ld/v1";
const TEMPORAL_PATH: &str = "/ngsi-ld/v1/temporal/entities";
/// Page size of the sweep (b).
const PAGE: usize = 100;
const LAST_N: usize = 100;
/// Entities (or days) whose answers are compared, per query.
const CHECK_SAMPLES: usize = 3;
/// Relative tolerance of an average against PostgreSQL's.
const TOLERANCE: f64 = 1e-9;
/// Untimed repetitions of each query on each system before the timed ones.
const WARM_UP: usize = 3;

// Targets from the issue: reported, never enforced.
const TARGET_INGEST: f64 = 1_000_000.0;
const TARGET_INGEST_VS_VM: f64 = 1.0;
const TARGET_BYTES_VS_VM: f64 = 1.5;
const TARGET_A_MS: f64 = 10.0;
const TARGET_VS_PG: f64 = 5.0;

struct Sizes {
    sensors: usize,
    days: usize,
    /// Timed repetitions of (a), (b), (c), (d).
    reps: [usize; 4],
}

/// Tiny sizes (`--quick`): they check the harness, and measure nothing.
const QUICK: Sizes = Sizes {
    sensors: 50,
    days: 30,
    reps: [20, 3, 20, 20],
};

const FULL: Sizes = Sizes {
    sensors: 1_000,
    days: 365,
    reps: [200, 12, 300, 300],
};

/// The four queries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    A,
    B,
    C,
    D,
}

const KINDS: [Kind; 4] = [Kind::A, Kind::B, Kind::C, Kind::D];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::A => "(a) year/P1D",
            Kind::B => "(b) all/PT1H",
            Kind::C => "(c) lastN",
            Kind::D => "(d) raw day",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Kind::A => "a_daily_avg_year",
            Kind::B => "b_hourly_avg_month_all",
            Kind::C => "c_last_n",
            Kind::D => "d_raw_day",
        }
    }

    fn about(self) -> &'static str {
        match self {
            Kind::A => "one entity, one attribute, daily avg over the year",
            Kind::B => "every entity, hourly avg over one month, Link pages of 100 followed",
            Kind::C => "lastN=100 of one entity",
            Kind::D => "raw values of one entity over one day",
        }
    }

    fn sql(self) -> String {
        match self {
            Kind::A => temporal_pg::sql_a(),
            Kind::B => temporal_pg::sql_b(),
            Kind::C => temporal_pg::sql_c(),
            Kind::D => temporal_pg::sql_d(),
        }
    }
}

/// One query of one repetition: its entity, its time range.
#[derive(Clone, Debug)]
struct Pick {
    sensor: usize,
    from_ms: i64,
    to_ms: i64,
}

/// The whole calendar year of the data (a).
const YEAR: (i64, i64) = (START_MS, START_MS + 365 * DAY_MS);

fn pick(kind: Kind, readings: &Readings, rng: &mut SmallRng, rep: usize) -> Pick {
    let sensor = rng.random_range(0..readings.sensors);
    match kind {
        Kind::A | Kind::C => Pick {
            sensor,
            from_ms: YEAR.0,
            to_ms: YEAR.1,
        },
        Kind::B => {
            let months = months(readings);
            let (from_ms, to_ms) = months[rep % months.len()];
            Pick {
                sensor,
                from_ms,
                to_ms,
            }
        }
        Kind::D => {
            let day = rng.random_range(0..readings.per_sensor / PER_DAY) as i64;
            Pick {
                sensor,
                from_ms: START_MS + day * DAY_MS,
                to_ms: START_MS + (day + 1) * DAY_MS,
            }
        }
    }
}

/// The calendar months of 2025 that hold data, as (start, end) in ms.
fn months(readings: &Readings) -> Vec<(i64, i64)> {
    (1..=12)
        .map(|m| {
            let end = if m == 12 {
                month_start_ms(2026, 1)
            } else {
                month_start_ms(2025, m + 1)
            };
            (month_start_ms(2025, m), end)
        })
        .filter(|&(start, _)| start < readings.end_ms())
        .collect()
}

fn between(p: &Pick) -> String {
    format!(
        "timerel=between&timeAt={}&endTimeAt={}",
        rfc3339(p.from_ms),
        rfc3339(p.to_ms)
    )
}

/// The first request of a query on Borough (for (b), its first page).
fn borough_path(kind: Kind, p: &Pick) -> String {
    let id = Readings::entity_id(p.sensor);
    match kind {
        Kind::A => format!(
            "{TEMPORAL_PATH}/{id}?attrs={ATTR}&{}&options=aggregatedValues&aggrMethods=avg&aggrPeriodDuration=P1D",
            between(p)
        ),
        Kind::B => format!(
            "{TEMPORAL_PATH}?type={ENTITY_TYPE}&attrs={ATTR}&{}&options=aggregatedValues&aggrMethods=avg&aggrPeriodDuration=PT1H&limit={PAGE}",
            between(p)
        ),
        Kind::C => format!("{TEMPORAL_PATH}/{id}?attrs={ATTR}&lastN={LAST_N}"),
        Kind::D => format!(
            "{TEMPORAL_PATH}/{id}?attrs={ATTR}&{}&options=temporalValues",
            between(p)
        ),
    }
}

/// The parameters of the query's SQL.
fn pg_params(kind: Kind, p: &Pick) -> (Option<String>, Vec<f64>) {
    let id = Readings::entity_id(p.sensor);
    let range = vec![p.from_ms as f64 / 1000.0, p.to_ms as f64 / 1000.0];
    match kind {
        Kind::A | Kind::D => (Some(id), range),
        Kind::B => (None, range),
        Kind::C => (Some(id), Vec::new()),
    }
}

fn headers() -> Vec<(HeaderName, HeaderValue)> {
    vec![temporal_http::tenant(TENANT)]
}

/// What Borough's bulk import measured.
struct Import {
    /// From the first byte to the last 200.
    elapsed: Duration,
    bytes_before: u64,
    bytes_after: u64,
    /// Sums of the answers' `points`, `series`, `entities`.
    answered: [u64; 3],
    memory: Option<Memory>,
}

/// One query measured on both systems.
struct QueryRun {
    kind: Kind,
    example: String,
    sql: String,
    run: ShapeRun,
    /// Requests per sweep of (b) (pages).
    pages: Option<usize>,
}

/// Everything measured, before the report.
struct Measured {
    generator_rate: f64,
    streams: usize,
    import: Import,
    vm: VmRun,
    pg: temporal_pg::Loaded,
    checks: Vec<String>,
    queries: Vec<QueryRun>,
    memory_after_queries: Option<Memory>,
    bytes_at_end: u64,
}

struct VmRun {
    version: String,
    ingested: temporal_vm::Ingested,
    on_disk: temporal_vm::OnDisk,
    rss_kb: Option<u64>,
}

pub fn run(opts: &Options) -> Result<(), String> {
    let sizes = if opts.quick { QUICK } else { FULL };
    let info = RunInfo::new("temporal", opts.quick);
    let readings = Readings {
        seed: SEED,
        sensors: sizes.sensors,
        per_sensor: sizes.days * PER_DAY,
    };
    let streams = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8);
    eprintln!(
        "{} sensors × {} readings = {} points (seed {SEED:#x}), {streams} streams",
        readings.sensors,
        readings.per_sensor,
        thousands(readings.points() as f64)
    );
    let runtime = common::load_runtime()?;
    // Fail fast, before loading Borough, if a baseline cannot run.
    runtime.block_on(postgres::check(&opts.pg))?;
    drop(runtime.block_on(Victoria::start())?);
    let generator_rate = generator_rate(&readings);

    let mut server = common::start_server()?;
    let measured = runtime.block_on(measure(
        &mut server,
        readings,
        streams,
        &sizes,
        &opts.pg,
        generator_rate,
    ))?;
    drop(server);

    let report = Report {
        info,
        readings,
        measured,
    };
    publish(&report.table(), &report.to_json(), &opts.out)?;
    for q in &report.measured.queries {
        q.run.check_failures(q.kind.name())?;
    }
    Ok(())
}

/// Points per second that one generator thread writes as CSV, alone: the
/// load's own ceiling per stream.
fn generator_rate(readings: &Readings) -> f64 {
    let sample = Readings {
        per_sensor: readings.per_sensor.min(2 * PER_DAY),
        ..*readings
    };
    let t = std::time::Instant::now();
    let mut bytes = 0usize;
    let _ = sample.generate(0..sample.sensors, Format::BoroughCsv, |chunk| {
        bytes += chunk.len();
        Ok::<_, ()>(())
    });
    let secs = t.elapsed().as_secs_f64();
    std::hint::black_box(bytes);
    if secs > 0.0 {
        sample.points() as f64 / secs
    } else {
        0.0
    }
}

async fn measure(
    server: &mut Server,
    readings: Readings,
    streams: usize,
    sizes: &Sizes,
    pg: &str,
    generator_rate: f64,
) -> Result<Measured, String> {
    eprintln!("borough: importing {streams} CSV streams into {IMPORT_PATH}");
    let import = borough_import(server, readings, streams).await?;
    eprintln!(
        "borough: {} points/s, {:.2} bytes/point",
        thousands(per_second(readings.points(), import.elapsed)),
        (import.bytes_after.saturating_sub(import.bytes_before)) as f64 / readings.points() as f64
    );

    eprintln!("victoria-metrics: writing {streams} line-protocol streams to /write");
    let vm = victoria(readings, streams).await?;

    let admin = postgres::connect(pg).await?;
    let result = with_table(&admin, server, readings, streams, sizes, pg).await;
    let dropped = postgres::drop_table(&admin, TABLE).await;
    let (pg_loaded, checks, queries) = result?;
    dropped?;
    server.check_alive()?;
    Ok(Measured {
        generator_rate,
        streams,
        import,
        vm,
        pg: pg_loaded,
        checks,
        queries,
        memory_after_queries: server.memory(),
        bytes_at_end: temporal_vm::dir_bytes(server.data_dir()),
    })
}

/// Streams the CSV into Borough, one connection per stream, and checks the
/// answers' counts.
async fn borough_import(
    server: &mut Server,
    readings: Readings,
    streams: usize,
) -> Result<Import, String> {
    let addr = server.addr();
    let bytes_before = temporal_vm::dir_bytes(server.data_dir());
    let mut senders = Vec::with_capacity(streams);
    for _ in 0..streams {
        senders.push(temporal_http::open::<ChannelBody>(addr).await?);
    }
    let start = Instant::now();
    let mut set = JoinSet::new();
    for (k, sender) in senders.into_iter().enumerate() {
        let mut headers = headers();
        headers.push(temporal_http::content_type("text/csv"));
        let upload = Upload {
            addr,
            uri: hyper::Uri::from_static(IMPORT_PATH),
            headers,
            readings,
            sensors: readings.stream_sensors(k, streams),
            format: Format::BoroughCsv,
        };
        set.spawn(upload.send(sender));
    }
    let mut answers = Vec::with_capacity(streams);
    while let Some(joined) = set.join_next().await {
        answers.push(joined.map_err(|e| format!("an import worker crashed: {e}"))??);
    }
    let elapsed = start.elapsed();
    server.check_alive()?;
    let mut answered = [0u64; 3];
    for (status, body) in answers {
        if status != StatusCode::OK {
            return Err(format!(
                "borough: POST {IMPORT_PATH} answered {status}: {}",
                quote(&body)
            ));
        }
        let v: Value = serde_json::from_slice(&body).map_err(|e| {
            format!(
                "borough: POST {IMPORT_PATH} answered invalid JSON ({e}): {}",
                quote(&body)
            )
        })?;
        for (sum, key) in answered.iter_mut().zip(["points", "series", "entities"]) {
            *sum += v
                .get(key)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("borough: the import's answer has no '{key}': {v}"))?;
        }
    }
    let expected = [
        readings.points() as u64,
        readings.sensors as u64,
        readings.sensors as u64,
    ];
    if answered != expected {
        return Err(format!(
            "borough: the imports answered points/series/entities {answered:?}, expected {expected:?}"
        ));
    }
    Ok(Import {
        elapsed,
        bytes_before,
        bytes_after: temporal_vm::dir_bytes(server.data_dir()),
        answered,
        memory: server.memory(),
    })
}

/// Starts VictoriaMetrics, loads it, lets it settle, and stops it.
async fn victoria(readings: Readings, streams: usize) -> Result<VmRun, String> {
    let mut vm = Victoria::start().await?;
    let ingested = vm.ingest(readings, streams).await?;
    eprintln!(
        "victoria-metrics: {} points/s until queryable ({} polls); waiting for its merges",
        thousands(per_second(readings.points(), ingested.queryable)),
        ingested.polls
    );
    let on_disk = vm.settle().await?;
    let run = VmRun {
        version: vm.version().to_string(),
        ingested,
        on_disk,
        rss_kb: vm.rss_kb(),
    };
    eprintln!(
        "victoria-metrics: {:.2} bytes/point (data directory {})",
        run.on_disk.bytes as f64 / readings.points() as f64,
        vm.data_dir().display()
    );
    drop(vm);
    Ok(run)
}

/// The steps that need the PostgreSQL table: load, check, measure.
async fn with_table(
    admin: &Client,
    server: &mut Server,
    readings: Readings,
    streams: usize,
    sizes: &Sizes,
    pg: &str,
) -> Result<(temporal_pg::Loaded, Vec<String>, Vec<QueryRun>), String> {
    eprintln!("postgres: COPY over {streams} connections, then the B-tree index");
    let loaded = temporal_pg::load(admin, pg, readings, streams)
        .await
        .map_err(|e| format!("postgres: {e}"))?;

    let mut conn = GetConn::open(server.addr()).await?;
    let client = postgres::connect(pg).await?;
    let mut statements = Vec::with_capacity(KINDS.len());
    for kind in KINDS {
        let sql = kind.sql();
        statements.push(bounded(&format!("cannot prepare {sql}"), client.prepare(&sql)).await?);
    }

    let checks = check(&mut conn, &client, &statements, &readings).await?;
    server.check_alive()?;

    let mut queries = Vec::with_capacity(KINDS.len());
    for (n, kind) in KINDS.into_iter().enumerate() {
        let reps = sizes.reps[n];
        let seed = SEED ^ ((n as u64 + 1) << 16);
        eprintln!("{}: {reps} repetitions on each system", kind.name());
        let mut rng = SmallRng::seed_from_u64(seed);
        let picks: Vec<Pick> = (0..WARM_UP + reps)
            .map(|rep| pick(kind, &readings, &mut rng, rep))
            .collect();
        let (borough, pages) = time_borough(&mut conn, kind, &picks, &readings).await?;
        let baseline = time_pg(&client, &statements[n], kind, &picks).await?;
        queries.push(QueryRun {
            kind,
            example: borough_path(kind, &picks[0]),
            sql: kind.sql(),
            run: ShapeRun { borough, baseline },
            pages,
        });
        server.check_alive()?;
    }
    Ok((loaded, checks, queries))
}

/// Runs the picks after the warm-up ones sequentially on Borough, one
/// latency per query (for (b), per sweep of every page).
async fn time_borough(
    conn: &mut GetConn,
    kind: Kind,
    picks: &[Pick],
    readings: &Readings,
) -> Result<(Phase, Option<usize>), String> {
    let headers = headers();
    let mut latencies = Vec::with_capacity(picks.len());
    let mut failures = super::load::Failures::default();
    let mut pages = None;
    let mut elapsed = Duration::ZERO;
    for (rep, p) in picks.iter().enumerate() {
        let path = borough_path(kind, p);
        let t = Instant::now();
        let outcome = if kind == Kind::B {
            sweep(conn, &path, &headers, false).await.and_then(|s| {
                pages = Some(s.pages);
                if s.entities.len() == readings.sensors {
                    Ok(())
                } else {
                    Err(format!(
                        "the sweep read {} entities, expected {}",
                        s.entities.len(),
                        readings.sensors
                    ))
                }
            })
        } else {
            conn.get(&path, &headers)
                .await
                .and_then(|a| a.expect(&path, &[StatusCode::OK]))
        };
        let took = t.elapsed();
        if rep < WARM_UP {
            outcome.map_err(|e| format!("{} warm-up: {e}", kind.name()))?;
            continue;
        }
        elapsed += took;
        latencies.push(micros(took));
        if let Err(e) = outcome {
            failures.record(|| format!("GET {path}: {e}"));
        }
    }
    let phase = Phase::timed("borough", "req/s", "query", elapsed, latencies);
    Ok((phase.with_failures(failures), pages))
}

/// The same picks on PostgreSQL: each query executed and every row read.
async fn time_pg(
    client: &Client,
    statement: &tokio_postgres::Statement,
    kind: Kind,
    picks: &[Pick],
) -> Result<Phase, String> {
    let mut latencies = Vec::with_capacity(picks.len());
    let mut failures = super::load::Failures::default();
    let mut elapsed = Duration::ZERO;
    for (rep, p) in picks.iter().enumerate() {
        let (entity, times) = pg_params(kind, p);
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        if let Some(e) = &entity {
            params.push(e);
        }
        for t in &times {
            params.push(t);
        }
        let t = Instant::now();
        let result = bounded(&kind.sql(), client.query(statement, &params)).await;
        let took = t.elapsed();
        if rep < WARM_UP {
            result.map_err(|e| format!("{} warm-up on postgres: {e}", kind.name()))?;
            continue;
        }
        elapsed += took;
        latencies.push(micros(took));
        if let Err(e) = result {
            failures.record(|| e);
        }
    }
    let phase = Phase::timed("postgres", "req/s", "query", elapsed, latencies);
    Ok(phase.with_failures(failures))
}

/// What a sweep of (b) read.
struct Sweep {
    pages: usize,
    /// A `Link` rel="next" target outside the API (without its
    /// `/ngsi-ld/v1` prefix): followed with the prefix restored, and reported.
    link_defect: Option<String>,
    /// Each entity's hourly averages, when kept.
    entities: BTreeMap<String, Vec<(i64, f64)>>,
}

/// Follows the `Link` rel="next" pages from `first` to the end. Keeps the
/// averages when `keep` is set (the check), else only the ids.
async fn sweep(
    conn: &mut GetConn,
    first: &str,
    headers: &[(HeaderName, HeaderValue)],
    keep: bool,
) -> Result<Sweep, String> {
    let mut out = Sweep {
        pages: 0,
        link_defect: None,
        entities: BTreeMap::new(),
    };
    let mut next = Some(first.to_string());
    while let Some(path) = next {
        let answer = conn.get(&path, headers).await?;
        answer.expect(&format!("GET {path}"), &[StatusCode::OK])?;
        out.pages += 1;
        if out.pages > 100_000 {
            return Err(format!("more than 100,000 pages from {first}"));
        }
        let body = answer.json(&format!("GET {path}"))?;
        let items = body
            .as_array()
            .ok_or_else(|| format!("GET {path}: the answer is not an array"))?;
        for item in items {
            let id = item
                .get("id")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("GET {path}: an entity without id"))?
                .to_string();
            let avgs = if keep {
                aggregated(item).map_err(|e| format!("GET {path}: {id}: {e}"))?
            } else {
                Vec::new()
            };
            if out.entities.insert(id.clone(), avgs).is_some() {
                return Err(format!("GET {path}: entity {id} appears on two pages"));
            }
        }
        next = answer.next_link().map(|link| {
            if link.starts_with(API_ROOT) {
                return link;
            }
            if out.link_defect.is_none() {
                out.link_defect = Some(format!(
                    "the Link rel=\"next\" of GET {path} is <{link}>, outside {API_ROOT}; followed as {API_ROOT}{link}"
                ));
            }
            format!("{API_ROOT}{link}")
        });
    }
    Ok(out)
}

/// The attribute of a temporal entity; the first instance when there are several.
fn attribute(entity: &Value) -> Result<&Value, String> {
    let attr = entity
        .get(ATTR)
        .ok_or_else(|| format!("no '{ATTR}' in {}", short(entity)))?;
    Ok(match attr {
        Value::Array(instances) if instances.len() == 1 => &instances[0],
        other => other,
    })
}

/// `"avg": [[v, start, end], …]` as (start ms, v), skipping empty periods.
fn aggregated(entity: &Value) -> Result<Vec<(i64, f64)>, String> {
    let attr = attribute(entity)?;
    let avg = attr
        .get("avg")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("no 'avg' array in {}", short(attr)))?;
    let mut out = Vec::with_capacity(avg.len());
    for item in avg {
        let triple = item.as_array().filter(|t| t.len() == 3);
        let Some(triple) = triple else {
            return Err(format!("an 'avg' item is not [value, start, end]: {item}"));
        };
        if triple[0].is_null() {
            continue;
        }
        let v = triple[0]
            .as_f64()
            .ok_or_else(|| format!("an average is not a number: {item}"))?;
        out.push((time_ms(&triple[1])?, v));
    }
    Ok(out)
}

/// `"values": [[v, t], …]` as (t ms, v).
fn temporal_values(entity: &Value) -> Result<Vec<(i64, f64)>, String> {
    let attr = attribute(entity)?;
    let values = attr
        .get("values")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("no 'values' array in {}", short(attr)))?;
    values
        .iter()
        .map(|item| {
            let pair = item.as_array().filter(|p| p.len() == 2);
            let Some(pair) = pair else {
                return Err(format!("a 'values' item is not [value, time]: {item}"));
            };
            let v = pair[0]
                .as_f64()
                .ok_or_else(|| format!("a value is not a number: {item}"))?;
            Ok((time_ms(&pair[1])?, v))
        })
        .collect()
}

/// The normalized temporal form: `"temperature": [{"value", "observedAt"}, …]`.
fn instances(entity: &Value) -> Result<Vec<(i64, f64)>, String> {
    let attr = entity
        .get(ATTR)
        .ok_or_else(|| format!("no '{ATTR}' in {}", short(entity)))?;
    let list = match attr {
        Value::Array(items) => items.as_slice(),
        single => std::slice::from_ref(single),
    };
    list.iter()
        .map(|instance| {
            let v = instance
                .get("value")
                .and_then(Value::as_f64)
                .ok_or_else(|| format!("an instance without a numeric value: {instance}"))?;
            let t = instance
                .get("observedAt")
                .ok_or_else(|| format!("an instance without observedAt: {instance}"))?;
            Ok((time_ms(t)?, v))
        })
        .collect()
}

fn time_ms(v: &Value) -> Result<i64, String> {
    let text = v
        .as_str()
        .ok_or_else(|| format!("a time is not a string: {v}"))?;
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("a time is not RFC 3339 ({e}): {text}"))
}

fn short(v: &Value) -> String {
    let text = v.to_string();
    if text.len() > 300 {
        format!("{} ...", &text[..text.floor_char_boundary(300)])
    } else {
        text
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= TOLERANCE * a.abs().max(b.abs()) || (a - b).abs() <= 1e-12
}

/// Compares a series of (time, value) of Borough with the expected one.
fn compare(what: &str, got: &[(i64, f64)], expected: &[(i64, f64)]) -> Result<(), String> {
    if got.len() != expected.len() {
        return Err(format!(
            "{what}: Borough answered {} values, expected {} (first: {:?} vs {:?})",
            got.len(),
            expected.len(),
            got.first(),
            expected.first()
        ));
    }
    for (k, (g, e)) in got.iter().zip(expected).enumerate() {
        if g.0 != e.0 || !close(g.1, e.1) {
            return Err(format!(
                "{what}: value #{k} differs: Borough [{}, {}], expected [{}, {}]",
                g.1,
                rfc3339(g.0),
                e.1,
                rfc3339(e.0)
            ));
        }
    }
    Ok(())
}

/// The check before the timed runs: each query's answer for a few picks,
/// against PostgreSQL (averages) and the generator (raw values). Returns
/// what was checked, one line each.
async fn check(
    conn: &mut GetConn,
    client: &Client,
    statements: &[tokio_postgres::Statement],
    readings: &Readings,
) -> Result<Vec<String>, String> {
    let headers = headers();
    let samples: Vec<usize> = (0..CHECK_SAMPLES)
        .map(|k| k * (readings.sensors - 1) / (CHECK_SAMPLES - 1).max(1))
        .collect();
    let pg_rows = |kind: Kind, p: &Pick| {
        let (entity, times) = pg_params(kind, p);
        let statement = statements[KINDS.iter().position(|&k| k == kind).unwrap_or(0)].clone();
        async move {
            let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
            if let Some(e) = &entity {
                params.push(e);
            }
            for t in &times {
                params.push(t);
            }
            let rows = bounded(&kind.sql(), client.query(&statement, &params)).await?;
            temporal_pg::rows(&rows, kind == Kind::B)
        }
    };
    let mut lines = Vec::new();

    // (a): daily averages against PostgreSQL's.
    let mut buckets = 0;
    for &sensor in &samples {
        let p = Pick {
            sensor,
            from_ms: YEAR.0,
            to_ms: YEAR.1,
        };
        let path = borough_path(Kind::A, &p);
        let what = format!("check (a) GET {path}");
        let answer = conn.get(&path, &headers).await?;
        answer.expect(&what, &[StatusCode::OK])?;
        let got = aggregated(&answer.json(&what)?).map_err(|e| format!("{what}: {e}"))?;
        let expected: Vec<(i64, f64)> = pg_rows(Kind::A, &p)
            .await?
            .into_iter()
            .map(|(_, t, v)| (t, v))
            .collect();
        compare(&what, &got, &expected)?;
        buckets += got.len();
    }
    lines.push(format!(
        "(a) {} entities: {buckets} daily averages equal PostgreSQL's (relative {TOLERANCE:e})",
        samples.len()
    ));

    // (b): the sweep of the first month reads every entity once; a few
    // entities' hourly averages equal PostgreSQL's.
    let month = months(readings)[0];
    let p = Pick {
        sensor: 0,
        from_ms: month.0,
        to_ms: month.1,
    };
    let path = borough_path(Kind::B, &p);
    let what = format!("check (b) GET {path}");
    let swept = sweep(conn, &path, &headers, true)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let expected_ids: BTreeSet<String> = (0..readings.sensors).map(Readings::entity_id).collect();
    let got_ids: BTreeSet<String> = swept.entities.keys().cloned().collect();
    if got_ids != expected_ids {
        let missing = expected_ids.difference(&got_ids).next();
        let extra = got_ids.difference(&expected_ids).next();
        return Err(format!(
            "{what}: the sweep read {} entities in {} pages, expected {} (first missing: {missing:?}, first unexpected: {extra:?})",
            got_ids.len(),
            swept.pages,
            expected_ids.len()
        ));
    }
    let all = pg_rows(Kind::B, &p).await?;
    let mut hours = 0;
    for &sensor in &samples {
        let id = Readings::entity_id(sensor);
        let expected: Vec<(i64, f64)> = all
            .iter()
            .filter(|(e, _, _)| e.as_deref() == Some(id.as_str()))
            .map(|&(_, t, v)| (t, v))
            .collect();
        compare(&format!("{what}: {id}"), &swept.entities[&id], &expected)?;
        hours += expected.len();
    }
    if let Some(defect) = &swept.link_defect {
        lines.push(format!("(b) WARNING: {defect}"));
    }
    lines.push(format!(
        "(b) month from {}: {} entities in {} page{}, each once; {hours} hourly averages of {} entities equal PostgreSQL's",
        rfc3339(month.0),
        got_ids.len(),
        swept.pages,
        if swept.pages == 1 { "" } else { "s" },
        samples.len()
    ));

    // (c): the newest 100 readings, with the generator's values.
    for &sensor in &samples {
        let p = Pick {
            sensor,
            from_ms: 0,
            to_ms: 0,
        };
        let path = borough_path(Kind::C, &p);
        let what = format!("check (c) GET {path}");
        let answer = conn.get(&path, &headers).await?;
        answer.expect(&what, &[StatusCode::OK, StatusCode::PARTIAL_CONTENT])?;
        let mut got = instances(&answer.json(&what)?).map_err(|e| format!("{what}: {e}"))?;
        got.sort_by_key(|&(t, _)| t);
        let first = readings.per_sensor - LAST_N;
        let expected: Vec<(i64, f64)> = (first..readings.per_sensor)
            .map(|i| (Readings::time_ms(i), readings.value(sensor, i)))
            .collect();
        compare(&what, &got, &expected)?;
        let pg: Vec<i64> = pg_rows(Kind::C, &p)
            .await?
            .into_iter()
            .map(|(_, t, _)| t)
            .collect();
        if pg.len() != LAST_N || pg.iter().min() != expected.first().map(|e| &e.0) {
            return Err(format!(
                "check (c): PostgreSQL answered {} rows from {:?}",
                pg.len(),
                pg.iter().min()
            ));
        }
    }
    lines.push(format!(
        "(c) {} entities: {LAST_N} instances each, the newest, with the generated values",
        samples.len()
    ));

    // (d): 96 raw values of a day, with the generator's values.
    let days = readings.per_sensor / PER_DAY;
    for (k, &sensor) in samples.iter().enumerate() {
        let day = (k * 7 + days / 2) % days;
        let p = Pick {
            sensor,
            from_ms: START_MS + day as i64 * DAY_MS,
            to_ms: START_MS + (day as i64 + 1) * DAY_MS,
        };
        let path = borough_path(Kind::D, &p);
        let what = format!("check (d) GET {path}");
        let answer = conn.get(&path, &headers).await?;
        answer.expect(&what, &[StatusCode::OK])?;
        let got = temporal_values(&answer.json(&what)?).map_err(|e| format!("{what}: {e}"))?;
        let expected: Vec<(i64, f64)> = (day * PER_DAY..(day + 1) * PER_DAY)
            .map(|i| (Readings::time_ms(i), readings.value(sensor, i)))
            .collect();
        compare(&what, &got, &expected)?;
        let pg = pg_rows(Kind::D, &p).await?;
        if pg.len() != PER_DAY {
            return Err(format!(
                "check (d): PostgreSQL answered {} rows for a day",
                pg.len()
            ));
        }
    }
    lines.push(format!(
        "(d) {} entity-days: {PER_DAY} values each, equal to the generated ones",
        samples.len()
    ));
    for line in &lines {
        eprintln!("check {line}");
    }
    Ok(lines)
}

fn per_second(count: usize, elapsed: Duration) -> f64 {
    super::report::per_second(count, elapsed)
}

struct Report {
    info: RunInfo,
    readings: Readings,
    measured: Measured,
}

impl Report {
    fn points(&self) -> f64 {
        self.readings.points() as f64
    }

    fn borough_rate(&self) -> f64 {
        per_second(self.readings.points(), self.measured.import.elapsed)
    }

    fn borough_bytes_per_point(&self) -> f64 {
        let i = &self.measured.import;
        i.bytes_after.saturating_sub(i.bytes_before) as f64 / self.points()
    }

    fn vm_rate(&self) -> f64 {
        per_second(self.readings.points(), self.measured.vm.ingested.queryable)
    }

    fn vm_bytes_per_point(&self) -> f64 {
        self.measured.vm.on_disk.bytes as f64 / self.points()
    }

    fn pg_rate(&self) -> f64 {
        per_second(self.readings.points(), self.measured.pg.copy_elapsed)
    }

    fn targets(&self) -> Vec<Target> {
        let mut targets = vec![
            Target::rate_at_least("ingest", self.borough_rate(), TARGET_INGEST, "points/s"),
            Target::ratio_at_least(
                "ingest ÷ victoria-metrics",
                ratio(self.borough_rate(), self.vm_rate()),
                TARGET_INGEST_VS_VM,
            ),
        ];
        let bytes_ratio = ratio(self.borough_bytes_per_point(), self.vm_bytes_per_point());
        targets.push(Target::new(
            "bytes/point ÷ vm",
            bytes_ratio,
            format!("{bytes_ratio:.2}x"),
            // "at most 1.5x": Bound::Below is strict.
            Bound::Below(TARGET_BYTES_VS_VM + 1e-9),
            format!("≤ {TARGET_BYTES_VS_VM}x"),
        ));
        if let Some(a) = self.measured.queries.iter().find(|q| q.kind == Kind::A) {
            targets.push(Target::latency_below(
                "(a) p99",
                ms(a.run.borough.latency.p99_us as f64),
                TARGET_A_MS,
            ));
        }
        for q in &self.measured.queries {
            targets.push(Target::ratio_at_least(
                format!(
                    "{} pg p50 ÷ p50",
                    q.kind.name().split(' ').next().unwrap_or("")
                ),
                p50_ratio(&q.run),
                TARGET_VS_PG,
            ));
        }
        targets
    }

    fn table(&self) -> String {
        let m = &self.measured;
        let r = &self.readings;
        let mut out = format!(
            "{}{} sensors × {} readings every 15 min from {} = {} points; {} streams\n\n",
            self.info.title(),
            thousands(r.sensors as f64),
            thousands(r.per_sensor as f64),
            rfc3339(START_MS),
            thousands(self.points()),
            m.streams,
        );
        out.push_str(&format!(
            "{:<26} {:>16} {:>10} {:>12}  {}\n",
            "ingest", "points/s", "seconds", "bytes/point", "notes"
        ));
        let row = |name: &str, rate: f64, secs: f64, bpp: Option<f64>, note: String| {
            format!(
                "{:<26} {:>16} {:>10.2} {:>12}  {}\n",
                name,
                thousands(rate),
                secs,
                bpp.map_or("-".to_string(), |b| format!("{b:.2}")),
                note
            )
        };
        out.push_str(&row(
            "borough import (CSV)",
            self.borough_rate(),
            m.import.elapsed.as_secs_f64(),
            Some(self.borough_bytes_per_point()),
            format!(
                "first byte → last 200 (durable); RSS / peak after: {}",
                memory_text(m.import.memory)
            ),
        ));
        out.push_str(&row(
            "victoria-metrics (Influx)",
            self.vm_rate(),
            m.vm.ingested.queryable.as_secs_f64(),
            Some(self.vm_bytes_per_point()),
            "first byte → all points counted by a query; bytes after merges settled".to_string(),
        ));
        out.push_str(&row(
            "  victoria-metrics acked",
            per_second(r.points(), m.vm.ingested.acked),
            m.vm.ingested.acked.as_secs_f64(),
            Some(m.vm.on_disk.bytes_after_flush as f64 / self.points()),
            "first byte → last 204 (buffered in memory); bytes right after force_flush".to_string(),
        ));
        out.push_str(&row(
            "postgres COPY",
            self.pg_rate(),
            m.pg.copy_elapsed.as_secs_f64(),
            Some(m.pg.total_bytes as f64 / self.points()),
            format!(
                "+ {:.2} s CREATE INDEX and ANALYZE; bytes: table + index",
                m.pg.index_elapsed.as_secs_f64()
            ),
        ));
        out.push_str(&format!(
            "  (one generator thread alone: {} points/s of CSV; Borough's data directory at the end: {:.2} bytes/point)\n\n",
            thousands(m.generator_rate),
            m.bytes_at_end.saturating_sub(m.import.bytes_before) as f64 / self.points()
        ));

        let ratio_headings = format!("{:>13} {:>13}", "pg p50 ÷ p50", "pg p99 ÷ p99");
        let rows = m.queries.iter().map(|q| {
            let ratios = format!(
                "{:>13} {:>13}",
                format!("{:.2}x", p50_ratio(&q.run)),
                format!("{:.2}x", p99_ratio(&q.run))
            );
            (q.kind.name(), &q.run, ratios)
        });
        out.push_str(&shape_table(8, &ratio_headings, rows));
        out.push_str("\nqueries (sequential, one client; entities and days picked at random, the same for both systems)\n");
        for q in &m.queries {
            let pages = q
                .pages
                .map_or(String::new(), |p| format!(" ({p} requests a sweep)"));
            out.push_str(&format!(
                "  {:<13} {}{pages}\n  {:<13} e.g. {}\n",
                q.kind.name(),
                q.kind.about(),
                "",
                q.example
            ));
        }
        out.push_str("\nchecks\n");
        for line in &m.checks {
            out.push_str(&format!("  {line}\n"));
        }
        out.push('\n');
        let note = "(req/s of a query is 1 ÷ its mean latency: one client, one query at a time; \
                    \"pg p50 ÷ p50\" is PostgreSQL's median latency ÷ Borough's)\n";
        out.push_str(&self.info.targets_section(&self.targets(), note));
        out
    }

    fn to_json(&self) -> Value {
        let m = &self.measured;
        let r = &self.readings;
        let queries: serde_json::Map<String, Value> = m
            .queries
            .iter()
            .map(|q| {
                let value = json!({
                    "about": q.kind.about(),
                    "example": q.example,
                    "sql": q.sql,
                    "pages_per_sweep": q.pages,
                    "borough": q.run.borough.to_json(),
                    "postgres": q.run.baseline.to_json(),
                    "ratios": {
                        "postgres_p50_vs_borough_p50": round_to(p50_ratio(&q.run), 1e3),
                        "postgres_p99_vs_borough_p99": round_to(p99_ratio(&q.run), 1e3),
                    },
                });
                (q.kind.key().to_string(), value)
            })
            .collect();
        self.info.json(json!({
            "config": {
                "seed": SEED,
                "sensors": r.sensors,
                "readings_per_sensor": r.per_sensor,
                "points": r.points(),
                "interval_s": 900,
                "start": rfc3339(START_MS),
                "attribute": ATTR,
                "streams": m.streams,
                "tenant": TENANT,
                "postgres_table": temporal_pg::describe(),
                "victoria_metrics": m.vm.version,
            },
            "ingest": {
                "borough": {
                    "points_per_s": round_to(self.borough_rate(), 10.0),
                    "elapsed_s": round_to(m.import.elapsed.as_secs_f64(), 1e3),
                    "bytes_before": m.import.bytes_before,
                    "bytes_after": m.import.bytes_after,
                    "bytes_per_point": round_to(self.borough_bytes_per_point(), 1e3),
                    "bytes_at_end": m.bytes_at_end,
                    "answered": {
                        "points": m.import.answered[0],
                        "series": m.import.answered[1],
                        "entities": m.import.answered[2],
                    },
                    "server_memory": memory_json(m.import.memory),
                },
                "victoria_metrics": {
                    "points_per_s_until_queryable": round_to(self.vm_rate(), 10.0),
                    "queryable_s": round_to(m.vm.ingested.queryable.as_secs_f64(), 1e3),
                    "points_per_s_until_acked": round_to(per_second(r.points(), m.vm.ingested.acked), 10.0),
                    "acked_s": round_to(m.vm.ingested.acked.as_secs_f64(), 1e3),
                    "count_polls": m.vm.ingested.polls,
                    "bytes": m.vm.on_disk.bytes,
                    "bytes_per_point": round_to(self.vm_bytes_per_point(), 1e3),
                    "bytes_after_flush": m.vm.on_disk.bytes_after_flush,
                    "settle_s": round_to(m.vm.on_disk.settle.as_secs_f64(), 1e3),
                    "rss_kb": m.vm.rss_kb,
                },
                "postgres": {
                    "points_per_s": round_to(self.pg_rate(), 10.0),
                    "copy_s": round_to(m.pg.copy_elapsed.as_secs_f64(), 1e3),
                    "index_s": round_to(m.pg.index_elapsed.as_secs_f64(), 1e3),
                    "bytes": m.pg.total_bytes,
                    "bytes_per_point": round_to(m.pg.total_bytes as f64 / self.points(), 1e3),
                },
                "generator_points_per_s_one_thread": round_to(m.generator_rate, 10.0),
            },
            "server_memory_after_queries": memory_json(m.memory_after_queries),
            "queries": queries,
            "checks": m.checks,
            "targets": targets_json(&self.targets()),
        }))
    }
}

fn p50_ratio(run: &ShapeRun) -> f64 {
    ratio(
        run.baseline.latency.p50_us as f64,
        run.borough.latency.p50_us as f64,
    )
}

fn p99_ratio(run: &ShapeRun) -> f64 {
    ratio(
        run.baseline.latency.p99_us as f64,
        run.borough.latency.p99_us as f64,
    )
}
