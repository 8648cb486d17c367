//! Which User-Agents name a SIP scanner (friendly-scanner, sipvicious, ...): every request's
//! User-Agent is checked, so all fragments are looked for in one pass over the header,
//! ignoring ASCII case, without a lower-cased copy (a copy and a substring search per
//! fragment cost ~2,700 instructions per REGISTER).

use aho_corasick::AhoCorasick;

/// The configured scanner fragments and one matcher for all of them.
#[derive(Clone, Debug, Default)]
pub struct ScannerAgents {
    fragments: Vec<String>,
    matcher: Option<AhoCorasick>,
}

impl ScannerAgents {
    /// Fragments are matched anywhere in the User-Agent, ignoring ASCII case; empty ones are
    /// ignored (they would match every client).
    pub fn new<I, S>(fragments: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let fragments: Vec<String> = fragments
            .into_iter()
            .map(|f| f.as_ref().trim().to_ascii_lowercase())
            .filter(|f| !f.is_empty())
            .collect();
        let matcher = (!fragments.is_empty())
            .then(|| {
                AhoCorasick::builder()
                    .ascii_case_insensitive(true)
                    .build(&fragments)
                    .ok()
            })
            .flatten();
        Self { fragments, matcher }
    }

    /// True when `user_agent` contains one of the fragments.
    pub fn matches(&self, user_agent: &str) -> bool {
        match &self.matcher {
            Some(m) => m.is_match(user_agent),
            // Only when the automaton could not be built (it has a size limit a list of
            // User-Agent fragments does not reach): the same answer, found the slow way.
            None if !self.fragments.is_empty() => {
                let ua = user_agent.to_ascii_lowercase();
                self.fragments.iter().any(|f| ua.contains(f.as_str()))
            }
            None => false,
        }
    }

    /// The fragments, lower case, as configured.
    pub fn fragments(&self) -> &[String] {
        &self.fragments
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: &[&str] = &[
        "friendly-scanner",
        "sipvicious",
        "sipcli",
        "sip-scan",
        "sundayddr",
        "iwar",
        "sivus",
        "smap",
        "pplsip",
        "vaxsipuseragent",
    ];

    #[test]
    fn scanners_are_found_anywhere_in_any_case() {
        let s = ScannerAgents::new(DEFAULTS);
        for ua in [
            "friendly-scanner",
            "Friendly-Scanner 1.0",
            "sipvicious/0.3.4",
            "x SIPVICIOUS",
            "pplsip",
            "VaxSIPUserAgent/3.1",
            "sipcli/v1.8",
            "abc-smap-def",
        ] {
            assert!(s.matches(ua), "{ua} should be a scanner");
        }
    }

    #[test]
    fn real_phones_and_clients_pass() {
        let s = ScannerAgents::new(DEFAULTS);
        for ua in [
            "",
            "Yealink SIP-T46U 108.86.0.20",
            "Cisco/SPA504G-7.6.2",
            "Grandstream GXP2170 1.0.11.3",
            "MicroSIP/3.21.3",
            "Groundwire/24.1",
            "Linphone Desktop/5.2.0 (Debian)",
            "baresip v3.10.1 (x86_64/linux)",
            "JsSIP 3.10.1",
            "careflow-bench",
        ] {
            assert!(!s.matches(ua), "{ua} is not a scanner");
        }
    }

    #[test]
    fn same_answer_as_lower_casing_and_searching() {
        // The definition this replaced: lower-case the header, then a substring search per
        // fragment. Generated headers mixing fragment pieces, case and other bytes.
        let s = ScannerAgents::new(DEFAULTS);
        let pieces = [
            "Friendly",
            "-scanner",
            "SIP",
            "vicious",
            "cli",
            "s",
            "map",
            "iwar",
            "x",
            " ",
            "é",
            "Sun",
            "dayDDR",
            "/1.0",
            "VAX",
            "sipuseragent",
            "pplsip",
            "-",
            "scan",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..20_000 {
            let mut ua = String::new();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let n = (seed % 6) as usize;
            let mut r = seed;
            for _ in 0..n {
                r = r.rotate_left(11).wrapping_mul(0x2545_f491_4f6c_dd1d);
                ua.push_str(pieces[(r >> 33) as usize % pieces.len()]);
            }
            let lower = ua.to_ascii_lowercase();
            let expected = DEFAULTS.iter().any(|f| lower.contains(f));
            assert_eq!(s.matches(&ua), expected, "{ua:?}");
        }
    }

    #[test]
    fn no_fragments_match_nothing() {
        let s = ScannerAgents::new(["", "  "]);
        assert!(s.fragments().is_empty());
        assert!(!s.matches("friendly-scanner"));
        assert!(!ScannerAgents::default().matches("sipvicious"));
    }

    #[test]
    fn fragments_are_kept_lower_case() {
        let s = ScannerAgents::new(["SIPVicious", " Friendly-Scanner "]);
        assert_eq!(s.fragments(), ["sipvicious", "friendly-scanner"]);
        assert!(s.matches("sipvicious"));
    }
}
