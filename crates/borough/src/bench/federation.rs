//! Scenario `federation`: what forwarding to context sources costs.
//!
//! Three servers on loopback: the broker under test holds each vehicle's
//! `speed`, two remote Boroughs hold the `fuel` of half the vehicles each,
//! and the broker has an inclusive registration of each remote for type
//! `Vehicle`. The same requests run with `local=true` (answered by the
//! broker alone: the baseline, same server, same data) and without it
//! (forwarded to both remotes and merged), phase by phase in turns, so that
//! a slow moment of the machine falls on both alike:
//!
//! - `retrieve`: `GET /entities/{id}` of a random vehicle;
//! - `query`: `GET /entities?type=Vehicle&q=speed>…&limit=20`.
//!
//! Then a third source that accepts connections and never answers is
//! registered with a `management.timeout` and a tiny cooldown, and single
//! retrievals are timed: each must come back within the timeout (with a
//! warning), never hang.

use super::common::{self, Options, RunInfo};
use super::load::{self, Conn, Mix, ms};
use super::report::{Bound, Phase, Target, phase_table, publish, round_to, targets_json};
use super::server::Server;
use bytes::Bytes;
use hyper::{Method, StatusCode, Uri};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SEED: u64 = 0xFED_0001;
const REGISTRATIONS_PATH: &str = "/ngsi-ld/v1/csourceRegistrations";
const BATCH: usize = 500;
/// One client at a time: the latency of a forwarded request, not queueing.
const CONCURRENCY: usize = 1;
/// Turns each leg takes at a phase.
const TURNS: usize = 4;
/// The hanging source's timeout.
const HANG_TIMEOUT_MS: u64 = 300;

// Targets from the issue.
const TARGET_ADDED_P50_MS: f64 = 2.0;

struct Sizes {
    vehicles: usize,
    phase: Duration,
    hanging_requests: usize,
}

fn sizes(quick: bool) -> Sizes {
    if quick {
        Sizes {
            vehicles: 200,
            phase: Duration::from_millis(400),
            hanging_requests: 3,
        }
    } else {
        Sizes {
            vehicles: 10_000,
            phase: Duration::from_secs(5),
            hanging_requests: 20,
        }
    }
}

fn vehicle(i: usize) -> String {
    format!("urn:ngsi-ld:Vehicle:{i:06}")
}

/// Upsert batches of `docs` documents.
fn batches(docs: Vec<Value>) -> Arc<Vec<Bytes>> {
    let docs: Vec<String> = docs.iter().map(Value::to_string).collect();
    Arc::new(load::json_arrays(&docs, BATCH))
}

