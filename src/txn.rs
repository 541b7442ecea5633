//! The 2PC coordinator of cross-shard orders, and its recovery.
//!
//! `place`: BeginTxn on the anchor (the order id's shard; PENDING, deadline)
//! → PrepareTxn on every participant (the SKUs' shards) in parallel → price
//! the YES votes → DecideTxn on the anchor (the commit point: one
//! compare-and-set that writes the order, or the abort) → settle the
//! participants (commit asynchronously after answering; release before
//! answering an abort). The coordinator keeps no state of its own: a retry
//! of the same order id continues where it stopped (every step is
//! idempotent), and `recover` — run by each shard leader's sweeper — aborts
//! PENDING records past their deadline, finishes owed settlements, and asks
//! the anchor about reservations held too long.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::commerce::{self, CommerceError, now_ms};
use crate::domain::order::price_lines;
use crate::domain::{RejectCode, Rejection};
use crate::node::{Node, NodeError, ReadOp, ReadResult};
use crate::router::ClusterMap;
use crate::sm::commerce::{
    CommerceCommand, CommerceRead, CommerceReadResult, CommerceResponse, Decision, OrderView,
    Settlement, TxnStatus, TxnView,
};
use crate::storage::keys::GroupId;

/// A settlement is left to its coordinator this long before recovery takes it.
const SETTLEMENT_GRACE_MS: u64 = 1_000;
/// Deadline of each step recovery proposes.
const RECOVERY_STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// In-flight records recovery looks at per shard per sweep.
const RECOVERY_BATCH: u32 = 64;

/// Crashes the process here when the named failpoint is set to `return`
/// (only in builds with the `failpoints` feature; tests use it to kill the
/// coordinator between two steps).
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |_| {
            tracing::error!(failpoint = $name, "failpoint: aborting the process");
            std::process::abort()
        });
    };
}

async fn propose_txn(
    node: &Node,
    shard: GroupId,
    cmd: CommerceCommand,
    deadline: Instant,
) -> Result<TxnView, CommerceError> {
    match commerce::propose(node, shard, cmd, deadline).await? {
        CommerceResponse::Txn(v) => Ok(*v),
        other => Err(NodeError::Internal(format!("expected a txn view, got {other:?}")).into()),
    }
}

fn aborted(view: &TxnView, order_id: &str) -> CommerceError {
    view.reason
        .clone()
        .unwrap_or_else(|| {
            Rejection::new(
                RejectCode::OrderAborted,
                format!("order {order_id} was aborted"),
            )
        })
        .into()
}

fn by_shard<'a>(
    map: &ClusterMap,
    skus: impl Iterator<Item = &'a String>,
) -> BTreeMap<GroupId, Vec<String>> {
    let mut out: BTreeMap<GroupId, Vec<String>> = BTreeMap::new();
    for sku in skus {
        out.entry(map.shard_of_sku(sku))
            .or_default()
            .push(sku.clone());
    }
    out
}

