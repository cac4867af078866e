//! The command-center dashboard: the page and its assets (embedded in the
//! binary at build time, see build.rs), and the endpoints it reads under
//! `/dashboard/api`: tenants, a tenant's summary, viewport clusters, alerts
//! and the live feed (SSE). Like the API it knows only the `EntityStore` trait.

pub mod alerts;
pub mod clusters;
pub mod grid;
pub mod live;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use borough_access::{Access, TenantScope};
use borough_api::auth::{ClientAddr, session_cookie, with_session_cookie};
use borough_api::problem::{ApiError, ApiResult};
use borough_core::{Context, NgsiError, ProblemKind};
use borough_store::{DEFAULT_TENANT, EntityStore};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

mod assets {
    include!(concat!(env!("OUT_DIR"), "/assets.rs"));
}

/// Settings of the dashboard.
#[derive(Clone, Default)]
pub struct WebConfig {
    /// A raster tile URL template (`https://tile.openstreetmap.org/{z}/{x}/{y}.png`)
    /// for online use; without it the map draws its own offline base layer.
    pub tile_url: Option<String>,
    /// Attribution shown with those tiles.
    pub tile_attribution: Option<String>,
    /// Turns true when the server shuts down: live streams end so that open
    /// pages do not hold up a graceful shutdown.
    pub stop: Option<watch::Receiver<bool>>,
    /// Access control: sign-in with an API key, and which tenants a user sees.
    /// `None`: the dashboard is open.
    pub access: Option<Arc<Access>>,
}

struct WebState {
    store: Arc<dyn EntityStore>,
    config: WebConfig,
    /// The expanded name of the GeoProperty shown on the map.
    location: String,
    /// Cluster pyramids, started on the first cluster request (it needs the runtime).
    grid: std::sync::OnceLock<Arc<grid::GridIndex>>,
}

type Shared = Arc<WebState>;

impl WebState {
    fn grid_index(&self) -> &Arc<grid::GridIndex> {
        self.grid.get_or_init(|| {
            grid::GridIndex::start(
                self.store.clone(),
                self.location.clone(),
                self.config.stop.clone(),
            )
        })
    }
}

/// Most alerts one request lists.
pub const MAX_ALERTS: usize = 1000;
const MAX_TENANT_LEN: usize = 64;

/// The dashboard's routes: `/` and `/dashboard/...`.
pub fn router(store: Arc<dyn EntityStore>, config: WebConfig) -> Router {
    let state = Arc::new(WebState {
        store,
        config,
        location: Context::core().expand("location").into_owned(),
        grid: std::sync::OnceLock::new(),
    });
    Router::new()
        .route("/", get(index))
        .route("/dashboard/api/config", get(config_route))
        .route("/dashboard/api/login", post(login))
        .route("/dashboard/api/logout", post(logout))
        .route("/dashboard/api/tenants", get(tenants))
        .route("/dashboard/api/summary", get(summary))
        .route("/dashboard/api/clusters", get(clusters_route))
        .route("/dashboard/api/alerts", get(alerts_route))
        .route("/dashboard/api/events", get(events))
        .route("/dashboard/{*path}", get(asset))
        .with_state(state)
}

/// Whether the map library was embedded (npm was available at build time).
pub fn has_map_library() -> bool {
    find_asset("vendor/leaflet.js").is_some()
}

fn find_asset(path: &str) -> Option<&'static [u8]> {
    assets::ASSETS
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, b)| *b)
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or_default() {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "json" => "application/json",
        "ico" => "image/x-icon",
        _ => "application/octet-stream",
    }
}

fn serve_asset(path: &str) -> Response {
    match find_asset(path) {
        Some(bytes) => {
            let mut resp = (StatusCode::OK, bytes).into_response();
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(content_type(path)),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            resp
        }
        None => ApiError(NgsiError::not_found(format!(
            "no dashboard file '{}'",
            path.chars().take(128).collect::<String>()
        )))
        .into_response(),
    }
}

async fn index() -> Response {
    serve_asset("index.html")
}

async fn asset(Path(path): Path<String>) -> Response {
    serve_asset(&path)
}

type Params = Result<Query<Vec<(String, String)>>, QueryRejection>;

fn params(q: Params) -> ApiResult<Vec<(String, String)>> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError(NgsiError::bad_data(format!("bad query string: {e}"))))
}

