//! The SIP application of careflow-sip: wires the transports, the sans-IO logic of
//! `careflow-core` and the stores together.
//!
//! Modules form layers and never import upwards (scripts/check-module-cycles):
//! - state and sending: [`app`] (the application's state, `reply`/`send_*`), [`routing`]
//!   (where responses go; the caller's way back and a branch's target), `interfaces` (our
//!   listeners and which faces a peer), `cluster` (this node's identity, owner routes and
//!   view of the other nodes), `config`, `clock`,
//!   [`metrics`], `flows`, [`rtpengine`];
//! - handlers: `auth` (digest for registrar and proxy), [`register`], `proxy` (drives
//!   `careflow_core::proxy::ProxyTable`), [`media`], [`keepalive`], `drain`;
//! - `dispatch`: where every message from the transports enters and is sent to a handler.
#![warn(missing_docs)]

pub mod app;
mod auth;
mod blf;
mod call_records;
mod cdr;
mod clock;
mod cluster;
mod config;
mod dispatch;
mod drain;
mod flows;
mod interfaces;
pub mod keepalive;
pub mod media;
pub mod metrics;
mod proxy;
pub mod push;
mod push_upkeep;
pub mod register;
mod ringing;
pub mod routing;
pub mod rtpengine;
mod watchers;

use std::sync::Arc;
use std::time::Duration;

use careflow_core::auth::Authenticator;
use careflow_core::nonce::NonceIssuer;
use careflow_core::transaction::ServerTransactions;
use careflow_store::{LocationStore, SubscriberStore};
use careflow_transport::{ListenSpec, TransportError, Transports};
use tokio_util::sync::CancellationToken;

pub use app::App;
pub use clock::unix_now;
pub use config::{BlfConfig, CdrConfig, ClusterConfig, Devices, PushConfig, ServerConfig};
pub use metrics::{Gauges, Metrics};

/// A running SIP server.
#[derive(Debug)]
pub struct RunningServer {
    /// The application (metrics and gauges are read from it).
    pub app: Arc<App>,
    /// The bound listeners (port 0 resolved).
    pub bound: Vec<ListenSpec>,
    transports: Transports,
    tasks: tokio::task::JoinSet<()>,
}

impl RunningServer {
    /// The TLS server, when a listener uses TLS (for certificate reloads).
    pub fn tls(&self) -> Option<&careflow_transport::tls::TlsServer> {
        self.transports.tls()
    }

    /// Drains before a shutdown (see the `drain` module): returns when nothing is in progress
    /// or `grace` is over and what was left has been answered.
    pub async fn drain(&self, grace: Duration) {
        self.app.drain(grace).await;
    }

    /// Waits until the transports and background tasks have stopped (after cancel).
    pub async fn wait(mut self) {
        self.transports.closed().await;
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Binds the listeners and starts serving until `cancel` fires.
pub async fn start(
    cfg: ServerConfig,
    subscribers: Arc<dyn SubscriberStore>,
    location: Arc<dyn LocationStore>,
    cancel: CancellationToken,
) -> Result<RunningServer, TransportError> {
    let mut counter = [0u8; 8];
    let _ = getrandom::fill(&mut counter);
    let auth = Authenticator::new(
        NonceIssuer::new(cfg.secret, cfg.nonce_ttl_secs, u64::from_le_bytes(counter)),
        cfg.auth_algorithms.clone(),
        // Nonces issued within NONCE_TTL whose counts are remembered: 4 bytes each once a
        // nonce of their block is used (16 MB at most); 13,000 challenges a second for 300 s.
        4_000_000,
    );
    let txs = ServerTransactions::new(cfg.timers, cfg.max_transactions);
    let app = Arc::new_cyclic(|weak| {
        App::new(cfg.clone(), auth, txs, subscribers, location, weak.clone())
    });
    let mut listen = cfg.listen.clone();
    if let Some(c) = &cfg.cluster {
        // The internal link: other nodes hand us requests for the devices we hold.
        let internal = ListenSpec {
            transport: if c.tls {
                careflow_core::Transport::Tls
            } else {
                careflow_core::Transport::Tcp
            },
            addr: c.address,
        };
        if !listen.contains(&internal) {
            listen.push(internal);
        }
    }
    let (transports, bound) =
        Transports::start(&listen, cfg.transport.clone(), app.clone(), cancel.clone()).await?;
    app.set_transports(transports.clone(), bound.clone());
    if let Some(m) = cfg.media.as_ref().filter(|m| !m.rtpengine.is_empty()) {
        match rtpengine::RtpEngine::start(m.rtpengine.clone(), m.timeout, cancel.clone()).await {
            Ok(engine) => {
                app.media.set_engine(engine);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot open the rtpengine control socket; calls keep their own SDP")
            }
        }
    }
    app.drop_orphaned_flows().await;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(sweep_transactions(app.clone(), cancel.clone()));
    tasks.spawn(sweep_bindings(app.clone(), cancel.clone()));
    tasks.spawn(proxy_timers(app.clone(), cancel.clone()));
    tasks.spawn(push_upkeep::run(app.clone(), cancel.clone()));
    tasks.spawn(blf::run(app.clone(), cancel.clone()));
    tasks.spawn(cdr::run(app.clone(), cancel.clone()));
    tasks.spawn(keepalive::run(app.clone(), cfg.keepalive, cancel.clone()));
    if let Some(c) = app.cluster.clone() {
        let (registered, elsewhere) = tokio::sync::mpsc::channel(1024);
        let (lamps, lamps_elsewhere) = tokio::sync::mpsc::channel(4096);
        let heard = cluster::Heard { registered, lamps };
        tasks.spawn(c.run(cfg.guard.clone(), heard, cancel.clone()));
        tasks.spawn(late_fork_for_the_cluster(app.clone(), elsewhere));
        tasks.spawn(blf::lamps_of_other_nodes(app.clone(), lamps_elsewhere));
    }
    if let Some(m) = cfg.media.as_ref()
        && app.media.engine().is_some()
    {
        tasks.spawn(media::check_calls(
            app.media.clone(),
            m.check_interval,
            cancel.clone(),
        ));
    }
    Ok(RunningServer {
        app,
        bound,
        transports,
        tasks,
    })
}

/// Drops finished transactions. One coarse timer for the whole table: waking at every
/// deadline would mean thousands of wake-ups per second under load, and Timer J (32 s) does
/// not need better than a second of precision.
async fn sweep_transactions(app: Arc<App>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => app.expire_transactions(std::time::Instant::now()),
        }
    }
}

/// Drives the proxy's client and INVITE server transactions (Timers A-M).
async fn proxy_timers(app: Arc<App>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(proxy::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => app.proxy_tick(std::time::Instant::now()),
        }
    }
}

/// Registrations of new flows on other nodes: calls ringing here gain branches to them.
async fn late_fork_for_the_cluster(
    app: Arc<App>,
    mut elsewhere: tokio::sync::mpsc::Receiver<String>,
) {
    while let Some(aor) = elsewhere.recv().await {
        app.presence_recheck_soon(&aor);
        if app.ringing.has(&aor) {
            app.late_fork(&aor).await;
        }
    }
}

/// Removes expired bindings and replay state.
async fn sweep_bindings(app: Arc<App>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => app.sweep(unix_now()).await,
        }
    }
}
