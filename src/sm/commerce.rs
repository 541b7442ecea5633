//! Apply and read of the commerce records (catalog, inventory, carts,
//! orders, payments) of one data shard. The rules are `domain`'s; this module
//! loads records, calls them, and writes the results — all reads and checks
//! first, then the writes, so a rejected command writes nothing.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{SmError, StateAccess};
use crate::codec;
use crate::domain::cart::Cart;
use crate::domain::catalog::Product;
use crate::domain::inventory::{InventoryLevel, Reservation, ReservationState};
use crate::domain::order::{
    self, Order, OrderEvent, OrderLine, OrderStatus, Payment, price_lines, transition,
};
use crate::domain::{RejectCode, Rejection};
use crate::storage::keys;

/// Most orders one `ExpireOrders` command may name.
pub const MAX_EXPIRE_BATCH: usize = 256;
/// Most entries one `DueCaptures` or `DueCartClears` read looks at.
const MAX_OWED_SCANNED: usize = 4_096;
/// Most deadline entries one due-deadline read looks at (orders held off by
/// a capture owed are skipped; there are at most as many as captures owed).
const MAX_DEADLINES_SCANNED: usize = 4_096;
/// An unpaid order whose payment was authorized (a capture owed) does not
/// expire for this long after the authorization: the customer paid in time,
/// and the sweeper captures and records it within seconds. Past it (the
/// provider has been failing for a minute), expiry goes ahead and a capture
/// recorded later is refunded.
pub const CAPTURE_OWED_HOLDS_EXPIRY_MS: u64 = 60_000;

/// A record with the log index of its last write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored<T> {
    /// Log index of the write that produced this value.
    pub version: u64,
    /// The record.
    pub record: T,
}

/// An order with its payment record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderView {
    /// The order.
    pub order: Stored<Order>,
    /// Its payment.
    pub payment: Payment,
}

/// What a payment attempt came to at the provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentOutcome {
    /// Authorized and captured.
    Captured {
        /// Provider's reference of the capture.
        provider_ref: String,
        /// Captured amount (the order total).
        amount_minor: i64,
        /// Last four digits of the card.
        card_last4: String,
    },
    /// Declined by the provider.
    Declined {
        /// The provider's reason.
        reason: String,
    },
    /// Authorized, not captured yet. Recorded before the capture is asked
    /// for, so that a capture whose record is lost (the flow's node died, or
    /// had no leader to record it) is found and recorded by the sweeper
    /// rather than leaving money taken for an unpaid order.
    Authorized {
        /// Provider's reference of the hold.
        auth_ref: String,
        /// Authorized amount (the order total).
        amount_minor: i64,
        /// Last four digits of the card.
        card_last4: String,
    },
}

/// An authorized payment whose capture is not recorded yet (`G` record):
/// what the sweeper needs to capture it (same key: the provider captures
/// once) and record it, without the card.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureOwed {
    /// `order_id:attempt` of the authorization.
    pub attempt_key: String,
    /// Provider's reference of the hold.
    pub auth_ref: String,
    /// Amount to capture.
    pub amount_minor: i64,
    /// Last four digits of the card.
    pub card_last4: String,
    /// Proposer's clock when the authorization was recorded.
    pub since_ms: u64,
}

impl CaptureOwed {
    /// Whether it still holds off its order's expiry at `now_ms`
    /// ([`CAPTURE_OWED_HOLDS_EXPIRY_MS`]).
    pub fn holds_expiry_at(&self, now_ms: u64) -> bool {
        now_ms < self.since_ms.saturating_add(CAPTURE_OWED_HOLDS_EXPIRY_MS)
    }
}

/// A checkout's cart, on another shard than its order, still to be emptied
/// (`E` record on the order's shard, written with the order). The checkout
/// empties it right after the order; the order shard's sweeper makes sure
/// once the entry is older than its grace (the checkout's node may have died
/// first) and then deletes the entry (`CartClearsDone`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CartClearOwed {
    /// Whose cart.
    pub customer: String,
    /// The version the checkout read: only that cart is emptied.
    pub cart_version: u64,
    /// Proposer's clock when the order was written.
    pub since_ms: u64,
}

/// Records, with a checkout's order, that the cart it read on another shard
/// is to be emptied.
pub(crate) fn owe_cart_clear(
    state: &mut dyn StateAccess,
    index: u64,
    order_id: &str,
    owed: &CartClearOwed,
) -> Result<(), SmError> {
    save(state, keys::cart_clear_owed_key(order_id), index, owed)
}

/// A commerce state change, proposed to the shard that holds its records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommerceCommand {
    /// Creates or replaces a product (already validated at the edge).
    PutProduct(Product),
    /// Marks a product inactive.
    DeactivateProduct {
        /// Product.
        sku: String,
    },
    /// Sets a SKU's `on_hand`.
    SetStock {
        /// Product.
        sku: String,
        /// New on-hand count.
        on_hand: i64,
    },
    /// Adds `delta` to a SKU's `on_hand`.
    AdjustStock {
        /// Product.
        sku: String,
        /// Change (negative removes).
        delta: i64,
    },
    /// Adds units to a cart line (the edge read the product's line limit).
    CartAdd {
        /// Cart owner.
        customer: String,
        /// Product.
        sku: String,
        /// Units to add.
        qty: u32,
        /// The product's per-order limit.
        line_limit: u32,
    },
    /// Sets a cart line's quantity.
    CartUpdate {
        /// Cart owner.
        customer: String,
        /// Product.
        sku: String,
        /// New quantity.
        qty: u32,
        /// The product's per-order limit.
        line_limit: u32,
    },
    /// Removes a cart line.
    CartRemove {
        /// Cart owner.
        customer: String,
        /// Product.
        sku: String,
    },
    /// Empties a cart; with `expected_version`, only if it is still that one
    /// (checkout clears exactly the cart it ordered).
    CartClear {
        /// Cart owner.
        customer: String,
        /// Version the cart must have.
        expected_version: Option<u64>,
    },
    /// Places an order whose lines and record all live on this shard (1PC):
    /// prices the lines, reserves stock, writes the order. Idempotent by id.
    PlaceOrder {
        /// Order id (the idempotency key).
        order_id: String,
        /// Customer.
        customer: String,
        /// Normalised lines: one per SKU, sorted.
        lines: Vec<(String, u32)>,
        /// Proposer's clock.
        now_ms: u64,
        /// Payment deadline.
        expires_at_ms: u64,
        /// Placed by a checkout: the version of the cart it read (kept in
        /// the order).
        checkout_cart_version: Option<u64>,
        /// The checked-out cart is on this shard: clear it in the same
        /// apply, refusing the order if it is no longer that version.
        clear_cart: bool,
    },
    /// Records the provider's answer to a payment attempt.
    RecordPayment {
        /// Order.
        order_id: String,
        /// `order_id:attempt` the provider was called with.
        attempt_key: String,
        /// Captured or declined.
        outcome: PaymentOutcome,
        /// Proposer's clock.
        now_ms: u64,
    },
    /// Records a refund the provider made of an owed amount.
    RecordRefund {
        /// Order.
        order_id: String,
        /// Refunded amount.
        amount_minor: i64,
    },
    /// Ship, Deliver or Cancel (compare-and-set on the current status).
    Transition {
        /// Order.
        order_id: String,
        /// `Ship`, `Deliver` or `Cancel`.
        event: OrderEvent,
        /// Proposer's clock.
        now_ms: u64,
    },
    /// Deletes the cart-clear-owed entries of the named orders: their carts
    /// are emptied, or were changed by their owners since (proposed by the
    /// shard leader's sweeper; at most [`MAX_EXPIRE_BATCH`]).
    CartClearsDone {
        /// Orders whose entry goes.
        order_ids: Vec<String>,
    },
    /// Expires the named orders that are still unpaid at `now_ms` (proposed by
    /// the shard leader's sweeper; apply re-checks each deadline).
    ExpireOrders {
        /// Candidates.
        order_ids: Vec<String>,
        /// Leader's clock.
        now_ms: u64,
    },
    /// 2PC, anchor: creates the transaction record PENDING (idempotent by order id).
    BeginTxn {
        /// Order id = transaction id.
        order_id: String,
        /// Customer.
        customer: String,
        /// Normalised lines.
        lines: Vec<(String, u32)>,
        /// Proposer's clock.
        now_ms: u64,
        /// Past this a PENDING record may be aborted by anyone.
        deadline_ms: u64,
    },
    /// 2PC, participant: validates this shard's lines and holds their stock.
    /// On the anchor, when it is also a participant, `begin` carries the
    /// `BeginTxn` that is applied first in the same apply (one write instead of two).
    PrepareTxn {
        /// Order id = transaction id.
        order_id: String,
        /// This shard's lines.
        lines: Vec<(String, u32)>,
        /// Proposer's clock.
        now_ms: u64,
        /// The fused `BeginTxn`, on the anchor only.
        begin: Option<TxnBegin>,
    },
    /// 2PC, anchor: the commit point (PENDING → COMMITTED with the order
    /// record) or the abort.
    DecideTxn {
        /// Order id = transaction id.
        order_id: String,
        /// Commit with the priced order, or abort with the reason.
        decision: Decision,
        /// Proposer's clock.
        now_ms: u64,
    },
    /// 2PC recovery, anchor: aborts a PENDING record past its deadline; with no
    /// record, writes an aborted one so the coordinator cannot create it later.
    AbortTxn {
        /// Order id = transaction id.
        order_id: String,
        /// Proposer's clock.
        now_ms: u64,
    },
    /// 2PC, participant: applies settlements to orders' reservations on this
    /// shard, many orders per command (idempotent; leaves tombstones).
    ResolveTxn {
        /// One per order.
        items: Vec<ResolveItem>,
        /// Proposer's clock (when an abort's tombstone was left).
        now_ms: u64,
    },
    /// 2PC, anchor: every participant applied these settlements; forget each
    /// (unless a newer settlement replaced it meanwhile).
    SettlementDone {
        /// (order id, the settlement that was applied).
        items: Vec<(String, Settlement)>,
    },
    /// Deletes aborted transactions' tombstones recorded before `before_ms`
    /// (proposed by the shard leader's sweeper after the retention; apply
    /// re-checks each).
    PruneAborted {
        /// Candidates, as the leader's replica indexes them.
        tombstones: Vec<AbortedTombstone>,
        /// Leader's clock minus the retention.
        before_ms: u64,
        /// Leader's clock.
        now_ms: u64,
    },
}

impl std::fmt::Display for CommerceCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommerceCommand::PutProduct(p) => write!(f, "PutProduct({})", p.sku),
            CommerceCommand::DeactivateProduct { sku } => write!(f, "Deactivate({sku})"),
            CommerceCommand::SetStock { sku, on_hand } => write!(f, "SetStock({sku}, {on_hand})"),
            CommerceCommand::AdjustStock { sku, delta } => {
                write!(f, "AdjustStock({sku}, {delta:+})")
            }
            CommerceCommand::CartAdd { customer, sku, .. } => {
                write!(f, "CartAdd({customer}, {sku})")
            }
            CommerceCommand::CartUpdate { customer, sku, .. } => {
                write!(f, "CartUpdate({customer}, {sku})")
            }
            CommerceCommand::CartRemove { customer, sku } => {
                write!(f, "CartRemove({customer}, {sku})")
            }
            CommerceCommand::CartClear { customer, .. } => write!(f, "CartClear({customer})"),
            CommerceCommand::PlaceOrder {
                order_id, lines, ..
            } => write!(f, "PlaceOrder({order_id}, lines={})", lines.len()),
            CommerceCommand::RecordPayment { order_id, .. } => {
                write!(f, "RecordPayment({order_id})")
            }
            CommerceCommand::RecordRefund { order_id, .. } => write!(f, "RecordRefund({order_id})"),
            CommerceCommand::Transition {
                order_id, event, ..
            } => write!(f, "{event:?}({order_id})"),
            CommerceCommand::CartClearsDone { order_ids } => {
                write!(f, "CartClearsDone(n={})", order_ids.len())
            }
            CommerceCommand::ExpireOrders { order_ids, .. } => {
                write!(f, "ExpireOrders(n={})", order_ids.len())
            }
            CommerceCommand::BeginTxn { order_id, .. } => write!(f, "BeginTxn({order_id})"),
            CommerceCommand::PrepareTxn {
                order_id, lines, ..
            } => write!(f, "PrepareTxn({order_id}, lines={})", lines.len()),
            CommerceCommand::DecideTxn {
                order_id, decision, ..
            } => write!(f, "DecideTxn({order_id}, commit={})", decision.is_commit()),
            CommerceCommand::AbortTxn { order_id, .. } => write!(f, "AbortTxn({order_id})"),
            CommerceCommand::ResolveTxn { items, .. } => {
                write!(f, "ResolveTxn(n={})", items.len())
            }
            CommerceCommand::PruneAborted { tombstones, .. } => {
                write!(f, "PruneAborted(n={})", tombstones.len())
            }
            CommerceCommand::SettlementDone { items } => {
                write!(f, "SettlementDone(n={})", items.len())
            }
        }
    }
}

