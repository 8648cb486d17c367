//! One HTTP/2 connection per push service origin, over TLS (ALPN `h2`), reused for every
//! push: APNs asks providers to keep their connection open rather than connect per
//! notification, and HTTP/2 carries concurrent pushes as streams of the one connection. A
//! connection that broke is replaced on the next push (and that push retried once).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::{PushError, credentials};

/// Largest response body read (the services answer a few hundred bytes).
const MAX_BODY: usize = 64 * 1024;
/// The system's CA bundle on Debian and derivatives.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The TLS set-up for the push services: the system CAs and, for a local or private
/// service, an extra CA file.
#[derive(Clone)]
pub struct PushTls(tokio_rustls::TlsConnector);

impl std::fmt::Debug for PushTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushTls").finish_non_exhaustive()
    }
}

impl PushTls {
    /// Trusts the system CA bundle (when present) and `extra_ca`.
    pub fn new(extra_ca: Option<&Path>) -> Result<Self, PushError> {
        let mut roots = rustls::RootCertStore::empty();
        if let Ok(certs) = CertificateDer::pem_file_iter(SYSTEM_CA_BUNDLE) {
            roots.add_parsable_certificates(certs.filter_map(Result::ok));
        }
        if let Some(ca) = extra_ca {
            let what = "push service CA file";
            let certs = CertificateDer::pem_file_iter(ca)
                .map_err(|e| credentials(what, format!("{}: {e}", ca.display())))?;
            for c in certs {
                let c = c.map_err(|e| credentials(what, format!("{}: {e}", ca.display())))?;
                roots
                    .add(c)
                    .map_err(|e| credentials(what, format!("{}: {e}", ca.display())))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| credentials("push TLS", e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self(tokio_rustls::TlsConnector::from(Arc::new(config))))
    }
}

/// A push service's origin (`https://host[:port]`) and its connection.
pub(crate) struct Origin {
    origin: String,
    host: String,
    port: u16,
    tls: PushTls,
    timeout: Duration,
    conn: Mutex<Option<SendRequest<Full<Bytes>>>>,
}

/// What a service answered.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: Bytes,
}

impl Origin {
    /// `url`'s origin (any path is ignored); `what` names the setting in errors.
    pub(crate) fn new(
        what: &'static str,
        url: &str,
        tls: PushTls,
        timeout: Duration,
    ) -> Result<Self, PushError> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| credentials(what, format!("`{url}` is not an https:// URL")))?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.contains(']') || h.ends_with(']') => (
                h,
                p.parse()
                    .map_err(|_| credentials(what, format!("`{url}`: bad port `{p}`")))?,
            ),
            _ => (authority, 443),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(credentials(what, format!("`{url}` has no host")));
        }
        Ok(Self {
            origin: format!("https://{authority}"),
            host: host.to_string(),
            port,
            tls,
            timeout,
            conn: Mutex::new(None),
        })
    }

    /// `https://host[:port]`, for logs.
    pub(crate) fn name(&self) -> &str {
        &self.origin
    }

    /// POSTs `body` to `path` with `headers`; on a connection that turns out broken, once
    /// more over a new one.
    pub(crate) async fn post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Answer, String> {
        let attempt = |fresh: bool| {
            let body = body.clone();
            async move {
                let mut sender = self.sender(fresh).await?;
                let mut req = hyper::Request::post(format!("{}{path}", self.origin));
                for (name, value) in headers {
                    req = req.header(*name, *value);
                }
                let req = req
                    .body(Full::new(body))
                    .map_err(|e| format!("{}: {e}", self.origin))?;
                let resp = sender
                    .send_request(req)
                    .await
                    .map_err(|e| format!("{}: {e}", self.origin))?;
                let status = resp.status().as_u16();
                let body = Limited::new(resp.into_body(), MAX_BODY)
                    .collect()
                    .await
                    .map_err(|e| format!("{}: reading the answer: {e}", self.origin))?
                    .to_bytes();
                Ok::<_, String>(Answer { status, body })
            }
        };
        let run = async {
            match attempt(false).await {
                Ok(a) => Ok(a),
                Err(first) => {
                    tracing::debug!(service = %self.origin, error = %first, "push connection broken; reconnecting");
                    attempt(true).await
                }
            }
        };
        tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| format!("{}: no answer in {:?}", self.origin, self.timeout))?
    }

    /// The connection's sender: the open one unless `fresh`, else a new connection.
    async fn sender(&self, fresh: bool) -> Result<SendRequest<Full<Bytes>>, String> {
        let mut conn = self.conn.lock().await;
        if !fresh
            && let Some(s) = conn.as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let s = self.connect().await?;
        *conn = Some(s.clone());
        Ok(s)
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("{}: connect: {e}", self.origin))?;
        let _ = tcp.set_nodelay(true);
        let name =
            ServerName::try_from(self.host.clone()).map_err(|e| format!("{}: {e}", self.origin))?;
        let tls = self
            .tls
            .0
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{}: TLS: {e}", self.origin))?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(format!(
                "{}: the service does not speak HTTP/2",
                self.origin
            ));
        }
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("{}: HTTP/2: {e}", self.origin))?;
        let origin = self.origin.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(service = %origin, error = %e, "push connection closed");
            }
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_https_urls() {
        let tls = PushTls::new(None).expect("tls");
        let t = Duration::from_secs(1);
        let o = Origin::new(
            "push_apns_url",
            "https://api.push.apple.com",
            tls.clone(),
            t,
        )
        .expect("origin");
        assert_eq!((o.host.as_str(), o.port), ("api.push.apple.com", 443));
        let o = Origin::new("x", "https://127.0.0.1:8443/ignored", tls.clone(), t).expect("o");
        assert_eq!(
            (o.host.as_str(), o.port, o.name()),
            ("127.0.0.1", 8443, "https://127.0.0.1:8443")
        );
        let o = Origin::new("x", "https://[::1]:9000", tls.clone(), t).expect("o");
        assert_eq!((o.host.as_str(), o.port), ("::1", 9000));
        let e = Origin::new("push_fcm_url", "http://fcm.example", tls.clone(), t).err();
        assert!(e.is_some_and(|e| e.to_string().starts_with("push_fcm_url:")));
        assert!(Origin::new("x", "https://h:port", tls, t).is_err());
    }
}
