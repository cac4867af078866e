//! Querying entities (clause 5.7.2): `GET /entities` and
//! `POST /entityOperations/query`, with projection, language and dataset
//! selection, pagination and every representation.

use crate::contexts::ActiveContext;
use crate::entities::{body_with_context, existing_tenant, represent, represent_view};
use crate::problem::ApiResult;
use crate::request::{ResponseType, link_context, list_param, negotiate};
use crate::{AppState, SharedState};
use axum::body::Body;
use axum::extract::{OriginalUri, Query, State};
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use borough_core::entity::render_feature;
use borough_core::query::geo::{GeoQuery, parse_geo_q, parse_geo_query};
use borough_core::query::projection::{Projected, parse_projection};
use borough_core::query::{
    EntityQuery, EntitySelector, compile_id_pattern, parse_q, parse_scope_q, parse_type_expr,
};
use borough_core::render::EntityListView;
use borough_core::render::SubSelect;
use borough_core::validate::check_uri;
use borough_core::{NgsiError, NgsiResult, RenderOptions};
use serde_json::{Value, json};
use std::collections::HashMap;

type Params = Query<HashMap<String, String>>;

/// Entities per page when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 20;
/// Largest `limit` accepted.
pub const MAX_LIMIT: usize = 1000;
/// Most ids in one `id` list.
const MAX_IDS: usize = 1000;

pub const GEO_PARAMS: [&str; 4] = ["georel", "geometry", "coordinates", "geoproperty"];

/// Paging parameters.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Paging {
    pub offset: usize,
    pub limit: usize,
    pub count: bool,
}

pub(crate) fn paging(params: &HashMap<String, String>) -> NgsiResult<Paging> {
    let number = |name: &str, default: usize| -> NgsiResult<usize> {
        match params.get(name) {
            None => Ok(default),
            Some(v) => v.parse::<usize>().map_err(|_| {
                NgsiError::bad_data(format!("{name} must be a non-negative integer, not '{v}'"))
            }),
        }
    };
    let limit = number("limit", DEFAULT_LIMIT)?;
    let offset = number("offset", 0)?;
    let count = match params.get("count").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(NgsiError::bad_data(format!(
                "count must be true or false, not '{other}'"
            )));
        }
    };
    if limit > MAX_LIMIT {
        return Err(NgsiError::new(
            borough_core::ProblemKind::TooManyResults,
            format!("limit must be at most {MAX_LIMIT}"),
        ));
    }
    if limit == 0 && !count {
        return Err(NgsiError::bad_data(
            "limit=0 is only allowed with count=true",
        ));
    }
    Ok(Paging {
        offset,
        limit,
        count,
    })
}

