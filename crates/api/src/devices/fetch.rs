//! The provisioning server (`PROVISION_LISTEN`): phones fetch their configuration files here,
//! over HTTPS with the server's certificate (or plain HTTP on a listener written `http://`,
//! for phones that trust only their vendor's CA). A phone presenting its factory device
//! certificate (chained to `PROVISION_CLIENT_CA`, naming its MAC) is authenticated by it.
//!
//! Every device file is behind HTTP digest (realm [`PROVISIONING_REALM`], user name the MAC,
//! the password given when the device was added), the Yealink common file behind any
//! device's. A request for an unknown MAC gets 404 and is logged; unknown MACs and wrong
//! credentials are misses. A source over its budget of misses ([`FetchGuard`]) is throttled:
//! every request without credentials is challenged (401) whether its MAC exists or not, so
//! the answers no longer tell which MACs exist, and every request with credentials that are
//! not valid gets 429; a phone behind the same address with its valid credentials is still
//! served. Every fetch that is answered (served, unknown MAC, wrong credentials, the start of
//! a throttle) is an audit entry.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use careflow_core::audit::AuditEvent;
use careflow_core::auth::Authenticator;
use careflow_core::nonce::NonceIssuer;
use careflow_core::provisioning::{FetchGuard, FileRequest, Mac, Vendor, certificate_mac, model};
use careflow_proto::digest::{Algorithm, Credentials};
use careflow_store::audit::AuditStore;
use careflow_store::devices::Device;
use tokio::net::TcpListener;

use super::files::{self, PhoneConfig, SipServer};
use super::{DeviceService, PROVISIONING_REALM};
use crate::provisioning::unix_now;

/// The provisioning server's state.
pub struct FetchServer {
    /// Devices and settings.
    pub devices: DeviceService,
    /// The SIP service as phones reach it.
    pub sip: SipServer,
    /// The audit trail.
    pub audit: Arc<dyn AuditStore>,
    auth: Authenticator,
    guard: FetchGuard,
}

impl std::fmt::Debug for FetchServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchServer")
            .field("sip", &self.sip)
            .finish_non_exhaustive()
    }
}

/// Nonces live this long: a phone's fetch round is seconds.
const NONCE_TTL: u64 = 300;

impl FetchServer {
    /// A server for `devices`, its nonces made with `secret` (the server's nonce secret: a
    /// phone challenged by one node is accepted by another).
    pub fn new(
        devices: DeviceService,
        sip: SipServer,
        audit: Arc<dyn AuditStore>,
        secret: [u8; 32],
    ) -> Self {
        let limits = devices.settings.limits;
        Self {
            devices,
            sip,
            audit,
            auth: Authenticator::new(
                NonceIssuer::new(secret, NONCE_TTL, 0),
                vec![Algorithm::Md5, Algorithm::Sha256],
                100_000,
            ),
            guard: FetchGuard::new(limits, Instant::now()),
        }
    }
}

impl FetchServer {
    /// The miss budget per source, shared with the PnP responder.
    pub(crate) fn guard(&self) -> &FetchGuard {
        &self.guard
    }
}

/// The router (exposed for in-process tests).
pub fn router(server: Arc<FetchServer>) -> Router {
    Router::new()
        .fallback(axum::routing::get(fetch))
        .with_state(server)
}

/// The device a verified TLS client certificate names (none on plain HTTP, or without one).
#[derive(Debug, Clone)]
pub struct DeviceCertificate(pub Option<Mac>);

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 1024;
/// A client has this long for its TLS handshake and its request head.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `listener` (TLS when `tls` is given) until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    server: Arc<FetchServer>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(server);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, say: wait a little rather than spin.
                    tracing::warn!(error = %e, "provisioning listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let app = app.clone().layer(axum::Extension(ConnectInfo(peer)));
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT);
            let result = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            // A client certificate, verified against PROVISION_CLIENT_CA by
                            // the handshake, names the device it authenticates.
                            let mac = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(|c| certificate_mac(c.as_ref()));
                            let app = app.layer(axum::Extension(DeviceCertificate(mac)));
                            let service = hyper_util::service::TowerToHyperService::new(app);
                            http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "provisioning: TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    }
                }
                None => {
                    let app = app.layer(axum::Extension(DeviceCertificate(None)));
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    http.serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "provisioning connection ended with an error");
            }
        });
    }
}

/// Network text for a log line or an audit entry: one line, bounded.
fn clean(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// How a fetch ended, for the audit trail and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Served,
    UnknownMac,
    BadCredentials,
    Throttled,
    UserDisabled,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Served => "ok",
            Self::UnknownMac => "unknown-mac",
            Self::BadCredentials => "bad-credentials",
            Self::Throttled => "throttled",
            Self::UserDisabled => "user-disabled",
        }
    }
}

