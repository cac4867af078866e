//! The writer thread: group commit.
//!
//! Writes queue up while a group commits; the next group takes all of them
//! (up to [`MAX_GROUP_OPS`] operations), so one durable commit answers many
//! callers. Subscription changes, delivered notices and history jobs are
//! ordered with the writes: the writes queued before them commit first.

use crate::subscriptions::match_change;
use crate::{
    Backend, Committed, DoneNotices, FOLLOW_EVERY, Recorded, Shared, Staged, WriteSet, io,
};
use borough_core::Entity;
use borough_core::EntityOp;
use borough_core::ops::{Change, apply};
use borough_core::subscription::{CompiledSubscription, SubscriptionRecord};
use borough_core::temporal::{HistoryOp, HistoryOutcome, ImportSeries, Retention};
use borough_store::{
    Clock, ImportCounts, Notice, RecordChange, StoreError, WriteResults, WriterState,
};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Most operations committed in one transaction; a larger backlog waits for the next.
const MAX_GROUP_OPS: usize = 20_000;
/// How often maintenance (compacting history, retention) runs.
const MAINTENANCE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);
/// Times a group is applied again after other nodes changed its entities
/// first, before its writes fail.
const STALE_ATTEMPTS: usize = 16;

pub(crate) struct WriteJob {
    pub tenant: String,
    pub ops: Vec<EntityOp>,
    /// Record changes committed with the operation of their index, if it succeeds.
    pub linked: Vec<(usize, RecordChange)>,
    pub reply: oneshot::Sender<Result<WriteResults, StoreError>>,
}

/// One write of a group, as the writer applies it.
type GroupWrite = (String, Vec<EntityOp>, Vec<(usize, RecordChange)>);

/// A change to subscriptions or to the outbox.
pub(crate) enum MetaOp {
    PutSubscription(String, Box<SubscriptionRecord>, borough_store::Expect),
    DeleteSubscription(String, String),
    NoticesDone(Vec<(u64, Notice)>, Option<String>),
}

/// A change to history alone, ordered with the writes.
pub(crate) enum HistoryJob {
    Op(
        String,
        HistoryOp,
        oneshot::Sender<Result<HistoryOutcome, StoreError>>,
    ),
    Import(
        String,
        Vec<ImportSeries>,
        oneshot::Sender<Result<ImportCounts, StoreError>>,
    ),
    SetRetention(String, Retention, oneshot::Sender<Result<(), StoreError>>),
    /// Compacts history and applies retention; answers the instances removed.
    Maintain(oneshot::Sender<Result<u64, StoreError>>),
}

impl HistoryJob {
    /// Answers the job's caller with an error, the job not run.
    fn refuse(self, e: StoreError) {
        match self {
            HistoryJob::Op(_, _, reply) => drop(reply.send(Err(e))),
            HistoryJob::Import(_, _, reply) => drop(reply.send(Err(e))),
            HistoryJob::SetRetention(_, _, reply) => drop(reply.send(Err(e))),
            HistoryJob::Maintain(reply) => drop(reply.send(Err(e))),
        }
    }
}

pub(crate) enum Job {
    Write(WriteJob),
    Meta(MetaOp, oneshot::Sender<Result<bool, StoreError>>),
    History(HistoryJob),
    /// Takes in what other nodes committed (shared backends only).
    Follow,
    Close(oneshot::Sender<Result<(), StoreError>>),
}

/// What only the writer thread keeps.
pub(crate) struct Writer<B: Backend> {
    pub backend: Arc<B>,
    pub shared: Arc<Shared>,
    pub clock: Arc<dyn Clock>,
    /// The number of the next notice written to the outbox.
    pub next_notice: u64,
    /// Whether the last reading of other nodes' commits failed.
    pub follow_failing: bool,
    /// Set while a request to follow waits in the queue.
    pub follow_queued: Arc<std::sync::atomic::AtomicBool>,
}

