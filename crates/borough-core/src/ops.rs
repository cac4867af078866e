//! The write operations of NGSI-LD (clauses 5.6 and 5.9) as pure functions:
//! given the current state of one entity and an operation, the new state and
//! the outcome. Storage engines apply them inside their write transaction, so
//! each operation sees the result of every one committed before it.

use crate::entity::{AttrPatch, Attribute, Entity, Fragment, fragment_into_entity, short_name};
use crate::error::{NgsiError, NgsiResult, ProblemKind};
use serde::Serialize;

/// One write to one entity.
#[derive(Clone, Debug, PartialEq)]
pub enum EntityOp {
    /// Create Entity (5.6.1); fails if it exists.
    Create(Entity),
    /// Batch upsert (5.9.3): create, or else update (`replace: false`, the
    /// given attributes replace theirs) or replace (`replace: true`, the whole entity).
    Upsert { entity: Entity, replace: bool },
    /// Replace Entity (5.6.18): the entity must exist.
    Replace(Entity),
    /// Merge Entity (5.6.17): merge-patch semantics; `null` removes.
    Merge { id: String, patch: Fragment },
    /// Append Entity Attributes (5.6.3), also batch update (5.9.4).
    Append {
        id: String,
        frag: Fragment,
        no_overwrite: bool,
    },
    /// Update Entity Attributes (5.6.2): only attributes that exist are replaced.
    Update { id: String, frag: Fragment },
    /// Partial Attribute Update (5.6.4).
    PatchAttr {
        id: String,
        attr: String,
        patch: AttrPatch,
    },
    /// Replace Attribute (5.6.19).
    ReplaceAttr {
        id: String,
        attr: String,
        patch: AttrPatch,
    },
    /// Delete Entity Attribute (5.6.5).
    DeleteAttr {
        id: String,
        attr: String,
        dataset_id: Option<String>,
        delete_all: bool,
    },
    /// Delete Entity (5.6.6).
    Delete { id: String },
}

impl EntityOp {
    pub fn entity_id(&self) -> &str {
        match self {
            Self::Create(e) | Self::Replace(e) | Self::Upsert { entity: e, .. } => &e.id,
            Self::Merge { id, .. }
            | Self::Append { id, .. }
            | Self::Update { id, .. }
            | Self::PatchAttr { id, .. }
            | Self::ReplaceAttr { id, .. }
            | Self::DeleteAttr { id, .. }
            | Self::Delete { id } => id,
        }
    }
}

/// An attribute that an append or update did not change, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NotUpdated {
    /// Expanded name.
    pub attribute_name: String,
    pub reason: String,
}

/// What an operation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpOutcome {
    Created,
    Updated,
    Deleted,
    /// Some attributes were changed and some were not (append with
    /// `noOverwrite`, update of missing attributes). Names are expanded.
    Partial {
        updated: Vec<String>,
        not_updated: Vec<NotUpdated>,
    },
}

/// The state an operation leaves the entity in.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Put(Entity),
    Delete,
    /// Nothing to write.
    Unchanged,
}

fn missing(id: &str) -> NgsiError {
    NgsiError::not_found(format!("entity '{id}' does not exist"))
}

