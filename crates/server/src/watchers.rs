//! The busy-lamp and presence state (issue 19): every user's call legs as the proxy sees them,
//! whether the watched users have a device registered, the subscriptions, and the NOTIFYs not
//! answered yet (retransmitted over UDP). The decisions are `careflow_core::dialog_event`'s;
//! handlers live in `blf/`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use careflow_core::Transport;
use careflow_core::dialog_event::info::Quirks;
use careflow_core::dialog_event::shared::{RemoteCalls, merged};
use careflow_core::dialog_event::subscriptions::{SubId, SubscriptionConfig, Subscriptions};
use careflow_core::dialog_event::{Calls, Leg};
use careflow_core::transaction::TxKey;
use careflow_transport::{ConnId, Outbound};

/// Where a watcher's NOTIFYs go and what its dialog says.
#[derive(Debug, Clone)]
pub(crate) struct Reach {
    pub(crate) transport: Transport,
    pub(crate) dest: SocketAddr,
    pub(crate) conn: Option<ConnId>,
    /// Our address facing the watcher (Via, Contact).
    pub(crate) local: SocketAddr,
    /// The watcher's Contact URI (the NOTIFY's Request-URI).
    pub(crate) contact: String,
    /// The SUBSCRIBE's From (the NOTIFY's To), with the watcher's tag.
    pub(crate) watcher: String,
    /// The SUBSCRIBE's To with our tag (the NOTIFY's From).
    pub(crate) us: String,
    /// What its phone needs of a dialog-info body.
    pub(crate) quirks: Quirks,
}

/// A call's caller as a pickup needs it.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// The flow its INVITE came over.
    pub(crate) flow: crate::routing::Target,
    /// Its Contact (the pickup's Request-URI).
    pub(crate) contact: String,
    /// The proxy's transaction of its INVITE (to CANCEL the ringing branches).
    pub(crate) invite: TxKey,
}

/// How long a pickup waits for its answer before the call it takes is forgotten (Timer C's
/// 3 minutes: no answer can come later).
pub(crate) const PICKUP_ANSWER_WAIT: Duration = Duration::from_secs(180);

/// Whether a user whose presence is watched has a device registered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Online {
    pub(crate) registered: bool,
    /// When to look again: the first binding's expiry, or a while (a binding removed through
    /// the API, a closed connection, another node).
    pub(crate) recheck_at: Instant,
    /// A lookup is under way.
    pub(crate) checking: bool,
}

/// A NOTIFY waiting for its answer.
#[derive(Debug)]
pub(crate) struct Unanswered {
    pub(crate) sub: SubId,
    pub(crate) out: Outbound,
    pub(crate) sent: u32,
    pub(crate) next: Instant,
}

/// UDP NOTIFY retransmissions (RFC 3261 Timer E doubling from T1), then the watcher is
/// taken as gone.
pub(crate) const NOTIFY_TRIES: u32 = 5;

/// The lamp state and the subscriptions.
#[derive(Debug)]
pub(crate) struct Watchers {
    pub(crate) calls: Calls,
    pub(crate) subs: Subscriptions<Reach>,
    pub(crate) cseq: HashMap<SubId, u32>,
    pub(crate) unanswered: HashMap<String, Unanswered>,
    /// By Call-ID, each call's caller: where a pickup's INVITE (with Replaces) goes.
    pub(crate) callers: HashMap<String, Caller>,
    /// By a pickup INVITE's Call-ID, the ringing call it takes: once the pickup is answered,
    /// that call's branches still ringing are CANCELled here (not left to the caller's phone:
    /// RFC 3891 asks it to, but a phone that does not would keep the colleague ringing).
    pub(crate) pickups: HashMap<String, (TxKey, Instant)>,
    /// The legs other nodes of a cluster handle.
    pub(crate) remote: RemoteCalls,
    /// By watched AoR, for presence.
    pub(crate) online: HashMap<String, Online>,
    /// Something to keep over a restart changed since the last save.
    pub(crate) dirty: bool,
}

impl Default for Watchers {
    fn default() -> Self {
        Self {
            calls: Calls::default(),
            subs: Subscriptions::new(SubscriptionConfig::default()),
            cseq: HashMap::new(),
            unanswered: HashMap::new(),
            callers: HashMap::new(),
            pickups: HashMap::new(),
            remote: RemoteCalls::default(),
            online: HashMap::new(),
            dirty: false,
        }
    }
}

impl Watchers {
    /// What the lamps of `aor` show: its legs here and on the other nodes.
    pub(crate) fn legs_of(&self, aor: &str) -> Vec<&Leg> {
        merged(self.calls.legs(aor), self.remote.legs(aor))
    }

    /// The next CSeq of `sub`'s NOTIFYs.
    pub(crate) fn next_cseq(&mut self, sub: &SubId) -> u32 {
        let c = self.cseq.entry(sub.clone()).or_insert(0);
        *c += 1;
        *c
    }

    /// The retransmissions due at `now` (UDP only), and the NOTIFYs that ran out of tries.
    pub(crate) fn retransmissions(&mut self, now: Instant) -> (Vec<Outbound>, Vec<SubId>) {
        let (mut again, mut gone) = (Vec::new(), Vec::new());
        self.unanswered.retain(|_, u| {
            if u.next > now {
                return true;
            }
            if u.sent >= NOTIFY_TRIES || u.out.transport.is_reliable() {
                gone.push(u.sub.clone());
                return false;
            }
            u.sent += 1;
            u.next = now + Duration::from_millis(500 << u.sent.min(4));
            again.push(Outbound {
                transport: u.out.transport,
                dest: u.out.dest,
                conn: u.out.conn,
                local: u.out.local,
                bytes: Bytes::clone(&u.out.bytes),
            });
            true
        });
        (again, gone)
    }
}
