//! Operating careflow-sip: backup and restore of the embedded store.

use crate::support::*;

fn register(server: &Server, user: &str, password: &str, call_id: &str) -> u16 {
    let ua = Ua::new(server.sip_addr());
    status(&ua.register(user, password, "localhost", call_id, ""))
}

#[test]
fn a_backup_taken_while_running_brings_back_users_keys_and_registrations() {
    let mut server = Server::start("localhost");
    server.add_user("eve", "pw-eve-backup");
    server.cli_ok(&["apikey", "create", "ops-desk"]);
    assert_eq!(register(&server, "eve", "pw-eve-backup", "bk-1"), 200);
    assert_eq!(server.bindings_of("eve").len(), 1);

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("backup-1");
    let out = server.cli_ok(&["backup", dir.to_str().unwrap()]);
    for line in [
        "careflow.db: copied",
        "location.db: copied",
        "secret: copied",
    ] {
        assert!(out.contains(line), "{out}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode, 0o700,
            "a backup holds password digests and the secret"
        );
    }
    // Not over an existing backup, and not into a running server.
    let again = server.cli(&["backup", dir.to_str().unwrap()]);
    assert!(!again.status.success());
    let running = server.cli(&["restore", dir.to_str().unwrap()]);
    assert!(!running.status.success());
    assert!(
        String::from_utf8_lossy(&running.stderr).contains("stop it before restoring"),
        "{}",
        String::from_utf8_lossy(&running.stderr)
    );

    // The disk is lost.
    server.stop();
    for e in std::fs::read_dir(server.data_dir()).unwrap().flatten() {
        let _ = std::fs::remove_file(e.path());
    }
    let out = server.cli_ok(&["restore", dir.to_str().unwrap()]);
    assert!(out.contains("restore complete"), "{out}");
    server.start_again();
    assert_eq!(server.bindings_of("eve").len(), 1, "{}", server.log());
    assert_eq!(register(&server, "eve", "pw-eve-backup", "bk-2"), 200);
    assert!(server.cli_ok(&["apikey", "list"]).contains("ops-desk"));

    // A backup from a newer careflow-sip (a schema this one does not know) is refused, and
    // nothing is touched.
    let newer = tmp.path().join("backup-newer");
    server.cli_ok(&["backup", newer.to_str().unwrap()]);
    server.stop();
    let conn = rusqlite::Connection::open(newer.join("careflow.db")).unwrap();
    conn.execute(
        "INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)",
        [],
    )
    .unwrap();
    drop(conn);
    let refused = server.cli(&["restore", newer.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("newer than this careflow-sip"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    server.start_again();
    assert_eq!(register(&server, "eve", "pw-eve-backup", "bk-3"), 200);
}
