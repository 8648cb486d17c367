//! The anchored calls the application holds (by Call-ID), for `media`.

use foldhash::HashMap;
use std::time::Instant;

use careflow_core::media::{Leg, Session};

/// An anchored call.
#[derive(Debug)]
pub(crate) struct MediaCall {
    pub(crate) session: Session,
    pub(crate) checked: Instant,
    /// The kind of media the one offer in the forked INVITE serves (every branch of that kind
    /// can use it, a late one too); `None` when each branch got an offer of its own.
    pub(crate) one_offer: Option<Leg>,
    /// The caller's own SDP when one offer replaced it in the INVITE: a late branch of the
    /// other kind of media gets an offer of its own from it.
    pub(crate) caller_sdp: Option<String>,
}

/// Anchored calls by Call-ID.
pub(crate) type MediaCalls = std::sync::Mutex<HashMap<String, MediaCall>>;
