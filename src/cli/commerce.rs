//! Commerce client commands: `product`, `stock`, `cart`, `order`. Table
//! output for people, `-w json` for scripts (one JSON document per command).

use std::collections::BTreeMap;

use clap::Subcommand;
use serde_json::{Value, json};

use super::{CliError, Format, GlobalArgs, connect, parse_fence};
use crate::domain::money::Currency;
use crate::payment::CARD_APPROVE;
use crate::proto;
use crate::proto::cart_client::CartClient;
use crate::proto::catalog_client::CatalogClient;
use crate::proto::inventory_client::InventoryClient;
use crate::proto::orders_client::OrdersClient;

/// `shopkv product ...`
#[derive(Subcommand, Debug)]
pub enum ProductCmd {
    /// Create or replace a product.
    Put {
        /// SKU.
        sku: String,
        /// Title.
        #[arg(long)]
        title: String,
        /// Unit price in minor units (cents for EUR/USD).
        #[arg(long, allow_negative_numbers = true)]
        price: i64,
        /// ISO 4217 currency code.
        #[arg(long)]
        currency: String,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
        /// Most units per order (0 = no limit).
        #[arg(long, default_value_t = 0)]
        max_per_order: u32,
        /// Attribute NAME=VALUE (repeatable).
        #[arg(long = "attr", value_parser = parse_attr)]
        attrs: Vec<(String, String)>,
        /// Create it inactive.
        #[arg(long)]
        inactive: bool,
        /// Refuse the write unless LOCK's fencing token TOKEN is still current (`--fence LOCK:TOKEN`).
        #[arg(long, value_parser = parse_fence)]
        fence: Option<proto::Fence>,
    },
    /// Show a product.
    Get {
        /// SKU.
        sku: String,
    },
    /// List products in SKU order.
    List {
        /// Most products to print.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// Start after this SKU.
        #[arg(long, default_value = "")]
        after: String,
    },
    /// Deactivate a product (no new carts or orders).
    Deactivate {
        /// SKU.
        sku: String,
        /// Refuse the write unless LOCK's fencing token TOKEN is still current (`--fence LOCK:TOKEN`).
        #[arg(long, value_parser = parse_fence)]
        fence: Option<proto::Fence>,
    },
}

/// `shopkv stock ...`
#[derive(Subcommand, Debug)]
pub enum StockCmd {
    /// Set on-hand stock.
    Set {
        /// SKU.
        sku: String,
        /// Units on hand.
        #[arg(allow_negative_numbers = true)]
        on_hand: i64,
        /// Refuse the write unless LOCK's fencing token TOKEN is still current (`--fence LOCK:TOKEN`).
        #[arg(long, value_parser = parse_fence)]
        fence: Option<proto::Fence>,
    },
    /// Add (+N) or remove (-N) on-hand stock.
    Adjust {
        /// SKU.
        sku: String,
        /// Change, e.g. +5 or -3.
        #[arg(allow_negative_numbers = true, value_parser = parse_delta)]
        delta: i64,
        /// Refuse the write unless LOCK's fencing token TOKEN is still current (`--fence LOCK:TOKEN`).
        #[arg(long, value_parser = parse_fence)]
        fence: Option<proto::Fence>,
    },
    /// Show on_hand, reserved and available.
    Get {
        /// SKU.
        sku: String,
    },
}

/// `shopkv cart ...`
#[derive(Subcommand, Debug)]
pub enum CartCmd {
    /// Add units of a SKU to a customer's cart.
    Add {
        /// Customer id.
        customer: String,
        /// SKU.
        sku: String,
        /// Units.
        #[arg(allow_negative_numbers = true)]
        qty: i64,
        /// Refuse the write unless LOCK's fencing token TOKEN is still current (`--fence LOCK:TOKEN`).
        #[arg(long, value_parser = parse_fence)]
        fence: Option<proto::Fence>,
    },
    /// Set a line's quantity.
    Update {
        /// Customer id.
        customer: String,
        /// SKU.
        sku: String,
        /// Units.
        #[arg(allow_negative_numbers = true)]
        qty: i64,
        /// Refuse the write unless LOCK's fencing token TOKEN is still current (`--fence LOCK:TOKEN`).
        #[arg(long, value_parser = parse_fence)]
        fence: Option<proto::Fence>,
    },
    /// Remove a SKU from the cart.
    Rm {
        /// Customer id.
        customer: String,
        /// SKU.
        sku: String,
        /// Refuse the write unless LOCK's fencing token TOKEN is still current (`--fence LOCK:TOKEN`).
        #[arg(long, value_parser = parse_fence)]
        fence: Option<proto::Fence>,
    },
    /// Show the cart.
    Show {
        /// Customer id.
        customer: String,
    },
    /// Empty the cart.
    Clear {
        /// Customer id.
        customer: String,
        /// Refuse the write unless LOCK's fencing token TOKEN is still current (`--fence LOCK:TOKEN`).
        #[arg(long, value_parser = parse_fence)]
        fence: Option<proto::Fence>,
    },
}

