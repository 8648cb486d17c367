//! The raw key values, read as typed settings; every error names its key.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::ConfigError;

/// Key values from the file and the environment, defaults filled in.
pub(super) struct Raw<'a>(pub(super) &'a BTreeMap<String, String>);

impl Raw<'_> {
    /// The trimmed value ("" when unset).
    pub(super) fn get(&self, k: &str) -> &str {
        self.0.get(k).map(|s| s.trim()).unwrap_or("")
    }

    /// The value, `None` when unset or empty.
    pub(super) fn opt(&self, k: &str) -> Option<String> {
        Some(self.get(k).to_string()).filter(|v| !v.is_empty())
    }

    /// A path, `None` when unset.
    pub(super) fn path(&self, k: &str) -> Option<PathBuf> {
        self.opt(k).map(PathBuf::from)
    }

    /// A whole number in `min..=max`.
    pub(super) fn num(&self, k: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
        let v = self.get(k);
        let n: u64 = v
            .parse()
            .map_err(|_| invalid(k, format!("expected a whole number, got `{v}`")))?;
        if n < min || n > max {
            return Err(invalid(k, format!("{n} is out of range {min}..={max}")));
        }
        Ok(n)
    }

    /// [`Self::num`] as a `u32` (`max` must fit).
    pub(super) fn num32(&self, k: &str, min: u32, max: u32) -> Result<u32, ConfigError> {
        Ok(self.num(k, u64::from(min), u64::from(max))? as u32)
    }

    /// Seconds in `min..=max`.
    pub(super) fn secs(&self, k: &str, min: u64, max: u64) -> Result<Duration, ConfigError> {
        Ok(Duration::from_secs(self.num(k, min, max)?))
    }

    /// Milliseconds in `min..=max`.
    pub(super) fn millis(&self, k: &str, min: u64, max: u64) -> Result<Duration, ConfigError> {
        Ok(Duration::from_millis(self.num(k, min, max)?))
    }

    /// true/yes/1 or false/no/0.
    pub(super) fn flag(&self, k: &str) -> Result<bool, ConfigError> {
        match self.get(k) {
            "true" | "yes" | "1" => Ok(true),
            "false" | "no" | "0" => Ok(false),
            other => Err(invalid(k, format!("expected true or false, got `{other}`"))),
        }
    }

    /// The non-empty items of a comma-separated list, trimmed.
    pub(super) fn list(&self, k: &str) -> impl Iterator<Item = &str> {
        self.get(k)
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }
}

/// An invalid value of `key` (named as in the environment).
pub(super) fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_ascii_uppercase(),
        message: message.into(),
    }
}
