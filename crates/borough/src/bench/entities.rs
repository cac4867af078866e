//! Scenario `entities`: batch upsert throughput, a mixed read/write workload,
//! and their baselines (PostgreSQL `jsonb` upserts, and the HTTP ceiling of a
//! static body of the same size as one entity). With `--auth` (and
//! `--quick`), upsert and mixed run again with access control on (`auth`).

use super::auth::{self, Auth, AuthReport, Leg};
use super::common::{
    self, ENTITIES_PATH, Options, READY_TIMEOUT, RunInfo, UPSERT_WORKERS, mean_len, relationship,
};
use super::load::{self, Conn, Endpoint, Mix, Summary, TimedRun, ms};
use super::postgres;
use super::report::{
    Phase, Target, phase_table, publish, ratio, round_to, targets_json, thousands,
};
use super::server::{Memory, Server};
use bytes::Bytes;
use hyper::{Method, StatusCode, Uri};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Seed of the documents and of the request mix: runs are reproducible.
const SEED: u64 = 0x5EED_B0B0;
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

struct Sizes {
    entities: usize,
    batch: usize,
    duration: Duration,
    concurrency: usize,
}

/// Tiny sizes (`--quick`): they check the harness, and measure nothing.
const QUICK: Sizes = Sizes {
    entities: 2_000,
    batch: 100,
    duration: Duration::from_secs(2),
    concurrency: 16,
};

