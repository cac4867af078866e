//! Subscriptions (clause 5.8): create, retrieve, query, update, delete, and
//! their dead letters. Matching and delivery happen elsewhere: the store
//! matches changes as it commits them, `borough-notify` delivers.

use crate::contexts::ActiveContext;
use crate::entities::{body_with_context, existing_tenant, with_tenant};
use crate::problem::ApiResult;
use crate::request::{ResponseType, link_context, negotiate, tenant};
use crate::{SharedState, json_response, typed_json_response};
use axum::body::Body;
use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use borough_core::subscription::{CompiledSubscription, SubscriptionRecord};
use borough_core::validate::{check_uri, format_datetime, now_micros};
use borough_core::{NgsiError, ProblemKind};
use borough_store::Expect;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

type Params = Query<HashMap<String, String>>;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// What the body's context was, to echo it and to resolve it again never.
pub(crate) async fn context_record(
    state: &crate::AppState,
    actx: &ActiveContext,
) -> ApiResult<(Value, Vec<Map<String, Value>>)> {
    let value = actx.source.as_value();
    let objects = state.contexts.objects(&value).await?;
    Ok((value, objects))
}

/// Resolves `jsonldContext` (the context notifications are compacted with)
/// once, when the subscription is written, so that a context server that
/// goes away later does not stop notifications.
async fn notification_context(
    state: &crate::AppState,
    record: &mut SubscriptionRecord,
) -> ApiResult<()> {
    record.notification_context_objects = match record.body.get("jsonldContext") {
        Some(Value::String(url)) => {
            check_uri("jsonldContext", url)?;
            Some(state.contexts.objects(&json!(url)).await?)
        }
        Some(_) => {
            return Err(NgsiError::bad_data("jsonldContext must be the URI of a context").into());
        }
        None => None,
    };
    Ok(())
}

/// `POST /subscriptions`
pub async fn create(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = tenant(&headers)?;
    let (v, actx) =
        body_with_context(&state, &headers, body, state.config.max_body_bytes, false).await?;
    let Value::Object(mut body) = v else {
        return Err(NgsiError::bad_data("a subscription must be a JSON object").into());
    };
    let now = now_micros();
    let id = match body.get("id") {
        Some(Value::String(id)) => {
            check_uri("subscription id", id)?;
            id.clone()
        }
        Some(_) => return Err(NgsiError::bad_data("subscription id must be a string").into()),
        None => format!(
            "urn:ngsi-ld:Subscription:{:x}{:04x}",
            now,
            NEXT.fetch_add(1, Ordering::Relaxed) & 0xffff
        ),
    };
    body.remove("id");
    body.remove("status");
    borough_core::subscription::normalize_body(&mut body);
    if state.store.subscription(&tenant, &id).is_some() {
        return Err(NgsiError::new(
            ProblemKind::AlreadyExists,
            format!("subscription '{id}' already exists"),
        )
        .into());
    }
    if let Some(access) = &state.access {
        access.check_quota(
            &tenant,
            "subscriptions",
            |q| q.max_subscriptions,
            state.store.subscriptions(&tenant).len() as u64,
            1,
        )?;
    }
    let (context, context_objects) = context_record(&state, &actx).await?;
    let mut record = SubscriptionRecord {
        id: id.clone(),
        body,
        context,
        context_objects,
        notification_context_objects: None,
        created_at: now,
        modified_at: now,
        stats: Default::default(),
    };
    notification_context(&state, &mut record).await?;
    // Validate before storing: every error is a 400 and nothing is kept.
    let compiled = CompiledSubscription::compile(record.clone(), now, true)?;
    check_endpoint(&state, &compiled.endpoint.uri).await?;
    // Two creations of one id at once: the store lets the first in only.
    if !state
        .store
        .put_subscription(&tenant, record, Expect::Absent)
        .await?
    {
        return Err(NgsiError::new(
            ProblemKind::AlreadyExists,
            format!("subscription '{id}' already exists"),
        )
        .into());
    }
    let mut resp = StatusCode::CREATED.into_response();
    if let Ok(l) = HeaderValue::from_str(&format!(
        "/ngsi-ld/v1/subscriptions/{}",
        crate::request::encode_path_segment(&id)
    )) {
        resp.headers_mut().insert(header::LOCATION, l);
    }
    Ok(with_tenant(resp, &tenant))
}

fn render(
    state: &crate::AppState,
    tenant: &str,
    sub: &CompiledSubscription,
    rt: ResponseType,
) -> Value {
    let stats = state.store.stats(tenant, &sub.record.id);
    sub.to_json(now_micros(), rt == ResponseType::LdJson, &stats)
}

/// A subscription answer; plain JSON carries the context in a `Link` header
/// (the subscription's own when it is one URL, else the core context).
pub(crate) fn respond(rt: ResponseType, body: &Value, tenant: &str, context: &Value) -> Response {
    if rt == ResponseType::LdJson {
        return with_tenant(
            typed_json_response(StatusCode::OK, body, "application/ld+json"),
            tenant,
        );
    }
    let mut resp = typed_json_response(StatusCode::OK, body, "application/json");
    let url = match context {
        Value::String(u) => u.as_str(),
        _ => borough_core::context::CORE_CONTEXT_URL,
    };
    if let Ok(v) = HeaderValue::from_str(&format!(
        "<{url}>; rel=\"{}\"; type=\"application/ld+json\"",
        crate::request::JSONLD_CONTEXT_REL
    )) {
        resp.headers_mut().insert(header::LINK, v);
    }
    with_tenant(resp, tenant)
}

