//! Deterministic apply: `(state, command, log index) -> (writes, response)`.
//!
//! No clock, no randomness, no I/O other than reading and writing records
//! through [`StateAccess`]. Business rejections (a CAS whose version does not
//! match, an init of an initialised cluster) are normal [`Response`]s inside
//! the replicated result; [`SmError`] is only for the system failing.

pub mod commerce;
pub mod lock;
pub mod session;

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::router::{ClusterMap, META_GROUP};
use crate::storage::keys::{self, GroupId};

/// A state change proposed to one Raft group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Meta group: record the cluster map (once).
    InitCluster(ClusterMap),
    /// Data shard: write a KV record.
    Put {
        /// User key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Data shard: delete a KV record.
    Delete {
        /// User key.
        key: Vec<u8>,
    },
    /// Data shard: write only if the record's version is `expected_version`
    /// (0 = absent).
    CompareAndSwap {
        /// User key.
        key: Vec<u8>,
        /// Version the record must have.
        expected_version: u64,
        /// New value.
        value: Vec<u8>,
    },
    /// Data shard: a catalog, inventory, cart or order change.
    Commerce(commerce::CommerceCommand),
    /// Meta group: a session change.
    Session(session::SessionCommand),
    /// Meta group: a lock change.
    Lock(lock::LockCommand),
    /// Data shard: `cmd` only if `token` is at least the highest token this
    /// shard has seen for `lock_name` (store-enforced fencing).
    Fenced {
        /// Lock whose token guards the write.
        lock_name: String,
        /// The writer's fencing token.
        token: u64,
        /// The guarded command (a KV or commerce write, or `Noop`).
        cmd: Box<Command>,
    },
    /// Data shard: changes nothing (a fence checked and raised alone, e.g.
    /// before an order is charged).
    Noop,
    /// Data shard: raises the fence floor to `floor` (never lowers it). The
    /// meta group found every fencing token up to `floor` to belong to a
    /// hold that is over, but the holds in `held`, so a fenced write with
    /// another token up to it is refused even where no later token was seen
    /// (`crate::lockgc`).
    RaiseFenceFloor {
        /// Tokens up to this are no longer held, but `held`'s.
        floor: u64,
        /// Holds (lock, token) with a token at or below `floor`, at most
        /// [`MAX_FENCE_HELD`]: their writes are checked as before, and their
        /// locks' fence records kept.
        held: Vec<(String, u64)>,
    },
    /// Data shard: deletes the fence records of these locks whose highest
    /// token is at most the fence floor, but the floor's held locks' (the
    /// floor refuses what they would).
    DropFences {
        /// Lock names, at most [`MAX_DROP_FENCES_BATCH`].
        lock_names: Vec<String>,
    },
}

/// Most lock names one `DropFences` names (its proposer's batch).
pub const MAX_DROP_FENCES_BATCH: usize = 1000;
/// Most held locks a fence floor excepts: past them the floor stays below
/// the next held token (every fenced write at or below the floor reads the list).
pub const MAX_FENCE_HELD: usize = 100;

/// A writer's fencing token for a lock: the store refuses the guarded write
/// if the shard has seen a higher token for that lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// Lock whose token guards the write.
    pub lock_name: String,
    /// The writer's token.
    pub token: u64,
}

/// The rejection of a write whose fencing token was superseded
/// (FAILED_PRECONDITION, reason `STALE_FENCE`).
pub fn stale_fence(highest: u64) -> crate::domain::Rejection {
    crate::domain::Rejection::new(
        crate::domain::RejectCode::StaleFence,
        format!("stale fencing token: this lock has already seen token {highest}"),
    )
}

/// The rejection of a write whose fencing token is at or below the shard's
/// fence floor: its hold is over (FAILED_PRECONDITION, reason `STALE_FENCE`).
pub fn expired_fence(floor: u64) -> crate::domain::Rejection {
    crate::domain::Rejection::new(
        crate::domain::RejectCode::StaleFence,
        format!("stale fencing token: every token up to {floor} belongs to a hold that is over"),
    )
}

