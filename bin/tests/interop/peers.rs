//! Driving the real peers the tests share: sipp (injection files, scenarios, registering a
//! sipp UA), baresip (a home directory per phone), JsSIP in Chromium (the CareFlow Web phone of
//! js/browser-phone.js), and a raw phone with plain RTP SDP.

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use crate::support::*;

pub(crate) fn sipp_file(
    dir: &std::path::Path,
    name: &str,
    users: &[(&str, &str)],
) -> std::path::PathBuf {
    let mut s = String::from("SEQUENTIAL\n");
    for (u, p) in users {
        s.push_str(&format!(
            "{u};{p};[authentication username={u} password={p}]\n"
        ));
    }
    let path = dir.join(name);
    std::fs::write(&path, s).unwrap();
    path
}

pub(crate) fn scenario(name: &str) -> String {
    interop_dir()
        .join("sipp")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// Registers the user of `users` (a sipp injection file) with sipp, on behalf of a UA at
/// 127.0.0.1:`contact_port` reached over `contact_transport`. The REGISTER goes over UDP: a TCP
/// registration would end with the registering process's connection, and its binding with it.
pub(crate) fn register_contact(
    server: &Server,
    users: &std::path::Path,
    contact_port: u16,
    contact_transport: &str,
) {
    let ok = register_contact_at(
        server.sip_addr(),
        &server.domain,
        users,
        contact_port,
        contact_transport,
    );
    assert!(ok, "registration of the sipp UA failed:\n{}", server.log());
}

/// As [`register_contact`], against any registrar; true when sipp's registration succeeded.
pub(crate) fn register_contact_at(
    registrar: SocketAddr,
    domain: &str,
    users: &std::path::Path,
    contact_port: u16,
    contact_transport: &str,
) -> bool {
    let reg = Command::new("sipp")
        .arg(registrar.to_string())
        .args(["-sf", &scenario("register-one.xml"), "-inf"])
        .arg(users)
        .args([
            "-key",
            "domain",
            domain,
            "-key",
            "contact_host",
            "127.0.0.1",
        ])
        .args(["-key", "contact_port", &contact_port.to_string()])
        .args(["-key", "contact_transport", contact_transport])
        .args(["-auth_uri", domain, "-i", "127.0.0.1"])
        .args(["-p", &free_port().to_string(), "-t", "u1"])
        .args(["-m", "1", "-nostdin", "-timeout", "15s", "-timeout_error"])
        .stdout(Stdio::null())
        .output()
        .expect("run sipp register");
    reg.status.success()
}

/// A baresip home whose account `aor` registers through `outbound` (a SIP URI, may name a
/// transport); `config_extra` lines go into its config file.
pub(crate) fn baresip_home_at(
    dir: &std::path::Path,
    aor: &str,
    password: &str,
    outbound: &str,
    extra: &str,
    config_extra: &str,
) {
    std::fs::create_dir_all(dir).unwrap();
    let tone = dir.join("tone.wav");
    // Ten seconds of 8 kHz silence as the audio source (baresip hangs up when it ends): no
    // sound card is needed.
    let mut wav = Vec::new();
    let data_len: u32 = 16000 * 10;
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data_len).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes());
    wav.extend_from_slice(&8000u32.to_le_bytes());
    wav.extend_from_slice(&16000u32.to_le_bytes());
    wav.extend_from_slice(&2u16.to_le_bytes());
    wav.extend_from_slice(&16u16.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&data_len.to_le_bytes());
    wav.resize(wav.len() + data_len as usize, 0);
    std::fs::write(&tone, wav).unwrap();
    let port = free_port_pair();
    std::fs::write(
        dir.join("config"),
        format!(
            "poll_method epoll\nsip_listen 127.0.0.1:{port}\n{config_extra}module_path /usr/lib/baresip/modules\nmodule g711.so\nmodule aufile.so\nmodule_app account.so\nmodule_app menu.so\naudio_player aufile,{out}\naudio_source aufile,{src}\naudio_alert aufile,{alert}\n",
            out = dir.join("out.wav").display(),
            src = tone.display(),
            alert = dir.join("alert.wav").display(),
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("accounts"),
        format!("{aor};auth_pass={password};outbound=\"{outbound}\";regint=300{extra}\n"),
    )
    .unwrap();
}

pub(crate) fn baresip_home(
    dir: &std::path::Path,
    user: &str,
    password: &str,
    proxy_port: u16,
    extra: &str,
) {
    baresip_home_at(
        dir,
        &format!("<sip:{user}@localhost>"),
        password,
        &format!("sip:127.0.0.1:{proxy_port}"),
        extra,
        "",
    );
}

/// alice (a raw UA) calls bob with a plain-RTP offer from port 4000 (answering the 407).
pub(crate) fn call_bob(alice: &Ua, password: &str, call_id: &str) -> String {
    let port = alice.port();
    let body = phone_sdp(4000);
    let invite = |cseq: u32, extra: &str| {
        format!(
            "INVITE sip:bob@localhost SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{call_id}{cseq};rport\r\nMax-Forwards: 70\r\nFrom: <sip:alice@localhost>;tag=alice-{call_id}\r\nTo: <sip:bob@localhost>\r\nCall-ID: {call_id}\r\nCSeq: {cseq} INVITE\r\nContact: <sip:alice@127.0.0.1:{port}>\r\n{extra}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    send_with_proxy_auth(
        alice,
        "localhost",
        ("alice", password),
        ("INVITE", "sip:bob@localhost"),
        invite,
    )
}

/// Answers a request a raw phone received with `code` and a plain RTP answer on `media_port`.
pub(crate) fn answer_with_sdp(ua: &Ua, request: &str, code: u16, media_port: u16) {
    answer_with(
        ua,
        request,
        code,
        Some(("application/sdp", &phone_sdp(media_port))),
    );
}

pub(crate) fn phone_sdp(port: u16) -> String {
    format!(
        "v=0\r\no=desk 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
    )
}

/// A port free for UDP and TCP whose successor is free too (baresip also binds port+1 for TLS).
pub(crate) fn free_port_pair() -> u16 {
    loop {
        let p = free_port();
        if p < 65535
            && std::net::UdpSocket::bind(("127.0.0.1", p + 1)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok()
        {
            return p;
        }
    }
}

/// The command that runs JsSIP in headless Chromium (js/browser-phone.js) as `aor` against
/// the WSS `url`, calling `target`; screenshots go to target/screenshots; `mode` selects a
/// scenario of the script ("media"), none is the signalling scenario.
pub(crate) fn browser_phone(
    url: &str,
    aor: &str,
    password: &str,
    target: &str,
    mode: Option<&str>,
) -> Command {
    require("chromium", "chromium");
    let shots = interop_dir().join("../../../target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let mut node = Command::new("node");
    node.current_dir(crate::websocket::js_dir())
        .arg("browser-phone.js")
        .args([url, aor, password, target])
        .arg(&shots);
    if let Some(mode) = mode {
        node.arg(mode);
    }
    node
}
