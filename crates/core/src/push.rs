//! Push notifications for sleeping mobile devices (RFC 8599), sans-IO.
//!
//! - [`PushParams`]: what a Contact URI says about the device's push service (`pn-provider`,
//!   `pn-prid`, `pn-param`), a capability query (`pn-provider` alone), and the short hash
//!   that stands for the token in logs (the token itself never leaves the registrar).
//! - [`feature_caps`]: the `Feature-Caps` value a registrar's 2xx carries (§5.6.1).
//! - [`PushWaits`]: requests waiting for a device to wake up: exactly one push per (call,
//!   device) whatever the retransmissions and challenge rounds, the requests released once
//!   when the device registers again, and the deadline after which they get 480.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use careflow_proto::Uri;
use sha2::{Digest, Sha256};

/// A push notification service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    /// Apple Push Notification service.
    Apns,
    /// Firebase Cloud Messaging.
    Fcm,
}

impl Provider {
    /// The `pn-provider` value (RFC 8599 §9.1 registry).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Apns => "apns",
            Self::Fcm => "fcm",
        }
    }

    /// The provider named by a `pn-provider` value, when we know it.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "apns" => Some(Self::Apns),
            "fcm" => Some(Self::Fcm),
            _ => None,
        }
    }
}

/// A device's push address, from its Contact URI.
#[derive(Clone, PartialEq, Eq)]
pub struct PushParams {
    /// `pn-provider` as the device wrote it (lower case).
    pub provider: String,
    /// `pn-prid`: the device's token at that service.
    pub prid: String,
    /// `pn-param`: for APNs `TEAMID.BUNDLE.voip`, for FCM the sender / project id.
    pub param: Option<String>,
}

impl std::fmt::Debug for PushParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a credential of the device: only its hash is ever shown.
        f.debug_struct("PushParams")
            .field("provider", &self.provider)
            .field("prid", &self.log_id())
            .field("param", &self.param)
            .finish()
    }
}

/// What a Contact says about push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushRequest {
    /// No `pn-*` parameters: an ordinary binding.
    None,
    /// `pn-provider` without `pn-prid`: the device asks which services we serve (§5.6.1); it is
    /// answered in the 2xx's `Feature-Caps` and the binding carries no push address.
    Query(String),
    /// A push address.
    Push(PushParams),
}

impl PushParams {
    /// The push request in a Contact URI's parameters.
    pub fn of_uri(uri: &Uri<'_>) -> PushRequest {
        let value = |name: &str| {
            uri.params
                .get(name)
                .flatten()
                .map(|v| v.trim_matches('"').to_string())
                .filter(|v| !v.is_empty())
        };
        let Some(provider) = value("pn-provider").map(|p| p.to_ascii_lowercase()) else {
            return PushRequest::None;
        };
        match value("pn-prid") {
            None => PushRequest::Query(provider),
            Some(prid) => PushRequest::Push(Self {
                provider,
                prid,
                param: value("pn-param"),
            }),
        }
    }

    /// The service, when we know it.
    pub fn service(&self) -> Option<Provider> {
        Provider::parse(&self.provider)
    }

    /// A short hash of the token for logs and metrics: enough to tell devices apart, nothing
    /// to reach one with.
    pub fn log_id(&self) -> String {
        let d = Sha256::digest(self.prid.as_bytes());
        let mut s = String::with_capacity(12);
        crate::flow::push_hex(&mut s, &d[..6]);
        s
    }

    /// Whether two Contacts name the same device's push address (RFC 8599 §5.6.1: a device
    /// whose IP or port changed registers the same `pn-*` parameters).
    pub fn same_device(&self, other: &Self) -> bool {
        self.provider.eq_ignore_ascii_case(&other.provider)
            && self.prid == other.prid
            && self.param == other.param
    }
}