/// The fence refusal in `resp`, if it is one.
pub fn fence_rejection(resp: &Response) -> Option<crate::domain::Rejection> {
    match resp {
        Response::StaleFence { highest } => Some(stale_fence(*highest)),
        Response::FenceExpired { floor } => Some(expired_fence(*floor)),
        _ => None,
    }
}

impl Fence {
    /// `cmd` guarded by this fence.
    pub fn guard(&self, cmd: Command) -> Command {
        Command::Fenced {
            lock_name: self.lock_name.clone(),
            token: self.token,
            cmd: Box::new(cmd),
        }
    }
}

impl Command {
    /// Whether this command may be applied in `group`.
    pub fn belongs_to(&self, group: GroupId) -> bool {
        match self {
            Command::InitCluster(_) | Command::Session(_) | Command::Lock(_) => group == META_GROUP,
            Command::Fenced { cmd, .. } => {
                group != META_GROUP
                    && !matches!(**cmd, Command::Fenced { .. })
                    && cmd.belongs_to(group)
            }
            Command::Put { .. }
            | Command::Delete { .. }
            | Command::CompareAndSwap { .. }
            | Command::Commerce(_)
            | Command::Noop
            | Command::RaiseFenceFloor { .. }
            | Command::DropFences { .. } => group != META_GROUP,
        }
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Lengths only: values may be large or sensitive.
        match self {
            Command::InitCluster(m) => write!(f, "InitCluster(shards={})", m.shards),
            Command::Put { key, value } => {
                write!(f, "Put(key_len={}, value_len={})", key.len(), value.len())
            }
            Command::Delete { key } => write!(f, "Delete(key_len={})", key.len()),
            Command::CompareAndSwap {
                key,
                expected_version,
                ..
            } => write!(f, "Cas(key_len={}, expected={expected_version})", key.len()),
            Command::Commerce(c) => c.fmt(f),
            Command::Session(c) => write!(f, "Session({c:?})"),
            Command::Lock(c) => write!(f, "Lock({c:?})"),
            Command::Fenced {
                lock_name,
                token,
                cmd,
            } => write!(f, "Fenced({lock_name}@{token}, {cmd})"),
            Command::Noop => write!(f, "Noop"),
            Command::RaiseFenceFloor { floor, held } => {
                write!(f, "RaiseFenceFloor({floor}, held={})", held.len())
            }
            Command::DropFences { lock_names } => {
                write!(f, "DropFences(locks={})", lock_names.len())
            }
        }
    }
}

/// The replicated result of applying a [`Command`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Blank and membership entries.
    #[default]
    Empty,
    /// `InitCluster`: `ok` is false when the cluster already had a map; the
    /// id is then the existing cluster's.
    Init {
        /// Whether this command initialised the cluster.
        ok: bool,
        /// The cluster id now in force.
        cluster_id: u64,
    },
    /// `Put`: the new version.
    Put {
        /// Log index of the write.
        version: u64,
    },
    /// `Delete`.
    Delete {
        /// Whether the key existed.
        deleted: bool,
        /// Log index of the delete.
        revision: u64,
    },
    /// `CompareAndSwap`.
    Cas {
        /// Whether the value was written.
        succeeded: bool,
        /// New version on success, current version (0 = absent) on failure.
        version: u64,
        /// On failure, the current value (`None` if the key is absent), so
        /// the caller learns which write the current version belongs to.
        current: Option<Vec<u8>>,
    },
    /// The command was proposed to a group of the wrong kind.
    WrongGroup,
    /// A commerce command's result.
    Commerce(commerce::CommerceResponse),
    /// A session command's result.
    Session(session::SessionResponse),
    /// A lock command's result.
    Lock(lock::LockResponse),
    /// `Fenced` refused: a higher token was already seen for the lock.
    StaleFence {
        /// The highest token seen.
        highest: u64,
    },
    /// `Fenced` refused: the token is at or below the shard's fence floor.
    FenceExpired {
        /// The fence floor.
        floor: u64,
    },
    /// `DropFences`: how many fence records were deleted.
    FencesDropped {
        /// Records deleted.
        count: u32,
    },
}

