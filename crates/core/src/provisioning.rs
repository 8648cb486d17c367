//! Auto-provisioning of desk phones (issue 21), the decisions without I/O: which file a phone
//! asks for, the credentials a device carries, and when a source has missed too often.
//!
//! - [`Mac`]: a device's MAC address, however it is written (`00:15:65:AA:BB:CC`,
//!   `001565aabbcc`, `00-15-65-aa-bb-cc`), kept as 12 lowercase hex digits.
//! - [`FileRequest`]: the file names each vendor asks for (Yealink `y000000000000.cfg` and
//!   `<mac>.cfg`, Cisco SPA `spa<mac>.xml`, Grandstream `cfg<mac>.xml`).
//! - [`sip_password`]: a device's SIP password, derived from the provisioning key, the MAC and
//!   the credentials' generation, so the configuration file can carry it while the database
//!   keeps only its HA1; a rotation bumps the generation.
//! - [`auth_name`] / [`device_of_auth_name`]: the digest user name a device authenticates
//!   with (`<user>.<mac>`) while it registers the user's address.
//! - [`FetchGuard`]: misses (an unknown MAC, wrong credentials) per source; a source over its
//!   budget is throttled, so nobody enumerates MAC addresses.

use std::fmt;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use crate::ratelimit::{Generations, Window};

/// A MAC address as 12 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(String);

impl Mac {
    /// Parses a MAC written with or without `:`/`-`/`.` separators between pairs of digits
    /// (`00:15:65:aa:bb:cc`, `0015.65aa.bbcc`, `001565AABBCC`), in either case.
    pub fn parse(s: &str) -> Option<Self> {
        let mut hex = String::with_capacity(12);
        let mut after_sep = true;
        for c in s.trim().chars() {
            if c.is_ascii_hexdigit() {
                hex.push(c.to_ascii_lowercase());
                after_sep = false;
            } else if matches!(c, ':' | '-' | '.') && !after_sep && hex.len().is_multiple_of(2) {
                after_sep = true;
            } else {
                return None;
            }
        }
        (hex.len() == 12 && !after_sep).then_some(Self(hex))
    }

    /// The 12 lowercase hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `00:15:65:aa:bb:cc`, for people.
    pub fn colons(&self) -> String {
        let mut out = String::with_capacity(17);
        for (i, pair) in self.0.as_bytes().chunks(2).enumerate() {
            if i > 0 {
                out.push(':');
            }
            out.push_str(std::str::from_utf8(pair).unwrap_or_default());
        }
        out
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The phone families we write configuration for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// Yealink T4x/T5x (`key = value` files).
    Yealink,
    /// Cisco SPA 3xx/5xx (`<flat-profile>` XML).
    CiscoSpa,
    /// Grandstream GXP/GRP (`<gs_provision>` XML with P-values).
    Grandstream,
}

impl Vendor {
    /// `yealink`, `cisco-spa`, `grandstream`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Yealink => "yealink",
            Self::CiscoSpa => "cisco-spa",
            Self::Grandstream => "grandstream",
        }
    }
}

/// A phone model we provision: its vendor and what it can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Model {
    /// The name in the API and CLI (`yealink-t46s`).
    pub name: &'static str,
    /// Its vendor.
    pub vendor: Vendor,
    /// SIP over TLS and SRTP: configured when the model has them.
    pub tls: bool,
    /// Line keys available for busy lamps.
    pub line_keys: u8,
}

/// Every model we write configuration for.
pub const MODELS: &[Model] = &[
    Model {
        name: "yealink-t46s",
        vendor: Vendor::Yealink,
        tls: true,
        line_keys: 27,
    },
    Model {
        name: "yealink-t54w",
        vendor: Vendor::Yealink,
        tls: true,
        line_keys: 27,
    },
    Model {
        name: "yealink-t33g",
        vendor: Vendor::Yealink,
        tls: true,
        line_keys: 4,
    },
    Model {
        name: "cisco-spa303",
        vendor: Vendor::CiscoSpa,
        tls: false,
        line_keys: 3,
    },
    Model {
        name: "cisco-spa504g",
        vendor: Vendor::CiscoSpa,
        tls: false,
        line_keys: 4,
    },
    Model {
        name: "grandstream-gxp2170",
        vendor: Vendor::Grandstream,
        tls: true,
        line_keys: 12,
    },
    Model {
        name: "grandstream-grp2614",
        vendor: Vendor::Grandstream,
        tls: true,
        line_keys: 16,
    },
];

