//! `shopkv.v1.Watch`: change streams over this node's [`WatchHub`]. One task
//! per watched group follows that group's history from the asked revision
//! and sends the matching changes; the groups' streams interleave, each in
//! its own log order. A group with no replica here is relayed: the node opens
//! the same watch, for that group alone, on a replica and forwards it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::lock::lock_state_msg;
use super::records::{check_id, status_msg, stock_msg};
use crate::codec;
use crate::domain::inventory::InventoryLevel;
use crate::domain::order::Order;
use crate::node::Node;
use crate::proto;
use crate::proto::watch_client::WatchClient;
use crate::proto::watch_request::Target;
use crate::proto::watch_server::Watch;
use crate::router::{ClusterMap, META_GROUP};
use crate::sm::StoredRecord;
use crate::sm::commerce::Stored;
use crate::sm::lock::LockRecord;
use crate::storage::keys::{self, GroupId};
use crate::watch::{Change, Compacted, Cursor, Event};

/// Most concurrent watch streams one node serves.
pub const MAX_WATCH_STREAMS: usize = 4096;
/// Longest KV prefix a watch may name, in bytes (the longest key).
const MAX_PREFIX_BYTES: usize = 4096;
/// Responses buffered per stream before its group tasks wait for the client.
const STREAM_BUFFER: usize = 64;
/// Metadata marking a watch one node opened on another's behalf.
const RELAYED_HEADER: &str = "x-shopkv-relayed";

/// What one watch follows, decoded from the request.
#[derive(Clone, Debug)]
enum Subject {
    KvPrefix(Vec<u8>),
    /// One record: what it is, and its record key (built once, compared per change).
    Order(String, Vec<u8>),
    Stock(String, Vec<u8>),
    Lock(String, Vec<u8>),
}

impl Subject {
    fn matches(&self, record_key: &[u8]) -> bool {
        match self {
            Subject::KvPrefix(p) => keys::kv_user_key(record_key).is_some_and(|k| k.starts_with(p)),
            Subject::Order(_, key) | Subject::Stock(_, key) | Subject::Lock(_, key) => {
                record_key == key.as_slice()
            }
        }
    }

    /// The event for one matching change (`None` if its value does not decode,
    /// which would be a bug: the record was written by this build's apply).
    fn event(&self, group: GroupId, revision: u64, c: &Change) -> Option<proto::WatchEvent> {
        use proto::watch_event::Record;
        let kind = if c.value.is_some() {
            proto::EventKind::Put
        } else {
            proto::EventKind::Delete
        };
        let record = match (self, &c.value) {
            (Subject::KvPrefix(_), v) => {
                let key = keys::kv_user_key(&c.record_key)?.to_vec();
                let (value, version) = match v {
                    Some(b) => {
                        let r: StoredRecord = codec::decode(b).ok()?;
                        (r.value, r.version)
                    }
                    None => (Vec::new(), revision),
                };
                Record::Kv(proto::Record {
                    key,
                    value,
                    version,
                    shard: group,
                })
            }
            (Subject::Order(id, _), Some(b)) => {
                let o: Stored<Order> = codec::decode(b).ok()?;
                Record::Order(proto::OrderChange {
                    order_id: id.clone(),
                    status: status_msg(o.record.status) as i32,
                    status_name: o.record.status.name().to_string(),
                    version: o.version,
                })
            }
            (Subject::Order(id, _), None) => Record::Order(proto::OrderChange {
                order_id: id.clone(),
                version: revision,
                ..Default::default()
            }),
            (Subject::Stock(sku, _), Some(b)) => {
                let l: Stored<InventoryLevel> = codec::decode(b).ok()?;
                Record::Stock(stock_msg(sku.clone(), l))
            }
            (Subject::Stock(sku, _), None) => Record::Stock(proto::StockLevel {
                sku: sku.clone(),
                version: revision,
                ..Default::default()
            }),
            (Subject::Lock(name, _), Some(b)) => {
                let rec: LockRecord = codec::decode(b).ok()?;
                Record::Lock(lock_state_msg(name.clone(), &rec))
            }
            (Subject::Lock(name, _), None) => {
                Record::Lock(lock_state_msg(name.clone(), &LockRecord::default()))
            }
        };
        Some(proto::WatchEvent {
            group,
            revision,
            kind: kind as i32,
            record: Some(record),
        })
    }

    /// The matching events of a batch, in order.
    fn events(&self, group: GroupId, batch: &[Arc<Event>]) -> Vec<proto::WatchEvent> {
        batch
            .iter()
            .flat_map(|e| {
                e.changes
                    .iter()
                    .filter(|c| self.matches(&c.record_key))
                    .filter_map(move |c| self.event(group, e.revision, c))
            })
            .collect()
    }
}

