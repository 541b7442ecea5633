//! Commerce request flows that take more than one command: a payment
//! (authorize, record the hold, capture, record the capture), a refund
//! (provider, then record), choosing an order id, and the propose/read
//! helpers the commerce services and the sweeper share.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::clock::now_ms;
use crate::domain::order::{OrderEvent, transition};
use crate::domain::{RejectCode, Rejection};
use crate::node::{MAX_FORWARD_HOPS, Node, NodeError, ReadOp, ReadResult};
use crate::payment::PaymentError;
use crate::router::ClusterMap;
use crate::sm::commerce::{
    CaptureOwed, CommerceCommand, CommerceRead, CommerceReadResult, CommerceResponse, OrderView,
    PaymentOutcome,
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
        other => Err(refused_or_unexpected(other)),
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
        other => Err(refused_or_unexpected(other)),
    }
}

/// A fenced write's refusal (a stale or expired token), or an internal error
/// for any other result a command should not have.
fn refused_or_unexpected(resp: Response) -> CommerceError {
    match sm::fence_rejection(&resp) {
        Some(rejection) => rejection.into(),
        None => NodeError::Internal(format!("unexpected apply result {resp:?}")).into(),
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

/// Charges an unpaid order with key `order_id:attempt`: authorize, record
/// the authorization (a capture owed), capture, record the capture. A
/// retried Pay finds the same attempt number (declines alone advance it), so
/// the provider sees the same key and charges once; an order already paid
/// is returned as it is. The authorization is recorded before the capture
/// so that a capture whose record never lands (this node dies, or no leader
/// for long enough) is found by the sweeper, captured again under the same
/// key (the provider's answer, not a second charge) and recorded
/// ([`capture_owed`]). `fence`, if given, must hold on the order's shard
/// before anything happens. Callers run it where their own cancellation
/// cannot cut it short (`server::orders` spawns it).
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
    if order.status.is_paid() {
        return Ok(view);
    }
    transition(order_id, order.status, OrderEvent::Pay)?;
    let (_, key) = view.payment.next_attempt_key(order_id);
    let amount = order.total_minor;
    let authorized = node
        .payments
        .authorize(&key, amount, order.currency.as_str(), card_number)
        .await;
    let auth = match authorized {
        Ok(auth) => auth,
        Err(PaymentError::Declined(reason)) => {
            let outcome = PaymentOutcome::Declined { reason };
            let by = record_deadline(deadline);
            return record_payment(node, shard, order_id, &key, outcome, by).await;
        }
        Err(e) => return Err(e.into()),
    };
    let outcome = PaymentOutcome::Authorized {
        auth_ref: auth.auth_ref.clone(),
        amount_minor: amount,
        card_last4: auth.card_last4.clone(),
    };
    record_payment(
        node,
        shard,
        order_id,
        &key,
        outcome,
        record_deadline(deadline),
    )
    .await?;
    let owed = CaptureOwed {
        attempt_key: key,
        auth_ref: auth.auth_ref,
        amount_minor: amount,
        card_last4: auth.card_last4,
        since_ms: now_ms(),
    };
    delay_point!("pay-before-capture");
    let capture_ref = capture(node, &owed).await?;
    crash_point!("pay-after-capture");
    record_capture(
        node,
        shard,
        order_id,
        &owed,
        capture_ref,
        record_deadline(deadline),
    )
    .await
}

/// Money may be held or moving once the provider has answered: recording
/// that gets time of its own, however little the caller left (the provider
/// may have taken most of it).
fn record_deadline(caller_deadline: Instant) -> Instant {
    caller_deadline.max(Instant::now() + RECORD_AFTER_PROVIDER)
}

/// Finishes a payment whose authorization was recorded but whose capture
/// was not (the sweeper's side of [`pay`]): captures under the same key and
/// records it. A capture on an order no longer payable is owed back and
/// refunded.
pub async fn capture_owed(
    node: &Node,
    shard: GroupId,
    order_id: &str,
    owed: &CaptureOwed,
    deadline: Instant,
) -> Result<OrderView, CommerceError> {
    let capture_ref = capture(node, owed).await?;
    record_capture(node, shard, order_id, owed, capture_ref, deadline).await
}

async fn capture(node: &Node, owed: &CaptureOwed) -> Result<String, CommerceError> {
    Ok(node
        .payments
        .capture(&owed.attempt_key, &owed.auth_ref, owed.amount_minor)
        .await?)
}

async fn record_capture(
    node: &Node,
    shard: GroupId,
    order_id: &str,
    owed: &CaptureOwed,
    capture_ref: String,
    deadline: Instant,
) -> Result<OrderView, CommerceError> {
    let outcome = PaymentOutcome::Captured {
        provider_ref: capture_ref,
        amount_minor: owed.amount_minor,
        card_last4: owed.card_last4.clone(),
    };
    let recorded =
        record_payment(node, shard, order_id, &owed.attempt_key, outcome, deadline).await;
    if let Err(CommerceError::Rejected(r)) = &recorded
        && r.code == RejectCode::IllegalTransition
    {
        // Recorded as owed back (the order was cancelled or expired
        // meanwhile): refund now if we can; the sweeper retries otherwise.
        if let Ok(view) = get_order(node, shard, order_id, deadline).await {
            let _ = settle_refund(node, shard, view, deadline).await;
        }
    }
    recorded
}

async fn record_payment(
    node: &Node,
    shard: GroupId,
    order_id: &str,
    attempt_key: &str,
    outcome: PaymentOutcome,
    deadline: Instant,
) -> Result<OrderView, CommerceError> {
    let cmd = CommerceCommand::RecordPayment {
        order_id: order_id.to_string(),
        attempt_key: attempt_key.to_string(),
        outcome,
        now_ms: now_ms(),
    };
    propose_order(node, shard, cmd, None, deadline).await
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

/// Empties `customer`'s cart (on `shard`) if it still has `version`, the
/// one a checkout read. A cart emptied already, or changed by its owner
/// since, stays as it is and counts as done. Versions are log indexes, so a
/// cart filled again after a clear never has the old one.
pub async fn clear_cart_at_version(
    node: &Node,
    shard: GroupId,
    customer: &str,
    version: u64,
    deadline: Instant,
) -> Result<(), CommerceError> {
    let cmd = CommerceCommand::CartClear {
        customer: customer.to_string(),
        expected_version: Some(version),
    };
    match propose(node, shard, cmd, deadline).await {
        Ok(_) => Ok(()),
        Err(CommerceError::Rejected(r)) if r.code == RejectCode::CartChanged => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes sure a placed checkout's cart is emptied (the sweeper, or a
/// retry, for a checkout whose node may have died after the order): reads
/// the cart first — the clear is nearly always done, and a read costs no log
/// entry — and clears it only if it still has the checked-out `version`.
pub async fn finish_cart_clear(
    node: &Node,
    map: &ClusterMap,
    customer: &str,
    version: u64,
    deadline: Instant,
) -> Result<(), CommerceError> {
    let shard = map.shard_of_customer(customer);
    let op = CommerceRead::Cart {
        customer: customer.to_string(),
    };
    match read(node, shard, op, true, deadline).await? {
        CommerceReadResult::Cart(c) if c.version == version => {
            clear_cart_at_version(node, shard, customer, version, deadline).await
        }
        _ => Ok(()),
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