/// Starts the writer thread, and the thread that asks it for maintenance.
pub(crate) fn spawn<B: Backend>(
    receiver: mpsc::Receiver<Job>,
    sender: mpsc::Sender<Job>,
    w: Writer<B>,
) -> Result<std::thread::JoinHandle<()>, StoreError> {
    let follows = w.backend.shared();
    let follow_queued = w.follow_queued.clone();
    let writer = std::thread::Builder::new()
        .name("borough-writer".into())
        .spawn(move || run(receiver, w))
        .map_err(io)?;
    if follows {
        let sender = sender.clone();
        let queued = follow_queued.clone();
        std::thread::Builder::new()
            .name("borough-follower".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(FOLLOW_EVERY);
                    // One request waiting at a time: the writer clears the
                    // flag when it takes it.
                    if queued.swap(true, std::sync::atomic::Ordering::AcqRel) {
                        continue;
                    }
                    match sender.try_send(Job::Follow) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            queued.store(false, std::sync::atomic::Ordering::Release);
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => break,
                    }
                }
            })
            .map_err(io)?;
    }
    std::thread::Builder::new()
        .name("borough-maintenance".into())
        .spawn(move || {
            loop {
                std::thread::sleep(MAINTENANCE_EVERY);
                let (reply, _) = oneshot::channel();
                if sender
                    .blocking_send(Job::History(HistoryJob::Maintain(reply)))
                    .is_err()
                {
                    break;
                }
            }
        })
        .map_err(io)?;
    Ok(writer)
}

/// The error of a job whose answer never came: a fault in the writer (caught:
/// nothing of the job was committed), or the store closed.
pub(crate) fn dropped_answer(sender: &mpsc::Sender<Job>) -> StoreError {
    if sender.is_closed() {
        StoreError::Closed
    } else {
        StoreError::Io("the write failed inside the store and was not committed".into())
    }
}

/// The same storage error, for another caller.
fn copy(e: &StoreError) -> StoreError {
    match e {
        StoreError::Closed => StoreError::Closed,
        StoreError::Io(m) => StoreError::Io(m.clone()),
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
    }
}

impl<B: Backend> Writer<B> {
    /// Records how a backend call ended in the store's health.
    fn outcome<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Ok(_) => self.shared.set_health(WriterState::Ok, None),
            Err(e) => self
                .shared
                .set_health(WriterState::Failing, Some(e.to_string())),
        }
    }

    /// Runs one job of the writer; a panic in it is caught, its callers are
    /// answered with an error (their reply channels close), and the in-memory
    /// state is read again from the backend, which holds only what committed.
    ///
    /// When the backend is not ready, the job gets the error to answer with.
    fn guarded(&mut self, job: impl FnOnce(&mut Writer<B>, Result<(), StoreError>)) {
        if let Err(e) = self.backend.ready() {
            let known = self
                .shared
                .health
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .writer
                == WriterState::Failing;
            // Said when it starts; every job meanwhile gets the error anyway.
            if !known {
                tracing::error!(error = %e, "the storage is not available; jobs are refused");
            }
            self.shared
                .set_health(WriterState::Failing, Some(e.to_string()));
            job(self, Err(e));
            return;
        }
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(self, Ok(()))));
        if let Err(panic) = run {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            tracing::error!(panic = %what, "the writer panicked; its jobs were refused, state is reloaded");
            let reloaded = self
                .backend
                .reset()
                .and_then(|()| self.shared.load_entities(self.backend.as_ref()));
            if let Err(e) = reloaded {
                tracing::error!(error = %e, "state cannot be reloaded after a panic");
            }
            self.shared.set_health(
                WriterState::Failing,
                Some(format!("the writer panicked: {what}")),
            );
        }
    }
}

