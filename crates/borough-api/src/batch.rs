//! Batch entity operations (ETSI GS CIM 009, clause 5.9): each entity succeeds
//! or fails on its own; a mixed result is a 207 with a BatchOperationResult.

use crate::distributed::{self, EntityWrite};
use crate::entities::{context_of, options, with_tenant};
use crate::federation::{self, Forward, Route, SourceFailure};
use crate::problem::ApiResult;
use crate::request::{BodyType, body_type, link_context, read_json, tenant};
use crate::{AppState, SharedState, json_response};
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use borough_core::entity::{ParseMode, parse_entity, parse_fragment};
use borough_core::validate::check_uri;
use borough_core::{EntityOp, NgsiError, NgsiResult, OpOutcome};
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::collections::HashMap;

type Params = Query<HashMap<String, String>>;

/// Entities of a batch whose parts are at sources at the same time.
const BATCH_FORWARDS: usize = 16;

/// One entry of a batch: an operation to run, or the entity id and the error that stopped it.
type Slot = Result<EntityOp, (String, NgsiError)>;

/// One entity of a batch: what the local store writes (`None`: context
/// sources took all of it), and the sources that failed their part.
struct Entry {
    id: String,
    slot: Option<Slot>,
    failed: Vec<SourceFailure>,
}

impl From<Slot> for Entry {
    fn from(slot: Slot) -> Entry {
        let id = match &slot {
            Ok(op) => op.entity_id().to_string(),
            Err((id, _)) => id.clone(),
        };
        Entry {
            id,
            slot: Some(slot),
            failed: Vec::new(),
        }
    }
}

struct Outcomes {
    ids: Vec<String>,
    results: Vec<NgsiResult<OpOutcome>>,
    /// Per entity, the context sources that failed their part.
    failed: Vec<Vec<SourceFailure>>,
}

impl Outcomes {
    /// Every entity done in full: no error, and no attribute left as it was.
    fn all_ok(&self) -> bool {
        self.failed.iter().all(Vec::is_empty)
            && self
                .results
                .iter()
                .all(|r| matches!(r, Ok(o) if !matches!(o, OpOutcome::Partial { .. })))
    }

    fn created(&self) -> Vec<&String> {
        self.ids
            .iter()
            .zip(&self.results)
            .filter(|(_, r)| matches!(r, Ok(OpOutcome::Created)))
            .map(|(id, _)| id)
            .collect()
    }

    /// The 207 body: which entities succeeded and why the others failed.
    fn multi_status(&self, tenant: &str) -> Response {
        let mut success = Vec::new();
        let mut errors = Vec::new();
        for ((id, r), failed) in self.ids.iter().zip(&self.results).zip(&self.failed) {
            for f in failed {
                errors.push(json!({
                    "entityId": id,
                    "registrationId": f.registration,
                    "error": crate::distributed::source_problem(f).to_problem(),
                }));
            }
            // Done here, failed at a source: both lists name it.
            if !failed.is_empty() && r.is_ok() {
                success.push(json!(id));
                continue;
            }
            match r {
                Ok(OpOutcome::Partial { not_updated, .. }) => {
                    let names: Vec<&str> = not_updated
                        .iter()
                        .map(|n| borough_core::entity::short_name(&n.attribute_name))
                        .collect();
                    let e = NgsiError::bad_data(format!(
                        "attributes not updated: {}",
                        names.join(", ")
                    ));
                    errors.push(json!({"entityId": id, "error": e.to_problem()}));
                }
                Ok(_) => success.push(json!(id)),
                Err(e) => errors.push(json!({"entityId": id, "error": e.to_problem()})),
            }
        }
        with_tenant(
            json_response(
                StatusCode::MULTI_STATUS,
                &json!({"success": success, "errors": errors}),
            ),
            tenant,
        )
    }
}

