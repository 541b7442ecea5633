//! `shopkv.v1.Peer` (peer port only): Raft RPCs of every group, snapshot
//! streams, and requests forwarded by other nodes to a group's leader.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use openraft::raft::AppendEntriesRequest;
use openraft::storage::Snapshot;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::deadline_of;
use crate::codec;
use crate::forward::MAX_IN_FLIGHT_PER_LINK;
use crate::node::{Node, NodeError, ReadOp};
use crate::proto::peer_server::Peer;
use crate::proto::{self, RaftKind};
use crate::raft::state_machine::SnapshotData;
use crate::raft::{GroupRaft, TypeConfig};
use crate::sm::Command;

/// Largest snapshot a node accepts (the whole image is held in memory).
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;

/// The peer service.
#[derive(Clone)]
pub struct PeerService {
    node: Arc<Node>,
}

impl PeerService {
    /// A service over `node`.
    pub fn new(node: Arc<Node>) -> PeerService {
        PeerService { node }
    }

    fn check_cluster(&self, from_cluster: u64) -> Result<(), Status> {
        let ours = self.node.cluster_id();
        if from_cluster != 0 && ours != 0 && from_cluster != ours {
            return Err(Status::failed_precondition(format!(
                "peer belongs to cluster {from_cluster:016x}, this node to cluster {ours:016x}"
            )));
        }
        Ok(())
    }

    /// A leader's append is accepted only while this node's alive stamp is
    /// fresh: accepting it grants the leader a lease that a restart must honour.
    fn check_alive_stamp(&self) -> Result<(), String> {
        if self.node.accepts_leader_appends() {
            Ok(())
        } else {
            Err(format!(
                "node {} has not written its alive stamp lately; not accepting appends",
                self.node.id
            ))
        }
    }

    fn group(&self, group: u64) -> Result<GroupRaft, String> {
        self.node
            .group(group)
            .ok_or_else(|| format!("node {} does not host group {group}", self.node.id))
    }

    async fn handle_raft(&self, r: proto::RaftRequest) -> Result<Vec<u8>, String> {
        let raft = self.group(r.group_id)?;
        let kind =
            RaftKind::try_from(r.kind).map_err(|_| format!("unknown raft rpc kind {}", r.kind))?;
        let de = |e: codec::CodecError| e.to_string();
        let enc = |res: Result<Vec<u8>, codec::CodecError>| res.map_err(|e| e.to_string());
        match kind {
            RaftKind::Append => {
                self.check_alive_stamp()?;
                let req = codec::from_wire(&r.payload).map_err(de)?;
                let resp = raft.append_entries(req).await.map_err(|e| e.to_string())?;
                enc(codec::to_wire(&resp))
            }
            RaftKind::Vote => {
                if self.node.in_vote_hold_off() {
                    return Err(format!(
                        "node {} restarted less than a leader lease ago; not voting yet",
                        self.node.id
                    ));
                }
                let req = codec::from_wire(&r.payload).map_err(de)?;
                let resp = raft.vote(req).await.map_err(|e| e.to_string())?;
                enc(codec::to_wire(&resp))
            }
            RaftKind::PreVote => {
                let req = codec::from_wire(&r.payload).map_err(de)?;
                let resp = raft.pre_vote(req).await.map_err(|e| e.to_string())?;
                enc(codec::to_wire(&resp))
            }
            RaftKind::TransferLeader => {
                let req = codec::from_wire(&r.payload).map_err(de)?;
                let resp = raft
                    .handle_transfer_leader(req)
                    .await
                    .map_err(|e| e.to_string())?;
                enc(codec::to_wire(&resp))
            }
            RaftKind::Unspecified => Err("unspecified raft rpc kind".into()),
        }
    }
}

fn reply(res: Result<Vec<u8>, String>) -> proto::RaftReply {
    match res {
        Ok(payload) => proto::RaftReply {
            payload,
            error: String::new(),
        },
        Err(error) => proto::RaftReply {
            payload: Vec::new(),
            error,
        },
    }
}

/// Acks the follower side of an AppendStream has produced but not yet sent.
const APPEND_ACK_QUEUE: usize = 64;

