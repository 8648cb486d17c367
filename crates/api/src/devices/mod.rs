//! Provisioned desk phones (issue 21): devices bound to users, their credentials, and the
//! provisioning server the phones fetch their configuration from.
//!
//! - [`DeviceService`]: adding, rotating and removing devices, shared by the admin API, the
//!   CLI and the provisioning server.
//! - [`files`]: the configuration files in each vendor's syntax.
//! - [`fetch`]: the provisioning listener (`PROVISION_LISTEN`).
//! - [`admin`]: the admin API, `/api/admin/devices`.
//! - [`pnp`]: answers to phones' SIP PnP multicast (`PROVISION_PNP`).

pub mod admin;
pub mod fetch;
pub mod files;
pub mod pnp;

use std::sync::Arc;
use std::time::Duration;

use careflow_core::provisioning::{
    FetchLimits, Mac, ProvisioningKey, auth_name, model, sip_password, user_password,
};
use careflow_proto::digest::{Algorithm, ha1};
use careflow_store::devices::{Device, DeviceStore};
use careflow_store::{StoreError, SubscriberStore};

/// The realm of the provisioning server's HTTP digest.
pub const PROVISIONING_REALM: &str = "careflow-provisioning";

/// What device provisioning is configured with.
#[derive(Debug, Clone)]
pub struct DeviceSettings {
    /// The key devices' SIP passwords are derived from.
    pub key: ProvisioningKey,
    /// How long a device's previous credentials keep working after a rotation.
    pub grace: Duration,
    /// The phones' time zone, minutes east of UTC.
    pub utc_offset_minutes: i32,
    /// The phones' NTP server.
    pub ntp_server: String,
    /// How often phones fetch their configuration again (so a rotation reaches them).
    pub resync: Duration,
    /// The provisioning server's URL as phones reach it (`https://sip.example:8443`), shown
    /// to admins with each device's credentials.
    pub public_url: Option<String>,
    /// Misses allowed per source before it is throttled.
    pub limits: FetchLimits,
    /// New devices share their user's credentials unless the request says otherwise
    /// (`DEVICE_CREDENTIALS=shared`).
    pub shared_by_default: bool,
}

/// Why a device operation failed, by who failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The request named something that does not fit (the field and why).
    #[error("{0}: {1}")]
    Invalid(&'static str, String),
    /// No such device or user.
    #[error("{0}")]
    NotFound(String),
    /// The MAC is another device's already.
    #[error("device {0} exists already")]
    Exists(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A device to add.
#[derive(Debug, Clone)]
pub struct NewDevice {
    /// Its MAC address, however written.
    pub mac: String,
    /// Its model name (`yealink-t46s`).
    pub model: String,
    /// The user it belongs to.
    pub username: String,
    /// Where it stands.
    pub label: Option<String>,
    /// Colleagues on its busy-lamp keys.
    pub blf: Vec<String>,
    /// Share the user's credentials (none: the configured default).
    pub shared: Option<bool>,
}

/// A device with the provisioning password it fetches its configuration with: shown once.
#[derive(Debug, Clone)]
pub struct WithSecret {
    /// The device.
    pub device: Device,
    /// Its provisioning password (user name: its MAC), never stored.
    pub provisioning_password: String,
    /// The user's new SIP password, when sharing set it (shown once: the user's other
    /// clients need it).
    pub user_password: Option<String>,
}

/// A rotated device, and the user's new SIP password when it shares the user's credentials.
#[derive(Debug, Clone)]
pub struct Rotated {
    /// The device.
    pub device: Device,
    /// The user's new SIP password (shared credentials), shown once.
    pub user_password: Option<String>,
}

/// Device operations over the subscriber database.
#[derive(Clone)]
pub struct DeviceService {
    /// Devices.
    pub store: Arc<dyn DeviceStore>,
    /// Users (a device's user must exist).
    pub subscribers: Arc<dyn SubscriberStore>,
    /// Settings.
    pub settings: Arc<DeviceSettings>,
    /// The SIP domain devices' users are in.
    pub domain: String,
}

impl std::fmt::Debug for DeviceService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceService")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// Unix seconds, as the device rows keep them.
fn unix_now() -> i64 {
    i64::try_from(crate::provisioning::unix_now()).unwrap_or(i64::MAX)
}

fn random_password() -> Result<String, DeviceError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)
        .map_err(|e| DeviceError::Store(StoreError::unavailable("randomness", e.to_string())))?;
    Ok(careflow_proto::digest::hex(&b))
}

