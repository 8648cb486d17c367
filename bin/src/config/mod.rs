//! Configuration: a TOML file (`--config PATH`) and environment variables that override it.
//!
//! Every key has one name: lower case in the file, upper case in the environment
//! (`sip_domain` / `SIP_DOMAIN`). Values are parsed once, here, into typed settings; an
//! invalid value stops startup with a message naming the key. [`KEYS`] is the single list of
//! keys, defaults and documentation: `docs/configuration.md` is checked against it by a test.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use careflow_core::Transport;
use careflow_proto::digest::Algorithm;
use careflow_store::sqlite::DbUrl;
use careflow_transport::ListenSpec;

/// (key, default, description). The default "" means unset.
pub const KEYS: &[(&str, &str, &str)] = &[
    (
        "sip_domain",
        "localhost",
        "SIP domain served; also the digest realm and the domain of new users.",
    ),
    (
        "sip_listen",
        "udp:0.0.0.0:5060,tcp:0.0.0.0:5060,tls:0.0.0.0:5061,wss:0.0.0.0:8443",
        "Comma-separated SIP listeners, each `TRANSPORT:HOST:PORT` with transport `udp`, `tcp`, `tls`, `ws` or `wss` (IPv6 as `udp:[::]:5060`). `tls` and `wss` use TLS_CERT/TLS_KEY.",
    ),
    (
        "tls_cert",
        "",
        "PEM certificate chain (leaf first) for `tls` and `wss` listeners. Unset (with TLS_KEY unset): a self-signed certificate for SIP_DOMAIN is generated into DATA_DIR on first start and its SHA-256 fingerprint logged. Reloaded on SIGHUP and when the file changes.",
    ),
    (
        "tls_key",
        "",
        "PEM private key for TLS_CERT (PKCS#8, PKCS#1 or SEC1).",
    ),
    (
        "tls_ca_file",
        "",
        "Extra PEM CA bundle trusted when careflow-sip opens TLS connections itself (e.g. to OUTBOUND_GATEWAY with `transport=tls`), besides the system CAs. The peer's certificate must name the IP address dialled.",
    ),
    (
        "tls_client_ca",
        "",
        "PEM CA bundle; when set, client certificates offered on TLS listeners are verified against it.",
    ),
    (
        "tls_require_client_cert",
        "false",
        "`true`: with TLS_CLIENT_CA, TLS clients without a valid certificate are refused.",
    ),
    (
        "ws_path",
        "/",
        "HTTP path of the WebSocket upgrade on `ws` and `wss` listeners.",
    ),
    (
        "ws_allowed_origins",
        "",
        "Comma-separated Origins (e.g. `https://app.careflow.example`) allowed to open WebSocket connections. Empty: any origin.",
    ),
    (
        "ws_require_origin",
        "false",
        "`true` refuses WebSocket upgrades without an Origin header (non-browser clients send none).",
    ),
    (
        "ws_ping_interval",
        "30",
        "Seconds of silence after which a WebSocket connection is pinged; two unanswered pings close it and drop its bindings.",
    ),
    (
        "auth_jwt_secret",
        "",
        "HS256 secret for CareFlow user tokens on `/api/sip/*`. With neither this nor AUTH_JWKS_URL set, user endpoints refuse every request (401).",
    ),
    (
        "auth_jwks_url",
        "",
        "JWKS with CareFlow's token signing keys (RS256/ES256): an http(s) URL (cached, refreshed every 10 minutes and on an unknown key id) or a file path. For Firebase: `https://www.googleapis.com/service_accounts/v1/jwk/securetoken@system.gserviceaccount.com`.",
    ),
    (
        "auth_jwt_issuer",
        "",
        "Required `iss` of user tokens (Firebase: `https://securetoken.google.com/PROJECT`). Unset: not checked.",
    ),
    (
        "auth_jwt_audience",
        "",
        "Required `aud` of user tokens (Firebase: the project id). Unset: not checked.",
    ),
    (
        "auth_jwt_user_claim",
        "sub",
        "Token claim holding the CareFlow user id (`firebaseUid` in the seed is Firebase's `sub`).",
    ),
    (
        "careflow_user_check_url",
        "",
        "Optional URL asked before credentials are created (the seed's \"verify user exists in CareFlow\"): `{userId}` is replaced by the user id; 2xx allows, 404 refuses with 403, anything else or no answer within 3 s gives 503.",
    ),
    (
        "careflow_user_check_token",
        "",
        "Bearer token sent with CAREFLOW_USER_CHECK_URL requests.",
    ),
    (
        "api_rate_limit",
        "10",
        "Requests per second each API caller (user or API key) may make on average.",
    ),
    (
        "api_rate_burst",
        "30",
        "Requests an API caller may make at once before API_RATE_LIMIT applies (429 beyond).",
    ),
    (
        "rtpengine",
        "",
        "Comma-separated rtpengine ng control addresses (`127.0.0.1:22222`). Unset: media is never anchored and SDP passes untouched.",
    ),
    (
        "media_policy",
        "when-needed",
        "When calls are anchored at rtpengine: `always`, `when-needed` (a WebRTC leg meets a plain one, or a party is behind NAT) or `never`.",
    ),
    (
        "rtpengine_timeout_ms",
        "500",
        "Milliseconds to wait for one rtpengine answer (three tries); a call whose rtpengine does not answer keeps its own SDP.",
    ),
    (
        "rtpengine_check_interval",
        "60",
        "Seconds between checks that rtpengine still holds the media of each anchored call; calls it dropped (its own media timeout, e.g. both phones vanished without a BYE) are forgotten.",
    ),
    (
        "nat_keepalive_interval",
        "30",
        "Seconds between OPTIONS keep-alives to each device registered over UDP from behind NAT (its Contact is not the address it registers from); they keep the NAT mapping open. 0 disables them.",
    ),
    (
        "nat_keepalive_failures",
        "3",
        "Keep-alives in a row without an answer after which such a device's binding is removed.",
    ),
    (
        "http_listen",
        "127.0.0.1:8080",
        "Address of the HTTP server (`/healthz`, `/metrics`).",
    ),
    (
        "data_dir",
        "./data",
        "Directory for the embedded database, the registration journal and the nonce secret.",
    ),
    (
        "db_url",
        "",
        "Subscriber database. Default: `sqlite://DATA_DIR/careflow.db`.",
    ),
    (
        "redis_url",
        "",
        "`redis://HOST:PORT[/DB]`: keep registrations in Redis so several nodes share them (with a shared DB_URL and the same NONCE_SECRET). Unset: in memory with a journal in DATA_DIR.",
    ),
    (
        "nonce_secret",
        "",
        "64 hex digits used to sign digest nonces; nodes sharing a location service must share it. Default: generated once into `DATA_DIR/secret`.",
    ),
    (
        "auth_algorithms",
        "MD5",
        "Digest algorithms offered, in challenge order (`MD5`, `SHA-256`); one WWW-Authenticate header each. MD5 alone is the default because some clients (baresip 1.0) fail on any challenge they cannot answer; see docs/interop.md.",
    ),
    (
        "nonce_ttl",
        "300",
        "Seconds a nonce stays valid; older ones get `stale=true`.",
    ),
    (
        "min_expires",
        "60",
        "Shortest registration accepted, seconds (423 Interval Too Brief below).",
    ),
    (
        "max_expires",
        "3600",
        "Longest registration granted, seconds; longer requests are shortened.",
    ),
    (
        "default_expires",
        "3600",
        "Registration time when the REGISTER names none, seconds.",
    ),
    (
        "max_contacts",
        "10",
        "Most contacts per address-of-record; more is refused with 403.",
    ),
    (
        "max_message_size",
        "65536",
        "Largest SIP message accepted, bytes.",
    ),
    ("max_headers", "128", "Most header fields in one message."),
    (
        "max_connections",
        "10000",
        "Most simultaneous TCP, TLS and WebSocket connections.",
    ),
    (
        "tcp_idle_timeout",
        "3900",
        "Seconds without traffic after which a TCP, TLS or WebSocket connection is closed (bindings over it are dropped).",
    ),
    (
        "t1_ms",
        "500",
        "RFC 3261 timer T1 in milliseconds; server transactions live 64*T1.",
    ),
    (
        "worker_threads",
        "1",
        "Threads running SIP and HTTP work. One is the most CPU-efficient and handled about 10,000 registrations/s here; raise it on machines with many cores.",
    ),
    (
        "t2_ms",
        "4000",
        "RFC 3261 timer T2 in milliseconds: the longest retransmission interval.",
    ),
    (
        "t4_ms",
        "5000",
        "RFC 3261 timer T4 in milliseconds: how long a message may stay in the network.",
    ),
    (
        "timer_c",
        "181",
        "RFC 3261 timer C in seconds: a branch that rings longer is cancelled and the caller gets 408.",
    ),
    (
        "outbound_gateway",
        "",
        "SIP URI of a gateway for calls to other domains, e.g. `sip:192.0.2.10:5060;transport=udp`. Unset: such requests are refused with 403.",
    ),
    (
        "allow_inbound",
        "false",
        "`true` routes requests from other domains to our users without authentication (peering); `false` refuses them with 403.",
    ),
    (
        "security_rate_limit",
        "50",
        "SIP messages per second one flow (a UDP source address and port, or one TCP/TLS/WebSocket connection: one device, even behind a shared NAT address) may send on average; a flow above it is banned for SECURITY_BAN_TIME. 0 disables every limit and ban.",
    ),
    (
        "security_burst",
        "100",
        "SIP messages one flow may send at once before SECURITY_RATE_LIMIT applies.",
    ),
    (
        "security_site_rate_limit",
        "2000",
        "SIP messages per second one site (an IPv4 address or an IPv6 /64: every device behind one NAT) may send in all; above it messages are dropped until the rate falls, and nobody is banned.",
    ),
    (
        "security_site_burst",
        "4000",
        "SIP messages one site may send at once before SECURITY_SITE_RATE_LIMIT applies.",
    ),
    (
        "security_ban_time",
        "300",
        "Seconds a flooding or guessing flow (or a site) stays banned (its packets are dropped before parsing).",
    ),
    (
        "security_auth_failures",
        "5",
        "Failed guesses (wrong password or unknown user; never the first challenge, never a stale or reused nonce) within SECURITY_AUTH_WINDOW that ban the flow; the same count for one username from one site, or from anywhere, bans each further flow that fails for it.",
    ),
    (
        "security_site_auth_failures",
        "100",
        "Failed guesses of all flows of one site within SECURITY_AUTH_WINDOW that ban the whole site (IPv4 address or IPv6 /64). Raise it for a large site whose phones may keep old passwords after a rotation.",
    ),
    (
        "security_auth_window",
        "60",
        "Seconds over which failed authentications are counted.",
    ),
    (
        "security_allowlist",
        "",
        "Comma-separated IPs or CIDRs (e.g. `10.0.0.0/8,192.0.2.10`) never rate limited or banned: your own networks, monitoring, SBCs.",
    ),
    (
        "log_level",
        "info",
        "Log filter when RUST_LOG is unset: `error`, `warn`, `info`, `debug`, `trace`, or per target (`info,careflow::security=debug`). Reloaded on SIGHUP.",
    ),
    (
        "shutdown_grace",
        "30",
        "Seconds SIGTERM waits for calls being set up to be answered (new requests get 503 meanwhile); unanswered calls are then cancelled and their callers answered 503. Keep it below the service manager's stop timeout (the unit uses 40).",
    ),
    (
        "partial_message_timeout",
        "10",
        "Seconds within which a SIP message, TLS handshake or WebSocket upgrade must arrive whole once its first byte did; slower senders (slowloris) are disconnected.",
    ),
    (
        "max_connections_per_ip",
        "2500",
        "Most simultaneous TCP, TLS and WebSocket connections from one IP address (allow-listed ones excepted): a bound against one source taking every connection (MAX_CONNECTIONS), high enough for a whole site of phones and browser tabs behind one NAT address.",
    ),
    (
        "scanner_user_agents",
        "friendly-scanner,sipvicious,sipcli,sip-scan,sundayddr,iwar,sivus,smap,pplsip,vaxsipuseragent",
        "Comma-separated User-Agent fragments (case-insensitive) of SIP scanners; their requests are dropped without an answer. Empty: none.",
    ),
    (
        "max_transactions",
        "100000",
        "Most server transactions in progress; beyond it requests get 503.",
    ),
];

