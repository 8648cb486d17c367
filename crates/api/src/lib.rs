//! The HTTP side of careflow-sip: health and metrics, and the provisioning API for CareFlow
//! (`/api/sip/*` for users with a CareFlow token, `/api/admin/*` for API keys,
//! `/api/openapi.json`) and the dashboard at `/`. It never parses SIP; it reads a small status handle from the server
//! and the stores.
#![warn(missing_docs)]

pub mod admin;
pub mod audit;
pub mod auth;
pub mod calls;
mod dashboard;
pub mod devices;
pub mod events;
pub mod export;
mod http_client;
pub mod openapi;
pub mod problem;
pub mod provision_link;
pub mod provisioning;
pub mod syslog;
pub mod webhooks;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::net::TcpListener;

pub use provisioning::{Provisioning, SipConfig};

/// What the HTTP side reads from the running server.
pub trait Status: Send + Sync + 'static {
    /// True once every listener is bound and the stores are open.
    fn ready(&self) -> bool;
    /// Prometheus text exposition.
    fn metrics(&self) -> String;
}

/// Request bodies are tiny JSON documents; anything larger is refused with 413.
const MAX_BODY: usize = 16 * 1024;

/// The router (exposed for in-process tests).
pub fn router(status: Arc<dyn Status>, api: Arc<Provisioning>) -> Router {
    let ops = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(status);
    let pages = Router::new()
        .route("/", get(dashboard::index))
        .route("/dashboard/app.js", get(dashboard::script))
        .route("/dashboard/app.css", get(dashboard::style));
    let api = Router::new()
        .route("/api/openapi.json", get(openapi::document))
        .route("/api/sip/register", post(provisioning::register))
        .route(
            "/api/sip/credentials",
            get(provisioning::credentials).delete(provisioning::revoke),
        )
        .route("/api/sip/credentials/rotate", post(provisioning::rotate))
        .route("/api/sip/status", get(provisioning::status))
        .route("/api/sip/deregister", post(provisioning::deregister))
        .route("/api/sip/provisioning", post(provision_link::create))
        .route(
            "/provision/{token}/linphone.xml",
            get(provision_link::fetch),
        )
        .route("/api/admin/subscribers", get(admin::subscribers))
        .route(
            "/api/admin/subscribers/{username}/disable",
            post(admin::disable),
        )
        .route(
            "/api/admin/subscribers/{username}/enable",
            post(admin::enable),
        )
        .route("/api/admin/bindings", get(admin::bindings))
        .route(
            "/api/admin/devices",
            get(devices::admin::list).post(devices::admin::add),
        )
        .route(
            "/api/admin/devices/{mac}",
            get(devices::admin::get)
                .patch(devices::admin::update)
                .delete(devices::admin::remove),
        )
        .route(
            "/api/admin/devices/{mac}/rotate",
            post(devices::admin::rotate),
        )
        .route(
            "/api/admin/devices/{mac}/provisioning-password",
            post(devices::admin::provisioning_password),
        )
        .route("/api/admin/calls", get(calls::list))
        .route("/api/admin/audit", get(audit::list))
        .route("/api/admin/calls/export", get(export::calls))
        .route("/api/admin/audit/export", get(export::audit))
        .route("/api/sip/calls", get(calls::mine))
        .route("/api/admin/events", get(events::all))
        .route("/api/sip/events", get(events::mine))
        .route("/api/admin/security", get(admin::security))
        .route(
            "/api/admin/bindings/{id}",
            axum::routing::delete(admin::remove_binding),
        )
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(api);
    ops.merge(pages).merge(api)
}

async fn not_found() -> problem::Problem {
    problem::Problem::not_found("no such endpoint; see /api/openapi.json")
}

/// Serves HTTP on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    status: Arc<dyn Status>,
    api: Arc<Provisioning>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(status, api).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

async fn healthz(State(s): State<Arc<dyn Status>>) -> impl IntoResponse {
    if s.ready() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn metrics(State(s): State<Arc<dyn Status>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics(),
    )
}