/// Applies `op` to `current` (the committed state of the entity, if any) at time `now`.
pub fn apply(op: EntityOp, current: Option<&Entity>, now: i64) -> NgsiResult<(Change, OpOutcome)> {
    match op {
        EntityOp::Create(mut e) => {
            if current.is_some() {
                return Err(NgsiError::new(
                    ProblemKind::AlreadyExists,
                    format!("entity '{}' already exists", e.id),
                ));
            }
            stamp_new(&mut e, now);
            Ok((Change::Put(e), OpOutcome::Created))
        }
        EntityOp::Upsert {
            mut entity,
            replace,
        } => match current {
            None => {
                stamp_new(&mut entity, now);
                Ok((Change::Put(entity), OpOutcome::Created))
            }
            Some(cur) if replace => Ok((
                Change::Put(replace_entity(cur, entity, now)),
                OpOutcome::Updated,
            )),
            Some(cur) => {
                let mut next = cur.clone();
                for t in entity.types {
                    if !next.types.contains(&t) {
                        next.types.push(t);
                    }
                }
                if !entity.scopes.is_empty() {
                    next.scopes = entity.scopes;
                }
                for (name, instances) in entity.attrs {
                    for attr in instances {
                        put_instance(&mut next, &name, attr, now);
                    }
                }
                next.modified_at = now;
                Ok((Change::Put(next), OpOutcome::Updated))
            }
        },
        EntityOp::Replace(e) => {
            let cur = current.ok_or_else(|| missing(&e.id))?;
            Ok((Change::Put(replace_entity(cur, e, now)), OpOutcome::Updated))
        }
        EntityOp::Merge { id, patch } => {
            let cur = current.ok_or_else(|| missing(&id))?;
            let mut next = cur.clone();
            merge_types_and_scopes(&mut next, &patch);
            for (name, instances) in patch.attrs {
                match instances {
                    None => {
                        next.attrs.shift_remove(&name);
                    }
                    Some(list) => {
                        for p in list {
                            merge_instance(&mut next, &name, p, now)?;
                        }
                    }
                }
            }
            next.modified_at = now;
            Ok((Change::Put(next), OpOutcome::Updated))
        }
        EntityOp::Append {
            id,
            frag,
            no_overwrite,
        } => {
            let cur = current.ok_or_else(|| missing(&id))?;
            let mut next = cur.clone();
            merge_types_and_scopes(&mut next, &frag);
            let mut updated = Vec::new();
            let mut not_updated = Vec::new();
            for (name, instances) in frag.attrs {
                let list = instances.ok_or_else(|| {
                    NgsiError::bad_data(format!("attribute '{}' is null", short_name(&name)))
                })?;
                for p in list {
                    let exists = find_instance(&next, &name, p.dataset_id.as_deref()).is_some();
                    if p.deletes() {
                        record_deletion(
                            &mut next,
                            &name,
                            &p,
                            exists,
                            &mut updated,
                            &mut not_updated,
                        );
                        continue;
                    }
                    if exists && no_overwrite {
                        not_updated.push(NotUpdated {
                            attribute_name: name.clone(),
                            reason: "attribute exists and noOverwrite was requested".into(),
                        });
                        continue;
                    }
                    let attr = p.into_attribute(&name, now)?;
                    put_instance(&mut next, &name, attr, now);
                    if !updated.contains(&name) {
                        updated.push(name.clone());
                    }
                }
            }
            partial_outcome(next, cur, now, updated, not_updated)
        }
        EntityOp::Update { id, frag } => {
            let cur = current.ok_or_else(|| missing(&id))?;
            let mut next = cur.clone();
            merge_types_and_scopes(&mut next, &frag);
            let mut updated = Vec::new();
            let mut not_updated = Vec::new();
            for (name, instances) in frag.attrs {
                let list = instances.ok_or_else(|| {
                    NgsiError::bad_data(format!("attribute '{}' is null", short_name(&name)))
                })?;
                for p in list {
                    let exists = find_instance(&next, &name, p.dataset_id.as_deref()).is_some();
                    if p.deletes() {
                        record_deletion(
                            &mut next,
                            &name,
                            &p,
                            exists,
                            &mut updated,
                            &mut not_updated,
                        );
                        continue;
                    }
                    if !exists {
                        not_updated.push(NotUpdated {
                            attribute_name: name.clone(),
                            reason: match &p.dataset_id {
                                Some(d) => {
                                    format!("the entity has no such attribute with datasetId '{d}'")
                                }
                                None => "the entity has no such attribute".into(),
                            },
                        });
                        continue;
                    }
                    let attr = p.into_attribute(&name, now)?;
                    put_instance(&mut next, &name, attr, now);
                    if !updated.contains(&name) {
                        updated.push(name.clone());
                    }
                }
            }
            partial_outcome(next, cur, now, updated, not_updated)
        }
        EntityOp::PatchAttr { id, attr, patch } => {
            let cur = current.ok_or_else(|| missing(&id))?;
            let mut next = cur.clone();
            let inst = find_instance_mut(&mut next, &attr, patch.dataset_id.as_deref())
                .ok_or_else(|| attr_missing(&id, &attr, patch.dataset_id.as_deref()))?;
            if patch.deletes() {
                remove_instance(&mut next, &attr, patch.dataset_id.as_deref());
                next.modified_at = now;
                return Ok((Change::Put(next), OpOutcome::Updated));
            }
            if let Some(kind) = patch.kind
                && kind != inst.kind
            {
                return Err(NgsiError::bad_data(format!(
                    "a partial update cannot change attribute '{}' from {} to {}; replace the attribute instead",
                    short_name(&attr),
                    inst.kind.name(),
                    kind.name()
                )));
            }
            patch.merge_into(inst, &attr, now)?;
            next.modified_at = now;
            Ok((Change::Put(next), OpOutcome::Updated))
        }
        EntityOp::ReplaceAttr { id, attr, patch } => {
            let cur = current.ok_or_else(|| missing(&id))?;
            if find_instance(cur, &attr, patch.dataset_id.as_deref()).is_none() {
                return Err(attr_missing(&id, &attr, patch.dataset_id.as_deref()));
            }
            let mut next = cur.clone();
            let a = patch.into_attribute(&attr, now)?;
            put_instance(&mut next, &attr, a, now);
            next.modified_at = now;
            Ok((Change::Put(next), OpOutcome::Updated))
        }
        EntityOp::DeleteAttr {
            id,
            attr,
            dataset_id,
            delete_all,
        } => {
            let cur = current.ok_or_else(|| missing(&id))?;
            let mut next = cur.clone();
            if attr == SCOPE_IRI {
                // `scope` is deleted like an attribute (clause 5.6.5).
                if next.scopes.is_empty() {
                    return Err(NgsiError::not_found(format!("entity '{id}' has no scope")));
                }
                next.scopes.clear();
                next.modified_at = now;
                return Ok((Change::Put(next), OpOutcome::Updated));
            }
            let removed = if delete_all {
                next.attrs.shift_remove(&attr).is_some()
            } else {
                match next.attrs.get_mut(&attr) {
                    Some(list) => {
                        let before = list.len();
                        list.retain(|a| a.dataset_id != dataset_id);
                        let removed = list.len() < before;
                        if list.is_empty() {
                            next.attrs.shift_remove(&attr);
                        }
                        removed
                    }
                    None => false,
                }
            };
            if !removed {
                return Err(attr_missing(&id, &attr, dataset_id.as_deref()));
            }
            next.modified_at = now;
            Ok((Change::Put(next), OpOutcome::Updated))
        }
        EntityOp::Delete { id } => {
            if current.is_none() {
                return Err(missing(&id));
            }
            Ok((Change::Delete, OpOutcome::Deleted))
        }
    }
}