/// OUT_OF_RANGE for a revision this node no longer holds.
pub fn compacted_status(c: Compacted) -> Status {
    Status::out_of_range(c.to_string())
}

/// The Watch service.
pub struct WatchService {
    node: Arc<Node>,
    streams: Arc<Semaphore>,
}

impl WatchService {
    /// A service over `node`.
    pub fn new(node: Arc<Node>) -> WatchService {
        WatchService {
            node,
            streams: Arc::new(Semaphore::new(MAX_WATCH_STREAMS)),
        }
    }

    fn subject_and_groups(
        &self,
        target: Option<Target>,
    ) -> Result<(Subject, Vec<GroupId>, Arc<ClusterMap>), Status> {
        let map = self
            .node
            .cluster_map()
            .ok_or_else(|| Status::unavailable("cluster not initialised"))?;
        let (subject, groups) = match target {
            None => return Err(Status::invalid_argument("watch needs a target")),
            Some(Target::KvPrefix(p)) => {
                if p.len() > MAX_PREFIX_BYTES {
                    return Err(Status::invalid_argument(format!(
                        "prefix is {} bytes, limit is {MAX_PREFIX_BYTES}",
                        p.len()
                    )));
                }
                (Subject::KvPrefix(p), (1..=u64::from(map.shards)).collect())
            }
            Some(Target::OrderId(id)) => {
                check_id("order id", &id)?;
                let g = map.shard_of_order(&id);
                (Subject::Order(id.clone(), keys::order_key(&id)), vec![g])
            }
            Some(Target::Sku(sku)) => {
                check_id("SKU", &sku)?;
                let g = map.shard_of_sku(&sku);
                (
                    Subject::Stock(sku.clone(), keys::inventory_key(&sku)),
                    vec![g],
                )
            }
            Some(Target::LockName(name)) => {
                super::lock::check_name(&name)?;
                (
                    Subject::Lock(name.clone(), keys::lock_key(&name)),
                    vec![META_GROUP],
                )
            }
        };
        Ok((subject, groups, map))
    }
}

type WatchStream =
    Pin<Box<dyn futures::Stream<Item = Result<proto::WatchResponse, Status>> + Send>>;

/// Follows one group's cursor, sending matching events until the client leaves.
async fn follow(
    mut cursor: Cursor,
    subject: Subject,
    tx: mpsc::Sender<Result<proto::WatchResponse, Status>>,
    _permit: Arc<OwnedSemaphorePermit>,
) {
    let group = cursor.group();
    // Replay what is already here, then wait for more.
    let mut batch = cursor.poll();
    loop {
        let events = match batch {
            Ok(b) => subject.events(group, &b),
            Err(c) => {
                let _ = tx.send(Err(compacted_status(c))).await;
                return;
            }
        };
        if !events.is_empty() {
            let resp = proto::WatchResponse {
                created: false,
                applied: Vec::new(),
                events,
            };
            if tx.send(Ok(resp)).await.is_err() {
                return;
            }
        }
        batch = tokio::select! {
            b = cursor.next_batch() => b,
            () = tx.closed() => return,
        };
    }
}

/// How long a relay waits for a replica's watch to open.
const RELAY_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before a relay tries the next replica.
const RELAY_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// A watch of one group opened on another node (this one has no replica).
struct Relay {
    group: GroupId,
    target: Target,
    replicas: Vec<String>,
    /// Index in `replicas` of the one streaming now.
    at: usize,
    stream: tonic::Streaming<proto::WatchResponse>,
    /// The next revision to deliver.
    next: u64,
}

/// Opens `group`'s watch on one of `replicas` (client addresses), from
/// `from` (0 = what that replica has applied); returns the stream and the
/// revision it starts after.
async fn open_remote(
    replicas: &[String],
    first: usize,
    group: GroupId,
    target: &Target,
    from: u64,
) -> Result<(usize, tonic::Streaming<proto::WatchResponse>, u64), Status> {
    let mut last = Status::unavailable(format!("group {group} has no reachable replica"));
    for k in 0..replicas.len() {
        let at = (first + k) % replicas.len();
        let Ok(endpoint) =
            tonic::transport::Endpoint::from_shared(format!("http://{}", replicas[at]))
        else {
            continue;
        };
        let opened = async {
            let channel = endpoint
                .connect_timeout(RELAY_CONNECT_TIMEOUT)
                .connect()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let req = proto::WatchRequest {
                target: Some(target.clone()),
                start_revisions: if from == 0 {
                    HashMap::new()
                } else {
                    HashMap::from([(group, from)])
                },
                groups: vec![group],
            };
            let mut req = tonic::Request::new(req);
            req.metadata_mut().insert(
                RELAYED_HEADER,
                tonic::metadata::MetadataValue::from_static("1"),
            );
            let mut stream = WatchClient::new(channel).watch(req).await?.into_inner();
            let created = stream
                .message()
                .await?
                .ok_or_else(|| Status::unavailable("watch closed before it was created"))?;
            let applied = created
                .applied
                .iter()
                .find(|g| g.group == group)
                .map_or(0, |g| g.revision);
            Ok::<_, Status>((stream, applied))
        };
        match tokio::time::timeout(RELAY_CONNECT_TIMEOUT * 2, opened).await {
            Ok(Ok((stream, applied))) => return Ok((at, stream, applied)),
            // History the replica no longer has: every replica would say so
            // or worse; the client must re-read.
            Ok(Err(s)) if s.code() == tonic::Code::OutOfRange => return Err(s),
            Ok(Err(s)) => last = s,
            Err(_) => {
                last = Status::unavailable(format!("replica {} did not answer", replicas[at]))
            }
        }
    }
    Err(last)
}

