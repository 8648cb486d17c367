//! Busy lamps (issue 19, first slice): a desk phone subscribes to a colleague's dialog state
//! as a Yealink does (`Event: dialog`, `Accept: application/dialog-info+xml`), through proxy
//! authentication, and its NOTIFYs follow a call the proxy handles: idle at once, early when
//! the colleague's phone rings, confirmed on answer, terminated on BYE or CANCEL.

use crate::cluster_link::{in_dialog, route_set};
use crate::support::*;

pub(crate) const DOMAIN: &str = "ward.test";

/// A server for the ward with `users` (password `pw-USER`).
pub(crate) fn ward(users: &[&str]) -> Server {
    let server = Server::start(DOMAIN);
    for u in users {
        server.add_user(u, &format!("pw-{u}"));
    }
    server
}

/// A dialog-info body parsed as XML (RFC 4235): its version and dialogs.
#[derive(Debug)]
pub(crate) struct DialogInfo {
    pub(crate) version: u32,
    pub(crate) dialogs: Vec<Dialog>,
}

/// One `<dialog>` of a [`DialogInfo`].
#[derive(Debug)]
pub(crate) struct Dialog {
    pub(crate) call_id: String,
    pub(crate) state: String,
    pub(crate) direction: String,
    pub(crate) local_tag: Option<String>,
    pub(crate) remote_tag: Option<String>,
    pub(crate) remote_identity: String,
}

const DIALOG_INFO_NS: &str = "urn:ietf:params:xml:ns:dialog-info";

/// Parses `body` as dialog-info+xml (panics, naming the body, when it is not).
pub(crate) fn dialog_info(body: &str) -> DialogInfo {
    let doc = roxmltree::Document::parse(body).unwrap_or_else(|e| panic!("not XML ({e}):\n{body}"));
    let root = doc.root_element();
    assert_eq!(
        (root.tag_name().namespace(), root.tag_name().name()),
        (Some(DIALOG_INFO_NS), "dialog-info"),
        "{body}"
    );
    assert_eq!(root.attribute("state"), Some("full"), "{body}");
    let dialogs = root
        .children()
        .filter(|c| c.has_tag_name((DIALOG_INFO_NS, "dialog")))
        .map(|d| Dialog {
            call_id: d.attribute("call-id").unwrap_or_default().to_string(),
            state: child(d, "state")
                .and_then(|s| s.text())
                .unwrap_or_else(|| panic!("a dialog without state: {body}"))
                .to_string(),
            direction: d.attribute("direction").unwrap_or_default().to_string(),
            local_tag: d.attribute("local-tag").map(str::to_string),
            remote_tag: d.attribute("remote-tag").map(str::to_string),
            remote_identity: child(d, "remote")
                .and_then(|r| child(r, "identity"))
                .and_then(|i| i.text())
                .unwrap_or_default()
                .to_string(),
        })
        .collect();
    DialogInfo {
        version: root
            .attribute("version")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no version: {body}")),
        dialogs,
    }
}

/// The first child element `name` of `n` (in the dialog-info namespace).
fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children()
        .find(|c| c.has_tag_name((DIALOG_INFO_NS, name)))
}

/// The state of the dialog of `call_id` in `info`.
pub(crate) fn state_of<'i>(info: &'i DialogInfo, call_id: &str) -> Option<&'i str> {
    info.dialogs
        .iter()
        .find(|d| d.call_id == call_id)
        .map(|d| d.state.as_str())
}

/// The watcher's next NOTIFY (answered 200): its Subscription-State and body (checked to be
/// well-formed dialog-info XML).
pub(crate) fn next_notify(watcher: &Ua) -> (String, String) {
    let n = expect(watcher, "NOTIFY ");
    answer(watcher, &n, 200);
    let state = header(&n, "Subscription-State")
        .unwrap_or_default()
        .to_string();
    assert_eq!(header(&n, "Event"), Some("dialog"), "{n}");
    assert_eq!(
        header(&n, "Content-Type"),
        Some("application/dialog-info+xml"),
        "{n}"
    );
    let body = n.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    dialog_info(&body);
    (state, body)
}

/// A SUBSCRIBE of user 2003 as a Yealink T46S sends it for a BLF key.
fn subscribe(
    watcher: &Ua,
    watched: &str,
    call_id: &str,
    cseq: u32,
    expires: u32,
    extra: &str,
) -> String {
    subscribe_as("2003", watcher, watched, call_id, cseq, expires, extra)
}

