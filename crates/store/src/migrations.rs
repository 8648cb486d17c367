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
    // Call detail records (issue 20): one row per call, times in Unix milliseconds.
    (
        3,
        "CREATE TABLE call_record (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
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
        invite_at INTEGER NOT NULL,
        ringing_at INTEGER,
        answered_at INTEGER,
        ended_at INTEGER NOT NULL,
        setup_ms INTEGER NOT NULL,
        talk_seconds INTEGER NOT NULL,
        disposition TEXT NOT NULL,
        final_code INTEGER NOT NULL,
        reason TEXT,
        ended_by TEXT NOT NULL,
        media_anchored INTEGER NOT NULL
    );
    CREATE INDEX idx_call_record_invite ON call_record (invite_at);
    CREATE INDEX idx_call_record_ended ON call_record (ended_at);
    CREATE INDEX idx_call_record_caller ON call_record (caller, id);
    CREATE INDEX idx_call_record_callee ON call_record (callee, id);",
    ),
    // The audit trail (issue 20): a hash chain, `seq` assigned by the writer.
    (
        4,
        "CREATE TABLE audit_log (
        seq INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL,
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
    // Provisioned desk phones (issue 21): HA1s only, the SIP password is derived.
    (
        5,
        "CREATE TABLE device (
        mac TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        username TEXT NOT NULL,
        domain TEXT NOT NULL,
        label TEXT,
        blf TEXT NOT NULL,
        generation INTEGER NOT NULL,
        ha1_md5 TEXT NOT NULL,
        ha1_sha256 TEXT NOT NULL,
        prev_ha1_md5 TEXT,
        prev_ha1_sha256 TEXT,
        prev_valid_until INTEGER,
        prov_ha1_md5 TEXT NOT NULL,
        prov_ha1_sha256 TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        last_fetch_at INTEGER,
        last_fetch_from TEXT,
        shared INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX idx_device_user ON device (username, domain);",
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

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;
    use crate::{ApiKeyStore as _, LocationStore as _, SubscriberStore as _};

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// A database at the first released schema, with data, opened by today's code: the
    /// remaining steps run and nothing is lost.
    #[test]
    fn the_first_subscriber_schema_with_data_upgrades_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("careflow.db");
        {
            let mut c = Connection::open(&path).unwrap();
            assert_eq!(migrate(&mut c, &SUBSCRIBER_MIGRATIONS[..1]).unwrap(), 1);
            c.execute_batch(
                "INSERT INTO subscriber (username, domain, email, careflow_user_id, \
                 careflow_care4w_id, enabled, ha1_md5, ha1_sha256, created_at, updated_at) VALUES
                 ('anna', 'clinic.example', 'anna@clinic.example', 'uid-anna', 'c4w-1', 1,
                  'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 'bbbb', 1700000000, 1700000000),
                 ('ben', 'clinic.example', NULL, NULL, NULL, 0,
                  'cccccccccccccccccccccccccccccccc', 'dddd', 1700000001, 1700000001);",
            )
            .unwrap();
        }
        let store = crate::sqlite::SqliteSubscribers::open(&path).unwrap();
        block_on(async {
            let anna = store.find("anna", "clinic.example").await.unwrap().unwrap();
            assert_eq!(anna.ha1_md5, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
            assert_eq!(anna.email.as_deref(), Some("anna@clinic.example"));
            assert_eq!(anna.created_at, 1_700_000_000);
            let by_user = store.find_by_careflow_user("uid-anna").await.unwrap();
            assert_eq!(by_user.map(|s| s.username).as_deref(), Some("anna"));
            let ben = store.find("ben", "clinic.example").await.unwrap().unwrap();
            assert!(!ben.enabled);
            // What step 2 added works on the old data.
            store.create_key("ops", &"e".repeat(64)).await.unwrap();
        });
        let c = Connection::open(&path).unwrap();
        let v: i64 = c
            .query_row("SELECT MAX(version) FROM schema_migrations", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(v, crate::schema_versions().0);
    }

    #[test]
    fn the_first_location_schema_with_bindings_upgrades_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("location.db");
        let now = 1_800_000_000;
        {
            let mut c = Connection::open(&path).unwrap();
            assert_eq!(migrate(&mut c, &LOCATION_MIGRATIONS[..1]).unwrap(), 1);
            c.execute(
                "INSERT INTO binding (id, aor, contact, call_id, cseq, expires_at, registered_at, \
                 q, instance, reg_id, transport, source, user_agent) VALUES \
                 (7, 'anna@clinic.example', '<sip:anna@192.0.2.7:5060>', 'c1', 3, ?1, ?2, NULL, \
                  NULL, NULL, 'udp', '192.0.2.7:5060', 'Yealink SIP-T46S')",
                [now + 600, now - 60],
            )
            .unwrap();
        }
        let journal = dir.path().join("location.journal");
        let loc = crate::location::EmbeddedLocation::open(&journal, Some(&path), now).unwrap();
        let found = block_on(loc.lookup("anna@clinic.example", now)).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].contact, "<sip:anna@192.0.2.7:5060>");
        assert_eq!(found[0].user_agent.as_deref(), Some("Yealink SIP-T46S"));
        assert!(found[0].path.is_empty());
        drop(loc);
        // Imported once: the SQLite file is set aside and the new journal has the binding.
        assert!(!path.exists());
        assert!(dir.path().join("location.db.imported").exists());
        assert_eq!(
            crate::location::read_journal(&journal, Some(&path), now)
                .unwrap()
                .len(),
            1
        );
        let again = crate::location::EmbeddedLocation::open(&journal, Some(&path), now).unwrap();
        assert_eq!(
            block_on(again.lookup("anna@clinic.example", now))
                .unwrap()
                .len(),
            1
        );
    }
}
