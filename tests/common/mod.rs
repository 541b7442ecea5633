//! Process-control harness shared by the integration and chaos tests: starts
//! real `shopkv serve` processes (the binary Cargo built for this test run) on
//! loopback ports it picks, kills them with SIGKILL, pauses them with
//! SIGSTOP/SIGCONT, restarts them on the same data, and asks them for status.
#![allow(dead_code)]

pub mod history;
pub mod proxy;
pub mod shop;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shopkv::proto::cluster_client::ClusterClient;
use shopkv::proto::kv_client::KvClient;
use shopkv::proto::{self, StatusResponse};
use tonic::transport::{Channel, Endpoint};

/// The `shopkv` binary Cargo built for these tests (`SHOPKV_TEST_BIN`
/// overrides it, e.g. to keep a long chaos campaign on one build).
pub fn binary() -> String {
    std::env::var("SHOPKV_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_shopkv").to_string())
}

/// A loopback port that was free a moment ago, outside the kernel's
/// ephemeral range, that no other call in this process has returned. Outside
/// that range because every outgoing connection takes a port from it: one
/// that took a port picked here (a node's peer connecting to a killed node,
/// say) before the node bound it made the node exit at start-up. Not handed
/// out twice because two nodes of one cluster (or of two tests running at
/// once) given the same port made one of them fail to start.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for _ in 0..10_000 {
        let port = port_outside_ephemeral(rand::random(), 0);
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free loopback port outside the ephemeral range")
}

/// The `i`-th (modulo their number) of the ports from 10 000 up that lie,
/// with the `room` ports above them, outside the ephemeral range.
pub fn port_outside_ephemeral(i: u32, room: u32) -> u16 {
    let (low, high) = ephemeral_port_range();
    let mut windows: Vec<std::ops::Range<u32>> = Vec::new();
    if low > 10_000 + room {
        windows.push(10_000..low - room);
    }
    if high + 1 + room < 65_535 {
        windows.push(high + 1..65_535 - room);
    }
    let span: u32 = windows.iter().map(|r| r.end - r.start).sum();
    assert!(
        span > 0,
        "no ports outside the ephemeral range {low}-{high}"
    );
    let mut i = i % span;
    for r in &windows {
        if i < r.end - r.start {
            return (r.start + i) as u16;
        }
        i -= r.end - r.start;
    }
    unreachable!("i < span")
}

/// The kernel's ephemeral port range (Linux's default when unreadable).
pub fn ephemeral_port_range() -> (u32, u32) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|w| w.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

