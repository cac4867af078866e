//! Distributed operations (clause 4.3.6): requests forwarded to the context
//! sources a registration names, and their answers merged with local data.
//!
//! Every forwarded request is bounded by the registration's timeout (or the
//! broker's), goes only where the outbound policy allows, carries a `Via`
//! header naming this broker (a request that already passed here is answered
//! locally: no loops), and a source that fails is skipped for its cooldown.
//! Failures never fail the whole answer: they are reported beside it.

use crate::AppState;
use crate::contexts::{ActiveContext, ContextSource};
use crate::request::{TENANT_HEADER, encode_path_segment};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use borough_core::Entity;
use borough_core::registration::{CompiledRegistration, Mode, Supplied};
use bytes::Bytes;
use futures_util::future::join_all;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Largest answer read from a source.
const MAX_ANSWER_BYTES: usize = 16 << 20;
/// Most sources asked for one request.
pub const MAX_SOURCES: usize = 64;
/// Headers of the client's that are never passed on to a source.
const SECRET_HEADERS: [&str; 4] = [
    "authorization",
    "cookie",
    "proxy-authorization",
    "x-auth-token",
];
/// Longest a source may take, whatever its registration asks.
const MAX_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest text of a source's taken into a warning or a problem.
const MAX_DETAIL: usize = 256;

/// The HTTP client and identity this broker forwards with.
pub struct Federation {
    client: reqwest::Client,
    /// This broker's name in `Via` headers (its `contextSourceAlias`).
    node: String,
    /// When it started (microseconds), for its uptime.
    started: i64,
    /// A source's timeout when its registration gives none.
    pub timeout: Duration,
    /// How long a failed source is skipped when its registration gives no cooldown.
    pub cooldown: Duration,
}

impl Federation {
    pub fn new(
        outbound: &borough_access::outbound::OutboundPolicy,
        timeout: Duration,
        cooldown: Duration,
    ) -> Result<Self, String> {
        let client = outbound
            .guard(reqwest::Client::builder().connect_timeout(timeout), 0)
            .build()
            .map_err(|e| format!("cannot set up the federation HTTP client: {e}"))?;
        let started = borough_core::validate::now_micros();
        let node = format!(
            "borough-{:08x}",
            (started as u64 ^ std::process::id() as u64) & 0xffff_ffff
        );
        Ok(Self {
            client,
            node,
            started,
            timeout,
            cooldown,
        })
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Whether a request has already passed through this broker.
    pub fn is_loop(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(header::VIA)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|hop| hop.split_whitespace().nth(1) == Some(self.node.as_str()))
    }

    fn via(&self, headers: &HeaderMap) -> String {
        let mut hops: Vec<&str> = headers
            .get_all(header::VIA)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let own = format!("1.1 {}", self.node);
        hops.push(&own);
        hops.join(", ")
    }
}

/// `GET /info/sourceIdentity` (clause 5.15): who this broker is to other
/// brokers, the alias its `Via` entries carry included.
pub async fn source_identity(
    axum::extract::State(state): axum::extract::State<crate::SharedState>,
) -> axum::response::Response {
    let fed = &state.federation;
    let now = borough_core::validate::now_micros();
    let uptime_secs = (now - fed.started).max(0) / 1_000_000;
    let body = json!({
        "id": format!("urn:ngsi-ld:ContextSourceIdentity:{}", fed.node),
        "type": "ContextSourceIdentity",
        "contextSourceExtras": {"name": "Borough", "version": env!("CARGO_PKG_VERSION")},
        "contextSourceUptime": format!("PT{uptime_secs}S"),
        "contextSourceTimeAt": borough_core::validate::format_datetime(now),
        "contextSourceAlias": fed.node,
    });
    crate::json_response(axum::http::StatusCode::OK, &body)
}

/// Where a request is answered from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Here only: no registrations, or `local=true`.
    Local,
    /// The request has already passed through this broker: forwarding it
    /// again would loop.
    Loop,
    /// Here and at the sources registered for it.
    Forward,
}

