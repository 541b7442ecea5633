//! `shopkv.v1.Orders`: orders on the order id's shard. `Place` is one Raft
//! command (1PC) when every line and the order live on one shard, otherwise
//! a 2PC transaction anchored on the order's shard (`txn::place`). `Pay` goes
//! through the payment provider (`commerce::pay`), `Cancel` refunds a capture.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use super::catalog::unexpected;
use super::fence_of;
use super::records::{Ctx, check_id, order_msg, page_size, page_token};
use crate::clock::now_ms;
use crate::commerce::{self, CommerceError};
use crate::domain::order::{OrderEvent, normalize_lines};
use crate::domain::{RejectCode, Rejection};
use crate::node::Node;
use crate::proto;
use crate::proto::orders_server::Orders;
use crate::router::ClusterMap;
use crate::sm::commerce::{
    CommerceCommand, CommerceRead, CommerceReadResult, OrderView, Settlement, TxnStatus, TxnView,
};
use crate::txn;

/// The Orders service.
pub struct OrdersService {
    ctx: Ctx,
}

impl OrdersService {
    /// A service over `ctx`'s node.
    pub fn new(ctx: Ctx) -> OrdersService {
        OrdersService { ctx }
    }

    fn reply(&self, map: &ClusterMap, v: OrderView) -> Response<proto::Order> {
        let shard = map.shard_of_order(&v.order.record.order_id);
        Response::new(order_msg(v, shard))
    }

    async fn transition(
        &self,
        req: Request<proto::OrderIdRequest>,
        event: OrderEvent,
    ) -> Result<Response<proto::Order>, Status> {
        let deadline = self.ctx.deadline(&req);
        let r = req.into_inner();
        check_id("order_id", &r.order_id)?;
        let fence = fence_of(r.fence)?;
        let map = self.ctx.map()?;
        let shard = map.shard_of_order(&r.order_id);
        let cmd = CommerceCommand::Transition {
            order_id: r.order_id,
            event,
            now_ms: now_ms(),
        };
        let mut view =
            commerce::propose_order(&self.ctx.node, shard, cmd, fence.as_ref(), deadline).await?;
        let order = &view.order.record;
        if order.two_phase && matches!(event, OrderEvent::Ship | OrderEvent::Cancel) {
            // Move the participants' stock now; if this fails, recovery does it.
            let outcome = if event == OrderEvent::Ship {
                Settlement::Consume
            } else {
                Settlement::Release
            };
            let skus: Vec<String> = order.lines.iter().map(|l| l.sku.clone()).collect();
            if let Err(e) = self
                .ctx
                .settler
                .settle(&order.order_id, skus, outcome)
                .await
            {
                tracing::info!(error = %e, "settlement left to recovery");
            }
        }
        if view.payment.refund_due_minor > 0 {
            // Refund now if the provider answers; otherwise the sweeper will.
            view = match commerce::settle_refund(&self.ctx.node, shard, view, deadline).await {
                Ok(v) => v,
                Err((v, e)) => {
                    tracing::warn!(error = %e, "refund deferred to the sweeper");
                    v
                }
            };
        }
        Ok(self.reply(&map, view))
    }

    /// The lines of the customer's cart and the cart's version.
    async fn cart_lines(
        &self,
        map: &ClusterMap,
        customer: &str,
        deadline: Instant,
    ) -> Result<(Vec<(String, i64)>, u64), Status> {
        let shard = map.shard_of_customer(customer);
        let op = CommerceRead::Cart {
            customer: customer.to_string(),
        };
        match commerce::read(&self.ctx.node, shard, op, true, deadline).await? {
            CommerceReadResult::Cart(c) => Ok((
                c.record
                    .lines
                    .into_iter()
                    .map(|l| (l.sku, i64::from(l.qty)))
                    .collect(),
                c.version,
            )),
            other => Err(unexpected(other)),
        }
    }

