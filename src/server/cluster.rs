//! `shopkv.v1.Cluster`: Init (form a cluster from the given endpoints),
//! Status (every group's replicas as every node sees them), Identity.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Endpoint;
use tonic::{Request, Response, Status};

use super::deadline_of;
use crate::node::Node;
use crate::proto;
use crate::proto::cluster_client::ClusterClient;
use crate::proto::cluster_server::Cluster;
use crate::router::{META_GROUP, NodeAddr};

/// Most data shards a cluster may have.
pub const MAX_SHARDS: u32 = 256;
/// Most nodes `Init` accepts.
pub const MAX_INIT_NODES: usize = 7;
/// How long Status waits for each node.
const STATUS_NODE_TIMEOUT: Duration = Duration::from_secs(2);

/// The cluster service.
pub struct ClusterService {
    node: Arc<Node>,
}

impl ClusterService {
    /// A service over `node`.
    pub fn new(node: Arc<Node>) -> ClusterService {
        ClusterService { node }
    }

    fn info(&self) -> proto::NodeInfo {
        let a = self.node.addr();
        proto::NodeInfo {
            id: self.node.id,
            peer_addr: a.peer_addr,
            client_addr: a.client_addr,
        }
    }
}

async fn identity_of(endpoint: &str) -> Result<proto::IdentityResponse, Status> {
    let ep = Endpoint::from_shared(format!("http://{endpoint}"))
        .map_err(|e| Status::invalid_argument(format!("bad endpoint {endpoint:?}: {e}")))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(3));
    let channel = ep
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("cannot reach {endpoint}: {e}")))?;
    Ok(ClusterClient::new(channel)
        .identity(proto::IdentityRequest {})
        .await?
        .into_inner())
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    #[tracing::instrument(name = "cluster.init", skip_all, fields(shards = req.get_ref().shards))]
    async fn init(
        &self,
        req: Request<proto::InitRequest>,
    ) -> Result<Response<proto::InitResponse>, Status> {
        let deadline = deadline_of(&req, Duration::from_secs(20));
        let r = req.into_inner();
        if r.shards == 0 || r.shards > MAX_SHARDS {
            return Err(Status::invalid_argument(format!(
                "shards must be 1..={MAX_SHARDS}, got {}",
                r.shards
            )));
        }
        if r.endpoints.is_empty() || r.endpoints.len() > MAX_INIT_NODES {
            return Err(Status::invalid_argument(format!(
                "give 1..={MAX_INIT_NODES} endpoints, got {}",
                r.endpoints.len()
            )));
        }
        let mut nodes = BTreeMap::new();
        for ep in &r.endpoints {
            let ident = identity_of(ep).await?;
            let info = ident
                .node
                .ok_or_else(|| Status::internal(format!("{ep} sent no identity")))?;
            if ident.cluster_id != 0 {
                return Err(Status::failed_precondition(format!(
                    "node {} at {ep} already belongs to cluster {:016x}",
                    info.id, ident.cluster_id
                )));
            }
            let addr = NodeAddr {
                peer_addr: info.peer_addr,
                client_addr: info.client_addr,
            };
            if nodes.insert(info.id, addr).is_some() {
                return Err(Status::invalid_argument(format!(
                    "two endpoints are node {}",
                    info.id
                )));
            }
        }
        let map = self.node.init_cluster(r.shards, nodes, deadline).await?;
        tracing::info!(
            cluster_id = map.cluster_id,
            shards = map.shards,
            "cluster initialised"
        );
        Ok(Response::new(proto::InitResponse {
            cluster_id: map.cluster_id,
            shards: map.shards,
            nodes: map
                .nodes
                .iter()
                .map(|(id, a)| proto::NodeInfo {
                    id: *id,
                    peer_addr: a.peer_addr.clone(),
                    client_addr: a.client_addr.clone(),
                })
                .collect(),
        }))
    }

    #[tracing::instrument(name = "cluster.status", skip_all)]
    async fn status(
        &self,
        _req: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        let map = self.node.cluster_map();
        let nodes: Vec<proto::NodeInfo> = match &map {
            Some(m) => m
                .nodes
                .iter()
                .map(|(id, a)| proto::NodeInfo {
                    id: *id,
                    peer_addr: a.peer_addr.clone(),
                    client_addr: a.client_addr.clone(),
                })
                .collect(),
            None => vec![self.info()],
        };
        let asks = nodes.iter().map(|info| {
            let router = self.node.router().clone();
            let info = info.clone();
            async move {
                let res = async {
                    let mut client = router.client(info.id).map_err(|e| e.to_string())?;
                    let mut req = Request::new(proto::LocalStatusRequest { with_digest: false });
                    req.set_timeout(STATUS_NODE_TIMEOUT);
                    tokio::time::timeout(STATUS_NODE_TIMEOUT, client.local_status(req))
                        .await
                        .map_err(|_| "timed out".to_string())?
                        .map(|r| r.into_inner())
                        .map_err(|s| s.message().to_string())
                }
                .await;
                (info, res)
            }
        });
        let mut groups: BTreeMap<u64, proto::GroupStatus> = BTreeMap::new();
        if let Some(m) = &map {
            for g in std::iter::once(META_GROUP).chain(m.data_groups()) {
                groups.insert(
                    g,
                    proto::GroupStatus {
                        group_id: g,
                        members: m.replicas(g),
                        ..Default::default()
                    },
                );
            }
        }
        let ours = map.as_ref().map_or(0, |m| m.cluster_id);
        let mut node_status = Vec::new();
        for (info, res) in futures::future::join_all(asks).await {
            // A process at a member's address that belongs to another cluster
            // (started on the wrong data dir) is not a member.
            let res = res.and_then(|reply| {
                if reply.cluster_id != 0 && ours != 0 && reply.cluster_id != ours {
                    Err(format!(
                        "belongs to another cluster ({:016x})",
                        reply.cluster_id
                    ))
                } else {
                    Ok(reply)
                }
            });
            match res {
                Ok(reply) => {
                    for rep in reply.replicas {
                        let Some(st) = rep.status else { continue };
                        let g = groups
                            .entry(rep.group_id)
                            .or_insert_with(|| proto::GroupStatus {
                                group_id: rep.group_id,
                                members: rep.members.clone(),
                                ..Default::default()
                            });
                        // The highest term seen names the current leader.
                        if st.term > g.term || (st.term == g.term && g.leader == 0) {
                            g.term = st.term;
                            if st.leader != 0 {
                                g.leader = st.leader;
                            }
                        }
                        g.replicas.push(st);
                    }
                    node_status.push(proto::NodeStatus {
                        node: Some(info),
                        reachable: true,
                        error: String::new(),
                    });
                }
                Err(error) => node_status.push(proto::NodeStatus {
                    node: Some(info),
                    reachable: false,
                    error,
                }),
            }
        }
        for g in groups.values_mut() {
            g.replicas.sort_by_key(|r| r.node_id);
            // The leader's state is the current one (followers may lag).
            if let Some(l) = g.replicas.iter().find(|r| r.node_id == g.leader) {
                g.txns_in_flight = l.txns_in_flight;
                g.oldest_txn_age_ms = l.oldest_txn_age_ms;
            }
        }
        Ok(Response::new(proto::StatusResponse {
            cluster_id: map.as_ref().map_or(0, |m| m.cluster_id),
            shards: map.as_ref().map_or(0, |m| m.shards),
            nodes: node_status,
            groups: groups.into_values().collect(),
        }))
    }

    async fn identity(
        &self,
        _req: Request<proto::IdentityRequest>,
    ) -> Result<Response<proto::IdentityResponse>, Status> {
        Ok(Response::new(proto::IdentityResponse {
            node: Some(self.info()),
            cluster_id: self.node.cluster_id(),
        }))
    }
}
