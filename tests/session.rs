//! Sessions on a real 3-node cluster: kept alive they live past their TTL,
//! left alone they expire within it (plus a bound), closing ends them, TTLs
//! outside the bounds are refused, and killing the meta group's leader neither
//! expires a session that keeps alive (nor releases its lock) nor keeps a dead
//! one alive (its lock is released), and a new meta leader starts a long
//! session from its checkpointed remaining time.

mod common;

use std::time::{Duration, Instant};

use common::{TestCluster, channel};
use shopkv::proto;
use shopkv::proto::lock_client::LockClient;
use shopkv::proto::session_client::SessionClient;
use shopkv::router::META_GROUP;
use tonic::Code;
use tonic::transport::Channel;

async fn client(c: &TestCluster, via: u64) -> SessionClient<Channel> {
    SessionClient::new(channel(&c.node(via).client).await.expect("connect"))
}

async fn create(s: &mut SessionClient<Channel>, ttl_ms: u64) -> u64 {
    s.create(proto::CreateSessionRequest { ttl_ms })
        .await
        .expect("create session")
        .into_inner()
        .session_id
}

async fn alive(s: &mut SessionClient<Channel>, id: u64) -> Result<u64, tonic::Status> {
    s.get(proto::GetSessionRequest { session_id: id })
        .await
        .map(|r| r.into_inner().remaining_ms)
}

/// One keep-alive over a fresh stream through `s`.
async fn keep_alive(s: &mut SessionClient<Channel>, id: u64) -> Result<u64, tonic::Status> {
    let req = tokio_stream::iter(vec![proto::KeepAliveRequest { session_id: id }]);
    let mut replies = s.keep_alive(req).await?.into_inner();
    match replies.message().await? {
        Some(r) => Ok(r.ttl_ms),
        None => Err(tonic::Status::unavailable("stream ended")),
    }
}

