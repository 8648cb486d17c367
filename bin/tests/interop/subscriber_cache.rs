//! The subscriber cache (issue 22): a phone's repeated lookups are answered from memory, and
//! every way a subscriber changes still counts: through this node's API and the CLI (over the
//! control socket) at once, through another node as soon as that node announces it over
//! Redis, and anything unannounced within SUBSCRIBER_CACHE_TTL.

use std::time::{Duration, Instant};

use crate::api::http;
use crate::cluster::flush;
use crate::provision::api_key;
use crate::support::*;

const HITS: &str = "careflow_sip_subscriber_cache_hits_total";
const MISSES: &str = "careflow_sip_subscriber_cache_misses_total";

/// The final status of a digest REGISTER of `user` (a fresh Call-ID each time).
fn register(server: &Server, user: &str, password: &str, domain: &str) -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ua = Ua::new(server.sip_addr());
    status(&ua.register(user, password, domain, &format!("cache-{n}"), ""))
}

/// Waits out a cache time to live of `ttl` seconds.
fn past_ttl(ttl: u64) {
    std::thread::sleep(Duration::from_millis(ttl * 1000 + 500));
}

#[test]
fn repeated_lookups_come_from_memory_and_changes_through_the_api_and_the_cli_count() {
    let ttl = 3;
    let server = Server::start_with("cache.test", &[("SUBSCRIBER_CACHE_TTL", "3")]);
    server.add_user("alice", "pw-alice-1");
    let key = api_key(&server);

    // A registration and its refreshes: one database read.
    for _ in 0..3 {
        assert_eq!(register(&server, "alice", "pw-alice-1", "cache.test"), 200);
    }
    assert_eq!((server.metric(MISSES), server.metric(HITS)), (1, 2));

    // Through the API: counts at once.
    let (code, _, p) = http(
        &server,
        "POST",
        "/api/admin/subscribers/alice/disable",
        Some(&key),
        None,
    );
    assert_eq!(code, 204, "{p}");
    assert_eq!(register(&server, "alice", "pw-alice-1", "cache.test"), 401);
    let (code, _, _) = http(
        &server,
        "POST",
        "/api/admin/subscribers/alice/enable",
        Some(&key),
        None,
    );
    assert_eq!(code, 204);
    assert_eq!(register(&server, "alice", "pw-alice-1", "cache.test"), 200);

    // Through the CLI, another process: it tells the server over the control socket, so it
    // counts at once too.
    server.cli_ok(&["user", "passwd", "alice", "--password", "pw-alice-2"]);
    assert_eq!(register(&server, "alice", "pw-alice-1", "cache.test"), 401);
    assert_eq!(register(&server, "alice", "pw-alice-2", "cache.test"), 200);
    server.cli_ok(&["user", "disable", "alice"]);
    assert_eq!(register(&server, "alice", "pw-alice-2", "cache.test"), 401);
    server.cli_ok(&["user", "enable", "alice"]);
    assert_eq!(register(&server, "alice", "pw-alice-2", "cache.test"), 200);

    // A change nobody announces (the database edited by another program, here the CLI of a
    // server that cannot be told: its control socket moved away) counts once the row expired.
    let sock = server.data_dir().join("control.sock");
    let aside = server.data_dir().join("control.sock.aside");
    std::fs::rename(&sock, &aside).unwrap();
    server.cli_ok(&["user", "passwd", "alice", "--password", "pw-alice-3"]);
    std::fs::rename(&aside, &sock).unwrap();
    assert_eq!(register(&server, "alice", "pw-alice-2", "cache.test"), 200);
    past_ttl(ttl);
    assert_eq!(register(&server, "alice", "pw-alice-2", "cache.test"), 401);
    assert_eq!(register(&server, "alice", "pw-alice-3", "cache.test"), 200);

    // A user added by the CLI registers at once: unknown users are never kept.
    assert_eq!(register(&server, "bob", "pw-bob", "cache.test"), 401);
    server.add_user("bob", "pw-bob");
    assert_eq!(register(&server, "bob", "pw-bob", "cache.test"), 200);
}

#[test]
fn a_subscriber_disabled_on_one_node_is_refused_at_once_on_the_other() {
    let db = TestDb::postgres();
    flush(15);
    let redis = "redis://127.0.0.1:6379/15";
    let node = |secret: &str| {
        Server::start_with(
            "cache-cluster.test",
            &[
                ("DB_URL", db.url.as_str()),
                ("REDIS_URL", redis),
                ("NONCE_SECRET", secret),
                // Long enough that only the other node's announcement can explain a refusal.
                ("SUBSCRIBER_CACHE_TTL", "3600"),
                // Every poll below registers one more contact.
                ("MAX_CONTACTS", "200"),
            ],
        )
    };
    let secret = "c0ffee".repeat(10) + "c0ff";
    let a = node(&secret);
    let b = node(&secret);
    a.add_user("carol", "pw-carol");
    let key = api_key(&a);

    // carol's phone registers on B, twice: B holds her row.
    for _ in 0..2 {
        assert_eq!(register(&b, "carol", "pw-carol", "cache-cluster.test"), 200);
    }
    assert!(b.metric(HITS) >= 1);

    // Disabled through A's API: A removes her bindings and says so; B forgets her row.
    let (code, _, p) = http(
        &a,
        "POST",
        "/api/admin/subscribers/carol/disable",
        Some(&key),
        None,
    );
    assert_eq!(code, 204, "{p}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = register(&b, "carol", "pw-carol", "cache-cluster.test");
        if s == 401 {
            break;
        }
        assert_eq!(s, 200, "{}", b.log());
        assert!(
            Instant::now() < deadline,
            "node B still registers a subscriber node A disabled (last answer {s})\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
