//! The only code that touches RocksDB: one database per node, shared by every
//! Raft group, every key prefixed by its group id (see [`keys`]).
//!
//! Durability rules (see ARCHITECTURE.md, "group commit"):
//! - log appends are written unsynced and acknowledged by the [`GroupCommit`]
//!   flusher after one WAL sync that covers every append queued before it;
//! - votes are written synced before returning;
//! - an applied batch (data + last_applied + membership) is one `WriteBatch`
//!   written unsynced: it shares the WAL with the log, whose committed entries
//!   are already synced, so a crash only re-applies from the log;
//! - WAL records wait in RocksDB's buffer (`manual_wal_flush`) until the
//!   flusher's sync or a synced write writes them out: one `write(2)` per
//!   sync instead of one per batch. A crash, even `SIGKILL`, may thus lose the
//!   unsynced tail of the WAL, which holds only unacknowledged appends and
//!   applied batches that are re-applied from the log; the WAL is written in
//!   order, so what survives is always a prefix (an applied batch never
//!   outlives the log entries it applied, nor a purge the snapshot behind it).
//! - obsolete WAL files are reused ([`RECYCLED_WAL_FILES`]), so a sync does
//!   not also write the file's size and extents; recovery stops at the first
//!   record of a file's previous life.

pub mod keys;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType, Direction,
    IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions,
};

use keys::{GroupId, RaftStateTag, SmMetaTag};

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// RocksDB reported an error.
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// A column family that open() creates is missing.
    #[error("column family {0} is missing")]
    MissingCf(&'static str),
    /// The group-commit flusher thread has stopped.
    #[error("group-commit flusher stopped")]
    FlusherStopped,
    /// A file-system operation failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl From<StorageError> for std::io::Error {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Io(io) => io,
            other => std::io::Error::other(other),
        }
    }
}

/// Result of storage operations.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// A callback completed by the group-commit flusher once the WAL is synced.
pub type FlushCallback = Box<dyn FnOnce(std::io::Result<()>) + Send>;

/// One node's RocksDB. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    // Field order matters: `flusher` drops last, and its drop joins the WAL
    // thread, so the database is closed before the last Store is gone (never
    // by a thread racing the process's exit).
    db: Arc<DB>,
    flusher: Arc<GroupCommit>,
}

/// Memtable size of the records column family. Apply reads and writes records
/// at random keys, and in a 64 MiB memtable (RocksDB's default) each skiplist
/// search and insert walks cache-cold nodes: with 8 MiB the W4 order benchmark
/// placed 20–25 % more orders (bench/RESULTS.md, 2026-11-26); puts unchanged.
const DATA_WRITE_BUFFER_BYTES: usize = 8 << 20;

/// Obsolete WAL files kept for reuse (RocksDB's `recycle_log_file_num`). An
/// append to a new WAL file grows it, so each `fdatasync` must also write the
/// inode (its size) and the extent that turned from preallocated to written:
/// four waits on the disk per sync instead of two (data, cache flush). A
/// recycled file is overwritten in place, so neither changes — etcd
/// preallocates its WAL segments for the same reason. WAL files switch with
/// every memtable flush, but become obsolete in bursts when the log's column
/// family flushes; with 4 most new files under W1 were still fresh, with 16
/// nearly every switch reused one (W1 puts +5 %, bench/RESULTS.md
/// 2026-11-27). Costs up to this many WAL files of disk. Recovery tells a
/// recycled file's old records from new ones by their log number (RocksDB 10
/// supports it with the default point-in-time recovery).
const RECYCLED_WAL_FILES: usize = 16;

/// Tuning of a [`Store`] that comes from the node's configuration.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreOptions {
    /// How long the WAL sync thread waits for more appends before a sync,
    /// when the previous sync covered at least [`GROUP_COMMIT_MIN_BATCH`]
    /// (zero: sync at once, always).
    pub group_commit_delay: Duration,
}

