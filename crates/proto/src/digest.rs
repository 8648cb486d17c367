//! HTTP digest for SIP (RFC 3261 §22, RFC 7616 algorithms as adopted by RFC 8760).
//!
//! Only the math and the header grammar live here; nonces, replay tracking and the
//! decision to accept are in `careflow-core`.

use std::borrow::Cow;

use md5::Md5;
use sha2::Sha256;

use crate::scan;

/// A digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// MD5 (RFC 2617), what nearly every deployed phone supports.
    Md5,
    /// SHA-256 (RFC 7616 / RFC 8760).
    Sha256,
}

impl Algorithm {
    /// The token used in headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Md5 => "MD5",
            Self::Sha256 => "SHA-256",
        }
    }

    /// Parses an `algorithm=` token; absent means MD5 (RFC 3261 §22.4).
    pub fn from_token(t: Option<&str>) -> Option<Self> {
        match t {
            None => Some(Self::Md5),
            Some(t) if t.eq_ignore_ascii_case("MD5") => Some(Self::Md5),
            Some(t) if t.eq_ignore_ascii_case("SHA-256") => Some(Self::Sha256),
            _ => None,
        }
    }

    /// Length of a hex digest.
    pub fn hex_len(self) -> usize {
        match self {
            Self::Md5 => 32,
            Self::Sha256 => 64,
        }
    }

    /// Hex digest of the concatenation of `parts` joined by ':'.
    pub fn hash_hex(self, parts: &[&[u8]]) -> String {
        self.hash_hex_buf(parts).as_str().to_string()
    }

    /// [`Self::hash_hex`] on the stack: the digest of a request needs two hashes and, with
    /// this, one allocation (its result) instead of five.
    fn hash_hex_buf(self, parts: &[&[u8]]) -> HexBuf {
        match self {
            Self::Md5 => HexBuf::of(&hash_join::<Md5>(parts)),
            Self::Sha256 => HexBuf::of(&hash_join::<Sha256>(parts)),
        }
    }
}

fn hash_join<D: md5::Digest>(parts: &[&[u8]]) -> md5::digest::Output<D> {
    let mut d = D::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            d.update(b":");
        }
        d.update(p);
    }
    d.finalize()
}

/// Lower-case hex of at most 32 bytes, on the stack.
struct HexBuf {
    buf: [u8; 64],
    len: usize,
}

