//! A local push service for the tests: HTTP/2 over TLS, speaking the APNs and FCM HTTP v1
//! request contracts and checking them (the provider JWT against the test key with its kid,
//! iss and iat; topic, push type, priority, expiration and the token in the path; the OAuth2
//! JWT-bearer assertion and the bearer token it issued). Every push it accepts is recorded
//! for the test, which plays the phone: it waits for the push and registers again. A token
//! can be made to be refused as a real service refuses it.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../push/testdata");
/// The APNs key id and team id the test key is configured with.
pub const APNS_KEY_ID: &str = "TESTKEY123";
pub const APNS_TEAM_ID: &str = "TEAM123456";
/// The FCM project of the test service account.
pub const FCM_PROJECT: &str = "careflow-test";

/// One push the service accepted.
#[derive(Debug, Clone)]
pub struct Push {
    /// `apns` or `fcm`.
    pub service: &'static str,
    /// The device token it was sent to.
    pub token: String,
    /// The request headers (lower-case names).
    pub headers: HashMap<String, String>,
    /// The JSON body.
    pub body: serde_json::Value,
    /// When it arrived.
    pub at: Instant,
}

#[derive(Default)]
struct State {
    pushes: Mutex<Vec<Push>>,
    arrived: Condvar,
    violations: Mutex<Vec<String>>,
    refuse: Mutex<HashMap<String, (u16, String)>>,
    issued: Mutex<HashSet<String>>,
    token_requests: AtomicUsize,
    token_uri: Mutex<String>,
}

/// The running service.
pub struct PushService {
    /// Where it listens (https://127.0.0.1:PORT).
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    state: Arc<State>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl PushService {
    /// Starts the service on 127.0.0.1 (a thread of its own) with a CA of its own.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "careflow test push CA");
        let ca_cert = ca.self_signed(&ca_key).expect("CA");
        let leaf_key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .expect("params")
            .signed_by(&leaf_key, &ca_cert, &ca_key)
            .expect("leaf");
        std::fs::write(dir.path().join("push-ca.crt"), ca_cert.pem()).expect("write CA");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .expect("cert");
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State::default());
        let token_uri = format!("https://{addr}/token");
        *state.token_uri.lock().unwrap() = token_uri.clone();

