//! Chaos for the commerce records: concurrent single-shard orders, pays,
//! cancels and shipments on a 3-node, 3-shard cluster while a seeded nemesis
//! kills (SIGKILL) and pauses (SIGSTOP) nodes, with orders expiring meanwhile.
//! After heal and a bounded settle it checks, per SKU, stock conservation
//! (initial = on_hand + shipped), reserved = Σ open orders, no oversell ever
//! observed; per order, no acknowledged order lost or changed, no duplicate,
//! final statuses consistent with every acknowledged transition, and money
//! settled (paid orders captured exactly once, refunds complete).
//!
//! `SHOPKV_CHAOS_ORDERS_SECS` (default 30) and `SHOPKV_CHAOS_SEED` change the run.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestCluster;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shopkv::proto::inventory_client::InventoryClient;
use shopkv::proto::orders_client::OrdersClient;
use shopkv::proto::{self, OrderStatus};
use shopkv::router::ClusterMap;
use tonic::transport::Channel;

const SHARDS: u32 = 3;
const SKUS: u32 = 9;
const INITIAL_STOCK: i64 = 40;
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

struct Run {
    orders: Mutex<BTreeMap<String, Known>>,
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
    while !run.stop.load(Ordering::Relaxed) {
        run.ops.fetch_add(1, Ordering::Relaxed);
        let via = rng.random_range(0..endpoints.len());
        let mut orders = c.orders[via].clone();
        let roll = rng.random_range(0..100);
        if roll < 45 {
            // Place 1-2 lines of one shard under an order id on that shard.
            let shard = shards[rng.random_range(0..shards.len())];
            let group = &by_shard[&shard];
            let mut lines: BTreeMap<String, u32> = BTreeMap::new();
            for _ in 0..rng.random_range(1..=2) {
                let s = group[rng.random_range(0..group.len())].clone();
                *lines.entry(s).or_insert(0) += rng.random_range(1..=3);
            }
            let lines: Vec<(String, u32)> = lines.into_iter().collect();
            let id = loop {
                n += 1;
                let id = format!("c{client}-{n}");
                if map.shard_of_order(&id) == shard {
                    break id;
                }
            };
            run.update(&id, |k| k.lines = lines.clone());
            let req = proto::PlaceOrderRequest {
                order_id: id.clone(),
                customer_id: format!("cust-{client}"),
                lines: lines
                    .iter()
                    .map(|(s, q)| proto::CartLine {
                        sku: s.clone(),
                        quantity: *q,
                    })
                    .collect(),
                from_cart: false,
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
                    let reason = s
                        .metadata()
                        .get("x-shopkv-reason")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    if !matches!(reason.as_str(), "OUT_OF_STOCK" | "") {
                        run.violation(format!("{id}: unexpected rejection {s:?}"));
                    }
                }
                Answer::Unknown => {
                    run.unknown.fetch_add(1, Ordering::Relaxed);
                    run.update(&id, |k| k.maybe = true);
                }
            }
        } else if roll < 85 {
            let ids = run.placed_ids();
            if ids.is_empty() {
                continue;
            }
            let id = ids[rng.random_range(0..ids.len())].clone();
            let req = proto::OrderIdRequest {
                order_id: id.clone(),
            };
            let (answer, event) = if roll < 65 {
                let card = if rng.random_bool(0.1) {
                    DECLINE
                } else {
                    APPROVE
                };
                let r = proto::PayOrderRequest {
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
            let s = sku(rng.random_range(0..SKUS));
            let mut inv = c.inventory[via].clone();
            let req = proto::GetStockRequest {
                sku: s.clone(),
                serializable: false,
            };
            if let Answer::Ok(l) = call(|| async move { inv.get(req).await }).await
                && !(0 <= l.reserved && l.reserved <= l.on_hand && l.on_hand <= INITIAL_STOCK)
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
    eprintln!("chaos_orders: seed={seed} secs={secs}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c =
        TestCluster::start_initialised(3, SHARDS, &["--order-payment-timeout-ms", "6000"]).await;

    // The catalog, through the CLI's own gRPC services.
    let ch = common::channel(&c.node(1).client).await.expect("connect");
    let mut catalog = shopkv::proto::catalog_client::CatalogClient::new(ch.clone());
    let mut inventory = InventoryClient::new(ch);
    for i in 0..SKUS {
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
                product: Some(product),
            })
            .await
            .expect("put product");
        inventory
            .set_stock(proto::SetStockRequest {
                sku: sku(i),
                on_hand: INITIAL_STOCK,
            })
            .await
            .expect("set stock");
    }

    let run = Arc::new(Run {
        orders: Mutex::new(BTreeMap::new()),
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

    let (mut kills, mut pauses) = (0u32, 0u32);
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        tokio::time::sleep(
            Duration::from_millis(rng.random_range(2000..4000)).min(end - Instant::now()),
        )
        .await;
        for id in 1..=3 {
            c.resume(id);
            if !c.node(id).is_up() {
                c.restart(id);
            }
        }
        if Instant::now() >= end {
            break;
        }
        match rng.random_range(0..3) {
            0 => {
                let group = rng.random_range(0..=u64::from(SHARDS));
                if let Some(l) = c.leader_of(group, rng.random_range(1..=3)).await {
                    c.kill(l);
                    kills += 1;
                }
            }
            1 => {
                c.kill(rng.random_range(1..=3));
                kills += 1;
            }
            _ => {
                c.pause(rng.random_range(1..=3));
                pauses += 1;
            }
        }
    }
    run.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    for id in 1..=3 {
        c.resume(id);
        if !c.node(id).is_up() {
            c.restart(id);
        }
    }
    c.wait_ready(SETTLE).await;

    // Settle: unpaid orders expire (6 s) and owed refunds are paid back; wait
    // until no order is pending payment or owes money, within a bound.
    let ch = common::channel(&c.node(1).client).await.expect("connect");
    let mut orders = OrdersClient::new(ch.clone());
    let mut inventory = InventoryClient::new(ch);
    let known = run.orders.lock().map(|o| o.clone()).unwrap_or_default();
    let deadline = Instant::now() + SETTLE;
    let finals: BTreeMap<String, Option<proto::Order>> = loop {
        let mut finals = BTreeMap::new();
        let mut unsettled = 0;
        for id in known.keys() {
            let got = orders
                .get(proto::GetOrderRequest {
                    order_id: id.clone(),
                    serializable: false,
                })
                .await;
            match got {
                Ok(o) => {
                    let o = o.into_inner();
                    let p = o.payment.clone().unwrap_or_default();
                    if o.status() == OrderStatus::PendingPayment || p.refund_due_minor > 0 {
                        unsettled += 1;
                    }
                    finals.insert(id.clone(), Some(o));
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    finals.insert(id.clone(), None);
                }
                Err(s) => panic!("reading order {id} after heal: {s:?}"),
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
    for i in 0..SKUS {
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
        if l.on_hand + sold != INITIAL_STOCK {
            violations.push(format!(
                "{s}: not conserved: on_hand {} + shipped {sold} != {INITIAL_STOCK}",
                l.on_hand
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
    let summary = format!(
        "CHAOS_ORDERS seed={seed} secs={secs} kills={kills} pauses={pauses} ops={} unknown={} orders={placed} violations={}",
        run.ops.load(Ordering::Relaxed),
        run.unknown.load(Ordering::Relaxed),
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
