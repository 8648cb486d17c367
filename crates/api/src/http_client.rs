//! A small HTTP(S) GET for the few outbound fetches (the JWKS), on hyper's connection API and
//! rustls with the system CAs: no extra client stack.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::TcpStream;

/// Largest response body accepted.
const MAX_BODY: usize = 1 << 20;

fn tls() -> Option<&'static tokio_rustls::TlsConnector> {
    static CONNECTOR: OnceLock<Option<tokio_rustls::TlsConnector>> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            if let Ok(certs) = CertificateDer::pem_file_iter("/etc/ssl/certs/ca-certificates.crt") {
                roots.add_parsable_certificates(certs.filter_map(Result::ok));
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .ok()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        })
        .as_ref()
}

struct Target<'a> {
    https: bool,
    host: &'a str,
    port: u16,
    path: &'a str,
}

fn parse(url: &str) -> Result<Target<'_>, String> {
    let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("{url}: not an http(s) URL"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            (h, p.parse().map_err(|_| format!("{url}: bad port `{p}`"))?)
        }
        _ => (authority, if https { 443 } else { 80 }),
    };
    if host.is_empty() {
        return Err(format!("{url}: no host"));
    }
    Ok(Target {
        https,
        host: host.trim_start_matches('[').trim_end_matches(']'),
        port,
        path,
    })
}

/// GETs `url` and returns the body of a 2xx answer.
pub(crate) async fn get(url: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    match get_status(url, None, timeout).await? {
        (status, body) if (200..300).contains(&status) => Ok(body),
        (status, _) => Err(format!("{url}: HTTP {status}")),
    }
}

/// GETs `url` (with an optional bearer token) and returns the status and body, whatever the
/// status.
pub(crate) async fn get_status(
    url: &str,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), String> {
    tokio::time::timeout(timeout, fetch(url, bearer))
        .await
        .map_err(|_| format!("{url}: timed out"))?
}

/// POSTs `body` to `url` with `headers`; the answer's status, whatever it is.
pub(crate) async fn post(
    url: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
    timeout: Duration,
) -> Result<u16, String> {
    let t = parse(url)?;
    let mut req = hyper::Request::post(t.path);
    for (name, value) in headers {
        req = req.header(*name, value.as_str());
    }
    tokio::time::timeout(timeout, request(url, &t, req, Bytes::from(body)))
        .await
        .map_err(|_| format!("{url}: timed out"))?
        .map(|(status, _)| status)
}

async fn fetch(url: &str, bearer: Option<&str>) -> Result<(u16, Vec<u8>), String> {
    let t = parse(url)?;
    let mut req = hyper::Request::get(t.path);
    if let Some(b) = bearer {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {b}"));
    }
    request(url, &t, req, Bytes::new()).await
}

async fn request(
    url: &str,
    t: &Target<'_>,
    req: hyper::http::request::Builder,
    body: Bytes,
) -> Result<(u16, Vec<u8>), String> {
    let tcp = TcpStream::connect((t.host, t.port))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let req = req
        .header(hyper::header::HOST, t.host)
        .header(hyper::header::USER_AGENT, "careflow-sip")
        .body(Full::new(body))
        .map_err(|e| format!("{url}: {e}"))?;
    let resp = if t.https {
        let name = rustls::pki_types::ServerName::try_from(t.host.to_string())
            .map_err(|e| format!("{url}: {e}"))?;
        let connector = tls().ok_or_else(|| format!("{url}: TLS is unavailable"))?;
        let stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{url}: TLS: {e}"))?;
        send(url, TokioIo::new(stream), req).await?
    } else {
        send(url, TokioIo::new(tcp), req).await?
    };
    Ok(resp)
}

async fn send<S>(
    url: &str,
    io: S,
    req: hyper::Request<Full<Bytes>>,
) -> Result<(u16, Vec<u8>), String>
where
    S: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    Ok((status, body.to_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_split() {
        let t = parse("https://www.googleapis.com/service_accounts/v1/jwk/x").unwrap();
        assert!(t.https);
        assert_eq!((t.host, t.port), ("www.googleapis.com", 443));
        assert_eq!(t.path, "/service_accounts/v1/jwk/x");
        let t = parse("http://127.0.0.1:8081").unwrap();
        assert_eq!((t.host, t.port, t.path), ("127.0.0.1", 8081, "/"));
        assert!(parse("ftp://x").is_err());
        assert!(parse("http://h:notaport/").is_err());
    }

    #[tokio::test]
    async fn fetches_over_plain_http() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                .await
                .unwrap();
        });
        let body = get(
            &format!("http://127.0.0.1:{port}/keys"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(body, b"hello");
    }
}
