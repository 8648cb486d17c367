//! Server-sent events (issue 20): `/api/sip/events` streams a user's own device and call
//! changes (the dashboard listens instead of polling), `/api/admin/events` every user's.
//!
//! A user's stream starts with a `status` event (what `/api/sip/status` answers) and sends a
//! new one whenever the user's devices change, so the page never asks; calls come as `call`
//! events. A comment line every 15 s keeps proxies from closing an idle stream. A reader that
//! falls behind the bounded event backlog gets a fresh `status` instead of what it missed.
// utoipa's generated code names the handlers' types by paths redundant in here.
#![allow(unused_qualifications)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use careflow_store::events::{EventKind, LiveEvent};
use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;

use crate::problem::Problem;
use crate::provisioning::{Api, Provisioning, admin, status_of, user};

const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// One server-sent event of a stream (`text/event-stream`).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct StreamEvent {
    /// The event's name: `status` or `call` on `/api/sip/events`; the event type
    /// (`device.registered`, `call.missed`, ...) on `/api/admin/events`.
    pub event: String,
    /// JSON: a `status` is what `/api/sip/status` answers; other events are
    /// `{"type", "user", "at", "detail"}`.
    pub data: String,
}

fn json_event(name: &str, data: &serde_json::Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// The `status` event of `username` now.
async fn status_event(api: &Provisioning, username: &str) -> Event {
    match status_of(api, Some(username.to_string())).await {
        Ok(s) => json_event("status", &serde_json::to_value(s).unwrap_or_default()),
        Err(_) => Event::default()
            .event("unavailable")
            .data("the location service did not answer; the next change retries"),
    }
}

/// The caller's own devices and calls, as they change.
#[utoipa::path(get, path = "/api/sip/events", tag = "sip",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "`text/event-stream`: `status` events (as /api/sip/status answers) and `call` events", content_type = "text/event-stream", body = StreamEvent),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No SIP credentials yet", body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn mine(
    State(api): Api,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Problem> {
    let who = user(&api, &headers).await?;
    let s = api
        .subscribers
        .find_by_careflow_user(&who.id)
        .await
        .map_err(|e| Problem::unavailable("the subscriber store", &e))?
        .ok_or_else(|| Problem::not_found("you have no SIP credentials yet"))?;
    let aor = format!("{}@{}", s.username, s.domain);
    let rx = api.events.subscribe();
    let first = status_event(&api, &s.username).await;
    struct St {
        api: Arc<Provisioning>,
        rx: tokio::sync::broadcast::Receiver<LiveEvent>,
        aor: String,
        username: String,
        first: Option<Event>,
    }
    let st = St {
        api: api.clone(),
        rx,
        aor,
        username: s.username,
        first: Some(first),
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        if let Some(e) = st.first.take() {
            return Some((Ok(e), st));
        }
        loop {
            match st.rx.recv().await {
                Ok(e) if e.user == st.aor => {
                    let ev = match e.kind {
                        EventKind::DeviceRegistered | EventKind::DeviceUnregistered => {
                            status_event(&st.api, &st.username).await
                        }
                        EventKind::CallAnswered | EventKind::CallMissed | EventKind::CallEnded => {
                            json_event("call", &e.to_json())
                        }
                        EventKind::CredentialsChanged => json_event("credentials", &e.to_json()),
                    };
                    return Some((Ok(ev), st));
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => {
                    let ev = status_event(&st.api, &st.username).await;
                    return Some((Ok(ev), st));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// Every user's device and call events, as they happen.
#[utoipa::path(get, path = "/api/admin/events", tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "`text/event-stream`: one event per change, named by its type (`device.registered`, `call.missed`, ...)", content_type = "text/event-stream", body = StreamEvent),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn all(
    State(api): Api,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Problem> {
    admin(&api, &headers).await?;
    let rx = api.events.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let ev = match rx.recv().await {
            Ok(e) => json_event(e.kind.as_str(), &e.to_json()),
            Err(RecvError::Lagged(n)) => Event::default()
                .event("lagged")
                .data(format!("{n} events were missed")),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(ev), rx))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}
