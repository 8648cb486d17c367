//! Where a request goes (RFC 3261 §16.4-16.5): hop limits and loops, in-dialog requests along
//! our Record-Route (flow tokens), our users' bindings, other domains through the gateway, and
//! proxy authentication of our callers.

use super::*;
use crate::cluster::Owner;
use crate::media::{Callee, Caller};

impl App {
    /// Decides what to do with a request that is not for the registrar and forwards it.
    pub(super) async fn route_request(self: Arc<Self>, msg: Message, ctx: Ctx) {
        if msg.method() == Method::Bye
            && let Some(c) = msg.call_id()
        {
            self.cdr_bye(&msg);
            self.media.end(c);
            self.watch_call_ended(c);
        }
        match self.decide(&msg, &ctx).await {
            Ok(Routed {
                hops: mut targets,
                sleepers,
                replaces,
            }) => {
                let msg = match replaces
                    .and_then(|v| crate::blf::with_replaces(&msg, &v, &self.cfg.parse_limits))
                {
                    Some(m) => m,
                    None => msg,
                };
                let initial = msg.method() == Method::Invite && msg.to_tag().is_none();
                // Before forking: with no branch of its own, the request must already be held.
                let held = !sleepers.is_empty() && self.hold_for_sleepers(&msg, &ctx, sleepers);
                if (initial || held) && !self.came_over_cluster(&ctx) {
                    self.ringing_to_user(&msg, &ctx, &targets);
                }
                if initial && !self.came_over_cluster(&ctx) {
                    self.watch_call_started(&msg, &ctx);
                }
                // A request another node hands us for a device we hold was anchored there.
                let msg = if initial && !self.came_over_cluster(&ctx) {
                    let callees: Vec<Callee> = targets.iter().map(Hop::callee).collect();
                    let caller = Caller {
                        transport: ctx.transport,
                        source: ctx.source.ip(),
                        behind_nat: Self::sender_needs_flow(&msg, &ctx),
                    };
                    let hash = proxy::loop_hash(&msg);
                    let new_branch = || proxy::branch(&hash, self.next_id());
                    let anchored = self.media.initial(msg, caller, &callees, new_branch).await;
                    if let Some(c) = anchored.msg.call_id()
                        && self.media.is_anchored(c)
                    {
                        self.cdr_anchored(c);
                    }
                    for (hop, offer) in targets.iter_mut().zip(anchored.offers) {
                        hop.branch = Some(offer.branch);
                        hop.body = Some(offer.body);
                    }
                    anchored.msg
                } else {
                    self.media.request(msg, ctx.source.ip()).await
                };
                self.fork(msg, ctx, targets)
            }
            Err((code, bytes)) => {
                if msg.method() == Method::Invite {
                    self.answer_invite(&msg, &ctx, code, bytes);
                } else {
                    self.send_response(&msg, &ctx, code, bytes);
                }
            }
        }
    }

