//! What a push carries: enough for the app to show the call (CallKit on iOS, a full-screen
//! notification on Android) before the INVITE arrives, in the keys Linphone reads (the same
//! as Flexisip sends): `call-id`, `from-uri`, `display-name`, `uuid` (the device's instance
//! id), `loc-key`/`loc-args`, `send-time` and `pn_ttl`.

use serde_json::{Value, json};

/// Why the device is woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A call (INVITE) waits for it.
    Call,
    /// A message (MESSAGE) waits for it.
    Message,
    /// Nothing waits: its registration is about to expire (RFC 8599 §5.5).
    Refresh,
}

impl Kind {
    /// `loc-key`: the localisation key Linphone shows.
    fn loc_key(self) -> &'static str {
        match self {
            Self::Call => "IC_MSG",
            Self::Message => "IM_MSG",
            Self::Refresh => "",
        }
    }

    /// A label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::Call => "call",
            Self::Message => "message",
            Self::Refresh => "refresh",
        }
    }
}

/// One push to one device.
#[derive(Debug, Clone)]
pub struct Notification<'a> {
    /// `pn-prid`: the device's token at the service.
    pub token: &'a str,
    /// `pn-param`: APNs `TEAMID.BUNDLE.voip`, FCM the project (sender) id.
    pub param: Option<&'a str>,
    /// What waits.
    pub kind: Kind,
    /// Call-ID of the waiting request.
    pub call_id: &'a str,
    /// The caller's URI.
    pub from_uri: &'a str,
    /// The caller's display name (or user part).
    pub display_name: &'a str,
    /// The device's `+sip.instance` (without `<urn:uuid:`…`>`), as `uuid`.
    pub instance: Option<&'a str>,
    /// Seconds the push is worth delivering (the wait for the device).
    pub ttl: u32,
    /// Unix seconds now (`send-time`).
    pub now: u64,
}

impl Notification<'_> {
    fn uuid(&self) -> &str {
        self.instance.unwrap_or_default()
    }

    /// The APNs body: a PushKit (VoIP) payload for a call or message, a silent background
    /// one for a refresh.
    pub fn apns_body(&self) -> Value {
        if self.kind == Kind::Refresh {
            return json!({ "aps": { "content-available": 1 }, "pn_ttl": self.ttl });
        }
        json!({
            "aps": {
                "sound": "",
                "loc-key": self.kind.loc_key(),
                "loc-args": [self.display_name],
                "call-id": self.call_id,
                "uuid": self.uuid(),
                "send-time": send_time(self.now),
            },
            "from-uri": self.from_uri,
            "display-name": self.display_name,
            "pn_ttl": self.ttl,
        })
    }

    /// FCM's `data` (string values only, as FCM requires).
    pub fn fcm_data(&self) -> Value {
        json!({
            "uuid": self.uuid(),
            "from-uri": self.from_uri,
            "display-name": self.display_name,
            "call-id": self.call_id,
            "sip-from": self.display_name,
            "loc-key": self.kind.loc_key(),
            "loc-args": self.display_name,
            "send-time": send_time(self.now),
            "pn_ttl": self.ttl.to_string(),
        })
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of unix seconds, as Linphone parses `send-time`.
pub fn send_time(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (the proleptic Gregorian calendar in 400-year
    // eras).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call() -> Notification<'static> {
        Notification {
            token: "tok",
            param: Some("ABCD1234.org.linphone.phone.voip"),
            kind: Kind::Call,
            call_id: "c-1@192.0.2.1",
            from_uri: "sip:1001@careflow.test",
            display_name: "Dr Alice",
            instance: Some("00000000-0000-0000-0000-000000000007"),
            ttl: 10,
            now: 1_796_000_000,
        }
    }

    #[test]
    fn send_time_is_utc_calendar_time() {
        assert_eq!(send_time(0), "1970-01-01 00:00:00");
        assert_eq!(send_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(send_time(1_796_000_000), "2026-11-30 00:53:20");
    }

    #[test]
    fn payloads_carry_what_linphone_reads() {
        let a = call().apns_body();
        assert_eq!(a["aps"]["call-id"], "c-1@192.0.2.1");
        assert_eq!(a["aps"]["loc-key"], "IC_MSG");
        assert_eq!(a["aps"]["uuid"], "00000000-0000-0000-0000-000000000007");
        assert_eq!(a["from-uri"], "sip:1001@careflow.test");
        assert_eq!(a["display-name"], "Dr Alice");
        let f = call().fcm_data();
        assert!(
            f.as_object()
                .is_some_and(|o| o.values().all(Value::is_string))
        );
        assert_eq!(f["call-id"], "c-1@192.0.2.1");
        assert_eq!(f["pn_ttl"], "10");
        let refresh = Notification {
            kind: Kind::Refresh,
            ..call()
        };
        assert_eq!(refresh.apns_body()["aps"]["content-available"], 1);
        assert!(!refresh.apns_body().to_string().contains("c-1"));
    }
}
