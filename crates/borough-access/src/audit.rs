//! The audit log: every management write and security event, appended in
//! order, each entry holding the hash of the one before it, so that an entry
//! changed or removed afterwards breaks the chain where it was (`verify`).

use crate::secret::sha256_hex;
use borough_store::{RecordChange, RecordKind, RecordStore, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;

/// The `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Most entries one read returns.
pub const MAX_PAGE: usize = 1000;
/// Most entries one filtered read looks at before it answers with a cursor.
const MAX_SCAN: usize = 100_000;

/// Something that happened, as the caller reports it.
#[derive(Clone, Debug, Default)]
pub struct AuditEvent {
    /// The tenant concerned (its public name), if any.
    pub tenant: Option<String>,
    /// Who did it: a key id, a token subject, `operator`, `anonymous`.
    pub actor: String,
    /// What: `tenant.create`, `key.revoke`, `auth.failure`, `retention.set`, …
    pub action: String,
    /// What it was done to.
    pub target: Option<String>,
    /// `ok`, `denied` or `failed`.
    pub outcome: String,
    pub detail: Value,
    /// The client's address.
    pub source: Option<String>,
}

/// One entry of the log as stored and shown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    pub seq: u64,
    /// When, in microseconds since the epoch.
    pub at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub actor: String,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub detail: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The hash of the entry before (GENESIS for the first).
    pub prev: String,
    /// SHA-256 of `prev` and this entry's other members.
    pub hash: String,
}

impl AuditEntry {
    /// The hash this entry should carry.
    pub fn compute_hash(&self) -> String {
        let mut unhashed = self.clone();
        unhashed.hash = String::new();
        // Serializing a struct of plain members is deterministic; `detail`
        // keeps its key order (serde_json's preserve_order), as stored.
        let body = serde_json::to_vec(&unhashed).unwrap_or_default();
        let mut input = Vec::with_capacity(self.prev.len() + 1 + body.len());
        input.extend_from_slice(self.prev.as_bytes());
        input.push(b'\n');
        input.extend_from_slice(&body);
        sha256_hex(&input)
    }
}

/// The key of entry `seq`: zero-padded so that key order is log order.
fn key(seq: u64) -> String {
    format!("{seq:020}")
}

/// What `verify` found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    pub entries: u64,
    pub intact: bool,
    /// The first entry whose hash or link does not hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_broken: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The hash of the last entry: keep it elsewhere to detect a cut tail.
    pub head: String,
}

pub struct AuditLog {
    records: Arc<dyn RecordStore>,
    /// (last sequence number, its hash); appends hold it while they write,
    /// so entries are chained in the order they are stored.
    head: tokio::sync::Mutex<(u64, String)>,
}

fn store_err(e: StoreError) -> String {
    format!("the audit log cannot be read or written: {e}")
}

/// Where the stored chain ends: (last sequence number, its hash).
fn read_head(records: &dyn RecordStore) -> Result<(u64, String), String> {
    let last = records
        .records_page(RecordKind::Audit, "", None, 1, true)
        .map_err(store_err)?;
    match last.first() {
        Some((_, _, bytes)) => {
            let e: AuditEntry = serde_json::from_slice(bytes)
                .map_err(|e| format!("the last audit entry is unreadable: {e}"))?;
            Ok((e.seq, e.hash))
        }
        None => Ok((0, GENESIS.to_string())),
    }
}

impl AuditLog {
    /// Opens the log over the store, reading where its chain ends. Blocking.
    pub fn open(records: Arc<dyn RecordStore>) -> Result<Self, String> {
        let head = read_head(records.as_ref())?;
        Ok(Self {
            records,
            head: tokio::sync::Mutex::new(head),
        })
    }

    /// Appends an event durably and answers the entry it became. When
    /// another node sharing the store appended first, the entry is chained
    /// after that one instead, so the log stays one chain.
    pub async fn append(&self, event: AuditEvent, at: i64) -> Result<AuditEntry, String> {
        /// Appends lost to other nodes before this one gives up.
        const ATTEMPTS: usize = 32;
        let mut head = self.head.lock().await;
        for _ in 0..ATTEMPTS {
            let mut entry = AuditEntry {
                seq: head.0 + 1,
                at,
                tenant: event.tenant.clone(),
                actor: event.actor.clone(),
                action: event.action.clone(),
                target: event.target.clone(),
                outcome: event.outcome.clone(),
                detail: event.detail.clone(),
                source: event.source.clone(),
                prev: head.1.clone(),
                hash: String::new(),
            };
            entry.hash = entry.compute_hash();
            let bytes = serde_json::to_vec(&entry).map_err(|e| e.to_string())?;
            let change = RecordChange {
                kind: RecordKind::Audit,
                tenant: String::new(),
                key: key(entry.seq),
                value: Some(bytes),
            };
            let records = self.records.clone();
            let appended = tokio::task::spawn_blocking(move || {
                match records.insert_record_if_absent(&change) {
                    Ok(true) => Ok(None),
                    // Taken by another node: chain after the log's real end.
                    Ok(false) => read_head(records.as_ref()).map(Some),
                    Err(e) => Err(store_err(e)),
                }
            })
            .await
            .map_err(|e| e.to_string())??;
            match appended {
                None => {
                    *head = (entry.seq, entry.hash.clone());
                    return Ok(entry);
                }
                Some(newer) => *head = newer,
            }
        }
        Err("the audit log is being appended to by other nodes too fast; try again".into())
    }

