//! The access guard in front of every route: who is calling (API key,
//! OpenID Connect token, or the dashboard's session cookie), whether the
//! route's policy lets them (`borough_access::policy`), whether their tenant
//! is registered and active, and within which rates and sizes. What it learnt
//! travels with the request in a task-local (`caller()`), which the handlers
//! consult for the principal and the entity types it is limited to.

use crate::problem::ApiError;
use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use borough_access::model::TenantStatus;
use borough_access::policy::{self, Need, TenantFrom};
use borough_access::{Access, Permission, Principal, internal_tenant, public_tenant};
use borough_core::{NgsiError, ProblemKind};
use std::net::SocketAddr;
use std::sync::Arc;

/// The cookie of a dashboard session.
pub const SESSION_COOKIE: &str = "borough_session";

tokio::task_local! {
    /// The caller of the request being handled.
    static CALLER: Arc<Principal>;
}

/// The entity types the caller is limited to (expanded), if any. Outside a
/// guarded request (tests of the bare router) there is no limit.
pub fn caller_entity_types() -> Option<Vec<String>> {
    CALLER.try_with(|p| p.entity_types.clone()).ok().flatten()
}

/// The caller of the request being handled, if the guard saw one.
pub fn caller() -> Option<Arc<Principal>> {
    CALLER.try_with(Arc::clone).ok()
}

/// Refuses, with the problem the caller should see, an entity of `types`
/// that the caller may not touch: as not found, so that it learns nothing
/// of entities outside its scope.
pub fn check_entity_types(id: &str, types: &[String]) -> Result<(), NgsiError> {
    match caller_entity_types() {
        Some(allowed) if !types.iter().any(|t| allowed.contains(t)) => Err(NgsiError::not_found(
            format!("entity '{id}' does not exist"),
        )),
        _ => Ok(()),
    }
}

fn refuse(kind: ProblemKind, detail: impl Into<String>) -> Response {
    let mut r = ApiError(NgsiError::new(kind, detail)).into_response();
    if kind == ProblemKind::Unauthorized {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"borough\""),
        );
    }
    r
}

/// The bearer credential or the session cookie of a request.
fn credential(headers: &HeaderMap) -> Option<Result<String, String>> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let Ok(s) = v.to_str() else {
            return Some(Err("the Authorization header must be ASCII".into()));
        };
        let mut parts = s.splitn(2, ' ');
        let scheme = parts.next().unwrap_or_default();
        let value = parts.next().unwrap_or_default().trim();
        if !scheme.eq_ignore_ascii_case("bearer") || value.is_empty() {
            return Some(Err(
                "use Authorization: Bearer <API key or token>".to_string()
            ));
        }
        return Some(Ok(value.to_string()));
    }
    None
}

/// The value of the session cookie, if the request carries one.
pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.to_string())
}

/// The tenant a request names, as an internal name.
fn request_tenant(request: &Request, from: TenantFrom) -> Result<Option<String>, NgsiError> {
    match from {
        TenantFrom::None => Ok(None),
        TenantFrom::Header => crate::request::tenant(request.headers()).map(Some),
        TenantFrom::Query(name) => {
            let value = request
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| {
                    percent_encoding::percent_decode_str(v)
                        .decode_utf8_lossy()
                        .into_owned()
                })
                .unwrap_or_default();
            Ok(Some(internal_tenant(&value).to_string()))
        }
    }
}

/// The client's address, when the server knows it (an extractor that never fails).
pub struct ClientAddr(pub Option<String>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip().to_canonical().to_string()),
        ))
    }
}

/// The client's address, for throttling and the audit log.
fn client_addr(request: &Request) -> String {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_canonical().to_string())
        .unwrap_or_else(|| "local".into())
}

/// The guard, as an axum middleware over the whole application.
pub async fn guard(
    axum::extract::State(access): axum::extract::State<Arc<Access>>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(route) = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
    else {
        // Nothing matched: the fallback answers 404 and touches nothing.
        return next.run(request).await;
    };
    let method = request.method().as_str().to_string();
    let Some(policy) = policy::lookup(&method, &route) else {
        if policy::POLICIES.iter().any(|p| p.route == route) {
            // Another method of a known route: the router answers 405.
            return next.run(request).await;
        }
        tracing::error!(%method, %route, "a route without an access policy was called");
        return refuse(
            ProblemKind::Forbidden,
            format!("{method} {route} has no access policy"),
        );
    };
    if !access.enabled() {
        return run_as(Principal::open(), request, next).await;
    }
    match policy.need {
        Need::Public | Need::DeviceToken => return next.run(request).await,
        Need::Authenticated | Need::Permission(_) => {}
    }
    let addr = client_addr(&request);
    if let Some(wait) = access.throttled(&addr) {
        access.refused("", "failed-auth");
        return refuse(
            ProblemKind::TooManyRequests,
            format!(
                "too many failed sign-ins from {addr}; try again in {} s",
                wait.as_secs().max(1)
            ),
        );
    }
    let principal = match credential(request.headers()) {
        Some(Ok(c)) => match access.authenticate(&c, &addr).await {
            Ok(p) => p,
            Err(e) => {
                access
                    .record(borough_access::audit::AuditEvent {
                        actor: "anonymous".into(),
                        action: "auth.failure".into(),
                        target: Some(format!("{method} {route}")),
                        outcome: "denied".into(),
                        detail: serde_json::json!({"reason": e.detail}),
                        source: Some(addr.clone()),
                        ..Default::default()
                    })
                    .await;
                return refuse(e.kind, e.detail);
            }
        },
        Some(Err(detail)) => return refuse(ProblemKind::Unauthorized, detail),
        None => match session_cookie(request.headers()).and_then(|s| access.session(&s)) {
            Some(p) => p,
            None => {
                return refuse(
                    ProblemKind::Unauthorized,
                    "this server needs credentials: Authorization: Bearer <API key or token>",
                );
            }
        },
    };
    let tenant = match request_tenant(&request, policy.tenant) {
        Ok(t) => t,
        Err(e) => return ApiError(e).into_response(),
    };
    if let Need::Permission(p) = policy.need {
        if let Err(e) = admit(&access, &principal, p, tenant.as_deref()).await {
            return ApiError(e).into_response();
        }
        if principal.entity_types.is_some() && !type_scoped_route(&method, &route) {
            return refuse(
                ProblemKind::Forbidden,
                format!(
                    "{} is limited to some entity types and may not use {method} {route}",
                    principal.subject
                ),
            );
        }
    }
    if let Err(e) = access.admit_request(&principal, tenant.as_deref()) {
        let mut r = ApiError(e).into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    if let Some(t) = &tenant
        && let Some(max) = access.tenant(t).and_then(|t| t.quotas.max_body_bytes)
    {
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            access.refused(t, "body-size");
            return refuse(
                ProblemKind::PayloadTooLarge,
                format!(
                    "tenant '{}' may send bodies of at most {max} bytes",
                    public_tenant(t)
                ),
            );
        }
        let limit = usize::try_from(max).unwrap_or(usize::MAX);
        request = request.map(|b| axum::body::Body::new(http_body_util::Limited::new(b, limit)));
    }
    run_as(principal, request, next).await
}