impl HexBuf {
    fn of(bytes: &[u8]) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; 64];
        let n = bytes.len().min(32);
        for (i, b) in bytes[..n].iter().enumerate() {
            buf[2 * i] = HEX[usize::from(b >> 4)];
            buf[2 * i + 1] = HEX[usize::from(b & 15)];
        }
        Self { buf, len: 2 * n }
    }

    fn as_str(&self) -> &str {
        // Only ASCII hex digits were written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

/// `N` bytes from `2 * N` hex digits (either case); `None` for anything else.
pub fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let t = text.as_bytes();
    if t.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(t.chunks_exact(2)) {
        *o = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

/// HA1 = H(username:realm:password).
pub fn ha1(alg: Algorithm, username: &str, realm: &str, password: &str) -> String {
    alg.hash_hex(&[username.as_bytes(), realm.as_bytes(), password.as_bytes()])
}

/// The expected `response` for the given HA1 (RFC 7616 §3.4.1, qop=auth or none).
pub fn expected_response(
    alg: Algorithm,
    ha1_hex: &str,
    c: &Credentials<'_>,
    method: &str,
) -> String {
    let ha2 = alg.hash_hex_buf(&[method.as_bytes(), c.uri.as_bytes()]);
    let ha2 = ha2.as_str();
    match (c.qop, c.nc, c.cnonce.as_deref()) {
        (Some(qop), Some(nc), Some(cnonce)) => alg.hash_hex(&[
            ha1_hex.as_bytes(),
            c.nonce.as_bytes(),
            nc.as_bytes(),
            cnonce.as_bytes(),
            qop.as_bytes(),
            ha2.as_bytes(),
        ]),
        _ => alg.hash_hex(&[ha1_hex.as_bytes(), c.nonce.as_bytes(), ha2.as_bytes()]),
    }
}

/// Parsed `Authorization` / `Proxy-Authorization` digest credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials<'a> {
    /// username (unquoted).
    pub username: Cow<'a, str>,
    /// realm (unquoted).
    pub realm: Cow<'a, str>,
    /// nonce.
    pub nonce: Cow<'a, str>,
    /// digest-uri.
    pub uri: Cow<'a, str>,
    /// response hex.
    pub response: Cow<'a, str>,
    /// algorithm token, as sent.
    pub algorithm: Option<&'a str>,
    /// cnonce.
    pub cnonce: Option<Cow<'a, str>>,
    /// qop (unquoted token).
    pub qop: Option<&'a str>,
    /// nc: eight hex digits, kept as text because it is hashed as sent.
    pub nc: Option<&'a str>,
    /// opaque.
    pub opaque: Option<Cow<'a, str>>,
}

impl<'a> Credentials<'a> {
    /// Parses `Digest k=v, k="v", ...`. Returns `None` for other schemes or missing fields.
    pub fn parse(value: &'a str) -> Option<Self> {
        let v = scan::trim(value);
        let sp = v.find(|c: char| c.is_ascii_whitespace())?;
        if !v[..sp].eq_ignore_ascii_case("Digest") {
            return None;
        }
        let mut username = None;
        let mut realm = None;
        let mut nonce = None;
        let mut uri = None;
        let mut response = None;
        let mut algorithm = None;
        let mut cnonce = None;
        let mut qop = None;
        let mut nc = None;
        let mut opaque = None;
        for item in scan::split_list(&v[sp..]) {
            let Some(eq) = item.find('=') else { continue };
            let name = scan::trim(&item[..eq]);
            let raw = scan::trim(&item[eq + 1..]);
            let val = scan::unquote(raw);
            // Compared in place: lower-casing each name cost an allocation per parameter.
            let is = |n: &str| name.eq_ignore_ascii_case(n);
            if is("username") {
                username = Some(val);
            } else if is("realm") {
                realm = Some(val);
            } else if is("nonce") {
                nonce = Some(val);
            } else if is("uri") {
                uri = Some(val);
            } else if is("response") {
                response = Some(val);
            } else if is("algorithm") {
                algorithm = Some(raw.trim_matches('"'));
            } else if is("cnonce") {
                cnonce = Some(val);
            } else if is("qop") {
                qop = Some(raw.trim_matches('"'));
            } else if is("nc") {
                nc = Some(raw.trim_matches('"'));
            } else if is("opaque") {
                opaque = Some(val);
            }
        }
        Some(Self {
            username: username?,
            realm: realm?,
            nonce: nonce?,
            uri: uri?,
            response: response?,
            algorithm,
            cnonce,
            qop,
            nc,
            opaque,
        })
    }

    /// The nonce count as a number, when present and well-formed (8 hex digits).
    pub fn nc_value(&self) -> Option<u32> {
        let nc = self.nc?;
        if nc.len() != 8 {
            return None;
        }
        u32::from_str_radix(nc, 16).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc2617_example_md5() {
        // RFC 2617 §3.5 example (HTTP, but the math is identical).
        let c = Credentials::parse(
            r#"Digest username="Mufasa", realm="testrealm@host.com", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", uri="/dir/index.html", qop=auth, nc=00000001, cnonce="0a4f113b", response="6629fae49393a05397450978507c4ef1", opaque="5ccc069c403ebaf9f0171e9517f40e41""#,
        )
        .unwrap();
        let h = ha1(
            Algorithm::Md5,
            "Mufasa",
            "testrealm@host.com",
            "Circle Of Life",
        );
        assert_eq!(expected_response(Algorithm::Md5, &h, &c, "GET"), c.response);
        assert_eq!(c.nc_value(), Some(1));
    }

    #[test]
    fn rfc7616_example_sha256() {
        // RFC 7616 §3.9.1 example.
        let c = Credentials::parse(
            r#"Digest username="Mufasa", realm="http-auth@example.org", uri="/dir/index.html", algorithm=SHA-256, nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", nc=00000001, cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ", qop=auth, response="753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1", opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS""#,
        )
        .unwrap();
        let alg = Algorithm::from_token(c.algorithm).unwrap();
        let h = ha1(alg, "Mufasa", "http-auth@example.org", "Circle of Life");
        assert_eq!(expected_response(alg, &h, &c, "GET"), c.response);
    }

    #[test]
    fn not_digest() {
        assert!(Credentials::parse("Basic abc").is_none());
        assert!(Credentials::parse(r#"Digest username="a""#).is_none());
    }
}

#[cfg(test)]
mod sipp_format {
    use super::*;

    #[test]
    fn no_spaces_after_commas() {
        let c = Credentials::parse(r#"Digest username="user00001",realm="bench.local",cnonce="6b8b4567",nc=00000001,qop=auth,uri="sip:bench.local",nonce="000000006b072b205a930adc788427eba485cabc6ef9acc926726251867762cb",response="7c73ae6297ade64058e6a253acdba65f",algorithm=MD5"#).unwrap();
        assert_eq!(c.username, "user00001");
        assert_eq!(c.qop, Some("auth"));
        assert_eq!(c.nc_value(), Some(1));
        assert_eq!(c.cnonce.as_deref(), Some("6b8b4567"));
        assert_eq!(c.algorithm, Some("MD5"));
    }
}
