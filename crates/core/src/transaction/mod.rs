//! Transactions (RFC 3261 §17), sans-IO.
//!
//! This module holds the table of non-INVITE server transactions (RFC 3261 §17.2.2);
//! [`client`] the INVITE and non-INVITE client transactions and [`invite_server`] the INVITE
//! server transaction, each a state machine driven by messages and deadlines.
//!
//! The table absorbs retransmitted requests: while the request is being processed they are
//! dropped, once a final response was sent they get that response again. Every entry has a
//! deadline (Timer J once completed, 64*T1 while processing) so the table always drains, and
//! the table has a size bound so a flood cannot grow it without limit.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use careflow_proto::Message;
use foldhash::{HashMap, HashMapExt};

pub mod client;
pub mod invite_server;

/// Transaction key (RFC 3261 §17.2.3): branch, sent-by and method for RFC 3261 branches,
/// otherwise the RFC 2543 fields.
///
/// Shared, not copied: a transaction's key is held by its table entry, its deadlines (one per
/// deadline change, kept until popped) and the request's context, and a `String` per holder
/// was three allocations per transaction kept for 64*T1 (issue 22).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxKey(std::sync::Arc<str>);

impl TxKey {
    /// Builds the key of a validated request; CANCEL is not folded into INVITE here
    /// because this table only holds non-INVITE transactions.
    pub fn of(msg: &Message) -> Option<Self> {
        Self::with_method(msg, msg.cseq()?.1)
    }

    /// The key of the transaction `msg` belongs to when its own method differs: an ACK for
    /// a non-2xx response and a CANCEL both name the INVITE transaction (§17.2.3, §9.2).
    pub fn with_method(msg: &Message, method: &str) -> Option<Self> {
        let via = msg.top_via()?;
        let mut k = String::with_capacity(96);
        if via.has_rfc3261_branch() {
            k.push_str(via.branch()?);
            k.push('|');
            k.extend(via.host.as_str().chars().map(|c| c.to_ascii_lowercase()));
            k.push(':');
            careflow_proto::scan::push_decimal(&mut k, u64::from(via.port.unwrap_or(0)));
            k.push('|');
            k.push_str(method);
        } else {
            k.push_str("2543|");
            k.push_str(msg.request_uri_str());
            k.push('|');
            k.push_str(msg.from_tag().unwrap_or(""));
            k.push('|');
            k.push_str(msg.call_id().unwrap_or(""));
            k.push('|');
            careflow_proto::scan::push_decimal(&mut k, u64::from(msg.cseq().map_or(0, |c| c.0)));
            k.push(' ');
            k.push_str(method);
            k.push('|');
            k.push_str(
                msg.values(careflow_proto::HeaderName::Via)
                    .next()
                    .unwrap_or(""),
            );
        }
        Some(Self(k.into()))
    }
}

/// What to do with a received request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A new transaction: process it.
    New,
    /// A retransmission while processing: drop it.
    Absorb,
    /// A retransmission after the final response: send this again.
    Resend(Bytes),
    /// The table is full: answer 503 without creating state.
    Overloaded,
}

/// Timer settings.
#[derive(Debug, Clone, Copy)]
pub struct TimerConfig {
    /// T1, the RTT estimate (default 500 ms).
    pub t1: Duration,
    /// T2, the longest retransmission interval for non-INVITE requests and INVITE
    /// responses (default 4 s).
    pub t2: Duration,
    /// T4, how long a message may stay in the network (default 5 s).
    pub t4: Duration,
    /// Timer C (RFC 3261 §16.8): how long a proxy lets a branch ring before cancelling it
    /// (default 180 s; the RFC asks for more than 3 minutes).
    pub c: Duration,
}

impl Default for TimerConfig {
    fn default() -> Self {
        Self {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
            c: Duration::from_secs(181),
        }
    }
}

#[derive(Debug)]
struct Entry {
    response: Option<Bytes>,
    deadline: Instant,
}

/// The server transaction table for non-INVITE requests.
#[derive(Debug)]
pub struct ServerTransactions {
    entries: HashMap<TxKey, Entry>,
    deadlines: BinaryHeap<Reverse<(Instant, TxKey)>>,
    timers: TimerConfig,
    max_entries: usize,
}

impl ServerTransactions {
    /// A table holding at most `max_entries` transactions.
    pub fn new(timers: TimerConfig, max_entries: usize) -> Self {
        Self {
            entries: HashMap::new(),
            deadlines: BinaryHeap::new(),
            timers,
            max_entries,
        }
    }

    /// A request arrived.
    pub fn on_request(&mut self, key: &TxKey, now: Instant) -> Received {
        if let Some(e) = self.entries.get(key) {
            return match &e.response {
                Some(r) => Received::Resend(r.clone()),
                None => Received::Absorb,
            };
        }
        if self.entries.len() >= self.max_entries {
            self.handle_timeout(now);
            if self.entries.len() >= self.max_entries {
                return Received::Overloaded;
            }
        }
        let deadline = now + 64 * self.timers.t1;
        self.entries.insert(
            key.clone(),
            Entry {
                response: None,
                deadline,
            },
        );
        self.deadlines.push(Reverse((deadline, key.clone())));
        Received::New
    }

