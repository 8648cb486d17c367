//! The audit trail (issue 20): admin and credential actions through the API and the CLI
//! become hash-chained entries in the subscriber database (SQLite, PostgreSQL, MariaDB);
//! `careflow-sip audit verify` passes on the untouched chain and names the entry when a row
//! is edited, removed or reordered directly in the database, and a signed checkpoint catches
//! the newest entries removed.

use serde_json::Value;

use crate::api::http;
use crate::support::*;
use careflow_test_support::db_cli;

const DOMAIN: &str = "audit.test";

/// SQL run directly against the server's database, as someone with database access would.
enum Db<'a> {
    Sqlite(std::path::PathBuf),
    Other(&'a TestDb),
}

impl Db<'_> {
    fn exec(&self, sql: &str) {
        match self {
            Db::Sqlite(path) => {
                let c = rusqlite::Connection::open(path).unwrap();
                c.execute_batch(sql).unwrap();
            }
            Db::Other(db) => {
                let name = db.url.rsplit('/').next().unwrap().to_string();
                if db.url.starts_with("postgres") {
                    db_cli(
                        "psql",
                        &[
                            "-h",
                            "127.0.0.1",
                            "-U",
                            "careflow",
                            "-d",
                            &name,
                            "-v",
                            "ON_ERROR_STOP=1",
                            "-c",
                            sql,
                        ]
                        .map(str::to_string),
                    );
                } else {
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
                            sql,
                        ]
                        .map(str::to_string),
                    );
                }
            }
        }
    }
}

