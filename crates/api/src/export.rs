//! Exports of call records and the audit trail (issue 20) as CSV or JSON Lines, streamed: the
//! rows are read from the database a page at a time (newest first, by id) and written out as
//! they come, so an export of a million records holds one page in memory, not the million.
// utoipa's generated code names the handlers' types by paths redundant in here.
#![allow(unused_qualifications)]

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use careflow_core::audit::AuditEntry;
use careflow_store::audit::AuditQuery;
use careflow_store::calls::{CallQuery, StoredCall};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use crate::audit::Source;
use crate::calls::{CallsQuery, call_query, query_problem};
use crate::problem::Problem;
use crate::provisioning::{Api, Provisioning, admin};

/// Rows read per database page.
const PAGE: usize = 1000;

/// How an export is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Comma-separated values with a header row (RFC 4180).
    #[default]
    Csv,
    /// One JSON object per line.
    Jsonl,
}

/// The format of an export.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FormatQuery {
    /// csv (default) or jsonl.
    pub format: Option<Format>,
}

impl Format {
    fn content_type(self) -> &'static str {
        match self {
            Self::Csv => "text/csv; charset=utf-8",
            Self::Jsonl => "application/jsonl",
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Jsonl => "jsonl",
        }
    }
}

/// A CSV field: quoted when it holds a separator, a quote or a line break (RFC 4180), and
/// prefixed with `'` when a spreadsheet would take it for a formula.
fn csv_field(v: &str) -> String {
    let v = if v.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{v}")
    } else {
        v.to_string()
    };
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v
    }
}

fn csv_line(fields: &[String]) -> String {
    let mut line = fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",");
    line.push_str("\r\n");
    line
}

const CALL_COLUMNS: &[&str] = &[
    "id",
    "call_id",
    "node",
    "caller",
    "caller_instance",
    "caller_user_agent",
    "caller_source",
    "caller_transport",
    "dialled",
    "callee",
    "answered_by_contact",
    "answered_by_user_agent",
    "invite_at",
    "ringing_at",
    "answered_at",
    "ended_at",
    "setup_ms",
    "talk_seconds",
    "disposition",
    "final_code",
    "reason",
    "ended_by",
    "media_anchored",
];

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn call_csv(c: &StoredCall) -> String {
    let r = &c.record;
    let a = r.answered_by.clone().unwrap_or_default();
    csv_line(&[
        c.id.to_string(),
        r.call_id.clone(),
        c.node.clone(),
        r.caller.clone(),
        opt(r.caller_device.instance.clone()),
        opt(r.caller_device.user_agent.clone()),
        opt(r.caller_device.source.clone()),
        opt(r.caller_device.transport.clone()),
        r.dialled.clone(),
        opt(r.callee.clone()),
        opt(a.contact),
        opt(a.user_agent),
        r.invite_at.to_string(),
        opt(r.ringing_at),
        opt(r.answered_at),
        r.ended_at.to_string(),
        r.setup_ms().to_string(),
        r.talk_seconds().to_string(),
        r.disposition.as_str().to_string(),
        r.final_code.to_string(),
        opt(r.reason.clone()),
        r.ended_by.as_str().to_string(),
        r.media_anchored.to_string(),
    ])
}

fn call_json(c: StoredCall) -> String {
    let mut line =
        serde_json::to_string(&crate::calls::CallView::from(c)).unwrap_or_else(|_| "{}".into());
    line.push('\n');
    line
}

const AUDIT_COLUMNS: &[&str] = &[
    "seq",
    "at",
    "actor",
    "source",
    "action",
    "target",
    "outcome",
    "detail",
    "prev_hash",
    "hash",
];

fn audit_csv(e: &AuditEntry) -> String {
    csv_line(&[
        e.seq.to_string(),
        e.at.to_string(),
        e.event.actor.clone(),
        e.event.source.clone(),
        e.event.action.clone(),
        e.event.target.clone(),
        e.event.outcome.clone(),
        e.event.detail.clone(),
        e.prev_hash.clone(),
        e.hash.clone(),
    ])
}

fn audit_json(e: AuditEntry) -> String {
    let mut line =
        serde_json::to_string(&crate::audit::AuditView::from(e)).unwrap_or_else(|_| "{}".into());
    line.push('\n');
    line
}

fn attachment(format: Format, what: &str, body: Body) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, format.content_type().to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!(
                    "attachment; filename=\"careflow-{what}.{}\"",
                    format.extension()
                ),
            ),
            (header::CACHE_CONTROL, "no-store".to_string()),
        ],
        body,
    )
        .into_response()
}

/// The CSV header row of `columns`.
fn csv_header(columns: &[&str]) -> String {
    csv_line(&columns.iter().map(|c| c.to_string()).collect::<Vec<_>>())
}

