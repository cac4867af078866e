//! Server-side clustering: the located entities of a viewport (of the layers,
//! i.e. entity types, that are shown) grouped into a grid of screen cells at
//! the map's zoom, with counts per type, so that the page receives only what
//! it shows (a few hundred clusters, not every entity).

use crate::alerts::{Severity, severity_of, state_of};
use crate::grid::TenantGrid;
use borough_core::{Context, Entity, NgsiError, NgsiResult};
use borough_store::EntityStore;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;

/// Highest zoom the map offers (about 0.3 m per pixel at the equator).
pub const MAX_ZOOM: u32 = 20;
/// Largest viewport accepted, in screen pixels at the asked zoom (bounds the work per request).
pub const MAX_VIEW_PIXELS: f64 = 8192.0 * 8192.0;
/// Most types a request may name.
pub const MAX_TYPES: usize = 64;
/// Mercator's latitude limit.
const MAX_LAT: f64 = 85.051_128_78;

/// The grid cell edge in screen pixels: coarse when zoomed out, fine when zoomed in,
/// so that at street level nearly every entity is its own marker.
pub fn cell_pixels(zoom: u32) -> f64 {
    match zoom {
        0..=15 => 64.0,
        16..=17 => 32.0,
        _ => 8.0,
    }
}

/// A validated request.
#[derive(Debug, Clone)]
pub struct ClusterRequest {
    pub bbox: [f64; 4],
    pub zoom: u32,
    /// Expanded type names to include; `None` for every type.
    pub types: Option<Vec<String>>,
}

/// Parses `bbox=minLon,minLat,maxLon,maxLat`, `zoom` and `types=A,B`.
pub fn parse_request(
    bbox: Option<&str>,
    zoom: Option<&str>,
    types: Option<&str>,
) -> NgsiResult<ClusterRequest> {
    let bbox = bbox.ok_or_else(|| {
        NgsiError::bad_data("bbox is required: minLon,minLat,maxLon,maxLat in degrees")
    })?;
    let parts: Vec<&str> = bbox.split(',').collect();
    if parts.len() != 4 {
        return Err(NgsiError::bad_data(format!(
            "bbox '{}' must be four numbers: minLon,minLat,maxLon,maxLat",
            truncate(bbox)
        )));
    }
    let mut b = [0.0f64; 4];
    for (slot, p) in b.iter_mut().zip(&parts) {
        *slot = p
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| {
                NgsiError::bad_data(format!("bbox value '{}' is not a number", truncate(p)))
            })?;
    }
    if !(-180.0..=180.0).contains(&b[0]) || !(-180.0..=180.0).contains(&b[2]) {
        return Err(NgsiError::bad_data(
            "bbox longitudes must be within -180..180",
        ));
    }
    if !(-90.0..=90.0).contains(&b[1]) || !(-90.0..=90.0).contains(&b[3]) {
        return Err(NgsiError::bad_data("bbox latitudes must be within -90..90"));
    }
    if b[0] > b[2] || b[1] > b[3] {
        return Err(NgsiError::bad_data(
            "bbox must be minLon,minLat,maxLon,maxLat with min <= max",
        ));
    }
    let zoom = zoom.ok_or_else(|| NgsiError::bad_data("zoom is required (0..=20)"))?;
    let zoom = zoom
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|z| *z <= MAX_ZOOM)
        .ok_or_else(|| {
            NgsiError::bad_data(format!(
                "zoom '{}' must be a whole number from 0 to {MAX_ZOOM}",
                truncate(zoom)
            ))
        })?;
    let (w, h) = pixel_size(&b, zoom);
    if w * h > MAX_VIEW_PIXELS {
        return Err(NgsiError::bad_data(format!(
            "bbox is too large for zoom {zoom} ({w:.0} x {h:.0} pixels; at most {MAX_VIEW_PIXELS:.0} in all): zoom out or send the visible box"
        )));
    }
    let types = match types.map(str::trim).filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => {
            let names: Vec<&str> = t.split(',').map(str::trim).collect();
            if names.len() > MAX_TYPES {
                return Err(NgsiError::bad_data(format!(
                    "at most {MAX_TYPES} types may be named"
                )));
            }
            let ctx = Context::core();
            let mut out = Vec::with_capacity(names.len());
            for n in names {
                let valid = !n.is_empty()
                    && n.len() <= 256
                    && n.chars().all(|c| !c.is_control() && !c.is_whitespace());
                if !valid {
                    return Err(NgsiError::bad_data(format!(
                        "type '{}' is not a valid type name",
                        truncate(n)
                    )));
                }
                out.push(ctx.expand(n).into_owned());
            }
            Some(out)
        }
    };
    Ok(ClusterRequest {
        bbox: b,
        zoom,
        types,
    })
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

