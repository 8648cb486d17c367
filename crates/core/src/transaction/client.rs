//! Client transactions (RFC 3261 §17.1, with RFC 6026's Accepted state for INVITE).
//!
//! One value per transaction. The driver calls [`ClientTransaction::handle_response`] for
//! every response matched to it and [`ClientTransaction::handle_timeout`] at
//! [`ClientTransaction::poll_timeout`], and sends what [`ClientTransaction::poll_transmit`]
//! yields. Retransmissions (Timers A and E) exist only over unreliable transports; every
//! transaction reaches `Terminated` by itself.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use careflow_proto::{Message, Method, request};

use super::TimerConfig;

/// Client transaction states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Request sent, nothing heard (INVITE "Calling", non-INVITE "Trying").
    Calling,
    /// A provisional response arrived.
    Proceeding,
    /// A 2xx to an INVITE arrived; further 2xx are still passed up (RFC 6026 Timer M).
    Accepted,
    /// A final response arrived; retransmissions of it are absorbed.
    Completed,
    /// Done: remove the transaction.
    Terminated,
}

/// What happened, for the transaction user (the proxy core).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientEvent {
    /// No final response in time (Timer B or F): act as if 408 arrived (RFC 3261 §16.7).
    TimedOut,
}

/// One client transaction.
#[derive(Debug)]
pub struct ClientTransaction {
    request: Message,
    invite: bool,
    reliable: bool,
    timers: TimerConfig,
    state: ClientState,
    /// Next retransmission (Timer A/E) and the interval after it.
    retransmit: Option<(Instant, Duration)>,
    /// Timer B/F (no final response) or Timer D/K/M (linger before termination).
    deadline: Instant,
    ack: Option<Bytes>,
    /// Timer C has fired once: the branch was cancelled, the next deadline ends it.
    timer_c_fired: bool,
    transmit: VecDeque<Bytes>,
    events: VecDeque<ClientEvent>,
}

impl ClientTransaction {
    /// Starts a transaction for `request` (already carrying our Via); its first transmission
    /// is queued at once.
    pub fn new(request: Message, reliable: bool, timers: TimerConfig, now: Instant) -> Self {
        let invite = request.method() == Method::Invite;
        let retransmit = (!reliable).then(|| (now + timers.t1, timers.t1));
        let mut transmit = VecDeque::new();
        transmit.push_back(request.bytes().clone());
        Self {
            request,
            invite,
            reliable,
            timers,
            state: ClientState::Calling,
            retransmit,
            deadline: now + 64 * timers.t1,
            ack: None,
            timer_c_fired: false,
            transmit,
            events: VecDeque::new(),
        }
    }

    /// The request this transaction sends.
    pub fn request(&self) -> &Message {
        &self.request
    }

    /// Whether it is sent over a reliable transport (no retransmissions).
    pub fn is_reliable(&self) -> bool {
        self.reliable
    }

    /// Current state.
    pub fn state(&self) -> ClientState {
        self.state
    }

    /// True once the transaction can be removed.
    pub fn is_terminated(&self) -> bool {
        self.state == ClientState::Terminated
    }

    /// A response for this transaction arrived. Returns true when it must be passed to the
    /// transaction user; false when it is a retransmission the transaction absorbs.
    pub fn handle_response(&mut self, resp: &Message, now: Instant) -> bool {
        let Some(code) = resp.status() else {
            return false;
        };
        match (self.state, code) {
            (ClientState::Calling | ClientState::Proceeding, 100..=199) => {
                self.state = ClientState::Proceeding;
                if self.invite {
                    // §17.1.1.2: no more INVITE retransmissions; Timer B no longer applies.
                    // Timer C (§16.8) bounds the ringing and restarts with every provisional.
                    self.retransmit = None;
                    if !self.timer_c_fired {
                        self.deadline = now + self.timers.c;
                    }
                } else if let Some((_, _)) = self.retransmit {
                    // §17.1.1.2 non-INVITE: keep retransmitting, at T2.
                    self.retransmit = Some((now + self.timers.t2, self.timers.t2));
                }
                true
            }
            (ClientState::Calling | ClientState::Proceeding, 200..=299) if self.invite => {
                self.state = ClientState::Accepted;
                self.retransmit = None;
                self.deadline = now + 64 * self.timers.t1;
                true
            }
            (ClientState::Accepted, 200..=299) => true,
            (ClientState::Calling | ClientState::Proceeding, 200..=699) => {
                self.state = ClientState::Completed;
                self.retransmit = None;
                if self.invite {
                    let ack = request::ack_for(&self.request, resp);
                    self.transmit.push_back(ack.clone());
                    self.ack = Some(ack);
                    // Timer D: at least 32 s over UDP, zero over reliable transports.
                    let d = if self.reliable {
                        Duration::ZERO
                    } else {
                        Duration::from_secs(32).max(64 * self.timers.t1)
                    };
                    self.deadline = now + d;
                } else {
                    // Timer K.
                    let k = if self.reliable {
                        Duration::ZERO
                    } else {
                        self.timers.t4
                    };
                    self.deadline = now + k;
                }
                if self.deadline <= now {
                    self.state = ClientState::Terminated;
                }
                true
            }
            (ClientState::Completed, 300..=699) => {
                // A retransmitted final response: the ACK was lost, send it again.
                if let Some(ack) = &self.ack {
                    self.transmit.push_back(ack.clone());
                }
                false
            }
            _ => false,
        }
    }

