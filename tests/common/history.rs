//! Operation histories and their checkers: per-key linearizability of the KV
//! register workload (porcupine-rs, with unknown outcomes as "may or may not
//! have happened"), replica digest agreement, and Raft progress invariants.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use porcupine_rs::{CheckResult, Model, Operation};
use serde::{Deserialize, Serialize};

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Call {
    /// Read a key.
    Get,
    /// Write a unique value.
    Put { value: u64 },
    /// Write `value` if the key's version is `expected` (0 = absent).
    Cas { expected: u64, value: u64 },
}

/// What came back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Get: the value and version, or `None` when absent.
    Read(Option<(u64, u64)>),
    /// Put: the new version.
    Written(u64),
    /// Cas: whether it swapped, the version after the call, and on failure
    /// the current value (`None` when absent).
    Swapped {
        ok: bool,
        version: u64,
        #[serde(default)]
        current: Option<u64>,
    },
    /// The request certainly changed nothing.
    Failed,
    /// Timeout or lost connection after sending: may or may not have happened.
    Unknown,
}

/// One recorded client operation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Op {
    /// Logical process (a client becomes a new one after an unknown outcome).
    pub process: u32,
    /// Key index.
    pub key: u32,
    /// Invocation time, ns since the run started.
    pub invoke_ns: i64,
    /// Completion time, ns since the run started.
    pub complete_ns: i64,
    /// The call.
    pub call: Call,
    /// Its outcome.
    pub outcome: Outcome,
}

/// The register model: a key's value id and version (0 = absent).
#[derive(Clone)]
pub struct Register;

/// Model state.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RegState {
    value: Option<u64>,
    /// `None` while the current value came from a write whose version nobody observed.
    version: Option<u64>,
}

/// A model operation: the call, its outcome, and for unknown writes the
/// version the write got if anyone observed it.
#[derive(Clone, Debug)]
pub struct RegOp {
    key: u32,
    call: Call,
    outcome: Outcome,
    observed_version: Option<u64>,
}

impl Model for Register {
    type State = RegState;
    type Op = RegOp;
    type Metadata = u32;

    fn partition_operations(history: &[Operation<Self>]) -> Vec<Vec<Operation<Self>>> {
        let mut by_key: BTreeMap<u32, Vec<Operation<Self>>> = BTreeMap::new();
        for op in history {
            by_key.entry(op.op.key).or_default().push(op.clone());
        }
        by_key.into_values().collect()
    }

    fn init() -> RegState {
        RegState {
            value: None,
            version: Some(0),
        }
    }

    fn step(s: &RegState, op: &RegOp) -> (bool, RegState) {
        let unchanged = (true, s.clone());
        let newer = |v: u64| s.version.is_none_or(|cur| v > cur);
        match (&op.call, &op.outcome) {
            (Call::Get, Outcome::Read(None)) => (s.value.is_none(), s.clone()),
            (Call::Get, Outcome::Read(Some((value, version)))) => (
                s.value == Some(*value) && s.version.is_none_or(|v| v == *version),
                RegState {
                    value: Some(*value),
                    version: Some(*version),
                },
            ),
            (Call::Put { value }, Outcome::Written(version)) => (
                newer(*version),
                RegState {
                    value: Some(*value),
                    version: Some(*version),
                },
            ),
            (Call::Put { value }, Outcome::Unknown) => (
                true,
                RegState {
                    value: Some(*value),
                    version: op.observed_version,
                },
            ),
            (
                Call::Cas { expected, value },
                Outcome::Swapped {
                    ok: true, version, ..
                },
            ) => (
                // A version nobody observed cannot have been the expected one.
                s.version == Some(*expected) && newer(*version),
                RegState {
                    value: Some(*value),
                    version: Some(*version),
                },
            ),
            (
                Call::Cas { expected, .. },
                Outcome::Swapped {
                    ok: false,
                    version,
                    current,
                },
            ) => (
                version != expected
                    && s.value == *current
                    && s.version.is_none_or(|v| v == *version),
                RegState {
                    value: s.value,
                    version: Some(*version),
                },
            ),
            (Call::Cas { expected, value }, Outcome::Unknown) => {
                if s.version == Some(*expected) {
                    (
                        true,
                        RegState {
                            value: Some(*value),
                            version: op.observed_version,
                        },
                    )
                } else {
                    unchanged
                }
            }
            // Failed operations are dropped before checking; anything else is malformed.
            _ => (false, s.clone()),
        }
    }
}

/// Result of the linearizability check.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Linearizable.
    Ok,
    /// Not linearizable.
    Violation,
    /// The checker ran out of time.
    Unknown,
}