/// `contact` with its `pn-prid` value (the device's push token, a credential) replaced by
/// `#HASH`, for anything shown to anyone but the device itself: the other devices' Contacts
/// in a 2xx to REGISTER, logs, the API and the CLI.
pub fn redacted(contact: &str) -> std::borrow::Cow<'_, str> {
    let lower = contact.to_ascii_lowercase();
    let Some(at) = lower.find(";pn-prid=") else {
        return std::borrow::Cow::Borrowed(contact);
    };
    let start = at + ";pn-prid=".len();
    let end = contact[start..]
        .find([';', '>', '?', ',', ' '])
        .map_or(contact.len(), |i| start + i);
    let d = Sha256::digest(contact[start..end].trim_matches('"').as_bytes());
    let mut hash = String::from("#");
    crate::flow::push_hex(&mut hash, &d[..6]);
    std::borrow::Cow::Owned(format!("{}{hash}{}", &contact[..start], &contact[end..]))
}

/// The `Feature-Caps` value of a registrar's 2xx (RFC 8599 §5.6.1): the services we push
/// through, and `+sip.pnsreg` (§6.2) when the device asked for the periodic wake-up interval.
pub fn feature_caps(services: &[Provider], pnsreg: Option<u32>) -> Option<String> {
    if services.is_empty() {
        return None;
    }
    let names: Vec<&str> = services.iter().map(|p| p.as_str()).collect();
    let mut v = format!("*;+sip.pns=\"{}\"", names.join(","));
    if let Some(secs) = pnsreg {
        v.push_str(&format!(";+sip.pnsreg=\"{secs}\""));
    }
    Some(v)
}

/// A request waiting for a device, as the driver names it (e.g. its transaction key).
pub trait CallKey: Clone + Eq + std::hash::Hash {}
impl<T: Clone + Eq + std::hash::Hash> CallKey for T {}

/// What the driver is to do for a request to a sleeping device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// Send the push now (the first time this call waits for this device).
    Push,
    /// A push went out already for this call and device: only wait.
    Waiting,
}

#[derive(Debug)]
struct Waiting<C> {
    call: C,
    until: Instant,
    /// The device's registration when the push went out (its Call-ID and CSeq, hashed): only
    /// a newer one is the device waking up.
    stamp: u64,
}

