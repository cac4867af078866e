//! `borough bench dashboard`: the map's cluster endpoint over a sweep of zoom
//! levels and viewports of a city of 100,000 located entities, against the
//! naive way of filling the same viewport (every located entity of the box
//! through `GET /ngsi-ld/v1/entities?georel=within`, paged by 1,000), and the
//! dashboard's time to first map render in headless Chromium.

use super::common::{self, Options, RunInfo};
use super::load::{Conn, Summary, micros, ms, percent_encode, quote};
use super::report::{Target, publish, ratio, target_table, thousands};
use borough_sim::City;
use bytes::Bytes;
use chrono::{TimeZone, Utc};
use hyper::{Method, StatusCode, Uri};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SEED: u64 = 0xDA5B_0A2D;
const BATCH: usize = 1000;
/// The viewport of the sweep, in screen pixels (a 1600 x 900 map).
const VIEW: (f64, f64) = (1600.0, 900.0);
/// The baseline's page size: the API's largest.
const PAGE: usize = 1000;

struct Sizes {
    entities: usize,
    zooms: std::ops::RangeInclusive<u32>,
    boxes_per_zoom: usize,
    /// Times each viewport is asked of the cluster endpoint.
    repeats: usize,
    /// Viewports per zoom answered the naive way too (paging the whole city
    /// costs seconds per viewport when zoomed out).
    baseline_boxes_per_zoom: usize,
    render_runs: usize,
}

const FULL: Sizes = Sizes {
    entities: 100_000,
    zooms: 12..=19,
    boxes_per_zoom: 8,
    repeats: 10,
    baseline_boxes_per_zoom: 2,
    render_runs: 5,
};

const QUICK: Sizes = Sizes {
    entities: 5_000,
    zooms: 13..=17,
    boxes_per_zoom: 3,
    repeats: 3,
    baseline_boxes_per_zoom: 3,
    render_runs: 1,
};

/// A viewport: its box and zoom.
struct Viewport {
    zoom: u32,
    bbox: [f64; 4],
}

fn world(zoom: u32) -> f64 {
    256.0 * f64::from(1u32 << zoom)
}

fn project(lon: f64, lat: f64, w: f64) -> (f64, f64) {
    let x = (lon + 180.0) / 360.0 * w;
    let l = lat.to_radians();
    let y = (1.0 - (l.tan() + 1.0 / l.cos()).ln() / std::f64::consts::PI) / 2.0 * w;
    (x, y)
}

fn unproject(x: f64, y: f64, w: f64) -> (f64, f64) {
    let lon = x / w * 360.0 - 180.0;
    let n = std::f64::consts::PI * (1.0 - 2.0 * y / w);
    (lon, n.sinh().atan().to_degrees())
}

/// Viewports of the sweep: at every zoom, boxes centred on random points of the city.
fn viewports(city: &City, sizes: &Sizes) -> Vec<Viewport> {
    let (w0, s0, e0, n0) = city.devices.iter().fold(
        (f64::MAX, f64::MAX, f64::MIN, f64::MIN),
        |(w, s, e, n), d| {
            let (x, y) = d.location;
            (w.min(x), s.min(y), e.max(x), n.max(y))
        },
    );
    let mut rng = SmallRng::seed_from_u64(SEED);
    let mut out = Vec::new();
    for zoom in sizes.zooms.clone() {
        for _ in 0..sizes.boxes_per_zoom {
            let (lon, lat) = (rng.random_range(w0..=e0), rng.random_range(s0..=n0));
            let w = world(zoom);
            let (cx, cy) = project(lon, lat, w);
            let (west, north) = unproject(cx - VIEW.0 / 2.0, cy - VIEW.1 / 2.0, w);
            let (east, south) = unproject(cx + VIEW.0 / 2.0, cy + VIEW.1 / 2.0, w);
            // Half a unit of the 7th decimal off the 6-decimal grid the
            // simulator's coordinates sit on: no entity lies on an edge, where
            // `within` (edges out) and a viewport (edges in) would differ.
            let r = |v: f64| (v * 1e6).round() / 1e6 + 5e-8;
            out.push(Viewport {
                zoom,
                bbox: [r(west), r(south), r(east), r(north)],
            });
        }
    }
    out
}