/// The model named `name` (case-insensitive).
pub fn model(name: &str) -> Option<&'static Model> {
    MODELS.iter().find(|m| m.name.eq_ignore_ascii_case(name))
}

/// What a phone's request path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileRequest {
    /// Yealink's common file, `y000000000000.cfg` (no secrets; every Yealink asks for it).
    YealinkCommon,
    /// Yealink's per-device file, `<mac>.cfg`.
    YealinkDevice(Mac),
    /// Cisco SPA's profile, `spa<mac>.xml` (its `Profile_Rule` is `spa$MA.xml`).
    Spa(Mac),
    /// Grandstream's file, `cfg<mac>.xml` (or `cfg<mac>`, asked for first by some firmware).
    Grandstream(Mac),
    /// A file the vendors ask for and that we do not serve (Yealink's `.boot` files and
    /// `<mac>-local.cfg`): 404, and not a miss.
    NotServed,
    /// Anything else: 404, and a miss.
    Unknown,
}

impl FileRequest {
    /// The request for `path` (the URL path, `/` and any directories before the file name
    /// ignored, so `https://host/prov/` works as a server URL too).
    pub fn parse(path: &str) -> Self {
        let name = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
        let mac_of = |s: &str| Mac::parse(s).filter(|_| s.len() == 12);
        if name == "y000000000000.cfg" {
            return Self::YealinkCommon;
        }
        if name.starts_with("y000000000") && name.ends_with(".boot") {
            return Self::NotServed;
        }
        if let Some(stem) = name.strip_suffix(".cfg") {
            if let Some(mac) = mac_of(stem) {
                return Self::YealinkDevice(mac);
            }
            if stem.strip_suffix("-local").and_then(mac_of).is_some() {
                return Self::NotServed;
            }
        }
        if name.strip_suffix(".boot").and_then(mac_of).is_some() {
            return Self::NotServed;
        }
        if let Some(mac) = name
            .strip_prefix("spa")
            .and_then(|s| s.strip_suffix(".xml"))
            .and_then(mac_of)
        {
            return Self::Spa(mac);
        }
        if let Some(rest) = name.strip_prefix("cfg") {
            let stem = rest.strip_suffix(".xml").unwrap_or(rest);
            if let Some(mac) = mac_of(stem) {
                return Self::Grandstream(mac);
            }
        }
        Self::Unknown
    }

    /// The device this file belongs to (none for the Yealink common file).
    pub fn mac(&self) -> Option<&Mac> {
        match self {
            Self::YealinkDevice(m) | Self::Spa(m) | Self::Grandstream(m) => Some(m),
            _ => None,
        }
    }

    /// The vendor whose phones ask for this file.
    pub fn vendor(&self) -> Option<Vendor> {
        match self {
            Self::YealinkCommon | Self::YealinkDevice(_) => Some(Vendor::Yealink),
            Self::Spa(_) => Some(Vendor::CiscoSpa),
            Self::Grandstream(_) => Some(Vendor::Grandstream),
            _ => None,
        }
    }
}

/// The secret the SIP passwords of devices are derived from (`DATA_DIR/provisioning.key`,
/// or `PROVISION_KEY_FILE`: the same file on every node).
#[derive(Clone)]
pub struct ProvisioningKey([u8; 32]);

impl fmt::Debug for ProvisioningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProvisioningKey(..)")
    }
}

impl ProvisioningKey {
    /// A key of 32 bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    fn derive(&self, label: &str, parts: &[&[u8]]) -> String {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            return String::new();
        };
        mac.update(label.as_bytes());
        for p in parts {
            // Length-prefixed, so no two different inputs meet.
            mac.update(&(p.len() as u32).to_be_bytes());
            mac.update(p);
        }
        let out = mac.finalize().into_bytes();
        careflow_proto::digest::hex(&out[..16])
    }
}

