//! Distributed changes (clauses 5.6.x.4): a change of an entity's attributes
//! is split between the context sources registered for them and the local
//! store. Exclusive and redirect sources take the attributes they hold (and
//! nothing of them is written locally), inclusive sources get what is left
//! as well as the local store, auxiliary sources are never written to.

use crate::entities::with_tenant;
use crate::federation::{self, Forward, SourceFailure};
use crate::problem::ApiResult;
use crate::request::encode_path_segment;
use crate::typed_json_response;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use borough_core::registration::{CompiledRegistration, Mode, Supplied};
use borough_core::{NgsiError, ProblemKind};
use futures_util::future::join_all;
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// Who takes which attributes of one change.
#[derive(Default)]
pub struct Split {
    /// Exclusive and redirect sources, with the (expanded) names each takes.
    pub proxied: Vec<(Arc<CompiledRegistration>, Vec<String>)>,
    /// Inclusive sources, with the names each gets besides the local store.
    pub inclusive: Vec<(Arc<CompiledRegistration>, Vec<String>)>,
    /// Names the local store writes.
    pub local: Vec<String>,
    /// Names held by an exclusive or redirect source that does not take
    /// this operation: nobody may change them here (Conflict).
    pub conflicts: Vec<(String, String)>,
}

impl Split {
    /// Every source that gets part of the change, with its part.
    pub fn targets(&self) -> Vec<(Arc<CompiledRegistration>, Vec<String>)> {
        self.proxied
            .iter()
            .chain(&self.inclusive)
            .cloned()
            .collect()
    }

    pub fn involves_sources(&self) -> bool {
        !self.proxied.is_empty() || !self.inclusive.is_empty() || !self.conflicts.is_empty()
    }
}

/// Whether the caller may change entity `id` through `reg`: a key limited
/// to some entity types reaches only sources registered for those types.
pub fn reachable(reg: &CompiledRegistration, id: &str) -> bool {
    let Some(allowed) = crate::auth::caller_entity_types() else {
        return true;
    };
    reg.information.iter().any(|info| {
        info.entities
            .iter()
            .any(|e| e.covers(id, None) && e.types.iter().any(|t| allowed.contains(t)))
    })
}

fn only(supplied: Option<Supplied>, names: &[String]) -> Vec<String> {
    match supplied {
        None => Vec::new(),
        Some(Supplied::All) => names.to_vec(),
        Some(Supplied::Only(n)) => n,
    }
}

/// Splits a change of `names` (expanded) of entity `id` (of `types`, when
/// it is known locally) for a source taking any of `operations`.
pub fn split(
    fwd: &Forward<'_>,
    operations: &[&str],
    id: &str,
    types: Option<&[String]>,
    names: &[String],
) -> Split {
    let mut out = Split::default();
    let regs: Vec<_> = fwd
        .state
        .sources
        .of_tenant(fwd.tenant)
        .into_iter()
        .filter(|r| !r.is_temporal_only() && reachable(r, id))
        .take(federation::MAX_SOURCES)
        .collect();
    let mut remaining: Vec<String> = names.to_vec();
    // Exclusive first: what one holds is removed from the change.
    for reg in regs.iter().filter(|r| r.mode == Mode::Exclusive) {
        let taken = only(reg.supplies(id, types, Some(&remaining)), &remaining);
        if taken.is_empty() {
            continue;
        }
        remaining.retain(|n| !taken.contains(n));
        if operations.iter().any(|op| reg.allows(op)) {
            out.proxied.push((reg.clone(), taken));
        } else {
            out.conflicts
                .extend(taken.into_iter().map(|n| (n, reg.id().to_string())));
        }
    }
    // Redirect next: every matching one gets the attributes it holds.
    let mut redirected: Vec<String> = Vec::new();
    for reg in regs.iter().filter(|r| r.mode == Mode::Redirect) {
        let taken = only(reg.supplies(id, types, Some(&remaining)), &remaining);
        if taken.is_empty() {
            continue;
        }
        if operations.iter().any(|op| reg.allows(op)) {
            redirected.extend(taken.iter().cloned());
            out.proxied.push((reg.clone(), taken));
        } else {
            out.conflicts
                .extend(taken.iter().map(|n| (n.clone(), reg.id().to_string())));
            redirected.extend(taken);
        }
    }
    remaining.retain(|n| !redirected.contains(n));
    for reg in regs
        .iter()
        .filter(|r| r.mode == Mode::Inclusive && operations.iter().any(|op| r.allows(op)))
    {
        let given = only(reg.supplies(id, types, Some(&remaining)), &remaining);
        if !given.is_empty() {
            out.inclusive.push((reg.clone(), given));
        }
    }
    out.local = remaining;
    out
}

