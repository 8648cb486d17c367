//! Proxy decisions of RFC 3261 §16 that need no I/O: Max-Forwards, loop detection, branch
//! values and Route processing (here; the server applies them with `careflow_proto::rewrite`),
//! the choice of the best response ([`best`]) and the proxy's transactions ([`table`]).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use careflow_proto::{HeaderName, Message, NameAddr, Uri, Via};

pub mod best;
pub mod table;

pub use table::{
    BranchKey, Event, Fork, Full, NewBranch, ProxyConfig, ProxyTable, Record, Transmit, Upstream,
};

/// The To tag of every response we generate to `msg`: the same for every response of a
/// transaction, so a resent response and a recomputed one agree, and an ACK for one of ours
/// is recognised by it.
pub fn local_tag(msg: &Message) -> String {
    let mut h = DefaultHasher::new();
    msg.call_id().hash(&mut h);
    msg.from_tag().hash(&mut h);
    let mut tag = String::with_capacity(18);
    tag.push_str("cf");
    push_hex(&mut tag, h.finish(), false);
    tag
}

/// Appends `n` in lower-case hex to `out`: all 16 digits with `pad`, else without leading
/// zeros (as `{:016x}` and `{:x}` would; these values are made for every forwarded request and
/// every response of ours, and `fmt` costs several times the hashing).
fn push_hex(out: &mut String, n: u64, pad: bool) {
    let start = out.len();
    crate::flow::push_hex(out, &n.to_be_bytes());
    if !pad {
        let zeros = out[start..]
            .bytes()
            .take_while(|&c| c == b'0')
            .count()
            .min(15);
        out.drain(start..start + zeros);
    }
}

/// Max-Forwards handling (§16.3 step 3, §16.6 step 3): the value to forward with, or `None`
/// when the request has used up its hops (answer 483).
pub fn next_max_forwards(msg: &Message) -> Option<u32> {
    match msg.header(HeaderName::MaxForwards) {
        None => Some(70),
        Some(v) => match careflow_proto::scan::parse_u64(v) {
            Some(0) | None => None,
            Some(n) => Some((n.min(255) - 1) as u32),
        },
    }
}

/// The part of our branch values that identifies a request independent of the hop (§16.6
/// step 8): Request-URI as received, From and To tags, Call-ID, CSeq number and Route. A request
/// that comes back to us with these unchanged is a loop; one whose Request-URI changed is a
/// spiral and is forwarded.
pub fn loop_hash(msg: &Message) -> String {
    let mut h = DefaultHasher::new();
    msg.request_uri_str().hash(&mut h);
    msg.from_tag().hash(&mut h);
    msg.to_tag().hash(&mut h);
    msg.call_id().hash(&mut h);
    msg.cseq().map(|c| c.0).hash(&mut h);
    for r in msg.headers_named(HeaderName::Route) {
        r.trim().hash(&mut h);
    }
    let mut hash = String::with_capacity(16);
    push_hex(&mut hash, h.finish(), true);
    hash
}

/// A branch for a request we forward: magic cookie, loop hash, and a part unique per
/// client transaction.
pub fn branch(loop_hash: &str, unique: u64) -> String {
    let cookie = careflow_proto::MAGIC_COOKIE;
    let mut b = String::with_capacity(cookie.len() + loop_hash.len() + 17);
    b.push_str(cookie);
    b.push_str(loop_hash);
    b.push('.');
    push_hex(&mut b, unique, false);
    b
}

/// Loop detection (§16.3 step 4): a Via of ours carrying the branch prefix this request
/// would get again. The hash is made only when a Via of ours with one of our branches is
/// there: almost every request has none.
pub fn is_loop(msg: &Message, is_our_via: impl Fn(&Via<'_>) -> bool) -> bool {
    let cookie = careflow_proto::MAGIC_COOKIE;
    let mut hash: Option<String> = None;
    msg.values(HeaderName::Via).filter_map(Via::parse).any(|v| {
        let Some(rest) = v.branch().and_then(|b| b.strip_prefix(cookie)) else {
            return false;
        };
        if !is_our_via(&v) {
            return false;
        }
        let hash = hash.get_or_insert_with(|| loop_hash(msg));
        rest.strip_prefix(hash.as_str())
            .is_some_and(|r| r.starts_with('.'))
    })
}

/// What Route processing (§16.4) decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteStep {
    /// How many Route values at the top name us: remove them (loose routing; two when we
    /// recorded the route once per transport).
    pub pop_routes: usize,
    /// The previous hop was a strict router: the Request-URI is ours and the real target is
    /// the last Route value, which becomes the Request-URI (and is removed).
    pub strict_request_uri: Option<String>,
    /// The Route value that decides the next hop, when one remains.
    pub next_route: Option<String>,
}