/// The follower side of an AppendStream: decodes the leader's frames into one
/// pipelined `stream_append` of the group and sends its results back in order.
/// A frame that does not decode ends the input; the leader sees the stream end
/// with requests unanswered and starts a new one.
async fn serve_append_stream(
    service: PeerService,
    mut inbound: Streaming<proto::AppendFrame>,
    acks: tokio::sync::mpsc::Sender<Result<proto::AppendAck, Status>>,
) {
    let stop = |error: String| proto::AppendAck {
        payload: Vec::new(),
        error,
    };
    let first = match inbound.message().await {
        Ok(Some(frame)) => frame,
        Ok(None) | Err(_) => return,
    };
    let raft = match service
        .check_cluster(first.cluster_id)
        .map_err(|s| s.message().to_string())
        .and_then(|()| service.group(first.group_id))
    {
        Ok(raft) => raft,
        Err(error) => {
            let _ = acks.send(Ok(stop(error))).await;
            return;
        }
    };
    let node = service.node.clone();
    let requests = futures::stream::unfold((Some(first), inbound), move |(first, mut inbound)| {
        let node = node.clone();
        async move {
            let frame = match first {
                Some(frame) => frame,
                None => inbound.message().await.ok()??,
            };
            // A stale alive stamp ends the stream like a bad frame: the leader
            // starts a new one, refused until the stamp is fresh again.
            node.accepts_leader_appends().then_some(())?;
            let request = codec::from_wire::<AppendEntriesRequest<TypeConfig>>(&frame.payload);
            Some((request.ok()?, (None, inbound)))
        }
    });
    let results = raft.stream_append(requests);
    futures::pin_mut!(results);
    while let Some(result) = results.next().await {
        let (ack, last) = match result {
            Ok(r) => match codec::to_wire(&r) {
                Ok(payload) => (
                    proto::AppendAck {
                        payload,
                        error: String::new(),
                    },
                    r.is_err(),
                ),
                Err(e) => (stop(e.to_string()), true),
            },
            Err(fatal) => (stop(fatal.to_string()), true),
        };
        if acks.send(Ok(ack)).await.is_err() || last {
            return;
        }
    }
}

/// A proposal forwarded by another node: the encoded `Result<Response, NodeError>`.
async fn forwarded_propose(
    node: &Node,
    m: proto::GroupMessage,
    deadline: Instant,
) -> Result<Vec<u8>, Status> {
    let res = match codec::from_wire::<Command>(&m.payload) {
        Ok(cmd) => node.propose(m.group_id, cmd, deadline, m.hops_left).await,
        Err(e) => Err(NodeError::InvalidArgument(e.to_string())),
    };
    codec::to_wire(&res).map_err(|e| Status::internal(e.to_string()))
}

/// A read forwarded by another node: the encoded `Result<ReadResult, NodeError>`.
async fn forwarded_read(
    node: &Node,
    m: proto::GroupMessage,
    deadline: Instant,
) -> Result<Vec<u8>, Status> {
    let res = match codec::from_wire::<(ReadOp, bool)>(&m.payload) {
        Ok((op, linearizable)) => {
            node.read(m.group_id, op, linearizable, deadline, m.hops_left)
                .await
        }
        Err(e) => Err(NodeError::InvalidArgument(e.to_string())),
    };
    codec::to_wire(&res).map_err(|e| Status::internal(e.to_string()))
}

/// An error reply to a forwarded request. `Err(e)` encodes the same whatever the
/// `Ok` type, so this decodes as the reply of a proposal or of a read.
fn encoded_error(e: NodeError) -> Vec<u8> {
    codec::to_wire(&Err::<(), NodeError>(e)).unwrap_or_default()
}

/// How far a node's wall clock may be ahead of a forwarding node's before
/// frames on time are taken for late ones (nodes' clocks are assumed synced
/// to well within this, as order deadlines and session expiry assume).
pub const FORWARD_CLOCK_SKEW_MS: u64 = 250;

/// The time a forwarded frame may still take, received at wall-clock `now_ms`:
/// its `timeout_ms`, cut to what is left of its sender's deadline (plus the
/// clock skew allowed), or `None` if that passed — a frame held by a paused
/// sender or a stalled connection must not be served as if just sent, after
/// its caller gave up.
fn forwarded_time_left(frame: &proto::ForwardFrame, now_ms: u64) -> Option<Duration> {
    let timeout_ms = if frame.deadline_unix_ms == 0 {
        frame.timeout_ms
    } else {
        let left_ms = frame
            .deadline_unix_ms
            .saturating_add(FORWARD_CLOCK_SKEW_MS)
            .checked_sub(now_ms)
            .filter(|ms| *ms > 0)?;
        frame.timeout_ms.min(left_ms)
    };
    Some(Duration::from_millis(timeout_ms))
}

/// Answers forwarded request `id` with `error` (it was not served); false
/// once the stream's replies are gone.
async fn refuse(
    replies: &tokio::sync::mpsc::Sender<Result<proto::ForwardReply, Status>>,
    id: u64,
    error: NodeError,
) -> bool {
    let payload = encoded_error(error);
    replies
        .send(Ok(proto::ForwardReply { id, payload }))
        .await
        .is_ok()
}

