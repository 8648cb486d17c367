//! Responses from the branches, in arrival order (behind one still at rtpengine), handed to
//! the proxy table, which matches them to their branch and chooses what goes upstream
//! (RFC 3261 §16.7); a response for no branch of ours is relayed by its Via.

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
            if !self.media.response_needed(&msg) {
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
            let msg = if self.media.response_needed(&msg) {
                self.media.response(msg, source).await
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

    /// Hands a response to the proxy table, which matches it to its branch; one that
    /// matches no branch of ours is relayed by its Via.
    pub(super) fn relay_response(self: &Arc<Self>, msg: Message) {
        // 430 Flow Failed (or 408: the flow's device did not answer) from one flow of a device
        // with others: the next one is tried first (RFC 5626 §5.3).
        if matches!(msg.status(), Some(430 | 408))
            && let Some(branch) = msg.top_via_branch().map(str::to_string)
            && self.alternate_flows.has(&branch)
        {
            let app = self.clone();
            tokio::spawn(async move {
                app.try_next_flow(&branch).await;
                app.hand_to_table(msg);
            });
            return;
        }
        self.hand_to_table(msg);
    }

    fn hand_to_table(self: &Arc<Self>, msg: Message) {
        self.watch_response(&msg);
        self.cdr_response(&msg);
        self.pickup_answered(&msg);
        let matched = self.with_proxy(|t| t.handle_response(&msg, Instant::now()));
        if matched == Some(false) {
            // No transaction (e.g. a 2xx retransmitted after it ended): forward by Via.
            self.forward_response_statelessly(&msg);
        }
    }

    pub(super) fn forward_response_statelessly(self: &Arc<Self>, msg: &Message) {
        let mut vias = msg.values(HeaderName::Via);
        let (Some(top), Some(next)) = (
            vias.next().and_then(Via::parse),
            vias.next().and_then(Via::parse),
        ) else {
            return;
        };
        if !self.interfaces.is_our_via(&top) {
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
        self.send_out(Outbound {
            transport,
            dest: SocketAddr::new(ip, port),
            conn: None,
            local: None,
            bytes: strip_top_via(msg),
        });
    }
}
