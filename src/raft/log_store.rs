//! The Raft log of one group, stored in the node's RocksDB (`raft_log` and
//! `raft_state` column families). Appends are acknowledged by the node's
//! group-commit flusher after the WAL fsync. Reads of recent entries are
//! answered from a [`LogCache`] of the log's tail.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};

use super::TypeConfig;
use super::log_cache::LogCache;
use crate::codec;
use crate::storage::Store;
use crate::storage::keys::{GroupId, RaftStateTag};

/// Log storage of one group. Cheap to clone (openraft uses clones as readers).
#[derive(Clone)]
pub struct LogStore {
    group: GroupId,
    store: Store,
    /// The latest committed log id openraft saved, encoded, not yet written: it
    /// rides in the next append's batch instead of costing a write per commit.
    unsaved_committed: Option<Vec<u8>>,
    /// The log's tail in memory, shared with every reader clone. Each change
    /// to the log is written to RocksDB first, then mirrored here.
    cache: Arc<Mutex<LogCache>>,
}

impl LogStore {
    /// The log of `group` in `store`.
    pub fn new(group: GroupId, store: Store) -> LogStore {
        LogStore {
            group,
            store,
            unsaved_committed: None,
            cache: Arc::new(Mutex::new(LogCache::default())),
        }
    }

    /// Runs `f` on the cache. A poisoned lock (a panic while it was held)
    /// empties the cache, which is always safe: reads then go to RocksDB.
    fn with_cache<T>(&self, f: impl FnOnce(&mut LogCache) -> T) -> T {
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| {
            let mut c = poisoned.into_inner();
            *c = LogCache::default();
            c
        });
        f(&mut cache)
    }

    fn read_state<T: serde::de::DeserializeOwned>(
        &self,
        tag: RaftStateTag,
    ) -> io::Result<Option<T>> {
        match self.store.raft_state(self.group, tag)? {
            Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
            None => Ok(None),
        }
    }
}

fn index_range<RB: RangeBounds<u64>>(range: &RB) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(x) => *x,
        Bound::Excluded(x) => x.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(x) => x.saturating_add(1),
        Bound::Excluded(x) => *x,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<EntryOf<TypeConfig>>> {
        let (start, end) = index_range(&range);
        if let Some(entries) = self.with_cache(|c| c.get(start, end)) {
            return Ok(entries);
        }
        self.store
            .read_log(self.group, start, end)?
            .into_iter()
            .map(|(_, bytes)| Ok(codec::decode(&bytes)?))
            .collect()
    }

    async fn read_vote(&mut self) -> io::Result<Option<VoteOf<TypeConfig>>> {
        self.read_state(RaftStateTag::Vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let last_purged: Option<LogIdOf<TypeConfig>> = self.read_state(RaftStateTag::LastPurged)?;
        let last_log = match self.store.last_log(self.group)? {
            Some((_, bytes)) => {
                let entry: EntryOf<TypeConfig> = codec::decode(&bytes)?;
                Some(entry.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last_log,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> io::Result<()> {
        // A vote must be on disk before it is acted upon: synced write.
        self.store
            .put_raft_state(self.group, RaftStateTag::Vote, &codec::encode(vote)?, true)?;
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<TypeConfig>>) -> io::Result<()> {
        // Written with the next append (see `unsaved_committed`). A committed
        // index that is behind after a crash is safe: the leader re-sends it.
        self.unsaved_committed = Some(codec::encode(&committed)?);
        Ok(())
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogIdOf<TypeConfig>>> {
        if let Some(bytes) = &self.unsaved_committed {
            return Ok(codec::decode::<Option<LogIdOf<TypeConfig>>>(bytes)?);
        }
        Ok(self
            .read_state::<Option<LogIdOf<TypeConfig>>>(RaftStateTag::Committed)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = EntryOf<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<EntryOf<TypeConfig>> = entries.into_iter().collect();
        let encoded = entries
            .iter()
            .map(|e| Ok((e.log_id.index, codec::encode(e)?)))
            .collect::<io::Result<Vec<_>>>()?;
        // Readable as soon as written; durable (and acknowledged) after the
        // flusher's next WAL sync, which covers every append queued before it.
        let committed = self.unsaved_committed.take();
        self.store
            .append_log(self.group, &encoded, committed.as_deref())?;
        let sized = entries
            .into_iter()
            .zip(encoded.iter().map(|(_, bytes)| bytes.len()))
            .collect();
        self.with_cache(|c| c.append(sized));
        self.store
            .flush_then(Box::new(move |res| callback.io_completed(res)))?;
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<TypeConfig>>) -> io::Result<()> {
        let from = last_log_id.map_or(0, |l| l.index.saturating_add(1));
        self.store.truncate_log_from(self.group, from)?;
        self.with_cache(|c| c.truncate_from(from));
        Ok(())
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> io::Result<()> {
        self.store
            .purge_log_upto(self.group, log_id.index, &codec::encode(&log_id)?)?;
        self.with_cache(|c| c.purge_upto(log_id.index));
        Ok(())
    }
}