/// What the sources did with their part of a change.
#[derive(Default)]
pub struct Outcome {
    /// Names a source took.
    pub updated: Vec<String>,
    /// Names a source did not take, with why.
    pub failed: Vec<(String, SourceFailure)>,
}

/// Sends each source of `targets` its part, concurrently: `request` gives
/// the method, path and body for a registration and the names it takes.
pub async fn send_all<F>(
    fwd: &Forward<'_>,
    targets: Vec<(Arc<CompiledRegistration>, Vec<String>)>,
    request: F,
) -> Outcome
where
    F: Fn(&CompiledRegistration, &[String]) -> (Method, String, Option<Value>),
{
    let sends = targets.into_iter().map(|(reg, names)| {
        let (method, path, body) = request(&reg, &names);
        async move {
            let result = federation::change(fwd, &reg, method, &path, body).await;
            (names, result)
        }
    });
    let mut out = Outcome::default();
    for (names, result) in join_all(sends).await {
        match result {
            Ok(()) => out.updated.extend(names),
            Err(f) => out.failed.extend(names.into_iter().map(|n| (n, f.clone()))),
        }
    }
    out
}

/// The part of a fragment (compact keys as the client wrote them) that a
/// source takes, keyed by the names the source reads.
pub fn fragment_for(
    fwd: &Forward<'_>,
    reg: &CompiledRegistration,
    fragment: &Map<String, Value>,
    names: &[String],
) -> Map<String, Value> {
    let ctx = fwd.names(reg);
    let mut out = Map::new();
    for (key, value) in fragment {
        let expanded = fwd.actx.ctx.expand(key);
        if names.iter().any(|n| *n == *expanded) {
            out.insert(ctx.compact(&expanded).into_owned(), value.clone());
        }
    }
    out
}

/// The path of one entity (and below) at a source.
pub fn entity_path(id: &str, rest: &str) -> String {
    format!("/entities/{}{rest}", encode_path_segment(id))
}

/// The problem for a change only a source could make, and did not: 504
/// when it did not answer in time, 502 otherwise (clause 6.3.17).
pub fn source_problem(f: &SourceFailure) -> NgsiError {
    let kind = if f.detail.contains("timeout") || f.detail.contains("cooling down") {
        ProblemKind::GatewayTimeout
    } else {
        ProblemKind::BadGateway
    };
    NgsiError::new(
        kind,
        format!(
            "the context source registered for this ({} at {}) failed: {}",
            f.registration, f.endpoint, f.detail
        ),
    )
}

/// The problem for names nobody may change through this operation.
pub fn conflict_problem(fwd: &Forward<'_>, conflicts: &[(String, String)]) -> NgsiError {
    let Some((name, reg)) = conflicts.first() else {
        return NgsiError::new(
            ProblemKind::Conflict,
            "the change conflicts with a registration",
        );
    };
    NgsiError::new(
        ProblemKind::Conflict,
        format!(
            "attribute '{}' is held by context source registration '{reg}', which does not take this operation",
            fwd.actx.ctx.compact(name)
        ),
    )
}

