//! Stateless digest nonces and replay tracking.
//!
//! A nonce is `hex(issued_at) hex(counter) hex(mac)` where the MAC is HMAC-SHA-256 over the
//! first two fields and the realm with a server secret, truncated to 128 bits. Any node that
//! shares the secret can verify it; no per-nonce state is kept until a client uses it.
//! Nonce counts (`nc`) are then tracked per nonce so a replayed request is refused.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::flow::push_hex;

type HmacSha256 = Hmac<Sha256>;

/// Result of checking a nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    /// Ours and fresh; the id keys replay tracking.
    Fresh(NonceId),
    /// Ours but older than the lifetime: answer with `stale=true`.
    Stale,
    /// Not issued by us (or for another realm).
    Invalid,
}

/// Identity of one issued nonce (issue time and counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NonceId {
    issued_at: u64,
    counter: u64,
}

/// Issues and verifies nonces.
///
/// A nonce counts as fresh only at the process that issued it, the only one that knows which
/// nonce counts were used: the top 24 bits of its counter name the issuer (random per start).
/// Another node of a cluster (sharing the secret) or this node after a restart answers a
/// valid nonce of another issuer with `stale=true`, so the client retries at once with a fresh
/// one, and a captured request cannot be replayed there.
pub struct NonceIssuer {
    /// HMAC-SHA256 keyed with the server secret: the key's two padded blocks are hashed once
    /// here, and every nonce's MAC starts from a copy (half the SHA-256 work of keying it anew
    /// for each nonce issued and each one checked).
    keyed: HmacSha256,
    ttl_secs: u64,
    counter: AtomicU64,
    issuer: u64,
}

/// Bits of the counter below the issuer's.
const ISSUER_SHIFT: u32 = 40;

impl std::fmt::Debug for NonceIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceIssuer")
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

impl NonceIssuer {
    /// `counter_start` should be random so restarted servers do not reissue old values.
    pub fn new(secret: [u8; 32], ttl_secs: u64, counter_start: u64) -> Self {
        // The sequence starts in the lower half of its 40 bits: 2^39 nonces before it could
        // reach the issuer's bits.
        let sequence = counter_start & ((1 << (ISSUER_SHIFT - 1)) - 1);
        let issuer = counter_start >> ISSUER_SHIFT;
        Self {
            keyed: HmacSha256::new_from_slice(&secret).unwrap_or_else(|_| unreachable!()),
            ttl_secs,
            counter: AtomicU64::new((issuer << ISSUER_SHIFT) | sequence),
            issuer,
        }
    }

    /// Lifetime of a nonce in seconds.
    pub fn ttl_secs(&self) -> u64 {
        self.ttl_secs
    }

    /// A new nonce for `realm` at unix time `now`.
    pub fn issue(&self, realm: &str, now: u64) -> String {
        let counter = self.counter.fetch_add(1, Ordering::Relaxed);
        let mac = self.mac(now, counter, realm);
        let mut s = String::with_capacity(64);
        push_hex(&mut s, &now.to_be_bytes());
        push_hex(&mut s, &counter.to_be_bytes());
        push_hex(&mut s, &mac);
        s
    }

    /// Verifies a nonce presented by a client.
    pub fn check(&self, nonce: &str, realm: &str, now: u64) -> NonceCheck {
        let Some(raw) = careflow_proto::digest::unhex::<32>(nonce) else {
            return NonceCheck::Invalid;
        };
        let issued_at = u64::from_be_bytes(raw[0..8].try_into().unwrap_or_default());
        let counter = u64::from_be_bytes(raw[8..16].try_into().unwrap_or_default());
        let mac = self.mac(issued_at, counter, realm);
        if !bool::from(mac.ct_eq(&raw[16..32])) {
            return NonceCheck::Invalid;
        }
        // A nonce "from the future" (clock stepped back) is treated as fresh but bounded.
        if now > issued_at.saturating_add(self.ttl_secs) || issued_at > now.saturating_add(60) {
            return NonceCheck::Stale;
        }
        if counter >> ISSUER_SHIFT != self.issuer {
            // Issued by another node, or before a restart: this one cannot tell a replay.
            return NonceCheck::Stale;
        }
        NonceCheck::Fresh(NonceId { issued_at, counter })
    }