/// How a request is routed: `local=true` and a tenant without registrations
/// stay here; one that already passed through here is a loop.
pub fn route(
    state: &AppState,
    tenant: &str,
    headers: &HeaderMap,
    params: &std::collections::HashMap<String, String>,
) -> Route {
    if params.get("local").is_some_and(|l| l == "true") || !state.sources.has_any(tenant) {
        Route::Local
    } else if state.federation.is_loop(headers) {
        Route::Loop
    } else {
        Route::Forward
    }
}

/// A source that did not answer as it should.
#[derive(Clone, Debug)]
pub struct SourceFailure {
    pub registration: String,
    pub endpoint: String,
    pub detail: String,
    /// The warning code that reports it (clause 6.3.17): 199 no answer in
    /// time (or cooling down), 111 an answer that is not NGSI-LD, 299 an
    /// error answer.
    pub warning: u16,
}

impl SourceFailure {
    /// The member of an answer that reports it.
    pub fn to_json(&self) -> Value {
        json!({
            "registrationId": self.registration,
            "endpoint": self.endpoint,
            "error": self.detail,
        })
    }
}

/// Adds the sources that failed to an answer: an `NGSILD-Warning` header
/// per source (clause 6.3.17: code 199, the registration and what went
/// wrong), so that a client sees a partial answer as partial.
pub fn warn(
    mut resp: axum::response::Response,
    failures: &[SourceFailure],
) -> axum::response::Response {
    for f in failures {
        // A header value is visible ASCII: anything else is replaced, so
        // that no warning is ever dropped.
        let detail: String = f
            .detail
            .chars()
            .take(MAX_DETAIL)
            .map(|c| {
                if (c.is_ascii_graphic() && c != '"' && c != '\\') || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        let registration: String = f
            .registration
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '?' })
            .collect();
        let text = format!("{} {registration} \"{detail}\"", f.warning);
        if let Ok(v) = HeaderValue::from_str(&text) {
            resp.headers_mut().append("ngsild-warning", v);
        }
    }
    resp
}

/// One forwarded request, and who it went to.
pub struct Forward<'a> {
    pub state: &'a AppState,
    /// The tenant of the incoming request.
    pub tenant: &'a str,
    pub headers: &'a HeaderMap,
    pub actx: &'a ActiveContext,
}

/// A source's answer.
pub struct Answer {
    pub status: reqwest::StatusCode,
    pub body: Bytes,
    /// `NGSILD-Results-Count`, when the source gave one.
    pub count: Option<usize>,
}

fn base_url(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    if trimmed.ends_with("/ngsi-ld/v1") {
        trimmed.to_string()
    } else {
        format!("{trimmed}/ngsi-ld/v1")
    }
}

