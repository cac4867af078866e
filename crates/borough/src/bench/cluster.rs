//! Scenario `cluster`: Borough as one node and as three nodes over one
//! PostgreSQL schema, and the embedded engine, on the same workload:
//!
//! - `ingest`: batch upserts of vehicles, the batches spread over the nodes;
//! - `query`: `GET /entities?type=Vehicle&q=speed>…&limit=20`, spread over
//!   the nodes;
//! - `lag`: a PATCH on one node, then reads on the next node until the new
//!   value shows (cross-node visibility; on one node, read-your-writes);
//! - `notify`: updates spread over the nodes, each matching one
//!   subscription: every one must reach the receiver exactly once.
//!
//! Each phase also reports the CPU the Borough processes and PostgreSQL
//! spent per operation (from `/proc`), which grounds the capacity model in
//! `docs/scale.md`: two cores cannot show three nodes scaling.

use super::common::{self, Options, READY_TIMEOUT, RunInfo};
use super::load::{self, Conn, Mix, ms};
use super::notify::{Receiver, lock, now_us};
use super::report::{Phase, Target, phase_table, publish, round_to, targets_json};
use super::server::Server;
use bytes::Bytes;
use hyper::{Method, StatusCode, Uri};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SEED: u64 = 0xC1_0573;
/// Concurrent queries per node.
const QUERY_CONCURRENCY: usize = 8;
/// Longest a change may take to show on another node before the run fails.
const LAG_LIMIT: Duration = Duration::from_secs(5);
/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

// Targets of the issue: cross-node visibility is bounded and measured.
const TARGET_LAG_P99_MS: f64 = 250.0;

struct Sizes {
    vehicles: usize,
    batch: usize,
    query: Duration,
    lag_samples: usize,
    notices: usize,
}

fn sizes(quick: bool) -> Sizes {
    if quick {
        Sizes {
            vehicles: 1_000,
            batch: 100,
            query: Duration::from_millis(500),
            lag_samples: 10,
            notices: 30,
        }
    } else {
        Sizes {
            vehicles: 30_000,
            batch: 500,
            query: Duration::from_secs(5),
            lag_samples: 200,
            notices: 600,
        }
    }
}

fn vehicle(i: usize) -> String {
    format!("urn:ngsi-ld:Vehicle:{i:06}")
}

fn uri(s: &str) -> Result<Uri, String> {
    Uri::try_from(s).map_err(|e| format!("invalid URI {s}: {e}"))
}

/// Where the nodes of a leg keep their data.
enum Store {
    Embedded,
    Postgres { schema: String },
}

/// A leg: its name, and its nodes.
struct Leg {
    name: &'static str,
    nodes: Vec<Server>,
}

/// CPU seconds the given processes have used so far.
fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may hold spaces): utime is
            // the 14th field of the line, stime the 15th.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / TICKS_PER_SECOND)
        })
        .sum()
}

/// The PostgreSQL server's processes (this machine's, on loopback).
fn postgres_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .collect()
}

/// CPU spent while `f` ran: (Borough's nodes, PostgreSQL), in seconds.
struct CpuMeter {
    nodes: Vec<u32>,
    postgres: Vec<u32>,
    start: (f64, f64),
}

impl CpuMeter {
    fn start(leg: &Leg) -> Self {
        let nodes: Vec<u32> = leg.nodes.iter().map(Server::pid).collect();
        let postgres = postgres_pids();
        let start = (cpu_seconds(&nodes), cpu_seconds(&postgres));
        Self {
            nodes,
            postgres,
            start,
        }
    }

    fn stop(&self) -> (f64, f64) {
        (
            cpu_seconds(&self.nodes) - self.start.0,
            cpu_seconds(&self.postgres) - self.start.1,
        )
    }
}

/// One phase's measurement, with the CPU it cost per operation.
struct Measured {
    phase: Phase,
    ops: usize,
    cpu: (f64, f64),
}

impl Measured {
    fn per_op_us(&self) -> (f64, f64) {
        let n = self.ops.max(1) as f64;
        (self.cpu.0 * 1e6 / n, self.cpu.1 * 1e6 / n)
    }
}

