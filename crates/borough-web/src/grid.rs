//! A pyramid of cluster cells per tenant, kept up to date from the store's
//! change feed, so that a zoomed-out viewport of a large city is answered by
//! summing a few hundred precomputed cells instead of visiting every entity
//! in the box (at 100,000 entities in view that visit took hundreds of ms).
//!
//! Each level (zoom 0..=[`GRID_MAX_ZOOM`]) maps a grid cell (the same cells
//! [`crate::clusters`] uses) to per-type aggregates: count, coordinate sums
//! (for the centroid) and alert counts. An entity is kept by its first type
//! and the centre of its `location`. A tenant's pyramid is built from a scan
//! on its first request, then follows the feed; a receiver that lagged
//! drops every pyramid, to be rebuilt on the next request.

use crate::alerts::{Severity, severity_of};
use crate::clusters::{cell_pixels, project, world_pixels};
use borough_core::Entity;
use borough_core::query::geo::envelope;
use borough_store::EntityStore;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use tokio::sync::{broadcast, watch};

/// Deepest zoom answered from the pyramid; deeper viewports hold few entities
/// and are answered by visiting them.
pub const GRID_MAX_ZOOM: u32 = 17;

#[derive(Clone, Copy)]
struct Rec {
    lon: f64,
    lat: f64,
    ty: u32,
    sev: Option<Severity>,
}

#[derive(Clone, Debug, Default)]
pub struct TypeAgg {
    pub ty: u32,
    pub count: u64,
    pub sum_lon: f64,
    pub sum_lat: f64,
    pub alerts: u64,
    pub critical: u64,
}

type Level = HashMap<(u32, u32), Vec<TypeAgg>>;

#[derive(Default)]
pub struct TenantGrid {
    /// Expanded type names; a record's `ty` indexes here.
    pub types: Vec<String>,
    type_idx: HashMap<String, u32>,
    recs: HashMap<Arc<str>, Rec>,
    levels: Vec<Level>,
}

/// The centre of the first instance of the entity's `location`.
pub fn centre_of(e: &Entity, location: &str) -> Option<[f64; 2]> {
    let r = envelope(&e.attrs.get(location)?.first()?.value)?;
    let (min, max) = (r.min(), r.max());
    Some([(min.x + max.x) / 2.0, (min.y + max.y) / 2.0])
}

pub fn cell_of(lon: f64, lat: f64, zoom: u32) -> (u32, u32) {
    let (x, y) = project(lon, lat, world_pixels(zoom));
    let c = cell_pixels(zoom);
    ((x / c) as u32, (y / c) as u32)
}

impl TenantGrid {
    fn new() -> Self {
        Self {
            levels: (0..=GRID_MAX_ZOOM).map(|_| Level::new()).collect(),
            ..Self::default()
        }
    }

    fn type_index(&mut self, t: &str) -> u32 {
        if let Some(i) = self.type_idx.get(t) {
            return *i;
        }
        let i = self.types.len() as u32;
        self.types.push(t.to_string());
        self.type_idx.insert(t.to_string(), i);
        i
    }

    fn add(&mut self, r: Rec, sign: f64) {
        for (zoom, level) in self.levels.iter_mut().enumerate() {
            let key = cell_of(r.lon, r.lat, zoom as u32);
            let aggs = level.entry(key).or_default();
            let pos = match aggs.iter().position(|a| a.ty == r.ty) {
                Some(p) => p,
                None => {
                    aggs.push(TypeAgg {
                        ty: r.ty,
                        ..TypeAgg::default()
                    });
                    aggs.len() - 1
                }
            };
            let a = &mut aggs[pos];
            let one = |n: &mut u64| {
                if sign > 0.0 {
                    *n += 1;
                } else {
                    *n = n.saturating_sub(1);
                }
            };
            one(&mut a.count);
            a.sum_lon += sign * r.lon;
            a.sum_lat += sign * r.lat;
            if r.sev.is_some() {
                one(&mut a.alerts);
            }
            if r.sev == Some(Severity::Critical) {
                one(&mut a.critical);
            }
            if a.count == 0 {
                aggs.swap_remove(pos);
                if aggs.is_empty() {
                    level.remove(&key);
                }
            }
        }
    }

    /// Puts (or with `None`, removes) an entity; idempotent.
    pub fn put(&mut self, id: &str, e: Option<&Entity>, location: &str) {
        if let Some(old) = self.recs.remove(id) {
            self.add(old, -1.0);
        }
        let Some(e) = e else { return };
        let (Some([lon, lat]), Some(t)) = (centre_of(e, location), e.types.first()) else {
            return;
        };
        if !(-180.0..=180.0).contains(&lon) || !(-90.0..=90.0).contains(&lat) {
            return;
        }
        let rec = Rec {
            lon,
            lat,
            ty: self.type_index(t),
            sev: severity_of(e),
        };
        self.add(rec, 1.0);
        self.recs.insert(Arc::from(id), rec);
    }