    /// Returns the targets (Request-URI, transport, address) or the answer to send.
    pub(super) async fn decide(&self, msg: &Message, ctx: &Ctx) -> Result<Routed, (u16, Bytes)> {
        let refuse = |code: u16, reason: &'static str| {
            (code, self.reply(msg, ctx, code).reason(reason).build())
        };
        // Our Via would take the request past the bound every careflow-sip enforces.
        if proxy::next_max_forwards(msg).is_none()
            || msg.values(HeaderName::Via).count() >= careflow_proto::MAX_VIAS
        {
            return Err(refuse(483, "Too Many Hops"));
        }
        if proxy::is_loop(msg, |v| self.interfaces.is_our_via(v)) {
            return Err(refuse(482, "Loop Detected"));
        }
        let step = proxy::route_step(msg, |u| self.passes_route(u));
        let in_dialog = msg.to_tag().is_some();
        if in_dialog {
            // In-dialog requests pass only along a route set we recorded; anything else would
            // make us an open relay.
            if !self.recorded_here(msg, step.pop_routes) && step.strict_request_uri.is_none() {
                return Err(refuse(403, "Not Routed Through Here"));
            }
            if step.next_route.is_none() {
                match self.flow_target(msg, ctx, step.pop_routes) {
                    Some(Ok(target)) => return Ok(vec![Hop::to(String::new(), target)].into()),
                    Some(Err(())) => {
                        // The flow is gone (its connection closed, or the node holding it
                        // died): the device may have registered again since, elsewhere.
                        return match self.rebound(msg).await {
                            Some(hop) => Ok(vec![hop].into()),
                            None => Err(refuse(430, "Flow Failed")),
                        };
                    }
                    None => {}
                }
            }
            let uri = match &step.next_route {
                Some(route) => careflow_proto::NameAddr::parse(route)
                    .map(|n| n.uri.raw.to_string())
                    .unwrap_or_default(),
                None => step
                    .strict_request_uri
                    .clone()
                    .unwrap_or_else(|| msg.request_uri_str().to_string()),
            };
            let target = self
                .resolve(&uri)
                .await
                .ok_or_else(|| refuse(404, "Not Found"))?;
            let new_uri = step.strict_request_uri.clone().unwrap_or_default();
            return Ok(vec![Hop::to(new_uri, target)].into());
        }
        if step.pop_routes > 0
            && let Some(delivery) = self.owner_delivery(msg, ctx, step.pop_routes)
        {
            return delivery
                .map(|t| vec![Hop::to(String::new(), t)].into())
                .map_err(|(code, reason)| refuse(code, reason));
        }
        if step.next_route.is_some() {
            return Err(refuse(403, "Relaying Denied"));
        }
        let ruri_text = msg.request_uri_str().to_string();
        let Some(ruri) = Uri::parse(&ruri_text) else {
            return Err(refuse(416, "Unsupported URI Scheme"));
        };
        let ours = ruri.user.is_some() && self.serves_domain(ruri.host.as_str());
        let from_ours = msg
            .from()
            .is_some_and(|f| self.serves_domain(f.uri.host.as_str()));
        if !ours {
            // Another domain: only our authenticated users, only through the configured gateway.
            let Some(gw) = self.cfg.outbound_gateway.clone() else {
                return Err(refuse(403, "Relaying Denied"));
            };
            if !from_ours {
                return Err(refuse(403, "Relaying Denied"));
            }
            self.authorize_caller(msg, ctx).await?;
            let target = self
                .resolve(&gw)
                .await
                .ok_or_else(|| refuse(503, "Gateway Unavailable"))?;
            return Ok(vec![Hop::to(String::new(), target)].into());
        }
        if !from_ours {
            // From outside to our users: only when peering is allowed, and then without our
            // credentials (the caller has none).
            if !self.cfg.allow_inbound {
                return Err(refuse(403, "Caller Not Served Here"));
            }
            return self.lookup_targets(msg, ctx, &ruri).await;
        }
        self.authorize_caller(msg, ctx).await?;
        let is_call = msg.method() == Method::Invite;
        // A BLF pickup names a ringing call it takes over (RFC 3891): to that call's caller.
        if is_call
            && let Some(replaces) = msg.other_header("Replaces")
            && let Some(picker) = msg.from().and_then(|f| f.uri.aor())
            && let Some(picked) =
                self.pickup_target(replaces, &picker, msg.call_id().unwrap_or_default())
        {
            // A pickup is a call of its own (to the caller's device) in the records.
            self.cdr_invite(msg, ctx, &ruri_text, None);
            return match picked {
                Ok((contact, target)) => Ok(vec![Hop::to(contact, target)].into()),
                Err(code) => {
                    self.cdr_failed(msg.call_id().unwrap_or_default(), code);
                    Err(refuse(code, "Pickup Not Allowed"))
                }
            };
        }
        // `**` + extension: take that colleague's ringing call (phones without BLF pickup).
        if is_call
            && let Some(picker) = msg.from().and_then(|f| f.uri.aor())
            && let Some(picked) =
                self.pickup_by_code(&ruri, &picker, msg.call_id().unwrap_or_default())
        {
            self.cdr_invite(msg, ctx, &ruri_text, None);
            return match picked {
                Ok((contact, target, replaces)) => Ok(Routed {
                    hops: vec![Hop::to(contact, target)],
                    sleepers: Vec::new(),
                    replaces: Some(replaces),
                }),
                Err(code) => {
                    self.cdr_failed(msg.call_id().unwrap_or_default(), code);
                    Err(refuse(
                        code,
                        if code == 403 {
                            "Pickup Not Allowed"
                        } else {
                            "No Call To Pick Up"
                        },
                    ))
                }
            };
        }
        let call_id = msg.call_id().unwrap_or_default();
        if is_call {
            self.metrics.calls_attempted.fetch_add(1, Ordering::Relaxed);
            tracing::info!(call_id, to = %ruri_text, source = %ctx.source, "call attempt");
            self.cdr_invite(msg, ctx, &ruri_text, ruri.aor());
        }
        let result = self.lookup_targets(msg, ctx, &ruri).await;
        if let (true, Err((code, _))) = (is_call, &result) {
            self.metrics.call_failed(*code);
            tracing::info!(call_id, code, "call failed");
            self.cdr_failed(call_id, *code);
        }
        result
    }

    /// Our user's bindings as targets (and the sleeping push devices a call or message waits
    /// for): 404 unknown, 480 not registered.
    pub(super) async fn lookup_targets(
        &self,
        msg: &Message,
        ctx: &Ctx,
        ruri: &Uri<'_>,
    ) -> Result<Routed, (u16, Bytes)> {
        let refuse = |code: u16, reason: &'static str| {
            (code, self.reply(msg, ctx, code).reason(reason).build())
        };
        // A store that cannot answer: the callee may well exist and be registered.
        let unavailable = || {
            (
                503,
                self.reply(msg, ctx, 503).header("Retry-After", 5).build(),
            )
        };
        let aor = ruri.aor().unwrap_or_default();
        let domain = ruri.host.as_str().to_ascii_lowercase();
        let user = scan::pct_decode(ruri.user.unwrap_or_default()).into_owned();
        match self.subscribers.auth_row(&user, &domain).await {
            Ok(Some(s)) if s.enabled => {}
            Ok(_) => return Err(refuse(404, "Not Found")),
            Err(e) => {
                self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, retryable = e.retryable(), callee = %aor,
                    "subscriber lookup of the callee failed; answering 503");
                return Err(unavailable());
            }
        }
        let bindings = match self.location.lookup(&aor, unix_now()).await {
            Ok(b) => b,
            Err(e) => {
                self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, retryable = e.retryable(), callee = %aor,
                    "location lookup failed; answering 503");
                return Err(unavailable());
            }
        };
        let mut targets = Vec::new();
        let mut sleepers = Vec::new();
        let wakes = matches!(msg.method(), Method::Invite | Method::Message);
        for b in preferred_flows(&bindings) {
            // A push device is reached once a push woke it (RFC 8599 §5.3), never over the
            // flow it may have lost when it was suspended.
            if let Some(p) = self.push.as_ref().and_then(|p| p.sleeper(b)) {
                if wakes {
                    sleepers.push((b.clone(), p));
                }
                continue;
            }
            if let Some(hop) = self.binding_hop(b).await {
                targets.push(Hop {
                    alternates: other_flows(&bindings, b),
                    ..hop
                });
            }
        }
        if targets.is_empty() && sleepers.is_empty() {
            return Err(refuse(480, "Temporarily Unavailable"));
        }
        Ok(Routed {
            hops: targets,
            sleepers,
            replaces: None,
        })
    }

    /// Proxy authentication (RFC 3261 §22.3): 407 until the caller proves it is the From user.
    pub(crate) async fn authorize_caller(
        &self,
        msg: &Message,
        ctx: &Ctx,
    ) -> Result<(), (u16, Bytes)> {
        let now = unix_now();
        let Some(from) = msg.from() else {
            return Err((400, self.reply(msg, ctx, 400).build()));
        };
        let realm = from.uri.host.as_str().to_ascii_lowercase();
        let user = scan::pct_decode(from.uri.user.unwrap_or_default()).into_owned();
        let digest = self.digest();
        let checked = match digest.prepare(msg, ctx, Challenger::Proxy, &realm, &user, now) {
            Ok(prepared) => digest.verify(msg, ctx, &realm, &prepared, now).await,
            Err(e) => Err(e),
        };
        checked.map_err(|e| digest.answer(msg, ctx, Challenger::Proxy, &realm, &e, now))
    }

    /// Forwards a request without a transaction (ACK for 2xx).
    pub(super) async fn stateless_forward(
        &self,
        msg: &Message,
        ctx: &Ctx,
    ) -> Option<(Target, Bytes)> {
        let step = proxy::route_step(msg, |u| self.passes_route(u));
        if !self.recorded_here(msg, step.pop_routes) && step.strict_request_uri.is_none() {
            return None;
        }
        let uri = match &step.next_route {
            Some(r) => careflow_proto::NameAddr::parse(r)?.uri.raw.to_string(),
            None => step
                .strict_request_uri
                .clone()
                .unwrap_or_else(|| msg.request_uri_str().to_string()),
        };
        let by_flow = match step.next_route {
            None => self.flow_target(msg, ctx, step.pop_routes),
            Some(_) => None,
        };
        let (target, routes) = match by_flow {
            Some(Ok(t)) => (t, Vec::new()),
            Some(Err(())) => {
                let hop = self.rebound(msg).await?;
                (hop.target, hop.routes)
            }
            None => (self.resolve(&uri).await?, Vec::new()),
        };
        let branch = proxy::branch(&proxy::loop_hash(msg), self.next_id());
        let via = via_at(
            target.transport,
            self.interfaces
                .outbound(target.transport, target.dest, ctx.local, ctx.source),
            &branch,
        );
        let edit = RequestEdit {
            request_uri: step.strict_request_uri.as_deref(),
            via: Some(&via),
            record_route: Vec::new(),
            push_routes: routes.iter().map(String::as_str).collect(),
            pop_routes: step.pop_routes,
            drop_last_route: step.strict_request_uri.is_some(),
            max_forwards: Some(proxy::next_max_forwards(msg)?),
        };
        Some((target, edit.apply(msg)))
    }

    /// The address and transport a URI leads to (IP literals and host names).
    pub(super) async fn resolve(&self, uri: &str) -> Option<Target> {
        let u = Uri::parse(uri)?;
        if !u.is_sip() {
            return None;
        }
        let transport = match u.params.get("transport").flatten() {
            Some(t) => t.parse().ok()?,
            None if u.is_sips() => Transport::Tls,
            None => Transport::Udp,
        };
        let port = u.port.unwrap_or(if transport == Transport::Tls {
            5061
        } else {
            5060
        });
        let dest = match u.host.ip() {
            Some(ip) => SocketAddr::new(ip, port),
            None => tokio::net::lookup_host((u.host.as_str(), port))
                .await
                .ok()?
                .next()?,
        };
        Some(Target::at(transport, dest))
    }

    /// The branch to a registered device: to the node that holds its flow when that is another
    /// node of the cluster (none when that node is gone or has restarted since), else to the
    /// device (see [`Self::binding_target`]).
    pub(super) async fn binding_hop(&self, b: &careflow_core::Binding) -> Option<Hop> {
        if let (Some(route), Some(cluster)) = (&b.owner, &self.cluster) {
            match cluster.owner_of(route) {
                Owner::Here(_) => {}
                Owner::At(node, transport) => {
                    return Some(Hop {
                        routes: vec![route.clone()],
                        device: Some(Callee {
                            transport: b.transport,
                            behind_nat: true,
                        }),
                        ..Hop::to(
                            b.contact.clone(),
                            Target {
                                local: Some(cluster.address()),
                                ..Target::at(transport, node)
                            },
                        )
                    });
                }
                Owner::Lost => {
                    self.metrics.cluster_skipped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(aor = %b.aor, contact = %careflow_core::push::redacted(&b.contact),
                        "binding of a node that is gone or restarted skipped");
                    return None;
                }
            }
        }
        let t = self.binding_target(b).await?;
        Some(Hop {
            routes: b.path.clone(),
            ..Hop::to(b.contact.clone(), t)
        })
    }

    /// Whether a request came over the internal link from another node of our cluster.
    pub(crate) fn came_over_cluster(&self, ctx: &Ctx) -> bool {
        self.cluster
            .as_ref()
            .is_some_and(|c| c.is_internal(ctx.local, ctx.source))
    }

    /// A request another node hands us for a device we hold: its top Route (ours, popped) is
    /// an owner route with our token. `None`: there is none; `Err`: refused (it did not come
    /// from a member over the internal link: 403; the flow is gone, or the token is of an
    /// earlier life of this node: 430, so the sender tries the device's other flows).
    fn owner_delivery(
        &self,
        msg: &Message,
        ctx: &Ctx,
        pop: usize,
    ) -> Option<Result<Target, (u16, &'static str)>> {
        let cluster = self.cluster.as_ref()?;
        let token = msg
            .values(HeaderName::Route)
            .take(pop)
            .filter_map(careflow_proto::NameAddr::parse)
            .find_map(|na| cluster.token(na.uri.user?))?;
        if !cluster.is_internal(ctx.local, ctx.source) {
            tracing::warn!(source = %ctx.source, "internal route from outside the cluster refused");
            return Some(Err((403, "Internal Route Refused")));
        }
        if !cluster.is_mine(&token) {
            return Some(Err((430, "Flow Failed")));
        }
        let flow = token.flow;
        let conn = flow.conn.map(ConnId);
        if let Some(c) = conn
            && !self.transports().is_some_and(|t| t.is_open(c, flow.addr))
        {
            return Some(Err((430, "Flow Failed")));
        }
        Some(Ok(Target {
            conn,
            flow: true,
            ..Target::at(flow.transport, flow.addr)
        }))
    }

    /// Where a registered device is reached: over the connection it registered on, or (UDP)
    /// at the address its REGISTER came from, which differs from its Contact behind NAT.
    async fn binding_target(&self, b: &careflow_core::Binding) -> Option<Target> {
        if let Some(first) = b.path.first() {
            // Behind an edge proxy: the request goes to it, with the Path as its route.
            let uri = careflow_proto::NameAddr::parse(first)?.uri.raw.to_string();
            return self.resolve(&uri).await;
        }
        if let Some(c) = b.conn {
            let open = self
                .transports()
                .is_some_and(|t| t.is_open(ConnId(c), b.source));
            // Closed: the binding is on its way out (the close handler removes it).
            return open.then_some(Target {
                conn: Some(ConnId(c)),
                flow: true,
                ..Target::at(b.transport, b.source)
            });
        }
        if b.behind_nat() {
            return Some(Target {
                flow: true,
                ..Target::at(Transport::Udp, b.source)
            });
        }
        self.resolve(&b.contact).await
    }

    /// In-dialog routing by the flow token in one of our Route entries: the connection or NAT
    /// address of the UA on the far side of the dialog. `None`: no token (route by URI);
    /// `Err`: the flow is gone (its connection closed).
    pub(super) fn flow_target(
        &self,
        msg: &Message,
        ctx: &Ctx,
        pop: usize,
    ) -> Option<Result<Target, ()>> {
        let arrival = (ctx.transport, ctx.source, ctx.conn.map(|c| c.0));
        let mut tokens = msg
            .values(HeaderName::Route)
            .take(pop)
            .filter_map(careflow_proto::NameAddr::parse)
            .filter_map(|na| Flow::decode(na.uri.user?, &self.cfg.secret))
            .filter(|f| !f.is_arrival(arrival.0, arrival.1, arrival.2))
            .peekable();
        tokens.peek()?;
        // The first flow still open: after a failover the route set also holds the far
        // side's flow on a node that is gone, or the sender's own earlier connection.
        let open = tokens.find(|f| {
            f.conn.is_none_or(|c| {
                self.transports()
                    .is_some_and(|t| t.is_open(ConnId(c), f.addr))
            })
        });
        Some(
            open.map(|flow| Target {
                conn: flow.conn.map(ConnId),
                ..Target::at(flow.transport, flow.addr)
            })
            .ok_or(()),
        )
    }

    /// Whether one of the Route entries popped is ours: an in-dialog request must have been
    /// routed through here (entries of a node that is gone alone do not make it so).
    fn recorded_here(&self, msg: &Message, pop: usize) -> bool {
        msg.values(HeaderName::Route)
            .take(pop)
            .filter_map(careflow_proto::NameAddr::parse)
            .any(|na| self.is_ours(&na.uri))
    }

    /// The far side of a dialog whose flow is gone, found again by its current binding: the
    /// To user's binding whose Contact is the Request-URI (a device that reconnected, or
    /// registered through another node after its node died, keeps its Contact).
    async fn rebound(&self, msg: &Message) -> Option<Hop> {
        let to = msg.to()?;
        if !self.serves_domain(to.uri.host.as_str()) {
            return None;
        }
        let aor = to.uri.aor()?;
        let ruri = msg.request_uri_str();
        let bindings = self.location.lookup(&aor, unix_now()).await.ok()?;
        let b = bindings
            .iter()
            .find(|b| b.contact.eq_ignore_ascii_case(ruri))?;
        let hop = self.binding_hop(b).await?;
        tracing::info!(aor = %aor, call_id = msg.call_id().unwrap_or_default(),
            "in-dialog request follows its device to its current flow");
        Some(Hop {
            uri: String::new(),
            ..hop
        })
    }

    /// Whether the request's sender must be reached through a flow: it is on a connection of
    /// its own, or its Contact names another IP than the one the request came from (NAT; a
    /// Contact on the sender's own IP is reachable as it is, whatever its port).
    pub(crate) fn sender_needs_flow(msg: &Message, ctx: &Ctx) -> bool {
        ctx.conn.is_some()
            || msg
                .contact()
                .is_some_and(|na| na.uri.host.ip() != Some(ctx.source.ip()))
    }
}

