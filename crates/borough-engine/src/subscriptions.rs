//! Subscriptions in memory and the matching of changes against them.
//!
//! Subscriptions are compiled and indexed by entity type (or by a value their
//! `q` requires) so that a change is matched only against those that can
//! concern it. The writer matches every change of a group, and the backend
//! writes the resulting notices to its outbox in the same commit as the
//! change, so an acknowledged change never loses its notification.

use borough_core::Entity;
use borough_core::query::expr::BoolExpr;
use borough_core::query::q::{equality_anchor, value_keys};
use borough_core::subscription::{Change, CompiledSubscription, Stats, SubscriptionRecord};
use borough_store::Notice;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// A tenant's subscriptions, indexed so that a change is matched only against
/// those that can concern it: by the value an equality term of their `q`
/// requires (`zone==7`), else by the entity types they name.
#[derive(Default)]
pub struct TenantSubscriptions {
    pub by_id: BTreeMap<String, Arc<CompiledSubscription>>,
    /// attribute → equality key → subscriptions whose q needs that value.
    by_value: HashMap<String, HashMap<String, Vec<Arc<CompiledSubscription>>>>,
    by_type: HashMap<String, Vec<Arc<CompiledSubscription>>>,
    /// Subscriptions that may concern any type (no type, or a type expression).
    untyped: Vec<Arc<CompiledSubscription>>,
}

impl TenantSubscriptions {
    fn rebuild(by_id: BTreeMap<String, Arc<CompiledSubscription>>) -> Self {
        let mut index = Self::default();
        for s in by_id.values() {
            if let Some((attr, keys)) = s.query.q.as_ref().and_then(equality_anchor) {
                let by_key = index.by_value.entry(attr).or_default();
                for k in keys {
                    by_key.entry(k).or_default().push(s.clone());
                }
                continue;
            }
            let types: Option<Vec<&String>> = if s.query.selectors.is_empty() {
                None
            } else {
                s.query
                    .selectors
                    .iter()
                    .map(|sel| match &sel.types {
                        Some(BoolExpr::Leaf(t)) => Some(t),
                        _ => None,
                    })
                    .collect()
            };
            match types {
                Some(mut ts) => {
                    ts.sort();
                    ts.dedup();
                    for t in ts {
                        index.by_type.entry(t.clone()).or_default().push(s.clone());
                    }
                }
                None => index.untyped.push(s.clone()),
            }
        }
        index.by_id = by_id;
        index
    }

    /// The subscriptions that can concern a change of `subject` (the entity
    /// after the change, or before it for a deletion); each at most once.
    pub fn candidates(&self, subject: &Entity) -> Vec<&Arc<CompiledSubscription>> {
        let mut out: Vec<&Arc<CompiledSubscription>> = subject
            .types
            .iter()
            .filter_map(|t| self.by_type.get(t))
            .flatten()
            .chain(self.untyped.iter())
            .collect();
        let mut keys = Vec::new();
        let mut may_repeat = subject.types.len() > 1;
        for (attr, by_key) in &self.by_value {
            let Some(instances) = subject.attrs.get(attr) else {
                continue;
            };
            keys.clear();
            value_keys(instances, &mut keys);
            may_repeat |= keys.len() > 1;
            for k in &keys {
                if let Some(subs) = by_key.get(k) {
                    out.extend(subs);
                }
            }
        }
        if may_repeat {
            out.sort_by_key(|s| Arc::as_ptr(s));
            out.dedup_by_key(|s| Arc::as_ptr(s));
        }
        out
    }
}

/// Pending notices a subscription may have unless configured otherwise.
pub const DEFAULT_MAX_PENDING: u64 = 100_000;
/// Drops of one subscription are logged at most this often.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(60);

type SubKey = (String, String);

