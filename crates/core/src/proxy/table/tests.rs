//! The proxy's transactions without sockets or sleeps: a caller, a table, targets numbered
//! 1, 2, 3, and a clock that only moves when a test says so.

use std::time::Duration;

use careflow_proto::{HeaderName, ParseLimits};

use super::*;
use crate::transaction::TimerConfig;

/// The caller's way back, as the driver would have it.
const CALLER: &str = "caller";

struct Harness {
    table: ProxyTable<&'static str, u8>,
    now: Instant,
    start: Instant,
}

fn parse(s: &str) -> Message {
    Message::parse(Bytes::from(s.to_string()), &ParseLimits::default()).expect("test message")
}

/// A request from the caller (no To tag: a call).
fn request(method: &str, call: &str) -> Message {
    parse(&format!(
        "{method} sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKcaller{call}\r\nMax-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <sip:bob@example.com>\r\nCall-ID: {call}\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
    ))
}

/// The request as we send it on branch `n`: our Via on top.
fn forwarded(req: &Message, n: u8) -> Message {
    let text = String::from_utf8_lossy(req.bytes()).into_owned();
    let (line, rest) = text.split_once("\r\n").expect("start line");
    parse(&format!(
        "{line}\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch={}\r\n{rest}",
        branch_of(n)
    ))
}

fn branch_of(n: u8) -> String {
    format!("z9hG4bKproxy.{n}")
}

fn upstream() -> Upstream<&'static str> {
    Upstream {
        source: "192.0.2.10:5060".parse().expect("address"),
        reliable: false,
        to: CALLER,
        reports_call: true,
    }
}

/// A response from target `n` to the request we forwarded there.
fn response(req: &Message, n: u8, code: u16, extra: &[(&str, &str)]) -> Message {
    let out = forwarded(req, n);
    let mut b = ResponseBuilder::new(&out, code).to_tag(format!("t{n}"));
    for (name, value) in extra {
        b = b.header(name, value);
    }
    Message::parse(b.build(), &ParseLimits::default()).expect("response")
}

impl Harness {
    fn new() -> Self {
        Self::with_timers(TimerConfig::default())
    }

    fn with_timers(timers: TimerConfig) -> Self {
        let now = Instant::now();
        Self {
            table: ProxyTable::new(ProxyConfig {
                timers,
                parse_limits: ParseLimits::default(),
                server_header: "careflow-sip test".into(),
                max_transactions: 100,
            }),
            now,
            start: now,
        }
    }

    fn key(req: &Message) -> TxKey {
        TxKey::of(req).expect("key")
    }

    /// Opens the INVITE (as the driver does before routing) and forks it to `targets`.
    fn call(&mut self, req: &Message, targets: &[u8]) {
        self.table
            .open(Self::key(req), req.clone(), upstream(), self.now)
            .expect("room");
        self.fork(req, targets);
    }

    fn fork(&mut self, req: &Message, targets: &[u8]) -> Fork {
        let branches = targets
            .iter()
            .map(|&n| NewBranch {
                branch: branch_of(n),
                request: forwarded(req, n),
                to: n,
                reliable: false,
            })
            .collect();
        self.table
            .fork(Self::key(req), req.clone(), upstream(), branches, self.now)
    }

    /// Holds `req` for sleeping devices for `secs`.
    fn hold(&mut self, req: &Message, secs: u64) -> bool {
        let until = self.now + Duration::from_secs(secs);
        self.table
            .hold(&Self::key(req), req, &upstream(), until, self.now)
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.table.handle_timeout(self.now);
    }

    /// Runs the timers in 100 ms steps up to `at` after the start, like the driver's tick.
    fn run_until(&mut self, at: Duration) {
        while self.now < self.start + at {
            self.advance(Duration::from_millis(100));
        }
    }

    /// What went upstream: status codes (requests would be a bug: 0).
    fn upstream(&mut self) -> Vec<u16> {
        self.sent().0
    }

    /// Everything sent since the last look: codes upstream, (target, method or code) down.
    fn sent(&mut self) -> (Vec<u16>, Vec<(u8, String)>) {
        let (mut up, mut down) = (Vec::new(), Vec::new());
        while let Some(t) = self.table.poll_transmit() {
            match t {
                Transmit::Upstream { to, bytes } => {
                    assert_eq!(to, CALLER);
                    let m = Message::parse(bytes, &ParseLimits::default()).expect("upstream");
                    up.push(m.status().unwrap_or(0));
                }
                Transmit::Downstream { to, bytes, branch } => {
                    let m = Message::parse(bytes, &ParseLimits::default()).expect("downstream");
                    assert_eq!(
                        m.top_via()
                            .and_then(|v| v.branch().map(str::to_string))
                            .as_deref(),
                        Some(branch.branch())
                    );
                    down.push((to, m.method_str().to_string()));
                }
            }
        }
        (up, down)
    }

