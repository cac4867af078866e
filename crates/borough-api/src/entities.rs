//! Entity provisioning and retrieval (ETSI GS CIM 009, clause 5.6 and 5.7.1).

use crate::contexts::ActiveContext;
use crate::distributed::{self, Split};
use crate::federation::{self, Forward, Route};
use crate::problem::{ApiError, ApiResult};
use crate::request::{
    BodyType, ResponseType, TENANT_HEADER, body_type, encode_path_segment, link_context,
    list_param, negotiate, read_json, tenant,
};
use crate::{AppState, SharedState, typed_json_response};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use borough_core::entity::{
    ParseMode, parse_attribute, parse_entity, parse_fragment, render_feature,
};
use borough_core::ops::entity_from_fragment;
use borough_core::render::EntityView;
use borough_core::validate::check_uri;
use borough_core::{EntityOp, Format, NgsiError, OpOutcome, ProblemKind, RenderOptions};
use serde_json::{Map, Value, json};
use std::collections::HashMap;

type Params = Query<HashMap<String, String>>;

/// Reads a body and its `@context` (from the body for JSON-LD, from `Link` for JSON).
pub(crate) async fn body_with_context(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    allow_merge_patch: bool,
) -> ApiResult<(Value, ActiveContext)> {
    let bt = body_type(headers, allow_merge_patch)?;
    let link = link_context(headers)?;
    let mut v = read_json(body, limit).await?;
    let actx = context_of(state, bt, link.as_deref(), &mut v).await?;
    Ok((v, actx))
}

/// Takes `@context` out of one body object and resolves the request's context.
pub(crate) async fn context_of(
    state: &AppState,
    bt: BodyType,
    link: Option<&str>,
    v: &mut Value,
) -> ApiResult<ActiveContext> {
    let inline = v.as_object_mut().and_then(|o| o.remove("@context"));
    let actx = match bt {
        BodyType::LdJson => {
            if link.is_some() {
                return Err(NgsiError::bad_data(
                    "a JSON-LD context Link header cannot be combined with an application/ld+json body; put the @context in the body",
                )
                .into());
            }
            let c = inline.ok_or_else(|| {
                NgsiError::bad_data("an application/ld+json body needs an @context member")
            })?;
            state.contexts.for_body(&c).await?
        }
        BodyType::Json => {
            if inline.is_some() {
                return Err(NgsiError::bad_data(
                    "an application/json body cannot carry @context; send it in a Link header or use application/ld+json",
                )
                .into());
            }
            state.contexts.for_link(link).await?
        }
    };
    Ok(actx)
}

/// Checks an entity id taken from the path.
pub(crate) fn path_id(id: &str) -> ApiResult<()> {
    check_uri("entity id", id)?;
    Ok(())
}

/// Reads must address a tenant that exists: one the operator registered
/// (with access control), one that has been written to, or one whose data
/// context sources hold.
pub(crate) fn existing_tenant(state: &AppState, headers: &HeaderMap) -> ApiResult<String> {
    let t = tenant(headers)?;
    let registered = state
        .access
        .as_ref()
        .is_some_and(|a| a.enabled() && a.tenant(&t).is_some());
    if !registered && !state.store.tenant_exists(&t) && !state.sources.has_any(&t) {
        return Err(NgsiError::new(
            ProblemKind::NonexistentTenant,
            format!("tenant '{t}' does not exist"),
        )
        .into());
    }
    Ok(t)
}

/// Checks, before a write, what access control asks of it: the caller's
/// entity types (for the entities the operations name and, for changes of
/// existing ones, the entities as they are) and the tenant's entity quota.
pub(crate) fn admit_ops(state: &AppState, tenant: &str, ops: &[EntityOp]) -> ApiResult<()> {
    if crate::auth::caller_entity_types().is_some() {
        for op in ops {
            let id = op.entity_id();
            let named = match op {
                EntityOp::Create(e) | EntityOp::Replace(e) => Some(&e.types),
                EntityOp::Upsert { entity, .. } => Some(&entity.types),
                _ => None,
            };
            if let Some(types) = named {
                crate::auth::check_entity_types(id, types)?;
            }
            if let Some(current) = state.store.get(tenant, id) {
                crate::auth::check_entity_types(id, &current.types)?;
            }
        }
    }
    if let Some(access) = &state.access {
        let creating = ops
            .iter()
            .filter(|op| matches!(op, EntityOp::Create(_) | EntityOp::Upsert { .. }))
            .count() as u64;
        if creating > 0 {
            access.check_quota(
                tenant,
                "entities",
                |q| q.max_entities,
                state.store.entity_count(tenant) as u64,
                creating,
            )?;
        }
    }
    Ok(())
}

