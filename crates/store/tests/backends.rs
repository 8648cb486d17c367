//! The same behaviour from every subscriber database: SQLite, and the real PostgreSQL and
//! MariaDB servers (scripts/ensure-services sets up the `careflow` role; each test makes its
//! own database and drops it).
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::sync::Arc;

use careflow_store::sqlite::DbUrl;
use careflow_store::{Database, NewSubscriber, StoreError, open_database};

fn unique(prefix: &str) -> String {
    let mut b = [0u8; 6];
    getrandom_bytes(&mut b);
    format!("{prefix}_{}_{}", std::process::id(), hex(&b))
}

fn getrandom_bytes(b: &mut [u8]) {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    for (i, x) in b.iter_mut().enumerate() {
        *x = (t >> (i * 8)) as u8 ^ (i as u8).wrapping_mul(97);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A database made for one test, dropped afterwards.
struct TestDb {
    url: String,
    drop_cmd: Option<(String, Vec<String>)>,
}

fn run(cmd: &str, args: &[String]) {
    let out = Command::new(cmd)
        .args(args)
        .env("PGPASSWORD", "careflow")
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (run scripts/ensure-services)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {} (run scripts/ensure-services)",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestDb {
    fn postgres() -> Self {
        let name = unique("cf");
        let base = ["-h", "127.0.0.1", "-U", "careflow", "-d", "postgres", "-c"].map(String::from);
        let mut create = base.to_vec();
        create.push(format!("CREATE DATABASE {name}"));
        run("psql", &create);
        let mut drop = base.to_vec();
        drop.push(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        Self {
            url: format!("postgres://careflow:careflow@127.0.0.1:5432/{name}"),
            drop_cmd: Some(("psql".into(), drop)),
        }
    }

    fn mariadb() -> Self {
        let name = unique("cf");
        let base = ["-h", "127.0.0.1", "-u", "careflow", "-pcareflow", "-e"].map(String::from);
        let mut create = base.to_vec();
        create.push(format!("CREATE DATABASE {name}"));
        run("mariadb", &create);
        let mut drop = base.to_vec();
        drop.push(format!("DROP DATABASE IF EXISTS {name}"));
        Self {
            url: format!("mysql://careflow:careflow@127.0.0.1:3306/{name}"),
            drop_cmd: Some(("mariadb".into(), drop)),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((cmd, args)) = self.drop_cmd.take() {
            let _ = Command::new(cmd)
                .args(args)
                .env("PGPASSWORD", "careflow")
                .output();
        }
    }
}

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
