//! CPU time the servers and the load generator spend per operation.
//!
//! On the benchmark machine both clusters and the load generator share the same
//! cores and run them flat out, so a throughput ratio is, underneath, a ratio of
//! CPU spent per operation. Reporting that cost beside ops/s says how far a target
//! is in work, and it moves less than ops/s between minutes of a shared VM.
//! Times come from `/proc/<pid>/stat` (user + system, every thread of the process).

use std::time::Duration;

use crate::BenchError;

/// CPU time (user + system, all threads) process `pid` has used so far; `None`
/// reads this process.
pub fn process_cpu(pid: Option<u32>) -> Result<Duration, BenchError> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let text = std::fs::read_to_string(&path)?;
    parse_stat(&text).ok_or_else(|| BenchError::Setup(format!("cannot parse {path}")))
}

/// utime + stime of a `/proc/<pid>/stat` line.
fn parse_stat(text: &str) -> Option<Duration> {
    // The command name (field 2) is in parentheses and may hold spaces and
    // parentheses itself; the fixed fields follow the last ')'. After it, state
    // is field 3, utime field 14 and stime field 15 (proc(5)).
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks_per_s = u64::try_from(ticks_per_s).ok().filter(|t| *t > 0)?;
    Some(Duration::from_micros(
        (utime + stime).saturating_mul(1_000_000) / ticks_per_s,
    ))
}

/// CPU time of the servers (`pids`) and of this process at one moment.
#[derive(Clone, Copy, Debug)]
pub struct CpuSample {
    servers: Duration,
    bench: Duration,
}

impl CpuSample {
    /// Samples `pids` and this process.
    pub fn take(pids: &[u32]) -> Result<CpuSample, BenchError> {
        let mut servers = Duration::ZERO;
        for pid in pids {
            servers += process_cpu(Some(*pid))?;
        }
        Ok(CpuSample {
            servers,
            bench: process_cpu(None)?,
        })
    }

    /// CPU per operation between `self` (earlier) and `later`, over `ops` operations.
    pub fn per_op(&self, later: &CpuSample, ops: u64) -> Option<CpuPerOp> {
        if ops == 0 {
            return None;
        }
        let us = |a: Duration, b: Duration| b.saturating_sub(a).as_micros() as f64 / ops as f64;
        Some(CpuPerOp {
            servers_us: us(self.servers, later.servers),
            bench_us: us(self.bench, later.bench),
        })
    }
}

/// Microseconds of CPU per operation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuPerOp {
    /// Summed over the server processes of the cluster.
    pub servers_us: f64,
    /// The load generator's own.
    pub bench_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // A command name with a space and a ')' must not shift the fields.
        let line =
            "4242 (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 1 1 1";
        let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        assert_eq!(
            parse_stat(line),
            Some(Duration::from_micros(300 * 1_000_000 / tick))
        );
        assert_eq!(parse_stat("4242 (x) S 1 2"), None);
    }

    #[test]
    fn this_process_is_measured_and_per_op_divides_the_difference() {
        let a = CpuSample::take(&[]).expect("own /proc/self/stat");
        // Burn a little CPU so the later sample is not smaller.
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let b = CpuSample::take(&[]).expect("own /proc/self/stat");
        assert!(b.bench >= a.bench);
        let early = CpuSample {
            servers: Duration::from_millis(10),
            bench: Duration::from_millis(1),
        };
        let late = CpuSample {
            servers: Duration::from_millis(30),
            bench: Duration::from_millis(5),
        };
        assert_eq!(
            early.per_op(&late, 100),
            Some(CpuPerOp {
                servers_us: 200.0,
                bench_us: 40.0
            })
        );
        assert_eq!(early.per_op(&late, 0), None);
    }
}
