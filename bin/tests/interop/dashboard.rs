//! The dashboard in a real browser (Debian's Chromium driven by playwright-core): a clinician
//! signs in with a CareFlow token, generates credentials, a real SIP client registers with them
//! and appears on the page without a reload, is deregistered from the page, the guides carry the
//! user's values, the password is rotated (the old one then fails); IT staff sign in with an API
//! key and see users and failed sign-ins. Screenshots of each view go to target/screenshots/.

use std::process::Command;

use crate::api::IdentityProvider;
use crate::peers::{register_contact, sipp_file};
use crate::support::*;
use crate::websocket::{Events, js_dir};

#[test]
fn a_clinician_and_an_administrator_use_the_dashboard() {
    require("chromium", "chromium");
    require("sipp", "sip-tester");
    let js = js_dir();
    let idp = IdentityProvider::start();
    // Every transport, so the account page lists them all.
    let mut env: Vec<(&str, String)> = idp.env();
    env.push((
        "SIP_LISTEN",
        "udp:127.0.0.1:{port},tcp:127.0.0.1:{port},tls:127.0.0.1:{port2},wss:127.0.0.1:{port3}"
            .to_string(),
    ));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut server = Server::start_with("localhost", &env);
    let token = idp.token("clinician-7", |_| {});
    let expired = idp.token("clinician-7", |c| {
        c["iat"] = serde_json::json!(1_600_000_000);
        c["exp"] = serde_json::json!(1_600_000_600);
    });
    let key = server.cli_ok(&["apikey", "create", "it-desk"]);
    let key = key.lines().last().unwrap().trim().to_string();
    let shots = interop_dir().join("../../../target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();

    let mut node = Command::new("node");
    node.current_dir(&js)
        .arg("dashboard.js")
        .arg(format!("http://127.0.0.1:{}", server.http))
        .args([&token, &expired, &key])
        .arg(&shots);
    let mut page = Events::spawn(node);
    page.wait("expired-refused", &server);
    // The credentials appear behind the page's back (CareFlow's own call to the API).
    page.wait("account-empty", &server);
    let (code, _, _) = crate::api::http(&server, "POST", "/api/sip/register", Some(&token), None);
    assert_eq!(code, 201);
    page.send("created");
    page.wait("conflict-shown", &server);
    let creds = page.wait("credentials", &server);
    let parts: Vec<&str> = creds.split(' ').collect();
    let (user, password) = (parts[1].to_string(), parts[2].to_string());
    assert!(
        user.starts_with("careflow_") && password.len() == 24,
        "{creds}"
    );
    let servers = page.wait("servers", &server);
    assert_eq!(
        servers,
        format!(
            "servers UDP=localhost:{p} TCP=localhost:{p} TLS=localhost:{p2} WSS=wss://localhost:{p3}/",
            p = server.port,
            p2 = server.port2,
            p3 = server.port3
        )
    );

    // A real client registers with what the page showed.
    let tmp = tempfile::tempdir().unwrap();
    let users = sipp_file(tmp.path(), "dash.csv", &[(&user, &password)]);
    let device_port = free_port();
    register_contact(&server, &users, device_port, "udp");
    page.send("registered");
    // The device came through the server-sent event stream, not a poll.
    assert_eq!(
        page.wait("requests-while-waiting", &server),
        "requests-while-waiting none"
    );
    let online = page.wait("device-online", &server);
    assert!(
        online.contains("UDP") && online.contains("127.0.0.1") && online.contains("Online"),
        "{online}"
    );
    // The clinician calls a number that does not exist: the call shows up under Recent calls.
    let phone = Ua::new(server.sip_addr());
    invite_authorized(
        &phone,
        "localhost",
        (&user, &password),
        "nobody-here",
        "dash-call",
    );
    page.send("called");
    let recent = page.wait("recent-call", &server);
    assert!(
        recent.contains("Outgoing") && recent.contains("nobody-here") && recent.contains("Failed"),
        "{recent}"
    );
    page.wait("device-removed", &server);
    assert!(server.bindings_of(&user).is_empty());

    // A wrong password, for the administrator's list of failed sign-ins.
    let ua = Ua::new(server.sip_addr());
    let r = ua.register(&user, "not-the-password", "localhost", "dash-wrong", "");
    assert_ne!(status(&r), 200, "{r}");
    page.send("next");

    assert_eq!(page.wait("guide", &server), "guide values-filled");
    let line = page.wait("baresip-line", &server);
    assert!(
        line.contains(&format!("<sip:{user}@localhost;transport="))
            && line.contains(&format!("auth_pass={password};")),
        "{line}"
    );

    // The Linphone QR code: zbarimg reads the link from the picture; fetched like Linphone does,
    // it serves the account with its HA1 (never the password), once.
    require("zbarimg", "zbar-tools");
    let qr = page.wait("qr", &server);
    let parts: Vec<&str> = qr.split(' ').collect();
    let decoded = Command::new("zbarimg")
        .args(["--raw", "-q", parts[1]])
        .output()
        .unwrap();
    let decoded = String::from_utf8_lossy(&decoded.stdout).trim().to_string();
    assert_eq!(decoded, parts[2], "the QR code must carry the link shown");
    let link_path = &parts[2][parts[2].find("/provision/").unwrap()..];
    let (code, head, xml) = http_get_at(server.http, link_path).expect("an answer");
    assert!(code == 200 && head.contains("application/xml"), "{head}");
    let ha1 = careflow_proto::digest::ha1(
        careflow_proto::digest::Algorithm::Md5,
        &user,
        "localhost",
        &password,
    );
    assert!(
        xml.contains(&format!("<entry name=\"ha1\">{ha1}</entry>"))
            && xml.contains(&format!("<entry name=\"username\">{user}</entry>"))
            && !xml.contains(&password),
        "{xml}"
    );
    let (again, _, _) = crate::api::http(&server, "GET", link_path, None, None);
    assert_eq!(again, 404, "a provisioning link works once");

    // After rotation the old password is refused and the new one works.
    let rotated = page.wait("rotated", &server);
    let new_password = rotated.split(' ').nth(1).unwrap().to_string();
    assert_ne!(new_password, password);
    let old = ua.register(&user, &password, "localhost", "dash-old", "");
    assert_ne!(status(&old), 200, "{old}");
    let new = ua.register(&user, &new_password, "localhost", "dash-new", "");
    assert_eq!(status(&new), 200, "{new}");
    page.send("next");

    // Revoked from the page: the current password no longer works either.
    page.wait("revoked", &server);
    let after = ua.register(&user, &new_password, "localhost", "dash-revoked", "");
    assert_ne!(status(&after), 200, "{after}");
    let again = page.wait("regenerated", &server);
    assert!(again.starts_with("regenerated careflow_"), "{again}");

    // An outage shows on the page, and the page recovers when the server is back.
    page.wait("ready-for-outage", &server);
    server.stop();
    page.send("stopped");
    page.wait("unreachable-shown", &server);
    server.start_again();
    page.send("started");
    page.wait("recovered", &server);
    // Failed sign-ins are kept in memory: one after the restart, for the administrator's view.
    let r = ua.register(
        &user,
        "still-not-the-password",
        "localhost",
        "dash-late",
        "",
    );
    assert_ne!(status(&r), 200, "{r}");
    page.send("next");

    let audit = page.wait("admin-audit", &server);
    assert!(
        audit.contains("credentials.created") && audit.contains("credentials.rotated"),
        "{audit}"
    );
    assert_eq!(
        page.wait("calls-export", &server),
        "calls-export careflow-calls.csv 2",
        "the header and the one call"
    );
    // The desk phone added from the page is bound to the user, with the password shown once
    // working for its configuration fetch's digest (its HA1 is what was stored).
    let added = page.wait("device-added", &server);
    let password = added.split(' ').nth(1).unwrap();
    assert_eq!(password.len(), 32, "{added}");
    let list = server.cli_ok(&["device", "list"]);
    assert!(list.contains("001565aabbcc\tyealink-t46s"), "{list}");
    let admin = page.wait("admin", &server);
    let counts: Vec<u32> = admin
        .split(' ')
        .skip(1)
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(counts[0] >= 1 && counts[1] >= 1, "{admin}");
    assert_eq!(page.wait("local-storage", &server), "local-storage empty");
    let axe = page.wait("axe-total", &server);
    assert_eq!(
        axe, "axe-total 0",
        "accessibility problems: {:?}",
        page.seen
    );
    page.wait("done", &server);
}

/// geckodriver: on the PATH, or where scripts/test installs it (`cargo install`; Debian has no
/// package for it).
fn geckodriver() -> std::path::PathBuf {
    let installed = std::path::PathBuf::from("/var/tmp/geckodriver/bin/geckodriver");
    if installed.exists() {
        return installed;
    }
    if let Ok(out) = Command::new("sh")
        .args(["-c", "command -v geckodriver"])
        .output()
        && out.status.success()
    {
        return String::from_utf8_lossy(&out.stdout).trim().into();
    }
    panic!(
        "geckodriver is not installed: run scripts/test (it runs `cargo install geckodriver --locked --root /var/tmp/geckodriver`)"
    );
}

#[test]
fn a_clinician_uses_the_dashboard_in_firefox() {
    require("firefox-esr", "firefox-esr");
    require("sipp", "sip-tester");
    let gecko = geckodriver();
    let js = js_dir();
    let idp = IdentityProvider::start();
    // With a push service, so the clinician's mobile shows as asleep but reachable.
    let push = careflow_test_support::push_service::PushService::start();
    let mut owned: Vec<(String, String)> = idp
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    owned.extend(push.env());
    let env: Vec<(&str, &str)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let server = Server::start_with("localhost", &env);
    let token = idp.token("clinician-ff", |_| {});
    let shots = interop_dir().join("../../../target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let mut node = Command::new("node");
    node.current_dir(&js)
        .arg("firefox-dashboard.js")
        .arg(format!("http://127.0.0.1:{}", server.http))
        .arg(&token)
        .arg(&shots)
        .arg(&gecko)
        .arg(free_port().to_string());
    let mut page = Events::spawn(node);
    let creds = page.wait("credentials", &server);
    let parts: Vec<&str> = creds.split(' ').collect();
    let (user, password) = (parts[1].to_string(), parts[2].to_string());
    page.wait("no-devices-shown", &server);
    let tmp = tempfile::tempdir().unwrap();
    let users = sipp_file(tmp.path(), "ff.csv", &[(&user, &password)]);
    register_contact(&server, &users, free_port(), "udp");
    let mobile = Ua::new(server.sip_addr());
    let port = mobile.port();
    let r = mobile.register_rewritten(&user, &password, "localhost", "ff-mobile", |m| {
        m.replace(
            &format!("@127.0.0.1:{port}>"),
            &format!(
                "@127.0.0.1:{port};pn-provider=fcm;pn-param=careflow-test;pn-prid=ff-token-0123>"
            ),
        )
    });
    assert_eq!(status(&r), 200, "{r}");
    page.send("registered");
    let online = page.wait("device-online", &server);
    assert!(
        online.contains("UDP") && online.contains("Online"),
        "{online}"
    );
    assert!(
        online.contains("Sleeping, push-enabled") && !online.contains("ff-token"),
        "the mobile is shown asleep but reachable: {online}"
    );
    assert_eq!(page.wait("guide", &server), "guide values-filled");
    let axe = page.wait("axe-total", &server);
    assert_eq!(
        axe, "axe-total 0",
        "accessibility problems: {:?}",
        page.seen
    );
    page.wait("done", &server);
}
