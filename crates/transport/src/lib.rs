//! SIP transports: UDP sockets and TCP, TLS, WebSocket and secure WebSocket connections.
//!
//! Turns bytes into [`Inbound`] messages for the application and sends [`Outbound`] ones.
//! TCP/TLS streams are framed with `careflow_proto::framing`, WebSockets with
//! `careflow_proto::websocket`; the connection table lets responses and later requests reuse
//! the connection a device registered over, and the application is told when one closes.
#![warn(missing_docs)]

mod conn;
mod icmp;
mod mmsg;
mod outbox;
mod sockbuf;
mod stream;
pub mod tls;
mod tls_stream;
mod udp;
mod udp_socket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
pub use careflow_core::Transport;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use conn::ConnId;
use conn::ConnTable;

/// A listener to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenSpec {
    /// udp, tcp, tls, ws or wss.
    pub transport: Transport,
    /// Address to bind.
    pub addr: SocketAddr,
}

/// Limits applied by the transports.
#[derive(Debug, Clone, Copy)]
pub struct TransportLimits {
    /// Largest message accepted.
    pub max_message_size: usize,
    /// Most simultaneous stream connections.
    pub max_connections: usize,
    /// Most simultaneous stream connections from one IP address.
    pub max_connections_per_ip: usize,
    /// A message (or TLS/WebSocket handshake) must be complete this long after its first byte.
    pub partial_timeout: std::time::Duration,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: std::time::Duration,
}

impl Default for TransportLimits {
    fn default() -> Self {
        Self {
            max_message_size: 64 * 1024,
            max_connections: 10_000,
            max_connections_per_ip: 2500,
            partial_timeout: std::time::Duration::from_secs(10),
            idle_timeout: std::time::Duration::from_secs(3900),
        }
    }
}

/// WebSocket listener rules (RFC 7118).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsOptions {
    /// Request path of the upgrade (`/` by default).
    pub path: String,
    /// Origins allowed to connect; `None`: any.
    pub allowed_origins: Option<Vec<String>>,
    /// Refuse upgrades without an Origin header (non-browser clients send none).
    pub require_origin: bool,
    /// A connection quiet this long is pinged; two unanswered pings close it.
    pub ping_interval: std::time::Duration,
}

impl Default for WsOptions {
    fn default() -> Self {
        Self {
            path: "/".into(),
            allowed_origins: None,
            require_origin: false,
            ping_interval: std::time::Duration::from_secs(30),
        }
    }
}

/// Everything the transports need besides the listeners.
#[derive(Debug, Clone, Default)]
pub struct TransportOptions {
    /// Size and connection limits.
    pub limits: TransportLimits,
    /// TLS for `tls:` and `wss:` listeners.
    pub tls: Option<tls::TlsServer>,
    /// TLS for connections careflow-sip opens itself.
    pub tls_client: Option<tls::TlsClient>,
    /// WebSocket rules for `ws:` and `wss:` listeners.
    pub ws: WsOptions,
    /// Per-source limits and bans, checked before anything is parsed.
    pub guard: Option<Arc<careflow_core::guard::Guard>>,
}

/// A message received from the network.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// Transport it came over.
    pub transport: Transport,
    /// The peer address.
    pub source: SocketAddr,
    /// Our address it arrived at.
    pub local: SocketAddr,
    /// The connection, for stream transports.
    pub conn: Option<ConnId>,
    /// The raw message (one datagram or one framed message).
    pub bytes: Bytes,
    /// The datagram was larger than `max_message_size`: `bytes` holds only its first
    /// `max_message_size` bytes, enough to answer 513 when the header section fits.
    pub truncated: bool,
}

/// A message to send.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// Transport to use.
    pub transport: Transport,
    /// Destination.
    pub dest: SocketAddr,
    /// Preferred connection (stream transports); when closed, a new one is opened to `dest`.
    pub conn: Option<ConnId>,
    /// Our address to send from (UDP: picks the socket).
    pub local: Option<SocketAddr>,
    /// The bytes.
    pub bytes: Bytes,
}

/// Receives inbound messages. Called on the transport's task: implementations hand work off
/// quickly (parse, then spawn if they must wait).
pub trait InboundHandler: Send + Sync + 'static {
    /// One message arrived.
    fn handle(&self, inbound: Inbound);

    /// A stream connection closed (either side, or the idle timeout); nothing more can be
    /// sent over it.
    fn closed(&self, conn: ConnId) {
        let _ = conn;
    }

    /// The network reported `dest` unreachable (ICMP port or host unreachable for a datagram
    /// we sent), so requests waiting for an answer from it can fail at once.
    fn unreachable(&self, transport: Transport, dest: SocketAddr) {
        let _ = (transport, dest);
    }
}

