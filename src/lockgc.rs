//! Lock collection: what a lock name leaves behind is deleted once it can no
//! longer matter, so that names used once (a lock per order, per cart) do not
//! pile up for ever.
//!
//! A lock name leaves two kinds of records: its lock record in the meta group
//! (kept while idle, with the last token given) and, on each data shard a
//! fenced write with it reached, its fence record (the highest token seen).
//! Every [`crate::config::Config::lock_gc_interval_ms`]:
//!
//! - the meta leader reads every lock record from one point-in-time view of
//!   its replica, proposes `Forget` for the idle ones (apply keeps any joined
//!   since), and computes the **fence floor** and the holds it excepts: the
//!   oldest (at most [`MAX_FENCE_HELD`]) are excepted, and the floor is
//!   min(the view's applied index, the next held token − 1). Tokens are meta
//!   log indices given when a hold starts, so a token up to the floor was
//!   given by then and, unless its hold is excepted, was not held in that
//!   view: its hold is over, for good. The floor is thus safe from any
//!   replica's view, however stale. (Without the exceptions, one long hold,
//!   an election's leader, would pin the floor below every later token.) It
//!   proposes `RaiseFenceFloor` to every data shard (apply takes a higher
//!   floor with its list, never a lower one); a fenced write with a token at
//!   or below its shard's floor, not an excepted hold's, is refused;
//! - each data shard's leader deletes the fence records whose token is at or
//!   below its floor, but those of locks with an excepted hold (`DropFences`;
//!   apply re-checks each): the floor refuses everything they would.
//!
//! Each pass handles at most [`MAX_BATCHES_PER_PASS`] batches of each kind;
//! one that found more is followed by the next at once (after
//! [`CATCH_UP_PAUSE`]), so a backlog is worked off in passes back to back.

use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::codec;
use crate::node::{MAX_FORWARD_HOPS, Node, NodeError};
use crate::router::META_GROUP;
use crate::sm::lock::{LockCommand, LockRecord, LockResponse, MAX_FORGET_BATCH};
use crate::sm::{Command, MAX_DROP_FENCES_BATCH, MAX_FENCE_HELD, Response};
use crate::storage::keys::{self, GroupId};

/// Most batches of each kind (forgets, fence drops per shard) one pass proposes.
pub const MAX_BATCHES_PER_PASS: usize = 10;
/// Idle locks one pass forgets.
const IDLE_PER_PASS: usize = MAX_FORGET_BATCH * MAX_BATCHES_PER_PASS;
/// Fence records one pass drops on one shard.
const DROPS_PER_PASS: usize = MAX_DROP_FENCES_BATCH * MAX_BATCHES_PER_PASS;
/// The pause between passes while one found more than it could take (a
/// backlog is worked off at once, not one pass per interval).
const CATCH_UP_PAUSE: Duration = Duration::from_millis(100);
/// Deadline of each proposal a pass makes.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the meta group's lock records say, read from one view.
#[derive(Debug, Default)]
struct LockCensus {
    /// The oldest holds in the view (token, lock), at most
    /// [`MAX_FENCE_HELD`] + 1: the floor excepts all but the last.
    oldest_held: BinaryHeap<(u64, String)>,
    /// A record could not be decoded (it might hold any token).
    unreadable: bool,
    /// Idle locks (empty queue), at most a pass's worth.
    idle: Vec<String>,
}

impl LockCensus {
    /// Takes in one lock record.
    fn observe(&mut self, record_key: &[u8], value: &[u8]) {
        let rec: LockRecord = match codec::decode(value) {
            Ok(rec) => rec,
            Err(_) => {
                self.unreadable = true;
                return;
            }
        };
        let Some(name) = keys::lock_name_of(record_key) else {
            self.unreadable = true;
            return;
        };
        for token in rec.queue.iter().map(|e| e.token).filter(|t| *t != 0) {
            // A max-heap of the smallest tokens: the largest goes first.
            self.oldest_held.push((token, name.to_string()));
            if self.oldest_held.len() > MAX_FENCE_HELD + 1 {
                self.oldest_held.pop();
            }
        }
        if rec.queue.is_empty() && self.idle.len() < IDLE_PER_PASS {
            self.idle.push(name.to_string());
        }
    }

