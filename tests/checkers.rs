//! The chaos checkers are themselves tested: each must report a violation for
//! a history that has one, and none for a correct one.

mod common;

use std::time::Duration;

use common::history::{
    Call, DigestSample, Op, Outcome, RaftSample, Verdict, check_digests, check_linearizable,
    check_raft_samples,
};

fn op(process: u32, invoke_ns: i64, complete_ns: i64, call: Call, outcome: Outcome) -> Op {
    Op {
        process,
        key: 0,
        invoke_ns,
        complete_ns,
        call,
        outcome,
    }
}

const T: Duration = Duration::from_secs(10);

#[test]
fn a_correct_history_with_unknown_outcomes_passes() {
    let h = vec![
        op(1, 0, 10, Call::Put { value: 1 }, Outcome::Written(5)),
        op(2, 20, 30, Call::Get, Outcome::Read(Some((1, 5)))),
        // Unknown write that did happen: a later read sees it.
        op(3, 40, 50, Call::Put { value: 2 }, Outcome::Unknown),
        op(2, 60, 70, Call::Get, Outcome::Read(Some((2, 9)))),
        op(
            4,
            80,
            90,
            Call::Cas {
                expected: 9,
                value: 3,
            },
            Outcome::Swapped {
                ok: true,
                version: 12,
                current: None,
            },
        ),
        // Unknown CAS that did not happen: nobody sees its value.
        op(
            5,
            100,
            110,
            Call::Cas {
                expected: 5,
                value: 4,
            },
            Outcome::Unknown,
        ),
        op(2, 120, 130, Call::Get, Outcome::Read(Some((3, 12)))),
        op(
            6,
            140,
            150,
            Call::Cas {
                expected: 5,
                value: 7,
            },
            Outcome::Swapped {
                ok: false,
                version: 12,
                current: Some(3),
            },
        ),
        op(7, 160, 170, Call::Put { value: 8 }, Outcome::Failed),
    ];
    assert_eq!(check_linearizable(&h, T), Verdict::Ok);
}

#[test]
fn a_stale_read_is_a_violation() {
    let h = vec![
        op(1, 0, 10, Call::Put { value: 1 }, Outcome::Written(5)),
        op(1, 20, 30, Call::Put { value: 2 }, Outcome::Written(7)),
        // Starts after the second write completed, yet sees the first.
        op(2, 40, 50, Call::Get, Outcome::Read(Some((1, 5)))),
    ];
    assert_eq!(check_linearizable(&h, T), Verdict::Violation);
}

#[test]
fn a_lost_acknowledged_write_is_a_violation() {
    let h = vec![
        op(1, 0, 10, Call::Put { value: 1 }, Outcome::Written(5)),
        // The acknowledged write is gone.
        op(2, 20, 30, Call::Get, Outcome::Read(None)),
    ];
    assert_eq!(check_linearizable(&h, T), Verdict::Violation);
    // And an unknown write seen, then un-seen, is one too.
    let h = vec![
        op(1, 0, 10, Call::Put { value: 1 }, Outcome::Unknown),
        op(2, 20, 30, Call::Get, Outcome::Read(Some((1, 3)))),
        op(2, 40, 50, Call::Get, Outcome::Read(None)),
    ];
    assert_eq!(check_linearizable(&h, T), Verdict::Violation);
}

#[test]
fn a_cas_against_a_superseded_version_is_a_violation() {
    let h = vec![
        op(1, 0, 10, Call::Put { value: 1 }, Outcome::Written(5)),
        op(1, 20, 30, Call::Put { value: 2 }, Outcome::Written(7)),
        op(
            2,
            40,
            50,
            Call::Cas {
                expected: 5,
                value: 3,
            },
            Outcome::Swapped {
                ok: true,
                version: 9,
                current: None,
            },
        ),
    ];
    assert_eq!(check_linearizable(&h, T), Verdict::Violation);
}

#[test]
fn diverging_replica_digests_are_a_violation() {
    let d = |node, digest| DigestSample {
        group: 1,
        node,
        index: 40,
        digest,
    };
    assert!(check_digests(&[d(1, 7), d(2, 7), d(3, 7)]).is_empty());
    let v = check_digests(&[d(1, 7), d(2, 7), d(3, 8)]);
    assert_eq!(v.len(), 1, "{v:?}");
    // Different applied indexes are not compared.
    let mut other = d(3, 8);
    other.index = 41;
    assert!(check_digests(&[d(1, 7), d(2, 7), other]).is_empty());
}

