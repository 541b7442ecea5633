//! Inventory: per SKU, `on_hand` units and `reserved` units held for orders
//! that are placed but not shipped. `available = on_hand − reserved` is
//! derived, never stored. Invariant: `0 ≤ reserved ≤ on_hand`; every
//! operation returns a new level that keeps it, or a rejection.

use serde::{Deserialize, Serialize};

use super::{RejectCode, Rejection};

/// Largest `on_hand` a SKU may have.
pub const MAX_ON_HAND: i64 = 1_000_000_000_000;

/// Stock of one SKU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryLevel {
    /// Units physically in stock (shipping decreases it).
    pub on_hand: i64,
    /// Units reserved by placed, unshipped orders.
    pub reserved: i64,
}

impl InventoryLevel {
    /// Units that can still be reserved.
    pub fn available(&self) -> i64 {
        self.on_hand - self.reserved
    }

    /// Sets `on_hand` (a stock count): never below what is reserved.
    pub fn set_on_hand(self, sku: &str, on_hand: i64) -> Result<InventoryLevel, Rejection> {
        if !(0..=MAX_ON_HAND).contains(&on_hand) {
            return Err(Rejection::new(
                RejectCode::BadQuantity,
                format!("stock of {sku} must be 0..={MAX_ON_HAND}, got {on_hand}"),
            ));
        }
        if on_hand < self.reserved {
            return Err(Rejection::new(
                RejectCode::BelowReserved,
                format!(
                    "stock of {sku} cannot be {on_hand}: {} units are reserved",
                    self.reserved
                ),
            ));
        }
        Ok(InventoryLevel { on_hand, ..self })
    }

    /// Adds `delta` (negative: removes) to `on_hand`; never below reserved.
    pub fn adjust(self, sku: &str, delta: i64) -> Result<InventoryLevel, Rejection> {
        let on_hand = self.on_hand.checked_add(delta).ok_or_else(|| {
            Rejection::new(
                RejectCode::Overflow,
                format!("stock of {sku}: {} + {delta} overflows", self.on_hand),
            )
        })?;
        self.set_on_hand(sku, on_hand)
    }

    /// Reserves `qty` units for an order: needs `available ≥ qty`.
    pub fn reserve(self, sku: &str, qty: u32) -> Result<InventoryLevel, Rejection> {
        let q = i64::from(qty);
        if self.available() < q {
            return Err(Rejection::new(
                RejectCode::OutOfStock,
                format!(
                    "{sku}: {qty} requested, {} available",
                    self.available().max(0)
                ),
            ));
        }
        Ok(InventoryLevel {
            reserved: self.reserved + q,
            ..self
        })
    }

    /// Releases `qty` reserved units (order cancelled or expired).
    pub fn release(self, sku: &str, qty: u32) -> Result<InventoryLevel, Rejection> {
        let q = i64::from(qty);
        if self.reserved < q {
            return Err(inconsistent(sku, "release", qty, self));
        }
        Ok(InventoryLevel {
            reserved: self.reserved - q,
            ..self
        })
    }

    /// Consumes `qty` reserved units (order shipped): they leave the stock.
    pub fn consume(self, sku: &str, qty: u32) -> Result<InventoryLevel, Rejection> {
        let q = i64::from(qty);
        if self.reserved < q || self.on_hand < q {
            return Err(inconsistent(sku, "consume", qty, self));
        }
        Ok(InventoryLevel {
            on_hand: self.on_hand - q,
            reserved: self.reserved - q,
        })
    }
}

/// Where an order's reservation on one shard stands.
///
/// Whether the shard has learned a cross-shard order's decision is not a
/// state of each reservation but of the order's one `H` entry on the shard
/// (present until the decision is applied here): a commit then writes one
/// delete instead of rewriting every line's reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReservationState {
    /// Counted in `reserved`: prepared for a cross-shard order, or part of an
    /// order that exists, until it is shipped or released.
    Reserved,
    /// Given back (order aborted, cancelled or expired). Kept as a tombstone
    /// so that a late prepare of the same order fails.
    Released,
    /// Shipped: the units left `on_hand`. Kept as a tombstone.
    Consumed,
}

