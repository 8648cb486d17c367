//! What busy lamps show through forks, restarts and phone quirks (issue 19): a forked call
//! whose branches end one by one stays `early`, then `confirmed`, until its BYE; the
//! subscriptions of UDP phones outlive a restart and a crash (the lamps follow calls after it
//! without the phones subscribing again, versions still rising); `BLF_QUIRKS` bodies; a lamp
//! on one node of a cluster follows a call handled by another.

use std::time::{Duration, Instant};

use crate::blf::{DOMAIN, dialog_info, next_notify, refresh, state_of, subscribed, ward};
use crate::cluster_link::{in_dialog, route_set};
use crate::support::*;

/// Reads the watcher's NOTIFYs until the dialog of `call_id` is in `want` (within 5 s);
/// returns the states of that dialog each NOTIFY showed, and the last version.
fn lamp_until(watcher: &Ua, call_id: &str, want: &str) -> (Vec<String>, u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let (_, body) = next_notify(watcher);
        let info = dialog_info(&body);
        let state = state_of(&info, call_id).unwrap_or("none").to_string();
        seen.push(state.clone());
        if state == want {
            return (seen, info.version);
        }
    }
    panic!("the lamp never showed {want} for {call_id}: {seen:?}");
}

/// NOTIFYs arriving within `wait` (answered), as parsed bodies.
fn notifies_within(watcher: &Ua, wait: Duration) -> Vec<crate::blf::DialogInfo> {
    watcher.sock.set_read_timeout(Some(wait)).unwrap();
    let mut out = Vec::new();
    while let Some(m) = watcher.recv() {
        if m.starts_with("NOTIFY ") {
            answer(watcher, &m, 200);
            out.push(dialog_info(m.split("\r\n\r\n").nth(1).unwrap_or_default()));
        }
    }
    watcher
        .sock
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    out
}

#[test]
fn a_forked_call_stays_early_while_a_branch_rings_and_confirmed_when_others_are_cancelled() {
    let server = ward(&["2001", "2002", "2003"]);
    // 2001 has three phones: the desk phone refuses (busy), the DECT handset answers, the
    // softphone is cancelled.
    let phones: Vec<Ua> = (0..3).map(|_| Ua::new(server.sip_addr())).collect();
    for (i, p) in phones.iter().enumerate() {
        let r = p.register("2001", "pw-2001", DOMAIN, &format!("reg-fork-{i}"), "");
        assert_eq!(status(&r), 200, "{r}");
    }
    let watcher = Ua::new(server.sip_addr());
    assert_eq!(
        status(&subscribed(&watcher, "2001", "blf-fork", 1, 1800)),
        200
    );
    let (_, idle) = next_notify(&watcher);
    assert!(dialog_info(&idle).dialogs.is_empty(), "{idle}");

    let caller = Ua::new(server.sip_addr());
    invite_authorized(&caller, DOMAIN, ("2002", "pw-2002"), "2001", "fork-call");
    let invites: Vec<String> = phones.iter().map(|p| expect(p, "INVITE ")).collect();
    for (p, inv) in phones.iter().zip(&invites) {
        answer(p, inv, 180);
    }
    let (seen, _) = lamp_until(&watcher, "fork-call", "early");
    assert!(!seen.contains(&"terminated".to_string()), "{seen:?}");
    // One branch refuses: the call still rings on the others.
    answer(&phones[0], &invites[0], 486);
    let _ack = expect(&phones[0], "ACK ");
    for info in notifies_within(&watcher, Duration::from_millis(600)) {
        assert_eq!(state_of(&info, "fork-call"), Some("early"), "{info:?}");
    }
    // Another answers: confirmed, with the answering phone's tag; the third is cancelled, and
    // its 487 changes nothing.
    answer(&phones[1], &invites[1], 200);
    let ok = expect(&caller, "SIP/2.0 200");
    let cancel = expect(&phones[2], "CANCEL ");
    answer(&phones[2], &cancel, 200);
    answer(&phones[2], &invites[2], 487);
    let (seen, _) = lamp_until(&watcher, "fork-call", "confirmed");
    assert!(!seen.contains(&"terminated".to_string()), "{seen:?}");
    let later = notifies_within(&watcher, Duration::from_millis(800));
    for info in &later {
        let d = info
            .dialogs
            .iter()
            .find(|d| d.call_id == "fork-call")
            .unwrap();
        assert_eq!(
            d.state, "confirmed",
            "the cancelled branch ended the lamp: {info:?}"
        );
        assert_eq!(
            d.local_tag.as_deref(),
            Some(format!("dev{}", phones[1].port()).as_str())
        );
    }
    // Hung up: terminated.
    let to = header(&ok, "To").unwrap().to_string();
    let bye = in_dialog(
        &caller,
        "127.0.0.1",
        "BYE",
        &format!("sip:dev@127.0.0.1:{}", phones[1].port()),
        &route_set(&ok, true),
        (&format!("<sip:2002@{DOMAIN}>;tag=f-fork-call"), &to),
        "fork-call",
        3,
    );
    caller.send(&bye);
    let b = expect(&phones[1], "BYE ");
    answer(&phones[1], &b, 200);
    lamp_until(&watcher, "fork-call", "terminated");
}

