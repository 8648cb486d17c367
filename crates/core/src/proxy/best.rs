//! Choosing the response that goes back to the caller of a forked request (RFC 3261 §16.7
//! steps 6 and 7): which final response is best, what a downstream 503 becomes, and the
//! challenges of every branch merged into the 401/407 that is sent.

use bytes::Bytes;
use careflow_proto::{HeaderName, Message, ParseLimits};

/// Whether final response `new` is a better answer for the caller than `old`, the best so
/// far (§16.7 step 6): a 6xx beats everything (it also ends the search); otherwise the lowest
/// class wins, 3xx, then 4xx, then 5xx; among 4xx the ones the caller can act on (401 and 407
/// to authenticate, 415, 420, 484) come first. A tie keeps the one received first.
pub fn better(new: u16, old: u16) -> bool {
    rank(new) < rank(old)
}

fn rank(code: u16) -> u8 {
    match code {
        600..=699 => 0,
        300..=399 => 1,
        401 | 407 | 415 | 420 | 484 => 2,
        400..=499 => 3,
        500..=599 => 4,
        _ => 5,
    }
}

/// The status sent upstream for a downstream final `code` (§16.7 step 6): a 503 from a branch
/// says that *that* element is overloaded, not us, so the caller gets 500 instead (and does not
/// back off from us). Our own 503 (shutting down, overloaded) is sent as it is.
pub fn upstream_status(code: u16, ours: bool) -> u16 {
    if code == 503 && !ours { 500 } else { code }
}

/// The challenge header lines (`WWW-Authenticate`/`Proxy-Authenticate`, whole lines with
/// CRLF) of a 401/407 from a branch, to be collected for §16.7 step 7.
pub fn challenge_lines(resp: &Message) -> Vec<String> {
    resp.fields()
        .iter()
        .filter(|f| {
            matches!(
                f.name,
                HeaderName::WwwAuthenticate | HeaderName::ProxyAuthenticate
            )
        })
        .map(|f| String::from_utf8_lossy(resp.field_line(f)).into_owned())
        .collect()
}

/// The chosen 401/407 with its own challenge lines replaced by all collected ones (which
/// include its own, so nothing is lost or repeated); everything else byte for byte.
pub fn with_challenges(resp: &Bytes, challenges: &[String], limits: &ParseLimits) -> Bytes {
    let Ok(m) = Message::parse(resp.clone(), limits) else {
        return resp.clone();
    };
    let mut out =
        Vec::with_capacity(resp.len() + challenges.iter().map(String::len).sum::<usize>());
    out.extend_from_slice(m.start_line_bytes());
    for f in m.fields() {
        if !matches!(
            f.name,
            HeaderName::WwwAuthenticate | HeaderName::ProxyAuthenticate
        ) {
            out.extend_from_slice(m.field_line(f));
        }
    }
    for c in challenges {
        out.extend_from_slice(c.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(m.body());
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The best of `codes` when they arrive in this order.
    fn pick(codes: &[u16]) -> u16 {
        let mut best = None;
        for &c in codes {
            if best.is_none_or(|b| better(c, b)) {
                best = Some(c);
            }
        }
        best.unwrap_or(0)
    }

    #[test]
    fn the_best_final_response_follows_section_16_7() {
        assert_eq!(pick(&[486, 603, 302]), 603, "a 6xx wins whenever it comes");
        assert_eq!(pick(&[500, 486]), 486, "4xx before 5xx");
        assert_eq!(pick(&[486, 302, 500]), 302, "the lowest class: 3xx");
        assert_eq!(pick(&[486, 407]), 407, "a challenge before another 4xx");
        assert_eq!(pick(&[404, 480, 486]), 404, "a tie keeps the first");
        assert_eq!(pick(&[408, 503]), 408);
        assert_eq!(pick(&[401, 407]), 401);
    }

    #[test]
    fn a_downstream_503_goes_up_as_500_ours_stays() {
        assert_eq!(upstream_status(503, false), 500);
        assert_eq!(upstream_status(503, true), 503);
        assert_eq!(upstream_status(486, false), 486);
    }

    #[test]
    fn challenges_of_every_branch_are_merged_into_the_chosen_one() {
        let limits = ParseLimits::default();
        let resp = |realm: &str| {
            Bytes::from(format!(
                "SIP/2.0 407 Proxy Authentication Required\r\nVia: SIP/2.0/UDP a;branch=z9hG4bKx\r\nProxy-Authenticate: Digest realm=\"{realm}\", nonce=\"n\"\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
            ))
        };
        let a = resp("a.example");
        let b = resp("b.example");
        let mut lines = challenge_lines(&Message::parse(a.clone(), &limits).unwrap());
        lines.extend(challenge_lines(&Message::parse(b, &limits).unwrap()));
        assert_eq!(lines.len(), 2);
        let merged = with_challenges(&a, &lines, &limits);
        let text = String::from_utf8(merged.to_vec()).unwrap();
        assert_eq!(text.matches("Proxy-Authenticate:").count(), 2, "{text}");
        assert!(text.contains("a.example") && text.contains("b.example"));
        assert!(text.starts_with("SIP/2.0 407 ") && text.ends_with("\r\n\r\n"));
        let m = Message::parse(merged, &limits).unwrap();
        assert_eq!(m.call_id(), Some("c"));
    }
}
