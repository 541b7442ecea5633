//! A shopkv node: one RocksDB, the meta group, the data shards it hosts, and
//! the request path every service uses — propose a command to a group or read
//! from it, forwarding to the group's leader (over the peer port) when this
//! node is not it, retrying with backoff while a group has no leader.
//!
//! Layout: this file starts the node and keeps its groups and cluster map;
//! `request` is the propose/read path (routing, forwarding, lease reads),
//! `ops` the reads a group serves, `status` what `Cluster.Status` reports.

mod alive;
mod ops;
mod request;
mod status;

pub use ops::{ReadOp, ReadResult, SessionRead, SessionReadResult};
pub use status::ReplicaInfo;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::codec;
use crate::config::Config;
use crate::forward::Forwarder;
use crate::payment::{PaymentProvider, SimulatedProvider};
use crate::raft::log_store::LogStore;
use crate::raft::network::{GroupNetworkFactory, PeerRouter};
use crate::raft::state_machine::StateMachine;
use crate::raft::{GroupRaft, TypeConfig};
use crate::router::{ClusterMap, META_GROUP, NodeAddr};
use crate::sm::session::SessionRecord;
use crate::sm::{self, Command, Response};
use crate::storage::keys::{self, GroupId};
use crate::storage::{StorageError, Store};
use crate::watch::WatchHub;

/// Most forwarding hops a request may take (a non-replica forwards to a
/// replica, which forwards to the leader).
pub const MAX_FORWARD_HOPS: u32 = 3;

/// Errors of the request path, with the gRPC meaning the server maps them to.
/// Serializable: a forwarded request returns the leader's error as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum NodeError {
    /// Bad input.
    #[error("{0}")]
    InvalidArgument(String),
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The system is not in a state that allows this.
    #[error("{0}")]
    FailedPrecondition(String),
    /// No leader or quorum in time; nothing was proposed, safe to retry.
    #[error("{0}")]
    Unavailable(String),
    /// The write was proposed but its outcome is not known.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// A bug or a storage failure.
    #[error("internal: {0}")]
    Internal(String),
}

impl From<StorageError> for NodeError {
    fn from(e: StorageError) -> Self {
        NodeError::Internal(e.to_string())
    }
}

impl From<codec::CodecError> for NodeError {
    fn from(e: codec::CodecError) -> Self {
        NodeError::Internal(e.to_string())
    }
}

/// What this data dir belongs to (stored in the default column family).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Identity {
    node_id: u64,
    cluster_id: u64,
}

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data dir could not be opened.
    #[error("cannot open data dir {dir}: {source}")]
    Open {
        /// The dir.
        dir: String,
        /// Why.
        source: StorageError,
    },
    /// The data dir belongs to another node.
    #[error("data dir {dir} belongs to node {found}, not node {expected}")]
    WrongNode {
        /// The dir.
        dir: String,
        /// Node id recorded in it.
        found: u64,
        /// Configured node id.
        expected: u64,
    },
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// A running node.
pub struct Node {
    /// This node's id.
    pub id: u64,
    /// Its configuration.
    pub config: Config,
    raft_config: Arc<openraft::Config>,
    store: Store,
    router: PeerRouter,
    forwarder: Forwarder,
    groups: RwLock<BTreeMap<GroupId, GroupRaft>>,
    cluster: watch::Sender<Option<Arc<ClusterMap>>>,
    /// Until then this process neither votes nor campaigns (see [`Node::in_vote_hold_off`]).
    vote_hold_off_until: Instant,
    /// This process's alive stamp, which bounds the hold-off of its next start.
    alive: Arc<alive::AliveStamp>,
    /// The payment provider orders are charged and refunded through.
    pub payments: Arc<dyn PaymentProvider>,
    /// Session deadlines, kept while this node leads the meta group.
    pub sessions: crate::lease::SessionClock,
    /// Held while the session clock is read in full, so that the keep-alives
    /// arriving as this node takes over the meta group wait for one read
    /// instead of each starting its own.
    session_sync: Mutex<()>,
    /// Recently applied changes of each local group, for watchers.
    pub watches: Arc<WatchHub>,
}

