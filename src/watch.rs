//! The watch hub: each group's recently applied changes on this node, in log
//! order, so watchers (the `Watch` service, lock waiters, election observers)
//! can follow a key or prefix from a revision (the group's log index) without
//! polling.
//!
//! The state machine publishes, after each applied batch is written (its
//! entries are committed, so durable in the log), the changed records of every
//! entry whose keys are watchable ([`keys::is_watchable`]). The history is kept in memory and bounded in
//! bytes per group, like etcd's compaction: a watcher asking for a revision
//! older than what this node still holds gets [`Compacted`] and must re-read
//! the current state (or ask another node). A restarted node's history starts
//! at the index it had applied when it started; an installed snapshot starts
//! it again after the snapshot.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::watch;

use crate::storage::keys::GroupId;

/// Bytes of history kept per group (keys, values and a fixed overhead per change).
pub const HISTORY_BYTES_PER_GROUP: usize = 16 << 20;
/// Overhead counted per change on top of its key and value.
const CHANGE_OVERHEAD_BYTES: usize = 64;

/// One record written or deleted by an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Record key (see `storage::keys`).
    pub record_key: Vec<u8>,
    /// The new stored value; `None` for a delete.
    pub value: Option<Vec<u8>>,
}

/// The watchable changes of one applied entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Log index of the entry (the revision).
    pub revision: u64,
    /// Its changes, in the order apply made them (last write of a key wins).
    pub changes: Vec<Change>,
}

impl Event {
    fn bytes(&self) -> usize {
        self.changes
            .iter()
            .map(|c| {
                CHANGE_OVERHEAD_BYTES + c.record_key.len() + c.value.as_ref().map_or(0, Vec::len)
            })
            .sum()
    }
}

/// The revision asked for is older than this node's history of the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("revision {asked} of group {group} is compacted on this node; history starts at {first}")]
pub struct Compacted {
    /// Group.
    pub group: GroupId,
    /// The revision asked for.
    pub asked: u64,
    /// The oldest revision still available.
    pub first: u64,
}

struct History {
    events: VecDeque<Arc<Event>>,
    bytes: usize,
    /// Every watchable change at a revision ≥ this is in `events`.
    first: u64,
    /// Last applied index published (entries without watchable changes count).
    applied: u64,
}

struct GroupSlot {
    history: Mutex<History>,
    /// The last applied index, for waking cursors.
    applied_tx: watch::Sender<u64>,
}

/// Every local group's history.
#[derive(Default)]
pub struct WatchHub {
    groups: RwLock<BTreeMap<GroupId, Arc<GroupSlot>>>,
}

impl WatchHub {
    /// An empty hub.
    pub fn new() -> WatchHub {
        WatchHub::default()
    }

    /// Starts (or restarts) `group`'s history after `applied`, the index the
    /// state machine has applied so far.
    pub fn register(&self, group: GroupId, applied: u64) {
        let slot = self.slot_or_insert(group, applied);
        slot.reset(applied);
    }

    fn slot_or_insert(&self, group: GroupId, applied: u64) -> Arc<GroupSlot> {
        if let Some(s) = self.slot(group) {
            return s;
        }
        let mut groups = match self.groups.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        groups
            .entry(group)
            .or_insert_with(|| {
                Arc::new(GroupSlot {
                    history: Mutex::new(History {
                        events: VecDeque::new(),
                        bytes: 0,
                        first: applied + 1,
                        applied,
                    }),
                    applied_tx: watch::channel(applied).0,
                })
            })
            .clone()
    }

    fn slot(&self, group: GroupId) -> Option<Arc<GroupSlot>> {
        let groups = match self.groups.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        groups.get(&group).cloned()
    }

    /// Publishes an applied batch: its watchable events and the last index it applied.
    pub fn publish(&self, group: GroupId, events: Vec<Event>, applied: u64) {
        let slot = self.slot_or_insert(group, applied);
        {
            let mut h = slot.lock();
            for e in events {
                h.bytes += e.bytes();
                h.events.push_back(Arc::new(e));
            }
            while h.bytes > HISTORY_BYTES_PER_GROUP {
                let Some(old) = h.events.pop_front() else {
                    break;
                };
                h.bytes -= old.bytes();
                h.first = old.revision + 1;
            }
            h.applied = h.applied.max(applied);
        }
        slot.applied_tx.send_replace(applied);
    }

    /// The snapshot installed in `group` covers everything up to `applied`:
    /// the changes it carried were never seen as events.
    pub fn reset(&self, group: GroupId, applied: u64) {
        self.register(group, applied);
    }

    /// The last index of `group` applied on this node (0 if unknown here).
    pub fn applied(&self, group: GroupId) -> u64 {
        self.slot(group).map_or(0, |s| s.lock().applied)
    }

