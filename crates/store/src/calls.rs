//! Call detail records (issue 20) in the subscriber database: one row per call in
//! `call_record`, the same columns on SQLite, PostgreSQL and MySQL. The column list, the
//! values of a record and the filters are written once here; each backend only binds them in
//! its driver's types and placeholders.

use async_trait::async_trait;
use careflow_core::cdr::{CallRecord, Device, Disposition, EndedBy};

use crate::StoreError;

/// A value bound to, or read from, one column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Val {
    Text(Option<String>),
    Int(Option<i64>),
}

impl Val {
    fn text(&self) -> Option<String> {
        match self {
            Self::Text(t) => t.clone(),
            Self::Int(i) => i.map(|i| i.to_string()),
        }
    }

    fn int(&self) -> Option<i64> {
        match self {
            Self::Int(i) => *i,
            Self::Text(t) => t.as_deref().and_then(|t| t.parse().ok()),
        }
    }
}

/// Whether a column holds text or an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Text,
    Int,
}

/// The columns of `call_record` after `id`, in the order of [`values`] and [`record_of`].
pub(crate) const COLUMNS: &[(&str, Kind)] = &[
    ("call_id", Kind::Text),
    ("node", Kind::Text),
    ("caller", Kind::Text),
    ("caller_instance", Kind::Text),
    ("caller_user_agent", Kind::Text),
    ("caller_source", Kind::Text),
    ("caller_transport", Kind::Text),
    ("caller_contact", Kind::Text),
    ("dialled", Kind::Text),
    ("callee", Kind::Text),
    ("answer_instance", Kind::Text),
    ("answer_user_agent", Kind::Text),
    ("answer_source", Kind::Text),
    ("answer_transport", Kind::Text),
    ("answer_contact", Kind::Text),
    ("invite_at", Kind::Int),
    ("ringing_at", Kind::Int),
    ("answered_at", Kind::Int),
    ("ended_at", Kind::Int),
    ("setup_ms", Kind::Int),
    ("talk_seconds", Kind::Int),
    ("disposition", Kind::Text),
    ("final_code", Kind::Int),
    ("reason", Kind::Text),
    ("ended_by", Kind::Text),
    ("media_anchored", Kind::Int),
];

/// `id, call_id, node, ...`: the columns a query selects.
pub(crate) fn select_list() -> String {
    let mut s = String::from("id");
    for (c, _) in COLUMNS {
        s.push_str(", ");
        s.push_str(c);
    }
    s
}

/// `INSERT INTO call_record (...) VALUES (...)` with `placeholder(i)` for the i-th value
/// (1-based).
pub(crate) fn insert_sql(placeholder: impl Fn(usize) -> String) -> String {
    let names: Vec<&str> = COLUMNS.iter().map(|(c, _)| *c).collect();
    let marks: Vec<String> = (1..=COLUMNS.len()).map(placeholder).collect();
    format!(
        "INSERT INTO call_record ({}) VALUES ({})",
        names.join(", "),
        marks.join(", ")
    )
}

fn ms(v: u64) -> Option<i64> {
    i64::try_from(v).ok()
}

/// A stored call: its row id, the node that handled it and the record.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredCall {
    /// Row id: rises with every record written (the paging cursor).
    pub id: i64,
    /// The node that handled the call (`NODE_ID`, or the host name).
    pub node: String,
    /// What happened.
    pub record: CallRecord,
}

/// The values of [`COLUMNS`] for a record of `node`.
pub(crate) fn values(node: &str, r: &CallRecord) -> Vec<Val> {
    let t = |s: &Option<String>| Val::Text(s.clone());
    let s = |s: &str| Val::Text(Some(s.to_string()));
    let none = Device::default();
    let a = r.answered_by.as_ref().unwrap_or(&none);
    let c = &r.caller_device;
    vec![
        s(&r.call_id),
        s(node),
        s(&r.caller),
        t(&c.instance),
        t(&c.user_agent),
        t(&c.source),
        t(&c.transport),
        t(&c.contact),
        s(&r.dialled),
        t(&r.callee),
        t(&a.instance),
        t(&a.user_agent),
        t(&a.source),
        t(&a.transport),
        t(&a.contact),
        Val::Int(ms(r.invite_at)),
        Val::Int(r.ringing_at.and_then(ms)),
        Val::Int(r.answered_at.and_then(ms)),
        Val::Int(ms(r.ended_at)),
        Val::Int(ms(r.setup_ms())),
        Val::Int(ms(r.talk_seconds())),
        s(r.disposition.as_str()),
        Val::Int(Some(i64::from(r.final_code))),
        t(&r.reason),
        s(r.ended_by.as_str()),
        Val::Int(Some(i64::from(r.media_anchored))),
    ]
}

