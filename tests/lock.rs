//! Fair locks on a real 3-node cluster: waiters acquire in FIFO order with
//! strictly increasing fencing tokens, shared holders coexist, a holder whose
//! process is SIGKILLed loses the lock after its session's TTL and the next
//! waiter gets a higher token, a waiter whose call ends leaves the queue (also
//! when the meta leader dies with that leave in flight), and `shopkv lock
//! acquire NAME -- COMMAND` hands COMMAND the token and releases afterwards;
//! a lock name whose holds are over is forgotten, fence records included.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestCluster, binary, channel};
use shopkv::proto;
use shopkv::proto::lock_client::LockClient;
use shopkv::proto::session_client::SessionClient;
use tonic::Code;
use tonic::transport::Channel;

async fn clients(c: &TestCluster, via: u64) -> (SessionClient<Channel>, LockClient<Channel>) {
    let ch = channel(&c.node(via).client).await.expect("connect");
    (SessionClient::new(ch.clone()), LockClient::new(ch))
}

async fn session(s: &mut SessionClient<Channel>, ttl_ms: u64) -> u64 {
    s.create(proto::CreateSessionRequest { ttl_ms })
        .await
        .expect("session")
        .into_inner()
        .session_id
}

fn acquire_req(name: &str, session: u64, shared: bool, wait_ms: u64) -> proto::AcquireRequest {
    proto::AcquireRequest {
        name: name.into(),
        session_id: session,
        mode: if shared {
            proto::LockMode::Shared
        } else {
            proto::LockMode::Exclusive
        } as i32,
        wait_timeout_ms: wait_ms,
    }
}

/// An exclusive Acquire of `name` by `session` that must hold within a
/// second; its fencing token.
async fn acquire_token(l: &mut LockClient<Channel>, name: &str, session: u64) -> u64 {
    l.acquire(acquire_req(name, session, false, 1000))
        .await
        .unwrap_or_else(|e| panic!("acquire {name} by session {session}: {e:?}"))
        .into_inner()
        .fencing_token
}

async fn inspect(l: &mut LockClient<Channel>, name: &str) -> proto::LockState {
    l.inspect(proto::InspectRequest { name: name.into() })
        .await
        .expect("inspect")
        .into_inner()
}