pub fn run(opts: &Options) -> Result<(), String> {
    let info = RunInfo::new("federation", opts.quick);
    let sizes = sizes(opts.quick);
    let runtime = common::load_runtime()?;
    let mut broker = common::start_server()?;
    let mut remotes = [common::start_server()?, common::start_server()?];
    runtime.block_on(async {
        let n = sizes.vehicles;
        let local: Vec<Value> = (0..n)
            .map(|i| {
                json!({"id": vehicle(i), "type": "Vehicle", "speed": common::property(json!((i * 7) % 120))})
            })
            .collect();
        eprintln!("loading {n} vehicles on the broker and their fuel on two remotes");
        common::upsert_part(&mut broker, batches(local)).await?;
        for (k, remote) in remotes.iter_mut().enumerate() {
            let half: Vec<Value> = (0..n)
                .filter(|i| i % 2 == k)
                .map(|i| json!({"id": vehicle(i), "type": "Vehicle", "fuel": common::property(json!(i % 100))}))
                .collect();
            common::upsert_part(remote, batches(half)).await?;
        }
        let mut conn = Conn::open(broker.endpoint()).await?;
        for remote in &remotes {
            register(
                &mut conn,
                json!({
                    "type": "ContextSourceRegistration",
                    "information": [{"entities": [{"type": "Vehicle"}]}],
                    "endpoint": format!("http://{}", remote.addr()),
                }),
            )
            .await?;
        }
        check_merge(&mut conn).await?;

        let retrieves = |local: bool| -> Result<Mix, String> {
            let uris = (0..n.min(2_000))
                .map(|i| uri(&format!("/ngsi-ld/v1/entities/{}{}", vehicle(i * 7 % n), suffix(local, '?'))))
                .collect::<Result<_, _>>()?;
            Ok(Mix::Gets(uris))
        };
        let queries = |local: bool| -> Result<Mix, String> {
            let uris = (0..100)
                .map(|k| {
                    uri(&format!(
                        "/ngsi-ld/v1/entities?type=Vehicle&q=speed%3E{}&limit=20{}",
                        k % 110,
                        suffix(local, '&')
                    ))
                })
                .collect::<Result<_, _>>()?;
            Ok(Mix::Gets(uris))
        };
        let mut phases = Vec::new();
        for (name, local_name, mix) in [
            ("retrieve", "retrieve-local", &retrieves as &dyn Fn(bool) -> Result<Mix, String>),
            ("query", "query-local", &queries),
        ] {
            eprintln!("{name}: forwarded and local-only in {TURNS} turns of {:?} each", sizes.phase / TURNS as u32);
            let (federated, local) = in_turns(&mut broker, mix(false)?, mix(true)?, sizes.phase).await?;
            phases.push(Phase::timed(local_name, "req/s", "request", local.elapsed, local.get_us)
                .with_failures(local.failures));
            phases.push(Phase::timed(name, "req/s", "request", federated.elapsed, federated.get_us)
                .with_failures(federated.failures));
        }
        for p in &phases {
            p.check_failures(p.name, "requests")?;
        }

        // A source that never answers.
        let hanging = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("cannot listen for the hanging source: {e}"))?;
        let hanging_addr = hanging.local_addr().map_err(|e| e.to_string())?;
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = hanging.accept().await {
                held.push(socket);
            }
        });
        register(
            &mut conn,
            json!({
                "type": "ContextSourceRegistration",
                "information": [{"entities": [{"type": "Vehicle"}]}],
                "endpoint": format!("http://{hanging_addr}"),
                "management": {"timeout": HANG_TIMEOUT_MS, "cooldown": 1},
            }),
        )
        .await?;
        eprintln!("hanging source: {} retrievals, timeout {HANG_TIMEOUT_MS} ms", sizes.hanging_requests);
        let mut hang_us = Vec::new();
        for i in 0..sizes.hanging_requests {
            // Past the source's 1 ms cooldown: every retrieval asks it again.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let started = Instant::now();
            let target = uri(&format!("/ngsi-ld/v1/entities/{}", vehicle(i)))?;
            let (status, _) = conn.request(Method::GET, target, None, false).await?;
            if status != StatusCode::OK {
                return Err(format!("with a hanging source a retrieval answered {status}"));
            }
            hang_us.push(load::micros(started.elapsed()));
        }
        holder.abort();
        let hang = Phase::timed("hanging-source", "req/s", "request", Duration::from_micros(hang_us.iter().sum()), hang_us);
        phases.push(hang);
        broker.check_alive()?;
        report(&info, opts, &sizes, &phases)
    })
}

fn suffix(local: bool, sep: char) -> String {
    if local {
        format!("{sep}local=true")
    } else {
        String::new()
    }
}

fn uri(s: &str) -> Result<Uri, String> {
    Uri::try_from(s).map_err(|e| format!("invalid URI {s}: {e}"))
}

async fn register(conn: &mut Conn, body: Value) -> Result<(), String> {
    let (status, answer) = conn
        .request(
            Method::POST,
            Uri::from_static(REGISTRATIONS_PATH),
            Some(Bytes::from(body.to_string())),
            true,
        )
        .await?;
    if status != StatusCode::CREATED {
        return Err(format!(
            "registration refused: {status} {}",
            load::quote(&answer)
        ));
    }
    Ok(())
}

/// The measurement means something only if forwarding works: a vehicle
/// read through the broker has both its speed and its fuel.
async fn check_merge(conn: &mut Conn) -> Result<(), String> {
    let (status, body) = conn
        .request(
            Method::GET,
            uri(&format!("/ngsi-ld/v1/entities/{}", vehicle(1)))?,
            None,
            true,
        )
        .await?;
    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
    if status != StatusCode::OK || v.get("fuel").is_none() || v.get("speed").is_none() {
        return Err(format!(
            "the merged vehicle lacks speed or fuel: {status} {}",
            load::quote(&body)
        ));
    }
    Ok(())
}

