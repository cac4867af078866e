//! Scenario `geo`: geo-queries over a city of located things (points:
//! parking spots, streetlights, air-quality stations) and areas (polygons:
//! buildings, parks), against PostGIS with a GiST index queried with the
//! same relations in SQL.
//!
//! Steps: load Borough through the batch upsert; restart it on the same
//! data directory (startup time: opening the store, loading every entity and
//! rebuilding the indexes; memory after startup); load PostGIS; check a few
//! positions of every shape (Borough and PostGIS must answer the same ids);
//! then run each shape on both, rotating through seeded random positions.

use super::common::{
    self, BothSystems, Options, RunInfo, UPSERT_WORKERS, entities_query, mean_len, property,
};
use super::geo_pg::{self, GEOM_INDEX, TABLE};
use super::load::{self, Conn, ms};
use super::postgres::{self, Column, Param, TimedQuery};
use super::report::{
    Bound, Phase, ShapeRun, Target, memory_json, memory_text, phase_table, publish, round_to,
    shape_table, targets_json, thousands,
};
use super::server::{Memory, Restart, Server};
use bytes::Bytes;
use hyper::Uri;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::f64::consts::PI;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;

/// Seed of the entities, the query positions and the request picks.
const SEED: u64 = 0x5EED_6E00;
/// Wait for the server to stop by itself after `SIGTERM` before killing it.
const STOP_GRACE: Duration = Duration::from_secs(120);
const BATCH: usize = 1_000;
const CONCURRENCY: usize = 16;
/// Page size of every query.
const LIMIT: usize = 100;
/// Located things, as Points; they take turns in this order.
const POINT_TYPES: [&str; 3] = ["ParkingSpot", "Streetlight", "AirQualityObserved"];
/// Areas, as Polygons; they take turns in this order.
const POLYGON_TYPES: [&str; 2] = ["Building", "Park"];
/// The city: a Paris-sized box, in degrees.
const LON: (f64, f64) = (2.25, 2.42);
const LAT: (f64, f64) = (48.81, 48.91);
/// Metres per degree of latitude around Paris (the data only needs to be
/// roughly to scale).
const M_PER_DEG_LAT: f64 = 111_200.0;
/// Sides of the building and park quadrilaterals, in metres.
const AREA_SIDE_M: (f64, f64) = (20.0, 80.0);
/// `near;maxDistance==` of the near shape, in metres.
const NEAR_M: u32 = 500;
/// Side of the square districts (hexagons have about the same area), in metres.
const DISTRICT_M: f64 = 500.0;
/// Length of the street lines, in metres.
const STREET_M: f64 = 1_000.0;
/// Positions each shape rotates through.
const POSITIONS: usize = 1_000;
/// Positions of each shape checked against PostGIS before measuring.
const CHECK_POSITIONS: usize = 32;
/// Largest share of ids that may differ between Borough and PostGIS
/// (boundary cases of the two geodesic computations).
const MAX_MISMATCH: f64 = 0.01;
/// Distances closer than this are a tie (metres).
const TIE_M: f64 = 1e-3;

// Targets from the issue: reported, never enforced.
const TARGET_NEAR_P99_MS: f64 = 5.0;
const TARGET_VS_PG: f64 = 1.0;
const TARGET_STARTUP_S: f64 = 10.0;
/// Size at which the issue states the targets.
const TARGET_POINTS: usize = 1_000_000;

struct Sizes {
    points: usize,
    polygons: usize,
    duration: Duration,
    /// Wait for the restarted server, which loads everything first.
    restart_timeout: Duration,
}

/// Tiny sizes (`--quick`): they check the harness, and measure nothing.
const QUICK: Sizes = Sizes {
    points: 20_000,
    polygons: 500,
    duration: Duration::from_secs(1),
    restart_timeout: Duration::from_secs(120),
};

const FULL: Sizes = Sizes {
    points: TARGET_POINTS,
    polygons: 10_000,
    duration: Duration::from_secs(10),
    restart_timeout: Duration::from_secs(900),
};

impl Sizes {
    fn entities(&self) -> usize {
        self.points + self.polygons
    }
}

// ---------------------------------------------------------------------------
// Coordinates

/// Metres per degree of longitude at `lat`.
fn m_per_deg_lon(lat: f64) -> f64 {
    111_320.0 * lat.to_radians().cos()
}

/// `(lon, lat)` moved `east` and `north` metres.
fn offset((lon, lat): (f64, f64), east: f64, north: f64) -> (f64, f64) {
    (lon + east / m_per_deg_lon(lat), lat + north / M_PER_DEG_LAT)
}

/// A coordinate pair rounded to 1e-6° (about 0.1 m), as written in GeoJSON.
fn coord((lon, lat): (f64, f64)) -> [f64; 2] {
    [round_to(lon, 1e6), round_to(lat, 1e6)]
}

