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
//! PENDING records past their deadline, finishes owed settlements (an
//! abort's, a cancel's, a ship's: the anchor records those), and asks the
//! anchor about reservations held too long (which is how a commit the
//! coordinator did not settle is settled: the anchor owes none).

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::clock::now_ms;
use crate::commerce::{self, CommerceError};
use crate::domain::order::price_lines;
use crate::domain::{RejectCode, Rejection};
use crate::node::{Node, NodeError, ReadOp, ReadResult};
use crate::router::ClusterMap;
use crate::sm::Fence;
use crate::sm::commerce::{
    CommerceCommand, CommerceRead, CommerceReadResult, CommerceResponse, Decision, OrderView,
    ResolveItem, Settlement, TxnBegin, TxnStatus, TxnView, same_request,
};
use crate::storage::keys::GroupId;

/// A settlement is left to its coordinator this long before recovery takes it.
const SETTLEMENT_GRACE_MS: u64 = 1_000;
/// Deadline of each step recovery proposes.
const RECOVERY_STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// In-flight records recovery looks at per shard per sweep.
const RECOVERY_BATCH: u32 = 64;

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

/// What a cross-shard order is placed with.
#[derive(Clone, Copy, Debug)]
pub struct PlaceTxn<'a> {
    /// Order id = transaction id.
    pub order_id: &'a str,
    /// Customer.
    pub customer: &'a str,
    /// Normalised lines (SKU, quantity).
    pub lines: &'a [(String, u32)],
    /// Checked by every participant's prepare, if given.
    pub fence: Option<&'a Fence>,
    /// Placed by a checkout: the version of the cart it read (kept in the
    /// order).
    pub checkout_cart_version: Option<u64>,
}

