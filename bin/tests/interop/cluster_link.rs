//! Several nodes as one service (CLUSTER_ADDRESS): each node on its own loopback address
//! (127.0.0.2, .3, .4), sharing a real PostgreSQL and a real Redis. A device that only one
//! node can reach (behind NAT, on a connection) is called through any node over the internal
//! link (TCP or TLS), in-dialog requests both ways, every device of an AoR rings once, only
//! the owner pings, provisioning links work on any node. Losing a node: cluster_failover.rs.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::cluster::flush;
use crate::support::*;

pub(crate) const NONCE: &str = "5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed";
pub(crate) const CLUSTER_SECRET: &str =
    "c1a5c1a5c1a5c1a5c1a5c1a5c1a5c1a5c1a5c1a5c1a5c1a5c1a5c1a5c1a5c1a5";
pub(crate) const DOMAIN: &str = "nodes.test";

/// Node `n` of a cluster at 127.0.0.`n` (internal link on its third port, WSS on its
/// second).
pub(crate) fn member(n: u8, db: &TestDb, redis: &str) -> Server {
    member_with(n, db, redis, &[])
}

/// [`member`] with more settings.
pub(crate) fn member_with(n: u8, db: &TestDb, redis: &str, extra: &[(&str, &str)]) -> Server {
    let mut env = vec![
        ("DB_URL", db.url.as_str()),
        ("REDIS_URL", redis),
        ("NONCE_SECRET", NONCE),
        ("CLUSTER_ADDRESS", "{host}:{port3}"),
        ("CLUSTER_SECRET", CLUSTER_SECRET),
        (
            "SIP_LISTEN",
            "udp:{host}:{port},tcp:{host}:{port},wss:{host}:{port2}",
        ),
    ];
    env.extend_from_slice(extra);
    Server::launch_on(Path::new(BIN), Ipv4Addr::new(127, 0, 0, n), DOMAIN, &env)
}

