//! The cluster settings: where this node's internal link is and the secret the nodes sign
//! owner tokens with (two during a rotation).

use std::net::SocketAddr;

use super::ConfigError;
use super::raw::{Raw, invalid};
use super::sip::parse_secret;

/// A cluster node's settings, validated.
#[derive(Clone)]
pub struct ClusterSettings {
    /// `CLUSTER_ADDRESS`.
    pub address: SocketAddr,
    /// `CLUSTER_SECRET` (or the contents of `CLUSTER_SECRET_FILE`).
    pub secret: [u8; 32],
    /// `CLUSTER_SECRET_PREVIOUS`, during a rotation.
    pub previous: Option<[u8; 32]>,
    /// `CLUSTER_TLS`: the internal link is TLS.
    pub tls: bool,
}

impl std::fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach a log.
        f.debug_struct("ClusterSettings")
            .field("address", &self.address)
            .field("rotating", &self.previous.is_some())
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// `None` when `CLUSTER_ADDRESS` is unset (the node is alone).
pub(super) fn cluster(r: &Raw<'_>, redis: bool) -> Result<Option<ClusterSettings>, ConfigError> {
    let text = r.get("cluster_address");
    if text.is_empty() {
        return Ok(None);
    }
    let address: SocketAddr = text.parse().map_err(|_| {
        invalid(
            "cluster_address",
            format!("expected IP:PORT that the other nodes can reach, got `{text}`"),
        )
    })?;
    if address.ip().is_unspecified() || address.port() == 0 {
        return Err(invalid(
            "cluster_address",
            format!(
                "`{text}` is not an address other nodes can dial; give this node's own IP and a port"
            ),
        ));
    }
    if !redis {
        return Err(invalid(
            "cluster_address",
            "needs REDIS_URL: the nodes share registrations and liveness through Redis",
        ));
    }
    let secret = match (r.opt("cluster_secret"), r.path("cluster_secret_file")) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "cluster_secret_file",
                "set either CLUSTER_SECRET or CLUSTER_SECRET_FILE, not both",
            ));
        }
        (Some(s), None) => {
            parse_secret(&s).ok_or_else(|| invalid("cluster_secret", "expected 64 hex digits"))?
        }
        (None, Some(path)) => {
            let s = std::fs::read_to_string(&path).map_err(|e| {
                invalid(
                    "cluster_secret_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            parse_secret(s.trim()).ok_or_else(|| {
                invalid(
                    "cluster_secret_file",
                    format!("{} must hold 64 hex digits", path.display()),
                )
            })?
        }
        (None, None) => {
            return Err(invalid(
                "cluster_secret",
                "required with CLUSTER_ADDRESS: 64 hex digits, the same on every node (or CLUSTER_SECRET_FILE)",
            ));
        }
    };
    let previous = match r.opt("cluster_secret_previous") {
        None => None,
        Some(s) => Some(
            parse_secret(&s)
                .ok_or_else(|| invalid("cluster_secret_previous", "expected 64 hex digits"))?,
        ),
    };
    Ok(Some(ClusterSettings {
        address,
        secret,
        previous,
        tls: r.flag("cluster_tls")?,
    }))
}