/// Runs one operation and returns its outcome.
async fn write_one(state: &AppState, tenant: &str, op: EntityOp) -> ApiResult<OpOutcome> {
    admit_ops(state, tenant, std::slice::from_ref(&op))?;
    let mut results = state.store.write(tenant, vec![op]).await?;
    let result = results
        .pop()
        .ok_or_else(|| NgsiError::internal("the store returned no result"))?;
    Ok(result?)
}

/// Adds the tenant header to a response when the request named a tenant.
pub(crate) fn with_tenant(mut resp: Response, tenant: &str) -> Response {
    if !tenant.is_empty()
        && let Ok(v) = HeaderValue::from_str(tenant)
    {
        resp.headers_mut().insert(TENANT_HEADER, v);
    }
    resp
}

fn no_content(tenant: &str) -> Response {
    with_tenant(StatusCode::NO_CONTENT.into_response(), tenant)
}

/// 204 when everything was done, 207 with an UpdateResult when some attributes were not.
fn update_response(outcome: OpOutcome, actx: &ActiveContext, tenant: &str) -> Response {
    match outcome {
        OpOutcome::Partial {
            updated,
            not_updated,
        } => {
            let body = json!({
                "updated": updated.iter().map(|n| actx.ctx.compact(n).into_owned()).collect::<Vec<_>>(),
                "notUpdated": not_updated.iter().map(|n| json!({
                    "attributeName": actx.ctx.compact(&n.attribute_name),
                    "reason": n.reason,
                })).collect::<Vec<_>>(),
            });
            with_tenant(
                typed_json_response(StatusCode::MULTI_STATUS, &body, "application/json"),
                tenant,
            )
        }
        _ => no_content(tenant),
    }
}

/// The `options` parameter, each value checked against those `allowed` here.
pub(crate) fn options(
    params: &HashMap<String, String>,
    allowed: &[&str],
) -> ApiResult<Vec<String>> {
    let opts: Vec<String> = list_param(params.get("options").map(String::as_str))
        .into_iter()
        .map(str::to_string)
        .collect();
    if let Some(bad) = opts.iter().find(|o| !allowed.contains(&o.as_str())) {
        return Err(NgsiError::invalid(format!(
            "unknown option '{bad}'; allowed here: {}",
            allowed.join(", ")
        ))
        .into());
    }
    Ok(opts)
}

/// `POST /entities`
pub async fn create(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = tenant(&headers)?;
    let (v, actx) =
        body_with_context(&state, &headers, body, state.config.max_body_bytes, false).await?;
    let mut entity = parse_entity(&v, &actx.ctx, 0)?;
    let location = format!("/ngsi-ld/v1/entities/{}", encode_path_segment(&entity.id));
    let mut failed = Vec::new();
    if federation::route(&state, &tenant, &headers, &HashMap::new()) == Route::Forward
        && let Value::Object(body) = &v
    {
        let fwd = Forward {
            state: &state,
            tenant: &tenant,
            headers: &headers,
            actx: &actx,
        };
        let id = entity.id.clone();
        // An entity that exists here is not created anywhere.
        if state.store.get(&tenant, &id).is_some() {
            return Err(NgsiError::new(
                ProblemKind::AlreadyExists,
                format!("entity '{id}' already exists"),
            )
            .into());
        }
        let left =
            distributed::entity_write(&fwd, distributed::EntityWrite::Create, &id, body).await?;
        if left.forwarded {
            if let (false, false, Some(first)) =
                (left.taken, left.local_attributes, left.failed.first())
            {
                return Err(distributed::source_problem(first).into());
            }
            failed = left.failed;
            if let Some(body) = left.body {
                entity = parse_entity(&body, &actx.ctx, 0)?;
            }
        }
        if !failed.is_empty() {
            write_one(&state, &tenant, EntityOp::Create(entity)).await?;
            return Ok(distributed::batch_result(&fwd, &id, true, &failed));
        }
    }
    write_one(&state, &tenant, EntityOp::Create(entity)).await?;
    let mut resp = StatusCode::CREATED.into_response();
    if let Ok(l) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, l);
    }
    Ok(with_tenant(resp, &tenant))
}