/// Environment pairs as `member_with` takes them.
pub(crate) fn borrowed<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A CA and, for each node address, a certificate it signed naming that IP: (CA, [(cert,
/// key)]).
pub(crate) fn cluster_pki(
    dir: &Path,
    ips: &[&str],
) -> (
    std::path::PathBuf,
    Vec<(std::path::PathBuf, std::path::PathBuf)>,
) {
    require("openssl", "openssl");
    let d = dir.display();
    crate::secure::sh_ok(&format!(
        "cd {d} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
         -days 2 -subj /CN=careflow-cluster-ca -keyout ca.key -out ca.crt 2>/dev/null"
    ));
    let leaves = ips
        .iter()
        .map(|ip| {
            std::fs::write(
                dir.join(format!("{ip}.ext")),
                format!("subjectAltName=IP:{ip},DNS:{DOMAIN}\nbasicConstraints=CA:FALSE\n"),
            )
            .unwrap();
            crate::secure::sh_ok(&format!(
                "cd {d} && openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                 -subj /CN={ip} -keyout {ip}.key -out {ip}.csr 2>/dev/null && \
                 openssl x509 -req -in {ip}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
                 -extfile {ip}.ext -out {ip}.crt 2>/dev/null"
            ));
            (dir.join(format!("{ip}.crt")), dir.join(format!("{ip}.key")))
        })
        .collect();
    (dir.join("ca.crt"), leaves)
}

/// Waits until every node sees all `nodes.len()` members alive.
pub(crate) fn joined(nodes: &[&Server]) {
    let want = format!("cluster membership changed nodes={}", nodes.len());
    for n in nodes {
        assert!(n.log_shows(&want), "no `{want}`:\n{}", n.log());
    }
}

/// A REGISTER from a device behind NAT: its Contact names a private address, so only the
/// node it registered through can reach it.
pub(crate) fn register_behind_nat(ua: &Ua, user: &str, password: &str, call_id: &str) {
    let private = |m: String| {
        m.replace(
            &format!("Contact: <sip:{user}@127.0.0.1:{}>", ua.port()),
            &format!("Contact: <sip:{user}@192.168.7.{}:5060>", ua.port() % 250),
        )
    };
    let r = ua.register_rewritten(user, password, DOMAIN, call_id, private);
    assert_eq!(status(&r), 200, "{r}");
}

/// INVITEs a device receives within `window`, by Via branch (a retransmission is the same).
pub(crate) fn invites_within(dev: &Ua, window: Duration) -> Vec<String> {
    let deadline = Instant::now() + window;
    let mut got: Vec<String> = Vec::new();
    dev.sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    while Instant::now() < deadline {
        if let Some(m) = dev.recv()
            && m.starts_with("INVITE ")
        {
            let branch = header(&m, "Via").unwrap_or_default().to_string();
            if !got
                .iter()
                .any(|g| header(g, "Via").unwrap_or_default() == branch)
            {
                got.push(m);
            }
        }
    }
    dev.sock
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    got
}

/// The owner route stored in `user`'s first binding (from Redis, as any node reads it).
pub(crate) fn owner_route(redis_db: u32, user: &str) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-n", &redis_db.to_string(), "GET"])
        .arg(format!("careflow:loc:{user}@{DOMAIN}"))
        .output()
        .expect("redis-cli");
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("no bindings of {user}"));
    json[0]["owner"]
        .as_str()
        .unwrap_or_else(|| panic!("no owner route in {json}"))
        .to_string()
}

#[test]
fn an_aor_with_devices_on_three_nodes_rings_each_once_and_cancel_reaches_all() {
    let db = TestDb::postgres();
    flush(13);
    let redis = "redis://127.0.0.1:6379/13";
    let (a, b, c) = (
        member(2, &db, redis),
        member(3, &db, redis),
        member(4, &db, redis),
    );
    joined(&[&a, &b, &c]);
    assert_eq!(b.metric("careflow_sip_cluster_nodes"), 3);
    a.add_user("alice", "pw-alice-n");
    a.add_user("bob", "pw-bob-n");
    // `register_behind_nat` names the device 192.168.7.(port % 250): three devices need three
    // different ones, or two share a Contact and the later registration replaces the earlier
    // binding (CI failed once so: two device ports were equal modulo 250).
    let mut devices: Vec<Ua> = Vec::new();
    for (i, node) in [&a, &b, &c].iter().enumerate() {
        let dev = loop {
            let dev = Ua::new(node.sip_addr());
            if !devices.iter().any(|d| d.port() % 250 == dev.port() % 250) {
                break dev;
            }
        };
        register_behind_nat(&dev, "bob", "pw-bob-n", &format!("bob-dev-{i}"));
        devices.push(dev);
    }
    // Every node lists every device, each with the node holding it.
    let listed = a.bindings_of("bob");
    assert_eq!(listed.len(), 3, "{listed:?}");
    for node in [&a, &b, &c] {
        let at = format!("{}:{}", node.host, node.port3);
        assert!(
            listed.iter().any(|l| l.ends_with(&at)),
            "{at} in {listed:?}"
        );
    }

    let alice = Ua::new(a.sip_addr());
    let invite = invite_authorized(&alice, DOMAIN, ("alice", "pw-alice-n"), "bob", "three-ring");
    let mut received = Vec::new();
    for (i, dev) in devices.iter().enumerate() {
        let got = invites_within(dev, Duration::from_millis(1500));
        assert_eq!(
            got.len(),
            1,
            "device on node {i} rang {} times: {got:?}",
            got.len()
        );
        let inv = got.into_iter().next().unwrap();
        // Nothing of the cluster's inner routing leaves it.
        assert!(header(&inv, "Route").is_none(), "{inv}");
        assert!(inv.starts_with("INVITE sip:bob@192.168.7."), "{inv}");
        answer(dev, &inv, 180);
        received.push(inv);
    }
    // The caller cancels: every device gets the CANCEL.
    let branch = header(&invite, "Via").unwrap().to_string();
    alice.send(&format!(
        "CANCEL sip:bob@{DOMAIN} SIP/2.0\r\nVia: {branch}\r\nMax-Forwards: 70\r\n\
         From: <sip:alice@{DOMAIN}>;tag=f-three-ring\r\nTo: <sip:bob@{DOMAIN}>\r\n\
         Call-ID: three-ring\r\nCSeq: 2 CANCEL\r\nContent-Length: 0\r\n\r\n"
    ));
    for (i, (dev, inv)) in devices.iter().zip(&received).enumerate() {
        let cancel = expect(dev, "CANCEL ");
        assert_eq!(
            header(&cancel, "Via"),
            header(inv, "Via"),
            "node {i}: the CANCEL matches its INVITE"
        );
        answer(dev, &cancel, 200);
        answer(dev, inv, 487);
    }
    let fin = (0..20)
        .filter_map(|_| alice.recv())
        .find(|m| m.contains("INVITE\r\n") && status(m) >= 300)
        .unwrap_or_else(|| panic!("no final answer to the cancelled call:\n{}", a.log()));
    assert_eq!(status(&fin), 487, "{fin}");
}

#[test]
fn a_web_phone_on_one_node_and_udp_phones_on_another_call_each_other() {
    let js = crate::websocket::js_dir();
    let db = TestDb::postgres();
    flush(10);
    let redis = "redis://127.0.0.1:6379/10";
    let (a, b) = (member(2, &db, redis), member(3, &db, redis));
    joined(&[&a, &b]);
    // JsSIP over WSS on B; the calling phone and the desk phone (sipp, UDP) on A.
    crate::websocket::web_phone_calls(&b, &a, |url| {
        let mut node = std::process::Command::new("node");
        node.current_dir(&js).arg("jssip-phone.js").args([
            url,
            &format!("sip:web1@{DOMAIN}"),
            "pw-web1-browser",
            &format!("sip:desk@{DOMAIN}"),
        ]);
        node
    });
}

#[test]
fn the_internal_link_can_be_tls_with_certificates_naming_the_nodes() {
    let db = TestDb::postgres();
    flush(4);
    let redis = "redis://127.0.0.1:6379/4";
    let tmp = tempfile::tempdir().unwrap();
    let (ca, certs) = cluster_pki(tmp.path(), &["127.0.0.2", "127.0.0.3"]);
    let tls = |i: usize| {
        vec![
            ("CLUSTER_TLS", "true".to_string()),
            ("TLS_CERT", certs[i].0.display().to_string()),
            ("TLS_KEY", certs[i].1.display().to_string()),
            ("TLS_CA_FILE", ca.display().to_string()),
        ]
    };
    let (ea, eb) = (tls(0), tls(1));
    let a = member_with(2, &db, redis, &borrowed(&ea));
    let b = member_with(3, &db, redis, &borrowed(&eb));
    joined(&[&a, &b]);
    assert!(
        b.log()
            .contains(&format!("transport=tls addr=127.0.0.3:{}", b.port3)),
        "{}",
        b.log()
    );
    a.add_user("alice", "pw-alice-t");
    a.add_user("bob", "pw-bob-t");
    let bob = Ua::new(b.sip_addr());
    register_behind_nat(&bob, "bob", "pw-bob-t", "bob-t");
    let route = owner_route(4, "bob");
    assert!(route.contains(";transport=tls;lr"), "{route}");

    // A calls bob on B over the TLS link (A checks B's certificate against the CA).
    let alice = Ua::new(a.sip_addr());
    invite_authorized(&alice, DOMAIN, ("alice", "pw-alice-t"), "bob", "over-tls");
    let inv = expect(&bob, "INVITE ");
    assert!(inv.contains("Via: SIP/2.0/UDP 127.0.0.3"), "{inv}");
    assert!(
        inv.contains("SIP/2.0/TLS 127.0.0.2"),
        "A's Via names its TLS link: {inv}"
    );
    answer(&bob, &inv, 486);
    let r = (0..20)
        .filter_map(|_| alice.recv())
        .find(|m| m.contains("Call-ID: over-tls") && status(m) >= 300)
        .unwrap_or_else(|| panic!("no answer over the TLS link:\n{}\n{}", a.log(), b.log()));
    assert_eq!(status(&r), 486, "{r}");
}

/// An in-dialog request from `ua` (whose Via it names) to `target` along `routes` (Route
/// header lines, in order), with the dialog's From/To as the sender writes them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn in_dialog(
    ua: &Ua,
    via_host: &str,
    method: &str,
    target: &str,
    routes: &str,
    (from, to): (&str, &str),
    call_id: &str,
    cseq: u32,
) -> String {
    let port = ua.port();
    format!(
        "{method} {target} SIP/2.0\r\nVia: SIP/2.0/UDP {via_host}:{port};branch=z9hG4bK{method}{cseq}{call_id};rport\r\n\
         Max-Forwards: 70\r\nFrom: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n\
         {routes}Content-Length: 0\r\n\r\n"
    )
}

