//! Low-level scanning shared by the typed header views.
//!
//! Header values are kept as slices of the received message. Folded lines (CRLF followed by
//! whitespace) are equivalent to a space (RFC 3261 §7.3.1), so every scanner here treats CR and
//! LF as whitespace instead of copying the value to unfold it.

use std::borrow::Cow;

/// Whitespace including the CR/LF of folded lines.
pub fn is_lws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// `token` characters of RFC 3261 §25.1.
pub fn is_token_char(b: u8) -> bool {
    TOKEN[b as usize]
}

/// RFC 3261 token characters, by byte: one lookup per byte on the parser's hot path.
const TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
            );
        b += 1;
    }
    t
};

/// True when `s` is a non-empty token.
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token_char)
}

/// `n` in decimal ASCII, written into the end of `buf` (no formatting machinery: status
/// codes, ports, lengths and keys are written for every message).
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Appends `n` in decimal to `out` (see [`decimal`]).
pub fn push_decimal(out: &mut String, n: u64) {
    let mut buf = [0; 20];
    out.extend(decimal(n, &mut buf).iter().map(|&d| char::from(d)));
}

/// `ip` in dotted decimal, written into `buf` (as `Ipv4Addr` displays it, without the
/// formatting machinery: our Via, Record-Route and every `received=` carry one).
pub fn ipv4(ip: std::net::Ipv4Addr, buf: &mut [u8; 15]) -> &str {
    let mut len = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            buf[len] = b'.';
            len += 1;
        }
        for d in decimal(u64::from(octet), &mut [0; 20]) {
            buf[len] = *d;
            len += 1;
        }
    }
    // Only ASCII digits and dots were written.
    std::str::from_utf8(&buf[..len]).unwrap_or_default()
}

/// The position of the first byte of `b` that is one of `set`, or `b.len()`. Eight bytes are
/// compared at once (SWAR): the runs between delimiters in header values (branches, tags,
/// hosts) are 8-40 bytes, short enough that a `memchr` call's set-up costs more than it saves
/// and long enough that one byte at a time is the parser's largest cost.
#[inline]
pub fn skip_until<const N: usize>(b: &[u8], set: [u8; N]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut i = 0;
    while let Some(chunk) = b.get(i..i + 8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        let word = u64::from_le_bytes(w);
        let mut hits = 0;
        for c in set {
            // A zero byte of `x` is a byte equal to `c`. The borrow of the subtraction can
            // only mark bytes above a true zero byte, so the lowest mark is exact.
            let x = word ^ (ONES * u64::from(c));
            hits |= x.wrapping_sub(ONES) & !x & HIGHS;
        }
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&c) = b.get(i) {
        if set.contains(&c) {
            return i;
        }
        i += 1;
    }
    b.len()
}

/// Trims linear whitespace (including folding) from both ends.
#[inline]
pub fn trim(s: &str) -> &str {
    let b = s.as_bytes();
    let mut start = 0;
    while start < b.len() && is_lws(b[start]) {
        start += 1;
    }
    let mut end = b.len();
    while end > start && is_lws(b[end - 1]) {
        end -= 1;
    }
    // Only ASCII bytes were cut, so both ends are char boundaries.
    &s[start..end]
}

/// Splits a list header value at commas that are outside quoted strings and `<...>`.
pub fn split_list(s: &str) -> ListIter<'_> {
    ListIter { rest: Some(s) }
}

/// Iterator returned by [`split_list`]; yields trimmed, possibly empty elements.
#[derive(Debug, Clone)]
pub struct ListIter<'a> {
    rest: Option<&'a str>,
}

impl<'a> Iterator for ListIter<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.rest?;
        match find_unquoted(s, b',') {
            Some(i) => {
                self.rest = Some(&s[i + 1..]);
                Some(trim(&s[..i]))
            }
            None => {
                self.rest = None;
                Some(trim(s))
            }
        }
    }
}

/// Position of the first `sep` outside quoted strings and angle brackets.
pub fn find_unquoted(s: &str, sep: u8) -> Option<usize> {
    let b = s.as_bytes();
    // Most values hold no separator at all: one SIMD search settles them.
    memchr::memchr(sep, b)?;
    let mut i = 0;
    loop {
        i += skip_until(b.get(i..)?, [sep, b'"', b'<']);
        match *b.get(i)? {
            b'"' => {
                // To the closing quote, past quoted pairs.
                i += 1;
                loop {
                    i += skip_until(b.get(i..)?, [b'"', b'\\']);
                    match *b.get(i)? {
                        b'"' => break,
                        _ => i += 2,
                    }
                }
                i += 1;
            }
            b'<' => i += 1 + skip_until(b.get(i + 1..)?, [b'>']) + 1,
            _ => return Some(i),
        }
    }
}

