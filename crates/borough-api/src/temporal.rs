//! The temporal API (clauses 5.6.11–5.6.18, 5.7.3, 5.7.4): the history of
//! entities under `/ngsi-ld/v1/temporal/entities`, as instances (normalized),
//! simplified `temporalValues`, or `aggregatedValues`.
//!
//! Entity selection follows the entity query: `id`, `idPattern` and `type` are
//! checked against the entities that have history; `q`, `scopeQ` and
//! geo-queries against their current state (an entity whose current state was
//! deleted is then not selected). Instances are filtered by `timerel` on
//! `timeproperty` and bounded per attribute; a cut answer is a 206 with
//! `Content-Range: date-time <first>-<last>/*`.

use crate::contexts::ActiveContext;
use crate::entities::{
    body_with_context, existing_tenant, link_header, options, path_id, with_tenant,
};
use crate::problem::ApiResult;
use crate::query::{Paging, paging, projection, query_from_body, query_from_params};
use crate::request::{ResponseType, link_context, negotiate, tenant};
use crate::{SharedState, typed_json_response};
use axum::body::Body;
use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use borough_core::entity::{ParseMode, parse_attribute};
use borough_core::query::EntityQuery;
use borough_core::render::AttributeView;
use borough_core::temporal::{
    AggrMethod, Aggregation, EntityHistory, HistoryBody, HistoryOp, HistoryOutcome, HistoryRequest,
    InstanceId, Period, TimeProperty, TimeRange,
};
use borough_core::validate::{check_name, check_uri, format_datetime, now_micros};
use borough_core::{AttrKind, Attribute, Context, Entity, NgsiError, NgsiResult, RenderOptions};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::Arc;

type Params = Query<HashMap<String, String>>;

/// Most instances (or aggregation buckets) returned per attribute.
pub const MAX_INSTANCES: usize = 10_000;
/// Most instances (or buckets) per attribute in one temporal query answer, over all its entities.
const MAX_RESPONSE_INSTANCES: usize = 1_000_000;
/// Most instances in one temporal create/append body.
const MAX_BODY_INSTANCES: usize = 100_000;

/// How a temporal answer is represented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Normalized,
    TemporalValues,
    Aggregated,
}

/// Everything a temporal read asks, parsed from URL parameters (or a query body).
struct TemporalParams {
    request: HistoryRequest,
    shape: Shape,
    sys_attrs: bool,
}

fn temporal_params(
    params: &HashMap<String, String>,
    attrs: Option<Vec<String>>,
    temporal_q: Option<&Map<String, Value>>,
) -> NgsiResult<TemporalParams> {
    // Members of a query body's temporalQ stand for the URL parameters.
    let get = |k: &str| -> Option<String> {
        temporal_q
            .and_then(|t| t.get(k))
            .and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .or_else(|| params.get(k).cloned())
    };
    let opts = options(
        params,
        &[
            "temporalValues",
            "aggregatedValues",
            "sysAttrs",
            "normalized",
        ],
    )
    .map_err(|e| e.0)?;
    let has = |o: &str| opts.iter().any(|x| x == o);
    let format = params.get("format").map(String::as_str);
    let shape = match (
        has("temporalValues") || format == Some("temporalValues"),
        has("aggregatedValues") || format == Some("aggregatedValues"),
    ) {
        (true, true) => {
            return Err(NgsiError::bad_data(
                "temporalValues and aggregatedValues cannot be combined",
            ));
        }
        (true, false) => Shape::TemporalValues,
        (false, true) => Shape::Aggregated,
        (false, false) => Shape::Normalized,
    };
    let range = TimeRange::parse(
        get("timerel").as_deref(),
        get("timeAt").as_deref(),
        get("endTimeAt").as_deref(),
    )?;
    let time_property = match get("timeproperty") {
        Some(p) => TimeProperty::parse(&p)?,
        None => TimeProperty::ObservedAt,
    };
    let last_n = match get("lastN") {
        None => None,
        Some(v) => {
            let n: usize = v.parse().map_err(|_| {
                NgsiError::bad_data(format!("lastN must be a positive integer, not '{v}'"))
            })?;
            if n == 0 || n > MAX_INSTANCES {
                return Err(NgsiError::bad_data(format!(
                    "lastN must be between 1 and {MAX_INSTANCES}, not {n}"
                )));
            }
            Some(n)
        }
    };
    let aggregation = if shape == Shape::Aggregated {
        let methods = AggrMethod::parse_list(&get("aggrMethods").unwrap_or_default())?;
        let period = get("aggrPeriodDuration")
            .map(|d| Period::parse(&d))
            .transpose()?;
        if last_n.is_some() {
            return Err(NgsiError::bad_data(
                "lastN cannot be combined with aggregatedValues",
            ));
        }
        Some(Aggregation { methods, period })
    } else {
        if get("aggrMethods").is_some() || get("aggrPeriodDuration").is_some() {
            return Err(NgsiError::bad_data(
                "aggrMethods and aggrPeriodDuration need options=aggregatedValues",
            ));
        }
        None
    };
    Ok(TemporalParams {
        request: HistoryRequest {
            attrs,
            time_property,
            range,
            last_n,
            max_instances: MAX_INSTANCES,
            aggregation,
        },
        shape,
        sys_attrs: has("sysAttrs"),
    })
}

