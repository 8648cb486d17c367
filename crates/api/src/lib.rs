//! The HTTP side of careflow-sip: health and metrics today, the provisioning API and the
//! dashboard later. It never parses SIP; it reads a small status handle from the server.
#![warn(missing_docs)]

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

/// What the HTTP side reads from the running server.
pub trait Status: Send + Sync + 'static {
    /// True once every listener is bound and the stores are open.
    fn ready(&self) -> bool;
    /// Prometheus text exposition.
    fn metrics(&self) -> String;
}

/// The router (exposed for in-process tests).
pub fn router(status: Arc<dyn Status>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(status)
}

/// Serves HTTP on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    status: Arc<dyn Status>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(status))
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