pub fn run(opts: &Options) -> Result<(), String> {
    let info = RunInfo::new("cluster", opts.quick);
    let sizes = sizes(opts.quick);
    let runtime = common::load_runtime()?;
    let schema_one = format!("borough_bench_one_{}", std::process::id());
    let schema_three = format!("borough_bench_three_{}", std::process::id());
    runtime.block_on(drop_schemas(&opts.pg, &[&schema_one, &schema_three]))?;
    let receiver = Receiver::start()?;
    let result = (|| {
        let mut results = Vec::new();
        for (name, store, nodes) in [
            ("embedded", Store::Embedded, 1),
            (
                "postgres-1",
                Store::Postgres {
                    schema: schema_one.clone(),
                },
                1,
            ),
            (
                "postgres-3",
                Store::Postgres {
                    schema: schema_three.clone(),
                },
                3,
            ),
        ] {
            let mut leg = start_leg(name, &store, nodes, &opts.pg)?;
            eprintln!("{name}: {nodes} node(s)");
            let measured = runtime.block_on(measure(&mut leg, &sizes, &receiver))?;
            results.push((name, measured));
        }
        Ok::<_, String>(results)
    })();
    runtime.block_on(drop_schemas(&opts.pg, &[&schema_one, &schema_three]))?;
    let results = result?;
    drop(runtime);
    drop(receiver);
    report(&info, opts, &sizes, &results)
}

async fn drop_schemas(pg: &str, schemas: &[&str]) -> Result<(), String> {
    let client = super::postgres::connect(pg).await?;
    for s in schemas {
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {s} CASCADE"))
            .await
            .map_err(|e| format!("cannot drop schema {s}: {e}"))?;
    }
    Ok(())
}

fn start_leg(name: &'static str, store: &Store, n: usize, pg: &str) -> Result<Leg, String> {
    let mut nodes = Vec::with_capacity(n);
    for _ in 0..n {
        let args: Vec<String> = match store {
            Store::Embedded => Vec::new(),
            Store::Postgres { schema } => ["--auth", "off", "--store", pg, "--pg-schema", schema]
                .into_iter()
                .map(str::to_string)
                .collect(),
        };
        nodes.push(Server::spawn_with(None, &args, READY_TIMEOUT)?);
    }
    Ok(Leg { name, nodes })
}

