//! Forking (RFC 3261 §16.6): the request for each target with our Via and Record-Route, handed
//! to the proxy table; sending on a branch, and branches that fail at the transport.

use super::*;

impl App {
    /// Builds the request for every target (our Via, Record-Route, Route, Request-URI,
    /// anchored SDP) and hands them to the proxy table, which makes one client transaction
    /// each and sends.
    pub(super) fn fork(self: &Arc<Self>, msg: Message, ctx: Ctx, targets: Vec<Hop>) {
        let Some(key) = ctx.key.clone().or_else(|| TxKey::of(&msg)) else {
            return;
        };
        let branches = self.branches(&msg, &ctx, targets);
        let upstream = self.upstream(&msg, &ctx);
        self.with_proxy(|t| t.fork(key, msg, upstream, branches, Instant::now()));
    }

    /// The request for each target: our Via, Record-Route, Route, Request-URI, anchored SDP.
    pub(super) fn branches(
        &self,
        msg: &Message,
        ctx: &Ctx,
        targets: Vec<Hop>,
    ) -> Vec<NewBranch<Target>> {
        let mf = proxy::next_max_forwards(msg).unwrap_or(0);
        let step = proxy::route_step(msg, |u| self.passes_route(u));
        let hash = proxy::loop_hash(msg);
        let in_addr = self.interfaces.inbound(ctx.local, ctx.source);
        // Another node of the cluster is reached at its address, never by a flow.
        let came_over_cluster = self.came_over_cluster(ctx);
        let in_token = (Self::sender_needs_flow(msg, ctx) && !came_over_cluster).then(|| {
            Flow {
                transport: ctx.transport,
                conn: ctx.conn.map(|c| c.0),
                addr: ctx.source,
            }
            .encode(&self.cfg.secret)
        });
        let mut branches = Vec::with_capacity(targets.len());
        for Hop {
            uri,
            target,
            routes,
            branch,
            body,
            device: _,
            alternates,
        } in targets
        {
            let branch = branch.unwrap_or_else(|| proxy::branch(&hash, self.next_id()));
            if !alternates.is_empty()
                && let (Some(key), Some(aor)) = (ctx.key.clone(), late::callee_aor(msg))
            {
                self.alternate_flows
                    .add(&branch, key, &aor, alternates, Instant::now());
            }
            // A hop to another node leaves by our internal link (set by the lookup).
            let out_addr = target.local.unwrap_or_else(|| {
                self.interfaces
                    .outbound(target.transport, target.dest, ctx.local, ctx.source)
            });
            let target = Target {
                local: Some(out_addr),
                ..target
            };
            let via = via_at(target.transport, out_addr, &branch);
            // Record-Route (§16.6 step 4): once, or twice when the call changes transport or
            // interface, so each side reaches us where it can (RFC 5658): the top entry faces
            // the callee, the other the caller. An entry facing a UA behind NAT or on its own
            // connection carries a flow token so in-dialog requests find the way back to it;
            // when both sides need one, both entries are written.
            let record = msg.to_tag().is_none() || msg.method() == Method::Invite;
            let out_token = target.flow_token(&self.cfg.secret);
            let double = target.transport != ctx.transport
                || out_addr != in_addr
                || (in_token.is_some() && out_token.is_some());
            let rr_lines: Vec<String> = match (record, double) {
                (false, _) => Vec::new(),
                (true, true) => vec![
                    record_route_at(target.transport, out_addr, out_token.as_deref()),
                    record_route_at(ctx.transport, in_addr, in_token.as_deref()),
                ],
                (true, false) => vec![record_route_at(
                    ctx.transport,
                    in_addr,
                    in_token.as_deref().or(out_token.as_deref()),
                )],
            };
            let rr: Vec<&str> = rr_lines.iter().map(String::as_str).collect();
            let edit = RequestEdit {
                request_uri: (!uri.is_empty()).then_some(uri.as_str()),
                via: Some(&via),
                record_route: rr,
                push_routes: routes.iter().map(String::as_str).collect(),
                pop_routes: step.pop_routes,
                drop_last_route: step.strict_request_uri.is_some(),
                max_forwards: Some(mf),
            };
            let Ok(mut out) = Message::parse(edit.apply(msg), &self.cfg.parse_limits) else {
                continue;
            };
            if let Some(body) = body.as_deref()
                && let Some(with) = crate::media::with_body(&out, body)
            {
                out = with;
            }
            branches.push(NewBranch {
                branch,
                request: out,
                to: target,
                reliable: target.transport.is_reliable(),
            });
        }
        branches
    }

    /// Sends the first transmission of a branch; a transport failure (TCP connection refused,
    /// no route) ends the branch at once as a 503 (§16.9) instead of waiting for Timer B/F,
    /// after the device's next flow, if it has one, got a branch of its own.
    pub(super) fn send_branch(self: &Arc<Self>, branch: BranchKey, out: Outbound) {
        let Some(t) = self.transports() else { return };
        // Sent or queued at once when the socket or connection is there (a UDP failure comes
        // back as ICMP); only a connection to dial waits in a task.
        let Some(out) = t.try_send(out) else { return };
        let app = self.clone();
        tokio::spawn(async move {
            let dest = out.dest;
            if let Err(e) = t.send(out).await {
                tracing::info!(%dest, error = %e, "branch target unreachable");
                if !branch.is_cancel() {
                    app.try_next_flow(branch.branch()).await;
                }
                app.with_proxy(|t| t.branch_failed(&branch, Instant::now()));
            }
        });
    }

    /// The branch `branch` failed on its flow (430, or its transport): the device's next flow
    /// gets a branch of the same call (RFC 5626 §5.3), before the failure is counted, so the
    /// call does not end meanwhile.
    pub(super) async fn try_next_flow(self: &Arc<Self>, branch: &str) {
        let Some(mut alt) = self.alternate_flows.take(branch) else {
            return;
        };
        let Ok(bindings) = self.location.lookup(&alt.aor, unix_now()).await else {
            return;
        };
        while !alt.bindings.is_empty() {
            let id = alt.bindings.remove(0);
            let Some(b) = bindings.iter().find(|b| b.id == id) else {
                continue;
            };
            let Some(hop) = self.binding_hop(b).await else {
                continue;
            };
            let Some((msg, ctx)) = self.ringing_call(&alt.key) else {
                return;
            };
            let Some(hop) = self.with_media_for_late_branch(&msg, hop).await else {
                continue;
            };
            let hop = Hop {
                alternates: std::mem::take(&mut alt.bindings),
                ..hop
            };
            let branches = self.branches(&msg, &ctx, vec![hop]);
            let now = Instant::now();
            if self.with_proxy(|t| t.add_branches(&alt.key, branches, now)) == Some(true) {
                tracing::info!(aor = %alt.aor, call_id = msg.call_id().unwrap_or_default(),
                    "a flow of the device failed; trying its next flow");
            }
            return;
        }
    }

    /// ICMP said `dest` is unreachable: branches still waiting for any answer from it fail
    /// now (a stale binding must not hold a call for Timer B).
    pub(crate) fn proxy_unreachable(self: &Arc<Self>, transport: Transport, dest: SocketAddr) {
        let Ok(branches) = self
            .proxy
            .lock()
            .map(|t| t.unanswered_to(|to| to.transport == transport && to.dest == dest))
        else {
            return;
        };
        for branch in branches {
            tracing::info!(%dest, "branch target unreachable (ICMP)");
            self.with_proxy(|t| t.branch_failed(&branch, Instant::now()));
        }
    }
}