/// The lamp of 2001 rings for a call from 2002 (its callee answering 180); the version of the
/// NOTIFY that showed it.
fn rings(server: &Server, callee: &Ua, watcher: &Ua, call_id: &str) -> u32 {
    let caller = Ua::new(server.sip_addr());
    invite_authorized(&caller, DOMAIN, ("2002", "pw-2002"), "2001", call_id);
    let inv = expect(callee, "INVITE ");
    answer(callee, &inv, 180);
    lamp_until(watcher, call_id, "early").1
}

#[test]
fn subscriptions_outlive_a_restart_and_a_crash() {
    let mut server = ward(&["2001", "2002", "2003"]);
    let callee = Ua::new(server.sip_addr());
    let r = callee.register("2001", "pw-2001", DOMAIN, "reg-restart", "");
    assert_eq!(status(&r), 200, "{r}");
    let watcher = Ua::new(server.sip_addr());
    let ok = subscribed(&watcher, "2001", "blf-restart", 1, 1800);
    assert_eq!(status(&ok), 200, "{ok}");
    next_notify(&watcher);
    let before = rings(&server, &callee, &watcher, "before-restart");

    // A restart: the phone hears from the new process at once, with a higher version and the
    // time its subscription has left; nothing rings any more.
    server.stop();
    server.start_again();
    let (state, body) = next_notify(&watcher);
    let info = dialog_info(&body);
    assert!(info.version > before, "{body}");
    let left: u32 = state
        .strip_prefix("active;expires=")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{state}"));
    assert!((1700..=1800).contains(&left), "{state}");
    assert!(server.log_shows("subscriptions taken back after a restart"));
    // The lamp follows the next call without the phone subscribing again.
    let after = rings(&server, &callee, &watcher, "after-restart");
    assert!(after > info.version);
    // And the phone's refresh is the subscription's (200, not 481).
    let contact = header(&ok, "Contact")
        .unwrap()
        .trim_matches(|c| c == '<' || c == '>')
        .to_string();
    let to = header(&ok, "To").unwrap().to_string();
    send_with_proxy_auth(
        &watcher,
        DOMAIN,
        ("2003", "pw-2003"),
        ("SUBSCRIBE", &contact),
        |n, extra| refresh(&watcher, &contact, &to, "blf-restart", n + 2, extra),
    );
    let r = loop {
        let m = watcher.recv().expect("an answer to the refresh");
        if m.starts_with("NOTIFY ") {
            answer(&watcher, &m, 200);
            continue;
        }
        break m;
    };
    assert_eq!(status(&r), 200, "{r}");

    // A crash (no chance to save): the versions still rise past anything sent before it.
    std::thread::sleep(Duration::from_secs(3));
    let sent = rings(&server, &callee, &watcher, "before-crash");
    server.crash();
    server.start_again();
    let (_, body) = next_notify(&watcher);
    let info = dialog_info(&body);
    assert!(info.version > sent, "{} after {sent}: {body}", info.version);
    rings(&server, &callee, &watcher, "after-crash");
}

