//! Subscribers and API keys in PostgreSQL (`DB_URL=postgres://...`), for several nodes sharing
//! one database. Same tables and migration versions as the embedded store.
//!
//! One client connection, re-established on the next call after it broke: while the database
//! is away every lookup fails (and SIP authentication fails safe), and the first call after it
//! is back reconnects. Connection attempts are spaced so an outage is not a reconnect storm.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use careflow_core::audit::{AuditEntry, AuditEvent};
use careflow_core::cdr::CallRecord;
use tokio_postgres::{Client, NoTls, Row};

use crate::audit::{self, AuditQuery, AuditStore};
use crate::calls::{self, CallQuery, CallRecordStore, Kind, StoredCall, Val};
use crate::like_pattern;
use crate::sqlite::unix_now;
use crate::{ApiKey, ApiKeyStore, NewSubscriber, StoreError, Subscriber, SubscriberStore};

/// (version, SQL) in PostgreSQL's dialect; the versions match the SQLite steps.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE subscriber (
            id BIGSERIAL PRIMARY KEY,
            username TEXT NOT NULL,
            domain TEXT NOT NULL,
            email TEXT,
            careflow_user_id TEXT,
            careflow_care4w_id TEXT,
            enabled BOOLEAN NOT NULL DEFAULT TRUE,
            ha1_md5 TEXT NOT NULL,
            ha1_sha256 TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            UNIQUE (username, domain)
        );
        CREATE INDEX idx_subscriber_careflow_user ON subscriber (careflow_user_id);",
    ),
    (
        2,
        "DROP INDEX idx_subscriber_careflow_user;
        CREATE UNIQUE INDEX idx_subscriber_careflow_user ON subscriber (careflow_user_id)
            WHERE careflow_user_id IS NOT NULL;
        CREATE TABLE api_key (
            id BIGSERIAL PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            key_sha256 TEXT NOT NULL UNIQUE,
            created_at BIGINT NOT NULL,
            revoked_at BIGINT
        );",
    ),
    (
        3,
        "CREATE TABLE call_record (
        id BIGSERIAL PRIMARY KEY,
        call_id TEXT NOT NULL,
        node TEXT NOT NULL,
        caller TEXT NOT NULL,
        caller_instance TEXT,
        caller_user_agent TEXT,
        caller_source TEXT,
        caller_transport TEXT,
        caller_contact TEXT,
        dialled TEXT NOT NULL,
        callee TEXT,
        answer_instance TEXT,
        answer_user_agent TEXT,
        answer_source TEXT,
        answer_transport TEXT,
        answer_contact TEXT,
        invite_at BIGINT NOT NULL,
        ringing_at BIGINT,
        answered_at BIGINT,
        ended_at BIGINT NOT NULL,
        setup_ms BIGINT NOT NULL,
        talk_seconds BIGINT NOT NULL,
        disposition TEXT NOT NULL,
        final_code BIGINT NOT NULL,
        reason TEXT,
        ended_by TEXT NOT NULL,
        media_anchored BIGINT NOT NULL
    );
    CREATE INDEX idx_call_record_invite ON call_record (invite_at);
    CREATE INDEX idx_call_record_ended ON call_record (ended_at);
    CREATE INDEX idx_call_record_caller ON call_record (caller, id);
    CREATE INDEX idx_call_record_callee ON call_record (callee, id);",
    ),
    (
        4,
        "CREATE TABLE audit_log (
        seq BIGINT PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        actor TEXT NOT NULL,
        source TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX idx_audit_log_at ON audit_log (at_ms);
    CREATE INDEX idx_audit_log_actor ON audit_log (actor, seq);
    CREATE INDEX idx_audit_log_target ON audit_log (target, seq);",
    ),
    (
        5,
        "CREATE TABLE device (
        mac TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        username TEXT NOT NULL,
        domain TEXT NOT NULL,
        label TEXT,
        blf TEXT NOT NULL,
        generation BIGINT NOT NULL,
        ha1_md5 TEXT NOT NULL,
        ha1_sha256 TEXT NOT NULL,
        prev_ha1_md5 TEXT,
        prev_ha1_sha256 TEXT,
        prev_valid_until BIGINT,
        prov_ha1_md5 TEXT NOT NULL,
        prov_ha1_sha256 TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        last_fetch_at BIGINT,
        last_fetch_from TEXT,
        shared BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX idx_device_user ON device (username, domain);",
    ),
];

/// Serialises migrations of nodes starting at once (`pg_advisory_lock` key).
const MIGRATION_LOCK: i64 = 0x0ca2_ef10_5195;

/// Waiting time between reconnection attempts.
const RECONNECT_SPACING: Duration = Duration::from_secs(1);