/// `attrs` (expanded). The temporal options are not the entity query's, so
/// they are taken out before the shared projection rules apply.
fn attrs_param(
    params: &HashMap<String, String>,
    actx: &ActiveContext,
) -> NgsiResult<Option<Vec<String>>> {
    let mut rest = params.clone();
    rest.remove("options");
    rest.remove("format");
    let (_, attrs) = projection(&rest, None, actx)?;
    Ok((!attrs.is_empty()).then_some(attrs))
}

/// Renders one entity's history.
fn render(h: &EntityHistory, ctx: &Context, tp: &TemporalParams) -> Value {
    let mut out = Map::new();
    out.insert("id".into(), Value::String(h.id.clone()));
    let types: Vec<Value> = h
        .types
        .iter()
        .map(|t| Value::String(ctx.compact(t).into_owned()))
        .collect();
    out.insert(
        "type".into(),
        match <[Value; 1]>::try_from(types) {
            Ok([one]) => one,
            Err(many) => Value::Array(many),
        },
    );
    let opts = RenderOptions {
        sys_attrs: tp.sys_attrs,
        ..RenderOptions::default()
    };
    let mut by_name: Vec<(String, Vec<Value>)> = Vec::new();
    for a in &h.attrs {
        let rendered: Vec<Value> = match &a.body {
            HistoryBody::Instances(list) => match tp.shape {
                Shape::TemporalValues => {
                    let Some(first) = list.first() else { continue };
                    let kind = first.attr.kind;
                    let values: Vec<Value> = list
                        .iter()
                        .map(|i| {
                            json!([
                                borough_core::render::render_attribute(&i.attr, ctx, &opts)
                                    .get(kind.value_key())
                                    .cloned()
                                    .unwrap_or(Value::Null),
                                format_datetime(tp.request.time_property.of(&i.attr))
                            ])
                        })
                        .collect();
                    let mut m = Map::new();
                    m.insert("type".into(), Value::String(kind.name().into()));
                    m.insert(simplified_key(kind).into(), Value::Array(values));
                    if let Some(d) = &a.dataset_id {
                        m.insert("datasetId".into(), Value::String(d.clone()));
                    }
                    vec![Value::Object(m)]
                }
                _ => list
                    .iter()
                    .map(|i| {
                        let mut v = serde_json::to_value(AttributeView {
                            attr: &i.attr,
                            ctx,
                            opts: &opts,
                        })
                        .unwrap_or(Value::Null);
                        if let Value::Object(m) = &mut v {
                            m.insert("instanceId".into(), Value::String(i.id.to_uri()));
                        }
                        v
                    })
                    .collect(),
            },
            HistoryBody::Aggregated { kind, buckets } => {
                let methods = tp
                    .request
                    .aggregation
                    .as_ref()
                    .map(|a| a.methods.as_slice())
                    .unwrap_or_default();
                let mut m = Map::new();
                m.insert("type".into(), Value::String(kind.name().into()));
                for (i, method) in methods.iter().enumerate() {
                    let series: Vec<Value> = buckets
                        .iter()
                        .map(|b| {
                            json!([
                                b.values.get(i).cloned().unwrap_or(Value::Null),
                                format_datetime(b.start),
                                format_datetime(b.end)
                            ])
                        })
                        .collect();
                    m.insert(method.name().into(), Value::Array(series));
                }
                if let Some(d) = &a.dataset_id {
                    m.insert("datasetId".into(), Value::String(d.clone()));
                }
                vec![Value::Object(m)]
            }
        };
        if rendered.is_empty() {
            continue;
        }
        let name = ctx.compact(&a.name).into_owned();
        match by_name.iter_mut().find(|(n, _)| *n == name) {
            Some((_, list)) => list.extend(rendered),
            None => by_name.push((name, rendered)),
        }
    }
    for (name, mut list) in by_name {
        let v = if list.len() == 1 && tp.shape != Shape::Normalized {
            list.remove(0)
        } else {
            Value::Array(list)
        };
        out.insert(name, v);
    }
    Value::Object(out)
}

