//! NOTIFYs: the due ones rendered from the state now (dialog-info or PIDF) and sent over the
//! watcher's flow, retransmitted over UDP until answered; the answers to them.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use careflow_core::dialog_event::info::render;
use careflow_core::dialog_event::presence::{Availability, render_pidf};
use careflow_core::dialog_event::subscriptions::{Due, Package};
use careflow_proto::Message;
use careflow_transport::Outbound;

use super::NOTIFY_BRANCH;
use crate::app::App;
use crate::interfaces::via_at;
use crate::watchers::{Reach, Unanswered};

impl App {
    /// Sends every NOTIFY that is due (and the retransmissions of unanswered ones).
    pub(crate) fn send_due_notifies(&self, now: Instant) {
        let (notifies, again, gone) = {
            let Ok(mut w) = self.watchers.lock() else {
                return;
            };
            let (again, gone) = w.retransmissions(now);
            for id in &gone {
                w.subs.drop_sub(id);
                w.dirty = true;
            }
            let due = w.subs.poll_due(now);
            let mut out = Vec::with_capacity(due.len());
            if !due.is_empty() {
                w.dirty = true;
            }
            for d in due {
                let legs = w.legs_of(&d.watched);
                let entity = format!("sip:{}", d.watched);
                let body = match d.package {
                    Package::Dialog => render(&entity, d.version, &legs, d.reach.quirks),
                    Package::Presence => {
                        let registered = w.online.get(&d.watched).is_some_and(|o| o.registered);
                        render_pidf(&entity, Availability::of(registered, &legs))
                    }
                };
                let cseq = w.next_cseq(&d.id);
                let branch = format!("{NOTIFY_BRANCH}{}", self.next_id());
                let bytes = notify(&d, &branch, cseq, &body);
                let o = Outbound {
                    transport: d.reach.transport,
                    dest: d.reach.dest,
                    conn: d.reach.conn,
                    local: Some(d.reach.local),
                    bytes: bytes.into(),
                };
                let first_retry = if d.reach.transport.is_reliable() {
                    Duration::from_secs(32)
                } else {
                    Duration::from_millis(500)
                };
                w.unanswered.insert(
                    branch,
                    Unanswered {
                        sub: d.id.clone(),
                        out: Outbound {
                            bytes: bytes::Bytes::clone(&o.bytes),
                            ..o
                        },
                        sent: 1,
                        next: now + first_retry,
                    },
                );
                if d.expires_in.is_none() {
                    w.cseq.remove(&d.id);
                }
                out.push(o);
            }
            (out, again, gone)
        };
        for id in gone {
            tracing::info!(call_id = %id.call_id, "watcher did not answer its NOTIFY; subscription ended");
        }
        for o in notifies.into_iter().chain(again) {
            self.metrics.notifies_sent.fetch_add(1, Ordering::Relaxed);
            self.send_out(o);
        }
    }

    /// An answer to one of our NOTIFYs (true when it was one): a 481 (or any final failure
    /// but 408 and 5xx) ends the subscription, the watcher having forgotten it.
    pub(crate) fn notify_answered(&self, msg: &Message, branch: &str) -> bool {
        if !branch.starts_with(NOTIFY_BRANCH) {
            return false;
        }
        let code = msg.status().unwrap_or(0);
        if code < 200 {
            return true;
        }
        if let Ok(mut w) = self.watchers.lock()
            && let Some(u) = w.unanswered.remove(branch)
            && (300..500).contains(&code)
            && code != 408
        {
            tracing::info!(call_id = %u.sub.call_id, code, "watcher refused a NOTIFY; subscription ended");
            w.subs.drop_sub(&u.sub);
            w.dirty = true;
        }
        true
    }
}

/// A NOTIFY of `d` with `body`.
fn notify(d: &Due<Reach>, branch: &str, cseq: u32, body: &str) -> String {
    let r = &d.reach;
    let state = match d.expires_in {
        Some(secs) => format!("active;expires={secs}"),
        None => "terminated;reason=timeout".to_string(),
    };
    format!(
        "NOTIFY {contact} SIP/2.0\r\nVia: {via};rport\r\nMax-Forwards: 70\r\nFrom: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} NOTIFY\r\nContact: <sip:{local};transport={transport}>\r\nEvent: {event}\r\nSubscription-State: {state}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\n\r\n{body}",
        contact = r.contact,
        via = via_at(r.transport, r.local, branch),
        from = r.us,
        to = r.watcher,
        call_id = d.id.call_id,
        local = crate::interfaces::fmt_addr(r.local),
        transport = r.transport,
        event = d.package.as_str(),
        content_type = d.package.content_type(),
        len = body.len(),
    )
}