fn ha1_pair(user: &str, realm: &str, password: &str) -> (String, String) {
    (
        ha1(Algorithm::Md5, user, realm, password),
        ha1(Algorithm::Sha256, user, realm, password),
    )
}

/// The MAC of `s`, or the error naming the field.
pub fn parse_mac(s: &str) -> Result<Mac, DeviceError> {
    Mac::parse(s).ok_or_else(|| {
        DeviceError::Invalid(
            "mac",
            format!(
                "`{}` is not a MAC address (12 hex digits, with or without `:`)",
                s.chars().take(40).collect::<String>()
            ),
        )
    })
}

fn check_model(name: &str) -> Result<&'static str, DeviceError> {
    model(name).map(|m| m.name).ok_or_else(|| {
        let known: Vec<&str> = careflow_core::provisioning::MODELS
            .iter()
            .map(|m| m.name)
            .collect();
        DeviceError::Invalid(
            "model",
            format!("unknown model; one of {}", known.join(", ")),
        )
    })
}

fn check_label(label: Option<String>) -> Result<Option<String>, DeviceError> {
    let label = label
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty());
    if let Some(l) = &label
        && (l.chars().count() > 64 || l.chars().any(char::is_control))
    {
        return Err(DeviceError::Invalid(
            "label",
            "at most 64 characters, no control characters".into(),
        ));
    }
    Ok(label)
}

impl DeviceService {
    /// The SIP password `device` carries now (derived; never stored).
    pub fn sip_password(&self, device: &Device) -> Option<String> {
        let mac = Mac::parse(&device.mac)?;
        let generation = u32::try_from(device.generation).ok()?;
        Some(if device.shared {
            user_password(
                &self.settings.key,
                &device.username,
                &device.domain,
                generation,
            )
        } else {
            sip_password(&self.settings.key, &mac, generation)
        })
    }

    /// The digest user name `device` authenticates with: its own, or its user's.
    pub fn sip_auth_name(device: &Device) -> String {
        match Mac::parse(&device.mac) {
            Some(mac) if !device.shared => auth_name(&device.username, &mac),
            _ => device.username.clone(),
        }
    }

    /// The user's shared credentials at `generation`: password and HA1s.
    fn user_credentials(&self, user: &str, generation: i64) -> (String, (String, String)) {
        let g = u32::try_from(generation).unwrap_or(u32::MAX);
        let pw = user_password(&self.settings.key, user, &self.domain, g);
        let ha1s = ha1_pair(user, &self.domain, &pw);
        (pw, ha1s)
    }

    /// The generation and HA1s a new shared device of `user` gets, and the user's new
    /// password when the user's credentials had to be set (first shared device, or the
    /// user's password changed since).
    async fn share(
        &self,
        user: &careflow_store::Subscriber,
    ) -> Result<(i64, (String, String), Option<String>), DeviceError> {
        let now = unix_now();
        let existing: Vec<Device> = self
            .store
            .devices(Some((&user.username, &self.domain)))
            .await?
            .into_iter()
            .filter(|d| d.shared)
            .collect();
        let current = existing.iter().map(|d| d.generation).max();
        if let Some(g) = current {
            let (_, ha1s) = self.user_credentials(&user.username, g);
            if ha1s.0 == user.ha1_md5 {
                return Ok((g, ha1s, None));
            }
        }
        // A new generation: the next one when devices share already (they follow), else a
        // fresh start (the time), so no earlier generation's password comes back.
        let g = current.map_or(now, |g| g + 1);
        let (pw, ha1s) = self.user_credentials(&user.username, g);
        self.subscribers
            .set_ha1(&user.username, &self.domain, &ha1s.0, &ha1s.1)
            .await?;
        for d in &existing {
            // The old password stopped when the user's changed: no grace to keep.
            self.store
                .rotate_device(&d.mac, d.generation, (&ha1s.0, &ha1s.1), now, now)
                .await?;
        }
        Ok((g, ha1s, Some(pw)))
    }

