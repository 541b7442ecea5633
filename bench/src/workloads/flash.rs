//! W5: flash sale. One SKU with `stock` units; every client buys one unit per
//! order until it is sold out; the run ends at the first sold-out answer and is
//! measured up to then (ops/s = units sold per second of the sale). shopkv:
//! `Orders.Place` with the id left to the server, so the order lands on the
//! SKU's shard (one Raft command: the escrow check and the order together).
//! etcd: read the stock key, then a `Txn` comparing its mod_revision that writes
//! stock − 1 and the order key; retry on conflict. `verify`: exactly `stock`
//! orders exist and the stock is exactly used up, on both.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{OpDone, Workload};
use crate::BenchError;
use crate::client::{Conn, OpError, ShopkvConn, request, rpc_error};
use crate::proto;
use crate::runner::Worker;

const SKU: &str = "w5-flash";
#[cfg(feature = "etcd")]
const STOCK_KEY: &str = "w5/stock";
/// A conflicting etcd transaction is retried at most this often.
#[cfg(feature = "etcd")]
const MAX_RETRIES: u32 = 100_000;

/// The flash-sale workload.
pub struct Flash {
    stock: u64,
    clients: AtomicU64,
}

impl Flash {
    pub fn new(stock: u64) -> Flash {
        Flash {
            stock,
            clients: AtomicU64::new(0),
        }
    }
}

fn customer(client: u64) -> String {
    format!("w5-{client}")
}

fn check(what: &str) -> BenchError {
    BenchError::Setup(what.to_string())
}

/// Units in every order of `customer` (all pages).
pub async fn count_order_units(c: &ShopkvConn, customer: &str) -> Result<i64, BenchError> {
    let mut orders = c.orders.clone();
    let mut token = String::new();
    let mut units = 0i64;
    loop {
        let page = orders
            .list_by_customer(request(proto::ListOrdersRequest {
                customer_id: customer.to_string(),
                page_size: 1000,
                page_token: token,
            }))
            .await
            .map_err(|s| check(&format!("listing orders: {s}")))?
            .into_inner();
        units += page
            .orders
            .iter()
            .flat_map(|o| o.lines.iter())
            .map(|l| i64::from(l.quantity))
            .sum::<i64>();
        token = page.next_page_token;
        if token.is_empty() {
            return Ok(units);
        }
    }
}

impl Workload for Flash {
    fn name(&self) -> String {
        "flash".into()
    }

    async fn setup(&self, conns: &[Conn]) -> Result<(), BenchError> {
        let mut conn = conns.first().ok_or_else(|| check("no connection"))?.clone();
        let stock = self.stock as i64;
        match &mut conn {
            Conn::Shopkv(c) => {
                let product = proto::Product {
                    sku: SKU.into(),
                    title: "Flash sale item".into(),
                    description: String::new(),
                    price_minor: 999,
                    currency: "EUR".into(),
                    active: true,
                    attributes: Default::default(),
                    max_per_order: 1,
                    version: 0,
                };
                c.catalog
                    .put(request(proto::PutProductRequest {
                        fence: None,
                        product: Some(product),
                    }))
                    .await
                    .map_err(|s| check(&s.to_string()))?;
                c.inventory
                    .set_stock(request(proto::SetStockRequest {
                        fence: None,
                        sku: SKU.into(),
                        on_hand: stock,
                    }))
                    .await
                    .map_err(|s| check(&s.to_string()))?;
            }
            #[cfg(feature = "etcd")]
            Conn::Etcd(kv) => {
                kv.put(STOCK_KEY, stock.to_string(), None)
                    .await
                    .map_err(|e| check(&e.to_string()))?;
            }
        }
        Ok(())
    }

    async fn op(&self, conn: &mut Conn, worker: &mut Worker) -> Result<OpDone, OpError> {
        self.clients.fetch_max(worker.id + 1, Ordering::Relaxed);
        match conn {
            Conn::Shopkv(c) => {
                let req = proto::PlaceOrderRequest {
                    fence: None,
                    order_id: String::new(),
                    customer_id: customer(worker.id),
                    lines: vec![proto::CartLine {
                        sku: SKU.into(),
                        quantity: 1,
                    }],
                    from_cart: false,
                };
                match c.orders_for(&req.order_id).place(request(req)).await {
                    Ok(_) => Ok(OpDone::default()),
                    Err(s)
                        if s.metadata()
                            .get("x-shopkv-reason")
                            .is_some_and(|r| r.as_bytes() == b"OUT_OF_STOCK") =>
                    {
                        Err(OpError::Done)
                    }
                    Err(s) => Err(rpc_error(s)),
                }
            }
            #[cfg(feature = "etcd")]
            Conn::Etcd(kv) => {
                use etcd_client::{Compare, CompareOp, Txn, TxnOp};
                let mut retries = 0;
                loop {
                    let got = kv
                        .get(STOCK_KEY, None)
                        .await
                        .map_err(|e| OpError::Rpc(e.to_string()))?;
                    let Some(item) = got.kvs().first() else {
                        return Err(OpError::Missing(STOCK_KEY.into()));
                    };
                    let stock: i64 = std::str::from_utf8(item.value())
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| OpError::Check("bad stock".into()))?;
                    if stock < 1 {
                        return Err(OpError::Done);
                    }
                    let txn = Txn::new()
                        .when([Compare::mod_revision(
                            STOCK_KEY,
                            CompareOp::Equal,
                            item.mod_revision(),
                        )])
                        .and_then([
                            TxnOp::put(STOCK_KEY, (stock - 1).to_string(), None),
                            TxnOp::put(format!("w5/order/{}/{}", worker.id, worker.seq), SKU, None),
                        ]);
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
        let stock = self.stock as i64;
        match conn {
            Conn::Shopkv(c) => {
                let mut sold = 0i64;
                for client in 0..self.clients.load(Ordering::Relaxed) {
                    sold += count_order_units(&c, &customer(client)).await?;
                }
                let l = c
                    .inventory
                    .clone()
                    .get(request(proto::GetStockRequest {
                        sku: SKU.into(),
                        serializable: false,
                    }))
                    .await
                    .map_err(|s| check(&s.to_string()))?
                    .into_inner();
                if sold != stock || l.reserved != stock || l.available != 0 {
                    return Err(check(&format!(
                        "flash sale: {sold} sold of {stock}, stock now {l:?}"
                    )));
                }
            }
            #[cfg(feature = "etcd")]
            Conn::Etcd(mut kv) => {
                use etcd_client::GetOptions;
                let left = kv
                    .get(STOCK_KEY, None)
                    .await
                    .map_err(|e| check(&e.to_string()))?;
                let left: Option<i64> = left
                    .kvs()
                    .first()
                    .and_then(|k| std::str::from_utf8(k.value()).ok()?.parse().ok());
                let sold = kv
                    .get(
                        "w5/order/",
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    )
                    .await
                    .map_err(|e| check(&e.to_string()))?
                    .count();
                if sold != stock || left != Some(0) {
                    return Err(check(&format!(
                        "flash sale: {sold} sold of {stock}, {left:?} left"
                    )));
                }
            }
        }
        eprintln!("  verify: exactly {stock} sold, stock used up");
        Ok(())
    }
}