/// Places a cross-shard order (normalised `lines`). Committed: the order.
/// Aborted: the reason as a rejection (its held stock released first). A
/// step whose outcome is unknown: `OutcomeUnknown` — the order id tells the
/// truth later (`Orders.Get`, or the same `Place` again).
///
/// BeginTxn and the prepares go out together: the anchor, when it holds lines
/// too, gets one `PrepareTxn` carrying the begin (one write instead of two),
/// unless the order is fenced: `fence` guards every prepare (a stale token is
/// a NO vote) and the begin then goes alone.
/// Prepares may reach a participant before the record exists; that is safe
/// because recovery only acts on a hold after the timeout, and then through
/// the anchor (`AbortTxn` writes an aborted record if there is none, which a
/// late begin or decide finds).
pub async fn place(
    node: &Arc<Node>,
    map: &Arc<ClusterMap>,
    settler: &Settler,
    order: PlaceTxn<'_>,
    deadline: Instant,
) -> Result<OrderView, CommerceError> {
    let PlaceTxn {
        order_id,
        customer,
        lines,
        fence,
        checkout_cart_version,
    } = order;
    let anchor = map.shard_of_order(order_id);
    let now = now_ms();
    let begin = TxnBegin {
        customer: customer.to_string(),
        lines: lines.to_vec(),
        deadline_ms: now.saturating_add(node.config.txn_timeout_ms),
    };
    let qty: BTreeMap<&str, u32> = lines.iter().map(|(s, q)| (s.as_str(), *q)).collect();
    let shards = by_shard(map, lines.iter().map(|(s, _)| s));
    let mut steps = Vec::new();
    // A fenced prepare may be refused whole, so the begin then travels alone
    // (unguarded): the record must exist for the abort to be decided.
    let fuse_begin = fence.is_none() && shards.contains_key(&anchor);
    if !fuse_begin {
        let cmd = CommerceCommand::BeginTxn {
            order_id: order_id.to_string(),
            customer: begin.customer.clone(),
            lines: begin.lines.clone(),
            now_ms: now,
            deadline_ms: begin.deadline_ms,
        };
        steps.push((anchor, cmd));
    }
    for (shard, skus) in &shards {
        let cmd = CommerceCommand::PrepareTxn {
            order_id: order_id.to_string(),
            lines: skus
                .iter()
                .map(|s| (s.clone(), qty.get(s.as_str()).copied().unwrap_or(0)))
                .collect(),
            now_ms: now,
            begin: (fuse_begin && *shard == anchor).then(|| begin.clone()),
        };
        steps.push((*shard, cmd));
    }
    let answers = futures::future::join_all(steps.into_iter().map(|(shard, cmd)| async move {
        // A fence is a prepare condition: each participant checks it with its
        // vote (a stale token is a NO); the begin alone is not guarded.
        let guard = matches!(cmd, CommerceCommand::PrepareTxn { .. })
            .then_some(fence)
            .flatten();
        let res = commerce::propose_fenced(node, shard, cmd, guard, deadline).await;
        if shard == anchor && res.is_ok() {
            crash_point!("txn-after-begin");
        }
        res
    }))
    .await;
    crash_point!("txn-after-prepare");

    let mut products = BTreeMap::new();
    let mut no: Option<Rejection> = None;
    for answer in answers {
        match answer {
            Ok(CommerceResponse::Prepared(ps)) => {
                products.extend(ps.into_iter().map(|p| (p.sku.clone(), p)));
            }
            // The begin found the transaction decided (a retry) or still open.
            Ok(CommerceResponse::Txn(view)) => match view.status {
                TxnStatus::Committed => {
                    return view.order.ok_or_else(|| {
                        NodeError::Internal("committed without an order".into()).into()
                    });
                }
                TxnStatus::Aborted => return Err(aborted(&view, order_id)),
                TxnStatus::Pending => {}
            },
            // The id is another order's (committed, or being placed with
            // other lines): deciding would abort that one. Stock this attempt's
            // prepares held under the id is released by recovery, through
            // that order's decision (`recover`).
            Err(CommerceError::Rejected(r)) if r.code == RejectCode::OrderIdReused => {
                return Err(r.into());
            }
            Err(CommerceError::Rejected(r)) => {
                no.get_or_insert(r);
            }
            Ok(other) => {
                return Err(NodeError::Internal(format!("unexpected vote {other:?}")).into());
            }
            // No answer: leave the transaction open. A retry with the same id
            // continues it; otherwise recovery aborts it at its deadline and
            // releases whatever was held.
            Err(e) => {
                return Err(NodeError::OutcomeUnknown(format!(
                    "order {order_id} is in progress (a step did not answer: {e}); \
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
                    checkout_cart_version,
                },
                Err(r) => Decision::Abort(r),
            }
        }
    };
    delay_point!("txn-before-decide");
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
            // Our decision lost to another order under this id (a participant
            // voted no because it holds that order's lines): not ours.
            if !same_request(&order.order.record, customer, lines) {
                return Err(Rejection::new(
                    RejectCode::OrderIdReused,
                    format!("order id {order_id} is already used by another order"),
                )
                .into());
            }
            // Participants learn the outcome after the client does; the
            // anchor's own lines, prepared with the begin, have no held entry
            // to drop.
            let skus = if fuse_begin {
                skus.into_iter()
                    .filter(|s| map.shard_of_sku(s) != anchor)
                    .collect()
            } else {
                skus
            };
            settler.settle_later(order_id, skus, Settlement::Commit);
            Ok(order)
        }
        TxnStatus::Aborted => {
            // Release before answering, so the caller sees stock as it was.
            if let Err(e) = settler.settle(order_id, skus, Settlement::Abort).await {
                tracing::info!(order_id, error = %e, "abort settlement left to recovery");
            }
            Err(aborted(&view, order_id))
        }
        TxnStatus::Pending => {
            Err(NodeError::Internal("decide left the record pending".into()).into())
        }
    }
}

/// One order's settlement to apply on its participants.
#[derive(Clone, Debug)]
pub struct SettleJob {
    /// Order id.
    pub order_id: String,
    /// Every SKU of the order.
    pub skus: Vec<String>,
    /// What to apply.
    pub outcome: Settlement,
    /// Whether the anchor records it as owed (`S`), to be cleared once the
    /// participants applied it: every settlement but a coordinator's commit.
    pub owed_on_anchor: bool,
}

