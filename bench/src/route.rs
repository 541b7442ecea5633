//! Leader routing for the shopkv driver: a request goes straight to the node that
//! leads the record's shard, so the cluster does not forward it (as TiKV's clients
//! send to the region leader and Redis Cluster clients to the slot's owner).
//!
//! Any node accepts any request; a stale table only costs the forwarding hop the
//! table exists to save, never a wrong answer. The table (shard count, leader per
//! shard) comes from `Cluster.Status` and is refreshed every [`REFRESH_EVERY`].
//! The key → shard function is the one documented in `proto/shopkv/v1/kv.proto`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use tonic::transport::Channel;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::client::{Link, request};
use crate::proto::StatusRequest;
use crate::proto::cluster_client::ClusterClient;

/// How often the leader table is re-read.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// Seed of shopkv's routing hash (`proto/shopkv/v1/kv.proto`).
const ROUTING_SEED: u64 = 0x5348_4f50_4b56_0001;

/// The shard (1..=shards) of a routing key: a KV key itself, or `order/` + an
/// order id, `sku/` + a SKU, `customer/` + a customer id.
pub fn shard_for(routing_key: &[u8], shards: u32) -> u64 {
    let shards = u64::from(shards.max(1));
    1 + xxh3_64_with_seed(routing_key, ROUTING_SEED) % shards
}

/// The shard of an order (its anchor for a cross-shard Place).
pub fn shard_of_order(order_id: &str, shards: u32) -> u64 {
    let mut key = b"order/".to_vec();
    key.extend_from_slice(order_id.as_bytes());
    shard_for(&key, shards)
}

#[derive(Default)]
struct Table {
    shards: u32,
    /// Shard → node id of its leader (absent while unknown).
    leaders: HashMap<u64, u64>,
}

/// Connections to every node the bench was given, and who leads which shard.
pub struct Routes {
    table: RwLock<Table>,
    /// Node id → the bench's connections to that node.
    links: HashMap<u64, Vec<Link>>,
}

impl Routes {
    /// Reads the table once through `via`, maps `links` (endpoint, connection) to
    /// node ids by their client address, and keeps the table fresh in the
    /// background for as long as the returned handle lives.
    pub async fn start(
        via: Channel,
        links: Vec<(String, Link)>,
    ) -> Result<Arc<Routes>, tonic::Status> {
        let status = ClusterClient::new(via.clone())
            .status(request(StatusRequest {}))
            .await?
            .into_inner();
        let by_addr: HashMap<&str, u64> = status
            .nodes
            .iter()
            .filter_map(|n| n.node.as_ref())
            .map(|n| (n.client_addr.as_str(), n.id))
            .collect();
        let mut by_node: HashMap<u64, Vec<Link>> = HashMap::new();
        for (endpoint, link) in links {
            if let Some(id) = by_addr.get(endpoint.as_str()) {
                by_node.entry(*id).or_default().push(link);
            }
        }
        let routes = Arc::new(Routes {
            table: RwLock::new(Table::default()),
            links: by_node,
        });
        routes.update(&status);
        tokio::spawn(refresh(Arc::downgrade(&routes), ClusterClient::new(via)));
        Ok(routes)
    }

    fn update(&self, status: &crate::proto::StatusResponse) {
        let leaders = status
            .groups
            .iter()
            .filter(|g| g.group_id != 0 && g.leader != 0)
            .map(|g| (g.group_id, g.leader))
            .collect();
        if let Ok(mut t) = self.table.write() {
            *t = Table {
                shards: status.shards,
                leaders,
            };
        }
    }

    /// The node the table says leads `shard`, if the bench has a connection to it.
    pub fn leader_of(&self, shard: u64) -> Option<u64> {
        let node = *self.table.read().ok()?.leaders.get(&shard)?;
        self.links.contains_key(&node).then_some(node)
    }

    /// A connection to the leader of the shard `shard_of(shards)` names, the
    /// `slot`-th of the bench's connections to that node; `None` while unknown.
    pub fn leader_link(&self, shard_of: impl Fn(u32) -> u64, slot: usize) -> Option<&Link> {
        let node = {
            let t = self.table.read().ok()?;
            if t.shards == 0 {
                return None;
            }
            *t.leaders.get(&shard_of(t.shards))?
        };
        let links = self.links.get(&node)?;
        links.get(slot % links.len().max(1))
    }
}

async fn refresh(routes: Weak<Routes>, mut cluster: ClusterClient<Channel>) {
    loop {
        tokio::time::sleep(REFRESH_EVERY).await;
        let Some(routes) = routes.upgrade() else {
            return;
        };
        // A failed refresh keeps the old table: requests still succeed, forwarded.
        if let Ok(status) = cluster.status(request(StatusRequest {})).await {
            routes.update(&status.into_inner());
        }
    }
}
