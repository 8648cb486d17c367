//! Auto-provisioning of desk phones (issue 21): devices bound to users through the CLI and the
//! API; curl fetches each vendor's files as the phones do (their file names, User-Agents and
//! HTTP digest, over HTTPS checked against the server's certificate, or plain HTTP for the
//! SPA); the files are parsed in each vendor's syntax and sipp registers with the credentials
//! read from them. Unknown MACs get 404, enumeration from one address is throttled while a
//! busy honest site is not, and a rotation reaches the phone with the old credentials
//! working for the grace period only.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::api::http;
use crate::nat::sh;
use crate::support::*;

const YEALINK_UA: &str = "Yealink SIP-T46S 66.86.0.15 00:15:65:aa:bb:cc";
const SPA_UA: &str = "Cisco/SPA303-7.6.2c (00562B0C4F2A)(CCQ1234567)";
const GS_UA: &str = "Grandstream Model HW GXP2170 SW 1.0.11.6 DevId 000b82aabbcc";

/// A provisioning server started with `env` on top of listeners on port2 (https) and port3
/// (http).
fn start(domain: &str, env: &[(&str, &str)]) -> Server {
    require("curl", "curl");
    require("sipp", "sip-tester");
    let mut all = vec![
        (
            "PROVISION_LISTEN",
            "https://127.0.0.1:{port2},http://127.0.0.1:{port3}",
        ),
        ("PROVISION_UTC_OFFSET", "+1"),
        ("PROVISION_NTP_SERVER", "ntp.clinic.example"),
    ];
    all.extend_from_slice(env);
    Server::start_with(domain, &all)
}

/// A fetch as a phone does it: status and body.
struct Fetch<'a> {
    server: &'a Server,
    https: bool,
    user_agent: &'a str,
    credentials: Option<(&'a str, &'a str)>,
    from: &'a str,
}

