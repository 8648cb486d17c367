//! Subscribers and API keys in MySQL or MariaDB (`DB_URL=mysql://...`). Same tables and
//! migration versions as the embedded store; the pool reconnects by itself after an outage,
//! and every call is bounded in time so an unreachable server fails fast.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use careflow_core::audit::{AuditEntry, AuditEvent};
use careflow_core::cdr::CallRecord;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Pool};

use crate::audit::{self, AuditQuery, AuditStore};
use crate::calls::{self, CallQuery, CallRecordStore, Kind, StoredCall, Val};
use crate::like_pattern;
use crate::sqlite::unix_now;
use crate::{ApiKey, ApiKeyStore, NewSubscriber, StoreError, Subscriber, SubscriberStore};

/// (version, statements) in MySQL's dialect; the versions match the SQLite steps. MySQL runs
/// DDL outside transactions, so each step is a list of single statements.
const MIGRATIONS: &[(i64, &[&str])] = &[
    (
        1,
        &["CREATE TABLE subscriber (
            id BIGINT AUTO_INCREMENT PRIMARY KEY,
            username VARCHAR(128) NOT NULL,
            domain VARCHAR(255) NOT NULL,
            email VARCHAR(255),
            careflow_user_id VARCHAR(255),
            careflow_care4w_id VARCHAR(255),
            enabled TINYINT(1) NOT NULL DEFAULT 1,
            ha1_md5 CHAR(32) NOT NULL,
            ha1_sha256 CHAR(64) NOT NULL,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            UNIQUE KEY uq_subscriber (username, domain),
            KEY idx_subscriber_careflow_user (careflow_user_id)
        ) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"],
    ),
    (
        2,
        &[
            "DROP INDEX idx_subscriber_careflow_user ON subscriber",
            // A UNIQUE index allows many NULLs in MySQL, like the partial index elsewhere.
            "CREATE UNIQUE INDEX idx_subscriber_careflow_user ON subscriber (careflow_user_id)",
            "CREATE TABLE api_key (
                id BIGINT AUTO_INCREMENT PRIMARY KEY,
                name VARCHAR(64) NOT NULL UNIQUE,
                key_sha256 CHAR(64) NOT NULL UNIQUE,
                created_at BIGINT NOT NULL,
                revoked_at BIGINT
            ) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
        ],
    ),
    // Call detail records (issue 20): one row per call, times in Unix milliseconds.
    (
        3,
        &["CREATE TABLE call_record (
                id BIGINT AUTO_INCREMENT PRIMARY KEY,
                call_id VARCHAR(255) NOT NULL,
                node VARCHAR(255) NOT NULL,
                caller VARCHAR(255) NOT NULL,
                caller_instance VARCHAR(255),
                caller_user_agent TEXT,
                caller_source VARCHAR(255),
                caller_transport VARCHAR(16),
                caller_contact TEXT,
                dialled TEXT NOT NULL,
                callee VARCHAR(255),
                answer_instance VARCHAR(255),
                answer_user_agent TEXT,
                answer_source VARCHAR(255),
                answer_transport VARCHAR(16),
                answer_contact TEXT,
                invite_at BIGINT NOT NULL,
                ringing_at BIGINT,
                answered_at BIGINT,
                ended_at BIGINT NOT NULL,
                setup_ms BIGINT NOT NULL,
                talk_seconds BIGINT NOT NULL,
                disposition VARCHAR(16) NOT NULL,
                final_code BIGINT NOT NULL,
                reason TEXT,
                ended_by VARCHAR(16) NOT NULL,
                media_anchored BIGINT NOT NULL,
                KEY idx_call_record_invite (invite_at),
                KEY idx_call_record_ended (ended_at),
                KEY idx_call_record_caller (caller, id),
                KEY idx_call_record_callee (callee, id)
            ) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"],
    ),
    // The audit trail (issue 20): a hash chain, `seq` assigned by the writer.
    (
        4,
        &["CREATE TABLE audit_log (
                seq BIGINT PRIMARY KEY,
                at_ms BIGINT NOT NULL,
                actor VARCHAR(255) NOT NULL,
                source VARCHAR(255) NOT NULL,
                action VARCHAR(64) NOT NULL,
                target VARCHAR(255) NOT NULL,
                outcome VARCHAR(255) NOT NULL,
                detail TEXT NOT NULL,
                prev_hash CHAR(64) NOT NULL,
                hash CHAR(64) NOT NULL,
                KEY idx_audit_log_at (at_ms),
                KEY idx_audit_log_actor (actor, seq),
                KEY idx_audit_log_target (target, seq)
            ) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"],
    ),
    (
        5,
        &["CREATE TABLE device (
                mac CHAR(12) PRIMARY KEY,
                model VARCHAR(64) NOT NULL,
                username VARCHAR(255) NOT NULL,
                domain VARCHAR(255) NOT NULL,
                label VARCHAR(255),
                blf TEXT NOT NULL,
                generation BIGINT NOT NULL,
                ha1_md5 CHAR(32) NOT NULL,
                ha1_sha256 CHAR(64) NOT NULL,
                prev_ha1_md5 CHAR(32),
                prev_ha1_sha256 CHAR(64),
                prev_valid_until BIGINT,
                prov_ha1_md5 CHAR(32) NOT NULL,
                prov_ha1_sha256 CHAR(64) NOT NULL,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                last_fetch_at BIGINT,
                last_fetch_from VARCHAR(255),
                shared BIGINT NOT NULL DEFAULT 0,
                KEY idx_device_user (username, domain)
            ) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"],
    ),
];

