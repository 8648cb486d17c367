//! Subscriptions kept over a restart (`DATA_DIR/subscriptions.json`): without them a desk
//! phone's lamps would stand still until its next refresh, up to half an hour. Saved a few
//! seconds after anything changed and at shutdown; taken back at start, each getting a NOTIFY
//! with the state then. Only subscriptions over UDP are kept: a TCP, TLS or WebSocket
//! watcher's connection ends with the process, and its refresh gets 481 (RFC 6665 §4.1.2.2),
//! after which it subscribes again at once.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use careflow_core::Transport;
use careflow_core::dialog_event::info::Quirks;
use careflow_core::dialog_event::subscriptions::{Package, Saved, SubId};
use serde_json::{Value, json};

use crate::app::App;
use crate::clock::unix_now;
use crate::watchers::Reach;

/// After a crash the file may be up to a save interval behind the NOTIFYs sent: versions and
/// CSeqs go on from this much further, so the watcher never sees one go back (it would drop
/// the NOTIFY as old, RFC 4235 §4.1).
const UNCLEAN_SKIP: u32 = 256;

fn saved_json(s: &Saved<Reach>, cseq: u32) -> Value {
    let r = &s.reach;
    json!({
        "call_id": s.id.call_id,
        "from_tag": s.id.from_tag,
        "watcher_aor": s.watcher,
        "watched": s.watched,
        "package": s.package.as_str(),
        "expires_in": s.expires_in.as_secs(),
        "version": s.version,
        "cseq": cseq,
        "transport": r.transport.to_string(),
        "dest": r.dest.to_string(),
        "local": r.local.to_string(),
        "contact": r.contact,
        "watcher": r.watcher,
        "us": r.us,
        "single_dialog": r.quirks.single_dialog,
        "idle_as_terminated": r.quirks.idle_as_terminated,
    })
}

fn saved_of(v: &Value, elapsed: u64, skip: u32) -> Option<(Saved<Reach>, u32)> {
    let text = |k: &str| v.get(k)?.as_str().map(str::to_string);
    let num = |k: &str| v.get(k)?.as_u64();
    let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
    let transport: Transport = text("transport")?.parse().ok()?;
    if transport.is_reliable() {
        return None;
    }
    let reach = Reach {
        transport,
        dest: text("dest")?.parse::<SocketAddr>().ok()?,
        conn: None,
        local: text("local")?.parse::<SocketAddr>().ok()?,
        contact: text("contact")?,
        watcher: text("watcher")?,
        us: text("us")?,
        quirks: Quirks {
            single_dialog: flag("single_dialog"),
            idle_as_terminated: flag("idle_as_terminated"),
        },
    };
    let left = num("expires_in")?.checked_sub(elapsed).filter(|l| *l > 0)?;
    let bump = |n: u64| u32::try_from(n).ok().map(|n| n.saturating_add(skip));
    Some((
        Saved {
            id: SubId {
                call_id: text("call_id")?,
                from_tag: text("from_tag")?,
            },
            watcher: text("watcher_aor")?,
            watched: text("watched")?,
            package: Package::of_event(&text("package")?)?,
            reach,
            expires_in: Duration::from_secs(left),
            version: bump(num("version")?)?,
        },
        bump(num("cseq")?)?,
    ))
}

impl App {
    /// Writes the subscriptions to `path` (through a temporary file, so a crash mid-write
    /// leaves the previous one); `clean` at shutdown.
    pub(crate) fn save_subscriptions(&self, path: &Path, clean: bool) {
        let doc = {
            let Ok(mut w) = self.watchers.lock() else {
                return;
            };
            w.dirty = false;
            let subs: Vec<Value> = w
                .subs
                .export(Instant::now())
                .iter()
                .filter(|s| !s.reach.transport.is_reliable())
                .map(|s| saved_json(s, w.cseq.get(&s.id).copied().unwrap_or(0)))
                .collect();
            json!({ "saved_at": unix_now(), "clean": clean, "subscriptions": subs })
        };
        let tmp = path.with_extension("json.tmp");
        let written = serde_json::to_vec(&doc)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot save the subscriptions; they will not outlive a restart");
        }
    }

    /// Takes back the subscriptions saved at `path`, if any.
    pub(crate) fn restore_subscriptions(&self, path: &Path) {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the saved subscriptions");
                return;
            }
        };
        let Ok(doc) = serde_json::from_slice::<Value>(&text) else {
            tracing::warn!(path = %path.display(), "saved subscriptions unreadable; ignored (phones get 481 on their next refresh)");
            return;
        };
        let elapsed = unix_now().saturating_sub(doc["saved_at"].as_u64().unwrap_or(0));
        let skip = if doc["clean"].as_bool() == Some(true) {
            0
        } else {
            UNCLEAN_SKIP
        };
        let entries = doc["subscriptions"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        let restored: Vec<(Saved<Reach>, u32)> = entries
            .iter()
            .filter_map(|v| saved_of(v, elapsed, skip))
            .collect();
        let Ok(mut w) = self.watchers.lock() else {
            return;
        };
        let count = restored.len();
        let mut saved = Vec::with_capacity(count);
        for (s, cseq) in restored {
            w.cseq.insert(s.id.clone(), cseq);
            if s.package == Package::Presence {
                // Looked up at the first tick.
                w.online
                    .entry(s.watched.clone())
                    .or_insert(crate::watchers::Online {
                        registered: false,
                        recheck_at: Instant::now(),
                        checking: false,
                    });
            }
            saved.push(s);
        }
        w.subs.restore(saved, Instant::now());
        // Versions move on from here: what is on disk says unclean until the next save.
        w.dirty = true;
        tracing::info!(
            count,
            of = entries.len(),
            "subscriptions taken back after a restart"
        );
    }
}
