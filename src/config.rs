//! Node configuration: flags, `SHOPKV_*` environment variables and a TOML
//! file (`--config`), in that order of precedence, then defaults.
//! [`Config::validate`] is the one place every limit is checked.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;

/// Log entries between snapshots by default. The state machine is persistent, so a
/// snapshot is only needed to purge the log and to catch up followers that lag
/// behind it; building one reads and encodes a whole group, which at 5 000 cost ~9 %
/// of the CPU of a 1-shard cluster under write load (etcd's default is 100 000).
pub const DEFAULT_SNAPSHOT_LOGS_SINCE_LAST: u64 = 50_000;
/// Log entries kept behind a snapshot by default: a follower that was down for about
/// a second of heavy writes still catches up from the log, not a snapshot.
pub const DEFAULT_SNAPSHOT_KEEP_LOGS: u64 = 10_000;
/// Default time an order may stay unpaid: 15 minutes (a checkout session).
pub const DEFAULT_ORDER_PAYMENT_TIMEOUT_MS: u64 = 15 * 60_000;
/// Default time a cross-shard order may stay undecided: 10 s (CockroachDB
/// aborts a transaction after 5 missed 1 s heartbeats; TiKV's lock TTL is 3–20 s).
pub const DEFAULT_TXN_TIMEOUT_MS: u64 = 10_000;
/// Default time an aborted cross-shard order's tombstones are kept: a day
/// (a retry under the same order id within it is told the order aborted;
/// later it is placed afresh, as idempotency keys expire after 24 h at
/// payment providers).
pub const DEFAULT_ABORTED_TXN_RETENTION_MS: u64 = 24 * 3_600_000;

/// Default wait of the WAL sync thread for more appends under concurrent load
/// (see [`crate::storage::StoreOptions`]): 1 ms, measured against 500 µs and
/// 1.5 ms on the bench machine (bench/RESULTS.md, 2026-11-27 18:40 UTC).
pub const DEFAULT_GROUP_COMMIT_DELAY_US: u64 = 1_000;

/// Default of concurrent calls per client connection (TiKV's default; a
/// waiting lock Acquire or an open watch holds one for its whole life).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u64 = 1024;

/// Default time between lock collections: idle lock records forgotten, the
/// shards' fence floors raised and their fence records below it deleted (a
/// minute, ZooKeeper's container-node check interval).
pub const DEFAULT_LOCK_GC_INTERVAL_MS: u64 = 60_000;