/// A point of the city at least `margin` metres inside its edges.
fn random_point(rng: &mut SmallRng, margin: f64) -> (f64, f64) {
    let mid_lat = (LAT.0 + LAT.1) / 2.0;
    let dlon = margin / m_per_deg_lon(mid_lat);
    let dlat = margin / M_PER_DEG_LAT;
    (
        rng.random_range(LON.0 + dlon..LON.1 - dlon),
        rng.random_range(LAT.0 + dlat..LAT.1 - dlat),
    )
}

/// A closed ring through `corners` (metres east and north of `centre`),
/// rotated by `theta` counter-clockwise.
fn ring(centre: (f64, f64), corners: &[(f64, f64)], theta: f64) -> Vec<[f64; 2]> {
    let (sin, cos) = theta.sin_cos();
    let mut ring: Vec<[f64; 2]> = corners
        .iter()
        .map(|&(x, y)| coord(offset(centre, x * cos - y * sin, x * sin + y * cos)))
        .collect();
    if let Some(&first) = ring.first() {
        ring.push(first);
    }
    ring
}

/// A building or park: a quadrilateral of 20 to 80 m sides, turned at
/// random, its corners moved a little (a closed ring, counter-clockwise).
fn quadrilateral(rng: &mut SmallRng) -> Vec<[f64; 2]> {
    let centre = random_point(rng, 100.0);
    let a = rng.random_range(AREA_SIDE_M.0..AREA_SIDE_M.1) / 2.0;
    let b = rng.random_range(AREA_SIDE_M.0..AREA_SIDE_M.1) / 2.0;
    let mut jitter = || rng.random_range(-2.0..2.0);
    let corners = [
        (-a + jitter(), -b + jitter()),
        (a + jitter(), -b + jitter()),
        (a + jitter(), b + jitter()),
        (-a + jitter(), b + jitter()),
    ];
    let theta = rng.random_range(0.0..PI);
    ring(centre, &corners, theta)
}

/// A district: a 500 m square turned at random, or a hexagon-ish polygon
/// of about the same area. Returns its kind and its closed ring.
fn district(rng: &mut SmallRng) -> (&'static str, Vec<[f64; 2]>) {
    let centre = random_point(rng, DISTRICT_M);
    let theta = rng.random_range(0.0..PI);
    if rng.random_bool(0.5) {
        let h = DISTRICT_M / 2.0;
        let corners = [(-h, -h), (h, -h), (h, h), (-h, h)];
        ("square", ring(centre, &corners, theta))
    } else {
        // A regular hexagon of radius r has an area of 2.6 r²; r = 310 m
        // gives about 0.25 km², then each vertex moves by up to 15 %.
        let corners: Vec<(f64, f64)> = (0..6)
            .map(|k| {
                let r = 310.0 * rng.random_range(0.85..1.15);
                let angle = f64::from(k) * PI / 3.0;
                (r * angle.cos(), r * angle.sin())
            })
            .collect();
        ("hexagon", ring(centre, &corners, theta))
    }
}

/// A street: a 1 km line of 2 to 4 points, turning up to 45° at each.
fn street(rng: &mut SmallRng) -> Vec<[f64; 2]> {
    let points = rng.random_range(2..=4u32);
    let segment = STREET_M / f64::from(points - 1);
    let mut at = random_point(rng, STREET_M);
    let mut heading = rng.random_range(0.0..2.0 * PI);
    let mut line = vec![coord(at)];
    for k in 1..points {
        if k > 1 {
            heading += rng.random_range(-PI / 4.0..PI / 4.0);
        }
        at = offset(at, segment * heading.cos(), segment * heading.sin());
        line.push(coord(at));
    }
    line
}

// ---------------------------------------------------------------------------
// Entities

/// The entities, built once before anything is measured.
struct Dataset {
    /// The rows of the PostGIS table, in the order of its columns: ids,
    /// types, GeoJSON geometries (`location.value`), documents.
    columns: Vec<Column>,
    mean_doc_bytes: f64,
    /// Upsert bodies: JSON arrays of [`BATCH`] entities.
    batches: Arc<Vec<Bytes>>,
}

