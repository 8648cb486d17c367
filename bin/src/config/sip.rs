//! The SIP side: domain, listeners, digest, registrar rules, WebSocket, NAT keep-alives, routing
//! to other domains.

use std::net::SocketAddr;
use std::time::Duration;

use careflow_core::Transport;
use careflow_core::registrar::RegistrarConfig;
use careflow_proto::digest::Algorithm;
use careflow_server::keepalive::KeepaliveConfig;
use careflow_transport::{ListenSpec, WsOptions};

use super::ConfigError;
use super::raw::{Raw, invalid};

/// `SIP_DOMAIN`, lower case.
pub(super) fn domain(r: &Raw<'_>) -> Result<String, ConfigError> {
    let d = r.get("sip_domain").to_ascii_lowercase();
    let host_chars = d
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'[' | b']'));
    if d.is_empty() || !host_chars {
        return Err(invalid(
            "sip_domain",
            "expected a host name such as sip.example.com",
        ));
    }
    Ok(d)
}

/// `SIP_LISTEN`: `TRANSPORT:HOST:PORT,...`.
pub(super) fn listen(s: &str) -> Result<Vec<ListenSpec>, ConfigError> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (proto, addr) = item.split_once(':').ok_or_else(|| {
            invalid(
                "sip_listen",
                format!("`{item}`: expected TRANSPORT:HOST:PORT such as udp:0.0.0.0:5060"),
            )
        })?;
        let transport: Transport = proto.parse().map_err(|_| {
            invalid(
                "sip_listen",
                format!("`{item}`: unknown transport `{proto}` (udp, tcp, tls, ws, wss)"),
            )
        })?;
        let addr: SocketAddr = addr.parse().map_err(|_| {
            invalid(
                "sip_listen",
                format!("`{item}`: `{addr}` is not HOST:PORT (IP address and port)"),
            )
        })?;
        out.push(ListenSpec { transport, addr });
    }
    if out.is_empty() {
        return Err(invalid("sip_listen", "at least one listener is needed"));
    }
    Ok(out)
}

/// `NONCE_SECRET`: 64 hex digits, or unset.
pub(super) fn nonce_secret(r: &Raw<'_>) -> Result<Option<[u8; 32]>, ConfigError> {
    match r.get("nonce_secret") {
        "" => Ok(None),
        s => parse_secret(s)
            .map(Some)
            .ok_or_else(|| invalid("nonce_secret", "expected 64 hex digits")),
    }
}

/// `AUTH_ALGORITHMS` in the order challenges are offered.
pub(super) fn auth_algorithms(r: &Raw<'_>) -> Result<Vec<Algorithm>, ConfigError> {
    let mut out = Vec::new();
    for a in r.list("auth_algorithms") {
        let alg = Algorithm::from_token(Some(a)).ok_or_else(|| {
            invalid(
                "auth_algorithms",
                format!("unknown algorithm `{a}` (use MD5 and/or SHA-256)"),
            )
        })?;
        if !out.contains(&alg) {
            out.push(alg);
        }
    }
    if out.is_empty() {
        return Err(invalid("auth_algorithms", "at least one of MD5, SHA-256"));
    }
    Ok(out)
}

/// The registrar's Expires and Contact limits.
pub(super) fn registrar(r: &Raw<'_>) -> Result<RegistrarConfig, ConfigError> {
    let registrar = RegistrarConfig {
        min_expires: r.num32("min_expires", 1, 86_400)?,
        max_expires: r.num32("max_expires", 1, 604_800)?,
        default_expires: r.num32("default_expires", 1, 604_800)?,
        max_contacts: r.num("max_contacts", 1, 1000)? as usize,
    };
    if registrar.min_expires > registrar.max_expires {
        return Err(invalid("min_expires", "must not exceed max_expires"));
    }
    if registrar.default_expires < registrar.min_expires
        || registrar.default_expires > registrar.max_expires
    {
        return Err(invalid(
            "default_expires",
            "must lie between min_expires and max_expires",
        ));
    }
    Ok(registrar)
}

/// The WebSocket listeners' rules.
pub(super) fn ws(r: &Raw<'_>) -> Result<WsOptions, ConfigError> {
    let path = r.get("ws_path").to_string();
    if !path.starts_with('/') || path.contains(char::is_whitespace) {
        return Err(invalid(
            "ws_path",
            format!("`{path}` is not a path such as /"),
        ));
    }
    let origins: Vec<String> = r
        .list("ws_allowed_origins")
        .map(|o| o.trim_end_matches('/').to_string())
        .filter(|o| !o.is_empty())
        .collect();
    if let Some(bad) = origins
        .iter()
        .find(|o| !(o.starts_with("https://") || o.starts_with("http://")))
    {
        return Err(invalid(
            "ws_allowed_origins",
            format!("`{bad}` is not an origin such as https://app.example.com"),
        ));
    }
    Ok(WsOptions {
        path,
        allowed_origins: (!origins.is_empty()).then_some(origins),
        require_origin: r.flag("ws_require_origin")?,
        ping_interval: r.secs("ws_ping_interval", 1, 3600)?,
    })
}