/// One node process.
pub struct NodeProc {
    /// Node id.
    pub id: u64,
    /// Its data dir.
    pub dir: PathBuf,
    /// Peer address.
    pub peer: String,
    /// Client address.
    pub client: String,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl NodeProc {
    /// Sets an environment variable for this node's next start (e.g. its
    /// own `FAILPOINTS`).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.dir).expect("create node dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("shopkv.log"))
            .expect("open node log");
        let child = Command::new(binary())
            .arg("serve")
            .args(["--id", &self.id.to_string()])
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--peer-addr", &self.peer, "--client-addr", &self.client])
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn shopkv serve");
        self.child = Some(child);
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) with a pid we spawned; no memory is touched.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// The process id while the harness runs the process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process has been started and not killed by the harness.
    pub fn is_up(&self) -> bool {
        self.child.is_some()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

/// A cluster of real node processes in a temporary directory.
pub struct TestCluster {
    /// The nodes, index = id - 1.
    pub nodes: Vec<NodeProc>,
    /// Link proxies by (from, to) node id, when started with proxies.
    pub links: std::collections::BTreeMap<(u64, u64), proxy::LinkProxy>,
    /// Data shards given at init.
    pub shards: u32,
    dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts `n` nodes (not yet initialised), each with `extra` serve flags.
    pub fn start(n: u64, extra: &[&str]) -> TestCluster {
        TestCluster::start_with_env(n, extra, &[])
    }

    /// Like [`TestCluster::start`], with extra environment variables for every
    /// node process (e.g. `FAILPOINTS` in builds with the `failpoints` feature).
    pub fn start_with_env(n: u64, extra: &[&str], env: &[(&str, &str)]) -> TestCluster {
        let dir = tempfile::Builder::new()
            .prefix("shopkv-test-")
            .tempdir()
            .expect("tempdir");
        let nodes = (1..=n)
            .map(|id| {
                let mut p = NodeProc {
                    id,
                    dir: dir.path().join(format!("n{id}")),
                    peer: format!("127.0.0.1:{}", free_port()),
                    client: format!("127.0.0.1:{}", free_port()),
                    extra: extra.iter().map(|s| s.to_string()).collect(),
                    env: env
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    child: None,
                };
                p.spawn();
                p
            })
            .collect();
        TestCluster {
            nodes,
            links: std::collections::BTreeMap::new(),
            shards: 0,
            dir,
        }
    }

    /// Starts `n` nodes whose outbound peer traffic goes through one proxy per
    /// directed link (see [`proxy`]).
    pub async fn start_with_proxies(n: u64, extra: &[&str]) -> TestCluster {
        let dir = tempfile::Builder::new()
            .prefix("shopkv-chaos-")
            .tempdir()
            .expect("tempdir");
        let peers: Vec<String> = (0..n)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let mut links = std::collections::BTreeMap::new();
        for i in 1..=n {
            for j in 1..=n {
                if i != j {
                    links.insert(
                        (i, j),
                        proxy::LinkProxy::start(peers[(j - 1) as usize].clone()).await,
                    );
                }
            }
        }
        let nodes = (1..=n)
            .map(|id| {
                let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
                for j in (1..=n).filter(|j| *j != id) {
                    args.push("--peer-route".into());
                    args.push(format!("{j}={}", links[&(id, j)].listen));
                }
                let mut p = NodeProc {
                    id,
                    dir: dir.path().join(format!("n{id}")),
                    peer: peers[(id - 1) as usize].clone(),
                    client: format!("127.0.0.1:{}", free_port()),
                    extra: args,
                    env: Vec::new(),
                    child: None,
                };
                p.spawn();
                p
            })
            .collect();
        TestCluster {
            nodes,
            links,
            shards: 0,
            dir,
        }
    }

    /// Sets every link from a node in `a` to a node in `b` (both directions
    /// if `both`).
    pub fn set_links(&self, a: &[u64], b: &[u64], mode: proxy::LinkMode, both: bool) {
        for (&(from, to), link) in &self.links {
            if (a.contains(&from) && b.contains(&to))
                || (both && b.contains(&from) && a.contains(&to))
            {
                link.set(mode);
            }
        }
    }

    /// Every link back to pass-through with no throttle or latency.
    pub fn heal_links(&self) {
        for link in self.links.values() {
            link.set(proxy::LinkMode::Pass);
            link.set_delay(0);
            link.set_latency(0);
        }
    }

    /// Starts `n` nodes and forms a cluster with `shards` shards; waits until
    /// every group has a leader.
    pub async fn start_initialised(n: u64, shards: u32, extra: &[&str]) -> TestCluster {
        let mut c = TestCluster::start(n, extra);
        c.init(shards).await;
        c.wait_ready(Duration::from_secs(30)).await;
        c
    }

    /// The last `lines` lines of every node's log, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let text = std::fs::read_to_string(n.dir.join("shopkv.log")).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- node {} log (last {lines} lines)\n", n.id));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// The cluster's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every client address.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.client.clone()).collect()
    }

    /// `cluster init` through node 1.
    pub async fn init(&mut self, shards: u32) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let res = async {
                let mut c = ClusterClient::new(channel(&self.nodes[0].client).await?);
                c.init(proto::InitRequest {
                    shards,
                    endpoints: self.endpoints(),
                })
                .await
                .map_err(|s| s.to_string())
            }
            .await;
            match res {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("init not yet possible: {e}");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                // Say why: the flake seen twice (nodes not answering for 30 s)
                // needs the nodes' own account.
                Err(e) => panic!("cluster init failed: {e}\n{}", self.log_tails(20)),
            }
        }
        self.shards = shards;
    }

    /// Waits until every node answers and every group has a leader.
    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let why = match self.status(self.live_node()).await {
                Ok(s) => shopkv::cli::not_ready(&s),
                Err(e) => Some(e),
            };
            match why {
                None => return,
                Some(why) if Instant::now() >= deadline => {
                    panic!("cluster not ready after {timeout:?}: {why}")
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn live_node(&self) -> u64 {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .map_or(1, |n| n.id)
    }

    /// `Cluster.Status` through node `via`.
    pub async fn status(&self, via: u64) -> Result<StatusResponse, String> {
        let mut c = ClusterClient::new(channel(&self.node(via).client).await?);
        c.status(proto::StatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| s.to_string())
    }

    /// The leader of `group` as the nodes report it (highest term wins),
    /// asking through node `via`.
    pub async fn leader_of(&self, group: u64, via: u64) -> Option<u64> {
        let s = self.status(via).await.ok()?;
        let g = s.groups.iter().find(|g| g.group_id == group)?;
        (g.leader != 0).then_some(g.leader)
    }

    /// How node `node` reports its replica of `group`, asking through `via`.
    pub async fn replica(&self, via: u64, group: u64, node: u64) -> Option<proto::ReplicaStatus> {
        let s = self.status(via).await.ok()?;
        let g = s.groups.into_iter().find(|g| g.group_id == group)?;
        g.replicas.into_iter().find(|r| r.node_id == node)
    }

    /// Waits until `group` has a leader other than `not`; returns it.
    pub async fn wait_new_leader(&self, group: u64, not: u64, via: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader_of(group, via).await
                && l != not
            {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "group {group} elected no new leader within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A KV client connected to node `id`.
    pub async fn kv(&self, id: u64) -> KvClient<Channel> {
        KvClient::new(
            channel(&self.node(id).client)
                .await
                .expect("connect to node"),
        )
    }

    /// Node `id`.
    pub fn node(&self, id: u64) -> &NodeProc {
        &self.nodes[(id - 1) as usize]
    }

    /// Node `id`, mutably.
    pub fn node_mut(&mut self, id: u64) -> &mut NodeProc {
        &mut self.nodes[(id - 1) as usize]
    }

    /// SIGKILLs node `id` and reaps it.
    pub fn kill(&mut self, id: u64) {
        let n = self.node_mut(id);
        if let Some(mut c) = n.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOPs node `id`.
    pub fn pause(&self, id: u64) {
        self.node(id).signal(libc::SIGSTOP);
    }

    /// SIGCONTs node `id`.
    pub fn resume(&self, id: u64) {
        self.node(id).signal(libc::SIGCONT);
    }

    /// SIGCONTs every node and restarts the ones that are down.
    pub fn revive_all(&mut self) {
        for id in 1..=self.nodes.len() as u64 {
            self.resume(id);
            if !self.node(id).is_up() {
                self.restart(id);
            }
        }
    }

    /// Starts node `id` again on the same data dir and ports.
    pub fn restart(&mut self, id: u64) {
        self.kill(id);
        self.node_mut(id).spawn();
    }

    /// Keeps the data dirs (for a failing run) and returns their path.
    pub fn keep(mut self) -> PathBuf {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let placeholder = tempfile::TempDir::new().expect("tempdir");
        std::mem::replace(&mut self.dir, placeholder).keep()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A channel to a client address (fails fast if nothing listens).
pub async fn channel(addr: &str) -> Result<Channel, String> {
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("connect {addr}: {e}"))
}

/// A Put through `client`.
pub async fn put(
    client: &mut KvClient<Channel>,
    key: &str,
    value: &str,
) -> Result<u64, tonic::Status> {
    client
        .put(proto::PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            fence: None,
        })
        .await
        .map(|r| r.into_inner().version)
}

/// A Get through `client`: `Ok(None)` when the key does not exist.
pub async fn get(
    client: &mut KvClient<Channel>,
    key: &str,
    serializable: bool,
) -> Result<Option<String>, tonic::Status> {
    match client
        .get(proto::GetRequest {
            key: key.as_bytes().to_vec(),
            serializable,
        })
        .await
    {
        Ok(r) => Ok(r
            .into_inner()
            .record
            .map(|rec| String::from_utf8_lossy(&rec.value).into_owned())),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(s),
    }
}

/// A shard's 2PC records in flight, read linearizably through node `via`'s
/// peer port; `None` if it could not be read.
pub async fn in_flight(
    c: &TestCluster,
    via: u64,
    shard: u64,
) -> Option<shopkv::sm::commerce::InFlight> {
    use shopkv::node::{NodeError, ReadOp, ReadResult};
    use shopkv::sm::commerce::{CommerceRead, CommerceReadResult};
    let mut peer =
        shopkv::proto::peer_client::PeerClient::new(channel(&c.node(via).peer).await.ok()?);
    let op = ReadOp::Commerce(CommerceRead::InFlight { limit: 100 });
    let reply = peer
        .read(proto::GroupMessage {
            group_id: shard,
            payload: shopkv::codec::to_wire(&(op, true)).ok()?,
            hops_left: 3,
        })
        .await
        .ok()?
        .into_inner();
    match shopkv::codec::from_wire::<Result<ReadResult, NodeError>>(&reply.payload).ok()? {
        Ok(ReadResult::Commerce(CommerceReadResult::InFlight(f))) => Some(*f),
        _ => None,
    }
}
