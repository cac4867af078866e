//! Resolving a request's `@context`: built-in core contexts, remote contexts
//! fetched with a short timeout and cached, and inline context objects. Each
//! distinct context is processed once into term maps and then shared.

use borough_access::outbound::{OutboundError, OutboundPolicy};
use borough_core::context::{CORE_CONTEXT_URL, MAX_CONTEXT_DOCUMENTS, builtin_context};
use borough_core::validate::now_micros;
use borough_core::{Context, NgsiError, NgsiResult, ProblemKind};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest remote context document accepted.
const MAX_CONTEXT_BYTES: usize = 1 << 20;
/// Processed contexts kept; beyond that the cache starts afresh.
const MAX_CACHED_CONTEXTS: usize = 1024;
/// Context documents kept in the registry at most (hosted and cached).
pub const MAX_REGISTRY_ENTRIES: usize = 1024;
/// How deep context documents may reference further documents.
const MAX_REFERENCE_DEPTH: usize = 8;

/// The registry key of a hosted context.
fn hosted_key(local_id: &str) -> String {
    format!("hosted:{local_id}")
}

/// Where a request's context came from, so a response can point back to it.
#[derive(Clone, Debug, PartialEq)]
pub enum ContextSource {
    /// No context given: the core context alone.
    Core,
    /// A `Link` header (or an `@context` that is one URL).
    Url(String),
    /// An inline `@context` value from a JSON-LD body.
    Inline(Value),
}

impl ContextSource {
    /// The URL to send in a response `Link` header.
    pub fn link_url(&self) -> &str {
        match self {
            Self::Url(u) => u,
            _ => CORE_CONTEXT_URL,
        }
    }

    /// The `@context` member of a JSON-LD response body.
    pub fn as_value(&self) -> Value {
        match self {
            Self::Core => Value::String(CORE_CONTEXT_URL.into()),
            Self::Url(u) => Value::String(u.clone()),
            Self::Inline(v) => v.clone(),
        }
    }
}

/// A processed context and where it came from.
#[derive(Clone, Debug)]
pub struct ActiveContext {
    pub ctx: Arc<Context>,
    pub source: ContextSource,
}

impl ActiveContext {
    pub fn core() -> Self {
        Self {
            ctx: Context::core(),
            source: ContextSource::Core,
        }
    }
}

/// How a context document came to the registry (clause 5.13.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextKind {
    /// Uploaded by a client and served by Borough.
    Hosted,
    /// Fetched from its URL (or built in) and kept.
    Cached,
}

impl ContextKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Hosted => "Hosted",
            Self::Cached => "Cached",
        }
    }
}

/// A context document the registry holds.
#[derive(Clone, Debug)]
pub struct ContextEntry {
    /// The URL; for hosted documents the path only (`/ngsi-ld/v1/jsonldContexts/{id}`).
    pub url: String,
    pub local_id: String,
    pub kind: ContextKind,
    pub doc: Arc<Value>,
    pub created_at: i64,
    pub last_usage: Option<i64>,
    pub hits: u64,
    /// Built into the binary: listed, served, never deleted.
    pub builtin: bool,
    /// The tenant that hosts the document (internal name); `None` for
    /// cached and built-in documents, which are not any tenant's.
    pub owner: Option<String>,
}

/// The path under which hosted contexts are served.
pub const HOSTED_PATH: &str = "/ngsi-ld/v1/jsonldContexts/";

/// Fetches, caches and processes contexts, and keeps the registry of
/// `/jsonldContexts`: hosted documents by local id, cached ones by URL.
pub struct ContextResolver {
    client: reqwest::Client,
    /// Which context servers may be fetched from (not internal ones).
    outbound: OutboundPolicy,
    /// Every document by URL (hosted ones by their serving URL's path suffix too).
    registry: Mutex<HashMap<String, ContextEntry>>,
    processed: Mutex<HashMap<String, Arc<Context>>>,
}

fn unavailable(url: &str, why: impl std::fmt::Display) -> NgsiError {
    NgsiError::new(
        ProblemKind::LdContextNotAvailable,
        format!("the @context '{url}' could not be retrieved: {why}"),
    )
}

