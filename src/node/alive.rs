//! The alive stamp: how long ago a restarted node could last have granted a
//! leader its lease, so that it holds off voting only as long as it must.
//!
//! Leaders serve linearizable reads on a lease; followers keep the promise
//! behind it (no vote for anyone else within a lease of hearing the leader) only
//! in memory. A node that restarts must therefore not vote until every lease it
//! may have granted before it died has run out. Knowing nothing, it must assume
//! it died this instant and hold off a whole lease — which, when the node was
//! down longer than that, only costs availability: a node that restarts just as
//! the leader dies leaves the group without a quorum of voters for a lease.
//!
//! So a thread writes the `CLOCK_BOOTTIME` reading into `<data dir>/alive` every
//! [`STAMP_INTERVAL`], and the peer service accepts a leader's appends only
//! while the last stamp written is younger than [`STAMP_FRESH_FOR_MS`] (see
//! [`AliveStamp::fresh`]). Every lease this process granted thus started before
//! `last stamp + STAMP_FRESH_FOR_MS`, and a restart need hold off only until that
//! plus a lease. No fsync: a killed process's writes stay in the page cache.
//! After a reboot the file may hold an older stamp, or zeros, and the boot clock
//! restarted at zero — yet every lease granted before the reboot began at least
//! `now` (the boot clock's reading) ago, so the hold-off computed from any
//! stamp ≥ 0 is still long enough. A missing or unreadable file means a full
//! lease.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often the stamp is written.
pub const STAMP_INTERVAL: Duration = Duration::from_millis(50);

/// How old the last stamp may be while this node still accepts a leader's
/// appends (and so grants its lease). Several intervals, so that a thread
/// that wakes a little late does not cut the node off its groups. In the
/// boot clock's unit (ms).
pub const STAMP_FRESH_FOR_MS: u64 = 300;

/// The stamp file's name in the data dir.
const STAMP_FILE: &str = "alive";

/// Milliseconds on `CLOCK_BOOTTIME`: since boot, counting suspended time, the
/// same for every process of the machine.
pub fn boot_clock_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let millis = u64::try_from(t.tv_nsec / 1_000_000).unwrap_or(0);
    secs.saturating_mul(1000).saturating_add(millis)
}

/// How long a node that finds `previous` (the last stamp of its last run, if
/// any) at boot-clock time `now_ms` must still hold off voting.
pub fn hold_off_after(previous: Option<u64>, now_ms: u64, lease: Duration) -> Duration {
    let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
    match previous {
        // A stamp from the future: the clock cannot have gone back, so the
        // file is not what this module wrote. Assume the worst.
        Some(stamp) if stamp <= now_ms => {
            let until = stamp
                .saturating_add(STAMP_FRESH_FOR_MS)
                .saturating_add(lease_ms);
            Duration::from_millis(until.saturating_sub(now_ms))
        }
        _ => lease,
    }
}

/// This process's stamp: the writer thread's last completed write.
pub struct AliveStamp {
    file: File,
    /// Boot-clock ms of the last stamp written (0: none yet).
    last_written_ms: AtomicU64,
}

impl AliveStamp {
    /// Reads the previous run's stamp in `dir`, writes this run's first one,
    /// starts the writer thread, and says how long this node must hold off
    /// voting (see the module comment).
    pub fn start(dir: &Path, lease: Duration) -> std::io::Result<(Arc<AliveStamp>, Duration)> {
        let path = dir.join(STAMP_FILE);
        let previous = read_stamp(&path);
        let hold_off = hold_off_after(previous, boot_clock_ms(), lease);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let stamp = Arc::new(AliveStamp {
            file,
            last_written_ms: AtomicU64::new(0),
        });
        stamp.write()?;
        let weak = Arc::downgrade(&stamp);
        std::thread::Builder::new()
            .name("alive-stamp".into())
            .spawn(move || write_until_dropped(weak))?;
        Ok((stamp, hold_off))
    }

    /// True while the last stamp is younger than [`STAMP_FRESH_FOR_MS`]: only
    /// then may this node accept a leader's appends, since a lease granted now
    /// must begin before what a restart would read plus that bound.
    pub fn fresh(&self) -> bool {
        let last = self.last_written_ms.load(Ordering::Acquire);
        last != 0 && boot_clock_ms().saturating_sub(last) < STAMP_FRESH_FOR_MS
    }

