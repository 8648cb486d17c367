//! Protection per source, decided before anything is parsed, shaped for sites behind NAT.
//!
//! A hospital's hundreds of phones and browser tabs reach us from one public address, each on
//! its own NAT port or its own connection. So the unit of protection is the *flow* (the UDP
//! source address and port, or the connection's peer address): a flooding or guessing flow is
//! banned alone and its neighbours keep working. The address as a whole (a *site*: an IPv4
//! address, or an IPv6 /64) has its own, much higher ceilings: past its rate ceiling messages
//! are shed (never a ban: a re-registration storm must not lock a site out), and only when
//! the failed guesses of all its flows together pass `site_auth_failures` is the site banned.
//! Guesses are also counted per (site, username) and per username, so a device that changes
//! ports to guess one password, or many addresses guessing one, are stopped too.
//!
//! Sans-IO: the caller passes `now`. Every table is bounded without rescans an attacker could
//! trigger: counters live in two generations that rotate (a full or old generation is dropped
//! whole, entries still in use are carried into the new one when touched), and the ban table is
//! swept of expired bans at most once a second.
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::ratelimit::{Generations, TokenBucket as Bucket, Window};

pub use crate::cidr::Cidr;

/// The address a site is known by: an IPv4 address, or the /64 of an IPv6 address (one
/// customer network; a host picks its interface identifier freely). IPv4-mapped IPv6
/// addresses count as their IPv4 address.
pub fn site_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(a) & !((1u128 << 64) - 1))),
        },
    }
}

/// Limits and thresholds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardConfig {
    /// Messages per second one flow (UDP source address and port, or one connection) may send
    /// on average; above it the flow is banned.
    pub rate: u32,
    /// Messages a flow may send at once.
    pub burst: u32,
    /// Messages per second one site (IPv4 address or IPv6 /64) may send in all; above it
    /// messages are dropped until the rate falls (no ban).
    pub site_rate: u32,
    /// Messages a site may send at once.
    pub site_burst: u32,
    /// How long a flooding or guessing flow (or site) stays banned.
    pub ban_time: Duration,
    /// Failed guesses in `auth_window` that ban a flow; the same count for one username from
    /// one site, or for one username from anywhere, bans each further flow that fails for it.
    pub auth_failures: u32,
    /// Failed guesses of all flows of a site in `auth_window` that ban the whole site.
    pub site_auth_failures: u32,
    /// The brute-force window.
    pub auth_window: Duration,
    /// Networks never limited or banned.
    pub allowlist: Vec<Cidr>,
    /// Most flows tracked at once (sites and usernames are bounded alike).
    pub max_tracked: usize,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            rate: 50,
            burst: 100,
            site_rate: 2000,
            site_burst: 4000,
            ban_time: Duration::from_secs(300),
            auth_failures: 5,
            site_auth_failures: 100,
            auth_window: Duration::from_secs(60),
            allowlist: Vec::new(),
            max_tracked: 200_000,
        }
    }
}

/// Why a flow or site was banned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BanReason {
    /// More messages than the rate limit allows.
    Flood,
    /// Too many failed guesses from this flow, or from all flows of this site.
    BruteForce,
    /// Too many failed guesses for one username (from this site, or from everywhere).
    UserBruteForce,
    /// Too many connections from this address.
    Connections,
}

impl BanReason {
    /// Stable name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Flood => "flood",
            Self::BruteForce => "brute_force",
            Self::UserBruteForce => "user_brute_force",
            Self::Connections => "connections",
        }
    }
}

/// What a ban covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BanScope {
    /// One flow: the UDP source address and port, or one connection's peer address.
    Flow(SocketAddr),
    /// Every flow of a site (see [`site_of`]).
    Site(IpAddr),
}

impl BanScope {
    /// The address (for a site, the site's address).
    pub fn ip(self) -> IpAddr {
        match self {
            Self::Flow(a) => a.ip(),
            Self::Site(ip) => ip,
        }
    }
}

/// What to do with a message from a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Process it.
    Pass,
    /// Drop it silently (its flow or site is banned).
    Drop,
    /// Drop it: this message made its flow banned now (log it once).
    Banned(BanScope, BanReason),
    /// Drop it: the site is over its rate ceiling. `log` is true once per ten seconds of it.
    Shed {
        /// Whether to log it now.
        log: bool,
    },
}

