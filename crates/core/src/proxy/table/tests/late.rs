//! Branches added to a call after it was forked (late forking, a device's next flow), calls
//! held for a sleeping device, and calls another node counts.

use super::*;

#[test]
fn a_call_delivered_for_another_node_reports_no_outcome_but_still_ends_its_media() {
    let mut h = Harness::new();
    let (answered, failed) = (request("INVITE", "d1"), request("INVITE", "d2"));
    let quiet = Upstream {
        reports_call: false,
        ..upstream()
    };
    for (n, req) in [(1, &answered), (2, &failed)] {
        h.table
            .open(Harness::key(req), req.clone(), quiet.clone(), h.now)
            .expect("room");
        let branch = NewBranch {
            branch: branch_of(n),
            request: forwarded(req, n),
            to: n,
            reliable: false,
        };
        h.table.fork(
            Harness::key(req),
            req.clone(),
            quiet.clone(),
            vec![branch],
            h.now,
        );
    }
    h.sent();
    h.table
        .handle_response(&response(&answered, 1, 200, &[]), h.now);
    h.table
        .handle_response(&response(&failed, 2, 486, &[]), h.now);
    assert_eq!(
        h.events(),
        vec![
            final_event(200),
            final_event(486),
            Event::MediaEnd {
                call_id: "d2".into()
            },
        ]
    );
}

#[test]
fn a_ringing_call_gains_a_late_branch_that_can_answer_it_but_not_after_cancel_or_answer() {
    let mut h = Harness::new();
    let req = request("INVITE", "late");
    let key = Harness::key(&req);
    h.call(&req, &[1]);
    h.table.handle_response(&response(&req, 1, 180, &[]), h.now);
    h.sent();
    // The callee's device registers again elsewhere while branch 1 rings: a second branch.
    let late = |n: u8| NewBranch {
        branch: branch_of(n),
        request: forwarded(&req, n),
        to: n,
        reliable: false,
    };
    assert!(h.table.ringing(&key).is_some());
    assert!(h.table.add_branches(&key, vec![late(2)], h.now));
    assert_eq!(h.sent(), (vec![], down(&[(2, "INVITE")])));
    // Branch 1 fails meanwhile: the call waits for the late branch instead of failing.
    h.table.handle_response(&response(&req, 1, 503, &[]), h.now);
    assert_eq!(h.sent(), (vec![], down(&[(1, "ACK")])));
    h.table.handle_response(&response(&req, 2, 200, &[]), h.now);
    assert_eq!(h.upstream(), vec![200]);
    // Answered: no more branches.
    assert!(h.table.ringing(&key).is_none());
    assert!(!h.table.add_branches(&key, vec![late(3)], h.now));

    // A cancelled call gains none either.
    let req = request("INVITE", "late2");
    let key = Harness::key(&req);
    h.call(&req, &[4]);
    h.sent();
    assert!(h.table.handle_cancel(&key, h.now));
    assert!(h.table.ringing(&key).is_none());
    let nb = NewBranch {
        branch: branch_of(5),
        request: forwarded(&req, 5),
        to: 5,
        reliable: false,
    };
    assert!(!h.table.add_branches(&key, vec![nb], h.now));
    assert_eq!(h.sent(), (vec![], down(&[(4, "CANCEL")])));
}

#[test]
fn an_invite_held_for_a_sleeping_device_is_forked_when_it_wakes_or_gets_480() {
    let mut h = Harness::new();
    // Held: no branch yet (a push went out); the device registers and gets its branch.
    let woken = request("INVITE", "held-1");
    let key = Harness::key(&woken);
    h.table
        .open(key.clone(), woken.clone(), upstream(), h.now)
        .expect("room");
    assert!(h.hold(&woken, 10));
    assert_eq!(h.upstream(), Vec::<u16>::new(), "100 Trying held");
    assert!(
        h.table.ringing(&key).is_some(),
        "a held call can gain a branch"
    );
    h.advance(Duration::from_secs(3));
    let nb = NewBranch {
        branch: branch_of(1),
        request: forwarded(&woken, 1),
        to: 1,
        reliable: false,
    };
    assert!(h.table.add_branches(&key, vec![nb], h.now));
    // The held 100 Trying went up while the device woke.
    assert_eq!(h.sent(), (vec![100], down(&[(1, "INVITE")])));
    // The only sleeping device got its branch: the call waits no more.
    h.table.unhold(&key, None, h.now);
    // Its deadline no longer applies once it has a branch.
    h.advance(Duration::from_secs(8));
    assert_eq!(h.upstream(), Vec::<u16>::new());
    h.table
        .handle_response(&response(&woken, 1, 200, &[]), h.now);
    assert_eq!(h.upstream(), vec![200]);

    // Nobody wakes: one 480 at the deadline, and a late registration adds nothing.
    let asleep = request("INVITE", "held-2");
    let key = Harness::key(&asleep);
    h.table
        .open(key.clone(), asleep.clone(), upstream(), h.now)
        .expect("room");
    assert!(h.hold(&asleep, 10));
    h.sent();
    h.advance(Duration::from_secs(9));
    assert_eq!(h.upstream(), vec![100], "the held 100 Trying only");
    h.advance(Duration::from_secs(1));
    let m = h.last_upstream();
    assert_eq!(m.status(), Some(480));
    assert!(
        String::from_utf8_lossy(m.bytes()).contains("\r\nReason: SIP;cause=480;"),
        "the 480 says why"
    );
    let nb = NewBranch {
        branch: branch_of(2),
        request: forwarded(&asleep, 2),
        to: 2,
        reliable: false,
    };
    assert!(!h.table.add_branches(&key, vec![nb], h.now));

    // Cancelled while held: 487.
    let cancelled = request("INVITE", "held-3");
    let key = Harness::key(&cancelled);
    h.table
        .open(key.clone(), cancelled.clone(), upstream(), h.now)
        .expect("room");
    assert!(h.hold(&cancelled, 10));
    h.sent();
    assert!(h.table.handle_cancel(&key, h.now));
    assert_eq!(h.last_upstream().status(), Some(487));
}

