//! The `shopkv` CLI against a real cluster: output shapes, global flags
//! anywhere on the line, exit codes.

mod common;

use std::process::Command;

use common::{TestCluster, binary};

/// Runs the CLI; returns (exit code, stdout, stderr).
fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary())
        .args(args)
        .env_remove("SHOPKV_ENDPOINTS")
        .output()
        .expect("run shopkv");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_and_cluster_commands_print_and_exit_like_etcdctl() {
    let c = TestCluster::start_initialised(3, 4, &[]).await;
    let eps = c.endpoints().join(",");

    // --endpoints before the subcommand, table output.
    let (code, out, err) = cli(&["--endpoints", &eps, "kv", "put", "greeting", "hello world"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("OK version="), "{out}");

    // --endpoints after the subcommand; get prints the value alone.
    let (code, out, err) = cli(&["kv", "get", "greeting", "--endpoints", &eps]);
    assert_eq!((code, out.as_str()), (0, "hello world\n"), "{err}");

    // -w json in the middle of the line.
    let (code, out, err) = cli(&["kv", "-w", "json", "get", "greeting", "--endpoints", &eps]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json output");
    assert_eq!(v["value"], "hello world");
    let version = v["version"].as_u64().expect("version");
    assert!(version > 0);

    // Missing key: exit 1, one line saying "not found".
    let (code, out, err) = cli(&["kv", "get", "nope", "--endpoints", &eps]);
    assert_eq!(code, 1);
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("not found") && err.trim().lines().count() == 1,
        "{err}"
    );

    // CAS: wrong version fails with exit 1, right version succeeds.
    let (code, _, err) = cli(&[
        "kv",
        "cas",
        "greeting",
        &(version + 1000).to_string(),
        "x",
        "--endpoints",
        &eps,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("version mismatch"), "{err}");
    let (code, out, err) = cli(&[
        "kv",
        "cas",
        "greeting",
        &version.to_string(),
        "bonjour",
        "--endpoints",
        &eps,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("OK version="), "{out}");
    let (_, out, _) = cli(&["kv", "get", "greeting", "--endpoints", &eps]);
    assert_eq!(out, "bonjour\n");

    // Scan and delete.
    for k in ["p/a", "p/b", "q/c"] {
        assert_eq!(cli(&["kv", "put", k, "1", "--endpoints", &eps]).0, 0);
    }
    let (code, out, _) = cli(&["-w", "json", "kv", "scan", "p/", "--endpoints", &eps]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let keys: Vec<_> = v["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["key"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(keys, ["p/a", "p/b"]);
    let (code, out, _) = cli(&["kv", "del", "p/a", "--endpoints", &eps]);
    assert_eq!((code, out.as_str()), (0, "1\n"));
    let (code, out, _) = cli(&["kv", "del", "p/a", "--endpoints", &eps]);
    assert_eq!((code, out.as_str()), (0, "0\n"));

    // Bad input: exit 1 with the server's reason.
    let (code, _, err) = cli(&["kv", "scan", "p/", "--limit", "0", "--endpoints", &eps]);
    assert_eq!(code, 1);
    assert!(err.contains("limit"), "{err}");

    // Endpoints from the environment; status as JSON shows every group's leader.
    let out = Command::new(binary())
        .args(["cluster", "status", "-w", "json"])
        .env("SHOPKV_ENDPOINTS", &eps)
        .output()
        .expect("run");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    let groups = v["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 5);
    for g in groups {
        assert_ne!(g["leader"].as_u64(), Some(0), "{g}");
        assert_eq!(g["replicas"].as_array().map(Vec::len), Some(3), "{g}");
        for r in g["replicas"].as_array().into_iter().flatten() {
            assert!(r["commit_index"].as_u64().is_some() && r["applied_index"].as_u64().is_some());
        }
    }

    // Nothing listening: exit 1 with a reason.
    let (code, _, err) = cli(&["kv", "get", "x", "--endpoints", "127.0.0.1:1"]);
    assert_eq!(code, 1);
    assert!(err.starts_with("error: cannot reach"), "{err}");
}