struct Request<'a> {
    peer: SocketAddr,
    file: &'a str,
    user_agent: String,
}

impl FetchServer {
    async fn audit(&self, r: &Request<'_>, mac: Option<&str>, target: &str, outcome: Outcome) {
        let event = AuditEvent {
            actor: mac.map_or_else(|| "device:?".to_string(), |m| format!("device:{m}")),
            source: r.peer.to_string(),
            action: "device.config_fetched".into(),
            target: target.to_string(),
            outcome: outcome.as_str().into(),
            detail: format!("file={} ua={}", clean(r.file, 80), r.user_agent),
        };
        crate::audit::record(&*self.audit, event).await;
    }

    /// A miss of the request's source; the first over the budget is logged and audited.
    async fn miss(&self, r: &Request<'_>, mac: Option<&str>) {
        if self.guard.miss(r.peer.ip(), Instant::now()) {
            let limits = self.guard.limits();
            tracing::warn!(target: "careflow::security", src = %r.peer.ip(),
                misses = limits.misses, window_secs = limits.window.as_secs(),
                "SECURITY provisioning_throttled: too many unknown MACs or wrong credentials; \
                 requests without valid credentials get 429");
            self.audit(r, mac, "-", Outcome::Throttled).await;
        }
    }

    fn challenge(&self, stale: bool) -> Response {
        let mut resp = (StatusCode::UNAUTHORIZED, "authentication required\n").into_response();
        for c in self.auth.challenges(PROVISIONING_REALM, unix_now(), stale) {
            if let Ok(v) = c.parse() {
                resp.headers_mut().append(header::WWW_AUTHENTICATE, v);
            }
        }
        resp
    }
}

fn throttled(left: Duration) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, left.as_secs().max(1).to_string())],
        "too many failed requests from this address\n",
    )
        .into_response()
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "no such file\n").into_response()
}

fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "30")],
        "the device database is unavailable; try again later\n",
    )
        .into_response()
}

async fn fetch(
    State(s): State<Arc<FetchServer>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    cert: Option<axum::Extension<DeviceCertificate>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let cert_mac = cert.and_then(|c| c.0.0);
    let wanted = FileRequest::parse(uri.path());
    let file = uri.path().rsplit('/').next().unwrap_or_default();
    let r = Request {
        peer,
        file,
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|v| clean(v, 120))
            .unwrap_or_default(),
    };
    let throttle = s.guard.throttled(peer.ip(), Instant::now());
    match wanted {
        FileRequest::NotServed => return not_found(),
        FileRequest::Unknown => {
            if let Some(left) = throttle {
                return throttled(left);
            }
            s.miss(&r, None).await;
            return not_found();
        }
        _ => {}
    }
    let creds = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(Credentials::parse)
        .find(|c| c.realm == PROVISIONING_REALM);
    // The device whose credentials count: the file's, or for the common file the one the
    // credentials name.
    let mac = match (wanted.mac(), &creds) {
        (Some(m), _) => Some(m.clone()),
        (None, _) if cert_mac.is_some() => cert_mac.clone(),
        (None, Some(c)) => Mac::parse(&c.username),
        (None, None) => None,
    };
    let device = match &mac {
        Some(m) => match s.devices.store.device(m.as_str()).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "provisioning: device lookup failed; answering 503");
                return unavailable();
            }
        },
        None => None,
    };
    let Some(device) = device else {
        if let Some(left) = throttle {
            // Throttled: a request without credentials is challenged whether its MAC exists
            // or not (as a phone's first request is), one with credentials refused.
            return if creds.is_some() {
                throttled(left)
            } else {
                s.challenge(false)
            };
        }
        if wanted.mac().is_some() || creds.is_some() {
            // A device file of an unknown MAC, or the common file with credentials of one.
            s.miss(&r, mac.as_ref().map(Mac::as_str)).await;
            s.audit(&r, mac.as_ref().map(Mac::as_str), "-", Outcome::UnknownMac)
                .await;
            tracing::info!(src = %peer, mac = mac.as_ref().map(Mac::as_str).unwrap_or("-"),
                file = %clean(file, 80), "provisioning: unknown MAC");
            if wanted.mac().is_some() {
                return not_found();
            }
        }
        return s.challenge(false);
    };
    let target = format!("{}@{}", device.username, device.domain);
    // Its own verified certificate authenticates the device (the vendors' factory
    // certificates, chained to PROVISION_CLIENT_CA): no digest needed.
    if cert_mac.as_ref().is_some_and(|m| m.as_str() == device.mac) {
        return serve_file(&s, &r, &wanted, &device, &target).await;
    }
    let Some(c) = creds else {
        return s.challenge(false);
    };
    let path = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_string(), |p| p.as_str().to_string());
    let now = unix_now();
    let verdict = if c.username != device.mac || c.uri != path {
        // Another device's credentials, or ones made for another URL.
        Err(true)
    } else {
        match s.auth.prepare(&c, PROVISIONING_REALM, now) {
            Err(f) => Err(f.is_guess()),
            Ok(pending) => s
                .auth
                .finish(
                    pending,
                    &c,
                    "GET",
                    Some(device.prov_ha1(pending.algorithm)),
                    now,
                )
                .map_err(|(f, v)| {
                    if matches!(v, careflow_core::auth::Verdict::Challenge { stale: true }) {
                        false
                    } else {
                        f.is_guess()
                    }
                }),
        }
    };
    match verdict {
        Ok(()) => {}
        Err(guess) => {
            if let Some(left) = throttle {
                return throttled(left);
            }
            if guess {
                s.miss(&r, Some(&device.mac)).await;
                s.audit(&r, Some(&device.mac), &target, Outcome::BadCredentials)
                    .await;
            }
            return s.challenge(!guess);
        }
    }
    serve_file(&s, &r, &wanted, &device, &target).await
}