/// `audit verify` with `args`: Ok(its output) or Err(its error).
fn verify(server: &Server, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["audit", "verify"];
    all.extend_from_slice(args);
    let o = server.cli(&all);
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

fn trail(db: Option<&TestDb>) {
    let env: Vec<(&str, &str)> = db
        .map(|d| vec![("DB_URL", d.url.as_str())])
        .unwrap_or_default();
    let server = Server::start_with(DOMAIN, &env);
    let sql = match db {
        Some(d) => Db::Other(d),
        None => Db::Sqlite(server.data_dir().join("careflow.db")),
    };
    // Through the CLI: a key and two users.
    let out = server.cli_ok(&["apikey", "create", "ops"]);
    let key = out.lines().last().unwrap().trim().to_string();
    server.add_user("2001", "pw-2001");
    server.add_user("2002", "pw-2002");
    // Through the API: a subscriber disabled and enabled, call records read.
    for action in ["disable", "enable"] {
        let (code, _, _) = http(
            &server,
            "POST",
            &format!("/api/admin/subscribers/2001/{action}"),
            Some(&key),
            None,
        );
        assert_eq!(code, 204);
    }
    let (code, _, _) = http(&server, "GET", "/api/admin/calls", Some(&key), None);
    assert_eq!(code, 200);
    let (code, _, page) = http(
        &server,
        "GET",
        "/api/admin/audit?limit=100",
        Some(&key),
        None,
    );
    assert_eq!(code, 200, "{page}");
    let entries = page["entries"].as_array().unwrap();
    let actions: Vec<&str> = entries
        .iter()
        .rev()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "apikey.created",
            "credentials.created",
            "credentials.created",
            "subscriber.disabled",
            "subscriber.enabled",
            "calls.read",
        ],
        "{page:#}"
    );
    let disabled = &entries[2];
    assert_eq!(disabled["actor"], "apikey:ops", "{disabled}");
    assert_eq!(disabled["source"], "127.0.0.1", "{disabled}");
    assert_eq!(disabled["target"], format!("2001@{DOMAIN}"), "{disabled}");
    assert_eq!(disabled["outcome"], "ok", "{disabled}");
    assert_eq!(entries[5]["source"], "local", "the CLI's own entries");
    assert!(
        !page.to_string().contains("pw-2001") && !page.to_string().contains(&key),
        "no secret in the trail: {page}"
    );
    // Filters; the read itself was audited.
    let (_, _, only) = http(
        &server,
        "GET",
        "/api/admin/audit?action=subscriber.disabled",
        Some(&key),
        None,
    );
    assert_eq!(only["entries"].as_array().unwrap().len(), 1, "{only}");
    let (code, _, p) = http(&server, "GET", "/api/admin/audit?limit=0", Some(&key), None);
    assert_eq!((code, p["field"].as_str()), (400, Some("limit")), "{p}");

    // Exported as CSV: the header and every entry, newest first, the export itself audited.
    let (code, head, csv) = crate::records::download(&server, &key, "/api/admin/audit/export");
    assert_eq!(code, 200, "{head}");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 10, "a header and 9 entries: {csv}");
    assert!(lines[0].starts_with("seq,at,actor,source,action,"), "{csv}");
    assert!(
        lines[1].starts_with("9,") && lines[1].contains(",audit.exported,"),
        "{csv}"
    );

    // Untouched: verified (9 entries: 6 above, two audit reads, the export).
    let ok = verify(&server, &[]).unwrap();
    assert!(ok.contains("verified: 9 entries"), "{ok}");
    let checkpoint = server.cli_ok(&["audit", "checkpoint"]);
    let cp: Value = serde_json::from_str(checkpoint.trim()).unwrap();
    assert_eq!(cp["seq"], 9, "{cp}");
    let tmp = tempfile::tempdir().unwrap();
    let cp_file = tmp.path().join("checkpoint.json");
    std::fs::write(&cp_file, &checkpoint).unwrap();
    let cp_path = cp_file.to_str().unwrap();
    let ok = verify(&server, &["--checkpoint", cp_path]).unwrap();
    assert!(
        ok.contains("10 entries") && ok.contains("1 checkpoint(s) match"),
        "{ok}"
    );

    // Edited.
    sql.exec("UPDATE audit_log SET target = '2002@audit.test' WHERE seq = 4");
    let e = verify(&server, &[]).unwrap_err();
    assert!(e.contains("entry 4 was edited"), "{e}");
    sql.exec("UPDATE audit_log SET target = '2001@audit.test' WHERE seq = 4");
    verify(&server, &[]).unwrap();

    // Reordered: entries 2 and 3 swap places (their seq numbers kept continuous).
    sql.exec("UPDATE audit_log SET seq = 1002 WHERE seq = 2");
    sql.exec("UPDATE audit_log SET seq = 2 WHERE seq = 3");
    sql.exec("UPDATE audit_log SET seq = 3 WHERE seq = 1002");
    let e = verify(&server, &[]).unwrap_err();
    assert!(e.contains("entry 2 does not follow entry 1"), "{e}");
    sql.exec("UPDATE audit_log SET seq = 1002 WHERE seq = 2");
    sql.exec("UPDATE audit_log SET seq = 2 WHERE seq = 3");
    sql.exec("UPDATE audit_log SET seq = 3 WHERE seq = 1002");
    verify(&server, &[]).unwrap();

    // Removed from the middle.
    sql.exec("DELETE FROM audit_log WHERE seq = 5");
    let e = verify(&server, &[]).unwrap_err();
    assert!(
        e.contains("entries 5 to 5 were removed: entry 6 follows entry 4"),
        "{e}"
    );

    // The newest entries removed: the chain alone cannot tell, the checkpoint can.
    let (_, _, fresh) = http(&server, "GET", "/api/admin/audit?limit=1", Some(&key), None);
    assert!(fresh["entries"][0]["seq"].as_u64().unwrap() >= 10);
    sql.exec("DELETE FROM audit_log WHERE seq >= 5");
    let ok = verify(&server, &[]).unwrap();
    assert!(ok.contains("verified: 4 entries"), "{ok}");
    let e = verify(&server, &["--checkpoint", cp_path]).unwrap_err();
    assert!(e.contains("entries 5 to 9 were removed"), "{e}");

    // A checkpoint signed by another key, or altered, is refused.
    let e = verify(
        &server,
        &["--checkpoint", cp_path, "--public-key", &"ab".repeat(32)],
    )
    .unwrap_err();
    assert!(e.contains("signed by another key"), "{e}");
    let forged = checkpoint.replace(&format!("\"seq\":{}", cp["seq"]), "\"seq\":3");
    std::fs::write(&cp_file, forged).unwrap();
    let e = verify(&server, &["--checkpoint", cp_path]).unwrap_err();
    assert!(e.contains("signature does not match"), "{e}");
}

