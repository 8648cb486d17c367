//! `careflow-sip serve`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use careflow_server::{App, ServerConfig};
use careflow_store::location::EmbeddedLocation;
use careflow_store::{LocationStore, SubscriberStore};
use careflow_transport::tls::TlsServer;
use careflow_transport::{Transport, TransportOptions};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::Config;
use crate::users::open_subscribers;

struct Status {
    app: Arc<App>,
    ready: AtomicBool,
    webhooks: Option<Arc<careflow_api::webhooks::WebhookStats>>,
    subscriber_cache: Arc<careflow_store::cached::CachedSubscribers>,
}

impl careflow_api::Status for Status {
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
    fn metrics(&self) -> String {
        let mut m = self.app.render_metrics();
        if let Some(w) = &self.webhooks {
            m.push_str(&w.render());
        }
        crate::subscriber_cache::render_metrics(&self.subscriber_cache, &mut m);
        m
    }
}

pub(crate) async fn run(
    cfg: Config,
    config_path: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // RUST_LOG wins; otherwise LOG_LEVEL, which SIGHUP can change.
    let filter = match rust_log() {
        Some(v) => EnvFilter::try_new(v).unwrap_or_else(|_| EnvFilter::new(&cfg.log_level)),
        None => EnvFilter::new(&cfg.log_level),
    };
    let (filter, log_handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_target(true)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr),
        )
        .init();
    let mut reloader = Reloader {
        values: Config::values(config_path.as_deref(), |k| std::env::var(k).ok()),
        path: config_path,
        guard: None,
        log: log_handle,
    };

    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create DATA_DIR {}", cfg.data_dir.display()))?;
    let secret = match cfg.nonce_secret {
        Some(s) => s,
        None => load_or_create_secret(&cfg.data_dir.join("secret"), "nonce secret")?,
    };
    let db = open_subscribers(&cfg).await?;
    let subscriber_rows: Arc<dyn SubscriberStore> = db.clone();
    let cached_subscribers = Arc::new(careflow_store::cached::CachedSubscribers::new(
        subscriber_rows,
        cfg.subscriber_cache_ttl,
        cfg.subscriber_cache_size,
    ));
    let subscribers: Arc<dyn SubscriberStore> = cached_subscribers.clone();
    let call_records: Arc<dyn careflow_store::calls::CallRecordStore> = db.clone();
    let audit_log: Arc<dyn careflow_store::audit::AuditStore> = db.clone();
    let audit_log_for_syslog = audit_log.clone();
    let audit_for_devices = audit_log.clone();
    let devices: Arc<dyn careflow_store::devices::DeviceStore> = db.clone();
    let events = careflow_store::events::Events::default();
    let api_keys: Arc<dyn careflow_store::ApiKeyStore> = db;
    let mut redis = None;
    let mut redis_node = None;
    let location: Arc<dyn LocationStore> = match &cfg.redis_url {
        Some(url) => {
            let mut id = [0u8; 8];
            getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            let node = careflow_proto::digest::hex(&id);
            let shared = careflow_store::redis::Redis::open(url)
                .await
                .context("cannot connect to REDIS_URL")?;
            redis = Some(shared.clone());
            redis_node = Some(node.clone());
            let store = careflow_store::redis::RedisLocation::over(shared, node.clone());
            store.remove_expired(careflow_server::unix_now()).await?;
            tracing::info!(node = %node, "registrations are shared through redis");
            Arc::new(store)
        }
        None => Arc::new(
            EmbeddedLocation::open(
                &cfg.location_path(),
                Some(&cfg.legacy_location_path()),
                careflow_server::unix_now(),
            )
            .with_context(|| {
                format!(
                    "cannot open registration journal {}",
                    cfg.location_path().display()
                )
            })?,
        ),
    };
    tracing::info!(bindings = location.count(), "location service loaded");

    let guard = cfg
        .guard
        .clone()
        .map(|g| Arc::new(careflow_core::guard::Guard::new(g)));
    let control_guard = guard.clone();
    reloader.guard = guard.clone();
    let api_guard = guard.clone();
    let device_service = crate::devices::service(&cfg, devices.clone(), subscribers.clone())?;
    let tls_for_sip = tls_server(&cfg)?;
    let server_cfg = ServerConfig {
        devices: Some(careflow_server::Devices(devices.clone())),
        guard: guard.clone(),
        domains: vec![cfg.sip_domain.clone()],
        listen: cfg.sip_listen.clone(),
        registrar: cfg.registrar,
        auth_algorithms: cfg.auth_algorithms.clone(),
        nonce_ttl_secs: cfg.nonce_ttl,
        secret,
        parse_limits: cfg.parse_limits,
        transport: TransportOptions {
            limits: cfg.transport_limits,
            tls: tls_for_sip.clone(),
            tls_client: Some(
                careflow_transport::tls::TlsClient::new(cfg.tls_ca_file.as_deref())
                    .context("invalid TLS_CA_FILE")?,
            ),
            ws: cfg.ws.clone(),
            guard,
        },
        timers: cfg.timers,
        max_transactions: cfg.max_transactions,
        server_header: format!("careflow-sip/{}", env!("CARGO_PKG_VERSION")),
        outbound_gateway: cfg.outbound_gateway.clone(),
        blf: careflow_server::BlfConfig {
            watch_policy: cfg.watch_policy.clone(),
            pickup_prefix: Some(cfg.pickup_prefix.clone()).filter(|p| !p.is_empty()),
            quirks: cfg.blf_quirks.clone(),
            state_file: Some(cfg.data_dir.join("subscriptions.json")),
        },
        allow_inbound: cfg.allow_inbound,
        scanner_user_agents: cfg.scanner_user_agents.clone(),
        keepalive: cfg.keepalive,
        media: Some(cfg.media.clone()),
        cluster: match (&cfg.cluster, redis.clone()) {
            (Some(c), Some(redis)) => Some(careflow_server::ClusterConfig {
                address: c.address,
                tls: c.tls,
                keys: careflow_core::cluster::ClusterKeys::new(c.secret, c.previous),
                nodes: careflow_store::redis::nodes::NodeKeys::new(redis.clone()),
                bus: careflow_store::redis::bus::Bus::new(redis),
            }),
            _ => None,
        },
        push: push_config(&cfg)?,
        events: events.clone(),
        cdr: cfg.cdr.map(|c| careflow_server::CdrConfig {
            store: call_records.clone(),
            node: cfg.node_name.clone(),
            max_call: c.max_call,
            retention: c.retention,
        }),
    };
    let redis_for_links = redis;
    // Live events of every node for this node's event streams.
    if let (Some(r), Some(node)) = (redis_for_links.clone(), redis_node.clone()) {
        tokio::spawn(careflow_store::events::relay(
            events.clone(),
            careflow_store::redis::bus::Bus::new(r),
            node,
        ));
    }
    crate::subscriber_cache::keep(
        cached_subscribers.clone(),
        redis_node.is_some().then(|| events.clone()),
    );
    let cancel = CancellationToken::new();
    crate::control::serve(
        &crate::control::socket_path(&cfg),
        control_guard,
        cached_subscribers.clone(),
        cancel.clone(),
    )?;
    let server = careflow_server::start(
        server_cfg,
        subscribers.clone(),
        location.clone(),
        cancel.clone(),
    )
    .await
    .context("cannot start SIP listeners (check SIP_LISTEN)")?;
    for l in &server.bound {
        tracing::info!(transport = %l.transport, addr = %l.addr, domain = %cfg.sip_domain, "sip listener bound");
    }
    let http = tokio::net::TcpListener::bind(cfg.http_listen)
        .await
        .with_context(|| format!("cannot listen on HTTP_LISTEN {}", cfg.http_listen))?;
    tracing::info!(addr = %cfg.http_listen, "http listener bound");
    if let Some((host, port, tls)) = cfg.audit_syslog.clone() {
        let syslog = careflow_api::syslog::SyslogConfig {
            host,
            port,
            tls,
            ca_file: cfg.tls_ca_file.clone(),
            hostname: cfg.node_name.clone(),
            cursor_file: cfg.data_dir.join("audit-syslog.cursor"),
        };
        tracing::info!(collector = %syslog.host, port = syslog.port, tls = syslog.tls, "the audit trail is forwarded to syslog");
        let cancel = cancel.clone();
        tokio::spawn(careflow_api::syslog::run(
            syslog,
            audit_log_for_syslog.clone(),
            async move { cancel.cancelled().await },
        ));
    }
    let webhooks = cfg.webhook.clone().map(|w| {
        let stats = Arc::new(careflow_api::webhooks::WebhookStats::default());
        let hook = careflow_api::webhooks::WebhookConfig {
            url: w.url,
            secret: w.secret,
            events: w.events,
            max_attempts: w.max_attempts,
            first_retry: std::time::Duration::from_secs(1),
        };
        tracing::info!(url = %hook.url, events = ?hook.events, "live events go to the webhook");
        let cancel = cancel.clone();
        tokio::spawn(careflow_api::webhooks::run(
            hook,
            events.clone(),
            stats.clone(),
            async move { cancel.cancelled().await },
        ));
        stats
    });
    let status = Arc::new(Status {
        app: server.app.clone(),
        ready: AtomicBool::new(false),
        webhooks,
        subscriber_cache: cached_subscribers,
    });
    let http_cancel = cancel.clone();
    let verifier = careflow_api::auth::TokenVerifier::new(cfg.jwt.clone());
    if !verifier.configured() {
        tracing::warn!(
            "AUTH_JWT_SECRET and AUTH_JWKS_URL are unset: /api/sip/* refuses every request"
        );
    }
    let api = Arc::new(careflow_api::Provisioning {
        subscribers,
        keys: api_keys,
        location,
        calls: call_records,
        audit_log,
        events: events.clone(),
        sip: sip_config(&cfg, &server.bound),
        verifier,
        limiter: careflow_api::auth::RateLimiter::new(cfg.api_rate_limit, cfg.api_rate_burst),
        user_check: cfg.user_check.clone(),
        guard: api_guard,
        // With Redis, links are shared: behind a load balancer the phone may fetch its link
        // from another node than the one that made it.
        links: match redis_for_links {
            Some(r) => careflow_api::provision_link::Links::shared(
                careflow_store::redis::links::SharedLinks::new(r),
            ),
            None => Default::default(),
        },
        push_services: [
            cfg.push.apns.as_ref().map(|_| "apns".to_string()),
            cfg.push.fcm.as_ref().map(|_| "fcm".to_string()),
        ]
        .into_iter()
        .flatten()
        .collect(),
        devices: Some(device_service.clone()),
    });
    crate::devices::serve_provisioning(
        &cfg,
        device_service,
        &server.bound,
        audit_for_devices,
        secret,
        tls_for_sip.as_ref(),
        cancel.clone(),
    )
    .await?;
    let http_task = tokio::spawn(careflow_api::serve(http, status.clone(), api, async move {
        http_cancel.cancelled().await
    }));
    status.ready.store(true, Ordering::Release);
    tracing::info!("careflow-sip ready");

    wait_for_signal(&server, &mut reloader).await;
    tracing::info!("shutting down");
    status.ready.store(false, Ordering::Release);
    server.drain(cfg.shutdown_grace).await;
    cancel.cancel();
    server.wait().await;
    let _ = http_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// How clients reach us, for the API's `sipConfig`: the first listener of each kind (never
