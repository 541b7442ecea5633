//! In-test TCP proxies, one per directed peer link (node i dials node j
//! through proxy i→j, configured with `--peer-route`), so the nemesis can cut,
//! blackhole, slow down or delay a link without root. A gRPC call from i to j
//! and its reply both travel on i's connection, so link i→j carries i's
//! requests to j. Two kinds of slowness: a *throttle* (each chunk waits its
//! turn and then the throttle time: a congested link, whose delay grows with
//! the traffic queued) and a *latency* (each chunk is delivered that long after
//! it was read, chunks pipelined: a long link at full throughput, like netem).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What a link does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkMode {
    /// Forward (after the link's delay).
    Pass,
    /// Refuse: connections are closed at once.
    Drop,
    /// Accept and swallow everything; nothing arrives, nothing is answered.
    Blackhole,
}

/// One directed link's proxy.
pub struct LinkProxy {
    /// Address the dialling node uses.
    pub listen: String,
    mode: watch::Sender<LinkMode>,
    delay_ms: Arc<AtomicU64>,
    latency_ms: Arc<AtomicU64>,
}

impl LinkProxy {
    /// Starts a proxy on a free loopback port forwarding to `target`.
    pub async fn start(target: String) -> LinkProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let listen = listener.local_addr().expect("proxy addr").to_string();
        let (mode, _) = watch::channel(LinkMode::Pass);
        let delay_ms = Arc::new(AtomicU64::new(0));
        let latency_ms = Arc::new(AtomicU64::new(0));
        let (m, slow) = (
            mode.clone(),
            Slowness {
                throttle_ms: delay_ms.clone(),
                latency_ms: latency_ms.clone(),
            },
        );
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let _ = inbound.set_nodelay(true);
                tokio::spawn(serve_conn(
                    inbound,
                    target.clone(),
                    m.subscribe(),
                    slow.clone(),
                ));
            }
        });
        LinkProxy {
            listen,
            mode,
            delay_ms,
            latency_ms,
        }
    }

    /// Changes the mode; every open connection is closed so the next one
    /// starts clean in the new mode.
    pub fn set(&self, mode: LinkMode) {
        self.mode.send_replace(mode);
    }

    /// The current mode.
    pub fn mode(&self) -> LinkMode {
        *self.mode.borrow()
    }

    /// Throttles the link: every chunk forwarded waits its turn, then `ms`
    /// (0 = none).
    pub fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::Relaxed);
    }

    /// Delivers every chunk `ms` after it was read, pipelined (0 = none).
    pub fn set_latency(&self, ms: u64) {
        self.latency_ms.store(ms, Ordering::Relaxed);
    }
}

/// A link's throttle and latency, shared by its connections.
#[derive(Clone)]
struct Slowness {
    throttle_ms: Arc<AtomicU64>,
    latency_ms: Arc<AtomicU64>,
}

async fn serve_conn(
    inbound: TcpStream,
    target: String,
    mut mode: watch::Receiver<LinkMode>,
    slow: Slowness,
) {
    let start_mode = *mode.borrow_and_update();
    match start_mode {
        LinkMode::Drop => {}
        LinkMode::Blackhole => {
            let (mut r, _w) = inbound.into_split();
            let mut buf = vec![0u8; 16 << 10];
            loop {
                tokio::select! {
                    n = r.read(&mut buf) => if !matches!(n, Ok(n) if n > 0) { return },
                    _ = mode.changed() => return,
                }
            }
        }
        LinkMode::Pass => {
            let Ok(Ok(outbound)) =
                tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(&target)).await
            else {
                return;
            };
            let _ = outbound.set_nodelay(true);
            let (ir, iw) = inbound.into_split();
            let (or, ow) = outbound.into_split();
            tokio::select! {
                _ = pump(ir, ow, slow.clone()) => {}
                _ = pump(or, iw, slow) => {}
                _ = mode.changed() => {}
            }
        }
    }
}

/// Copies `from` to `to`: a reader stamps each chunk with its delivery time
/// (now + latency), a writer delivers in order at that time and then waits
/// the throttle.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    slow: Slowness,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(1024);
    let latency_ms = slow.latency_ms;
    let reader = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let latency = Duration::from_millis(latency_ms.load(Ordering::Relaxed));
            let due = tokio::time::Instant::now() + latency;
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    let throttle_ms = slow.throttle_ms;
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let d = throttle_ms.load(Ordering::Relaxed);
            if d > 0 {
                tokio::time::sleep(Duration::from_millis(d)).await;
            }
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
}