/// [`subscribe`] by user `me`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn subscribe_as(
    me: &str,
    watcher: &Ua,
    watched: &str,
    call_id: &str,
    cseq: u32,
    expires: u32,
    extra: &str,
) -> String {
    let port = watcher.port();
    format!(
        "SUBSCRIBE sip:{watched}@{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKsub{call_id}{cseq};rport\r\n\
         From: \"Clerk\" <sip:{me}@{DOMAIN}>;tag=blf-{call_id}\r\nTo: <sip:{watched}@{DOMAIN}>\r\nCall-ID: {call_id}\r\n\
         CSeq: {cseq} SUBSCRIBE\r\nContact: <sip:{me}@127.0.0.1:{port}>\r\nAccept: application/dialog-info+xml\r\n\
         Max-Forwards: 70\r\nUser-Agent: Yealink SIP-T46S 66.86.0.15\r\nExpires: {expires}\r\nEvent: dialog\r\n\
         {extra}Content-Length: 0\r\n\r\n"
    )
}

/// Subscribes `watcher` (user 2003) to `watched` for `expires` with proxy credentials (CSeq
/// `cseq` and the next); returns the final answer.
pub(crate) fn subscribed(
    watcher: &Ua,
    watched: &str,
    call_id: &str,
    cseq: u32,
    expires: u32,
) -> String {
    subscribed_as(
        ("2003", "pw-2003"),
        watcher,
        watched,
        call_id,
        cseq,
        expires,
    )
}

/// [`subscribed`] by user `me`.
fn subscribed_as(
    who: (&str, &str),
    watcher: &Ua,
    watched: &str,
    call_id: &str,
    cseq: u32,
    expires: u32,
) -> String {
    subscribed_for("dialog", who, watcher, (watched, call_id, cseq), expires)
}

/// A SUBSCRIBE of [`subscribe_as`] for another event package (`Event`, and `Accept` its type).
pub(crate) fn for_package(subscribe: String, package: &str) -> String {
    let accept = match package {
        "presence" => "application/pidf+xml",
        "dialog" => "application/dialog-info+xml",
        "message-summary" => "application/simple-message-summary",
        other => other,
    };
    subscribe
        .replace("Event: dialog\r\n", &format!("Event: {package}\r\n"))
        .replace(
            "Accept: application/dialog-info+xml\r\n",
            &format!("Accept: {accept}\r\n"),
        )
}

/// [`subscribed_as`] to `package`: `(watched, call_id, cseq)`.
pub(crate) fn subscribed_for(
    package: &str,
    (me, password): (&str, &str),
    watcher: &Ua,
    (watched, call_id, cseq): (&str, &str, u32),
    expires: u32,
) -> String {
    let uri = format!("sip:{watched}@{DOMAIN}");
    send_with_proxy_auth(
        watcher,
        DOMAIN,
        (me, password),
        ("SUBSCRIBE", &uri),
        |n, extra| {
            for_package(
                subscribe_as(me, watcher, watched, call_id, cseq + n - 1, expires, extra),
                package,
            )
        },
    );
    watcher
        .recv()
        .expect("an answer to the authenticated SUBSCRIBE")
}

