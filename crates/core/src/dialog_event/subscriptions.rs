//! Subscriptions to users' dialog state and presence (RFC 6665 notifier side), sans-IO: each
//! watcher's subscription to one AoR with its expiry and the `version` its bodies carry, NOTIFYs
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

/// The event package a subscription is to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Package {
    /// `Event: dialog` (RFC 4235): busy lamps and pickup.
    Dialog,
    /// `Event: presence` (RFC 3856): open, on the phone, closed.
    Presence,
}

impl Package {
    /// The package of an `Event` header's value (its name, parameters aside).
    pub fn of_event(value: &str) -> Option<Self> {
        let name = value.split(';').next()?.trim();
        if name.eq_ignore_ascii_case("dialog") {
            Some(Self::Dialog)
        } else if name.eq_ignore_ascii_case("presence") {
            Some(Self::Presence)
        } else {
            None
        }
    }

    /// The `Event` header's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dialog => "dialog",
            Self::Presence => "presence",
        }
    }

    /// The body's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Dialog => "application/dialog-info+xml",
            Self::Presence => "application/pidf+xml",
        }
    }
}

/// A SUBSCRIBE as the table needs it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The watcher's AoR (for the per-watcher limit).
    pub watcher: &'a str,
    /// The watched AoR.
    pub watched: &'a str,
    /// Its package.
    pub package: Package,
    /// The `Expires` asked, if any.
    pub expires: Option<u32>,
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
    package: Package,
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
    /// What the body says of it.
    pub package: Package,
    /// Where it goes.
    pub reach: W,
    /// The body's `version`.
    pub version: u32,
    /// Seconds left (`Subscription-State: active;expires=N`), or `None` when it ends
    /// (`terminated;reason=timeout` or after an unsubscribe).
    pub expires_in: Option<u32>,
}

