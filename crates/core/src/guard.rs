//! Protection per source address, decided before anything is parsed: a token bucket per IP
//! (a flood bans the source for a while), brute-force counting of failed authentications per IP
//! and per username, an allow-list that is never banned, and the ban table itself.
//!
//! Sans-IO: the caller passes `now`. Sharded maps keep the lock per packet short; the number of
//! tracked sources is bounded so a spoofed-source flood cannot grow memory without limit.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// An IPv4 or IPv6 network, e.g. `10.0.0.0/8` or `2001:db8::/32` (a bare address is /32 or
/// /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: prefix must be 0..={max}"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

impl Cidr {
    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (
                u128::from(u32::from(a)) << 96,
                u128::from(u32::from(b)) << 96,
                self.prefix,
            ),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), self.prefix),
            (IpAddr::V4(a), IpAddr::V6(b)) => match b.to_ipv4_mapped() {
                Some(b) => (
                    u128::from(u32::from(a)) << 96,
                    u128::from(u32::from(b)) << 96,
                    self.prefix,
                ),
                None => return false,
            },
            (IpAddr::V6(_), IpAddr::V4(_)) => return false,
        };
        if bits == 0 {
            return true;
        }
        let mask = u128::MAX << (128 - u32::from(bits));
        a & mask == b & mask
    }
}

/// Limits and thresholds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardConfig {
    /// Messages per second a source may send on average.
    pub rate: u32,
    /// Messages a source may send at once.
    pub burst: u32,
    /// How long a flooding or brute-forcing source stays banned.
    pub ban_time: Duration,
    /// Failed authentications in `auth_window` that ban a source (per IP and per username).
    pub auth_failures: u32,
    /// The brute-force window.
    pub auth_window: Duration,
    /// Networks never limited or banned.
    pub allowlist: Vec<Cidr>,
    /// Most sources tracked at once (beyond it, idle ones are forgotten first).
    pub max_tracked: usize,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            rate: 50,
            burst: 100,
            ban_time: Duration::from_secs(300),
            auth_failures: 5,
            auth_window: Duration::from_secs(60),
            allowlist: Vec::new(),
            max_tracked: 200_000,
        }
    }
}

/// Why a source was banned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BanReason {
    /// More messages than the rate limit allows.
    Flood,
    /// Too many failed authentications from this address.
    BruteForce,
    /// Too many failed authentications for one username (from several addresses).
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

/// What to do with a message from a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Process it.
    Pass,
    /// Drop it silently (banned).
    Drop,
    /// Drop it: this message made the source banned now (log it once).
    Banned(BanReason),
}

#[derive(Debug, Clone)]
struct Source {
    tokens: f64,
    last: Instant,
    banned_until: Option<Instant>,
    reason: Option<BanReason>,
    failures: u32,
    window_start: Instant,
}

const SHARDS: usize = 16;

/// The per-source state.
#[derive(Debug)]
pub struct Guard {
    /// Swapped whole on a configuration reload (SIGHUP).
    cfg: RwLock<Arc<GuardConfig>>,
    shards: Vec<Mutex<HashMap<IpAddr, Source>>>,
    users: Mutex<HashMap<String, (u32, Instant)>>,
    recent: Mutex<VecDeque<(Instant, IpAddr, String)>>,
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
    /// The source.
    pub ip: IpAddr,
    /// Why.
    pub reason: BanReason,
    /// Time left.
    pub remaining: Duration,
}

