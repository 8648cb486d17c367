//! `/api/sip/*`: a CareFlow user's SIP credentials and devices (the seed's endpoints, without
//! its flaws: no stored password, 128+-bit passwords, real HA1s, problem+json errors).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use careflow_core::Binding;
use careflow_proto::digest::{Algorithm, ha1};
use careflow_store::events::{EventKind, LiveEvent};
use careflow_store::{ApiKeyStore, LocationStore, NewSubscriber, StoreError, SubscriberStore};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::{CareflowUser, RateLimiter, TokenVerifier, api_key_digest, is_api_key};
use crate::problem::Problem;

mod bodies;
pub use bodies::*;

/// How clients reach the SIP service (filled in from the server's listeners).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SipConfig {
    /// SIP domain (and digest realm).
    pub domain: String,
    /// UDP/TCP port.
    pub port: u16,
    /// TLS port, when TLS is served.
    pub tls_port: Option<u16>,
    /// Secure WebSocket URL for CareFlow Web, when served.
    pub ws_url: Option<String>,
    /// Transports served.
    pub transports: Vec<String>,
}

/// What the API needs from the rest of the server.
pub struct Provisioning {
    /// Subscribers.
    pub subscribers: Arc<dyn SubscriberStore>,
    /// Admin API keys.
    pub keys: Arc<dyn ApiKeyStore>,
    /// Registered devices.
    pub location: Arc<dyn LocationStore>,
    /// Call detail records.
    pub calls: Arc<dyn careflow_store::calls::CallRecordStore>,
    /// The audit trail.
    pub audit_log: Arc<dyn careflow_store::audit::AuditStore>,
    /// Live events (the SIP side's and ours) for the event streams and webhooks.
    pub events: careflow_store::events::Events,
    /// Connection details given to clients.
    pub sip: SipConfig,
    /// Bearer token verification.
    pub verifier: TokenVerifier,
    /// Per-caller request limit.
    pub limiter: RateLimiter,
    /// CareFlow's "does this user exist" endpoint (`{userId}` is replaced) and its token.
    pub user_check: Option<(String, Option<String>)>,
    /// The SIP side's guard (bans, failed authentications) for the admin view.
    pub guard: Option<Arc<careflow_core::guard::Guard>>,
    /// One-time provisioning links handed out (Linphone QR codes).
    pub links: crate::provision_link::Links,
    /// The push services the SIP side wakes sleeping devices through (`apns`, `fcm`).
    pub push_services: Vec<String>,
    /// Provisioned desk phones; none when device provisioning is not configured.
    pub devices: Option<crate::devices::DeviceService>,
}

impl std::fmt::Debug for Provisioning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioning")
            .field("sip", &self.sip)
            .finish_non_exhaustive()
    }
}

pub(crate) type Api = State<Arc<Provisioning>>;

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn too_many() -> Problem {
    Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate-limited",
        "Too many requests",
    )
    .detail("slow down and retry in a second")
}

/// The CareFlow user calling (401 otherwise), after the rate limit.
pub(crate) async fn user(api: &Provisioning, headers: &HeaderMap) -> Result<CareflowUser, Problem> {
    let Some(token) = bearer(headers) else {
        return Err(Problem::unauthorized("a bearer token is required"));
    };
    if is_api_key(token) {
        return Err(Problem::unauthorized(
            "API keys are for /api/admin; user endpoints need a CareFlow token",
        ));
    }
    let u = api.verifier.verify(token).await.map_err(|e| match e {
        crate::auth::AuthError::KeysUnavailable => Problem::unavailable("token verification", &e),
        other => Problem::unauthorized(other.to_string()),
    })?;
    if !api.limiter.allow(&format!("user:{}", u.id)) {
        return Err(too_many());
    }
    Ok(u)
}

/// The admin calling with an API key (401 otherwise), after the rate limit.
pub(crate) async fn admin(api: &Provisioning, headers: &HeaderMap) -> Result<String, Problem> {
    let token = bearer(headers)
        .filter(|t| is_api_key(t))
        .ok_or_else(|| Problem::unauthorized("an admin API key is required"))?;
    let name = api
        .keys
        .key_name(&api_key_digest(token))
        .await
        .map_err(|e| Problem::unavailable("the key store", &e))?
        .ok_or_else(|| Problem::unauthorized("unknown or revoked API key"))?;
    if !api.limiter.allow(&format!("admin:{name}")) {
        return Err(too_many());
    }
    Ok(name)
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_from(alphabet: &[u8], n: usize) -> Result<String, Problem> {
    // Rejection sampling keeps every symbol equally likely.
    let limit = 256 - (256 % alphabet.len());
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        getrandom::fill(&mut buf).map_err(|e| Problem::unavailable("randomness", &e))?;
        for b in buf {
            if usize::from(b) < limit && out.len() < n {
                out.push(char::from(alphabet[usize::from(b) % alphabet.len()]));
            }
        }
    }
    Ok(out)
}

