//! `/api/admin/devices`: desk phones bound to users, for operators with an API key.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{DeviceError, DeviceService, NewDevice, WithSecret};
use crate::audit::Source;
use crate::problem::Problem;
use crate::provisioning::{Api, Provisioning, admin, json_problem};

/// A provisioned device as admins see it (never a password, nor its digests).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceView {
    /// MAC address, 12 lowercase hex digits.
    pub mac: String,
    /// Model (`yealink-t46s`, `cisco-spa303`, `grandstream-gxp2170`, ...).
    pub model: String,
    /// The user's SIP username.
    pub username: String,
    /// The digest user name the device registers with (`<username>.<mac>`, or the username
    /// when it shares the user's credentials).
    pub auth_name: String,
    /// It carries its user's own credentials instead of its own.
    pub shared: bool,
    /// Where it stands.
    pub label: Option<String>,
    /// Colleagues on its busy-lamp keys.
    pub blf: Vec<String>,
    /// Generation of its SIP credentials (one more at each rotation).
    pub generation: i64,
    /// Unix seconds until which the credentials before the last rotation still work.
    pub previous_valid_until: Option<i64>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
    /// Unix seconds of its last configuration fetch.
    pub last_fetch_at: Option<i64>,
    /// Address of its last configuration fetch.
    pub last_fetch_from: Option<String>,
}

impl From<careflow_store::devices::Device> for DeviceView {
    fn from(d: careflow_store::devices::Device) -> Self {
        Self {
            auth_name: DeviceService::sip_auth_name(&d),
            shared: d.shared,
            mac: d.mac,
            model: d.model,
            username: d.username,
            label: d.label,
            blf: d.blf,
            generation: d.generation,
            previous_valid_until: d.previous.map(|p| p.valid_until),
            created_at: d.created_at,
            updated_at: d.updated_at,
            last_fetch_at: d.last_fetch_at,
            last_fetch_from: d.last_fetch_from,
        }
    }
}

/// A device with its provisioning credentials: the password is shown this once.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCredentials {
    /// The device.
    pub device: DeviceView,
    /// The provisioning user name: the MAC.
    pub provisioning_username: String,
    /// The provisioning password: returned in this response only, never stored.
    pub provisioning_password: String,
    /// The provisioning URL with both in it, for the phone's auto-provisioning server
    /// setting (when `PROVISION_PUBLIC_URL` is set).
    pub provisioning_url: Option<String>,
    /// The user's new SIP password, when a device sharing it had to set it: returned in this
    /// response only; the user's other clients need it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_password: Option<String>,
}

/// A rotated device.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotatedDevice {
    /// The device.
    pub device: DeviceView,
    /// The user's new SIP password when the device shares the user's credentials: returned
    /// in this response only (the previous one works for the grace period).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_password: Option<String>,
}

/// A colleague's SIP username on a busy-lamp key.
#[derive(Debug, ToSchema)]
#[schema(pattern = r"^[^,\x00-\x1F\x7F-\x9F]{1,64}$")]
pub struct BlfUser(pub String);

/// A device to add.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddDevice {
    /// MAC address (`00:15:65:aa:bb:cc`, `001565AABBCC`, ...).
    #[schema(pattern = r"^([0-9A-Fa-f]{2}[:.-]?){5}[0-9A-Fa-f]{2}$")]
    pub mac: String,
    /// Model.
    #[schema(
        pattern = r"^(yealink-t46s|yealink-t54w|yealink-t33g|cisco-spa303|cisco-spa504g|grandstream-gxp2170|grandstream-grp2614)$"
    )]
    pub model: String,
    /// The user's SIP username.
    #[schema(min_length = 1, max_length = 128)]
    pub username: String,
    /// Where it stands.
    #[schema(max_length = 64, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    pub label: Option<String>,
    /// Colleagues' SIP usernames for its busy-lamp keys.
    #[schema(max_items = 100, value_type = Vec<BlfUser>)]
    #[serde(default)]
    pub blf: Vec<String>,
    /// Share the user's own SIP credentials instead of getting its own (default:
    /// `DEVICE_CREDENTIALS`). The user's password is then set to one derived for sharing
    /// (returned once as `userPassword`).
    pub shared: Option<bool>,
}

