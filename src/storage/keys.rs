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
//! A record key starts with a namespace byte so that record kinds cannot
//! collide: `k` KV API, `m` meta group, and the commerce records below. Ids
//! (SKU, customer, order) are at most 64 bytes; where an id is followed by
//! more key bytes it is length-prefixed (one byte) so prefixes stay exact.
//!
//! | record key                               | record                          |
//! |------------------------------------------|---------------------------------|
//! | `P` · sku                                | product                         |
//! | `I` · sku                                | inventory level                 |
//! | `R` · order id                           | stock an order reserves here    |
//! | `C` · customer                           | cart                            |
//! | `O` · order id                           | order                           |
//! | `Q` · order id                           | payment of the order            |
//! | `X` · len · customer · order id          | customer → order index          |
//! | `Y` · expires_at_ms (8) · order id       | unpaid order deadline index     |
//! | `F` · order id                           | refund owed index               |
//! | `G` · order id                           | capture owed index              |
//! | `T` · order id                           | 2PC transaction record (anchor) |
//! | `S` · order id                           | settlement owed to participants |
//! | `H` · order id                           | reservations held (participant) |
//! | `W` · order id                           | undecided transaction index     |
//! | `E` · order id                           | checkout cart clear owed        |
//! | `V` · aborted_ms (8) · kind · order id   | aborted 2PC tombstone index     |
//! | `s` · session id (8)                     | session (meta group)            |
//! | `L` · lock name                          | lock queue and last token (meta)|
//! | `f` · lock name                          | highest fencing token seen      |

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
/// Namespace byte of sessions (meta group).
const NS_SESSION: u8 = b's';
/// Namespace byte of locks (meta group).
const NS_LOCK: u8 = b'L';
/// Namespace byte of the highest fencing token seen per lock (data shards).
const NS_FENCE: u8 = b'f';
/// Namespace bytes of commerce records (see the module table).
const NS_PRODUCT: u8 = b'P';
const NS_INVENTORY: u8 = b'I';
const NS_RESERVATION: u8 = b'R';
const NS_CART: u8 = b'C';
const NS_ORDER: u8 = b'O';
const NS_PAYMENT: u8 = b'Q';
const NS_CUSTOMER_ORDER: u8 = b'X';
const NS_ORDER_DEADLINE: u8 = b'Y';
const NS_REFUND_DUE: u8 = b'F';
const NS_CAPTURE_OWED: u8 = b'G';
const NS_CART_CLEAR_OWED: u8 = b'E';
const NS_TXN: u8 = b'T';
const NS_SETTLEMENT: u8 = b'S';
const NS_HELD: u8 = b'H';
const NS_TXN_PENDING: u8 = b'W';
const NS_ABORTED: u8 = b'V';

/// Whether this is a SKU's product or stock-level record: every order line
/// reads both, and there is one of each per SKU (bounded by the catalog).
pub fn is_sku_record_key(record_key: &[u8]) -> bool {
    matches!(record_key.first(), Some(&(NS_PRODUCT | NS_INVENTORY)))
}

/// Whether changes to this record are kept for watchers (`crate::watch`):
/// KV records, stock levels, orders and locks; and sessions, which the meta
/// leader's session clock follows.
pub fn is_watchable(record_key: &[u8]) -> bool {
    matches!(
        record_key.first(),
        Some(&(NS_KV | NS_INVENTORY | NS_ORDER | NS_LOCK | NS_SESSION))
    )
}

/// The lock name in a lock record key.
pub fn lock_name_of(record_key: &[u8]) -> Option<&str> {
    match record_key.split_first() {
        Some((&NS_LOCK, rest)) => std::str::from_utf8(rest).ok(),
        _ => None,
    }
}

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

