//! Client commands of the `shopkv` binary (`cluster`, `kv`, and the commerce
//! commands in `commerce`): etcdctl habits —
//! `--endpoints` and `-w table|json` anywhere on the line, one-line errors,
//! non-zero exit on failure.

pub mod commerce;
pub mod demo;
pub mod lock;
pub mod session;
pub mod watch;

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;
use tonic::transport::{Channel, Endpoint};

use crate::proto;
use crate::proto::cluster_client::ClusterClient;
use crate::proto::kv_client::KvClient;

/// Default client endpoints: the three nodes `cluster/bootstrap.sh` starts.
pub const DEFAULT_ENDPOINTS: &str = "127.0.0.1:7103,127.0.0.1:7105,127.0.0.1:7107";
/// Deadline of one CLI request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable.
    #[default]
    Table,
    /// One JSON document.
    Json,
}

/// Flags every client command accepts, anywhere on the line.
#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Comma-separated client addresses of cluster nodes.
    #[arg(long, global = true, env = "SHOPKV_ENDPOINTS", default_value = DEFAULT_ENDPOINTS, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Output format.
    #[arg(short = 'w', long = "write-out", global = true, value_enum, default_value_t = Format::Table)]
    pub write_out: Format,
}

/// `shopkv cluster ...`
#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Form a cluster from every node in --endpoints.
    Init {
        /// Number of data shards (default: one per node in --endpoints, so each
        /// node leads about one; every extra Raft group costs per-batch work, and
        /// on a small cluster fewer, busier groups batch better: see bench/RESULTS.md).
        #[arg(long)]
        shards: Option<u32>,
    },
    /// Every group's members, leader, term, commit and applied index.
    Status,
    /// Wait until the cluster is initialised, every node answers and every
    /// group has a leader.
    Wait {
        /// Give up (exit 1) after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
}

/// `shopkv kv ...`
#[derive(Subcommand, Debug)]
pub enum KvCmd {
    /// Write a value.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: String,
        /// Refuse the write unless LOCK's fencing token TOKEN is still current
        /// (`--fence LOCK:TOKEN`, e.g. from `lock acquire`'s SHOPKV_FENCING_TOKEN).
        #[arg(long, value_parser = parse_fence)]
        fence: Option<proto::Fence>,
    },
    /// Read a value (prints the value alone in table mode).
    Get {
        /// Key.
        key: String,
        /// Read the contacted node's replica (may be stale).
        #[arg(long)]
        serializable: bool,
    },
    /// Delete a key (prints 1 if it existed, else 0).
    Del {
        /// Key.
        key: String,
        /// Refuse the write unless LOCK's fencing token TOKEN is still current
        /// (`--fence LOCK:TOKEN`, e.g. from `lock acquire`'s SHOPKV_FENCING_TOKEN).
        #[arg(long, value_parser = parse_fence)]
        fence: Option<proto::Fence>,
    },
    /// List keys by prefix.
    Scan {
        /// Key prefix ("" for all).
        prefix: String,
        /// Most records to return (1..=10000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Read replicas locally (may be stale).
        #[arg(long)]
        serializable: bool,
    },
    /// Write VALUE only if KEY's version is VERSION (0 = key absent).
    Cas {
        /// Key.
        key: String,
        /// Expected version.
        version: u64,
        /// New value.
        value: String,
        /// Refuse the write unless LOCK's fencing token TOKEN is still current
        /// (`--fence LOCK:TOKEN`, e.g. from `lock acquire`'s SHOPKV_FENCING_TOKEN).
        #[arg(long, value_parser = parse_fence)]
        fence: Option<proto::Fence>,
    },
}

/// Parses `LOCK:TOKEN` (the lock name may itself contain ':').
fn parse_fence(s: &str) -> Result<proto::Fence, String> {
    let (lock_name, token) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("expected LOCK:TOKEN, got {s:?}"))?;
    let token = token
        .parse()
        .map_err(|e| format!("bad token in {s:?}: {e}"))?;
    Ok(proto::Fence {
        lock_name: lock_name.to_string(),
        token,
    })
}

/// A CLI failure: printed as one line, exit code 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        let msg = s.message().replace('\n', " ");
        let msg = if msg.is_empty() {
            format!("{:?}", s.code())
        } else {
            msg
        };
        // A business rejection leads with its stable reason (OUT_OF_STOCK: ...).
        let reason = s
            .metadata()
            .get(crate::server::error::REASON_HEADER)
            .and_then(|v| v.to_str().ok());
        CliError(match reason {
            Some(r) => format!("{r}: {msg}"),
            None => msg,
        })
    }
}

