//! Subscriptions to users' dialog state (RFC 6665 notifier side), sans-IO: each watcher's
//! subscription to one AoR with its expiry and the `version` its bodies carry, NOTIFYs
//! coalesced and paced (a burst of changes while one NOTIFY is recent becomes one NOTIFY with
//! the latest state, at most one per [`SubscriptionConfig::min_interval`]), and the final
//! NOTIFY when a subscription ends.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Subscription limits.
#[derive(Debug, Clone, Copy)]
pub struct SubscriptionConfig {
    /// Expiry granted when the SUBSCRIBE asks none.
    pub default_expires: u32,
    /// Shorter requests get 423 with this as Min-Expires.
    pub min_expires: u32,
    /// Longer requests are cut to this.
    pub max_expires: u32,
    /// Least time between two NOTIFYs of one subscription (changes meanwhile coalesce).
    pub min_interval: Duration,
    /// Most subscriptions one watcher (AoR) may hold; beyond, 403 (a misconfigured phone
    /// with hundreds of BLF keys would otherwise hold the table).
    pub max_per_watcher: usize,
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        Self {
            default_expires: 1800,
            min_expires: 60,
            max_expires: 7200,
            min_interval: Duration::from_millis(200),
            max_per_watcher: 200,
        }
    }
}

/// A subscription's id: the dialog it lives in (Call-ID and the watcher's From tag; our To
/// tag is derived from them).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubId {
    /// Call-ID of the SUBSCRIBE.
    pub call_id: String,
    /// The watcher's From tag.
    pub from_tag: String,
}

/// What the driver keeps to reach the watcher (its flow, Contact, route set).
#[derive(Debug, Clone)]
struct Sub<W> {
    watched: String,
    watcher: String,
    reach: W,
    expires_at: Instant,
    version: u32,
    last_sent: Option<Instant>,
    pending: bool,
}

/// A refused SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 423 Interval Too Brief, with Min-Expires.
    TooBrief(u32),
    /// 403: the watcher holds too many subscriptions.
    TooMany,
}

/// A NOTIFY to send now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due<W> {
    /// The subscription.
    pub id: SubId,
    /// The watched AoR (whose legs the body lists).
    pub watched: String,
    /// Where it goes.
    pub reach: W,
    /// The body's `version`.
    pub version: u32,
    /// Seconds left (`Subscription-State: active;expires=N`), or `None` when it ends
    /// (`terminated;reason=timeout` or after an unsubscribe).
    pub expires_in: Option<u32>,
}

/// Every subscription.
#[derive(Debug)]
pub struct Subscriptions<W: Clone> {
    cfg: SubscriptionConfig,
    subs: HashMap<SubId, Sub<W>>,
    ended: Vec<Due<W>>,
}

impl<W: Clone> Subscriptions<W> {
    /// An empty table.
    pub fn new(cfg: SubscriptionConfig) -> Self {
        Self {
            cfg,
            subs: HashMap::new(),
            ended: Vec::new(),
        }
    }

    /// A SUBSCRIBE (new or a refresh) of `watcher` to `watched` asking `expires` (none: the
    /// default). Returns the expiry granted; 0 ends the subscription (its final NOTIFY is
    /// queued). Every accepted SUBSCRIBE is answered by an immediate NOTIFY (RFC 6665 §4.2.1.2).
    pub fn subscribe(
        &mut self,
        id: SubId,
        watcher: &str,
        watched: &str,
        reach: W,
        expires: Option<u32>,
        now: Instant,
    ) -> Result<u32, Refusal> {
        let asked = expires.unwrap_or(self.cfg.default_expires);
        if asked == 0 {
            if let Some(sub) = self.subs.remove(&id) {
                self.ended.push(Due {
                    id,
                    watched: sub.watched,
                    reach,
                    version: sub.version + 1,
                    expires_in: None,
                });
            }
            return Ok(0);
        }
        if asked < self.cfg.min_expires {
            return Err(Refusal::TooBrief(self.cfg.min_expires));
        }
        let granted = asked.min(self.cfg.max_expires);
        let until = now + Duration::from_secs(u64::from(granted));
        if let Some(sub) = self.subs.get_mut(&id) {
            sub.expires_at = until;
            sub.reach = reach;
            sub.pending = true;
            sub.last_sent = None;
            return Ok(granted);
        }
        let held = self.subs.values().filter(|s| s.watcher == watcher).count();
        if held >= self.cfg.max_per_watcher {
            return Err(Refusal::TooMany);
        }
        self.subs.insert(
            id,
            Sub {
                watched: watched.to_string(),
                watcher: watcher.to_string(),
                reach,
                expires_at: until,
                version: 0,
                last_sent: None,
                pending: true,
            },
        );
        Ok(granted)
    }

    /// `watched`'s state changed: each of its subscriptions has a NOTIFY to send.
    pub fn changed(&mut self, watched: &str) {
        for s in self.subs.values_mut().filter(|s| s.watched == watched) {
            s.pending = true;
        }
    }

    /// The watcher is gone (481 or a transport failure for a NOTIFY): the subscription ends
    /// without a NOTIFY.
    pub fn drop_sub(&mut self, id: &SubId) {
        self.subs.remove(id);
    }