/// Changes to a device (absent fields are kept).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateDevice {
    /// Model.
    #[schema(
        pattern = r"^(yealink-t46s|yealink-t54w|yealink-t33g|cisco-spa303|cisco-spa504g|grandstream-gxp2170|grandstream-grp2614)$"
    )]
    pub model: Option<String>,
    /// Where it stands (empty: none).
    #[schema(max_length = 64, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$")]
    pub label: Option<String>,
    /// Colleagues' SIP usernames for its busy-lamp keys.
    #[schema(max_items = 100, value_type = Option<Vec<BlfUser>>)]
    pub blf: Option<Vec<String>>,
}

fn service(api: &Provisioning) -> Result<&DeviceService, Problem> {
    api.devices.as_ref().ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_FOUND,
            "provisioning-off",
            "Device provisioning is off",
        )
        .detail("device provisioning is not configured on this server")
    })
}

pub(crate) fn problem(e: DeviceError) -> Problem {
    match e {
        DeviceError::Invalid(field, why) => Problem::invalid(field, why),
        DeviceError::NotFound(what) => Problem::not_found(what),
        DeviceError::Exists(mac) => {
            Problem::new(StatusCode::CONFLICT, "device-exists", "Device exists")
                .field("mac")
                .detail(format!("device {mac} is bound already; remove it first"))
        }
        DeviceError::Store(e) => Problem::unavailable("the device store", &e),
    }
}

/// The audit entry of an admin's change to device `d` (its user as the target).
async fn audited(
    api: &Provisioning,
    who: &str,
    source: &Source,
    action: &str,
    d: &careflow_store::devices::Device,
    detail: String,
) {
    let target = format!("{}@{}", d.username, d.domain);
    api.audit(
        &format!("apikey:{who}"),
        source,
        action,
        &target,
        "ok",
        detail,
    )
    .await;
}

fn credentials(s: &DeviceService, w: WithSecret) -> DeviceCredentials {
    DeviceCredentials {
        provisioning_url: s.provisioning_url(&w.device.mac, &w.provisioning_password),
        provisioning_username: w.device.mac.clone(),
        provisioning_password: w.provisioning_password,
        user_password: w.user_password,
        device: w.device.into(),
    }
}

/// Every provisioned device.
#[utoipa::path(get, path = "/api/admin/devices", tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, body = Vec<DeviceView>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn list(
    State(api): Api,
    headers: HeaderMap,
) -> Result<Json<Vec<DeviceView>>, Problem> {
    admin(&api, &headers).await?;
    let s = service(&api)?;
    let all = s
        .store
        .devices(None)
        .await
        .map_err(|e| Problem::unavailable("the device store", &e))?;
    Ok(Json(all.into_iter().map(DeviceView::from).collect()))
}