/// The problem for a change that would come back here.
pub fn loop_problem() -> NgsiError {
    NgsiError::new(
        ProblemKind::LoopDetected,
        "this request has already passed through this broker (Via): forwarding it again would loop",
    )
}

/// The answer to a distributed change of attributes: 204 when everything
/// was taken, 207 with an UpdateResult naming each attribute not updated and
/// the registration that failed it (clause 6.3.17).
pub fn update_result(fwd: &Forward<'_>, updated: Vec<String>, not_updated: NotUpdated) -> Response {
    if not_updated.is_empty() {
        return with_tenant(StatusCode::NO_CONTENT.into_response(), fwd.tenant);
    }
    let body = json!({
        "updated": updated.iter().map(|n| fwd.actx.ctx.compact(n).into_owned()).collect::<Vec<_>>(),
        "notUpdated": not_updated.iter().map(|(name, reason, reg)| {
            let mut item = json!({
                "attributeName": fwd.actx.ctx.compact(name),
                "reason": reason,
            });
            if let Some(r) = reg {
                item["registrationId"] = json!(r);
            }
            item
        }).collect::<Vec<_>>(),
    });
    with_tenant(
        typed_json_response(StatusCode::MULTI_STATUS, &body, "application/json"),
        fwd.tenant,
    )
}

/// What the local store did with its part: the names it updated, and those
/// it did not with why.
pub type LocalPart = (Vec<String>, Vec<(String, String)>);

/// Attributes not updated: (name, reason, the registration that failed it).
pub type NotUpdated = Vec<(String, String, Option<String>)>;

/// Collects a split change's results into an UpdateResult's two lists.
pub fn tally(
    split: &Split,
    sources: Outcome,
    local: Option<LocalPart>,
) -> (Vec<String>, NotUpdated) {
    let mut updated = sources.updated;
    let mut not_updated: NotUpdated = sources
        .failed
        .into_iter()
        .map(|(n, f)| (n, f.detail, Some(f.registration)))
        .collect();
    for (n, reg) in &split.conflicts {
        not_updated.push((
            n.clone(),
            "the registered context source does not take this operation".into(),
            Some(reg.clone()),
        ));
    }
    if let Some((ok, failed)) = local {
        updated.extend(ok);
        not_updated.extend(failed.into_iter().map(|(n, r)| (n, r, None)));
    }
    // An inclusive source's failure does not undo the local write of a name.
    not_updated.retain(|(n, _, reg)| reg.is_none() || !updated.contains(n));
    updated.sort();
    updated.dedup();
    (updated, not_updated)
}

/// Sends a single-attribute change (updateAttrs, replaceAttrs, deleteAttrs)
/// to the sources `split` gives it to, each at the attribute's path in the
/// names it reads.
pub async fn attribute_change(
    fwd: &Forward<'_>,
    split: &Split,
    (id, attr): (&str, &str),
    method: Method,
    query: &str,
    body: Option<Value>,
) -> ApiResult<Outcome> {
    if !split.conflicts.is_empty() {
        return Err(conflict_problem(fwd, &split.conflicts).into());
    }
    Ok(send_all(fwd, split.targets(), |reg, _| {
        let name = fwd.names(reg).compact(attr).into_owned();
        let path = entity_path(id, &format!("/attrs/{}{query}", encode_path_segment(&name)));
        (method.clone(), path, body.clone())
    })
    .await)
}