fn run<B: Backend>(mut receiver: mpsc::Receiver<Job>, mut w: Writer<B>) {
    let mut close_reply = None;
    while close_reply.is_none() {
        let Some(first) = receiver.blocking_recv() else {
            break;
        };
        let mut group = Vec::new();
        let mut ops = 0;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Write(job) => {
                    ops += job.ops.len();
                    group.push(job);
                }
                Job::Meta(op, reply) => {
                    // Keep the order: writes queued before it commit first.
                    commit_pending(&mut w, &mut group);
                    if let MetaOp::NoticesDone(..) = op {
                        // Deliveries finish in bursts: forget all that are waiting in one transaction.
                        let mut done = vec![(op, reply)];
                        loop {
                            match receiver.try_recv() {
                                Ok(Job::Meta(m @ MetaOp::NoticesDone(..), r)) => done.push((m, r)),
                                Ok(other) => {
                                    next = Some(other);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        w.guarded(|w, ready| notices_done(w, ready, done));
                    } else {
                        meta(&mut w, op, reply);
                    }
                }
                Job::History(job) => {
                    commit_pending(&mut w, &mut group);
                    w.guarded(|w, ready| history(w, ready, job));
                }
                Job::Follow => {
                    w.follow_queued
                        .store(false, std::sync::atomic::Ordering::Release);
                    commit_pending(&mut w, &mut group);
                    w.guarded(|w, ready| {
                        let followed = ready.and_then(|()| follow(w));
                        // Said once when it starts failing, and once when it is back.
                        match (&followed, w.follow_failing) {
                            (Err(e), false) => {
                                tracing::warn!(error = %e, "cannot read what other nodes committed")
                            }
                            (Ok(()), true) => {
                                tracing::info!("reading what other nodes committed again")
                            }
                            _ => {}
                        }
                        w.follow_failing = followed.is_err();
                    });
                }
                Job::Close(r) => {
                    close_reply = Some(r);
                    break;
                }
            }
            if next.is_none() && ops < MAX_GROUP_OPS {
                next = receiver.try_recv().ok();
            }
        }
        commit_pending(&mut w, &mut group);
    }
    // Refuse new writes, then finish the ones already queued.
    receiver.close();
    let mut rest = Vec::new();
    while let Ok(job) = receiver.try_recv() {
        match job {
            Job::Write(job) => rest.push(job),
            Job::Meta(op, reply) => {
                commit_pending(&mut w, &mut rest);
                meta(&mut w, op, reply);
            }
            Job::History(job) => {
                commit_pending(&mut w, &mut rest);
                w.guarded(|w, ready| history(w, ready, job));
            }
            Job::Follow => {}
            Job::Close(r) => {
                let _ = r.send(Ok(()));
            }
        }
    }
    commit_pending(&mut w, &mut rest);
    w.shared
        .set_health(WriterState::Stopped, Some("the store is closed".into()));
    drop(w);
    if let Some(r) = close_reply {
        let _ = r.send(Ok(()));
    }
}

/// Commits the writes gathered so far, if any.
fn commit_pending<B: Backend>(w: &mut Writer<B>, group: &mut Vec<WriteJob>) {
    if group.is_empty() {
        return;
    }
    let (work, replies): (Vec<_>, Vec<_>) = std::mem::take(group)
        .into_iter()
        .map(|job| ((job.tenant, job.ops, job.linked), job.reply))
        .unzip();
    let mut outcome = None;
    w.guarded(|w, ready| outcome = Some(ready.and_then(|()| commit_group(work, w))));
    // Answered here, after `guarded` has recorded the writer's health.
    match outcome {
        Some(Ok(results)) => {
            for (reply, results) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(results));
            }
        }
        Some(Err(e)) => {
            for reply in replies {
                let _ = reply.send(Err(copy(&e)));
            }
        }
        None => {
            for reply in replies {
                let _ = reply.send(Err(StoreError::Io(
                    "the write failed inside the store and was not committed".into(),
                )));
            }
        }
    }
}

