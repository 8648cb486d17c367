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
use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt};
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
            // A desk phone booting with ~120 BLF keys sends ~360 messages at once.
            burst: 400,
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
    /// The other nodes of our cluster, passed like the allow-list while they are members:
    /// one internal link carries the traffic of many callers.
    peers: RwLock<Arc<Vec<IpAddr>>>,
    /// Bans and unbans made here, waiting to be shared with the other nodes (only while
    /// [`Self::share`] is on; bounded: when nobody drains it, the oldest go).
    outbox: Mutex<Option<VecDeque<Shared>>>,
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
            peers: RwLock::default(),
            outbox: Mutex::new(None),
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

    /// Whether `ip` is on the allow-list (or a cluster peer).
    pub fn allowed(&self, ip: IpAddr) -> bool {
        self.exempt(&self.config(), ip)
    }

    /// One message from `src`: pass, drop (banned), ban its flow now (flood), or shed it (its
    /// site is over the site ceiling).
    pub fn admit(&self, src: SocketAddr, now: Instant) -> Admit {
        let cfg = self.config();
        if self.exempt(&cfg, src.ip()) {
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
        if shard.ban(scope, BanReason::Flood, &cfg, now) {
            drop(shard);
            self.announce(Shared::Ban(scope, BanReason::Flood));
            Admit::Banned(scope, BanReason::Flood)
        } else {
            // The ban table is full (a spoofed-source flood): drop without a log line per
            // datagram; the flow's empty bucket keeps dropping it.
            Admit::Drop
        }
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
        let banned = lock(self.shard(site)).ban(scope, reason, &cfg, now);
        if banned {
            self.announce(Shared::Ban(scope, reason));
        }
        banned
    }

    fn username_hash(&self, user: &str) -> u64 {
        use std::hash::BuildHasher;
        self.user_key.hash_one(user.to_ascii_lowercase())
    }

    pub(super) fn count_guess(
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
        if self.exempt(&cfg, src.ip()) {
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
            let banned = shard.ban(scope, BanReason::BruteForce, &cfg, now);
            drop(shard);
            return banned.then(|| {
                self.announce(Shared::Ban(scope, BanReason::BruteForce));
                (scope, BanReason::BruteForce)
            });
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
        let banned = shard.ban(scope, reason, &cfg, now);
        drop(shard);
        banned.then(|| {
            self.announce(Shared::Ban(scope, reason));
            (scope, reason)
        })
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
        let lifted = self.lift(scope, now);
        if lifted {
            self.announce(Shared::Unban(normalise(scope)));
        }
        lifted
    }

    fn lift(&self, scope: BanScope, now: Instant) -> bool {
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

mod shared;
#[cfg(test)]
mod tests;

pub use shared::Shared;