    fn last_upstream(&mut self) -> Message {
        let mut last = None;
        while let Some(t) = self.table.poll_transmit() {
            if let Transmit::Upstream { bytes, .. } = t {
                last = Some(Message::parse(bytes, &ParseLimits::default()).expect("upstream"));
            }
        }
        last.expect("something went upstream")
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.table.poll_event()).collect()
    }
}

fn down(items: &[(u8, &str)]) -> Vec<(u8, String)> {
    items.iter().map(|(n, m)| (*n, m.to_string())).collect()
}

fn final_event(code: u16) -> Event {
    Event::Final { code, record: None }
}

#[test]
fn fork_relays_provisionals_and_sends_the_best_final_once_all_answered() {
    let mut h = Harness::new();
    let req = request("INVITE", "c1");
    h.call(&req, &[1, 2]);
    // The 100 Trying is held (`TRYING_AFTER`); the 180 below makes it needless.
    assert_eq!(h.sent(), (vec![], down(&[(1, "INVITE"), (2, "INVITE")])));
    h.table.handle_response(&response(&req, 1, 180, &[]), h.now);
    assert_eq!(h.upstream(), vec![180]);
    // A 486 is held while branch 2 may still answer; the branch gets its ACK.
    h.table.handle_response(&response(&req, 1, 486, &[]), h.now);
    assert_eq!(h.sent(), (vec![], down(&[(1, "ACK")])));
    assert!(h.events().is_empty());
    h.table.handle_response(&response(&req, 2, 503, &[]), h.now);
    assert_eq!(h.sent(), (vec![486], down(&[(2, "ACK")])));
    assert_eq!(
        h.events(),
        vec![
            final_event(486),
            Event::MediaEnd {
                call_id: "c1".into()
            },
            Event::CallFailed {
                call_id: "c1".into(),
                code: 486
            },
        ]
    );
    // The caller's ACK ends the server side; every timer then drains the table.
    assert!(h.table.handle_ack(&Harness::key(&req), h.now));
    h.run_until(Duration::from_secs(40));
    assert!(h.table.is_empty(), "left: {}", h.table.len());
    assert_eq!(h.table.poll_timeout(), None);
}

#[test]
fn a_2xx_goes_up_at_once_and_cancels_the_other_branches() {
    let mut h = Harness::new();
    let req = request("INVITE", "c2");
    h.call(&req, &[1, 2, 3]);
    h.sent();
    h.table.handle_response(&response(&req, 3, 180, &[]), h.now);
    h.table.handle_response(&response(&req, 1, 200, &[]), h.now);
    // 180 and 200 upstream; CANCEL down to the other two, nothing to the one that answered.
    let (up, mut down_sent) = h.sent();
    down_sent.sort();
    assert_eq!(up, vec![180, 200]);
    assert_eq!(down_sent, down(&[(2, "CANCEL"), (3, "CANCEL")]));
    assert_eq!(
        h.events(),
        vec![
            final_event(200),
            Event::CallAnswered {
                call_id: "c2".into(),
                code: 200
            },
        ]
    );
    // The cancelled branches answer 487 (and their CANCELs 200): nothing more upstream.
    for n in [2, 3] {
        h.table.handle_response(&response(&req, n, 487, &[]), h.now);
        let mut cancel_ok = response(&req, n, 200, &[]);
        cancel_ok =
            parse(&String::from_utf8_lossy(cancel_ok.bytes()).replace("1 INVITE", "1 CANCEL"));
        h.table.handle_response(&cancel_ok, h.now);
    }
    assert_eq!(h.sent(), (vec![], down(&[(2, "ACK"), (3, "ACK")])));
    // The callee retransmits its 2xx (our ACK is end to end): each copy goes up (RFC 6026).
    h.advance(Duration::from_millis(500));
    assert!(h.table.handle_response(&response(&req, 1, 200, &[]), h.now));
    assert_eq!(h.upstream(), vec![200]);
    assert!(h.events().is_empty(), "the call is answered once");
    h.run_until(Duration::from_secs(40));
    assert!(h.table.is_empty(), "left: {}", h.table.len());
    // After the transaction, a late 2xx is not ours to match: the driver relays it by Via.
    assert!(!h.table.handle_response(&response(&req, 1, 200, &[]), h.now));
}

