//! `shopkv.v1.Peer` (peer port only): Raft RPCs of every group, snapshot
//! streams, and requests forwarded by other nodes to a group's leader.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use openraft::storage::Snapshot;
use tonic::{Request, Response, Status, Streaming};

use super::deadline_of;
use crate::codec;
use crate::node::{Node, NodeError, ReadOp};
use crate::proto::peer_server::Peer;
use crate::proto::{self, RaftKind};
use crate::raft::state_machine::SnapshotData;
use crate::raft::{GroupRaft, TypeConfig};
use crate::sm::Command;

/// Largest snapshot a node accepts (the whole image is held in memory).
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;

/// The peer service.
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
                let req = codec::from_wire(&r.payload).map_err(de)?;
                let resp = raft.append_entries(req).await.map_err(|e| e.to_string())?;
                enc(codec::to_wire(&resp))
            }
            RaftKind::Vote => {
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

#[tonic::async_trait]
impl Peer for PeerService {
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
        let m = req.into_inner();
        let res = match codec::from_wire::<Command>(&m.payload) {
            Ok(cmd) => {
                self.node
                    .propose(m.group_id, cmd, deadline, m.hops_left)
                    .await
            }
            Err(e) => Err(NodeError::InvalidArgument(e.to_string())),
        };
        let payload = codec::to_wire(&res).map_err(|e| Status::internal(e.to_string()))?;
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
        let m = req.into_inner();
        let res = match codec::from_wire::<(ReadOp, bool)>(&m.payload) {
            Ok((op, linearizable)) => {
                self.node
                    .read(m.group_id, op, linearizable, deadline, m.hops_left)
                    .await
            }
            Err(e) => Err(NodeError::InvalidArgument(e.to_string())),
        };
        let payload = codec::to_wire(&res).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(proto::GroupReply { payload }))
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
