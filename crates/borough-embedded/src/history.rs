//! History (the temporal evolution of entities) in the embedded engine.
//!
//! Every attribute instance belongs to a *series*: (tenant, entity, attribute,
//! datasetId), numbered. New instances are appended to the history log
//! (crate::hotlog) in the same redb transaction as the entity change that
//! made them, so an acknowledged write has its history. Instances not yet
//! sealed are *hot*: in the log, or in the hot table keyed by (series, time
//! key, sequence number), where a series' rows go when they are the oldest of
//! the log's window (`StoreOptions::history_log_window`) and too few for a chunk.
//! When a series has [`SEAL_AT`] hot rows, or at least [`SEAL_OLD_MIN`] of
//! which the oldest is older than [`SEAL_AGE_MICROS`], the rows are sealed
//! into a compressed chunk (crate::chunk) with an index entry; bulk imports
//! write chunks directly. A series with a few rows stays hot: a chunk of one
//! or two instances would take more room than their rows.
//! The time key is `observedAt`, or the write time for instances without one.
//!
//! Only the writer thread changes history; readers use a redb read
//! transaction, which sees hot rows, log rows, chunks and index entries of
//! one commit, and the log index to find a series' log rows.

use crate::chunk::{self, ChunkMeta, Row};
use crate::hotlog::{self, LOG, LOG_MOVED, LogIndex, LogRow, Stale};
use crate::series::SeriesIndex;
use borough_core::temporal::{
    AggrMethod, AttrHistory, Buckets, EntityHistory, HistoryBody, HistoryOp, HistoryOutcome,
    HistoryRequest, ImportSeries, Instance, InstanceId, Retention, TimeProperty, TimeRange,
};
use borough_core::{AttrKind, Attribute};
use borough_engine::Recorded;
use borough_engine::temporal::{
    BucketMap, Cut, bucket_span, empty_body, imported_instance, key_of, time_key, widen_cut,
};
use borough_store::StoreError;
use redb::{
    Database, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use std::collections::HashMap;
use std::ops::Bound;
use std::sync::Arc;

/// (tenant, entity, attribute, datasetId or "") → series number.
pub const SERIES: TableDefinition<(&str, &str, &str, &str), u64> =
    TableDefinition::new("history_series");
/// (tenant, entity) → the entity's types (JSON), for every entity with history.
pub const ENTITIES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("history_entities");
/// (tenant, type, entity): entities with history by type.
pub const TYPES: TableDefinition<(&str, &str, &str), ()> = TableDefinition::new("history_types");
/// (series, time key, sequence) → an instance not yet sealed (JSON).
pub const HOT: TableDefinition<(u64, i64, u64), &[u8]> = TableDefinition::new("history_hot");
/// (series, first time key, chunk number) → the chunk's [`ChunkMeta`].
pub const CHUNK_INDEX: TableDefinition<(u64, i64, u64), &[u8]> =
    TableDefinition::new("history_chunk_index");
/// Chunk number → the compressed chunk.
pub const CHUNKS: TableDefinition<u64, &[u8]> = TableDefinition::new("history_chunks");
/// Counters: next series, sequence and chunk numbers.
pub const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("history_counters");
/// Tenant → its retention rules (JSON).
pub const RETENTION: TableDefinition<&str, &[u8]> = TableDefinition::new("history_retention");

/// Hot rows of one series that are sealed into a chunk.
const SEAL_AT: u32 = 512;
/// Hot rows older than this (by time key) are sealed by maintenance...
pub const SEAL_AGE_MICROS: i64 = 6 * 3_600_000_000;
/// ...when the series has at least this many.
const SEAL_OLD_MIN: u32 = 64;
/// Most instances in one sealed chunk, and the first chunk of an import.
const CHUNK_MAX: usize = 4096;
/// Imported chunks are sized to about this many bytes: one 4 KiB page of
/// storage with room for the page's own header.
const CHUNK_TARGET_BYTES: usize = 3_900;
/// Most series sealed by one maintenance pass (bounds its transaction).
const SEAL_PER_PASS: usize = 5_000;
/// Most series that leave the log in one commit (bounds a group's extra work).
const MOVES_PER_COMMIT: usize = 64;
/// The log is truncated once this many rows below its oldest live row have
/// left (or its window, if smaller).
const TRUNCATE_STEP: u64 = 4_096;

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Io(format!("history: {what} cannot be read"))
}

pub fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(SERIES).map_err(io)?;
    txn.open_table(ENTITIES).map_err(io)?;
    txn.open_table(TYPES).map_err(io)?;
    txn.open_table(HOT).map_err(io)?;
    txn.open_table(CHUNK_INDEX).map_err(io)?;
    txn.open_table(CHUNKS).map_err(io)?;
    txn.open_table(COUNTERS).map_err(io)?;
    txn.open_table(RETENTION).map_err(io)?;
    txn.open_table(LOG).map_err(io)?;
    txn.open_table(LOG_MOVED).map_err(io)?;
    Ok(())
}

/// A series' instances not yet sealed, in the log and the hot table.
#[derive(Clone, Copy)]
struct Hot {
    count: u32,
    oldest: i64,
}

/// The writer's view of history: series numbers, hot-row counts and the
/// log's index. Rebuilt from the file at open, and again if a commit fails.
pub struct History {
    series: SeriesIndex,
    hot: HashMap<u64, Hot>,
    /// Shared with readers.
    log: Arc<LogIndex>,
    /// The log holds no row below this sequence number.
    log_start: u64,
    /// `log_start` when watermarks below it were last dropped.
    pruned_at: u64,
    /// Series that reached [`SEAL_AT`] hot rows since the last seal: a commit
    /// looks at these, never at every series.
    full: Vec<u64>,
    next_series: u64,
    next_seq: u64,
    next_chunk: u64,
}

/// The tables a write of new instances touches, opened once per transaction
/// (opening a redb table is not free, and a group records thousands of instances).
struct RecordTables<'txn> {
    series: redb::Table<'txn, (&'static str, &'static str, &'static str, &'static str), u64>,
    entities: redb::Table<'txn, (&'static str, &'static str), &'static [u8]>,
    types: redb::Table<'txn, (&'static str, &'static str, &'static str), ()>,
    hot: redb::Table<'txn, (u64, i64, u64), &'static [u8]>,
    log: redb::Table<'txn, u64, &'static [u8]>,
    buf: Vec<u8>,
}

impl<'txn> RecordTables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            series: txn.open_table(SERIES).map_err(io)?,
            entities: txn.open_table(ENTITIES).map_err(io)?,
            types: txn.open_table(TYPES).map_err(io)?,
            hot: txn.open_table(HOT).map_err(io)?,
            log: txn.open_table(LOG).map_err(io)?,
            buf: Vec::with_capacity(256),
        })
    }
}

