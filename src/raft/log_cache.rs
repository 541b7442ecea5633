//! The in-memory tail of one group's Raft log.
//!
//! Every entry is read back soon after it is appended: by each replication
//! stream (to send it) and by the state machine worker (to apply it). Reading
//! it from RocksDB costs an iterator, a memtable seek and a decode per read
//! (~5 % of a node's CPU under the put benchmark); cloning it from here costs
//! a copy. TiKV keeps the same kind of entry cache in front of its raft engine.
//!
//! Invariant: when not empty, the cache is a contiguous suffix of the log (its
//! last entry is the log's last entry), because it mirrors every change to the
//! log's tail: appends (always at the tail), truncation and purge.

use std::collections::VecDeque;

use openraft::type_config::alias::EntryOf;

use super::TypeConfig;

/// Most entries kept per group.
pub const MAX_CACHED_LOG_ENTRIES: usize = 512;
/// Most encoded bytes kept per group (at least the newest entry is kept, so a
/// single larger entry still passes through).
pub const MAX_CACHED_LOG_BYTES: usize = 8 << 20;

type Entry = EntryOf<TypeConfig>;

/// A bounded suffix of one group's log, with each entry's encoded size.
#[derive(Default)]
pub struct LogCache {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl LogCache {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index)
    }

    /// Records entries just written at the log's tail (with their encoded
    /// sizes). Entries that do not continue the cached suffix replace it: they
    /// are the log's new tail.
    pub fn append(&mut self, appended: Vec<(Entry, usize)>) {
        let Some((first, _)) = appended.first() else {
            return;
        };
        if self.last_index().map(|l| l.saturating_add(1)) != Some(first.log_id.index) {
            self.clear();
        }
        for (entry, size) in appended {
            self.bytes = self.bytes.saturating_add(size);
            self.entries.push_back((entry, size));
        }
        while self.entries.len() > MAX_CACHED_LOG_ENTRIES
            || (self.bytes > MAX_CACHED_LOG_BYTES && self.entries.len() > 1)
        {
            self.pop_front();
        }
    }

    /// Drops the entries at `from` and after (the log was truncated there).
    pub fn truncate_from(&mut self, from: u64) {
        while self.last_index().is_some_and(|l| l >= from) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes = self.bytes.saturating_sub(size);
            }
        }
    }

    /// Drops the entries up to and including `upto` (the log was purged).
    pub fn purge_upto(&mut self, upto: u64) {
        while self.first_index().is_some_and(|f| f <= upto) {
            self.pop_front();
        }
    }

    /// Entries in `[start, end)`, if the cache can answer for all of them:
    /// `start` must not be before its first entry. Indexes past its last
    /// entry are past the log's end, so they are rightly absent.
    pub fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        if start < first {
            return None;
        }
        let skip = usize::try_from(start - first).unwrap_or(usize::MAX);
        Some(
            self.entries
                .iter()
                .skip(skip)
                .take_while(|(e, _)| e.log_id.index < end)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }

    fn pop_front(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes = self.bytes.saturating_sub(size);
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64) -> (Entry, usize) {
        (openraft::testing::blank_ent::<TypeConfig>(1, 1, index), 10)
    }

    fn indexes(v: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        v.map(|v| v.iter().map(|e| e.log_id.index).collect())
    }

    #[test]
    fn answers_only_ranges_that_start_inside_the_cached_suffix() {
        let mut c = LogCache::default();
        assert_eq!(indexes(c.get(1, 5)), None);
        c.append((5..=9).map(entry).collect());
        assert_eq!(indexes(c.get(6, 8)), Some(vec![6, 7]));
        assert_eq!(indexes(c.get(8, u64::MAX)), Some(vec![8, 9]));
        assert_eq!(indexes(c.get(12, 20)), Some(vec![]));
        assert_eq!(indexes(c.get(4, 8)), None, "index 4 is only on disk");
    }

    #[test]
    fn follows_truncation_purge_and_a_new_tail() {
        let mut c = LogCache::default();
        c.append((1..=10).map(entry).collect());
        c.truncate_from(8);
        assert_eq!(indexes(c.get(6, 100)), Some(vec![6, 7]));
        c.append((8..=9).map(entry).collect());
        assert_eq!(indexes(c.get(7, 100)), Some(vec![7, 8, 9]));
        c.purge_upto(7);
        assert_eq!(indexes(c.get(7, 100)), None);
        assert_eq!(indexes(c.get(8, 100)), Some(vec![8, 9]));
        // An append that does not continue the suffix replaces it.
        c.append((20..=21).map(entry).collect());
        assert_eq!(indexes(c.get(8, 100)), None);
        assert_eq!(indexes(c.get(20, 100)), Some(vec![20, 21]));
    }

    #[test]
    fn stays_within_its_bounds() {
        let mut c = LogCache::default();
        c.append(
            (1..=(MAX_CACHED_LOG_ENTRIES as u64 + 10))
                .map(entry)
                .collect(),
        );
        assert_eq!(c.entries.len(), MAX_CACHED_LOG_ENTRIES);
        assert_eq!(c.first_index(), Some(11));
        let (big, _) = entry(MAX_CACHED_LOG_ENTRIES as u64 + 11);
        c.append(vec![(big, MAX_CACHED_LOG_BYTES + 1)]);
        assert_eq!(
            c.entries.len(),
            1,
            "an entry over the byte bound is kept alone"
        );
    }
}
