//! The device registry and command queue: records in their own redb tables
//! of the same database, each change its own write transaction with
//! `Durability::Immediate` (as hosted `@context` documents are). They never
//! pass through the entity writer thread, so a command's state change does
//! not wait behind a large ingest group.

use crate::{RedbBackend, io};
use borough_store::{RecordChange, RecordKind, RecordStore, StoreError, StoredRecord};
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

/// (tenant, device id) → the device record.
const DEVICES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("devices");
/// (tenant, "{device id}/{command id}") → the command record.
const COMMANDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("device_commands");
/// ("", tenant name) → the tenant record.
const TENANTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tenant_records");
/// (tenant, key id) → the API key record (its secret only as a hash).
const API_KEYS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("api_keys");
/// ("", zero-padded sequence number) → an audit log entry.
const AUDIT: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("audit_log");
/// ("", name) → a server setting.
const SETTINGS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("settings");
/// (tenant, registration id) → a context source registration.
const REGISTRATIONS: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("csource_registrations");
/// (tenant, subscription id) → a subscription to registrations.
const REGISTRATION_SUBSCRIPTIONS: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("csource_subscriptions");

fn table(
    kind: RecordKind,
) -> TableDefinition<'static, (&'static str, &'static str), &'static [u8]> {
    match kind {
        RecordKind::Device => DEVICES,
        RecordKind::Command => COMMANDS,
        RecordKind::Tenant => TENANTS,
        RecordKind::ApiKey => API_KEYS,
        RecordKind::Audit => AUDIT,
        RecordKind::Setting => SETTINGS,
        RecordKind::Registration => REGISTRATIONS,
        RecordKind::RegistrationSubscription => REGISTRATION_SUBSCRIPTIONS,
    }
}

/// Creates the tables on first open, so that reads never miss them.
pub(crate) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    for kind in RecordKind::ALL {
        txn.open_table(table(kind)).map_err(io)?;
    }
    Ok(())
}

/// Writes record changes in `txn` (on its own, or with the entity write they belong to).
pub(crate) fn write_changes(
    txn: &WriteTransaction,
    changes: &[RecordChange],
) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let mut tables = Vec::with_capacity(RecordKind::ALL.len());
    for kind in RecordKind::ALL {
        tables.push((kind, txn.open_table(table(kind)).map_err(io)?));
    }
    for c in changes {
        let Some((_, t)) = tables.iter_mut().find(|(k, _)| *k == c.kind) else {
            continue;
        };
        let key = (c.tenant.as_str(), c.key.as_str());
        match &c.value {
            Some(v) => {
                t.insert(key, v.as_slice()).map_err(io)?;
            }
            None => {
                t.remove(key).map_err(io)?;
            }
        }
    }
    Ok(())
}

impl RecordStore for RedbBackend {
    fn write_records(&self, changes: &[RecordChange]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut txn = self.db.get()?.begin_write().map_err(io)?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(io)?;
        write_changes(&txn, changes)?;
        txn.commit().map_err(io)
    }

    fn records(&self, kind: RecordKind) -> Result<Vec<StoredRecord>, StoreError> {
        let read = self.db.get()?.begin_read().map_err(io)?;
        let t = read.open_table(table(kind)).map_err(io)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(io)? {
            let (k, v) = row.map_err(io)?;
            let (tenant, key) = k.value();
            out.push((tenant.to_string(), key.to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn records_page(
        &self,
        kind: RecordKind,
        tenant: &str,
        after: Option<&str>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let read = self.db.get()?.begin_read().map_err(io)?;
        let t = read.open_table(table(kind)).map_err(io)?;
        let mut out = Vec::new();
        let mut push = |row: Result<_, redb::StorageError>| -> Result<bool, StoreError> {
            let (k, v): (redb::AccessGuard<(&str, &str)>, redb::AccessGuard<&[u8]>) =
                row.map_err(io)?;
            let (tenant, key) = k.value();
            out.push((tenant.to_string(), key.to_string(), v.value().to_vec()));
            Ok(out.len() < limit)
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        if reverse {
            let range = match after {
                Some(a) => t.range((tenant, "")..(tenant, a)).map_err(io)?,
                None => t.range((tenant, "")..=(tenant, "\u{10FFFF}")).map_err(io)?,
            };
            for row in range.rev() {
                if !push(row)? {
                    break;
                }
            }
        } else {
            let range = match after {
                Some(a) => t
                    .range::<(&str, &str)>((
                        std::ops::Bound::Excluded((tenant, a)),
                        std::ops::Bound::Included((tenant, "\u{10FFFF}")),
                    ))
                    .map_err(io)?,
                None => t.range((tenant, "")..=(tenant, "\u{10FFFF}")).map_err(io)?,
            };
            for row in range {
                if !push(row)? {
                    break;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::open;

    #[test]
    fn passes_the_device_record_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        borough_store::testsuite::device_records(&store);
    }

    #[test]
    fn passes_the_record_page_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        borough_store::testsuite::record_pages(&store);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn device_records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let store = open(&path).unwrap();
        borough_store::testsuite::device_records_survive_reopen(store, || open(&path).unwrap())
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn linked_records_commit_with_their_operation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let store = open(&path).unwrap();
        borough_store::testsuite::linked_records_commit_with_their_operation(store, || {
            open(&path).unwrap()
        })
        .await;
    }
}
