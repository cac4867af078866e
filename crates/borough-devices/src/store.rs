//! The entity store as the NGSI-LD API sees it when devices are on: every
//! call goes to the real store, and a committed write that sets a command
//! attribute of a device's entity (`PATCH …/attrs/open`, as FIWARE users
//! expect) queues that command. The devices layer's own writes (readings,
//! command status) bypass this wrapper, so they never trigger commands.
//!
//! A device's bound of open commands is checked before the write: an
//! operation that would queue commands for a device without room for them
//! is refused with 429 and not applied (its attribute keeps its value), so
//! the client sees the refusal instead of a 204 for a command that never
//! goes out. Slots are held from that check until the commands are queued.

use crate::Devices;
use crate::commands::CommandInput;
use borough_core::NgsiError;
use borough_core::query::EntityQuery;
use borough_core::subscription::{CompiledSubscription, Stats, SubscriptionRecord};
use borough_core::temporal::{
    EntityHistory, HistoryOp, HistoryOutcome, HistoryRequest, ImportSeries, Retention,
};
use borough_core::{Entity, EntityOp};
use borough_store::{
    ChangeBatch, EntityStore, GeoBox, ImportCounts, Notice, QueryPage, StoreError, WriteResults,
};
use futures_util::future::BoxFuture;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

pub struct CommandingStore {
    inner: Arc<dyn EntityStore>,
    devices: Arc<Devices>,
}

impl CommandingStore {
    pub fn new(devices: Arc<Devices>) -> Self {
        Self {
            inner: devices.store().clone(),
            devices,
        }
    }
}

/// (op index, device id, command name, value) of every command an op sets.
fn command_triggers(
    devices: &Devices,
    tenant: &str,
    ops: &[EntityOp],
) -> Vec<(usize, String, String, Value)> {
    let mut out = Vec::new();
    if !devices.any_commands() {
        return out;
    }
    for (i, op) in ops.iter().enumerate() {
        let Some(entry) = devices.device_for_entity(tenant, op.entity_id()) else {
            continue;
        };
        if entry.device.commands.is_empty() {
            continue;
        }
        let mut set: Vec<(&str, Value)> = Vec::new();
        match op {
            EntityOp::Create(e) | EntityOp::Replace(e) | EntityOp::Upsert { entity: e, .. } => {
                for (name, list) in &e.attrs {
                    if let Some(a) = list.first() {
                        set.push((name, a.value.clone()));
                    }
                }
            }
            EntityOp::Merge { patch: f, .. }
            | EntityOp::Append { frag: f, .. }
            | EntityOp::Update { frag: f, .. } => {
                for (name, list) in &f.attrs {
                    if let Some(p) = list.as_ref().and_then(|l| l.first()) {
                        set.push((name, p.value.clone().unwrap_or(Value::Null)));
                    }
                }
            }
            EntityOp::PatchAttr { attr, patch, .. } | EntityOp::ReplaceAttr { attr, patch, .. } => {
                set.push((attr, patch.value.clone().unwrap_or(Value::Null)));
            }
            EntityOp::DeleteAttr { .. } | EntityOp::Delete { .. } => {}
        }
        for (iri, value) in set {
            if let Some(cmd) = entry
                .device
                .commands
                .iter()
                .find(|c| devices.ctx.expand(c) == iri)
            {
                out.push((i, entry.device.id.clone(), cmd.clone(), value));
            }
        }
    }
    out
}

impl EntityStore for CommandingStore {
    fn get(&self, tenant: &str, id: &str) -> Option<Arc<Entity>> {
        self.inner.get(tenant, id)
    }
    fn tenant_exists(&self, tenant: &str) -> bool {
        self.inner.tenant_exists(tenant)
    }
    fn tenants(&self) -> Vec<String> {
        self.inner.tenants()
    }
    fn entity_count(&self, tenant: &str) -> usize {
        self.inner.entity_count(tenant)
    }
    fn scan(&self, tenant: &str, visit: &mut dyn FnMut(&Arc<Entity>) -> bool) {
        self.inner.scan(tenant, visit)
    }
    fn query(
        &self,
        tenant: &str,
        query: &EntityQuery,
        offset: usize,
        limit: usize,
        count: bool,
    ) -> QueryPage {
        self.inner.query(tenant, query, offset, limit, count)
    }
    fn type_counts(&self, tenant: &str) -> Vec<(String, usize)> {
        self.inner.type_counts(tenant)
    }
    fn attribute_counts(&self, tenant: &str) -> Vec<(String, usize)> {
        self.inner.attribute_counts(tenant)
    }