const FULL: Sizes = Sizes {
    entities: 100_000,
    batch: 1_000,
    duration: Duration::from_secs(10),
    concurrency: 64,
};

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
        "refParkingSite": relationship(format!("urn:ngsi-ld:ParkingSite:{site:04}")),
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
    let sizes = if opts.quick { QUICK } else { FULL };
    let info = RunInfo::new("entities", opts.quick);
    eprintln!("generating {} entities (seed {SEED:#x})", sizes.entities);
    let data = Dataset::generate(sizes.entities, sizes.batch)?;
    let static_bytes = data
        .docs
        .first()
        .map(String::len)
        .ok_or_else(|| "the scenario generated no entity".to_string())?;

    let runtime = common::load_runtime()?;
    // Fail fast, before the Borough phases, if the baseline cannot run.
    runtime.block_on(postgres::check(&opts.pg))?;
    // Quick runs compare too, so that the harness of --auth never rots.
    let secured = if opts.auth || opts.quick {
        Some(auth::SecuredLegs::start()?)
    } else {
        None
    };

    let server = Server::spawn(Some(static_bytes), READY_TIMEOUT)?;
    eprintln!(
        "server listening on http://{} (static body: {static_bytes} bytes)",
        server.addr()
    );
    let mut legs = auth::legs(secured.as_ref(), server, &runtime)?;
    let mut runs = runtime.block_on(borough_phases(&mut legs, &data, &sizes, opts.quick))?;
    let ceiling = runtime.block_on(ceiling_phase(&mut legs[0].server, &sizes))?;
    let auths: Vec<Auth> = legs.iter().map(|l| l.auth).collect();
    // The servers and the OpenID Provider stop before the PostgreSQL baseline.
    drop(legs);
    let [upsert, mixed] = runs.remove(0);
    let auth = match secured {
        None => None,
        Some(secured) => {
            let baseline = [("upsert", &upsert), ("mixed", &mixed)];
            let legs = auths[1..]
                .iter()
                .copied()
                .zip(runs.into_iter().map(Vec::from));
            Some(AuthReport::new(
                &baseline,
                legs.collect(),
                secured.jwt_skipped(),
            )?)
        }
    };

    eprintln!(
        "postgres-jsonb: upserting {} documents, {} per transaction, {UPSERT_WORKERS} connections",
        sizes.entities, sizes.batch
    );
    let pg = runtime.block_on(postgres::upsert_entities(
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
    let postgres = Phase::entities_written(
        "postgres-jsonb",
        data.ids.len(),
        "transaction",
        pg.elapsed,
        pg.latencies_us,
    );

    let report = Report {
        info,
        sizes: &sizes,
        static_bytes,
        mean_doc_bytes: mean_len(&data.docs),
        phases: [upsert, postgres, mixed, ceiling],
        auth,
    };
    publish(&report.table(), &report.to_json(), &opts.out)?;
    for phase in &report.phases {
        phase.check_failures(phase.name, "requests")?;
    }
    if let Some(auth) = &report.auth {
        auth.check_failures()?;
    }
    Ok(())
}

/// Upsert (and its verification), then mixed, on every leg, the legs taking
/// turns (`auth::take_turns`). `[upsert, mixed]` of each leg, in order.
async fn borough_phases(
    legs: &mut [Leg],
    data: &Dataset,
    sizes: &Sizes,
    quick: bool,
) -> Result<Vec<[Phase; 2]>, String> {
    let turns = auth::turns(legs, quick);
    let entities = data.ids.len();
    eprintln!(
        "upsert: {entities} entities in batches of {}, {UPSERT_WORKERS} workers{}",
        sizes.batch,
        auth::describe_turns(legs, turns)
    );
    let upserts = auth::upsert_in_turns(legs, &data.batches, turns, "upsert", entities).await?;
    for leg in legs.iter() {
        verify(leg.server.endpoint(), &data.ids).await?;
    }

    eprintln!(
        "mixed: {} s at concurrency {}, {}% GET / {PATCH_PERCENT}% PATCH{}",
        sizes.duration.as_secs(),
        sizes.concurrency,
        100 - PATCH_PERCENT,
        auth::describe_turns(legs, turns)
    );
    let mix = Arc::new(entity_mix(&data.ids)?);
    let slice = sizes.duration / u32::try_from(turns).unwrap_or(1);
    let runs = auth::take_turns(legs, turns, async |leg, n| {
        let seed = (SEED ^ 0x4D49).wrapping_add(n as u64);
        let endpoint = leg.server.endpoint();
        let run = load::run_timed(endpoint, mix.clone(), sizes.concurrency, slice, seed).await?;
        leg.server.check_alive()?;
        Ok(run)
    })
    .await?;
    Ok(legs
        .iter()
        .zip(upserts)
        .zip(runs)
        .map(|((leg, upsert), runs)| {
            [
                upsert,
                mixed_phase(TimedRun::merge(runs), leg.server.memory()),
            ]
        })
        .collect())
}

/// The mixed phase of a run of GETs and PATCHes, with its breakdown by
/// operation.
fn mixed_phase(run: TimedRun, memory: Option<Memory>) -> Phase {
    let all: Vec<u64> = run.get_us.iter().chain(&run.patch_us).copied().collect();
    let (mut get_us, mut patch_us) = (run.get_us, run.patch_us);
    Phase::timed("mixed", "req/s", "request", run.elapsed, all)
        .with_failures(run.failures)
        .with_memory(memory)
        .with_ops(vec![
            ("GET", get_us.len(), Summary::of(&mut get_us)),
            ("PATCH", patch_us.len(), Summary::of(&mut patch_us)),
        ])
}

/// The HTTP ceiling: a static body as large as one entity, from the same server.
async fn ceiling_phase(server: &mut Server, sizes: &Sizes) -> Result<Phase, String> {
    eprintln!(
        "http-ceiling: {} s at concurrency {}, GET /bench/static",
        sizes.duration.as_secs(),
        sizes.concurrency
    );
    let mix = Mix::Static(Uri::from_static("/bench/static"));
    common::timed_gets(
        server,
        "http-ceiling",
        mix,
        sizes.concurrency,
        sizes.duration,
        SEED ^ 0x4854,
    )
    .await
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
async fn verify(to: Endpoint, ids: &[String]) -> Result<(), String> {
    let sample = VERIFY_SAMPLE.min(ids.len());
    eprintln!("verify: reading back {sample} random entities");
    let mut conn = Conn::open(to).await?;
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
    info: RunInfo,
    sizes: &'a Sizes,
    static_bytes: usize,
    mean_doc_bytes: f64,
    /// upsert, postgres-jsonb, mixed, http-ceiling.
    phases: [Phase; 4],
    /// upsert and mixed with access control, when compared.
    auth: Option<AuthReport>,
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
            Target::rate_at_least(
                "upsert throughput",
                upsert,
                TARGET_UPSERT_PER_S,
                "entities/s",
            ),
            Target::ratio_at_least(
                "upsert ÷ postgres-jsonb",
                self.upsert_vs_pg(),
                TARGET_UPSERT_VS_PG,
            ),
            Target::rate_at_least("mixed throughput", mixed, TARGET_MIXED_PER_S, "req/s"),
            Target::latency_below("mixed p99 latency", mixed_p99, TARGET_MIXED_P99_MS),
            Target::ratio_at_least(
                "mixed ÷ http-ceiling",
                self.mixed_vs_ceiling(),
                TARGET_MIXED_VS_CEILING,
            ),
        ]
    }

    fn table(&self) -> String {
        let s = self.sizes;
        let mut out = format!(
            "{}{} entities, batches of {}, {UPSERT_WORKERS} upsert workers; \
             mixed and http-ceiling {} s at concurrency {}\n\n",
            self.info.title(),
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
        out.push_str(&self.info.targets_section(&self.targets(), ""));
        if let Some(auth) = &self.auth {
            out.push_str(&auth.section(&self.info));
        }
        out
    }

    fn to_json(&self) -> Value {
        let phases: serde_json::Map<String, Value> = self
            .phases
            .iter()
            .map(|p| (p.name.to_string(), p.to_json()))
            .collect();
        let mut out = self.info.json(json!({
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
            "targets": targets_json(&self.targets()),
        }));
        if let Some(auth) = &self.auth {
            out["auth"] = auth.to_json();
        }
        out
    }
}