/// Projection and representation options shared by both query forms.
pub(crate) fn projection(
    params: &HashMap<String, String>,
    body_attrs: Option<Vec<String>>,
    actx: &ActiveContext,
) -> NgsiResult<(RenderOptions, Vec<String>)> {
    let mut opts = crate::entities::render_options(params).map_err(|e| e.0)?;
    // `attrs` both selects (an entity needs one of them) and projects.
    let attrs: Vec<String> = match body_attrs {
        Some(list) => list,
        None => list_param(params.get("attrs").map(String::as_str))
            .into_iter()
            .map(str::to_string)
            .collect(),
    };
    let attrs: Vec<String> = attrs
        .iter()
        .map(|a| {
            if matches!(a.as_str(), "id" | "type" | "scope") {
                return Err(NgsiError::bad_data(format!(
                    "attrs names attributes, and '{a}' is not one; use pick to select it"
                )));
            }
            borough_core::validate::check_name("attribute name", a)?;
            Ok(actx.ctx.expand(a).into_owned())
        })
        .collect::<NgsiResult<_>>()?;
    opts.attrs = (!attrs.is_empty()).then(|| attrs.clone());
    let parse = |name: &'static str| -> NgsiResult<Vec<Projected>> {
        match params.get(name) {
            None => Ok(Vec::new()),
            Some(v) => parse_projection(v, name),
        }
    };
    let pick = parse("pick")?;
    let omit = parse("omit")?;
    if let Some(both) = pick.iter().find(|p| omit.iter().any(|o| o.name == p.name)) {
        return Err(NgsiError::bad_data(format!(
            "'{}' is both picked and omitted",
            both.name
        )));
    }
    let is_core = |p: &&Projected| matches!(p.name.as_str(), "id" | "type" | "scope");
    if let Some(core) = pick
        .iter()
        .chain(&omit)
        .find(|p| is_core(p) && !p.nested.is_empty())
    {
        return Err(NgsiError::bad_data(format!(
            "'{}' has no members to project",
            core.name
        )));
    }
    let names = |list: &[Projected]| -> Vec<String> {
        list.iter()
            .filter(|p| !is_core(p))
            .map(|p| actx.ctx.expand(&p.name).into_owned())
            .collect()
    };
    let nested = |list: &[Projected], only: bool| {
        list.iter()
            .filter(|p| !p.nested.is_empty())
            .map(|p| {
                let subs = p
                    .nested
                    .iter()
                    .map(|n| actx.ctx.expand(&n.name).into_owned())
                    .collect();
                let select = if only {
                    SubSelect::Only(subs)
                } else {
                    SubSelect::Drop(subs)
                };
                (actx.ctx.expand(&p.name).into_owned(), select)
            })
            .collect::<Vec<_>>()
    };
    let has = |list: &[Projected], name: &str| list.iter().any(|p| p.name == name);
    if !pick.is_empty() {
        if !attrs.is_empty() {
            return Err(NgsiError::bad_data(
                "pick and attrs exclude each other; use one",
            ));
        }
        opts.hide_id = !has(&pick, "id");
        opts.hide_type = !has(&pick, "type");
        opts.hide_scope = !has(&pick, "scope");
        opts.attrs = Some(names(&pick));
        opts.sub_attrs = nested(&pick, true);
    }
    if !omit.is_empty() {
        opts.hide_id |= has(&omit, "id");
        opts.hide_type |= has(&omit, "type");
        opts.hide_scope |= has(&omit, "scope");
        // An attribute with braces keeps itself and loses the members named in them.
        opts.omit = names(
            &omit
                .iter()
                .filter(|p| p.nested.is_empty())
                .cloned()
                .collect::<Vec<_>>(),
        );
        opts.sub_attrs.extend(nested(&omit, false));
    }
    if let Some(lang) = params.get("lang") {
        opts.lang = language_preferences(lang)?;
    }
    if let Some(ds) = params.get("datasetId") {
        let ids = list_param(Some(ds))
            .into_iter()
            .map(|d| {
                if d == "@none" {
                    Ok(None)
                } else {
                    check_uri("datasetId", d).map(|()| Some(d.to_string()))
                }
            })
            .collect::<NgsiResult<Vec<_>>>()?;
        opts.dataset_ids = Some(ids);
    }
    Ok((opts, attrs))
}

/// `lang=fr,en;q=0.8` → ["fr", "en"] ordered by weight; `*` → no preference.
fn language_preferences(src: &str) -> NgsiResult<Option<Vec<String>>> {
    let mut prefs: Vec<(f32, String)> = Vec::new();
    for part in list_param(Some(src)) {
        let mut pieces = part.split(';');
        let tag = pieces.next().unwrap_or("").trim();
        let q = pieces
            .find_map(|p| p.trim().strip_prefix("q="))
            .map(|q| q.parse::<f32>())
            .transpose()
            .map_err(|_| NgsiError::bad_data(format!("invalid weight in lang '{part}'")))?
            .unwrap_or(1.0);
        if tag == "*" {
            continue;
        }
        if tag.is_empty()
            || tag.len() > 35
            || !tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(NgsiError::bad_data(format!(
                "'{tag}' is not a language tag"
            )));
        }
        prefs.push((q, tag.to_string()));
    }
    prefs.sort_by(|a, b| b.0.total_cmp(&a.0));
    Ok((!prefs.is_empty()).then(|| prefs.into_iter().map(|(_, t)| t).collect()))
}

