//! Responses from the branches: matched to their client transaction, relayed in arrival order
//! (behind one still at rtpengine), and the best final one chosen once every branch has
//! answered (RFC 3261 §16.7).

use super::*;

impl App {
    /// A response arrived: match it to the branch that sent the request. Responses of a call
    /// leave in the order they arrived: one whose SDP goes through rtpengine first holds the
    /// call's later responses behind it (a 200 must never overtake the 183 still at rtpengine).
    pub(crate) fn proxy_response(self: &Arc<Self>, msg: Message, source: IpAddr) {
        let call_id = msg.call_id().unwrap_or_default();
        {
            let Ok(mut held) = self.held_responses.lock() else {
                return;
            };
            if let Some(q) = held.get_mut(call_id) {
                q.push_back((msg, source));
                return;
            }
            if !self.media_response_needed(&msg) {
                drop(held);
                self.relay_response(msg);
                return;
            }
            held.insert(call_id.to_string(), std::collections::VecDeque::new());
        }
        let app = self.clone();
        tokio::spawn(async move { app.relay_in_order(msg, source).await });
    }

    /// Relays `msg` (after rtpengine, when its SDP is anchored), then whatever of the same call
    /// arrived meanwhile, in order.
    pub(super) async fn relay_in_order(self: Arc<Self>, first: Message, source: IpAddr) {
        let call_id = first.call_id().unwrap_or_default().to_string();
        let mut next = Some((first, source));
        while let Some((msg, source)) = next {
            let msg = if self.media_response_needed(&msg) {
                self.media_response(msg, source).await
            } else {
                msg
            };
            self.relay_response(msg);
            next = match self.held_responses.lock() {
                Ok(mut held) => match held.get_mut(&call_id).and_then(|q| q.pop_front()) {
                    Some(m) => Some(m),
                    None => {
                        held.remove(&call_id);
                        None
                    }
                },
                Err(_) => None,
            };
        }
    }

    pub(super) fn relay_response(self: &Arc<Self>, msg: Message) {
        let Some(via) = msg.top_via() else { return };
        let Some(branch) = via.branch() else { return };
        let Some((_, method)) = msg.cseq() else {
            return;
        };
        let name = format!("{branch}|{method}");
        let now = Instant::now();
        let mut sends = Sends::default();
        {
            let Ok(mut guard) = self.proxy.lock() else {
                return;
            };
            let t = &mut *guard;
            let Some(b) = t.branches.get_mut(&name) else {
                drop(guard);
                // No transaction (e.g. a 2xx retransmitted after it ended): forward by Via.
                self.forward_response_statelessly(&msg);
                return;
            };
            let pass = b.tx.handle_response(&msg, now);
            let target = b.target;
            while let Some(bytes) = b.tx.poll_transmit() {
                sends.0.push(target.outbound(bytes));
            }
            let code = msg.status().unwrap_or(0);
            let fwd_key = b.forward.clone();
            if pass && method != "CANCEL" {
                if code >= 200 {
                    b.done = true;
                }
                let bytes = strip_top_via(&msg);
                self.on_branch_response(t, &fwd_key, code, bytes, now, &mut sends);
            }
            t.schedule_branch(&name);
            t.schedule_forward(&fwd_key);
            t.reap_branch(&name);
        }
        self.flush(sends);
    }

    pub(super) fn forward_response_statelessly(self: &Arc<Self>, msg: &Message) {
        let mut vias = msg.values(HeaderName::Via);
        let (Some(top), Some(next)) = (
            vias.next().and_then(Via::parse),
            vias.next().and_then(Via::parse),
        ) else {
            return;
        };
        if !self.is_our_via(&top) {
            return;
        }
        let Some(ip) = next
            .received()
            .and_then(|r| r.parse().ok())
            .or_else(|| next.host.ip())
        else {
            return;
        };
        let port = next
            .rport()
            .flatten()
            .and_then(|p| p.parse().ok())
            .or(next.port)
            .unwrap_or(5060);
        let transport = next.transport.parse().unwrap_or(Transport::Udp);
        self.flush(Sends(vec![Outbound {
            transport,
            dest: SocketAddr::new(ip, port),
            conn: None,
            local: None,
            bytes: strip_top_via(msg),
        }]));
    }

