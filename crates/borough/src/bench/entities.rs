//! Scenario `entities`: batch upsert throughput, a mixed read/write workload,
//! and their baselines (PostgreSQL `jsonb` upserts, and the HTTP ceiling of a
//! static body of the same size as one entity).

use super::load::{self, Conn, Mix, Summary, ms};
use super::postgres;
use super::report::{
    Phase, Target, phase_table, ratio, round_to, target_table, thousands, write_json,
};
use super::server::Server;
use bytes::Bytes;
use hyper::{Method, StatusCode, Uri};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Seed of the documents and of the request mix: runs are reproducible.
const SEED: u64 = 0x5EED_B0B0;
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const UPSERT_PATH: &str = "/ngsi-ld/v1/entityOperations/upsert";
const ENTITIES_PATH: &str = "/ngsi-ld/v1/entities";
const UPSERT_WORKERS: usize = 4;
/// Answers of a successful upsert: 201 (some created) or 204 (all updated).
const UPSERT_OK: &[StatusCode] = &[StatusCode::CREATED, StatusCode::NO_CONTENT];
const PATCH_PERCENT: u32 = 20;
/// Distinct PATCH bodies, picked at random (built before the clock starts).
const PATCH_BODIES: usize = 256;
/// Entities read back after the upsert phase, as proof the writes landed.
const VERIFY_SAMPLE: usize = 100;
const PARKING_SITES: usize = 2_000;
pub(super) const STREETS: &[&str] = &[
    "Rue de Rivoli",
    "Boulevard Saint-Germain",
    "Avenue des Champs-Elysees",
    "Rue de la Roquette",
    "Boulevard Haussmann",
    "Rue du Faubourg Saint-Antoine",
    "Avenue de la Republique",
    "Rue de Vaugirard",
    "Quai de Valmy",
    "Rue Oberkampf",
];

// Targets from the issue: reported, never enforced.
const TARGET_UPSERT_PER_S: f64 = 100_000.0;
const TARGET_UPSERT_VS_PG: f64 = 3.0;
const TARGET_MIXED_PER_S: f64 = 15_000.0;
const TARGET_MIXED_P99_MS: f64 = 10.0;
const TARGET_MIXED_VS_CEILING: f64 = 0.5;

pub struct Options {
    pub quick: bool,
    pub out: PathBuf,
    pub pg: String,
}

struct Sizes {
    entities: usize,
    batch: usize,
    duration: Duration,
    concurrency: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                entities: 2_000,
                batch: 100,
                duration: Duration::from_secs(2),
                concurrency: 16,
            }
        } else {
            Sizes {
                entities: 100_000,
                batch: 1_000,
                duration: Duration::from_secs(10),
                concurrency: 64,
            }
        }
    }
}

/// The documents, built once before anything is measured.
struct Dataset {
    ids: Arc<Vec<String>>,
    /// Serialized entity documents, index-aligned with `ids`.
    docs: Arc<Vec<String>>,
    /// Upsert bodies: JSON arrays of `batch` documents.
    batches: Arc<Vec<Bytes>>,
}

impl Dataset {
    fn generate(n: usize, batch: usize) -> Result<Dataset, String> {
        let mut rng = SmallRng::seed_from_u64(SEED);
        let mut ids = Vec::with_capacity(n);
        let mut docs = Vec::with_capacity(n);
        for i in 0..n {
            let id = format!("urn:ngsi-ld:ParkingSpot:{i:06}");
            let doc = serde_json::to_string(&parking_spot(&id, i, &mut rng))
                .map_err(|e| format!("cannot serialize entity {id}: {e}"))?;
            ids.push(id);
            docs.push(doc);
        }
        let batches = load::json_arrays(&docs, batch);
        Ok(Dataset {
            ids: Arc::new(ids),
            docs: Arc::new(docs),
            batches: Arc::new(batches),
        })
    }

    fn mean_doc_bytes(&self) -> f64 {
        let total: usize = self.docs.iter().map(String::len).sum();
        total as f64 / self.docs.len().max(1) as f64
    }
}

/// One on-street parking spot with its sensor readings, in NGSI-LD
/// normalized form: five attributes.
fn parking_spot(id: &str, i: usize, rng: &mut SmallRng) -> Value {
    let street = STREETS[rng.random_range(0..STREETS.len())];
    let status = if rng.random_bool(0.6) {
        "occupied"
    } else {
        "free"
    };
    let lon = round_to(rng.random_range(2.0..2.3), 1e6);
    let lat = round_to(rng.random_range(48.8..48.9), 1e6);
    let site = rng.random_range(0..PARKING_SITES);
    json!({
        "id": id,
        "type": "ParkingSpot",
        "name": {"type": "Property", "value": format!("{street}, spot {}", i % 100 + 1)},
        "status": {"type": "Property", "value": status, "observedAt": timestamp(rng, 1)},
        "temperature": {
            "type": "Property",
            "value": temperature(rng),
            "unitCode": "CEL",
            "observedAt": timestamp(rng, 1),
        },
        "location": {
            "type": "GeoProperty",
            "value": {"type": "Point", "coordinates": [lon, lat]},
        },
        "refParkingSite": {
            "type": "Relationship",
            "object": format!("urn:ngsi-ld:ParkingSite:{site:04}"),
        },
    })
}

