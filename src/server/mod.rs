//! gRPC services: the public ones on the client port (`kv`, `cluster`) and
//! the node-to-node one on the peer port (`peer`). One service per file; the
//! error table is `error`.

pub mod cart;
pub mod catalog;
pub mod cluster;
pub mod election;
pub mod error;
pub mod inventory;
pub mod kv;
pub mod lock;
pub mod orders;
pub mod peer;
pub mod records;
pub mod session;
pub mod watch;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::node::Node;
use crate::proto::cart_server::CartServer;
use crate::proto::catalog_server::CatalogServer;
use crate::proto::cluster_server::ClusterServer;
use crate::proto::election_server::ElectionServer;
use crate::proto::inventory_server::InventoryServer;
use crate::proto::kv_server::KvServer;
use crate::proto::lock_server::LockServer;
use crate::proto::orders_server::OrdersServer;
use crate::proto::peer_server::PeerServer;
use crate::proto::session_server::SessionServer;
use crate::proto::watch_server::WatchServer;
use crate::raft::network::MAX_PEER_MESSAGE_BYTES;

/// Largest client request accepted: a 1 MiB value plus a 4 KiB key and framing.
pub const MAX_CLIENT_MESSAGE_BYTES: usize = (1 << 20) + (64 << 10);
/// Longest deadline a client may ask for.
const MAX_REQUEST_DEADLINE: Duration = Duration::from_secs(60);

/// Why serving stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener failed.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not load the descriptors (a build bug).
    #[error("reflection: {0}")]
    Reflection(String),
}

/// Serves the peer and client ports until either server fails.
pub async fn serve(
    node: Arc<Node>,
    peer_listener: TcpListener,
    client_listener: TcpListener,
) -> Result<(), ServeError> {
    let peer = tonic::transport::Server::builder()
        // Peers reset streams legitimately and in bursts (a heartbeat's 100 ms
        // deadline passing on a loaded or just-resumed node); h2's rapid-reset guard
        // (20 by default) would then close the whole connection, breaking every
        // replication and forwarding stream on it. Peers are cluster members.
        .http2_max_pending_accept_reset_streams(Some(MAX_PEER_PENDING_RESETS))
        .add_service(
            PeerServer::new(peer::PeerService::new(node.clone()))
                .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES),
        )
        .serve_with_incoming(no_delay(peer_listener));
    let ctx = records::Ctx {
        node: node.clone(),
        settler: Arc::new(crate::txn::Settler::start(Arc::downgrade(&node))),
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    // Checked in Config::validate (at most 65 536).
    let max_streams = u32::try_from(node.config.max_concurrent_streams).unwrap_or(u32::MAX);
    let client = tonic::transport::Server::builder()
        .max_concurrent_streams(max_streams)
        .add_service(
            KvServer::new(kv::KvService::new(node.clone()))
                .max_decoding_message_size(MAX_CLIENT_MESSAGE_BYTES),
        )
        .add_service(ClusterServer::new(cluster::ClusterService::new(
            node.clone(),
        )))
        .add_service(CatalogServer::new(catalog::CatalogService::new(
            ctx.clone(),
        )))
        .add_service(InventoryServer::new(inventory::InventoryService::new(
            ctx.clone(),
        )))
        .add_service(CartServer::new(cart::CartService::new(ctx.clone())))
        .add_service(OrdersServer::new(orders::OrdersService::new(ctx)))
        .add_service(SessionServer::new(session::SessionService::new(
            node.clone(),
        )))
        .add_service(LockServer::new(lock::LockService::new(node.clone())))
        .add_service(WatchServer::new(watch::WatchService::new(node.clone())))
        .add_service(ElectionServer::new(election::ElectionService::new(
            node.clone(),
        )))
        .add_service(reflection)
        .serve_with_incoming(no_delay(client_listener));
    tokio::try_join!(peer, client)?;
    Ok(())
}

/// Longest lock name a fence may name.
const MAX_FENCE_LOCK_BYTES: usize = 256;

/// The fence a mutating request carries, checked: a lock name of
/// 1..=256 bytes and a token > 0 (tokens are log indexes).
pub fn fence_of(
    fence: Option<crate::proto::Fence>,
) -> Result<Option<crate::sm::Fence>, tonic::Status> {
    let Some(f) = fence else { return Ok(None) };
    if f.lock_name.is_empty() || f.lock_name.len() > MAX_FENCE_LOCK_BYTES || f.token == 0 {
        return Err(tonic::Status::invalid_argument(format!(
            "fence needs a lock name of 1..={MAX_FENCE_LOCK_BYTES} bytes and a token > 0"
        )));
    }
    Ok(Some(crate::sm::Fence {
        lock_name: f.lock_name,
        token: f.token,
    }))
}

/// Streams a peer may reset before the node accepts them (see `serve`).
const MAX_PEER_PENDING_RESETS: usize = 4096;

/// Accepted connections with Nagle off. The builder's `tcp_nodelay` only applies to
/// listeners it binds itself, not to `serve_with_incoming`: without this, small
/// responses waited for the client's delayed ACK (~40 ms per request under load).
fn no_delay(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// The deadline of a request: its `grpc-timeout`, else the node default,
/// capped at [`MAX_REQUEST_DEADLINE`].
pub fn deadline_of<T>(req: &tonic::Request<T>, default: Duration) -> Instant {
    deadline_in(asked_timeout(req), default)
}

/// The deadline of a request that asked for `asked` (else the node default),
/// capped at [`MAX_REQUEST_DEADLINE`].
pub fn deadline_in(asked: Option<Duration>, default: Duration) -> Instant {
    Instant::now() + asked.unwrap_or(default).min(MAX_REQUEST_DEADLINE)
}

/// When the caller gives up, if it said (`grpc-timeout`): its client then
/// resets the stream and the handler is dropped, so a handler that must
/// answer (or clean up) before that ends its own waiting earlier.
pub fn caller_deadline<T>(req: &tonic::Request<T>) -> Option<Instant> {
    asked_timeout(req).map(|t| Instant::now() + t)
}

fn asked_timeout<T>(req: &tonic::Request<T>) -> Option<Duration> {
    req.metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
}

/// Parses a `grpc-timeout` header value ("100m", "5S", ...).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout("5q"), None);
    }
}
