//! W4: an order of [`LINES`] distinct SKUs (one unit each) out of `skus`, placed
//! atomically. shopkv: one `Orders.Place` (2PC whenever the lines and the order
//! span shards). etcd: read the five stock keys in one `Txn`, then one `Txn` that
//! compares each key's mod_revision and writes the decremented stocks plus the
//! order key; on a conflict, read again and retry (counted as retries).
//! `verify` checks no SKU went below zero and every unit left is in an order.

use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use rand::seq::index::sample;

use super::{OpDone, Workload};
use crate::BenchError;
use crate::client::{Conn, OpError, request, rpc_error};
use crate::proto;
use crate::runner::Worker;

/// Lines per order.
pub const LINES: usize = 5;
/// Initial stock of every SKU (enough that nothing sells out in a run).
pub const STOCK_PER_SKU: i64 = 10_000;
/// Concurrent requests while loading and verifying.
const SETUP_CONCURRENCY: usize = 64;
/// A conflicting etcd transaction is retried at most this often.
#[cfg(feature = "etcd")]
const MAX_RETRIES: u32 = 10_000;

/// The order workload.
pub struct Order {
    skus: u64,
    /// Distinguishes this run's order ids from any earlier run's.
    nonce: u64,
    /// Highest client id + 1 seen (their customers are listed by `verify`).
    clients: AtomicU64,
}

impl Order {
    pub fn new(skus: u64) -> Order {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Order {
            skus,
            nonce,
            clients: AtomicU64::new(0),
        }
    }
}

fn sku(i: u64) -> String {
    format!("w4-{i:05}")
}

#[cfg(feature = "etcd")]
fn stock_key(sku: &str) -> String {
    format!("w4/stock/{sku}")
}

fn customer(client: u64) -> String {
    format!("w4-{client}")
}

fn check(what: &str) -> BenchError {
    BenchError::Setup(what.to_string())
}

impl Workload for Order {
    fn name(&self) -> String {
        "order".into()
    }

