//! The INVITE server transaction (RFC 3261 §17.2.1, with RFC 6026's Accepted state).
//!
//! The transaction user tells it which responses it sends; the transaction resends the last
//! response when the INVITE is retransmitted, retransmits a non-2xx final response over UDP
//! (Timer G) until the ACK arrives or Timer H gives up, absorbs that ACK, and terminates by
//! itself in every case.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::TimerConfig;

/// INVITE server transaction states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    /// Waiting for the transaction user's final response (provisionals may have been sent).
    Proceeding,
    /// A 2xx was sent; INVITE retransmissions are absorbed until Timer L.
    Accepted,
    /// A non-2xx final was sent; waiting for the ACK.
    Completed,
    /// The ACK arrived; absorbing ACK retransmissions until Timer I.
    Confirmed,
    /// Done.
    Terminated,
}

/// What happened, for the transaction user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerEvent {
    /// No ACK came for the non-2xx final response (Timer H).
    AckTimedOut,
}

/// One INVITE server transaction.
#[derive(Debug)]
pub struct InviteServerTransaction {
    reliable: bool,
    timers: TimerConfig,
    state: ServerState,
    last_response: Option<Bytes>,
    /// Timer G: next retransmission of the final response and the interval after it.
    retransmit: Option<(Instant, Duration)>,
    /// Timer H, I or L, or the bound on Proceeding.
    deadline: Instant,
    /// A 100 Trying held until then, and dropped if another response goes first.
    trying: Option<(Instant, Bytes)>,
    transmit: VecDeque<Bytes>,
    events: VecDeque<ServerEvent>,
}

/// A proceeding INVITE transaction whose user never answers still ends (3 minutes, like a
/// proxy's Timer C), so state is always bounded.
const MAX_PROCEEDING: Duration = Duration::from_secs(180);

impl InviteServerTransaction {
    /// A new transaction for a received INVITE. The caller sends 100 Trying at once through
    /// [`Self::send_response`], or holds it with [`Self::hold_trying`].
    pub fn new(reliable: bool, timers: TimerConfig, now: Instant) -> Self {
        Self {
            reliable,
            timers,
            state: ServerState::Proceeding,
            last_response: None,
            retransmit: None,
            deadline: now + MAX_PROCEEDING + 64 * timers.t1,
            trying: None,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Current state.
    pub fn state(&self) -> ServerState {
        self.state
    }

    /// True once the transaction can be removed.
    pub fn is_terminated(&self) -> bool {
        self.state == ServerState::Terminated
    }

    /// Holds `trying` (a 100 Trying) until `due`: it is sent then, or at once when the INVITE
    /// is retransmitted before, unless another response was sent first. RFC 3261 §17.2.1 lets
    /// a transaction skip the 100 when its user answers within 200 ms; a proxy whose callee
    /// rings at once then sends the caller one response instead of two.
    pub fn hold_trying(&mut self, trying: Bytes, due: Instant) {
        if self.state == ServerState::Proceeding && self.last_response.is_none() {
            self.trying = Some((due, trying));
        }
    }

    /// The transaction user sends a response with status `code`. Returns false (and sends
    /// nothing) when the state does not allow it, e.g. a second final response.
    pub fn send_response(&mut self, code: u16, bytes: Bytes, now: Instant) -> bool {
        self.trying = None;
        match (self.state, code) {
            (ServerState::Proceeding, 100..=199) => {
                self.last_response = Some(bytes.clone());
                self.transmit.push_back(bytes);
                true
            }
            (ServerState::Proceeding | ServerState::Accepted, 200..=299) => {
                // RFC 6026: 2xx retransmissions come from the TU (or the UAS) and pass through.
                self.state = ServerState::Accepted;
                self.last_response = None;
                self.deadline = now + 64 * self.timers.t1;
                self.transmit.push_back(bytes);
                true
            }
            (ServerState::Proceeding, 300..=699) => {
                self.state = ServerState::Completed;
                self.last_response = Some(bytes.clone());
                self.transmit.push_back(bytes);
                self.retransmit = (!self.reliable).then(|| (now + self.timers.t1, self.timers.t1));
                self.deadline = now + 64 * self.timers.t1;
                true
            }
            _ => false,
        }
    }

    /// The INVITE was received again: resend the last provisional or final response.
    pub fn handle_retransmission(&mut self) {
        if self.release_trying() {
            return;
        }
        if matches!(self.state, ServerState::Proceeding | ServerState::Completed)
            && let Some(r) = &self.last_response
        {
            self.transmit.push_back(r.clone());
        }
    }

    /// Sends the held 100 Trying, if any (then it is the response retransmissions get).
    fn release_trying(&mut self) -> bool {
        let Some((_, trying)) = self.trying.take() else {
            return false;
        };
        self.last_response = Some(trying.clone());
        self.transmit.push_back(trying);
        true
    }

    /// An ACK matched this transaction (only non-2xx ACKs do, RFC 3261 §17.2.3).
    pub fn handle_ack(&mut self, now: Instant) {
        if self.state == ServerState::Completed {
            self.state = ServerState::Confirmed;
            self.retransmit = None;
            let i = if self.reliable {
                Duration::ZERO
            } else {
                self.timers.t4
            };
            self.deadline = now + i;
            if i.is_zero() {
                self.state = ServerState::Terminated;
            }
        }
    }

    /// The next deadline, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_terminated() {
            return None;
        }
        let mut next = self.deadline;
        for at in [
            self.retransmit.map(|(at, _)| at),
            self.trying.as_ref().map(|t| t.0),
        ]
        .into_iter()
        .flatten()
        {
            next = next.min(at);
        }
        Some(next)
    }

