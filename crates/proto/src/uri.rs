//! SIP URIs (RFC 3261 §19.1), borrowed from the message text.

use crate::name_addr::Params;
use crate::scan;

/// A parsed URI. For `sip:`/`sips:` every part is split out; other schemes (tel:, urn:, http:)
/// keep everything after the colon in `opaque`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uri<'a> {
    /// The whole URI text.
    pub raw: &'a str,
    /// Scheme, as written (compare case-insensitively).
    pub scheme: &'a str,
    /// User part, still %-escaped.
    pub user: Option<&'a str>,
    /// Password part of userinfo (deprecated, but legal).
    pub password: Option<&'a str>,
    /// Host: a name, an IPv4 address or a bracketed IPv6 reference.
    pub host: Host<'a>,
    /// Port, when given.
    pub port: Option<u16>,
    /// URI parameters, after the first `;` (without it).
    pub params: Params<'a>,
    /// Headers after `?` (without it).
    pub headers: Option<&'a str>,
    /// For non-SIP schemes: everything after `scheme:`.
    pub opaque: Option<&'a str>,
}

/// The host of a URI or Via.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host<'a>(pub &'a str);

impl<'a> Host<'a> {
    /// The host as written, brackets included for IPv6.
    pub fn as_str(&self) -> &'a str {
        self.0
    }

    /// The host without IPv6 brackets, for address parsing.
    pub fn unbracketed(&self) -> &'a str {
        self.0
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(self.0)
    }

    /// Parses the host as an IP address when it is one.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        self.unbracketed().parse().ok()
    }
}

