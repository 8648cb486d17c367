//! Call detail records (issue 20): calls of every disposition through the proxy, each becoming
//! exactly one record in the subscriber database (SQLite, PostgreSQL, MariaDB), read back
//! through `GET /api/admin/calls` with its filters and paging.

use serde_json::Value;

use crate::api::http;
use crate::cluster_link::{in_dialog, route_set};
use crate::support::*;

const DOMAIN: &str = "records.test";

fn records_server(db: Option<&TestDb>) -> (Server, String) {
    let env: Vec<(&str, &str)> = db
        .map(|d| vec![("DB_URL", d.url.as_str())])
        .unwrap_or_default();
    let server = Server::start_with(DOMAIN, &env);
    for u in ["2001", "2002"] {
        server.add_user(u, &format!("pw-{u}"));
    }
    let out = server.cli_ok(&["apikey", "create", "records"]);
    let key = out.lines().last().unwrap().trim().to_string();
    (server, key)
}

/// The calls `query` selects once `want` records were written.
fn calls(server: &Server, key: &str, query: &str, want: u64) -> Vec<Value> {
    server.metric_becomes("careflow_sip_call_records_written_total", want);
    let (code, _, page) = http(
        server,
        "GET",
        &format!("/api/admin/calls{query}"),
        Some(key),
        None,
    );
    assert_eq!(code, 200, "{page}\n{}", server.log());
    page["calls"].as_array().cloned().unwrap_or_default()
}

/// The one record of `call_id`.
fn record_of(server: &Server, key: &str, call_id: &str, written: u64) -> Value {
    let all = calls(server, key, "?limit=1000", written);
    let mine: Vec<&Value> = all.iter().filter(|c| c["callId"] == call_id).collect();
    assert_eq!(mine.len(), 1, "one record for {call_id}: {all:#?}");
    mine[0].clone()
}

fn registered(server: &Server, user: &str, reg: &str) -> Ua {
    let ua = Ua::new(server.sip_addr());
    let r = ua.register(user, &format!("pw-{user}"), DOMAIN, reg, "");
    assert_eq!(status(&r), 200, "{r}");
    ua
}

/// The final answer the caller gets for `call_id`.
fn final_of(ua: &Ua, call_id: &str) -> String {
    for _ in 0..20 {
        let m = ua
            .recv()
            .unwrap_or_else(|| panic!("no final for {call_id}"));
        if m.contains(&format!("Call-ID: {call_id}\r\n")) && status(&m) >= 200 {
            return m;
        }
    }
    panic!("no final for {call_id}")
}

