//! Operating careflow-sip: backup and restore of the embedded store.

use std::process::Command;

use crate::support::*;

/// The command failed and its error says `what`.
fn fails_saying(out: &std::process::Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(what), "{err}");
}

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
        "location.journal: copied",
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
    fails_saying(
        &server.cli(&["restore", dir.to_str().unwrap()]),
        "stop it before restoring",
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
    // A real phone (sipp) authenticates against the restored subscriber.
    let eve = crate::peers::sipp_file(tmp.path(), "eve.csv", &[("eve", "pw-eve-backup")]);
    crate::peers::register_contact(&server, &eve, free_port(), "udp");
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
    fails_saying(
        &server.cli(&["restore", newer.to_str().unwrap()]),
        "newer than this careflow-sip",
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

/// One REGISTER as a UDP phone does it (challenge, then credentials), resending every 500 ms
/// for 4 s like Timer E; the final status, or None when nothing answered.
fn register_like_a_phone(ua: &Ua, user: &str, password: &str, call_id: &str) -> Option<u16> {
    use careflow_proto::digest::Algorithm;
    let exchange = |msg: &str| -> Option<String> {
        for _ in 0..8 {
            ua.send(msg);
            if let Some(r) = ua.recv() {
                return Some(r);
            }
        }
        None
    };
    let first = exchange(&ua.register_msg(user, "localhost", call_id, 1, ""))?;
    if status(&first) != 401 {
        return Some(status(&first));
    }
    let auth = authorization(
        &first,
        Algorithm::Md5,
        user,
        "localhost",
        password,
        "REGISTER",
        "sip:localhost",
        1,
    );
    let second = exchange(&ua.register_msg(
        user,
        "localhost",
        call_id,
        2,
        &format!("Authorization: {auth}\r\n"),
    ))?;
    Some(status(&second))
}

#[test]
fn sigterm_under_load_loses_no_binding_and_answers_every_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use crate::peers::{answer_with_sdp, call_bob};

    let mut server = Server::start_with("localhost", &[("SHUTDOWN_GRACE", "2")]);
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("users.csv");
    let mut rows = String::new();
    for i in 0..100 {
        rows.push_str(&format!("u{i},pw-load-{i}\n"));
    }
    std::fs::write(&csv, rows).unwrap();
    server.cli_ok(&["user", "import", csv.to_str().unwrap()]);
    server.add_user("alice", "pw-alice-term");
    server.add_user("bob", "pw-bob-term");
    let bob = Ua::new(server.sip_addr());
    assert_eq!(
        status(&bob.register("bob", "pw-bob-term", "localhost", "term-bob", "")),
        200
    );

    // Phones keep registering, one request after the other, through the shutdown.
    let addr = server.sip_addr();
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (done, stop) = (done.clone(), stop.clone());
        std::thread::spawn(move || {
            let ua = Ua::new(addr);
            ua.sock
                .set_read_timeout(Some(std::time::Duration::from_millis(500)))
                .unwrap();
            let mut results = Vec::new();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let i = n % 100;
                let r = register_like_a_phone(
                    &ua,
                    &format!("u{i}"),
                    &format!("pw-load-{i}"),
                    &format!("load-{n}"),
                );
                results.push(r);
                n += 1;
                done.store(n, Ordering::Relaxed);
                if r.is_none() {
                    break;
                }
            }
            results
        })
    };
    while done.load(Ordering::Relaxed) < 100 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    // A call is ringing when SIGTERM comes.
    let alice = Ua::new(server.sip_addr());
    call_bob(&alice, "pw-alice-term", "term-call");
    let invite = expect(&bob, "INVITE ");
    answer_with_sdp(&bob, &invite, 180, 4000);
    expect(&alice, "SIP/2.0 180");
    server.signal("TERM");

    // Draining: a new call is turned away at once, with a Retry-After.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let carol = Ua::new(server.sip_addr());
    let port = carol.port();
    carol.send(&format!(
        "INVITE sip:bob@localhost SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKcarol1;rport\r\nMax-Forwards: 70\r\nFrom: <sip:carol@localhost>;tag=c1\r\nTo: <sip:bob@localhost>\r\nCall-ID: term-new-call\r\nCSeq: 1 INVITE\r\nContact: <sip:carol@127.0.0.1:{port}>\r\nContent-Length: 0\r\n\r\n"
    ));
    let refused = expect(&carol, "SIP/2.0 503");
    assert!(refused.contains("Retry-After: 5"), "{refused}");

    // The grace period ends: the ringing phone gets a CANCEL and the caller a 503.
    let cancel = expect(&bob, "CANCEL ");
    answer_with_sdp(&bob, &cancel, 200, 4000);
    let last = expect(&alice, "SIP/2.0 503");
    assert!(last.contains("CSeq: 2 INVITE"), "{last}");
    server.stop();
    stop.store(true, Ordering::Relaxed);
    let results = load.join().unwrap();
    let log = server.log();
    assert!(log.contains("draining"), "{log}");
    assert!(log.contains("grace period over"), "{log}");

    // Every request got a final response while the server listened: only the very last one,
    // sent after it had gone, may be unanswered.
    let unanswered = results.iter().filter(|r| r.is_none()).count();
    assert!(
        unanswered <= 1 && results[..results.len() - 1].iter().all(Option::is_some),
        "{results:?}"
    );
    assert!(
        results.iter().flatten().all(|c| *c == 200 || *c == 503),
        "{results:?}"
    );
    // Registrations during the drain were turned away with 503 (the phones retry elsewhere).
    assert!(results.contains(&Some(503)), "{results:?}");

    // Every phone that registered is still registered after the restart.
    server.start_again();
    let all = server.cli_ok(&["registrations"]);
    for i in 0..100 {
        assert!(
            all.contains(&format!("u{i}@localhost")),
            "u{i} lost its binding:\n{all}"
        );
    }
    assert!(all.contains("bob@localhost"));
}

