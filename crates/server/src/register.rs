//! REGISTER: digest authentication, then the registrar rules applied to the location service.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use careflow_core::registrar::{self, ContactValue, Outcome, RegisterRequest, Reject};
use careflow_proto::{HeaderName, Message, scan};
use careflow_store::events::EventKind;

use crate::app::{App, Ctx};
use crate::auth::{AuthError, Challenger, Prepared};
use crate::clock::unix_now;

/// The answer to a REGISTER.
enum Answer {
    /// 401 with a fresh challenge: sent statelessly (no transaction is kept for it).
    Challenge(bytes::Bytes),
    /// Any other answer, kept by the transaction for retransmissions.
    Reply(u16, bytes::Bytes),
}

/// What [`App::precheck`] found.
struct Checked<'m> {
    aor: String,
    domain: String,
    auth: Prepared<'m>,
    contacts: Vec<ContactValue<'m>>,
    expires: Option<u32>,
}

/// Option tags this registrar supports (Require: anything else gets 420).
const SUPPORTED: &[&str] = &["outbound", "path"];

/// How often a UA with an outbound flow over a connection should send keep-alives (RFC 5626
/// §5.4 Flow-Timer), seconds; well inside common NAT and idle timeouts.
const FLOW_TIMER: u32 = 120;

/// The extensions a REGISTER uses (RFC 5626 outbound, RFC 3327 path).
struct Extensions<'m> {
    /// The UA supports outbound and registers a flow (`reg-id` with `+sip.instance`).
    outbound: bool,
    /// Path values, nearest proxy first.
    path: Vec<&'m str>,
    /// The UA said it supports path (so the 200 OK may carry Path).
    path_supported: bool,
}

fn has_tag(msg: &Message, tag: &str) -> bool {
    msg.values(HeaderName::Supported)
        .chain(msg.values(HeaderName::Require))
        .any(|t| t.eq_ignore_ascii_case(tag))
}

