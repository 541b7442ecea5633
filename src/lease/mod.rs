//! Session liveness on the meta group's leader. Keep-alives are not logged:
//! the leader (after confirming it still leads) moves the session's deadline
//! on its monotonic clock. Only the leader expires sessions, by proposing
//! `ExpireBatch{term, [(id, epoch)]}` for the deadlines that passed (up to
//! [`MAX_EXPIRE_BATCH`] per entry); it checkpoints sessions'
//! remaining times, and a new leader starts every session at its checkpointed
//! remaining time plus one election timeout (so a leader change neither kills
//! a live session nor keeps a dead one alive forever).
//!
//! The leader's work is bounded by what changes, not by how many sessions
//! there are: it reads every session once, when it takes over (or when the
//! meta group's change history it follows was compacted under it), and then
//! learns grants, ends and checkpoints from the applied changes (the watch
//! hub). A session is checkpointed only once its remaining time has drifted
//! from the recorded one by a [`CHECKPOINT_DRIFT_DIVISOR`]th of its TTL, at
//! most [`MAX_CHECKPOINT_BATCH`] per [`CHECKPOINT_INTERVAL`], largest drift
//! first — like etcd's lease checkpoints, which go in batches of 1 000.
//! Before, every tick re-read every session and every second rewrote each
//! one's record: 100 000 idle sessions kept an idle 3-node cluster at 1.3 of
//! its 2 cores.

use std::collections::HashMap;
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use crate::codec;
use crate::node::{MAX_FORWARD_HOPS, Node};
use crate::router::META_GROUP;
use crate::sm::session::{SessionCommand, SessionRecord, SessionResponse};
use crate::sm::{Command, Response};
use crate::storage::keys;
use crate::watch::Cursor;

/// How often the leader looks for expired sessions.
pub const EXPIRY_TICK: Duration = Duration::from_millis(100);
/// How often the leader checkpoints the sessions that drifted.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// Most sessions one checkpoint records.
pub const MAX_CHECKPOINT_BATCH: usize = 1000;
/// Most sessions one expiry proposal ends (each releases its locks in the
/// same apply).
pub const MAX_EXPIRE_BATCH: usize = 1000;
/// A session is checkpointed once its remaining time differs from the
/// recorded one by at least `ttl_ms / CHECKPOINT_DRIFT_DIVISOR`. Keep-alives
/// every TTL/3 move a live session's remaining time by a third of its TTL, so
/// it is recorded about once per keep-alive, never more than once a second; a
/// dead one's record trails its true remaining time by at most an eighth of its
/// TTL plus an interval, which a leader change then adds to its life.
pub const CHECKPOINT_DRIFT_DIVISOR: u64 = 8;
/// Deadline of the leader's own proposals.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the leader knows of one live session.
#[derive(Clone, Copy, Debug)]
struct Tracked {
    deadline: Instant,
    /// The record's epoch (an expiry must name it).
    epoch: u64,
    ttl_ms: u64,
    /// Remaining time in the record (the last checkpoint's).
    recorded_ms: u64,
}

impl Tracked {
    fn from_record(deadline: Instant, rec: &SessionRecord) -> Tracked {
        Tracked {
            deadline,
            epoch: rec.epoch,
            ttl_ms: rec.ttl_ms,
            recorded_ms: rec.remaining_ms,
        }
    }

    /// Takes the record's replicated fields; the deadline stays.
    fn update(&mut self, rec: &SessionRecord) {
        self.epoch = rec.epoch;
        self.ttl_ms = rec.ttl_ms;
        self.recorded_ms = rec.remaining_ms;
    }
}

#[derive(Default)]
struct ClockState {
    /// The meta term these deadlines belong to (0: none yet).
    term: u64,
    sessions: HashMap<u64, Tracked>,
    /// The meta group's applied changes after the last sync (`None`: a full
    /// sync is due).
    cursor: Option<Cursor>,
    last_checkpoint: Option<Instant>,
}

impl ClockState {
    /// A session record as applied: a session this clock has not seen starts
    /// at its recorded remaining time (a grant: its TTL).
    fn observe(&mut self, id: u64, rec: &SessionRecord, now: Instant) {
        self.sessions
            .entry(id)
            .and_modify(|t| t.update(rec))
            .or_insert_with(|| {
                Tracked::from_record(now + Duration::from_millis(rec.remaining_ms), rec)
            });
    }
}

