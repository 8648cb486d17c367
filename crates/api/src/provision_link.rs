//! One-time provisioning links for softphones that read their account from a URL: Linphone's
//! remote provisioning, reached by scanning the QR code the dashboard shows. A link carries a
//! random token, works once and for ten minutes, and serves the account with its HA1 digest;
//! the password itself is never stored, so it is never served.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::problem::Problem;
use crate::provisioning::{Api, Provisioning, json_problem, user};

/// How long a link works.
const TTL: Duration = Duration::from_secs(600);
/// Links kept at most (expired ones are dropped first).
const MAX_LINKS: usize = 10_000;

/// The links handed out and not yet used: in this process, or in Redis when several nodes
/// serve the API (a link made through one node is fetched through any).
#[derive(Debug, Default)]
pub struct Links {
    map: Mutex<HashMap<String, (String, Instant)>>,
    shared: Option<careflow_store::redis::links::SharedLinks>,
}

impl Links {
    /// Links kept in Redis, for every node.
    pub fn shared(links: careflow_store::redis::links::SharedLinks) -> Self {
        Self {
            map: Mutex::default(),
            shared: Some(links),
        }
    }

    /// A new link token for `username`.
    async fn create(&self, username: &str, now: Instant) -> Result<String, Problem> {
        let full = || Problem::unavailable("provisioning links", &"too many open links");
        let mut bytes = [0u8; 24];
        getrandom::fill(&mut bytes).map_err(|_| full())?;
        let token = careflow_proto::digest::hex(&bytes);
        if let Some(shared) = &self.shared {
            shared
                .put(&token, username, TTL)
                .await
                .map_err(|e| Problem::unavailable("provisioning links (redis)", &e))?;
            return Ok(token);
        }
        let mut map = self.map.lock().map_err(|_| full())?;
        if map.len() >= MAX_LINKS {
            map.retain(|_, (_, until)| *until > now);
            if map.len() >= MAX_LINKS {
                return Err(full());
            }
        }
        map.insert(token.clone(), (username.to_string(), now + TTL));
        Ok(token)
    }

    /// The username of a live link, which is used up by this call.
    async fn take(&self, token: &str, now: Instant) -> Result<Option<String>, Problem> {
        if let Some(shared) = &self.shared {
            return shared
                .take(token)
                .await
                .map_err(|e| Problem::unavailable("provisioning links (redis)", &e));
        }
        let Some((user, until)) = self.map.lock().ok().and_then(|mut m| m.remove(token)) else {
            return Ok(None);
        };
        Ok((until > now).then_some(user))
    }
}

/// Where phones reach this server's HTTP side.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProvisioningRequest {
    /// `http(s)://host[:port]` as phones reach this server (the dashboard sends its own
    /// origin).
    #[schema(pattern = r"^https?://[A-Za-z0-9.:\[\]-]+/?$", max_length = 200)]
    pub base_url: String,
}

/// A one-time link and its QR code.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProvisioningLink {
    /// The link (works once).
    pub url: String,
    /// Seconds it stays valid.
    pub expires_in: u64,
    /// The link as a QR code, an SVG image.
    pub qr_svg: String,
}

fn valid_base(base: &str) -> Option<&str> {
    let base = base.trim().trim_end_matches('/');
    let rest = base
        .strip_prefix("https://")
        .or_else(|| base.strip_prefix("http://"))?;
    let ok = !rest.is_empty()
        && base.len() <= 200
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    ok.then_some(base)
}