/// Serializes an instance as stored: the series holds the datasetId, rows do not repeat it.
fn write_instance(buf: &mut Vec<u8>, attr: &Attribute) -> Result<(), StoreError> {
    if attr.dataset_id.is_some() {
        let mut bare = attr.clone();
        bare.dataset_id = None;
        serde_json::to_writer(buf, &bare)
    } else {
        serde_json::to_writer(buf, attr)
    }
    .map_err(io)
}

fn parse_instance(json: &[u8]) -> Result<Attribute, StoreError> {
    serde_json::from_slice(json).map_err(|_| corrupt("an instance"))
}

/// A log row's time key and attribute.
fn parse_log_row(bytes: &[u8]) -> Result<(i64, Attribute), StoreError> {
    let (_, at, json) = hotlog::split_row(bytes).ok_or_else(|| corrupt("a log row"))?;
    Ok((at, parse_instance(json)?))
}

/// Counts one more hot instance of a series; returns the series' count.
fn count_hot(hot: &mut HashMap<u64, Hot>, series: u64, at: i64) -> u32 {
    let h = hot.entry(series).or_insert(Hot {
        count: 0,
        oldest: at,
    });
    h.count += 1;
    h.oldest = h.oldest.min(at);
    h.count
}

impl History {
    /// Reads the writer's state from the file, and fills `log` with the log's live rows.
    pub fn load(db: &Database, log: Arc<LogIndex>) -> Result<Self, StoreError> {
        let read = db.begin_read().map_err(io)?;
        let mut h = History {
            series: SeriesIndex::new(),
            hot: HashMap::new(),
            log,
            log_start: 0,
            pruned_at: 0,
            full: Vec::new(),
            next_series: 1,
            next_seq: 1,
            next_chunk: 1,
        };
        let counters = read.open_table(COUNTERS).map_err(io)?;
        for (name, slot) in [
            ("series", &mut h.next_series),
            ("seq", &mut h.next_seq),
            ("chunk", &mut h.next_chunk),
        ] {
            if let Some(v) = counters.get(name).map_err(io)? {
                *slot = v.value();
            }
        }
        for row in read.open_table(SERIES).map_err(io)?.iter().map_err(io)? {
            let (k, v) = row.map_err(io)?;
            let (t, e, n, d) = k.value();
            h.series.insert(t, e, n, d, v.value());
        }
        for row in read.open_table(HOT).map_err(io)?.iter().map_err(io)? {
            let (k, _) = row.map_err(io)?;
            let (s, at, _) = k.value();
            count_hot(&mut h.hot, s, at);
        }
        let mut moved = HashMap::new();
        for row in read.open_table(LOG_MOVED).map_err(io)?.iter().map_err(io)? {
            let (s, seq) = row.map_err(io)?;
            moved.insert(s.value(), seq.value());
        }
        let mut live: foldhash::HashMap<u64, Vec<LogRow>> = Default::default();
        h.log_start = h.next_seq;
        for (i, row) in read
            .open_table(LOG)
            .map_err(io)?
            .iter()
            .map_err(io)?
            .enumerate()
        {
            let (k, v) = row.map_err(io)?;
            let seq = k.value();
            if i == 0 {
                h.log_start = seq;
            }
            let (s, at, json) = hotlog::split_row(v.value()).ok_or_else(|| corrupt("a log row"))?;
            if moved.get(&s).is_some_and(|last| seq <= *last) {
                continue;
            }
            live.entry(s).or_default().push(LogRow {
                at,
                seq,
                json: json.into(),
            });
            count_hot(&mut h.hot, s, at);
        }
        h.log.reset(live);
        h.full = h
            .hot
            .iter()
            .filter(|(_, hot)| hot.count >= SEAL_AT)
            .map(|(s, _)| *s)
            .collect();
        Ok(h)
    }

    fn save_counters(&self, txn: &WriteTransaction) -> Result<(), StoreError> {
        let mut c = txn.open_table(COUNTERS).map_err(io)?;
        c.insert("series", self.next_series).map_err(io)?;
        c.insert("seq", self.next_seq).map_err(io)?;
        c.insert("chunk", self.next_chunk).map_err(io)?;
        Ok(())
    }

    /// The series of (tenant, entity, name, dataset), created when new.
    fn series_for(
        &mut self,
        t: &mut RecordTables,
        tenant: &str,
        entity: &str,
        types: &[String],
        name: &str,
        dataset: Option<&str>,
    ) -> Result<u64, StoreError> {
        let dataset = dataset.unwrap_or("");
        if let Some(s) = self.series.get(tenant, entity, name, dataset) {
            return Ok(s);
        }
        let s = self.next_series;
        self.next_series += 1;
        t.series
            .insert((tenant, entity, name, dataset), s)
            .map_err(io)?;
        // An entity with a series has its row already.
        let known = self.series.has_entity(tenant, entity)
            || t.entities.get((tenant, entity)).map_err(io)?.is_some();
        if !known {
            let json = serde_json::to_vec(types).map_err(io)?;
            t.entities
                .insert((tenant, entity), json.as_slice())
                .map_err(io)?;
            for ty in types {
                t.types
                    .insert((tenant, ty.as_str(), entity), ())
                    .map_err(io)?;
            }
        }
        self.series.insert(tenant, entity, name, dataset, s);
        Ok(s)
    }

    /// Appends a new instance to the log.
    fn put_hot(
        &mut self,
        t: &mut RecordTables,
        series: u64,
        attr: &Attribute,
    ) -> Result<InstanceId, StoreError> {
        let at = time_key(attr);
        let seq = self.next_seq;
        self.next_seq += 1;
        hotlog::begin_row(&mut t.buf, series, at);
        write_instance(&mut t.buf, attr)?;
        t.log.insert(seq, t.buf.as_slice()).map_err(io)?;
        self.log.push(series, at, seq, &t.buf[hotlog::HEADER..]);
        if count_hot(&mut self.hot, series, at) == SEAL_AT {
            self.full.push(series);
        }
        Ok(InstanceId { series, at, seq })
    }

    /// Records the instances of a group's writes, sealing full series.
    pub fn record(&mut self, txn: &WriteTransaction, rows: &[Recorded]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        {
            let mut t = RecordTables::open(txn)?;
            for r in rows {
                for &(a, i) in &r.instances {
                    let Some((name, list)) = r.entity.attrs.get_index(a) else {
                        continue;
                    };
                    let Some(attr) = list.get(i) else { continue };
                    let s = self.series_for(
                        &mut t,
                        &r.tenant,
                        &r.entity.id,
                        &r.entity.types,
                        name,
                        attr.dataset_id.as_deref(),
                    )?;
                    self.put_hot(&mut t, s, attr)?;
                }
            }
        }
        self.seal_full(txn)?;
        self.move_overdue(txn)?;
        self.save_counters(txn)
    }

