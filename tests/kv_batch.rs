//! `Kv.Batch`: many KV requests on one stream, each served as its unary call
//! would be — routed to its shard, forwarded from a node that does not lead it,
//! checked, and answered with its own result or error — against a real cluster.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{TestCluster, get};
use shopkv::proto::batch_item::Op;
use shopkv::proto::batch_result::Result as Reply;
use shopkv::proto::{self, BatchItem, BatchRequest, BatchResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

/// A Batch stream on a node: the sender of request messages and the results.
struct Stream {
    requests: mpsc::Sender<BatchRequest>,
    results: Streaming<BatchResponse>,
}

async fn open(c: &TestCluster, node: u64) -> Stream {
    let (requests, rx) = mpsc::channel(16);
    let results = c
        .kv(node)
        .await
        .batch(ReceiverStream::new(rx))
        .await
        .expect("open Kv.Batch")
        .into_inner();
    Stream { requests, results }
}

impl Stream {
    /// Sends `items` in one message and collects a result for each, by id.
    async fn call(&mut self, items: Vec<BatchItem>) -> HashMap<u64, Reply> {
        let want = items.len();
        self.requests
            .send(BatchRequest { items })
            .await
            .expect("stream open");
        self.collect(want, Duration::from_secs(20)).await
    }

    /// Results until `want` items are answered, each once, the whole within `limit`.
    async fn collect(&mut self, want: usize, limit: Duration) -> HashMap<u64, Reply> {
        let mut got = HashMap::new();
        let deadline = tokio::time::Instant::now() + limit;
        while got.len() < want {
            let message = tokio::time::timeout_at(deadline, self.results.message())
                .await
                .unwrap_or_else(|_| panic!("{want} results within {limit:?}"))
                .expect("stream healthy")
                .expect("stream not over");
            for r in message.results {
                let reply = r.result.expect("every result says what happened");
                assert!(
                    got.insert(r.id, reply).is_none(),
                    "id {} answered twice",
                    r.id
                );
            }
        }
        got
    }
}

fn item(id: u64, op: Op) -> BatchItem {
    BatchItem {
        id,
        timeout_ms: 0,
        op: Some(op),
    }
}

fn put(key: &str, value: &str, fence: Option<(&str, u64)>) -> Op {
    Op::Put(proto::PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        fence: fence.map(|(lock_name, token)| proto::Fence {
            lock_name: lock_name.into(),
            token,
        }),
    })
}

fn read(key: &str, serializable: bool) -> Op {
    Op::Get(proto::GetRequest {
        key: key.as_bytes().to_vec(),
        serializable,
    })
}