impl Guard {
    /// A guard with `cfg`.
    pub fn new(cfg: GuardConfig) -> Self {
        Self {
            cfg: RwLock::new(Arc::new(cfg)),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            users: Mutex::new(HashMap::new()),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_FAILURES)),
        }
    }

    /// The last failed authentications, newest first.
    pub fn recent_failures(&self, now: Instant) -> Vec<AuthFailure> {
        let recent = match self.recent.lock() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        recent
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

    fn shard(&self, ip: IpAddr) -> &Mutex<HashMap<IpAddr, Source>> {
        let h = match ip {
            IpAddr::V4(a) => u32::from(a) as usize,
            IpAddr::V6(a) => (u128::from(a) as usize) ^ ((u128::from(a) >> 64) as usize),
        };
        &self.shards[(h ^ (h >> 8) ^ (h >> 16)) % SHARDS]
    }

    /// Whether `ip` is on the allow-list.
    pub fn allowed(&self, ip: IpAddr) -> bool {
        self.config().allowlist.iter().any(|c| c.contains(ip))
    }

    fn fresh(&self, cfg: &GuardConfig, now: Instant) -> Source {
        Source {
            tokens: f64::from(cfg.burst),
            last: now,
            banned_until: None,
            reason: None,
            failures: 0,
            window_start: now,
        }
    }

    fn with_source<T>(
        &self,
        ip: IpAddr,
        now: Instant,
        f: impl FnOnce(&mut Source, &GuardConfig) -> T,
    ) -> T {
        let cfg = self.config();
        let mut map = match self.shard(ip).lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if map.len() >= cfg.max_tracked / SHARDS && !map.contains_key(&ip) {
            // Forget sources that are neither banned nor recently active.
            let idle = Duration::from_secs(10);
            map.retain(|_, s| {
                s.banned_until.is_some_and(|t| t > now) || now.duration_since(s.last) < idle
            });
            if map.len() >= cfg.max_tracked / SHARDS {
                // Still full (a spoofed flood): forget the least recent half of the unbanned.
                let mut ages: Vec<Instant> = map
                    .values()
                    .filter(|s| s.banned_until.is_none())
                    .map(|s| s.last)
                    .collect();
                ages.sort_unstable();
                if let Some(cut) = ages.get(ages.len() / 2).copied() {
                    map.retain(|_, s| s.banned_until.is_some() || s.last > cut);
                }
            }
        }
        let fresh = self.fresh(&cfg, now);
        let s = map.entry(ip).or_insert(fresh);
        f(s, &cfg)
    }

    fn ban(s: &mut Source, cfg: &GuardConfig, reason: BanReason, now: Instant) {
        s.banned_until = Some(now + cfg.ban_time);
        s.reason = Some(reason);
    }

    /// One message from `ip`: pass, drop (banned), or ban now (flood).
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Admit {
        if self.allowed(ip) {
            return Admit::Pass;
        }
        self.with_source(ip, now, |s, cfg| {
            if let Some(until) = s.banned_until {
                if until > now {
                    return Admit::Drop;
                }
                s.banned_until = None;
                s.reason = None;
                s.tokens = f64::from(cfg.burst);
            }
            let elapsed = now.saturating_duration_since(s.last).as_secs_f64();
            s.last = now;
            s.tokens = (s.tokens + elapsed * f64::from(cfg.rate)).min(f64::from(cfg.burst));
            if s.tokens >= 1.0 {
                s.tokens -= 1.0;
                Admit::Pass
            } else {
                Self::ban(s, cfg, BanReason::Flood, now);
                Admit::Banned(BanReason::Flood)
            }
        })
    }

    /// Whether `ip` is banned now (for new connections).
    pub fn is_banned(&self, ip: IpAddr, now: Instant) -> bool {
        if self.allowed(ip) {
            return false;
        }
        let map = match self.shard(ip).lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.get(&ip)
            .and_then(|s| s.banned_until)
            .is_some_and(|t| t > now)
    }

    /// Bans `ip` now for `reason` (e.g. too many connections); false when allow-listed.
    pub fn ban_now(&self, ip: IpAddr, reason: BanReason, now: Instant) -> bool {
        if self.allowed(ip) {
            return false;
        }
        self.with_source(ip, now, |s, cfg| Self::ban(s, cfg, reason, now));
        true
    }

    /// A failed authentication from `ip` for `user`. Returns the ban it caused, if any. The
    /// challenge that starts every normal registration is not a failure and must not be
    /// reported here.
    pub fn auth_failed(&self, ip: IpAddr, user: &str, now: Instant) -> Option<BanReason> {
        {
            let mut recent = match self.recent.lock() {
                Ok(r) => r,
                Err(p) => p.into_inner(),
            };
            if recent.len() == RECENT_FAILURES {
                recent.pop_front();
            }
            recent.push_back((now, ip, user.chars().take(64).collect()));
        }
        if self.allowed(ip) {
            return None;
        }
        let cfg = self.config();
        let window = cfg.auth_window;
        let limit = cfg.auth_failures;
        let user_hot = {
            let mut users = match self.users.lock() {
                Ok(u) => u,
                Err(p) => p.into_inner(),
            };
            if users.len() > 100_000 {
                users.retain(|_, (_, start)| now.duration_since(*start) < window);
            }
            let key = user.to_ascii_lowercase();
            let e = users.entry(key).or_insert((0, now));
            if now.duration_since(e.1) >= window {
                *e = (0, now);
            }
            e.0 += 1;
            e.0 >= limit
        };
        self.with_source(ip, now, |s, cfg| {
            if now.duration_since(s.window_start) >= window {
                s.failures = 0;
                s.window_start = now;
            }
            s.failures += 1;
            let reason = if s.failures >= limit {
                BanReason::BruteForce
            } else if user_hot {
                BanReason::UserBruteForce
            } else {
                return None;
            };
            if s.banned_until.is_some_and(|t| t > now) {
                return None;
            }
            Self::ban(s, cfg, reason, now);
            Some(reason)
        })
    }

    /// Current bans.
    pub fn bans(&self, now: Instant) -> Vec<Ban> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let map = match shard.lock() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            for (ip, s) in map.iter() {
                if let (Some(until), Some(reason)) = (s.banned_until, s.reason)
                    && until > now
                {
                    out.push(Ban {
                        ip: *ip,
                        reason,
                        remaining: until - now,
                    });
                }
            }
        }
        out.sort_by_key(|b| b.ip);
        out
    }

    /// Lifts a ban (and forgets the source's counters); false when it was not banned.
    pub fn unban(&self, ip: IpAddr, now: Instant) -> bool {
        let mut map = match self.shard(ip).lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let was = map
            .get(&ip)
            .and_then(|s| s.banned_until)
            .is_some_and(|t| t > now);
        map.remove(&ip);
        was
    }

    /// Sources tracked (for metrics).
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(ip("10.1.200.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(
            "192.0.2.7"
                .parse::<Cidr>()
                .unwrap()
                .contains(ip("192.0.2.7"))
        );
        assert!(
            !"192.0.2.7"
                .parse::<Cidr>()
                .unwrap()
                .contains(ip("192.0.2.8"))
        );
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:1::5")) && !v6.contains(ip("2001:db9::1")));
        assert!(
            c.contains(ip("::ffff:10.1.2.3")),
            "IPv4-mapped addresses match"
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("host.example".parse::<Cidr>().is_err());
    }

    #[test]
    fn a_flood_bans_the_source_for_the_ban_time_and_others_pass() {
        let g = Guard::new(GuardConfig {
            rate: 10,
            burst: 20,
            ban_time: Duration::from_secs(300),
            ..GuardConfig::default()
        });
        let t0 = Instant::now();
        let a = ip("198.51.100.1");
        for _ in 0..20 {
            assert_eq!(g.admit(a, t0), Admit::Pass);
        }
        assert_eq!(g.admit(a, t0), Admit::Banned(BanReason::Flood));
        assert_eq!(g.admit(a, t0), Admit::Drop);
        assert_eq!(g.admit(ip("198.51.100.2"), t0), Admit::Pass);
        assert_eq!(g.admit(a, t0 + Duration::from_secs(299)), Admit::Drop);
        assert_eq!(g.admit(a, t0 + Duration::from_secs(301)), Admit::Pass);
        // A steady rate under the limit is never banned.
        let b = ip("198.51.100.3");
        for i in 0..1000u64 {
            assert_eq!(g.admit(b, t0 + Duration::from_millis(i * 110)), Admit::Pass);
        }
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
            assert_eq!(g.admit(ip("127.0.0.1"), t0), Admit::Pass);
            assert_eq!(g.auth_failed(ip("127.0.0.1"), "u", t0), None);
        }
        assert!(!g.ban_now(ip("127.0.0.5"), BanReason::Flood, t0));
    }

    #[test]
    fn reconfiguring_changes_thresholds_and_keeps_bans() {
        let g = Guard::new(GuardConfig::default());
        let now = Instant::now();
        assert!(g.ban_now(ip("192.0.2.50"), BanReason::Flood, now));
        let before = g.config().auth_failures;
        g.reconfigure(GuardConfig {
            auth_failures: 1,
            ..GuardConfig::default()
        });
        assert_ne!(before, 1);
        assert_eq!(g.config().auth_failures, 1);
        assert!(g.is_banned(ip("192.0.2.50"), now));
        assert_eq!(
            g.auth_failed(ip("192.0.2.51"), "someone", now),
            Some(BanReason::BruteForce)
        );
    }

    #[test]
    fn recent_failures_are_listed_newest_first_and_bounded() {
        let g = Guard::new(GuardConfig::default());
        let t0 = Instant::now();
        for i in 0..(RECENT_FAILURES + 5) {
            let _ = g.auth_failed(ip("192.0.2.1"), &format!("user{i}"), t0);
        }
        let later = t0 + Duration::from_secs(7);
        let list = g.recent_failures(later);
        assert_eq!(list.len(), RECENT_FAILURES);
        assert_eq!(list[0].user, format!("user{}", RECENT_FAILURES + 4));
        assert_eq!(list[0].age, Duration::from_secs(7));
        assert_eq!(list.last().unwrap().user, "user5");
        let _ = g.auth_failed(ip("192.0.2.1"), &"x".repeat(500), later);
        assert_eq!(g.recent_failures(later)[0].user.len(), 64);
    }

    #[test]
    fn brute_force_per_source_and_per_username() {
        let g = Guard::new(GuardConfig::default());
        let t0 = Instant::now();
        let a = ip("203.0.113.9");
        for _ in 0..4 {
            assert_eq!(g.auth_failed(a, "alice", t0), None);
        }
        assert_eq!(g.auth_failed(a, "alice", t0), Some(BanReason::BruteForce));
        assert!(g.is_banned(a, t0));
        // Failures spread over a window reset.
        let b = ip("203.0.113.10");
        for i in 0..10u64 {
            assert_eq!(
                g.auth_failed(b, &format!("u{i}"), t0 + Duration::from_secs(61 * i)),
                None
            );
        }
        // Many addresses against one username: each further failing address is banned, while
        // a device that authenticates (no failure reported) is untouched.
        let g = Guard::new(GuardConfig::default());
        for i in 1..=4u8 {
            assert_eq!(g.auth_failed(ip(&format!("192.0.2.{i}")), "bob", t0), None);
        }
        assert_eq!(
            g.auth_failed(ip("192.0.2.5"), "bob", t0),
            Some(BanReason::UserBruteForce)
        );
        assert!(!g.is_banned(ip("192.0.2.1"), t0));
        assert_eq!(g.admit(ip("192.0.2.200"), t0), Admit::Pass);
        let bans = g.bans(t0);
        assert_eq!(bans.len(), 1);
        assert!(g.unban(ip("192.0.2.5"), t0));
        assert!(!g.unban(ip("192.0.2.5"), t0));
        assert!(g.bans(t0).is_empty());
    }

    #[test]
    fn tracked_sources_stay_bounded() {
        let g = Guard::new(GuardConfig {
            max_tracked: 1600,
            ..GuardConfig::default()
        });
        let t0 = Instant::now();
        for i in 0..50_000u32 {
            g.admit(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)), t0);
        }
        assert!(g.tracked() <= 1600, "{}", g.tracked());
    }
}