    pub(super) fn on_branch_response(
        &self,
        t: &mut ProxyTables,
        key: &TxKey,
        code: u16,
        bytes: Bytes,
        now: Instant,
        sends: &mut Sends,
    ) {
        let Some(fw) = t.forwards.get_mut(key) else {
            return;
        };
        match code {
            100 => {}
            101..=199 => {
                if let Some(inv) = fw.invite.as_mut() {
                    inv.send_response(code, bytes, now);
                }
            }
            200..=299 => {
                if fw.invite.is_some() {
                    // Every 2xx goes upstream (several branches may answer; RFC 3261 §16.7).
                    if let Some(inv) = fw.invite.as_mut() {
                        inv.send_response(code, bytes, now);
                    }
                    if !fw.final_sent {
                        fw.final_sent = true;
                        self.metrics.response(code);
                        if fw.call {
                            self.metrics.calls_answered.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(
                                call_id = fw.request.call_id().unwrap_or_default(),
                                code,
                                "call answered"
                            );
                        }
                        let names = fw.branches.clone();
                        cancel_pending(self, t, key, &names, now, sends);
                    }
                } else if !fw.final_sent {
                    fw.final_sent = true;
                    let (request, ctx) = (fw.request.clone(), fw.ctx.clone());
                    self.send_response(&request, &ctx, code, bytes);
                }
            }
            _ => {
                if (code == 401 || code == 407)
                    && let Ok(m) = Message::parse(bytes.clone(), &self.cfg.parse_limits)
                {
                    fw.challenges.extend(best::challenge_lines(&m));
                }
                if fw.best.as_ref().is_none_or(|(b, _)| best::better(code, *b)) {
                    fw.best = Some((code, bytes));
                }
                if (600..700).contains(&code) && fw.invite.is_some() {
                    let names = fw.branches.clone();
                    cancel_pending(self, t, key, &names, now, sends);
                }
                self.maybe_finish(t, key, now);
            }
        }
        if let Some(fw) = t.forwards.get_mut(key) {
            sends.0.extend(drain_forward(fw).0);
        }
    }

    /// Sends the best final response once every branch has one (§16.7 step 6).
    pub(super) fn maybe_finish(&self, t: &mut ProxyTables, key: &TxKey, now: Instant) {
        let Some(fw) = t.forwards.get(key) else {
            return;
        };
        if fw.final_sent {
            return;
        }
        let all_done = fw.branches.iter().all(|n| {
            t.branches
                .get(&format!("{n}|{}", fw.request.method_str()))
                .is_none_or(|b| b.done)
        });
        if !all_done {
            return;
        }
        let Some(fw) = t.forwards.get_mut(key) else {
            return;
        };
        fw.final_sent = true;
        let (code, bytes) = match fw.best.take() {
            Some(b) => b,
            None => (408, self.reply(&fw.request, &fw.ctx, 408).build()),
        };
        // §16.7 step 7: a 401/407 carries the challenges of every branch that sent one.
        let bytes = if (code == 401 || code == 407) && !fw.challenges.is_empty() {
            best::with_challenges(&bytes, &fw.challenges, &self.cfg.parse_limits)
        } else {
            bytes
        };
        // §16.7 step 6: a 503 from downstream becomes 500 upstream (ours, when shutting
        // down, stays a 503 with its Retry-After).
        let (code, bytes) = match best::upstream_status(code, fw.local_final) {
            c if c != code => (c, self.reply(&fw.request, &fw.ctx, c).build()),
            _ => (code, bytes),
        };
        self.metrics.response(code);
        if fw.call {
            self.media_end(fw.request.call_id().unwrap_or_default());
            self.metrics.call_failed(code);
            tracing::info!(
                call_id = fw.request.call_id().unwrap_or_default(),
                code,
                "call failed"
            );
        }
        match fw.invite.as_mut() {
            Some(inv) => {
                inv.send_response(code, bytes, now);
            }
            None => {
                let (request, ctx) = (fw.request.clone(), fw.ctx.clone());
                self.send_response(&request, &ctx, code, bytes);
            }
        }
    }
}
