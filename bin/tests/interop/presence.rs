//! Presence for softphones and the web app (issue 19): `SUBSCRIBE` with `Event: presence` gets
//! PIDF built from what the server knows: `open` with a device registered, on the phone in a
//! call, `closed` with none. Raw UAs check each body as XML; baresip's presence module shows
//! the colleague's status change as it would to its user.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::blf::{DOMAIN, subscribed_for, ward};
use crate::cluster_link::{in_dialog, route_set};
use crate::peers::baresip_home_at;
use crate::support::*;

const PIDF_NS: &str = "urn:ietf:params:xml:ns:pidf";
const RPID_NS: &str = "urn:ietf:params:xml:ns:pidf:rpid";

/// What a PIDF body says: `open`, `on-the-phone` or `closed` (parsed as XML).
fn availability(body: &str) -> String {
    let doc = roxmltree::Document::parse(body).unwrap_or_else(|e| panic!("not XML ({e}):\n{body}"));
    let root = doc.root_element();
    assert!(root.has_tag_name((PIDF_NS, "presence")), "{body}");
    assert_eq!(
        root.attribute("entity"),
        Some("sip:2001@ward.test"),
        "{body}"
    );
    let basic = root
        .descendants()
        .find(|n| n.has_tag_name((PIDF_NS, "basic")))
        .and_then(|n| n.text())
        .unwrap_or_else(|| panic!("no basic status: {body}"));
    let on_the_phone = root
        .descendants()
        .any(|n| n.has_tag_name((RPID_NS, "on-the-phone")));
    match (basic, on_the_phone) {
        ("open", true) => "on-the-phone",
        ("open", false) => "open",
        ("closed", false) => "closed",
        other => panic!("{other:?}: {body}"),
    }
    .to_string()
}

/// Reads presence NOTIFYs (answered 200) until one says `want`, within 5 s.
fn presence_until(watcher: &Ua, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let Some(m) = watcher.recv() else { continue };
        if !m.starts_with("NOTIFY ") {
            continue;
        }
        answer(watcher, &m, 200);
        assert_eq!(header(&m, "Event"), Some("presence"), "{m}");
        assert_eq!(
            header(&m, "Content-Type"),
            Some("application/pidf+xml"),
            "{m}"
        );
        let a = availability(m.split("\r\n\r\n").nth(1).unwrap_or_default());
        if a == want {
            return;
        }
        seen.push(a);
    }
    panic!("presence never became {want}: {seen:?}");
}

#[test]
fn presence_is_open_with_a_device_on_the_phone_in_a_call_and_closed_without_one() {
    let server = ward(&["2001", "2002", "2003"]);
    let watcher = Ua::new(server.sip_addr());
    let ok = subscribed_for(
        "presence",
        ("2003", "pw-2003"),
        &watcher,
        ("2001", "pres-1", 1),
        3600,
    );
    assert_eq!(status(&ok), 200, "{ok}");
    assert_eq!(header(&ok, "Expires"), Some("3600"), "{ok}");
    presence_until(&watcher, "closed");

    let phone = Ua::new(server.sip_addr());
    let r = phone.register("2001", "pw-2001", DOMAIN, "reg-pres", "");
    assert_eq!(status(&r), 200, "{r}");
    presence_until(&watcher, "open");

    // A call: on the phone once answered, open again after the BYE.
    let caller = Ua::new(server.sip_addr());
    invite_authorized(&caller, DOMAIN, ("2002", "pw-2002"), "2001", "pres-call");
    let inv = expect(&phone, "INVITE ");
    answer(&phone, &inv, 180);
    answer(&phone, &inv, 200);
    let ok = expect(&caller, "SIP/2.0 200");
    presence_until(&watcher, "on-the-phone");
    let to = header(&ok, "To").unwrap().to_string();
    let bye = in_dialog(
        &caller,
        "127.0.0.1",
        "BYE",
        &format!("sip:dev@127.0.0.1:{}", phone.port()),
        &route_set(&ok, true),
        (&format!("<sip:2002@{DOMAIN}>;tag=f-pres-call"), &to),
        "pres-call",
        3,
    );
    caller.send(&bye);
    let b = expect(&phone, "BYE ");
    answer(&phone, &b, 200);
    presence_until(&watcher, "open");

    // The device unregisters: closed.
    let r = phone.register("2001", "pw-2001", DOMAIN, "unreg-pres", "Expires: 0\r\n");
    assert_eq!(status(&r), 200, "{r}");
    presence_until(&watcher, "closed");

    // Someone outside the watch policy's reach (another domain) is refused like for lamps.
    let stranger = subscribed_for(
        "presence",
        ("2003", "pw-2003"),
        &watcher,
        ("nobody", "pres-2", 1),
        3600,
    );
    assert_eq!(status(&stranger), 404, "{stranger}");
}