/// The representation options of a retrieval request (format and sysAttrs);
/// projection is added by `query::projection`.
pub(crate) fn render_options(params: &HashMap<String, String>) -> ApiResult<RenderOptions> {
    let opts = options(
        params,
        &[
            "keyValues",
            "simplified",
            "concise",
            "sysAttrs",
            "normalized",
        ],
    )?;
    let mut format = match params.get("format").map(String::as_str) {
        None => Format::Normalized,
        Some("normalized") => Format::Normalized,
        Some("concise") => Format::Concise,
        Some("keyValues" | "simplified") => Format::KeyValues,
        Some(other) => {
            return Err(NgsiError::invalid(format!(
                "unknown format '{other}'; use normalized, concise, keyValues or simplified"
            ))
            .into());
        }
    };
    let kv = opts.iter().any(|o| o == "keyValues" || o == "simplified");
    let concise = opts.iter().any(|o| o == "concise");
    if kv && concise {
        return Err(NgsiError::bad_data("options keyValues and concise exclude each other").into());
    }
    if kv {
        format = Format::KeyValues;
    } else if concise {
        format = Format::Concise;
    }
    Ok(RenderOptions {
        format,
        sys_attrs: opts.iter().any(|o| o == "sysAttrs"),
        ..RenderOptions::default()
    })
}

/// A `Link` header pointing at the context the response was compacted with.
pub(crate) fn link_header(actx: &ActiveContext) -> HeaderValue {
    const CORE_LINK: &str = "<https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.8.jsonld>; rel=\"http://www.w3.org/ns/json-ld#context\"; type=\"application/ld+json\"";
    if actx.source.link_url() == borough_core::context::CORE_CONTEXT_URL {
        // Most responses name the core context: no formatting for them.
        return HeaderValue::from_static(CORE_LINK);
    }
    let v = format!(
        "<{}>; rel=\"{}\"; type=\"application/ld+json\"",
        actx.source.link_url(),
        crate::request::JSONLD_CONTEXT_REL
    );
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static(CORE_LINK))
}

/// Serializes a view straight into a response in the negotiated media type
/// (the view already holds `@context` for JSON-LD).
pub(crate) fn represent_view(
    rt: ResponseType,
    view: &impl serde::Serialize,
    actx: &ActiveContext,
    tenant: &str,
) -> Response {
    let media = match rt {
        ResponseType::Json => "application/json",
        ResponseType::LdJson => "application/ld+json",
        ResponseType::GeoJson => "application/geo+json",
    };
    let mut resp = match serde_json::to_vec(view) {
        Ok(bytes) => {
            let mut r = (StatusCode::OK, bytes).into_response();
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(media));
            r
        }
        Err(e) => {
            return crate::problem::ApiError(NgsiError::internal(format!(
                "cannot serialize the response: {e}"
            )))
            .into_response();
        }
    };
    if rt != ResponseType::LdJson {
        resp.headers_mut().insert(header::LINK, link_header(actx));
    }
    with_tenant(resp, tenant)
}

/// A body already complete (with any `@context` members it needs) in JSON or JSON-LD.
pub(crate) fn represent_json(
    rt: ResponseType,
    body: Value,
    actx: &ActiveContext,
    tenant: &str,
) -> Response {
    let mut r = if rt == ResponseType::LdJson {
        typed_json_response(StatusCode::OK, &body, "application/ld+json")
    } else {
        let mut r = typed_json_response(StatusCode::OK, &body, "application/json");
        r.headers_mut().insert(header::LINK, link_header(actx));
        r
    };
    r = with_tenant(r, tenant);
    r
}