    fn write(&self) -> std::io::Result<()> {
        let now = boot_clock_ms();
        self.file.write_all_at(&now.to_le_bytes(), 0)?;
        // Published only once the file holds it: `fresh` must never rely on a
        // stamp a restart could not read.
        self.last_written_ms.store(now, Ordering::Release);
        Ok(())
    }
}

fn read_stamp(path: &Path) -> Option<u64> {
    let mut bytes = [0u8; 8];
    File::open(path).ok()?.read_exact(&mut bytes).ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// The writer thread: a plain thread, so a busy async runtime does not delay
/// the stamp (a late stamp makes the node refuse appends, never unsafe).
fn write_until_dropped(stamp: Weak<AliveStamp>) {
    let mut failing = false;
    loop {
        std::thread::sleep(STAMP_INTERVAL);
        let Some(stamp) = stamp.upgrade() else { return };
        match stamp.write() {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot write the alive stamp; refusing leader appends until it can");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(1000);

    #[test]
    fn no_stamp_or_one_from_the_future_holds_off_a_whole_lease() {
        assert_eq!(hold_off_after(None, 10_000, LEASE), LEASE);
        assert_eq!(hold_off_after(Some(10_001), 10_000, LEASE), LEASE);
    }

    #[test]
    fn a_node_down_longer_than_a_lease_and_the_stamp_bound_votes_at_once() {
        assert_eq!(hold_off_after(Some(10_000), 11_300, LEASE), Duration::ZERO);
        assert_eq!(hold_off_after(Some(10_000), 50_000, LEASE), Duration::ZERO);
    }

    #[test]
    fn a_node_down_briefly_holds_off_until_the_last_lease_it_could_have_granted_ends() {
        // Last stamp at 10 000: a lease granted by 10 300 ends by 11 300.
        assert_eq!(
            hold_off_after(Some(10_000), 10_500, LEASE),
            Duration::from_millis(800)
        );
        assert_eq!(
            hold_off_after(Some(10_000), 10_000, LEASE),
            Duration::from_millis(1300)
        );
    }

    #[test]
    fn after_a_reboot_any_stamp_still_covers_what_the_boot_clock_has_not() {
        // The boot clock restarted; 400 ms since boot means every old lease
        // began at least 400 ms ago, so at most 600 ms are owed. A zeroed or
        // old stamp must never owe less.
        for stamp in [0, 100, 399] {
            assert!(hold_off_after(Some(stamp), 400, LEASE) >= Duration::from_millis(600));
        }
    }

    #[test]
    fn appends_are_refused_once_the_last_stamp_is_older_than_the_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        // No writer thread here, so nothing freshens the stamp behind the test's back.
        let stamp = AliveStamp {
            file: File::create(dir.path().join(STAMP_FILE)).expect("file"),
            last_written_ms: AtomicU64::new(0),
        };
        assert!(!stamp.fresh(), "no stamp yet is stale");
        stamp.write().expect("write");
        assert!(stamp.fresh());
        stamp
            .last_written_ms
            .store(boot_clock_ms() - STAMP_FRESH_FOR_MS, Ordering::Release);
        assert!(!stamp.fresh(), "a stamp as old as the bound is stale");
    }

    #[test]
    fn the_writer_thread_keeps_the_stamp_fresh() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (stamp, _) = AliveStamp::start(dir.path(), LEASE).expect("start");
        let first = stamp.last_written_ms.load(Ordering::Acquire);
        std::thread::sleep(Duration::from_millis(2 * STAMP_FRESH_FOR_MS));
        let later = stamp.last_written_ms.load(Ordering::Acquire);
        assert!(later > first, "no stamp written after the first");
        let on_disk = read_stamp(&dir.path().join(STAMP_FILE)).expect("stamp file");
        assert!(
            on_disk >= later,
            "the file holds at least what fresh() trusts"
        );
    }

    #[test]
    fn the_stamp_is_written_at_start_and_read_back_by_the_next_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (stamp, first_hold_off) = AliveStamp::start(dir.path(), LEASE).expect("start");
        assert_eq!(first_hold_off, LEASE, "a first start knows nothing");
        assert!(stamp.fresh());
        let written = read_stamp(&dir.path().join(STAMP_FILE)).expect("stamp file");
        assert!(written <= boot_clock_ms() && written + 1000 > boot_clock_ms());
        drop(stamp);
        let (_again, hold_off) = AliveStamp::start(dir.path(), LEASE).expect("restart");
        assert!(
            hold_off > LEASE && hold_off <= LEASE + Duration::from_millis(STAMP_FRESH_FOR_MS),
            "{hold_off:?}"
        );
    }
}