/// Waits until `id` is gone; returns how long that took.
async fn wait_gone(s: &mut SessionClient<Channel>, id: u64, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        match alive(s, id).await {
            Err(e) if e.code() == Code::NotFound => return start.elapsed(),
            _ => {}
        }
        assert!(
            start.elapsed() < within,
            "session {id} still alive after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_live_while_kept_alive_and_expire_without() {
    let c = TestCluster::start_initialised(3, 1, &[]).await;
    let mut s1 = client(&c, 1).await;
    let mut s2 = client(&c, 2).await;

    // TTL bounds: at least 1.5 x the election timeout (1 s by default).
    let e = s1
        .create(proto::CreateSessionRequest { ttl_ms: 100 })
        .await
        .expect_err("too short");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = s1
        .create(proto::CreateSessionRequest {
            ttl_ms: 100 * 86_400_000,
        })
        .await
        .expect_err("too long");
    assert_eq!(e.code(), Code::InvalidArgument);

    let kept = create(&mut s1, 2000).await;
    let left = create(&mut s1, 2000).await;
    assert_ne!(kept, left);
    // Keep one alive through another node for 3x its TTL; leave the other.
    let start = Instant::now();
    let mut left_gone_after = None;
    while start.elapsed() < Duration::from_millis(6000) {
        assert_eq!(keep_alive(&mut s2, kept).await.expect("keep-alive"), 2000);
        if left_gone_after.is_none() && alive(&mut s1, left).await.is_err() {
            left_gone_after = Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(alive(&mut s1, kept).await.expect("kept session") > 0);
    let gone = left_gone_after.expect("the session without keep-alives expired");
    assert!(
        gone >= Duration::from_millis(1500) && gone <= Duration::from_millis(3500),
        "expired after {gone:?}, TTL 2 s"
    );
    let e = keep_alive(&mut s2, left).await.expect_err("expired");
    assert_eq!(e.code(), Code::NotFound);

    // Without keep-alives the kept one expires too, within its TTL plus a bound.
    let waited = wait_gone(&mut s1, kept, Duration::from_secs(5)).await;
    assert!(
        waited >= Duration::from_millis(1000),
        "expired early: {waited:?}"
    );

    // Close ends a session at once; closing again is NOT_FOUND.
    let id = create(&mut s2, 5000).await;
    s1.close(proto::CloseSessionRequest { session_id: id })
        .await
        .expect("close");
    assert_eq!(
        alive(&mut s2, id).await.expect_err("closed").code(),
        Code::NotFound
    );
    let e = s1
        .close(proto::CloseSessionRequest { session_id: id })
        .await
        .expect_err("closed twice");
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_meta_leader_neither_expires_a_live_session_nor_saves_a_dead_one() {
    let mut c = TestCluster::start_initialised(3, 1, &[]).await;
    let leader = c.leader_of(META_GROUP, 1).await.expect("meta leader");
    let others: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    let mut s = client(&c, others[0]).await;
    let live = create(&mut s, 3000).await;
    let dead = create(&mut s, 3000).await;
    // Each holds a lock: the live one's must stay held (same token), the
    // dead one's must be released by its expiry.
    let mut locks = LockClient::new(channel(&c.node(others[0]).client).await.expect("connect"));
    let hold = |name: &str, session| {
        let req = proto::AcquireRequest {
            name: name.into(),
            session_id: session,
            mode: proto::LockMode::Exclusive as i32,
            wait_timeout_ms: 0,
        };
        let mut l = locks.clone();
        async move {
            l.acquire(req)
                .await
                .expect("acquire")
                .into_inner()
                .fencing_token
        }
    };
    let kept_token = hold("kept", live).await;
    hold("freed", dead).await;
    c.kill(leader);
    let killed_at = Instant::now();
    // Keep `live` alive every 700 ms through the survivors while the group
    // elects a new leader; failures during the election are retried.
    let mut clients = [client(&c, others[0]).await, client(&c, others[1]).await];
    let mut acked = 0;
    while killed_at.elapsed() < Duration::from_secs(9) {
        for cl in clients.iter_mut() {
            if keep_alive(cl, live).await.is_ok() {
                acked += 1;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert!(acked >= 5, "keep-alives mostly failed: {acked}");
    assert!(
        alive(&mut clients[0], live)
            .await
            .expect("the live session survived")
            > 0,
        "live session lost across the leader change"
    );
    // The one nobody kept alive is gone: 3 s remaining + 1 s grace after a
    // ~1-2 s election is well inside 9 s.
    assert_eq!(
        alive(&mut clients[1], dead)
            .await
            .expect_err("dead session")
            .code(),
        Code::NotFound
    );
    let kept = locks
        .inspect(proto::InspectRequest {
            name: "kept".into(),
        })
        .await
        .expect("inspect")
        .into_inner();
    assert_eq!(kept.holders.len(), 1, "{kept:?}");
    assert_eq!(
        (kept.holders[0].session_id, kept.holders[0].fencing_token),
        (live, kept_token),
        "the live session's lock survived the leader change unchanged"
    );
    let freed = locks
        .inspect(proto::InspectRequest {
            name: "freed".into(),
        })
        .await
        .expect("inspect")
        .into_inner();
    assert!(
        freed.holders.is_empty(),
        "the dead session's lock was released: {freed:?}"
    );
}

/// The meta leader records a session's remaining time only once it drifted by
/// an eighth of its TTL (not every second for every session): a 60 s session
/// left alone for 12 s has been checkpointed (drift 7.5 s), so the leader that
/// takes over after the old one is killed grants its recorded ~52 s plus a 1 s
/// grace — not a fresh TTL, which it would without checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_sessions_remaining_time_outlives_a_meta_leader_change() {
    const TTL_MS: u64 = 60_000;
    let mut c = TestCluster::start_initialised(3, 1, &[]).await;
    let leader = c.leader_of(META_GROUP, 1).await.expect("meta leader");
    let others: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    let mut s = client(&c, others[0]).await;
    let id = create(&mut s, TTL_MS).await;
    let granted = Instant::now();
    tokio::time::sleep(Duration::from_secs(12)).await;
    c.kill(leader);
    let mut clients = [client(&c, others[0]).await, client(&c, others[1]).await];
    let remaining_ms = 'asked: loop {
        for cl in clients.iter_mut() {
            if let Ok(r) = alive(cl, id).await {
                break 'asked r;
            }
        }
        assert!(
            granted.elapsed() < Duration::from_secs(30),
            "no new meta leader answered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let elapsed_ms = granted.elapsed().as_millis() as u64;
    assert!(
        remaining_ms <= TTL_MS - 4000,
        "remaining {remaining_ms} ms {elapsed_ms} ms after the grant: the new leader did not start from a checkpoint"
    );
    assert!(
        remaining_ms + elapsed_ms >= TTL_MS - 10_000,
        "remaining {remaining_ms} ms {elapsed_ms} ms after the grant: the session lost time"
    );
}