impl Node {
    /// Opens the data dir, starts the meta group and every data shard the
    /// stored cluster map places here, and the background tasks.
    pub async fn start(config: Config) -> Result<Arc<Node>, StartError> {
        let dir = config.data_dir.display().to_string();
        std::fs::create_dir_all(&config.data_dir).map_err(|e| StartError::Open {
            dir: dir.clone(),
            source: StorageError::Io(e),
        })?;
        let store =
            Store::open(&config.data_dir.join("db"), config.store_options()).map_err(|source| {
                StartError::Open {
                    dir: dir.clone(),
                    source,
                }
            })?;
        let identity = match store.node_identity().map_err(|source| StartError::Open {
            dir: dir.clone(),
            source,
        })? {
            Some(bytes) => codec::decode::<Identity>(&bytes)
                .map_err(|e| StartError::Other(format!("data dir {dir}: bad identity: {e}")))?,
            None => {
                let id = Identity {
                    node_id: config.id,
                    cluster_id: 0,
                };
                let bytes = codec::encode(&id).map_err(|e| StartError::Other(e.to_string()))?;
                store
                    .put_node_identity(&bytes)
                    .map_err(|source| StartError::Open {
                        dir: dir.clone(),
                        source,
                    })?;
                id
            }
        };
        if identity.node_id != config.id {
            return Err(StartError::WrongNode {
                dir,
                found: identity.node_id,
                expected: config.id,
            });
        }
        let raft_config = Arc::new(
            config
                .raft_config()
                .map_err(|e| StartError::Other(e.to_string()))?,
        );
        let router = PeerRouter::new(
            config.id,
            Duration::from_millis(500),
            config.peer_routes.clone(),
        );
        router.set_addr(config.id, &config.peer_addr);
        router.set_cluster_id(identity.cluster_id);
        let (cluster, _) = watch::channel(None);
        // Followers remember a leader's lease only in memory; a restarted one must
        // not help elect anyone until every lease it may have granted has expired.
        // Its last run's alive stamp says how much of that time has already passed.
        let leader_lease = Duration::from_millis(raft_config.election_timeout_max);
        let (alive, hold_off) =
            alive::AliveStamp::start(&config.data_dir, leader_lease).map_err(|e| {
                StartError::Open {
                    dir: dir.clone(),
                    source: StorageError::Io(e),
                }
            })?;
        if !hold_off.is_zero() {
            tracing::info!(
                hold_off_ms = hold_off.as_millis(),
                "not voting yet: a lease this node granted before it started may still be in use"
            );
        }
        let node = Arc::new(Node {
            id: config.id,
            config,
            raft_config,
            store,
            forwarder: Forwarder::new(router.clone()),
            router,
            groups: RwLock::new(BTreeMap::new()),
            cluster,
            vote_hold_off_until: Instant::now() + hold_off,
            alive,
            payments: Arc::new(SimulatedProvider::new()),
            sessions: crate::lease::SessionClock::default(),
            session_sync: Mutex::new(()),
            watches: Arc::new(WatchHub::new()),
        });
        let meta = node
            .start_group(META_GROUP)
            .await
            .map_err(|e| StartError::Other(e.to_string()))?;
        node.refresh_cluster_map()
            .await
            .map_err(|e| StartError::Other(e.to_string()))?;
        tokio::spawn(Node::watch_meta(Arc::downgrade(&node), meta));
        tokio::spawn(Node::balance_leaders(Arc::downgrade(&node)));
        tokio::spawn(crate::sweeper::run(Arc::downgrade(&node)));
        tokio::spawn(crate::lease::run(Arc::downgrade(&node)));
        tokio::spawn(crate::lockgc::run(Arc::downgrade(&node)));
        Ok(node)
    }

    /// The peer transport.
    pub fn router(&self) -> &PeerRouter {
        &self.router
    }

    /// This node's addresses.
    pub fn addr(&self) -> NodeAddr {
        NodeAddr {
            peer_addr: self.config.peer_addr.clone(),
            client_addr: self.config.client_addr.clone(),
        }
    }

    /// The cluster map, once the cluster is initialised.
    pub fn cluster_map(&self) -> Option<Arc<ClusterMap>> {
        self.cluster.borrow().clone()
    }

    /// The cluster id (0 before init).
    pub fn cluster_id(&self) -> u64 {
        self.cluster_map().map_or(0, |m| m.cluster_id)
    }

    /// The local Raft of `group`, if this node hosts it.
    pub fn group(&self, group: GroupId) -> Option<GroupRaft> {
        self.groups.read().ok()?.get(&group).cloned()
    }