/// `shopkv order ...`
#[derive(Subcommand, Debug)]
pub enum OrderCmd {
    /// Place an order from SKU:QTY lines or from the customer's cart.
    Place {
        /// Customer id.
        customer: String,
        /// Order id (idempotency key); default: chosen by the server.
        #[arg(long)]
        order_id: Option<String>,
        /// Order the cart's contents.
        #[arg(long, conflicts_with = "lines")]
        from_cart: bool,
        /// Lines as SKU:QTY.
        #[arg(value_parser = parse_line)]
        lines: Vec<(String, u32)>,
        /// Refuse the write unless LOCK's fencing token TOKEN is still current (`--fence LOCK:TOKEN`).
        #[arg(long, value_parser = parse_fence)]
        fence: Option<proto::Fence>,
    },
    /// Show an order.
    Get {
        /// Order id.
        order_id: String,
    },
    /// Pay an order (simulated provider; see --card).
    Pay {
        /// Order id.
        order_id: String,
        /// Card number: 4242424242424242 approves, 4000000000000002 declines,
        /// 4000000000000119 fails with a provider error.
        #[arg(long, default_value = CARD_APPROVE)]
        card: String,
        /// Refuse the write unless LOCK's fencing token TOKEN is still current (`--fence LOCK:TOKEN`).
        #[arg(long, value_parser = parse_fence)]
        fence: Option<proto::Fence>,
    },
    /// Mark a paid order shipped (its stock leaves on_hand).
    Ship {
        /// Order id.
        order_id: String,
        /// Refuse the write unless LOCK's fencing token TOKEN is still current (`--fence LOCK:TOKEN`).
        #[arg(long, value_parser = parse_fence)]
        fence: Option<proto::Fence>,
    },
    /// Mark a shipped order delivered.
    Deliver {
        /// Order id.
        order_id: String,
        /// Refuse the write unless LOCK's fencing token TOKEN is still current (`--fence LOCK:TOKEN`).
        #[arg(long, value_parser = parse_fence)]
        fence: Option<proto::Fence>,
    },
    /// Cancel an unpaid or paid order (stock released, payment refunded).
    Cancel {
        /// Order id.
        order_id: String,
        /// Refuse the write unless LOCK's fencing token TOKEN is still current (`--fence LOCK:TOKEN`).
        #[arg(long, value_parser = parse_fence)]
        fence: Option<proto::Fence>,
    },
    /// A customer's orders.
    List {
        /// Customer id.
        customer: String,
        /// Most orders to print.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
}

fn parse_attr(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))
}

fn parse_delta(s: &str) -> Result<i64, String> {
    s.trim_start_matches('+')
        .parse()
        .map_err(|e| format!("expected +N or -N, got {s:?}: {e}"))
}

fn parse_line(s: &str) -> Result<(String, u32), String> {
    let (sku, qty) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("expected SKU:QTY, got {s:?}"))?;
    let qty = qty
        .parse()
        .map_err(|e| format!("bad quantity in {s:?}: {e}"))?;
    Ok((sku.to_string(), qty))
}

fn money(amount_minor: i64, currency: &str) -> String {
    match Currency::parse(currency) {
        Ok(c) => c.format(amount_minor),
        Err(_) => format!("{amount_minor} {currency}"),
    }
}

fn product_json(p: &proto::Product) -> Value {
    let attrs: BTreeMap<_, _> = p.attributes.iter().collect();
    json!({"sku": p.sku, "title": p.title, "description": p.description,
           "price_minor": p.price_minor, "currency": p.currency, "active": p.active,
           "attributes": attrs, "max_per_order": p.max_per_order, "version": p.version})
}

fn print_product(p: &proto::Product) {
    println!(
        "{}\t{}\t{}\t{}",
        p.sku,
        money(p.price_minor, &p.currency),
        if p.active { "active" } else { "inactive" },
        p.title
    );
}

fn stock_json(s: &proto::StockLevel) -> Value {
    json!({"sku": s.sku, "on_hand": s.on_hand, "reserved": s.reserved,
           "available": s.available, "version": s.version})
}

fn cart_json(c: &proto::CartView) -> Value {
    json!({"customer_id": c.customer_id, "version": c.version,
           "lines": c.lines.iter().map(|l| json!({"sku": l.sku, "quantity": l.quantity})).collect::<Vec<_>>()})
}

