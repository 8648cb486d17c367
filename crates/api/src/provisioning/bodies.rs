//! The JSON bodies of `/api/sip/*` and the admin listings' query, as the OpenAPI document
//! describes them.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::SipConfig;
use crate::problem::Problem;

/// New credentials, shown once.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewCredentials {
    /// SIP username (`careflow_` and 8 letters or digits).
    pub sip_username: String,
    /// The password: returned in this response only, never stored.
    pub sip_password: String,
    /// `sip:USERNAME@DOMAIN`.
    pub sip_uri: String,
    /// How to connect.
    pub sip_config: SipConfig,
}

/// Existing credentials, without the password.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Credentials {
    /// SIP username.
    pub sip_username: String,
    /// `sip:USERNAME@DOMAIN`.
    pub sip_uri: String,
    /// Whether the account may register and call.
    pub enabled: bool,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds of the last change (e.g. a rotation).
    pub updated_at: i64,
    /// How to connect.
    pub sip_config: SipConfig,
}

/// One registered device.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// Binding id (for `POST /api/sip/deregister`).
    pub id: u64,
    /// Contact URI as registered.
    pub contact: String,
    /// udp, tcp, tls, ws or wss.
    pub transport: String,
    /// Address the registration came from (the public address behind NAT).
    pub source_address: String,
    /// The device's User-Agent.
    pub user_agent: Option<String>,
    /// Unix seconds.
    pub registered_at: u64,
    /// Seconds until the registration expires.
    pub expires_in: u64,
    /// In a cluster, the node the device is connected to (its `CLUSTER_ADDRESS`), when only
    /// that node can reach it; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The push service (`apns`, `fcm`) that wakes this device for its calls: a mobile that
    /// sleeps between them, reachable all the same. Absent for devices reached directly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push: Option<String>,
}

/// Registration status.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// Whether any device is registered.
    pub online: bool,
    /// SIP username, when the user has credentials.
    pub sip_username: Option<String>,
    /// Registered devices.
    pub devices: Vec<Device>,
}

/// Which bindings to remove.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeregisterRequest {
    /// One binding id; all of the caller's bindings when absent.
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(minimum = 0)]
    pub id: Option<u64>,
}

/// JSON Schema's `integer` includes `3.0`; serde's u64 does not. Accept whole numbers written
/// either way.
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let n: Option<serde_json::Number> = Option::deserialize(d)?;
    let Some(n) = n else { return Ok(None) };
    if let Some(v) = n.as_u64() {
        return Ok(Some(v));
    }
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && (0.0..=9.007_199_254_740_992e15).contains(&f) => {
            Ok(Some(f as u64))
        }
        _ => Err(serde::de::Error::custom(
            "`id` must be a whole number of at least 0",
        )),
    }
}

/// How many bindings were removed.
#[derive(Debug, Serialize, ToSchema)]
pub struct Removed {
    /// Count.
    pub removed: usize,
}

/// Paging and search for admin listings.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Part of a username, e-mail or CareFlow user id.
    #[param(max_length = 256)]
    pub q: Option<String>,
    /// At most this many (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// Skip this many.
    #[param(minimum = 0, maximum = 1000000)]
    pub offset: Option<usize>,
}

/// The query, validated (400 names the field).
pub(crate) fn paging(q: &ListQuery) -> Result<(String, usize, usize), Problem> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::invalid("limit", "between 1 and 1000"));
    }
    let offset = q.offset.unwrap_or(0);
    if offset > 1_000_000 {
        return Err(Problem::invalid("offset", "at most 1000000"));
    }
    let query = q.q.clone().unwrap_or_default();
    if query.len() > 256 {
        return Err(Problem::invalid("q", "at most 256 characters"));
    }
    Ok((query, limit, offset))
}
