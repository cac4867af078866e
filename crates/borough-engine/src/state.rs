//! One tenant's committed state in memory: entities ordered by id, and the
//! indexes the query planner uses (by type, by attribute, by attribute value).
//! Everything here is derived from the redb file and rebuilt at open.

use borough_core::entity::{AttrKind, Attribute, Entity};
use borough_core::query::EntityQuery;
use borough_core::query::expr::BoolExpr;
use borough_core::query::geo::{Envelope, envelope, metres_at_least};
use borough_core::query::q::{Lit, Op, QExpr, QTerm, QValue};
use borough_store::QueryPage;
use rstar::{AABB, PointDistance, RTree, RTreeObject};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

type Id = Arc<str>;
type IdSet = BTreeSet<Id>;

/// An attribute value as the value index orders it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum IndexKey {
    Bool(bool),
    Num(OrderedF64),
    Str(Box<str>),
}

#[derive(Clone, Copy, Debug)]
struct OrderedF64(f64);

impl PartialEq for OrderedF64 {
    fn eq(&self, other: &Self) -> bool {
        self.0.total_cmp(&other.0).is_eq()
    }
}
impl Eq for OrderedF64 {}
impl PartialOrd for OrderedF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrderedF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // -0.0 and 0.0 must be one key, as they compare equal in queries.
        let a = if self.0 == 0.0 { 0.0 } else { self.0 };
        let b = if other.0 == 0.0 { 0.0 } else { other.0 };
        a.total_cmp(&b)
    }
}

fn key_of(v: &Value) -> Option<IndexKey> {
    match v {
        Value::Bool(b) => Some(IndexKey::Bool(*b)),
        Value::Number(n) => n.as_f64().map(|f| IndexKey::Num(OrderedF64(f))),
        Value::String(s) => Some(IndexKey::Str(s.as_str().into())),
        _ => None,
    }
}

/// Index keys a literal may equal: a string literal is looked up both as
/// written and expanded (VocabProperty values are stored expanded).
fn keys_of_lit(l: &Lit) -> Vec<IndexKey> {
    match l {
        Lit::Num(n) => vec![IndexKey::Num(OrderedF64(*n))],
        Lit::Bool(b) => vec![IndexKey::Bool(*b)],
        Lit::Str { raw, expanded } => {
            let mut v = vec![IndexKey::Str(raw.as_str().into())];
            if expanded != raw {
                v.push(IndexKey::Str(expanded.as_str().into()));
            }
            v
        }
        // Date-times may be written in several forms: not served from the index.
        Lit::DateTime(_) => Vec::new(),
    }
}

/// One geometry in the spatial index: its bounding box and its entity (held
/// here too, so that nearest-first walks need no lookup by id).
#[derive(Clone, Debug)]
struct GeoEntry {
    envelope: AABB<[f64; 2]>,
    id: Id,
    entity: Arc<Entity>,
}

impl PartialEq for GeoEntry {
    fn eq(&self, other: &Self) -> bool {
        self.envelope == other.envelope && self.id == other.id
    }
}

impl RTreeObject for GeoEntry {
    type Envelope = AABB<[f64; 2]>;
    fn envelope(&self) -> Self::Envelope {
        self.envelope
    }
}

impl PointDistance for GeoEntry {
    /// Distance to the bounding box: a lower bound of the distance to the geometry.
    fn distance_2(&self, point: &[f64; 2]) -> f64 {
        self.envelope.distance_2(point)
    }
}

fn aabb(r: &Envelope) -> AABB<[f64; 2]> {
    AABB::from_corners([r.min().x, r.min().y], [r.max().x, r.max().y])
}

/// Bounding boxes of an attribute's GeoProperty instances.
fn geo_envelopes(
    instances: &[borough_core::Attribute],
) -> impl Iterator<Item = AABB<[f64; 2]>> + '_ {
    instances
        .iter()
        .filter(|a| a.kind == AttrKind::GeoProperty)
        .filter_map(|a| envelope(&a.value))
        .map(|r| aabb(&r))
}

/// The entities that hold one value of an attribute. A sensor's readings
/// are mostly values no other entity holds at that moment: such a value
/// costs one id, not a B-tree of its own (about 200 bytes each).
enum Posting {
    One(Id),
    Many(IdSet),
}

impl Posting {
    fn len(&self) -> usize {
        match self {
            Posting::One(_) => 1,
            Posting::Many(set) => set.len(),
        }
    }