/// Errors loading or validating configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML file is malformed or has unknown keys.
    #[error("malformed config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// A required setting is missing.
    #[error("missing setting `{0}` (flag --{1}, env SHOPKV_{2}, or the config file)")]
    Missing(&'static str, &'static str, &'static str),
    /// A setting has a bad value.
    #[error("invalid setting `{field}`: {reason}")]
    Invalid {
        /// Setting name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// `shopkv serve` flags; every one may also come from `SHOPKV_<NAME>` or the file.
#[derive(Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (flags and env override it).
    #[arg(long, env = "SHOPKV_CONFIG")]
    pub config: Option<PathBuf>,
    /// Node id (>= 1), unique in the cluster.
    #[arg(long, env = "SHOPKV_ID")]
    pub id: Option<u64>,
    /// Directory of this node's RocksDB.
    #[arg(long, env = "SHOPKV_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// host:port for Raft traffic between nodes.
    #[arg(long, env = "SHOPKV_PEER_ADDR")]
    pub peer_addr: Option<String>,
    /// host:port for client gRPC services.
    #[arg(long, env = "SHOPKV_CLIENT_ADDR")]
    pub client_addr: Option<String>,
    /// Leader heartbeat period.
    #[arg(long, env = "SHOPKV_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Lower bound of the randomised election timeout.
    #[arg(long, env = "SHOPKV_ELECTION_TIMEOUT_MIN_MS")]
    pub election_timeout_min_ms: Option<u64>,
    /// Upper bound of the randomised election timeout (also the leader lease).
    #[arg(long, env = "SHOPKV_ELECTION_TIMEOUT_MAX_MS")]
    pub election_timeout_max_ms: Option<u64>,
    /// Build a snapshot after this many log entries since the last one.
    #[arg(long, env = "SHOPKV_SNAPSHOT_LOGS_SINCE_LAST")]
    pub snapshot_logs_since_last: Option<u64>,
    /// Log entries kept after a snapshot (for followers slightly behind).
    #[arg(long, env = "SHOPKV_SNAPSHOT_KEEP_LOGS")]
    pub snapshot_keep_logs: Option<u64>,
    /// Entries per AppendEntries RPC.
    #[arg(long, env = "SHOPKV_MAX_PAYLOAD_ENTRIES")]
    pub max_payload_entries: Option<u64>,
    /// Deadline of a client request that carries none.
    #[arg(long, env = "SHOPKV_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// An order not paid this long after placement expires (stock released).
    #[arg(long, env = "SHOPKV_ORDER_PAYMENT_TIMEOUT_MS")]
    pub order_payment_timeout_ms: Option<u64>,
    /// A cross-shard order not decided this long after it began may be aborted
    /// by anyone (its held stock is then released).
    #[arg(long, env = "SHOPKV_TXN_TIMEOUT_MS")]
    pub txn_timeout_ms: Option<u64>,
    /// How long an aborted cross-shard order's tombstones are kept before
    /// the shard leaders prune them.
    #[arg(long, env = "SHOPKV_ABORTED_TXN_RETENTION_MS")]
    pub aborted_txn_retention_ms: Option<u64>,
    /// Under concurrent writes, how long the WAL sync waits for more appends
    /// (0: never waits).
    #[arg(long, env = "SHOPKV_GROUP_COMMIT_DELAY_US")]
    pub group_commit_delay_us: Option<u64>,
    /// Most gRPC calls one client connection may have open at once (HTTP/2
    /// concurrent streams); a client's further calls wait for one to end.
    #[arg(long, env = "SHOPKV_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u64>,
    /// Time between lock collections (idle lock records forgotten, fence
    /// records of holds that are over deleted).
    #[arg(long, env = "SHOPKV_LOCK_GC_INTERVAL_MS")]
    pub lock_gc_interval_ms: Option<u64>,
    /// Dial node ID at HOST:PORT instead of its advertised peer address
    /// (`ID=HOST:PORT`, repeatable; behind NAT, a proxy, or a test's fault injector).
    #[arg(long = "peer-route", env = "SHOPKV_PEER_ROUTES", value_delimiter = ',')]
    pub peer_routes: Vec<String>,
}

/// The same settings as read from the TOML file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    id: Option<u64>,
    data_dir: Option<PathBuf>,
    peer_addr: Option<String>,
    client_addr: Option<String>,
    heartbeat_interval_ms: Option<u64>,
    election_timeout_min_ms: Option<u64>,
    election_timeout_max_ms: Option<u64>,
    snapshot_logs_since_last: Option<u64>,
    snapshot_keep_logs: Option<u64>,
    max_payload_entries: Option<u64>,
    request_timeout_ms: Option<u64>,
    order_payment_timeout_ms: Option<u64>,
    txn_timeout_ms: Option<u64>,
    aborted_txn_retention_ms: Option<u64>,
    group_commit_delay_us: Option<u64>,
    max_concurrent_streams: Option<u64>,
    lock_gc_interval_ms: Option<u64>,
    peer_routes: Option<Vec<String>>,
}

