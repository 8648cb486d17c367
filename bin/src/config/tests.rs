use std::collections::HashMap;

use super::*;

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| m.get(k).cloned()
}

#[test]
fn defaults() {
    let c = Config::load(None, env(&[])).unwrap();
    assert_eq!(c.sip_domain, "localhost");
    assert_eq!(c.sip_listen.len(), 2);
    assert_eq!(c.http_listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.db_url, DbUrl::Sqlite(PathBuf::from("./data/careflow.db")));
    assert_eq!(c.registrar.max_contacts, 10);
    assert_eq!(c.auth_algorithms, vec![Algorithm::Md5]);
}

#[test]
fn file_then_env_override() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        "sip_domain = \"sip.example.com\"\nmin_expires = 120\nauth_algorithms = [\"SHA-256\"]\n",
    )
    .unwrap();
    let c = Config::load(Some(&p), env(&[("SIP_DOMAIN", "other.example.com")])).unwrap();
    assert_eq!(c.sip_domain, "other.example.com");
    assert_eq!(c.registrar.min_expires, 120);
    assert_eq!(c.auth_algorithms, vec![Algorithm::Sha256]);
}

#[test]
fn errors_name_the_key() {
    let e = Config::load(None, env(&[("SIP_LISTEN", "udp:nonsense")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("SIP_LISTEN"), "{e}");
    let e = Config::load(None, env(&[("MIN_EXPIRES", "abc")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("MIN_EXPIRES") && e.contains("abc"), "{e}");
    let e = Config::load(None, env(&[("HTTP_LISTEN", "8080")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("HTTP_LISTEN"), "{e}");
    let e = Config::load(None, env(&[("DB_URL", "postgres://x/y")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("DB_URL"), "{e}");
    let e = Config::load(None, env(&[("AUTH_ALGORITHMS", "SHA-512")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("AUTH_ALGORITHMS"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, "sip_domian = \"typo\"\n").unwrap();
    let e = Config::load(Some(&p), env(&[])).unwrap_err().to_string();
    assert!(e.contains("sip_domian"), "{e}");
}

#[test]
fn documented_keys_match_the_code() {
    let doc = include_str!("../../../docs/configuration.md");
    for (k, d, _) in KEYS {
        let row = format!("| `{}` | `{}` |", k.to_ascii_uppercase(), k);
        assert!(
            doc.contains(&row),
            "docs/configuration.md lacks a row for {k}"
        );
        if !d.is_empty() {
            assert!(
                doc.contains(&format!("`{d}`")),
                "docs/configuration.md lacks the default of {k}"
            );
        }
    }
    let example = include_str!("../../../docs/careflow-sip.example.toml");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("example.toml");
    std::fs::write(&p, example).unwrap();
    Config::load(Some(&p), env(&[])).expect("the example config parses");
}