    /// True after a start until every leader lease this node's last run may have
    /// granted has run out (a whole lease, election_timeout_max, if its alive stamp
    /// says nothing; none if it was down longer than that): it then refuses votes
    /// and does not campaign. Leaders serve reads on their lease, and followers keep
    /// the lease they granted only in memory; without the hold-off, a follower that
    /// crashed and restarted could elect a new leader while the old one still serves
    /// lease reads, which would then be stale.
    pub fn in_vote_hold_off(&self) -> bool {
        Instant::now() < self.vote_hold_off_until
    }

    /// Whether this node may accept a leader's appends (and so grant it a
    /// lease) now: only while its alive stamp is fresh, which is what lets a
    /// restart that finds an old stamp vote without waiting a whole lease.
    pub fn accepts_leader_appends(&self) -> bool {
        self.alive.fresh()
    }

    /// The meta group's term, if this node leads it.
    pub fn meta_leader_term(&self) -> Option<u64> {
        let raft = self.group(META_GROUP)?;
        let m = raft.metrics().borrow_watched().clone();
        (m.current_leader == Some(self.id)).then_some(m.current_term)
    }

    /// The longest election timeout (the grace a new meta leader adds to
    /// every session's remaining time).
    pub fn election_timeout(&self) -> Duration {
        Duration::from_millis(self.raft_config.election_timeout_max)
    }