/// Validated node configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Node id (>= 1).
    pub id: u64,
    /// RocksDB directory.
    pub data_dir: PathBuf,
    /// Peer listen/advertise address.
    pub peer_addr: String,
    /// Client listen/advertise address.
    pub client_addr: String,
    /// Leader heartbeat period.
    pub heartbeat_interval_ms: u64,
    /// Election timeout lower bound.
    pub election_timeout_min_ms: u64,
    /// Election timeout upper bound (leader lease).
    pub election_timeout_max_ms: u64,
    /// Snapshot policy: entries since the last snapshot.
    pub snapshot_logs_since_last: u64,
    /// Entries kept after a snapshot.
    pub snapshot_keep_logs: u64,
    /// Entries per AppendEntries.
    pub max_payload_entries: u64,
    /// Default request deadline.
    pub request_timeout_ms: u64,
    /// How long a placed order may stay unpaid before it expires.
    pub order_payment_timeout_ms: u64,
    /// How long a cross-shard order may stay undecided.
    pub txn_timeout_ms: u64,
    /// How long an aborted cross-shard order's tombstones are kept.
    pub aborted_txn_retention_ms: u64,
    /// WAL group-commit wait under concurrent load.
    pub group_commit_delay_us: u64,
    /// Concurrent calls (HTTP/2 streams) per client connection.
    pub max_concurrent_streams: u64,
    /// Time between lock collections.
    pub lock_gc_interval_ms: u64,
    /// Node id -> address to dial instead of the advertised one.
    pub peer_routes: BTreeMap<u64, String>,
}

/// Bounds checked by [`Config::validate`].
mod limits {
    pub const HEARTBEAT_MS: (u64, u64) = (10, 10_000);
    pub const ELECTION_MS: (u64, u64) = (50, 60_000);
    pub const SNAPSHOT_LOGS: (u64, u64) = (10, 10_000_000);
    pub const KEEP_LOGS: (u64, u64) = (0, 1_000_000);
    pub const PAYLOAD_ENTRIES: (u64, u64) = (1, 10_000);
    pub const REQUEST_TIMEOUT_MS: (u64, u64) = (100, 600_000);
    /// From one second (tests) to a week.
    pub const ORDER_PAYMENT_TIMEOUT_MS: (u64, u64) = (1_000, 7 * 24 * 3_600_000);
    /// From one second to ten minutes.
    pub const TXN_TIMEOUT_MS: (u64, u64) = (1_000, 600_000);
    /// From one second (tests) to 30 days.
    pub const ABORTED_TXN_RETENTION_MS: (u64, u64) = (1_000, 30 * 24 * 3_600_000);
    /// Up to 10 ms: every write under load waits this much longer.
    pub const GROUP_COMMIT_DELAY_US: (u64, u64) = (0, 10_000);
    /// TiKV's `grpc-concurrent-stream` defaults to 1 024 per connection.
    pub const MAX_CONCURRENT_STREAMS: (u64, u64) = (1, 65_536);
    /// From 100 ms (tests) to a day.
    pub const LOCK_GC_INTERVAL_MS: (u64, u64) = (100, 24 * 3_600_000);
}