/// The body of a mixed-phase PATCH: a new temperature reading.
fn temperature_patch(rng: &mut SmallRng) -> Result<Bytes, String> {
    let body = json!({
        "temperature": {
            "type": "Property",
            "value": temperature(rng),
            "unitCode": "CEL",
            "observedAt": timestamp(rng, 2),
        }
    });
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(|e| format!("cannot serialize a PATCH body: {e}"))
}

fn temperature(rng: &mut SmallRng) -> f64 {
    round_to(rng.random_range(5.0..35.0), 10.0)
}

/// An ISO 8601 UTC time on day `day` of June 2024.
pub(super) fn timestamp(rng: &mut SmallRng, day: u32) -> String {
    let ms = rng.random_range(0..86_400_000u32);
    let s = ms / 1000;
    format!(
        "2024-06-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

pub fn run(opts: &Options) -> Result<(), String> {
    let sizes = Sizes::new(opts.quick);
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    if build == "debug" {
        eprintln!("note: debug build; the figures are not representative (build with --release)");
    }
    eprintln!("generating {} entities (seed {SEED:#x})", sizes.entities);
    let data = Dataset::generate(sizes.entities, sizes.batch)?;
    let static_bytes = data
        .docs
        .first()
        .map(String::len)
        .ok_or_else(|| "the scenario generated no entity".to_string())?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-load")
        .build()
        .map_err(|e| format!("cannot start the load generator runtime: {e}"))?;
    // Fail fast, before the Borough phases, if the baseline cannot run.
    runtime.block_on(postgres::check(&opts.pg))?;

    let mut server = Server::spawn(Some(static_bytes), READY_TIMEOUT)?;
    eprintln!(
        "server listening on http://{} (static body: {static_bytes} bytes)",
        server.addr()
    );
    let [upsert, mixed, ceiling] = runtime.block_on(borough_phases(&mut server, &data, &sizes))?;
    drop(server);

    eprintln!(
        "postgres-jsonb: upserting {} documents, {} per transaction, {UPSERT_WORKERS} connections",
        sizes.entities, sizes.batch
    );
    let pg = runtime.block_on(postgres::run(
        &opts.pg,
        data.ids.clone(),
        data.docs.clone(),
        sizes.batch,
        UPSERT_WORKERS,
    ))?;
    if usize::try_from(pg.rows).ok() != Some(data.ids.len()) {
        return Err(format!(
            "postgres-jsonb: the table holds {} rows after the run, expected {}",
            pg.rows,
            data.ids.len()
        ));
    }
    let mut pg_latencies = pg.latencies_us;
    let postgres = Phase {
        name: "postgres-jsonb",
        unit: "entities/s",
        count: data.ids.len(),
        elapsed: pg.elapsed,
        latency_of: "transaction",
        latency: Summary::of(&mut pg_latencies),
        errors: 0,
        first_error: None,
        memory: None,
        ops: Vec::new(),
    };

    let report = Report {
        quick: opts.quick,
        build,
        sizes: &sizes,
        static_bytes,
        mean_doc_bytes: data.mean_doc_bytes(),
        phases: [upsert, postgres, mixed, ceiling],
    };
    println!("{}", report.table());
    write_json(&opts.out, &report.to_json())?;
    println!("results written to {}", opts.out.display());

    for phase in &report.phases {
        if phase.errors > 0 {
            return Err(format!(
                "{}: {} requests failed; first: {}",
                phase.name,
                phase.errors,
                phase.first_error.as_deref().unwrap_or("(no detail)")
            ));
        }
    }
    Ok(())
}

/// Upsert, verification, mixed and http-ceiling, against one server.
async fn borough_phases(
    server: &mut Server,
    data: &Dataset,
    sizes: &Sizes,
) -> Result<[Phase; 3], String> {
    let addr = server.addr();

    eprintln!(
        "upsert: {} entities in batches of {}, {UPSERT_WORKERS} workers",
        sizes.entities, sizes.batch
    );
    let uri = Uri::from_static(UPSERT_PATH);
    let batches = load::post_all(addr, uri, data.batches.clone(), UPSERT_WORKERS, UPSERT_OK)
        .await
        .map_err(|e| format!("upsert: {e}"))?;
    server.check_alive()?;
    let mut batch_latencies = batches.latencies_us;
    let upsert = Phase {
        name: "upsert",
        unit: "entities/s",
        count: data.ids.len(),
        elapsed: batches.elapsed,
        latency_of: "batch",
        latency: Summary::of(&mut batch_latencies),
        errors: 0,
        first_error: None,
        memory: server.memory(),
        ops: Vec::new(),
    };

    verify(addr, &data.ids).await?;

    eprintln!(
        "mixed: {} s at concurrency {}, {}% GET / {PATCH_PERCENT}% PATCH",
        sizes.duration.as_secs(),
        sizes.concurrency,
        100 - PATCH_PERCENT
    );
    let mix = entity_mix(&data.ids)?;
    let run = load::run_timed(
        addr,
        Arc::new(mix),
        sizes.concurrency,
        sizes.duration,
        SEED ^ 0x4D49,
    )
    .await?;
    server.check_alive()?;
    let mut all: Vec<u64> = run.get_us.iter().chain(&run.patch_us).copied().collect();
    let (mut get_us, mut patch_us) = (run.get_us, run.patch_us);
    let mixed = Phase {
        name: "mixed",
        unit: "req/s",
        count: all.len(),
        elapsed: run.elapsed,
        latency_of: "request",
        latency: Summary::of(&mut all),
        errors: run.errors,
        first_error: run.first_error,
        memory: server.memory(),
        ops: vec![
            ("GET", get_us.len(), Summary::of(&mut get_us)),
            ("PATCH", patch_us.len(), Summary::of(&mut patch_us)),
        ],
    };

    eprintln!(
        "http-ceiling: {} s at concurrency {}, GET /bench/static",
        sizes.duration.as_secs(),
        sizes.concurrency
    );
    let mix = Mix::Static(Uri::from_static("/bench/static"));
    let run = load::run_timed(
        addr,
        Arc::new(mix),
        sizes.concurrency,
        sizes.duration,
        SEED ^ 0x4854,
    )
    .await?;
    server.check_alive()?;
    let mut get_us = run.get_us;
    let ceiling = Phase {
        name: "http-ceiling",
        unit: "req/s",
        count: get_us.len(),
        elapsed: run.elapsed,
        latency_of: "request",
        latency: Summary::of(&mut get_us),
        errors: run.errors,
        first_error: run.first_error,
        memory: server.memory(),
        ops: Vec::new(),
    };
    Ok([upsert, mixed, ceiling])
}

/// The mixed workload: random GETs and PATCHes over every entity, with every
/// URI and body built up front.
fn entity_mix(ids: &[String]) -> Result<Mix, String> {
    let uri = |s: String| Uri::try_from(s).map_err(|e| format!("invalid request URI: {e}"));
    let get = ids
        .iter()
        .map(|id| uri(format!("{ENTITIES_PATH}/{id}")))
        .collect::<Result<Vec<_>, _>>()?;
    let patch = ids
        .iter()
        .map(|id| uri(format!("{ENTITIES_PATH}/{id}/attrs")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rng = SmallRng::seed_from_u64(SEED ^ 0x5041);
    let bodies = (0..PATCH_BODIES)
        .map(|_| temperature_patch(&mut rng))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Mix::Entities {
        get,
        patch,
        bodies,
        patch_percent: PATCH_PERCENT,
    })
}

/// Reads back a random sample of the upserted entities: each must answer 200
/// with its own id.
async fn verify(addr: SocketAddr, ids: &[String]) -> Result<(), String> {
    let sample = VERIFY_SAMPLE.min(ids.len());
    eprintln!("verify: reading back {sample} random entities");
    let mut conn = Conn::open(addr).await?;
    let mut rng = SmallRng::seed_from_u64(SEED ^ 0x5645);
    for _ in 0..sample {
        let id = &ids[rng.random_range(0..ids.len())];
        let uri = Uri::try_from(format!("{ENTITIES_PATH}/{id}"))
            .map_err(|e| format!("verify: invalid URI for {id}: {e}"))?;
        let (status, body) = conn
            .request_with_timeout(Method::GET, uri, None, true)
            .await
            .map_err(|e| format!("verify: {e}"))?;
        if status != StatusCode::OK {
            return Err(format!(
                "verify: GET {id} answered {status} after the upsert phase: {}",
                load::quote(&body)
            ));
        }
        let entity: Value = serde_json::from_slice(&body)
            .map_err(|e| format!("verify: GET {id} answered invalid JSON: {e}"))?;
        if entity.get("id").and_then(Value::as_str) != Some(id.as_str()) {
            return Err(format!(
                "verify: GET {id} answered another entity: {}",
                load::quote(&body)
            ));
        }
    }
    Ok(())
}

struct Report<'a> {
    quick: bool,
    build: &'static str,
    sizes: &'a Sizes,
    static_bytes: usize,
    mean_doc_bytes: f64,
    /// upsert, postgres-jsonb, mixed, http-ceiling.
    phases: [Phase; 4],
}

impl Report<'_> {
    fn upsert_vs_pg(&self) -> f64 {
        ratio(self.phases[0].throughput(), self.phases[1].throughput())
    }

    fn mixed_vs_ceiling(&self) -> f64 {
        ratio(self.phases[2].throughput(), self.phases[3].throughput())
    }

    fn targets(&self) -> Vec<Target> {
        let upsert = self.phases[0].throughput();
        let mixed = self.phases[2].throughput();
        let mixed_p99 = ms(self.phases[2].latency.p99_us as f64);
        vec![
            Target {
                name: "upsert throughput".into(),
                actual: upsert,
                actual_text: format!("{} entities/s", thousands(upsert)),
                at_least: true,
                bound: TARGET_UPSERT_PER_S,
                bound_text: format!("≥ {} entities/s", thousands(TARGET_UPSERT_PER_S)),
            },
            Target {
                name: "upsert ÷ postgres-jsonb".into(),
                actual: self.upsert_vs_pg(),
                actual_text: format!("{:.2}x", self.upsert_vs_pg()),
                at_least: true,
                bound: TARGET_UPSERT_VS_PG,
                bound_text: format!("≥ {TARGET_UPSERT_VS_PG}x"),
            },
            Target {
                name: "mixed throughput".into(),
                actual: mixed,
                actual_text: format!("{} req/s", thousands(mixed)),
                at_least: true,
                bound: TARGET_MIXED_PER_S,
                bound_text: format!("≥ {} req/s", thousands(TARGET_MIXED_PER_S)),
            },
            Target {
                name: "mixed p99 latency".into(),
                actual: mixed_p99,
                actual_text: format!("{mixed_p99:.2} ms"),
                at_least: false,
                bound: TARGET_MIXED_P99_MS,
                bound_text: format!("< {TARGET_MIXED_P99_MS} ms"),
            },
            Target {
                name: "mixed ÷ http-ceiling".into(),
                actual: self.mixed_vs_ceiling(),
                actual_text: format!("{:.2}x", self.mixed_vs_ceiling()),
                at_least: true,
                bound: TARGET_MIXED_VS_CEILING,
                bound_text: format!("≥ {TARGET_MIXED_VS_CEILING}x"),
            },
        ]
    }

    fn table(&self) -> String {
        let s = self.sizes;
        let mut out = format!(
            "\nborough bench entities ({}, {} build): {} entities, batches of {}, {UPSERT_WORKERS} upsert workers; \
             mixed and http-ceiling {} s at concurrency {}\n\n",
            if self.quick { "quick" } else { "full" },
            self.build,
            thousands(s.entities as f64),
            s.batch,
            s.duration.as_secs(),
            s.concurrency,
        );
        out.push_str(&phase_table(&self.phases));
        out.push_str(&format!(
            "\nratios\n  upsert ÷ postgres-jsonb  {:.2}x (entities/s)\n  mixed ÷ http-ceiling     {:.2}x (req/s)\n\n",
            self.upsert_vs_pg(),
            self.mixed_vs_ceiling()
        ));
        out.push_str(&target_table("targets (from the issue)", &self.targets()));
        if self.quick || self.build == "debug" {
            out.push_str("(quick runs and debug builds measure nothing meaningful; targets are informative only)\n");
        }
        out
    }

    fn to_json(&self) -> Value {
        let phases: serde_json::Map<String, Value> = self
            .phases
            .iter()
            .map(|p| (p.name.to_string(), p.to_json()))
            .collect();
        let targets: Vec<Value> = self.targets().iter().map(Target::to_json).collect();
        let unix_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        json!({
            "scenario": "entities",
            "quick": self.quick,
            "build": self.build,
            "version": env!("CARGO_PKG_VERSION"),
            "unix_time": unix_time,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "config": {
                "seed": SEED,
                "entities": self.sizes.entities,
                "batch": self.sizes.batch,
                "upsert_workers": UPSERT_WORKERS,
                "duration_s": self.sizes.duration.as_secs_f64(),
                "concurrency": self.sizes.concurrency,
                "patch_percent": PATCH_PERCENT,
                "static_body_bytes": self.static_bytes,
                "mean_entity_bytes": round_to(self.mean_doc_bytes, 10.0),
            },
            "phases": phases,
            "ratios": {
                "upsert_vs_postgres": round_to(self.upsert_vs_pg(), 1e3),
                "mixed_vs_http_ceiling": round_to(self.mixed_vs_ceiling(), 1e3),
            },
            "targets": targets,
        })
    }
}
