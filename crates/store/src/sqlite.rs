//! The embedded subscriber store: one SQLite file, opened in WAL mode, through two connections.
//!
//! Authentication lookups run inline under a mutex on their own connection: a primary-key
//! lookup in a local SQLite file takes a few microseconds, less than handing the work to a
//! blocking thread would cost, and in WAL mode a reader never waits for a writer.
//!
//! Everything else (provisioning, call records, audit entries, API keys) runs on a blocking
//! thread with the other connection. A write can wait up to `busy_timeout` for another
//! program's write transaction (the CLI importing users, an operator's `sqlite3` session) and a
//! commit may checkpoint the WAL with `fsync`; run inline, either stopped every SIP message
//! of the runtime's worker for as long (a 3 s lock held elsewhere held OPTIONS for 2.7 s).
//!
//! Authentication lookups share one read transaction for up to [`SNAPSHOT_AGE`]: starting and
//! ending a read transaction for each (file and WAL-index locks, four `fcntl` calls) cost as
//! much as the lookup itself. Every call through the other connection, and every announced
//! change ([`SubscriberStore::refresh`]: this server's CLI tells it over the control socket),
//! ends the snapshot once it is done, so the server's own writes are seen by the next lookup
//! and what a lookup misses is only a change by another program that is at most that old. A
//! user an older snapshot lacks is looked up again in a new one: one just added anywhere
//! registers at once.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use careflow_core::audit::{AuditEntry, AuditEvent};
use careflow_core::cdr::CallRecord;
use rusqlite::{Connection, OptionalExtension, params};

use crate::audit::{self, AuditQuery, AuditStore};
use crate::calls::{self, CallQuery, CallRecordStore, Kind, StoredCall, Val};
use crate::migrations::{SUBSCRIBER_MIGRATIONS, migrate};
use crate::{ApiKey, ApiKeyStore, AuthRow, NewSubscriber, StoreError, Subscriber, SubscriberStore};

/// Where the subscriber store lives, parsed from `DB_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbUrl {
    /// `sqlite://PATH` or `sqlite:PATH`.
    Sqlite(PathBuf),
    /// `postgres://...` (or `postgresql://`).
    Postgres(String),
    /// `mysql://...` (or `mariadb://`).
    Mysql(String),
}

impl DbUrl {
    /// Parses a database URL; the error says what is accepted.
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(p) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            if p.is_empty() {
                return Err(
                    "sqlite URL needs a file path, e.g. sqlite:///var/lib/careflow-sip/careflow.db"
                        .into(),
                );
            }
            return Ok(Self::Sqlite(PathBuf::from(p)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres(url.to_string()));
        }
        if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            return Ok(Self::Mysql(url.to_string()));
        }
        Err("expected sqlite://PATH, postgres://... or mysql://...".into())
    }
}

/// Subscribers in SQLite.
#[derive(Debug)]
pub struct SqliteSubscribers {
    /// Authentication lookups, inline.
    lookups: Mutex<Held>,
    /// Every other call, on a blocking thread.
    writer: Arc<Mutex<Connection>>,
}

/// How long authentication lookups share one read transaction.
const SNAPSHOT_AGE: Duration = Duration::from_millis(100);

/// The connection, and when the read transaction lookups share began.
#[derive(Debug)]
struct Held {
    conn: Connection,
    snapshot_since: Option<Instant>,
    snapshot_age: Duration,
}

impl Held {
    fn end_snapshot(&mut self) {
        if self.snapshot_since.take().is_some()
            && !self.conn.is_autocommit()
            && let Err(e) = self.conn.execute_batch("COMMIT")
        {
            tracing::warn!(error = %e, "sqlite: ending the lookups' read transaction failed");
        }
    }

    /// Puts the connection inside a read transaction at most [`SNAPSHOT_AGE`] old; true
    /// when it had to begin a new one.
    fn begin_if_stale(&mut self) -> Result<bool, StoreError> {
        let fresh = self
            .snapshot_since
            .is_some_and(|t| t.elapsed() < self.snapshot_age)
            && !self.conn.is_autocommit();
        if !fresh {
            self.end_snapshot();
            self.conn.execute_batch("BEGIN")?;
            self.snapshot_since = Some(Instant::now());
        }
        Ok(!fresh)
    }
}