/// Typed, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// SIP domain.
    pub sip_domain: String,
    /// SIP listeners.
    pub sip_listen: Vec<ListenSpec>,
    /// HTTP listener.
    pub http_listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Subscriber database.
    pub db_url: DbUrl,
    /// Shared location service.
    pub redis_url: Option<String>,
    /// Nonce secret, when configured.
    pub nonce_secret: Option<[u8; 32]>,
    /// Digest algorithms in order.
    pub auth_algorithms: Vec<Algorithm>,
    /// Nonce lifetime.
    pub nonce_ttl: u64,
    /// Registrar limits.
    pub registrar: careflow_core::registrar::RegistrarConfig,
    /// Maximum message size.
    pub max_message_size: usize,
    /// Maximum header count.
    pub max_headers: usize,
    /// Maximum TCP connections.
    pub max_connections: usize,
    /// TCP idle timeout.
    pub tcp_idle_timeout: Duration,
    /// Timer T1.
    pub t1: Duration,
    /// Timer T2.
    pub t2: Duration,
    /// Timer T4.
    pub t4: Duration,
    /// Timer C.
    pub timer_c: Duration,
    /// Transaction bound.
    pub max_transactions: usize,
    /// Runtime worker threads.
    pub worker_threads: usize,
    /// Gateway for other domains.
    pub outbound_gateway: Option<String>,
    /// Accept requests from other domains.
    pub allow_inbound: bool,
    /// User-Agent fragments of scanners (lower case).
    pub scanner_user_agents: Vec<String>,
    /// Per-source limits and bans; None when the rate limit is 0.
    pub guard: Option<careflow_core::guard::GuardConfig>,
    /// Connections per IP.
    pub max_connections_per_ip: usize,
    /// Partial message timeout.
    pub partial_timeout: Duration,
    /// How long SIGTERM drains.
    pub shutdown_grace: Duration,
    /// The log filter (when RUST_LOG is unset).
    pub log_level: String,
    /// Certificate and key, when configured (else self-signed when a listener needs TLS).
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// CA for client certificates.
    pub tls_client_ca: Option<PathBuf>,
    /// Extra CA for servers we connect to.
    pub tls_ca_file: Option<PathBuf>,
    /// Refuse TLS clients without a certificate.
    pub tls_require_client_cert: bool,
    /// WebSocket listener rules.
    pub ws: careflow_transport::WsOptions,
    /// OPTIONS keep-alives to NATed UDP devices.
    pub keepalive: careflow_server::keepalive::KeepaliveConfig,
    /// Media anchoring.
    pub media: careflow_server::media::MediaConfig,
    /// User token verification for the API.
    pub jwt: careflow_api::auth::JwtConfig,
    /// API requests per second per caller.
    pub api_rate_limit: u32,
    /// API burst per caller.
    pub api_rate_burst: u32,
    /// CareFlow user check URL and token.
    pub user_check: Option<(String, Option<String>)>,
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// path
        path: PathBuf,
        /// cause
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// path
        path: PathBuf,
        /// parser message
        message: String,
    },
    /// A key is unknown.
    #[error("unknown configuration key `{0}` (see docs/configuration.md)")]
    UnknownKey(String),
    /// A value is invalid.
    #[error("invalid value for {key}: {message}")]
    Invalid {
        /// the key, as named in the environment
        key: String,
        /// what is wrong
        message: String,
    },
}