#[test]
fn a_blf_key_follows_a_colleagues_call_from_ringing_to_hang_up() {
    let server = ward(&["2001", "2002", "2003"]);
    let callee = Ua::new(server.sip_addr());
    assert_eq!(
        status(&callee.register("2001", "pw-2001", DOMAIN, "reg-2001", "")),
        200
    );
    let watcher = Ua::new(server.sip_addr());
    let ok = subscribed(&watcher, "2001", "blf-1", 1, 1800);
    assert_eq!(status(&ok), 200, "{ok}");
    assert_eq!(header(&ok, "Expires"), Some("1800"), "{ok}");
    let (state, body) = next_notify(&watcher);
    assert_eq!(state, "active;expires=1800");
    assert!(
        body.contains("version=\"1\" state=\"full\" entity=\"sip:2001@ward.test\""),
        "{body}"
    );
    assert!(!body.contains("<dialog "), "idle: {body}");

    // 2002 calls 2001: the lamp blinks with what pickup needs.
    let caller = Ua::new(server.sip_addr());
    invite_authorized(&caller, DOMAIN, ("2002", "pw-2002"), "2001", "ward-call-1");
    let inv = expect(&callee, "INVITE ");
    answer(&callee, &inv, 180);
    let (_, body) = next_notify(&watcher);
    let info = dialog_info(&body);
    assert_eq!(info.version, 2, "{body}");
    let [d] = &info.dialogs[..] else {
        panic!("one dialog: {body}")
    };
    assert_eq!(
        (d.call_id.as_str(), d.state.as_str(), d.direction.as_str()),
        ("ward-call-1", "early", "recipient"),
        "{body}"
    );
    assert_eq!(d.local_tag, Some(format!("dev{}", callee.port())), "{body}");
    assert_eq!(d.remote_tag.as_deref(), Some("f-ward-call-1"), "{body}");
    assert_eq!(d.remote_identity, "sip:2002@ward.test", "{body}");
    // Answered, then hung up.
    answer(&callee, &inv, 200);
    let ok = expect(&caller, "SIP/2.0 200");
    let (_, body) = next_notify(&watcher);
    assert!(body.contains("<state>confirmed</state>"), "{body}");
    assert!(body.contains("version=\"3\""), "{body}");
    let to = header(&ok, "To").unwrap().to_string();
    let bye = in_dialog(
        &caller,
        "127.0.0.1",
        "BYE",
        &format!("sip:dev@127.0.0.1:{}", callee.port()),
        &route_set(&ok, true),
        (&format!("<sip:2002@{DOMAIN}>;tag=f-ward-call-1"), &to),
        "ward-call-1",
        3,
    );
    caller.send(&bye);
    let b = expect(&callee, "BYE ");
    answer(&callee, &b, 200);
    let (_, body) = next_notify(&watcher);
    assert!(body.contains("<state>terminated</state>"), "{body}");

    // A call cancelled while it rings ends the lamp too.
    let caller = Ua::new(server.sip_addr());
    let invite = invite_authorized(&caller, DOMAIN, ("2002", "pw-2002"), "2001", "ward-call-2");
    let inv = expect(&callee, "INVITE ");
    answer(&callee, &inv, 180);
    let (_, body) = next_notify(&watcher);
    assert!(
        body.contains("call-id=\"ward-call-2\"") && body.contains("<state>early</state>"),
        "{body}"
    );
    let cancel = careflow_proto::request::cancel_for(
        &careflow_proto::Message::parse(
            bytes::Bytes::from(invite),
            &careflow_proto::ParseLimits::default(),
        )
        .unwrap(),
    );
    caller.sock.send_to(&cancel, caller.server).unwrap();
    let c = expect(&callee, "CANCEL ");
    answer(&callee, &c, 200);
    answer(&callee, &inv, 487);
    let body = loop {
        let (_, body) = next_notify(&watcher);
        if body.contains("call-id=\"ward-call-2\"") && body.contains("<state>terminated</state>") {
            break body;
        }
    };
    assert!(!body.contains("<state>early</state>"), "{body}");

    // Unsubscribed: a last NOTIFY, terminated.
    let r = subscribed(&watcher, "2001", "blf-1", 3, 0);
    assert_eq!(status(&r), 200, "{r}");
    let n = expect(&watcher, "NOTIFY ");
    assert!(
        header(&n, "Subscription-State").is_some_and(|s| s.starts_with("terminated")),
        "{n}"
    );
    assert!(server.metric("careflow_sip_notifies_sent_total") >= 6);
}

#[test]
fn a_subscription_too_brief_gets_423_and_other_event_packages_489() {
    let server = ward(&["2001", "2003"]);
    let watcher = Ua::new(server.sip_addr());
    let r = subscribed(&watcher, "2001", "brief", 1, 10);
    assert_eq!(status(&r), 423, "{r}");
    assert_eq!(header(&r, "Min-Expires"), Some("60"), "{r}");
    // message-summary (voicemail) we do not serve: after the phone's credentials, 489 with the
    // packages we do (RFC 6665 §8.3.1), rather than its own devices getting it.
    let r = subscribed_for(
        "message-summary",
        ("2003", "pw-2003"),
        &watcher,
        ("2001", "mwi", 1),
        600,
    );
    assert_eq!(status(&r), 489, "{r}");
    assert_eq!(header(&r, "Allow-Events"), Some("dialog, presence"), "{r}");
}

