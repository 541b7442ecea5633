//! `shopkv.v1.Kv`: Put, Get, Delete, Scan, CompareAndSwap. Validates input at
//! the edge, routes each key to its shard, and lets the node forward to the
//! shard's leader.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::error::{invalid, rejection_status};
use super::{deadline_of, error::to_status};
use crate::node::{MAX_FORWARD_HOPS, Node, NodeError, ReadOp, ReadResult};
use crate::proto;
use crate::proto::kv_server::Kv;
use crate::router::ClusterMap;
use crate::sm::{Command, Response as SmResponse};

/// Longest key accepted.
pub const MAX_KEY_BYTES: usize = 4096;
/// Largest value accepted.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Largest scan limit.
pub const MAX_SCAN_LIMIT: u32 = 10_000;

/// The KV service.
pub struct KvService {
    node: Arc<Node>,
}

impl KvService {
    /// A service over `node`.
    pub fn new(node: Arc<Node>) -> KvService {
        KvService { node }
    }

    fn default_timeout(&self) -> Duration {
        Duration::from_millis(self.node.config.request_timeout_ms)
    }

    fn map(&self) -> Result<Arc<ClusterMap>, Status> {
        self.node
            .cluster_map()
            .ok_or_else(|| Status::failed_precondition("cluster is not initialised"))
    }
}

