use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn at(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn nobody_allowed() -> GuardConfig {
    GuardConfig::default()
}

#[test]
fn a_flood_bans_the_flow_and_its_neighbours_behind_the_same_nat_pass() {
    let g = Guard::new(GuardConfig {
        rate: 10,
        burst: 20,
        ban_time: Duration::from_secs(300),
        ..nobody_allowed()
    });
    let t0 = Instant::now();
    let a = at("198.51.100.1:5060");
    for _ in 0..20 {
        assert_eq!(g.admit(a, t0), Admit::Pass);
    }
    assert_eq!(
        g.admit(a, t0),
        Admit::Banned(BanScope::Flow(a), BanReason::Flood)
    );
    assert_eq!(g.admit(a, t0), Admit::Drop);
    // Another phone behind the same address (its own NAT port), and another address.
    assert_eq!(g.admit(at("198.51.100.1:5062"), t0), Admit::Pass);
    assert_eq!(g.admit(at("198.51.100.2:5060"), t0), Admit::Pass);
    assert!(
        !g.is_banned(ip("198.51.100.1"), t0),
        "the site is not banned"
    );
    assert_eq!(g.admit(a, t0 + Duration::from_secs(299)), Admit::Drop);
    assert_eq!(g.admit(a, t0 + Duration::from_secs(301)), Admit::Pass);
    // A steady rate under the limit is never banned.
    let b = at("198.51.100.3:5060");
    for i in 0..1000u64 {
        assert_eq!(g.admit(b, t0 + Duration::from_millis(i * 110)), Admit::Pass);
    }
    let bans = g.bans(t0 + Duration::from_secs(1));
    assert_eq!(bans.len(), 1);
    assert_eq!((bans[0].ip(), bans[0].port()), (a.ip(), Some(5060)));
}

#[test]
fn a_registration_storm_of_a_whole_site_passes_the_defaults() {
    // 300 phones behind one address re-register at 100/s after a power cut (each a
    // REGISTER, a 401, a REGISTER with credentials), twice over, with retransmissions.
    let g = Guard::new(nobody_allowed());
    let t0 = Instant::now();
    for round in 0..2u64 {
        for phone in 0..300u64 {
            let src = SocketAddr::new(ip("203.0.113.50"), 10_000 + phone as u16);
            let t = t0 + Duration::from_millis(round * 3_000 + phone * 10);
            for _ in 0..3 {
                assert_eq!(g.admit(src, t), Admit::Pass, "phone {phone} round {round}");
            }
        }
    }
    // A site far above any storm is shed, not banned, and recovers by itself.
    let g = Guard::new(GuardConfig {
        site_rate: 100,
        site_burst: 100,
        ..nobody_allowed()
    });
    let mut shed = 0;
    for i in 0..300u16 {
        match g.admit(SocketAddr::new(ip("203.0.113.60"), 20_000 + i), t0) {
            Admit::Pass => {}
            Admit::Shed { log } => {
                assert_eq!(log, shed == 0, "logged once");
                shed += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(shed, 200);
    assert!(g.bans(t0).is_empty() && !g.is_banned(ip("203.0.113.60"), t0));
    assert_eq!(
        g.admit(at("203.0.113.60:20000"), t0 + Duration::from_secs(1)),
        Admit::Pass
    );
}

#[test]
fn allowlisted_sources_are_never_limited() {
    let g = Guard::new(GuardConfig {
        rate: 1,
        burst: 1,
        allowlist: vec!["127.0.0.0/8".parse().unwrap()],
        ..GuardConfig::default()
    });
    let t0 = Instant::now();
    for _ in 0..100 {
        assert_eq!(g.admit(at("127.0.0.1:5060"), t0), Admit::Pass);
        assert_eq!(g.auth_failed(at("127.0.0.1:5060"), "u", t0), None);
    }
    assert!(!g.ban_now(BanScope::Site(ip("127.0.0.5")), BanReason::Flood, t0));
}

#[test]
fn reconfiguring_changes_thresholds_and_keeps_bans() {
    let g = Guard::new(GuardConfig::default());
    let now = Instant::now();
    assert!(g.ban_now(BanScope::Site(ip("192.0.2.50")), BanReason::Flood, now));
    let before = g.config().auth_failures;
    g.reconfigure(GuardConfig {
        auth_failures: 1,
        ..GuardConfig::default()
    });
    assert_ne!(before, 1);
    assert_eq!(g.config().auth_failures, 1);
    assert!(g.is_banned(ip("192.0.2.50"), now));
    let src = at("192.0.2.51:5060");
    assert_eq!(
        g.auth_failed(src, "someone", now),
        Some((BanScope::Flow(src), BanReason::BruteForce))
    );
}

#[test]
fn recent_failures_are_listed_newest_first_and_bounded() {
    let g = Guard::new(GuardConfig::default());
    let t0 = Instant::now();
    for i in 0..(RECENT_FAILURES + 5) {
        let _ = g.auth_failed(at("192.0.2.1:5060"), &format!("user{i}"), t0);
    }
    let later = t0 + Duration::from_secs(7);
    let list = g.recent_failures(later);
    assert_eq!(list.len(), RECENT_FAILURES);
    assert_eq!(list[0].user, format!("user{}", RECENT_FAILURES + 4));
    assert_eq!(list[0].age, Duration::from_secs(7));
    assert_eq!(list.last().unwrap().user, "user5");
    let _ = g.auth_failed(at("192.0.2.1:5060"), &"x".repeat(500), later);
    assert_eq!(g.recent_failures(later)[0].user.len(), 64);
}

#[test]
fn one_device_guessing_many_usernames_bans_that_device_not_its_site() {
    let g = Guard::new(GuardConfig::default());
    let t0 = Instant::now();
    let bad = at("203.0.113.9:5099");
    for i in 0..4 {
        assert_eq!(g.auth_failed(bad, &format!("user{i}"), t0), None);
    }
    assert_eq!(
        g.auth_failed(bad, "user4", t0),
        Some((BanScope::Flow(bad), BanReason::BruteForce))
    );
    assert_eq!(g.admit(bad, t0), Admit::Drop);
    // Its neighbours behind the same address keep working, and one of them mistyping a
    // password once is not banned.
    for port in 6000..6300u16 {
        assert_eq!(g.admit(at(&format!("203.0.113.9:{port}")), t0), Admit::Pass);
    }
    assert_eq!(g.auth_failed(at("203.0.113.9:6001"), "carol", t0), None);
    assert!(!g.is_banned(ip("203.0.113.9"), t0));
    // Failures spread over windows reset.
    let slow = at("203.0.113.10:5060");
    for i in 0..10u64 {
        assert_eq!(
            g.auth_failed(slow, &format!("u{i}"), t0 + Duration::from_secs(61 * i)),
            None
        );
    }
}

#[test]
fn guessing_one_password_from_ever_new_ports_or_addresses_is_stopped() {
    let g = Guard::new(GuardConfig::default());
    let t0 = Instant::now();
    // One site, a new source port per guess, one username.
    for port in 1..=4u16 {
        assert_eq!(
            g.auth_failed(SocketAddr::new(ip("198.51.100.7"), port), "bob", t0),
            None
        );
    }
    let fifth = SocketAddr::new(ip("198.51.100.7"), 5);
    assert_eq!(
        g.auth_failed(fifth, "bob", t0),
        Some((BanScope::Flow(fifth), BanReason::UserBruteForce))
    );
    // Many addresses against one username: each further failing flow is banned, while a
    // device that authenticates (no failure reported) is untouched.
    let g = Guard::new(GuardConfig::default());
    for i in 1..=4u8 {
        assert_eq!(
            g.auth_failed(at(&format!("192.0.2.{i}:5060")), "bob", t0),
            None
        );
    }
    let src = at("192.0.2.5:5060");
    assert_eq!(
        g.auth_failed(src, "bob", t0),
        Some((BanScope::Flow(src), BanReason::UserBruteForce))
    );
    assert_eq!(g.admit(at("192.0.2.1:5060"), t0), Admit::Pass);
    assert_eq!(g.admit(at("192.0.2.200:5060"), t0), Admit::Pass);
    assert_eq!(g.bans(t0).len(), 1);
    assert!(g.unban(BanScope::Flow(src), t0));
    assert!(!g.unban(BanScope::Flow(src), t0));
    assert!(g.bans(t0).is_empty());
}

#[test]
fn many_failing_flows_of_one_site_ban_the_site_and_unban_lifts_all() {
    let g = Guard::new(GuardConfig {
        site_auth_failures: 20,
        ..GuardConfig::default()
    });
    let t0 = Instant::now();
    let mut banned = None;
    for i in 0..20u16 {
        banned = g.auth_failed(
            SocketAddr::new(ip("198.51.100.70"), 40_000 + i),
            &format!("name{i}"),
            t0,
        );
    }
    assert_eq!(
        banned,
        Some((BanScope::Site(ip("198.51.100.70")), BanReason::BruteForce))
    );
    assert!(g.is_banned(ip("198.51.100.70"), t0));
    assert_eq!(g.admit(at("198.51.100.70:1"), t0), Admit::Drop);
    assert_eq!(g.admit(at("198.51.100.71:1"), t0), Admit::Pass);
    assert!(g.ban_now(BanScope::Flow(at("198.51.100.70:9")), BanReason::Flood, t0));
    assert!(g.unban(BanScope::Site(ip("198.51.100.70")), t0));
    assert!(g.bans(t0).is_empty());
    assert_eq!(g.admit(at("198.51.100.70:1"), t0), Admit::Pass);
}

#[test]
fn ipv6_sources_are_grouped_by_slash_64() {
    assert_eq!(site_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
    assert_eq!(site_of(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    let g = Guard::new(GuardConfig {
        site_rate: 10,
        site_burst: 10,
        site_auth_failures: 3,
        ..GuardConfig::default()
    });
    let t0 = Instant::now();
    for i in 0..10u16 {
        let a = SocketAddr::new(ip(&format!("2001:db8:1:2::{:x}", i + 1)), 5060);
        assert_eq!(g.admit(a, t0), Admit::Pass);
    }
    // The /64 shares one ceiling; another /64 has its own.
    assert!(matches!(
        g.admit(at("[2001:db8:1:2::99]:5060"), t0),
        Admit::Shed { .. }
    ));
    assert_eq!(g.admit(at("[2001:db8:1:3::1]:5060"), t0), Admit::Pass);
    for i in 0..3u16 {
        let a = SocketAddr::new(ip(&format!("2001:db8:1:2::{:x}", i + 100)), 5060);
        let _ = g.auth_failed(a, &format!("v{i}"), t0);
    }
    assert!(g.is_banned(ip("2001:db8:1:2::ffff"), t0));
    assert!(!g.is_banned(ip("2001:db8:1:3::1"), t0));
}

#[test]
fn every_table_stays_bounded_under_fresh_sources_and_usernames() {
    let g = Guard::new(GuardConfig {
        max_tracked: 1600,
        auth_failures: 1_000,
        site_auth_failures: 1_000_000,
        ..GuardConfig::default()
    });
    let t0 = Instant::now();
    let started = Instant::now();
    for i in 0..50_000u32 {
        let src = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)), 5060);
        g.admit(src, t0);
        // A fresh username each time: the per-user tables must not be rescanned.
        let _ = g.auth_failed(src, &format!("fresh{i}"), t0);
    }
    assert!(g.tracked() <= 1600, "{}", g.tracked());
    let users = lock(&g.users);
    assert!(users.by_user.len() <= 800 && users.by_site_user.len() <= 800);
    drop(users);
    // 100,000 operations with a rescan per new key would take minutes.
    assert!(started.elapsed() < Duration::from_secs(20));
    // Bans too: a flood of banned flows fills the table only to its bound.
    for i in 0..50_000u32 {
        let src = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + i)), 1);
        g.ban_now(BanScope::Flow(src), BanReason::Flood, t0);
    }
    assert!(g.bans(t0).len() <= 1600, "{}", g.bans(t0).len());
    // A flood from yet another flow then is dropped, but not reported as a new ban per
    // datagram (it could not be recorded).
    let late = SocketAddr::new(ip("10.200.0.1"), 7);
    let flood = GuardConfig::default().burst + 200;
    let verdicts: Vec<Admit> = (0..flood).map(|_| g.admit(late, t0)).collect();
    assert!(verdicts.contains(&Admit::Drop));
    assert!(!verdicts.iter().any(|v| matches!(v, Admit::Banned(..))));
}

#[test]
fn cluster_peers_pass_unlimited_while_they_are_peers() {
    let g = Guard::new(GuardConfig {
        rate: 10,
        burst: 20,
        ..nobody_allowed()
    });
    let t0 = Instant::now();
    let node = at("10.0.0.3:40123");
    g.set_peers(vec![node.ip()]);
    // One internal link carries many callers' requests: far over a device's rate.
    for _ in 0..1000 {
        assert_eq!(g.admit(node, t0), Admit::Pass);
    }
    assert!(g.allowed(node.ip()));
    // No longer a member: limited like anyone else.
    g.set_peers(Vec::new());
    let verdicts: Vec<Admit> = (0..21).map(|_| g.admit(node, t0)).collect();
    assert_eq!(
        verdicts.last(),
        Some(&Admit::Banned(BanScope::Flow(node), BanReason::Flood))
    );
}

#[test]
fn bans_made_here_are_kept_for_the_cluster_and_bans_from_there_are_applied_not_echoed() {
    let here = Guard::new(GuardConfig {
        rate: 10,
        burst: 20,
        auth_failures: 2,
        ..nobody_allowed()
    });
    let there = Guard::new(nobody_allowed());
    let t0 = Instant::now();
    let flooder = at("198.51.100.7:5060");
    // Not in a cluster: nothing is kept.
    for _ in 0..21 {
        here.admit(flooder, t0);
    }
    assert!(here.take_shared().is_empty());
    here.share();
    there.share();
    let guesser = at("198.51.100.8:5070");
    here.auth_failed(guesser, "alice", t0);
    here.auth_failed(guesser, "alice", t0);
    let shared = here.take_shared();
    assert_eq!(
        shared,
        vec![
            Shared::Guess(guesser, "alice".into()),
            Shared::Ban(BanScope::Flow(guesser), BanReason::BruteForce),
            Shared::Guess(guesser, "alice".into()),
        ]
    );
    // The other node applies it: the guesser's flow is dropped there too, and it is not
    // shared back.
    for d in &shared {
        there.apply_shared(d.clone(), t0);
    }
    assert_eq!(there.admit(guesser, t0), Admit::Drop);
    assert!(there.take_shared().is_empty(), "not echoed");
    // An operator's unban on one node lifts it on the other.
    assert!(here.unban(BanScope::Flow(guesser), t0));
    for d in here.take_shared() {
        there.apply_shared(d, t0);
    }
    assert_eq!(there.admit(guesser, t0), Admit::Pass);
    // A shared ban of an allow-listed address is ignored.
    let trusted = Guard::new(GuardConfig {
        allowlist: vec!["198.51.100.0/24".parse().unwrap()],
        ..nobody_allowed()
    });
    trusted.apply_shared(Shared::Ban(BanScope::Flow(guesser), BanReason::Flood), t0);
    assert!(trusted.bans(t0).is_empty());
}

#[test]
fn guesses_spread_over_the_nodes_count_as_at_one() {
    let cfg = || GuardConfig {
        auth_failures: 5,
        ..nobody_allowed()
    };
    let (a, b) = (Guard::new(cfg()), Guard::new(cfg()));
    a.share();
    b.share();
    let t0 = Instant::now();
    let guesser = at("203.0.113.9:5060");
    // Two guesses on A, two on B: each node hears of the other's.
    for g in [&a, &a, &b, &b] {
        assert_eq!(g.auth_failed(guesser, "alice", t0), None);
    }
    for d in a.take_shared() {
        b.apply_shared(d, t0);
    }
    for d in b.take_shared() {
        a.apply_shared(d, t0);
    }
    // The fifth guess, wherever it lands, bans the flow.
    assert_eq!(
        b.auth_failed(guesser, "alice", t0),
        Some((BanScope::Flow(guesser), BanReason::BruteForce))
    );
}
