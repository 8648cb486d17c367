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
        if ruri.user.is_none() || !self.serves_domain(&ruri.host.as_str().to_ascii_lowercase()) {
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
        let mut hops = Vec::new();
        for b in route::preferred_flows(&bindings) {
            if let Some(h) = self.binding_hop(b).await {
                hops.push(h);
            }
        }
        for call in calls {
            let Some((msg, ctx)) = self.ringing_call(&call.key) else {
                self.ringing.update(aor, &call.key, None);
                continue;
            };
            let call_id = msg.call_id().unwrap_or_default();
            let new: Vec<Hop> = hops
                .iter()
                .filter(|h| !call.forked.contains(&h.flow_id()))
                // A call whose branches got rtpengine offers of their own: a late one would
                // need its own too (not made yet); the device is reached on the next call.
                .filter(|h| self.media.late_branch_fits(call_id, h.callee()))
                .cloned()
                .collect();
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
