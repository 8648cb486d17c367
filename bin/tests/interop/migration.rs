//! Moving from the seed's Kamailio + MySQL set-up: the `subscriber` table (Kamailio's own
//! schema from kamailio-mysql-modules, plus the seed design's CareFlow columns) is imported
//! from a real MariaDB, and the imported users register with the passwords they already had.

use std::process::{Command, Stdio};

use careflow_proto::digest::{Algorithm, ha1};

use crate::peers::{register_contact, sipp_file};
use crate::support::*;

fn kamailio_schema(file: &str) -> std::path::PathBuf {
    let p = std::path::Path::new("/usr/share/kamailio/mysql").join(file);
    assert!(
        p.exists(),
        "{} missing: run scripts/test (it installs kamailio-mysql-modules)",
        p.display()
    );
    p
}

/// Runs SQL (from `file`, or the statement `sql`) in database `db` as the test role.
fn mariadb(db: &str, file: Option<&std::path::Path>, sql: Option<&str>) {
    let mut cmd = Command::new("mariadb");
    cmd.args(["-h", "127.0.0.1", "-u", "careflow", "-pcareflow", db]);
    if let Some(s) = sql {
        cmd.args(["-e", s]);
    }
    cmd.stdin(match file {
        Some(f) => Stdio::from(std::fs::File::open(f).unwrap()),
        None => Stdio::null(),
    });
    let out = cmd.output().expect("run mariadb");
    assert!(
        out.status.success(),
        "mariadb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kamailio_subscribers_are_imported_from_mariadb_and_keep_their_passwords() {
    require("sipp", "sip-tester");
    let kam = TestDb::mariadb();
    let db = kam.url.rsplit('/').next().unwrap().to_string();
    mariadb(&db, Some(&kamailio_schema("standard-create.sql")), None);
    mariadb(&db, Some(&kamailio_schema("auth_db-create.sql")), None);
    mariadb(
        &db,
        None,
        Some(
            "ALTER TABLE subscriber ADD email VARCHAR(64), ADD careflow_user_id VARCHAR(64), \
             ADD careflow_care4w_id VARCHAR(64)",
        ),
    );
    let md5 = |u: &str, d: &str, p: &str| ha1(Algorithm::Md5, u, d, p);
    let rows = [
        // Kamailio with its password column: plain text next to the HA1.
        format!(
            "('anna', 'localhost', 'anna-old-pw', '{}', '', 'anna@clinic.example', 'uid-anna', 'c4w-1')",
            md5("anna", "localhost", "anna-old-pw")
        ),
        // Only the HA1 (calculate_ha1 off, password column empty).
        format!(
            "('ben', 'localhost', '', '{}', '', NULL, 'uid-ben', NULL)",
            md5("ben", "localhost", "ben-old-secret")
        ),
        "('carl', 'other.example', 'carl-pw', '', '', NULL, NULL, NULL)".to_string(),
        "('dora', 'localhost', '', '', '', NULL, NULL, NULL)".to_string(),
    ];
    mariadb(
        &db,
        None,
        Some(&format!(
            "INSERT INTO subscriber (username, domain, password, ha1, ha1b, email, \
             careflow_user_id, careflow_care4w_id) VALUES {}",
            rows.join(", ")
        )),
    );

    let server = Server::start("localhost");
    let dry = server.cli_ok(&["user", "import-kamailio", &kam.url, "--dry-run"]);
    assert!(dry.contains("would import 2 of 4"), "{dry}");
    assert!(server.bindings_of("anna").is_empty());
    let out = server.cli_ok(&["user", "import-kamailio", &kam.url]);
    assert!(
        out.contains("imported 2 of 4 subscriber(s): 1 from plain passwords")
            && out.contains("1 with their HA1 only"),
        "{out}"
    );
    assert!(
        out.contains("skipped carl@other.example: domain `other.example` is not `localhost`"),
        "{out}"
    );
    assert!(
        out.contains("skipped dora@localhost: it has neither a password nor an ha1"),
        "{out}"
    );
    // Again: nothing changes.
    let again = server.cli_ok(&["user", "import-kamailio", &kam.url]);
    assert!(
        again.contains("imported 0 of 4")
            && again.contains("skipped anna@localhost: exists already"),
        "{again}"
    );

    // Both register with the passwords they had under Kamailio (sipp, digest MD5).
    let tmp = tempfile::tempdir().unwrap();
    let anna = sipp_file(tmp.path(), "anna.csv", &[("anna", "anna-old-pw")]);
    register_contact(&server, &anna, free_port(), "udp");
    let ben = sipp_file(tmp.path(), "ben.csv", &[("ben", "ben-old-secret")]);
    register_contact(&server, &ben, free_port(), "udp");
    assert_eq!(server.bindings_of("anna").len(), 1);
    assert_eq!(server.bindings_of("ben").len(), 1);
    let ua = Ua::new(server.sip_addr());
    let wrong = ua.register("ben", "not-bens-password", "localhost", "mig-wrong", "");
    assert_ne!(status(&wrong), 200, "{wrong}");

    // The CareFlow columns came along; the plain password did not.
    let list = server.cli_ok(&["user", "list"]);
    assert!(
        list.contains("anna") && list.contains("anna@clinic.example"),
        "{list}"
    );
    for entry in std::fs::read_dir(server.data_dir()).unwrap().flatten() {
        let bytes = std::fs::read(entry.path()).unwrap_or_default();
        assert!(
            !bytes.windows(11).any(|w| w == b"anna-old-pw"),
            "{} holds the plain password",
            entry.path().display()
        );
    }
}