/// Every tenant's subscriptions, delivery statistics and the outbox's state.
pub struct Registry {
    tenants: RwLock<HashMap<String, Arc<TenantSubscriptions>>>,
    stats: Mutex<HashMap<SubKey, Stats>>,
    /// Notices written and not yet done, per subscription. Signed: the notifier
    /// may finish a notice (its full rescan reads the committed outbox) a moment
    /// before the writer has counted it in.
    pending: Mutex<HashMap<SubKey, i64>>,
    /// Most pending notices per subscription: a dead receiver under a high
    /// change rate must not grow the outbox without bound.
    max_pending: i64,
    /// When each subscription's drops were last logged, and how many since.
    drop_log: Mutex<HashMap<SubKey, (Option<Instant>, u64)>>,
    pub watch: tokio::sync::watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_PENDING)
    }
}

/// What a group's notices do to the subscriptions' counts, once committed.
#[derive(Default)]
pub struct Admitted {
    kept: Vec<(SubKey, i64)>,
    dropped: Vec<(SubKey, u64)>,
}

impl Registry {
    /// A registry whose subscriptions may each have `max_pending` pending notices.
    pub fn new(max_pending: u64) -> Self {
        Self {
            tenants: RwLock::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            max_pending: i64::try_from(max_pending).unwrap_or(i64::MAX),
            drop_log: Mutex::new(HashMap::new()),
            watch: tokio::sync::watch::channel(0).0,
        }
    }

    /// Leaves out of a group's notices those of subscriptions that already
    /// have their bound of pending ones (counting the group's own). Called by
    /// the writer before the commit; [`Registry::admitted`] after it. The
    /// counts are exact: pending notices change only on the writer thread.
    pub fn admit(&self, notices: &mut Vec<Notice>) -> Admitted {
        let mut out = Admitted::default();
        if notices.is_empty() {
            return out;
        }
        let keep: Vec<bool> = {
            let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            // Keyed by borrowed names: one lookup of `pending` per subscription.
            let mut counts: HashMap<(&str, &str), (i64, i64, u64)> = HashMap::new();
            let keep = notices
                .iter()
                .map(|n| {
                    let c = counts
                        .entry((n.tenant.as_str(), n.subscription.as_str()))
                        .or_insert_with(|| {
                            let key = (n.tenant.clone(), n.subscription.clone());
                            (pending.get(&key).copied().unwrap_or(0), 0, 0)
                        });
                    if c.0 + c.1 >= self.max_pending {
                        c.2 += 1;
                        false
                    } else {
                        c.1 += 1;
                        true
                    }
                })
                .collect();
            for ((tenant, id), (_, kept, dropped)) in counts {
                let key = (tenant.to_string(), id.to_string());
                if dropped > 0 {
                    out.dropped.push((key.clone(), dropped));
                }
                if kept > 0 {
                    out.kept.push((key, kept));
                }
            }
            keep
        };
        if !out.dropped.is_empty() {
            let mut i = 0;
            notices.retain(|_| {
                i += 1;
                keep[i - 1]
            });
        }
        out
    }

