//! Borough's HTTP layer: it parses requests, resolves `@context`, calls the
//! core and the store, and renders responses. It holds no state of its own.

pub mod admin;
pub mod auth;
pub mod batch;
pub mod context_registry;
pub mod contexts;
pub mod csource;
pub mod discovery;
pub mod distributed;
pub mod entities;
pub mod federation;
pub mod import;
pub mod join;
pub mod metrics;
pub mod params;
pub mod problem;
pub mod query;
pub mod request;
pub mod server;
pub mod subscriptions;
pub mod temporal;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use borough_core::{NgsiError, ProblemKind};
use borough_store::EntityStore;
use bytes::Bytes;
use contexts::ContextResolver;
use problem::ApiError;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// Limits and settings of the HTTP layer.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Largest body of a single-entity request.
    pub max_body_bytes: usize,
    /// Largest body of a batch operation.
    pub max_batch_body_bytes: usize,
    /// Most entities in one batch operation.
    pub max_batch_entities: usize,
    /// Timeout of each remote `@context` fetch.
    pub context_fetch_timeout: Duration,
    /// Serve `GET /bench/static` with a fixed body of this many bytes: the
    /// HTTP-ceiling baseline of `borough bench`. Off in normal operation.
    pub bench_static_bytes: Option<usize>,
    /// Most instances (or aggregation buckets) of one attribute in a temporal
    /// answer; a longer one is cut, as a 206 with `Content-Range`.
    pub temporal_page_instances: usize,
    /// Where remote `@context` documents and notification endpoints may be;
    /// the default refuses internal addresses (loopback, private ranges).
    /// Context sources are forwarded to only where it allows.
    pub outbound: borough_access::outbound::OutboundPolicy,
    /// How long a context source may take when its registration sets no
    /// `management.timeout`.
    pub source_timeout: Duration,
    /// How long a failed context source is skipped when its registration
    /// sets no `management.cooldown`.
    pub source_cooldown: Duration,
    /// The only hosts (`host` or `host:port`, lower case) context sources may
    /// be registered at; empty: any host `outbound` allows.
    pub source_hosts: Vec<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_batch_body_bytes: 16 << 20,
            max_batch_entities: 10_000,
            context_fetch_timeout: Duration::from_secs(3),
            bench_static_bytes: None,
            temporal_page_instances: temporal::MAX_INSTANCES,
            outbound: Default::default(),
            source_timeout: Duration::from_secs(3),
            source_cooldown: Duration::from_secs(10),
            source_hosts: Vec::new(),
        }
    }
}

/// What every handler shares.
pub struct AppState {
    pub store: Arc<dyn EntityStore>,
    pub contexts: ContextResolver,
    pub config: ApiConfig,
    /// Tenants, keys and the audit log; `None` on a bare router (tests of
    /// the API alone), where there is no access control at all.
    pub access: Option<Arc<borough_access::Access>>,
    /// Other layers' data of a tenant, purged with it.
    pub tenant_data: Vec<Arc<dyn admin::TenantData>>,
    /// Context source registrations and subscriptions to them.
    pub sources: Arc<csource::Registry>,
    /// How distributed operations reach the sources.
    pub federation: federation::Federation,
    static_body: Option<Bytes>,
}

pub type SharedState = Arc<AppState>;

/// What the binary wires into the API besides the store.
#[derive(Default, Clone)]
pub struct Wiring {
    pub access: Option<Arc<borough_access::Access>>,
    pub tenant_data: Vec<Arc<dyn admin::TenantData>>,
    /// Where registrations are kept; without it (tests of the API alone)
    /// they live in memory only.
    pub records: Option<Arc<dyn borough_store::RecordStore>>,
}

/// Builds the full router: `/health` and the NGSI-LD API under `/ngsi-ld/v1`.
/// Fails if the store's hosted `@context` documents cannot be read.
pub fn router(store: Arc<dyn EntityStore>, config: ApiConfig) -> Result<Router, String> {
    router_with(store, config, Wiring::default())
}

