//! Bad input gets a clear error, writes nothing, and panics no node.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{TestCluster, binary, free_port, get};
use shopkv::codec;
use shopkv::node::NodeError;
use shopkv::proto::{self, cluster_client::ClusterClient, peer_client::PeerClient};
use shopkv::sm::{Command as SmCommand, Response};
use tonic::Code;

fn bytes(n: usize) -> Vec<u8> {
    vec![b'x'; n]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_statuses_and_change_nothing() {
    let mut c = TestCluster::start_initialised(3, 2, &[]).await;
    let mut kv = c.kv(2).await;

    let put = |key: Vec<u8>, value: Vec<u8>| proto::PutRequest {
        key,
        value,
        fence: None,
    };
    let e = kv
        .put(put(Vec::new(), b"v".to_vec()))
        .await
        .expect_err("empty key");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("empty"), "{}", e.message());

    let e = kv
        .put(put(bytes(4097), b"v".to_vec()))
        .await
        .expect_err("long key");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("4096"), "{}", e.message());
    // A key of exactly the limit is fine.
    kv.put(put(bytes(4096), b"v".to_vec()))
        .await
        .expect("4096-byte key");

    let e = kv
        .put(put(b"big".to_vec(), bytes((1 << 20) + 1)))
        .await
        .expect_err("big value");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("limit"), "{}", e.message());
    assert_eq!(
        get(&mut kv, "big", false).await.expect("get"),
        None,
        "rejected value was written"
    );

    let e = kv
        .compare_and_swap(proto::CompareAndSwapRequest {
            key: Vec::new(),
            expected_version: 0,
            value: Vec::new(),
            fence: None,
        })
        .await
        .expect_err("cas empty key");
    assert_eq!(e.code(), Code::InvalidArgument);

    for limit in [0, 10_001] {
        let e = kv
            .scan(proto::ScanRequest {
                prefix: Vec::new(),
                limit,
                serializable: false,
            })
            .await
            .expect_err("bad scan limit");
        assert_eq!(e.code(), Code::InvalidArgument, "limit {limit}");
    }
    let e = kv
        .get(proto::GetRequest {
            key: b"missing".to_vec(),
            serializable: false,
        })
        .await
        .expect_err("missing");
    assert_eq!(e.code(), Code::NotFound);

    // Unknown group on the peer port: NOT_FOUND inside the forwarded reply.
    let mut peer = PeerClient::new(
        common::channel(&c.node(1).peer)
            .await
            .expect("peer channel"),
    );
    let cmd = SmCommand::Put {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
    };
    let reply = peer
        .propose(proto::GroupMessage {
            group_id: 999,
            payload: codec::to_wire(&cmd).expect("encode"),
            hops_left: 1,
        })
        .await
        .expect("propose rpc")
        .into_inner();
    let res: Result<Response, NodeError> = codec::from_wire(&reply.payload).expect("decode");
    assert!(matches!(res, Err(NodeError::NotFound(_))), "{res:?}");
    // A command of the wrong kind for the group is refused inside apply.
    let res: Result<Response, NodeError> = codec::from_wire(
        &peer
            .propose(proto::GroupMessage {
                group_id: 0,
                payload: codec::to_wire(&cmd).expect("encode"),
                hops_left: 1,
            })
            .await
            .expect("propose rpc")
            .into_inner()
            .payload,
    )
    .expect("decode");
    assert_eq!(res, Ok(Response::WrongGroup));
    // Garbage payload.
    let reply = peer
        .propose(proto::GroupMessage {
            group_id: 1,
            payload: vec![0xff; 7],
            hops_left: 1,
        })
        .await
        .expect("propose rpc")
        .into_inner();
    let res: Result<Response, NodeError> = codec::from_wire(&reply.payload).expect("decode");
    assert!(matches!(res, Err(NodeError::InvalidArgument(_))), "{res:?}");

    // Init: bad shard count, and a second init of a formed cluster.
    let mut cl = ClusterClient::new(common::channel(&c.node(1).client).await.expect("channel"));
    let e = cl
        .init(proto::InitRequest {
            shards: 0,
            endpoints: c.endpoints(),
        })
        .await
        .expect_err("0 shards");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = cl
        .init(proto::InitRequest {
            shards: 2,
            endpoints: c.endpoints(),
        })
        .await
        .expect_err("re-init");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());

    // Nobody panicked; the cluster still serves.
    for id in 1..=3 {
        assert!(c.node_mut(id).is_running(), "node {id} exited");
    }
    let mut kv = c.kv(3).await;
    kv.put(put(b"still".to_vec(), b"ok".to_vec()))
        .await
        .expect("cluster still writable");
}