    /// Moves the series holding the oldest rows of the log to the hot table
    /// once the log has more than its window of rows (they are sealed when
    /// they reach [`SEAL_AT`], in chunks that compress well). Then truncates
    /// the log below its oldest live row.
    fn move_overdue(&mut self, txn: &WriteTransaction) -> Result<(), StoreError> {
        let window_start = self.next_seq.saturating_sub(self.log.window());
        for s in self.log.older_than(window_start, MOVES_PER_COMMIT) {
            self.move_to_hot(txn, s)?;
        }
        let first_live = self.log.first_live().unwrap_or(self.next_seq);
        if first_live >= self.log_start + TRUNCATE_STEP.min(self.log.window()) {
            let mut log = txn.open_table(LOG).map_err(io)?;
            log.retain_in(self.log_start..first_live, |_, _| false)
                .map_err(io)?;
            self.log_start = first_live;
        }
        Ok(())
    }

    /// Takes a series' rows out of the log: they stay in the file, below
    /// the series' watermark, until the log is truncated.
    fn take_from_log(
        &mut self,
        txn: &WriteTransaction,
        series: u64,
    ) -> Result<Vec<LogRow>, StoreError> {
        let rows = self.log.take(series);
        if let Some(last) = rows.last() {
            txn.open_table(LOG_MOVED)
                .map_err(io)?
                .insert(series, last.seq)
                .map_err(io)?;
        }
        Ok(rows)
    }

    /// Moves a series' log rows to the hot table.
    fn move_to_hot(&mut self, txn: &WriteTransaction, series: u64) -> Result<(), StoreError> {
        let rows = self.take_from_log(txn, series)?;
        let mut hot = txn.open_table(HOT).map_err(io)?;
        for r in rows {
            hot.insert((series, r.at, r.seq), &*r.json).map_err(io)?;
        }
        Ok(())
    }

    fn seal_full(&mut self, txn: &WriteTransaction) -> Result<(), StoreError> {
        for s in std::mem::take(&mut self.full) {
            if self.hot.get(&s).is_some_and(|h| h.count >= SEAL_AT) {
                self.seal(txn, s)?;
            }
        }
        Ok(())
    }

    /// Seals series whose oldest hot row is older than `cutoff`.
    pub fn seal_old(&mut self, txn: &WriteTransaction, cutoff: i64) -> Result<usize, StoreError> {
        let old: Vec<u64> = self
            .hot
            .iter()
            .filter(|(_, h)| h.oldest < cutoff && h.count >= SEAL_OLD_MIN)
            .map(|(s, _)| *s)
            .take(SEAL_PER_PASS)
            .collect();
        for s in &old {
            self.seal(txn, *s)?;
        }
        self.prune_watermarks(txn)?;
        self.save_counters(txn)?;
        Ok(old.len())
    }

    /// Drops the watermarks of series whose rows that left the log are all
    /// truncated, once the log has moved on by a window since the last time.
    fn prune_watermarks(&mut self, txn: &WriteTransaction) -> Result<(), StoreError> {
        if self.log_start < self.pruned_at + self.log.window() {
            return Ok(());
        }
        let log_start = self.log_start;
        txn.open_table(LOG_MOVED)
            .map_err(io)?
            .retain(|_, last| last >= log_start)
            .map_err(io)?;
        self.pruned_at = log_start;
        Ok(())
    }

    /// Moves every hot row of a series, in the log and the hot table, into chunks.
    fn seal(&mut self, txn: &WriteTransaction, series: u64) -> Result<(), StoreError> {
        let mut rows = Vec::new();
        for r in self.take_from_log(txn, series)? {
            rows.push((r.at, r.seq, parse_instance(&r.json)?));
        }
        let mut hot = txn.open_table(HOT).map_err(io)?;
        for row in hot
            .range((series, i64::MIN, 0)..=(series, i64::MAX, u64::MAX))
            .map_err(io)?
        {
            let (k, v) = row.map_err(io)?;
            let (_, at, seq) = k.value();
            rows.push((at, seq, parse_instance(v.value())?));
        }
        hot.retain_in::<RowKey, _>(key_range(series, i64::MIN, i64::MAX), |_, _| false)
            .map_err(io)?;
        drop(hot);
        self.hot.remove(&series);
        rows.sort_by_key(|r| (r.0, r.1));
        self.write_chunks(txn, series, &rows)
    }

    /// Writes sorted rows as chunks of at most [`CHUNK_MAX`].
    fn write_chunks(
        &mut self,
        txn: &WriteTransaction,
        series: u64,
        rows: &[Row],
    ) -> Result<(), StoreError> {
        let mut index = txn.open_table(CHUNK_INDEX).map_err(io)?;
        let mut chunks = txn.open_table(CHUNKS).map_err(io)?;
        for part in rows.chunks(CHUNK_MAX) {
            let (bytes, meta) = chunk::encode(part).map_err(io)?;
            let no = self.next_chunk;
            self.next_chunk += 1;
            chunks.insert(no, bytes.as_slice()).map_err(io)?;
            index
                .insert((series, meta.min_at, no), meta.encode().as_slice())
                .map_err(io)?;
        }
        Ok(())
    }

    /// Writes a batch of imported series straight into chunks.
    pub fn import(
        &mut self,
        txn: &WriteTransaction,
        tenant: &str,
        batch: Vec<ImportSeries>,
        now: i64,
    ) -> Result<(u64, u64), StoreError> {
        let mut points = 0;
        let series = batch.len() as u64;
        for mut one in batch {
            let types = [std::mem::take(&mut one.entity_type)];
            let s = {
                let mut t = RecordTables::open(txn)?;
                self.series_for(&mut t, tenant, &one.entity, &types, &one.name, None)?
            };
            one.points.sort_by_key(|p| p.0);
            points += one.points.len() as u64;
            let first_seq = self.next_seq;
            self.next_seq += one.points.len() as u64;
            let numbers: Option<Vec<f64>> = one.points.iter().map(|p| p.1.as_f64()).collect();
            let mut index = txn.open_table(CHUNK_INDEX).map_err(io)?;
            let mut chunks = txn.open_table(CHUNKS).map_err(io)?;
            // The first chunk tells how well the series compresses; later ones
            // are sized to fill a storage page (redb gives a large value pages of
            // its own, so a chunk just over a page would waste most of the next).
            let mut start = 0;
            let mut size = CHUNK_MAX;
            while start < one.points.len() {
                let end = (start + size).min(one.points.len());
                let part = &one.points[start..end];
                let seq0 = first_seq + start as u64;
                let (bytes, meta) = match &numbers {
                    Some(values) => {
                        let at: Vec<i64> = part.iter().map(|p| p.0).collect();
                        let all_integers = part.iter().all(|p| p.1.is_i64() || p.1.is_u64());
                        chunk::encode_numeric(&at, seq0, now, &values[start..end], all_integers)
                    }
                    None => {
                        let rows: Vec<Row> = part
                            .iter()
                            .enumerate()
                            .map(|(j, (at, value))| {
                                let attr = imported_instance(*at, value.clone(), now);
                                (*at, seq0 + j as u64, attr)
                            })
                            .collect();
                        chunk::encode(&rows)
                    }
                }
                .map_err(io)?;
                let no = self.next_chunk;
                self.next_chunk += 1;
                chunks.insert(no, bytes.as_slice()).map_err(io)?;
                index
                    .insert((s, meta.min_at, no), meta.encode().as_slice())
                    .map_err(io)?;
                let per_point = bytes.len().max(1) as f64 / part.len() as f64;
                size = ((CHUNK_TARGET_BYTES as f64 / per_point) as usize)
                    .clamp(CHUNK_MAX / 8, CHUNK_MAX * 4);
                start = end;
            }
        }
        self.save_counters(txn)?;
        Ok((points, series))
    }