/// A stored KV record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRecord {
    /// Log index of the write that produced this value.
    pub version: u64,
    /// The value.
    pub value: Vec<u8>,
}

/// The system failed while applying (not a business rejection).
#[derive(Debug, thiserror::Error)]
pub enum SmError {
    /// A stored value could not be decoded or encoded.
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
    /// Reading state failed.
    #[error("storage: {0}")]
    Storage(String),
}

/// What apply may do to a group's records (implemented over RocksDB with an
/// overlay of the batch's own pending writes).
pub trait StateAccess {
    /// Current value of a record, including writes earlier in this batch.
    fn get(&mut self, record_key: &[u8]) -> Result<Option<Vec<u8>>, SmError>;
    /// Sets a record.
    fn put(&mut self, record_key: Vec<u8>, value: Vec<u8>) -> Result<(), SmError>;
    /// Deletes a record.
    fn delete(&mut self, record_key: Vec<u8>) -> Result<(), SmError>;
}

/// Applies `cmd`, proposed to `group` and committed at log `index` by the
/// leader of `term`.
pub fn apply(
    state: &mut dyn StateAccess,
    group: GroupId,
    index: u64,
    term: u64,
    cmd: &Command,
) -> Result<Response, SmError> {
    if !cmd.belongs_to(group) {
        return Ok(Response::WrongGroup);
    }
    match cmd {
        Command::InitCluster(map) => {
            let key = keys::cluster_map_key();
            if let Some(bytes) = state.get(&key)? {
                let existing: ClusterMap = codec::decode(&bytes)?;
                return Ok(Response::Init {
                    ok: false,
                    cluster_id: existing.cluster_id,
                });
            }
            state.put(key, codec::encode(map)?)?;
            Ok(Response::Init {
                ok: true,
                cluster_id: map.cluster_id,
            })
        }
        Command::Put { key, value } => {
            put_record(state, key, value, index)?;
            Ok(Response::Put { version: index })
        }
        Command::Delete { key } => {
            let rk = keys::kv_record_key(key);
            let existed = state.get(&rk)?.is_some();
            if existed {
                state.delete(rk)?;
            }
            Ok(Response::Delete {
                deleted: existed,
                revision: index,
            })
        }
        Command::CompareAndSwap {
            key,
            expected_version,
            value,
        } => {
            let current = read_record(state, key)?;
            let current_version = current.as_ref().map_or(0, |r| r.version);
            if current_version != *expected_version {
                return Ok(Response::Cas {
                    succeeded: false,
                    version: current_version,
                    current: current.map(|r| r.value),
                });
            }
            put_record(state, key, value, index)?;
            Ok(Response::Cas {
                succeeded: true,
                version: index,
                current: None,
            })
        }
        Command::Commerce(c) => Ok(Response::Commerce(commerce::apply(state, index, c)?)),
        Command::Session(c) => Ok(Response::Session(session::apply(state, index, term, c)?)),
        Command::Lock(c) => Ok(Response::Lock(lock::apply(state, index, c)?)),
        Command::Fenced {
            lock_name,
            token,
            cmd,
        } => {
            let floor = fence_floor(state)?;
            if *token <= floor
                && !fence_held(state)?
                    .iter()
                    .any(|(name, held)| name == lock_name && held == token)
            {
                return Ok(Response::FenceExpired { floor });
            }
            let key = keys::fence_key(lock_name);
            let highest = match state.get(&key)? {
                Some(b) => codec::decode::<u64>(&b)?,
                None => 0,
            };
            if *token < highest {
                return Ok(Response::StaleFence { highest });
            }
            if *token > highest {
                state.put(key, codec::encode(token)?)?;
            }
            apply(state, group, index, term, cmd)
        }
        Command::Noop => Ok(Response::Empty),
        Command::RaiseFenceFloor { floor, held } => {
            // A floor and its held locks come from one view of the meta
            // group and hold together; a lower floor is an older view's.
            if *floor > fence_floor(state)? {
                state.put(keys::fence_floor_key(), codec::encode(floor)?)?;
                if held.is_empty() {
                    state.delete(keys::fence_held_key())?;
                } else {
                    state.put(keys::fence_held_key(), codec::encode(held)?)?;
                }
            }
            Ok(Response::Empty)
        }
        Command::DropFences { lock_names } => {
            let floor = fence_floor(state)?;
            let held = fence_held(state)?;
            let mut count = 0;
            // A lock with a hold the floor excepts keeps its record: that
            // holder's write must still be refused below a later one's.
            for name in lock_names
                .iter()
                .filter(|n| !held.iter().any(|(h, _)| h == *n))
            {
                let key = keys::fence_key(name);
                let Some(b) = state.get(&key)? else {
                    continue;
                };
                if codec::decode::<u64>(&b)? <= floor {
                    state.delete(key)?;
                    count += 1;
                }
            }
            Ok(Response::FencesDropped { count })
        }
    }
}

