//! The ng client against a real rtpengine (Debian's rtpengine-daemon, userspace forwarding on
//! loopback): offer and answer rewrite SDP, RTP flows both ways through it, query counts the
//! packets, delete ends the session, a dead instance is reported.
#![allow(clippy::unwrap_used)]

use std::net::UdpSocket;
use std::time::Duration;

use careflow_core::media::{self, Leg, Sdp};
use careflow_server::rtpengine::{MediaError, RtpEngine};
use careflow_test_support::Rtpengine;
use tokio_util::sync::CancellationToken;

fn start_rtpengine() -> Rtpengine {
    Rtpengine::start(&[])
}

fn sdp(port: u16, proto: &str) -> String {
    format!(
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {port} {proto} 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
    )
}

fn media_port(sdp: &str) -> u16 {
    sdp.lines()
        .find(|l| l.starts_with("m=audio "))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap()
}

fn rtp(seq: u16) -> Vec<u8> {
    let mut p = vec![0x80, 0x00];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    p.extend_from_slice(&[0xff; 160]);
    p
}

/// An SDP from a plain phone at 127.0.0.1 in call `call_id`, offered by `offerer`.
fn from_phone<'a>(call_id: &'a str, offerer: &'a str, body: &'a str, to: Leg) -> Sdp<'a> {
    Sdp {
        call_id,
        offerer_tag: offerer,
        answerer_tag: None,
        body,
        sender: Leg::Plain,
        source: "127.0.0.1".parse().unwrap(),
        receiver: to,
        via_branch: None,
    }
}

#[tokio::test]
async fn offer_answer_rtp_both_ways_query_and_delete() {
    let d = start_rtpengine();
    let engine = RtpEngine::start(
        vec![d.ng_addr()],
        Duration::from_millis(500),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let caller = UdpSocket::bind("127.0.0.1:0").unwrap();
    let callee = UdpSocket::bind("127.0.0.1:0").unwrap();
    for s in [&caller, &callee] {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    }
    let call_id = "rtp-test-1";
    let offer_sdp = sdp(caller.local_addr().unwrap().port(), "RTP/AVP");
    let to_callee = engine
        .command(
            call_id,
            &media::offer(&from_phone(call_id, "caller-tag", &offer_sdp, Leg::Plain)),
        )
        .await
        .unwrap()
        .unwrap();
    let answer_sdp = sdp(callee.local_addr().unwrap().port(), "RTP/AVP");
    let to_caller = engine
        .command(
            call_id,
            &media::answer(&Sdp {
                answerer_tag: Some("callee-tag"),
                ..from_phone(call_id, "caller-tag", &answer_sdp, Leg::Plain)
            }),
        )
        .await
        .unwrap()
        .unwrap();
    let (xa, xb) = (media_port(&to_caller), media_port(&to_callee));
    assert_ne!(
        xa,
        caller.local_addr().unwrap().port(),
        "the caller must send to rtpengine"
    );
    // RTP both ways through the anchor.
    let mut buf = [0u8; 2048];
    for seq in 0..5u16 {
        caller.send_to(&rtp(seq), ("127.0.0.1", xa)).unwrap();
        let (n, _) = callee.recv_from(&mut buf).expect("caller -> callee");
        assert_eq!(n, 172);
        callee.send_to(&rtp(100 + seq), ("127.0.0.1", xb)).unwrap();
        let (n, _) = caller.recv_from(&mut buf).expect("callee -> caller");
        assert_eq!(n, 172);
    }
    let q = engine.query(call_id).await.unwrap();
    let text = String::from_utf8_lossy(&q.encode()).into_owned();
    assert!(text.contains("packets"), "{text}");
    engine.delete(call_id).await.unwrap();
    assert!(matches!(
        engine.query(call_id).await.map(|v| media::reply(&v)),
        Ok(media::Reply::Error(_))
    ));
}

#[tokio::test]
async fn a_browser_leg_gets_ice_and_dtls() {
    let d = start_rtpengine();
    let engine = RtpEngine::start(
        vec![d.ng_addr()],
        Duration::from_millis(500),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let call_id = "rtp-test-2";
    let out = engine
        .command(
            call_id,
            &media::offer(&from_phone(
                call_id,
                "desk",
                &sdp(4000, "RTP/AVP"),
                Leg::WebRtc,
            )),
        )
        .await
        .unwrap()
        .unwrap();
    assert!(out.contains("UDP/TLS/RTP/SAVPF"), "{out}");
    assert!(
        out.contains("a=ice-ufrag:") && out.contains("a=fingerprint:"),
        "{out}"
    );
    assert!(out.contains("a=rtcp-mux"), "{out}");
    engine.delete(call_id).await.unwrap();
}

#[tokio::test]
async fn a_dead_instance_is_reported_not_waited_on_forever() {
    let port = careflow_test_support::free_port();
    let engine = RtpEngine::start(
        vec![format!("127.0.0.1:{port}").parse().unwrap()],
        Duration::from_millis(100),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let body = sdp(4000, "RTP/AVP");
    let started = std::time::Instant::now();
    let r = engine
        .command(
            "dead",
            &media::offer(&from_phone("dead", "f", &body, Leg::Plain)),
        )
        .await;
    assert!(matches!(r, Err(MediaError::Timeout(_))), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Marked dead: the next call does not even try.
    let r = engine
        .command(
            "dead-2",
            &media::offer(&from_phone("dead-2", "f", &body, Leg::Plain)),
        )
        .await;
    assert_eq!(r, Err(MediaError::NoInstance));
}
