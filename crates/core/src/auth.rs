//! Digest authentication decisions (RFC 3261 §22, RFC 7616, RFC 8760).
//!
//! Verification is split in two so the caller can load the subscriber in between without
//! this crate doing I/O: [`Authenticator::prepare`] checks everything that needs no
//! subscriber (realm, algorithm, nonce), then [`Authenticator::finish`] checks the response
//! against the stored HA1, or against a decoy HA1 when there is no such subscriber, so an
//! unknown user and a wrong password take the same path and produce the same answer.

use std::sync::Mutex;

use careflow_proto::digest::{Algorithm, Credentials, expected_response};
use subtle::ConstantTimeEq;

use crate::nonce::{NonceCheck, NonceId, NonceIssuer, ReplayGuard};

/// Outcome of verifying credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The credentials are valid for the subscriber.
    Accepted,
    /// Answer with a new challenge; `stale` when only the nonce had expired.
    Challenge {
        /// `stale=true` in the challenge.
        stale: bool,
    },
}

/// Why credentials were refused, for logs and metrics only: never sent to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Realm differs from ours.
    WrongRealm,
    /// Algorithm not offered.
    UnsupportedAlgorithm,
    /// Nonce not issued by us.
    BadNonce,
    /// Nonce expired but the digest was right (not a failure of the user).
    StaleNonce,
    /// No such subscriber, or disabled.
    UnknownUser,
    /// Response did not match.
    WrongPassword,
    /// Nonce count repeated or regressed, with a right digest: a client that reuses its
    /// cached challenge (several WebRTC stacks do), not a guess.
    Replay,
    /// qop other than auth, or qop without nc/cnonce.
    BadQop,
}

impl Failure {
    /// Whether this failure is evidence of a password guess: a wrong response digest on a
    /// nonce we issued (or, indistinguishably, an unknown user). Everything else (stale,
    /// reused or foreign nonces, wrong realm or algorithm) is answered with a fresh challenge
    /// and never counts towards a brute-force ban: no digest was wrong, so nothing was
    /// learnt by the client either.
    pub fn is_guess(self) -> bool {
        matches!(self, Self::UnknownUser | Self::WrongPassword)
    }
}

/// Checks that passed before the subscriber lookup.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    /// The algorithm the client used; pick the matching HA1.
    pub algorithm: Algorithm,
    nonce: Option<NonceId>,
}

/// Issues challenges and verifies credentials.
#[derive(Debug)]
pub struct Authenticator {
    nonces: NonceIssuer,
    replay: Mutex<ReplayGuard>,
    algorithms: Vec<Algorithm>,
}

impl Authenticator {
    /// `algorithms` in the order challenges are sent (one header per algorithm); nonce counts
    /// are remembered for a window of `max_tracked_nonces` issued nonces ([`ReplayGuard`]).
    pub fn new(nonces: NonceIssuer, algorithms: Vec<Algorithm>, max_tracked_nonces: usize) -> Self {
        Self {
            nonces,
            replay: Mutex::new(ReplayGuard::new(max_tracked_nonces)),
            algorithms,
        }
    }

    /// The challenge header values (for WWW-Authenticate or Proxy-Authenticate).
    pub fn challenges(&self, realm: &str, now: u64, stale: bool) -> Vec<String> {
        let nonce = self.nonces.issue(realm, now);
        self.algorithms
            .iter()
            .map(|a| {
                // Written piece by piece: one is sent for every registration, and `format!`
                // cost twice as much.
                let mut v = String::with_capacity(100 + realm.len() + nonce.len());
                for part in [
                    "Digest realm=\"",
                    realm,
                    "\", nonce=\"",
                    &nonce,
                    "\", algorithm=",
                    a.as_str(),
                    ", qop=\"auth\"",
                    if stale { ", stale=true" } else { "" },
                ] {
                    v.push_str(part);
                }
                v
            })
            .collect()
    }

    /// First step: realm, algorithm, qop and nonce.
    pub fn prepare(&self, c: &Credentials<'_>, realm: &str, now: u64) -> Result<Pending, Failure> {
        if c.realm != realm {
            return Err(Failure::WrongRealm);
        }
        let algorithm = Algorithm::from_token(c.algorithm).ok_or(Failure::UnsupportedAlgorithm)?;
        if !self.algorithms.contains(&algorithm) {
            return Err(Failure::UnsupportedAlgorithm);
        }
        // qop=auth needs a well-formed nc and a cnonce; no qop is RFC 2069 compatibility.
        let qop_ok = match c.qop {
            None => true,
            Some(q) => {
                q.eq_ignore_ascii_case("auth")
                    && c.nc_value().is_some()
                    && c.cnonce.as_deref().is_some_and(|n| !n.is_empty())
            }
        };
        if !qop_ok {
            return Err(Failure::BadQop);
        }
        match self.nonces.check(&c.nonce, realm, now) {
            NonceCheck::Fresh(id) => Ok(Pending {
                algorithm,
                nonce: Some(id),
            }),
            NonceCheck::Stale => Ok(Pending {
                algorithm,
                nonce: None,
            }),
            NonceCheck::Invalid => Err(Failure::BadNonce),
        }
    }

