//! Client side of the peer transport: one cached gRPC channel per peer
//! address, shared by every Raft group on this node (the group id travels in
//! every request). Every call carries the deadline openraft gives it, so a
//! blackholed link cannot wedge replication.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use openraft::error::{
    NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotOf, VoteOf};
use openraft_multi::{GroupNetworkAdapter, GroupRouter};
use tonic::transport::{Channel, Endpoint};

use super::TypeConfig;
use super::state_machine::SnapshotData;
use crate::codec;
use crate::proto::peer_client::PeerClient;
use crate::proto::{RaftKind, RaftRequest, SnapshotChunk};
use crate::router::NodeAddr;
use crate::storage::keys::GroupId;

/// Bytes of snapshot data per streamed chunk (well under tonic's 4 MiB limit).
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Largest peer message accepted (an append of `max_payload_entries` entries
/// of at most one 1 MiB value each, plus headroom).
pub const MAX_PEER_MESSAGE_BYTES: usize = 64 << 20;

/// Errors of a peer call.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No address is known for the node.
    #[error("no address known for node {0}")]
    UnknownNode(u64),
    /// The address is not a valid URI.
    #[error("bad peer address {0}: {1}")]
    BadAddress(String, String),
    /// The RPC failed in transport or on the remote side.
    #[error("peer rpc: {0}")]
    Status(#[from] tonic::Status),
    /// The remote handled the RPC but reported an error.
    #[error("remote: {0}")]
    Remote(String),
    /// The payload could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(#[from] codec::CodecError),
    /// The call did not finish before its deadline.
    #[error("deadline of {0:?} passed")]
    Timeout(Duration),
}

/// The shared peer transport (implements openraft-multi's `GroupRouter`).
#[derive(Clone)]
pub struct PeerRouter {
    inner: Arc<Inner>,
}

struct Inner {
    self_id: u64,
    /// Fixed dial addresses that win over advertised ones (`--peer-route`).
    routes: std::collections::BTreeMap<u64, String>,
    cluster_id: std::sync::atomic::AtomicU64,
    addrs: RwLock<HashMap<u64, String>>,
    channels: Mutex<HashMap<String, Channel>>,
    connect_timeout: Duration,
}

impl PeerRouter {
    /// A transport for node `self_id`; `routes` override where a node is dialled.
    pub fn new(
        self_id: u64,
        connect_timeout: Duration,
        routes: std::collections::BTreeMap<u64, String>,
    ) -> PeerRouter {
        PeerRouter {
            inner: Arc::new(Inner {
                self_id,
                routes,
                cluster_id: std::sync::atomic::AtomicU64::new(0),
                addrs: RwLock::new(HashMap::new()),
                channels: Mutex::new(HashMap::new()),
                connect_timeout,
            }),
        }
    }

    /// Records (or updates) a node's peer address.
    pub fn set_addr(&self, node: u64, peer_addr: &str) {
        if let Ok(mut a) = self.inner.addrs.write() {
            a.insert(node, peer_addr.to_string());
        }
    }

    /// Sets the cluster id sent with every Raft RPC (0 = not initialised).
    pub fn set_cluster_id(&self, id: u64) {
        self.inner
            .cluster_id
            .store(id, std::sync::atomic::Ordering::Relaxed);
    }

    fn addr_of(&self, node: u64) -> Result<String, PeerError> {
        if let Some(route) = self.inner.routes.get(&node) {
            return Ok(route.clone());
        }
        self.inner
            .addrs
            .read()
            .ok()
            .and_then(|a| a.get(&node).cloned())
            .ok_or(PeerError::UnknownNode(node))
    }

    /// A client for the peer service at `addr` (channels are cached and
    /// reconnect by themselves).
    pub fn client_for_addr(&self, addr: &str) -> Result<PeerClient<Channel>, PeerError> {
        let mut map = self
            .inner
            .channels
            .lock()
            .map_err(|_| PeerError::Remote("channel cache poisoned".into()))?;
        let channel = match map.get(addr) {
            Some(c) => c.clone(),
            None => {
                let ep = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| PeerError::BadAddress(addr.to_string(), e.to_string()))?
                    .connect_timeout(self.inner.connect_timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(5));
                let c = ep.connect_lazy();
                map.insert(addr.to_string(), c.clone());
                c
            }
        };
        Ok(PeerClient::new(channel)
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES))
    }

    /// A client for node `node`'s peer service.
    pub fn client(&self, node: u64) -> Result<PeerClient<Channel>, PeerError> {
        let addr = self.addr_of(node)?;
        self.client_for_addr(&addr)
    }

    async fn raft_call<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        target: u64,
        group: GroupId,
        kind: RaftKind,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerError> {
        let mut client = self.client(target)?;
        let mut request = tonic::Request::new(RaftRequest {
            group_id: group,
            kind: kind as i32,
            payload: codec::to_wire(req)?,
            from_node: self.inner.self_id,
            cluster_id: self
                .inner
                .cluster_id
                .load(std::sync::atomic::Ordering::Relaxed),
        });
        request.set_timeout(timeout);
        let reply = tokio::time::timeout(timeout, client.raft(request))
            .await
            .map_err(|_| PeerError::Timeout(timeout))??
            .into_inner();
        if !reply.error.is_empty() {
            return Err(PeerError::Remote(reply.error));
        }
        Ok(codec::from_wire(&reply.payload)?)
    }

    async fn send_snapshot(
        &self,
        target: u64,
        group: GroupId,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotData>,
        timeout: Duration,
    ) -> Result<SnapshotResponse<TypeConfig>, PeerError> {
        let mut client = self.client(target)?;
        let data = codec::to_wire(&snapshot.snapshot)?;
        let total = data.len() as u64;
        let mut chunks: Vec<SnapshotChunk> = data
            .chunks(SNAPSHOT_CHUNK_BYTES)
            .map(|c| SnapshotChunk {
                data: c.to_vec(),
                ..Default::default()
            })
            .collect();
        if chunks.is_empty() {
            chunks.push(SnapshotChunk::default());
        }
        chunks[0].group_id = group;
        chunks[0].vote = codec::to_wire(&vote)?;
        chunks[0].meta = codec::to_wire(&snapshot.meta)?;
        chunks[0].total_bytes = total;
        chunks[0].cluster_id = self
            .inner
            .cluster_id
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut request = tonic::Request::new(futures::stream::iter(chunks));
        request.set_timeout(timeout);
        let reply = tokio::time::timeout(timeout, client.install_snapshot(request))
            .await
            .map_err(|_| PeerError::Timeout(timeout))??
            .into_inner();
        if !reply.error.is_empty() {
            return Err(PeerError::Remote(reply.error));
        }
        Ok(codec::from_wire(&reply.payload)?)
    }
}

