//! FCM HTTP v1 credentials: a service account (its JSON key file) signs an RS256 assertion,
//! exchanged at its `token_uri` for an OAuth2 access token (RFC 7523 JWT bearer grant); the
//! token is cached until shortly before it expires. [`Fcm`] sends high-priority data
//! messages with it.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::http::{Origin, PushTls};
use crate::{Failure, Notification, PushError, credentials, error_reason};

/// Google's FCM service.
pub const PRODUCTION: &str = "https://fcm.googleapis.com";

/// The OAuth2 scope of FCM's send API.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// A cached access token is renewed this long before it expires.
pub const RENEW_BEFORE: u64 = 60;
/// Lifetime asked for in the assertion (Google's maximum).
const ASSERTION_LIFETIME: u64 = 3600;

#[derive(Deserialize)]
struct ServiceAccount {
    project_id: String,
    private_key: String,
    client_email: String,
    token_uri: String,
}

/// A service account and the access token in use.
pub struct FcmAuth {
    project_id: String,
    client_email: String,
    token_uri: String,
    key: EncodingKey,
    current: Mutex<Option<(String, u64)>>,
}

impl std::fmt::Debug for FcmAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FcmAuth")
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Assertion<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

impl FcmAuth {
    /// From the service account's JSON key file.
    pub fn from_json(json: &str) -> Result<Self, PushError> {
        let sa: ServiceAccount =
            serde_json::from_str(json).map_err(|e| credentials("FCM service account (JSON)", e))?;
        let key = EncodingKey::from_rsa_pem(sa.private_key.as_bytes())
            .map_err(|e| credentials("FCM service account private_key", e))?;
        Ok(Self {
            project_id: sa.project_id,
            client_email: sa.client_email,
            token_uri: sa.token_uri,
            key,
            current: Mutex::new(None),
        })
    }

    /// The Firebase project the messages are sent in.
    pub fn project_id(&self) -> &str {
        &self.project_id
    }

    /// Where the assertion is exchanged for an access token.
    pub fn token_uri(&self) -> &str {
        &self.token_uri
    }

    /// The form body that asks `token_uri` for an access token at unix time `now`.
    pub fn token_request(&self, now: u64) -> Result<String, PushError> {
        let claims = Assertion {
            iss: &self.client_email,
            scope: SCOPE,
            aud: &self.token_uri,
            iat: now,
            exp: now + ASSERTION_LIFETIME,
        };
        let assertion = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
            .map_err(|e| credentials("FCM assertion", e))?;
        Ok(format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        ))
    }

    /// The access token in use at `now`, while it has more than [`RENEW_BEFORE`] left.
    pub fn cached(&self, now: u64) -> Option<String> {
        let current = self.current.lock().ok()?;
        let (token, expires_at) = current.as_ref()?;
        (now + RENEW_BEFORE < *expires_at).then(|| token.clone())
    }

    /// The token service's answer at `now`: `access_token`, valid `expires_in` seconds.
    pub fn store(&self, access_token: &str, expires_in: u64, now: u64) {
        if let Ok(mut current) = self.current.lock() {
            *current = Some((access_token.to_string(), now + expires_in));
        }
    }

    /// Forgets the access token (FCM refused it): the next push asks for a new one.
    pub fn forget(&self) {
        if let Ok(mut current) = self.current.lock() {
            *current = None;
        }
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

/// FCM: the service account, the access token, and the connections to the send API and
/// the token service.
pub struct Fcm {
    auth: std::sync::Arc<FcmAuth>,
    send: Origin,
    token: Origin,
    token_path: String,
    refreshing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Fcm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fcm")
            .field("auth", &self.auth)
            .field("url", &self.send.name())
            .finish()
    }
}

impl Fcm {
    /// Pushes through the send API at `url` (`push_fcm_url`); the access tokens come from
    /// the service account's `token_uri`.
    pub fn new(
        auth: std::sync::Arc<FcmAuth>,
        url: &str,
        tls: PushTls,
        timeout: Duration,
    ) -> Result<Self, PushError> {
        let token = Origin::new(
            "FCM service account token_uri",
            &auth.token_uri,
            tls.clone(),
            timeout,
        )?;
        let token_path = auth
            .token_uri
            .strip_prefix(token.name())
            .filter(|p| p.starts_with('/'))
            .unwrap_or("/")
            .to_string();
        Ok(Self {
            send: Origin::new("push_fcm_url", url, tls, timeout)?,
            token,
            token_path,
            auth,
            refreshing: tokio::sync::Mutex::new(()),
        })
    }