    /// Applies a temporal API write.
    pub fn apply(
        &mut self,
        txn: &WriteTransaction,
        tenant: &str,
        op: HistoryOp,
        now: i64,
    ) -> Result<HistoryOutcome, StoreError> {
        let outcome = match op {
            HistoryOp::Append {
                id,
                types,
                instances,
            } => {
                let mut t = RecordTables::open(txn)?;
                let existed = t.entities.get((tenant, id.as_str())).map_err(io)?.is_some();
                let mut sealed = Sealed::default();
                for (name, attr) in instances {
                    let s = self.series_for(
                        &mut t,
                        tenant,
                        &id,
                        &types,
                        &name,
                        attr.dataset_id.as_deref(),
                    )?;
                    // Sending a temporal representation again adds nothing new.
                    if attr.observed_at.is_some()
                        && stored(txn, &t, &self.log, s, &attr, &mut sealed)?
                    {
                        continue;
                    }
                    self.put_hot(&mut t, s, &attr)?;
                }
                drop(t);
                self.seal_full(txn)?;
                self.move_overdue(txn)?;
                if existed {
                    HistoryOutcome::Changed
                } else {
                    HistoryOutcome::Created
                }
            }
            HistoryOp::DeleteEntity { id } => {
                let types: Vec<String> = match txn
                    .open_table(ENTITIES)
                    .map_err(io)?
                    .remove((tenant, id.as_str()))
                    .map_err(io)?
                {
                    Some(v) => serde_json::from_slice(v.value()).unwrap_or_default(),
                    None => return Ok(HistoryOutcome::NotFound),
                };
                let mut by_type = txn.open_table(TYPES).map_err(io)?;
                for t in &types {
                    by_type
                        .remove((tenant, t.as_str(), id.as_str()))
                        .map_err(io)?;
                }
                drop(by_type);
                for (name, dataset, s) in series_of_write(txn, tenant, &id)? {
                    self.drop_series(txn, tenant, &id, &name, &dataset, s)?;
                }
                HistoryOutcome::Changed
            }
            HistoryOp::DeleteAttr {
                id,
                name,
                dataset_id,
                all,
            } => {
                let mut found = false;
                for (n, dataset, s) in series_of_write(txn, tenant, &id)? {
                    let same_dataset = dataset.as_str() == dataset_id.as_deref().unwrap_or("");
                    if n == name && (all || same_dataset) {
                        self.drop_series(txn, tenant, &id, &n, &dataset, s)?;
                        found = true;
                    }
                }
                if found {
                    HistoryOutcome::Changed
                } else {
                    HistoryOutcome::NotFound
                }
            }
            HistoryOp::DeleteInstance { id, name, instance } => {
                if !owns(txn, tenant, &id, &name, instance.series)? {
                    return Ok(HistoryOutcome::NotFound);
                }
                self.edit_instance(txn, instance, |_| None)?
            }
            HistoryOp::ModifyInstance {
                id,
                name,
                instance,
                attr,
            } => {
                if !owns(txn, tenant, &id, &name, instance.series)? {
                    return Ok(HistoryOutcome::NotFound);
                }
                self.edit_instance(txn, instance, |old| {
                    let mut new = (*attr).clone();
                    // The time key stays: an instance keeps its place in time.
                    new.observed_at = old.observed_at;
                    new.dataset_id = None;
                    new.created_at = old.created_at;
                    new.modified_at = now;
                    if old.observed_at.is_none() {
                        // Without observedAt the time key is the write time: keep it.
                        new.modified_at = old.modified_at;
                    }
                    Some(new)
                })?
            }
        };
        self.save_counters(txn)?;
        Ok(outcome)
    }

    /// Changes (`Some`) or removes (`None`) one instance, hot or sealed.
    fn edit_instance(
        &mut self,
        txn: &WriteTransaction,
        id: InstanceId,
        edit: impl FnOnce(&Attribute) -> Option<Attribute>,
    ) -> Result<HistoryOutcome, StoreError> {
        if let Some(json) = self.log.get(id.series, id.seq) {
            let mut log = txn.open_table(LOG).map_err(io)?;
            match edit(&parse_instance(&json)?) {
                Some(new) => {
                    let mut buf = Vec::with_capacity(256);
                    hotlog::begin_row(&mut buf, id.series, id.at);
                    write_instance(&mut buf, &new)?;
                    log.insert(id.seq, buf.as_slice()).map_err(io)?;
                    self.log.replace(id.series, id.seq, &buf[hotlog::HEADER..]);
                }
                None => {
                    log.remove(id.seq).map_err(io)?;
                    self.log.remove_where(id.series, |_, seq| seq == id.seq);
                    if let Some(h) = self.hot.get_mut(&id.series) {
                        h.count = h.count.saturating_sub(1);
                    }
                }
            }
            return Ok(HistoryOutcome::Changed);
        }
        let key = (id.series, id.at, id.seq);
        let mut hot = txn.open_table(HOT).map_err(io)?;
        let old = hot
            .get(key)
            .map_err(io)?
            .map(|v| serde_json::from_slice::<Attribute>(v.value()));
        if let Some(old) = old {
            let old = old.map_err(|_| corrupt("an instance"))?;
            match edit(&old) {
                Some(new) => {
                    let json = serde_json::to_vec(&new).map_err(io)?;
                    hot.insert(key, json.as_slice()).map_err(io)?;
                }
                None => {
                    hot.remove(key).map_err(io)?;
                    if let Some(h) = self.hot.get_mut(&id.series) {
                        h.count = h.count.saturating_sub(1);
                    }
                }
            }
            return Ok(HistoryOutcome::Changed);
        }
        drop(hot);
        let mut index = txn.open_table(CHUNK_INDEX).map_err(io)?;
        let mut chunks = txn.open_table(CHUNKS).map_err(io)?;
        let mut holder = None;
        for row in index
            .range((id.series, i64::MIN, 0)..=(id.series, id.at, u64::MAX))
            .map_err(io)?
        {
            let (k, v) = row.map_err(io)?;
            let meta = ChunkMeta::decode(v.value()).ok_or_else(|| corrupt("a chunk index"))?;
            if meta.max_at >= id.at {
                let (_, min_at, no) = k.value();
                let bytes = chunks
                    .get(no)
                    .map_err(io)?
                    .ok_or_else(|| corrupt("a chunk"))?
                    .value()
                    .to_vec();
                let rows = chunk::decode(&bytes).ok_or_else(|| corrupt("a chunk"))?;
                if let Some(pos) = rows.iter().position(|r| r.0 == id.at && r.1 == id.seq) {
                    holder = Some((min_at, no, rows, pos));
                    break;
                }
            }
        }
        let Some((min_at, no, mut rows, pos)) = holder else {
            return Ok(HistoryOutcome::NotFound);
        };
        match edit(&rows[pos].2) {
            Some(new) => rows[pos].2 = new,
            None => {
                rows.remove(pos);
            }
        }
        index.remove((id.series, min_at, no)).map_err(io)?;
        if rows.is_empty() {
            chunks.remove(no).map_err(io)?;
        } else {
            let (bytes, meta) = chunk::encode(&rows).map_err(io)?;
            chunks.insert(no, bytes.as_slice()).map_err(io)?;
            index
                .insert((id.series, meta.min_at, no), meta.encode().as_slice())
                .map_err(io)?;
        }
        Ok(HistoryOutcome::Changed)
    }