/// Stock one order reserves on one shard: its lines whose SKUs live there,
/// in one record (one read and one write per order and shard, whatever the
/// number of lines).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// (SKU, units) of this shard's lines; empty in a tombstone a release
    /// wrote because nothing was held.
    pub lines: Vec<(String, u32)>,
    /// Where it stands.
    pub state: ReservationState,
}

impl Reservation {
    /// Whether its units are still counted in `reserved`.
    pub fn is_live(&self) -> bool {
        self.state == ReservationState::Reserved
    }
}

fn inconsistent(sku: &str, op: &str, qty: u32, level: InventoryLevel) -> Rejection {
    Rejection::new(
        RejectCode::Inconsistent,
        format!("{sku}: cannot {op} {qty}: level is {level:?}"),
    )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Set(i64),
        Adjust(i64),
        Reserve(u32),
        Release(u32),
        Consume(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (-5i64..200).prop_map(Op::Set),
            (-100i64..100).prop_map(Op::Adjust),
            (0u32..60).prop_map(Op::Reserve),
            (0u32..60).prop_map(Op::Release),
            (0u32..60).prop_map(Op::Consume),
        ]
    }

    proptest! {
        /// Whatever sequence of operations is tried, accepted ones keep
        /// 0 ≤ reserved ≤ on_hand, rejected ones change nothing, and units are
        /// conserved: on_hand moves only by set/adjust and by consumption.
        #[test]
        fn every_operation_keeps_zero_le_reserved_le_on_hand(ops in proptest::collection::vec(op(), 0..80)) {
            let mut level = InventoryLevel::default();
            for op in ops {
                let before = level;
                let res = match op {
                    Op::Set(n) => level.set_on_hand("s", n),
                    Op::Adjust(d) => level.adjust("s", d),
                    Op::Reserve(q) => level.reserve("s", q),
                    Op::Release(q) => level.release("s", q),
                    Op::Consume(q) => level.consume("s", q),
                };
                if let Ok(next) = res {
                    match op {
                        Op::Reserve(q) => prop_assert_eq!(next.reserved, before.reserved + i64::from(q)),
                        Op::Consume(q) => prop_assert_eq!(next.on_hand, before.on_hand - i64::from(q)),
                        Op::Release(_) => prop_assert_eq!(next.on_hand, before.on_hand),
                        _ => prop_assert_eq!(next.reserved, before.reserved),
                    }
                    level = next;
                }
                prop_assert!(0 <= level.reserved, "{:?}", level);
                prop_assert!(level.reserved <= level.on_hand, "{:?}", level);
                prop_assert!(level.available() >= 0);
            }
        }
    }

    #[test]
    fn reserve_needs_available_and_set_respects_reserved() {
        let l = InventoryLevel::default().set_on_hand("s", 5).unwrap();
        let l = l.reserve("s", 3).unwrap();
        assert_eq!(l.available(), 2);
        assert_eq!(l.reserve("s", 3).unwrap_err().code, RejectCode::OutOfStock);
        assert_eq!(
            l.set_on_hand("s", 2).unwrap_err().code,
            RejectCode::BelowReserved
        );
        assert_eq!(
            l.adjust("s", -3).unwrap_err().code,
            RejectCode::BelowReserved
        );
        assert_eq!(l.adjust("s", -2).unwrap().on_hand, 3);
        assert_eq!(
            l.adjust("s", i64::MAX).unwrap_err().code,
            RejectCode::Overflow
        );
        let shipped = l.consume("s", 3).unwrap();
        assert_eq!(
            shipped,
            InventoryLevel {
                on_hand: 2,
                reserved: 0
            }
        );
        assert_eq!(
            shipped.release("s", 1).unwrap_err().code,
            RejectCode::Inconsistent
        );
    }
}
