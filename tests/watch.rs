//! Watches on a real 3-node cluster: a KV prefix watch sees every matching
//! change in each shard's log order and nothing else, resumes on another node
//! from the revisions it had (no gap, no duplicate), stock, order and lock
//! watches follow their record, a restarted node reports revisions before its
//! history as OUT_OF_RANGE, and bad requests are refused. Also where the
//! per-connection stream limit shows: open watches hold streams.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::shop;
use common::{TestCluster, channel, get, put};
use shopkv::proto;
use shopkv::proto::kv_client::KvClient;
use shopkv::proto::watch_client::WatchClient;
use shopkv::proto::watch_event::Record;
use shopkv::proto::watch_request::Target;
use tonic::Code;
use tonic::Streaming;
use tonic::transport::Channel;

async fn watcher(c: &TestCluster, via: u64) -> WatchClient<Channel> {
    WatchClient::new(channel(&c.node(via).client).await.expect("connect"))
}

async fn open(
    w: &mut WatchClient<Channel>,
    target: Target,
    start: HashMap<u64, u64>,
) -> Result<Streaming<proto::WatchResponse>, tonic::Status> {
    let mut s = w
        .watch(proto::WatchRequest {
            target: Some(target),
            start_revisions: start,
            groups: Vec::new(),
        })
        .await?
        .into_inner();
    let first = s.message().await?.expect("created message");
    assert!(first.created, "first response is the creation: {first:?}");
    Ok(s)
}

/// Events until `n` have arrived (or 10 s pass: then whatever came).
async fn events(s: &mut Streaming<proto::WatchResponse>, n: usize) -> Vec<proto::WatchEvent> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while out.len() < n {
        match tokio::time::timeout_at(deadline, s.message()).await {
            Ok(Ok(Some(r))) => out.extend(r.events),
            Ok(Ok(None)) => panic!("watch stream ended"),
            Ok(Err(e)) => panic!("watch stream failed: {e}"),
            Err(_) => break,
        }
    }
    out
}

