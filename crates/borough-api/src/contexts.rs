//! Resolving a request's `@context`: built-in core contexts, remote contexts
//! fetched with a short timeout and cached, and inline context objects. Each
//! distinct context is processed once into term maps and then shared.

use borough_core::context::{CORE_CONTEXT_URL, MAX_CONTEXT_DOCUMENTS, builtin_context};
use borough_core::{Context, NgsiError, NgsiResult, ProblemKind};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest remote context document accepted.
const MAX_CONTEXT_BYTES: usize = 1 << 20;
/// Processed contexts kept; beyond that the cache starts afresh.
const MAX_CACHED_CONTEXTS: usize = 1024;
/// How deep context documents may reference further documents.
const MAX_REFERENCE_DEPTH: usize = 8;

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

/// Fetches, caches and processes contexts.
pub struct ContextResolver {
    client: reqwest::Client,
    documents: Mutex<HashMap<String, Arc<Value>>>,
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
    /// request that many seconds at most and never hangs it.
    pub fn new(timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .unwrap_or_default();
        Self {
            client,
            documents: Mutex::new(HashMap::new()),
            processed: Mutex::new(HashMap::new()),
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

    async fn resolve(&self, value: &Value) -> NgsiResult<Arc<Context>> {
        let key = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
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
        if let Some(d) = self
            .documents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(url)
        {
            return Ok(d.clone());
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(NgsiError::bad_data(format!(
                "@context '{url}' is not an http(s) URL"
            )));
        }
        let mut resp = self
            .client
            .get(url)
            .header("Accept", "application/ld+json, application/json")
            .send()
            .await
            .map_err(|e| unavailable(url, e))?;
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
        let doc = Arc::new(doc);
        self.documents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(url.to_string(), doc.clone());
        Ok(doc)
    }
}
