//! The provisioning API: user tokens, the CareFlow user check.

use careflow_api::auth::JwtConfig;

use super::ConfigError;
use super::raw::{Raw, invalid};

/// How user tokens are verified.
pub(super) fn jwt(r: &Raw<'_>) -> Result<JwtConfig, ConfigError> {
    Ok(JwtConfig {
        hs256_secret: match r.opt("auth_jwt_secret") {
            Some(s) if s.len() < 32 => {
                return Err(invalid(
                    "auth_jwt_secret",
                    "must be at least 32 characters (HS256 needs a long secret)",
                ));
            }
            s => s.map(String::into_bytes),
        },
        jwks: r.opt("auth_jwks_url"),
        issuer: r.opt("auth_jwt_issuer"),
        audience: r.opt("auth_jwt_audience"),
        user_claim: r
            .opt("auth_jwt_user_claim")
            .ok_or_else(|| invalid("auth_jwt_user_claim", "must not be empty"))?,
    })
}

/// `CAREFLOW_USER_CHECK_URL` and its token.
pub(super) fn user_check(r: &Raw<'_>) -> Result<Option<(String, Option<String>)>, ConfigError> {
    match r.opt("careflow_user_check_url") {
        Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
            Ok(Some((u, r.opt("careflow_user_check_token"))))
        }
        Some(u) => Err(invalid(
            "careflow_user_check_url",
            format!("`{u}` is not an http(s) URL"),
        )),
        None => Ok(None),
    }
}
