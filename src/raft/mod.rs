//! openraft glue: the type config, per-group log store and state machine,
//! and the peer transport shared by every group.

pub mod log_cache;
pub mod log_store;
pub mod network;
pub mod state_machine;

use crate::router::NodeAddr;
use crate::sm::{Command, Response};

openraft::declare_raft_types!(
    /// shopkv's openraft type configuration.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = NodeAddr,
);

/// One group's Raft handle.
pub type GroupRaft = openraft::Raft<TypeConfig, state_machine::StateMachine>;
