//! OPTIONS keep-alives for devices behind NAT on UDP.
//!
//! A NAT forgets a UDP mapping after tens of seconds of silence, and then calls to the device
//! vanish. Every interval, each NATed UDP binding gets an OPTIONS from the socket it registered
//! to; the traffic keeps the mapping open, and any answer (even an error status) proves the
//! device is there. A binding that misses several answers in a row is removed, so calls stop
//! ringing a phone that is gone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub use careflow_core::keepalive::KeepaliveConfig;
use careflow_core::keepalive::{BRANCH_PREFIX, needs_keepalive, parse_branch};
use careflow_core::{Binding, Transport};
use careflow_transport::Outbound;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::clock::unix_now;

fn options(b: &Binding, local: SocketAddr, round: u64, domain: &str) -> String {
    format!(
        "OPTIONS {contact} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch={BRANCH_PREFIX}{id}x{round};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:keepalive@{domain}>;tag=ka{round}\r\nTo: <{contact}>\r\n\
         Call-ID: ka-{id}-{round}@{domain}\r\nCSeq: {round} OPTIONS\r\nContent-Length: 0\r\n\r\n",
        contact = b.contact,
        id = b.id,
    )
}

/// Runs keep-alive rounds until cancelled.
pub(crate) async fn run(app: Arc<App>, cfg: KeepaliveConfig, cancel: CancellationToken) {
    if cfg.interval.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => app.keepalive_round(cfg).await,
        }
    }
}

impl App {
    async fn keepalive_round(&self, cfg: KeepaliveConfig) {
        // A sleeping push device is not pinged: it does not answer, and need not.
        let pinged = |b: &Binding| {
            needs_keepalive(b) && !crate::push::survives_its_flow(self.push.as_deref(), b)
        };
        let Ok(all) = self.location.all_where(unix_now(), &pinged).await else {
            return;
        };
        let nated: HashMap<u64, &Binding> = all.iter().map(|b| (b.id, b)).collect();
        let round = match self.keepalives.lock() {
            Ok(mut t) => t.round(nated.keys().copied(), cfg.max_failures),
            Err(_) => return,
        };
        for id in &round.dead {
            let Some(b) = nated.get(id) else { continue };
            let n = crate::flows::remove_bindings(&*self.location, &b.aor, |x| x.id == *id).await;
            self.metrics
                .keepalive_failures
                .fetch_add(u64::from(cfg.max_failures), Ordering::Relaxed);
            if n > 0 {
                self.metrics
                    .keepalive_bindings_dropped
                    .fetch_add(1, Ordering::Relaxed);
                self.publish(
                    careflow_store::events::EventKind::DeviceUnregistered,
                    &b.aor,
                    serde_json::json!({"why": "no answer to keep-alives", "removed": n}),
                );
                tracing::info!(aor = %b.aor, contact = %careflow_core::push::redacted(&b.contact), source = %b.source,
                    failures = cfg.max_failures, "device behind NAT stopped answering keep-alives; binding removed");
            }
        }
        let Some(t) = self.transports() else { return };
        let domain = self.cfg.domains.first().map_or("localhost", String::as_str);
        for id in &round.probe {
            let Some(b) = nated.get(id) else { continue };
            let Some(local) = self.interfaces.listener_towards(Transport::Udp, b.source) else {
                continue;
            };
            let bytes = options(b, local, round.number, domain);
            let out = Outbound {
                transport: Transport::Udp,
                dest: b.source,
                conn: None,
                local: Some(local),
                bytes: bytes.into(),
            };
            self.metrics.keepalives_sent.fetch_add(1, Ordering::Relaxed);
            if let Some(out) = t.try_send(out) {
                let _ = t.send(out).await;
            }
        }
    }

    /// An answer to a keep-alive: the device is alive.
    pub(crate) fn keepalive_answered(&self, branch: &str) -> bool {
        let Some((id, round)) = parse_branch(branch) else {
            return false;
        };
        if let Ok(mut t) = self.keepalives.lock()
            && t.answered(id, round)
        {
            self.metrics
                .keepalives_answered
                .fetch_add(1, Ordering::Relaxed);
        }
        true
    }
}
