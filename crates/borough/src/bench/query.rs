//! Scenario `query`: `GET /entities` with `type`, `q` and `idPattern` over a
//! city of parking spots, streetlights and waste containers, against the
//! same documents in PostgreSQL `jsonb` queried with the same shapes in SQL.
//!
//! Every shape rotates through a few values (picked at random per request),
//! asks for the first page (`limit=100`, ordered by id) and is checked before
//! it is measured: Borough and PostgreSQL must answer the same, non-empty
//! list of ids for every value. With `--auth` (and `--quick`), the load and
//! every shape run again on Borough with access control on (`auth`).

use super::auth::{self, Auth, AuthReport, Leg};
use super::common::{
    self, BothSystems, Options, RunInfo, UPSERT_WORKERS, entities_query, mean_len, property,
    relationship,
};
use super::entities::{STREETS, timestamp};
use super::load::{self, Conn, Mix, TimedRun, ms};
use super::postgres::{self, Column, TimedQuery};
use super::query_pg::{self, TABLE};
use super::report::{
    Bound, Phase, ShapeRun, Target, memory_json, memory_text, phase_table, publish, round_to,
    shape_table, targets_json, thousands,
};
use super::server::{Memory, Server};
use bytes::Bytes;
use hyper::Uri;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;

/// Seed of the documents and of the request picks: runs are reproducible.
const SEED: u64 = 0x5EED_C17E;
const BATCH: usize = 1_000;
const CONCURRENCY: usize = 16;
/// Page size of every query.
const LIMIT: usize = 100;
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

struct Sizes {
    entities: usize,
    duration: Duration,
}

/// Tiny sizes (`--quick`): they check the harness, and measure nothing.
const QUICK: Sizes = Sizes {
    entities: 3_000,
    duration: Duration::from_secs(1),
};

const FULL: Sizes = Sizes {
    entities: TARGET_ENTITIES,
    duration: Duration::from_secs(10),
};

/// The documents, built once before anything is measured.
struct Dataset {
    /// The rows of the PostgreSQL table, in the order of its columns: ids,
    /// types, documents.
    columns: Vec<Column>,
    mean_doc_bytes: f64,
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
        Ok(Dataset {
            mean_doc_bytes: mean_len(&docs),
            batches: Arc::new(load::json_arrays(&docs, BATCH)),
            columns: vec![
                Column::Strings(Arc::new(ids)),
                Column::Names(Arc::new(types)),
                Column::Strings(Arc::new(docs)),
            ],
            per_type: n / TYPES.len(),
        })
    }
}

fn observed(value: Value, rng: &mut SmallRng) -> Value {
    json!({"type": "Property", "value": value, "observedAt": timestamp(rng, 1)})
}