/// `line` without its ANSI colour sequences (`ESC [ ... m`).
fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn the_web_app_watches_a_lamp_and_presence_with_jssip_over_wss() {
    let js = crate::websocket::js_dir();
    let server = Server::start_with(
        DOMAIN,
        &[(
            "SIP_LISTEN",
            "udp:127.0.0.1:{port},tcp:127.0.0.1:{port},wss:127.0.0.1:{port2}",
        )],
    );
    for u in ["2001", "2002", "2003"] {
        server.add_user(u, &format!("pw-{u}"));
    }
    let mut node = Command::new("node");
    node.current_dir(&js).arg("jssip-subscriber.js").args([
        &format!("wss://{}:{}/", server.host, server.port2),
        &format!("sip:2003@{DOMAIN}"),
        "pw-2003",
        &format!("sip:2001@{DOMAIN}"),
    ]);
    let mut web = crate::websocket::Events::spawn(node);
    for line in [
        "dialog-active",
        "dialog idle",
        "presence-active",
        "presence closed",
    ] {
        web.take(line, &server);
    }
    let phone = Ua::new(server.sip_addr());
    let r = phone.register("2001", "pw-2001", DOMAIN, "reg-web", "");
    assert_eq!(status(&r), 200, "{r}");
    web.take("presence open", &server);
    let caller = Ua::new(server.sip_addr());
    invite_authorized(&caller, DOMAIN, ("2002", "pw-2002"), "2001", "web-call");
    let inv = expect(&phone, "INVITE ");
    answer(&phone, &inv, 180);
    web.take("dialog early", &server);
    answer(&phone, &inv, 200);
    web.take("dialog confirmed", &server);
    web.take("presence on-the-phone", &server);
    // The NOTIFYs went over the web app's own WebSocket connection.
    assert!(server.metric("careflow_sip_notifies_sent_total") >= 6);
    // Unsubscribed: each ends on our final NOTIFY (JsSIP's RECEIVE_FINAL_NOTIFY, 2).
    web.send("stop");
    web.take("dialog-terminated 2", &server);
    web.take("presence-terminated 2", &server);
}

#[test]
fn baresip_sees_a_colleague_come_online_and_go_on_the_phone() {
    require("baresip", "baresip");
    let server = ward(&["2001", "2002", "2003"]);
    let home = tempfile::tempdir().unwrap();
    baresip_home_at(
        home.path(),
        &format!("<sip:2003@{DOMAIN}>"),
        "pw-2003",
        &format!("sip:127.0.0.1:{};transport=udp", server.port),
        "",
        "module_app contact.so\nmodule_app presence.so\n",
    );
    std::fs::write(
        home.path().join("contacts"),
        format!("\"Ward 2001\" <sip:2001@{DOMAIN}>;presence=p2p\n"),
    )
    .unwrap();
    let mut child = Command::new("baresip")
        .args(["-f", home.path().to_str().unwrap(), "-t", "60"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start baresip");
    let (tx, lines) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let mut wait_for = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(l) = lines.recv_timeout(Duration::from_millis(200)) {
                let l = without_colours(&l);
                log.push(l.clone());
                if l.contains(what) {
                    return;
                }
            }
        }
        let _ = Command::new("kill").arg(child.id().to_string()).status();
        panic!(
            "baresip never printed `{what}`:\n{}\nserver:\n{}",
            log.join("\n"),
            server.log()
        );
    };
    // baresip prints changes only, not the first status it learns (closed: 2001 has no
    // device): once it has that NOTIFY, 2001's phone registers.
    server.metric_becomes("careflow_sip_notifies_sent_total", 1);
    std::thread::sleep(Duration::from_millis(500));
    let phone = Ua::new(server.sip_addr());
    let r = phone.register("2001", "pw-2001", DOMAIN, "reg-bare", "");
    assert_eq!(status(&r), 200, "{r}");
    wait_for("changed status from Offline to Online");
    let caller = Ua::new(server.sip_addr());
    invite_authorized(&caller, DOMAIN, ("2002", "pw-2002"), "2001", "bare-call");
    let inv = expect(&phone, "INVITE ");
    answer(&phone, &inv, 200);
    wait_for("changed status from Online to Busy");
    let _ = child.kill();
    let _ = child.wait();
}