/// The four phases on one leg: [ingest, query, lag, notify].
async fn measure(
    leg: &mut Leg,
    sizes: &Sizes,
    receiver: &Receiver,
) -> Result<[Measured; 4], String> {
    let n = leg.nodes.len();
    // Ingest: each node gets every n-th batch.
    let docs: Vec<String> = (0..sizes.vehicles)
        .map(|i| {
            json!({"id": vehicle(i), "type": "Vehicle",
                   "speed": common::property(json!((i * 7) % 120)),
                   "sentAt": common::property(json!(0))})
            .to_string()
        })
        .collect();
    let batches = load::json_arrays(&docs, sizes.batch);
    let meter = CpuMeter::start(leg);
    let started = Instant::now();
    let mut parts = Vec::new();
    for (k, node) in leg.nodes.iter().enumerate() {
        let mine: Vec<Bytes> = batches.iter().skip(k).step_by(n).cloned().collect();
        let uri = Uri::from_static(common::UPSERT_PATH);
        parts.push(tokio::spawn(load::post_all(
            node.endpoint(),
            uri,
            Arc::new(mine),
            common::UPSERT_WORKERS,
            &[StatusCode::CREATED, StatusCode::NO_CONTENT],
        )));
    }
    let mut latencies = Vec::new();
    for p in parts {
        let run = p
            .await
            .map_err(|e| format!("ingest: {e}"))?
            .map_err(|e| format!("ingest: {e}"))?;
        latencies.extend(run.latencies_us);
    }
    let ingest = Measured {
        phase: Phase::entities_written(
            "ingest",
            sizes.vehicles,
            "batch",
            started.elapsed(),
            latencies,
        ),
        ops: sizes.vehicles,
        cpu: meter.stop(),
    };
    // Every node must hold every vehicle before the queries start.
    for node in &leg.nodes {
        wait_visible(
            node,
            &vehicle(sizes.vehicles - 1),
            "speed",
            &json!(((sizes.vehicles - 1) * 7) % 120),
        )
        .await?;
    }

    // Queries, on every node at once.
    let queries: Vec<Uri> = (0..100)
        .map(|k| {
            uri(&format!(
                "/ngsi-ld/v1/entities?type=Vehicle&q=speed%3E{}&limit=20",
                k % 110
            ))
        })
        .collect::<Result<_, _>>()?;
    let mix = Arc::new(Mix::Gets(queries));
    let meter = CpuMeter::start(leg);
    let mut runs = Vec::new();
    for (k, node) in leg.nodes.iter().enumerate() {
        runs.push(tokio::spawn(load::run_timed(
            node.endpoint(),
            mix.clone(),
            QUERY_CONCURRENCY,
            sizes.query,
            SEED + k as u64,
        )));
    }
    let mut merged = Vec::new();
    for r in runs {
        merged.push(r.await.map_err(|e| format!("query: {e}"))??);
    }
    // Nodes ran at the same time: the phase lasted as long as one of them.
    let elapsed = merged.iter().map(|r| r.elapsed).max().unwrap_or_default();
    let mut get_us = Vec::new();
    let mut failures = load::Failures::default();
    for r in merged {
        get_us.extend(r.get_us);
        failures.merge(r.failures);
    }
    let queried = get_us.len();
    let query = Measured {
        phase: Phase::timed("query", "req/s", "request", elapsed, get_us).with_failures(failures),
        ops: queried,
        cpu: meter.stop(),
    };

    // Lag: a PATCH on node k, read on node k+1 until it shows.
    let meter = CpuMeter::start(leg);
    let mut lag_us = Vec::new();
    let started = Instant::now();
    for s in 0..sizes.lag_samples {
        let (writer, reader) = (&leg.nodes[s % n], &leg.nodes[(s + 1) % n]);
        let id = vehicle(s * 13 % sizes.vehicles);
        let value = json!(1_000 + s);
        let mut conn = Conn::open(writer.endpoint()).await?;
        let body = Bytes::from(json!({"speed": common::property(value.clone())}).to_string());
        let (status, answer) = conn
            .request(
                Method::PATCH,
                uri(&format!("/ngsi-ld/v1/entities/{id}/attrs"))?,
                Some(body),
                true,
            )
            .await?;
        if status != StatusCode::NO_CONTENT {
            return Err(format!(
                "lag: PATCH answered {status} {}",
                load::quote(&answer)
            ));
        }
        let written = Instant::now();
        wait_visible(reader, &id, "speed", &value).await?;
        lag_us.push(load::micros(written.elapsed()));
    }
    let lag = Measured {
        phase: Phase::timed("lag", "changes/s", "change", started.elapsed(), lag_us),
        ops: sizes.lag_samples,
        cpu: meter.stop(),
    };

    // Notifications: one subscription, updates spread over the nodes.
    let sub = json!({"type": "Subscription", "entities": [{"type": "Vehicle"}],
                     "watchedAttributes": ["sentAt"],
                     "notification": {"format": "keyValues", "attributes": ["sentAt"],
                                      "endpoint": {"uri": receiver.uri()}}});
    let mut conn = Conn::open(leg.nodes[0].endpoint()).await?;
    let (status, answer) = conn
        .request(
            Method::POST,
            Uri::from_static("/ngsi-ld/v1/subscriptions"),
            Some(Bytes::from(sub.to_string())),
            true,
        )
        .await?;
    if status != StatusCode::CREATED {
        return Err(format!(
            "subscription refused: {status} {}",
            load::quote(&answer)
        ));
    }
    // Every node knows the subscription before it writes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let meter = CpuMeter::start(leg);
    let started = Instant::now();
    let mut expected = Vec::new();
    let mut conns = Vec::new();
    for node in &leg.nodes {
        conns.push(Conn::open(node.endpoint()).await?);
    }
    for s in 0..sizes.notices {
        let id = vehicle(s % sizes.vehicles);
        let sent = now_us();
        let body = Bytes::from(json!({"sentAt": common::property(json!(sent))}).to_string());
        let (status, answer) = conns[s % n]
            .request(
                Method::PATCH,
                uri(&format!("/ngsi-ld/v1/entities/{id}/attrs"))?,
                Some(body),
                true,
            )
            .await?;
        if status != StatusCode::NO_CONTENT {
            return Err(format!(
                "notify: PATCH answered {status} {}",
                load::quote(&answer)
            ));
        }
        expected.push((id, sent));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = {
            let inbox = lock(&receiver.inbox);
            expected
                .iter()
                .filter(|k| inbox.seen.contains_key(*k))
                .count()
        };
        if got == expected.len() {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{}: only {got} of {} notifications arrived",
                leg.name,
                expected.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    // Late duplicates would come from another node: give them a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (latencies, duplicates) = {
        let inbox = lock(&receiver.inbox);
        let mut latencies = Vec::new();
        let mut duplicates = 0;
        for k in &expected {
            if let Some(r) = inbox.seen.get(k) {
                latencies.push(r.latency_us);
                duplicates += r.count.saturating_sub(1);
            }
        }
        (latencies, duplicates)
    };
    if duplicates > 0 {
        return Err(format!(
            "{}: {duplicates} notifications arrived more than once",
            leg.name
        ));
    }
    let notify = Measured {
        phase: Phase::timed("notify", "notices/s", "notice", elapsed, latencies),
        ops: sizes.notices,
        cpu: meter.stop(),
    };
    for node in &mut leg.nodes {
        node.check_alive()?;
    }
    Ok([ingest, query, lag, notify])
}

/// Waits until `node` serves `attr` of `id` with `value`.
async fn wait_visible(node: &Server, id: &str, attr: &str, value: &Value) -> Result<(), String> {
    let mut conn = Conn::open(node.endpoint()).await?;
    let target = uri(&format!(
        "/ngsi-ld/v1/entities/{id}?options=keyValues&attrs={attr}"
    ))?;
    let started = Instant::now();
    loop {
        let (status, body) = conn
            .request(Method::GET, target.clone(), None, true)
            .await?;
        if status == StatusCode::OK
            && serde_json::from_slice::<Value>(&body).is_ok_and(|v| v.get(attr) == Some(value))
        {
            return Ok(());
        }
        if started.elapsed() > LAG_LIMIT {
            return Err(format!(
                "{id} did not show {attr} = {value} within {LAG_LIMIT:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn report(
    info: &RunInfo,
    opts: &Options,
    sizes: &Sizes,
    results: &[(&'static str, [Measured; 4])],
) -> Result<(), String> {
    let mut table = info.title();
    table.push_str(&format!(
        "{} vehicles; ingest in batches of {}; queries at concurrency {QUERY_CONCURRENCY} per node; {} lag samples; {} notifications\n",
        sizes.vehicles, sizes.batch, sizes.lag_samples, sizes.notices
    ));
    let mut json_legs = serde_json::Map::new();
    for (name, measured) in results {
        table.push_str(&format!("\n{name}\n"));
        table.push_str(&phase_table(measured.iter().map(|m| &m.phase)));
        table.push_str("  CPU per operation (µs):  borough  postgres\n");
        let mut cpu = serde_json::Map::new();
        for m in measured {
            let (b, p) = m.per_op_us();
            table.push_str(&format!("    {:<22}{b:>9.0} {p:>9.0}\n", m.phase.name));
            cpu.insert(
                m.phase.name.to_string(),
                json!({"borough_us": round_to(b, 1.0), "postgres_us": round_to(p, 1.0)}),
            );
        }
        json_legs.insert(
            name.to_string(),
            json!({
                "phases": measured.iter().map(|m| (m.phase.name.to_string(), m.phase.to_json())).collect::<serde_json::Map<_, _>>(),
                "cpu_per_op": cpu,
            }),
        );
    }
    let throughput = |leg: &str, phase: usize| {
        results
            .iter()
            .find(|(n, _)| *n == leg)
            .map_or(0.0, |(_, m)| m[phase].phase.throughput())
    };
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let ratios = [
        (
            "ingest: postgres-1 ÷ embedded",
            ratio(throughput("postgres-1", 0), throughput("embedded", 0)),
        ),
        (
            "ingest: postgres-3 ÷ postgres-1",
            ratio(throughput("postgres-3", 0), throughput("postgres-1", 0)),
        ),
        (
            "query: postgres-1 ÷ embedded",
            ratio(throughput("postgres-1", 1), throughput("embedded", 1)),
        ),
        (
            "query: postgres-3 ÷ postgres-1",
            ratio(throughput("postgres-3", 1), throughput("postgres-1", 1)),
        ),
    ];
    table.push_str("\nratios (throughput, same run)\n");
    for (name, r) in &ratios {
        table.push_str(&format!("  {name:<34}{r:.2}x\n"));
    }
    let lag = results
        .iter()
        .find(|(n, _)| *n == "postgres-3")
        .map(|(_, m)| &m[2].phase.latency);
    let mut targets = Vec::new();
    if let Some(lag) = lag {
        targets.push(Target::latency_below(
            "postgres-3: cross-node visibility p99",
            ms(lag.p99_us as f64),
            TARGET_LAG_P99_MS,
        ));
    }
    table.push_str(&info.targets_section(&targets, ""));
    let json = info.json(json!({
        "vehicles": sizes.vehicles,
        "legs": json_legs,
        "ratios": ratios.iter().map(|(n, r)| (n.to_string(), json!(round_to(*r, 1e3)))).collect::<serde_json::Map<_, _>>(),
        "targets": targets_json(&targets),
    }));
    publish(&table, &json, &opts.out)
}