/// The SIP password of device `mac` at credential generation `generation`: 32 hex digits
/// (128 bits), derived, never stored.
pub fn sip_password(key: &ProvisioningKey, mac: &Mac, generation: u32) -> String {
    key.derive(
        "careflow-sip device password v1",
        &[mac.as_str().as_bytes(), &generation.to_be_bytes()],
    )
}

/// The SIP password of `user@domain` at generation `generation` when their devices share
/// their credentials (the user's own password then becomes this one): 32 hex digits.
pub fn user_password(key: &ProvisioningKey, user: &str, domain: &str, generation: u32) -> String {
    key.derive(
        "careflow-sip shared user password v1",
        &[
            user.as_bytes(),
            domain.as_bytes(),
            &generation.to_be_bytes(),
        ],
    )
}

/// The digest user name a device of `user` authenticates with: `<user>.<mac>`.
pub fn auth_name(user: &str, mac: &Mac) -> String {
    format!("{user}.{mac}")
}

/// The MAC of a device auth name of `user` (`<user>.<mac>`), if `name` is one.
pub fn device_of_auth_name(name: &str, user: &str) -> Option<Mac> {
    let rest = name.strip_prefix(user)?.strip_prefix('.')?;
    Mac::parse(rest).filter(|_| rest.len() == 12)
}

/// How many misses a source may have and for how long it is throttled after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchLimits {
    /// Misses allowed per window from one source address.
    pub misses: u32,
    /// The window, and how long a source over its budget stays throttled.
    pub window: Duration,
}