/// Route header lines from a message's Record-Route, in order or reversed.
pub(crate) fn route_set(msg: &str, reversed: bool) -> String {
    let mut rr: Vec<&str> = msg
        .lines()
        .filter_map(|l| l.strip_prefix("Record-Route: "))
        .collect();
    if reversed {
        rr.reverse();
    }
    rr.iter().map(|r| format!("Route: {r}\r\n")).collect()
}

#[test]
fn re_invites_go_both_ways_over_the_link_and_a_cancel_crossing_the_answer_leaves_one_call() {
    let db = TestDb::postgres();
    flush(2);
    let redis = "redis://127.0.0.1:6379/2";
    let (a, b) = (member(2, &db, redis), member(3, &db, redis));
    joined(&[&a, &b]);
    a.add_user("alice", "pw-alice-r");
    a.add_user("bob", "pw-bob-r");
    let bob = Ua::new(b.sip_addr());
    register_behind_nat(&bob, "bob", "pw-bob-r", "bob-r");
    let alice = Ua::new(a.sip_addr());

    // The call: alice on A, bob on B.
    invite_authorized(&alice, DOMAIN, ("alice", "pw-alice-r"), "bob", "reinvite");
    let inv = expect(&bob, "INVITE ");
    answer(&bob, &inv, 200);
    let ok = expect(&alice, "SIP/2.0 200");
    let bob_contact = header(&ok, "Contact")
        .unwrap()
        .trim_matches(|c| c == '<' || c == '>')
        .to_string();
    let alice_contact = format!("sip:alice@127.0.0.1:{}", alice.port());
    let (alice_from, to_bob) = (
        header(&inv, "From").unwrap().to_string(),
        header(&ok, "To").unwrap().to_string(),
    );
    let alice_routes = route_set(&ok, true);
    let bob_routes = route_set(&inv, false);
    let ack = in_dialog(
        &alice,
        "127.0.0.1",
        "ACK",
        &bob_contact,
        &alice_routes,
        (&alice_from, &to_bob),
        "reinvite",
        2,
    );
    alice.send(&ack);
    expect(&bob, "ACK ");

    // alice re-INVITEs (hold, say): through A and B to bob, 200 back, ACK on.
    alice.send(&in_dialog(
        &alice,
        "127.0.0.1",
        "INVITE",
        &bob_contact,
        &alice_routes,
        (&alice_from, &to_bob),
        "reinvite",
        3,
    ));
    let re = expect(&bob, "INVITE ");
    assert!(re.contains("CSeq: 3 INVITE"), "{re}");
    answer(&bob, &re, 200);
    assert!(expect(&alice, "SIP/2.0 200").contains("CSeq: 3 INVITE"));
    alice.send(&in_dialog(
        &alice,
        "127.0.0.1",
        "ACK",
        &bob_contact,
        &alice_routes,
        (&alice_from, &to_bob),
        "reinvite",
        3,
    ));
    assert!(expect(&bob, "ACK ").contains("CSeq: 3 ACK"));

    // bob re-INVITEs the other way: B, then A, then alice.
    bob.send(&in_dialog(
        &bob,
        "192.168.7.1",
        "INVITE",
        &alice_contact,
        &bob_routes,
        (&to_bob, &alice_from),
        "reinvite",
        1,
    ));
    let back = expect(&alice, "INVITE ");
    assert!(back.contains("CSeq: 1 INVITE"), "{back}");
    answer(&alice, &back, 200);
    assert!(expect(&bob, "SIP/2.0 200").contains("CSeq: 1 INVITE"));

    // alice hangs up.
    alice.send(&in_dialog(
        &alice,
        "127.0.0.1",
        "BYE",
        &bob_contact,
        &alice_routes,
        (&alice_from, &to_bob),
        "reinvite",
        4,
    ));
    let bye = expect(&bob, "BYE ");
    answer(&bob, &bye, 200);
    assert!(expect(&alice, "SIP/2.0 200").contains("CSeq: 4 BYE"));

    // A CANCEL crossing the 200: alice cancels as bob answers. One outcome: the call is up.
    let invite = invite_authorized(&alice, DOMAIN, ("alice", "pw-alice-r"), "bob", "crossing");
    let inv = expect(&bob, "INVITE ");
    let via = header(&invite, "Via").unwrap().to_string();
    answer(&bob, &inv, 200);
    alice.send(&format!(
        "CANCEL sip:bob@{DOMAIN} SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\n\
         From: <sip:alice@{DOMAIN}>;tag=f-crossing\r\nTo: <sip:bob@{DOMAIN}>\r\n\
         Call-ID: crossing\r\nCSeq: 2 CANCEL\r\nContent-Length: 0\r\n\r\n"
    ));
    let mut finals = Vec::new();
    while let Some(m) = alice.recv() {
        if m.contains("Call-ID: crossing") && m.contains("INVITE\r\n") && status(&m) >= 200 {
            finals.push(status(&m));
        }
    }
    assert_eq!(finals.first(), Some(&200), "{finals:?}");
    assert!(
        !finals.contains(&487),
        "the answered call was not also cancelled: {finals:?}"
    );
    // A CANCEL that reached bob after his 200 is answered and changes nothing.
    bob.sock
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while let Some(m) = bob.recv() {
        if m.starts_with("CANCEL ") {
            answer(&bob, &m, 200);
        }
    }
}