    /// Every session in this node's replica of the meta group.
    pub fn all_sessions(&self) -> Result<Vec<(u64, SessionRecord)>, NodeError> {
        let rows = self.store.scan_records(
            META_GROUP,
            &keys::session_prefix(),
            sm::session::MAX_SESSIONS as usize,
        )?;
        rows.into_iter()
            .filter_map(|(k, v)| {
                let id = keys::session_id_of(&k)?;
                Some(codec::decode::<SessionRecord>(&v).map(|r| (id, r)))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(NodeError::from)
    }

    /// Brings the session clock to `term` with one read of every session,
    /// following the meta group's changes from just before the read.
    pub fn sync_sessions(&self, term: u64) -> Result<(), NodeError> {
        let _one_at_a_time = self
            .session_sync
            .lock()
            .map_err(|_| NodeError::Internal("session sync lock poisoned".into()))?;
        if !self.sessions.needs_sync(term) {
            return Ok(());
        }
        let cursor = self.watches.cursor(META_GROUP, 0);
        let sessions = self.all_sessions()?;
        self.sessions
            .sync(term, cursor, &sessions, self.election_timeout());
        Ok(())
    }

    /// Serves a session read on the meta leader (after the linearizable check).
    fn read_session(
        &self,
        group: GroupId,
        op: &SessionRead,
    ) -> Result<SessionReadResult, NodeError> {
        if group != META_GROUP {
            return Err(NodeError::InvalidArgument(
                "sessions live in the meta group".into(),
            ));
        }
        let id = match op {
            SessionRead::KeepAlive { id } | SessionRead::Get { id } => *id,
        };
        let Some(bytes) = self.store.get_record(META_GROUP, &keys::session_key(id))? else {
            return Ok(SessionReadResult::Missing);
        };
        let rec: SessionRecord = codec::decode(&bytes)?;
        let Some(term) = self.meta_leader_term() else {
            return Err(NodeError::Unavailable(
                "this node no longer leads the meta group".into(),
            ));
        };
        if self.sessions.needs_sync(term) {
            self.sync_sessions(term)?;
        }
        match op {
            SessionRead::KeepAlive { .. } => {
                if !self.sessions.keep_alive(term, id, &rec) {
                    return Err(NodeError::Unavailable(
                        "the meta group's leadership changed; retry".into(),
                    ));
                }
                Ok(SessionReadResult::Alive {
                    ttl_ms: rec.ttl_ms,
                    remaining_ms: rec.ttl_ms,
                    locks: Vec::new(),
                })
            }
            SessionRead::Get { .. } => {
                // A session granted since the clock last caught up is not on it
                // yet: its record's remaining time is its TTL.
                let remaining = self.sessions.remaining(term, id);
                Ok(SessionReadResult::Alive {
                    ttl_ms: rec.ttl_ms,
                    remaining_ms: remaining.map_or(rec.remaining_ms, |d| d.as_millis() as u64),
                    locks: rec.locks,
                })
            }
        }
    }

    /// Data shards whose leader is this node's replica.
    pub fn led_data_groups(&self) -> Vec<GroupId> {
        self.local_groups()
            .into_iter()
            .filter(|(g, raft)| {
                *g != META_GROUP && raft.metrics().borrow_watched().current_leader == Some(self.id)
            })
            .map(|(g, _)| g)
            .collect()
    }

    fn local_groups(&self) -> Vec<(GroupId, GroupRaft)> {
        self.groups
            .read()
            .map(|g| g.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default()
    }

    /// The index `group`'s state machine has applied, as stored.
    fn applied_index_on_disk(&self, group: GroupId) -> Result<u64, NodeError> {
        let stored = self
            .store
            .sm_meta(group, keys::SmMetaTag::LastApplied)
            .map_err(|e| NodeError::Internal(format!("read applied index: {e}")))?;
        applied_index_of(stored)
    }

    /// One record of this replica's `group`, as applied here (no leader check).
    pub fn local_record(
        &self,
        group: GroupId,
        record_key: &[u8],
    ) -> Result<Option<Vec<u8>>, NodeError> {
        self.store
            .get_record(group, record_key)
            .map_err(|e| NodeError::Internal(format!("read record: {e}")))
    }

    /// Visits this replica's records of `group` under `prefix`, in key order
    /// and all from one point-in-time view, until `visit` returns false;
    /// returns the log index that view had applied (0 before any apply).
    pub fn visit_records_as_applied(
        &self,
        group: GroupId,
        prefix: &[u8],
        visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<u64, NodeError> {
        let stored = self
            .store
            .visit_records_as_applied(group, prefix, visit)
            .map_err(|e| NodeError::Internal(format!("scan records: {e}")))?;
        applied_index_of(stored)
    }

    async fn start_group(&self, group: GroupId) -> Result<GroupRaft, NodeError> {
        if let Some(r) = self.group(group) {
            return Ok(r);
        }
        self.watches
            .register(group, self.applied_index_on_disk(group)?);
        let raft = GroupRaft::new(
            self.id,
            self.raft_config.clone(),
            GroupNetworkFactory::new(self.router.clone(), group),
            LogStore::new(group, self.store.clone()),
            StateMachine::new(group, self.store.clone(), self.watches.clone()),
        )
        .await
        .map_err(|e| NodeError::Internal(format!("start group {group}: {e}")))?;
        // Until its core reports the state it loaded, a new Raft's metrics are
        // placeholders (term 0, nothing committed); status would show them after
        // every restart. Register the group only once they are real.
        let mut metrics = raft.metrics();
        let _ = tokio::time::timeout(FIRST_METRICS_TIMEOUT, metrics.changed()).await;
        let hold_off = self
            .vote_hold_off_until
            .saturating_duration_since(Instant::now());
        if !hold_off.is_zero() {
            raft.runtime_config().elect(false);
            let raft = raft.clone();
            tokio::spawn(async move {
                tokio::time::sleep(hold_off).await;
                raft.runtime_config().elect(true);
            });
        }
        let mut groups = self
            .groups
            .write()
            .map_err(|_| NodeError::Internal("group registry poisoned".into()))?;
        Ok(groups.entry(group).or_insert(raft).clone())
    }

    /// Re-reads the cluster map from the meta group's applied state and starts
    /// any data shard placed here that is not running yet.
    async fn refresh_cluster_map(&self) -> Result<(), NodeError> {
        let Some(bytes) = self
            .store
            .get_record(META_GROUP, &keys::cluster_map_key())?
        else {
            return Ok(());
        };
        let map = sm::decode_cluster_map(&bytes).map_err(|e| NodeError::Internal(e.to_string()))?;
        if self.cluster_map().as_deref() == Some(&map) {
            return Ok(());
        }
        for (id, addr) in &map.nodes {
            self.router.set_addr(*id, &addr.peer_addr);
        }
        self.router.set_cluster_id(map.cluster_id);
        self.persist_cluster_id(map.cluster_id)?;
        for (group, placement) in &map.groups {
            if !placement.replicas.contains(&self.id) {
                continue;
            }
            let raft = self.start_group(*group).await?;
            if placement.preferred_leader == self.id {
                let members: BTreeMap<u64, NodeAddr> = placement
                    .replicas
                    .iter()
                    .filter_map(|id| map.nodes.get(id).map(|a| (*id, a.clone())))
                    .collect();
                // Only succeeds on a pristine group; NotAllowed after a restart is expected.
                if let Err(e) = raft.initialize(members).await {
                    tracing::debug!(group, "initialize: {e}");
                }
            }
        }
        self.cluster.send_replace(Some(Arc::new(map)));
        Ok(())
    }

    fn persist_cluster_id(&self, cluster_id: u64) -> Result<(), NodeError> {
        let id = Identity {
            node_id: self.id,
            cluster_id,
        };
        self.store.put_node_identity(&codec::encode(&id)?)?;
        Ok(())
    }

    async fn watch_meta(node: std::sync::Weak<Node>, meta: GroupRaft) {
        let mut metrics = meta.metrics();
        let mut seen_applied = None;
        loop {
            let applied = metrics.borrow_watched().last_applied;
            if applied != seen_applied {
                seen_applied = applied;
                let Some(n) = node.upgrade() else { return };
                if let Err(e) = n.refresh_cluster_map().await {
                    tracing::warn!("cluster map refresh failed: {e}");
                }
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    }

    /// Moves leadership of a data shard this node leads to its preferred
    /// leader when that replica has caught up, so leaders spread over nodes.
    async fn balance_leaders(node: std::sync::Weak<Node>) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        let mut cooldown: BTreeMap<GroupId, Instant> = BTreeMap::new();
        loop {
            tick.tick().await;
            let Some(n) = node.upgrade() else { return };
            let Some(map) = n.cluster_map() else { continue };
            for (group, raft) in n.local_groups() {
                let Some(placement) = map.groups.get(&group) else {
                    continue;
                };
                let preferred = placement.preferred_leader;
                if preferred == n.id
                    || cooldown
                        .get(&group)
                        .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
                {
                    continue;
                }
                let m = raft.metrics().borrow_watched().clone();
                if m.state != ServerState::Leader {
                    continue;
                }
                let caught_up = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&preferred).cloned().flatten())
                    .is_some_and(|matched| Some(matched.index) >= m.last_log_index);
                if caught_up {
                    tracing::info!(
                        group,
                        to = preferred,
                        "transferring leadership to preferred leader"
                    );
                    cooldown.insert(group, Instant::now());
                    if let Err(e) = raft.trigger().transfer_leader(preferred).await {
                        tracing::warn!(group, "transfer leader: {e}");
                    }
                }
            }
        }
    }

    /// Forms the cluster: initialises the meta group with `nodes` (this node
    /// among them) and records the cluster map with `shards` data shards.
    pub async fn init_cluster(
        &self,
        shards: u32,
        nodes: BTreeMap<u64, NodeAddr>,
        deadline: Instant,
    ) -> Result<ClusterMap, NodeError> {
        if let Some(map) = self.cluster_map() {
            return Err(NodeError::FailedPrecondition(format!(
                "cluster already initialised (cluster id {:016x})",
                map.cluster_id
            )));
        }
        if !nodes.contains_key(&self.id) {
            return Err(NodeError::InvalidArgument(format!(
                "the endpoints must include the contacted node {}",
                self.id
            )));
        }
        let meta = self
            .group(META_GROUP)
            .ok_or_else(|| NodeError::Internal("meta group not running".into()))?;
        if let Err(e) = meta.initialize(nodes.clone()).await {
            return Err(NodeError::FailedPrecondition(format!(
                "meta group cannot be initialised (already part of a cluster?): {e}"
            )));
        }
        let cluster_id = random_u64() | 1;
        let map = ClusterMap::new(cluster_id, shards, nodes);
        match self
            .propose(
                META_GROUP,
                Command::InitCluster(map.clone()),
                deadline,
                MAX_FORWARD_HOPS,
            )
            .await?
        {
            Response::Init { ok: true, .. } => Ok(map),
            Response::Init {
                ok: false,
                cluster_id,
            } => Err(NodeError::FailedPrecondition(format!(
                "cluster already initialised (cluster id {cluster_id:016x})"
            ))),
            other => Err(NodeError::Internal(format!(
                "unexpected init response {other:?}"
            ))),
        }
    }
}

/// A random 64-bit value from the std hasher's per-process random keys.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// How long a starting group may take to report its loaded state (see `start_group`).
const FIRST_METRICS_TIMEOUT: Duration = Duration::from_secs(5);

/// The log index in a stored applied log id (0 when none is stored).
fn applied_index_of(stored: Option<Vec<u8>>) -> Result<u64, NodeError> {
    match stored {
        Some(b) => codec::decode::<openraft::type_config::alias::LogIdOf<TypeConfig>>(&b)
            .map(|l| l.index)
            .map_err(|e| NodeError::Internal(format!("decode applied index: {e}"))),
        None => Ok(0),
    }
}