    fn mac(&self, issued_at: u64, counter: u64, realm: &str) -> [u8; 16] {
        let mut m = self.keyed.clone();
        m.update(&issued_at.to_be_bytes());
        m.update(&counter.to_be_bytes());
        m.update(realm.as_bytes());
        let full = m.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    /// A deterministic fake HA1 for a username that does not exist, so that verifying it
    /// costs the same as a real one (anti-enumeration).
    pub fn decoy_ha1(&self, username: &str, hex_len: usize) -> String {
        let mut m = self.keyed.clone();
        m.update(b"decoy-ha1");
        m.update(username.as_bytes());
        let d = m.finalize().into_bytes();
        let mut s = String::with_capacity(64);
        push_hex(&mut s, &d);
        s.truncate(hex_len);
        s
    }
}

/// Remembers the highest nonce count seen per nonce, for the nonce lifetime.
///
/// Nonces are numbered in the order they are issued, so the guard keeps a window of counters
/// rather than a map: blocks of [`BLOCK`] consecutive counters, each a block of nonce counts
/// (4 bytes per counter) allocated once one of its nonces is used. A map cost 40-50 bytes per
/// used nonce; at 4,000 registrations per second every one of them is held for `NONCE_TTL`
/// (issue 22: memory per contact, steady under refresh traffic).
#[derive(Debug)]
pub struct ReplayGuard {
    blocks: VecDeque<Block>,
    /// Counter / [`BLOCK`] of `blocks[0]`.
    first_block: u64,
    max_blocks: usize,
    /// Nonces used at least once.
    tracked: usize,
}

/// Counters per block.
const BLOCK: u64 = 256;

#[derive(Debug)]
struct Block {
    /// No nonce of this block was issued after this time (unix seconds): the latest issue time
    /// seen in it, or when the block was added (the nonces it covers were issued by then).
    newest: u64,
    /// `nc + 1` of the highest nonce count used per counter; 0: not used.
    counts: Option<Box<[u32; BLOCK as usize]>>,
}

impl ReplayGuard {
    /// A guard over a window of at most `max_nonces` issued nonces (rounded up to whole blocks).
    /// A nonce older than the window is refused as if replayed: the client is challenged again
    /// with `stale=true` and retries without asking its user.
    pub fn new(max_nonces: usize) -> Self {
        Self {
            blocks: VecDeque::new(),
            first_block: 0,
            max_blocks: max_nonces.div_ceil(BLOCK as usize).max(1),
            tracked: 0,
        }
    }

    /// Accepts `nc` for `id` if it is higher than any seen before. Requests without qop
    /// (no nc) may use a nonce once (`nc` = 0 then).
    pub fn accept(&mut self, id: NonceId, nc: u32, now: u64, ttl: u64) -> bool {
        let Some(stored) = nc.checked_add(1) else {
            return false;
        };
        let block = id.counter / BLOCK;
        let Some(index) = self.block_index(block, now, ttl) else {
            return false;
        };
        let b = &mut self.blocks[index];
        b.newest = b.newest.max(id.issued_at);
        let counts = b
            .counts
            .get_or_insert_with(|| Box::new([0; BLOCK as usize]));
        let slot = &mut counts[(id.counter % BLOCK) as usize];
        if *slot >= stored {
            return false;
        }
        if *slot == 0 {
            self.tracked += 1;
        }
        *slot = stored;
        true
    }

    /// Where the block numbered `block` is, adding it (and those between) when the window
    /// has room; `None` when it is outside the window.
    fn block_index(&mut self, block: u64, now: u64, ttl: u64) -> Option<usize> {
        let empty = || Block {
            newest: now,
            counts: None,
        };
        if self.blocks.is_empty() {
            self.first_block = block;
            self.blocks.push_back(empty());
            return Some(0);
        }
        if block < self.first_block {
            // Issued before every nonce used so far and used only now (a slow client).
            let add = usize::try_from(self.first_block - block).ok()?;
            if self.blocks.len().saturating_add(add) > self.max_blocks {
                return None;
            }
            for _ in 0..add {
                self.blocks.push_front(empty());
            }
            self.first_block = block;
            return Some(0);
        }
        let last = self.first_block + self.blocks.len() as u64 - 1;
        if block > last {
            let add = usize::try_from(block - last).ok()?;
            if self.blocks.len().saturating_add(add) > self.max_blocks {
                self.sweep(now, ttl);
            }
            // Still no room: the oldest nonces give way (they are the likeliest unused).
            while !self.blocks.is_empty() && self.blocks.len().saturating_add(add) > self.max_blocks
            {
                self.pop_oldest();
            }
            if self.blocks.is_empty() || add > self.max_blocks {
                self.blocks.clear();
                self.first_block = block;
                self.blocks.push_back(empty());
                return Some(0);
            }
            for _ in 0..add {
                self.blocks.push_back(empty());
            }
        }
        usize::try_from(block - self.first_block).ok()
    }

