//! W2: read of a uniformly random existing key, linearizable or serializable.
//! Setup writes every key once (64 writers), so a missing key is an error.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::Rng;

use super::put::encode_value;
use super::{KeySpace, OpDone, Workload, key};
use crate::BenchError;
use crate::client::{Conn, OpError};
use crate::runner::Worker;

const LOADERS: usize = 64;

/// The get workload.
pub struct Get {
    pub space: KeySpace,
    pub linearizable: bool,
}

impl Workload for Get {
    fn name(&self) -> String {
        if self.linearizable {
            "get-lin"
        } else {
            "get-ser"
        }
        .into()
    }

    async fn setup(&self, conns: &[Conn]) -> Result<(), BenchError> {
        if conns.is_empty() {
            return Err(BenchError::Setup("no connections".into()));
        }
        let next = Arc::new(AtomicU64::new(0));
        let mut loaders = Vec::new();
        for l in 0..LOADERS {
            let mut conn = conns[l % conns.len()].clone();
            let next = Arc::clone(&next);
            let space = self.space;
            loaders.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= space.keys {
                        return Ok(());
                    }
                    let value = encode_value(u64::from(u32::MAX), i, space.value_bytes);
                    if let Err(e) = conn.put(key(i), value).await {
                        return Err(BenchError::Setup(format!("loading key {i}: {e}")));
                    }
                }
            }));
        }
        for l in loaders {
            l.await.map_err(|e| BenchError::Setup(e.to_string()))??;
        }
        Ok(())
    }

    async fn op(&self, conn: &mut Conn, worker: &mut Worker) -> Result<OpDone, OpError> {
        let i = worker.rng.random_range(0..self.space.keys);
        match conn.get(key(i), self.linearizable).await? {
            Some(_) => Ok(OpDone::default()),
            None => Err(OpError::Missing(format!("bench/{i:08}"))),
        }
    }
}