/// `router`, with access control and the other layers' tenant data.
pub fn router_with(
    store: Arc<dyn EntityStore>,
    config: ApiConfig,
    wiring: Wiring,
) -> Result<Router, String> {
    let static_body = config.bench_static_bytes.map(|n| {
        let mut s = String::from("{\"id\":\"urn:ngsi-ld:Static:1\",\"type\":\"Static\",\"pad\":\"");
        while s.len() + 2 < n {
            s.push('x');
        }
        s.push_str("\"}");
        Bytes::from(s)
    });
    let federation = federation::Federation::new(
        &config.outbound,
        config.source_timeout,
        config.source_cooldown,
    )?;
    // Over a store that other nodes share, their registrations are followed.
    let followed = wiring.records.as_ref().and_then(|r| r.followed_records());
    let sources = Arc::new(csource::Registry::load(wiring.records)?);
    if let Some(changes) = followed {
        sources.follow(changes);
    }
    let state = Arc::new(AppState {
        store,
        contexts: ContextResolver::new(config.context_fetch_timeout, config.outbound.clone())?,
        sources,
        federation,
        config,
        access: wiring.access,
        tenant_data: wiring.tenant_data,
        static_body,
    });
    context_registry::load_hosted(&state)?;
    let ngsi = Router::new()
        .route(
            "/entities",
            post(entities::create)
                .get(query::query_entities)
                .delete(query::purge),
        )
        .route(
            "/entities/{id}",
            get(entities::retrieve)
                .delete(entities::delete)
                .put(entities::replace)
                .patch(entities::merge),
        )
        .route(
            "/entities/{id}/attrs",
            post(entities::append).patch(entities::update),
        )
        .route(
            "/entities/{id}/attrs/{attr}",
            axum::routing::patch(entities::patch_attr)
                .put(entities::replace_attr)
                .delete(entities::delete_attr),
        )
        .route("/entityOperations/create", post(batch::create))
        .route("/entityOperations/upsert", post(batch::upsert))
        .route("/entityOperations/update", post(batch::update))
        .route("/entityOperations/delete", post(batch::delete))
        .route("/entityOperations/merge", post(batch::merge))
        .route("/entityOperations/query", post(query::query_post))
        .route("/types", get(discovery::types))
        .route("/types/{type}", get(discovery::type_info))
        .route("/attributes", get(discovery::attributes))
        .route("/attributes/{attr}", get(discovery::attribute_info))
        .route(
            "/subscriptions",
            get(subscriptions::list).post(subscriptions::create),
        )
        .route(
            "/subscriptions/{id}",
            get(subscriptions::retrieve)
                .patch(subscriptions::update)
                .delete(subscriptions::delete),
        )
        .route(
            "/subscriptions/{id}/deadLetters",
            get(subscriptions::dead_letters),
        )
        .route(
            "/temporal/entities",
            get(temporal::query_get).post(temporal::create),
        )
        .route(
            "/temporal/entities/{id}",
            get(temporal::retrieve).delete(temporal::delete),
        )
        .route("/temporal/entities/{id}/attrs", post(temporal::append))
        .route(
            "/temporal/entities/{id}/attrs/{attr}",
            axum::routing::delete(temporal::delete_attr),
        )
        .route(
            "/temporal/entities/{id}/attrs/{attr}/{instance}",
            axum::routing::patch(temporal::modify_instance).delete(temporal::delete_instance),
        )
        .route(
            "/temporal/entityOperations/query",
            post(temporal::query_post),
        )
        .route(
            "/csourceRegistrations",
            get(csource::list).post(csource::create),
        )
        .route(
            "/csourceRegistrations/{id}",
            get(csource::retrieve)
                .patch(csource::update)
                .delete(csource::delete),
        )
        .route(
            "/csourceSubscriptions",
            get(csource::subscriptions).post(csource::subscribe),
        )
        .route(
            "/csourceSubscriptions/{id}",
            get(csource::subscription)
                .patch(csource::update_subscription)
                .delete(csource::delete_subscription),
        )
        .route("/info/sourceIdentity", get(federation::source_identity))
        .route(
            "/jsonldContexts",
            get(context_registry::list).post(context_registry::add),
        )
        .route(
            "/jsonldContexts/{id}",
            get(context_registry::serve).delete(context_registry::delete),
        )
        .route_layer(axum::middleware::from_fn(params::reject_unknown));
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics::metrics))
        .route("/bench/static", get(static_body_route))
        .route(
            "/api/v1/history/retention",
            get(temporal::get_retention).put(temporal::put_retention),
        )
        .route("/api/v1/history/import", post(import::import))
        .nest("/ngsi-ld/v1", ngsi);
    Ok(admin::routes(app)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state))
}

