//! `shopkv.v1.Cart`: carts on the customer's shard. Adding or updating a line
//! first reads the product from its own shard (exists, active, its per-order
//! limit); placing the order checks everything again atomically.

use std::time::Instant;

use tonic::{Request, Response, Status};

use super::catalog::unexpected;
use super::fence_of;
use super::records::{Ctx, cart_msg, check_id, unknown_sku};
use crate::commerce;
use crate::domain::catalog::{Product, check_quantity};
use crate::proto;
use crate::proto::cart_server::Cart;
use crate::sm::commerce::{CommerceCommand, CommerceRead, CommerceReadResult, CommerceResponse};

/// The Cart service.
pub struct CartService {
    ctx: Ctx,
}

impl CartService {
    /// A service over `ctx`'s node.
    pub fn new(ctx: Ctx) -> CartService {
        CartService { ctx }
    }

    /// The product, if it exists and can be ordered at all.
    async fn orderable(&self, sku: &str, deadline: Instant) -> Result<Product, Status> {
        let shard = self.ctx.map()?.shard_of_sku(sku);
        let op = CommerceRead::Product {
            sku: sku.to_string(),
        };
        match commerce::read(&self.ctx.node, shard, op, true, deadline).await? {
            CommerceReadResult::Product(Some(p)) => {
                p.record.check_orderable(1)?;
                Ok(p.record)
            }
            CommerceReadResult::Product(None) => Err(unknown_sku(sku)),
            other => Err(unexpected(other)),
        }
    }

    /// Checks a line request (ids, quantity, the product orderable) and
    /// returns the quantity and the product's per-order limit.
    async fn checked_line(
        &self,
        customer: &str,
        sku: &str,
        quantity: i64,
        deadline: Instant,
    ) -> Result<(u32, u32), Status> {
        check_id("customer_id", customer)?;
        check_id("sku", sku)?;
        let qty = check_quantity(sku, quantity)?;
        let product = self.orderable(sku, deadline).await?;
        Ok((qty, product.line_limit()))
    }

    async fn change(
        &self,
        customer: String,
        cmd: CommerceCommand,
        fence: Option<proto::Fence>,
        deadline: Instant,
    ) -> Result<Response<proto::CartView>, Status> {
        let fence = fence_of(fence)?;
        let shard = self.ctx.map()?.shard_of_customer(&customer);
        match commerce::propose_fenced(&self.ctx.node, shard, cmd, fence.as_ref(), deadline).await?
        {
            CommerceResponse::Cart(c) => Ok(Response::new(cart_msg(customer, c))),
            other => Err(unexpected(other)),
        }
    }
}

#[tonic::async_trait]
impl Cart for CartService {
    #[tracing::instrument(name = "cart.add", skip_all, fields(customer = %req.get_ref().customer_id, sku = %req.get_ref().sku))]
    async fn add_item(
        &self,
        req: Request<proto::AddCartItemRequest>,
    ) -> Result<Response<proto::CartView>, Status> {
        let deadline = self.ctx.deadline(&req);
        let r = req.into_inner();
        let (qty, line_limit) = self
            .checked_line(&r.customer_id, &r.sku, r.quantity, deadline)
            .await?;
        let cmd = CommerceCommand::CartAdd {
            customer: r.customer_id.clone(),
            sku: r.sku,
            qty,
            line_limit,
        };
        self.change(r.customer_id, cmd, r.fence, deadline).await
    }

    #[tracing::instrument(name = "cart.remove", skip_all, fields(customer = %req.get_ref().customer_id, sku = %req.get_ref().sku))]
    async fn remove_item(
        &self,
        req: Request<proto::RemoveCartItemRequest>,
    ) -> Result<Response<proto::CartView>, Status> {
        let deadline = self.ctx.deadline(&req);
        let r = req.into_inner();
        check_id("customer_id", &r.customer_id)?;
        check_id("sku", &r.sku)?;
        let cmd = CommerceCommand::CartRemove {
            customer: r.customer_id.clone(),
            sku: r.sku,
        };
        self.change(r.customer_id, cmd, r.fence, deadline).await
    }

    #[tracing::instrument(name = "cart.update", skip_all, fields(customer = %req.get_ref().customer_id, sku = %req.get_ref().sku))]
    async fn update_quantity(
        &self,
        req: Request<proto::UpdateCartItemRequest>,
    ) -> Result<Response<proto::CartView>, Status> {
        let deadline = self.ctx.deadline(&req);
        let r = req.into_inner();
        let (qty, line_limit) = self
            .checked_line(&r.customer_id, &r.sku, r.quantity, deadline)
            .await?;
        let cmd = CommerceCommand::CartUpdate {
            customer: r.customer_id.clone(),
            sku: r.sku,
            qty,
            line_limit,
        };
        self.change(r.customer_id, cmd, r.fence, deadline).await
    }

    #[tracing::instrument(name = "cart.get", skip_all, fields(customer = %req.get_ref().customer_id))]
    async fn get(
        &self,
        req: Request<proto::GetCartRequest>,
    ) -> Result<Response<proto::CartView>, Status> {
        let deadline = self.ctx.deadline(&req);
        let r = req.into_inner();
        check_id("customer_id", &r.customer_id)?;
        let shard = self.ctx.map()?.shard_of_customer(&r.customer_id);
        let op = CommerceRead::Cart {
            customer: r.customer_id.clone(),
        };
        match commerce::read(&self.ctx.node, shard, op, true, deadline).await? {
            CommerceReadResult::Cart(c) => Ok(Response::new(cart_msg(r.customer_id, c))),
            other => Err(unexpected(other)),
        }
    }

    #[tracing::instrument(name = "cart.clear", skip_all, fields(customer = %req.get_ref().customer_id))]
    async fn clear(
        &self,
        req: Request<proto::ClearCartRequest>,
    ) -> Result<Response<proto::CartView>, Status> {
        let deadline = self.ctx.deadline(&req);
        let r = req.into_inner();
        check_id("customer_id", &r.customer_id)?;
        let cmd = CommerceCommand::CartClear {
            customer: r.customer_id.clone(),
            expected_version: None,
        };
        self.change(r.customer_id, cmd, r.fence, deadline).await
    }
}