fn error(reply: &Reply) -> &proto::BatchError {
    match reply {
        Reply::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_streams_items_are_served_each_as_its_unary_call() {
    let mut c = TestCluster::start_initialised(3, 2, &[]).await;
    // Node 3 leads at most one of the two shards: some items are forwarded.
    let mut s = open(&c, 3).await;

    let keys: Vec<String> = (0..40).map(|i| format!("batch/{i}")).collect();
    let puts = keys
        .iter()
        .enumerate()
        .map(|(i, k)| item(i as u64, put(k, &format!("v{i}"), None)))
        .collect();
    let got = s.call(puts).await;
    let mut shards_seen = std::collections::BTreeSet::new();
    for (i, k) in keys.iter().enumerate() {
        match &got[&(i as u64)] {
            Reply::Put(r) => {
                assert!(r.version > 0, "{k}: version {}", r.version);
                assert_eq!(r.shard, shopkv::router::shard_for(k.as_bytes(), 2), "{k}");
                shards_seen.insert(r.shard);
            }
            other => panic!("{k}: {other:?}"),
        }
    }
    assert_eq!(shards_seen.len(), 2, "the keys cover both shards");

    // Reads of every kind, a delete, compare-and-swaps, and items that fail on
    // their own without failing the others.
    let mut items: Vec<BatchItem> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| item(100 + i as u64, read(k, i % 2 == 0)))
        .collect();
    items.push(item(200, read("batch/missing", false)));
    items.push(item(
        201,
        Op::Delete(proto::DeleteRequest {
            key: keys[0].as_bytes().to_vec(),
            fence: None,
        }),
    ));
    items.push(item(
        202,
        Op::CompareAndSwap(proto::CompareAndSwapRequest {
            key: keys[1].as_bytes().to_vec(),
            expected_version: 1,
            value: b"wrong".to_vec(),
            fence: None,
        }),
    ));
    items.push(item(203, put("", "empty key", None)));
    items.push(BatchItem {
        id: 204,
        timeout_ms: 0,
        op: None,
    });
    items.push(item(
        205,
        put("batch/fenced", "f5", Some(("batch-lock", 5))),
    ));
    let got = s.call(items).await;
    for (i, k) in keys.iter().enumerate() {
        match &got[&(100 + i as u64)] {
            Reply::Get(r) => {
                let rec = r.record.as_ref().expect("record");
                assert_eq!(rec.value, format!("v{i}").into_bytes(), "{k}");
                assert_eq!(rec.key, k.as_bytes(), "{k}");
            }
            other => panic!("{k}: {other:?}"),
        }
    }
    assert_eq!(error(&got[&200]).code, Code::NotFound as i32);
    match &got[&201] {
        Reply::Delete(r) => assert!(r.deleted && r.revision > 0, "{r:?}"),
        other => panic!("delete: {other:?}"),
    }
    let current_version = match &got[&202] {
        Reply::CompareAndSwap(r) => {
            assert!(!r.succeeded, "{r:?}");
            let cur = r.current.as_ref().expect("the record as it is");
            assert_eq!(cur.value, b"v1");
            r.version
        }
        other => panic!("cas: {other:?}"),
    };
    let empty = error(&got[&203]);
    assert_eq!(empty.code, Code::InvalidArgument as i32);
    assert!(empty.message.contains("empty"), "{}", empty.message);
    assert_eq!(error(&got[&204]).code, Code::InvalidArgument as i32);
    assert!(matches!(got[&205], Reply::Put(_)), "{:?}", got[&205]);

    // A stale fencing token is refused with its reason; a right version swaps.
    let got = s
        .call(vec![
            item(300, put("batch/fenced", "f3", Some(("batch-lock", 3)))),
            item(
                301,
                Op::CompareAndSwap(proto::CompareAndSwapRequest {
                    key: keys[1].as_bytes().to_vec(),
                    expected_version: current_version,
                    value: b"swapped".to_vec(),
                    fence: None,
                }),
            ),
        ])
        .await;
    let stale = error(&got[&300]);
    assert_eq!(stale.code, Code::FailedPrecondition as i32);
    assert_eq!(stale.reason, "STALE_FENCE");
    assert_eq!(stale.outcome, "not-applied");
    assert!(
        matches!(&got[&301], Reply::CompareAndSwap(r) if r.succeeded),
        "{:?}",
        got[&301]
    );

    // What the stream did is what unary calls read, from another node.
    let mut kv = c.kv(1).await;
    assert_eq!(get(&mut kv, &keys[0], false).await.expect("get"), None);
    assert_eq!(
        get(&mut kv, &keys[1], false).await.expect("get").as_deref(),
        Some("swapped")
    );
    assert_eq!(
        get(&mut kv, "batch/fenced", false)
            .await
            .expect("get")
            .as_deref(),
        Some("f5")
    );
    for (i, k) in keys.iter().enumerate().skip(2) {
        assert_eq!(
            get(&mut kv, k, false).await.expect("get"),
            Some(format!("v{i}"))
        );
    }

    // More items in flight than the node serves at once: it stops reading the
    // stream until some finish, and every item is still answered once.
    let total = 6000u64;
    let mut sent = 0u64;
    while sent < total {
        let items = (sent..sent + 1000)
            .map(|i| item(10_000 + i, put(&format!("flood/{i}"), "x", None)))
            .collect();
        s.requests
            .send(BatchRequest { items })
            .await
            .expect("stream open");
        sent += 1000;
    }
    let answered = s.collect(total as usize, Duration::from_secs(60)).await;
    for (id, reply) in &answered {
        assert!(matches!(reply, Reply::Put(_)), "{id}: {reply:?}");
    }

    // A message over the item limit ends the stream, and none of it is applied.
    let too_many = (0..1025)
        .map(|i| item(50_000 + i, put(&format!("over/{i}"), "x", None)))
        .collect();
    s.requests
        .send(BatchRequest { items: too_many })
        .await
        .expect("stream open");
    let end = tokio::time::timeout(Duration::from_secs(10), s.results.message())
        .await
        .expect("ended within 10 s")
        .expect_err("the stream ends with a status");
    assert_eq!(end.code(), Code::InvalidArgument, "{end:?}");
    assert!(end.message().contains("1024"), "{}", end.message());
    assert_eq!(get(&mut kv, "over/0", false).await.expect("get"), None);
    assert_eq!(get(&mut kv, "over/1024", false).await.expect("get"), None);

    // A client that leaves with items in flight: the node finishes or drops
    // them, stays up, and serves the next stream.
    let gone = open(&c, 3).await;
    let items = (0..1000)
        .map(|i| item(i, put(&format!("left/{i}"), "x", None)))
        .collect();
    gone.requests
        .send(BatchRequest { items })
        .await
        .expect("stream open");
    drop(gone);
    let mut s = open(&c, 3).await;
    let got = s.call(vec![item(1, read(&keys[2], false))]).await;
    assert!(
        matches!(&got[&1], Reply::Get(r) if r.record.as_ref().is_some_and(|rec| rec.value == b"v2")),
        "{:?}",
        got[&1]
    );
    assert!(
        c.node_mut(3).is_running(),
        "node 3 exited after its client left"
    );
}