/// What identifies one registration of a device (its REGISTER's Call-ID and CSeq): the
/// registration a push was sent against, to tell a new one (the device woke) from it.
pub fn registration_stamp(call_id: &str, cseq: u32) -> u64 {
    let d = Sha256::new()
        .chain_update(call_id.as_bytes())
        .chain_update(cseq.to_be_bytes())
        .finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// Requests waiting for devices to wake up, by device (the binding id).
#[derive(Debug)]
pub struct PushWaits<C: CallKey> {
    wait: Duration,
    by_device: HashMap<u64, Vec<Waiting<C>>>,
}

impl<C: CallKey> PushWaits<C> {
    /// Waits of at most `wait` (then 480).
    pub fn new(wait: Duration) -> Self {
        Self {
            wait,
            by_device: HashMap::new(),
        }
    }

    /// `call` is for `device`, which sleeps with the registration `stamp`: push once, then
    /// wait.
    pub fn wait(&mut self, call: C, device: u64, stamp: u64, now: Instant) -> Wait {
        let calls = self.by_device.entry(device).or_default();
        if calls.iter().any(|w| w.call == call) {
            return Wait::Waiting;
        }
        calls.push(Waiting {
            call,
            until: now + self.wait,
            stamp,
        });
        Wait::Push
    }

    /// `device` is registered with `stamp`: when that is a new registration (it woke up), the
    /// calls that wait for it, each once (then forgotten).
    pub fn woke(&mut self, device: u64, stamp: u64, now: Instant) -> Vec<C> {
        let Some(calls) = self.by_device.get_mut(&device) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        calls.retain(|w| {
            if w.stamp == stamp {
                return w.until > now;
            }
            if w.until > now {
                out.push(w.call.clone());
            }
            false
        });
        if calls.is_empty() {
            self.by_device.remove(&device);
        }
        out
    }

    /// Whether `call` still waits for any device.
    pub fn call_waits(&self, call: &C) -> bool {
        self.by_device.values().flatten().any(|w| &w.call == call)
    }

    /// Whether any call waits for `device`.
    pub fn is_waiting(&self, device: u64) -> bool {
        self.by_device.contains_key(&device)
    }

    /// The push to `device` failed: the calls that waited for it (they get 480 or 404).
    pub fn failed(&mut self, device: u64) -> Vec<C> {
        self.by_device
            .remove(&device)
            .unwrap_or_default()
            .into_iter()
            .map(|w| w.call)
            .collect()
    }

    /// `call` ended (answered elsewhere, cancelled, or failed): it waits no more.
    pub fn ended(&mut self, call: &C) {
        self.by_device.retain(|_, calls| {
            calls.retain(|w| &w.call != call);
            !calls.is_empty()
        });
    }

    /// (call, device) pairs whose wait is over at `now` (each reported once).
    pub fn expired(&mut self, now: Instant) -> Vec<(C, u64)> {
        let mut out = Vec::new();
        self.by_device.retain(|device, calls| {
            calls.retain(|w| {
                let over = w.until <= now;
                if over {
                    out.push((w.call.clone(), *device));
                }
                !over
            });
            !calls.is_empty()
        });
        out
    }

    /// The earliest deadline, for the driver's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.by_device.values().flatten().map(|w| w.until).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> Uri<'_> {
        Uri::parse(s).expect("uri")
    }

    #[test]
    fn contacts_say_push_query_or_nothing() {
        let linphone = uri(
            "sip:alice@192.0.2.7:5060;transport=tcp;pn-provider=apns;pn-param=ABCD1234.org.linphone.phone.voip;pn-prid=00fc13adff78512",
        );
        let PushRequest::Push(p) = PushParams::of_uri(&linphone) else {
            panic!("a push address");
        };
        assert_eq!(p.service(), Some(Provider::Apns));
        assert_eq!(p.prid, "00fc13adff78512");
        assert_eq!(p.param.as_deref(), Some("ABCD1234.org.linphone.phone.voip"));
        assert_eq!(p.log_id().len(), 12);
        assert!(
            !format!("{p:?}").contains("00fc13adff78512"),
            "no token in Debug"
        );
        assert_eq!(
            PushParams::of_uri(&uri("sip:bob@192.0.2.8;pn-provider=FCM")),
            PushRequest::Query("fcm".into())
        );
        assert_eq!(
            PushParams::of_uri(&uri("sip:carol@192.0.2.9")),
            PushRequest::None
        );
        let other = uri("sip:dan@192.0.2.9;pn-provider=webpush;pn-prid=x");
        let PushRequest::Push(p) = PushParams::of_uri(&other) else {
            panic!()
        };
        assert_eq!(p.service(), None, "a service we do not serve");
    }

    #[test]
    fn a_device_is_the_same_whatever_its_address() {
        let a = uri("sip:alice@10.0.0.7:5060;pn-provider=fcm;pn-param=proj-1;pn-prid=tok");
        let b = uri("sip:alice@10.9.9.9:41234;pn-provider=fcm;pn-param=proj-1;pn-prid=tok");
        let c = uri("sip:alice@10.0.0.7:5060;pn-provider=fcm;pn-param=proj-1;pn-prid=other");
        let (PushRequest::Push(a), PushRequest::Push(b), PushRequest::Push(c)) = (
            PushParams::of_uri(&a),
            PushParams::of_uri(&b),
            PushParams::of_uri(&c),
        ) else {
            panic!()
        };
        assert!(a.same_device(&b));
        assert!(!a.same_device(&c));
    }

    #[test]
    fn tokens_are_redacted_to_their_hash() {
        let c = "sip:alice@10.1.1.1:5060;pn-provider=apns;pn-prid=00fc13ad;pn-param=T.app.voip";
        let r = redacted(c);
        assert!(!r.contains("00fc13ad"), "{r}");
        let PushRequest::Push(p) = PushParams::of_uri(&uri(c)) else {
            panic!()
        };
        assert!(
            r.contains(&format!(";pn-prid=#{};pn-param=T.app.voip", p.log_id())),
            "{r}"
        );
        assert_eq!(redacted("sip:bob@192.0.2.1"), "sip:bob@192.0.2.1");
        assert!(!redacted("<sip:a@h;PN-PRID=secret>;expires=60").contains("secret"));
    }

    #[test]
    fn feature_caps_name_our_services() {
        assert_eq!(
            feature_caps(&[Provider::Apns, Provider::Fcm], None).as_deref(),
            Some("*;+sip.pns=\"apns,fcm\"")
        );
        assert_eq!(
            feature_caps(&[Provider::Fcm], Some(3000)).as_deref(),
            Some("*;+sip.pns=\"fcm\";+sip.pnsreg=\"3000\"")
        );
        assert_eq!(feature_caps(&[], None), None);
    }

    #[test]
    fn one_push_per_call_and_device_and_each_call_released_once() {
        let t0 = Instant::now();
        let mut w = PushWaits::new(Duration::from_secs(10));
        let asleep = registration_stamp("reg-1", 5);
        let awake = registration_stamp("reg-1", 6);
        assert_ne!(asleep, awake);
        assert_eq!(w.wait("call-1", 7, asleep, t0), Wait::Push);
        // The INVITE retransmitted, or sent again with credentials: no second push.
        assert_eq!(
            w.wait("call-1", 7, asleep, t0 + Duration::from_millis(500)),
            Wait::Waiting
        );
        assert_eq!(
            w.wait("call-1", 7, asleep, t0 + Duration::from_secs(1)),
            Wait::Waiting
        );
        // Another call to the same device pushes again; the same call to another device too.
        assert_eq!(w.wait("call-2", 7, asleep, t0), Wait::Push);
        assert_eq!(w.wait("call-1", 8, asleep, t0), Wait::Push);
        assert_eq!(w.next_deadline(), Some(t0 + Duration::from_secs(10)));
        // The registration the push was sent against is not a wake-up.
        assert!(w.woke(7, asleep, t0 + Duration::from_secs(1)).is_empty());
        assert!(w.is_waiting(7));
        let mut woke = w.woke(7, awake, t0 + Duration::from_secs(2));
        woke.sort_unstable();
        assert_eq!(woke, vec!["call-1", "call-2"]);
        assert!(
            w.woke(7, awake, t0 + Duration::from_secs(3)).is_empty(),
            "released once"
        );
        assert!(!w.is_waiting(7));
        // Device 8 never wakes: one 480, and a registration after that forks nothing.
        assert!(w.expired(t0 + Duration::from_secs(9)).is_empty());
        assert_eq!(w.expired(t0 + Duration::from_secs(10)), vec![("call-1", 8)]);
        assert!(w.expired(t0 + Duration::from_secs(11)).is_empty());
        assert!(w.woke(8, awake, t0 + Duration::from_secs(12)).is_empty());
    }

    #[test]
    fn a_refused_push_or_an_ended_call_stops_the_wait() {
        let t0 = Instant::now();
        let mut w = PushWaits::new(Duration::from_secs(10));
        w.wait("call-1", 7, 1, t0);
        w.wait("call-2", 7, 1, t0);
        w.wait("call-3", 9, 1, t0);
        w.wait("call-3", 7, 1, t0);
        let mut failed = w.failed(7);
        failed.sort_unstable();
        assert_eq!(failed, vec!["call-1", "call-2", "call-3"]);
        assert!(!w.call_waits(&"call-1"));
        assert!(w.call_waits(&"call-3"), "still waits for device 9");
        w.ended(&"call-3");
        assert!(w.woke(9, 2, t0).is_empty());
        assert_eq!(w.next_deadline(), None);
    }
}
