//! shopkv: a replicated multi-Raft store for e-commerce records.
//!
//! Module map (dependencies point down): `server` (tonic services) → `node`
//! (request path, groups) → `forward` (request forwarding streams) → `raft` (openraft glue) → `sm`
//! (deterministic apply) → `router` (placement) → `storage` (RocksDB) and
//! `codec` (value encoding). `cli` is the client side of the same binary.

#[macro_use]
mod failpoints;

pub mod cli;
pub mod clock;
pub mod codec;
pub mod commerce;
pub mod config;
pub mod domain;
pub mod forward;
pub mod lease;
pub mod lockgc;
pub mod node;
pub mod payment;
pub mod raft;
pub mod router;
pub mod server;
pub mod sm;
pub mod storage;
pub mod sweeper;
pub mod txn;
pub mod watch;

/// Generated gRPC types of `proto/shopkv/v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("shopkv.v1");

    /// Encoded descriptors of every proto, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/shopkv_descriptor.bin"));
}