    /// Fires the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_terminated() {
            return;
        }
        if now >= self.deadline {
            if self.state == ServerState::Completed {
                self.events.push_back(ServerEvent::AckTimedOut);
            }
            self.state = ServerState::Terminated;
            self.retransmit = None;
            self.trying = None;
            return;
        }
        if self.trying.as_ref().is_some_and(|(due, _)| now >= *due) {
            self.release_trying();
        }
        if let Some((at, interval)) = self.retransmit
            && now >= at
        {
            if let Some(r) = &self.last_response {
                self.transmit.push_back(r.clone());
            }
            // Timer G doubles up to T2.
            let next = (interval * 2).min(self.timers.t2);
            self.retransmit = Some((now + next, next));
        }
    }

    /// The next message to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.transmit.pop_front()
    }

    /// The next event for the transaction user, if any.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(tx: &mut InviteServerTransaction) -> usize {
        let mut n = 0;
        while tx.poll_transmit().is_some() {
            n += 1;
        }
        n
    }

    fn run(tx: &mut InviteServerTransaction, until: Instant) -> usize {
        let mut sent = 0;
        while let Some(t) = tx.poll_timeout() {
            if t > until {
                break;
            }
            tx.handle_timeout(t);
            sent += drain(tx);
        }
        sent
    }

    #[test]
    fn trying_and_ringing_are_resent_on_retransmitted_invite() {
        let t0 = Instant::now();
        let mut tx = InviteServerTransaction::new(false, TimerConfig::default(), t0);
        assert!(tx.send_response(100, Bytes::from_static(b"100"), t0));
        assert!(tx.send_response(180, Bytes::from_static(b"180"), t0));
        assert_eq!(drain(&mut tx), 2);
        tx.handle_retransmission();
        assert_eq!(tx.poll_transmit(), Some(Bytes::from_static(b"180")));
    }

    #[test]
    fn non_2xx_final_is_retransmitted_until_ack_then_timer_i_ends_it() {
        let t0 = Instant::now();
        let mut tx = InviteServerTransaction::new(false, TimerConfig::default(), t0);
        assert!(tx.send_response(486, Bytes::from_static(b"486"), t0));
        assert_eq!(drain(&mut tx), 1);
        // Timer G at 0.5, 1.5, 3.5 s (intervals 1, 2, 4 capped at T2)...
        let sent = run(&mut tx, t0 + Duration::from_millis(3600));
        assert_eq!(sent, 3);
        assert!(
            !tx.send_response(200, Bytes::from_static(b"200"), t0),
            "one final only"
        );
        tx.handle_ack(t0 + Duration::from_secs(4));
        assert_eq!(tx.state(), ServerState::Confirmed);
        assert_eq!(run(&mut tx, t0 + Duration::from_secs(8)), 0);
        assert!(!tx.is_terminated());
        tx.handle_timeout(t0 + Duration::from_secs(9));
        assert!(tx.is_terminated());
        assert_eq!(tx.poll_event(), None);
    }

    #[test]
    fn missing_ack_ends_with_timer_h() {
        let t0 = Instant::now();
        let mut tx = InviteServerTransaction::new(false, TimerConfig::default(), t0);
        tx.send_response(404, Bytes::from_static(b"404"), t0);
        drain(&mut tx);
        // G: 0.5, 1.5, 3.5, 7.5, then every 4 s up to H at 32 s: 4 + 6 = 10.
        assert_eq!(run(&mut tx, t0 + Duration::from_secs(40)), 10);
        assert!(tx.is_terminated());
        assert_eq!(tx.poll_event(), Some(ServerEvent::AckTimedOut));
    }

    #[test]
    fn reliable_transport_has_no_timer_g_and_ack_ends_at_once() {
        let t0 = Instant::now();
        let mut tx = InviteServerTransaction::new(true, TimerConfig::default(), t0);
        tx.send_response(486, Bytes::from_static(b"486"), t0);
        drain(&mut tx);
        assert_eq!(tx.poll_timeout(), Some(t0 + Duration::from_secs(32)));
        tx.handle_ack(t0);
        assert!(tx.is_terminated());
    }

    #[test]
    fn accepted_passes_2xx_retransmissions_and_absorbs_invites() {
        let t0 = Instant::now();
        let mut tx = InviteServerTransaction::new(false, TimerConfig::default(), t0);
        tx.send_response(100, Bytes::from_static(b"100"), t0);
        assert!(tx.send_response(200, Bytes::from_static(b"200"), t0));
        assert!(tx.send_response(200, Bytes::from_static(b"200"), t0 + Duration::from_secs(1)));
        assert_eq!(drain(&mut tx), 3);
        tx.handle_retransmission();
        assert_eq!(
            tx.poll_transmit(),
            None,
            "INVITE retransmissions are absorbed in Accepted"
        );
        tx.handle_timeout(t0 + Duration::from_secs(33));
        assert!(tx.is_terminated());
    }

    #[test]
    fn a_held_trying_goes_out_when_due_and_is_what_retransmissions_get_then() {
        let t0 = Instant::now();
        let mut tx = InviteServerTransaction::new(false, TimerConfig::default(), t0);
        let due = t0 + Duration::from_millis(100);
        tx.hold_trying(Bytes::from_static(b"100"), due);
        assert_eq!(tx.poll_transmit(), None, "held, not sent");
        assert_eq!(tx.poll_timeout(), Some(due));
        tx.handle_timeout(t0 + Duration::from_millis(99));
        assert_eq!(tx.poll_transmit(), None);
        tx.handle_timeout(due);
        assert_eq!(tx.poll_transmit(), Some(Bytes::from_static(b"100")));
        assert_eq!(tx.poll_transmit(), None, "once");
        assert!(tx.poll_timeout().is_some_and(|t| t > due));
        tx.handle_retransmission();
        assert_eq!(tx.poll_transmit(), Some(Bytes::from_static(b"100")));
    }

    #[test]
    fn a_held_trying_is_dropped_when_another_response_goes_first() {
        let t0 = Instant::now();
        let mut tx = InviteServerTransaction::new(false, TimerConfig::default(), t0);
        let due = t0 + Duration::from_millis(100);
        tx.hold_trying(Bytes::from_static(b"100"), due);
        assert!(tx.send_response(180, Bytes::from_static(b"180"), t0));
        assert_eq!(drain(&mut tx), 1);
        tx.handle_timeout(due);
        assert_eq!(tx.poll_transmit(), None, "the 180 made the 100 needless");
        tx.handle_retransmission();
        assert_eq!(tx.poll_transmit(), Some(Bytes::from_static(b"180")));
        // A final response first: no 100 after it either.
        let mut tx = InviteServerTransaction::new(false, TimerConfig::default(), t0);
        tx.hold_trying(Bytes::from_static(b"100"), due);
        assert!(tx.send_response(486, Bytes::from_static(b"486"), t0));
        assert_eq!(drain(&mut tx), 1);
        tx.handle_timeout(due);
        assert_eq!(tx.poll_transmit(), None);
    }

    #[test]
    fn a_retransmitted_invite_gets_the_held_trying_at_once_and_only_once() {
        let t0 = Instant::now();
        let mut tx = InviteServerTransaction::new(false, TimerConfig::default(), t0);
        let due = t0 + Duration::from_millis(100);
        tx.hold_trying(Bytes::from_static(b"100"), due);
        tx.handle_retransmission();
        assert_eq!(tx.poll_transmit(), Some(Bytes::from_static(b"100")));
        assert_eq!(tx.poll_transmit(), None);
        tx.handle_timeout(due);
        assert_eq!(tx.poll_transmit(), None, "not again when the hold ends");
    }

    #[test]
    fn a_silent_transaction_user_does_not_keep_state_forever() {
        let t0 = Instant::now();
        let mut tx = InviteServerTransaction::new(false, TimerConfig::default(), t0);
        tx.handle_timeout(t0 + Duration::from_secs(213));
        assert!(tx.is_terminated());
    }
}
