//! Chaos: a real cluster under a KV register workload while a seeded nemesis
//! kills, pauses and partitions nodes; then every checker runs. Half the
//! clients make unary calls, half send their requests as items on `Kv.Batch`
//! streams: both paths are held to the same history.
//!
//! `cargo test --release --test chaos -- --nocapture`; `SHOPKV_CHAOS_SECS`,
//! `SHOPKV_CHAOS_SEED`, `SHOPKV_CHAOS_NODES=5` change the run.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestCluster;
use common::history::{
    Call, DigestSample, Op, Outcome, RaftSample, Verdict, check_digests, check_linearizable,
    check_raft_samples,
};
use common::proxy::LinkMode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shopkv::proto::batch_item::Op as BatchOp;
use shopkv::proto::batch_result::Result as BatchReply;
use shopkv::proto::{self, kv_client::KvClient, peer_client::PeerClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const KEYS: u32 = 10;
const CLIENTS: u32 = 16;
const SHARDS: u32 = 4;
/// Per-operation deadline.
const OP_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long the healed cluster may take to settle.
const SETTLE: Duration = Duration::from_secs(45);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Run {
    start: Instant,
    history: Mutex<Vec<Op>>,
    next_process: AtomicU32,
    next_value: AtomicU32,
    stop: AtomicBool,
    /// Operations of the `Kv.Batch` clients with a known, successful outcome.
    batch_ok: AtomicU32,
}

impl Run {
    fn now_ns(&self) -> i64 {
        self.start.elapsed().as_nanos() as i64
    }
}

/// Whether an error means the request certainly changed nothing: the server
/// said so, or no connection could be made to send it.
fn not_applied(s: &tonic::Status) -> bool {
    match s.metadata().get("x-shopkv-outcome") {
        Some(v) => v.as_bytes() == b"not-applied",
        None => s.code() == tonic::Code::Unavailable && s.message().contains("tcp connect error"),
    }
}

async fn connect(addr: &str) -> Option<KvClient<Channel>> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_millis(300))
        .timeout(OP_TIMEOUT);
    Some(KvClient::new(ep.connect_lazy()))
}

/// A client's `Kv.Batch` stream to one node, opened when first needed and
/// dropped when it fails or an answer is late. Its answers are read as a unary
/// call's would be: an item's error carries the same code and outcome.
struct BatchConn {
    kv: KvClient<Channel>,
    open: Option<(
        mpsc::Sender<proto::BatchRequest>,
        tonic::Streaming<proto::BatchResponse>,
    )>,
    next_id: u64,
}

impl BatchConn {
    async fn new(addr: &str) -> Option<BatchConn> {
        // No per-call timeout on the channel: the stream lives across requests.
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(Duration::from_millis(300));
        Some(BatchConn {
            kv: KvClient::new(ep.connect_lazy()),
            open: None,
            next_id: 0,
        })
    }

    /// Sends `op` as one item and waits up to OP_TIMEOUT for its result.
    async fn call(&mut self, op: BatchOp) -> Result<BatchReply, tonic::Status> {
        match tokio::time::timeout(OP_TIMEOUT, self.send_and_wait(op)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(s)) => Err(s),
            Err(_) => {
                // A late answer may still come; a fresh stream never sees it.
                self.open = None;
                Err(tonic::Status::deadline_exceeded("batch item timed out"))
            }
        }
    }

    async fn send_and_wait(&mut self, op: BatchOp) -> Result<BatchReply, tonic::Status> {
        let (tx, results) = match self.open.take() {
            Some(open) => self.open.insert(open),
            None => {
                let (tx, rx) = mpsc::channel(4);
                let results = self.kv.batch(ReceiverStream::new(rx)).await.map_err(|s| {
                    // Nothing was sent on a stream that never opened.
                    let mut s =
                        tonic::Status::unavailable(format!("open Kv.Batch: {}", s.message()));
                    s.metadata_mut()
                        .insert("x-shopkv-outcome", "not-applied".parse().expect("ascii"));
                    s
                })?;
                self.open.insert((tx, results.into_inner()))
            }
        };
        self.next_id += 1;
        let id = self.next_id;
        let item = proto::BatchItem {
            id,
            timeout_ms: OP_TIMEOUT.as_millis() as u64,
            op: Some(op),
        };
        let ended = |what: &str| tonic::Status::unavailable(format!("batch stream {what}"));
        if tx
            .send(proto::BatchRequest { items: vec![item] })
            .await
            .is_err()
        {
            self.open = None;
            return Err(ended("closed"));
        }
        loop {
            match results.message().await {
                Ok(Some(message)) => {
                    // Results of items given up on earlier are skipped.
                    if let Some(r) = message.results.into_iter().find(|r| r.id == id) {
                        return match r.result {
                            Some(BatchReply::Error(e)) => {
                                let mut s = tonic::Status::new(e.code.into(), e.message);
                                if let (false, Ok(v)) = (e.outcome.is_empty(), e.outcome.parse()) {
                                    s.metadata_mut().insert("x-shopkv-outcome", v);
                                }
                                Err(s)
                            }
                            Some(reply) => Ok(reply),
                            None => Err(ended("answered nothing")),
                        };
                    }
                }
                // Without an answer the outcome is unknown (no outcome header).
                _ => {
                    self.open = None;
                    return Err(ended("ended"));
                }
            }
        }
    }
}