/// `GET /subscriptions` (`limit`, `offset`, `count`), with `Link` rel=next/prev.
pub async fn list(
    State(state): State<SharedState>,
    Query(params): Params,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let rt = negotiate(&headers, false)?;
    let tenant = existing_tenant(&state, &headers)?;
    let page = crate::query::paging(&params)?;
    let subs = state.store.subscriptions(&tenant);
    let body: Vec<Value> = subs
        .iter()
        .skip(page.offset)
        .take(page.limit)
        .map(|s| render(&state, &tenant, s, rt))
        .collect();
    let resp = respond(rt, &Value::Array(body), &tenant, &Value::Null);
    let result = borough_store::QueryPage {
        entities: Vec::new(),
        total: page.count.then_some(subs.len()),
    };
    let has_next = subs.len() > page.offset.saturating_add(page.limit);
    Ok(crate::query::paged(resp, &result, has_next, page, &uri))
}

fn find(
    state: &crate::AppState,
    tenant: &str,
    id: &str,
) -> ApiResult<std::sync::Arc<CompiledSubscription>> {
    check_uri("subscription id", id)?;
    state
        .store
        .subscription(tenant, id)
        .ok_or_else(|| NgsiError::not_found(format!("subscription '{id}' does not exist")).into())
}

/// `GET /subscriptions/{id}`
pub async fn retrieve(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let rt = negotiate(&headers, false)?;
    let tenant = existing_tenant(&state, &headers)?;
    let sub = find(&state, &tenant, &id)?;
    Ok(respond(
        rt,
        &render(&state, &tenant, &sub, rt),
        &tenant,
        &sub.record.context,
    ))
}

/// `PATCH /subscriptions/{id}`: the given members replace theirs; `null` removes.
pub async fn update(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = existing_tenant(&state, &headers)?;
    find(&state, &tenant, &id)?;
    let (v, actx) =
        body_with_context(&state, &headers, body, state.config.max_body_bytes, true).await?;
    let Value::Object(mut patch) = v else {
        return Err(NgsiError::bad_data("a subscription update must be a JSON object").into());
    };
    borough_core::subscription::normalize_body(&mut patch);
    // Read, merge, write if unchanged meanwhile; else merge again into what
    // the other change left (a deletion meanwhile ends in 404).
    for _ in 0..UPDATE_ATTEMPTS {
        let sub = find(&state, &tenant, &id)?;
        let read = sub.record.modified_at;
        let record = merged(&state, &headers, &actx, &id, sub.record.clone(), &patch).await?;
        if state
            .store
            .put_subscription(&tenant, record, Expect::ModifiedAt(read))
            .await?
        {
            return Ok(with_tenant(StatusCode::NO_CONTENT.into_response(), &tenant));
        }
    }
    Err(NgsiError::internal(format!(
        "subscription '{id}' kept changing while it was updated; try again"
    ))
    .into())
}

/// Tries of a subscription update that finds the subscription changed under it.
const UPDATE_ATTEMPTS: usize = 8;

/// The subscription `record` with `patch` applied, validated.
async fn merged(
    state: &SharedState,
    headers: &HeaderMap,
    actx: &crate::contexts::ActiveContext,
    id: &str,
    mut record: SubscriptionRecord,
    patch: &Map<String, Value>,
) -> ApiResult<SubscriptionRecord> {
    for (k, v) in patch.clone() {
        match k.as_str() {
            "id" if v != json!(id) => {
                return Err(NgsiError::bad_data("a subscription's id cannot change").into());
            }
            "id" | "status" => {}
            _ if v.is_null() => {
                record.body.remove(&k);
            }
            _ => {
                record.body.insert(k, v);
            }
        }
    }
    // A new context given with the update replaces the old one.
    if link_context(headers)?.is_some() || actx.source != crate::contexts::ContextSource::Core {
        let (context, objects) = context_record(state, actx).await?;
        record.context = context;
        record.context_objects = objects;
    }
    notification_context(state, &mut record).await?;
    // Always a new version, even within the same microsecond.
    let now = now_micros().max(record.modified_at + 1);
    record.modified_at = now;
    let compiled = CompiledSubscription::compile(record.clone(), now, true)?;
    check_endpoint(state, &compiled.endpoint.uri).await?;
    Ok(record)
}

/// `DELETE /subscriptions/{id}`
pub async fn delete(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let tenant = existing_tenant(&state, &headers)?;
    find(&state, &tenant, &id)?;
    state.store.delete_subscription(&tenant, &id).await?;
    Ok(with_tenant(StatusCode::NO_CONTENT.into_response(), &tenant))
}

/// `GET /subscriptions/{id}/deadLetters`: notifications given up on, with the last error.
pub async fn dead_letters(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let tenant = existing_tenant(&state, &headers)?;
    find(&state, &tenant, &id)?;
    let letters = {
        let (tenant, id) = (tenant.clone(), id.clone());
        crate::off_executor(&state, move |s| s.dead_letters(&tenant, &id)).await?
    };
    let body: Vec<Value> = letters
        .iter()
        .map(|(n, error)| {
            json!({
                "entityId": n.entity.id,
                "trigger": n.trigger,
                "changedAt": format_datetime(n.at),
                "error": error,
            })
        })
        .collect();
    Ok(with_tenant(
        json_response(StatusCode::OK, &Value::Array(body)),
        &tenant,
    ))
}

/// Refuses an endpoint at an address the operator has not allowed (loopback,
/// private ranges, cloud metadata): the server must not be made to probe its
/// own network. A name that does not resolve now is left to delivery, which
/// checks again.
async fn check_endpoint(state: &crate::AppState, uri: &str) -> ApiResult<()> {
    match state.config.outbound.check_url(uri).await {
        Err(e) if e.is_refusal() => {
            Err(NgsiError::bad_data(format!("notification endpoint {e}")).into())
        }
        _ => Ok(()),
    }
}