#[test]
fn blf_quirks_give_a_phone_one_dialog_per_body() {
    let server = Server::start_with(
        DOMAIN,
        &[("BLF_QUIRKS", "SIP-T46S=single-dialog,idle-terminated")],
    );
    for u in ["2001", "2002", "2003"] {
        server.add_user(u, &format!("pw-{u}"));
    }
    let callee = Ua::new(server.sip_addr());
    let r = callee.register("2001", "pw-2001", DOMAIN, "reg-quirk", "");
    assert_eq!(status(&r), 200, "{r}");
    // The watcher sends the T46S User-Agent (blf.rs): its idle body has one terminated dialog.
    let watcher = Ua::new(server.sip_addr());
    assert_eq!(
        status(&subscribed(&watcher, "2001", "blf-quirk", 1, 1800)),
        200
    );
    let (_, body) = next_notify(&watcher);
    let info = dialog_info(&body);
    assert_eq!(info.dialogs.len(), 1, "{body}");
    assert_eq!(info.dialogs[0].state, "terminated", "{body}");
    // Two calls at once (one answered, one ringing): one dialog, the ringing one.
    rings(&server, &callee, &watcher, "quirk-1");
    let caller = Ua::new(server.sip_addr());
    invite_authorized(&caller, DOMAIN, ("2002", "pw-2002"), "2001", "quirk-2");
    let inv = expect(&callee, "INVITE ");
    answer(&callee, &inv, 180);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = next_notify(&watcher);
        let info = dialog_info(&body);
        assert_eq!(info.dialogs.len(), 1, "{body}");
        if info.dialogs[0].call_id == "quirk-2" {
            assert_eq!(info.dialogs[0].state, "early");
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
    }
}

#[test]
fn a_lamp_on_one_node_follows_a_call_through_another() {
    use crate::cluster_link::{DOMAIN as D, joined, member, register_behind_nat};
    let redis = crate::push::OwnRedis::start();
    let db = TestDb::postgres();
    let (a, b) = (member(9, &db, &redis.url), member(10, &db, &redis.url));
    joined(&[&a, &b]);
    for u in ["2001", "2002", "2003"] {
        a.add_user(u, &format!("pw-{u}"));
    }
    // The clerk's phone watches 2001 through node A.
    let watcher = Ua::new(a.sip_addr());
    let uri = format!("sip:2001@{D}");
    send_with_proxy_auth(
        &watcher,
        D,
        ("2003", "pw-2003"),
        ("SUBSCRIBE", &uri),
        |n, extra| {
            crate::blf::subscribe_as("2003", &watcher, "2001", "blf-cluster", n, 1800, extra)
                .replace(DOMAIN, D)
        },
    );
    let ok = watcher.recv().expect("an answer to the SUBSCRIBE");
    assert_eq!(status(&ok), 200, "{ok}");
    let (_, idle) = next_notify(&watcher);
    assert!(dialog_info(&idle).dialogs.is_empty(), "{idle}");
    // 2001's phone (behind NAT) is registered through node B, and 2002 calls it there.
    let callee = Ua::new(b.sip_addr());
    register_behind_nat(&callee, "2001", "pw-2001", "reg-cluster");
    let caller = Ua::new(b.sip_addr());
    invite_authorized(&caller, D, ("2002", "pw-2002"), "2001", "cluster-call-1");
    let inv = expect(&callee, "INVITE ");
    answer(&callee, &inv, 180);
    lamp_until(&watcher, "cluster-call-1", "early");
    answer(&callee, &inv, 486);
    lamp_until(&watcher, "cluster-call-1", "terminated");
    // Another call, answered: confirmed on A's lamp.
    let caller = Ua::new(b.sip_addr());
    invite_authorized(&caller, D, ("2002", "pw-2002"), "2001", "cluster-call-2");
    let inv = expect(&callee, "INVITE ");
    answer(&callee, &inv, 180);
    answer(&callee, &inv, 200);
    let (seen, _) = lamp_until(&watcher, "cluster-call-2", "confirmed");
    assert!(!seen.contains(&"terminated".to_string()), "{seen:?}");
}
