//! `shopkv.v1.Lock`: fair locks in the meta group. Acquire joins the queue (one
//! Raft write) and, if it must wait, follows the lock's changes in this node's
//! watch hub until its session holds it or the wait ends.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use super::error::{rejection_status, to_status};
use super::{caller_deadline, deadline_of};
use crate::codec;
use crate::node::{MAX_FORWARD_HOPS, Node, NodeError, ReadOp, ReadResult};
use crate::proto;
use crate::proto::lock_server::Lock;
use crate::router::META_GROUP;
use crate::sm::lock::{LockCommand, LockMode, LockRecord, LockResponse};
use crate::sm::{Command, Response as SmResponse};
use crate::storage::keys;

/// Longest lock name, in bytes.
pub const MAX_LOCK_NAME_BYTES: usize = 256;
/// Longest wait of one Acquire.
pub const MAX_LOCK_WAIT_MS: u64 = 600_000;
/// How often a waiting Acquire reads the lock linearizably, in case this
/// node's applied changes fall behind (a partitioned follower).
const RECHECK_EVERY: Duration = Duration::from_millis(1000);

/// The Lock service.
pub struct LockService {
    node: Arc<Node>,
}

impl LockService {
    /// A service over `node`.
    pub fn new(node: Arc<Node>) -> LockService {
        LockService { node }
    }

    fn default_timeout(&self) -> Duration {
        Duration::from_millis(self.node.config.request_timeout_ms)
    }
}

/// Proposes a lock command to the meta group; a rejection becomes its status.
pub async fn propose_lock(
    node: &Node,
    cmd: LockCommand,
    deadline: Instant,
) -> Result<LockResponse, Status> {
    match node
        .propose(META_GROUP, Command::Lock(cmd), deadline, MAX_FORWARD_HOPS)
        .await
        .map_err(to_status)?
    {
        SmResponse::Lock(LockResponse::Rejected(r)) => Err(rejection_status(r)),
        SmResponse::Lock(r) => Ok(r),
        other => Err(to_status(NodeError::Internal(format!(
            "unexpected result {other:?}"
        )))),
    }
}

/// Reads lock `name` linearizably.
pub async fn read_lock(node: &Node, name: &str, deadline: Instant) -> Result<LockRecord, Status> {
    let op = ReadOp::Lock {
        name: name.to_string(),
    };
    match node
        .read(META_GROUP, op, true, deadline, MAX_FORWARD_HOPS)
        .await
        .map_err(to_status)?
    {
        ReadResult::Lock(r) => Ok(r),
        _ => Err(to_status(NodeError::Internal("wrong read result".into()))),
    }
}

/// The join of an Acquire or Campaign, proposed as a task of its own.
type JoinTask = tokio::task::JoinHandle<Result<LockResponse, Status>>;

/// What a waiting Acquire or Campaign leaves behind if its handler is dropped
/// (the caller's deadline passed or it went away: hyper drops the handler of a
/// reset stream): a queue entry whose session would come to hold the lock
/// although its client was told nothing. Armed from before the join until the
/// outcome is the caller's; dropped armed, it proposes this call's leave —
/// after the join, if that is still in flight: a leave applied before its
/// join would find nothing to remove, and the join would then queue the
/// session for good.
struct LeaveOnDrop {
    node: Arc<Node>,
    name: String,
    session: u64,
    call_id: u64,
    armed: bool,
    join: Option<JoinTask>,
}

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let node = Arc::clone(&self.node);
        let leave = LockCommand::Leave {
            name: std::mem::take(&mut self.name),
            session: self.session,
            call_id: self.call_id,
        };
        let join = self.join.take();
        rt.spawn(async move {
            if let Some(join) = join {
                // Whatever it came to: only its end matters here.
                let _ = join.await;
            }
            delay_point!("lock-before-leave");
            leave_for_gone_caller(&node, leave).await;
        });
    }
}

