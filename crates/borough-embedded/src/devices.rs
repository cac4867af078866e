//! The device registry and command queue: records in their own redb tables
//! of the same database, each change its own write transaction with
//! `Durability::Immediate` (as hosted `@context` documents are). They never
//! pass through the entity writer thread, so a command's state change does
//! not wait behind a large ingest group.

use crate::{EmbeddedStore, io};
use borough_store::{DeviceStore, RecordChange, RecordKind, StoreError, StoredRecord};
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

/// (tenant, device id) → the device record.
const DEVICES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("devices");
/// (tenant, "{device id}/{command id}") → the command record.
const COMMANDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("device_commands");

fn table(
    kind: RecordKind,
) -> TableDefinition<'static, (&'static str, &'static str), &'static [u8]> {
    match kind {
        RecordKind::Device => DEVICES,
        RecordKind::Command => COMMANDS,
    }
}

/// Creates the tables on first open, so that reads never miss them.
pub(crate) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(DEVICES).map_err(io)?;
    txn.open_table(COMMANDS).map_err(io)?;
    Ok(())
}

impl DeviceStore for EmbeddedStore {
    fn write_records(&self, changes: &[RecordChange]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut txn = self.db.begin_write().map_err(io)?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(io)?;
        {
            let mut devices = txn.open_table(DEVICES).map_err(io)?;
            let mut commands = txn.open_table(COMMANDS).map_err(io)?;
            for c in changes {
                let t = match c.kind {
                    RecordKind::Device => &mut devices,
                    RecordKind::Command => &mut commands,
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
        }
        txn.commit().map_err(io)
    }

    fn records(&self, kind: RecordKind) -> Result<Vec<StoredRecord>, StoreError> {
        let read = self.db.begin_read().map_err(io)?;
        let t = read.open_table(table(kind)).map_err(io)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(io)? {
            let (k, v) = row.map_err(io)?;
            let (tenant, key) = k.value();
            out.push((tenant.to_string(), key.to_string(), v.value().to_vec()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::EmbeddedStore;

    #[test]
    fn passes_the_device_record_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        borough_store::testsuite::device_records(&store);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn device_records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let store = EmbeddedStore::open(&path).unwrap();
        borough_store::testsuite::device_records_survive_reopen(store, || {
            EmbeddedStore::open(&path).unwrap()
        })
        .await;
    }
}