    /// The fence floor of a view that had applied the meta log up to
    /// `applied`, and the holds (lock, token) it excepts: every token up to
    /// the floor belongs to a hold that is over, but the excepted ones (the
    /// oldest, at most [`MAX_FENCE_HELD`]; past them the floor stays below
    /// the next). `None` when a record could not be read.
    fn fence_floor(&self, applied: u64) -> Option<(u64, Vec<(String, u64)>)> {
        if self.unreadable {
            return None;
        }
        let mut oldest = self.oldest_held.clone().into_sorted_vec();
        let floor = match oldest.get(MAX_FENCE_HELD) {
            Some((next, _)) => applied.min(next - 1),
            None => applied,
        };
        oldest.truncate(MAX_FENCE_HELD);
        Some((
            floor,
            oldest.into_iter().map(|(t, name)| (name, t)).collect(),
        ))
    }
}

/// The collection loop; runs until the node is dropped.
pub async fn run(node: Weak<Node>) {
    let Some(interval_ms) = node.upgrade().map(|n| n.config.lock_gc_interval_ms) else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_millis(interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once: a starting node has nothing to collect yet.
    tick.tick().await;
    // Floors raised through this node; a shard's floor is durable and never
    // lowered, so they need not be sent again.
    let mut floors_raised: HashMap<GroupId, u64> = HashMap::new();
    let mut more = false;
    loop {
        if more {
            tokio::time::sleep(CATCH_UP_PAUSE).await;
        } else {
            tick.tick().await;
        }
        more = false;
        let Some(node) = node.upgrade() else { return };
        if node.meta_leader_term().is_some() {
            match collect_locks(&node, &mut floors_raised).await {
                Ok(capped) => more |= capped,
                Err(e) => tracing::warn!(error = %e, "lock collection failed; will retry"),
            }
        }
        for group in node.led_data_groups() {
            match drop_fences(&node, group).await {
                Ok(capped) => more |= capped,
                Err(e) => {
                    tracing::warn!(group, error = %e, "fence records not dropped; will retry")
                }
            }
        }
    }
}

/// Runs a scan of this replica's records off the async workers (there may
/// be many records).
async fn scan<T: Send + 'static>(
    node: &Arc<Node>,
    read: impl FnOnce(&Node) -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    let node = node.clone();
    tokio::task::spawn_blocking(move || read(&node))
        .await
        .map_err(|e| NodeError::Internal(format!("record scan: {e}")))?
}

/// On the meta leader: forgets idle locks, then raises every shard's fence
/// floor. True when it found more idle locks than a pass takes.
async fn collect_locks(
    node: &Arc<Node>,
    floors_raised: &mut HashMap<GroupId, u64>,
) -> Result<bool, NodeError> {
    let (census, applied) = scan(node, |node| {
        let mut census = LockCensus::default();
        let applied = node.visit_records_as_applied(META_GROUP, &keys::lock_prefix(), |k, v| {
            census.observe(k, v);
            true
        })?;
        Ok((census, applied))
    })
    .await?;
    let deadline = Instant::now() + PROPOSE_TIMEOUT;
    let mut forgotten = 0;
    for names in census.idle.chunks(MAX_FORGET_BATCH) {
        let cmd = Command::Lock(LockCommand::Forget {
            names: names.to_vec(),
        });
        match node
            .propose(META_GROUP, cmd, deadline, MAX_FORWARD_HOPS)
            .await?
        {
            Response::Lock(LockResponse::Forgotten { count }) => forgotten += count,
            other => {
                return Err(NodeError::Internal(format!(
                    "unexpected forget result {other:?}"
                )));
            }
        }
    }
    if forgotten > 0 {
        tracing::info!(locks = forgotten, "idle locks forgotten");
    }
    let capped = census.idle.len() >= IDLE_PER_PASS;
    let Some((floor, held)) = census.fence_floor(applied) else {
        return Err(NodeError::Internal(
            "a lock record could not be decoded; fence floors not raised".into(),
        ));
    };
    let Some(map) = node.cluster_map() else {
        return Ok(capped);
    };
    for shard in map.data_groups() {
        if floors_raised.get(&shard).is_some_and(|f| *f >= floor) {
            continue;
        }
        let cmd = Command::RaiseFenceFloor {
            floor,
            held: held.clone(),
        };
        match node.propose(shard, cmd, deadline, MAX_FORWARD_HOPS).await {
            Ok(_) => {
                floors_raised.insert(shard, floor);
            }
            // The other shards' floors need not wait for this one's leader.
            Err(e) => tracing::warn!(shard, floor, error = %e, "fence floor not raised"),
        }
    }
    Ok(capped)
}