    /// Counts a committed group's notices as pending, and those left out as
    /// dropped (logged at most once a minute per subscription).
    pub fn admitted(&self, a: Admitted) {
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for (key, n) in a.kept {
                *pending.entry(key).or_default() += n;
            }
        }
        for ((tenant, id), n) in a.dropped {
            let total = self.with_stats(&tenant, &id, |s| {
                s.dropped += n;
                s.dropped
            });
            let mut log = self.drop_log.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let (logged_at, since) = log.entry((tenant.clone(), id.clone())).or_insert((None, 0));
            *since += n;
            if logged_at.is_none_or(|t| now.duration_since(t) >= DROP_LOG_INTERVAL) {
                tracing::warn!(
                    tenant,
                    subscription = id,
                    dropped = *since,
                    dropped_total = total,
                    max_pending = self.max_pending,
                    "a subscription has its bound of pending notifications (is its receiver down?): new ones are dropped"
                );
                *logged_at = Some(now);
                *since = 0;
            }
        }
    }

    /// Compiles a stored subscription, with its stored statistics, at start-up.
    pub fn load(&self, tenant: &str, record: SubscriptionRecord, now: i64) {
        let id = record.id.clone();
        let stats = record.stats.clone();
        match CompiledSubscription::compile(record, now, false) {
            Ok(c) => {
                self.set(tenant, &id, Some(Arc::new(c)));
                self.with_stats(tenant, &id, |s| {
                    *s = Stats {
                        pending: 0,
                        ..stats
                    }
                });
            }
            Err(e) => {
                tracing::error!(tenant, id, error = %e, "a stored subscription no longer compiles; it is ignored")
            }
        }
    }

    pub fn tenant(&self, tenant: &str) -> Option<Arc<TenantSubscriptions>> {
        self.tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
            .cloned()
    }

    pub fn all(&self) -> Vec<(String, Arc<CompiledSubscription>)> {
        let t = self.tenants.read().unwrap_or_else(|e| e.into_inner());
        t.iter()
            .flat_map(|(tenant, subs)| subs.by_id.values().map(|s| (tenant.clone(), s.clone())))
            .collect()
    }

    /// Puts (or with `None`, removes) one subscription of a tenant.
    pub fn set(&self, tenant: &str, id: &str, sub: Option<Arc<CompiledSubscription>>) {
        let mut t = self.tenants.write().unwrap_or_else(|e| e.into_inner());
        let mut by_id = t.get(tenant).map(|s| s.by_id.clone()).unwrap_or_default();
        match sub {
            Some(s) => {
                by_id.insert(id.to_string(), s);
            }
            None => {
                by_id.remove(id);
            }
        }
        t.insert(
            tenant.to_string(),
            Arc::new(TenantSubscriptions::rebuild(by_id)),
        );
    }

    fn with_stats<R>(&self, tenant: &str, id: &str, f: impl FnOnce(&mut Stats) -> R) -> R {
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        f(s.entry((tenant.to_string(), id.to_string())).or_default())
    }

    pub fn stats(&self, tenant: &str, id: &str) -> Stats {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(tenant.to_string(), id.to_string()))
            .copied()
            .unwrap_or(0);
        let mut s = self.with_stats(tenant, id, |s| s.clone());
        s.pending = u64::try_from(pending).unwrap_or(0);
        s
    }

    pub fn pending(&self, tenant: &str, id: &str, delta: i64) {
        *self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((tenant.to_string(), id.to_string()))
            .or_default() += delta;
    }

    pub fn record_delivery(
        &self,
        tenant: &str,
        id: &str,
        notices: u64,
        at: i64,
        error: Option<String>,
    ) {
        self.with_stats(tenant, id, |s| {
            s.last_notification = Some(at);
            match error {
                None => {
                    s.times_sent += notices;
                    s.last_success = Some(at);
                }
                Some(e) => {
                    s.times_failed += notices;
                    s.last_failure = Some(at);
                    s.last_error = Some(e);
                }
            }
        });
    }
}

