//! A backend that keeps everything in memory: for tests of the engine and of
//! the layers above it, and the reference a new backend can be read against.
//! "Durable" means until the backend is dropped; clones share the same data,
//! so a test can start a second engine over what the first one committed.

use crate::temporal::{Row, imported_instance, same_instance, select, time_key, widen_cut};
use crate::{Backend, Committed, DoneNotices, EntitySink, OutboxState, WriteSet};
use borough_core::Attribute;
use borough_core::Entity;
use borough_core::subscription::SubscriptionRecord;
use borough_core::temporal::{
    AttrHistory, EntityHistory, HistoryOp, HistoryOutcome, HistoryRequest, ImportSeries, Retention,
};
use borough_store::{
    ImportCounts, Notice, RecordChange, RecordKind, RecordStore, StoreError, StoredRecord,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// (tenant, entity id).
type EntityKey = (String, String);

/// One entity's history: its types (as first recorded) and its series by
/// (attribute, datasetId; "" for the default instance).
#[derive(Clone, Default)]
struct EntityHistoryRows {
    types: Vec<String>,
    series: BTreeMap<(String, String), u64>,
}

#[derive(Default)]
struct Data {
    entities: BTreeMap<EntityKey, Vec<u8>>,
    tenants: BTreeSet<String>,
    contexts: BTreeMap<String, Vec<u8>>,
    subscriptions: BTreeMap<EntityKey, SubscriptionRecord>,
    outbox: BTreeMap<u64, Notice>,
    dead_letters: BTreeMap<u64, (Notice, String)>,
    records: BTreeMap<(RecordKind, String, String), Vec<u8>>,
    history: BTreeMap<EntityKey, EntityHistoryRows>,
    /// Series number → its rows, ordered by (time key, sequence number).
    rows: BTreeMap<u64, Vec<Row>>,
    retention: BTreeMap<String, Retention>,
    next_series: u64,
    next_seq: u64,
}

impl Data {
    /// The series of one attribute instance, made on first use.
    fn series_for(
        &mut self,
        tenant: &str,
        id: &str,
        types: &[String],
        name: &str,
        dataset: Option<&str>,
    ) -> u64 {
        let next = &mut self.next_series;
        let entity = self
            .history
            .entry((tenant.to_string(), id.to_string()))
            .or_insert_with(|| EntityHistoryRows {
                types: types.to_vec(),
                series: BTreeMap::new(),
            });
        *entity
            .series
            .entry((name.to_string(), dataset.unwrap_or("").to_string()))
            .or_insert_with(|| {
                *next += 1;
                *next
            })
    }

    /// Adds one instance to a series, in time-key order.
    fn push(&mut self, series: u64, attr: Attribute) {
        self.next_seq += 1;
        let row = (time_key(&attr), self.next_seq, attr);
        let rows = self.rows.entry(series).or_default();
        let at = rows.partition_point(|r| (r.0, r.1) <= (row.0, row.1));
        rows.insert(at, row);
    }

    /// The entity that owns a series under an attribute name, if any.
    fn owns(&self, tenant: &str, id: &str, name: &str, series: u64) -> bool {
        self.history
            .get(&(tenant.to_string(), id.to_string()))
            .is_some_and(|h| h.series.iter().any(|((n, _), s)| n == name && *s == series))
    }
}

/// The memory backend. Cloning shares the data.
#[derive(Clone, Default)]
pub struct MemoryBackend {
    data: Arc<Mutex<Data>>,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }

    fn data(&self) -> MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

impl RecordStore for MemoryBackend {
    fn write_records(&self, changes: &[RecordChange]) -> Result<(), StoreError> {
        let mut d = self.data();
        for c in changes {
            let key = (c.kind, c.tenant.clone(), c.key.clone());
            match &c.value {
                Some(v) => d.records.insert(key, v.clone()),
                None => d.records.remove(&key),
            };
        }
        Ok(())
    }

    fn records(&self, kind: RecordKind) -> Result<Vec<StoredRecord>, StoreError> {
        Ok(self
            .data()
            .records
            .iter()
            .filter(|((k, _, _), _)| *k == kind)
            .map(|((_, t, key), v)| (t.clone(), key.clone(), v.clone()))
            .collect())
    }

    fn records_page(
        &self,
        kind: RecordKind,
        tenant: &str,
        after: Option<&str>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let d = self.data();
        let of_tenant = d
            .records
            .iter()
            .filter(|((k, t, _), _)| *k == kind && t == tenant)
            .map(|((_, t, key), v)| (t.clone(), key.clone(), v.clone()));
        Ok(if reverse {
            of_tenant
                .rev()
                .filter(|(_, key, _)| after.is_none_or(|a| key.as_str() < a))
                .take(limit)
                .collect()
        } else {
            of_tenant
                .filter(|(_, key, _)| after.is_none_or(|a| key.as_str() > a))
                .take(limit)
                .collect()
        })
    }
}

impl Backend for MemoryBackend {
    fn load_entities(&self, sink: &mut EntitySink<'_>) -> Result<Vec<String>, StoreError> {
        let (rows, tenants) = {
            let d = self.data();
            (d.entities.clone(), d.tenants.iter().cloned().collect())
        };
        for ((tenant, id), bytes) in rows {
            let mut entity: Entity = serde_json::from_slice(&bytes).map_err(io)?;
            entity.shrink_to_fit();
            sink(tenant, id, entity);
        }
        Ok(tenants)
    }

    fn load_subscriptions(&self) -> Result<Vec<(String, SubscriptionRecord)>, StoreError> {
        Ok(self
            .data()
            .subscriptions
            .iter()
            .map(|((tenant, _), r)| (tenant.clone(), r.clone()))
            .collect())
    }

    fn load_outbox(&self) -> Result<OutboxState, StoreError> {
        let d = self.data();
        let mut state = OutboxState {
            next_notice: 1,
            ..OutboxState::default()
        };
        for (seq, n) in &d.outbox {
            *state
                .pending
                .entry((n.tenant.clone(), n.subscription.clone()))
                .or_default() += 1;
            state.next_notice = state.next_notice.max(seq + 1);
        }
        if let Some((seq, _)) = d.dead_letters.last_key_value() {
            state.next_notice = state.next_notice.max(seq + 1);
        }
        Ok(state)
    }

    fn commit(&self, set: &WriteSet<'_>) -> Result<Committed, StoreError> {
        // Serialized first, so that a failure changes nothing.
        let mut entities = Vec::with_capacity(set.entities.len());
        for (key, entity) in set.entities {
            let bytes = match entity {
                Some(e) => Some(serde_json::to_vec(e.as_ref()).map_err(io)?),
                None => None,
            };
            entities.push((key.clone(), bytes));
        }
        let mut d = self.data();
        for (key, bytes) in entities {
            match bytes {
                Some(b) => d.entities.insert(key, b),
                None => d.entities.remove(&key),
            };
        }
        d.tenants.extend(set.new_tenants.iter().cloned());
        for (i, n) in set.notices.iter().enumerate() {
            d.outbox.insert(set.first_notice + i as u64, n.clone());
        }
        for r in set.history {
            for &(a, i) in &r.instances {
                let Some((name, list)) = r.entity.attrs.get_index(a) else {
                    continue;
                };
                let Some(attr) = list.get(i) else { continue };
                let s = d.series_for(
                    &r.tenant,
                    &r.entity.id,
                    &r.entity.types,
                    name,
                    attr.dataset_id.as_deref(),
                );
                let mut attr = attr.clone();
                attr.dataset_id = None;
                d.push(s, attr);
            }
        }
        for c in set.records {
            let key = (c.kind, c.tenant.clone(), c.key.clone());
            match &c.value {
                Some(v) => d.records.insert(key, v.clone()),
                None => d.records.remove(&key),
            };
        }
        Ok(Committed::Done {
            first_notice: set.first_notice,
        })
    }

    fn put_subscription(
        &self,
        tenant: &str,
        record: &SubscriptionRecord,
    ) -> Result<(), StoreError> {
        self.data()
            .subscriptions
            .insert((tenant.to_string(), record.id.clone()), record.clone());
        Ok(())
    }

    fn delete_subscription(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .data()
            .subscriptions
            .remove(&(tenant.to_string(), id.to_string()))
            .is_some())
    }

    fn notices_done(&self, done: &[DoneNotices<'_>]) -> Result<(), StoreError> {
        let mut d = self.data();
        for batch in done {
            for (seq, n) in batch.notices {
                d.outbox.remove(seq);
                if let Some(error) = batch.dead {
                    d.dead_letters.insert(*seq, (n.clone(), error.to_string()));
                }
            }
        }
        Ok(())
    }

    fn write_history(
        &self,
        tenant: &str,
        op: HistoryOp,
        now: i64,
        new_tenant: bool,
    ) -> Result<HistoryOutcome, StoreError> {
        let mut d = self.data();
        let key = |id: &str| (tenant.to_string(), id.to_string());
        let outcome = match op {
            HistoryOp::Append {
                id,
                types,
                instances,
            } => {
                let existed = d.history.contains_key(&key(&id));
                for (name, attr) in instances {
                    let s = d.series_for(tenant, &id, &types, &name, attr.dataset_id.as_deref());
                    let mut attr = attr;
                    attr.dataset_id = None;
                    // Sending a temporal representation again adds nothing new.
                    let repeated = attr.observed_at.is_some()
                        && d.rows.get(&s).is_some_and(|rows| {
                            rows.iter()
                                .any(|r| r.0 == time_key(&attr) && same_instance(&r.2, &attr))
                        });
                    if !repeated {
                        d.push(s, attr);
                    }
                }
                if existed {
                    HistoryOutcome::Changed
                } else {
                    if new_tenant {
                        d.tenants.insert(tenant.to_string());
                    }
                    HistoryOutcome::Created
                }
            }
            HistoryOp::DeleteEntity { id } => match d.history.remove(&key(&id)) {
                Some(h) => {
                    for s in h.series.values() {
                        d.rows.remove(s);
                    }
                    HistoryOutcome::Changed
                }
                None => HistoryOutcome::NotFound,
            },
            HistoryOp::DeleteAttr {
                id,
                name,
                dataset_id,
                all,
            } => {
                let dataset = dataset_id.unwrap_or_default();
                let gone: Vec<(String, String)> = d
                    .history
                    .get(&key(&id))
                    .map(|h| {
                        h.series
                            .keys()
                            .filter(|(n, ds)| *n == name && (all || *ds == dataset))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                for k in &gone {
                    let s = d
                        .history
                        .get_mut(&key(&id))
                        .and_then(|h| h.series.remove(k));
                    if let Some(s) = s {
                        d.rows.remove(&s);
                    }
                }
                if gone.is_empty() {
                    HistoryOutcome::NotFound
                } else {
                    HistoryOutcome::Changed
                }
            }
            HistoryOp::DeleteInstance { id, name, instance } => {
                if !d.owns(tenant, &id, &name, instance.series) {
                    return Ok(HistoryOutcome::NotFound);
                }
                let rows = d.rows.entry(instance.series).or_default();
                let before = rows.len();
                rows.retain(|r| r.1 != instance.seq);
                if rows.len() == before {
                    HistoryOutcome::NotFound
                } else {
                    HistoryOutcome::Changed
                }
            }
            HistoryOp::ModifyInstance {
                id,
                name,
                instance,
                attr,
            } => {
                if !d.owns(tenant, &id, &name, instance.series) {
                    return Ok(HistoryOutcome::NotFound);
                }
                let rows = d.rows.entry(instance.series).or_default();
                match rows.iter_mut().find(|r| r.1 == instance.seq) {
                    Some(row) => {
                        let old = &row.2;
                        let mut new = *attr;
                        // The time key stays: an instance keeps its place in time.
                        new.observed_at = old.observed_at;
                        new.dataset_id = None;
                        new.created_at = old.created_at;
                        new.modified_at = if old.observed_at.is_none() {
                            old.modified_at
                        } else {
                            now
                        };
                        row.2 = new;
                        HistoryOutcome::Changed
                    }
                    None => HistoryOutcome::NotFound,
                }
            }
        };
        Ok(outcome)
    }

    fn import_history(
        &self,
        tenant: &str,
        series: Vec<ImportSeries>,
        now: i64,
        new_tenant: bool,
    ) -> Result<ImportCounts, StoreError> {
        let mut d = self.data();
        if new_tenant {
            d.tenants.insert(tenant.to_string());
        }
        let mut counts = ImportCounts {
            points: 0,
            series: series.len() as u64,
        };
        for one in series {
            let types = [one.entity_type];
            let s = d.series_for(tenant, &one.entity, &types, &one.name, None);
            for (at, value) in one.points {
                counts.points += 1;
                d.push(s, imported_instance(at, value, now));
            }
        }
        Ok(counts)
    }

    fn set_retention(&self, tenant: &str, retention: &Retention) -> Result<(), StoreError> {
        self.data()
            .retention
            .insert(tenant.to_string(), retention.clone());
        Ok(())
    }

    fn maintain_history(&self, now: i64) -> Result<u64, StoreError> {
        let mut d = self.data();
        let mut cutoffs = Vec::new();
        for ((tenant, _), h) in &d.history {
            let keep = d.retention.get(tenant).and_then(|r| r.keep_for(&h.types));
            if let Some(keep) = keep {
                let cutoff = now.saturating_sub(keep);
                cutoffs.extend(h.series.values().map(|s| (*s, cutoff)));
            }
        }
        let mut removed = 0;
        for (s, cutoff) in cutoffs {
            if let Some(rows) = d.rows.get_mut(&s) {
                let before = rows.len();
                rows.retain(|r| r.0 >= cutoff);
                removed += (before - rows.len()) as u64;
            }
        }
        Ok(removed)
    }

    fn ready(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn reset(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn pending_notices(&self, after: u64, limit: usize) -> Result<Vec<(u64, Notice)>, StoreError> {
        Ok(self
            .data()
            .outbox
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(seq, n)| (*seq, n.clone()))
            .collect())
    }

    fn dead_letters(&self, tenant: &str, id: &str) -> Result<Vec<(Notice, String)>, StoreError> {
        Ok(self
            .data()
            .dead_letters
            .values()
            .filter(|(n, _)| n.tenant == tenant && n.subscription == id)
            .cloned()
            .collect())
    }

    fn history(
        &self,
        tenant: &str,
        id: &str,
        req: &HistoryRequest,
    ) -> Result<Option<EntityHistory>, StoreError> {
        let d = self.data();
        let Some(h) = d.history.get(&(tenant.to_string(), id.to_string())) else {
            return Ok(None);
        };
        let mut out = EntityHistory {
            id: id.to_string(),
            types: h.types.clone(),
            attrs: Vec::new(),
            truncated: None,
        };
        for ((name, dataset), s) in &h.series {
            if req.attrs.as_ref().is_some_and(|w| !w.contains(name)) {
                continue;
            }
            let rows = d.rows.get(s).map(Vec::as_slice).unwrap_or_default();
            let dataset_id = (!dataset.is_empty()).then(|| dataset.clone());
            let (body, cut) = select(rows, *s, req, dataset_id.as_deref());
            widen_cut(&mut out.truncated, cut);
            out.attrs.push(AttrHistory {
                name: name.clone(),
                dataset_id,
                body,
            });
        }
        Ok(Some(out))
    }

    fn history_entities(
        &self,
        tenant: &str,
        types: Option<&[String]>,
    ) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        Ok(self
            .data()
            .history
            .iter()
            .filter(|((t, _), h)| {
                t == tenant && types.is_none_or(|w| h.types.iter().any(|ty| w.contains(ty)))
            })
            .map(|((_, id), h)| (id.clone(), h.types.clone()))
            .collect())
    }

    fn retention(&self, tenant: &str) -> Result<Retention, StoreError> {
        Ok(self
            .data()
            .retention
            .get(tenant)
            .cloned()
            .unwrap_or_default())
    }

    fn put_context(&self, id: &str, doc: &[u8]) -> Result<(), StoreError> {
        self.data().contexts.insert(id.to_string(), doc.to_vec());
        Ok(())
    }

    fn delete_context(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.data().contexts.remove(id).is_some())
    }

    fn contexts(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self
            .data()
            .contexts
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Engine, EngineOptions};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_shared_backend_suite() {
        let store = Engine::start(MemoryBackend::new(), EngineOptions::default()).unwrap();
        borough_store::testsuite::run_all(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn survives_a_restart_of_the_engine() {
        let backend = MemoryBackend::new();
        let store = Engine::start(backend.clone(), EngineOptions::default()).unwrap();
        borough_store::testsuite::survives_reopen(store, || {
            Engine::start(backend.clone(), EngineOptions::default()).unwrap()
        })
        .await;
    }

    #[test]
    fn passes_the_record_suites() {
        let store = Engine::start(MemoryBackend::new(), EngineOptions::default()).unwrap();
        borough_store::testsuite::device_records(&store);
        borough_store::testsuite::record_pages(&store);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_records_with_their_operations() {
        let backend = MemoryBackend::new();
        let store = Engine::start(backend.clone(), EngineOptions::default()).unwrap();
        borough_store::testsuite::linked_records_commit_with_their_operation(store, || {
            Engine::start(backend.clone(), EngineOptions::default()).unwrap()
        })
        .await;
    }
}
