//! `/api/admin/*`: subscribers and bindings for operators with an API key.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Serialize;
use utoipa::ToSchema;

use crate::problem::Problem;
use crate::provisioning::{Api, Device, ListQuery, admin, device, paging, remove_bindings};

/// A subscriber as admins see it (never a password, nor its digests).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdminSubscriber {
    /// SIP username.
    pub username: String,
    /// SIP domain.
    pub domain: String,
    /// E-mail.
    pub email: Option<String>,
    /// CareFlow user id.
    pub careflow_user_id: Option<String>,
    /// Whether it may register and call.
    pub enabled: bool,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

/// A binding with its address-of-record.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdminBinding {
    /// `user@domain`.
    pub aor: String,
    /// The device.
    #[serde(flatten)]
    pub device: Device,
}

fn query_problem(r: QueryRejection) -> Problem {
    let text = r.body_text();
    let field = text.split('`').nth(1).unwrap_or("query").to_string();
    Problem::invalid(&field, text)
}

/// Subscribers, searched and paged.
#[utoipa::path(get, path = "/api/admin/subscribers", tag = "admin",
    security(("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 200, body = Vec<AdminSubscriber>),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn subscribers(
    State(api): Api,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<AdminSubscriber>>, Problem> {
    admin(&api, &headers).await?;
    let Query(q) = query.map_err(query_problem)?;
    let (q, limit, offset) = paging(&q)?;
    let list = api
        .subscribers
        .search(&q, limit, offset)
        .await
        .map_err(|e| Problem::unavailable("the subscriber store", &e))?;
    Ok(Json(
        list.into_iter()
            .map(|s| AdminSubscriber {
                username: s.username,
                domain: s.domain,
                email: s.email,
                careflow_user_id: s.careflow_user_id,
                enabled: s.enabled,
                created_at: s.created_at,
                updated_at: s.updated_at,
            })
            .collect(),
    ))
}

async fn set_enabled(
    api: &crate::provisioning::Provisioning,
    headers: &HeaderMap,
    source: &crate::audit::Source,
    username: &str,
    enabled: bool,
) -> Result<StatusCode, Problem> {
    let who = admin(api, headers).await?;
    if username.is_empty() || username.len() > 128 {
        return Err(Problem::invalid("username", "1 to 128 characters"));
    }
    let found = api
        .subscribers
        .set_enabled(username, &api.sip.domain, enabled)
        .await
        .map_err(|e| Problem::unavailable("the subscriber store", &e))?;
    if !found {
        return Err(Problem::not_found("no such subscriber").field("username"));
    }
    if !enabled {
        let removed = remove_bindings(
            &*api.location,
            &format!("{username}@{}", api.sip.domain),
            |_| true,
        )
        .await?;
        if removed > 0 {
            api.publish(
                careflow_store::events::EventKind::DeviceUnregistered,
                &format!("{username}@{}", api.sip.domain),
                serde_json::json!({"why": "disabled by an administrator", "removed": removed}),
            );
        }
    }
    api.audit(
        &format!("apikey:{who}"),
        source,
        if enabled {
            "subscriber.enabled"
        } else {
            "subscriber.disabled"
        },
        &format!("{username}@{}", api.sip.domain),
        "ok",
        String::new(),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

/// Disable a subscriber (devices signed out, registration and calls refused).
#[utoipa::path(post, path = "/api/admin/subscribers/{username}/disable", tag = "admin",
    security(("bearer" = [])),
    params(("username" = String, Path, description = "SIP username")),
    responses(
        (status = 204, description = "Disabled"),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn disable(
    State(api): Api,
    headers: HeaderMap,
    source: crate::audit::Source,
    Path(username): Path<String>,
) -> Result<StatusCode, Problem> {
    set_enabled(&api, &headers, &source, &username, false).await
}

/// Enable a subscriber again.
#[utoipa::path(post, path = "/api/admin/subscribers/{username}/enable", tag = "admin",
    security(("bearer" = [])),
    params(("username" = String, Path, description = "SIP username")),
    responses(
        (status = 204, description = "Enabled"),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn enable(
    State(api): Api,
    headers: HeaderMap,
    source: crate::audit::Source,
    Path(username): Path<String>,
) -> Result<StatusCode, Problem> {
    set_enabled(&api, &headers, &source, &username, true).await
}

/// Every current binding.
#[utoipa::path(get, path = "/api/admin/bindings", tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, body = Vec<AdminBinding>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn bindings(
    State(api): Api,
    headers: HeaderMap,
) -> Result<Json<Vec<AdminBinding>>, Problem> {
    admin(&api, &headers).await?;
    let now = crate::provisioning::unix_now();
    let all = api
        .location
        .all(now)
        .await
        .map_err(|e| Problem::unavailable("the location service", &e))?;
    Ok(Json(
        all.iter()
            .map(|b| AdminBinding {
                aor: b.aor.clone(),
                device: device(b, now, &api.push_services),
            })
            .collect(),
    ))
}

/// Remove one binding by id.
#[utoipa::path(delete, path = "/api/admin/bindings/{id}", tag = "admin",
    security(("bearer" = [])),
    params(("id" = u64, Path, description = "Binding id")),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn remove_binding(
    State(api): Api,
    headers: HeaderMap,
    source: crate::audit::Source,
    id: Result<Path<u64>, axum::extract::rejection::PathRejection>,
) -> Result<StatusCode, Problem> {
    let who = admin(&api, &headers).await?;
    let Path(id) = id.map_err(|_| Problem::invalid("id", "a binding id (a whole number)"))?;
    let now = crate::provisioning::unix_now();
    let all = api
        .location
        .all(now)
        .await
        .map_err(|e| Problem::unavailable("the location service", &e))?;
    let Some(b) = all.iter().find(|b| b.id == id) else {
        return Err(Problem::not_found("no binding with that id").field("id"));
    };
    remove_bindings(&*api.location, &b.aor, |x| x.id == id).await?;
    api.audit(
        &format!("apikey:{who}"),
        &source,
        "devices.deregistered",
        &b.aor,
        "ok",
        format!("device {id}"),
    )
    .await;
    api.publish(
        careflow_store::events::EventKind::DeviceUnregistered,
        &b.aor,
        serde_json::json!({"why": "removed by an administrator", "removed": 1}),
    );
    Ok(StatusCode::NO_CONTENT)
}

/// What the SIP side blocks and who failed to authenticate lately.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecurityReport {
    /// Addresses banned now.
    pub bans: Vec<BanView>,
    /// The last failed authentications (at most 100), newest first.
    pub auth_failures: Vec<AuthFailureView>,
}

/// A banned address.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BanView {
    /// The source address (a site ban: every flow of it; for IPv6 the /64).
    pub ip: String,
    /// The source port of a banned flow (one device behind the address); absent for a site.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `flood`, `brute_force`, `user_brute_force` or `connections`.
    pub reason: String,
    /// Seconds until the ban lifts.
    pub remaining_seconds: u64,
}

/// A failed authentication.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthFailureView {
    /// Where it came from.
    pub ip: String,
    /// The username it tried.
    pub username: String,
    /// How long ago, in seconds.
    pub seconds_ago: u64,
}

/// Bans and recent failed authentications (as in the `SECURITY` log lines).
#[utoipa::path(get, path = "/api/admin/security", tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, body = SecurityReport),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn security(
    State(api): Api,
    headers: HeaderMap,
) -> Result<Json<SecurityReport>, Problem> {
    admin(&api, &headers).await?;
    let now = std::time::Instant::now();
    let Some(guard) = api.guard.as_ref() else {
        return Ok(Json(SecurityReport {
            bans: Vec::new(),
            auth_failures: Vec::new(),
        }));
    };
    Ok(Json(SecurityReport {
        bans: guard
            .bans(now)
            .into_iter()
            .map(|b| BanView {
                ip: b.ip().to_string(),
                port: b.port(),
                reason: b.reason.as_str().to_string(),
                remaining_seconds: b.remaining.as_secs(),
            })
            .collect(),
        auth_failures: guard
            .recent_failures(now)
            .into_iter()
            .map(|f| AuthFailureView {
                ip: f.ip.to_string(),
                username: f.user,
                seconds_ago: f.age.as_secs(),
            })
            .collect(),
    }))
}
