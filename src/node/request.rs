//! The request path: where a request for a group goes (this node's replica or
//! another node), proposing and linearizable reads on the leader, forwarding
//! with the client's deadline, and what a failed write means (retry elsewhere
//! or outcome unknown).

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::LinearizerOption;
use openraft::error::{ClientWriteError, ForwardToLeader, LinearizableReadError, RaftError};

use crate::codec;
use crate::forward::Forwarded;
use crate::proto::GroupMessage;
use crate::raft::{GroupRaft, TypeConfig};
use crate::sm::{self, Command, Response, StoredRecord};
use crate::storage::keys::{self, GroupId};

use super::ops::GroupReader;
use super::{Node, NodeError, ReadOp, ReadResult};

/// How long a forwarded or local request waits between leader look-ups.
const MAX_BACKOFF: Duration = Duration::from_millis(400);

/// The retries of one request until its deadline: which replica to try next
/// and how long to wait before the next leader look-up.
struct Retry {
    deadline: Instant,
    attempt: usize,
    backoff: Duration,
}

impl Retry {
    fn new(deadline: Instant) -> Retry {
        Retry {
            deadline,
            attempt: 0,
            backoff: Duration::from_millis(10),
        }
    }

    /// Time left before the deadline; `None` once it has passed.
    fn remaining(&self) -> Option<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Waits before the next attempt (doubling up to [`MAX_BACKOFF`], never
    /// past the deadline) and counts it.
    async fn pause(&mut self) {
        self.attempt += 1;
        tokio::time::sleep(self.backoff.min(self.remaining().unwrap_or_default())).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

impl Node {
    /// Where a request for `group` goes from here.
    fn route(&self, group: GroupId, attempt: usize) -> Result<Route, NodeError> {
        if let Some(raft) = self.group(group) {
            return Ok(Route::Local(raft));
        }
        let Some(map) = self.cluster_map() else {
            return Err(NodeError::FailedPrecondition(
                "cluster is not initialised".into(),
            ));
        };
        let replicas = map.replicas(group);
        if replicas.is_empty() {
            return Err(NodeError::NotFound(format!("no such group {group}")));
        }
        Ok(Route::Remote(replicas[attempt % replicas.len()]))
    }

    /// Proposes `cmd` to `group` and returns its replicated result, from
    /// wherever the group's leader is.
    pub async fn propose(
        &self,
        group: GroupId,
        cmd: Command,
        deadline: Instant,
        hops_left: u32,
    ) -> Result<Response, NodeError> {
        let cmd = Arc::new(cmd);
        let mut retry = Retry::new(deadline);
        loop {
            let Some(remaining) = retry.remaining() else {
                return Err(NodeError::Unavailable(format!(
                    "group {group} had no reachable leader before the deadline"
                )));
            };
            let leader = match self.route(group, retry.attempt)? {
                Route::Local(raft) => {
                    match tokio::time::timeout(remaining, raft.client_write(Arc::clone(&cmd))).await
                    {
                        Err(_) => {
                            return Err(NodeError::OutcomeUnknown(format!(
                                "deadline passed after the write was proposed to group {group}"
                            )));
                        }
                        Ok(Ok(resp)) => return Ok(resp.data),
                        Ok(Err(e)) => match write_failure(group, e) {
                            WriteFailure::NotLeader(f) => self.leader_hint(f),
                            WriteFailure::Fail(e) => return Err(e),
                        },
                    }
                }
                Route::Remote(node) => Some(node),
            };
            if let Some(node) = leader {
                let payload = codec::to_wire(&cmd)?;
                match self
                    .forward(node, group, payload, remaining, hops_left, true)
                    .await?
                {
                    Forwarded::Reply(bytes) => {
                        return codec::from_wire::<Result<Response, NodeError>>(&bytes)?;
                    }
                    Forwarded::NotSent(_) => {}
                    Forwarded::Unknown(why) => return Err(NodeError::OutcomeUnknown(why)),
                }
            }
            retry.pause().await;
        }
    }

    /// Serves `op` from `group`: linearizable (on the leader, see [`lease_or_quorum_read`]) or
    /// serializable (this node's replica, or any replica if none here).
    pub async fn read(
        &self,
        group: GroupId,
        op: ReadOp,
        linearizable: bool,
        deadline: Instant,
        hops_left: u32,
    ) -> Result<ReadResult, NodeError> {
        let mut retry = Retry::new(deadline);
        loop {
            let Some(remaining) = retry.remaining() else {
                return Err(NodeError::Unavailable(format!(
                    "group {group}: no linearizable read possible before the deadline"
                )));
            };
            let target = match self.route(group, retry.attempt)? {
                Route::Local(_) if !linearizable => return self.read_local(group, &op),
                Route::Local(raft) => {
                    match tokio::time::timeout(
                        remaining,
                        raft.ensure_linearizable(lease_or_quorum_read()),
                    )
                    .await
                    {
                        Err(_) => None,
                        Ok(Ok(_)) => return self.read_local(group, &op),
                        Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
                            self.leader_hint(f)
                        }
                        Ok(Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(_)))) => {
                            None
                        }
                        Ok(Err(RaftError::Fatal(e))) => {
                            return Err(NodeError::Unavailable(e.to_string()));
                        }
                    }
                }
                Route::Remote(node) => Some(node),
            };
            if let Some(node) = target {
                let payload = codec::to_wire(&(op.clone(), linearizable))?;
                // Reads are safe to retry whatever happened to the request.
                if let Forwarded::Reply(bytes) = self
                    .forward(node, group, payload, remaining, hops_left, false)
                    .await?
                {
                    return codec::from_wire::<Result<ReadResult, NodeError>>(&bytes)?;
                }
            }
            retry.pause().await;
        }
    }