impl Config {
    /// Merges flags/env over the file over defaults, then validates.
    pub fn load(args: &ServeArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let cfg = Config {
            id: args
                .id
                .or(file.id)
                .ok_or(ConfigError::Missing("id", "id", "ID"))?,
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .ok_or(ConfigError::Missing("data_dir", "data-dir", "DATA_DIR"))?,
            peer_addr: args
                .peer_addr
                .clone()
                .or(file.peer_addr)
                .ok_or(ConfigError::Missing("peer_addr", "peer-addr", "PEER_ADDR"))?,
            client_addr: args.client_addr.clone().or(file.client_addr).ok_or(
                ConfigError::Missing("client_addr", "client-addr", "CLIENT_ADDR"),
            )?,
            heartbeat_interval_ms: args
                .heartbeat_interval_ms
                .or(file.heartbeat_interval_ms)
                .unwrap_or(100),
            election_timeout_min_ms: args
                .election_timeout_min_ms
                .or(file.election_timeout_min_ms)
                .unwrap_or(500),
            election_timeout_max_ms: args
                .election_timeout_max_ms
                .or(file.election_timeout_max_ms)
                .unwrap_or(1000),
            snapshot_logs_since_last: args
                .snapshot_logs_since_last
                .or(file.snapshot_logs_since_last)
                .unwrap_or(DEFAULT_SNAPSHOT_LOGS_SINCE_LAST),
            snapshot_keep_logs: args
                .snapshot_keep_logs
                .or(file.snapshot_keep_logs)
                .unwrap_or(DEFAULT_SNAPSHOT_KEEP_LOGS),
            max_payload_entries: args
                .max_payload_entries
                .or(file.max_payload_entries)
                .unwrap_or(300),
            request_timeout_ms: args
                .request_timeout_ms
                .or(file.request_timeout_ms)
                .unwrap_or(5000),
            order_payment_timeout_ms: args
                .order_payment_timeout_ms
                .or(file.order_payment_timeout_ms)
                .unwrap_or(DEFAULT_ORDER_PAYMENT_TIMEOUT_MS),
            txn_timeout_ms: args
                .txn_timeout_ms
                .or(file.txn_timeout_ms)
                .unwrap_or(DEFAULT_TXN_TIMEOUT_MS),
            aborted_txn_retention_ms: args
                .aborted_txn_retention_ms
                .or(file.aborted_txn_retention_ms)
                .unwrap_or(DEFAULT_ABORTED_TXN_RETENTION_MS),
            group_commit_delay_us: args
                .group_commit_delay_us
                .or(file.group_commit_delay_us)
                .unwrap_or(DEFAULT_GROUP_COMMIT_DELAY_US),
            max_concurrent_streams: args
                .max_concurrent_streams
                .or(file.max_concurrent_streams)
                .unwrap_or(DEFAULT_MAX_CONCURRENT_STREAMS),
            lock_gc_interval_ms: args
                .lock_gc_interval_ms
                .or(file.lock_gc_interval_ms)
                .unwrap_or(DEFAULT_LOCK_GC_INTERVAL_MS),
            peer_routes: parse_routes(if args.peer_routes.is_empty() {
                file.peer_routes.as_deref().unwrap_or_default()
            } else {
                &args.peer_routes
            })?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects bad values with a message naming the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        if self.id == 0 {
            return invalid("id", "must be >= 1 (0 means 'no node')".into());
        }
        if self.data_dir.as_os_str().is_empty() {
            return invalid("data_dir", "must not be empty".into());
        }
        for addr in self.peer_routes.values() {
            resolve("peer_routes", addr)?;
        }
        if self.peer_routes.contains_key(&self.id) {
            return invalid(
                "peer_routes",
                format!("node {} must not route to itself", self.id),
            );
        }
        let peer = resolve("peer_addr", &self.peer_addr)?;
        let client = resolve("client_addr", &self.client_addr)?;
        if peer == client {
            return invalid(
                "client_addr",
                format!("must differ from peer_addr ({})", self.peer_addr),
            );
        }
        in_range(
            "heartbeat_interval_ms",
            self.heartbeat_interval_ms,
            limits::HEARTBEAT_MS,
        )?;
        in_range(
            "election_timeout_min_ms",
            self.election_timeout_min_ms,
            limits::ELECTION_MS,
        )?;
        in_range(
            "election_timeout_max_ms",
            self.election_timeout_max_ms,
            limits::ELECTION_MS,
        )?;
        if self.election_timeout_min_ms >= self.election_timeout_max_ms {
            return invalid(
                "election_timeout_min_ms",
                format!(
                    "{} must be less than election_timeout_max_ms ({})",
                    self.election_timeout_min_ms, self.election_timeout_max_ms
                ),
            );
        }
        if self.heartbeat_interval_ms.saturating_mul(3) > self.election_timeout_min_ms {
            return invalid(
                "heartbeat_interval_ms",
                format!(
                    "{} must be at most a third of election_timeout_min_ms ({})",
                    self.heartbeat_interval_ms, self.election_timeout_min_ms
                ),
            );
        }
        in_range(
            "snapshot_logs_since_last",
            self.snapshot_logs_since_last,
            limits::SNAPSHOT_LOGS,
        )?;
        in_range(
            "snapshot_keep_logs",
            self.snapshot_keep_logs,
            limits::KEEP_LOGS,
        )?;
        in_range(
            "max_payload_entries",
            self.max_payload_entries,
            limits::PAYLOAD_ENTRIES,
        )?;
        in_range(
            "request_timeout_ms",
            self.request_timeout_ms,
            limits::REQUEST_TIMEOUT_MS,
        )?;
        in_range(
            "order_payment_timeout_ms",
            self.order_payment_timeout_ms,
            limits::ORDER_PAYMENT_TIMEOUT_MS,
        )?;
        in_range(
            "txn_timeout_ms",
            self.txn_timeout_ms,
            limits::TXN_TIMEOUT_MS,
        )?;
        in_range(
            "aborted_txn_retention_ms",
            self.aborted_txn_retention_ms,
            limits::ABORTED_TXN_RETENTION_MS,
        )?;
        in_range(
            "max_concurrent_streams",
            self.max_concurrent_streams,
            limits::MAX_CONCURRENT_STREAMS,
        )?;
        in_range(
            "lock_gc_interval_ms",
            self.lock_gc_interval_ms,
            limits::LOCK_GC_INTERVAL_MS,
        )?;
        // A retry within the transaction's own time must still find its abort.
        if self.aborted_txn_retention_ms < self.txn_timeout_ms {
            return invalid(
                "aborted_txn_retention_ms",
                format!(
                    "{} must be at least txn_timeout_ms ({})",
                    self.aborted_txn_retention_ms, self.txn_timeout_ms
                ),
            );
        }
        in_range(
            "group_commit_delay_us",
            self.group_commit_delay_us,
            limits::GROUP_COMMIT_DELAY_US,
        )?;
        Ok(())
    }

    /// The storage tuning this configuration asks for.
    pub fn store_options(&self) -> crate::storage::StoreOptions {
        crate::storage::StoreOptions {
            group_commit_delay: std::time::Duration::from_micros(self.group_commit_delay_us),
        }
    }

    /// The openraft configuration of every group on this node.
    pub fn raft_config(&self) -> Result<openraft::Config, ConfigError> {
        let lease = self.election_timeout_max_ms;
        let cfg = openraft::Config {
            cluster_name: "shopkv".into(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: 30_000,
            max_payload_entries: self.max_payload_entries,
            // A follower further behind than this gets a snapshot.
            replication_lag_threshold: self
                .snapshot_logs_since_last
                .max(self.snapshot_keep_logs + 1),
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_logs_since_last),
            max_in_snapshot_log_to_keep: self.snapshot_keep_logs,
            purge_batch_size: 32,
            enable_pre_vote: Some(true),
            // openraft #2080: without this, an old leader's heartbeats through a
            // bridge node can keep a connected majority from electing.
            quorum_loss_probe_interval: Some(lease + self.election_timeout_max_ms),
            // No "leader restore": a restarted leader must win an election
            // first. Our applies and committed index are unsynced (they ride
            // the next append's fsync) and the leader's own append may be
            // unsynced while two followers already committed it, so a leader
            // back from a SIGKILL can know less than it acknowledged: resumed
            // at once, it served reads older than an acknowledged write (chaos
            // seed 145644) and could append a different entry at the index of
            // one it lost. An election's blank entry settles all of that.
            enable_leader_restore: Some(false),
            ..Default::default()
        };
        cfg.validate().map_err(|e| ConfigError::Invalid {
            field: "raft",
            reason: e.to_string(),
        })
    }
}

/// Most peer routes accepted (one per other node).
const MAX_PEER_ROUTES: usize = 64;

fn parse_routes(items: &[String]) -> Result<BTreeMap<u64, String>, ConfigError> {
    if items.len() > MAX_PEER_ROUTES {
        return Err(ConfigError::Invalid {
            field: "peer_routes",
            reason: format!("at most {MAX_PEER_ROUTES} routes"),
        });
    }
    items
        .iter()
        .map(|item| {
            let bad = || ConfigError::Invalid {
                field: "peer_routes",
                reason: format!("{item:?} is not ID=HOST:PORT"),
            };
            let (id, addr) = item.split_once('=').ok_or_else(bad)?;
            let id: u64 = id.trim().parse().map_err(|_| bad())?;
            Ok((id, addr.trim().to_string()))
        })
        .collect()
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim().replace('\n', " "),
    })
}

