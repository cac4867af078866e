//! The live feed of the page: the store's change feed for one tenant, as
//! Server-Sent Events. Changes are coalesced per entity over a short window
//! (a busy city sends one event per window with the latest state of each
//! changed entity, never one per write); when the page's share of the feed
//! would grow past a bound, or the receiver lagged behind the writer, the page
//! is told to reload its view (`resync`) instead of being flooded.

use crate::alerts::{Alert, alert_of, state_of};
use axum::response::sse::Event;
use borough_core::{Context, Entity};
use borough_store::{ChangeBatch, EntityStore};
use futures_util::Stream;
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// How long changes are gathered before they are sent together.
pub const WINDOW: Duration = Duration::from_millis(250);
/// Most entities in one event; beyond it the page reloads its view.
pub const MAX_PER_EVENT: usize = 2000;

/// One changed entity as the page sees it.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub id: String,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub entity_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lon: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lat: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert: Option<Alert>,
    /// Microseconds since the epoch of the entity's last change.
    #[serde(rename = "modifiedAt", skip_serializing_if = "Option::is_none")]
    pub modified_at: Option<i64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

/// The point of an entity's `location` (the centre of its first Point).
pub fn point_of(e: &Entity, location: &str) -> Option<[f64; 2]> {
    let v = &e.attrs.get(location)?.first()?.value;
    if v.get("type").and_then(Value::as_str) != Some("Point") {
        return None;
    }
    let c = v.get("coordinates")?.as_array()?;
    Some([c.first()?.as_f64()?, c.get(1)?.as_f64()?])
}

pub fn summary(id: &str, e: Option<&Entity>, location: &str) -> Summary {
    match e {
        None => Summary {
            id: id.to_string(),
            entity_type: None,
            lon: None,
            lat: None,
            state: None,
            alert: None,
            modified_at: None,
            deleted: true,
        },
        Some(e) => {
            let point = point_of(e, location);
            Summary {
                id: id.to_string(),
                entity_type: e
                    .types
                    .first()
                    .map(|t| Context::core().compact(t).into_owned()),
                lon: point.map(|p| p[0]),
                lat: point.map(|p| p[1]),
                state: state_of(e).map(str::to_string),
                alert: alert_of(e),
                modified_at: Some(e.modified_at),
                deleted: false,
            }
        }
    }
}

struct Live {
    rx: broadcast::Receiver<ChangeBatch>,
    tenant: String,
    location: String,
    stop: Option<watch::Receiver<bool>>,
    hello: Option<Event>,
}

enum Next {
    Changes(ChangeBatch),
    Lagged,
    Stop,
}

impl Live {
    async fn next(&mut self) -> Next {
        let stop = async {
            match &mut self.stop {
                Some(s) => {
                    // Resolves when the server shuts down (or the sender is gone).
                    let _ = s.wait_for(|stopped| *stopped).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            r = self.rx.recv() => match r {
                Ok(batch) => Next::Changes(batch),
                Err(broadcast::error::RecvError::Lagged(_)) => Next::Lagged,
                Err(broadcast::error::RecvError::Closed) => Next::Stop,
            },
            _ = stop => Next::Stop,
        }
    }

    /// Adds this tenant's changes of a batch to `pending`; past
    /// [`MAX_PER_EVENT`] entities the page is told to resync instead.
    fn gather(
        &self,
        batch: &ChangeBatch,
        pending: &mut HashMap<Arc<str>, Option<Arc<Entity>>>,
        resync: &mut bool,
    ) {
        for c in batch.iter().filter(|c| *c.tenant == *self.tenant) {
            if pending.len() < MAX_PER_EVENT || pending.contains_key(&c.id) {
                pending.insert(c.id.clone(), c.entity.clone());
            } else {
                *resync = true;
            }
        }
    }

    /// The next event to send, or `None` when the stream ends.
    async fn event(&mut self) -> Option<Event> {
        if let Some(h) = self.hello.take() {
            return Some(h);
        }
        let mut pending: HashMap<Arc<str>, Option<Arc<Entity>>> = HashMap::new();
        let mut resync = false;
        // Wait for the first change of this tenant, then gather for a window.
        loop {
            match self.next().await {
                Next::Changes(batch) => {
                    self.gather(&batch, &mut pending, &mut resync);
                    if !pending.is_empty() || resync {
                        break;
                    }
                }
                Next::Lagged => {
                    resync = true;
                    break;
                }
                Next::Stop => return None,
            }
        }
        let deadline = tokio::time::Instant::now() + WINDOW;
        loop {
            let next = tokio::select! {
                n = self.next() => n,
                _ = tokio::time::sleep_until(deadline) => break,
            };
            match next {
                Next::Changes(batch) => self.gather(&batch, &mut pending, &mut resync),
                Next::Lagged => resync = true,
                Next::Stop => return None,
            }
        }
        if resync {
            return Some(Event::default().event("resync").data("{}"));
        }
        let changes: Vec<Summary> = pending
            .iter()
            .map(|(id, e)| summary(id, e.as_deref(), &self.location))
            .collect();
        let data = serde_json::to_string(&changes).unwrap_or_else(|_| "[]".into());
        Some(Event::default().event("changes").data(data))
    }
}

/// The SSE stream of one tenant's changes. It starts with a `hello` event
/// and ends when `stop` turns true (server shutdown), so that a graceful
/// shutdown is not held up by open pages; the page reconnects by itself.
pub fn stream(
    store: &dyn EntityStore,
    tenant: String,
    stop: Option<watch::Receiver<bool>>,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + use<> {
    let hello = serde_json::json!({
        "tenant": tenant,
        "entities": store.entity_count(&tenant),
        "windowMs": WINDOW.as_millis() as u64,
    });
    let live = Live {
        rx: store.changes(),
        location: Context::core().expand("location").into_owned(),
        tenant,
        stop,
        // A reconnecting page waits 2 s, not the browser's default.
        hello: Some(
            Event::default()
                .event("hello")
                .retry(Duration::from_secs(2))
                .data(hello.to_string()),
        ),
    };
    futures_util::stream::unfold(live, |mut live| async move {
        live.event().await.map(|e| (Ok(e), live))
    })
}
