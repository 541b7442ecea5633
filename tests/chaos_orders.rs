//! Chaos for the commerce records: concurrent single-shard (1PC) and
//! cross-shard (2PC) orders, checkouts of carts, a flash sale of one SKU, pays, cancels and
//! shipments on a 3-node, 3-shard cluster while a seeded nemesis kills
//! (SIGKILL), pauses (SIGSTOP) and partitions nodes, with orders expiring,
//! transactions timing out and aborted orders' tombstones pruned meanwhile. After heal and a bounded settle it
//! checks, per SKU, stock conservation (initial = on_hand + shipped),
//! reserved = Σ open orders (anchor and participants agree on every
//! outcome), no oversell ever observed, nothing left in flight (no pending
//! transaction, owed settlement or held reservation); per order, no
//! acknowledged order lost or changed, no duplicate, final statuses
//! consistent with every acknowledged transition, and money settled; per
//! customer, the cart of its last checkout emptied if that order exists and
//! untouched if not; and every aborted order forgotten once its tombstones
//! pass the retention.
//!
//! `SHOPKV_CHAOS_ORDERS_SECS` (default 30), `SHOPKV_CHAOS_SEED` and
//! `SHOPKV_CHAOS_NODES=5` change the run.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestCluster;
use common::proxy::LinkMode;
use common::shop::{get_order, reason};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shopkv::proto::cart_client::CartClient;
use shopkv::proto::inventory_client::InventoryClient;
use shopkv::proto::orders_client::OrdersClient;
use shopkv::proto::{self, OrderStatus};
use shopkv::router::ClusterMap;
use tonic::transport::Channel;

const SHARDS: u32 = 3;
const SKUS: u32 = 9;
const INITIAL_STOCK: i64 = 40;
/// The flash-sale SKU (index SKUS): few units, everyone buys one.
const FLASH_STOCK: i64 = 25;
const CLIENTS: u32 = 8;
const OP_TIMEOUT: Duration = Duration::from_millis(2000);
const SETTLE: Duration = Duration::from_secs(45);
const APPROVE: &str = "4242424242424242";
const DECLINE: &str = "4000000000000002";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sku(i: u32) -> String {
    format!("CH-{i:02}")
}

fn initial(sku: &str) -> i64 {
    if sku == flash() {
        FLASH_STOCK
    } else {
        INITIAL_STOCK
    }
}

fn flash() -> String {
    sku(SKUS)
}

/// What clients learned for certain about one order.
#[derive(Clone, Debug, Default)]
struct Known {
    /// Lines asked for (sku, qty), sorted.
    lines: Vec<(String, u32)>,
    /// Place acknowledged: the version it returned.
    placed_version: Option<u64>,
    /// Place outcome never learned.
    maybe: bool,
    paid: bool,
    cancelled: bool,
    shipped: bool,
}

/// A client's last checkout: order id, customer, the cart's lines.
type Checkout = (String, String, Vec<(String, u32)>);

struct Run {
    orders: Mutex<BTreeMap<String, Known>>,
    /// Per client, its last checkout (None: its cart's content is unknown).
    checkouts: Mutex<BTreeMap<u32, Option<Checkout>>>,
    violations: Mutex<Vec<String>>,
    stop: AtomicBool,
    ops: AtomicU32,
    unknown: AtomicU32,
}

impl Run {
    fn violation(&self, v: String) {
        if let Ok(mut vs) = self.violations.lock() {
            vs.push(v);
        }
    }