impl Dataset {
    /// `points` located things then `polygons` areas; the types take turns
    /// and number their entities from 0: `urn:ngsi-ld:Streetlight:0000042`.
    fn generate(points: usize, polygons: usize) -> Result<Dataset, String> {
        let mut rng = SmallRng::seed_from_u64(SEED);
        let n = points + polygons;
        let mut ids = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut geometries = Vec::with_capacity(n);
        let mut docs = Vec::with_capacity(n);
        for i in 0..n {
            let (kind, k) = if i < points {
                (POINT_TYPES[i % POINT_TYPES.len()], i / POINT_TYPES.len())
            } else {
                let j = i - points;
                (
                    POLYGON_TYPES[j % POLYGON_TYPES.len()],
                    j / POLYGON_TYPES.len(),
                )
            };
            let id = format!("urn:ngsi-ld:{kind}:{k:07}");
            let geometry = if i < points {
                json!({"type": "Point", "coordinates": coord(random_point(&mut rng, 0.0))})
            } else {
                json!({"type": "Polygon", "coordinates": [quadrilateral(&mut rng)]})
            };
            let mut doc = match kind {
                "ParkingSpot" => parking_spot(&id, &mut rng),
                "Streetlight" => streetlight(&id, &mut rng),
                "AirQualityObserved" => air_quality(&id, &mut rng),
                "Building" => building(&id, &mut rng),
                _ => park(&id, k),
            };
            doc["location"] = json!({"type": "GeoProperty", "value": geometry});
            let geometry = serde_json::to_string(&geometry)
                .map_err(|e| format!("cannot serialize the location of {id}: {e}"))?;
            let doc = serde_json::to_string(&doc)
                .map_err(|e| format!("cannot serialize entity {id}: {e}"))?;
            ids.push(id);
            types.push(kind);
            geometries.push(geometry);
            docs.push(doc);
        }
        Ok(Dataset {
            mean_doc_bytes: mean_len(&docs),
            batches: Arc::new(load::json_arrays(&docs, BATCH)),
            columns: vec![
                Column::Strings(Arc::new(ids)),
                Column::Names(Arc::new(types)),
                Column::Strings(Arc::new(geometries)),
                Column::Strings(Arc::new(docs)),
            ],
        })
    }
}

fn parking_spot(id: &str, rng: &mut SmallRng) -> Value {
    let status = if rng.random_bool(0.6) {
        "occupied"
    } else {
        "free"
    };
    let category = if rng.random_bool(0.7) {
        "onStreet"
    } else {
        "offStreet"
    };
    json!({
        "id": id,
        "type": "ParkingSpot",
        "status": property(json!(status)),
        "category": property(json!(category)),
    })
}

fn streetlight(id: &str, rng: &mut SmallRng) -> Value {
    let power = if rng.random_bool(0.7) { "on" } else { "off" };
    json!({
        "id": id,
        "type": "Streetlight",
        "powerState": property(json!(power)),
        "lanternHeight": {
            "type": "Property",
            "value": round_to(rng.random_range(4.0..12.0), 10.0),
            "unitCode": "MTR",
        },
    })
}

fn air_quality(id: &str, rng: &mut SmallRng) -> Value {
    json!({
        "id": id,
        "type": "AirQualityObserved",
        "no2": {"type": "Property", "value": rng.random_range(5..=120u32), "unitCode": "GQ"},
        "pm10": {"type": "Property", "value": rng.random_range(5..=80u32), "unitCode": "GQ"},
    })
}

fn building(id: &str, rng: &mut SmallRng) -> Value {
    const CATEGORIES: [&str; 4] = ["residential", "office", "school", "shop"];
    json!({
        "id": id,
        "type": "Building",
        "category": property(json!(CATEGORIES[rng.random_range(0..CATEGORIES.len())])),
        "floorsAboveGround": property(json!(rng.random_range(1..=9u32))),
    })
}

fn park(id: &str, k: usize) -> Value {
    json!({
        "id": id,
        "type": "Park",
        "name": property(json!(format!("Square {k}"))),
        "openingHours": property(json!("Mo-Su 08:00-21:00")),
    })
}

// ---------------------------------------------------------------------------
// Query shapes

/// One position of a shape: the same query for Borough and for PostGIS.
struct Position {
    /// The query parameters as written (unencoded), without `limit`.
    display: String,
    uri: Uri,
    /// Parameters of the shape's prepared statement.
    params: Vec<Param>,
}

impl Position {
    fn new(query: &[(&str, String)], params: Vec<Param>) -> Result<Position, String> {
        let (display, uri) = entities_query(query, LIMIT)?;
        Ok(Position {
            display,
            uri,
            params,
        })
    }
}

/// One query shape and the positions it rotates through.
struct Shape {
    name: &'static str,
    about: &'static str,
    /// The measured statement: `id, doc`, page of [`LIMIT`].
    sql: String,
    /// The check statement: `id` and the distance (near) or 0.
    check_sql: String,
    /// `near`: ordered by distance, ties by id; otherwise by id.
    by_distance: bool,
    positions: Vec<Position>,
}

impl Shape {
    /// The shape's requests on Borough and its queries on PostGIS: one
    /// statement, run with the parameters of each position.
    fn both_systems(&self) -> BothSystems {
        let queries = self
            .positions
            .iter()
            .map(|p| TimedQuery {
                statement: 0,
                params: p.params.clone(),
                label: format!("{:?}", p.params),
            })
            .collect();
        BothSystems {
            shape: self.name,
            uris: self.positions.iter().map(|p| p.uri.clone()).collect(),
            baseline: "postgis",
            sqls: vec![self.sql.clone()],
            queries,
        }
    }
}