/// Subscribers in PostgreSQL.
pub struct PgSubscribers {
    url: String,
    client: tokio::sync::Mutex<(Option<Arc<Client>>, Option<Instant>)>,
}

impl std::fmt::Debug for PgSubscribers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSubscribers").finish_non_exhaustive()
    }
}

fn db_err(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error()
        && db.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION
    {
        return StoreError::Conflict(db.constraint().unwrap_or("unique").to_string());
    }
    if e.as_db_error().is_some() {
        StoreError::backend("postgres", e)
    } else {
        // Closed connection, I/O, timeout: the server was not there to answer.
        StoreError::unavailable("postgres", e)
    }
}

async fn connect(url: &str) -> Result<Client, StoreError> {
    let (client, connection) =
        tokio::time::timeout(Duration::from_secs(5), tokio_postgres::connect(url, NoTls))
            .await
            .map_err(|_| StoreError::unavailable("postgres", "connection timed out"))?
            .map_err(db_err)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "postgres connection lost; reconnecting on next use");
        }
    });
    Ok(client)
}

impl PgSubscribers {
    /// Connects and applies pending migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let mut client = connect(url).await?;
        migrate(&mut client).await?;
        Ok(Self {
            url: url.to_string(),
            client: tokio::sync::Mutex::new((Some(Arc::new(client)), None)),
        })
    }

    async fn client(&self) -> Result<Arc<Client>, StoreError> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.0.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        if let Some(t) = guard.1
            && t.elapsed() < RECONNECT_SPACING
        {
            return Err(StoreError::unavailable(
                "postgres",
                "not connected (reconnecting)",
            ));
        }
        guard.1 = Some(Instant::now());
        match connect(&self.url).await {
            Ok(c) => {
                tracing::info!("postgres connection re-established");
                let c = Arc::new(c);
                guard.0 = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                guard.0 = None;
                Err(e)
            }
        }
    }
}

async fn migrate(client: &mut Client) -> Result<i64, StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db_err)?;
    let result = async {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
            )
            .await
            .map_err(db_err)?;
        let current: i64 = client
            .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])
            .await
            .map_err(db_err)?
            .get(0);
        let mut version = current;
        for (v, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            let tx = client.transaction().await.map_err(db_err)?;
            tx.batch_execute(sql).await.map_err(db_err)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[v, &unix_now()],
            )
            .await
            .map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
            version = *v;
        }
        Ok(version)
    }
    .await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

const COLUMNS: &str = "id, username, domain, email, careflow_user_id, careflow_care4w_id, enabled, ha1_md5, ha1_sha256, created_at, updated_at";

fn subscriber(r: &Row) -> Subscriber {
    Subscriber {
        id: r.get(0),
        username: r.get(1),
        domain: r.get(2),
        email: r.get(3),
        careflow_user_id: r.get(4),
        careflow_care4w_id: r.get(5),
        enabled: r.get(6),
        ha1_md5: r.get(7),
        ha1_sha256: r.get(8),
        created_at: r.get(9),
        updated_at: r.get(10),
    }
}

