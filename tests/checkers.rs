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