fn rpc_error(e: PeerError) -> RPCError<TypeConfig> {
    match e {
        // A deadline already cost its time: retry at once.
        PeerError::Timeout(_) => RPCError::Network(NetworkError::new(&e)),
        PeerError::Status(ref s) if s.code() == tonic::Code::DeadlineExceeded => {
            RPCError::Network(NetworkError::new(&e))
        }
        // No connection, unknown group, a peer of another cluster, a codec
        // error: back off rather than spin.
        _ => RPCError::Unreachable(Unreachable::new(&e)),
    }
}

fn streaming_error(e: PeerError) -> StreamingError<TypeConfig> {
    match rpc_error(e) {
        RPCError::Unreachable(u) => StreamingError::Unreachable(u),
        RPCError::Network(n) => StreamingError::Network(n),
        RPCError::Timeout(t) => StreamingError::Timeout(t),
        RPCError::RemoteError(r) => StreamingError::Network(NetworkError::new(&r)),
    }
}

impl GroupRouter<TypeConfig, GroupId> for PeerRouter {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &self,
        target: u64,
        group_id: GroupId,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.raft_call(target, group_id, RaftKind::Append, &rpc, option.hard_ttl())
            .await
            .map_err(rpc_error)
    }

    async fn vote(
        &self,
        target: u64,
        group_id: GroupId,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.raft_call(target, group_id, RaftKind::Vote, &rpc, option.hard_ttl())
            .await
            .map_err(rpc_error)
    }

    async fn pre_vote(
        &self,
        target: u64,
        group_id: GroupId,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.raft_call(target, group_id, RaftKind::PreVote, &rpc, option.hard_ttl())
            .await
            .map_err(rpc_error)
    }

    async fn full_snapshot(
        &self,
        target: u64,
        group_id: GroupId,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let timeout = option.hard_ttl();
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            res = self.send_snapshot(target, group_id, vote, snapshot, timeout) => {
                res.map_err(|e| match e {
                    PeerError::Timeout(d) => StreamingError::Timeout(Timeout {
                        action: openraft::network::RPCTypes::InstallSnapshot,
                        id: self.inner.self_id,
                        target,
                        timeout: d,
                    }),
                    other => streaming_error(other),
                })
            }
        }
    }

    async fn transfer_leader(
        &self,
        target: u64,
        group_id: GroupId,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.raft_call(
            target,
            group_id,
            RaftKind::TransferLeader,
            &req,
            option.hard_ttl(),
        )
        .await
        .map_err(rpc_error)
    }
}

/// openraft network factory of one group over the shared [`PeerRouter`].
#[derive(Clone)]
pub struct GroupNetworkFactory {
    router: PeerRouter,
    group: GroupId,
}

impl GroupNetworkFactory {
    /// The factory of `group`.
    pub fn new(router: PeerRouter, group: GroupId) -> GroupNetworkFactory {
        GroupNetworkFactory { router, group }
    }
}

impl RaftNetworkFactory<TypeConfig> for GroupNetworkFactory {
    type Network = GroupNetworkAdapter<TypeConfig, GroupId, PeerRouter>;

    async fn new_client(&mut self, target: u64, node: &NodeAddr) -> Self::Network {
        self.router.set_addr(target, &node.peer_addr);
        GroupNetworkAdapter::new(self.router.clone(), target, self.group)
    }
}