    fn placed_ids(&self) -> Vec<String> {
        self.orders
            .lock()
            .map(|o| {
                o.iter()
                    .filter(|(_, k)| k.placed_version.is_some())
                    .map(|(id, _)| id.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Known)) {
        if let Ok(mut o) = self.orders.lock() {
            f(o.entry(id.to_string()).or_default());
        }
    }
}

fn not_applied(s: &tonic::Status) -> bool {
    match s.metadata().get("x-shopkv-outcome") {
        Some(v) => v.as_bytes() == b"not-applied",
        None => s.code() == tonic::Code::Unavailable && s.message().contains("tcp connect error"),
    }
}

struct Clients {
    orders: Vec<OrdersClient<Channel>>,
    inventory: Vec<InventoryClient<Channel>>,
    carts: Vec<CartClient<Channel>>,
}

fn clients(endpoints: &[String]) -> Clients {
    let chans: Vec<Channel> = endpoints
        .iter()
        .map(|e| {
            tonic::transport::Endpoint::from_shared(format!("http://{e}"))
                .expect("endpoint")
                .connect_timeout(Duration::from_millis(300))
                .timeout(OP_TIMEOUT)
                .connect_lazy()
        })
        .collect();
    Clients {
        orders: chans.iter().cloned().map(OrdersClient::new).collect(),
        carts: chans.iter().cloned().map(CartClient::new).collect(),
        inventory: chans.into_iter().map(InventoryClient::new).collect(),
    }
}

enum Answer<T> {
    Ok(T),
    Rejected(tonic::Status),
    Unknown,
}

async fn call<T, F, Fut>(f: F) -> Answer<T>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    match tokio::time::timeout(OP_TIMEOUT, f()).await {
        Ok(Ok(r)) => Answer::Ok(r.into_inner()),
        Ok(Err(s)) if not_applied(&s) => Answer::Rejected(s),
        _ => Answer::Unknown,
    }
}

/// Empties `customer`'s cart and adds `lines` to it; false if any step's
/// outcome is not certain (the cart's content is then unknown).
async fn fill_cart(cart: &CartClient<Channel>, customer: &str, lines: &[(String, u32)]) -> bool {
    let mut cart = cart.clone();
    let clear = proto::ClearCartRequest {
        customer_id: customer.to_string(),
        fence: None,
    };
    let mut c = cart.clone();
    if !matches!(
        call(|| async move { c.clear(clear).await }).await,
        Answer::Ok(_)
    ) {
        return false;
    }
    for (sku, qty) in lines {
        let add = proto::AddCartItemRequest {
            customer_id: customer.to_string(),
            sku: sku.clone(),
            quantity: i64::from(*qty),
            fence: None,
        };
        let mut c = cart.clone();
        if !matches!(
            call(|| async move { c.add_item(add).await }).await,
            Answer::Ok(_)
        ) {
            return false;
        }
    }
    // Read back: an add acknowledged means applied, but be exact.
    let get = proto::GetCartRequest {
        customer_id: customer.to_string(),
    };
    match call(|| async move { cart.get(get).await }).await {
        Answer::Ok(v) => {
            let got: Vec<(String, u32)> = v
                .lines
                .iter()
                .map(|l| (l.sku.clone(), l.quantity))
                .collect();
            got == lines
        }
        _ => false,
    }
}

async fn client_loop(run: Arc<Run>, endpoints: Vec<String>, client: u32, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let c = clients(&endpoints);
    let map = ClusterMap::new(0, SHARDS, BTreeMap::new());
    let mut by_shard: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for i in 0..SKUS {
        by_shard
            .entry(map.shard_of_sku(&sku(i)))
            .or_default()
            .push(sku(i));
    }
    let shards: Vec<u64> = by_shard.keys().copied().collect();
    let mut n = 0u32;
    // A cart operation whose outcome the client does not know may still apply
    // later (a proposal can commit after its caller gave up, as in etcd): a
    // clear that lands after the next fill empties a cart the check expects
    // full (seed 401432931, 5 nodes: `CartClear` at index 2319 after the adds
    // of the checkout checked). So after one, the client shops as a new
    // customer, whose cart no straggler of the old one can touch.
    let mut cart_generation = 0u32;
    while !run.stop.load(Ordering::Relaxed) {
        run.ops.fetch_add(1, Ordering::Relaxed);
        let via = rng.random_range(0..endpoints.len());
        let mut orders = c.orders[via].clone();
        let roll = rng.random_range(0..100);
        if roll < 45 {
            // A quarter each: 1-2 lines of one shard under an order id there
            // (1PC); 2-3 lines of any shards (2PC); one unit of the flash SKU
            // (2PC unless the id happens to land on its shard); a checkout
            // of a cart of 1-3 lines of any shards.
            let kind = rng.random_range(0..4);
            let shard = shards[rng.random_range(0..shards.len())];
            let group = &by_shard[&shard];
            let mut lines: BTreeMap<String, u32> = BTreeMap::new();
            match kind {
                0 => {
                    for _ in 0..rng.random_range(1..=2) {
                        let s = group[rng.random_range(0..group.len())].clone();
                        *lines.entry(s).or_insert(0) += rng.random_range(1..=3);
                    }
                }
                1 | 3 => {
                    for _ in 0..rng.random_range(if kind == 1 { 2..=3 } else { 1..=3 }) {
                        *lines.entry(sku(rng.random_range(0..SKUS))).or_insert(0) +=
                            rng.random_range(1..=3);
                    }
                }
                _ => {
                    lines.insert(flash(), 1);
                }
            }
            let lines: Vec<(String, u32)> = lines.into_iter().collect();
            let id = loop {
                n += 1;
                let id = format!("c{client}-{n}");
                if kind != 0 || map.shard_of_order(&id) == shard {
                    break id;
                }
            };
            let customer = format!("cust-{client}-{cart_generation}");
            let checkout = kind == 3;
            if checkout {
                // The cart holds exactly these lines, or we do not know what
                // it holds (and check nothing about it).
                let filled = fill_cart(&c.carts[via], &customer, &lines).await;
                if let Ok(mut cs) = run.checkouts.lock() {
                    cs.insert(
                        client,
                        filled.then(|| (id.clone(), customer.clone(), lines.clone())),
                    );
                }
                if !filled {
                    cart_generation += 1;
                    continue;
                }
            }
            run.update(&id, |k| k.lines = lines.clone());
            let req = proto::PlaceOrderRequest {
                fence: None,
                order_id: id.clone(),
                customer_id: customer,
                lines: if checkout {
                    Vec::new()
                } else {
                    lines
                        .iter()
                        .map(|(s, q)| proto::CartLine {
                            sku: s.clone(),
                            quantity: *q,
                        })
                        .collect()
                },
                from_cart: checkout,
            };
            // An unknown outcome is retried with the same id (never a new
            // order): the answer then says what happened.
            let mut answer = Answer::Unknown;
            for attempt in 0..6 {
                let mut o = c.orders[(via + attempt) % endpoints.len()].clone();
                let r = req.clone();
                answer = call(|| async move { o.place(r).await }).await;
                if !matches!(answer, Answer::Unknown) || run.stop.load(Ordering::Relaxed) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            match answer {
                Answer::Ok(o) => {
                    let got: Vec<(String, u32)> = o
                        .lines
                        .iter()
                        .map(|l| (l.sku.clone(), l.quantity))
                        .collect();
                    if got != lines {
                        run.violation(format!("{id}: placed {lines:?}, got {got:?}"));
                    }
                    run.update(&id, |k| {
                        if let Some(v) = k.placed_version
                            && v != o.version
                        {
                            run.violation(format!(
                                "{id} placed twice: versions {v} and {}",
                                o.version
                            ));
                        }
                        k.placed_version = Some(o.version);
                        k.maybe = false;
                    });
                }
                Answer::Rejected(s) => {
                    // ORDER_ABORTED: recovery aborted it while we retried.
                    if !matches!(reason(&s).as_str(), "OUT_OF_STOCK" | "ORDER_ABORTED" | "") {
                        run.violation(format!("{id}: unexpected rejection {s:?}"));
                    }
                }
                Answer::Unknown => {
                    run.unknown.fetch_add(1, Ordering::Relaxed);
                    run.update(&id, |k| k.maybe = true);
                    // A checkout placed later would read whatever the cart
                    // then holds.
                    if checkout {
                        cart_generation += 1;
                    }
                }
            }
        } else if roll < 85 {
            let ids = run.placed_ids();
            if ids.is_empty() {
                continue;
            }
            let id = ids[rng.random_range(0..ids.len())].clone();
            let req = proto::OrderIdRequest {
                fence: None,
                order_id: id.clone(),
            };
            let (answer, event) = if roll < 65 {
                let card = if rng.random_bool(0.1) {
                    DECLINE
                } else {
                    APPROVE
                };
                let r = proto::PayOrderRequest {
                    fence: None,
                    order_id: id.clone(),
                    card_number: card.into(),
                };
                (call(|| async move { orders.pay(r).await }).await, "pay")
            } else if roll < 75 {
                (
                    call(|| async move { orders.cancel(req).await }).await,
                    "cancel",
                )
            } else {
                (call(|| async move { orders.ship(req).await }).await, "ship")
            };
            match answer {
                Answer::Ok(o) => run.update(&id, |k| match (event, o.status()) {
                    ("pay", OrderStatus::Paid | OrderStatus::Shipped | OrderStatus::Delivered) => {
                        k.paid = true
                    }
                    ("cancel", OrderStatus::Cancelled) => k.cancelled = true,
                    ("ship", OrderStatus::Shipped) => k.shipped = true,
                    (e, s) => run.violation(format!("{id}: {e} answered status {s:?}")),
                }),
                Answer::Unknown => {
                    run.unknown.fetch_add(1, Ordering::Relaxed);
                }
                Answer::Rejected(_) => {}
            }
        } else {
            // Stock is never oversold, whenever anyone looks.
            let s = sku(rng.random_range(0..=SKUS));
            let mut inv = c.inventory[via].clone();
            let req = proto::GetStockRequest {
                sku: s.clone(),
                serializable: false,
            };
            if let Answer::Ok(l) = call(|| async move { inv.get(req).await }).await
                && !(0 <= l.reserved && l.reserved <= l.on_hand && l.on_hand <= initial(&s))
            {
                run.violation(format!("{s}: oversold or invented stock {l:?}"));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_orders() {
    let secs = env_u64("SHOPKV_CHAOS_ORDERS_SECS", 30);
    let seed = env_u64(
        "SHOPKV_CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000),
    );
    let nodes = env_u64("SHOPKV_CHAOS_NODES", 3);
    assert!(
        nodes == 3 || nodes == 5,
        "SHOPKV_CHAOS_NODES must be 3 or 5"
    );
    eprintln!("chaos_orders: seed={seed} secs={secs} nodes={nodes}");
    let mut rng = StdRng::seed_from_u64(seed);
    let extra = [
        "--order-payment-timeout-ms",
        "6000",
        "--txn-timeout-ms",
        "3000",
        // Aborted orders' tombstones are pruned while the faults run.
        "--aborted-txn-retention-ms",
        "3000",
    ];
    let mut c = TestCluster::start_with_proxies(nodes, &extra).await;
    c.init(SHARDS).await;
    c.wait_ready(Duration::from_secs(30)).await;

    // The catalog, through the CLI's own gRPC services.
    let ch = common::channel(&c.node(1).client).await.expect("connect");
    let mut catalog = shopkv::proto::catalog_client::CatalogClient::new(ch.clone());
    let mut inventory = InventoryClient::new(ch);
    for i in 0..=SKUS {
        let product = proto::Product {
            sku: sku(i),
            title: format!("Chaos item {i}"),
            description: String::new(),
            price_minor: 100 + i64::from(i),
            currency: "EUR".into(),
            active: true,
            attributes: Default::default(),
            max_per_order: 0,
            version: 0,
        };
        catalog
            .put(proto::PutProductRequest {
                fence: None,
                product: Some(product),
            })
            .await
            .expect("put product");
        inventory
            .set_stock(proto::SetStockRequest {
                fence: None,
                sku: sku(i),
                on_hand: initial(&sku(i)),
            })
            .await
            .expect("set stock");
    }

    let run = Arc::new(Run {
        orders: Mutex::new(BTreeMap::new()),
        checkouts: Mutex::new(BTreeMap::new()),
        violations: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        ops: AtomicU32::new(0),
        unknown: AtomicU32::new(0),
    });
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(client_loop(
                run.clone(),
                c.endpoints(),
                i,
                seed.wrapping_mul(31).wrapping_add(u64::from(i)),
            ))
        })
        .collect();

    let (mut kills, mut pauses, mut partitions) = (0u32, 0u32, 0u32);
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        tokio::time::sleep(
            Duration::from_millis(rng.random_range(2000..4000)).min(end - Instant::now()),
        )
        .await;
        c.heal_links();
        c.revive_all();
        if Instant::now() >= end {
            break;
        }
        match rng.random_range(0..4) {
            0 => {
                let group = rng.random_range(0..=u64::from(SHARDS));
                if let Some(l) = c.leader_of(group, rng.random_range(1..=nodes)).await {
                    c.kill(l);
                    kills += 1;
                }
            }
            1 => {
                c.kill(rng.random_range(1..=nodes));
                kills += 1;
            }
            2 => {
                c.pause(rng.random_range(1..=nodes));
                pauses += 1;
            }
            _ => {
                // Isolate one node (a coordinator or anchor may be cut off mid-2PC).
                let id = rng.random_range(1..=nodes);
                let others: Vec<u64> = (1..=nodes).filter(|n| *n != id).collect();
                c.set_links(&[id], &others, LinkMode::Blackhole, true);
                partitions += 1;
            }
        }
    }
    c.heal_links();
    run.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    c.revive_all();
    c.wait_ready(SETTLE).await;

    // Settle: unpaid orders expire (6 s) and owed refunds are paid back; wait
    // until no order is pending payment or owes money, within a bound.
    let ch = common::channel(&c.node(1).client).await.expect("connect");
    let mut orders = OrdersClient::new(ch.clone());
    let mut carts = CartClient::new(ch.clone());
    let mut inventory = InventoryClient::new(ch);
    let known = run.orders.lock().map(|o| o.clone()).unwrap_or_default();
    let deadline = Instant::now() + SETTLE;
    // Orders read as aborted at some point after heal (they must be pruned).
    let mut seen_aborted = std::collections::BTreeSet::new();
    let finals: BTreeMap<String, Option<proto::Order>> = loop {
        let mut finals = BTreeMap::new();
        let mut unsettled = 0;
        for id in known.keys() {
            match get_order(&mut orders, id).await {
                Ok(o) => {
                    let p = o.payment.clone().unwrap_or_default();
                    if o.status() == OrderStatus::PendingPayment || p.refund_due_minor > 0 {
                        unsettled += 1;
                    }
                    finals.insert(id.clone(), Some(o));
                }
                // Never placed, or a cross-shard order that aborted (and
                // maybe pruned already).
                Err(s) if s.code() == tonic::Code::NotFound => {
                    finals.insert(id.clone(), None);
                }
                Err(s) if reason(&s) == "ORDER_ABORTED" => {
                    seen_aborted.insert(id.clone());
                    finals.insert(id.clone(), None);
                }
                // A cross-shard order still being decided (recovery will).
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    unsettled += 1;
                }
                Err(s) => panic!("reading order {id} after heal: {s:?}"),
            }
        }
        // 2PC: no pending record, owed settlement or held reservation anywhere.
        for shard in 1..=u64::from(SHARDS) {
            match common::in_flight(&c, 1, shard).await {
                Some(f)
                    if f.pending.is_empty() && f.settlements.is_empty() && f.held.is_empty() => {}
                _ => unsettled += 1,
            }
        }
        if unsettled == 0 {
            break finals;
        }
        assert!(
            Instant::now() < deadline,
            "{unsettled} orders still unsettled after {SETTLE:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let mut violations = run.violations.lock().map(|v| v.clone()).unwrap_or_default();
    let mut open: BTreeMap<String, i64> = BTreeMap::new();
    let mut shipped: BTreeMap<String, i64> = BTreeMap::new();
    let mut placed = 0;
    for (id, k) in &known {
        let Some(o) = finals.get(id).cloned().flatten() else {
            if k.placed_version.is_some() {
                violations.push(format!("acknowledged order {id} is lost"));
            }
            continue;
        };
        placed += 1;
        let lines: Vec<(String, u32)> = o
            .lines
            .iter()
            .map(|l| (l.sku.clone(), l.quantity))
            .collect();
        if lines != k.lines {
            violations.push(format!("{id}: asked {:?}, stored {lines:?}", k.lines));
        }
        if let Some(v) = k.placed_version
            && v != o.version
            && o.status() == OrderStatus::PendingPayment
        {
            violations.push(format!(
                "{id}: placed at version {v}, now {} but never changed",
                o.version
            ));
        }
        let st = o.status();
        let p = o.payment.clone().unwrap_or_default();
        let ok_after = |ok: &[OrderStatus]| ok.contains(&st);
        use OrderStatus as S;
        if k.paid && !ok_after(&[S::Paid, S::Shipped, S::Delivered, S::Cancelled]) {
            violations.push(format!("{id}: acknowledged paid, ended {st:?}"));
        }
        if k.cancelled && st != S::Cancelled {
            violations.push(format!("{id}: acknowledged cancelled, ended {st:?}"));
        }
        if k.shipped && !ok_after(&[S::Shipped, S::Delivered]) {
            violations.push(format!("{id}: acknowledged shipped, ended {st:?}"));
        }
        match st {
            S::Paid | S::Shipped | S::Delivered => {
                if p.captured_minor - p.refunded_minor != o.total_minor {
                    violations.push(format!(
                        "{id}: {st:?} but kept {} of {}",
                        p.captured_minor - p.refunded_minor,
                        o.total_minor
                    ));
                }
            }
            _ => {
                if p.captured_minor != p.refunded_minor {
                    violations.push(format!(
                        "{id}: {st:?} but kept {} captured",
                        p.captured_minor - p.refunded_minor
                    ));
                }
            }
        }
        for l in &o.lines {
            let q = i64::from(l.quantity);
            match st {
                S::PendingPayment | S::Paid => *open.entry(l.sku.clone()).or_insert(0) += q,
                S::Shipped | S::Delivered => *shipped.entry(l.sku.clone()).or_insert(0) += q,
                _ => {}
            }
        }
    }
    for i in 0..=SKUS {
        let s = sku(i);
        let l = inventory
            .get(proto::GetStockRequest {
                sku: s.clone(),
                serializable: false,
            })
            .await
            .expect("stock")
            .into_inner();
        let sold = shipped.get(&s).copied().unwrap_or(0);
        if l.on_hand + sold != initial(&s) {
            violations.push(format!(
                "{s}: not conserved: on_hand {} + shipped {sold} != {}",
                l.on_hand,
                initial(&s)
            ));
        }
        let held = open.get(&s).copied().unwrap_or(0);
        if l.reserved != held {
            violations.push(format!(
                "{s}: reserved {} but open orders hold {held}",
                l.reserved
            ));
        }
        if !(0 <= l.reserved && l.reserved <= l.on_hand) {
            violations.push(format!("{s}: oversold {l:?}"));
        }
    }
    // Each client's last checkout: placed, its cart is emptied (by the
    // checkout, a retry, or the sweeper within its 5 s grace); not placed,
    // the cart is as it was.
    let checkouts = run.checkouts.lock().map(|c| c.clone()).unwrap_or_default();
    let checkouts: Vec<Checkout> = checkouts.into_values().flatten().collect();
    let checked_carts = checkouts.len();
    let emptied_by = Instant::now() + Duration::from_secs(15);
    for (id, customer, lines) in checkouts {
        let placed = finals.get(&id).is_some_and(|o| o.is_some());
        loop {
            let got: Vec<(String, u32)> = carts
                .get(proto::GetCartRequest {
                    customer_id: customer.clone(),
                })
                .await
                .expect("cart")
                .into_inner()
                .lines
                .iter()
                .map(|l| (l.sku.clone(), l.quantity))
                .collect();
            let want = if placed { Vec::new() } else { lines.clone() };
            if got == want {
                break;
            }
            if !placed || Instant::now() >= emptied_by {
                violations.push(format!(
                    "checkout {id} (placed: {placed}): cart of {customer} is {got:?}, want {want:?}"
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    // Aborted orders are forgotten once their tombstones pass the retention
    // (3 s) on their anchor: each reads NOT_FOUND within a bound.
    let pruned_by = Instant::now() + Duration::from_secs(20);
    for id in finals.iter().filter(|(_, o)| o.is_none()).map(|(id, _)| id) {
        loop {
            match get_order(&mut orders, id).await {
                Err(s) if s.code() == tonic::Code::NotFound => break,
                Err(s) if reason(&s) == "ORDER_ABORTED" => {
                    seen_aborted.insert(id.clone());
                }
                other => {
                    violations.push(format!("aborted order {id} now reads {other:?}"));
                    break;
                }
            }
            if Instant::now() >= pruned_by {
                violations.push(format!("aborted order {id} not pruned within 20 s"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let summary = format!(
        "CHAOS_ORDERS seed={seed} secs={secs} nodes={nodes} kills={kills} pauses={pauses} partitions={partitions} ops={} unknown={} orders={placed} aborted={} carts={checked_carts} violations={}",
        run.ops.load(Ordering::Relaxed),
        run.unknown.load(Ordering::Relaxed),
        seen_aborted.len(),
        violations.len()
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{summary}\n").as_bytes());
    if placed < 20 {
        violations.push(format!("only {placed} orders placed: no progress"));
    }
    if !violations.is_empty() {
        let kept = c.keep();
        for v in &violations {
            eprintln!("  - {v}");
        }
        panic!(
            "{} violations (seed {seed}); data in {}",
            violations.len(),
            kept.display()
        );
    }
}