#[test]
fn two_branches_answering_2xx_both_go_up() {
    let mut h = Harness::new();
    let req = request("INVITE", "c3");
    h.call(&req, &[1, 2]);
    h.sent();
    h.table.handle_response(&response(&req, 1, 200, &[]), h.now);
    h.table.handle_response(&response(&req, 2, 200, &[]), h.now);
    let (up, _) = h.sent();
    assert_eq!(
        up,
        vec![200, 200],
        "the caller must see both to end the second dialog"
    );
}

#[test]
fn a_6xx_cancels_the_others_and_wins() {
    let mut h = Harness::new();
    let req = request("INVITE", "c4");
    h.call(&req, &[1, 2]);
    h.sent();
    h.table.handle_response(&response(&req, 2, 180, &[]), h.now);
    h.table.handle_response(&response(&req, 1, 603, &[]), h.now);
    assert_eq!(h.sent(), (vec![180], down(&[(1, "ACK"), (2, "CANCEL")])));
    h.table.handle_response(&response(&req, 2, 487, &[]), h.now);
    assert_eq!(h.upstream(), vec![603]);
}

#[test]
fn challenges_of_every_branch_are_merged() {
    let mut h = Harness::new();
    let req = request("INVITE", "c5");
    h.call(&req, &[1, 2]);
    h.sent();
    let a = r#"Digest realm="a.example.com", nonce="n1""#;
    let b = r#"Digest realm="b.example.com", nonce="n2""#;
    h.table
        .handle_response(&response(&req, 1, 407, &[("Proxy-Authenticate", a)]), h.now);
    h.table
        .handle_response(&response(&req, 2, 407, &[("Proxy-Authenticate", b)]), h.now);
    let resp = h.last_upstream();
    assert_eq!(resp.status(), Some(407));
    let got: Vec<&str> = resp.headers_named(HeaderName::ProxyAuthenticate).collect();
    assert_eq!(got, vec![a, b]);
}

#[test]
fn an_unanswered_branch_is_retransmitted_then_times_out_as_408() {
    let mut h = Harness::new();
    let req = request("INVITE", "c6");
    h.call(&req, &[1]);
    h.sent();
    // Timer A: 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s; Timer B at 32 s.
    h.run_until(Duration::from_millis(31_900));
    let (up, sent) = h.sent();
    assert_eq!(sent.len(), 6, "retransmissions: {sent:?}");
    assert_eq!(up, vec![100], "the held 100 Trying, nothing else");
    h.run_until(Duration::from_millis(32_100));
    assert_eq!(h.upstream(), vec![408]);
    let resp_events = h.events();
    assert!(resp_events.contains(&final_event(408)), "{resp_events:?}");
}

#[test]
fn timer_c_cancels_a_branch_that_rings_too_long_and_the_caller_hears_408() {
    let timers = TimerConfig {
        c: Duration::from_secs(60),
        ..TimerConfig::default()
    };
    let mut h = Harness::with_timers(timers);
    let req = request("INVITE", "c7");
    h.call(&req, &[1]);
    h.advance(Duration::from_secs(1));
    h.sent();
    h.table.handle_response(&response(&req, 1, 180, &[]), h.now);
    // A provisional restarts Timer C.
    h.advance(Duration::from_secs(40));
    h.table.handle_response(&response(&req, 1, 183, &[]), h.now);
    assert_eq!(h.sent(), (vec![180, 183], vec![]));
    h.run_until(Duration::from_secs(100));
    assert_eq!(h.sent(), (vec![], vec![]), "Timer C restarted at 41 s");
    // §16.8: the ringing branch is CANCELled and counts as a 408, which the caller hears
    // at once (as Kamailio's fr_inv_timer does), not after the callee's 487.
    h.run_until(Duration::from_millis(101_200));
    assert_eq!(h.sent(), (vec![408], down(&[(1, "CANCEL")])));
    assert!(h.events().contains(&Event::CallFailed {
        call_id: "c7".into(),
        code: 408
    }));
    h.table.handle_response(&response(&req, 1, 487, &[]), h.now);
    assert_eq!(h.sent(), (vec![], down(&[(1, "ACK")])));
}

