//! `AUDIT_SYSLOG`: the SIEM's syslog collector the audit trail is forwarded to.

use super::ConfigError;
use super::raw::{Raw, invalid};

/// The collector, validated: (host, port, TLS).
pub(super) fn audit_syslog(r: &Raw<'_>) -> Result<Option<(String, u16, bool)>, ConfigError> {
    let Some(v) = r.opt("audit_syslog") else {
        return Ok(None);
    };
    let bad = || {
        invalid(
            "audit_syslog",
            format!("expected tls://HOST:PORT (or tcp://HOST:PORT on the same host), got `{v}`"),
        )
    };
    let (tls, rest) = if let Some(r) = v.strip_prefix("tls://") {
        (true, r)
    } else if let Some(r) = v.strip_prefix("tcp://") {
        (false, r)
    } else {
        return Err(bad());
    };
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(bad)?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Some((host.to_string(), port, tls)))
}