/// Checks per-key linearizability of `history`.
pub fn check_linearizable(history: &[Op], timeout: Duration) -> Verdict {
    // Versions observed for each written value (values are unique).
    let mut seen: HashMap<u64, u64> = HashMap::new();
    for op in history {
        match (&op.call, &op.outcome) {
            (_, Outcome::Read(Some((value, version)))) => {
                seen.insert(*value, *version);
            }
            (Call::Put { value }, Outcome::Written(version))
            | (
                Call::Cas { value, .. },
                Outcome::Swapped {
                    ok: true, version, ..
                },
            )
            | (
                Call::Cas { .. },
                Outcome::Swapped {
                    ok: false,
                    version,
                    current: Some(value),
                },
            ) => {
                seen.insert(*value, *version);
            }
            _ => {}
        }
    }
    let ops: Vec<Operation<Register>> = history
        .iter()
        .filter(|op| op.outcome != Outcome::Failed)
        .filter(|op| !(op.outcome == Outcome::Unknown && op.call == Call::Get))
        .filter(|op| !unseen_unknown_write(op, &seen))
        .map(|op| {
            let value = match op.call {
                Call::Put { value } | Call::Cas { value, .. } => Some(value),
                Call::Get => None,
            };
            Operation {
                client_id: Some(op.process),
                call_time: op.invoke_ns,
                return_time: if op.outcome == Outcome::Unknown {
                    i64::MAX
                } else {
                    op.complete_ns
                },
                op: RegOp {
                    key: op.key,
                    call: op.call.clone(),
                    outcome: op.outcome.clone(),
                    observed_version: value.and_then(|v| seen.get(&v).copied()),
                },
                metadata: Some(op.process),
            }
        })
        .collect();
    match porcupine_rs::check_operations_timeout::<Register>(&ops, timeout) {
        CheckResult::Ok => Verdict::Ok,
        CheckResult::Illegal => Verdict::Violation,
        CheckResult::Unknown => Verdict::Unknown,
    }
}

/// Whether `op` is a write of unknown outcome whose value nobody ever
/// observed, and so may be dropped: had it taken effect, only blind writes
/// could follow it (a read or a failed CAS would show its value, and a CAS
/// needs its version, which nobody saw). Dropping such writes keeps the
/// search from exploding on runs with thousands of timeouts.
fn unseen_unknown_write(op: &Op, seen: &HashMap<u64, u64>) -> bool {
    if op.outcome != Outcome::Unknown {
        return false;
    }
    match op.call {
        Call::Put { value } | Call::Cas { value, .. } => !seen.contains_key(&value),
        Call::Get => false,
    }
}

/// One replica's reported digest of one group.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DigestSample {
    /// Group id.
    pub group: u64,
    /// Node id.
    pub node: u64,
    /// Applied index the digest reflects.
    pub index: u64,
    /// The digest.
    pub digest: u64,
}

/// Violations among digests: replicas of a group at the same applied index
/// with different digests.
pub fn check_digests(samples: &[DigestSample]) -> Vec<String> {
    let mut at: BTreeMap<(u64, u64), BTreeMap<u64, u64>> = BTreeMap::new();
    for s in samples {
        at.entry((s.group, s.index))
            .or_default()
            .insert(s.node, s.digest);
    }
    at.into_iter()
        .filter(|(_, by_node)| by_node.values().collect::<BTreeSet<_>>().len() > 1)
        .map(|((g, i), by_node)| {
            format!("group {g} at applied index {i}: replicas disagree {by_node:?}")
        })
        .collect()
}

/// One status sample of one replica.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RaftSample {
    /// Node id.
    pub node: u64,
    /// Process incarnation (bumped on every restart).
    pub incarnation: u32,
    /// Group id.
    pub group: u64,
    /// Term.
    pub term: u64,
    /// Local committed index.
    pub commit: u64,
    /// Whether it said it was the leader.
    pub leader: bool,
}

/// Violations among status samples (in time order): a term that goes
/// backwards on a node, a commit index that goes backwards within one
/// process, two leaders in one term of one group.
pub fn check_raft_samples(samples: &[RaftSample]) -> Vec<String> {
    let mut out = Vec::new();
    let mut last_term: HashMap<(u64, u64), u64> = HashMap::new();
    let mut last_commit: HashMap<(u64, u32, u64), u64> = HashMap::new();
    let mut leaders: BTreeMap<(u64, u64), BTreeSet<u64>> = BTreeMap::new();
    for s in samples {
        let t = last_term.entry((s.node, s.group)).or_insert(0);
        if s.term < *t {
            out.push(format!(
                "node {} group {}: term went back {} -> {}",
                s.node, s.group, t, s.term
            ));
        }
        *t = (*t).max(s.term);
        let c = last_commit
            .entry((s.node, s.incarnation, s.group))
            .or_insert(0);
        if s.commit < *c {
            out.push(format!(
                "node {} group {}: commit went back {} -> {}",
                s.node, s.group, c, s.commit
            ));
        }
        *c = (*c).max(s.commit);
        if s.leader {
            leaders.entry((s.group, s.term)).or_default().insert(s.node);
        }
    }
    for ((g, t), nodes) in leaders {
        if nodes.len() > 1 {
            out.push(format!("group {g} term {t}: leaders {nodes:?}"));
        }
    }
    out
}
