//! Device commands: a durable queue with the lifecycle
//! queued → sent → acknowledged | failed | expired.
//!
//! Every state change is written to the device store before it is visible,
//! and mirrored on the device's entity as `{command}_status` and
//! `{command}_info` (as FIWARE IoT agents do), through the same entity write
//! as any update, so history and subscriptions see it. A command for a device
//! that is not connected stays queued until it connects (or picks it up over
//! HTTP); a sent command not acknowledged within the ack timeout is sent
//! again, up to the attempt limit; a command past its TTL expires. A device
//! has at most `max_open_per_device` open (queued or sent) commands; a new one
//! beyond that is refused with 429.

use crate::{Devices, Entry};
use borough_core::entity::{AttrKind, Attribute, Entity};
use borough_core::validate::{format_datetime, now_micros};
use borough_core::{EntityOp, NgsiError, ProblemKind};
use borough_store::{RecordChange, RecordKind, StoredRecord};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Sent,
    Acknowledged,
    Failed,
    Expired,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Sent => "sent",
            Self::Acknowledged => "acknowledged",
            Self::Failed => "failed",
            Self::Expired => "expired",
        }
    }

    pub fn finished(self) -> bool {
        matches!(self, Self::Acknowledged | Self::Failed | Self::Expired)
    }
}

/// One command, as stored. Times are microseconds since the epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Command {
    pub id: String,
    pub device_id: String,
    pub name: String,
    pub value: Value,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<i64>,
    pub updated_at: i64,
    /// What the device answered, or why the command failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Value>,
}

impl Command {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "deviceId": self.device_id,
            "name": self.name,
            "value": self.value,
            "status": self.status.name(),
            "idempotencyKey": self.idempotency_key,
            "createdAt": format_datetime(self.created_at),
            "expiresAt": format_datetime(self.expires_at),
            "attempts": self.attempts,
            "sentAt": self.sent_at.map(format_datetime),
            "updatedAt": format_datetime(self.updated_at),
            "info": self.info,
        })
    }

    /// What the device receives on its `cmd` topic (or from the HTTP pick-up).
    pub fn message(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "value": self.value,
            "expiresAt": format_datetime(self.expires_at),
        })
    }

    fn record(&self, tenant: &str) -> RecordChange {
        RecordChange {
            kind: RecordKind::Command,
            tenant: tenant.to_string(),
            key: format!("{}/{}", self.device_id, self.id),
            value: serde_json::to_vec(self).ok(),
        }
    }
}

/// Hands a command message to a connected device.
pub trait CommandSink: Send + Sync {
    /// Sends now; false if the device cannot be reached (not connected).
    fn deliver(&self, tenant: &str, device: &str, message: Bytes) -> bool;
}

type DeviceKey = (String, String);

/// Every device's commands, in creation order.
pub struct CommandQueue {
    by_device: Mutex<HashMap<DeviceKey, Vec<Command>>>,
    sink: RwLock<Option<Arc<dyn CommandSink>>>,
    /// One delivery pass at a time, so that a command is not sent twice at once.
    delivering: tokio::sync::Mutex<()>,
    /// Open-command slots held by NGSI-LD writes that will queue commands once
    /// committed (see [`Slots`]). Locked after `by_device`, never before.
    reserved: Mutex<HashMap<DeviceKey, usize>>,
}

/// Open-command slots of one device, held from the check before an NGSI-LD
/// write until its commands are queued, so that concurrent writes cannot
/// together pass the bound. Released when dropped.
pub(crate) struct Slots {
    devices: Arc<Devices>,
    key: DeviceKey,
    n: usize,
}

impl Drop for Slots {
    fn drop(&mut self) {
        let mut r = self
            .devices
            .commands
            .reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(held) = r.get_mut(&self.key) {
            *held = held.saturating_sub(self.n);
            if *held == 0 {
                r.remove(&self.key);
            }
        }
    }
}

fn open_count(list: &[Command]) -> usize {
    list.iter().filter(|c| !c.status.finished()).count()
}