/// Renders a response body in the negotiated media type.
pub(crate) fn represent(
    rt: ResponseType,
    body: Value,
    actx: &ActiveContext,
    tenant: &str,
) -> Response {
    let with_context = |body: Value| match body {
        Value::Object(m) => {
            let mut out = Map::with_capacity(m.len() + 1);
            out.insert("@context".into(), actx.source.as_value());
            out.extend(m);
            Value::Object(out)
        }
        other => other,
    };
    let resp = match rt {
        ResponseType::LdJson => {
            typed_json_response(StatusCode::OK, &with_context(body), "application/ld+json")
        }
        ResponseType::GeoJson => {
            // A GeoJSON Feature or FeatureCollection carries its @context in
            // the body (clause 4.5.16), and in a Link header for plain readers.
            let mut r =
                typed_json_response(StatusCode::OK, &with_context(body), "application/geo+json");
            r.headers_mut().insert(header::LINK, link_header(actx));
            r
        }
        ResponseType::Json => {
            let mut r = typed_json_response(StatusCode::OK, &body, "application/json");
            r.headers_mut().insert(header::LINK, link_header(actx));
            r
        }
    };
    with_tenant(resp, tenant)
}

/// `GET /entities/{id}`
pub async fn retrieve(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    Query(params): Params,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let rt = negotiate(&headers, true)?;
    let tenant = existing_tenant(&state, &headers)?;
    path_id(&id)?;
    let actx = state
        .contexts
        .for_link(link_context(&headers)?.as_deref())
        .await?;
    let (opts, attrs) = crate::query::projection(&params, None, &actx)?;
    let local = state.store.get(&tenant, &id);
    let mut failures = Vec::new();
    let entity = match federation::route(&state, &tenant, &headers, &params) {
        Route::Forward => {
            let fwd = Forward {
                state: &state,
                tenant: &tenant,
                headers: &headers,
                actx: &actx,
            };
            let answer =
                federation::retrieve(&fwd, &id, local.as_deref(), opts.attrs.as_deref()).await;
            failures = answer.failed;
            // What exclusive and redirect sources hold is never answered
            // from here, whether they answered or not.
            let local = local.map(|l| federation::without_claimed(l, &answer.claimed));
            if answer.found.is_empty() {
                local
            } else {
                federation::merge(local.as_deref(), answer.found).map(std::sync::Arc::new)
            }
        }
        Route::Local | Route::Loop => local,
    };
    let Some(entity) = entity else {
        let missing = ApiError(NgsiError::not_found(format!(
            "entity '{id}' does not exist"
        )));
        return Ok(federation::warn(missing.into_response(), &failures));
    };
    crate::auth::check_entity_types(&id, &entity.types)?;
    // An entity without any of the attributes asked for is not found (clause
    // 5.7.1.4), and so is one of which a pick leaves nothing.
    let has_wanted = opts
        .attrs
        .as_ref()
        .is_none_or(|want| want.iter().any(|a| entity.attrs.contains_key(a)));
    if !has_wanted && !attrs.is_empty() {
        return Err(NgsiError::not_found(format!(
            "entity '{id}' has none of the attributes asked for"
        ))
        .into());
    }
    if !has_wanted
        && opts.hide_id
        && opts.hide_type
        && (opts.hide_scope || entity.scopes.is_empty())
    {
        return Err(
            NgsiError::not_found(format!("the pick leaves nothing of entity '{id}'")).into(),
        );
    }
    if rt == ResponseType::GeoJson {
        let geo = params
            .get("geometryProperty")
            .map(|g| actx.ctx.expand(g).into_owned())
            .unwrap_or_else(|| "https://uri.etsi.org/ngsi-ld/location".to_string());
        let body = render_feature(&entity, &actx.ctx, &opts, &geo);
        return Ok(federation::warn(
            represent(rt, body, &actx, &tenant),
            &failures,
        ));
    }
    if let Some(join) = crate::join::join_param(&params)? {
        let body = crate::query::joined(&state, &tenant, &[entity], &opts, &actx, rt, join);
        let body = match (join.mode, body) {
            (crate::join::JoinMode::Inline, Value::Array(mut one)) if one.len() == 1 => {
                one.swap_remove(0)
            }
            (_, other) => other,
        };
        return Ok(federation::warn(
            represent_json(rt, body, &actx, &tenant),
            &failures,
        ));
    }
    let context = (rt == ResponseType::LdJson).then(|| actx.source.as_value());
    let view = EntityView {
        entity: &entity,
        ctx: &actx.ctx,
        opts: &opts,
        context: context.as_ref(),
    };
    Ok(federation::warn(
        represent_view(rt, &view, &actx, &tenant),
        &failures,
    ))
}