    /// Whether the derived password matches the stored HA1: false when the provisioning key
    /// is another than the one the credentials were made with (a node with its own key file).
    pub fn key_matches(&self, device: &Device) -> bool {
        self.sip_password(device).is_some_and(|pw| {
            ha1(
                Algorithm::Md5,
                &Self::sip_auth_name(device),
                &device.domain,
                &pw,
            ) == device.ha1_md5
        })
    }

    async fn checked_blf(&self, blf: Vec<String>) -> Result<Vec<String>, DeviceError> {
        let mut out = Vec::new();
        for b in blf
            .into_iter()
            .map(|b| b.trim().to_string())
            .filter(|b| !b.is_empty())
        {
            if b.contains(',') || b.chars().count() > 64 {
                return Err(DeviceError::Invalid(
                    "blf",
                    format!("`{b}` is not a SIP username"),
                ));
            }
            if self.subscribers.find(&b, &self.domain).await?.is_none() {
                return Err(DeviceError::NotFound(format!(
                    "no user `{b}` for a busy lamp"
                )));
            }
            if !out.contains(&b) {
                out.push(b);
            }
        }
        if out.len() > 100 {
            return Err(DeviceError::Invalid("blf", "at most 100 keys".into()));
        }
        Ok(out)
    }

    /// Adds a device for an existing user, with its own SIP credentials (generation 1) and a
    /// new provisioning password.
    pub async fn add(&self, new: NewDevice) -> Result<WithSecret, DeviceError> {
        let mac = parse_mac(&new.mac)?;
        let model = check_model(&new.model)?;
        let label = check_label(new.label)?;
        let Some(user) = self.subscribers.find(&new.username, &self.domain).await? else {
            return Err(DeviceError::NotFound(format!("no user `{}`", new.username)));
        };
        let blf = self.checked_blf(new.blf).await?;
        let shared = new.shared.unwrap_or(self.settings.shared_by_default);
        let (generation, (ha1_md5, ha1_sha256), user_password) = if shared {
            self.share(&user).await?
        } else {
            let sip = sip_password(&self.settings.key, &mac, 1);
            let ha1s = ha1_pair(&auth_name(&new.username, &mac), &self.domain, &sip);
            (1, ha1s, None)
        };
        let prov = random_password()?;
        let (prov_ha1_md5, prov_ha1_sha256) = ha1_pair(mac.as_str(), PROVISIONING_REALM, &prov);
        let now = unix_now();
        let device = Device {
            mac: mac.to_string(),
            model: model.to_string(),
            username: new.username,
            domain: self.domain.clone(),
            label,
            blf,
            generation,
            ha1_md5,
            ha1_sha256,
            previous: None,
            prov_ha1_md5,
            prov_ha1_sha256,
            created_at: now,
            updated_at: now,
            last_fetch_at: None,
            last_fetch_from: None,
            shared,
        };
        match self.store.add_device(&device).await {
            Ok(()) => Ok(WithSecret {
                device,
                provisioning_password: prov,
                user_password,
            }),
            Err(StoreError::Conflict(_)) => Err(DeviceError::Exists(mac.colons())),
            Err(e) => Err(e.into()),
        }
    }

    /// The device with this MAC.
    pub async fn get(&self, mac: &str) -> Result<Device, DeviceError> {
        let mac = parse_mac(mac)?;
        self.store
            .device(mac.as_str())
            .await?
            .ok_or_else(|| DeviceError::NotFound(format!("no device {}", mac.colons())))
    }

