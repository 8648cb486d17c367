//! `PROVISION_*` and `DEVICE_ROTATION_GRACE`: the provisioning server desk phones fetch their
//! configuration from, and the devices' credentials.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::ConfigError;
use super::raw::{Raw, invalid};

/// Device provisioning settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionSettings {
    /// Listeners: (TLS, address).
    pub listen: Vec<(bool, SocketAddr)>,
    /// `PROVISION_PUBLIC_URL`, or the first listener at SIP_DOMAIN.
    pub public_url: Option<String>,
    /// `PROVISION_KEY_FILE`, or DATA_DIR/provisioning.key.
    pub key_file: PathBuf,
    /// `DEVICE_ROTATION_GRACE`.
    pub grace: Duration,
    /// `PROVISION_MISSES` per `PROVISION_MISS_WINDOW`.
    pub misses: u32,
    /// `PROVISION_MISS_WINDOW`.
    pub miss_window: Duration,
    /// `PROVISION_UTC_OFFSET`, in minutes east of UTC.
    pub utc_offset_minutes: i32,
    /// `PROVISION_NTP_SERVER`.
    pub ntp_server: String,
    /// `PROVISION_RESYNC`.
    pub resync: Duration,
    /// `DEVICE_CREDENTIALS=shared`: new devices share their user's credentials by default.
    pub shared_by_default: bool,
    /// `PROVISION_CLIENT_CA`: the vendors' device CAs client certificates are checked against.
    pub client_ca: Option<PathBuf>,
    /// `PROVISION_PNP`: the phones' network interface address and port for SIP PnP.
    pub pnp: Option<(std::net::Ipv4Addr, u16)>,
}

fn listeners(r: &Raw<'_>) -> Result<Vec<(bool, SocketAddr)>, ConfigError> {
    r.list("provision_listen")
        .map(|item| {
            let (tls, addr) = if let Some(a) = item.strip_prefix("https://") {
                (true, a)
            } else if let Some(a) = item.strip_prefix("http://") {
                (false, a)
            } else {
                (true, item)
            };
            let addr = addr.trim_end_matches('/');
            addr.parse().map(|a| (tls, a)).map_err(|_| {
                invalid(
                    "provision_listen",
                    format!("expected https://HOST:PORT or http://HOST:PORT, got `{item}`"),
                )
            })
        })
        .collect()
}

/// `+1`, `-5`, `+5:30`, `0` as minutes east of UTC.
fn utc_offset(v: &str) -> Option<i32> {
    let (sign, rest) = match v.as_bytes().first()? {
        b'+' => (1, &v[1..]),
        b'-' => (-1, &v[1..]),
        _ => (1, v),
    };
    let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
    let h: i32 = h.parse().ok()?;
    let m: i32 = m.parse().ok()?;
    if !(0..=14).contains(&h) || !(0..60).contains(&m) || (h == 14 && m > 0) {
        return None;
    }
    Some(sign * (h * 60 + m))
}

fn pnp(r: &Raw<'_>) -> Result<Option<(std::net::Ipv4Addr, u16)>, ConfigError> {
    let Some(v) = r.opt("provision_pnp") else {
        return Ok(None);
    };
    let (addr, port) = match v.rsplit_once(':') {
        Some((a, p)) => (a, p.parse::<u16>().ok().filter(|p| *p > 0)),
        None => (v.as_str(), Some(5060)),
    };
    match (addr.parse::<std::net::Ipv4Addr>(), port) {
        (Ok(a), Some(p)) if !a.is_unspecified() && !a.is_multicast() => Ok(Some((a, p))),
        _ => Err(invalid(
            "provision_pnp",
            format!(
                "expected the IPv4 address of the phones' network interface (optionally :PORT), such as 10.20.0.1, got `{v}`"
            ),
        )),
    }
}

