//! The reads a group serves (KV, commerce, sessions, locks) and their results:
//! serializable, since a forwarded read travels to the leader and back.

use serde::{Deserialize, Serialize};

use crate::sm::commerce::{CommerceRead, CommerceReadResult, RecordReader};
use crate::sm::{self, StoredRecord};
use crate::storage::Store;
use crate::storage::keys::GroupId;

/// A read served by one group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ReadOp {
    /// One KV record.
    Get {
        /// User key.
        key: Vec<u8>,
    },
    /// KV records by prefix.
    Scan {
        /// User key prefix.
        prefix: Vec<u8>,
        /// At most this many.
        limit: usize,
    },
    /// Catalog, inventory, cart or order records.
    Commerce(CommerceRead),
    /// A session, on the meta leader (`KeepAlive` renews it there).
    Session(SessionRead),
    /// A lock's queue (meta group).
    Lock {
        /// Lock name.
        name: String,
    },
}

/// A session read (meta group, served by its leader).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SessionRead {
    /// Renew the session for its TTL.
    KeepAlive {
        /// Session.
        id: u64,
    },
    /// The session and its remaining time.
    Get {
        /// Session.
        id: u64,
    },
}

/// Result of a [`SessionRead`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SessionReadResult {
    /// The session is live.
    Alive {
        /// Its TTL.
        ttl_ms: u64,
        /// Time left before the leader expires it.
        remaining_ms: u64,
        /// Locks it holds or waits for.
        locks: Vec<String>,
    },
    /// No such session (never granted, closed or expired).
    Missing,
}

/// Result of a [`ReadOp`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ReadResult {
    /// `Get`.
    Record(Option<StoredRecord>),
    /// `Scan`: (user key, record) pairs in key order; `more` if truncated.
    Records {
        /// Matches.
        records: Vec<(Vec<u8>, StoredRecord)>,
        /// More matched than the limit.
        more: bool,
    },
    /// `Commerce`.
    Commerce(CommerceReadResult),
    /// `Session`.
    Session(SessionReadResult),
    /// `Lock` (an unknown lock is an empty one).
    Lock(crate::sm::lock::LockRecord),
}

/// One group's records on this node, for `sm::commerce::read`.
pub(super) struct GroupReader<'a> {
    pub(super) store: &'a Store,
    pub(super) group: GroupId,
}

impl RecordReader for GroupReader<'_> {
    fn get(&self, record_key: &[u8]) -> Result<Option<Vec<u8>>, sm::SmError> {
        self.store
            .get_record(self.group, record_key)
            .map_err(|e| sm::SmError::Storage(e.to_string()))
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, sm::SmError> {
        self.store
            .scan_records_after(self.group, prefix, after, limit)
            .map_err(|e| sm::SmError::Storage(e.to_string()))
    }
}