/// Wraps the whole application so that a path with a trailing slash is the
/// same resource as without: the FIWARE clients address collections as
/// `/ngsi-ld/v1/entities/`. The rewrite happens before routing, so it holds
/// for every route merged into `app`.
pub fn with_normalized_paths(app: Router) -> Router {
    Router::new()
        .fallback_service(tower::ServiceExt::map_request(app, trim_trailing_slash))
        .layer(axum::middleware::from_fn(problem_media_type))
}

/// Errors are problem details (RFC 9457) under `application/json`, the media
/// type the NGSI-LD API names for them and the one FIWARE clients (ngsijs)
/// accept; a client that asks for `application/problem+json` gets that.
async fn problem_media_type(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let wants_problem = request
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/problem+json"));
    let mut response = next.run(request).await;
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/problem+json");
    if is_problem && !wants_problem {
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    response
}

fn trim_trailing_slash(mut req: axum::extract::Request) -> axum::extract::Request {
    let uri = req.uri();
    let path = uri.path();
    if path.len() > 1 && path.ends_with('/') {
        let trimmed = path.trim_end_matches('/');
        let trimmed = if trimmed.is_empty() { "/" } else { trimmed };
        let rebuilt = match uri.query() {
            Some(q) => format!("{trimmed}?{q}"),
            None => trimmed.to_string(),
        };
        if let Ok(pq) = rebuilt.parse::<axum::http::uri::PathAndQuery>() {
            let mut parts = uri.clone().into_parts();
            parts.path_and_query = Some(pq);
            if let Ok(new_uri) = axum::http::Uri::from_parts(parts) {
                *req.uri_mut() = new_uri;
            }
        }
    }
    req
}

/// Liveness with the write path's state: 503 while writes cannot commit
/// (storage failing or writer stopped), so that a balancer or an operator sees it.
async fn health(axum::extract::State(state): axum::extract::State<SharedState>) -> Response {
    let store = state.store.health();
    let (status, word) = if store.is_ok() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    let body = json!({
        "status": word,
        "writer": store,
        "tenants": state.store.tenants().len(),
    });
    json_response(status, &body)
}

/// Runs a store call that reads or writes its file on the blocking pool, so
/// that a slow disk never stalls the async workers serving other requests.
pub(crate) async fn off_executor<T: Send + 'static>(
    state: &SharedState,
    call: impl FnOnce(&dyn EntityStore) -> Result<T, borough_store::StoreError> + Send + 'static,
) -> problem::ApiResult<T> {
    let store = state.store.clone();
    let joined = tokio::task::spawn_blocking(move || call(store.as_ref())).await;
    match joined {
        Ok(result) => Ok(result?),
        Err(e) => Err(NgsiError::internal(format!("a store call failed: {e}")).into()),
    }
}

async fn static_body_route(
    axum::extract::State(state): axum::extract::State<SharedState>,
) -> Response {
    match &state.static_body {
        Some(b) => {
            let mut r = (StatusCode::OK, b.clone()).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        None => not_found().await,
    }
}

async fn not_found() -> Response {
    ApiError(NgsiError::new(
        ProblemKind::ResourceNotFound,
        "no such resource: see /ngsi-ld/v1/entities",
    ))
    .into_response()
}

async fn method_not_allowed() -> Response {
    ApiError(NgsiError::new(
        ProblemKind::MethodNotAllowed,
        "this method is not allowed on this resource",
    ))
    .into_response()
}

/// A JSON response with the given media type.
pub fn typed_json_response(
    status: StatusCode,
    body: &serde_json::Value,
    media_type: &'static str,
) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => {
            let mut r = (status, bytes).into_response();
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(media_type));
            r
        }
        Err(e) => ApiError(NgsiError::internal(format!(
            "cannot serialize the response: {e}"
        )))
        .into_response(),
    }
}

pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    typed_json_response(status, body, "application/json")
}
