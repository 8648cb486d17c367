//! The APNs provider token (token-based authentication): an ES256 JWT with the key id in its
//! header and the team id and issue time as claims. APNs refuses a token older than an hour
//! and throttles one refreshed more often than every 20 minutes: it is made once and reused
//! for [`REFRESH_AFTER`]. [`Apns`] sends the pushes over one HTTP/2 connection.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::http::{Origin, PushTls};
use crate::{Failure, Kind, Notification, PushError, credentials, error_reason};

/// Apple's production service (`https://api.sandbox.push.apple.com` for development builds).
pub const PRODUCTION: &str = "https://api.push.apple.com";

/// Age at which a new token is made (well inside APNs's hour, beyond its 20 minutes).
pub const REFRESH_AFTER: u64 = 50 * 60;

/// The signing key and the token in use.
pub struct ApnsAuth {
    key: EncodingKey,
    key_id: String,
    team_id: String,
    current: Mutex<Option<(String, u64)>>,
}

impl std::fmt::Debug for ApnsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsAuth")
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: u64,
}

impl ApnsAuth {
    /// From the `.p8` key file's contents (PKCS#8 PEM), its key id and the team id.
    pub fn from_p8(pem: &[u8], key_id: &str, team_id: &str) -> Result<Self, PushError> {
        let key = EncodingKey::from_ec_pem(pem).map_err(|e| credentials("APNs key (.p8)", e))?;
        if key_id.is_empty() || team_id.is_empty() {
            return Err(credentials(
                "APNs key",
                "the key id and the team id are required",
            ));
        }
        Ok(Self {
            key,
            key_id: key_id.to_string(),
            team_id: team_id.to_string(),
            current: Mutex::new(None),
        })
    }

    /// The token to send at unix time `now`: the one in use while it is younger than
    /// [`REFRESH_AFTER`], else a new one.
    pub fn token(&self, now: u64) -> Result<String, PushError> {
        let mut current = self
            .current
            .lock()
            .map_err(|_| credentials("APNs token", "lock poisoned"))?;
        if let Some((token, at)) = current.as_ref()
            && now >= *at
            && now - at < REFRESH_AFTER
        {
            return Ok(token.clone());
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let claims = Claims {
            iss: &self.team_id,
            iat: now,
        };
        let token = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| credentials("APNs token", e))?;
        *current = Some((token.clone(), now));
        Ok(token)
    }

    /// Forgets the token in use (APNs said it expired or is invalid): the next is new.
    pub fn reset(&self) {
        if let Ok(mut current) = self.current.lock() {
            *current = None;
        }
    }
}

/// Where one push goes: the token, the topic and the push type, from the device's `pn-prid`
/// and `pn-param` (RFC 8599 §9.2: `pn-param` is `TEAMID.BUNDLE.SERVICES`). Linphone on
/// iOS 13+ registers two tokens, `VOIPTOKEN:voip&REMOTETOKEN:remote`, with the services
/// `voip&remote`: calls use the VoIP (PushKit) one, a refresh the background one, since iOS
/// ends an app that gets a VoIP push it does not turn into a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The device token (the URL path's last segment).
    pub token: String,
    /// `apns-topic`.
    pub topic: String,
    /// `apns-push-type`.
    pub push_type: &'static str,
    /// `apns-priority`.
    pub priority: &'static str,
}