#[test]
fn a_held_call_outlives_a_busy_desk_phone_until_the_woken_phone_answers() {
    let mut h = Harness::new();
    let req = request("INVITE", "desk-and-mobile");
    let key = Harness::key(&req);
    // The desk phone rings at once; the mobile was pushed.
    h.call(&req, &[1]);
    assert!(h.hold(&req, 10));
    h.sent();
    h.table.handle_response(&response(&req, 1, 486, &[]), h.now);
    assert_eq!(h.sent(), (vec![], down(&[(1, "ACK")])), "486 held back");
    assert!(h.table.ringing(&key).is_some());
    h.advance(Duration::from_secs(2));
    let nb = NewBranch {
        branch: branch_of(2),
        request: forwarded(&req, 2),
        to: 2,
        reliable: false,
    };
    assert!(h.table.add_branches(&key, vec![nb], h.now));
    h.table.unhold(&key, None, h.now);
    // Nothing went up in the first 100 ms (the 486 is held back): the held 100 Trying did.
    assert_eq!(h.sent(), (vec![100], down(&[(2, "INVITE")])));
    h.table.handle_response(&response(&req, 2, 200, &[]), h.now);
    assert_eq!(h.upstream(), vec![200]);
}

#[test]
fn a_refused_push_answers_a_held_call_with_its_reason_or_leaves_it_to_the_branches() {
    let mut h = Harness::new();
    // Only the mobile, and its token is unknown to the service: 404 with the reason.
    let req = request("INVITE", "bad-token");
    let key = Harness::key(&req);
    h.table
        .open(key.clone(), req.clone(), upstream(), h.now)
        .expect("room");
    assert!(h.hold(&req, 10));
    h.sent();
    h.table
        .unhold(&key, Some((404, "push token unregistered")), h.now);
    let m = h.last_upstream();
    assert_eq!(m.status(), Some(404));
    assert!(
        String::from_utf8_lossy(m.bytes())
            .contains("Reason: SIP;cause=404;text=\"push token unregistered\"")
    );

    // A desk phone rings too: the failure only competes with it, and it answers.
    let mut h = Harness::new();
    let req = request("INVITE", "bad-token-desk");
    let key = Harness::key(&req);
    h.call(&req, &[3]);
    assert!(h.hold(&req, 10));
    h.sent();
    h.table
        .unhold(&key, Some((480, "push service unavailable")), h.now);
    assert_eq!(h.upstream(), Vec::<u16>::new());
    h.table.handle_response(&response(&req, 3, 200, &[]), h.now);
    assert_eq!(h.upstream(), vec![200]);

    // The desk phone was busy and the mobile never woke: one final at the deadline.
    let mut h = Harness::new();
    let req = request("INVITE", "nobody");
    h.call(&req, &[4]);
    assert!(h.hold(&req, 10));
    h.sent();
    h.table.handle_response(&response(&req, 4, 486, &[]), h.now);
    h.sent();
    h.advance(Duration::from_secs(10));
    let up = h.upstream();
    assert_eq!(up.len(), 2, "the held 100 Trying and one final: {up:?}");
    assert_eq!(up[0], 100);
    assert!(matches!(up[1], 480 | 486), "{up:?}");
}

#[test]
fn a_device_woken_for_a_call_that_ended_gets_the_invite_then_a_cancel_and_nothing_goes_up() {
    let mut h = Harness::new();
    let req = request("INVITE", "ended");
    let nb = NewBranch {
        branch: branch_of(7),
        request: forwarded(&req, 7),
        to: 7,
        reliable: false,
    };
    h.table.ring_and_cancel(nb, h.now);
    assert_eq!(h.sent(), (vec![], down(&[(7, "INVITE")])));
    h.table.handle_response(&response(&req, 7, 180, &[]), h.now);
    assert_eq!(
        h.sent(),
        (vec![], down(&[(7, "CANCEL")])),
        "CANCEL once it rings"
    );
    h.table.handle_response(&response(&req, 7, 487, &[]), h.now);
    assert_eq!(h.sent(), (vec![], down(&[(7, "ACK")])));
    assert!(h.events().is_empty());
}
