//! Leader-driven time effects of the commerce records. On each data shard
//! this node leads, every [`SWEEP_INTERVAL`]: propose the expiry of unpaid
//! orders past their deadline (stamped with this leader's clock; apply
//! re-checks each deadline and status), retry refunds that are owed, finish
//! payments whose capture was never recorded (`commerce::capture_owed`),
//! empty the carts checkouts left full (`commerce::finish_cart_clear`),
//! prune aborted transactions' tombstones past their retention, and run 2PC
//! recovery (`txn::recover`).

use std::sync::Weak;
use std::time::{Duration, Instant};

use crate::clock::now_ms;
use crate::commerce;
use crate::node::{Node, ReadOp, ReadResult};
use crate::sm::commerce::{
    CommerceCommand, CommerceRead, CommerceReadResult, MAX_EXPIRE_BATCH, MAX_PRUNE_BATCH,
};
use crate::storage::keys::GroupId;

/// How often a leader looks for due deadlines and refunds.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(500);
/// Deadline of each proposal the sweeper makes.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(5);
/// Refunds retried per shard per sweep.
const MAX_REFUNDS_PER_SWEEP: u32 = 32;
/// Owed captures finished per shard per sweep.
const MAX_CAPTURES_PER_SWEEP: u32 = 32;
/// An authorization is left to its payment flow this long before the
/// sweeper captures and records it: longer than the flow takes to record
/// after the provider answers (`commerce::RECORD_AFTER_PROVIDER`, 5 s).
const CAPTURE_GRACE_MS: u64 = 10_000;

/// Checkout cart clears owed finished per shard per sweep, concurrently
/// (≤ 512 a second per shard: more than the checkouts whose own clear fails).
const MAX_CART_CLEARS_PER_SWEEP: u32 = MAX_EXPIRE_BATCH as u32;
/// A checkout's cart is left to the checkout this long before the sweeper
/// empties it (the checkout does so right after its order).
const CART_CLEAR_GRACE_MS: u64 = 5_000;

/// Runs until the node is dropped.
pub async fn run(node: Weak<Node>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        for group in node.led_data_groups() {
            if let Err(e) = sweep(&node, group).await {
                tracing::warn!(group, error = %e, "order sweep failed");
            }
            if let Some(map) = node.cluster_map() {
                match crate::txn::recover(&node, &map, group).await {
                    Ok(s) if s.aborted + s.settled + s.resolved > 0 => {
                        tracing::debug!(group, ?s, "2PC recovery");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(group, error = %e, "2PC recovery failed"),
                }
            }
        }
    }
}

async fn sweep(node: &Node, group: GroupId) -> Result<(), commerce::CommerceError> {
    let deadline = Instant::now() + SWEEP_TIMEOUT;
    let now = now_ms();
    // The leader's own replica is enough to find candidates: apply decides.
    let due = local_ids(
        node,
        group,
        CommerceRead::DueDeadlines {
            now_ms: now,
            limit: MAX_EXPIRE_BATCH as u32,
        },
    )?;
    if !due.is_empty() {
        let cmd = CommerceCommand::ExpireOrders {
            order_ids: due,
            now_ms: now,
        };
        commerce::propose(node, group, cmd, deadline).await?;
    }
    let owed = local_ids(
        node,
        group,
        CommerceRead::DueRefunds {
            limit: MAX_REFUNDS_PER_SWEEP,
        },
    )?;
    for order_id in owed {
        let view = commerce::get_order(node, group, &order_id, deadline).await?;
        if let Err((_, e)) = commerce::settle_refund(node, group, view, deadline).await {
            tracing::warn!(group, order_id, error = %e, "refund not settled; will retry");
        }
    }
    let captures = match node.read_local(
        group,
        &ReadOp::Commerce(CommerceRead::DueCaptures {
            authorized_by_ms: now.saturating_sub(CAPTURE_GRACE_MS),
            limit: MAX_CAPTURES_PER_SWEEP,
        }),
    )? {
        ReadResult::Commerce(CommerceReadResult::CapturesOwed(due)) => due,
        _ => Vec::new(),
    };
    for (order_id, owed) in captures {
        match commerce::capture_owed(node, group, &order_id, &owed, deadline).await {
            Ok(_) => tracing::info!(group, order_id, "recorded a capture its payment flow left"),
            // Recorded, but owed back: the order was cancelled or expired.
            Err(commerce::CommerceError::Rejected(r))
                if r.code == crate::domain::RejectCode::IllegalTransition =>
            {
                tracing::info!(group, order_id, reason = %r, "recorded a capture its payment flow left");
            }
            Err(e) => {
                tracing::warn!(group, order_id, error = %e, "capture not recorded; will retry")
            }
        }
    }
    if let Err(e) = finish_cart_clears(node, group, now, deadline).await {
        tracing::warn!(group, error = %e, "owed cart clears not finished; will retry");
    }
    if let Err(e) = prune_aborted(node, group, now, deadline).await {
        tracing::warn!(group, error = %e, "aborted orders' tombstones not pruned; will retry");
    }
    Ok(())
}

