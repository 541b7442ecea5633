//! `shopkv.v1.Kv`: Put, Get, Delete, Scan, CompareAndSwap, and Batch (the
//! first four's requests, many on one stream). Validates input at the edge,
//! routes each key to its shard, and lets the node forward to the shard's
//! leader.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::error::{OUTCOME_HEADER, REASON_HEADER, invalid, rejection_status};
use super::{deadline_in, deadline_of, error::to_status};
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

/// Items one `Batch` message may carry.
pub const MAX_BATCH_ITEMS: usize = 1024;
/// Items of one `Batch` stream served at once; the node reads no further
/// messages of that stream until one finishes (HTTP/2 flow control then holds
/// the client back). As many as the unary calls a connection may have open
/// by default (`--max-concurrent-streams`), so a stream holds at most the
/// memory of a connection's unary calls: ≤ 1 024 requests and results.
pub const MAX_BATCH_IN_FLIGHT: usize = 1024;
/// Items of all `Batch` streams a node serves at once. A connection may open
/// many streams; past this every stream waits, as one past its own limit does.
pub const MAX_BATCH_IN_FLIGHT_PER_NODE: usize = 65_536;

/// The KV service.
#[derive(Clone)]
pub struct KvService {
    node: Arc<Node>,
    /// Slots of [`MAX_BATCH_IN_FLIGHT_PER_NODE`], shared by every `Batch` stream.
    batch_slots: Arc<Semaphore>,
}

impl KvService {
    /// A service over `node`.
    pub fn new(node: Arc<Node>) -> KvService {
        KvService {
            node,
            batch_slots: Arc::new(Semaphore::new(MAX_BATCH_IN_FLIGHT_PER_NODE)),
        }
    }

    fn default_timeout(&self) -> Duration {
        Duration::from_millis(self.node.config.request_timeout_ms)
    }

