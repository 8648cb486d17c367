//! The audit trail's hash chain (issue 20): every entry's hash covers the previous entry's
//! hash and its own fields (`hash = SHA-256(prev_hash || entry)`), so editing, removing or
//! reordering a stored entry breaks the chain from that entry on, and [`verify`] names it.
//! Truncating the newest entries, or rewriting the whole chain, is caught by comparing with a
//! checkpoint (a `(seq, hash)` signed and kept elsewhere).

use sha2::{Digest, Sha256};

/// The `prev_hash` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audited action, never a secret.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditEvent {
    /// Who acted: `careflow:USER_ID`, `apikey:NAME`, `cli`, `sip:USER@DOMAIN`, `system`.
    pub actor: String,
    /// Where from: the client's IP address, `local` for the CLI.
    pub source: String,
    /// What was done, e.g. `credentials.rotated`, `subscriber.disabled`, `calls.read`.
    pub action: String,
    /// What it was done to, e.g. the SIP account `2001@ward.test`.
    pub target: String,
    /// `ok`, or why it failed.
    pub outcome: String,
    /// Anything else worth keeping (a count, a filter), as text.
    pub detail: String,
}

/// An entry as stored: its place in the chain, its time, the event and the hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// 1, 2, 3, ... without gaps.
    pub seq: u64,
    /// Unix milliseconds.
    pub at: u64,
    /// What happened.
    pub event: AuditEvent,
    /// The previous entry's `hash` ([`GENESIS`] for the first).
    pub prev_hash: String,
    /// `SHA-256(prev_hash || canonical form)`, lower-case hex.
    pub hash: String,
}

/// The hash of an entry with these fields following `prev_hash`. Each field is written with
/// its length, so no two different entries have the same canonical form.
pub fn entry_hash(prev_hash: &str, seq: u64, at: u64, e: &AuditEvent) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    let seq = seq.to_string();
    let at = at.to_string();
    for field in [
        seq.as_str(),
        at.as_str(),
        &e.actor,
        &e.source,
        &e.action,
        &e.target,
        &e.outcome,
        &e.detail,
    ] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    h.finalize()
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            use std::fmt::Write as _;
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The entry that follows `last` (none: the first) in the chain.
pub fn next_entry(last: Option<(u64, &str)>, at: u64, event: AuditEvent) -> AuditEntry {
    let (seq, prev) = match last {
        Some((seq, hash)) => (seq + 1, hash.to_string()),
        None => (1, GENESIS.to_string()),
    };
    AuditEntry {
        seq,
        at,
        hash: entry_hash(&prev, seq, at, &event),
        prev_hash: prev,
        event,
    }
}

/// What is wrong with a chain, at the first entry where it breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broken {
    /// The entry's fields no longer give its hash: it was edited.
    Edited {
        /// The entry.
        seq: u64,
    },
    /// Entries are missing before this one (removed).
    Missing {
        /// The seq expected here.
        expected: u64,
        /// The seq found.
        found: u64,
    },
    /// The entry does not follow the one before it (moved, or the one before was replaced).
    OutOfOrder {
        /// The entry.
        seq: u64,
    },
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Edited { seq } => {
                write!(
                    f,
                    "entry {seq} was edited: its content does not give its hash"
                )
            }
            Self::Missing { expected, found } => write!(
                f,
                "entries {expected} to {} were removed: entry {found} follows entry {}",
                found - 1,
                expected - 1
            ),
            Self::OutOfOrder { seq } => write!(
                f,
                "entry {seq} does not follow entry {}: entries were reordered or replaced",
                seq - 1
            ),
        }
    }
}

/// Checks entries given in `seq` order, continuing a chain that ended at `last` (none: from
/// the first entry). Returns the last entry's `(seq, hash)`, or where the chain breaks.
/// Feeding the entries in pages keeps memory bounded.
#[derive(Debug, Clone, Default)]
pub struct Verifier {
    last: Option<(u64, String)>,
    /// Entries checked.
    pub checked: u64,
}

