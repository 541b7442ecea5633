//! Orders and their payments: pricing (unit prices snapshotted at placement,
//! checked totals), the status machine and the payment record.
//!
//! ```text
//! pending_payment ──pay──▶ paid ──ship──▶ shipped ──deliver──▶ delivered
//!        │ └──expire──▶ expired          │
//!        └────cancel──▶ cancelled ◀─cancel┘   (paid: the capture is refunded)
//! ```

use serde::{Deserialize, Serialize};

use super::catalog::{Product, check_quantity};
use super::money::{self, Currency};
use super::{RejectCode, Rejection, check_id};

/// Most lines in one order (and one cart).
pub const MAX_ORDER_LINES: usize = 500;

/// Where an order is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderStatus {
    /// Placed, stock reserved, waiting for payment until `expires_at_ms`.
    PendingPayment,
    /// Payment captured; stock still reserved.
    Paid,
    /// Handed to the carrier; reserved stock consumed.
    Shipped,
    /// Received by the customer.
    Delivered,
    /// Cancelled; stock released, any capture refunded.
    Cancelled,
    /// Not paid in time; stock released.
    Expired,
}

impl OrderStatus {
    /// Lower-case name, as in the API.
    pub fn name(self) -> &'static str {
        match self {
            OrderStatus::PendingPayment => "pending_payment",
            OrderStatus::Paid => "paid",
            OrderStatus::Shipped => "shipped",
            OrderStatus::Delivered => "delivered",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Expired => "expired",
        }
    }

    /// Whether the order's stock is still reserved (to be shipped or released).
    pub fn holds_stock(self) -> bool {
        matches!(self, OrderStatus::PendingPayment | OrderStatus::Paid)
    }

    /// Whether it has been paid and not cancelled since: what Pay returns as
    /// it is, however it got there (a retry, another attempt, the sweeper).
    pub fn is_paid(self) -> bool {
        matches!(
            self,
            OrderStatus::Paid | OrderStatus::Shipped | OrderStatus::Delivered
        )
    }
}

/// What moves an order from one status to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderEvent {
    /// Payment captured.
    Pay,
    /// Shipped.
    Ship,
    /// Delivered.
    Deliver,
    /// Cancelled by the customer or an operator.
    Cancel,
    /// The payment deadline passed.
    Expire,
}

impl OrderEvent {
    fn verb(self) -> &'static str {
        match self {
            OrderEvent::Pay => "pay",
            OrderEvent::Ship => "ship",
            OrderEvent::Deliver => "deliver",
            OrderEvent::Cancel => "cancel",
            OrderEvent::Expire => "expire",
        }
    }
}

/// The status after `event`, or FAILED_PRECONDITION naming the current status.
pub fn transition(
    order_id: &str,
    from: OrderStatus,
    event: OrderEvent,
) -> Result<OrderStatus, Rejection> {
    use OrderEvent as E;
    use OrderStatus as S;
    match (from, event) {
        (S::PendingPayment, E::Pay) => Ok(S::Paid),
        (S::Paid, E::Ship) => Ok(S::Shipped),
        (S::Shipped, E::Deliver) => Ok(S::Delivered),
        (S::PendingPayment | S::Paid, E::Cancel) => Ok(S::Cancelled),
        (S::PendingPayment, E::Expire) => Ok(S::Expired),
        _ => Err(Rejection::new(
            RejectCode::IllegalTransition,
            format!(
                "order {order_id} is {}; cannot {}",
                from.name(),
                event.verb()
            ),
        )),
    }
}

/// One order line, priced at placement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// Product.
    pub sku: String,
    /// Product title at placement.
    pub title: String,
    /// Units.
    pub qty: u32,
    /// Unit price at placement, minor units.
    pub unit_price_minor: i64,
    /// `qty × unit_price_minor`.
    pub line_total_minor: i64,
}