/// Whether a principal limited to entity types may use a route: the entity
/// and temporal reads and the entity writes, whose handlers apply the limit.
/// Subscriptions, discovery, contexts, history writes and the rest would see
/// or change more than those types, so they are closed to it.
fn type_scoped_route(method: &str, route: &str) -> bool {
    let Some(rest) = route.strip_prefix("/ngsi-ld/v1") else {
        return false;
    };
    if rest.starts_with("/entities") || rest.starts_with("/entityOperations/") {
        return true;
    }
    rest.starts_with("/temporal/")
        && (method == "GET" || rest == "/temporal/entityOperations/query")
}

/// Checks the permission, the tenant's registration and its status.
async fn admit(
    access: &Access,
    principal: &Principal,
    p: Permission,
    tenant: Option<&str>,
) -> Result<(), NgsiError> {
    let t = tenant.unwrap_or("");
    if let Err(denial) = principal.check(p, t) {
        let detail = match denial {
            borough_access::model::Denial::Tenant => format!(
                "{} may not use tenant '{}'",
                principal.subject,
                public_tenant(t)
            ),
            borough_access::model::Denial::Role => format!(
                "{} may not {} here: its roles ({}) do not allow it",
                principal.subject,
                match p {
                    Permission::Read => "read",
                    Permission::Write => "write",
                    Permission::Admin => "administer the tenant",
                    Permission::Devices => "manage devices",
                    Permission::Operator => "do what only the operator does",
                },
                principal
                    .roles
                    .iter()
                    .map(|r| r.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        return Err(NgsiError::new(ProblemKind::Forbidden, detail));
    }
    let Some(t) = tenant else {
        return Ok(());
    };
    match access.tenant(t) {
        None if p != Permission::Read && access.auto_create_tenants() => {
            access.ensure_tenant(t).await?;
        }
        None => {
            return Err(NgsiError::new(
                ProblemKind::NonexistentTenant,
                format!(
                    "tenant '{}' is not registered; the operator registers tenants with POST /api/v1/tenants",
                    public_tenant(t)
                ),
            ));
        }
        Some(record) if record.status == TenantStatus::Suspended => {
            let reads_ok = p == Permission::Read && record.reads_while_suspended;
            if !reads_ok {
                return Err(NgsiError::new(
                    ProblemKind::Forbidden,
                    format!(
                        "tenant '{}' is suspended{}",
                        record.name,
                        if p == Permission::Read {
                            ""
                        } else {
                            ": it cannot be changed"
                        }
                    ),
                ));
            }
        }
        Some(_) => {}
    }
    Ok(())
}

async fn run_as(principal: Principal, request: Request, next: Next) -> Response {
    CALLER.scope(Arc::new(principal), next.run(request)).await
}

/// Records a change made by the request's caller in the audit log;
/// `tenant` is the internal name of the tenant concerned, if any.
pub async fn audit_change(
    access: &Access,
    tenant: Option<&str>,
    action: &str,
    target: Option<String>,
    detail: serde_json::Value,
    source: Option<String>,
) {
    access
        .record(borough_access::audit::AuditEvent {
            tenant: tenant.map(|t| public_tenant(t).to_string()),
            actor: caller()
                .map(|p| p.subject.clone())
                .unwrap_or_else(|| Principal::open().subject),
            action: action.into(),
            target,
            outcome: "ok".into(),
            detail,
            source,
        })
        .await;
}

/// 401 when a route that needs no principal is asked for one.
pub fn unauthorized(detail: &str) -> Response {
    refuse(ProblemKind::Unauthorized, detail)
}

/// `r` with the session cookie set (or, without a token, cleared).
pub fn with_session_cookie(mut r: Response, token: Option<&str>, max_age_secs: u64) -> Response {
    let value = match token {
        Some(t) => format!(
            "{SESSION_COOKIE}={t}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}"
        ),
        None => format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}