    /// New SIP credentials: the next fetch carries them; the previous ones keep working for
    /// the grace period, then stop.
    pub async fn rotate(&self, mac: &str) -> Result<Rotated, DeviceError> {
        let d = self.get(mac).await?;
        if d.shared {
            return self.rotate_shared(&d).await;
        }
        // Two rotations at once: the loser reads the winner's generation and rotates again,
        // so each call moves the device on.
        for _ in 0..5 {
            let d = self.get(mac).await?;
            let m = parse_mac(&d.mac)?;
            let next = u32::try_from(d.generation + 1)
                .map_err(|_| DeviceError::Invalid("mac", "too many rotations".into()))?;
            let pw = sip_password(&self.settings.key, &m, next);
            let (md5, sha) = ha1_pair(&auth_name(&d.username, &m), &d.domain, &pw);
            let now = unix_now();
            let until = now + i64::try_from(self.settings.grace.as_secs()).unwrap_or(i64::MAX / 2);
            if self
                .store
                .rotate_device(&d.mac, d.generation, (&md5, &sha), until, now)
                .await?
            {
                return Ok(Rotated {
                    device: self.get(&d.mac).await?,
                    user_password: None,
                });
            }
        }
        Err(DeviceError::Store(StoreError::unavailable(
            "device",
            "rotated by others meanwhile, five times",
        )))
    }

    /// A shared device's rotation is its user's: a new user password for every device that
    /// shares it; the previous one keeps working for the grace period (for the user's other
    /// clients too), then stops.
    async fn rotate_shared(&self, d: &Device) -> Result<Rotated, DeviceError> {
        let now = unix_now();
        let until = now + i64::try_from(self.settings.grace.as_secs()).unwrap_or(i64::MAX / 2);
        let g = d.generation + 1;
        let (pw, (md5, sha)) = self.user_credentials(&d.username, g);
        let sharing: Vec<Device> = self
            .store
            .devices(Some((&d.username, &d.domain)))
            .await?
            .into_iter()
            .filter(|x| x.shared)
            .collect();
        // The devices first (they keep the user's current HA1 as their previous one, which
        // authentication accepts during the grace), then the user.
        for x in &sharing {
            self.store
                .rotate_device(&x.mac, x.generation, (&md5, &sha), until, now)
                .await?;
        }
        if !self
            .subscribers
            .set_ha1(&d.username, &d.domain, &md5, &sha)
            .await?
        {
            return Err(DeviceError::NotFound(format!("no user `{}`", d.username)));
        }
        Ok(Rotated {
            device: self.get(&d.mac).await?,
            user_password: Some(pw),
        })
    }

    /// A new provisioning password (the old one stops at once): shown once.
    pub async fn new_provisioning_password(&self, mac: &str) -> Result<WithSecret, DeviceError> {
        let d = self.get(mac).await?;
        let prov = random_password()?;
        let (md5, sha) = ha1_pair(&d.mac, PROVISIONING_REALM, &prov);
        if !self
            .store
            .set_provisioning_ha1(&d.mac, (&md5, &sha), unix_now())
            .await?
        {
            return Err(DeviceError::NotFound(format!("no device {}", d.mac)));
        }
        Ok(WithSecret {
            device: self.get(&d.mac).await?,
            provisioning_password: prov,
            user_password: None,
        })
    }

    /// Changes a device's model, label and busy lamps.
    pub async fn update(
        &self,
        mac: &str,
        model_name: Option<String>,
        label: Option<Option<String>>,
        blf: Option<Vec<String>>,
    ) -> Result<Device, DeviceError> {
        let d = self.get(mac).await?;
        let model = match model_name {
            Some(m) => check_model(&m)?.to_string(),
            None => d.model.clone(),
        };
        let label = match label {
            Some(l) => check_label(l)?,
            None => d.label.clone(),
        };
        let blf = match blf {
            Some(b) => self.checked_blf(b).await?,
            None => d.blf.clone(),
        };
        self.store
            .update_device(&d.mac, &model, label.as_deref(), &blf, unix_now())
            .await?;
        self.get(&d.mac).await
    }

    /// Removes a device: its credentials stop at once.
    pub async fn remove(&self, mac: &str) -> Result<(), DeviceError> {
        let m = parse_mac(mac)?;
        if self.store.remove_device(m.as_str()).await? {
            Ok(())
        } else {
            Err(DeviceError::NotFound(format!("no device {}", m.colons())))
        }
    }

    /// The provisioning URL with the device's credentials in it, as a phone is given it
    /// (when the public URL is configured).
    pub fn provisioning_url(&self, mac: &str, password: &str) -> Option<String> {
        let base = self.settings.public_url.as_deref()?;
        let (scheme, rest) = base.split_once("://")?;
        Some(format!(
            "{scheme}://{mac}:{password}@{}/",
            rest.trim_end_matches('/')
        ))
    }
}