/// The replicated result of a [`CommerceCommand`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommerceResponse {
    /// The product after the command.
    Product(Stored<Product>),
    /// The stock level after the command.
    Stock(Stored<InventoryLevel>),
    /// The cart after the command.
    Cart(Stored<Cart>),
    /// The order after the command.
    Order(Box<OrderView>),
    /// How many orders `ExpireOrders` expired.
    Expired {
        /// Count.
        orders: u32,
    },
    /// How many tombstones `PruneAborted` deleted.
    Pruned {
        /// Count.
        records: u32,
    },
    /// A business rule refused it. `RecordPayment` of a decline still records
    /// the failed attempt; every other rejection wrote nothing. For
    /// `PrepareTxn` this is the NO vote.
    Rejected(Rejection),
    /// A 2PC transaction's state after the command.
    Txn(Box<TxnView>),
    /// `PrepareTxn`: YES, with the products as they are now (for pricing).
    Prepared(Vec<Product>),
    /// `ResolveTxn` / `SettlementDone` / `CartClearsDone` applied; `failed`
    /// names the orders a rule refused (the others were applied).
    Settled {
        /// (order id, why).
        failed: Vec<(String, Rejection)>,
    },
}

fn reject(code: RejectCode, message: impl Into<String>) -> CommerceResponse {
    CommerceResponse::Rejected(Rejection::new(code, message))
}

/// Turns a domain `Result` into the value or an early `Rejected` return.
macro_rules! check {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(r) => return Ok(CommerceResponse::Rejected(r)),
        }
    };
}

mod txn;
pub use txn::{
    AbortedTombstone, Decision, HeldEntry, InFlight, MAX_PRUNE_BATCH, ResolveItem, SettleEntry,
    Settlement, TxnBegin, TxnRecord, TxnStatus, TxnView, same_request,
};

fn load<T: DeserializeOwned>(
    state: &mut dyn StateAccess,
    key: &[u8],
) -> Result<Option<Stored<T>>, SmError> {
    match state.get(key)? {
        Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
        None => Ok(None),
    }
}

fn save<T: Serialize>(
    state: &mut dyn StateAccess,
    key: Vec<u8>,
    version: u64,
    record: &T,
) -> Result<(), SmError> {
    #[derive(Serialize)]
    struct StoredRef<'a, T> {
        version: u64,
        record: &'a T,
    }
    state.put(key, codec::encode(&StoredRef { version, record })?)
}

/// Applies `cmd` at log `index`.
pub fn apply(
    state: &mut dyn StateAccess,
    index: u64,
    cmd: &CommerceCommand,
) -> Result<CommerceResponse, SmError> {
    match cmd {
        CommerceCommand::PutProduct(p) => {
            check!(p.validate());
            save(state, keys::product_key(&p.sku), index, p)?;
            Ok(CommerceResponse::Product(Stored {
                version: index,
                record: p.clone(),
            }))
        }
        CommerceCommand::DeactivateProduct { sku } => {
            let Some(mut p) = load::<Product>(state, &keys::product_key(sku))? else {
                return Ok(unknown_sku(sku));
            };
            p.record.active = false;
            save(state, keys::product_key(sku), index, &p.record)?;
            p.version = index;
            Ok(CommerceResponse::Product(p))
        }
        CommerceCommand::SetStock { sku, on_hand } => {
            change_stock(state, index, sku, |l| l.set_on_hand(sku, *on_hand))
        }
        CommerceCommand::AdjustStock { sku, delta } => {
            change_stock(state, index, sku, |l| l.adjust(sku, *delta))
        }
        CommerceCommand::CartAdd {
            customer,
            sku,
            qty,
            line_limit,
        } => change_cart(state, index, customer, |c| c.add(sku, *qty, *line_limit)),
        CommerceCommand::CartUpdate {
            customer,
            sku,
            qty,
            line_limit,
        } => change_cart(state, index, customer, |c| c.update(sku, *qty, *line_limit)),
        CommerceCommand::CartRemove { customer, sku } => {
            change_cart(state, index, customer, |c| c.remove(sku))
        }
        CommerceCommand::CartClear {
            customer,
            expected_version,
        } => {
            let key = keys::cart_key(customer);
            let current = load::<Cart>(state, &key)?;
            if let Some(expected) = expected_version
                && current.as_ref().map(|c| c.version) != Some(*expected)
            {
                return Ok(reject(
                    RejectCode::CartChanged,
                    format!("the cart of {customer} changed since it was read"),
                ));
            }
            if current.is_some() {
                state.delete(key)?;
            }
            Ok(CommerceResponse::Cart(Stored {
                version: index,
                record: Cart::default(),
            }))
        }
        CommerceCommand::PlaceOrder {
            order_id,
            customer,
            lines,
            now_ms,
            expires_at_ms,
            checkout_cart_version,
            clear_cart,
        } => place_order(
            state,
            index,
            PlaceArgs {
                order_id,
                customer,
                lines,
                now_ms: *now_ms,
                expires_at_ms: *expires_at_ms,
                checkout_cart_version: *checkout_cart_version,
                clear_cart: *clear_cart,
            },
        ),
        CommerceCommand::RecordPayment {
            order_id,
            attempt_key,
            outcome,
            now_ms,
        } => record_payment(state, index, order_id, attempt_key, outcome, *now_ms),
        CommerceCommand::RecordRefund {
            order_id,
            amount_minor,
        } => {
            let Some(view) = load_order(state, order_id)? else {
                return Ok(unknown_order(order_id));
            };
            let mut payment = view.payment;
            if *amount_minor <= 0 || *amount_minor > payment.refund_due_minor {
                return Ok(reject(
                    RejectCode::Inconsistent,
                    format!(
                        "refund of {amount_minor} for {order_id}: {} is owed",
                        payment.refund_due_minor
                    ),
                ));
            }
            payment.refund_due_minor -= amount_minor;
            payment.refunded_minor += amount_minor;
            if payment.refund_due_minor == 0 {
                state.delete(keys::refund_due_key(order_id))?;
            }
            save(state, keys::payment_key(order_id), index, &payment)?;
            Ok(order_response(view.order, payment))
        }
        CommerceCommand::Transition {
            order_id,
            event,
            now_ms,
        } => apply_transition(state, index, order_id, *event, *now_ms),
        CommerceCommand::BeginTxn {
            order_id,
            customer,
            lines,
            now_ms,
            deadline_ms,
        } => txn::begin(
            state,
            index,
            order_id,
            customer,
            lines,
            *now_ms,
            *deadline_ms,
        ),
        CommerceCommand::PrepareTxn {
            order_id,
            lines,
            now_ms,
            begin,
        } => {
            if let Some(b) = begin {
                let view = txn::begin(
                    state,
                    index,
                    order_id,
                    &b.customer,
                    &b.lines,
                    *now_ms,
                    b.deadline_ms,
                )?;
                // Decided already (a retry), or refused: that is the answer.
                match &view {
                    CommerceResponse::Txn(v) if v.status == TxnStatus::Pending => {}
                    _ => return Ok(view),
                }
            }
            // A hold made with its begin is the pending record's: it ends
            // with that record (kept on commit, released by the abort's
            // settlement), so it needs no held entry of its own.
            txn::prepare(state, index, order_id, lines, *now_ms, begin.is_none())
        }
        CommerceCommand::DecideTxn {
            order_id,
            decision,
            now_ms,
        } => txn::decide(state, index, order_id, decision, *now_ms),
        CommerceCommand::AbortTxn { order_id, now_ms } => {
            txn::abort_expired(state, index, order_id, *now_ms)
        }
        CommerceCommand::ResolveTxn { items, now_ms } => {
            txn::resolve_all(state, index, items, *now_ms)
        }
        CommerceCommand::PruneAborted {
            tombstones,
            before_ms,
            now_ms,
        } => Ok(CommerceResponse::Pruned {
            records: txn::prune_aborted(state, tombstones, *before_ms, *now_ms)?,
        }),
        CommerceCommand::SettlementDone { items } => txn::settlement_done(state, items),
        CommerceCommand::CartClearsDone { order_ids } => {
            for id in order_ids.iter().take(MAX_EXPIRE_BATCH) {
                state.delete(keys::cart_clear_owed_key(id))?;
            }
            Ok(CommerceResponse::Settled { failed: Vec::new() })
        }
        CommerceCommand::ExpireOrders { order_ids, now_ms } => {
            let mut expired = 0u32;
            for id in order_ids.iter().take(MAX_EXPIRE_BATCH) {
                let Some(view) = load_order(state, id)? else {
                    continue;
                };
                if view.order.record.status != OrderStatus::PendingPayment
                    || *now_ms < view.order.record.expires_at_ms
                    || capture_holds_expiry(&mut *state, id, *now_ms)?
                {
                    continue;
                }
                if let CommerceResponse::Order(_) =
                    apply_transition(state, index, id, OrderEvent::Expire, *now_ms)?
                {
                    expired += 1;
                }
            }
            Ok(CommerceResponse::Expired { orders: expired })
        }
    }
}

/// Whether `order_id` has a capture owed young enough to hold off its expiry.
fn capture_holds_expiry(
    state: &mut dyn StateAccess,
    order_id: &str,
    now_ms: u64,
) -> Result<bool, SmError> {
    Ok(
        load::<CaptureOwed>(state, &keys::capture_owed_key(order_id))?
            .is_some_and(|o| o.record.holds_expiry_at(now_ms)),
    )
}

fn unknown_sku(sku: &str) -> CommerceResponse {
    reject(RejectCode::UnknownSku, format!("no product with SKU {sku}"))
}

fn unknown_order(order_id: &str) -> CommerceResponse {
    reject(RejectCode::UnknownOrder, format!("no order {order_id}"))
}

fn order_response(order: Stored<Order>, payment: Payment) -> CommerceResponse {
    CommerceResponse::Order(Box::new(OrderView { order, payment }))
}

fn change_stock(
    state: &mut dyn StateAccess,
    index: u64,
    sku: &str,
    f: impl FnOnce(InventoryLevel) -> Result<InventoryLevel, Rejection>,
) -> Result<CommerceResponse, SmError> {
    if state.get(&keys::product_key(sku))?.is_none() {
        return Ok(unknown_sku(sku));
    }
    let level = load::<InventoryLevel>(state, &keys::inventory_key(sku))?
        .map(|s| s.record)
        .unwrap_or_default();
    let next = check!(f(level));
    save(state, keys::inventory_key(sku), index, &next)?;
    Ok(CommerceResponse::Stock(Stored {
        version: index,
        record: next,
    }))
}

