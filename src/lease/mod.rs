//! Session liveness on the meta group's leader. Keep-alives are not logged:
//! the leader (after confirming it still leads) moves the session's deadline
//! on its monotonic clock. Only the leader expires sessions, by proposing
//! `Expire{id, term, epoch}` once a deadline passes; it checkpoints every
//! session's remaining time each [`CHECKPOINT_INTERVAL`], and a new leader
//! starts every session at its checkpointed remaining time plus one election
//! timeout (so a leader change neither kills a live session nor keeps a dead
//! one alive forever).

use std::collections::HashMap;
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use crate::node::{MAX_FORWARD_HOPS, Node};
use crate::router::META_GROUP;
use crate::sm::session::{SessionCommand, SessionRecord, SessionResponse};
use crate::sm::{Command, Response};

/// How often the leader looks for expired sessions.
pub const EXPIRY_TICK: Duration = Duration::from_millis(100);
/// How often the leader checkpoints remaining times.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// Deadline of the leader's own proposals.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct ClockState {
    /// The meta term these deadlines belong to (0: none yet).
    term: u64,
    deadlines: HashMap<u64, Instant>,
    last_checkpoint: Option<Instant>,
}

/// The meta leader's session deadlines.
#[derive(Default)]
pub struct SessionClock {
    state: Mutex<ClockState>,
}

impl SessionClock {
    /// Brings the deadlines to `term` and the replicated `sessions`: a new
    /// term starts every session at its remaining time + `grace`; sessions
    /// granted since start at their remaining time; ended ones are dropped.
    pub fn sync(&self, term: u64, sessions: &[(u64, SessionRecord)], grace: Duration) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let now = Instant::now();
        if st.term != term {
            st.term = term;
            st.last_checkpoint = Some(now);
            st.deadlines = sessions
                .iter()
                .map(|(id, r)| (*id, now + Duration::from_millis(r.remaining_ms) + grace))
                .collect();
            return;
        }
        let live: std::collections::HashSet<u64> = sessions.iter().map(|(id, _)| *id).collect();
        st.deadlines.retain(|id, _| live.contains(id));
        for (id, r) in sessions {
            st.deadlines
                .entry(*id)
                .or_insert(now + Duration::from_millis(r.remaining_ms));
        }
    }

    /// Renews `id` for `ttl_ms` if this clock follows `term`; returns false if
    /// it must be synced first.
    pub fn keep_alive(&self, term: u64, id: u64, ttl_ms: u64) -> bool {
        let Ok(mut st) = self.state.lock() else {
            return false;
        };
        if st.term != term {
            return false;
        }
        st.deadlines
            .insert(id, Instant::now() + Duration::from_millis(ttl_ms));
        true
    }

    /// Remaining time of `id` on this clock, if it follows `term`.
    pub fn remaining(&self, term: u64, id: u64) -> Option<Duration> {
        let st = self.state.lock().ok()?;
        if st.term != term {
            return None;
        }
        st.deadlines
            .get(&id)
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Forgets everything (this node no longer leads the meta group).
    pub fn clear(&self) {
        if let Ok(mut st) = self.state.lock() {
            *st = ClockState::default();
        }
    }

    fn expired(&self) -> Vec<u64> {
        let now = Instant::now();
        self.state
            .lock()
            .map(|st| {
                st.deadlines
                    .iter()
                    .filter(|(_, d)| **d <= now)
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Remaining times to checkpoint, if one is due.
    fn checkpoint_due(&self) -> Option<Vec<(u64, u64)>> {
        let mut st = self.state.lock().ok()?;
        let now = Instant::now();
        if st
            .last_checkpoint
            .is_some_and(|t| now.duration_since(t) < CHECKPOINT_INTERVAL)
            || st.deadlines.is_empty()
        {
            return None;
        }
        st.last_checkpoint = Some(now);
        Some(
            st.deadlines
                .iter()
                .map(|(id, d)| (*id, d.saturating_duration_since(now).as_millis() as u64))
                .collect(),
        )
    }

    fn forget(&self, id: u64) {
        if let Ok(mut st) = self.state.lock() {
            st.deadlines.remove(&id);
        }
    }
}

/// The expiry and checkpoint loop; runs until the node is dropped.
pub async fn run(node: Weak<Node>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        let Some(term) = node.meta_leader_term() else {
            node.sessions.clear();
            continue;
        };
        let sessions = match node.all_sessions() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "reading sessions failed");
                continue;
            }
        };
        node.sessions.sync(term, &sessions, node.election_timeout());
        let epochs: HashMap<u64, u64> = sessions.iter().map(|(id, r)| (*id, r.epoch)).collect();
        let deadline = Instant::now() + PROPOSE_TIMEOUT;
        for id in node.sessions.expired() {
            let Some(&epoch) = epochs.get(&id) else {
                continue;
            };
            let cmd = Command::Session(SessionCommand::Expire {
                id,
                term,
                epoch,
                now_ms: crate::clock::now_ms(),
            });
            match node
                .propose(META_GROUP, cmd, deadline, MAX_FORWARD_HOPS)
                .await
            {
                Ok(Response::Session(SessionResponse::Ended { .. })) => {
                    tracing::info!(session = id, "session expired");
                    node.sessions.forget(id);
                }
                // Stale epoch or term: the next tick retries with fresh state.
                Ok(Response::Session(SessionResponse::Rejected(r))) => {
                    tracing::debug!(session = id, reason = %r, "expiry refused");
                }
                Ok(other) => tracing::warn!(session = id, ?other, "unexpected expiry result"),
                Err(e) => tracing::warn!(session = id, error = %e, "expiry not proposed"),
            }
        }
        if let Some(items) = node.sessions.checkpoint_due() {
            let cmd = Command::Session(SessionCommand::Checkpoint { term, items });
            if let Err(e) = node
                .propose(META_GROUP, cmd, deadline, MAX_FORWARD_HOPS)
                .await
            {
                tracing::info!(error = %e, "session checkpoint not proposed");
            }
        }
    }
}