    /// The order a checkout under `order_id` placed, if any: a retry's
    /// answer. It first empties the cart that order was checked out from, if
    /// that cart is still at the checked-out version (the first attempt's
    /// node may have died before it could). `ORDER_ID_REUSED` if the id is
    /// another customer's order.
    async fn placed_checkout(
        &self,
        map: &ClusterMap,
        order_id: &str,
        customer: &str,
        deadline: Instant,
    ) -> Result<Option<OrderView>, Status> {
        let shard = map.shard_of_order(order_id);
        match commerce::get_order(&self.ctx.node, shard, order_id, deadline).await {
            Ok(v) if v.order.record.customer == customer => {
                // Read first: usually the cart was emptied already, and a
                // retry need not spend a log entry learning that.
                if let Some(version) = v.order.record.checkout_cart_version
                    && let Err(e) = commerce::finish_cart_clear(
                        &self.ctx.node,
                        map,
                        customer,
                        version,
                        deadline,
                    )
                    .await
                {
                    tracing::info!(error = %e, "cart not cleared on retry; the sweeper will");
                }
                Ok(Some(v))
            }
            Ok(_) => Err(Rejection::new(
                RejectCode::OrderIdReused,
                format!("order id {order_id} is already used by another order"),
            )
            .into()),
            Err(CommerceError::Rejected(rej)) if rej.code == RejectCode::UnknownOrder => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// Empties `customer`'s cart on `shard` after a checkout placed its order,
/// if the cart still has `version` (the one the checkout read). Best effort:
/// the order stands either way, and the order shard's sweeper empties the
/// cart later (the order owes it).
async fn clear_checked_out_cart(
    node: &Node,
    shard: u64,
    customer: String,
    version: u64,
    deadline: Instant,
) {
    crash_point!("checkout-after-order");
    delay_point!("checkout-before-clear");
    if let Err(e) = commerce::clear_cart_at_version(node, shard, &customer, version, deadline).await
    {
        tracing::info!(error = %e, "cart not cleared after checkout; the sweeper will");
    }
}

/// Runs `flow` as a task of its own and waits for it: work that must not be
/// cut short if the caller goes away (hyper drops the handler of a reset
/// stream), e.g. between a charge and its record.
async fn run_detached<T, F>(what: &str, flow: F) -> Result<T, Status>
where
    F: std::future::Future<Output = Result<T, CommerceError>> + Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(flow)
        .await
        .map_err(|e| Status::internal(format!("{what} failed: {e}")))?
        .map_err(Status::from)
}

#[tonic::async_trait]
impl Orders for OrdersService {
    #[tracing::instrument(name = "orders.place", skip_all, fields(customer = %req.get_ref().customer_id, order_id = %req.get_ref().order_id))]
    async fn place(
        &self,
        req: Request<proto::PlaceOrderRequest>,
    ) -> Result<Response<proto::Order>, Status> {
        let deadline = self.ctx.deadline(&req);
        let r = req.into_inner();
        check_id("customer_id", &r.customer_id)?;
        let fence = fence_of(r.fence)?;
        if !r.order_id.is_empty() {
            check_id("order_id", &r.order_id)?;
        }
        let map = self.ctx.map()?;
        let (requested, cart_version) = if r.from_cart {
            if !r.lines.is_empty() {
                return Err(Status::invalid_argument(
                    "give either lines or from_cart, not both",
                ));
            }
            // A retried checkout answers with the order it placed.
            if !r.order_id.is_empty()
                && let Some(v) = self
                    .placed_checkout(&map, &r.order_id, &r.customer_id, deadline)
                    .await?
            {
                return Ok(self.reply(&map, v));
            }
            delay_point!("checkout-before-cart-read");
            let (lines, version) = self.cart_lines(&map, &r.customer_id, deadline).await?;
            if lines.is_empty() {
                // An attempt running beside this retry may have placed the
                // order and emptied the cart since the look above.
                if !r.order_id.is_empty()
                    && let Some(v) = self
                        .placed_checkout(&map, &r.order_id, &r.customer_id, deadline)
                        .await?
                {
                    return Ok(self.reply(&map, v));
                }
                return Err(Rejection::new(
                    RejectCode::EmptyOrder,
                    format!("the cart of {} is empty", r.customer_id),
                )
                .into());
            }
            (lines, Some(version))
        } else {
            let lines = r
                .lines
                .into_iter()
                .map(|l| (l.sku, i64::from(l.quantity)))
                .collect::<Vec<_>>();
            (lines, None)
        };
        let lines = normalize_lines(&requested)?;
        let shards: BTreeSet<u64> = lines.iter().map(|(sku, _)| map.shard_of_sku(sku)).collect();
        let Some(&line_shard) = shards.iter().next() else {
            return Err(Rejection::new(RejectCode::EmptyOrder, "order has no lines").into());
        };
        // A generated id lands on the lines' shard when they share one (1PC).
        let order_id = if r.order_id.is_empty() {
            commerce::choose_order_id(&map, line_shard)
        } else {
            r.order_id
        };
        let order_shard = map.shard_of_order(&order_id);
        let cart_shard = map.shard_of_customer(&r.customer_id);
        if shards.len() > 1 || order_shard != line_shard {
            // Once begun, the transaction runs to its decision even if the
            // caller goes away (hyper drops the handler of a reset stream):
            // cut short, it would hold its stock until recovery aborts it at
            // the deadline. It runs as its own task, with the transaction's
            // time if the caller allowed less; this handler waits.
            let txn_time = Duration::from_millis(self.ctx.node.config.txn_timeout_ms);
            let flow_deadline = deadline.max(Instant::now() + txn_time);
            let (node, flow_map, settler) = (
                Arc::clone(&self.ctx.node),
                Arc::clone(&map),
                Arc::clone(&self.ctx.settler),
            );
            let (flow_id, customer, flow_lines) =
                (order_id.clone(), r.customer_id.clone(), lines.clone());
            let flow = async move {
                let order = txn::PlaceTxn {
                    order_id: &flow_id,
                    customer: &customer,
                    lines: &flow_lines,
                    fence: fence.as_ref(),
                    checkout_cart_version: cart_version,
                };
                let view = txn::place(&node, &flow_map, &settler, order, flow_deadline).await?;
                // A checkout empties the cart it read, as part of the same flow.
                if let Some(version) = cart_version {
                    clear_checked_out_cart(&node, cart_shard, customer, version, flow_deadline)
                        .await;
                }
                Ok(view)
            };
            let view = run_detached("order flow", flow).await?;
            return Ok(self.reply(&map, view));
        }
        let clear_here = cart_version.is_some() && cart_shard == order_shard;
        let now = now_ms();
        let cmd = CommerceCommand::PlaceOrder {
            order_id: order_id.clone(),
            customer: r.customer_id.clone(),
            lines,
            now_ms: now,
            expires_at_ms: now.saturating_add(self.ctx.node.config.order_payment_timeout_ms),
            checkout_cart_version: cart_version,
            clear_cart: clear_here,
        };
        let view = match (cart_version, clear_here) {
            // A cart on another shard is emptied by a second command, in the
            // same task as the order: a caller leaving in between must not
            // leave it full.
            (Some(version), false) => {
                let (node, customer) = (Arc::clone(&self.ctx.node), r.customer_id);
                let flow = async move {
                    let view =
                        commerce::propose_order(&node, order_shard, cmd, fence.as_ref(), deadline)
                            .await?;
                    clear_checked_out_cart(&node, cart_shard, customer, version, deadline).await;
                    Ok(view)
                };
                run_detached("order flow", flow).await?
            }
            // One command: nothing a departing caller could cut in two, so
            // no task of its own on this path (flash sales take it).
            _ => {
                commerce::propose_order(&self.ctx.node, order_shard, cmd, fence.as_ref(), deadline)
                    .await?
            }
        };
        Ok(self.reply(&map, view))
    }

    #[tracing::instrument(name = "orders.get", skip_all, fields(order_id = %req.get_ref().order_id))]
    async fn get(
        &self,
        req: Request<proto::GetOrderRequest>,
    ) -> Result<Response<proto::Order>, Status> {
        let deadline = self.ctx.deadline(&req);
        let r = req.into_inner();
        check_id("order_id", &r.order_id)?;
        let map = self.ctx.map()?;
        let shard = map.shard_of_order(&r.order_id);
        let op = CommerceRead::Order {
            order_id: r.order_id.clone(),
        };
        match commerce::read(&self.ctx.node, shard, op, !r.serializable, deadline).await? {
            CommerceReadResult::Order(Some(v)) => Ok(self.reply(&map, *v)),
            CommerceReadResult::Order(None) => {
                // Not an order (yet): a cross-shard order in progress or aborted?
                match txn::txn_view(&self.ctx.node, &map, &r.order_id, deadline).await? {
                    Some(v) if v.status == TxnStatus::Pending => Err(Status::unavailable(format!(
                        "order {} is being placed; read it again shortly",
                        r.order_id
                    ))),
                    Some(v) if v.status == TxnStatus::Aborted => Err(v
                        .reason
                        .map(|why| {
                            Rejection::new(
                                RejectCode::OrderAborted,
                                format!("order {} was aborted: {}", r.order_id, why.message),
                            )
                        })
                        .unwrap_or_else(|| {
                            Rejection::new(
                                RejectCode::OrderAborted,
                                format!("order {} was aborted", r.order_id),
                            )
                        })
                        .into()),
                    Some(TxnView {
                        order: Some(order), ..
                    }) => Ok(self.reply(&map, order)),
                    _ => Err(Rejection::new(
                        RejectCode::UnknownOrder,
                        format!("no order {}", r.order_id),
                    )
                    .into()),
                }
            }
            other => Err(unexpected(other)),
        }
    }

    #[tracing::instrument(name = "orders.list", skip_all, fields(customer = %req.get_ref().customer_id))]
    async fn list_by_customer(
        &self,
        req: Request<proto::ListOrdersRequest>,
    ) -> Result<Response<proto::ListOrdersResponse>, Status> {
        let deadline = self.ctx.deadline(&req);
        let r = req.into_inner();
        check_id("customer_id", &r.customer_id)?;
        let limit = page_size(r.page_size)?;
        let after = page_token(&r.page_token)?;
        let map = self.ctx.map()?;
        // The index entry lives with each order: ask every shard, merge by id.
        let reads = map.data_groups().map(|shard| {
            let op = CommerceRead::CustomerOrders {
                customer: r.customer_id.clone(),
                after: after.clone(),
                limit,
            };
            commerce::read(&self.ctx.node, shard, op, true, deadline)
        });
        let mut orders = Vec::new();
        let mut more = false;
        for res in futures::future::join_all(reads).await {
            match res? {
                CommerceReadResult::Orders(rows, m) => {
                    more |= m;
                    orders.extend(rows);
                }
                other => return Err(unexpected(other)),
            }
        }
        orders.sort_by(|a, b| a.order.record.order_id.cmp(&b.order.record.order_id));
        if orders.len() > limit as usize {
            orders.truncate(limit as usize);
            more = true;
        }
        let next_page_token = match (more, orders.last()) {
            (true, Some(v)) => v.order.record.order_id.clone(),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListOrdersResponse {
            orders: orders
                .into_iter()
                .map(|v| {
                    let shard = map.shard_of_order(&v.order.record.order_id);
                    order_msg(v, shard)
                })
                .collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(name = "orders.pay", skip_all, fields(order_id = %req.get_ref().order_id))]
    async fn pay(
        &self,
        req: Request<proto::PayOrderRequest>,
    ) -> Result<Response<proto::Order>, Status> {
        let deadline = self.ctx.deadline(&req);
        let r = req.into_inner();
        check_id("order_id", &r.order_id)?;
        if r.card_number.is_empty() || r.card_number.len() > 19 {
            return Err(Status::invalid_argument("card_number must be 12-19 digits"));
        }
        let fence = fence_of(r.fence)?;
        let map = self.ctx.map()?;
        // The provider call moves money, so the flow must reach its record
        // even if the caller goes away meanwhile (hyper drops the handler of
        // a reset stream): it runs as its own task, and this handler waits.
        let node = Arc::clone(&self.ctx.node);
        let flow_map = Arc::clone(&map);
        let flow = async move {
            commerce::pay(
                &node,
                &flow_map,
                &r.order_id,
                &r.card_number,
                fence.as_ref(),
                deadline,
            )
            .await
        };
        let view = run_detached("payment flow", flow).await?;
        Ok(self.reply(&map, view))
    }

    #[tracing::instrument(name = "orders.ship", skip_all, fields(order_id = %req.get_ref().order_id))]
    async fn ship(
        &self,
        req: Request<proto::OrderIdRequest>,
    ) -> Result<Response<proto::Order>, Status> {
        self.transition(req, OrderEvent::Ship).await
    }

    #[tracing::instrument(name = "orders.deliver", skip_all, fields(order_id = %req.get_ref().order_id))]
    async fn deliver(
        &self,
        req: Request<proto::OrderIdRequest>,
    ) -> Result<Response<proto::Order>, Status> {
        self.transition(req, OrderEvent::Deliver).await
    }

    #[tracing::instrument(name = "orders.cancel", skip_all, fields(order_id = %req.get_ref().order_id))]
    async fn cancel(
        &self,
        req: Request<proto::OrderIdRequest>,
    ) -> Result<Response<proto::Order>, Status> {
        self.transition(req, OrderEvent::Cancel).await
    }
}
