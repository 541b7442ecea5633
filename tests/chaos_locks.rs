//! Chaos for locks and fencing: 8 clients contend for one lock and, while
//! holding it, increment a counter record (claim the shard with the token,
//! read, write value + 1, both writes fenced; no compare-and-swap),
//! on a 3-node cluster whose nodes a seeded nemesis kills (SIGKILL), pauses
//! (SIGSTOP) and cuts off from the others (the meta leader mostly: it may
//! still think it leads). Sessions are short (2 s TTL, one per critical section)
//! so holders that dawdle lose the lock mid-section to expiry and write late;
//! a client closes its session after each section, a failed one too, as
//! lock clients do (an Acquire waits 4 s, past a dead holder's TTL).
//! Checks: the final counter lies between the acknowledged increments and
//! those plus the unknown outcomes (equal when none is unknown); every
//! acknowledged increment wrote a distinct value; no two acknowledged writes
//! carry the same token; and in value order the tokens strictly increase
//! (the store never accepted a write older than one it had accepted). Lock
//! collection runs every 300 ms, so fence floors move under the nemesis too.
//!
//! `SHOPKV_CHAOS_LOCKS_SECS` (default 25) and `SHOPKV_CHAOS_SEED` change the run.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestCluster;
use common::proxy::LinkMode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shopkv::proto;
use shopkv::proto::kv_client::KvClient;
use shopkv::proto::lock_client::LockClient;
use shopkv::proto::session_client::SessionClient;
use tonic::transport::Channel;

const CLIENTS: u32 = 8;
const LOCK: &str = "chaos/counter";
const KEY: &[u8] = b"chaos/counter";
const OP_TIMEOUT: Duration = Duration::from_millis(2000);
const SESSION_TTL_MS: u64 = 2000;
/// How long an Acquire waits in the queue: past a dead holder's TTL, so a
/// waiter outlives a holder that went away without closing its session.
const ACQUIRE_WAIT_MS: u64 = 4000;
/// The Acquire call's own deadline: its wait and a margin to answer.
const ACQUIRE_TIMEOUT: Duration = Duration::from_millis(ACQUIRE_WAIT_MS + 1000);
/// How long a client keeps trying to close its session.
const CLOSE_RETRY_FOR: Duration = Duration::from_secs(5);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One acknowledged increment.
#[derive(Clone, Debug)]
struct Acked {
    client: u32,
    token: u64,
    value: u64,
}

struct Run {
    acked: Mutex<Vec<Acked>>,
    unknown: AtomicU32,
    stale_refused: AtomicU32,
    /// Of those, refused by the shard's fence floor (the hold was over).
    floor_refused: AtomicU32,
    stop: AtomicBool,
}

struct Conn {
    sessions: SessionClient<Channel>,
    locks: LockClient<Channel>,
    kv: KvClient<Channel>,
}

fn conns(endpoints: &[String]) -> Vec<Conn> {
    let channel = |e: &String, timeout: Duration| {
        tonic::transport::Endpoint::from_shared(format!("http://{e}"))
            .expect("endpoint")
            .connect_timeout(Duration::from_millis(300))
            .timeout(timeout)
            .connect_lazy()
    };
    endpoints
        .iter()
        .map(|e| {
            let ch = channel(e, OP_TIMEOUT);
            Conn {
                sessions: SessionClient::new(ch.clone()),
                locks: LockClient::new(channel(e, ACQUIRE_TIMEOUT)),
                kv: KvClient::new(ch),
            }
        })
        .collect()
}

/// Ends `session` (and so its place in the lock's queue) through any node
/// that answers, as a lock client does when its critical section failed,
/// retrying through an election: left to its TTL, a session whose acquire
/// died with its node stays queued and is handed the lock in turn, holding
/// the others up — for longer while the meta leader keeps changing, as each
/// new leader grants every session an election timeout more.
async fn close_session(cs: &mut [Conn], at: usize, session: u64) {
    let give_up_at = Instant::now() + CLOSE_RETRY_FOR;
    for i in 0.. {
        let c = &mut cs[(at + i) % cs.len()];
        match c
            .sessions
            .close(proto::CloseSessionRequest {
                session_id: session,
            })
            .await
        {
            Ok(_) => return,
            Err(s) if s.code() == tonic::Code::NotFound => return,
            Err(_) if Instant::now() < give_up_at => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => return,
        }
    }
}

