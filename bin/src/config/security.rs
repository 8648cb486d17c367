//! The protection settings: the guard's limits (flows, sites, guesses), the allow-list and the
//! scanner User-Agents.

use careflow_core::guard::{Cidr, GuardConfig};
use careflow_core::scanner::ScannerAgents;

use super::ConfigError;
use super::raw::{Raw, invalid};

/// The guard's configuration; `None` when `SECURITY_RATE_LIMIT` is 0 (every limit off).
pub(super) fn guard(r: &Raw<'_>) -> Result<Option<GuardConfig>, ConfigError> {
    let mut allowlist = Vec::new();
    for item in r.list("security_allowlist") {
        allowlist.push(
            item.parse::<Cidr>()
                .map_err(|e| invalid("security_allowlist", e))?,
        );
    }
    let rate = r.num32("security_rate_limit", 0, 1_000_000)?;
    // Every key is checked even when the guard is off, so a typo is found before it is on.
    let cfg = GuardConfig {
        rate,
        burst: r.num32("security_burst", 1, 10_000_000)?,
        site_rate: r.num32("security_site_rate_limit", 1, 10_000_000)?,
        site_burst: r.num32("security_site_burst", 1, 100_000_000)?,
        site_auth_failures: r.num32("security_site_auth_failures", 1, 10_000_000)?,
        ban_time: r.secs("security_ban_time", 1, 86_400 * 30)?,
        auth_failures: r.num32("security_auth_failures", 1, 10_000)?,
        auth_window: r.secs("security_auth_window", 1, 86_400)?,
        allowlist,
        ..GuardConfig::default()
    };
    Ok((rate > 0).then_some(cfg))
}

/// The User-Agent fragments of scanners, as one matcher.
pub(super) fn scanner_user_agents(r: &Raw<'_>) -> Result<ScannerAgents, ConfigError> {
    ScannerAgents::new(r.list("scanner_user_agents"))
        .map_err(|e| invalid("scanner_user_agents", e.to_string()))
}