/// A unary call's answer, or DEADLINE_EXCEEDED (no outcome header: unknown)
/// after OP_TIMEOUT.
async fn within<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(OP_TIMEOUT, call).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded("call timed out")),
    }
}

/// How a client sends requests to one node.
enum Conn {
    Unary(KvClient<Channel>),
    Batch(Box<BatchConn>),
}

impl Conn {
    async fn put(&mut self, req: proto::PutRequest) -> Result<proto::PutResponse, tonic::Status> {
        match self {
            Conn::Unary(kv) => within(kv.put(req)).await,
            Conn::Batch(b) => match b.call(BatchOp::Put(req)).await? {
                BatchReply::Put(r) => Ok(r),
                other => Err(tonic::Status::internal(format!("put answered {other:?}"))),
            },
        }
    }

    async fn get(&mut self, req: proto::GetRequest) -> Result<proto::GetResponse, tonic::Status> {
        match self {
            Conn::Unary(kv) => within(kv.get(req)).await,
            Conn::Batch(b) => match b.call(BatchOp::Get(req)).await? {
                BatchReply::Get(r) => Ok(r),
                other => Err(tonic::Status::internal(format!("get answered {other:?}"))),
            },
        }
    }

    async fn compare_and_swap(
        &mut self,
        req: proto::CompareAndSwapRequest,
    ) -> Result<proto::CompareAndSwapResponse, tonic::Status> {
        match self {
            Conn::Unary(kv) => within(kv.compare_and_swap(req)).await,
            Conn::Batch(b) => match b.call(BatchOp::CompareAndSwap(req)).await? {
                BatchReply::CompareAndSwap(r) => Ok(r),
                other => Err(tonic::Status::internal(format!("cas answered {other:?}"))),
            },
        }
    }
}

