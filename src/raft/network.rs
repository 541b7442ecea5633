//! Client side of the peer transport: one cached gRPC channel per peer
//! address, shared by every Raft group on this node (the group id travels in
//! every request). Every call carries the deadline openraft gives it, so a
//! blackholed link cannot wedge replication.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{BoxStream, Stream, StreamExt};
use futures::task::AtomicWaker;
use openraft::error::{
    NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotOf, VoteOf};
use openraft_multi::{GroupNetworkAdapter, GroupRouter};
use tonic::transport::{Channel, Endpoint};

use super::TypeConfig;
use super::state_machine::SnapshotData;
use crate::codec;
use crate::proto::peer_client::PeerClient;
use crate::proto::{AppendAck, AppendFrame, RaftKind, RaftRequest, SnapshotChunk};
use crate::router::NodeAddr;
use crate::storage::keys::GroupId;

/// Bytes of snapshot data per streamed chunk (well under tonic's 4 MiB limit).
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Largest peer message accepted (an append of `max_payload_entries` entries
/// of at most one 1 MiB value each, plus headroom).
pub const MAX_PEER_MESSAGE_BYTES: usize = 64 << 20;

/// Floor of the time an owed append ack may take before the stream is declared
/// stuck (openraft passes the heartbeat interval; a loaded follower's fsync can
/// take longer than that without anything being wrong).
const MIN_APPEND_PROGRESS_TIMEOUT: Duration = Duration::from_millis(250);

/// AppendEntries requests one stream may have sent without their acks (as
/// etcd's and TiKV's `max-inflight-msgs`). openraft builds a request from
/// every entry submitted when the stream is polled; unlimited, a loaded
/// leader sent each turn of its core's loop on its own (2.7 entries per
/// request under W1 put 64), and every request costs a frame, a follower
/// append and an ack. Held back while 4 are owed, the next one carries what
/// was proposed meanwhile: W1 put 64 CPU per put −8 %, +5–20 % puts/s in
/// alternated runs; put 1 and 16 unchanged (bench/RESULTS.md 2026-11-27).
const MAX_APPENDS_IN_FLIGHT: u64 = 4;

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
    type Network = GroupNetwork;

    async fn new_client(&mut self, target: u64, node: &NodeAddr) -> Self::Network {
        self.router.set_addr(target, &node.peer_addr);
        GroupNetwork {
            unary: GroupNetworkAdapter::new(self.router.clone(), target, self.group),
            router: self.router.clone(),
            target,
            group: self.group,
        }
    }
}

/// The connection of one group's leader to one follower: openraft-multi's
/// adapter for the unary RPCs, plus a pipelined `stream_append` over one gRPC
/// stream (the adapter's default waits for each response before the next send).
pub struct GroupNetwork {
    unary: GroupNetworkAdapter<TypeConfig, GroupId, PeerRouter>,
    router: PeerRouter,
    target: u64,
    group: GroupId,
}

/// Requests of one AppendStream sent and not yet acknowledged, shared by the
/// sending side (which stops taking requests from openraft while
/// [`MAX_APPENDS_IN_FLIGHT`] are owed) and the ack side (which wakes it).
#[derive(Default)]
struct AckWindow {
    /// Requests sent minus acks received (each request gets exactly one ack).
    owed: AtomicU64,
    /// The sending side, parked on a full window.
    sender: AtomicWaker,
}

impl AckWindow {
    fn owed(&self) -> u64 {
        self.owed.load(Ordering::Acquire)
    }

    fn acked(&self) {
        self.owed.fetch_sub(1, Ordering::AcqRel);
        self.sender.wake();
    }
}

/// openraft's request stream for one AppendStream, taken from only while
/// fewer than [`MAX_APPENDS_IN_FLIGHT`] requests are owed acks. openraft
/// builds a request when it is polled, from every entry submitted by then, so
/// entries proposed while the window is full leave together in the next one.
struct WindowedRequests<S> {
    requests: S,
    window: Arc<AckWindow>,
    max_in_flight: u64,
}

impl<S> Stream for WindowedRequests<S>
where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Unpin,
{
    type Item = AppendEntriesRequest<TypeConfig>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.window.owed() >= self.max_in_flight {
            self.window.sender.register(cx.waker());
            // An ack that arrived before the registration woke nobody.
            if self.window.owed() >= self.max_in_flight {
                return std::task::Poll::Pending;
            }
        }
        let polled = self.requests.poll_next_unpin(cx);
        if let std::task::Poll::Ready(Some(_)) = &polled {
            self.window.owed.fetch_add(1, Ordering::AcqRel);
        }
        polled
    }
}

/// The leader's side of one AppendStream: acks still owed and the response stream.
struct AppendSession {
    acks: tonic::Streaming<AppendAck>,
    window: Arc<AckWindow>,
    /// How long an owed ack may take before the stream counts as stuck.
    progress_timeout: Duration,
    ended: bool,
}