fn resolve(field: &'static str, addr: &str) -> Result<SocketAddr, ConfigError> {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| ConfigError::Invalid {
            field,
            reason: format!("{addr:?} is not a host:port address"),
        })
}

fn in_range(field: &'static str, v: u64, (lo, hi): (u64, u64)) -> Result<(), ConfigError> {
    if v < lo || v > hi {
        return Err(ConfigError::Invalid {
            field,
            reason: format!("{v} is outside {lo}..={hi}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        ServeArgs {
            id: Some(1),
            data_dir: Some("/tmp/x".into()),
            peer_addr: Some("127.0.0.1:7001".into()),
            client_addr: Some("127.0.0.1:7002".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_validate_and_raft_config_is_accepted() {
        let cfg = Config::load(&args()).unwrap();
        assert_eq!(cfg.heartbeat_interval_ms, 100);
        assert_eq!(cfg.max_concurrent_streams, DEFAULT_MAX_CONCURRENT_STREAMS);
        cfg.raft_config().unwrap();
    }

    #[test]
    fn bad_values_name_the_setting() {
        let mut a = args();
        a.id = Some(0);
        assert!(Config::load(&a).unwrap_err().to_string().contains("`id`"));
        let mut a = args();
        a.client_addr = a.peer_addr.clone();
        assert!(
            Config::load(&a)
                .unwrap_err()
                .to_string()
                .contains("client_addr")
        );
        let mut a = args();
        a.election_timeout_min_ms = Some(2000);
        assert!(
            Config::load(&a)
                .unwrap_err()
                .to_string()
                .contains("election_timeout_min_ms")
        );
        let mut a = args();
        a.peer_routes = vec!["2=127.0.0.1:9".into(), "x".into()];
        assert!(
            Config::load(&a)
                .unwrap_err()
                .to_string()
                .contains("peer_routes")
        );
        let mut a = args();
        a.peer_routes = vec!["2=127.0.0.1:9".into()];
        assert_eq!(
            Config::load(&a)
                .unwrap()
                .peer_routes
                .get(&2)
                .map(String::as_str),
            Some("127.0.0.1:9")
        );
        // Shorter than the transaction timeout: a retry in time would miss the abort.
        let mut a = args();
        a.txn_timeout_ms = Some(5_000);
        a.aborted_txn_retention_ms = Some(4_000);
        assert!(
            Config::load(&a)
                .unwrap_err()
                .to_string()
                .contains("aborted_txn_retention_ms")
        );
        a.aborted_txn_retention_ms = Some(5_000);
        assert_eq!(Config::load(&a).unwrap().aborted_txn_retention_ms, 5_000);
        for streams in [0, 65_537] {
            let mut a = args();
            a.max_concurrent_streams = Some(streams);
            assert!(
                Config::load(&a)
                    .unwrap_err()
                    .to_string()
                    .contains("max_concurrent_streams")
            );
        }
        for interval in [99, 24 * 3_600_000 + 1] {
            let mut a = args();
            a.lock_gc_interval_ms = Some(interval);
            assert!(
                Config::load(&a)
                    .unwrap_err()
                    .to_string()
                    .contains("lock_gc_interval_ms")
            );
        }
        let mut a = args();
        a.peer_addr = Some("nonsense".into());
        assert!(
            Config::load(&a)
                .unwrap_err()
                .to_string()
                .contains("peer_addr")
        );
    }

    #[test]
    fn file_is_read_and_flags_override_it_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "id = 7\nheartbeat_interval_ms = 50\n").unwrap();
        let mut a = args();
        a.config = Some(path.clone());
        a.id = None;
        let cfg = Config::load(&a).unwrap();
        assert_eq!((cfg.id, cfg.heartbeat_interval_ms), (7, 50));
        a.id = Some(3);
        assert_eq!(Config::load(&a).unwrap().id, 3);
        std::fs::write(&path, "idd = 7\n").unwrap();
        let err = Config::load(&a).unwrap_err().to_string();
        assert!(err.contains("malformed config file"), "{err}");
    }
}