    /// The transport reported that the request cannot be delivered (connection refused,
    /// unreachable): the transaction ends at once (RFC 3261 §17.1.4); the user treats it as
    /// a 503.
    pub fn abort(&mut self) {
        self.state = ClientState::Terminated;
        self.retransmit = None;
        self.transmit.clear();
    }

    /// The next deadline, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_terminated() {
            return None;
        }
        Some(match self.retransmit {
            Some((at, _)) => at.min(self.deadline),
            None => self.deadline,
        })
    }

    /// Fires the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_terminated() {
            return;
        }
        if now >= self.deadline {
            if self.invite && self.state == ClientState::Proceeding && !self.timer_c_fired {
                // Timer C: the user cancels the branch and waits for its final response (487)
                // for at most 64*T1 more.
                self.timer_c_fired = true;
                self.events.push_back(ClientEvent::TimedOut);
                self.deadline = now + 64 * self.timers.t1;
                return;
            }
            if matches!(self.state, ClientState::Calling)
                || (self.state == ClientState::Proceeding && !self.timer_c_fired)
            {
                self.events.push_back(ClientEvent::TimedOut);
            }
            self.state = ClientState::Terminated;
            self.retransmit = None;
            return;
        }
        if let Some((at, interval)) = self.retransmit
            && now >= at
        {
            self.transmit.push_back(self.request.bytes().clone());
            // Timer A doubles without bound; Timer E doubles up to T2.
            let next = if self.invite {
                interval * 2
            } else {
                (interval * 2).min(self.timers.t2)
            };
            self.retransmit = Some((now + next, next));
        }
    }

    /// The next message to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.transmit.pop_front()
    }

    /// The next event for the transaction user, if any.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use careflow_proto::ParseLimits;

    use super::*;

    fn msg(s: &str) -> Message {
        Message::parse(
            Bytes::from(s.replace('\n', "\r\n")),
            &ParseLimits::default(),
        )
        .unwrap()
    }

    fn request(method: &str) -> Message {
        msg(&format!(
            "{method} sip:bob@192.0.2.4 SIP/2.0\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKc1\nMax-Forwards: 70\nFrom: <sip:alice@example.com>;tag=fa\nTo: <sip:bob@example.com>\nCall-ID: c1\nCSeq: 1 {method}\nContent-Length: 0\n\n"
        ))
    }

    fn response(code: u16, method: &str) -> Message {
        msg(&format!(
            "SIP/2.0 {code} X\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKc1\nFrom: <sip:alice@example.com>;tag=fa\nTo: <sip:bob@example.com>;tag=tb\nCall-ID: c1\nCSeq: 1 {method}\nContent-Length: 0\n\n"
        ))
    }

    /// Runs timers until `until`, counting transmissions.
    fn run(tx: &mut ClientTransaction, mut now: Instant, until: Instant) -> (usize, Instant) {
        let mut sent = 0;
        while let Some(t) = tx.poll_timeout() {
            if t > until {
                break;
            }
            now = t;
            tx.handle_timeout(now);
            while tx.poll_transmit().is_some() {
                sent += 1;
            }
        }
        (sent, now)
    }

    #[test]
    fn invite_over_udp_retransmits_with_timer_a_and_times_out_with_timer_b() {
        let t0 = Instant::now();
        let mut tx = ClientTransaction::new(request("INVITE"), false, TimerConfig::default(), t0);
        assert!(tx.poll_transmit().is_some());
        let (sent, _) = run(&mut tx, t0, t0 + Duration::from_secs(40));
        // Timer A at 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s: six retransmissions before B at 32 s.
        assert_eq!(sent, 6);
        assert_eq!(tx.poll_event(), Some(ClientEvent::TimedOut));
        assert!(tx.is_terminated());
    }

    #[test]
    fn invite_over_tcp_never_retransmits() {
        let t0 = Instant::now();
        let mut tx = ClientTransaction::new(request("INVITE"), true, TimerConfig::default(), t0);
        tx.poll_transmit();
        let (sent, _) = run(&mut tx, t0, t0 + Duration::from_secs(40));
        assert_eq!(sent, 0);
        assert_eq!(tx.poll_event(), Some(ClientEvent::TimedOut));
    }

    #[test]
    fn invite_non_2xx_gets_a_hop_by_hop_ack_then_absorbs_retransmissions() {
        let t0 = Instant::now();
        let mut tx = ClientTransaction::new(request("INVITE"), false, TimerConfig::default(), t0);
        tx.poll_transmit();
        assert!(tx.handle_response(&response(180, "INVITE"), t0));
        assert_eq!(tx.state(), ClientState::Proceeding);
        let (sent, _) = run(&mut tx, t0, t0 + Duration::from_secs(20));
        assert_eq!(sent, 0, "no retransmission once a provisional arrived");
        assert!(tx.handle_response(&response(486, "INVITE"), t0 + Duration::from_secs(21)));
        let ack = tx.poll_transmit().expect("ACK");
        assert!(ack.starts_with(b"ACK sip:bob@192.0.2.4 SIP/2.0\r\n"));
        assert!(!tx.handle_response(&response(486, "INVITE"), t0 + Duration::from_secs(22)));
        assert_eq!(
            tx.poll_transmit(),
            Some(ack),
            "the ACK is resent for a retransmitted final"
        );
        tx.handle_timeout(t0 + Duration::from_secs(21 + 32));
        assert!(tx.is_terminated());
        assert_eq!(tx.poll_event(), None);
    }

    #[test]
    fn invite_2xx_is_accepted_and_later_2xx_still_pass_up() {
        let t0 = Instant::now();
        let mut tx = ClientTransaction::new(request("INVITE"), false, TimerConfig::default(), t0);
        tx.poll_transmit();
        assert!(tx.handle_response(&response(200, "INVITE"), t0));
        assert_eq!(tx.state(), ClientState::Accepted);
        assert!(
            tx.poll_transmit().is_none(),
            "no ACK for 2xx: that is end to end"
        );
        assert!(tx.handle_response(&response(200, "INVITE"), t0 + Duration::from_secs(1)));
        tx.handle_timeout(t0 + Duration::from_secs(32));
        assert!(tx.is_terminated());
    }

    #[test]
    fn non_invite_timer_e_caps_at_t2_and_timer_k_ends_it() {
        let t0 = Instant::now();
        let mut tx = ClientTransaction::new(request("OPTIONS"), false, TimerConfig::default(), t0);
        tx.poll_transmit();
        // E at 0.5, 1.5, 3.5, 7.5 s, then every T2 (4 s): 11.5 ... 27.5 -> 4 + 5 = 9 by 31 s.
        let (sent, _) = run(&mut tx, t0, t0 + Duration::from_secs(31));
        assert_eq!(sent, 9);
        assert!(tx.handle_response(&response(200, "OPTIONS"), t0 + Duration::from_secs(31)));
        assert_eq!(tx.state(), ClientState::Completed);
        assert!(!tx.handle_response(&response(200, "OPTIONS"), t0 + Duration::from_secs(32)));
        tx.handle_timeout(t0 + Duration::from_secs(36));
        assert!(tx.is_terminated());
        assert_eq!(tx.poll_event(), None);
    }

    #[test]
    fn timer_c_cancels_a_branch_that_rings_too_long() {
        let t0 = Instant::now();
        let mut tx = ClientTransaction::new(request("INVITE"), true, TimerConfig::default(), t0);
        tx.poll_transmit();
        assert!(tx.handle_response(&response(180, "INVITE"), t0));
        tx.handle_timeout(t0 + Duration::from_secs(100));
        assert_eq!(tx.poll_event(), None);
        // Another provisional restarts Timer C.
        assert!(tx.handle_response(&response(180, "INVITE"), t0 + Duration::from_secs(100)));
        tx.handle_timeout(t0 + Duration::from_secs(200));
        assert_eq!(tx.poll_event(), None);
        tx.handle_timeout(t0 + Duration::from_secs(281));
        assert_eq!(tx.poll_event(), Some(ClientEvent::TimedOut));
        assert_eq!(
            tx.state(),
            ClientState::Proceeding,
            "still waiting for the 487"
        );
        assert!(tx.handle_response(&response(487, "INVITE"), t0 + Duration::from_secs(282)));
        assert!(tx.is_terminated(), "reliable: Timer D is zero");
    }

    #[test]
    fn non_invite_over_tcp_terminates_at_once_on_final() {
        let t0 = Instant::now();
        let mut tx = ClientTransaction::new(request("MESSAGE"), true, TimerConfig::default(), t0);
        tx.poll_transmit();
        assert!(tx.handle_response(&response(202, "MESSAGE"), t0));
        assert!(tx.is_terminated());
    }
}
