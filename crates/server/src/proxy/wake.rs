//! Requests for sleeping devices (RFC 8599 §5.3): the request waits in the proxy table (held),
//! one push goes to each device whatever the retransmissions and challenge rounds, and the
//! device's next registration (on this node or another: the cluster says so) forks the
//! request to it once. A push the service refuses answers 404 (a token it no longer knows:
//! the binding is removed) or 480, with a Reason.

use careflow_core::Binding;
use careflow_core::push::{PushParams, Wait};
use careflow_push::{Failure, Kind, Notification};

use super::*;

/// A request's caller, as the push shows it before the INVITE arrives.
struct Caller {
    call_id: String,
    from_uri: String,
    display_name: String,
}

impl Caller {
    fn of(msg: &Message) -> Self {
        let from = msg.from();
        let from_uri = from
            .as_ref()
            .map(|f| f.uri.raw.to_string())
            .unwrap_or_default();
        let display_name = from
            .as_ref()
            .and_then(|f| f.display)
            .map(|d| d.trim_matches('"').to_string())
            .filter(|d| !d.is_empty())
            .or_else(|| {
                from.as_ref()
                    .and_then(|f| f.uri.user)
                    .map(|u| scan::pct_decode(u).into_owned())
            })
            .unwrap_or_default();
        Self {
            call_id: msg.call_id().unwrap_or_default().to_string(),
            from_uri,
            display_name,
        }
    }
}

impl App {
    /// `msg` (an INVITE or MESSAGE) is also for `sleepers`: it is held in the proxy table and
    /// each device that has no push out for it yet gets one. False when nothing waits (no
    /// push service, another method, or the request was answered meanwhile).
    pub(super) fn hold_for_sleepers(
        self: &Arc<Self>,
        msg: &Message,
        ctx: &Ctx,
        sleepers: Vec<(Binding, PushParams)>,
    ) -> bool {
        let Some(pusher) = self.push.clone() else {
            return false;
        };
        let kind = match msg.method() {
            Method::Invite => Kind::Call,
            Method::Message => Kind::Message,
            _ => return false,
        };
        let Some(key) = ctx.key.clone().or_else(|| TxKey::of(msg)) else {
            return false;
        };
        let now = Instant::now();
        let until = now + pusher.wait();
        let upstream = self.upstream(msg, ctx);
        if self.with_proxy(|t| t.hold(&key, msg, &upstream, until, now)) != Some(true) {
            return false;
        }
        if let Ok(mut r) = self.pushed_requests.lock() {
            r.entry(key.clone())
                .or_insert_with(|| (msg.clone(), ctx.clone()));
        }
        let caller = Arc::new(Caller::of(msg));
        for (b, p) in sleepers {
            if pusher.wait_for(&key, &b) == Wait::Waiting {
                continue;
            }
            tracing::info!(aor = %b.aor, device = %p.log_id(), provider = %p.provider,
                call_id = %caller.call_id, "device asleep: push sent, request held");
            let app = self.clone();
            let caller = caller.clone();
            tokio::spawn(async move { app.push_for(b, p, kind, &caller, now).await });
        }
        true
    }

    /// Sends the push to `b` for a waiting request; a refusal ends the wait of each request
    /// that waited for it.
    async fn push_for(
        self: Arc<Self>,
        b: Binding,
        p: PushParams,
        kind: Kind,
        caller: &Caller,
        since: Instant,
    ) {
        let Some(pusher) = self.push.clone() else {
            return;
        };
        let n = Notification {
            token: &p.prid,
            param: p.param.as_deref(),
            kind,
            call_id: &caller.call_id,
            from_uri: &caller.from_uri,
            display_name: &caller.display_name,
            instance: crate::push::instance_uuid(&b),
            ttl: pusher.wait().as_secs() as u32,
            now: unix_now(),
        };
        let Err(failure) = pusher.send(b.id, &p, &n, since).await else {
            return;
        };
        tracing::warn!(aor = %b.aor, device = %p.log_id(), provider = %p.provider,
            error = %failure, "push failed");
        if let Failure::NotOurs(_) = failure {
            // An app whose pushes our credentials cannot send (another publisher's build, e.g.
            // Linphone from the store): reached as any device, now and from now on.
            tracing::info!(aor = %b.aor, device = %p.log_id(),
                "push device of an app we cannot push to: called over its flow instead");
            pusher.not_ours(b.id);
            let calls = pusher.failed(b.id);
            self.fork_waiting(&b, &p, calls, false).await;
            return;
        }
        let (code, text) = match &failure {
            Failure::InvalidToken(_) => (404, "push token no longer valid"),
            Failure::Refused(_) | Failure::NotOurs(_) => (480, "push refused by the service"),
            Failure::Unavailable(_) => (480, "push service unavailable"),
        };
        if let Failure::InvalidToken(_) = failure {
            let id = b.id;
            match careflow_store::remove_bindings(self.location.as_ref(), &b.aor, |x| x.id == id)
                .await
            {
                Ok(n) if n > 0 => {
                    tracing::info!(aor = %b.aor, device = %p.log_id(),
                        "binding with an invalid push token removed")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(aor = %b.aor, error = %e, "cannot remove the binding of an invalid push token")
                }
            }
        }
        let now = Instant::now();
        for key in pusher.failed(b.id) {
            // A request that still waits for another device keeps waiting for it.
            let failure = (!pusher.call_waits(&key)).then_some((code, text));
            if failure.is_some() {
                self.with_proxy(|t| t.unhold(&key, failure, now));
            }
        }
    }

