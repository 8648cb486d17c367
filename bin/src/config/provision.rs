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