fn change_cart(
    state: &mut dyn StateAccess,
    index: u64,
    customer: &str,
    f: impl FnOnce(Cart) -> Result<Cart, Rejection>,
) -> Result<CommerceResponse, SmError> {
    let key = keys::cart_key(customer);
    let cart = load::<Cart>(state, &key)?
        .map(|s| s.record)
        .unwrap_or_default();
    let next = check!(f(cart));
    if next.lines.is_empty() {
        state.delete(key)?;
    } else {
        save(state, key, index, &next)?;
    }
    Ok(CommerceResponse::Cart(Stored {
        version: index,
        record: next,
    }))
}

fn load_order(state: &mut dyn StateAccess, order_id: &str) -> Result<Option<OrderView>, SmError> {
    let Some(order) = load::<Order>(state, &keys::order_key(order_id))? else {
        return Ok(None);
    };
    let payment = load::<Payment>(state, &keys::payment_key(order_id))?
        .map(|s| s.record)
        .unwrap_or_default();
    Ok(Some(OrderView { order, payment }))
}

/// Up to `limit` entries under `prefix` (one per order, keyed by order id)
/// that are `due`, with their order ids. Young entries (work a live flow is
/// still finishing) are skipped, so it looks past them: at most
/// [`MAX_OWED_SCANNED`] entries.
fn due_owed<T: DeserializeOwned>(
    r: &dyn RecordReader,
    prefix: &[u8],
    order_id_of: fn(&[u8]) -> Option<&str>,
    due: impl Fn(&T) -> bool,
    limit: usize,
) -> Result<Vec<(String, T)>, SmError> {
    let mut out = Vec::new();
    for (k, v) in &r.scan(prefix, None, MAX_OWED_SCANNED)? {
        let owed: Stored<T> = codec::decode(v)?;
        if let Some(id) = order_id_of(k)
            && due(&owed.record)
        {
            out.push((id.to_string(), owed.record));
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok(out)
}

/// Up to `limit` orders whose payment deadline is `now_ms` or earlier, in
/// deadline order, skipping those a capture owed holds off (apply would skip
/// them too). Looks past held ones — at most [`MAX_DEADLINES_SCANNED`] rows —
/// so that they cannot hide later due orders until their hold ends.
fn due_deadlines(r: &dyn RecordReader, now_ms: u64, limit: usize) -> Result<Vec<String>, SmError> {
    let prefix = keys::order_deadline_prefix();
    let page = limit.clamp(1, MAX_DEADLINES_SCANNED);
    let mut due = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    let mut scanned = 0;
    while due.len() < limit && scanned < MAX_DEADLINES_SCANNED {
        let rows = r.scan(&prefix, after.as_deref(), page)?;
        scanned += rows.len();
        for (k, _) in &rows {
            let Some((at, id)) = keys::parse_order_deadline_key(k) else {
                continue;
            };
            if at > now_ms {
                return Ok(due);
            }
            let held = read_one::<CaptureOwed>(r, &keys::capture_owed_key(id))?
                .is_some_and(|o| o.record.holds_expiry_at(now_ms));
            if !held {
                due.push(id.to_string());
                if due.len() == limit {
                    return Ok(due);
                }
            }
        }
        match rows.last() {
            Some((last, _)) if rows.len() == page => after = Some(last.clone()),
            _ => break,
        }
    }
    Ok(due)
}

struct PlaceArgs<'a> {
    order_id: &'a str,
    customer: &'a str,
    lines: &'a [(String, u32)],
    now_ms: u64,
    expires_at_ms: u64,
    checkout_cart_version: Option<u64>,
    clear_cart: bool,
}

fn place_order(
    state: &mut dyn StateAccess,
    index: u64,
    a: PlaceArgs<'_>,
) -> Result<CommerceResponse, SmError> {
    // Idempotency first: a replay returns the first result even if prices or
    // stock changed since.
    if let Some(existing) = load_order(state, a.order_id)? {
        let same = existing.order.record.customer == a.customer
            && existing.order.record.lines.len() == a.lines.len()
            && existing
                .order
                .record
                .lines
                .iter()
                .zip(a.lines)
                .all(|(l, (sku, qty))| l.sku == *sku && l.qty == *qty);
        if same {
            return Ok(order_response(existing.order, existing.payment));
        }
        return Ok(reject(
            RejectCode::OrderIdReused,
            format!("order id {} is already used by another order", a.order_id),
        ));
    }
    // A cross-shard transaction used this id here: its record (anchored on
    // this shard) or its reservation (held or settled). The id is taken: this
    // order must neither replace a held reservation (recovery releases those
    // units through the anchor) nor have its own reservation released by the
    // settlement that transaction is still owed.
    if state.get(&keys::txn_key(a.order_id))?.is_some()
        || state.get(&keys::txn_pending_key(a.order_id))?.is_some()
        || state.get(&keys::reservation_key(a.order_id))?.is_some()
    {
        return Ok(reject(
            RejectCode::OrderIdReused,
            format!(
                "order id {} is already used by a cross-shard order",
                a.order_id
            ),
        ));
    }
    let lines = check!(order::normalize_lines(
        &a.lines
            .iter()
            .map(|(s, q)| (s.clone(), i64::from(*q)))
            .collect::<Vec<_>>()
    ));
    let mut products = Vec::with_capacity(lines.len());
    for (sku, qty) in &lines {
        let Some(p) = load::<Product>(state, &keys::product_key(sku))? else {
            return Ok(unknown_sku(sku));
        };
        products.push((p.record, *qty));
    }
    let (priced, currency, total_minor) = check!(price_lines(&products));
    let mut levels = Vec::with_capacity(lines.len());
    for (sku, qty) in &lines {
        let level = load::<InventoryLevel>(state, &keys::inventory_key(sku))?
            .map(|s| s.record)
            .unwrap_or_default();
        levels.push(check!(level.reserve(sku, *qty)));
    }
    if let Some(expected) = a.checkout_cart_version.filter(|_| a.clear_cart) {
        let cart = load::<Cart>(state, &keys::cart_key(a.customer))?;
        if cart.map(|c| c.version) != Some(expected) {
            return Ok(reject(
                RejectCode::CartChanged,
                format!("the cart of {} changed since checkout read it", a.customer),
            ));
        }
        state.delete(keys::cart_key(a.customer))?;
    }
    // Every check passed: write.
    for ((sku, _), level) in lines.iter().zip(&levels) {
        save(state, keys::inventory_key(sku), index, level)?;
    }
    let r = Reservation {
        lines: lines.clone(),
        state: ReservationState::Reserved,
    };
    save(state, keys::reservation_key(a.order_id), index, &r)?;
    let order = Order {
        order_id: a.order_id.to_string(),
        customer: a.customer.to_string(),
        lines: priced,
        currency,
        total_minor,
        status: OrderStatus::PendingPayment,
        placed_at_ms: a.now_ms,
        expires_at_ms: a.expires_at_ms,
        updated_at_ms: a.now_ms,
        two_phase: false,
        checkout_cart_version: a.checkout_cart_version,
    };
    save(state, keys::order_key(a.order_id), index, &order)?;
    if let Some(cart_version) = a.checkout_cart_version.filter(|_| !a.clear_cart) {
        let owed = CartClearOwed {
            customer: a.customer.to_string(),
            cart_version,
            since_ms: a.now_ms,
        };
        owe_cart_clear(state, index, a.order_id, &owed)?;
    }
    // No payment record yet: an absent one reads as nothing paid (every
    // reader defaults it), and the first payment event writes it.
    state.put(keys::customer_order_key(a.customer, a.order_id), Vec::new())?;
    state.put(
        keys::order_deadline_key(a.expires_at_ms, a.order_id),
        Vec::new(),
    )?;
    Ok(order_response(
        Stored {
            version: index,
            record: order,
        },
        Payment::default(),
    ))
}

fn record_payment(
    state: &mut dyn StateAccess,
    index: u64,
    order_id: &str,
    attempt_key: &str,
    outcome: &PaymentOutcome,
    now_ms: u64,
) -> Result<CommerceResponse, SmError> {
    let Some(OrderView {
        order: mut stored,
        mut payment,
    }) = load_order(state, order_id)?
    else {
        return Ok(unknown_order(order_id));
    };
    let money = match outcome {
        PaymentOutcome::Authorized { amount_minor, .. } => Some(("authorized", amount_minor)),
        PaymentOutcome::Captured { amount_minor, .. } => Some(("captured", amount_minor)),
        PaymentOutcome::Declined { .. } => None,
    };
    if let Some((what, amount_minor)) = money {
        if payment.captured_minor > 0 && payment.idempotency_key == attempt_key {
            // A retried Pay: this key's capture is already recorded. It gets
            // what Pay answers now: the order while it stays paid, the
            // refusal Pay gives a cancelled one (its refund is already owed).
            let status = stored.record.status;
            return Ok(match transition(order_id, status, OrderEvent::Pay) {
                _ if status.is_paid() => order_response(stored, payment),
                Err(r) => CommerceResponse::Rejected(r),
                Ok(_) => reject(
                    RejectCode::Inconsistent,
                    format!("order {order_id} is {status:?} with its capture recorded"),
                ),
            });
        }
        if *amount_minor != stored.record.total_minor {
            return Ok(reject(
                RejectCode::Inconsistent,
                format!(
                    "{what} {amount_minor} for order {order_id} of {}",
                    stored.record.total_minor
                ),
            ));
        }
    }
    match outcome {
        PaymentOutcome::Authorized {
            auth_ref,
            amount_minor,
            card_last4,
        } => {
            // Not payable any more: nothing is captured, the hold lapses.
            if let Err(r) = transition(order_id, stored.record.status, OrderEvent::Pay) {
                return Ok(CommerceResponse::Rejected(r));
            }
            let (_, next_key) = payment.next_attempt_key(order_id);
            if next_key != attempt_key {
                return Ok(reject(
                    RejectCode::Inconsistent,
                    format!(
                        "attempt {attempt_key} of order {order_id} is not the current one ({next_key})"
                    ),
                ));
            }
            let key = keys::capture_owed_key(order_id);
            if load::<CaptureOwed>(state, &key)?
                .is_none_or(|o| o.record.attempt_key != *attempt_key)
            {
                let owed = CaptureOwed {
                    attempt_key: attempt_key.to_string(),
                    auth_ref: auth_ref.clone(),
                    amount_minor: *amount_minor,
                    card_last4: card_last4.clone(),
                    since_ms: now_ms,
                };
                save(state, key, index, &owed)?;
            }
            Ok(order_response(stored, payment))
        }
        PaymentOutcome::Declined { reason } => {
            let (_, next_key) = payment.next_attempt_key(order_id);
            // Only the current attempt counts (a replayed decline does not skip one).
            if stored.record.status == OrderStatus::PendingPayment && next_key == attempt_key {
                payment.failed_attempts += 1;
                payment.last_decline = reason.clone();
                save(state, keys::payment_key(order_id), index, &payment)?;
            }
            Ok(reject(
                RejectCode::PaymentDeclined,
                format!("payment of order {order_id} declined: {reason}"),
            ))
        }
        PaymentOutcome::Captured {
            provider_ref,
            amount_minor,
            card_last4,
        } => {
            let payable = payment.captured_minor == 0;
            state.delete(keys::capture_owed_key(order_id))?;
            match transition(order_id, stored.record.status, OrderEvent::Pay) {
                Ok(next) if payable => {
                    payment.idempotency_key = attempt_key.to_string();
                    payment.provider_ref = provider_ref.clone();
                    payment.card_last4 = card_last4.clone();
                    payment.authorized_minor = *amount_minor;
                    payment.captured_minor = *amount_minor;
                    state.delete(keys::order_deadline_key(
                        stored.record.expires_at_ms,
                        order_id,
                    ))?;
                    stored.record.status = next;
                    stored.record.updated_at_ms = now_ms;
                    stored.version = index;
                    save(state, keys::order_key(order_id), index, &stored.record)?;
                    save(state, keys::payment_key(order_id), index, &payment)?;
                    Ok(order_response(stored, payment))
                }
                res => {
                    // The money was taken but the order cannot be paid (it
                    // expired or was cancelled meanwhile, or another attempt
                    // already paid it): owe it back.
                    payment.captured_minor += amount_minor;
                    payment.authorized_minor += amount_minor;
                    payment.refund_due_minor += amount_minor;
                    save(state, keys::payment_key(order_id), index, &payment)?;
                    state.put(keys::refund_due_key(order_id), Vec::new())?;
                    let why = match res {
                        Err(r) => r.message,
                        Ok(_) => format!("order {order_id} is already paid"),
                    };
                    Ok(reject(
                        RejectCode::IllegalTransition,
                        format!("{why}; the capture will be refunded"),
                    ))
                }
            }
        }
    }
}

fn apply_transition(
    state: &mut dyn StateAccess,
    index: u64,
    order_id: &str,
    event: OrderEvent,
    now_ms: u64,
) -> Result<CommerceResponse, SmError> {
    let Some(OrderView {
        order: mut stored,
        mut payment,
    }) = load_order(state, order_id)?
    else {
        return Ok(unknown_order(order_id));
    };
    if event == OrderEvent::Pay {
        return Ok(reject(
            RejectCode::IllegalTransition,
            "orders are paid through Pay",
        ));
    }
    let from = stored.record.status;
    let to = check!(transition(order_id, from, event));
    // Stock moves: ship consumes the reservations, cancel and expiry release them;
    // here for a 1PC order, through a settlement of its participants for a 2PC one.
    let moves_stock = from.holds_stock() && event != OrderEvent::Deliver;
    if moves_stock && stored.record.two_phase {
        let outcome = if event == OrderEvent::Ship {
            Settlement::Consume
        } else {
            Settlement::Release
        };
        let skus = stored.record.lines.iter().map(|l| l.sku.clone()).collect();
        txn::owe_settlement(state, index, order_id, outcome, skus, now_ms)?;
    }
    let mut levels = Vec::new();
    if moves_stock && !stored.record.two_phase {
        for line in &stored.record.lines {
            let level = load::<InventoryLevel>(state, &keys::inventory_key(&line.sku))?
                .map(|s| s.record)
                .unwrap_or_default();
            let next = if event == OrderEvent::Ship {
                check!(level.consume(&line.sku, line.qty))
            } else {
                check!(level.release(&line.sku, line.qty))
            };
            levels.push((line, next));
        }
    }
    if !levels.is_empty() {
        // A tombstone, not a delete: a later prepare under this order id (a
        // Place that reuses it for a cross-shard order) must find the
        // reservation settled and vote no, or it would hold stock that the
        // anchor's decision (this committed order) never releases.
        let end = if event == OrderEvent::Ship {
            ReservationState::Consumed
        } else {
            ReservationState::Released
        };
        let tombstone = Reservation {
            lines: stored
                .record
                .lines
                .iter()
                .map(|l| (l.sku.clone(), l.qty))
                .collect(),
            state: end,
        };
        save(state, keys::reservation_key(order_id), index, &tombstone)?;
    }
    for (line, level) in levels {
        let OrderLine { sku, .. } = line;
        save(state, keys::inventory_key(sku), index, &level)?;
    }
    if from == OrderStatus::PendingPayment {
        state.delete(keys::order_deadline_key(
            stored.record.expires_at_ms,
            order_id,
        ))?;
    }
    if event == OrderEvent::Cancel {
        let owed = payment.captured_minor - payment.refunded_minor - payment.refund_due_minor;
        if owed > 0 {
            payment.refund_due_minor += owed;
            save(state, keys::payment_key(order_id), index, &payment)?;
            state.put(keys::refund_due_key(order_id), Vec::new())?;
        }
    }
    stored.record.status = to;
    stored.record.updated_at_ms = now_ms;
    stored.version = index;
    save(state, keys::order_key(order_id), index, &stored.record)?;
    Ok(order_response(stored, payment))
}

/// (record key, value) pairs in key order.
pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// Reads records of one shard (over RocksDB, or a map in tests).
pub trait RecordReader {
    /// One record.
    fn get(&self, record_key: &[u8]) -> Result<Option<Vec<u8>>, SmError>;
    /// Records under `prefix` with keys greater than `after` (if given), in
    /// key order, at most `limit`.
    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Rows, SmError>;
}

/// A commerce read served by one shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommerceRead {
    /// One product.
    Product {
        /// SKU.
        sku: String,
    },
    /// Products in SKU order after `after`.
    Products {
        /// Exclusive start.
        after: Option<String>,
        /// At most this many.
        limit: u32,
    },
    /// A SKU's stock (NOT_FOUND if the product does not exist).
    Stock {
        /// SKU.
        sku: String,
    },
    /// A customer's cart.
    Cart {
        /// Customer.
        customer: String,
    },
    /// One order with its payment.
    Order {
        /// Order id.
        order_id: String,
    },
    /// A customer's orders on this shard, by order id after `after`.
    CustomerOrders {
        /// Customer.
        customer: String,
        /// Exclusive start.
        after: Option<String>,
        /// At most this many.
        limit: u32,
    },
    /// Unpaid orders whose deadline is ≤ `now_ms` (for the expiry sweeper).
    DueDeadlines {
        /// Leader's clock.
        now_ms: u64,
        /// At most this many.
        limit: u32,
    },
    /// Orders with a refund owed (for the refund sweeper).
    DueRefunds {
        /// At most this many.
        limit: u32,
    },
    /// Authorized payments whose capture is not recorded and that were
    /// authorized at or before `authorized_by_ms` (for the sweeper).
    DueCaptures {
        /// Leader's clock minus the grace a live payment flow gets.
        authorized_by_ms: u64,
        /// At most this many.
        limit: u32,
    },
    /// Aborted transactions' tombstones recorded before `before_ms`, oldest
    /// first (for the sweeper's pruner).
    AbortedBefore {
        /// Leader's clock minus the retention.
        before_ms: u64,
        /// At most this many.
        limit: u32,
    },
    /// Checkouts whose cart (on another shard) is still to be emptied and
    /// whose order was written at or before `placed_by_ms` (for the sweeper).
    DueCartClears {
        /// Leader's clock minus the grace a live checkout gets.
        placed_by_ms: u64,
        /// At most this many.
        limit: u32,
    },
    /// A 2PC transaction's state on its anchor (with the order if committed).
    Txn {
        /// Order id.
        order_id: String,
    },
    /// 2PC records in flight on this shard: pending transaction records
    /// (anchor), owed settlements (anchor), held reservations (participant).
    InFlight {
        /// At most this many of each.
        limit: u32,
    },
}

