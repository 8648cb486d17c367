//! Push notification services for sleeping mobile devices (RFC 8599).
//!
//! - [`apns`]: the APNs provider token (ES256 JWT from a `.p8` key, key id, team id), made once
//!   and reused inside its lifetime.
//! - [`fcm`]: the FCM HTTP v1 credentials (a service account's RS256 assertion for an OAuth2
//!   access token, cached until it is due).
//!
//! The clocks are arguments (unix seconds): the token lifetimes are tested with a simulated
//! clock. The HTTP clients that use them come next (issue 18).
#![warn(missing_docs)]

pub mod apns;
pub mod fcm;

/// Credential and token failures, naming what failed (never showing a secret).
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// A key or service-account file could not be used.
    #[error("{what}: {why}")]
    Credentials {
        /// Which credential.
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