impl SettleJob {
    /// A settlement the coordinator or an order transition starts: the
    /// anchor owes it unless it is a commit (`DecideTxn` records none).
    fn new(order_id: &str, skus: Vec<String>, outcome: Settlement) -> SettleJob {
        SettleJob {
            order_id: order_id.to_string(),
            skus,
            outcome,
            owed_on_anchor: outcome != Settlement::Commit,
        }
    }
}

/// Applies many orders' settlements with one `ResolveTxn` per participant
/// shard and one `SettlementDone` per anchor shard for those it owes;
/// returns, per job, whether it was fully applied (failed ones stay owed or
/// held: recovery retries them).
pub async fn settle_many(
    node: &Node,
    map: &ClusterMap,
    jobs: &[SettleJob],
    deadline: Instant,
) -> Vec<Result<(), String>> {
    let mut per_shard: BTreeMap<GroupId, Vec<ResolveItem>> = BTreeMap::new();
    for job in jobs {
        for shard in by_shard(map, job.skus.iter()).into_keys() {
            per_shard.entry(shard).or_default().push(ResolveItem {
                order_id: job.order_id.clone(),
                outcome: job.outcome,
            });
        }
    }
    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    let resolves = per_shard.into_iter().map(|(shard, items)| async move {
        let ids: Vec<String> = items.iter().map(|i| i.order_id.clone()).collect();
        let cmd = CommerceCommand::ResolveTxn {
            items,
            now_ms: now_ms(),
        };
        (ids, commerce::propose(node, shard, cmd, deadline).await)
    });
    for (ids, res) in futures::future::join_all(resolves).await {
        match res {
            Ok(CommerceResponse::Settled { failed: refused }) => {
                for (id, why) in refused {
                    failed.insert(id, why.message);
                }
            }
            Ok(other) => {
                for id in ids {
                    failed.insert(id, format!("unexpected {other:?}"));
                }
            }
            Err(e) => {
                for id in ids {
                    failed.insert(id, e.to_string());
                }
            }
        }
    }
    let mut per_anchor: BTreeMap<GroupId, Vec<(String, Settlement)>> = BTreeMap::new();
    for job in jobs
        .iter()
        .filter(|j| j.owed_on_anchor && !failed.contains_key(&j.order_id))
    {
        per_anchor
            .entry(map.shard_of_order(&job.order_id))
            .or_default()
            .push((job.order_id.clone(), job.outcome));
    }
    let dones = per_anchor.into_iter().map(|(shard, items)| async move {
        let ids: Vec<String> = items.iter().map(|(id, _)| id.clone()).collect();
        let cmd = CommerceCommand::SettlementDone { items };
        (ids, commerce::propose(node, shard, cmd, deadline).await)
    });
    for (ids, res) in futures::future::join_all(dones).await {
        if let Err(e) = res {
            for id in ids {
                failed.insert(id, e.to_string());
            }
        }
    }
    jobs.iter()
        .map(|j| match failed.get(&j.order_id) {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        })
        .collect()
}

/// Most settlements one batch carries.
const MAX_SETTLE_BATCH: usize = 256;
/// Settlements queued at most (beyond, they are left to recovery).
const MAX_SETTLE_QUEUE: usize = 16_384;

/// A queued settlement and who waits for it.
type QueuedJob = (SettleJob, Option<oneshot::Sender<Result<(), String>>>);

/// Batches the settlements of the orders this node coordinates: whatever is
/// queued while a batch is applied goes out together in the next one, so under
/// load one `ResolveTxn` per shard covers many orders.
pub struct Settler {
    tx: mpsc::Sender<QueuedJob>,
}