impl Target {
    /// The target of `n`, or why there is none.
    pub fn of(n: &Notification<'_>) -> Result<Self, Failure> {
        let param = n.param.ok_or_else(|| {
            Failure::Refused("no pn-param (TEAMID.BUNDLE.voip) in the registration".into())
        })?;
        let (_team, rest) = param.split_once('.').ok_or_else(|| {
            Failure::Refused(format!("pn-param `{param}` is not TEAMID.BUNDLE.voip"))
        })?;
        let (bundle, services) = match rest.rsplit_once('.') {
            Some((b, s))
                if s.split('&')
                    .all(|w| matches!(w, "voip" | "remote" | "apns")) =>
            {
                (b, s)
            }
            _ => (rest, "voip"),
        };
        let want = if n.kind == Kind::Refresh {
            "remote"
        } else {
            "voip"
        };
        // Each token is labelled (`TOKEN:voip&TOKEN:remote`), or takes the service at its
        // place in `pn-param` (a cold-started Linphone has been seen to drop a label).
        let listed: Vec<&str> = services.split('&').collect();
        let token = n.token.split('&').enumerate().find_map(|(i, t)| {
            let (tok, kind) = match t.split_once(':') {
                Some((tok, kind)) => (tok, kind),
                None => (t, *listed.get(i)?),
            };
            let kind = if kind == "apns" { "voip" } else { kind };
            (kind == want).then(|| tok.to_string())
        });
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(Failure::Refused(format!(
                "the device registered no `{want}` token"
            )));
        };
        Ok(if want == "voip" {
            Self {
                token,
                topic: format!("{bundle}.voip"),
                push_type: "voip",
                priority: "10",
            }
        } else {
            Self {
                token,
                topic: bundle.to_string(),
                push_type: "background",
                priority: "5",
            }
        })
    }
}

/// APNs: the provider token and the connection to the service.
pub struct Apns {
    auth: std::sync::Arc<ApnsAuth>,
    origin: Origin,
}

impl std::fmt::Debug for Apns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Apns")
            .field("auth", &self.auth)
            .field("url", &self.origin.name())
            .finish()
    }
}

impl Apns {
    /// Pushes through the service at `url` (`push_apns_url`).
    pub fn new(
        auth: std::sync::Arc<ApnsAuth>,
        url: &str,
        tls: PushTls,
        timeout: Duration,
    ) -> Result<Self, PushError> {
        Ok(Self {
            auth,
            origin: Origin::new("push_apns_url", url, tls, timeout)?,
        })
    }

    /// Sends `n`.
    pub async fn send(&self, n: &Notification<'_>) -> Result<(), Failure> {
        let target = Target::of(n)?;
        let body = Bytes::from(n.apns_body().to_string());
        let path = format!("/3/device/{}", target.token);
        for attempt in 0..2 {
            let jwt = self
                .auth
                .token(n.now)
                .map_err(|e| Failure::Refused(e.to_string()))?;
            let bearer = format!("bearer {jwt}");
            let headers = [
                ("authorization", bearer.as_str()),
                ("apns-topic", target.topic.as_str()),
                ("apns-push-type", target.push_type),
                ("apns-priority", target.priority),
                ("apns-expiration", "0"),
                ("content-type", "application/json"),
            ];
            let answer = self
                .origin
                .post(&path, &headers, body.clone())
                .await
                .map_err(Failure::Unavailable)?;
            let reason = || error_reason(&answer.body);
            return match answer.status {
                200 => Ok(()),
                // The token or topic is another team's app (e.g. Linphone from the App Store).
                400 | 403
                    if matches!(
                        reason().as_str(),
                        "DeviceTokenNotForTopic" | "TopicDisallowed" | "BadTopic"
                    ) =>
                {
                    Err(Failure::NotOurs(format!(
                        "APNs {}: {}",
                        answer.status,
                        reason()
                    )))
                }
                400 | 410
                    if matches!(
                        reason().as_str(),
                        "BadDeviceToken" | "Unregistered" | "ExpiredToken"
                    ) =>
                {
                    Err(Failure::InvalidToken(format!(
                        "APNs {}: {}",
                        answer.status,
                        reason()
                    )))
                }
                403 if attempt == 0
                    && matches!(
                        reason().as_str(),
                        "ExpiredProviderToken" | "InvalidProviderToken"
                    ) =>
                {
                    self.auth.reset();
                    continue;
                }
                429 | 500 | 503 => Err(Failure::Unavailable(format!(
                    "APNs {}: {}",
                    answer.status,
                    reason()
                ))),
                s => Err(Failure::Refused(format!("APNs {s}: {}", reason()))),
            };
        }
        Err(Failure::Refused("APNs refused a new provider token".into()))
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{DecodingKey, Validation};

    use super::*;

    const KEY: &str = include_str!("../testdata/apns-test-key.p8");
    const PUBLIC: &str = include_str!("../testdata/apns-test-key.pub");

    #[derive(serde::Deserialize)]
    struct Seen {
        iss: String,
        iat: u64,
    }

    fn verify(token: &str) -> (Header, Seen) {
        let mut v = Validation::new(Algorithm::ES256);
        v.required_spec_claims.clear();
        v.validate_exp = false;
        let key = DecodingKey::from_ec_pem(PUBLIC.as_bytes()).expect("public key");
        let data = jsonwebtoken::decode::<Seen>(token, &key, &v).expect("a valid ES256 token");
        (data.header, data.claims)
    }

    #[test]
    fn the_token_is_signed_with_the_key_and_reused_until_it_is_due() {
        let auth = ApnsAuth::from_p8(KEY.as_bytes(), "ABC123DEFG", "DEF123GHIJ").expect("key");
        let t0 = 1_796_000_000;
        let first = auth.token(t0).expect("token");
        let (header, claims) = verify(&first);
        assert_eq!(header.kid.as_deref(), Some("ABC123DEFG"));
        assert_eq!((claims.iss.as_str(), claims.iat), ("DEF123GHIJ", t0));
        assert_eq!(
            auth.token(t0 + REFRESH_AFTER - 1).expect("token"),
            first,
            "reused"
        );
        let second = auth.token(t0 + REFRESH_AFTER).expect("token");
        assert_ne!(second, first);
        assert_eq!(verify(&second).1.iat, t0 + REFRESH_AFTER);
        // A clock stepped back does not keep a token "from the future".
        assert_ne!(auth.token(t0).expect("token"), second);
        assert!(!format!("{auth:?}").contains("PRIVATE"));
    }

    fn note(token: &'static str, param: Option<&'static str>, kind: Kind) -> Notification<'static> {
        Notification {
            token,
            param,
            kind,
            call_id: "c",
            from_uri: "sip:a@h",
            display_name: "a",
            instance: None,
            ttl: 10,
            now: 0,
        }
    }

