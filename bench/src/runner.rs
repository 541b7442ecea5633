//! The closed loop: `clients` tasks, each issuing one operation at a time on its
//! connection for warm-up + duration. Only operations that *start* inside the
//! measured window are recorded; an operation in flight at the end is awaited and
//! counted in `issued`, so callers can check every issued write afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::BenchError;
use crate::client::{Conn, OpError};
use crate::cpu::{CpuPerOp, CpuSample};
use crate::stats::{Recorder, Summary};
use crate::workloads::Workload;

/// Failed operations whose error is printed (the rest are only counted).
const FAILURES_SHOWN: u64 = 5;
/// Pause after a failed operation, so a down endpoint is not spun on.
const ERROR_PAUSE: Duration = Duration::from_millis(5);

/// How long and how wide one run is.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub clients: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Print a progress line to stderr every second.
    pub progress: bool,
    /// Seed of the clients' key choices (client i uses seed + i).
    pub seed: u64,
    /// Server processes whose CPU time is measured over the window (may be empty).
    pub server_pids: Vec<u32>,
}

/// The state one client task carries between its operations.
pub struct Worker {
    pub id: u64,
    /// Operations this client has issued so far (the next one's sequence number).
    pub seq: u64,
    pub rng: SmallRng,
}

/// The random stream of client `id` in a run seeded with `seed`.
pub fn client_rng(seed: u64, id: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed.wrapping_add(id))
}

/// Result of a run: the measured summary and, per client, how many operations it issued.
pub struct RunReport {
    pub summary: Summary,
    pub issued_per_client: Vec<u64>,
    /// CPU per measured operation, from the window's start to the last client's
    /// end (`None` without server pids, if nothing was measured, or if a process
    /// could not be read).
    pub cpu: Option<CpuPerOp>,
}

/// Runs `workload` closed-loop over `conns` (client i uses connection i % len).
pub async fn run<W: Workload>(
    workload: Arc<W>,
    conns: &[Conn],
    spec: &RunSpec,
) -> Result<RunReport, BenchError> {
    if conns.is_empty() || spec.clients == 0 {
        return Err(BenchError::Setup(
            "need at least one connection and one client".into(),
        ));
    }
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let done_ok = Arc::new(AtomicU64::new(0));
    let done_err = Arc::new(AtomicU64::new(0));
    // Set (ns since start) by the first client whose workload says it is over.
    let over_at_ns = Arc::new(AtomicU64::new(u64::MAX));
    // Without server pids there is nothing to compare: no CPU figure at all.
    let pids = spec.server_pids.clone();
    let cpu_at_start = (!pids.is_empty()).then(|| {
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            CpuSample::take(&pids)
        })
    });

    let mut tasks = Vec::with_capacity(spec.clients);
    for id in 0..spec.clients {
        let mut conn = conns[id % conns.len()].clone();
        let workload = Arc::clone(&workload);
        let (done_ok, done_err) = (Arc::clone(&done_ok), Arc::clone(&done_err));
        let over_at_ns = Arc::clone(&over_at_ns);
        let mut worker = Worker {
            id: id as u64,
            seq: 0,
            rng: client_rng(spec.seed, id as u64),
        };
        tasks.push(tokio::spawn(async move {
            let mut recorder = Recorder::new();
            loop {
                let t0 = Instant::now();
                if t0 >= end || over_at_ns.load(Ordering::Relaxed) != u64::MAX {
                    break;
                }
                let result = workload.op(&mut conn, &mut worker).await;
                worker.seq += 1;
                let measured = t0 >= measure_from;
                match result {
                    Ok(done) => {
                        done_ok.fetch_add(1, Ordering::Relaxed);
                        if measured {
                            recorder.ok(t0.elapsed(), done.retries);
                        }
                    }
                    Err(OpError::Done) => {
                        let at = start.elapsed().as_nanos() as u64;
                        over_at_ns.fetch_min(at, Ordering::Relaxed);
                        break;
                    }
                    Err(e) => {
                        // The first few failures say what went wrong.
                        if done_err.fetch_add(1, Ordering::Relaxed) < FAILURES_SHOWN {
                            eprintln!("  client {}: {e}", worker.id);
                        }
                        if measured {
                            recorder.error();
                        }
                        tokio::time::sleep(ERROR_PAUSE).await;
                    }
                }
            }
            (recorder, worker.seq)
        }));
    }

    let progress = spec.progress.then(|| {
        let (done_ok, done_err) = (Arc::clone(&done_ok), Arc::clone(&done_err));
        let name = workload.name();
        let clients = spec.clients;
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let ok = done_ok.load(Ordering::Relaxed);
                let phase = if Instant::now() < measure_from {
                    "warm-up"
                } else {
                    "measure"
                };
                eprintln!(
                    "  {name} clients={clients} {phase} t={:>3}s ops/s={:>7} errors={}",
                    start.elapsed().as_secs(),
                    ok - last,
                    done_err.load(Ordering::Relaxed)
                );
                last = ok;
            }
        })
    });

    let mut total = Recorder::new();
    let mut issued_per_client = Vec::with_capacity(spec.clients);
    for task in tasks {
        let (recorder, issued) = task
            .await
            .map_err(|e| BenchError::Setup(format!("client task failed: {e}")))?;
        total.merge(&recorder);
        issued_per_client.push(issued);
    }
    if let Some(p) = progress {
        p.abort();
    }
    // A workload that ended early (sold out) is measured up to that moment.
    let window = match over_at_ns.load(Ordering::Relaxed) {
        u64::MAX => spec.duration,
        at => Duration::from_nanos(at).saturating_sub(spec.warmup),
    };
    let summary = total.summary(window);
    let cpu = match cpu_at_start {
        None => None,
        Some(start) => {
            let start = start
                .await
                .map_err(|e| BenchError::Setup(e.to_string()))
                .and_then(|r| r);
            match (start, CpuSample::take(&spec.server_pids)) {
                (Ok(a), Ok(b)) => a.per_op(&b, summary.ops),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("  cpu time not measured: {e}");
                    None
                }
            }
        }
    };
    Ok(RunReport {
        summary,
        issued_per_client,
        cpu,
    })
}
