//! SIP PnP (RFC 6080, as Yealink phones do it; off by default, `PROVISION_PNP`): a phone
//! without a provisioning URL multicasts `SUBSCRIBE sip:<mac>@224.0.1.75` with
//! `Event: ua-profile` on its network at boot; we answer 200 and a `NOTIFY` whose body
//! (`application/url`) is its provisioning URL.
//!
//! Only for a device an admin has added and that has never fetched its configuration (a
//! first boot): it gets a new provisioning password, carried in the URL, so the phone then
//! fetches its file with no one typing anything. Anyone on that network who names such a MAC
//! gets the same: PnP belongs on a voice network that only phones reach, and is off unless
//! configured. Devices already provisioned, unknown MACs (a miss, as in [`super::fetch`]) and
//! throttled sources get no answer; each answer is an audit entry (`device.pnp_answered`).

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use careflow_core::audit::AuditEvent;
use careflow_core::provisioning::{PNP_GROUP, pnp_request};
use careflow_proto::{HeaderName, Message, ParseLimits, ResponseBuilder};
use tokio::net::UdpSocket;

use super::fetch::FetchServer;

/// Where PnP listens: the address of the interface on the phones' network, and the port
/// (5060, the phones' default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PnpConfig {
    /// The interface's IPv4 address (multicast is joined on it, answers sent from it).
    pub interface: Ipv4Addr,
    /// The port phones send to.
    pub port: u16,
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let _ = getrandom::fill(&mut b);
    careflow_proto::digest::hex(&b)
}

/// The multicast socket, joined to the PnP group on `cfg.interface`.
pub fn bind(cfg: PnpConfig) -> std::io::Result<UdpSocket> {
    let std_sock = std::net::UdpSocket::bind((PNP_GROUP, cfg.port))?;
    std_sock.join_multicast_v4(&PNP_GROUP, &cfg.interface)?;
    std_sock.set_nonblocking(true)?;
    UdpSocket::from_std(std_sock)
}

/// Answers PnP SUBSCRIBEs on `socket` until `shutdown`.
pub async fn run(
    socket: UdpSocket,
    cfg: PnpConfig,
    server: Arc<FetchServer>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    tokio::pin!(shutdown);
    let mut buf = vec![0u8; 8192];
    loop {
        let (n, peer) = tokio::select! {
            () = &mut shutdown => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "pnp: receive failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(msg) = Message::parse(Bytes::copy_from_slice(&buf[..n]), &ParseLimits::default())
        else {
            continue;
        };
        let from_user = msg.from().and_then(|f| f.uri.user.map(str::to_string));
        let Some(req) = pnp_request(
            msg.method_str(),
            msg.header(HeaderName::Event),
            from_user.as_deref(),
        ) else {
            continue;
        };
        if server
            .guard()
            .throttled(peer.ip(), Instant::now())
            .is_some()
        {
            continue;
        }
        let device = match server.devices.store.device(req.mac.as_str()).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "pnp: device lookup failed");
                continue;
            }
        };
        let Some(device) = device else {
            tracing::info!(src = %peer, mac = %req.mac, vendor = %req.vendor, model = %req.model,
                "pnp: unknown MAC; not answered");
            server.guard().miss(peer.ip(), Instant::now());
            continue;
        };
        if device.last_fetch_at.is_some() {
            tracing::info!(src = %peer, mac = %req.mac,
                "pnp: device provisioned already (it keeps its URL); not answered");
            continue;
        }
        let server = server.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(&server, cfg, &msg, peer, &device).await {
                tracing::warn!(src = %peer, mac = %device.mac, error = %e, "pnp: answer failed");
            }
        });
    }
}

/// 200 to the SUBSCRIBE, then the NOTIFY with the URL until the phone answers it.
async fn answer(
    server: &FetchServer,
    cfg: PnpConfig,
    msg: &Message,
    peer: SocketAddr,
    device: &careflow_store::devices::Device,
) -> Result<(), String> {
    let sock = UdpSocket::bind((cfg.interface, 0))
        .await
        .map_err(|e| e.to_string())?;
    let local = sock.local_addr().map_err(|e| e.to_string())?;
    let tag = random_hex(8);
    let ok = ResponseBuilder::new(msg, 200)
        .source(peer)
        .to_tag(tag.clone())
        .header("Expires", 0)
        .header("Contact", format!("<sip:{local}>"))
        .build();
    sock.send_to(&ok, peer).await.map_err(|e| e.to_string())?;
    let with_secret = server
        .devices
        .new_provisioning_password(&device.mac)
        .await
        .map_err(|e| e.to_string())?;
    let url = server
        .devices
        .provisioning_url(&device.mac, &with_secret.provisioning_password)
        .ok_or("no provisioning URL (set PROVISION_PUBLIC_URL)")?;
    // The NOTIFY goes where the phone's Contact says (it listens there), else to the source.
    let target = msg
        .header(HeaderName::Contact)
        .and_then(careflow_proto::NameAddr::parse)
        .and_then(|c| {
            let host: Ipv4Addr = c.uri.host.as_str().parse().ok()?;
            Some(SocketAddr::from((host, c.uri.port.unwrap_or(5060))))
        })
        .unwrap_or(peer);
    let from = msg.header(HeaderName::From).unwrap_or_default();
    let to = msg.header(HeaderName::To).unwrap_or_default();
    let event = msg.header(HeaderName::Event).unwrap_or("ua-profile");
    let call_id = msg.call_id().unwrap_or_default();
    let branch = format!("z9hG4bK{}", random_hex(8));
    let notify = format!(
        "NOTIFY sip:{target} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch={branch};rport\r\n\
         Max-Forwards: 70\r\n\
         From: {to};tag={tag}\r\n\
         To: {from}\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 NOTIFY\r\n\
         Contact: <sip:{local}>\r\n\
         Event: {event}\r\n\
         Subscription-State: terminated;reason=timeout\r\n\
         Content-Type: application/url\r\n\
         Content-Length: {}\r\n\r\n{url}",
        url.len()
    );
    let mut buf = vec![0u8; 4096];
    let mut wait = Duration::from_millis(500);
    for _ in 0..5 {
        sock.send_to(notify.as_bytes(), target)
            .await
            .map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Ok((n, _))) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await
        {
            let Ok(resp) =
                Message::parse(Bytes::copy_from_slice(&buf[..n]), &ParseLimits::default())
            else {
                continue;
            };
            if resp
                .top_via()
                .is_some_and(|v| v.branch() == Some(branch.as_str()))
            {
                let status = resp.status().unwrap_or(0);
                audit(server, peer, device, status).await;
                tracing::info!(src = %peer, mac = %device.mac, status,
                    "pnp: the phone was given its provisioning URL");
                return Ok(());
            }
        }
        wait = (wait * 2).min(Duration::from_secs(4));
    }
    Err("the phone did not answer the NOTIFY".into())
}

async fn audit(
    server: &FetchServer,
    peer: SocketAddr,
    device: &careflow_store::devices::Device,
    status: u16,
) {
    let event = AuditEvent {
        actor: format!("device:{}", device.mac),
        source: peer.to_string(),
        action: "device.pnp_answered".into(),
        target: format!("{}@{}", device.username, device.domain),
        outcome: if (200..300).contains(&status) {
            "ok".into()
        } else {
            format!("notify-{status}")
        },
        detail: "a new provisioning password was sent in the PnP NOTIFY".into(),
    };
    crate::audit::record(&*server.audit, event).await;
}
