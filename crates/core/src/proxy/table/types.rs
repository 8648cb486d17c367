//! What the proxy table takes and gives: branch keys, settings, the caller's and the targets'
//! side, transmissions and events.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use careflow_proto::{Message, ParseLimits};

use crate::transaction::{TimerConfig, TxKey};

/// A branch's client transaction: our Via branch value, and whether it is the CANCEL sent on
/// that branch (which shares the INVITE's branch value, §9.1) or the request itself (RFC 3261
/// §17.1.3 matches a response by branch and CSeq method).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BranchKey {
    /// Shared by a branch's request and CANCEL keys and every transmission that names them,
    /// so a key is made once per branch and cloned without allocating.
    branch: Arc<str>,
    cancel: bool,
}

impl BranchKey {
    /// The key of the request sent on `branch`.
    pub fn request(branch: &str) -> Self {
        Self {
            branch: branch.into(),
            cancel: false,
        }
    }

    /// The key of the CANCEL sent on this key's branch.
    pub fn cancel_of(&self) -> Self {
        Self {
            branch: self.branch.clone(),
            cancel: true,
        }
    }

    /// The key a response names by its top Via branch and CSeq method.
    pub fn of_response(msg: &Message) -> Option<Self> {
        let (_, method) = msg.cseq()?;
        Some(Self {
            branch: msg.top_via_branch()?.into(),
            cancel: method.eq_ignore_ascii_case("CANCEL"),
        })
    }

    /// The Via branch value.
    pub fn branch(&self) -> &str {
        &self.branch
    }

    /// Whether this is the CANCEL of a branch.
    pub fn is_cancel(&self) -> bool {
        self.cancel
    }
}

/// Settings of the proxy's transactions.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Transaction timers (T1, T2, T4, Timer C).
    pub timers: TimerConfig,
    /// Limits for the messages built here (CANCELs, merged challenges).
    pub parse_limits: ParseLimits,
    /// The `Server` header of the responses we generate (408, 487, 500, 503).
    pub server_header: String,
    /// How many forwards and branches the table holds at most (`MAX_TRANSACTIONS`).
    pub max_transactions: usize,
}

/// How the caller of a forwarded request is answered.
#[derive(Debug, Clone)]
pub struct Upstream<U> {
    /// Where the request came from (the `received`/`rport` of our own responses).
    pub source: SocketAddr,
    /// Whether it came over a reliable transport (no retransmissions of our responses).
    pub reliable: bool,
    /// The driver's way back to the caller.
    pub to: U,
    /// Whether a call's outcome is reported (`CallAnswered`, `CallFailed`): not when another
    /// node of a cluster handed us the call to deliver (that node counts it).
    pub reports_call: bool,
}

/// One request to send on a new branch: already carrying our Via (whose branch value is
/// `branch`), Record-Route and the target's Request-URI.
#[derive(Debug, Clone)]
pub struct NewBranch<D> {
    /// The Via branch value of `request`.
    pub branch: String,
    /// The request as it goes to the target.
    pub request: Message,
    /// The driver's way to the target.
    pub to: D,
    /// Whether the way to the target is reliable (no retransmissions).
    pub reliable: bool,
}

/// Bytes to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit<U, D> {
    /// A response for the caller.
    Upstream {
        /// The way back to the caller.
        to: U,
        /// The response.
        bytes: Bytes,
    },
    /// A request down a branch. A transport failure sending it is reported back with
    /// [`super::ProxyTable::branch_failed`].
    Downstream {
        /// The branch it belongs to.
        branch: BranchKey,
        /// The way to the target.
        to: D,
        /// The request (or its retransmission, or an ACK for a non-2xx).
        bytes: Bytes,
    },
}

/// What happened, for the driver's metrics, logs and media.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A final response went upstream (the first 2xx, or the best of §16.7, or our own).
    Final {
        /// The status code.
        code: u16,
        /// Set when the request has no INVITE server transaction here (a non-INVITE
        /// request): the driver keeps the response in its non-INVITE server transaction so a
        /// retransmitted request gets it again.
        record: Option<Record>,
    },
    /// A call (an out-of-dialog INVITE) was answered with a 2xx.
    CallAnswered {
        /// The call's Call-ID.
        call_id: Box<str>,
        /// The status code.
        code: u16,
    },
    /// A call ended without a 2xx after it was forked.
    CallFailed {
        /// The call's Call-ID.
        call_id: Box<str>,
        /// The status code sent upstream.
        code: u16,
    },
    /// Nothing of this call will be answered: its media session (if any) can end.
    MediaEnd {
        /// The call's Call-ID.
        call_id: Box<str>,
    },
}

/// The final response of a non-INVITE request, for the driver's server transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The server transaction answered.
    pub key: TxKey,
    /// The response.
    pub response: Bytes,
    /// Whether the caller's transport is reliable (how long the record is kept).
    pub reliable: bool,
}

/// The table is full (`max_transactions`): answer 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// What [`super::ProxyTable::fork`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fork {
    /// The branches were created and their first transmissions queued.
    Forked,
    /// The request was answered while it was being routed (a CANCEL, the shutdown):
    /// nothing was sent downstream.
    AlreadyAnswered,
    /// No branch could be made: the caller was answered 500.
    NoBranches,
    /// No branch yet: the request waits for sleeping devices ([`super::ProxyTable::hold`]).
    Held,
}