/// 24 symbols of 62: 142 bits.
fn new_password() -> Result<String, Problem> {
    random_from(
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
        24,
    )
}

fn new_username() -> Result<String, Problem> {
    Ok(format!(
        "careflow_{}",
        random_from(b"abcdefghijklmnopqrstuvwxyz0123456789", 8)?
    ))
}

fn sip_uri(api: &Provisioning, username: &str) -> String {
    format!("sip:{username}@{}", api.sip.domain)
}

impl Provisioning {
    /// Publishes a live event about `user` (`user@domain`).
    pub(crate) fn publish(&self, kind: EventKind, user: &str, detail: serde_json::Value) {
        self.events.publish(LiveEvent::now(kind, user, detail));
    }

    /// The credentials of `username` changed (`change`), `removed` devices signed out.
    fn credentials_changed(
        &self,
        username: &str,
        careflow_user: &str,
        change: &str,
        removed: usize,
    ) {
        let who = aor(self, username);
        self.publish(
            EventKind::CredentialsChanged,
            &who,
            serde_json::json!({"change": change, "careflowUserId": careflow_user}),
        );
        if removed > 0 {
            self.publish(
                EventKind::DeviceUnregistered,
                &who,
                serde_json::json!({"why": format!("credentials {change}"), "removed": removed}),
            );
        }
    }
}

fn aor(api: &Provisioning, username: &str) -> String {
    format!("{username}@{}", api.sip.domain)
}

/// Removes the bindings `drop` selects from an AoR; returns how many.
pub(crate) async fn remove_bindings(
    location: &dyn LocationStore,
    aor: &str,
    drop: impl Fn(&Binding) -> bool + Send + Sync,
) -> Result<usize, Problem> {
    careflow_store::remove_bindings(location, aor, drop)
        .await
        .map_err(|e| Problem::unavailable("the location service", &e))
}

async fn own_subscriber(
    api: &Provisioning,
    user: &CareflowUser,
) -> Result<Option<careflow_store::Subscriber>, Problem> {
    api.subscribers
        .find_by_careflow_user(&user.id)
        .await
        .map_err(|e| Problem::unavailable("the subscriber store", &e))
}

fn no_credentials() -> Problem {
    Problem::not_found("you have no SIP credentials yet; POST /api/sip/register creates them")
}

/// Create SIP credentials for the calling CareFlow user.
#[utoipa::path(post, path = "/api/sip/register", tag = "sip",
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created; the password is shown only here", body = NewCredentials),
        (status = 401, description = "No or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "CareFlow does not know the user (when a user check is configured)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The user has credentials already", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "A store is unavailable", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn register(
    State(api): Api,
    headers: HeaderMap,
    source: crate::audit::Source,
) -> Result<Response, Problem> {
    let user = user(&api, &headers).await?;
    check_careflow_user(&api, &user).await?;
    if own_subscriber(&api, &user).await?.is_some() {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "credentials-exist",
            "Credentials exist",
        )
        .detail("you have SIP credentials already; POST /api/sip/credentials/rotate sets a new password"));
    }
    let password = new_password()?;
    let domain = api.sip.domain.clone();
    for _ in 0..5 {
        let username = new_username()?;
        let s = NewSubscriber {
            ha1_md5: ha1(Algorithm::Md5, &username, &domain, &password),
            ha1_sha256: ha1(Algorithm::Sha256, &username, &domain, &password),
            username: username.clone(),
            domain: domain.clone(),
            email: user.email.clone(),
            careflow_user_id: Some(user.id.clone()),
            careflow_care4w_id: None,
        };
        match api.subscribers.add(s).await {
            Ok(()) => {
                api.audit(
                    &format!("careflow:{}", user.id),
                    &source,
                    "credentials.created",
                    &format!("{username}@{domain}"),
                    "ok",
                    "password shown once".to_string(),
                )
                .await;
                api.publish(
                    EventKind::CredentialsChanged,
                    &format!("{username}@{domain}"),
                    serde_json::json!({"change": "created", "careflowUserId": user.id}),
                );
                let body = NewCredentials {
                    sip_uri: sip_uri(&api, &username),
                    sip_username: username,
                    sip_password: password,
                    sip_config: api.sip.clone(),
                };
                return Ok((StatusCode::CREATED, no_store(), Json(body)).into_response());
            }
            // A username collision: draw again. A second request for the same user racing
            // this one hits the unique CareFlow user id instead.
            Err(StoreError::Conflict(_)) => {
                if own_subscriber(&api, &user).await?.is_some() {
                    return Err(Problem::new(
                        StatusCode::CONFLICT,
                        "credentials-exist",
                        "Credentials exist",
                    ));
                }
            }
            Err(e) => return Err(Problem::unavailable("the subscriber store", &e)),
        }
    }
    Err(Problem::unavailable(
        "the subscriber store",
        &"no free username",
    ))
}