/// What PROVISION_PNP needs of the other keys: a provisioning URL to hand out, and no UDP
/// SIP listener on 0.0.0.0 at its port (the multicast would reach that one too).
pub(super) fn check_pnp(
    p: &ProvisionSettings,
    sip_listen: &[careflow_transport::ListenSpec],
) -> Result<(), ConfigError> {
    let Some((_, port)) = p.pnp else {
        return Ok(());
    };
    if p.public_url.is_none() {
        return Err(invalid(
            "provision_pnp",
            "needs PROVISION_LISTEN (or PROVISION_PUBLIC_URL): the URL phones are given",
        ));
    }
    if let Some(l) = sip_listen.iter().find(|l| {
        l.transport == careflow_transport::Transport::Udp
            && l.addr.port() == port
            && l.addr.ip().is_unspecified()
    }) {
        return Err(invalid(
            "provision_pnp",
            format!(
                "SIP_LISTEN has {}:{} on all addresses, which would take the PnP multicast for port {port} too: bind that UDP listener to an address (udp:10.20.0.1:{port}) or give PnP another port",
                l.transport, l.addr
            ),
        ));
    }
    Ok(())
}

pub(super) fn settings(
    r: &Raw<'_>,
    data_dir: &std::path::Path,
    sip_domain: &str,
) -> Result<ProvisionSettings, ConfigError> {
    let listen = listeners(r)?;
    let public_url = match r.opt("provision_public_url") {
        Some(u) => {
            let rest = u
                .strip_prefix("https://")
                .or_else(|| u.strip_prefix("http://"))
                .filter(|rest| {
                    !rest.is_empty()
                        && rest
                            .trim_end_matches('/')
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
                });
            if rest.is_none() {
                return Err(invalid(
                    "provision_public_url",
                    format!("expected https://HOST[:PORT] (or http://), got `{u}`"),
                ));
            }
            Some(u.trim_end_matches('/').to_string())
        }
        None => listen.first().map(|(tls, a)| {
            format!(
                "{}://{sip_domain}:{}",
                if *tls { "https" } else { "http" },
                a.port()
            )
        }),
    };
    let offset = r.get("provision_utc_offset");
    Ok(ProvisionSettings {
        listen,
        public_url,
        key_file: r
            .path("provision_key_file")
            .unwrap_or_else(|| data_dir.join("provisioning.key")),
        grace: r.secs("device_rotation_grace", 0, 90 * 86_400)?,
        misses: r.num32("provision_misses", 1, 100_000)?,
        miss_window: r.secs("provision_miss_window", 1, 86_400)?,
        utc_offset_minutes: utc_offset(offset).ok_or_else(|| {
            invalid(
                "provision_utc_offset",
                format!("expected an offset from UTC such as +1, -5 or +5:30, got `{offset}`"),
            )
        })?,
        ntp_server: match r.get("provision_ntp_server") {
            s if !s.is_empty()
                && s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b)) =>
            {
                s.to_string()
            }
            s => {
                return Err(invalid(
                    "provision_ntp_server",
                    format!("expected a host name or address, got `{s}`"),
                ));
            }
        },
        resync: r.secs("provision_resync", 3600, 30 * 86_400)?,
        pnp: pnp(r)?,
        client_ca: r.path("provision_client_ca"),
        shared_by_default: match r.get("device_credentials") {
            "own" => false,
            "shared" => true,
            other => {
                return Err(invalid(
                    "device_credentials",
                    format!("expected own or shared, got `{other}`"),
                ));
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_read_as_minutes() {
        assert_eq!(utc_offset("+1"), Some(60));
        assert_eq!(utc_offset("0"), Some(0));
        assert_eq!(utc_offset("-5"), Some(-300));
        assert_eq!(utc_offset("+5:30"), Some(330));
        assert_eq!(utc_offset("+14"), Some(840));
        for bad in ["", "+15", "+1:60", "CET", "+1:3x"] {
            assert_eq!(utc_offset(bad), None, "{bad}");
        }
    }
}