impl ContextResolver {
    /// `timeout` bounds each remote fetch, so a dead context server costs a
    /// request that many seconds at most and never hangs it. Fetches go only
    /// where `outbound` allows. Fails if the HTTP client cannot be set up.
    pub fn new(timeout: Duration, outbound: OutboundPolicy) -> Result<Self, String> {
        let client = outbound
            .guard(
                reqwest::Client::builder()
                    .timeout(timeout)
                    .connect_timeout(timeout),
                3,
            )
            .build()
            .map_err(|e| format!("cannot set up the @context HTTP client: {e}"))?;
        let now = now_micros();
        let registry = borough_core::context::BUILTIN_CONTEXTS
            .iter()
            .enumerate()
            .filter_map(|(i, (url, doc))| {
                let doc: Value = serde_json::from_str(doc).ok()?;
                Some((
                    url.to_string(),
                    ContextEntry {
                        url: url.to_string(),
                        local_id: format!("core-{i}"),
                        kind: ContextKind::Cached,
                        doc: Arc::new(doc),
                        created_at: now,
                        last_usage: None,
                        hits: 0,
                        builtin: true,
                        owner: None,
                    },
                ))
            })
            .collect();
        Ok(Self {
            client,
            outbound,
            registry: Mutex::new(registry),
            processed: Mutex::new(HashMap::new()),
        })
    }

    fn lock_registry(&self) -> std::sync::MutexGuard<'_, HashMap<String, ContextEntry>> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every entry, hosted and cached, ordered by URL.
    pub fn entries(&self) -> Vec<ContextEntry> {
        let mut v: Vec<ContextEntry> = self.lock_registry().values().cloned().collect();
        v.sort_by(|a, b| a.url.cmp(&b.url));
        v
    }

    /// The entry addressed by a local id or a URL.
    pub fn entry(&self, id: &str) -> Option<ContextEntry> {
        let reg = self.lock_registry();
        reg.get(id)
            .or_else(|| reg.values().find(|e| e.local_id == id))
            .cloned()
    }

    /// Adds a hosted document of tenant `owner` under `local_id`; its URL is
    /// the serving path, which handlers complete with the host the client used.
    pub fn host(&self, local_id: &str, doc: Value, created_at: i64, owner: &str) {
        self.lock_registry().insert(
            hosted_key(local_id),
            ContextEntry {
                url: format!("{HOSTED_PATH}{local_id}"),
                local_id: local_id.to_string(),
                kind: ContextKind::Hosted,
                doc: Arc::new(doc),
                created_at,
                last_usage: None,
                hits: 0,
                builtin: false,
                owner: Some(owner.to_string()),
            },
        );
        self.forget_processed();
    }

    /// Removes an entry (not a built-in one); true if there was one.
    pub fn remove(&self, id: &str) -> bool {
        let mut reg = self.lock_registry();
        let key = reg
            .iter()
            .find(|(k, e)| (k.as_str() == id || e.local_id == id) && !e.builtin)
            .map(|(k, _)| k.clone());
        let removed = key.and_then(|k| reg.remove(&k)).is_some();
        drop(reg);
        if removed {
            self.forget_processed();
        }
        removed
    }

    /// Fetches a cached context again from its URL.
    pub async fn reload(&self, url: &str) -> NgsiResult<()> {
        let doc = self.fetch(url).await?;
        if let Some(e) = self.lock_registry().get_mut(url) {
            e.doc = Arc::new(doc);
        }
        self.forget_processed();
        Ok(())
    }

    fn forget_processed(&self) {
        self.lock_processed().clear();
    }

    fn touch(&self, url: &str) {
        if let Some(e) = self.lock_registry().get_mut(url) {
            e.hits += 1;
            e.last_usage = Some(now_micros());
        }
    }

    /// The context named by a `Link` header, or the core context.
    pub async fn for_link(&self, url: Option<&str>) -> NgsiResult<ActiveContext> {
        match url {
            None => Ok(ActiveContext::core()),
            Some(u) => {
                let ctx = self.resolve(&Value::String(u.to_string())).await?;
                Ok(ActiveContext {
                    ctx,
                    source: ContextSource::Url(u.to_string()),
                })
            }
        }
    }

    /// The context of a JSON-LD body's `@context` member.
    pub async fn for_body(&self, value: &Value) -> NgsiResult<ActiveContext> {
        let ctx = self.resolve(value).await?;
        let source = match value {
            Value::String(u) => ContextSource::Url(u.clone()),
            other => ContextSource::Inline(other.clone()),
        };
        Ok(ActiveContext { ctx, source })
    }

    /// The user context objects a context value stands for, fetched where
    /// needed (built-in core contexts contribute none: they always apply).
    pub async fn objects(&self, value: &Value) -> NgsiResult<Vec<Map<String, Value>>> {
        let mut objects = Vec::new();
        let mut fetched = 0;
        self.collect(value, 0, &mut fetched, &mut objects).await?;
        Ok(objects)
    }

    async fn resolve(&self, value: &Value) -> NgsiResult<Arc<Context>> {
        let key = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if let Value::String(url) = value {
            self.touch(url);
        }
        if let Some(c) = self.lock_processed().get(&key) {
            return Ok(c.clone());
        }
        let mut objects = Vec::new();
        let mut fetched = 0;
        self.collect(value, 0, &mut fetched, &mut objects).await?;
        let ctx = Arc::new(Context::with_user_contexts(&objects)?);
        let mut cache = self.lock_processed();
        if cache.len() >= MAX_CACHED_CONTEXTS {
            cache.clear();
        }
        cache.insert(key, ctx.clone());
        Ok(ctx)
    }