/// The expanded name of the entity member `scope`.
pub const SCOPE_IRI: &str = "https://uri.etsi.org/ngsi-ld/scope";

fn attr_missing(id: &str, attr: &str, dataset_id: Option<&str>) -> NgsiError {
    let name = short_name(attr);
    NgsiError::not_found(match dataset_id {
        Some(d) => format!("entity '{id}' has no attribute '{name}' with datasetId '{d}'"),
        None => format!("entity '{id}' has no attribute '{name}'"),
    })
}

fn partial_outcome(
    mut next: Entity,
    cur: &Entity,
    now: i64,
    updated: Vec<String>,
    not_updated: Vec<NotUpdated>,
) -> NgsiResult<(Change, OpOutcome)> {
    let changed = !updated.is_empty() || next.types != cur.types || next.scopes != cur.scopes;
    let outcome = if not_updated.is_empty() {
        OpOutcome::Updated
    } else {
        OpOutcome::Partial {
            updated,
            not_updated,
        }
    };
    if changed {
        next.modified_at = now;
        Ok((Change::Put(next), outcome))
    } else {
        Ok((Change::Unchanged, outcome))
    }
}

fn merge_types_and_scopes(next: &mut Entity, frag: &Fragment) {
    for t in &frag.types {
        if !next.types.contains(t) {
            next.types.push(t.clone());
        }
    }
    if let Some(s) = &frag.scopes {
        next.scopes = s.clone();
    }
}

