//! The temporal API (clauses 5.6.11–5.6.18, 5.7.3, 5.7.4): the history of
//! entities under `/ngsi-ld/v1/temporal/entities`, as instances (normalized),
//! simplified `temporalValues`, or `aggregatedValues`.
//!
//! Entity selection follows the entity query: `id`, `idPattern` and `type` are
//! checked against the entities that have history; `q`, `scopeQ` and
//! geo-queries against their current state, or, for an entity that has none
//! (created through the temporal API alone, or deleted), against the latest
//! instance of each of its attributes. A query answers only entities with an
//! instance (of the `attrs` asked for) in the time window. Instances are
//! filtered by `timerel` on `timeproperty` and bounded per attribute
//! (`ApiConfig::temporal_page_instances`); a cut answer is a 206 with
//! `Content-Range: date-time <first>-<last>/*`. `pick` and `omit` project as
//! in the entity query. Times are written with the digits they have
//! (`format_instant`): an instance sent at `10:00:00Z` comes back so.

use crate::contexts::ActiveContext;
use crate::entities::{
    body_with_context, existing_tenant, link_header, options, path_id, with_tenant,
};
use crate::federation;
use crate::problem::ApiResult;
use crate::query::{Paging, paging, projection, query_from_body, query_from_params};
use crate::request::{ResponseType, link_context, list_param, negotiate, tenant};
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
    InstanceId, Period, TimeProperty, TimeRange, format_instant,
};
use borough_core::validate::{check_name, check_uri, now_micros, parse_datetime};
use borough_core::{AttrKind, Attribute, Context, Entity, NgsiError, NgsiResult, RenderOptions};
use borough_store::{EntityStore, StoreError};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::Arc;

type Params = Query<HashMap<String, String>>;

/// Most instances (or aggregation buckets) returned per attribute, unless
/// configured otherwise (`ApiConfig::temporal_page_instances`).
pub const MAX_INSTANCES: usize = 10_000;
/// Most instances (or buckets) per attribute in one temporal query answer, over all its entities.
const MAX_RESPONSE_INSTANCES: usize = 1_000_000;
/// Fewest instances per attribute and entity of a query answer (within the page size).
const MIN_QUERY_INSTANCES: usize = 100;
/// Most instances in one temporal create/append body.
const MAX_BODY_INSTANCES: usize = 100_000;

/// How a temporal answer is represented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Normalized,
    TemporalValues,
    Aggregated,
}

/// What a temporal answer shows of each entity (`attrs`, `pick`, `omit`).
struct View {
    /// `attrs`: the attributes that select entities (and are shown).
    select: Option<Vec<String>>,
    /// The attributes shown (`attrs` or `pick`; `None`: all but `omit`).
    shown: Option<Vec<String>>,
    omit: Vec<String>,
    hide_id: bool,
    hide_type: bool,
}

impl View {
    fn from_projection(opts: RenderOptions, attrs: Vec<String>) -> Self {
        Self {
            select: (!attrs.is_empty()).then_some(attrs),
            shown: opts.attrs,
            omit: opts.omit,
            hide_id: opts.hide_id,
            hide_type: opts.hide_type,
        }
    }

    fn shows(&self, name: &str) -> bool {
        self.shown
            .as_ref()
            .is_none_or(|w| w.iter().any(|x| x == name))
            && !self.omit.iter().any(|x| x == name)
    }
}

/// Everything a temporal read asks, parsed from URL parameters (or a query body).
struct TemporalParams {
    /// The read of each entity: the attributes shown, in the time window.
    request: HistoryRequest,
    shape: Shape,
    sys_attrs: bool,
    view: View,
}

impl TemporalParams {
    /// A read that tells whether an entity has an instance of the selected
    /// attributes in the time window.
    fn probe(&self) -> HistoryRequest {
        HistoryRequest {
            attrs: self.view.select.clone(),
            last_n: Some(1),
            max_instances: 1,
            aggregation: None,
            ..self.request.clone()
        }
    }
}

/// Options of the temporal API.
const OPTIONS: [&str; 6] = [
    "temporalValues",
    "simplified",
    "aggregatedValues",
    "sysAttrs",
    "normalized",
    "count",
];