#[test]
fn sighup_applies_limits_and_the_log_level_and_names_what_needs_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("careflow-sip.toml");
    std::fs::write(
        &file,
        "security_auth_failures = 5\nlog_level = \"info\"\nmax_contacts = 10\n",
    )
    .unwrap();
    // RUST_LOG would decide the log filter; unset, LOG_LEVEL does.
    let server = Server::start_with(
        "localhost",
        &[
            ("CAREFLOW_CONFIG", file.to_str().unwrap()),
            ("RUST_LOG", ""),
        ],
    );
    server.add_user("frank", "pw-frank-hup");
    // Two wrong passwords from one address: not enough for a ban at 5.
    let guesser = Ua::from_ip(server.sip_addr(), "127.0.0.5");
    for i in 0..2 {
        let r = guesser.register("frank", "wrong", "localhost", &format!("hup-a{i}"), "");
        assert_eq!(status(&r), 401, "{r}");
    }
    assert!(!server.log().contains("DEBUG"));

    std::fs::write(
        &file,
        "security_auth_failures = 2\nlog_level = \"debug\"\nmax_contacts = 3\n",
    )
    .unwrap();
    server.signal("HUP");
    assert!(
        server.log_shows("configuration reloaded"),
        "{}",
        server.log()
    );
    let log = server.log();
    assert!(
        log.contains("SECURITY_AUTH_FAILURES") && log.contains("LOG_LEVEL"),
        "{log}"
    );
    assert!(
        log.contains("need a restart") && log.contains("MAX_CONTACTS"),
        "{log}"
    );

    // The new threshold applies at once: two more wrong passwords and the address is banned.
    let other = Ua::from_ip(server.sip_addr(), "127.0.0.6");
    other
        .sock
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    for i in 0..2 {
        // The answer to the second may never come: that is the ban.
        let _ = register_like_a_phone(&other, "frank", "wrong", &format!("hup-b{i}"));
    }
    let mut banned = false;
    for _ in 0..50 {
        if server.cli_ok(&["bans"]).contains("127.0.0.6") {
            banned = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(banned, "{}", server.log());
    // And the log level: a dropped datagram is now logged at debug level.
    let ok = Ua::new(server.sip_addr());
    ok.send("this is not SIP\r\n\r\n");
    assert!(server.log_shows("DEBUG"), "{}", server.log());

    // A broken file changes nothing and says so.
    std::fs::write(&file, "security_auth_failures = \"many\"\n").unwrap();
    server.signal("HUP");
    assert!(
        server.log_shows("no setting was changed"),
        "{}",
        server.log()
    );
}

/// A backup made by a version that kept registrations in SQLite (`location.db`) restores:
/// the server imports that journal on start, in place of the journal it replaces.
#[test]
fn a_backup_with_the_sqlite_journal_of_an_earlier_version_restores() {
    let mut server = Server::start("localhost");
    server.add_user("finn", "pw-finn-legacy");
    assert_eq!(register(&server, "finn", "pw-finn-legacy", "lg-1"), 200);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("backup-0.1");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("careflow-sip-backup.txt"),
        "careflow-sip 0.1.0 backup\nlocation.db schema 2\n",
    )
    .unwrap();
    let conn = rusqlite::Connection::open(dir.join("location.db")).unwrap();
    conn.execute_batch(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL);
         INSERT INTO schema_migrations VALUES (1, 0), (2, 0);
         CREATE TABLE binding (id INTEGER PRIMARY KEY, aor TEXT NOT NULL, contact TEXT NOT NULL,
           call_id TEXT NOT NULL, cseq INTEGER NOT NULL, expires_at INTEGER NOT NULL,
           registered_at INTEGER NOT NULL, q INTEGER, instance TEXT, reg_id INTEGER,
           transport TEXT NOT NULL, source TEXT NOT NULL, user_agent TEXT, path TEXT);
         CREATE INDEX idx_binding_aor ON binding (aor);
         INSERT INTO binding VALUES (41, 'finn@localhost', '<sip:finn@192.0.2.44:5062>', 'old-1',
           1, 4102444800, 1764000000, NULL, NULL, NULL, 'udp', '192.0.2.44:5062',
           'Grandstream GXP2170', NULL);",
    )
    .unwrap();
    drop(conn);
    server.stop();
    let out = server.cli_ok(&["restore", dir.to_str().unwrap()]);
    assert!(out.contains("restore complete"), "{out}");
    let aside = std::fs::read_dir(server.data_dir())
        .unwrap()
        .flatten()
        .any(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.starts_with("location.journal.before-restore-")
        });
    assert!(aside, "the journal the restore replaces is kept");
    server.start_again();
    let finn = server.bindings_of("finn");
    assert_eq!(finn.len(), 1, "{finn:?} {}", server.log());
    assert!(finn[0].contains("192.0.2.44:5062"), "{finn:?}");
    assert!(server.data_dir().join("location.db.imported").exists());
    // Registering goes on in the journal it was imported into.
    assert_eq!(register(&server, "finn", "pw-finn-legacy", "lg-2"), 200);
    assert_eq!(server.bindings_of("finn").len(), 2);
}
