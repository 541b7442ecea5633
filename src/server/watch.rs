//! `shopkv.v1.Watch`: change streams over this node's [`WatchHub`]. One task
//! per watched group follows that group's history from the asked revision
//! and sends the matching changes; the groups' streams interleave, each in
//! its own log order.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

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
use crate::proto::watch_request::Target;
use crate::proto::watch_server::Watch;
use crate::router::META_GROUP;
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

/// What one watch follows, decoded from the request.
#[derive(Clone, Debug)]
enum Subject {
    KvPrefix(Vec<u8>),
    Order(String),
    Stock(String),
    Lock(String),
}

impl Subject {
    fn matches(&self, record_key: &[u8]) -> bool {
        match self {
            Subject::KvPrefix(p) => keys::kv_user_key(record_key).is_some_and(|k| k.starts_with(p)),
            Subject::Order(id) => record_key == keys::order_key(id).as_slice(),
            Subject::Stock(sku) => record_key == keys::inventory_key(sku).as_slice(),
            Subject::Lock(name) => record_key == keys::lock_key(name).as_slice(),
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
            (Subject::Order(id), Some(b)) => {
                let o: Stored<Order> = codec::decode(b).ok()?;
                Record::Order(proto::OrderChange {
                    order_id: id.clone(),
                    status: status_msg(o.record.status) as i32,
                    status_name: o.record.status.name().to_string(),
                    version: o.version,
                })
            }
            (Subject::Order(id), None) => Record::Order(proto::OrderChange {
                order_id: id.clone(),
                version: revision,
                ..Default::default()
            }),
            (Subject::Stock(sku), Some(b)) => {
                let l: Stored<InventoryLevel> = codec::decode(b).ok()?;
                Record::Stock(stock_msg(sku.clone(), l))
            }
            (Subject::Stock(sku), None) => Record::Stock(proto::StockLevel {
                sku: sku.clone(),
                version: revision,
                ..Default::default()
            }),
            (Subject::Lock(name), Some(b)) => {
                let rec: LockRecord = codec::decode(b).ok()?;
                Record::Lock(lock_state_msg(name.clone(), &rec))
            }
            (Subject::Lock(name), None) => {
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
    ) -> Result<(Subject, Vec<GroupId>), Status> {
        let map = self
            .node
            .cluster_map()
            .ok_or_else(|| Status::unavailable("cluster not initialised"))?;
        Ok(match target {
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
                (Subject::Order(id), vec![g])
            }
            Some(Target::Sku(sku)) => {
                check_id("SKU", &sku)?;
                let g = map.shard_of_sku(&sku);
                (Subject::Stock(sku), vec![g])
            }
            Some(Target::LockName(name)) => {
                super::lock::check_name(&name)?;
                (Subject::Lock(name), vec![META_GROUP])
            }
        })
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

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchStream;

    #[tracing::instrument(name = "watch", skip_all)]
    async fn watch(
        &self,
        req: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = req.into_inner();
        let (subject, groups) = self.subject_and_groups(r.target)?;
        let start: HashMap<u64, u64> = r.start_revisions;
        if let Some(g) = start.keys().find(|g| !groups.contains(g)) {
            return Err(Status::invalid_argument(format!(
                "start revision for group {g}, which this watch does not follow"
            )));
        }
        if let Some(g) = groups.iter().find(|g| self.node.group(**g).is_none()) {
            return Err(Status::unavailable(format!(
                "group {g} has no replica on this node; watch through one of its members"
            )));
        }
        let permit = Arc::new(
            self.streams
                .clone()
                .try_acquire_owned()
                .map_err(|_| Status::unavailable("too many watch streams on this node"))?,
        );
        let hub = &self.node.watches;
        let cursors: Vec<Cursor> = groups
            .iter()
            .map(|g| hub.cursor(*g, start.get(g).copied().unwrap_or(0)))
            .collect();
        let applied = groups
            .iter()
            .map(|g| proto::GroupRevision {
                group: *g,
                revision: hub.applied(*g),
            })
            .collect();
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
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
