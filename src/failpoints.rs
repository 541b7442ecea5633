//! Failpoint macros of the crash tests (`fail` crate; only builds with the
//! `failpoints` feature evaluate them, others compile them to nothing). Set
//! through the `FAILPOINTS` environment variable, e.g.
//! `FAILPOINTS=txn-after-prepare=return`.

/// Crashes the process here when the named failpoint is set to `return`:
/// tests use it to kill a coordinator between two steps, as a SIGKILL would.
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |_| {
            tracing::error!(failpoint = $name, "failpoint: aborting the process");
            std::process::abort()
        });
    };
}

/// Waits here for as many milliseconds as the named failpoint returns
/// (`name=return(MS)`): tests use it to have a caller give up in the middle
/// of a flow.
macro_rules! delay_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        if let Some(ms) = fail::eval($name, |arg| arg.and_then(|a| a.parse::<u64>().ok())).flatten()
        {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
    };
}
