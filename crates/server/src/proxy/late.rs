//! Late forking: a call still ringing gains a branch when its callee registers a device
//! (a new one, or the same one over a new flow: a phone that rebooted, a web tab that
//! reconnected through another node after its node died).

use super::*;

/// The callee AoR of an out-of-dialog request (its Request-URI).
pub(super) fn callee_aor(msg: &Message) -> Option<String> {
    let ruri = Uri::parse(msg.request_uri_str())?;
    ruri.user?;
    ruri.aor()
}

impl App {
    /// Remembers an out-of-dialog INVITE to one of our users as ringing, with the flows it was
    /// forked to.
    pub(super) fn ringing_to_user(&self, msg: &Message, ctx: &Ctx, targets: &[Hop]) {
        let Some(key) = ctx.key.clone() else { return };
        let Some(ruri) = Uri::parse(msg.request_uri_str()) else {
            return;
        };
        if ruri.user.is_none() || !self.serves_domain(ruri.host.as_str()) {
            return;
        }
        let Some(aor) = ruri.aor() else { return };
        let forked = targets.iter().map(Hop::flow_id).collect();
        self.ringing.add(&aor, key, forked, Instant::now());
    }

    /// `aor` registered a new flow: every call to it still ringing here gains a branch to each
    /// flow it was not forked to yet.
    pub(crate) async fn late_fork(self: &Arc<Self>, aor: &str) {
        let calls = self.ringing.calls(aor, Instant::now());
        if calls.is_empty() {
            return;
        }
        let Ok(bindings) = self.location.lookup(aor, unix_now()).await else {
            return;
        };
        self.wake_sleepers(&bindings).await;
        let mut hops = Vec::new();
        for b in route::preferred_flows(&bindings) {
            // A push device gets a call only as the push's wake-up (above).
            if self.push.as_ref().is_some_and(|p| p.sleeper(b).is_some()) {
                continue;
            }
            if let Some(h) = self.binding_hop(b).await {
                hops.push(h);
            }
        }
        for call in calls {
            let Some((msg, ctx)) = self.ringing_call(&call.key) else {
                self.ringing.update(aor, &call.key, None);
                continue;
            };
            let mut new: Vec<Hop> = Vec::new();
            for h in hops.iter().filter(|h| !call.forked.contains(&h.flow_id())) {
                if let Some(h) = self.with_media_for_late_branch(&msg, h.clone()).await {
                    new.push(h);
                }
            }
            if new.is_empty() {
                continue;
            }
            let ids: Vec<String> = new.iter().map(Hop::flow_id).collect();
            let branches = self.branches(&msg, &ctx, new);
            let now = Instant::now();
            if self.with_proxy(|t| t.add_branches(&call.key, branches, now)) == Some(true) {
                tracing::info!(
                    aor,
                    call_id = msg.call_id().unwrap_or_default(),
                    branches = ids.len(),
                    "late fork: the ringing call gained a branch"
                );
                for id in ids {
                    self.ringing.update(aor, &call.key, Some(id));
                }
            }
        }
    }

    /// A hop added to a ringing call, with its own rtpengine offer when the call's branches
    /// each have one; `None` when no media that works can be given to it.
    pub(super) async fn with_media_for_late_branch(&self, msg: &Message, hop: Hop) -> Option<Hop> {
        let branch = proxy::branch(&proxy::loop_hash(msg), self.next_id());
        match self.media.late_branch(msg, hop.callee(), &branch).await {
            crate::media::LateBranch::AsForked => Some(hop),
            crate::media::LateBranch::Offer(body) => Some(Hop {
                branch: Some(branch),
                body: Some(body),
                ..hop
            }),
            crate::media::LateBranch::No => {
                tracing::info!(
                    call_id = msg.call_id().unwrap_or_default(),
                    "no media for a late branch; the device is reached on the next call"
                );
                None
            }
        }
    }

    /// The INVITE of a call still ringing and where it came from (as its Ctx).
    pub(super) fn ringing_call(&self, key: &TxKey) -> Option<(Message, Ctx)> {
        let t = self.proxy.lock().ok()?;
        let (msg, up) = t.ringing(key)?;
        let ctx = Ctx {
            transport: up.to.transport,
            source: up.source,
            local: up.to.local,
            conn: up.to.conn,
            key: Some(key.clone()),
        };
        Some((msg.clone(), ctx))
    }
}
