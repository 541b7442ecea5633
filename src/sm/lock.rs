//! Fair locks in the meta group, the ZooKeeper recipe done server-side: each
//! lock is a FIFO queue of (session, mode); an exclusive entry holds when it
//! is first, a shared one when everything before it is shared. An entry that
//! comes to hold gets the fencing token = the log index of that moment, so
//! tokens strictly increase per lock (and across the cluster). Acquire is
//! idempotent per (lock, session); releasing, closing or expiring the session
//! removes its entries and promotes the next ones in the same apply.

use serde::{Deserialize, Serialize};

use super::session;
use super::{SmError, StateAccess};
use crate::codec;
use crate::domain::{RejectCode, Rejection};
use crate::storage::keys;

/// Most locks one session may hold or wait for.
pub const MAX_LOCKS_PER_SESSION: usize = 1000;
/// Most lock names one `Forget` names (its proposer's batch).
pub const MAX_FORGET_BATCH: usize = 1000;

/// Exclusive or shared (read-write lock).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockMode {
    /// One holder.
    Exclusive,
    /// Any number of shared holders, none exclusive.
    Shared,
}

/// One queue entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockEntry {
    /// Owner.
    pub session: u64,
    /// Mode.
    pub mode: LockMode,
    /// Fencing token once it holds (0 while waiting).
    pub token: u64,
    /// An election candidate's proclaimed value (empty for a plain lock).
    pub value: Vec<u8>,
    /// The Acquire or Campaign call that last joined (or joined again) with
    /// this session: a leave owed on a gone caller's behalf removes the entry
    /// only while it is still that call's, not one a later call took over.
    pub call_id: u64,
}

/// A lock: its queue in arrival order, holders first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    /// Holders and waiters, FIFO.
    pub queue: Vec<LockEntry>,
    /// The highest token ever given.
    pub last_token: u64,
}

/// A lock state change (meta group).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockCommand {
    /// Joins the queue (or finds the session already in it, and takes its
    /// entry over for this call).
    Acquire {
        /// Lock name.
        name: String,
        /// Owner session (must exist).
        session: u64,
        /// Mode.
        mode: LockMode,
        /// This call's id (see [`LockEntry::call_id`]).
        call_id: u64,
    },
    /// Leaves the queue (holding or waiting).
    Release {
        /// Lock name.
        name: String,
        /// Owner session.
        session: u64,
    },
    /// Election: joins the queue exclusively with a value (the leader is
    /// the holder).
    Campaign {
        /// Election (lock) name.
        name: String,
        /// Candidate session (must exist).
        session: u64,
        /// The candidate's value.
        value: Vec<u8>,
        /// This call's id (see [`LockEntry::call_id`]).
        call_id: u64,
    },
    /// Leaves the queue on behalf of the call `call_id`, whose caller went
    /// away: nothing if the session's entry is now another call's.
    Leave {
        /// Lock name.
        name: String,
        /// Owner session.
        session: u64,
        /// The call that joined.
        call_id: u64,
    },
    /// Election: the leader replaces its value.
    Proclaim {
        /// Election (lock) name.
        name: String,
        /// Leader session.
        session: u64,
        /// The leadership's token (must still hold).
        token: u64,
        /// New value.
        value: Vec<u8>,
    },
    /// Election: the leader of `token` steps down (nothing if that
    /// leadership is over).
    Resign {
        /// Election (lock) name.
        name: String,
        /// Leader session.
        session: u64,
        /// The leadership's token.
        token: u64,
    },
    /// Forgets idle locks: deletes the record of each whose queue is empty
    /// (its `last_token` goes with it; later tokens are later log indices
    /// all the same). A lock joined since it was found idle is kept.
    Forget {
        /// Lock names, at most [`MAX_FORGET_BATCH`].
        names: Vec<String>,
    },
}

/// The replicated result of a [`LockCommand`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockResponse {
    /// The session holds the lock with this token.
    Held {
        /// Fencing token.
        token: u64,
    },
    /// The session waits behind `ahead` entries.
    Waiting {
        /// Entries before it.
        ahead: u32,
    },
    /// `Release`: whether the session was in the queue.
    Released {
        /// It was.
        existed: bool,
    },
    /// Refused (unknown session).
    Rejected(Rejection),
    /// `Forget`: how many records were deleted.
    Forgotten {
        /// Idle locks forgotten.
        count: u32,
    },
}