/// Sends a deletion of an entity to every source registered for it that
/// takes deletions: how many did, and the failures.
pub async fn delete_entity(fwd: &Forward<'_>, id: &str) -> Option<(usize, Vec<SourceFailure>)> {
    let types = fwd.state.store.get(fwd.tenant, id).map(|e| e.types.clone());
    let regs: Vec<_> = fwd
        .state
        .sources
        .of_tenant(fwd.tenant)
        .into_iter()
        .filter(|r| r.mode != Mode::Auxiliary && r.allows("deleteEntity"))
        .filter(|r| !r.is_temporal_only() && reachable(r, id))
        .filter(|r| r.supplies(id, types.as_deref(), None).is_some())
        .take(federation::MAX_SOURCES)
        .collect();
    if regs.is_empty() {
        return None;
    }
    let path = entity_path(id, "");
    let sends = regs
        .iter()
        .map(|reg| federation::change(fwd, reg, Method::DELETE, &path, None));
    let mut ok = 0;
    let mut failed = Vec::new();
    for r in join_all(sends).await {
        match r {
            Ok(()) => ok += 1,
            // A source that never had the entity has nothing to delete.
            Err(f) if f.detail.starts_with("the source answered 404") => {}
            Err(f) => failed.push(f),
        }
    }
    Some((ok, failed))
}

/// A BatchOperationResult (clause 5.2.16) for a change of one entity that
/// some sources failed: 207.
pub fn batch_result(fwd: &Forward<'_>, id: &str, done: bool, failed: &[SourceFailure]) -> Response {
    let body = json!({
        "success": if done { vec![id] } else { Vec::new() },
        "errors": failed.iter().map(|f| json!({
            "entityId": id,
            "registrationId": f.registration,
            "error": source_problem(f).to_problem(),
        })).collect::<Vec<_>>(),
    });
    with_tenant(
        typed_json_response(StatusCode::MULTI_STATUS, &body, "application/json"),
        fwd.tenant,
    )
}

/// How a whole entity's change reaches its sources: a creation, or a
/// batch's upsert, update or merge, each forwarded as the entity-level
/// operation a source takes (clause 5.6.7.4: one entity at a time when the
/// source does not take the batch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntityWrite {
    Create,
    Replace,
    Upsert { replace: bool },
    Update { no_overwrite: bool },
    Merge,
}

impl EntityWrite {
    /// The operations of a source that takes this change: the entity-level
    /// one, or the batch one.
    fn operations(self) -> &'static [&'static str] {
        match self {
            Self::Create => &["createEntity", "createBatch"],
            Self::Replace => &["replaceEntity"],
            Self::Upsert { .. } => &["upsertBatch", "updateEntity"],
            Self::Update { .. } => &["appendAttrs", "updateBatch"],
            Self::Merge => &["mergeEntity", "mergeBatch"],
        }
    }

    /// The request that gives `reg`'s source its part of entity `id`
    /// (`part` and `type_value` in the names it reads).
    fn request(
        self,
        reg: &CompiledRegistration,
        id: &str,
        mut part: Map<String, Value>,
        type_value: Option<Value>,
    ) -> (Method, String, Option<Value>) {
        let whole = |part: &mut Map<String, Value>| {
            part.insert("id".into(), json!(id));
            if let Some(t) = &type_value {
                part.insert("type".into(), t.clone());
            }
        };
        match self {
            Self::Create => {
                whole(&mut part);
                (Method::POST, "/entities".into(), Some(Value::Object(part)))
            }
            Self::Replace => {
                whole(&mut part);
                (Method::PUT, entity_path(id, ""), Some(Value::Object(part)))
            }
            // A source that takes batches creates what it lacks; one that
            // takes updates only (an IoT Agent) updates what it has.
            Self::Upsert { replace } if reg.allows("upsertBatch") => {
                whole(&mut part);
                let query = if replace { "?options=replace" } else { "" };
                let path = format!("/entityOperations/upsert{query}");
                (
                    Method::POST,
                    path,
                    Some(Value::Array(vec![Value::Object(part)])),
                )
            }
            Self::Upsert { .. } => (
                Method::PATCH,
                entity_path(id, "/attrs"),
                Some(Value::Object(part)),
            ),
            Self::Update { no_overwrite } => {
                let query = if no_overwrite {
                    "?options=noOverwrite"
                } else {
                    ""
                };
                (
                    Method::POST,
                    entity_path(id, &format!("/attrs{query}")),
                    Some(Value::Object(part)),
                )
            }
            Self::Merge => (
                Method::PATCH,
                entity_path(id, ""),
                Some(Value::Object(part)),
            ),
        }
    }

    /// Whether the local store still writes the entity when sources took all
    /// of its attributes: a creation, a replacement or an upsert makes the
    /// entity here.
    fn writes_shell(self) -> bool {
        matches!(self, Self::Create | Self::Replace | Self::Upsert { .. })
    }
}

