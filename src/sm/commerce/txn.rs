//! 2PC records of cross-shard orders. On the **anchor** (the order id's
//! shard): the transaction record `T` (PENDING → COMMITTED | ABORTED, one
//! compare-and-set each: the decide write is the commit point and writes the
//! order in the same apply; from then on the order is the record of the
//! commit and `T` is deleted, so only aborted records stay to stop late
//! steps) and `S`, the settlement the participants are owed.
//! On each **participant** (a SKU's shard): escrow reservations held under
//! the order id, `H` listing them until the decision is applied here (a
//! commit only deletes `H`; the reservations stay as they are), and
//! tombstones so a late prepare of an aborted order fails. Every command is
//! idempotent.
//!
//! Tombstones of **aborted** transactions (the anchor's `T`, the
//! participants' released `R`) are pruned after a retention
//! (`PruneAborted`, proposed by each shard leader's sweeper), so attempts
//! that abort (a sold-out flash sale) do not grow the store for ever. That
//! is safe at any age: a late prepare that finds no tombstone holds stock
//! that recovery resolves through the anchor, and the anchor, finding
//! neither record nor order, aborts again (`AbortTxn`). Tombstones of
//! committed orders (released on cancel, consumed on ship) stay: a hold
//! made under a committed order's id would be resolved as that order's.

use serde::{Deserialize, Serialize};

use super::{
    CartClearOwed, CommerceResponse, OrderView, RecordReader, StateAccess, Stored, load,
    load_order, owe_cart_clear, read_one, read_order, reject, save, unknown_sku,
};
use crate::domain::catalog::Product;
use crate::domain::inventory::{InventoryLevel, Reservation, ReservationState};
use crate::domain::money::Currency;
use crate::domain::order::{Order, OrderLine, OrderStatus, Payment};
use crate::domain::{RejectCode, Rejection};
use crate::sm::SmError;
use crate::storage::keys::{self, AbortedRecord};

/// Tombstones one `PruneAborted` deletes at most.
pub const MAX_PRUNE_BATCH: usize = 256;

/// A transaction's state on its anchor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnStatus {
    /// Begun; participants may be preparing.
    Pending,
    /// Decided: the order exists. Reported by views; not stored (a commit
    /// deletes the record, the order answers for it).
    Committed,
    /// Decided: nothing of the order remains once participants release.
    Aborted,
}

/// The transaction record on the anchor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRecord {
    /// Customer placing the order (empty for a recovery tombstone).
    pub customer: String,
    /// Normalised lines (empty for a recovery tombstone).
    pub lines: Vec<(String, u32)>,
    /// Current state.
    pub status: TxnStatus,
    /// When it was begun.
    pub created_ms: u64,
    /// Past this a PENDING record may be aborted by anyone.
    pub deadline_ms: u64,
    /// Why it was aborted.
    pub reason: Option<Rejection>,
}

/// What participants must do with an order's reservations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Settlement {
    /// The order exists: its reservations stay; only `H` goes.
    Commit,
    /// Reserved → released (aborted, cancelled, expired).
    Release,
    /// Reserved → consumed (shipped: units leave on_hand).
    Consume,
    /// Reserved → released because the transaction aborted: no order has
    /// this id, so the tombstone may be pruned after the retention.
    Abort,
}

/// A settlement the anchor owes its participants, kept until they all
/// applied it: a release, consume or abort (a commit owes none, see
/// `decide`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleEntry {
    /// What to apply.
    pub outcome: Settlement,
    /// The order's SKUs (each participant applies its own).
    pub skus: Vec<String>,
    /// When it became owed.
    pub since_ms: u64,
}

/// Reservations an order holds on a participant, until resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldEntry {
    /// When they were prepared (what they are is the order's reservation
    /// record `R` on this shard).
    pub prepared_ms: u64,
}

/// A `BeginTxn` carried by the anchor's own `PrepareTxn`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnBegin {
    /// Customer.
    pub customer: String,
    /// Every line of the order (normalised).
    pub lines: Vec<(String, u32)>,
    /// Past this a PENDING record may be aborted by anyone.
    pub deadline_ms: u64,
}

/// One order's settlement on one participant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolveItem {
    /// Order id (the shard knows which of its lines the order holds).
    pub order_id: String,
    /// Commit, release or consume.
    pub outcome: Settlement,
}