#[test]
fn the_audit_trail_names_the_entry_edited_removed_or_reordered_on_sqlite() {
    trail(None);
}

#[test]
fn the_audit_trail_names_the_entry_edited_removed_or_reordered_on_postgresql() {
    trail(Some(&TestDb::postgres()));
}

#[test]
fn the_audit_trail_names_the_entry_edited_removed_or_reordered_on_mariadb() {
    trail(Some(&TestDb::mariadb()));
}

/// A certificate authority and a certificate for 127.0.0.1 signed by it (openssl), in `dir`:
/// (ca.pem, cert.pem, key.pem).
fn collector_certificate(dir: &std::path::Path) -> (String, String, String) {
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let run = |args: &[&str]| {
        let o = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.pem"),
        "-days",
        "2",
        "-subj",
        "/CN=SIEM test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &p("key.pem"),
        "-out",
        &p("req.csr"),
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &p("req.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-out",
        &p("cert.pem"),
        "-days",
        "2",
        "-extfile",
        &p("ext.cnf"),
    ]);
    (p("ca.pem"), p("cert.pem"), p("key.pem"))
}

/// Audit entries reach a SIEM's syslog collector (openssl s_server standing in) over TLS as
/// RFC 5424 messages with RFC 5425 framing, those of the CLI too; none is lost while the
/// collector is away.
#[test]
fn audit_entries_reach_a_syslog_collector_over_tls() {
    use std::process::{Command, Stdio};
    require("openssl", "openssl");
    let tmp = tempfile::tempdir().unwrap();
    let (ca, cert, key) = collector_certificate(tmp.path());
    let port = free_port();
    let collector = || {
        let mut c = Command::new("openssl")
            .args([
                "s_server",
                "-accept",
                &port.to_string(),
                "-cert",
                &cert,
                "-key",
                &key,
            ])
            .args(["-quiet", "-naccept", "1"])
            // s_server ends the connection when its stdin ends: kept open (with the child).
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server");
        let out = c.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        // RFC 5425 frames end with no line break: pass on whatever arrives.
        std::thread::spawn(move || {
            use std::io::Read as _;
            let mut out = out;
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
        (c, rx)
    };
    // The collector is not there yet: entries wait.
    let server = Server::start_with(
        DOMAIN,
        &[
            ("AUDIT_SYSLOG", &format!("tls://127.0.0.1:{port}")),
            ("TLS_CA_FILE", &ca),
        ],
    );
    server.cli_ok(&["apikey", "create", "siem"]);
    server.add_user("2001", "pw-2001");
    std::thread::sleep(std::time::Duration::from_secs(3));
    let (mut c, lines) = collector();
    let mut got = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !got.contains("credentials.created") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) => got.push_str(&l),
            Err(_) => panic!("the collector got only: {got}\n{}", server.log()),
        }
    }
    let _ = c.kill();
    let _ = c.wait();
    // RFC 5425 framing: the length, a space, then the RFC 5424 message.
    let (len, rest) = got.split_once(' ').unwrap();
    let first_len: usize = len
        .parse()
        .unwrap_or_else(|_| panic!("no frame length: {got}"));
    let first = &rest[..first_len];
    assert!(
        first.starts_with("<85>1 ")
            && first.contains(" careflow-sip ")
            && first.contains(" apikey.created [audit@32473 seq=\"1\" actor=\"cli"),
        "{first}"
    );
    assert!(
        got.contains("seq=\"2\"") && got.contains("credentials.created"),
        "{got}"
    );
    assert!(got.contains(&format!("target=\"2001@{DOMAIN}\"")), "{got}");
    assert!(!got.contains("pw-2001"), "no secret: {got}");
    // The next entries go once the collector is back, with no entry sent twice.
    let (mut c, lines) = collector();
    server.add_user("2002", "pw-2002");
    let mut again = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !again.contains("2002@") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) => again.push_str(&l),
            Err(_) => panic!("after the collector came back: {again}\n{}", server.log()),
        }
    }
    let _ = c.kill();
    let _ = c.wait();
    assert!(
        again.contains("seq=\"3\"") && !again.contains("seq=\"1\""),
        "{again}"
    );
}
