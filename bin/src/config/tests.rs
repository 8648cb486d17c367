use std::collections::HashMap;

use careflow_core::Transport;

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
    assert_eq!(c.sip_listen.len(), 4);
    assert!(c.tls_files.is_none());
    assert_eq!(c.ws.path, "/");
    assert_eq!(c.ws.allowed_origins, None);
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
    let e = Config::load(None, env(&[("DB_URL", "oracle://x/y")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("DB_URL"), "{e}");
    let e = Config::load(None, env(&[("AUTH_ALGORITHMS", "SHA-512")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("AUTH_ALGORITHMS"), "{e}");
    let e = Config::load(None, env(&[("TLS_CERT", "/x.pem")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("TLS_KEY"), "{e}");
    let e = Config::load(None, env(&[("WS_ALLOWED_ORIGINS", "app.example.com")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("WS_ALLOWED_ORIGINS"), "{e}");
    let e = Config::load(None, env(&[("SIP_LISTEN", "sctp:0.0.0.0:5060")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("SIP_LISTEN") && e.contains("sctp"), "{e}");
    let e = Config::load(None, env(&[("TLS_REQUIRE_CLIENT_CERT", "true")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("TLS_CLIENT_CA"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, "sip_domian = \"typo\"\n").unwrap();
    let e = Config::load(Some(&p), env(&[])).unwrap_err().to_string();
    assert!(e.contains("sip_domian"), "{e}");
}

#[test]
fn websocket_and_tls_settings() {
    let c = Config::load(
        None,
        env(&[
            (
                "SIP_LISTEN",
                "wss:0.0.0.0:8443,ws:127.0.0.1:8088,tls:[::]:5061",
            ),
            ("TLS_CERT", "/etc/careflow-sip/cert.pem"),
            ("TLS_KEY", "/etc/careflow-sip/key.pem"),
            (
                "WS_ALLOWED_ORIGINS",
                "https://app.careflow.example/, http://localhost:3000",
            ),
            ("WS_PATH", "/sip"),
        ]),
    )
    .unwrap();
    assert_eq!(c.sip_listen[0].transport, Transport::Wss);
    assert_eq!(c.sip_listen[2].addr.to_string(), "[::]:5061");
    assert!(c.tls_files.is_some());
    assert_eq!(
        c.ws.allowed_origins.as_deref(),
        Some(
            &[
                "https://app.careflow.example".to_string(),
                "http://localhost:3000".to_string()
            ][..]
        )
    );
    assert_eq!(c.ws.path, "/sip");
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

#[test]
fn check_reports_every_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        "sip_domian = \"typo\"\nmin_expires = \"soon\"\nhttp_listen = \"8080\"\nsip_listen = \"udp:0.0.0.0:5060\"\n",
    )
    .unwrap();
    let problems = Config::check(
        Some(&p),
        env(&[("MAX_CONTACTS", "0"), ("TLS_CERT", "/x.pem")]),
    );
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    for key in [
        "sip_domian",
        "MIN_EXPIRES",
        "HTTP_LISTEN",
        "MAX_CONTACTS",
        "TLS_KEY",
    ] {
        assert!(
            text.iter().any(|t| t.contains(key)),
            "{key} not reported: {text:?}"
        );
    }
    assert_eq!(problems.len(), 5, "{text:?}");
    assert!(Config::check(None, env(&[])).is_empty());
}

#[test]
fn cluster_settings_need_redis_and_a_secret_and_name_the_key() {
    const SECRET: &str = "c1a5c1a5c1a5c1a5c1a5c1a5c1a5c1a5c1a5c1a5c1a5c1a5c1a5c1a5c1a5c1a5";
    let err = |pairs: &[(&str, &str)]| Config::load(None, env(pairs)).unwrap_err().to_string();
    let redis = ("REDIS_URL", "redis://127.0.0.1:6379/0");
    assert!(Config::load(None, env(&[])).unwrap().cluster.is_none());
    let e = err(&[
        ("CLUSTER_ADDRESS", "10.0.0.2:5090"),
        ("CLUSTER_SECRET", SECRET),
    ]);
    assert!(
        e.contains("CLUSTER_ADDRESS") && e.contains("REDIS_URL"),
        "{e}"
    );
    let e = err(&[("CLUSTER_ADDRESS", "10.0.0.2:5090"), redis]);
    assert!(e.contains("CLUSTER_SECRET"), "{e}");
    let e = err(&[
        ("CLUSTER_ADDRESS", "0.0.0.0:5090"),
        redis,
        ("CLUSTER_SECRET", SECRET),
    ]);
    assert!(e.contains("CLUSTER_ADDRESS") && e.contains("dial"), "{e}");
    let e = err(&[
        ("CLUSTER_ADDRESS", "node-a:5090"),
        redis,
        ("CLUSTER_SECRET", SECRET),
    ]);
    assert!(e.contains("CLUSTER_ADDRESS"), "{e}");
    let e = err(&[
        ("CLUSTER_ADDRESS", "10.0.0.2:5090"),
        redis,
        ("CLUSTER_SECRET", "short"),
    ]);
    assert!(e.contains("CLUSTER_SECRET") && !e.contains("short"), "{e}");
    let e = err(&[
        ("CLUSTER_ADDRESS", "10.0.0.2:5090"),
        redis,
        ("CLUSTER_SECRET", SECRET),
        ("CLUSTER_SECRET_PREVIOUS", "zz"),
    ]);
    assert!(e.contains("CLUSTER_SECRET_PREVIOUS"), "{e}");

    // From a file (a systemd credential), with the previous key of a rotation.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cluster.key");
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let c = Config::load(
        None,
        env(&[
            ("CLUSTER_ADDRESS", "10.0.0.2:5090"),
            redis,
            ("CLUSTER_SECRET_FILE", file.to_str().unwrap()),
            ("CLUSTER_SECRET_PREVIOUS", &SECRET.replace('c', "d")),
        ]),
    )
    .unwrap();
    let cluster = c.cluster.expect("cluster settings");
    assert_eq!(cluster.address.to_string(), "10.0.0.2:5090");
    assert!(!cluster.tls, "plain TCP unless CLUSTER_TLS");
    assert_eq!(cluster.secret[0], 0xc1);
    assert_eq!(cluster.previous.map(|p| p[0]), Some(0xd1));
    assert!(
        !format!("{cluster:?}").contains("193"),
        "no secret in Debug"
    );
    let e = err(&[
        ("CLUSTER_ADDRESS", "10.0.0.2:5090"),
        redis,
        ("CLUSTER_SECRET", SECRET),
        ("CLUSTER_SECRET_FILE", file.to_str().unwrap()),
    ]);
    assert!(e.contains("CLUSTER_SECRET_FILE"), "{e}");
}

#[test]
fn push_and_blf_settings_name_the_key() {
    let e = Config::load(None, env(&[("PUSH_APNS_KEY_FILE", "/nonexistent/key.p8")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("PUSH_APNS_KEY_FILE"), "{e}");
    let e = Config::load(None, env(&[("PUSH_APNS_KEY_ID", "ABC")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("PUSH_APNS_KEY_ID"), "{e}");
    let e = Config::load(None, env(&[("PUSH_WAIT", "600")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("PUSH_WAIT"), "{e}");
    assert!(!Config::load(None, env(&[])).unwrap().push.enabled());
    let e = Config::load(None, env(&[("BLF_GROUPS", "ward7")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("BLF_GROUPS"), "{e}");
    let c = Config::load(
        None,
        env(&[
            ("SIP_DOMAIN", "ward.test"),
            ("BLF_GROUPS", "ward7=2001, 2003;icu=3001@icu.test"),
        ]),
    )
    .unwrap();
    assert!(c.watch_policy.may_watch("2003@ward.test", "2001@ward.test"));
    assert_eq!(c.pickup_prefix, "**");
    let e = Config::load(None, env(&[("PICKUP_PREFIX", "*8")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("PICKUP_PREFIX"), "{e}");
    assert!(!c.watch_policy.may_watch("2002@ward.test", "2001@ward.test"));
    assert!(c.blf_quirks.is_empty());
    let c = Config::load(
        None,
        env(&[(
            "BLF_QUIRKS",
            "Grandstream GXP=single-dialog, idle-terminated; SPA=idle-terminated",
        )]),
    )
    .unwrap();
    assert_eq!(c.blf_quirks.len(), 2);
    assert_eq!(c.blf_quirks[0].0, "grandstream gxp");
    assert!(c.blf_quirks[0].1.single_dialog && c.blf_quirks[0].1.idle_as_terminated);
    assert!(!c.blf_quirks[1].1.single_dialog && c.blf_quirks[1].1.idle_as_terminated);
    for bad in ["Yealink", "=single-dialog", "Yealink=blink"] {
        let e = Config::load(None, env(&[("BLF_QUIRKS", bad)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("BLF_QUIRKS"), "{bad}: {e}");
    }
}

#[test]
fn provisioning_keys_are_checked_and_named() {
    let c = Config::load(
        None,
        env(&[
            (
                "PROVISION_LISTEN",
                "https://0.0.0.0:8443,http://10.0.0.1:8080",
            ),
            ("SIP_DOMAIN", "sip.clinic.example"),
            ("PROVISION_UTC_OFFSET", "+5:30"),
        ]),
    )
    .unwrap();
    assert_eq!(c.provision.listen.len(), 2);
    assert!(c.provision.listen[0].0 && !c.provision.listen[1].0);
    assert_eq!(
        c.provision.public_url.as_deref(),
        Some("https://sip.clinic.example:8443")
    );
    assert_eq!(c.provision.utc_offset_minutes, 330);
    assert_eq!(c.provision.grace, Duration::from_secs(86_400));
    assert_eq!(
        c.provision.key_file,
        PathBuf::from("./data/provisioning.key")
    );
    for (k, v) in [
        ("PROVISION_LISTEN", "ftp://x"),
        ("PROVISION_UTC_OFFSET", "CET"),
        ("PROVISION_NTP_SERVER", "bad host"),
        ("PROVISION_PUBLIC_URL", "sip.example"),
        ("PROVISION_PNP", "0.0.0.0"),
        ("PROVISION_RESYNC", "60"),
    ] {
        let e = Config::load(None, env(&[(k, v)])).unwrap_err().to_string();
        assert!(e.contains(k), "{k}={v}: {e}");
    }
    // PnP on the default SIP listeners (udp on 0.0.0.0:5060): the multicast would reach the
    // SIP socket too.
    let e = Config::load(
        None,
        env(&[
            ("PROVISION_LISTEN", "https://0.0.0.0:8443"),
            ("PROVISION_PNP", "10.0.0.1"),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("PROVISION_PNP") && e.contains("SIP_LISTEN"),
        "{e}"
    );
    let e = Config::load(None, env(&[("PROVISION_PNP", "10.0.0.1:5070")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs PROVISION_LISTEN"), "{e}");
    let c = Config::load(
        None,
        env(&[
            ("PROVISION_LISTEN", "https://0.0.0.0:8443"),
            ("PROVISION_PNP", "10.0.0.1"),
            ("SIP_LISTEN", "udp:10.0.0.1:5060,tcp:0.0.0.0:5060"),
        ]),
    )
    .unwrap();
    assert_eq!(c.provision.pnp, Some(("10.0.0.1".parse().unwrap(), 5060)));
}