    /// Sends `n` as a high-priority data message.
    pub async fn send(&self, n: &Notification<'_>) -> Result<(), Failure> {
        let body = json!({
            "message": {
                "token": n.token,
                "android": { "priority": "high", "ttl": format!("{}s", n.ttl) },
                "data": n.fcm_data(),
            }
        });
        let body = Bytes::from(body.to_string());
        let path = format!("/v1/projects/{}/messages:send", self.auth.project_id);
        for attempt in 0..2 {
            let bearer = format!("Bearer {}", self.access_token(n.now).await?);
            let headers = [
                ("authorization", bearer.as_str()),
                ("content-type", "application/json"),
            ];
            let answer = self
                .send
                .post(&path, &headers, body.clone())
                .await
                .map_err(Failure::Unavailable)?;
            let reason = || error_reason(&answer.body);
            let says = |what: &str| String::from_utf8_lossy(&answer.body).contains(what);
            return match answer.status {
                200 => Ok(()),
                401 if attempt == 0 => {
                    self.auth.forget();
                    continue;
                }
                // The token is another Firebase project's app (e.g. Linphone from the store).
                403 if says("SENDER_ID_MISMATCH") => {
                    Err(Failure::NotOurs(format!("FCM 403: {}", reason())))
                }
                404 => Err(Failure::InvalidToken(format!("FCM 404: {}", reason()))),
                400 if says("registration token") => {
                    Err(Failure::InvalidToken(format!("FCM 400: {}", reason())))
                }
                429 | 500 | 503 => Err(Failure::Unavailable(format!(
                    "FCM {}: {}",
                    answer.status,
                    reason()
                ))),
                s => Err(Failure::Refused(format!("FCM {s}: {}", reason()))),
            };
        }
        Err(Failure::Refused("FCM refused a new access token".into()))
    }

    /// The access token in use, or a new one from the token service (one request at a
    /// time: concurrent pushes wait for it rather than each asking).
    async fn access_token(&self, now: u64) -> Result<String, Failure> {
        if let Some(t) = self.auth.cached(now) {
            return Ok(t);
        }
        let _one = self.refreshing.lock().await;
        if let Some(t) = self.auth.cached(now) {
            return Ok(t);
        }
        let form = self
            .auth
            .token_request(now)
            .map_err(|e| Failure::Refused(e.to_string()))?;
        let answer = self
            .token
            .post(
                &self.token_path,
                &[("content-type", "application/x-www-form-urlencoded")],
                Bytes::from(form),
            )
            .await
            .map_err(|e| Failure::Unavailable(format!("OAuth2 token: {e}")))?;
        if answer.status != 200 {
            let why = format!(
                "OAuth2 token {}: {}",
                answer.status,
                error_reason(&answer.body)
            );
            return Err(if answer.status >= 500 {
                Failure::Unavailable(why)
            } else {
                Failure::Refused(why)
            });
        }
        let t: TokenAnswer = serde_json::from_slice(&answer.body)
            .map_err(|e| Failure::Refused(format!("OAuth2 token answer: {e}")))?;
        self.auth.store(&t.access_token, t.expires_in, now);
        Ok(t.access_token)
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{DecodingKey, Validation};

    use super::*;

    const ACCOUNT: &str = include_str!("../testdata/fcm-test-service-account.json");
    const PUBLIC: &str = include_str!("../testdata/fcm-test-key.pub");

    #[derive(Deserialize)]
    struct Seen {
        iss: String,
        scope: String,
        aud: String,
        iat: u64,
        exp: u64,
    }

    #[test]
    fn the_assertion_is_signed_and_the_access_token_reused_until_it_is_due() {
        let auth = FcmAuth::from_json(ACCOUNT).expect("service account");
        assert_eq!(auth.project_id(), "careflow-test");
        let t0 = 1_796_000_000;
        let body = auth.token_request(t0).expect("assertion");
        let assertion = body
            .strip_prefix(
                "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=",
            )
            .expect("a JWT bearer grant");
        let mut v = Validation::new(Algorithm::RS256);
        v.set_audience(&["https://oauth2.googleapis.com/token"]);
        v.validate_exp = false;
        let key = DecodingKey::from_rsa_pem(PUBLIC.as_bytes()).expect("public key");
        let seen = jsonwebtoken::decode::<Seen>(assertion, &key, &v)
            .expect("a valid RS256 assertion")
            .claims;
        assert_eq!(seen.iss, "push@careflow-test.iam.gserviceaccount.com");
        assert_eq!(seen.scope, SCOPE);
        assert_eq!(seen.aud, "https://oauth2.googleapis.com/token");
        assert_eq!((seen.iat, seen.exp), (t0, t0 + 3600));

        assert_eq!(auth.cached(t0), None, "nothing cached yet");
        auth.store("ya29.test-token", 3599, t0);
        assert_eq!(
            auth.cached(t0 + 3599 - RENEW_BEFORE - 1).as_deref(),
            Some("ya29.test-token")
        );
        assert_eq!(
            auth.cached(t0 + 3599 - RENEW_BEFORE),
            None,
            "renewed before it expires"
        );
        assert!(!format!("{auth:?}").contains("PRIVATE"));
    }

    #[test]
    fn a_bad_service_account_is_named() {
        let e = FcmAuth::from_json("{}").unwrap_err();
        assert!(
            e.to_string().starts_with("FCM service account (JSON):"),
            "{e}"
        );
        let broken = ACCOUNT.replace("BEGIN PRIVATE KEY", "BEGIN NOTHING");
        let e = FcmAuth::from_json(&broken).unwrap_err();
        assert!(
            e.to_string().starts_with("FCM service account private_key"),
            "{e}"
        );
    }
}