/// The coordinator's decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// Every participant voted yes: write the order.
    Commit {
        /// Priced lines.
        lines: Vec<OrderLine>,
        /// Currency.
        currency: Currency,
        /// Total.
        total_minor: i64,
        /// Payment deadline.
        expires_at_ms: u64,
        /// Placed by a checkout: the version of the cart it read (kept in
        /// the order).
        checkout_cart_version: Option<u64>,
    },
    /// A participant voted no (or pricing failed): the reason.
    Abort(Rejection),
}

impl Decision {
    /// Whether this is a commit.
    pub fn is_commit(&self) -> bool {
        matches!(self, Decision::Commit { .. })
    }
}

/// A transaction as the coordinator and clients see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnView {
    /// State (`Committed` also for a 1PC order).
    pub status: TxnStatus,
    /// Why it aborted.
    pub reason: Option<Rejection>,
    /// The order, once committed.
    pub order: Option<OrderView>,
    /// The record's deadline (0 for a 1PC order).
    pub deadline_ms: u64,
}

/// 2PC records in flight on one shard.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// PENDING transaction records (anchor side).
    pub pending: Vec<(String, TxnRecord)>,
    /// Owed settlements (anchor side; releases, consumes and aborts).
    pub settlements: Vec<(String, SettleEntry)>,
    /// Held reservations (participant side).
    pub held: Vec<(String, HeldEntry)>,
}

fn view(record: &TxnRecord, order: Option<OrderView>) -> CommerceResponse {
    CommerceResponse::Txn(Box::new(TxnView {
        status: record.status,
        reason: record.reason.clone(),
        order,
        deadline_ms: record.deadline_ms,
    }))
}

fn committed(order: OrderView) -> CommerceResponse {
    CommerceResponse::Txn(Box::new(TxnView {
        status: TxnStatus::Committed,
        reason: None,
        order: Some(order),
        deadline_ms: 0,
    }))
}

/// Whether `order` is what placing `lines` for `customer` would have made (a
/// retry), as opposed to another order under the same id.
pub fn same_request(order: &Order, customer: &str, lines: &[(String, u32)]) -> bool {
    order.customer == customer
        && order.lines.len() == lines.len()
        && order
            .lines
            .iter()
            .zip(lines)
            .all(|(l, (sku, qty))| l.sku == *sku && l.qty == *qty)
}

fn reused(order_id: &str) -> CommerceResponse {
    reject(
        RejectCode::OrderIdReused,
        format!("order id {order_id} is already used by another order"),
    )
}

/// Records that `order_id`'s participants are owed `outcome` (an abort's
/// release, or a committed order's release or consume).
pub(super) fn owe_settlement(
    state: &mut dyn StateAccess,
    index: u64,
    order_id: &str,
    outcome: Settlement,
    skus: Vec<String>,
    now_ms: u64,
) -> Result<(), SmError> {
    let entry = SettleEntry {
        outcome,
        skus,
        since_ms: now_ms,
    };
    save(state, keys::settlement_key(order_id), index, &entry)
}

/// Indexes an aborted transaction's tombstone for the pruner.
fn index_aborted(
    state: &mut dyn StateAccess,
    record: AbortedRecord,
    order_id: &str,
    now_ms: u64,
) -> Result<(), SmError> {
    state.put(
        keys::aborted_index_key(now_ms, record, order_id),
        Vec::new(),
    )
}

/// The transaction record of `order_id` and whether it is stored in `T`:
/// an undecided record lives in `W` (one scan finds them all for recovery),
/// an aborted one in `T`. A `W` entry without a value is the index entry of
/// a build before 2026-11-28, whose pending record is in `T`.
fn load_txn(
    state: &mut dyn StateAccess,
    order_id: &str,
) -> Result<Option<(Stored<TxnRecord>, bool)>, SmError> {
    if let Some(bytes) = state.get(&keys::txn_pending_key(order_id))?
        && !bytes.is_empty()
    {
        return Ok(Some((crate::codec::decode(&bytes)?, false)));
    }
    Ok(load::<TxnRecord>(state, &keys::txn_key(order_id))?.map(|r| (r, true)))
}

/// [`load_txn`] for readers.
fn read_txn(r: &dyn RecordReader, order_id: &str) -> Result<Option<Stored<TxnRecord>>, SmError> {
    if let Some(bytes) = r.get(&keys::txn_pending_key(order_id))?
        && !bytes.is_empty()
    {
        return Ok(Some(crate::codec::decode(&bytes)?));
    }
    read_one::<TxnRecord>(r, &keys::txn_key(order_id))
}