#[test]
fn a_branch_whose_callee_ignores_the_cancel_still_ends() {
    let timers = TimerConfig {
        c: Duration::from_secs(60),
        ..TimerConfig::default()
    };
    let mut h = Harness::with_timers(timers);
    let req = request("INVITE", "c8");
    h.call(&req, &[1]);
    h.table.handle_response(&response(&req, 1, 180, &[]), h.now);
    h.sent();
    h.run_until(Duration::from_millis(60_200));
    assert_eq!(h.sent(), (vec![408], down(&[(1, "CANCEL")])));
    assert!(h.table.handle_ack(&Harness::key(&req), h.now));
    // The CANCEL's Timer F and the INVITE's 64*T1 after Timer C: then nothing is left.
    h.run_until(Duration::from_secs(61 + 33));
    assert!(h.table.is_empty(), "left: {}", h.table.len());
    assert_eq!(h.table.poll_timeout(), None);
}

#[test]
fn a_cancel_while_routing_answers_487_and_nothing_is_forked() {
    let mut h = Harness::new();
    let req = request("INVITE", "c9");
    let key = Harness::key(&req);
    h.table
        .open(key.clone(), req.clone(), upstream(), h.now)
        .expect("room");
    assert_eq!(h.upstream(), Vec::<u16>::new(), "100 Trying held");
    assert!(h.table.handle_cancel(&key, h.now));
    assert_eq!(h.upstream(), vec![487]);
    assert_eq!(
        h.events(),
        vec![
            final_event(487),
            Event::MediaEnd {
                call_id: "c9".into()
            },
            Event::CallFailed {
                call_id: "c9".into(),
                code: 487
            },
        ]
    );
    assert_eq!(h.fork(&req, &[1]), Fork::AlreadyAnswered);
    assert_eq!(h.sent(), (vec![], vec![]));
    assert_eq!(
        h.events(),
        vec![Event::MediaEnd {
            call_id: "c9".into()
        }]
    );
    // A CANCEL for nothing of ours: 481 by the driver.
    assert!(
        !h.table
            .handle_cancel(&Harness::key(&request("INVITE", "other")), h.now)
    );
}

#[test]
fn the_100_trying_is_held_and_spared_when_the_callee_rings_in_time() {
    let mut h = Harness::new();
    let req = request("INVITE", "t1");
    h.call(&req, &[1]);
    assert_eq!(h.sent(), (vec![], down(&[(1, "INVITE")])));
    // The callee rings within TRYING_AFTER: the caller gets the 180 and never a 100.
    h.advance(TRYING_AFTER / 2);
    h.table.handle_response(&response(&req, 1, 180, &[]), h.now);
    assert_eq!(h.upstream(), vec![180]);
    h.run_until(Duration::from_secs(5));
    assert_eq!(h.upstream(), Vec::<u16>::new());
    h.table.handle_response(&response(&req, 1, 200, &[]), h.now);
    assert_eq!(h.upstream(), vec![200]);
    // A callee that does not: the 100 goes up when the hold ends, once.
    let slow = request("INVITE", "t2");
    let start = h.now;
    h.call(&slow, &[2]);
    h.sent();
    h.advance(TRYING_AFTER - Duration::from_millis(1));
    assert_eq!(h.upstream(), Vec::<u16>::new());
    h.advance(Duration::from_millis(1));
    assert_eq!(h.upstream(), vec![100]);
    assert_eq!(h.now - start, TRYING_AFTER);
    h.advance(Duration::from_secs(1));
    assert_eq!(h.upstream(), Vec::<u16>::new());
    // Whatever the hold did, the transaction still ends: the proceeding bound is kept.
    h.table
        .handle_response(&response(&slow, 2, 180, &[]), h.now);
    h.table
        .handle_response(&response(&slow, 2, 200, &[]), h.now);
    h.sent();
    h.run_until(Duration::from_secs(60));
    assert!(h.table.is_empty(), "left: {}", h.table.len());
}

#[test]
fn an_invite_retransmission_gets_the_last_response_again() {
    let mut h = Harness::new();
    let req = request("INVITE", "c10");
    let key = Harness::key(&req);
    assert!(!h.table.handle_retransmission(&key));
    h.call(&req, &[1]);
    h.sent();
    assert!(h.table.handle_retransmission(&key));
    assert_eq!(h.upstream(), vec![100]);
    h.table.handle_response(&response(&req, 1, 180, &[]), h.now);
    h.sent();
    assert!(h.table.handle_retransmission(&key));
    assert_eq!(h.sent(), (vec![180], vec![]), "nothing is forked again");
}