/// Matches one change against a tenant's subscriptions.
pub fn match_change(
    subs: &TenantSubscriptions,
    tenant: &str,
    before: Option<&Arc<Entity>>,
    after: Option<&Arc<Entity>>,
    now: i64,
    out: &mut Vec<Notice>,
) {
    let Some(subject) = after.or(before) else {
        return;
    };
    let candidates = subs.candidates(subject);
    if candidates.is_empty() {
        return;
    }
    // The change is summarised once, whatever the number of subscriptions.
    let Some(change) = Change::of(before.map(|e| e.as_ref()), after.map(|e| e.as_ref())) else {
        return;
    };
    for s in candidates {
        if let Some(trigger) = s.matches_change(&change, now) {
            out.push(Notice {
                tenant: tenant.to_string(),
                subscription: s.record.id.clone(),
                trigger: trigger.to_string(),
                entity: subject.as_ref().clone(),
                deleted: after.is_none(),
                at: now,
                // The previous state shows changes, and names what an
                // attributeDeleted notification reports as deleted.
                previous: if (s.show_changes || trigger == "attributeDeleted") && after.is_some() {
                    before.map(|b| b.as_ref().clone())
                } else {
                    None
                },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use borough_core::Context;
    use borough_core::entity::parse_entity;
    use borough_core::subscription::Stats;
    use serde_json::{Value, json};

    fn sub(id: usize, extra: Value) -> Arc<CompiledSubscription> {
        let mut body = json!({"type": "Subscription", "entities": [{"type": "Meter"}],
            "notification": {"endpoint": {"uri": "http://127.0.0.1:9/n"}}});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let record = SubscriptionRecord {
            id: format!("urn:s:{id}"),
            body: body.as_object().cloned().unwrap(),
            context: Value::Null,
            context_objects: Vec::new(),
            notification_context_objects: None,
            created_at: 0,
            modified_at: 0,
            stats: Stats::default(),
        };
        Arc::new(CompiledSubscription::compile(record, 0, false).unwrap())
    }

    #[test]
    fn indexed_candidates_find_every_subscription_that_matches() {
        let subs = vec![
            sub(0, json!({"q": "zone==3"})),
            sub(1, json!({"q": "zone==1,2;level>0"})),
            sub(2, json!({"q": "status==\"free\""})),
            sub(3, json!({"q": "zone==3|status==\"free\""})),
            sub(4, json!({})),
            sub(5, json!({"q": "kind==meterA"})),
            sub(6, json!({"q": "tags==\"a\""})),
            sub(7, json!({"q": "zone==-0"})),
            sub(8, json!({"entities": [{"type": "Other"}], "q": "zone==3"})),
            sub(
                9,
                json!({"entities": [{"idPattern": ".*"}], "q": "level==2"}),
            ),
            sub(10, json!({"q": "seen==2024-01-01T00:00:00Z"})),
            sub(11, json!({"q": "zone==3.0"})),
        ];
        let by_id = subs
            .iter()
            .map(|s| (s.record.id.clone(), s.clone()))
            .collect();
        let index = TenantSubscriptions::rebuild(by_id);
        let ctx = Context::core();
        let entity = |zone: f64, status: &str, level: i64| {
            Arc::new(
                parse_entity(
                    &json!({"id": "urn:m:1", "type": ["Meter"], "zone": zone, "status": status, "level": level,
                            "kind": {"type": "VocabProperty", "vocab": "meterA"}, "tags": ["a", "b"],
                            "seen": "2024-01-01T00:00:00.000Z"}),
                    &ctx,
                    0,
                )
                .unwrap(),
            )
        };
        let states = [
            entity(3.0, "free", 1),
            entity(1.0, "occupied", 1),
            entity(2.0, "occupied", 0),
            entity(0.0, "occupied", 2),
            entity(-0.0, "free", 2),
        ];
        for before in states.iter() {
            for after in states.iter() {
                for (b, a) in [
                    (Some(before), Some(after)),
                    (None, Some(after)),
                    (Some(before), None),
                ] {
                    let change = Change::of(b.map(|e| e.as_ref()), a.map(|e| e.as_ref())).unwrap();
                    let mut indexed: Vec<&str> = index
                        .candidates(change.subject)
                        .into_iter()
                        .filter(|s| s.matches_change(&change, 1).is_some())
                        .map(|s| s.record.id.as_str())
                        .collect();
                    let mut all: Vec<&str> = subs
                        .iter()
                        .filter(|s| s.matches_change(&change, 1).is_some())
                        .map(|s| s.record.id.as_str())
                        .collect();
                    indexed.sort();
                    all.sort();
                    assert_eq!(
                        indexed,
                        all,
                        "{:?} -> {:?}",
                        b.map(|e| &e.attrs),
                        a.map(|e| &e.attrs)
                    );
                }
            }
        }
        // The index does narrow: a zone-1 meter is not checked against zone==3 subscriptions.
        let c = index.candidates(&states[1]);
        assert!(!c.iter().any(|s| s.record.id == "urn:s:0"));
    }
}