fn too_many(device: &str, waiting: usize) -> NgsiError {
    NgsiError::new(
        ProblemKind::TooManyRequests,
        format!(
            "device '{device}' has {waiting} commands waiting (queued or sent); \
             let it catch up, or let some expire or fail, before sending more"
        ),
    )
}

/// A request to send a command.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CommandInput {
    pub name: String,
    #[serde(default)]
    pub value: Value,
    /// Lifetime in seconds; the configured default when absent.
    pub ttl: Option<u64>,
    pub idempotency_key: Option<String>,
}

/// A state change to persist and mirror on the entity.
struct Changed {
    tenant: String,
    command: Command,
    forget: Vec<RecordChange>,
}

impl CommandQueue {
    pub(crate) fn load(rows: Vec<StoredRecord>) -> Result<Self, String> {
        let mut by_device: HashMap<DeviceKey, Vec<Command>> = HashMap::new();
        for (tenant, key, bytes) in rows {
            let c: Command = serde_json::from_slice(&bytes)
                .map_err(|e| format!("command '{key}' of tenant '{tenant}' cannot be read: {e}"))?;
            by_device
                .entry((tenant, c.device_id.clone()))
                .or_default()
                .push(c);
        }
        for list in by_device.values_mut() {
            list.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        }
        Ok(Self {
            by_device: Mutex::new(by_device),
            sink: RwLock::new(None),
            delivering: tokio::sync::Mutex::new(()),
            reserved: Mutex::new(HashMap::new()),
        })
    }

    /// Sets where commands are delivered (the embedded broker or an external one).
    pub fn set_sink(&self, sink: Arc<dyn CommandSink>) {
        *self.sink.write().unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }

    fn sink(&self) -> Option<Arc<dyn CommandSink>> {
        self.sink.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Devices that have queued commands.
    pub fn devices_with_queued(&self) -> Vec<(String, String)> {
        self.by_device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, l)| l.iter().any(|c| c.status == Status::Queued))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// A device's commands, oldest first.
    pub fn list(&self, tenant: &str, device: &str) -> Vec<Command> {
        self.by_device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(tenant.to_string(), device.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    pub fn get(&self, tenant: &str, device: &str, id: &str) -> Option<Command> {
        self.list(tenant, device).into_iter().find(|c| c.id == id)
    }

    /// Drops a deleted device's commands; returns the record deletions.
    pub(crate) fn forget_device(&self, tenant: &str, device: &str) -> Vec<RecordChange> {
        let removed = self
            .by_device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(tenant.to_string(), device.to_string()))
            .unwrap_or_default();
        removed
            .iter()
            .map(|c| RecordChange {
                value: None,
                ..c.record(tenant)
            })
            .collect()
    }

    /// Open commands of a device plus the slots held for it; call with
    /// `by_device` locked, so that the count and what follows are one step.
    fn waiting(&self, key: &DeviceKey, list: &[Command]) -> usize {
        let held = self
            .reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0);
        open_count(list) + held
    }

    /// Changes a command's state under the lock; returns what to persist.
    fn change(
        &self,
        tenant: &str,
        device: &str,
        keep_finished: usize,
        f: impl FnOnce(&mut Vec<Command>) -> Option<usize>,
    ) -> Option<Changed> {
        let mut map = self.by_device.lock().unwrap_or_else(|e| e.into_inner());
        let list = map
            .entry((tenant.to_string(), device.to_string()))
            .or_default();
        let i = f(list)?;
        let command = list.get(i)?.clone();
        // Keep only the newest finished commands.
        let mut forget = Vec::new();
        let finished = list.iter().filter(|c| c.status.finished()).count();
        if finished > keep_finished {
            let mut extra = finished - keep_finished;
            list.retain(|c| {
                if extra > 0 && c.status.finished() && c.id != command.id {
                    extra -= 1;
                    forget.push(RecordChange {
                        value: None,
                        ..c.record(tenant)
                    });
                    false
                } else {
                    true
                }
            });
        }
        Some(Changed {
            tenant: tenant.to_string(),
            command,
            forget,
        })
    }
}