/// A row read back: `id` then the values of [`COLUMNS`].
pub(crate) fn record_of(id: i64, v: &[Val]) -> Result<StoredCall, StoreError> {
    let bad = |what: &str| StoreError::backend("call records", format!("row {id}: bad {what}"));
    if v.len() != COLUMNS.len() {
        return Err(bad("column count"));
    }
    let text = |i: usize| v[i].text();
    let req = |i: usize| text(i).ok_or_else(|| bad(COLUMNS[i].0));
    let at = |i: usize| v[i].int().and_then(|n| u64::try_from(n).ok());
    let device = |from: usize| Device {
        instance: text(from),
        user_agent: text(from + 1),
        source: text(from + 2),
        transport: text(from + 3),
        contact: text(from + 4),
    };
    let answered_by = Some(device(10)).filter(|d| *d != Device::default());
    let ended_by = match req(24)?.as_str() {
        "caller" => EndedBy::Caller,
        "callee" => EndedBy::Callee,
        "timeout" => EndedBy::Timeout,
        _ => EndedBy::Network,
    };
    Ok(StoredCall {
        id,
        node: req(1)?,
        record: CallRecord {
            call_id: req(0)?,
            caller: req(2)?,
            caller_device: device(3),
            dialled: req(8)?,
            callee: text(9),
            answered_by,
            invite_at: at(15).ok_or_else(|| bad("invite_at"))?,
            ringing_at: at(16),
            answered_at: at(17),
            ended_at: at(18).ok_or_else(|| bad("ended_at"))?,
            disposition: Disposition::parse(&req(21)?).ok_or_else(|| bad("disposition"))?,
            final_code: v[22]
                .int()
                .and_then(|c| u16::try_from(c).ok())
                .ok_or_else(|| bad("final_code"))?,
            reason: text(23),
            ended_by,
            media_anchored: v[25].int().unwrap_or(0) != 0,
        },
    })
}

/// Which calls to list: newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallQuery {
    /// Calls made or received by this address of record (`user@domain`).
    pub user: Option<String>,
    /// Calls whose INVITE came at or after this (Unix ms).
    pub since: Option<u64>,
    /// Calls whose INVITE came before this (Unix ms).
    pub until: Option<u64>,
    /// Only calls that ended so.
    pub disposition: Option<Disposition>,
    /// Only rows with an id below this (the `next` cursor of the previous page).
    pub before_id: Option<i64>,
    /// At most this many.
    pub limit: usize,
}

/// The `WHERE ...` of `q` (empty when it selects everything) and its values, with
/// `placeholder(i)` for the i-th value (1-based); then ` ORDER BY id DESC LIMIT n`.
pub(crate) fn query_sql(
    q: &CallQuery,
    placeholder: impl Fn(usize) -> String,
) -> (String, Vec<Val>) {
    let mut conds = Vec::new();
    let mut vals = Vec::new();
    let mut add = |cond: &str, v: Vec<Val>, conds: &mut Vec<String>| {
        // Each `?` of `cond` in turn becomes the placeholder of its value (a placeholder such
        // as SQLite's `?1` must not be taken for the next `?`).
        let mut c = String::new();
        let mut pieces = cond.split('?');
        c.push_str(pieces.next().unwrap_or_default());
        for (piece, v) in pieces.zip(v) {
            vals.push(v);
            c.push_str(&placeholder(vals.len()));
            c.push_str(piece);
        }
        conds.push(c);
    };
    if let Some(u) = &q.user {
        let u = Val::Text(Some(u.clone()));
        add("(caller = ? OR callee = ?)", vec![u.clone(), u], &mut conds);
    }
    if let Some(s) = q.since {
        add("invite_at >= ?", vec![Val::Int(ms(s))], &mut conds);
    }
    if let Some(u) = q.until {
        add("invite_at < ?", vec![Val::Int(ms(u))], &mut conds);
    }
    if let Some(d) = q.disposition {
        add(
            "disposition = ?",
            vec![Val::Text(Some(d.as_str().into()))],
            &mut conds,
        );
    }
    if let Some(b) = q.before_id {
        add("id < ?", vec![Val::Int(Some(b))], &mut conds);
    }
    let mut sql = format!("SELECT {} FROM call_record", select_list());
    if !conds.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conds.join(" AND "));
    }
    sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", q.limit.min(10_000)));
    (sql, vals)
}