    /// The final response was sent. Over reliable transports the transaction ends at once
    /// (Timer J is zero); over UDP it absorbs retransmissions for 64*T1.
    pub fn on_final_response(
        &mut self,
        key: &TxKey,
        response: Bytes,
        reliable: bool,
        now: Instant,
    ) {
        if reliable {
            self.entries.remove(key);
            return;
        }
        let deadline = now + 64 * self.timers.t1;
        if let Some(e) = self.entries.get_mut(key) {
            e.response = Some(response);
            e.deadline = deadline;
            self.deadlines.push(Reverse((deadline, key.clone())));
        }
    }

    /// The request was dropped without a response (e.g. malformed after all).
    pub fn forget(&mut self, key: &TxKey) {
        self.entries.remove(key);
    }

    /// The earliest deadline, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((d, _))| *d)
    }

    /// Removes every transaction whose deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((d, _))) = self.deadlines.peek() {
            if *d > now {
                break;
            }
            let Some(Reverse((d, key))) = self.deadlines.pop() else {
                break;
            };
            // Entries whose deadline moved have a newer heap item; only the current one counts.
            if self.entries.get(&key).is_some_and(|e| e.deadline == d) {
                self.entries.remove(&key);
            }
        }
        // After a burst, give back the table's capacity (a HashMap never shrinks by itself).
        if self.entries.capacity() > 4 * self.entries.len() + 1024 {
            self.entries.shrink_to(2 * self.entries.len());
        }
        if self.deadlines.len() > 4 * self.entries.len() + 1024 {
            // Keep stale heap items (from reliable transactions that ended early) bounded.
            let live = &self.entries;
            let v: Vec<_> = std::mem::take(&mut self.deadlines)
                .into_iter()
                .filter(|Reverse((d, k))| live.get(k).is_some_and(|e| e.deadline == *d))
                .collect();
            self.deadlines = v.into();
        }
        if self.deadlines.capacity() > 4 * self.deadlines.len() + 1024 {
            self.deadlines.shrink_to(2 * self.deadlines.len());
        }
    }

    /// Transactions alive.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use careflow_proto::ParseLimits;

    use super::*;

    fn msg(branch: &str) -> Message {
        let s = format!(
            "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch={branch}\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:a@example.com>\r\nCall-ID: x\r\nCSeq: 1 REGISTER\r\n\r\n"
        );
        Message::parse(Bytes::from(s), &ParseLimits::default()).unwrap()
    }

    #[test]
    fn retransmissions_absorbed_then_answered_then_expire() {
        let mut t = ServerTransactions::new(TimerConfig::default(), 10);
        let now = Instant::now();
        let k = TxKey::of(&msg("z9hG4bK1")).unwrap();
        assert_eq!(t.on_request(&k, now), Received::New);
        assert_eq!(t.on_request(&k, now), Received::Absorb);
        t.on_final_response(&k, Bytes::from_static(b"resp"), false, now);
        assert_eq!(
            t.on_request(&k, now + Duration::from_secs(1)),
            Received::Resend(Bytes::from_static(b"resp"))
        );
        assert_eq!(t.poll_timeout(), Some(now + Duration::from_secs(32)));
        t.handle_timeout(now + Duration::from_secs(32));
        assert!(t.is_empty());
        assert_eq!(
            t.on_request(&k, now + Duration::from_secs(33)),
            Received::New
        );
    }

    #[test]
    fn reliable_ends_at_once_and_table_is_bounded() {
        let mut t = ServerTransactions::new(TimerConfig::default(), 2);
        let now = Instant::now();
        let k1 = TxKey::of(&msg("z9hG4bK1")).unwrap();
        let k2 = TxKey::of(&msg("z9hG4bK2")).unwrap();
        let k3 = TxKey::of(&msg("z9hG4bK3")).unwrap();
        assert_eq!(t.on_request(&k1, now), Received::New);
        t.on_final_response(&k1, Bytes::new(), true, now);
        assert!(t.is_empty());
        assert_eq!(t.on_request(&k1, now), Received::New);
        assert_eq!(t.on_request(&k2, now), Received::New);
        assert_eq!(t.on_request(&k3, now), Received::Overloaded);
        // processing never finished: the entries still time out (64*T1)
        t.handle_timeout(now + Duration::from_secs(32));
        assert!(t.is_empty());
    }

    #[test]
    fn rfc2543_key_without_cookie() {
        let a = TxKey::of(&msg("old1")).unwrap();
        let b = TxKey::of(&msg("old1")).unwrap();
        assert_eq!(a, b);
        assert!(a.0.starts_with("2543|"));
    }
}