impl AppendSession {
    /// The next ack, or an error if the follower stopped answering or ended the
    /// stream while acks were owed. Idle waits (nothing owed) never time out.
    async fn next(&mut self) -> Option<Result<StreamAppendResult<TypeConfig>, PeerError>> {
        if self.ended {
            return None;
        }
        let mut waited_with_owed = false;
        let item = loop {
            match tokio::time::timeout(self.progress_timeout, self.acks.message()).await {
                Ok(item) => break item,
                Err(_) if self.window.owed() == 0 => waited_with_owed = false,
                // Owed acks for a whole period (at most two): the link is stuck.
                Err(_) if waited_with_owed => {
                    self.ended = true;
                    return Some(Err(PeerError::Timeout(self.progress_timeout)));
                }
                Err(_) => waited_with_owed = true,
            }
        };
        let ack = match item {
            Ok(Some(ack)) => ack,
            Ok(None) if self.window.owed() == 0 => {
                self.ended = true;
                return None;
            }
            Ok(None) => {
                self.ended = true;
                return Some(Err(PeerError::Remote(
                    "append stream closed by the follower".into(),
                )));
            }
            Err(status) => {
                self.ended = true;
                return Some(Err(PeerError::Status(status)));
            }
        };
        self.window.acked();
        if !ack.error.is_empty() {
            self.ended = true;
            return Some(Err(PeerError::Remote(ack.error)));
        }
        Some(codec::from_wire(&ack.payload).map_err(PeerError::from))
    }
}

impl RaftNetworkV2<TypeConfig> for GroupNetwork {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary.append_entries(rpc, option).await
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        Box::pin(async move {
            let mut client = self.router.client(self.target).map_err(rpc_error)?;
            let window = Arc::new(AckWindow::default());
            let (group, from_node) = (self.group, self.router.inner.self_id);
            let cluster_id = self.router.inner.cluster_id.load(Ordering::Relaxed);
            let requests = WindowedRequests {
                requests: input,
                window: Arc::clone(&window),
                max_in_flight: MAX_APPENDS_IN_FLIGHT,
            };
            let mut first = true;
            let frames = requests.map(move |request| {
                // Encoding our own types does not fail; if it ever did, the empty
                // payload makes the follower end the stream and openraft retries.
                let payload = codec::to_wire(&request).unwrap_or_default();
                let header = std::mem::take(&mut first);
                AppendFrame {
                    group_id: if header { group } else { 0 },
                    from_node: if header { from_node } else { 0 },
                    cluster_id: if header { cluster_id } else { 0 },
                    payload,
                }
            });
            let setup = option.hard_ttl();
            let acks = tokio::time::timeout(setup, client.append_stream(frames))
                .await
                .map_err(|_| rpc_error(PeerError::Timeout(setup)))?
                .map_err(|s| rpc_error(PeerError::Status(s)))?
                .into_inner();
            let session = AppendSession {
                acks,
                window,
                progress_timeout: option.soft_ttl().max(MIN_APPEND_PROGRESS_TIMEOUT),
                ended: false,
            };
            let results = futures::stream::unfold(session, |mut session| async move {
                let item = session.next().await?;
                Some((item.map_err(rpc_error), session))
            });
            Ok(results.boxed())
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary.vote(rpc, option).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary.pre_vote(rpc, option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        self.unary
            .full_snapshot(vote, snapshot, cancel, option)
            .await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary.transfer_leader(req, option).await
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll, Wake, Waker};

    use super::*;

    /// Counts the wake-ups of the stream's consumer.
    #[derive(Default)]
    struct CountingWaker(AtomicU64);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn request() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: openraft::Vote::new(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: Vec::new(),
        }
    }

    #[test]
    fn the_request_stream_is_held_while_the_window_is_full_and_resumes_on_an_ack() {
        let window = Arc::new(AckWindow::default());
        let mut requests = WindowedRequests {
            requests: futures::stream::iter((0..5).map(|_| request())),
            window: Arc::clone(&window),
            max_in_flight: 2,
        };
        let wakes = Arc::new(CountingWaker::default());
        let waker = Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        let mut poll = || Pin::new(&mut requests).poll_next(&mut cx);

        assert!(matches!(poll(), Poll::Ready(Some(_))));
        assert!(matches!(poll(), Poll::Ready(Some(_))));
        assert_eq!(window.owed(), 2);
        assert!(poll().is_pending(), "a third request while two are owed");
        assert_eq!(wakes.0.load(Ordering::Acquire), 0);

        window.acked();
        assert_eq!(
            wakes.0.load(Ordering::Acquire),
            1,
            "an ack wakes the sender"
        );
        assert!(matches!(poll(), Poll::Ready(Some(_))));
        assert!(poll().is_pending());
        window.acked();
        window.acked();
        assert!(matches!(poll(), Poll::Ready(Some(_))));
        assert!(matches!(poll(), Poll::Ready(Some(_))));
        window.acked();
        assert!(
            matches!(poll(), Poll::Ready(None)),
            "the end passes through"
        );
    }
}