/// The geo-query of the URL parameters, if any of its parameters is given.
fn geo_params(
    params: &HashMap<String, String>,
    actx: &ActiveContext,
) -> NgsiResult<Option<GeoQuery>> {
    if !GEO_PARAMS.iter().any(|p| params.contains_key(*p)) {
        return Ok(None);
    }
    let get = |k: &str| params.get(k).map(String::as_str);
    parse_geo_query(
        get("georel"),
        get("geometry"),
        get("coordinates"),
        get("geoproperty"),
        &actx.ctx,
    )
    .map(Some)
}

/// The entity selection of URL parameters: id, idPattern, type, q, scopeQ, geo-query.
pub(crate) fn query_from_params(
    params: &HashMap<String, String>,
    attrs: Vec<String>,
    actx: &ActiveContext,
) -> NgsiResult<EntityQuery> {
    let mut query = EntityQuery {
        attrs,
        ..Default::default()
    };
    if let Some(ids) = params.get("id") {
        let ids: Vec<&str> = list_param(Some(ids));
        if ids.len() > MAX_IDS {
            return Err(NgsiError::bad_data(format!(
                "at most {MAX_IDS} ids may be given"
            )));
        }
        for id in &ids {
            check_uri("entity id", id)?;
        }
        query.ids = ids.into_iter().map(str::to_string).collect();
    }
    if let Some(p) = params.get("idPattern") {
        query.id_pattern = Some(compile_id_pattern(p)?);
    }
    if let Some(t) = params.get("type") {
        query.types = Some(parse_type_expr(t, &actx.ctx)?);
    }
    if let Some(q) = params.get("q") {
        query.q = Some(parse_q(q, &actx.ctx)?);
    }
    if let Some(s) = params.get("scopeQ") {
        query.scope_q = Some(parse_scope_q(s)?);
    }
    query.geo = geo_params(params, actx)?;
    Ok(query)
}

/// Narrows a query to the entity types the caller is limited to, if any.
pub(crate) fn scope_to_caller(query: &mut EntityQuery) {
    use borough_core::query::expr::BoolExpr;
    if let Some(allowed) = crate::auth::caller_entity_types() {
        let allowed = BoolExpr::Or(allowed.into_iter().map(BoolExpr::Leaf).collect());
        query.types = Some(match query.types.take() {
            None => allowed,
            Some(asked) => BoolExpr::And(vec![asked, allowed]),
        });
    }
}

/// `GET /entities`
pub async fn query_entities(
    State(state): State<SharedState>,
    Query(params): Params,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let rt = negotiate(&headers, true)?;
    let tenant = existing_tenant(&state, &headers)?;
    let actx = state
        .contexts
        .for_link(link_context(&headers)?.as_deref())
        .await?;
    let page = paging(&params)?;
    let (opts, attrs) = projection(&params, None, &actx)?;
    let mut query = query_from_params(&params, attrs, &actx)?;
    // `local=true` alone asks for every local entity (clause 6.4.3.2).
    let local = params.get("local").is_some_and(|l| l == "true");
    if query.is_unrestricted() && !local {
        return Err(NgsiError::bad_data(
            "the query is too broad: give at least one of type, id, idPattern, attrs, q, scopeQ or a geo-query",
        )
        .into());
    }
    scope_to_caller(&mut query);
    let qs = crate::federation::forwarded_query_string(uri.query(), false);
    let asked = Asked {
        query: &query,
        opts: &opts,
        params: &params,
        page,
    };
    let mut remote = from_sources(
        &state,
        &tenant,
        &headers,
        &actx,
        &asked,
        crate::federation::QueryRequest::Get(qs),
    )
    .await;
    let failed = std::mem::take(&mut remote.failed);
    let resp = respond(
        &state, &tenant, &query, page, &opts, &params, rt, &actx, &uri, remote,
    )?;
    Ok(crate::federation::warn(resp, &failed))
}