    fn write(
        &self,
        tenant: &str,
        ops: Vec<EntityOp>,
    ) -> BoxFuture<'static, Result<WriteResults, StoreError>> {
        let triggers = command_triggers(&self.devices, tenant, &ops);
        if triggers.is_empty() {
            return self.inner.write(tenant, ops);
        }
        // Slots for each operation's commands (an operation is of one entity,
        // so of one device), or its refusal.
        let mut slots = Vec::new();
        let mut refused: BTreeMap<usize, NgsiError> = BTreeMap::new();
        let mut start = 0;
        while start < triggers.len() {
            let (i, device) = (triggers[start].0, &triggers[start].1);
            let n = triggers[start..].iter().take_while(|t| t.0 == i).count();
            match self.devices.reserve_commands(tenant, device, n) {
                Ok(s) => slots.push(s),
                Err(e) => {
                    refused.insert(i, e);
                }
            }
            start += n;
        }
        // Each command is built now and its record committed with the
        // operation that sets it: both are durable, or neither.
        let total = ops.len();
        let mut commands = Vec::new();
        let mut linked = Vec::new();
        let mut admitted = Vec::new();
        for (i, op) in ops.into_iter().enumerate() {
            if refused.contains_key(&i) {
                continue;
            }
            let at = admitted.len();
            for (_, device, name, value) in triggers.iter().filter(|t| t.0 == i) {
                let input = CommandInput {
                    name: name.clone(),
                    value: value.clone(),
                    ..CommandInput::default()
                };
                match self.devices.command_for_write(tenant, device, &input) {
                    Ok((command, record)) => {
                        commands.push((i, device.clone(), command));
                        linked.push((at, record));
                    }
                    Err(e) => {
                        tracing::error!(error = %e.detail, device, "a command set through NGSI-LD cannot be built")
                    }
                }
            }
            admitted.push(op);
        }
        let write =
            (!admitted.is_empty()).then(|| self.inner.write_linked(tenant, admitted, linked));
        let devices = self.devices.clone();
        let tenant = tenant.to_string();
        Box::pin(async move {
            let mut written = match write {
                Some(w) => w.await?.into_iter(),
                None => Vec::new().into_iter(),
            };
            // The results in the order of the request's operations.
            let mut results = Vec::with_capacity(total);
            for i in 0..total {
                match refused.remove(&i) {
                    Some(e) => results.push(Err(e)),
                    None => results.push(written.next().unwrap_or_else(|| {
                        Err(NgsiError::internal("the store returned too few results"))
                    })),
                }
            }
            for (i, device, command) in commands {
                if results.get(i).is_some_and(Result::is_ok) {
                    devices.adopt_command(&tenant, &device, command).await;
                }
            }
            drop(slots);
            Ok(results)
        })
    }

    fn write_linked(
        &self,
        tenant: &str,
        ops: Vec<EntityOp>,
        linked: Vec<(usize, borough_store::RecordChange)>,
    ) -> BoxFuture<'static, Result<WriteResults, StoreError>> {
        self.inner.write_linked(tenant, ops, linked)
    }

    fn put_context(&self, id: &str, doc: &[u8]) -> Result<(), StoreError> {
        self.inner.put_context(id, doc)
    }
    fn delete_context(&self, id: &str) -> Result<bool, StoreError> {
        self.inner.delete_context(id)
    }
    fn contexts(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.contexts()
    }
    fn put_subscription(
        &self,
        tenant: &str,
        record: SubscriptionRecord,
        expect: borough_store::Expect,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        self.inner.put_subscription(tenant, record, expect)
    }
    fn delete_subscription(
        &self,
        tenant: &str,
        id: &str,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        self.inner.delete_subscription(tenant, id)
    }
    fn subscription(&self, tenant: &str, id: &str) -> Option<Arc<CompiledSubscription>> {
        self.inner.subscription(tenant, id)
    }
    fn subscriptions(&self, tenant: &str) -> Vec<Arc<CompiledSubscription>> {
        self.inner.subscriptions(tenant)
    }
    fn all_subscriptions(&self) -> Vec<(String, Arc<CompiledSubscription>)> {
        self.inner.all_subscriptions()
    }
    fn pending_notices(&self, after: u64, limit: usize) -> Result<Vec<(u64, Notice)>, StoreError> {
        self.inner.pending_notices(after, limit)
    }
    fn notices_done(
        &self,
        notices: Vec<(u64, Notice)>,
        dead: Option<String>,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        self.inner.notices_done(notices, dead)
    }
    fn dead_letters(&self, tenant: &str, id: &str) -> Result<Vec<(Notice, String)>, StoreError> {
        self.inner.dead_letters(tenant, id)
    }
    fn notice_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.notice_watch()
    }
    fn record_delivery(
        &self,
        tenant: &str,
        id: &str,
        notices: u64,
        at: i64,
        error: Option<String>,
    ) {
        self.inner.record_delivery(tenant, id, notices, at, error)
    }
    fn stats(&self, tenant: &str, id: &str) -> Stats {
        self.inner.stats(tenant, id)
    }
    fn within_box(
        &self,
        tenant: &str,
        geoproperty: &str,
        bbox: GeoBox,
        visit: &mut dyn FnMut(&Arc<Entity>, [f64; 2]) -> bool,
    ) {
        self.inner.within_box(tenant, geoproperty, bbox, visit)
    }
    fn changes(&self) -> tokio::sync::broadcast::Receiver<ChangeBatch> {
        self.inner.changes()
    }
    fn history(
        &self,
        tenant: &str,
        id: &str,
        request: &HistoryRequest,
    ) -> Result<Option<EntityHistory>, StoreError> {
        self.inner.history(tenant, id, request)
    }
    fn history_entities(
        &self,
        tenant: &str,
        types: Option<&[String]>,
    ) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        self.inner.history_entities(tenant, types)
    }
    fn write_history(
        &self,
        tenant: &str,
        op: HistoryOp,
    ) -> BoxFuture<'static, Result<HistoryOutcome, StoreError>> {
        self.inner.write_history(tenant, op)
    }
    fn import_history(
        &self,
        tenant: &str,
        series: Vec<ImportSeries>,
    ) -> BoxFuture<'static, Result<ImportCounts, StoreError>> {
        self.inner.import_history(tenant, series)
    }
    fn set_retention(
        &self,
        tenant: &str,
        retention: Retention,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        self.inner.set_retention(tenant, retention)
    }
    fn retention(&self, tenant: &str) -> Result<Retention, StoreError> {
        self.inner.retention(tenant)
    }
    fn maintain_history(&self) -> BoxFuture<'static, Result<u64, StoreError>> {
        self.inner.maintain_history()
    }
    fn health(&self) -> borough_store::StoreHealth {
        self.inner.health()
    }
    fn lease(&self, name: &str, ttl: std::time::Duration) -> Result<bool, StoreError> {
        self.inner.lease(name, ttl)
    }
    fn close(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        self.inner.close()
    }
}