/// An order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Chosen by the client (its idempotency key) or generated.
    pub order_id: String,
    /// Who placed it.
    pub customer: String,
    /// Lines in SKU order, one per SKU.
    pub lines: Vec<OrderLine>,
    /// Currency of every line and the total.
    pub currency: Currency,
    /// Σ line totals.
    pub total_minor: i64,
    /// Current status.
    pub status: OrderStatus,
    /// When it was placed (proposer's clock, ms since the Unix epoch).
    pub placed_at_ms: u64,
    /// Unpaid past this, it expires.
    pub expires_at_ms: u64,
    /// When the last status change happened.
    pub updated_at_ms: u64,
    /// Placed by 2PC: its lines' stock lives on other shards and moves
    /// through settlements; otherwise (1PC) it moves in the same apply.
    pub two_phase: bool,
    /// Placed by a checkout: the version of the cart it ordered. A retried
    /// checkout that finds the order empties that cart if it still is that
    /// version (the first attempt may have died before it could).
    pub checkout_cart_version: Option<u64>,
}

/// The payment record of an order (same shard as the order).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// Idempotency key of the attempt that captured: `order_id:attempt`.
    pub idempotency_key: String,
    /// Provider's reference of the capture.
    pub provider_ref: String,
    /// Last four digits of the card (never the number).
    pub card_last4: String,
    /// Authorized amount.
    pub authorized_minor: i64,
    /// Captured amount.
    pub captured_minor: i64,
    /// Refunded amount.
    pub refunded_minor: i64,
    /// Captured but owed back (order cancelled or expired); the leader's
    /// sweeper refunds it through the provider.
    pub refund_due_minor: i64,
    /// Declined or failed attempts so far; the next attempt is this + 1.
    pub failed_attempts: u32,
    /// Why the last attempt was declined.
    pub last_decline: String,
}

impl Payment {
    /// Idempotency key of the next attempt to charge this order.
    pub fn next_attempt_key(&self, order_id: &str) -> (u32, String) {
        let attempt = self.failed_attempts.saturating_add(1);
        (attempt, format!("{order_id}:{attempt}"))
    }
}

/// Checks and normalises requested lines: ids valid, quantities 1..=limit,
/// duplicates merged, 1..=[`MAX_ORDER_LINES`] lines; sorted by SKU.
pub fn normalize_lines(lines: &[(String, i64)]) -> Result<Vec<(String, u32)>, Rejection> {
    if lines.is_empty() {
        return Err(Rejection::new(RejectCode::EmptyOrder, "order has no lines"));
    }
    if lines.len() > MAX_ORDER_LINES {
        return Err(Rejection::new(
            RejectCode::TooManyLines,
            format!(
                "order has {} lines, limit is {MAX_ORDER_LINES}",
                lines.len()
            ),
        ));
    }
    let mut merged: std::collections::BTreeMap<&str, u32> = std::collections::BTreeMap::new();
    for (sku, qty) in lines {
        check_id("sku", sku)?;
        let q = check_quantity(sku, *qty)?;
        let slot = merged.entry(sku.as_str()).or_insert(0);
        *slot = check_quantity(sku, i64::from(*slot) + i64::from(q))?;
    }
    Ok(merged
        .into_iter()
        .map(|(s, q)| (s.to_string(), q))
        .collect())
}

