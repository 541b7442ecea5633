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

/// Runs the CLI against `eps`, expecting success; returns stdout.
fn ok(eps: &str, args: &[&str]) -> String {
    let mut all = vec!["--endpoints", eps];
    all.extend_from_slice(args);
    let (code, out, err) = cli(&all);
    assert_eq!(code, 0, "shopkv {args:?}: {err}");
    out
}

/// Runs the CLI against `eps` with `-w json`, expecting success.
fn ok_json(eps: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["-w", "json"];
    all.extend_from_slice(args);
    let out = ok(eps, &all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed {out:?}: {e}"))
}

/// Runs the CLI against `eps`, expecting exit 1; returns stderr.
fn fails(eps: &str, args: &[&str]) -> String {
    let mut all = vec!["--endpoints", eps];
    all.extend_from_slice(args);
    let (code, out, err) = cli(&all);
    assert_eq!(code, 1, "shopkv {args:?} should fail: {out}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commerce_commands_have_the_documented_shapes() {
    let c = TestCluster::start_initialised(3, 1, &[]).await;
    let eps = c.endpoints().join(",");

    // product put / get / list
    let out = ok(
        &eps,
        &[
            "product",
            "put",
            "TEE",
            "--title",
            "T-shirt",
            "--price",
            "1999",
            "--currency",
            "EUR",
            "--max-per-order",
            "5",
        ],
    );
    assert!(out.starts_with("OK TEE version="), "{out}");
    ok(
        &eps,
        &[
            "product",
            "put",
            "MUG",
            "--title",
            "Mug",
            "--price",
            "899",
            "--currency",
            "EUR",
            "--attr",
            "colour=blue",
        ],
    );
    let p = ok_json(&eps, &["product", "get", "MUG"]);
    assert_eq!(
        (p["price_minor"].as_i64(), p["currency"].as_str()),
        (Some(899), Some("EUR"))
    );
    assert_eq!(p["attributes"]["colour"], "blue");
    let out = ok(&eps, &["product", "get", "TEE"]);
    assert!(
        out.contains("19.99 EUR") && out.contains("T-shirt"),
        "{out}"
    );
    let list = ok(&eps, &["product", "list"]);
    let skus: Vec<&str> = list.lines().filter_map(|l| l.split('\t').next()).collect();
    assert_eq!(skus, ["MUG", "TEE"]);
    assert!(fails(&eps, &["product", "get", "NOPE"]).contains("UNKNOWN_SKU"));

    // stock set / adjust ±N / get -w json
    ok(&eps, &["stock", "set", "TEE", "10"]);
    ok(&eps, &["stock", "set", "MUG", "4"]);
    let s = ok_json(&eps, &["stock", "adjust", "TEE", "+5"]);
    assert_eq!(s["on_hand"], 15);
    let s = ok_json(&eps, &["stock", "adjust", "TEE", "-3"]);
    assert_eq!(s["on_hand"], 12);
    let s = ok_json(&eps, &["stock", "get", "TEE"]);
    assert_eq!(
        (s["on_hand"].as_i64(), s["reserved"].as_i64()),
        (Some(12), Some(0))
    );
    assert!(fails(&eps, &["stock", "adjust", "TEE", "-13"]).contains("BAD_QUANTITY"));

    // cart add / rm / show
    ok(&eps, &["cart", "add", "alice", "TEE", "2"]);
    ok(&eps, &["cart", "add", "alice", "MUG", "1"]);
    let out = ok(&eps, &["cart", "add", "alice", "MUG", "1"]);
    assert_eq!(out, "TEE\t2\nMUG\t2\n");
    let out = ok(&eps, &["cart", "rm", "alice", "MUG"]);
    assert_eq!(out, "TEE\t2\n");
    let cart = ok_json(&eps, &["cart", "show", "alice"]);
    assert_eq!(cart["lines"][0]["quantity"], 2);
    assert!(fails(&eps, &["cart", "add", "alice", "TEE", "9"]).contains("OVER_MAX_PER_ORDER"));

    // order place (lines and --from-cart) / get / pay / ship / deliver / cancel / list
    let o = ok_json(
        &eps,
        &[
            "order",
            "place",
            "bob",
            "--order-id",
            "o-1",
            "TEE:1",
            "MUG:2",
        ],
    );
    assert_eq!(
        (o["status"].as_str(), o["total_minor"].as_i64()),
        (Some("pending_payment"), Some(1999 + 2 * 899))
    );
    let again = ok_json(
        &eps,
        &[
            "order",
            "place",
            "bob",
            "--order-id",
            "o-1",
            "TEE:1",
            "MUG:2",
        ],
    );
    assert_eq!(again["version"], o["version"], "idempotent by order id");
    let o2 = ok_json(
        &eps,
        &[
            "order",
            "place",
            "alice",
            "--order-id",
            "o-2",
            "--from-cart",
        ],
    );
    assert_eq!(o2["lines"][0]["sku"], "TEE");
    assert_eq!(
        ok(&eps, &["cart", "show", "alice"]),
        "cart of alice is empty\n"
    );
    let s = ok_json(&eps, &["stock", "get", "TEE"]);
    assert_eq!(s["reserved"], 3);
    assert!(
        fails(&eps, &["order", "pay", "o-1", "--card", "4000000000000002"])
            .contains("PAYMENT_DECLINED")
    );
    let paid = ok_json(&eps, &["order", "pay", "o-1"]);
    assert_eq!(paid["status"], "paid");
    assert_eq!(paid["payment"]["captured_minor"], paid["total_minor"]);
    let out = ok(&eps, &["order", "ship", "o-1"]);
    assert!(out.contains("status=shipped"), "{out}");
    ok(&eps, &["order", "deliver", "o-1"]);
    assert_eq!(
        ok_json(&eps, &["order", "get", "o-1"])["status"],
        "delivered"
    );
    assert!(fails(&eps, &["order", "cancel", "o-1"]).contains("ILLEGAL_TRANSITION"));
    let cancelled = ok_json(&eps, &["order", "cancel", "o-2"]);
    assert_eq!(cancelled["status"], "cancelled");
    let s = ok_json(&eps, &["stock", "get", "TEE"]);
    assert_eq!(
        (s["on_hand"].as_i64(), s["reserved"].as_i64()),
        (Some(11), Some(0))
    );
    let list = ok(&eps, &["order", "list", "bob"]);
    assert!(list.starts_with("o-1\tdelivered\t"), "{list}");
    assert!(fails(&eps, &["order", "get", "o-9"]).contains("UNKNOWN_ORDER"));
    assert!(fails(&eps, &["order", "place", "bob", "NOPE:1"]).contains("UNKNOWN_SKU"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_commands_create_keep_alive_and_close() {
    let c = TestCluster::start_initialised(3, 1, &[]).await;
    let eps = c.endpoints().join(",");
    let id = ok(&eps, &["session", "create", "--ttl-ms", "2000"]);
    let id = id.trim().to_string();
    assert!(id.parse::<u64>().is_ok(), "prints the id alone: {id:?}");
    let v = ok_json(&eps, &["session", "get", &id]);
    assert_eq!(v["ttl_ms"], 2000);

    // `session keepalive` holds it past 2x its TTL; once stopped, it expires.
    let mut keeper = Command::new(binary())
        .args(["session", "keepalive", &id, "--endpoints", &eps])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn keepalive");
    std::thread::sleep(std::time::Duration::from_millis(5000));
    let still = ok_json(&eps, &["session", "get", &id]);
    assert!(still["remaining_ms"].as_u64().unwrap_or(0) > 0, "{still}");
    let _ = keeper.kill();
    let _ = keeper.wait();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(6);
    loop {
        let (code, _, err) = cli(&["session", "get", &id, "--endpoints", &eps]);
        if code == 1 {
            assert!(err.contains("no session"), "{err}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "session outlived its keepalive"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let other = ok(&eps, &["session", "create", "--ttl-ms", "5000"]);
    let out = ok(&eps, &["session", "close", other.trim()]);
    assert!(out.starts_with("OK closed"), "{out}");
    assert!(fails(&eps, &["session", "close", other.trim()]).contains("no session"));
    assert!(fails(&eps, &["session", "create", "--ttl-ms", "10"]).contains("ttl_ms"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_under_a_lock_writes_with_its_fencing_token_and_a_stale_one_fails() {
    let c = TestCluster::start_initialised(3, 1, &[]).await;
    let eps = c.endpoints().join(",");
    // The command writes with the token it was given: accepted.
    let script = format!(
        "{} kv put report/owner first --fence jobs/report:$SHOPKV_FENCING_TOKEN --endpoints {eps} && echo $SHOPKV_FENCING_TOKEN",
        binary()
    );
    let out = ok(
        &eps,
        &["lock", "acquire", "jobs/report", "--", "sh", "-c", &script],
    );
    let first: u64 = out
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("token printed");
    // A later holder writes with its (higher) token.
    let script = format!(
        "{} kv put report/owner second --fence jobs/report:$SHOPKV_FENCING_TOKEN --endpoints {eps}",
        binary()
    );
    ok(
        &eps,
        &["lock", "acquire", "jobs/report", "--", "sh", "-c", &script],
    );
    // The first holder's token is now stale: refused, value unchanged.
    let fence = format!("jobs/report:{first}");
    let err = fails(
        &eps,
        &["kv", "put", "report/owner", "late", "--fence", &fence],
    );
    assert!(err.contains("stale fencing token"), "{err}");
    assert!(
        fails(&eps, &["kv", "del", "report/owner", "--fence", &fence])
            .contains("stale fencing token")
    );
    assert_eq!(ok(&eps, &["kv", "get", "report/owner"]), "second\n");
    // Commerce writes take the same --fence.
    ok(
        &eps,
        &[
            "product",
            "put",
            "FEN-1",
            "--title",
            "Fenced",
            "--price",
            "100",
            "--currency",
            "EUR",
        ],
    );
    let script = format!(
        "{} stock set FEN-1 10 --fence jobs/report:$SHOPKV_FENCING_TOKEN --endpoints {eps}",
        binary()
    );
    ok(
        &eps,
        &["lock", "acquire", "jobs/report", "--", "sh", "-c", &script],
    );
    let err = fails(&eps, &["stock", "adjust", "FEN-1", "-3", "--fence", &fence]);
    assert!(
        err.starts_with("error: STALE_FENCE: stale fencing token"),
        "{err}"
    );
    assert!(
        fails(
            &eps,
            &["order", "place", "cust-1", "FEN-1:1", "--fence", &fence]
        )
        .contains("STALE_FENCE")
    );
    assert_eq!(
        ok_json(&eps, &["stock", "get", "FEN-1"])["on_hand"],
        10,
        "the stale adjustment changed nothing"
    );
    // A malformed fence is a usage error (clap's exit code 2), naming the format.
    let (code, _, err) = cli(&[
        "kv",
        "put",
        "k",
        "v",
        "--fence",
        "no-token",
        "--endpoints",
        &eps,
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("LOCK:TOKEN"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_one_line_per_change_and_resumes_from_a_revision() {
    let c = TestCluster::start_initialised(3, 1, &[]).await;
    let eps = c.endpoints().join(",");
    ok(&eps, &["kv", "put", "cart/a", "1"]);
    ok(&eps, &["kv", "put", "other", "x"]);
    ok(&eps, &["kv", "put", "cart/b", "2"]);
    ok(&eps, &["kv", "del", "cart/a"]);

    // Replayed from the shard's first revision: the three changes under the prefix.
    let out = ok(&eps, &["watch", "cart/", "--rev", "1:1", "--limit", "3"]);
    let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(
        (lines[0][0], lines[0][2], lines[0][3]),
        ("PUT", "cart/a", "1"),
        "{out}"
    );
    assert_eq!((lines[1][0], lines[1][2]), ("PUT", "cart/b"), "{out}");
    assert_eq!((lines[2][0], lines[2][2]), ("DELETE", "cart/a"), "{out}");
    assert!(lines[0][1].starts_with("1:"), "GROUP:REVISION: {out}");

    // Resuming one past the second change's revision gives only the third.
    let rev: u64 = lines[1][1][2..].parse().expect("revision");
    let v = ok_json(
        &eps,
        &[
            "watch",
            "cart/",
            "--rev",
            &format!("1:{}", rev + 1),
            "--limit",
            "1",
        ],
    );
    assert_eq!(v["kind"], "DELETE");
    assert_eq!(v["key"], "cart/a");

    // Live: a watch started now sees a write made after it.
    let child = Command::new(binary())
        .args(["watch", "live/", "--limit", "1", "--endpoints", &eps])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn watch");
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !waiter.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "watch {pid} saw nothing"
        );
        ok(&eps, &["kv", "put", "live/x", "now"]);
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let out = waiter.join().expect("join").expect("watch output");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("PUT 1:") && text.trim_end().ends_with("live/x now"),
        "{text}"
    );

    // Usage: a target is needed; --rev must be GROUP:REVISION.
    let (code, _, _) = cli(&["watch", "--endpoints", &eps]);
    assert_eq!(code, 2);
    let (code, _, err) = cli(&["watch", "x", "--rev", "7", "--endpoints", &eps]);
    assert_eq!(code, 2, "{err}");
}