    fn drop_series(
        &mut self,
        txn: &WriteTransaction,
        tenant: &str,
        entity: &str,
        name: &str,
        dataset: &str,
        s: u64,
    ) -> Result<(), StoreError> {
        txn.open_table(SERIES)
            .map_err(io)?
            .remove((tenant, entity, name, dataset))
            .map_err(io)?;
        self.series.remove(tenant, entity, name, dataset);
        self.hot.remove(&s);
        // Its live log rows are deleted; its watermark stays, for the rows
        // that left the log and wait there for truncation.
        self.drop_before(txn, s, i64::MAX)?;
        Ok(())
    }

    /// Drops history older than each tenant's retention allows. Returns the
    /// number of instances removed.
    pub fn apply_retention(&mut self, txn: &WriteTransaction, now: i64) -> Result<u64, StoreError> {
        let policies: Vec<(String, Retention)> = {
            let table = txn.open_table(RETENTION).map_err(io)?;
            let mut out = Vec::new();
            for row in table.iter().map_err(io)? {
                let (k, v) = row.map_err(io)?;
                if let Ok(r) = serde_json::from_slice(v.value()) {
                    out.push((k.value().to_string(), r));
                }
            }
            out
        };
        let mut removed = 0;
        for (tenant, policy) in policies {
            let mut targets = Vec::new();
            {
                let entities = txn.open_table(ENTITIES).map_err(io)?;
                for row in entities.range((tenant.as_str(), "")..).map_err(io)? {
                    let (k, v) = row.map_err(io)?;
                    let (t, e) = k.value();
                    if t != tenant {
                        break;
                    }
                    let types: Vec<String> = serde_json::from_slice(v.value()).unwrap_or_default();
                    if let Some(keep) = policy.keep_for(&types) {
                        targets.push((e.to_string(), now.saturating_sub(keep)));
                    }
                }
            }
            for (entity, cutoff) in targets {
                for (_, _, s) in series_of_write(txn, &tenant, &entity)? {
                    removed += self.drop_before(txn, s, cutoff)?;
                    if let Some(h) = self.hot.get_mut(&s) {
                        // Recount lazily: the oldest row is gone, the count is an upper bound.
                        h.oldest = h.oldest.max(cutoff);
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Removes a series' instances with time key before `to` (everything, with
    /// `to == i64::MAX`): log rows, hot rows, whole chunks, and the old part of
    /// a chunk that straddles `to`. Returns the number of instances removed.
    fn drop_before(&mut self, txn: &WriteTransaction, s: u64, to: i64) -> Result<u64, StoreError> {
        let gone = self.log.remove_where(s, |at, _| at < to);
        if !gone.is_empty() {
            let mut log = txn.open_table(LOG).map_err(io)?;
            for r in &gone {
                log.remove(r.seq).map_err(io)?;
            }
        }
        Ok(gone.len() as u64 + drop_old_rows(txn, s, to)?)
    }
}

/// The hot-table and chunk part of [`History::drop_before`].
fn drop_old_rows(txn: &WriteTransaction, s: u64, to: i64) -> Result<u64, StoreError> {
    let mut removed = 0;
    {
        let mut hot = txn.open_table(HOT).map_err(io)?;
        let keys: Vec<RowKey> = hot
            .range::<RowKey>(key_range(s, i64::MIN, to))
            .map_err(io)?
            .map(|r| r.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()
            .map_err(io)?;
        for k in keys {
            hot.remove(k).map_err(io)?;
            removed += 1;
        }
    }
    let mut index = txn.open_table(CHUNK_INDEX).map_err(io)?;
    let mut chunks = txn.open_table(CHUNKS).map_err(io)?;
    let mut affected = Vec::new();
    for row in index
        .range::<RowKey>(key_range(s, i64::MIN, to))
        .map_err(io)?
    {
        let (k, v) = row.map_err(io)?;
        let meta = ChunkMeta::decode(v.value()).ok_or_else(|| corrupt("a chunk index"))?;
        affected.push((k.value(), meta));
    }
    for ((series, min_at, no), meta) in affected {
        index.remove((series, min_at, no)).map_err(io)?;
        if to == i64::MAX || meta.max_at < to {
            chunks.remove(no).map_err(io)?;
            removed += meta.summary.count;
            continue;
        }
        // Straddles the cut: keep its newer part.
        let bytes = chunks
            .get(no)
            .map_err(io)?
            .ok_or_else(|| corrupt("a chunk"))?
            .value()
            .to_vec();
        let mut rows = chunk::decode(&bytes).ok_or_else(|| corrupt("a chunk"))?;
        let before = rows.len();
        rows.retain(|r| r.0 >= to);
        removed += (before - rows.len()) as u64;
        let (bytes, meta) = chunk::encode(&rows).map_err(io)?;
        chunks.insert(no, bytes.as_slice()).map_err(io)?;
        index
            .insert((series, meta.min_at, no), meta.encode().as_slice())
            .map_err(io)?;
    }
    Ok(removed)
}

type RowKey = (u64, i64, u64);

/// What an append has read of sealed history, to compare its instances
/// with: chunks do not change until the append seals, at its end.
#[derive(Default)]
struct Sealed {
    /// Series → its chunks (first time key, last time key, chunk number), by first time key.
    index: HashMap<u64, Vec<(i64, i64, u64)>>,
    /// Chunk number → its rows.
    rows: HashMap<u64, Vec<Row>>,
}

/// Whether series `s` already holds an instance with the time key and the
/// content of `attr` (its write times aside).
fn stored(
    txn: &WriteTransaction,
    t: &RecordTables,
    log: &LogIndex,
    s: u64,
    attr: &Attribute,
    sealed: &mut Sealed,
) -> Result<bool, StoreError> {
    let at = time_key(attr);
    for row in t.hot.range((s, at, 0)..=(s, at, u64::MAX)).map_err(io)? {
        let (_, v) = row.map_err(io)?;
        if same_instance(&parse_instance(v.value())?, attr) {
            return Ok(true);
        }
    }
    for json in log.at(s, at) {
        if same_instance(&parse_instance(&json)?, attr) {
            return Ok(true);
        }
    }
    let index = match sealed.index.entry(s) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            let table = txn.open_table(CHUNK_INDEX).map_err(io)?;
            let mut list = Vec::new();
            for row in table
                .range((s, i64::MIN, 0)..=(s, i64::MAX, u64::MAX))
                .map_err(io)?
            {
                let (k, v) = row.map_err(io)?;
                let meta = ChunkMeta::decode(v.value()).ok_or_else(|| corrupt("a chunk index"))?;
                list.push((meta.min_at, meta.max_at, k.value().2));
            }
            e.insert(list)
        }
    };
    // Sorted by first time key: the chunks that may hold `at` start no later.
    let end = index.partition_point(|c| c.0 <= at);
    let holders: Vec<u64> = index[..end]
        .iter()
        .filter(|c| c.1 >= at)
        .map(|c| c.2)
        .collect();
    if holders.is_empty() {
        return Ok(false);
    }
    let chunks = txn.open_table(CHUNKS).map_err(io)?;
    for no in holders {
        let rows = match sealed.rows.entry(no) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let bytes = chunks
                    .get(no)
                    .map_err(io)?
                    .ok_or_else(|| corrupt("a chunk"))?
                    .value()
                    .to_vec();
                e.insert(chunk::decode(&bytes).ok_or_else(|| corrupt("a chunk"))?)
            }
        };
        if rows.iter().any(|r| r.0 == at && same_instance(&r.2, attr)) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether two instances of one series say the same: equal content, whatever
/// their write times (stored rows do not repeat the series' datasetId).
fn same_instance(a: &Attribute, b: &Attribute) -> bool {
    a.kind == b.kind
        && same_value(&a.value, &b.value)
        && a.observed_at == b.observed_at
        && a.unit_code == b.unit_code
        && a.object_type == b.object_type
        && a.sub.len() == b.sub.len()
        && a.sub
            .iter()
            .all(|(k, x)| b.sub.get(k).is_some_and(|y| same_instance(x, y)))
}

/// Equal values, numbers by their value (a numeric chunk gives 12 back as 12.0
/// when its other values are not integers).
fn same_value(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a, b) {
        (serde_json::Value::Number(x), serde_json::Value::Number(y)) => {
            match (x.as_i64(), y.as_i64()) {
                (Some(i), Some(j)) => i == j,
                _ => x.as_f64() == y.as_f64(),
            }
        }
        _ => a == b,
    }
}

/// The keys of series `s` with time key in `[from, to)` (`to == i64::MAX`: no end).
fn key_range(s: u64, from: i64, to: i64) -> (Bound<RowKey>, Bound<RowKey>) {
    let end = if to == i64::MAX {
        Bound::Included((s, i64::MAX, u64::MAX))
    } else {
        Bound::Excluded((s, to, 0))
    };
    (Bound::Included((s, from, 0)), end)
}

/// Whether `series` is one of (tenant, entity, name)'s series.
fn owns(
    txn: &WriteTransaction,
    tenant: &str,
    entity: &str,
    name: &str,
    series: u64,
) -> Result<bool, StoreError> {
    Ok(series_of_write(txn, tenant, entity)?
        .iter()
        .any(|(n, _, s)| n == name && *s == series))
}

type SeriesList = Vec<(String, String, u64)>;

fn collect_series<
    T: ReadableTable<(&'static str, &'static str, &'static str, &'static str), u64>,
>(
    table: &T,
    tenant: &str,
    entity: &str,
) -> Result<SeriesList, StoreError> {
    let mut out = Vec::new();
    for row in table.range((tenant, entity, "", "")..).map_err(io)? {
        let (k, v) = row.map_err(io)?;
        let (t, e, n, d) = k.value();
        if t != tenant || e != entity {
            break;
        }
        out.push((n.to_string(), d.to_string(), v.value()));
    }
    Ok(out)
}

fn series_of_write(
    txn: &WriteTransaction,
    tenant: &str,
    entity: &str,
) -> Result<SeriesList, StoreError> {
    collect_series(&txn.open_table(SERIES).map_err(io)?, tenant, entity)
}

pub fn set_retention(
    txn: &WriteTransaction,
    tenant: &str,
    r: &Retention,
) -> Result<(), StoreError> {
    let json = serde_json::to_vec(r).map_err(io)?;
    txn.open_table(RETENTION)
        .map_err(io)?
        .insert(tenant, json.as_slice())
        .map_err(io)?;
    Ok(())
}

pub fn retention(db: &Database, tenant: &str) -> Result<Retention, StoreError> {
    let read = db.begin_read().map_err(io)?;
    let table = read.open_table(RETENTION).map_err(io)?;
    Ok(table
        .get(tenant)
        .map_err(io)?
        .and_then(|v| serde_json::from_slice(v.value()).ok())
        .unwrap_or_default())
}

/// Entities with history, ordered by id, optionally only those of some types.
pub fn entities(
    db: &Database,
    tenant: &str,
    types: Option<&[String]>,
) -> Result<Vec<(String, Vec<String>)>, StoreError> {
    let read = db.begin_read().map_err(io)?;
    let table = read.open_table(ENTITIES).map_err(io)?;
    let mut out = Vec::new();
    match types {
        None => {
            for row in table.range((tenant, "")..).map_err(io)? {
                let (k, v) = row.map_err(io)?;
                let (t, e) = k.value();
                if t != tenant {
                    break;
                }
                let types: Vec<String> = serde_json::from_slice(v.value()).unwrap_or_default();
                out.push((e.to_string(), types));
            }
        }
        Some(wanted) => {
            let by_type = read.open_table(TYPES).map_err(io)?;
            let mut ids = std::collections::BTreeSet::new();
            for ty in wanted {
                for row in by_type.range((tenant, ty.as_str(), "")..).map_err(io)? {
                    let (k, _) = row.map_err(io)?;
                    let (t, tt, e) = k.value();
                    if t != tenant || tt != ty {
                        break;
                    }
                    ids.insert(e.to_string());
                }
            }
            for id in ids {
                if let Some(v) = table.get((tenant, id.as_str())).map_err(io)? {
                    let types: Vec<String> = serde_json::from_slice(v.value()).unwrap_or_default();
                    out.push((id, types));
                }
            }
        }
    }
    Ok(out)
}

/// Why a read of history did not finish.
enum ReadError {
    Store(StoreError),
    /// A series lost log rows after the snapshot was taken: read again.
    Stale(Stale),
}

impl From<StoreError> for ReadError {
    fn from(e: StoreError) -> Self {
        ReadError::Store(e)
    }
}

/// Reads the tables of one snapshot, and the log index as of its generation.
struct Reader<'a> {
    hot: ReadOnlyTable<(u64, i64, u64), &'static [u8]>,
    log: ReadOnlyTable<u64, &'static [u8]>,
    index: ReadOnlyTable<(u64, i64, u64), &'static [u8]>,
    chunks: ReadOnlyTable<u64, &'static [u8]>,
    live: &'a LogIndex,
    generation: u64,
}

struct Candidate {
    no: u64,
    meta: ChunkMeta,
}

impl<'a> Reader<'a> {
    fn open(
        read: &ReadTransaction,
        live: &'a LogIndex,
        generation: u64,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            hot: read.open_table(HOT).map_err(io)?,
            log: read.open_table(LOG).map_err(io)?,
            index: read.open_table(CHUNK_INDEX).map_err(io)?,
            chunks: read.open_table(CHUNKS).map_err(io)?,
            live,
            generation,
        })
    }