fn cluster_uri(v: &Viewport) -> Result<Uri, String> {
    let b = v.bbox;
    Uri::try_from(format!(
        "/dashboard/api/clusters?bbox={},{},{},{}&zoom={}",
        b[0], b[1], b[2], b[3], v.zoom
    ))
    .map_err(|e| e.to_string())
}

fn within_uri(v: &Viewport, offset: usize) -> Result<Uri, String> {
    let [w, s, e, n] = v.bbox;
    let coords = format!("[[[{w},{s}],[{e},{s}],[{e},{n}],[{w},{n}],[{w},{s}]]]");
    Uri::try_from(format!(
        "/ngsi-ld/v1/entities?georel=within&geometry=Polygon&coordinates={}&options=keyValues&limit={PAGE}&offset={offset}",
        percent_encode(&coords)
    ))
    .map_err(|e| e.to_string())
}

async fn get(conn: &mut Conn, uri: Uri) -> Result<Bytes, String> {
    let (status, body) = conn
        .request_with_timeout(Method::GET, uri.clone(), None, true)
        .await?;
    if status != StatusCode::OK {
        return Err(format!("{uri}: {status}: {}", quote(&body)));
    }
    Ok(body)
}

/// The cluster endpoint: (latencies of every request, entities counted per viewport).
async fn sweep_clusters(
    conn: &mut Conn,
    views: &[Viewport],
    repeats: usize,
) -> Result<(Vec<u64>, Vec<u64>, usize, Vec<[f64; 4]>), String> {
    let mut latencies = Vec::with_capacity(views.len() * repeats);
    let mut boxes = Vec::with_capacity(views.len());
    let mut totals = Vec::with_capacity(views.len());
    let mut largest_body = 0;
    for v in views {
        let uri = cluster_uri(v)?;
        // One untimed request reads the answer; the timed ones follow.
        let body = get(conn, uri.clone()).await?;
        largest_body = largest_body.max(body.len());
        let answer: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        totals.push(answer["total"].as_u64().unwrap_or_default());
        // The box the counts are for: the viewport widened to whole grid cells.
        let b: Vec<f64> = answer["bbox"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        boxes.push(match b[..] {
            [w, s, e, n] => [w, s, e, n],
            _ => v.bbox,
        });
        for _ in 0..repeats {
            let t = Instant::now();
            get(conn, uri.clone()).await?;
            latencies.push(micros(t.elapsed()));
        }
    }
    Ok((latencies, totals, largest_body, boxes))
}

/// The naive way: every located entity of the box, page after page.
async fn sweep_naive(conn: &mut Conn, views: &[Viewport]) -> Result<(Vec<u64>, Vec<u64>), String> {
    let mut latencies = Vec::with_capacity(views.len());
    let mut totals = Vec::with_capacity(views.len());
    for v in views {
        let mut offset = 0;
        let mut elapsed = Duration::ZERO;
        loop {
            let t = Instant::now();
            let body = get(conn, within_uri(v, offset)?).await?;
            elapsed += t.elapsed();
            let n = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|a| a.as_array().map(Vec::len))
                .ok_or_else(|| format!("the baseline answered no array: {}", quote(&body)))?;
            offset += n;
            if n < PAGE {
                break;
            }
        }
        latencies.push(micros(elapsed));
        totals.push(offset as u64);
    }
    Ok((latencies, totals))
}

