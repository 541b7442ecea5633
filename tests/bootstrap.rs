//! `cluster/bootstrap.sh --nodes 5` forms a cluster where every group has
//! three replicas (the meta group all five) and a leader; re-running it on the
//! same data restarts stopped nodes without re-initialising.

mod common;

use std::path::Path;
use std::process::Command;

use common::binary;
use shopkv::proto::{self, cluster_client::ClusterClient};

fn script(name: &str) -> String {
    format!("{}/cluster/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A base port P with P+2..=P+11 free, outside the kernel's ephemeral range
/// (see `common::free_port`). Each call starts its search elsewhere: tests
/// running at once in this process would otherwise find the same free range
/// before either binds it.
fn free_base_port() -> u16 {
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let start = std::process::id()
        .wrapping_mul(7)
        .wrapping_add(call * 2_600);
    (0..200u32)
        .map(|i| common::port_outside_ephemeral(start.wrapping_add(i * 13), 12))
        .find(|p| (2..=11).all(|o| std::net::TcpListener::bind(("127.0.0.1", p + o)).is_ok()))
        .expect("a free port range")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run script");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "script failed: {text}");
    text
}

async fn status(endpoints: &str) -> proto::StatusResponse {
    let first = endpoints.split(',').next().expect("an endpoint");
    let mut c = ClusterClient::new(common::channel(first).await.expect("connect"));
    c.status(proto::StatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

fn stop(dir: &Path) {
    run(Command::new("bash")
        .arg(script("stop.sh"))
        .arg("--data-dir")
        .arg(dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_five_nodes_then_restart_without_reinit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = free_base_port().to_string();
    let boot = || {
        let mut cmd = Command::new("bash");
        cmd.arg(script("bootstrap.sh"))
            .args(["--nodes", "5", "--base-port", &base, "--data-dir"])
            .arg(dir.path())
            .env("SHOPKV_BIN", binary());
        cmd
    };
    let out = run(&mut boot());
    let endpoints = std::fs::read_to_string(dir.path().join("endpoints")).expect("endpoints file");
    let endpoints = endpoints.trim().to_string();
    assert_eq!(endpoints.split(',').count(), 5);
    assert!(
        out.lines().any(|l| l.trim() == endpoints),
        "endpoints not printed: {out}"
    );
    for i in 1..=5 {
        assert!(
            dir.path().join(format!("n{i}/shopkv.pid")).exists(),
            "no pid file for node {i}"
        );
        assert!(
            dir.path().join(format!("n{i}/shopkv.log")).exists(),
            "no log for node {i}"
        );
    }

    let s = status(&endpoints).await;
    // Default: one shard per node.
    assert_eq!(s.shards, 5);
    assert_eq!(s.groups.len(), 6);
    for g in &s.groups {
        let want = if g.group_id == 0 { 5 } else { 3 };
        assert_eq!(
            g.members.len(),
            want,
            "group {} members {:?}",
            g.group_id,
            g.members
        );
        assert_eq!(
            g.replicas.len(),
            want,
            "group {} replicas reporting",
            g.group_id
        );
        assert_ne!(g.leader, 0, "group {} has no leader", g.group_id);
        assert!(g.members.contains(&g.leader));
    }
    let cluster_id = s.cluster_id;

    // Every node accepts every request, also for shards it does not host.
    let eps: Vec<&str> = endpoints.split(',').collect();
    for (i, ep) in eps.iter().enumerate() {
        let mut kv =
            shopkv::proto::kv_client::KvClient::new(common::channel(ep).await.expect("connect"));
        for j in 0..8 {
            let key = format!("five-{i}-{j}");
            common::put(&mut kv, &key, "v")
                .await
                .expect("put via any node");
        }
    }
    for ep in &eps {
        let mut kv =
            shopkv::proto::kv_client::KvClient::new(common::channel(ep).await.expect("connect"));
        for i in 0..eps.len() {
            for j in 0..8 {
                let key = format!("five-{i}-{j}");
                assert_eq!(
                    common::get(&mut kv, &key, false)
                        .await
                        .expect("get")
                        .as_deref(),
                    Some("v"),
                    "{key} via {ep}"
                );
            }
        }
    }

    // Stop everything, write nothing, re-run: same cluster, not re-initialised.
    stop(dir.path());
    assert!(
        !dir.path().join("n1/shopkv.pid").exists(),
        "stop.sh left a pid file"
    );
    let out = run(&mut boot());
    assert!(!out.contains("initialised:"), "re-initialised: {out}");
    let s = status(&endpoints).await;
    assert_eq!(
        s.cluster_id, cluster_id,
        "cluster id changed across restart"
    );
    assert!(
        shopkv::cli::not_ready(&s).is_none(),
        "{:?}",
        shopkv::cli::not_ready(&s)
    );
    stop(dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_demo_loads_a_catalog_with_stock_on_every_shard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = free_base_port().to_string();
    let out = run(Command::new("bash")
        .arg(script("bootstrap.sh"))
        .args(["--nodes", "3", "--demo", "--base-port", &base, "--data-dir"])
        .arg(dir.path())
        .env("SHOPKV_BIN", binary()));
    assert!(out.contains("order place"), "prints commands to try: {out}");
    let endpoints = std::fs::read_to_string(dir.path().join("endpoints")).expect("endpoints");
    let first = endpoints
        .trim()
        .split(',')
        .next()
        .expect("endpoint")
        .to_string();
    let ch = common::channel(&first).await.expect("connect");
    let mut catalog = shopkv::proto::catalog_client::CatalogClient::new(ch.clone());
    let mut inventory = shopkv::proto::inventory_client::InventoryClient::new(ch);
    let mut skus = Vec::new();
    let mut token = String::new();
    loop {
        let page = catalog
            .list(proto::ListProductsRequest {
                page_size: 1000,
                page_token: token,
            })
            .await
            .expect("list")
            .into_inner();
        skus.extend(page.products.into_iter().map(|p| p.sku));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert!(skus.len() >= 1000, "{} products", skus.len());
    for sku in skus.iter().step_by(97) {
        let s = inventory
            .get(proto::GetStockRequest {
                sku: sku.clone(),
                serializable: false,
            })
            .await
            .expect("stock")
            .into_inner();
        assert!(s.on_hand > 0, "{sku} has no stock");
    }
    // Spread over every shard: each data group applied a share of the writes.
    let s = status(endpoints.trim()).await;
    for g in s.groups.iter().filter(|g| g.group_id != 0) {
        let applied = g
            .replicas
            .iter()
            .map(|r| r.applied_index)
            .max()
            .unwrap_or(0);
        assert!(applied > 300, "shard {} applied only {applied}", g.group_id);
    }
    stop(dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_refuses_ports_another_cluster_holds() {
    let first = tempfile::tempdir().expect("tempdir");
    let second = tempfile::tempdir().expect("tempdir");
    let base = free_base_port().to_string();
    let boot = |dir: &Path| {
        let mut cmd = Command::new("bash");
        cmd.arg(script("bootstrap.sh"))
            .args(["--nodes", "3", "--base-port", &base, "--data-dir"])
            .arg(dir)
            .env("SHOPKV_BIN", binary());
        cmd
    };
    run(&mut boot(first.path()));
    // Same ports, other data: its nodes cannot bind, and the first cluster's
    // answers must not pass for a cluster of its own.
    let out = boot(second.path()).output().expect("run script");
    let text = String::from_utf8_lossy(&out.stderr);
    let _ = std::process::Command::new("bash")
        .arg(script("stop.sh"))
        .arg("--data-dir")
        .arg(second.path())
        .output();
    stop(first.path());
    assert!(
        !out.status.success(),
        "bootstrap on ports another cluster holds succeeded: {}{text}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(text.contains("exited at start-up"), "{text}");
    assert!(
        !second.path().join("endpoints").exists() && !second.path().join("initialized").exists(),
        "the failed bootstrap wrote endpoints or marked itself initialised"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pid_file_naming_another_process_neither_skips_nor_kills_it() {
    // After a reboot a node's pid file may name an unrelated process:
    // bootstrap must start the node anyway, and stop.sh must not kill it.
    let dir = tempfile::tempdir().expect("tempdir");
    let base = free_base_port().to_string();
    let boot = || {
        let mut cmd = Command::new("bash");
        cmd.arg(script("bootstrap.sh"))
            .args(["--nodes", "3", "--base-port", &base, "--data-dir"])
            .arg(dir.path())
            .env("SHOPKV_BIN", binary());
        cmd
    };
    run(&mut boot());
    stop(dir.path());
    let mut stranger = Command::new("sleep")
        .arg("120")
        .spawn()
        .expect("spawn sleep");
    std::fs::write(dir.path().join("n1/shopkv.pid"), stranger.id().to_string())
        .expect("write pid file");
    let out = boot().output().expect("run script");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let restarted = out.status.success() && text.contains("started node 1");
    let endpoints = std::fs::read_to_string(dir.path().join("endpoints")).expect("endpoints");
    let ready = restarted && shopkv::cli::not_ready(&status(endpoints.trim()).await).is_none();
    stop(dir.path());
    // Stopped; now a stale pid file names the stranger.
    std::fs::write(dir.path().join("n2/shopkv.pid"), stranger.id().to_string())
        .expect("write pid file");
    stop(dir.path());
    let spared = stranger.try_wait().expect("try_wait").is_none();
    let _ = stranger.kill();
    let _ = stranger.wait();
    assert!(restarted, "node 1 was not started: {text}");
    assert!(ready, "the restarted cluster is not ready");
    assert!(spared, "stop.sh killed the process a stale pid file named");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_bind_its_port_is_reported_at_once_with_its_log() {
    // Any process may hold a port (an outgoing connection's, another
    // server's): the node exits at start-up, and bootstrap must say so and
    // why, not wait out its 30 s for an answer and point at the log.
    let dir = tempfile::tempdir().expect("tempdir");
    let base = free_base_port();
    let node2_peer = base + 4;
    let _holder = std::net::TcpListener::bind(("127.0.0.1", node2_peer)).expect("hold a port");
    let started = std::time::Instant::now();
    let out = Command::new("bash")
        .arg(script("bootstrap.sh"))
        .args([
            "--nodes",
            "3",
            "--base-port",
            &base.to_string(),
            "--data-dir",
        ])
        .arg(dir.path())
        .env("SHOPKV_BIN", binary())
        .output()
        .expect("run script");
    let took = started.elapsed();
    let _ = Command::new("bash")
        .arg(script("stop.sh"))
        .arg("--data-dir")
        .arg(dir.path())
        .output();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "bootstrap succeeded without node 2");
    assert!(text.contains("node 2 exited at start-up"), "{text}");
    assert!(
        text.contains(&format!(
            "cannot listen on peer address 127.0.0.1:{node2_peer}"
        )),
        "the node's own reason is not shown: {text}"
    );
    assert!(
        took < std::time::Duration::from_secs(15),
        "reported after {took:?}"
    );
}
