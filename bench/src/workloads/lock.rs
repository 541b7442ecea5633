//! W3: lock cycles over 16 names. One operation = one whole cycle on a random
//! name, the way a job runner takes a lock: shopkv — `Session.Create`,
//! `Lock.Acquire` (exclusive, waits), `Lock.Release`, `Session.Close`; etcd —
//! `LeaseGrant`, `Lock` (on the lease; waits), `Unlock`, `LeaseRevoke` (what
//! `etcdctl lock` does). Also measured: the hand-off latency, from a holder
//! starting its release to the waiter that was queued behind it returning from
//! its acquire; printed after the run as
//! `HANDOFF workload=lock system=… samples=… p50_ms=… p99_ms=…` (samples from
//! the whole run, warm-up included).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;

use super::{OpDone, Workload};
use crate::BenchError;
use crate::client::{Conn, OpError, request, rpc_error};
use crate::proto;
use crate::runner::Worker;
use crate::stats::Recorder;

/// Session / lease TTL: long enough that no cycle outlives it.
const TTL_MS: u64 = 10_000;

/// The lock-cycle workload.
pub struct Lock {
    names: u64,
    /// Per name: when its holder last started releasing it.
    last_release: Vec<Mutex<Option<Instant>>>,
    handoff: Mutex<Recorder>,
    system: Mutex<Option<&'static str>>,
}

impl Lock {
    pub fn new(names: u64) -> Lock {
        let names = names.max(1);
        Lock {
            names,
            last_release: (0..names).map(|_| Mutex::new(None)).collect(),
            handoff: Mutex::new(Recorder::new()),
            system: Mutex::new(None),
        }
    }

    fn name(i: u64) -> String {
        format!("w3/lock-{i:02}")
    }

    fn slot(&self, i: u64) -> std::sync::MutexGuard<'_, Option<Instant>> {
        match self.last_release[i as usize].lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Acquired `i` at `now` after asking at `asked`: a hand-off if the
    /// previous holder released while this client waited.
    fn acquired(&self, i: u64, asked: Instant, now: Instant) {
        let released = *self.slot(i);
        if let Some(r) = released.filter(|r| *r > asked) {
            let mut h = match self.handoff.lock() {
                Ok(h) => h,
                Err(p) => p.into_inner(),
            };
            h.ok(now.saturating_duration_since(r), 0);
        }
    }

    fn releasing(&self, i: u64) {
        *self.slot(i) = Some(Instant::now());
    }

    fn note_system(&self, s: &'static str) {
        if let Ok(mut g) = self.system.lock() {
            g.get_or_insert(s);
        }
    }
}

impl Workload for Lock {
    fn name(&self) -> String {
        "lock".into()
    }

    async fn setup(&self, _conns: &[Conn]) -> Result<(), BenchError> {
        Ok(())
    }

    async fn op(&self, conn: &mut Conn, worker: &mut Worker) -> Result<OpDone, OpError> {
        let i = worker.rng.random_range(0..self.names);
        let name = Self::name(i);
        match conn {
            Conn::Shopkv(c) => {
                self.note_system("shopkv");
                let session = c
                    .sessions
                    .create(request(proto::CreateSessionRequest { ttl_ms: TTL_MS }))
                    .await
                    .map_err(rpc_error)?
                    .into_inner()
                    .session_id;
                let asked = Instant::now();
                let acquired = c
                    .locks
                    .acquire(request(proto::AcquireRequest {
                        name: name.clone(),
                        session_id: session,
                        mode: proto::LockMode::Exclusive as i32,
                        wait_timeout_ms: TTL_MS,
                    }))
                    .await;
                if acquired.is_ok() {
                    self.acquired(i, asked, Instant::now());
                    self.releasing(i);
                    c.locks
                        .release(request(proto::ReleaseRequest {
                            name,
                            session_id: session,
                        }))
                        .await
                        .map_err(rpc_error)?;
                }
                // Closing also ends a wait that failed: nothing stays queued.
                c.sessions
                    .close(request(proto::CloseSessionRequest {
                        session_id: session,
                    }))
                    .await
                    .map_err(rpc_error)?;
                acquired.map_err(rpc_error)?;
                Ok(OpDone::default())
            }
            #[cfg(feature = "etcd")]
            Conn::Etcd(client) => {
                self.note_system("etcd");
                let e = |e: etcd_client::Error| OpError::Rpc(e.to_string());
                let lease = client
                    .lease_grant((TTL_MS / 1000) as i64, None)
                    .await
                    .map_err(e)?
                    .id();
                let asked = Instant::now();
                let locked = client
                    .lock(
                        name.as_bytes(),
                        Some(etcd_client::LockOptions::new().with_lease(lease)),
                    )
                    .await;
                if let Ok(l) = &locked {
                    self.acquired(i, asked, Instant::now());
                    self.releasing(i);
                    client.unlock(l.key()).await.map_err(e)?;
                }
                client.lease_revoke(lease).await.map_err(e)?;
                locked.map_err(e)?;
                Ok(OpDone::default())
            }
        }
    }

    async fn verify(&self, _conns: &[Conn]) -> Result<(), BenchError> {
        let h = match self.handoff.lock() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        let s = h.summary(Duration::from_secs(1));
        let system = self.system.lock().ok().and_then(|g| *g).unwrap_or("?");
        eprintln!(
            "HANDOFF workload=lock system={system} samples={} p50_ms={:.2} p99_ms={:.2}",
            s.ops, s.p50_ms, s.p99_ms
        );
        Ok(())
    }
}