    /// Second step: the response against the subscriber's HA1 for `pending.algorithm`
    /// (`None` when the subscriber does not exist or is disabled).
    pub fn finish(
        &self,
        pending: Pending,
        c: &Credentials<'_>,
        method: &str,
        ha1: Option<&str>,
        now: u64,
    ) -> Result<(), (Failure, Verdict)> {
        self.finish_any(pending, c, method, ha1.as_slice(), now)
    }

    /// [`Self::finish`] against any of several HA1s: a device's current credentials and,
    /// during the grace period after a rotation, its previous ones (empty when the subscriber
    /// does not exist or is disabled). Every HA1 is checked, so the time taken does not tell
    /// which one matched.
    pub fn finish_any(
        &self,
        pending: Pending,
        c: &Credentials<'_>,
        method: &str,
        ha1s: &[&str],
        now: u64,
    ) -> Result<(), (Failure, Verdict)> {
        let given = c.response.to_ascii_lowercase();
        let check = |ha1: &str| {
            let expected = expected_response(pending.algorithm, ha1, c, method);
            expected.len() == given.len() && bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
        };
        if ha1s.is_empty() {
            let decoy = self
                .nonces
                .decoy_ha1(&c.username, pending.algorithm.hex_len());
            let _ = check(&decoy);
            return Err((Failure::UnknownUser, Verdict::Challenge { stale: false }));
        }
        let matches = ha1s.iter().fold(false, |any, h| check(h) | any);
        // The digest is checked before the nonce's freshness, so that a stale or reused nonce
        // is no free oracle for guesses: a wrong digest counts whatever the nonce.
        if !matches {
            return Err((Failure::WrongPassword, Verdict::Challenge { stale: false }));
        }
        // RFC 7616 §3.3: the digest was right, only the nonce was not fresh: stale=true tells
        // the client to retry with the new nonce without asking its user for a password.
        let Some(id) = pending.nonce else {
            return Err((Failure::StaleNonce, Verdict::Challenge { stale: true }));
        };
        let nc = c.nc_value().unwrap_or(0);
        let fresh = match self.replay.lock() {
            Ok(mut g) => g.accept(id, nc, now, self.nonces.ttl_secs()),
            Err(_) => false,
        };
        if !fresh {
            return Err((Failure::Replay, Verdict::Challenge { stale: true }));
        }
        Ok(())
    }

    /// Whether `c`'s response is right for `ha1`, with no state changed: to decide whether
    /// more HA1s need loading before [`Self::finish_any`].
    pub fn digest_matches(
        &self,
        pending: Pending,
        c: &Credentials<'_>,
        method: &str,
        ha1: &str,
    ) -> bool {
        let expected = expected_response(pending.algorithm, ha1, c, method);
        let given = c.response.to_ascii_lowercase();
        expected.len() == given.len() && bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
    }

    /// Drops replay state for expired nonces; call periodically.
    pub fn sweep(&self, now: u64) {
        if let Ok(mut g) = self.replay.lock() {
            g.sweep(now, self.nonces.ttl_secs());
        }
    }

