//! Linked entity retrieval (clause 4.5.23, `join` and `joinLevel`): the
//! entities a Relationship points to, fetched with the entities asked for.
//! `join=flat` answers them as more entities of the list; `join=inline` puts
//! each into the Relationship that names it, as its `entity` member
//! (`entityList` for a ListRelationship; in keyValues the entity replaces the
//! object).

use borough_core::entity::{AttrKind, Entity};
use borough_core::render::render_entity;
use borough_core::{Context, Format, NgsiError, NgsiResult, RenderOptions};
use borough_store::EntityStore;
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::sync::Arc;

/// Deepest `joinLevel` accepted.
pub const MAX_JOIN_LEVEL: usize = 5;
/// Most linked entities added to one answer.
pub const MAX_LINKED: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinMode {
    Flat,
    Inline,
}

/// A `join` request: how, and how many links deep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Join {
    pub mode: JoinMode,
    pub level: usize,
}

/// The `join` and `joinLevel` parameters; `None` when no join is asked for.
pub fn join_param(params: &std::collections::HashMap<String, String>) -> NgsiResult<Option<Join>> {
    let mode = match params.get("join").map(String::as_str) {
        None => {
            if params.contains_key("joinLevel") {
                return Err(NgsiError::bad_data(
                    "joinLevel needs join=flat or join=inline",
                ));
            }
            return Ok(None);
        }
        Some("flat") => JoinMode::Flat,
        Some("inline") => JoinMode::Inline,
        Some("@none") => return Ok(None),
        Some(other) => {
            return Err(NgsiError::invalid(format!(
                "unknown join '{other}'; use flat, inline or @none"
            )));
        }
    };
    let level = match params.get("joinLevel") {
        None => 1,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_JOIN_LEVEL).contains(&n) => n,
            _ => {
                return Err(NgsiError::bad_data(format!(
                    "joinLevel must be a whole number from 1 to {MAX_JOIN_LEVEL}, not '{v}'"
                )));
            }
        },
    };
    Ok(Some(Join { mode, level }))
}

/// The entity ids each shown Relationship instance of `e` points to.
fn links(e: &Entity, opts: &RenderOptions) -> Vec<String> {
    let mut out = Vec::new();
    for (name, instances) in &e.attrs {
        if !opts.wants(name) {
            continue;
        }
        for a in instances.iter().filter(|a| opts.wants_instance(a)) {
            object_ids(a.kind, &a.value, &mut out);
        }
    }
    out
}

fn object_ids(kind: AttrKind, value: &Value, out: &mut Vec<String>) {
    match (kind, value) {
        (AttrKind::Relationship, Value::String(s)) => out.push(s.clone()),
        (AttrKind::Relationship, Value::Array(a)) => {
            out.extend(a.iter().filter_map(Value::as_str).map(str::to_string))
        }
        (AttrKind::ListRelationship, Value::Array(items)) => {
            for item in items {
                let id = match item {
                    Value::String(s) => Some(s.as_str()),
                    Value::Object(o) => o.get("object").and_then(Value::as_str),
                    _ => None,
                };
                out.extend(id.map(str::to_string));
            }
        }
        _ => {}
    }
}

/// `join=flat`: the entities linked from `roots`, up to `level` links away,
/// each once and none of the roots, in the order they were reached.
pub fn linked_entities(
    store: &dyn EntityStore,
    tenant: &str,
    roots: &[Arc<Entity>],
    opts: &RenderOptions,
    level: usize,
) -> Vec<Arc<Entity>> {
    let mut seen: HashSet<String> = roots.iter().map(|e| e.id.clone()).collect();
    let mut frontier: Vec<Arc<Entity>> = roots.to_vec();
    let mut out = Vec::new();
    // The roots are projected as asked; the entities they lead to are whole.
    let all = RenderOptions::default();
    for depth in 0..level {
        let mut next = Vec::new();
        for e in &frontier {
            for id in links(e, if depth == 0 { opts } else { &all }) {
                if out.len() >= MAX_LINKED || !seen.insert(id.clone()) {
                    continue;
                }
                if let Some(linked) = store.get(tenant, &id) {
                    out.push(linked.clone());
                    next.push(linked);
                }
            }
        }
        if next.is_empty() {
            break;
        }
        frontier = next;
    }
    out
}