fn serve(args: &[&str]) -> (bool, String) {
    let out = Command::new(binary())
        .arg("serve")
        .args(args)
        .output()
        .expect("run shopkv serve");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_startup_config_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    let (p, q) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );

    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "id = \"one\"\n").expect("write config");
    let (ok, err) = serve(&[
        "--config",
        cfg.to_str().expect("path"),
        "--data-dir",
        d,
        "--peer-addr",
        &p,
        "--client-addr",
        &q,
    ]);
    assert!(!ok && err.contains("malformed config file"), "{err}");

    let (ok, err) = serve(&[
        "--id",
        "0",
        "--data-dir",
        d,
        "--peer-addr",
        &p,
        "--client-addr",
        &q,
    ]);
    assert!(!ok && err.contains("`id`"), "{err}");

    let (ok, err) = serve(&[
        "--id",
        "1",
        "--data-dir",
        d,
        "--peer-addr",
        &p,
        "--client-addr",
        &p,
    ]);
    assert!(!ok && err.contains("client_addr"), "{err}");

    let (ok, err) = serve(&["--id", "1", "--data-dir", d, "--peer-addr", &p]);
    assert!(!ok && err.contains("client_addr"), "{err}");

    // Settings from SHOPKV_* environment variables are validated the same way.
    let out = Command::new(binary())
        .arg("serve")
        .env("SHOPKV_ID", "0")
        .env("SHOPKV_DATA_DIR", d)
        .env("SHOPKV_PEER_ADDR", &p)
        .env("SHOPKV_CLIENT_ADDR", &q)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("`id`"), "{err}");

    // Peer address already in use.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_addr = busy.local_addr().expect("addr").to_string();
    let (ok, err) = serve(&[
        "--id",
        "1",
        "--data-dir",
        d,
        "--peer-addr",
        &busy_addr,
        "--client-addr",
        &q,
    ]);
    assert!(
        !ok && err.contains("cannot listen on peer address") && err.contains(&busy_addr),
        "{err}"
    );
    drop(busy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_configured_only_by_environment_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, q) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let mut child = Command::new(binary())
        .arg("serve")
        .env("SHOPKV_ID", "7")
        .env("SHOPKV_DATA_DIR", dir.path())
        .env("SHOPKV_PEER_ADDR", &p)
        .env("SHOPKV_CLIENT_ADDR", &q)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut ident = None;
    for _ in 0..100 {
        if let Ok(ch) = common::channel(&q).await
            && let Ok(r) = ClusterClient::new(ch)
                .identity(proto::IdentityRequest {})
                .await
        {
            ident = r.into_inner().node;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let ident = ident.expect("node answered");
    assert_eq!((ident.id, ident.peer_addr.as_str()), (7, p.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_another_node_is_refused() {
    let mut c = TestCluster::start(1, &[]);
    // Wait for node 1 to have written its identity, then stop it.
    for _ in 0..100 {
        if c.status(1).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.kill(1);
    let d = c.node(1).dir.to_str().expect("path").to_string();
    let (p, q) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let (ok, err) = serve(&[
        "--id",
        "2",
        "--data-dir",
        &d,
        "--peer-addr",
        &p,
        "--client-addr",
        &q,
    ]);
    assert!(
        !ok && err.contains("belongs to node 1, not node 2"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_another_cluster_is_kept_out() {
    // Cluster A: one node, id 2, initialised on its own.
    let a_tmp = tempfile::tempdir().expect("tempdir");
    let a_dir2 = a_tmp.path().join("a-node2");
    let (ap, ac) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let spawn = |dir: &std::path::Path, peer: &str, client: &str| {
        Command::new(binary())
            .args(["serve", "--id", "2", "--data-dir"])
            .arg(dir)
            .args(["--peer-addr", peer, "--client-addr", client])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn")
    };
    let mut a2 = spawn(&a_dir2, &ap, &ac);
    let mut cl = None;
    for _ in 0..100 {
        if let Ok(ch) = common::channel(&ac).await {
            cl = Some(ClusterClient::new(ch));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut cl = cl.expect("cluster A node up");
    let a_id = cl
        .init(proto::InitRequest {
            shards: 1,
            endpoints: vec![ac.clone()],
        })
        .await
        .expect("init A")
        .into_inner()
        .cluster_id;
    let _ = a2.kill();
    let _ = a2.wait();

    // Cluster B: three nodes. Replace its node 2 with A's data dir on B's addresses.
    let mut b = TestCluster::start_initialised(3, 2, &[]).await;
    let b_id = b.status(1).await.expect("status").cluster_id;
    assert_ne!(a_id, b_id);
    b.kill(2);
    let (bp, bc) = (b.node(2).peer.clone(), b.node(2).client.clone());
    let mut intruder = spawn(&a_dir2, &bp, &bc);

    // B keeps working, and its status shows node 2 as not a member.
    let mut kv = b.kv(1).await;
    for i in 0..10 {
        let mut done = false;
        for _ in 0..100 {
            if common::put(&mut kv, &format!("b-{i}"), "v").await.is_ok() {
                done = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(done, "cluster B not writable with an intruder at node 2");
    }
    let mut flagged = false;
    for _ in 0..50 {
        let s = b.status(1).await.expect("status");
        let n2 = s
            .nodes
            .iter()
            .find(|n| n.node.as_ref().map(|i| i.id) == Some(2))
            .expect("node 2");
        if !n2.reachable && n2.error.contains("another cluster") {
            flagged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(flagged, "status did not flag the intruder");
    // The intruder still belongs to A and took none of B's data.
    let mut icl = ClusterClient::new(common::channel(&bc).await.expect("intruder up"));
    let ident = icl
        .identity(proto::IdentityRequest {})
        .await
        .expect("identity")
        .into_inner();
    assert_eq!(ident.cluster_id, a_id);
    let mut ikv =
        shopkv::proto::kv_client::KvClient::new(common::channel(&bc).await.expect("intruder"));
    assert_eq!(
        get(&mut ikv, "b-0", true).await.expect("intruder get"),
        None,
        "B's data reached A's data dir"
    );
    let _ = intruder.kill();
    let _ = intruder.wait();
}