/// A subscription as kept over a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved<W> {
    /// Its dialog.
    pub id: SubId,
    /// The watcher's AoR.
    pub watcher: String,
    /// The watched AoR.
    pub watched: String,
    /// Its package.
    pub package: Package,
    /// Where its NOTIFYs go.
    pub reach: W,
    /// Time left.
    pub expires_in: Duration,
    /// The version of its last NOTIFY.
    pub version: u32,
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

    /// A SUBSCRIBE (new or a refresh) of `req.watcher` to `req.watched` asking `req.expires`
    /// (none: the default). Returns the expiry granted; 0 ends the subscription (its final
    /// NOTIFY is queued). Every accepted SUBSCRIBE is answered by an immediate NOTIFY (RFC 6665
    /// §4.2.1.2).
    pub fn subscribe(
        &mut self,
        id: SubId,
        req: Request<'_>,
        reach: W,
        now: Instant,
    ) -> Result<u32, Refusal> {
        let Request {
            watcher,
            watched,
            package,
            expires,
        } = req;
        let asked = expires.unwrap_or(match package {
            Package::Dialog => self.cfg.default_expires,
            // RFC 3856 §6.4.
            Package::Presence => 3600.min(self.cfg.max_expires),
        });
        if asked == 0 {
            if let Some(sub) = self.subs.remove(&id) {
                self.ended.push(Due {
                    id,
                    watched: sub.watched,
                    package: sub.package,
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
                package,
                reach,
                expires_at: until,
                version: 0,
                last_sent: None,
                pending: true,
            },
        );
        Ok(granted)
    }

    /// `watched`'s calls changed: each of its subscriptions has a NOTIFY to send.
    pub fn changed(&mut self, watched: &str) {
        for s in self.subs.values_mut().filter(|s| s.watched == watched) {
            s.pending = true;
        }
    }

    /// Whether a device of `watched` is registered changed: its presence subscriptions have a
    /// NOTIFY to send (its busy lamps show calls only).
    pub fn presence_changed(&mut self, watched: &str) {
        for s in self
            .subs
            .values_mut()
            .filter(|s| s.watched == watched && s.package == Package::Presence)
        {
            s.pending = true;
        }
    }

    /// The AoRs whose presence is watched.
    pub fn presence_aors(&self) -> std::collections::HashSet<&str> {
        self.subs
            .values()
            .filter(|s| s.package == Package::Presence)
            .map(|s| s.watched.as_str())
            .collect()
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
                    package: s.package,
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
                    package: s.package,
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

    /// The AoR `id` watches and its package, while it lasts (an in-dialog refresh names only
    /// our Contact).
    pub fn watched_of(&self, id: &SubId) -> Option<(&str, Package)> {
        self.subs.get(id).map(|s| (s.watched.as_str(), s.package))
    }

    /// Every subscription as it stands at `now`, to be kept over a restart.
    pub fn export(&self, now: Instant) -> Vec<Saved<W>> {
        let mut out: Vec<Saved<W>> = self
            .subs
            .iter()
            .filter(|(_, s)| s.expires_at > now)
            .map(|(id, s)| Saved {
                id: id.clone(),
                watcher: s.watcher.clone(),
                watched: s.watched.clone(),
                package: s.package,
                reach: s.reach.clone(),
                expires_in: s.expires_at.saturating_duration_since(now),
                version: s.version,
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Takes back subscriptions kept over a restart: each gets a NOTIFY with the state now (what
    /// changed while the server was down is repaired at once), its version going on rising.
    pub fn restore(&mut self, saved: Vec<Saved<W>>, now: Instant) {
        for s in saved {
            if s.expires_in.is_zero() {
                continue;
            }
            self.subs.insert(
                s.id,
                Sub {
                    watched: s.watched,
                    watcher: s.watcher,
                    package: s.package,
                    reach: s.reach,
                    expires_at: now + s.expires_in,
                    version: s.version,
                    last_sent: None,
                    pending: true,
                },
            );
        }
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

    fn dialog<'a>(watcher: &'a str, watched: &'a str, expires: Option<u32>) -> Request<'a> {
        Request {
            watcher,
            watched,
            package: Package::Dialog,
            expires,
        }
    }

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
            s.subscribe(id(1), dialog("2002@w", "2001@w", None), "flow-a", t0),
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
            s.subscribe(id(1), dialog("2002@w", "2001@w", Some(0)), "flow-a", t0),
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
            s.subscribe(id(1), dialog("clerk@w", "2001@w", Some(30)), 1, t0),
            Err(Refusal::TooBrief(60))
        );
        assert_eq!(
            s.subscribe(id(1), dialog("clerk@w", "2001@w", Some(99_999)), 1, t0),
            Ok(7200)
        );
        assert_eq!(
            s.subscribe(id(2), dialog("clerk@w", "2002@w", Some(600)), 1, t0),
            Ok(600)
        );
        assert_eq!(s.watched_of(&id(2)), Some(("2002@w", Package::Dialog)));
        assert_eq!(s.watched_of(&id(3)), None);
        assert_eq!(
            s.subscribe(id(3), dialog("clerk@w", "2003@w", Some(600)), 1, t0),
            Err(Refusal::TooMany)
        );
        s.poll_due(t0);
        // A refresh of 2 moves its expiry and NOTIFYs again (RFC 6665 §4.2.1.2).
        let t1 = t0 + Duration::from_secs(500);
        assert_eq!(
            s.subscribe(id(2), dialog("clerk@w", "2002@w", Some(600)), 1, t1),
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

    #[test]
    fn presence_subscriptions_follow_registrations_and_calls_and_outlive_a_restart() {
        let t0 = Instant::now();
        let mut s = Subscriptions::new(SubscriptionConfig::default());
        let presence = Request {
            watcher: "2002@w",
            watched: "2001@w",
            package: Package::Presence,
            expires: None,
        };
        assert_eq!(
            s.subscribe(id(1), presence, "a", t0),
            Ok(3600),
            "RFC 3856's default"
        );
        assert_eq!(
            s.subscribe(id(2), dialog("2002@w", "2001@w", None), "a", t0),
            Ok(1800)
        );
        assert_eq!(s.watched_of(&id(1)), Some(("2001@w", Package::Presence)));
        assert_eq!(s.presence_aors(), ["2001@w"].into_iter().collect());
        let due = s.poll_due(t0);
        assert_eq!(due.len(), 2);
        assert_eq!(due[0].package, Package::Presence);
        // A device registered: presence only; a call: both.
        s.presence_changed("2001@w");
        let due = s.poll_due(t0 + Duration::from_secs(1));
        assert_eq!((due.len(), due[0].id.clone()), (1, id(1)));
        s.changed("2001@w");
        assert_eq!(s.poll_due(t0 + Duration::from_secs(2)).len(), 2);
        // Kept over a restart: the time left and the version go on; a NOTIFY goes at once.
        let saved = s.export(t0 + Duration::from_secs(100));
        assert_eq!(saved.len(), 2);
        assert_eq!(saved[0].expires_in, Duration::from_secs(3500));
        assert_eq!(saved[0].version, 3);
        let t1 = t0 + Duration::from_secs(7000);
        let mut after = Subscriptions::new(SubscriptionConfig::default());
        after.restore(saved, t1);
        let due = after.poll_due(t1);
        assert_eq!(due.len(), 2);
        assert_eq!((due[0].version, due[0].expires_in), (4, Some(3500)));
        assert_eq!((due[1].version, due[1].expires_in), (3, Some(1700)));
    }
}
