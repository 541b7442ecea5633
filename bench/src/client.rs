//! One connection to the system under test. Both drivers connect the same way:
//! `conns` HTTP/2 connections spread round-robin over the given endpoints, clients
//! spread round-robin over the connections, a 10 s deadline on every request.
//! The shopkv driver, unless told `--route any`, then sends each KV request and
//! order to a connection to its shard's leader ([`crate::route`]), as a client
//! of a multi-Raft store does; etcd has one leader and its client does not route.
//! With `--kv-api batch` its KV requests go on each connection's `Kv.Batch`
//! stream ([`crate::batch`]) instead of one unary call each.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use crate::BenchError;
use crate::batch::BatchLink;
use crate::proto::batch_item::Op;
use crate::proto::batch_result::Result as Reply;
use crate::proto::catalog_client::CatalogClient;
use crate::proto::inventory_client::InventoryClient;
use crate::proto::kv_client::KvClient;
use crate::proto::lock_client::LockClient;
use crate::proto::orders_client::OrdersClient;
use crate::proto::session_client::SessionClient;
use crate::proto::{GetRequest, PutRequest};
use crate::route::{self, Routes};

/// Deadline of one operation; a slower answer counts as an error.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which store a run drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum System {
    Shopkv,
    Etcd,
}

impl System {
    pub fn as_str(self) -> &'static str {
        match self {
            System::Shopkv => "shopkv",
            System::Etcd => "etcd",
        }
    }
}

/// Why one operation failed. The runner counts these; it never stops on them.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("rpc: {0}")]
    Rpc(String),
    #[error("key {0} not found")]
    Missing(String),
    #[error("{0}")]
    Check(String),
    /// The workload is over (e.g. sold out): the client stops, nothing is counted.
    #[error("done")]
    Done,
}

/// One connection to a shopkv node, and its `Kv.Batch` stream if KV requests
/// go that way.
#[derive(Clone)]
pub struct Link {
    pub channel: Channel,
    pub batch: Option<BatchLink>,
}

/// How the shopkv driver sends KV requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KvApi {
    /// One unary call per request (the default).
    Unary,
    /// Every client's requests on its connection's `Kv.Batch` stream.
    Batch,
}

/// shopkv's services over one connection.
#[derive(Clone)]
pub struct ShopkvConn {
    pub kv: KvClient<Channel>,
    pub catalog: CatalogClient<Channel>,
    pub inventory: InventoryClient<Channel>,
    pub orders: OrdersClient<Channel>,
    pub sessions: SessionClient<Channel>,
    pub locks: LockClient<Channel>,
    /// This connection's `Kv.Batch` stream, with `--kv-api batch`.
    batch: Option<BatchLink>,
    /// Shard leaders, when routing; `slot` picks among the connections to one node.
    routes: Option<Arc<Routes>>,
    slot: usize,
}

impl ShopkvConn {
    /// The KV service on the leader of `key`'s shard (this connection if unknown).
    pub fn kv_for(&self, key: &[u8]) -> KvClient<Channel> {
        self.routed(|shards| route::shard_for(key, shards))
            .map(|link| KvClient::new(link.channel.clone()))
            .unwrap_or_else(|| self.kv.clone())
    }

    /// The `Kv.Batch` stream to the leader of `key`'s shard (this connection's if
    /// unknown); `None` unless the driver batches.
    fn batch_for(&self, key: &[u8]) -> Option<BatchLink> {
        // Unary mode must not route twice (here and in `kv_for`): the load
        // generator shares the cores with the cluster.
        self.batch.as_ref()?;
        self.routed(|shards| route::shard_for(key, shards))
            .and_then(|link| link.batch.clone())
            .or_else(|| self.batch.clone())
    }

    /// The Orders service on the leader of the order's (anchor) shard.
    pub fn orders_for(&self, order_id: &str) -> OrdersClient<Channel> {
        self.routed(|shards| route::shard_of_order(order_id, shards))
            .map(|link| OrdersClient::new(link.channel.clone()))
            .unwrap_or_else(|| self.orders.clone())
    }

    /// The leader table, when routing.
    pub fn routes(&self) -> Option<&Arc<Routes>> {
        self.routes.as_ref()
    }

    fn routed(&self, shard_of: impl Fn(u32) -> u64) -> Option<&Link> {
        self.routes.as_ref()?.leader_link(shard_of, self.slot)
    }
}

/// Where the shopkv driver sends a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Routing {
    /// To the leader of the record's shard (the default).
    Leader,
    /// To the client's own connection; the cluster forwards to the leader.
    Any,
}

/// A cloneable handle on one connection.
#[derive(Clone)]
pub enum Conn {
    Shopkv(Box<ShopkvConn>),
    #[cfg(feature = "etcd")]
    Etcd(Box<etcd_client::Client>),
}

