//! Catalog: products by SKU and the rules a product and an ordered quantity
//! must satisfy.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::money::{Currency, MAX_PRICE_MINOR};
use super::{RejectCode, Rejection, check_id};

/// Longest title, in bytes.
pub const MAX_TITLE_BYTES: usize = 200;
/// Longest description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 4096;
/// Most attributes per product.
pub const MAX_ATTRIBUTES: usize = 32;
/// Longest attribute name or value, in bytes.
pub const MAX_ATTRIBUTE_BYTES: usize = 256;
/// Largest quantity of one SKU in one cart line or order line.
pub const MAX_LINE_QUANTITY: u32 = 1_000_000;

/// A sellable item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    /// Stock keeping unit: the product's id and routing key.
    pub sku: String,
    /// Display name.
    pub title: String,
    /// Free text.
    pub description: String,
    /// Unit price in minor units of `currency`.
    pub price_minor: i64,
    /// Price currency.
    pub currency: Currency,
    /// Whether it can be added to carts and ordered.
    pub active: bool,
    /// Free-form attributes (colour, size, ...).
    pub attributes: BTreeMap<String, String>,
    /// Most units of this SKU in one order (0 = no limit but [`MAX_LINE_QUANTITY`]).
    pub max_per_order: u32,
}

impl Product {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), Rejection> {
        check_id("sku", &self.sku)?;
        let bad = |m: String| Err(Rejection::new(RejectCode::InvalidProduct, m));
        if self.title.trim().is_empty() || self.title.len() > MAX_TITLE_BYTES {
            return bad(format!(
                "title must be 1..={MAX_TITLE_BYTES} bytes and not blank, got {}",
                self.title.len()
            ));
        }
        if self.description.len() > MAX_DESCRIPTION_BYTES {
            return bad(format!(
                "description is {} bytes, limit is {MAX_DESCRIPTION_BYTES}",
                self.description.len()
            ));
        }
        if !(0..=MAX_PRICE_MINOR).contains(&self.price_minor) {
            return bad(format!(
                "price must be 0..={MAX_PRICE_MINOR} minor units, got {}",
                self.price_minor
            ));
        }
        if self.attributes.len() > MAX_ATTRIBUTES {
            return bad(format!(
                "{} attributes, limit is {MAX_ATTRIBUTES}",
                self.attributes.len()
            ));
        }
        if let Some((k, _)) = self.attributes.iter().find(|(k, v)| {
            k.is_empty() || k.len() > MAX_ATTRIBUTE_BYTES || v.len() > MAX_ATTRIBUTE_BYTES
        }) {
            return bad(format!(
                "attribute {k:?}: name must be 1..={MAX_ATTRIBUTE_BYTES} bytes and value at most {MAX_ATTRIBUTE_BYTES}"
            ));
        }
        if self.max_per_order > MAX_LINE_QUANTITY {
            return bad(format!(
                "max_per_order is {}, limit is {MAX_LINE_QUANTITY}",
                self.max_per_order
            ));
        }
        Ok(())
    }

    /// Most units of this SKU one order (or cart line) may hold.
    pub fn line_limit(&self) -> u32 {
        if self.max_per_order == 0 {
            MAX_LINE_QUANTITY
        } else {
            self.max_per_order
        }
    }

    /// Checks that `qty` units may be ordered: active, 1..=line limit.
    pub fn check_orderable(&self, qty: u32) -> Result<(), Rejection> {
        if !self.active {
            return Err(Rejection::new(
                RejectCode::InactiveProduct,
                format!("product {} is not active", self.sku),
            ));
        }
        check_quantity(&self.sku, i64::from(qty))?;
        if qty > self.line_limit() {
            return Err(Rejection::new(
                RejectCode::OverMaxPerOrder,
                format!(
                    "{qty} × {} exceeds its limit of {} per order",
                    self.sku,
                    self.line_limit()
                ),
            ));
        }
        Ok(())
    }
}

/// Checks a requested line quantity: 1..=[`MAX_LINE_QUANTITY`].
pub fn check_quantity(sku: &str, qty: i64) -> Result<u32, Rejection> {
    match u32::try_from(qty) {
        Ok(q) if (1..=MAX_LINE_QUANTITY).contains(&q) => Ok(q),
        _ => Err(Rejection::new(
            RejectCode::BadQuantity,
            format!("quantity of {sku} must be 1..={MAX_LINE_QUANTITY}, got {qty}"),
        )),
    }
}

#[cfg(test)]
pub(crate) fn product(sku: &str, price_minor: i64, currency: &str) -> Product {
    Product {
        sku: sku.into(),
        title: format!("Product {sku}"),
        description: String::new(),
        price_minor,
        currency: Currency::parse(currency).expect("test currency"),
        active: true,
        attributes: BTreeMap::new(),
        max_per_order: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_fields_are_range_checked() {
        assert!(product("A", 100, "EUR").validate().is_ok());
        let mut p = product("A", -1, "EUR");
        assert_eq!(p.validate().unwrap_err().code, RejectCode::InvalidProduct);
        p.price_minor = MAX_PRICE_MINOR + 1;
        assert!(p.validate().is_err());
        let mut p = product("A", 1, "EUR");
        p.title = " ".into();
        assert!(p.validate().is_err());
        let mut p = product("bad sku", 1, "EUR");
        assert_eq!(p.validate().unwrap_err().code, RejectCode::InvalidId);
        p.sku = "ok".into();
        p.attributes.insert(String::new(), "v".into());
        assert!(p.validate().is_err());
    }

    #[test]
    fn orderable_checks_active_quantity_and_limit() {
        let mut p = product("A", 100, "EUR");
        p.max_per_order = 2;
        assert!(p.check_orderable(2).is_ok());
        assert_eq!(
            p.check_orderable(3).unwrap_err().code,
            RejectCode::OverMaxPerOrder
        );
        assert_eq!(
            p.check_orderable(0).unwrap_err().code,
            RejectCode::BadQuantity
        );
        p.active = false;
        assert_eq!(
            p.check_orderable(1).unwrap_err().code,
            RejectCode::InactiveProduct
        );
        assert!(check_quantity("A", -3).is_err());
        assert_eq!(check_quantity("A", 7).unwrap(), 7);
    }
}