#[derive(Debug, Clone, Copy)]
struct FlowState {
    bucket: Bucket,
    guesses: Window,
}

#[derive(Debug, Clone, Copy)]
struct SiteState {
    bucket: Bucket,
    guesses: Window,
    /// When shedding was last logged.
    shed_logged: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct BanEntry {
    until: Instant,
    reason: BanReason,
}

/// Everything about the sites that hash to one shard: one lock per message.
#[derive(Debug)]
struct Shard {
    flows: Generations<SocketAddr, FlowState>,
    sites: Generations<IpAddr, SiteState>,
    bans: HashMap<BanScope, BanEntry>,
    swept: Instant,
}

const SHARDS: usize = 16;

impl Shard {
    fn new(now: Instant) -> Self {
        Self {
            flows: Generations::new(now),
            sites: Generations::new(now),
            bans: HashMap::new(),
            swept: now,
        }
    }

    fn banned(&self, scope: BanScope, now: Instant) -> bool {
        self.bans.get(&scope).is_some_and(|b| b.until > now)
    }

    /// Records a ban; false when the table is full of live bans (a spoofed-source flood),
    /// in which case the site's rate ceiling still bounds what the flow can cost.
    fn ban(&mut self, scope: BanScope, reason: BanReason, cfg: &GuardConfig, now: Instant) -> bool {
        let cap = (cfg.max_tracked / SHARDS).max(16);
        if self.bans.len() >= cap && !self.bans.contains_key(&scope) {
            if now.saturating_duration_since(self.swept) < Duration::from_secs(1) {
                return false;
            }
            self.swept = now;
            self.bans.retain(|_, b| b.until > now);
            if self.bans.len() >= cap {
                return false;
            }
        }
        self.bans.insert(
            scope,
            BanEntry {
                until: now + cfg.ban_time,
                reason,
            },
        );
        true
    }
}

/// Guess counters keyed by username (from anywhere) and by (site, username).
#[derive(Debug)]
struct UserCounters {
    by_user: Generations<u64, Window>,
    by_site_user: Generations<(IpAddr, u64), Window>,
}

/// The per-source state.
#[derive(Debug)]
pub struct Guard {
    /// Swapped whole on a configuration reload (SIGHUP).
    cfg: RwLock<Arc<GuardConfig>>,
    shards: Vec<Mutex<Shard>>,
    users: Mutex<UserCounters>,
    recent: Mutex<VecDeque<(Instant, IpAddr, String)>>,
    /// Keys the username hash, so nobody can aim many usernames at one counter.
    user_key: std::hash::RandomState,
}

/// Failed authentications kept for the admin view.
const RECENT_FAILURES: usize = 100;

/// A failed authentication as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    /// Where it came from.
    pub ip: IpAddr,
    /// The username it tried (as sent; at most 64 characters kept).
    pub user: String,
    /// How long ago.
    pub age: Duration,
}

/// A ban as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    /// The flow or site.
    pub scope: BanScope,
    /// Why.
    pub reason: BanReason,
    /// Time left.
    pub remaining: Duration,
}

impl Ban {
    /// The address (a flow's or the site's).
    pub fn ip(&self) -> IpAddr {
        self.scope.ip()
    }