/// `DELETE /entities/{id}`
pub async fn delete(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let tenant = existing_tenant(&state, &headers)?;
    path_id(&id)?;
    if federation::route(&state, &tenant, &headers, &HashMap::new()) == Route::Forward {
        let actx = state
            .contexts
            .for_link(link_context(&headers)?.as_deref())
            .await?;
        let fwd = Forward {
            state: &state,
            tenant: &tenant,
            headers: &headers,
            actx: &actx,
        };
        if let Some(local) = state.store.get(&tenant, &id) {
            crate::auth::check_entity_types(&id, &local.types)?;
        }
        if let Some((removed, failed)) = distributed::delete_entity(&fwd, &id).await {
            let local = write_one(&state, &tenant, EntityOp::Delete { id: id.clone() }).await;
            let done = match (local, failed.first()) {
                (Ok(_), _) => true,
                // Held by sources only: what they deleted is the entity.
                (Err(e), _) if removed > 0 && e.0.kind == ProblemKind::ResourceNotFound => true,
                (Err(e), None) => return Err(e),
                (Err(_), Some(first)) => return Err(distributed::source_problem(first).into()),
            };
            if failed.is_empty() {
                return Ok(no_content(&tenant));
            }
            return Ok(distributed::batch_result(&fwd, &id, done, &failed));
        }
    }
    write_one(&state, &tenant, EntityOp::Delete { id }).await?;
    Ok(no_content(&tenant))
}

/// `PUT /entities/{id}`: replace the whole entity.
pub async fn replace(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = existing_tenant(&state, &headers)?;
    path_id(&id)?;
    let (v, actx) =
        body_with_context(&state, &headers, body, state.config.max_body_bytes, false).await?;
    let frag = parse_fragment(&v, &actx.ctx, ParseMode::Full)?;
    let mut entity = entity_from_fragment(frag, Some(&id), 0)?;
    if federation::route(&state, &tenant, &headers, &HashMap::new()) == Route::Forward
        && let Value::Object(body) = &v
    {
        let fwd = Forward {
            state: &state,
            tenant: &tenant,
            headers: &headers,
            actx: &actx,
        };
        let left =
            distributed::entity_write(&fwd, distributed::EntityWrite::Replace, &id, body).await?;
        if left.forwarded {
            if let Some(body) = left.body {
                let frag = parse_fragment(&body, &actx.ctx, ParseMode::Full)?;
                entity = entity_from_fragment(frag, Some(&id), 0)?;
            }
            if !left.failed.is_empty() {
                write_one(&state, &tenant, EntityOp::Replace(entity)).await?;
                return Ok(distributed::batch_result(&fwd, &id, true, &left.failed));
            }
        }
    }
    write_one(&state, &tenant, EntityOp::Replace(entity)).await?;
    Ok(no_content(&tenant))
}

/// `PATCH /entities/{id}`: merge-patch.
pub async fn merge(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = existing_tenant(&state, &headers)?;
    path_id(&id)?;
    let (v, actx) =
        body_with_context(&state, &headers, body, state.config.max_body_bytes, true).await?;
    let patch = parse_fragment(&v, &actx.ctx, ParseMode::Patch)?;
    check_body_id(&patch.id, &id)?;
    let names: Vec<String> = patch.attrs.keys().cloned().collect();
    if let Some(resp) = distribute_fragment(
        &state,
        &tenant,
        &headers,
        &actx,
        FragmentChange {
            operation: "mergeEntity",
            method: axum::http::Method::PATCH,
            path: "",
            query: "",
            mode: ParseMode::Patch,
        },
        &id,
        &v,
        &names,
    )
    .await?
    {
        return Ok(resp);
    }
    write_one(&state, &tenant, EntityOp::Merge { id, patch }).await?;
    Ok(no_content(&tenant))
}

/// How a change of a fragment of attributes goes to the sources.
struct FragmentChange {
    operation: &'static str,
    method: axum::http::Method,
    /// Below `/entities/{id}`.
    path: &'static str,
    query: &'static str,
    mode: ParseMode,
}

