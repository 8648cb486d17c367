//! Push notification services for sleeping mobile devices (RFC 8599).
//!
//! - [`apns`]: APNs over HTTP/2 with token authentication (an ES256 JWT from a `.p8` key, key
//!   id, team id, made once and reused inside its lifetime).
//! - [`fcm`]: FCM HTTP v1 (a service account's RS256 assertion exchanged for an OAuth2
//!   access token, cached until it is due).
//! - [`payload`]: what a push carries, in the format Linphone reads (call-id, caller, the
//!   device's instance id).
//!
//! The clocks are arguments (unix seconds): the token lifetimes are tested with a simulated
//! clock.
#![warn(missing_docs)]

pub mod apns;
pub mod fcm;
mod http;
pub mod payload;

pub use http::PushTls;
pub use payload::{Kind, Notification};

/// Credential and set-up failures, naming what failed (never showing a secret).
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// A key, service-account file or URL could not be used.
    #[error("{what}: {why}")]
    Credentials {
        /// Which credential or setting.
        what: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

fn credentials(what: &'static str, why: impl std::fmt::Display) -> PushError {
    PushError::Credentials {
        what,
        why: why.to_string(),
    }
}

/// Why a push did not go out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The service says the device's token is not (or no longer) valid: the binding is
    /// useless and is removed (404 to the caller).
    InvalidToken(String),
    /// The service refused this push for another reason (our credentials, the topic, a
    /// payload it did not like): 480.
    Refused(String),
    /// The service could not be reached or did not answer in time, or is overloaded: 480.
    Unavailable(String),
    /// The device belongs to an app our credentials cannot push to (another team's topic,
    /// another Firebase sender): it is reached over its flow like any device instead.
    NotOurs(String),
}

impl Failure {
    /// A short label for metrics (`reason`).
    pub fn label(&self) -> &'static str {
        match self {
            Self::InvalidToken(_) => "invalid_token",
            Self::Refused(_) => "refused",
            Self::Unavailable(_) => "unavailable",
            Self::NotOurs(_) => "not_our_app",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InvalidToken(why) => write!(f, "invalid device token: {why}"),
            Self::Refused(why) => write!(f, "refused: {why}"),
            Self::Unavailable(why) => write!(f, "unavailable: {why}"),
            Self::NotOurs(why) => write!(f, "another app's device: {why}"),
        }
    }
}

/// The `reason` of a service's JSON error answer (APNs `{"reason": ...}`, FCM
/// `{"error": {"status": ...}}`), else the start of the body.
fn error_reason(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let reason = v
        .get("reason")
        .or_else(|| v.pointer("/error/details/0/errorCode"))
        .or_else(|| v.pointer("/error/status"))
        .or_else(|| v.get("error"))
        .and_then(|r| r.as_str());
    match reason {
        Some(r) => r.to_string(),
        None => String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned(),
    }
}