    /// Entries after `after` (from the first when `None`), oldest first; with
    /// `tenant`, only those of that tenant. Answers the entries and, when more
    /// may follow, the cursor to continue from.
    pub async fn page(
        &self,
        tenant: Option<String>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<AuditEntry>, Option<u64>), String> {
        let limit = limit.clamp(1, MAX_PAGE);
        let records = self.records.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut cursor = after;
            let mut scanned = 0;
            loop {
                let from = cursor.map(key);
                let rows = records
                    .records_page(RecordKind::Audit, "", from.as_deref(), MAX_PAGE, false)
                    .map_err(store_err)?;
                let exhausted = rows.len() < MAX_PAGE;
                for (_, _, bytes) in rows {
                    let e: AuditEntry = serde_json::from_slice(&bytes)
                        .map_err(|e| format!("an audit entry is unreadable: {e}"))?;
                    cursor = Some(e.seq);
                    scanned += 1;
                    if tenant.as_ref().is_none_or(|t| e.tenant.as_ref() == Some(t)) {
                        out.push(e);
                        if out.len() == limit {
                            return Ok((out, cursor));
                        }
                    }
                }
                if exhausted {
                    return Ok((out, None));
                }
                if scanned >= MAX_SCAN {
                    return Ok((out, cursor));
                }
            }
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Walks the whole chain and says whether it holds.
    pub async fn verify(&self) -> Result<Verification, String> {
        let records = self.records.clone();
        tokio::task::spawn_blocking(move || {
            let mut prev = GENESIS.to_string();
            let mut expected_seq = 1;
            let mut cursor: Option<String> = None;
            let mut count = 0;
            loop {
                let rows = records
                    .records_page(RecordKind::Audit, "", cursor.as_deref(), MAX_PAGE, false)
                    .map_err(store_err)?;
                let exhausted = rows.len() < MAX_PAGE;
                for (_, k, bytes) in rows {
                    let broken = |reason: String| Verification {
                        entries: count,
                        intact: false,
                        first_broken: Some(expected_seq),
                        reason: Some(reason),
                        head: prev.clone(),
                    };
                    let e: AuditEntry = match serde_json::from_slice(&bytes) {
                        Ok(e) => e,
                        Err(err) => return Ok(broken(format!("entry {k} is unreadable: {err}"))),
                    };
                    if e.seq != expected_seq || k != key(e.seq) {
                        return Ok(broken(format!(
                            "entry {expected_seq} is missing (found {})",
                            e.seq
                        )));
                    }
                    if e.prev != prev {
                        return Ok(broken(format!(
                            "entry {} does not follow the one before it",
                            e.seq
                        )));
                    }
                    if e.compute_hash() != e.hash {
                        return Ok(broken(format!(
                            "entry {} was changed after it was written",
                            e.seq
                        )));
                    }
                    prev = e.hash;
                    expected_seq += 1;
                    count += 1;
                    cursor = Some(k);
                }
                if exhausted {
                    return Ok(Verification {
                        entries: count,
                        intact: true,
                        first_broken: None,
                        reason: None,
                        head: prev,
                    });
                }
            }
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(tenant: Option<&str>, action: &str) -> AuditEvent {
        AuditEvent {
            tenant: tenant.map(str::to_string),
            actor: "tester".into(),
            action: action.into(),
            target: None,
            outcome: "ok".into(),
            detail: json!({"n": 1, "a": [1, 2]}),
            source: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entries_chain_survive_reopen_and_tampering_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(borough_embedded::open(dir.path()).unwrap());
        let log = AuditLog::open(store.clone()).unwrap();
        for i in 0..5 {
            let tenant = if i % 2 == 0 {
                Some("city")
            } else {
                Some("other")
            };
            log.append(event(tenant, "key.create"), i).await.unwrap();
        }
        let report = log.verify().await.unwrap();
        assert!(report.intact, "{report:?}");
        assert_eq!(report.entries, 5);
        let (city, next) = log.page(Some("city".into()), None, 10).await.unwrap();
        assert_eq!(city.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 3, 5]);
        assert_eq!(next, None);
        let (first_two, next) = log.page(None, None, 2).await.unwrap();
        assert_eq!(first_two.len(), 2);
        assert_eq!(next, Some(2));

        // Reopened, the chain goes on from where it was.
        drop(log);
        let log = AuditLog::open(store.clone()).unwrap();
        let e = log.append(event(None, "tenant.create"), 9).await.unwrap();
        assert_eq!(e.seq, 6);
        assert!(log.verify().await.unwrap().intact);

        // An entry changed in place breaks the chain there.
        let rows = store
            .records_page(RecordKind::Audit, "", Some(&key(2)), 1, false)
            .unwrap();
        let mut third: AuditEntry = serde_json::from_slice(&rows[0].2).unwrap();
        third.actor = "someone else".into();
        store
            .write_records(&[RecordChange {
                kind: RecordKind::Audit,
                tenant: String::new(),
                key: key(3),
                value: Some(serde_json::to_vec(&third).unwrap()),
            }])
            .unwrap();
        let report = log.verify().await.unwrap();
        assert!(!report.intact);
        assert_eq!(report.first_broken, Some(3));
        // So does one removed.
        store
            .write_records(&[RecordChange {
                kind: RecordKind::Audit,
                tenant: String::new(),
                key: key(2),
                value: None,
            }])
            .unwrap();
        assert_eq!(log.verify().await.unwrap().first_broken, Some(2));
    }
}