/// On a data shard's leader: deletes the fence records at or below its
/// floor. True when it found more than a pass takes.
async fn drop_fences(node: &Arc<Node>, group: GroupId) -> Result<bool, NodeError> {
    let (floor, covered) = scan(node, move |node| {
        // Read apart from each other and from the scan: apply re-checks each
        // name against the floor and holds it has then.
        let floor: u64 = decoded(node.local_record(group, &keys::fence_floor_key())?)?;
        let held: Vec<(String, u64)> = decoded(node.local_record(group, &keys::fence_held_key())?)?;
        let mut covered = Vec::new();
        if floor > 0 {
            node.visit_records_as_applied(group, &keys::fence_prefix(), |k, v| {
                if let (Some(name), Ok(token)) =
                    (keys::lock_name_of_fence(k), codec::decode::<u64>(v))
                    && token <= floor
                    && !held.iter().any(|(h, _)| h == name)
                {
                    covered.push(name.to_string());
                }
                covered.len() < DROPS_PER_PASS
            })?;
        }
        Ok((floor, covered))
    })
    .await?;
    let deadline = Instant::now() + PROPOSE_TIMEOUT;
    let mut dropped = 0;
    for lock_names in covered.chunks(MAX_DROP_FENCES_BATCH) {
        let cmd = Command::DropFences {
            lock_names: lock_names.to_vec(),
        };
        match node.propose(group, cmd, deadline, MAX_FORWARD_HOPS).await? {
            Response::FencesDropped { count } => dropped += count,
            other => {
                return Err(NodeError::Internal(format!(
                    "unexpected fence drop result {other:?}"
                )));
            }
        }
    }
    if dropped > 0 {
        tracing::info!(group, floor, records = dropped, "fence records dropped");
    }
    Ok(covered.len() >= DROPS_PER_PASS)
}

/// A bookkeeping record's value, or its default when absent.
fn decoded<T: serde::de::DeserializeOwned + Default>(
    bytes: Option<Vec<u8>>,
) -> Result<T, NodeError> {
    match bytes {
        Some(b) => Ok(codec::decode(&b)?),
        None => Ok(T::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sm::lock::{LockEntry, LockMode};

    fn entry(session: u64, token: u64) -> LockEntry {
        LockEntry {
            session,
            mode: LockMode::Shared,
            token,
            value: Vec::new(),
            call_id: 1,
        }
    }

    fn observe(census: &mut LockCensus, name: &str, queue: Vec<LockEntry>, last_token: u64) {
        let rec = LockRecord { queue, last_token };
        census.observe(&keys::lock_key(name), &codec::encode(&rec).unwrap());
    }

    #[test]
    fn the_floor_excepts_the_oldest_holds_and_stays_below_the_rest() {
        let mut census = LockCensus::default();
        assert_eq!(
            census.fence_floor(40),
            Some((40, Vec::new())),
            "no holds: all given tokens are over"
        );
        observe(&mut census, "idle", Vec::new(), 12);
        observe(
            &mut census,
            "shared",
            vec![entry(1, 30), entry(2, 25), entry(3, 0)],
            30,
        );
        observe(&mut census, "waiting", vec![entry(4, 33), entry(5, 0)], 33);
        let hold = |name: &str, token| (name.to_string(), token);
        assert_eq!(
            census.fence_floor(40),
            Some((
                40,
                vec![hold("shared", 25), hold("shared", 30), hold("waiting", 33)]
            ))
        );
        assert_eq!(census.idle, vec!["idle".to_string()]);
        // More holds than a floor excepts: it stays below the first one left out.
        for i in 0..MAX_FENCE_HELD as u64 {
            observe(
                &mut census,
                &format!("job/{i}"),
                vec![entry(9, 100 + i)],
                100 + i,
            );
        }
        let (floor, held) = census.fence_floor(500).unwrap();
        // Held tokens: 25, 30 (shared), 33, 100.. — the 101st smallest is 100 + 97.
        assert_eq!(floor, 100 + 97 - 1);
        assert_eq!(held.len(), MAX_FENCE_HELD, "3 and job/0..=96");
        assert_eq!(held.last(), Some(&hold("job/96", 196)));
        census.observe(&keys::lock_key("bad"), b"\xff\xff");
        assert_eq!(
            census.fence_floor(40),
            None,
            "an unreadable record might hold any token"
        );
    }
}