/// the cluster's internal link).
fn sip_config(cfg: &Config, bound: &[careflow_transport::ListenSpec]) -> careflow_api::SipConfig {
    let internal = cfg.cluster.as_ref().map(|c| c.address);
    let public: Vec<careflow_transport::ListenSpec> = bound
        .iter()
        .filter(|l| Some(l.addr) != internal)
        .copied()
        .collect();
    let bound = public.as_slice();
    let port_of = |t: Transport| {
        bound
            .iter()
            .find(|l| l.transport == t)
            .map(|l| l.addr.port())
    };
    let mut transports: Vec<String> = Vec::new();
    for l in bound {
        let t = l.transport.to_string();
        if !transports.contains(&t) {
            transports.push(t);
        }
    }
    let ws_url = match (port_of(Transport::Wss), port_of(Transport::Ws)) {
        (Some(p), _) => Some(format!("wss://{}:{p}{}", cfg.sip_domain, cfg.ws.path)),
        (None, Some(p)) => Some(format!("ws://{}:{p}{}", cfg.sip_domain, cfg.ws.path)),
        _ => None,
    };
    careflow_api::SipConfig {
        domain: cfg.sip_domain.clone(),
        port: port_of(Transport::Udp)
            .or(port_of(Transport::Tcp))
            .unwrap_or(5060),
        tls_port: port_of(Transport::Tls),
        ws_url,
        transports,
    }
}

