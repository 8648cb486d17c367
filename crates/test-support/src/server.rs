//! The real `careflow-sip` binary on free loopback ports with its own data directory and log,
//! driven like an operator would: environment, CLI, `/healthz` and `/metrics`, signals.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// One running server. Dropping it kills the process.
pub struct Server {
    bin: PathBuf,
    child: Option<Child>,
    pub port: u16,
    pub http: u16,
    /// Two more free ports for extra listeners: "{port2}" and "{port3}" in the environment.
    pub port2: u16,
    pub port3: u16,
    pub domain: String,
    /// The loopback address its SIP listeners are on (127.0.0.1 unless launched `on` another,
    /// so several nodes are told apart by address).
    pub host: std::net::Ipv4Addr,
    dir: tempfile::TempDir,
    extra_env: Vec<(String, String)>,
}

impl Server {
    /// Starts `bin` (the test's `CARGO_BIN_EXE_careflow-sip`) serving `domain`, with `env`
    /// on top of the test defaults; returns once `/healthz` answers.
    pub fn launch(bin: &Path, domain: &str, env: &[(&str, &str)]) -> Self {
        Self::launch_on(bin, std::net::Ipv4Addr::LOCALHOST, domain, env)
    }

    /// [`Self::launch`] with the SIP listeners on `host` (a loopback address); "{host}" in
    /// the environment stands for it.
    pub fn launch_on(
        bin: &Path,
        host: std::net::Ipv4Addr,
        domain: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let mut s = Self {
            host,
            bin: bin.to_path_buf(),
            child: None,
            port: free_port(),
            http: free_port(),
            port2: free_port(),
            port3: free_port(),
            domain: domain.to_string(),
            dir: tempfile::tempdir().unwrap(),
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        // A port found free can be taken before the server binds it (another test's client
        // socket gets it from the same ephemeral range): start again on other ports.
        for _ in 0..3 {
            match s.try_spawn() {
                Ok(()) => return s,
                Err(log) if log.contains("Address already in use") => {
                    (s.port, s.http, s.port2, s.port3) =
                        (free_port(), free_port(), free_port(), free_port());
                    std::fs::remove_file(s.log_path()).ok();
                }
                Err(log) => panic!("careflow-sip exited:\n{log}"),
            }
        }
        s.spawn();
        s
    }

    pub fn sip_addr(&self) -> SocketAddr {
        SocketAddr::from((self.host, self.port))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the log says `what` within ten seconds.
    pub fn log_shows(&self, what: &str) -> bool {
        for _ in 0..200 {
            if self.log().contains(what) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SIP_DOMAIN", &self.domain)
            .env(
                "SIP_LISTEN",
                format!("udp:{1}:{0},tcp:{1}:{0}", self.port, self.host),
            )
            .env("HTTP_LISTEN", format!("127.0.0.1:{}", self.http))
            .env("DATA_DIR", self.data_dir())
            // The test clients all send from 127.0.0.1, often hundreds of messages a second;
            // the flood and brute-force tests use other loopback addresses.
            .env("SECURITY_ALLOWLIST", "127.0.0.1")
            // Tests that stop a server with a call still ringing should not wait 30 s.
            .env("SHUTDOWN_GRACE", "2")
            .env("RUST_LOG", "info");
        for (k, v) in &self.extra_env {
            // "{port}" stands for the server's own SIP port (e.g. in a custom SIP_LISTEN).
            c.env(
                k,
                v.replace("{port}", &self.port.to_string())
                    .replace("{host}", &self.host.to_string())
                    .replace("{port2}", &self.port2.to_string())
                    .replace("{port3}", &self.port3.to_string()),
            );
        }
        c
    }

    fn spawn(&mut self) {
        if let Err(log) = self.try_spawn() {
            panic!("careflow-sip exited:\n{log}");
        }
    }

    /// Starts the server and waits for `/healthz`; its log when it exited instead.
    fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = self
            .command()
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start careflow-sip");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self
                .http_get("/healthz")
                .is_some_and(|(code, _)| code == 200)
            {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(format!("{status}:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("careflow-sip did not become healthy:\n{}", self.log());
    }

    /// Stops the server with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The server process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends a signal (e.g. "HUP") to the running server.
    pub fn signal(&self, name: &str) {
        if let Some(c) = self.child.as_ref() {
            let _ = Command::new("kill")
                .arg(format!("-{name}"))
                .arg(c.id().to_string())
                .status();
        }
    }

    /// Kills the server with SIGKILL (a crash).
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start_again(&mut self) {
        self.spawn();
    }

    /// Runs a CLI subcommand with the server's configuration.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .output()
            .expect("run careflow-sip")
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "careflow-sip {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn add_user(&self, user: &str, password: &str) {
        self.cli_ok(&["user", "add", user, "--password", password]);
    }

    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get_at(self.http, path).map(|(code, _, body)| (code, body))
    }

    /// Polls a metric until it has the value (up to 10 s); returns the last value seen.
    pub fn metric_becomes(&self, name: &str, want: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.metric(name);
            if v == want || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn metric(&self, name: &str) -> u64 {
        let (_, body) = self.http_get("/metrics").expect("metrics");
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing:\n{body}"))
    }

    /// `careflow-sip registrations USER` lines for that user.
    pub fn bindings_of(&self, user: &str) -> Vec<String> {
        let out = self.cli_ok(&["registrations", user]);
        out.lines()
            .filter(|l| l.starts_with(&format!("{user}@")))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.crash();
    }
}

/// A GET on 127.0.0.1:`port`: (status, head, body); None when nothing answers.
pub fn http_get_at(port: u16, path: &str) -> Option<(u16, String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split(' ').nth(1)?.parse().ok()?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    Some((code, head.to_string(), body.to_string()))
}