/// What a query asks, as far as its sources are concerned.
struct Asked<'a> {
    query: &'a EntityQuery,
    opts: &'a RenderOptions,
    params: &'a HashMap<String, String>,
    page: Paging,
}

/// The sources' part of a query: nothing with `local=true` or no
/// registration, and never what already passed through here.
async fn from_sources(
    state: &AppState,
    tenant: &str,
    headers: &HeaderMap,
    actx: &ActiveContext,
    asked: &Asked<'_>,
    request: crate::federation::QueryRequest<'_>,
) -> crate::federation::Remote {
    if crate::federation::route(state, tenant, headers, asked.params)
        != crate::federation::Route::Forward
    {
        return Default::default();
    }
    let fwd = crate::federation::Forward {
        state,
        tenant,
        headers,
        actx,
    };
    let page = asked.page;
    if let Some(deep) = crate::federation::too_deep(state, page.offset.saturating_add(page.limit)) {
        return crate::federation::Remote {
            failed: vec![deep],
            ..Default::default()
        };
    }
    crate::federation::query(
        &fwd,
        asked.query,
        asked.opts.attrs.as_deref(),
        request,
        page.offset.saturating_add(page.limit).saturating_add(1),
        page.count,
    )
    .await
}

/// `POST /entityOperations/query`
pub async fn query_post(
    State(state): State<SharedState>,
    Query(params): Params,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let rt = negotiate(&headers, true)?;
    let tenant = existing_tenant(&state, &headers)?;
    let (v, actx) =
        body_with_context(&state, &headers, body, state.config.max_body_bytes, false).await?;
    let obj = v
        .as_object()
        .ok_or_else(|| NgsiError::bad_data("a query body must be a JSON object"))?;
    match obj.get("type").and_then(Value::as_str) {
        Some("Query") => {}
        _ => return Err(NgsiError::bad_data("a query body needs \"type\": \"Query\"").into()),
    }
    let page = paging(&params)?;
    let (mut query, _) = query_from_body(obj, &params, &actx)?;
    let merged = merged_params(obj, &params);
    let (opts, _) = projection(&merged, body_attrs(obj)?, &actx)?;
    if query.is_unrestricted() {
        return Err(NgsiError::bad_data(
            "the query is too broad: give at least one of entities, attrs, q, scopeQ or geoQ",
        )
        .into());
    }
    scope_to_caller(&mut query);
    let asked = Asked {
        query: &query,
        opts: &opts,
        params: &params,
        page,
    };
    let mut remote = from_sources(
        &state,
        &tenant,
        &headers,
        &actx,
        &asked,
        crate::federation::QueryRequest::Post(obj),
    )
    .await;
    let failed = std::mem::take(&mut remote.failed);
    let resp = respond(
        &state, &tenant, &query, page, &opts, &merged, rt, &actx, &uri, remote,
    )?;
    Ok(crate::federation::warn(resp, &failed))
}