pub fn world_pixels(zoom: u32) -> f64 {
    256.0 * f64::from(1u32 << zoom)
}

/// Screen position in pixels of the whole world at `zoom` (Web Mercator).
pub fn project(lon: f64, lat: f64, world: f64) -> (f64, f64) {
    let x = (lon + 180.0) / 360.0 * world;
    let lat = lat.clamp(-MAX_LAT, MAX_LAT).to_radians();
    let y = (1.0 - (lat.tan() + 1.0 / lat.cos()).ln() / std::f64::consts::PI) / 2.0 * world;
    (x, y)
}

/// The longitude and latitude of a point in pixels of the whole world.
pub fn unproject(x: f64, y: f64, world: f64) -> (f64, f64) {
    let lon = x / world * 360.0 - 180.0;
    let n = std::f64::consts::PI * (1.0 - 2.0 * y / world);
    (lon, n.sinh().atan().to_degrees())
}

fn pixel_size(b: &[f64; 4], zoom: u32) -> (f64, f64) {
    let world = world_pixels(zoom);
    let (x0, y0) = project(b[0], b[3], world);
    let (x1, y1) = project(b[2], b[1], world);
    ((x1 - x0).abs(), (y1 - y0).abs())
}

#[derive(Debug, Serialize, PartialEq)]
pub struct TypeCount {
    #[serde(rename = "type")]
    pub entity_type: String,
    pub count: u64,
}