#[test]
fn our_own_answer_is_retransmitted_until_the_ack() {
    let mut h = Harness::new();
    let req = request("INVITE", "c11");
    let key = Harness::key(&req);
    h.table
        .open(key.clone(), req.clone(), upstream(), h.now)
        .expect("room");
    h.sent();
    let resp = ResponseBuilder::new(&req, 404).to_tag("x").build();
    assert!(h.table.answer(&key, 404, resp.clone(), h.now));
    assert_eq!(h.upstream(), vec![404]);
    assert_eq!(h.events(), vec![final_event(404)]);
    // Timer G over UDP.
    h.run_until(Duration::from_millis(1_600));
    assert_eq!(h.upstream(), vec![404, 404]);
    assert!(h.table.handle_ack(&key, h.now));
    h.run_until(Duration::from_secs(10));
    assert_eq!(h.upstream(), Vec::<u16>::new());
    assert!(h.table.is_empty());
    // No forward: the driver answers statelessly.
    assert!(!h.table.answer(&key, 404, resp, h.now));
}

#[test]
fn an_unreachable_target_ends_its_branch_as_503_which_goes_up_as_500() {
    let mut h = Harness::new();
    let req = request("INVITE", "c12");
    h.call(&req, &[1, 2]);
    h.sent();
    assert_eq!(
        h.table.unanswered_to(|&n| n == 2),
        vec![BranchKey::request(&branch_of(2))]
    );
    h.table
        .branch_failed(&BranchKey::request(&branch_of(2)), h.now);
    assert_eq!(h.upstream(), Vec::<u16>::new(), "branch 1 may still answer");
    h.table
        .branch_failed(&BranchKey::request(&branch_of(1)), h.now);
    // §16.7 step 6: a 503 of the branches is a 500 upstream.
    assert_eq!(h.upstream(), vec![500]);
    h.run_until(Duration::from_secs(40));
    assert!(h.table.is_empty());
}

#[test]
fn a_non_invite_request_is_forwarded_and_its_final_recorded_by_the_driver() {
    let mut h = Harness::new();
    let req = request("MESSAGE", "m1");
    assert_eq!(h.fork(&req, &[1]), Fork::Forked);
    assert_eq!(h.sent(), (vec![], down(&[(1, "MESSAGE")])));
    // Timer E retransmits at 500 ms.
    h.advance(Duration::from_millis(500));
    assert_eq!(h.sent(), (vec![], down(&[(1, "MESSAGE")])));
    let ok = response(&req, 1, 200, &[]);
    h.table.handle_response(&ok, h.now);
    assert_eq!(h.upstream(), vec![200]);
    match h.events().as_slice() {
        [
            Event::Final {
                code: 200,
                record: Some(record),
            },
        ] => {
            assert_eq!(record.key, Harness::key(&req));
            let m =
                Message::parse(record.response.clone(), &ParseLimits::default()).expect("recorded");
            assert_eq!(m.values(HeaderName::Via).count(), 1, "our Via is stripped");
        }
        other => panic!("{other:?}"),
    }
    h.run_until(Duration::from_secs(10));
    assert!(h.table.is_empty());
}

#[test]
fn no_branch_means_500() {
    let mut h = Harness::new();
    let req = request("INVITE", "c13");
    h.call(&req, &[]);
    assert_eq!(
        h.upstream(),
        vec![500],
        "no 100 Trying before an answer at once"
    );
    let msg = request("OPTIONS", "o1");
    assert_eq!(h.fork(&msg, &[]), Fork::NoBranches);
    assert_eq!(h.upstream(), vec![500]);
}

#[test]
fn shutdown_cancels_branches_and_answers_503_with_retry_after() {
    let mut h = Harness::new();
    let req = request("INVITE", "c14");
    h.call(&req, &[1]);
    h.table.handle_response(&response(&req, 1, 180, &[]), h.now);
    h.sent();
    h.events();
    assert_eq!(h.table.pending(), 1);
    assert_eq!(h.table.give_up(h.now), 1);
    let (_, sent) = h.sent();
    assert_eq!(sent, down(&[(1, "CANCEL")]));
    h.table.handle_retransmission(&Harness::key(&req));
    let resp = h.last_upstream();
    assert_eq!(resp.status(), Some(503), "ours, not turned into 500");
    assert!(
        String::from_utf8_lossy(resp.bytes()).contains("\r\nRetry-After: 5\r\n"),
        "{resp:?}"
    );
    assert_eq!(h.table.pending(), 0);
}

#[test]
fn the_table_is_bounded() {
    let mut h = Harness::new();
    h.table.cfg.max_transactions = 3;
    let a = request("INVITE", "f1");
    // One forward and two branches: full.
    h.call(&a, &[1, 2]);
    assert!(h.table.is_full());
    let b = request("INVITE", "f2");
    assert_eq!(
        h.table.open(Harness::key(&b), b, upstream(), h.now),
        Err(Full)
    );
}

mod late;
