//! Sessions in the meta group: granted with a TTL, kept alive by the leader
//! without Raft writes (`lease`), expired only by the leader through a logged
//! `Expire` that carries its term and the session's epoch — apply rejects one
//! proposed in a stale term, or based on a view a later checkpoint replaced.
//! Checkpoints record each session's remaining time so a new leader grants
//! that plus an election timeout, never a fresh TTL (etcd #9395).

use serde::{Deserialize, Serialize};

use super::{SmError, StateAccess};
use crate::codec;
use crate::domain::{RejectCode, Rejection};
use crate::storage::keys;

/// Most live sessions a cluster keeps (each costs the meta leader a deadline
/// and a checkpoint slot); a Grant beyond it is refused.
pub const MAX_SESSIONS: u64 = 100_000;

/// A session as replicated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Time to live without a keep-alive.
    pub ttl_ms: u64,
    /// When it was granted (granting node's clock).
    pub granted_ms: u64,
    /// Remaining time at the last checkpoint (the TTL until the first).
    pub remaining_ms: u64,
    /// Bumped by every checkpoint: an expiry must name the current epoch.
    pub epoch: u64,
    /// Locks it holds or waits for (released with it).
    pub locks: Vec<String>,
}

/// A session state change (meta group).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionCommand {
    /// Grants a session; its id is this entry's log index.
    Grant {
        /// Time to live (checked at the edge).
        ttl_ms: u64,
        /// Proposer's clock.
        now_ms: u64,
    },
    /// Closes a session (its owner's request).
    Close {
        /// Session.
        id: u64,
    },
    /// Expires a session (the leader, when its deadline passed).
    Expire {
        /// Session.
        id: u64,
        /// The proposing leader's term: must be this entry's term.
        term: u64,
        /// The session's epoch the leader's deadline was based on.
        epoch: u64,
        /// The proposing leader's wall clock.
        now_ms: u64,
    },
    /// Expires sessions whose deadlines passed (the leader, up to
    /// `lease::MAX_EXPIRE_BATCH` per entry). Each is checked as an `Expire`;
    /// the ones refused live on.
    ExpireBatch {
        /// The proposing leader's term: must be this entry's term.
        term: u64,
        /// (session, the epoch the leader's deadline was based on).
        sessions: Vec<(u64, u64)>,
        /// The proposing leader's wall clock.
        now_ms: u64,
    },
    /// Records every live session's remaining time (the leader, periodically).
    Checkpoint {
        /// The proposing leader's term: must be this entry's term.
        term: u64,
        /// (session, remaining ms).
        items: Vec<(u64, u64)>,
    },
}

/// The replicated result of a [`SessionCommand`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionResponse {
    /// `Grant`.
    Granted {
        /// The new session's id.
        id: u64,
        /// Its TTL.
        ttl_ms: u64,
    },
    /// `Close` / `Expire`: whether the session existed and is now gone.
    Ended {
        /// It existed.
        ended: bool,
    },
    /// `Checkpoint`: how many sessions it recorded.
    Checkpointed {
        /// Count.
        sessions: u32,
    },
    /// `ExpireBatch`: which sessions it ended and which no longer existed
    /// (the others were refused and live on).
    ExpiredBatch {
        /// Ended now.
        ended: Vec<u64>,
        /// Already gone.
        missing: Vec<u64>,
    },
    /// Refused (stale term or epoch, unknown session).
    Rejected(Rejection),
}

fn load(state: &mut dyn StateAccess, id: u64) -> Result<Option<SessionRecord>, SmError> {
    match state.get(&keys::session_key(id))? {
        Some(b) => Ok(Some(codec::decode(&b)?)),
        None => Ok(None),
    }
}

fn count(state: &mut dyn StateAccess) -> Result<u64, SmError> {
    match state.get(&keys::session_count_key())? {
        Some(b) => Ok(codec::decode(&b)?),
        None => Ok(0),
    }
}

fn set_count(state: &mut dyn StateAccess, n: u64) -> Result<(), SmError> {
    state.put(keys::session_count_key(), codec::encode(&n)?)
}

fn stale(what: &str, got: u64, want: u64) -> SessionResponse {
    SessionResponse::Rejected(stale_rejection(what, got, want))
}

fn stale_rejection(what: &str, got: u64, want: u64) -> Rejection {
    Rejection::new(
        RejectCode::IllegalTransition,
        format!("{what} {got} is stale (current {want})"),
    )
}

/// Ends a session: its locks are released (their next waiters promoted) in
/// the same apply.
fn end(
    state: &mut dyn StateAccess,
    index: u64,
    id: u64,
    rec: &SessionRecord,
) -> Result<(), SmError> {
    super::lock::release_all(state, index, id, &rec.locks)?;
    let n = count(state)?;
    set_count(state, n.saturating_sub(1))?;
    state.delete(keys::session_key(id))
}

