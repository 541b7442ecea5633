//! Smoke test of the benchmark harness (`bench/`) against a real 3-node shopkv:
//! the put workload's acknowledged writes are read back and must be exactly the
//! keys its clients chose, each holding a whole value one of them really issued;
//! the linearizable get workload finds every key it loaded.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::{TestCluster, get};
use shopkv_bench::client::{self, System};
use shopkv_bench::runner::{self, RunSpec, client_rng};
use shopkv_bench::workloads::{self, KeySpace, Named, key, put};

const KEYS: u64 = 300;
const CLIENTS: usize = 8;
const SEED: u64 = 77;

/// Three connections to `cluster`.
async fn connect(cluster: &TestCluster) -> Vec<client::Conn> {
    connect_with(cluster, client::KvApi::Unary).await
}

/// Three connections to `cluster`, KV requests sent by `kv_api`.
async fn connect_with(cluster: &TestCluster, kv_api: client::KvApi) -> Vec<client::Conn> {
    client::connect(
        System::Shopkv,
        &cluster.endpoints(),
        3,
        client::Routing::Leader,
        kv_api,
    )
    .await
    .expect("connect")
}

/// CLIENTS clients for 2 s, no warm-up.
fn two_seconds() -> RunSpec {
    RunSpec {
        clients: CLIENTS,
        warmup: Duration::ZERO,
        duration: Duration::from_secs(2),
        progress: false,
        seed: SEED,
        server_pids: Vec::new(),
    }
}

/// The driver's routing hash is the server's, and its leader table names, for
/// every shard, the leader the cluster reports (a node it has a connection to).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_routes_each_shard_to_its_leader() {
    for shards in [1, 3, 8] {
        for i in 0..2_000u32 {
            let key = format!("key-{i}");
            assert_eq!(
                shopkv_bench::route::shard_for(key.as_bytes(), shards),
                shopkv::router::shard_for(key.as_bytes(), shards),
                "{key} with {shards} shards"
            );
        }
    }
    let map = shopkv::router::ClusterMap {
        shards: 5,
        ..Default::default()
    };
    assert_eq!(
        shopkv_bench::route::shard_of_order("ord-17", 5),
        map.shard_of_order("ord-17")
    );

    let cluster = TestCluster::start_initialised(3, 3, &[]).await;
    let conns = connect(&cluster).await;
    let c = conns[0].shopkv().expect("a shopkv connection");
    let routes = c.routes().expect("routing is on by default");
    // Leaders may still move to their preferred nodes after start-up; the table
    // is refreshed every second, so it must agree within a few refreshes.
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    loop {
        let mut disagree = Vec::new();
        for shard in 1..=3 {
            let leader = cluster.leader_of(shard, 1).await;
            assert!(leader.is_some(), "shard {shard} has no leader");
            if routes.leader_of(shard) != leader {
                disagree.push((shard, routes.leader_of(shard), leader));
            }
        }
        if disagree.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "(shard, table, cluster) disagree: {disagree:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let unrouted = client::connect(
        System::Shopkv,
        &cluster.endpoints(),
        3,
        client::Routing::Any,
        client::KvApi::Unary,
    )
    .await
    .expect("connect");
    let c = unrouted[0].shopkv().expect("a shopkv connection");
    assert!(c.routes().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_counts_operations_and_the_writes_read_back() {
    counts_operations_and_the_writes_read_back(client::KvApi::Unary).await;
}

/// The same with the driver's KV requests on `Kv.Batch` streams (`--kv-api batch`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_over_batch_streams_counts_operations_and_the_writes_read_back() {
    counts_operations_and_the_writes_read_back(client::KvApi::Batch).await;
}