    fn lock_processed(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Context>>> {
        self.processed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Flattens a context value into its context objects, fetching URLs.
    fn collect<'a>(
        &'a self,
        value: &'a Value,
        depth: usize,
        fetched: &'a mut usize,
        out: &'a mut Vec<Map<String, Value>>,
    ) -> futures_util::future::BoxFuture<'a, NgsiResult<()>> {
        Box::pin(async move {
            if depth > MAX_REFERENCE_DEPTH {
                return Err(NgsiError::bad_data(format!(
                    "@context references are nested deeper than {MAX_REFERENCE_DEPTH} levels"
                )));
            }
            match value {
                Value::Null => Ok(()),
                Value::Object(m) => {
                    out.push(m.clone());
                    Ok(())
                }
                Value::Array(items) => {
                    for item in items {
                        self.collect(item, depth + 1, fetched, out).await?;
                    }
                    Ok(())
                }
                Value::String(url) => {
                    if builtin_context(url).is_some() {
                        // The core context is always applied first.
                        return Ok(());
                    }
                    *fetched += 1;
                    if *fetched > MAX_CONTEXT_DOCUMENTS {
                        return Err(NgsiError::bad_data(format!(
                            "@context pulls in more than {MAX_CONTEXT_DOCUMENTS} documents"
                        )));
                    }
                    let doc = self.document(url).await?;
                    let inner = doc
                        .get("@context")
                        .ok_or_else(|| unavailable(url, "the document has no @context member"))?;
                    self.collect(inner, depth + 1, fetched, out).await
                }
                _ => Err(NgsiError::bad_data(
                    "@context must be a URL, an object or an array of them",
                )),
            }
        })
    }

    async fn document(&self, url: &str) -> NgsiResult<Arc<Value>> {
        {
            let reg = self.lock_registry();
            if let Some(e) = reg.get(url) {
                return Ok(e.doc.clone());
            }
            // A context hosted here, whatever host name the client used for it.
            if let Some((_, id)) = url.split_once(HOSTED_PATH)
                && let Some(e) = reg.get(&hosted_key(id))
            {
                return Ok(e.doc.clone());
            }
        }
        let doc = Arc::new(self.fetch(url).await?);
        let mut reg = self.lock_registry();
        let n = reg.len();
        if n >= MAX_REGISTRY_ENTRIES {
            // Still usable for this request; not kept.
            return Ok(doc);
        }
        reg.entry(url.to_string()).or_insert_with(|| ContextEntry {
            url: url.to_string(),
            local_id: format!("cached-{n}-{:x}", now_micros()),
            kind: ContextKind::Cached,
            doc: doc.clone(),
            created_at: now_micros(),
            last_usage: Some(now_micros()),
            hits: 1,
            builtin: false,
            owner: None,
        });
        Ok(doc)
    }

    /// Fetches a document over HTTP(S), bounded in time and size.
    async fn fetch(&self, url: &str) -> NgsiResult<Value> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(NgsiError::bad_data(format!(
                "@context '{url}' is not an http(s) URL"
            )));
        }
        // reqwest resolves names through the policy, but connects to
        // address literals directly.
        self.outbound
            .check_url_literal(url)
            .map_err(|e| unavailable(url, e))?;
        let mut resp = self
            .client
            .get(url)
            .header("Accept", "application/ld+json, application/json")
            .send()
            .await
            .map_err(|e| match OutboundError::find(&e) {
                Some(refused) => unavailable(url, refused),
                None => unavailable(url, e),
            })?;
        if !resp.status().is_success() {
            return Err(unavailable(
                url,
                format!("the server answered {}", resp.status()),
            ));
        }
        if resp
            .content_length()
            .is_some_and(|n| n as usize > MAX_CONTEXT_BYTES)
        {
            return Err(unavailable(url, "the document is larger than 1 MiB"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| unavailable(url, e))? {
            if body.len() + chunk.len() > MAX_CONTEXT_BYTES {
                return Err(unavailable(url, "the document is larger than 1 MiB"));
            }
            body.extend_from_slice(&chunk);
        }
        let doc: Value = serde_json::from_slice(&body)
            .map_err(|e| unavailable(url, format!("not JSON: {e}")))?;
        if !doc
            .get("@context")
            .is_some_and(|c| c.is_object() || c.is_array() || c.is_string())
        {
            return Err(unavailable(url, "the document has no @context member"));
        }
        Ok(doc)
    }
}
