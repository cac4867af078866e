//! Scenario `query`: `GET /entities` with `type`, `q` and `idPattern` over a
//! city of parking spots, streetlights and waste containers, against the
//! same documents in PostgreSQL `jsonb` queried with the same shapes in SQL.
//!
//! Every shape rotates through a few values (picked at random per request),
//! asks for the first page (`limit=100`, ordered by id) and is checked before
//! it is measured: Borough and PostgreSQL must answer the same, non-empty
//! list of ids for every value.

use super::entities::{STREETS, timestamp};
use super::load::{self, Conn, Mix, Summary, ms, percent_encode};
use super::postgres;
use super::query_pg::{self, Rows, TABLE};
use super::report::{
    Phase, Target, memory_text, phase_table, ratio, round_to, target_table, thousands, write_json,
};
use super::server::{Memory, Server};
use bytes::Bytes;
use hyper::{Method, StatusCode, Uri};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;

/// Seed of the documents and of the request picks: runs are reproducible.
const SEED: u64 = 0x5EED_C17E;
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const UPSERT_PATH: &str = "/ngsi-ld/v1/entityOperations/upsert";
const ENTITIES_PATH: &str = "/ngsi-ld/v1/entities";
const UPSERT_WORKERS: usize = 4;
const BATCH: usize = 1_000;
const CONCURRENCY: usize = 16;
/// Page size of every query.
const LIMIT: usize = 100;
/// Answers of a successful upsert: 201 (some created) or 204 (all updated).
const UPSERT_OK: &[StatusCode] = &[StatusCode::CREATED, StatusCode::NO_CONTENT];
/// Entities of each type, in this order, one after the other.
const TYPES: [&str; 3] = ["ParkingSpot", "Streetlight", "WasteContainer"];
/// Entities matched by one `idPattern` (a block of consecutive ids).
const ID_BLOCK: usize = 100;
/// Blocks per type that the idPattern shape rotates through.
const ID_BLOCKS_PER_TYPE: usize = 4;
const WASTE_TYPES: &[&str] = &["glass", "paper", "plastic", "organic", "residual"];
const PARKING_SITES: usize = 2_000;
const STREETLIGHT_GROUPS: usize = 500;

// Targets from the issue: reported, never enforced.
const TARGET_P95_MS: f64 = 20.0;
const TARGET_VS_PG: f64 = 1.0;
/// Size at which the issue states the targets.
const TARGET_ENTITIES: usize = 100_000;

pub struct Options {
    pub quick: bool,
    pub out: PathBuf,
    pub pg: String,
}

struct Sizes {
    entities: usize,
    duration: Duration,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                entities: 3_000,
                duration: Duration::from_secs(1),
            }
        } else {
            Sizes {
                entities: TARGET_ENTITIES,
                duration: Duration::from_secs(10),
            }
        }
    }
}

/// The documents, built once before anything is measured.
struct Dataset {
    rows: Rows,
    /// Upsert bodies: JSON arrays of [`BATCH`] documents.
    batches: Arc<Vec<Bytes>>,
    /// Entities of the smallest type.
    per_type: usize,
}

impl Dataset {
    /// `n` entities, the types taking turns (so every batch mixes them); the
    /// ids number each type from 0: `urn:ngsi-ld:Streetlight:000042`.
    fn generate(n: usize) -> Result<Dataset, String> {
        let mut rng = SmallRng::seed_from_u64(SEED);
        let mut ids = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut docs = Vec::with_capacity(n);
        for i in 0..n {
            let kind = TYPES[i % TYPES.len()];
            let k = i / TYPES.len();
            let id = format!("urn:ngsi-ld:{kind}:{k:06}");
            let doc = match kind {
                "ParkingSpot" => parking_spot(&id, k, &mut rng),
                "Streetlight" => streetlight(&id, &mut rng),
                _ => waste_container(&id, &mut rng),
            };
            let doc = serde_json::to_string(&doc)
                .map_err(|e| format!("cannot serialize entity {id}: {e}"))?;
            ids.push(id);
            types.push(kind);
            docs.push(doc);
        }
        let batches = load::json_arrays(&docs, BATCH);
        Ok(Dataset {
            rows: Rows {
                ids: Arc::new(ids),
                types: Arc::new(types),
                docs: Arc::new(docs),
            },
            batches: Arc::new(batches),
            per_type: n / TYPES.len(),
        })
    }