#[async_trait]
impl SubscriberStore for PgSubscribers {
    async fn find(&self, username: &str, domain: &str) -> Result<Option<Subscriber>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                &format!("SELECT {COLUMNS} FROM subscriber WHERE username = $1 AND domain = $2"),
                &[&username, &domain],
            )
            .await
            .map_err(db_err)?;
        Ok(row.as_ref().map(subscriber))
    }

    async fn add(&self, s: NewSubscriber) -> Result<(), StoreError> {
        let c = self.client().await?;
        let now = unix_now();
        c.execute(
            "INSERT INTO subscriber (username, domain, email, careflow_user_id, careflow_care4w_id, enabled, ha1_md5, ha1_sha256, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, TRUE, $6, $7, $8, $8)",
            &[&s.username, &s.domain, &s.email, &s.careflow_user_id, &s.careflow_care4w_id, &s.ha1_md5, &s.ha1_sha256, &now],
        )
        .await
        .map_err(|e| match db_err(e) {
            StoreError::Conflict(_) => StoreError::Conflict(format!("{}@{}", s.username, s.domain)),
            other => other,
        })?;
        Ok(())
    }

    async fn set_ha1(
        &self,
        username: &str,
        domain: &str,
        md5: &str,
        sha256: &str,
    ) -> Result<bool, StoreError> {
        let c = self.client().await?;
        Ok(c.execute(
            "UPDATE subscriber SET ha1_md5 = $3, ha1_sha256 = $4, updated_at = $5 WHERE username = $1 AND domain = $2",
            &[&username, &domain, &md5, &sha256, &unix_now()],
        )
        .await
        .map_err(db_err)?
            > 0)
    }

    async fn set_enabled(
        &self,
        username: &str,
        domain: &str,
        enabled: bool,
    ) -> Result<bool, StoreError> {
        let c = self.client().await?;
        Ok(c.execute(
            "UPDATE subscriber SET enabled = $3, updated_at = $4 WHERE username = $1 AND domain = $2",
            &[&username, &domain, &enabled, &unix_now()],
        )
        .await
        .map_err(db_err)?
            > 0)
    }

    async fn remove(&self, username: &str, domain: &str) -> Result<bool, StoreError> {
        let c = self.client().await?;
        Ok(c.execute(
            "DELETE FROM subscriber WHERE username = $1 AND domain = $2",
            &[&username, &domain],
        )
        .await
        .map_err(db_err)?
            > 0)
    }

    async fn list(&self) -> Result<Vec<Subscriber>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!("SELECT {COLUMNS} FROM subscriber ORDER BY domain, username"),
                &[],
            )
            .await
            .map_err(db_err)?;
        Ok(rows.iter().map(subscriber).collect())
    }

    async fn import(&self, rows: Vec<NewSubscriber>) -> Result<usize, StoreError> {
        let mut client = connect(&self.url).await?;
        let now = unix_now();
        let tx = client.transaction().await.map_err(db_err)?;
        // As in the embedded store: existing users get the imported digests (and e-mail).
        let st = tx
            .prepare(
                "INSERT INTO subscriber (username, domain, email, careflow_user_id, careflow_care4w_id, enabled, ha1_md5, ha1_sha256, created_at, updated_at)
                 VALUES ($1, $2, $3, NULL, NULL, TRUE, $4, $5, $6, $6)
                 ON CONFLICT (username, domain) DO UPDATE SET
                    ha1_md5 = EXCLUDED.ha1_md5, ha1_sha256 = EXCLUDED.ha1_sha256,
                    email = COALESCE(EXCLUDED.email, subscriber.email), updated_at = EXCLUDED.updated_at",
            )
            .await
            .map_err(db_err)?;
        for s in &rows {
            tx.execute(
                &st,
                &[
                    &s.username,
                    &s.domain,
                    &s.email,
                    &s.ha1_md5,
                    &s.ha1_sha256,
                    &now,
                ],
            )
            .await
            .map_err(|e| match db_err(e) {
                StoreError::Conflict(_) => {
                    StoreError::Conflict(format!("{}@{}", s.username, s.domain))
                }
                other => other,
            })?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(rows.len())
    }

    async fn find_by_careflow_user(&self, user_id: &str) -> Result<Option<Subscriber>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                &format!("SELECT {COLUMNS} FROM subscriber WHERE careflow_user_id = $1"),
                &[&user_id],
            )
            .await
            .map_err(db_err)?;
        Ok(row.as_ref().map(subscriber))
    }

    async fn search(
        &self,
        query: &str,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<Subscriber>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM subscriber
                     WHERE username LIKE $1 OR email LIKE $1 OR careflow_user_id LIKE $1
                     ORDER BY username, domain LIMIT $2 OFFSET $3"
                ),
                &[&like_pattern(query), &(limit as i64), &(offset as i64)],
            )
            .await
            .map_err(db_err)?;
        Ok(rows.iter().map(subscriber).collect())
    }
}

#[async_trait]
impl ApiKeyStore for PgSubscribers {
    async fn create_key(&self, name: &str, sha256_hex: &str) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO api_key (name, key_sha256, created_at) VALUES ($1, $2, $3)",
            &[&name, &sha256_hex, &unix_now()],
        )
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT name, created_at, revoked_at FROM api_key ORDER BY name",
                &[],
            )
            .await
            .map_err(db_err)?;
        Ok(rows
            .iter()
            .map(|r| ApiKey {
                name: r.get(0),
                created_at: r.get(1),
                revoked_at: r.get(2),
            })
            .collect())
    }

    async fn revoke_key(&self, name: &str) -> Result<bool, StoreError> {
        let c = self.client().await?;
        Ok(c.execute(
            "UPDATE api_key SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL",
            &[&name, &unix_now()],
        )
        .await
        .map_err(db_err)?
            > 0)
    }

    async fn key_name(&self, sha256_hex: &str) -> Result<Option<String>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT name FROM api_key WHERE key_sha256 = $1 AND revoked_at IS NULL",
                &[&sha256_hex],
            )
            .await
            .map_err(db_err)?;
        Ok(row.map(|r| r.get(0)))
    }
}

fn pg_value(v: &Val) -> Box<dyn tokio_postgres::types::ToSql + Sync + Send> {
    match v {
        Val::Text(t) => Box::new(t.clone()),
        Val::Int(i) => Box::new(*i),
    }
}