fn meta<B: Backend>(
    w: &mut Writer<B>,
    op: MetaOp,
    reply: oneshot::Sender<Result<bool, StoreError>>,
) {
    w.guarded(|w, ready| {
        let result = ready.and_then(|()| {
            let now = w.clock.now_micros();
            let result = apply_meta(w, op, now);
            w.outcome(&result);
            result
        });
        let _ = reply.send(result);
    });
}

/// Applies one change of subscriptions or of the outbox; false when a
/// subscription write did not find what it expected.
fn apply_meta<B: Backend>(w: &Writer<B>, op: MetaOp, now: i64) -> Result<bool, StoreError> {
    let registry = &w.shared.subscriptions;
    match op {
        MetaOp::PutSubscription(tenant, record, expect) => {
            // Checked here, on the writer: no other change of subscriptions
            // can come between this check and the write.
            let current = registry
                .tenant(&tenant)
                .and_then(|t| t.by_id.get(&record.id).map(|s| s.record.modified_at));
            let expected = match expect {
                borough_store::Expect::Absent => current.is_none(),
                borough_store::Expect::ModifiedAt(at) => current == Some(at),
            };
            if !expected {
                return Ok(false);
            }
            w.backend.put_subscription(&tenant, &record)?;
            let id = record.id.clone();
            let compiled = CompiledSubscription::compile(*record, now, false)
                .map_err(|e| io(e.to_string()))?;
            registry.set(&tenant, &id, Some(Arc::new(compiled)));
            Ok(true)
        }
        MetaOp::DeleteSubscription(tenant, id) => {
            let existed = w.backend.delete_subscription(&tenant, &id)?;
            registry.set(&tenant, &id, None);
            Ok(existed)
        }
        MetaOp::NoticesDone(notices, dead) => {
            w.backend.notices_done(&[DoneNotices {
                notices: &notices,
                dead: dead.as_deref(),
            }])?;
            for (_, n) in &notices {
                registry.pending(&n.tenant, &n.subscription, -1);
            }
            Ok(true)
        }
    }
}

/// Forgets several batches of delivered notices in one transaction and answers each.
fn notices_done<B: Backend>(
    w: &mut Writer<B>,
    ready: Result<(), StoreError>,
    done: Vec<(MetaOp, oneshot::Sender<Result<bool, StoreError>>)>,
) {
    let batches: Vec<DoneNotices> = done
        .iter()
        .filter_map(|(op, _)| match op {
            MetaOp::NoticesDone(notices, dead) => Some(DoneNotices {
                notices,
                dead: dead.as_deref(),
            }),
            _ => None,
        })
        .collect();
    let result = ready.and_then(|()| w.backend.notices_done(&batches));
    w.outcome(&result);
    for (op, reply) in done {
        if result.is_ok()
            && let MetaOp::NoticesDone(notices, _) = &op
        {
            for (_, n) in notices {
                w.shared
                    .subscriptions
                    .pending(&n.tenant, &n.subscription, -1);
            }
        }
        let _ = reply.send(result.as_ref().map(|()| true).map_err(copy));
    }
}

type Key = (String, String);

/// Applies a group of writes to the latest state, has the backend commit
/// them in one transaction, then publishes the new state; answers each
/// write's results. Over a shared backend a group that another node got to
/// first is applied again once this node has caught up.
fn commit_group<B: Backend>(
    group: Vec<GroupWrite>,
    w: &mut Writer<B>,
) -> Result<Vec<WriteResults>, StoreError> {
    if !w.backend.shared() {
        return try_group(group, w)?
            .ok_or_else(|| io("the storage refused the group as stale, yet it is not shared"));
    }
    for _ in 0..STALE_ATTEMPTS {
        let tried = try_group(group.clone(), w).and_then(|answers| {
            if answers.is_none() {
                follow(w)?;
            }
            Ok(answers)
        });
        match tried {
            Ok(Some(answers)) => return Ok(answers),
            Ok(None) => {}
            Err(e) => {
                w.backend.abandon_stale();
                return Err(e);
            }
        }
    }
    w.backend.abandon_stale();
    Err(StoreError::Unavailable(format!(
        "the write lost {STALE_ATTEMPTS} races with other nodes changing the same entities; try again"
    )))
}

