//! `shopkv demo seed`: loads a deterministic demo catalog (products spread
//! over every shard, each with stock) for `cluster/bootstrap.sh --demo`.

use futures::StreamExt;
use serde_json::json;

use super::{CliError, Format, GlobalArgs, connect};
use crate::proto;
use crate::proto::catalog_client::CatalogClient;
use crate::proto::inventory_client::InventoryClient;

/// Requests in flight while seeding.
const SEED_CONCURRENCY: usize = 32;
/// Most products one seed run creates.
pub const MAX_DEMO_PRODUCTS: u32 = 100_000;

const KINDS: [&str; 10] = [
    "T-shirt",
    "Hoodie",
    "Mug",
    "Cap",
    "Notebook",
    "Backpack",
    "Sock pair",
    "Poster",
    "Bottle",
    "Sticker",
];
const COLOURS: [&str; 10] = [
    "red", "blue", "green", "black", "white", "yellow", "grey", "navy", "pink", "orange",
];

/// The `i`-th demo product (0-based) and its stock: SKU `DEMO-00001`, ...
pub fn demo_product(i: u32) -> (proto::Product, i64) {
    let kind = KINDS[(i % 10) as usize];
    let colour = COLOURS[((i / 10) % 10) as usize];
    let size = ["S", "M", "L", "XL"][((i / 100) % 4) as usize];
    let sku = format!("DEMO-{:05}", i + 1);
    let price_minor = 499 + i64::from(i % 50) * 100;
    let product = proto::Product {
        sku,
        title: format!("{kind}, {colour}, {size}"),
        description: format!("Demo {kind} in {colour}, size {size}."),
        price_minor,
        currency: "EUR".into(),
        active: true,
        attributes: [
            ("colour".to_string(), colour.to_string()),
            ("size".to_string(), size.to_string()),
        ]
        .into_iter()
        .collect(),
        max_per_order: 10,
        version: 0,
    };
    (product, 20 + i64::from(i % 7) * 30)
}

/// Runs `shopkv demo seed`.
pub async fn seed(g: &GlobalArgs, products: u32) -> Result<(), CliError> {
    if products == 0 || products > MAX_DEMO_PRODUCTS {
        return Err(CliError(format!(
            "--products must be 1..={MAX_DEMO_PRODUCTS}, got {products}"
        )));
    }
    let ch = connect(g).await?;
    let results = futures::stream::iter(0..products)
        .map(|i| {
            let mut catalog = CatalogClient::new(ch.clone());
            let mut inventory = InventoryClient::new(ch.clone());
            async move {
                let (product, on_hand) = demo_product(i);
                let sku = product.sku.clone();
                catalog
                    .put(proto::PutProductRequest {
                        fence: None,
                        product: Some(product),
                    })
                    .await?;
                inventory
                    .set_stock(proto::SetStockRequest {
                        sku,
                        on_hand,
                        fence: None,
                    })
                    .await?;
                Ok::<(), tonic::Status>(())
            }
        })
        .buffer_unordered(SEED_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    for r in results {
        r?;
    }
    match g.write_out {
        Format::Json => println!("{}", json!({"products": products})),
        Format::Table => println!("OK {products} demo products with stock (DEMO-00001..)"),
    }
    Ok(())
}