async fn items(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<(Vec<Value>, BodyType, Option<String>)> {
    let bt = body_type(headers, false)?;
    let link = link_context(headers)?;
    if bt == BodyType::LdJson && link.is_some() {
        return Err(NgsiError::bad_data(
            "a JSON-LD context Link header cannot be combined with an application/ld+json body; put the @context in each entity",
        )
        .into());
    }
    let v = read_json(body, state.config.max_batch_body_bytes).await?;
    let Value::Array(items) = v else {
        return Err(NgsiError::bad_data("a batch body must be a JSON array").into());
    };
    if items.is_empty() {
        return Err(NgsiError::bad_data("a batch body must not be empty").into());
    }
    if items.len() > state.config.max_batch_entities {
        return Err(NgsiError::bad_data(format!(
            "a batch holds at most {} entities; this one has {}",
            state.config.max_batch_entities,
            items.len()
        ))
        .into());
    }
    Ok((items, bt, link))
}

/// Parses each entity of a batch with `parse` into an entry; with
/// registrations, what context sources hold of each entity goes to them
/// first (`write`) and the rest is parsed for the local store.
async fn slots(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    write: EntityWrite,
    parse: impl Fn(&Value, &borough_core::Context) -> NgsiResult<EntityOp>,
) -> ApiResult<Vec<Entry>> {
    let tenant = tenant(headers)?;
    let (items, bt, link) = items(state, headers, body).await?;
    let forward = federation::route(state, &tenant, headers, &HashMap::new()) == Route::Forward;
    let mut parsed = Vec::with_capacity(items.len());
    for mut item in items {
        let id = item
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let actx = match context_of(state, bt, link.as_deref(), &mut item).await {
            Ok(actx) => actx,
            Err(e) => {
                parsed.push(Err(Entry::from(Err((id, e.0)))));
                continue;
            }
        };
        // The whole entity is checked before any of it is sent anywhere.
        match parse(&item, &actx.ctx) {
            Ok(op) => parsed.push(Ok((id, item, actx, op))),
            Err(e) => parsed.push(Err(Entry::from(Err((id, e))))),
        }
    }
    if !forward {
        return Ok(parsed
            .into_iter()
            .map(|p| match p {
                Ok((_, _, _, op)) => Entry::from(Ok(op)),
                Err(entry) => entry,
            })
            .collect());
    }
    // The sources' parts go out a few entities at a time, in order.
    let tenant = &tenant;
    let parse = &parse;
    let entries = futures_util::stream::iter(parsed)
        .map(|p| async move {
            let (id, item, actx, op) = match p {
                Ok(parsed) => parsed,
                Err(entry) => return entry,
            };
            let Value::Object(body) = &item else {
                return Entry::from(Ok(op));
            };
            // An entity this broker has is not created anywhere: the local
            // write answers AlreadyExists.
            if write == EntityWrite::Create && state.store.get(tenant, &id).is_some() {
                return Entry::from(Ok(op));
            }
            let fwd = Forward {
                state,
                tenant,
                headers,
                actx: &actx,
            };
            match distributed::entity_write(&fwd, write, &id, body).await {
                Ok(left) if !left.forwarded => Entry::from(Ok(op)),
                Ok(left) => Entry {
                    slot: left
                        .body
                        .map(|v| parse(&v, &actx.ctx).map_err(|e| (id.clone(), e))),
                    id,
                    failed: left.failed,
                },
                Err(e) => Entry::from(Err((id, e))),
            }
        })
        .buffered(BATCH_FORWARDS)
        .collect()
        .await;
    Ok(entries)
}

/// Runs the operations of a batch in one write and lines the results up with the entities.
async fn run(state: &AppState, tenant: &str, entries: Vec<Entry>) -> ApiResult<Outcomes> {
    let mut ids = Vec::with_capacity(entries.len());
    let mut ops = Vec::new();
    let mut placement = Vec::with_capacity(entries.len());
    let mut failed = Vec::with_capacity(entries.len());
    for entry in entries {
        failed.push(entry.failed);
        match entry.slot {
            Some(Ok(op)) => {
                ids.push(op.entity_id().to_string());
                placement.push(Ok(Some(ops.len())));
                ops.push(op);
            }
            // Context sources took all of it.
            None => {
                ids.push(entry.id);
                placement.push(Ok(None));
            }
            Some(Err((id, e))) => {
                ids.push(id);
                placement.push(Err(e));
            }
        }
    }
    let mut written = if ops.is_empty() {
        Vec::new()
    } else {
        crate::entities::admit_ops(state, tenant, &ops)?;
        state.store.write(tenant, ops).await?
    }
    .into_iter()
    .map(Some)
    .collect::<Vec<_>>();
    let results = placement
        .into_iter()
        .map(|p| match p {
            Ok(Some(i)) => written
                .get_mut(i)
                .and_then(Option::take)
                .unwrap_or_else(|| Err(NgsiError::internal("the store returned too few results"))),
            Ok(None) => Ok(OpOutcome::Updated),
            Err(e) => Err(e),
        })
        .collect();
    Ok(Outcomes {
        ids,
        results,
        failed,
    })
}

fn no_content(tenant: &str) -> Response {
    with_tenant(StatusCode::NO_CONTENT.into_response(), tenant)
}

/// `POST /entityOperations/create`
pub async fn create(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = tenant(&headers)?;
    let slots = slots(&state, &headers, body, EntityWrite::Create, |v, ctx| {
        Ok(EntityOp::Create(parse_entity(v, ctx, 0)?))
    })
    .await?;
    let out = run(&state, &tenant, slots).await?;
    if out.all_ok() {
        return Ok(with_tenant(
            json_response(StatusCode::CREATED, &json!(out.ids)),
            &tenant,
        ));
    }
    Ok(out.multi_status(&tenant))
}

/// `POST /entityOperations/upsert` (`options=update` (default) or `replace`)
pub async fn upsert(
    State(state): State<SharedState>,
    Query(params): Params,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = tenant(&headers)?;
    let replace = options(&params, &["update", "replace"])?
        .last()
        .is_some_and(|o| o == "replace");
    let slots = slots(
        &state,
        &headers,
        body,
        EntityWrite::Upsert { replace },
        |v, ctx| {
            Ok(EntityOp::Upsert {
                entity: parse_entity(v, ctx, 0)?,
                replace,
            })
        },
    )
    .await?;
    let out = run(&state, &tenant, slots).await?;
    if !out.all_ok() {
        return Ok(out.multi_status(&tenant));
    }
    let created = out.created();
    if created.is_empty() {
        Ok(no_content(&tenant))
    } else {
        Ok(with_tenant(
            json_response(StatusCode::CREATED, &json!(created)),
            &tenant,
        ))
    }
}

fn fragment_op(
    v: &Value,
    ctx: &borough_core::Context,
    mode: ParseMode,
) -> NgsiResult<(String, borough_core::Fragment)> {
    let frag = parse_fragment(v, ctx, mode)?;
    let id = frag
        .id
        .clone()
        .ok_or_else(|| NgsiError::bad_data("each entity of the batch needs an 'id'"))?;
    Ok((id, frag))
}

/// `POST /entityOperations/update` (`options=noOverwrite`)
pub async fn update(
    State(state): State<SharedState>,
    Query(params): Params,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = tenant(&headers)?;
    let no_overwrite = options(&params, &["noOverwrite"])?
        .iter()
        .any(|o| o == "noOverwrite");
    let write = EntityWrite::Update { no_overwrite };
    let slots = slots(&state, &headers, body, write, |v, ctx| {
        let (id, frag) = fragment_op(v, ctx, ParseMode::Full)?;
        Ok(EntityOp::Append {
            id,
            frag,
            no_overwrite,
        })
    })
    .await?;
    let out = run(&state, &tenant, slots).await?;
    Ok(if out.all_ok() {
        no_content(&tenant)
    } else {
        out.multi_status(&tenant)
    })
}

/// `POST /entityOperations/merge`
pub async fn merge(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = tenant(&headers)?;
    let slots = slots(&state, &headers, body, EntityWrite::Merge, |v, ctx| {
        let (id, patch) = fragment_op(v, ctx, ParseMode::Patch)?;
        Ok(EntityOp::Merge { id, patch })
    })
    .await?;
    let out = run(&state, &tenant, slots).await?;
    Ok(if out.all_ok() {
        no_content(&tenant)
    } else {
        out.multi_status(&tenant)
    })
}

/// `POST /entityOperations/delete`: the body is an array of entity ids.
pub async fn delete(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = tenant(&headers)?;
    let (items, _, _) = items(&state, &headers, body).await?;
    let slots = items
        .into_iter()
        .map(|v| match v.as_str() {
            Some(id) => match check_uri("entity id", id) {
                Ok(()) => Ok(EntityOp::Delete { id: id.to_string() }),
                Err(e) => Err((id.to_string(), e)),
            },
            None => Err((
                String::new(),
                NgsiError::bad_data("a batch delete body holds entity ids (strings)"),
            )),
        })
        .collect::<Vec<Slot>>();
    let mut entries: Vec<Entry> = slots.into_iter().map(Entry::from).collect();
    // Sources registered for an entity delete their part first.
    let mut removed_at_sources = vec![0; entries.len()];
    if federation::route(&state, &tenant, &headers, &HashMap::new()) == Route::Forward {
        let actx = crate::contexts::ActiveContext::core();
        let fwd = Forward {
            state: &state,
            tenant: &tenant,
            headers: &headers,
            actx: &actx,
        };
        for entry in entries.iter_mut() {
            if matches!(entry.slot, Some(Ok(_)))
                && let Some(local) = state.store.get(&tenant, &entry.id)
                && let Err(e) = crate::auth::check_entity_types(&entry.id, &local.types)
            {
                entry.slot = Some(Err((entry.id.clone(), e)));
            }
        }
        let fwd = &fwd;
        let asked: Vec<(bool, String)> = entries
            .iter()
            .map(|e| (matches!(e.slot, Some(Ok(_))), e.id.clone()))
            .collect();
        let at_sources: Vec<_> = futures_util::stream::iter(asked)
            .map(|(valid, id)| async move {
                if valid {
                    distributed::delete_entity(fwd, &id).await
                } else {
                    None
                }
            })
            .buffered(BATCH_FORWARDS)
            .collect()
            .await;
        for ((entry, removed), done) in entries
            .iter_mut()
            .zip(&mut removed_at_sources)
            .zip(at_sources)
        {
            if let Some((n, failed)) = done {
                *removed = n;
                entry.failed = failed;
            }
        }
    }
    let mut out = run(&state, &tenant, entries).await?;
    // An entity held only by sources is deleted once they deleted it.
    for (r, removed) in out.results.iter_mut().zip(removed_at_sources) {
        if removed > 0
            && matches!(r, Err(e) if e.kind == borough_core::ProblemKind::ResourceNotFound)
        {
            *r = Ok(OpOutcome::Deleted);
        }
    }
    Ok(if out.all_ok() {
        no_content(&tenant)
    } else {
        out.multi_status(&tenant)
    })
}
