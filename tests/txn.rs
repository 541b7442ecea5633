//! Cross-shard orders (2PC on the Raft groups) on a real 3-node, 3-shard
//! cluster: commit and the stock moves on every participant, aborts that
//! leave every shard's stock as it was, one order per id under concurrency,
//! and recovery without the coordinator (a transaction left undecided, and a
//! reservation whose transaction was never begun).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::shop::{Shop, reason, shop};
use common::{TestCluster, channel};
use shopkv::proto::peer_client::PeerClient;
use shopkv::proto::{self, OrderStatus};
use shopkv::router::ClusterMap;
use shopkv::sm::commerce::{CommerceCommand, CommerceResponse};
use shopkv::sm::{Command, Response};
use tonic::Code;

const SHARDS: u32 = 3;

fn map() -> ClusterMap {
    ClusterMap::new(0, SHARDS, BTreeMap::new())
}

/// One SKU named `{prefix}-…` on each shard, in shard order.
fn skus_on_every_shard(prefix: &str) -> Vec<String> {
    common::shop::skus_on_every_shard(prefix, SHARDS)
}

/// An order id anchored on `shard`.
fn order_id_on(prefix: &str, shard: u64) -> String {
    let m = map();
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| m.shard_of_order(id) == shard)
        .expect("an id")
}