    fn pop_oldest(&mut self) {
        if let Some(b) = self.blocks.pop_front() {
            self.first_block += 1;
            let used = b
                .counts
                .map_or(0, |c| c.iter().filter(|&&n| n != 0).count());
            self.tracked -= used;
        }
    }

    /// Forgets nonces that can no longer be used.
    pub fn sweep(&mut self, now: u64, ttl: u64) {
        while self
            .blocks
            .front()
            .is_some_and(|b| b.newest.saturating_add(ttl) < now)
        {
            self.pop_oldest();
        }
        if self.blocks.capacity() > 4 * self.blocks.len() + 64 {
            self.blocks.shrink_to(2 * self.blocks.len());
        }
    }

    /// Nonces tracked (used at least once, within the window).
    pub fn len(&self) -> usize {
        self.tracked
    }

    /// True when no nonce is tracked.
    pub fn is_empty(&self) -> bool {
        self.tracked == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> NonceIssuer {
        NonceIssuer::new([7; 32], 300, 42)
    }

    #[test]
    fn a_nonce_is_time_counter_and_the_truncated_hmac_of_both_and_the_realm() {
        // The layout other nodes (and this one after a restart) verify: the kept keyed state
        // must give the MAC a fresh HMAC with the secret gives, nonce after nonce.
        let n = issuer();
        for (realm, now) in [("example.com", 1000u64), ("b.example", 1001), ("", 7)] {
            let nonce = n.issue(realm, now);
            assert_eq!(nonce.len(), 64);
            assert_eq!(&nonce[..16], format!("{now:016x}"));
            let counter = u64::from_str_radix(&nonce[16..32], 16).unwrap();
            let mut m = HmacSha256::new_from_slice(&[7; 32]).unwrap();
            m.update(&now.to_be_bytes());
            m.update(&counter.to_be_bytes());
            m.update(realm.as_bytes());
            let want = careflow_proto::digest::hex(&m.finalize().into_bytes()[..16]);
            assert_eq!(&nonce[32..], want, "{realm}");
        }
        let decoy = n.decoy_ha1("ghost", 32);
        let mut m = HmacSha256::new_from_slice(&[7; 32]).unwrap();
        m.update(b"decoy-ha1");
        m.update(b"ghost");
        let full = careflow_proto::digest::hex(&m.finalize().into_bytes());
        assert_eq!(decoy, full[..32]);
    }

    #[test]
    fn fresh_stale_invalid() {
        let n = issuer();
        let nonce = n.issue("example.com", 1000);
        assert!(matches!(
            n.check(&nonce, "example.com", 1100),
            NonceCheck::Fresh(_)
        ));
        assert_eq!(n.check(&nonce, "example.com", 1301), NonceCheck::Stale);
        assert_eq!(n.check(&nonce, "other.com", 1100), NonceCheck::Invalid);
        let mut forged = nonce.clone().into_bytes();
        forged[63] = if forged[63] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            n.check(std::str::from_utf8(&forged).unwrap(), "example.com", 1100),
            NonceCheck::Invalid
        );
        assert_eq!(n.check("zz", "example.com", 1100), NonceCheck::Invalid);
        assert_ne!(
            n.issue("example.com", 1000),
            nonce,
            "nonces are unique within a second"
        );
        // another node with another secret cannot verify it
        let other = NonceIssuer::new([8; 32], 300, 0);
        assert_eq!(
            other.check(&nonce, "example.com", 1100),
            NonceCheck::Invalid
        );
    }