/// One page of a query: the local store's, or, when sources answered too,
/// the merged set's (4.3.6.7: paging applies to the merged result).
fn page_of(
    state: &AppState,
    tenant: &str,
    query: &EntityQuery,
    page: Paging,
    remote: crate::federation::Remote,
) -> borough_store::QueryPage {
    // One more than the page tells whether a next page exists.
    if remote.found.is_empty() {
        return state
            .store
            .query(tenant, query, page.offset, page.limit + 1, page.count);
    }
    let counted = remote.counted;
    let remote = remote.found;
    let want = page.offset.saturating_add(page.limit).saturating_add(1);
    let local = state.store.query(tenant, query, 0, want, page.count);
    let mut by_id: std::collections::BTreeMap<String, Vec<crate::federation::Contribution>> =
        Default::default();
    let answered = remote.len();
    for c in remote {
        by_id.entry(c.entity.id.clone()).or_default().push(c);
    }
    // An entity several sources answered is one entity.
    let counted = counted.saturating_sub(answered - by_id.len());
    let mut merged: Vec<std::sync::Arc<borough_core::Entity>> = Vec::new();
    // Entities held here and at a source: counted once.
    let mut held_in_both = 0;
    for e in local.entities {
        match by_id.remove(&e.id) {
            None => merged.push(e),
            Some(found) => {
                held_in_both += 1;
                if let Some(m) = crate::federation::merge(Some(&e), found) {
                    merged.push(std::sync::Arc::new(m));
                }
            }
        }
    }
    let allowed = crate::auth::caller_entity_types();
    for (_, found) in by_id {
        if let Some(m) = crate::federation::merge(None, found)
            && allowed
                .as_ref()
                .is_none_or(|a| m.types.iter().any(|t| a.contains(t)))
        {
            merged.push(std::sync::Arc::new(m));
        }
    }
    if query.orders_by_distance() {
        merged.sort_by(|a, b| {
            let da = query.distance(a).unwrap_or(f64::INFINITY);
            let db = query.distance(b).unwrap_or(f64::INFINITY);
            da.total_cmp(&db).then_with(|| a.id.cmp(&b.id))
        });
    } else {
        merged.sort_by(|a, b| a.id.cmp(&b.id));
    }
    let entities = merged
        .into_iter()
        .skip(page.offset)
        .take(page.limit + 1)
        .collect();
    borough_store::QueryPage {
        entities,
        // The sources count their own matches; an entity held here and at a
        // source beyond the first pages is counted twice (the count is then
        // an upper bound).
        total: local
            .total
            .map(|t| t.saturating_add(counted).saturating_sub(held_in_both)),
    }
}

/// Entities deleted per write while purging.
const PURGE_BATCH: usize = 1000;

/// `DELETE /entities?type=…` (purge entities, new in v1.8): deletes every
/// entity the selection matches, a page at a time. The selection must name
/// something: `DELETE /entities` alone is refused rather than emptying the tenant.
pub async fn purge(
    State(state): State<SharedState>,
    Query(params): Params,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let tenant = existing_tenant(&state, &headers)?;
    let actx = state
        .contexts
        .for_link(link_context(&headers)?.as_deref())
        .await?;
    let mut query = query_from_params(&params, Vec::new(), &actx)?;
    if query.is_unrestricted() {
        return Err(NgsiError::bad_data(
            "a purge needs a selection: give at least one of type, id, idPattern, q, scopeQ or a geo-query",
        )
        .into());
    }
    scope_to_caller(&mut query);
    loop {
        let page = state.store.query(&tenant, &query, 0, PURGE_BATCH, false);
        if page.entities.is_empty() {
            break;
        }
        let ops: Vec<borough_core::EntityOp> = page
            .entities
            .iter()
            .map(|e| borough_core::EntityOp::Delete { id: e.id.clone() })
            .collect();
        let results = state.store.write(&tenant, ops).await?;
        let mut deleted = 0;
        for r in results {
            match r {
                Ok(_) => deleted += 1,
                // Deleted in the meantime is fine; anything else stops the purge.
                Err(e) if e.kind == borough_core::ProblemKind::ResourceNotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        if deleted == 0 {
            break;
        }
    }
    Ok(crate::entities::with_tenant(
        axum::http::StatusCode::NO_CONTENT.into_response(),
        &tenant,
    ))
}

/// Query-body members that are also URL parameters count as parameters for projection.
fn merged_params(
    obj: &serde_json::Map<String, Value>,
    params: &HashMap<String, String>,
) -> HashMap<String, String> {
    let mut merged = params.clone();
    if let Some(lang) = obj.get("lang").and_then(Value::as_str) {
        merged.insert("lang".into(), lang.to_string());
    }
    merged
}

fn body_attrs(obj: &serde_json::Map<String, Value>) -> NgsiResult<Option<Vec<String>>> {
    match obj.get("attrs") {
        None => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| NgsiError::bad_data("attrs must be an array of strings"))
            })
            .collect::<NgsiResult<Vec<_>>>()
            .map(Some),
        Some(_) => Err(NgsiError::bad_data("attrs must be an array of strings")),
    }
}

