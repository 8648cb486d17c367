//! Certificates: ours, the CA for client certificates, the CA for servers we connect to.

use std::path::PathBuf;

use super::ConfigError;
use super::raw::{Raw, invalid};

/// The TLS keys, checked together.
pub(super) struct TlsKeys {
    pub(super) files: Option<(PathBuf, PathBuf)>,
    pub(super) client_ca: Option<PathBuf>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) require_client_cert: bool,
}

/// `TLS_CERT`/`TLS_KEY` (both or neither), `TLS_CLIENT_CA`, `TLS_CA_FILE`,
/// `TLS_REQUIRE_CLIENT_CERT` (needs a client CA).
pub(super) fn keys(r: &Raw<'_>) -> Result<TlsKeys, ConfigError> {
    let files = match (r.path("tls_cert"), r.path("tls_key")) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        (Some(_), None) => return Err(invalid("tls_key", "TLS_CERT is set, TLS_KEY is not")),
        (None, Some(_)) => return Err(invalid("tls_cert", "TLS_KEY is set, TLS_CERT is not")),
    };
    let client_ca = r.path("tls_client_ca");
    let require_client_cert = r.flag("tls_require_client_cert")?;
    if require_client_cert && client_ca.is_none() {
        return Err(invalid(
            "tls_require_client_cert",
            "needs TLS_CLIENT_CA to verify client certificates against",
        ));
    }
    Ok(TlsKeys {
        files,
        client_ca,
        ca_file: r.path("tls_ca_file"),
        require_client_cert,
    })
}