/// A data shard's fence floor (0 until the first `RaiseFenceFloor`).
pub fn fence_floor(state: &mut dyn StateAccess) -> Result<u64, SmError> {
    match state.get(&keys::fence_floor_key())? {
        Some(b) => Ok(codec::decode::<u64>(&b)?),
        None => Ok(0),
    }
}

/// The holds a data shard's fence floor excepts.
pub fn fence_held(state: &mut dyn StateAccess) -> Result<Vec<(String, u64)>, SmError> {
    match state.get(&keys::fence_held_key())? {
        Some(b) => Ok(codec::decode(&b)?),
        None => Ok(Vec::new()),
    }
}

fn put_record(
    state: &mut dyn StateAccess,
    key: &[u8],
    value: &[u8],
    index: u64,
) -> Result<(), SmError> {
    let rec = StoredRecord {
        version: index,
        value: value.to_vec(),
    };
    state.put(keys::kv_record_key(key), codec::encode(&rec)?)
}

fn read_record(state: &mut dyn StateAccess, key: &[u8]) -> Result<Option<StoredRecord>, SmError> {
    match state.get(&keys::kv_record_key(key))? {
        Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
        None => Ok(None),
    }
}

/// An in-memory [`StateAccess`] and [`commerce::RecordReader`] for unit tests.
#[cfg(test)]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct MemState(pub std::collections::BTreeMap<Vec<u8>, Vec<u8>>);

#[cfg(test)]
impl StateAccess for MemState {
    fn get(&mut self, k: &[u8]) -> Result<Option<Vec<u8>>, SmError> {
        Ok(self.0.get(k).cloned())
    }
    fn put(&mut self, k: Vec<u8>, v: Vec<u8>) -> Result<(), SmError> {
        self.0.insert(k, v);
        Ok(())
    }
    fn delete(&mut self, k: Vec<u8>) -> Result<(), SmError> {
        self.0.remove(&k);
        Ok(())
    }
}