/// Places a cross-shard order (normalised `lines`). Committed: the order.
/// Aborted: the reason as a rejection (its held stock released first). A
/// step whose outcome is unknown: `OutcomeUnknown` — the order id tells the
/// truth later (`Orders.Get`, or the same `Place` again).
pub async fn place(
    node: &Arc<Node>,
    map: &Arc<ClusterMap>,
    order_id: &str,
    customer: &str,
    lines: &[(String, u32)],
    deadline: Instant,
) -> Result<OrderView, CommerceError> {
    let anchor = map.shard_of_order(order_id);
    let now = now_ms();
    let begin = CommerceCommand::BeginTxn {
        order_id: order_id.to_string(),
        customer: customer.to_string(),
        lines: lines.to_vec(),
        now_ms: now,
        deadline_ms: now.saturating_add(node.config.txn_timeout_ms),
    };
    let view = propose_txn(node, anchor, begin, deadline).await?;
    match view.status {
        TxnStatus::Committed => {
            return view
                .order
                .ok_or_else(|| NodeError::Internal("committed without an order".into()).into());
        }
        TxnStatus::Aborted => return Err(aborted(&view, order_id)),
        TxnStatus::Pending => {}
    }
    crash_point!("txn-after-begin");

    let qty: BTreeMap<&str, u32> = lines.iter().map(|(s, q)| (s.as_str(), *q)).collect();
    let shards = by_shard(map, lines.iter().map(|(s, _)| s));
    let prepares = shards.iter().map(|(shard, skus)| {
        let cmd = CommerceCommand::PrepareTxn {
            order_id: order_id.to_string(),
            lines: skus
                .iter()
                .map(|s| (s.clone(), qty.get(s.as_str()).copied().unwrap_or(0)))
                .collect(),
            now_ms: now,
        };
        commerce::propose(node, *shard, cmd, deadline)
    });
    let votes = futures::future::join_all(prepares).await;
    crash_point!("txn-after-prepare");

    let mut products = BTreeMap::new();
    let mut no: Option<Rejection> = None;
    for vote in votes {
        match vote {
            Ok(CommerceResponse::Prepared(ps)) => {
                products.extend(ps.into_iter().map(|p| (p.sku.clone(), p)));
            }
            Err(CommerceError::Rejected(r)) => {
                no.get_or_insert(r);
            }
            Ok(other) => {
                return Err(NodeError::Internal(format!("unexpected vote {other:?}")).into());
            }
            // No answer from a participant: leave the record PENDING. A retry
            // with the same id continues it; otherwise recovery aborts it at
            // its deadline and releases whatever was held.
            Err(e) => {
                return Err(NodeError::OutcomeUnknown(format!(
                    "order {order_id} is in progress (a participant did not answer: {e}); \
                     place it again with the same id or read it with Orders.Get"
                ))
                .into());
            }
        }
    }
    let decision = match no {
        Some(r) => Decision::Abort(r),
        None => {
            let priced: Result<Vec<_>, Rejection> = lines
                .iter()
                .map(|(sku, q)| {
                    products.get(sku).cloned().map(|p| (p, *q)).ok_or_else(|| {
                        Rejection::new(RejectCode::Inconsistent, format!("no vote for {sku}"))
                    })
                })
                .collect();
            match priced.and_then(|p| price_lines(&p)) {
                Ok((lines, currency, total_minor)) => Decision::Commit {
                    lines,
                    currency,
                    total_minor,
                    expires_at_ms: now_ms().saturating_add(node.config.order_payment_timeout_ms),
                },
                Err(r) => Decision::Abort(r),
            }
        }
    };
    let decide = CommerceCommand::DecideTxn {
        order_id: order_id.to_string(),
        decision,
        now_ms: now_ms(),
    };
    let view = propose_txn(node, anchor, decide, deadline).await?;
    crash_point!("txn-after-decide");
    let skus: Vec<String> = lines.iter().map(|(s, _)| s.clone()).collect();
    match view.status {
        TxnStatus::Committed => {
            let order = view
                .order
                .ok_or_else(|| NodeError::Internal("committed without an order".into()))?;
            // Participants learn the outcome after the client does.
            let (node, map, id) = (node.clone(), map.clone(), order_id.to_string());
            tokio::spawn(async move {
                let deadline = Instant::now() + RECOVERY_STEP_TIMEOUT;
                if let Err(e) = settle(&node, &map, &id, &skus, Settlement::Commit, deadline).await
                {
                    tracing::info!(order_id = %id, error = %e, "commit settlement left to recovery");
                }
            });
            Ok(order)
        }
        TxnStatus::Aborted => {
            // Release before answering, so the caller sees stock as it was.
            if let Err(e) = settle(node, map, order_id, &skus, Settlement::Release, deadline).await
            {
                tracing::info!(order_id, error = %e, "abort settlement left to recovery");
            }
            Err(aborted(&view, order_id))
        }
        TxnStatus::Pending => {
            Err(NodeError::Internal("decide left the record pending".into()).into())
        }
    }
}