/// `BeginTxn` on the anchor.
pub(super) fn begin(
    state: &mut dyn StateAccess,
    index: u64,
    order_id: &str,
    customer: &str,
    lines: &[(String, u32)],
    now_ms: u64,
    deadline_ms: u64,
) -> Result<CommerceResponse, SmError> {
    if let Some(existing) = load_order(state, order_id)? {
        if same_request(&existing.order.record, customer, lines) {
            return Ok(committed(existing));
        }
        return Ok(reused(order_id));
    }
    if let Some((rec, _)) = load_txn(state, order_id)? {
        let tombstone = rec.record.lines.is_empty();
        if !tombstone && (rec.record.customer != customer || rec.record.lines != lines) {
            return Ok(reused(order_id));
        }
        return Ok(view(&rec.record, None));
    }
    let rec = TxnRecord {
        customer: customer.to_string(),
        lines: lines.to_vec(),
        status: TxnStatus::Pending,
        created_ms: now_ms,
        deadline_ms,
        reason: None,
    };
    // Undecided: in `W` only (a commit then deletes one key, not two).
    save(state, keys::txn_pending_key(order_id), index, &rec)?;
    Ok(view(&rec, None))
}

/// `PrepareTxn` on a participant: all of this shard's lines or none.
/// `track_hold`: record the hold in `H` for this shard's recovery (not for
/// the anchor's own lines prepared with the begin: the pending record
/// answers for them).
pub(super) fn prepare(
    state: &mut dyn StateAccess,
    index: u64,
    order_id: &str,
    lines: &[(String, u32)],
    now_ms: u64,
    track_hold: bool,
) -> Result<CommerceResponse, SmError> {
    let held = load::<Reservation>(state, &keys::reservation_key(order_id))?.map(|s| s.record);
    match &held {
        Some(r) if !r.is_live() => {
            return Ok(reject(
                RejectCode::OrderAborted,
                format!("order {order_id} was already aborted or settled"),
            ));
        }
        Some(r) if r.lines != lines => {
            return Ok(reject(
                RejectCode::Inconsistent,
                format!("order {order_id} already holds other lines on this shard"),
            ));
        }
        _ => {}
    }
    let mut products = Vec::with_capacity(lines.len());
    for (sku, qty) in lines {
        let Some(p) = load::<Product>(state, &keys::product_key(sku))? else {
            return Ok(unknown_sku(sku));
        };
        if held.is_none() {
            check!(p.record.check_orderable(*qty));
        }
        products.push(p.record);
    }
    if held.is_some() {
        // A retried prepare: the vote stands.
        return Ok(CommerceResponse::Prepared(products));
    }
    let mut levels = Vec::with_capacity(lines.len());
    for (sku, qty) in lines {
        let level = load::<InventoryLevel>(state, &keys::inventory_key(sku))?
            .map(|s| s.record)
            .unwrap_or_default();
        levels.push(check!(level.reserve(sku, *qty)));
    }
    for ((sku, _), level) in lines.iter().zip(&levels) {
        save(state, keys::inventory_key(sku), index, level)?;
    }
    let r = Reservation {
        lines: lines.to_vec(),
        state: ReservationState::Reserved,
    };
    save(state, keys::reservation_key(order_id), index, &r)?;
    if track_hold {
        let held = HeldEntry {
            prepared_ms: now_ms,
        };
        save(state, keys::held_key(order_id), index, &held)?;
    }
    Ok(CommerceResponse::Prepared(products))
}