/// Removes surrounding quotes and resolves `\x` quoted-pairs. Unquoted input is returned trimmed.
pub fn unquote(s: &str) -> Cow<'_, str> {
    let s = trim(s);
    let Some(inner) = s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) else {
        return Cow::Borrowed(s);
    };
    if !inner.contains('\\') {
        return Cow::Borrowed(inner);
    }
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Checks a quoted string is closed and its escapes complete; returns the index after it.
pub fn quoted_end(s: &[u8], start: usize) -> Option<usize> {
    debug_assert_eq!(s.get(start), Some(&b'"'));
    let mut i = start + 1;
    while i < s.len() {
        match s[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// Parses an unsigned decimal with optional surrounding whitespace; leading zeros allowed.
/// Returns `None` for empty, non-digit or overflowing values: never wraps.
pub fn parse_u64(s: &str) -> Option<u64> {
    let s = trim(s);
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut v: u64 = 0;
    for b in s.bytes() {
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

/// Case-insensitive ASCII comparison.
pub fn eq_ic(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Decodes `%HH` escapes (RFC 3261 §19.1.4 URI comparison); invalid escapes stay as they are.
pub fn pct_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    match String::from_utf8(out) {
        Ok(s) => Cow::Owned(s),
        Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_and_ipv4_read_as_display_writes_them() {
        for n in [0, 7, 10, 5060, 65_535, u64::from(u32::MAX), u64::MAX] {
            let mut s = String::from("x");
            push_decimal(&mut s, n);
            assert_eq!(s, format!("x{n}"));
        }
        for ip in [
            "0.0.0.0",
            "10.0.200.5",
            "127.0.0.1",
            "255.255.255.255",
            "192.168.7.27",
        ] {
            let ip: std::net::Ipv4Addr = ip.parse().unwrap();
            assert_eq!(ipv4(ip, &mut [0; 15]), ip.to_string());
        }
    }

    /// `find_unquoted` as it was written first, one byte and one state at a time: the word
    /// compares must find the same separator in any input.
    fn reference_find_unquoted(s: &str, sep: u8) -> Option<usize> {
        let b = s.as_bytes();
        let (mut i, mut in_quotes, mut in_angle) = (0, false, false);
        while i < b.len() {
            let c = b[i];
            if in_quotes {
                match c {
                    b'\\' => i += 1,
                    b'"' => in_quotes = false,
                    _ => {}
                }
            } else if in_angle {
                in_angle = c != b'>';
            } else if c == b'"' {
                in_quotes = true;
            } else if c == b'<' {
                in_angle = true;
            } else if c == sep {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    #[test]
    fn find_unquoted_finds_what_the_byte_by_byte_version_finds() {
        let alphabet = [
            ",",
            ";",
            "\"",
            "\\",
            "<",
            ">",
            "a",
            "bc",
            " ",
            "é",
            "realm=\"x,y\"",
            "0123456789",
        ];
        for s in crate::test_inputs::generated(&alphabet, 11, 100_000) {
            for sep in [b',', b';'] {
                assert_eq!(
                    find_unquoted(&s, sep),
                    reference_find_unquoted(&s, sep),
                    "{s:?} {}",
                    sep as char
                );
            }
        }
    }

    #[test]
    fn skip_until_finds_the_first_byte_of_the_set_at_every_position() {
        // Every length up to three words, the wanted byte at every position, the bytes around
        // it everything else (high bytes and the set's neighbours included): the word compare
        // must agree with a byte-by-byte search, and a later match never hides an earlier one.
        let set = *b";=\"<";
        let fillers = [b'a', 0x00, 0x7f, 0x80, 0xff, b':', b'>', b'!', b'#'];
        for len in 0..24 {
            for filler in fillers {
                let mut b = vec![filler; len];
                assert_eq!(skip_until(&b, set), len, "none in {b:?}");
                for at in 0..len {
                    for &c in &set {
                        b[at] = c;
                        if at + 1 < len {
                            b[len - 1] = b'=';
                        }
                        assert_eq!(skip_until(&b, set), at, "{b:?}");
                        b.fill(filler);
                    }
                }
            }
        }
        for s in crate::test_inputs::generated(
            &["ab", ";", "=", "\"", "<", ">", "é", " ", "xyz12345"],
            7,
            20_000,
        ) {
            let b = s.as_bytes();
            let want = b.iter().position(|c| set.contains(c)).unwrap_or(b.len());
            assert_eq!(skip_until(b, set), want, "{s:?}");
        }
    }

    #[test]
    fn list_split_respects_quotes_and_angles() {
        let v: Vec<_> =
            split_list(r#""a,b" <sip:x@y;p=1,2>;q=1 , <sip:z@w>,"c\",d" <sip:e>"#).collect();
        assert_eq!(
            v,
            vec![
                r#""a,b" <sip:x@y;p=1,2>;q=1"#,
                "<sip:z@w>",
                r#""c\",d" <sip:e>"#
            ]
        );
    }

    #[test]
    fn unquote_escapes() {
        assert_eq!(unquote(r#" "J Rosenberg \\\"" "#), r#"J Rosenberg \""#);
        assert_eq!(unquote("plain"), "plain");
    }

    #[test]
    fn numbers_never_wrap() {
        assert_eq!(parse_u64(" 0068 "), Some(68));
        assert_eq!(parse_u64("18446744073709551616"), None);
        assert_eq!(parse_u64("12a"), None);
        assert_eq!(parse_u64(""), None);
    }

    #[test]
    fn pct() {
        assert_eq!(pct_decode("%75se%72"), "user");
        assert_eq!(pct_decode("%Z%45"), "%ZE");
        assert_eq!(pct_decode("100%"), "100%");
    }
}