/// A body of `header` then the pages `next` reads and renders from `state`, one database page
/// per chunk, until `next` says there is no more (`None` in place of the next state). `next`
/// answering `None` ends the body early: the status line went out already, so the download
/// ends short and `next` logs why.
fn paged<S, F, Fut>(header: Option<String>, state: S, next: F) -> Body
where
    S: Send + 'static,
    F: Fn(S) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<(String, Option<S>)>> + Send,
{
    let start = (header, Some(state), next);
    Body::from_stream(futures_util::stream::unfold(
        start,
        |(header, state, next)| async move {
            let (page, more) = next(state?).await?;
            let out = match header {
                Some(h) => h + &page,
                None => page,
            };
            Some((
                Ok::<_, std::io::Error>(Bytes::from(out)),
                (None, more, next),
            ))
        },
    ))
}

/// Call records matching `q`, newest first, page by page.
fn call_body(api: Arc<Provisioning>, mut q: CallQuery, format: Format) -> Body {
    q.limit = PAGE;
    let header = (format == Format::Csv).then(|| csv_header(CALL_COLUMNS));
    paged(header, (api, q), move |(api, mut q)| async move {
        match api.calls.calls(&q).await {
            Ok(rows) => {
                let more = rows.len() == PAGE;
                q.before_id = rows.last().map(|r| r.id);
                let page: String = rows
                    .into_iter()
                    .map(|r| match format {
                        Format::Csv => call_csv(&r),
                        Format::Jsonl => call_json(r),
                    })
                    .collect();
                Some((page, more.then_some((api, q))))
            }
            Err(e) => {
                tracing::error!(error = %e, "call record export cut short: the database failed");
                None
            }
        }
    })
}

/// Audit entries matching `q`, newest first, page by page.
fn audit_body(api: Arc<Provisioning>, mut q: AuditQuery, format: Format) -> Body {
    q.limit = PAGE;
    let header = (format == Format::Csv).then(|| csv_header(AUDIT_COLUMNS));
    paged(header, (api, q), move |(api, mut q)| async move {
        match api.audit_log.audit_entries(&q).await {
            Ok(rows) => {
                let more = rows.len() == PAGE;
                q.before_seq = rows.last().map(|r| r.seq);
                let page: String = rows
                    .into_iter()
                    .map(|r| match format {
                        Format::Csv => audit_csv(&r),
                        Format::Jsonl => audit_json(r),
                    })
                    .collect();
                Some((page, more.then_some((api, q))))
            }
            Err(e) => {
                tracing::error!(error = %e, "audit export cut short: the database failed");
                None
            }
        }
    })
}

/// Call detail records as CSV or JSON Lines, newest first (the filters of `/api/admin/calls`;
/// no page size: every matching record, streamed).
#[utoipa::path(get, path = "/api/admin/calls/export", tag = "admin",
    security(("bearer" = [])),
    params(CallsQuery, FormatQuery),
    responses(
        (status = 200, description = "CSV (a header row, then one call per row) or JSON Lines (one call per line, as /api/admin/calls lists them)",
            content((String = "text/csv"), (String = "application/jsonl"))),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn calls(
    State(api): Api,
    headers: HeaderMap,
    source: Source,
    query: Result<Query<CallsQuery>, QueryRejection>,
    format: Result<Query<FormatQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let who = admin(&api, &headers).await?;
    let Query(q) = query.map_err(query_problem)?;
    let Query(f) = format.map_err(query_problem)?;
    let format = f.format.unwrap_or_default();
    let q = call_query(q)?;
    api.audit(
        &format!("apikey:{who}"),
        &source,
        "calls.exported",
        q.user.as_deref().unwrap_or("*"),
        "ok",
        format!("{} export", format.extension()),
    )
    .await;
    Ok(attachment(
        format,
        "calls",
        call_body(api.clone(), q, format),
    ))
}

/// The audit trail as CSV or JSON Lines, newest first (the filters of `/api/admin/audit`),
/// streamed.
#[utoipa::path(get, path = "/api/admin/audit/export", tag = "admin",
    security(("bearer" = [])),
    params(crate::audit::AuditListQuery, FormatQuery),
    responses(
        (status = 200, description = "CSV (a header row, then one entry per row) or JSON Lines",
            content((String = "text/csv"), (String = "application/jsonl"))),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn audit(
    State(api): Api,
    headers: HeaderMap,
    source: Source,
    query: Result<Query<crate::audit::AuditListQuery>, QueryRejection>,
    format: Result<Query<FormatQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let who = admin(&api, &headers).await?;
    let Query(q) = query.map_err(query_problem)?;
    let Query(f) = format.map_err(query_problem)?;
    let format = f.format.unwrap_or_default();
    let q = crate::audit::audit_query(q)?;
    api.audit(
        &format!("apikey:{who}"),
        &source,
        "audit.exported",
        q.target.as_deref().unwrap_or("*"),
        "ok",
        format!("{} export", format.extension()),
    )
    .await;
    Ok(attachment(
        format,
        "audit",
        audit_body(api.clone(), q, format),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_formulas_defused() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(1)"), "'=HYPERLINK(1)");
        assert_eq!(csv_line(&["1".into(), "x\ny".into()]), "1,\"x\ny\"\r\n");
    }
}