/// `DecideTxn` on the anchor: the commit point.
pub(super) fn decide(
    state: &mut dyn StateAccess,
    index: u64,
    order_id: &str,
    decision: &Decision,
    now_ms: u64,
) -> Result<CommerceResponse, SmError> {
    let Some((rec, in_t)) = load_txn(state, order_id)? else {
        // Committed already: the order is the record of it (looked for only
        // here, off the path of a first decision).
        if let Some(order) = load_order(state, order_id)? {
            return Ok(committed(order));
        }
        // Neither: aborted and pruned while this decision was on its way
        // (recovery aborted it at its deadline), so it stays aborted.
        let why = format!("order {order_id} was aborted before this decision");
        return abort_marker(state, index, order_id, now_ms, why);
    };
    // Decided already: aborted (a commit leaves no record), the first
    // decision stands.
    if rec.record.status != TxnStatus::Pending {
        return Ok(view(&rec.record, None));
    }
    match decision {
        Decision::Commit {
            lines,
            currency,
            total_minor,
            expires_at_ms,
            checkout_cart_version,
        } => {
            let order = Order {
                order_id: order_id.to_string(),
                customer: rec.record.customer.clone(),
                lines: lines.clone(),
                currency: *currency,
                total_minor: *total_minor,
                status: OrderStatus::PendingPayment,
                placed_at_ms: now_ms,
                expires_at_ms: *expires_at_ms,
                updated_at_ms: now_ms,
                two_phase: true,
                checkout_cart_version: *checkout_cart_version,
            };
            // The payment record appears with the first payment event (as
            // for a 1PC order).
            save(state, keys::order_key(order_id), index, &order)?;
            if let Some(cart_version) = *checkout_cart_version {
                let owed = CartClearOwed {
                    customer: order.customer.clone(),
                    cart_version,
                    since_ms: now_ms,
                };
                owe_cart_clear(state, index, order_id, &owed)?;
            }
            state.put(
                keys::customer_order_key(&order.customer, order_id),
                Vec::new(),
            )?;
            state.put(
                keys::order_deadline_key(*expires_at_ms, order_id),
                Vec::new(),
            )?;
            // The order now answers for the transaction (every step reads
            // it first), so its record goes: only aborted records, which stop
            // late steps, stay behind.
            state.delete(keys::txn_pending_key(order_id))?;
            if in_t {
                state.delete(keys::txn_key(order_id))?;
            }
            // No settlement is owed for a commit: it moves no stock (the
            // reservations already count in `reserved`), and a participant
            // whose hold the coordinator does not settle finds it itself —
            // its recovery asks this anchor about holds older than the
            // transaction timeout. An owed entry would cost two writes and a
            // `SettlementDone` per order (W4 −4 % CPU per order without).
            Ok(committed(OrderView {
                order: Stored {
                    version: index,
                    record: order,
                },
                payment: Payment::default(),
            }))
        }
        Decision::Abort(reason) => {
            abort_pending(state, index, order_id, rec.record, reason.clone(), now_ms)
        }
    }
}

/// PENDING → ABORTED with `reason`: the record stays (indexed for the
/// pruner) and the participants are owed the abort's release.
fn abort_pending(
    state: &mut dyn StateAccess,
    index: u64,
    order_id: &str,
    mut rec: TxnRecord,
    reason: Rejection,
    now_ms: u64,
) -> Result<CommerceResponse, SmError> {
    rec.status = TxnStatus::Aborted;
    rec.reason = Some(reason);
    save(state, keys::txn_key(order_id), index, &rec)?;
    state.delete(keys::txn_pending_key(order_id))?;
    index_aborted(state, AbortedRecord::Txn, order_id, now_ms)?;
    let skus = rec.lines.iter().map(|(s, _)| s.clone()).collect();
    owe_settlement(state, index, order_id, Settlement::Abort, skus, now_ms)?;
    Ok(view(&rec, None))
}

/// Writes an ABORTED record where there is none (and no order): a late begin
/// or decide of the id then finds the abort.
fn abort_marker(
    state: &mut dyn StateAccess,
    index: u64,
    order_id: &str,
    now_ms: u64,
    why: String,
) -> Result<CommerceResponse, SmError> {
    let rec = TxnRecord {
        customer: String::new(),
        lines: Vec::new(),
        status: TxnStatus::Aborted,
        created_ms: now_ms,
        deadline_ms: now_ms,
        reason: Some(Rejection::new(RejectCode::OrderAborted, why)),
    };
    save(state, keys::txn_key(order_id), index, &rec)?;
    index_aborted(state, AbortedRecord::Txn, order_id, now_ms)?;
    Ok(view(&rec, None))
}

/// `AbortTxn` on the anchor (recovery).
pub(super) fn abort_expired(
    state: &mut dyn StateAccess,
    index: u64,
    order_id: &str,
    now_ms: u64,
) -> Result<CommerceResponse, SmError> {
    if let Some(order) = load_order(state, order_id)? {
        return Ok(committed(order));
    }
    let Some((rec, _)) = load_txn(state, order_id)? else {
        // Only a coordinator creates records; this marker stops a late one.
        let why = format!("order {order_id} was aborted by recovery before it began");
        return abort_marker(state, index, order_id, now_ms, why);
    };
    if rec.record.status != TxnStatus::Pending || now_ms < rec.record.deadline_ms {
        return Ok(view(&rec.record, None));
    }
    let reason = Rejection::new(
        RejectCode::OrderAborted,
        format!("order {order_id} was not decided before its deadline"),
    );
    abort_pending(state, index, order_id, rec.record, reason, now_ms)
}