/// A one-time link (and its QR code) from which Linphone reads the caller's SIP account.
#[utoipa::path(post, path = "/api/sip/provisioning", tag = "sip",
    security(("bearer" = [])),
    request_body = ProvisioningRequest,
    responses(
        (status = 200, body = ProvisioningLink),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn create(
    State(api): Api,
    headers: HeaderMap,
    source: crate::audit::Source,
    body: axum::body::Bytes,
) -> Result<Json<ProvisioningLink>, Problem> {
    let who = user(&api, &headers).await?;
    let req: ProvisioningRequest = serde_json::from_slice(&body).map_err(|e| json_problem(&e))?;
    let base = valid_base(&req.base_url).ok_or_else(|| {
        Problem::invalid(
            "baseUrl",
            "an http:// or https:// origin such as https://sip.clinic.example",
        )
    })?;
    let s = api
        .subscribers
        .find_by_careflow_user(&who.id)
        .await
        .map_err(|e| Problem::unavailable("the subscriber store", &e))?
        .ok_or_else(|| Problem::not_found("you have no SIP credentials yet"))?;
    let token = api.links.create(&s.username, Instant::now()).await?;
    let url = format!("{base}/provision/{token}/linphone.xml");
    let qr = qrcode::QrCode::new(url.as_bytes())
        .map_err(|e| Problem::invalid("baseUrl", format!("cannot make a QR code: {e}")))?;
    let svg = qr
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(240, 240)
        .quiet_zone(true)
        .build();
    api.audit(
        &format!("careflow:{}", who.id),
        &source,
        "provisioning_link.created",
        &format!("{}@{}", s.username, s.domain),
        "ok",
        String::new(),
    )
    .await;
    Ok(Json(ProvisioningLink {
        url,
        expires_in: TTL.as_secs(),
        qr_svg: svg,
    }))
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Linphone's remote provisioning document for `username`.
fn linphone_xml(api: &Provisioning, username: &str, ha1: &str) -> String {
    let domain = &api.sip.domain;
    let proxy = match api.sip.tls_port {
        Some(p) => format!("<sip:{domain}:{p};transport=tls>"),
        None => format!("<sip:{domain}:{};transport=udp>", api.sip.port),
    };
    let e = |name: &str, value: &str| {
        format!("    <entry name=\"{name}\">{}</entry>\n", xml_escape(value))
    };
    let mut x = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<config xmlns=\"http://www.linphone.org/xsds/lpconfig.xsd\">\n  <section name=\"proxy_0\">\n",
    );
    x.push_str(&e("reg_proxy", &proxy));
    x.push_str(&e("reg_identity", &format!("<sip:{username}@{domain}>")));
    x.push_str(&e("reg_expires", "300"));
    x.push_str(&e("reg_sendregister", "1"));
    x.push_str(&e("realm", domain));
    x.push_str("  </section>\n  <section name=\"auth_info_0\">\n");
    x.push_str(&e("username", username));
    x.push_str(&e("ha1", ha1));
    x.push_str(&e("realm", domain));
    x.push_str(&e("domain", domain));
    x.push_str(&e("algorithm", "MD5"));
    x.push_str("  </section>\n</config>\n");
    x
}

/// `GET /provision/{token}/linphone.xml`: the account, once.
pub(crate) async fn fetch(
    State(api): State<Arc<Provisioning>>,
    source: crate::audit::Source,
    Path(token): Path<String>,
) -> Response {
    let gone = || {
        Problem::not_found("this provisioning link is unknown, used or expired; make a new one")
            .into_response()
    };
    let username = match api.links.take(&token, Instant::now()).await {
        Ok(Some(u)) => u,
        Ok(None) => return gone(),
        Err(p) => return p.into_response(),
    };
    let s = match api.subscribers.find(&username, &api.sip.domain).await {
        Ok(Some(s)) if s.enabled => s,
        Ok(_) => return gone(),
        Err(e) => return Problem::unavailable("the subscriber store", &e).into_response(),
    };
    api.audit(
        "link",
        &source,
        "provisioning_link.fetched",
        &format!("{}@{}", s.username, s.domain),
        "ok",
        "the credentials were handed out".to_string(),
    )
    .await;
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/xml; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        linphone_xml(&api, &s.username, &s.ha1_md5),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn links_work_once_and_expire() {
        let links = Links::default();
        let now = Instant::now();
        let t = links.create("careflow_abc", now).await.unwrap();
        assert_eq!(t.len(), 48);
        let used = links.take(&t, now).await.unwrap();
        assert_eq!(used.as_deref(), Some("careflow_abc"));
        assert_eq!(links.take(&t, now).await.unwrap(), None);
        let t = links.create("careflow_abc", now).await.unwrap();
        let late = now + TTL + Duration::from_secs(1);
        assert_eq!(links.take(&t, late).await.unwrap(), None);
    }

    #[test]
    fn base_urls_are_origins() {
        assert_eq!(
            valid_base("https://sip.clinic.example/"),
            Some("https://sip.clinic.example")
        );
        assert_eq!(
            valid_base("http://127.0.0.1:8080"),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(valid_base("http://[::1]:8080"), Some("http://[::1]:8080"));
        for bad in [
            "ftp://x",
            "https://",
            "https://a/b?c",
            "https://a\"><script>",
            "javascript:alert(1)",
        ] {
            assert_eq!(valid_base(bad), None, "{bad}");
        }
    }
}