    fn ids(&self) -> impl Iterator<Item = &Id> {
        let (one, many) = match self {
            Posting::One(id) => (Some(id), None),
            Posting::Many(set) => (None, Some(set.iter())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    fn insert(&mut self, id: &Id) {
        match self {
            Posting::One(held) if held == id => {}
            Posting::One(held) => *self = Posting::Many(IdSet::from([held.clone(), id.clone()])),
            Posting::Many(set) => {
                set.insert(id.clone());
            }
        }
    }

    /// Removes `id`; true when no entity holds the value any more.
    fn remove(&mut self, id: &Id) -> bool {
        match self {
            Posting::One(held) => held == id,
            Posting::Many(set) => {
                set.remove(id);
                match set.len() {
                    0 => true,
                    1 => {
                        if let Some(last) = set.pop_first() {
                            *self = Posting::One(last);
                        }
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

#[derive(Default)]
struct AttrIndex {
    /// Entities that have the attribute.
    ids: IdSet,
    /// Scalar values of the attribute's instances (array elements each).
    values: BTreeMap<IndexKey, Posting>,
}

impl AttrIndex {
    fn add_value(&mut self, k: IndexKey, id: &Id) {
        match self.values.get_mut(&k) {
            Some(posting) => posting.insert(id),
            None => {
                self.values.insert(k, Posting::One(id.clone()));
            }
        }
    }

    fn remove_value(&mut self, k: &IndexKey, id: &Id) {
        if let Some(posting) = self.values.get_mut(k)
            && posting.remove(id)
        {
            self.values.remove(k);
        }
    }
}

/// The state of one tenant.
#[derive(Default)]
pub struct TenantState {
    entities: BTreeMap<Id, Arc<Entity>>,
    by_type: HashMap<String, IdSet>,
    by_attr: HashMap<String, AttrIndex>,
    /// R-trees of GeoProperty bounding boxes, by GeoProperty name.
    by_geo: HashMap<String, RTree<GeoEntry>>,
}

/// Builds a tenant's state from stored entities at start-up. The spatial
/// entries are gathered and each R-tree is bulk-loaded at the end: much
/// faster than a million single inserts, and a better-packed tree.
#[derive(Default)]
pub struct TenantLoader {
    state: TenantState,
    geo: HashMap<String, Vec<GeoEntry>>,
}

impl TenantLoader {
    /// Adds a stored entity (each id once).
    pub fn add(&mut self, id: &str, entity: Arc<Entity>) {
        let key: Id = Arc::from(id);
        for t in &entity.types {
            self.state.index_type(&key, t);
        }
        for (name, instances) in &entity.attrs {
            self.state.index_values(&key, name, instances);
            for envelope in geo_envelopes(instances) {
                let entries = match self.geo.get_mut(name.as_str()) {
                    Some(entries) => entries,
                    None => self.geo.entry(name.clone()).or_default(),
                };
                entries.push(GeoEntry {
                    envelope,
                    id: key.clone(),
                    entity: entity.clone(),
                });
            }
        }
        self.state.entities.insert(key, entity);
    }

    pub fn finish(mut self) -> TenantState {
        for (name, entries) in self.geo {
            self.state.by_geo.insert(name, RTree::bulk_load(entries));
        }
        self.state
    }
}

/// Where a plan takes its candidate ids from, in id order.
enum Candidates<'a> {
    All,
    Borrowed(&'a IdSet),
    Owned(Vec<Id>),
    /// Ids that start with a literal prefix (an anchored `idPattern`).
    Prefix(String),
}

impl TenantState {
    pub fn get(&self, id: &str) -> Option<&Arc<Entity>> {
        self.entities.get(id)
    }

    pub fn len(&self) -> usize {
        self.entities.len()
    }

    pub fn entities(&self) -> impl Iterator<Item = &Arc<Entity>> {
        self.entities.values()
    }

    /// Entity counts per type (expanded).
    pub fn type_counts(&self) -> impl Iterator<Item = (&String, usize)> {
        self.by_type.iter().map(|(t, ids)| (t, ids.len()))
    }

    /// Entity counts per attribute (expanded).
    pub fn attribute_counts(&self) -> impl Iterator<Item = (&String, usize)> {
        self.by_attr.iter().map(|(a, idx)| (a, idx.ids.len()))
    }

    /// Visits the entities whose `geoproperty` bounding box intersects `bbox`
    /// ([min_lon, min_lat, max_lon, max_lat]), with that box's centre.
    pub fn within_box(
        &self,
        geoproperty: &str,
        bbox: [f64; 4],
        visit: &mut dyn FnMut(&Arc<Entity>, [f64; 2]) -> bool,
    ) {
        let Some(tree) = self.by_geo.get(geoproperty) else {
            return;
        };
        let search = AABB::from_corners([bbox[0], bbox[1]], [bbox[2], bbox[3]]);
        for entry in tree.locate_in_envelope_intersecting(&search) {
            if !visit(&entry.entity, rstar::Envelope::center(&entry.envelope)) {
                break;
            }
        }
    }

    /// Puts (or with `None`, removes) an entity, keeping every index in step.
    /// An update re-indexes only what changed: a reading of one attribute
    /// leaves the other attributes' entries (the R-tree's above all) alone.
    pub fn put(&mut self, id: &str, entity: Option<Arc<Entity>>) {
        let old = self
            .entities
            .get_key_value(id)
            .map(|(k, v)| (k.clone(), v.clone()));
        match (old, entity) {
            (Some((key, old)), Some(new)) => {
                self.reindex(&key, &old, &new);
                self.entities.insert(key, new);
            }
            (Some((key, old)), None) => {
                self.entities.remove(id);
                self.unindex(&key, &old);
            }
            (None, Some(new)) => {
                let key: Id = Arc::from(id);
                self.index(&key, &new);
                self.entities.insert(key, new);
            }
            (None, None) => {}
        }
    }

    fn index(&mut self, id: &Id, e: &Arc<Entity>) {
        for t in &e.types {
            self.index_type(id, t);
        }
        for (name, instances) in &e.attrs {
            self.index_attr(id, e, name, instances);
        }
    }

    fn unindex(&mut self, id: &Id, e: &Arc<Entity>) {
        for t in &e.types {
            self.unindex_type(id, t);
        }
        for (name, instances) in &e.attrs {
            self.unindex_attr(id, e, name, instances);
        }
    }

    fn reindex(&mut self, id: &Id, old: &Arc<Entity>, new: &Arc<Entity>) {
        if old.types != new.types {
            for t in old.types.iter().filter(|t| !new.types.contains(t)) {
                self.unindex_type(id, t);
            }
            for t in new.types.iter().filter(|t| !old.types.contains(t)) {
                self.index_type(id, t);
            }
        }
        for (name, instances) in &old.attrs {
            match new.attrs.get(name) {
                // Unchanged; only the spatial entries hold the entity itself.
                Some(now) if now == instances => self.retarget_geo(id, name, instances, new),
                Some(now) => self.update_attr(id, old, new, name, instances, now),
                None => self.unindex_attr(id, old, name, instances),
            }
        }
        for (name, instances) in &new.attrs {
            if !old.attrs.contains_key(name) {
                self.index_attr(id, new, name, instances);
            }
        }
    }

    /// Re-indexes an attribute the entity keeps but whose instances changed:
    /// only the values that come or go (a reading that changes its
    /// observedAt alone touches nothing) and, if the geometry moved, the
    /// spatial entries. The set of entities with the attribute is unchanged.
    fn update_attr(
        &mut self,
        id: &Id,
        old: &Arc<Entity>,
        new: &Arc<Entity>,
        name: &str,
        before: &[Attribute],
        after: &[Attribute],
    ) {
        let Some(idx) = self.by_attr.get_mut(name) else {
            self.index_attr(id, new, name, after);
            return;
        };
        let mut gone = Vec::new();
        for_each_key(before, |k| gone.push(k));
        let mut came = Vec::new();
        for_each_key(after, |k| came.push(k));
        for k in gone.iter().filter(|k| !came.contains(k)) {
            idx.remove_value(k, id);
        }
        for k in came.into_iter().filter(|k| !gone.contains(k)) {
            idx.add_value(k, id);
        }
        if geo_envelopes(before).eq(geo_envelopes(after)) {
            self.retarget_geo(id, name, after, new);
        } else {
            self.unindex_geo(id, old, name, before);
            self.index_geo(id, new, name, after);
        }
    }

    fn index_type(&mut self, id: &Id, t: &str) {
        match self.by_type.get_mut(t) {
            Some(set) => {
                set.insert(id.clone());
            }
            None => {
                self.by_type
                    .insert(t.to_string(), IdSet::from([id.clone()]));
            }
        }
    }

    fn unindex_type(&mut self, id: &Id, t: &str) {
        if let Some(set) = self.by_type.get_mut(t) {
            set.remove(id);
            if set.is_empty() {
                self.by_type.remove(t);
            }
        }
    }

    fn index_attr(&mut self, id: &Id, e: &Arc<Entity>, name: &str, instances: &[Attribute]) {
        self.index_values(id, name, instances);
        self.index_geo(id, e, name, instances);
    }

    fn index_geo(&mut self, id: &Id, e: &Arc<Entity>, name: &str, instances: &[Attribute]) {
        for envelope in geo_envelopes(instances) {
            self.by_geo
                .entry(name.to_string())
                .or_default()
                .insert(GeoEntry {
                    envelope,
                    id: id.clone(),
                    entity: e.clone(),
                });
        }
    }

    fn unindex_geo(&mut self, id: &Id, e: &Arc<Entity>, name: &str, instances: &[Attribute]) {
        if let Some(tree) = self.by_geo.get_mut(name) {
            for envelope in geo_envelopes(instances) {
                tree.remove(&GeoEntry {
                    envelope,
                    id: id.clone(),
                    entity: e.clone(),
                });
            }
            if tree.size() == 0 {
                self.by_geo.remove(name);
            }
        }
    }

    /// The attribute and value indexes of an attribute (not the spatial one).
    fn index_values(&mut self, id: &Id, name: &str, instances: &[Attribute]) {
        let idx = match self.by_attr.get_mut(name) {
            Some(idx) => idx,
            None => self.by_attr.entry(name.to_string()).or_default(),
        };
        idx.ids.insert(id.clone());
        for_each_key(instances, |k| idx.add_value(k, id));
    }

    fn unindex_attr(&mut self, id: &Id, e: &Arc<Entity>, name: &str, instances: &[Attribute]) {
        let Some(idx) = self.by_attr.get_mut(name) else {
            return;
        };
        idx.ids.remove(id);
        for_each_key(instances, |k| idx.remove_value(&k, id));
        if idx.ids.is_empty() {
            self.by_attr.remove(name);
        }
        self.unindex_geo(id, e, name, instances);
    }

    /// Points the spatial entries of an unchanged GeoProperty at the entity's new version.
    fn retarget_geo(&mut self, id: &Id, name: &str, instances: &[Attribute], new: &Arc<Entity>) {
        let Some(tree) = self.by_geo.get_mut(name) else {
            return;
        };
        for envelope in geo_envelopes(instances) {
            for entry in tree.locate_in_envelope_mut(&envelope) {
                if entry.id == *id && entry.envelope == envelope {
                    entry.entity = new.clone();
                }
            }
        }
    }

    /// Runs a query: picks the smallest candidate set the indexes offer,
    /// checks every candidate with the reference `EntityQuery::matches`, and
    /// pages in id order.
    pub fn query(&self, q: &EntityQuery, offset: usize, limit: usize, count: bool) -> QueryPage {
        if q.orders_by_distance() {
            return self.query_by_distance(q, offset, limit, count);
        }
        let mut page = QueryPage {
            entities: Vec::with_capacity(limit.min(1024)),
            total: None,
        };
        let mut matched = 0usize;
        let mut visit = |e: &Arc<Entity>| -> bool {
            if !q.matches(e) {
                return true;
            }
            if matched >= offset && page.entities.len() < limit {
                page.entities.push(e.clone());
            }
            matched += 1;
            // Without a count, stop as soon as the page is full.
            count || page.entities.len() < limit
        };
        let need = (!count).then(|| offset.saturating_add(limit));
        self.for_each_candidate(q, need, &mut visit);
        if count {
            page.total = Some(matched);
        }
        page
    }

    /// `near` queries, ordered by distance (then id). A page without a count
    /// walks the R-tree nearest first and stops once nothing further can
    /// enter the page; a count needs every match.
    fn query_by_distance(
        &self,
        q: &EntityQuery,
        offset: usize,
        limit: usize,
        count: bool,
    ) -> QueryPage {
        if !count
            && q.ids.is_empty()
            && let Some(g) = &q.geo
            && let Some(p) = g.near_point()
        {
            let k = offset.saturating_add(limit);
            let best = self.nearest(q, g, p, k);
            return QueryPage {
                total: None,
                entities: best.into_iter().skip(offset).map(|(_, e)| e).collect(),
            };
        }
        let mut hits: Vec<(f64, &Arc<Entity>)> = Vec::new();
        self.for_each_candidate(q, None, |e| {
            if q.matches(e) {
                hits.push((q.distance(e).unwrap_or(f64::INFINITY), e));
            }
            true
        });
        hits.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        QueryPage {
            total: count.then_some(hits.len()),
            entities: hits
                .into_iter()
                .skip(offset)
                .take(limit)
                .map(|(_, e)| e.clone())
                .collect(),
        }
    }

    /// The `k` entities nearest to `p` that match `q`, nearest first (ties by id).
    fn nearest(
        &self,
        q: &EntityQuery,
        g: &borough_core::query::geo::GeoQuery,
        p: borough_core::query::geo::Point<f64>,
        k: usize,
    ) -> Vec<(f64, Arc<Entity>)> {
        let mut best: Vec<(f64, Arc<Entity>)> = Vec::with_capacity(k.min(1024) + 1);
        if k == 0 {
            return best;
        }
        let Some(tree) = self.by_geo.get(&g.geoproperty) else {
            return best;
        };
        let max = g.max_distance();
        let mut seen: std::collections::HashSet<*const Entity> = std::collections::HashSet::new();
        for (entry, d2) in tree.nearest_neighbor_iter_with_distance_2(&[p.x(), p.y()]) {
            // Everything from here on is at least this far away.
            let bound = metres_at_least(p.y(), d2.sqrt());
            if max.is_some_and(|m| bound > m) || (best.len() >= k && best[k - 1].0 < bound) {
                break;
            }
            if !seen.insert(Arc::as_ptr(&entry.entity)) {
                continue;
            }
            let e = &entry.entity;
            if !q.matches_except_geo(e) {
                continue;
            }
            let Some(d) = g.distance(e).filter(|d| g.within_bounds(*d)) else {
                continue;
            };
            let at = best.partition_point(|(bd, be)| {
                bd.total_cmp(&d).then_with(|| be.id.cmp(&e.id)).is_lt()
            });
            if at < k {
                best.insert(at, (d, e.clone()));
                best.truncate(k);
            }
        }
        best
    }

    /// Visits the plan's candidates in id order until `visit` returns false.
    /// `need` is how many matches end the walk (`None`: all of them).
    fn for_each_candidate<'a>(
        &'a self,
        q: &EntityQuery,
        need: Option<usize>,
        mut visit: impl FnMut(&'a Arc<Entity>) -> bool,
    ) {
        match self.plan(q, need) {
            Candidates::Prefix(p) => {
                let from = (Bound::Included(p.as_str()), Bound::Unbounded);
                for (id, e) in self.entities.range::<str, _>(from) {
                    if !id.starts_with(p.as_str()) || !visit(e) {
                        break;
                    }
                }
            }
            Candidates::All => {
                for e in self.entities.values() {
                    if !visit(e) {
                        break;
                    }
                }
            }
            Candidates::Borrowed(ids) => {
                for id in ids {
                    if let Some(e) = self.entities.get(id)
                        && !visit(e)
                    {
                        break;
                    }
                }
            }
            Candidates::Owned(ids) => {
                for id in &ids {
                    if let Some(e) = self.entities.get(id)
                        && !visit(e)
                    {
                        break;
                    }
                }
            }
        }
    }

    /// Chooses where candidates come from. Borrowed sets and prefix ranges
    /// cost nothing to set up; a set that must be built (a range of values,
    /// a union) costs about its size times its log. When only `need` matches
    /// are wanted, walking a larger set in id order and stopping early is
    /// often cheaper: if a predicate keeps a fraction f of all entities, about
    /// need / f candidates are visited. A set of size s is built only when
    /// s < sqrt(need * n / 4), i.e. when building it beats that walk.
    fn plan(&self, q: &EntityQuery, need: Option<usize>) -> Candidates<'_> {
        let empty = || Candidates::Owned(Vec::new());
        if !q.ids.is_empty() {
            let mut ids: Vec<Id> = q
                .ids
                .iter()
                .filter_map(|i| {
                    self.entities
                        .get_key_value(i.as_str())
                        .map(|(k, _)| k.clone())
                })
                .collect();
            ids.sort();
            ids.dedup();
            return Candidates::Owned(ids);
        }
        let mut best: Option<(usize, Candidates)> = None;
        if let Some(g) = &q.geo
            && let Some(bbox) = g.search_box()
        {
            let Some(tree) = self.by_geo.get(&g.geoproperty) else {
                return empty();
            };
            let mut ids: Vec<Id> = tree
                .locate_in_envelope_intersecting(&aabb(&bbox))
                .map(|entry| entry.id.clone())
                .collect();
            ids.sort();
            ids.dedup();
            consider(ids.len(), Candidates::Owned(ids), &mut best);
        }
        // The borrowed sets cost nothing to use; owned ones are built only when small.
        if let Some(t) = &q.types {
            match t {
                BoolExpr::Leaf(name) => match self.by_type.get(name) {
                    Some(set) => consider(set.len(), Candidates::Borrowed(set), &mut best),
                    None => return empty(),
                },
                other => {
                    let ids = self.type_ids(other);
                    consider(ids.len(), Candidates::Owned(ids), &mut best);
                }
            }
        }
        if !q.attrs.is_empty() {
            if let [one] = q.attrs.as_slice() {
                match self.by_attr.get(one) {
                    Some(idx) => consider(idx.ids.len(), Candidates::Borrowed(&idx.ids), &mut best),
                    None => return empty(),
                }
            } else {
                let ids = union(
                    q.attrs
                        .iter()
                        .filter_map(|a| self.by_attr.get(a))
                        .flat_map(|i| i.ids.iter()),
                );
                consider(ids.len(), Candidates::Owned(ids), &mut best);
            }
        }
        let n = self.entities.len().max(1);
        if let Some(prefix) = q
            .id_pattern
            .as_ref()
            .and_then(|r| literal_prefix(r.as_str()))
        {
            let limit = best.as_ref().map_or(n, |(s, _)| *s);
            let from = (Bound::Included(prefix.as_str()), Bound::Unbounded);
            let size = self
                .entities
                .range::<str, _>(from)
                .take_while(|(id, _)| id.starts_with(prefix.as_str()))
                .take(limit.saturating_add(1))
                .count();
            consider(size, Candidates::Prefix(prefix), &mut best);
        }
        if let Some(expr) = &q.q {
            let best_size = best.as_ref().map_or(n, |(s, _)| *s);
            let cap = match need {
                Some(need) => best_size.min(need.saturating_mul(n / 4).isqrt().max(need)),
                None => best_size,
            };
            if let Some(c) = self.q_candidates(expr, cap) {
                consider(candidate_len(&c), c, &mut best);
            }
        }
        best.map_or(Candidates::All, |(_, c)| c)
    }

    fn type_ids(&self, t: &BoolExpr<String>) -> Vec<Id> {
        match t {
            BoolExpr::Leaf(name) => self
                .by_type
                .get(name)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default(),
            BoolExpr::Or(xs) => {
                let parts: Vec<Vec<Id>> = xs.iter().map(|x| self.type_ids(x)).collect();
                merge_sorted(parts)
            }
            BoolExpr::And(xs) => {
                let mut parts: Vec<Vec<Id>> = xs.iter().map(|x| self.type_ids(x)).collect();
                parts.sort_by_key(Vec::len);
                let mut it = parts.into_iter();
                let first = it.next().unwrap_or_default();
                let rest: Vec<BTreeSet<Id>> = it.map(|v| v.into_iter().collect()).collect();
                first
                    .into_iter()
                    .filter(|id| rest.iter().all(|s| s.contains(id)))
                    .collect()
            }
        }
    }

    /// Candidates for a `q` expression, if the indexes can bound it; `cap`
    /// is the size of the best plan so far (building a larger set is wasted work).
    fn q_candidates(&self, expr: &QExpr, cap: usize) -> Option<Candidates<'_>> {
        match expr {
            BoolExpr::Leaf(t) => self.term_candidates(t, cap),
            // Any one conjunct bounds the result: take the smallest.
            BoolExpr::And(xs) => {
                let mut best: Option<(usize, Candidates)> = None;
                for x in xs {
                    let limit = best.as_ref().map_or(cap, |(s, _)| (*s).min(cap));
                    if let Some(c) = self.q_candidates(x, limit) {
                        let size = candidate_len(&c);
                        if best.as_ref().is_none_or(|(s, _)| size < *s) {
                            best = Some((size, c));
                        }
                    }
                }
                best.map(|(_, c)| c)
            }
            // Every disjunct must be bounded for the union to be.
            BoolExpr::Or(xs) => {
                let mut parts = Vec::with_capacity(xs.len());
                let mut total = 0usize;
                for x in xs {
                    let c = self.q_candidates(x, cap)?;
                    total = total.saturating_add(candidate_len(&c));
                    if total > cap {
                        return None;
                    }
                    parts.push(match c {
                        Candidates::Borrowed(s) => s.iter().cloned().collect(),
                        Candidates::Owned(v) => v,
                        Candidates::All | Candidates::Prefix(_) => return None,
                    });
                }
                Some(Candidates::Owned(merge_sorted(parts)))
            }
        }
    }

    fn term_candidates(&self, t: &QTerm, cap: usize) -> Option<Candidates<'_>> {
        if t.path.attrs.len() != 1 || t.path.member.is_some() || !t.path.compound.is_empty() {
            return None;
        }
        let name = &t.path.attrs[0];
        let Some(idx) = self.by_attr.get(name) else {
            // No entity has the attribute: only a negation could match.
            return (!t.negated && !matches!(t.cmp, Some((Op::Ne | Op::NotMatch, _))))
                .then(|| Candidates::Owned(Vec::new()));
        };
        let (op, value) = match &t.cmp {
            None if !t.negated => return Some(Candidates::Borrowed(&idx.ids)),
            None => return None,
            Some((op, v)) => (*op, v),
        };
        let sets: Vec<&Posting> = match (op, value) {
            (Op::Eq, QValue::One(l)) => lookup(idx, l),
            (Op::Eq, QValue::List(ls)) => ls.iter().flat_map(|l| lookup(idx, l)).collect(),
            (Op::Eq, QValue::Range(lo, hi)) => {
                range(idx, Bound::Included(lo), Bound::Included(hi))?
            }
            (Op::Gt, QValue::One(l)) => range(idx, Bound::Excluded(l), Bound::Unbounded)?,
            (Op::Ge, QValue::One(l)) => range(idx, Bound::Included(l), Bound::Unbounded)?,
            (Op::Lt, QValue::One(l)) => range(idx, Bound::Unbounded, Bound::Excluded(l))?,
            (Op::Le, QValue::One(l)) => range(idx, Bound::Unbounded, Bound::Included(l))?,
            _ => return None,
        };
        match sets.as_slice() {
            [Posting::Many(set)] => return Some(Candidates::Borrowed(set)),
            [Posting::One(id)] => return Some(Candidates::Owned(vec![id.clone()])),
            _ => {}
        }
        let size: usize = sets.iter().map(|s| s.len()).sum();
        if size > cap {
            return None;
        }
        Some(Candidates::Owned(union(
            sets.into_iter().flat_map(Posting::ids),
        )))
    }
}

/// Keeps `c` if it is smaller than the best plan so far.
fn consider<'a>(size: usize, c: Candidates<'a>, best: &mut Option<(usize, Candidates<'a>)>) {
    if best.as_ref().is_none_or(|(s, _)| size < *s) {
        *best = Some((size, c));
    }
}

fn candidate_len(c: &Candidates) -> usize {
    match c {
        Candidates::All | Candidates::Prefix(_) => usize::MAX,
        Candidates::Borrowed(s) => s.len(),
        Candidates::Owned(v) => v.len(),
    }
}

/// The literal text every id matching an anchored pattern starts with, if the
/// pattern has one (`^urn:ngsi-ld:Streetlight:00` → that text). Conservative:
/// alternation anywhere, or a quantifier on the last literal, shortens or drops it.
fn literal_prefix(pattern: &str) -> Option<String> {
    let body = pattern.strip_prefix('^')?;
    if pattern.contains('|') {
        return None;
    }
    let mut prefix = String::new();
    for c in body.chars() {
        match c {
            '*' | '?' | '{' => {
                prefix.pop();
                break;
            }
            '.' | '[' | ']' | '(' | ')' | '}' | '+' | '^' | '$' | '\\' => break,
            other => prefix.push(other),
        }
    }
    (!prefix.is_empty()).then_some(prefix)
}

/// Sets for an equality literal; an unindexable literal (a date-time) yields
/// nothing, which the caller must not read as "no match": see `range`.
fn lookup<'a>(idx: &'a AttrIndex, l: &Lit) -> Vec<&'a Posting> {
    keys_of_lit(l)
        .iter()
        .filter_map(|k| idx.values.get(k))
        .collect()
}

/// Sets for a range over numbers or strings; `None` when the bounds are not
/// both of one indexable kind (the planner then scans).
fn range<'a>(idx: &'a AttrIndex, lo: Bound<&Lit>, hi: Bound<&Lit>) -> Option<Vec<&'a Posting>> {
    fn single(l: &Lit) -> Option<IndexKey> {
        match l {
            Lit::Num(n) => Some(IndexKey::Num(OrderedF64(*n))),
            Lit::Str { raw, expanded } if raw == expanded || !expanded.contains("://") => {
                Some(IndexKey::Str(raw.as_str().into()))
            }
            _ => None,
        }
    }
    let map = |b: Bound<&Lit>| -> Option<Bound<IndexKey>> {
        Some(match b {
            Bound::Included(l) => Bound::Included(single(l)?),
            Bound::Excluded(l) => Bound::Excluded(single(l)?),
            Bound::Unbounded => Bound::Unbounded,
        })
    };
    let (lo, hi) = (map(lo)?, map(hi)?);
    // Keep a one-sided range within the literal's kind: numbers compare only with numbers.
    let kind_of = |b: &Bound<IndexKey>| match b {
        Bound::Included(k) | Bound::Excluded(k) => Some(std::mem::discriminant(k)),
        Bound::Unbounded => None,
    };
    let kind = kind_of(&lo).or(kind_of(&hi))?;
    if let (Some(a), Some(b)) = (kind_of(&lo), kind_of(&hi))
        && a != b
    {
        return Some(Vec::new());
    }
    if let (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) =
        (&lo, &hi)
        && a > b
    {
        return Some(Vec::new());
    }
    Some(
        idx.values
            .range((lo, hi))
            .filter(|(k, _)| std::mem::discriminant(*k) == kind)
            .map(|(_, s)| s)
            .collect(),
    )
}

/// The ids, sorted and without duplicates.
fn union<'a>(ids: impl Iterator<Item = &'a Id>) -> Vec<Id> {
    let mut out: Vec<Id> = ids.cloned().collect();
    out.sort();
    out.dedup();
    out
}

fn merge_sorted(parts: Vec<Vec<Id>>) -> Vec<Id> {
    let mut out: Vec<Id> = parts.into_iter().flatten().collect();
    out.sort();
    out.dedup();
    out
}

/// The index keys of an attribute's instances: scalar values of Properties and
/// VocabProperties (each element of an array) and Relationship objects.
fn for_each_key(instances: &[borough_core::Attribute], mut f: impl FnMut(IndexKey)) {
    for a in instances {
        match a.kind {
            AttrKind::Property | AttrKind::Relationship | AttrKind::VocabProperty => match &a.value
            {
                Value::Array(items) => items.iter().filter_map(key_of).for_each(&mut f),
                other => {
                    if let Some(k) = key_of(other) {
                        f(k);
                    }
                }
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use borough_core::Context;
    use borough_core::entity::parse_entity;
    use borough_core::query::q::parse_q;

    fn entity(v: serde_json::Value) -> Arc<Entity> {
        Arc::new(parse_entity(&v, &Context::core(), 0).unwrap())
    }

    fn ids(state: &TenantState, q: &str) -> Vec<String> {
        let q = EntityQuery {
            q: Some(parse_q(q, &Context::core()).unwrap()),
            ..Default::default()
        };
        let page = state.query(&q, 0, 100, false);
        page.entities.iter().map(|e| e.id.clone()).collect()
    }

    #[test]
    fn an_update_moves_only_what_changed_and_the_map_shows_the_new_version() {
        let mut state = TenantState::default();
        let point = serde_json::json!({"type": "Point", "coordinates": [2.0, 48.0]});
        state.put(
            "urn:a",
            Some(entity(serde_json::json!({"id": "urn:a", "type": "Spot",
                "speed": 10, "location": {"type": "GeoProperty", "value": point}}))),
        );
        state.put(
            "urn:a",
            Some(entity(
                serde_json::json!({"id": "urn:a", "type": ["Spot", "Lamp"],
                "speed": 20, "flow": 3, "location": {"type": "GeoProperty", "value": point}}),
            )),
        );
        assert_eq!(ids(&state, "speed==20"), ["urn:a"]);
        assert!(ids(&state, "speed==10").is_empty());
        let mut seen = Vec::new();
        state.within_box(
            "https://uri.etsi.org/ngsi-ld/location",
            [1.9, 47.9, 2.1, 48.1],
            &mut |e, _| {
                seen.push(
                    e.attrs["https://uri.etsi.org/ngsi-ld/default-context/speed"][0]
                        .value
                        .clone(),
                );
                true
            },
        );
        assert_eq!(
            seen,
            [serde_json::json!(20)],
            "the map holds the entity's latest version"
        );
        let types: BTreeMap<String, usize> =
            state.type_counts().map(|(t, n)| (t.clone(), n)).collect();
        assert_eq!(types.len(), 2);
        // An attribute gone and a type gone leave no entries behind.
        state.put(
            "urn:a",
            Some(entity(
                serde_json::json!({"id": "urn:a", "type": "Lamp", "speed": 20}),
            )),
        );
        assert_eq!(state.type_counts().count(), 1);
        assert_eq!(state.attribute_counts().count(), 1);
        let mut located = 0;
        state.within_box(
            "https://uri.etsi.org/ngsi-ld/location",
            [-180.0, -90.0, 180.0, 90.0],
            &mut |_, _| {
                located += 1;
                true
            },
        );
        assert_eq!(located, 0);
        state.put("urn:a", None);
        assert_eq!(state.len(), 0);
        assert_eq!(state.attribute_counts().count(), 0);
    }

    fn located_in(state: &TenantState, b: [f64; 4]) -> Vec<String> {
        let mut seen = Vec::new();
        state.within_box("https://uri.etsi.org/ngsi-ld/location", b, &mut |e, _| {
            seen.push(e.id.clone());
            true
        });
        seen
    }

    #[test]
    fn a_changed_attribute_updates_only_the_values_and_places_that_changed() {
        let mut state = TenantState::default();
        let at = |id: &str, tags: serde_json::Value, lon: f64| {
            entity(serde_json::json!({"id": id, "type": "Bin", "tags": tags,
                "location": {"type": "GeoProperty",
                    "value": {"type": "Point", "coordinates": [lon, 48.0]}}}))
        };
        state.put(
            "urn:a",
            Some(at("urn:a", serde_json::json!(["glass", "paper"]), 2.0)),
        );
        state.put(
            "urn:b",
            Some(at("urn:b", serde_json::json!(["paper"]), 2.0)),
        );
        assert_eq!(ids(&state, "tags==\"paper\""), ["urn:a", "urn:b"]);
        // One element goes, one stays, one comes; the bin moves.
        state.put(
            "urn:a",
            Some(at("urn:a", serde_json::json!(["paper", "metal"]), 3.0)),
        );
        assert!(ids(&state, "tags==\"glass\"").is_empty());
        assert_eq!(ids(&state, "tags==\"paper\""), ["urn:a", "urn:b"]);
        assert_eq!(ids(&state, "tags==\"metal\""), ["urn:a"]);
        assert_eq!(located_in(&state, [1.9, 47.9, 2.1, 48.1]), ["urn:b"]);
        assert_eq!(located_in(&state, [2.9, 47.9, 3.1, 48.1]), ["urn:a"]);
        // A value shared by two entities stays indexed for the one that keeps it.
        state.put(
            "urn:b",
            Some(at("urn:b", serde_json::json!(["metal"]), 2.0)),
        );
        assert_eq!(ids(&state, "tags==\"paper\""), ["urn:a"]);
        assert_eq!(ids(&state, "tags==\"metal\""), ["urn:a", "urn:b"]);
        assert_eq!(state.attribute_counts().count(), 2);
    }

    #[test]
    fn literal_prefixes_of_anchored_patterns() {
        assert_eq!(
            literal_prefix("^urn:ngsi-ld:Streetlight:00").as_deref(),
            Some("urn:ngsi-ld:Streetlight:00")
        );
        assert_eq!(
            literal_prefix("^urn:x:0[0-9]+$").as_deref(),
            Some("urn:x:0")
        );
        assert_eq!(
            literal_prefix("^urn:x:12?3").as_deref(),
            Some("urn:x:1"),
            "a quantifier makes the last character optional"
        );
        assert_eq!(literal_prefix("^ab*").as_deref(), Some("a"));
        assert_eq!(literal_prefix("^ab+").as_deref(), Some("ab"));
        assert_eq!(literal_prefix("urn:x"), None, "unanchored");
        assert_eq!(literal_prefix("^a|^b"), None, "alternation");
        assert_eq!(literal_prefix("^(?i)urn"), None);
        assert_eq!(literal_prefix("^\\d"), None);
    }
}