/// Reads a session record.
pub fn load_record(state: &mut dyn StateAccess, id: u64) -> Result<Option<SessionRecord>, SmError> {
    load(state, id)
}

/// Writes a session record.
pub fn save_record(
    state: &mut dyn StateAccess,
    id: u64,
    rec: &SessionRecord,
) -> Result<(), SmError> {
    state.put(keys::session_key(id), codec::encode(rec)?)
}

/// What an expiry of one session did.
enum Expiry {
    Ended,
    Missing,
    Refused(Rejection),
}

/// Ends session `id` if its record is still at `epoch` and its first TTL has
/// passed by the leader's `now_ms`.
fn expire(
    state: &mut dyn StateAccess,
    index: u64,
    id: u64,
    epoch: u64,
    now_ms: u64,
) -> Result<Expiry, SmError> {
    let Some(rec) = load(state, id)? else {
        return Ok(Expiry::Missing);
    };
    if rec.epoch != epoch {
        return Ok(Expiry::Refused(stale_rejection("epoch", epoch, rec.epoch)));
    }
    // No session ends before its first TTL has passed (keep-alives and
    // leader changes only ever move a deadline later). A leader whose
    // deadlines say otherwise is wrong, or its wall clock is behind the
    // granting leader's: either way the session lives on, and the
    // expiry is retried on the next tick.
    let first_ttl_ends = rec.granted_ms.saturating_add(rec.ttl_ms);
    if now_ms < first_ttl_ends {
        return Ok(Expiry::Refused(Rejection::new(
            RejectCode::IllegalTransition,
            format!(
                "session {id} cannot expire before {first_ttl_ends} (granted + TTL), now {now_ms}"
            ),
        )));
    }
    end(state, index, id, &rec)?;
    Ok(Expiry::Ended)
}