/// Every disposition, one record each, on the database `db`.
fn every_disposition(db: Option<&TestDb>) {
    let (server, key) = records_server(db);
    let callee = registered(&server, "2001", "reg-a");
    let caller = Ua::new(server.sip_addr());

    // Answered, then hung up by the caller.
    invite_authorized(&caller, DOMAIN, ("2002", "pw-2002"), "2001", "rec-answered");
    let inv = expect(&callee, "INVITE ");
    answer(&callee, &inv, 180);
    answer(&callee, &inv, 200);
    let ok = expect(&caller, "SIP/2.0 200");
    let to = header(&ok, "To").unwrap().to_string();
    let bye = in_dialog(
        &caller,
        "127.0.0.1",
        "BYE",
        &format!("sip:dev@127.0.0.1:{}", callee.port()),
        &route_set(&ok, true),
        (&format!("<sip:2002@{DOMAIN}>;tag=f-rec-answered"), &to),
        "rec-answered",
        3,
    );
    caller.send(&bye);
    let b = expect(&callee, "BYE ");
    answer(&callee, &b, 200);
    let r = record_of(&server, &key, "rec-answered", 1);
    assert_eq!(r["disposition"], "answered", "{r:#}");
    assert_eq!(r["endedBy"], "caller", "{r:#}");
    assert_eq!(r["finalCode"], 200, "{r:#}");
    assert_eq!(r["caller"], format!("2002@{DOMAIN}"), "{r:#}");
    assert_eq!(r["callee"], format!("2001@{DOMAIN}"), "{r:#}");
    assert_eq!(r["dialled"], format!("sip:2001@{DOMAIN}"), "{r:#}");
    assert_eq!(r["callerDevice"]["transport"], "udp", "{r:#}");
    assert_eq!(
        r["callerDevice"]["source"],
        format!("127.0.0.1:{}", caller.port()),
        "{r:#}"
    );
    assert_eq!(
        r["answeredBy"]["contact"],
        format!("sip:dev@127.0.0.1:{}", callee.port()),
        "{r:#}"
    );
    let (inv_at, ring, ans, end) = (
        r["inviteAt"].as_u64().unwrap(),
        r["ringingAt"].as_u64().unwrap(),
        r["answeredAt"].as_u64().unwrap(),
        r["endedAt"].as_u64().unwrap(),
    );
    assert!(inv_at <= ring && ring <= ans && ans <= end, "{r:#}");
    assert_eq!(r["mediaAnchored"], false, "{r:#}");

    // Busy.
    let caller = Ua::new(server.sip_addr());
    invite_authorized(&caller, DOMAIN, ("2002", "pw-2002"), "2001", "rec-busy");
    let inv = expect(&callee, "INVITE ");
    answer(&callee, &inv, 486);
    assert_eq!(status(&final_of(&caller, "rec-busy")), 486);
    let r = record_of(&server, &key, "rec-busy", 2);
    assert_eq!(
        (&r["disposition"], &r["finalCode"], &r["talkSeconds"]),
        (&Value::from("busy"), &Value::from(486), &Value::from(0)),
        "{r:#}"
    );
    assert!(r["answeredBy"].is_null(), "{r:#}");

    // Cancelled by the caller while it rings.
    let caller = Ua::new(server.sip_addr());
    let invite = invite_authorized(&caller, DOMAIN, ("2002", "pw-2002"), "2001", "rec-cancel");
    let inv = expect(&callee, "INVITE ");
    answer(&callee, &inv, 180);
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
    let r = record_of(&server, &key, "rec-cancel", 3);
    assert_eq!(
        (&r["disposition"], &r["endedBy"]),
        (&Value::from("cancelled"), &Value::from("caller")),
        "{r:#}"
    );
    assert!(r["ringingAt"].is_u64(), "{r:#}");

    // An unknown user: failed, 404.
    let caller = Ua::new(server.sip_addr());
    invite_authorized(&caller, DOMAIN, ("2002", "pw-2002"), "9999", "rec-404");
    assert_eq!(status(&final_of(&caller, "rec-404")), 404);
    let r = record_of(&server, &key, "rec-404", 4);
    assert_eq!(
        (&r["disposition"], &r["finalCode"]),
        (&Value::from("failed"), &Value::from(404)),
        "{r:#}"
    );

    // Answered by the callee, who hangs up.
    let caller = Ua::new(server.sip_addr());
    invite_authorized(
        &caller,
        DOMAIN,
        ("2002", "pw-2002"),
        "2001",
        "rec-callee-bye",
    );
    let inv = expect(&callee, "INVITE ");
    answer(&callee, &inv, 200);
    let ok = expect(&caller, "SIP/2.0 200");
    let from = header(&inv, "From").unwrap().to_string();
    let to = header(&ok, "To").unwrap().to_string();
    let bye = in_dialog(
        &callee,
        "127.0.0.1",
        "BYE",
        &format!("sip:2002@127.0.0.1:{}", caller.port()),
        &route_set(&inv, false),
        (&to, &from),
        "rec-callee-bye",
        1,
    );
    callee.send(&bye);
    let b = expect(&caller, "BYE ");
    answer(&caller, &b, 200);
    let r = record_of(&server, &key, "rec-callee-bye", 5);
    assert_eq!(
        (&r["disposition"], &r["endedBy"]),
        (&Value::from("answered"), &Value::from("callee")),
        "{r:#}"
    );

    // Filters and paging.
    let busy = calls(&server, &key, "?disposition=busy", 5);
    assert_eq!(busy.len(), 1, "{busy:#?}");
    assert_eq!(busy[0]["callId"], "rec-busy");
    let mine = calls(&server, &key, &format!("?user=2002@{DOMAIN}"), 5);
    assert_eq!(mine.len(), 5, "{mine:#?}");
    assert!(calls(&server, &key, "?user=nobody@records.test", 5).is_empty());
    let (code, _, page) = http(&server, "GET", "/api/admin/calls?limit=2", Some(&key), None);
    assert_eq!(code, 200);
    let next = page["next"].as_i64().expect("a next page");
    let (_, _, page2) = http(
        &server,
        "GET",
        &format!("/api/admin/calls?limit=2&before={next}"),
        Some(&key),
        None,
    );
    let ids = |p: &Value| -> Vec<i64> {
        p["calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_i64().unwrap())
            .collect()
    };
    let (a, b) = (ids(&page), ids(&page2));
    assert_eq!((a.len(), b.len()), (2, 2), "{page:#}\n{page2:#}");
    assert!(a[1] > b[0], "newest first, no overlap: {a:?} {b:?}");
    let (code, _, p) = http(
        &server,
        "GET",
        "/api/admin/calls?disposition=lost",
        Some(&key),
        None,
    );
    assert_eq!(
        (code, p["field"].as_str()),
        (400, Some("disposition")),
        "{p}"
    );
    let (code, _, _) = http(&server, "GET", "/api/admin/calls", None, None);
    assert_eq!(code, 401);

    // Exports: every record, streamed, as CSV and as JSON Lines.
    let (code, head, csv) = download(&server, &key, "/api/admin/calls/export?format=csv");
    assert_eq!(code, 200, "{head}\n{csv}");
    assert!(
        head.contains("text/csv") && head.contains("careflow-calls.csv"),
        "{head}"
    );
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 6, "a header and 5 calls: {csv}");
    assert!(lines[0].starts_with("id,call_id,node,caller,"), "{csv}");
    let busy_row = lines
        .iter()
        .find(|l| l.contains(",rec-busy,"))
        .expect("the busy call");
    assert!(busy_row.contains(",busy,486,"), "{busy_row}");
    let (code, head, jsonl) = download(
        &server,
        &key,
        "/api/admin/calls/export?format=jsonl&disposition=answered",
    );
    assert_eq!(code, 200, "{head}");
    assert!(head.contains("application/jsonl"), "{head}");
    let ids: Vec<String> = jsonl
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["callId"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids, ["rec-callee-bye", "rec-answered"], "{jsonl}");
    let (code, _, _) = download(&server, &key, "/api/admin/calls/export?format=xml");
    assert_eq!(code, 400);
}