/// The query point of the near statements ($2 = lon, $3 = lat).
const SQL_POINT: &str = "ST_SetSRID(ST_MakePoint($2::float8, $3::float8), 4326)";

/// `near;maxDistance==500` in SQL: a bounding-box prefilter in degrees
/// ($4, $5: half-width and half-height) that the GiST index answers, the
/// exact geodesic test on the spheroid, ordered by distance then id.
fn near_sql(columns: &str) -> String {
    format!(
        "SELECT {columns} FROM {TABLE} \
         WHERE type = ANY($1::text[]) \
         AND geom && ST_Expand({SQL_POINT}, $4::float8, $5::float8) \
         AND ST_DWithin(geom::geography, {SQL_POINT}::geography, {NEAR_M}) \
         ORDER BY ST_Distance(geom::geography, {SQL_POINT}::geography), id LIMIT {LIMIT}"
    )
}

/// `within` / `intersects` in SQL ($2: the GeoJSON geometry), ordered by id.
fn relate_sql(function: &str, columns: &str) -> String {
    format!(
        "SELECT {columns} FROM {TABLE} \
         WHERE type = ANY($1::text[]) \
         AND {function}(geom, ST_SetSRID(ST_GeomFromGeoJSON($2::text), 4326)) \
         ORDER BY id LIMIT {LIMIT}"
    )
}

/// Degrees certain to hold `metres` around a point at `lat` (north-south,
/// east-west): below the smallest length of a degree on the ellipsoid
/// (110,574 m of latitude; 111,319 m × cos φ of longitude), with the box's
/// far edge as the latitude.
fn degrees_around(lat: f64, metres: f64) -> (f64, f64) {
    let dlat = metres / 110_000.0;
    let far = (lat.abs() + dlat).min(89.0);
    let dlon = metres / (111_000.0 * far.to_radians().cos());
    (dlon, dlat)
}

fn texts(items: &[&str]) -> Param {
    Param::TextArray(items.iter().map(|s| s.to_string()).collect())
}

fn json_text(v: &Value) -> Result<String, String> {
    serde_json::to_string(v).map_err(|e| format!("cannot serialize a query geometry: {e}"))
}

fn shapes() -> Result<Vec<Shape>, String> {
    let mut rng = SmallRng::seed_from_u64(SEED ^ 0x9E0);

    let mut near = Vec::with_capacity(POSITIONS);
    for _ in 0..POSITIONS {
        let kind = POINT_TYPES[rng.random_range(0..POINT_TYPES.len())];
        let [lon, lat] = coord(random_point(&mut rng, f64::from(NEAR_M)));
        let (dlon, dlat) = degrees_around(lat, f64::from(NEAR_M));
        let coordinates = json_text(&json!([lon, lat]))?;
        near.push(Position::new(
            &[
                ("type", kind.to_string()),
                ("georel", format!("near;maxDistance=={NEAR_M}")),
                ("geometry", "Point".to_string()),
                ("coordinates", coordinates),
            ],
            vec![
                texts(&[kind]),
                Param::Float(lon),
                Param::Float(lat),
                Param::Float(dlon),
                Param::Float(dlat),
            ],
        )?);
    }

    let mut within = Vec::with_capacity(POSITIONS);
    for _ in 0..POSITIONS {
        let kind = POINT_TYPES[rng.random_range(0..POINT_TYPES.len())];
        let (_, ring) = district(&mut rng);
        let coordinates = json_text(&json!([ring]))?;
        let geojson = json_text(&json!({"type": "Polygon", "coordinates": [ring]}))?;
        within.push(Position::new(
            &[
                ("type", kind.to_string()),
                ("georel", "within".to_string()),
                ("geometry", "Polygon".to_string()),
                ("coordinates", coordinates),
            ],
            vec![texts(&[kind]), Param::Text(geojson)],
        )?);
    }

    let mut intersects = Vec::with_capacity(POSITIONS);
    for _ in 0..POSITIONS {
        let line = street(&mut rng);
        let coordinates = json_text(&json!(line))?;
        let geojson = json_text(&json!({"type": "LineString", "coordinates": line}))?;
        intersects.push(Position::new(
            &[
                ("type", POLYGON_TYPES.join(",")),
                ("georel", "intersects".to_string()),
                ("geometry", "LineString".to_string()),
                ("coordinates", coordinates),
            ],
            vec![texts(&POLYGON_TYPES), Param::Text(geojson)],
        )?);
    }

    Ok(vec![
        Shape {
            name: "near",
            about: "near;maxDistance==500 around a point, one point type, by distance",
            sql: near_sql("id, doc"),
            check_sql: near_sql(&format!(
                "id, ST_Distance(geom::geography, {SQL_POINT}::geography)"
            )),
            by_distance: true,
            positions: near,
        },
        Shape {
            name: "within",
            about: "within a district (500 m square or hexagon), one point type, by id",
            sql: relate_sql("ST_Within", "id, doc"),
            check_sql: relate_sql("ST_Within", "id, 0::float8"),
            by_distance: false,
            positions: within,
        },
        Shape {
            name: "intersects",
            about: "intersects a 1 km street of 2 to 4 points, buildings and parks, by id",
            sql: relate_sql("ST_Intersects", "id, doc"),
            check_sql: relate_sql("ST_Intersects", "id, 0::float8"),
            by_distance: false,
            positions: intersects,
        },
    ])
}