/// Replies a Forward stream has produced but not yet sent.
const FORWARD_REPLY_QUEUE: usize = 1024;

/// The receiving side of a Forward stream: each frame runs as its own task (they
/// finish in any order) under the deadline the sender gave it, capped by the
/// node's request timeout; at most `MAX_IN_FLIGHT_PER_LINK` run at once, more
/// are refused as not applied.
async fn serve_forward_stream(
    node: Arc<Node>,
    mut inbound: Streaming<proto::ForwardFrame>,
    replies: tokio::sync::mpsc::Sender<Result<proto::ForwardReply, Status>>,
) {
    let max_timeout = Duration::from_millis(node.config.request_timeout_ms);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT_PER_LINK));
    while let Ok(Some(mut frame)) = inbound.message().await {
        let Some(message) = frame.message.take() else {
            continue;
        };
        let (id, write) = (frame.id, frame.write);
        let replies = replies.clone();
        let Some(time_left) = forwarded_time_left(&frame, crate::clock::now_ms()) else {
            let late = NodeError::Unavailable(format!(
                "forwarded request {id} reached node {} after its sender's deadline; not served",
                node.id
            ));
            if !refuse(&replies, id, late).await {
                return;
            }
            continue;
        };
        let deadline = Instant::now() + time_left.min(max_timeout);
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            let busy = NodeError::Unavailable(format!(
                "node {} has {MAX_IN_FLIGHT_PER_LINK} forwarded requests in flight",
                node.id
            ));
            if !refuse(&replies, id, busy).await {
                return;
            }
            continue;
        };
        let node = node.clone();
        tokio::spawn(async move {
            let res = if write {
                forwarded_propose(&node, message, deadline).await
            } else {
                forwarded_read(&node, message, deadline).await
            };
            drop(slot);
            // A Status would end the whole stream: report this request's failure in its reply.
            let payload =
                res.unwrap_or_else(|s| encoded_error(NodeError::Internal(s.message().to_string())));
            let _ = replies.send(Ok(proto::ForwardReply { id, payload })).await;
        });
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    type AppendStreamStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<proto::AppendAck, Status>> + Send>>;

    async fn append_stream(
        &self,
        req: Request<Streaming<proto::AppendFrame>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        // Answer the call at once and read the first frame in the task: the leader
        // may have nothing to send yet and must not wait for response headers.
        let (tx, rx) = tokio::sync::mpsc::channel(APPEND_ACK_QUEUE);
        tokio::spawn(serve_append_stream(self.clone(), req.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn raft(
        &self,
        req: Request<proto::RaftRequest>,
    ) -> Result<Response<proto::RaftReply>, Status> {
        let r = req.into_inner();
        self.check_cluster(r.cluster_id)?;
        Ok(Response::new(reply(self.handle_raft(r).await)))
    }

    #[tracing::instrument(name = "peer.install_snapshot", skip_all)]
    async fn install_snapshot(
        &self,
        req: Request<Streaming<proto::SnapshotChunk>>,
    ) -> Result<Response<proto::RaftReply>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        self.check_cluster(first.cluster_id)?;
        if first.total_bytes > MAX_SNAPSHOT_BYTES {
            return Err(Status::invalid_argument(format!(
                "snapshot of {} bytes exceeds the {MAX_SNAPSHOT_BYTES}-byte limit",
                first.total_bytes
            )));
        }
        let group = first.group_id;
        let vote =
            codec::from_wire(&first.vote).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let meta =
            codec::from_wire(&first.meta).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut data = Vec::with_capacity(first.total_bytes as usize);
        data.extend_from_slice(&first.data);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if (data.len() + chunk.data.len()) as u64 > first.total_bytes {
                return Err(Status::invalid_argument("snapshot longer than announced"));
            }
            data.extend_from_slice(&chunk.data);
        }
        if data.len() as u64 != first.total_bytes {
            return Err(Status::invalid_argument("snapshot stream ended early"));
        }
        let image: SnapshotData =
            codec::from_wire(&data).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let res = async {
            self.check_alive_stamp()?;
            let raft = self.group(group)?;
            let snapshot = Snapshot {
                meta,
                snapshot: image,
            };
            let resp = raft
                .install_full_snapshot(vote, snapshot)
                .await
                .map_err(|e| e.to_string())?;
            codec::to_wire::<openraft::raft::SnapshotResponse<TypeConfig>>(&resp)
                .map_err(|e| e.to_string())
        }
        .await;
        Ok(Response::new(reply(res)))
    }

    #[tracing::instrument(name = "peer.propose", skip_all, fields(group = req.get_ref().group_id))]
    async fn propose(
        &self,
        req: Request<proto::GroupMessage>,
    ) -> Result<Response<proto::GroupReply>, Status> {
        let deadline = deadline_of(
            &req,
            Duration::from_millis(self.node.config.request_timeout_ms),
        );
        let payload = forwarded_propose(&self.node, req.into_inner(), deadline).await?;
        Ok(Response::new(proto::GroupReply { payload }))
    }

    #[tracing::instrument(name = "peer.read", skip_all, fields(group = req.get_ref().group_id))]
    async fn read(
        &self,
        req: Request<proto::GroupMessage>,
    ) -> Result<Response<proto::GroupReply>, Status> {
        let deadline = deadline_of(
            &req,
            Duration::from_millis(self.node.config.request_timeout_ms),
        );
        let payload = forwarded_read(&self.node, req.into_inner(), deadline).await?;
        Ok(Response::new(proto::GroupReply { payload }))
    }

    type ForwardStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<proto::ForwardReply, Status>> + Send>>;

    #[tracing::instrument(name = "peer.forward", skip_all)]
    async fn forward(
        &self,
        req: Request<Streaming<proto::ForwardFrame>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(FORWARD_REPLY_QUEUE);
        tokio::spawn(serve_forward_stream(
            self.node.clone(),
            req.into_inner(),
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn local_status(
        &self,
        req: Request<proto::LocalStatusRequest>,
    ) -> Result<Response<proto::LocalStatusReply>, Status> {
        let with_digest = req.get_ref().with_digest;
        let replicas = self
            .node
            .local_status()
            .into_iter()
            .map(|r| {
                let (digest_index, digest) = if with_digest {
                    self.node
                        .group_digest(r.group)
                        .map_err(super::error::to_status)?
                } else {
                    (0, 0)
                };
                Ok::<_, Status>(proto::ReplicaOf {
                    group_id: r.group,
                    members: r.members.clone(),
                    status: Some(proto::ReplicaStatus {
                        node_id: self.node.id,
                        state: r.state,
                        term: r.term,
                        leader: r.leader,
                        last_log_index: r.last_log_index,
                        commit_index: r.commit_index,
                        applied_index: r.applied_index,
                        snapshot_index: r.snapshot_index,
                        purged_index: r.purged_index,
                        digest,
                        digest_index,
                        txns_in_flight: r.txns_in_flight,
                        oldest_txn_age_ms: r.oldest_txn_age_ms,
                    }),
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        Ok(Response::new(proto::LocalStatusReply {
            node_id: self.node.id,
            cluster_id: self.node.cluster_id(),
            replicas,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::ReadResult;
    use crate::sm::Response as SmResponse;

    fn frame(timeout_ms: u64, deadline_unix_ms: u64) -> proto::ForwardFrame {
        proto::ForwardFrame {
            id: 1,
            message: None,
            write: true,
            timeout_ms,
            deadline_unix_ms,
        }
    }

    #[test]
    fn a_forwarded_frame_gets_what_is_left_of_its_senders_deadline_and_none_once_it_passed() {
        let ms = Duration::from_millis;
        // An older sender gives no deadline: its timeout counts from arrival.
        assert_eq!(forwarded_time_left(&frame(2000, 0), 10_000), Some(ms(2000)));
        // On time: the timeout, cut to the deadline plus the allowed skew.
        assert_eq!(
            forwarded_time_left(&frame(2000, 11_000), 10_000),
            Some(ms(1000 + FORWARD_CLOCK_SKEW_MS))
        );
        assert_eq!(
            forwarded_time_left(&frame(500, 11_000), 10_000),
            Some(ms(500))
        );
        // A little past it, within the skew a receiver's clock may be ahead.
        assert_eq!(
            forwarded_time_left(&frame(2000, 10_000), 10_100),
            Some(ms(FORWARD_CLOCK_SKEW_MS - 100))
        );
        // Held past its deadline and the skew: not served.
        assert_eq!(
            forwarded_time_left(&frame(2000, 10_000), 10_000 + FORWARD_CLOCK_SKEW_MS),
            None
        );
        assert_eq!(forwarded_time_left(&frame(2000, 10_000), 13_000), None);
    }

    #[test]
    fn an_error_reply_decodes_as_the_reply_of_a_proposal_and_of_a_read() {
        let bytes = encoded_error(NodeError::Unavailable("busy".into()));
        let write: Result<SmResponse, NodeError> = codec::from_wire(&bytes).expect("write reply");
        assert!(matches!(write, Err(NodeError::Unavailable(m)) if m == "busy"));
        let read: Result<ReadResult, NodeError> = codec::from_wire(&bytes).expect("read reply");
        assert!(matches!(read, Err(NodeError::Unavailable(m)) if m == "busy"));
    }
}
