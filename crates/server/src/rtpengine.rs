//! Client of rtpengine's ng control protocol: bencoded dictionaries over UDP, each request
//! prefixed by a cookie the answer repeats. Requests are retried a few times; instances are
//! health-checked with `ping`; a call keeps the instance it started on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use careflow_core::media::{self, Reply};
use careflow_proto::bencode::Value;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Why a command got no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    /// No instance is configured or alive.
    #[error("no rtpengine available")]
    NoInstance,
    /// No answer after the retries.
    #[error("rtpengine {0} did not answer")]
    Timeout(SocketAddr),
    /// rtpengine refused the command.
    #[error("rtpengine refused: {0}")]
    Refused(String),
}

struct Instance {
    addr: SocketAddr,
    alive: AtomicBool,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct MediaStats {
    /// Commands that failed (timeout or refusal).
    pub errors: AtomicU64,
    /// Sum of answer times, microseconds.
    pub latency_us: AtomicU64,
    /// Commands answered.
    pub answered: AtomicU64,
}

/// The client; cheap to share.
pub struct RtpEngine {
    sock: Arc<UdpSocket>,
    instances: Vec<Instance>,
    pending: Mutex<HashMap<String, oneshot::Sender<Value>>>,
    calls: Mutex<HashMap<String, usize>>,
    next_cookie: AtomicU64,
    timeout: Duration,
    retries: u32,
    /// Counters.
    pub stats: MediaStats,
}

impl std::fmt::Debug for RtpEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RtpEngine")
            .field(
                "instances",
                &self.instances.iter().map(|i| i.addr).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl RtpEngine {
    /// Binds a control socket and starts receiving answers and health checks.
    pub async fn start(
        addrs: Vec<SocketAddr>,
        timeout: Duration,
        cancel: CancellationToken,
    ) -> std::io::Result<Arc<Self>> {
        let v4 = addrs.first().is_none_or(SocketAddr::is_ipv4);
        let sock = UdpSocket::bind(if v4 { "0.0.0.0:0" } else { "[::]:0" }).await?;
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        let me = Arc::new(Self {
            sock: Arc::new(sock),
            instances: addrs
                .into_iter()
                .map(|addr| Instance {
                    addr,
                    // Assumed alive until a check says otherwise, so the first call tries.
                    alive: AtomicBool::new(true),
                })
                .collect(),
            pending: Mutex::new(HashMap::new()),
            calls: Mutex::new(HashMap::new()),
            next_cookie: AtomicU64::new(u64::from_le_bytes(seed) >> 16),
            timeout,
            retries: 3,
            stats: MediaStats::default(),
        });
        tokio::spawn(me.clone().receive(cancel.clone()));
        tokio::spawn(me.clone().health(cancel));
        Ok(me)
    }

    async fn receive(self: Arc<Self>, cancel: CancellationToken) {
        let mut buf = vec![0u8; 65536];
        loop {
            let r = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.sock.recv_from(&mut buf) => r,
            };
            let Ok((n, _)) = r else { continue };
            let data = &buf[..n];
            let Some(space) = data.iter().position(|&b| b == b' ') else {
                continue;
            };
            let cookie = String::from_utf8_lossy(&data[..space]).into_owned();
            let Some(value) = Value::decode(&data[space + 1..]) else {
                tracing::warn!("unreadable answer from rtpengine");
                continue;
            };
            let waiter = self.pending.lock().ok().and_then(|mut p| p.remove(&cookie));
            if let Some(w) = waiter {
                let _ = w.send(value);
            }
        }
    }

    async fn health(self: Arc<Self>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            for i in 0..self.instances.len() {
                let ok = matches!(
                    self.send(i, &media::ping()).await.map(|v| media::reply(&v)),
                    Ok(Reply::Pong)
                );
                let was = self.instances[i].alive.swap(ok, Ordering::Relaxed);
                if was != ok {
                    let addr = self.instances[i].addr;
                    if ok {
                        tracing::info!(%addr, "rtpengine is back");
                    } else {
                        tracing::warn!(%addr, "rtpengine does not answer; calls avoid it");
                    }
                }
            }
        }
    }

    /// Whether any instance is configured.
    pub fn configured(&self) -> bool {
        !self.instances.is_empty()
    }

    /// Sends one command to instance `i`, retrying; returns the answer dictionary.
    async fn send(&self, i: usize, cmd: &Value) -> Result<Value, MediaError> {
        let inst = &self.instances[i];
        let cookie = format!("cf{}", self.next_cookie.fetch_add(1, Ordering::Relaxed));
        let mut packet = format!("{cookie} ").into_bytes();
        cmd.encode_into(&mut packet);
        let (tx, mut rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(cookie.clone(), tx);
        }
        let started = std::time::Instant::now();
        for _ in 0..self.retries {
            // The same cookie on every try: rtpengine answers a repeated cookie from its cache
            // instead of applying the command twice.
            let _ = self.sock.send_to(&packet, inst.addr).await;
            match tokio::time::timeout(self.timeout, &mut rx).await {
                Ok(Ok(v)) => {
                    self.stats.answered.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .latency_us
                        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(_)) => break,
                Err(_) => continue,
            }
        }
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&cookie);
        }
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        inst.alive.store(false, Ordering::Relaxed);
        Err(MediaError::Timeout(inst.addr))
    }

    /// The instance a call uses: the one it started on, else a live one chosen by Call-ID.
    fn instance_for(&self, call_id: &str) -> Option<usize> {
        if let Some(i) = self.calls.lock().ok()?.get(call_id) {
            return Some(*i);
        }
        let live: Vec<usize> = (0..self.instances.len())
            .filter(|i| self.instances[*i].alive.load(Ordering::Relaxed))
            .collect();
        if live.is_empty() {
            return None;
        }
        let h = call_id.bytes().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        let i = live[h % live.len()];
        if let Ok(mut c) = self.calls.lock() {
            if c.len() > 100_000 {
                c.clear();
            }
            c.insert(call_id.to_string(), i);
        }
        Some(i)
    }

    /// Runs a command for `call_id` and returns the rewritten SDP it produced (if any).
    pub async fn command(&self, call_id: &str, cmd: &Value) -> Result<Option<String>, MediaError> {
        let i = self.instance_for(call_id).ok_or(MediaError::NoInstance)?;
        let answer = self.send(i, cmd).await?;
        match media::reply(&answer) {
            Reply::Ok(sdp) => Ok(sdp),
            Reply::Pong => Ok(None),
            Reply::Error(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                Err(MediaError::Refused(e))
            }
        }
    }

    /// Deletes a call's media session and forgets its instance.
    pub async fn delete(&self, call_id: &str) -> Result<(), MediaError> {
        let r = self
            .command(call_id, &media::delete(call_id))
            .await
            .map(|_| ());
        self.forget(call_id);
        r
    }

    /// Forgets which instance a call used (rtpengine dropped it on its own).
    pub fn forget(&self, call_id: &str) {
        if let Ok(mut c) = self.calls.lock() {
            c.remove(call_id);
        }
    }

    /// The raw answer to a `query` (packet counters per leg), for tests and tools.
    pub async fn query(&self, call_id: &str) -> Result<Value, MediaError> {
        let i = self.instance_for(call_id).ok_or(MediaError::NoInstance)?;
        self.send(i, &media::query(call_id)).await
    }

    /// Calls with a media session now.
    pub fn active_calls(&self) -> usize {
        self.calls.lock().map(|c| c.len()).unwrap_or(0)
    }
}