fn extensions<'m>(msg: &'m Message, contacts: &[ContactValue<'_>]) -> Extensions<'m> {
    let flow = contacts.iter().any(|c| match c {
        ContactValue::Address(na) => {
            na.params.get("reg-id").is_some() && na.params.get("+sip.instance").is_some()
        }
        ContactValue::Wildcard => false,
    });
    Extensions {
        outbound: flow && has_tag(msg, "outbound"),
        path: msg.values(HeaderName::Path).collect(),
        path_supported: has_tag(msg, "path"),
    }
}

impl App {
    /// Answers a REGISTER. Challenges (the first answer to every registration) are made
    /// before any store access and keep no transaction state. Everything runs on the receiving
    /// task until it must wait: with the embedded stores that is only the journal write that
    /// makes a new binding durable before its 200 (see
    /// [`crate::drain::handle_now_or_in_task`]).
    pub(crate) fn register_or_challenge(self: &Arc<Self>, msg: Message, ctx: Ctx) {
        let app = self.clone();
        crate::drain::handle_now_or_in_task(self, async move {
            // Boxed as routing is (see `App::spawn_routing`).
            match Box::pin(app.register(&msg, &ctx)).await {
                Answer::Challenge(bytes) => {
                    app.forget_transaction(&ctx);
                    app.send_response(&msg, &ctx, 401, bytes);
                }
                Answer::Reply(code, bytes) => app.send_response(&msg, &ctx, code, bytes),
            }
        });
    }

    /// Checks that need no store: extensions, AoR, contacts, credentials and nonce.
    fn precheck<'m>(&self, msg: &'m Message, ctx: &Ctx, now: u64) -> Result<Checked<'m>, Answer> {
        let unsupported: Vec<&str> = msg
            .values(HeaderName::Require)
            .filter(|t| !SUPPORTED.iter().any(|s| s.eq_ignore_ascii_case(t)))
            .collect();
        if !unsupported.is_empty() {
            let b = self
                .reply(msg, ctx, 420)
                .header("Unsupported", unsupported.join(", "));
            return Err(Answer::Reply(420, b.build()));
        }
        // validate() guaranteed To parses.
        let Some(to) = msg.to() else {
            return Err(Answer::Reply(400, self.reply(msg, ctx, 400).build()));
        };
        let (Some(aor), true) = (to.uri.aor(), to.uri.is_sip()) else {
            return Err(Answer::Reply(
                400,
                self.reply(msg, ctx, 400).reason("Bad To URI").build(),
            ));
        };
        let domain = to.uri.host.as_str().to_ascii_lowercase();
        if !self.serves_domain(&domain) {
            return Err(Answer::Reply(
                403,
                self.reply(msg, ctx, 403)
                    .reason("Domain Not Served")
                    .build(),
            ));
        }
        let user = scan::pct_decode(to.uri.user.unwrap_or_default());

        let mut contacts = Vec::new();
        for v in msg.values(HeaderName::Contact) {
            match ContactValue::parse(v) {
                Some(c) => contacts.push(c),
                None => {
                    return Err(Answer::Reply(
                        400,
                        self.reply(msg, ctx, 400).reason("Bad Contact").build(),
                    ));
                }
            }
        }
        let expires = msg
            .header(HeaderName::Expires)
            .and_then(scan::parse_u64)
            // Saturating: `Expires: 4294967296` must not wrap to 0 (an un-REGISTER); the
            // registrar caps it at MAX_EXPIRES.
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX));

        // Digest authentication (RFC 3261 §22.4).
        let digest = self.digest();
        let auth = digest
            .prepare(msg, ctx, Challenger::Registrar, &domain, &user, now)
            .map_err(|e| {
                let (code, bytes) =
                    digest.answer(msg, ctx, Challenger::Registrar, &domain, &e, now);
                match e {
                    AuthError::Missing | AuthError::Refused { .. } => Answer::Challenge(bytes),
                    AuthError::WrongIdentity | AuthError::Store => Answer::Reply(code, bytes),
                }
            })?;
        Ok(Checked {
            aor,
            domain,
            auth,
            contacts,
            expires,
        })
    }

    /// In a cluster, the route other nodes take to this device when only this node can reach
    /// it: it is on a connection to us, or a UDP device behind NAT (its NAT lets only our
    /// address in). Devices behind an edge proxy (Path) or on a reachable address need none.
    fn owner_route(
        &self,
        ctx: &Ctx,
        contacts: &[ContactValue<'_>],
        ext: &Extensions<'_>,
    ) -> Option<String> {
        let cluster = self.cluster.as_ref()?;
        let behind_nat = !ctx.transport.is_reliable()
            && contacts.iter().any(|c| {
                matches!(c, ContactValue::Address(na) if na.uri.host.ip() != Some(ctx.source.ip()))
            });
        if !ext.path.is_empty() || !(ctx.conn.is_some() || behind_nat) {
            return None;
        }
        Some(cluster.route_for(careflow_core::flow::Flow {
            transport: ctx.transport,
            conn: ctx.conn.map(|c| c.0),
            addr: ctx.source,
        }))
    }

    async fn register(&self, msg: &Message, ctx: &Ctx) -> Answer {
        let now = unix_now();
        let Checked {
            aor,
            domain,
            auth,
            contacts,
            expires,
        } = match self.precheck(msg, ctx, now) {
            Ok(c) => c,
            Err(answer) => return answer,
        };
        if let Err(e) = self.digest().verify(msg, ctx, &domain, &auth, now).await {
            let (code, bytes) =
                self.digest()
                    .answer(msg, ctx, Challenger::Registrar, &domain, &e, now);
            return Answer::Reply(code, bytes);
        }

        let ext = extensions(msg, &contacts);
        if ext.outbound && ext.path.is_empty() && msg.values(HeaderName::Via).count() > 1 {
            // A proxy between us and the UA would not keep the flow (RFC 5626 §6, step 2).
            let b = self
                .reply(msg, ctx, 439)
                .reason("First Hop Lacks Outbound Support");
            return Answer::Reply(439, b.build());
        }
        // RFC 8599 §5.6.1: a service we do not push through is refused (a device removing its
        // binding is not); one we serve is named in the 2xx.
        let push_caps = match self.push.as_ref().map(|p| p.registration(&contacts)) {
            Some(crate::push::Registration::Unserved(provider)) if expires != Some(0) => {
                tracing::info!(aor = %aor, provider = %provider, source = %ctx.source,
                    "registration for a push service we do not serve refused (555)");
                let b = self
                    .reply(msg, ctx, 555)
                    .reason("Push Notification Service Not Supported");
                return Answer::Reply(555, b.build());
            }
            Some(crate::push::Registration::Served(caps)) => Some(caps),
            _ => None,
        };
        let owner = self.owner_route(ctx, &contacts, &ext);
        let req = RegisterRequest {
            aor: &aor,
            call_id: msg.call_id().unwrap_or_default(),
            cseq: msg.cseq().map_or(0, |c| c.0),
            expires,
            contacts,
            transport: ctx.transport,
            source: ctx.source,
            user_agent: msg.header(HeaderName::UserAgent).map(scan::trim),
            // Behind an edge proxy (Path) the connection is the proxy's, not the device's.
            conn: ctx.conn.filter(|_| ext.path.is_empty()).map(|c| c.0),
            path: ext.path.clone(),
            owner: owner.as_deref(),
            now,
        };
        let cfg = self.cfg.registrar;
        // Whether a device is reachable over a flow it was not before (a new binding, or a
        // binding that moved to another connection, address or node): a call ringing for it
        // gains a branch.
        let new_flow = std::sync::atomic::AtomicBool::new(false);
        // Bindings that came and went with this REGISTER (for the live events).
        let added = std::sync::atomic::AtomicUsize::new(0);
        let removed = std::sync::atomic::AtomicUsize::new(0);
        let decide = |current: &[careflow_core::Binding]| {
            let r = registrar::apply(&cfg, current, &req, &mut || self.next_id());
            if let Ok(o) = &r {
                let new = o
                    .bindings
                    .iter()
                    .filter(|b| !current.iter().any(|c| c.id == b.id))
                    .count();
                let gone = current
                    .iter()
                    .filter(|c| !o.bindings.iter().any(|b| b.id == c.id))
                    .count();
                added.store(new, Ordering::Relaxed);
                removed.store(gone, Ordering::Relaxed);
                let moved = o.bindings.iter().any(|b| {
                    !current.iter().any(|c| {
                        c.id == b.id
                            && c.source == b.source
                            && c.conn == b.conn
                            && c.owner == b.owner
                    })
                });
                new_flow.store(moved, Ordering::Relaxed);
            }
            r
        };
        match self.location.update(&aor, &decide).await {
            Ok(Ok(outcome)) => {
                self.metrics.registrations.fetch_add(1, Ordering::Relaxed);
                if let Some(conn) = ctx.conn.filter(|_| ext.path.is_empty()) {
                    self.flows.bound(conn.0, &aor);
                }
                // A push device's every registration may be its wake-up (RFC 8599 §5.4: it
                // registers again on each push, often from the same address): requests
                // waiting for it are released wherever they wait.
                if new_flow.load(Ordering::Relaxed) || push_caps.is_some() {
                    if let Some(c) = &self.cluster {
                        c.registered(&aor);
                    }
                    if self.ringing.has(&aor)
                        && let Some(app) = self.me.upgrade()
                    {
                        let aor = aor.clone();
                        tokio::spawn(async move { app.late_fork(&aor).await });
                    }
                }
                self.presence_registered(&aor, &outcome.bindings, now);
                let detail = || {
                    serde_json::json!({
                        "transport": ctx.transport.to_string().to_ascii_lowercase(),
                        "source": ctx.source.to_string(),
                        "userAgent": msg.header(HeaderName::UserAgent),
                        "devices": outcome.bindings.len(),
                    })
                };
                // Nobody reads the events unless an event stream, a webhook or a cluster
                // relay does: the detail is not built for nothing (it formats an address).
                let events = self.cfg.events.has_readers();
                if events && added.load(Ordering::Relaxed) > 0 {
                    self.publish(EventKind::DeviceRegistered, &aor, detail());
                }
                if events && removed.load(Ordering::Relaxed) > 0 {
                    self.publish(EventKind::DeviceUnregistered, &aor, detail());
                }
                tracing::info!(
                    aor = %aor, contacts = outcome.bindings.len(), source = %ctx.source,
                    transport = %ctx.transport, "registered"
                );
                Answer::Reply(
                    200,
                    self.ok(msg, ctx, &outcome, &req, &ext, push_caps.as_deref()),
                )
            }
            Ok(Err(reject)) => {
                let (code, reason) = reject.status();
                tracing::info!(aor = %aor, code, reason, source = %ctx.source, "registration refused");
                let mut b = self.reply(msg, ctx, code).reason(reason);
                if let Reject::IntervalTooBrief(min) = reject {
                    b = b.header("Min-Expires", min);
                }
                Answer::Reply(code, b.build())
            }
            Err(e) => {
                self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, aor = %aor, "location update failed");
                // The device keeps its old binding and tries again (RFC 3261 §21.5.4).
                Answer::Reply(
                    503,
                    self.reply(msg, ctx, 503).header("Retry-After", 5).build(),
                )
            }
        }
    }

    fn ok(
        &self,
        msg: &Message,
        ctx: &Ctx,
        outcome: &Outcome,
        req: &RegisterRequest<'_>,
        ext: &Extensions<'_>,
        push_caps: Option<&str>,
    ) -> bytes::Bytes {
        let (own, now) = (&req.contacts, req.now);
        let mut b = self.reply(msg, ctx, 200);
        if let Some(caps) = push_caps {
            b = b.header("Feature-Caps", caps);
        }
        if ext.path_supported {
            for p in &ext.path {
                b = b.header("Path", p);
            }
        }
        if ext.outbound {
            b = b.header("Require", "outbound");
            if ctx.transport.is_reliable() {
                b = b.header("Flow-Timer", FLOW_TIMER);
            }
        }
        // One Contact line per binding with the expiry actually granted (RFC 3261 §10.3 step 8).
        // Another device's push token is not this one's business (RFC 8599).
        let mut line = String::new();
        for binding in &outcome.bindings {
            let mine = own.iter().any(|c| {
                matches!(c, ContactValue::Address(na) if na.uri.raw.eq_ignore_ascii_case(&binding.contact))
            });
            let contact = if mine {
                std::borrow::Cow::Borrowed(binding.contact.as_str())
            } else {
                careflow_core::push::redacted(&binding.contact)
            };
            line.clear();
            line.push('<');
            line.push_str(&contact);
            line.push_str(">;expires=");
            scan::push_decimal(&mut line, binding.expires_in(now));
            b = b.header("Contact", &line);
        }
        with_httpdate(now, |date| b.header("Date", date).build())
    }
}

/// Runs `f` with the Date header's text for `unix`: kept per thread for the second it names
/// (every 200 to a REGISTER carries one, and formatting it was 1.6% of a registration).
fn with_httpdate<R>(unix: u64, f: impl FnOnce(&str) -> R) -> R {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> =
            const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    DATE.with_borrow_mut(|(at, text)| {
        if *at != unix {
            *at = unix;
            *text = httpdate(unix);
        }
        f(text)
    })
}

/// RFC 7231 IMF-fixdate for the Date header.
fn httpdate(unix: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix / 86400;
    let secs = unix % 86400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kept_date_follows_the_clock() {
        for unix in [
            1_795_000_000,
            1_795_000_000,
            1_795_000_001,
            0,
            1_795_000_001,
        ] {
            assert_eq!(
                super::with_httpdate(unix, str::to_string),
                super::httpdate(unix)
            );
        }
    }

    #[test]
    fn httpdate_known_values() {
        assert_eq!(super::httpdate(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            super::httpdate(1_795_000_000),
            "Wed, 18 Nov 2026 11:06:40 GMT"
        );
    }
}