    #[test]
    fn targets_follow_pn_param_and_linphone_two_token_form() {
        let t = Target::of(&note(
            "abc",
            Some("ABCD1234.org.linphone.phone.voip"),
            Kind::Call,
        ))
        .expect("t");
        assert_eq!(
            (t.token.as_str(), t.topic.as_str(), t.push_type, t.priority),
            ("abc", "org.linphone.phone.voip", "voip", "10")
        );
        // No background token: no refresh push (a VoIP push that is no call gets the app killed).
        assert!(
            Target::of(&note(
                "abc",
                Some("ABCD1234.org.linphone.phone.voip"),
                Kind::Refresh
            ))
            .is_err()
        );
        let both = note(
            "v0ip:voip&rem0te:remote",
            Some("ABCD1234.org.linphone.phone.voip&remote"),
            Kind::Call,
        );
        assert_eq!(Target::of(&both).expect("t").token, "v0ip");
        let refresh = Notification {
            kind: Kind::Refresh,
            ..both
        };
        let t = Target::of(&refresh).expect("t");
        assert_eq!(
            (t.token.as_str(), t.topic.as_str(), t.push_type, t.priority),
            ("rem0te", "org.linphone.phone", "background", "5")
        );
        // A token without its label takes the service at its place in pn-param.
        let unlabelled = note(
            "v0ip:voip&rem0te",
            Some("ABCD1234.org.linphone.phone.voip&remote"),
            Kind::Refresh,
        );
        assert_eq!(Target::of(&unlabelled).expect("t").token, "rem0te");
        // A bundle without a services suffix is taken whole.
        assert_eq!(
            Target::of(&note("abc", Some("T1.com.example.app"), Kind::Call))
                .expect("t")
                .topic,
            "com.example.app.voip"
        );
        assert!(Target::of(&note("abc", None, Kind::Call)).is_err());
    }

    #[test]
    fn a_bad_key_file_is_named() {
        let e = ApnsAuth::from_p8(b"not a key", "K", "T").unwrap_err();
        assert!(e.to_string().starts_with("APNs key (.p8):"), "{e}");
        let e = ApnsAuth::from_p8(KEY.as_bytes(), "", "T").unwrap_err();
        assert!(e.to_string().contains("key id"), "{e}");
    }
}