/// Record key of a session in the meta group (ids sort numerically).
pub fn session_key(id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(NS_SESSION);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Prefix of every session record.
pub fn session_prefix() -> Vec<u8> {
    vec![NS_SESSION]
}

/// The id of a session record key.
pub fn session_id_of(record_key: &[u8]) -> Option<u64> {
    let rest = record_key.strip_prefix(&[NS_SESSION])?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

/// Record key of a lock (meta group).
pub fn lock_key(name: &str) -> Vec<u8> {
    ns_id(NS_LOCK, name)
}

/// Record key of the highest fencing token a shard has seen for `lock_name`.
pub fn fence_key(lock_name: &str) -> Vec<u8> {
    ns_id(NS_FENCE, lock_name)
}

/// Prefix of every lock record (meta group).
pub fn lock_prefix() -> Vec<u8> {
    vec![NS_LOCK]
}

/// Prefix of every fence record (data shards).
pub fn fence_prefix() -> Vec<u8> {
    vec![NS_FENCE]
}

/// The lock name in a fence record key.
pub fn lock_name_of_fence(record_key: &[u8]) -> Option<&str> {
    match record_key.split_first() {
        Some((&NS_FENCE, rest)) => std::str::from_utf8(rest).ok(),
        _ => None,
    }
}

/// Record key of a data shard's fence floor: every fencing token up to it
/// belongs to a hold that is over (`crate::lockgc`).
pub fn fence_floor_key() -> Vec<u8> {
    meta_key(b"fence-floor")
}

/// Record key of the holds (lock, token) a data shard's fence floor
/// excepts: held, with a token at or below the floor, when it was computed.
pub fn fence_held_key() -> Vec<u8> {
    meta_key(b"fence-held")
}

/// Record key of the cluster map in the meta group.
pub fn cluster_map_key() -> Vec<u8> {
    meta_key(b"cluster")
}

/// Record key of the live session count in the meta group.
pub fn session_count_key() -> Vec<u8> {
    meta_key(b"sessions")
}

/// `m`·name: a group's own bookkeeping record.
fn meta_key(name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(NS_META);
    k.extend_from_slice(name);
    k
}

fn ns_id(ns: u8, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(ns);
    k.extend_from_slice(id.as_bytes());
    k
}

/// `ns · len · id`: an id other key bytes follow. Ids are at most 64 bytes
/// (checked at the API edge); a longer one is cut at 255 rather than panic.
fn ns_len_id(ns: u8, id: &str) -> Vec<u8> {
    let bytes = &id.as_bytes()[..id.len().min(255)];
    let mut k = Vec::with_capacity(2 + bytes.len() + 64);
    k.push(ns);
    k.push(bytes.len() as u8);
    k.extend_from_slice(bytes);
    k
}

/// Record key of a product.
pub fn product_key(sku: &str) -> Vec<u8> {
    ns_id(NS_PRODUCT, sku)
}

/// Prefix of every product record (they sort by SKU).
pub fn product_prefix() -> Vec<u8> {
    vec![NS_PRODUCT]
}

/// The SKU of a product record key.
pub fn sku_of_product_key(record_key: &[u8]) -> Option<&str> {
    match record_key.split_first() {
        Some((&NS_PRODUCT, rest)) => std::str::from_utf8(rest).ok(),
        _ => None,
    }
}

/// Record key of a SKU's inventory level.
pub fn inventory_key(sku: &str) -> Vec<u8> {
    ns_id(NS_INVENTORY, sku)
}

/// Record key of the stock `order_id` holds reserved on this shard (all of
/// its lines here).
pub fn reservation_key(order_id: &str) -> Vec<u8> {
    ns_id(NS_RESERVATION, order_id)
}

/// Record key of a customer's cart.
pub fn cart_key(customer: &str) -> Vec<u8> {
    ns_id(NS_CART, customer)
}

/// Record key of an order.
pub fn order_key(order_id: &str) -> Vec<u8> {
    ns_id(NS_ORDER, order_id)
}

/// Record key of an order's payment.
pub fn payment_key(order_id: &str) -> Vec<u8> {
    ns_id(NS_PAYMENT, order_id)
}

/// Record key of the customer → order index entry.
pub fn customer_order_key(customer: &str, order_id: &str) -> Vec<u8> {
    let mut k = ns_len_id(NS_CUSTOMER_ORDER, customer);
    k.extend_from_slice(order_id.as_bytes());
    k
}

/// Prefix of a customer's index entries (they sort by order id).
pub fn customer_order_prefix(customer: &str) -> Vec<u8> {
    ns_len_id(NS_CUSTOMER_ORDER, customer)
}

/// The order id of a customer index key under `prefix`.
pub fn order_id_after<'a>(prefix: &[u8], record_key: &'a [u8]) -> Option<&'a str> {
    record_key
        .strip_prefix(prefix)
        .and_then(|rest| std::str::from_utf8(rest).ok())
}

