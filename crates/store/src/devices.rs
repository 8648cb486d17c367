//! Provisioned desk phones (issue 21) in the subscriber database: `device`, one row per MAC
//! address, bound to a user, with the HA1s of its own SIP credentials (its password is derived
//! from the provisioning key and never stored), the HA1s of the credentials it was given
//! before its last rotation and until when they still work, and the HA1s of its provisioning
//! credentials (the HTTP digest its configuration fetches are authenticated with).
//!
//! Written once for every backend over [`Sql`]: the three databases only say how they run a
//! statement.

use async_trait::async_trait;

use crate::StoreError;
use crate::calls::{Kind, Val};

/// The credentials a device had before its last rotation, accepted until `valid_until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousCredentials {
    /// MD5 HA1, hex.
    pub ha1_md5: String,
    /// SHA-256 HA1, hex.
    pub ha1_sha256: String,
    /// Unix seconds.
    pub valid_until: i64,
}

/// A provisioned device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// 12 lowercase hex digits.
    pub mac: String,
    /// Model name (`yealink-t46s`).
    pub model: String,
    /// The user it belongs to.
    pub username: String,
    /// The user's domain (the digest realm).
    pub domain: String,
    /// Where it stands (`Ward 3 nurses' station`).
    pub label: Option<String>,
    /// Colleagues on its busy-lamp keys, SIP usernames in key order.
    pub blf: Vec<String>,
    /// Generation of its SIP credentials (its password is derived from it).
    pub generation: i64,
    /// MD5 HA1 of its SIP credentials (user name `<user>.<mac>`).
    pub ha1_md5: String,
    /// SHA-256 HA1 of its SIP credentials.
    pub ha1_sha256: String,
    /// The credentials before the last rotation, while they still work.
    pub previous: Option<PreviousCredentials>,
    /// MD5 HA1 of its provisioning credentials (user name: its MAC).
    pub prov_ha1_md5: String,
    /// SHA-256 HA1 of its provisioning credentials.
    pub prov_ha1_sha256: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds of the last change.
    pub updated_at: i64,
    /// Unix seconds of its last configuration fetch.
    pub last_fetch_at: Option<i64>,
    /// Address of its last configuration fetch.
    pub last_fetch_from: Option<String>,
    /// It carries its user's own credentials (user name and password) instead of its own;
    /// `generation` is then the user's password generation, the HA1s the user's.
    pub shared: bool,
}

impl Device {
    /// The HA1s its SIP credentials are accepted with at `now` (Unix seconds): the current
    /// ones, and the previous ones during the grace period.
    pub fn sip_ha1s(&self, alg: careflow_proto::digest::Algorithm, now: i64) -> Vec<&str> {
        use careflow_proto::digest::Algorithm;
        let mut out = vec![match alg {
            Algorithm::Md5 => self.ha1_md5.as_str(),
            Algorithm::Sha256 => self.ha1_sha256.as_str(),
        }];
        if let Some(p) = self.previous.as_ref().filter(|p| p.valid_until > now) {
            out.push(match alg {
                Algorithm::Md5 => p.ha1_md5.as_str(),
                Algorithm::Sha256 => p.ha1_sha256.as_str(),
            });
        }
        out
    }

    /// The HA1 of its provisioning credentials for `alg`.
    pub fn prov_ha1(&self, alg: careflow_proto::digest::Algorithm) -> &str {
        match alg {
            careflow_proto::digest::Algorithm::Md5 => &self.prov_ha1_md5,
            careflow_proto::digest::Algorithm::Sha256 => &self.prov_ha1_sha256,
        }
    }
}

