//! The anchored calls the application holds (by Call-ID), for `media`.

use std::collections::HashMap;
use std::time::Instant;

use careflow_core::media::Session;

/// An anchored call.
#[derive(Debug)]
pub(crate) struct MediaCall {
    pub(crate) session: Session,
    pub(crate) checked: Instant,
}

/// Anchored calls by Call-ID.
pub(crate) type MediaCalls = std::sync::Mutex<HashMap<String, MediaCall>>;
