//! Borough's own management API: the operator's tenants, API keys, the
//! audit log, and `/api/v1/me`. The guard (`auth`) has already decided that
//! the caller may reach the route; the handlers check what depends on the
//! body (which roles a new key may get) and record what they changed.

use crate::auth::{ClientAddr, audit_change as audit, caller};
use crate::problem::{ApiError, ApiResult};
use crate::request::{read_json, tenant};
use crate::{SharedState, json_response};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use borough_access::model::{ApiKey, Principal, Role, TenantScope};
use borough_access::{Access, internal_tenant, public_tenant};
use borough_core::{EntityOp, NgsiError, ProblemKind};
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;

/// Another layer's data of a tenant (devices, commands), removed with it.
pub trait TenantData: Send + Sync {
    /// Removes everything the layer keeps for `tenant` (internal name);
    /// answers a summary for the audit log.
    fn purge(&self, tenant: &str) -> BoxFuture<'static, Result<Value, String>>;
}

/// Entities deleted per write while purging a tenant.
const PURGE_BATCH: usize = 1000;

fn access(state: &crate::AppState) -> ApiResult<&Arc<Access>> {
    state.access.as_ref().ok_or_else(|| {
        ApiError(NgsiError::new(
            ProblemKind::OperationNotSupported,
            "access control is off on this server (--auth off)",
        ))
    })
}

fn me() -> Principal {
    caller()
        .map(|p| (*p).clone())
        .unwrap_or_else(Principal::open)
}

fn created(body: &Value, location: &str) -> Response {
    let mut r = json_response(StatusCode::CREATED, body);
    if let Ok(l) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, l);
    }
    r
}

async fn json_body(state: &crate::AppState, headers: &HeaderMap, body: Body) -> ApiResult<Value> {
    crate::request::body_type(headers, true)?;
    let v = read_json(body, state.config.max_body_bytes).await?;
    if !v.is_object() {
        return Err(NgsiError::bad_data("the body must be a JSON object").into());
    }
    Ok(v)
}

/// `GET /api/v1/me`: who the server takes the caller to be.
pub async fn whoami() -> Response {
    let p = me();
    json_response(
        StatusCode::OK,
        &json!({
            "subject": p.subject,
            "roles": p.roles.iter().map(|r| r.name()).collect::<Vec<_>>(),
            "tenants": match &p.tenants {
                TenantScope::All => json!("*"),
                TenantScope::Only(list) => json!(list.iter().map(|t| public_tenant(t)).collect::<Vec<_>>()),
            },
            "entityTypes": p.entity_types,
        }),
    )
}

// ------------------------------------------------------------------ tenants

/// A tenant as the API shows it: times as date-times.
fn tenant_json(t: &borough_access::Tenant) -> Value {
    let mut v = json!(t);
    for k in ["createdAt", "modifiedAt"] {
        if let Some(us) = v.get(k).and_then(Value::as_i64) {
            v[k] = json!(borough_core::validate::format_datetime(us));
        }
    }
    v
}

/// `GET /api/v1/tenants`
pub async fn list_tenants(State(state): State<SharedState>) -> ApiResult<Response> {
    let a = access(&state)?;
    let list: Vec<Value> = a.tenants().iter().map(tenant_json).collect();
    Ok(json_response(StatusCode::OK, &Value::Array(list)))
}

/// `POST /api/v1/tenants`
pub async fn create_tenant(
    State(state): State<SharedState>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let a = access(&state)?;
    let v = json_body(&state, &headers, body).await?;
    let t = a.create_tenant(&v).await?;
    audit(
        a,
        Some(internal_tenant(&t.name)),
        "tenant.create",
        Some(t.name.clone()),
        json!({"plan": t.plan, "quotas": t.quotas}),
        addr,
    )
    .await;
    Ok(created(
        &tenant_json(&t),
        &format!("/api/v1/tenants/{}", t.name),
    ))
}