pub(crate) fn open_sqlite(path: &Path) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::unavailable("sqlite", format!("cannot create {}: {e}", dir.display()))
        })?;
    }
    let conn = Connection::open(path).map_err(|e| {
        StoreError::unavailable("sqlite", format!("cannot open {}: {e}", path.display()))
    })?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;",
    )?;
    Ok(conn)
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl SqliteSubscribers {
    /// Opens (creating if needed) and migrates the store.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut writer = open_sqlite(path)?;
        migrate(&mut writer, SUBSCRIBER_MIGRATIONS)?;
        let conn = open_sqlite(path)?;
        // No memory map: a map makes every page a lookup touched part of the server's resident
        // memory (18 MB for 100,000 subscribers: 190 bytes per contact, issue 22), while the
        // subscriber cache already spares the hot path the database. Pages are read into
        // SQLite's own page cache (2 MiB) instead.
        Ok(Self {
            lookups: Mutex::new(Held {
                conn,
                snapshot_since: None,
                snapshot_age: SNAPSHOT_AGE,
            }),
            writer: Arc::new(Mutex::new(writer)),
        })
    }

    fn held(&self) -> Result<std::sync::MutexGuard<'_, Held>, StoreError> {
        self.lookups
            .lock()
            .map_err(|_| StoreError::backend("sqlite", "store lock poisoned"))
    }

    /// Runs `f` on the writer connection, on a blocking thread when there is a runtime (the
    /// caller's task waits, its worker does not), outside any snapshot: it sees every commit
    /// and its writes commit. The lookups' snapshot ends afterwards, so the next lookup sees
    /// what `f` wrote.
    async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let writer = Arc::clone(&self.writer);
        let run = move || {
            let mut c = writer
                .lock()
                .map_err(|_| StoreError::backend("sqlite", "store lock poisoned"))?;
            f(&mut c)
        };
        let result = match tokio::runtime::Handle::try_current() {
            Ok(rt) => rt.spawn_blocking(run).await.unwrap_or_else(|e| {
                Err(StoreError::backend(
                    "sqlite",
                    format!("the store's blocking thread failed: {e}"),
                ))
            }),
            Err(_) => run(),
        };
        self.refresh();
        result
    }

    /// Runs the lookup `f` in the lookups' shared read transaction. What a snapshot that
    /// began earlier lacks is looked for again in a new one: a user just added (by the CLI,
    /// which announces no additions, or another program) registers at once.
    fn lookup_in_snapshot<T>(
        &self,
        f: impl Fn(&Connection) -> Result<Option<T>, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let mut h = self.held()?;
        let began = h.begin_if_stale()?;
        let mut r = f(&h.conn);
        if matches!(r, Ok(None)) && !began {
            h.end_snapshot();
            h.begin_if_stale()?;
            r = f(&h.conn);
        }
        if r.is_err() {
            h.end_snapshot();
        }
        r
    }
}

const COLUMNS: &str = "id, username, domain, email, careflow_user_id, careflow_care4w_id, enabled, ha1_md5, ha1_sha256, created_at, updated_at";

fn row_to_subscriber(r: &rusqlite::Row<'_>) -> rusqlite::Result<Subscriber> {
    Ok(Subscriber {
        id: r.get(0)?,
        username: r.get(1)?,
        domain: r.get(2)?,
        email: r.get(3)?,
        careflow_user_id: r.get(4)?,
        careflow_care4w_id: r.get(5)?,
        enabled: r.get::<_, i64>(6)? != 0,
        ha1_md5: r.get(7)?,
        ha1_sha256: r.get(8)?,
        created_at: r.get(9)?,
        updated_at: r.get(10)?,
    })
}

#[async_trait]
impl SubscriberStore for SqliteSubscribers {
    async fn auth_row(&self, username: &str, domain: &str) -> Result<Option<AuthRow>, StoreError> {
        let query = |c: &Connection| -> Result<Option<AuthRow>, StoreError> {
            let mut st = c.prepare_cached(
                "SELECT enabled, ha1_md5, ha1_sha256 FROM subscriber WHERE username = ?1 AND domain = ?2",
            )?;
            Ok(st
                .query_row(params![username, domain], |r| {
                    Ok(AuthRow {
                        enabled: r.get::<_, i64>(0)? != 0,
                        ha1_md5: r.get(1)?,
                        ha1_sha256: r.get(2)?,
                    })
                })
                .optional()?)
        };
        self.lookup_in_snapshot(query)
    }

    fn refresh(&self) {
        if let Ok(mut h) = self.held() {
            h.end_snapshot();
        }
    }

