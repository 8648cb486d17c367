//! A subscriber database that goes away and comes back (cut by a TCP proxy the test controls,
//! in front of the real PostgreSQL or MariaDB server): SIP authentication fails safe with 503,
//! the API answers 503, the logs say why, and the server recovers by itself.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

/// A TCP relay to `upstream` that can be cut (open connections reset, new ones closed at
/// once) and restored, or made slow (each chunk towards the upstream held for a while).
pub(crate) struct Relay {
    pub(crate) port: u16,
    up: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    pub(crate) fn to(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let delay_ms: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let (up2, open2, upstream) = (up.clone(), open.clone(), upstream.to_string());
        let delay2 = delay_ms.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !up2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                open2
                    .lock()
                    .unwrap()
                    .extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to, delay) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        Some(delay2.clone()),
                    ),
                    (server, client, None),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if let Some(ms) = delay.as_ref().map(|d| d.load(Ordering::SeqCst))
                                && ms > 0
                            {
                                std::thread::sleep(Duration::from_millis(ms));
                            }
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Self {
            port,
            up,
            open,
            delay_ms,
        }
    }

    /// Holds every later chunk towards the upstream for `ms` (0: none).
    pub(crate) fn slow_down(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    pub(crate) fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub(crate) fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// REGISTER with digest auth from a raw UA; returns the final status.
pub(crate) fn register_status(server: &Server, user: &str, pw: &str, call_id: &str) -> u16 {
    try_register_status(server, user, pw, call_id)
        .unwrap_or_else(|| panic!("no response to {user}'s REGISTER:\n{}", server.log()))
}

/// [`register_status`], none when a request got no response in time (a server still waiting
/// for its store, where a phone would retransmit).
pub(crate) fn try_register_status(
    server: &Server,
    user: &str,
    pw: &str,
    call_id: &str,
) -> Option<u16> {
    let ua = Ua::new(server.sip_addr());
    let r1 = ua.try_request(&ua.register_msg(user, &server.domain, call_id, 1, ""))?;
    if status(&r1) != 401 {
        return Some(status(&r1));
    }
    let auth = authorization(
        &r1,
        careflow_proto::digest::Algorithm::Md5,
        user,
        &server.domain,
        pw,
        "REGISTER",
        &format!("sip:{}", server.domain),
        1,
    );
    let r2 = ua.try_request(&ua.register_msg(
        user,
        &server.domain,
        call_id,
        2,
        &format!("Authorization: {auth}\r\n"),
    ))?;
    Some(status(&r2))
}

fn outage_and_recovery(db: TestDb, upstream: &str) {
    let relay = Relay::to(upstream);
    let mut url = db
        .url
        .replacen(upstream, &format!("127.0.0.1:{}", relay.port), 1);
    if url.starts_with("mysql://") {
        // mysql_async switches to the server's Unix socket when it finds one on this host,
        // which would go around the relay.
        url.push_str("?prefer_socket=false");
    }
    let server = Server::start_with("db.test", &[("DB_URL", url.as_str())]);
    server.add_user("nora", "pw-nora-db");
    server.add_user("otto", "pw-otto-db");
    assert_eq!(register_status(&server, "nora", "pw-nora-db", "db-1"), 200);

    relay.cut();
    // A user whose row is not in memory does not get in while the database is away, and the
    // caller is told to come back.
    let mut code = 0;
    for i in 0..20 {
        code = register_status(&server, "otto", "pw-otto-db", &format!("db-down-{i}"));
        if code == 503 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(code, 503, "{}", server.log());
    // A phone that registered within SUBSCRIBER_CACHE_TTL keeps its registration refreshed
    // from the cached row; a wrong password still fails.
    assert_eq!(
        register_status(&server, "nora", "pw-nora-db", "db-down-cached"),
        200
    );
    assert_ne!(
        register_status(&server, "nora", "not-her-password", "db-down-wrong"),
        200
    );
    assert!(
        server.log().contains("subscriber lookup failed"),
        "{}",
        server.log()
    );
    assert!(server.metric("careflow_sip_store_errors_total") >= 1);

    relay.restore();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let code = register_status(&server, "nora", "pw-nora-db", "db-back");
        if code == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery after the database came back (last {code}):\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Nothing was lost: the user is still there with the same password.
    let out = server.cli_ok(&["user", "list"]);
    assert!(out.contains("nora"), "{out}");
}

#[test]
fn postgresql_outage_fails_safe_and_recovers() {
    outage_and_recovery(TestDb::postgres(), "127.0.0.1:5432");
}

#[test]
fn mariadb_outage_fails_safe_and_recovers() {
    outage_and_recovery(TestDb::mariadb(), "127.0.0.1:3306");
}