/// A write of `value` to `key` under the lock's `token`.
fn fenced_put(key: &[u8], value: String, token: u64) -> proto::PutRequest {
    proto::PutRequest {
        key: key.to_vec(),
        value: value.into_bytes(),
        fence: Some(proto::Fence {
            lock_name: LOCK.into(),
            token,
        }),
    }
}

impl Run {
    /// Counts a write refused for its fencing token.
    fn note_stale(&self, s: &tonic::Status) {
        self.stale_refused.fetch_add(1, Ordering::Relaxed);
        if s.message().contains("hold that is over") {
            self.floor_refused.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One critical section through `c` in `session`: lock, claim, read, fenced
/// put. `Err(())` when a step failed before the counter write.
async fn section(
    run: &Run,
    c: &mut Conn,
    session: u64,
    client: u32,
    rng: &mut StdRng,
) -> Result<(), ()> {
    let token = c
        .locks
        .acquire(proto::AcquireRequest {
            name: LOCK.into(),
            session_id: session,
            mode: proto::LockMode::Exclusive as i32,
            wait_timeout_ms: ACQUIRE_WAIT_MS,
        })
        .await
        .map_err(|_| ())?
        .into_inner()
        .fencing_token;
    // Claim the counter's shard with the token before reading: from then on
    // it accepts no write under an older token, so this read-modify-write
    // cannot interleave with a stale holder's (fencing orders writes only).
    if let Err(s) =
        c.kv.put(fenced_put(b"chaos/owner", client.to_string(), token))
            .await
    {
        if s.message().contains("stale fencing token") {
            run.note_stale(&s);
        }
        return Err(());
    }
    let current = match c
        .kv
        .get(proto::GetRequest {
            key: KEY.to_vec(),
            serializable: false,
        })
        .await
    {
        Ok(r) => r.into_inner().record,
        Err(s) if s.code() == tonic::Code::NotFound => None,
        Err(_) => return Err(()),
    };
    let value = current
        .map(|r| {
            String::from_utf8_lossy(&r.value)
                .parse::<u64>()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    // Sometimes dawdle past the session's TTL: the lock moves on meanwhile.
    if rng.random_range(0..10) == 0 {
        tokio::time::sleep(Duration::from_millis(SESSION_TTL_MS + 1200)).await;
    }
    match c
        .kv
        .put(fenced_put(KEY, (value + 1).to_string(), token))
        .await
    {
        Ok(_) => run.acked.lock().expect("acked").push(Acked {
            client,
            token,
            value: value + 1,
        }),
        Err(s) if s.message().contains("stale fencing token") => run.note_stale(&s),
        Err(_) => {
            run.unknown.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

async fn client_loop(run: Arc<Run>, endpoints: Vec<String>, client: u32, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cs = conns(&endpoints);
    let mut at = (client as usize) % cs.len();
    while !run.stop.load(Ordering::Relaxed) {
        let created = cs[at]
            .sessions
            .create(proto::CreateSessionRequest {
                ttl_ms: SESSION_TTL_MS,
            })
            .await;
        let ok = match created {
            Ok(r) => {
                let session = r.into_inner().session_id;
                let ok = tokio::time::timeout(
                    Duration::from_secs(10),
                    section(&run, &mut cs[at], session, client, &mut rng),
                )
                .await;
                close_session(&mut cs, at, session).await;
                matches!(ok, Ok(Ok(())))
            }
            Err(_) => false,
        };
        if !ok {
            at = (at + 1) % cs.len();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_counter_under_kills_pauses_and_partitions_loses_no_increment() {
    let secs = env_u64("SHOPKV_CHAOS_LOCKS_SECS", 25);
    let seed = env_u64("SHOPKV_CHAOS_SEED", rand::rng().random());
    println!("CHAOS_LOCKS seed={seed} (SHOPKV_CHAOS_SEED to repeat)");
    let mut rng = StdRng::seed_from_u64(seed);
    // Lock collection every 300 ms: the meta leader raises the fence floor
    // under the kills too, and refuses late holders by it (never a live one:
    // the run would then acknowledge too little).
    let mut c = TestCluster::start_with_proxies(3, &["--lock-gc-interval-ms", "300"]).await;
    c.init(1).await;
    c.wait_ready(Duration::from_secs(30)).await;
    let run = Arc::new(Run {
        acked: Mutex::new(Vec::new()),
        unknown: AtomicU32::new(0),
        stale_refused: AtomicU32::new(0),
        floor_refused: AtomicU32::new(0),
        stop: AtomicBool::new(false),
    });
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(client_loop(
                run.clone(),
                c.endpoints(),
                i,
                seed.wrapping_mul(31).wrapping_add(u64::from(i)),
            ))
        })
        .collect();
    let (mut kills, mut pauses, mut partitions) = (0u32, 0u32, 0u32);
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        tokio::time::sleep(
            Duration::from_millis(rng.random_range(1500..3000)).min(end - Instant::now()),
        )
        .await;
        c.heal_links();
        c.revive_all();
        if Instant::now() >= end {
            break;
        }
        match rng.random_range(0..4) {
            0 => {
                if let Some(l) = c.leader_of(0, rng.random_range(1..=3)).await {
                    c.kill(l);
                    kills += 1;
                }
            }
            1 => {
                c.kill(rng.random_range(1..=3));
                kills += 1;
            }
            2 => {
                c.pause(rng.random_range(1..=3));
                pauses += 1;
            }
            _ => {
                // Cut the meta leader (else any node) off from the others,
                // both ways: it may still believe it leads and hold its
                // sessions' deadlines, and its clients' calls hang or fail.
                let via = rng.random_range(1..=3);
                let id = match c.leader_of(0, via).await {
                    Some(l) if rng.random_bool(0.7) => l,
                    _ => rng.random_range(1..=3),
                };
                let others: Vec<u64> = (1..=3).filter(|n| *n != id).collect();
                let mode = if rng.random_bool(0.5) {
                    LinkMode::Drop
                } else {
                    LinkMode::Blackhole
                };
                c.set_links(&[id], &others, mode, true);
                partitions += 1;
            }
        }
    }
    c.heal_links();
    c.revive_all();
    run.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    c.wait_ready(Duration::from_secs(30)).await;

    let mut kv = c.kv(1).await;
    let final_value: u64 = common::get(&mut kv, "chaos/counter", false)
        .await
        .expect("read the counter")
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(0);
    let mut acked = run.acked.lock().expect("acked").clone();
    let unknown = u64::from(run.unknown.load(Ordering::Relaxed));
    let stale = run.stale_refused.load(Ordering::Relaxed);
    let floor = run.floor_refused.load(Ordering::Relaxed);
    println!(
        "CHAOS_LOCKS seed={seed} secs={secs} kills={kills} pauses={pauses} partitions={partitions} acked={} unknown={unknown} stale_refused={stale} (by the floor {floor}) final={final_value}",
        acked.len()
    );
    let mut violations = Vec::new();
    let n = acked.len() as u64;
    if final_value < n || final_value > n + unknown {
        violations.push(format!(
            "counter {final_value} outside acknowledged {n} .. +{unknown} unknown"
        ));
    }
    let mut by_token: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
    for a in &acked {
        if let Some(other) = by_token.insert(a.token, a.client) {
            violations.push(format!(
                "token {} carried by writes of clients {other} and {}",
                a.token, a.client
            ));
        }
    }
    acked.sort_by_key(|a| a.value);
    for w in acked.windows(2) {
        if w[0].value == w[1].value {
            violations.push(format!("value {} acknowledged twice: {w:?}", w[0].value));
        }
        if w[0].token >= w[1].token {
            violations.push(format!("tokens not increasing in value order: {w:?}"));
        }
    }
    if n < 10 {
        violations.push(format!(
            "only {n} increments acknowledged: the run did too little"
        ));
    }
    if !violations.is_empty() {
        let kept = c.keep();
        panic!(
            "violations (seed {seed}; data dirs and node logs kept in {}): {violations:#?}",
            kept.display()
        );
    }
}
