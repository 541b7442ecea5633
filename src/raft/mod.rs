//! openraft glue: the type config, per-group log store and state machine,
//! and the peer transport shared by every group.

pub mod log_cache;
pub mod log_store;
pub mod network;
pub mod state_machine;

use std::sync::Arc;

use crate::router::NodeAddr;
use crate::sm::{Command, Response};

openraft::declare_raft_types!(
    /// shopkv's openraft type configuration. A log entry's command is shared,
    /// not owned: the leader clones each entry for every replication stream
    /// and for the state machine (from `log_cache`), and an order's command
    /// (customer, lines of SKU strings) cost an allocation per string per
    /// clone. `Arc` encodes as the command itself (serde `rc`), so the log's
    /// bytes are unchanged.
    pub TypeConfig:
        D = Arc<Command>,
        R = Response,
        NodeId = u64,
        Node = NodeAddr,
);

/// One group's Raft handle.
pub type GroupRaft = openraft::Raft<TypeConfig, state_machine::StateMachine>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    #[test]
    fn a_shared_command_is_stored_and_sent_as_the_command_itself() {
        let cmd = Command::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
        };
        let shared: <TypeConfig as openraft::RaftTypeConfig>::D = Arc::new(cmd.clone());
        // Log entries written before commands were shared decode as before.
        assert_eq!(
            codec::encode(&shared).unwrap(),
            codec::encode(&cmd).unwrap()
        );
        assert_eq!(
            codec::to_wire(&shared).unwrap(),
            codec::to_wire(&cmd).unwrap()
        );
        let back: Arc<Command> = codec::decode(&codec::encode(&cmd).unwrap()).unwrap();
        assert!(matches!(&*back, Command::Put { key, .. } if key == b"k"));
    }
}
