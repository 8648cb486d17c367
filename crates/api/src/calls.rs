//! `/api/admin/calls`: call detail records (issue 20), filtered and paged newest first.
// utoipa's generated code for `params(CallsQuery)` names it by a path redundant in here.
#![allow(unused_qualifications)]

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use careflow_core::cdr::{Device, Disposition};
use careflow_store::calls::{CallQuery, StoredCall};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::problem::Problem;
use crate::provisioning::{Api, admin};

/// The filters of a call list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CallsQuery {
    /// Calls made or received by this `user@domain`.
    #[param(max_length = 320)]
    pub user: Option<String>,
    /// Calls placed at or after this time (Unix milliseconds).
    #[param(minimum = 0)]
    pub since: Option<i64>,
    /// Calls placed before this time (Unix milliseconds).
    #[param(minimum = 0)]
    pub until: Option<i64>,
    /// Only calls that ended so.
    pub disposition: Option<DispositionFilter>,
    /// The `next` of the previous page.
    pub before: Option<i64>,
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

/// How a call ended, as a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DispositionFilter {
    /// Someone answered.
    Answered,
    /// Nobody answered in time.
    NoAnswer,
    /// The callee was busy.
    Busy,
    /// The caller hung up first.
    Cancelled,
    /// The callee declined.
    Rejected,
    /// It could not be placed.
    Failed,
}

impl From<DispositionFilter> for Disposition {
    fn from(d: DispositionFilter) -> Self {
        match d {
            DispositionFilter::Answered => Self::Answered,
            DispositionFilter::NoAnswer => Self::NoAnswer,
            DispositionFilter::Busy => Self::Busy,
            DispositionFilter::Cancelled => Self::Cancelled,
            DispositionFilter::Rejected => Self::Rejected,
            DispositionFilter::Failed => Self::Failed,
        }
    }
}

/// A device in a call record.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CallDevice {
    /// `+sip.instance` of its Contact.
    pub instance: Option<String>,
    /// Its User-Agent (or Server).
    pub user_agent: Option<String>,
    /// `IP:port` it sent from.
    pub source: Option<String>,
    /// udp, tcp, tls, ws or wss.
    pub transport: Option<String>,
    /// Its Contact URI.
    pub contact: Option<String>,
}

impl From<Device> for CallDevice {
    fn from(d: Device) -> Self {
        Self {
            instance: d.instance,
            user_agent: d.user_agent,
            source: d.source,
            transport: d.transport,
            contact: d.contact,
        }
    }
}

/// One call, as it ended.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CallView {
    /// Row id (rising).
    pub id: i64,
    /// The INVITE's Call-ID.
    pub call_id: String,
    /// The node that handled it.
    pub node: String,
    /// The caller's `user@domain`.
    pub caller: String,
    /// The calling device.
    pub caller_device: CallDevice,
    /// The Request-URI dialled.
    pub dialled: String,
    /// The callee's `user@domain`, when one of ours.
    pub callee: Option<String>,
    /// The device that answered.
    pub answered_by: Option<CallDevice>,
    /// INVITE received (Unix ms).
    pub invite_at: u64,
    /// First 18x (Unix ms).
    pub ringing_at: Option<u64>,
    /// 2xx (Unix ms).
    pub answered_at: Option<u64>,
    /// End (Unix ms).
    pub ended_at: u64,
    /// INVITE to first ring, or to the final answer when it never rang (ms).
    pub setup_ms: u64,
    /// Answer to end, rounded up (s).
    pub talk_seconds: u64,
    /// answered, no_answer, busy, cancelled, rejected or failed.
    pub disposition: String,
    /// The INVITE's final status.
    pub final_code: u16,
    /// A `Reason` given with the end.
    pub reason: Option<String>,
    /// caller, callee, network (an unanswered call's final status) or timeout.
    pub ended_by: String,
    /// Media through rtpengine.
    pub media_anchored: bool,
}

impl From<StoredCall> for CallView {
    fn from(s: StoredCall) -> Self {
        let r = s.record;
        Self {
            id: s.id,
            setup_ms: r.setup_ms(),
            talk_seconds: r.talk_seconds(),
            call_id: r.call_id,
            node: s.node,
            caller: r.caller,
            caller_device: r.caller_device.into(),
            dialled: r.dialled,
            callee: r.callee,
            answered_by: r.answered_by.map(Into::into),
            invite_at: r.invite_at,
            ringing_at: r.ringing_at,
            answered_at: r.answered_at,
            ended_at: r.ended_at,
            disposition: r.disposition.as_str().to_string(),
            final_code: r.final_code,
            reason: r.reason,
            ended_by: r.ended_by.as_str().to_string(),
            media_anchored: r.media_anchored,
        }
    }
}

/// A page of calls.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CallPage {
    /// Newest first.
    pub calls: Vec<CallView>,
    /// Pass as `before` for the next page; none on the last.
    pub next: Option<i64>,
}

