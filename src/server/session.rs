//! `shopkv.v1.Session`: sessions in the meta group. Create and Close are Raft
//! writes; KeepAlive and Get are served by the meta leader after it confirms
//! it leads (a follower forwards them), without a Raft write.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::deadline_of;
use super::error::to_status;
use crate::clock::now_ms;
use crate::node::{
    MAX_FORWARD_HOPS, Node, NodeError, ReadOp, ReadResult, SessionRead, SessionReadResult,
};
use crate::proto;
use crate::proto::session_server::Session;
use crate::router::META_GROUP;
use crate::sm::session::{SessionCommand, SessionResponse};
use crate::sm::{Command, Response as SmResponse};

/// Longest TTL a session may have.
pub const MAX_SESSION_TTL_MS: u64 = 24 * 3_600_000;
/// Keep-alive requests buffered per stream.
const KEEPALIVE_BUFFER: usize = 16;

/// The Session service.
pub struct SessionService {
    node: Arc<Node>,
}

impl SessionService {
    /// A service over `node`.
    pub fn new(node: Arc<Node>) -> SessionService {
        SessionService { node }
    }

    fn default_timeout(&self) -> Duration {
        Duration::from_millis(self.node.config.request_timeout_ms)
    }

    /// Shortest TTL: 1.5 × the election timeout, so a session survives a
    /// leader change (etcd's minTTL rule).
    fn min_ttl_ms(&self) -> u64 {
        self.node.election_timeout().as_millis() as u64 * 3 / 2
    }
}

fn not_found(id: u64) -> Status {
    Status::not_found(format!("no session {id} (closed or expired)"))
}

async fn session_read(
    node: &Node,
    op: SessionRead,
    deadline: Instant,
) -> Result<SessionReadResult, Status> {
    match node
        .read(
            META_GROUP,
            ReadOp::Session(op),
            true,
            deadline,
            MAX_FORWARD_HOPS,
        )
        .await
        .map_err(to_status)?
    {
        ReadResult::Session(r) => Ok(r),
        _ => Err(to_status(NodeError::Internal("wrong read result".into()))),
    }
}

type KeepAliveStream =
    Pin<Box<dyn futures::Stream<Item = Result<proto::KeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Session for SessionService {
    #[tracing::instrument(name = "session.create", skip_all, fields(ttl_ms = req.get_ref().ttl_ms))]
    async fn create(
        &self,
        req: Request<proto::CreateSessionRequest>,
    ) -> Result<Response<proto::SessionInfo>, Status> {
        let deadline = deadline_of(&req, self.default_timeout());
        let ttl_ms = req.into_inner().ttl_ms;
        let min = self.min_ttl_ms();
        if !(min..=MAX_SESSION_TTL_MS).contains(&ttl_ms) {
            return Err(Status::invalid_argument(format!(
                "ttl_ms must be {min}..={MAX_SESSION_TTL_MS} (at least 1.5 x the election timeout), got {ttl_ms}"
            )));
        }
        let cmd = Command::Session(SessionCommand::Grant {
            ttl_ms,
            now_ms: now_ms(),
        });
        match self
            .node
            .propose(META_GROUP, cmd, deadline, MAX_FORWARD_HOPS)
            .await
            .map_err(to_status)?
        {
            SmResponse::Session(SessionResponse::Granted { id, ttl_ms }) => {
                Ok(Response::new(proto::SessionInfo {
                    session_id: id,
                    ttl_ms,
                    remaining_ms: ttl_ms,
                    locks: Vec::new(),
                }))
            }
            other => Err(to_status(NodeError::Internal(format!(
                "unexpected result {other:?}"
            )))),
        }
    }

    type KeepAliveStream = KeepAliveStream;

    #[tracing::instrument(name = "session.keepalive", skip_all)]
    async fn keep_alive(
        &self,
        req: Request<Streaming<proto::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let timeout = self.default_timeout();
        let mut inbound = req.into_inner();
        let node = self.node.clone();
        let (tx, rx) = mpsc::channel(KEEPALIVE_BUFFER);
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                let op = SessionRead::KeepAlive { id: r.session_id };
                let reply = match session_read(&node, op, Instant::now() + timeout).await {
                    Ok(SessionReadResult::Alive { ttl_ms, .. }) => Ok(proto::KeepAliveResponse {
                        session_id: r.session_id,
                        ttl_ms,
                    }),
                    Ok(SessionReadResult::Missing) => Err(not_found(r.session_id)),
                    Err(s) => Err(s),
                };
                let end = reply.is_err();
                if tx.send(reply).await.is_err() || end {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(name = "session.close", skip_all, fields(id = req.get_ref().session_id))]
    async fn close(
        &self,
        req: Request<proto::CloseSessionRequest>,
    ) -> Result<Response<proto::CloseSessionResponse>, Status> {
        let deadline = deadline_of(&req, self.default_timeout());
        let id = req.into_inner().session_id;
        let cmd = Command::Session(SessionCommand::Close { id });
        match self
            .node
            .propose(META_GROUP, cmd, deadline, MAX_FORWARD_HOPS)
            .await
            .map_err(to_status)?
        {
            SmResponse::Session(SessionResponse::Ended { ended: true }) => {
                Ok(Response::new(proto::CloseSessionResponse { closed: true }))
            }
            SmResponse::Session(SessionResponse::Ended { ended: false }) => Err(not_found(id)),
            other => Err(to_status(NodeError::Internal(format!(
                "unexpected result {other:?}"
            )))),
        }
    }

    #[tracing::instrument(name = "session.get", skip_all, fields(id = req.get_ref().session_id))]
    async fn get(
        &self,
        req: Request<proto::GetSessionRequest>,
    ) -> Result<Response<proto::SessionInfo>, Status> {
        let deadline = deadline_of(&req, self.default_timeout());
        let id = req.into_inner().session_id;
        match session_read(&self.node, SessionRead::Get { id }, deadline).await? {
            SessionReadResult::Alive {
                ttl_ms,
                remaining_ms,
                locks,
            } => Ok(Response::new(proto::SessionInfo {
                session_id: id,
                ttl_ms,
                remaining_ms,
                locks,
            })),
            SessionReadResult::Missing => Err(not_found(id)),
        }
    }
}