    fn mean_doc_bytes(&self) -> f64 {
        let total: usize = self.rows.docs.iter().map(String::len).sum();
        total as f64 / self.rows.docs.len().max(1) as f64
    }
}

fn property(value: Value) -> Value {
    json!({"type": "Property", "value": value})
}

fn observed(value: Value, rng: &mut SmallRng) -> Value {
    json!({"type": "Property", "value": value, "observedAt": timestamp(rng, 1)})
}

/// A point somewhere in Paris.
fn location(rng: &mut SmallRng) -> Value {
    let lon = round_to(rng.random_range(2.25..2.42), 1e6);
    let lat = round_to(rng.random_range(48.82..48.90), 1e6);
    json!({
        "type": "GeoProperty",
        "value": {"type": "Point", "coordinates": [lon, lat]},
    })
}

/// Picks a value by weight (the weights add up to 100).
fn weighted(rng: &mut SmallRng, choices: &[(&'static str, u32)]) -> &'static str {
    let mut roll = rng.random_range(0..100u32);
    for &(value, weight) in choices {
        if roll < weight {
            return value;
        }
        roll -= weight;
    }
    choices.last().map_or("", |&(value, _)| value)
}

/// An on-street or off-street parking spot: each status matches about a third.
fn parking_spot(id: &str, k: usize, rng: &mut SmallRng) -> Value {
    let street = STREETS[rng.random_range(0..STREETS.len())];
    let status = weighted(rng, &[("free", 35), ("occupied", 40), ("closed", 25)]);
    let category = weighted(rng, &[("onStreet", 70), ("offStreet", 30)]);
    let site = rng.random_range(0..PARKING_SITES);
    json!({
        "id": id,
        "type": "ParkingSpot",
        "name": property(json!(format!("{street}, spot {}", k % 100 + 1))),
        "status": observed(json!(status), rng),
        "occupancy": {
            "type": "Property",
            "value": rng.random_range(0..=100u32),
            "unitCode": "P1",
            "observedAt": timestamp(rng, 1),
        },
        "category": property(json!(category)),
        "location": location(rng),
        "refParkingSite": {
            "type": "Relationship",
            "object": format!("urn:ngsi-ld:ParkingSite:{site:04}"),
        },
    })
}

fn streetlight(id: &str, rng: &mut SmallRng) -> Value {
    let power = if rng.random_bool(0.7) { "on" } else { "off" };
    let status = weighted(
        rng,
        &[
            ("ok", 85),
            ("defectiveLamp", 8),
            ("columnIssue", 4),
            ("brokenLantern", 3),
        ],
    );
    let group = rng.random_range(0..STREETLIGHT_GROUPS);
    json!({
        "id": id,
        "type": "Streetlight",
        "powerState": observed(json!(power), rng),
        "lanternHeight": {
            "type": "Property",
            "value": round_to(rng.random_range(4.0..12.0), 10.0),
            "unitCode": "MTR",
        },
        "illuminanceLevel": {
            "type": "Property",
            "value": rng.random_range(0..=100u32),
            "unitCode": "P1",
            "observedAt": timestamp(rng, 1),
        },
        "status": property(json!(status)),
        "location": location(rng),
        "refStreetlightGroup": {
            "type": "Relationship",
            "object": format!("urn:ngsi-ld:StreetlightGroup:{group:03}"),
        },
    })
}

fn waste_container(id: &str, rng: &mut SmallRng) -> Value {
    let filling = f64::from(rng.random_range(0..=100u32)) / 100.0;
    let status = weighted(rng, &[("ok", 85), ("full", 10), ("damaged", 5)]);
    let waste = WASTE_TYPES[rng.random_range(0..WASTE_TYPES.len())];
    json!({
        "id": id,
        "type": "WasteContainer",
        "fillingLevel": {
            "type": "Property",
            "value": filling,
            "observedAt": timestamp(rng, 1),
        },
        "status": observed(json!(status), rng),
        "wasteType": property(json!(waste)),
        "dateLastEmptying": property(json!({"@type": "DateTime", "@value": timestamp(rng, 1)})),
        "location": location(rng),
    })
}

/// One value of a shape: the same query for Borough and for PostgreSQL.
struct Variant {
    /// The query parameters as written (unencoded), without `limit`.
    display: String,
    uri: Uri,
    sql: String,
}

impl Variant {
    fn new(params: &[(&str, String)], condition: &str) -> Result<Variant, String> {
        let display = params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let query: String = params
            .iter()
            .map(|(k, v)| format!("{k}={}&", percent_encode(v)))
            .collect();
        let uri = Uri::try_from(format!("{ENTITIES_PATH}?{query}limit={LIMIT}"))
            .map_err(|e| format!("invalid request URI for {display}: {e}"))?;
        let sql =
            format!("SELECT id, doc FROM {TABLE} WHERE {condition} ORDER BY id LIMIT {LIMIT}");
        Ok(Variant { display, uri, sql })
    }
}

/// One query shape and the values it rotates through.
struct Shape {
    name: &'static str,
    about: &'static str,
    variants: Vec<Variant>,
}

/// An SQL string literal.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `doc @> '{"attr":{"value":"..."}}'` (served by the GIN index).
fn has_value(attr: &str, value: &str) -> String {
    format!(
        "doc @> {}",
        lit(&json!({attr: {"value": value}}).to_string())
    )
}

/// The numeric value of a Property.
fn number(attr: &str) -> String {
    format!("(doc->{}->>'value')::float8", lit(attr))
}

fn type_is(t: &str) -> String {
    format!("type = {}", lit(t))
}

fn shapes(per_type: usize) -> Result<Vec<Shape>, String> {
    let pair = |k: &'static str, v: String| (k, v);

    let by_type = TYPES
        .iter()
        .map(|t| Variant::new(&[pair("type", t.to_string())], &type_is(t)))
        .collect::<Result<_, _>>()?;

    let equality = ["free", "occupied", "closed"]
        .iter()
        .map(|s| {
            Variant::new(
                &[
                    pair("type", "ParkingSpot".into()),
                    pair("q", format!("status==\"{s}\"")),
                ],
                &format!("{} AND {}", type_is("ParkingSpot"), has_value("status", s)),
            )
        })
        .collect::<Result<_, _>>()?;

    let range = [(0, 20), (20, 40), (40, 60), (60, 80), (80, 100)]
        .iter()
        .map(|(lo, hi)| {
            Variant::new(
                &[
                    pair("type", "Streetlight".into()),
                    pair("q", format!("illuminanceLevel=={lo}..{hi}")),
                ],
                &format!(
                    "{} AND {} BETWEEN {lo} AND {hi}",
                    type_is("Streetlight"),
                    number("illuminanceLevel")
                ),
            )
        })
        .collect::<Result<_, _>>()?;

    let greater = ["0.5", "0.6", "0.7", "0.8", "0.9"]
        .iter()
        .map(|x| {
            Variant::new(
                &[
                    pair("type", "WasteContainer".into()),
                    pair("q", format!("fillingLevel>{x}")),
                ],
                &format!(
                    "{} AND {} > {x}",
                    type_is("WasteContainer"),
                    number("fillingLevel")
                ),
            )
        })
        .collect::<Result<_, _>>()?;

    let mut combined = Vec::new();
    for waste in WASTE_TYPES {
        for x in ["0.85", "0.9"] {
            combined.push(Variant::new(
                &[
                    pair("type", "WasteContainer".into()),
                    pair(
                        "q",
                        format!("(status==\"full\"|fillingLevel>{x});wasteType==\"{waste}\""),
                    ),
                ],
                &format!(
                    "{} AND ({} OR {} > {x}) AND {}",
                    type_is("WasteContainer"),
                    has_value("status", "full"),
                    number("fillingLevel"),
                    has_value("wasteType", waste)
                ),
            )?);
        }
    }

    // Blocks of ID_BLOCK consecutive ids, spread over each type: the pattern
    // `^urn:ngsi-ld:Streetlight:0012` matches ids 001200 to 001299.
    let blocks = per_type / ID_BLOCK;
    if blocks == 0 {
        return Err(format!(
            "too few entities per type ({per_type}) for the idPattern shape (at least {ID_BLOCK})"
        ));
    }
    let mut id_pattern = Vec::new();
    for t in TYPES {
        for j in 0..ID_BLOCKS_PER_TYPE {
            let block = (2 * j + 1) * blocks / (2 * ID_BLOCKS_PER_TYPE);
            let pattern = format!("^urn:ngsi-ld:{t}:{block:04}");
            let condition = format!("id ~ {}", lit(&pattern));
            id_pattern.push(Variant::new(&[pair("idPattern", pattern)], &condition)?);
        }
    }

    Ok(vec![
        Shape {
            name: "by-type",
            about: "type only",
            variants: by_type,
        },
        Shape {
            name: "q-equality",
            about: "q: string equality, about 1/3 of the type",
            variants: equality,
        },
        Shape {
            name: "q-range",
            about: "q: numeric range a==x..y, about 1/5 of the type",
            variants: range,
        },
        Shape {
            name: "q-greater",
            about: "q: numeric a>x, 1/10 to 1/2 of the type",
            variants: greater,
        },
        Shape {
            name: "q-and-or",
            about: "q: (a|b);c, about 1/25 of the type",
            variants: combined,
        },
        Shape {
            name: "id-pattern",
            about: "idPattern: a block of 100 consecutive ids",
            variants: id_pattern,
        },
    ])
}

/// Borough and PostgreSQL on one shape.
struct ShapeRun {
    borough: Phase,
    postgres: Phase,
}

impl ShapeRun {
    fn rps_vs_pg(&self) -> f64 {
        ratio(self.borough.throughput(), self.postgres.throughput())
    }

    fn pg_p95_vs_p95(&self) -> f64 {
        ratio(
            self.postgres.latency.p95_us as f64,
            self.borough.latency.p95_us as f64,
        )
    }
}

/// Everything measured, before the report.
struct Measured {
    upsert: Phase,
    pg_load: Phase,
    pg_index_elapsed: Duration,
    memory_after_load: Option<Memory>,
    memory_after_queries: Option<Memory>,
    runs: Vec<ShapeRun>,
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
    eprintln!(
        "generating {} entities of {} types (seed {SEED:#x})",
        sizes.entities,
        TYPES.len()
    );
    let data = Dataset::generate(sizes.entities)?;
    let shapes = shapes(data.per_type)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-load")
        .build()
        .map_err(|e| format!("cannot start the load generator runtime: {e}"))?;
    // Fail fast, before loading Borough, if the baseline cannot run.
    runtime.block_on(postgres::check(&opts.pg))?;

    let mut server = Server::spawn(None, READY_TIMEOUT)?;
    eprintln!("server listening on http://{}", server.addr());
    let measured = runtime.block_on(measure(&mut server, &data, &shapes, &sizes, &opts.pg))?;
    drop(server);

    let report = Report {
        quick: opts.quick,
        build,
        sizes: &sizes,
        mean_doc_bytes: data.mean_doc_bytes(),
        shapes: &shapes,
        measured,
    };
    println!("{}", report.table());
    write_json(&opts.out, &report.to_json())?;
    println!("results written to {}", opts.out.display());

    for (shape, run) in shapes.iter().zip(&report.measured.runs) {
        for phase in [&run.borough, &run.postgres] {
            if phase.errors > 0 {
                return Err(format!(
                    "{} ({}): {} requests failed; first: {}",
                    shape.name,
                    phase.name,
                    phase.errors,
                    phase.first_error.as_deref().unwrap_or("(no detail)")
                ));
            }
        }
    }
    Ok(())
}

/// Loads Borough, then PostgreSQL; checks every shape on both, then measures
/// them. The PostgreSQL table is dropped at the end, also when a step fails.
async fn measure(
    server: &mut Server,
    data: &Dataset,
    shapes: &[Shape],
    sizes: &Sizes,
    pg: &str,
) -> Result<Measured, String> {
    let addr = server.addr();
    eprintln!(
        "upsert: {} entities in batches of {BATCH}, {UPSERT_WORKERS} workers",
        sizes.entities
    );
    let uri = Uri::from_static(UPSERT_PATH);
    let batches = load::post_all(addr, uri, data.batches.clone(), UPSERT_WORKERS, UPSERT_OK)
        .await
        .map_err(|e| format!("upsert: {e}"))?;
    server.check_alive()?;
    let memory_after_load = server.memory();
    let mut batch_latencies = batches.latencies_us;
    let upsert = Phase {
        name: "borough upsert",
        unit: "entities/s",
        count: sizes.entities,
        elapsed: batches.elapsed,
        latency_of: "batch",
        latency: Summary::of(&mut batch_latencies),
        errors: 0,
        first_error: None,
        memory: memory_after_load,
        ops: Vec::new(),
    };

    let admin = query_pg::admin(pg).await?;
    let result = with_table(&admin, server, data, shapes, sizes, pg).await;
    let dropped = query_pg::drop_table(&admin).await;
    let (pg_load, pg_index_elapsed, runs) = result?;
    dropped?;
    Ok(Measured {
        upsert,
        pg_load,
        pg_index_elapsed,
        memory_after_load,
        memory_after_queries: server.memory(),
        runs,
    })
}

/// The steps that need the PostgreSQL table: load, check, measure.
async fn with_table(
    admin: &Client,
    server: &mut Server,
    data: &Dataset,
    shapes: &[Shape],
    sizes: &Sizes,
    pg: &str,
) -> Result<(Phase, Duration, Vec<ShapeRun>), String> {
    eprintln!(
        "postgres-jsonb: inserting {} documents, {BATCH} per statement, {UPSERT_WORKERS} connections, then indexing",
        sizes.entities
    );
    let loaded = query_pg::load(admin, pg, &data.rows, BATCH, UPSERT_WORKERS)
        .await
        .map_err(|e| format!("postgres-jsonb: {e}"))?;
    let mut insert_latencies = loaded.latencies_us;
    let pg_load = Phase {
        name: "postgres insert",
        unit: "entities/s",
        count: sizes.entities,
        elapsed: loaded.elapsed,
        latency_of: "batch",
        latency: Summary::of(&mut insert_latencies),
        errors: 0,
        first_error: None,
        memory: None,
        ops: Vec::new(),
    };

    check_shapes(server, admin, shapes).await?;

    let mut runs = Vec::with_capacity(shapes.len());
    for (n, shape) in shapes.iter().enumerate() {
        runs.push(measure_shape(server, pg, shape, sizes, n as u64).await?);
    }
    Ok((pg_load, loaded.index_elapsed, runs))
}

/// The warm-up: every value of every shape answers 200 with a non-empty
/// array on Borough, and the same ids in the same order as PostgreSQL.
async fn check_shapes(server: &mut Server, admin: &Client, shapes: &[Shape]) -> Result<(), String> {
    let variants: usize = shapes.iter().map(|s| s.variants.len()).sum();
    eprintln!(
        "check: {variants} queries of {} shapes, Borough against PostgreSQL",
        shapes.len()
    );
    let mut conn = Conn::open(server.addr()).await?;
    for shape in shapes {
        for v in &shape.variants {
            let what = format!("check {} ({})", shape.name, v.display);
            let (status, body) = conn
                .request_with_timeout(Method::GET, v.uri.clone(), None, true)
                .await
                .map_err(|e| format!("{what}: {e}"))?;
            if status != StatusCode::OK {
                return Err(format!(
                    "{what}: Borough answered {status}: {}",
                    load::quote(&body)
                ));
            }
            let borough = entity_ids(&body).map_err(|e| format!("{what}: {e}"))?;
            let expected = query_pg::ids(admin, &v.sql)
                .await
                .map_err(|e| format!("{what}: postgres-jsonb: {e}"))?;
            if borough.is_empty() {
                return Err(format!(
                    "{what}: Borough answered an empty array (PostgreSQL: {} rows)",
                    expected.len()
                ));
            }
            if borough != expected {
                let at = borough
                    .iter()
                    .zip(&expected)
                    .position(|(a, b)| a != b)
                    .unwrap_or(borough.len().min(expected.len()));
                return Err(format!(
                    "{what}: Borough answered {} entities, PostgreSQL {}; first difference at #{at}: {} vs {}",
                    borough.len(),
                    expected.len(),
                    borough.get(at).map_or("(none)", String::as_str),
                    expected.get(at).map_or("(none)", String::as_str),
                ));
            }
        }
    }
    server.check_alive()
}

/// The `id` of each entity of a JSON array.
pub(super) fn entity_ids(body: &[u8]) -> Result<Vec<String>, String> {
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

/// One shape for the duration on Borough, then on PostgreSQL.
async fn measure_shape(
    server: &mut Server,
    pg: &str,
    shape: &Shape,
    sizes: &Sizes,
    n: u64,
) -> Result<ShapeRun, String> {
    let secs = sizes.duration.as_secs_f64();
    let example = shape.variants.first().map_or("", |v| v.display.as_str());
    eprintln!(
        "{}: {secs} s at concurrency {CONCURRENCY} each, {} values, e.g. {example}",
        shape.name,
        shape.variants.len()
    );
    let mix = Mix::Gets(shape.variants.iter().map(|v| v.uri.clone()).collect());
    let seed = SEED ^ (n << 8);
    let run = load::run_timed(
        server.addr(),
        Arc::new(mix),
        CONCURRENCY,
        sizes.duration,
        seed,
    )
    .await
    .map_err(|e| format!("{}: {e}", shape.name))?;
    server.check_alive()?;
    let mut latencies = run.get_us;
    let borough = Phase {
        name: "borough",
        unit: "req/s",
        count: latencies.len(),
        elapsed: run.elapsed,
        latency_of: "request",
        latency: Summary::of(&mut latencies),
        errors: run.errors,
        first_error: run.first_error,
        memory: server.memory(),
        ops: Vec::new(),
    };

    let sqls: Vec<String> = shape.variants.iter().map(|v| v.sql.clone()).collect();
    let run = query_pg::run_timed(pg, &sqls, CONCURRENCY, sizes.duration, seed)
        .await
        .map_err(|e| format!("{} (postgres-jsonb): {e}", shape.name))?;
    let mut latencies = run.latencies_us;
    let postgres = Phase {
        name: "postgres-jsonb",
        unit: "req/s",
        count: latencies.len(),
        elapsed: run.elapsed,
        latency_of: "query",
        latency: Summary::of(&mut latencies),
        errors: run.errors,
        first_error: run.first_error,
        memory: None,
        ops: Vec::new(),
    };
    Ok(ShapeRun { borough, postgres })
}

struct Report<'a> {
    quick: bool,
    build: &'static str,
    sizes: &'a Sizes,
    mean_doc_bytes: f64,
    shapes: &'a [Shape],
    measured: Measured,
}

impl Report<'_> {
    fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        for (shape, run) in self.shapes.iter().zip(&self.measured.runs) {
            let p95 = ms(run.borough.latency.p95_us as f64);
            targets.push(Target {
                name: format!("{} p95", shape.name),
                actual: p95,
                actual_text: format!("{p95:.2} ms"),
                at_least: false,
                bound: TARGET_P95_MS,
                bound_text: format!("< {TARGET_P95_MS} ms"),
            });
            targets.push(Target {
                name: format!("{} ÷ postgres", shape.name),
                actual: run.rps_vs_pg(),
                actual_text: format!("{:.2}x req/s", run.rps_vs_pg()),
                at_least: true,
                bound: TARGET_VS_PG,
                bound_text: format!("≥ {TARGET_VS_PG:.1}x req/s"),
            });
        }
        targets
    }

    fn table(&self) -> String {
        let m = &self.measured;
        let mut out = format!(
            "\nborough bench query ({}, {} build): {} entities ({} types), batches of {BATCH}, \
             {UPSERT_WORKERS} upsert workers; each shape {} s at concurrency {CONCURRENCY}, limit={LIMIT}\n\n",
            if self.quick { "quick" } else { "full" },
            self.build,
            thousands(self.sizes.entities as f64),
            TYPES.len(),
            self.sizes.duration.as_secs(),
        );
        out.push_str(&phase_table([&m.upsert, &m.pg_load]));
        out.push_str(&format!(
            "  (postgres indexes + ANALYZE: {:.2} s; server RSS / peak after loading: {})\n\n",
            m.pg_index_elapsed.as_secs_f64(),
            memory_text(m.memory_after_load)
        ));
        out.push_str(&format!(
            "{:<12} {:<15} {:>10} {:>8} {:>8} {:>8} {:>7}  {:>11} {:>13}\n",
            "shape",
            "system",
            "req/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "errors",
            "÷ pg req/s",
            "pg p95 ÷ p95"
        ));
        for (shape, run) in self.shapes.iter().zip(&m.runs) {
            for (k, p) in [&run.borough, &run.postgres].into_iter().enumerate() {
                let (name, ratios) = if k == 0 {
                    (
                        shape.name,
                        format!(
                            "{:>11} {:>13}",
                            format!("{:.2}x", run.rps_vs_pg()),
                            format!("{:.2}x", run.pg_p95_vs_p95())
                        ),
                    )
                } else {
                    ("", String::new())
                };
                let line = format!(
                    "{:<12} {:<15} {:>10} {:>8.2} {:>8.2} {:>8.2} {:>7}  {}",
                    name,
                    p.name,
                    thousands(p.throughput()),
                    ms(p.latency.p50_us as f64),
                    ms(p.latency.p95_us as f64),
                    ms(p.latency.p99_us as f64),
                    p.errors,
                    ratios
                );
                out.push_str(line.trim_end());
                out.push('\n');
            }
        }
        out.push_str("\nqueries (each rotates through its values; first one shown)\n");
        for shape in self.shapes {
            out.push_str(&format!(
                "  {:<12} {:>2} values  {}\n",
                shape.name,
                shape.variants.len(),
                shape.variants.first().map_or("", |v| v.display.as_str())
            ));
        }
        out.push('\n');
        out.push_str(&target_table("targets (from the issue)", &self.targets()));
        out.push_str(&format!(
            "(the targets apply at {} entities; \"÷ postgres\" is Borough req/s ÷ PostgreSQL req/s)\n",
            thousands(TARGET_ENTITIES as f64)
        ));
        if self.quick || self.build == "debug" {
            out.push_str("(quick runs and debug builds measure nothing meaningful; targets are informative only)\n");
        }
        out
    }

    fn to_json(&self) -> Value {
        let m = &self.measured;
        let shapes: serde_json::Map<String, Value> = self
            .shapes
            .iter()
            .zip(&m.runs)
            .map(|(shape, run)| {
                let variants: Vec<Value> = shape
                    .variants
                    .iter()
                    .map(|v| json!({"query": v.display, "uri": v.uri.to_string(), "sql": v.sql}))
                    .collect();
                let value = json!({
                    "about": shape.about,
                    "variants": variants,
                    "borough": run.borough.to_json(),
                    "postgres": run.postgres.to_json(),
                    "ratios": {
                        "rps_vs_postgres": round_to(run.rps_vs_pg(), 1e3),
                        "postgres_p95_vs_borough_p95": round_to(run.pg_p95_vs_p95(), 1e3),
                    },
                });
                (shape.name.to_string(), value)
            })
            .collect();
        let targets: Vec<Value> = self.targets().iter().map(Target::to_json).collect();
        let memory = |m: Option<Memory>| m.map(|m| json!({"rss_kb": m.rss_kb, "hwm_kb": m.hwm_kb}));
        let unix_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        json!({
            "scenario": "query",
            "quick": self.quick,
            "build": self.build,
            "version": env!("CARGO_PKG_VERSION"),
            "unix_time": unix_time,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "config": {
                "seed": SEED,
                "entities": self.sizes.entities,
                "types": TYPES,
                "batch": BATCH,
                "upsert_workers": UPSERT_WORKERS,
                "duration_s": self.sizes.duration.as_secs_f64(),
                "concurrency": CONCURRENCY,
                "limit": LIMIT,
                "mean_entity_bytes": round_to(self.mean_doc_bytes, 10.0),
                "postgres_table": format!(
                    "{TABLE} (id text COLLATE \"C\" PRIMARY KEY, type text, doc jsonb), \
                     GIN (doc jsonb_path_ops), btree (type, id)"
                ),
            },
            "load": {
                "borough": m.upsert.to_json(),
                "postgres": m.pg_load.to_json(),
                "postgres_index_s": round_to(m.pg_index_elapsed.as_secs_f64(), 1e3),
            },
            "server_memory_after_load": memory(m.memory_after_load),
            "server_memory_after_queries": memory(m.memory_after_queries),
            "shapes": shapes,
            "targets": targets,
            "targets_apply_at_entities": TARGET_ENTITIES,
        })
    }
}
