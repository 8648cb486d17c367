//! Call detail records (issue 20): the proxy tells [`careflow_core::cdr::CallRecords`] what
//! happens to each call (its authenticated INVITE, the branches' 18x and 2xx, the caller's
//! CANCEL, the final failure, the BYE), and every finished call's record is queued to one task
//! that writes it to the subscriber database, retrying while the database is away. Calls whose
//! BYE never comes are ended at `CDR_MAX_CALL`; records older than `CDR_RETENTION_DAYS` are
//! purged.

use std::sync::atomic::Ordering;
use std::time::Duration;

use careflow_core::cdr::{CallRecord, CallRecords, CallStart, Device, Disposition};
use careflow_proto::{HeaderName, Message};
use careflow_store::events::EventKind;
use tokio_util::sync::CancellationToken;

use crate::app::{App, Ctx};

/// Attempts to store one record before it is counted lost.
const WRITE_TRIES: u32 = 5;
/// How often calls past `CDR_MAX_CALL` are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Records written together at most.
const BATCH: usize = 256;
/// How long the writer gathers records before writing them together.
const GATHER: Duration = Duration::from_millis(100);
/// How often old records are purged.
const PURGE_EVERY: Duration = Duration::from_secs(3600);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn transport_name(t: careflow_core::Transport) -> String {
    t.to_string().to_ascii_lowercase()
}

/// The device a message's Contact and `User-Agent`/`Server` describe.
fn device_of(msg: &Message, agent: HeaderName) -> Device {
    let contact = msg.contact();
    Device {
        instance: contact.as_ref().and_then(|c| {
            c.params
                .get("+sip.instance")
                .flatten()
                .map(|v| v.trim_matches('"').to_string())
        }),
        user_agent: msg.header(agent).map(str::to_string),
        contact: contact.map(|c| c.uri.raw.to_string()),
        ..Device::default()
    }
}

impl App {
    fn with_cdr<R>(&self, f: impl FnOnce(&mut CallRecords) -> R) -> Option<R> {
        let cdr = self.cdr.as_ref()?;
        let mut calls = cdr.calls.lock().ok()?;
        Some(f(&mut calls))
    }

    fn queue_record(&self, rec: CallRecord) {
        let Some(cdr) = self.cdr.as_ref() else { return };
        tracing::info!(call_id = %rec.call_id, disposition = rec.disposition.as_str(),
            code = rec.final_code, talk_seconds = rec.talk_seconds(), "call record");
        if cdr.queue.try_send(rec).is_err() {
            self.metrics
                .call_records_lost
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!("call record queue full: the database is not keeping up; record lost");
        }
    }

    /// A finished call's events, once its record was stored (so a reader of the event finds
    /// the record): `call.ended` for its caller and callee, `call.missed` for a callee who
    /// did not answer.
    fn publish_call_end(&self, rec: &CallRecord) {
        if !self.cfg.events.has_readers() {
            return;
        }
        let detail = serde_json::json!({
            "callId": rec.call_id,
            "caller": rec.caller,
            "callee": rec.callee,
            "disposition": rec.disposition.as_str(),
            "talkSeconds": rec.talk_seconds(),
        });
        for user in std::iter::once(&rec.caller).chain(rec.callee.as_ref()) {
            self.publish(EventKind::CallEnded, user, detail.clone());
        }
        if let Some(callee) = &rec.callee
            && matches!(
                rec.disposition,
                Disposition::NoAnswer | Disposition::Cancelled | Disposition::Busy
            )
        {
            self.publish(EventKind::CallMissed, callee, detail);
        }
    }

