//! Push wake-ups for sleeping mobile devices (RFC 8599): which bindings sleep, what the
//! registrar answers a device that asks for push, the pushes (one per request and device),
//! and the requests released when a device registers again. The decisions are
//! `careflow_core::push`'s; this drives them and the services.

pub mod stats;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use careflow_core::Binding;
use careflow_core::push::{Provider, PushParams, PushRequest, PushWaits, Wait, registration_stamp};
use careflow_core::registrar::ContactValue;
use careflow_core::transaction::TxKey;
use careflow_push::{Failure, Notification};

pub use crate::config::PushConfig;

use self::stats::PushStats;

/// What a REGISTER's Contacts ask of push, for the registrar's answer (RFC 8599 §5.6.1).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Registration {
    /// No `pn-*` parameters.
    Plain,
    /// A service we do not push through: 555.
    Unserved(String),
    /// A push address or a capability query for a service we serve: the 2xx's
    /// `Feature-Caps`.
    Served(String),
}

/// The push services, the requests waiting for devices, and the counters.
pub(crate) struct Pusher {
    cfg: PushConfig,
    waits: Mutex<PushWaits<TxKey>>,
    /// When each device's push was accepted, for the push-to-registration time.
    pushed: Mutex<HashMap<u64, Instant>>,
    /// Devices of apps our credentials cannot push to (their pushes came back "not your
    /// app"): reached over their flow like any device.
    foreign: Mutex<std::collections::HashSet<u64>>,
    /// Per device, the registration (by stamp) refresh pushes went for and how many (§5.5).
    refreshed: Mutex<HashMap<u64, (u64, u32)>>,
    pub(crate) stats: PushStats,
}

impl Pusher {
    pub(crate) fn new(cfg: PushConfig) -> Self {
        Self {
            waits: Mutex::new(PushWaits::new(cfg.wait)),
            cfg,
            pushed: Mutex::default(),
            refreshed: Mutex::default(),
            foreign: Mutex::default(),
            stats: PushStats::default(),
        }
    }

    /// How long a request waits for a pushed device.
    pub(crate) fn wait(&self) -> Duration {
        self.cfg.wait
    }

    fn services(&self) -> Vec<Provider> {
        let mut v = Vec::new();
        if self.cfg.apns.is_some() {
            v.push(Provider::Apns);
        }
        if self.cfg.fcm.is_some() {
            v.push(Provider::Fcm);
        }
        v
    }

    fn serves(&self, provider: &str) -> bool {
        match Provider::parse(provider) {
            Some(Provider::Apns) => self.cfg.apns.is_some(),
            Some(Provider::Fcm) => self.cfg.fcm.is_some(),
            None => false,
        }
    }

