//! `name-addr` / `addr-spec` values (From, To, Contact, Route, Record-Route) and generic
//! `;name=value` parameter lists.

use crate::scan;
use crate::uri::Uri;

/// A `;`-separated parameter list, kept as text and scanned on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params<'a>(&'a str);

impl<'a> Params<'a> {
    /// Wraps the text after the first `;` (without it).
    pub fn new(raw: &'a str) -> Self {
        Self(raw)
    }

    /// The raw text.
    pub fn as_str(&self) -> &'a str {
        self.0
    }

    /// Iterates `(name, value)`; names and values are trimmed, values may be quoted.
    pub fn iter(&self) -> ParamsIter<'a> {
        ParamsIter { rest: Some(self.0) }
    }

    /// Looks a parameter up by name (case-insensitive). `Some(None)` means present without value.
    pub fn get(&self, name: &str) -> Option<Option<&'a str>> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// True when the parameter is present.
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Checks every name is a token and every value a token, quoted string or host-ish text.
    pub fn well_formed(&self) -> bool {
        self.iter().all(|(n, v)| {
            scan::is_token(n)
                && match v {
                    None => true,
                    Some(v) if v.starts_with('"') => {
                        scan::quoted_end(v.as_bytes(), 0) == Some(v.len())
                    }
                    Some(v) => {
                        !v.is_empty()
                            && v.bytes()
                                .all(|b| scan::is_token_char(b) || matches!(b, b'[' | b']' | b':'))
                    }
                }
        })
    }
}

/// Iterator returned by [`Params::iter`]. Each item is found in one pass over its bytes (the
/// `;` ending it outside quoted strings and `<...>`, and its first `=`): parameter lists are
/// short, and searching them once per delimiter with `memchr` cost more than the scan (every
/// From, To, Via and Contact is read through here).
#[derive(Debug, Clone)]
pub struct ParamsIter<'a> {
    rest: Option<&'a str>,
}

impl<'a> Iterator for ParamsIter<'a> {
    type Item = (&'a str, Option<&'a str>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let s = self.rest?;
            let (end, eq) = item_bounds(s.as_bytes());
            self.rest = (end < s.len()).then(|| &s[end + 1..]);
            let item = &s[..end];
            return Some(match eq {
                Some(e) => (scan::trim(&item[..e]), Some(scan::trim(&item[e + 1..]))),
                None => {
                    let name = scan::trim(item);
                    if name.is_empty() {
                        // `;;` or a trailing `;`: no item.
                        self.rest?;
                        continue;
                    }
                    (name, None)
                }
            });
        }
    }
}

