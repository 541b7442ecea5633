//! What a node reports about its replicas for `Cluster.Status`: Raft progress
//! per group, the 2PC work in flight, and a digest of a replica's records.

use openraft::RaftMetrics;
use openraft::async_runtime::WatchReceiver;

use crate::codec;
use crate::raft::TypeConfig;
use crate::router::META_GROUP;
use crate::sm::commerce::{CommerceRead, CommerceReadResult};
use crate::storage::keys::GroupId;

use super::{Node, NodeError, ReadOp, ReadResult};

/// Most in-flight 2PC records of each kind one status report counts.
const MAX_IN_FLIGHT_REPORTED: u32 = 10_000;

/// One replica's view of a group, for `Cluster.Status`.
#[derive(Debug, Clone, Default)]
pub struct ReplicaInfo {
    /// Group id.
    pub group: GroupId,
    /// Voter ids in the replica's membership.
    pub members: Vec<u64>,
    /// Leader/Follower/Candidate/Learner.
    pub state: String,
    /// Current term.
    pub term: u64,
    /// Known leader (0 = none).
    pub leader: u64,
    /// Last log index.
    pub last_log_index: u64,
    /// Committed index.
    pub commit_index: u64,
    /// Applied index.
    pub applied_index: u64,
    /// Last snapshot index.
    pub snapshot_index: u64,
    /// Last purged index.
    pub purged_index: u64,
    /// Cross-shard order work in flight here (undecided transactions,
    /// settlements owed, orders holding stock), data shards only.
    pub txns_in_flight: u32,
    /// Age of the oldest of those, in ms (0 if none).
    pub oldest_txn_age_ms: u64,
}

impl Node {
    /// A hash of `group`'s records on this replica and the applied index it
    /// reflects, both from one RocksDB point-in-time view.
    pub fn group_digest(&self, group: GroupId) -> Result<(u64, u64), NodeError> {
        let image = self.store.read_group_snapshot(group)?;
        let applied = match &image.last_applied {
            Some(b) => codec::decode::<openraft::type_config::alias::LogIdOf<TypeConfig>>(b)?.index,
            None => 0,
        };
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for (k, v) in &image.records {
            h.update(&(k.len() as u64).to_be_bytes());
            h.update(k);
            h.update(&(v.len() as u64).to_be_bytes());
            h.update(v);
        }
        Ok((applied, h.digest()))
    }

    /// This node's view of every group it hosts.
    pub fn local_status(&self) -> Vec<ReplicaInfo> {
        self.local_groups()
            .into_iter()
            .map(|(group, raft)| {
                let mut info = replica_info(group, &raft.metrics().borrow_watched());
                if group != META_GROUP {
                    (info.txns_in_flight, info.oldest_txn_age_ms) = self.txns_in_flight(group);
                }
                info
            })
            .collect()
    }

    /// (count, oldest age in ms) of the 2PC work in flight in this replica's
    /// state; a read failure shows as none (status must not fail on it).
    fn txns_in_flight(&self, group: GroupId) -> (u32, u64) {
        let op = ReadOp::Commerce(CommerceRead::InFlight {
            limit: MAX_IN_FLIGHT_REPORTED,
        });
        let Ok(ReadResult::Commerce(CommerceReadResult::InFlight(f))) = self.read_local(group, &op)
        else {
            return (0, 0);
        };
        let mut ids = std::collections::BTreeSet::new();
        let mut oldest = u64::MAX;
        for (id, since) in f
            .pending
            .iter()
            .map(|(id, r)| (id, r.created_ms))
            .chain(f.settlements.iter().map(|(id, e)| (id, e.since_ms)))
            .chain(f.held.iter().map(|(id, h)| (id, h.prepared_ms)))
        {
            ids.insert(id.as_str());
            oldest = oldest.min(since);
        }
        let age = match oldest {
            u64::MAX => 0,
            since => crate::clock::now_ms().saturating_sub(since),
        };
        (u32::try_from(ids.len()).unwrap_or(u32::MAX), age)
    }
}

fn replica_info(group: GroupId, m: &RaftMetrics<TypeConfig>) -> ReplicaInfo {
    ReplicaInfo {
        group,
        members: m.membership_config.membership().voter_ids().collect(),
        state: format!("{:?}", m.state),
        term: m.current_term,
        leader: m.current_leader.unwrap_or(0),
        last_log_index: m.last_log_index.unwrap_or(0),
        commit_index: m.local_committed.as_ref().map_or(0, |l| l.index),
        applied_index: m.last_applied.as_ref().map_or(0, |l| l.index),
        snapshot_index: m.snapshot.as_ref().map_or(0, |l| l.index),
        purged_index: m.purged.as_ref().map_or(0, |l| l.index),
        txns_in_flight: 0,
        oldest_txn_age_ms: 0,
    }
}