/// Promotes waiters that may now hold: an exclusive one when first, shared
/// ones while everything before them is shared.
fn grant(rec: &mut LockRecord, index: u64) {
    let mut all_shared_so_far = true;
    for (i, e) in rec.queue.iter_mut().enumerate() {
        let may_hold = match e.mode {
            LockMode::Exclusive => i == 0,
            LockMode::Shared => all_shared_so_far,
        };
        if !may_hold {
            break;
        }
        if e.token == 0 {
            e.token = index;
            rec.last_token = index;
        }
        all_shared_so_far &= e.mode == LockMode::Shared;
    }
}

fn load(state: &mut dyn StateAccess, name: &str) -> Result<LockRecord, SmError> {
    match state.get(&keys::lock_key(name))? {
        Some(b) => Ok(codec::decode(&b)?),
        None => Ok(LockRecord::default()),
    }
}

fn store(state: &mut dyn StateAccess, name: &str, rec: &LockRecord) -> Result<(), SmError> {
    if rec.queue.is_empty() && rec.last_token == 0 {
        return state.delete(keys::lock_key(name));
    }
    state.put(keys::lock_key(name), codec::encode(rec)?)
}

fn position(rec: &LockRecord, session: u64) -> Option<(usize, &LockEntry)> {
    rec.queue
        .iter()
        .enumerate()
        .find(|(_, e)| e.session == session)
}

fn answer(rec: &LockRecord, session: u64) -> LockResponse {
    match position(rec, session) {
        Some((_, e)) if e.token != 0 => LockResponse::Held { token: e.token },
        Some((i, _)) => LockResponse::Waiting { ahead: i as u32 },
        None => LockResponse::Released { existed: false },
    }
}

/// Applies `cmd` at log `index`.
pub fn apply(
    state: &mut dyn StateAccess,
    index: u64,
    cmd: &LockCommand,
) -> Result<LockResponse, SmError> {
    match cmd {
        LockCommand::Acquire {
            name,
            session,
            mode,
            call_id,
        } => join(state, index, name, *session, *mode, Vec::new(), *call_id),
        LockCommand::Campaign {
            name,
            session,
            value,
            call_id,
        } => join(
            state,
            index,
            name,
            *session,
            LockMode::Exclusive,
            value.clone(),
            *call_id,
        ),
        LockCommand::Leave {
            name,
            session,
            call_id,
        } => {
            let existed = release_if(state, index, name, *session, |e| e.call_id == *call_id)?;
            Ok(LockResponse::Released { existed })
        }
        LockCommand::Proclaim {
            name,
            session,
            token,
            value,
        } => {
            let mut rec = load(state, name)?;
            let Some(e) = rec.queue.iter_mut().find(|e| holds_as(e, *session, *token)) else {
                return Ok(not_leader(name, *session));
            };
            e.value = value.clone();
            store(state, name, &rec)?;
            Ok(LockResponse::Held { token: *token })
        }
        LockCommand::Resign {
            name,
            session,
            token,
        } => {
            let existed = release_if(state, index, name, *session, |e| {
                holds_as(e, *session, *token)
            })?;
            Ok(LockResponse::Released { existed })
        }
        LockCommand::Release { name, session } => {
            let existed = release_if(state, index, name, *session, |_| true)?;
            Ok(LockResponse::Released { existed })
        }
        LockCommand::Forget { names } => {
            let mut count = 0;
            for name in names {
                let key = keys::lock_key(name);
                let Some(bytes) = state.get(&key)? else {
                    continue;
                };
                let rec: LockRecord = codec::decode(&bytes)?;
                if rec.queue.is_empty() {
                    state.delete(key)?;
                    count += 1;
                }
            }
            Ok(LockResponse::Forgotten { count })
        }
    }
}

/// Whether `e` is `session` holding with fencing token `token` (one leadership).
fn holds_as(e: &LockEntry, session: u64, token: u64) -> bool {
    token != 0 && e.session == session && e.token == token
}