/// What is left of an entity's change once its sources have their part.
pub struct Remainder {
    /// The body the local store writes; `None`: nothing is left for it.
    pub body: Option<Value>,
    /// Sources that failed their part.
    pub failed: Vec<SourceFailure>,
    /// Whether some source took part of the change.
    pub forwarded: bool,
    /// Whether some source did its part.
    pub taken: bool,
    /// Whether attributes are left for the local store.
    pub local_attributes: bool,
}

/// Forwards what sources hold of one entity's change (`body`: the entity or
/// fragment as the client wrote it, without `@context`); answers what is
/// left to write here. A Conflict when a source holding some of it does not
/// take the operation.
pub async fn entity_write(
    fwd: &Forward<'_>,
    write: EntityWrite,
    id: &str,
    body: &Map<String, Value>,
) -> Result<Remainder, NgsiError> {
    let keep = |k: &str| matches!(k, "id" | "type" | "scope" | "@context");
    let names: Vec<String> = body
        .keys()
        .filter(|k| !keep(k))
        .map(|k| fwd.actx.ctx.expand(k).into_owned())
        .collect();
    let local_types = fwd.state.store.get(fwd.tenant, id).map(|e| e.types.clone());
    if let Some(types) = &local_types {
        crate::auth::check_entity_types(id, types)?;
    }
    let body_types: Option<Vec<String>> = body.get("type").map(|t| {
        let list = match t {
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect::<Vec<_>>(),
            Value::String(s) => vec![s.as_str()],
            _ => Vec::new(),
        };
        list.iter()
            .map(|t| fwd.actx.ctx.expand(t).into_owned())
            .collect()
    });
    let types = local_types.or(body_types);
    let split = split(fwd, write.operations(), id, types.as_deref(), &names);
    if !split.involves_sources() {
        return Ok(Remainder {
            body: Some(Value::Object(body.clone())),
            failed: Vec::new(),
            forwarded: false,
            taken: false,
            local_attributes: !names.is_empty(),
        });
    }
    if !split.conflicts.is_empty() {
        return Err(conflict_problem(fwd, &split.conflicts));
    }
    let targets = split.targets();
    let outcome = send_all(fwd, targets, |reg, names| {
        // The type in the names the source reads, as its attributes are.
        let type_value = body.get("type").map(|t| {
            let ctx = fwd.names(reg);
            let compact = |t: &str| json!(ctx.compact(&fwd.actx.ctx.expand(t)));
            match t {
                Value::String(one) => compact(one),
                Value::Array(many) => {
                    Value::Array(many.iter().filter_map(Value::as_str).map(compact).collect())
                }
                other => other.clone(),
            }
        });
        write.request(reg, id, fragment_for(fwd, reg, body, names), type_value)
    })
    .await;
    let taken = !outcome.updated.is_empty();
    let mut failed: Vec<SourceFailure> = Vec::new();
    for (_, f) in outcome.failed {
        if !failed.iter().any(|g| g.registration == f.registration) {
            failed.push(f);
        }
    }
    let left = !split.local.is_empty() || write.writes_shell();
    let body = left.then(|| {
        let mut kept = body.clone();
        kept.retain(|k, _| keep(k) || split.local.iter().any(|n| *n == *fwd.actx.ctx.expand(k)));
        Value::Object(kept)
    });
    Ok(Remainder {
        body,
        failed,
        forwarded: true,
        taken,
        local_attributes: !split.local.is_empty(),
    })
}
