//! The change feed: committed entity changes broadcast to whoever listens
//! (the dashboard's map and live view). Sending never blocks the writer: a
//! slow receiver loses the oldest groups and is told how many it missed.

use borough_core::Entity;
use borough_store::{ChangeBatch, EntityChange};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::broadcast;

/// Committed groups kept for receivers that are behind; older ones are
/// dropped for them. Counted in groups, so a single large write (up to a
/// whole group of 20,000 operations) always fits.
const FEED_CAPACITY: usize = 1024;

pub(crate) struct Feed(broadcast::Sender<ChangeBatch>);

impl Default for Feed {
    fn default() -> Self {
        Self(broadcast::channel(FEED_CAPACITY).0)
    }
}

impl Feed {
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<ChangeBatch> {
        self.0.subscribe()
    }

    /// Publishes a committed group's changes (nothing is built when nobody listens).
    pub(crate) fn publish(&self, staged: &HashMap<(String, String), Option<Arc<Entity>>>) {
        if self.0.receiver_count() == 0 || staged.is_empty() {
            return;
        }
        let mut tenants: HashMap<&str, Arc<str>> = HashMap::new();
        let batch: Vec<EntityChange> = staged
            .iter()
            .map(|((tenant, id), entity)| EntityChange {
                tenant: tenants
                    .entry(tenant.as_str())
                    .or_insert_with(|| Arc::from(tenant.as_str()))
                    .clone(),
                id: Arc::from(id.as_str()),
                entity: entity.clone(),
            })
            .collect();
        let _ = self.0.send(Arc::new(batch));
    }
}
