//! The history log: new attribute instances are appended to one table keyed
//! by their sequence number, so a group's instances land on a few adjacent
//! pages at the end of one B-tree. Keyed by series instead, each instance
//! dirtied a page of its own: with 10,000 devices reporting, the writer
//! spent most of its time copying, writing and re-reading those pages, and
//! a device reading took four times as long to commit with history as without.
//!
//! Which log rows belong to which series is kept in memory ([`LogIndex`]),
//! with their content, so that a series leaves the log without reading its
//! rows back from pages scattered over the whole window.
//! A series leaves the log whole: sealed into a chunk, or, when its rows are
//! the oldest of the log's window and too few for a chunk, moved to the hot
//! table keyed by series. Rows that left stay in the file, marked by the
//! series' watermark in [`LOG_MOVED`], until the log is truncated below its
//! oldest live row: no scattered deletes.
//!
//! Readers take the rows of a series from the index and the rows themselves
//! from their redb snapshot. A transaction that removes rows from the index
//! marks those series with the generation it will commit as; a reader that
//! began before finds the mark and reads again, so it never combines a
//! snapshot from before a move with an index from after it.

use foldhash::HashMap;
use redb::TableDefinition;
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Sequence number → an instance in the log: its series and time key (8
/// bytes each, little-endian), then the attribute (JSON).
pub const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("history_log");
/// Series → the last sequence number of its log rows that left the log
/// (sealed, or moved to the hot table); later rows of the series are live.
pub const LOG_MOVED: TableDefinition<u64, u64> = TableDefinition::new("history_log_moved");

/// Bytes before a log row's attribute.
pub const HEADER: usize = 16;

/// Starts a log row in `buf`: the attribute's JSON follows.
pub fn begin_row(buf: &mut Vec<u8>, series: u64, at: i64) {
    buf.clear();
    buf.extend_from_slice(&series.to_le_bytes());
    buf.extend_from_slice(&at.to_le_bytes());
}

/// A log row's series, time key and attribute JSON.
pub fn split_row(bytes: &[u8]) -> Option<(u64, i64, &[u8])> {
    let series = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let at = i64::from_le_bytes(bytes.get(8..HEADER)?.try_into().ok()?);
    Some((series, at, bytes.get(HEADER..)?))
}

/// Removals remembered per series; older ones are forgotten and readers
/// from before them read again whatever their series.
const REMEMBERED_REMOVALS: usize = 65_536;

/// A log row of a series as readers see it: (time key, sequence number).
pub type LiveRow = (i64, u64);

/// A live log row, with its attribute (JSON).
pub struct LogRow {
    pub at: i64,
    pub seq: u64,
    pub json: Box<[u8]>,
}

#[derive(Default)]
struct Live {
    /// Series → its live rows, in sequence order.
    rows: HashMap<u64, Vec<LogRow>>,
    /// (first live sequence number, series): the series holding the log's
    /// oldest rows come first.
    oldest: BTreeSet<(u64, u64)>,
    /// Series that lost rows → the generation of the transaction that removed them.
    removed: HashMap<u64, u64>,
    removed_order: VecDeque<(u64, u64)>,
    /// Readers that began before this generation cannot tell which series changed.
    horizon: u64,
    /// The running transaction removed rows: its commit starts a generation.
    removing: bool,
    /// A transaction failed after changing the index; it is read again from the file.
    poisoned: bool,
}

/// Why a reader must start again.
#[derive(Debug)]
pub enum Stale {
    /// The series lost rows after the reader's snapshot was taken.
    Changed,
    /// The index is being rebuilt after a failed transaction.
    Poisoned,
}

/// Log rows kept before the series holding the oldest leave the log: about
/// 40 MB of rows in memory. Larger, a series moves more rows at once to the
/// hot table; with 10,000 devices reporting, 524,288 rows (twice the
/// memory) measured no faster.
pub const DEFAULT_WINDOW: u64 = 262_144;

/// The in-memory index of the log's live rows, shared by the writer and readers.
pub struct LogIndex {
    /// Rows the log keeps before the series holding the oldest leave it.
    window: u64,
    live: RwLock<Live>,
    /// The generation of the last committed transaction that removed rows.
    generation: AtomicU64,
    /// Held by the writer through each history transaction; a reader that
    /// keeps meeting changes holds it to read while nothing commits.
    barrier: Mutex<()>,
}

impl Default for LogIndex {
    fn default() -> Self {
        Self::new(DEFAULT_WINDOW)
    }
}

impl LogIndex {
    pub fn new(window: u64) -> Self {
        Self {
            window: window.max(1),
            live: RwLock::default(),
            generation: AtomicU64::new(0),
            barrier: Mutex::new(()),
        }
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    fn read(&self) -> RwLockReadGuard<'_, Live> {
        self.live.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Live> {
        self.live.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The generation a reader takes before opening its snapshot.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Waits until no history transaction runs, and keeps it so while held.
    pub fn barrier(&self) -> MutexGuard<'_, ()> {
        self.barrier.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the index with rows read from the file (at open, and after a
    /// failure): readers that began before read again.
    pub fn reset(&self, rows: HashMap<u64, Vec<LogRow>>) {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let oldest = rows
            .iter()
            .filter_map(|(s, r)| r.first().map(|f| (f.seq, *s)))
            .collect();
        *self.write() = Live {
            rows,
            oldest,
            horizon: generation,
            ..Live::default()
        };
    }

    /// Marks the index unusable until [`LogIndex::reset`].
    pub fn poison(&self) {
        self.write().poisoned = true;
    }

    /// The writer appended a row.
    pub fn push(&self, series: u64, at: i64, seq: u64, json: &[u8]) {
        let mut live = self.write();
        let rows = live.rows.entry(series).or_default();
        rows.push(LogRow {
            at,
            seq,
            json: json.into(),
        });
        if rows.len() == 1 {
            live.oldest.insert((seq, series));
        }
    }

    /// The attributes (JSON) of the series' live rows with time key `at`.
    pub fn at(&self, series: u64, at: i64) -> Vec<Box<[u8]>> {
        self.read().rows.get(&series).map_or_else(Vec::new, |rows| {
            rows.iter()
                .filter(|r| r.at == at)
                .map(|r| r.json.clone())
                .collect()
        })
    }

    /// The attribute (JSON) of a live row.
    pub fn get(&self, series: u64, seq: u64) -> Option<Box<[u8]>> {
        let live = self.read();
        let rows = live.rows.get(&series)?;
        let i = rows.binary_search_by_key(&seq, |r| r.seq).ok()?;
        Some(rows[i].json.clone())
    }

    /// Replaces the attribute of a live row.
    pub fn replace(&self, series: u64, seq: u64, json: &[u8]) {
        let mut live = self.write();
        if let Some(rows) = live.rows.get_mut(&series)
            && let Ok(i) = rows.binary_search_by_key(&seq, |r| r.seq)
        {
            rows[i].json = json.into();
        }
    }

    /// Removes every live row of the series and returns them.
    pub fn take(&self, series: u64) -> Vec<LogRow> {
        let mut live = self.write();
        let Some(rows) = live.rows.remove(&series) else {
            return Vec::new();
        };
        if let Some(first) = rows.first() {
            live.oldest.remove(&(first.seq, series));
        }
        self.mark_removed(&mut live, series);
        rows
    }

    /// Removes the rows of the series that `drop` selects (by time key and
    /// sequence number) and returns them.
    pub fn remove_where(&self, series: u64, drop: impl Fn(i64, u64) -> bool) -> Vec<LogRow> {
        let mut live = self.write();
        let Some(rows) = live.rows.get_mut(&series) else {
            return Vec::new();
        };
        let first = rows.first().map(|f| f.seq);
        let (gone, kept): (Vec<LogRow>, Vec<LogRow>) = std::mem::take(rows)
            .into_iter()
            .partition(|r| drop(r.at, r.seq));
        *rows = kept;
        if gone.is_empty() {
            return gone;
        }
        let kept = &*rows;
        let new_first = kept.first().map(|f| f.seq);
        if kept.is_empty() {
            live.rows.remove(&series);
        }
        if first != new_first {
            if let Some(f) = first {
                live.oldest.remove(&(f, series));
            }
            if let Some(f) = new_first {
                live.oldest.insert((f, series));
            }
        }
        self.mark_removed(&mut live, series);
        gone
    }

    fn mark_removed(&self, live: &mut Live, series: u64) {
        let generation = self.generation() + 1;
        live.removing = true;
        live.removed.insert(series, generation);
        live.removed_order.push_back((generation, series));
        while live.removed_order.len() > REMEMBERED_REMOVALS {
            let Some((g, s)) = live.removed_order.pop_front() else {
                break;
            };
            if live.removed.get(&s) == Some(&g) {
                live.removed.remove(&s);
            }
            live.horizon = live.horizon.max(g);
        }
    }

    /// Up to `limit` series whose first live row is older than `seq`.
    pub fn older_than(&self, seq: u64, limit: usize) -> Vec<u64> {
        self.read()
            .oldest
            .iter()
            .take_while(|(first, _)| *first < seq)
            .take(limit)
            .map(|(_, s)| *s)
            .collect()
    }

    /// The oldest live row's sequence number, if any.
    pub fn first_live(&self) -> Option<u64> {
        self.read().oldest.first().map(|(seq, _)| *seq)
    }

    /// The writer's transaction committed: its removals become a generation.
    pub fn committed(&self) {
        let mut live = self.write();
        if std::mem::take(&mut live.removing) {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// A reader's copy of the series' live rows, if nothing was removed
    /// from the series since generation `since`.
    pub fn rows_since(&self, series: u64, since: u64) -> Result<Vec<LiveRow>, Stale> {
        let live = self.read();
        if live.poisoned {
            return Err(Stale::Poisoned);
        }
        if since < live.horizon || live.removed.get(&series).is_some_and(|g| *g > since) {
            return Err(Stale::Changed);
        }
        Ok(live.rows.get(&series).map_or_else(Vec::new, |rows| {
            rows.iter().map(|r| (r.at, r.seq)).collect()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foldhash::HashMapExt;

    #[test]
    fn a_reader_from_before_a_removal_is_told_to_read_again() {
        let index = LogIndex::default();
        index.reset(HashMap::new());
        index.push(7, 100, 1, b"{}");
        index.push(8, 100, 2, b"{}");
        index.push(7, 200, 3, b"{}");
        index.committed();
        let before = index.generation();
        assert_eq!(
            index.rows_since(7, before).unwrap(),
            vec![(100, 1), (200, 3)]
        );
        // A seal takes series 7's rows: until and after it commits, a reader
        // from before must not combine its snapshot with the new index.
        assert_eq!(index.take(7).len(), 2);
        assert!(matches!(index.rows_since(7, before), Err(Stale::Changed)));
        index.committed();
        assert!(matches!(index.rows_since(7, before), Err(Stale::Changed)));
        let after = index.generation();
        assert_eq!(after, before + 1);
        assert_eq!(index.rows_since(7, after).unwrap(), vec![]);
        // Other series are untouched.
        assert_eq!(index.rows_since(8, before).unwrap(), vec![(100, 2)]);
        // Appends alone start no generation.
        index.push(8, 300, 4, b"{}");
        index.committed();
        assert_eq!(index.generation(), after);
    }

    #[test]
    fn the_oldest_series_come_first_and_follow_removals() {
        let index = LogIndex::default();
        index.push(1, 0, 10, b"a");
        index.push(2, 0, 11, b"b");
        index.push(1, 5, 12, b"c");
        index.push(3, 0, 13, b"d");
        assert_eq!(index.older_than(12, 10), vec![1, 2]);
        assert_eq!(index.first_live(), Some(10));
        let gone = index.remove_where(1, |at, _| at < 5);
        assert_eq!(
            gone.iter().map(|r| (r.at, r.seq)).collect::<Vec<_>>(),
            vec![(0, 10)]
        );
        assert_eq!(index.get(1, 12).as_deref(), Some(&b"c"[..]));
        index.replace(1, 12, b"e");
        assert_eq!(index.at(1, 5), vec![Box::from(&b"e"[..])]);
        assert_eq!(index.older_than(14, 10), vec![2, 1, 3]);
        assert!(index.get(1, 12).is_some() && index.get(1, 10).is_none());
        index.take(2);
        assert_eq!(index.first_live(), Some(12));
    }

    #[test]
    fn a_poisoned_index_refuses_readers_until_reset() {
        let index = LogIndex::default();
        index.push(1, 0, 1, b"{}");
        index.poison();
        assert!(matches!(
            index.rows_since(1, index.generation()),
            Err(Stale::Poisoned)
        ));
        let mut rows = HashMap::new();
        rows.insert(
            1,
            vec![LogRow {
                at: 0,
                seq: 1,
                json: Box::from(&b"{}"[..]),
            }],
        );
        index.reset(rows);
        assert_eq!(
            index.rows_since(1, index.generation()).unwrap(),
            vec![(0, 1)]
        );
    }

    #[test]
    fn rows_round_trip_through_their_header() {
        let mut buf = Vec::new();
        begin_row(&mut buf, 42, -7);
        buf.extend_from_slice(b"{}");
        assert_eq!(split_row(&buf), Some((42, -7, &b"{}"[..])));
        assert_eq!(split_row(&buf[..10]), None);
    }
}