fn not_leader(name: &str, session: u64) -> LockResponse {
    LockResponse::Rejected(Rejection::new(
        RejectCode::NotLeader,
        format!("session {session} does not hold that leadership of {name}"),
    ))
}

/// Adds `session` to `name`'s queue (once; a later call takes the entry
/// over) and answers where it stands.
fn join(
    state: &mut dyn StateAccess,
    index: u64,
    name: &str,
    session: u64,
    mode: LockMode,
    value: Vec<u8>,
    call_id: u64,
) -> Result<LockResponse, SmError> {
    let Some(mut owner) = session::load_record(state, session)? else {
        return Ok(LockResponse::Rejected(Rejection::new(
            RejectCode::UnknownSession,
            format!("no session {session} (closed or expired)"),
        )));
    };
    let mut rec = load(state, name)?;
    if let Some(e) = rec.queue.iter_mut().find(|e| e.session == session) {
        if e.call_id != call_id {
            e.call_id = call_id;
            store(state, name, &rec)?;
        }
    } else {
        if owner.locks.len() >= MAX_LOCKS_PER_SESSION {
            return Ok(LockResponse::Rejected(Rejection::new(
                RejectCode::TooManyLocks,
                format!("session {session} already has {MAX_LOCKS_PER_SESSION} locks"),
            )));
        }
        rec.queue.push(LockEntry {
            session,
            mode,
            token: 0,
            value,
            call_id,
        });
        grant(&mut rec, index);
        store(state, name, &rec)?;
        owner.locks.push(name.to_string());
        session::save_record(state, session, &owner)?;
    }
    Ok(answer(&rec, session))
}

/// Removes `session`'s entry from lock `name` if `which` accepts it (one
/// read of the record), and promotes the next entries.
fn release_if(
    state: &mut dyn StateAccess,
    index: u64,
    name: &str,
    session: u64,
    which: impl Fn(&LockEntry) -> bool,
) -> Result<bool, SmError> {
    let mut rec = load(state, name)?;
    let before = rec.queue.len();
    rec.queue.retain(|e| e.session != session || !which(e));
    let existed = rec.queue.len() != before;
    if existed {
        grant(&mut rec, index);
        store(state, name, &rec)?;
        if let Some(mut owner) = session::load_record(state, session)? {
            owner.locks.retain(|l| l != name);
            session::save_record(state, session, &owner)?;
        }
    }
    Ok(existed)
}