/// Takes in what other nodes committed: entities into the state and the
/// change feed, subscriptions into the registry. Their notices and history
/// were written by the node that committed them.
fn follow<B: Backend>(w: &Writer<B>) -> Result<(), StoreError> {
    let followed = w.backend.follow()?;
    if followed.is_empty() {
        return Ok(());
    }
    let now = w.clock.now_micros();
    for (tenant, id, record) in followed.subscriptions {
        match record {
            Some(r) => w.shared.subscriptions.load(&tenant, r, now),
            None => w.shared.subscriptions.set(&tenant, &id, None),
        }
    }
    let mut staged: HashMap<Key, Staged> = HashMap::new();
    for (tenant, id, entity) in followed.entities {
        let entity = entity.map(|mut e| {
            e.shrink_to_fit();
            Arc::new(e)
        });
        staged.insert((tenant, id), entity);
    }
    for ((tenant, id), entity) in &staged {
        let map = w.shared.tenant_or_create(tenant);
        map.write()
            .unwrap_or_else(|e| e.into_inner())
            .put(id, entity.clone());
    }
    w.shared.feed.publish(&staged);
    if !followed.records.is_empty() {
        // Nobody listening is fine: the layers read records at start.
        let _ = w.shared.records.send(Arc::new(followed.records));
    }
    Ok(())
}