/// The member holding the simplified temporal values of each attribute kind.
fn simplified_key(kind: AttrKind) -> &'static str {
    match kind {
        AttrKind::Property | AttrKind::GeoProperty => "values",
        AttrKind::Relationship => "objects",
        AttrKind::LanguageProperty => "languageMaps",
        AttrKind::VocabProperty => "vocabs",
        AttrKind::JsonProperty => "jsons",
        AttrKind::ListProperty => "valueLists",
        AttrKind::ListRelationship => "objectLists",
    }
}

fn respond(
    rt: ResponseType,
    body: Value,
    actx: &ActiveContext,
    tenant: &str,
    truncated: Option<(i64, i64)>,
) -> Response {
    let body = match (rt, body) {
        (ResponseType::LdJson, Value::Object(m)) => {
            let mut out = Map::with_capacity(m.len() + 1);
            out.insert("@context".into(), actx.source.as_value());
            out.extend(m);
            Value::Object(out)
        }
        (ResponseType::LdJson, Value::Array(list)) => Value::Array(
            list.into_iter()
                .map(|e| match e {
                    Value::Object(m) => {
                        let mut out = Map::with_capacity(m.len() + 1);
                        out.insert("@context".into(), actx.source.as_value());
                        out.extend(m);
                        Value::Object(out)
                    }
                    other => other,
                })
                .collect(),
        ),
        (_, b) => b,
    };
    let (status, media) = match (truncated.is_some(), rt) {
        (true, ResponseType::LdJson) => (StatusCode::PARTIAL_CONTENT, "application/ld+json"),
        (true, _) => (StatusCode::PARTIAL_CONTENT, "application/json"),
        (false, ResponseType::LdJson) => (StatusCode::OK, "application/ld+json"),
        (false, _) => (StatusCode::OK, "application/json"),
    };
    let mut resp = typed_json_response(status, &body, media);
    if rt != ResponseType::LdJson {
        resp.headers_mut().insert(header::LINK, link_header(actx));
    }
    if let Some((first, last)) = truncated
        && let Ok(v) = HeaderValue::from_str(&format!(
            "date-time {}-{}/*",
            format_datetime(first),
            format_datetime(last)
        ))
    {
        resp.headers_mut().insert(header::CONTENT_RANGE, v);
    }
    with_tenant(resp, tenant)
}

/// Reads histories off the async executor (they read the store's file).
async fn read_histories(
    state: &SharedState,
    tenant: &str,
    ids: Vec<String>,
    request: HistoryRequest,
) -> ApiResult<Vec<EntityHistory>> {
    let store = state.store.clone();
    let tenant = tenant.to_string();
    let out = tokio::task::spawn_blocking(move || {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(h) = store.history(&tenant, &id, &request)? {
                out.push(h);
            }
        }
        Ok::<_, borough_store::StoreError>(out)
    })
    .await
    .map_err(|e| NgsiError::internal(format!("history read failed: {e}")))??;
    Ok(out)
}