/// Call detail records.
#[async_trait]
pub trait CallRecordStore: Send + Sync {
    /// Stores the record of a finished call handled by `node`.
    async fn add_call(&self, node: &str, record: &CallRecord) -> Result<(), StoreError>;
    /// Stores several records at once (all or none where the backend can).
    async fn add_calls(&self, node: &str, records: &[CallRecord]) -> Result<(), StoreError> {
        for r in records {
            self.add_call(node, r).await?;
        }
        Ok(())
    }
    /// The calls `q` selects, newest first.
    async fn calls(&self, q: &CallQuery) -> Result<Vec<StoredCall>, StoreError>;
    /// Removes the records of calls that ended before `ended_before` (Unix ms); returns how
    /// many.
    async fn purge_calls(&self, ended_before: u64) -> Result<u64, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> CallRecord {
        CallRecord {
            call_id: "c1".into(),
            caller: "2002@ward.test".into(),
            caller_device: Device {
                user_agent: Some("Yealink".into()),
                source: Some("192.0.2.1:5060".into()),
                transport: Some("udp".into()),
                ..Device::default()
            },
            dialled: "sip:2001@ward.test".into(),
            callee: Some("2001@ward.test".into()),
            answered_by: Some(Device {
                contact: Some("sip:2001@192.0.2.2".into()),
                ..Device::default()
            }),
            invite_at: 1_000,
            ringing_at: Some(1_100),
            answered_at: Some(2_000),
            ended_at: 9_000,
            disposition: Disposition::Answered,
            final_code: 200,
            reason: None,
            ended_by: EndedBy::Callee,
            media_anchored: true,
        }
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let r = record();
        let v = values("node-a", &r);
        assert_eq!(v.len(), COLUMNS.len());
        let back = record_of(7, &v).unwrap();
        assert_eq!((back.id, back.node.as_str()), (7, "node-a"));
        assert_eq!(back.record, r);
        let unanswered = CallRecord {
            answered_by: None,
            answered_at: None,
            ..r
        };
        assert_eq!(
            record_of(1, &values("n", &unanswered)).unwrap().record,
            unanswered
        );
    }

    #[test]
    fn filters_become_placeholders_in_order() {
        let q = CallQuery {
            user: Some("2001@ward.test".into()),
            since: Some(5),
            disposition: Some(Disposition::Busy),
            before_id: Some(90),
            limit: 50,
            ..CallQuery::default()
        };
        let (sql, vals) = query_sql(&q, |i| format!("${i}"));
        assert!(
            sql.ends_with(
                "WHERE (caller = $1 OR callee = $2) AND invite_at >= $3 AND disposition = $4 \
                 AND id < $5 ORDER BY id DESC LIMIT 50"
            ),
            "{sql}"
        );
        assert_eq!(vals.len(), 5);
        let (sql, _) = query_sql(&q, |i| format!("?{i}"));
        assert!(
            sql.contains("WHERE (caller = ?1 OR callee = ?2) AND invite_at >= ?3"),
            "{sql}"
        );
        let (all, none) = query_sql(
            &CallQuery {
                limit: 10,
                ..CallQuery::default()
            },
            |_| "?".into(),
        );
        assert!(
            all.ends_with("FROM call_record ORDER BY id DESC LIMIT 10"),
            "{all}"
        );
        assert!(none.is_empty());
    }
}