/// Applies `cmd` at log `index`, an entry of leader term `term`.
pub fn apply(
    state: &mut dyn StateAccess,
    index: u64,
    term: u64,
    cmd: &SessionCommand,
) -> Result<SessionResponse, SmError> {
    match cmd {
        SessionCommand::Grant { ttl_ms, now_ms } => {
            let n = count(state)?;
            if n >= MAX_SESSIONS {
                return Ok(SessionResponse::Rejected(Rejection::new(
                    RejectCode::TooManySessions,
                    format!("the cluster already has {MAX_SESSIONS} sessions"),
                )));
            }
            set_count(state, n + 1)?;
            let rec = SessionRecord {
                ttl_ms: *ttl_ms,
                granted_ms: *now_ms,
                remaining_ms: *ttl_ms,
                epoch: 0,
                locks: Vec::new(),
            };
            state.put(keys::session_key(index), codec::encode(&rec)?)?;
            Ok(SessionResponse::Granted {
                id: index,
                ttl_ms: *ttl_ms,
            })
        }
        SessionCommand::Close { id } => {
            let Some(rec) = load(state, *id)? else {
                return Ok(SessionResponse::Ended { ended: false });
            };
            end(state, index, *id, &rec)?;
            Ok(SessionResponse::Ended { ended: true })
        }
        SessionCommand::Expire {
            id,
            term: proposed_in,
            epoch,
            now_ms,
        } => {
            // A proposal forwarded from a deposed leader lands in a later term.
            if *proposed_in != term {
                return Ok(stale("term", *proposed_in, term));
            }
            Ok(match expire(state, index, *id, *epoch, *now_ms)? {
                Expiry::Ended => SessionResponse::Ended { ended: true },
                Expiry::Missing => SessionResponse::Ended { ended: false },
                Expiry::Refused(r) => SessionResponse::Rejected(r),
            })
        }
        SessionCommand::ExpireBatch {
            term: proposed_in,
            sessions,
            now_ms,
        } => {
            if *proposed_in != term {
                return Ok(stale("term", *proposed_in, term));
            }
            let (mut ended, mut missing) = (Vec::new(), Vec::new());
            for (id, epoch) in sessions {
                match expire(state, index, *id, *epoch, *now_ms)? {
                    Expiry::Ended => ended.push(*id),
                    Expiry::Missing => missing.push(*id),
                    Expiry::Refused(_) => {}
                }
            }
            Ok(SessionResponse::ExpiredBatch { ended, missing })
        }
        SessionCommand::Checkpoint {
            term: proposed_in,
            items,
        } => {
            if *proposed_in != term {
                return Ok(stale("term", *proposed_in, term));
            }
            let mut n = 0u32;
            for (id, remaining_ms) in items {
                if let Some(mut rec) = load(state, *id)? {
                    rec.remaining_ms = (*remaining_ms).min(rec.ttl_ms);
                    rec.epoch += 1;
                    state.put(keys::session_key(*id), codec::encode(&rec)?)?;
                    n += 1;
                }
            }
            Ok(SessionResponse::Checkpointed { sessions: n })
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    type Mem = crate::sm::MemState;

    #[test]
    fn expiry_in_a_stale_term_or_epoch_is_rejected() {
        let mut m = Mem::default();
        let granted = apply(
            &mut m,
            7,
            2,
            &SessionCommand::Grant {
                ttl_ms: 3000,
                now_ms: 1,
            },
        )
        .unwrap();
        assert_eq!(
            granted,
            SessionResponse::Granted {
                id: 7,
                ttl_ms: 3000
            }
        );
        // Proposed by the leader of term 2, appended in term 3: refused.
        let expire = |term, epoch| SessionCommand::Expire {
            id: 7,
            term,
            epoch,
            now_ms: 5000,
        };
        assert!(matches!(
            apply(&mut m, 8, 3, &expire(2, 0)).unwrap(),
            SessionResponse::Rejected(_)
        ));
        // A checkpoint bumps the epoch: an expiry based on the older view is refused.
        let cp = SessionCommand::Checkpoint {
            term: 3,
            items: vec![(7, 1200), (99, 5)],
        };
        assert_eq!(
            apply(&mut m, 9, 3, &cp).unwrap(),
            SessionResponse::Checkpointed { sessions: 1 }
        );
        assert!(matches!(
            apply(&mut m, 10, 3, &expire(3, 0)).unwrap(),
            SessionResponse::Rejected(_)
        ));
        assert_eq!(
            load(&mut m, 7).unwrap().unwrap().remaining_ms,
            1200,
            "the checkpoint recorded the remaining time"
        );
        // Stamped before granted (1) + TTL (3000): refused, the session lives on.
        let early = SessionCommand::Expire {
            id: 7,
            term: 3,
            epoch: 1,
            now_ms: 2999,
        };
        assert!(matches!(
            apply(&mut m, 11, 3, &early).unwrap(),
            SessionResponse::Rejected(_)
        ));
        assert!(load(&mut m, 7).unwrap().is_some());
        assert_eq!(
            apply(&mut m, 11, 3, &expire(3, 1)).unwrap(),
            SessionResponse::Ended { ended: true }
        );
        assert_eq!(
            apply(&mut m, 12, 3, &SessionCommand::Close { id: 7 }).unwrap(),
            SessionResponse::Ended { ended: false }
        );
    }

    #[test]
    fn a_batch_expiry_ends_what_an_expiry_would_and_reports_the_missing() {
        let mut m = Mem::default();
        let grant = |ttl_ms| SessionCommand::Grant { ttl_ms, now_ms: 1 };
        for (index, ttl_ms) in [(5, 3000), (6, 3000), (7, 9000)] {
            apply(&mut m, index, 2, &grant(ttl_ms)).unwrap();
        }
        let batch = |term| SessionCommand::ExpireBatch {
            term,
            // 5: due; 6: a stale epoch; 7: its first TTL not over; 8: unknown.
            sessions: vec![(5, 0), (6, 4), (7, 0), (8, 0)],
            now_ms: 5000,
        };
        assert!(matches!(
            apply(&mut m, 9, 3, &batch(2)).unwrap(),
            SessionResponse::Rejected(_)
        ));
        assert_eq!(count(&mut m).unwrap(), 3, "a stale term ends nothing");
        assert_eq!(
            apply(&mut m, 10, 3, &batch(3)).unwrap(),
            SessionResponse::ExpiredBatch {
                ended: vec![5],
                missing: vec![8]
            }
        );
        assert!(load(&mut m, 5).unwrap().is_none());
        assert!(load(&mut m, 6).unwrap().is_some());
        assert!(load(&mut m, 7).unwrap().is_some());
        assert_eq!(count(&mut m).unwrap(), 2);
    }

    #[test]
    fn grants_stop_at_the_session_limit_and_ends_make_room() {
        let mut m = Mem::default();
        let grant = SessionCommand::Grant {
            ttl_ms: 3000,
            now_ms: 1,
        };
        assert!(matches!(
            apply(&mut m, 5, 1, &grant).unwrap(),
            SessionResponse::Granted { id: 5, .. }
        ));
        // As if the cluster were full: the next grant is refused.
        set_count(&mut m, MAX_SESSIONS).unwrap();
        assert!(matches!(
            apply(&mut m, 6, 1, &grant).unwrap(),
            SessionResponse::Rejected(r) if r.code == RejectCode::TooManySessions
        ));
        assert_eq!(load(&mut m, 6).unwrap(), None);
        // Closing one makes room for one.
        apply(&mut m, 7, 1, &SessionCommand::Close { id: 5 }).unwrap();
        assert_eq!(count(&mut m).unwrap(), MAX_SESSIONS - 1);
        assert!(matches!(
            apply(&mut m, 8, 1, &grant).unwrap(),
            SessionResponse::Granted { id: 8, .. }
        ));
    }
}