// ---------------------------------------------------------------------------
// Measurement

/// The comparison of Borough's and PostGIS's answers for one shape.
#[derive(Default)]
struct Check {
    positions: usize,
    /// Ids compared: the longer answer of each position.
    compared: usize,
    /// Ids in one answer only, plus ids at a different rank (for near: whose
    /// distances do not tie).
    mismatched: usize,
    /// Positions whose answers are empty on both sides.
    empty: usize,
    first_mismatch: Option<String>,
}

impl Check {
    fn fraction(&self) -> f64 {
        if self.compared == 0 {
            0.0
        } else {
            self.mismatched as f64 / self.compared as f64
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "positions": self.positions,
            "ids_compared": self.compared,
            "ids_mismatched": self.mismatched,
            "mismatch_fraction": round_to(self.fraction(), 1e6),
            "empty_answers": self.empty,
            "first_mismatch": self.first_mismatch,
        })
    }
}

/// How PostgreSQL plans one shape.
struct Plan {
    custom: String,
    generic: String,
}

impl Plan {
    fn custom_uses_index(&self) -> bool {
        self.custom.contains(GEOM_INDEX)
    }

    fn generic_uses_index(&self) -> bool {
        self.generic.contains(GEOM_INDEX)
    }
}

/// Everything measured, before the report.
struct Measured {
    upsert: Phase,
    memory_after_load: Option<Memory>,
    restart: Restart,
    memory_after_startup: Option<Memory>,
    pg_load: Phase,
    pg_index_elapsed: Duration,
    plans: Vec<Plan>,
    checks: Vec<Check>,
    runs: Vec<ShapeRun>,
    memory_after_queries: Option<Memory>,
}

pub fn run(opts: &Options) -> Result<(), String> {
    let sizes = if opts.quick { QUICK } else { FULL };
    let info = RunInfo::new("geo", opts.quick);
    eprintln!(
        "generating {} points of {} types and {} polygons of {} types (seed {SEED:#x})",
        sizes.points,
        POINT_TYPES.len(),
        sizes.polygons,
        POLYGON_TYPES.len()
    );
    let data = Dataset::generate(sizes.points, sizes.polygons)?;
    let shapes = shapes()?;

    let runtime = common::load_runtime()?;
    // Fail fast, before loading Borough, if the baseline cannot run.
    let admin = runtime.block_on(geo_pg::admin(&opts.pg))?;

    let mut server = common::start_server()?;
    let result = measure(
        &runtime,
        &mut server,
        &admin,
        &data,
        &shapes,
        &sizes,
        &opts.pg,
    );
    // The table goes, whatever happened; the server child is killed on drop.
    let dropped = runtime.block_on(postgres::drop_table(&admin, TABLE));
    drop(server);
    let measured = result?;
    dropped?;

    let report = Report {
        info,
        sizes: &sizes,
        mean_doc_bytes: data.mean_doc_bytes,
        shapes: &shapes,
        measured,
    };
    publish(&report.table(), &report.to_json(), &opts.out)?;
    for (shape, run) in shapes.iter().zip(&report.measured.runs) {
        run.check_failures(shape.name)?;
    }
    Ok(())
}