async fn serve_file(
    s: &FetchServer,
    r: &Request<'_>,
    wanted: &FileRequest,
    device: &Device,
    target: &str,
) -> Response {
    let Some(m) = model(&device.model) else {
        tracing::error!(mac = %device.mac, model = %device.model, "provisioning: device of an unknown model");
        return not_found();
    };
    // A Yealink asking for an SPA's file name (or the reverse) is not this device.
    if wanted.vendor() != Some(m.vendor) {
        return not_found();
    }
    if *wanted == FileRequest::YealinkCommon {
        s.audit(r, Some(&device.mac), target, Outcome::Served).await;
        return text(
            files::yealink_common(&s.devices.settings),
            "text/plain; charset=utf-8",
        );
    }
    match s
        .devices
        .subscribers
        .find(&device.username, &device.domain)
        .await
    {
        Ok(Some(u)) if u.enabled && device.shared && u.ha1_md5 != device.ha1_md5 => {
            tracing::error!(mac = %device.mac, user = %device.username,
                "provisioning: the device shares its user's credentials, but the user's password \
                 was changed elsewhere since; rotate the device (`careflow-sip device rotate`) \
                 to share the user's credentials again");
            return unavailable();
        }
        Ok(Some(u)) if u.enabled => {}
        Ok(_) => {
            s.audit(r, Some(&device.mac), target, Outcome::UserDisabled)
                .await;
            return (
                StatusCode::FORBIDDEN,
                "the device's user is disabled or gone\n",
            )
                .into_response();
        }
        Err(e) => {
            tracing::error!(error = %e, "provisioning: user lookup failed; answering 503");
            return unavailable();
        }
    }
    if !s.devices.key_matches(device) {
        tracing::error!(mac = %device.mac,
            "provisioning: this node's provisioning key is not the one the device's credentials \
             were made with (every node needs the same PROVISION_KEY_FILE); not serving a \
             password that would not work");
        return unavailable();
    }
    let Some(password) = s.devices.sip_password(device) else {
        return unavailable();
    };
    let config = PhoneConfig {
        device,
        model: m,
        auth_name: DeviceService::sip_auth_name(device),
        password,
        server: &s.sip,
        settings: &s.devices.settings,
    };
    let (body, content_type) = match m.vendor {
        Vendor::Yealink => (files::yealink(&config), "text/plain; charset=utf-8"),
        Vendor::CiscoSpa => (files::spa(&config), "application/xml; charset=utf-8"),
        Vendor::Grandstream => (
            files::grandstream(&config),
            "application/xml; charset=utf-8",
        ),
    };
    let now = i64::try_from(unix_now()).unwrap_or(i64::MAX);
    if let Err(e) = s
        .devices
        .store
        .device_fetched(&device.mac, now, &r.peer.to_string())
        .await
    {
        tracing::warn!(error = %e, mac = %device.mac, "provisioning: could not note the fetch");
    }
    s.audit(r, Some(&device.mac), target, Outcome::Served).await;
    text(body, content_type)
}

fn text(body: String, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // It carries a password: never kept by a cache on the way.
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}