/// Opens `conns` connections to `system`, endpoint `i % endpoints.len()` for the i-th.
/// `routing` and `kv_api` matter to shopkv only.
pub async fn connect(
    system: System,
    endpoints: &[String],
    conns: usize,
    routing: Routing,
    kv_api: KvApi,
) -> Result<Vec<Conn>, BenchError> {
    if endpoints.is_empty() {
        return Err(BenchError::Setup("no endpoints".into()));
    }
    let pick = |i: usize| &endpoints[i % endpoints.len()];
    if system == System::Shopkv {
        let mut links = Vec::with_capacity(conns);
        for i in 0..conns.max(1) {
            let endpoint = pick(i);
            let channel = shopkv_channel(endpoint).await?;
            let batch = match kv_api {
                KvApi::Unary => None,
                KvApi::Batch => Some(BatchLink::open(channel.clone()).await.map_err(|s| {
                    BenchError::Connect {
                        endpoint: endpoint.clone(),
                        reason: format!("Kv.Batch: {}", s.message()),
                    }
                })?),
            };
            links.push((endpoint.clone(), Link { channel, batch }));
        }
        let routes = match (routing, links.first()) {
            (Routing::Leader, Some((endpoint, via))) => Some(
                Routes::start(via.channel.clone(), links.clone())
                    .await
                    .map_err(|s| BenchError::Connect {
                        endpoint: endpoint.clone(),
                        reason: format!("cluster status: {}", s.message()),
                    })?,
            ),
            _ => None,
        };
        return Ok(links
            .into_iter()
            .enumerate()
            .map(|(slot, (_, Link { channel, batch }))| {
                Conn::Shopkv(Box::new(ShopkvConn {
                    batch,
                    kv: KvClient::new(channel.clone()),
                    catalog: CatalogClient::new(channel.clone()),
                    inventory: InventoryClient::new(channel.clone()),
                    orders: OrdersClient::new(channel.clone()),
                    sessions: SessionClient::new(channel.clone()),
                    locks: LockClient::new(channel),
                    routes: routes.clone(),
                    // Connections to one node are every len-th; spread over them.
                    slot: slot / endpoints.len(),
                }))
            })
            .collect());
    }
    #[cfg(feature = "etcd")]
    {
        let mut out = Vec::with_capacity(conns);
        for i in 0..conns.max(1) {
            out.push(etcd_conn(pick(i)).await?);
        }
        Ok(out)
    }
    #[cfg(not(feature = "etcd"))]
    Err(BenchError::NotCompiled("etcd"))
}

async fn shopkv_channel(endpoint: &str) -> Result<Channel, BenchError> {
    let fail = |reason: String| BenchError::Connect {
        endpoint: endpoint.to_string(),
        reason,
    };
    Endpoint::from_shared(format!("http://{endpoint}"))
        .map_err(|e| fail(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| fail(e.to_string()))
}

/// One etcd client on one endpoint (the etcd driver's connection).
#[cfg(feature = "etcd")]
async fn etcd_conn(endpoint: &str) -> Result<Conn, BenchError> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT);
    let client = etcd_client::Client::connect([format!("http://{endpoint}")], Some(options))
        .await
        .map_err(|e| BenchError::Connect {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })?;
    Ok(Conn::Etcd(Box::new(client)))
}

/// A request with the operation deadline.
pub fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(REQUEST_TIMEOUT);
    request
}

impl Conn {
    /// The shopkv connection, if this is one.
    pub fn shopkv(&self) -> Option<&ShopkvConn> {
        match self {
            Conn::Shopkv(c) => Some(c),
            #[cfg(feature = "etcd")]
            Conn::Etcd(_) => None,
        }
    }

    /// Blind write of one key.
    pub async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), OpError> {
        match self {
            Conn::Shopkv(c) => {
                let put = PutRequest {
                    key,
                    value,
                    fence: None,
                };
                match c.batch_for(&put.key) {
                    Some(link) => match link.call(Op::Put(put)).await? {
                        Reply::Put(_) => Ok(()),
                        other => Err(OpError::Check(format!("put answered {other:?}"))),
                    },
                    None => c
                        .kv_for(&put.key)
                        .put(request(put))
                        .await
                        .map(|_| ())
                        .map_err(rpc_error),
                }
            }
            #[cfg(feature = "etcd")]
            Conn::Etcd(kv) => kv
                .put(key, value, None)
                .await
                .map(|_| ())
                .map_err(|e| OpError::Rpc(e.to_string())),
        }
    }

    /// Read of one key; `linearizable` false asks for a serializable (local) read.
    pub async fn get(
        &mut self,
        key: Vec<u8>,
        linearizable: bool,
    ) -> Result<Option<Vec<u8>>, OpError> {
        match self {
            Conn::Shopkv(c) => {
                let get = GetRequest {
                    key,
                    serializable: !linearizable,
                };
                match c.batch_for(&get.key) {
                    Some(link) => match link.call(Op::Get(get)).await? {
                        Reply::Get(r) => Ok(r.record.map(|rec| rec.value)),
                        other => Err(OpError::Check(format!("get answered {other:?}"))),
                    },
                    None => c
                        .kv_for(&get.key)
                        .get(request(get))
                        .await
                        .map(|r| r.into_inner().record.map(|rec| rec.value))
                        .map_err(rpc_error),
                }
            }
            #[cfg(feature = "etcd")]
            Conn::Etcd(kv) => {
                let options =
                    (!linearizable).then(|| etcd_client::GetOptions::new().with_serializable());
                kv.get(key, options)
                    .await
                    .map(|mut r| {
                        r.take_kvs()
                            .into_iter()
                            .next()
                            .map(|kv| kv.into_key_value().1)
                    })
                    .map_err(|e| OpError::Rpc(e.to_string()))
            }
        }
    }
}

/// An RPC failure as an [`OpError`].
pub fn rpc_error(s: tonic::Status) -> OpError {
    OpError::Rpc(format!("{:?}: {}", s.code(), s.message()))
}