    #[test]
    fn a_nonce_is_fresh_only_where_it_was_issued() {
        let here = NonceIssuer::new([7; 32], 300, 0x0000_0a00_0000_0005);
        // Another node of the cluster (same secret), or this node after a restart.
        let there = NonceIssuer::new([7; 32], 300, 0x0000_0b00_0000_0005);
        let nonce = here.issue("example.com", 1000);
        assert!(matches!(
            here.check(&nonce, "example.com", 1001),
            NonceCheck::Fresh(_)
        ));
        assert_eq!(
            there.check(&nonce, "example.com", 1001),
            NonceCheck::Stale,
            "valid, but only its issuer can tell a replay"
        );
        // A counter start near the top of its range does not run into the issuer's bits.
        let edge = NonceIssuer::new([7; 32], 300, 0x0000_0aff_ffff_ffff);
        for _ in 0..1000 {
            let n = edge.issue("example.com", 1000);
            assert!(matches!(
                edge.check(&n, "example.com", 1000),
                NonceCheck::Fresh(_)
            ));
        }
    }

    #[test]
    fn replayed_nc_is_refused() {
        let n = issuer();
        let nonce = n.issue("r", 10);
        let NonceCheck::Fresh(id) = n.check(&nonce, "r", 10) else {
            panic!()
        };
        let mut g = ReplayGuard::new(10);
        assert!(g.accept(id, 1, 10, 300));
        assert!(!g.accept(id, 1, 11, 300));
        assert!(g.accept(id, 2, 11, 300));
        assert!(!g.accept(id, 2, 11, 300));
        g.sweep(400, 300);
        assert!(g.is_empty());
    }

    fn id(counter: u64, issued_at: u64) -> NonceId {
        NonceId { issued_at, counter }
    }

    #[test]
    fn the_window_is_bounded_and_the_oldest_nonces_give_way() {
        let mut g = ReplayGuard::new(2 * BLOCK as usize);
        let base = 7 * BLOCK;
        assert!(g.accept(id(base, 10), 1, 10, 300));
        assert!(g.accept(id(base + BLOCK + 3, 10), 1, 10, 300));
        assert_eq!(g.len(), 2);
        // A third block does not fit: the oldest gives way.
        assert!(g.accept(id(base + 2 * BLOCK, 11), 1, 11, 300));
        assert_eq!(g.len(), 2);
        assert_eq!(g.blocks.len(), 2);
        // Its nonce is now refused (the client is challenged again with stale=true), even
        // with a count it never used.
        assert!(!g.accept(id(base + 1, 10), 1, 12, 300));
        // The others are still tracked.
        assert!(!g.accept(id(base + BLOCK + 3, 10), 1, 12, 300));
        assert!(g.accept(id(base + BLOCK + 3, 10), 2, 12, 300));
        // A jump far ahead keeps only the new block.
        assert!(g.accept(id(base + 1000 * BLOCK, 20), 1, 20, 300));
        assert_eq!(g.len(), 1);
        assert!(g.blocks.len() <= 2);
    }

    #[test]
    fn a_nonce_used_after_later_ones_is_accepted_once() {
        let mut g = ReplayGuard::new(1_000_000);
        let base = 40 * BLOCK;
        // Challenged first, answers last (a slow phone), two blocks before the others.
        assert!(g.accept(id(base + 3 * BLOCK, 100), 1, 100, 300));
        assert!(g.accept(id(base + 5, 99), 1, 101, 300));
        assert!(!g.accept(id(base + 5, 99), 1, 101, 300));
        assert!(g.accept(id(base + 4, 99), 0, 101, 300), "without qop, once");
        assert!(!g.accept(id(base + 4, 99), 0, 102, 300));
        assert_eq!(g.len(), 3);
        assert!(!g.accept(id(base + 6, 99), u32::MAX, 102, 300));
    }

    #[test]
    fn sweeping_forgets_only_expired_blocks() {
        let mut g = ReplayGuard::new(1_000_000);
        assert!(g.accept(id(0, 100), 1, 100, 300));
        assert!(g.accept(id(BLOCK, 350), 1, 350, 300));
        g.sweep(401, 300);
        assert_eq!(g.len(), 1, "the first block's nonces expired at 400");
        assert!(
            !g.accept(id(BLOCK, 350), 1, 402, 300),
            "the second is remembered"
        );
        g.sweep(651, 300);
        assert!(g.is_empty());
        assert!(g.blocks.is_empty());
    }
}