/// Splits a change of several attributes between the sources registered
/// for them and the local store; `None` when no source is concerned, and
/// the local write goes on as usual.
#[allow(clippy::too_many_arguments)]
async fn distribute_fragment(
    state: &SharedState,
    tenant: &str,
    headers: &HeaderMap,
    actx: &ActiveContext,
    change: FragmentChange,
    id: &str,
    body: &Value,
    names: &[String],
) -> ApiResult<Option<Response>> {
    let route = federation::route(state, tenant, headers, &HashMap::new());
    if route == Route::Local {
        return Ok(None);
    }
    let fwd = Forward {
        state,
        tenant,
        headers,
        actx,
    };
    let types = state.store.get(tenant, id).map(|e| e.types.clone());
    if let Some(types) = &types {
        crate::auth::check_entity_types(id, types)?;
    }
    let split = distributed::split(&fwd, &[change.operation], id, types.as_deref(), names);
    if !split.involves_sources() {
        return Ok(None);
    }
    if route == Route::Loop {
        if !split.proxied.is_empty() {
            return Err(distributed::loop_problem().into());
        }
        return Ok(None);
    }
    let fragment = body.as_object().cloned().unwrap_or_default();
    let targets = split.targets();
    let outcome = distributed::send_all(&fwd, targets, |reg, names| {
        let path = distributed::entity_path(id, &format!("{}{}", change.path, change.query));
        (
            change.method.clone(),
            path,
            Some(Value::Object(distributed::fragment_for(
                &fwd, reg, &fragment, names,
            ))),
        )
    })
    .await;
    let local = if split.local.is_empty() {
        None
    } else {
        // What no exclusive or redirect source took is written here.
        let mut kept = fragment.clone();
        kept.retain(|k, _| {
            matches!(k.as_str(), "id" | "type" | "scope")
                || split.local.iter().any(|n| *n == *actx.ctx.expand(k))
        });
        let frag = parse_fragment(&Value::Object(kept), &actx.ctx, change.mode)?;
        let op = match change.operation {
            "mergeEntity" => EntityOp::Merge {
                id: id.to_string(),
                patch: frag,
            },
            "appendAttrs" => EntityOp::Append {
                id: id.to_string(),
                frag,
                no_overwrite: change.query.contains("noOverwrite"),
            },
            _ => EntityOp::Update {
                id: id.to_string(),
                frag,
            },
        };
        Some(write_one(state, tenant, op).await)
    };
    finish(&fwd, &split, outcome, local).map(Some)
}

/// The answer to a change split between sources and the local store.
fn finish(
    fwd: &Forward<'_>,
    split: &Split,
    outcome: distributed::Outcome,
    local: Option<ApiResult<OpOutcome>>,
) -> ApiResult<Response> {
    let remote_ok = !outcome.updated.is_empty();
    let local = match local {
        None => None,
        Some(Ok(OpOutcome::Partial {
            updated,
            not_updated,
        })) => Some((
            updated,
            not_updated
                .into_iter()
                .map(|n| (n.attribute_name, n.reason))
                .collect(),
        )),
        Some(Ok(_)) => Some((split.local.clone(), Vec::new())),
        // The entity is not held here: what the sources did stands.
        Some(Err(e)) if remote_ok && e.0.kind == ProblemKind::ResourceNotFound => None,
        Some(Err(e)) if outcome.failed.is_empty() && split.conflicts.is_empty() => {
            return Err(e);
        }
        Some(Err(e)) => Some((
            Vec::new(),
            split
                .local
                .iter()
                .map(|n| (n.clone(), e.0.detail.clone()))
                .collect(),
        )),
    };
    let local_ok = local.as_ref().is_some_and(|(u, _)| !u.is_empty());
    if !remote_ok && !local_ok {
        if let Some((_, f)) = outcome.failed.first() {
            return Err(distributed::source_problem(f).into());
        }
        if !split.conflicts.is_empty() {
            return Err(distributed::conflict_problem(fwd, &split.conflicts).into());
        }
    }
    let (updated, not_updated) = distributed::tally(split, outcome, local);
    Ok(distributed::update_result(fwd, updated, not_updated))
}

/// How a change of one attribute reaches its sources.
struct AttributeChange {
    operation: &'static str,
    method: axum::http::Method,
    /// The URL parameters sources get (`?datasetId=…`).
    query: String,
    /// The attribute's body, as the client wrote it.
    body: Option<Value>,
}