impl Verifier {
    /// The next entry in `seq` order.
    pub fn check(&mut self, e: &AuditEntry) -> Result<(), Broken> {
        let (expected, prev) = match &self.last {
            Some((seq, hash)) => (seq + 1, hash.as_str()),
            None => (1, GENESIS),
        };
        if e.seq > expected {
            return Err(Broken::Missing {
                expected,
                found: e.seq,
            });
        }
        if e.seq < expected || e.prev_hash != prev {
            return Err(Broken::OutOfOrder { seq: e.seq });
        }
        if entry_hash(&e.prev_hash, e.seq, e.at, &e.event) != e.hash {
            return Err(Broken::Edited { seq: e.seq });
        }
        self.last = Some((e.seq, e.hash.clone()));
        self.checked += 1;
        Ok(())
    }

    /// The last entry checked: `(seq, hash)`.
    pub fn head(&self) -> Option<(u64, &str)> {
        self.last.as_ref().map(|(s, h)| (*s, h.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(action: &str) -> AuditEvent {
        AuditEvent {
            actor: "apikey:ops".into(),
            source: "192.0.2.7".into(),
            action: action.into(),
            target: "2001@ward.test".into(),
            outcome: "ok".into(),
            detail: String::new(),
        }
    }

    fn chain(n: u64) -> Vec<AuditEntry> {
        let mut out: Vec<AuditEntry> = Vec::new();
        for i in 0..n {
            let last = out.last().map(|e| (e.seq, e.hash.as_str()));
            let e = next_entry(last, 1_000 + i, event(&format!("action.{i}")));
            out.push(e);
        }
        out
    }

    fn verify(entries: &[AuditEntry]) -> Result<u64, Broken> {
        let mut v = Verifier::default();
        for e in entries {
            v.check(e)?;
        }
        Ok(v.checked)
    }

    #[test]
    fn an_untouched_chain_verifies() {
        let c = chain(5);
        assert_eq!(c[0].prev_hash, GENESIS);
        assert_eq!(c[1].prev_hash, c[0].hash);
        assert_eq!(verify(&c), Ok(5));
        assert_eq!(verify(&[]), Ok(0));
    }

    #[test]
    fn an_edited_entry_is_named() {
        let mut c = chain(5);
        c[2].event.target = "2002@ward.test".into();
        assert_eq!(verify(&c), Err(Broken::Edited { seq: 3 }));
        let mut c = chain(5);
        c[3].at += 1;
        assert_eq!(verify(&c), Err(Broken::Edited { seq: 4 }));
    }

    #[test]
    fn a_removed_entry_is_named() {
        let mut c = chain(5);
        c.remove(2);
        assert_eq!(
            verify(&c),
            Err(Broken::Missing {
                expected: 3,
                found: 4
            })
        );
        assert_eq!(
            Broken::Missing {
                expected: 3,
                found: 4
            }
            .to_string(),
            "entries 3 to 3 were removed: entry 4 follows entry 2"
        );
    }

    #[test]
    fn reordered_entries_are_named() {
        // Two entries swap places, seq numbers rewritten to look continuous.
        let mut c = chain(5);
        c.swap(1, 2);
        c[1].seq = 2;
        c[2].seq = 3;
        assert_eq!(verify(&c), Err(Broken::OutOfOrder { seq: 2 }));
    }

    #[test]
    fn an_edit_with_its_own_hash_recomputed_breaks_the_next_link() {
        let mut c = chain(4);
        c[1].event.outcome = "denied".into();
        c[1].hash = entry_hash(&c[1].prev_hash, 2, c[1].at, &c[1].event);
        assert_eq!(verify(&c), Err(Broken::OutOfOrder { seq: 3 }));
    }

    #[test]
    fn fields_cannot_slide_into_each_other() {
        let a = AuditEvent {
            actor: "ab".into(),
            source: "c".into(),
            ..AuditEvent::default()
        };
        let b = AuditEvent {
            actor: "a".into(),
            source: "bc".into(),
            ..AuditEvent::default()
        };
        assert_ne!(entry_hash(GENESIS, 1, 0, &a), entry_hash(GENESIS, 1, 0, &b));
    }
}