/// Runs `web/tests/first-render.mjs` against the server; `Err` is a reason to skip.
fn first_render(base: &str, runs: usize) -> Result<Value, String> {
    let web = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../web");
    if !web.join("node_modules/playwright-core").is_dir() {
        return Err(format!(
            "playwright-core is not installed: run `npm ci` in {}",
            web.display()
        ));
    }
    let out = std::process::Command::new("node")
        .arg("tests/first-render.mjs")
        .arg(base)
        .arg("")
        .arg(runs.to_string())
        .current_dir(&web)
        .output()
        .map_err(|e| format!("cannot run node: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "first-render.mjs failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(line.trim())
        .map_err(|e| format!("first-render.mjs printed no JSON ({e}): {line}"))?;
    if let Some(why) = v.get("skipped").and_then(Value::as_str) {
        return Err(why.to_string());
    }
    Ok(v)
}

pub fn run(opts: &Options) -> Result<(), String> {
    let sizes = if opts.quick { QUICK } else { FULL };
    let info = RunInfo::new("dashboard", opts.quick);
    eprintln!(
        "generating a simulated city of {} located entities (seed {SEED:#x})",
        sizes.entities
    );
    let city = City::generate(SEED, sizes.entities);
    let at = Utc
        .timestamp_opt(1_780_000_000, 0)
        .single()
        .ok_or("invalid time")?;
    let docs: Vec<String> = city
        .devices
        .iter()
        .map(|d| d.entity(at).to_string())
        .collect();
    let batches = Arc::new(super::load::json_arrays(&docs, BATCH));
    let views = viewports(&city, &sizes);

    let runtime = common::load_runtime()?;
    let mut server = common::start_server()?;
    let base = format!("http://{}", server.addr());
    let upsert = runtime.block_on(common::upsert(
        &mut server,
        "borough upsert",
        batches,
        sizes.entities,
        BATCH,
    ))?;
    eprintln!(
        "loaded in {:.1} s; sweeping {} viewports of {}x{} px at zoom {}..={}",
        upsert.elapsed.as_secs_f64(),
        views.len(),
        VIEW.0,
        VIEW.1,
        sizes.zooms.start(),
        sizes.zooms.end()
    );
    let addr = server.addr();
    let (clusters, naive) = runtime.block_on(async {
        let mut conn = Conn::open(addr).await?;
        let clusters = sweep_clusters(&mut conn, &views, sizes.repeats).await?;
        eprintln!("baseline: the same viewports through GET /entities?georel=within, paged");
        // The baseline reads the box the clusters answered for.
        let boxes: Vec<Viewport> = views
            .iter()
            .zip(&clusters.3)
            .map(|(v, b)| Viewport {
                zoom: v.zoom,
                bbox: *b,
            })
            .collect();
        let baseline_views: Vec<Viewport> = boxes
            .chunks(sizes.boxes_per_zoom)
            .flat_map(|at_zoom| at_zoom.iter().take(sizes.baseline_boxes_per_zoom))
            .map(|v| Viewport {
                zoom: v.zoom,
                bbox: v.bbox,
            })
            .collect();
        let naive = sweep_naive(&mut conn, &baseline_views).await?;
        Ok::<_, String>((clusters, (naive, baseline_views)))
    })?;
    server.check_alive()?;
    let (mut cluster_lat, cluster_totals, largest_body, _) = clusters;
    let ((mut naive_lat, naive_totals), baseline_views) = naive;
    let baseline_cluster_totals: Vec<u64> = cluster_totals
        .chunks(sizes.boxes_per_zoom)
        .flat_map(|at_zoom| at_zoom.iter().take(sizes.baseline_boxes_per_zoom).copied())
        .collect();
    let mismatches: Vec<String> = baseline_views
        .iter()
        .zip(baseline_cluster_totals.iter().zip(&naive_totals))
        .filter(|(_, (a, b))| a != b)
        .map(|(v, (a, b))| format!("zoom {} {:?}: clusters {a}, within {b}", v.zoom, v.bbox))
        .collect();
    // Views (and so latencies) come zoom by zoom.
    let by_zoom: Vec<(u32, Summary)> = sizes
        .zooms
        .clone()
        .zip(cluster_lat.chunks(sizes.boxes_per_zoom * sizes.repeats))
        .map(|(z, lat)| (z, Summary::of(&mut lat.to_vec())))
        .collect();
    let cluster_sum = Summary::of(&mut cluster_lat);
    let naive_sum = Summary::of(&mut naive_lat);
    let in_view: Vec<u64> = cluster_totals.clone();
    let mean_in_view = in_view.iter().sum::<u64>() as f64 / in_view.len().max(1) as f64;

    eprintln!("time to first map render in headless Chromium");
    let render = first_render(&base, sizes.render_runs);
    drop(server);

    let p99_ratio = ratio(naive_sum.p99_us as f64, cluster_sum.p99_us as f64);
    let mut table = info.title();
    table.push_str(&format!(
        "{} located entities, {} viewports of {}x{} px at zoom {}..={} ({:.0} entities in view on average, at most {}), cluster answers up to {} bytes\n\n",
        thousands(sizes.entities as f64),
        views.len(),
        VIEW.0,
        VIEW.1,
        sizes.zooms.start(),
        sizes.zooms.end(),
        mean_in_view,
        in_view.iter().max().copied().unwrap_or(0),
        thousands(largest_body as f64),
    ));
    table.push_str(&format!(
        "{:<44} {:>8} {:>9} {:>9} {:>9} {:>9}\n",
        "viewport answered by", "samples", "p50 ms", "p95 ms", "p99 ms", "max ms"
    ));
    for (name, s) in [
        ("borough /dashboard/api/clusters", &cluster_sum),
        ("baseline GET /entities georel=within, paged", &naive_sum),
    ] {
        table.push_str(&format!(
            "{name:<44} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>9.2}\n",
            s.count,
            ms(s.p50_us as f64),
            ms(s.p95_us as f64),
            ms(s.p99_us as f64),
            ms(s.max_us as f64)
        ));
    }
    table.push_str(&format!(
        "clusters p99 by zoom: {}\n",
        by_zoom
            .iter()
            .map(|(z, s)| format!("{z}: {:.2} ms", ms(s.p99_us as f64)))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    table.push_str(&format!(
        "p99 ratio (baseline / clusters): {p99_ratio:.1}x  (baseline: {} of the viewports, {} per zoom, each answered once)\n",
        baseline_views.len(),
        sizes.baseline_boxes_per_zoom
    ));
    match &render {
        Ok(v) => table.push_str(&format!(
            "time to first map render in Chromium: median {} ms, max {} ms (runs {})\n",
            v["median_ms"], v["max_ms"], v["runs_ms"]
        )),
        Err(why) => table.push_str(&format!("time to first map render: skipped ({why})\n")),
    }
    if !mismatches.is_empty() {
        table.push_str(&format!(
            "warning: {} viewports counted differently: {}\n",
            mismatches.len(),
            mismatches.join("; ")
        ));
    }
    let mut targets = vec![Target::latency_below(
        "cluster p99",
        ms(cluster_sum.p99_us as f64),
        50.0,
    )];
    if let Ok(v) = &render {
        targets.push(Target::latency_below(
            "first map render (max)",
            v["max_ms"].as_f64().unwrap_or(f64::MAX),
            2000.0,
        ));
    }
    table.push('\n');
    table.push_str(&target_table("targets (from the issue)", &targets));
    if opts.quick || cfg!(debug_assertions) {
        table.push_str("(quick runs and debug builds measure nothing meaningful; targets are informative only)\n");
    }
    let json = info.json(json!({
        "entities": sizes.entities,
        "viewports": views.len(),
        "view_px": [VIEW.0, VIEW.1],
        "zooms": [sizes.zooms.start(), sizes.zooms.end()],
        "mean_entities_in_view": mean_in_view,
        "clusters": cluster_sum.to_json(),
        "clusters_by_zoom": by_zoom.iter().map(|(z, s)| json!({"zoom": z, "latency": s.to_json()})).collect::<Vec<_>>(),
        "baseline_within_paged": naive_sum.to_json(),
        "baseline_viewports": baseline_views.len(),
        "p99_ratio": p99_ratio,
        "first_render": match &render { Ok(v) => v.clone(), Err(why) => json!({"skipped": why}) },
        "count_mismatches": mismatches,
        "targets": targets.iter().map(Target::to_json).collect::<Vec<_>>(),
    }));
    publish(&table, &json, &opts.out)?;
    if !mismatches.is_empty() {
        return Err(format!(
            "{} viewports: the clusters counted other entities than the baseline",
            mismatches.len()
        ));
    }
    Ok(())
}
