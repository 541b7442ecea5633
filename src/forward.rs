//! Forwarding of client requests to a group's leader on another node: one
//! long-lived `Peer.Forward` stream per destination node carries every forwarded
//! proposal and read, many in flight at once, replies matched by id. Compared
//! with one unary RPC per request this saves the HTTP/2 stream set-up, headers
//! and task per request on both sides, which dominated forwarding under load.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::proto::peer_client::PeerClient;
use crate::proto::{ForwardFrame, GroupMessage};
use crate::raft::network::PeerRouter;

/// Requests queued for one link before senders are told it is overloaded.
const LINK_QUEUE: usize = 4096;
/// Replies a link waits for at most; beyond that new requests are refused.
pub const MAX_IN_FLIGHT_PER_LINK: usize = 16_384;
/// How long opening a link's stream may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(2);

/// How a forwarded request ended.
#[derive(Debug)]
pub enum Forwarded {
    /// The remote's encoded reply.
    Reply(Vec<u8>),
    /// The request certainly did not reach the remote handler.
    NotSent(String),
    /// It may have reached it; its outcome is unknown.
    Unknown(String),
}

type ReplyTx = oneshot::Sender<Forwarded>;

/// The forwarding links of one node, one per destination node.
pub struct Forwarder {
    router: PeerRouter,
    links: Mutex<HashMap<u64, mpsc::Sender<(ForwardFrame, ReplyTx)>>>,
    next_id: AtomicU64,
}

impl Forwarder {
    /// Forwarding over `router`'s peer channels.
    pub fn new(router: PeerRouter) -> Forwarder {
        Forwarder {
            router,
            links: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    /// Sends one request to `node` and waits up to `timeout` for its reply.
    pub async fn forward(
        &self,
        node: u64,
        message: GroupMessage,
        write: bool,
        timeout: Duration,
    ) -> Forwarded {
        let frame = ForwardFrame {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            message: Some(message),
            write,
            timeout_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
            deadline_unix_ms: crate::clock::now_ms()
                .saturating_add(timeout.as_millis().try_into().unwrap_or(u64::MAX)),
        };
        let (tx, rx) = oneshot::channel();
        let link = match self.link(node) {
            Ok(link) => link,
            Err(why) => return Forwarded::NotSent(why),
        };
        match link.try_send((frame, tx)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Forwarded::NotSent(format!("forwarding queue to node {node} is full"));
            }
            Err(mpsc::error::TrySendError::Closed((frame, tx))) => {
                // The link ended before taking the request: open a new one, once.
                self.drop_link(node);
                match self.link(node) {
                    Ok(link) if link.try_send((frame, tx)).is_ok() => {}
                    Ok(_) => return Forwarded::NotSent(format!("no link to node {node}")),
                    Err(why) => return Forwarded::NotSent(why),
                }
            }
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Forwarded::Unknown(format!("link to node {node} dropped the request")),
            Err(_) => Forwarded::Unknown(format!("forwarding to node {node}: deadline passed")),
        }
    }

    fn link(&self, node: u64) -> Result<mpsc::Sender<(ForwardFrame, ReplyTx)>, String> {
        let mut links = self
            .links
            .lock()
            .map_err(|_| "forwarding links poisoned".to_string())?;
        if let Some(link) = links.get(&node).filter(|l| !l.is_closed()) {
            return Ok(link.clone());
        }
        let client = self.router.client(node).map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        tokio::spawn(run_link(node, client, rx));
        links.insert(node, tx.clone());
        Ok(tx)
    }

    fn drop_link(&self, node: u64) {
        if let Ok(mut links) = self.links.lock() {
            links.remove(&node);
        }
    }
}

/// Owns one link: opens the stream, sends queued requests, routes replies by id.
/// When the stream fails, every request in flight ends `Unknown` (or `NotSent` if
/// the stream never opened) and the link ends; the next request opens a new one.
async fn run_link(
    node: u64,
    mut client: PeerClient<tonic::transport::Channel>,
    mut requests: mpsc::Receiver<(ForwardFrame, ReplyTx)>,
) {
    let mut pending: HashMap<u64, ReplyTx> = HashMap::new();
    let (frames_tx, frames_rx) = mpsc::channel::<ForwardFrame>(LINK_QUEUE);
    let outbound = ReceiverStream::new(frames_rx);
    // Take the first request before opening so an idle link costs nothing.
    let Some((first, reply)) = requests.recv().await else {
        return;
    };
    pending.insert(first.id, reply);
    delay_point!("forward-link-before-send");
    if frames_tx.send(first).await.is_err() {
        fail_all(&mut pending, || {
            Forwarded::NotSent(format!("link to node {node} closed"))
        });
        return;
    }
    let opened = tokio::time::timeout(OPEN_TIMEOUT, client.forward(outbound)).await;
    let mut replies = match opened {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => {
            let why = format!("forwarding to node {node}: {}", status.message());
            let never = never_sent(&status);
            fail_all(&mut pending, || {
                if never {
                    Forwarded::NotSent(why.clone())
                } else {
                    Forwarded::Unknown(why.clone())
                }
            });
            return;
        }
        Err(_) => {
            let why = format!("forwarding to node {node}: stream did not open");
            fail_all(&mut pending, || Forwarded::Unknown(why.clone()));
            return;
        }
    };
    loop {
        tokio::select! {
            request = requests.recv(), if pending.len() < MAX_IN_FLIGHT_PER_LINK => {
                let Some((frame, reply)) = request else { break };
                let id = frame.id;
                pending.insert(id, reply);
                delay_point!("forward-link-before-send");
                if frames_tx.send(frame).await.is_err() {
                    break;
                }
            }
            reply = replies.message() => match reply {
                Ok(Some(r)) => {
                    if let Some(tx) = pending.remove(&r.id) {
                        let _ = tx.send(Forwarded::Reply(r.payload));
                    }
                }
                Ok(None) | Err(_) => break,
            },
        }
    }
    // Stop taking requests first, so none is queued behind a dead stream.
    requests.close();
    while let Ok((_, reply)) = requests.try_recv() {
        let _ = reply.send(Forwarded::NotSent(format!("link to node {node} closed")));
    }
    fail_all(&mut pending, || {
        Forwarded::Unknown(format!("forwarding stream to node {node} broke"))
    });
}

fn fail_all(pending: &mut HashMap<u64, ReplyTx>, outcome: impl Fn() -> Forwarded) {
    for (_, tx) in pending.drain() {
        let _ = tx.send(outcome());
    }
}

/// Whether a failed call certainly never reached the remote handler.
pub fn never_sent(status: &tonic::Status) -> bool {
    let msg = status.message().to_ascii_lowercase();
    status.code() == tonic::Code::Unavailable
        && (msg.contains("connect") || msg.contains("refused"))
}