impl Forward<'_> {
    /// Sends one request to a registration's source, within its timeout.
    /// A transport error, a timeout or a 5xx counts as a failure and starts
    /// the source's cooldown; other answers are the source's to give.
    pub async fn send(
        &self,
        reg: &CompiledRegistration,
        method: Method,
        path_and_query: &str,
        body: Option<Value>,
    ) -> Result<Answer, SourceFailure> {
        let fail = |(warning, detail): (u16, String)| SourceFailure {
            registration: reg.id().to_string(),
            endpoint: reg.endpoint.clone(),
            detail,
            warning,
        };
        let fed = &self.state.federation;
        if self.state.sources.cooling(self.tenant, reg.id()) {
            return Err(fail((
                199,
                "the source failed recently and is cooling down".into(),
            )));
        }
        let url = format!("{}{path_and_query}", base_url(&reg.endpoint));
        if !crate::csource::source_host_allowed(self.state, &reg.endpoint) {
            return Err(fail((
                299,
                "the source's host is not on this broker's list of source hosts".into(),
            )));
        }
        if let Err(e) = self.state.config.outbound.check_url_literal(&url) {
            return Err(fail((299, e.to_string())));
        }
        // A registration may ask for less time than the broker's default, or
        // more up to MAX_TIMEOUT: a registrant cannot hold requests longer.
        let timeout = reg
            .timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(fed.timeout)
            .min(MAX_TIMEOUT);
        let mut request = fed
            .client
            .request(method, &url)
            .timeout(timeout)
            .header(header::ACCEPT, "application/json")
            .header(header::VIA, fed.via(self.headers));
        let tenant = reg.tenant.as_deref().unwrap_or(self.tenant);
        if !tenant.is_empty() {
            request = request.header(TENANT_HEADER, tenant);
        }
        for (k, v) in &reg.context_source_info {
            // Special keys (clause 4.3.6.6) and what the connection itself
            // carries are not headers a registration may set.
            if matches!(
                k.to_ascii_lowercase().as_str(),
                "jsonldcontext"
                    | "accept"
                    | "contenttype"
                    | "ngsildconformance"
                    | "host"
                    | "content-length"
                    | "content-type"
                    | "connection"
                    | "transfer-encoding"
                    | "via"
                    | "ngsild-tenant"
            ) {
                continue;
            }
            let Ok(name) = HeaderName::try_from(k.as_str()) else {
                continue;
            };
            // `urn:ngsi-ld:request`: the value the triggering request carried,
            // if any; never a credential of the client's, which would hand it
            // to whoever registered the source.
            let value = if v == "urn:ngsi-ld:request" {
                if SECRET_HEADERS.contains(&name.as_str()) {
                    continue;
                }
                self.headers.get(&name).cloned()
            } else {
                HeaderValue::from_str(v).ok()
            };
            if let Some(value) = value {
                request = request.header(name, value);
            }
        }
        // A registration that names the context its source reads gets
        // names in it (clause 4.3.6.6); otherwise the client's context goes on.
        let inline_context = match (reg.jsonld_context(), &self.actx.source) {
            (Some(url), _) => {
                request = request.header(header::LINK, link(url));
                None
            }
            (None, ContextSource::Url(url)) => {
                request = request.header(header::LINK, link(url));
                None
            }
            (None, ContextSource::Core) => None,
            (None, ContextSource::Inline(v)) => Some(v.clone()),
        };
        if let Some(mut body) = body {
            match (inline_context, &mut body) {
                (Some(ctx), Value::Object(m)) => {
                    m.insert("@context".into(), ctx);
                    request = request.header(header::CONTENT_TYPE, "application/ld+json");
                }
                (Some(ctx), Value::Array(items)) => {
                    for item in items.iter_mut() {
                        if let Value::Object(m) = item {
                            m.insert("@context".into(), ctx.clone());
                        }
                    }
                    request = request.header(header::CONTENT_TYPE, "application/ld+json");
                }
                _ => request = request.header(header::CONTENT_TYPE, "application/json"),
            }
            request = request.body(body.to_string());
        }
        let cooldown = reg
            .cooldown_ms
            .map(Duration::from_millis)
            .unwrap_or(fed.cooldown);
        let outcome = async {
            let mut resp = request.send().await.map_err(|e| (199, describe(&e)))?;
            let status = resp.status();
            let count = resp
                .headers()
                .get("ngsild-results-count")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| (199, describe(&e)))? {
                if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                    return Err((
                        111,
                        format!("the answer is larger than {MAX_ANSWER_BYTES} bytes"),
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            if status.is_server_error() {
                return Err((299, format!("the source answered {status}")));
            }
            Ok(Answer {
                status,
                body: Bytes::from(body),
                count,
            })
        }
        .await;
        self.state.sources.record_outcome(
            self.tenant,
            reg.id(),
            outcome.as_ref().err().map(|(_, e)| e.clone()),
            cooldown,
        );
        outcome.map_err(fail)
    }

    /// The context names are exchanged with a source in.
    pub fn names<'r>(&'r self, reg: &'r CompiledRegistration) -> &'r borough_core::Context {
        if reg.jsonld_context().is_some() {
            &reg.ctx
        } else {
            &self.actx.ctx
        }
    }

    /// Records that a source answered with an error status (warning 299).
    /// No cooldown: a 4xx may be about this request, not about the source.
    fn refused(&self, reg: &CompiledRegistration, answer: &Answer) -> SourceFailure {
        let mut detail = format!("the source answered {}", answer.status);
        if let Some(why) = problem_detail(&answer.body) {
            detail = format!("{detail}: {why}");
        }
        self.state
            .sources
            .mark_failed(self.tenant, reg.id(), detail.clone(), None);
        SourceFailure {
            registration: reg.id().to_string(),
            endpoint: reg.endpoint.clone(),
            detail,
            warning: 299,
        }
    }

    /// Records that a source answered garbage: a failure like any other.
    fn garbage(&self, reg: &CompiledRegistration, what: &str) -> SourceFailure {
        let detail = format!("the source's answer is not {what}");
        let cooldown = reg
            .cooldown_ms
            .map(Duration::from_millis)
            .unwrap_or(self.state.federation.cooldown);
        self.state
            .sources
            .mark_failed(self.tenant, reg.id(), detail.clone(), Some(cooldown));
        SourceFailure {
            registration: reg.id().to_string(),
            endpoint: reg.endpoint.clone(),
            detail,
            warning: 111,
        }
    }

    /// Parses an entity a source answered, in the request's context.
    fn entity(&self, reg: &CompiledRegistration, v: &Value) -> Result<Entity, SourceFailure> {
        let mut v = v.clone();
        if let Value::Object(m) = &mut v {
            for k in ["@context", "createdAt", "modifiedAt", "deletedAt"] {
                m.remove(k);
            }
        }
        borough_core::entity::parse_entity(&v, self.names(reg), 0)
            .map_err(|e| self.garbage(reg, &format!("an NGSI-LD entity ({})", e.detail)))
    }
}

/// The `detail` of a problem a source answered, cut to a readable length.
fn problem_detail(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let d = v
        .get("detail")
        .or_else(|| v.get("description"))
        .and_then(Value::as_str)?;
    Some(d.chars().take(MAX_DETAIL).collect())
}

fn link(url: &str) -> String {
    format!(
        "<{url}>; rel=\"{}\"; type=\"application/ld+json\"",
        crate::request::JSONLD_CONTEXT_REL
    )
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "the source did not answer within its timeout".into();
    }
    if let Some(refused) = borough_access::outbound::OutboundError::find(e) {
        return refused.to_string();
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// What one registration's source supplied of an entity.
pub struct Contribution {
    pub registration: Arc<CompiledRegistration>,
    pub supplied: Supplied,
    pub entity: Entity,
}

/// The attribute list of a forwarded request: the supplied names, compacted.
fn attrs_param(ctx: &borough_core::Context, supplied: &Supplied) -> Option<String> {
    match supplied {
        Supplied::All => None,
        Supplied::Only(names) => Some(
            names
                .iter()
                .map(|n| {
                    percent_encoding::utf8_percent_encode(&ctx.compact(n), QUERY_VALUE).to_string()
                })
                .collect::<Vec<_>>()
                .join(","),
        ),
    }
}

/// Characters escaped in a query parameter's value.
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b':');

/// Retrieves one entity from every source registered for it (clause
/// 4.3.6.3, retrieveEntity), concurrently.
pub async fn retrieve(
    fwd: &Forward<'_>,
    id: &str,
    local: Option<&Entity>,
    wanted: Option<&[String]>,
) -> Retrieved {
    let types = local.map(|e| e.types.as_slice());
    let regs =
        crate::csource::for_entity(fwd.state, fwd.tenant, "retrieveEntity", id, types, wanted);
    let claimed: Vec<Supplied> = regs
        .iter()
        .filter(|(r, _)| matches!(r.mode, Mode::Exclusive | Mode::Redirect))
        .map(|(_, s)| s.clone())
        .collect();
    let asks = regs
        .into_iter()
        .take(MAX_SOURCES)
        .map(|(reg, supplied)| async move {
            let mut path = format!("/entities/{}", encode_path_segment(id));
            let mut params = Vec::new();
            if let Some(attrs) = attrs_param(fwd.names(&reg), &supplied) {
                params.push(format!("attrs={attrs}"));
            }
            if reg.local_only {
                params.push("local=true".into());
            }
            if !params.is_empty() {
                path = format!("{path}?{}", params.join("&"));
            }
            let answer = fwd.send(&reg, Method::GET, &path, None).await?;
            if answer.status == reqwest::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !answer.status.is_success() {
                return Err(fwd.refused(&reg, &answer));
            }
            let v: Value =
                serde_json::from_slice(&answer.body).map_err(|_| fwd.garbage(&reg, "JSON"))?;
            let entity = fwd.entity(&reg, &v)?;
            if entity.id != id {
                return Err(fwd.garbage(&reg, "the entity asked for"));
            }
            Ok(Some(Contribution {
                registration: reg,
                supplied,
                entity,
            }))
        });
    let (found, failed) = split(join_all(asks).await);
    Retrieved {
        found,
        failed,
        claimed,
    }
}

/// What the sources of one entity answered.
pub struct Retrieved {
    pub found: Vec<Contribution>,
    pub failed: Vec<SourceFailure>,
    /// What exclusive and redirect sources hold of the entity.
    pub claimed: Vec<Supplied>,
}

/// The local entity without what exclusive and redirect sources hold.
pub fn without_claimed(local: Arc<Entity>, claimed: &[Supplied]) -> Arc<Entity> {
    if !local
        .attrs
        .keys()
        .any(|n| claimed.iter().any(|c| c.contains(n)))
    {
        return local;
    }
    let mut e = (*local).clone();
    e.attrs
        .retain(|n, _| !claimed.iter().any(|c| c.contains(n)));
    Arc::new(e)
}

fn split(
    results: Vec<Result<Option<Contribution>, SourceFailure>>,
) -> (Vec<Contribution>, Vec<SourceFailure>) {
    let mut found = Vec::new();
    let mut failed = Vec::new();
    for r in results {
        match r {
            Ok(Some(c)) => found.push(c),
            Ok(None) => {}
            Err(f) => failed.push(f),
        }
    }
    (found, failed)
}

/// Queries every source registered for a query (queryEntity), asking each
/// for at most `limit` entities; `query_string` is the client's, without
/// paging. The answers are grouped by entity id.
pub async fn query(
    fwd: &Forward<'_>,
    query: &borough_core::query::EntityQuery,
    wanted: Option<&[String]>,
    request: QueryRequest<'_>,
    limit: usize,
    count: bool,
) -> Remote {
    // A source answers at most a page of the broker's largest size, and
    // counts only when the client asked for a count.
    let limit = limit.min(crate::query::MAX_LIMIT);
    let count = if count { "&count=true" } else { "" };
    let regs: Vec<_> = fwd
        .state
        .sources
        .of_tenant(fwd.tenant)
        .into_iter()
        .filter(|r| r.allows("queryEntity") && !r.is_temporal_only())
        .filter_map(|r| {
            let s = query_supplied(&r, query, wanted)?;
            Some((r, s))
        })
        .take(MAX_SOURCES)
        .collect();
    let request = &request;
    let asks = regs.into_iter().map(|(reg, supplied)| async move {
        let local = if reg.local_only { "&local=true" } else { "" };
        let answer = match request {
            QueryRequest::Get(qs) => {
                let path = format!(
                    "/entities?{qs}{}limit={limit}{count}{local}",
                    if qs.is_empty() { "" } else { "&" }
                );
                fwd.send(&reg, Method::GET, &path, None).await?
            }
            QueryRequest::Post(body) => {
                let path = format!("/entityOperations/query?limit={limit}{count}{local}");
                fwd.send(
                    &reg,
                    Method::POST,
                    &path,
                    Some(Value::Object((*body).clone())),
                )
                .await?
            }
        };
        if !answer.status.is_success() {
            return Err(fwd.refused(&reg, &answer));
        }
        let v: Value =
            serde_json::from_slice(&answer.body).map_err(|_| fwd.garbage(&reg, "JSON"))?;
        let list = v
            .as_array()
            .ok_or_else(|| fwd.garbage(&reg, "an array of entities"))?;
        let mut out = Vec::with_capacity(list.len().min(limit));
        for item in list.iter().take(limit) {
            out.push(Contribution {
                registration: reg.clone(),
                supplied: supplied.clone(),
                entity: fwd.entity(&reg, item)?,
            });
        }
        Ok((out, answer.count.unwrap_or(list.len())))
    });
    let mut remote = Remote::default();
    for r in join_all(asks).await {
        match r {
            Ok((list, count)) => {
                remote.found.extend(list);
                remote.counted += count;
            }
            Err(f) => remote.failed.push(f),
        }
    }
    remote
}

/// Pages of a merged query end at the largest page a source answers: a
/// page reaching past `reach` entities is answered here alone, and says so.
pub fn too_deep(state: &AppState, reach: usize) -> Option<SourceFailure> {
    (reach > crate::query::MAX_LIMIT).then(|| SourceFailure {
        registration: state.federation.node.clone(),
        endpoint: String::new(),
        detail: format!(
            "context sources are asked for the first {} entities only: this page is answered from this broker alone",
            crate::query::MAX_LIMIT
        ),
        warning: 199,
    })
}

/// What the sources of a query answered.
#[derive(Default)]
pub struct Remote {
    pub found: Vec<Contribution>,
    pub failed: Vec<SourceFailure>,
    /// The matches the sources counted, together.
    pub counted: usize,
}

/// What a registration supplies to a query: for a body's selectors, to any
/// one of them.
fn query_supplied(
    reg: &CompiledRegistration,
    query: &borough_core::query::EntityQuery,
    wanted: Option<&[String]>,
) -> Option<Supplied> {
    if query.selectors.is_empty() {
        return reg.supplies_query(query.types.as_ref(), &query.ids, wanted);
    }
    query.selectors.iter().find_map(|s| {
        let ids: Vec<String> = s.id.iter().cloned().collect();
        reg.supplies_query(s.types.as_ref().or(query.types.as_ref()), &ids, wanted)
    })
}

/// How the client asked its query, to ask the sources the same way.
pub enum QueryRequest<'a> {
    /// `GET /entities`: the query string without paging and `local`.
    Get(String),
    /// `POST /entityOperations/query`: the body without `@context`.
    Post(&'a Map<String, Value>),
}

/// The client's query string without the members this broker sets itself.
/// Entity reads drop the representation too: sources answer normalized,
/// whole entities, and the merged result is represented as asked. Temporal
/// reads keep it, as their answers are merged as they come.
pub fn forwarded_query_string(raw: Option<&str>, keep_representation: bool) -> String {
    raw.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| {
            let key = p.split_once('=').map_or(*p, |(k, _)| k);
            let paging = matches!(
                key,
                "limit" | "offset" | "count" | "local" | "join" | "joinLevel"
            );
            let representation = matches!(
                key,
                "pick" | "omit" | "format" | "options" | "lang" | "geometryProperty"
            );
            !paging && (keep_representation || !representation)
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Merges what sources supplied into the local entity (clause 4.3.6.2):
/// exclusive and redirect sources replace the attributes they hold,
/// inclusive ones add theirs (the most recent observation wins where both
/// hold an instance of one dataset), auxiliary ones fill in only what no one
/// else has. `None` when neither the broker nor any source has the entity.
pub fn merge(local: Option<&Entity>, mut contributions: Vec<Contribution>) -> Option<Entity> {
    contributions.sort_by_key(|c| crate::csource::mode_rank(c.registration.mode));
    let mut merged = match (local, contributions.first()) {
        (Some(l), _) => l.clone(),
        (None, Some(c)) => Entity {
            id: c.entity.id.clone(),
            types: Vec::new(),
            scopes: Vec::new(),
            attrs: Default::default(),
            created_at: c.entity.created_at,
            modified_at: c.entity.modified_at,
        },
        (None, None) => return None,
    };
    // What exclusive sources hold is theirs alone, present in their answer or not.
    for c in &contributions {
        if matches!(c.registration.mode, Mode::Exclusive | Mode::Redirect)
            && let Supplied::Only(names) = &c.supplied
        {
            merged.attrs.retain(|k, _| !names.contains(k));
        }
    }
    for c in contributions {
        for t in &c.entity.types {
            if !merged.types.contains(t) {
                merged.types.push(t.clone());
            }
        }
        for s in &c.entity.scopes {
            if !merged.scopes.contains(s) {
                merged.scopes.push(s.clone());
            }
        }
        for (name, instances) in c.entity.attrs {
            if !c.supplied.contains(&name) {
                continue;
            }
            match c.registration.mode {
                Mode::Exclusive | Mode::Redirect => {
                    merged.attrs.insert(name, instances);
                }
                Mode::Inclusive => match merged.attrs.get_mut(&name) {
                    None => {
                        merged.attrs.insert(name, instances);
                    }
                    Some(held) => {
                        for inst in instances {
                            match held.iter_mut().find(|h| h.dataset_id == inst.dataset_id) {
                                Some(h) => {
                                    if inst.observed_at > h.observed_at {
                                        *h = inst;
                                    }
                                }
                                None => held.push(inst),
                            }
                        }
                    }
                },
                // Sorted last: what anyone else supplied is already here.
                Mode::Auxiliary => {
                    if !merged.attrs.contains_key(&name) {
                        merged.attrs.insert(name, instances);
                    }
                }
            }
        }
    }
    Some(merged)
}

/// Sends a change to one source and reads its answer as success or failure.
pub async fn change(
    fwd: &Forward<'_>,
    reg: &CompiledRegistration,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(), SourceFailure> {
    let answer = fwd.send(reg, method, path, body).await?;
    if answer.status.is_success() {
        if answer.status == reqwest::StatusCode::MULTI_STATUS {
            return Err(SourceFailure {
                registration: reg.id().to_string(),
                endpoint: reg.endpoint.clone(),
                detail: format!(
                    "the source updated only part: {}",
                    String::from_utf8_lossy(&answer.body)
                        .chars()
                        .take(MAX_DETAIL)
                        .collect::<String>()
                ),
                warning: 299,
            });
        }
        return Ok(());
    }
    let detail = problem_detail(&answer.body).unwrap_or_default();
    Err(SourceFailure {
        registration: reg.id().to_string(),
        endpoint: reg.endpoint.clone(),
        detail: format!("the source answered {} {detail}", answer.status)
            .trim_end()
            .to_string(),
        warning: 299,
    })
}

/// Asks the sources registered for an entity's history (retrieveTemporal)
/// with the client's own parameters; answers their temporal entities.
pub async fn retrieve_temporal(
    fwd: &Forward<'_>,
    id: &str,
    types: Option<&[String]>,
    query_string: &str,
) -> (Vec<Value>, Vec<SourceFailure>) {
    let regs =
        crate::csource::for_entity(fwd.state, fwd.tenant, "retrieveTemporal", id, types, None);
    let path = format!(
        "/temporal/entities/{}{}{query_string}",
        encode_path_segment(id),
        if query_string.is_empty() { "" } else { "?" }
    );
    let asks = regs.into_iter().take(MAX_SOURCES).map(|(reg, _)| {
        let path = path.clone();
        async move {
            let answer = fwd.send(&reg, Method::GET, &path, None).await?;
            if answer.status == reqwest::StatusCode::NOT_FOUND {
                return Ok(Vec::new());
            }
            temporal_answer(fwd, &reg, &answer)
        }
    });
    gather(join_all(asks).await)
}

/// Asks the sources registered for a temporal query (queryTemporal) as the
/// client asked (`request`), for at most `limit` entities each; answers
/// their temporal entities.
/// A POST query's URL options (`url_options`: representation, lastN, …)
/// go along with it: the answers are merged as they come.
pub async fn query_temporal(
    fwd: &Forward<'_>,
    query: &borough_core::query::EntityQuery,
    request: QueryRequest<'_>,
    url_options: Option<&str>,
    limit: usize,
) -> (Vec<Value>, Vec<SourceFailure>) {
    let options = forwarded_query_string(url_options, true);
    let options = if options.is_empty() {
        options
    } else {
        format!("{options}&")
    };
    let options = &options;
    let limit = limit.min(crate::query::MAX_LIMIT);
    let regs: Vec<_> = fwd
        .state
        .sources
        .of_tenant(fwd.tenant)
        .into_iter()
        .filter(|r| r.allows("queryTemporal") && r.is_temporal_only())
        .filter(|r| query_supplied(r, query, None).is_some())
        .take(MAX_SOURCES)
        .collect();
    let request = &request;
    let asks = regs.into_iter().map(|reg| async move {
        let answer = match request {
            QueryRequest::Get(qs) => {
                let sep = if qs.is_empty() { "" } else { "&" };
                let path = format!("/temporal/entities?{qs}{sep}limit={limit}");
                fwd.send(&reg, Method::GET, &path, None).await?
            }
            QueryRequest::Post(body) => {
                let path = format!("/temporal/entityOperations/query?{options}limit={limit}");
                let body = Some(Value::Object((*body).clone()));
                fwd.send(&reg, Method::POST, &path, body).await?
            }
        };
        temporal_answer(fwd, &reg, &answer)
    });
    gather(join_all(asks).await)
}

/// Whether an entity a source answered (compact JSON) is of a type the
/// caller may read (keys limited to some entity types).
pub fn caller_may_read(entity: &Map<String, Value>, actx: &ActiveContext) -> bool {
    let Some(allowed) = crate::auth::caller_entity_types() else {
        return true;
    };
    as_list(entity.get("type").cloned().unwrap_or(Value::Null))
        .iter()
        .filter_map(Value::as_str)
        .any(|t| allowed.iter().any(|a| *a == *actx.ctx.expand(t)))
}

fn temporal_answer(
    fwd: &Forward<'_>,
    reg: &CompiledRegistration,
    answer: &Answer,
) -> Result<Vec<Value>, SourceFailure> {
    if !answer.status.is_success() {
        return Err(fwd.refused(reg, answer));
    }
    let v: Value = serde_json::from_slice(&answer.body).map_err(|_| fwd.garbage(reg, "JSON"))?;
    let list = match v {
        Value::Array(list) => list,
        one @ Value::Object(_) => vec![one],
        _ => return Err(fwd.garbage(reg, "a temporal representation")),
    };
    if list
        .iter()
        .any(|e| !e.get("id").is_some_and(Value::is_string))
    {
        return Err(fwd.garbage(reg, "temporal entities with ids"));
    }
    Ok(list)
}

fn gather(results: Vec<Result<Vec<Value>, SourceFailure>>) -> (Vec<Value>, Vec<SourceFailure>) {
    let mut found = Vec::new();
    let mut failed = Vec::new();
    for r in results {
        match r {
            Ok(list) => found.extend(list),
            Err(f) => failed.push(f),
        }
    }
    (found, failed)
}

/// Merges one temporal representation into another of the same entity, in
/// the same context and format: the instances of an attribute are united,
/// ordered by time, an instance known by its instanceId kept once.
pub fn merge_temporal(into: &mut Map<String, Value>, other: Map<String, Value>) {
    for (key, theirs) in other {
        if matches!(key.as_str(), "id" | "@context") {
            continue;
        }
        if key == "type" {
            let mut types = as_list(into.remove("type").unwrap_or(Value::Null));
            for t in as_list(theirs) {
                if !types.contains(&t) {
                    types.push(t);
                }
            }
            let value = if types.len() == 1 {
                types.remove(0)
            } else {
                Value::Array(types)
            };
            into.insert(key, value);
            continue;
        }
        let Some(ours) = into.remove(&key) else {
            into.insert(key, theirs);
            continue;
        };
        let merged = match (ours, theirs) {
            // Simplified (temporalValues): {"type", "values": [[value, time], …]}.
            (Value::Object(mut a), Value::Object(b)) if a.contains_key("values") => {
                let mut values = as_list(a.remove("values").unwrap_or(Value::Null));
                values.extend(as_list(b.get("values").cloned().unwrap_or(Value::Null)));
                values.sort_by_key(time_of_pair);
                values.dedup();
                a.insert("values".into(), Value::Array(values));
                Value::Object(a)
            }
            (a, b) => {
                let mut instances = as_list(a);
                let mut known: std::collections::HashSet<String> = instances
                    .iter()
                    .filter_map(|x| x.get("instanceId").and_then(Value::as_str))
                    .map(str::to_string)
                    .collect();
                for inst in as_list(b) {
                    let fresh = match inst.get("instanceId").and_then(Value::as_str) {
                        Some(i) => known.insert(i.to_string()),
                        None => true,
                    };
                    if fresh {
                        instances.push(inst);
                    }
                }
                instances.sort_by_key(time_of);
                Value::Array(instances)
            }
        };
        into.insert(key, merged);
    }
}

fn as_list(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        Value::Null => Vec::new(),
        other => vec![other],
    }
}

/// An instance's time, for ordering (ISO 8601 strings of one format sort as times).
fn time_of(instance: &Value) -> String {
    ["observedAt", "modifiedAt", "createdAt"]
        .iter()
        .find_map(|k| instance.get(*k).and_then(Value::as_str))
        .unwrap_or_default()
        .to_string()
}

fn time_of_pair(pair: &Value) -> String {
    pair.get(1)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}