/// A change of one attribute (`PATCH`, `PUT` or `DELETE` of
/// `/attrs/{attr}`): to the sources registered for it, and to the local
/// store for what they do not hold.
async fn write_attribute(
    state: &SharedState,
    tenant: &str,
    headers: &HeaderMap,
    actx: &ActiveContext,
    (id, attr): (&str, &str),
    change: AttributeChange,
    op: EntityOp,
) -> ApiResult<Response> {
    let route = federation::route(state, tenant, headers, &HashMap::new());
    if route != Route::Local {
        let fwd = Forward {
            state,
            tenant,
            headers,
            actx,
        };
        let types = state.store.get(tenant, id).map(|e| e.types.clone());
        if let Some(types) = &types {
            crate::auth::check_entity_types(id, types)?;
        }
        let split = distributed::split(
            &fwd,
            &[change.operation],
            id,
            types.as_deref(),
            &[attr.to_string()],
        );
        if route == Route::Loop && !split.proxied.is_empty() {
            return Err(distributed::loop_problem().into());
        }
        if route == Route::Forward && split.involves_sources() {
            let outcome = distributed::attribute_change(
                &fwd,
                &split,
                (id, attr),
                change.method,
                &change.query,
                change.body,
            )
            .await?;
            let local = if split.local.is_empty() {
                None
            } else {
                Some(write_one(state, tenant, op).await)
            };
            return finish(&fwd, &split, outcome, local);
        }
    }
    write_one(state, tenant, op).await?;
    Ok(no_content(tenant))
}

/// `PATCH` or `PUT` of `/entities/{id}/attrs/{attr}`: the body read in
/// `mode`, the change `make` builds for the local store.
#[allow(clippy::too_many_arguments)]
async fn attribute_with_body(
    state: SharedState,
    (id, attr): (String, String),
    headers: HeaderMap,
    body: Body,
    mode: ParseMode,
    operation: &'static str,
    method: axum::http::Method,
    make: fn(String, String, borough_core::AttrPatch) -> EntityOp,
) -> ApiResult<Response> {
    let tenant = existing_tenant(&state, &headers)?;
    path_id(&id)?;
    let (attr, patch, raw, actx) = attribute_body(&state, &headers, body, &attr, mode).await?;
    let change = AttributeChange {
        operation,
        method,
        query: String::new(),
        body: Some(raw),
    };
    let op = make(id.clone(), attr.clone(), patch);
    write_attribute(&state, &tenant, &headers, &actx, (&id, &attr), change, op).await
}

fn check_body_id(body_id: &Option<String>, path_id: &str) -> ApiResult<()> {
    match body_id {
        Some(b) if b != path_id => Err(NgsiError::bad_data(format!(
            "the id in the body ('{b}') differs from the id in the path ('{path_id}')"
        ))
        .into()),
        _ => Ok(()),
    }
}

/// `POST /entities/{id}/attrs`: append attributes (`options=noOverwrite`).
pub async fn append(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    Query(params): Params,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = existing_tenant(&state, &headers)?;
    path_id(&id)?;
    let no_overwrite = options(&params, &["noOverwrite"])?
        .iter()
        .any(|o| o == "noOverwrite");
    // merge-patch+json is accepted here as well: appending and updating
    // attributes have merge semantics.
    let (v, actx) =
        body_with_context(&state, &headers, body, state.config.max_body_bytes, true).await?;
    let frag = parse_fragment(&v, &actx.ctx, ParseMode::Full)?;
    check_body_id(&frag.id, &id)?;
    let names: Vec<String> = frag.attrs.keys().cloned().collect();
    if let Some(resp) = distribute_fragment(
        &state,
        &tenant,
        &headers,
        &actx,
        FragmentChange {
            operation: "appendAttrs",
            method: axum::http::Method::POST,
            path: "/attrs",
            query: if no_overwrite {
                "?options=noOverwrite"
            } else {
                ""
            },
            mode: ParseMode::Full,
        },
        &id,
        &v,
        &names,
    )
    .await?
    {
        return Ok(resp);
    }
    let outcome = write_one(
        &state,
        &tenant,
        EntityOp::Append {
            id,
            frag,
            no_overwrite,
        },
    )
    .await?;
    Ok(update_response(outcome, &actx, &tenant))
}