    /// `bindings` of `aor` as they are now: each push device that registered again since its
    /// push gets the requests that wait for it, once.
    pub(super) async fn wake_sleepers(self: &Arc<Self>, bindings: &[Binding]) {
        let Some(pusher) = self.push.clone() else {
            return;
        };
        for b in bindings {
            let Some(p) = pusher.sleeper(b) else {
                continue;
            };
            let calls = pusher.woke(b);
            if !calls.is_empty() {
                self.fork_waiting(b, &p, calls, true).await;
            }
        }
    }

    /// Forks the requests `keys` that waited for `b` to it (woken: it registered again; else
    /// its push could not be sent and it is reached as any device). A woken device whose
    /// request ended meanwhile gets its [`Self::farewell`].
    async fn fork_waiting(
        self: &Arc<Self>,
        b: &Binding,
        p: &PushParams,
        keys: Vec<TxKey>,
        woken: bool,
    ) {
        let Some(pusher) = self.push.clone() else {
            return;
        };
        let hop = self.binding_hop(b).await;
        for key in keys {
            let still_waits = pusher.call_waits(&key);
            let ringing = self.ringing_call(&key);
            let (Some(hop), Some((msg, ctx))) = (hop.clone(), ringing) else {
                if let (Some(hop), true) = (hop.clone(), woken) {
                    self.farewell(&b.aor, &key, p, hop);
                } else if !still_waits {
                    let now = Instant::now();
                    self.with_proxy(|t| t.unhold(&key, None, now));
                }
                continue;
            };
            let Some(hop) = self.with_media_for_late_branch(&msg, hop).await else {
                continue;
            };
            let flow = hop.flow_id();
            let branches = self.branches(&msg, &ctx, vec![hop]);
            let now = Instant::now();
            let added = self.with_proxy(|t| {
                let added = t.add_branches(&key, branches, now);
                if !still_waits {
                    t.unhold(&key, None, now);
                }
                added
            });
            if added == Some(true) {
                if woken {
                    pusher.stats.woken.fetch_add(1, Ordering::Relaxed);
                }
                tracing::info!(aor = %b.aor, call_id = msg.call_id().unwrap_or_default(), woken,
                    "request forked to the push device");
                self.ringing.update(&b.aor, &key, Some(flow));
            }
        }
    }

    /// A device woke for a request that ended meanwhile (answered elsewhere, cancelled): an
    /// iPhone still gets the INVITE, then a CANCEL (CallKit shows the push as a call that
    /// only a CANCEL ends); other devices get nothing.
    fn farewell(self: &Arc<Self>, aor: &str, key: &TxKey, p: &PushParams, hop: Hop) {
        let Some((msg, ctx)) = self
            .pushed_requests
            .lock()
            .ok()
            .and_then(|r| r.get(key).cloned())
        else {
            return;
        };
        if p.service() != Some(careflow_core::push::Provider::Apns)
            || msg.method() != Method::Invite
        {
            tracing::info!(
                aor,
                call_id = msg.call_id().unwrap_or_default(),
                "device woke after its call ended"
            );
            return;
        }
        tracing::info!(
            aor,
            call_id = msg.call_id().unwrap_or_default(),
            "iPhone woke after its call ended: INVITE then CANCEL, to clear its call screen"
        );
        let branches = self.branches(&msg, &ctx, vec![hop]);
        let now = Instant::now();
        self.with_proxy(|t| {
            for nb in branches {
                t.ring_and_cancel(nb, now);
            }
        });
    }
}