    /// The series' chunks that may hold instances in `range` (under `prop`).
    fn chunks_in(
        &self,
        s: u64,
        prop: TimeProperty,
        range: TimeRange,
    ) -> Result<Vec<Candidate>, StoreError> {
        let upper = if prop == TimeProperty::ObservedAt {
            range.to
        } else {
            i64::MAX
        };
        let mut out = Vec::new();
        for row in self
            .index
            .range::<RowKey>(key_range(s, i64::MIN, upper))
            .map_err(io)?
        {
            let (k, v) = row.map_err(io)?;
            let meta = ChunkMeta::decode(v.value()).ok_or_else(|| corrupt("a chunk index"))?;
            let (min, max) = bounds(&meta, prop);
            if range.overlaps(min, max) {
                out.push(Candidate {
                    no: k.value().2,
                    meta,
                });
            }
        }
        Ok(out)
    }

    fn chunk_bytes(&self, no: u64) -> Result<Vec<u8>, StoreError> {
        Ok(self
            .chunks
            .get(no)
            .map_err(io)?
            .ok_or_else(|| corrupt("a chunk"))?
            .value()
            .to_vec())
    }

    fn chunk_rows(&self, no: u64) -> Result<Vec<Row>, StoreError> {
        chunk::decode(&self.chunk_bytes(no)?).ok_or_else(|| corrupt("a chunk"))
    }