fn stamp_new(e: &mut Entity, now: i64) {
    e.created_at = now;
    e.modified_at = now;
    for list in e.attrs.values_mut() {
        for a in list {
            stamp_attr(a, now, now);
        }
    }
}

fn stamp_attr(a: &mut Attribute, created: i64, now: i64) {
    a.created_at = created;
    a.modified_at = now;
    for s in a.sub.values_mut() {
        stamp_attr(s, now, now);
    }
}

/// The whole entity is replaced; creation times survive where the attribute did.
fn replace_entity(cur: &Entity, mut e: Entity, now: i64) -> Entity {
    e.created_at = cur.created_at;
    e.modified_at = now;
    for (name, list) in e.attrs.iter_mut() {
        for a in list.iter_mut() {
            let created =
                find_instance(cur, name, a.dataset_id.as_deref()).map_or(now, |old| old.created_at);
            stamp_attr(a, created, now);
        }
    }
    e
}

fn find_instance<'a>(e: &'a Entity, name: &str, dataset_id: Option<&str>) -> Option<&'a Attribute> {
    e.attrs
        .get(name)?
        .iter()
        .find(|a| a.dataset_id.as_deref() == dataset_id)
}

fn find_instance_mut<'a>(
    e: &'a mut Entity,
    name: &str,
    dataset_id: Option<&str>,
) -> Option<&'a mut Attribute> {
    e.attrs
        .get_mut(name)?
        .iter_mut()
        .find(|a| a.dataset_id.as_deref() == dataset_id)
}

/// Puts an instance in place of the one with the same datasetId (keeping its
/// creation time), or adds it.
fn put_instance(e: &mut Entity, name: &str, mut attr: Attribute, now: i64) {
    let list = e.attrs.entry(name.to_string()).or_default();
    match list.iter_mut().find(|a| a.dataset_id == attr.dataset_id) {
        Some(slot) => {
            stamp_attr(&mut attr, slot.created_at, now);
            *slot = attr;
        }
        None => {
            stamp_attr(&mut attr, now, now);
            list.push(attr);
        }
    }
}

/// Removes the instance of `name` with `dataset_id`, and the attribute when
/// it was the last one.
fn remove_instance(e: &mut Entity, name: &str, dataset_id: Option<&str>) {
    if let Some(list) = e.attrs.get_mut(name) {
        list.retain(|a| a.dataset_id.as_deref() != dataset_id);
        if list.is_empty() {
            e.attrs.shift_remove(name);
        }
    }
}

/// An NGSI-LD Null in an append or update: the instance is deleted, or
/// reported as not updated when there is none.
fn record_deletion(
    next: &mut Entity,
    name: &str,
    p: &AttrPatch,
    exists: bool,
    updated: &mut Vec<String>,
    not_updated: &mut Vec<NotUpdated>,
) {
    if exists {
        remove_instance(next, name, p.dataset_id.as_deref());
        if !updated.iter().any(|u| u == name) {
            updated.push(name.to_string());
        }
    } else {
        not_updated.push(NotUpdated {
            attribute_name: name.to_string(),
            reason: "NGSI-LD Null given for an attribute the entity does not have".into(),
        });
    }
}

fn merge_instance(e: &mut Entity, name: &str, p: AttrPatch, now: i64) -> NgsiResult<()> {
    if p.deletes() {
        // NGSI-LD Null (or `"value": null`) in a merge removes that instance.
        remove_instance(e, name, p.dataset_id.as_deref());
        return Ok(());
    }
    match find_instance_mut(e, name, p.dataset_id.as_deref()) {
        Some(existing) => p.merge_into(existing, name, now),
        None => {
            let a = p.into_attribute(name, now)?;
            put_instance(e, name, a, now);
            Ok(())
        }
    }
}

