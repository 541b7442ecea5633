//! Carts: a customer's lines (SKU, quantity) before checkout. Prices are not
//! kept here: they are read and snapshotted when the order is placed.

use serde::{Deserialize, Serialize};

use super::catalog::MAX_LINE_QUANTITY;
use super::order::MAX_ORDER_LINES;
use super::{RejectCode, Rejection};

/// One cart line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CartLine {
    /// Product.
    pub sku: String,
    /// Units, 1..=the product's line limit.
    pub qty: u32,
}

/// A customer's cart; lines in the order they were first added.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cart {
    /// Lines, one per SKU.
    pub lines: Vec<CartLine>,
}

impl Cart {
    /// Adds `qty` units of `sku` (merging into its line), keeping the line
    /// within `line_limit` and the cart within [`MAX_ORDER_LINES`] lines.
    pub fn add(mut self, sku: &str, qty: u32, line_limit: u32) -> Result<Cart, Rejection> {
        let limit = line_limit.min(MAX_LINE_QUANTITY);
        match self.lines.iter_mut().find(|l| l.sku == sku) {
            Some(line) => {
                let total = line.qty.saturating_add(qty);
                check_line(sku, total, limit)?;
                line.qty = total;
            }
            None => {
                check_line(sku, qty, limit)?;
                if self.lines.len() >= MAX_ORDER_LINES {
                    return Err(Rejection::new(
                        RejectCode::TooManyLines,
                        format!("a cart holds at most {MAX_ORDER_LINES} lines"),
                    ));
                }
                self.lines.push(CartLine {
                    sku: sku.to_string(),
                    qty,
                });
            }
        }
        Ok(self)
    }

    /// Sets the quantity of an existing line.
    pub fn update(mut self, sku: &str, qty: u32, line_limit: u32) -> Result<Cart, Rejection> {
        check_line(sku, qty, line_limit.min(MAX_LINE_QUANTITY))?;
        match self.lines.iter_mut().find(|l| l.sku == sku) {
            Some(line) => line.qty = qty,
            None => return Err(not_in_cart(sku)),
        }
        Ok(self)
    }

    /// Removes a line.
    pub fn remove(mut self, sku: &str) -> Result<Cart, Rejection> {
        let before = self.lines.len();
        self.lines.retain(|l| l.sku != sku);
        if self.lines.len() == before {
            return Err(not_in_cart(sku));
        }
        Ok(self)
    }
}

fn check_line(sku: &str, qty: u32, limit: u32) -> Result<(), Rejection> {
    if qty == 0 {
        return Err(Rejection::new(
            RejectCode::BadQuantity,
            format!("quantity of {sku} must be at least 1"),
        ));
    }
    if qty > limit {
        return Err(Rejection::new(
            RejectCode::OverMaxPerOrder,
            format!("{qty} × {sku} exceeds its limit of {limit} per order"),
        ));
    }
    Ok(())
}

fn not_in_cart(sku: &str) -> Rejection {
    Rejection::new(RejectCode::NotInCart, format!("{sku} is not in the cart"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_merge_and_respect_limits() {
        let c = Cart::default()
            .add("a", 2, 5)
            .unwrap()
            .add("b", 1, 5)
            .unwrap();
        let c = c.add("a", 3, 5).unwrap();
        assert_eq!(
            c.lines[0],
            CartLine {
                sku: "a".into(),
                qty: 5
            }
        );
        assert_eq!(
            c.clone().add("a", 1, 5).unwrap_err().code,
            RejectCode::OverMaxPerOrder
        );
        let c = c.update("b", 4, 5).unwrap();
        assert_eq!(c.lines[1].qty, 4);
        assert_eq!(
            c.clone().update("b", 0, 5).unwrap_err().code,
            RejectCode::BadQuantity
        );
        assert_eq!(
            c.clone().remove("zz").unwrap_err().code,
            RejectCode::NotInCart
        );
        let c = c.remove("a").unwrap();
        assert_eq!(c.lines.len(), 1);
    }

    #[test]
    fn a_cart_is_bounded() {
        let mut c = Cart::default();
        for i in 0..MAX_ORDER_LINES {
            c = c.add(&format!("s{i}"), 1, 10).unwrap();
        }
        assert_eq!(
            c.add("one-more", 1, 10).unwrap_err().code,
            RejectCode::TooManyLines
        );
    }
}