/// Transport failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Binding a listener failed.
    #[error("cannot listen on {transport}:{addr}: {source}")]
    Bind {
        /// transport
        transport: Transport,
        /// address
        addr: SocketAddr,
        /// cause
        source: std::io::Error,
    },
    /// No listener for this transport.
    #[error("no {0} listener")]
    NoListener(Transport),
    /// Sending failed.
    #[error("send to {dest} failed: {source}")]
    Send {
        /// destination
        dest: SocketAddr,
        /// cause
        source: std::io::Error,
    },
    /// Transport not supported yet.
    #[error("{0} transport is not available")]
    Unsupported(Transport),
    /// A `tls:` or `wss:` listener without a certificate.
    #[error("{0} listener needs a TLS certificate")]
    NoCertificate(Transport),
}

/// Counters the transports keep (read by metrics).
#[derive(Debug, Default)]
pub struct TransportStats {
    /// Datagrams or stream messages dropped for size.
    pub oversize: AtomicU64,
    /// Stream connections currently open.
    pub connections: AtomicU64,
    /// Connections refused at the limit.
    pub refused_connections: AtomicU64,
    /// Messages and connections dropped because their source is banned or flooding.
    pub dropped_banned: AtomicU64,
    /// Flows banned by the transports (floods).
    pub bans: AtomicU64,
    /// Messages dropped because their site was over its rate ceiling (no ban).
    pub shed: AtomicU64,
    /// Messages dropped on the way out: a UDP send backlog or a connection's queue was full.
    pub send_dropped: AtomicU64,
    /// Connections closed because the peer stopped reading (write timeout or full queue).
    pub stalled_closed: AtomicU64,
}

/// Handle to the running transports; cheap to clone.
#[derive(Clone)]
pub struct Transports {
    inner: Arc<Inner>,
}

struct Inner {
    udp: Vec<Arc<udp::Listener>>,
    conns: ConnTable,
    /// Open connections per source address (the per-IP cap).
    per_ip: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>,
    opts: TransportOptions,
    handler: Arc<dyn InboundHandler>,
    stats: Arc<TransportStats>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Transports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transports")
            .field("udp", &self.inner.udp.len())
            .finish_non_exhaustive()
    }
}