/// The TLS server for `tls:` and `wss:` listeners: the configured files, or a self-signed pair
/// generated into DATA_DIR so the default configuration serves TLS out of the box.
fn tls_server(cfg: &Config) -> anyhow::Result<Option<TlsServer>> {
    let needs_tls = cfg
        .sip_listen
        .iter()
        .any(|l| matches!(l.transport, Transport::Tls | Transport::Wss))
        || cfg.cluster.as_ref().is_some_and(|c| c.tls)
        || cfg.provision.listen.iter().any(|(tls, _)| *tls);
    if !needs_tls {
        return Ok(None);
    }
    let settings = match &cfg.tls_files {
        Some((cert, key)) => cfg.tls_settings(cert.clone(), key.clone()),
        None => {
            let (s, generated) =
                careflow_transport::tls::ensure_self_signed(&cfg.data_dir, &cfg.sip_domain)
                    .context(
                        "cannot create a self-signed TLS certificate (set TLS_CERT and TLS_KEY)",
                    )?;
            if generated {
                tracing::warn!(cert = %s.cert.display(), domain = %cfg.sip_domain,
                    "generated a self-signed TLS certificate; set TLS_CERT and TLS_KEY for one clients trust");
            }
            cfg.tls_settings(s.cert, s.key)
        }
    };
    let server = TlsServer::new(settings).context("invalid TLS_CERT / TLS_KEY / TLS_CLIENT_CA")?;
    tracing::info!(fingerprint = %server.certs.fingerprint(), "TLS certificate loaded (SHA-256)");
    Ok(Some(server))
}

