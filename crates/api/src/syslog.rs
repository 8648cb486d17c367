//! The audit trail forwarded to a SIEM (issue 20): every entry of `audit_log`, from the API,
//! the CLI and every node (they share the database), is sent as an RFC 5424 syslog message
//! over TLS (RFC 5425 framing: `LENGTH SP MESSAGE`), or plain TCP for a collector on the same
//! host. The forwarder follows the table by `seq` and keeps its place in
//! `DATA_DIR/audit-syslog.cursor`, so a collector or network outage delays entries, never
//! loses them (at least once: after a crash between sending and saving the cursor, a few are
//! sent again; the SIEM can drop duplicates by `seq`). One node of a cluster should forward.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use careflow_core::audit::AuditEntry;
use careflow_store::audit::AuditStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Where entries go.
#[derive(Debug, Clone)]
pub struct SyslogConfig {
    /// The collector's host (a name or an address; TLS checks the certificate names it).
    pub host: String,
    /// Its port (6514 for syslog over TLS).
    pub port: u16,
    /// TLS (`tls://`) or plain TCP (`tcp://`).
    pub tls: bool,
    /// Extra CA certificates trusted for the collector (`TLS_CA_FILE`).
    pub ca_file: Option<PathBuf>,
    /// This node's name (HOSTNAME of the messages).
    pub hostname: String,
    /// Where the last forwarded `seq` is kept.
    pub cursor_file: PathBuf,
}

/// How often the table is read for new entries.
const POLL: Duration = Duration::from_secs(2);
/// Entries read per round.
const BATCH: usize = 500;

/// syslog facility 10 (security/authorization, "authpriv"), severity 5 (notice).
const PRI: u8 = 10 * 8 + 5;

/// The value of an SD-PARAM: `"`, `\` and `]` escaped (RFC 5424 §6.3.3).
fn sd_escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A PRINTUSASCII field of at most `max` characters (`-` when empty).
fn token(v: &str, max: usize) -> String {
    let t: String = v
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if t.is_empty() { "-".to_string() } else { t }
}