/// `GET /api/v1/tenants/{name}`: the tenant with what it holds.
pub async fn get_tenant(
    State(state): State<SharedState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let a = access(&state)?;
    let internal = internal_tenant(&name);
    let t = a
        .tenant(internal)
        .ok_or_else(|| NgsiError::not_found(format!("tenant '{name}' does not exist")))?;
    let mut body = tenant_json(&t);
    body["usage"] = json!({
        "entities": state.store.entity_count(internal),
        "subscriptions": state.store.subscriptions(internal).len(),
        "apiKeys": a.keys(Some(internal)).len(),
    });
    Ok(json_response(StatusCode::OK, &body))
}

/// `PATCH /api/v1/tenants/{name}`: description, quotas, plan, status.
pub async fn update_tenant(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let a = access(&state)?;
    let v = json_body(&state, &headers, body).await?;
    let before = a.tenant(internal_tenant(&name));
    let t = a.update_tenant(&name, &v).await?;
    let action = match (before.map(|b| b.status), t.status) {
        (Some(old), new) if old != new => match new {
            borough_access::model::TenantStatus::Suspended => "tenant.suspend",
            borough_access::model::TenantStatus::Active => "tenant.resume",
        },
        _ => "tenant.update",
    };
    audit(
        a,
        Some(internal_tenant(&name)),
        action,
        Some(t.name.clone()),
        v,
        addr,
    )
    .await;
    Ok(json_response(StatusCode::OK, &tenant_json(&t)))
}