    async fn setup(&self, conns: &[Conn]) -> Result<(), BenchError> {
        let conn = conns.first().ok_or_else(|| check("no connection"))?.clone();
        let results = futures::stream::iter(0..self.skus)
            .map(|i| {
                let mut conn = conn.clone();
                async move {
                    let sku = sku(i);
                    match &mut conn {
                        Conn::Shopkv(c) => {
                            let product = proto::Product {
                                sku: sku.clone(),
                                title: format!("Bench item {i}"),
                                description: String::new(),
                                price_minor: 100 + (i % 900) as i64,
                                currency: "EUR".into(),
                                active: true,
                                attributes: Default::default(),
                                max_per_order: 0,
                                version: 0,
                            };
                            c.catalog
                                .put(request(proto::PutProductRequest {
                                    fence: None,
                                    product: Some(product),
                                }))
                                .await
                                .map_err(rpc_error)?;
                            c.inventory
                                .set_stock(request(proto::SetStockRequest {
                                    fence: None,
                                    sku,
                                    on_hand: STOCK_PER_SKU,
                                }))
                                .await
                                .map_err(rpc_error)?;
                        }
                        #[cfg(feature = "etcd")]
                        Conn::Etcd(kv) => {
                            kv.put(stock_key(&sku), STOCK_PER_SKU.to_string(), None)
                                .await
                                .map_err(|e| OpError::Rpc(e.to_string()))?;
                        }
                    }
                    Ok::<(), OpError>(())
                }
            })
            .buffer_unordered(SETUP_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        for r in results {
            r.map_err(|e| check(&format!("loading SKUs: {e}")))?;
        }
        Ok(())
    }

    async fn op(&self, conn: &mut Conn, worker: &mut Worker) -> Result<OpDone, OpError> {
        self.clients.fetch_max(worker.id + 1, Ordering::Relaxed);
        let mut picked: Vec<String> = sample(&mut worker.rng, self.skus as usize, LINES)
            .into_iter()
            .map(|i| sku(i as u64))
            .collect();
        picked.sort();
        match conn {
            Conn::Shopkv(c) => {
                let req = proto::PlaceOrderRequest {
                    fence: None,
                    order_id: format!("w4-{:x}-{}-{}", self.nonce, worker.id, worker.seq),
                    customer_id: customer(worker.id),
                    lines: picked
                        .into_iter()
                        .map(|sku| proto::CartLine { sku, quantity: 1 })
                        .collect(),
                    from_cart: false,
                };
                c.orders_for(&req.order_id)
                    .place(request(req))
                    .await
                    .map_err(rpc_error)?;
                Ok(OpDone::default())
            }
            #[cfg(feature = "etcd")]
            Conn::Etcd(kv) => {
                use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
                let keys: Vec<String> = picked.iter().map(|s| stock_key(s)).collect();
                let mut retries = 0;
                loop {
                    let read = Txn::new().and_then(
                        keys.iter()
                            .map(|k| TxnOp::get(k.clone(), None))
                            .collect::<Vec<_>>(),
                    );
                    let got = kv
                        .txn(read)
                        .await
                        .map_err(|e| OpError::Rpc(e.to_string()))?;
                    let mut compares = Vec::with_capacity(LINES);
                    let mut writes = Vec::with_capacity(LINES + 1);
                    for (key, resp) in keys.iter().zip(got.op_responses()) {
                        let TxnOpResponse::Get(g) = resp else {
                            return Err(OpError::Check("txn read returned no range".into()));
                        };
                        let Some(kv) = g.kvs().first() else {
                            return Err(OpError::Missing(key.clone()));
                        };
                        let stock: i64 = std::str::from_utf8(kv.value())
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .ok_or_else(|| OpError::Check(format!("bad stock at {key}")))?;
                        if stock < 1 {
                            return Err(OpError::Check(format!("{key} sold out")));
                        }
                        compares.push(Compare::mod_revision(
                            key.clone(),
                            CompareOp::Equal,
                            kv.mod_revision(),
                        ));
                        writes.push(TxnOp::put(key.clone(), (stock - 1).to_string(), None));
                    }
                    writes.push(TxnOp::put(
                        format!("w4/order/{:x}/{}/{}", self.nonce, worker.id, worker.seq),
                        picked.join(","),
                        None,
                    ));
                    let txn = Txn::new().when(compares).and_then(writes);
                    let res = kv.txn(txn).await.map_err(|e| OpError::Rpc(e.to_string()))?;
                    if res.succeeded() {
                        return Ok(OpDone { retries });
                    }
                    retries += 1;
                    if retries >= MAX_RETRIES {
                        return Err(OpError::Check("too many conflicts".into()));
                    }
                }
            }
        }
    }

    async fn verify(&self, conns: &[Conn]) -> Result<(), BenchError> {
        let conn = conns.first().ok_or_else(|| check("no connection"))?.clone();
        match conn {
            Conn::Shopkv(c) => {
                // Units reserved over every SKU = units in the orders placed.
                let mut ordered = 0i64;
                for client in 0..self.clients.load(Ordering::Relaxed) {
                    ordered += super::flash::count_order_units(&c, &customer(client)).await?;
                }
                let levels = futures::stream::iter(0..self.skus)
                    .map(|i| {
                        let mut inv = c.inventory.clone();
                        async move {
                            inv.get(request(proto::GetStockRequest {
                                sku: sku(i),
                                serializable: false,
                            }))
                            .await
                            .map(|r| r.into_inner())
                        }
                    })
                    .buffer_unordered(SETUP_CONCURRENCY)
                    .collect::<Vec<_>>()
                    .await;
                let mut reserved = 0i64;
                for l in levels {
                    let l = l.map_err(|s| check(&format!("reading stock: {s}")))?;
                    if l.reserved < 0 || l.reserved > l.on_hand || l.on_hand != STOCK_PER_SKU {
                        return Err(check(&format!("oversold or changed stock: {l:?}")));
                    }
                    reserved += l.reserved;
                }
                if reserved != ordered {
                    return Err(check(&format!(
                        "{reserved} units reserved but {ordered} in orders"
                    )));
                }
                eprintln!("  verify: {ordered} units in orders = units reserved; no SKU oversold");
                Ok(())
            }
            #[cfg(feature = "etcd")]
            Conn::Etcd(mut kv) => {
                use etcd_client::GetOptions;
                let stocks = kv
                    .get("w4/stock/", Some(GetOptions::new().with_prefix()))
                    .await
                    .map_err(|e| check(&e.to_string()))?;
                let mut taken = 0i64;
                for s in stocks.kvs() {
                    let v: i64 = std::str::from_utf8(s.value())
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| check("bad stock value"))?;
                    if v < 0 {
                        return Err(check("a SKU was oversold"));
                    }
                    taken += STOCK_PER_SKU - v;
                }
                let orders = kv
                    .get(
                        "w4/order/",
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    )
                    .await
                    .map_err(|e| check(&e.to_string()))?
                    .count();
                if taken != orders * LINES as i64 {
                    return Err(check(&format!(
                        "{taken} units taken but {orders} orders of {LINES}"
                    )));
                }
                eprintln!(
                    "  verify: {taken} units taken = {orders} orders × {LINES}; none oversold"
                );
                Ok(())
            }
        }
    }
}