/// Loads Borough, restarts it, loads PostGIS, checks every shape on both,
/// then measures them. The caller drops the table.
fn measure(
    runtime: &tokio::runtime::Runtime,
    server: &mut Server,
    admin: &Client,
    data: &Dataset,
    shapes: &[Shape],
    sizes: &Sizes,
    pg: &str,
) -> Result<Measured, String> {
    let entities = sizes.entities();
    let batches = data.batches.clone();
    let upsert = common::upsert(server, "borough upsert", batches, entities, BATCH);
    let upsert = runtime.block_on(upsert)?;

    eprintln!("restart: SIGTERM, then serve again on the same data ({entities} entities)");
    let restart = server.restart(STOP_GRACE, sizes.restart_timeout)?;
    let memory_after_startup = server.memory();
    eprintln!(
        "server stopped in {:.2} s ({}), listening again on http://{} after {:.2} s",
        restart.stop.as_secs_f64(),
        if restart.graceful {
            "graceful"
        } else {
            "killed"
        },
        server.addr(),
        restart.ready.as_secs_f64()
    );

    eprintln!(
        "postgis: inserting {entities} rows, {BATCH} per statement, {UPSERT_WORKERS} connections, then GiST index + ANALYZE"
    );
    let table = geo_pg::table();
    let columns = data.columns.clone();
    let loaded = runtime
        .block_on(postgres::load(
            admin,
            pg,
            &table,
            columns,
            BATCH,
            UPSERT_WORKERS,
        ))
        .map_err(|e| format!("postgis: {e}"))?;
    let pg_load = Phase::entities_written(
        "postgis insert",
        entities,
        "batch",
        loaded.elapsed,
        loaded.latencies_us,
    );

    let mut plans = Vec::with_capacity(shapes.len());
    for shape in shapes {
        let params = shape.positions.first().map_or(&[][..], |p| &p.params[..]);
        let (custom, generic) = runtime
            .block_on(geo_pg::explain(admin, &shape.sql, params))
            .map_err(|e| format!("postgis {}: {e}", shape.name))?;
        let plan = Plan { custom, generic };
        if !plan.custom_uses_index() || !plan.generic_uses_index() {
            eprintln!(
                "warning: postgis {}: the plan does not use {GEOM_INDEX}:\n{}\n(generic:)\n{}",
                shape.name, plan.custom, plan.generic
            );
        }
        plans.push(plan);
    }

    let checks = runtime.block_on(check_shapes(server, admin, shapes))?;

    let mut runs = Vec::with_capacity(shapes.len());
    for (n, shape) in shapes.iter().enumerate() {
        let secs = sizes.duration.as_secs_f64();
        eprintln!(
            "{}: {secs} s at concurrency {CONCURRENCY} each, {} positions",
            shape.name,
            shape.positions.len()
        );
        let seed = SEED ^ ((n as u64) << 8);
        let both = shape.both_systems();
        let run = common::measure_shape(server, pg, both, CONCURRENCY, sizes.duration, seed);
        runs.push(runtime.block_on(run)?);
    }
    Ok(Measured {
        memory_after_load: upsert.memory,
        upsert,
        restart,
        memory_after_startup,
        pg_load,
        pg_index_elapsed: loaded.index_elapsed,
        plans,
        checks,
        runs,
        memory_after_queries: server.memory(),
    })
}

/// The warm-up: the first [`CHECK_POSITIONS`] positions of every shape, on
/// Borough (200 and a JSON array) and on PostGIS. Fails when more than
/// [`MAX_MISMATCH`] of a shape's ids differ, or when a shape answered
/// nothing at all (nothing was checked).
async fn check_shapes(
    server: &mut Server,
    admin: &Client,
    shapes: &[Shape],
) -> Result<Vec<Check>, String> {
    eprintln!(
        "check: {CHECK_POSITIONS} positions of each of {} shapes, Borough against PostGIS",
        shapes.len()
    );
    let mut conn = Conn::open(server.addr()).await?;
    let mut checks = Vec::with_capacity(shapes.len());
    for shape in shapes {
        let mut check = Check::default();
        for p in shape.positions.iter().take(CHECK_POSITIONS) {
            let what = format!("check {} ({})", shape.name, p.display);
            let borough = common::fetch_ids(&mut conn, &p.uri, &what).await?;
            let expected = geo_pg::rows(admin, &shape.check_sql, &p.params, shape.by_distance)
                .await
                .map_err(|e| format!("{what}: postgis: {e}"))?;
            let (compared, mismatched) = compare(&borough, &expected, shape.by_distance);
            check.positions += 1;
            check.compared += compared;
            check.mismatched += mismatched;
            if compared == 0 {
                check.empty += 1;
            }
            if mismatched > 0 && check.first_mismatch.is_none() {
                check.first_mismatch = Some(format!(
                    "{}: {mismatched} of {compared} ids differ (Borough {} ids, PostGIS {})",
                    p.display,
                    borough.len(),
                    expected.len()
                ));
            }
        }
        eprintln!(
            "  {:<10} {} ids compared, {} differ, {} empty answers",
            shape.name, check.compared, check.mismatched, check.empty
        );
        if check.compared == 0 {
            return Err(format!(
                "check {}: Borough and PostGIS answered nothing at all {} positions; nothing was compared",
                shape.name, check.positions
            ));
        }
        if check.fraction() > MAX_MISMATCH {
            return Err(format!(
                "check {}: {} of {} ids ({:.2} %) differ between Borough and PostGIS (at most {:.0} % allowed); first: {}",
                shape.name,
                check.mismatched,
                check.compared,
                check.fraction() * 100.0,
                MAX_MISMATCH * 100.0,
                check.first_mismatch.as_deref().unwrap_or("(no detail)")
            ));
        }
        checks.push(check);
    }
    server.check_alive()?;
    Ok(checks)
}

