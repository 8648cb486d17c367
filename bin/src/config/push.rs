//! The push settings: APNs (a `.p8` key, its key id and the team id) and FCM (a service
//! account's JSON key file), the services' URLs, and how long a request waits for a woken
//! device. The credential files are read and checked here, so a bad one names its key at
//! start-up; their contents are never logged.

use std::sync::Arc;
use std::time::Duration;

use careflow_push::apns::ApnsAuth;
use careflow_push::fcm::FcmAuth;

use super::ConfigError;
use super::raw::{Raw, invalid};

/// The push services configured, validated.
#[derive(Clone, Default)]
pub struct PushSettings {
    /// APNs credentials and `PUSH_APNS_URL`.
    pub apns: Option<(Arc<ApnsAuth>, String)>,
    /// FCM credentials and `PUSH_FCM_URL`.
    pub fcm: Option<(Arc<FcmAuth>, String)>,
    /// `PUSH_WAIT`.
    pub wait: Duration,
    /// `PUSH_REFRESH_BEFORE`, seconds.
    pub refresh_before: u64,
}

impl std::fmt::Debug for PushSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushSettings")
            .field("apns", &self.apns.as_ref().map(|(a, url)| (a, url)))
            .field("fcm", &self.fcm.as_ref().map(|(a, url)| (a, url)))
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

impl PushSettings {
    /// Whether any service is configured.
    pub fn enabled(&self) -> bool {
        self.apns.is_some() || self.fcm.is_some()
    }
}

fn https_url(r: &Raw<'_>, key: &str) -> Result<String, ConfigError> {
    let url = r.get(key).trim_end_matches('/');
    if !url.starts_with("https://") || url.len() <= "https://".len() {
        return Err(invalid(
            key,
            format!("expected an https:// URL, got `{url}`"),
        ));
    }
    Ok(url.to_string())
}

pub(super) fn push(r: &Raw<'_>) -> Result<PushSettings, ConfigError> {
    let apns = match r.path("push_apns_key_file") {
        None => {
            for k in ["push_apns_key_id", "push_apns_team_id"] {
                if r.opt(k).is_some() {
                    return Err(invalid(
                        k,
                        "set PUSH_APNS_KEY_FILE too (the .p8 key it belongs to)",
                    ));
                }
            }
            None
        }
        Some(path) => {
            let pem = std::fs::read(&path).map_err(|e| {
                invalid(
                    "push_apns_key_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let key_id = r.opt("push_apns_key_id").ok_or_else(|| {
                invalid(
                    "push_apns_key_id",
                    "required with PUSH_APNS_KEY_FILE: the key's 10-character id",
                )
            })?;
            let team_id = r.opt("push_apns_team_id").ok_or_else(|| {
                invalid(
                    "push_apns_team_id",
                    "required with PUSH_APNS_KEY_FILE: the Apple developer team id",
                )
            })?;
            let auth = ApnsAuth::from_p8(&pem, &key_id, &team_id)
                .map_err(|e| invalid("push_apns_key_file", format!("{}: {e}", path.display())))?;
            Some((Arc::new(auth), https_url(r, "push_apns_url")?))
        }
    };
    let fcm = match r.path("push_fcm_service_account_file") {
        None => None,
        Some(path) => {
            let json = std::fs::read_to_string(&path).map_err(|e| {
                invalid(
                    "push_fcm_service_account_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let auth = FcmAuth::from_json(&json).map_err(|e| {
                invalid(
                    "push_fcm_service_account_file",
                    format!("{}: {e}", path.display()),
                )
            })?;
            Some((Arc::new(auth), https_url(r, "push_fcm_url")?))
        }
    };
    Ok(PushSettings {
        apns,
        fcm,
        wait: r.secs("push_wait", 2, 60)?,
        refresh_before: r.num("push_refresh_before", 30, 3600)?,
    })
}
