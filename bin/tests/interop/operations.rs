//! Operating careflow-sip: backup and restore of the embedded store.

use std::process::Command;

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

/// The repository root.
fn repo() -> std::path::PathBuf {
    interop_dir().join("../../..")
}

#[test]
fn the_container_files_are_valid_and_their_configuration_is_accepted() {
    require("openssl", "openssl");
    let venv = std::path::Path::new("/var/tmp/careflow-venv/bin");
    assert!(
        venv.join("check-jsonschema").exists(),
        "check-jsonschema missing: run scripts/test (it installs it into /var/tmp/careflow-venv)"
    );
    let compose = repo().join("contrib/docker/docker-compose.sip.yml");
    let check = Command::new(venv.join("check-jsonschema"))
        .args(["--builtin-schema", "vendor.compose-spec"])
        .arg(&compose)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "the compose file breaks the Compose Specification:\n{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // The careflow-sip service's environment, as compose hands it over, with the image's
    // configuration file, is accepted by check-config (certificates as the volume would
    // provide them).
    let env_json = Command::new(venv.join("python"))
        .args([
            "-c",
            "import sys, json, ruamel.yaml as y; \
             d = y.YAML(typ='safe').load(open(sys.argv[1])); \
             print(json.dumps(d['services']['careflow-sip']['environment']))",
        ])
        .arg(&compose)
        .output()
        .unwrap();
    assert!(env_json.status.success());
    let env: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&env_json.stdout).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = (
        tmp.path().join("fullchain.pem"),
        tmp.path().join("privkey.pem"),
    );
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=sip.compose.test",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(ok.status.success());
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "CAREFLOW_CONFIG",
            repo().join("contrib/docker/careflow-sip.toml"),
        );
    for (k, v) in &env {
        // ${NAME:?message} and ${NAME} get the values an operator would export.
        let v = v.as_str().unwrap_or_default();
        let v = v
            .replace("${SIP_DOMAIN:?set SIP_DOMAIN}", "sip.compose.test")
            .replace("${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}", "pw");
        assert!(
            !v.contains("${"),
            "{k}={v}: a variable the test does not know"
        );
        cmd.env(k, v);
    }
    cmd.env("TLS_CERT", &cert)
        .env("TLS_KEY", &key)
        .env("DATA_DIR", tmp.path().join("data"))
        .arg("check-config");
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("domain sip.compose.test"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The Dockerfile: two stages, an unprivileged numeric user, our health check, and only
    // sources that exist.
    let docker = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert_eq!(docker.matches("\nFROM ").count(), 2, "multi-stage");
    assert!(docker.contains("\nUSER 10001:10001\n"));
    assert!(docker.contains(r#"CMD ["/usr/bin/careflow-sip", "healthcheck"]"#));
    for line in docker
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(repo().join(src).exists(), "{line}: {src} does not exist");
        }
    }
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l == "target"));

    // `careflow-sip healthcheck`, the image's HEALTHCHECK: 0 when the server answers, 1 when not.
    let mut server = Server::start("localhost");
    let health = |server: &Server| {
        Command::new(BIN)
            .env_clear()
            .env("HTTP_LISTEN", format!("127.0.0.1:{}", server.http))
            .env("DATA_DIR", server.data_dir())
            .arg("healthcheck")
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(health(&server));
    server.stop();
    assert!(!health(&server));
}
