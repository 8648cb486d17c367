//! The APNs provider token (token-based authentication): an ES256 JWT with the key id in its
//! header and the team id and issue time as claims. APNs refuses a token older than an hour
//! and throttles one refreshed more often than every 20 minutes: it is made once and reused
//! for [`REFRESH_AFTER`].

use std::sync::Mutex;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::{PushError, credentials};

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

    #[test]
    fn a_bad_key_file_is_named() {
        let e = ApnsAuth::from_p8(b"not a key", "K", "T").unwrap_err();
        assert!(e.to_string().starts_with("APNs key (.p8):"), "{e}");
        let e = ApnsAuth::from_p8(KEY.as_bytes(), "", "T").unwrap_err();
        assert!(e.to_string().contains("key id"), "{e}");
    }
}
