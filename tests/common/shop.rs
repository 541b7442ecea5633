//! Commerce clients for the integration tests: one connection's Catalog,
//! Inventory, Cart and Orders clients with the calls the tests repeat.

use std::collections::BTreeMap;

use shopkv::proto;
use shopkv::proto::cart_client::CartClient;
use shopkv::proto::catalog_client::CatalogClient;
use shopkv::proto::inventory_client::InventoryClient;
use shopkv::proto::orders_client::OrdersClient;
use shopkv::router::ClusterMap;
use tonic::transport::Channel;

use super::{TestCluster, channel};

pub struct Shop {
    pub catalog: CatalogClient<Channel>,
    pub inventory: InventoryClient<Channel>,
    pub cart: CartClient<Channel>,
    pub orders: OrdersClient<Channel>,
}

/// The commerce clients over one connection to node `via`.
pub async fn shop(c: &TestCluster, via: u64) -> Shop {
    let ch = channel(&c.node(via).client).await.expect("connect");
    Shop {
        catalog: CatalogClient::new(ch.clone()),
        inventory: InventoryClient::new(ch.clone()),
        cart: CartClient::new(ch.clone()),
        orders: OrdersClient::new(ch),
    }
}

/// An active product with no attributes and no per-order limit.
pub fn product(sku: &str, price_minor: i64, currency: &str) -> proto::Product {
    proto::Product {
        sku: sku.into(),
        title: format!("Product {sku}"),
        description: String::new(),
        price_minor,
        currency: currency.into(),
        active: true,
        attributes: Default::default(),
        max_per_order: 0,
        version: 0,
    }
}

impl Shop {
    pub async fn put(&mut self, p: proto::Product) -> Result<proto::Product, tonic::Status> {
        self.catalog
            .put(proto::PutProductRequest {
                product: Some(p),
                fence: None,
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn stock(&mut self, sku: &str) -> proto::StockLevel {
        self.inventory
            .get(proto::GetStockRequest {
                sku: sku.into(),
                serializable: false,
            })
            .await
            .expect("stock get")
            .into_inner()
    }

    pub async fn set_stock(
        &mut self,
        sku: &str,
        on_hand: i64,
    ) -> Result<proto::StockLevel, tonic::Status> {
        self.inventory
            .set_stock(proto::SetStockRequest {
                fence: None,
                sku: sku.into(),
                on_hand,
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn place(
        &mut self,
        customer: &str,
        order_id: &str,
        lines: &[(&str, u32)],
    ) -> Result<proto::Order, tonic::Status> {
        self.orders
            .place(proto::PlaceOrderRequest {
                fence: None,
                order_id: order_id.into(),
                customer_id: customer.into(),
                lines: lines
                    .iter()
                    .map(|(s, q)| proto::CartLine {
                        sku: s.to_string(),
                        quantity: *q,
                    })
                    .collect(),
                from_cart: false,
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn order(&mut self, order_id: &str) -> Result<proto::Order, tonic::Status> {
        get_order(&mut self.orders, order_id).await
    }

    pub async fn pay(&mut self, order_id: &str, card: &str) -> Result<proto::Order, tonic::Status> {
        self.orders
            .pay(proto::PayOrderRequest {
                fence: None,
                order_id: order_id.into(),
                card_number: card.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn add(
        &mut self,
        customer: &str,
        sku: &str,
        quantity: i64,
    ) -> Result<proto::CartView, tonic::Status> {
        self.cart
            .add_item(proto::AddCartItemRequest {
                fence: None,
                customer_id: customer.into(),
                sku: sku.into(),
                quantity,
            })
            .await
            .map(|r| r.into_inner())
    }
}

impl Shop {
    /// Creates a product and sets its stock.
    pub async fn add_product(&mut self, sku: &str, price_minor: i64, currency: &str, stock: i64) {
        self.put(product(sku, price_minor, currency))
            .await
            .expect("put product");
        self.set_stock(sku, stock).await.expect("set stock");
    }

    /// (on_hand, reserved) of each SKU.
    pub async fn stocks(&mut self, skus: &[String]) -> Vec<(i64, i64)> {
        let mut out = Vec::new();
        for s in skus {
            let l = self.stock(s).await;
            out.push((l.on_hand, l.reserved));
        }
        out
    }
}

/// A linearizable `Orders.Get` of `order_id`.
pub async fn get_order(
    orders: &mut OrdersClient<Channel>,
    order_id: &str,
) -> Result<proto::Order, tonic::Status> {
    orders
        .get(proto::GetOrderRequest {
            order_id: order_id.into(),
            serializable: false,
        })
        .await
        .map(|r| r.into_inner())
}

/// The `x-shopkv-reason` of a status ("" if none).
pub fn reason(s: &tonic::Status) -> String {
    s.metadata()
        .get("x-shopkv-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// One SKU named `{prefix}-…` on each of `shards` shards, in shard order.
pub fn skus_on_every_shard(prefix: &str, shards: u32) -> Vec<String> {
    let m = ClusterMap::new(0, shards, BTreeMap::new());
    let mut by_shard = BTreeMap::new();
    for i in 0.. {
        let sku = format!("{prefix}-{i}");
        by_shard.entry(m.shard_of_sku(&sku)).or_insert(sku);
        if by_shard.len() == shards as usize {
            break;
        }
    }
    by_shard.into_values().collect()
}