impl Fetch<'_> {
    fn get(&self, file: &str) -> (u16, String) {
        let (scheme, port) = if self.https {
            ("https", self.server.port2)
        } else {
            ("http", self.server.port3)
        };
        let host = &self.server.domain;
        let mut c = Command::new("curl");
        c.args(["-sS", "--max-time", "10", "-A", self.user_agent])
            .args(["--interface", self.from])
            .args(["-w", "\n%{http_code}"]);
        if self.https {
            // The server's own (generated) certificate for its domain, checked as a phone
            // configured to trust it does.
            let cert = self.server.data_dir().join("tls-selfsigned.crt");
            c.args(["--cacert", cert.to_str().unwrap()])
                .args(["--resolve", &format!("{host}:{port}:127.0.0.1")]);
        }
        if let Some((u, p)) = self.credentials {
            c.args(["--digest", "-u", &format!("{u}:{p}")]);
        }
        let url = if self.https {
            format!("{scheme}://{host}:{port}/{file}")
        } else {
            format!("{scheme}://127.0.0.1:{port}/{file}")
        };
        let out = c
            .arg(url)
            .stderr(Stdio::piped())
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        assert!(
            out.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

/// Yealink's `key = value` lines.
fn yealink_values(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not `key = value`: {l}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

/// The text of the first element named `name` of an XML document.
fn xml_value(text: &str, name: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    doc.descendants()
        .find(|n| n.has_tag_name(name))
        .and_then(|n| n.text())
        .map(str::to_string)
}

/// sipp registers `user` with digest user name `auth` and `password` once; true on 200.
fn sipp_registers(server: &Server, user: &str, auth: &str, password: &str) -> bool {
    let tmp = tempfile::tempdir().unwrap();
    let inf = tmp.path().join("users.csv");
    std::fs::write(
        &inf,
        format!("SEQUENTIAL\n{user};[authentication username={auth} password={password}]\n"),
    )
    .unwrap();
    let out = Command::new("sipp")
        .arg(server.sip_addr().to_string())
        .args([
            "-sf",
            interop_dir()
                .join("sipp/register-auth.xml")
                .to_str()
                .unwrap(),
        ])
        .args(["-inf", inf.to_str().unwrap()])
        .args([
            "-key",
            "domain",
            &server.domain,
            "-auth_uri",
            &server.domain,
        ])
        .args([
            "-i",
            "127.0.0.1",
            "-p",
            &free_port().to_string(),
            "-t",
            "u1",
        ])
        .args(["-m", "1", "-nostdin", "-timeout", "15s", "-timeout_error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("run sipp");
    out.status.success()
}

pub(crate) fn api_key(server: &Server) -> String {
    let out = server.cli_ok(&["apikey", "create", "ops"]);
    out.lines().last().unwrap().trim().to_string()
}

fn add_via_api(server: &Server, key: &str, body: Value) -> Value {
    let (code, _, v) = http(
        server,
        "POST",
        "/api/admin/devices",
        Some(key),
        Some(&body.to_string()),
    );
    assert_eq!(code, 201, "{v}");
    v
}

/// The provisioning password a `device add` printed.
fn cli_password(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("provisioning password (shown only now): "))
        .unwrap_or_else(|| panic!("no password in: {out}"))
        .trim()
        .to_string()
}

#[test]
fn each_vendors_phone_fetches_its_file_and_registers_with_what_it_read() {
    let server = start("prov.test", &[]);
    for u in ["2001", "2002", "2003"] {
        server.add_user(u, &format!("user-pw-{u}"));
    }
    let key = api_key(&server);
    // A Yealink through the CLI, with two colleagues on its busy lamps.
    let out = server.cli_ok(&[
        "device",
        "add",
        "00:15:65:AA:BB:CC",
        "2001",
        "--model",
        "yealink-t46s",
        "--blf",
        "2002,2003",
        "--label",
        "Ward 3",
    ]);
    let yealink_pw = cli_password(&out);
    assert!(
        out.contains(&format!(
            "provisioning URL for the phone: https://001565aabbcc:{yealink_pw}@prov.test:{}/",
            server.port2
        )),
        "{out}"
    );
    // An SPA and a Grandstream through the API.
    let spa = add_via_api(
        &server,
        &key,
        serde_json::json!({"mac": "00562b0c4f2a", "model": "cisco-spa303", "username": "2002", "blf": ["2001"]}),
    );
    let gs = add_via_api(
        &server,
        &key,
        serde_json::json!({"mac": "00-0B-82-AA-BB-CC", "model": "grandstream-gxp2170", "username": "2003"}),
    );
    assert_eq!(gs["device"]["mac"], "000b82aabbcc", "{gs}");
    assert_eq!(gs["device"]["authName"], "2003.000b82aabbcc", "{gs}");
    let spa_pw = spa["provisioningPassword"].as_str().unwrap().to_string();
    let gs_pw = gs["provisioningPassword"].as_str().unwrap().to_string();
    // The same MAC twice: 409.
    let (code, _, v) = http(
        &server,
        "POST",
        "/api/admin/devices",
        Some(&key),
        Some(r#"{"mac":"001565aabbcc","model":"yealink-t46s","username":"2002"}"#),
    );
    assert_eq!((code, v["field"].as_str()), (409, Some("mac")), "{v}");

    // Yealink: the common file, then its own, over HTTPS.
    let yealink = Fetch {
        server: &server,
        https: true,
        user_agent: YEALINK_UA,
        credentials: Some(("001565aabbcc", &yealink_pw)),
        from: "127.0.0.1",
    };
    let (code, common) = yealink.get("y000000000000.cfg");
    assert_eq!(code, 200, "{common}");
    let common = yealink_values(&common);
    assert_eq!(common["local_time.time_zone"], "+1");
    assert_eq!(common["local_time.ntp_server1"], "ntp.clinic.example");
    let (code, own) = yealink.get("001565aabbcc.cfg");
    assert_eq!(code, 200, "{own}");
    let v = yealink_values(&own);
    assert_eq!(v["account.1.user_name"], "2001");
    assert_eq!(v["account.1.auth_name"], "2001.001565aabbcc");
    assert_eq!(v["account.1.sip_server.1.address"], "prov.test");
    assert_eq!(v["linekey.2.value"], "2002");
    assert_eq!(v["linekey.3.value"], "2003");
    assert_eq!(v["linekey.2.type"], "16");
    assert!(
        sipp_registers(
            &server,
            &v["account.1.user_name"],
            &v["account.1.auth_name"],
            &v["account.1.password"]
        ),
        "the Yealink's credentials register\n{}",
        server.log()
    );
    assert_eq!(server.bindings_of("2001").len(), 1);
    // Yealink's .boot files are not served (it falls back to the .cfg).
    assert_eq!(yealink.get("001565aabbcc.boot").0, 404);

    // SPA over plain HTTP (it trusts only Cisco's CA).
    let spa_fetch = Fetch {
        server: &server,
        https: false,
        user_agent: SPA_UA,
        credentials: Some(("00562b0c4f2a", &spa_pw)),
        from: "127.0.0.1",
    };
    let (code, profile) = spa_fetch.get("spa00562b0c4f2a.xml");
    assert_eq!(code, 200, "{profile}");
    let get = |k: &str| xml_value(&profile, k).unwrap_or_else(|| panic!("no {k}: {profile}"));
    assert_eq!(get("Auth_ID_1_"), "2002.00562b0c4f2a");
    assert_eq!(get("Proxy_1_"), format!("prov.test:{}", server.port));
    assert_eq!(
        get("Extended_Function_2_"),
        "fnc=blf+cp;sub=2001@prov.test;nme=2001"
    );
    assert!(sipp_registers(
        &server,
        &get("User_ID_1_"),
        &get("Auth_ID_1_"),
        &get("Password_1_")
    ));
    assert_eq!(server.bindings_of("2002").len(), 1);

    // Grandstream over HTTPS.
    let gs_fetch = Fetch {
        server: &server,
        https: true,
        user_agent: GS_UA,
        credentials: Some(("000b82aabbcc", &gs_pw)),
        from: "127.0.0.1",
    };
    let (code, file) = gs_fetch.get("cfg000b82aabbcc.xml");
    assert_eq!(code, 200, "{file}");
    let p = |n: &str| xml_value(&file, n).unwrap_or_else(|| panic!("no {n}: {file}"));
    assert_eq!(p("mac"), "000b82aabbcc");
    assert!(sipp_registers(&server, &p("P35"), &p("P36"), &p("P34")));
    assert_eq!(server.bindings_of("2003").len(), 1);

    // A device's credentials register its own user only.
    assert!(!sipp_registers(
        &server,
        "2002",
        &v["account.1.auth_name"],
        &v["account.1.password"]
    ));

    // Without credentials: challenged; wrong ones, another device's, or another vendor's
    // file name: not served.
    let mut anonymous = Fetch {
        credentials: None,
        ..yealink
    };
    assert_eq!(anonymous.get("001565aabbcc.cfg").0, 401);
    anonymous.credentials = Some(("001565aabbcc", "wrong"));
    assert_eq!(anonymous.get("001565aabbcc.cfg").0, 401);
    anonymous.credentials = Some(("00562b0c4f2a", &spa_pw));
    assert_eq!(anonymous.get("001565aabbcc.cfg").0, 401);
    assert_eq!(spa_fetch.get("00562b0c4f2a.cfg").0, 404);
    // An unknown MAC: 404, logged.
    let (code, _) = yealink.get("001565000001.cfg");
    assert_eq!(code, 404);
    assert!(
        server.log_shows("provisioning: unknown MAC"),
        "{}",
        server.log()
    );

    // The devices as admins see them: last fetch noted, no secret.
    let (code, _, list) = http(&server, "GET", "/api/admin/devices", Some(&key), None);
    assert_eq!(code, 200, "{list}");
    let list = list.as_array().unwrap().clone();
    assert_eq!(list.len(), 3, "{list:?}");
    assert!(
        list.iter().all(|d| d["lastFetchAt"].is_number()),
        "{list:?}"
    );
    let text = serde_json::to_string(&list).unwrap();
    assert!(!text.contains(&yealink_pw) && !text.contains(&v["account.1.password"]));

    // Every fetch is in the audit trail: device, MAC, source, outcome.
    let (_, _, page) = http(
        &server,
        "GET",
        "/api/admin/audit?action=device.config_fetched&limit=100",
        Some(&key),
        None,
    );
    let entries = page["entries"].as_array().unwrap();
    let outcome = |o: &str| entries.iter().filter(|e| e["outcome"] == o).count();
    assert_eq!(
        outcome("ok"),
        4,
        "the common file, the Yealink's, the SPA's, the Grandstream's: {page:#}"
    );
    assert_eq!(outcome("bad-credentials"), 2, "{page:#}");
    assert_eq!(outcome("unknown-mac"), 1, "{page:#}");
    let served = entries.iter().find(|e| e["outcome"] == "ok").unwrap();
    assert_eq!(served["actor"], "device:000b82aabbcc", "{served}");
    assert_eq!(served["target"], "2003@prov.test", "{served}");
    assert!(
        served["source"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{served}"
    );
    assert!(
        served["detail"].as_str().unwrap().contains("Grandstream"),
        "{served}"
    );
    let (_, _, added) = http(
        &server,
        "GET",
        "/api/admin/audit?action=device.added",
        Some(&key),
        None,
    );
    assert_eq!(added["entries"].as_array().unwrap().len(), 3, "{added}");

    // Removed: its credentials stop at once, its file is gone.
    let (code, _, _) = http(
        &server,
        "DELETE",
        "/api/admin/devices/00:0b:82:aa:bb:cc",
        Some(&key),
        None,
    );
    assert_eq!(code, 204);
    assert_eq!(gs_fetch.get("cfg000b82aabbcc.xml").0, 404);
    assert!(!sipp_registers(&server, &p("P35"), &p("P36"), &p("P34")));
}

#[test]
fn mac_enumeration_from_one_address_is_throttled_and_a_busy_site_is_not() {
    let server = start(
        "enum.test",
        &[("PROVISION_MISSES", "5"), ("PROVISION_MISS_WINDOW", "60")],
    );
    server.add_user("2001", "pw-2001");
    let out = server.cli_ok(&[
        "device",
        "add",
        "001565aabbcc",
        "2001",
        "--model",
        "yealink-t46s",
    ]);
    let pw = cli_password(&out);
    let scanner = |credentials| Fetch {
        server: &server,
        https: false,
        user_agent: "curl",
        credentials,
        from: "127.0.0.2",
    };
    // Five misses are allowed, the sixth starts the throttle.
    for i in 0..6 {
        assert_eq!(scanner(None).get(&format!("0015650000{i:02}.cfg")).0, 404);
    }
    // Throttled: unknown and known MACs alike are only challenged, so nothing tells which
    // exist; guessed credentials get 429, for either...
    assert_eq!(scanner(None).get("001565000099.cfg").0, 401);
    assert_eq!(scanner(None).get("001565aabbcc.cfg").0, 401);
    assert_eq!(
        scanner(Some(("001565aabbcc", "guess")))
            .get("001565aabbcc.cfg")
            .0,
        429
    );
    assert_eq!(
        scanner(Some(("001565000099", "guess")))
            .get("001565000099.cfg")
            .0,
        429
    );
    assert_eq!(scanner(None).get("favicon.ico").0, 429);
    // ...but a phone with its credentials behind the same address is still served.
    assert_eq!(
        scanner(Some(("001565aabbcc", &pw)))
            .get("001565aabbcc.cfg")
            .0,
        200
    );
    assert!(server.log_shows("SECURITY provisioning_throttled"));
    // Other addresses are not affected.
    let other = Fetch {
        from: "127.0.0.1",
        ..scanner(None)
    };
    assert_eq!(other.get("001565aabbcc.cfg").0, 401);
}

#[test]
fn a_busy_hospital_behind_one_address_is_never_throttled() {
    // 40 phones booting at once behind the hospital's address (each: the common file and
    // its own, challenged first, and its .boot files), and 10 removed phones still asking.
    // (The admin API's own rate limit is raised: the test adds 40 devices at once.)
    let server = start(
        "site.test",
        &[("API_RATE_LIMIT", "1000"), ("API_RATE_BURST", "1000")],
    );
    server.add_user("2001", "pw-2001");
    let key = api_key(&server);
    let mut phones = Vec::new();
    for i in 0..40 {
        let mac = format!("0015650100{i:02}");
        let v = add_via_api(
            &server,
            &key,
            serde_json::json!({"mac": mac, "model": "yealink-t46s", "username": "2001"}),
        );
        phones.push((mac, v["provisioningPassword"].as_str().unwrap().to_string()));
    }
    let threads: Vec<_> = phones
        .chunks(10)
        .map(|chunk| {
            let chunk = chunk.to_vec();
            let server_ports = (server.port2, server.port3);
            std::thread::spawn(move || {
                let mut codes = Vec::new();
                for (mac, pw) in chunk {
                    for file in [
                        "y000000000000.boot".to_string(),
                        format!("{mac}.boot"),
                        "y000000000000.cfg".to_string(),
                        format!("{mac}.cfg"),
                    ] {
                        let out = Command::new("curl")
                            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                            .args(["--interface", "127.0.0.3", "-A", YEALINK_UA])
                            .args(["--digest", "-u", &format!("{mac}:{pw}")])
                            .arg(format!("http://127.0.0.1:{}/{file}", server_ports.1))
                            .output()
                            .unwrap();
                        codes.push((file, String::from_utf8_lossy(&out.stdout).to_string()));
                    }
                }
                codes
            })
        })
        .collect();
    let removed = Fetch {
        server: &server,
        https: false,
        user_agent: YEALINK_UA,
        credentials: None,
        from: "127.0.0.3",
    };
    for i in 0..10 {
        assert_eq!(removed.get(&format!("0015650200{i:02}.cfg")).0, 404);
    }
    for t in threads {
        for (file, code) in t.join().unwrap() {
            let want = if file.ends_with(".boot") {
                "404"
            } else {
                "200"
            };
            assert_eq!(code, want, "{file}");
        }
    }
    assert!(!server.log().contains("provisioning_throttled"));
}

#[test]
fn a_rotation_reaches_the_phone_and_the_old_credentials_work_for_the_grace_only() {
    let server = start("rotate.test", &[("DEVICE_ROTATION_GRACE", "4")]);
    server.add_user("2001", "pw-2001");
    let key = api_key(&server);
    let added = add_via_api(
        &server,
        &key,
        serde_json::json!({"mac": "001565aabbcc", "model": "yealink-t54w", "username": "2001"}),
    );
    let pw = added["provisioningPassword"].as_str().unwrap().to_string();
    let phone = Fetch {
        server: &server,
        https: true,
        user_agent: YEALINK_UA,
        credentials: Some(("001565aabbcc", &pw)),
        from: "127.0.0.1",
    };
    let first = yealink_values(&phone.get("001565aabbcc.cfg").1);
    let (user, auth, old) = (
        first["account.1.user_name"].clone(),
        first["account.1.auth_name"].clone(),
        first["account.1.password"].clone(),
    );
    assert!(sipp_registers(&server, &user, &auth, &old));

    let (code, _, rotated) = http(
        &server,
        "POST",
        "/api/admin/devices/001565aabbcc/rotate",
        Some(&key),
        None,
    );
    assert_eq!(code, 200, "{rotated}");
    assert_eq!(rotated["device"]["generation"], 2, "{rotated}");
    assert!(
        rotated["device"]["previousValidUntil"].is_number(),
        "{rotated}"
    );
    assert!(
        rotated.get("userPassword").is_none(),
        "its own credentials: the user's password is untouched: {rotated}"
    );
    // The next fetch carries new credentials; both work during the grace.
    let next = yealink_values(&phone.get("001565aabbcc.cfg").1);
    let new = next["account.1.password"].clone();
    assert_ne!(new, old);
    assert_eq!(next["account.1.auth_name"], auth);
    assert!(
        sipp_registers(&server, &user, &auth, &new),
        "{}",
        server.log()
    );
    assert!(
        sipp_registers(&server, &user, &auth, &old),
        "within the grace"
    );
    // After it, the old ones are refused (a failed authentication), the new ones work.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !sipp_registers(&server, &user, &auth, &old),
        "after the grace"
    );
    assert!(server.log_shows("SECURITY auth_failed src_ip=127.0.0.1"));
    assert!(
        server.log().contains(&format!("user={auth}")),
        "{}",
        server.log()
    );
    assert!(sipp_registers(&server, &user, &auth, &new));
    // A new provisioning password: the old one stops at once.
    let (code, _, reset) = http(
        &server,
        "POST",
        "/api/admin/devices/001565aabbcc/provisioning-password",
        Some(&key),
        None,
    );
    assert_eq!(code, 200, "{reset}");
    assert_eq!(phone.get("001565aabbcc.cfg").0, 401);
    let pw2 = reset["provisioningPassword"].as_str().unwrap();
    let again = Fetch {
        credentials: Some(("001565aabbcc", pw2)),
        ..phone
    };
    assert_eq!(again.get("001565aabbcc.cfg").0, 200);
}

/// A voice network made by the test: this host (10.214.N.1) and a phone's namespace
/// (10.214.N.2) on a veth pair, multicast routed out of the phone's side.
struct VoiceNet {
    n: u32,
}

impl VoiceNet {
    fn new() -> Self {
        require("ip", "iproute2");
        let n = std::process::id() % 200 + 20;
        let net = Self { n };
        net.cleanup();
        let ns = net.ns();
        sh(&format!(
            "ip netns add {ns} && ip link add cfpn{n} type veth peer name cfq0 netns {ns} && \
             ip addr add 10.214.{n}.1/24 dev cfpn{n} && ip link set cfpn{n} up && \
             ip netns exec {ns} sh -c 'ip link set lo up && ip addr add 10.214.{n}.2/24 dev cfq0 && \
             ip link set cfq0 up && ip route add 224.0.0.0/4 dev cfq0'"
        ));
        net
    }

    fn ns(&self) -> String {
        format!("cfpnp{}", self.n)
    }

    fn host(&self) -> String {
        format!("10.214.{}.1", self.n)
    }

    fn phone(&self) -> String {
        format!("10.214.{}.2", self.n)
    }

    fn cleanup(&self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ip netns del {} 2>/dev/null; ip link del cfpn{} 2>/dev/null",
                self.ns(),
                self.n
            ))
            .output();
    }

    /// The captured Yealink PnP SUBSCRIBE for `mac` from the phone's namespace: what it got.
    fn pnp(&self, port: u16, mac: &str, wait: &str) -> Value {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(), "python3"])
            .arg(interop_dir().join("pnp/yealink-pnp.py"))
            .args([&self.phone(), &port.to_string(), mac, wait])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for VoiceNet {
    fn drop(&mut self) {
        self.cleanup();
    }
}

#[test]
fn a_yealink_sip_pnp_subscribe_on_the_voice_network_gets_its_url_and_the_phone_its_file() {
    let net = VoiceNet::new();
    let pnp_port = free_port();
    let host = net.host();
    let server = start(
        "pnp.test",
        &[
            ("PROVISION_LISTEN", &format!("http://{host}:{{port3}}")),
            ("PROVISION_PUBLIC_URL", &format!("http://{host}:{{port3}}")),
            ("PROVISION_PNP", &format!("{host}:{pnp_port}")),
        ],
    );
    server.add_user("2001", "pw-2001");
    server.cli_ok(&[
        "device",
        "add",
        "001565aabbcc",
        "2001",
        "--model",
        "yealink-t46s",
    ]);

    // An unknown MAC: no answer.
    let unknown = net.pnp(pnp_port, "001565000001", "2");
    assert_eq!(unknown["subscribe_status"], Value::Null, "{unknown}");
    assert!(server.log_shows("pnp: unknown MAC"));

    // The added phone's first boot: 200, then the NOTIFY with its URL.
    let got = net.pnp(pnp_port, "001565aabbcc", "8");
    assert_eq!(got["subscribe_status"], 200, "{got}\n{}", server.log());
    assert_eq!(got["notify_type"], "application/url", "{got}");
    assert!(
        got["notify_event"]
            .as_str()
            .unwrap()
            .starts_with("ua-profile"),
        "{got}"
    );
    let url = got["url"].as_str().unwrap().to_string();
    assert!(
        url.starts_with("http://001565aabbcc:")
            && url.ends_with(&format!("@{host}:{}/", server.port3)),
        "{url}"
    );
    // The phone fetches its file from the URL it was given, from its network.
    let (user, pass) = url[7..].split_once('@').unwrap().0.split_once(':').unwrap();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.ns(),
            "curl",
            "-sS",
            "--max-time",
            "10",
        ])
        .args([
            "-A",
            YEALINK_UA,
            "--digest",
            "-u",
            &format!("{user}:{pass}"),
        ])
        .arg(format!("http://{host}:{}/001565aabbcc.cfg", server.port3))
        .output()
        .unwrap();
    let file = yealink_values(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(file["account.1.auth_name"], "2001.001565aabbcc", "{file:?}");
    assert!(server.log_shows("pnp: the phone was given its provisioning URL"));

    // Provisioned now: its next boot's SUBSCRIBE is not answered (it keeps its URL).
    let again = net.pnp(pnp_port, "001565aabbcc", "2");
    assert_eq!(again["subscribe_status"], Value::Null, "{again}");
    let key = api_key(&server);
    let (_, _, page) = http(
        &server,
        "GET",
        "/api/admin/audit?action=device.pnp_answered",
        Some(&key),
        None,
    );
    let entries = page["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{page}");
    assert_eq!(entries[0]["actor"], "device:001565aabbcc", "{page}");
}

/// openssl in `dir`: a vendor CA, and device certificates it signs for `subjects`
/// (`/O=Yealink/CN=001565aabbcc`), written as `<name>.crt`/`<name>.key`.
fn vendor_certificates(dir: &std::path::Path, devices: &[(&str, &str)]) {
    require("openssl", "openssl");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt", "-days", "2"]);
    ca.extend(["-subj", "/O=Test Phone Vendor/CN=Test Device CA"]);
    run(&ca);
    std::fs::write(
        dir.join("leaf.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    for (name, subject) in devices {
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", subject]);
        run(&req);
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ]);
    }
}

#[test]
fn a_phone_with_its_factory_certificate_fetches_its_own_file_without_digest() {
    let tmp = tempfile::tempdir().unwrap();
    vendor_certificates(
        tmp.path(),
        &[
            ("yealink", "/O=Yealink/CN=001565aabbcc"),
            ("cisco", "/O=Cisco/CN=SEP00562B0C4F2A"),
        ],
    );
    let ca = tmp.path().join("ca.crt");
    let server = start(
        "cert.test",
        &[("PROVISION_CLIENT_CA", ca.to_str().unwrap())],
    );
    server.add_user("2001", "pw-2001");
    server.cli_ok(&[
        "device",
        "add",
        "001565aabbcc",
        "2001",
        "--model",
        "yealink-t46s",
    ]);
    server.cli_ok(&[
        "device",
        "add",
        "001565aabbcd",
        "2001",
        "--model",
        "yealink-t46s",
    ]);
    let cert = server.data_dir().join("tls-selfsigned.crt");
    let fetch = |client: Option<&str>, file: &str| -> (bool, String) {
        let mut c = Command::new("curl");
        c.args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args(["-A", YEALINK_UA, "--cacert", cert.to_str().unwrap()])
        .args([
            "--resolve",
            &format!("cert.test:{}:127.0.0.1", server.port2),
        ]);
        if let Some(name) = client {
            c.arg("--cert")
                .arg(tmp.path().join(format!("{name}.crt")))
                .arg("--key")
                .arg(tmp.path().join(format!("{name}.key")));
        }
        let out = c
            .arg(format!("https://cert.test:{}/{file}", server.port2))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    // Its certificate authenticates the Yealink: its own file and the common one, no digest.
    assert_eq!(
        fetch(Some("yealink"), "001565aabbcc.cfg"),
        (true, "200".into())
    );
    assert_eq!(
        fetch(Some("yealink"), "y000000000000.cfg"),
        (true, "200".into())
    );
    // Another device's file still needs that device's credentials.
    assert_eq!(
        fetch(Some("yealink"), "001565aabbcd.cfg"),
        (true, "401".into())
    );
    // A certificate of a MAC that is no device here: its file is unknown.
    assert_eq!(
        fetch(Some("cisco"), "spa00562b0c4f2a.xml"),
        (true, "404".into())
    );
    // Without a certificate: digest, as before.
    assert_eq!(fetch(None, "001565aabbcc.cfg"), (true, "401".into()));
    // A certificate from another CA is refused in the handshake.
    let rogue = tempfile::tempdir().unwrap();
    vendor_certificates(rogue.path(), &[("yealink", "/O=Yealink/CN=001565aabbcc")]);
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "--max-time", "10"])
        .args(["--cacert", cert.to_str().unwrap()])
        .args([
            "--resolve",
            &format!("cert.test:{}:127.0.0.1", server.port2),
        ])
        .arg("--cert")
        .arg(rogue.path().join("yealink.crt"))
        .arg("--key")
        .arg(rogue.path().join("yealink.key"))
        .arg(format!(
            "https://cert.test:{}/001565aabbcc.cfg",
            server.port2
        ))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a foreign CA's certificate was accepted"
    );
}