    /// The series' hot rows, in the log and the hot table, in `range` (under `prop`).
    fn hot_rows(
        &self,
        s: u64,
        prop: TimeProperty,
        range: TimeRange,
    ) -> Result<Vec<Row>, ReadError> {
        let (from, to) = if prop == TimeProperty::ObservedAt {
            (range.from, range.to)
        } else {
            (i64::MIN, i64::MAX)
        };
        let mut out = Vec::new();
        for row in self
            .hot
            .range::<RowKey>(key_range(s, from, to))
            .map_err(io)?
        {
            let (k, v) = row.map_err(io)?;
            let (_, at, seq) = k.value();
            let attr = parse_instance(v.value())?;
            if range.contains(key_of(prop, at, &attr)) {
                out.push((at, seq, attr));
            }
        }
        let live = self
            .live
            .rows_since(s, self.generation)
            .map_err(ReadError::Stale)?;
        for (at, seq) in live {
            if at < from || (to != i64::MAX && at >= to) {
                continue;
            }
            // Rows appended after the snapshot are not in it.
            let Some(v) = self.log.get(seq).map_err(io)? else {
                continue;
            };
            let (_, attr) = parse_log_row(v.value())?;
            if range.contains(key_of(prop, at, &attr)) {
                out.push((at, seq, attr));
            }
        }
        Ok(out)
    }
}

fn bounds(meta: &ChunkMeta, prop: TimeProperty) -> (i64, i64) {
    match prop {
        TimeProperty::ObservedAt => (meta.min_at, meta.max_at),
        _ => (meta.min_written, meta.max_written),
    }
}

/// Fresh snapshots a read of history tries before it reads while nothing commits.
const READ_ATTEMPTS: usize = 4;

/// The history of one entity, or `None` if it has none.
pub fn read(
    db: &Database,
    log: &LogIndex,
    tenant: &str,
    id: &str,
    req: &HistoryRequest,
) -> Result<Option<EntityHistory>, StoreError> {
    let recovering = || {
        StoreError::Io(
            "history cannot be read until the store has recovered from a storage error".into(),
        )
    };
    for _ in 0..READ_ATTEMPTS {
        match read_once(db, log, log.generation(), tenant, id, req) {
            Ok(history) => return Ok(history),
            Err(ReadError::Store(e)) => return Err(e),
            Err(ReadError::Stale(Stale::Poisoned)) => return Err(recovering()),
            Err(ReadError::Stale(Stale::Changed)) => continue,
        }
    }
    // Its series keep leaving the log while it reads: read while no
    // transaction of the writer runs.
    let _alone = log.barrier();
    match read_once(db, log, log.generation(), tenant, id, req) {
        Ok(history) => Ok(history),
        Err(ReadError::Store(e)) => Err(e),
        Err(ReadError::Stale(_)) => Err(recovering()),
    }
}