/// `join=inline`: `e` rendered with each Relationship carrying the entity it
/// points to, recursively up to `level` links.
pub fn render_inline(
    store: &dyn EntityStore,
    tenant: &str,
    e: &Entity,
    ctx: &Context,
    opts: &RenderOptions,
    level: usize,
) -> Map<String, Value> {
    let mut budget = MAX_LINKED;
    let mut path = vec![e.id.clone()];
    inline(store, tenant, e, ctx, opts, level, &mut budget, &mut path)
}

#[allow(clippy::too_many_arguments)]
fn inline(
    store: &dyn EntityStore,
    tenant: &str,
    e: &Entity,
    ctx: &Context,
    opts: &RenderOptions,
    level: usize,
    budget: &mut usize,
    path: &mut Vec<String>,
) -> Map<String, Value> {
    let mut out = render_entity(e, ctx, opts);
    if level == 0 {
        return out;
    }
    // Linked entities are shown whole, in the same format.
    let linked_opts = RenderOptions {
        format: opts.format,
        sys_attrs: opts.sys_attrs,
        lang: opts.lang.clone(),
        ..RenderOptions::default()
    };
    for (name, instances) in &e.attrs {
        if !opts.wants(name) {
            continue;
        }
        let shown: Vec<_> = instances
            .iter()
            .filter(|a| opts.wants_instance(a))
            .collect();
        let Some(rendered) = out.get_mut(ctx.compact(name).as_ref()) else {
            continue;
        };
        let keyvalues = opts.format == Format::KeyValues;
        for (i, a) in shown.iter().enumerate() {
            if !matches!(a.kind, AttrKind::Relationship | AttrKind::ListRelationship) {
                continue;
            }
            let mut ids = Vec::new();
            object_ids(a.kind, &a.value, &mut ids);
            let mut entities = Vec::new();
            for id in ids {
                // A cycle (A → B → A) is shown once, not followed round.
                if *budget == 0 || path.contains(&id) {
                    continue;
                }
                let Some(linked) = store.get(tenant, &id) else {
                    continue;
                };
                *budget -= 1;
                path.push(id);
                entities.push(Value::Object(inline(
                    store,
                    tenant,
                    &linked,
                    ctx,
                    &linked_opts,
                    level - 1,
                    budget,
                    path,
                )));
                path.pop();
            }
            if entities.is_empty() {
                continue;
            }
            // keyValues shows one instance (the default one, or the first)
            // as the attribute's bare value; the others show an array of instances.
            let slot = match &mut *rendered {
                _ if keyvalues && i > 0 => None,
                Value::Array(items) if !keyvalues && shown.len() > 1 => items.get_mut(i),
                other => Some(other),
            };
            let Some(slot) = slot else { continue };
            let list = a.kind == AttrKind::ListRelationship;
            if keyvalues {
                *slot = if list || entities.len() > 1 {
                    Value::Array(entities)
                } else {
                    entities.swap_remove(0)
                };
            } else if let Value::Object(m) = slot {
                if list {
                    m.insert("entityList".into(), Value::Array(entities));
                } else if entities.len() == 1 {
                    m.insert("entity".into(), entities.swap_remove(0));
                } else {
                    m.insert("entity".into(), Value::Array(entities));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn join_parameters() {
        let p = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(join_param(&p(&[])).unwrap(), None);
        assert_eq!(
            join_param(&p(&[("join", "flat")])).unwrap(),
            Some(Join {
                mode: JoinMode::Flat,
                level: 1
            })
        );
        assert_eq!(
            join_param(&p(&[("join", "inline"), ("joinLevel", "3")]))
                .unwrap()
                .map(|j| j.level),
            Some(3)
        );
        assert!(join_param(&p(&[("join", "deep")])).is_err());
        assert!(join_param(&p(&[("join", "flat"), ("joinLevel", "0")])).is_err());
        assert!(join_param(&p(&[("joinLevel", "2")])).is_err());
    }
}