/// Appends the previous WAL sync must have covered for the next one to wait
/// [`StoreOptions::group_commit_delay`]: a single writer is never delayed
/// (PostgreSQL's `commit_delay` likewise applies only with `commit_siblings`).
pub const GROUP_COMMIT_MIN_BATCH: usize = 2;

impl Store {
    /// Opens (creating if needed) the database under `path`.
    pub fn open(path: &Path, options: StoreOptions) -> Result<Store> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        // Logs are purged after snapshots; keep the WAL small enough that
        // memtables of cold groups are flushed rather than pinning old WAL files.
        opts.set_max_total_wal_size(128 << 20);
        // See the module header: the flusher writes the WAL buffer when it
        // syncs (W1 puts and W4 orders +5–8 % in same-minute duels).
        opts.set_manual_wal_flush(true);
        opts.set_recycle_log_file_num(RECYCLED_WAL_FILES);
        let cfs = keys::ALL_CFS.iter().map(|name| {
            let mut cf_opts = Options::default();
            cf_opts.set_compression_type(if *name == keys::CF_DATA {
                DBCompressionType::Lz4
            } else {
                DBCompressionType::None
            });
            if *name == keys::CF_DATA {
                cf_opts.set_write_buffer_size(DATA_WRITE_BUFFER_BYTES);
                // Point reads of absent records (a new order's reservation,
                // a transaction tombstone) skip the SST files that lack them.
                let mut table = BlockBasedOptions::default();
                table.set_bloom_filter(10.0, false);
                cf_opts.set_block_based_table_factory(&table);
            }
            ColumnFamilyDescriptor::new(*name, cf_opts)
        });
        let db = Arc::new(DB::open_cf_descriptors(&opts, path, cfs)?);
        let flusher = Arc::new(GroupCommit::start(db.clone(), options.group_commit_delay)?);
        Ok(Store { db, flusher })
    }

    fn cf(&self, name: &'static str) -> Result<&ColumnFamily> {
        self.db.cf_handle(name).ok_or(StorageError::MissingCf(name))
    }

    fn synced() -> WriteOptions {
        let mut w = WriteOptions::default();
        w.set_sync(true);
        w
    }

    // ---- node identity ----------------------------------------------------

    /// Reads the node identity record, if this data dir has one.
    pub fn node_identity(&self) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(keys::NODE_IDENTITY)?)
    }

    /// Writes the node identity record (synced).
    pub fn put_node_identity(&self, value: &[u8]) -> Result<()> {
        self.db
            .put_opt(keys::NODE_IDENTITY, value, &Self::synced())?;
        Ok(())
    }

    // ---- raft log ---------------------------------------------------------

    /// Writes log entries of one group in one batch, unsynced: call
    /// [`Store::flush_then`] to learn when they are durable. `committed`, if
    /// given, is the group's committed log id, written in the same batch.
    pub fn append_log(
        &self,
        group: GroupId,
        entries: &[(u64, Vec<u8>)],
        committed: Option<&[u8]>,
    ) -> Result<()> {
        let cf = self.cf(keys::CF_RAFT_LOG)?;
        let mut batch = WriteBatch::default();
        for (index, bytes) in entries {
            batch.put_cf(cf, keys::log_key(group, *index), bytes);
        }
        if let Some(value) = committed {
            let state = self.cf(keys::CF_RAFT_STATE)?;
            batch.put_cf(
                state,
                keys::raft_state_key(group, RaftStateTag::Committed),
                value,
            );
        }
        self.db.write(batch)?;
        Ok(())
    }

    /// Flushes every column family's memtable, so the WAL files before it
    /// become obsolete (tests of WAL recycling).
    #[cfg(test)]
    fn flush_memtables(&self) -> Result<()> {
        for name in keys::ALL_CFS {
            self.db.flush_cf(self.cf(name)?)?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// Queues `callback` to run after the next WAL sync (group commit).
    pub fn flush_then(&self, callback: FlushCallback) -> Result<()> {
        self.flusher.enqueue(callback)
    }

    /// WAL syncs the group-commit flusher has run (for tests and metrics).
    pub fn wal_syncs(&self) -> u64 {
        self.flusher.syncs.load(Ordering::Relaxed)
    }

    /// Log entries of `group` with index in `start..end`, in order.
    pub fn read_log(&self, group: GroupId, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        if start >= end {
            return Ok(Vec::new());
        }
        let cf = self.cf(keys::CF_RAFT_LOG)?;
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(keys::log_key(group, end).to_vec());
        let from = keys::log_key(group, start);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf_opt(cf, ro, IteratorMode::From(&from, Direction::Forward))
        {
            let (k, v) = item?;
            if let Some(index) = keys::log_index_of(&k) {
                out.push((index, v.to_vec()));
            }
        }
        Ok(out)
    }

    /// The last log entry of `group`, if any.
    pub fn last_log(&self, group: GroupId) -> Result<Option<(u64, Vec<u8>)>> {
        let cf = self.cf(keys::CF_RAFT_LOG)?;
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(keys::group_prefix(group).to_vec());
        let upper = keys::log_key(group, u64::MAX);
        let mut iter =
            self.db
                .iterator_cf_opt(cf, ro, IteratorMode::From(&upper, Direction::Reverse));
        match iter.next() {
            Some(item) => {
                let (k, v) = item?;
                Ok(keys::log_index_of(&k).map(|i| (i, v.to_vec())))
            }
            None => Ok(None),
        }
    }

    /// Deletes log entries of `group` with index >= `from`.
    pub fn truncate_log_from(&self, group: GroupId, from: u64) -> Result<()> {
        let cf = self.cf(keys::CF_RAFT_LOG)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            cf,
            keys::log_key(group, from).to_vec(),
            keys::group_end(group),
        );
        // The very last index is not covered by a range ending at the next group
        // only when group == u64::MAX; delete it explicitly to be exact.
        batch.delete_cf(cf, keys::log_key(group, u64::MAX));
        self.db.write(batch)?;
        Ok(())
    }

    /// Deletes log entries of `group` with index <= `upto` and records the
    /// last purged log id in the same batch.
    pub fn purge_log_upto(&self, group: GroupId, upto: u64, last_purged: &[u8]) -> Result<()> {
        let log = self.cf(keys::CF_RAFT_LOG)?;
        let state = self.cf(keys::CF_RAFT_STATE)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            state,
            keys::raft_state_key(group, RaftStateTag::LastPurged),
            last_purged,
        );
        let end = upto.saturating_add(1);
        batch.delete_range_cf(log, keys::log_key(group, 0), keys::log_key(group, end));
        if upto == u64::MAX {
            batch.delete_cf(log, keys::log_key(group, u64::MAX));
        }
        self.db.write(batch)?;
        Ok(())
    }

    // ---- raft state -------------------------------------------------------

    /// Reads one per-group Raft state value.
    pub fn raft_state(&self, group: GroupId, tag: RaftStateTag) -> Result<Option<Vec<u8>>> {
        let cf = self.cf(keys::CF_RAFT_STATE)?;
        Ok(self.db.get_cf(cf, keys::raft_state_key(group, tag))?)
    }

    /// Writes one per-group Raft state value; `sync` waits for the WAL fsync.
    pub fn put_raft_state(
        &self,
        group: GroupId,
        tag: RaftStateTag,
        value: &[u8],
        sync: bool,
    ) -> Result<()> {
        let cf = self.cf(keys::CF_RAFT_STATE)?;
        let opts = if sync {
            Self::synced()
        } else {
            WriteOptions::default()
        };
        self.db
            .put_cf_opt(cf, keys::raft_state_key(group, tag), value, &opts)?;
        Ok(())
    }

    // ---- state machine ----------------------------------------------------

    /// Reads one per-group state-machine meta value.
    pub fn sm_meta(&self, group: GroupId, tag: SmMetaTag) -> Result<Option<Vec<u8>>> {
        let cf = self.cf(keys::CF_SM_META)?;
        Ok(self.db.get_cf(cf, keys::sm_meta_key(group, tag))?)
    }

    /// Reads one record of `group`.
    pub fn get_record(&self, group: GroupId, record_key: &[u8]) -> Result<Option<Vec<u8>>> {
        let cf = self.cf(keys::CF_DATA)?;
        Ok(self.db.get_cf(cf, keys::data_key(group, record_key))?)
    }

    /// Records of `group` whose record key starts with `prefix`, at most
    /// `limit` of them, in key order.
    pub fn scan_records(
        &self,
        group: GroupId,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan_records_after(group, prefix, None, limit)
    }

    /// Like [`Store::scan_records`], starting after record key `after` (for
    /// pagination; `after` should start with `prefix`).
    pub fn scan_records_after(
        &self,
        group: GroupId,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let cf = self.cf(keys::CF_DATA)?;
        // The smallest key greater than `after` is `after · 0x00`.
        let start = match after.filter(|a| a >= &prefix) {
            Some(a) => {
                let mut k = keys::data_key(group, a);
                k.push(0);
                k
            }
            None => keys::data_key(group, prefix),
        };
        let upper = match keys::prefix_successor(prefix) {
            Some(succ) => keys::data_key(group, &succ),
            None => keys::group_end(group),
        };
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(upper);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf_opt(cf, ro, IteratorMode::From(&start, Direction::Forward))
        {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            out.push((keys::record_key_of(&k).to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Visits `group`'s records under `prefix` in key order, from one RocksDB
    /// snapshot, until `visit` returns false; returns the stored applied log
    /// id of that same snapshot (encoded; `None` before any apply), so the
    /// caller knows exactly which applied prefix it saw.
    pub fn visit_records_as_applied(
        &self,
        group: GroupId,
        prefix: &[u8],
        mut visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<Option<Vec<u8>>> {
        let data = self.cf(keys::CF_DATA)?;
        let meta = self.cf(keys::CF_SM_META)?;
        let snap = self.db.snapshot();
        let last_applied = snap.get_cf(meta, keys::sm_meta_key(group, SmMetaTag::LastApplied))?;
        let upper = match keys::prefix_successor(prefix) {
            Some(succ) => keys::data_key(group, &succ),
            None => keys::group_end(group),
        };
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(upper);
        ro.set_snapshot(&snap);
        let start = keys::data_key(group, prefix);
        for item in
            self.db
                .iterator_cf_opt(data, ro, IteratorMode::From(&start, Direction::Forward))
        {
            let (k, v) = item?;
            if !visit(keys::record_key_of(&k), &v) {
                break;
            }
        }
        Ok(last_applied)
    }

    /// Starts a batch of applied changes for `group`.
    pub fn apply_batch(&self, group: GroupId) -> ApplyBatch {
        ApplyBatch {
            group,
            batch: WriteBatch::default(),
        }
    }

    /// Writes an applied batch (unsynced; see the module doc).
    pub fn commit_apply(&self, batch: ApplyBatch) -> Result<()> {
        self.db.write(batch.batch)?;
        Ok(())
    }

    /// Reads a point-in-time view of `group`'s state machine: its meta values
    /// and every record, all from one RocksDB snapshot.
    pub fn read_group_snapshot(&self, group: GroupId) -> Result<GroupImage> {
        let data = self.cf(keys::CF_DATA)?;
        let meta = self.cf(keys::CF_SM_META)?;
        let snap = self.db.snapshot();
        let last_applied = snap.get_cf(meta, keys::sm_meta_key(group, SmMetaTag::LastApplied))?;
        let membership = snap.get_cf(meta, keys::sm_meta_key(group, SmMetaTag::Membership))?;
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(keys::group_end(group));
        ro.set_snapshot(&snap);
        let start = keys::group_prefix(group);
        let mut records = Vec::new();
        for item in
            self.db
                .iterator_cf_opt(data, ro, IteratorMode::From(&start, Direction::Forward))
        {
            let (k, v) = item?;
            records.push((keys::record_key_of(&k).to_vec(), v.to_vec()));
        }
        Ok(GroupImage {
            last_applied,
            membership,
            records,
        })
    }

    /// Replaces `group`'s state machine with `image` in one synced batch.
    pub fn install_group_snapshot(&self, group: GroupId, image: &GroupImage) -> Result<()> {
        let data = self.cf(keys::CF_DATA)?;
        let meta = self.cf(keys::CF_SM_META)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            data,
            keys::group_prefix(group).to_vec(),
            keys::group_end(group),
        );
        for (k, v) in &image.records {
            batch.put_cf(data, keys::data_key(group, k), v);
        }
        for (tag, value) in [
            (SmMetaTag::LastApplied, &image.last_applied),
            (SmMetaTag::Membership, &image.membership),
        ] {
            let key = keys::sm_meta_key(group, tag);
            match value {
                Some(v) => batch.put_cf(meta, key, v),
                None => batch.delete_cf(meta, key),
            }
        }
        self.db.write_opt(batch, &Self::synced())?;
        Ok(())
    }
}

/// A point-in-time image of one group's state machine (snapshot contents).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupImage {
    /// Encoded last applied log id.
    pub last_applied: Option<Vec<u8>>,
    /// Encoded last applied membership.
    pub membership: Option<Vec<u8>>,
    /// (record key, encoded record) pairs in key order.
    pub records: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The writes of one applied batch of one group: records, last_applied and
/// membership go to disk together or not at all.
pub struct ApplyBatch {
    group: GroupId,
    batch: WriteBatch,
}

impl ApplyBatch {
    /// Sets a record.
    pub fn put_record(&mut self, store: &Store, record_key: &[u8], value: &[u8]) -> Result<()> {
        let cf = store.cf(keys::CF_DATA)?;
        self.batch
            .put_cf(cf, keys::data_key(self.group, record_key), value);
        Ok(())
    }

    /// Deletes a record.
    pub fn delete_record(&mut self, store: &Store, record_key: &[u8]) -> Result<()> {
        let cf = store.cf(keys::CF_DATA)?;
        self.batch
            .delete_cf(cf, keys::data_key(self.group, record_key));
        Ok(())
    }

    /// Sets a state-machine meta value.
    pub fn put_meta(&mut self, store: &Store, tag: SmMetaTag, value: &[u8]) -> Result<()> {
        let cf = store.cf(keys::CF_SM_META)?;
        self.batch
            .put_cf(cf, keys::sm_meta_key(self.group, tag), value);
        Ok(())
    }
}

/// The node's single WAL flusher: every callback queued before a sync starts
/// is completed by that sync, so one fsync covers many appends of many groups.
/// Under concurrent load it first waits `delay` for more appends: fewer,
/// larger syncs leave CPU to the rest of the write path (W1 puts +9–15 % at
/// 500 µs on the 2-core bench machine, bench/RESULTS.md 2026-11-26; 1 ms
/// since 2026-11-27), and each append still waits for its own fsync.
struct GroupCommit {
    tx: Option<mpsc::Sender<FlushCallback>>,
    syncs: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GroupCommit {
    fn start(db: Arc<DB>, delay: Duration) -> Result<GroupCommit> {
        let (tx, rx) = mpsc::channel::<FlushCallback>();
        let syncs = Arc::new(AtomicU64::new(0));
        let counter = syncs.clone();
        let thread = std::thread::Builder::new()
            .name("shopkv-wal-sync".into())
            .spawn(move || {
                // Ends when the sender is dropped (see Drop below).
                let mut last_batch = 0;
                while let Ok(first) = rx.recv() {
                    if !delay.is_zero() && last_batch >= GROUP_COMMIT_MIN_BATCH {
                        std::thread::sleep(delay);
                    }
                    let mut waiting = vec![first];
                    waiting.extend(rx.try_iter());
                    last_batch = waiting.len();
                    let res = db.flush_wal(true);
                    counter.fetch_add(1, Ordering::Relaxed);
                    for cb in waiting {
                        cb(res.clone().map_err(std::io::Error::other));
                    }
                }
            })?;
        Ok(GroupCommit {
            tx: Some(tx),
            syncs,
            thread: Some(thread),
        })
    }

    fn enqueue(&self, cb: FlushCallback) -> Result<()> {
        self.tx
            .as_ref()
            .ok_or(StorageError::FlusherStopped)?
            .send(cb)
            .map_err(|_| StorageError::FlusherStopped)
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take()
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Queues a sync behind what was written and waits for it: its result.
    fn sync(store: &Store) -> bool {
        let (tx, rx) = mpsc::channel();
        store
            .flush_then(Box::new(move |r| tx.send(r.is_ok()).unwrap()))
            .unwrap();
        rx.recv().unwrap()
    }

    #[test]
    fn an_append_can_carry_the_committed_log_id_of_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        store.append_log(3, &[(1, vec![1])], None).unwrap();
        assert_eq!(store.raft_state(3, RaftStateTag::Committed).unwrap(), None);
        store.append_log(3, &[(2, vec![2])], Some(b"c1")).unwrap();
        assert_eq!(
            store.raft_state(3, RaftStateTag::Committed).unwrap(),
            Some(b"c1".to_vec())
        );
        assert_eq!(store.raft_state(4, RaftStateTag::Committed).unwrap(), None);
        assert_eq!(store.read_log(3, 1, 3).unwrap().len(), 2);
    }

    #[test]
    fn a_lone_writer_is_never_held_by_the_group_commit_delay() {
        let dir = tempfile::tempdir().unwrap();
        let delay = Duration::from_secs(2);
        let store = Store::open(
            dir.path(),
            StoreOptions {
                group_commit_delay: delay,
            },
        )
        .unwrap();
        let started = std::time::Instant::now();
        for i in 0..20u64 {
            store.append_log(1, &[(i, vec![7])], None).unwrap();
            assert!(sync(&store), "sync {i} failed");
        }
        // Each sync covered one append, so none waited: far less than one delay.
        assert!(
            started.elapsed() < delay,
            "20 lone appends took {:?}",
            started.elapsed()
        );
        assert_eq!(store.wal_syncs(), 20);
    }

    #[test]
    fn one_wal_sync_covers_every_append_queued_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let (tx, rx) = mpsc::channel();
        const APPENDS: u64 = 200;
        for i in 0..APPENDS {
            let group = i % 4;
            store
                .append_log(group, &[(i, vec![1, 2, 3])], None)
                .unwrap();
            let tx = tx.clone();
            store
                .flush_then(Box::new(move |res| {
                    tx.send(res.is_ok()).unwrap();
                }))
                .unwrap();
        }
        for _ in 0..APPENDS {
            assert!(rx.recv().unwrap(), "a sync failed");
        }
        let syncs = store.wal_syncs();
        assert!(
            (1..APPENDS / 4).contains(&syncs),
            "{syncs} syncs for {APPENDS} appends"
        );
        // Everything appended is readable, per group, in order.
        let g1: Vec<u64> = store
            .read_log(1, 0, u64::MAX)
            .unwrap()
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(g1, (0..APPENDS).filter(|i| i % 4 == 1).collect::<Vec<_>>());
    }

    /// Set in the child process of the recycled-WAL crash test.
    const CRASH_CHILD_DIR: &str = "SHOPKV_TEST_RECYCLED_WAL_CHILD";
    /// Synced appends of the crash test, one per round; each 256 KiB.
    const CRASH_ROUNDS: u64 = 12;

    fn crash_entry(index: u64) -> Vec<u8> {
        vec![index as u8; 256 << 10]
    }

    /// The child: appends and syncs one entry per round, flushing the
    /// memtables after each (a WAL switch; the old file becomes obsolete and
    /// is kept for reuse, so later rounds write into recycled files, over
    /// older and longer records), then appends one entry it never syncs and
    /// dies without closing anything.
    fn crash_child(dir: &Path) -> ! {
        let store = Store::open(dir, StoreOptions::default()).unwrap();
        for index in 0..CRASH_ROUNDS {
            // Early rounds write more, so a recycled file's old records
            // outlast the new ones written over them.
            let filler: Vec<_> = (0..(CRASH_ROUNDS - index))
                .map(|i| (1_000_000 + index * 100 + i, crash_entry(index)))
                .collect();
            store.append_log(2, &filler, None).unwrap();
            store
                .append_log(1, &[(index, crash_entry(index))], None)
                .unwrap();
            assert!(sync(&store));
            if index + 1 < CRASH_ROUNDS {
                store.flush_memtables().unwrap();
            }
        }
        store
            .append_log(1, &[(CRASH_ROUNDS, crash_entry(CRASH_ROUNDS))], None)
            .unwrap();
        std::process::abort();
    }

    #[test]
    fn a_crash_while_writing_a_recycled_wal_keeps_every_synced_append() {
        if let Some(dir) = std::env::var_os(CRASH_CHILD_DIR) {
            crash_child(Path::new(&dir));
        }
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "storage::tests::a_crash_while_writing_a_recycled_wal_keeps_every_synced_append",
                "--nocapture",
            ])
            .env(CRASH_CHILD_DIR, dir.path())
            .status()
            .unwrap();
        // By abort() at the end, not by a failed step before it (exit 101).
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGABRT), "child: {status}");
        // The test is only meaningful if RocksDB did reuse WAL files.
        let log = std::fs::read_to_string(dir.path().join("LOG")).unwrap();
        assert!(
            log.contains("reusing log"),
            "no WAL file was recycled in the child"
        );
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let got = store.read_log(1, 0, u64::MAX).unwrap();
        let indexes: Vec<u64> = got.iter().map(|(i, _)| *i).collect();
        // Every synced append survives; the unsynced one may or may not.
        assert!(
            indexes.starts_with(&(0..CRASH_ROUNDS).collect::<Vec<_>>()),
            "synced appends lost: {indexes:?}"
        );
        assert!(indexes.len() as u64 <= CRASH_ROUNDS + 1, "{indexes:?}");
        for (index, bytes) in &got {
            assert!(*bytes == crash_entry(*index), "entry {index} corrupted");
        }
    }

    #[test]
    fn dropping_the_last_store_closes_the_database_before_returning() {
        // The WAL thread holds the database too; if it closed it later, the
        // reopen below would find RocksDB's lock still held (and a process
        // exiting meanwhile could abort in RocksDB's teardown).
        let dir = tempfile::tempdir().unwrap();
        for round in 0..20u64 {
            let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
            store.append_log(1, &[(round, vec![7])], None).unwrap();
            assert!(sync(&store));
            let clone = store.clone();
            drop(store);
            drop(clone);
        }
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(store.read_log(1, 0, u64::MAX).unwrap().len(), 20);
    }

    #[test]
    fn purge_and_truncate_touch_only_their_group() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        for g in [1u64, 2] {
            let entries: Vec<_> = (1..=10).map(|i| (i, vec![g as u8])).collect();
            store.append_log(g, &entries, None).unwrap();
        }
        store.purge_log_upto(1, 4, b"p").unwrap();
        store.truncate_log_from(1, 8).unwrap();
        let idx = |g| -> Vec<u64> {
            store
                .read_log(g, 0, u64::MAX)
                .unwrap()
                .into_iter()
                .map(|(i, _)| i)
                .collect()
        };
        assert_eq!(idx(1), vec![5, 6, 7]);
        assert_eq!(idx(2), (1..=10).collect::<Vec<_>>());
        assert_eq!(store.last_log(1).unwrap().map(|(i, _)| i), Some(7));
        assert_eq!(
            store.raft_state(1, RaftStateTag::LastPurged).unwrap(),
            Some(b"p".to_vec())
        );
    }
}