/// `GET /temporal/entities/{id}`
pub async fn retrieve(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    Query(params): Params,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let rt = negotiate(&headers, false)?;
    let tenant = existing_tenant(&state, &headers)?;
    path_id(&id)?;
    let actx = state
        .contexts
        .for_link(link_context(&headers)?.as_deref())
        .await?;
    let attrs = attrs_param(&params, &actx)?;
    let tp = temporal_params(&params, attrs, None)?;
    let mut found = read_histories(&state, &tenant, vec![id.clone()], tp.request.clone()).await?;
    let h = found.pop().ok_or_else(|| {
        NgsiError::not_found(format!("entity '{id}' has no temporal representation"))
    })?;
    let body = render(&h, &actx.ctx, &tp);
    Ok(respond(rt, body, &actx, &tenant, h.truncated))
}

/// The entities with history that a temporal query selects, in id order.
fn select(state: &SharedState, tenant: &str, query: &EntityQuery) -> ApiResult<Vec<String>> {
    let candidates = state.store.history_entities(tenant, None)?;
    // ids, idPattern and types are checked on what history knows of an entity;
    // q, scopeQ and geo-queries need its current state.
    let identity = EntityQuery {
        ids: query.ids.clone(),
        id_pattern: query.id_pattern.clone(),
        types: query.types.clone(),
        selectors: query.selectors.clone(),
        ..EntityQuery::default()
    };
    let content = EntityQuery {
        q: query.q.clone(),
        scope_q: query.scope_q.clone(),
        geo: query.geo.clone(),
        ..EntityQuery::default()
    };
    let needs_state = !content.is_unrestricted();
    let mut out = Vec::new();
    for (id, types) in candidates {
        let stub = Entity {
            id,
            types,
            scopes: Vec::new(),
            attrs: Default::default(),
            created_at: 0,
            modified_at: 0,
        };
        if !identity.matches(&stub) {
            continue;
        }
        if needs_state
            && !state
                .store
                .get(tenant, &stub.id)
                .is_some_and(|e| content.matches(&e))
        {
            continue;
        }
        out.push(stub.id);
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn query_and_respond(
    state: &SharedState,
    tenant: &str,
    query: EntityQuery,
    tp: TemporalParams,
    page: Paging,
    rt: ResponseType,
    actx: &ActiveContext,
    uri: &Uri,
) -> ApiResult<Response> {
    if query.is_unrestricted() && tp.request.attrs.is_none() {
        return Err(NgsiError::bad_data(
            "the temporal query is too broad: give at least one of type, id, idPattern, attrs, q, scopeQ or a geo-query",
        )
        .into());
    }
    let ids = select(state, tenant, &query)?;
    let total = ids.len();
    let page_ids: Vec<String> = ids.into_iter().skip(page.offset).take(page.limit).collect();
    let has_next = page.offset + page_ids.len() < total;
    let wanted_attrs = tp.request.attrs.is_some();
    // A page of many entities gets fewer instances each: the answer stays bounded.
    let mut request = tp.request.clone();
    request.max_instances =
        (MAX_RESPONSE_INSTANCES / page_ids.len().max(1)).clamp(100, MAX_INSTANCES);
    if let Some(n) = request.last_n {
        request.last_n = Some(n.min(request.max_instances));
    }
    let histories = read_histories(state, tenant, page_ids, request).await?;
    let mut truncated: Option<(i64, i64)> = None;
    let mut list = Vec::with_capacity(histories.len());
    for h in &histories {
        if wanted_attrs && h.attrs.is_empty() {
            continue;
        }
        if let Some((a, b)) = h.truncated {
            truncated = Some(truncated.map_or((a, b), |(x, y)| (x.min(a), y.max(b))));
        }
        list.push(render(h, &actx.ctx, &tp));
    }
    let resp = respond(rt, Value::Array(list), actx, tenant, truncated);
    let result = borough_store::QueryPage {
        entities: Vec::new(),
        total: page.count.then_some(total),
    };
    Ok(crate::query::paged(resp, &result, has_next, page, uri))
}

/// `GET /temporal/entities`
pub async fn query_get(
    State(state): State<SharedState>,
    Query(params): Params,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let rt = negotiate(&headers, false)?;
    let tenant = existing_tenant(&state, &headers)?;
    let actx = state
        .contexts
        .for_link(link_context(&headers)?.as_deref())
        .await?;
    let page = paging(&params)?;
    let attrs = attrs_param(&params, &actx)?;
    let tp = temporal_params(&params, attrs, None)?;
    // attrs selects what is shown, not which entities: the history decides.
    let query = query_from_params(&params, Vec::new(), &actx)?;
    query_and_respond(&state, &tenant, query, tp, page, rt, &actx, &uri).await
}

/// `POST /temporal/entityOperations/query`
pub async fn query_post(
    State(state): State<SharedState>,
    Query(params): Params,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let rt = negotiate(&headers, false)?;
    let tenant = existing_tenant(&state, &headers)?;
    let (v, actx) =
        body_with_context(&state, &headers, body, state.config.max_body_bytes, false).await?;
    let obj = v
        .as_object()
        .ok_or_else(|| NgsiError::bad_data("a query body must be a JSON object"))?;
    if obj.get("type").and_then(Value::as_str) != Some("Query") {
        return Err(NgsiError::bad_data("a query body needs \"type\": \"Query\"").into());
    }
    let page = paging(&params)?;
    let mut rest = params.clone();
    rest.remove("options");
    rest.remove("format");
    let (query, attrs) = query_from_body(obj, &rest, &actx)?;
    let temporal_q = match obj.get("temporalQ") {
        None => None,
        Some(Value::Object(t)) => Some(t),
        Some(_) => return Err(NgsiError::bad_data("temporalQ must be an object").into()),
    };
    let tp = temporal_params(&params, (!attrs.is_empty()).then_some(attrs), temporal_q)?;
    query_and_respond(&state, &tenant, query, tp, page, rt, &actx, &uri).await
}

/// Parses a temporal entity body's attributes: each a single instance or an
/// array of instances.
fn parse_instances(
    obj: &Map<String, Value>,
    ctx: &Context,
    now: i64,
) -> NgsiResult<Vec<(String, Attribute)>> {
    let mut out = Vec::new();
    for (key, v) in obj {
        if matches!(
            key.as_str(),
            "id" | "@id" | "type" | "@type" | "@context" | "scope" | "createdAt" | "modifiedAt"
        ) {
            continue;
        }
        check_name("attribute name", key)?;
        let iri = ctx.expand(key).into_owned();
        let items: Vec<&Value> = match v {
            Value::Array(a) => a.iter().collect(),
            other => vec![other],
        };
        for item in items {
            if out.len() >= MAX_BODY_INSTANCES {
                return Err(NgsiError::bad_data(format!(
                    "at most {MAX_BODY_INSTANCES} instances may be sent at once"
                )));
            }
            let patch = parse_attribute(key, item, ctx, ParseMode::Full, 0)?;
            out.push((iri.clone(), patch.into_attribute(&iri, now)?));
        }
    }
    Ok(out)
}

fn parse_types(v: Option<&Value>, ctx: &Context) -> NgsiResult<Vec<String>> {
    let names: Vec<&str> = match v {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|t| {
                t.as_str()
                    .ok_or_else(|| NgsiError::bad_data("type must be a string or strings"))
            })
            .collect::<NgsiResult<_>>()?,
        _ => return Err(NgsiError::bad_data("a temporal entity needs a type")),
    };
    names
        .into_iter()
        .map(|n| {
            check_name("entity type", n)?;
            Ok(ctx.expand(n).into_owned())
        })
        .collect()
}

async fn write(state: &SharedState, tenant: &str, op: HistoryOp) -> ApiResult<HistoryOutcome> {
    Ok(state.store.write_history(tenant, op).await?)
}

fn no_content(tenant: &str) -> Response {
    with_tenant(StatusCode::NO_CONTENT.into_response(), tenant)
}

/// `POST /temporal/entities`: creates a temporal representation, or adds to it.
pub async fn create(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = tenant(&headers)?;
    let (v, actx) = body_with_context(
        &state,
        &headers,
        body,
        state.config.max_batch_body_bytes,
        false,
    )
    .await?;
    let obj = v
        .as_object()
        .ok_or_else(|| NgsiError::bad_data("a temporal entity must be a JSON object"))?;
    let id = obj
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| NgsiError::bad_data("a temporal entity needs an id"))?
        .to_string();
    check_uri("entity id", &id)?;
    let types = parse_types(obj.get("type"), &actx.ctx)?;
    let instances = parse_instances(obj, &actx.ctx, now_micros())?;
    let outcome = write(
        &state,
        &tenant,
        HistoryOp::Append {
            id: id.clone(),
            types,
            instances,
        },
    )
    .await?;
    Ok(match outcome {
        HistoryOutcome::Created => {
            let mut r = StatusCode::CREATED.into_response();
            if let Ok(loc) = HeaderValue::from_str(&format!(
                "/ngsi-ld/v1/temporal/entities/{}",
                crate::request::encode_path_segment(&id)
            )) {
                r.headers_mut().insert(header::LOCATION, loc);
            }
            with_tenant(r, &tenant)
        }
        _ => no_content(&tenant),
    })
}