fn defaults() -> BTreeMap<String, String> {
    KEYS.iter()
        .filter(|(_, d, _)| !d.is_empty())
        .map(|(k, d, _)| (k.to_string(), d.to_string()))
        .collect()
}

/// The raw key values from the file and the environment, and every problem found on the way
/// (unreadable file, bad TOML, unknown keys, values of the wrong type). The first element
/// holds only the keys that were set.
fn gather(
    path: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> (BTreeMap<String, String>, Vec<ConfigError>) {
    let mut set = BTreeMap::new();
    let mut problems = Vec::new();
    if let Some(path) = path {
        match std::fs::read_to_string(path) {
            Err(e) => problems.push(ConfigError::Read {
                path: path.into(),
                source: e,
            }),
            Ok(text) => match text.parse::<toml::Table>() {
                Err(e) => problems.push(ConfigError::Syntax {
                    path: path.into(),
                    message: e.message().to_string(),
                }),
                Ok(table) => {
                    for (k, v) in table {
                        if !KEYS.iter().any(|(key, _, _)| *key == k) {
                            problems.push(ConfigError::UnknownKey(k));
                            continue;
                        }
                        let s = match v {
                            toml::Value::String(s) => s,
                            toml::Value::Integer(i) => i.to_string(),
                            toml::Value::Boolean(b) => b.to_string(),
                            toml::Value::Array(a) => a
                                .iter()
                                .map(|x| match x {
                                    toml::Value::String(s) => s.clone(),
                                    toml::Value::Integer(i) => i.to_string(),
                                    other => other.type_str().to_string(),
                                })
                                .collect::<Vec<_>>()
                                .join(","),
                            other => {
                                problems.push(invalid(
                                    &k,
                                    format!(
                                        "expected a string, number or list, got {}",
                                        other.type_str()
                                    ),
                                ));
                                continue;
                            }
                        };
                        set.insert(k, s);
                    }
                }
            },
        }
    }
    for (k, _, _) in KEYS {
        if let Some(v) = env(&k.to_ascii_uppercase()) {
            set.insert(k.to_string(), v);
        }
    }
    (set, problems)
}

impl Config {
    /// Loads the file (if any) and applies environment overrides from `env`; stops at the
    /// first problem.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let (set, mut problems) = gather(path, &env);
        if !problems.is_empty() {
            return Err(problems.remove(0));
        }
        let mut raw = defaults();
        raw.extend(set);
        Self::from_raw(&raw)
    }

    /// Every key's value in force (defaults, then the file, then the environment), to tell
    /// what a reload changed.
    pub fn values(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> BTreeMap<String, String> {
        let (set, _) = gather(path, &env);
        let mut raw = defaults();
        raw.extend(set);
        raw
    }

    /// Every problem of a configuration at once (for `careflow-sip check-config`): each key
    /// set is checked on its own against the defaults, then the whole for what keys say about
    /// each other. Empty when the configuration is valid.
    pub fn check(path: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Vec<ConfigError> {
        let (set, mut problems) = gather(path, &env);
        let mut seen: Vec<String> = problems.iter().map(ToString::to_string).collect();
        // Keys only meaningful together are checked together.
        const GROUPS: &[&[&str]] = &[
            &["tls_cert", "tls_key"],
            &["tls_client_ca", "tls_require_client_cert"],
            &["min_expires", "max_expires", "default_expires"],
        ];
        for k in set.keys() {
            let group = GROUPS
                .iter()
                .find(|g| g.contains(&k.as_str()))
                .copied()
                .unwrap_or(&[]);
            let mut raw = defaults();
            for (key, v) in &set {
                if key == k || group.contains(&key.as_str()) {
                    raw.insert(key.clone(), v.clone());
                }
            }
            if let Err(e) = Self::from_raw(&raw) {
                let text = e.to_string();
                if !seen.contains(&text) {
                    seen.push(text);
                    problems.push(e);
                }
            }
        }
        let mut raw = defaults();
        raw.extend(set);
        if let Err(e) = Self::from_raw(&raw)
            && !seen.contains(&e.to_string())
        {
            problems.push(e);
        }
        problems
    }

    fn from_raw(raw: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let get = |k: &str| raw.get(k).map(|s| s.trim()).unwrap_or("");
        let sip_domain = get("sip_domain").to_ascii_lowercase();
        if sip_domain.is_empty()
            || !sip_domain.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || b == b'-'
                    || b == b'.'
                    || b == b':'
                    || b == b'['
                    || b == b']'
            })
        {
            return Err(invalid(
                "sip_domain",
                "expected a host name such as sip.example.com",
            ));
        }
        let sip_listen = parse_listen(get("sip_listen"))?;
        let bool_key = |k: &str| match get(k) {
            "true" | "yes" | "1" => Ok(true),
            "false" | "no" | "0" => Ok(false),
            other => Err(invalid(k, format!("expected true or false, got `{other}`"))),
        };
        let path_key = |k: &str| match get(k) {
            "" => None,
            p => Some(PathBuf::from(p)),
        };
        let tls_files = match (path_key("tls_cert"), path_key("tls_key")) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => return Err(invalid("tls_key", "TLS_CERT is set, TLS_KEY is not")),
            (None, Some(_)) => return Err(invalid("tls_cert", "TLS_KEY is set, TLS_CERT is not")),
        };
        let tls_client_ca = path_key("tls_client_ca");
        let tls_ca_file = path_key("tls_ca_file");
        let tls_require_client_cert = bool_key("tls_require_client_cert")?;
        if tls_require_client_cert && tls_client_ca.is_none() {
            return Err(invalid(
                "tls_require_client_cert",
                "needs TLS_CLIENT_CA to verify client certificates against",
            ));
        }
        let ws_path = get("ws_path").to_string();
        if !ws_path.starts_with('/') || ws_path.contains(char::is_whitespace) {
            return Err(invalid(
                "ws_path",
                format!("`{ws_path}` is not a path such as /"),
            ));
        }
        let origins: Vec<String> = get("ws_allowed_origins")
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_string())
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
        let http_listen = get("http_listen").parse().map_err(|_| {
            invalid(
                "http_listen",
                format!(
                    "expected HOST:PORT such as 127.0.0.1:8080, got `{}`",
                    get("http_listen")
                ),
            )
        })?;
        let data_dir = PathBuf::from(get("data_dir"));
        if data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        let db_url = match get("db_url") {
            "" => DbUrl::Sqlite(data_dir.join("careflow.db")),
            url => DbUrl::parse(url).map_err(|m| invalid("db_url", m))?,
        };
        let nonce_secret = match get("nonce_secret") {
            "" => None,
            s => Some(
                parse_secret(s).ok_or_else(|| invalid("nonce_secret", "expected 64 hex digits"))?,
            ),
        };
        let mut auth_algorithms = Vec::new();
        for a in get("auth_algorithms")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let alg = Algorithm::from_token(Some(a)).ok_or_else(|| {
                invalid(
                    "auth_algorithms",
                    format!("unknown algorithm `{a}` (use MD5 and/or SHA-256)"),
                )
            })?;
            if !auth_algorithms.contains(&alg) {
                auth_algorithms.push(alg);
            }
        }
        if auth_algorithms.is_empty() {
            return Err(invalid("auth_algorithms", "at least one of MD5, SHA-256"));
        }
        let num = |k: &str, min: u64, max: u64| -> Result<u64, ConfigError> {
            let v = get(k);
            let n: u64 = v
                .parse()
                .map_err(|_| invalid(k, format!("expected a whole number, got `{v}`")))?;
            if n < min || n > max {
                return Err(invalid(k, format!("{n} is out of range {min}..={max}")));
            }
            Ok(n)
        };
        let registrar = careflow_core::registrar::RegistrarConfig {
            min_expires: num("min_expires", 1, 86_400)? as u32,
            max_expires: num("max_expires", 1, 604_800)? as u32,
            default_expires: num("default_expires", 1, 604_800)? as u32,
            max_contacts: num("max_contacts", 1, 1000)? as usize,
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
        let ws = careflow_transport::WsOptions {
            path: ws_path,
            allowed_origins: (!origins.is_empty()).then_some(origins),
            require_origin: bool_key("ws_require_origin")?,
            ping_interval: Duration::from_secs(num("ws_ping_interval", 1, 3600)?),
        };
        let keepalive = careflow_server::keepalive::KeepaliveConfig {
            interval: Duration::from_secs(num("nat_keepalive_interval", 0, 3600)?),
            max_failures: num("nat_keepalive_failures", 1, 100)? as u32,
        };
        let opt = |k: &str| Some(get(k).to_string()).filter(|v| !v.is_empty());
        let jwt = careflow_api::auth::JwtConfig {
            hs256_secret: match opt("auth_jwt_secret") {
                Some(s) if s.len() < 32 => {
                    return Err(invalid(
                        "auth_jwt_secret",
                        "must be at least 32 characters (HS256 needs a long secret)",
                    ));
                }
                s => s.map(String::into_bytes),
            },
            jwks: opt("auth_jwks_url"),
            issuer: opt("auth_jwt_issuer"),
            audience: opt("auth_jwt_audience"),
            user_claim: match opt("auth_jwt_user_claim") {
                Some(c) => c,
                None => return Err(invalid("auth_jwt_user_claim", "must not be empty")),
            },
        };
        let user_check = match opt("careflow_user_check_url") {
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
                Some((u, opt("careflow_user_check_token")))
            }
            Some(u) => {
                return Err(invalid(
                    "careflow_user_check_url",
                    format!("`{u}` is not an http(s) URL"),
                ));
            }
            None => None,
        };
        let mut allowlist = Vec::new();
        for item in get("security_allowlist")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            allowlist.push(
                item.parse::<careflow_core::guard::Cidr>()
                    .map_err(|e| invalid("security_allowlist", e))?,
            );
        }
        let rate = num("security_rate_limit", 0, 1_000_000)? as u32;
        let guard = (rate > 0).then_some(careflow_core::guard::GuardConfig {
            rate,
            burst: num("security_burst", 1, 10_000_000)? as u32,
            site_rate: num("security_site_rate_limit", 1, 10_000_000)? as u32,
            site_burst: num("security_site_burst", 1, 100_000_000)? as u32,
            site_auth_failures: num("security_site_auth_failures", 1, 10_000_000)? as u32,
            ban_time: Duration::from_secs(num("security_ban_time", 1, 86_400 * 30)?),
            auth_failures: num("security_auth_failures", 1, 10_000)? as u32,
            auth_window: Duration::from_secs(num("security_auth_window", 1, 86_400)?),
            allowlist,
            ..careflow_core::guard::GuardConfig::default()
        });
        let mut rtpengine = Vec::new();
        for item in get("rtpengine")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            rtpengine.push(item.parse().map_err(|_| {
                invalid(
                    "rtpengine",
                    format!("`{item}` is not HOST:PORT such as 127.0.0.1:22222"),
                )
            })?);
        }
        let media = careflow_server::media::MediaConfig {
            rtpengine,
            policy: match get("media_policy") {
                "always" => careflow_core::media::Policy::Always,
                "when-needed" => careflow_core::media::Policy::WhenNeeded,
                "never" => careflow_core::media::Policy::Never,
                other => {
                    return Err(invalid(
                        "media_policy",
                        format!("expected always, when-needed or never, got `{other}`"),
                    ));
                }
            },
            timeout: Duration::from_millis(num("rtpengine_timeout_ms", 10, 10_000)?),
            check_interval: Duration::from_secs(num("rtpengine_check_interval", 1, 86_400)?),
        };
        Ok(Self {
            media,
            guard,
            max_connections_per_ip: num("max_connections_per_ip", 1, 1_000_000)? as usize,
            partial_timeout: Duration::from_secs(num("partial_message_timeout", 1, 600)?),
            shutdown_grace: Duration::from_secs(num("shutdown_grace", 0, 3600)?),
            log_level: {
                let l = get("log_level");
                if tracing_subscriber::EnvFilter::try_new(l).is_err() {
                    return Err(invalid(
                        "log_level",
                        format!(
                            "`{l}` is not a log filter such as info or warn,careflow::security=info"
                        ),
                    ));
                }
                l.to_string()
            },
            user_check,
            jwt,
            api_rate_limit: num("api_rate_limit", 1, 100_000)? as u32,
            api_rate_burst: num("api_rate_burst", 1, 100_000)? as u32,
            keepalive,
            tls_files,
            tls_client_ca,
            tls_ca_file,
            tls_require_client_cert,
            ws,
            sip_domain,
            sip_listen,
            http_listen,
            data_dir,
            db_url,
            redis_url: match get("redis_url") {
                "" => None,
                u if u.starts_with("redis://") || u.starts_with("rediss://") => Some(u.to_string()),
                u => {
                    return Err(invalid("redis_url", format!("`{u}` is not a redis:// URL")));
                }
            },
            nonce_secret,
            auth_algorithms,
            nonce_ttl: num("nonce_ttl", 10, 86_400)?,
            registrar,
            max_message_size: num("max_message_size", 1024, 1 << 20)? as usize,
            max_headers: num("max_headers", 16, 10_000)? as usize,
            max_connections: num("max_connections", 1, 1_000_000)? as usize,
            tcp_idle_timeout: Duration::from_secs(num("tcp_idle_timeout", 1, 86_400)?),
            t1: Duration::from_millis(num("t1_ms", 10, 10_000)?),
            t2: Duration::from_millis(num("t2_ms", 100, 60_000)?),
            t4: Duration::from_millis(num("t4_ms", 100, 60_000)?),
            timer_c: Duration::from_secs(num("timer_c", 1, 3600)?),
            max_transactions: num("max_transactions", 100, 10_000_000)? as usize,
            worker_threads: num("worker_threads", 1, 256)? as usize,
            outbound_gateway: match get("outbound_gateway") {
                "" => None,
                g => {
                    let u = careflow_proto::Uri::parse(g)
                        .filter(|u| u.is_sip() && u.host.ip().is_some())
                        .ok_or_else(|| invalid("outbound_gateway", format!("`{g}` is not a SIP URI with an IP address, e.g. sip:192.0.2.10:5060")))?;
                    Some(u.raw.to_string())
                }
            },
            scanner_user_agents: get("scanner_user_agents")
                .split(',')
                .map(|f| f.trim().to_ascii_lowercase())
                .filter(|f| !f.is_empty())
                .collect(),
            allow_inbound: match get("allow_inbound") {
                "true" | "yes" | "1" => true,
                "false" | "no" | "0" => false,
                other => {
                    return Err(invalid(
                        "allow_inbound",
                        format!("expected true or false, got `{other}`"),
                    ));
                }
            },
        })
    }

    /// TLS settings for a certificate and key, with the configured client-certificate rules.
    pub fn tls_settings(
        &self,
        cert: PathBuf,
        key: PathBuf,
    ) -> careflow_transport::tls::TlsSettings {
        careflow_transport::tls::TlsSettings {
            cert,
            key,
            client_ca: self.tls_client_ca.clone(),
            require_client_cert: self.tls_require_client_cert,
        }
    }

    /// Path of the registration journal.
    pub fn location_path(&self) -> PathBuf {
        self.data_dir.join("location.db")
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_ascii_uppercase(),
        message: message.into(),
    }
}

fn parse_listen(s: &str) -> Result<Vec<ListenSpec>, ConfigError> {
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

fn parse_secret(s: &str) -> Option<[u8; 32]> {
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

#[cfg(test)]
mod tests;