/// `ResolveTxn` on a participant: each item on its own (a refused one does
/// not hold the others back; each is idempotent).
pub(super) fn resolve_all(
    state: &mut dyn StateAccess,
    index: u64,
    items: &[ResolveItem],
    now_ms: u64,
) -> Result<CommerceResponse, SmError> {
    let mut failed = Vec::new();
    for item in items {
        if let CommerceResponse::Rejected(r) =
            resolve(state, index, &item.order_id, item.outcome, now_ms)?
        {
            failed.push((item.order_id.clone(), r));
        }
    }
    Ok(CommerceResponse::Settled { failed })
}

/// One order's settlement on a participant.
fn resolve(
    state: &mut dyn StateAccess,
    index: u64,
    order_id: &str,
    outcome: Settlement,
    now_ms: u64,
) -> Result<CommerceResponse, SmError> {
    if outcome == Settlement::Commit {
        // The reservation already counts in `reserved` and stays there until
        // ship or release; this shard only records that it knows the outcome.
        state.delete(keys::held_key(order_id))?;
        return Ok(CommerceResponse::Settled { failed: Vec::new() });
    }
    let key = keys::reservation_key(order_id);
    let end = if outcome == Settlement::Consume {
        ReservationState::Consumed
    } else {
        ReservationState::Released
    };
    // The tombstone this settlement leaves, if it leaves one (a settled
    // reservation stays as it is).
    let tombstone = match load::<Reservation>(state, &key)?.map(|s| s.record) {
        // Nothing held here: remember the outcome so a late prepare fails.
        None => Some(Reservation {
            lines: Vec::new(),
            state: ReservationState::Released,
        }),
        Some(r) if !r.is_live() => None,
        Some(r) => {
            // Compute every change first: a rejection must write nothing.
            let mut levels = Vec::with_capacity(r.lines.len());
            for (sku, qty) in &r.lines {
                let level = load::<InventoryLevel>(state, &keys::inventory_key(sku))?
                    .map(|s| s.record)
                    .unwrap_or_default();
                levels.push(if end == ReservationState::Consumed {
                    check!(level.consume(sku, *qty))
                } else {
                    check!(level.release(sku, *qty))
                });
            }
            for ((sku, _), level) in r.lines.iter().zip(&levels) {
                save(state, keys::inventory_key(sku), index, level)?;
            }
            Some(Reservation {
                lines: r.lines,
                state: end,
            })
        }
    };
    if let Some(tombstone) = tombstone {
        save(state, key, index, &tombstone)?;
        if outcome == Settlement::Abort {
            index_aborted(state, AbortedRecord::Reservation, order_id, now_ms)?;
        }
    }
    state.delete(keys::held_key(order_id))?;
    Ok(CommerceResponse::Settled { failed: Vec::new() })
}

/// `SettlementDone` on the anchor.
pub(super) fn settlement_done(
    state: &mut dyn StateAccess,
    items: &[(String, Settlement)],
) -> Result<CommerceResponse, SmError> {
    for (order_id, outcome) in items {
        if let Some(entry) = load::<SettleEntry>(state, &keys::settlement_key(order_id))?
            && entry.record.outcome == *outcome
        {
            state.delete(keys::settlement_key(order_id))?;
        }
    }
    Ok(CommerceResponse::Settled { failed: Vec::new() })
}

/// One aborted transaction's tombstone, as its index entry names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortedTombstone {
    /// When the abort was recorded here (proposer's clock).
    pub aborted_ms: u64,
    /// The anchor's record or a participant's reservation.
    pub record: AbortedRecord,
    /// Order id = transaction id.
    pub order_id: String,
}