/// The entity selection of a query body (entities, attrs, q, scopeQ, geoQ),
/// with the expanded attrs.
pub(crate) fn query_from_body(
    obj: &serde_json::Map<String, Value>,
    params: &HashMap<String, String>,
    actx: &ActiveContext,
) -> NgsiResult<(EntityQuery, Vec<String>)> {
    let merged = merged_params(obj, params);
    let (_, attrs) = projection(&merged, body_attrs(obj)?, actx)?;
    let mut query = EntityQuery {
        attrs: attrs.clone(),
        ..Default::default()
    };
    if let Some(entities) = obj.get("entities") {
        let list = entities
            .as_array()
            .ok_or_else(|| NgsiError::bad_data("entities must be an array"))?;
        for sel in list {
            query.selectors.push(selector(sel, actx)?);
        }
    }
    if let Some(q) = obj.get("q") {
        let q = q
            .as_str()
            .ok_or_else(|| NgsiError::bad_data("q must be a string"))?;
        query.q = Some(parse_q(q, &actx.ctx)?);
    }
    if let Some(s) = obj.get("scopeQ") {
        let s = s
            .as_str()
            .ok_or_else(|| NgsiError::bad_data("scopeQ must be a string"))?;
        query.scope_q = Some(parse_scope_q(s)?);
    }
    if let Some(g) = obj.get("geoQ") {
        query.geo = Some(parse_geo_q(g, &actx.ctx)?);
    }
    Ok((query, attrs))
}

fn selector(v: &Value, actx: &ActiveContext) -> NgsiResult<EntitySelector> {
    let o = v
        .as_object()
        .ok_or_else(|| NgsiError::bad_data("each member of entities must be an object"))?;
    let text = |k: &str| -> NgsiResult<Option<&str>> {
        match o.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(NgsiError::bad_data(format!(
                "entities: {k} must be a string"
            ))),
        }
    };
    let id = text("id")?;
    if let Some(id) = id {
        check_uri("entity id", id)?;
    }
    Ok(EntitySelector {
        id: id.map(str::to_string),
        id_pattern: text("idPattern")?.map(compile_id_pattern).transpose()?,
        types: text("type")?
            .map(|t| parse_type_expr(t, &actx.ctx))
            .transpose()?,
    })
}

#[allow(clippy::too_many_arguments)]
fn respond(
    state: &AppState,
    tenant: &str,
    query: &EntityQuery,
    page: Paging,
    opts: &RenderOptions,
    params: &HashMap<String, String>,
    rt: ResponseType,
    actx: &ActiveContext,
    uri: &Uri,
    remote: crate::federation::Remote,
) -> ApiResult<Response> {
    let join = crate::join::join_param(params)?;
    let result = page_of(state, tenant, query, page, remote);
    let has_next = result.entities.len() > page.limit;
    let entities = &result.entities[..result.entities.len().min(page.limit)];
    let body = match rt {
        ResponseType::GeoJson => {
            let geo = params
                .get("geometryProperty")
                .map(|g| actx.ctx.expand(g).into_owned())
                .unwrap_or_else(|| "https://uri.etsi.org/ngsi-ld/location".to_string());
            json!({
                "type": "FeatureCollection",
                "features": entities.iter().map(|e| render_feature(e, &actx.ctx, opts, &geo)).collect::<Vec<_>>(),
            })
        }
        ResponseType::LdJson | ResponseType::Json if join.is_some() => {
            let join = join.unwrap_or(crate::join::Join {
                mode: crate::join::JoinMode::Flat,
                level: 1,
            });
            let body = joined(state, tenant, entities, opts, actx, rt, join);
            return Ok(paged(
                crate::entities::represent_json(rt, body, actx, tenant),
                &result,
                has_next,
                page,
                uri,
            ));
        }
        ResponseType::LdJson | ResponseType::Json => {
            // JSON-LD arrays carry @context in each entity.
            let context = (rt == ResponseType::LdJson).then(|| actx.source.as_value());
            let view = EntityListView {
                entities,
                ctx: &actx.ctx,
                opts,
                context: context.as_ref(),
            };
            return Ok(paged(
                represent_view(rt, &view, actx, tenant),
                &result,
                has_next,
                page,
                uri,
            ));
        }
    };
    Ok(paged(
        represent(rt, body, actx, tenant),
        &result,
        has_next,
        page,
        uri,
    ))
}