fn temporal_params(
    params: &HashMap<String, String>,
    view: View,
    temporal_q: Option<&Map<String, Value>>,
    page_instances: usize,
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
    let page_instances = page_instances.max(1);
    let opts = options(params, &OPTIONS).map_err(|e| e.0)?;
    // `simplified` is the 1.8 name of temporalValues.
    let has = |o: &str| {
        opts.iter()
            .any(|x| x == o || (o == "temporalValues" && x == "simplified"))
    };
    if has("temporalValues") && has("aggregatedValues") {
        return Err(NgsiError::bad_data(
            "options temporalValues and aggregatedValues cannot be combined",
        ));
    }
    let format = match params.get("format").map(String::as_str) {
        None | Some("normalized") => None,
        Some(f @ ("temporalValues" | "aggregatedValues")) => Some(f),
        Some("simplified") => Some("temporalValues"),
        Some(other) => {
            return Err(NgsiError::invalid(format!(
                "unknown format '{}'; use normalized, temporalValues (or simplified) or aggregatedValues",
                other.chars().take(80).collect::<String>()
            )));
        }
    };
    // An aggregation asked for by either parameter is what is answered.
    let shape = if has("aggregatedValues") || format == Some("aggregatedValues") {
        Shape::Aggregated
    } else if has("temporalValues") || format == Some("temporalValues") {
        Shape::TemporalValues
    } else {
        Shape::Normalized
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
            if n == 0 || n > page_instances {
                return Err(NgsiError::bad_data(format!(
                    "lastN must be between 1 and {page_instances}, not {n}"
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
    // Only what is shown is read; omitted attributes are left out when rendering.
    let read_attrs = view.shown.as_ref().map(|list| {
        list.iter()
            .filter(|a| !view.omit.contains(a))
            .cloned()
            .collect()
    });
    Ok(TemporalParams {
        request: HistoryRequest {
            attrs: read_attrs,
            time_property,
            range,
            last_n,
            max_instances: page_instances,
            aggregation,
        },
        shape,
        sys_attrs: has("sysAttrs"),
        view,
    })
}

/// `attrs`, `pick` and `omit` (expanded). The temporal options and formats
/// are not the entity query's, so they are taken out before the shared
/// projection rules apply.
fn view_params(params: &HashMap<String, String>, actx: &ActiveContext) -> NgsiResult<View> {
    let rest = without_formats(params);
    let (opts, attrs) = projection(&rest, None, actx)?;
    Ok(View::from_projection(opts, attrs))
}

fn without_formats(params: &HashMap<String, String>) -> HashMap<String, String> {
    let mut rest = params.clone();
    rest.remove("options");
    rest.remove("format");
    rest
}

/// Paging of a temporal query: `count=true` or `options=count` asks for the count.
fn temporal_paging(params: &HashMap<String, String>) -> NgsiResult<Paging> {
    if list_param(params.get("options").map(String::as_str)).contains(&"count") {
        let mut p = params.clone();
        p.insert("count".into(), "true".into());
        return paging(&p);
    }
    paging(params)
}

/// Members of a normalized attribute that hold its value (not sub-attributes).
const VALUE_MEMBERS: [&str; 7] = borough_core::entity::VALUE_KEYS;
/// Members of an attribute that are times.
const TIME_MEMBERS: [&str; 4] = ["observedAt", "createdAt", "modifiedAt", "deletedAt"];

/// Rewrites the times of a rendered attribute (and of its sub-attributes)
/// with the digits they have.
fn retime(m: &mut Map<String, Value>) {
    for (k, v) in m.iter_mut() {
        if VALUE_MEMBERS.contains(&k.as_str()) {
            continue;
        }
        match v {
            Value::String(s) if TIME_MEMBERS.contains(&k.as_str()) => {
                if let Some(t) = parse_datetime(s) {
                    *s = format_instant(t);
                }
            }
            Value::Object(sub) => retime(sub),
            _ => {}
        }
    }
}

/// Whether a history holds at least one instance or aggregation bucket.
fn has_data(h: &EntityHistory) -> bool {
    h.attrs.iter().any(|a| match &a.body {
        HistoryBody::Instances(list) => !list.is_empty(),
        HistoryBody::Aggregated { buckets, .. } => !buckets.is_empty(),
    })
}

/// Renders one entity's history.
fn render(h: &EntityHistory, ctx: &Context, tp: &TemporalParams) -> Value {
    let mut out = Map::new();
    if !tp.view.hide_id {
        out.insert("id".into(), Value::String(h.id.clone()));
    }
    if !tp.view.hide_type {
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
    }
    let opts = RenderOptions {
        sys_attrs: tp.sys_attrs,
        ..RenderOptions::default()
    };
    let mut by_name: Vec<(String, Vec<Value>)> = Vec::new();
    for a in &h.attrs {
        if !tp.view.shows(&a.name) {
            continue;
        }
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
                                tp.request.time_property.of(&i.attr).map(format_instant)
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
                            subs: None,
                        })
                        .unwrap_or(Value::Null);
                        if let Value::Object(m) = &mut v {
                            retime(m);
                            m.insert("instanceId".into(), Value::String(i.id.to_uri()));
                        }
                        v
                    })
                    .collect(),
            },
            HistoryBody::Aggregated { kind, buckets } => {
                if buckets.is_empty() {
                    continue;
                }
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
                                format_instant(b.start),
                                format_instant(b.end)
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

/// The member holding the simplified temporal values of each attribute kind
/// (clause 4.5.9).
fn simplified_key(kind: AttrKind) -> &'static str {
    match kind {
        AttrKind::Property | AttrKind::GeoProperty => "values",
        AttrKind::Relationship => "objects",
        // The plural terms of the core context (`ngsi-ld:hasLanguageMaps`, …).
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
            format_instant(first),
            format_instant(last)
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
        Ok::<_, StoreError>(out)
    })
    .await
    .map_err(|e| NgsiError::internal(format!("history read failed: {e}")))??;
    Ok(out)
}

/// `GET /temporal/entities/{id}`: with the sources registered for the
/// entity's history (retrieveTemporal), their instances merged in.
pub async fn retrieve(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    Query(params): Params,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let rt = negotiate(&headers, false)?;
    let tenant = existing_tenant(&state, &headers)?;
    path_id(&id)?;
    let actx = state
        .contexts
        .for_link(link_context(&headers)?.as_deref())
        .await?;
    let view = view_params(&params, &actx)?;
    let tp = temporal_params(&params, view, None, state.config.temporal_page_instances)?;
    let mut found = read_histories(&state, &tenant, vec![id.clone()], tp.request.clone()).await?;
    let local = found.pop();
    let (mut remote, mut failures) = (Vec::new(), Vec::new());
    if federation::route(&state, &tenant, &headers, &params) == federation::Route::Forward {
        let fwd = federation::Forward {
            state: &state,
            tenant: &tenant,
            headers: &headers,
            actx: &actx,
        };
        let types = local.as_ref().map(|h| h.types.as_slice());
        let qs = federation::forwarded_query_string(uri.query(), true);
        (remote, failures) = federation::retrieve_temporal(&fwd, &id, types, &qs).await;
        remote.retain(|e| e.get("id").and_then(Value::as_str) == Some(id.as_str()));
    }
    let (body, truncated) = match local {
        Some(h) => {
            crate::auth::check_entity_types(&id, &h.types)?;
            (render(&h, &actx.ctx, &tp), h.truncated)
        }
        None if !remote.is_empty() => {
            let first = remote.remove(0);
            if let Value::Object(m) = &first
                && !federation::caller_may_read(m, &actx)
            {
                return Err(NgsiError::not_found(format!(
                    "entity '{id}' has no temporal representation"
                ))
                .into());
            }
            (first, None)
        }
        None => {
            let missing = crate::problem::ApiError(NgsiError::not_found(format!(
                "entity '{id}' has no temporal representation"
            )));
            return Ok(federation::warn(missing.into_response(), &failures));
        }
    };
    let body = match body {
        Value::Object(mut m) => {
            m.remove("@context");
            for other in remote {
                if let Value::Object(o) = other {
                    federation::merge_temporal(&mut m, o);
                }
            }
            Value::Object(m)
        }
        other => other,
    };
    Ok(federation::warn(
        respond(rt, body, &actx, &tenant, truncated),
        &failures,
    ))
}

/// The entities of one page of a temporal query.
struct Selection {
    ids: Vec<String>,
    /// How many entities match in all (with a count).
    total: Option<usize>,
    has_next: bool,
}

/// The entity an entity without a current state was last: the latest instance
/// of each of its attributes.
fn latest_state(
    store: &dyn EntityStore,
    tenant: &str,
    id: &str,
    types: &[String],
) -> Result<Option<Entity>, StoreError> {
    let request = HistoryRequest {
        attrs: None,
        time_property: TimeProperty::ObservedAt,
        range: TimeRange::ALL,
        last_n: Some(1),
        max_instances: 1,
        aggregation: None,
    };
    let Some(h) = store.history(tenant, id, &request)? else {
        return Ok(None);
    };
    let mut e = Entity {
        id: id.to_string(),
        types: types.to_vec(),
        scopes: Vec::new(),
        attrs: Default::default(),
        created_at: 0,
        modified_at: 0,
    };
    for a in h.attrs {
        if let HistoryBody::Instances(list) = a.body {
            for i in list {
                e.attrs.entry(a.name.clone()).or_default().push(i.attr);
            }
        }
    }
    Ok(Some(e))
}

/// The entities with history that a temporal query selects, in id order: a
/// page of them, with whether there are more (and how many in all, with a
/// count). Blocking: it reads history.
fn select(
    store: &dyn EntityStore,
    tenant: &str,
    query: &EntityQuery,
    probe: &HistoryRequest,
    page: Paging,
) -> Result<Selection, StoreError> {
    let candidates = store.history_entities(tenant, None)?;
    // ids, idPattern and types are checked on what history knows of an entity;
    // q, scopeQ and geo-queries need its state.
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
    // Without a count, one entity past the page tells that there is a next page.
    let enough = if page.count {
        usize::MAX
    } else {
        page.offset.saturating_add(page.limit).saturating_add(1)
    };
    let mut matched = 0usize;
    let mut ids = Vec::new();
    for (id, types) in candidates {
        if matched >= enough {
            break;
        }
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
        if needs_state {
            let ok = match store.get(tenant, &stub.id) {
                Some(e) => content.matches(&e),
                None => latest_state(store, tenant, &stub.id, &stub.types)?
                    .is_some_and(|e| content.matches(&e)),
            };
            if !ok {
                continue;
            }
        }
        // Only entities with something to show in the window are answered.
        if !store
            .history(tenant, &stub.id, probe)?
            .is_some_and(|h| has_data(&h))
        {
            continue;
        }
        if matched >= page.offset && ids.len() < page.limit {
            ids.push(stub.id);
        }
        matched += 1;
    }
    Ok(Selection {
        has_next: matched > page.offset.saturating_add(ids.len()),
        total: page.count.then_some(matched),
        ids,
    })
}

#[allow(clippy::too_many_arguments)]
async fn query_and_respond(
    state: &SharedState,
    tenant: &str,
    mut query: EntityQuery,
    tp: TemporalParams,
    page: Paging,
    rt: ResponseType,
    actx: &ActiveContext,
    uri: &Uri,
    remote: Vec<Value>,
) -> ApiResult<Response> {
    if query.is_unrestricted() && tp.view.select.is_none() {
        return Err(NgsiError::bad_data(
            "the temporal query is too broad: give at least one of type, id, idPattern, attrs, q, scopeQ or a geo-query",
        )
        .into());
    }
    crate::query::scope_to_caller(&mut query);
    let store = state.store.clone();
    let owned_tenant = tenant.to_string();
    let probe = tp.probe();
    // With sources, the page is cut from the merged set: the local part is
    // read from the start.
    let local_page = if remote.is_empty() {
        page
    } else {
        Paging {
            offset: 0,
            limit: page.offset.saturating_add(page.limit),
            count: page.count,
        }
    };
    let sel = tokio::task::spawn_blocking(move || {
        select(store.as_ref(), &owned_tenant, &query, &probe, local_page)
    })
    .await
    .map_err(|e| NgsiError::internal(format!("history read failed: {e}")))??;
    // A page of many entities gets fewer instances each: the answer stays bounded.
    let mut request = tp.request.clone();
    let per_page = request.max_instances;
    request.max_instances = (MAX_RESPONSE_INSTANCES / sel.ids.len().max(1))
        .max(MIN_QUERY_INSTANCES)
        .min(per_page);
    if let Some(n) = request.last_n {
        request.last_n = Some(n.min(request.max_instances));
    }
    let histories = read_histories(state, tenant, sel.ids, request).await?;
    let mut truncated: Option<(i64, i64)> = None;
    let mut list = Vec::with_capacity(histories.len());
    for h in &histories {
        if let Some((a, b)) = h.truncated {
            truncated = Some(truncated.map_or((a, b), |(x, y)| (x.min(a), y.max(b))));
        }
        list.push(render(h, &actx.ctx, &tp));
    }
    let (mut total, mut has_next) = (sel.total, sel.has_next);
    if !remote.is_empty() {
        let held = list.len();
        merge_remote(&mut list, remote, actx);
        // Counted as far as the merged window reaches.
        total = total.map(|t| t + list.len() - held);
        has_next |= list.len() > page.offset.saturating_add(page.limit);
        list = list
            .into_iter()
            .skip(page.offset)
            .take(page.limit)
            .collect();
    }
    let resp = respond(rt, Value::Array(list), actx, tenant, truncated);
    let result = borough_store::QueryPage {
        entities: Vec::new(),
        total,
    };
    Ok(crate::query::paged(resp, &result, has_next, page, uri))
}

/// Merges the temporal entities sources answered into the local ones: an
/// entity held here as well gets their instances; the others join, in id
/// order. Entities of types the caller may not read are left out.
fn merge_remote(list: &mut Vec<Value>, remote: Vec<Value>, actx: &ActiveContext) {
    for other in remote {
        let Value::Object(mut o) = other else {
            continue;
        };
        if !federation::caller_may_read(&o, actx) {
            continue;
        }
        o.remove("@context");
        let id = o.get("id").cloned();
        match list.iter_mut().find(|e| e.get("id") == id.as_ref()) {
            Some(Value::Object(m)) => federation::merge_temporal(m, o),
            _ => list.push(Value::Object(o)),
        }
    }
    list.sort_by(|a, b| {
        let id = |v: &Value| {
            v.get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        id(a).cmp(&id(b))
    });
}

/// `GET /temporal/entities`: with the sources registered for temporal
/// queries (queryTemporal), their entities merged in.
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
    let page = temporal_paging(&params)?;
    let view = view_params(&params, &actx)?;
    let tp = temporal_params(&params, view, None, state.config.temporal_page_instances)?;
    // attrs selects through the history (an instance in the window), not the current state.
    let query = query_from_params(&params, Vec::new(), &actx)?;
    let (remote, failures) =
        if federation::route(&state, &tenant, &headers, &params) == federation::Route::Forward {
            let fwd = federation::Forward {
                state: &state,
                tenant: &tenant,
                headers: &headers,
                actx: &actx,
            };
            let qs = federation::forwarded_query_string(uri.query(), true);
            let limit = page.offset.saturating_add(page.limit);
            match federation::too_deep(&state, limit) {
                Some(deep) => (Vec::new(), vec![deep]),
                None => {
                    let request = federation::QueryRequest::Get(qs);
                    federation::query_temporal(&fwd, &query, request, None, limit).await
                }
            }
        } else {
            Default::default()
        };
    let resp = query_and_respond(&state, &tenant, query, tp, page, rt, &actx, &uri, remote).await?;
    Ok(federation::warn(resp, &failures))
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
    let page = temporal_paging(&params)?;
    let rest = without_formats(&params);
    let (query, attrs) = query_from_body(obj, &rest, &actx)?;
    // pick and omit are URL parameters; the body's attrs select and are shown.
    let (opts, _) = projection(&rest, None, &actx)?;
    let mut view = View::from_projection(opts, attrs.clone());
    if !attrs.is_empty() {
        view.shown = Some(attrs);
    }
    let temporal_q = match obj.get("temporalQ") {
        None => None,
        Some(Value::Object(t)) => Some(t),
        Some(_) => return Err(NgsiError::bad_data("temporalQ must be an object").into()),
    };
    let tp = temporal_params(
        &params,
        view,
        temporal_q,
        state.config.temporal_page_instances,
    )?;
    let (remote, failures) =
        if federation::route(&state, &tenant, &headers, &params) == federation::Route::Forward {
            let fwd = federation::Forward {
                state: &state,
                tenant: &tenant,
                headers: &headers,
                actx: &actx,
            };
            let limit = page.offset.saturating_add(page.limit);
            match federation::too_deep(&state, limit) {
                Some(deep) => (Vec::new(), vec![deep]),
                None => {
                    let request = federation::QueryRequest::Post(obj);
                    federation::query_temporal(&fwd, &query, request, uri.query(), limit).await
                }
            }
        } else {
            Default::default()
        };
    let resp = query_and_respond(&state, &tenant, query, tp, page, rt, &actx, &uri, remote).await?;
    Ok(federation::warn(resp, &failures))
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
            "id" | "@id"
                | "type"
                | "@type"
                | "@context"
                | "scope"
                | "createdAt"
                | "modifiedAt"
                | "deletedAt"
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
            let mut attr = patch.into_attribute(&iri, now)?;
            given_times(key, item, &mut attr, now)?;
            out.push((iri.clone(), attr));
        }
    }
    Ok(out)
}

