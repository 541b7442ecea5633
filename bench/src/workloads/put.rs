//! W1: blind put of a `value_bytes` value to a uniformly random key.
//!
//! Every value says who wrote it: `"{client:06}:{seq:012}:"` then filler derived from
//! that header, so a reader can check a value is whole and was really issued
//! ([`decode_value`]); the harness smoke test does exactly that.

use rand::Rng;
use rand::rngs::SmallRng;

use super::{KeySpace, OpDone, Workload, key};
use crate::BenchError;
use crate::client::{Conn, OpError};
use crate::runner::Worker;

const HEADER_BYTES: usize = 20;

/// The put workload.
pub struct Put {
    pub space: KeySpace,
}

impl Workload for Put {
    fn name(&self) -> String {
        "put".into()
    }

    async fn setup(&self, _conns: &[Conn]) -> Result<(), BenchError> {
        Ok(())
    }

    async fn op(&self, conn: &mut Conn, worker: &mut Worker) -> Result<OpDone, OpError> {
        let k = key(self.pick_key(&mut worker.rng));
        let value = encode_value(worker.id, worker.seq, self.space.value_bytes);
        conn.put(k, value).await?;
        Ok(OpDone::default())
    }
}

impl Put {
    /// The key index of the next operation: the only use of the client's random stream,
    /// so replaying a client's seed replays the keys it wrote.
    pub fn pick_key(&self, rng: &mut SmallRng) -> u64 {
        rng.random_range(0..self.space.keys)
    }
}

/// The header's hash, which seeds every filler byte.
fn header_hash(header: &[u8]) -> usize {
    header
        .iter()
        .fold(0u32, |h, &b| h.wrapping_mul(31).wrapping_add(u32::from(b))) as usize
}

/// Filler byte `i` of a value whose header hashes to `hash`.
fn filler(hash: usize, i: usize) -> u8 {
    b'a' + (hash.wrapping_add(i.wrapping_mul(7)) % 26) as u8
}

/// The value client `client` writes with its `seq`-th operation (at least the header long).
/// The header is hashed once per value (it was once per byte: 7 % of the load
/// generator's CPU, which shares the cores with the cluster under test).
pub fn encode_value(client: u64, seq: u64, value_bytes: usize) -> Vec<u8> {
    let mut v = format!("{client:06}:{seq:012}:").into_bytes();
    let hash = header_hash(&v);
    v.extend((HEADER_BYTES..value_bytes).map(|i| filler(hash, i)));
    v
}

/// `(client, seq)` of a value written by [`encode_value`], or `None` if it is not one.
pub fn decode_value(value: &[u8]) -> Option<(u64, u64)> {
    let header = value.get(..HEADER_BYTES)?;
    let text = std::str::from_utf8(header).ok()?;
    let client = text.get(0..6)?.parse().ok()?;
    let seq = text.get(7..19)?.parse().ok()?;
    let hash = header_hash(header);
    let whole = value
        .iter()
        .enumerate()
        .skip(HEADER_BYTES)
        .all(|(i, &b)| b == filler(hash, i));
    whole.then_some((client, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_damage_is_detected() {
        let v = encode_value(42, 7, 256);
        assert_eq!(v.len(), 256);
        assert_eq!(decode_value(&v), Some((42, 7)));
        let mut cut = v.clone();
        cut[200] ^= 1;
        assert_eq!(decode_value(&cut), None);
        assert_eq!(decode_value(b"short"), None);
    }
}
