//! `shopkv.v1.Election`: leader election on the lock queue (etcd's election
//! service shape). Campaign is an exclusive acquire that carries the
//! candidate's value; the holder is the leader, its fencing token the
//! leadership's number; Observe follows the lock's changes in the watch hub.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::error::to_status;
use super::lock::{MAX_LOCK_WAIT_MS, acquire_or_leave, check_name, propose_lock, read_lock};
use super::{caller_deadline, deadline_of};
use crate::codec;
use crate::node::{Node, NodeError};
use crate::proto;
use crate::proto::election_server::Election;
use crate::router::META_GROUP;
use crate::sm::lock::{LockCommand, LockEntry, LockRecord, LockResponse};
use crate::storage::keys;

/// Largest value a candidate may proclaim.
pub const MAX_ELECTION_VALUE_BYTES: usize = 64 << 10;

/// The Election service.
pub struct ElectionService {
    node: Arc<Node>,
}

impl ElectionService {
    /// A service over `node`.
    pub fn new(node: Arc<Node>) -> ElectionService {
        ElectionService { node }
    }

    fn default_timeout(&self) -> Duration {
        Duration::from_millis(self.node.config.request_timeout_ms)
    }
}

/// The leader of an election: its first holder.
fn leader_of(rec: &LockRecord) -> Option<&LockEntry> {
    rec.queue.first().filter(|e| e.token != 0)
}

fn leader_msg(name: &str, e: &LockEntry) -> proto::LeaderResponse {
    proto::LeaderResponse {
        leader: Some(proto::LeaderKey {
            name: name.to_string(),
            session_id: e.session,
            fencing_token: e.token,
        }),
        value: e.value.clone(),
    }
}

fn check_value(value: &[u8]) -> Result<(), Status> {
    if value.len() > MAX_ELECTION_VALUE_BYTES {
        return Err(Status::invalid_argument(format!(
            "value is {} bytes, limit is {MAX_ELECTION_VALUE_BYTES}",
            value.len()
        )));
    }
    Ok(())
}

fn leader_key(k: Option<proto::LeaderKey>) -> Result<proto::LeaderKey, Status> {
    let k = k.ok_or_else(|| Status::invalid_argument("leader key is required"))?;
    check_name(&k.name)?;
    Ok(k)
}

type ObserveStream =
    Pin<Box<dyn futures::Stream<Item = Result<proto::LeaderResponse, Status>> + Send>>;

