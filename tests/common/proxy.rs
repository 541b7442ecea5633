//! In-test TCP proxies, one per directed peer link (node i dials node j
//! through proxy i→j, configured with `--peer-route`), so the nemesis can cut,
//! blackhole or delay a link without root. A gRPC call from i to j and its
//! reply both travel on i's connection, so link i→j carries i's requests to j.

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
}

impl LinkProxy {
    /// Starts a proxy on a free loopback port forwarding to `target`.
    pub async fn start(target: String) -> LinkProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let listen = listener.local_addr().expect("proxy addr").to_string();
        let (mode, _) = watch::channel(LinkMode::Pass);
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (m, d) = (mode.clone(), delay_ms.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let _ = inbound.set_nodelay(true);
                tokio::spawn(serve_conn(
                    inbound,
                    target.clone(),
                    m.subscribe(),
                    d.clone(),
                ));
            }
        });
        LinkProxy {
            listen,
            mode,
            delay_ms,
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

    /// Adds `ms` of latency to every chunk forwarded (0 = none).
    pub fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::Relaxed);
    }
}

async fn serve_conn(
    inbound: TcpStream,
    target: String,
    mut mode: watch::Receiver<LinkMode>,
    delay_ms: Arc<AtomicU64>,
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
                _ = pump(ir, ow, delay_ms.clone()) => {}
                _ = pump(or, iw, delay_ms) => {}
                _ = mode.changed() => {}
            }
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_ms: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let d = delay_ms.load(Ordering::Relaxed);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
