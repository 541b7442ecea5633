//! Commerce rules as pure functions: money, catalog, inventory, carts, orders
//! and payments. No storage, no clock, no network: callers pass `now_ms` and
//! records in, and get new records or a [`Rejection`] out. `sm::commerce`
//! applies them inside Raft; the services use the same checks at the edge.

pub mod cart;
pub mod catalog;
pub mod inventory;
pub mod money;
pub mod order;

use serde::{Deserialize, Serialize};

/// Longest SKU, customer id or order id, in bytes.
pub const MAX_ID_BYTES: usize = 64;

/// Why a business rule refused a request. The numeric values are stable:
/// they are stored in replicated responses and shown to clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u16)]
pub enum RejectCode {
    /// An id (SKU, customer, order) is empty, too long or has bad characters.
    InvalidId = 1,
    /// A product field is out of range (title, price, currency, attributes).
    InvalidProduct = 2,
    /// No product with this SKU.
    UnknownSku = 3,
    /// The product is deactivated.
    InactiveProduct = 4,
    /// A quantity is zero, negative or too large.
    BadQuantity = 5,
    /// More than the product's `max_per_order` in one order or cart line.
    OverMaxPerOrder = 6,
    /// Lines priced in different currencies.
    CurrencyMismatch = 7,
    /// A money or stock computation would overflow.
    Overflow = 8,
    /// An order or checkout with no lines.
    EmptyOrder = 9,
    /// Too many lines in one order or cart.
    TooManyLines = 10,
    /// No order with this id.
    UnknownOrder = 11,
    /// The order's status does not allow this transition.
    IllegalTransition = 12,
    /// Stock would drop below what is reserved (or below zero).
    BelowReserved = 13,
    /// Not enough available stock.
    OutOfStock = 14,
    /// The order id was already used for a different order.
    OrderIdReused = 15,
    /// The SKU is not in the cart.
    NotInCart = 16,
    /// The payment provider declined the payment.
    PaymentDeclined = 17,
    /// The cart changed since it was read for checkout.
    CartChanged = 18,
    /// Stored records disagree with each other (a bug, never user input).
    Inconsistent = 19,
    /// The cross-shard order was aborted (a vote said no, or it timed out).
    OrderAborted = 20,
    /// No such session (closed or expired).
    UnknownSession = 21,
    /// A session has as many locks as it may.
    TooManyLocks = 22,
    /// The write's fencing token was superseded by a newer lock holder.
    StaleFence = 23,
    /// An election request from a session that does not lead it (any more).
    NotLeader = 24,
    /// The cluster has as many sessions as it may.
    TooManySessions = 25,
}

/// The gRPC class of a [`RejectCode`] (the server maps it to a status code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectKind {
    /// INVALID_ARGUMENT: the request itself is wrong.
    InvalidArgument,
    /// NOT_FOUND: it names something that does not exist.
    NotFound,
    /// FAILED_PRECONDITION: the state of the system does not allow it.
    FailedPrecondition,
    /// ABORTED: a concurrent change won; re-read and retry.
    Aborted,
    /// INTERNAL: a bug.
    Internal,
}

impl RejectCode {
    /// Stable upper-case name, sent to clients as `x-shopkv-reason`.
    pub fn name(self) -> &'static str {
        match self {
            RejectCode::InvalidId => "INVALID_ID",
            RejectCode::InvalidProduct => "INVALID_PRODUCT",
            RejectCode::UnknownSku => "UNKNOWN_SKU",
            RejectCode::InactiveProduct => "INACTIVE_PRODUCT",
            RejectCode::BadQuantity => "BAD_QUANTITY",
            RejectCode::OverMaxPerOrder => "OVER_MAX_PER_ORDER",
            RejectCode::CurrencyMismatch => "CURRENCY_MISMATCH",
            RejectCode::Overflow => "OVERFLOW",
            RejectCode::EmptyOrder => "EMPTY_ORDER",
            RejectCode::TooManyLines => "TOO_MANY_LINES",
            RejectCode::UnknownOrder => "UNKNOWN_ORDER",
            RejectCode::IllegalTransition => "ILLEGAL_TRANSITION",
            RejectCode::BelowReserved => "BELOW_RESERVED",
            RejectCode::OutOfStock => "OUT_OF_STOCK",
            RejectCode::OrderIdReused => "ORDER_ID_REUSED",
            RejectCode::NotInCart => "NOT_IN_CART",
            RejectCode::PaymentDeclined => "PAYMENT_DECLINED",
            RejectCode::CartChanged => "CART_CHANGED",
            RejectCode::Inconsistent => "INCONSISTENT",
            RejectCode::OrderAborted => "ORDER_ABORTED",
            RejectCode::UnknownSession => "UNKNOWN_SESSION",
            RejectCode::TooManyLocks => "TOO_MANY_LOCKS",
            RejectCode::StaleFence => "STALE_FENCE",
            RejectCode::NotLeader => "NOT_LEADER",
            RejectCode::TooManySessions => "TOO_MANY_SESSIONS",
        }
    }

    /// The gRPC class of this code.
    pub fn kind(self) -> RejectKind {
        match self {
            RejectCode::InvalidId
            | RejectCode::InvalidProduct
            | RejectCode::BadQuantity
            | RejectCode::OverMaxPerOrder
            | RejectCode::CurrencyMismatch
            | RejectCode::Overflow
            | RejectCode::EmptyOrder
            | RejectCode::TooManyLines => RejectKind::InvalidArgument,
            RejectCode::UnknownSku
            | RejectCode::UnknownOrder
            | RejectCode::NotInCart
            | RejectCode::UnknownSession => RejectKind::NotFound,
            RejectCode::InactiveProduct
            | RejectCode::IllegalTransition
            | RejectCode::BelowReserved
            | RejectCode::OutOfStock
            | RejectCode::OrderIdReused
            | RejectCode::PaymentDeclined
            | RejectCode::OrderAborted
            | RejectCode::TooManyLocks
            | RejectCode::StaleFence
            | RejectCode::NotLeader
            | RejectCode::TooManySessions => RejectKind::FailedPrecondition,
            RejectCode::CartChanged => RejectKind::Aborted,
            RejectCode::Inconsistent => RejectKind::Internal,
        }
    }
}

/// A business rule refused the request; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Rejection {
    /// Which rule.
    pub code: RejectCode,
    /// For people: what was wrong, with the values involved.
    pub message: String,
}

impl Rejection {
    /// A rejection with `code` and `message`.
    pub fn new(code: RejectCode, message: impl Into<String>) -> Rejection {
        Rejection {
            code,
            message: message.into(),
        }
    }
}

/// Checks a SKU, customer id or order id: 1..=64 bytes of `A-Z a-z 0-9 . _ : -`.
/// The narrow alphabet keeps ids printable in logs and URLs.
pub fn check_id(what: &str, id: &str) -> Result<(), Rejection> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(Rejection::new(
            RejectCode::InvalidId,
            format!("{what} must be 1..={MAX_ID_BYTES} bytes, got {}", id.len()),
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(Rejection::new(
            RejectCode::InvalidId,
            format!("{what} {id:?} has character {c:?}; allowed: A-Z a-z 0-9 . _ : -"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(check_id("sku", "SKU-1.a_b:c").is_ok());
        assert_eq!(check_id("sku", "").unwrap_err().code, RejectCode::InvalidId);
        assert!(check_id("sku", "a b").is_err());
        assert!(check_id("sku", "é").is_err());
        assert!(check_id("sku", &"x".repeat(65)).is_err());
        assert!(check_id("sku", &"x".repeat(64)).is_ok());
    }
}