#[test]
fn raft_progress_checker_catches_regressions_and_two_leaders() {
    let s = |node, incarnation, term, commit, leader| RaftSample {
        node,
        incarnation,
        group: 1,
        term,
        commit,
        leader,
    };
    assert!(
        check_raft_samples(&[
            s(1, 0, 2, 10, true),
            s(2, 0, 2, 10, false),
            s(1, 1, 3, 4, false)
        ])
        .is_empty()
    );
    assert_eq!(
        check_raft_samples(&[s(1, 0, 3, 10, false), s(1, 0, 2, 11, false)]).len(),
        1
    );
    assert_eq!(
        check_raft_samples(&[s(1, 0, 3, 10, false), s(1, 0, 3, 9, false)]).len(),
        1
    );
    assert_eq!(
        check_raft_samples(&[s(1, 0, 3, 10, true), s(2, 0, 3, 10, true)]).len(),
        1
    );
}

#[test]
fn thousands_of_unseen_unknown_writes_do_not_stall_the_checker() {
    let mut h = vec![op(1, 0, 10, Call::Put { value: 1 }, Outcome::Written(5))];
    for i in 0..3000i64 {
        // Overlapping timed-out writes nobody ever read.
        h.push(op(
            100 + i as u32,
            20 + i,
            30 + i,
            Call::Put {
                value: 10_000 + i as u64,
            },
            Outcome::Unknown,
        ));
    }
    h.push(op(2, 5000, 5010, Call::Get, Outcome::Read(Some((1, 5)))));
    h.push(op(
        3,
        5020,
        5030,
        Call::Put { value: 2 },
        Outcome::Written(9000),
    ));
    h.push(op(2, 5040, 5050, Call::Get, Outcome::Read(Some((2, 9000)))));
    let started = std::time::Instant::now();
    assert_eq!(check_linearizable(&h, T), Verdict::Ok);
    assert!(started.elapsed() < Duration::from_secs(5));
    // A violation among them is still found.
    h.push(op(2, 6000, 6010, Call::Get, Outcome::Read(Some((1, 5)))));
    assert_eq!(check_linearizable(&h, T), Verdict::Violation);
}

#[test]
fn an_unknown_write_a_failed_cas_reports_is_kept() {
    // The failed CAS saw value 2 at version 7: the unknown write happened.
    let h = vec![
        op(1, 0, 10, Call::Put { value: 1 }, Outcome::Written(5)),
        op(2, 20, 30, Call::Put { value: 2 }, Outcome::Unknown),
        op(
            3,
            40,
            50,
            Call::Cas {
                expected: 5,
                value: 3,
            },
            Outcome::Swapped {
                ok: false,
                version: 7,
                current: Some(2),
            },
        ),
    ];
    assert_eq!(check_linearizable(&h, T), Verdict::Ok);
}

/// Re-checks a kept chaos history: `SHOPKV_HISTORY=path cargo test --release
/// --test checkers -- --ignored recheck`.
#[test]
#[ignore = "a triage tool for kept chaos histories"]
fn recheck_history_file() {
    let path = std::env::var("SHOPKV_HISTORY").expect("set SHOPKV_HISTORY to a history.json");
    let h: Vec<Op> = serde_json::from_slice(&std::fs::read(&path).expect("read history"))
        .expect("parse history");
    let started = std::time::Instant::now();
    let verdict = check_linearizable(&h, Duration::from_secs(300));
    println!("{} ops: {verdict:?} in {:?}", h.len(), started.elapsed());
    if verdict != Verdict::Ok {
        let keys: std::collections::BTreeSet<u32> = h.iter().map(|o| o.key).collect();
        let only: Option<u32> = std::env::var("SHOPKV_HISTORY_KEY")
            .ok()
            .and_then(|k| k.parse().ok());
        for k in keys.into_iter().filter(|k| only.is_none_or(|o| o == *k)) {
            let hk: Vec<Op> = h.iter().filter(|o| o.key == k).cloned().collect();
            println!(
                "key {k}: {:?}",
                check_linearizable(&hk, Duration::from_secs(300))
            );
        }
    }
    assert_eq!(verdict, Verdict::Ok);
}

#[test]
fn a_failed_cas_reporting_a_value_the_key_does_not_hold_is_a_violation() {
    let h = vec![
        op(1, 0, 10, Call::Put { value: 1 }, Outcome::Written(5)),
        op(1, 20, 30, Call::Put { value: 2 }, Outcome::Written(7)),
        op(
            2,
            40,
            50,
            Call::Cas {
                expected: 3,
                value: 9,
            },
            Outcome::Swapped {
                ok: false,
                version: 5,
                current: Some(1),
            },
        ),
    ];
    assert_eq!(check_linearizable(&h, T), Verdict::Violation);
}
