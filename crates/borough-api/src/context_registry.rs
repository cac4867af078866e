//! The `@context` registry, `/ngsi-ld/v1/jsonldContexts` (clause 5.13): list,
//! serve, host (durably), delete, and reload cached contexts without a restart.
//! Hosted documents belong to the tenant that added them: only it lists,
//! reads and deletes them. Cached and built-in documents are everyone's to
//! read; evicting or reloading a cached one, which every tenant shares, is the
//! operator's.

use crate::contexts::{ContextEntry, ContextKind, HOSTED_PATH};
use crate::problem::ApiResult;
use crate::request::{body_type, read_json, tenant};
use crate::{SharedState, json_response, typed_json_response};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use borough_core::NgsiError;
use borough_core::validate::{format_datetime, now_micros};
use serde_json::{Value, json};
use std::collections::HashMap;

type Params = Query<HashMap<String, String>>;

/// The scheme and host clients reach this server by, for hosted context URLs.
fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c))
        })
        .unwrap_or("localhost");
    format!("http://{host}")
}

fn full_url(e: &ContextEntry, base: &str) -> String {
    if e.url.starts_with('/') {
        format!("{base}{}", e.url)
    } else {
        e.url.clone()
    }
}

fn flag(params: &HashMap<String, String>, name: &str) -> ApiResult<bool> {
    match params.get(name).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => {
            Err(NgsiError::bad_data(format!("{name} must be true or false, not '{other}'")).into())
        }
    }
}

fn details_of(e: &ContextEntry, base: &str) -> Value {
    let mut v = json!({
        "URL": full_url(e, base),
        "localId": e.local_id,
        "kind": e.kind.name(),
        "createdAt": format_datetime(e.created_at),
        "numberOfHits": e.hits,
    });
    if let Some(t) = e.last_usage {
        v["lastUsage"] = json!(format_datetime(t));
    }
    if e.builtin {
        v["extraInfo"] = json!({"builtIn": true});
    }
    v
}

/// `GET /jsonldContexts` (`details=true`, `kind=Hosted|Cached|ImplicitlyCreated`)
pub async fn list(
    State(state): State<SharedState>,
    Query(params): Params,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let details = flag(&params, "details")?;
    let kind = match params.get("kind").map(String::as_str) {
        None => None,
        Some("Hosted") => Some(Some(ContextKind::Hosted)),
        Some("Cached") => Some(Some(ContextKind::Cached)),
        // Borough keeps inline contexts with the request only, so there are none of this kind.
        Some("ImplicitlyCreated") => Some(None),
        Some(other) => {
            return Err(NgsiError::bad_data(format!(
                "kind must be Hosted, Cached or ImplicitlyCreated, not '{other}'"
            ))
            .into());
        }
    };
    let base = base_url(&headers);
    let t = tenant(&headers)?;
    let entries: Vec<ContextEntry> = state
        .contexts
        .entries()
        .into_iter()
        .filter(|e| kind.is_none_or(|k| k == Some(e.kind)))
        .filter(|e| visible(e, &t))
        .collect();
    let body = if details {
        Value::Array(entries.iter().map(|e| details_of(e, &base)).collect())
    } else {
        Value::Array(entries.iter().map(|e| json!(full_url(e, &base))).collect())
    };
    Ok(json_response(StatusCode::OK, &body))
}

/// Whether tenant `t` sees the entry: hosted ones only by their owner.
fn visible(e: &ContextEntry, t: &str) -> bool {
    e.owner.as_deref().is_none_or(|o| o == t)
}

/// The entry `id` as tenant `t` may see it.
fn entry_of(state: &crate::AppState, id: &str, t: &str) -> ApiResult<ContextEntry> {
    state
        .contexts
        .entry(id)
        .filter(|e| visible(e, t))
        .ok_or_else(|| NgsiError::not_found(format!("no @context '{id}' in the registry")).into())
}

/// `GET /jsonldContexts/{id}`: the document itself, or its details.
pub async fn serve(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    Query(params): Params,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let details = flag(&params, "details")?;
    let e = entry_of(&state, &id, &tenant(&headers)?)?;
    if details {
        return Ok(json_response(
            StatusCode::OK,
            &details_of(&e, &base_url(&headers)),
        ));
    }
    Ok(typed_json_response(
        StatusCode::OK,
        &e.doc,
        "application/ld+json",
    ))
}