/// `POST /temporal/entities/{id}/attrs`: adds instances to an existing representation.
pub async fn append(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = existing_tenant(&state, &headers)?;
    path_id(&id)?;
    let (v, actx) = body_with_context(
        &state,
        &headers,
        body,
        state.config.max_batch_body_bytes,
        false,
    )
    .await?;
    let obj = v
        .as_object()
        .ok_or_else(|| NgsiError::bad_data("the body must be a JSON object of attributes"))?;
    let existing = state
        .store
        .history_entities(&tenant, None)?
        .into_iter()
        .find(|(e, _)| *e == id)
        .ok_or_else(|| {
            NgsiError::not_found(format!("entity '{id}' has no temporal representation"))
        })?;
    let instances = parse_instances(obj, &actx.ctx, now_micros())?;
    write(
        &state,
        &tenant,
        HistoryOp::Append {
            id,
            types: existing.1,
            instances,
        },
    )
    .await?;
    Ok(no_content(&tenant))
}

fn found(outcome: HistoryOutcome, what: impl FnOnce() -> String) -> ApiResult<()> {
    if outcome == HistoryOutcome::NotFound {
        Err(NgsiError::not_found(what()).into())
    } else {
        Ok(())
    }
}

/// `DELETE /temporal/entities/{id}`
pub async fn delete(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let tenant = existing_tenant(&state, &headers)?;
    path_id(&id)?;
    let outcome = write(&state, &tenant, HistoryOp::DeleteEntity { id: id.clone() }).await?;
    found(outcome, || {
        format!("entity '{id}' has no temporal representation")
    })?;
    Ok(no_content(&tenant))
}