#[cfg(test)]
impl commerce::RecordReader for MemState {
    fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, SmError> {
        Ok(self.0.get(k).cloned())
    }
    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<commerce::Rows, SmError> {
        Ok(self
            .0
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) && after.is_none_or(|a| k.as_slice() > a))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

/// Decodes the cluster map stored by `InitCluster`.
pub fn decode_cluster_map(bytes: &[u8]) -> Result<ClusterMap, SmError> {
    Ok(codec::decode(bytes)?)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    type Mem = MemState;

    fn put(k: &str, v: &str) -> Command {
        Command::Put {
            key: k.into(),
            value: v.into(),
        }
    }

    #[test]
    fn cas_checks_version_and_absent_is_zero() {
        let mut m = Mem::default();
        let cas = |exp, v: &str| Command::CompareAndSwap {
            key: b"a".to_vec(),
            expected_version: exp,
            value: v.into(),
        };
        assert_eq!(
            apply(&mut m, 1, 5, 1, &cas(0, "x")).unwrap(),
            Response::Cas {
                succeeded: true,
                version: 5,
                current: None
            }
        );
        assert_eq!(
            apply(&mut m, 1, 6, 1, &cas(0, "y")).unwrap(),
            Response::Cas {
                succeeded: false,
                version: 5,
                current: Some(b"x".to_vec())
            }
        );
        assert_eq!(
            apply(&mut m, 1, 7, 1, &cas(5, "z")).unwrap(),
            Response::Cas {
                succeeded: true,
                version: 7,
                current: None
            }
        );
    }

    #[test]
    fn delete_reports_existence_and_put_versions_by_index() {
        let mut m = Mem::default();
        assert_eq!(
            apply(&mut m, 2, 3, 1, &put("k", "v")).unwrap(),
            Response::Put { version: 3 }
        );
        let del = Command::Delete { key: b"k".to_vec() };
        assert_eq!(
            apply(&mut m, 2, 4, 1, &del).unwrap(),
            Response::Delete {
                deleted: true,
                revision: 4
            }
        );
        assert_eq!(
            apply(&mut m, 2, 5, 1, &del).unwrap(),
            Response::Delete {
                deleted: false,
                revision: 5
            }
        );
    }

    #[test]
    fn a_fenced_write_with_a_stale_token_changes_nothing() {
        let mut m = Mem::default();
        let fenced = |token, v: &str| Command::Fenced {
            lock_name: "l".into(),
            token,
            cmd: Box::new(put("k", v)),
        };
        assert_eq!(
            apply(&mut m, 1, 5, 1, &fenced(7, "a")).unwrap(),
            Response::Put { version: 5 }
        );
        assert_eq!(
            apply(&mut m, 1, 6, 1, &fenced(7, "b")).unwrap(),
            Response::Put { version: 6 },
            "the same holder may write again"
        );
        let before = m.clone();
        assert_eq!(
            apply(&mut m, 1, 7, 1, &fenced(3, "old holder")).unwrap(),
            Response::StaleFence { highest: 7 }
        );
        assert_eq!(m, before);
        assert_eq!(
            apply(&mut m, 1, 8, 1, &fenced(9, "c")).unwrap(),
            Response::Put { version: 8 }
        );
        assert_eq!(
            apply(&mut m, 1, 9, 1, &fenced(7, "d")).unwrap(),
            Response::StaleFence { highest: 9 }
        );
        let nested = Command::Fenced {
            lock_name: "l".into(),
            token: 10,
            cmd: Box::new(fenced(10, "x")),
        };
        assert_eq!(
            apply(&mut m, 1, 10, 1, &nested).unwrap(),
            Response::WrongGroup
        );
    }

    #[test]
    fn the_fence_floor_refuses_tokens_of_holds_that_are_over_and_lets_their_records_go() {
        let mut m = Mem::default();
        let fenced = |lock: &str, token| Command::Fenced {
            lock_name: lock.into(),
            token,
            cmd: Box::new(put("k", lock)),
        };
        apply(&mut m, 1, 5, 1, &fenced("a", 4)).unwrap();
        apply(&mut m, 1, 6, 1, &fenced("b", 3)).unwrap();
        apply(&mut m, 1, 7, 1, &fenced("c", 8)).unwrap();
        // A long hold of "h" with token 2, still held when the floor passed it.
        apply(&mut m, 1, 8, 1, &fenced("h", 2)).unwrap();
        let raise = |floor, held: &[(&str, u64)]| Command::RaiseFenceFloor {
            floor,
            held: held.iter().map(|(h, t)| (h.to_string(), *t)).collect(),
        };
        assert_eq!(
            apply(&mut m, 1, 9, 1, &raise(5, &[("h", 2)])).unwrap(),
            Response::Empty
        );
        // Never lowered (an older view's floor and held locks).
        apply(&mut m, 1, 9, 1, &raise(2, &[])).unwrap();
        assert_eq!(fence_floor(&mut m).unwrap(), 5);
        assert_eq!(fence_held(&mut m).unwrap(), vec![("h".to_string(), 2)]);
        // The excepted hold is checked by its record as before; another
        // token of its lock at or below the floor is over.
        assert_eq!(
            apply(&mut m, 1, 10, 1, &fenced("h", 2)).unwrap(),
            Response::Put { version: 10 }
        );
        assert_eq!(
            apply(&mut m, 1, 10, 1, &fenced("h", 1)).unwrap(),
            Response::FenceExpired { floor: 5 }
        );
        let before = m.clone();
        assert_eq!(
            apply(&mut m, 1, 10, 1, &fenced("a", 4)).unwrap(),
            Response::FenceExpired { floor: 5 },
            "a token at or below the floor is refused even as the highest seen"
        );
        assert_eq!(
            apply(&mut m, 1, 11, 1, &fenced("new", 5)).unwrap(),
            Response::FenceExpired { floor: 5 },
            "and for a lock the shard never saw"
        );
        assert_eq!(m, before);
        let drop = Command::DropFences {
            lock_names: vec![
                "a".into(),
                "b".into(),
                "c".into(),
                "h".into(),
                "none".into(),
            ],
        };
        assert_eq!(
            apply(&mut m, 1, 12, 1, &drop).unwrap(),
            Response::FencesDropped { count: 2 }
        );
        assert!(m.get(&keys::fence_key("c")).unwrap().is_some());
        assert!(m.get(&keys::fence_key("h")).unwrap().is_some(), "held");
        assert_eq!(m.get(&keys::fence_key("a")).unwrap(), None);
        assert_eq!(m.get(&keys::fence_key("b")).unwrap(), None);
        // Above the floor the record still decides (c's is above it, kept).
        assert_eq!(
            apply(&mut m, 1, 13, 1, &fenced("c", 7)).unwrap(),
            Response::StaleFence { highest: 8 }
        );
        assert_eq!(
            apply(&mut m, 1, 14, 1, &fenced("c", 8)).unwrap(),
            Response::Put { version: 14 }
        );
        assert_eq!(
            apply(&mut m, 1, 15, 1, &fenced("a", 9)).unwrap(),
            Response::Put { version: 15 }
        );
        // Once the long hold is over too, a higher floor takes the list with it.
        apply(&mut m, 1, 16, 1, &raise(9, &[])).unwrap();
        assert_eq!(
            apply(&mut m, 1, 17, 1, &fenced("h", 2)).unwrap(),
            Response::FenceExpired { floor: 9 }
        );
        assert_eq!(m.get(&keys::fence_held_key()).unwrap(), None);
        assert_eq!(
            apply(&mut m, META_GROUP, 18, 1, &raise(12, &[])).unwrap(),
            Response::WrongGroup
        );
    }

    #[test]
    fn commands_are_rejected_in_the_wrong_group_and_init_happens_once() {
        let mut m = Mem::default();
        assert_eq!(
            apply(&mut m, META_GROUP, 1, 1, &put("k", "v")).unwrap(),
            Response::WrongGroup
        );
        let map = ClusterMap::new(42, 2, BTreeMap::new());
        let init = Command::InitCluster(map.clone());
        assert_eq!(apply(&mut m, 1, 1, 1, &init).unwrap(), Response::WrongGroup);
        assert_eq!(
            apply(&mut m, META_GROUP, 2, 1, &init).unwrap(),
            Response::Init {
                ok: true,
                cluster_id: 42
            }
        );
        let other = Command::InitCluster(ClusterMap::new(7, 2, BTreeMap::new()));
        assert_eq!(
            apply(&mut m, META_GROUP, 3, 1, &other).unwrap(),
            Response::Init {
                ok: false,
                cluster_id: 42
            }
        );
    }
}