/// Runs both mixes for `total` in [`TURNS`] alternating slices; answers
/// (forwarded, local).
async fn in_turns(
    broker: &mut Server,
    forwarded: Mix,
    local: Mix,
    total: Duration,
) -> Result<(load::TimedRun, load::TimedRun), String> {
    let slice = total / TURNS as u32;
    let (forwarded, local) = (Arc::new(forwarded), Arc::new(local));
    let mut runs = (Vec::new(), Vec::new());
    for turn in 0..TURNS {
        let seed = SEED + turn as u64;
        runs.1.push(
            load::run_timed(broker.endpoint(), local.clone(), CONCURRENCY, slice, seed).await?,
        );
        runs.0.push(
            load::run_timed(
                broker.endpoint(),
                forwarded.clone(),
                CONCURRENCY,
                slice,
                seed,
            )
            .await?,
        );
        broker.check_alive()?;
    }
    Ok((load::TimedRun::merge(runs.0), load::TimedRun::merge(runs.1)))
}

fn find<'a>(phases: &'a [Phase], name: &str) -> Result<&'a Phase, String> {
    phases
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| format!("no phase {name}"))
}

fn report(info: &RunInfo, opts: &Options, sizes: &Sizes, phases: &[Phase]) -> Result<(), String> {
    let mut targets = Vec::new();
    let mut ratios = Vec::new();
    for (name, local) in [("retrieve", "retrieve-local"), ("query", "query-local")] {
        let (f, l) = (find(phases, name)?, find(phases, local)?);
        let added = ms(f.latency.p50_us as f64 - l.latency.p50_us as f64);
        // "Forwarding adds ≤ 2 ms p50 on loopback."
        targets.push(Target::new(
            format!("{name}: added p50"),
            added,
            format!("{added:.2} ms"),
            Bound::AtMost(TARGET_ADDED_P50_MS),
            format!("≤ {TARGET_ADDED_P50_MS} ms"),
        ));
        let ratio = if f.latency.p50_us > 0 {
            l.latency.p50_us as f64 / f.latency.p50_us as f64
        } else {
            0.0
        };
        ratios.push((name, ratio, added));
    }
    let hang = find(phases, "hanging-source")?;
    let worst = ms(hang.latency.max_us as f64);
    // Answered within the timeout, plus the broker's own work.
    targets.push(Target::latency_below(
        "hanging source: max",
        worst,
        HANG_TIMEOUT_MS as f64 + 100.0,
    ));
    let mut table = info.title();
    table.push_str(&format!(
        "{} vehicles on the broker (speed), their fuel on 2 remote Boroughs; concurrency {CONCURRENCY}\n",
        sizes.vehicles
    ));
    table.push_str(&phase_table(phases));
    for (name, ratio, added) in &ratios {
        table.push_str(&format!(
            "{name}: forwarded to 2 sources and merged: p50 +{added:.2} ms, {ratio:.2}x the local-only speed (p50 ratio)\n"
        ));
    }
    table.push_str(&format!(
        "hanging source (timeout {HANG_TIMEOUT_MS} ms): max {worst:.1} ms over {} retrievals\n",
        hang.latency.count
    ));
    table.push_str(&info.targets_section(&targets, ""));
    let json = info.json(json!({
        "vehicles": sizes.vehicles,
        "concurrency": CONCURRENCY,
        "phases": phases.iter().map(|p| (p.name.to_string(), p.to_json())).collect::<serde_json::Map<_, _>>(),
        "p50_ratio_local_to_forwarded": ratios.iter().map(|(n, r, _)| (n.to_string(), json!(round_to(*r, 1e3)))).collect::<serde_json::Map<_, _>>(),
        "hang_timeout_ms": HANG_TIMEOUT_MS,
        "targets": targets_json(&targets),
    }));
    publish(&table, &json, &opts.out)
}