fn order_json(o: &proto::Order) -> Value {
    let p = o.payment.clone().unwrap_or_default();
    json!({"order_id": o.order_id, "customer_id": o.customer_id, "status": o.status_name,
           "currency": o.currency, "total_minor": o.total_minor,
           "lines": o.lines.iter().map(|l| json!({"sku": l.sku, "title": l.title, "quantity": l.quantity,
                "unit_price_minor": l.unit_price_minor, "line_total_minor": l.line_total_minor})).collect::<Vec<_>>(),
           "placed_at_ms": o.placed_at_ms, "expires_at_ms": o.expires_at_ms, "updated_at_ms": o.updated_at_ms,
           "payment": {"authorized_minor": p.authorized_minor, "captured_minor": p.captured_minor,
                       "refunded_minor": p.refunded_minor, "refund_due_minor": p.refund_due_minor,
                       "provider_ref": p.provider_ref, "idempotency_key": p.idempotency_key,
                       "card_last4": p.card_last4, "failed_attempts": p.failed_attempts},
           "version": o.version, "shard": o.shard})
}

fn print_order(o: &proto::Order) {
    println!(
        "order {} customer={} status={} total={} shard={}",
        o.order_id,
        o.customer_id,
        o.status_name,
        money(o.total_minor, &o.currency),
        o.shard
    );
    for l in &o.lines {
        println!(
            "  {} × {}\t{}\t{}",
            l.quantity,
            l.sku,
            money(l.line_total_minor, &o.currency),
            l.title
        );
    }
    if let Some(p) = &o.payment
        && p.captured_minor > 0
    {
        println!(
            "  paid {} (card …{}, ref {}), refunded {}",
            money(p.captured_minor, &o.currency),
            p.card_last4,
            p.provider_ref,
            money(p.refunded_minor, &o.currency)
        );
    }
}

fn out(g: &GlobalArgs, v: Value, table: impl FnOnce()) {
    match g.write_out {
        Format::Json => println!("{v}"),
        Format::Table => table(),
    }
}

/// Runs `shopkv product ...`.
pub async fn product(g: &GlobalArgs, cmd: ProductCmd) -> Result<(), CliError> {
    let mut c = CatalogClient::new(connect(g).await?);
    match cmd {
        ProductCmd::Put {
            sku,
            title,
            price,
            currency,
            description,
            max_per_order,
            attrs,
            inactive,
            fence,
        } => {
            let product = proto::Product {
                sku,
                title,
                description,
                price_minor: price,
                currency,
                active: !inactive,
                attributes: attrs.into_iter().collect(),
                max_per_order,
                version: 0,
            };
            let p = c
                .put(proto::PutProductRequest {
                    fence,
                    product: Some(product),
                })
                .await?
                .into_inner();
            out(g, product_json(&p), || {
                println!("OK {} version={}", p.sku, p.version)
            });
        }
        ProductCmd::Get { sku } => {
            let p = c
                .get(proto::GetProductRequest {
                    sku,
                    serializable: false,
                })
                .await?
                .into_inner();
            out(g, product_json(&p), || print_product(&p));
        }
        ProductCmd::List { limit, after } => {
            let mut token = after;
            let mut all = Vec::new();
            while (all.len() as u32) < limit {
                let page = c
                    .list(proto::ListProductsRequest {
                        page_size: (limit - all.len() as u32).min(1000),
                        page_token: token,
                    })
                    .await?
                    .into_inner();
                all.extend(page.products);
                token = page.next_page_token;
                if token.is_empty() {
                    break;
                }
            }
            let more = !token.is_empty();
            out(
                g,
                json!({"products": all.iter().map(product_json).collect::<Vec<_>>(), "next_page_token": token}),
                || {
                    all.iter().for_each(print_product);
                    if more {
                        println!("(more: --after {token})");
                    }
                },
            );
        }
        ProductCmd::Deactivate { sku, fence } => {
            let p = c
                .deactivate(proto::DeactivateProductRequest { sku, fence })
                .await?
                .into_inner();
            out(g, product_json(&p), || println!("OK {} inactive", p.sku));
        }
    }
    Ok(())
}

