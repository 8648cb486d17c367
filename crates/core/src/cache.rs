//! A bounded cache whose entries live for a fixed time: what the subscriber lookups of every
//! authenticated request keep, so that a phone's REGISTER refreshes, its busy-lamp
//! SUBSCRIBEs and its calls do not each ask the database for the same row.
//!
//! Coherence is the caller's: it removes a key when it writes that row, and clears the cache
//! when it cannot tell which rows changed; the time to live bounds how long a write made
//! elsewhere (another process, another node) can go unseen. A full cache keeps no new entry
//! until a sweep (at most one per [`SWEEP_EVERY`]) has dropped expired ones: bounded memory,
//! nothing kept beside the entries, and at worst lookups go to the database as without it.

use foldhash::{HashMap, HashMapExt};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Least time between two sweeps of a full cache (each walks every entry).
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A bounded time-to-live cache.
#[derive(Debug)]
pub struct TtlCache<K, V> {
    entries: HashMap<K, (V, Instant)>,
    ttl: Duration,
    capacity: usize,
    last_sweep: Option<Instant>,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    /// A cache holding at most `capacity` entries for `ttl` each; a zero `ttl` or `capacity`
    /// keeps nothing.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            ttl,
            capacity,
            last_sweep: None,
        }
    }

    /// Whether this cache keeps anything at all.
    pub fn enabled(&self) -> bool {
        !self.ttl.is_zero() && self.capacity > 0
    }

    /// The value of `key` if it was inserted less than the time to live before `now`.
    pub fn get(&self, key: &K, now: Instant) -> Option<V> {
        self.entries
            .get(key)
            .filter(|(_, expires)| now < *expires)
            .map(|(v, _)| v.clone())
    }

    /// Keeps `value` for `key` from `now`; false when the cache is full of live entries (or
    /// disabled) and did not keep it.
    pub fn insert(&mut self, key: K, value: V, now: Instant) -> bool {
        if !self.enabled() {
            return false;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            if self.last_sweep.is_some_and(|t| now < t + SWEEP_EVERY) {
                return false;
            }
            self.expire(now);
            if self.entries.len() >= self.capacity {
                return false;
            }
        }
        self.entries.insert(key, (value, now + self.ttl));
        true
    }

    /// Forgets `key` (its row was written).
    pub fn remove(&mut self, key: &K) {
        self.entries.remove(key);
    }

    /// Forgets everything (rows changed that cannot be named one by one).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.release();
    }

    /// Entries held (some may have expired and not been dropped yet).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops the entries expired at `now`, and gives back the memory a burst left.
    pub fn expire(&mut self, now: Instant) {
        self.last_sweep = Some(now);
        self.entries.retain(|_, (_, expires)| now < *expires);
        self.release();
    }

    fn release(&mut self) {
        if self.entries.capacity() > 4 * self.entries.len() + 1024 {
            self.entries.shrink_to(2 * self.entries.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(ttl: u64, cap: usize) -> (TtlCache<String, u32>, Instant) {
        (TtlCache::new(Duration::from_secs(ttl), cap), Instant::now())
    }

    #[test]
    fn an_entry_lives_for_the_ttl_and_no_longer() {
        let (mut c, t0) = cache(60, 10);
        assert!(c.insert("alice".into(), 1, t0));
        assert_eq!(
            c.get(&"alice".into(), t0 + Duration::from_secs(59)),
            Some(1)
        );
        assert_eq!(c.get(&"alice".into(), t0 + Duration::from_secs(60)), None);
        c.expire(t0 + Duration::from_secs(60));
        assert!(c.is_empty());
    }

    #[test]
    fn a_write_forgets_the_key_and_a_reinsert_restarts_its_ttl() {
        let (mut c, t0) = cache(60, 10);
        c.insert("alice".into(), 1, t0);
        c.insert("bob".into(), 2, t0);
        c.remove(&"alice".into());
        assert_eq!(c.get(&"alice".into(), t0), None);
        assert_eq!(c.get(&"bob".into(), t0), Some(2));
        c.insert("bob".into(), 3, t0 + Duration::from_secs(30));
        c.expire(t0 + Duration::from_secs(61));
        assert_eq!(c.get(&"bob".into(), t0 + Duration::from_secs(61)), Some(3));
        c.clear();
        assert_eq!(c.get(&"bob".into(), t0 + Duration::from_secs(61)), None);
    }

    #[test]
    fn a_full_cache_keeps_nothing_new_until_a_sweep_frees_room() {
        let (mut c, t0) = cache(60, 3);
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            assert!(c.insert((*k).into(), i as u32, t0 + Duration::from_secs(i as u64)));
        }
        assert!(!c.insert("d".into(), 3, t0 + Duration::from_secs(3)));
        assert_eq!(c.len(), 3);
        // Refreshing a key that is held is always possible.
        assert!(c.insert("b".into(), 9, t0 + Duration::from_secs(4)));
        assert_eq!(c.get(&"b".into(), t0 + Duration::from_secs(4)), Some(9));
        // Once "a" expired, the next insertion's sweep makes room.
        let t = t0 + Duration::from_secs(61);
        assert!(c.insert("d".into(), 3, t));
        assert_eq!(c.get(&"a".into(), t), None);
        assert_eq!(c.get(&"d".into(), t), Some(3));
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn a_full_cache_sweeps_at_most_once_a_second() {
        let (mut c, t0) = cache(60, 2);
        c.insert("a".into(), 1, t0);
        c.insert("b".into(), 2, t0 + Duration::from_secs(30));
        // Swept at 59.5 s: nothing had expired yet.
        assert!(!c.insert("c".into(), 3, t0 + Duration::from_millis(59_500)));
        // "a" expired at 60 s, but the last sweep was less than a second ago.
        assert!(!c.insert("c".into(), 3, t0 + Duration::from_millis(60_400)));
        assert!(c.insert("c".into(), 3, t0 + Duration::from_millis(60_500)));
        assert_eq!(c.get(&"a".into(), t0 + Duration::from_secs(61)), None);
    }

    #[test]
    fn a_zero_ttl_or_capacity_keeps_nothing() {
        for (ttl, cap) in [(0, 10), (60, 0)] {
            let (mut c, t0) = cache(ttl, cap);
            assert!(!c.enabled());
            assert!(!c.insert("a".into(), 1, t0));
            assert_eq!(c.get(&"a".into(), t0), None);
        }
    }
}