/// Builds an entity for Create/Upsert/Replace from a parsed fragment, checking
/// the id given in the path (if any) against the body.
pub fn entity_from_fragment(
    mut frag: Fragment,
    path_id: Option<&str>,
    now: i64,
) -> NgsiResult<Entity> {
    if let Some(pid) = path_id {
        match &frag.id {
            Some(bid) if bid != pid => {
                return Err(NgsiError::bad_data(format!(
                    "the id in the body ('{bid}') differs from the id in the path ('{pid}')"
                )));
            }
            _ => frag.id = Some(pid.to_string()),
        }
    }
    fragment_into_entity(frag, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::Context;
    use crate::entity::{ParseMode, parse_entity, parse_fragment};
    use serde_json::{Value, json};

    const V: &str = "https://uri.etsi.org/ngsi-ld/default-context/";

    fn entity(v: Value) -> Entity {
        parse_entity(&v, &Context::core(), 0).unwrap()
    }
    fn frag(v: Value, mode: ParseMode) -> Fragment {
        parse_fragment(&v, &Context::core(), mode).unwrap()
    }
    fn base() -> Entity {
        entity(json!({"id": "urn:a", "type": "T",
            "speed": {"type": "Property", "value": 1, "unitCode": "KMH"},
            "temp": [{"type": "Property", "value": 20}, {"type": "Property", "value": 30, "datasetId": "urn:d:1"}]}))
    }
    fn put(c: Change) -> Entity {
        match c {
            Change::Put(e) => e,
            other => panic!("expected Put, got {other:?}"),
        }
    }

    #[test]
    fn create_twice_is_already_exists() {
        let e = base();
        let (c, o) = apply(EntityOp::Create(e.clone()), None, 5).unwrap();
        assert_eq!(o, OpOutcome::Created);
        let created = put(c);
        assert_eq!(created.created_at, 5);
        let err = apply(EntityOp::Create(e), Some(&created), 6).unwrap_err();
        assert_eq!(err.kind, ProblemKind::AlreadyExists);
    }

    #[test]
    fn append_with_no_overwrite_reports_what_it_skipped() {
        let cur = base();
        let f = frag(
            json!({"speed": {"value": 9}, "color": {"value": "red"}}),
            ParseMode::Full,
        );
        let (c, o) = apply(
            EntityOp::Append {
                id: "urn:a".into(),
                frag: f,
                no_overwrite: true,
            },
            Some(&cur),
            10,
        )
        .unwrap();
        let next = put(c);
        assert_eq!(next.attrs[&format!("{V}speed")][0].value, json!(1));
        assert_eq!(next.attrs[&format!("{V}color")][0].value, json!("red"));
        match o {
            OpOutcome::Partial {
                updated,
                not_updated,
            } => {
                assert_eq!(updated, vec![format!("{V}color")]);
                assert_eq!(not_updated[0].attribute_name, format!("{V}speed"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn update_touches_only_existing_attributes() {
        let cur = base();
        let f = frag(
            json!({"speed": {"value": 9}, "color": {"value": "red"}}),
            ParseMode::Full,
        );
        let (c, o) = apply(
            EntityOp::Update {
                id: "urn:a".into(),
                frag: f,
            },
            Some(&cur),
            10,
        )
        .unwrap();
        let next = put(c);
        assert_eq!(next.attrs[&format!("{V}speed")][0].value, json!(9));
        // Update replaces the attribute: the old unitCode is gone.
        assert_eq!(next.attrs[&format!("{V}speed")][0].unit_code, None);
        assert!(!next.attrs.contains_key(&format!("{V}color")));
        assert!(matches!(o, OpOutcome::Partial { .. }));
    }

    #[test]
    fn merge_keeps_unmentioned_members_and_null_removes() {
        let cur = base();
        let f = frag(
            json!({"speed": {"value": 5}, "temp": null, "color": "blue"}),
            ParseMode::Patch,
        );
        let (c, _) = apply(
            EntityOp::Merge {
                id: "urn:a".into(),
                patch: f,
            },
            Some(&cur),
            10,
        )
        .unwrap();
        let next = put(c);
        let speed = &next.attrs[&format!("{V}speed")][0];
        assert_eq!(speed.value, json!(5));
        assert_eq!(speed.unit_code.as_deref(), Some("KMH"));
        assert_eq!(speed.created_at, 0);
        assert_eq!(speed.modified_at, 10);
        assert!(!next.attrs.contains_key(&format!("{V}temp")));
        assert_eq!(next.attrs[&format!("{V}color")][0].value, json!("blue"));
    }

    #[test]
    fn delete_attribute_by_dataset_id_and_all() {
        let cur = base();
        let name = format!("{V}temp");
        let op = |d: Option<&str>, all| EntityOp::DeleteAttr {
            id: "urn:a".into(),
            attr: name.clone(),
            dataset_id: d.map(str::to_string),
            delete_all: all,
        };
        let next = put(apply(op(Some("urn:d:1"), false), Some(&cur), 1).unwrap().0);
        assert_eq!(next.attrs[&name].len(), 1);
        let err = apply(op(Some("urn:d:9"), false), Some(&cur), 1).unwrap_err();
        assert_eq!(err.kind, ProblemKind::ResourceNotFound);
        let next = put(apply(op(None, true), Some(&cur), 1).unwrap().0);
        assert!(!next.attrs.contains_key(&name));
    }

    #[test]
    fn upsert_update_mode_keeps_other_attributes_replace_mode_drops_them() {
        let cur = base();
        let new = entity(json!({"id": "urn:a", "type": "U", "color": "red"}));
        let upd = put(apply(
            EntityOp::Upsert {
                entity: new.clone(),
                replace: false,
            },
            Some(&cur),
            3,
        )
        .unwrap()
        .0);
        assert_eq!(upd.attrs.len(), 3);
        assert_eq!(upd.types.len(), 2);
        let rep = put(apply(
            EntityOp::Upsert {
                entity: new,
                replace: true,
            },
            Some(&cur),
            3,
        )
        .unwrap()
        .0);
        assert_eq!(rep.attrs.len(), 1);
        assert_eq!(rep.types, vec![format!("{V}U")]);
        assert_eq!(rep.created_at, cur.created_at);
    }

    #[test]
    fn operations_on_missing_entities_are_not_found() {
        let ops = vec![
            EntityOp::Delete { id: "urn:x".into() },
            EntityOp::Replace(entity(json!({"id": "urn:x", "type": "T"}))),
            EntityOp::Merge {
                id: "urn:x".into(),
                patch: Fragment::default(),
            },
        ];
        for op in ops {
            assert_eq!(
                apply(op, None, 0).unwrap_err().kind,
                ProblemKind::ResourceNotFound
            );
        }
    }

    #[test]
    fn partial_attribute_update_merges_sub_attributes() {
        let cur = base();
        let patch = crate::entity::parse_attribute(
            "speed",
            &json!({"value": 7, "accuracy": {"value": 0.5}}),
            &Context::core(),
            ParseMode::Patch,
            0,
        )
        .unwrap();
        let next = put(apply(
            EntityOp::PatchAttr {
                id: "urn:a".into(),
                attr: format!("{V}speed"),
                patch,
            },
            Some(&cur),
            4,
        )
        .unwrap()
        .0);
        let speed = &next.attrs[&format!("{V}speed")][0];
        assert_eq!(speed.value, json!(7));
        assert_eq!(speed.unit_code.as_deref(), Some("KMH"));
        assert_eq!(speed.sub[&format!("{V}accuracy")].value, json!(0.5));
    }

    #[test]
    fn ngsi_ld_null_deletes_in_merge_update_append_and_partial_update() {
        let cur = base();
        let speed = format!("{V}speed");
        let temp = format!("{V}temp");
        // Merge: concise null, and the typed null of one datasetId instance.
        let f = frag(
            json!({"speed": "urn:ngsi-ld:null",
                   "temp": {"value": "urn:ngsi-ld:null", "datasetId": "urn:d:1"}}),
            ParseMode::Patch,
        );
        let next = put(apply(
            EntityOp::Merge {
                id: "urn:a".into(),
                patch: f,
            },
            Some(&cur),
            2,
        )
        .unwrap()
        .0);
        assert!(!next.attrs.contains_key(&speed));
        assert_eq!(next.attrs[&temp].len(), 1);
        assert_eq!(next.attrs[&temp][0].dataset_id, None);
        // Update: a null deletes; a null for a missing attribute is reported.
        let f = frag(
            json!({"speed": {"type": "Property", "value": "urn:ngsi-ld:null"},
                   "nothing": {"type": "Property", "value": "urn:ngsi-ld:null"}}),
            ParseMode::Full,
        );
        let (c, o) = apply(
            EntityOp::Update {
                id: "urn:a".into(),
                frag: f,
            },
            Some(&cur),
            3,
        )
        .unwrap();
        assert!(!put(c).attrs.contains_key(&speed));
        match o {
            OpOutcome::Partial {
                updated,
                not_updated,
            } => {
                assert_eq!(updated, vec![speed.clone()]);
                assert_eq!(not_updated[0].attribute_name, format!("{V}nothing"));
            }
            other => panic!("{other:?}"),
        }
        // Append with a typed null of a LanguageProperty.
        let mut with_name = cur.clone();
        with_name.attrs.insert(
            format!("{V}name"),
            entity(json!({"id": "urn:a", "type": "T",
                "name": {"type": "LanguageProperty", "languageMap": {"en": "x"}}}))
            .attrs
            .shift_remove(&format!("{V}name"))
            .unwrap(),
        );
        let f = frag(
            json!({"name": {"type": "LanguageProperty", "languageMap": {"@none": "urn:ngsi-ld:null"}}}),
            ParseMode::Full,
        );
        let (c, _) = apply(
            EntityOp::Append {
                id: "urn:a".into(),
                frag: f,
                no_overwrite: false,
            },
            Some(&with_name),
            4,
        )
        .unwrap();
        assert!(!put(c).attrs.contains_key(&format!("{V}name")));
        // Partial attribute update.
        let patch = crate::entity::parse_attribute(
            "temp",
            &json!({"value": "urn:ngsi-ld:null", "datasetId": "urn:d:1"}),
            &Context::core(),
            ParseMode::Patch,
            0,
        )
        .unwrap();
        let next = put(apply(
            EntityOp::PatchAttr {
                id: "urn:a".into(),
                attr: temp.clone(),
                patch,
            },
            Some(&cur),
            5,
        )
        .unwrap()
        .0);
        assert_eq!(next.attrs[&temp].len(), 1);
        // A null cannot create anything.
        let err = crate::entity::parse_entity(
            &json!({"id": "urn:b", "type": "T", "p": "urn:ngsi-ld:null"}),
            &Context::core(),
            0,
        )
        .unwrap_err();
        assert!(err.detail.contains("NGSI-LD Null"), "{}", err.detail);
    }

    #[test]
    fn partial_update_cannot_change_the_attribute_type() {
        let cur = base();
        let patch = crate::entity::parse_attribute(
            "speed",
            &json!({"type": "Relationship", "object": "urn:x"}),
            &Context::core(),
            ParseMode::Patch,
            0,
        )
        .unwrap();
        let err = apply(
            EntityOp::PatchAttr {
                id: "urn:a".into(),
                attr: format!("{V}speed"),
                patch,
            },
            Some(&cur),
            5,
        )
        .unwrap_err();
        assert_eq!(err.kind, ProblemKind::BadRequestData);
    }
}
