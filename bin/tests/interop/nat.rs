//! A phone behind a real NAT: network namespaces made by the test (phone → router with
//! nftables masquerading → the server's host), baresip in the phone's namespace.
//! Needs root (namespaces, veth, nftables), as scripts/test runs.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::peers::baresip_home_at;
use crate::support::*;

/// Runs `cmd` with sh; fails the test with its stderr when it fails.
pub(crate) fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// phone namespace (192.168.N.2) → router namespace (masquerades to 10.213.N.2) → this
/// host (10.213.N.1). The router forgets idle UDP mappings after a few seconds.
struct Nat {
    n: u32,
}

impl Nat {
    fn new() -> Self {
        require("nft", "nftables");
        require("ip", "iproute2");
        let n = std::process::id() % 200 + 20;
        let nat = Self { n };
        nat.cleanup();
        let (ph, rt) = (nat.phone_ns(), nat.router_ns());
        sh(&format!("ip netns add {ph} && ip netns add {rt}"));
        sh(&format!(
            "ip link add cfh{n} type veth peer name cfr0 netns {rt} && \
             ip netns exec {rt} ip link add cfr1 type veth peer name cfp0 netns {ph} && \
             ip addr add 10.213.{n}.1/24 dev cfh{n} && ip link set cfh{n} up"
        ));
        sh(&format!(
            "ip netns exec {rt} sh -c 'ip link set lo up && \
             ip addr add 10.213.{n}.2/24 dev cfr0 && ip link set cfr0 up && \
             ip addr add 192.168.{n}.1/24 dev cfr1 && ip link set cfr1 up && \
             sysctl -qw net.ipv4.ip_forward=1 && nft add table ip nat && \
             nft \"add chain ip nat post {{ type nat hook postrouting priority 100 ; }}\" && \
             nft add rule ip nat post oifname cfr0 masquerade && \
             sysctl -qw net.netfilter.nf_conntrack_udp_timeout=3 \
               net.netfilter.nf_conntrack_udp_timeout_stream=4'"
        ));
        sh(&format!(
            "ip netns exec {ph} sh -c 'ip link set lo up && \
             ip addr add 192.168.{n}.2/24 dev cfp0 && ip link set cfp0 up && \
             ip route add default via 192.168.{n}.1'"
        ));
        nat
    }

    fn phone_ns(&self) -> String {
        format!("cfnat-ph{}", self.n)
    }

    fn router_ns(&self) -> String {
        format!("cfnat-rt{}", self.n)
    }

    fn server_ip(&self) -> String {
        format!("10.213.{}.1", self.n)
    }

    fn cleanup(&self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ip netns del {} 2>/dev/null; ip netns del {} 2>/dev/null; ip link del cfh{} 2>/dev/null",
                self.phone_ns(),
                self.router_ns(),
                self.n
            ))
            .status();
    }
}

impl Drop for Nat {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn baresip(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start baresip")
}

#[test]
fn a_phone_behind_nat_registers_stays_reachable_through_keepalives_and_is_dropped_when_gone() {
    require("baresip", "baresip");
    let nat = Nat::new();
    let server = Server::start_with(
        "localhost",
        &[
            (
                "SIP_LISTEN",
                &format!("udp:127.0.0.1:{{port}},udp:{}:{{port}}", nat.server_ip()),
            ),
            ("NAT_KEEPALIVE_INTERVAL", "1"),
            ("NAT_KEEPALIVE_FAILURES", "3"),
        ],
    );
    server.add_user("natted", "pw-natted-phone");
    server.add_user("office", "pw-office-phone");
    let tmp = tempfile::tempdir().unwrap();
    let (p, o) = (tmp.path().join("natted"), tmp.path().join("office"));
    baresip_home_at(
        &p,
        "<sip:natted@localhost>",
        "pw-natted-phone",
        &format!("sip:{}:{}", nat.server_ip(), server.port),
        ";answermode=auto",
        "",
    );
    // baresip listens on the phone's private address, the one its Contact will name.
    let cfg = std::fs::read_to_string(p.join("config")).unwrap();
    let cfg = cfg.replacen(
        "sip_listen 127.0.0.1:",
        &format!("sip_listen 192.168.{}.2:", nat.n),
        1,
    );
    std::fs::write(p.join("config"), cfg).unwrap();
    baresip_home_at(
        &o,
        "<sip:office@localhost>",
        "pw-office-phone",
        &format!("sip:127.0.0.1:{}", server.port),
        "",
        "",
    );
    let mut phone = baresip(
        Command::new("ip")
            .args(["netns", "exec", &nat.phone_ns(), "baresip", "-f"])
            .arg(&p)
            .args(["-t", "60"]),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.bindings_of("natted").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the NATed phone did not register:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let b = &server.bindings_of("natted")[0];
    assert!(
        b.contains(&format!("192.168.{}.2", nat.n)) && b.contains(&format!("10.213.{}.2", nat.n)),
        "binding should show the private contact and the NAT's public source: {b}"
    );

    // Longer than the router keeps an idle mapping: only the keep-alives keep it open.
    std::thread::sleep(Duration::from_secs(7));
    assert!(server.metric("careflow_sip_keepalives_answered_total") >= 4);
    assert_eq!(server.metric("careflow_sip_keepalive_failures_total"), 0);

    let call = Command::new("baresip")
        .arg("-f")
        .arg(&o)
        .args(["-e", "/dial sip:natted@localhost", "-t", "5"])
        .stdin(Stdio::null())
        .output()
        .expect("run baresip");
    let out =
        String::from_utf8_lossy(&call.stdout).into_owned() + &String::from_utf8_lossy(&call.stderr);
    assert!(
        out.contains("Call established"),
        "the phone behind NAT was not reached:\n{out}\nserver:\n{}",
        server.log()
    );
    assert_eq!(
        server.metric("careflow_sip_calls_total{result=\"answered\"}"),
        1
    );

    // The phone dies without unregistering: three missed keep-alives remove its binding.
    let _ = phone.kill();
    let _ = phone.wait();
    assert_eq!(
        server.metric_becomes("careflow_sip_keepalive_bindings_dropped_total", 1),
        1,
        "{}",
        server.log()
    );
    assert!(server.bindings_of("natted").is_empty());
}