impl<'a> Uri<'a> {
    /// Parses a URI. Whitespace anywhere inside it is an error.
    pub fn parse(raw: &'a str) -> Option<Self> {
        let raw = scan::trim(raw);
        let b = raw.as_bytes();
        // One pass finds the scheme's colon and the last '@' and refuses control bytes and
        // spaces: URIs are short, and a `memchr` search per delimiter cost more than this.
        let (mut colon, mut at) = (None, None);
        for (i, &c) in b.iter().enumerate() {
            match c {
                0..=b' ' | 0x7f => return None,
                b':' if colon.is_none() => colon = Some(i),
                b'@' => at = Some(i),
                _ => {}
            }
        }
        let colon = colon?;
        let scheme = &raw[..colon];
        let mut sb = scheme.bytes();
        if !sb.next()?.is_ascii_alphabetic()
            || !sb.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        {
            return None;
        }
        let rest = &raw[colon + 1..];
        if !(scheme.eq_ignore_ascii_case("sip") || scheme.eq_ignore_ascii_case("sips")) {
            if rest.is_empty() {
                return None;
            }
            return Some(Self {
                raw,
                scheme,
                user: None,
                password: None,
                host: Host(""),
                port: None,
                params: Params::new(""),
                headers: None,
                opaque: Some(rest),
            });
        }
        // The user part may contain ';' '?' and ':' (RFC 4475 §3.1.1.2), but '@' is never
        // unescaped after it, so the last '@' ends the userinfo (the scheme has none).
        let (userinfo, hostpart) = match at {
            Some(at) => (Some(&raw[colon + 1..at]), &raw[at + 1..]),
            None => (None, rest),
        };
        let (user, password) = match userinfo {
            Some(ui) => match ui.bytes().position(|c| c == b':') {
                Some(c) => (Some(&ui[..c]), Some(&ui[c + 1..])),
                None => (Some(ui), None),
            },
            None => (None, None),
        };
        if user == Some("") {
            return None;
        }
        // Parameters start at the first ';' before the first '?', which starts the headers.
        let (mut semi, mut question) = (None, None);
        for (i, c) in hostpart.bytes().enumerate() {
            match c {
                b';' if semi.is_none() => semi = Some(i),
                b'?' => {
                    question = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let (hostport, headers) = match question {
            Some(q) => (&hostpart[..q], Some(&hostpart[q + 1..])),
            None => (hostpart, None),
        };
        let (hostport, params) = match semi {
            Some(s) => (&hostport[..s], &hostport[s + 1..]),
            None => (hostport, ""),
        };
        let (host, port) = split_host_port(hostport)?;
        if !valid_host(host) {
            return None;
        }
        Some(Self {
            raw,
            scheme,
            user,
            password,
            host: Host(host),
            port,
            params: Params::new(params),
            headers,
            opaque: None,
        })
    }

    /// True for `sip:` and `sips:`.
    pub fn is_sip(&self) -> bool {
        self.opaque.is_none()
    }

    /// True for `sips:`.
    pub fn is_sips(&self) -> bool {
        self.scheme.eq_ignore_ascii_case("sips")
    }

    /// The address-of-record key `user@host`: user %-decoded, host lower-cased. Used to key
    /// the location service so that equivalent URIs (RFC 3261 §19.1.4) meet.
    pub fn aor(&self) -> Option<String> {
        let user = scan::pct_decode(self.user?);
        let mut s = String::with_capacity(user.len() + 1 + self.host.0.len());
        s.push_str(&user);
        s.push('@');
        for c in self.host.0.chars() {
            s.push(c.to_ascii_lowercase());
        }
        Some(s)
    }
}

/// Splits `host[:port]`, handling IPv6 references.
pub(crate) fn split_host_port(hp: &str) -> Option<(&str, Option<u16>)> {
    if hp.starts_with('[') {
        let end = hp.find(']')?;
        let host = &hp[..=end];
        let rest = &hp[end + 1..];
        if rest.is_empty() {
            return Some((host, None));
        }
        let port = rest.strip_prefix(':')?;
        return Some((host, Some(parse_port(port)?)));
    }
    match hp.bytes().rposition(|c| c == b':') {
        Some(c) => Some((&hp[..c], Some(parse_port(&hp[c + 1..])?))),
        None => Some((hp, None)),
    }
}

fn parse_port(p: &str) -> Option<u16> {
    let v = scan::parse_u64(p)?;
    u16::try_from(v).ok()
}

fn valid_host(h: &str) -> bool {
    if let Some(inner) = h.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Uri::parse` as it was written first, on `str` searches.
    fn reference_parse(raw: &str) -> Option<Uri<'_>> {
        let raw = scan::trim(raw);
        if raw.is_empty() || raw.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return None;
        }
        let colon = raw.find(':')?;
        let scheme = &raw[..colon];
        let mut sb = scheme.bytes();
        if !sb.next()?.is_ascii_alphabetic()
            || !sb.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        {
            return None;
        }
        let rest = &raw[colon + 1..];
        if !(scheme.eq_ignore_ascii_case("sip") || scheme.eq_ignore_ascii_case("sips")) {
            if rest.is_empty() {
                return None;
            }
            return Some(Uri {
                raw,
                scheme,
                user: None,
                password: None,
                host: Host(""),
                port: None,
                params: Params::new(""),
                headers: None,
                opaque: Some(rest),
            });
        }
        // The user part may contain ';' '?' and ':' (RFC 4475 §3.1.1.2), but '@' is never
        // unescaped after it, so the last '@' ends the userinfo.
        let (userinfo, hostpart) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let (user, password) = match userinfo {
            Some(ui) => match ui.find(':') {
                Some(c) => (Some(&ui[..c]), Some(&ui[c + 1..])),
                None => (Some(ui), None),
            },
            None => (None, None),
        };
        if user == Some("") {
            return None;
        }
        let (hostport, headers) = match hostpart.find('?') {
            Some(q) => (&hostpart[..q], Some(&hostpart[q + 1..])),
            None => (hostpart, None),
        };
        let (hostport, params) = match hostport.find(';') {
            Some(s) => (&hostport[..s], &hostport[s + 1..]),
            None => (hostport, ""),
        };
        let (host, port) = reference_split_host_port(hostport)?;
        if !valid_host(host) {
            return None;
        }
        Some(Uri {
            raw,
            scheme,
            user,
            password,
            host: Host(host),
            port,
            params: Params::new(params),
            headers,
            opaque: None,
        })
    }

    fn reference_split_host_port(hp: &str) -> Option<(&str, Option<u16>)> {
        if hp.starts_with('[') {
            return split_host_port(hp);
        }
        match hp.rfind(':') {
            Some(c) => Some((&hp[..c], Some(parse_port(&hp[c + 1..])?))),
            None => Some((hp, None)),
        }
    }

    #[test]
    fn parse_reads_any_input_as_the_str_search_version() {
        let alphabet = [
            "sip:", "sips", "tel", ":", "@", ";", "?", "=", "a", "[", "]", "::1", "5060", " ", "-",
            ".", "b@", "x;lr", "\t", "é",
        ];
        for s in crate::test_inputs::generated(&alphabet, 0x2545_f491_4f6c_dd1d, 100_000) {
            for candidate in [s.clone(), format!("sip:{s}"), format!("sip:u@{s}")] {
                assert_eq!(
                    Uri::parse(&candidate),
                    reference_parse(&candidate),
                    "{candidate:?}"
                );
            }
        }
    }

    #[test]
    fn full_sip_uri() {
        let u = Uri::parse("sip:alice:secret@Example.COM:5070;transport=tcp;lr?subject=x").unwrap();
        assert_eq!(u.user, Some("alice"));
        assert_eq!(u.password, Some("secret"));
        assert_eq!(u.host.as_str(), "Example.COM");
        assert_eq!(u.port, Some(5070));
        assert_eq!(u.params.get("TRANSPORT"), Some(Some("tcp")));
        assert_eq!(u.params.get("lr"), Some(None));
        assert_eq!(u.headers, Some("subject=x"));
        assert_eq!(u.aor().unwrap(), "alice@example.com");
    }

    #[test]
    fn ipv6_and_unusual_user() {
        let u = Uri::parse("sips:[2001:db8::10]:5061").unwrap();
        assert!(u.is_sips());
        assert_eq!(u.host.ip().unwrap().to_string(), "2001:db8::10");
        let u = Uri::parse(
            "sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com",
        )
        .unwrap();
        assert_eq!(u.host.as_str(), "example.com");
        assert_eq!(
            u.user,
            Some("1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*")
        );
    }

    #[test]
    fn rejects_bad() {
        assert!(Uri::parse("sip:user@example.com:99999").is_none());
        assert!(Uri::parse("sip:user@exa mple.com").is_none());
        assert!(Uri::parse("sip:@example.com").is_none());
        assert!(Uri::parse("sip:[::1").is_none());
        assert!(Uri::parse("nocolon").is_none());
        assert!(Uri::parse("tel:+1-201-555-0123").unwrap().opaque.is_some());
    }
}