fn check_key(key: &[u8]) -> Result<(), Status> {
    if key.is_empty() {
        return Err(invalid("key must not be empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(invalid(format!(
            "key is {} bytes, limit is {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(())
}

fn check_value(value: &[u8]) -> Result<(), Status> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(invalid(format!(
            "value is {} bytes, limit is {MAX_VALUE_BYTES}",
            value.len()
        )));
    }
    Ok(())
}

/// Wraps a write in its fence, if the request carries one.
fn fenced(cmd: Command, fence: Option<proto::Fence>) -> Result<Command, Status> {
    Ok(match super::fence_of(fence)? {
        Some(f) => f.guard(cmd),
        None => cmd,
    })
}

/// The status of a write's result other than its success: FAILED_PRECONDITION
/// for a refused fencing token, INTERNAL for anything else.
fn unexpected(r: SmResponse) -> Status {
    match crate::sm::fence_rejection(&r) {
        Some(rejection) => rejection_status(rejection),
        None => to_status(NodeError::Internal(format!(
            "unexpected apply result {r:?}"
        ))),
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    #[tracing::instrument(name = "kv.put", skip_all, fields(key_len = req.get_ref().key.len()))]
    async fn put(
        &self,
        req: Request<proto::PutRequest>,
    ) -> Result<Response<proto::PutResponse>, Status> {
        let deadline = deadline_of(&req, self.default_timeout());
        let r = req.into_inner();
        check_key(&r.key)?;
        check_value(&r.value)?;
        let shard = self.map()?.shard_for(&r.key);
        let cmd = fenced(
            Command::Put {
                key: r.key,
                value: r.value,
            },
            r.fence,
        )?;
        match self
            .node
            .propose(shard, cmd, deadline, MAX_FORWARD_HOPS)
            .await?
        {
            SmResponse::Put { version } => Ok(Response::new(proto::PutResponse { version, shard })),
            other => Err(unexpected(other)),
        }
    }

    #[tracing::instrument(name = "kv.get", skip_all)]
    async fn get(
        &self,
        req: Request<proto::GetRequest>,
    ) -> Result<Response<proto::GetResponse>, Status> {
        let deadline = deadline_of(&req, self.default_timeout());
        let r = req.into_inner();
        check_key(&r.key)?;
        let shard = self.map()?.shard_for(&r.key);
        let op = ReadOp::Get { key: r.key.clone() };
        match self
            .node
            .read(shard, op, !r.serializable, deadline, MAX_FORWARD_HOPS)
            .await?
        {
            ReadResult::Record(Some(rec)) => Ok(Response::new(proto::GetResponse {
                record: Some(proto::Record {
                    key: r.key,
                    value: rec.value,
                    version: rec.version,
                    shard,
                }),
            })),
            ReadResult::Record(None) => Err(Status::not_found("key not found")),
            _ => Err(to_status(NodeError::Internal(
                "wrong result for get".into(),
            ))),
        }
    }

    #[tracing::instrument(name = "kv.delete", skip_all)]
    async fn delete(
        &self,
        req: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::DeleteResponse>, Status> {
        let deadline = deadline_of(&req, self.default_timeout());
        let r = req.into_inner();
        check_key(&r.key)?;
        let shard = self.map()?.shard_for(&r.key);
        match self
            .node
            .propose(
                shard,
                fenced(Command::Delete { key: r.key }, r.fence)?,
                deadline,
                MAX_FORWARD_HOPS,
            )
            .await?
        {
            SmResponse::Delete { deleted, revision } => {
                Ok(Response::new(proto::DeleteResponse { deleted, revision }))
            }
            other => Err(unexpected(other)),
        }
    }

    #[tracing::instrument(name = "kv.scan", skip_all, fields(limit = req.get_ref().limit))]
    async fn scan(
        &self,
        req: Request<proto::ScanRequest>,
    ) -> Result<Response<proto::ScanResponse>, Status> {
        let deadline = deadline_of(&req, self.default_timeout());
        let r = req.into_inner();
        if r.limit == 0 || r.limit > MAX_SCAN_LIMIT {
            return Err(invalid(format!(
                "limit must be 1..={MAX_SCAN_LIMIT}, got {}",
                r.limit
            )));
        }
        if r.prefix.len() > MAX_KEY_BYTES {
            return Err(invalid(format!(
                "prefix is {} bytes, limit is {MAX_KEY_BYTES}",
                r.prefix.len()
            )));
        }
        let limit = r.limit as usize;
        let map = self.map()?;
        // Every shard may hold matches: ask them all at once and merge.
        let reads = map.data_groups().map(|shard| {
            let op = ReadOp::Scan {
                prefix: r.prefix.clone(),
                limit,
            };
            let node = self.node.clone();
            async move {
                (
                    shard,
                    node.read(shard, op, !r.serializable, deadline, MAX_FORWARD_HOPS)
                        .await,
                )
            }
        });
        let mut records = Vec::new();
        let mut more = false;
        for (shard, res) in futures::future::join_all(reads).await {
            match res? {
                ReadResult::Records {
                    records: rows,
                    more: m,
                } => {
                    more |= m;
                    records.extend(rows.into_iter().map(|(key, rec)| proto::Record {
                        key,
                        value: rec.value,
                        version: rec.version,
                        shard,
                    }));
                }
                _ => {
                    return Err(to_status(NodeError::Internal(
                        "wrong result for scan".into(),
                    )));
                }
            }
        }
        records.sort_by(|a, b| a.key.cmp(&b.key));
        if records.len() > limit {
            records.truncate(limit);
            more = true;
        }
        Ok(Response::new(proto::ScanResponse { records, more }))
    }

    #[tracing::instrument(name = "kv.cas", skip_all, fields(expected = req.get_ref().expected_version))]
    async fn compare_and_swap(
        &self,
        req: Request<proto::CompareAndSwapRequest>,
    ) -> Result<Response<proto::CompareAndSwapResponse>, Status> {
        let deadline = deadline_of(&req, self.default_timeout());
        let r = req.into_inner();
        check_key(&r.key)?;
        check_value(&r.value)?;
        let shard = self.map()?.shard_for(&r.key);
        let key = r.key.clone();
        let cmd = fenced(
            Command::CompareAndSwap {
                key: r.key,
                expected_version: r.expected_version,
                value: r.value,
            },
            r.fence,
        )?;
        match self
            .node
            .propose(shard, cmd, deadline, MAX_FORWARD_HOPS)
            .await?
        {
            SmResponse::Cas {
                succeeded,
                version,
                current,
            } => Ok(Response::new(proto::CompareAndSwapResponse {
                succeeded,
                version,
                current: current.map(|value| proto::Record {
                    key: key.clone(),
                    value,
                    version,
                    shard,
                }),
            })),
            other => Err(unexpected(other)),
        }
    }
}