/// Runs `shopkv stock ...`.
pub async fn stock(g: &GlobalArgs, cmd: StockCmd) -> Result<(), CliError> {
    let mut c = InventoryClient::new(connect(g).await?);
    let s = match cmd {
        StockCmd::Set {
            sku,
            on_hand,
            fence,
        } => {
            c.set_stock(proto::SetStockRequest {
                sku,
                on_hand,
                fence,
            })
            .await?
        }
        StockCmd::Adjust { sku, delta, fence } => {
            c.adjust_stock(proto::AdjustStockRequest { sku, delta, fence })
                .await?
        }
        StockCmd::Get { sku } => {
            c.get(proto::GetStockRequest {
                sku,
                serializable: false,
            })
            .await?
        }
    }
    .into_inner();
    out(g, stock_json(&s), || {
        println!(
            "{} on_hand={} reserved={} available={}",
            s.sku, s.on_hand, s.reserved, s.available
        )
    });
    Ok(())
}

/// Runs `shopkv cart ...`.
pub async fn cart(g: &GlobalArgs, cmd: CartCmd) -> Result<(), CliError> {
    let mut c = CartClient::new(connect(g).await?);
    let view = match cmd {
        CartCmd::Add {
            customer,
            sku,
            qty,
            fence,
        } => {
            c.add_item(proto::AddCartItemRequest {
                fence,
                customer_id: customer,
                sku,
                quantity: qty,
            })
            .await?
        }
        CartCmd::Update {
            customer,
            sku,
            qty,
            fence,
        } => {
            c.update_quantity(proto::UpdateCartItemRequest {
                fence,
                customer_id: customer,
                sku,
                quantity: qty,
            })
            .await?
        }
        CartCmd::Rm {
            customer,
            sku,
            fence,
        } => {
            c.remove_item(proto::RemoveCartItemRequest {
                fence,
                customer_id: customer,
                sku,
            })
            .await?
        }
        CartCmd::Show { customer } => {
            c.get(proto::GetCartRequest {
                customer_id: customer,
            })
            .await?
        }
        CartCmd::Clear { customer, fence } => {
            c.clear(proto::ClearCartRequest {
                fence,
                customer_id: customer,
            })
            .await?
        }
    }
    .into_inner();
    out(g, cart_json(&view), || {
        if view.lines.is_empty() {
            println!("cart of {} is empty", view.customer_id);
        }
        for l in &view.lines {
            println!("{}\t{}", l.sku, l.quantity);
        }
    });
    Ok(())
}

/// Runs `shopkv order ...`.
pub async fn order(g: &GlobalArgs, cmd: OrderCmd) -> Result<(), CliError> {
    let mut c = OrdersClient::new(connect(g).await?);
    let id =
        |order_id: String, fence: Option<proto::Fence>| proto::OrderIdRequest { order_id, fence };
    let o = match cmd {
        OrderCmd::Place {
            customer,
            order_id,
            from_cart,
            lines,
            fence,
        } => {
            if !from_cart && lines.is_empty() {
                return Err(CliError("give SKU:QTY lines or --from-cart".into()));
            }
            c.place(proto::PlaceOrderRequest {
                fence,
                order_id: order_id.unwrap_or_default(),
                customer_id: customer,
                lines: lines
                    .into_iter()
                    .map(|(sku, quantity)| proto::CartLine { sku, quantity })
                    .collect(),
                from_cart,
            })
            .await?
        }
        OrderCmd::Get { order_id } => {
            c.get(proto::GetOrderRequest {
                order_id,
                serializable: false,
            })
            .await?
        }
        OrderCmd::Pay {
            order_id,
            card,
            fence,
        } => {
            c.pay(proto::PayOrderRequest {
                fence,
                order_id,
                card_number: card,
            })
            .await?
        }
        OrderCmd::Ship { order_id, fence } => c.ship(id(order_id, fence)).await?,
        OrderCmd::Deliver { order_id, fence } => c.deliver(id(order_id, fence)).await?,
        OrderCmd::Cancel { order_id, fence } => c.cancel(id(order_id, fence)).await?,
        OrderCmd::List { customer, limit } => {
            let mut token = String::new();
            let mut all = Vec::new();
            while (all.len() as u32) < limit {
                let page = c
                    .list_by_customer(proto::ListOrdersRequest {
                        customer_id: customer.clone(),
                        page_size: (limit - all.len() as u32).min(1000),
                        page_token: token,
                    })
                    .await?
                    .into_inner();
                all.extend(page.orders);
                token = page.next_page_token;
                if token.is_empty() {
                    break;
                }
            }
            out(
                g,
                json!({"orders": all.iter().map(order_json).collect::<Vec<_>>()}),
                || {
                    for o in &all {
                        println!(
                            "{}\t{}\t{}",
                            o.order_id,
                            o.status_name,
                            money(o.total_minor, &o.currency)
                        );
                    }
                },
            );
            return Ok(());
        }
    }
    .into_inner();
    out(g, order_json(&o), || print_order(&o));
    Ok(())
}