/// Deletes the tombstones of transactions aborted longer than the
/// retention ago, up to [`MAX_PRUNE_BATCH`] per sweep (apply re-checks each).
async fn prune_aborted(
    node: &Node,
    group: GroupId,
    now: u64,
    deadline: Instant,
) -> Result<(), commerce::CommerceError> {
    let before_ms = now.saturating_sub(node.config.aborted_txn_retention_ms);
    let tombstones = match node.read_local(
        group,
        &ReadOp::Commerce(CommerceRead::AbortedBefore {
            before_ms,
            limit: MAX_PRUNE_BATCH as u32,
        }),
    )? {
        ReadResult::Commerce(CommerceReadResult::AbortedTombstones(t)) => t,
        _ => Vec::new(),
    };
    if tombstones.is_empty() {
        return Ok(());
    }
    let cmd = CommerceCommand::PruneAborted {
        tombstones,
        before_ms,
        now_ms: now,
    };
    commerce::propose(node, group, cmd, deadline).await?;
    Ok(())
}

fn local_ids(
    node: &Node,
    group: GroupId,
    op: CommerceRead,
) -> Result<Vec<String>, commerce::CommerceError> {
    match node.read_local(group, &ReadOp::Commerce(op))? {
        ReadResult::Commerce(CommerceReadResult::OrderIds(ids)) => Ok(ids),
        _ => Ok(Vec::new()),
    }
}

/// Empties the carts of checkouts older than [`CART_CLEAR_GRACE_MS`] that
/// still owe it (their node died between the order and the clear), then
/// deletes those entries in one command.
async fn finish_cart_clears(
    node: &Node,
    group: GroupId,
    now: u64,
    deadline: Instant,
) -> Result<(), commerce::CommerceError> {
    let due = match node.read_local(
        group,
        &ReadOp::Commerce(CommerceRead::DueCartClears {
            placed_by_ms: now.saturating_sub(CART_CLEAR_GRACE_MS),
            limit: MAX_CART_CLEARS_PER_SWEEP,
        }),
    )? {
        ReadResult::Commerce(CommerceReadResult::CartClearsOwed(due)) => due,
        _ => Vec::new(),
    };
    let Some(map) = node.cluster_map().filter(|_| !due.is_empty()) else {
        return Ok(());
    };
    // Each is a read (and rarely a clear) on the cart's shard: run them at
    // once, so the sweep takes one round trip (at most its deadline if a
    // cart's shard has no leader), not one per entry.
    let map = &map;
    let finished = futures::future::join_all(due.into_iter().map(|(order_id, owed)| async move {
        let res =
            commerce::finish_cart_clear(node, map, &owed.customer, owed.cart_version, deadline)
                .await;
        (order_id, res)
    }))
    .await;
    let mut done = Vec::with_capacity(finished.len());
    let mut failed = Vec::new();
    for (order_id, res) in finished {
        match res {
            Ok(()) => done.push(order_id),
            Err(e) => failed.push((order_id, e)),
        }
    }
    // One line for them all: they usually fail together (a shard down).
    if let Some((order_id, e)) = failed.first() {
        let n = failed.len();
        tracing::warn!(group, n, order_id, error = %e, "owed cart clears failed; will retry");
    }
    if !done.is_empty() {
        let cmd = CommerceCommand::CartClearsDone { order_ids: done };
        commerce::propose(node, group, cmd, deadline).await?;
    }
    Ok(())
}
