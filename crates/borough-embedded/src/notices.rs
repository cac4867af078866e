//! The subscriptions and the notification outbox of the embedded store, in
//! redb tables: the engine matches changes and numbers the notices; they are
//! written here in the same transaction as the change, so an acknowledged
//! change never loses its notification.

use borough_core::subscription::SubscriptionRecord;
use borough_engine::{DoneNotices, OutboxState};
use borough_store::{Notice, StoreError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

/// (tenant, subscription id) → the subscription record.
pub const SUBSCRIPTIONS: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("subscriptions");
/// Sequence number → a notice not yet delivered.
pub const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// Sequence number → a notice whose delivery failed for good, with the error.
pub const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

/// Every stored subscription.
pub fn subscriptions(db: &Database) -> Result<Vec<(String, SubscriptionRecord)>, StoreError> {
    let read = db.begin_read().map_err(io)?;
    let subs = read.open_table(SUBSCRIPTIONS).map_err(io)?;
    let mut out = Vec::new();
    for row in subs.iter().map_err(io)? {
        let (key, value) = row.map_err(io)?;
        let (tenant, id) = key.value();
        let record: SubscriptionRecord = serde_json::from_slice(value.value()).map_err(|e| {
            io(format!(
                "subscription '{id}' of tenant '{tenant}' cannot be read: {e}"
            ))
        })?;
        out.push((tenant.to_string(), record));
    }
    Ok(out)
}

/// Counts the notices waiting per subscription, and finds the next number.
pub fn outbox(db: &Database) -> Result<OutboxState, StoreError> {
    let read = db.begin_read().map_err(io)?;
    let mut state = OutboxState {
        next_notice: 1,
        ..OutboxState::default()
    };
    let outbox = read.open_table(OUTBOX).map_err(io)?;
    for row in outbox.iter().map_err(io)? {
        let (seq, value) = row.map_err(io)?;
        if let Ok(n) = serde_json::from_slice::<Notice>(value.value()) {
            *state.pending.entry((n.tenant, n.subscription)).or_default() += 1;
        }
        state.next_notice = state.next_notice.max(seq.value() + 1);
    }
    let dead = read.open_table(DEAD_LETTERS).map_err(io)?;
    if let Some(row) = dead.last().map_err(io)? {
        state.next_notice = state.next_notice.max(row.0.value() + 1);
    }
    Ok(state)
}

/// Writes notices to the outbox from `next` on; returns the next free number.
pub fn write_notices(
    txn: &WriteTransaction,
    notices: &[Notice],
    mut next: u64,
) -> Result<u64, StoreError> {
    if notices.is_empty() {
        return Ok(next);
    }
    let mut table = txn.open_table(OUTBOX).map_err(io)?;
    for n in notices {
        let bytes = serde_json::to_vec(n).map_err(io)?;
        table.insert(next, bytes.as_slice()).map_err(io)?;
        next += 1;
    }
    Ok(next)
}

/// The oldest `limit` notices of the outbox numbered above `after`.
pub fn pending(db: &Database, after: u64, limit: usize) -> Result<Vec<(u64, Notice)>, StoreError> {
    let read = db.begin_read().map_err(io)?;
    let table = read.open_table(OUTBOX).map_err(io)?;
    let mut out = Vec::new();
    for row in table
        .range(after.saturating_add(1)..)
        .map_err(io)?
        .take(limit)
    {
        let (seq, value) = row.map_err(io)?;
        let notice: Notice = serde_json::from_slice(value.value()).map_err(io)?;
        out.push((seq.value(), notice));
    }
    Ok(out)
}

/// Dead-lettered notices of one subscription.
pub fn dead_letters(
    db: &Database,
    tenant: &str,
    id: &str,
) -> Result<Vec<(Notice, String)>, StoreError> {
    let read = db.begin_read().map_err(io)?;
    let table = read.open_table(DEAD_LETTERS).map_err(io)?;
    let mut out = Vec::new();
    for row in table.iter().map_err(io)? {
        let (_, value) = row.map_err(io)?;
        let (notice, error): (Notice, String) =
            serde_json::from_slice(value.value()).map_err(io)?;
        if notice.tenant == tenant && notice.subscription == id {
            out.push((notice, error));
        }
    }
    Ok(out)
}

/// Stores a subscription.
pub fn put_subscription(
    txn: &WriteTransaction,
    tenant: &str,
    record: &SubscriptionRecord,
) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(record).map_err(io)?;
    txn.open_table(SUBSCRIPTIONS)
        .map_err(io)?
        .insert((tenant, record.id.as_str()), bytes.as_slice())
        .map_err(io)?;
    Ok(())
}

/// Removes a subscription; false if it was not there.
pub fn delete_subscription(
    txn: &WriteTransaction,
    tenant: &str,
    id: &str,
) -> Result<bool, StoreError> {
    Ok(txn
        .open_table(SUBSCRIPTIONS)
        .map_err(io)?
        .remove((tenant, id))
        .map_err(io)?
        .is_some())
}

/// Removes delivered notices from the outbox; those given with an error go
/// to the dead letters with it.
pub fn done(txn: &WriteTransaction, done: &[DoneNotices<'_>]) -> Result<(), StoreError> {
    let mut outbox = txn.open_table(OUTBOX).map_err(io)?;
    let mut dead_letters = txn.open_table(DEAD_LETTERS).map_err(io)?;
    for batch in done {
        for (seq, n) in batch.notices {
            outbox.remove(*seq).map_err(io)?;
            if let Some(error) = batch.dead {
                let bytes = serde_json::to_vec(&(n, error)).map_err(io)?;
                dead_letters.insert(*seq, bytes.as_slice()).map_err(io)?;
            }
        }
    }
    Ok(())
}