fn kv(e: &proto::WatchEvent) -> (String, String) {
    match &e.record {
        Some(Record::Kv(r)) => (
            String::from_utf8_lossy(&r.key).into_owned(),
            String::from_utf8_lossy(&r.value).into_owned(),
        ),
        other => panic!("not a KV event: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_watch_sees_every_change_in_order_and_resumes_on_another_node() {
    let c = TestCluster::start_initialised(3, 3, &[]).await;
    let mut w1 = watcher(&c, 1).await;
    let mut s = open(&mut w1, Target::KvPrefix(b"cart/".to_vec()), HashMap::new())
        .await
        .expect("watch");
    let mut kv2 = c.kv(2).await;
    for i in 0..12 {
        put(&mut kv2, &format!("cart/{}", i % 4), &format!("v{i}"))
            .await
            .expect("put");
        put(&mut kv2, &format!("other/{i}"), "x")
            .await
            .expect("put");
    }
    kv2.delete(proto::DeleteRequest {
        key: b"cart/0".to_vec(),
        fence: None,
    })
    .await
    .expect("delete");
    let got = events(&mut s, 13).await;
    assert_eq!(
        got.len(),
        13,
        "12 puts and a delete under the prefix: {got:?}"
    );
    // Per key, the values arrive in write order; per shard, revisions increase.
    for k in 0..4 {
        let key = format!("cart/{k}");
        let puts: Vec<String> = got
            .iter()
            .filter(|e| e.kind == proto::EventKind::Put as i32 && kv(e).0 == key)
            .map(|e| kv(e).1)
            .collect();
        let want: Vec<String> = (0..12)
            .filter(|i| i % 4 == k)
            .map(|i| format!("v{i}"))
            .collect();
        assert_eq!(puts, want, "{key}");
    }
    let deletes: Vec<_> = got
        .iter()
        .filter(|e| e.kind == proto::EventKind::Delete as i32)
        .collect();
    assert_eq!(deletes.len(), 1);
    assert_eq!(kv(deletes[0]).0, "cart/0");
    let mut last: HashMap<u64, u64> = HashMap::new();
    for e in &got {
        let prev = last.insert(e.group, e.revision).unwrap_or(0);
        assert!(e.revision > prev, "revisions increase per shard: {got:?}");
    }

    // Disconnect; more writes; resume on node 3 from one past what was seen.
    drop(s);
    for i in 0..6 {
        put(&mut kv2, &format!("cart/r{i}"), &format!("late{i}"))
            .await
            .expect("put");
    }
    let start: HashMap<u64, u64> = (1..=3u64)
        .map(|g| (g, last.get(&g).map_or(1, |r| r + 1)))
        .collect();
    let mut w3 = watcher(&c, 3).await;
    let mut s = open(&mut w3, Target::KvPrefix(b"cart/".to_vec()), start)
        .await
        .expect("resume");
    let mut resumed = events(&mut s, 6).await;
    // Nothing more should arrive: no duplicates of the first 13.
    resumed.extend(
        tokio::time::timeout(Duration::from_millis(500), s.message())
            .await
            .ok()
            .and_then(|m| m.ok().flatten())
            .map(|r| r.events)
            .unwrap_or_default(),
    );
    let mut keys: Vec<String> = resumed.iter().map(|e| kv(e).0).collect();
    keys.sort();
    let want: Vec<String> = (0..6).map(|i| format!("cart/r{i}")).collect();
    assert_eq!(keys, want, "exactly the writes made while disconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_watches_follow_stock_orders_and_locks() {
    let c = TestCluster::start_initialised(3, 2, &[]).await;
    let mut sh = shop::shop(&c, 1).await;
    sh.add_product("WATCH-1", 500, "EUR", 10).await;
    let mut w = watcher(&c, 2).await;
    let mut stock = open(&mut w, Target::Sku("WATCH-1".into()), HashMap::new())
        .await
        .expect("stock watch");
    let mut order = open(&mut w, Target::OrderId("ord-w1".into()), HashMap::new())
        .await
        .expect("order watch");
    sh.place("cust-w", "ord-w1", &[("WATCH-1", 3)])
        .await
        .expect("place");
    sh.pay("ord-w1", "4242424242424242").await.expect("pay");

    let st = events(&mut stock, 1).await;
    let Some(Record::Stock(level)) = st.first().and_then(|e| e.record.clone()) else {
        panic!("stock event: {st:?}");
    };
    assert_eq!((level.on_hand, level.reserved, level.available), (10, 3, 7));

    let ev = events(&mut order, 2).await;
    let statuses: Vec<String> = ev
        .iter()
        .filter_map(|e| match &e.record {
            Some(Record::Order(o)) => Some(o.status_name.clone()),
            _ => None,
        })
        .collect();
    assert!(
        statuses.len() >= 2 && statuses.last().map(String::as_str) == Some("paid"),
        "order placed then paid: {statuses:?}"
    );

    // A lock: acquire, a waiter queues, release hands over.
    let ch = channel(&c.node(3).client).await.expect("connect");
    let mut sessions = proto::session_client::SessionClient::new(ch.clone());
    let mut locks = proto::lock_client::LockClient::new(ch);
    let mut lw = open(&mut w, Target::LockName("batch".into()), HashMap::new())
        .await
        .expect("lock watch");
    let a = sessions
        .create(proto::CreateSessionRequest { ttl_ms: 10_000 })
        .await
        .expect("session")
        .into_inner()
        .session_id;
    let t = locks
        .acquire(proto::AcquireRequest {
            name: "batch".into(),
            session_id: a,
            mode: proto::LockMode::Exclusive as i32,
            wait_timeout_ms: 1000,
        })
        .await
        .expect("acquire")
        .into_inner()
        .fencing_token;
    locks
        .release(proto::ReleaseRequest {
            name: "batch".into(),
            session_id: a,
        })
        .await
        .expect("release");
    let ev = events(&mut lw, 2).await;
    let states: Vec<proto::LockState> = ev
        .iter()
        .filter_map(|e| match &e.record {
            Some(Record::Lock(l)) => Some(l.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(states.len(), 2, "{states:?}");
    assert_eq!(states[0].holders.len(), 1);
    assert_eq!(states[0].holders[0].fencing_token, t);
    assert!(states[1].holders.is_empty());
    assert_eq!(states[1].last_token, t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_revisions_on_a_restarted_node_are_out_of_range_and_bad_requests_are_refused() {
    let mut c = TestCluster::start_initialised(3, 1, &[]).await;
    let mut kv1 = c.kv(1).await;
    for i in 0..5 {
        put(&mut kv1, &format!("k{i}"), "v").await.expect("put");
    }
    // Node 2 has the whole history of shard 1 until it restarts.
    let mut w2 = watcher(&c, 2).await;
    let mut s = open(
        &mut w2,
        Target::KvPrefix(b"k".to_vec()),
        HashMap::from([(1, 1)]),
    )
    .await
    .expect("from revision 1");
    assert_eq!(events(&mut s, 5).await.len(), 5);
    drop(s);
    c.restart(2);
    c.wait_ready(Duration::from_secs(30)).await;
    let mut w2 = watcher(&c, 2).await;
    let err = open(
        &mut w2,
        Target::KvPrefix(b"k".to_vec()),
        HashMap::from([(1, 1)]),
    )
    .await;
    let mut s = err.expect("the stream opens; the compaction arrives on it");
    let e = s.message().await.expect_err("revision 1 is gone on node 2");
    assert_eq!(e.code(), Code::OutOfRange, "{e}");
    assert!(e.message().contains("history starts at"), "{e}");

    let mut w1 = watcher(&c, 1).await;
    let none = w1
        .watch(proto::WatchRequest {
            target: None,
            start_revisions: HashMap::new(),
            groups: Vec::new(),
        })
        .await
        .expect_err("no target");
    assert_eq!(none.code(), Code::InvalidArgument);
    let wrong_group = w1
        .watch(proto::WatchRequest {
            target: Some(Target::Sku("SKU-1".into())),
            start_revisions: HashMap::from([(0, 1)]),
            groups: Vec::new(),
        })
        .await
        .expect_err("the meta group is not a stock watch's group");
    assert_eq!(wrong_group.code(), Code::InvalidArgument);
    let bad_sku = w1
        .watch(proto::WatchRequest {
            target: Some(Target::Sku(String::new())),
            start_revisions: HashMap::new(),
            groups: Vec::new(),
        })
        .await
        .expect_err("empty SKU");
    assert_eq!(bad_sku.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_relays_the_shards_it_has_no_replica_of_and_survives_a_replica_kill() {
    let mut c = TestCluster::start_initialised(5, 5, &[]).await;
    let status = c.status(1).await.expect("status");
    let remote: Vec<(u64, Vec<u64>)> = status
        .groups
        .iter()
        .filter(|g| g.group_id != 0 && !g.members.contains(&1))
        .map(|g| (g.group_id, g.members.clone()))
        .collect();
    assert!(!remote.is_empty(), "node 1 holds every shard: {status:?}");
    let mut w1 = watcher(&c, 1).await;
    let mut s = open(&mut w1, Target::KvPrefix(b"r/".to_vec()), HashMap::new())
        .await
        .expect("watch through node 1");
    let mut client = c.kv(2).await;
    for i in 0..40 {
        put(&mut client, &format!("r/{i}"), "a").await.expect("put");
    }
    let got = events(&mut s, 40).await;
    assert_eq!(got.len(), 40, "every shard's changes, relayed or local");
    let shards: std::collections::BTreeSet<u64> = got.iter().map(|e| e.group).collect();
    assert!(
        remote.iter().all(|(g, _)| shards.contains(g)),
        "events of the shards node 1 lacks ({remote:?}) came through: {shards:?}"
    );
    // Kill a replica of a relayed shard (maybe the one relayed from): the
    // relay moves on and loses nothing.
    let (_, members) = &remote[0];
    c.kill(members[0]);
    let mut client = c.kv(if members[0] == 2 { 3 } else { 2 }).await;
    for i in 40..80 {
        let key = format!("r/{i}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while put(&mut client, &key, "b").await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{key} never written"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let more = events(&mut s, 40).await;
    // A retried put may write a key twice (two events); none may be missing,
    // and no event may come twice (revisions increase per shard).
    let mut keys: Vec<String> = more.iter().map(|e| kv(e).0).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 40, "every later write arrived: {keys:?}");
    let mut last: HashMap<u64, u64> = got.iter().map(|e| (e.group, e.revision)).collect();
    for e in &more {
        let prev = last.insert(e.group, e.revision).unwrap_or(0);
        assert!(
            e.revision > prev,
            "event delivered twice or out of order: {more:?}"
        );
    }
}

/// `--max-concurrent-streams` bounds the calls one client connection has open
/// (HTTP/2 streams): with two watches open on a connection limited to two, a
/// third call on it waits — it is not refused — until one watch ends, while
/// another connection is served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_calls_beyond_its_stream_limit_wait_for_one_to_end() {
    let c = TestCluster::start_initialised(3, 1, &["--max-concurrent-streams", "2"]).await;
    let ch = channel(&c.node(1).client).await.expect("connect");
    let mut w = WatchClient::new(ch.clone());
    let first = open(&mut w, Target::KvPrefix(b"a/".to_vec()), HashMap::new())
        .await
        .expect("first watch");
    let _second = open(&mut w, Target::KvPrefix(b"b/".to_vec()), HashMap::new())
        .await
        .expect("second watch");
    let mut kv = KvClient::new(ch);
    let third = tokio::spawn(async move { get(&mut kv, "a/k", true).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !third.is_finished(),
        "a third call on the connection was served"
    );
    // Another connection has its own streams.
    let mut other = KvClient::new(channel(&c.node(1).client).await.expect("connect"));
    assert_eq!(get(&mut other, "a/k", true).await.expect("other get"), None);
    drop(first);
    let got = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the waiting call ran once a watch ended")
        .expect("task");
    assert_eq!(got.expect("get"), None);
}
