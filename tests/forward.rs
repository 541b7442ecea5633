//! Forwarding under a held frame (failpoints build): a write a node forwarded
//! to its shard's leader but held past its deadline — as a SIGSTOPped node or
//! a stalled connection holds it — is refused by the leader, not proposed
//! seconds after its caller gave up (a chaos run saw such a straggling cart
//! clear empty a cart refilled since).

#![cfg(feature = "failpoints")]

mod common;

use std::time::Duration;

use common::{TestCluster, get};
use shopkv::proto;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_write_held_past_its_deadline_is_not_applied() {
    const SHARDS: u32 = 3;
    let mut c = TestCluster::start_initialised(3, SHARDS, &[]).await;
    // Node 3's forwarding links hold every frame 3 s before sending it.
    c.node_mut(3)
        .set_env("FAILPOINTS", "forward-link-before-send=return(3000)");
    c.restart(3);
    c.wait_ready(Duration::from_secs(30)).await;
    // Let the balancer hand node 3 back the shards it prefers first, so the
    // shard chosen below keeps a leader other than node 3.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut key = None;
    for i in 0..100 {
        let k = format!("late/{i}");
        let shard = shopkv::router::shard_for(k.as_bytes(), SHARDS);
        match c.leader_of(shard, 1).await {
            Some(l) if l != 3 => {
                key = Some((k, l));
                break;
            }
            _ => {}
        }
    }
    let (key, leader) = key.expect("a key whose shard node 3 does not lead");

    // Through node 3, with 1 s to spare: node 3 forwards it, its link holds
    // the frame 3 s, the caller gives up after 1 s.
    let mut via3 = c.kv(3).await;
    let mut req = tonic::Request::new(proto::PutRequest {
        key: key.as_bytes().to_vec(),
        value: b"late".to_vec(),
        fence: None,
    });
    req.set_timeout(Duration::from_secs(1));
    let e = via3.put(req).await.expect_err("the caller gave up");
    assert!(
        matches!(
            e.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled | tonic::Code::Unavailable
        ),
        "{e:?}"
    );
    // The frame reaches the leader about 2 s after its deadline: refused.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut kv = c.kv(leader).await;
    assert_eq!(
        get(&mut kv, &key, false).await.expect("linearizable get"),
        None,
        "the held write was applied after its caller gave up"
    );
}
