//! Latency histograms and counters of one run. Each client task keeps its own
//! [`Recorder`] (no shared lock on the hot path); the runner merges them.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency the histogram resolves (anything slower is clamped to it).
const MAX_LATENCY_US: u64 = 60_000_000;

/// Counts and latencies of completed operations inside the measured window.
pub struct Recorder {
    latency_us: Histogram<u64>,
    /// Operations that failed (not in the histogram).
    pub errors: u64,
    /// Retries the workload made inside successful operations (e.g. CAS conflicts).
    pub retries: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        // 3 significant digits from 1 µs to 60 s: bounded memory (~200 KiB).
        let latency_us = Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
            .expect("constant histogram bounds are valid");
        Recorder {
            latency_us,
            errors: 0,
            retries: 0,
        }
    }

    pub fn ok(&mut self, latency: Duration, retries: u32) {
        let us = (latency.as_micros() as u64).clamp(1, MAX_LATENCY_US);
        // saturating_record never fails; values are clamped above anyway.
        self.latency_us.saturating_record(us);
        self.retries += u64::from(retries);
    }

    pub fn error(&mut self) {
        self.errors += 1;
    }

    pub fn merge(&mut self, other: &Recorder) {
        // Same bounds on both sides, so adding cannot fail; ignore the impossible.
        let _ = self.latency_us.add(&other.latency_us);
        self.errors += other.errors;
        self.retries += other.retries;
    }

    pub fn ops(&self) -> u64 {
        self.latency_us.len()
    }

    pub fn summary(&self, window: Duration) -> Summary {
        let ms = |q: f64| self.latency_us.value_at_quantile(q) as f64 / 1000.0;
        let secs = window.as_secs_f64().max(1e-9);
        Summary {
            ops: self.ops(),
            ops_per_s: self.ops() as f64 / secs,
            p50_ms: ms(0.50),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: self.latency_us.max() as f64 / 1000.0,
            errors: self.errors,
            retries: self.retries,
        }
    }
}

/// What one run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub ops: u64,
    pub ops_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub errors: u64,
    pub retries: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_rate_come_from_merged_recorders() {
        let mut a = Recorder::new();
        let mut b = Recorder::new();
        for _ in 0..99 {
            a.ok(Duration::from_millis(1), 0);
        }
        b.ok(Duration::from_millis(100), 2);
        b.error();
        a.merge(&b);
        let s = a.summary(Duration::from_secs(2));
        assert_eq!(s.ops, 100);
        assert_eq!(s.ops_per_s, 50.0);
        assert_eq!(s.errors, 1);
        assert_eq!(s.retries, 2);
        assert!((s.p50_ms - 1.0).abs() < 0.01, "{s:?}");
        assert!((s.p999_ms - 100.0).abs() < 0.1, "{s:?}");
    }
}