    /// A unary call's message and its deadline.
    fn unary<T>(&self, req: Request<T>) -> (T, Instant) {
        let deadline = deadline_of(&req, self.default_timeout());
        (req.into_inner(), deadline)
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

impl KvService {
    #[tracing::instrument(name = "kv.put", skip_all, fields(key_len = r.key.len()))]
    async fn put_op(
        &self,
        r: proto::PutRequest,
        deadline: Instant,
    ) -> Result<proto::PutResponse, Status> {
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
            SmResponse::Put { version } => Ok(proto::PutResponse { version, shard }),
            other => Err(unexpected(other)),
        }
    }

    #[tracing::instrument(name = "kv.get", skip_all)]
    async fn get_op(
        &self,
        r: proto::GetRequest,
        deadline: Instant,
    ) -> Result<proto::GetResponse, Status> {
        check_key(&r.key)?;
        let shard = self.map()?.shard_for(&r.key);
        let op = ReadOp::Get { key: r.key.clone() };
        match self
            .node
            .read(shard, op, !r.serializable, deadline, MAX_FORWARD_HOPS)
            .await?
        {
            ReadResult::Record(Some(rec)) => Ok(proto::GetResponse {
                record: Some(proto::Record {
                    key: r.key,
                    value: rec.value,
                    version: rec.version,
                    shard,
                }),
            }),
            ReadResult::Record(None) => Err(Status::not_found("key not found")),
            _ => Err(to_status(NodeError::Internal(
                "wrong result for get".into(),
            ))),
        }
    }

    #[tracing::instrument(name = "kv.delete", skip_all)]
    async fn delete_op(
        &self,
        r: proto::DeleteRequest,
        deadline: Instant,
    ) -> Result<proto::DeleteResponse, Status> {
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
                Ok(proto::DeleteResponse { deleted, revision })
            }
            other => Err(unexpected(other)),
        }
    }

    #[tracing::instrument(name = "kv.cas", skip_all, fields(expected = r.expected_version))]
    async fn compare_and_swap_op(
        &self,
        r: proto::CompareAndSwapRequest,
        deadline: Instant,
    ) -> Result<proto::CompareAndSwapResponse, Status> {
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
            } => Ok(proto::CompareAndSwapResponse {
                succeeded,
                version,
                current: current.map(|value| proto::Record {
                    key: key.clone(),
                    value,
                    version,
                    shard,
                }),
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Serves one item of a `Batch` stream as the unary call of its kind would.
    async fn batch_item(&self, item: proto::BatchItem) -> proto::BatchResult {
        use proto::batch_item::Op;
        use proto::batch_result::Result as Reply;
        let asked = (item.timeout_ms > 0).then(|| Duration::from_millis(item.timeout_ms));
        let deadline = deadline_in(asked, self.default_timeout());
        let reply = match item.op {
            Some(Op::Put(r)) => self.put_op(r, deadline).await.map(Reply::Put),
            Some(Op::Get(r)) => self.get_op(r, deadline).await.map(Reply::Get),
            Some(Op::Delete(r)) => self.delete_op(r, deadline).await.map(Reply::Delete),
            Some(Op::CompareAndSwap(r)) => self
                .compare_and_swap_op(r, deadline)
                .await
                .map(Reply::CompareAndSwap),
            None => Err(invalid("batch item has no operation")),
        };
        proto::BatchResult {
            id: item.id,
            result: Some(reply.unwrap_or_else(|s| Reply::Error(batch_error(&s)))),
        }
    }
}

/// A unary call's error status as a `Batch` item's result.
fn batch_error(s: &Status) -> proto::BatchError {
    let header = |name: &str| {
        s.metadata()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    proto::BatchError {
        code: s.code() as i32,
        message: s.message().to_string(),
        outcome: header(OUTCOME_HEADER),
        reason: header(REASON_HEADER),
    }
}

/// The reading side of a `Batch` stream: each item runs as its own task (they
/// finish in any order), at most [`MAX_BATCH_IN_FLIGHT`] at once (and
/// [`MAX_BATCH_IN_FLIGHT_PER_NODE`] across streams). Items still
/// running when the client goes away finish (a write may be half way through
/// Raft); their results are dropped.
async fn serve_batch_stream(
    service: KvService,
    mut inbound: Streaming<proto::BatchRequest>,
    results: mpsc::Sender<Result<proto::BatchResult, Status>>,
) {
    let slots = Arc::new(Semaphore::new(MAX_BATCH_IN_FLIGHT));
    while let Ok(Some(message)) = inbound.message().await {
        if message.items.len() > MAX_BATCH_ITEMS {
            let too_many = invalid(format!(
                "batch message has {} items, limit is {MAX_BATCH_ITEMS}",
                message.items.len()
            ));
            let _ = results.send(Err(too_many)).await;
            return;
        }
        for item in message.items {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let Ok(node_slot) = Arc::clone(&service.batch_slots).acquire_owned().await else {
                return;
            };
            let service = service.clone();
            let results = results.clone();
            tokio::spawn(async move {
                let result = service.batch_item(item).await;
                // The node's slot is for work: a client that does not read its
                // results must not hold back other streams. The stream's slot is
                // held until the result is queued, so that client stops the
                // reading of its own requests.
                drop(node_slot);
                let _ = results.send(Ok(result)).await;
                drop(slot);
            });
        }
    }
}

/// Results of one stream's items ready at once go out as one message.
fn batch_responses(
    results: mpsc::Receiver<Result<proto::BatchResult, Status>>,
) -> impl futures::Stream<Item = Result<proto::BatchResponse, Status>> {
    ReceiverStream::new(results)
        .ready_chunks(MAX_BATCH_ITEMS)
        .map(|chunk| {
            chunk
                .into_iter()
                .collect::<Result<Vec<_>, Status>>()
                .map(|results| proto::BatchResponse { results })
        })
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn put(
        &self,
        req: Request<proto::PutRequest>,
    ) -> Result<Response<proto::PutResponse>, Status> {
        let (r, deadline) = self.unary(req);
        self.put_op(r, deadline).await.map(Response::new)
    }

    async fn get(
        &self,
        req: Request<proto::GetRequest>,
    ) -> Result<Response<proto::GetResponse>, Status> {
        let (r, deadline) = self.unary(req);
        self.get_op(r, deadline).await.map(Response::new)
    }

    async fn delete(
        &self,
        req: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::DeleteResponse>, Status> {
        let (r, deadline) = self.unary(req);
        self.delete_op(r, deadline).await.map(Response::new)
    }

    async fn compare_and_swap(
        &self,
        req: Request<proto::CompareAndSwapRequest>,
    ) -> Result<Response<proto::CompareAndSwapResponse>, Status> {
        let (r, deadline) = self.unary(req);
        self.compare_and_swap_op(r, deadline)
            .await
            .map(Response::new)
    }

    type BatchStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<proto::BatchResponse, Status>> + Send>>;

    #[tracing::instrument(name = "kv.batch", skip_all)]
    async fn batch(
        &self,
        req: Request<Streaming<proto::BatchRequest>>,
    ) -> Result<Response<Self::BatchStream>, Status> {
        let (tx, rx) = mpsc::channel(MAX_BATCH_IN_FLIGHT);
        tokio::spawn(serve_batch_stream(self.clone(), req.into_inner(), tx));
        Ok(Response::new(Box::pin(batch_responses(rx))))
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
}