/// The other flows of `b`'s device (same `+sip.instance`, another `reg-id`), refreshed last
/// first: tried in turn when the branch to `b` fails (RFC 5626 §5.3).
fn other_flows(bindings: &[careflow_core::Binding], b: &careflow_core::Binding) -> Vec<u64> {
    let (Some(inst), Some(_)) = (&b.instance, b.reg_id) else {
        return Vec::new();
    };
    let mut others: Vec<&careflow_core::Binding> = bindings
        .iter()
        .filter(|o| o.id != b.id && o.reg_id.is_some() && o.instance.as_ref() == Some(inst))
        .collect();
    others.sort_by_key(|o| std::cmp::Reverse(o.expires_at));
    others.iter().map(|o| o.id).collect()
}

/// One binding per SIP Outbound instance (RFC 5626 §5.2): of the flows a device keeps
/// (several `reg-id`s), the one refreshed last (on a tie, registered last) carries requests;
/// other bindings all fork.
pub(super) fn preferred_flows(bindings: &[careflow_core::Binding]) -> Vec<&careflow_core::Binding> {
    let mut out: Vec<&careflow_core::Binding> = Vec::new();
    for b in bindings {
        let (Some(inst), Some(_)) = (&b.instance, b.reg_id) else {
            out.push(b);
            continue;
        };
        let same = out
            .iter()
            .position(|o| o.reg_id.is_some() && o.instance.as_ref() == Some(inst));
        match same {
            Some(i) if out[i].expires_at <= b.expires_at => out[i] = b,
            Some(_) => {}
            None => out.push(b),
        }
    }
    out
}