    /// Reads this node's replica of `group`.
    pub fn read_local(&self, group: GroupId, op: &ReadOp) -> Result<ReadResult, NodeError> {
        match op {
            ReadOp::Get { key } => {
                let rec = match self.store.get_record(group, &keys::kv_record_key(key))? {
                    Some(bytes) => Some(codec::decode::<StoredRecord>(&bytes)?),
                    None => None,
                };
                Ok(ReadResult::Record(rec))
            }
            ReadOp::Scan { prefix, limit } => {
                let rows = self.store.scan_records(
                    group,
                    &keys::kv_record_key(prefix),
                    limit.saturating_add(1),
                )?;
                let more = rows.len() > *limit;
                let records = rows
                    .into_iter()
                    .take(*limit)
                    .filter_map(|(rk, v)| {
                        let key = keys::kv_user_key(&rk)?.to_vec();
                        Some(codec::decode::<StoredRecord>(&v).map(|r| (key, r)))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(ReadResult::Records { records, more })
            }
            ReadOp::Session(op) => self.read_session(group, op).map(ReadResult::Session),
            ReadOp::Lock { name } => {
                let rec = match self.store.get_record(group, &keys::lock_key(name))? {
                    Some(b) => codec::decode(&b)?,
                    None => crate::sm::lock::LockRecord::default(),
                };
                Ok(ReadResult::Lock(rec))
            }
            ReadOp::Commerce(op) => {
                let reader = GroupReader {
                    store: &self.store,
                    group,
                };
                sm::commerce::read(&reader, op)
                    .map(ReadResult::Commerce)
                    .map_err(|e| NodeError::Internal(e.to_string()))
            }
        }
    }

    /// The node to forward to after a `ForwardToLeader` (none if no leader
    /// is known or it names this node); learns the leader's address.
    fn leader_hint(&self, f: ForwardToLeader<TypeConfig>) -> Option<u64> {
        let leader = f.leader_id.filter(|id| *id != self.id)?;
        if let Some(n) = f.leader_node {
            self.router.set_addr(leader, &n.peer_addr);
        }
        Some(leader)
    }

    /// Sends a request for `group` to `node`, if it may take another hop.
    async fn forward(
        &self,
        node: u64,
        group: GroupId,
        payload: Vec<u8>,
        remaining: Duration,
        hops_left: u32,
        is_write: bool,
    ) -> Result<Forwarded, NodeError> {
        let Some(hops_left) = hops_left.checked_sub(1) else {
            return Err(NodeError::Unavailable(format!(
                "group {group}: too many forwarding hops"
            )));
        };
        let message = GroupMessage {
            group_id: group,
            payload,
            hops_left,
        };
        Ok(self
            .forwarder
            .forward(node, message, is_write, remaining)
            .await)
    }
}

/// What a failed local `client_write` means for the request.
#[derive(Debug)]
enum WriteFailure {
    /// Not appended here: safe to send to the leader.
    NotLeader(ForwardToLeader<TypeConfig>),
    /// Give up with this error.
    Fail(NodeError),
}

fn write_failure(
    group: GroupId,
    e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>,
) -> WriteFailure {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => WriteFailure::NotLeader(f),
        // Appended, then dropped from this node's log on a leader change:
        // another node may still commit it, so it must not be re-sent.
        RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => {
            WriteFailure::Fail(NodeError::OutcomeUnknown(format!(
                "group {group}: the write was discarded by a leader change ({f})"
            )))
        }
        RaftError::APIError(e) => WriteFailure::Fail(NodeError::Internal(e.to_string())),
        // The entry may already be in the log and commit later.
        RaftError::Fatal(e) => WriteFailure::Fail(NodeError::OutcomeUnknown(e.to_string())),
    }
}

enum Route {
    Local(GroupRaft),
    /// Another node that hosts the group (or, failing that, knows who does).
    Remote(u64),
}

/// How the leader confirms a linearizable read: with its lease while a quorum
/// acknowledged it within the last election_timeout_max (no network round), else
/// by a heartbeat round it starts at once (ReadIndex), waiting up to one lease.
/// Lease safety rests on followers not voting within the lease (openraft) and on
/// [`Node::in_vote_hold_off`] after a restart.
fn lease_or_quorum_read() -> LinearizerOption {
    LinearizerOption::new(None, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_discarded_by_a_leader_change_is_outcome_unknown_not_retried() {
        let discarded =
            RaftError::APIError(ClientWriteError::LogEntryDiscarded(ForwardToLeader::<
                TypeConfig,
            >::empty()));
        assert!(matches!(
            write_failure(1, discarded),
            WriteFailure::Fail(NodeError::OutcomeUnknown(_))
        ));
        let not_leader = RaftError::APIError(ClientWriteError::ForwardToLeader(ForwardToLeader::<
            TypeConfig,
        >::empty()));
        assert!(matches!(
            write_failure(1, not_leader),
            WriteFailure::NotLeader(_)
        ));
    }
}
