//! Workloads, one file each. A workload prepares its data once ([`Workload::setup`])
//! and then performs one operation per call ([`Workload::op`]) on whichever system the
//! connection drives. To add one: write the file, add it to [`NAMES`] and [`build`]'s
//! match, and the runner, report and `bench/run.sh` take it as is.

use std::future::Future;

use crate::BenchError;
use crate::client::{Conn, OpError};
use crate::runner::Worker;

pub mod flash;
pub mod get;
pub mod lock;
pub mod order;
pub mod put;

/// Workload names `--workload` accepts.
pub const NAMES: &[&str] = &["put", "get-lin", "get-ser", "order", "flash", "lock"];

/// Sizes shared by the workloads: `keys` is the key count (put, get), the SKU
/// count (order) or the flash-sale stock (flash).
#[derive(Clone, Copy, Debug)]
pub struct KeySpace {
    /// Keys are `bench/00000000` … `bench/{keys-1}`.
    pub keys: u64,
    pub value_bytes: usize,
}

/// A successful operation; `retries` counts attempts the workload repeated inside it.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpDone {
    pub retries: u32,
}

/// One benchmark workload.
pub trait Workload: Send + Sync + 'static {
    /// Name in progress lines and results.
    fn name(&self) -> String;
    /// Creates the data the operations need (not measured).
    fn setup(&self, conns: &[Conn]) -> impl Future<Output = Result<(), BenchError>> + Send;
    /// Performs one operation. `Err(OpError::Done)` ends the run for every client.
    fn op(
        &self,
        conn: &mut Conn,
        worker: &mut Worker,
    ) -> impl Future<Output = Result<OpDone, OpError>> + Send;
    /// Checks the data after the run (e.g. no oversell); a failure fails the run.
    fn verify(&self, _conns: &[Conn]) -> impl Future<Output = Result<(), BenchError>> + Send {
        async { Ok(()) }
    }
}

/// The workloads by name, as an enum so the runner stays generic (static dispatch).
pub enum Named {
    Put(put::Put),
    Get(get::Get),
    Order(order::Order),
    Flash(flash::Flash),
    Lock(lock::Lock),
}

/// Builds the workload `name` over `space`.
pub fn build(name: &str, space: KeySpace) -> Result<Named, BenchError> {
    match name {
        "put" => Ok(Named::Put(put::Put { space })),
        "get-lin" => Ok(Named::Get(get::Get {
            space,
            linearizable: true,
        })),
        "get-ser" => Ok(Named::Get(get::Get {
            space,
            linearizable: false,
        })),
        "order" => Ok(Named::Order(order::Order::new(space.keys))),
        "flash" => Ok(Named::Flash(flash::Flash::new(space.keys))),
        // W3 is defined on 16 lock names, whatever --keys says.
        "lock" => Ok(Named::Lock(lock::Lock::new(LOCK_NAMES))),
        other => Err(BenchError::UnknownWorkload(
            other.to_string(),
            NAMES.join(", "),
        )),
    }
}

/// Lock names of W3.
const LOCK_NAMES: u64 = 16;

/// The key of index `i`.
pub fn key(i: u64) -> Vec<u8> {
    format!("bench/{i:08}").into_bytes()
}

impl Named {
    /// Prepares the data, then runs the closed loop.
    pub async fn setup_and_run(
        self,
        conns: &[Conn],
        spec: &crate::runner::RunSpec,
    ) -> Result<crate::runner::RunReport, BenchError> {
        use std::sync::Arc;
        async fn go<W: Workload>(
            w: W,
            conns: &[Conn],
            spec: &crate::runner::RunSpec,
        ) -> Result<crate::runner::RunReport, BenchError> {
            w.setup(conns).await?;
            let w = Arc::new(w);
            let report = crate::runner::run(Arc::clone(&w), conns, spec).await?;
            w.verify(conns).await?;
            Ok(report)
        }
        match self {
            Named::Put(w) => go(w, conns, spec).await,
            Named::Get(w) => go(w, conns, spec).await,
            Named::Order(w) => go(w, conns, spec).await,
            Named::Flash(w) => go(w, conns, spec).await,
            Named::Lock(w) => go(w, conns, spec).await,
        }
    }
}