    /// The NOTIFYs due at `now`: pending ones whose pacing allows, and the final ones of the
    /// subscriptions that ended (unsubscribed or expired).
    pub fn poll_due(&mut self, now: Instant) -> Vec<Due<W>> {
        let mut out = std::mem::take(&mut self.ended);
        let min = self.cfg.min_interval;
        let mut expired = Vec::new();
        for (id, s) in &mut self.subs {
            if s.expires_at <= now {
                expired.push(id.clone());
                continue;
            }
            let paced = s
                .last_sent
                .is_none_or(|t| now.saturating_duration_since(t) >= min);
            if s.pending && paced {
                s.pending = false;
                s.last_sent = Some(now);
                s.version += 1;
                out.push(Due {
                    id: id.clone(),
                    watched: s.watched.clone(),
                    reach: s.reach.clone(),
                    version: s.version,
                    // Rounded up: a NOTIFY sent a moment after the SUBSCRIBE says what was granted.
                    expires_in: Some(
                        s.expires_at
                            .saturating_duration_since(now)
                            .as_millis()
                            .div_ceil(1000)
                            .max(1) as u32,
                    ),
                });
            }
        }
        for id in expired {
            if let Some(s) = self.subs.remove(&id) {
                out.push(Due {
                    id,
                    watched: s.watched,
                    reach: s.reach,
                    version: s.version + 1,
                    expires_in: None,
                });
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// When [`Self::poll_due`] has something next: a paced NOTIFY or an expiry.
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.ended.is_empty() {
            return Some(Instant::now());
        }
        self.subs
            .values()
            .map(|s| {
                let paced = s.last_sent.map_or(s.expires_at, |t| {
                    (t + self.cfg.min_interval).min(s.expires_at)
                });
                if s.pending { paced } else { s.expires_at }
            })
            .min()
    }

    /// The AoR `id` watches, while it lasts (an in-dialog refresh names only our Contact).
    pub fn watched_of(&self, id: &SubId) -> Option<&str> {
        self.subs.get(id).map(|s| s.watched.as_str())
    }

    /// How many subscriptions there are (metrics).
    pub fn len(&self) -> usize {
        self.subs.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> SubId {
        SubId {
            call_id: format!("sub-{n}"),
            from_tag: "w".into(),
        }
    }

    #[test]
    fn a_subscription_gets_a_notify_at_once_then_paced_coalesced_ones_and_a_final_one() {
        let t0 = Instant::now();
        let mut s = Subscriptions::new(SubscriptionConfig::default());
        assert_eq!(
            s.subscribe(id(1), "2002@w", "2001@w", "flow-a", None, t0),
            Ok(1800)
        );
        let due = s.poll_due(t0);
        assert_eq!(due.len(), 1, "the immediate NOTIFY");
        assert_eq!((due[0].version, due[0].expires_in), (1, Some(1800)));
        // Three changes in a burst: one NOTIFY once the pacing allows, with the latest state.
        s.changed("2001@w");
        s.changed("2001@w");
        assert!(
            s.poll_due(t0 + Duration::from_millis(50)).is_empty(),
            "paced"
        );
        s.changed("2001@w");
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_millis(200)));
        let due = s.poll_due(t0 + Duration::from_millis(200));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].version, 2, "the version only rises");
        assert!(
            s.poll_due(t0 + Duration::from_secs(1)).is_empty(),
            "nothing new"
        );
        // Another user's change is not ours.
        s.changed("2003@w");
        assert!(s.poll_due(t0 + Duration::from_secs(2)).is_empty());
        // Unsubscribed: one final NOTIFY, then nothing.
        assert_eq!(
            s.subscribe(id(1), "2002@w", "2001@w", "flow-a", Some(0), t0),
            Ok(0)
        );
        let due = s.poll_due(t0 + Duration::from_secs(3));
        assert_eq!((due.len(), due[0].expires_in, due[0].version), (1, None, 3));
        assert!(s.is_empty());
    }

    #[test]
    fn expiry_refresh_and_limits() {
        let t0 = Instant::now();
        let cfg = SubscriptionConfig {
            max_per_watcher: 2,
            ..SubscriptionConfig::default()
        };
        let mut s = Subscriptions::new(cfg);
        assert_eq!(
            s.subscribe(id(1), "clerk@w", "2001@w", 1, Some(30), t0),
            Err(Refusal::TooBrief(60))
        );
        assert_eq!(
            s.subscribe(id(1), "clerk@w", "2001@w", 1, Some(99_999), t0),
            Ok(7200)
        );
        assert_eq!(
            s.subscribe(id(2), "clerk@w", "2002@w", 1, Some(600), t0),
            Ok(600)
        );
        assert_eq!(s.watched_of(&id(2)), Some("2002@w"));
        assert_eq!(s.watched_of(&id(3)), None);
        assert_eq!(
            s.subscribe(id(3), "clerk@w", "2003@w", 1, Some(600), t0),
            Err(Refusal::TooMany)
        );
        s.poll_due(t0);
        // A refresh of 2 moves its expiry and NOTIFYs again (RFC 6665 §4.2.1.2).
        let t1 = t0 + Duration::from_secs(500);
        assert_eq!(
            s.subscribe(id(2), "clerk@w", "2002@w", 1, Some(600), t1),
            Ok(600)
        );
        let due = s.poll_due(t1);
        assert_eq!((due.len(), due[0].expires_in), (1, Some(600)));
        // The refreshed 2 runs out 600 s after its refresh: a final NOTIFY (timeout); 1 stays.
        assert!(s.poll_due(t0 + Duration::from_secs(1099)).is_empty());
        let due = s.poll_due(t0 + Duration::from_secs(1100));
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].id.clone(), due[0].expires_in), (id(2), None));
        assert_eq!(s.len(), 1);
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(7200)));
        s.drop_sub(&id(1));
        assert!(s.is_empty() && s.next_deadline().is_none());
    }
}