/// Connects to the first endpoint that answers.
async fn connect(g: &GlobalArgs) -> Result<Channel, CliError> {
    let mut last = String::from("no endpoints given");
    for ep in g
        .endpoints
        .iter()
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
    {
        let uri = if ep.contains("://") {
            ep.to_string()
        } else {
            format!("http://{ep}")
        };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| CliError(format!("bad endpoint {ep:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(REQUEST_TIMEOUT);
        match endpoint.connect().await {
            Ok(c) => return Ok(c),
            Err(e) => last = format!("cannot reach {ep}: {e}"),
        }
    }
    Err(CliError(last))
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `shopkv cluster ...`.
pub async fn cluster(g: &GlobalArgs, cmd: ClusterCmd) -> Result<(), CliError> {
    let mut client = ClusterClient::new(connect(g).await?);
    match cmd {
        ClusterCmd::Init { shards } => {
            let endpoints: Vec<String> = g
                .endpoints
                .iter()
                .map(|e| e.trim().to_string())
                .filter(|e| !e.is_empty())
                .collect();
            let shards = shards.unwrap_or(endpoints.len() as u32);
            let r = client
                .init(proto::InitRequest { shards, endpoints })
                .await?
                .into_inner();
            match g.write_out {
                Format::Json => println!(
                    "{}",
                    json!({"cluster_id": format!("{:016x}", r.cluster_id), "shards": r.shards,
                           "nodes": r.nodes.iter().map(|n| json!({"id": n.id, "peer_addr": n.peer_addr, "client_addr": n.client_addr})).collect::<Vec<_>>()})
                ),
                Format::Table => println!(
                    "cluster {:016x} initialised: {} nodes, {} shards",
                    r.cluster_id,
                    r.nodes.len(),
                    r.shards
                ),
            }
        }
        ClusterCmd::Status => {
            let s = client.status(proto::StatusRequest {}).await?.into_inner();
            match g.write_out {
                Format::Json => println!("{}", status_json(&s)),
                Format::Table => print_status(&s),
            }
        }
        ClusterCmd::Wait { timeout_secs } => {
            let deadline = std::time::Instant::now() + Duration::from_secs(timeout_secs);
            loop {
                let why = match client.status(proto::StatusRequest {}).await {
                    Ok(s) => not_ready(&s.into_inner()),
                    Err(e) => Some(e.message().to_string()),
                };
                let Some(why) = why else {
                    println!("ready");
                    return Ok(());
                };
                if std::time::Instant::now() >= deadline {
                    return Err(CliError(format!("not ready after {timeout_secs}s: {why}")));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    Ok(())
}

/// Why a cluster is not ready yet, or `None` when it is.
pub fn not_ready(s: &proto::StatusResponse) -> Option<String> {
    if s.cluster_id == 0 {
        return Some("cluster is not initialised".into());
    }
    if let Some(n) = s.nodes.iter().find(|n| !n.reachable) {
        return Some(format!(
            "node {} unreachable",
            n.node.as_ref().map_or(0, |i| i.id)
        ));
    }
    if s.groups.len() != s.shards as usize + 1 {
        return Some(format!(
            "{} of {} groups reported",
            s.groups.len(),
            s.shards + 1
        ));
    }
    if let Some(g) = s.groups.iter().find(|g| g.leader == 0) {
        return Some(format!("group {} has no leader", g.group_id));
    }
    None
}

fn status_json(s: &proto::StatusResponse) -> serde_json::Value {
    json!({
        "cluster_id": format!("{:016x}", s.cluster_id),
        "shards": s.shards,
        "nodes": s.nodes.iter().map(|n| {
            let info = n.node.clone().unwrap_or_default();
            json!({"id": info.id, "peer_addr": info.peer_addr, "client_addr": info.client_addr,
                   "reachable": n.reachable, "error": n.error})
        }).collect::<Vec<_>>(),
        "groups": s.groups.iter().map(|g| json!({
            "group_id": g.group_id, "members": g.members, "leader": g.leader, "term": g.term,
            "txns_in_flight": g.txns_in_flight, "oldest_txn_age_ms": g.oldest_txn_age_ms,
            "replicas": g.replicas.iter().map(|r| json!({
                "node_id": r.node_id, "state": r.state, "term": r.term, "leader": r.leader,
                "last_log_index": r.last_log_index, "commit_index": r.commit_index,
                "applied_index": r.applied_index, "snapshot_index": r.snapshot_index,
                "purged_index": r.purged_index,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn print_status(s: &proto::StatusResponse) {
    println!("cluster {:016x}, {} shards", s.cluster_id, s.shards);
    for n in &s.nodes {
        let info = n.node.clone().unwrap_or_default();
        let state = if n.reachable {
            "up".to_string()
        } else {
            format!("unreachable ({})", n.error)
        };
        println!(
            "node {} peer={} client={} {}",
            info.id, info.peer_addr, info.client_addr, state
        );
    }
    println!(
        "{:<6} {:<8} {:<6} {:<12} {:<6} {:<10} {:<6} {:>8} {:>8}  TXNS",
        "GROUP", "LEADER", "TERM", "MEMBERS", "NODE", "STATE", "TERM", "COMMIT", "APPLIED"
    );
    for g in &s.groups {
        let members = g
            .members
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let leader = if g.leader == 0 {
            "-".to_string()
        } else {
            g.leader.to_string()
        };
        if g.replicas.is_empty() {
            println!(
                "{:<6} {:<8} {:<6} {:<12}",
                g.group_id, leader, g.term, members
            );
        }
        // Cross-shard orders in flight on a data shard, and the oldest one's age.
        let txns = if g.group_id == 0 {
            String::new()
        } else if g.txns_in_flight == 0 {
            "0".to_string()
        } else {
            format!(
                "{} (oldest {:.1}s)",
                g.txns_in_flight,
                g.oldest_txn_age_ms as f64 / 1000.0
            )
        };
        for (i, r) in g.replicas.iter().enumerate() {
            let (gid, l, t, m, x) = if i == 0 {
                (
                    g.group_id.to_string(),
                    leader.clone(),
                    g.term.to_string(),
                    members.clone(),
                    txns.clone(),
                )
            } else {
                Default::default()
            };
            println!(
                "{:<6} {:<8} {:<6} {:<12} {:<6} {:<10} {:<6} {:>8} {:>8}  {}",
                gid, l, t, m, r.node_id, r.state, r.term, r.commit_index, r.applied_index, x
            );
        }
    }
}

/// Runs `shopkv kv ...`.
pub async fn kv(g: &GlobalArgs, cmd: KvCmd) -> Result<(), CliError> {
    let mut client = KvClient::new(connect(g).await?).max_decoding_message_size(64 << 20);
    let json_out = g.write_out == Format::Json;
    match cmd {
        KvCmd::Put { key, value, fence } => {
            let r = client
                .put(proto::PutRequest {
                    key: key.into_bytes(),
                    value: value.into_bytes(),
                    fence,
                })
                .await?
                .into_inner();
            if json_out {
                println!("{}", json!({"version": r.version, "shard": r.shard}));
            } else {
                println!("OK version={} shard={}", r.version, r.shard);
            }
        }
        KvCmd::Get { key, serializable } => {
            let r = client
                .get(proto::GetRequest {
                    key: key.into_bytes(),
                    serializable,
                })
                .await?
                .into_inner();
            let rec = r.record.ok_or_else(|| CliError("not found".into()))?;
            if json_out {
                println!(
                    "{}",
                    json!({"key": lossy(&rec.key), "value": lossy(&rec.value), "version": rec.version, "shard": rec.shard})
                );
            } else {
                println!("{}", lossy(&rec.value));
            }
        }
        KvCmd::Del { key, fence } => {
            let r = client
                .delete(proto::DeleteRequest {
                    key: key.into_bytes(),
                    fence,
                })
                .await?
                .into_inner();
            if json_out {
                println!("{}", json!({"deleted": r.deleted}));
            } else {
                println!("{}", u8::from(r.deleted));
            }
        }
        KvCmd::Scan {
            prefix,
            limit,
            serializable,
        } => {
            let r = client
                .scan(proto::ScanRequest {
                    prefix: prefix.into_bytes(),
                    limit,
                    serializable,
                })
                .await?
                .into_inner();
            if json_out {
                let rows: Vec<_> = r.records.iter().map(|rec| json!({"key": lossy(&rec.key), "value": lossy(&rec.value), "version": rec.version, "shard": rec.shard})).collect();
                println!("{}", json!({"records": rows, "more": r.more}));
            } else {
                for rec in &r.records {
                    println!(
                        "{}\t{}\t{}",
                        lossy(&rec.key),
                        lossy(&rec.value),
                        rec.version
                    );
                }
                if r.more {
                    println!("(more; raise --limit)");
                }
            }
        }
        KvCmd::Cas {
            key,
            version,
            value,
            fence,
        } => {
            let r = client
                .compare_and_swap(proto::CompareAndSwapRequest {
                    key: key.into_bytes(),
                    expected_version: version,
                    value: value.into_bytes(),
                    fence,
                })
                .await?
                .into_inner();
            if json_out {
                println!(
                    "{}",
                    json!({"succeeded": r.succeeded, "version": r.version})
                );
            }
            if !r.succeeded {
                return Err(CliError(format!(
                    "version mismatch: current version is {}",
                    r.version
                )));
            }
            if !json_out {
                println!("OK version={}", r.version);
            }
        }
    }
    Ok(())
}