const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Subscribers in MySQL/MariaDB.
pub struct MysqlSubscribers {
    pool: Pool,
}

impl std::fmt::Debug for MysqlSubscribers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlSubscribers").finish_non_exhaustive()
    }
}

fn db_err(e: mysql_async::Error) -> StoreError {
    match e {
        mysql_async::Error::Server(s) if s.code == 1062 => StoreError::Conflict(s.message),
        // The server answered: the request itself failed.
        other @ mysql_async::Error::Server(_) => StoreError::backend("mysql", other),
        other => StoreError::unavailable("mysql", other),
    }
}

type SubscriberRow = (
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    bool,
    String,
    String,
    i64,
    i64,
);

fn subscriber(r: SubscriberRow) -> Subscriber {
    Subscriber {
        id: r.0,
        username: r.1,
        domain: r.2,
        email: r.3,
        careflow_user_id: r.4,
        careflow_care4w_id: r.5,
        enabled: r.6,
        ha1_md5: r.7,
        ha1_sha256: r.8,
        created_at: r.9,
        updated_at: r.10,
    }
}

const COLUMNS: &str = "id, username, domain, email, careflow_user_id, careflow_care4w_id, enabled, ha1_md5, ha1_sha256, created_at, updated_at";

impl MysqlSubscribers {
    /// Connects (`mariadb://` is accepted as `mysql://`) and applies pending migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let url = url.replacen("mariadb://", "mysql://", 1);
        let opts = mysql_async::Opts::from_url(&url)
            .map_err(|e| StoreError::Invalid(format!("DB_URL: {e}")))?;
        let me = Self {
            pool: Pool::new(opts),
        };
        me.call(|mut c| async move { migrate(&mut c).await })
            .await?;
        Ok(me)
    }

    /// Runs `f` on a pooled connection, within [`CALL_TIMEOUT`].
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        tokio::time::timeout(CALL_TIMEOUT, async {
            let conn = self.pool.get_conn().await.map_err(db_err)?;
            f(conn).await
        })
        .await
        .map_err(|_| StoreError::unavailable("mysql", "timed out"))?
    }
}

