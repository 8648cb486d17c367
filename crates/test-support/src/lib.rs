//! What the tests of several crates share: a loud check that a tool is installed, free ports,
//! a database of its own on the real PostgreSQL or MariaDB server, an rtpengine daemon of its
//! own, the real server binary ([`Server`]) and a raw user agent with both digest
//! authentications ([`ua`]).
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::time::Duration;

pub mod push_service;
mod server;
pub mod ua;

pub use server::{Server, http_get_at};

/// Panics with an install hint when a tool is missing (a test that needs a tool never skips).
pub fn require(tool: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success());
    assert!(
        found.unwrap_or(false),
        "`{tool}` is not installed: run scripts/test (it installs the Debian package `{package}`)"
    );
}

/// A port free for both UDP and TCP on 127.0.0.1.
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port");
}

/// A database on the real PostgreSQL or MariaDB server (scripts/ensure-services makes the
/// `careflow` role), made for one test and dropped after it.
pub struct TestDb {
    /// The `DB_URL` of it.
    pub url: String,
    drop_args: (&'static str, Vec<String>),
}

static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs a database client (`psql`, `mariadb`) as the test role; panics with its error.
pub fn db_cli(cmd: &str, args: &[String]) {
    let out = Command::new(cmd)
        .args(args)
        .env("PGPASSWORD", "careflow")
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}: run scripts/ensure-services"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}: run scripts/ensure-services",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestDb {
    fn name() -> String {
        let n = DB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        format!("cf_it_{}_{n}_{t}", std::process::id())
    }

    /// A new PostgreSQL database.
    pub fn postgres() -> Self {
        require("psql", "postgresql-client");
        let base = ["-h", "127.0.0.1", "-U", "careflow", "-d", "postgres", "-c"];
        Self::create(
            "psql",
            &base,
            "postgres://careflow:careflow@127.0.0.1:5432",
            " WITH (FORCE)",
        )
    }

    /// A new MariaDB database.
    pub fn mariadb() -> Self {
        require("mariadb", "mariadb-client");
        let base = ["-h", "127.0.0.1", "-u", "careflow", "-pcareflow", "-e"];
        Self::create(
            "mariadb",
            &base,
            "mysql://careflow:careflow@127.0.0.1:3306",
            "",
        )
    }

    /// Creates a database with `cli` `base` SQL; `server` is the URL without the database,
    /// `drop_suffix` what the server's DROP DATABASE needs to end open sessions.
    fn create(cli: &'static str, base: &[&str], server: &str, drop_suffix: &str) -> Self {
        let name = Self::name();
        let with = |sql: String| {
            let mut args: Vec<String> = base.iter().map(|a| a.to_string()).collect();
            args.push(sql);
            args
        };
        db_cli(cli, &with(format!("CREATE DATABASE {name}")));
        Self {
            url: format!("{server}/{name}"),
            drop_args: (
                cli,
                with(format!("DROP DATABASE IF EXISTS {name}{drop_suffix}")),
            ),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = Command::new(self.drop_args.0)
            .args(&self.drop_args.1)
            .env("PGPASSWORD", "careflow")
            .output();
    }
}

/// An rtpengine daemon of its own (Debian's rtpengine-daemon, userspace forwarding on
/// loopback), killed when dropped.
pub struct Rtpengine {
    child: Child,
    /// Its ng control address, `127.0.0.1:PORT` (what `RTPENGINE` takes).
    pub ng: String,
    /// Its log (kept for failure messages).
    log: tempfile::NamedTempFile,
}

impl Rtpengine {
    /// Starts one with `extra` arguments and waits until it answers a ping. Its media ports are
    /// a range of its own inside 30000-49999 (the tests of one process run side by side, and
    /// the sipp scenarios expect rtpengine's ports there).
    pub fn start(extra: &[&str]) -> Self {
        require("rtpengine", "rtpengine-daemon");
        let ng = format!("127.0.0.1:{}", free_port());
        let cli = free_port();
        static NEXT: AtomicU16 = AtomicU16::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % 10;
        let base = 30000 + (std::process::id() % 20) as u16 * 1000 + n * 100;
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new("rtpengine")
            // Not the system's /etc/rtpengine/rtpengine.conf: its fixed HTTP port (2225) makes
            // a second daemon fail to start.
            .arg("--config-file=none")
            .args([
                "--interface=127.0.0.1",
                "--foreground",
                "--log-stderr",
                "--table=-1",
            ])
            .arg(format!("--listen-ng={ng}"))
            // Its CLI port defaults to 2224 for every instance.
            .arg(format!("--listen-cli=127.0.0.1:{cli}"))
            .arg(format!("--port-min={base}"))
            .arg(format!("--port-max={}", base + 99))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        // Owned before waiting, so a failed start still kills the process.
        let r = Self { child, ng, log };
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        for _ in 0..50 {
            let _ = s.send_to(b"ready1 d7:command4:pinge", &r.ng);
            let mut b = [0u8; 64];
            if s.recv(&mut b).is_ok() {
                return r;
            }
        }
        panic!("rtpengine did not start:\n{}", r.log_tail());
    }

    /// Its ng control address.
    pub fn ng_addr(&self) -> SocketAddr {
        self.ng.parse().unwrap()
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log.path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Kills it now (a test of rtpengine dying mid-call).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Rtpengine {
    fn drop(&mut self) {
        self.kill();
    }
}