/// Result of a [`CommerceRead`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommerceReadResult {
    /// `Product`.
    Product(Option<Stored<Product>>),
    /// `Products`: in SKU order; `more` if the limit cut the list.
    Products(Vec<Stored<Product>>, bool),
    /// `Stock` (a product with no stock record has level 0, version 0).
    Stock(Option<Stored<InventoryLevel>>),
    /// `Cart` (an empty cart has version 0).
    Cart(Stored<Cart>),
    /// `Order`.
    Order(Option<Box<OrderView>>),
    /// `CustomerOrders`: in order-id order; `more` if the limit cut the list.
    Orders(Vec<OrderView>, bool),
    /// `DueDeadlines` / `DueRefunds`.
    OrderIds(Vec<String>),
    /// `Txn`: `None` if there is neither a record nor an order.
    Txn(Option<Box<TxnView>>),
    /// `InFlight`.
    InFlight(Box<txn::InFlight>),
    /// `DueCaptures`: order id and what its capture needs, by order id.
    CapturesOwed(Vec<(String, CaptureOwed)>),
    /// `DueCartClears`: order id and the cart to empty, by order id.
    CartClearsOwed(Vec<(String, CartClearOwed)>),
    /// `AbortedBefore`.
    AbortedTombstones(Vec<AbortedTombstone>),
}

fn read_one<T: DeserializeOwned>(
    r: &dyn RecordReader,
    key: &[u8],
) -> Result<Option<Stored<T>>, SmError> {
    match r.get(key)? {
        Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
        None => Ok(None),
    }
}

fn read_order(r: &dyn RecordReader, order_id: &str) -> Result<Option<OrderView>, SmError> {
    let Some(order) = read_one::<Order>(r, &keys::order_key(order_id))? else {
        return Ok(None);
    };
    let payment = read_one::<Payment>(r, &keys::payment_key(order_id))?
        .map(|s| s.record)
        .unwrap_or_default();
    Ok(Some(OrderView { order, payment }))
}