/// Waits for SIGTERM or Ctrl-C; SIGHUP meanwhile reloads the TLS certificate.
async fn wait_for_signal(server: &careflow_server::RunningServer, reloader: &mut Reloader) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = tokio::signal::ctrl_c() => return,
                _ = hup.recv() => reload(server, reloader),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// What SIGHUP can change without a restart: the TLS certificate, the log filter and the
/// flood/brute-force limits. Other changed keys are named in the log as waiting for a restart.
struct Reloader {
    path: Option<std::path::PathBuf>,
    /// The values in force. A key that needs a restart keeps its old value here, so every
    /// reload says again that it waits for one.
    values: std::collections::BTreeMap<String, String>,
    guard: Option<Arc<careflow_core::guard::Guard>>,
    log: tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>,
}

/// RUST_LOG, when set to something.
fn rust_log() -> Option<String> {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

const SECURITY_KEYS: &[&str] = &[
    "security_rate_limit",
    "security_burst",
    "security_site_rate_limit",
    "security_site_burst",
    "security_ban_time",
    "security_auth_failures",
    "security_site_auth_failures",
    "security_auth_window",
    "security_allowlist",
];

/// Re-reads the configuration and applies what can be applied.
fn reload_config(r: &mut Reloader) {
    let env = |k: &str| std::env::var(k).ok();
    let cfg = match Config::load(r.path.as_deref(), env) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: the configuration has a problem; no setting was changed");
            return;
        }
    };
    let new = Config::values(r.path.as_deref(), env);
    let mut keys: Vec<&String> = new.keys().chain(r.values.keys()).collect();
    keys.sort();
    keys.dedup();
    let changed: Vec<String> = keys
        .into_iter()
        .filter(|k| new.get(*k) != r.values.get(*k))
        .cloned()
        .collect();
    let mut applied: Vec<String> = Vec::new();
    if changed.iter().any(|k| SECURITY_KEYS.contains(&k.as_str()))
        && let (Some(guard), Some(limits)) = (&r.guard, cfg.guard.clone())
    {
        guard.reconfigure(limits);
        applied.extend(
            changed
                .iter()
                .filter(|k| SECURITY_KEYS.contains(&k.as_str()))
                .cloned(),
        );
    }
    if changed.iter().any(|k| k == "log_level") {
        if rust_log().is_some() {
            tracing::warn!(
                "SIGHUP: log_level changed but RUST_LOG is set and decides the log filter"
            );
        } else {
            match r.log.reload(EnvFilter::new(&cfg.log_level)) {
                Ok(()) => applied.push("log_level".into()),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: the log filter could not be changed")
                }
            }
        }
    }
    for k in &applied {
        if let Some(v) = new.get(k) {
            r.values.insert(k.clone(), v.clone());
        }
    }
    let restart: Vec<String> = changed
        .into_iter()
        .filter(|k| !applied.contains(k) && k != "log_level")
        .map(|k| k.to_ascii_uppercase())
        .collect();
    let applied: Vec<String> = applied.iter().map(|k| k.to_ascii_uppercase()).collect();
    tracing::info!(applied = ?applied, "SIGHUP: configuration reloaded");
    if !restart.is_empty() {
        tracing::warn!(keys = ?restart, "SIGHUP: these changed settings need a restart of careflow-sip");
    }
}

