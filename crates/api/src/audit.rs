//! The audit trail from the API's side (issue 20): every credential and admin action is
//! appended to the hash-chained `audit_log` (`careflow_core::audit`) with who did it, from
//! where, to what and how it went, never a secret; `/api/admin/audit` lists it, and reading it
//! is audited too.
// utoipa's generated code for `params(AuditListQuery)` names it by a path redundant in here.
#![allow(unused_qualifications)]

use std::net::SocketAddr;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, FromRequestParts, Query, State};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use careflow_core::audit::{AuditEntry, AuditEvent};
use careflow_store::audit::AuditQuery;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::problem::Problem;
use crate::provisioning::{Api, Provisioning, admin};

/// The client's address, for the audit trail (`unknown` when the server was not started with
/// connection info, as in router tests).
#[derive(Debug, Clone)]
pub(crate) struct Source(pub(crate) String);

impl<S: Send + Sync> FromRequestParts<S> for Source {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map_or_else(|| "unknown".to_string(), |c| c.0.ip().to_string()),
        ))
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Provisioning {
    /// Appends an entry to the audit trail (and the `careflow::audit` log line). A trail that
    /// cannot be written is logged as an error: the action has happened either way.
    pub(crate) async fn audit(
        &self,
        actor: &str,
        source: &Source,
        action: &str,
        target: &str,
        outcome: &str,
        detail: String,
    ) {
        let event = AuditEvent {
            actor: actor.to_string(),
            source: source.0.clone(),
            action: action.to_string(),
            target: target.to_string(),
            outcome: outcome.to_string(),
            detail,
        };
        record(&*self.audit_log, event).await;
    }
}

/// Appends `event` to the trail now, with its `careflow::audit` log line; a trail that cannot
/// be written is logged as an error (the action has happened either way).
pub(crate) async fn record(store: &dyn careflow_store::audit::AuditStore, event: AuditEvent) {
    tracing::info!(target: "careflow::audit", actor = %event.actor, source = %event.source,
        action = %event.action, target = %event.target, outcome = %event.outcome,
        detail = %event.detail, "audit");
    let (action, target) = (event.action.clone(), event.target.clone());
    if let Err(e) = store.append_audit(now_ms(), event).await {
        tracing::error!(error = %e, action, target, "the audit trail could not be written");
    }
}

/// The filters of an audit listing.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditListQuery {
    /// Entries of this actor (`careflow:USER`, `apikey:NAME`, `cli`, `link`).
    #[param(max_length = 320)]
    pub actor: Option<String>,
    /// Entries of this action (`credentials.rotated`).
    #[param(max_length = 64)]
    pub action: Option<String>,
    /// Entries about this target (`user@domain`).
    #[param(max_length = 320)]
    pub target: Option<String>,
    /// At or after this time (Unix milliseconds).
    #[param(minimum = 0)]
    pub since: Option<i64>,
    /// Before this time (Unix milliseconds).
    #[param(minimum = 0)]
    pub until: Option<i64>,
    /// The `next` of the previous page.
    #[param(minimum = 0)]
    pub before: Option<i64>,
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

/// One entry of the audit trail.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditView {
    /// Its place in the chain.
    pub seq: u64,
    /// Unix milliseconds.
    pub at: u64,
    /// Who acted.
    pub actor: String,
    /// From where.
    pub source: String,
    /// What was done.
    pub action: String,
    /// To what.
    pub target: String,
    /// `ok`, or why not.
    pub outcome: String,
    /// More about it.
    pub detail: String,
    /// The previous entry's hash.
    pub prev_hash: String,
    /// SHA-256 of the previous hash and this entry.
    pub hash: String,
}

impl From<AuditEntry> for AuditView {
    fn from(e: AuditEntry) -> Self {
        Self {
            seq: e.seq,
            at: e.at,
            actor: e.event.actor,
            source: e.event.source,
            action: e.event.action,
            target: e.event.target,
            outcome: e.event.outcome,
            detail: e.event.detail,
            prev_hash: e.prev_hash,
            hash: e.hash,
        }
    }
}

/// A page of the audit trail.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditPage {
    /// Newest first.
    pub entries: Vec<AuditView>,
    /// Pass as `before` for the next page; none on the last.
    pub next: Option<u64>,
}

fn non_negative(field: &str, v: Option<i64>) -> Result<Option<u64>, Problem> {
    v.map(|v| u64::try_from(v).map_err(|_| Problem::invalid(field, "not negative")))
        .transpose()
}

/// The audit trail, newest first.
#[utoipa::path(get, path = "/api/admin/audit", tag = "admin",
    security(("bearer" = [])),
    params(AuditListQuery),
    responses(
        (status = 200, body = AuditPage),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn list(
    State(api): Api,
    headers: HeaderMap,
    source: Source,
    query: Result<Query<AuditListQuery>, QueryRejection>,
) -> Result<Json<AuditPage>, Problem> {
    let who = admin(&api, &headers).await?;
    let Query(q) = query.map_err(crate::calls::query_problem)?;
    let q = audit_query(q)?;
    let entries = api
        .audit_log
        .audit_entries(&q)
        .await
        .map_err(|e| Problem::unavailable("the audit trail", &e))?;
    api.audit(
        &format!("apikey:{who}"),
        &source,
        "audit.read",
        q.target.as_deref().unwrap_or("*"),
        "ok",
        format!("{} entries", entries.len()),
    )
    .await;
    let next = (entries.len() == q.limit)
        .then(|| entries.last().map(|e| e.seq))
        .flatten();
    Ok(Json(AuditPage {
        entries: entries.into_iter().map(Into::into).collect(),
        next,
    }))
}

/// The store query of `q`, or the problem with it.
pub(crate) fn audit_query(q: AuditListQuery) -> Result<AuditQuery, Problem> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::invalid("limit", "1 to 1000"));
    }
    for (field, value, max) in [
        ("actor", &q.actor, 320),
        ("action", &q.action, 64),
        ("target", &q.target, 320),
    ] {
        if value.as_ref().is_some_and(|v| v.chars().count() > max) {
            return Err(Problem::invalid(field, format!("at most {max} characters")));
        }
    }
    Ok(AuditQuery {
        actor: q.actor.filter(|a| !a.is_empty()),
        action: q.action.filter(|a| !a.is_empty()),
        target: q.target.filter(|t| !t.is_empty()),
        since: non_negative("since", q.since)?,
        until: non_negative("until", q.until)?,
        before_seq: non_negative("before", q.before)?,
        limit,
    })
}
