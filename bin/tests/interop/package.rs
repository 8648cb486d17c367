//! The Debian package: built by scripts/package-deb from the binary under test, installed with
//! dpkg on this machine (the test needs root, like CI here has), run the way its systemd unit
//! runs it (its user, its configuration file, its data directory), used by a sipp phone, then
//! purged without a trace.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::peers::{register_contact_at, sipp_file};
use crate::support::*;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `careflow-sip ARGS` as the service user, with the package's configuration file.
fn as_service(env: &[(&str, String)], args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        "careflow-sip",
        "--regid",
        "careflow-sip",
        "--init-groups",
        "/usr/bin/careflow-sip",
        "--config",
        "/etc/careflow-sip/careflow-sip.toml",
    ])
    .args(args)
    .env_clear()
    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_debian_package_installs_a_working_registrar_and_purges_clean() {
    require("dpkg-deb", "dpkg");
    require("systemd-analyze", "systemd");
    require("sipp", "sip-tester");
    let uid = run(Command::new("id").arg("-u"));
    assert_eq!(
        uid.trim(),
        "0",
        "installing a package needs root (CI runs as root); run scripts/test as root"
    );
    let tmp = tempfile::tempdir().unwrap();
    let deb = run(
        Command::new(interop_dir().join("../../../scripts/package-deb"))
            .args(["--binary", BIN, "--out"])
            .arg(tmp.path()),
    );
    let deb = deb.trim().to_string();
    let contents = run(Command::new("dpkg-deb").args(["--contents", &deb]));
    for f in [
        "./usr/bin/careflow-sip",
        "./lib/systemd/system/careflow-sip.service",
        "./etc/careflow-sip/careflow-sip.toml",
        "./usr/share/doc/careflow-sip/migration.md",
    ] {
        assert!(
            contents.contains(f),
            "{f} missing from the package:\n{contents}"
        );
    }
    // A leftover from an interrupted run goes first.
    let _ = Command::new("dpkg")
        .args(["--purge", "careflow-sip"])
        .output();

    run(Command::new("dpkg").args(["-i", &deb]));
    let unit = std::fs::read_to_string("/lib/systemd/system/careflow-sip.service").unwrap();
    for hardening in [
        "User=careflow-sip",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(hardening), "{hardening}");
    }
    let verify = Command::new("systemd-analyze")
        .args(["verify", "/lib/systemd/system/careflow-sip.service"])
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    run(Command::new("getent").args(["passwd", "careflow-sip"]));
    let owner = run(Command::new("stat").args(["-c", "%U %a", "/var/lib/careflow-sip"]));
    assert_eq!(owner.trim(), "careflow-sip 750");

    // As the unit runs it; ports and domain from the environment, as /etc/default allows.
    let (sip, http) = (free_port(), free_port());
    let env = vec![
        (
            "SIP_LISTEN",
            format!("udp:127.0.0.1:{sip},tcp:127.0.0.1:{sip}"),
        ),
        ("HTTP_LISTEN", format!("127.0.0.1:{http}")),
        ("SIP_DOMAIN", "localhost".to_string()),
        ("SECURITY_ALLOWLIST", "127.0.0.1".to_string()),
    ];
    run(&mut as_service(&env, &["check-config"]));
    let service = Service(
        as_service(&env, &["serve"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut healthy = false;
    for _ in 0..100 {
        if http_get_at(http, "/healthz").is_some_and(|(code, _, _)| code == 200) {
            healthy = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(healthy, "the packaged server did not become healthy");
    run(&mut as_service(
        &env,
        &["user", "add", "pkguser", "--password", "pw-pkg-user"],
    ));
    let users = sipp_file(tmp.path(), "pkg.csv", &[("pkguser", "pw-pkg-user")]);
    assert!(register_contact_at(
        ([127, 0, 0, 1], sip).into(),
        "localhost",
        &users,
        free_port(),
        "udp",
    ));
    let regs = run(&mut as_service(&env, &["registrations", "pkguser"]));
    assert!(regs.contains("pkguser"), "{regs}");
    drop(service);

    run(Command::new("dpkg").args(["--purge", "careflow-sip"]));
    for gone in [
        "/usr/bin/careflow-sip",
        "/lib/systemd/system/careflow-sip.service",
        "/etc/careflow-sip",
        "/etc/default/careflow-sip",
        "/var/lib/careflow-sip",
        "/usr/share/doc/careflow-sip",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
    let user = Command::new("getent")
        .args(["passwd", "careflow-sip"])
        .output()
        .unwrap();
    assert!(
        !user.status.success(),
        "the careflow-sip user is left after purge"
    );
}