/// One try of [`commit_group`]: `None` when the backend found it stale.
fn try_group<B: Backend>(
    group: Vec<GroupWrite>,
    w: &mut Writer<B>,
) -> Result<Option<Vec<WriteResults>>, StoreError> {
    let shared = w.shared.clone();
    let shared = shared.as_ref();
    let now = w.clock.now_micros();
    let mut staged: HashMap<Key, Staged> = HashMap::new();
    let mut notices: Vec<Notice> = Vec::new();
    let mut recorded: Vec<Recorded> = Vec::new();
    let mut new_tenants: Vec<String> = Vec::new();
    let mut answers = Vec::with_capacity(group.len());
    let mut records = Vec::new();
    for (tenant, ops, linked) in group {
        let committed = shared.tenant(&tenant);
        let subscriptions = shared.subscriptions.tenant(&tenant);
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            let key = (tenant.clone(), op.entity_id().to_string());
            let current = match staged.get(&key) {
                Some(s) => s.clone(),
                None => committed.as_ref().and_then(|m| {
                    m.read()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&key.1)
                        .cloned()
                }),
            };
            match apply(op, current.as_deref(), now) {
                Ok((change, outcome)) => {
                    let after = match change {
                        Change::Put(mut e) => {
                            e.shrink_to_fit();
                            let e = Arc::new(e);
                            staged.insert(key, Some(e.clone()));
                            Some(Some(e))
                        }
                        Change::Delete => {
                            staged.insert(key, None);
                            Some(None)
                        }
                        Change::Unchanged => None,
                    };
                    if let Some(Some(after)) = &after {
                        record_history(&tenant, current.as_deref(), after, &mut recorded);
                    }
                    if let (Some(after), Some(subs)) = (after, &subscriptions) {
                        match_change(
                            subs,
                            &tenant,
                            current.as_ref(),
                            after.as_ref(),
                            now,
                            &mut notices,
                        );
                    }
                    results.push(Ok(outcome));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        for (i, record) in linked {
            if results.get(i).is_some_and(Result::is_ok) {
                records.push(record);
            }
        }
        if committed.is_none()
            && !new_tenants.contains(&tenant)
            && results.iter().any(Result::is_ok)
        {
            new_tenants.push(tenant.clone());
        }
        answers.push(results);
    }

    // A subscription with its bound of pending notices gets no more.
    let admitted = shared.subscriptions.admit(&mut notices);
    let first_notice = w.next_notice;
    let set = WriteSet {
        entities: &staged,
        new_tenants: &new_tenants,
        notices: &notices,
        first_notice,
        history: &recorded,
        records: &records,
    };
    let committed = if set.is_empty() {
        Ok(Committed::Done { first_notice })
    } else {
        w.backend.commit(&set)
    };
    w.outcome(&committed);
    let first_notice = match committed {
        Ok(Committed::Done { first_notice }) => first_notice,
        Ok(Committed::Stale) => return Ok(None),
        Err(e) => {
            tracing::error!(error = %e, "commit failed; the group's writes are rejected");
            return Err(e);
        }
    };

    // Publish: readers see the group only now that it is durable.
    let mut by_tenant: HashMap<&str, Vec<(&str, &Staged)>> = HashMap::new();
    for ((tenant, id), v) in &staged {
        by_tenant.entry(tenant).or_default().push((id, v));
    }
    for t in &new_tenants {
        shared.tenant_or_create(t);
    }
    for (tenant, changes) in by_tenant {
        let map = shared.tenant_or_create(tenant);
        let mut map = map.write().unwrap_or_else(|e| e.into_inner());
        for (id, v) in changes {
            map.put(id, v.clone());
        }
    }
    shared.feed.publish(&staged);
    shared.subscriptions.admitted(admitted);
    if !notices.is_empty() {
        w.next_notice = first_notice + notices.len() as u64;
        shared.subscriptions.watch.send_replace(w.next_notice - 1);
    }
    Ok(Some(answers))
}

/// Adds to `out` every attribute instance that `after` holds and `before` did
/// not: new, or rewritten. Operations of one group share a write time, so a
/// rewrite is told by content, not by modifiedAt alone. This is the history of a write.
fn record_history(
    tenant: &str,
    before: Option<&Entity>,
    after: &Arc<Entity>,
    out: &mut Vec<Recorded>,
) {
    let mut instances = Vec::new();
    for (a, (name, list)) in after.attrs.iter().enumerate() {
        let old = before.and_then(|b| b.attrs.get(name));
        for (i, attr) in list.iter().enumerate() {
            if !old.is_some_and(|o| o.iter().any(|x| x == attr)) {
                instances.push((a, i));
            }
        }
    }
    if !instances.is_empty() {
        out.push(Recorded {
            tenant: tenant.to_string(),
            entity: after.clone(),
            instances,
        });
    }
}

/// Runs one history job.
fn history<B: Backend>(w: &mut Writer<B>, ready: Result<(), StoreError>, job: HistoryJob) {
    if let Err(e) = ready {
        return job.refuse(e);
    }
    let shared = w.shared.clone();
    let now = w.clock.now_micros();
    let backend = w.backend.clone();
    match job {
        HistoryJob::Op(tenant, op, reply) => {
            let new_tenant = shared.tenant(&tenant).is_none();
            let result = backend.write_history(&tenant, op, now, new_tenant);
            w.outcome(&result);
            // History can be a tenant's first data: the tenant then exists.
            if matches!(result, Ok(HistoryOutcome::Created)) {
                shared.tenant_or_create(&tenant);
            }
            let _ = reply.send(result);
        }
        HistoryJob::Import(tenant, series, reply) => {
            let new_tenant = shared.tenant(&tenant).is_none();
            let result = backend.import_history(&tenant, series, now, new_tenant);
            w.outcome(&result);
            if result.is_ok() {
                shared.tenant_or_create(&tenant);
            }
            let _ = reply.send(result);
        }
        HistoryJob::SetRetention(tenant, r, reply) => {
            let result = backend.set_retention(&tenant, &r);
            w.outcome(&result);
            let _ = reply.send(result);
        }
        HistoryJob::Maintain(reply) => {
            let result = backend.maintain_history(now);
            w.outcome(&result);
            let _ = reply.send(result);
        }
    }
}