        std::fs::copy(
            Path::new(TESTDATA).join("apns-test-key.p8"),
            dir.path().join("apns.p8"),
        )
        .expect("copy the APNs key");
        let mut account: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(Path::new(TESTDATA).join("fcm-test-service-account.json"))
                .expect("service account"),
        )
        .expect("JSON");
        account["token_uri"] = serde_json::Value::String(token_uri);
        std::fs::write(dir.path().join("fcm.json"), account.to_string()).expect("write");

        let st = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let (acceptor, st) = (acceptor.clone(), st.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let svc = hyper::service::service_fn(move |req| {
                            let st = st.clone();
                            async move { Ok::<_, Infallible>(handle(&st, req).await) }
                        });
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                    });
                }
            });
        });
        Self { addr, dir, state }
    }

    /// The server settings that push through this service (both APNs and FCM).
    pub fn env(&self) -> Vec<(String, String)> {
        let d = self.dir.path();
        vec![
            (
                "PUSH_APNS_KEY_FILE".into(),
                d.join("apns.p8").display().to_string(),
            ),
            ("PUSH_APNS_KEY_ID".into(), APNS_KEY_ID.into()),
            ("PUSH_APNS_TEAM_ID".into(), APNS_TEAM_ID.into()),
            ("PUSH_APNS_URL".into(), format!("https://{}", self.addr)),
            (
                "PUSH_FCM_SERVICE_ACCOUNT_FILE".into(),
                d.join("fcm.json").display().to_string(),
            ),
            ("PUSH_FCM_URL".into(), format!("https://{}", self.addr)),
            ("TLS_CA_FILE".into(), self.ca_file().display().to_string()),
        ]
    }

    /// The CA the service's certificate chains to.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("push-ca.crt")
    }

    /// Pushes to `token` are refused with `status` and `reason` from now on.
    pub fn refuse(&self, token: &str, status: u16, reason: &str) {
        self.state
            .refuse
            .lock()
            .unwrap()
            .insert(token.to_string(), (status, reason.to_string()));
    }

    /// Every push accepted so far.
    pub fn pushes(&self) -> Vec<Push> {
        self.state.pushes.lock().unwrap().clone()
    }

    /// Pushes accepted so far for `token`.
    pub fn pushes_to(&self, token: &str) -> Vec<Push> {
        self.pushes()
            .into_iter()
            .filter(|p| p.token == token)
            .collect()
    }

    /// Waits up to `timeout` for the `n`th push (counting from 1) to `token`.
    pub fn wait_push(&self, token: &str, n: usize, timeout: Duration) -> Option<Push> {
        let deadline = Instant::now() + timeout;
        let mut pushes = self.state.pushes.lock().unwrap();
        loop {
            if let Some(p) = pushes.iter().filter(|p| p.token == token).nth(n - 1) {
                return Some(p.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            pushes = self.state.arrived.wait_timeout(pushes, left).unwrap().0;
        }
    }

    /// Requests that broke the services' contracts (none is the goal).
    pub fn violations(&self) -> Vec<String> {
        self.state.violations.lock().unwrap().clone()
    }

    /// How many OAuth2 access tokens were asked for.
    pub fn token_requests(&self) -> usize {
        self.state.token_requests.load(Ordering::Relaxed)
    }
}

fn reply(status: u16, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

async fn handle(st: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let headers: HashMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                v.to_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(400, serde_json::json!({"reason": "BadBody"})),
    };
    let violation = |why: String| {
        st.violations.lock().unwrap().push(why.clone());
        why
    };
    if let Some(token) = path.strip_prefix("/3/device/") {
        return match check_apns(&headers) {
            Err(why) => {
                violation(format!("APNs: {why}"));
                reply(403, serde_json::json!({"reason": "InvalidProviderToken"}))
            }
            Ok(()) => accept(st, "apns", token, headers, &body),
        };
    }
    if path == "/token" {
        st.token_requests.fetch_add(1, Ordering::Relaxed);
        let uri = st.token_uri.lock().unwrap().clone();
        return match check_assertion(&body, &uri) {
            Err(why) => {
                violation(format!("OAuth2: {why}"));
                reply(400, serde_json::json!({"error": "invalid_grant"}))
            }
            Ok(()) => {
                let n = st.token_requests.load(Ordering::Relaxed);
                let token = format!("ya29.test-{n}");
                st.issued.lock().unwrap().insert(token.clone());
                reply(
                    200,
                    serde_json::json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"}),
                )
            }
        };
    }
    if path == format!("/v1/projects/{FCM_PROJECT}/messages:send") {
        let bearer = headers
            .get("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !st.issued.lock().unwrap().contains(bearer) {
            violation(format!("FCM: bearer `{bearer}` was not issued"));
            return reply(
                401,
                serde_json::json!({"error": {"status": "UNAUTHENTICATED"}}),
            );
        }
        let msg: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let token = msg["message"]["token"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if let Err(why) = check_fcm(&msg) {
            violation(format!("FCM: {why}"));
            return reply(
                400,
                serde_json::json!({"error": {"status": "INVALID_ARGUMENT"}}),
            );
        }
        return accept(st, "fcm", &token, headers, &body);
    }
    violation(format!("unknown path {path}"));
    reply(404, serde_json::json!({"reason": "BadPath"}))
}

/// Records an accepted push, or refuses it as configured.
fn accept(
    st: &State,
    service: &'static str,
    token: &str,
    headers: HashMap<String, String>,
    body: &[u8],
) -> Response<Full<Bytes>> {
    if let Some((status, reason)) = st.refuse.lock().unwrap().get(token).cloned() {
        return if service == "apns" {
            reply(status, serde_json::json!({"reason": reason}))
        } else {
            reply(
                status,
                serde_json::json!({"error": {"status": reason, "message": "The registration token is not a valid FCM registration token"}}),
            )
        };
    }
    st.pushes.lock().unwrap().push(Push {
        service,
        token: token.to_string(),
        headers,
        body: serde_json::from_slice(body).unwrap_or_default(),
        at: Instant::now(),
    });
    st.arrived.notify_all();
    reply(200, serde_json::json!({}))
}

fn check_apns(h: &HashMap<String, String>) -> Result<(), String> {
    let jwt = h
        .get("authorization")
        .and_then(|a| a.strip_prefix("bearer "))
        .ok_or("no `authorization: bearer` header")?;
    let pem =
        std::fs::read(Path::new(TESTDATA).join("apns-test-key.pub")).map_err(|e| e.to_string())?;
    let key = DecodingKey::from_ec_pem(&pem).map_err(|e| e.to_string())?;
    let mut v = Validation::new(Algorithm::ES256);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    #[derive(serde::Deserialize)]
    struct Claims {
        iss: String,
        iat: u64,
    }
    let data = jsonwebtoken::decode::<Claims>(jwt, &key, &v).map_err(|e| format!("JWT: {e}"))?;
    if data.header.kid.as_deref() != Some(APNS_KEY_ID) {
        return Err(format!("kid {:?}", data.header.kid));
    }
    if data.claims.iss != APNS_TEAM_ID {
        return Err(format!("iss {}", data.claims.iss));
    }
    if unix_now().abs_diff(data.claims.iat) > 3600 {
        return Err(format!("iat {} is older than an hour", data.claims.iat));
    }
    let get = |k: &str| h.get(k).map(String::as_str).unwrap_or_default();
    match get("apns-push-type") {
        "voip" if get("apns-topic").ends_with(".voip") && get("apns-priority") == "10" => {}
        "background" if !get("apns-topic").ends_with(".voip") && get("apns-priority") == "5" => {}
        t => {
            return Err(format!(
                "push type `{t}` with topic `{}` and priority `{}`",
                get("apns-topic"),
                get("apns-priority")
            ));
        }
    }
    if get("apns-expiration") != "0" {
        return Err(format!("apns-expiration `{}`", get("apns-expiration")));
    }
    Ok(())
}

fn check_assertion(form: &[u8], token_uri: &str) -> Result<(), String> {
    let form = String::from_utf8_lossy(form);
    let assertion = form
        .strip_prefix("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=")
        .ok_or_else(|| format!("not a JWT bearer grant: {form}"))?;
    let pem =
        std::fs::read(Path::new(TESTDATA).join("fcm-test-key.pub")).map_err(|e| e.to_string())?;
    let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| e.to_string())?;
    let mut v = Validation::new(Algorithm::RS256);
    v.set_audience(&[token_uri]);
    #[derive(serde::Deserialize)]
    struct Claims {
        iss: String,
        scope: String,
    }
    let c = jsonwebtoken::decode::<Claims>(assertion, &key, &v)
        .map_err(|e| format!("assertion: {e}"))?
        .claims;
    if c.iss != "push@careflow-test.iam.gserviceaccount.com"
        || c.scope != "https://www.googleapis.com/auth/firebase.messaging"
    {
        return Err(format!("iss {} scope {}", c.iss, c.scope));
    }
    Ok(())
}

fn check_fcm(msg: &serde_json::Value) -> Result<(), String> {
    let m = &msg["message"];
    if m["token"].as_str().is_none_or(str::is_empty) {
        return Err("no message.token".into());
    }
    if m["android"]["priority"] != "high" {
        return Err(format!("android.priority {}", m["android"]["priority"]));
    }
    let data = m["data"].as_object().ok_or("no data")?;
    if !data.values().all(serde_json::Value::is_string) {
        return Err("data values must be strings".into());
    }
    Ok(())
}
