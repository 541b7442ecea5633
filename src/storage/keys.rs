//! Every key's bytes. No other module builds a RocksDB key.
//!
//! Layout (all integers big-endian so that byte order is numeric order):
//!
//! | column family | key                          | value                         |
//! |---------------|------------------------------|-------------------------------|
//! | `raft_log`    | group (8) · index (8)        | encoded log entry             |
//! | `raft_state`  | group (8) · tag (1)          | vote / committed / purged     |
//! | `sm_meta`     | group (8) · tag (1)          | last_applied / membership     |
//! | `data`        | group (8) · record key       | encoded record                |
//! | `default`     | `node_identity`              | node id and cluster id        |
//!
//! A record key starts with a namespace byte (`k` for the KV API, `m` for meta
//! group records) so that later record kinds cannot collide with user keys.

/// Raft group id: 0 is the meta group, 1..=S the data shards.
pub type GroupId = u64;

/// Column family of Raft log entries.
pub const CF_RAFT_LOG: &str = "raft_log";
/// Column family of per-group Raft state (vote, committed, last purged).
pub const CF_RAFT_STATE: &str = "raft_state";
/// Column family of replicated records.
pub const CF_DATA: &str = "data";
/// Column family of per-group state-machine metadata (applied index, membership).
pub const CF_SM_META: &str = "sm_meta";
/// All column families, in the order they are opened.
pub const ALL_CFS: [&str; 4] = [CF_RAFT_LOG, CF_RAFT_STATE, CF_DATA, CF_SM_META];

/// Key of the node identity record in the default column family.
pub const NODE_IDENTITY: &[u8] = b"node_identity";

/// What a `raft_state` key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RaftStateTag {
    /// The persisted vote.
    Vote = 1,
    /// The last known committed log id.
    Committed = 2,
    /// The last purged log id.
    LastPurged = 3,
}

/// What an `sm_meta` key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SmMetaTag {
    /// Log id of the last applied entry.
    LastApplied = 1,
    /// The last applied membership.
    Membership = 2,
}

/// Namespace byte of KV API records.
const NS_KV: u8 = b'k';
/// Namespace byte of meta-group records.
const NS_META: u8 = b'm';

/// `group · index` in `raft_log`.
pub fn log_key(group: GroupId, index: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

/// The log index encoded in a `raft_log` key.
pub fn log_index_of(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(8..16)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// `group · tag` in `raft_state`.
pub fn raft_state_key(group: GroupId, tag: RaftStateTag) -> [u8; 9] {
    tagged(group, tag as u8)
}

/// `group · tag` in `sm_meta`.
pub fn sm_meta_key(group: GroupId, tag: SmMetaTag) -> [u8; 9] {
    tagged(group, tag as u8)
}

fn tagged(group: GroupId, tag: u8) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8] = tag;
    k
}

/// The 8-byte prefix every key of `group` starts with.
pub fn group_prefix(group: GroupId) -> [u8; 8] {
    group.to_be_bytes()
}

/// First key after every key of `group` (exclusive upper bound of its range).
pub fn group_end(group: GroupId) -> Vec<u8> {
    match group.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        // Group u64::MAX: every key longer than the prefix sorts below [0xff; 9].
        None => vec![0xff; 9],
    }
}

/// `group · record key` in `data`.
pub fn data_key(group: GroupId, record_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + record_key.len());
    k.extend_from_slice(&group.to_be_bytes());
    k.extend_from_slice(record_key);
    k
}

/// The record key inside a `data` key (strips the group prefix).
pub fn record_key_of(data_key: &[u8]) -> &[u8] {
    data_key.get(8..).unwrap_or(&[])
}

/// Record key of a KV API key.
pub fn kv_record_key(user_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + user_key.len());
    k.push(NS_KV);
    k.extend_from_slice(user_key);
    k
}

/// The user key of a KV record key, if `record_key` is one.
pub fn kv_user_key(record_key: &[u8]) -> Option<&[u8]> {
    match record_key.split_first() {
        Some((&NS_KV, rest)) => Some(rest),
        _ => None,
    }
}

/// Record key of the cluster map in the meta group.
pub fn cluster_map_key() -> Vec<u8> {
    let mut k = vec![NS_META];
    k.extend_from_slice(b"cluster");
    k
}

/// Smallest byte string greater than every string starting with `prefix`, or
/// `None` when no such bound exists (prefix of all 0xff).
pub fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_sort_by_group_then_index() {
        assert!(log_key(1, u64::MAX) < log_key(2, 0));
        assert!(log_key(1, 9) < log_key(1, 10));
        assert_eq!(log_index_of(&log_key(7, 42)), Some(42));
    }

    #[test]
    fn kv_keys_round_trip_and_do_not_collide_with_meta() {
        let rk = kv_record_key(b"cart/1");
        assert_eq!(kv_user_key(&rk), Some(&b"cart/1"[..]));
        assert_eq!(kv_user_key(&cluster_map_key()), None);
        assert_eq!(record_key_of(&data_key(3, &rk)), &rk[..]);
    }

    #[test]
    fn prefix_successor_bounds_the_prefix() {
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_successor(&[0xff, 0xff]), None);
        assert!(data_key(4, b"zzz") < group_end(4));
    }
}