/// Bind a device to a user: it gets its own SIP credentials, and provisioning credentials
/// shown this once.
#[utoipa::path(post, path = "/api/admin/devices", tag = "admin",
    security(("bearer" = [])),
    request_body = AddDevice,
    responses(
        (status = 201, body = DeviceCredentials),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn add(
    State(api): Api,
    headers: HeaderMap,
    source: Source,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<DeviceCredentials>), Problem> {
    let who = admin(&api, &headers).await?;
    let s = service(&api)?;
    let req: AddDevice = serde_json::from_slice(&body).map_err(|e| json_problem(&e))?;
    let added = s
        .add(NewDevice {
            mac: req.mac,
            model: req.model,
            username: req.username,
            label: req.label,
            blf: req.blf,
            shared: req.shared,
        })
        .await
        .map_err(problem)?;
    audited(
        &api,
        &who,
        &source,
        "device.added",
        &added.device,
        format!(
            "mac={} model={} shared={}",
            added.device.mac, added.device.model, added.device.shared
        ),
    )
    .await;
    Ok((StatusCode::CREATED, Json(credentials(s, added))))
}

/// One device.
#[utoipa::path(get, path = "/api/admin/devices/{mac}", tag = "admin",
    security(("bearer" = [])),
    params(("mac" = String, Path, description = "MAC address", pattern = r"^([0-9A-Fa-f]{2}[:.-]?){5}[0-9A-Fa-f]{2}$")),
    responses(
        (status = 200, body = DeviceView),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn get(
    State(api): Api,
    headers: HeaderMap,
    Path(mac): Path<String>,
) -> Result<Json<DeviceView>, Problem> {
    admin(&api, &headers).await?;
    let s = service(&api)?;
    Ok(Json(s.get(&mac).await.map_err(problem)?.into()))
}

/// Change a device's model, label or busy lamps.
#[utoipa::path(patch, path = "/api/admin/devices/{mac}", tag = "admin",
    security(("bearer" = [])),
    params(("mac" = String, Path, description = "MAC address", pattern = r"^([0-9A-Fa-f]{2}[:.-]?){5}[0-9A-Fa-f]{2}$")),
    request_body = UpdateDevice,
    responses(
        (status = 200, body = DeviceView),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn update(
    State(api): Api,
    headers: HeaderMap,
    source: Source,
    Path(mac): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<DeviceView>, Problem> {
    let who = admin(&api, &headers).await?;
    let s = service(&api)?;
    let req: UpdateDevice = serde_json::from_slice(&body).map_err(|e| json_problem(&e))?;
    let d = s
        .update(&mac, req.model, req.label.map(Some), req.blf)
        .await
        .map_err(problem)?;
    audited(
        &api,
        &who,
        &source,
        "device.updated",
        &d,
        format!("mac={} model={} blf={}", d.mac, d.model, d.blf.join(",")),
    )
    .await;
    Ok(Json(d.into()))
}

/// Remove a device: its credentials stop at once.
#[utoipa::path(delete, path = "/api/admin/devices/{mac}", tag = "admin",
    security(("bearer" = [])),
    params(("mac" = String, Path, description = "MAC address", pattern = r"^([0-9A-Fa-f]{2}[:.-]?){5}[0-9A-Fa-f]{2}$")),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn remove(
    State(api): Api,
    headers: HeaderMap,
    source: Source,
    Path(mac): Path<String>,
) -> Result<StatusCode, Problem> {
    let who = admin(&api, &headers).await?;
    let s = service(&api)?;
    let d = s.get(&mac).await.map_err(problem)?;
    s.remove(&d.mac).await.map_err(problem)?;
    audited(
        &api,
        &who,
        &source,
        "device.removed",
        &d,
        format!("mac={}", d.mac),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

/// New SIP credentials for a device: its next configuration fetch carries them, and the
/// previous ones keep working for the grace period (`DEVICE_ROTATION_GRACE`), then stop.
#[utoipa::path(post, path = "/api/admin/devices/{mac}/rotate", tag = "admin",
    security(("bearer" = [])),
    params(("mac" = String, Path, description = "MAC address", pattern = r"^([0-9A-Fa-f]{2}[:.-]?){5}[0-9A-Fa-f]{2}$")),
    responses(
        (status = 200, body = RotatedDevice),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn rotate(
    State(api): Api,
    headers: HeaderMap,
    source: Source,
    Path(mac): Path<String>,
) -> Result<Json<RotatedDevice>, Problem> {
    let who = admin(&api, &headers).await?;
    let s = service(&api)?;
    let r = s.rotate(&mac).await.map_err(problem)?;
    let d = r.device;
    audited(
        &api,
        &who,
        &source,
        "device.rotated",
        &d,
        format!(
            "mac={} generation={} shared={}",
            d.mac, d.generation, d.shared
        ),
    )
    .await;
    Ok(Json(RotatedDevice {
        device: d.into(),
        user_password: r.user_password,
    }))
}

/// A new provisioning password for a device (the old one stops at once): shown this once.
#[utoipa::path(post, path = "/api/admin/devices/{mac}/provisioning-password", tag = "admin",
    security(("bearer" = [])),
    params(("mac" = String, Path, description = "MAC address", pattern = r"^([0-9A-Fa-f]{2}[:.-]?){5}[0-9A-Fa-f]{2}$")),
    responses(
        (status = 200, body = DeviceCredentials),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn provisioning_password(
    State(api): Api,
    headers: HeaderMap,
    source: Source,
    Path(mac): Path<String>,
) -> Result<Json<DeviceCredentials>, Problem> {
    let who = admin(&api, &headers).await?;
    let s = service(&api)?;
    let w = s.new_provisioning_password(&mac).await.map_err(problem)?;
    audited(
        &api,
        &who,
        &source,
        "device.provisioning_password_reset",
        &w.device,
        format!("mac={}", w.device.mac),
    )
    .await;
    Ok(Json(credentials(s, w)))
}
