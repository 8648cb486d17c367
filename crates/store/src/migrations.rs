//! Forward-only schema migrations for the embedded store. Each step runs once, in order, in
//! a transaction; the applied version is recorded in `schema_migrations`.

use rusqlite::Connection;

use crate::StoreError;

/// (version, SQL). Never edit a released step: add a new one.
pub(crate) const SUBSCRIBER_MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE subscriber (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        username TEXT NOT NULL,
        domain TEXT NOT NULL,
        email TEXT,
        careflow_user_id TEXT,
        careflow_care4w_id TEXT,
        enabled INTEGER NOT NULL DEFAULT 1,
        ha1_md5 TEXT NOT NULL,
        ha1_sha256 TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        UNIQUE (username, domain)
    );
    CREATE INDEX idx_subscriber_careflow_user ON subscriber (careflow_user_id);",
    ),
    // One SIP account per CareFlow user (the API's 409), and admin API keys (only their
    // SHA-256 is kept).
    (
        2,
        "DROP INDEX idx_subscriber_careflow_user;
    CREATE UNIQUE INDEX idx_subscriber_careflow_user ON subscriber (careflow_user_id)
        WHERE careflow_user_id IS NOT NULL;
    CREATE TABLE api_key (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        key_sha256 TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER
    );",
    ),
];

pub(crate) const LOCATION_MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE binding (
        id INTEGER PRIMARY KEY,
        aor TEXT NOT NULL,
        contact TEXT NOT NULL,
        call_id TEXT NOT NULL,
        cseq INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        registered_at INTEGER NOT NULL,
        q INTEGER,
        instance TEXT,
        reg_id INTEGER,
        transport TEXT NOT NULL,
        source TEXT NOT NULL,
        user_agent TEXT
    );
    CREATE INDEX idx_binding_aor ON binding (aor);",
    ),
    // Path (RFC 3327): the proxies in front of the device, one value per line.
    (2, "ALTER TABLE binding ADD COLUMN path TEXT;"),
];

/// Applies pending migrations; returns the resulting version.
pub(crate) fn migrate(conn: &mut Connection, steps: &[(i64, &str)]) -> Result<i64, StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )?;
    let current: i64 = conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    let mut version = current;
    for (v, sql) in steps.iter().filter(|(v, _)| *v > current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, strftime('%s','now'))",
            [v],
        )?;
        tx.commit()?;
        version = *v;
    }
    Ok(version)
}