#[async_trait]
impl CallRecordStore for PgSubscribers {
    async fn add_call(&self, node: &str, record: &CallRecord) -> Result<(), StoreError> {
        let params: Vec<_> = calls::values(node, record).iter().map(pg_value).collect();
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p.as_ref() as _).collect();
        let c = self.client().await?;
        c.execute(&calls::insert_sql(|i| format!("${i}")), &refs)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn calls(&self, q: &CallQuery) -> Result<Vec<StoredCall>, StoreError> {
        let (sql, vals) = calls::query_sql(q, |i| format!("${i}"));
        let params: Vec<_> = vals.iter().map(pg_value).collect();
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p.as_ref() as _).collect();
        let c = self.client().await?;
        let rows = c.query(&sql, &refs).await.map_err(db_err)?;
        rows.iter()
            .map(|r| {
                let v: Vec<Val> = calls::COLUMNS
                    .iter()
                    .enumerate()
                    .map(|(i, (_, kind))| match kind {
                        Kind::Text => Val::Text(r.get(i + 1)),
                        Kind::Int => Val::Int(r.get(i + 1)),
                    })
                    .collect();
                calls::record_of(r.get(0), &v)
            })
            .collect()
    }

    async fn purge_calls(&self, ended_before: u64) -> Result<u64, StoreError> {
        let before = i64::try_from(ended_before).unwrap_or(i64::MAX);
        let c = self.client().await?;
        c.execute("DELETE FROM call_record WHERE ended_at < $1", &[&before])
            .await
            .map_err(db_err)
    }
}

#[async_trait]
impl crate::devices::Sql for PgSubscribers {
    fn mark(&self, i: usize) -> String {
        format!("${i}")
    }

    async fn exec(&self, sql: String, vals: Vec<Val>) -> Result<u64, StoreError> {
        let params: Vec<_> = vals.iter().map(pg_value).collect();
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p.as_ref() as _).collect();
        let c = self.client().await?;
        c.execute(&sql, &refs).await.map_err(db_err)
    }

    async fn rows(
        &self,
        sql: String,
        vals: Vec<Val>,
        kinds: &'static [Kind],
    ) -> Result<Vec<Vec<Val>>, StoreError> {
        let params: Vec<_> = vals.iter().map(pg_value).collect();
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p.as_ref() as _).collect();
        let c = self.client().await?;
        let rows = c.query(&sql, &refs).await.map_err(db_err)?;
        rows.iter()
            .map(|r| {
                kinds
                    .iter()
                    .enumerate()
                    .map(|(i, kind)| match kind {
                        Kind::Text => r.try_get(i).map(Val::Text),
                        Kind::Int => r.try_get(i).map(Val::Int),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db_err)
            })
            .collect()
    }
}

fn audit_entries_of(rows: &[Row]) -> Result<Vec<AuditEntry>, StoreError> {
    rows.iter()
        .map(|r| {
            let v: Vec<Val> = (0..10)
                .map(|i| match i {
                    0 | 1 => Val::Int(r.get(i)),
                    _ => Val::Text(r.get(i)),
                })
                .collect();
            audit::entry_of(&v)
        })
        .collect()
}

#[async_trait]
impl AuditStore for PgSubscribers {
    async fn append_audit(&self, at: u64, event: AuditEvent) -> Result<AuditEntry, StoreError> {
        audit::append_with(
            at,
            event,
            || async {
                let c = self.client().await?;
                let row = c
                    .query_opt(
                        "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
                        &[],
                    )
                    .await
                    .map_err(db_err)?;
                Ok(row.map(|r| {
                    (
                        u64::try_from(r.get::<_, i64>(0)).unwrap_or(0),
                        r.get::<_, String>(1),
                    )
                }))
            },
            |entry| async move {
                let params: Vec<_> = audit::values(&entry).iter().map(pg_value).collect();
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                    params.iter().map(|p| p.as_ref() as _).collect();
                let c = self.client().await?;
                match c
                    .execute(&audit::insert_sql(|i| format!("${i}")), &refs)
                    .await
                    .map_err(db_err)
                {
                    Ok(_) => Ok(true),
                    Err(StoreError::Conflict(_)) => Ok(false),
                    Err(e) => Err(e),
                }
            },
        )
        .await
    }

    async fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let sql = format!(
            "SELECT {} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT {}",
            audit::COLUMNS,
            limit.min(100_000)
        );
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let c = self.client().await?;
        let rows = c.query(&sql, &[&after]).await.map_err(db_err)?;
        audit_entries_of(&rows)
    }

    async fn audit_entries(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let (sql, vals) = audit::query_sql(q, |i| format!("${i}"));
        let params: Vec<_> = vals.iter().map(pg_value).collect();
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p.as_ref() as _).collect();
        let c = self.client().await?;
        let rows = c.query(&sql, &refs).await.map_err(db_err)?;
        audit_entries_of(&rows)
    }
}
