//! The commerce services on a real 3-node cluster (`shopkv serve` processes):
//! every rule of catalog, inventory, carts and orders, the payment flow, order
//! expiry, and the seed's story (cart → order → pay → ship) through gRPC.

mod common;

use std::time::{Duration, Instant};

use common::shop::{product, shop};
use common::{TestCluster, channel};
use shopkv::proto::{self, OrderStatus};
use tonic::Code;

const APPROVE: &str = "4242424242424242";
const DECLINE: &str = "4000000000000002";
const PROVIDER_ERROR: &str = "4000000000000119";

fn id(order_id: &str) -> proto::OrderIdRequest {
    proto::OrderIdRequest {
        fence: None,
        order_id: order_id.into(),
    }
}

/// Asserts a rejection: its code and its `x-shopkv-reason`.
#[track_caller]
fn rejected<T: std::fmt::Debug>(res: Result<T, tonic::Status>, code: Code, reason: &str) -> String {
    let s = res.expect_err("expected a rejection");
    assert_eq!(s.code(), code, "{s:?}");
    let got = s
        .metadata()
        .get("x-shopkv-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert_eq!(got, reason, "{s:?}");
    s.message().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_inventory_and_carts_route_by_key_and_enforce_their_rules() {
    let c = TestCluster::start_initialised(3, 3, &[]).await;
    let mut s = shop(&c, 2).await;

    // 25 products over 3 shards, listed in SKU order a page at a time.
    for i in 0..25 {
        let p = s
            .put(product(&format!("SKU-{i:03}"), 100 + i, "EUR"))
            .await
            .expect("put");
        assert!(p.version > 0);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = s
            .catalog
            .list(proto::ListProductsRequest {
                page_size: 10,
                page_token: token,
            })
            .await
            .expect("list")
            .into_inner();
        assert!(page.products.len() <= 10);
        seen.extend(page.products.into_iter().map(|p| p.sku));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("SKU-{i:03}")).collect();
    assert_eq!(seen, expected);

    // Bad products: nothing is written.
    rejected(
        s.put(product("bad sku", 1, "EUR")).await,
        Code::InvalidArgument,
        "INVALID_ID",
    );
    rejected(
        s.put(product("P-NEG", -1, "EUR")).await,
        Code::InvalidArgument,
        "INVALID_PRODUCT",
    );
    rejected(
        s.put(product("P-CUR", 1, "EURO")).await,
        Code::InvalidArgument,
        "INVALID_PRODUCT",
    );
    let missing = s
        .catalog
        .get(proto::GetProductRequest {
            sku: "P-NEG".into(),
            serializable: false,
        })
        .await;
    rejected(missing, Code::NotFound, "UNKNOWN_SKU");

    // Stock: set, adjust, never below reserved (here 0) or for unknown SKUs.
    let l = s.set_stock("SKU-001", 10).await.expect("set");
    assert_eq!((l.on_hand, l.reserved, l.available), (10, 0, 10));
    let l = s
        .inventory
        .adjust_stock(proto::AdjustStockRequest {
            fence: None,
            sku: "SKU-001".into(),
            delta: -4,
        })
        .await
        .expect("adjust")
        .into_inner();
    assert_eq!(l.on_hand, 6);
    let below = s
        .inventory
        .adjust_stock(proto::AdjustStockRequest {
            fence: None,
            sku: "SKU-001".into(),
            delta: -7,
        })
        .await;
    // Below zero is a bad quantity; below reserved stock is tested with orders.
    rejected(below, Code::InvalidArgument, "BAD_QUANTITY");
    rejected(s.set_stock("NOPE", 5).await, Code::NotFound, "UNKNOWN_SKU");
    assert_eq!(s.stock("SKU-001").await.on_hand, 6);

    // Carts: merge lines, limits, remove, clear; the product must be orderable.
    let mut limited = product("LIMITED", 500, "EUR");
    limited.max_per_order = 2;
    s.put(limited).await.expect("put limited");
    s.add("carol", "SKU-001", 1).await.expect("add");
    let cart = s.add("carol", "SKU-001", 2).await.expect("add again");
    assert_eq!(cart.lines.len(), 1);
    assert_eq!(cart.lines[0].quantity, 3);
    s.add("carol", "LIMITED", 2).await.expect("add limited");
    rejected(
        s.add("carol", "LIMITED", 1).await,
        Code::InvalidArgument,
        "OVER_MAX_PER_ORDER",
    );
    rejected(
        s.add("carol", "SKU-002", 0).await,
        Code::InvalidArgument,
        "BAD_QUANTITY",
    );
    rejected(
        s.add("carol", "SKU-002", -1).await,
        Code::InvalidArgument,
        "BAD_QUANTITY",
    );
    rejected(
        s.add("carol", "NOPE", 1).await,
        Code::NotFound,
        "UNKNOWN_SKU",
    );
    s.catalog
        .deactivate(proto::DeactivateProductRequest {
            fence: None,
            sku: "SKU-024".into(),
        })
        .await
        .expect("deactivate");
    rejected(
        s.add("carol", "SKU-024", 1).await,
        Code::FailedPrecondition,
        "INACTIVE_PRODUCT",
    );
    let cart = s
        .cart
        .update_quantity(proto::UpdateCartItemRequest {
            fence: None,
            customer_id: "carol".into(),
            sku: "SKU-001".into(),
            quantity: 5,
        })
        .await
        .expect("update")
        .into_inner();
    assert_eq!(cart.lines[0].quantity, 5);
    let gone = s
        .cart
        .remove_item(proto::RemoveCartItemRequest {
            fence: None,
            customer_id: "carol".into(),
            sku: "SKU-009".into(),
        })
        .await;
    rejected(gone, Code::NotFound, "NOT_IN_CART");
    let cart = s
        .cart
        .remove_item(proto::RemoveCartItemRequest {
            fence: None,
            customer_id: "carol".into(),
            sku: "LIMITED".into(),
        })
        .await
        .expect("remove")
        .into_inner();
    assert_eq!(cart.lines.len(), 1);
    // Read through another node: the same cart.
    let mut other = shop(&c, 3).await;
    let seen = other
        .cart
        .get(proto::GetCartRequest {
            customer_id: "carol".into(),
        })
        .await
        .expect("get cart")
        .into_inner();
    assert_eq!(seen.lines, cart.lines);
    let cleared = s
        .cart
        .clear(proto::ClearCartRequest {
            fence: None,
            customer_id: "carol".into(),
        })
        .await
        .expect("clear")
        .into_inner();
    assert!(cleared.lines.is_empty());

    // Orders: one SKU with a server-chosen id fits one shard (1PC); lines on
    // different shards go through 2PC. Either way each line is reserved once.
    for i in 0..25 {
        s.set_stock(&format!("SKU-{i:03}"), 50)
            .await
            .expect("stock");
    }
    let o = s
        .place("dave", "", &[("SKU-003", 2)])
        .await
        .expect("single-shard order");
    assert_eq!(o.status(), OrderStatus::PendingPayment);
    assert_eq!(s.stock("SKU-003").await.reserved, 2);
    let mut shards = std::collections::BTreeSet::new();
    // SKU-024 is inactive: pairs stop before it.
    for i in 0..23 {
        let a = format!("SKU-{i:03}");
        let b = format!("SKU-{:03}", i + 1);
        let before = (s.stock(&a).await.reserved, s.stock(&b).await.reserved);
        let o = s
            .place("dave", "", &[(&a, 1), (&b, 1)])
            .await
            .expect("two-line order");
        shards.insert(o.shard);
        assert_eq!(
            (s.stock(&a).await.reserved, s.stock(&b).await.reserved),
            (before.0 + 1, before.1 + 1)
        );
    }
    assert!(shards.len() > 1, "orders spread over shards: {shards:?}");

    // Server reflection lists every public service (grpcurl needs no protos).
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(channel(&c.node(1).client).await.expect("connect"));
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let reply = replies.message().await.expect("reply").expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for svc in [
        "shopkv.v1.Catalog",
        "shopkv.v1.Inventory",
        "shopkv.v1.Cart",
        "shopkv.v1.Orders",
        "shopkv.v1.Kv",
    ] {
        assert!(names.iter().any(|n| n == svc), "{svc} not in {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_pay_ship_cancel_and_reject_bad_input_without_changing_anything() {
    let c = TestCluster::start_initialised(3, 1, &[]).await;
    let mut s = shop(&c, 1).await;
    let mut tee = product("TEE", 1999, "EUR");
    tee.max_per_order = 5;
    s.put(tee).await.expect("put");
    s.put(product("MUG", 899, "EUR")).await.expect("put");
    s.put(product("HAT", 1500, "USD")).await.expect("put");
    s.put(product("GOLD", 1_000_000_000_000_000, "EUR"))
        .await
        .expect("put");
    for sku in ["TEE", "MUG", "HAT", "GOLD"] {
        s.set_stock(sku, 20).await.expect("stock");
    }

    // Idempotent place, also under concurrency: one order, stock reserved once.
    let o = s
        .place("alice", "o-1", &[("TEE", 2), ("MUG", 1)])
        .await
        .expect("place");
    assert_eq!(o.total_minor, 2 * 1999 + 899);
    assert_eq!(
        o.lines[0].unit_price_minor, 899,
        "lines sorted by SKU, prices snapshotted"
    );
    let again = s
        .place("alice", "o-1", &[("TEE", 2), ("MUG", 1)])
        .await
        .expect("replay");
    assert_eq!(again.version, o.version);
    let mut tasks = Vec::new();
    for via in [1, 2, 3, 1, 2, 3] {
        let mut sh = shop(&c, via).await;
        tasks.push(tokio::spawn(async move {
            sh.place("bob", "o-2", &[("MUG", 3)])
                .await
                .map(|o| o.version)
        }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await.expect("task").expect("concurrent place"));
    }
    versions.dedup();
    assert_eq!(versions.len(), 1, "one order for one id: {versions:?}");
    assert_eq!(s.stock("MUG").await.reserved, 1 + 3);
    assert_eq!(s.stock("TEE").await.reserved, 2);

    // Bad input: a clear status, and stock and orders untouched.
    let before = (s.stock("TEE").await, s.stock("MUG").await);
    rejected(
        s.place("alice", "o-3", &[("NOPE", 1)]).await,
        Code::NotFound,
        "UNKNOWN_SKU",
    );
    rejected(
        s.place("alice", "o-3", &[("TEE", 0)]).await,
        Code::InvalidArgument,
        "BAD_QUANTITY",
    );
    rejected(
        s.place("alice", "o-3", &[("TEE", 6)]).await,
        Code::InvalidArgument,
        "OVER_MAX_PER_ORDER",
    );
    rejected(
        s.place("alice", "o-3", &[("TEE", 1), ("HAT", 1)]).await,
        Code::InvalidArgument,
        "CURRENCY_MISMATCH",
    );
    rejected(
        s.place("alice", "o-3", &[("GOLD", 10_000)]).await,
        Code::InvalidArgument,
        "OVERFLOW",
    );
    rejected(
        s.place("alice", "o-3", &[("MUG", 17)]).await,
        Code::FailedPrecondition,
        "OUT_OF_STOCK",
    );
    rejected(
        s.place("alice", "o-3", &[]).await,
        Code::InvalidArgument,
        "EMPTY_ORDER",
    );
    let many: Vec<(String, u32)> = (0..1000).map(|i| (format!("S{i}"), 1)).collect();
    let many_ref: Vec<(&str, u32)> = many.iter().map(|(s, q)| (s.as_str(), *q)).collect();
    rejected(
        s.place("alice", "o-3", &many_ref).await,
        Code::InvalidArgument,
        "TOO_MANY_LINES",
    );
    rejected(
        s.place("alice", "o-1", &[("TEE", 1)]).await,
        Code::FailedPrecondition,
        "ORDER_ID_REUSED",
    );
    let empty_cart = s
        .orders
        .place(proto::PlaceOrderRequest {
            fence: None,
            order_id: "o-3".into(),
            customer_id: "nobody".into(),
            lines: vec![],
            from_cart: true,
        })
        .await;
    rejected(empty_cart, Code::InvalidArgument, "EMPTY_ORDER");
    rejected(s.order("o-3").await, Code::NotFound, "UNKNOWN_ORDER");
    rejected(
        s.orders.ship(id("o-404")).await,
        Code::NotFound,
        "UNKNOWN_ORDER",
    );
    let msg = rejected(
        s.orders.ship(id("o-1")).await,
        Code::FailedPrecondition,
        "ILLEGAL_TRANSITION",
    );
    assert!(
        msg.contains("pending_payment"),
        "names the current state: {msg}"
    );
    rejected(
        s.set_stock("MUG", 3).await,
        Code::FailedPrecondition,
        "BELOW_RESERVED",
    );
    assert_eq!((s.stock("TEE").await, s.stock("MUG").await), before);

    // Pay: a decline is FAILED_PRECONDITION, a provider error UNAVAILABLE, and
    // neither changes the order; retries never charge twice.
    let declined = rejected(
        s.pay("o-1", DECLINE).await,
        Code::FailedPrecondition,
        "PAYMENT_DECLINED",
    );
    assert!(declined.contains("declined"), "{declined}");
    let err = s
        .pay("o-1", PROVIDER_ERROR)
        .await
        .expect_err("provider error");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let bad_card = s.pay("o-1", "1234").await.expect_err("bad card");
    assert_eq!(bad_card.code(), Code::InvalidArgument);
    assert_eq!(
        s.order("o-1").await.expect("get").status(),
        OrderStatus::PendingPayment
    );
    let paid = s.pay("o-1", APPROVE).await.expect("pay");
    assert_eq!(paid.status(), OrderStatus::Paid);
    let p = paid.payment.clone().expect("payment");
    assert_eq!((p.captured_minor, p.failed_attempts), (paid.total_minor, 1));
    assert_eq!(
        p.idempotency_key, "o-1:2",
        "the declined attempt used o-1:1"
    );
    assert_eq!(p.card_last4, "4242");
    let retried = shop(&c, 3)
        .await
        .pay("o-1", APPROVE)
        .await
        .expect("retry pay");
    assert_eq!(
        retried.payment, paid.payment,
        "a retried Pay charges nothing more"
    );

    // Ship consumes the reservation; deliver; no cancel after shipping.
    let shipped = s.orders.ship(id("o-1")).await.expect("ship").into_inner();
    assert_eq!(shipped.status(), OrderStatus::Shipped);
    let tee = s.stock("TEE").await;
    assert_eq!((tee.on_hand, tee.reserved), (18, 0));
    s.orders.deliver(id("o-1")).await.expect("deliver");
    let msg = rejected(
        s.orders.cancel(id("o-1")).await,
        Code::FailedPrecondition,
        "ILLEGAL_TRANSITION",
    );
    assert!(msg.contains("delivered"), "{msg}");

    // Cancel a paid order: stock released, capture refunded.
    s.pay("o-2", APPROVE).await.expect("pay o-2");
    let cancelled = s
        .orders
        .cancel(id("o-2"))
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.status(), OrderStatus::Cancelled);
    let p = cancelled.payment.expect("payment");
    assert_eq!(
        (p.refunded_minor, p.refund_due_minor),
        (p.captured_minor, 0)
    );
    assert!(p.captured_minor > 0);
    let mug = s.stock("MUG").await;
    assert_eq!((mug.on_hand, mug.reserved), (19, 0));
    rejected(
        s.pay("o-2", APPROVE).await,
        Code::FailedPrecondition,
        "ILLEGAL_TRANSITION",
    );

    // The customer's orders, by id.
    s.place("alice", "o-0", &[("MUG", 1)])
        .await
        .expect("place o-0");
    let list = s
        .orders
        .list_by_customer(proto::ListOrdersRequest {
            customer_id: "alice".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<&str> = list.orders.iter().map(|o| o.order_id.as_str()).collect();
    assert_eq!(ids, ["o-0", "o-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_story_cart_to_order_to_payment_to_shipping() {
    // 3 shards: the cart, the products and the order may all live apart; the
    // server picks an order id on the products' shard.
    let c = TestCluster::start_initialised(3, 3, &[]).await;
    let mut s = shop(&c, 1).await;
    s.put(product("BOOK", 2500, "EUR")).await.expect("put");
    s.set_stock("BOOK", 3).await.expect("stock");

    s.add("erin", "BOOK", 2).await.expect("add to cart");
    let o = s
        .orders
        .place(proto::PlaceOrderRequest {
            fence: None,
            order_id: String::new(),
            customer_id: "erin".into(),
            lines: vec![],
            from_cart: true,
        })
        .await
        .expect("checkout")
        .into_inner();
    assert_eq!(
        (o.status(), o.total_minor),
        (OrderStatus::PendingPayment, 5000)
    );
    let cart = s
        .cart
        .get(proto::GetCartRequest {
            customer_id: "erin".into(),
        })
        .await
        .expect("cart")
        .into_inner();
    assert!(cart.lines.is_empty(), "checkout empties the cart");
    assert_eq!(s.stock("BOOK").await.available, 1);
    // Another customer cannot take the reserved units.
    rejected(
        s.place("frank", "", &[("BOOK", 2)]).await,
        Code::FailedPrecondition,
        "OUT_OF_STOCK",
    );

    let paid = s.pay(&o.order_id, APPROVE).await.expect("pay");
    assert_eq!(paid.status(), OrderStatus::Paid);
    let shipped = s
        .orders
        .ship(id(&o.order_id))
        .await
        .expect("ship")
        .into_inner();
    assert_eq!(shipped.status(), OrderStatus::Shipped);
    let book = s.stock("BOOK").await;
    assert_eq!((book.on_hand, book.reserved, book.available), (1, 0, 1));
    let seen = shop(&c, 2)
        .await
        .order(&o.order_id)
        .await
        .expect("get via node 2");
    assert_eq!(seen.status(), OrderStatus::Shipped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpaid_orders_expire_and_release_their_stock() {
    let c = TestCluster::start_initialised(3, 1, &["--order-payment-timeout-ms", "1500"]).await;
    let mut s = shop(&c, 1).await;
    s.put(product("LAMP", 4000, "EUR")).await.expect("put");
    s.set_stock("LAMP", 2).await.expect("stock");
    let o = s
        .place("gina", "late-1", &[("LAMP", 2)])
        .await
        .expect("place");
    assert!(o.expires_at_ms >= o.placed_at_ms + 1500);
    assert_eq!(s.stock("LAMP").await.available, 0);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = s.order("late-1").await.expect("get");
        if now.status() == OrderStatus::Expired {
            break;
        }
        assert_eq!(now.status(), OrderStatus::PendingPayment);
        assert!(Instant::now() < deadline, "order did not expire");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lamp = s.stock("LAMP").await;
    assert_eq!(
        (lamp.on_hand, lamp.reserved),
        (2, 0),
        "expiry released the stock"
    );
    let msg = rejected(
        s.pay("late-1", APPROVE).await,
        Code::FailedPrecondition,
        "ILLEGAL_TRANSITION",
    );
    assert!(msg.contains("expired"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_cancelled_while_its_card_is_authorized_is_never_charged() {
    let c = TestCluster::start_initialised(3, 1, &[]).await;
    let mut s = shop(&c, 1).await;
    let mut other = shop(&c, 2).await;
    s.add_product("RUG", 9900, "EUR", 3).await;
    s.place("erin", "o-rug", &[("RUG", 1)])
        .await
        .expect("place");
    // The authorization takes 1 s; the order is cancelled meanwhile. The
    // hold is not recorded against a cancelled order, so nothing is captured
    // (and nothing needs a refund).
    let pay = tokio::spawn(async move { s.pay("o-rug", shopkv::payment::CARD_SLOW).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    other
        .orders
        .cancel(proto::OrderIdRequest {
            order_id: "o-rug".into(),
            fence: None,
        })
        .await
        .expect("cancel");
    let e = pay
        .await
        .expect("join")
        .expect_err("a cancelled order is not paid");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let got = other.order("o-rug").await.expect("get");
    assert_eq!(got.status(), OrderStatus::Cancelled);
    let p = got.payment.unwrap_or_default();
    assert_eq!((p.captured_minor, p.refund_due_minor), (0, 0));
    assert_eq!(other.stock("RUG").await.reserved, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_is_recorded_even_if_its_caller_leaves_while_the_provider_answers() {
    let c = TestCluster::start_initialised(3, 1, &[]).await;
    let mut s = shop(&c, 1).await;
    s.put(product("LAMP", 4500, "EUR")).await.expect("put");
    s.set_stock("LAMP", 5).await.expect("stock");
    let o = s
        .place("carol", "o-slow", &[("LAMP", 1)])
        .await
        .expect("place");
    // The provider takes 1 s to answer this card; the caller gives up after
    // 300 ms. Its charge is under way: the order must end up paid (a retry
    // would have found it so), not unpaid with the money taken.
    let mut req = tonic::Request::new(proto::PayOrderRequest {
        fence: None,
        order_id: "o-slow".into(),
        card_number: shopkv::payment::CARD_SLOW.into(),
    });
    req.set_timeout(Duration::from_millis(300));
    let e = s.orders.pay(req).await.expect_err("the caller gave up");
    assert!(
        matches!(e.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{e:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = s.order("o-slow").await.expect("get");
        if got.status() == OrderStatus::Paid {
            let p = got.payment.expect("payment");
            assert_eq!(p.captured_minor, o.total_minor);
            assert_eq!(p.card_last4, "0077");
            break;
        }
        assert_eq!(got.status(), OrderStatus::PendingPayment);
        assert!(
            Instant::now() < deadline,
            "the payment under way when its caller left was not recorded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
