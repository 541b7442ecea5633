//! The 2PC coordinator crashes at each failpoint (the node aborts its own
//! process there, as a SIGKILL would stop it), is restarted, and the
//! transaction is resolved without it within a bound: undecided ones abort
//! and release every held unit, a decided commit settles on every shard, and
//! stock is conserved. A payment's node crashes between the provider's
//! capture and its record, and the capture is recorded without it. Needs
//! the `failpoints` feature:
//! `cargo test --release --features failpoints --test txn_crash`.
#![cfg(feature = "failpoints")]

mod common;

use std::time::{Duration, Instant};

use common::shop::get_order;
use common::{TestCluster, channel};
use shopkv::proto::cart_client::CartClient;
use shopkv::proto::catalog_client::CatalogClient;
use shopkv::proto::inventory_client::InventoryClient;
use shopkv::proto::orders_client::OrdersClient;
use shopkv::proto::{self, OrderStatus};

const SHARDS: u32 = 3;
/// Recovery must finish within this after the coordinator is back.
const RECOVERY_BOUND: Duration = Duration::from_secs(20);

async fn stocks(
    inv: &mut InventoryClient<tonic::transport::Channel>,
    skus: &[String],
) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    for sku in skus {
        let l = inv
            .get(proto::GetStockRequest {
                sku: sku.clone(),
                serializable: false,
            })
            .await
            .expect("stock")
            .into_inner();
        out.push((l.on_hand, l.reserved));
    }
    out
}

type Chan = tonic::transport::Channel;

/// A 3-node, 3-shard cluster whose nodes run with `failpoints` (the
/// FAILPOINTS spec) and a 2 s transaction timeout, one SKU on each shard with
/// 10 in stock at 3.00 EUR, and node 2's inventory and orders clients.
async fn cluster_with(
    failpoints: &str,
) -> (
    TestCluster,
    InventoryClient<Chan>,
    OrdersClient<Chan>,
    Vec<String>,
) {
    let mut c = TestCluster::start_with_env(
        3,
        &["--txn-timeout-ms", "2000"],
        &[("FAILPOINTS", failpoints)],
    );
    c.init(SHARDS).await;
    c.wait_ready(Duration::from_secs(30)).await;
    let ch = channel(&c.node(2).client).await.expect("connect");
    let mut catalog = CatalogClient::new(ch.clone());
    let mut inv = InventoryClient::new(ch.clone());
    let orders = OrdersClient::new(ch);
    let skus = common::shop::skus_on_every_shard("K", SHARDS);
    for sku in &skus {
        let p = proto::Product {
            sku: sku.clone(),
            title: format!("Item {sku}"),
            description: String::new(),
            price_minor: 300,
            currency: "EUR".into(),
            active: true,
            attributes: Default::default(),
            max_per_order: 0,
            version: 0,
        };
        catalog
            .put(proto::PutProductRequest {
                product: Some(p),
                fence: None,
            })
            .await
            .expect("put");
        inv.set_stock(proto::SetStockRequest {
            fence: None,
            sku: sku.clone(),
            on_hand: 10,
        })
        .await
        .expect("stock");
    }
    (c, inv, orders, skus)
}

/// A Place of 2 of each SKU under `order_id`.
fn two_of_each(order_id: &str, skus: &[String]) -> proto::PlaceOrderRequest {
    proto::PlaceOrderRequest {
        fence: None,
        order_id: order_id.to_string(),
        customer_id: "cust".into(),
        lines: skus
            .iter()
            .map(|s| proto::CartLine {
                sku: s.clone(),
                quantity: 2,
            })
            .collect(),
        from_cart: false,
    }
}

/// Adds one of each of `skus` to `customer`'s cart.
async fn add_one_of_each(cart: &mut CartClient<Chan>, customer: &str, skus: &[String]) {
    for sku in skus {
        cart.add_item(proto::AddCartItemRequest {
            customer_id: customer.into(),
            sku: sku.clone(),
            quantity: 1,
            fence: None,
        })
        .await
        .expect("add to cart");
    }
}

