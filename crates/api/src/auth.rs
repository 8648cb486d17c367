//! Who calls the API: CareFlow users with a bearer JWT from CareFlow's identity provider
//! (HS256 with a shared secret, or RS256/ES256 keys from a JWKS URL or file), and admins with
//! API keys made by `careflow-sip apikey create`.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::{Digest, Sha256};

use crate::http_client;

/// Token settings (config keys AUTH_JWT_*).
#[derive(Debug, Clone, Default)]
pub struct JwtConfig {
    /// HS256 shared secret.
    pub hs256_secret: Option<Vec<u8>>,
    /// JWKS location: an http(s) URL or a file path.
    pub jwks: Option<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Claim holding the CareFlow user id (`sub` by default).
    pub user_claim: String,
}

/// A verified CareFlow user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CareflowUser {
    /// The user id claim.
    pub id: String,
    /// The `email` claim, when present.
    pub email: Option<String>,
}

/// Why a token was refused; the text is safe to return.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Neither AUTH_JWT_SECRET nor AUTH_JWKS_URL is configured.
    #[error("token authentication is not configured on this server")]
    Unconfigured,
    /// No `Authorization: Bearer` header.
    #[error("a bearer token is required")]
    Missing,
    /// Expired, badly signed, wrong issuer or audience, or no user id.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The JWKS could not be fetched (and no cached key fits).
    #[error("the signing keys could not be fetched")]
    KeysUnavailable,
}

/// Cached signing keys from a JWKS.
struct Jwks {
    source: String,
    keys: RwLock<Option<(Arc<JwkSet>, Instant)>>,
    refresh: tokio::sync::Mutex<Option<Instant>>,
}

/// Keys are refreshed this often, and at most this often when a token names an unknown key.
const JWKS_MAX_AGE: Duration = Duration::from_secs(600);
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(30);

impl Jwks {
    async fn fetch(&self) -> Result<Arc<JwkSet>, String> {
        let body = if self.source.starts_with("http://") || self.source.starts_with("https://") {
            http_client::get(&self.source, Duration::from_secs(5)).await?
        } else {
            let path = self.source.clone();
            tokio::task::spawn_blocking(move || std::fs::read(&path))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("{}: {e}", self.source))?
        };
        let set: JwkSet =
            serde_json::from_slice(&body).map_err(|e| format!("not a JWKS document: {e}"))?;
        Ok(Arc::new(set))
    }

    /// The key set, fetched when missing or old, or (rate limited) when `kid` is unknown.
    async fn keys_for(&self, kid: Option<&str>) -> Result<Arc<JwkSet>, AuthError> {
        let cached = self.keys.read().ok().and_then(|k| k.clone());
        if let Some((set, at)) = &cached {
            let known = kid.is_none_or(|k| set.find(k).is_some());
            if known && at.elapsed() < JWKS_MAX_AGE {
                return Ok(set.clone());
            }
        }
        let mut last = self.refresh.lock().await;
        if let (Some(t), Some((set, _))) = (*last, &cached)
            && t.elapsed() < JWKS_MIN_REFRESH
        {
            return Ok(set.clone());
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(set) => {
                if let Ok(mut k) = self.keys.write() {
                    *k = Some((set.clone(), Instant::now()));
                }
                Ok(set)
            }
            Err(e) => {
                tracing::error!(source = %self.source, error = %e, "JWKS fetch failed");
                cached.map(|(s, _)| s).ok_or(AuthError::KeysUnavailable)
            }
        }
    }
}

/// Verifies bearer tokens.
pub struct TokenVerifier {
    cfg: JwtConfig,
    jwks: Option<Jwks>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("hs256", &self.cfg.hs256_secret.is_some())
            .field("jwks", &self.cfg.jwks)
            .finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// A verifier for `cfg` (nothing is fetched until the first token).
    pub fn new(cfg: JwtConfig) -> Self {
        let jwks = cfg.jwks.clone().map(|source| Jwks {
            source,
            keys: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(None),
        });
        Self { cfg, jwks }
    }

    /// Whether any way of verifying tokens is configured.
    pub fn configured(&self) -> bool {
        self.cfg.hs256_secret.is_some() || self.jwks.is_some()
    }

    /// Checks a token and returns its user.
    pub async fn verify(&self, token: &str) -> Result<CareflowUser, AuthError> {
        if !self.configured() {
            return Err(AuthError::Unconfigured);
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed token".into()))?;
        let key = match header.alg {
            Algorithm::HS256 => {
                let secret =
                    self.cfg.hs256_secret.as_ref().ok_or_else(|| {
                        AuthError::Invalid("HS256 tokens are not accepted".into())
                    })?;
                DecodingKey::from_secret(secret)
            }
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::ES256
            | Algorithm::ES384
            | Algorithm::PS256
            | Algorithm::EdDSA => {
                let jwks = self.jwks.as_ref().ok_or_else(|| {
                    AuthError::Invalid(format!("{:?} tokens are not accepted", header.alg))
                })?;
                let set = jwks.keys_for(header.kid.as_deref()).await?;
                let jwk = match header.kid.as_deref() {
                    Some(kid) => set.find(kid),
                    None if set.keys.len() == 1 => set.keys.first(),
                    None => None,
                }
                .ok_or_else(|| AuthError::Invalid("unknown signing key".into()))?;
                DecodingKey::from_jwk(jwk)
                    .map_err(|_| AuthError::Invalid("unusable signing key".into()))?
            }
            other => return Err(AuthError::Invalid(format!("{other:?} is not accepted"))),
        };
        let mut v = Validation::new(header.alg);
        v.leeway = 30;
        v.set_required_spec_claims(&["exp"]);
        match &self.cfg.issuer {
            Some(iss) => v.set_issuer(&[iss]),
            None => v.iss = None,
        }
        match &self.cfg.audience {
            Some(aud) => v.set_audience(&[aud]),
            None => v.validate_aud = false,
        }
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &v)
                .map_err(|e| AuthError::Invalid(token_error(&e)))?;
        let id = data
            .claims
            .get(&self.cfg.user_claim)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty() && s.len() <= 256)
            .ok_or_else(|| AuthError::Invalid(format!("no `{}` claim", self.cfg.user_claim)))?;
        Ok(CareflowUser {
            id: id.to_string(),
            email: data
                .claims
                .get("email")
                .and_then(|v| v.as_str())
                .map(str::to_string),
        })
    }
}

