//! Rate limiting and counting for the protections of every part of the server (the SIP guard
//! per flow and site, the HTTP API per caller): one token bucket, one windowed counter, and one
//! bounded map that never rescans.
//!
//! Sans-IO: every call takes `now`.

use foldhash::{HashMap, HashMapExt};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, at most `burst` at once.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket holding `burst` tokens.
    pub fn full(burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes one token; false when the bucket is empty.
    pub fn take(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A count of events in a window that starts with the first one.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    count: u32,
    start: Instant,
}

impl Window {
    /// An empty window.
    pub fn new(now: Instant) -> Self {
        Self {
            count: 0,
            start: now,
        }
    }

    /// Counts one event; returns the count within the window.
    pub fn hit(&mut self, window: Duration, now: Instant) -> u32 {
        if now.saturating_duration_since(self.start) >= window {
            *self = Self::new(now);
        }
        self.count = self.count.saturating_add(1);
        self.count
    }
}

/// A bounded map in two generations. Lookups move an entry of the old generation into the
/// current one; when the current one is full or older than `period` it becomes the old one
/// and the old one is dropped whole. So an entry untouched for two periods (or crowded out by
/// a flood of new keys) is forgotten, at O(1) amortised cost and without any rescan an
/// attacker could trigger with fresh keys.
#[derive(Debug)]
pub struct Generations<K, V> {
    current: HashMap<K, V>,
    old: HashMap<K, V>,
    since: Instant,
}

impl<K: Hash + Eq + Clone, V> Generations<K, V> {
    /// An empty map.
    pub fn new(now: Instant) -> Self {
        Self {
            current: HashMap::new(),
            old: HashMap::new(),
            since: now,
        }
    }

    /// The entry of `key` (carried over from the old generation, or `fresh()`), holding at most
    /// `cap` entries in all.
    pub fn entry(
        &mut self,
        key: K,
        cap: usize,
        period: Duration,
        now: Instant,
        fresh: impl FnOnce() -> V,
    ) -> &mut V {
        if !self.current.contains_key(&key) {
            let carried = self.old.remove(&key);
            if self.current.len() >= cap.div_ceil(2).max(1)
                || now.saturating_duration_since(self.since) >= period
            {
                self.old = std::mem::take(&mut self.current);
                self.since = now;
            }
            self.current
                .insert(key.clone(), carried.unwrap_or_else(fresh));
        }
        self.current.entry(key).or_insert_with(|| unreachable!())
    }

    /// Entries held (both generations).
    pub fn len(&self) -> usize {
        self.current.len() + self.old.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A token bucket per key (an API caller, say), bounded to `cap` keys.
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    rate: u32,
    burst: u32,
    cap: usize,
    buckets: Mutex<Generations<K, TokenBucket>>,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// `rate` per second on average and `burst` at once for each key; at most `cap` keys are
    /// remembered (a forgotten key starts with a full bucket, as an idle one would have).
    pub fn new(rate: u32, burst: u32, cap: usize, now: Instant) -> Self {
        Self {
            rate,
            burst: burst.max(1),
            cap,
            buckets: Mutex::new(Generations::new(now)),
        }
    }

    /// Takes one token of `key`'s bucket; false when it is empty.
    pub fn allow(&self, key: K, now: Instant) -> bool {
        let mut b = match self.buckets.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        // A bucket idle this long has refilled anyway: forgetting it changes nothing.
        let refill = Duration::from_secs_f64(f64::from(self.burst) / f64::from(self.rate.max(1)));
        let burst = self.burst;
        b.entry(
            key,
            self.cap,
            refill.max(Duration::from_secs(1)),
            now,
            || TokenBucket::full(burst, now),
        )
        .take(self.rate, burst, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(3, t0);
        assert!(b.take(1, 3, t0) && b.take(1, 3, t0) && b.take(1, 3, t0));
        assert!(!b.take(1, 3, t0));
        assert!(b.take(1, 3, t0 + Duration::from_secs(1)));
        assert!(!b.take(1, 3, t0 + Duration::from_secs(1)));
        // It never holds more than its burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(b.take(1, 3, later));
        }
        assert!(!b.take(1, 3, later));
    }

    #[test]
    fn a_window_counts_and_restarts() {
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        assert_eq!(w.hit(Duration::from_secs(60), t0), 1);
        assert_eq!(
            w.hit(Duration::from_secs(60), t0 + Duration::from_secs(59)),
            2
        );
        assert_eq!(
            w.hit(Duration::from_secs(60), t0 + Duration::from_secs(60)),
            1
        );
    }

    #[test]
    fn generations_stay_bounded_and_keep_what_is_used() {
        let t0 = Instant::now();
        let mut g: Generations<u32, u32> = Generations::new(t0);
        *g.entry(0, 100, Duration::from_secs(60), t0, || 0) += 1;
        for i in 1..100_000u32 {
            g.entry(i, 100, Duration::from_secs(60), t0, || 0);
            // The key in use survives every rotation.
            *g.entry(0, 100, Duration::from_secs(60), t0, || 0) += 1;
            assert!(g.len() <= 100);
        }
        assert_eq!(*g.entry(0, 100, Duration::from_secs(60), t0, || 0), 100_000);
        // Untouched for two periods: forgotten.
        let later = t0 + Duration::from_secs(61);
        g.entry(1, 100, Duration::from_secs(60), later, || 0);
        g.entry(
            2,
            100,
            Duration::from_secs(60),
            later + Duration::from_secs(61),
            || 0,
        );
        assert_eq!(*g.entry(0, 100, Duration::from_secs(60), later, || 7), 7);
    }

    #[test]
    fn keyed_limiters_give_each_key_its_own_bucket_within_a_bound() {
        let t0 = Instant::now();
        let l = KeyedLimiter::new(1, 3, 1000, t0);
        assert!(l.allow("a", t0) && l.allow("a", t0) && l.allow("a", t0));
        assert!(!l.allow("a", t0));
        assert!(l.allow("b", t0), "callers have their own buckets");
        assert!(l.allow("a", t0 + Duration::from_secs(1)));
        let l = KeyedLimiter::new(10, 10, 64, t0);
        for i in 0..10_000u32 {
            l.allow(i, t0);
        }
        assert!(l.buckets.lock().unwrap().len() <= 64);
    }
}