/// Record key of an unpaid order's deadline entry.
pub fn order_deadline_key(expires_at_ms: u64, order_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + order_id.len());
    k.push(NS_ORDER_DEADLINE);
    k.extend_from_slice(&expires_at_ms.to_be_bytes());
    k.extend_from_slice(order_id.as_bytes());
    k
}

/// Prefix of every deadline entry (they sort by deadline).
pub fn order_deadline_prefix() -> Vec<u8> {
    vec![NS_ORDER_DEADLINE]
}

/// (deadline, order id) of a deadline entry.
pub fn parse_order_deadline_key(record_key: &[u8]) -> Option<(u64, &str)> {
    let rest = record_key.strip_prefix(&[NS_ORDER_DEADLINE])?;
    let at: [u8; 8] = rest.get(..8)?.try_into().ok()?;
    let id = std::str::from_utf8(rest.get(8..)?).ok()?;
    Some((u64::from_be_bytes(at), id))
}

/// Record key of an order's refund-owed entry.
pub fn refund_due_key(order_id: &str) -> Vec<u8> {
    ns_id(NS_REFUND_DUE, order_id)
}

/// Prefix of every refund-owed entry.
pub fn refund_due_prefix() -> Vec<u8> {
    vec![NS_REFUND_DUE]
}

/// The order id of a refund-owed entry.
pub fn order_id_of_refund_due(record_key: &[u8]) -> Option<&str> {
    record_key
        .strip_prefix(&[NS_REFUND_DUE])
        .and_then(|rest| std::str::from_utf8(rest).ok())
}

/// Record key of an order's capture-owed entry: its payment is authorized
/// and the capture is not recorded yet.
pub fn capture_owed_key(order_id: &str) -> Vec<u8> {
    ns_id(NS_CAPTURE_OWED, order_id)
}

/// Prefix of every capture-owed entry.
pub fn capture_owed_prefix() -> Vec<u8> {
    vec![NS_CAPTURE_OWED]
}

/// The order id of a capture-owed entry.
pub fn order_id_of_capture_owed(record_key: &[u8]) -> Option<&str> {
    record_key
        .strip_prefix(&[NS_CAPTURE_OWED])
        .and_then(|rest| std::str::from_utf8(rest).ok())
}

/// Record key of a checkout's cart-clear-owed entry (on the order's shard):
/// the cart it read, on another shard, is still to be emptied.
pub fn cart_clear_owed_key(order_id: &str) -> Vec<u8> {
    ns_id(NS_CART_CLEAR_OWED, order_id)
}

/// Prefix of every cart-clear-owed entry.
pub fn cart_clear_owed_prefix() -> Vec<u8> {
    vec![NS_CART_CLEAR_OWED]
}

/// The order id of a cart-clear-owed entry.
pub fn order_id_of_cart_clear_owed(record_key: &[u8]) -> Option<&str> {
    record_key
        .strip_prefix(&[NS_CART_CLEAR_OWED])
        .and_then(|rest| std::str::from_utf8(rest).ok())
}

/// Record key of an order's aborted 2PC transaction record (on the order's
/// shard; an undecided one is under [`txn_pending_key`]).
pub fn txn_key(order_id: &str) -> Vec<u8> {
    ns_id(NS_TXN, order_id)
}

/// Record key of an undecided transaction's record (moved to `T` when
/// aborted, where it stays for retries and late prepares until pruned;
/// deleted at commit): kept apart so that the undecided ones are one scan.
pub fn txn_pending_key(order_id: &str) -> Vec<u8> {
    ns_id(NS_TXN_PENDING, order_id)
}

/// Prefix of every undecided transaction's record.
pub fn txn_pending_prefix() -> Vec<u8> {
    vec![NS_TXN_PENDING]
}

/// Record key of the settlement an order owes its participants.
pub fn settlement_key(order_id: &str) -> Vec<u8> {
    ns_id(NS_SETTLEMENT, order_id)
}

/// Prefix of every settlement entry.
pub fn settlement_prefix() -> Vec<u8> {
    vec![NS_SETTLEMENT]
}

/// Record key of the reservations an order holds on a participant shard.
pub fn held_key(order_id: &str) -> Vec<u8> {
    ns_id(NS_HELD, order_id)
}

/// Prefix of every held entry.
pub fn held_prefix() -> Vec<u8> {
    vec![NS_HELD]
}

