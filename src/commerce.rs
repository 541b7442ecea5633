//! Commerce request flows that take more than one command: a payment (call
//! the provider, then record its answer), a refund (provider, then record),
//! choosing an order id, and the propose/read helpers the commerce services
//! and the sweeper share.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::clock::now_ms;
use crate::domain::order::{OrderEvent, OrderStatus, transition};
use crate::domain::{RejectCode, Rejection};
use crate::node::{MAX_FORWARD_HOPS, Node, NodeError, ReadOp, ReadResult};
use crate::payment::PaymentError;
use crate::router::ClusterMap;
use crate::sm::commerce::{
    CommerceCommand, CommerceRead, CommerceReadResult, CommerceResponse, OrderView, PaymentOutcome,
};
use crate::sm::{self, Command, Fence, Response};
use crate::storage::keys::GroupId;

/// Why a commerce request did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommerceError {
    /// The request path failed (no leader, deadline, storage).
    #[error(transparent)]
    Node(#[from] NodeError),
    /// A business rule refused it.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The payment provider refused or failed.
    #[error(transparent)]
    Payment(#[from] PaymentError),
}

/// Proposes `cmd` to `shard`; a rejection becomes `Err(Rejected)`.
pub async fn propose(
    node: &Node,
    shard: GroupId,
    cmd: CommerceCommand,
    deadline: Instant,
) -> Result<CommerceResponse, CommerceError> {
    propose_fenced(node, shard, cmd, None, deadline).await
}

/// Proposes `cmd` guarded by `fence` if given: a superseded token is a
/// `STALE_FENCE` rejection and nothing changes.
pub async fn propose_fenced(
    node: &Node,
    shard: GroupId,
    cmd: CommerceCommand,
    fence: Option<&Fence>,
    deadline: Instant,
) -> Result<CommerceResponse, CommerceError> {
    let cmd = match fence {
        Some(f) => f.guard(Command::Commerce(cmd)),
        None => Command::Commerce(cmd),
    };
    match node.propose(shard, cmd, deadline, MAX_FORWARD_HOPS).await? {
        Response::Commerce(CommerceResponse::Rejected(r)) => Err(r.into()),
        Response::Commerce(r) => Ok(r),
        Response::StaleFence { highest } => Err(sm::stale_fence(highest).into()),
        other => Err(NodeError::Internal(format!("unexpected apply result {other:?}")).into()),
    }
}

/// Checks (and records) `fence` on `shard` without changing anything else:
/// for flows whose first effect is outside the store (a charge).
pub async fn check_fence(
    node: &Node,
    shard: GroupId,
    fence: &Fence,
    deadline: Instant,
) -> Result<(), CommerceError> {
    match node
        .propose(
            shard,
            fence.guard(Command::Noop),
            deadline,
            MAX_FORWARD_HOPS,
        )
        .await?
    {
        Response::Empty => Ok(()),
        Response::StaleFence { highest } => Err(sm::stale_fence(highest).into()),
        other => Err(NodeError::Internal(format!("unexpected apply result {other:?}")).into()),
    }
}

/// Reads `op` from `shard`.
pub async fn read(
    node: &Node,
    shard: GroupId,
    op: CommerceRead,
    linearizable: bool,
    deadline: Instant,
) -> Result<CommerceReadResult, CommerceError> {
    match node
        .read(
            shard,
            ReadOp::Commerce(op),
            linearizable,
            deadline,
            MAX_FORWARD_HOPS,
        )
        .await?
    {
        ReadResult::Commerce(r) => Ok(r),
        _ => Err(NodeError::Internal("wrong read result kind".into()).into()),
    }
}

/// Proposes `cmd` and expects an order back.
pub async fn propose_order(
    node: &Node,
    shard: GroupId,
    cmd: CommerceCommand,
    fence: Option<&Fence>,
    deadline: Instant,
) -> Result<OrderView, CommerceError> {
    match propose_fenced(node, shard, cmd, fence, deadline).await? {
        CommerceResponse::Order(view) => Ok(*view),
        other => Err(NodeError::Internal(format!("expected an order, got {other:?}")).into()),
    }
}

/// Reads an order linearizably; NOT_FOUND if it does not exist.
pub async fn get_order(
    node: &Node,
    shard: GroupId,
    order_id: &str,
    deadline: Instant,
) -> Result<OrderView, CommerceError> {
    let op = CommerceRead::Order {
        order_id: order_id.to_string(),
    };
    match read(node, shard, op, true, deadline).await? {
        CommerceReadResult::Order(Some(view)) => Ok(*view),
        CommerceReadResult::Order(None) => {
            Err(Rejection::new(RejectCode::UnknownOrder, format!("no order {order_id}")).into())
        }
        _ => Err(NodeError::Internal("wrong read result kind".into()).into()),
    }
}

/// Time the recording of a provider's answer gets after the answer came,
/// whatever remained of the caller's deadline.
const RECORD_AFTER_PROVIDER: std::time::Duration = std::time::Duration::from_secs(5);

/// Charges an unpaid order: authorize + capture the total with key
/// `order_id:attempt`, then record the outcome. A retried Pay finds the same
/// attempt number (declines alone advance it), so the provider sees the same
/// key and charges once; an order already paid is returned as it is.
/// `fence`, if given, must hold on the order's shard before anything happens.
/// Callers run it where their own cancellation cannot cut it short between
/// the charge and its record (`server::orders` spawns it).
pub async fn pay(
    node: &Node,
    map: &ClusterMap,
    order_id: &str,
    card_number: &str,
    fence: Option<&Fence>,
    deadline: Instant,
) -> Result<OrderView, CommerceError> {
    let shard = map.shard_of_order(order_id);
    // A fenced Pay is checked before the card is charged: a charge cannot be
    // taken back by refusing to record it.
    if let Some(f) = fence {
        check_fence(node, shard, f, deadline).await?;
    }
    let view = get_order(node, shard, order_id, deadline).await?;
    let order = &view.order.record;
    match order.status {
        OrderStatus::PendingPayment => {}
        OrderStatus::Paid | OrderStatus::Shipped | OrderStatus::Delivered => return Ok(view),
        other => {
            transition(order_id, other, OrderEvent::Pay)?;
        }
    }
    let (_, key) = view.payment.next_attempt_key(order_id);
    let amount = order.total_minor;
    let provider = node.payments.clone();
    let outcome = match provider
        .authorize(&key, amount, order.currency.as_str(), card_number)
        .await
    {
        Ok(auth) => {
            let capture_ref = provider.capture(&key, &auth.auth_ref, amount).await?;
            PaymentOutcome::Captured {
                provider_ref: capture_ref,
                amount_minor: amount,
                card_last4: auth.card_last4,
            }
        }
        Err(PaymentError::Declined(reason)) => PaymentOutcome::Declined { reason },
        Err(e) => return Err(e.into()),
    };
    let cmd = CommerceCommand::RecordPayment {
        order_id: order_id.to_string(),
        attempt_key: key,
        outcome,
        now_ms: now_ms(),
    };
    // Money may have moved: recording it gets time of its own, however little
    // the caller left (the provider may have taken most of it).
    let record_by = deadline.max(Instant::now() + RECORD_AFTER_PROVIDER);
    let paid = propose_order(node, shard, cmd, None, record_by).await?;
    if paid.payment.refund_due_minor > 0 {
        // Raced with a cancel or expiry: give the money back now if we can.
        return Ok(settle_refund(node, shard, paid, record_by)
            .await
            .unwrap_or_else(|(v, _)| v));
    }
    Ok(paid)
}

/// Refunds what `view`'s payment owes through the provider and records it.
/// On failure returns the view unchanged (the sweeper retries later).
pub async fn settle_refund(
    node: &Node,
    shard: GroupId,
    view: OrderView,
    deadline: Instant,
) -> Result<OrderView, (OrderView, CommerceError)> {
    let owed = view.payment.refund_due_minor;
    if owed <= 0 {
        return Ok(view);
    }
    let order_id = view.order.record.order_id.clone();
    // One key per refunded amount so far: a retry reuses it, a later second
    // refund gets its own.
    let key = format!("{order_id}:refund:{}", view.payment.refunded_minor);
    if let Err(e) = node
        .payments
        .refund(&key, &view.payment.provider_ref, owed)
        .await
    {
        return Err((view, e.into()));
    }
    let cmd = CommerceCommand::RecordRefund {
        order_id,
        amount_minor: owed,
    };
    match propose_order(node, shard, cmd, None, deadline).await {
        Ok(v) => Ok(v),
        Err(e) => Err((view, e)),
    }
}

/// A new order id on `shard` (so a single-shard order needs no 2PC): random
/// ids until one routes there.
pub fn choose_order_id(map: &ClusterMap, shard: GroupId) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut last = String::new();
    // With S shards the expected number of tries is S; 64·S makes a miss
    // practically impossible, and a miss only costs UNIMPLEMENTED.
    for _ in 0..64 * map.shards.max(1) {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let h = xxhash_rust::xxh3::xxh3_64(&[seed.to_be_bytes(), n.to_be_bytes()].concat());
        last = format!("ord-{h:016x}");
        if map.shard_of_order(&last) == shard {
            break;
        }
    }
    last
}