/// Prices normalised lines against their products: every product orderable
/// in that quantity, one currency, checked totals. Returns the priced lines,
/// the currency and the total.
pub fn price_lines(lines: &[(Product, u32)]) -> Result<(Vec<OrderLine>, Currency, i64), Rejection> {
    let Some((first, _)) = lines.first() else {
        return Err(Rejection::new(RejectCode::EmptyOrder, "order has no lines"));
    };
    let currency = first.currency;
    let mut total = 0i64;
    let mut out = Vec::with_capacity(lines.len());
    for (p, qty) in lines {
        p.check_orderable(*qty)?;
        if p.currency != currency {
            return Err(Rejection::new(
                RejectCode::CurrencyMismatch,
                format!(
                    "{} is priced in {}, {} in {}: one order, one currency",
                    first.sku, currency, p.sku, p.currency
                ),
            ));
        }
        let line_total = money::line_total(p.price_minor, *qty)?;
        total = money::add(total, line_total)?;
        out.push(OrderLine {
            sku: p.sku.clone(),
            title: p.title.clone(),
            qty: *qty,
            unit_price_minor: p.price_minor,
            line_total_minor: line_total,
        });
    }
    Ok((out, currency, total))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::domain::catalog::product;
    use crate::domain::money::MAX_PRICE_MINOR;

    #[test]
    fn transitions_follow_the_status_machine() {
        use OrderEvent as E;
        use OrderStatus as S;
        assert_eq!(transition("o", S::PendingPayment, E::Pay).unwrap(), S::Paid);
        assert_eq!(transition("o", S::Paid, E::Ship).unwrap(), S::Shipped);
        assert_eq!(
            transition("o", S::Shipped, E::Deliver).unwrap(),
            S::Delivered
        );
        assert_eq!(transition("o", S::Paid, E::Cancel).unwrap(), S::Cancelled);
        assert_eq!(
            transition("o", S::PendingPayment, E::Expire).unwrap(),
            S::Expired
        );
        let e = transition("o1", S::Shipped, E::Cancel).unwrap_err();
        assert_eq!(e.code, RejectCode::IllegalTransition);
        assert!(e.message.contains("shipped"), "{e}");
        for s in [S::Delivered, S::Cancelled, S::Expired] {
            for ev in [E::Pay, E::Ship, E::Deliver, E::Cancel, E::Expire] {
                assert!(transition("o", s, ev).is_err(), "{s:?} {ev:?}");
            }
        }
        assert!(transition("o", S::Paid, E::Expire).is_err());
        assert!(transition("o", S::PendingPayment, E::Ship).is_err());
        // Paid stays paid through shipping; a cancel ends it.
        let paid: Vec<S> = [
            S::PendingPayment,
            S::Paid,
            S::Shipped,
            S::Delivered,
            S::Cancelled,
            S::Expired,
        ]
        .into_iter()
        .filter(|s| s.is_paid())
        .collect();
        assert_eq!(paid, vec![S::Paid, S::Shipped, S::Delivered]);
    }

    #[test]
    fn lines_are_merged_sorted_and_bounded() {
        let l = normalize_lines(&[("b".into(), 1), ("a".into(), 2), ("b".into(), 3)]).unwrap();
        assert_eq!(l, vec![("a".to_string(), 2), ("b".to_string(), 4)]);
        assert_eq!(
            normalize_lines(&[]).unwrap_err().code,
            RejectCode::EmptyOrder
        );
        assert_eq!(
            normalize_lines(&[("a".into(), 0)]).unwrap_err().code,
            RejectCode::BadQuantity
        );
        let many: Vec<(String, i64)> = (0..1000).map(|i| (format!("s{i}"), 1)).collect();
        assert_eq!(
            normalize_lines(&many).unwrap_err().code,
            RejectCode::TooManyLines
        );
    }

    #[test]
    fn pricing_rejects_mixed_currency_and_overflow() {
        let eur = product("a", 100, "EUR");
        let usd = product("b", 100, "USD");
        assert_eq!(
            price_lines(&[(eur.clone(), 1), (usd, 1)]).unwrap_err().code,
            RejectCode::CurrencyMismatch
        );
        let dear = product("c", MAX_PRICE_MINOR, "EUR");
        assert_eq!(
            price_lines(&[(dear, 100_000)]).unwrap_err().code,
            RejectCode::Overflow
        );
        let (lines, cur, total) = price_lines(&[(eur, 3)]).unwrap();
        assert_eq!(
            (lines[0].line_total_minor, cur.as_str(), total),
            (300, "EUR", 300)
        );
    }

    proptest! {
        /// The total is exactly Σ qty × unit price whenever that fits in i64,
        /// and an overflow is always reported, never wrapped.
        #[test]
        fn totals_are_exact_or_rejected(items in proptest::collection::vec((0i64..=MAX_PRICE_MINOR, 1u32..=1_000_000), 1..20)) {
            let lines: Vec<(Product, u32)> = items
                .iter()
                .enumerate()
                .map(|(i, (price, qty))| (product(&format!("s{i}"), *price, "EUR"), *qty))
                .collect();
            let exact: i128 = items.iter().map(|(p, q)| i128::from(*p) * i128::from(*q)).sum();
            match price_lines(&lines) {
                Ok((priced, _, total)) => {
                    prop_assert_eq!(i128::from(total), exact);
                    let sum: i128 = priced.iter().map(|l| i128::from(l.line_total_minor)).sum();
                    prop_assert_eq!(sum, exact);
                }
                Err(e) => {
                    prop_assert_eq!(e.code, RejectCode::Overflow);
                    prop_assert!(exact > i128::from(i64::MAX));
                }
            }
        }
    }
}