fn param<'a>(p: &'a [(String, String)], name: &str) -> Option<&'a str> {
    p.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The `tenant` parameter (the default tenant when absent, empty or
/// `default`), which must exist: registered, or written to.
fn tenant(s: &WebState, p: &[(String, String)]) -> ApiResult<String> {
    let store = &*s.store;
    let t = param(p, "tenant").unwrap_or(DEFAULT_TENANT);
    let t = if t == "default" { DEFAULT_TENANT } else { t };
    // Empty is the default tenant.
    if !(t.is_empty() || borough_access::model::is_tenant_name(t)) {
        return Err(ApiError(NgsiError::bad_data(format!(
            "tenant '{}' is not valid: use 1 to {MAX_TENANT_LEN} letters, digits, '_' or '-'",
            t.chars().take(80).collect::<String>()
        ))));
    }
    let registered = s
        .config
        .access
        .as_ref()
        .is_some_and(|a| a.enabled() && a.tenant(t).is_some());
    if !registered && !store.tenant_exists(t) {
        return Err(ApiError(NgsiError::new(
            ProblemKind::NonexistentTenant,
            format!("tenant '{t}' does not exist"),
        )));
    }
    Ok(t.to_string())
}

fn json(v: &Value) -> Response {
    let mut resp = (StatusCode::OK, v.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn config_route(State(s): State<Shared>, headers: axum::http::HeaderMap) -> Response {
    let access = s.config.access.as_ref().filter(|a| a.enabled());
    let signed_in = access.map(|a| {
        session_cookie(&headers)
            .and_then(|c| a.session(&c))
            .is_some()
    });
    json(&json!({
        "tileUrl": s.config.tile_url,
        "tileAttribution": s.config.tile_attribution,
        "maxZoom": clusters::MAX_ZOOM,
        "mapLibrary": has_map_library(),
        "liveWindowMs": live::WINDOW.as_millis() as u64,
        "auth": access.is_some(),
        "signedIn": signed_in.unwrap_or(true),
    }))
}

/// `POST /dashboard/api/login` with `{"apiKey": "..."}`: a session cookie
/// (HttpOnly, SameSite=Strict) for the key's principal. Only a JSON body is
/// accepted, so that no other site's form can sign a browser in or out.
async fn login(
    State(s): State<Shared>,
    ClientAddr(addr): ClientAddr,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let Some(access) = s.config.access.as_ref().filter(|a| a.enabled()) else {
        return Err(ApiError(NgsiError::new(
            ProblemKind::OperationNotSupported,
            "this dashboard is open: there is nothing to sign in to",
        )));
    };
    borough_api::request::body_type(&headers, false)?;
    let v = borough_api::request::read_json(body, 16 << 10).await?;
    let key = v
        .get("apiKey")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError(NgsiError::bad_data("give {\"apiKey\": \"...\"}")))?;
    let addr = addr.unwrap_or_else(|| "local".into());
    if let Some(wait) = access.throttled(&addr) {
        return Err(ApiError(NgsiError::new(
            ProblemKind::TooManyRequests,
            format!(
                "too many failed sign-ins; try again in {} s",
                wait.as_secs().max(1)
            ),
        )));
    }
    let outcome = access.authenticate(key, &addr).await;
    access
        .record(borough_access::audit::AuditEvent {
            actor: match &outcome {
                Ok(p) => p.subject.clone(),
                Err(_) => "anonymous".into(),
            },
            action: "dashboard.login".into(),
            outcome: if outcome.is_ok() { "ok" } else { "denied" }.into(),
            detail: match &outcome {
                Ok(_) => Value::Null,
                Err(e) => json!({"reason": e.detail}),
            },
            source: Some(addr),
            ..Default::default()
        })
        .await;
    let principal = outcome.map_err(ApiError)?;
    let token = access.open_session(&principal).map_err(ApiError)?;
    Ok(with_session_cookie(
        (StatusCode::NO_CONTENT).into_response(),
        Some(&token),
        12 * 3600,
    ))
}

/// `POST /dashboard/api/logout`: ends the session and clears its cookie.
async fn logout(State(s): State<Shared>, headers: axum::http::HeaderMap) -> Response {
    if let (Some(access), Some(cookie)) = (&s.config.access, session_cookie(&headers)) {
        access.close_session(&cookie);
    }
    with_session_cookie(StatusCode::NO_CONTENT.into_response(), None, 0)
}

/// The tenants the signed-in user may see (all of them for the operator).
async fn tenants(State(s): State<Shared>) -> Response {
    let mut names = s.store.tenants();
    if let Some(access) = s.config.access.as_ref().filter(|a| a.enabled()) {
        for t in access.tenants() {
            let internal = borough_access::internal_tenant(&t.name).to_string();
            if !names.contains(&internal) {
                names.push(internal);
            }
        }
    }
    if !names.iter().any(|n| n == DEFAULT_TENANT) {
        names.insert(0, DEFAULT_TENANT.to_string());
    }
    names.sort();
    if let Some(p) = borough_api::auth::caller()
        && let TenantScope::Only(allowed) = &p.tenants
        && !p.is_operator()
    {
        names.retain(|n| allowed.contains(n));
    }
    let list: Vec<Value> = names
        .iter()
        .map(|n| json!({"name": n, "entities": s.store.entity_count(n)}))
        .collect();
    json(&json!({ "tenants": list }))
}

/// A tenant's entity counts per type, how many are located, how many alert,
/// and the extent of the located ones (to fit the map).
async fn summary(State(s): State<Shared>, q: Params) -> ApiResult<Response> {
    let p = params(q)?;
    let t = tenant(&s, &p)?;
    let ctx = Context::core();
    let mut types: Vec<(String, usize)> = s
        .store
        .type_counts(&t)
        .into_iter()
        .map(|(t, n)| (ctx.compact(&t).into_owned(), n))
        .collect();
    types.sort();
    // Alerts and the extent of located entities come from the cluster
    // pyramid (built here on a tenant's first view), not from a scan.
    let (located, extent, critical, warning) = s
        .grid_index()
        .tenant(&t)
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .stats();
    Ok(json(&json!({
        "tenant": t,
        "entities": s.store.entity_count(&t),
        "located": located,
        "extent": extent,
        "types": types.iter().map(|(t, n)| json!({"type": t, "count": n})).collect::<Vec<_>>(),
        "alerts": {"critical": critical, "warning": warning},
    })))
}

async fn clusters_route(State(s): State<Shared>, q: Params) -> ApiResult<Response> {
    let p = params(q)?;
    let t = tenant(&s, &p)?;
    let req = clusters::parse_request(param(&p, "bbox"), param(&p, "zoom"), param(&p, "types"))?;
    let unknown = clusters::unknown_types(&*s.store, &t, &req);
    if !unknown.is_empty() {
        return Err(ApiError(NgsiError::bad_data(format!(
            "tenant has no entities of type {}",
            unknown.join(", ")
        ))));
    }
    let resp = if req.zoom <= grid::GRID_MAX_ZOOM {
        let tenant_grid = s.grid_index().tenant(&t);
        clusters::cluster_from_grid(&*s.store, &t, &s.location, &req, &tenant_grid)
    } else {
        clusters::cluster(&*s.store, &t, &s.location, &req)
    };
    let body = serde_json::to_vec(&resp).map_err(|e| NgsiError::internal(e.to_string()))?;
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

/// Entities in an alert state, most severe first, then by id.
async fn alerts_route(State(s): State<Shared>, q: Params) -> ApiResult<Response> {
    let p = params(q)?;
    let t = tenant(&s, &p)?;
    let limit = match param(&p, "limit") {
        None => 200,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_ALERTS).contains(n))
            .ok_or_else(|| {
                ApiError(NgsiError::bad_data(format!(
                    "limit must be a whole number from 1 to {MAX_ALERTS}"
                )))
            })?,
    };
    let mut found: Vec<live::Summary> = Vec::new();
    s.store.scan(&t, &mut |e| {
        if alerts::severity_of(e).is_some() {
            found.push(live::summary(&e.id, Some(e), &s.location));
        }
        true
    });
    found.sort_by(|a, b| {
        let sa = a.alert.as_ref().map(|x| x.severity);
        let sb = b.alert.as_ref().map(|x| x.severity);
        sa.cmp(&sb).then_with(|| a.id.cmp(&b.id))
    });
    let critical = found
        .iter()
        .filter(|a| a.alert.as_ref().map(|x| x.severity) == Some(alerts::Severity::Critical))
        .count();
    let total = found.len();
    found.truncate(limit);
    Ok(json(&json!({
        "total": total,
        "critical": critical,
        "warning": total - critical,
        "alerts": found,
    })))
}

async fn events(State(s): State<Shared>, q: Params) -> ApiResult<Response> {
    let p = params(q)?;
    let t = tenant(&s, &p)?;
    let stream = live::stream(&*s.store, t, s.config.stop.clone());
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