    async fn find(&self, username: &str, domain: &str) -> Result<Option<Subscriber>, StoreError> {
        let (username, domain) = (username.to_owned(), domain.to_owned());
        self.with(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM subscriber WHERE username = ?1 AND domain = ?2"
            ))?;
            Ok(st
                .query_row(params![username, domain], row_to_subscriber)
                .optional()?)
        })
        .await
    }

    async fn add(&self, s: NewSubscriber) -> Result<(), StoreError> {
        let now = unix_now();
        self.with(move |c| {
            c.execute(
                "INSERT INTO subscriber (username, domain, email, careflow_user_id, careflow_care4w_id, enabled, ha1_md5, ha1_sha256, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?7, ?8, ?8)",
                params![s.username, s.domain, s.email, s.careflow_user_id, s.careflow_care4w_id, s.ha1_md5, s.ha1_sha256, now],
            )
            .map_err(|e| match StoreError::from(e) {
                StoreError::Conflict(_) => StoreError::Conflict(format!("{}@{}", s.username, s.domain)),
                other => other,
            })?;
            Ok(())
        }).await
    }

    async fn set_ha1(
        &self,
        username: &str,
        domain: &str,
        md5: &str,
        sha256: &str,
    ) -> Result<bool, StoreError> {
        let (username, domain) = (username.to_owned(), domain.to_owned());
        let (md5, sha256) = (md5.to_owned(), sha256.to_owned());
        self.with(move |c| {
            Ok(c.execute(
                "UPDATE subscriber SET ha1_md5 = ?3, ha1_sha256 = ?4, updated_at = ?5 WHERE username = ?1 AND domain = ?2",
                params![username, domain, md5, sha256, unix_now()],
            )? > 0)
        }).await
    }

    async fn set_enabled(
        &self,
        username: &str,
        domain: &str,
        enabled: bool,
    ) -> Result<bool, StoreError> {
        let (username, domain) = (username.to_owned(), domain.to_owned());
        self.with(move |c| {
            Ok(c.execute(
                "UPDATE subscriber SET enabled = ?3, updated_at = ?4 WHERE username = ?1 AND domain = ?2",
                params![username, domain, i64::from(enabled), unix_now()],
            )? > 0)
        }).await
    }

    async fn remove(&self, username: &str, domain: &str) -> Result<bool, StoreError> {
        let (username, domain) = (username.to_owned(), domain.to_owned());
        self.with(move |c| {
            Ok(c.execute(
                "DELETE FROM subscriber WHERE username = ?1 AND domain = ?2",
                params![username, domain],
            )? > 0)
        })
        .await
    }

    async fn list(&self) -> Result<Vec<Subscriber>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {COLUMNS} FROM subscriber ORDER BY domain, username"
            ))?;
            let rows = st.query_map([], row_to_subscriber)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn find_by_careflow_user(&self, user_id: &str) -> Result<Option<Subscriber>, StoreError> {
        let user_id = user_id.to_owned();
        self.with(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM subscriber WHERE careflow_user_id = ?1"
            ))?;
            Ok(st
                .query_row(params![user_id], row_to_subscriber)
                .optional()?)
        })
        .await
    }

    async fn search(
        &self,
        query: &str,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<Subscriber>, StoreError> {
        let pattern = crate::like_pattern(query);
        self.with(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM subscriber
                 WHERE username LIKE ?1 ESCAPE '\\' OR email LIKE ?1 ESCAPE '\\'
                    OR careflow_user_id LIKE ?1 ESCAPE '\\'
                 ORDER BY username, domain LIMIT ?2 OFFSET ?3"
            ))?;
            let rows = st.query_map(
                params![pattern, limit as i64, offset as i64],
                row_to_subscriber,
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn import(&self, rows: Vec<NewSubscriber>) -> Result<usize, StoreError> {
        let now = unix_now();
        self.with(move |c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare(
                    "INSERT INTO subscriber (username, domain, email, careflow_user_id, careflow_care4w_id, enabled, ha1_md5, ha1_sha256, created_at, updated_at)
                     VALUES (?1, ?2, ?3, NULL, NULL, 1, ?4, ?5, ?6, ?6)
                     ON CONFLICT (username, domain) DO UPDATE SET
                        ha1_md5 = excluded.ha1_md5, ha1_sha256 = excluded.ha1_sha256,
                        email = COALESCE(excluded.email, subscriber.email), updated_at = excluded.updated_at",
                )?;
                for s in &rows {
                    st.execute(params![s.username, s.domain, s.email, s.ha1_md5, s.ha1_sha256, now])?;
                }
            }
            tx.commit()?;
            Ok(rows.len())
        }).await
    }
}

