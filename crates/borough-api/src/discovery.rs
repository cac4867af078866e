//! Type and attribute discovery (clause 5.7.5–5.7.8).

use crate::contexts::ActiveContext;
use crate::entities::{existing_tenant, represent};
use crate::problem::ApiResult;
use crate::request::{link_context, negotiate};
use crate::{AppState, SharedState};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use borough_core::NgsiError;
use borough_core::validate::now_micros;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};

type Params = Query<HashMap<String, String>>;

fn details(params: &HashMap<String, String>) -> ApiResult<bool> {
    match params.get("details").map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => {
            Err(NgsiError::bad_data(format!("details must be true or false, not '{other}'")).into())
        }
    }
}

/// Per type: its attributes; per attribute: its kinds and the types that carry it.
#[derive(Default)]
struct Catalog {
    types: BTreeMap<String, TypeInfo>,
    attrs: BTreeMap<String, AttrInfo>,
}

#[derive(Default)]
struct TypeInfo {
    count: usize,
    attrs: BTreeMap<String, BTreeSet<&'static str>>,
}

#[derive(Default)]
struct AttrInfo {
    count: usize,
    kinds: BTreeSet<&'static str>,
    types: BTreeSet<String>,
}

fn catalog(state: &AppState, tenant: &str) -> Catalog {
    let mut c = Catalog::default();
    state.store.scan(tenant, &mut |e| {
        for t in &e.types {
            let ti = c.types.entry(t.clone()).or_default();
            ti.count += 1;
            for (name, inst) in &e.attrs {
                let kinds = ti.attrs.entry(name.clone()).or_default();
                kinds.extend(inst.iter().map(|a| a.kind.name()));
            }
        }
        for (name, inst) in &e.attrs {
            let ai = c.attrs.entry(name.clone()).or_default();
            ai.count += 1;
            ai.kinds.extend(inst.iter().map(|a| a.kind.name()));
            ai.types.extend(e.types.iter().cloned());
        }
        true
    });
    c
}

async fn context(state: &AppState, headers: &HeaderMap) -> ApiResult<ActiveContext> {
    Ok(state
        .contexts
        .for_link(link_context(headers)?.as_deref())
        .await?)
}

fn compact(actx: &ActiveContext, iri: &str) -> Value {
    Value::String(actx.ctx.compact(iri).into_owned())
}

/// An EntityTypeList or AttributeList: the compacted names, sorted.
fn name_list(
    actx: &ActiveContext,
    counts: Vec<(String, usize)>,
    kind: &str,
    member: &str,
) -> Value {
    let mut names: Vec<Value> = counts.into_iter().map(|(n, _)| compact(actx, &n)).collect();
    names.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
    json!({
        "id": format!("urn:ngsi-ld:{kind}:{}", now_micros()),
        "type": kind,
        member: names,
    })
}

/// `GET /types`
pub async fn types(
    State(state): State<SharedState>,
    Query(params): Params,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let rt = negotiate(&headers, false)?;
    let tenant = existing_tenant(&state, &headers)?;
    let actx = context(&state, &headers).await?;
    let body = if details(&params)? {
        let c = catalog(&state, &tenant);
        Value::Array(
            c.types
                .iter()
                .map(|(t, info)| {
                    json!({
                        "id": t,
                        "type": "EntityType",
                        "typeName": compact(&actx, t),
                        "attributeNames": info.attrs.keys().map(|a| compact(&actx, a)).collect::<Vec<_>>(),
                    })
                })
                .collect(),
        )
    } else {
        name_list(
            &actx,
            state.store.type_counts(&tenant),
            "EntityTypeList",
            "typeList",
        )
    };
    Ok(represent(rt, body, &actx, &tenant))
}

/// `GET /types/{type}`
pub async fn type_info(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let rt = negotiate(&headers, false)?;
    let tenant = existing_tenant(&state, &headers)?;
    let actx = context(&state, &headers).await?;
    borough_core::validate::check_name("entity type", &name)?;
    let iri = actx.ctx.expand(&name).into_owned();
    let c = catalog(&state, &tenant);
    let info = c
        .types
        .get(&iri)
        .ok_or_else(|| NgsiError::not_found(format!("no entity has type '{name}'")))?;
    let body = json!({
        "id": iri,
        "type": "EntityTypeInfo",
        "typeName": compact(&actx, &iri),
        "entityCount": info.count,
        "attributeDetails": info.attrs.iter().map(|(a, kinds)| json!({
            "id": a,
            "type": "Attribute",
            "attributeName": compact(&actx, a),
            "attributeTypes": kinds.iter().collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    Ok(represent(rt, body, &actx, &tenant))
}

fn attribute_body(actx: &ActiveContext, name: &str, info: &AttrInfo) -> Value {
    json!({
        "id": name,
        "type": "Attribute",
        "attributeName": compact(actx, name),
        "attributeCount": info.count,
        "attributeTypes": info.kinds.iter().collect::<Vec<_>>(),
        "typeNames": info.types.iter().map(|t| compact(actx, t)).collect::<Vec<_>>(),
    })
}

/// `GET /attributes`
pub async fn attributes(
    State(state): State<SharedState>,
    Query(params): Params,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let rt = negotiate(&headers, false)?;
    let tenant = existing_tenant(&state, &headers)?;
    let actx = context(&state, &headers).await?;
    let body = if details(&params)? {
        let c = catalog(&state, &tenant);
        Value::Array(
            c.attrs
                .iter()
                .map(|(a, info)| attribute_body(&actx, a, info))
                .collect(),
        )
    } else {
        name_list(
            &actx,
            state.store.attribute_counts(&tenant),
            "AttributeList",
            "attributeList",
        )
    };
    Ok(represent(rt, body, &actx, &tenant))
}

/// `GET /attributes/{attr}`
pub async fn attribute_info(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let rt = negotiate(&headers, false)?;
    let tenant = existing_tenant(&state, &headers)?;
    let actx = context(&state, &headers).await?;
    borough_core::validate::check_name("attribute name", &name)?;
    let iri = actx.ctx.expand(&name).into_owned();
    let c = catalog(&state, &tenant);
    let info = c
        .attrs
        .get(&iri)
        .ok_or_else(|| NgsiError::not_found(format!("no entity has attribute '{name}'")))?;
    Ok(represent(
        rt,
        attribute_body(&actx, &iri, info),
        &actx,
        &tenant,
    ))
}