/// The seed's "verify the user exists in CareFlow": the configured URL must answer 2xx for the
/// user; 404 means no such user (403), anything else or no answer in time is a 503.
async fn check_careflow_user(api: &Provisioning, user: &CareflowUser) -> Result<(), Problem> {
    let Some((url, token)) = &api.user_check else {
        return Ok(());
    };
    let url = url.replace("{userId}", &percent_encode(&user.id));
    match crate::http_client::get_status(&url, token.as_deref(), std::time::Duration::from_secs(3))
        .await
    {
        Ok((s, _)) if (200..300).contains(&s) => Ok(()),
        Ok((404, _)) => Err(Problem::new(
            StatusCode::FORBIDDEN,
            "not-a-careflow-user",
            "Not a CareFlow user",
        )
        .detail("CareFlow does not know this user")),
        Ok((s, _)) => Err(Problem::unavailable(
            "the CareFlow user check",
            &format!("HTTP {s}"),
        )),
        Err(e) => Err(Problem::unavailable("the CareFlow user check", &e)),
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Responses carrying a password must not be cached anywhere.
fn no_store() -> [(header::HeaderName, &'static str); 1] {
    [(header::CACHE_CONTROL, "no-store")]
}

/// The caller's SIP credentials (never the password).
#[utoipa::path(get, path = "/api/sip/credentials", tag = "sip",
    security(("bearer" = [])),
    responses(
        (status = 200, body = Credentials),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No credentials yet", body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn credentials(
    State(api): Api,
    headers: HeaderMap,
) -> Result<Json<Credentials>, Problem> {
    let user = user(&api, &headers).await?;
    let s = own_subscriber(&api, &user)
        .await?
        .ok_or_else(no_credentials)?;
    Ok(Json(Credentials {
        sip_uri: sip_uri(&api, &s.username),
        sip_username: s.username,
        enabled: s.enabled,
        created_at: s.created_at,
        updated_at: s.updated_at,
        sip_config: api.sip.clone(),
    }))
}

/// A new password for the caller; registered devices are signed out.
#[utoipa::path(post, path = "/api/sip/credentials/rotate", tag = "sip",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The new password, shown only here", body = NewCredentials),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn rotate(
    State(api): Api,
    headers: HeaderMap,
    source: crate::audit::Source,
) -> Result<Response, Problem> {
    let user = user(&api, &headers).await?;
    let s = own_subscriber(&api, &user)
        .await?
        .ok_or_else(no_credentials)?;
    let password = new_password()?;
    api.subscribers
        .set_ha1(
            &s.username,
            &s.domain,
            &ha1(Algorithm::Md5, &s.username, &s.domain, &password),
            &ha1(Algorithm::Sha256, &s.username, &s.domain, &password),
        )
        .await
        .map_err(|e| Problem::unavailable("the subscriber store", &e))?;
    let removed = remove_bindings(&*api.location, &aor(&api, &s.username), |_| true).await?;
    api.audit(
        &format!("careflow:{}", user.id),
        &source,
        "credentials.rotated",
        &format!("{}@{}", s.username, s.domain),
        "ok",
        format!("{removed} devices signed out; password shown once"),
    )
    .await;
    api.credentials_changed(&s.username, &user.id, "rotated", removed);
    let body = NewCredentials {
        sip_uri: sip_uri(&api, &s.username),
        sip_username: s.username,
        sip_password: password,
        sip_config: api.sip.clone(),
    };
    Ok((StatusCode::OK, no_store(), Json(body)).into_response())
}

/// Revoke the caller's credentials: the account is removed, its devices signed out and calls
/// to it refused.
#[utoipa::path(delete, path = "/api/sip/credentials", tag = "sip",
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn revoke(
    State(api): Api,
    headers: HeaderMap,
    source: crate::audit::Source,
) -> Result<StatusCode, Problem> {
    let user = user(&api, &headers).await?;
    let s = own_subscriber(&api, &user)
        .await?
        .ok_or_else(no_credentials)?;
    api.subscribers
        .remove(&s.username, &s.domain)
        .await
        .map_err(|e| Problem::unavailable("the subscriber store", &e))?;
    let removed = remove_bindings(&*api.location, &aor(&api, &s.username), |_| true).await?;
    api.audit(
        &format!("careflow:{}", user.id),
        &source,
        "credentials.revoked",
        &format!("{}@{}", s.username, s.domain),
        "ok",
        format!("{removed} devices signed out"),
    )
    .await;
    api.credentials_changed(&s.username, &user.id, "revoked", removed);
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) fn device(b: &Binding, now: u64, push_services: &[String]) -> Device {
    let push = careflow_proto::Uri::parse(&b.contact).and_then(|u| {
        match careflow_core::push::PushParams::of_uri(&u) {
            careflow_core::push::PushRequest::Push(p) if push_services.contains(&p.provider) => {
                Some(p.provider)
            }
            _ => None,
        }
    });
    Device {
        push,
        id: b.id,
        contact: careflow_core::push::redacted(&b.contact).into_owned(),
        transport: b.transport.to_string(),
        source_address: b.source.to_string(),
        user_agent: b.user_agent.clone(),
        registered_at: b.registered_at,
        expires_in: b.expires_in(now),
        node: b.owner_node(),
    }
}

/// The caller's registered devices.
#[utoipa::path(get, path = "/api/sip/status", tag = "sip",
    security(("bearer" = [])),
    responses(
        (status = 200, body = Status),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn status(State(api): Api, headers: HeaderMap) -> Result<Json<Status>, Problem> {
    let user = user(&api, &headers).await?;
    let username = own_subscriber(&api, &user).await?.map(|s| s.username);
    Ok(Json(status_of(&api, username).await?))
}

/// The status of the SIP account `username` (none: no credentials yet).
pub(crate) async fn status_of(
    api: &Provisioning,
    username: Option<String>,
) -> Result<Status, Problem> {
    let Some(username) = username else {
        return Ok(Status {
            online: false,
            sip_username: None,
            devices: Vec::new(),
        });
    };
    let now = unix_now();
    let bindings = api
        .location
        .lookup(&aor(api, &username), now)
        .await
        .map_err(|e| Problem::unavailable("the location service", &e))?;
    let devices: Vec<Device> = bindings
        .iter()
        .map(|b| device(b, now, &api.push_services))
        .collect();
    Ok(Status {
        online: !devices.is_empty(),
        sip_username: Some(username),
        devices,
    })
}

/// Sign out the caller's devices: all of them, or the one with `id`.
#[utoipa::path(post, path = "/api/sip/deregister", tag = "sip",
    security(("bearer" = [])),
    request_body(content = Option<DeregisterRequest>, description = "Optional: {\"id\": BINDING_ID}"),
    responses(
        (status = 200, body = Removed),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No credentials, or no such device", body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn deregister(
    State(api): Api,
    headers: HeaderMap,
    source: crate::audit::Source,
    body: axum::body::Bytes,
) -> Result<Json<Removed>, Problem> {
    let user = user(&api, &headers).await?;
    let req: DeregisterRequest = if body.iter().all(u8::is_ascii_whitespace) {
        DeregisterRequest::default()
    } else {
        serde_json::from_slice::<Option<DeregisterRequest>>(&body)
            .map_err(|e| json_problem(&e))?
            .unwrap_or_default()
    };
    let s = own_subscriber(&api, &user)
        .await?
        .ok_or_else(no_credentials)?;
    let removed = remove_bindings(&*api.location, &aor(&api, &s.username), |b| {
        req.id.is_none_or(|id| b.id == id)
    })
    .await?;
    if req.id.is_some() && removed == 0 {
        return Err(Problem::not_found("no device with that id").field("id"));
    }
    api.audit(
        &format!("careflow:{}", user.id),
        &source,
        "devices.deregistered",
        &format!("{}@{}", s.username, s.domain),
        "ok",
        match req.id {
            Some(id) => format!("device {id}"),
            None => format!("{removed} devices"),
        },
    )
    .await;
    if removed > 0 {
        api.publish(
            EventKind::DeviceUnregistered,
            &aor(&api, &s.username),
            serde_json::json!({"why": "deregistered by the user", "removed": removed}),
        );
    }
    Ok(Json(Removed { removed }))
}

/// A JSON body error as a 400 naming the field when serde says which.
pub(crate) fn json_problem(e: &serde_json::Error) -> Problem {
    let msg = e.to_string();
    // serde's messages name the field as "unknown field `x`" or "... `x` ...".
    let field = msg
        .split('`')
        .nth(1)
        .filter(|_| msg.contains("field"))
        .map(str::to_string);
    let mut p = Problem::invalid(field.as_deref().unwrap_or("body"), "invalid JSON body");
    if let Some(f) = field {
        p = p.detail(format!("invalid JSON body: bad field `{f}`"));
    }
    p
}
