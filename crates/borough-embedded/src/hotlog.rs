//! The history log: new attribute instances are appended to one table keyed
//! by their sequence number, so a group's instances land on a few adjacent
//! pages at the end of one B-tree. Keyed by series instead, each instance
//! dirtied a page of its own: with 10,000 devices reporting, the writer
//! spent most of its time copying, writing and re-reading those pages, and
//! a device reading took four times as long to commit with history as without.
//!
//! Which log rows belong to which series is kept in memory ([`LogIndex`]).
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

const HEADER: usize = 16;

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

/// A log row of a series: (time key, sequence number).
pub type LiveRow = (i64, u64);

#[derive(Default)]
struct Live {
    /// Series → its live rows, in sequence order.
    rows: HashMap<u64, Vec<LiveRow>>,
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

/// Log rows kept before the series holding the oldest leave the log.
pub const DEFAULT_WINDOW: u64 = 1_000_000;

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
    pub fn reset(&self, rows: HashMap<u64, Vec<LiveRow>>) {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let oldest = rows
            .iter()
            .filter_map(|(s, r)| r.first().map(|f| (f.1, *s)))
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
    pub fn push(&self, series: u64, at: i64, seq: u64) {
        let mut live = self.write();
        let rows = live.rows.entry(series).or_default();
        rows.push((at, seq));
        if rows.len() == 1 {
            live.oldest.insert((seq, series));
        }
    }

    /// The series' live rows.
    pub fn rows(&self, series: u64) -> Vec<LiveRow> {
        self.read().rows.get(&series).cloned().unwrap_or_default()
    }

    /// Whether the row is live in the series.
    pub fn contains(&self, series: u64, seq: u64) -> bool {
        self.read()
            .rows
            .get(&series)
            .is_some_and(|r| r.binary_search_by_key(&seq, |r| r.1).is_ok())
    }

    /// Removes every live row of the series and returns them.
    pub fn take(&self, series: u64) -> Vec<LiveRow> {
        let mut live = self.write();
        let Some(rows) = live.rows.remove(&series) else {
            return Vec::new();
        };
        if let Some(first) = rows.first() {
            live.oldest.remove(&(first.1, series));
        }
        self.mark_removed(&mut live, series);
        rows
    }

    /// Removes the rows of the series that `drop` selects and returns them.
    pub fn remove_where(&self, series: u64, drop: impl Fn(&LiveRow) -> bool) -> Vec<LiveRow> {
        let mut live = self.write();
        let Some(rows) = live.rows.get_mut(&series) else {
            return Vec::new();
        };
        let first = rows.first().map(|f| f.1);
        let (gone, kept): (Vec<LiveRow>, Vec<LiveRow>) = rows.iter().partition(|r| drop(r));
        if gone.is_empty() {
            return gone;
        }
        let new_first = kept.first().map(|f| f.1);
        if kept.is_empty() {
            live.rows.remove(&series);
        } else {
            *rows = kept;
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
        Ok(live.rows.get(&series).cloned().unwrap_or_default())
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
        index.push(7, 100, 1);
        index.push(8, 100, 2);
        index.push(7, 200, 3);
        index.committed();
        let before = index.generation();
        assert_eq!(index.rows_since(7, before).unwrap(), vec![(100, 1), (200, 3)]);
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
        index.push(8, 300, 4);
        index.committed();
        assert_eq!(index.generation(), after);
    }

    #[test]
    fn the_oldest_series_come_first_and_follow_removals() {
        let index = LogIndex::default();
        index.push(1, 0, 10);
        index.push(2, 0, 11);
        index.push(1, 5, 12);
        index.push(3, 0, 13);
        assert_eq!(index.older_than(12, 10), vec![1, 2]);
        assert_eq!(index.first_live(), Some(10));
        let gone = index.remove_where(1, |r| r.0 < 5);
        assert_eq!(gone, vec![(0, 10)]);
        assert_eq!(index.older_than(14, 10), vec![2, 1, 3]);
        assert!(index.contains(1, 12) && !index.contains(1, 10));
        index.take(2);
        assert_eq!(index.first_live(), Some(12));
    }

    #[test]
    fn a_poisoned_index_refuses_readers_until_reset() {
        let index = LogIndex::default();
        index.push(1, 0, 1);
        index.poison();
        assert!(matches!(index.rows_since(1, index.generation()), Err(Stale::Poisoned)));
        let mut rows = HashMap::new();
        rows.insert(1, vec![(0, 1)]);
        index.reset(rows);
        assert_eq!(index.rows_since(1, index.generation()).unwrap(), vec![(0, 1)]);
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