/// `PruneAborted`: deletes the named tombstones recorded before
/// `before_ms`, each re-checked here. A `T` goes only while aborted and
/// owing no settlement (otherwise it is indexed again at `now_ms`: its
/// release is still on its way to a participant); an `R` only while settled.
/// Returns how many records were deleted.
pub(super) fn prune_aborted(
    state: &mut dyn StateAccess,
    tombstones: &[AbortedTombstone],
    before_ms: u64,
    now_ms: u64,
) -> Result<u32, SmError> {
    let mut pruned = 0;
    for t in tombstones.iter().take(MAX_PRUNE_BATCH) {
        let entry = keys::aborted_index_key(t.aborted_ms, t.record, &t.order_id);
        if t.aborted_ms >= before_ms || state.get(&entry)?.is_none() {
            continue;
        }
        state.delete(entry)?;
        match t.record {
            AbortedRecord::Txn => {
                let key = keys::txn_key(&t.order_id);
                let aborted = load::<TxnRecord>(state, &key)?
                    .is_some_and(|r| r.record.status == TxnStatus::Aborted);
                if !aborted {
                    continue;
                }
                if state.get(&keys::settlement_key(&t.order_id))?.is_some() {
                    index_aborted(state, AbortedRecord::Txn, &t.order_id, now_ms)?;
                } else {
                    state.delete(key)?;
                    pruned += 1;
                }
            }
            AbortedRecord::Reservation => {
                let key = keys::reservation_key(&t.order_id);
                if load::<Reservation>(state, &key)?.is_some_and(|r| !r.record.is_live()) {
                    state.delete(key)?;
                    pruned += 1;
                }
            }
        }
    }
    Ok(pruned)
}

/// Aborted transactions' tombstones recorded before `before_ms`, oldest
/// first (for the pruner).
pub(super) fn read_aborted_before(
    r: &dyn RecordReader,
    before_ms: u64,
    limit: usize,
) -> Result<Vec<AbortedTombstone>, SmError> {
    let prefix = keys::aborted_index_prefix();
    // Most sweeps find nothing due: look at the oldest entry before reading a batch.
    let due = |k: &[u8]| keys::parse_aborted_index_key(k).is_some_and(|(at, ..)| at < before_ms);
    if !r
        .scan(&prefix, None, 1)?
        .first()
        .is_some_and(|(k, _)| due(k))
    {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (k, _) in r.scan(&prefix, None, limit.min(MAX_PRUNE_BATCH))? {
        let Some((aborted_ms, record, order_id)) = keys::parse_aborted_index_key(&k) else {
            continue;
        };
        if aborted_ms >= before_ms {
            break;
        }
        out.push(AbortedTombstone {
            aborted_ms,
            record,
            order_id: order_id.to_string(),
        });
    }
    Ok(out)
}

/// A transaction's state for readers (a 1PC order reads as committed).
pub(super) fn read_view(
    r: &dyn RecordReader,
    order_id: &str,
) -> Result<Option<Box<TxnView>>, SmError> {
    let order = read_order(r, order_id)?;
    let rec = read_txn(r, order_id)?;
    Ok(match (rec, order) {
        (Some(rec), order) => Some(Box::new(TxnView {
            status: rec.record.status,
            reason: rec.record.reason,
            order,
            deadline_ms: rec.record.deadline_ms,
        })),
        (None, Some(order)) => Some(Box::new(TxnView {
            status: TxnStatus::Committed,
            reason: None,
            order: Some(order),
            deadline_ms: 0,
        })),
        (None, None) => None,
    })
}

fn scan_typed<T: serde::de::DeserializeOwned>(
    r: &dyn RecordReader,
    prefix: &[u8],
    limit: usize,
) -> Result<Vec<(String, T)>, SmError> {
    let mut out = Vec::new();
    for (k, v) in r.scan(prefix, None, limit)? {
        if let Some(id) = keys::order_id_of(&k) {
            let stored: Stored<T> = crate::codec::decode(&v)?;
            out.push((id.to_string(), stored.record));
        }
    }
    Ok(out)
}

/// Pending records, owed settlements and held reservations, `limit` each.
pub(super) fn read_in_flight(r: &dyn RecordReader, limit: usize) -> Result<InFlight, SmError> {
    let mut pending = Vec::new();
    for (k, v) in r.scan(&keys::txn_pending_prefix(), None, limit)? {
        let Some(id) = keys::order_id_of(&k) else {
            continue;
        };
        let rec = if v.is_empty() {
            read_one::<TxnRecord>(r, &keys::txn_key(id))?
        } else {
            Some(crate::codec::decode::<Stored<TxnRecord>>(&v)?)
        };
        if let Some(rec) = rec {
            pending.push((id.to_string(), rec.record));
        }
    }
    Ok(InFlight {
        pending,
        settlements: scan_typed(r, &keys::settlement_prefix(), limit)?,
        held: scan_typed(r, &keys::held_prefix(), limit)?,
    })
}