/// Releases every lock of a session that is ending (its record is deleted
/// right after, so it is not updated per lock).
pub fn release_all(
    state: &mut dyn StateAccess,
    index: u64,
    session: u64,
    names: &[String],
) -> Result<(), SmError> {
    for name in names {
        let mut rec = load(state, name)?;
        rec.queue.retain(|e| e.session != session);
        grant(&mut rec, index);
        store(state, name, &rec)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sm::MemState;
    use crate::sm::session::SessionRecord;

    fn with_sessions(ids: &[u64]) -> MemState {
        let mut m = MemState::default();
        for id in ids {
            let rec = SessionRecord {
                ttl_ms: 1000,
                granted_ms: 0,
                remaining_ms: 1000,
                epoch: 0,
                locks: Vec::new(),
            };
            session::save_record(&mut m, *id, &rec).unwrap();
        }
        m
    }

    /// An Acquire by a call with id `index`.
    fn acquire(m: &mut MemState, index: u64, session: u64, mode: LockMode) -> LockResponse {
        acquire_as(m, index, session, mode, index)
    }

    fn acquire_as(
        m: &mut MemState,
        index: u64,
        session: u64,
        mode: LockMode,
        call_id: u64,
    ) -> LockResponse {
        let cmd = LockCommand::Acquire {
            name: "l".into(),
            session,
            mode,
            call_id,
        };
        apply(m, index, &cmd).unwrap()
    }

    fn leave(m: &mut MemState, index: u64, session: u64, call_id: u64) -> LockResponse {
        let cmd = LockCommand::Leave {
            name: "l".into(),
            session,
            call_id,
        };
        apply(m, index, &cmd).unwrap()
    }

    fn rel(m: &mut MemState, index: u64, session: u64) -> LockResponse {
        let cmd = LockCommand::Release {
            name: "l".into(),
            session,
        };
        apply(m, index, &cmd).unwrap()
    }

    #[test]
    fn forget_deletes_only_idle_locks() {
        let mut m = with_sessions(&[1, 2]);
        use LockMode::Exclusive as X;
        acquire(&mut m, 10, 1, X);
        rel(&mut m, 11, 1);
        // Idle, but remembered until forgotten.
        let idle = load(&mut m, "l").unwrap();
        assert!(idle.queue.is_empty() && idle.last_token == 10);
        let busy = LockCommand::Acquire {
            name: "busy".into(),
            session: 2,
            mode: X,
            call_id: 12,
        };
        apply(&mut m, 12, &busy).unwrap();
        let forget = LockCommand::Forget {
            names: vec!["l".into(), "busy".into(), "never".into()],
        };
        assert_eq!(
            apply(&mut m, 13, &forget).unwrap(),
            LockResponse::Forgotten { count: 1 }
        );
        assert_eq!(m.get(&keys::lock_key("l")).unwrap(), None);
        assert_eq!(load(&mut m, "busy").unwrap().queue.len(), 1);
        // A forgotten lock's next holder still gets a larger token.
        assert_eq!(acquire(&mut m, 14, 1, X), LockResponse::Held { token: 14 });
    }

    #[test]
    fn waiters_hold_in_fifo_order_with_increasing_tokens() {
        let mut m = with_sessions(&[1, 2, 3]);
        use LockMode::Exclusive as X;
        assert_eq!(acquire(&mut m, 10, 1, X), LockResponse::Held { token: 10 });
        assert_eq!(
            acquire(&mut m, 11, 2, X),
            LockResponse::Waiting { ahead: 1 }
        );
        assert_eq!(
            acquire(&mut m, 12, 3, X),
            LockResponse::Waiting { ahead: 2 }
        );
        // Idempotent per session: asking again changes nothing.
        assert_eq!(
            acquire(&mut m, 13, 2, X),
            LockResponse::Waiting { ahead: 1 }
        );
        assert_eq!(rel(&mut m, 14, 1), LockResponse::Released { existed: true });
        assert_eq!(acquire(&mut m, 15, 2, X), LockResponse::Held { token: 14 });
        assert_eq!(rel(&mut m, 16, 2), LockResponse::Released { existed: true });
        assert_eq!(acquire(&mut m, 17, 3, X), LockResponse::Held { token: 16 });
        assert_eq!(
            rel(&mut m, 18, 9),
            LockResponse::Released { existed: false }
        );
    }

    #[test]
    fn a_leave_removes_the_entry_only_while_it_is_its_calls() {
        let mut m = with_sessions(&[1, 2]);
        use LockMode::Exclusive as X;
        assert_eq!(
            acquire_as(&mut m, 10, 1, X, 100),
            LockResponse::Held { token: 10 }
        );
        assert_eq!(
            acquire_as(&mut m, 11, 2, X, 200),
            LockResponse::Waiting { ahead: 1 }
        );
        // Session 2 asks again in a new call, which takes its entry over: the
        // first call's leave (its caller gone) must not remove it.
        assert_eq!(
            acquire_as(&mut m, 12, 2, X, 201),
            LockResponse::Waiting { ahead: 1 }
        );
        assert_eq!(
            leave(&mut m, 13, 2, 200),
            LockResponse::Released { existed: false }
        );
        assert_eq!(load(&mut m, "l").unwrap().queue.len(), 2);
        // A holder's own call leaves: the lock passes on.
        assert_eq!(
            leave(&mut m, 14, 1, 100),
            LockResponse::Released { existed: true }
        );
        assert_eq!(
            acquire_as(&mut m, 15, 2, X, 201),
            LockResponse::Held { token: 14 }
        );
        assert_eq!(
            leave(&mut m, 16, 2, 201),
            LockResponse::Released { existed: true }
        );
        assert!(load(&mut m, "l").unwrap().queue.is_empty());
        let owner = session::load_record(&mut m, 2).unwrap().unwrap();
        assert!(owner.locks.is_empty(), "{owner:?}");
    }

    #[test]
    fn shared_holders_coexist_and_exclusive_waits_for_them() {
        let mut m = with_sessions(&[1, 2, 3, 4]);
        use LockMode::{Exclusive as X, Shared as S};
        assert_eq!(acquire(&mut m, 10, 1, S), LockResponse::Held { token: 10 });
        assert_eq!(acquire(&mut m, 11, 2, S), LockResponse::Held { token: 11 });
        assert_eq!(
            acquire(&mut m, 12, 3, X),
            LockResponse::Waiting { ahead: 2 }
        );
        // A reader behind a waiting writer waits too (no writer starvation).
        assert_eq!(
            acquire(&mut m, 13, 4, S),
            LockResponse::Waiting { ahead: 3 }
        );
        rel(&mut m, 14, 1);
        assert_eq!(
            acquire(&mut m, 15, 3, X),
            LockResponse::Waiting { ahead: 1 }
        );
        rel(&mut m, 16, 2);
        assert_eq!(acquire(&mut m, 17, 3, X), LockResponse::Held { token: 16 });
        rel(&mut m, 18, 3);
        assert_eq!(acquire(&mut m, 19, 4, S), LockResponse::Held { token: 18 });
    }

    #[test]
    fn an_unknown_session_cannot_queue_and_release_all_frees_every_lock() {
        let mut m = with_sessions(&[1, 2]);
        assert!(matches!(
            acquire(&mut m, 5, 7, LockMode::Exclusive),
            LockResponse::Rejected(_)
        ));
        acquire(&mut m, 6, 1, LockMode::Exclusive);
        acquire(&mut m, 7, 2, LockMode::Exclusive);
        let owner = session::load_record(&mut m, 1).unwrap().unwrap();
        assert_eq!(owner.locks, vec!["l".to_string()]);
        release_all(&mut m, 8, 1, &owner.locks).unwrap();
        assert_eq!(
            acquire(&mut m, 9, 2, LockMode::Exclusive),
            LockResponse::Held { token: 8 }
        );
    }

    #[test]
    fn only_the_current_leadership_proclaims_or_resigns() {
        let mut m = with_sessions(&[1, 2]);
        let campaign = |session, v: &str| LockCommand::Campaign {
            name: "l".into(),
            session,
            value: v.as_bytes().to_vec(),
            call_id: session,
        };
        assert_eq!(
            apply(&mut m, 10, &campaign(1, "a")).unwrap(),
            LockResponse::Held { token: 10 }
        );
        assert_eq!(
            apply(&mut m, 11, &campaign(2, "b")).unwrap(),
            LockResponse::Waiting { ahead: 1 }
        );
        let proclaim = |session, token| LockCommand::Proclaim {
            name: "l".into(),
            session,
            token,
            value: b"a2".to_vec(),
        };
        assert_eq!(
            apply(&mut m, 12, &proclaim(1, 10)).unwrap(),
            LockResponse::Held { token: 10 }
        );
        assert!(
            matches!(apply(&mut m, 13, &proclaim(2, 10)).unwrap(), LockResponse::Rejected(r) if r.code == RejectCode::NotLeader)
        );
        assert!(matches!(
            apply(&mut m, 14, &proclaim(1, 9)).unwrap(),
            LockResponse::Rejected(_)
        ));
        assert_eq!(load(&mut m, "l").unwrap().queue[0].value, b"a2");
        let resign = |session, token| LockCommand::Resign {
            name: "l".into(),
            session,
            token,
        };
        // A stale token resigns nothing; the right one hands over.
        assert_eq!(
            apply(&mut m, 15, &resign(1, 7)).unwrap(),
            LockResponse::Released { existed: false }
        );
        assert_eq!(
            apply(&mut m, 16, &resign(1, 10)).unwrap(),
            LockResponse::Released { existed: true }
        );
        let rec = load(&mut m, "l").unwrap();
        assert_eq!((rec.queue[0].session, rec.queue[0].token), (2, 16));
        assert_eq!(rec.queue[0].value, b"b");
    }
}