/// `(compared, mismatched)` of one position: the ids of one answer only,
/// plus the ids found in both at a different rank. For answers ordered by
/// distance, a different rank is a mismatch only when the PostGIS distances
/// of the two ids at that rank do not tie.
fn compare(borough: &[String], postgis: &[(String, f64)], by_distance: bool) -> (usize, usize) {
    let compared = borough.len().max(postgis.len());
    let in_pg: HashMap<&str, f64> = postgis.iter().map(|(id, d)| (id.as_str(), *d)).collect();
    let in_borough: HashSet<&str> = borough.iter().map(String::as_str).collect();
    let only_borough = borough
        .iter()
        .filter(|id| !in_pg.contains_key(id.as_str()))
        .count();
    let only_pg = postgis
        .iter()
        .filter(|(id, _)| !in_borough.contains(id.as_str()))
        .count();
    let common_b = borough
        .iter()
        .map(String::as_str)
        .filter(|id| in_pg.contains_key(id));
    let common_p = postgis
        .iter()
        .map(|(id, _)| id.as_str())
        .filter(|id| in_borough.contains(id));
    let reordered = common_b
        .zip(common_p)
        .filter(|(b, p)| {
            b != p
                && !(by_distance
                    && match (in_pg.get(b), in_pg.get(p)) {
                        (Some(db), Some(dp)) => (db - dp).abs() <= TIE_M,
                        _ => false,
                    })
        })
        .count();
    (compared, only_borough + only_pg + reordered)
}

// ---------------------------------------------------------------------------
// Report

struct Report<'a> {
    info: RunInfo,
    sizes: &'a Sizes,
    mean_doc_bytes: f64,
    shapes: &'a [Shape],
    measured: Measured,
}