/// Two or more entities of one grid cell, with how many of each type.
#[derive(Debug, Serialize, PartialEq)]
pub struct Cluster {
    pub lon: f64,
    pub lat: f64,
    pub count: u64,
    /// Entities of the cluster in an alert state.
    pub alerts: u64,
    /// Of those, in a critical one.
    pub critical: u64,
    /// Counts per type, largest first.
    pub types: Vec<TypeCount>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Marker {
    pub id: String,
    #[serde(rename = "type")]
    pub entity_type: String,
    pub lon: f64,
    pub lat: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert: Option<Severity>,
}

#[derive(Debug, Serialize)]
pub struct ClusterResponse {
    pub zoom: u32,
    pub bbox: [f64; 4],
    #[serde(rename = "cellPixels")]
    pub cell_pixels: f64,
    /// Located entities in the box (of the asked types).
    pub total: u64,
    pub alerts: u64,
    /// Groups of two or more entities.
    pub clusters: Vec<Cluster>,
    /// Entities alone in their cell.
    pub markers: Vec<Marker>,
}

struct Cell {
    count: u64,
    /// Count per layer (index into the request's types).
    per_layer: Vec<u64>,
    sum_x: f64,
    sum_y: f64,
    alerts: u64,
    critical: u64,
    first: Option<(Arc<Entity>, [f64; 2])>,
}

/// Clusters the tenant's located entities of the box. Unknown types are the
/// caller's to reject (see [`unknown_types`]).
pub fn cluster(
    store: &dyn EntityStore,
    tenant: &str,
    location: &str,
    req: &ClusterRequest,
) -> ClusterResponse {
    let ctx = Context::core();
    // The types shown, as (expanded, compact); the index is the layer.
    let layers: Vec<(String, String)> = match &req.types {
        Some(t) => t.clone(),
        None => store
            .type_counts(tenant)
            .into_iter()
            .map(|(t, _)| t)
            .collect(),
    }
    .into_iter()
    .map(|t| {
        let short = ctx.compact(&t).into_owned();
        (t, short)
    })
    .collect();
    let layer_of: HashMap<&str, u32> = layers
        .iter()
        .enumerate()
        .map(|(i, (t, _))| (t.as_str(), i as u32))
        .collect();
    let world = world_pixels(req.zoom);
    let cell = cell_pixels(req.zoom);
    let mut cells: HashMap<(u32, u32), Cell> = HashMap::new();
    let mut total = 0u64;
    let mut alerts = 0u64;
    store.within_box(tenant, location, req.bbox, &mut |e, [lon, lat]| {
        // An entity belongs to the layer of its first type.
        let Some(layer) = e.types.first().and_then(|t| layer_of.get(t.as_str())) else {
            return true;
        };
        // The visit is by bounding box; points on the edge are in, outside are out.
        if lon < req.bbox[0] || lon > req.bbox[2] || lat < req.bbox[1] || lat > req.bbox[3] {
            return true;
        }
        let (x, y) = project(lon, lat, world);
        let key = ((x / cell) as u32, (y / cell) as u32);
        let severity = severity_of(e);
        total += 1;
        let c = cells.entry(key).or_insert_with(|| Cell {
            count: 0,
            per_layer: vec![0; layers.len()],
            sum_x: 0.0,
            sum_y: 0.0,
            alerts: 0,
            critical: 0,
            first: None,
        });
        if c.count == 0 {
            c.first = Some((e.clone(), [lon, lat]));
        }
        c.count += 1;
        c.per_layer[*layer as usize] += 1;
        c.sum_x += lon;
        c.sum_y += lat;
        if let Some(s) = severity {
            alerts += 1;
            c.alerts += 1;
            if s == Severity::Critical {
                c.critical += 1;
            }
        }
        true
    });
    let mut clusters = Vec::new();
    let mut markers = Vec::new();
    for c in cells.into_values() {
        match c.first {
            Some((e, [lon, lat])) if c.count == 1 => {
                let layer = c.per_layer.iter().position(|n| *n > 0).unwrap_or_default();
                markers.push(Marker {
                    id: e.id.clone(),
                    entity_type: layers.get(layer).map(|l| l.1.clone()).unwrap_or_default(),
                    lon,
                    lat,
                    state: state_of(&e).map(str::to_string),
                    alert: severity_of(&e),
                })
            }
            _ => {
                let mut types: Vec<TypeCount> = c
                    .per_layer
                    .iter()
                    .zip(&layers)
                    .filter(|(n, _)| **n > 0)
                    .map(|(n, (_, short))| TypeCount {
                        entity_type: short.clone(),
                        count: *n,
                    })
                    .collect();
                types.sort_by(|a, b| {
                    b.count
                        .cmp(&a.count)
                        .then(a.entity_type.cmp(&b.entity_type))
                });
                clusters.push(Cluster {
                    lon: c.sum_x / c.count as f64,
                    lat: c.sum_y / c.count as f64,
                    count: c.count,
                    alerts: c.alerts,
                    critical: c.critical,
                    types,
                })
            }
        }
    }
    ClusterResponse {
        zoom: req.zoom,
        bbox: req.bbox,
        cell_pixels: cell,
        total,
        alerts,
        clusters,
        markers,
    }
}

/// Clusters from the tenant's pyramid (zoom up to [`GRID_MAX_ZOOM`]): the
/// cells that meet the box, whole, so the answer covers the box widened to
/// cell edges (its `bbox`). Clusters do not change while the map pans by less
/// than a cell, and every count is exact for that box.
pub fn cluster_from_grid(
    store: &dyn EntityStore,
    tenant: &str,
    location: &str,
    req: &ClusterRequest,
    grid: &std::sync::RwLock<TenantGrid>,
) -> ClusterResponse {
    let ctx = Context::core();
    let world = world_pixels(req.zoom);
    let cell = cell_pixels(req.zoom);
    let b = req.bbox;
    let (x0, y0) = project(b[0], b[3], world);
    let (x1, y1) = project(b[2], b[1], world);
    let last = (world / cell) as u32 - 1;
    let c0 = (
        ((x0 / cell) as u32).min(last),
        ((y0 / cell) as u32).min(last),
    );
    let c1 = (
        ((x1 / cell) as u32).min(last),
        ((y1 / cell) as u32).min(last),
    );
    let mut clusters = Vec::new();
    let mut singles: Vec<(String, [f64; 2])> = Vec::new();
    let (mut total, mut alerts) = (0u64, 0u64);
    {
        let g = grid.read().unwrap_or_else(|e| e.into_inner());
        let shown: Vec<bool> = g
            .types
            .iter()
            .map(|t| req.types.as_ref().is_none_or(|s| s.contains(t)))
            .collect();
        g.cells(req.zoom, c0, c1, &mut |aggs| {
            let mut c = Cluster {
                lon: 0.0,
                lat: 0.0,
                count: 0,
                alerts: 0,
                critical: 0,
                types: Vec::new(),
            };
            for a in aggs {
                if !shown.get(a.ty as usize).copied().unwrap_or(false) {
                    continue;
                }
                c.count += a.count;
                c.lon += a.sum_lon;
                c.lat += a.sum_lat;
                c.alerts += a.alerts;
                c.critical += a.critical;
                c.types.push(TypeCount {
                    entity_type: g.types[a.ty as usize].clone(),
                    count: a.count,
                });
            }
            if c.count == 0 {
                return;
            }
            total += c.count;
            alerts += c.alerts;
            c.lon /= c.count as f64;
            c.lat /= c.count as f64;
            if c.count == 1 {
                singles.push((c.types[0].entity_type.clone(), [c.lon, c.lat]));
            } else {
                for t in &mut c.types {
                    t.entity_type = ctx.compact(&t.entity_type).into_owned();
                }
                c.types.sort_by(|a, b| {
                    b.count
                        .cmp(&a.count)
                        .then(a.entity_type.cmp(&b.entity_type))
                });
                clusters.push(c);
            }
        });
    }
    // A cell of one entity is sent as that entity: find it in the cell.
    let mut markers = Vec::with_capacity(singles.len());
    for (t, [lon, lat]) in singles {
        let eps = 1e-9;
        let mut found: Option<Arc<Entity>> = None;
        store.within_box(
            tenant,
            location,
            [lon - eps, lat - eps, lon + eps, lat + eps],
            &mut |e, _| {
                if e.types.first() == Some(&t) {
                    found = Some(e.clone());
                    false
                } else {
                    true
                }
            },
        );
        let entity_type = ctx.compact(&t).into_owned();
        match found {
            Some(e) => markers.push(Marker {
                id: e.id.clone(),
                entity_type,
                lon,
                lat,
                state: state_of(&e).map(str::to_string),
                alert: severity_of(&e),
            }),
            // The pyramid is a moment ahead of or behind the store: a cluster of one.
            None => clusters.push(Cluster {
                lon,
                lat,
                count: 1,
                alerts: 0,
                critical: 0,
                types: vec![TypeCount {
                    entity_type,
                    count: 1,
                }],
            }),
        }
    }
    let (west, north) = unproject(f64::from(c0.0) * cell, f64::from(c0.1) * cell, world);
    let (east, south) = unproject(
        f64::from(c1.0 + 1) * cell,
        f64::from(c1.1 + 1) * cell,
        world,
    );
    ClusterResponse {
        zoom: req.zoom,
        bbox: [west, south.max(-90.0), east.min(180.0), north],
        cell_pixels: cell,
        total,
        alerts,
        clusters,
        markers,
    }
}

/// The asked types the tenant has no entity of (compact names), for a 400.
pub fn unknown_types(store: &dyn EntityStore, tenant: &str, req: &ClusterRequest) -> Vec<String> {
    let Some(asked) = &req.types else {
        return Vec::new();
    };
    let known: Vec<String> = store
        .type_counts(tenant)
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    let ctx = Context::core();
    asked
        .iter()
        .filter(|t| !known.contains(t))
        .map(|t| ctx.compact(t).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_bbox_and_zoom() {
        let ok = parse_request(Some("2.2,48.8,2.4,48.9"), Some("13"), Some("Streetlight"));
        assert!(ok.is_ok());
        for (bbox, zoom) in [
            (None, Some("3")),
            (Some("1,2,3"), Some("3")),
            (Some("a,2,3,4"), Some("3")),
            (Some("3,2,1,4"), Some("3")),
            (Some("-200,2,3,4"), Some("3")),
            (Some("1,-95,3,4"), Some("3")),
            (Some("NaN,2,3,4"), Some("3")),
            (Some("1,2,3,4"), None),
            (Some("1,2,3,4"), Some("21")),
            (Some("1,2,3,4"), Some("2.5")),
            (Some("-180,-85,180,85"), Some("16")),
        ] {
            let r = parse_request(bbox, zoom, None);
            assert!(r.is_err(), "{bbox:?} {zoom:?} must be refused");
        }
    }

    #[test]
    fn projection_is_web_mercator() {
        let (x, y) = project(0.0, 0.0, 256.0);
        assert!((x - 128.0).abs() < 1e-9 && (y - 128.0).abs() < 1e-9);
        let (_, top) = project(0.0, MAX_LAT, 256.0);
        assert!(top.abs() < 1e-6);
    }
}