/// Which record of an aborted transaction an `V` index entry names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum AbortedRecord {
    /// The anchor's aborted transaction record (`T`).
    Txn,
    /// A participant's reservation released by the abort (`R`).
    Reservation,
}

impl AbortedRecord {
    fn tag(self) -> u8 {
        match self {
            AbortedRecord::Txn => NS_TXN,
            AbortedRecord::Reservation => NS_RESERVATION,
        }
    }

    fn from_tag(tag: u8) -> Option<AbortedRecord> {
        match tag {
            NS_TXN => Some(AbortedRecord::Txn),
            NS_RESERVATION => Some(AbortedRecord::Reservation),
            _ => None,
        }
    }
}

/// Index entry of an aborted transaction's tombstone (`T` or `R`), sorted by
/// when the abort was recorded so the pruner finds the old ones first.
pub fn aborted_index_key(aborted_ms: u64, record: AbortedRecord, order_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(10 + order_id.len());
    k.push(NS_ABORTED);
    k.extend_from_slice(&aborted_ms.to_be_bytes());
    k.push(record.tag());
    k.extend_from_slice(order_id.as_bytes());
    k
}

/// Prefix of every aborted-tombstone index entry.
pub fn aborted_index_prefix() -> Vec<u8> {
    vec![NS_ABORTED]
}

/// `(aborted_ms, record, order id)` of an aborted-tombstone index key.
pub fn parse_aborted_index_key(record_key: &[u8]) -> Option<(u64, AbortedRecord, &str)> {
    let rest = record_key.strip_prefix(&[NS_ABORTED])?;
    let at: [u8; 8] = rest.get(..8)?.try_into().ok()?;
    let record = AbortedRecord::from_tag(*rest.get(8)?)?;
    let id = std::str::from_utf8(rest.get(9..)?).ok()?;
    Some((u64::from_be_bytes(at), record, id))
}

/// The order id of a `T`, `S` or `H` record key (the id after the namespace byte).
pub fn order_id_of(record_key: &[u8]) -> Option<&str> {
    record_key
        .get(1..)
        .and_then(|rest| std::str::from_utf8(rest).ok())
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
    fn commerce_keys_keep_ids_apart_and_round_trip() {
        // Length prefixes: customer "a" must not see customer "ab"'s orders.
        let a = customer_order_prefix("a");
        assert!(!customer_order_key("ab", "o1").starts_with(&a));
        assert_eq!(
            order_id_after(&a, &customer_order_key("a", "o1")),
            Some("o1")
        );
        assert_eq!(sku_of_product_key(&product_key("sku-1")), Some("sku-1"));
        assert!(order_deadline_key(5, "z") < order_deadline_key(6, "a"));
        assert_eq!(
            parse_order_deadline_key(&order_deadline_key(7, "o9")),
            Some((7, "o9"))
        );
        for record in [AbortedRecord::Txn, AbortedRecord::Reservation] {
            assert_eq!(
                parse_aborted_index_key(&aborted_index_key(9, record, "o7")),
                Some((9, record, "o7"))
            );
        }
        // Older aborts sort first, whatever their order ids.
        assert!(
            aborted_index_key(1, AbortedRecord::Reservation, "zz")
                < aborted_index_key(2, AbortedRecord::Txn, "a")
        );
        assert_eq!(order_id_of_refund_due(&refund_due_key("o3")), Some("o3"));
        assert_eq!(
            order_id_of_capture_owed(&capture_owed_key("o4")),
            Some("o4")
        );
        assert_eq!(
            order_id_of_cart_clear_owed(&cart_clear_owed_key("o5")),
            Some("o5")
        );
        let kinds = [
            product_key("x"),
            inventory_key("x"),
            cart_key("x"),
            order_key("x"),
            payment_key("x"),
            refund_due_key("x"),
            capture_owed_key("x"),
            cart_clear_owed_key("x"),
            txn_key("x"),
            settlement_key("x"),
            held_key("x"),
            txn_pending_key("x"),
            kv_record_key(b"x"),
        ];
        for (i, a) in kinds.iter().enumerate() {
            for b in &kinds[i + 1..] {
                assert_ne!(a[0], b[0]);
            }
        }
    }

    #[test]
    fn prefix_successor_bounds_the_prefix() {
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_successor(&[0xff, 0xff]), None);
        assert!(data_key(4, b"zzz") < group_end(4));
    }
}
