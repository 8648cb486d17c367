//! Forking (RFC 3261 §16.6): one client transaction per target with our Via and
//! Record-Route, the first transmission, and branches that fail at the transport.

use super::*;

impl App {
    /// Creates the forward and one branch per target, and sends.
    pub(super) fn fork(self: &Arc<Self>, msg: Message, ctx: Ctx, targets: Vec<Hop>) {
        let Some(key) = ctx.key.clone().or_else(|| TxKey::of(&msg)) else {
            return;
        };
        let now = Instant::now();
        let mf = proxy::next_max_forwards(&msg).unwrap_or(0);
        let step = proxy::route_step(&msg, |u| self.is_ours(u));
        let hash = proxy::loop_hash(&msg);
        let is_invite = msg.method() == Method::Invite;
        let is_call = is_invite && msg.to().and_then(|t| t.tag()).is_none();
        let in_addr = self.inbound_addr(&ctx);
        let in_token = Self::sender_needs_flow(&msg, &ctx).then(|| {
            Flow {
                transport: ctx.transport,
                conn: ctx.conn.map(|c| c.0),
                addr: ctx.source,
            }
            .encode(&self.cfg.secret)
        });
        let mut sends = Sends::default();
        let Ok(mut t) = self.proxy.lock() else { return };
        // An INVITE's forward was made before routing (transaction first); a CANCEL or the
        // shutdown may have answered it meanwhile, and then nothing is forked.
        let made_before = match t.forwards.get(&key) {
            Some(fw) if fw.final_sent => {
                drop(t);
                if is_call {
                    self.media_end(msg.call_id().unwrap_or_default());
                }
                return;
            }
            Some(_) => true,
            None => false,
        };
        let mut invite = (is_invite && !made_before).then(|| {
            InviteServerTransaction::new(ctx.transport.is_reliable(), self.cfg.timers, now)
        });
        if let Some(inv) = invite.as_mut() {
            // 100 Trying at once (§16.2), so the caller stops retransmitting.
            let trying = ResponseBuilder::new(&msg, 100).source(ctx.source).build();
            inv.send_response(100, trying, now);
        }
        let mut first_sends = Vec::new();
        let mut names = Vec::new();
        for Hop {
            uri,
            target,
            routes,
            branch,
            body,
        } in targets
        {
            let branch = branch.unwrap_or_else(|| proxy::branch(&hash, self.next_id()));
            let out_addr = self.outbound_addr(target.transport, target.dest, &ctx);
            let target = Target {
                local: Some(out_addr),
                ..target
            };
            let via = Self::via_at(target.transport, out_addr, &branch);
            // Record-Route (§16.6 step 4): once, or twice when the call changes transport or
            // interface, so each side reaches us where it can (RFC 5658): the top entry faces
            // the callee, the other the caller. An entry facing a UA behind NAT or on its own
            // connection carries a flow token so in-dialog requests find the way back to it;
            // when both sides need one, both entries are written.
            let record = msg.to().and_then(|t| t.tag()).is_none() || msg.method() == Method::Invite;
            let out_token = target.flow_token(&self.cfg.secret);
            let double = target.transport != ctx.transport
                || out_addr != in_addr
                || (in_token.is_some() && out_token.is_some());
            let rr_lines: Vec<String> = match (record, double) {
                (false, _) => Vec::new(),
                (true, true) => vec![
                    Self::record_route_at(target.transport, out_addr, out_token.as_deref()),
                    Self::record_route_at(ctx.transport, in_addr, in_token.as_deref()),
                ],
                (true, false) => vec![Self::record_route_at(
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
            let Ok(mut out) = Message::parse(edit.apply(&msg), &self.cfg.parse_limits) else {
                continue;
            };
            if let Some(body) = body.as_deref()
                && let Some(with) = crate::media::with_body(&out, body)
            {
                out = with;
            }
            let mut tx =
                ClientTransaction::new(out, target.transport.is_reliable(), self.cfg.timers, now);
            let name = format!("{branch}|{}", msg.method_str());
            while let Some(bytes) = tx.poll_transmit() {
                first_sends.push((name.clone(), target.outbound(bytes)));
            }
            t.insert_branch(
                name,
                Branch {
                    tx,
                    forward: key.clone(),
                    target,
                    done: false,
                },
            );
            names.push(branch);
        }
        if names.is_empty() {
            drop(t);
            let resp = self.reply(&msg, &ctx, 500).build();
            if is_invite {
                self.answer_invite(&msg, &ctx, 500, resp);
            } else {
                self.send_back(&msg, &ctx, resp);
            }
            return;
        }
        if let Some(fw) = t.forwards.get_mut(&key).filter(|_| made_before) {
            fw.branches = names;
            fw.call = is_call;
            t.schedule_forward(&key);
            drop(t);
            for (name, out) in first_sends {
                self.send_branch(name, out);
            }
            return;
        }
        let mut fw = Forward {
            request: msg,
            ctx,
            invite,
            branches: names,
            best: None,
            final_sent: false,
            challenges: Vec::new(),
            call: is_call,
            local_final: false,
        };
        sends.0.extend(drain_forward(&mut fw).0);
        t.forwards.insert(key.clone(), fw);
        t.schedule_forward(&key);
        t.reap_forward(&key);
        drop(t);
        self.flush(sends);
        for (name, out) in first_sends {
            self.send_branch(name, out);
        }
    }

    /// Sends the first transmission of a branch; a transport failure (TCP connection refused,
    /// no route) ends the branch at once as a 503 (§16.9) instead of waiting for Timer B/F.
    pub(super) fn send_branch(self: &Arc<Self>, name: String, out: Outbound) {
        let Some(t) = self.transports() else { return };
        // Sent or queued at once when the socket or connection is there (a UDP failure comes
        // back as ICMP); only a connection to dial waits in a task.
        let Some(out) = t.try_send(out) else { return };
        let app = self.clone();
        tokio::spawn(async move {
            let dest = out.dest;
            if let Err(e) = t.send(out).await {
                tracing::info!(%dest, error = %e, "branch target unreachable");
                app.proxy_branch_failed(&name);
            }
        });
    }

    /// ICMP said `dest` is unreachable: branches still waiting for any answer from it fail
    /// now (a stale binding must not hold a call for Timer B).
    pub(crate) fn proxy_unreachable(self: &Arc<Self>, transport: Transport, dest: SocketAddr) {
        let names: Vec<String> = match self.proxy.lock() {
            Ok(t) => t
                .branches
                .iter()
                .filter(|(_, b)| {
                    !b.done
                        && b.target.transport == transport
                        && b.target.dest == dest
                        && b.tx.state() == ClientState::Calling
                })
                .map(|(n, _)| n.clone())
                .collect(),
            Err(_) => return,
        };
        for name in names {
            tracing::info!(%dest, "branch target unreachable (ICMP)");
            self.proxy_branch_failed(&name);
        }
    }

    pub(super) fn proxy_branch_failed(self: &Arc<Self>, name: &str) {
        let now = Instant::now();
        let mut sends = Sends::default();
        {
            let Ok(mut guard) = self.proxy.lock() else {
                return;
            };
            let t = &mut *guard;
            let Some(b) = t.branches.get_mut(name) else {
                return;
            };
            if b.done {
                return;
            }
            b.done = true;
            b.tx.abort();
            let key = b.forward.clone();
            if let Some(fw) = t.forwards.get_mut(&key)
                && fw.best.as_ref().is_none_or(|(c, _)| best::better(503, *c))
            {
                let resp = self.reply(&fw.request, &fw.ctx, 503).build();
                fw.best = Some((503, resp));
            }
            self.maybe_finish(t, &key, now);
            if let Some(fw) = t.forwards.get_mut(&key) {
                sends.0.extend(drain_forward(fw).0);
            }
            t.schedule_forward(&key);
            t.reap_branch(name);
        }
        self.flush(sends);
    }
}