async fn counts_operations_and_the_writes_read_back(kv_api: client::KvApi) {
    let cluster = TestCluster::start_initialised(3, 4, &[]).await;
    let conns = connect_with(&cluster, kv_api).await;
    let space = KeySpace {
        keys: KEYS,
        value_bytes: 256,
    };
    let spec = RunSpec {
        clients: CLIENTS,
        warmup: Duration::from_millis(300),
        duration: Duration::from_secs(2),
        progress: false,
        seed: SEED,
        server_pids: cluster.nodes.iter().filter_map(|n| n.pid()).collect(),
    };
    let workload = Arc::new(put::Put { space });
    let report = runner::run(Arc::clone(&workload), &conns, &spec)
        .await
        .expect("put run");
    let s = &report.summary;
    let issued: u64 = report.issued_per_client.iter().sum();
    assert_eq!(s.errors, 0, "{s:?}");
    assert!(s.ops >= 50, "too few operations for 2 s: {s:?}");
    assert!(
        s.ops < issued,
        "measured {} must exclude the warm-up of {issued}",
        s.ops
    );
    assert!(
        s.ops_per_s > 0.0 && s.p50_ms > 0.0 && s.p50_ms <= s.p99_ms,
        "{s:?}"
    );
    // The nodes' CPU time over the window is read from /proc and divided by the
    // operations measured (ticks are 10 ms; the nodes use far more than that).
    let cpu = report.cpu.expect("the nodes' CPU time is measured");
    assert!(
        cpu.servers_us > 0.0 && cpu.servers_us * (s.ops as f64) < 60e6,
        "{cpu:?}"
    );

    // Replay every client's random stream: the keys it chose are the keys written.
    let mut touched = BTreeSet::new();
    for (id, &n) in report.issued_per_client.iter().enumerate() {
        let mut rng = client_rng(SEED, id as u64);
        for _ in 0..n {
            touched.insert(workload.pick_key(&mut rng));
        }
    }
    let mut kv = cluster.kv(2).await;
    for i in 0..KEYS {
        let k = String::from_utf8(key(i)).expect("ascii key");
        let value = get(&mut kv, &k, false).await.expect("read back");
        match value {
            None => assert!(
                !touched.contains(&i),
                "acknowledged write to {k} is missing"
            ),
            Some(v) => {
                assert!(touched.contains(&i), "{k} was never written by the run");
                let (client, seq) = put::decode_value(v.as_bytes())
                    .unwrap_or_else(|| panic!("{k} holds a damaged value {v:?}"));
                assert!(
                    (client as usize) < CLIENTS && seq < report.issued_per_client[client as usize],
                    "{k} holds write ({client}, {seq}) that was never issued"
                );
                assert_eq!(v.len(), 256);
            }
        }
    }

    // Linearizable gets of every key the setup loads: none may be missing.
    let get_lin = workloads::build("get-lin", space).expect("workload");
    assert!(matches!(get_lin, Named::Get(_)));
    let spec = RunSpec {
        duration: Duration::from_secs(1),
        ..spec
    };
    let report = get_lin.setup_and_run(&conns, &spec).await.expect("get run");
    assert_eq!(report.summary.errors, 0, "{:?}", report.summary);
    assert!(report.summary.ops >= 50, "{:?}", report.summary);
}

/// The order (W4) and flash-sale (W5) workloads against a real 3-shard shopkv:
/// cross-shard orders whose units all show up as reserved stock, and a sale that
/// stops at sold out having sold exactly the stock (their `verify` checks both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_and_flash_workloads_verify_their_stock() {
    let cluster = TestCluster::start_initialised(3, 3, &[]).await;
    let conns = connect(&cluster).await;
    let spec = two_seconds();
    let space = KeySpace {
        keys: 200,
        value_bytes: 0,
    };
    let order = workloads::build("order", space).expect("order workload");
    let report = order
        .setup_and_run(&conns, &spec)
        .await
        .expect("order run verifies");
    assert!(report.summary.ops >= 20, "{:?}", report.summary);
    assert_eq!(report.summary.errors, 0, "{:?}", report.summary);

    let stock = 60;
    let flash = workloads::build(
        "flash",
        KeySpace {
            keys: stock,
            value_bytes: 0,
        },
    )
    .expect("flash workload");
    let spec = RunSpec {
        duration: Duration::from_secs(30),
        ..spec
    };
    let report = flash
        .setup_and_run(&conns, &spec)
        .await
        .expect("flash run verifies");
    assert_eq!(report.summary.ops, stock, "exactly the stock is sold");
    assert!(report.summary.ops_per_s > 0.0);
    assert!(report.cpu.is_none(), "no server pids given: no CPU figure");
}

/// W3: lock cycles (session, acquire, release, close) on 16 names: every
/// cycle succeeds, and afterwards no name is held or waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_workload_cycles_and_leaves_every_lock_free() {
    let cluster = TestCluster::start_initialised(3, 1, &[]).await;
    let conns = connect(&cluster).await;
    let spec = two_seconds();
    let space = KeySpace {
        keys: 0,
        value_bytes: 0,
    };
    let report = workloads::build("lock", space)
        .expect("lock workload")
        .setup_and_run(&conns, &spec)
        .await
        .expect("lock run");
    assert!(report.summary.ops >= 20, "{:?}", report.summary);
    assert_eq!(report.summary.errors, 0, "{:?}", report.summary);
    let ch = common::channel(&cluster.node(2).client)
        .await
        .expect("connect");
    let mut locks = shopkv::proto::lock_client::LockClient::new(ch);
    for i in 0..16 {
        let st = locks
            .inspect(shopkv::proto::InspectRequest {
                name: format!("w3/lock-{i:02}"),
            })
            .await
            .expect("inspect")
            .into_inner();
        assert!(
            st.holders.is_empty() && st.waiters.is_empty(),
            "lock {i} left held: {st:?}"
        );
    }
}