/// How long a leave on a gone caller's behalf is retried while the meta group
/// cannot commit it (an election, a leader that died with it in flight).
const LEAVE_RETRY_FOR: Duration = Duration::from_secs(30);
/// The longest pause between two such tries.
const LEAVE_RETRY_MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Proposes `leave` until it is applied. Nobody waits for its answer, so
/// UNAVAILABLE (no leader, or a leader that died with it in flight) is
/// retried: a leave given up would leave the session queued, and the lock
/// would later pass to it while its client believes it does not hold it.
/// A retry after an unknown outcome is safe: the leave removes the entry
/// only while it is its call's, so never one a later call took over.
async fn leave_for_gone_caller(node: &Node, leave: LockCommand) {
    let timeout = Duration::from_millis(node.config.request_timeout_ms);
    let give_up_at = Instant::now() + LEAVE_RETRY_FOR;
    let mut backoff = Duration::from_millis(50);
    loop {
        let e = match propose_lock(node, leave.clone(), Instant::now() + timeout).await {
            Ok(_) => return,
            Err(e) if e.code() == tonic::Code::NotFound => return,
            Err(e) => e,
        };
        if e.code() != tonic::Code::Unavailable || Instant::now() + backoff >= give_up_at {
            tracing::warn!(error = %e, "leaving a lock queue after the caller went away failed");
            return;
        }
        tracing::debug!(error = %e, "leaving a lock queue: retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(LEAVE_RETRY_MAX_BACKOFF);
    }
}

/// How long before the caller's own deadline a wait ends, to leave the queue
/// and answer DEADLINE_EXCEEDED while the caller still listens.
const LEAVE_MARGIN: Duration = Duration::from_millis(250);

/// A fresh id for one Acquire or Campaign call: a per-process random base
/// (std's `RandomState` is seeded by the OS) plus a counter.
fn new_call_id() -> u64 {
    static BASE: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| std::hash::RandomState::new().hash_one(std::process::id()));
    base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Proposes `join(call_id)` (an Acquire or Campaign of `session` on `name`
/// by this call) and waits up to `wait_ms` (and no later than shortly before
/// `caller_deadline`) until the session holds: its token. Out of time, the
/// session leaves the queue: FAILED_PRECONDITION when `wait_ms` is 0 (a
/// try-lock), DEADLINE_EXCEEDED otherwise. If the handler is dropped first,
/// it leaves all the same. Either leave removes the entry only while it is
/// this call's (a later call with the same session takes it over).
pub async fn acquire_or_leave(
    node: &Arc<Node>,
    name: &str,
    session: u64,
    join: impl FnOnce(u64) -> LockCommand,
    deadline: Instant,
    wait_ms: u64,
    caller_deadline: Option<Instant>,
) -> Result<u64, Status> {
    let call_id = new_call_id();
    let join = join(call_id);
    let asked_until = Instant::now() + Duration::from_millis(wait_ms);
    let wait_until = match caller_deadline {
        Some(gives_up) => asked_until.min(gives_up.checked_sub(LEAVE_MARGIN).unwrap_or(gives_up)),
        None => asked_until,
    };
    let timeout = Duration::from_millis(node.config.request_timeout_ms);
    // Follow the lock's changes from before the proposal so no grant is missed.
    let mut cursor = node.watches.cursor(META_GROUP, 0);
    let joining = {
        let node = Arc::clone(node);
        tokio::spawn(async move {
            delay_point!("lock-before-join");
            propose_lock(&node, join, deadline).await
        })
    };
    let mut guard = LeaveOnDrop {
        node: Arc::clone(node),
        name: name.to_string(),
        session,
        call_id,
        armed: true,
        join: Some(joining),
    };
    let Some(task) = guard.join.as_mut() else {
        return Err(Status::internal("lock join not started"));
    };
    let joined = task.await;
    // Finished: the guard must not wait for it again.
    guard.join = None;
    let joined =
        joined.map_err(|e| to_status(NodeError::Internal(format!("lock join task: {e}"))))??;
    if let LockResponse::Held { token } = joined {
        guard.armed = false;
        return Ok(token);
    }
    // Waiting: woken by the lock's changes as this node applies them; a
    // linearizable look now and then covers a node that falls behind.
    let key = keys::lock_key(name);
    let mut next_check = Instant::now() + RECHECK_EVERY;
    loop {
        let now = Instant::now();
        if now >= wait_until {
            break;
        }
        let mut seen: Option<LockRecord> = None;
        if now >= next_check {
            seen = Some(read_lock(node, name, now + timeout).await?);
            next_check = Instant::now() + RECHECK_EVERY;
        } else {
            let wake = wait_until.min(next_check);
            match tokio::time::timeout_at(wake.into(), cursor.next_batch()).await {
                Err(_) => continue,
                Ok(Err(_compacted)) => {
                    cursor = node.watches.cursor(META_GROUP, 0);
                    next_check = Instant::now();
                    continue;
                }
                Ok(Ok(batch)) => {
                    for change in batch.iter().flat_map(|e| &e.changes) {
                        if change.record_key == key {
                            seen = Some(match &change.value {
                                Some(b) => codec::decode(b)
                                    .map_err(|e| to_status(NodeError::Internal(e.to_string())))?,
                                None => LockRecord::default(),
                            });
                        }
                    }
                }
            }
        }
        let Some(mut rec) = seen else { continue };
        if !rec.queue.iter().any(|e| e.session == session) {
            // The cursor also shows changes applied before this session joined:
            // only a read after the join can say it left.
            rec = read_lock(node, name, Instant::now() + timeout).await?;
        }
        match rec.queue.iter().find(|e| e.session == session) {
            Some(e) if e.token != 0 => {
                guard.armed = false;
                return Ok(e.token);
            }
            Some(_) => {}
            None => {
                guard.armed = false;
                return Err(Status::not_found(format!(
                    "session {session} left the queue of {name} (closed or expired)"
                )));
            }
        }
    }
    // Out of time: leave the queue (if it came to hold meanwhile, that is released too).
    let leave = LockCommand::Leave {
        name: name.to_string(),
        session,
        call_id,
    };
    propose_lock(node, leave, Instant::now() + timeout).await?;
    guard.armed = false;
    if wait_ms == 0 {
        return Err(Status::failed_precondition(format!(
            "lock {name} is held by another session"
        )));
    }
    if wait_until < asked_until {
        return Err(Status::deadline_exceeded(format!(
            "lock {name} not acquired before the call's deadline"
        )));
    }
    Err(Status::deadline_exceeded(format!(
        "lock {name} not acquired within {wait_ms} ms"
    )))
}

/// INVALID_ARGUMENT unless `name` is a valid lock name.
pub fn check_name(name: &str) -> Result<(), Status> {
    if name.is_empty() || name.len() > MAX_LOCK_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "lock name must be 1..={MAX_LOCK_NAME_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

fn mode_of(m: i32) -> Result<LockMode, Status> {
    match proto::LockMode::try_from(m) {
        Ok(proto::LockMode::Exclusive) => Ok(LockMode::Exclusive),
        Ok(proto::LockMode::Shared) => Ok(LockMode::Shared),
        Err(_) => Err(Status::invalid_argument(format!("unknown lock mode {m}"))),
    }
}

fn entry_msg(e: &crate::sm::lock::LockEntry) -> proto::LockEntry {
    proto::LockEntry {
        session_id: e.session,
        mode: match e.mode {
            LockMode::Exclusive => proto::LockMode::Exclusive,
            LockMode::Shared => proto::LockMode::Shared,
        } as i32,
        fencing_token: e.token,
    }
}

/// A lock record → proto: holders, then waiters in queue order.
pub fn lock_state_msg(name: String, rec: &LockRecord) -> proto::LockState {
    let (holders, waiters): (Vec<_>, Vec<_>) = rec.queue.iter().partition(|e| e.token != 0);
    proto::LockState {
        name,
        holders: holders.into_iter().map(entry_msg).collect(),
        waiters: waiters.into_iter().map(entry_msg).collect(),
        last_token: rec.last_token,
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    #[tracing::instrument(name = "lock.acquire", skip_all, fields(name = %req.get_ref().name, session = req.get_ref().session_id))]
    async fn acquire(
        &self,
        req: Request<proto::AcquireRequest>,
    ) -> Result<Response<proto::AcquireResponse>, Status> {
        let deadline = deadline_of(&req, self.default_timeout());
        let gives_up = caller_deadline(&req);
        let r = req.into_inner();
        check_name(&r.name)?;
        let mode = mode_of(r.mode)?;
        if r.wait_timeout_ms > MAX_LOCK_WAIT_MS {
            return Err(Status::invalid_argument(format!(
                "wait_timeout_ms must be at most {MAX_LOCK_WAIT_MS}"
            )));
        }
        let join = |call_id| LockCommand::Acquire {
            name: r.name.clone(),
            session: r.session_id,
            mode,
            call_id,
        };
        let token = acquire_or_leave(
            &self.node,
            &r.name,
            r.session_id,
            join,
            deadline,
            r.wait_timeout_ms,
            gives_up,
        )
        .await?;
        Ok(Response::new(proto::AcquireResponse {
            fencing_token: token,
        }))
    }

    #[tracing::instrument(name = "lock.release", skip_all, fields(name = %req.get_ref().name, session = req.get_ref().session_id))]
    async fn release(
        &self,
        req: Request<proto::ReleaseRequest>,
    ) -> Result<Response<proto::ReleaseResponse>, Status> {
        let deadline = deadline_of(&req, self.default_timeout());
        let r = req.into_inner();
        check_name(&r.name)?;
        let cmd = LockCommand::Release {
            name: r.name.clone(),
            session: r.session_id,
        };
        match propose_lock(&self.node, cmd, deadline).await? {
            LockResponse::Released { existed: true } => {
                Ok(Response::new(proto::ReleaseResponse {}))
            }
            _ => Err(Status::not_found(format!(
                "session {} is not in the queue of {}",
                r.session_id, r.name
            ))),
        }
    }

    #[tracing::instrument(name = "lock.inspect", skip_all, fields(name = %req.get_ref().name))]
    async fn inspect(
        &self,
        req: Request<proto::InspectRequest>,
    ) -> Result<Response<proto::LockState>, Status> {
        let deadline = deadline_of(&req, self.default_timeout());
        let r = req.into_inner();
        check_name(&r.name)?;
        let rec = read_lock(&self.node, &r.name, deadline).await?;
        Ok(Response::new(lock_state_msg(r.name, &rec)))
    }
}