/// `PATCH /entities/{id}/attrs`: update existing attributes.
pub async fn update(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = existing_tenant(&state, &headers)?;
    path_id(&id)?;
    // merge-patch+json is accepted here as well: appending and updating
    // attributes have merge semantics.
    let (v, actx) =
        body_with_context(&state, &headers, body, state.config.max_body_bytes, true).await?;
    let frag = parse_fragment(&v, &actx.ctx, ParseMode::Full)?;
    check_body_id(&frag.id, &id)?;
    if frag.attrs.is_empty() && frag.types.is_empty() && frag.scopes.is_none() {
        return Err(NgsiError::bad_data("the body names no attribute to update").into());
    }
    let names: Vec<String> = frag.attrs.keys().cloned().collect();
    if let Some(resp) = distribute_fragment(
        &state,
        &tenant,
        &headers,
        &actx,
        FragmentChange {
            operation: "updateEntity",
            method: axum::http::Method::PATCH,
            path: "/attrs",
            query: "",
            mode: ParseMode::Full,
        },
        &id,
        &v,
        &names,
    )
    .await?
    {
        return Ok(resp);
    }
    let outcome = write_one(&state, &tenant, EntityOp::Update { id, frag }).await?;
    Ok(update_response(outcome, &actx, &tenant))
}

async fn attribute_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    attr: &str,
    mode: ParseMode,
) -> ApiResult<(String, borough_core::AttrPatch, Value, ActiveContext)> {
    borough_core::validate::check_name("attribute name", attr)?;
    let (v, actx) = body_with_context(
        state,
        headers,
        body,
        state.config.max_body_bytes,
        mode == ParseMode::Patch,
    )
    .await?;
    let patch = parse_attribute(attr, &v, &actx.ctx, mode, 0)?;
    Ok((actx.ctx.expand(attr).into_owned(), patch, v, actx))
}

/// `PATCH /entities/{id}/attrs/{attr}`: partial attribute update.
pub async fn patch_attr(
    State(state): State<SharedState>,
    Path(path): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let make = |id, attr, patch| EntityOp::PatchAttr { id, attr, patch };
    let method = axum::http::Method::PATCH;
    attribute_with_body(
        state,
        path,
        headers,
        body,
        ParseMode::Patch,
        "updateAttrs",
        method,
        make,
    )
    .await
}

/// `PUT /entities/{id}/attrs/{attr}`: replace an attribute.
pub async fn replace_attr(
    State(state): State<SharedState>,
    Path(path): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let make = |id, attr, patch| EntityOp::ReplaceAttr { id, attr, patch };
    let method = axum::http::Method::PUT;
    attribute_with_body(
        state,
        path,
        headers,
        body,
        ParseMode::Full,
        "replaceAttrs",
        method,
        make,
    )
    .await
}

/// `DELETE /entities/{id}/attrs/{attr}` (`datasetId=`, `deleteAll=true`).
pub async fn delete_attr(
    State(state): State<SharedState>,
    Path((id, attr)): Path<(String, String)>,
    Query(params): Params,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let tenant = existing_tenant(&state, &headers)?;
    path_id(&id)?;
    borough_core::validate::check_name("attribute name", &attr)?;
    let delete_all = match params.get("deleteAll").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(NgsiError::bad_data(format!(
                "deleteAll must be true or false, not '{other}'"
            ))
            .into());
        }
    };
    let dataset_id = params.get("datasetId").cloned();
    if let Some(d) = &dataset_id {
        check_uri("datasetId", d)?;
    }
    if delete_all && dataset_id.is_some() {
        return Err(NgsiError::bad_data("datasetId and deleteAll=true exclude each other").into());
    }
    let actx = state
        .contexts
        .for_link(link_context(&headers)?.as_deref())
        .await?;
    let attr = actx.ctx.expand(&attr).into_owned();
    let query = match (&dataset_id, delete_all) {
        (Some(d), _) => format!(
            "?datasetId={}",
            percent_encoding::utf8_percent_encode(d, percent_encoding::NON_ALPHANUMERIC)
        ),
        (None, true) => "?deleteAll=true".to_string(),
        (None, false) => String::new(),
    };
    let change = AttributeChange {
        operation: "deleteAttrs",
        method: axum::http::Method::DELETE,
        query,
        body: None,
    };
    let op = EntityOp::DeleteAttr {
        id: id.clone(),
        attr: attr.clone(),
        dataset_id,
        delete_all,
    };
    write_attribute(&state, &tenant, &headers, &actx, (&id, &attr), change, op).await
}
