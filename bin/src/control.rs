//! A local control socket (`DATA_DIR/control.sock`, mode 0600) through which the CLI talks to
//! the running server: `careflow-sip bans` and `careflow-sip unban IP`, and the subscriber
//! commands telling it which rows they changed (its cache forgets them at once). Only users
//! who can read DATA_DIR can use it; nothing listens on the network for this.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, bail};
use careflow_core::guard::{BanScope, Guard};
use careflow_store::cached::CachedSubscribers;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

pub(crate) fn socket_path(cfg: &Config) -> PathBuf {
    cfg.data_dir.join("control.sock")
}

/// Serves the control socket until `cancel` fires.
pub(crate) fn serve(
    path: &Path,
    guard: Option<Arc<Guard>>,
    cache: Arc<CachedSubscribers>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot create control socket {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    let path = path.to_path_buf();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => break,
                a = listener.accept() => a,
            };
            let Ok((stream, _)) = accepted else { continue };
            let g = guard.clone();
            let c = cache.clone();
            tokio::spawn(async move {
                let _ = session(stream, g.as_deref(), &c).await;
            });
        }
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}

async fn session(
    stream: UnixStream,
    guard: Option<&Guard>,
    cache: &CachedSubscribers,
) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    BufReader::new(rd).read_line(&mut line).await?;
    let now = Instant::now();
    let reply = match (
        line.split_whitespace().collect::<Vec<_>>().as_slice(),
        guard,
    ) {
        (["forget", user, domain], _) => {
            cache.forget(user, domain);
            "forgotten\n".to_string()
        }
        (["forget-all"], _) => {
            cache.forget_all();
            "forgotten\n".to_string()
        }
        (["bans" | "unban", ..], None) => {
            "error: the security guard is off (SECURITY_RATE_LIMIT=0)\n".to_string()
        }
        (["bans"], Some(guard)) => {
            let mut out = String::new();
            for b in guard.bans(now) {
                let who = match b.scope {
                    BanScope::Flow(a) => a.to_string(),
                    BanScope::Site(ip) => ip.to_string(),
                };
                out.push_str(&format!(
                    "{who} {} {}\n",
                    b.reason.as_str(),
                    b.remaining.as_secs()
                ));
            }
            out
        }
        (["unban", who], Some(guard)) => match parse_scope(who) {
            Some(scope) => {
                if guard.unban(scope, now) {
                    match scope {
                        BanScope::Site(ip) => tracing::warn!(target: "careflow::security",
                            "SECURITY unbanned src_ip={ip} by=operator"),
                        BanScope::Flow(a) => tracing::warn!(target: "careflow::security",
                            "SECURITY unbanned src_ip={} src_port={} by=operator", a.ip(), a.port()),
                    }
                    "unbanned\n".to_string()
                } else {
                    "not banned\n".to_string()
                }
            }
            None => "error: not an IP address or IP:port\n".to_string(),
        },
        _ => "error: unknown command\n".to_string(),
    };
    wr.write_all(reply.as_bytes()).await
}

/// `IP` (the site and every flow of it) or `IP:port` / `[IPv6]:port` (one flow).
fn parse_scope(s: &str) -> Option<BanScope> {
    if let Ok(ip) = s.parse() {
        return Some(BanScope::Site(ip));
    }
    s.parse().ok().map(BanScope::Flow)
}

async fn request(cfg: &Config, command: &str) -> anyhow::Result<String> {
    let path = socket_path(cfg);
    let mut stream = UnixStream::connect(&path).await.with_context(|| {
        format!(
            "cannot reach the running server at {} (is it running with this DATA_DIR?)",
            path.display()
        )
    })?;
    stream.write_all(format!("{command}\n").as_bytes()).await?;
    let mut out = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut out).await?;
    Ok(out)
}

/// After a CLI command changed subscriber rows: the running server (if any, with this
/// DATA_DIR) forgets them, `None` meaning every row. Without a running server nothing is held.
pub(crate) async fn subscribers_changed(cfg: &Config, who: Option<(String, String)>) {
    let command = match &who {
        // Names with white space cannot travel in this line protocol: forget everything.
        Some((u, d)) if !u.contains(char::is_whitespace) && !d.contains(char::is_whitespace) => {
            format!("forget {u} {d}")
        }
        _ => "forget-all".to_string(),
    };
    match request(cfg, &command).await {
        Ok(r) if r.trim() == "forgotten" => {}
        Ok(r) => eprintln!(
            "note: the running server did not confirm the change ({}); it counts within SUBSCRIBER_CACHE_TTL",
            r.trim()
        ),
        Err(_) => {}
    }
}

/// `careflow-sip bans`.
pub(crate) async fn bans(cfg: &Config) -> anyhow::Result<()> {
    let out = request(cfg, "bans").await?;
    println!("{:<40} {:<18} REMAINING", "SOURCE", "REASON");
    let mut n = 0;
    for line in out.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if let [ip, reason, secs] = parts.as_slice() {
            println!("{ip:<40} {reason:<18} {secs}s");
            n += 1;
        }
    }
    println!("{n} banned source(s)");
    Ok(())
}

/// `careflow-sip unban IP`.
pub(crate) async fn unban(cfg: &Config, ip: &str) -> anyhow::Result<()> {
    if ip.parse::<std::net::IpAddr>().is_err() {
        bail!("`{ip}` is not an IP address");
    }
    let out = request(cfg, &format!("unban {ip}")).await?;
    match out.trim() {
        "unbanned" => {
            let store = crate::users::open_subscribers(cfg).await?;
            crate::audit::record(&*store, "ban.lifted", ip, String::new()).await?;
            println!("unbanned {ip}");
        }
        "not banned" => bail!("{ip} is not banned"),
        other => bail!("{other}"),
    }
    Ok(())
}
