//! The change feed: committed entity changes broadcast to whoever listens
//! (the dashboard's live view today). Sending never blocks the writer: a slow
//! receiver loses the oldest changes and is told how many it missed.

use borough_core::Entity;
use borough_store::EntityChange;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::broadcast;

/// Changes kept for receivers that are behind; older ones are dropped for them.
const FEED_CAPACITY: usize = 16_384;

pub(crate) struct Feed(broadcast::Sender<EntityChange>);

impl Default for Feed {
    fn default() -> Self {
        Self(broadcast::channel(FEED_CAPACITY).0)
    }
}

impl Feed {
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<EntityChange> {
        self.0.subscribe()
    }

    /// Publishes a committed group's changes (nothing is built when nobody listens).
    pub(crate) fn publish(&self, staged: &HashMap<(String, String), Option<Arc<Entity>>>) {
        if self.0.receiver_count() == 0 {
            return;
        }
        let mut tenants: HashMap<&str, Arc<str>> = HashMap::new();
        for ((tenant, id), entity) in staged {
            let tenant = tenants
                .entry(tenant.as_str())
                .or_insert_with(|| Arc::from(tenant.as_str()))
                .clone();
            let _ = self.0.send(EntityChange {
                tenant,
                id: Arc::from(id.as_str()),
                entity: entity.clone(),
            });
        }
    }
}