/// Sends `name`'s leader whenever it (or its value) changes, until the client leaves.
async fn observe(
    node: Arc<Node>,
    name: String,
    tx: mpsc::Sender<Result<proto::LeaderResponse, Status>>,
    read_timeout: Duration,
) {
    let key = keys::lock_key(&name);
    let mut last: Option<(u64, u64, Vec<u8>)> = None;
    'resync: loop {
        // Follow changes from before the read, so none falls between the two.
        let mut cursor = node.watches.cursor(META_GROUP, 0);
        let mut rec = match read_lock(&node, &name, Instant::now() + read_timeout).await {
            Ok(r) => Some(r),
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        loop {
            if let Some(r) = rec.take() {
                let now = leader_of(&r).map(|e| (e.session, e.token, e.value.clone()));
                if let Some(e) = leader_of(&r).filter(|_| now != last)
                    && tx.send(Ok(leader_msg(&name, e))).await.is_err()
                {
                    return;
                }
                last = now;
            }
            let batch = tokio::select! {
                b = cursor.next_batch() => b,
                () = tx.closed() => return,
            };
            let Ok(batch) = batch else {
                continue 'resync;
            };
            for change in batch.iter().flat_map(|e| &e.changes) {
                if change.record_key == key {
                    rec = Some(match &change.value {
                        Some(b) => match codec::decode(b) {
                            Ok(r) => r,
                            Err(e) => {
                                let _ = tx
                                    .send(Err(to_status(NodeError::Internal(e.to_string()))))
                                    .await;
                                return;
                            }
                        },
                        None => LockRecord::default(),
                    });
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Election for ElectionService {
    #[tracing::instrument(name = "election.campaign", skip_all, fields(name = %req.get_ref().name, session = req.get_ref().session_id))]
    async fn campaign(
        &self,
        req: Request<proto::CampaignRequest>,
    ) -> Result<Response<proto::CampaignResponse>, Status> {
        let deadline = deadline_of(&req, self.default_timeout());
        let gives_up = caller_deadline(&req);
        let r = req.into_inner();
        check_name(&r.name)?;
        check_value(&r.value)?;
        if r.wait_timeout_ms > MAX_LOCK_WAIT_MS {
            return Err(Status::invalid_argument(format!(
                "wait_timeout_ms must be at most {MAX_LOCK_WAIT_MS}"
            )));
        }
        let wait_ms = if r.wait_timeout_ms == 0 {
            MAX_LOCK_WAIT_MS
        } else {
            r.wait_timeout_ms
        };
        let cmd = |call_id| LockCommand::Campaign {
            name: r.name.clone(),
            session: r.session_id,
            value: r.value,
            call_id,
        };
        let token = acquire_or_leave(
            &self.node,
            &r.name,
            r.session_id,
            cmd,
            deadline,
            wait_ms,
            gives_up,
        )
        .await?;
        Ok(Response::new(proto::CampaignResponse {
            leader: Some(proto::LeaderKey {
                name: r.name,
                session_id: r.session_id,
                fencing_token: token,
            }),
        }))
    }

    #[tracing::instrument(name = "election.proclaim", skip_all)]
    async fn proclaim(
        &self,
        req: Request<proto::ProclaimRequest>,
    ) -> Result<Response<proto::ProclaimResponse>, Status> {
        let deadline = deadline_of(&req, self.default_timeout());
        let r = req.into_inner();
        let k = leader_key(r.leader)?;
        check_value(&r.value)?;
        let cmd = LockCommand::Proclaim {
            name: k.name,
            session: k.session_id,
            token: k.fencing_token,
            value: r.value,
        };
        match propose_lock(&self.node, cmd, deadline).await? {
            LockResponse::Held { .. } => Ok(Response::new(proto::ProclaimResponse {})),
            other => Err(to_status(NodeError::Internal(format!(
                "unexpected result {other:?}"
            )))),
        }
    }

    #[tracing::instrument(name = "election.leader", skip_all, fields(name = %req.get_ref().name))]
    async fn leader(
        &self,
        req: Request<proto::LeaderRequest>,
    ) -> Result<Response<proto::LeaderResponse>, Status> {
        let deadline = deadline_of(&req, self.default_timeout());
        let r = req.into_inner();
        check_name(&r.name)?;
        let rec = read_lock(&self.node, &r.name, deadline).await?;
        match leader_of(&rec) {
            Some(e) => Ok(Response::new(leader_msg(&r.name, e))),
            None => Err(Status::not_found(format!(
                "election {} has no leader",
                r.name
            ))),
        }
    }

    type ObserveStream = ObserveStream;

    #[tracing::instrument(name = "election.observe", skip_all, fields(name = %req.get_ref().name))]
    async fn observe(
        &self,
        req: Request<proto::LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let r = req.into_inner();
        check_name(&r.name)?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(observe(
            self.node.clone(),
            r.name,
            tx,
            self.default_timeout(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(name = "election.resign", skip_all)]
    async fn resign(
        &self,
        req: Request<proto::ResignRequest>,
    ) -> Result<Response<proto::ResignResponse>, Status> {
        let deadline = deadline_of(&req, self.default_timeout());
        let k = leader_key(req.into_inner().leader)?;
        // Only the leadership named (apply checks the token): a later one of
        // the same session stays.
        let cmd = LockCommand::Resign {
            name: k.name,
            session: k.session_id,
            token: k.fencing_token,
        };
        propose_lock(&self.node, cmd, deadline).await?;
        Ok(Response::new(proto::ResignResponse {}))
    }
}