/// Applies `outcome` on every participant of `order_id`, then tells the
/// anchor the settlement is done.
pub async fn settle(
    node: &Node,
    map: &ClusterMap,
    order_id: &str,
    skus: &[String],
    outcome: Settlement,
    deadline: Instant,
) -> Result<(), CommerceError> {
    let resolves = by_shard(map, skus.iter()).into_iter().map(|(shard, skus)| {
        let cmd = CommerceCommand::ResolveTxn {
            order_id: order_id.to_string(),
            skus,
            outcome,
        };
        commerce::propose(node, shard, cmd, deadline)
    });
    for res in futures::future::join_all(resolves).await {
        res?;
    }
    let done = CommerceCommand::SettlementDone {
        order_id: order_id.to_string(),
        outcome,
    };
    commerce::propose(node, map.shard_of_order(order_id), done, deadline).await?;
    Ok(())
}

/// The state of `order_id`'s transaction on its anchor, linearizably.
pub async fn txn_view(
    node: &Node,
    map: &ClusterMap,
    order_id: &str,
    deadline: Instant,
) -> Result<Option<TxnView>, CommerceError> {
    let op = CommerceRead::Txn {
        order_id: order_id.to_string(),
    };
    match commerce::read(node, map.shard_of_order(order_id), op, true, deadline).await? {
        CommerceReadResult::Txn(v) => Ok(v.map(|v| *v)),
        other => Err(NodeError::Internal(format!("unexpected {other:?}")).into()),
    }
}

/// What recovery found and did on one shard in one sweep.
#[derive(Debug, Default, Clone, Copy)]
pub struct RecoveryStats {
    /// PENDING records aborted past their deadline.
    pub aborted: u32,
    /// Settlements finished.
    pub settled: u32,
    /// Held reservations resolved by asking the anchor.
    pub resolved: u32,
}

/// One recovery sweep of `group`, which this node leads.
pub async fn recover(
    node: &Node,
    map: &ClusterMap,
    group: GroupId,
) -> Result<RecoveryStats, CommerceError> {
    let mut stats = RecoveryStats::default();
    let in_flight = match node.read_local(
        group,
        &ReadOp::Commerce(CommerceRead::InFlight {
            limit: RECOVERY_BATCH,
        }),
    )? {
        ReadResult::Commerce(CommerceReadResult::InFlight(f)) => *f,
        _ => return Ok(stats),
    };
    let now = now_ms();
    let deadline = Instant::now() + RECOVERY_STEP_TIMEOUT;
    // Anchor: undecided past the deadline → abort (its release becomes owed).
    for (order_id, rec) in &in_flight.pending {
        if now >= rec.deadline_ms {
            let cmd = CommerceCommand::AbortTxn {
                order_id: order_id.clone(),
                now_ms: now,
            };
            if propose_txn(node, group, cmd, deadline).await?.status == TxnStatus::Aborted {
                stats.aborted += 1;
            }
        }
    }
    // Anchor: settlements whose coordinator did not finish them.
    for (order_id, entry) in &in_flight.settlements {
        if now.saturating_sub(entry.since_ms) >= SETTLEMENT_GRACE_MS {
            settle(node, map, order_id, &entry.skus, entry.outcome, deadline).await?;
            stats.settled += 1;
        }
    }
    // Participant: reservations held past the transaction timeout → ask the anchor.
    let held_for = node
        .config
        .txn_timeout_ms
        .saturating_add(SETTLEMENT_GRACE_MS);
    for (order_id, held) in &in_flight.held {
        if now.saturating_sub(held.prepared_ms) < held_for {
            continue;
        }
        // Aborts it if it is still undecided past its deadline (or was never
        // begun); otherwise returns the decision.
        let cmd = CommerceCommand::AbortTxn {
            order_id: order_id.clone(),
            now_ms: now,
        };
        let view = propose_txn(node, map.shard_of_order(order_id), cmd, deadline).await?;
        let outcome = match view.status {
            TxnStatus::Committed => Settlement::Commit,
            TxnStatus::Aborted => Settlement::Release,
            TxnStatus::Pending => continue,
        };
        let cmd = CommerceCommand::ResolveTxn {
            order_id: order_id.clone(),
            skus: held.skus.clone(),
            outcome,
        };
        commerce::propose(node, group, cmd, deadline).await?;
        stats.resolved += 1;
    }
    Ok(stats)
}