/// Applies §16.4 to a received request; `is_ours` says whether a URI names this proxy.
pub fn route_step(msg: &Message, is_ours: impl Fn(&Uri<'_>) -> bool) -> RouteStep {
    let routes: Vec<&str> = msg.values(HeaderName::Route).collect();
    let mut step = RouteStep {
        pop_routes: 0,
        strict_request_uri: None,
        next_route: None,
    };
    let mut start = 0;
    if msg.request_uri().is_some_and(|u| is_ours(&u)) && !routes.is_empty() {
        // Strict-router compatibility (§16.4): our Record-Route (without lr) was put into the
        // Request-URI by a strict router; the original Request-URI is the last Route.
        if let Some(last) = routes.last().and_then(|r| NameAddr::parse(r)) {
            step.strict_request_uri = Some(last.uri.raw.to_string());
        }
    }
    while routes
        .get(start)
        .and_then(|r| NameAddr::parse(r))
        .is_some_and(|r| is_ours(&r.uri))
    {
        start += 1;
    }
    step.pop_routes = start;
    let end = if step.strict_request_uri.is_some() {
        routes.len().saturating_sub(1)
    } else {
        routes.len()
    };
    if start < end {
        step.next_route = routes.get(start).map(|r| r.to_string());
    }
    step
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use careflow_proto::ParseLimits;

    use super::*;

    fn msg(extra: &str, ruri: &str) -> Message {
        let s = format!(
            "INVITE {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKa\r\n{extra}From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\r\n"
        );
        Message::parse(Bytes::from(s), &ParseLimits::default()).unwrap()
    }

    fn ours(u: &Uri<'_>) -> bool {
        u.host.as_str() == "proxy.example.com"
    }

    #[test]
    fn max_forwards() {
        assert_eq!(next_max_forwards(&msg("", "sip:b@example.com")), Some(70));
        assert_eq!(
            next_max_forwards(&msg("Max-Forwards: 70\r\n", "sip:b@example.com")),
            Some(69)
        );
        assert_eq!(
            next_max_forwards(&msg("Max-Forwards: 1\r\n", "sip:b@example.com")),
            Some(0)
        );
        assert_eq!(
            next_max_forwards(&msg("Max-Forwards: 0\r\n", "sip:b@example.com")),
            None
        );
    }

    #[test]
    fn hex_as_fmt_writes_it() {
        for n in [
            0,
            1,
            0xf,
            0x10,
            0xdead_beef,
            u64::MAX,
            1 << 63,
            0x0123_4567_89ab_cdef,
        ] {
            let (mut padded, mut short) = (String::new(), String::new());
            push_hex(&mut padded, n, true);
            push_hex(&mut short, n, false);
            assert_eq!(padded, format!("{n:016x}"));
            assert_eq!(short, format!("{n:x}"));
        }
        assert_eq!(
            branch("00ff00ff00ff00ff", 0xabc),
            format!("{}00ff00ff00ff00ff.abc", careflow_proto::MAGIC_COOKIE)
        );
    }

    #[test]
    fn loop_and_spiral() {
        let first = msg("", "sip:b@example.com");
        let br = branch(&loop_hash(&first), 7);
        let looped = msg(
            &format!("Via: SIP/2.0/UDP proxy.example.com;branch={br}\r\n"),
            "sip:b@example.com",
        );
        // The loop hash of the looped request equals the first one (Via does not count).
        assert_eq!(loop_hash(&looped), loop_hash(&first));
        assert!(is_loop(&looped, |v| v.host.as_str() == "proxy.example.com"));
        let spiral = msg(
            &format!("Via: SIP/2.0/UDP proxy.example.com;branch={br}\r\n"),
            "sip:b@192.0.2.7",
        );
        assert!(!is_loop(&spiral, |v| v.host.as_str() == "proxy.example.com"));
        assert!(!is_loop(&looped, |v| v.host.as_str() == "elsewhere.example.com"));
    }

    #[test]
    fn loose_and_strict_routing() {
        let m = msg(
            "Route: <sip:proxy.example.com;lr>, <sip:next.example.net;lr>\r\n",
            "sip:b@192.0.2.7",
        );
        let s = route_step(&m, ours);
        assert_eq!(s.pop_routes, 1);
        assert_eq!(s.next_route.as_deref(), Some("<sip:next.example.net;lr>"));
        assert_eq!(s.strict_request_uri, None);
        let m = msg("Route: <sip:proxy.example.com;lr>\r\n", "sip:b@192.0.2.7");
        assert_eq!(
            route_step(&m, ours),
            RouteStep {
                pop_routes: 1,
                strict_request_uri: None,
                next_route: None
            }
        );
        // A strict router put our URI in the Request-URI and the target in the last Route.
        let m = msg("Route: <sip:b@192.0.2.7>\r\n", "sip:proxy.example.com");
        let s = route_step(&m, ours);
        assert_eq!(s.strict_request_uri.as_deref(), Some("sip:b@192.0.2.7"));
        assert_eq!(s.next_route, None);
        let m = msg("", "sip:b@example.com");
        assert_eq!(
            route_step(&m, ours),
            RouteStep {
                pop_routes: 0,
                strict_request_uri: None,
                next_route: None
            }
        );
    }
}