impl Settler {
    /// Starts the batching task over `node`'s groups.
    pub fn start(node: Weak<Node>) -> Settler {
        let (tx, mut rx) = mpsc::channel::<QueuedJob>(MAX_SETTLE_QUEUE);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_SETTLE_BATCH {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                let Some(node) = node.upgrade() else { return };
                let Some(map) = node.cluster_map() else {
                    continue;
                };
                let (jobs, waiters): (Vec<SettleJob>, Vec<_>) = batch.into_iter().unzip();
                let deadline = Instant::now() + RECOVERY_STEP_TIMEOUT;
                let results = settle_many(&node, &map, &jobs, deadline).await;
                for ((job, waiter), res) in jobs.iter().zip(waiters).zip(results) {
                    if let Err(e) = &res {
                        tracing::info!(order_id = %job.order_id, error = %e, "settlement left to recovery");
                    }
                    if let Some(w) = waiter {
                        let _ = w.send(res);
                    }
                }
            }
        });
        Settler { tx }
    }

    /// Queues a settlement and waits until it is applied (or has failed).
    pub async fn settle(
        &self,
        order_id: &str,
        skus: Vec<String>,
        outcome: Settlement,
    ) -> Result<(), CommerceError> {
        let (done, wait) = oneshot::channel();
        let job = SettleJob::new(order_id, skus, outcome);
        self.tx
            .try_send((job, Some(done)))
            .map_err(|_| NodeError::Unavailable("settlement queue full".into()))?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(NodeError::Unavailable(e).into()),
            Err(_) => Err(NodeError::Unavailable("settler stopped".into()).into()),
        }
    }

    /// Queues a settlement without waiting (if the queue is full, recovery
    /// applies it later: the anchor keeps it owed, or — a commit — the
    /// participants find their holds).
    pub fn settle_later(&self, order_id: &str, skus: Vec<String>, outcome: Settlement) {
        let job = SettleJob::new(order_id, skus, outcome);
        if self.tx.try_send((job, None)).is_err() {
            tracing::info!(order_id, "settlement queue full; left to recovery");
        }
    }
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

/// Whether the committed order `view` holds stock on `group`. A hold of a
/// committed order on a shard where the order has lines is its own: that
/// shard voted yes for it, so its reservation has exactly those lines, and a
/// reservation under an order id is never written twice while it matters:
/// settled ones stay as tombstones, and the only ones pruned are an aborted
/// attempt's, whose id no order had (a later attempt that commits under it
/// wrote its own). Without an order to look at, keep the hold.
fn commits_here(view: &TxnView, map: &ClusterMap, group: GroupId) -> bool {
    view.order.as_ref().is_none_or(|o| {
        o.order
            .record
            .lines
            .iter()
            .any(|l| map.shard_of_sku(&l.sku) == group)
    })
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
    let owed: Vec<SettleJob> = in_flight
        .settlements
        .iter()
        .filter(|(_, e)| now.saturating_sub(e.since_ms) >= SETTLEMENT_GRACE_MS)
        .map(|(order_id, e)| SettleJob {
            order_id: order_id.clone(),
            skus: e.skus.clone(),
            outcome: e.outcome,
            owed_on_anchor: true,
        })
        .collect();
    if !owed.is_empty() {
        let results = settle_many(node, map, &owed, deadline).await;
        stats.settled += results.iter().filter(|r| r.is_ok()).count() as u32;
    }
    // Participant: reservations held past the transaction timeout → ask the anchor.
    let held_for = node
        .config
        .txn_timeout_ms
        .saturating_add(SETTLEMENT_GRACE_MS);
    let mut items = Vec::new();
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
            TxnStatus::Committed if commits_here(&view, map, group) => Settlement::Commit,
            // Committed, but without a line here: the hold is a stray one, from
            // a Place that reused the order's id with other SKUs (its prepares
            // go out beside the begin that refuses it).
            TxnStatus::Committed => Settlement::Release,
            TxnStatus::Aborted => Settlement::Abort,
            TxnStatus::Pending => continue,
        };
        items.push(ResolveItem {
            order_id: order_id.clone(),
            outcome,
        });
    }
    if !items.is_empty() {
        stats.resolved += items.len() as u32;
        let cmd = CommerceCommand::ResolveTxn { items, now_ms: now };
        commerce::propose(node, group, cmd, deadline).await?;
    }
    Ok(stats)
}