fn reload(server: &careflow_server::RunningServer, reloader: &mut Reloader) {
    tracing::info!("SIGHUP: reloading");
    reload_config(reloader);
    if let Some(tls) = server.tls() {
        match tls.certs.reload() {
            Ok(fp) => tracing::info!(fingerprint = %fp, "TLS certificate reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "TLS certificate reload failed; keeping the old one")
            }
        }
    }
}

/// The nonce secret: read from `path`, or generated once and written with mode 0600.
pub(crate) fn load_or_create_secret(
    path: &std::path::Path,
    what: &str,
) -> anyhow::Result<[u8; 32]> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let t = text.trim();
        let mut out = [0u8; 32];
        if t.len() == 64 {
            for (i, o) in out.iter_mut().enumerate() {
                *o = u8::from_str_radix(&t[2 * i..2 * i + 2], 16)
                    .with_context(|| format!("{} is not 64 hex digits", path.display()))?;
            }
            return Ok(out);
        }
        anyhow::bail!(
            "{} is not 64 hex digits; remove it to generate a new {what}",
            path.display()
        );
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let hex = careflow_proto::digest::hex(&secret);
    write_private(path, hex.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    tracing::info!(path = %path.display(), "generated {what}");
    Ok(secret)
}

fn write_private(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)?.write_all(data)
}

/// The push services, set up from their validated settings (none when none is configured).
fn push_config(cfg: &Config) -> anyhow::Result<Option<careflow_server::push::PushConfig>> {
    let p = &cfg.push;
    if !p.enabled() {
        return Ok(None);
    }
    let tls =
        careflow_push::PushTls::new(cfg.tls_ca_file.as_deref()).context("invalid TLS_CA_FILE")?;
    // A service's answer is worth waiting for only within the device's wait.
    let timeout = p.wait.min(std::time::Duration::from_secs(5));
    let apns = match &p.apns {
        Some((auth, url)) => Some(Arc::new(
            careflow_push::apns::Apns::new(auth.clone(), url, tls.clone(), timeout)
                .context("invalid PUSH_APNS_URL")?,
        )),
        None => None,
    };
    let fcm = match &p.fcm {
        Some((auth, url)) => Some(Arc::new(
            careflow_push::fcm::Fcm::new(auth.clone(), url, tls, timeout)
                .context("invalid PUSH_FCM_URL or service account token_uri")?,
        )),
        None => None,
    };
    tracing::info!(
        apns = apns.is_some(),
        fcm = fcm.is_some(),
        wait_secs = p.wait.as_secs(),
        "push services configured"
    );
    Ok(Some(careflow_server::push::PushConfig {
        apns,
        fcm,
        wait: p.wait,
        refresh_before: p.refresh_before,
    }))
}