async fn client_loop(run: Arc<Run>, endpoints: Vec<String>, seed: u64, batch: bool) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut process = run.next_process.fetch_add(1, Ordering::Relaxed);
    let mut conns: Vec<Conn> = Vec::new();
    for e in &endpoints {
        conns.push(if batch {
            Conn::Batch(Box::new(BatchConn::new(e).await.expect("endpoint")))
        } else {
            Conn::Unary(connect(e).await.expect("endpoint"))
        });
    }
    while !run.stop.load(Ordering::Relaxed) {
        let key = rng.random_range(0..KEYS);
        let at = rng.random_range(0..conns.len());
        let kv = &mut conns[at];
        let roll = rng.random_range(0..10);
        let call = if roll < 4 {
            Call::Get
        } else if roll < 7 {
            Call::Put {
                value: u64::from(run.next_value.fetch_add(1, Ordering::Relaxed)) + 1,
            }
        } else {
            // CAS against the version a read of ours just returned.
            let invoke_ns = run.now_ns();
            let outcome = do_get(kv, key).await;
            let expected = match &outcome {
                Outcome::Read(r) => r.map_or(0, |(_, v)| v),
                _ => 0,
            };
            record(&run, &mut process, key, invoke_ns, Call::Get, outcome);
            Call::Cas {
                expected,
                value: u64::from(run.next_value.fetch_add(1, Ordering::Relaxed)) + 1,
            }
        };
        let invoke_ns = run.now_ns();
        let outcome = match &call {
            Call::Get => do_get(kv, key).await,
            Call::Put { value } => {
                let req = proto::PutRequest {
                    key: key_bytes(key),
                    value: value.to_string().into_bytes(),
                    fence: None,
                };
                match kv.put(req).await {
                    Ok(r) => Outcome::Written(r.version),
                    Err(s) if not_applied(&s) => Outcome::Failed,
                    Err(_) => Outcome::Unknown,
                }
            }
            Call::Cas { expected, value } => {
                let req = proto::CompareAndSwapRequest {
                    key: key_bytes(key),
                    expected_version: *expected,
                    value: value.to_string().into_bytes(),
                    fence: None,
                };
                match kv.compare_and_swap(req).await {
                    Ok(r) => {
                        match r
                            .current
                            .map(|c| String::from_utf8_lossy(&c.value).parse::<u64>())
                        {
                            Some(Err(_)) => Outcome::Unknown,
                            current => Outcome::Swapped {
                                ok: r.succeeded,
                                version: r.version,
                                current: current.and_then(Result::ok),
                            },
                        }
                    }
                    Err(s) if not_applied(&s) => Outcome::Failed,
                    Err(_) => Outcome::Unknown,
                }
            }
        };
        if batch && !matches!(outcome, Outcome::Unknown | Outcome::Failed) {
            run.batch_ok.fetch_add(1, Ordering::Relaxed);
        }
        record(&run, &mut process, key, invoke_ns, call, outcome);
    }
}

fn key_bytes(key: u32) -> Vec<u8> {
    format!("chaos/{key}").into_bytes()
}

async fn do_get(kv: &mut Conn, key: u32) -> Outcome {
    let req = proto::GetRequest {
        key: key_bytes(key),
        serializable: false,
    };
    match kv.get(req).await {
        Ok(r) => match r.record {
            Some(rec) => match String::from_utf8_lossy(&rec.value).parse::<u64>() {
                Ok(v) => Outcome::Read(Some((v, rec.version))),
                Err(_) => Outcome::Failed,
            },
            None => Outcome::Read(None),
        },
        Err(s) if s.code() == tonic::Code::NotFound => Outcome::Read(None),
        // A failed read changed nothing.
        _ => Outcome::Failed,
    }
}

fn record(run: &Run, process: &mut u32, key: u32, invoke_ns: i64, call: Call, outcome: Outcome) {
    let unknown = outcome == Outcome::Unknown;
    let op = Op {
        process: *process,
        key,
        invoke_ns,
        complete_ns: run.now_ns(),
        call,
        outcome,
    };
    if let Ok(mut h) = run.history.lock() {
        h.push(op);
    }
    if unknown {
        // Jepsen's rule: after an unknown outcome the client is a new process.
        *process = run.next_process.fetch_add(1, Ordering::Relaxed);
    }
}

/// Polls every node's replicas over the peer port.
async fn sample_status(
    c: &TestCluster,
    incarnations: &[u32],
    with_digest: bool,
) -> (Vec<RaftSample>, Vec<DigestSample>) {
    let mut raft = Vec::new();
    let mut digests = Vec::new();
    for n in &c.nodes {
        if !n.is_up() {
            continue;
        }
        let Ok(ch) = common::channel(&n.peer).await else {
            continue;
        };
        let mut peer = PeerClient::new(ch);
        let mut req = tonic::Request::new(proto::LocalStatusRequest { with_digest });
        req.set_timeout(Duration::from_millis(500));
        let Ok(Ok(reply)) =
            tokio::time::timeout(Duration::from_millis(700), peer.local_status(req)).await
        else {
            continue;
        };
        for r in reply.into_inner().replicas {
            let Some(st) = r.status else { continue };
            raft.push(RaftSample {
                node: n.id,
                incarnation: incarnations[(n.id - 1) as usize],
                group: r.group_id,
                term: st.term,
                commit: st.commit_index,
                leader: st.state == "Leader",
            });
            if with_digest {
                digests.push(DigestSample {
                    group: r.group_id,
                    node: n.id,
                    index: st.digest_index,
                    digest: st.digest,
                });
            }
        }
    }
    (raft, digests)
}

