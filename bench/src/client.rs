//! One connection to the system under test. Both drivers connect the same way:
//! `conns` HTTP/2 connections spread round-robin over the given endpoints, clients
//! spread round-robin over the connections, a 10 s deadline on every request.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use crate::BenchError;
use crate::proto::catalog_client::CatalogClient;
use crate::proto::inventory_client::InventoryClient;
use crate::proto::kv_client::KvClient;
use crate::proto::lock_client::LockClient;
use crate::proto::orders_client::OrdersClient;
use crate::proto::session_client::SessionClient;
use crate::proto::{GetRequest, PutRequest};

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

/// shopkv's services over one connection.
#[derive(Clone)]
pub struct ShopkvConn {
    pub kv: KvClient<Channel>,
    pub catalog: CatalogClient<Channel>,
    pub inventory: InventoryClient<Channel>,
    pub orders: OrdersClient<Channel>,
    pub sessions: SessionClient<Channel>,
    pub locks: LockClient<Channel>,
}

/// A cloneable handle on one connection.
#[derive(Clone)]
pub enum Conn {
    Shopkv(Box<ShopkvConn>),
    #[cfg(feature = "etcd")]
    Etcd(Box<etcd_client::Client>),
}

/// Opens `conns` connections to `system`, endpoint `i % endpoints.len()` for the i-th.
pub async fn connect(
    system: System,
    endpoints: &[String],
    conns: usize,
) -> Result<Vec<Conn>, BenchError> {
    if endpoints.is_empty() {
        return Err(BenchError::Setup("no endpoints".into()));
    }
    let mut out = Vec::with_capacity(conns);
    for i in 0..conns.max(1) {
        let endpoint = &endpoints[i % endpoints.len()];
        out.push(connect_one(system, endpoint).await?);
    }
    Ok(out)
}

async fn connect_one(system: System, endpoint: &str) -> Result<Conn, BenchError> {
    let url = format!("http://{endpoint}");
    let fail = |reason: String| BenchError::Connect {
        endpoint: endpoint.to_string(),
        reason,
    };
    match system {
        System::Shopkv => {
            let channel = Endpoint::from_shared(url)
                .map_err(|e| fail(e.to_string()))?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(|e| fail(e.to_string()))?;
            Ok(Conn::Shopkv(Box::new(ShopkvConn {
                kv: KvClient::new(channel.clone()),
                catalog: CatalogClient::new(channel.clone()),
                inventory: InventoryClient::new(channel.clone()),
                orders: OrdersClient::new(channel.clone()),
                sessions: SessionClient::new(channel.clone()),
                locks: LockClient::new(channel),
            })))
        }
        #[cfg(feature = "etcd")]
        System::Etcd => {
            let options = etcd_client::ConnectOptions::new()
                .with_connect_timeout(CONNECT_TIMEOUT)
                .with_timeout(REQUEST_TIMEOUT);
            let client = etcd_client::Client::connect([url], Some(options))
                .await
                .map_err(|e| fail(e.to_string()))?;
            Ok(Conn::Etcd(Box::new(client)))
        }
        #[cfg(not(feature = "etcd"))]
        System::Etcd => Err(BenchError::NotCompiled("etcd")),
    }
}

/// A request with the operation deadline.
pub fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(REQUEST_TIMEOUT);
    request
}

impl Conn {
    /// Blind write of one key.
    pub async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), OpError> {
        match self {
            Conn::Shopkv(c) => {
                c.kv.put(request(PutRequest {
                    key,
                    value,
                    fence: None,
                }))
                .await
                .map(|_| ())
                .map_err(|s| OpError::Rpc(format!("{:?}: {}", s.code(), s.message())))
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
                c.kv.get(request(GetRequest {
                    key,
                    serializable: !linearizable,
                }))
                .await
                .map(|r| r.into_inner().record.map(|rec| rec.value))
                .map_err(|s| OpError::Rpc(format!("{:?}: {}", s.code(), s.message())))
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