/// Waits up to `within` until `order_id` exists and `customer`'s cart is empty.
async fn wait_placed_and_cart_emptied(
    orders: &mut OrdersClient<Chan>,
    cart: &mut CartClient<Chan>,
    order_id: &str,
    customer: &str,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let placed = get_order(orders, order_id).await.is_ok();
        let emptied = cart
            .get(proto::GetCartRequest {
                customer_id: customer.into(),
            })
            .await
            .expect("cart")
            .into_inner()
            .lines
            .is_empty();
        if placed && emptied {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "checkout {order_id} after its caller left: placed={placed} cart emptied={emptied}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Crashes the coordinator (node 1) at `failpoint` while it places a
/// 3-shard order, restarts it, and checks the outcome is `committed`.
async fn crash_at(failpoint: &str, committed: bool) {
    let spec = format!("{failpoint}=return");
    let (mut c, mut inv, mut orders, skus) = cluster_with(&spec).await;

    // Place through node 1: it coordinates, and dies at the failpoint.
    let order_id = format!("crash-{failpoint}");
    let mut via1 = OrdersClient::new(channel(&c.node(1).client).await.expect("connect 1"));
    let res = via1.place(two_of_each(&order_id, &skus)).await;
    assert!(
        res.is_err(),
        "the coordinator answered instead of crashing: {res:?}"
    );
    let died = Instant::now() + Duration::from_secs(10);
    while c.node_mut(1).is_running() {
        assert!(Instant::now() < died, "node 1 did not crash at {failpoint}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.restart(1);

    // Resolved without the coordinator's help, within the bound.
    let want: Vec<(i64, i64)> = vec![(10, if committed { 2 } else { 0 }); 3];
    let deadline = Instant::now() + RECOVERY_BOUND;
    loop {
        let mut settled = stocks(&mut inv, &skus).await == want;
        for shard in 1..=u64::from(SHARDS) {
            match common::in_flight(&c, 2, shard).await {
                Some(f)
                    if f.pending.is_empty() && f.settlements.is_empty() && f.held.is_empty() => {}
                _ => settled = false,
            }
        }
        if settled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{failpoint}: not resolved within {RECOVERY_BOUND:?}: stock {:?}",
            stocks(&mut inv, &skus).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let got = get_order(&mut orders, &order_id).await;
    if committed {
        let o = got.expect("the decided order exists");
        assert_eq!(o.status(), OrderStatus::PendingPayment);
        assert_eq!(o.total_minor, 3 * 2 * 300);
    } else {
        let e = got.expect_err("the undecided order was aborted");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert_eq!(
            e.metadata()
                .get("x-shopkv-reason")
                .and_then(|v| v.to_str().ok()),
            Some("ORDER_ABORTED")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_crash_after_begin_aborts_the_order() {
    crash_at("txn-after-begin", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_crash_after_prepares_releases_every_held_unit() {
    crash_at("txn-after-prepare", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_crash_after_the_decision_still_settles_every_shard() {
    crash_at("txn-after-decide", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_whose_caller_leaves_mid_transaction_is_still_decided_at_once() {
    // The coordinator pauses 1.5 s before deciding; the caller gives up
    // after 0.5 s. The transaction must go on to its decision (the order
    // commits), not sit PENDING holding stock until recovery aborts it.
    let (c, mut inv, mut orders, skus) = cluster_with("txn-before-decide=return(1500)").await;
    let mut via1 = OrdersClient::new(channel(&c.node(1).client).await.expect("connect 1"));
    let mut req = tonic::Request::new(two_of_each("left-early", &skus));
    req.set_timeout(Duration::from_millis(500));
    let e = via1.place(req).await.expect_err("the caller gave up");
    assert!(
        matches!(
            e.code(),
            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ),
        "{e:?}"
    );
    // Well before the 2 s transaction timeout plus recovery's grace.
    let deadline = Instant::now() + Duration::from_millis(2500);
    loop {
        let got = get_order(&mut orders, "left-early").await;
        if let Ok(o) = got {
            assert_eq!(o.status(), OrderStatus::PendingPayment);
            assert_eq!(o.total_minor, 3 * 2 * 300);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the order was not decided after its caller left: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stocks(&mut inv, &skus).await, vec![(10, 2); 3]);

    // A checkout from a cart, the same way: the order is placed and the cart
    // it read is emptied, though the caller left before either.
    let mut cart = CartClient::new(channel(&c.node(2).client).await.expect("connect"));
    add_one_of_each(&mut cart, "dave", &skus).await;
    let mut req = tonic::Request::new(proto::PlaceOrderRequest {
        fence: None,
        order_id: "left-checkout".into(),
        customer_id: "dave".into(),
        lines: Vec::new(),
        from_cart: true,
    });
    req.set_timeout(Duration::from_millis(500));
    via1.place(req).await.expect_err("the caller gave up");
    // Well before the 2 s transaction timeout plus recovery's grace.
    let within = Duration::from_millis(2500);
    wait_placed_and_cart_emptied(&mut orders, &mut cart, "left-checkout", "dave", within).await;
    assert_eq!(stocks(&mut inv, &skus).await, vec![(10, 3); 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_whose_node_dies_after_the_capture_is_recorded_without_a_retry() {
    // Node 1 runs Pay and dies between the provider's capture and its
    // record: the money is taken. Nobody retries. The order must still end
    // up paid, by that capture (attempt 1), not stay unpaid until it expires.
    let (mut c, mut inv, mut orders, skus) = cluster_with("pay-after-capture=return").await;
    let order_id = "paid-then-crashed";
    let placed = orders
        .place(two_of_each(order_id, &skus))
        .await
        .expect("place")
        .into_inner();
    let mut via1 = OrdersClient::new(channel(&c.node(1).client).await.expect("connect 1"));
    let res = via1
        .pay(proto::PayOrderRequest {
            fence: None,
            order_id: order_id.into(),
            card_number: shopkv::payment::CARD_APPROVE.into(),
        })
        .await;
    assert!(res.is_err(), "node 1 answered instead of crashing: {res:?}");
    let died = Instant::now() + Duration::from_secs(10);
    while c.node_mut(1).is_running() {
        assert!(
            Instant::now() < died,
            "node 1 did not crash after the capture"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.restart(1);

    // The sweeper leaves a payment flow 10 s to record its own capture.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = get_order(&mut orders, order_id).await.expect("get");
        if got.status() == OrderStatus::Paid {
            let p = got.payment.expect("payment");
            assert_eq!(p.captured_minor, placed.total_minor);
            assert_eq!(p.idempotency_key, format!("{order_id}:1"));
            assert_eq!(p.card_last4, "4242");
            assert_eq!((p.refunded_minor, p.refund_due_minor), (0, 0));
            break;
        }
        assert_eq!(got.status(), OrderStatus::PendingPayment);
        assert!(
            Instant::now() < deadline,
            "a capture whose node died before recording it was never recorded"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Paid orders keep their stock reserved, as before the crash.
    assert_eq!(stocks(&mut inv, &skus).await, vec![(10, 2); 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_that_lands_on_an_order_cancelled_meanwhile_is_refunded_at_once() {
    // Node 1's Pay waits 1.5 s between the recorded authorization and the
    // capture; the order is cancelled meanwhile. The capture still happens
    // (the flow cannot know it is unwanted) and must be given back.
    let order_id = "cancelled-mid-payment";
    let (_c, mut orders, via1, placed) = placed_with_slow_captures(order_id, 1500).await;
    let pay = pay_after(&via1, order_id, Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel(&mut orders, order_id).await;
    expect_refused(pay, "a cancelled order is not paid").await;
    assert_cancelled_and_refunded_once(&mut orders, &placed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_pay_of_the_same_attempt_that_lands_after_a_cancel_is_refused() {
    // Two Pays of one order (a client's retry while its first call still
    // runs), 1 s apart, each waiting 3 s before its capture: both read the
    // order unpaid and charge under the same key. The first pays the order,
    // which is cancelled before the second records its capture (≈ 1 s later).
    // The second must not answer OK with a cancelled order, nor owe the money
    // back twice.
    let order_id = "paid-twice-then-cancelled";
    let (_c, mut orders, via1, placed) = placed_with_slow_captures(order_id, 3000).await;
    let first = pay_after(&via1, order_id, Duration::ZERO);
    let second = pay_after(&via1, order_id, Duration::from_millis(1000));
    let paid = first.await.expect("join").expect("first pay").into_inner();
    assert_eq!(paid.status(), OrderStatus::Paid);
    cancel(&mut orders, order_id).await;
    expect_refused(
        second,
        "a Pay answered after the cancel does not report the order paid",
    )
    .await;
    assert_cancelled_and_refunded_once(&mut orders, &placed).await;
}

/// A cluster whose nodes wait `hold_ms` before each capture, with `order_id`
/// placed (two of each SKU): the cluster, an Orders client, a channel to
/// node 1 and the order.
async fn placed_with_slow_captures(
    order_id: &str,
    hold_ms: u64,
) -> (TestCluster, OrdersClient<Chan>, Chan, proto::Order) {
    let failpoint = format!("pay-before-capture=return({hold_ms})");
    let (c, _inv, mut orders, skus) = cluster_with(&failpoint).await;
    let placed = orders
        .place(two_of_each(order_id, &skus))
        .await
        .expect("place")
        .into_inner();
    let via1 = channel(&c.node(1).client).await.expect("connect 1");
    (c, orders, via1, placed)
}

/// `pay` ends in FAILED_PRECONDITION (`why` says why it must not succeed).
async fn expect_refused(pay: PayCall, why: &str) {
    let e = pay.await.expect("join").expect_err(why);
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
}

/// A Pay running in a task of its own.
type PayCall = tokio::task::JoinHandle<Result<tonic::Response<proto::Order>, tonic::Status>>;

/// A Pay of `order_id` with an approved card through `ch`, `after` from now,
/// in a task of its own.
fn pay_after(ch: &Chan, order_id: &str, after: Duration) -> PayCall {
    let mut orders = OrdersClient::new(ch.clone());
    let req = proto::PayOrderRequest {
        fence: None,
        order_id: order_id.into(),
        card_number: shopkv::payment::CARD_APPROVE.into(),
    };
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        orders.pay(req).await
    })
}

/// Cancels `order_id`, which must answer cancelled.
async fn cancel(orders: &mut OrdersClient<Chan>, order_id: &str) {
    let cancelled = orders
        .cancel(proto::OrderIdRequest {
            order_id: order_id.into(),
            fence: None,
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.status(), OrderStatus::Cancelled);
}

/// `placed` is cancelled, its total captured once and refunded once.
async fn assert_cancelled_and_refunded_once(
    orders: &mut OrdersClient<Chan>,
    placed: &proto::Order,
) {
    let got = get_order(orders, &placed.order_id).await.expect("get");
    assert_eq!(got.status(), OrderStatus::Cancelled);
    let p = got.payment.expect("payment");
    assert_eq!(
        (p.captured_minor, p.refunded_minor, p.refund_due_minor),
        (placed.total_minor, placed.total_minor, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_shard_checkout_whose_caller_leaves_still_empties_a_cart_elsewhere() {
    // A 1PC order (its SKU and id on one shard) checked out from a cart on
    // another shard: the cart is emptied by a second command, which the
    // nodes hold back 1.5 s; the caller goes away meanwhile.
    let (c, _inv, mut orders, skus) = cluster_with("checkout-before-clear=return(1500)").await;
    let (order_id, customer, _) = checkouts_with_a_cart_elsewhere(&skus, "left")
        .into_iter()
        .next()
        .expect("a single-shard case");
    let mut cart = CartClient::new(channel(&c.node(2).client).await.expect("connect"));
    add_one_of_each(&mut cart, &customer, &skus[..1]).await;
    let mut via1 = OrdersClient::new(channel(&c.node(1).client).await.expect("connect 1"));
    let req = checkout(&order_id, &customer);
    let call = tokio::spawn(async move { via1.place(req).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    call.abort();
    let within = Duration::from_millis(3000);
    wait_placed_and_cart_emptied(&mut orders, &mut cart, &order_id, &customer, within).await;
}

/// `customer`'s cart lines, read through `cart`.
async fn cart_lines(cart: &mut CartClient<Chan>, customer: &str) -> Vec<proto::CartLine> {
    cart.get(proto::GetCartRequest {
        customer_id: customer.into(),
    })
    .await
    .expect("cart")
    .into_inner()
    .lines
}

/// A checkout of `customer`'s cart under `order_id`.
fn checkout(order_id: &str, customer: &str) -> proto::PlaceOrderRequest {
    proto::PlaceOrderRequest {
        fence: None,
        order_id: order_id.into(),
        customer_id: customer.into(),
        lines: Vec::new(),
        from_cart: true,
    }
}

/// Two checkouts whose clear is a command of its own: a single-shard order
/// with its cart on another shard (1PC, then the clear), and an order over
/// every shard (2PC, then the clear). (order id, customer, SKUs in the cart.)
fn checkouts_with_a_cart_elsewhere(
    skus: &[String],
    tag: &str,
) -> Vec<(String, String, Vec<String>)> {
    let map = shopkv::router::ClusterMap::new(0, SHARDS, Default::default());
    let shard = map.shard_of_sku(&skus[0]);
    let one_shard = (
        (0..)
            .map(|i| format!("{tag}-near-{i}"))
            .find(|id| map.shard_of_order(id) == shard)
            .expect("an order id on the SKU's shard"),
        (0..)
            .map(|i| format!("{tag}-far-{i}"))
            .find(|cu| map.shard_of_customer(cu) != shard)
            .expect("a customer elsewhere"),
        vec![skus[0].clone()],
    );
    let every_shard = (
        format!("{tag}-across"),
        format!("{tag}-erin"),
        skus.to_vec(),
    );
    vec![one_shard, every_shard]
}

/// Fills `customer`'s cart with one of each of `cart_skus` and checks it out
/// under `order_id` through node 1, which dies right after placing the order
/// (every node runs with `checkout-after-order=return`). Returns the order,
/// read through node 2, having checked that the cart is still full.
async fn checkout_and_die(
    c: &mut TestCluster,
    orders: &mut OrdersClient<Chan>,
    cart: &mut CartClient<Chan>,
    (order_id, customer, cart_skus): &(String, String, Vec<String>),
) -> proto::Order {
    add_one_of_each(cart, customer, cart_skus).await;
    let mut via1 = OrdersClient::new(channel(&c.node(1).client).await.expect("connect 1"));
    let first = via1.place(checkout(order_id, customer)).await;
    assert!(
        first.is_err(),
        "node 1 answered instead of dying: {first:?}"
    );
    let died = Instant::now() + Duration::from_secs(10);
    while c.node_mut(1).is_running() {
        assert!(Instant::now() < died, "node 1 did not die after the order");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The window at stake: the order exists, the cart is full.
    let deadline = Instant::now() + Duration::from_secs(15);
    let placed = loop {
        match get_order(orders, order_id).await {
            Ok(o) => break o,
            // Leaderless shards while node 1's leaderships move.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the first attempt's order {order_id} is not there: {e:?}"),
        }
    };
    assert_eq!(cart_lines(cart, customer).await.len(), cart_skus.len());
    placed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_checkout_empties_the_cart_its_dead_first_attempt_left_full() {
    // The client retries each checkout (same order id) through node 2, which
    // finds the order placed and empties the cart before answering.
    let (mut c, _inv, mut orders, skus) = cluster_with("checkout-after-order=return").await;
    let mut cart = CartClient::new(channel(&c.node(2).client).await.expect("connect"));
    for case in checkouts_with_a_cart_elsewhere(&skus, "retried") {
        let placed = checkout_and_die(&mut c, &mut orders, &mut cart, &case).await;
        let (order_id, customer, _) = &case;
        let deadline = Instant::now() + Duration::from_secs(15);
        let retried = loop {
            match orders.place(checkout(order_id, customer)).await {
                Ok(o) => break o.into_inner(),
                Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("the retried checkout {order_id} failed: {e:?}"),
            }
        };
        assert_eq!(retried.order_id, placed.order_id);
        assert_eq!(retried.total_minor, placed.total_minor);
        assert_eq!(
            cart_lines(&mut cart, customer).await,
            Vec::new(),
            "{order_id}: the retried checkout answered but left the cart full"
        );
        c.restart(1);
        c.wait_ready(Duration::from_secs(30)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_whose_node_died_before_emptying_the_cart_has_it_emptied_without_a_retry() {
    // Nobody retries: the order owes the clear, and the order shard's
    // sweeper empties the cart once the checkout's 5 s grace is over.
    let (mut c, _inv, mut orders, skus) = cluster_with("checkout-after-order=return").await;
    let mut cart = CartClient::new(channel(&c.node(2).client).await.expect("connect"));
    for case in checkouts_with_a_cart_elsewhere(&skus, "unretried") {
        checkout_and_die(&mut c, &mut orders, &mut cart, &case).await;
        let (order_id, customer, _) = &case;
        let deadline = Instant::now() + Duration::from_secs(15);
        while !cart_lines(&mut cart, customer).await.is_empty() {
            assert!(
                Instant::now() < deadline,
                "{order_id}: the cart its dead checkout left full was not emptied"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        c.restart(1);
        c.wait_ready(Duration::from_secs(30)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_retried_while_its_first_attempt_finishes_answers_with_the_order() {
    // Every checkout waits 1 s before reading the cart. The retry starts
    // 0.5 s after the first attempt: it finds no order yet, and by the time
    // it reads the cart the first attempt has placed the order and emptied
    // the cart. It must answer with that order, not "the cart is empty".
    let (c, _inv, _orders, skus) = cluster_with("checkout-before-cart-read=return(1000)").await;
    let mut cart = CartClient::new(channel(&c.node(2).client).await.expect("connect"));
    add_one_of_each(&mut cart, "frank", &skus).await;
    let mut via1 = OrdersClient::new(channel(&c.node(1).client).await.expect("connect 1"));
    let first = tokio::spawn(async move { via1.place(checkout("raced", "frank")).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut via2 = OrdersClient::new(channel(&c.node(2).client).await.expect("connect 2"));
    let retried = via2.place(checkout("raced", "frank")).await;
    let first = first.await.expect("first attempt");
    let first = first
        .expect("the first attempt places the order")
        .into_inner();
    let retried = retried
        .expect("the retry answers with the order")
        .into_inner();
    assert_eq!(retried.order_id, first.order_id);
    assert_eq!(retried.version, first.version);
    assert_eq!(cart_lines(&mut cart, "frank").await, Vec::new());
}