#[derive(Default)]
struct Faults {
    kills: u32,
    pauses: u32,
    partitions: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos() {
    let secs = env_u64("SHOPKV_CHAOS_SECS", 60);
    let seed = env_u64(
        "SHOPKV_CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000),
    );
    let nodes = env_u64("SHOPKV_CHAOS_NODES", 3);
    assert!(
        nodes == 3 || nodes == 5,
        "SHOPKV_CHAOS_NODES must be 3 or 5"
    );
    eprintln!("chaos: seed={seed} secs={secs} nodes={nodes}");
    let mut rng = StdRng::seed_from_u64(seed);

    // Snapshots every 5 000 entries and 1 000 kept (not the production 50 000 /
    // 10 000): a run then builds, sends and installs snapshots while faults happen.
    let extra = [
        "--snapshot-logs-since-last",
        "5000",
        "--snapshot-keep-logs",
        "1000",
    ];
    let mut c = TestCluster::start_with_proxies(nodes, &extra).await;
    c.init(SHARDS).await;
    c.wait_ready(Duration::from_secs(30)).await;
    let mut incarnations = vec![0u32; nodes as usize];

    let run = Arc::new(Run {
        start: Instant::now(),
        history: Mutex::new(Vec::new()),
        next_process: AtomicU32::new(0),
        next_value: AtomicU32::new(0),
        stop: AtomicBool::new(false),
        batch_ok: AtomicU32::new(0),
    });
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(client_loop(
                run.clone(),
                c.endpoints(),
                seed.wrapping_mul(31).wrapping_add(u64::from(i)),
                i % 2 == 1,
            ))
        })
        .collect();

    let mut samples: Vec<RaftSample> = Vec::new();
    let mut faults = Faults::default();
    let end = Instant::now() + Duration::from_secs(secs);
    let all: Vec<u64> = (1..=nodes).collect();
    let minority = (nodes - 1) / 2;
    while Instant::now() < end {
        // Hold the current fault for 2-5 s, sampling status meanwhile.
        let hold = Instant::now() + Duration::from_millis(rng.random_range(2000..5000));
        while Instant::now() < hold.min(end) {
            samples.extend(sample_status(&c, &incarnations, false).await.0);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Heal, then inject the next fault.
        c.heal_links();
        for id in 1..=nodes {
            c.resume(id);
            if !c.node(id).is_up() {
                c.restart(id);
                incarnations[(id - 1) as usize] += 1;
            }
        }
        if Instant::now() >= end {
            break;
        }
        match rng.random_range(0..7) {
            0 => {
                // Kill the leader of some group.
                let group = rng.random_range(0..=u64::from(SHARDS));
                let via = all[rng.random_range(0..all.len())];
                if let Some(l) = c.leader_of(group, via).await {
                    c.kill(l);
                    faults.kills += 1;
                }
            }
            1 => {
                // Kill a random minority.
                let mut ids = all.clone();
                for _ in 0..minority {
                    let id = ids.remove(rng.random_range(0..ids.len()));
                    c.kill(id);
                    faults.kills += 1;
                }
            }
            2 => {
                // Pause a node past the election timeout (resumed at the next heal).
                let id = all[rng.random_range(0..all.len())];
                c.pause(id);
                faults.pauses += 1;
            }
            3 => {
                // Isolate one node (both directions; drop or blackhole).
                let id = all[rng.random_range(0..all.len())];
                let others: Vec<u64> = all.iter().copied().filter(|n| *n != id).collect();
                let mode = if rng.random_bool(0.5) {
                    LinkMode::Drop
                } else {
                    LinkMode::Blackhole
                };
                c.set_links(&[id], &others, mode, true);
                faults.partitions += 1;
            }
            4 => {
                // Majority / minority split.
                let mut ids = all.clone();
                let mut small = Vec::new();
                for _ in 0..minority {
                    small.push(ids.remove(rng.random_range(0..ids.len())));
                }
                c.set_links(&small, &ids, LinkMode::Blackhole, true);
                faults.partitions += 1;
            }
            5 => {
                // Bridge: two sides that only one node connects.
                let mut ids = all.clone();
                let bridge = ids.remove(rng.random_range(0..ids.len()));
                let half = ids.len() / 2;
                // `bridge` keeps its links to both sides.
                let (a, b) = ids.split_at(half);
                c.set_links(a, b, LinkMode::Drop, true);
                let _ = bridge;
                faults.partitions += 1;
            }
            _ => {
                // One-way cut plus, everywhere, a throttle (congested links)
                // and a latency (long links: up to 300 ms round trips).
                let from = all[rng.random_range(0..all.len())];
                let others: Vec<u64> = all.iter().copied().filter(|n| *n != from).collect();
                let to = others[rng.random_range(0..others.len())];
                c.set_links(&[from], &[to], LinkMode::Blackhole, false);
                for link in c.links.values() {
                    link.set_delay(rng.random_range(5..40));
                    link.set_latency(rng.random_range(0..150));
                }
                faults.partitions += 1;
            }
        }
    }
    run.stop.store(true, Ordering::Relaxed);
    for t in clients {
        let _ = t.await;
    }
    let elapsed = run.start.elapsed();

    // Heal everything, restart every node, let the cluster settle within a bound.
    c.heal_links();
    for id in 1..=nodes {
        c.resume(id);
        c.restart(id);
        incarnations[(id - 1) as usize] += 1;
    }
    c.wait_ready(SETTLE).await;

    let mut violations: Vec<String> = Vec::new();
    // Every replica of every group converges to the same applied index; compare digests there.
    let deadline = Instant::now() + Duration::from_secs(30);
    let digests = loop {
        let (raft, digests) = sample_status(&c, &incarnations, true).await;
        samples.extend(raft);
        let mut by_group: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
        for d in &digests {
            by_group.entry(d.group).or_default().push(d.index);
        }
        let expected_replicas = |g: u64| if g == 0 { nodes as usize } else { 3 };
        let converged = by_group.len() == SHARDS as usize + 1
            && by_group.iter().all(|(g, idx)| {
                idx.len() == expected_replicas(*g) && idx.iter().all(|i| *i == idx[0])
            });
        if converged {
            break digests;
        }
        if Instant::now() >= deadline {
            violations.push(format!(
                "replicas did not converge to one applied index: {by_group:?}"
            ));
            break digests;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    violations.extend(check_digests(&digests));
    violations.extend(check_raft_samples(&samples));

    let history = run.history.lock().map(|h| h.clone()).unwrap_or_default();
    let ops = history.len();
    let unknown = history
        .iter()
        .filter(|o| o.outcome == Outcome::Unknown)
        .count();
    let ok_ops = history
        .iter()
        .filter(|o| !matches!(o.outcome, Outcome::Unknown | Outcome::Failed))
        .count();
    match check_linearizable(&history, Duration::from_secs(120)) {
        Verdict::Ok => {}
        Verdict::Violation => violations.push("history is not linearizable".into()),
        Verdict::Unknown => violations.push("linearizability check timed out".into()),
    }
    if ok_ops < 100 {
        violations.push(format!(
            "only {ok_ops} operations succeeded: the cluster made no progress"
        ));
    }
    let batch_ok = run.batch_ok.load(Ordering::Relaxed);
    if batch_ok < 50 {
        violations.push(format!(
            "only {batch_ok} operations on Kv.Batch streams succeeded: that path made no progress"
        ));
    }

    let summary = format!(
        "CHAOS seed={seed} secs={} nodes={nodes} kills={} pauses={} partitions={} ops={ops} unknown={unknown} violations={}",
        elapsed.as_secs(),
        faults.kills,
        faults.pauses,
        faults.partitions,
        violations.len()
    );
    // Straight to the stderr handle: libtest captures print!/eprint! of passing
    // tests, and this line belongs in every run's log, CI's included.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("{summary}\nchaos: {batch_ok} of {ok_ops} successful operations went on Kv.Batch streams\n").as_bytes(),
    );
    if !violations.is_empty() {
        let history_path = c.dir().join("history.json");
        let _ = std::fs::write(
            &history_path,
            serde_json::to_vec(&history).unwrap_or_default(),
        );
        let kept = c.keep();
        eprintln!("chaos violations (seed {seed}):");
        for v in &violations {
            eprintln!("  - {v}");
        }
        eprintln!(
            "data dirs kept in {}; history in {}",
            kept.display(),
            kept.join("history.json").display()
        );
        panic!("{} chaos violations with seed {seed}", violations.len());
    }
}