#[async_trait]
impl ApiKeyStore for SqliteSubscribers {
    async fn create_key(&self, name: &str, sha256_hex: &str) -> Result<(), StoreError> {
        let (name, sha256_hex) = (name.to_owned(), sha256_hex.to_owned());
        self.with(move |c| {
            c.execute(
                "INSERT INTO api_key (name, key_sha256, created_at) VALUES (?1, ?2, ?3)",
                params![name, sha256_hex, unix_now()],
            )
            .map_err(|e| match StoreError::from(e) {
                StoreError::Conflict(_) => StoreError::Conflict(format!("API key {name}")),
                other => other,
            })?;
            Ok(())
        })
        .await
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT name, created_at, revoked_at FROM api_key ORDER BY name")?;
            let rows = st.query_map([], |r| {
                Ok(ApiKey {
                    name: r.get(0)?,
                    created_at: r.get(1)?,
                    revoked_at: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn revoke_key(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_owned();
        self.with(move |c| {
            Ok(c.execute(
                "UPDATE api_key SET revoked_at = ?2 WHERE name = ?1 AND revoked_at IS NULL",
                params![name, unix_now()],
            )? > 0)
        })
        .await
    }

    async fn key_name(&self, sha256_hex: &str) -> Result<Option<String>, StoreError> {
        let sha256_hex = sha256_hex.to_owned();
        self.with(move |c| {
            Ok(c.query_row(
                "SELECT name FROM api_key WHERE key_sha256 = ?1 AND revoked_at IS NULL",
                params![sha256_hex],
                |r| r.get(0),
            )
            .optional()?)
        })
        .await
    }
}

fn sqlite_value(v: &Val) -> rusqlite::types::Value {
    use rusqlite::types::Value;
    match v {
        Val::Text(Some(t)) => Value::Text(t.clone()),
        Val::Int(Some(i)) => Value::Integer(*i),
        Val::Text(None) | Val::Int(None) => Value::Null,
    }
}

#[async_trait]
impl CallRecordStore for SqliteSubscribers {
    async fn add_call(&self, node: &str, record: &CallRecord) -> Result<(), StoreError> {
        self.add_calls(node, std::slice::from_ref(record)).await
    }

    async fn add_calls(&self, node: &str, records: &[CallRecord]) -> Result<(), StoreError> {
        // Built once: a batch is written every 100 ms while calls end.
        static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let sql = SQL.get_or_init(|| calls::insert_sql(|i| format!("?{i}")));
        let rows: Vec<Vec<rusqlite::types::Value>> = records
            .iter()
            .map(|r| sqlite_values(&calls::values(node, r)))
            .collect();
        self.with(move |c| {
            // One transaction and one prepared statement for the batch: a commit per call
            // cost more than the rest of the call.
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(sql)?;
                for params in rows {
                    st.execute(rusqlite::params_from_iter(params))?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn calls(&self, q: &CallQuery) -> Result<Vec<StoredCall>, StoreError> {
        let (sql, vals) = calls::query_sql(q, |i| format!("?{i}"));
        let params: Vec<rusqlite::types::Value> = vals.iter().map(sqlite_value).collect();
        self.with(move |c| {
            let mut st = c.prepare(&sql)?;
            let rows = st.query_map(rusqlite::params_from_iter(params), |r| {
                let id: i64 = r.get(0)?;
                let mut v = Vec::with_capacity(calls::COLUMNS.len());
                for (i, (_, kind)) in calls::COLUMNS.iter().enumerate() {
                    v.push(match kind {
                        Kind::Text => Val::Text(r.get(i + 1)?),
                        Kind::Int => Val::Int(r.get(i + 1)?),
                    });
                }
                Ok((id, v))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, v) = row?;
                out.push(calls::record_of(id, &v)?);
            }
            Ok(out)
        })
        .await
    }

    async fn purge_calls(&self, ended_before: u64) -> Result<u64, StoreError> {
        let before = i64::try_from(ended_before).unwrap_or(i64::MAX);
        self.with(move |c| {
            let n = c.execute("DELETE FROM call_record WHERE ended_at < ?1", [before])?;
            Ok(n as u64)
        })
        .await
    }
}

#[async_trait]
impl crate::devices::Sql for SqliteSubscribers {
    fn mark(&self, i: usize) -> String {
        format!("?{i}")
    }

    async fn exec(&self, sql: String, vals: Vec<Val>) -> Result<u64, StoreError> {
        let params = sqlite_values(&vals);
        self.with(move |c| {
            let n = c
                .prepare_cached(&sql)?
                .execute(rusqlite::params_from_iter(params))?;
            Ok(n as u64)
        })
        .await
    }

    async fn rows(
        &self,
        sql: String,
        vals: Vec<Val>,
        kinds: &'static [Kind],
    ) -> Result<Vec<Vec<Val>>, StoreError> {
        let params = sqlite_values(&vals);
        self.with(move |c| {
            let mut st = c.prepare_cached(&sql)?;
            let rows = st.query_map(rusqlite::params_from_iter(params), |r| {
                let mut v = Vec::with_capacity(kinds.len());
                for (i, kind) in kinds.iter().enumerate() {
                    v.push(match kind {
                        Kind::Text => Val::Text(r.get(i)?),
                        Kind::Int => Val::Int(r.get(i)?),
                    });
                }
                Ok(v)
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }
}

fn sqlite_values(v: &[Val]) -> Vec<rusqlite::types::Value> {
    v.iter().map(sqlite_value).collect()
}

fn audit_rows(
    c: &mut Connection,
    sql: &str,
    params: Vec<rusqlite::types::Value>,
) -> Result<Vec<AuditEntry>, StoreError> {
    let mut st = c.prepare(sql)?;
    let rows = st.query_map(rusqlite::params_from_iter(params), |r| {
        let mut v = Vec::with_capacity(10);
        for i in 0..10 {
            v.push(match i {
                0 | 1 => Val::Int(r.get(i)?),
                _ => Val::Text(r.get(i)?),
            });
        }
        Ok(v)
    })?;
    let mut out = Vec::new();
    for row in rows {
        out.push(audit::entry_of(&row?)?);
    }
    Ok(out)
}

#[async_trait]
impl AuditStore for SqliteSubscribers {
    async fn append_audit(&self, at: u64, event: AuditEvent) -> Result<AuditEntry, StoreError> {
        audit::append_with(
            at,
            event,
            || async {
                self.with(|c| {
                    Ok(c.query_row(
                        "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
                        [],
                        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
                    )
                    .optional()?
                    .map(|(s, h)| (u64::try_from(s).unwrap_or(0), h)))
                })
                .await
            },
            |entry| async move {
                let params = sqlite_values(&audit::values(&entry));
                let inserted = self
                    .with(move |c| {
                        c.execute(
                            &audit::insert_sql(|i| format!("?{i}")),
                            rusqlite::params_from_iter(params),
                        )?;
                        Ok(())
                    })
                    .await;
                match inserted {
                    Ok(()) => Ok(true),
                    Err(StoreError::Conflict(_)) => Ok(false),
                    Err(e) => Err(e),
                }
            },
        )
        .await
    }

    async fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let sql = format!(
            "SELECT {} FROM audit_log WHERE seq > ?1 ORDER BY seq LIMIT {}",
            audit::COLUMNS,
            limit.min(100_000)
        );
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        self.with(move |c| audit_rows(c, &sql, vec![rusqlite::types::Value::Integer(after)]))
            .await
    }

    async fn audit_entries(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let (sql, vals) = audit::query_sql(q, |i| format!("?{i}"));
        self.with(move |c| audit_rows(c, &sql, sqlite_values(&vals)))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(u: &str) -> NewSubscriber {
        NewSubscriber {
            username: u.into(),
            domain: "example.com".into(),
            email: None,
            careflow_user_id: Some("uid".into()),
            careflow_care4w_id: None,
            ha1_md5: "a".repeat(32),
            ha1_sha256: "b".repeat(64),
        }
    }

    #[tokio::test]
    async fn lookups_share_a_snapshot_that_writes_and_announced_changes_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("careflow.db");
        let s = SqliteSubscribers::open(&path).unwrap();
        // Long enough that this test never races the snapshot's own end.
        s.held().unwrap().snapshot_age = Duration::from_secs(600);
        let add = |u: &str| NewSubscriber {
            careflow_user_id: None,
            ..sub(u)
        };
        let found = |u: &'static str| {
            let s = &s;
            async move { s.auth_row(u, "example.com").await.unwrap().is_some() }
        };
        s.add(add("alice")).await.unwrap();
        s.add(add("bob")).await.unwrap();
        assert!(found("alice").await);
        // Another process (the CLI) changes bob: lookups in the snapshot do not see it yet...
        let cli = SqliteSubscribers::open(&path).unwrap();
        cli.set_enabled("bob", "example.com", false).await.unwrap();
        let enabled = |u: &'static str| {
            let s = &s;
            async move { s.auth_row(u, "example.com").await.unwrap().unwrap().enabled }
        };
        assert!(enabled("bob").await);
        // ...until the change is announced.
        s.refresh();
        assert!(!enabled("bob").await);
        // A user another process adds is found at once: a miss looks again outside the
        // snapshot.
        assert!(found("alice").await);
        cli.add(add("erin")).await.unwrap();
        assert!(found("erin").await);
        // This store's own calls end the snapshot before they run: its writes commit at once
        // and are seen by the next lookup, and by other processes.
        s.add(add("carol")).await.unwrap();
        assert!(cli.find("carol", "example.com").await.unwrap().is_some());
        assert!(found("carol").await);
        cli.set_enabled("carol", "example.com", false)
            .await
            .unwrap();
        assert!(
            s.find("carol", "example.com")
                .await
                .unwrap()
                .is_some_and(|c| !c.enabled)
        );
        // A snapshot lasts its age at most.
        cli.add(add("dave")).await.unwrap();
        s.held().unwrap().snapshot_age = Duration::ZERO;
        assert!(found("dave").await);
    }

    /// Another program's write transaction (the CLI importing users, an operator's `sqlite3`
    /// session) makes a write wait for up to `busy_timeout`. The runtime's one thread is not
    /// held meanwhile (run inline, the write held it until it failed), lookups still answer,
    /// and the write lands once the lock is gone.
    #[tokio::test(flavor = "current_thread")]
    async fn a_write_waiting_for_another_programs_lock_holds_neither_the_runtime_nor_lookups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("careflow.db");
        let s = Arc::new(SqliteSubscribers::open(&path).unwrap());
        let sub = |u: &str| NewSubscriber {
            careflow_user_id: None,
            ..sub(u)
        };
        s.add(sub("alice")).await.unwrap();
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let write = {
            let s = Arc::clone(&s);
            tokio::spawn(async move { s.add(sub("bob")).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !write.is_finished(),
            "the write neither waits for the lock nor lets this task run meanwhile"
        );
        assert!(s.auth_row("alice", "example.com").await.unwrap().is_some());
        assert!(s.auth_row("bob", "example.com").await.unwrap().is_none());
        other.execute_batch("COMMIT").unwrap();
        write.await.unwrap().unwrap();
        assert!(s.auth_row("bob", "example.com").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn crud_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db/careflow.db");
        let s = SqliteSubscribers::open(&path).unwrap();
        s.add(sub("alice")).await.unwrap();
        assert!(matches!(
            s.add(sub("alice")).await,
            Err(StoreError::Conflict(_))
        ));
        assert!(s.set_enabled("alice", "example.com", false).await.unwrap());
        assert!(
            !s.find("alice", "example.com")
                .await
                .unwrap()
                .unwrap()
                .enabled
        );
        assert!(s.set_ha1("alice", "example.com", "c", "d").await.unwrap());
        assert_eq!(s.import(vec![sub("bob"), sub("alice")]).await.unwrap(), 2);
        drop(s);
        let s = SqliteSubscribers::open(&path).unwrap();
        let all = s.list().await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].username, "alice");
        assert_eq!(all[0].ha1_md5, "a".repeat(32));
        assert!(s.remove("bob", "example.com").await.unwrap());
        assert!(!s.remove("bob", "example.com").await.unwrap());
        assert!(s.find("bob", "example.com").await.unwrap().is_none());
    }

    #[test]
    fn urls() {
        assert_eq!(
            DbUrl::parse("sqlite:///tmp/x.db").unwrap(),
            DbUrl::Sqlite("/tmp/x.db".into())
        );
        assert_eq!(
            DbUrl::parse("sqlite:data/x.db").unwrap(),
            DbUrl::Sqlite("data/x.db".into())
        );
        assert!(matches!(
            DbUrl::parse("postgres://h/db").unwrap(),
            DbUrl::Postgres(_)
        ));
        assert!(DbUrl::parse("http://x").is_err());
        assert!(DbUrl::parse("sqlite://").is_err());
    }
}