/// RFC 3339 UTC time of Unix milliseconds.
fn timestamp(ms: u64) -> String {
    let secs = ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// One entry as an RFC 5424 message (without framing). The structured data carries every
/// field, so the SIEM can check the chain too.
pub fn message(e: &AuditEntry, hostname: &str, procid: u32) -> String {
    let ev = &e.event;
    format!(
        "<{PRI}>1 {} {} careflow-sip {procid} {} [audit@32473 seq=\"{}\" actor=\"{}\" source=\"{}\" target=\"{}\" outcome=\"{}\" detail=\"{}\" prevHash=\"{}\" hash=\"{}\"] {} {} {} {}",
        timestamp(e.at),
        token(hostname, 255),
        token(&ev.action, 32),
        e.seq,
        sd_escape(&ev.actor),
        sd_escape(&ev.source),
        sd_escape(&ev.target),
        sd_escape(&ev.outcome),
        sd_escape(&ev.detail),
        e.prev_hash,
        e.hash,
        ev.actor,
        ev.action,
        ev.target,
        ev.outcome,
    )
}

fn connector(ca: Option<&PathBuf>) -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    if let Ok(certs) = CertificateDer::pem_file_iter("/etc/ssl/certs/ca-certificates.crt") {
        roots.add_parsable_certificates(certs.filter_map(Result::ok));
    }
    if let Some(path) = ca {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("TLS_CA_FILE {}: {e}", path.display()))?;
        for c in certs {
            let c = c.map_err(|e| format!("TLS_CA_FILE {}: {e}", path.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("TLS_CA_FILE {}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// A connection to the collector.
enum Link {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Link {
    /// Whether the collector still holds the connection: it never writes, so a read that
    /// finds the end of the stream (or an error) at once means it closed it. Checked before
    /// sending, so an entry is not written into a connection already gone (where the write
    /// would succeed and the entry be lost).
    async fn alive(&mut self) -> bool {
        use tokio::io::AsyncReadExt as _;
        let mut buf = [0u8; 256];
        let read = match self {
            Self::Plain(s) => {
                tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await
            }
            Self::Tls(s) => tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await,
        };
        !matches!(read, Ok(Ok(0)) | Ok(Err(_)))
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Plain(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
            Self::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }
}

async fn connect(cfg: &SyslogConfig) -> Result<Link, String> {
    let who = format!("{}:{}", cfg.host, cfg.port);
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        TcpStream::connect((cfg.host.as_str(), cfg.port)),
    )
    .await
    .map_err(|_| format!("{who}: connection timed out"))?
    .map_err(|e| format!("{who}: {e}"))?;
    if !cfg.tls {
        return Ok(Link::Plain(tcp));
    }
    let name = rustls::pki_types::ServerName::try_from(cfg.host.clone())
        .map_err(|e| format!("{who}: {e}"))?;
    let tls = connector(cfg.ca_file.as_ref())?
        .connect(name, tcp)
        .await
        .map_err(|e| format!("{who}: TLS: {e}"))?;
    Ok(Link::Tls(Box::new(tls)))
}

fn read_cursor(cfg: &SyslogConfig) -> u64 {
    std::fs::read_to_string(&cfg.cursor_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn save_cursor(cfg: &SyslogConfig, seq: u64) {
    let tmp = cfg.cursor_file.with_extension("tmp");
    if std::fs::write(&tmp, seq.to_string()).is_err()
        || std::fs::rename(&tmp, &cfg.cursor_file).is_err()
    {
        tracing::warn!(file = %cfg.cursor_file.display(), "cannot save the syslog cursor; entries may be sent again after a restart");
    }
}

/// Forwards new audit entries until `shutdown` completes.
pub async fn run(
    cfg: SyslogConfig,
    store: Arc<dyn AuditStore>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let procid = std::process::id();
    let mut after = read_cursor(&cfg);
    let mut link: Option<Link> = None;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        let entries = match store.audit_after(after, BATCH).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the audit trail for syslog; trying again");
                continue;
            }
        };
        if entries.is_empty() {
            continue;
        }
        if let Some(l) = link.as_mut()
            && !l.alive().await
        {
            tracing::info!(collector = %cfg.host, "the syslog collector closed the connection; reconnecting");
            link = None;
        }
        for e in &entries {
            let msg = message(e, &cfg.hostname, procid);
            let framed = format!("{} {msg}", msg.len());
            if link.is_none() {
                match connect(&cfg).await {
                    Ok(l) => {
                        if failing {
                            tracing::info!(collector = %cfg.host, "syslog collector reachable again");
                        }
                        failing = false;
                        link = Some(l);
                    }
                    Err(err) => {
                        if !failing {
                            tracing::error!(error = %err, "cannot reach the syslog collector; audit entries wait");
                        }
                        failing = true;
                        break;
                    }
                }
            }
            let Some(l) = link.as_mut() else { break };
            if let Err(err) = l.send(framed.as_bytes()).await {
                tracing::warn!(error = %err, "syslog connection lost; reconnecting");
                link = None;
                break;
            }
            after = e.seq;
            save_cursor(&cfg, after);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use careflow_core::audit::{AuditEvent, next_entry};

    #[test]
    fn entries_become_rfc5424_messages() {
        let e = next_entry(
            None,
            1_765_065_600_123,
            AuditEvent {
                actor: "apikey:ops".into(),
                source: "192.0.2.7".into(),
                action: "subscriber.disabled".into(),
                target: "2001@ward.test".into(),
                outcome: "ok".into(),
                detail: "said \"why\" [here]".into(),
            },
        );
        let m = message(&e, "node-a", 42);
        assert!(
            m.starts_with("<85>1 2025-12-07T00:00:00.123Z node-a careflow-sip 42 subscriber.disabled [audit@32473 seq=\"1\" actor=\"apikey:ops\""),
            "{m}"
        );
        assert!(m.contains(r#"detail="said \"why\" [here\]""#), "{m}");
        assert!(
            m.ends_with("apikey:ops subscriber.disabled 2001@ward.test ok"),
            "{m}"
        );
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(timestamp(1_709_208_000_999), "2024-02-29T12:00:00.999Z");
    }
}
