//! Media anchoring at rtpengine.

use careflow_core::media::Policy;
use careflow_server::media::MediaConfig;

use super::ConfigError;
use super::raw::{Raw, invalid};

/// `RTPENGINE`, `MEDIA_POLICY` and rtpengine's timings.
pub(super) fn media(r: &Raw<'_>) -> Result<MediaConfig, ConfigError> {
    let mut rtpengine = Vec::new();
    for item in r.list("rtpengine") {
        rtpengine.push(item.parse().map_err(|_| {
            invalid(
                "rtpengine",
                format!("`{item}` is not HOST:PORT such as 127.0.0.1:22222"),
            )
        })?);
    }
    let policy = match r.get("media_policy") {
        "always" => Policy::Always,
        "when-needed" => Policy::WhenNeeded,
        "never" => Policy::Never,
        other => {
            return Err(invalid(
                "media_policy",
                format!("expected always, when-needed or never, got `{other}`"),
            ));
        }
    };
    Ok(MediaConfig {
        rtpengine,
        policy,
        timeout: r.millis("rtpengine_timeout_ms", 10, 10_000)?,
        check_interval: r.secs("rtpengine_check_interval", 1, 86_400)?,
    })
}
