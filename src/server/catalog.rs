//! `shopkv.v1.Catalog`: products by SKU on the SKU's shard; `List` merges
//! every shard's page in SKU order.

use tonic::{Request, Response, Status};

use super::fence_of;
use super::records::{Ctx, check_id, page_size, page_token, product_msg, unknown_sku};
use crate::commerce::{self, CommerceError};
use crate::domain::catalog::Product;
use crate::domain::money::Currency;
use crate::node::NodeError;
use crate::proto;
use crate::proto::catalog_server::Catalog;
use crate::sm::commerce::{CommerceCommand, CommerceRead, CommerceReadResult, CommerceResponse};

/// The Catalog service.
pub struct CatalogService {
    ctx: Ctx,
}

impl CatalogService {
    /// A service over `ctx`'s node.
    pub fn new(ctx: Ctx) -> CatalogService {
        CatalogService { ctx }
    }
}

fn product_reply(r: CommerceResponse) -> Result<Response<proto::Product>, Status> {
    match r {
        CommerceResponse::Product(p) => Ok(Response::new(product_msg(p))),
        other => Err(unexpected(other)),
    }
}

/// An apply result of the wrong kind (a bug).
pub(super) fn unexpected(r: impl std::fmt::Debug) -> Status {
    Status::from(CommerceError::Node(NodeError::Internal(format!(
        "unexpected result {r:?}"
    ))))
}

#[tonic::async_trait]
impl Catalog for CatalogService {
    #[tracing::instrument(name = "catalog.put", skip_all, fields(sku))]
    async fn put(
        &self,
        req: Request<proto::PutProductRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        let deadline = self.ctx.deadline(&req);
        let r = req.into_inner();
        let fence = fence_of(r.fence)?;
        let Some(p) = r.product else {
            return Err(Status::invalid_argument("product is required"));
        };
        tracing::Span::current().record("sku", p.sku.as_str());
        let product = Product {
            sku: p.sku,
            title: p.title,
            description: p.description,
            price_minor: p.price_minor,
            currency: Currency::parse(&p.currency)?,
            active: p.active,
            attributes: p.attributes.into_iter().collect(),
            max_per_order: p.max_per_order,
        };
        product.validate()?;
        let shard = self.ctx.map()?.shard_of_sku(&product.sku);
        let cmd = CommerceCommand::PutProduct(product);
        product_reply(
            commerce::propose_fenced(&self.ctx.node, shard, cmd, fence.as_ref(), deadline).await?,
        )
    }

    #[tracing::instrument(name = "catalog.get", skip_all, fields(sku = %req.get_ref().sku))]
    async fn get(
        &self,
        req: Request<proto::GetProductRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        let deadline = self.ctx.deadline(&req);
        let r = req.into_inner();
        check_id("sku", &r.sku)?;
        let shard = self.ctx.map()?.shard_of_sku(&r.sku);
        let op = CommerceRead::Product { sku: r.sku.clone() };
        match commerce::read(&self.ctx.node, shard, op, !r.serializable, deadline).await? {
            CommerceReadResult::Product(Some(p)) => Ok(Response::new(product_msg(p))),
            CommerceReadResult::Product(None) => Err(unknown_sku(&r.sku)),
            other => Err(unexpected(other)),
        }
    }

    #[tracing::instrument(name = "catalog.list", skip_all, fields(page_size = req.get_ref().page_size))]
    async fn list(
        &self,
        req: Request<proto::ListProductsRequest>,
    ) -> Result<Response<proto::ListProductsResponse>, Status> {
        let deadline = self.ctx.deadline(&req);
        let r = req.into_inner();
        let limit = page_size(r.page_size)?;
        let after = page_token(&r.page_token)?;
        let map = self.ctx.map()?;
        // Each shard returns its first `limit` SKUs after the token; the
        // smallest `limit` of their union are exactly the page.
        let reads = map.data_groups().map(|shard| {
            let op = CommerceRead::Products {
                after: after.clone(),
                limit,
            };
            commerce::read(&self.ctx.node, shard, op, true, deadline)
        });
        let mut products = Vec::new();
        let mut more = false;
        for res in futures::future::join_all(reads).await {
            match res? {
                CommerceReadResult::Products(rows, m) => {
                    more |= m;
                    products.extend(rows);
                }
                other => return Err(unexpected(other)),
            }
        }
        products.sort_by(|a, b| a.record.sku.cmp(&b.record.sku));
        if products.len() > limit as usize {
            products.truncate(limit as usize);
            more = true;
        }
        let next_page_token = match (more, products.last()) {
            (true, Some(p)) => p.record.sku.clone(),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListProductsResponse {
            products: products.into_iter().map(product_msg).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(name = "catalog.deactivate", skip_all, fields(sku = %req.get_ref().sku))]
    async fn deactivate(
        &self,
        req: Request<proto::DeactivateProductRequest>,
    ) -> Result<Response<proto::Product>, Status> {
        let deadline = self.ctx.deadline(&req);
        let r = req.into_inner();
        check_id("sku", &r.sku)?;
        let shard = self.ctx.map()?.shard_of_sku(&r.sku);
        let fence = fence_of(r.fence)?;
        let cmd = CommerceCommand::DeactivateProduct { sku: r.sku };
        product_reply(
            commerce::propose_fenced(&self.ctx.node, shard, cmd, fence.as_ref(), deadline).await?,
        )
    }
}
