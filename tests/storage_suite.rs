//! openraft's storage conformance suite against shopkv's RocksDB log store and
//! state machine (one group of a real RocksDB in a temporary directory).

use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::{ErrorSubject, ErrorVerb};
use shopkv::raft::TypeConfig;
use shopkv::raft::log_store::LogStore;
use shopkv::raft::state_machine::StateMachine;
use std::time::Duration;

use shopkv::config::DEFAULT_GROUP_COMMIT_DELAY_US;
use shopkv::storage::{Store, StoreOptions};

struct RocksBuilder {
    group: u64,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let io_err = |e: std::io::Error| {
            StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Read, e)
        };
        let dir = tempfile::tempdir().map_err(io_err)?;
        // With the node's default group-commit wait, so the suite covers it.
        let options = StoreOptions {
            group_commit_delay: Duration::from_micros(DEFAULT_GROUP_COMMIT_DELAY_US),
        };
        let store = Store::open(dir.path(), options).map_err(|e| io_err(e.into()))?;
        Ok((
            dir,
            LogStore::new(self.group, store.clone()),
            StateMachine::new(self.group, store, Default::default()),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes_for_a_data_group() {
    Suite::test_all(RocksBuilder { group: 3 })
        .await
        .expect("storage suite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes_for_the_meta_group() {
    Suite::test_all(RocksBuilder { group: 0 })
        .await
        .expect("storage suite");
}