/// The end of the first item of `b` (the position of its ending `;`, or the length) and the
/// position of its first `=`, quoted or not.
fn item_bounds(b: &[u8]) -> (usize, Option<usize>) {
    let mut eq = None;
    let mut i = 0;
    loop {
        // Past a quoted string left open by the last byte `i` may be beyond the end.
        i += scan::skip_until(b.get(i..).unwrap_or_default(), PARAM_SPECIAL);
        let Some(&c) = b.get(i) else {
            return (b.len(), eq);
        };
        match c {
            b';' => return (i, eq),
            b'=' => {
                eq.get_or_insert(i);
                i += 1;
            }
            b'"' => {
                i += 1;
                while let Some(&q) = b.get(i) {
                    match q {
                        b'"' => break,
                        // The escaped byte is skipped, but still the item's first `=` when it
                        // is one (as `str::find` would see it).
                        b'\\' => i += 1,
                        _ => {}
                    }
                    if b.get(i) == Some(&b'=') {
                        eq.get_or_insert(i);
                    }
                    i += 1;
                }
                i += 1;
            }
            _ => {
                // `<`: up to the closing `>`.
                i += 1;
                while let Some(&a) = b.get(i) {
                    i += 1;
                    match a {
                        b'>' => break,
                        b'=' => {
                            eq.get_or_insert(i - 1);
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Bytes that end a run of ordinary parameter text: `;` (the item's end), `=` (its first one
/// splits name and value), and the openers of the quoted strings and `<...>` inside which a
/// `;` does not count.
const PARAM_SPECIAL: [u8; 4] = *b";=\"<";

/// A name-addr or addr-spec with its header parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameAddr<'a> {
    /// Display name as written (quoted or tokens), if any.
    pub display: Option<&'a str>,
    /// The URI.
    pub uri: Uri<'a>,
    /// Header parameters after the URI (`tag`, `expires`, `q`, ...).
    pub params: Params<'a>,
}

impl<'a> NameAddr<'a> {
    /// Parses one name-addr / addr-spec (one element of a list header).
    pub fn parse(s: &'a str) -> Option<Self> {
        let s = scan::trim(s);
        let b = s.as_bytes();
        if b.is_empty() {
            return None;
        }
        let (display, after_display) = if b[0] == b'"' {
            let end = scan::quoted_end(b, 0)?;
            let rest = scan::trim(&s[end..]);
            if !rest.starts_with('<') {
                return None;
            }
            (Some(&s[..end]), rest)
        } else if let Some(lt) = position(s, b'<') {
            let d = scan::trim(&s[..lt]);
            if !d.bytes().all(|c| scan::is_token_char(c) || scan::is_lws(c)) {
                return None;
            }
            (if d.is_empty() { None } else { Some(d) }, &s[lt..])
        } else {
            // addr-spec: parameters after the URI belong to the header (RFC 3261 §20).
            let (u, p) = match position(s, b';') {
                Some(i) => (&s[..i], &s[i + 1..]),
                None => (s, ""),
            };
            let uri = Uri::parse(u)?;
            if uri.raw.contains(['?', ',']) {
                return None;
            }
            let params = Params::new(p);
            if !params.well_formed() {
                return None;
            }
            return Some(Self {
                display: None,
                uri,
                params,
            });
        };
        let inner_end = position(after_display, b'>')?;
        let inner = &after_display[1..inner_end];
        // "< sip:x@y >" is not allowed (RFC 4475 §3.1.2.15).
        if inner.starts_with(|c: char| c.is_ascii_whitespace())
            || inner.ends_with(|c: char| c.is_ascii_whitespace())
        {
            return None;
        }
        let uri = Uri::parse(inner)?;
        let rest = scan::trim(&after_display[inner_end + 1..]);
        let params = if rest.is_empty() {
            Params::new("")
        } else {
            Params::new(rest.strip_prefix(';')?)
        };
        if !params.well_formed() {
            return None;
        }
        Some(Self {
            display,
            uri,
            params,
        })
    }

    /// The `tag` parameter.
    pub fn tag(&self) -> Option<&'a str> {
        self.params.get("tag").flatten()
    }
}

/// The first `c` in `s`: a plain loop, as header values are short (`str::find` calls
/// `memchr`, whose set-up costs more than scanning a few dozen bytes).
pub(crate) fn position(s: &str, c: u8) -> Option<usize> {
    s.bytes().position(|b| b == c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_addr_forms() {
        let n = NameAddr::parse(r#""Bell, A" <sip:a@b.com;lr>;tag=1 ; expires=60"#).unwrap();
        assert_eq!(n.display, Some(r#""Bell, A""#));
        assert_eq!(n.uri.params.get("lr"), Some(None));
        assert_eq!(n.tag(), Some("1"));
        assert_eq!(n.params.get("expires"), Some(Some("60")));
        let n = NameAddr::parse("sip:a@b.com;tag=x").unwrap();
        assert_eq!(n.tag(), Some("x"));
        assert!(n.uri.params.as_str().is_empty());
        let n = NameAddr::parse("token1~` token2'+_ <sip:m@example.com>;tag=_t~1").unwrap();
        assert_eq!(n.display, Some("token1~` token2'+_"));
    }

    #[test]
    fn name_addr_rejects() {
        assert!(NameAddr::parse("< sip:t.watson@example.org >").is_none());
        assert!(NameAddr::parse(r#""unterminated <sip:a@b>"#).is_none());
        assert!(NameAddr::parse("<sip:a@b").is_none());
        assert!(NameAddr::parse("").is_none());
    }

    /// The parameter iterator as it was written first, on `str` searches: the one-pass
    /// iterator must split every input as it did.
    fn reference_iter(raw: &str) -> Vec<(&str, Option<&str>)> {
        let mut out = Vec::new();
        let mut rest = Some(raw);
        while let Some(s) = rest {
            let (item, next) = match scan::find_unquoted(s, b';') {
                Some(i) => (&s[..i], Some(&s[i + 1..])),
                None => (s, None),
            };
            rest = next;
            let item = scan::trim(item);
            if item.is_empty() {
                continue;
            }
            out.push(match item.find('=') {
                Some(eq) => (scan::trim(&item[..eq]), Some(scan::trim(&item[eq + 1..]))),
                None => (item, None),
            });
        }
        out
    }

    #[test]
    fn params_iter_splits_any_input_as_the_str_search_version() {
        let alphabet = [
            ";", "=", "\"", "\\", "<", ">", "a", "bc", " ", "\r\n ", "tag", ",", "é",
        ];
        for s in crate::test_inputs::generated(&alphabet, 0x9e37_79b9_7f4a_7c15, 50_000) {
            let got: Vec<_> = Params::new(&s).iter().collect();
            assert_eq!(got, reference_iter(&s), "{s:?}");
        }
    }

    #[test]
    fn params_iter() {
        let p = Params::new(" newparam =\r\n      newvalue ;\r\n  secondparam ; q = 0.33");
        let v: Vec<_> = p.iter().collect();
        assert_eq!(
            v,
            vec![
                ("newparam", Some("newvalue")),
                ("secondparam", None),
                ("q", Some("0.33"))
            ]
        );
    }
}