/// The value of attribute `name` in `body`.
fn attr(body: &str, name: &str) -> String {
    let start = body
        .find(&format!(" {name}=\""))
        .unwrap_or_else(|| panic!("no {name} in {body}"))
        + name.len()
        + 3;
    body[start..]
        .split('"')
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_colleague_picks_up_a_ringing_call_from_the_blf_key() {
    let server = ward(&["2001", "2002", "2003"]);
    let callee = Ua::new(server.sip_addr());
    assert_eq!(
        status(&callee.register("2001", "pw-2001", DOMAIN, "reg-2001", "")),
        200
    );
    let watcher = Ua::new(server.sip_addr());
    assert_eq!(status(&subscribed(&watcher, "2001", "blf-p", 1, 1800)), 200);
    next_notify(&watcher);
    let caller = Ua::new(server.sip_addr());
    invite_authorized(&caller, DOMAIN, ("2002", "pw-2002"), "2001", "ward-pickup");
    let inv = expect(&callee, "INVITE ");
    answer(&callee, &inv, 180);
    let (_, body) = next_notify(&watcher);
    assert!(body.contains("<state>early</state>"), "{body}");
    // The clerk presses the blinking key: INVITE with Replaces built from the NOTIFY, as a
    // Yealink does (to-tag = the dialog's remote tag, from-tag = its local tag).
    let replaces = format!(
        "{};to-tag={};from-tag={}",
        attr(&body, "call-id"),
        attr(&body, "remote-tag"),
        attr(&body, "local-tag")
    );
    let picker = Ua::new(server.sip_addr());
    let port = picker.port();
    send_with_proxy_auth(
        &picker,
        DOMAIN,
        ("2003", "pw-2003"),
        ("INVITE", &format!("sip:2001@{DOMAIN}")),
        |cseq, extra| {
            format!(
                "INVITE sip:2001@{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKpick{cseq};rport\r\n\
                 Max-Forwards: 70\r\nFrom: <sip:2003@{DOMAIN}>;tag=pick\r\nTo: <sip:2001@{DOMAIN}>\r\nCall-ID: pickup-1\r\n\
                 CSeq: {cseq} INVITE\r\nContact: <sip:2003@127.0.0.1:{port}>\r\nReplaces: {replaces}\r\n{extra}Content-Length: 0\r\n\r\n"
            )
        },
    );
    // It reaches the caller's own device, which takes it instead of its ringing call.
    let take = expect(&caller, "INVITE ");
    assert!(
        take.starts_with(&format!("INVITE sip:2002@127.0.0.1:{} ", caller.port())),
        "{take}"
    );
    assert_eq!(header(&take, "Replaces"), Some(replaces.as_str()), "{take}");
    assert!(
        never_gets(&callee, "pickup-1"),
        "the picked-up phone rang again"
    );
    answer(&caller, &take, 200);
    let ok = expect(&picker, "SIP/2.0 200");
    assert!(ok.contains("Call-ID: pickup-1\r\n"), "{ok}");
    // Once the pickup is answered the colleague's phone stops ringing, whether or not the
    // caller's phone CANCELs its replaced INVITE itself; the caller's INVITE ends with 487.
    let cancel = expect(&callee, "CANCEL ");
    assert_eq!(
        header(&cancel, "Call-ID"),
        header(&inv, "Call-ID"),
        "{cancel}"
    );
    answer(&callee, &cancel, 200);
    answer(&callee, &inv, 487);
    let ended = expect(&caller, "SIP/2.0 487");
    assert_eq!(
        header(&ended, "Call-ID"),
        header(&inv, "Call-ID"),
        "{ended}"
    );
}

#[test]
fn a_replaces_for_a_call_we_do_not_know_is_routed_as_any_invite() {
    let server = ward(&["2001", "2003"]);
    let callee = Ua::new(server.sip_addr());
    assert_eq!(
        status(&callee.register("2001", "pw-2001", DOMAIN, "reg-2001", "")),
        200
    );
    let picker = Ua::new(server.sip_addr());
    let port = picker.port();
    send_with_proxy_auth(
        &picker,
        DOMAIN,
        ("2003", "pw-2003"),
        ("INVITE", &format!("sip:2001@{DOMAIN}")),
        |cseq, extra| {
            format!(
                "INVITE sip:2001@{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKxfer{cseq};rport\r\n\
                 Max-Forwards: 70\r\nFrom: <sip:2003@{DOMAIN}>;tag=x\r\nTo: <sip:2001@{DOMAIN}>\r\nCall-ID: transfer-1\r\n\
                 CSeq: {cseq} INVITE\r\nContact: <sip:2003@127.0.0.1:{port}>\r\nReplaces: other-call;to-tag=a;from-tag=b\r\n{extra}Content-Length: 0\r\n\r\n"
            )
        },
    );
    // An attended transfer's Replaces (a dialog the callee holds): delivered to the callee.
    let inv = expect(&callee, "INVITE ");
    assert!(
        inv.contains("Replaces: other-call;to-tag=a;from-tag=b"),
        "{inv}"
    );
}

/// No message of the call `call_id` reaches `ua` within half a second.
fn never_gets(ua: &Ua, call_id: &str) -> bool {
    ua.sock
        .set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    let mut never = true;
    while let Some(m) = ua.recv() {
        never &= !m.contains(&format!("Call-ID: {call_id}\r\n"));
    }
    ua.sock
        .set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .unwrap();
    never
}

#[test]
fn blf_groups_limit_who_may_watch_whom() {
    let server = Server::start_with(DOMAIN, &[("BLF_GROUPS", "ward7=2001,2002;icu=2003,2004")]);
    for u in ["2001", "2003", "2004"] {
        server.add_user(u, &format!("pw-{u}"));
    }
    let watcher = Ua::new(server.sip_addr());
    let r = subscribed(&watcher, "2001", "not-my-ward", 1, 600);
    assert_eq!(status(&r), 403, "{r}");
    let r = subscribed(&watcher, "2004", "my-ward", 1, 600);
    assert_eq!(status(&r), 200, "{r}");
}

#[test]
fn two_hundred_watchers_of_a_ringing_extension_get_their_notify_within_a_second() {
    const WATCHERS: usize = 200;
    let server = Server::start(DOMAIN);
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("ward.csv");
    let mut users = String::from("username,password\n2001,pw-2001\n2002,pw-2002\n");
    for i in 0..WATCHERS {
        users.push_str(&format!("w{i:03},pw-w{i:03}\n"));
    }
    std::fs::write(&csv, users).unwrap();
    let out = server.cli_ok(&["user", "import", csv.to_str().unwrap()]);
    assert!(out.contains(&format!("imported {}", WATCHERS + 2)), "{out}");
    let callee = Ua::new(server.sip_addr());
    assert_eq!(
        status(&callee.register("2001", "pw-2001", DOMAIN, "reg-2001", "")),
        200
    );
    let watchers: Vec<Ua> = (0..WATCHERS)
        .map(|i| {
            let w = Ua::new(server.sip_addr());
            let me = format!("w{i:03}");
            let r = subscribed_as(
                (&me, &format!("pw-{me}")),
                &w,
                "2001",
                &format!("many-{i}"),
                1,
                1800,
            );
            assert_eq!(status(&r), 200, "watcher {i}: {r}");
            next_notify(&w);
            w
        })
        .collect();
    let caller = Ua::new(server.sip_addr());
    invite_authorized(&caller, DOMAIN, ("2002", "pw-2002"), "2001", "many-watched");
    let inv = expect(&callee, "INVITE ");
    let rang = std::time::Instant::now();
    answer(&callee, &inv, 180);
    for (i, w) in watchers.iter().enumerate() {
        let (_, body) = next_notify(w);
        assert!(body.contains("<state>early</state>"), "watcher {i}: {body}");
    }
    let all = rang.elapsed();
    assert!(
        all < std::time::Duration::from_secs(1),
        "{WATCHERS} watchers took {all:?} to see the call ring"
    );
    eprintln!("{WATCHERS} watchers saw the call ring within {all:?}");
}

#[test]
fn dialling_the_pickup_code_and_an_extension_takes_its_ringing_call() {
    let server = ward(&["2001", "2002", "2003"]);
    let callee = Ua::new(server.sip_addr());
    assert_eq!(
        status(&callee.register("2001", "pw-2001", DOMAIN, "reg-2001", "")),
        200
    );
    // Nothing rings yet: 480.
    let picker = Ua::new(server.sip_addr());
    invite_authorized(&picker, DOMAIN, ("2003", "pw-2003"), "**2001", "code-early");
    let r = wait_final(&picker, "code-early");
    assert_eq!(status(&r), 480, "{r}");
    // A pickup is a call in the records too.
    assert_eq!(
        server.metric_becomes("careflow_sip_call_records_written_total", 1),
        1
    );
    let caller = Ua::new(server.sip_addr());
    invite_authorized(&caller, DOMAIN, ("2002", "pw-2002"), "2001", "ward-code");
    let inv = expect(&callee, "INVITE ");
    answer(&callee, &inv, 180);
    let picker = Ua::new(server.sip_addr());
    invite_authorized(&picker, DOMAIN, ("2003", "pw-2003"), "**2001", "code-pick");
    let take = expect(&caller, "INVITE ");
    assert!(take.contains("Call-ID: code-pick\r\n"), "{take}");
    assert_eq!(
        header(&take, "Replaces"),
        Some(format!("ward-code;to-tag=f-ward-code;from-tag=dev{}", callee.port()).as_str()),
        "the caller's own tag as to-tag, the ringing phone's as from-tag: {take}"
    );
    answer(&caller, &take, 200);
    assert!(expect(&picker, "SIP/2.0 200").contains("Call-ID: code-pick\r\n"));
    let cancel = expect(&callee, "CANCEL ");
    assert!(cancel.contains("Call-ID: ward-code\r\n"), "{cancel}");
}

/// The final answer of the call `call_id` at `ua`.
fn wait_final(ua: &Ua, call_id: &str) -> String {
    loop {
        let m = ua
            .recv()
            .unwrap_or_else(|| panic!("no answer for {call_id}"));
        if m.contains(&format!("Call-ID: {call_id}\r\n")) && status(&m) >= 200 {
            return m;
        }
    }
}

/// An in-dialog SUBSCRIBE (a refresh) of 2003 to the Contact `target` with the dialog's `to`.
pub(crate) fn refresh(
    watcher: &Ua,
    target: &str,
    to: &str,
    call_id: &str,
    cseq: u32,
    extra: &str,
) -> String {
    let port = watcher.port();
    format!(
        "SUBSCRIBE {target} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKref{call_id}{cseq};rport\r\n\
         From: \"Clerk\" <sip:2003@{DOMAIN}>;tag=blf-{call_id}\r\nTo: {to}\r\nCall-ID: {call_id}\r\n\
         CSeq: {cseq} SUBSCRIBE\r\nContact: <sip:2003@127.0.0.1:{port}>\r\nMax-Forwards: 70\r\n\
         Expires: 1800\r\nEvent: dialog\r\n{extra}Content-Length: 0\r\n\r\n"
    )
}

#[test]
fn a_refresh_to_our_contact_keeps_the_subscription_and_an_unknown_one_gets_481() {
    let server = ward(&["2001", "2003"]);
    let watcher = Ua::new(server.sip_addr());
    let ok = subscribed(&watcher, "2001", "refresh-1", 1, 1800);
    assert_eq!(status(&ok), 200, "{ok}");
    next_notify(&watcher);
    let contact = header(&ok, "Contact")
        .unwrap()
        .trim_matches(|c| c == '<' || c == '>')
        .to_string();
    assert!(contact.starts_with("sip:2001@127.0.0.1:"), "{contact}");
    let to = header(&ok, "To").unwrap().to_string();
    // The phone refreshes in the dialog, at the Contact we gave.
    send_with_proxy_auth(
        &watcher,
        DOMAIN,
        ("2003", "pw-2003"),
        ("SUBSCRIBE", &contact),
        |n, extra| refresh(&watcher, &contact, &to, "refresh-1", n + 2, extra),
    );
    let r = watcher.recv().expect("an answer to the refresh");
    assert_eq!(status(&r), 200, "{r}");
    let (state, body) = next_notify(&watcher);
    assert_eq!(state, "active;expires=1800");
    assert!(
        body.contains("entity=\"sip:2001@ward.test\""),
        "the same user watched: {body}"
    );
    // A refresh of a subscription we do not have (ended, or before a restart): 481, so the
    // phone subscribes again at once.
    send_with_proxy_auth(
        &watcher,
        DOMAIN,
        ("2003", "pw-2003"),
        ("SUBSCRIBE", &contact),
        |n, extra| {
            refresh(
                &watcher,
                &contact,
                "<sip:2001@ward.test>;tag=gone",
                "ghost",
                n,
                extra,
            )
        },
    );
    let r = watcher.recv().expect("an answer to the refresh");
    assert_eq!(status(&r), 481, "{r}");
}

#[test]
fn a_desk_phone_booting_with_sixty_blf_keys_is_not_taken_for_a_flood() {
    const KEYS: usize = 60;
    let server = Server::start(DOMAIN);
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("keys.csv");
    let mut users = String::from("username,password\n2003,pw-2003\n");
    for i in 0..KEYS {
        users.push_str(&format!("k{i:03},pw-k{i:03}\n"));
    }
    std::fs::write(&csv, users).unwrap();
    server.cli_ok(&["user", "import", csv.to_str().unwrap()]);
    // Off the test allow-list (127.0.0.1), so the per-flow flood limit applies: at boot every
    // key subscribes at once, each is challenged and sent again, each NOTIFY is answered.
    let phone = Ua::from_ip(server.sip_addr(), "127.0.0.61");
    for i in 0..KEYS {
        phone.send(&subscribe(
            &phone,
            &format!("k{i:03}"),
            &format!("boot-{i}"),
            1,
            1800,
            "",
        ));
    }
    let mut challenged = 0;
    let (mut subscribed, mut notified) = (
        std::collections::HashSet::new(),
        std::collections::HashSet::new(),
    );
    while subscribed.len() < KEYS || notified.len() < KEYS {
        let m = phone.recv().unwrap_or_else(|| {
            panic!(
                "{challenged} challenged, {} subscribed, {} notified:\n{}",
                subscribed.len(),
                notified.len(),
                server.log()
            )
        });
        let call_id = header(&m, "Call-ID").unwrap_or_default().to_string();
        if m.starts_with("NOTIFY ") {
            answer(&phone, &m, 200);
            notified.insert(call_id);
        } else if status(&m) == 407 {
            challenged += 1;
            let key = call_id
                .trim_start_matches("boot-")
                .parse::<usize>()
                .unwrap();
            let watched = format!("k{key:03}");
            let auth = authorization(
                &m,
                careflow_proto::digest::Algorithm::Md5,
                "2003",
                DOMAIN,
                "pw-2003",
                "SUBSCRIBE",
                &format!("sip:{watched}@{DOMAIN}"),
                1,
            );
            let extra = format!("Proxy-Authorization: {auth}\r\n");
            phone.send(&subscribe(&phone, &watched, &call_id, 2, 1800, &extra));
        } else if status(&m) == 200 {
            subscribed.insert(call_id);
        }
    }
    assert!(
        !server.log().contains("SECURITY banned"),
        "{}",
        server.log()
    );
}

/// A call between two sipp phones while a third, a BLF key replaying a Yealink T46S's
/// SUBSCRIBE, watches the callee: the bodies of the NOTIFYs sipp received (its message trace),
/// parsed as XML, follow the call: idle, early while it rings, then confirmed and terminated
/// on BYE (`answered`), or terminated with no confirmed when the caller CANCELs.
fn sipp_watches_a_sipp_call(answered: bool) {
    use std::process::{Command, Stdio};
    require("sipp", "sip-tester");
    let server = ward(&["2001", "2002", "2003"]);
    let tmp = tempfile::tempdir().unwrap();
    let callee_csv = crate::peers::sipp_file(tmp.path(), "callee.csv", &[("2001", "pw-2001")]);
    let caller_csv = crate::peers::sipp_file(tmp.path(), "caller.csv", &[("2002", "pw-2002")]);
    let uas_port = free_port();
    let uas = Command::new("sipp")
        .args([
            "-sf",
            &crate::peers::scenario(if answered {
                "uas-ring.xml"
            } else {
                "uas-ring-cancel.xml"
            }),
        ])
        .args(["-i", "127.0.0.1", "-p", &uas_port.to_string(), "-t", "u1"])
        .args(["-m", "1", "-nostdin", "-timeout", "40s", "-timeout_error"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sipp uas");
    crate::peers::register_contact(&server, &callee_csv, uas_port, "udp");

    let watch_csv = tmp.path().join("blf.csv");
    std::fs::write(
        &watch_csv,
        "SEQUENTIAL\n2003;[authentication username=2003 password=pw-2003]\n",
    )
    .unwrap();
    let trace = tmp.path().join("watch-messages.log");
    let watcher = Command::new("sipp")
        .arg(server.sip_addr().to_string())
        .args(["-sf", &crate::peers::scenario("blf-watch.xml")])
        .args(["-inf", watch_csv.to_str().unwrap()])
        .args(["-key", "domain", DOMAIN, "-key", "watched", "2001"])
        .args(["-auth_uri", &format!("2001@{DOMAIN}")])
        .args([
            "-i",
            "127.0.0.1",
            "-p",
            &free_port().to_string(),
            "-t",
            "u1",
        ])
        .args(["-m", "1", "-nostdin", "-timeout", "40s", "-timeout_error"])
        .args(["-trace_msg", "-message_file", trace.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sipp watcher");
    // Once the key holds its subscription (the notifier counted its first NOTIFY), the call.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server.metric("careflow_sip_notifies_sent_total") < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "sipp never subscribed:\n{}",
            server.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let call = Command::new("sipp")
        .arg(server.sip_addr().to_string())
        .args([
            "-sf",
            &crate::peers::scenario(if answered {
                "uac-call.xml"
            } else {
                "uac-cancel.xml"
            }),
        ])
        .args(["-inf", caller_csv.to_str().unwrap()])
        .args(["-key", "domain", DOMAIN, "-key", "callee", "2001"])
        .args(["-auth_uri", &format!("2001@{DOMAIN}")])
        .args([
            "-i",
            "127.0.0.1",
            "-p",
            &free_port().to_string(),
            "-t",
            "u1",
        ])
        .args(["-m", "1", "-d", "1000", "-nostdin", "-timeout", "30s"])
        .args(["-timeout_error"])
        .stdout(Stdio::null())
        .output()
        .expect("sipp caller");
    assert!(
        call.status.success(),
        "the sipp call failed ({}): {}\n{}",
        call.status,
        String::from_utf8_lossy(&call.stderr),
        server.log()
    );
    let watched = watcher.wait_with_output().expect("sipp watcher");
    assert!(
        watched.status.success(),
        "sipp's BLF key failed ({}): {}\n{}",
        watched.status,
        String::from_utf8_lossy(&watched.stderr),
        server.log()
    );
    let uas = uas.wait_with_output().expect("sipp uas");
    assert!(
        uas.status.success(),
        "sipp's callee failed: {}",
        String::from_utf8_lossy(&uas.stderr)
    );

    let trace = std::fs::read_to_string(&trace).expect("sipp's message trace");
    let notifies = sipp_received(&trace, "NOTIFY ");
    let infos: Vec<DialogInfo> = notifies
        .iter()
        .map(|n| {
            assert_eq!(header(n, "Event"), Some("dialog"), "{n}");
            dialog_info(n.split("\r\n\r\n").nth(1).unwrap_or_default())
        })
        .collect();
    let [idle, ..] = &infos[..] else {
        panic!("no NOTIFY in sipp's trace:\n{trace}")
    };
    assert!(idle.dialogs.is_empty(), "{trace}");
    assert!(
        infos.windows(2).all(|w| w[0].version < w[1].version),
        "versions must rise: {infos:?}"
    );
    let mut states: Vec<&str> = Vec::new();
    for d in infos.iter().flat_map(|i| &i.dialogs) {
        assert_eq!(d.direction, "recipient", "{d:?}");
        assert_eq!(d.remote_identity, format!("sip:2002@{DOMAIN}"), "{d:?}");
        assert!(d.local_tag.is_some() && d.remote_tag.is_some(), "{d:?}");
        if states.last() != Some(&d.state.as_str()) {
            states.push(&d.state);
        }
    }
    let want: &[&str] = if answered {
        &["early", "confirmed", "terminated"]
    } else {
        &["early", "terminated"]
    };
    assert_eq!(states, want, "{infos:?}");
}

/// The SIP messages a sipp message trace (`-trace_msg`) shows received that start with
/// `start`, with CRLF line ends.
fn sipp_received(trace: &str, start: &str) -> Vec<String> {
    trace
        .split("----------------------------------------------- ")
        .filter_map(|entry| {
            // A time stamp line, "UDP message received [N] bytes :", a blank line, the message.
            let (head, msg) = entry.split_once("\n\n")?;
            let msg = msg.trim_start_matches(['\r', '\n']);
            (head.contains("message received") && msg.starts_with(start)).then(|| {
                let msg = msg.replace("\r\n", "\n").replace('\n', "\r\n");
                msg.trim_end_matches(['\r', '\n']).to_string()
            })
        })
        .collect()
}

#[test]
fn sipp_as_a_blf_key_follows_a_sipp_call_from_ringing_to_hang_up() {
    sipp_watches_a_sipp_call(true);
}

#[test]
fn sipp_as_a_blf_key_sees_a_cancelled_call_end_without_being_answered() {
    sipp_watches_a_sipp_call(false);
}