/// The meta leader's session deadlines.
#[derive(Default)]
pub struct SessionClock {
    state: Mutex<ClockState>,
}

impl SessionClock {
    /// Whether the clock must be synced (see [`SessionClock::sync`]) before
    /// it serves `term`: a new term, or lost track of the applied changes.
    pub fn needs_sync(&self, term: u64) -> bool {
        self.state
            .lock()
            .map_or(true, |st| st.term != term || st.cursor.is_none())
    }

    /// Brings the clock to `term` and `sessions`, every live session as read
    /// after `cursor` was taken (so no change falls between the two; the
    /// cursor then replays some the read already saw, which is harmless). A
    /// new term starts every session at its remaining time + `grace`; in the
    /// same term known sessions keep their deadlines, new ones start at their
    /// remaining time, ended ones are dropped.
    pub fn sync(
        &self,
        term: u64,
        cursor: Cursor,
        sessions: &[(u64, SessionRecord)],
        grace: Duration,
    ) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let now = Instant::now();
        if st.term != term {
            st.term = term;
            st.last_checkpoint = Some(now);
            st.sessions = sessions
                .iter()
                .map(|(id, r)| {
                    let deadline = now + Duration::from_millis(r.remaining_ms) + grace;
                    (*id, Tracked::from_record(deadline, r))
                })
                .collect();
        } else {
            let live: std::collections::HashSet<u64> = sessions.iter().map(|(id, _)| *id).collect();
            st.sessions.retain(|id, _| live.contains(id));
            for (id, r) in sessions {
                st.observe(*id, r, now);
            }
        }
        st.cursor = Some(cursor);
    }

    /// Applies the session changes the meta group applied since the last
    /// sync or catch-up. False if the clock must be synced first (no cursor,
    /// or its history was compacted).
    pub fn catch_up(&self) -> bool {
        let Ok(mut st) = self.state.lock() else {
            return false;
        };
        let Some(cursor) = st.cursor.as_mut() else {
            return false;
        };
        let Ok(events) = cursor.poll() else {
            st.cursor = None;
            return false;
        };
        let now = Instant::now();
        for change in events.iter().flat_map(|e| &e.changes) {
            let Some(id) = keys::session_id_of(&change.record_key) else {
                continue;
            };
            match &change.value {
                Some(bytes) => match codec::decode::<SessionRecord>(bytes) {
                    Ok(rec) => st.observe(id, &rec, now),
                    Err(_) => {
                        st.cursor = None;
                        return false;
                    }
                },
                None => {
                    st.sessions.remove(&id);
                }
            }
        }
        true
    }

    /// Renews `id` (whose record is `rec`) for its TTL if this clock follows
    /// `term`; returns false if it must be synced first.
    pub fn keep_alive(&self, term: u64, id: u64, rec: &SessionRecord) -> bool {
        let Ok(mut st) = self.state.lock() else {
            return false;
        };
        if st.term != term {
            return false;
        }
        let deadline = Instant::now() + Duration::from_millis(rec.ttl_ms);
        st.sessions
            .entry(id)
            .and_modify(|t| t.deadline = deadline)
            .or_insert_with(|| Tracked::from_record(deadline, rec));
        true
    }

    /// Remaining time of `id` on this clock, if it follows `term`.
    pub fn remaining(&self, term: u64, id: u64) -> Option<Duration> {
        let st = self.state.lock().ok()?;
        if st.term != term {
            return None;
        }
        st.sessions
            .get(&id)
            .map(|t| t.deadline.saturating_duration_since(Instant::now()))
    }

    /// Forgets everything (this node no longer leads the meta group).
    pub fn clear(&self) {
        if let Ok(mut st) = self.state.lock() {
            *st = ClockState::default();
        }
    }

    /// Sessions past their deadline, with the epoch an expiry must name.
    fn expired(&self) -> Vec<(u64, u64)> {
        let now = Instant::now();
        self.state
            .lock()
            .map(|st| {
                st.sessions
                    .iter()
                    .filter(|(_, t)| t.deadline <= now)
                    .map(|(id, t)| (*id, t.epoch))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// (session, remaining ms) to checkpoint, if a checkpoint is due and any
    /// session drifted enough (see [`CHECKPOINT_DRIFT_DIVISOR`]).
    fn checkpoint_due(&self) -> Option<Vec<(u64, u64)>> {
        let mut st = self.state.lock().ok()?;
        let now = Instant::now();
        if st
            .last_checkpoint
            .is_some_and(|t| now.duration_since(t) < CHECKPOINT_INTERVAL)
        {
            return None;
        }
        st.last_checkpoint = Some(now);
        let mut drifted: Vec<(u64, u64, u64)> = st
            .sessions
            .iter()
            .filter_map(|(id, t)| {
                let remaining_ms =
                    u64::try_from(t.deadline.saturating_duration_since(now).as_millis())
                        .unwrap_or(u64::MAX);
                let drift_ms = remaining_ms.abs_diff(t.recorded_ms);
                let bound_ms = (t.ttl_ms / CHECKPOINT_DRIFT_DIVISOR).max(1);
                (drift_ms >= bound_ms).then_some((*id, remaining_ms, drift_ms))
            })
            .collect();
        if drifted.is_empty() {
            return None;
        }
        if drifted.len() > MAX_CHECKPOINT_BATCH {
            drifted.select_nth_unstable_by(MAX_CHECKPOINT_BATCH - 1, |a, b| b.2.cmp(&a.2));
            drifted.truncate(MAX_CHECKPOINT_BATCH);
        }
        Some(drifted.into_iter().map(|(id, r, _)| (id, r)).collect())
    }

    fn forget(&self, id: u64) {
        if let Ok(mut st) = self.state.lock() {
            st.sessions.remove(&id);
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
        if (node.sessions.needs_sync(term) || !node.sessions.catch_up())
            && let Err(e) = node.sync_sessions(term)
        {
            tracing::warn!(error = %e, "reading sessions failed");
            continue;
        }
        let deadline = Instant::now() + PROPOSE_TIMEOUT;
        for batch in node.sessions.expired().chunks(MAX_EXPIRE_BATCH) {
            let cmd = Command::Session(SessionCommand::ExpireBatch {
                term,
                sessions: batch.to_vec(),
                now_ms: crate::clock::now_ms(),
            });
            match node
                .propose(META_GROUP, cmd, deadline, MAX_FORWARD_HOPS)
                .await
            {
                Ok(Response::Session(SessionResponse::ExpiredBatch { ended, missing })) => {
                    if !ended.is_empty() {
                        tracing::info!(
                            sessions = ended.len(),
                            first = ended[0],
                            "sessions expired"
                        );
                    }
                    // The rest were refused (stale epoch, or a first TTL not
                    // over by this leader's wall clock): the next tick retries.
                    for id in ended.iter().chain(&missing) {
                        node.sessions.forget(*id);
                    }
                }
                // A stale term: this node no longer leads; the next tick sees it.
                Ok(Response::Session(SessionResponse::Rejected(r))) => {
                    tracing::debug!(reason = %r, "expiry refused");
                }
                Ok(other) => tracing::warn!(?other, "unexpected expiry result"),
                Err(e) => {
                    tracing::warn!(sessions = batch.len(), error = %e, "expiry not proposed");
                    break;
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::{Change, Event, WatchHub};

    fn record(ttl_ms: u64, remaining_ms: u64, epoch: u64) -> SessionRecord {
        SessionRecord {
            ttl_ms,
            granted_ms: 1,
            remaining_ms,
            epoch,
            locks: Vec::new(),
        }
    }

    fn change(id: u64, rec: Option<&SessionRecord>) -> Change {
        Change {
            record_key: keys::session_key(id),
            value: rec.map(|r| codec::encode(r).expect("encode")),
        }
    }

    /// A clock synced in term 1 to `sessions` (no grace), following `hub`.
    fn synced(hub: &WatchHub, sessions: &[(u64, SessionRecord)]) -> SessionClock {
        let clock = SessionClock::default();
        clock.sync(1, hub.cursor(META_GROUP, 0), sessions, Duration::ZERO);
        clock
    }

    #[test]
    fn the_clock_learns_grants_updates_and_ends_from_applied_changes() {
        let hub = WatchHub::new();
        hub.register(META_GROUP, 10);
        let clock = synced(&hub, &[(5, record(60_000, 60_000, 0))]);
        assert!(!clock.needs_sync(1));
        assert!(clock.needs_sync(2), "a new term needs a full read");
        assert!(clock.keep_alive(1, 5, &record(60_000, 60_000, 0)));
        let granted = record(30_000, 30_000, 0);
        let checkpointed = record(60_000, 40_000, 1);
        hub.publish(
            META_GROUP,
            vec![
                Event {
                    revision: 11,
                    changes: vec![change(11, Some(&granted))],
                },
                Event {
                    revision: 12,
                    changes: vec![change(5, Some(&checkpointed))],
                },
            ],
            12,
        );
        assert!(clock.catch_up());
        let new = clock.remaining(1, 11).expect("the grant is on the clock");
        assert!(new <= Duration::from_millis(30_000) && new > Duration::from_millis(29_000));
        // A record change takes the epoch and recorded time, not the deadline
        // a keep-alive set.
        let kept = clock.remaining(1, 5).expect("still there");
        assert!(kept > Duration::from_millis(59_000), "{kept:?}");
        let st = clock.state.lock().expect("lock");
        assert_eq!(
            (st.sessions[&5].epoch, st.sessions[&5].recorded_ms),
            (1, 40_000)
        );
        drop(st);
        hub.publish(
            META_GROUP,
            vec![Event {
                revision: 13,
                changes: vec![change(11, None)],
            }],
            13,
        );
        assert!(clock.catch_up());
        assert_eq!(
            clock.remaining(1, 11),
            None,
            "an ended session leaves the clock"
        );
    }

    #[test]
    fn a_compacted_history_or_a_bad_record_asks_for_a_full_read() {
        let hub = WatchHub::new();
        hub.register(META_GROUP, 10);
        let clock = synced(&hub, &[]);
        // A snapshot install restarts the history past the cursor.
        hub.reset(META_GROUP, 20);
        hub.publish(
            META_GROUP,
            vec![Event {
                revision: 21,
                changes: vec![change(21, Some(&record(5000, 5000, 0)))],
            }],
            21,
        );
        assert!(!clock.catch_up());
        assert!(clock.needs_sync(1));

        let clock = synced(&hub, &[]);
        hub.publish(
            META_GROUP,
            vec![Event {
                revision: 22,
                changes: vec![Change {
                    record_key: keys::session_key(22),
                    value: Some(b"\xff\xff not a record".to_vec()),
                }],
            }],
            22,
        );
        assert!(!clock.catch_up());
        assert!(clock.needs_sync(1));
    }

    /// A clock synced to `sessions` whose records all say 80 s remain, with
    /// a checkpoint due.
    fn recorded_at_80s(hub: &WatchHub, sessions: &[(u64, SessionRecord)]) -> SessionClock {
        let clock = synced(hub, sessions);
        {
            let mut st = clock.state.lock().expect("lock");
            for t in st.sessions.values_mut() {
                t.recorded_ms = 80_000;
            }
            st.last_checkpoint = None;
        }
        clock
    }

    #[test]
    fn a_checkpoint_takes_only_drifted_sessions_largest_drift_first_and_at_most_a_batch() {
        let hub = WatchHub::new();
        hub.register(META_GROUP, 1);
        // Session i: TTL 80 s (drift bound 10 s), recorded 80 s, remaining
        // 80 s - 20 i ms after the sync: only i >= 500 have drifted enough.
        let n = MAX_CHECKPOINT_BATCH as u64 + 500;
        let sessions: Vec<(u64, SessionRecord)> = (0..n)
            .map(|i| (i, record(80_000, 80_000 - i * 20, 0)))
            .collect();
        let clock = recorded_at_80s(&hub, &sessions);
        let items = clock.checkpoint_due().expect("due");
        // Drift i * 20 ms >= 10 000 ms: i >= 500, i.e. 1 000 sessions, all
        // fitting in one batch.
        assert_eq!(items.len(), MAX_CHECKPOINT_BATCH);
        assert!(items.iter().all(|(id, _)| *id >= 500), "undrifted included");
        assert!(clock.checkpoint_due().is_none(), "one per interval");

        let more: Vec<(u64, SessionRecord)> =
            (0..n).map(|i| (i, record(80_000, 40_000 - i, 0))).collect();
        let clock = recorded_at_80s(&hub, &more);
        let items = clock.checkpoint_due().expect("due");
        assert_eq!(items.len(), MAX_CHECKPOINT_BATCH, "capped");
        // Every one drifted; the 500 that drifted least wait for the next one.
        assert!(items.iter().all(|(id, _)| *id >= 500), "not largest first");
    }
}