/// OPTIONS keep-alives to devices behind NAT.
pub(super) fn keepalive(r: &Raw<'_>) -> Result<KeepaliveConfig, ConfigError> {
    Ok(KeepaliveConfig {
        interval: Duration::from_secs(r.num("nat_keepalive_interval", 0, 3600)?),
        max_failures: r.num32("nat_keepalive_failures", 1, 100)?,
    })
}

/// The transports' limits (connections in all and per address, partial and idle timeouts).
pub(super) fn transport_limits(
    r: &Raw<'_>,
    max_message_size: usize,
) -> Result<careflow_transport::TransportLimits, ConfigError> {
    Ok(careflow_transport::TransportLimits {
        max_message_size,
        max_connections: r.num("max_connections", 1, 1_000_000)? as usize,
        max_connections_per_ip: r.num("max_connections_per_ip", 1, 1_000_000)? as usize,
        partial_timeout: r.secs("partial_message_timeout", 1, 600)?,
        idle_timeout: r.secs("tcp_idle_timeout", 1, 86_400)?,
    })
}

/// RFC 3261 timers T1, T2, T4 and C.
pub(super) fn timers(r: &Raw<'_>) -> Result<careflow_core::transaction::TimerConfig, ConfigError> {
    Ok(careflow_core::transaction::TimerConfig {
        t1: r.millis("t1_ms", 10, 10_000)?,
        t2: r.millis("t2_ms", 100, 60_000)?,
        t4: r.millis("t4_ms", 100, 60_000)?,
        c: r.secs("timer_c", 1, 3600)?,
    })
}

/// `OUTBOUND_GATEWAY`: a SIP URI with an IP address, or unset.
pub(super) fn outbound_gateway(r: &Raw<'_>) -> Result<Option<String>, ConfigError> {
    match r.get("outbound_gateway") {
        "" => Ok(None),
        g => {
            let u = careflow_proto::Uri::parse(g)
                .filter(|u| u.is_sip() && u.host.ip().is_some())
                .ok_or_else(|| {
                    invalid(
                        "outbound_gateway",
                        format!(
                            "`{g}` is not a SIP URI with an IP address, e.g. sip:192.0.2.10:5060"
                        ),
                    )
                })?;
            Ok(Some(u.raw.to_string()))
        }
    }
}

pub(super) fn parse_secret(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let h = (b[2 * i] as char).to_digit(16)?;
        let l = (b[2 * i + 1] as char).to_digit(16)?;
        *o = (h * 16 + l) as u8;
    }
    Some(out)
}

/// `BLF_GROUPS`: `GROUP=USER,USER;GROUP=...` (users of SIP_DOMAIN, or `user@domain`): who may
/// watch whose busy lamp and pick up whose calls. Empty: any user of the same domain.
pub(super) fn watch_policy(
    r: &Raw<'_>,
    domain: &str,
) -> Result<careflow_core::dialog_event::pickup::WatchPolicy, ConfigError> {
    use careflow_core::dialog_event::pickup::WatchPolicy;
    let text = r.get("blf_groups").trim();
    if text.is_empty() {
        return Ok(WatchPolicy::SameDomain);
    }
    let mut groups = std::collections::HashMap::new();
    for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, members)) = part.split_once('=') else {
            return Err(invalid(
                "blf_groups",
                format!("`{part}` is not GROUP=USER,USER"),
            ));
        };
        let members: Vec<String> = members
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(|m| {
                if m.contains('@') {
                    m.to_ascii_lowercase()
                } else {
                    format!("{}@{domain}", m.to_ascii_lowercase())
                }
            })
            .collect();
        if name.trim().is_empty() || members.is_empty() {
            return Err(invalid(
                "blf_groups",
                format!("group `{part}` needs a name and at least one user"),
            ));
        }
        groups.insert(name.trim().to_string(), members);
    }
    Ok(WatchPolicy::Groups(groups))
}

/// `BLF_QUIRKS`: `FRAGMENT=QUIRK,QUIRK;FRAGMENT=...`: the dialog-info quirks of the phones whose
/// User-Agent contains FRAGMENT (any case), first match wins.
pub(super) fn blf_quirks(
    r: &Raw<'_>,
) -> Result<Vec<(String, careflow_core::dialog_event::info::Quirks)>, ConfigError> {
    use careflow_core::dialog_event::info::Quirks;
    let mut out = Vec::new();
    for part in r
        .get("blf_quirks")
        .split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let Some((fragment, quirks)) = part.split_once('=') else {
            return Err(invalid(
                "blf_quirks",
                format!("`{part}` is not USER_AGENT_FRAGMENT=QUIRK,QUIRK"),
            ));
        };
        let fragment = fragment.trim().to_ascii_lowercase();
        if fragment.is_empty() {
            return Err(invalid(
                "blf_quirks",
                format!("`{part}` needs a User-Agent fragment"),
            ));
        }
        let q = Quirks::parse(quirks).map_err(|e| invalid("blf_quirks", e))?;
        out.push((fragment, q));
    }
    Ok(out)
}