async fn attr_context(
    state: &SharedState,
    headers: &HeaderMap,
) -> ApiResult<Arc<borough_core::Context>> {
    Ok(state
        .contexts
        .for_link(link_context(headers)?.as_deref())
        .await?
        .ctx)
}

/// `DELETE /temporal/entities/{id}/attrs/{attr}` (`datasetId`, `deleteAll`)
pub async fn delete_attr(
    State(state): State<SharedState>,
    Path((id, attr)): Path<(String, String)>,
    Query(params): Params,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let tenant = existing_tenant(&state, &headers)?;
    path_id(&id)?;
    check_name("attribute name", &attr)?;
    let ctx = attr_context(&state, &headers).await?;
    let all = match params.get("deleteAll").map(String::as_str) {
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
    let name = ctx.expand(&attr).into_owned();
    let outcome = write(
        &state,
        &tenant,
        HistoryOp::DeleteAttr {
            id: id.clone(),
            name,
            dataset_id,
            all,
        },
    )
    .await?;
    found(outcome, || {
        format!("entity '{id}' has no history of attribute '{attr}'")
    })?;
    Ok(no_content(&tenant))
}

fn instance_id(s: &str) -> ApiResult<InstanceId> {
    InstanceId::parse(s).ok_or_else(|| {
        NgsiError::bad_data(format!(
            "'{s}' is not an instanceId of this broker (urn:ngsi-ld:instance:…)"
        ))
        .into()
    })
}

/// `DELETE /temporal/entities/{id}/attrs/{attr}/{instanceId}`
pub async fn delete_instance(
    State(state): State<SharedState>,
    Path((id, attr, instance)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let tenant = existing_tenant(&state, &headers)?;
    path_id(&id)?;
    check_name("attribute name", &attr)?;
    let instance = instance_id(&instance)?;
    let ctx = attr_context(&state, &headers).await?;
    let name = ctx.expand(&attr).into_owned();
    let outcome = write(
        &state,
        &tenant,
        HistoryOp::DeleteInstance {
            id: id.clone(),
            name,
            instance,
        },
    )
    .await?;
    found(outcome, || {
        format!("attribute '{attr}' of entity '{id}' has no such instance")
    })?;
    Ok(no_content(&tenant))
}

/// `PATCH /temporal/entities/{id}/attrs/{attr}/{instanceId}`: replaces an instance.
pub async fn modify_instance(
    State(state): State<SharedState>,
    Path((id, attr, instance)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = existing_tenant(&state, &headers)?;
    path_id(&id)?;
    check_name("attribute name", &attr)?;
    let instance = instance_id(&instance)?;
    let (v, actx) =
        body_with_context(&state, &headers, body, state.config.max_body_bytes, false).await?;
    let name = actx.ctx.expand(&attr).into_owned();
    // The body is the instance itself, or an object holding it under the attribute's name.
    let item = match v.as_object().and_then(|o| o.get(&attr)) {
        Some(inner) => inner.clone(),
        None => v,
    };
    let patch = parse_attribute(&attr, &item, &actx.ctx, ParseMode::Full, 0)?;
    let new = patch.into_attribute(&name, now_micros())?;
    let outcome = write(
        &state,
        &tenant,
        HistoryOp::ModifyInstance {
            id: id.clone(),
            name,
            instance,
            attr: Box::new(new),
        },
    )
    .await?;
    found(outcome, || {
        format!("attribute '{attr}' of entity '{id}' has no such instance")
    })?;
    Ok(no_content(&tenant))
}

/// `GET /api/v1/history/retention`: the tenant's retention rules.
pub async fn get_retention(
    State(state): State<SharedState>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let tenant = existing_tenant(&state, &headers)?;
    let r = state.store.retention(&tenant)?;
    let ctx = crate::contexts::ActiveContext::core().ctx;
    let types: Map<String, Value> = r
        .types
        .iter()
        .map(|(t, d)| {
            (
                ctx.compact(t).into_owned(),
                Value::String(micros_to_duration(*d)),
            )
        })
        .collect();
    let body = json!({
        "default": r.default.map(micros_to_duration),
        "types": types,
    });
    Ok(with_tenant(
        typed_json_response(StatusCode::OK, &body, "application/json"),
        &tenant,
    ))
}

/// `PUT /api/v1/history/retention`: `{"default": "P365D", "types": {"AirQualityObserved": "P30D"}}`.
/// Durations are fixed lengths (days, hours...), since old data is dropped by age.
pub async fn put_retention(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = tenant(&headers)?;
    let v = crate::request::read_json(body, state.config.max_body_bytes).await?;
    let obj = v
        .as_object()
        .ok_or_else(|| NgsiError::bad_data("retention must be a JSON object"))?;
    let ctx = crate::contexts::ActiveContext::core().ctx;
    let fixed = |what: &str, v: &Value| -> NgsiResult<i64> {
        let s = v
            .as_str()
            .ok_or_else(|| NgsiError::bad_data(format!("{what} must be an ISO 8601 duration")))?;
        let p = Period::parse(s)?;
        if p.months > 0 {
            return Err(NgsiError::bad_data(format!(
                "{what}: use days rather than months or years (e.g. P365D)"
            )));
        }
        Ok(p.micros)
    };
    let mut r = borough_core::temporal::Retention::default();
    for (k, v) in obj {
        match k.as_str() {
            "default" if v.is_null() => {}
            "default" => r.default = Some(fixed("default", v)?),
            "types" => {
                let types = v
                    .as_object()
                    .ok_or_else(|| NgsiError::bad_data("types must be an object of durations"))?;
                for (t, d) in types {
                    check_name("entity type", t)?;
                    r.types.push((ctx.expand(t).into_owned(), fixed(t, d)?));
                }
            }
            other => {
                return Err(NgsiError::bad_data(format!(
                    "unknown member '{other}'; expected default and types"
                ))
                .into());
            }
        }
    }
    state.store.set_retention(&tenant, r).await?;
    state.store.maintain_history().await?;
    Ok(no_content(&tenant))
}

fn micros_to_duration(m: i64) -> String {
    const DAY: i64 = 86_400_000_000;
    if m % DAY == 0 {
        format!("P{}D", m / DAY)
    } else {
        format!("PT{}S", m as f64 / 1e6)
    }
}