#[test]
fn phones_sharing_their_users_credentials_register_as_the_user_and_rotate_with_them() {
    let server = start("shared.test", &[("DEVICE_ROTATION_GRACE", "4")]);
    server.add_user("2001", "pw-2001");
    let key = api_key(&server);
    // A phone of the same user with its own credentials: untouched by the sharing ones.
    let own = add_via_api(
        &server,
        &key,
        serde_json::json!({"mac": "001565aabb01", "model": "yealink-t46s", "username": "2001"}),
    );
    let shared = add_via_api(
        &server,
        &key,
        serde_json::json!({"mac": "001565aabbcc", "model": "yealink-t46s", "username": "2001", "shared": true}),
    );
    assert_eq!(shared["device"]["authName"], "2001", "{shared}");
    assert_eq!(shared["device"]["shared"], true, "{shared}");
    let user_pw = shared["userPassword"].as_str().unwrap().to_string();
    // The user's password is now the shared one (shown once); the old one stopped.
    assert!(!sipp_registers(&server, "2001", "2001", "pw-2001"));
    assert!(sipp_registers(&server, "2001", "2001", &user_pw));
    // A second sharing phone gets the same credentials, and sets no new password.
    let second = add_via_api(
        &server,
        &key,
        serde_json::json!({"mac": "001565aabbcd", "model": "grandstream-gxp2170", "username": "2001", "shared": true}),
    );
    assert!(second.get("userPassword").is_none(), "{second}");
    let file_of = |mac: &str, file: &str, pw: &str| {
        let f = Fetch {
            server: &server,
            https: true,
            user_agent: YEALINK_UA,
            credentials: Some((mac, pw)),
            from: "127.0.0.1",
        };
        let (code, body) = f.get(file);
        assert_eq!(code, 200, "{body}");
        body
    };
    let pw_of = |v: &Value| v["provisioningPassword"].as_str().unwrap().to_string();
    let yealink = yealink_values(&file_of(
        "001565aabbcc",
        "001565aabbcc.cfg",
        &pw_of(&shared),
    ));
    assert_eq!(yealink["account.1.auth_name"], "2001");
    assert_eq!(yealink["account.1.password"], user_pw);
    let gs = file_of("001565aabbcd", "cfg001565aabbcd.xml", &pw_of(&second));
    assert_eq!(xml_value(&gs, "P36").as_deref(), Some("2001"));
    assert_eq!(xml_value(&gs, "P34").as_deref(), Some(user_pw.as_str()));
    let own_file = yealink_values(&file_of("001565aabb01", "001565aabb01.cfg", &pw_of(&own)));
    let own_creds = (
        own_file["account.1.auth_name"].clone(),
        own_file["account.1.password"].clone(),
    );
    assert!(sipp_registers(&server, "2001", &own_creds.0, &own_creds.1));

    // Rotating one sharing phone rotates the user's password, for both sharing phones.
    let (code, _, rotated) = http(
        &server,
        "POST",
        "/api/admin/devices/001565aabbcc/rotate",
        Some(&key),
        None,
    );
    assert_eq!(code, 200, "{rotated}");
    let new_pw = rotated["userPassword"].as_str().unwrap().to_string();
    assert_ne!(new_pw, user_pw);
    let gs = file_of("001565aabbcd", "cfg001565aabbcd.xml", &pw_of(&second));
    assert_eq!(xml_value(&gs, "P34").as_deref(), Some(new_pw.as_str()));
    // Both work during the grace; after it only the new one; the own phone throughout.
    assert!(sipp_registers(&server, "2001", "2001", &new_pw));
    assert!(
        sipp_registers(&server, "2001", "2001", &user_pw),
        "within the grace"
    );
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !sipp_registers(&server, "2001", "2001", &user_pw),
        "after the grace"
    );
    assert!(sipp_registers(&server, "2001", "2001", &new_pw));
    assert!(sipp_registers(&server, "2001", &own_creds.0, &own_creds.1));

    // The user's password set elsewhere: the sharing phones' files would carry a password
    // that no longer works, so they are not served (503, logged) until a rotation.
    server.cli_ok(&["user", "passwd", "2001", "--password", "set-by-hand-2001"]);
    let f = Fetch {
        server: &server,
        https: true,
        user_agent: YEALINK_UA,
        credentials: Some(("001565aabbcc", &pw_of(&shared))),
        from: "127.0.0.1",
    };
    assert_eq!(f.get("001565aabbcc.cfg").0, 503);
    assert!(server.log_shows("the user's password was changed elsewhere"));
    let (code, _, again) = http(
        &server,
        "POST",
        "/api/admin/devices/001565aabbcd/rotate",
        Some(&key),
        None,
    );
    assert_eq!(code, 200, "{again}");
    let latest = again["userPassword"].as_str().unwrap().to_string();
    let v = yealink_values(&f.get("001565aabbcc.cfg").1);
    assert_eq!(v["account.1.password"], latest);
    assert!(sipp_registers(&server, "2001", "2001", &latest));
}