/// A GET with the admin key over HTTP/1.0 (so the streamed body needs no de-chunking):
/// (status, head, body).
pub(crate) fn download(server: &Server, key: &str, path: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", server.http)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_string(), body.to_string())
}

#[test]
fn every_disposition_makes_one_record_on_sqlite() {
    every_disposition(None);
}

#[test]
fn every_disposition_makes_one_record_on_postgresql() {
    every_disposition(Some(&TestDb::postgres()));
}

#[test]
fn every_disposition_makes_one_record_on_mariadb() {
    every_disposition(Some(&TestDb::mariadb()));
}

#[test]
fn a_forked_call_answered_on_the_second_device_is_one_record_naming_it() {
    let (server, key) = records_server(None);
    let desk = registered(&server, "2001", "reg-desk");
    let mobile = registered(&server, "2001", "reg-mobile");
    let caller = Ua::new(server.sip_addr());
    invite_authorized(&caller, DOMAIN, ("2002", "pw-2002"), "2001", "rec-fork");
    let on_desk = expect(&desk, "INVITE ");
    let on_mobile = expect(&mobile, "INVITE ");
    answer(&desk, &on_desk, 180);
    answer(&mobile, &on_mobile, 200);
    let ok = expect(&caller, "SIP/2.0 200");
    let c = expect(&desk, "CANCEL ");
    answer(&desk, &c, 200);
    answer(&desk, &on_desk, 487);
    // Nothing is written before the call ends.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(server.metric("careflow_sip_call_records_written_total"), 0);
    let bye = in_dialog(
        &caller,
        "127.0.0.1",
        "BYE",
        &format!("sip:dev@127.0.0.1:{}", mobile.port()),
        &route_set(&ok, true),
        (
            &format!("<sip:2002@{DOMAIN}>;tag=f-rec-fork"),
            header(&ok, "To").unwrap(),
        ),
        "rec-fork",
        3,
    );
    caller.send(&bye);
    let b = expect(&mobile, "BYE ");
    answer(&mobile, &b, 200);
    let r = record_of(&server, &key, "rec-fork", 1);
    assert_eq!(r["disposition"], "answered", "{r:#}");
    assert_eq!(
        r["answeredBy"]["contact"],
        format!("sip:dev@127.0.0.1:{}", mobile.port()),
        "the second device answered: {r:#}"
    );
}

