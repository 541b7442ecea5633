//! The shopkv driver's `Kv.Batch` client (`--kv-api batch`): one stream per
//! connection carries the KV requests of every client using that connection.
//! Requests queued while the previous message was being sent go out together in
//! the next one, as TiKV's client batches its callers' commands into
//! `BatchCommands`; the node answers each as it finishes, many per message.
//! A lone client's request goes out at once, never waiting for company.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::client::{OpError, REQUEST_TIMEOUT};
use crate::proto::batch_item::Op;
use crate::proto::batch_result::Result as Reply;
use crate::proto::kv_client::KvClient;
use crate::proto::{BatchItem, BatchRequest};

/// Items per message, the server's limit.
const MAX_ITEMS_PER_MESSAGE: usize = 1024;
/// Requests queued for a stream before callers wait.
const QUEUE: usize = 4096;

type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

/// A cloneable handle on one connection's `Kv.Batch` stream.
#[derive(Clone)]
pub struct BatchLink {
    queue: mpsc::Sender<(BatchItem, oneshot::Sender<Reply>)>,
    next_id: Arc<AtomicU64>,
}

impl BatchLink {
    /// Opens the stream on `channel`.
    pub async fn open(channel: Channel) -> Result<BatchLink, tonic::Status> {
        let (queue, queued) = mpsc::channel::<(BatchItem, oneshot::Sender<Reply>)>(QUEUE);
        let waiting: Waiting = Arc::default();
        let registered = Arc::clone(&waiting);
        // A reply is registered before its item is handed to the transport, so
        // it cannot arrive unclaimed.
        let outbound = ReceiverStream::new(queued)
            .ready_chunks(MAX_ITEMS_PER_MESSAGE)
            .map(move |chunk| {
                let mut waiting = registered.lock().unwrap_or_else(|p| p.into_inner());
                let items = chunk
                    .into_iter()
                    .map(|(item, reply)| {
                        waiting.insert(item.id, reply);
                        item
                    })
                    .collect();
                BatchRequest { items }
            });
        let mut inbound = KvClient::new(channel).batch(outbound).await?.into_inner();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                let mut waiting = waiting.lock().unwrap_or_else(|p| p.into_inner());
                for result in message.results {
                    if let (Some(reply), Some(r)) = (waiting.remove(&result.id), result.result) {
                        let _ = reply.send(r);
                    }
                }
            }
            // The stream is over: every caller still waiting gets an error.
            waiting.lock().unwrap_or_else(|p| p.into_inner()).clear();
        });
        Ok(BatchLink {
            queue,
            next_id: Arc::new(AtomicU64::new(1)),
        })
    }

    /// Sends one request and waits for its result (at most [`REQUEST_TIMEOUT`]).
    pub async fn call(&self, op: Op) -> Result<Reply, OpError> {
        let item = BatchItem {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            timeout_ms: REQUEST_TIMEOUT.as_millis() as u64,
            op: Some(op),
        };
        let (tx, rx) = oneshot::channel();
        self.queue
            .send((item, tx))
            .await
            .map_err(|_| OpError::Rpc("batch stream closed".into()))?;
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(Reply::Error(e))) => Err(OpError::Rpc(format!(
                "{:?}: {}",
                tonic::Code::from_i32(e.code),
                e.message
            ))),
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(OpError::Rpc("batch stream ended".into())),
            Err(_) => Err(OpError::Rpc("batch item timed out".into())),
        }
    }
}