fn random_id() -> String {
    let mut b = [0u8; 12];
    if getrandom::fill(&mut b).is_err() {
        // Unique enough without randomness: the clock.
        return format!("{:x}", now_micros());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Devices {
    /// Persists command changes (with `stored`, the commands' own records
    /// are committed already), mirrors them on the entities and counts them.
    async fn commit_commands(&self, changes: Vec<Changed>, stored: bool) -> Result<(), NgsiError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut records = Vec::new();
        for c in &changes {
            if !stored {
                records.push(c.command.record(&c.tenant));
            }
            records.extend(c.forget.iter().cloned());
        }
        self.persist(records)
            .await
            .map_err(|e| NgsiError::internal(e.to_string()))?;
        let mut by_tenant: HashMap<&str, Vec<EntityOp>> = HashMap::new();
        for c in &changes {
            self.metrics
                .commands
                .with_label_values(&[c.command.status.name()])
                .inc();
            if let Some(entry) = self.get(&c.tenant, &c.command.device_id) {
                by_tenant
                    .entry(c.tenant.as_str())
                    .or_default()
                    .push(self.status_op(&entry, &c.command));
            }
        }
        for (tenant, ops) in by_tenant {
            if let Err(e) = self.store.write(tenant, ops).await {
                tracing::error!(error = %e, "a command status could not be written to its entity");
            }
        }
        Ok(())
    }

    /// The upsert that shows a command's state on the device's entity.
    fn status_op(&self, entry: &Entry, c: &Command) -> EntityOp {
        let now = now_micros();
        let attr = |value: Value| Attribute {
            kind: AttrKind::Property,
            value,
            dataset_id: None,
            observed_at: Some(now),
            unit_code: None,
            object_type: None,
            sub: Default::default(),
            created_at: 0,
            modified_at: 0,
        };
        let mut attrs = indexmap::IndexMap::new();
        attrs.insert(
            self.ctx.expand(&format!("{}_status", c.name)).into_owned(),
            vec![attr(json!(c.status.name()))],
        );
        attrs.insert(
            self.ctx.expand(&format!("{}_info", c.name)).into_owned(),
            vec![attr(json!({"commandId": c.id, "info": c.info}))],
        );
        EntityOp::Upsert {
            entity: Entity {
                id: entry.device.entity_id.clone(),
                types: vec![self.ctx.expand(&entry.device.entity_type).into_owned()],
                scopes: Vec::new(),
                attrs,
                created_at: 0,
                modified_at: 0,
            },
            replace: false,
        }
    }

    /// Holds `n` open-command slots of a device for a write that will queue
    /// that many commands once committed; refused (429) if the device has no
    /// room for them.
    pub(crate) fn reserve_commands(
        self: &Arc<Self>,
        tenant: &str,
        device: &str,
        n: usize,
    ) -> Result<Slots, NgsiError> {
        let key = (tenant.to_string(), device.to_string());
        let map = self
            .commands
            .by_device
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let waiting = self
            .commands
            .waiting(&key, map.get(&key).map_or(&[][..], Vec::as_slice));
        if waiting + n > self.config.max_open_per_device {
            return Err(too_many(device, waiting));
        }
        *self
            .commands
            .reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default() += n;
        Ok(Slots {
            devices: self.clone(),
            key,
            n,
        })
    }

    /// Queues a command (durably) and delivers it if the device is connected.
    /// With an idempotency key already used for this device, returns the
    /// existing command and `false`. A device with its bound of open commands
    /// gets no more: 429.
    pub async fn send_command(
        &self,
        tenant: &str,
        device: &str,
        input: CommandInput,
    ) -> Result<(Command, bool), NgsiError> {
        self.queue_command(tenant, device, input, None).await
    }

    /// [`Devices::send_command`], within slots reserved beforehand (then the
    /// bound was checked when they were taken).
    /// Checks a command and builds it, queued, without queueing it yet.
    fn prepare_command(
        &self,
        tenant: &str,
        device: &str,
        input: &CommandInput,
    ) -> Result<Command, NgsiError> {
        let entry = self
            .get(tenant, device)
            .ok_or_else(|| NgsiError::not_found(format!("device '{device}' does not exist")))?;
        if !entry.device.has_command(&input.name) {
            return Err(NgsiError::bad_data(format!(
                "device '{device}' has no command '{}'",
                input.name
            )));
        }
        if let Some(k) = &input.idempotency_key
            && (k.is_empty() || k.len() > 256)
        {
            return Err(NgsiError::bad_data(
                "an idempotency key has 1 to 256 characters",
            ));
        }
        borough_core::validate::check_depth(&input.value)?;
        let now = now_micros();
        let ttl = input
            .ttl
            .map(std::time::Duration::from_secs)
            .unwrap_or(self.config.command_ttl);
        let ttl_micros = i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX);
        Ok(Command {
            id: random_id(),
            device_id: device.to_string(),
            name: input.name.clone(),
            value: input.value.clone(),
            status: Status::Queued,
            idempotency_key: input.idempotency_key.clone(),
            created_at: now,
            expires_at: now.saturating_add(ttl_micros),
            attempts: 0,
            sent_at: None,
            updated_at: now,
            info: None,
        })
    }

    /// A command set through an NGSI-LD write of its attribute, with the
    /// record to commit in that write's transaction (see `CommandingStore`).
    pub(crate) fn command_for_write(
        &self,
        tenant: &str,
        device: &str,
        input: &CommandInput,
    ) -> Result<(Command, RecordChange), NgsiError> {
        let command = self.prepare_command(tenant, device, input)?;
        let record = command.record(tenant);
        Ok((command, record))
    }

    /// Takes in a command record another node sharing the store wrote: the
    /// queue here mirrors it, and a device connected here gets it.
    pub(crate) async fn follow_command(&self, change: &RecordChange) {
        let Some((device, id)) = change.key.split_once('/') else {
            return;
        };
        let key = (change.tenant.clone(), device.to_string());
        let command = match change
            .value
            .as_deref()
            .map(serde_json::from_slice::<Command>)
        {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                tracing::error!(device, command = id, error = %e, "a followed command record is unreadable");
                return;
            }
            None => None,
        };
        let queued = command.as_ref().is_some_and(|c| c.status == Status::Queued);
        {
            let mut by_device = self
                .commands
                .by_device
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let list = by_device.entry(key).or_default();
            list.retain(|c| c.id != id);
            if let Some(c) = command {
                list.push(c);
                list.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
            }
        }
        if queued {
            self.deliver_pending(&change.tenant, device).await;
        }
    }

    /// Takes in a command whose record was committed with the write that set
    /// it: queues it in memory, mirrors its state and delivers it.
    pub(crate) async fn adopt_command(&self, tenant: &str, device: &str, command: Command) {
        let changed = self
            .commands
            .change(tenant, device, self.config.keep_finished, |list| {
                list.push(command);
                Some(list.len() - 1)
            });
        if let Some(changed) = changed
            && let Err(e) = self.commit_commands(vec![changed], true).await
        {
            tracing::error!(error = %e.detail, device, "a command's state could not be written");
        }
        self.deliver_pending(tenant, device).await;
    }

    pub(crate) async fn queue_command(
        &self,
        tenant: &str,
        device: &str,
        input: CommandInput,
        slots: Option<&Slots>,
    ) -> Result<(Command, bool), NgsiError> {
        let prepared = self.prepare_command(tenant, device, &input)?;
        let mut existing = None;
        let mut full = None;
        let key = (tenant.to_string(), device.to_string());
        let changed = self
            .commands
            .change(tenant, device, self.config.keep_finished, |list| {
                if let Some(k) = &input.idempotency_key
                    && let Some(c) = list.iter().find(|c| c.idempotency_key.as_ref() == Some(k))
                {
                    existing = Some(c.clone());
                    return None;
                }
                if slots.is_none() {
                    let waiting = self.commands.waiting(&key, list);
                    if waiting >= self.config.max_open_per_device {
                        full = Some(waiting);
                        return None;
                    }
                }
                list.push(prepared);
                Some(list.len() - 1)
            });
        if let Some(c) = existing {
            return Ok((c, false));
        }
        if let Some(waiting) = full {
            return Err(too_many(device, waiting));
        }
        let Some(changed) = changed else {
            return Err(NgsiError::internal("the command was not queued"));
        };
        let command = changed.command.clone();
        self.commit_commands(vec![changed], false).await?;
        self.deliver_pending(tenant, device).await;
        let now_state = self.commands.get(tenant, device, &command.id);
        Ok((now_state.unwrap_or(command), true))
    }

    /// Sends a device's queued commands, if it can be reached.
    pub async fn deliver_pending(&self, tenant: &str, device: &str) {
        let Some(sink) = self.commands.sink() else {
            return;
        };
        let _one_at_a_time = self.commands.delivering.lock().await;
        let now = now_micros();
        let queued: Vec<Command> = self
            .commands
            .list(tenant, device)
            .into_iter()
            .filter(|c| c.status == Status::Queued && c.expires_at > now)
            .collect();
        let mut changes = Vec::new();
        for c in queued {
            let message = Bytes::from(c.message().to_string());
            if !sink.deliver(tenant, device, message) {
                break;
            }
            if let Some(ch) = self.mark_sent(tenant, device, &c.id, now) {
                changes.push(ch);
            }
        }
        if let Err(e) = self.commit_commands(changes, false).await {
            tracing::error!(error = %e.detail, "command state could not be stored");
        }
    }

    fn mark_sent(&self, tenant: &str, device: &str, id: &str, now: i64) -> Option<Changed> {
        self.commands
            .change(tenant, device, self.config.keep_finished, |list| {
                let i = list.iter().position(|c| c.id == id)?;
                let c = &mut list[i];
                if c.status.finished() {
                    return None;
                }
                c.status = Status::Sent;
                c.attempts += 1;
                c.sent_at = Some(now);
                c.updated_at = now;
                Some(i)
            })
    }

    /// Queued commands handed to a device that polls over HTTP; they are sent now.
    pub async fn pick_up(&self, tenant: &str, device: &str) -> Result<Vec<Command>, NgsiError> {
        let now = now_micros();
        let mut changes = Vec::new();
        for c in self.commands.list(tenant, device) {
            if c.status == Status::Queued
                && c.expires_at > now
                && let Some(ch) = self.mark_sent(tenant, device, &c.id, now)
            {
                changes.push(ch);
            }
        }
        let sent: Vec<Command> = changes.iter().map(|c| c.command.clone()).collect();
        self.commit_commands(changes, false).await?;
        Ok(sent)
    }

    /// A device's answer to a command: acknowledged (`ok`) or failed.
    /// Answers to finished or unknown commands are ignored (false).
    pub async fn acknowledge(
        &self,
        tenant: &str,
        device: &str,
        id: &str,
        ok: bool,
        info: Option<Value>,
    ) -> Result<bool, NgsiError> {
        let now = now_micros();
        let changed = self
            .commands
            .change(tenant, device, self.config.keep_finished, |list| {
                let i = list.iter().position(|c| c.id == id)?;
                let c = &mut list[i];
                if c.status.finished() {
                    return None;
                }
                c.status = if ok {
                    Status::Acknowledged
                } else {
                    Status::Failed
                };
                c.info = info;
                c.updated_at = now;
                Some(i)
            });
        match changed {
            Some(ch) => {
                self.commit_commands(vec![ch], false).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Handles a `cmdack` message: `{"id": …, "status": "ok"|"error", "info": …}`.
    pub async fn command_ack_message(&self, transport: &str, entry: &Entry, payload: &[u8]) {
        let parsed: Option<(String, bool, Option<Value>)> =
            serde_json::from_slice::<Value>(payload).ok().and_then(|v| {
                let id = v.get("id")?.as_str()?.to_string();
                let ok = !matches!(
                    v.get("status").and_then(Value::as_str),
                    Some("error" | "failed" | "fail")
                );
                Some((id, ok, v.get("info").cloned()))
            });
        let Some((id, ok, info)) = parsed else {
            self.metrics.reject(
                transport,
                "bad_ack",
                &entry.tenant,
                &entry.device.id,
                "a command acknowledgement must be {\"id\": …, \"status\": \"ok\"|\"error\"}",
            );
            return;
        };
        match self
            .acknowledge(&entry.tenant, &entry.device.id, &id, ok, info)
            .await
        {
            Ok(true) => {}
            Ok(false) => self.metrics.reject(
                transport,
                "unknown_command",
                &entry.tenant,
                &entry.device.id,
                &format!("no open command '{id}'"),
            ),
            Err(e) => {
                tracing::error!(error = %e.detail, "a command acknowledgement was not stored")
            }
        }
    }

    /// Expires old commands and resends or fails unacknowledged ones.
    pub async fn sweep_commands(&self) {
        let now = now_micros();
        let ack_timeout = i64::try_from(self.config.ack_timeout.as_micros()).unwrap_or(i64::MAX);
        let mut changes = Vec::new();
        let mut resend: Vec<(String, String)> = Vec::new();
        let keys: Vec<DeviceKey> = self
            .commands
            .by_device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        for (tenant, device) in keys {
            for c in self.commands.list(&tenant, &device) {
                if c.status.finished() {
                    continue;
                }
                let timed_out = c.status == Status::Sent
                    && c.sent_at
                        .is_some_and(|s| now.saturating_sub(s) >= ack_timeout);
                let (status, info) = if c.expires_at <= now {
                    (
                        Status::Expired,
                        json!("the command expired before it was acknowledged"),
                    )
                } else if timed_out && c.attempts >= self.config.max_attempts {
                    (
                        Status::Failed,
                        json!(format!("no acknowledgement after {} attempts", c.attempts)),
                    )
                } else if timed_out {
                    (Status::Queued, Value::Null)
                } else {
                    if c.status == Status::Queued
                        && !resend.contains(&(tenant.clone(), device.clone()))
                    {
                        resend.push((tenant.clone(), device.clone()));
                    }
                    continue;
                };
                let changed =
                    self.commands
                        .change(&tenant, &device, self.config.keep_finished, |list| {
                            let i = list.iter().position(|x| x.id == c.id)?;
                            let x = &mut list[i];
                            x.status = status;
                            if !info.is_null() {
                                x.info = Some(info);
                            }
                            x.updated_at = now;
                            Some(i)
                        });
                if let Some(ch) = changed {
                    changes.push(ch);
                }
                if status == Status::Queued && !resend.contains(&(tenant.clone(), device.clone())) {
                    resend.push((tenant.clone(), device.clone()));
                }
            }
        }
        if let Err(e) = self.commit_commands(changes, false).await {
            tracing::error!(error = %e.detail, "command state could not be stored");
        }
        for (tenant, device) in resend {
            self.deliver_pending(&tenant, &device).await;
        }
    }
}

/// Runs [`Devices::sweep_commands`] every sweep interval while the devices layer lives.
pub(crate) async fn run_sweeper(devices: Weak<Devices>) {
    loop {
        let Some(interval) = devices.upgrade().map(|d| d.config.sweep_interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(d) = devices.upgrade() else {
            return;
        };
        // Among nodes sharing a store one sweeps (timeouts, expiry, retries);
        // a command it queues again reaches the node its device is on.
        let store = d.store.clone();
        let lease = interval.saturating_mul(3);
        let holds =
            tokio::task::spawn_blocking(move || store.lease("device-command-sweeps", lease))
                .await
                .is_ok_and(|held| held.unwrap_or(false));
        if holds {
            d.sweep_commands().await;
        }
    }
}