    /// Nonces currently tracked for replay protection.
    pub fn tracked_nonces(&self) -> usize {
        self.replay.lock().map(|g| g.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use careflow_proto::digest::ha1;

    use super::*;

    fn auth() -> Authenticator {
        Authenticator::new(
            NonceIssuer::new([1; 32], 300, 0),
            vec![Algorithm::Sha256, Algorithm::Md5],
            1000,
        )
    }

    fn nonce_of(ch: &str) -> &str {
        let i = ch.find("nonce=\"").unwrap() + 7;
        &ch[i..i + 64]
    }

    fn creds(alg: Algorithm, user: &str, pass: &str, nonce: &str, nc: &str) -> String {
        let h = ha1(alg, user, "example.com", pass);
        let mut c = Credentials {
            username: user.into(),
            realm: "example.com".into(),
            nonce: nonce.into(),
            uri: "sip:example.com".into(),
            response: "".into(),
            algorithm: Some(alg.as_str()),
            cnonce: Some("abc".into()),
            qop: Some("auth"),
            nc: Some(nc),
            opaque: None,
        };
        c.response = expected_response(alg, &h, &c, "REGISTER").into();
        format!(
            "Digest username=\"{user}\", realm=\"example.com\", nonce=\"{nonce}\", uri=\"sip:example.com\", response=\"{}\", algorithm={}, cnonce=\"abc\", qop=auth, nc={nc}",
            c.response,
            alg.as_str()
        )
    }

    fn run(
        a: &Authenticator,
        header: &str,
        stored_pass: Option<&str>,
        now: u64,
    ) -> Result<(), (Failure, Verdict)> {
        let c = Credentials::parse(header).unwrap();
        let p = a
            .prepare(&c, "example.com", now)
            .map_err(|f| (f, Verdict::Challenge { stale: false }))?;
        let h = stored_pass.map(|pw| ha1(p.algorithm, &c.username, "example.com", pw));
        a.finish(p, &c, "REGISTER", h.as_deref(), now)
    }

    #[test]
    fn both_algorithms_accept_and_replay_is_refused() {
        let a = auth();
        let ch = a.challenges("example.com", 100, false);
        assert_eq!(ch.len(), 2);
        assert!(ch[0].contains("algorithm=SHA-256") && ch[1].contains("algorithm=MD5"));
        let nonce = nonce_of(&ch[0]).to_string();
        for alg in [Algorithm::Md5, Algorithm::Sha256] {
            let nonce = nonce_of(&a.challenges("example.com", 100, false)[0]).to_string();
            assert_eq!(
                run(
                    &a,
                    &creds(alg, "alice", "pw", &nonce, "00000001"),
                    Some("pw"),
                    101
                ),
                Ok(())
            );
            assert_eq!(
                run(
                    &a,
                    &creds(alg, "alice", "pw", &nonce, "00000001"),
                    Some("pw"),
                    102
                )
                .unwrap_err()
                .0,
                Failure::Replay
            );
            assert_eq!(
                run(
                    &a,
                    &creds(alg, "alice", "pw", &nonce, "00000002"),
                    Some("pw"),
                    102
                ),
                Ok(())
            );
        }
        let _ = nonce;
    }

    #[test]
    fn either_of_several_ha1s_is_accepted_and_no_other() {
        // A device's current and previous credentials during the grace after a rotation.
        let a = auth();
        let ha1s =
            |p: &Pending| ["old", "new"].map(|pw| ha1(p.algorithm, "dev", "example.com", pw));
        for (pass, nc, ok) in [
            ("old", "00000001", true),
            ("new", "00000002", true),
            ("other", "00000003", false),
        ] {
            let nonce = nonce_of(&a.challenges("example.com", 100, false)[0]).to_string();
            let header = creds(Algorithm::Sha256, "dev", pass, &nonce, nc);
            let c = Credentials::parse(&header).unwrap();
            let p = a.prepare(&c, "example.com", 101).unwrap();
            let [old, new] = ha1s(&p);
            let got = a.finish_any(p, &c, "REGISTER", &[&new, &old], 101);
            assert_eq!(got.is_ok(), ok, "{pass}: {got:?}");
        }
        let nonce = nonce_of(&a.challenges("example.com", 100, false)[0]).to_string();
        let header = creds(Algorithm::Md5, "dev", "new", &nonce, "00000001");
        let c = Credentials::parse(&header).unwrap();
        let p = a.prepare(&c, "example.com", 101).unwrap();
        assert_eq!(
            a.finish_any(p, &c, "REGISTER", &[], 101).unwrap_err().0,
            Failure::UnknownUser
        );
    }

    #[test]
    fn unknown_user_and_wrong_password_look_alike() {
        let a = auth();
        let nonce = nonce_of(&a.challenges("example.com", 100, false)[0]).to_string();
        let wrong = run(
            &a,
            &creds(Algorithm::Md5, "alice", "bad", &nonce, "00000001"),
            Some("pw"),
            101,
        );
        let unknown = run(
            &a,
            &creds(Algorithm::Md5, "mallory", "x", &nonce, "00000001"),
            None,
            101,
        );
        assert_eq!(wrong.unwrap_err().1, unknown.unwrap_err().1);
    }

    #[test]
    fn stale_only_when_digest_was_right() {
        let a = auth();
        let nonce = nonce_of(&a.challenges("example.com", 100, false)[0]).to_string();
        let ok = run(
            &a,
            &creds(Algorithm::Md5, "alice", "pw", &nonce, "00000001"),
            Some("pw"),
            500,
        );
        assert_eq!(
            ok.unwrap_err(),
            (Failure::StaleNonce, Verdict::Challenge { stale: true })
        );
        let bad = run(
            &a,
            &creds(Algorithm::Md5, "alice", "no", &nonce, "00000001"),
            Some("pw"),
            500,
        );
        assert_eq!(
            bad.unwrap_err(),
            (Failure::WrongPassword, Verdict::Challenge { stale: false }),
            "a wrong digest on a stale nonce is a guess"
        );
        assert!(!Failure::StaleNonce.is_guess());
    }

    #[test]
    fn a_reused_nonce_count_with_a_right_digest_is_stale_not_a_guess() {
        let a = auth();
        let nonce = nonce_of(&a.challenges("example.com", 100, false)[0]).to_string();
        let h = creds(Algorithm::Md5, "alice", "pw", &nonce, "00000001");
        assert_eq!(run(&a, &h, Some("pw"), 101), Ok(()));
        // A WebRTC stack sends its next REGISTER with the cached nonce and nc=1 again.
        let again = run(&a, &h, Some("pw"), 102).unwrap_err();
        assert_eq!(again, (Failure::Replay, Verdict::Challenge { stale: true }));
        assert!(!again.0.is_guess());
        // A regressed count too.
        let h3 = creds(Algorithm::Md5, "alice", "pw", &nonce, "00000003");
        assert_eq!(run(&a, &h3, Some("pw"), 103), Ok(()));
        let h2 = creds(Algorithm::Md5, "alice", "pw", &nonce, "00000002");
        assert_eq!(
            run(&a, &h2, Some("pw"), 104).unwrap_err().0,
            Failure::Replay
        );
        // Guessing with a replayed nonce still counts: the digest is checked first.
        let wrong = creds(Algorithm::Md5, "alice", "guess", &nonce, "00000001");
        let e = run(&a, &wrong, Some("pw"), 105).unwrap_err();
        assert_eq!(
            e,
            (Failure::WrongPassword, Verdict::Challenge { stale: false })
        );
        assert!(e.0.is_guess());
        let unknown = creds(Algorithm::Md5, "mallory", "x", &nonce, "00000009");
        assert!(run(&a, &unknown, None, 105).unwrap_err().0.is_guess());
    }

    #[test]
    fn wrong_realm_and_algorithm() {
        let a = Authenticator::new(NonceIssuer::new([1; 32], 300, 0), vec![Algorithm::Md5], 10);
        let nonce = nonce_of(&a.challenges("example.com", 100, false)[0]).to_string();
        let h = creds(Algorithm::Sha256, "alice", "pw", &nonce, "00000001");
        assert_eq!(
            run(&a, &h, Some("pw"), 101).unwrap_err().0,
            Failure::UnsupportedAlgorithm
        );
        let h = creds(Algorithm::Md5, "alice", "pw", &nonce, "00000001")
            .replace("realm=\"example.com\"", "realm=\"x\"");
        assert_eq!(
            run(&a, &h, Some("pw"), 101).unwrap_err().0,
            Failure::WrongRealm
        );
    }

    #[test]
    fn a_challenge_is_written_whole_with_one_nonce_for_both_algorithms() {
        let a = auth();
        for stale in [false, true] {
            let ch = a.challenges("example.com", 100, stale);
            let n = nonce_of(&ch[0]).to_string();
            assert_eq!(n.len(), 64);
            let tail = if stale { ", stale=true" } else { "" };
            let want = |alg: &str| {
                format!(
                    "Digest realm=\"example.com\", nonce=\"{n}\", algorithm={alg}, qop=\"auth\"{tail}"
                )
            };
            assert_eq!(ch, [want("SHA-256"), want("MD5")]);
        }
    }
}

#[cfg(test)]
mod sipp_format {
    use super::*;

    #[test]
    fn sipp_style_credentials_prepare() {
        let a = Authenticator::new(NonceIssuer::new([1; 32], 300, 0), vec![Algorithm::Md5], 10);
        let ch = a.challenges("bench.local", 100, false);
        let i = ch[0].find("nonce=\"").unwrap() + 7;
        let nonce = &ch[0][i..i + 64];
        let h = format!(
            r#"Digest username="user00001",realm="bench.local",cnonce="6b8b4567",nc=00000001,qop=auth,uri="sip:bench.local",nonce="{nonce}",response="7c73ae6297ade64058e6a253acdba65f",algorithm=MD5"#
        );
        let c = Credentials::parse(&h).unwrap();
        a.prepare(&c, "bench.local", 101).unwrap();
    }
}
