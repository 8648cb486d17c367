//! The audit trail (issue 20) in the subscriber database: `audit_log`, one row per entry of
//! the hash chain (`careflow_core::audit`), the same columns on SQLite, PostgreSQL and MySQL.
//! Appending reads the chain's head and inserts the next `seq`; two writers racing for the
//! same `seq` (two nodes, or the CLI beside the server) meet the primary key, and the loser
//! reads the new head and tries again.

use std::future::Future;

use async_trait::async_trait;
use careflow_core::audit::{AuditEntry, AuditEvent};

use crate::StoreError;
use crate::calls::Val;

/// The columns of `audit_log`, in the order of [`values`] and [`entry_of`].
pub(crate) const COLUMNS: &str =
    "seq, at_ms, actor, source, action, target, outcome, detail, prev_hash, hash";

/// How often an append is tried again after losing the race for its `seq`.
pub(crate) const APPEND_TRIES: usize = 20;

/// `INSERT INTO audit_log (...) VALUES (...)` with `placeholder(i)` for the i-th value.
pub(crate) fn insert_sql(placeholder: impl Fn(usize) -> String) -> String {
    let marks: Vec<String> = (1..=10).map(placeholder).collect();
    format!(
        "INSERT INTO audit_log ({COLUMNS}) VALUES ({})",
        marks.join(", ")
    )
}

fn int(v: u64) -> Val {
    Val::Int(i64::try_from(v).ok())
}

fn text(s: &str) -> Val {
    Val::Text(Some(s.to_string()))
}

/// The values of an entry's columns.
pub(crate) fn values(e: &AuditEntry) -> Vec<Val> {
    vec![
        int(e.seq),
        int(e.at),
        text(&e.event.actor),
        text(&e.event.source),
        text(&e.event.action),
        text(&e.event.target),
        text(&e.event.outcome),
        text(&e.event.detail),
        text(&e.prev_hash),
        text(&e.hash),
    ]
}

/// The entry of a row's values (in [`COLUMNS`] order).
pub(crate) fn entry_of(v: &[Val]) -> Result<AuditEntry, StoreError> {
    let bad = || StoreError::backend("audit log", "a row with missing columns");
    if v.len() != 10 {
        return Err(bad());
    }
    let t = |i: usize| match &v[i] {
        Val::Text(t) => t.clone().unwrap_or_default(),
        Val::Int(i) => i.map(|i| i.to_string()).unwrap_or_default(),
    };
    let n = |i: usize| match &v[i] {
        Val::Int(Some(n)) => u64::try_from(*n).ok(),
        Val::Text(Some(s)) => s.parse().ok(),
        _ => None,
    };
    Ok(AuditEntry {
        seq: n(0).ok_or_else(bad)?,
        at: n(1).ok_or_else(bad)?,
        event: AuditEvent {
            actor: t(2),
            source: t(3),
            action: t(4),
            target: t(5),
            outcome: t(6),
            detail: t(7),
        },
        prev_hash: t(8),
        hash: t(9),
    })
}

/// Which entries to list: newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Entries of this actor.
    pub actor: Option<String>,
    /// Entries of this action (`credentials.rotated`).
    pub action: Option<String>,
    /// Entries about this target.
    pub target: Option<String>,
    /// At or after this time (Unix ms).
    pub since: Option<u64>,
    /// Before this time (Unix ms).
    pub until: Option<u64>,
    /// Only entries with a `seq` below this (the previous page's `next`).
    pub before_seq: Option<u64>,
    /// At most this many.
    pub limit: usize,
}

/// The `SELECT` of `q` and its values, with `placeholder(i)` for the i-th value.
pub(crate) fn query_sql(
    q: &AuditQuery,
    placeholder: impl Fn(usize) -> String,
) -> (String, Vec<Val>) {
    let mut conds: Vec<String> = Vec::new();
    let mut vals: Vec<Val> = Vec::new();
    let mut add = |col: &str, op: &str, v: Val| {
        vals.push(v);
        conds.push(format!("{col} {op} {}", placeholder(vals.len())));
    };
    if let Some(a) = &q.actor {
        add("actor", "=", text(a));
    }
    if let Some(a) = &q.action {
        add("action", "=", text(a));
    }
    if let Some(t) = &q.target {
        add("target", "=", text(t));
    }
    if let Some(s) = q.since {
        add("at_ms", ">=", int(s));
    }
    if let Some(u) = q.until {
        add("at_ms", "<", int(u));
    }
    if let Some(b) = q.before_seq {
        add("seq", "<", int(b));
    }
    let mut sql = format!("SELECT {COLUMNS} FROM audit_log");
    if !conds.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conds.join(" AND "));
    }
    sql.push_str(&format!(" ORDER BY seq DESC LIMIT {}", q.limit.min(10_000)));
    (sql, vals)
}

/// The audit trail.
#[async_trait]
pub trait AuditStore: Send + Sync {
    /// Appends `event`, happened at `at` (Unix ms), to the chain; returns its entry.
    async fn append_audit(&self, at: u64, event: AuditEvent) -> Result<AuditEntry, StoreError>;
    /// Up to `limit` entries with a `seq` above `after`, in `seq` order (to verify the chain
    /// page by page).
    async fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;
    /// The entries `q` selects, newest first.
    async fn audit_entries(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError>;
}

/// Appends with `head` (the newest `(seq, hash)`) and `insert` (false: the `seq` was taken),
/// retrying while other writers win the race.
pub(crate) async fn append_with<H, I, HF, IF>(
    at: u64,
    event: AuditEvent,
    head: H,
    insert: I,
) -> Result<AuditEntry, StoreError>
where
    H: Fn() -> HF,
    HF: Future<Output = Result<Option<(u64, String)>, StoreError>>,
    I: Fn(AuditEntry) -> IF,
    IF: Future<Output = Result<bool, StoreError>>,
{
    for _ in 0..APPEND_TRIES {
        let last = head().await?;
        let entry = careflow_core::audit::next_entry(
            last.as_ref().map(|(s, h)| (*s, h.as_str())),
            at,
            event.clone(),
        );
        if insert(entry.clone()).await? {
            return Ok(entry);
        }
    }
    Err(StoreError::unavailable(
        "audit log",
        "too many concurrent writers: the entry was not appended",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_reads_back_and_filters_bind_in_order() {
        let e = careflow_core::audit::next_entry(
            None,
            5,
            AuditEvent {
                actor: "cli".into(),
                action: "apikey.created".into(),
                ..AuditEvent::default()
            },
        );
        assert_eq!(entry_of(&values(&e)).unwrap(), e);
        let q = AuditQuery {
            action: Some("apikey.created".into()),
            before_seq: Some(9),
            limit: 5,
            ..AuditQuery::default()
        };
        let (sql, vals) = query_sql(&q, |i| format!("${i}"));
        assert!(
            sql.ends_with("WHERE action = $1 AND seq < $2 ORDER BY seq DESC LIMIT 5"),
            "{sql}"
        );
        assert_eq!(vals.len(), 2);
    }
}