/// `POST /jsonldContexts`: host a context document.
pub async fn add(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    body_type(&headers, false)?;
    let doc = read_json(body, state.config.max_body_bytes).await?;
    let ctx = doc
        .get("@context")
        .ok_or_else(|| NgsiError::bad_data("a context document needs an @context member"))?;
    if !(ctx.is_object() || ctx.is_array() || ctx.is_string()) {
        return Err(NgsiError::bad_data("@context must be an object, an array or a URL").into());
    }
    // It must be usable: resolve it (fetching what it references) before accepting it.
    state.contexts.for_body(ctx).await?;
    let owner = tenant(&headers)?;
    let created_at = now_micros();
    // Random, so that another tenant cannot guess where a document is served.
    let id = borough_access::secret::random_hex(12).map_err(NgsiError::internal)?;
    let record = serde_json::to_vec(&json!({"createdAt": created_at, "doc": doc, "tenant": owner}))
        .map_err(|e| NgsiError::internal(e.to_string()))?;
    let store = state.store.clone();
    let key = id.clone();
    tokio::task::spawn_blocking(move || store.put_context(&key, &record))
        .await
        .map_err(|e| NgsiError::internal(e.to_string()))??;
    state.contexts.host(&id, doc, created_at, &owner);
    let location = format!("{}{HOSTED_PATH}{id}", base_url(&headers));
    let mut resp = StatusCode::CREATED.into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// `DELETE /jsonldContexts/{id}` (`reload=true` fetches a cached context again).
pub async fn delete(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    Query(params): Params,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let reload = flag(&params, "reload")?;
    let e = entry_of(&state, &id, &tenant(&headers)?)?;
    let operator = crate::auth::caller().is_none_or(|p| p.is_operator());
    if e.kind == ContextKind::Cached && !e.builtin && !operator {
        return Err(NgsiError::new(
            borough_core::ProblemKind::Forbidden,
            "cached contexts are shared by every tenant: only the operator evicts or reloads them",
        )
        .into());
    }
    if e.builtin {
        return Err(NgsiError::bad_data(format!(
            "the core context '{}' is built in and cannot be deleted",
            e.url
        ))
        .into());
    }
    match (e.kind, reload) {
        (ContextKind::Hosted, true) => {
            return Err(
                NgsiError::bad_data("reload applies to cached contexts, not hosted ones").into(),
            );
        }
        (ContextKind::Cached, true) => state.contexts.reload(&e.url).await?,
        (ContextKind::Hosted, false) => {
            let store = state.store.clone();
            let key = e.local_id.clone();
            tokio::task::spawn_blocking(move || store.delete_context(&key))
                .await
                .map_err(|err| NgsiError::internal(err.to_string()))??;
            state.contexts.remove(&e.local_id);
        }
        (ContextKind::Cached, false) => {
            state.contexts.remove(&e.url);
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Loads the hosted contexts kept by the store into the registry (at start-up).
pub fn load_hosted(state: &crate::AppState) -> Result<usize, String> {
    let rows = state.store.contexts().map_err(|e| e.to_string())?;
    let n = rows.len();
    for (id, bytes) in rows {
        let record: Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("hosted @context '{id}' cannot be read: {e}"))?;
        let created_at = record["createdAt"].as_i64().unwrap_or_default();
        // Documents hosted before tenants owned them are the default tenant's.
        let owner = record["tenant"].as_str().unwrap_or_default();
        state
            .contexts
            .host(&id, record["doc"].clone(), created_at, owner);
    }
    Ok(n)
}

/// Deletes every context a tenant hosts (the tenant is being removed).
pub async fn purge_tenant(state: &crate::AppState, tenant: &str) -> ApiResult<usize> {
    let mine: Vec<ContextEntry> = state
        .contexts
        .entries()
        .into_iter()
        .filter(|e| e.owner.as_deref() == Some(tenant))
        .collect();
    for e in &mine {
        let store = state.store.clone();
        let key = e.local_id.clone();
        tokio::task::spawn_blocking(move || store.delete_context(&key))
            .await
            .map_err(|err| NgsiError::internal(err.to_string()))??;
        state.contexts.remove(&e.local_id);
    }
    Ok(mine.len())
}
