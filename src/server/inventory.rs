//! `shopkv.v1.Inventory`: stock levels on the SKU's shard.

use tonic::{Request, Response, Status};

use super::catalog::unexpected;
use super::fence_of;
use super::records::{Ctx, check_id, stock_msg, unknown_sku};
use crate::commerce;
use crate::proto;
use crate::proto::inventory_server::Inventory;
use crate::sm::commerce::{CommerceCommand, CommerceRead, CommerceReadResult, CommerceResponse};

/// The Inventory service.
pub struct InventoryService {
    ctx: Ctx,
}

impl InventoryService {
    /// A service over `ctx`'s node.
    pub fn new(ctx: Ctx) -> InventoryService {
        InventoryService { ctx }
    }

    async fn change(
        &self,
        sku: String,
        cmd: CommerceCommand,
        fence: Option<proto::Fence>,
        deadline: std::time::Instant,
    ) -> Result<Response<proto::StockLevel>, Status> {
        let fence = fence_of(fence)?;
        let shard = self.ctx.map()?.shard_of_sku(&sku);
        match commerce::propose_fenced(&self.ctx.node, shard, cmd, fence.as_ref(), deadline).await?
        {
            CommerceResponse::Stock(l) => Ok(Response::new(stock_msg(sku, l))),
            other => Err(unexpected(other)),
        }
    }
}

#[tonic::async_trait]
impl Inventory for InventoryService {
    #[tracing::instrument(name = "inventory.set", skip_all, fields(sku = %req.get_ref().sku))]
    async fn set_stock(
        &self,
        req: Request<proto::SetStockRequest>,
    ) -> Result<Response<proto::StockLevel>, Status> {
        let deadline = self.ctx.deadline(&req);
        let r = req.into_inner();
        check_id("sku", &r.sku)?;
        let cmd = CommerceCommand::SetStock {
            sku: r.sku.clone(),
            on_hand: r.on_hand,
        };
        self.change(r.sku, cmd, r.fence, deadline).await
    }

    #[tracing::instrument(name = "inventory.adjust", skip_all, fields(sku = %req.get_ref().sku))]
    async fn adjust_stock(
        &self,
        req: Request<proto::AdjustStockRequest>,
    ) -> Result<Response<proto::StockLevel>, Status> {
        let deadline = self.ctx.deadline(&req);
        let r = req.into_inner();
        check_id("sku", &r.sku)?;
        let cmd = CommerceCommand::AdjustStock {
            sku: r.sku.clone(),
            delta: r.delta,
        };
        self.change(r.sku, cmd, r.fence, deadline).await
    }

    #[tracing::instrument(name = "inventory.get", skip_all, fields(sku = %req.get_ref().sku))]
    async fn get(
        &self,
        req: Request<proto::GetStockRequest>,
    ) -> Result<Response<proto::StockLevel>, Status> {
        let deadline = self.ctx.deadline(&req);
        let r = req.into_inner();
        check_id("sku", &r.sku)?;
        let shard = self.ctx.map()?.shard_of_sku(&r.sku);
        let op = CommerceRead::Stock { sku: r.sku.clone() };
        match commerce::read(&self.ctx.node, shard, op, !r.serializable, deadline).await? {
            CommerceReadResult::Stock(Some(l)) => Ok(Response::new(stock_msg(r.sku, l))),
            CommerceReadResult::Stock(None) => Err(unknown_sku(&r.sku)),
            other => Err(unexpected(other)),
        }
    }
}