/// Serves `op` from one shard's records.
pub fn read(r: &dyn RecordReader, op: &CommerceRead) -> Result<CommerceReadResult, SmError> {
    Ok(match op {
        CommerceRead::Product { sku } => {
            CommerceReadResult::Product(read_one(r, &keys::product_key(sku))?)
        }
        CommerceRead::Products { after, limit } => {
            let prefix = keys::product_prefix();
            let after_key = after.as_deref().map(keys::product_key);
            let limit = *limit as usize;
            let rows = r.scan(&prefix, after_key.as_deref(), limit.saturating_add(1))?;
            let more = rows.len() > limit;
            let products = rows
                .iter()
                .take(limit)
                .map(|(_, v)| codec::decode(v))
                .collect::<Result<Vec<_>, _>>()?;
            CommerceReadResult::Products(products, more)
        }
        CommerceRead::Stock { sku } => {
            if r.get(&keys::product_key(sku))?.is_none() {
                CommerceReadResult::Stock(None)
            } else {
                CommerceReadResult::Stock(Some(read_one(r, &keys::inventory_key(sku))?.unwrap_or(
                    Stored {
                        version: 0,
                        record: InventoryLevel::default(),
                    },
                )))
            }
        }
        CommerceRead::Cart { customer } => {
            CommerceReadResult::Cart(read_one(r, &keys::cart_key(customer))?.unwrap_or(Stored {
                version: 0,
                record: Cart::default(),
            }))
        }
        CommerceRead::Order { order_id } => {
            CommerceReadResult::Order(read_order(r, order_id)?.map(Box::new))
        }
        CommerceRead::CustomerOrders {
            customer,
            after,
            limit,
        } => {
            let prefix = keys::customer_order_prefix(customer);
            let after_key = after
                .as_deref()
                .map(|id| keys::customer_order_key(customer, id));
            let limit = *limit as usize;
            let rows = r.scan(&prefix, after_key.as_deref(), limit.saturating_add(1))?;
            let more = rows.len() > limit;
            let mut orders = Vec::new();
            for (k, _) in rows.iter().take(limit) {
                if let Some(id) = keys::order_id_after(&prefix, k)
                    && let Some(view) = read_order(r, id)?
                {
                    orders.push(view);
                }
            }
            CommerceReadResult::Orders(orders, more)
        }
        CommerceRead::DueDeadlines { now_ms, limit } => {
            CommerceReadResult::OrderIds(due_deadlines(r, *now_ms, *limit as usize)?)
        }
        CommerceRead::Txn { order_id } => CommerceReadResult::Txn(txn::read_view(r, order_id)?),
        CommerceRead::AbortedBefore { before_ms, limit } => CommerceReadResult::AbortedTombstones(
            txn::read_aborted_before(r, *before_ms, *limit as usize)?,
        ),
        CommerceRead::InFlight { limit } => {
            CommerceReadResult::InFlight(Box::new(txn::read_in_flight(r, *limit as usize)?))
        }
        CommerceRead::DueCaptures {
            authorized_by_ms,
            limit,
        } => CommerceReadResult::CapturesOwed(due_owed(
            r,
            &keys::capture_owed_prefix(),
            keys::order_id_of_capture_owed,
            |o: &CaptureOwed| o.since_ms <= *authorized_by_ms,
            *limit as usize,
        )?),
        CommerceRead::DueCartClears {
            placed_by_ms,
            limit,
        } => CommerceReadResult::CartClearsOwed(due_owed(
            r,
            &keys::cart_clear_owed_prefix(),
            keys::order_id_of_cart_clear_owed,
            |o: &CartClearOwed| o.since_ms <= *placed_by_ms,
            *limit as usize,
        )?),
        CommerceRead::DueRefunds { limit } => {
            let rows = r.scan(&keys::refund_due_prefix(), None, *limit as usize)?;
            CommerceReadResult::OrderIds(
                rows.iter()
                    .filter_map(|(k, _)| keys::order_id_of_refund_due(k))
                    .map(str::to_string)
                    .collect(),
            )
        }
    })
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::domain::catalog::product;
    use crate::storage::keys::AbortedRecord;

    type Mem = crate::sm::MemState;

    /// A shard with products A (10 in stock, 2.50 EUR) and B (3, 1.00 EUR).
    fn shop() -> (Mem, u64) {
        let mut m = Mem::default();
        let mut i = 0;
        for (sku, price, stock) in [("A", 250, 10), ("B", 100, 3)] {
            i += 1;
            apply(
                &mut m,
                i,
                &CommerceCommand::PutProduct(product(sku, price, "EUR")),
            )
            .unwrap();
            i += 1;
            let set = CommerceCommand::SetStock {
                sku: sku.into(),
                on_hand: stock,
            };
            assert!(matches!(
                apply(&mut m, i, &set).unwrap(),
                CommerceResponse::Stock(_)
            ));
        }
        (m, i + 1)
    }

    fn place(id: &str, lines: &[(&str, u32)]) -> CommerceCommand {
        CommerceCommand::PlaceOrder {
            order_id: id.into(),
            customer: "c1".into(),
            lines: lines.iter().map(|(s, q)| (s.to_string(), *q)).collect(),
            now_ms: 1_000,
            expires_at_ms: 5_000,
            checkout_cart_version: None,
            clear_cart: false,
        }
    }

    fn level(m: &Mem, sku: &str) -> InventoryLevel {
        match read(m, &CommerceRead::Stock { sku: sku.into() }).unwrap() {
            CommerceReadResult::Stock(Some(s)) => s.record,
            other => panic!("{other:?}"),
        }
    }

    fn rejected(r: CommerceResponse) -> RejectCode {
        match r {
            CommerceResponse::Rejected(r) => r.code,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    fn order(r: CommerceResponse) -> OrderView {
        match r {
            CommerceResponse::Order(v) => *v,
            other => panic!("expected an order, got {other:?}"),
        }
    }

    #[test]
    fn placing_reserves_stock_once_and_a_rejected_order_writes_nothing() {
        let (mut m, i) = shop();
        let v = order(apply(&mut m, i, &place("o1", &[("A", 2), ("B", 1)])).unwrap());
        assert_eq!(v.order.record.total_minor, 600);
        assert_eq!(level(&m, "A").reserved, 2);
        // The same id again: the first result, no second reservation.
        let again = order(apply(&mut m, i + 1, &place("o1", &[("A", 2), ("B", 1)])).unwrap());
        assert_eq!(again.order.version, i);
        assert_eq!(level(&m, "A").reserved, 2);
        assert_eq!(
            rejected(apply(&mut m, i + 2, &place("o1", &[("A", 1)])).unwrap()),
            RejectCode::OrderIdReused
        );
        // One line out of stock: nothing of the order is written.
        let before = m.clone();
        assert_eq!(
            rejected(apply(&mut m, i + 3, &place("o2", &[("A", 1), ("B", 3)])).unwrap()),
            RejectCode::OutOfStock
        );
        assert_eq!(
            rejected(apply(&mut m, i + 4, &place("o3", &[("A", 1), ("Z", 1)])).unwrap()),
            RejectCode::UnknownSku
        );
        assert_eq!(m, before);
    }

    #[test]
    fn an_authorization_is_a_capture_owed_until_its_capture_is_recorded() {
        let (mut m, i) = shop();
        order(apply(&mut m, i, &place("o1", &[("A", 2)])).unwrap());
        order(apply(&mut m, i + 1, &place("o2", &[("A", 1)])).unwrap());
        let record = |id: &str, attempt: u32, outcome: PaymentOutcome, now_ms| {
            CommerceCommand::RecordPayment {
                order_id: id.into(),
                attempt_key: format!("{id}:{attempt}"),
                outcome,
                now_ms,
            }
        };
        let authorized = |total| PaymentOutcome::Authorized {
            auth_ref: "auth".into(),
            amount_minor: total,
            card_last4: "4242".into(),
        };
        let captured = |total| PaymentOutcome::Captured {
            provider_ref: "cap".into(),
            amount_minor: total,
            card_last4: "4242".into(),
        };
        let due = |m: &Mem, by| {
            read(
                m,
                &CommerceRead::DueCaptures {
                    authorized_by_ms: by,
                    limit: 10,
                },
            )
            .unwrap()
        };
        // Neither another amount nor an attempt that is not the current one
        // is recorded.
        assert_eq!(
            rejected(apply(&mut m, i + 2, &record("o1", 1, authorized(499), 1_000)).unwrap()),
            RejectCode::Inconsistent
        );
        assert_eq!(
            rejected(apply(&mut m, i + 2, &record("o1", 2, authorized(500), 1_000)).unwrap()),
            RejectCode::Inconsistent
        );
        assert_eq!(due(&m, u64::MAX), CommerceReadResult::CapturesOwed(vec![]));
        // Recorded (twice: the first time stands), still unpaid, and owed
        // once it is older than the sweeper's grace.
        let v = order(apply(&mut m, i + 3, &record("o1", 1, authorized(500), 1_000)).unwrap());
        assert_eq!(v.order.record.status, OrderStatus::PendingPayment);
        order(apply(&mut m, i + 4, &record("o1", 1, authorized(500), 1_500)).unwrap());
        assert_eq!(due(&m, 999), CommerceReadResult::CapturesOwed(vec![]));
        let owed = CaptureOwed {
            attempt_key: "o1:1".into(),
            auth_ref: "auth".into(),
            amount_minor: 500,
            card_last4: "4242".into(),
            since_ms: 1_000,
        };
        assert_eq!(
            due(&m, 1_000),
            CommerceReadResult::CapturesOwed(vec![("o1".into(), owed)])
        );
        // The capture's record pays the order and settles what was owed; an
        // authorization replayed after it changes nothing.
        let paid = order(apply(&mut m, i + 5, &record("o1", 1, captured(500), 2_000)).unwrap());
        assert_eq!(paid.order.record.status, OrderStatus::Paid);
        assert_eq!(due(&m, u64::MAX), CommerceReadResult::CapturesOwed(vec![]));
        order(apply(&mut m, i + 6, &record("o1", 1, authorized(500), 2_500)).unwrap());
        assert_eq!(due(&m, u64::MAX), CommerceReadResult::CapturesOwed(vec![]));
        // An order cancelled after its authorization was recorded: the
        // capture is still owed (it may have happened), and its record is
        // owed back as a refund.
        order(apply(&mut m, i + 7, &record("o2", 1, authorized(250), 3_000)).unwrap());
        let cancel = CommerceCommand::Transition {
            order_id: "o2".into(),
            event: OrderEvent::Cancel,
            now_ms: 3_100,
        };
        order(apply(&mut m, i + 8, &cancel).unwrap());
        assert!(matches!(
            due(&m, 3_000),
            CommerceReadResult::CapturesOwed(v) if v.len() == 1
        ));
        assert_eq!(
            rejected(apply(&mut m, i + 9, &record("o2", 1, captured(250), 3_200)).unwrap()),
            RejectCode::IllegalTransition
        );
        assert_eq!(due(&m, u64::MAX), CommerceReadResult::CapturesOwed(vec![]));
        assert_eq!(
            read(&m, &CommerceRead::DueRefunds { limit: 10 }).unwrap(),
            CommerceReadResult::OrderIds(vec!["o2".into()])
        );
        // A cancelled order records no new authorization: nothing to capture.
        assert_eq!(
            rejected(apply(&mut m, i + 10, &record("o2", 1, authorized(250), 3_300)).unwrap()),
            RejectCode::IllegalTransition
        );
        assert_eq!(due(&m, u64::MAX), CommerceReadResult::CapturesOwed(vec![]));
    }

    #[test]
    fn a_replayed_capture_answers_with_the_order_only_while_it_is_paid() {
        let (mut m, i) = shop();
        order(apply(&mut m, i, &place("o1", &[("A", 2)])).unwrap());
        let captured = CommerceCommand::RecordPayment {
            order_id: "o1".into(),
            attempt_key: "o1:1".into(),
            outcome: PaymentOutcome::Captured {
                provider_ref: "cap".into(),
                amount_minor: 500,
                card_last4: "4242".into(),
            },
            now_ms: 2_000,
        };
        let paid = order(apply(&mut m, i + 1, &captured).unwrap());
        assert_eq!(paid.order.record.status, OrderStatus::Paid);
        // A second Pay that charged under the same key (a retry, or a
        // concurrent Pay of the same attempt) gets the paid order back.
        let again = order(apply(&mut m, i + 2, &captured).unwrap());
        assert_eq!(again, paid);
        // Once the order is cancelled, the same record answers what Pay
        // answers a cancelled order, and owes nothing more back.
        let cancel = CommerceCommand::Transition {
            order_id: "o1".into(),
            event: OrderEvent::Cancel,
            now_ms: 2_100,
        };
        let cancelled = order(apply(&mut m, i + 3, &cancel).unwrap());
        assert_eq!(cancelled.order.record.status, OrderStatus::Cancelled);
        assert_eq!(cancelled.payment.refund_due_minor, 500);
        let before = m.clone();
        assert_eq!(
            rejected(apply(&mut m, i + 4, &captured).unwrap()),
            RejectCode::IllegalTransition
        );
        assert_eq!(m, before);
    }

    #[test]
    fn an_authorized_order_does_not_expire_while_its_capture_is_owed() {
        let (mut m, i) = shop();
        let placed = order(apply(&mut m, i, &place("o1", &[("A", 2)])).unwrap());
        let deadline = placed.order.record.expires_at_ms;
        // Authorized just before the deadline.
        let authorized = CommerceCommand::RecordPayment {
            order_id: "o1".into(),
            attempt_key: "o1:1".into(),
            outcome: PaymentOutcome::Authorized {
                auth_ref: "auth".into(),
                amount_minor: 500,
                card_last4: "4242".into(),
            },
            now_ms: deadline - 1,
        };
        order(apply(&mut m, i + 1, &authorized).unwrap());
        let due = |m: &Mem, now| {
            read(
                m,
                &CommerceRead::DueDeadlines {
                    now_ms: now,
                    limit: 10,
                },
            )
            .unwrap()
        };
        let expire = |now| CommerceCommand::ExpireOrders {
            order_ids: vec!["o1".into()],
            now_ms: now,
        };
        let held_until = deadline - 1 + CAPTURE_OWED_HOLDS_EXPIRY_MS;
        assert_eq!(due(&m, deadline), CommerceReadResult::OrderIds(vec![]));
        assert_eq!(
            apply(&mut m, i + 2, &expire(held_until - 1)).unwrap(),
            CommerceResponse::Expired { orders: 0 }
        );
        assert_eq!(level(&m, "A").reserved, 2);
        // A capture that never gets recorded does not hold it for ever.
        assert_eq!(
            due(&m, held_until),
            CommerceReadResult::OrderIds(vec!["o1".into()])
        );
        assert_eq!(
            apply(&mut m, i + 3, &expire(held_until)).unwrap(),
            CommerceResponse::Expired { orders: 1 }
        );
        assert_eq!(level(&m, "A").reserved, 0);
    }

    #[test]
    fn a_checkout_with_its_cart_elsewhere_owes_the_clear_until_the_sweeper_is_done() {
        let (mut m, i) = shop();
        let checkout = |id: &str, clear_cart| CommerceCommand::PlaceOrder {
            order_id: id.into(),
            customer: "c1".into(),
            lines: vec![("A".into(), 1)],
            now_ms: 1_000,
            expires_at_ms: 5_000,
            checkout_cart_version: Some(42),
            clear_cart,
        };
        let due = |m: &Mem, placed_by_ms| {
            read(
                m,
                &CommerceRead::DueCartClears {
                    placed_by_ms,
                    limit: 10,
                },
            )
            .unwrap()
        };
        // The cart elsewhere: the order keeps its version and owes the clear.
        let placed = order(apply(&mut m, i, &checkout("o1", false)).unwrap());
        assert_eq!(placed.order.record.checkout_cart_version, Some(42));
        // Not before the grace (the checkout clears it itself meanwhile).
        assert_eq!(due(&m, 999), CommerceReadResult::CartClearsOwed(vec![]));
        let owed = CartClearOwed {
            customer: "c1".into(),
            cart_version: 42,
            since_ms: 1_000,
        };
        assert_eq!(
            due(&m, 1_000),
            CommerceReadResult::CartClearsOwed(vec![("o1".into(), owed)])
        );
        // Done: the entry goes.
        let done = CommerceCommand::CartClearsDone {
            order_ids: vec!["o1".into()],
        };
        apply(&mut m, i + 1, &done).unwrap();
        assert_eq!(
            due(&m, u64::MAX),
            CommerceReadResult::CartClearsOwed(vec![])
        );
        // A cart on the order's shard is checked and emptied in the same
        // apply (here it is not at version 42: refused), and owes nothing.
        assert_eq!(
            rejected(apply(&mut m, i + 2, &checkout("o2", true)).unwrap()),
            RejectCode::CartChanged
        );
        assert_eq!(
            due(&m, u64::MAX),
            CommerceReadResult::CartClearsOwed(vec![])
        );
    }

    #[test]
    fn orders_held_off_by_a_capture_owed_do_not_hide_later_due_ones() {
        let (mut m, i) = shop();
        for (n, id) in ["o1", "o2", "o3"].into_iter().enumerate() {
            order(apply(&mut m, i + n as u64, &place(id, &[("A", 1)])).unwrap());
        }
        // o1 and o2 (first in deadline order) are authorized just before
        // their deadline: held off. o3 is not.
        for (n, id) in ["o1", "o2"].into_iter().enumerate() {
            let authorized = CommerceCommand::RecordPayment {
                order_id: id.into(),
                attempt_key: format!("{id}:1"),
                outcome: PaymentOutcome::Authorized {
                    auth_ref: "auth".into(),
                    amount_minor: 250,
                    card_last4: "4242".into(),
                },
                now_ms: 4_999,
            };
            order(apply(&mut m, i + 3 + n as u64, &authorized).unwrap());
        }
        // A window as small as the held orders still finds o3.
        let due = read(
            &m,
            &CommerceRead::DueDeadlines {
                now_ms: 5_000,
                limit: 2,
            },
        )
        .unwrap();
        assert_eq!(due, CommerceReadResult::OrderIds(vec!["o3".into()]));
    }

    #[test]
    fn ship_consumes_cancel_releases_and_expiry_respects_the_deadline() {
        let (mut m, i) = shop();
        order(apply(&mut m, i, &place("o1", &[("A", 2)])).unwrap());
        order(apply(&mut m, i + 1, &place("o2", &[("A", 3)])).unwrap());
        order(apply(&mut m, i + 2, &place("o3", &[("A", 1)])).unwrap());
        assert_eq!(level(&m, "A").reserved, 6);
        let pay = |id: &str, total| CommerceCommand::RecordPayment {
            order_id: id.into(),
            attempt_key: format!("{id}:1"),
            outcome: PaymentOutcome::Captured {
                provider_ref: "ref".into(),
                amount_minor: total,
                card_last4: "4242".into(),
            },
            now_ms: 2_000,
        };
        let paid = order(apply(&mut m, i + 3, &pay("o1", 500)).unwrap());
        assert_eq!(paid.order.record.status, OrderStatus::Paid);
        // A replayed capture with the same key changes nothing.
        assert_eq!(
            order(apply(&mut m, i + 4, &pay("o1", 500)).unwrap()).payment,
            paid.payment
        );
        let ship = CommerceCommand::Transition {
            order_id: "o1".into(),
            event: OrderEvent::Ship,
            now_ms: 3_000,
        };
        order(apply(&mut m, i + 5, &ship).unwrap());
        assert_eq!(
            level(&m, "A"),
            InventoryLevel {
                on_hand: 8,
                reserved: 4
            }
        );
        assert_eq!(
            rejected(apply(&mut m, i + 6, &ship).unwrap()),
            RejectCode::IllegalTransition
        );
        let cancel = CommerceCommand::Transition {
            order_id: "o2".into(),
            event: OrderEvent::Cancel,
            now_ms: 3_000,
        };
        order(apply(&mut m, i + 7, &cancel).unwrap());
        assert_eq!(
            level(&m, "A"),
            InventoryLevel {
                on_hand: 8,
                reserved: 1
            }
        );
        // Their reservations stay as tombstones: a prepare under either id
        // (a cross-shard Place reusing it) votes no and holds nothing.
        for id in ["o1", "o2"] {
            let prepare = CommerceCommand::PrepareTxn {
                order_id: id.into(),
                lines: vec![("A".into(), 1)],
                now_ms: 3_000,
                begin: None,
            };
            assert_eq!(
                rejected(apply(&mut m, i + 7, &prepare).unwrap()),
                RejectCode::OrderAborted
            );
        }
        assert_eq!(level(&m, "A").reserved, 1);
        // Before its deadline o3 stays; at the deadline it expires, once.
        let due = |now| {
            read(
                &m,
                &CommerceRead::DueDeadlines {
                    now_ms: now,
                    limit: 10,
                },
            )
            .unwrap()
        };
        assert_eq!(due(4_999), CommerceReadResult::OrderIds(vec![]));
        assert_eq!(due(5_000), CommerceReadResult::OrderIds(vec!["o3".into()]));
        let expire = |now| CommerceCommand::ExpireOrders {
            order_ids: vec!["o3".into(), "o1".into()],
            now_ms: now,
        };
        assert_eq!(
            apply(&mut m, i + 8, &expire(4_999)).unwrap(),
            CommerceResponse::Expired { orders: 0 }
        );
        assert_eq!(
            apply(&mut m, i + 9, &expire(5_000)).unwrap(),
            CommerceResponse::Expired { orders: 1 }
        );
        assert_eq!(
            apply(&mut m, i + 10, &expire(6_000)).unwrap(),
            CommerceResponse::Expired { orders: 0 }
        );
        assert_eq!(
            level(&m, "A"),
            InventoryLevel {
                on_hand: 8,
                reserved: 0
            }
        );
        // A capture arriving after expiry is owed back, and the sweeper finds it.
        assert_eq!(
            rejected(apply(&mut m, i + 11, &pay("o3", 250)).unwrap()),
            RejectCode::IllegalTransition
        );
        assert_eq!(
            read(&m, &CommerceRead::DueRefunds { limit: 10 }).unwrap(),
            CommerceReadResult::OrderIds(vec!["o3".into()])
        );
        let refund = CommerceCommand::RecordRefund {
            order_id: "o3".into(),
            amount_minor: 250,
        };
        let v = order(apply(&mut m, i + 12, &refund).unwrap());
        assert_eq!(
            (v.payment.refunded_minor, v.payment.refund_due_minor),
            (250, 0)
        );
        assert_eq!(
            rejected(apply(&mut m, i + 13, &refund).unwrap()),
            RejectCode::Inconsistent,
            "a refund is recorded once"
        );
        assert_eq!(
            read(&m, &CommerceRead::DueRefunds { limit: 10 }).unwrap(),
            CommerceReadResult::OrderIds(vec![])
        );
    }

    fn txn(r: CommerceResponse) -> TxnView {
        match r {
            CommerceResponse::Txn(v) => *v,
            other => panic!("expected a txn view, got {other:?}"),
        }
    }

    #[test]
    fn a_single_shard_place_refuses_an_id_a_transaction_used_here() {
        let (mut m, i) = shop();
        // A prepare held A under "h1" (its transaction's begin is elsewhere
        // or lost): placing "h1" here must not replace that reservation,
        // whose units recovery releases through the anchor.
        let prepare = CommerceCommand::PrepareTxn {
            order_id: "h1".into(),
            lines: vec![("A".into(), 2)],
            now_ms: 1_000,
            begin: None,
        };
        assert!(matches!(
            apply(&mut m, i, &prepare).unwrap(),
            CommerceResponse::Prepared(_)
        ));
        assert_eq!(
            rejected(apply(&mut m, i + 1, &place("h1", &[("A", 1)])).unwrap()),
            RejectCode::OrderIdReused
        );
        assert_eq!(level(&m, "A").reserved, 2);
        // An aborted transaction anchored here (its release still owed to the
        // participants): its id is not free for a single-shard order either,
        // or that release would free the new order's stock.
        let begin = CommerceCommand::BeginTxn {
            order_id: "t9".into(),
            customer: "c1".into(),
            lines: vec![("A".into(), 1), ("Z".into(), 1)],
            now_ms: 1_000,
            deadline_ms: 2_000,
        };
        txn(apply(&mut m, i + 2, &begin).unwrap());
        let abort = CommerceCommand::AbortTxn {
            order_id: "t9".into(),
            now_ms: 2_000,
        };
        assert_eq!(
            txn(apply(&mut m, i + 3, &abort).unwrap()).status,
            TxnStatus::Aborted
        );
        assert_eq!(
            rejected(apply(&mut m, i + 4, &place("t9", &[("B", 1)])).unwrap()),
            RejectCode::OrderIdReused
        );
        assert_eq!(level(&m, "B").reserved, 0);
        // A fresh id still places.
        order(apply(&mut m, i + 5, &place("n1", &[("B", 1)])).unwrap());
    }

    #[test]
    fn two_phase_records_are_idempotent_and_an_abort_leaves_a_tombstone() {
        let (mut m, i) = shop();
        let lines = vec![("A".to_string(), 2), ("B".to_string(), 1)];
        let begin = CommerceCommand::BeginTxn {
            order_id: "t1".into(),
            customer: "c1".into(),
            lines: lines.clone(),
            now_ms: 1_000,
            deadline_ms: 2_000,
        };
        assert_eq!(
            txn(apply(&mut m, i, &begin).unwrap()).status,
            TxnStatus::Pending
        );
        assert_eq!(
            txn(apply(&mut m, i + 1, &begin).unwrap()).status,
            TxnStatus::Pending
        );
        let prepare = CommerceCommand::PrepareTxn {
            order_id: "t1".into(),
            lines: lines.clone(),
            now_ms: 1_000,
            begin: None,
        };
        assert!(
            matches!(apply(&mut m, i + 2, &prepare).unwrap(), CommerceResponse::Prepared(p) if p.len() == 2)
        );
        // A retried prepare holds nothing more.
        assert!(matches!(
            apply(&mut m, i + 3, &prepare).unwrap(),
            CommerceResponse::Prepared(_)
        ));
        assert_eq!(level(&m, "A").reserved, 2);
        // Recovery may not abort before the deadline; at it, it does, once.
        let abort = |now| CommerceCommand::AbortTxn {
            order_id: "t1".into(),
            now_ms: now,
        };
        assert_eq!(
            txn(apply(&mut m, i + 4, &abort(1_999)).unwrap()).status,
            TxnStatus::Pending
        );
        assert_eq!(
            txn(apply(&mut m, i + 5, &abort(2_000)).unwrap()).status,
            TxnStatus::Aborted
        );
        // The commit point is a compare-and-set: too late now.
        assert_eq!(
            txn(apply(&mut m, i + 6, &commit_nothing("t1", 2_001)).unwrap()).status,
            TxnStatus::Aborted
        );
        assert!(load_order(&mut m, "t1").unwrap().is_none());
        let release = resolve_one("t1", Settlement::Abort, 2_002);
        apply(&mut m, i + 7, &release).unwrap();
        let after = m.clone();
        apply(&mut m, i + 8, &release).unwrap();
        assert_eq!(m, after, "a resolve is applied once");
        assert_eq!(
            level(&m, "A"),
            InventoryLevel {
                on_hand: 10,
                reserved: 0
            }
        );
        assert_eq!(
            rejected(apply(&mut m, i + 9, &prepare).unwrap()),
            RejectCode::OrderAborted,
            "a late prepare finds the tombstone"
        );
    }

    /// A commit decision of `order_id` (no lines: only its outcome matters).
    fn commit_nothing(order_id: &str, now_ms: u64) -> CommerceCommand {
        CommerceCommand::DecideTxn {
            order_id: order_id.into(),
            decision: Decision::Commit {
                lines: vec![],
                currency: crate::domain::money::Currency::parse("EUR").unwrap(),
                total_minor: 0,
                expires_at_ms: now_ms + 60_000,
                checkout_cart_version: None,
            },
            now_ms,
        }
    }

    fn aborted_before(m: &Mem, before_ms: u64) -> Vec<AbortedTombstone> {
        match read(
            m,
            &CommerceRead::AbortedBefore {
                before_ms,
                limit: 10,
            },
        )
        .unwrap()
        {
            CommerceReadResult::AbortedTombstones(t) => t,
            other => panic!("{other:?}"),
        }
    }

    fn prune(tombstones: Vec<AbortedTombstone>, now_ms: u64) -> CommerceCommand {
        CommerceCommand::PruneAborted {
            tombstones,
            before_ms: now_ms,
            now_ms,
        }
    }

    fn pruned(r: CommerceResponse) -> u32 {
        match r {
            CommerceResponse::Pruned { records } => records,
            other => panic!("expected Pruned, got {other:?}"),
        }
    }

    /// The anchor's `PrepareTxn` carrying its begin (customer c1).
    fn fused_prepare(
        order_id: &str,
        lines: &[(String, u32)],
        now_ms: u64,
        deadline_ms: u64,
    ) -> CommerceCommand {
        CommerceCommand::PrepareTxn {
            order_id: order_id.into(),
            lines: lines.to_vec(),
            now_ms,
            begin: Some(TxnBegin {
                customer: "c1".into(),
                lines: lines.to_vec(),
                deadline_ms,
            }),
        }
    }

    fn resolve_one(order_id: &str, outcome: Settlement, now_ms: u64) -> CommerceCommand {
        CommerceCommand::ResolveTxn {
            items: vec![ResolveItem {
                order_id: order_id.into(),
                outcome,
            }],
            now_ms,
        }
    }

    #[test]
    fn an_aborted_transactions_tombstones_are_pruned_once_settled_and_a_committed_orders_stay() {
        let (mut m, i) = shop();
        let lines = vec![("A".to_string(), 2), ("B".to_string(), 1)];
        let prepare = fused_prepare("t1", &lines, 1_000, 2_000);
        assert!(matches!(
            apply(&mut m, i, &prepare).unwrap(),
            CommerceResponse::Prepared(_)
        ));
        let abort = CommerceCommand::DecideTxn {
            order_id: "t1".into(),
            decision: Decision::Abort(Rejection::new(RejectCode::OutOfStock, "no")),
            now_ms: 1_500,
        };
        assert_eq!(
            txn(apply(&mut m, i + 1, &abort).unwrap()).status,
            TxnStatus::Aborted
        );
        apply(&mut m, i + 2, &resolve_one("t1", Settlement::Abort, 1_600)).unwrap();
        assert_eq!(level(&m, "A").reserved, 0);
        // Indexed oldest first, each when its abort was recorded here.
        let t = |aborted_ms, record| AbortedTombstone {
            aborted_ms,
            record,
            order_id: "t1".into(),
        };
        assert_eq!(
            aborted_before(&m, 1_550),
            vec![t(1_500, AbortedRecord::Txn)]
        );
        let both = aborted_before(&m, 10_000);
        assert_eq!(
            both,
            vec![
                t(1_500, AbortedRecord::Txn),
                t(1_600, AbortedRecord::Reservation)
            ]
        );
        // Nothing younger than before_ms goes, whatever a proposer names.
        let early = m.clone();
        assert_eq!(
            pruned(apply(&mut m, i + 3, &prune(both.clone(), 1_500)).unwrap()),
            0
        );
        assert_eq!(m, early);
        // The record stays while its release is owed (indexed again, from
        // now); the settled reservation goes.
        assert_eq!(
            pruned(apply(&mut m, i + 4, &prune(both.clone(), 10_000)).unwrap()),
            1
        );
        assert!(
            load::<Reservation>(&mut m, &keys::reservation_key("t1"))
                .unwrap()
                .is_none()
        );
        assert_eq!(
            txn(apply(
                &mut m,
                i + 5,
                &CommerceCommand::BeginTxn {
                    order_id: "t1".into(),
                    customer: "c1".into(),
                    lines: lines.clone(),
                    now_ms: 10_001,
                    deadline_ms: 20_000,
                }
            )
            .unwrap())
            .status,
            TxnStatus::Aborted,
            "a retry still finds the abort"
        );
        assert_eq!(
            aborted_before(&m, 30_000),
            vec![t(10_000, AbortedRecord::Txn)]
        );
        apply(
            &mut m,
            i + 6,
            &CommerceCommand::SettlementDone {
                items: vec![("t1".into(), Settlement::Abort)],
            },
        )
        .unwrap();
        let again = aborted_before(&m, 30_000);
        assert_eq!(
            pruned(apply(&mut m, i + 7, &prune(again.clone(), 30_000)).unwrap()),
            1
        );
        assert!(
            matches!(
                read(
                    &m,
                    &CommerceRead::Txn {
                        order_id: "t1".into()
                    }
                )
                .unwrap(),
                CommerceReadResult::Txn(None)
            ),
            "the aborted order is forgotten"
        );
        assert!(aborted_before(&m, u64::MAX).is_empty());
        let after = m.clone();
        assert_eq!(
            pruned(apply(&mut m, i + 8, &prune(again, 30_000)).unwrap()),
            0
        );
        assert_eq!(m, after, "a replayed prune changes nothing");
        // A commit decision that was on its way meanwhile finds the abort
        // (written again), not a record to commit.
        assert_eq!(
            txn(apply(&mut m, i + 8, &commit_nothing("t1", 30_001)).unwrap()).status,
            TxnStatus::Aborted
        );
        assert!(load_order(&mut m, "t1").unwrap().is_none());

        // A prepare of the old attempt arriving now holds stock, and
        // recovery still releases it: the anchor, finding neither record
        // nor order, aborts again (and that tombstone is indexed too).
        let late = CommerceCommand::PrepareTxn {
            order_id: "t1".into(),
            lines: lines.clone(),
            now_ms: 30_001,
            begin: None,
        };
        assert!(matches!(
            apply(&mut m, i + 9, &late).unwrap(),
            CommerceResponse::Prepared(_)
        ));
        let recover = CommerceCommand::AbortTxn {
            order_id: "t1".into(),
            now_ms: 60_000,
        };
        assert_eq!(
            txn(apply(&mut m, i + 10, &recover).unwrap()).status,
            TxnStatus::Aborted
        );
        apply(
            &mut m,
            i + 11,
            &resolve_one("t1", Settlement::Abort, 60_000),
        )
        .unwrap();
        assert_eq!(level(&m, "A").reserved, 0);
        assert_eq!(aborted_before(&m, u64::MAX).len(), 2);

        // A committed order's tombstone (released by its cancel) is never
        // indexed, and a prune naming it anyway leaves it.
        let placed = order(apply(&mut m, i + 12, &place("o1", &[("A", 1)])).unwrap());
        let cancel = CommerceCommand::Transition {
            order_id: "o1".into(),
            event: OrderEvent::Cancel,
            now_ms: 70_000,
        };
        order(apply(&mut m, i + 13, &cancel).unwrap());
        assert_eq!(placed.order.record.order_id, "o1");
        assert!(
            aborted_before(&m, u64::MAX)
                .iter()
                .all(|t| t.order_id == "t1")
        );
        let forged = vec![AbortedTombstone {
            aborted_ms: 1,
            record: AbortedRecord::Reservation,
            order_id: "o1".into(),
        }];
        assert_eq!(
            pruned(apply(&mut m, i + 14, &prune(forged, u64::MAX)).unwrap()),
            0
        );
        assert!(
            load::<Reservation>(&mut m, &keys::reservation_key("o1"))
                .unwrap()
                .is_some_and(|r| !r.record.is_live())
        );
        // An abort's release that arrives before its prepare leaves an
        // indexed tombstone too.
        apply(
            &mut m,
            i + 15,
            &resolve_one("t9", Settlement::Abort, 80_000),
        )
        .unwrap();
        assert!(aborted_before(&m, u64::MAX).contains(&AbortedTombstone {
            aborted_ms: 80_000,
            record: AbortedRecord::Reservation,
            order_id: "t9".into(),
        }));
    }

    #[test]
    fn a_committed_two_phase_order_moves_stock_only_through_settlements() {
        let (mut m, i) = shop();
        let lines = vec![("A".to_string(), 3)];
        apply(
            &mut m,
            i,
            &CommerceCommand::BeginTxn {
                order_id: "t2".into(),
                customer: "c1".into(),
                lines: lines.clone(),
                now_ms: 1,
                deadline_ms: 100,
            },
        )
        .unwrap();
        apply(
            &mut m,
            i + 1,
            &CommerceCommand::PrepareTxn {
                order_id: "t2".into(),
                lines,
                now_ms: 1,
                begin: None,
            },
        )
        .unwrap();
        let products = vec![(product("A", 250, "EUR"), 3)];
        let (priced, currency, total_minor) = crate::domain::order::price_lines(&products).unwrap();
        let decide = CommerceCommand::DecideTxn {
            order_id: "t2".into(),
            decision: Decision::Commit {
                lines: priced,
                currency,
                total_minor,
                expires_at_ms: 50_000,
                checkout_cart_version: Some(77),
            },
            now_ms: 2,
        };
        let v = txn(apply(&mut m, i + 2, &decide).unwrap());
        assert_eq!(v.status, TxnStatus::Committed);
        let placed = v.order.unwrap().order.record;
        assert!(placed.two_phase);
        // The order is the record of the commit: the transaction record goes,
        // and every later step of this transaction reads the order.
        assert!(
            load::<txn::TxnRecord>(&mut m, &keys::txn_key("t2"))
                .unwrap()
                .is_none()
        );
        // A commit owes no settlement: the hold stays until the coordinator
        // settles it or the participant's recovery asks the anchor.
        match read(&m, &CommerceRead::InFlight { limit: 10 }).unwrap() {
            CommerceReadResult::InFlight(f) => {
                assert!(f.settlements.is_empty(), "{f:?}");
                assert!(f.pending.is_empty(), "{f:?}");
                assert_eq!(f.held.len(), 1, "{f:?}");
            }
            other => panic!("{other:?}"),
        }
        let after_commit = m.clone();
        let late_abort = CommerceCommand::DecideTxn {
            order_id: "t2".into(),
            decision: Decision::Abort(Rejection::new(RejectCode::OrderAborted, "late")),
            now_ms: 3,
        };
        let late_begin = CommerceCommand::BeginTxn {
            order_id: "t2".into(),
            customer: "c1".into(),
            lines: vec![("A".to_string(), 3)],
            now_ms: 3,
            deadline_ms: 100,
        };
        let recovery = CommerceCommand::AbortTxn {
            order_id: "t2".into(),
            now_ms: 1_000,
        };
        for (n, late) in [&decide, &late_abort, &late_begin, &recovery]
            .into_iter()
            .enumerate()
        {
            let v = txn(apply(&mut m, i + 3 + n as u64, late).unwrap());
            assert_eq!(v.status, TxnStatus::Committed, "{late}");
            assert_eq!(v.order.map(|o| o.order.record), Some(placed.clone()));
        }
        assert_eq!(m, after_commit, "late steps change nothing");
        match read(
            &m,
            &CommerceRead::Txn {
                order_id: "t2".into(),
            },
        )
        .unwrap()
        {
            CommerceReadResult::Txn(Some(v)) => assert_eq!(v.status, TxnStatus::Committed),
            other => panic!("{other:?}"),
        }
        // A retried checkout reads which cart version the order came from,
        // and the sweeper finds the clear owed.
        assert_eq!(placed.checkout_cart_version, Some(77));
        match read(
            &m,
            &CommerceRead::DueCartClears {
                placed_by_ms: u64::MAX,
                limit: 10,
            },
        )
        .unwrap()
        {
            CommerceReadResult::CartClearsOwed(due) => {
                assert_eq!(due.len(), 1);
                assert_eq!((due[0].0.as_str(), due[0].1.cart_version), ("t2", 77));
            }
            other => panic!("{other:?}"),
        }
        // Cancel on the anchor owes a release; stock moves only when resolved.
        let cancel = CommerceCommand::Transition {
            order_id: "t2".into(),
            event: OrderEvent::Cancel,
            now_ms: 3,
        };
        order(apply(&mut m, i + 3, &cancel).unwrap());
        assert_eq!(level(&m, "A").reserved, 3);
        match read(&m, &CommerceRead::InFlight { limit: 10 }).unwrap() {
            CommerceReadResult::InFlight(f) => {
                assert_eq!(f.settlements.len(), 1);
                assert_eq!(f.settlements[0].1.outcome, Settlement::Release);
                assert_eq!(f.held.len(), 1);
                assert!(f.pending.is_empty());
            }
            other => panic!("{other:?}"),
        }
        // The commit settlement arriving after the release changes nothing.
        for outcome in [Settlement::Release, Settlement::Commit] {
            apply(&mut m, i + 4, &resolve_one("t2", outcome, 3)).unwrap();
        }
        assert_eq!(level(&m, "A").reserved, 0);
        apply(
            &mut m,
            i + 5,
            &CommerceCommand::SettlementDone {
                items: vec![("t2".into(), Settlement::Commit)],
            },
        )
        .unwrap();
        match read(&m, &CommerceRead::InFlight { limit: 10 }).unwrap() {
            CommerceReadResult::InFlight(f) => {
                assert_eq!(
                    f.settlements.len(),
                    1,
                    "a stale done does not drop the newer release"
                );
                assert!(f.held.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    fn in_flight(m: &Mem) -> InFlight {
        match read(m, &CommerceRead::InFlight { limit: 10 }).unwrap() {
            CommerceReadResult::InFlight(f) => *f,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_hold_made_with_its_begin_has_no_held_entry_and_its_abort_still_releases_it() {
        let (mut m, i) = shop();
        let lines = vec![("A".to_string(), 2)];
        let fused = fused_prepare("t5", &lines, 1, 100);
        assert!(matches!(
            apply(&mut m, i, &fused).unwrap(),
            CommerceResponse::Prepared(_)
        ));
        assert_eq!(level(&m, "A").reserved, 2);
        let f = in_flight(&m);
        assert!(
            f.held.is_empty(),
            "the pending record answers for it: {f:?}"
        );
        assert_eq!(f.pending.len(), 1);
        // A participant's prepare without the begin is held for its recovery.
        let plain = CommerceCommand::PrepareTxn {
            order_id: "t6".into(),
            lines: vec![("B".to_string(), 1)],
            now_ms: 1,
            begin: None,
        };
        apply(&mut m, i + 1, &plain).unwrap();
        let held: Vec<String> = in_flight(&m).held.into_iter().map(|(id, _)| id).collect();
        assert_eq!(held, vec!["t6".to_string()]);
        // Recovery aborts the fused one at its deadline: its release is owed
        // for its SKUs, and settling it frees the stock.
        let abort = CommerceCommand::AbortTxn {
            order_id: "t5".into(),
            now_ms: 200,
        };
        assert_eq!(
            txn(apply(&mut m, i + 2, &abort).unwrap()).status,
            TxnStatus::Aborted
        );
        let owed = in_flight(&m).settlements;
        assert_eq!(owed.len(), 1);
        assert_eq!(owed[0].0, "t5");
        assert_eq!(owed[0].1.outcome, Settlement::Abort);
        assert_eq!(owed[0].1.skus, vec!["A".to_string()]);
        apply(&mut m, i + 3, &resolve_one("t5", Settlement::Abort, 201)).unwrap();
        assert_eq!(level(&m, "A").reserved, 0);
    }

    #[test]
    fn an_undecided_record_lives_in_w_and_moves_to_t_only_when_aborted() {
        let (mut m, i) = shop();
        let lines = vec![("A".to_string(), 1)];
        let begin = |id: &str| CommerceCommand::BeginTxn {
            order_id: id.into(),
            customer: "c1".into(),
            lines: lines.clone(),
            now_ms: 1,
            deadline_ms: 100,
        };
        let stored = |m: &mut Mem, key: Vec<u8>| {
            load::<txn::TxnRecord>(m, &key)
                .unwrap()
                .map(|r| r.record.status)
        };
        apply(&mut m, i, &begin("t7")).unwrap();
        assert_eq!(
            stored(&mut m, keys::txn_pending_key("t7")),
            Some(TxnStatus::Pending)
        );
        assert_eq!(stored(&mut m, keys::txn_key("t7")), None);
        let abort = CommerceCommand::DecideTxn {
            order_id: "t7".into(),
            decision: Decision::Abort(Rejection::new(RejectCode::OutOfStock, "no")),
            now_ms: 2,
        };
        apply(&mut m, i + 1, &abort).unwrap();
        assert_eq!(stored(&mut m, keys::txn_pending_key("t7")), None);
        assert_eq!(
            stored(&mut m, keys::txn_key("t7")),
            Some(TxnStatus::Aborted)
        );
        // A record an earlier build left pending in T, with an empty W entry
        // as its index, is still found, listed and decided.
        let old = txn::TxnRecord {
            customer: "c1".into(),
            lines: lines.clone(),
            status: TxnStatus::Pending,
            created_ms: 1,
            deadline_ms: 100,
            reason: None,
        };
        save(&mut m, keys::txn_key("t8"), i + 2, &old).unwrap();
        m.put(keys::txn_pending_key("t8"), Vec::new()).unwrap();
        let f = in_flight(&m);
        assert_eq!(f.pending.len(), 1);
        assert_eq!(f.pending[0].0, "t8");
        let products = vec![(product("A", 250, "EUR"), 1)];
        let (priced, currency, total_minor) = crate::domain::order::price_lines(&products).unwrap();
        let commit = CommerceCommand::DecideTxn {
            order_id: "t8".into(),
            decision: Decision::Commit {
                lines: priced,
                currency,
                total_minor,
                expires_at_ms: 50_000,
                checkout_cart_version: None,
            },
            now_ms: 3,
        };
        assert_eq!(
            txn(apply(&mut m, i + 3, &commit).unwrap()).status,
            TxnStatus::Committed
        );
        assert!(m.get(&keys::txn_key("t8")).unwrap().is_none());
        assert!(m.get(&keys::txn_pending_key("t8")).unwrap().is_none());
    }

    #[test]
    fn a_commit_settlement_only_drops_the_held_entry_and_a_retried_prepare_reserves_nothing_more() {
        let (mut m, i) = shop();
        let lines = vec![("A".to_string(), 3), ("B".to_string(), 1)];
        let prepare = CommerceCommand::PrepareTxn {
            order_id: "t3".into(),
            lines: lines.clone(),
            now_ms: 1,
            begin: None,
        };
        assert!(matches!(
            apply(&mut m, i, &prepare).unwrap(),
            CommerceResponse::Prepared(_)
        ));
        let resolve = |outcome| resolve_one("t3", outcome, 2);
        // Twice: the same outcome again changes nothing.
        for at in [i + 1, i + 2] {
            apply(&mut m, at, &resolve(Settlement::Commit)).unwrap();
        }
        assert_eq!(level(&m, "A").reserved, 3);
        assert_eq!(level(&m, "B").reserved, 1);
        match read(&m, &CommerceRead::InFlight { limit: 10 }).unwrap() {
            CommerceReadResult::InFlight(f) => assert!(f.held.is_empty(), "{f:?}"),
            other => panic!("{other:?}"),
        }
        // The coordinator retrying its prepare after the commit was applied
        // here: the vote stands and nothing is reserved twice.
        assert!(matches!(
            apply(&mut m, i + 3, &prepare).unwrap(),
            CommerceResponse::Prepared(_)
        ));
        assert_eq!(level(&m, "A").reserved, 3);
        // The same order id preparing other lines here is refused.
        let other = CommerceCommand::PrepareTxn {
            order_id: "t3".into(),
            lines: vec![("A".to_string(), 1)],
            now_ms: 1,
            begin: None,
        };
        assert_eq!(
            rejected(apply(&mut m, i + 3, &other).unwrap()),
            RejectCode::Inconsistent
        );
        assert_eq!(level(&m, "A").reserved, 3);
        // Ship later consumes exactly what the commit left reserved.
        apply(&mut m, i + 4, &resolve(Settlement::Consume)).unwrap();
        assert_eq!(
            level(&m, "A"),
            InventoryLevel {
                on_hand: 7,
                reserved: 0
            }
        );
        assert_eq!(
            level(&m, "B"),
            InventoryLevel {
                on_hand: 2,
                reserved: 0
            }
        );
        // Consumed reservations are tombstones: a late prepare votes NO.
        assert_eq!(
            rejected(apply(&mut m, i + 5, &prepare).unwrap()),
            RejectCode::OrderAborted
        );
    }

    #[test]
    fn a_decline_counts_one_attempt_and_stock_cannot_drop_below_reserved() {
        let (mut m, i) = shop();
        order(apply(&mut m, i, &place("o1", &[("B", 3)])).unwrap());
        let decline = CommerceCommand::RecordPayment {
            order_id: "o1".into(),
            attempt_key: "o1:1".into(),
            outcome: PaymentOutcome::Declined {
                reason: "card_declined".into(),
            },
            now_ms: 2,
        };
        assert_eq!(
            rejected(apply(&mut m, i + 1, &decline).unwrap()),
            RejectCode::PaymentDeclined
        );
        assert_eq!(
            rejected(apply(&mut m, i + 2, &decline).unwrap()),
            RejectCode::PaymentDeclined
        );
        match read(
            &m,
            &CommerceRead::Order {
                order_id: "o1".into(),
            },
        )
        .unwrap()
        {
            CommerceReadResult::Order(Some(v)) => {
                assert_eq!(
                    v.payment.failed_attempts, 1,
                    "a replayed decline is not a new attempt"
                );
                assert_eq!(v.payment.next_attempt_key("o1").1, "o1:2");
            }
            other => panic!("{other:?}"),
        }
        let set = CommerceCommand::SetStock {
            sku: "B".into(),
            on_hand: 2,
        };
        assert_eq!(
            rejected(apply(&mut m, i + 3, &set).unwrap()),
            RejectCode::BelowReserved
        );
        let adjust = CommerceCommand::AdjustStock {
            sku: "B".into(),
            delta: 5,
        };
        match apply(&mut m, i + 4, &adjust).unwrap() {
            CommerceResponse::Stock(s) => assert_eq!(s.record.available(), 5),
            other => panic!("{other:?}"),
        }
    }
}