    /// What the registrar answers the push parameters in `contacts`.
    pub(crate) fn registration(&self, contacts: &[ContactValue<'_>]) -> Registration {
        let mut asked = false;
        let mut pnsreg = false;
        for c in contacts {
            let ContactValue::Address(na) = c else {
                continue;
            };
            let provider = match PushParams::of_uri(&na.uri) {
                PushRequest::None => continue,
                PushRequest::Query(p) => p,
                PushRequest::Push(p) => p.provider,
            };
            if !self.serves(&provider) {
                return Registration::Unserved(provider);
            }
            asked = true;
            pnsreg |= na.params.get("+sip.pnsreg").is_some()
                || na.uri.params.get("+sip.pnsreg").is_some();
        }
        if !asked {
            return Registration::Plain;
        }
        let secs = pnsreg.then(|| self.cfg.refresh_before.min(u64::from(u32::MAX)) as u32);
        careflow_core::push::feature_caps(&self.services(), secs)
            .map_or(Registration::Plain, Registration::Served)
    }

    /// The push address of `b`, when it is a device we wake with a push (it then gets
    /// requests only once it registers again after the push).
    pub(crate) fn sleeper(&self, b: &Binding) -> Option<PushParams> {
        if self.foreign.lock().is_ok_and(|f| f.contains(&b.id)) {
            return None;
        }
        let uri = careflow_proto::Uri::parse(&b.contact)?;
        match PushParams::of_uri(&uri) {
            PushRequest::Push(p) if self.serves(&p.provider) => Some(p),
            _ => None,
        }
    }

    /// `key` is for the sleeping `b`: push (the first time) or only wait.
    pub(crate) fn wait_for(&self, key: &TxKey, b: &Binding) -> Wait {
        let stamp = registration_stamp(&b.call_id, b.cseq);
        self.waits.lock().map_or(Wait::Waiting, |mut w| {
            w.wait(key.clone(), b.id, stamp, Instant::now())
        })
    }

    /// `b` is registered as it is now: the requests waiting for it when that is a new
    /// registration (it woke up), each once.
    pub(crate) fn woke(&self, b: &Binding) -> Vec<TxKey> {
        let stamp = registration_stamp(&b.call_id, b.cseq);
        let now = Instant::now();
        let calls = self
            .waits
            .lock()
            .map(|mut w| w.woke(b.id, stamp, now))
            .unwrap_or_default();
        if !calls.is_empty()
            && let Some(at) = self.pushed.lock().ok().and_then(|mut p| p.remove(&b.id))
        {
            self.stats
                .to_register
                .observe(now.saturating_duration_since(at));
        }
        calls
    }

    /// The push for device `id` failed: the requests that waited for it.
    pub(crate) fn failed(&self, id: u64) -> Vec<TxKey> {
        if let Ok(mut p) = self.pushed.lock() {
            p.remove(&id);
        }
        self.waits
            .lock()
            .map(|mut w| w.failed(id))
            .unwrap_or_default()
    }

    /// Device `id` is another app's: never pushed again (while this process runs).
    pub(crate) fn not_ours(&self, id: u64) {
        if let Ok(mut f) = self.foreign.lock() {
            f.insert(id);
        }
    }

    /// Whether `key` still waits for another device.
    pub(crate) fn call_waits(&self, key: &TxKey) -> bool {
        self.waits.lock().is_ok_and(|w| w.call_waits(key))
    }

    /// Forgets the waits that ended (the proxy table answers those requests itself).
    pub(crate) fn sweep(&self, now: Instant) {
        let expired = self
            .waits
            .lock()
            .map(|mut w| w.expired(now))
            .unwrap_or_default();
        if expired.is_empty() {
            return;
        }
        self.stats
            .expired
            .fetch_add(expired.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut p) = self.pushed.lock() {
            for (_, device) in &expired {
                p.remove(device);
            }
        }
    }

    /// Whether a refresh push (§5.5) is due for `b` at unix time `now`: `refresh_before` its
    /// expiry, and again at half and a quarter of that while the device has not registered
    /// again (a background push is not guaranteed to arrive, and a missed one leaves the
    /// phone unreachable until it is next opened).
    pub(crate) fn refresh_due(&self, b: &Binding, now: u64) -> bool {
        const TRIES: u32 = 3;
        let stamp = registration_stamp(&b.call_id, b.cseq);
        let Ok(mut r) = self.refreshed.lock() else {
            return false;
        };
        let sent = match r.get(&b.id) {
            Some((s, n)) if *s == stamp => *n,
            _ => 0,
        };
        if sent >= TRIES || b.expires_in(now) > self.cfg.refresh_before >> sent {
            return false;
        }
        r.insert(b.id, (stamp, sent + 1));
        true
    }

    /// Forgets refresh bookkeeping of devices that are gone.
    pub(crate) fn retain_refreshed(&self, live: &dyn Fn(u64) -> bool) {
        if let Ok(mut r) = self.refreshed.lock() {
            r.retain(|id, _| live(*id));
        }
        if let Ok(mut f) = self.foreign.lock() {
            f.retain(|id| live(*id));
        }
    }

    /// Sends `n` to the device at `p` (for its binding `id`), counting it.
    pub(crate) async fn send(
        &self,
        id: u64,
        p: &PushParams,
        n: &Notification<'_>,
        since: Instant,
    ) -> Result<(), Failure> {
        let service = p.service().ok_or_else(|| {
            Failure::Refused(format!("no push service `{}` configured", p.provider))
        })?;
        let result = match service {
            Provider::Apns => match &self.cfg.apns {
                Some(a) => a.send(n).await,
                None => Err(Failure::Refused("APNs is not configured".into())),
            },
            Provider::Fcm => match &self.cfg.fcm {
                Some(f) => f.send(n).await,
                None => Err(Failure::Refused("FCM is not configured".into())),
            },
        };
        match &result {
            Ok(()) => {
                self.stats.sent(service, n.kind);
                if n.kind != careflow_push::Kind::Refresh {
                    let now = Instant::now();
                    self.stats
                        .to_push
                        .observe(now.saturating_duration_since(since));
                    if let Ok(mut pushed) = self.pushed.lock() {
                        pushed.insert(id, now);
                    }
                }
            }
            Err(f) => self.stats.failed(service, f),
        }
        result
    }
}

/// Whether `b` is a device `pusher` wakes (none: no push service): its binding outlives its
/// connection, its NAT mapping and its node, since the push reaches it without them.
pub(crate) fn survives_its_flow(pusher: Option<&Pusher>, b: &Binding) -> bool {
    pusher.is_some_and(|p| p.sleeper(b).is_some())
}

/// The `+sip.instance` of a binding as the push payload's `uuid` (Linphone's form: the UUID
/// without `<urn:uuid:` and `>`).
pub(crate) fn instance_uuid(b: &Binding) -> Option<&str> {
    let i = b.instance.as_deref()?.trim_matches('"');
    let i = i.trim_start_matches('<').trim_end_matches('>');
    Some(i.strip_prefix("urn:uuid:").unwrap_or(i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pusher() -> Pusher {
        Pusher::new(PushConfig {
            apns: None,
            fcm: None,
            wait: Duration::from_secs(10),
            refresh_before: 120,
        })
    }

    fn binding(cseq: u32, expires_at: u64) -> Binding {
        Binding {
            id: 7,
            aor: "nurse@push.test".into(),
            contact: "sip:nurse@192.0.2.7;pn-provider=fcm;pn-prid=t".into(),
            call_id: "reg-1".into(),
            cseq,
            expires_at,
            registered_at: 0,
            q: None,
            instance: Some("\"<urn:uuid:00000000-0000-0000-0000-000000000001>\"".into()),
            reg_id: None,
            transport: careflow_core::Transport::Udp,
            source: "192.0.2.7:5060".parse().expect("addr"),
            user_agent: None,
            conn: None,
            path: Vec::new(),
            here: true,
            owner: None,
        }
    }

    #[test]
    fn refresh_pushes_go_before_expiry_and_again_until_the_device_registers() {
        let p = pusher();
        let b = binding(5, 1_000);
        assert!(!p.refresh_due(&b, 1_000 - 121), "not yet");
        assert!(p.refresh_due(&b, 1_000 - 120));
        assert!(!p.refresh_due(&b, 1_000 - 100), "once per step");
        assert!(p.refresh_due(&b, 1_000 - 60), "missed: again at half");
        assert!(p.refresh_due(&b, 1_000 - 30), "and at a quarter");
        assert!(!p.refresh_due(&b, 1_000 - 10), "three at most");
        // It registered again: a new registration, a new round.
        let again = binding(6, 2_000);
        assert!(!p.refresh_due(&again, 1_500));
        assert!(p.refresh_due(&again, 2_000 - 120));
        assert_eq!(
            instance_uuid(&again),
            Some("00000000-0000-0000-0000-000000000001")
        );
    }
}