fn read_once(
    db: &Database,
    log: &LogIndex,
    generation: u64,
    tenant: &str,
    id: &str,
    req: &HistoryRequest,
) -> Result<Option<EntityHistory>, ReadError> {
    let read = db.begin_read().map_err(io)?;
    let types: Vec<String> = match read
        .open_table(ENTITIES)
        .map_err(io)?
        .get((tenant, id))
        .map_err(io)?
    {
        Some(v) => serde_json::from_slice(v.value()).unwrap_or_default(),
        None => return Ok(None),
    };
    let series = collect_series(&read.open_table(SERIES).map_err(io)?, tenant, id)?;
    let reader = Reader::open(&read, log, generation)?;
    let mut out = EntityHistory {
        id: id.to_string(),
        types,
        attrs: Vec::new(),
        truncated: None,
    };
    for (name, dataset, s) in series {
        if req.attrs.as_ref().is_some_and(|w| !w.contains(&name)) {
            continue;
        }
        let dataset_id = (!dataset.is_empty()).then_some(dataset);
        let (body, cut) = match &req.aggregation {
            // History keeps the instances that exist: none has a deletedAt.
            _ if req.time_property == TimeProperty::DeletedAt => (empty_body(req), None),
            Some(aggr) => aggregate(&reader, s, req, &aggr.methods, aggr.period)?,
            None => instances(&reader, s, req, dataset_id.as_deref())?,
        };
        widen_cut(&mut out.truncated, cut);
        out.attrs.push(AttrHistory {
            name,
            dataset_id,
            body,
        });
    }
    Ok(Some(out))
}

fn instances(
    reader: &Reader,
    s: u64,
    req: &HistoryRequest,
    dataset: Option<&str>,
) -> Result<(HistoryBody, Cut), ReadError> {
    let prop = req.time_property;
    let mut rows = reader.hot_rows(s, prop, req.range)?;
    let mut chunks = reader.chunks_in(s, prop, req.range)?;
    let key = |r: &Row| (key_of(prop, r.0, &r.2), r.1);
    let load = |c: &Candidate, rows: &mut Vec<Row>| -> Result<(), ReadError> {
        let inside = |r: &Row| req.range.contains(key_of(prop, r.0, &r.2));
        rows.extend(reader.chunk_rows(c.no)?.into_iter().filter(inside));
        Ok(())
    };
    let mut cut = None;
    let max = req.max_instances.max(1);
    if let Some(n) = req.last_n.map(|n| n.max(1)) {
        // Newest first: stop once n instances are newer than every chunk left.
        chunks.sort_by_key(|c| std::cmp::Reverse(bounds(&c.meta, prop).1));
        for c in &chunks {
            if rows.len() >= n {
                let mut keys: Vec<i64> = rows.iter().map(|r| key(r).0).collect();
                keys.sort_unstable_by(|a, b| b.cmp(a));
                if keys[n - 1] > bounds(&c.meta, prop).1 {
                    break;
                }
            }
            load(c, &mut rows)?;
        }
        rows.sort_by_key(key);
        let skip = rows.len().saturating_sub(n);
        rows.drain(..skip);
    } else {
        chunks.sort_by_key(|c| bounds(&c.meta, prop).0);
        for c in &chunks {
            if rows.len() >= max {
                rows.sort_by_key(key);
                if key(&rows[max - 1]).0 < bounds(&c.meta, prop).0 {
                    break;
                }
            }
            load(c, &mut rows)?;
        }
        rows.sort_by_key(key);
        if rows.len() > max {
            rows.truncate(max);
            if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
                cut = Some((key(first).0, key(last).0));
            }
        }
    }
    let list = rows
        .into_iter()
        .map(|(at, seq, mut attr)| {
            attr.dataset_id = dataset.map(str::to_string);
            Instance {
                id: InstanceId { series: s, at, seq },
                attr,
            }
        })
        .collect();
    Ok((HistoryBody::Instances(list), cut))
}

fn aggregate(
    reader: &Reader,
    s: u64,
    req: &HistoryRequest,
    methods: &[AggrMethod],
    period: Option<borough_core::temporal::Period>,
) -> Result<(HistoryBody, Cut), ReadError> {
    let prop = req.time_property;
    let hot = reader.hot_rows(s, prop, req.range)?;
    let mut chunks = reader.chunks_in(s, prop, req.range)?;
    chunks.sort_by_key(|c| bounds(&c.meta, prop).0);
    let mut kind = hot.first().map(|r| r.2.kind);
    // The buckets start at timeAt, else at the first instance.
    let first = hot
        .iter()
        .map(|r| key_of(prop, r.0, &r.2))
        .chain(chunks.iter().map(|c| bounds(&c.meta, prop).0))
        .min();
    let last = hot
        .iter()
        .map(|r| key_of(prop, r.0, &r.2))
        .chain(chunks.iter().map(|c| bounds(&c.meta, prop).1))
        .max();
    let (Some(first), Some(last)) = (first, last) else {
        return Ok((
            HistoryBody::Aggregated {
                kind: kind.unwrap_or(AttrKind::Property),
                buckets: Vec::new(),
            },
            None,
        ));
    };
    let (origin, limit) = bucket_span(req, first, last, period.is_some());
    let mut acc = BucketMap::new(methods, req.max_instances);
    let summary_only = methods.iter().all(|m| m.from_summary());
    let mut values: Vec<(i64, f64)> = Vec::new();
    for c in &chunks {
        let (min, max) = bounds(&c.meta, prop);
        let mut b = Buckets::new(period, origin, limit);
        let numeric = c.meta.summary.count == c.meta.summary.numbers;
        if summary_only && numeric && req.range.contains(min) && req.range.contains(max) {
            // A chunk inside one bucket is aggregated from its summary alone.
            if b.advance_to(min) && max < b.current().1 {
                if let Some(a) = acc.get(b.current()) {
                    a.summary.merge(&c.meta.summary);
                }
                kind.get_or_insert(AttrKind::Property);
                continue;
            }
        }
        let bytes = reader.chunk_bytes(c.no)?;
        if let Some(cols) = chunk::columns(&bytes) {
            kind.get_or_insert(AttrKind::Property);
            let keys = if prop == TimeProperty::ObservedAt {
                &cols.at
            } else {
                &cols.written
            };
            values.clear();
            values.extend(
                keys.iter()
                    .zip(&cols.values)
                    .filter(|(k, _)| req.range.contains(**k))
                    .map(|(k, v)| (*k, *v)),
            );
            values.sort_by_key(|(k, _)| *k);
            let mut b = Buckets::new(period, origin, limit);
            for (k, v) in &values {
                if !b.advance_to(*k) {
                    break;
                }
                if let Some(a) = acc.get(b.current()) {
                    a.add_number(*v);
                }
            }
        } else {
            let rows = chunk::decode(&bytes).ok_or_else(|| corrupt("a chunk"))?;
            acc.add_rows(
                &rows,
                prop,
                req.range,
                Buckets::new(period, origin, limit),
                &mut kind,
            );
        }
    }
    acc.add_rows(
        &hot,
        prop,
        req.range,
        Buckets::new(period, origin, limit),
        &mut kind,
    );
    let (buckets, cut) = acc.finish();
    Ok((
        HistoryBody::Aggregated {
            kind: kind.unwrap_or(AttrKind::Property),
            buckets,
        },
        cut,
    ))
}