/// Provisioned devices.
#[async_trait]
pub trait DeviceStore: Send + Sync {
    /// Adds a device; [`StoreError::Conflict`] when its MAC is taken.
    async fn add_device(&self, d: &Device) -> Result<(), StoreError>;
    /// The device with this MAC.
    async fn device(&self, mac: &str) -> Result<Option<Device>, StoreError>;
    /// Every device (of one user when `user` is given), ordered by user and MAC.
    async fn devices(&self, user: Option<(&str, &str)>) -> Result<Vec<Device>, StoreError>;
    /// Removes a device; false when there was none.
    async fn remove_device(&self, mac: &str) -> Result<bool, StoreError>;
    /// New SIP credentials at generation `from + 1`, the current ones kept as the previous
    /// ones until `previous_until`; false when the device is gone or was rotated meanwhile
    /// (its generation is no longer `from`).
    async fn rotate_device(
        &self,
        mac: &str,
        from: i64,
        ha1: (&str, &str),
        previous_until: i64,
        now: i64,
    ) -> Result<bool, StoreError>;
    /// New provisioning credentials; false when the device is gone.
    async fn set_provisioning_ha1(
        &self,
        mac: &str,
        ha1: (&str, &str),
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Changes model, label and busy lamps; false when the device is gone.
    async fn update_device(
        &self,
        mac: &str,
        model: &str,
        label: Option<&str>,
        blf: &[String],
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Notes a configuration fetch.
    async fn device_fetched(&self, mac: &str, at: i64, from: &str) -> Result<(), StoreError>;
}

/// How a backend runs a statement: enough for [`DeviceStore`] (and the next tables) to be
/// written once.
#[async_trait]
pub(crate) trait Sql: Send + Sync {
    /// The placeholder for the i-th value (1-based): `?1`, `$1` or `?`.
    fn mark(&self, i: usize) -> String;
    /// Runs a statement; returns the rows it changed.
    async fn exec(&self, sql: String, vals: Vec<Val>) -> Result<u64, StoreError>;
    /// Runs a query whose columns are of `kinds`.
    async fn rows(
        &self,
        sql: String,
        vals: Vec<Val>,
        kinds: &'static [Kind],
    ) -> Result<Vec<Vec<Val>>, StoreError>;
}

const COLUMNS: &str = "mac, model, username, domain, label, blf, generation, ha1_md5, ha1_sha256, \
     prev_ha1_md5, prev_ha1_sha256, prev_valid_until, prov_ha1_md5, prov_ha1_sha256, \
     created_at, updated_at, last_fetch_at, last_fetch_from, shared";

const KINDS: &[Kind] = &[
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Int,
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Int,
    Kind::Text,
    Kind::Text,
    Kind::Int,
    Kind::Int,
    Kind::Int,
    Kind::Text,
    Kind::Int,
];

fn text(s: &str) -> Val {
    Val::Text(Some(s.to_string()))
}

fn opt_text(s: Option<&str>) -> Val {
    Val::Text(s.map(str::to_string))
}

fn int(i: i64) -> Val {
    Val::Int(Some(i))
}

fn values(d: &Device) -> Vec<Val> {
    let p = d.previous.as_ref();
    vec![
        text(&d.mac),
        text(&d.model),
        text(&d.username),
        text(&d.domain),
        opt_text(d.label.as_deref()),
        text(&d.blf.join(",")),
        int(d.generation),
        text(&d.ha1_md5),
        text(&d.ha1_sha256),
        opt_text(p.map(|p| p.ha1_md5.as_str())),
        opt_text(p.map(|p| p.ha1_sha256.as_str())),
        Val::Int(p.map(|p| p.valid_until)),
        text(&d.prov_ha1_md5),
        text(&d.prov_ha1_sha256),
        int(d.created_at),
        int(d.updated_at),
        Val::Int(d.last_fetch_at),
        opt_text(d.last_fetch_from.as_deref()),
        int(i64::from(d.shared)),
    ]
}

fn device_of(v: &[Val]) -> Result<Device, StoreError> {
    let bad = || StoreError::backend("device", "a row with missing columns");
    if v.len() != KINDS.len() {
        return Err(bad());
    }
    let t = |i: usize| match &v[i] {
        Val::Text(t) => t.clone(),
        Val::Int(n) => n.map(|n| n.to_string()),
    };
    let n = |i: usize| match &v[i] {
        Val::Int(n) => *n,
        Val::Text(s) => s.as_deref().and_then(|s| s.parse().ok()),
    };
    let previous = match (t(9), t(10), n(11)) {
        (Some(ha1_md5), Some(ha1_sha256), Some(valid_until)) => Some(PreviousCredentials {
            ha1_md5,
            ha1_sha256,
            valid_until,
        }),
        _ => None,
    };
    Ok(Device {
        mac: t(0).ok_or_else(bad)?,
        model: t(1).ok_or_else(bad)?,
        username: t(2).ok_or_else(bad)?,
        domain: t(3).ok_or_else(bad)?,
        label: t(4),
        blf: t(5)
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        generation: n(6).ok_or_else(bad)?,
        ha1_md5: t(7).ok_or_else(bad)?,
        ha1_sha256: t(8).ok_or_else(bad)?,
        previous,
        prov_ha1_md5: t(12).ok_or_else(bad)?,
        prov_ha1_sha256: t(13).ok_or_else(bad)?,
        created_at: n(14).ok_or_else(bad)?,
        updated_at: n(15).ok_or_else(bad)?,
        last_fetch_at: n(16),
        last_fetch_from: t(17),
        shared: n(18).is_some_and(|s| s != 0),
    })
}

fn marks(db: &dyn Sql, from: usize, n: usize) -> Vec<String> {
    (from..from + n).map(|i| db.mark(i)).collect()
}

#[async_trait]
impl<T: Sql> DeviceStore for T {
    async fn add_device(&self, d: &Device) -> Result<(), StoreError> {
        let vals = values(d);
        let sql = format!(
            "INSERT INTO device ({COLUMNS}) VALUES ({})",
            marks(self, 1, vals.len()).join(", ")
        );
        self.exec(sql, vals).await.map(|_| ())
    }

    async fn device(&self, mac: &str) -> Result<Option<Device>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM device WHERE mac = {}", self.mark(1));
        let rows = self.rows(sql, vec![text(mac)], KINDS).await?;
        rows.first().map(|r| device_of(r)).transpose()
    }

    async fn devices(&self, user: Option<(&str, &str)>) -> Result<Vec<Device>, StoreError> {
        let (sql, vals) = match user {
            Some((u, d)) => (
                format!(
                    "SELECT {COLUMNS} FROM device WHERE username = {} AND domain = {} ORDER BY mac",
                    self.mark(1),
                    self.mark(2)
                ),
                vec![text(u), text(d)],
            ),
            None => (
                format!("SELECT {COLUMNS} FROM device ORDER BY domain, username, mac"),
                Vec::new(),
            ),
        };
        let rows = self.rows(sql, vals, KINDS).await?;
        rows.iter().map(|r| device_of(r)).collect()
    }

    async fn remove_device(&self, mac: &str) -> Result<bool, StoreError> {
        let sql = format!("DELETE FROM device WHERE mac = {}", self.mark(1));
        Ok(self.exec(sql, vec![text(mac)]).await? > 0)
    }

    async fn rotate_device(
        &self,
        mac: &str,
        from: i64,
        ha1: (&str, &str),
        previous_until: i64,
        now: i64,
    ) -> Result<bool, StoreError> {
        let m = marks(self, 1, 6);
        let sql = format!(
            "UPDATE device SET prev_ha1_md5 = ha1_md5, prev_ha1_sha256 = ha1_sha256, \
             prev_valid_until = {}, ha1_md5 = {}, ha1_sha256 = {}, generation = generation + 1, \
             updated_at = {} WHERE mac = {} AND generation = {}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        );
        let vals = vec![
            int(previous_until),
            text(ha1.0),
            text(ha1.1),
            int(now),
            text(mac),
            int(from),
        ];
        Ok(self.exec(sql, vals).await? > 0)
    }

    async fn set_provisioning_ha1(
        &self,
        mac: &str,
        ha1: (&str, &str),
        now: i64,
    ) -> Result<bool, StoreError> {
        let m = marks(self, 1, 4);
        let sql = format!(
            "UPDATE device SET prov_ha1_md5 = {}, prov_ha1_sha256 = {}, updated_at = {} \
             WHERE mac = {}",
            m[0], m[1], m[2], m[3]
        );
        let vals = vec![text(ha1.0), text(ha1.1), int(now), text(mac)];
        Ok(self.exec(sql, vals).await? > 0)
    }

    async fn update_device(
        &self,
        mac: &str,
        model: &str,
        label: Option<&str>,
        blf: &[String],
        now: i64,
    ) -> Result<bool, StoreError> {
        let m = marks(self, 1, 5);
        let sql = format!(
            "UPDATE device SET model = {}, label = {}, blf = {}, updated_at = {} WHERE mac = {}",
            m[0], m[1], m[2], m[3], m[4]
        );
        let vals = vec![
            text(model),
            opt_text(label),
            text(&blf.join(",")),
            int(now),
            text(mac),
        ];
        Ok(self.exec(sql, vals).await? > 0)
    }

    async fn device_fetched(&self, mac: &str, at: i64, from: &str) -> Result<(), StoreError> {
        let m = marks(self, 1, 3);
        let sql = format!(
            "UPDATE device SET last_fetch_at = {}, last_fetch_from = {} WHERE mac = {}",
            m[0], m[1], m[2]
        );
        self.exec(sql, vec![int(at), text(from), text(mac)])
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_reads_back_from_its_values() {
        let d = Device {
            mac: "001565aabbcc".into(),
            model: "yealink-t46s".into(),
            username: "2001".into(),
            domain: "clinic.example".into(),
            label: None,
            blf: vec!["2002".into(), "2003".into()],
            generation: 3,
            ha1_md5: "a".into(),
            ha1_sha256: "b".into(),
            previous: Some(PreviousCredentials {
                ha1_md5: "c".into(),
                ha1_sha256: "d".into(),
                valid_until: 99,
            }),
            prov_ha1_md5: "e".into(),
            prov_ha1_sha256: "f".into(),
            created_at: 1,
            updated_at: 2,
            last_fetch_at: None,
            last_fetch_from: None,
            shared: true,
        };
        assert_eq!(device_of(&values(&d)).unwrap(), d);
        use careflow_proto::digest::Algorithm;
        assert_eq!(d.sip_ha1s(Algorithm::Md5, 98), vec!["a", "c"]);
        assert_eq!(
            d.sip_ha1s(Algorithm::Sha256, 99),
            vec!["b"],
            "the grace is over"
        );
    }
}