#[test]
fn a_provisioning_link_made_through_one_node_is_fetched_once_through_another() {
    let db = TestDb::postgres();
    flush(1);
    let redis = "redis://127.0.0.1:6379/1";
    let secret = "cluster-link-jwt-secret-0123456789abcdef";
    let env = [("AUTH_JWT_SECRET", secret)];
    let (a, b) = (
        member_with(2, &db, redis, &env),
        member_with(3, &db, redis, &env),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": "clinician-7", "exp": now + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let (code, _, creds) = crate::api::http(&a, "POST", "/api/sip/register", Some(&token), None);
    assert_eq!(code, 201, "{creds}");
    // Clients are told about the public listeners only, never the internal link.
    let listed = creds["sipConfig"].to_string();
    assert!(!listed.contains(&a.port3.to_string()), "{listed}");
    let body = format!(r#"{{"baseUrl":"http://127.0.0.1:{}"}}"#, a.http);
    let (code, _, link) = crate::api::http(
        &a,
        "POST",
        "/api/sip/provisioning",
        Some(&token),
        Some(&body),
    );
    assert_eq!(code, 200, "{link}");
    let url = link["url"].as_str().unwrap();
    let path = &url[url.find("/provision/").unwrap()..];
    // The phone's request lands on B (a load balancer in front of the nodes).
    let (code, head, xml) = http_get_at(b.http, path).expect("an answer from B");
    assert!(
        code == 200 && head.contains("application/xml"),
        "{code} {head}"
    );
    assert!(xml.contains("<entry name=\"ha1\">"), "{xml}");
    let (again, _, _) = http_get_at(a.http, path).expect("an answer from A");
    assert_eq!(again, 404, "a provisioning link works once, on any node");
}

#[test]
fn only_the_node_holding_a_flow_sends_its_keep_alives() {
    let db = TestDb::postgres();
    flush(9);
    let redis = "redis://127.0.0.1:6379/9";
    let env = [("NAT_KEEPALIVE_INTERVAL", "1")];
    let (a, b) = (
        member_with(2, &db, redis, &env),
        member_with(3, &db, redis, &env),
    );
    joined(&[&a, &b]);
    a.add_user("bob", "pw-bob-k");
    let bob = Ua::new(b.sip_addr());
    register_behind_nat(&bob, "bob", "pw-bob-k", "bob-k");
    // Both nodes see bob's binding behind NAT; only B, which holds the flow, pings it.
    let mut pings = Vec::new();
    let until = Instant::now() + Duration::from_secs(4);
    bob.sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    while Instant::now() < until {
        if let Some(m) = bob.recv()
            && m.starts_with("OPTIONS ")
        {
            answer(&bob, &m, 200);
            pings.push(header(&m, "Via").unwrap_or_default().to_string());
        }
    }
    assert!(pings.len() >= 2, "{pings:?}");
    assert!(
        pings.iter().all(|v| v.contains("127.0.0.3:")),
        "a ping from another node than the owner: {pings:?}"
    );
    assert_eq!(a.metric("careflow_sip_keepalives_sent_total"), 0);
    assert!(b.metric("careflow_sip_keepalives_sent_total") >= 2);
}