impl Default for FetchLimits {
    /// 60 misses per 10 minutes: a site with a hundred removed phones behind one address that
    /// still fetch every hour stays well inside; an enumeration gets 8,640 guesses a day out of
    /// a vendor's 16.7 million addresses.
    fn default() -> Self {
        Self {
            misses: 60,
            window: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct SourceState {
    misses: Window,
    throttled_until: Option<Instant>,
}

/// Counts misses per source address and says when a source is throttled. While throttled, a
/// source's requests without credentials are challenged whatever their MAC (no 404 tells an
/// unknown one apart) and its wrong credentials get 429; valid credentials are still served,
/// so phones behind the same address are never locked out.
#[derive(Debug)]
pub struct FetchGuard {
    limits: FetchLimits,
    sources: Mutex<Generations<IpAddr, SourceState>>,
}

/// Sources remembered at most (a forgotten one starts afresh).
const MAX_SOURCES: usize = 100_000;

impl FetchGuard {
    /// A guard with `limits`.
    pub fn new(limits: FetchLimits, now: Instant) -> Self {
        Self {
            limits,
            sources: Mutex::new(Generations::new(now)),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> FetchLimits {
        self.limits
    }

    fn with<R>(&self, ip: IpAddr, now: Instant, f: impl FnOnce(&mut SourceState) -> R) -> R {
        let mut sources = match self.sources.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let state = sources.entry(ip, MAX_SOURCES, self.limits.window * 2, now, || {
            SourceState {
                misses: Window::new(now),
                throttled_until: None,
            }
        });
        f(state)
    }

    /// How long `ip` stays throttled, if it is.
    pub fn throttled(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        self.with(ip, now, |s| {
            let until = s.throttled_until?;
            if until > now {
                Some(until - now)
            } else {
                s.throttled_until = None;
                None
            }
        })
    }

    /// Counts a miss of `ip`; true when this miss put it over its budget.
    pub fn miss(&self, ip: IpAddr, now: Instant) -> bool {
        let limits = self.limits;
        self.with(ip, now, |s| {
            let n = s.misses.hit(limits.window, now);
            if n > limits.misses && s.throttled_until.is_none_or(|t| t <= now) {
                s.throttled_until = Some(now + limits.window);
                return true;
            }
            false
        })
    }
}

/// The MAC a device certificate names (DER X.509): the first subject attribute whose value
/// is a MAC, or ends with one after a non-hex character (`SEP001565AABBCC`). The chain must
/// have been verified already (the TLS layer does it against the vendors' CAs).
pub fn certificate_mac(der: &[u8]) -> Option<Mac> {
    subject_values(der)?.into_iter().find_map(|v| mac_in(&v))
}

fn mac_in(value: &str) -> Option<Mac> {
    if let Some(m) = Mac::parse(value) {
        return Some(m);
    }
    let start = value
        .char_indices()
        .rev()
        .find(|(_, c)| !c.is_ascii_hexdigit())
        .map(|(i, c)| i + c.len_utf8())?;
    let tail = &value[start..];
    (tail.len() == 12).then(|| Mac::parse(tail)).flatten()
}

/// One DER element: (tag, contents, rest).
fn der_element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |a, &d| (a << 8) | usize::from(d));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The string values of a certificate's subject attributes.
fn subject_values(der: &[u8]) -> Option<Vec<String>> {
    let (_, cert, _) = der_element(der).filter(|e| e.0 == 0x30)?;
    let (_, tbs, _) = der_element(cert).filter(|e| e.0 == 0x30)?;
    let mut rest = tbs;
    let mut fields = Vec::new();
    while let Some((tag, body, more)) = der_element(rest) {
        fields.push((tag, body));
        rest = more;
    }
    // [0] version (optional), serial, signature algorithm, issuer, validity, subject.
    let skip = usize::from(fields.first()?.0 == 0xa0);
    let (tag, subject) = *fields.get(skip + 4)?;
    if tag != 0x30 {
        return None;
    }
    let mut values = Vec::new();
    let mut sets = subject;
    while let Some((0x31, set, more)) = der_element(sets) {
        let mut atvs = set;
        while let Some((0x30, atv, next)) = der_element(atvs) {
            if let Some((0x06, _oid, value)) = der_element(atv)
                && let Some((vtag, v, _)) = der_element(value)
                && matches!(vtag, 0x0c | 0x13 | 0x16 | 0x14)
                && let Ok(text) = std::str::from_utf8(v)
            {
                values.push(text.to_string());
            }
            atvs = next;
        }
        sets = more;
    }
    Some(values)
}

/// The multicast group phones send their SIP PnP SUBSCRIBE to (RFC 6080's `sip.mcast.net`).
pub const PNP_GROUP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(224, 0, 1, 75);

/// A phone asking for its provisioning server by SIP PnP (a multicast `SUBSCRIBE` with
/// `Event: ua-profile`, RFC 6080): its MAC (the From user) and what it says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PnpRequest {
    /// The phone's MAC.
    pub mac: Mac,
    /// The `vendor` parameter of its Event header (`Yealink`).
    pub vendor: String,
    /// The `model` parameter (`T46S`).
    pub model: String,
}

/// The PnP request in a message with `method`, `event` header and From `from_user`; none
/// when it is not one (another method or event package, a profile type other than `device`,
/// a From user that is no MAC).
pub fn pnp_request(
    method: &str,
    event: Option<&str>,
    from_user: Option<&str>,
) -> Option<PnpRequest> {
    if !method.eq_ignore_ascii_case("SUBSCRIBE") {
        return None;
    }
    let mut parts = event?.split(';');
    if !parts.next()?.trim().eq_ignore_ascii_case("ua-profile") {
        return None;
    }
    let mut vendor = String::new();
    let mut model = String::new();
    for p in parts {
        let Some((k, v)) = p.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"');
        match k.trim().to_ascii_lowercase().as_str() {
            "profile-type" if !v.eq_ignore_ascii_case("device") => return None,
            "vendor" => vendor = v.chars().take(32).collect(),
            "model" => model = v.chars().take(32).collect(),
            _ => {}
        }
    }
    Some(PnpRequest {
        mac: Mac::parse(from_user?)?,
        vendor,
        model,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(s: &str) -> Mac {
        Mac::parse(s).unwrap()
    }

    #[test]
    fn macs_are_read_however_they_are_written() {
        for s in [
            "00:15:65:AA:BB:CC",
            "001565aabbcc",
            "00-15-65-aa-bb-cc",
            "0015.65aa.bbcc",
            " 001565AABBCC ",
        ] {
            assert_eq!(
                Mac::parse(s).map(|m| m.to_string()).as_deref(),
                Some("001565aabbcc"),
                "{s}"
            );
        }
        for s in [
            "",
            "001565aabbc",
            "001565aabbccd",
            "00156gaabbcc",
            "0-01565aabbcc",
            "00:15:65:aa:bb",
        ] {
            assert_eq!(Mac::parse(s), None, "{s}");
        }
        assert_eq!(mac("001565aabbcc").colons(), "00:15:65:aa:bb:cc");
    }

    #[test]
    fn each_vendor_file_name_is_recognised() {
        let m = mac("001565aabbcc");
        assert_eq!(
            FileRequest::parse("/y000000000000.cfg"),
            FileRequest::YealinkCommon
        );
        assert_eq!(
            FileRequest::parse("/001565AABBCC.cfg"),
            FileRequest::YealinkDevice(m.clone())
        );
        assert_eq!(
            FileRequest::parse("/prov/001565aabbcc.cfg"),
            FileRequest::YealinkDevice(m.clone())
        );
        assert_eq!(
            FileRequest::parse("/spa001565aabbcc.xml"),
            FileRequest::Spa(m.clone())
        );
        assert_eq!(
            FileRequest::parse("/cfg001565aabbcc.xml"),
            FileRequest::Grandstream(m.clone())
        );
        assert_eq!(
            FileRequest::parse("/cfg001565aabbcc"),
            FileRequest::Grandstream(m.clone())
        );
        for p in [
            "/y000000000028.boot",
            "/001565aabbcc.boot",
            "/001565aabbcc-local.cfg",
        ] {
            assert_eq!(FileRequest::parse(p), FileRequest::NotServed, "{p}");
        }
        for p in [
            "/",
            "/favicon.ico",
            "/00:15:65:aa:bb:cc.cfg",
            "/spa.xml",
            "/cfg.xml",
            "/../etc/passwd",
        ] {
            assert_eq!(FileRequest::parse(p), FileRequest::Unknown, "{p}");
        }
        assert_eq!(
            FileRequest::parse("/spa001565aabbcc.xml").vendor(),
            Some(Vendor::CiscoSpa)
        );
        assert_eq!(FileRequest::YealinkCommon.mac(), None);
    }

    #[test]
    fn passwords_differ_by_key_device_and_generation_and_are_stable() {
        let k = ProvisioningKey::new([7; 32]);
        let a = sip_password(&k, &mac("001565aabbcc"), 1);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(a, sip_password(&k, &mac("00:15:65:AA:BB:CC"), 1));
        assert_ne!(a, sip_password(&k, &mac("001565aabbcc"), 2));
        assert_ne!(a, sip_password(&k, &mac("001565aabbcd"), 1));
        assert_ne!(
            a,
            sip_password(&ProvisioningKey::new([8; 32]), &mac("001565aabbcc"), 1)
        );
        assert!(!format!("{k:?}").contains('7'));
    }

    #[test]
    fn a_device_auth_name_belongs_to_its_user_only() {
        let m = mac("001565aabbcc");
        assert_eq!(auth_name("2001", &m), "2001.001565aabbcc");
        assert_eq!(
            device_of_auth_name("2001.001565aabbcc", "2001"),
            Some(m.clone())
        );
        assert_eq!(device_of_auth_name("2001.001565aabbcc", "200"), None);
        assert_eq!(device_of_auth_name("2001.001565aabbcc", "2002"), None);
        assert_eq!(device_of_auth_name("2001", "2001"), None);
        assert_eq!(device_of_auth_name("2001.00:15:65:aa:bb:cc", "2001"), None);
        assert_eq!(device_of_auth_name("a.b.001565aabbcc", "a.b"), Some(m));
    }

    #[test]
    fn a_device_certificate_names_its_mac_in_its_subject() {
        // Subject CN=001565aabbcc, O=Yealink; issuer CN=Yealink Device CA (a test
        // certificate's structure: version, serial, algorithm, issuer, validity, subject).
        fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
            let mut v = vec![tag];
            if body.len() < 0x80 {
                v.push(body.len() as u8);
            } else {
                v.extend([0x82, (body.len() >> 8) as u8, body.len() as u8]);
            }
            v.extend_from_slice(body);
            v
        }
        fn name(attrs: &[(&[u8], &str)]) -> Vec<u8> {
            let mut sets = Vec::new();
            for (oid, value) in attrs {
                let mut atv = tlv(0x06, oid);
                atv.extend(tlv(0x0c, value.as_bytes()));
                sets.extend(tlv(0x31, &tlv(0x30, &atv)));
            }
            tlv(0x30, &sets)
        }
        const CN: &[u8] = &[0x55, 0x04, 0x03];
        const O: &[u8] = &[0x55, 0x04, 0x0a];
        let cert = |subject: &[(&[u8], &str)]| {
            let mut tbs = tlv(0xa0, &tlv(0x02, &[2]));
            tbs.extend(tlv(0x02, &[1, 2, 3]));
            tbs.extend(tlv(0x30, &tlv(0x06, &[0x2a, 0x86, 0x48])));
            tbs.extend(name(&[(CN, "Yealink Device CA 001565000000")]));
            tbs.extend(tlv(0x30, &[]));
            tbs.extend(name(subject));
            let mut c = tlv(0x30, &tbs);
            c.extend(tlv(0x30, &[]));
            tlv(0x30, &c)
        };
        let m = certificate_mac(&cert(&[(O, "Yealink"), (CN, "001565aabbcc")]));
        assert_eq!(m, Some(mac("001565aabbcc")), "not the issuer's");
        assert_eq!(
            certificate_mac(&cert(&[(CN, "SEP001565AABBCC")])),
            Some(mac("001565aabbcc"))
        );
        assert_eq!(certificate_mac(&cert(&[(CN, "phone-7")])), None);
        assert_eq!(certificate_mac(&[0x30, 0x85, 1, 2, 3]), None);
        assert_eq!(certificate_mac(&[]), None);
    }

    #[test]
    fn a_yealink_pnp_subscribe_is_recognised_and_nothing_else() {
        let ev = r#"ua-profile;profile-type="device";vendor="Yealink";model="T46S";version="66.86.0.15""#;
        let r = pnp_request("SUBSCRIBE", Some(ev), Some("001565aabbcc")).unwrap();
        assert_eq!(r.mac, mac("001565aabbcc"));
        assert_eq!((r.vendor.as_str(), r.model.as_str()), ("Yealink", "T46S"));
        assert!(pnp_request("SUBSCRIBE", Some("ua-profile"), Some("00:15:65:aa:bb:cc")).is_some());
        assert_eq!(pnp_request("NOTIFY", Some(ev), Some("001565aabbcc")), None);
        assert_eq!(
            pnp_request("SUBSCRIBE", Some("dialog"), Some("001565aabbcc")),
            None
        );
        assert_eq!(
            pnp_request(
                "SUBSCRIBE",
                Some("ua-profile;profile-type=user"),
                Some("001565aabbcc")
            ),
            None
        );
        assert_eq!(pnp_request("SUBSCRIBE", Some(ev), Some("2001")), None);
        assert_eq!(pnp_request("SUBSCRIBE", None, Some("001565aabbcc")), None);
    }

    #[test]
    fn a_source_is_throttled_after_its_budget_of_misses_and_then_recovers() {
        let t0 = Instant::now();
        let limits = FetchLimits {
            misses: 3,
            window: Duration::from_secs(60),
        };
        let g = FetchGuard::new(limits, t0);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        for _ in 0..3 {
            assert!(!g.miss(ip, t0));
        }
        assert_eq!(g.throttled(ip, t0), None);
        assert!(g.miss(ip, t0), "the fourth miss goes over the budget");
        assert_eq!(g.throttled(ip, t0), Some(Duration::from_secs(60)));
        assert_eq!(
            g.throttled(other, t0),
            None,
            "other sources are not affected"
        );
        assert!(
            !g.miss(ip, t0 + Duration::from_secs(1)),
            "already throttled"
        );
        let later = t0 + Duration::from_secs(61);
        assert_eq!(g.throttled(ip, later), None);
        assert!(!g.miss(ip, later), "a new window");
    }

    #[test]
    fn a_busy_honest_site_behind_one_address_is_never_throttled() {
        // 100 removed phones behind the hospital's address still fetch every hour, for a day.
        let t0 = Instant::now();
        let g = FetchGuard::new(FetchLimits::default(), t0);
        let nat: IpAddr = "198.51.100.1".parse().unwrap();
        for hour in 0..24u64 {
            for phone in 0..100u64 {
                let at = t0 + Duration::from_secs(hour * 3600 + phone * 36);
                assert!(!g.miss(nat, at), "hour {hour} phone {phone}");
                assert_eq!(g.throttled(nat, at), None);
            }
        }
    }
}