    /// A cursor over `group`'s events from revision `from` (0 = after
    /// everything applied so far).
    pub fn cursor(&self, group: GroupId, from: u64) -> Cursor {
        let slot = self.slot_or_insert(group, 0);
        let next = if from == 0 {
            slot.lock().applied + 1
        } else {
            from
        };
        Cursor {
            group,
            applied_rx: slot.applied_tx.subscribe(),
            slot,
            next,
        }
    }
}

impl GroupSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, History> {
        match self.history.lock() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        }
    }

    fn reset(&self, applied: u64) {
        {
            let mut h = self.lock();
            h.events.clear();
            h.bytes = 0;
            h.first = applied + 1;
            h.applied = applied;
        }
        self.applied_tx.send_replace(applied);
    }
}

/// A position in one group's history.
pub struct Cursor {
    group: GroupId,
    slot: Arc<GroupSlot>,
    applied_rx: watch::Receiver<u64>,
    next: u64,
}

impl Cursor {
    /// The group followed.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The next revision this cursor will return.
    pub fn next_revision(&self) -> u64 {
        self.next
    }

    /// The events from the cursor on that are already here (possibly none),
    /// advancing past everything applied so far.
    pub fn poll(&mut self) -> Result<Vec<Arc<Event>>, Compacted> {
        let h = self.slot.lock();
        if self.next < h.first && self.next <= h.applied {
            return Err(Compacted {
                group: self.group,
                asked: self.next,
                first: h.first,
            });
        }
        let start = h.events.partition_point(|e| e.revision < self.next);
        let out: Vec<Arc<Event>> = h.events.range(start..).cloned().collect();
        self.next = self.next.max(h.applied + 1);
        Ok(out)
    }

    /// Waits until the group applies something past the cursor, then
    /// returns what is new (possibly no watchable event).
    pub async fn next_batch(&mut self) -> Result<Vec<Arc<Event>>, Compacted> {
        loop {
            let applied = *self.applied_rx.borrow_and_update();
            if applied >= self.next {
                return self.poll();
            }
            if self.applied_rx.changed().await.is_err() {
                // The hub is gone (node shutting down): nothing more will come.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(revision: u64, key: &[u8]) -> Event {
        Event {
            revision,
            changes: vec![Change {
                record_key: key.to_vec(),
                value: Some(vec![0; 10]),
            }],
        }
    }

    #[test]
    fn cursor_replays_from_a_revision_and_then_follows() {
        let hub = WatchHub::new();
        hub.register(1, 10);
        hub.publish(1, vec![ev(11, b"a"), ev(13, b"b")], 14);
        let mut c = hub.cursor(1, 12);
        let got: Vec<u64> = c.poll().unwrap().iter().map(|e| e.revision).collect();
        assert_eq!(got, vec![13]);
        assert_eq!(c.next_revision(), 15);
        assert!(c.poll().unwrap().is_empty());
        hub.publish(1, vec![ev(16, b"c")], 16);
        let got: Vec<u64> = c.poll().unwrap().iter().map(|e| e.revision).collect();
        assert_eq!(got, vec![16]);
    }

    #[test]
    fn revisions_before_the_history_are_compacted() {
        let hub = WatchHub::new();
        hub.register(1, 10);
        let mut c = hub.cursor(1, 5);
        assert_eq!(
            c.poll(),
            Err(Compacted {
                group: 1,
                asked: 5,
                first: 11
            })
        );
        // From now on: nothing old asked, nothing compacted.
        let mut now = hub.cursor(1, 0);
        assert_eq!(now.next_revision(), 11);
        assert!(now.poll().unwrap().is_empty());
    }

    #[test]
    fn history_is_bounded_in_bytes() {
        let hub = WatchHub::new();
        hub.register(2, 0);
        let big = vec![0u8; 1 << 20];
        for i in 1..=40u64 {
            hub.publish(
                2,
                vec![Event {
                    revision: i,
                    changes: vec![Change {
                        record_key: b"k".to_vec(),
                        value: Some(big.clone()),
                    }],
                }],
                i,
            );
        }
        let mut c = hub.cursor(2, 1);
        let err = c.poll().unwrap_err();
        assert!(err.first > 1 && err.first <= 40, "{err:?}");
        let mut c = hub.cursor(2, err.first);
        let n = c.poll().unwrap().len() as u64;
        assert_eq!(n, 41 - err.first);
        assert!(n * (1 << 20) <= HISTORY_BYTES_PER_GROUP as u64);
    }

    #[tokio::test]
    async fn next_batch_waits_for_an_apply() {
        let hub = Arc::new(WatchHub::new());
        hub.register(0, 3);
        let mut c = hub.cursor(0, 0);
        let h = hub.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            h.publish(0, vec![ev(4, b"x")], 4);
        });
        let got = c.next_batch().await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].revision, 4);
    }
}