async fn migrate(c: &mut Conn) -> Result<i64, StoreError> {
    let locked: Option<i64> = c
        .query_first("SELECT GET_LOCK('careflow_migrations', 30)")
        .await
        .map_err(db_err)?;
    if locked != Some(1) {
        return Err(StoreError::unavailable(
            "mysql",
            "could not take the migration lock (another node is migrating)",
        ));
    }
    let result = async {
        c.query_drop(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .await
        .map_err(db_err)?;
        let current: Option<i64> = c
            .query_first("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            .await
            .map_err(db_err)?;
        let current = current.unwrap_or(0);
        let mut version = current;
        for (v, statements) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            for sql in *statements {
                c.query_drop(*sql).await.map_err(db_err)?;
            }
            c.exec_drop(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (*v, unix_now()),
            )
            .await
            .map_err(db_err)?;
            version = *v;
        }
        Ok(version)
    }
    .await;
    let _ = c
        .query_drop("SELECT RELEASE_LOCK('careflow_migrations')")
        .await;
    result
}

#[async_trait]
impl SubscriberStore for MysqlSubscribers {
    async fn find(&self, username: &str, domain: &str) -> Result<Option<Subscriber>, StoreError> {
        let (u, d) = (username.to_string(), domain.to_string());
        self.call(|mut c| async move {
            let r: Option<SubscriberRow> = c
                .exec_first(
                    format!("SELECT {COLUMNS} FROM subscriber WHERE username = ? AND domain = ?"),
                    (u, d),
                )
                .await
                .map_err(db_err)?;
            Ok(r.map(subscriber))
        })
        .await
    }

    async fn add(&self, s: NewSubscriber) -> Result<(), StoreError> {
        let who = format!("{}@{}", s.username, s.domain);
        self.call(|mut c| async move {
            let now = unix_now();
            c.exec_drop(
                "INSERT INTO subscriber (username, domain, email, careflow_user_id, careflow_care4w_id, enabled, ha1_md5, ha1_sha256, created_at, updated_at)
                 VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?)",
                (s.username, s.domain, s.email, s.careflow_user_id, s.careflow_care4w_id, s.ha1_md5, s.ha1_sha256, now, now),
            )
            .await
            .map_err(|e| match db_err(e) {
                StoreError::Conflict(_) => StoreError::Conflict(who),
                other => other,
            })
        })
        .await
    }

    async fn set_ha1(
        &self,
        username: &str,
        domain: &str,
        md5: &str,
        sha256: &str,
    ) -> Result<bool, StoreError> {
        let p = (
            md5.to_string(),
            sha256.to_string(),
            unix_now(),
            username.to_string(),
            domain.to_string(),
        );
        self.call(|mut c| async move {
            c.exec_drop(
                "UPDATE subscriber SET ha1_md5 = ?, ha1_sha256 = ?, updated_at = ? WHERE username = ? AND domain = ?",
                p,
            )
            .await
            .map_err(db_err)?;
            Ok(c.affected_rows() > 0)
        })
        .await
    }

    async fn set_enabled(
        &self,
        username: &str,
        domain: &str,
        enabled: bool,
    ) -> Result<bool, StoreError> {
        let p = (
            enabled,
            unix_now(),
            username.to_string(),
            domain.to_string(),
        );
        self.call(|mut c| async move {
            // A repeated disable changes no row; "found" is what the caller asks.
            let found: Option<i64> = c
                .exec_first(
                    "SELECT id FROM subscriber WHERE username = ? AND domain = ?",
                    (p.2.clone(), p.3.clone()),
                )
                .await
                .map_err(db_err)?;
            c.exec_drop(
                "UPDATE subscriber SET enabled = ?, updated_at = ? WHERE username = ? AND domain = ?",
                p,
            )
            .await
            .map_err(db_err)?;
            Ok(found.is_some())
        })
        .await
    }

    async fn remove(&self, username: &str, domain: &str) -> Result<bool, StoreError> {
        let p = (username.to_string(), domain.to_string());
        self.call(|mut c| async move {
            c.exec_drop(
                "DELETE FROM subscriber WHERE username = ? AND domain = ?",
                p,
            )
            .await
            .map_err(db_err)?;
            Ok(c.affected_rows() > 0)
        })
        .await
    }

    async fn list(&self) -> Result<Vec<Subscriber>, StoreError> {
        self.call(|mut c| async move {
            let rows: Vec<SubscriberRow> = c
                .query(format!(
                    "SELECT {COLUMNS} FROM subscriber ORDER BY domain, username"
                ))
                .await
                .map_err(db_err)?;
            Ok(rows.into_iter().map(subscriber).collect())
        })
        .await
    }

    async fn import(&self, rows: Vec<NewSubscriber>) -> Result<usize, StoreError> {
        let n = rows.len();
        let conn = self.pool.get_conn().await.map_err(db_err)?;
        let mut c = conn;
        let mut tx = c
            .start_transaction(mysql_async::TxOpts::default())
            .await
            .map_err(db_err)?;
        let now = unix_now();
        for s in rows {
            let who = format!("{}@{}", s.username, s.domain);
            // As in the embedded store: existing users get the imported digests (and e-mail).
            tx.exec_drop(
                "INSERT INTO subscriber (username, domain, email, careflow_user_id, careflow_care4w_id, enabled, ha1_md5, ha1_sha256, created_at, updated_at)
                 VALUES (?, ?, ?, NULL, NULL, 1, ?, ?, ?, ?)
                 ON DUPLICATE KEY UPDATE ha1_md5 = VALUES(ha1_md5), ha1_sha256 = VALUES(ha1_sha256),
                    email = COALESCE(VALUES(email), email), updated_at = VALUES(updated_at)",
                (s.username, s.domain, s.email, s.ha1_md5, s.ha1_sha256, now, now),
            )
            .await
            .map_err(|e| match db_err(e) {
                StoreError::Conflict(_) => StoreError::Conflict(who),
                other => other,
            })?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(n)
    }

    async fn find_by_careflow_user(&self, user_id: &str) -> Result<Option<Subscriber>, StoreError> {
        let id = user_id.to_string();
        self.call(|mut c| async move {
            let r: Option<SubscriberRow> = c
                .exec_first(
                    format!("SELECT {COLUMNS} FROM subscriber WHERE careflow_user_id = ?"),
                    (id,),
                )
                .await
                .map_err(db_err)?;
            Ok(r.map(subscriber))
        })
        .await
    }

    async fn search(
        &self,
        query: &str,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<Subscriber>, StoreError> {
        let pattern = like_pattern(query);
        self.call(|mut c| async move {
            let rows: Vec<SubscriberRow> = c
                .exec(
                    format!(
                        "SELECT {COLUMNS} FROM subscriber
                         WHERE username LIKE ? OR email LIKE ? OR careflow_user_id LIKE ?
                         ORDER BY username, domain LIMIT ? OFFSET ?"
                    ),
                    (
                        pattern.clone(),
                        pattern.clone(),
                        pattern,
                        limit as u64,
                        offset as u64,
                    ),
                )
                .await
                .map_err(db_err)?;
            Ok(rows.into_iter().map(subscriber).collect())
        })
        .await
    }
}

#[async_trait]
impl ApiKeyStore for MysqlSubscribers {
    async fn create_key(&self, name: &str, sha256_hex: &str) -> Result<(), StoreError> {
        let p = (name.to_string(), sha256_hex.to_string(), unix_now());
        self.call(|mut c| async move {
            c.exec_drop(
                "INSERT INTO api_key (name, key_sha256, created_at) VALUES (?, ?, ?)",
                p,
            )
            .await
            .map_err(db_err)
        })
        .await
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        self.call(|mut c| async move {
            let rows: Vec<(String, i64, Option<i64>)> = c
                .query("SELECT name, created_at, revoked_at FROM api_key ORDER BY name")
                .await
                .map_err(db_err)?;
            Ok(rows
                .into_iter()
                .map(|(name, created_at, revoked_at)| ApiKey {
                    name,
                    created_at,
                    revoked_at,
                })
                .collect())
        })
        .await
    }

    async fn revoke_key(&self, name: &str) -> Result<bool, StoreError> {
        let p = (unix_now(), name.to_string());
        self.call(|mut c| async move {
            c.exec_drop(
                "UPDATE api_key SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                p,
            )
            .await
            .map_err(db_err)?;
            Ok(c.affected_rows() > 0)
        })
        .await
    }

    async fn key_name(&self, sha256_hex: &str) -> Result<Option<String>, StoreError> {
        let d = sha256_hex.to_string();
        self.call(|mut c| async move {
            c.exec_first(
                "SELECT name FROM api_key WHERE key_sha256 = ? AND revoked_at IS NULL",
                (d,),
            )
            .await
            .map_err(db_err)
        })
        .await
    }
}

fn mysql_value(v: &Val) -> mysql_async::Value {
    use mysql_async::Value;
    match v {
        Val::Text(Some(t)) => Value::from(t.as_str()),
        Val::Int(Some(i)) => Value::from(*i),
        Val::Text(None) | Val::Int(None) => Value::NULL,
    }
}

#[async_trait]
impl crate::devices::Sql for MysqlSubscribers {
    fn mark(&self, _i: usize) -> String {
        "?".into()
    }

    async fn exec(&self, sql: String, vals: Vec<Val>) -> Result<u64, StoreError> {
        let params: Vec<mysql_async::Value> = vals.iter().map(mysql_value).collect();
        self.call(|mut c| async move {
            c.exec_drop(sql, params).await.map_err(db_err)?;
            Ok(c.affected_rows())
        })
        .await
    }

    async fn rows(
        &self,
        sql: String,
        vals: Vec<Val>,
        kinds: &'static [Kind],
    ) -> Result<Vec<Vec<Val>>, StoreError> {
        let params: Vec<mysql_async::Value> = vals.iter().map(mysql_value).collect();
        self.call(|mut c| async move {
            let rows: Vec<mysql_async::Row> = c.exec(sql, params).await.map_err(db_err)?;
            Ok(rows
                .into_iter()
                .map(|mut r| {
                    kinds
                        .iter()
                        .enumerate()
                        .map(|(i, kind)| match kind {
                            Kind::Text => Val::Text(r.take_opt(i).and_then(Result::ok).flatten()),
                            Kind::Int => Val::Int(r.take_opt(i).and_then(Result::ok).flatten()),
                        })
                        .collect()
                })
                .collect())
        })
        .await
    }
}

#[async_trait]
impl CallRecordStore for MysqlSubscribers {
    async fn add_call(&self, node: &str, record: &CallRecord) -> Result<(), StoreError> {
        let params: Vec<mysql_async::Value> = calls::values(node, record)
            .iter()
            .map(mysql_value)
            .collect();
        self.call(|mut c| async move {
            c.exec_drop(calls::insert_sql(|_| "?".into()), params)
                .await
                .map_err(db_err)
        })
        .await
    }

    async fn calls(&self, q: &CallQuery) -> Result<Vec<StoredCall>, StoreError> {
        let (sql, vals) = calls::query_sql(q, |_| "?".into());
        let params: Vec<mysql_async::Value> = vals.iter().map(mysql_value).collect();
        self.call(|mut c| async move {
            let rows: Vec<mysql_async::Row> = c.exec(sql, params).await.map_err(db_err)?;
            rows.into_iter()
                .map(|mut r| {
                    let id: i64 = r
                        .take_opt(0)
                        .and_then(Result::ok)
                        .ok_or_else(|| StoreError::backend("mysql", "call_record without id"))?;
                    let mut v = Vec::with_capacity(calls::COLUMNS.len());
                    for (i, (_, kind)) in calls::COLUMNS.iter().enumerate() {
                        v.push(match kind {
                            Kind::Text => {
                                Val::Text(r.take_opt(i + 1).and_then(Result::ok).flatten())
                            }
                            Kind::Int => Val::Int(r.take_opt(i + 1).and_then(Result::ok).flatten()),
                        });
                    }
                    calls::record_of(id, &v)
                })
                .collect()
        })
        .await
    }

    async fn purge_calls(&self, ended_before: u64) -> Result<u64, StoreError> {
        let before = i64::try_from(ended_before).unwrap_or(i64::MAX);
        self.call(|mut c| async move {
            c.exec_drop("DELETE FROM call_record WHERE ended_at < ?", (before,))
                .await
                .map_err(db_err)?;
            Ok(c.affected_rows())
        })
        .await
    }
}

fn audit_entries_of(rows: Vec<mysql_async::Row>) -> Result<Vec<AuditEntry>, StoreError> {
    rows.into_iter()
        .map(|mut r| {
            let v: Vec<Val> = (0..10)
                .map(|i| match i {
                    0 | 1 => Val::Int(r.take_opt(i).and_then(Result::ok).flatten()),
                    _ => Val::Text(r.take_opt(i).and_then(Result::ok).flatten()),
                })
                .collect();
            audit::entry_of(&v)
        })
        .collect()
}

#[async_trait]
impl AuditStore for MysqlSubscribers {
    async fn append_audit(&self, at: u64, event: AuditEvent) -> Result<AuditEntry, StoreError> {
        audit::append_with(
            at,
            event,
            || async {
                self.call(|mut c| async move {
                    let r: Option<(i64, String)> = c
                        .query_first("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
                        .await
                        .map_err(db_err)?;
                    Ok(r.map(|(s, h)| (u64::try_from(s).unwrap_or(0), h)))
                })
                .await
            },
            |entry| async move {
                let params: Vec<mysql_async::Value> =
                    audit::values(&entry).iter().map(mysql_value).collect();
                let inserted = self
                    .call(|mut c| async move {
                        c.exec_drop(audit::insert_sql(|_| "?".into()), params)
                            .await
                            .map_err(db_err)
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
            "SELECT {} FROM audit_log WHERE seq > ? ORDER BY seq LIMIT {}",
            audit::COLUMNS,
            limit.min(100_000)
        );
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        self.call(|mut c| async move {
            let rows: Vec<mysql_async::Row> = c.exec(sql, (after,)).await.map_err(db_err)?;
            audit_entries_of(rows)
        })
        .await
    }

    async fn audit_entries(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let (sql, vals) = audit::query_sql(q, |_| "?".into());
        let params: Vec<mysql_async::Value> = vals.iter().map(mysql_value).collect();
        self.call(|mut c| async move {
            let rows: Vec<mysql_async::Row> = c.exec(sql, params).await.map_err(db_err)?;
            audit_entries_of(rows)
        })
        .await
    }
}