#[test]
fn a_clinician_sees_their_own_recent_calls_and_no_one_elses() {
    let idp = crate::api::IdentityProvider::start();
    let server = crate::api::api_server_on(&idp, None);
    let token = idp.token("uid-calls", |_| {});
    let (code, _, creds) = http(&server, "POST", "/api/sip/register", Some(&token), None);
    assert_eq!(code, 201, "{creds}");
    let user = creds["sipUsername"].as_str().unwrap().to_string();
    let password = creds["sipPassword"].as_str().unwrap().to_string();
    server.add_user("ward-desk", "pw-ward-desk");
    let desk = Ua::new(server.sip_addr());
    let r = desk.register("ward-desk", "pw-ward-desk", "localhost", "reg-desk", "");
    assert_eq!(status(&r), 200, "{r}");
    let phone = Ua::new(server.sip_addr());
    invite_authorized(
        &phone,
        "localhost",
        (&user, &password),
        "ward-desk",
        "mine-1",
    );
    let inv = expect(&desk, "INVITE ");
    answer(&desk, &inv, 486);
    server.metric_becomes("careflow_sip_call_records_written_total", 1);
    // A call between two others.
    server.add_user("other", "pw-other");
    let other = Ua::new(server.sip_addr());
    invite_authorized(
        &other,
        "localhost",
        ("other", "pw-other"),
        "ward-desk",
        "not-mine",
    );
    let inv = expect(&desk, "INVITE ");
    answer(&desk, &inv, 486);
    server.metric_becomes("careflow_sip_call_records_written_total", 2);

    let (code, _, page) = http(&server, "GET", "/api/sip/calls", Some(&token), None);
    assert_eq!(code, 200, "{page}");
    let calls = page["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{page:#}");
    assert_eq!(calls[0]["callId"], "mine-1");
    assert_eq!(calls[0]["disposition"], "busy");
    let stranger = idp.token("uid-no-account", |_| {});
    let (code, _, _) = http(&server, "GET", "/api/sip/calls", Some(&stranger), None);
    assert_eq!(code, 404);
    let (code, _, p) = http(
        &server,
        "GET",
        "/api/sip/calls?limit=500",
        Some(&token),
        None,
    );
    assert_eq!((code, p["field"].as_str()), (400, Some("limit")), "{p}");
}