    /// Located entities, their extent, and how many are critical / warning.
    pub fn stats(&self) -> (u64, Option<[f64; 4]>, u64, u64) {
        let mut extent: Option<[f64; 4]> = None;
        let (mut critical, mut warning) = (0, 0);
        for r in self.recs.values() {
            let e = extent.get_or_insert([r.lon, r.lat, r.lon, r.lat]);
            e[0] = e[0].min(r.lon);
            e[1] = e[1].min(r.lat);
            e[2] = e[2].max(r.lon);
            e[3] = e[3].max(r.lat);
            match r.sev {
                Some(Severity::Critical) => critical += 1,
                Some(Severity::Warning) => warning += 1,
                None => {}
            }
        }
        (self.recs.len() as u64, extent, critical, warning)
    }

    /// The cells of `zoom` in the (inclusive) cell range, with their aggregates.
    pub fn cells(
        &self,
        zoom: u32,
        (cx0, cy0): (u32, u32),
        (cx1, cy1): (u32, u32),
        visit: &mut dyn FnMut(&[TypeAgg]),
    ) {
        let Some(level) = self.levels.get(zoom as usize) else {
            return;
        };
        let span = (u64::from(cx1 - cx0) + 1) * (u64::from(cy1 - cy0) + 1);
        if span > level.len() as u64 {
            for (k, aggs) in level {
                if (cx0..=cx1).contains(&k.0) && (cy0..=cy1).contains(&k.1) {
                    visit(aggs);
                }
            }
        } else {
            for cx in cx0..=cx1 {
                for cy in cy0..=cy1 {
                    if let Some(aggs) = level.get(&(cx, cy)) {
                        visit(aggs);
                    }
                }
            }
        }
    }
}

/// Every tenant's pyramid, and the task that keeps them up to date.
pub struct GridIndex {
    store: Arc<dyn EntityStore>,
    location: String,
    tenants: RwLock<HashMap<String, Arc<RwLock<TenantGrid>>>>,
}

impl GridIndex {
    /// Creates the index and starts following the change feed (needs a tokio runtime).
    pub fn start(
        store: Arc<dyn EntityStore>,
        location: String,
        stop: Option<watch::Receiver<bool>>,
    ) -> Arc<GridIndex> {
        let rx = store.changes();
        let index = Arc::new(GridIndex {
            store,
            location,
            tenants: RwLock::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&index);
        tokio::spawn(follow(weak, rx, stop));
        index
    }

    /// The tenant's pyramid, built from a scan the first time.
    pub fn tenant(&self, tenant: &str) -> Arc<RwLock<TenantGrid>> {
        if let Some(g) = self
            .tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
        {
            return g.clone();
        }
        // Built under the write lock, so that the feed task applies the changes
        // that arrive meanwhile after the scan, never before it.
        let mut tenants = self.tenants.write().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = tenants.get(tenant) {
            return g.clone();
        }
        let mut grid = TenantGrid::new();
        self.store.scan(tenant, &mut |e| {
            grid.put(&e.id, Some(e), &self.location);
            true
        });
        let g = Arc::new(RwLock::new(grid));
        tenants.insert(tenant.to_string(), g.clone());
        g
    }
}

async fn follow(
    index: std::sync::Weak<GridIndex>,
    mut rx: broadcast::Receiver<borough_store::ChangeBatch>,
    mut stop: Option<watch::Receiver<bool>>,
) {
    loop {
        let stopped = async {
            match &mut stop {
                Some(s) => {
                    let _ = s.wait_for(|v| *v).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let change = tokio::select! {
            r = rx.recv() => r,
            _ = stopped => return,
        };
        let Some(index) = index.upgrade() else { return };
        match change {
            Ok(batch) => {
                let mut current: Option<(&str, Option<Arc<RwLock<TenantGrid>>>)> = None;
                for c in batch.iter() {
                    if current.as_ref().is_none_or(|(t, _)| *t != &*c.tenant) {
                        let grid = index
                            .tenants
                            .read()
                            .unwrap_or_else(|e| e.into_inner())
                            .get(&*c.tenant)
                            .cloned();
                        current = Some((&c.tenant, grid));
                    }
                    if let Some((_, Some(g))) = &current {
                        g.write().unwrap_or_else(|e| e.into_inner()).put(
                            &c.id,
                            c.entity.as_deref(),
                            &index.location,
                        );
                    }
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "cluster index fell behind the change feed; rebuilding"
                );
                index
                    .tenants
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