/// An instance's `createdAt` and `modifiedAt` as the client gave them (a
/// temporal representation sent back keeps its times); one given stands for
/// both, none means now.
fn given_times(name: &str, item: &Value, attr: &mut Attribute, now: i64) -> NgsiResult<()> {
    let time = |member: &str| -> NgsiResult<Option<i64>> {
        match item.get(member) {
            None => Ok(None),
            Some(Value::String(s)) => parse_datetime(s).map(Some).ok_or_else(|| {
                NgsiError::bad_data(format!(
                    "{member} of '{name}' is not an ISO 8601 date-time: '{}'",
                    s.chars().take(80).collect::<String>()
                ))
            }),
            Some(_) => Err(NgsiError::bad_data(format!(
                "{member} of '{name}' must be a date-time string"
            ))),
        }
    };
    let created = time("createdAt")?;
    let modified = time("modifiedAt")?;
    if let (Some(c), Some(m)) = (created, modified)
        && m < c
    {
        return Err(NgsiError::bad_data(format!(
            "modifiedAt of '{name}' is earlier than its createdAt"
        )));
    }
    attr.created_at = created.or(modified).unwrap_or(now);
    attr.modified_at = modified.or(created).unwrap_or(now);
    Ok(())
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
    let with_history = {
        let tenant = tenant.clone();
        crate::off_executor(&state, move |s| s.history_entities(&tenant, None)).await?
    };
    let existing = with_history
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

/// An instanceId of the path: a URI (else 400); one this broker never gave
/// names no instance (404).
fn instance_id(s: &str, id: &str, attr: &str) -> ApiResult<InstanceId> {
    check_uri("instanceId", s)?;
    InstanceId::parse(s).ok_or_else(|| {
        NgsiError::not_found(format!(
            "attribute '{attr}' of entity '{id}' has no instance '{s}'"
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
    let instance = instance_id(&instance, &id, &attr)?;
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
    let instance = instance_id(&instance, &id, &attr)?;
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
    let r = {
        let tenant = tenant.clone();
        crate::off_executor(&state, move |s| s.retention(&tenant)).await?
    };
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
    crate::request::body_type(&headers, false)?;
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
        // A retention of seconds erases history as it is written: surely a slip.
        if p.micros < MIN_RETENTION_MICROS {
            return Err(NgsiError::bad_data(format!(
                "{what}: history is kept for at least an hour (PT1H)"
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
    if let Some(access) = &state.access {
        crate::auth::audit_change(
            access,
            Some(&tenant),
            "retention.set",
            None,
            v.clone(),
            None,
        )
        .await;
    }
    state.store.maintain_history().await?;
    Ok(no_content(&tenant))
}

/// The shortest history retention accepted.
const MIN_RETENTION_MICROS: i64 = 3_600_000_000;

fn micros_to_duration(m: i64) -> String {
    const DAY: i64 = 86_400_000_000;
    if m % DAY == 0 {
        format!("P{}D", m / DAY)
    } else {
        format!("PT{}S", m as f64 / 1e6)
    }
}