/// A 400 naming the query parameter axum could not read ("Failed to deserialize query string:
/// FIELD: what is wrong").
pub(crate) fn query_problem(r: QueryRejection) -> Problem {
    let text = r.body_text();
    let field = text
        .split("query string: ")
        .nth(1)
        .and_then(|t| t.split(':').next())
        .filter(|f| !f.is_empty() && !f.contains(' '))
        .unwrap_or("query")
        .to_string();
    Problem::invalid(&field, text)
}

/// The store query of `q`, or the problem with it.
pub(crate) fn call_query(q: CallsQuery) -> Result<CallQuery, Problem> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::invalid("limit", "1 to 1000"));
    }
    let disposition = q.disposition.map(Disposition::from);
    if q.user.as_ref().is_some_and(|u| u.chars().count() > 320) {
        return Err(Problem::invalid("user", "at most 320 characters"));
    }
    let time = |field: &str, t: Option<i64>| -> Result<Option<u64>, Problem> {
        t.map(|t| {
            u64::try_from(t).map_err(|_| Problem::invalid(field, "Unix milliseconds, not negative"))
        })
        .transpose()
    };
    Ok(CallQuery {
        user: q.user.filter(|u| !u.is_empty()),
        since: time("since", q.since)?,
        until: time("until", q.until)?,
        disposition,
        before_id: q.before,
        limit,
    })
}

/// Call detail records, newest first.
#[utoipa::path(get, path = "/api/admin/calls", tag = "admin",
    security(("bearer" = [])),
    params(CallsQuery),
    responses(
        (status = 200, body = CallPage),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn list(
    State(api): Api,
    headers: HeaderMap,
    source: crate::audit::Source,
    query: Result<Query<CallsQuery>, QueryRejection>,
) -> Result<Json<CallPage>, Problem> {
    let who = admin(&api, &headers).await?;
    let Query(q) = query.map_err(query_problem)?;
    let q = call_query(q)?;
    let calls = api
        .calls
        .calls(&q)
        .await
        .map_err(|e| Problem::unavailable("the call record store", &e))?;
    api.audit(
        &format!("apikey:{who}"),
        &source,
        "calls.read",
        q.user.as_deref().unwrap_or("*"),
        "ok",
        format!("{} records", calls.len()),
    )
    .await;
    let next = (calls.len() == q.limit)
        .then(|| calls.last().map(|c| c.id))
        .flatten();
    Ok(Json(CallPage {
        calls: calls.into_iter().map(Into::into).collect(),
        next,
    }))
}

/// The page of a user's own calls.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MyCallsQuery {
    /// The `next` of the previous page.
    pub before: Option<i64>,
    /// Page size (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<usize>,
}

/// The caller's own recent calls (made or received), newest first.
#[utoipa::path(get, path = "/api/sip/calls", tag = "sip",
    security(("bearer" = [])),
    params(MyCallsQuery),
    responses(
        (status = 200, body = CallPage),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No SIP credentials yet", body = Problem, content_type = "application/problem+json"),
        (status = 429, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn mine(
    State(api): Api,
    headers: HeaderMap,
    query: Result<Query<MyCallsQuery>, QueryRejection>,
) -> Result<Json<CallPage>, Problem> {
    let who = crate::provisioning::user(&api, &headers).await?;
    let Query(q) = query.map_err(query_problem)?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(Problem::invalid("limit", "1 to 100"));
    }
    let s = api
        .subscribers
        .find_by_careflow_user(&who.id)
        .await
        .map_err(|e| Problem::unavailable("the subscriber store", &e))?
        .ok_or_else(|| Problem::not_found("you have no SIP credentials yet"))?;
    let q = CallQuery {
        user: Some(format!("{}@{}", s.username, s.domain)),
        before_id: q.before,
        limit,
        ..CallQuery::default()
    };
    let calls = api
        .calls
        .calls(&q)
        .await
        .map_err(|e| Problem::unavailable("the call record store", &e))?;
    let next = (calls.len() == q.limit)
        .then(|| calls.last().map(|c| c.id))
        .flatten();
    Ok(Json(CallPage {
        calls: calls.into_iter().map(Into::into).collect(),
        next,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(limit: Option<usize>, disposition: Option<DispositionFilter>) -> CallsQuery {
        CallsQuery {
            user: None,
            since: None,
            until: None,
            disposition,
            before: None,
            limit,
        }
    }

    #[test]
    fn bad_filters_name_their_field() {
        assert_eq!(call_query(q(None, None)).unwrap().limit, 100);
        assert!(call_query(q(Some(0), None)).is_err());
        assert!(call_query(q(Some(1001), None)).is_err());
        assert_eq!(
            call_query(q(None, Some(DispositionFilter::Busy)))
                .unwrap()
                .disposition,
            Some(Disposition::Busy)
        );
    }
}