/// One sipp call through the server: a sipp callee running `uas` registered as 2001, a sipp
/// caller (2002) running `uac`; both must finish their scenario.
fn sipp_call(server: &Server, uac: &str, uas: &str, pause_ms: u32) {
    use std::process::{Command, Stdio};
    let tmp = tempfile::tempdir().unwrap();
    let callee = crate::peers::sipp_file(tmp.path(), "callee.csv", &[("2001", "pw-2001")]);
    let caller = crate::peers::sipp_file(tmp.path(), "caller.csv", &[("2002", "pw-2002")]);
    let uas_port = free_port();
    let callee_sipp = Command::new("sipp")
        .args(["-sf", &crate::peers::scenario(uas)])
        .args(["-i", "127.0.0.1", "-p", &uas_port.to_string(), "-t", "u1"])
        .args(["-m", "1", "-nostdin", "-timeout", "60s", "-timeout_error"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sipp callee");
    crate::peers::register_contact(server, &callee, uas_port, "udp");
    let call = Command::new("sipp")
        .arg(server.sip_addr().to_string())
        .args(["-sf", &crate::peers::scenario(uac)])
        .args(["-inf", caller.to_str().unwrap()])
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
        .args(["-m", "1", "-d", &pause_ms.to_string(), "-nostdin"])
        .args(["-timeout", "60s", "-timeout_error"])
        .stdout(Stdio::null())
        .output()
        .expect("sipp caller");
    assert!(
        call.status.success(),
        "the sipp caller ({uac}) failed: {}\n{}",
        String::from_utf8_lossy(&call.stderr),
        server.log()
    );
    let callee_out = callee_sipp.wait_with_output().expect("sipp callee");
    assert!(
        callee_out.status.success(),
        "the sipp callee ({uas}) failed: {}",
        String::from_utf8_lossy(&callee_out.stderr)
    );
}

/// Another program holds the database's write lock (the CLI importing users, an operator's
/// `sqlite3` shell) while a call ends: its record waits for the lock, SIP traffic does not,
/// and the record is written once the lock is gone. Writes once ran on the runtime's worker
/// and held every SIP message for as long as they waited (up to `busy_timeout`, 5 s).
#[test]
fn a_database_locked_by_another_program_holds_up_no_sip_traffic_and_loses_no_record() {
    require("sipp", "sip-tester");
    let (server, key) = records_server(None);
    let other = rusqlite::Connection::open(server.data_dir().join("careflow.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    sipp_call(&server, "uac-hung-up.xml", "uas-hangup.xml", 0);
    // Past the records' 100 ms gathering: their write is waiting for the lock.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let started = std::time::Instant::now();
    for i in 0..3 {
        let ua = Ua::new(server.sip_addr());
        let r = ua.register("2002", "pw-2002", DOMAIN, &format!("locked-{i}"), "");
        assert_eq!(status(&r), 200, "{r}\n{}", server.log());
    }
    let took = started.elapsed();
    assert_eq!(
        server.metric("careflow_sip_call_records_written_total"),
        0,
        "the record was written although the database was locked"
    );
    assert!(
        took < std::time::Duration::from_secs(2),
        "three registrations took {took:?} while the database was locked\n{}",
        server.log()
    );
    other.execute_batch("COMMIT").unwrap();
    let all = calls(&server, &key, "?limit=10", 1);
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(all[0]["disposition"], "answered", "{all:#?}");
}

#[test]
fn sipp_calls_of_every_disposition_make_one_record_each_on_sqlite() {
    sipp_dispositions(None);
}

#[test]
fn sipp_calls_of_every_disposition_make_one_record_each_on_postgresql() {
    sipp_dispositions(Some(&TestDb::postgres()));
}

#[test]
fn sipp_calls_of_every_disposition_make_one_record_each_on_mariadb() {
    sipp_dispositions(Some(&TestDb::mariadb()));
}

/// sipp phones place calls of every disposition; each is one record with what happened.
fn sipp_dispositions(db: Option<&TestDb>) {
    require("sipp", "sip-tester");
    // Timer C at 3 s: a call nobody answers is given up quickly.
    let mut env = vec![("TIMER_C", "3")];
    if let Some(d) = db {
        env.push(("DB_URL", d.url.as_str()));
    }
    let server = Server::start_with(DOMAIN, &env);
    for u in ["2001", "2002"] {
        server.add_user(u, &format!("pw-{u}"));
    }
    let out = server.cli_ok(&["apikey", "create", "records"]);
    let key = out.lines().last().unwrap().trim().to_string();
    let cases: [(&str, &str, u32, &str, u16, &str); 6] = [
        (
            "uac-hung-up.xml",
            "uas-hangup.xml",
            0,
            "answered",
            200,
            "callee",
        ),
        (
            "uac-call.xml",
            "uas-ring.xml",
            1000,
            "answered",
            200,
            "caller",
        ),
        ("uac-refused.xml", "uas-busy.xml", 0, "busy", 486, "network"),
        (
            "uac-cancel.xml",
            "uas-ring-cancel.xml",
            500,
            "cancelled",
            487,
            "caller",
        ),
        // Ringing until Timer C: the proxy CANCELs the branch and answers 408.
        (
            "uac-refused.xml",
            "uas-ring-cancel.xml",
            0,
            "no_answer",
            408,
            "network",
        ),
        // A number nobody has.
        ("uac-refused.xml", "", 0, "failed", 404, "network"),
    ];
    for (i, (uac, uas, pause, disposition, code, ended_by)) in cases.iter().enumerate() {
        if uas.is_empty() {
            unknown_number(&server);
        } else {
            sipp_call(&server, uac, uas, *pause);
        }
        let written = i as u64 + 1;
        let page = calls(&server, &key, "?limit=1", written);
        let r = &page[0];
        assert_eq!(
            (
                r["disposition"].as_str().unwrap(),
                r["finalCode"].as_u64().unwrap(),
                r["endedBy"].as_str().unwrap()
            ),
            (*disposition, u64::from(*code), *ended_by),
            "{uac} against {uas}: {r:#}"
        );
        assert_eq!(r["callerDevice"]["transport"], "udp", "{r:#}");
        if *disposition == "answered" {
            assert!(r["talkSeconds"].as_u64().unwrap() >= 1, "{r:#}");
            assert!(r["answeredBy"]["contact"].is_string(), "{r:#}");
            assert!(r["ringingAt"].is_u64(), "{r:#}");
        }
        assert_eq!(
            calls(&server, &key, "?limit=1000", written).len() as u64,
            written,
            "one record per call"
        );
    }
}

/// A sipp call to a number nobody has: 404.
fn unknown_number(server: &Server) {
    use std::process::{Command, Stdio};
    let tmp = tempfile::tempdir().unwrap();
    let caller = crate::peers::sipp_file(tmp.path(), "caller.csv", &[("2002", "pw-2002")]);
    let call = Command::new("sipp")
        .arg(server.sip_addr().to_string())
        .args(["-sf", &crate::peers::scenario("uac-refused.xml")])
        .args(["-inf", caller.to_str().unwrap()])
        .args(["-key", "domain", DOMAIN, "-key", "callee", "9999"])
        .args(["-auth_uri", &format!("9999@{DOMAIN}")])
        .args([
            "-i",
            "127.0.0.1",
            "-p",
            &free_port().to_string(),
            "-t",
            "u1",
        ])
        .args(["-m", "1", "-nostdin", "-timeout", "30s", "-timeout_error"])
        .stdout(Stdio::null())
        .output()
        .expect("sipp caller");
    assert!(
        call.status.success(),
        "the call to an unknown number failed otherwise: {}",
        String::from_utf8_lossy(&call.stderr)
    );
}