    /// An authenticated INVITE of one of our callers is about to be routed to `dialled`.
    pub(crate) fn cdr_invite(
        &self,
        msg: &Message,
        ctx: &Ctx,
        dialled: &str,
        callee: Option<String>,
    ) {
        let (Some(call_id), Some(from)) = (msg.call_id(), msg.from()) else {
            return;
        };
        let start = CallStart {
            call_id: call_id.to_string(),
            from_tag: msg.from_tag().unwrap_or_default().to_string(),
            caller: from.uri.aor().unwrap_or_default(),
            caller_device: Device {
                source: Some(ctx.source.to_string()),
                transport: Some(transport_name(ctx.transport)),
                ..device_of(msg, HeaderName::UserAgent)
            },
            dialled: dialled.to_string(),
            callee,
        };
        if self.with_cdr(|c| c.invite(start, now_ms())) == Some(false) {
            self.metrics
                .call_records_lost
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The call's media is anchored at rtpengine.
    pub(crate) fn cdr_anchored(&self, call_id: &str) {
        self.with_cdr(|c| c.anchored(call_id));
    }

    /// A branch's response to a call's INVITE (18x: ringing; 2xx: answered, by that device).
    pub(crate) fn cdr_response(&self, msg: &Message) {
        if self.cdr.is_none() || msg.cseq().is_none_or(|c| c.1 != "INVITE") {
            return;
        }
        let (Some(call_id), Some(code)) = (msg.call_id(), msg.status()) else {
            return;
        };
        let now = now_ms();
        match code {
            180..=199 => {
                self.with_cdr(|c| c.provisional(call_id, code, now));
            }
            200..=299 => {
                let by = device_of(msg, HeaderName::Server);
                let by = Device {
                    user_agent: by
                        .user_agent
                        .or_else(|| msg.header(HeaderName::UserAgent).map(str::to_string)),
                    ..by
                };
                if let Some(Some((caller, callee))) =
                    self.with_cdr(|c| c.answered(call_id, by, now))
                    && self.cfg.events.has_readers()
                {
                    let detail =
                        serde_json::json!({"callId": call_id, "caller": caller, "callee": callee});
                    for user in std::iter::once(caller.clone()).chain(callee.clone()) {
                        self.publish(EventKind::CallAnswered, &user, detail.clone());
                    }
                }
            }
            _ => {}
        }
    }

    /// The caller CANCELled its call.
    pub(crate) fn cdr_cancel(&self, msg: &Message) {
        if let Some(call_id) = msg.call_id() {
            let reason = msg.other_header("Reason").map(str::to_string);
            self.with_cdr(|c| c.cancelled(call_id, reason));
        }
    }

    /// The call never connected: its final answer was `code`.
    pub(crate) fn cdr_failed(&self, call_id: &str, code: u16) {
        if let Some(Some(rec)) = self.with_cdr(|c| c.failed(call_id, code, None, now_ms())) {
            self.queue_record(rec);
        }
    }

    /// A BYE: the end of an answered call.
    pub(crate) fn cdr_bye(&self, msg: &Message) {
        let Some(call_id) = msg.call_id() else {
            return;
        };
        let reason = msg.other_header("Reason").map(str::to_string);
        let tag = msg.from_tag().unwrap_or_default();
        if let Some(Some(rec)) = self.with_cdr(|c| c.bye(call_id, tag, reason, now_ms())) {
            self.queue_record(rec);
        }
    }
}

/// Writes finished records to the database (retrying while it is away), ends calls past the
/// longest a call may last, and purges old records. At shutdown the queued records are
/// written before it returns.
pub(crate) async fn run(app: std::sync::Arc<App>, cancel: CancellationToken) {
    let Some(cfg) = app.cfg.cdr.clone() else {
        return;
    };
    let Some(mut rx) = app
        .cdr
        .as_ref()
        .and_then(|c| c.pending.lock().ok().and_then(|mut p| p.take()))
    else {
        return;
    };
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut purge = tokio::time::interval(PURGE_EVERY);
    purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                rx.close();
                let mut rest = Vec::new();
                while let Some(rec) = rx.recv().await {
                    rest.push(rec);
                }
                for batch in rest.chunks(BATCH) {
                    write(&app, &cfg, batch, &cancel).await;
                }
                return;
            }
            Some(rec) = rx.recv() => {
                // Records of the next 100 ms go in the same write: one transaction for many
                // calls costs the database about what one call's did.
                let mut batch = vec![rec];
                let until = tokio::time::Instant::now() + GATHER;
                while batch.len() < BATCH {
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some(r)) => batch.push(r),
                        _ => break,
                    }
                }
                write(&app, &cfg, &batch, &cancel).await;
            }
            _ = sweep.tick() => {
                for rec in app.with_cdr(|c| c.sweep(now_ms())).unwrap_or_default() {
                    tracing::warn!(call_id = %rec.call_id,
                        "call reached CDR_MAX_CALL without a BYE; its record ends it");
                    app.queue_record(rec);
                }
            }
            _ = purge.tick() => {
                if let Some(keep) = cfg.retention {
                    let before = now_ms().saturating_sub(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX));
                    match cfg.store.purge_calls(before).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(removed = n, "call records past CDR_RETENTION_DAYS purged"),
                        Err(e) => tracing::warn!(error = %e, "purging old call records failed; trying again in an hour"),
                    }
                }
            }
        }
    }
}

async fn write(
    app: &App,
    cfg: &crate::config::CdrConfig,
    batch: &[CallRecord],
    cancel: &CancellationToken,
) {
    let n = batch.len() as u64;
    let mut wait = Duration::from_millis(500);
    let published = || {
        for rec in batch {
            app.publish_call_end(rec);
        }
    };
    for attempt in 1..=WRITE_TRIES {
        match cfg.store.add_calls(&cfg.node, batch).await {
            Ok(()) => {
                app.metrics
                    .call_records_written
                    .fetch_add(n, Ordering::Relaxed);
                published();
                return;
            }
            Err(e) if e.retryable() && attempt < WRITE_TRIES && !cancel.is_cancelled() => {
                tracing::warn!(records = n, error = %e, attempt,
                    "storing call records failed; retrying");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Err(e) => {
                app.metrics
                    .call_records_lost
                    .fetch_add(n, Ordering::Relaxed);
                let first = batch.first().map_or("", |r| r.call_id.as_str());
                tracing::error!(records = n, first_call_id = first, error = %e,
                    "call records lost: the database refused them");
                published();
                return;
            }
        }
    }
}
