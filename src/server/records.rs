//! What the commerce services share: the request context (node, deadline,
//! cluster map, id checks) and the conversions of stored records to their
//! proto messages.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Status;

use super::deadline_of;
use crate::domain::cart::Cart;
use crate::domain::catalog::Product;
use crate::domain::inventory::InventoryLevel;
use crate::domain::order::OrderStatus;
use crate::domain::{self, RejectCode, Rejection};
use crate::node::Node;
use crate::proto;
use crate::router::ClusterMap;
use crate::sm::commerce::{OrderView, Stored};

/// Largest page a list call returns.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Page size when the request says 0.
pub const DEFAULT_PAGE_SIZE: u32 = 100;

/// The node a commerce service runs on.
#[derive(Clone)]
pub struct Ctx {
    /// The node.
    pub node: Arc<Node>,
    /// Batches the 2PC settlements of the orders this node coordinates.
    pub settler: Arc<crate::txn::Settler>,
}

impl Ctx {
    /// Deadline of `req`: its `grpc-timeout` or the node default.
    pub fn deadline<T>(&self, req: &tonic::Request<T>) -> Instant {
        deadline_of(
            req,
            Duration::from_millis(self.node.config.request_timeout_ms),
        )
    }

    /// The cluster map, or FAILED_PRECONDITION before `cluster init`.
    pub fn map(&self) -> Result<Arc<ClusterMap>, Status> {
        self.node
            .cluster_map()
            .ok_or_else(|| Status::failed_precondition("cluster is not initialised"))
    }
}

/// Checks an id field (SKU, customer, order): INVALID_ARGUMENT naming it.
pub fn check_id(what: &str, id: &str) -> Result<(), Status> {
    domain::check_id(what, id).map_err(Status::from)
}

/// A page size: 0 means the default, more than the maximum is refused.
pub fn page_size(asked: u32) -> Result<u32, Status> {
    match asked {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n <= MAX_PAGE_SIZE => Ok(n),
        n => Err(Status::invalid_argument(format!(
            "page_size must be 0..={MAX_PAGE_SIZE}, got {n}"
        ))),
    }
}

/// A page token: empty, or the last id of the previous page.
pub fn page_token(token: &str) -> Result<Option<String>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    domain::check_id("page_token", token).map_err(Status::from)?;
    Ok(Some(token.to_string()))
}

/// NOT_FOUND (reason UNKNOWN_SKU) for a SKU with no product.
pub fn unknown_sku(sku: &str) -> Status {
    Status::from(Rejection::new(
        RejectCode::UnknownSku,
        format!("no product with SKU {sku}"),
    ))
}

/// Stored product → proto.
pub fn product_msg(p: Stored<Product>) -> proto::Product {
    let r = p.record;
    proto::Product {
        sku: r.sku,
        title: r.title,
        description: r.description,
        price_minor: r.price_minor,
        currency: r.currency.as_str().to_string(),
        active: r.active,
        attributes: r.attributes.into_iter().collect(),
        max_per_order: r.max_per_order,
        version: p.version,
    }
}

/// Stock level → proto.
pub fn stock_msg(sku: String, l: Stored<InventoryLevel>) -> proto::StockLevel {
    proto::StockLevel {
        sku,
        on_hand: l.record.on_hand,
        reserved: l.record.reserved,
        available: l.record.available(),
        version: l.version,
    }
}

/// Cart → proto.
pub fn cart_msg(customer_id: String, c: Stored<Cart>) -> proto::CartView {
    proto::CartView {
        customer_id,
        lines: c
            .record
            .lines
            .into_iter()
            .map(|l| proto::CartLine {
                sku: l.sku,
                quantity: l.qty,
            })
            .collect(),
        version: c.version,
    }
}

/// Order status → proto enum.
pub fn status_msg(s: OrderStatus) -> proto::OrderStatus {
    match s {
        OrderStatus::PendingPayment => proto::OrderStatus::PendingPayment,
        OrderStatus::Paid => proto::OrderStatus::Paid,
        OrderStatus::Shipped => proto::OrderStatus::Shipped,
        OrderStatus::Delivered => proto::OrderStatus::Delivered,
        OrderStatus::Cancelled => proto::OrderStatus::Cancelled,
        OrderStatus::Expired => proto::OrderStatus::Expired,
    }
}

/// Order with payment → proto.
pub fn order_msg(v: OrderView, shard: u64) -> proto::Order {
    let o = v.order.record;
    let p = v.payment;
    proto::Order {
        order_id: o.order_id,
        customer_id: o.customer,
        lines: o
            .lines
            .into_iter()
            .map(|l| proto::OrderLine {
                sku: l.sku,
                title: l.title,
                quantity: l.qty,
                unit_price_minor: l.unit_price_minor,
                line_total_minor: l.line_total_minor,
            })
            .collect(),
        currency: o.currency.as_str().to_string(),
        total_minor: o.total_minor,
        status: status_msg(o.status) as i32,
        status_name: o.status.name().to_string(),
        placed_at_ms: o.placed_at_ms,
        expires_at_ms: o.expires_at_ms,
        updated_at_ms: o.updated_at_ms,
        payment: Some(proto::PaymentInfo {
            authorized_minor: p.authorized_minor,
            captured_minor: p.captured_minor,
            refunded_minor: p.refunded_minor,
            refund_due_minor: p.refund_due_minor,
            provider_ref: p.provider_ref,
            idempotency_key: p.idempotency_key,
            card_last4: p.card_last4,
            failed_attempts: p.failed_attempts,
            last_decline: p.last_decline,
        }),
        version: v.order.version,
        shard,
    }
}