/// A percentage observed on day 1.
fn observed_percent(rng: &mut SmallRng) -> Value {
    let value = rng.random_range(0..=100u32);
    json!({"type": "Property", "value": value, "unitCode": "P1", "observedAt": timestamp(rng, 1)})
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
        "occupancy": observed_percent(rng),
        "category": property(json!(category)),
        "location": location(rng),
        "refParkingSite": relationship(format!("urn:ngsi-ld:ParkingSite:{site:04}")),
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
        "illuminanceLevel": observed_percent(rng),
        "status": property(json!(status)),
        "location": location(rng),
        "refStreetlightGroup": relationship(format!("urn:ngsi-ld:StreetlightGroup:{group:03}")),
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
        let (display, uri) = entities_query(params, LIMIT)?;
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

impl Shape {
    /// The shape's requests on Borough and its queries on PostgreSQL: one
    /// statement per value, each run without parameters.
    fn both_systems(&self) -> BothSystems {
        let sqls: Vec<String> = self.variants.iter().map(|v| v.sql.clone()).collect();
        let queries = sqls
            .iter()
            .enumerate()
            .map(|(statement, sql)| TimedQuery {
                statement,
                params: Vec::new(),
                label: sql.clone(),
            })
            .collect();
        BothSystems {
            shape: self.name,
            uris: self.variants.iter().map(|v| v.uri.clone()).collect(),
            baseline: "postgres-jsonb",
            sqls,
            queries,
        }
    }
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

/// `type=<t>&q=<q>` on Borough; `<condition>` on the rows of that type in SQL.
fn type_and_q(t: &str, q: String, condition: String) -> Result<Variant, String> {
    let sql_condition = format!("{} AND {condition}", type_is(t));
    Variant::new(&[("type", t.to_string()), ("q", q)], &sql_condition)
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
            let q = format!("status==\"{s}\"");
            type_and_q("ParkingSpot", q, has_value("status", s))
        })
        .collect::<Result<_, _>>()?;

    let range = [(0, 20), (20, 40), (40, 60), (60, 80), (80, 100)]
        .iter()
        .map(|(lo, hi)| {
            let q = format!("illuminanceLevel=={lo}..{hi}");
            let condition = format!("{} BETWEEN {lo} AND {hi}", number("illuminanceLevel"));
            type_and_q("Streetlight", q, condition)
        })
        .collect::<Result<_, _>>()?;

    let greater = ["0.5", "0.6", "0.7", "0.8", "0.9"]
        .iter()
        .map(|x| {
            let q = format!("fillingLevel>{x}");
            let condition = format!("{} > {x}", number("fillingLevel"));
            type_and_q("WasteContainer", q, condition)
        })
        .collect::<Result<_, _>>()?;

    let mut combined = Vec::new();
    for waste in WASTE_TYPES {
        for x in ["0.85", "0.9"] {
            let q = format!("(status==\"full\"|fillingLevel>{x});wasteType==\"{waste}\"");
            let condition = format!(
                "({} OR {} > {x}) AND {}",
                has_value("status", "full"),
                number("fillingLevel"),
                has_value("wasteType", waste)
            );
            combined.push(type_and_q("WasteContainer", q, condition)?);
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

/// Everything measured, before the report.
struct Measured {
    upsert: Phase,
    pg_load: Phase,
    pg_index_elapsed: Duration,
    memory_after_load: Option<Memory>,
    memory_after_queries: Option<Memory>,
    runs: Vec<ShapeRun>,
    /// The secured legs (`--auth`): each one's load, then its run of each shape.
    secured: Vec<(Auth, Vec<Phase>)>,
}

pub fn run(opts: &Options) -> Result<(), String> {
    let sizes = if opts.quick { QUICK } else { FULL };
    let info = RunInfo::new("query", opts.quick);
    eprintln!(
        "generating {} entities of {} types (seed {SEED:#x})",
        sizes.entities,
        TYPES.len()
    );
    let data = Dataset::generate(sizes.entities)?;
    let shapes = shapes(data.per_type)?;

    let runtime = common::load_runtime()?;
    // Fail fast, before loading Borough, if the baseline cannot run.
    runtime.block_on(postgres::check(&opts.pg))?;

    // Quick runs compare too, so that the harness of --auth never rots.
    let secured = if opts.auth || opts.quick {
        Some(auth::SecuredLegs::start()?)
    } else {
        None
    };

    let server = common::start_server()?;
    let mut legs = auth::legs(secured.as_ref(), server, &runtime)?;
    let turns = auth::turns(&legs, opts.quick);
    let measure = measure(&mut legs, &data, &shapes, &sizes, &opts.pg, turns);
    let mut measured = runtime.block_on(measure)?;
    drop(legs);

    let auth = match secured {
        None => None,
        Some(secured) => {
            let shape_runs = shapes.iter().zip(&measured.runs);
            let baseline: Vec<(&'static str, &Phase)> =
                std::iter::once(("upsert", &measured.upsert))
                    .chain(shape_runs.map(|(s, r)| (s.name, &r.borough)))
                    .collect();
            let legs = std::mem::take(&mut measured.secured);
            Some(AuthReport::new(&baseline, legs, secured.jwt_skipped())?)
        }
    };

    let report = Report {
        info,
        sizes: &sizes,
        mean_doc_bytes: data.mean_doc_bytes,
        shapes: &shapes,
        measured,
        auth,
    };
    publish(&report.table(), &report.to_json(), &opts.out)?;
    for (shape, run) in shapes.iter().zip(&report.measured.runs) {
        run.check_failures(shape.name)?;
    }
    if let Some(auth) = &report.auth {
        auth.check_failures()?;
    }
    Ok(())
}

/// The seed of the `n`th shape's requests, on every system.
fn shape_seed(n: usize) -> u64 {
    SEED ^ ((n as u64) << 8)
}

/// Loads Borough (every leg), then PostgreSQL; checks every shape on both,
/// then measures each shape on the legs (taking turns) and on PostgreSQL.
/// The PostgreSQL table is dropped at the end, also when a step fails.
async fn measure(
    legs: &mut [Leg],
    data: &Dataset,
    shapes: &[Shape],
    sizes: &Sizes,
    pg: &str,
    turns: usize,
) -> Result<Measured, String> {
    eprintln!(
        "upsert: {} entities in batches of {BATCH}, {UPSERT_WORKERS} workers{}",
        sizes.entities,
        auth::describe_turns(legs, turns)
    );
    let mut loads =
        auth::upsert_in_turns(legs, &data.batches, turns, "borough upsert", sizes.entities)
            .await?
            .into_iter();
    let upsert = loads.next().ok_or("no server was loaded")?;
    let loads: Vec<Phase> = loads.collect();

    let admin = postgres::connect(pg).await?;
    let result = with_table(&admin, legs, data, shapes, sizes, pg, turns).await;
    let dropped = postgres::drop_table(&admin, TABLE).await;
    let (pg_load, pg_index_elapsed, (runs, secured_runs)) = result?;
    dropped?;
    let secured = legs[1..]
        .iter()
        .zip(loads.into_iter().zip(secured_runs))
        .map(|(leg, (load, shape_runs))| {
            let phases = std::iter::once(load).chain(shape_runs).collect();
            (leg.auth, phases)
        })
        .collect();
    Ok(Measured {
        memory_after_load: upsert.memory,
        upsert,
        pg_load,
        pg_index_elapsed,
        memory_after_queries: legs[0].server.memory(),
        runs,
        secured,
    })
}

/// The runs of every shape on the baseline and PostgreSQL, and, for each
/// secured leg, its run of every shape.
type ShapeRuns = (Vec<ShapeRun>, Vec<Vec<Phase>>);

/// The steps that need the PostgreSQL table: load, check, measure.
async fn with_table(
    admin: &Client,
    legs: &mut [Leg],
    data: &Dataset,
    shapes: &[Shape],
    sizes: &Sizes,
    pg: &str,
    turns: usize,
) -> Result<(Phase, Duration, ShapeRuns), String> {
    eprintln!(
        "postgres-jsonb: inserting {} documents, {BATCH} per statement, {UPSERT_WORKERS} connections, then indexing",
        sizes.entities
    );
    let table = query_pg::table();
    let loaded = postgres::load(
        admin,
        pg,
        &table,
        data.columns.clone(),
        BATCH,
        UPSERT_WORKERS,
    )
    .await
    .map_err(|e| format!("postgres-jsonb: {e}"))?;
    let pg_load = Phase::entities_written(
        "postgres insert",
        sizes.entities,
        "batch",
        loaded.elapsed,
        loaded.latencies_us,
    );

    let expected = expected_ids(admin, shapes).await?;
    for leg in legs.iter_mut() {
        check_shapes(&mut leg.server, shapes, &expected)
            .await
            .map_err(|e| format!("{e}{}", leg.label()))?;
    }
    let runs = measure_shapes(legs, shapes, sizes, pg, turns).await?;
    Ok((pg_load, loaded.index_elapsed, runs))
}

/// Each shape on the legs, taking turns, then on PostgreSQL for as long and
/// with the same seed.
async fn measure_shapes(
    legs: &mut [Leg],
    shapes: &[Shape],
    sizes: &Sizes,
    pg: &str,
    turns: usize,
) -> Result<ShapeRuns, String> {
    let mut runs = Vec::with_capacity(shapes.len());
    let mut secured_runs: Vec<Vec<Phase>> = legs[1..].iter().map(|_| Vec::new()).collect();
    let slice = sizes.duration / u32::try_from(turns).unwrap_or(1);
    for (n, shape) in shapes.iter().enumerate() {
        let secs = sizes.duration.as_secs_f64();
        let example = shape.variants.first().map_or("", |v| v.display.as_str());
        eprintln!(
            "{}: {secs} s at concurrency {CONCURRENCY} each, {} values, e.g. {example}{}",
            shape.name,
            shape.variants.len(),
            auth::describe_turns(legs, turns)
        );
        let both = shape.both_systems();
        let mix = Arc::new(Mix::Gets(both.uris.clone()));
        let taken = auth::take_turns(legs, turns, async |leg, t| {
            let seed = shape_seed(n).wrapping_add(t as u64);
            let endpoint = leg.server.endpoint();
            let run = load::run_timed(endpoint, mix.clone(), CONCURRENCY, slice, seed).await?;
            leg.server.check_alive()?;
            Ok(run)
        })
        .await
        .map_err(|e| format!("{}: {e}", shape.name))?;
        let mut phases = legs.iter().zip(taken).map(|(leg, runs)| {
            let run = TimedRun::merge(runs);
            Phase::timed("borough", "req/s", "request", run.elapsed, run.get_us)
                .with_failures(run.failures)
                .with_memory(leg.server.memory())
        });
        let borough = phases.next().ok_or("no server to measure")?;
        for (out, phase) in secured_runs.iter_mut().zip(phases) {
            out.push(phase);
        }
        let queries = Arc::new(both.queries);
        let pg_run = postgres::run_timed(
            pg,
            &both.sqls,
            queries,
            CONCURRENCY,
            sizes.duration,
            shape_seed(n),
        )
        .await
        .map_err(|e| format!("{} ({}): {e}", shape.name, both.baseline))?;
        runs.push(ShapeRun {
            borough,
            baseline: pg_run.phase(both.baseline),
        });
    }
    Ok((runs, secured_runs))
}

/// PostgreSQL's answer to every value of every shape, in order.
async fn expected_ids(admin: &Client, shapes: &[Shape]) -> Result<Vec<Vec<String>>, String> {
    let mut all = Vec::new();
    for shape in shapes {
        for v in &shape.variants {
            let ids = query_pg::ids(admin, &v.sql).await.map_err(|e| {
                format!("check {} ({}): postgres-jsonb: {e}", shape.name, v.display)
            })?;
            all.push(ids);
        }
    }
    Ok(all)
}

/// The warm-up: every value of every shape answers 200 with a non-empty
/// array on Borough, and the same ids in the same order as PostgreSQL
/// (`expected`, from [`expected_ids`]).
async fn check_shapes(
    server: &mut Server,
    shapes: &[Shape],
    expected: &[Vec<String>],
) -> Result<(), String> {
    let variants: usize = shapes.iter().map(|s| s.variants.len()).sum();
    eprintln!(
        "check: {variants} queries of {} shapes, Borough against PostgreSQL",
        shapes.len()
    );
    if expected.len() != variants {
        return Err(format!(
            "check: {} answers of PostgreSQL for {variants} queries",
            expected.len()
        ));
    }
    let mut conn = Conn::open(server.endpoint()).await?;
    let all = shapes
        .iter()
        .flat_map(|s| s.variants.iter().map(move |v| (s, v)));
    for ((shape, v), expected) in all.zip(expected) {
        let what = format!("check {} ({})", shape.name, v.display);
        let borough = common::fetch_ids(&mut conn, &v.uri, &what).await?;
        if borough.is_empty() {
            return Err(format!(
                "{what}: Borough answered an empty array (PostgreSQL: {} rows)",
                expected.len()
            ));
        }
        if &borough != expected {
            let at = borough
                .iter()
                .zip(expected)
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
    server.check_alive()
}

struct Report<'a> {
    info: RunInfo,
    sizes: &'a Sizes,
    mean_doc_bytes: f64,
    shapes: &'a [Shape],
    measured: Measured,
    /// The load and the shapes with access control, when compared.
    auth: Option<AuthReport>,
}

impl Report<'_> {
    fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        for (shape, run) in self.shapes.iter().zip(&self.measured.runs) {
            let p95 = ms(run.borough.latency.p95_us as f64);
            targets.push(Target::latency_below(
                format!("{} p95", shape.name),
                p95,
                TARGET_P95_MS,
            ));
            targets.push(Target::new(
                format!("{} ÷ postgres", shape.name),
                run.rps_vs_baseline(),
                format!("{:.2}x req/s", run.rps_vs_baseline()),
                Bound::AtLeast(TARGET_VS_PG),
                format!("≥ {TARGET_VS_PG:.1}x req/s"),
            ));
        }
        targets
    }

    fn table(&self) -> String {
        let m = &self.measured;
        let mut out = format!(
            "{}{} entities ({} types), batches of {BATCH}, \
             {UPSERT_WORKERS} upsert workers; each shape {} s at concurrency {CONCURRENCY}, limit={LIMIT}\n\n",
            self.info.title(),
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
        let ratio_headings = format!("{:>11} {:>13}", "÷ pg req/s", "pg p95 ÷ p95");
        let rows = self.shapes.iter().zip(&m.runs).map(|(shape, run)| {
            let ratios = format!(
                "{:>11} {:>13}",
                format!("{:.2}x", run.rps_vs_baseline()),
                format!("{:.2}x", run.baseline_p95_vs_p95())
            );
            (shape.name, run, ratios)
        });
        out.push_str(&shape_table(15, &ratio_headings, rows));
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
        let note = format!(
            "(the targets apply at {} entities; \"÷ postgres\" is Borough req/s ÷ PostgreSQL req/s)\n",
            thousands(TARGET_ENTITIES as f64)
        );
        out.push_str(&self.info.targets_section(&self.targets(), &note));
        if let Some(auth) = &self.auth {
            out.push_str(&auth.section(&self.info));
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
                    "postgres": run.baseline.to_json(),
                    "ratios": {
                        "rps_vs_postgres": round_to(run.rps_vs_baseline(), 1e3),
                        "postgres_p95_vs_borough_p95": round_to(run.baseline_p95_vs_p95(), 1e3),
                    },
                });
                (shape.name.to_string(), value)
            })
            .collect();
        let mut out = self.info.json(json!({
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
            "server_memory_after_load": memory_json(m.memory_after_load),
            "server_memory_after_queries": memory_json(m.memory_after_queries),
            "shapes": shapes,
            "targets": targets_json(&self.targets()),
            "targets_apply_at_entities": TARGET_ENTITIES,
        }));
        if let Some(auth) = &self.auth {
            out["auth"] = auth.to_json();
        }
        out
    }
}
