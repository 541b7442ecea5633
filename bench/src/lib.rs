//! shopkv-bench: a closed-loop load generator that drives shopkv and etcd with the
//! same workloads, the same client machinery and the same statistics, so that the
//! two can be compared side by side in one run (`bench/run.sh`).
//!
//! Layout: [`client`] holds one connection per driver ([`route`]: shopkv's leader
//! table; [`batch`]: its `Kv.Batch` streams), [`runner`] the closed loop
//! (warm-up, measured window, progress line), [`stats`] the latency histograms,
//! [`workloads`] one file per workload, [`report`] the side-by-side table,
//! [`cpu`] the CPU time servers and load generator spend per operation.

pub mod batch;
pub mod client;
pub mod cpu;
pub mod report;
pub mod route;
pub mod runner;
pub mod stats;
pub mod workloads;

/// shopkv's client API, compiled from the repository's `proto/`.
pub mod proto {
    tonic::include_proto!("shopkv.v1");
}

/// Failures of the harness itself (not of one operation: those are counted).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("{0}")]
    Setup(String),
    #[error("system {0} is not compiled in (build shopkv-bench with --features etcd)")]
    NotCompiled(&'static str),
    #[error("unknown workload {0:?} (known: {1})")]
    UnknownWorkload(String, String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("result file: {0}")]
    Json(#[from] serde_json::Error),
}