    /// The flow's port; `None` for a site ban.
    pub fn port(&self) -> Option<u16> {
        match self.scope {
            BanScope::Flow(a) => Some(a.port()),
            BanScope::Site(_) => None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Guard {
    /// A guard with `cfg`.
    pub fn new(cfg: GuardConfig) -> Self {
        let now = Instant::now();
        Self {
            cfg: RwLock::new(Arc::new(cfg)),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::new(now))).collect(),
            users: Mutex::new(UserCounters {
                by_user: Generations::new(now),
                by_site_user: Generations::new(now),
            }),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_FAILURES)),
            user_key: std::hash::RandomState::new(),
        }
    }

    /// The last failed authentications, newest first.
    pub fn recent_failures(&self, now: Instant) -> Vec<AuthFailure> {
        lock(&self.recent)
            .iter()
            .rev()
            .map(|(at, ip, user)| AuthFailure {
                ip: *ip,
                user: user.clone(),
                age: now.saturating_duration_since(*at),
            })
            .collect()
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<GuardConfig> {
        match self.cfg.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// New limits, thresholds and allow-list (a reload); bans and counters are kept.
    pub fn reconfigure(&self, cfg: GuardConfig) {
        match self.cfg.write() {
            Ok(mut c) => *c = Arc::new(cfg),
            Err(p) => *p.into_inner() = Arc::new(cfg),
        }
    }

    fn shard(&self, site: IpAddr) -> &Mutex<Shard> {
        let h = match site {
            IpAddr::V4(a) => u32::from(a) as usize,
            IpAddr::V6(a) => ((u128::from(a) >> 64) as u64 ^ (u128::from(a) >> 96) as u64) as usize,
        };
        &self.shards[(h ^ (h >> 8) ^ (h >> 16)) % SHARDS]
    }

    /// Whether `ip` is on the allow-list.
    pub fn allowed(&self, ip: IpAddr) -> bool {
        self.config().allowlist.iter().any(|c| c.contains(ip))
    }

    /// One message from `src`: pass, drop (banned), ban its flow now (flood), or shed it (its
    /// site is over the site ceiling).
    pub fn admit(&self, src: SocketAddr, now: Instant) -> Admit {
        let cfg = self.config();
        if cfg.allowlist.iter().any(|c| c.contains(src.ip())) {
            return Admit::Pass;
        }
        let site = site_of(src.ip());
        let flow = SocketAddr::new(site_of_flow(src.ip()), src.port());
        let mut shard = lock(self.shard(site));
        if !shard.bans.is_empty()
            && (shard.banned(BanScope::Site(site), now) || shard.banned(BanScope::Flow(flow), now))
        {
            return Admit::Drop;
        }
        let (flow_cap, site_cap, period) = caps(&cfg);
        let s = shard
            .sites
            .entry(site, site_cap, period, now, || SiteState {
                bucket: Bucket::full(cfg.site_burst, now),
                guesses: Window::new(now),
                shed_logged: None,
            });
        if !s.bucket.take(cfg.site_rate, cfg.site_burst, now) {
            let log = s
                .shed_logged
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(10));
            if log {
                s.shed_logged = Some(now);
            }
            return Admit::Shed { log };
        }
        let f = shard
            .flows
            .entry(flow, flow_cap, period, now, || FlowState {
                bucket: Bucket::full(cfg.burst, now),
                guesses: Window::new(now),
            });
        if f.bucket.take(cfg.rate, cfg.burst, now) {
            return Admit::Pass;
        }
        let scope = BanScope::Flow(flow);
        shard.ban(scope, BanReason::Flood, &cfg, now);
        Admit::Banned(scope, BanReason::Flood)
    }

    /// Whether the site of `ip` is banned now (for new connections: a new connection is a new
    /// flow, so only a site ban refuses it).
    pub fn is_banned(&self, ip: IpAddr, now: Instant) -> bool {
        if self.allowed(ip) {
            return false;
        }
        let site = site_of(ip);
        lock(self.shard(site)).banned(BanScope::Site(site), now)
    }

    /// Bans a flow or site now for `reason`; false when allow-listed.
    pub fn ban_now(&self, scope: BanScope, reason: BanReason, now: Instant) -> bool {
        if self.allowed(scope.ip()) {
            return false;
        }
        let cfg = self.config();
        let scope = normalise(scope);
        let site = site_of(scope.ip());
        lock(self.shard(site)).ban(scope, reason, &cfg, now)
    }

    fn username_hash(&self, user: &str) -> u64 {
        use std::hash::BuildHasher;
        self.user_key.hash_one(user.to_ascii_lowercase())
    }

    /// A failed guess (wrong digest or unknown user) from `src` for `user`. Returns the ban it
    /// caused, if any. The challenge that starts every normal registration, and credentials
    /// with a stale or reused nonce, are no guesses and must not be reported here.
    pub fn auth_failed(
        &self,
        src: SocketAddr,
        user: &str,
        now: Instant,
    ) -> Option<(BanScope, BanReason)> {
        {
            let mut recent = lock(&self.recent);
            if recent.len() == RECENT_FAILURES {
                recent.pop_front();
            }
            recent.push_back((now, src.ip(), user.chars().take(64).collect()));
        }
        let cfg = self.config();
        if cfg.allowlist.iter().any(|c| c.contains(src.ip())) {
            return None;
        }
        let window = cfg.auth_window;
        let limit = cfg.auth_failures;
        let site = site_of(src.ip());
        let flow = SocketAddr::new(site_of_flow(src.ip()), src.port());
        let user_hot = {
            let h = self.username_hash(user);
            let mut u = lock(&self.users);
            let cap = cfg.max_tracked / 2;
            let by_user = u
                .by_user
                .entry(h, cap, window, now, || Window::new(now))
                .hit(window, now);
            let by_pair = u
                .by_site_user
                .entry((site, h), cap, window, now, || Window::new(now))
                .hit(window, now);
            by_user >= limit || by_pair >= limit
        };
        let mut shard = lock(self.shard(site));
        let (flow_cap, site_cap, period) = caps(&cfg);
        let site_guesses = shard
            .sites
            .entry(site, site_cap, period, now, || SiteState {
                bucket: Bucket::full(cfg.site_burst, now),
                guesses: Window::new(now),
                shed_logged: None,
            })
            .guesses
            .hit(window, now);
        let flow_guesses = shard
            .flows
            .entry(flow, flow_cap, period, now, || FlowState {
                bucket: Bucket::full(cfg.burst, now),
                guesses: Window::new(now),
            })
            .guesses
            .hit(window, now);
        if shard.banned(BanScope::Site(site), now) {
            return None;
        }
        if site_guesses >= cfg.site_auth_failures {
            let scope = BanScope::Site(site);
            return shard
                .ban(scope, BanReason::BruteForce, &cfg, now)
                .then_some((scope, BanReason::BruteForce));
        }
        let reason = if flow_guesses >= limit {
            BanReason::BruteForce
        } else if user_hot {
            BanReason::UserBruteForce
        } else {
            return None;
        };
        let scope = BanScope::Flow(flow);
        if shard.banned(scope, now) {
            return None;
        }
        shard
            .ban(scope, reason, &cfg, now)
            .then_some((scope, reason))
    }

    /// Current bans, sites first.
    pub fn bans(&self, now: Instant) -> Vec<Ban> {
        let mut out = Vec::new();
        for shard in &self.shards {
            for (scope, b) in lock(shard).bans.iter() {
                if b.until > now {
                    out.push(Ban {
                        scope: *scope,
                        reason: b.reason,
                        remaining: b.until - now,
                    });
                }
            }
        }
        out.sort_by_key(|b| match b.scope {
            BanScope::Site(ip) => (0, ip, 0),
            BanScope::Flow(a) => (1, a.ip(), a.port()),
        });
        out
    }

    /// Lifts bans: a site (`Site(ip)`: the site's ban and every flow ban of its address) or one
    /// flow. False when nothing was banned.
    pub fn unban(&self, scope: BanScope, now: Instant) -> bool {
        let scope = normalise(scope);
        let site = site_of(scope.ip());
        let mut shard = lock(self.shard(site));
        let before = shard.bans.values().filter(|b| b.until > now).count();
        match scope {
            BanScope::Flow(_) => {
                shard.bans.remove(&scope);
            }
            BanScope::Site(_) => shard.bans.retain(|s, _| match s {
                BanScope::Site(x) => *x != site,
                BanScope::Flow(a) => site_of(a.ip()) != site,
            }),
        }
        let after = shard.bans.values().filter(|b| b.until > now).count();
        before != after
    }

    /// Flows tracked (for metrics).
    pub fn tracked(&self) -> usize {
        self.shards.iter().map(|s| lock(s).flows.len()).sum()
    }
}

/// A flow's address as kept: IPv4-mapped IPv6 as IPv4, so one device is one flow however the
/// socket reports it.
fn site_of_flow(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Per-shard bounds of the flow and site tables, and how long an untouched entry lives (one
/// to two brute-force windows, at least ten seconds, so counters outlast their window).
fn caps(cfg: &GuardConfig) -> (usize, usize, Duration) {
    let flows = (cfg.max_tracked / SHARDS).max(16);
    let sites = (flows / 4).max(16);
    (flows, sites, cfg.auth_window.max(Duration::from_secs(10)))
}

fn normalise(scope: BanScope) -> BanScope {
    match scope {
        BanScope::Flow(a) => BanScope::Flow(SocketAddr::new(site_of_flow(a.ip()), a.port())),
        BanScope::Site(ip) => BanScope::Site(site_of(ip)),
    }
}

#[cfg(test)]
mod tests {
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
    }
}