/// Forwards a relayed group's events until the client leaves; a replica
/// that fails is replaced by another, resuming after the last revision sent.
async fn relay(
    mut r: Relay,
    tx: mpsc::Sender<Result<proto::WatchResponse, Status>>,
    _permit: Arc<OwnedSemaphorePermit>,
) {
    loop {
        let msg = tokio::select! {
            m = r.stream.message() => m,
            () = tx.closed() => return,
        };
        match msg {
            Ok(Some(resp)) => {
                if let Some(last) = resp.events.iter().map(|e| e.revision).max() {
                    r.next = r.next.max(last + 1);
                }
                if !resp.events.is_empty() && tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
            Err(s) if s.code() == tonic::Code::OutOfRange => {
                let _ = tx.send(Err(s)).await;
                return;
            }
            Ok(None) | Err(_) => {
                tokio::time::sleep(RELAY_RETRY_PAUSE).await;
                match open_remote(&r.replicas, r.at + 1, r.group, &r.target, r.next).await {
                    Ok((at, stream, _)) => {
                        r.at = at;
                        r.stream = stream;
                    }
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchStream;

    #[tracing::instrument(name = "watch", skip_all)]
    async fn watch(
        &self,
        req: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let relayed = req.metadata().contains_key(RELAYED_HEADER);
        let r = req.into_inner();
        let target = r.target.clone();
        let (subject, mut groups, map) = self.subject_and_groups(r.target)?;
        if !r.groups.is_empty() {
            if let Some(g) = r.groups.iter().find(|g| !groups.contains(g)) {
                return Err(Status::invalid_argument(format!(
                    "group {g} is not one this watch's target spans"
                )));
            }
            groups.retain(|g| r.groups.contains(g));
        }
        let start: HashMap<u64, u64> = r.start_revisions;
        if let Some(g) = start.keys().find(|g| !groups.contains(g)) {
            return Err(Status::invalid_argument(format!(
                "start revision for group {g}, which this watch does not follow"
            )));
        }
        let permit = Arc::new(
            self.streams
                .clone()
                .try_acquire_owned()
                .map_err(|_| Status::unavailable("too many watch streams on this node"))?,
        );
        let hub = &self.node.watches;
        let mut applied = Vec::with_capacity(groups.len());
        let mut cursors = Vec::new();
        let mut relays = Vec::new();
        for g in groups {
            let from = start.get(&g).copied().unwrap_or(0);
            if self.node.group(g).is_some() {
                let cursor = hub.cursor(g, from);
                applied.push(proto::GroupRevision {
                    group: g,
                    revision: hub.applied(g),
                });
                cursors.push(cursor);
                continue;
            }
            // No replica here: relay from a node that has one (once: a relayed
            // request is never relayed again, so stale maps cannot loop).
            let (Some(target), false) = (target.clone(), relayed) else {
                return Err(Status::unavailable(format!(
                    "group {g} has no replica on this node"
                )));
            };
            let replicas: Vec<String> = map
                .replicas(g)
                .into_iter()
                .filter(|n| *n != self.node.id)
                .filter_map(|n| map.nodes.get(&n).map(|a| a.client_addr.clone()))
                .collect();
            let (at, stream, remote_applied) = open_remote(&replicas, 0, g, &target, from).await?;
            applied.push(proto::GroupRevision {
                group: g,
                revision: remote_applied,
            });
            relays.push(Relay {
                group: g,
                target,
                replicas,
                at,
                stream,
                next: if from == 0 { remote_applied + 1 } else { from },
            });
        }
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let created = proto::WatchResponse {
            created: true,
            applied,
            events: Vec::new(),
        };
        tx.send(Ok(created))
            .await
            .map_err(|_| Status::cancelled("client left"))?;
        for c in cursors {
            tokio::spawn(follow(c, subject.clone(), tx.clone(), permit.clone()));
        }
        for r in relays {
            tokio::spawn(relay(r, tx.clone(), permit.clone()));
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
