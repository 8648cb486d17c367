//! Responses of the branches made into the answer upstream (RFC 3261 §16.7): provisionals and
//! every 2xx relayed, other finals held for the best, challenges merged, losing branches
//! CANCELled (§16.10), our own answers built.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use careflow_proto::rewrite::strip_top_via;
use careflow_proto::{Message, Method, ResponseBuilder, request};

use super::{BranchKey, Event, ProxyTable, Record, Transmit, Upstream};
use crate::proxy::best;
use crate::transaction::TxKey;
use crate::transaction::client::ClientTransaction;

impl<U: Clone, D: Clone> ProxyTable<U, D> {
    pub(super) fn on_branch_response(
        &mut self,
        key: &TxKey,
        code: u16,
        msg: &Message,
        now: Instant,
    ) {
        let Some(fw) = self.forwards.get_mut(key) else {
            return;
        };
        match code {
            100 => {}
            101..=199 => {
                if let Some(inv) = fw.invite.as_mut() {
                    inv.send_response(code, strip_top_via(msg), now);
                }
            }
            200..=299 => {
                let bytes = strip_top_via(msg);
                if let Some(inv) = fw.invite.as_mut() {
                    // Every 2xx goes upstream (several branches may answer; §16.7 step 5).
                    inv.send_response(code, bytes, now);
                    if !fw.final_sent {
                        fw.final_sent = true;
                        self.events.push_back(Event::Final { code, record: None });
                        if fw.call && fw.upstream.reports_call {
                            let call_id = call_id_of(&fw.request);
                            self.events.push_back(Event::CallAnswered { call_id, code });
                        }
                        self.cancel_pending(key, now);
                    }
                } else if !fw.final_sent {
                    self.send_final(key, code, bytes, now);
                }
            }
            _ => {
                if code == 401 || code == 407 {
                    fw.challenges.extend(best::challenge_lines(msg));
                }
                if fw.best.as_ref().is_none_or(|(b, _)| best::better(code, *b)) {
                    fw.best = Some((code, strip_top_via(msg)));
                }
                if (600..700).contains(&code) && fw.invite.is_some() {
                    // A 6xx ends the call (§16.7 step 5): no sleeping device is waited for.
                    fw.held_until = None;
                    self.cancel_pending(key, now);
                }
                self.maybe_finish(key, now);
            }
        }
        self.drain_forward(key);
    }

    /// A final of our own making (timeout, unreachable target, a device that did not wake)
    /// competes with the branches'; `why` becomes its Reason header (RFC 3326).
    pub(super) fn offer_local(&mut self, key: &TxKey, code: u16, why: Option<&str>) {
        let Some(fw) = self.forwards.get(key) else {
            return;
        };
        if fw
            .best
            .as_ref()
            .is_some_and(|(c, _)| !best::better(code, *c))
        {
            return;
        }
        let mut resp = local_response(
            &self.cfg.server_header,
            &fw.request,
            fw.upstream.source,
            code,
        );
        if let Some(text) = why {
            resp = resp.header("Reason", format!("SIP;cause={code};text=\"{text}\""));
        }
        let resp = resp.build();
        if let Some(fw) = self.forwards.get_mut(key) {
            fw.best = Some((code, resp));
        }
    }

    /// Sends the best final response once every branch has one (§16.7 step 6).
    pub(super) fn maybe_finish(&mut self, key: &TxKey, now: Instant) {
        let Some(fw) = self.forwards.get(key) else {
            return;
        };
        // Held for a sleeping device: its branch may yet come (a 2xx or 6xx ends it anyway).
        if fw.final_sent || fw.held_until.is_some() {
            return;
        }
        let all_done = fw
            .branches
            .iter()
            .all(|n| self.branches.get(n).is_none_or(|b| b.done));
        if !all_done {
            return;
        }
        let (code, bytes) = match &fw.best {
            Some((c, b)) => (*c, b.clone()),
            None => (
                408,
                local_response(
                    &self.cfg.server_header,
                    &fw.request,
                    fw.upstream.source,
                    408,
                )
                .build(),
            ),
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
            c if c != code => (
                c,
                local_response(&self.cfg.server_header, &fw.request, fw.upstream.source, c).build(),
            ),
            _ => (code, bytes),
        };
        let Some(fw) = self.forwards.get_mut(key) else {
            return;
        };
        fw.best = None;
        let call = fw.call.then(|| call_id_of(&fw.request));
        let reports = fw.upstream.reports_call;
        self.send_final(key, code, bytes, now);
        if let Some(call_id) = call {
            self.events.push_back(Event::MediaEnd {
                call_id: call_id.clone(),
            });
            if reports {
                self.events.push_back(Event::CallFailed { call_id, code });
            }
        }
    }

    /// Sends the final response of forward `key` upstream: through its INVITE server
    /// transaction (which retransmits it and absorbs the ACK), or once for a non-INVITE request.
    pub(super) fn send_final(&mut self, key: &TxKey, code: u16, bytes: Bytes, now: Instant) {
        let Some(fw) = self.forwards.get_mut(key) else {
            return;
        };
        fw.final_sent = true;
        match fw.invite.as_mut() {
            Some(inv) => {
                inv.send_response(code, bytes, now);
                self.events.push_back(Event::Final { code, record: None });
            }
            None => {
                let upstream = fw.upstream.clone();
                self.answer_non_invite(key.clone(), &upstream, code, bytes);
            }
        }
    }

    /// A final response to a request without an INVITE server transaction: sent once, and
    /// handed to the driver's non-INVITE server transaction.
    pub(super) fn answer_non_invite(
        &mut self,
        key: TxKey,
        upstream: &Upstream<U>,
        code: u16,
        bytes: Bytes,
    ) {
        self.transmits.push_back(Transmit::Upstream {
            to: upstream.to.clone(),
            bytes: bytes.clone(),
        });
        self.events.push_back(Event::Final {
            code,
            record: Some(Record {
                key,
                response: bytes,
                reliable: upstream.reliable,
            }),
        });
    }

    /// CANCELs every branch of `key` that has no final response yet (§16.10).
    pub(super) fn cancel_pending(&mut self, key: &TxKey, now: Instant) {
        let Some(fw) = self.forwards.get(key) else {
            return;
        };
        for name in fw.branches.clone() {
            self.cancel_branch(&name, now);
        }
    }

    pub(super) fn cancel_branch(&mut self, name: &BranchKey, now: Instant) {
        let Some(b) = self.branches.get(name) else {
            return;
        };
        let cancel_key = name.cancel_of();
        if b.done
            || b.tx.request().method() != Method::Invite
            || self.branches.contains_key(&cancel_key)
        {
            return;
        }
        let Ok(cancel) =
            Message::parse(request::cancel_for(b.tx.request()), &self.cfg.parse_limits)
        else {
            return;
        };
        let reliable = b.tx.is_reliable();
        let (forward, to) = (b.forward.clone(), b.to.clone());
        let tx = ClientTransaction::new(cancel, reliable, self.cfg.timers, now);
        self.insert_branch(cancel_key, tx, forward, to);
    }
}

/// A response of ours to a forwarded request, with what every response of ours carries.
pub(super) fn local_response<'m>(
    server_header: &str,
    request: &'m Message,
    source: SocketAddr,
    code: u16,
) -> ResponseBuilder<'m> {
    ResponseBuilder::new(request, code)
        .source(source)
        .to_tag(crate::proxy::local_tag(request))
        .header("Server", server_header)
}

pub(super) fn call_id_of(msg: &Message) -> Box<str> {
    msg.call_id().unwrap_or_default().into()
}