/// Waits until `name` has a waiter (a call started elsewhere has queued).
async fn wait_until_queued(l: &mut LockClient<Channel>, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while inspect(l, name).await.waiters.is_empty() {
        assert!(Instant::now() < deadline, "the waiter did not queue");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An exclusive Acquire of `name` by `session`, waiting up to `wait_ms`, as
/// a call of its own (abort it to drop the call: the client goes away).
fn spawn_acquire(
    l: &LockClient<Channel>,
    name: &'static str,
    session: u64,
    wait_ms: u64,
) -> tokio::task::JoinHandle<Result<tonic::Response<proto::AcquireResponse>, tonic::Status>> {
    let mut l = l.clone();
    tokio::spawn(async move { l.acquire(acquire_req(name, session, false, wait_ms)).await })
}

/// A ready 3-node cluster whose nodes run with `FAILPOINTS=spec`.
#[cfg(feature = "failpoints")]
async fn start_with_failpoints(spec: &str) -> TestCluster {
    let mut c = TestCluster::start_with_env(3, &[], &[("FAILPOINTS", spec)]);
    c.init(1).await;
    c.wait_ready(Duration::from_secs(30)).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_acquire_in_fifo_order_with_increasing_tokens() {
    let c = TestCluster::start_initialised(3, 1, &[]).await;
    let (mut s, mut l) = clients(&c, 1).await;
    let a = session(&mut s, 10_000).await;
    let t1 = acquire_token(&mut l, "orders/flush", a).await;
    // Already held: a try-lock fails, and leaves no trace in the queue.
    let other = session(&mut s, 10_000).await;
    let e = l
        .acquire(acquire_req("orders/flush", other, false, 0))
        .await
        .expect_err("held");
    assert_eq!(e.code(), Code::FailedPrecondition);
    // B then C queue (through other nodes); each waits for its turn.
    let mut waiters = Vec::new();
    for via in [2u64, 3] {
        let (mut s2, mut l2) = clients(&c, via).await;
        let id = session(&mut s2, 10_000).await;
        let st = inspect(&mut l, "orders/flush").await;
        let queued = st.waiters.len();
        waiters.push((
            id,
            tokio::spawn(async move {
                l2.acquire(acquire_req("orders/flush", id, false, 20_000))
                    .await
                    .map(|r| r.into_inner().fencing_token)
            }),
        ));
        // Wait until it is in the queue before the next one joins.
        let deadline = Instant::now() + Duration::from_secs(5);
        while inspect(&mut l, "orders/flush").await.waiters.len() == queued {
            assert!(Instant::now() < deadline, "waiter did not queue");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let st = inspect(&mut l, "orders/flush").await;
    assert_eq!(st.holders.len(), 1);
    assert_eq!(st.holders[0].session_id, a);
    let info = s
        .get(proto::GetSessionRequest { session_id: a })
        .await
        .expect("session get")
        .into_inner();
    assert_eq!(
        info.locks,
        vec!["orders/flush".to_string()],
        "Get lists owned locks"
    );
    let order: Vec<u64> = st.waiters.iter().map(|w| w.session_id).collect();
    assert_eq!(order, vec![waiters[0].0, waiters[1].0], "FIFO");

    l.release(proto::ReleaseRequest {
        name: "orders/flush".into(),
        session_id: a,
    })
    .await
    .expect("release");
    let (b, tb) = waiters.remove(0);
    let t2 = tb.await.expect("task").expect("B acquires");
    assert!(t2 > t1, "tokens increase: {t1} then {t2}");
    assert_eq!(
        inspect(&mut l, "orders/flush").await.holders[0].session_id,
        b
    );
    // Closing B's session releases its lock in the same apply: C is next.
    s.close(proto::CloseSessionRequest { session_id: b })
        .await
        .expect("close");
    let (_, tc) = waiters.remove(0);
    let t3 = tc.await.expect("task").expect("C acquires");
    assert!(t3 > t2, "tokens increase: {t2} then {t3}");
    let e = l
        .release(proto::ReleaseRequest {
            name: "orders/flush".into(),
            session_id: a,
        })
        .await
        .expect_err("not in the queue");
    assert_eq!(e.code(), Code::NotFound);

    // Shared holders coexist; an exclusive one waits for both.
    let r1 = session(&mut s, 10_000).await;
    let r2 = session(&mut s, 10_000).await;
    for r in [r1, r2] {
        l.acquire(acquire_req("catalog/read", r, true, 1000))
            .await
            .expect("shared acquire");
    }
    assert_eq!(inspect(&mut l, "catalog/read").await.holders.len(), 2);
    let w = session(&mut s, 10_000).await;
    let e = l
        .acquire(acquire_req("catalog/read", w, false, 300))
        .await
        .expect_err("writer waits for readers");
    assert_eq!(e.code(), Code::DeadlineExceeded);
    assert!(
        inspect(&mut l, "catalog/read").await.waiters.is_empty(),
        "a timed-out waiter leaves"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_loses_the_lock_after_its_ttl_and_the_cli_passes_the_token() {
    let c = TestCluster::start_initialised(3, 1, &[]).await;
    let eps = c.endpoints().join(",");
    let (mut s, mut l) = clients(&c, 2).await;

    // `lock acquire -- COMMAND` gives COMMAND the token and frees the lock after.
    let out = Command::new(binary())
        .args([
            "lock",
            "acquire",
            "jobs/nightly",
            "--endpoints",
            &eps,
            "--",
            "sh",
            "-c",
        ])
        .arg("echo token=$SHOPKV_FENCING_TOKEN; exit 3")
        .output()
        .expect("run lock acquire");
    assert_eq!(out.status.code(), Some(3), "exit code of the command");
    let text = String::from_utf8_lossy(&out.stdout);
    let token: u64 = text
        .trim()
        .strip_prefix("token=")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no token in {text:?}"));
    assert!(token > 0);
    let st = inspect(&mut l, "jobs/nightly").await;
    assert!(st.holders.is_empty() && st.last_token == token, "{st:?}");

    // A holder process killed with SIGKILL: its session stops being kept alive.
    let mut holder = Command::new(binary())
        .args([
            "lock",
            "acquire",
            "jobs/nightly",
            "--ttl",
            "2",
            "--endpoints",
            &eps,
            "--",
            "sleep",
            "60",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn holder");
    let deadline = Instant::now() + Duration::from_secs(10);
    let held = loop {
        let st = inspect(&mut l, "jobs/nightly").await;
        if let Some(h) = st.holders.first() {
            break h.fencing_token;
        }
        assert!(Instant::now() < deadline, "holder never got the lock");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(held > token);
    let next = session(&mut s, 10_000).await;
    let waiter = tokio::spawn(async move {
        let started = Instant::now();
        let r = l
            .acquire(acquire_req("jobs/nightly", next, false, 15_000))
            .await
            .map(|r| r.into_inner().fencing_token);
        (r, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SAFETY: kill(2) on a child we spawned.
    unsafe {
        libc::kill(holder.id() as i32, libc::SIGKILL);
    }
    let _ = holder.wait();
    let (got, waited) = waiter.await.expect("task");
    let t = got.expect("the next waiter gets the lock");
    assert!(t > held, "higher token: {held} then {t}");
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(8),
        "passed on after {waited:?} (TTL 2 s)"
    );
}

/// Kleppmann's scenario: a holder pauses, loses the lock, the next holder
/// writes, and the old holder's late write — with its old token — is refused
/// by the store itself; the data keeps the new holder's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_with_a_superseded_fencing_token_is_refused_by_the_store() {
    let c = TestCluster::start_initialised(3, 2, &[]).await;
    let (mut s, mut l) = clients(&c, 1).await;
    let mut kv = c.kv(3).await;
    let fence = |token| {
        Some(proto::Fence {
            lock_name: "inventory/writer".into(),
            token,
        })
    };
    let put = |value: &str, token| proto::PutRequest {
        key: b"stock/sku-1".to_vec(),
        value: value.as_bytes().to_vec(),
        fence: fence(token),
    };
    let a = session(&mut s, 10_000).await;
    let ta = acquire_token(&mut l, "inventory/writer", a).await;
    kv.put(put("by A", ta))
        .await
        .expect("A writes with its token");
    // A "pauses"; its session ends and B takes over.
    s.close(proto::CloseSessionRequest { session_id: a })
        .await
        .expect("A's session ends");
    let b = session(&mut s, 10_000).await;
    let tb = acquire_token(&mut l, "inventory/writer", b).await;
    assert!(tb > ta);
    kv.put(put("by B", tb)).await.expect("B writes");
    // A wakes up and writes with its old token: refused, nothing changes.
    let e = kv.put(put("late A", ta)).await.expect_err("stale token");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("stale fencing token"), "{e:?}");
    let e = kv
        .delete(proto::DeleteRequest {
            key: b"stock/sku-1".to_vec(),
            fence: fence(ta),
        })
        .await
        .expect_err("stale delete");
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = kv
        .compare_and_swap(proto::CompareAndSwapRequest {
            key: b"stock/sku-1".to_vec(),
            expected_version: 0,
            value: b"x".to_vec(),
            fence: fence(ta),
        })
        .await
        .expect_err("stale cas");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        common::get(&mut kv, "stock/sku-1", false)
            .await
            .expect("get")
            .as_deref(),
        Some("by B")
    );
    let e = kv
        .put(proto::PutRequest {
            key: b"k".to_vec(),
            value: Vec::new(),
            fence: Some(proto::Fence {
                lock_name: String::new(),
                token: 1,
            }),
        })
        .await
        .expect_err("empty lock name");
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_name_leaves_nothing_behind_once_its_holds_are_over() {
    let c = TestCluster::start_initialised(3, 2, &["--lock-gc-interval-ms", "200"]).await;
    let (mut s, mut l) = clients(&c, 1).await;
    let mut kv = c.kv(2).await;
    let put = |key: &str, lock: &str, token| proto::PutRequest {
        key: key.as_bytes().to_vec(),
        value: b"v".to_vec(),
        fence: Some(proto::Fence {
            lock_name: lock.into(),
            token,
        }),
    };
    // A long hold taken first (an election's leader, a long job): its token
    // is older than every one below, and it must stay usable.
    let b = session(&mut s, 30_000).await;
    let tb = acquire_token(&mut l, "held", b).await;
    kv.put(put("kb", "held", tb)).await.expect("B writes");
    let a = session(&mut s, 10_000).await;
    let once = |i| format!("order/{i}");
    // Names used once: fenced writes on both shards, then released.
    let mut tokens = Vec::new();
    let mut fence_records = std::collections::BTreeSet::new();
    for i in 0..4 {
        let ta = acquire_token(&mut l, &once(i), a).await;
        for k in 0..4 {
            let key = format!("k{i}-{k}");
            kv.put(put(&key, &once(i), ta))
                .await
                .expect("fenced write while held");
            fence_records.insert((i, shopkv::router::shard_for(key.as_bytes(), 2)));
        }
        l.release(proto::ReleaseRequest {
            name: once(i),
            session_id: a,
        })
        .await
        .expect("release");
        tokens.push(ta);
    }

    // The idle locks are forgotten, and the shards drop their fence records
    // (all of them, and not the held lock's).
    let dropped = || -> usize {
        c.log_tails(10_000)
            .lines()
            .filter(|l| l.contains("fence records dropped"))
            .filter_map(|l| {
                l.split("records=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut idle = 0;
        for i in 0..4 {
            idle += u32::from(inspect(&mut l, &once(i)).await.last_token != 0);
        }
        let dropped = dropped();
        if idle == 0 && dropped >= fence_records.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{idle} idle locks left, {dropped} fence drops\n{}",
            c.log_tails(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(dropped(), fence_records.len(), "{fence_records:?}");
    // A token whose hold is over is refused — the record that would have
    // said so is gone, the shard's floor says it now — for its own lock and
    // any other; the held one is not.
    for (i, ta) in tokens.iter().enumerate() {
        let e = kv
            .put(put(&format!("k{i}-0"), &once(i), *ta))
            .await
            .expect_err("a token whose hold is over");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("stale fencing token"), "{e:?}");
    }
    let e = kv
        .put(put("elsewhere", "never-used", tokens[3]))
        .await
        .expect_err("an old token on a new name");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    kv.put(put("kb", "held", tb))
        .await
        .expect("the holder still writes");
    let st = inspect(&mut l, "held").await;
    assert_eq!(st.holders.len(), 1, "{st:?}");
    assert_eq!(st.holders[0].fencing_token, tb);
    // A forgotten name is a new lock whose next token is still larger.
    let again = acquire_token(&mut l, &once(0), a).await;
    assert!(again > tokens[3], "{again} after {}", tokens[3]);
    kv.put(put("k0-0", &once(0), again))
        .await
        .expect("the new holder writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commerce_writes_and_cross_shard_orders_with_a_superseded_token_are_refused() {
    use common::shop::{self, reason, skus_on_every_shard};
    let c = TestCluster::start_initialised(3, 2, &[]).await;
    let (mut s, mut l) = clients(&c, 1).await;
    let mut sh = shop::shop(&c, 2).await;
    let skus = skus_on_every_shard("FENCE", 2);
    for sku in &skus {
        sh.add_product(sku, 100, "EUR", 10).await;
    }
    let fence = |token| {
        Some(proto::Fence {
            lock_name: "warehouse".into(),
            token,
        })
    };
    let a = session(&mut s, 10_000).await;
    let ta = acquire_token(&mut l, "warehouse", a).await;
    s.close(proto::CloseSessionRequest { session_id: a })
        .await
        .expect("A's session ends");
    let b = session(&mut s, 10_000).await;
    let tb = acquire_token(&mut l, "warehouse", b).await;
    assert!(tb > ta);

    // B restocks the first SKU; A's late adjustment there is refused.
    sh.inventory
        .set_stock(proto::SetStockRequest {
            sku: skus[0].clone(),
            on_hand: 20,
            fence: fence(tb),
        })
        .await
        .expect("B restocks");
    let e = sh
        .inventory
        .adjust_stock(proto::AdjustStockRequest {
            sku: skus[0].clone(),
            delta: -5,
            fence: fence(ta),
        })
        .await
        .expect_err("A's token is stale");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(reason(&e), "STALE_FENCE");
    assert_eq!(sh.stock(&skus[0]).await.on_hand, 20);

    // A cross-shard order under A's token: the first SKU's shard votes NO
    // (the second has not seen B's token and would say yes): nothing is held.
    let order = |id: &str, token| proto::PlaceOrderRequest {
        order_id: id.into(),
        customer_id: "cust-f".into(),
        lines: skus
            .iter()
            .map(|s| proto::CartLine {
                sku: s.clone(),
                quantity: 1,
            })
            .collect(),
        from_cart: false,
        fence: fence(token),
    };
    let e = sh
        .orders
        .place(order("ord-fa", ta))
        .await
        .expect_err("stale order");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(reason(&e), "STALE_FENCE", "{e:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let levels = sh.stocks(&skus).await;
        if levels.iter().all(|(_, reserved)| *reserved == 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "held stock not released: {levels:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Under B's token the same order commits.
    let placed = sh
        .orders
        .place(order("ord-fb", tb))
        .await
        .expect("B's order")
        .into_inner();
    assert_eq!(placed.lines.len(), 2);
    assert_eq!(sh.stocks(&skus).await, vec![(20, 1), (10, 1)]);
    // A may neither pay nor cancel it; B may cancel it.
    let e = sh
        .orders
        .pay(proto::PayOrderRequest {
            order_id: "ord-fb".into(),
            card_number: "4242424242424242".into(),
            fence: fence(ta),
        })
        .await
        .expect_err("stale pay");
    assert_eq!(reason(&e), "STALE_FENCE");
    assert_eq!(
        sh.order("ord-fb").await.expect("order").status_name,
        "pending_payment",
        "nothing charged"
    );
    let e = sh
        .orders
        .cancel(proto::OrderIdRequest {
            order_id: "ord-fb".into(),
            fence: fence(ta),
        })
        .await
        .expect_err("stale cancel");
    assert_eq!(reason(&e), "STALE_FENCE");
    let cancelled = sh
        .orders
        .cancel(proto::OrderIdRequest {
            order_id: "ord-fb".into(),
            fence: fence(tb),
        })
        .await
        .expect("B cancels")
        .into_inner();
    assert_eq!(cancelled.status_name, "cancelled");
}

/// A holder process paused with SIGSTOP (a GC pause, a stalled VM) past its
/// session's TTL loses the lock; the next holder writes; when the paused
/// holder resumes, its write under the old token is refused by the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigstopped_holder_resumed_after_expiry_has_its_fenced_write_refused() {
    use std::os::unix::process::CommandExt;
    let c = TestCluster::start_initialised(3, 1, &[]).await;
    let eps = c.endpoints().join(",");
    let (mut s, mut l) = clients(&c, 3).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    // The holder writes once it holds, then waits for "go" and writes again.
    let script = format!(
        "shopkv_put() {{ {bin} kv put fenced/report \"$1\" --fence reports:$SHOPKV_FENCING_TOKEN; }}; \
         shopkv_put first || exit 9; echo $SHOPKV_FENCING_TOKEN > {d}/token; \
         while [ ! -f {d}/go ]; do sleep 0.05; done; \
         shopkv_put late 2> {d}/err; echo $? > {d}/rc",
        bin = binary()
    );
    let mut holder = Command::new(binary())
        .args([
            "lock", "acquire", "reports", "--ttl-ms", "2000", "--", "sh", "-c",
        ])
        .arg(&script)
        .env("SHOPKV_ENDPOINTS", &eps)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn holder");
    let token_file = dir.path().join("token");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !token_file.exists() {
        assert!(Instant::now() < deadline, "holder never wrote");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ta: u64 = std::fs::read_to_string(&token_file)
        .expect("token")
        .trim()
        .parse()
        .expect("token number");
    let pgid = holder.id() as i32;
    // SAFETY: signals to the process group of a child we spawned.
    unsafe {
        libc::kill(-pgid, libc::SIGSTOP);
    }
    let b = session(&mut s, 10_000).await;
    let started = Instant::now();
    let tb = l
        .acquire(acquire_req("reports", b, false, 15_000))
        .await
        .expect("B gets the lock once A's session expires")
        .into_inner()
        .fencing_token;
    assert!(tb > ta, "{ta} then {tb}");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "not before A's TTL"
    );
    let mut kv = c.kv(1).await;
    kv.put(proto::PutRequest {
        key: b"fenced/report".to_vec(),
        value: b"by B".to_vec(),
        fence: Some(proto::Fence {
            lock_name: "reports".into(),
            token: tb,
        }),
    })
    .await
    .expect("B writes");
    std::fs::write(dir.path().join("go"), b"").expect("go");
    // SAFETY: as above.
    unsafe {
        libc::kill(-pgid, libc::SIGCONT);
    }
    let rc_file = dir.path().join("rc");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !rc_file.exists() {
        assert!(
            Instant::now() < deadline,
            "resumed holder never finished its write"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rc = std::fs::read_to_string(&rc_file).expect("rc");
    let err = std::fs::read_to_string(dir.path().join("err")).unwrap_or_default();
    assert_eq!(rc.trim(), "1", "the late write fails: {err}");
    assert!(err.contains("stale fencing token"), "{err}");
    assert_eq!(
        common::get(&mut kv, "fenced/report", false)
            .await
            .expect("get")
            .as_deref(),
        Some("by B")
    );
    let _ = holder.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_call_ends_early_leaves_the_queue() {
    let c = TestCluster::start_initialised(3, 1, &[]).await;
    let (mut s, mut l) = clients(&c, 1).await;
    let holder = session(&mut s, 10_000).await;
    l.acquire(acquire_req("jobs/nightly", holder, false, 1000))
        .await
        .expect("holder acquires");
    let left = |mut l: LockClient<Channel>| async move {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let st = inspect(&mut l, "jobs/nightly").await;
            if st.waiters.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "a waiter whose call ended is still queued: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    // A waiter whose gRPC deadline (1 s) is shorter than its lock wait (30 s):
    // the call fails with DEADLINE_EXCEEDED and must not stay in the queue,
    // or the lock would pass to a session whose client was told it failed.
    let (_, mut l2) = clients(&c, 2).await;
    let timed = session(&mut s, 10_000).await;
    let mut req = tonic::Request::new(acquire_req("jobs/nightly", timed, false, 30_000));
    req.set_timeout(Duration::from_secs(1));
    let e = l2.acquire(req).await.expect_err("held by another");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    left(l.clone()).await;

    // A waiter whose client goes away (the call dropped: RST_STREAM).
    let (_, l3) = clients(&c, 3).await;
    let gone = session(&mut s, 10_000).await;
    let call = spawn_acquire(&l3, "jobs/nightly", gone, 30_000);
    wait_until_queued(&mut l, "jobs/nightly").await;
    call.abort();
    left(l.clone()).await;

    // Released, the lock is free: nobody who gave up was handed it.
    l.release(proto::ReleaseRequest {
        name: "jobs/nightly".into(),
        session_id: holder,
    })
    .await
    .expect("release");
    let next = session(&mut s, 10_000).await;
    l.acquire(acquire_req("jobs/nightly", next, false, 0))
        .await
        .expect("a try-lock finds the lock free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_call_ends_as_the_meta_leader_dies_leaves_once_one_is_back() {
    let mut c = TestCluster::start_initialised(3, 1, &[]).await;
    let leader = c.leader_of(0, 1).await.expect("a meta leader");
    let via = if leader == 1 { 2 } else { 1 };
    let (mut s, mut l) = clients(&c, via).await;
    // TTLs far beyond the test: only a leave can take the waiter out.
    let holder = session(&mut s, 60_000).await;
    l.acquire(acquire_req("jobs/hourly", holder, false, 1000))
        .await
        .expect("holder acquires");
    let gone = session(&mut s, 60_000).await;
    let call = spawn_acquire(&l, "jobs/hourly", gone, 60_000);
    wait_until_queued(&mut l, "jobs/hourly").await;
    // The caller goes away while the meta leader is stopped, which then
    // dies: the leave its node proposed on the caller's behalf was in flight
    // to it (outcome unknown), and must be proposed again to the next leader.
    c.pause(leader);
    call.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.kill(leader);
    c.wait_new_leader(0, leader, via, Duration::from_secs(10))
        .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // A read may meet the election's aftermath: only an answer counts.
        if let Ok(st) = l
            .inspect(proto::InspectRequest {
                name: "jobs/hourly".into(),
            })
            .await
            && st.get_ref().waiters.is_empty()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a waiter whose caller left while the meta leader was stopped is still queued: {:?}",
            l.inspect(proto::InspectRequest {
                name: "jobs/hourly".into(),
            })
            .await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With the `failpoints` feature only (`test.sh` runs this file again with
/// it): every node holds each Acquire's join back 1 s before proposing it.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_leaves_while_its_join_is_in_flight_is_not_queued_after_it() {
    let c = start_with_failpoints("lock-before-join=return(1000)").await;
    let (mut s, mut l) = clients(&c, 1).await;
    let holder = session(&mut s, 10_000).await;
    l.acquire(acquire_req("jobs/weekly", holder, false, 5_000))
        .await
        .expect("holder acquires");
    // The caller goes away after 300 ms (its call dropped: RST_STREAM), while
    // its join is still held back: its leave must come after the join, or
    // the join queues the session for good and it is later handed a lock
    // its client was told nothing of.
    let gone = session(&mut s, 10_000).await;
    let call = spawn_acquire(&l, "jobs/weekly", gone, 30_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    call.abort();
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let st = inspect(&mut l, "jobs/weekly").await;
    assert!(
        st.waiters.is_empty(),
        "a session whose caller left during its join stayed queued: {st:?}"
    );
    l.release(proto::ReleaseRequest {
        name: "jobs/weekly".into(),
        session_id: holder,
    })
    .await
    .expect("release");
    let st = inspect(&mut l, "jobs/weekly").await;
    assert!(st.holders.is_empty(), "the lock passed on to {st:?}");
}

/// With the `failpoints` feature only: every node holds the leave of a gone
/// caller back 1.5 s before proposing it.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_callers_late_leave_does_not_take_the_lock_from_a_later_call_of_its_session() {
    let c = start_with_failpoints("lock-before-leave=return(1500)").await;
    let (mut s, mut l) = clients(&c, 1).await;
    let holder = session(&mut s, 10_000).await;
    l.acquire(acquire_req("jobs/daily", holder, false, 5_000))
        .await
        .expect("holder acquires");
    // A caller queues its session, then goes away (its call dropped).
    let retried = session(&mut s, 10_000).await;
    let first = spawn_acquire(&l, "jobs/daily", retried, 30_000);
    wait_until_queued(&mut l, "jobs/daily").await;
    first.abort();
    // Its client asks again with the same session before the first call's
    // leave lands, and gets the lock once the holder lets go.
    let second = spawn_acquire(&l, "jobs/daily", retried, 10_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    l.release(proto::ReleaseRequest {
        name: "jobs/daily".into(),
        session_id: holder,
    })
    .await
    .expect("release");
    let token = second
        .await
        .expect("second call")
        .expect("the later call holds")
        .into_inner()
        .fencing_token;
    // The first call's leave lands after that: it must leave the later
    // call's hold alone.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let st = inspect(&mut l, "jobs/daily").await;
    assert_eq!(
        st.holders
            .iter()
            .map(|h| (h.session_id, h.fencing_token))
            .collect::<Vec<_>>(),
        vec![(retried, token)],
        "a gone call's late leave released the lock a later call of its session holds: {st:?}"
    );
}