/// `DELETE /api/v1/tenants/{name}`: the tenant, its keys and all its data.
pub async fn delete_tenant(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    ClientAddr(addr): ClientAddr,
) -> ApiResult<Response> {
    let a = access(&state)?;
    let internal = internal_tenant(&name).to_string();
    if internal.is_empty() {
        return Err(NgsiError::bad_data("the default tenant cannot be deleted").into());
    }
    if a.tenant(&internal).is_none() {
        return Err(NgsiError::not_found(format!("tenant '{name}' does not exist")).into());
    }
    // The registration goes first: from now on nobody can write more data.
    a.delete_tenant(&name).await?;
    let mut summary = purge_ngsi(&state, &internal).await?;
    let sources = state.sources.purge(&internal).await?;
    if let Value::Object(s) = &mut summary {
        s.insert("registrations".into(), sources.into());
    }
    for other in &state.tenant_data {
        let part = other
            .purge(&internal)
            .await
            .map_err(|e| NgsiError::internal(format!("purging tenant '{name}': {e}")))?;
        if let (Value::Object(s), Value::Object(p)) = (&mut summary, part) {
            s.extend(p);
        }
    }
    audit(
        a,
        Some(&internal),
        "tenant.delete",
        Some(name.clone()),
        summary,
        addr,
    )
    .await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Removes a tenant's entities, history, subscriptions, retention and hosted contexts.
async fn purge_ngsi(state: &crate::AppState, tenant: &str) -> ApiResult<Value> {
    let store = &state.store;
    let mut entities = 0u64;
    loop {
        let mut ids = Vec::with_capacity(PURGE_BATCH);
        store.scan(tenant, &mut |e| {
            ids.push(e.id.clone());
            ids.len() < PURGE_BATCH
        });
        if ids.is_empty() {
            break;
        }
        let ops = ids.into_iter().map(|id| EntityOp::Delete { id }).collect();
        let done = store
            .write(tenant, ops)
            .await?
            .into_iter()
            .filter(Result::is_ok)
            .count();
        if done == 0 {
            break;
        }
        entities += done as u64;
    }
    let store2 = store.clone();
    let t = tenant.to_string();
    let with_history = tokio::task::spawn_blocking(move || store2.history_entities(&t, None))
        .await
        .map_err(|e| NgsiError::internal(e.to_string()))??;
    for (id, _) in &with_history {
        store
            .write_history(
                tenant,
                borough_core::temporal::HistoryOp::DeleteEntity { id: id.clone() },
            )
            .await?;
    }
    let subs = store.subscriptions(tenant);
    for s in &subs {
        store.delete_subscription(tenant, &s.record.id).await?;
    }
    store
        .set_retention(tenant, borough_core::temporal::Retention::default())
        .await?;
    let contexts = crate::context_registry::purge_tenant(state, tenant).await?;
    Ok(json!({
        "entities": entities,
        "historyEntities": with_history.len(),
        "subscriptions": subs.len(),
        "hostedContexts": contexts,
    }))
}

// --------------------------------------------------------------------- keys

fn key_json(k: &ApiKey) -> Value {
    let ctx = borough_core::Context::core();
    json!({
        "id": k.id,
        "tenant": k.tenant.as_deref().map(public_tenant),
        "name": k.name,
        "roles": k.roles.iter().map(|r| r.name()).collect::<Vec<_>>(),
        "entityTypes": k.entity_types.as_ref().map(|ts| ts.iter().map(|t| ctx.compact(t).into_owned()).collect::<Vec<_>>()),
        "createdAt": borough_core::validate::format_datetime(k.created_at),
        "expiresAt": k.expires_at.map(borough_core::validate::format_datetime),
        "lastUsedAt": k.last_used_at.map(borough_core::validate::format_datetime),
        "rotatedAt": k.rotated_at.map(borough_core::validate::format_datetime),
        "revokedAt": k.revoked_at.map(borough_core::validate::format_datetime),
        "status": if k.revoked_at.is_some() { "revoked" } else if k.usable(borough_core::validate::now_micros()) { "active" } else { "expired" },
    })
}

/// The key `id` if the caller may manage it: operator keys are the
/// operator's, a tenant's keys are its administrators'.
fn manageable(a: &Access, id: &str, tenant: &str) -> ApiResult<ApiKey> {
    let k = a
        .key(id)
        .ok_or_else(|| NgsiError::not_found(format!("key '{id}' does not exist")))?;
    let p = me();
    if p.is_operator() || k.tenant.as_deref() == Some(tenant) {
        Ok(k)
    } else {
        // A key of another tenant is, for this caller, not there.
        Err(NgsiError::not_found(format!("key '{id}' does not exist")).into())
    }
}

/// Which tenant (internal name) a listing is of: the request's, or for the
/// operator without `NGSILD-Tenant`, `?tenant=` or every tenant (`None`).
fn listing_scope(
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> ApiResult<Option<String>> {
    if me().is_operator() && !headers.contains_key(crate::request::TENANT_HEADER) {
        Ok(params.get("tenant").map(|t| internal_tenant(t).to_string()))
    } else {
        Ok(Some(tenant(headers)?))
    }
}

/// `GET /api/v1/keys`: the tenant's keys (the operator: `?tenant=`, or all).
pub async fn list_keys(
    State(state): State<SharedState>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let a = access(&state)?;
    let scope = listing_scope(&params, &headers)?;
    let list: Vec<Value> = a.keys(scope.as_deref()).iter().map(key_json).collect();
    Ok(json_response(StatusCode::OK, &Value::Array(list)))
}

/// `POST /api/v1/keys`: a key for the request's tenant (or, with the role
/// operator-admin, an operator key); the secret is in the answer only.
pub async fn create_key(
    State(state): State<SharedState>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let a = access(&state)?;
    let v = json_body(&state, &headers, body).await?;
    let p = me();
    let wants_operator = v.get("roles").and_then(Value::as_array).is_some_and(|r| {
        r.iter()
            .any(|x| x.as_str() == Some(Role::OperatorAdmin.name()))
    });
    if wants_operator && !p.is_operator() {
        return Err(NgsiError::new(
            ProblemKind::Forbidden,
            "only the operator can create operator-admin keys",
        )
        .into());
    }
    let t = tenant(&headers)?;
    let key_tenant = (!wants_operator).then_some(t.as_str());
    let (k, secret) = a.create_key(key_tenant, &v).await?;
    audit(
        a,
        key_tenant,
        "key.create",
        Some(k.id.clone()),
        json!({"roles": k.roles.iter().map(|r| r.name()).collect::<Vec<_>>(), "entityTypes": k.entity_types}),
        addr,
    )
    .await;
    let mut body = key_json(&k);
    body["key"] = json!(secret);
    Ok(created(&body, &format!("/api/v1/keys/{}", k.id)))
}

/// `GET /api/v1/keys/{id}`
pub async fn get_key(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let a = access(&state)?;
    let k = manageable(a, &id, &tenant(&headers)?)?;
    Ok(json_response(StatusCode::OK, &key_json(&k)))
}

/// `DELETE /api/v1/keys/{id}`: revokes the key at once.
pub async fn revoke_key(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let a = access(&state)?;
    let k = manageable(a, &id, &tenant(&headers)?)?;
    a.revoke_key(&k.id).await?;
    audit(
        a,
        k.tenant.as_deref(),
        "key.revoke",
        Some(k.id.clone()),
        Value::Null,
        addr,
    )
    .await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /api/v1/keys/{id}/rotate`: a new secret; the old one stops working.
pub async fn rotate_key(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let a = access(&state)?;
    let k = manageable(a, &id, &tenant(&headers)?)?;
    let (k, secret) = a.rotate_key(&k.id).await?;
    audit(
        a,
        k.tenant.as_deref(),
        "key.rotate",
        Some(k.id.clone()),
        Value::Null,
        addr,
    )
    .await;
    let mut body = key_json(&k);
    body["key"] = json!(secret);
    Ok(json_response(StatusCode::OK, &body))
}

// -------------------------------------------------------------------- audit

/// `GET /api/v1/audit?after=&limit=`: the tenant's entries (the operator:
/// every entry, or `?tenant=`), oldest first, with the cursor of the next page.
pub async fn audit_log(
    State(state): State<SharedState>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let a = access(&state)?;
    let scope = listing_scope(&params, &headers)?.map(|t| public_tenant(&t).to_string());
    let number = |k: &str| -> ApiResult<Option<u64>> {
        params
            .get(k)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    ApiError(NgsiError::bad_data(format!(
                        "{k} must be a non-negative integer"
                    )))
                })
            })
            .transpose()
    };
    let after = number("after")?;
    let limit = number("limit")?.unwrap_or(100) as usize;
    let (entries, next) = a
        .audit
        .page(scope, after, limit)
        .await
        .map_err(NgsiError::internal)?;
    // `at` (microseconds) is what the chain hashes; `time` is for people.
    let shown: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = json!(e);
            v["time"] = json!(borough_core::validate::format_datetime(e.at));
            v
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"entries": shown, "next": next}),
    ))
}

/// `GET /api/v1/audit/verify`: walks the hash chain.
pub async fn audit_verify(State(state): State<SharedState>) -> ApiResult<Response> {
    let a = access(&state)?;
    let report = a.audit.verify().await.map_err(NgsiError::internal)?;
    Ok(json_response(StatusCode::OK, &json!(report)))
}

/// Adds the management routes to the application's router.
pub fn routes(router: axum::Router<SharedState>) -> axum::Router<SharedState> {
    use axum::routing::{get, post};
    router
        .route("/api/v1/me", get(whoami))
        .route("/api/v1/tenants", get(list_tenants).post(create_tenant))
        .route(
            "/api/v1/tenants/{name}",
            get(get_tenant).patch(update_tenant).delete(delete_tenant),
        )
        .route("/api/v1/keys", get(list_keys).post(create_key))
        .route("/api/v1/keys/{id}", get(get_key).delete(revoke_key))
        .route("/api/v1/keys/{id}/rotate", post(rotate_key))
        .route("/api/v1/audit", get(audit_log))
        .route("/api/v1/audit/verify", get(audit_verify))
}