/// Entities with what they link to (`join`), as a JSON array: the entities
/// themselves with their links inline, or followed by the linked entities
/// (flat). JSON-LD puts `@context` in each entity.
pub(crate) fn joined(
    state: &AppState,
    tenant: &str,
    entities: &[std::sync::Arc<borough_core::Entity>],
    opts: &RenderOptions,
    actx: &ActiveContext,
    rt: ResponseType,
    join: crate::join::Join,
) -> Value {
    let store = state.store.as_ref();
    let with_context = |mut m: serde_json::Map<String, Value>| {
        if rt == ResponseType::LdJson {
            let mut out = serde_json::Map::with_capacity(m.len() + 1);
            out.insert("@context".into(), actx.source.as_value());
            out.append(&mut m);
            m = out;
        }
        Value::Object(m)
    };
    let list: Vec<Value> = match join.mode {
        crate::join::JoinMode::Inline => entities
            .iter()
            .map(|e| {
                with_context(crate::join::render_inline(
                    store, tenant, e, &actx.ctx, opts, join.level,
                ))
            })
            .collect(),
        crate::join::JoinMode::Flat => {
            let linked = crate::join::linked_entities(store, tenant, entities, opts, join.level);
            let whole = RenderOptions {
                format: opts.format,
                sys_attrs: opts.sys_attrs,
                lang: opts.lang.clone(),
                ..RenderOptions::default()
            };
            entities
                .iter()
                .map(|e| with_context(borough_core::render::render_entity(e, &actx.ctx, opts)))
                .chain(linked.iter().map(|e| {
                    with_context(borough_core::render::render_entity(e, &actx.ctx, &whole))
                }))
                .collect()
        }
    };
    Value::Array(list)
}

/// Adds the count and page links to a query response.
pub(crate) fn paged(
    mut resp: Response,
    result: &borough_store::QueryPage,
    has_next: bool,
    page: Paging,
    uri: &Uri,
) -> Response {
    if let Some(total) = result.total
        && let Ok(v) = HeaderValue::from_str(&total.to_string())
    {
        resp.headers_mut().insert("ngsild-results-count", v);
    }
    let mut links = Vec::new();
    if has_next {
        links.push(page_link(uri, page.offset + page.limit, page.limit, "next"));
    }
    if page.offset > 0 {
        links.push(page_link(
            uri,
            page.offset.saturating_sub(page.limit),
            page.limit,
            "prev",
        ));
    }
    for l in links {
        if let Ok(v) = HeaderValue::from_str(&l) {
            resp.headers_mut().append(header::LINK, v);
        }
    }
    resp
}

/// A `Link` to another page: the same request with another offset.
fn page_link(uri: &Uri, offset: usize, limit: usize, rel: &str) -> String {
    let kept: Vec<&str> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("offset=") && !p.starts_with("limit="))
        .collect();
    let mut q = kept.join("&");
    if !q.is_empty() {
        q.push('&');
    }
    format!(
        "<{}?{q}offset={offset}&limit={limit}>; rel=\"{rel}\"",
        uri.path()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn language_preferences_follow_weights() {
        assert_eq!(
            language_preferences("en;q=0.5,fr").unwrap(),
            Some(vec!["fr".to_string(), "en".to_string()])
        );
        assert_eq!(language_preferences("*").unwrap(), None);
        assert!(language_preferences("e n").is_err());
    }

    #[test]
    fn page_links_keep_the_query() {
        let uri: Uri = "/ngsi-ld/v1/entities?type=A&limit=5&offset=10&q=x%3D%3D1"
            .parse()
            .unwrap();
        assert_eq!(
            page_link(&uri, 15, 5, "next"),
            "</ngsi-ld/v1/entities?type=A&q=x%3D%3D1&offset=15&limit=5>; rel=\"next\""
        );
    }
}
