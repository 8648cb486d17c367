//! The same behaviour from every subscriber database: SQLite, and the real PostgreSQL and
//! MariaDB servers (scripts/ensure-services sets up the `careflow` role; each test makes its
//! own database and drops it).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use careflow_core::audit::AuditEvent;
use careflow_core::cdr::{CallRecord, Device, Disposition, EndedBy};
use careflow_store::audit::AuditQuery;
use careflow_store::calls::CallQuery;
use careflow_store::sqlite::DbUrl;
use careflow_store::{Database, NewSubscriber, StoreError, open_database};
use careflow_test_support::{TestDb, db_cli};

fn sub(u: &str, careflow: Option<&str>) -> NewSubscriber {
    NewSubscriber {
        username: u.into(),
        domain: "example.com".into(),
        email: Some(format!("{u}@clinic.example")),
        careflow_user_id: careflow.map(str::to_string),
        careflow_care4w_id: None,
        ha1_md5: "0".repeat(32),
        ha1_sha256: "1".repeat(64),
    }
}

async fn conformance(db: Arc<dyn Database>) {
    db.add(sub("alice", Some("uid-1"))).await.unwrap();
    db.add(sub("bob_x", None)).await.unwrap();
    db.add(sub("bobbx", None)).await.unwrap();
    assert!(matches!(
        db.add(sub("alice", None)).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(
        matches!(
            db.add(sub("alice2", Some("uid-1"))).await,
            Err(StoreError::Conflict(_))
        ),
        "one SIP account per CareFlow user"
    );
    let a = db.find("alice", "example.com").await.unwrap().unwrap();
    assert!(a.enabled);
    assert_eq!(a.email.as_deref(), Some("alice@clinic.example"));
    assert!(db.find("alice", "other.example").await.unwrap().is_none());
    assert_eq!(
        db.find_by_careflow_user("uid-1")
            .await
            .unwrap()
            .unwrap()
            .username,
        "alice"
    );
    assert!(db.find_by_careflow_user("uid-2").await.unwrap().is_none());

    assert!(
        db.set_ha1("alice", "example.com", &"a".repeat(32), &"b".repeat(64))
            .await
            .unwrap()
    );
    assert_eq!(
        db.find("alice", "example.com")
            .await
            .unwrap()
            .unwrap()
            .ha1_md5,
        "a".repeat(32)
    );
    assert!(!db.set_ha1("nobody", "example.com", "x", "y").await.unwrap());
    assert!(db.set_enabled("alice", "example.com", false).await.unwrap());
    assert!(
        db.set_enabled("alice", "example.com", false).await.unwrap(),
        "idempotent"
    );
    assert!(
        !db.find("alice", "example.com")
            .await
            .unwrap()
            .unwrap()
            .enabled
    );
    assert!(
        !db.set_enabled("nobody", "example.com", false)
            .await
            .unwrap()
    );

    // Search escapes LIKE wildcards: "b_x" finds bob_x, not bobbx.
    let names =
        |v: Vec<careflow_store::Subscriber>| v.into_iter().map(|s| s.username).collect::<Vec<_>>();
    assert_eq!(names(db.search("b_x", 10, 0).await.unwrap()), vec!["bob_x"]);
    assert_eq!(
        names(db.search("", 2, 1).await.unwrap()),
        vec!["bob_x", "bobbx"]
    );
    assert_eq!(names(db.search("clinic", 10, 0).await.unwrap()).len(), 3);
    assert_eq!(db.list().await.unwrap().len(), 3);

    db.create_key("ops", &"d".repeat(64)).await.unwrap();
    assert!(matches!(
        db.create_key("ops", &"e".repeat(64)).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        db.key_name(&"d".repeat(64)).await.unwrap().as_deref(),
        Some("ops")
    );
    assert!(db.revoke_key("ops").await.unwrap());
    assert!(!db.revoke_key("ops").await.unwrap());
    assert!(db.key_name(&"d".repeat(64)).await.unwrap().is_none());
    assert!(db.list_keys().await.unwrap()[0].revoked_at.is_some());

    assert_eq!(
        db.import(vec![sub("carol", None), sub("dave", None)])
            .await
            .unwrap(),
        2
    );
    // Importing an existing user updates its digests (re-running an import is safe).
    let mut again = sub("carol", None);
    again.ha1_md5 = "c".repeat(32);
    assert_eq!(db.import(vec![sub("erin", None), again]).await.unwrap(), 2);
    assert_eq!(
        db.find("carol", "example.com")
            .await
            .unwrap()
            .unwrap()
            .ha1_md5,
        "c".repeat(32)
    );
    assert!(db.remove("erin", "example.com").await.unwrap());
    assert!(db.remove("carol", "example.com").await.unwrap());
    assert!(!db.remove("carol", "example.com").await.unwrap());
    records(&db).await;
    audit(&db).await;
    devices(&db).await;
}

fn record(call_id: &str, ended_at: u64, disposition: Disposition) -> CallRecord {
    CallRecord {
        call_id: call_id.into(),
        caller: "alice@example.com".into(),
        caller_device: Device {
            user_agent: Some("Yealink SIP-T46S \"quoted\" 'x'".into()),
            source: Some("192.0.2.1:5060".into()),
            transport: Some("udp".into()),
            ..Device::default()
        },
        dialled: "sip:bob_x@example.com".into(),
        callee: Some("bob_x@example.com".into()),
        answered_by: None,
        invite_at: ended_at - 5_000,
        ringing_at: Some(ended_at - 4_000),
        answered_at: None,
        ended_at,
        disposition,
        final_code: 486,
        reason: Some("SIP;cause=486;text=\"Busy\"".into()),
        ended_by: EndedBy::Network,
        media_anchored: false,
    }
}

/// Call records: written in a batch, filtered and paged newest first, purged by age.
async fn records(db: &Arc<dyn Database>) {
    let old = record("old-call", 1_000_000, Disposition::Busy);
    let batch = vec![
        record("c1", 2_000_000, Disposition::Busy),
        record("c2", 2_000_100, Disposition::NoAnswer),
        record("c3", 2_000_200, Disposition::Busy),
    ];
    db.add_call("node-a", &old).await.unwrap();
    db.add_calls("node-b", &batch).await.unwrap();
    let all = db
        .calls(&CallQuery {
            limit: 10,
            ..CallQuery::default()
        })
        .await
        .unwrap();
    let ids: Vec<&str> = all.iter().map(|c| c.record.call_id.as_str()).collect();
    assert_eq!(ids, ["c3", "c2", "c1", "old-call"]);
    assert_eq!(all[0].record, batch[2], "read back as written");
    assert_eq!(all[0].node, "node-b");
    let busy = db
        .calls(&CallQuery {
            disposition: Some(Disposition::Busy),
            user: Some("bob_x@example.com".into()),
            since: Some(1_500_000),
            limit: 1,
            ..CallQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(busy.len(), 1);
    assert_eq!(busy[0].record.call_id, "c3");
    let next = db
        .calls(&CallQuery {
            disposition: Some(Disposition::Busy),
            since: Some(1_500_000),
            before_id: Some(busy[0].id),
            limit: 10,
            ..CallQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].record.call_id, "c1");
    assert_eq!(
        db.purge_calls(1_500_000).await.unwrap(),
        1,
        "the old call only"
    );
    let left = db
        .calls(&CallQuery {
            limit: 10,
            ..CallQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(left.len(), 3);
}

/// The audit chain: appends continue it (from two writers at once too), and it verifies.
async fn audit(db: &Arc<dyn Database>) {
    let ev = |action: &str| AuditEvent {
        actor: "cli:root".into(),
        source: "local".into(),
        action: action.into(),
        target: "alice@example.com".into(),
        outcome: "ok".into(),
        detail: "line\nbreak \"quoted\"".into(),
    };
    let first = db
        .append_audit(10, ev("credentials.created"))
        .await
        .unwrap();
    assert_eq!(
        (first.seq, first.prev_hash.as_str()),
        (1, careflow_core::audit::GENESIS)
    );
    let (a, b) = tokio::join!(
        db.append_audit(11, ev("subscriber.disabled")),
        db.append_audit(12, ev("subscriber.enabled"))
    );
    let mut seqs = [a.unwrap().seq, b.unwrap().seq];
    seqs.sort_unstable();
    assert_eq!(seqs, [2, 3]);
    let chain = db.audit_after(0, 100).await.unwrap();
    assert_eq!(chain.len(), 3);
    let mut v = careflow_core::audit::Verifier::default();
    for e in &chain {
        v.check(e).unwrap();
    }
    assert_eq!(chain[0], first, "read back as written");
    let only = db
        .audit_entries(&AuditQuery {
            action: Some("subscriber.enabled".into()),
            limit: 10,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(db.audit_after(2, 100).await.unwrap().len(), 1);
}

/// Provisioned devices: added once per MAC, listed per user, rotated with a compare on the
/// generation (two rotations at once: one wins), the previous HA1 kept with its deadline.
async fn devices(db: &Arc<dyn Database>) {
    use careflow_store::devices::Device;
    let dev = |mac: &str, user: &str| Device {
        mac: mac.into(),
        model: "yealink-t46s".into(),
        username: user.into(),
        domain: "example.com".into(),
        label: Some("Ward 3".into()),
        blf: vec!["bob_x".into()],
        generation: 1,
        ha1_md5: "a".repeat(32),
        ha1_sha256: "b".repeat(64),
        previous: None,
        prov_ha1_md5: "c".repeat(32),
        prov_ha1_sha256: "d".repeat(64),
        created_at: 100,
        updated_at: 100,
        last_fetch_at: None,
        last_fetch_from: None,
        shared: mac.ends_with('d'),
    };
    let a = dev("001565aabbcc", "alice");
    db.add_device(&a).await.unwrap();
    db.add_device(&dev("001565aabbcd", "bob_x")).await.unwrap();
    assert!(matches!(
        db.add_device(&dev("001565aabbcc", "bob_x")).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(db.device("001565aabbcc").await.unwrap(), Some(a.clone()));
    assert_eq!(db.device("001565aabbce").await.unwrap(), None);
    assert_eq!(db.devices(None).await.unwrap().len(), 2);
    let alices = db.devices(Some(("alice", "example.com"))).await.unwrap();
    assert_eq!(alices, vec![a.clone()]);
    let new = ("e".repeat(32), "f".repeat(64));
    let (r1, r2) = tokio::join!(
        db.rotate_device("001565aabbcc", 1, (&new.0, &new.1), 500, 200),
        db.rotate_device("001565aabbcc", 1, (&new.0, &new.1), 500, 200)
    );
    assert!(
        r1.unwrap() ^ r2.unwrap(),
        "exactly one rotation from generation 1"
    );
    let rotated = db.device("001565aabbcc").await.unwrap().unwrap();
    assert_eq!(rotated.generation, 2);
    assert_eq!(rotated.ha1_md5, new.0);
    let prev = rotated.previous.clone().unwrap();
    assert_eq!(
        (prev.ha1_md5.as_str(), prev.valid_until),
        (a.ha1_md5.as_str(), 500)
    );
    assert!(
        db.update_device(
            "001565aabbcc",
            "cisco-spa303",
            None,
            &["x".into(), "y".into()],
            300
        )
        .await
        .unwrap()
    );
    assert!(
        db.set_provisioning_ha1("001565aabbcc", (&"1".repeat(32), &"2".repeat(64)), 300)
            .await
            .unwrap()
    );
    db.device_fetched("001565aabbcc", 400, "192.0.2.7:4321")
        .await
        .unwrap();
    let d = db.device("001565aabbcc").await.unwrap().unwrap();
    assert_eq!(
        (d.model.as_str(), d.label.as_deref()),
        ("cisco-spa303", None)
    );
    assert_eq!(d.blf, vec!["x".to_string(), "y".to_string()]);
    assert_eq!(d.prov_ha1_md5, "1".repeat(32));
    assert_eq!(
        (d.last_fetch_at, d.last_fetch_from.as_deref()),
        (Some(400), Some("192.0.2.7:4321"))
    );
    assert!(db.remove_device("001565aabbcd").await.unwrap());
    assert!(!db.remove_device("001565aabbcd").await.unwrap());
    assert!(
        !db.update_device("001565aabbcd", "m", None, &[], 1)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = DbUrl::Sqlite(dir.path().join("c.db"));
    conformance(open_database(&url).await.unwrap()).await;
    // Reopening finds everything and applies no migration twice.
    let db = open_database(&url).await.unwrap();
    assert_eq!(db.list().await.unwrap().len(), 4);
}

#[tokio::test]
async fn postgres() {
    let t = TestDb::postgres();
    let url = DbUrl::parse(&t.url).unwrap();
    conformance(open_database(&url).await.unwrap()).await;
    let db = open_database(&url).await.unwrap();
    assert_eq!(db.list().await.unwrap().len(), 4);
}

#[tokio::test]
async fn mariadb() {
    let t = TestDb::mariadb();
    let url = DbUrl::parse(&t.url).unwrap();
    conformance(open_database(&url).await.unwrap()).await;
    let db = open_database(&url).await.unwrap();
    assert_eq!(db.list().await.unwrap().len(), 4);
}

/// The first released subscriber schema of the server backends, frozen here as it shipped (a
/// later edit of migration 1 must not change what this test upgrades from), with two rows.
const POSTGRES_V1: &str = "
    CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL);
    CREATE TABLE subscriber (
        id BIGSERIAL PRIMARY KEY, username TEXT NOT NULL, domain TEXT NOT NULL, email TEXT,
        careflow_user_id TEXT, careflow_care4w_id TEXT, enabled BOOLEAN NOT NULL DEFAULT TRUE,
        ha1_md5 TEXT NOT NULL, ha1_sha256 TEXT NOT NULL, created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL, UNIQUE (username, domain));
    CREATE INDEX idx_subscriber_careflow_user ON subscriber (careflow_user_id);
    INSERT INTO schema_migrations VALUES (1, 1700000000);
    INSERT INTO subscriber (username, domain, email, careflow_user_id, enabled, ha1_md5,
        ha1_sha256, created_at, updated_at) VALUES
        ('anna', 'clinic.example', 'anna@clinic.example', 'uid-anna', TRUE,
         'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 'bbbb', 1700000000, 1700000000),
        ('ben', 'clinic.example', NULL, NULL, FALSE,
         'cccccccccccccccccccccccccccccccc', 'dddd', 1700000001, 1700000001);";

const MARIADB_V1: &str = "
    CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL);
    CREATE TABLE subscriber (
        id BIGINT AUTO_INCREMENT PRIMARY KEY, username VARCHAR(128) NOT NULL,
        domain VARCHAR(255) NOT NULL, email VARCHAR(255), careflow_user_id VARCHAR(255),
        careflow_care4w_id VARCHAR(255), enabled TINYINT(1) NOT NULL DEFAULT 1,
        ha1_md5 CHAR(32) NOT NULL, ha1_sha256 CHAR(64) NOT NULL, created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL, UNIQUE KEY uq_subscriber (username, domain),
        KEY idx_subscriber_careflow_user (careflow_user_id)
    ) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
    INSERT INTO schema_migrations VALUES (1, 1700000000);
    INSERT INTO subscriber (username, domain, email, careflow_user_id, enabled, ha1_md5,
        ha1_sha256, created_at, updated_at) VALUES
        ('anna', 'clinic.example', 'anna@clinic.example', 'uid-anna', 1,
         'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', REPEAT('b', 64), 1700000000, 1700000000),
        ('ben', 'clinic.example', NULL, NULL, 0,
         'cccccccccccccccccccccccccccccccc', REPEAT('d', 64), 1700000001, 1700000001);";

/// Opens a database left at schema 1 with today's code: the data is all there and what the
/// later steps added works.
async fn upgraded_from_v1(db: Arc<dyn Database>) {
    let anna = db.find("anna", "clinic.example").await.unwrap().unwrap();
    assert_eq!(anna.ha1_md5, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
    assert_eq!(anna.email.as_deref(), Some("anna@clinic.example"));
    assert_eq!(anna.created_at, 1_700_000_000);
    let by_user = db.find_by_careflow_user("uid-anna").await.unwrap();
    assert_eq!(by_user.map(|s| s.username).as_deref(), Some("anna"));
    assert!(
        !db.find("ben", "clinic.example")
            .await
            .unwrap()
            .unwrap()
            .enabled
    );
    db.create_key("ops", &"e".repeat(64)).await.unwrap();
    assert_eq!(db.list().await.unwrap().len(), 2);
}

#[tokio::test]
async fn postgres_upgrades_from_the_first_schema() {
    let t = TestDb::postgres();
    let name = t.url.rsplit('/').next().unwrap().to_string();
    db_cli(
        "psql",
        &[
            "-h",
            "127.0.0.1",
            "-U",
            "careflow",
            "-d",
            &name,
            "-c",
            POSTGRES_V1,
        ]
        .map(String::from),
    );
    let db = open_database(&DbUrl::parse(&t.url).unwrap()).await.unwrap();
    upgraded_from_v1(db).await;
}

#[tokio::test]
async fn mariadb_upgrades_from_the_first_schema() {
    let t = TestDb::mariadb();
    let name = t.url.rsplit('/').next().unwrap().to_string();
    db_cli(
        "mariadb",
        &[
            "-h",
            "127.0.0.1",
            "-u",
            "careflow",
            "-pcareflow",
            &name,
            "-e",
            MARIADB_V1,
        ]
        .map(String::from),
    );
    let db = open_database(&DbUrl::parse(&t.url).unwrap()).await.unwrap();
    upgraded_from_v1(db).await;
}