/// Polls the stock of `skus` until it is `want` or `within` passes.
async fn wait_stocks(
    s: &mut Shop,
    skus: &[String],
    want: &[(i64, i64)],
    within: Duration,
    what: &str,
) {
    let deadline = Instant::now() + within;
    loop {
        let got = s.stocks(skus).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not within {within:?}: {what}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Proposes a raw command to `group` through node `via`'s peer port (what a
/// coordinator that then dies would have done).
async fn propose_raw(
    c: &TestCluster,
    via: u64,
    group: u64,
    cmd: CommerceCommand,
) -> CommerceResponse {
    let mut peer = PeerClient::new(channel(&c.node(via).peer).await.expect("peer"));
    let reply = peer
        .propose(proto::GroupMessage {
            group_id: group,
            payload: shopkv::codec::to_wire(&Command::Commerce(cmd)).expect("encode"),
            hops_left: 3,
        })
        .await
        .expect("propose")
        .into_inner();
    let res: Result<Response, shopkv::node::NodeError> =
        shopkv::codec::from_wire(&reply.payload).expect("decode");
    match res.expect("applied") {
        Response::Commerce(r) => r,
        other => panic!("unexpected {other:?}"),
    }
}

/// Proposes (through node `via`) a prepare of `order_id` holding `qty` of
/// `sku` on the SKU's shard, as a late or reused Place would, and asserts
/// that it finds the order settled there and votes no.
async fn late_prepare_votes_no(
    c: &TestCluster,
    via: u64,
    order_id: &str,
    sku: &str,
    qty: u32,
    what: &str,
) {
    let late = CommerceCommand::PrepareTxn {
        order_id: order_id.to_string(),
        lines: vec![(sku.to_string(), qty)],
        now_ms: shopkv::clock::now_ms(),
        begin: None,
    };
    match propose_raw(c, via, map().shard_of_sku(sku), late).await {
        CommerceResponse::Rejected(r) => {
            assert_eq!(r.code, shopkv::domain::RejectCode::OrderAborted, "{what}")
        }
        other => panic!("{what} held stock: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_shard_order_commits_and_moves_stock_on_every_shard() {
    let c = TestCluster::start_initialised(3, SHARDS, &[]).await;
    let mut s = shop(&c, 1).await;
    let skus = skus_on_every_shard("X");
    for (i, sku) in skus.iter().enumerate() {
        s.add_product(sku, 100 * (i as i64 + 1), "EUR", 10).await;
    }
    let lines: Vec<(&str, u32)> = skus.iter().map(|s| s.as_str()).zip([2, 3, 1]).collect();
    // Anchored on the last line's shard; the other two lines live elsewhere.
    let id = order_id_on("o-commit", 3);
    let o = s
        .place("cust", &id, &lines)
        .await
        .expect("cross-shard order");
    assert_eq!(o.status(), OrderStatus::PendingPayment);
    assert_eq!(o.total_minor, 2 * 100 + 3 * 200 + 100 * 3);
    assert_eq!(o.shard, 3);
    assert_eq!(s.stocks(&skus).await, vec![(10, 2), (10, 3), (10, 1)]);
    // Placing it again (through another node) returns the same order.
    let again = shop(&c, 2)
        .await
        .place("cust", &id, &lines)
        .await
        .expect("replay");
    assert_eq!(again.version, o.version);
    assert_eq!(s.stocks(&skus).await, vec![(10, 2), (10, 3), (10, 1)]);

    s.orders
        .pay(proto::PayOrderRequest {
            fence: None,
            order_id: id.clone(),
            card_number: "4242424242424242".into(),
        })
        .await
        .expect("pay");
    let shipped = s
        .orders
        .ship(proto::OrderIdRequest {
            fence: None,
            order_id: id.clone(),
        })
        .await
        .expect("ship")
        .into_inner();
    assert_eq!(shipped.status(), OrderStatus::Shipped);
    let mut s2 = shop(&c, 3).await;
    wait_stocks(
        &mut s2,
        &skus,
        &[(8, 0), (7, 0), (9, 0)],
        Duration::from_secs(10),
        "shipping consumes on every shard",
    )
    .await;

    // A second order, cancelled: every shard's reservation is released.
    let id2 = order_id_on("o-cancel", 1);
    s.place("cust", &id2, &lines).await.expect("second order");
    assert_eq!(s.stocks(&skus).await, vec![(8, 2), (7, 3), (9, 1)]);
    let cancelled = s
        .orders
        .cancel(proto::OrderIdRequest {
            order_id: id2,
            fence: None,
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.status(), OrderStatus::Cancelled);
    wait_stocks(
        &mut s2,
        &skus,
        &[(8, 0), (7, 0), (9, 0)],
        Duration::from_secs(10),
        "cancel releases on every shard",
    )
    .await;

    // Catalog changes reach the prepares that follow (each participant's
    // apply caches the products it read for the orders above).
    s.put(common::shop::product(&skus[0], 150, "EUR"))
        .await
        .expect("new price");
    let id3 = order_id_on("o-repriced", 2);
    let o3 = s
        .place(
            "cust",
            &id3,
            &[(skus[0].as_str(), 1), (skus[1].as_str(), 1)],
        )
        .await
        .expect("order at the new price");
    assert_eq!(o3.total_minor, 150 + 200, "the new price, not a cached one");
    s.catalog
        .deactivate(proto::DeactivateProductRequest {
            fence: None,
            sku: skus[2].clone(),
        })
        .await
        .expect("deactivate");
    let err = s
        .place("cust", &order_id_on("o-inactive", 1), &lines)
        .await
        .expect_err("an inactive line");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "INACTIVE_PRODUCT"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_with_a_bad_line_aborts_and_leaves_every_shard_untouched() {
    let c = TestCluster::start_initialised(3, SHARDS, &[]).await;
    let mut s = shop(&c, 2).await;
    let skus = skus_on_every_shard("Y");
    s.add_product(&skus[0], 500, "EUR", 10).await;
    s.add_product(&skus[1], 700, "EUR", 2).await;
    s.add_product(&skus[2], 900, "USD", 10).await;
    let before = s.stocks(&skus).await;

    // One line out of stock.
    let id = order_id_on("o-short", 1);
    let err = s
        .place("cust", &id, &[(skus[0].as_str(), 1), (skus[1].as_str(), 5)])
        .await
        .expect_err("out of stock");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "OUT_OF_STOCK"),
        "{err:?}"
    );
    assert_eq!(
        s.stocks(&skus).await,
        before,
        "abort released what was held"
    );
    let got = s.order(&id).await.expect_err("aborted order");
    assert_eq!(
        (got.code(), reason(&got).as_str()),
        (Code::FailedPrecondition, "ORDER_ABORTED")
    );
    // The id stays aborted, even once stock would allow it.
    s.inventory
        .set_stock(proto::SetStockRequest {
            fence: None,
            sku: skus[1].clone(),
            on_hand: 20,
        })
        .await
        .expect("restock");
    let again = s
        .place("cust", &id, &[(skus[0].as_str(), 1), (skus[1].as_str(), 5)])
        .await
        .expect_err("still aborted");
    assert_eq!(again.code(), Code::FailedPrecondition);
    let before = s.stocks(&skus).await;

    // One unknown SKU.
    let err = s
        .place(
            "cust",
            &order_id_on("o-unknown", 2),
            &[(skus[0].as_str(), 1), ("NOPE-9", 1)],
        )
        .await
        .expect_err("unknown sku");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::NotFound, "UNKNOWN_SKU")
    );
    // Every participant votes yes, but the currencies differ: pricing aborts.
    let err = s
        .place(
            "cust",
            &order_id_on("o-cur", 3),
            &[(skus[0].as_str(), 1), (skus[2].as_str(), 1)],
        )
        .await
        .expect_err("currency mismatch");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::InvalidArgument, "CURRENCY_MISMATCH")
    );
    assert_eq!(s.stocks(&skus).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_cross_shard_order_placed_concurrently_is_placed_once() {
    let c = TestCluster::start_initialised(3, SHARDS, &[]).await;
    let mut s = shop(&c, 1).await;
    let skus = skus_on_every_shard("Z");
    for sku in &skus {
        s.add_product(sku, 250, "EUR", 50).await;
    }
    let id = order_id_on("o-race", 2);
    let mut tasks = Vec::new();
    for via in [1, 2, 3, 1, 2, 3, 1, 2] {
        let mut sh = shop(&c, via).await;
        let (id, skus) = (id.clone(), skus.clone());
        tasks.push(tokio::spawn(async move {
            let lines: Vec<(&str, u32)> = skus.iter().map(|s| (s.as_str(), 2)).collect();
            sh.place("cust", &id, &lines).await.map(|o| o.version)
        }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            Ok(v) => versions.push(v),
            // A racer may find the transaction still being decided by another.
            Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
        }
    }
    versions.dedup();
    assert_eq!(versions.len(), 1, "one order: {versions:?}");
    assert_eq!(
        s.stocks(&skus).await,
        vec![(50, 2); 3],
        "reserved once per line"
    );
    assert_eq!(s.order(&id).await.expect("get").version, versions[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_aborts_an_undecided_order_and_releases_held_stock_without_its_coordinator() {
    let c = TestCluster::start_initialised(3, SHARDS, &["--txn-timeout-ms", "1500"]).await;
    let mut s = shop(&c, 1).await;
    let skus = skus_on_every_shard("R");
    for sku in &skus {
        s.add_product(sku, 100, "EUR", 10).await;
    }
    let m = map();
    let shard = |sku: &str| m.shard_of_sku(sku);
    let now = shopkv::clock::now_ms();

    // A coordinator began and prepared, then vanished before deciding.
    let id = order_id_on("o-lost", 1);
    let lines = vec![(skus[1].clone(), 2), (skus[2].clone(), 3)];
    let begin = CommerceCommand::BeginTxn {
        order_id: id.clone(),
        customer: "cust".into(),
        lines: lines.clone(),
        now_ms: now,
        deadline_ms: now + 1500,
    };
    assert!(matches!(
        propose_raw(&c, 2, m.shard_of_order(&id), begin).await,
        CommerceResponse::Txn(_)
    ));
    for (sku, qty) in &lines {
        let prepare = CommerceCommand::PrepareTxn {
            order_id: id.clone(),
            lines: vec![(sku.clone(), *qty)],
            now_ms: now,
            begin: None,
        };
        let vote = propose_raw(&c, 3, shard(sku), prepare).await;
        assert!(matches!(vote, CommerceResponse::Prepared(_)), "{vote:?}");
    }
    assert_eq!(s.stocks(&skus[1..2]).await, vec![(10, 2)]);
    let pending = s.order(&id).await.expect_err("in progress");
    assert_eq!(pending.code(), Code::Unavailable);

    // A reservation prepared for a transaction that was never begun.
    let ghost = order_id_on("o-ghost", 2);
    let prepare = CommerceCommand::PrepareTxn {
        order_id: ghost.clone(),
        lines: vec![(skus[0].clone(), 4)],
        now_ms: now,
        begin: None,
    };
    assert!(matches!(
        propose_raw(&c, 1, shard(&skus[0]), prepare).await,
        CommerceResponse::Prepared(_)
    ));
    assert_eq!(s.stocks(&skus[..1]).await, vec![(10, 4)]);

    // Cluster.Status (and its CLI) shows the work in flight per shard.
    let status = c.status(2).await.expect("status");
    let busy: Vec<(u64, u32)> = status
        .groups
        .iter()
        .filter(|g| g.group_id != 0)
        .map(|g| (g.group_id, g.txns_in_flight))
        .collect();
    for shard in [m.shard_of_order(&id), shard(&skus[1]), shard(&skus[0])] {
        assert!(
            busy.iter().any(|(g, n)| *g == shard && *n >= 1),
            "shard {shard} shows nothing in flight: {busy:?}"
        );
    }
    let out = std::process::Command::new(common::binary())
        .args([
            "cluster",
            "status",
            "-w",
            "json",
            "--endpoints",
            &c.endpoints().join(","),
        ])
        .output()
        .expect("cli");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json status");
    let total: u64 = v["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| g["txns_in_flight"].as_u64().unwrap_or(0))
        .sum();
    assert!(total >= 3, "{v}");

    let mut s3 = shop(&c, 3).await;
    wait_stocks(
        &mut s3,
        &skus,
        &[(10, 0); 3],
        Duration::from_secs(20),
        "recovery releases every held unit",
    )
    .await;
    for order in [&id, &ghost] {
        let e = s.order(order).await.expect_err("aborted");
        assert_eq!(
            (e.code(), reason(&e).as_str()),
            (Code::FailedPrecondition, "ORDER_ABORTED"),
            "{order}: {e:?}"
        );
    }
    // A late prepare of the aborted order finds the tombstone and votes no;
    // placing the ghost now finds the abort recovery recorded.
    late_prepare_votes_no(&c, 1, &id, &skus[1], 2, "a prepare of the aborted order").await;
    let e = s
        .place(
            "cust",
            &ghost,
            &[(skus[0].as_str(), 4), (skus[1].as_str(), 1)],
        )
        .await
        .expect_err("ghost stays aborted");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(s.stocks(&skus).await, vec![(10, 0); 3]);
    // The last settlement's done-marker may trail the stock by a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = c.status(1).await.expect("status");
        let busy: Vec<(u64, u32)> = status
            .groups
            .iter()
            .filter(|g| g.group_id != 0 && g.txns_in_flight > 0)
            .map(|g| (g.group_id, g.txns_in_flight))
            .collect();
        if busy.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still in flight after recovery: {busy:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reusing_a_placed_order_id_with_other_skus_holds_no_stock() {
    let c = TestCluster::start_initialised(3, SHARDS, &["--txn-timeout-ms", "1500"]).await;
    let mut s = shop(&c, 1).await;
    let skus = skus_on_every_shard("U");
    for sku in &skus {
        s.add_product(sku, 100, "EUR", 10).await;
    }
    let m = map();
    let shard = |sku: &str| m.shard_of_sku(sku);

    // A cross-shard order on shards 1 and 2; its id placed again with a line
    // on shard 3 is refused, but that prepare went out beside the begin and
    // held stock on shard 3, where the order itself holds nothing.
    let id = order_id_on("o-reused", 1);
    s.place("cust", &id, &[(skus[0].as_str(), 2), (skus[1].as_str(), 3)])
        .await
        .expect("order");
    let e = s
        .place("cust", &id, &[(skus[0].as_str(), 2), (skus[2].as_str(), 1)])
        .await
        .expect_err("the id is taken");
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::FailedPrecondition, "ORDER_ID_REUSED")
    );

    // A 1PC order (its line on its own shard), cancelled: its reservation is
    // released, and a late prepare of it there must not hold stock again.
    let one = order_id_on("o-single", 2);
    assert_eq!(shard(&skus[1]), 2);
    s.place("cust", &one, &[(skus[1].as_str(), 4)])
        .await
        .expect("1PC order");
    s.orders
        .cancel(proto::OrderIdRequest {
            order_id: one.clone(),
            fence: None,
        })
        .await
        .expect("cancel");
    late_prepare_votes_no(&c, 3, &one, &skus[1], 4, "a prepare of a settled 1PC order").await;

    // Recovery asks the anchor about the stray hold on shard 3: the order is
    // committed, but not with that line, so the hold is released; the
    // order's own reservations stay.
    wait_stocks(
        &mut s,
        &skus,
        &[(10, 2), (10, 3), (10, 0)],
        Duration::from_secs(20),
        "the stray hold is released, the order's stay",
    )
    .await;
    let o = s.order(&id).await.expect("the order");
    assert_eq!(o.status(), OrderStatus::PendingPayment);
    assert_eq!(o.lines.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_orders_tombstones_are_pruned_after_the_retention_and_a_committed_orders_stay() {
    let c = TestCluster::start_initialised(
        3,
        SHARDS,
        &[
            "--txn-timeout-ms",
            "1000",
            "--aborted-txn-retention-ms",
            "1000",
        ],
    )
    .await;
    let mut s = shop(&c, 1).await;
    let skus = skus_on_every_shard("P");
    s.add_product(&skus[0], 100, "EUR", 10).await;
    s.add_product(&skus[1], 100, "EUR", 2).await;
    let m = map();

    // Committed, then cancelled: its tombstones must outlive any retention.
    let kept = order_id_on("o-kept", 3);
    s.place(
        "cust",
        &kept,
        &[(skus[0].as_str(), 1), (skus[1].as_str(), 1)],
    )
    .await
    .expect("committed order");
    s.orders
        .cancel(proto::OrderIdRequest {
            order_id: kept.clone(),
            fence: None,
        })
        .await
        .expect("cancel");
    let before = vec![(10, 0), (2, 0)];
    wait_stocks(
        &mut s,
        &skus[..2],
        &before,
        Duration::from_secs(10),
        "cancel releases",
    )
    .await;

    // Aborted: out of stock on the second shard, after the first held a unit.
    let id = order_id_on("o-gone", 1);
    let lines = [(skus[0].as_str(), 1), (skus[1].as_str(), 5)];
    let err = s
        .place("cust", &id, &lines)
        .await
        .expect_err("out of stock");
    assert_eq!(reason(&err), "OUT_OF_STOCK", "{err:?}");

    // Past the retention every shard leader prunes its tombstones: the
    // anchor forgets the order, and a prepare of it is no longer refused.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match s.order(&id).await {
            Err(e) if e.code() == Code::NotFound => break,
            Err(e) if reason(&e) == "ORDER_ABORTED" => {}
            other => panic!("unexpected read of the aborted order: {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "the aborted order was not pruned"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let late = CommerceCommand::PrepareTxn {
        order_id: id.clone(),
        lines: vec![(skus[0].clone(), 1)],
        now_ms: shopkv::clock::now_ms(),
        begin: None,
    };
    loop {
        match propose_raw(&c, 2, m.shard_of_sku(&skus[0]), late.clone()).await {
            CommerceResponse::Prepared(_) => break,
            CommerceResponse::Rejected(r) => {
                assert_eq!(r.code, shopkv::domain::RejectCode::OrderAborted);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "the aborted reservation was not pruned"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // That hold (Prepared: the unit is reserved again) is still released:
    // recovery asks the anchor, which finds neither record nor order and
    // aborts the id again.
    wait_stocks(
        &mut s,
        &skus[..2],
        &before,
        Duration::from_secs(20),
        "recovery releases a hold of a pruned order",
    )
    .await;

    // The committed order's tombstones were not pruned with it.
    late_prepare_votes_no(
        &c,
        3,
        &kept,
        &skus[1],
        1,
        "a prepare of the cancelled order",
    )
    .await;
    assert_eq!(
        s.order(&kept).await.expect("kept order").status(),
        OrderStatus::Cancelled
    );

    // Once forgotten again, the id places afresh.
    let deadline = Instant::now() + Duration::from_secs(20);
    let placed = loop {
        match s
            .place("cust", &id, &[(skus[0].as_str(), 1), (skus[1].as_str(), 1)])
            .await
        {
            Ok(o) => break o,
            Err(e) => assert_eq!(reason(&e), "ORDER_ABORTED", "{e:?}"),
        }
        assert!(Instant::now() < deadline, "the id stayed aborted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(placed.status(), OrderStatus::PendingPayment);
    assert_eq!(s.stocks(&skus[..2]).await, vec![(10, 1), (2, 1)]);
}
