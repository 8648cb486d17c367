//! The webhook to CareFlow (issue 20): where live events are POSTed and the secret they are
//! signed with.

use super::ConfigError;
use super::raw::{Raw, invalid};

/// The event types a webhook can ask for.
const TYPES: &[&str] = &[
    "device.registered",
    "device.unregistered",
    "call.answered",
    "call.missed",
    "call.ended",
    "credentials.changed",
];

/// Shortest secret accepted (bytes).
const MIN_SECRET: usize = 16;

/// The webhook settings, validated.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSettings {
    /// `WEBHOOK_URL`.
    pub url: String,
    /// `WEBHOOK_SECRET`, or the contents of `WEBHOOK_SECRET_FILE`.
    pub secret: Vec<u8>,
    /// `WEBHOOK_EVENTS`; none: every type.
    pub events: Option<Vec<String>>,
    /// `WEBHOOK_MAX_ATTEMPTS`.
    pub max_attempts: u32,
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret never reaches a log.
        f.debug_struct("WebhookSettings")
            .field("url", &self.url)
            .field("events", &self.events)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

/// `None` when `WEBHOOK_URL` is unset.
pub(super) fn webhook(r: &Raw<'_>) -> Result<Option<WebhookSettings>, ConfigError> {
    let Some(url) = r.opt("webhook_url") else {
        return Ok(None);
    };
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| {
            invalid(
                "webhook_url",
                format!("`{url}` is not an http:// or https:// URL"),
            )
        })?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(invalid("webhook_url", format!("`{url}` names no host")));
    }
    let secret = match (r.opt("webhook_secret"), r.path("webhook_secret_file")) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "webhook_secret_file",
                "set either WEBHOOK_SECRET or WEBHOOK_SECRET_FILE, not both",
            ));
        }
        (Some(s), None) => s.into_bytes(),
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map_err(|e| {
                invalid(
                    "webhook_secret_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?
            .trim()
            .as_bytes()
            .to_vec(),
        (None, None) => {
            return Err(invalid(
                "webhook_secret",
                "WEBHOOK_URL needs WEBHOOK_SECRET or WEBHOOK_SECRET_FILE: the events are signed with it",
            ));
        }
    };
    if secret.len() < MIN_SECRET {
        return Err(invalid(
            "webhook_secret",
            format!("at least {MIN_SECRET} characters (a random string shared with CareFlow)"),
        ));
    }
    let events = match r.opt("webhook_events") {
        None => None,
        Some(list) => {
            let mut out = Vec::new();
            for t in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                if !TYPES.contains(&t) {
                    return Err(invalid(
                        "webhook_events",
                        format!("`{t}` is not one of {}", TYPES.join(", ")),
                    ));
                }
                out.push(t.to_string());
            }
            Some(out)
        }
    };
    Ok(Some(WebhookSettings {
        url,
        secret,
        events,
        max_attempts: r.num("webhook_max_attempts", 1, 20)? as u32,
    }))
}