impl Transports {
    /// Binds every listener (all or nothing), then starts receiving. Returns the handle and
    /// the bound addresses in the order of `specs` (port 0 resolved).
    pub async fn start(
        specs: &[ListenSpec],
        opts: TransportOptions,
        handler: Arc<dyn InboundHandler>,
        cancel: CancellationToken,
    ) -> Result<(Self, Vec<ListenSpec>), TransportError> {
        let mut udp = Vec::new();
        let mut streams = Vec::new();
        let mut bound = Vec::new();
        for s in specs {
            let bind_err = |e| TransportError::Bind {
                transport: s.transport,
                addr: s.addr,
                source: e,
            };
            match s.transport {
                Transport::Udp => {
                    let sock = udp_socket::UdpSock::bind(s.addr).map_err(bind_err)?;
                    icmp::enable(&sock);
                    sockbuf::enlarge(&sock);
                    let addr = sock.local_addr().map_err(bind_err)?;
                    bound.push(ListenSpec {
                        transport: s.transport,
                        addr,
                    });
                    udp.push(Arc::new(udp::Listener {
                        addr,
                        sock: Arc::new(sock),
                        backlog: udp::Backlog::default(),
                    }));
                }
                Transport::Tcp | Transport::Tls | Transport::Ws | Transport::Wss => {
                    if matches!(s.transport, Transport::Tls | Transport::Wss) && opts.tls.is_none()
                    {
                        return Err(TransportError::NoCertificate(s.transport));
                    }
                    let l = TcpListener::bind(s.addr).await.map_err(bind_err)?;
                    let addr = l.local_addr().map_err(bind_err)?;
                    bound.push(ListenSpec {
                        transport: s.transport,
                        addr,
                    });
                    streams.push((l, s.transport));
                }
            }
        }
        let me = Self {
            inner: Arc::new(Inner {
                udp,
                conns: ConnTable::default(),
                per_ip: Default::default(),
                opts,
                handler,
                stats: Arc::new(TransportStats::default()),
                tracker: TaskTracker::new(),
                cancel,
            }),
        };
        for l in &me.inner.udp {
            // One receive loop per socket: a second one on the same socket is woken for every
            // datagram too and mostly finds nothing (measured: more CPU, not more throughput).
            let (t, s) = (me.clone(), l.sock.clone());
            me.inner
                .tracker
                .spawn(async move { udp::recv_loop(t, s).await });
            let (t, l) = (me.clone(), l.clone());
            me.inner
                .tracker
                .spawn(async move { udp::drain_backlog(t, l).await });
        }
        if let Some(tls) = me.inner.opts.tls.clone() {
            // Certificates renewed on disk (certbot, an operator) are picked up without a
            // signal; polling two mtimes is cheaper than a file-watching dependency.
            let cancel = me.inner.cancel.clone();
            me.inner.tracker.spawn(async move {
                let mut tick = tokio::time::interval(CERT_POLL);
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tick.tick() => { tls.certs.reload_if_changed(); }
                    }
                }
            });
        }
        for (l, transport) in streams {
            let t = me.clone();
            me.inner
                .tracker
                .spawn(async move { stream::accept_loop(t, l, transport).await });
        }
        Ok((me, bound))
    }

    /// Sends a message, opening a TCP or TLS connection when there is none to `dest`; never
    /// blocks on a slow peer (writes are queued in order).
    pub async fn send(&self, out: Outbound) -> Result<(), TransportError> {
        match out.transport {
            Transport::Udp => udp::send_ordered(self, out),
            _ => stream::send(self, out).await,
        }
    }

    /// Sends or queues a message now, without waiting, keeping the order in which messages to
    /// one socket or connection were given (RFC 3261 needs a 180 to leave before its 200). Gives
    /// the message back only when it needs [`Self::send`]: a stream destination with no open
    /// connection, which must be dialled first. A stream peer whose queue is full (it does not
    /// read) is disconnected and the message dropped.
    pub fn try_send(&self, out: Outbound) -> Option<Outbound> {
        match out.transport {
            Transport::Udp => {
                let _ = udp::send_ordered(self, out);
                None
            }
            _ => stream::try_send(self, out),
        }
    }

    /// Whether a stream connection is still open.
    pub fn is_open(&self, conn: ConnId, peer: SocketAddr) -> bool {
        self.inner.conns.is_open(conn, peer)
    }

    /// The TLS server (certificate reloads), when one is configured.
    pub fn tls(&self) -> Option<&tls::TlsServer> {
        self.inner.opts.tls.as_ref()
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<TransportStats> {
        &self.inner.stats
    }

    /// Waits until every transport task has ended (after the cancel token fired).
    pub async fn closed(&self) {
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }

    fn deliver(&self, inbound: Inbound) {
        self.inner.handler.handle(inbound);
    }

    /// The guard's verdict on one message from `src`: true to process it. Drops are counted;
    /// a new ban is logged once, in the stable security format.
    fn admit(&self, src: SocketAddr) -> bool {
        use careflow_core::guard::Admit;
        let Some(g) = self.inner.opts.guard.as_ref() else {
            return true;
        };
        let stats = &self.inner.stats;
        match g.admit(src, std::time::Instant::now()) {
            Admit::Pass => true,
            Admit::Drop => {
                stats.dropped_banned.fetch_add(1, Ordering::Relaxed);
                false
            }
            Admit::Banned(scope, reason) => {
                stats.dropped_banned.fetch_add(1, Ordering::Relaxed);
                stats.bans.fetch_add(1, Ordering::Relaxed);
                log_ban(scope, reason, g.config().ban_time);
                false
            }
            Admit::Shed { log } => {
                stats.shed.fetch_add(1, Ordering::Relaxed);
                if log {
                    tracing::warn!(
                        target: "careflow::security",
                        "SECURITY site_over_rate src_ip={} site_rate_limit={}",
                        careflow_core::guard::site_of(src.ip()),
                        g.config().site_rate
                    );
                }
                false
            }
        }
    }

    /// Current bans, and lifting one (for `careflow-sip bans` / `unban`).
    pub fn guard(&self) -> Option<&Arc<careflow_core::guard::Guard>> {
        self.inner.opts.guard.as_ref()
    }
}

/// How often certificate files are checked for changes.
const CERT_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// The one log line per ban (fail2ban and operators read it; keep its shape stable). A flow
/// ban names the port and is `banned_flow`: the address may be a whole site behind NAT, so a
/// firewall must not act on it; only `banned` (a whole site) is for fail2ban.
pub fn log_ban(
    scope: careflow_core::guard::BanScope,
    reason: careflow_core::guard::BanReason,
    ban_time: std::time::Duration,
) {
    use careflow_core::guard::BanScope;
    match scope {
        BanScope::Flow(a) => tracing::warn!(
            target: "careflow::security",
            "SECURITY banned_flow src_ip={} src_port={} reason={} ban_seconds={}",
            a.ip(),
            a.port(),
            reason.as_str(),
            ban_time.as_secs()
        ),
        BanScope::Site(ip) => tracing::warn!(
            target: "careflow::security",
            "SECURITY banned src_ip={ip} reason={} ban_seconds={}",
            reason.as_str(),
            ban_time.as_secs()
        ),
    }
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

fn next_conn_id() -> ConnId {
    ConnId(NEXT_CONN.fetch_add(1, Ordering::Relaxed))
}