fn token_error(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => "expired".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::ImmatureSignature => "not valid yet".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("missing `{c}` claim"),
        ErrorKind::InvalidAlgorithm => "algorithm does not fit the key".into(),
        _ => "cannot be verified".into(),
    }
}

/// A fresh admin API key (`cfk_` + 64 hex digits, 256 bits) and its stored digest.
pub fn new_api_key() -> Result<(String, String), String> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| format!("no randomness: {e}"))?;
    let key = format!("cfk_{}", careflow_proto::digest::hex(&raw));
    let digest = api_key_digest(&key);
    Ok((key, digest))
}

/// What is stored for a key: SHA-256 hex (the key has 256 bits of entropy; no slow hash is
/// needed, and the lookup by digest leaks nothing about the key).
pub fn api_key_digest(key: &str) -> String {
    careflow_proto::digest::hex(&Sha256::digest(key.as_bytes()))
}

/// Whether a bearer value looks like one of our API keys rather than a JWT.
pub fn is_api_key(token: &str) -> bool {
    token.starts_with("cfk_")
}

/// Per-caller request limit (`API_RATE_LIMIT`/`API_RATE_BURST`): the token bucket of
/// `careflow_core::ratelimit`, the same one the SIP guard uses, bounded to 100,000 callers.
#[derive(Debug)]
pub struct RateLimiter(careflow_core::ratelimit::KeyedLimiter<String>);

impl RateLimiter {
    /// `per_second` requests on average, `burst` at once.
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self(careflow_core::ratelimit::KeyedLimiter::new(
            per_second,
            burst,
            100_000,
            Instant::now(),
        ))
    }

    /// Takes one request from `caller`'s bucket; false when it is empty.
    pub fn allow(&self, caller: &str) -> bool {
        self.0.allow(caller.to_string(), Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn hs(claims: serde_json::Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn verifier() -> TokenVerifier {
        TokenVerifier::new(JwtConfig {
            hs256_secret: Some(b"shared-secret-for-tests".to_vec()),
            issuer: Some("https://securetoken.google.com/careflow".into()),
            audience: Some("careflow".into()),
            user_claim: "sub".into(),
            ..JwtConfig::default()
        })
    }

    #[tokio::test]
    async fn hs256_tokens_are_checked_for_signature_expiry_issuer_and_audience() {
        let v = verifier();
        let good = serde_json::json!({"sub": "u-1", "email": "a@b.c", "exp": now() + 60,
            "iss": "https://securetoken.google.com/careflow", "aud": "careflow"});
        let user = v
            .verify(&hs(good.clone(), b"shared-secret-for-tests"))
            .await
            .unwrap();
        assert_eq!(user.id, "u-1");
        assert_eq!(user.email.as_deref(), Some("a@b.c"));
        let wrong_key = hs(good.clone(), b"other");
        assert_eq!(
            v.verify(&wrong_key).await,
            Err(AuthError::Invalid("bad signature".into()))
        );
        let mut expired = good.clone();
        expired["exp"] = (now() - 3600).into();
        assert_eq!(
            v.verify(&hs(expired, b"shared-secret-for-tests")).await,
            Err(AuthError::Invalid("expired".into()))
        );
        let mut aud = good.clone();
        aud["aud"] = "other-project".into();
        assert_eq!(
            v.verify(&hs(aud, b"shared-secret-for-tests")).await,
            Err(AuthError::Invalid("wrong audience".into()))
        );
        let mut iss = good.clone();
        iss["iss"] = "https://evil.example".into();
        assert!(
            v.verify(&hs(iss, b"shared-secret-for-tests"))
                .await
                .is_err()
        );
        let mut no_sub = good;
        no_sub.as_object_mut().unwrap().remove("sub");
        assert!(
            v.verify(&hs(no_sub, b"shared-secret-for-tests"))
                .await
                .is_err()
        );
        assert!(v.verify("not.a.token").await.is_err());
    }

    #[tokio::test]
    async fn nothing_configured_refuses_everything() {
        let v = TokenVerifier::new(JwtConfig {
            user_claim: "sub".into(),
            ..JwtConfig::default()
        });
        let t = hs(serde_json::json!({"sub": "x", "exp": now() + 60}), b"k");
        assert_eq!(v.verify(&t).await, Err(AuthError::Unconfigured));
    }

    #[test]
    fn api_keys_are_long_and_stored_as_digests() {
        let (key, digest) = new_api_key().unwrap();
        assert!(is_api_key(&key));
        assert_eq!(key.len(), 4 + 64);
        assert_eq!(api_key_digest(&key), digest);
        assert_ne!(digest, key);
    }

    #[test]
    fn rate_limiter_allows_the_burst_then_refuses() {
        let r = RateLimiter::new(1, 3);
        assert!(r.allow("a") && r.allow("a") && r.allow("a"));
        assert!(!r.allow("a"));
        assert!(r.allow("b"), "callers have their own buckets");
    }
}