impl Report<'_> {
    fn targets(&self) -> Vec<Target> {
        let m = &self.measured;
        let mut targets = Vec::new();
        if let Some(run) = self
            .shapes
            .iter()
            .zip(&m.runs)
            .find_map(|(s, r)| (s.name == "near").then_some(r))
        {
            let p99 = ms(run.borough.latency.p99_us as f64);
            targets.push(Target::latency_below("near p99", p99, TARGET_NEAR_P99_MS));
        }
        for (shape, run) in self.shapes.iter().zip(&m.runs) {
            targets.push(Target::new(
                format!("{} ÷ postgis", shape.name),
                run.rps_vs_baseline(),
                format!("{:.2}x req/s", run.rps_vs_baseline()),
                Bound::AtLeast(TARGET_VS_PG),
                format!("≥ {TARGET_VS_PG:.1}x req/s"),
            ));
        }
        let startup = m.restart.ready.as_secs_f64();
        targets.push(Target::new(
            "startup",
            startup,
            format!("{startup:.2} s"),
            Bound::Below(TARGET_STARTUP_S),
            format!("< {TARGET_STARTUP_S} s"),
        ));
        targets
    }

    fn table(&self) -> String {
        let m = &self.measured;
        let mut out = format!(
            "{}{} points ({}) + {} polygons ({}), \
             lon {}..{} lat {}..{}; batches of {BATCH}, {UPSERT_WORKERS} upsert workers; \
             each shape {} s at concurrency {CONCURRENCY}, limit={LIMIT}\n\n",
            self.info.title(),
            thousands(self.sizes.points as f64),
            POINT_TYPES.join("/"),
            thousands(self.sizes.polygons as f64),
            POLYGON_TYPES.join("/"),
            LON.0,
            LON.1,
            LAT.0,
            LAT.1,
            self.sizes.duration.as_secs(),
        );
        out.push_str(&phase_table([&m.upsert, &m.pg_load]));
        out.push_str(&format!(
            "  (postgis GiST index + ANALYZE: {:.2} s)\n\n",
            m.pg_index_elapsed.as_secs_f64()
        ));
        out.push_str(&format!(
            "startup with {} entities: {:.2} s from spawn to 'listening' (stop: {:.2} s, {}); \
             server RSS / peak: {} after loading, {} after startup, {} after the queries\n\n",
            thousands(self.sizes.entities() as f64),
            m.restart.ready.as_secs_f64(),
            m.restart.stop.as_secs_f64(),
            if m.restart.graceful {
                "graceful"
            } else {
                "killed"
            },
            memory_text(m.memory_after_load),
            memory_text(m.memory_after_startup),
            memory_text(m.memory_after_queries),
        ));
        let ratio_headings = format!("{:>11}", "÷ pg req/s");
        let rows = self.shapes.iter().zip(&m.runs).map(|(shape, run)| {
            let ratios = format!("{:>11}", format!("{:.2}x", run.rps_vs_baseline()));
            (shape.name, run, ratios)
        });
        out.push_str(&shape_table(9, &ratio_headings, rows));
        out.push_str(&format!(
            "\nchecks ({CHECK_POSITIONS} positions per shape, Borough against PostGIS) and PostGIS plans\n"
        ));
        for ((shape, check), plan) in self.shapes.iter().zip(&m.checks).zip(&m.plans) {
            let index = |used: bool| if used { "index" } else { "NO INDEX" };
            out.push_str(&format!(
                "  {:<12} {:>6} ids compared, {:>4} differ ({:.2} %), {:>2} empty   plan: {} (custom), {} (generic)\n",
                shape.name,
                thousands(check.compared as f64),
                check.mismatched,
                check.fraction() * 100.0,
                check.empty,
                index(plan.custom_uses_index()),
                index(plan.generic_uses_index()),
            ));
        }
        out.push_str(&format!(
            "\nqueries (each rotates through {POSITIONS} positions; first one shown)\n"
        ));
        for shape in self.shapes {
            out.push_str(&format!(
                "  {:<12} {}\n",
                shape.name,
                shape.positions.first().map_or("", |p| p.display.as_str())
            ));
        }
        out.push('\n');
        let note = format!(
            "(the targets apply at {} points; \"÷ postgis\" is Borough req/s ÷ PostGIS req/s)\n",
            thousands(TARGET_POINTS as f64)
        );
        out.push_str(&self.info.targets_section(&self.targets(), &note));
        out
    }

    fn to_json(&self) -> Value {
        let m = &self.measured;
        let shapes: serde_json::Map<String, Value> = self
            .shapes
            .iter()
            .zip(&m.runs)
            .zip(m.checks.iter().zip(&m.plans))
            .map(|((shape, run), (check, plan))| {
                let examples: Vec<Value> = shape
                    .positions
                    .iter()
                    .take(3)
                    .map(|p| json!({"query": p.display, "uri": p.uri.to_string()}))
                    .collect();
                let value = json!({
                    "about": shape.about,
                    "positions": shape.positions.len(),
                    "examples": examples,
                    "sql": shape.sql,
                    "borough": run.borough.to_json(),
                    "postgis": run.baseline.to_json(),
                    "ratios": {"rps_vs_postgis": round_to(run.rps_vs_baseline(), 1e3)},
                    "check": check.to_json(),
                    "postgis_plan": {
                        "custom_uses_gist": plan.custom_uses_index(),
                        "generic_uses_gist": plan.generic_uses_index(),
                        "custom": plan.custom,
                        "generic": plan.generic,
                    },
                });
                (shape.name.to_string(), value)
            })
            .collect();
        self.info.json(json!({
            "config": {
                "seed": SEED,
                "points": self.sizes.points,
                "point_types": POINT_TYPES,
                "polygons": self.sizes.polygons,
                "polygon_types": POLYGON_TYPES,
                "polygon_sides_m": [AREA_SIDE_M.0, AREA_SIDE_M.1],
                "area": {"lon": [LON.0, LON.1], "lat": [LAT.0, LAT.1]},
                "batch": BATCH,
                "upsert_workers": UPSERT_WORKERS,
                "duration_s": self.sizes.duration.as_secs_f64(),
                "concurrency": CONCURRENCY,
                "limit": LIMIT,
                "positions_per_shape": POSITIONS,
                "check_positions_per_shape": CHECK_POSITIONS,
                "near_max_distance_m": NEAR_M,
                "district_m": DISTRICT_M,
                "street_m": STREET_M,
                "mean_entity_bytes": round_to(self.mean_doc_bytes, 10.0),
                "postgis_table": format!(
                    "{TABLE} (id text COLLATE \"C\" PRIMARY KEY, type text, \
                     geom geometry(Geometry, 4326), doc jsonb), GiST (geom)"
                ),
            },
            "load": {
                "entities": self.sizes.entities(),
                "borough": m.upsert.to_json(),
                "postgis": m.pg_load.to_json(),
                "postgis_index_s": round_to(m.pg_index_elapsed.as_secs_f64(), 1e3),
            },
            "startup": {
                "entities": self.sizes.entities(),
                "ready_s": round_to(m.restart.ready.as_secs_f64(), 1e3),
                "stop_s": round_to(m.restart.stop.as_secs_f64(), 1e3),
                "graceful_stop": m.restart.graceful,
                "server_memory_after_startup": memory_json(m.memory_after_startup),
            },
            "server_memory_after_load": memory_json(m.memory_after_load),
            "server_memory_after_queries": memory_json(m.memory_after_queries),
            "shapes": shapes,
            "targets": targets_json(&self.targets()),
            "targets_apply_at_points": TARGET_POINTS,
        }))
    }
}
