//! §3.1.2: invalid messages are refused by `parse` or `validate`.

use careflow_proto::{HeaderName, Message, NameAddr, ParseErrorKind, ParseLimits};

use super::*;

#[test]
fn invalid_messages_are_refused() {
    use ParseErrorKind as K;
    // 3.1.2.1 badinv01: extraneous header field separators / missing To.
    // clerr: Content-Length larger than the body.
    assert_eq!(
        invalid(
            "INVITE sip:user@example.com SIP/2.0
Max-Forwards: 80
To: sip:j.user@example.com
From: sip:caller@example.net;tag=93942939o2
Contact: <sip:caller@hungry.example.net>
Call-ID: clerr.0ha0isndaksdjweiafasdk3
CSeq: 8 INVITE
Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bK-39234-23523
Content-Type: application/sdp
Content-Length: 9999

v=0
"
        ),
        K::BadContentLength
    );
    // scalar02: overlarge values.
    assert_eq!(
        invalid(
            "REGISTER sip:example.com SIP/2.0
Via: SIP/2.0/TCP host129.example.com;branch=z9hG4bK342sdfoi3
To: <sip:user@example.com>
From: <sip:user@example.com>;tag=239232jh3
CSeq: 36893488147419103232 REGISTER
Call-ID: scalar02.23o0pd9vanlq3wnrlnewofjas9ui32
Max-Forwards: 300
Expires: 1000000000000000000000000000000000000000
Contact: <sip:user@host129.example.com>
  ;expires=280297596632815
Content-Length: 0

"
        ),
        K::BadHeaderValue
    );
    // ltgtruri: Request-URI in angle brackets.
    assert_eq!(
        invalid(
            "INVITE <sip:user@example.com> SIP/2.0
To: sip:user@example.com
From: sip:caller@example.net;tag=39291
Max-Forwards: 23
Call-ID: ltgtruri.1@192.0.2.5
CSeq: 1 INVITE
Via: SIP/2.0/UDP 192.0.2.5
l: 0

"
        ),
        K::BadRequestUri
    );
    // lwsruri: whitespace inside the Request-URI.
    assert_eq!(
        invalid(
            "INVITE sip:user@example.com; lr SIP/2.0
To: sip:user@example.com;tag=3xfe-9921883-z9f
From: sip:caller@example.net;tag=231413434
Max-Forwards: 5
Call-ID: lwsruri.asdfasdoeoi2323-asdfwrn23-asd834rk423
CSeq: 2130706432 INVITE
Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKkdjuw2395
l: 0

"
        ),
        K::BadRequestUri
    );
    // lwsstart: several spaces in the request line.
    assert!(matches!(
        invalid(
            "INVITE  sip:user@example.com  SIP/2.0
Max-Forwards: 8
To: sip:user@example.com
From: sip:caller@example.net;tag=8814
Call-ID: lwsstart.dfknq234oi243099adsdfnawe3@example.com
CSeq: 1893884 INVITE
Via: SIP/2.0/UDP host1.example.com;branch=z9hG4bKkdjuw3923
l: 0

"
        ),
        K::BadRequestUri | K::BadStartLine
    ));
    // badaspec: spaces inside <>.
    assert_eq!(
        invalid(
            "OPTIONS sip:user@example.org SIP/2.0
Via: SIP/2.0/UDP host4.example.com:5060;branch=z9hG4bKkdju43234
Max-Forwards: 70
From: \"Bell, Alexander\" <sip:a.g.bell@example.com>;tag=433423
To: \"Watson, Thomas\" < sip:t.watson@example.org >
Call-ID: badaspec.sdf0234n2nds0a099u23h3hnnw009cdkne3
Accept: application/sdp
CSeq: 3923239 OPTIONS
l: 0

"
        ),
        K::BadHeaderValue
    );
    // quotbal: unbalanced quotes in the display name.
    assert_eq!(
        invalid(
            "INVITE sip:user@example.com SIP/2.0
To: \"Mr. J. User <sip:j.user@example.com>
From: sip:caller@example.net;tag=93334
Max-Forwards: 10
Call-ID: quotbal.aksdj
Contact: <sip:caller@host59.example.net>
CSeq: 8 INVITE
Via: SIP/2.0/UDP 192.0.2.59:5050;branch=z9hG4bKkdjuw39234
Content-Length: 0

"
        ),
        K::BadHeaderValue
    );
    // badvers: unknown protocol version gets 505.
    assert_eq!(
        invalid(
            "OPTIONS sip:t.watson@example.org SIP/7.0
Via:     SIP/7.0/UDP c.example.com;branch=z9hG4bKkdjuw
Max-Forwards:     70
From:    A. Bell <sip:a.g.bell@example.com>;tag=qweoiqpe
To:      T. Watson <sip:t.watson@example.org>
Call-ID: badvers.31417@c.example.com
CSeq:    1 OPTIONS
l: 0

"
        ),
        K::UnsupportedVersion
    );
    // mismatch01: CSeq method differs from request method.
    assert_eq!(
        invalid(
            "OPTIONS sip:user@example.com SIP/2.0
To: sip:j.user@example.com
From: sip:caller@example.net;tag=34525
Max-Forwards: 6
Call-ID: mismatch01.dj0234sxdfl3
CSeq: 8 INVITE
Via: SIP/2.0/UDP host.example.com;branch=z9hG4bKkdjuw
l: 0

"
        ),
        K::CSeqMismatch
    );
    // multi01: several To/From/Call-ID headers.
    assert_eq!(
        invalid(
            "INVITE sip:user@company.com SIP/2.0
Contact: <sip:caller@host25.example.net>
Via: SIP/2.0/UDP 192.0.2.25;branch=z9hG4bKkdjuw
Max-Forwards: 70
CSeq: 5 INVITE
Call-ID: multi01.98asdh@192.0.2.1
CSeq: 59 INVITE
Call-ID: multi01.98asdh@192.0.2.2
From: sip:caller@example.com;tag=3413415
To: sip:user@example.com
To: sip:other@example.net
From: sip:caller@example.net;tag=2923420123
Content-Length: 0

"
        ),
        K::DuplicateHeader
    );
    // mcl01: conflicting Content-Lengths.
    assert_eq!(
        invalid(
            "OPTIONS sip:user@example.com SIP/2.0
Via: SIP/2.0/UDP host5.example.net;branch=z9hG4bK293423
To: sip:user@example.com
From: sip:other@example.net;tag=3923942
Call-ID: mcl01.fhn2323orihawfdoa3o4r52o3irsdf
CSeq: 15932 OPTIONS
Content-Length: 13
Max-Forwards: 60
Content-Length: 5
Content-Type: text/plain

There's no way to know how many octets are supposed to be here.
"
        ),
        K::BadContentLength
    );
    // missing mandatory headers (RFC 4475 3.1.2.x "insuf").
    assert_eq!(
        invalid(
            "INVITE sip:user@example.com SIP/2.0
CSeq: 193942 INVITE
Via: SIP/2.0/UDP 192.0.2.95;branch=z9hG4bKkdj.insuf
Content-Type: application/sdp
l: 0

"
        ),
        K::MissingHeader
    );
}

#[test]
fn garbage_is_refused_without_panicking() {
    for s in [
        "",
        "\r\n",
        "garbage",
        "SIP/2.0 99 x\r\n\r\n",
        "INVITE\r\n\r\n",
        "SIP/2.0 abc OK\r\n\r\n",
    ] {
        let r = Message::parse(Bytes::from(s), &ParseLimits::default());
        assert!(r.is_err() || r.unwrap().validate().is_err(), "{s:?}");
    }
    // Found by cargo fuzz: a multi-byte character where the SIP version starts.
    let r = Message::parse(
        Bytes::from_static("A b xyz\u{4cd}\r\n\r\n".as_bytes()),
        &ParseLimits::default(),
    );
    assert!(r.is_err() || r.unwrap().validate().is_err());
    let big = "x".repeat(70_000);
    assert_eq!(
        Message::parse(Bytes::from(big), &ParseLimits::default())
            .unwrap_err()
            .kind,
        ParseErrorKind::TooLarge
    );
}

/// RFC 4475 §3.1.2: the remaining invalid messages.
#[test]
fn more_invalid_messages() {
    use ParseErrorKind as K;
    // 3.1.2.1 badinv01: extraneous separators in Via.
    assert_eq!(
        invalid(
            "INVITE sip:user@example.com SIP/2.0
To: sip:j.user@example.com
From: sip:caller@example.net;tag=134161461246
Max-Forwards: 7
Call-ID: badinv01.0ha0isndaksdjasdf3234nas
CSeq: 8 INVITE
Via: SIP/2.0/UDP 192.0.2.15;;,;,,
Contact: \"Joe\" <sip:joe@example.org>;;;;
Content-Length: 0
Content-Type: application/sdp

"
        ),
        K::BadHeaderValue
    );
    // 3.1.2.3 ncl: negative Content-Length.
    assert_eq!(
        invalid(
            "INVITE sip:user@example.com SIP/2.0
Max-Forwards: 254
To: sip:j.user@example.com
From: sip:caller@example.net;tag=32394234
Call-ID: ncl.0ha0isndaksdj2193423r542w35
CSeq: 0 INVITE
Via: SIP/2.0/UDP 192.0.2.53;branch=z9hG4bKkdjuw
Contact: <sip:caller@example53.example.net>
Content-Type: application/sdp
Content-Length: -999

v=0
"
        ),
        K::BadContentLength
    );
    // 3.1.2.5 scalarlg: a response with overlarge scalars is invalid (and is dropped).
    assert_eq!(
        invalid(
            "SIP/2.0 503 Service Unavailable
Via: SIP/2.0/TCP host129.example.com;branch=z9hG4bKzzxdiwo34sw;received=192.0.2.129
To: <sip:user@example.com>
From: <sip:other@example.net>;tag=2easdjfejw
CSeq: 9292394834772304023312 OPTIONS
Call-ID: scalarlg.noase0of0234hn2qofoaf0232aewf2394r
Retry-After: 949302838503028349304023988
Warning: 1812 overture \"In Progress\"
Content-Length: 0

"
        ),
        K::BadHeaderValue
    );
    // 3.1.2.10 trws: spaces after SIP/2.0 in the request line.
    assert_eq!(
        invalid(
            "OPTIONS sip:remote-target@example.com SIP/2.0  
Via: SIP/2.0/TCP host1.example.com;branch=z9hG4bK299342093
To: <sip:remote-target@example.com>
From: <sip:local-resource@example.com>;tag=329429089
Call-ID: trws.oicu34958239neffasdhr2345r
Accept: application/sdp
CSeq: 238923 OPTIONS
Max-Forwards: 70
Content-Length: 0

"
        ),
        K::BadStartLine
    );
    // 3.1.2.11 escruri: headers in the Request-URI.
    assert_eq!(
        invalid(
            "INVITE sip:user@example.com?Route=%3Csip:example.com%3E SIP/2.0
To: sip:user@example.com
From: sip:caller@example.net;tag=341518
Max-Forwards: 7
Contact: <sip:caller@host39923.example.net>
Call-ID: escruri.23940-asdfhj-aje3br-234q098w-fawerh2q-h4n5
CSeq: 149209342 INVITE
Via: SIP/2.0/UDP host-of-the-hour.example.com;branch=z9hG4bKkdjuw
Content-Length: 0

"
        ),
        K::BadRequestUri
    );
    // 3.1.2.15 baddn: non-token characters in an unquoted display name.
    assert_eq!(
        invalid(
            "OPTIONS sip:t.watson@example.org SIP/2.0
Via:     SIP/2.0/UDP c.example.com:5060;branch=z9hG4bKkdjuw
Max-Forwards:      70
From:    Bell, Alexander <sip:a.g.bell@example.com>;tag=43
To:      Watson, Thomas <sip:t.watson@example.org>
Call-ID: baddn.31415@c.example.com
Accept: application/sdp
CSeq:    3923239 OPTIONS
l: 0

"
        ),
        K::BadHeaderValue
    );
    // 3.1.2.18 mismatch02: unknown method, CSeq says INVITE.
    assert_eq!(
        invalid(
            "NEWMETHOD sip:user@example.com SIP/2.0
To: sip:j.user@example.com
From: sip:caller@example.net;tag=34525
Max-Forwards: 6
Call-ID: mismatch02.dj0234sxdfl3
CSeq: 8 INVITE
Contact: <sip:caller@host.example.net>
Via: SIP/2.0/UDP host.example.net;branch=z9hG4bKkdjuw
l: 0

"
        ),
        K::CSeqMismatch
    );
    // 3.1.2.19 bigcode: a status code that is not three digits.
    assert_eq!(
        invalid(
            "SIP/2.0 4294967301 better not break the receiver
Via: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2398ndaoe
Call-ID: bigcode.asdof3uj203asdnf3429uasdhfas3ehjasdfas9i
CSeq: 353494 INVITE
From: <sip:user@example.com>;tag=39ansfi3
To: <sip:user@example.edu>;tag=902jndnke3
Content-Length: 0
Contact: <sip:user@host105.example.com>

"
        ),
        K::BadStartLine
    );
}

/// 3.1.2.13 regbadct: a Contact with escaped headers must be enclosed in <>; the message
/// parses, and the registrar refuses the Contact value.
#[test]
fn regbadct_contact_is_refused() {
    let m = valid(
        "REGISTER sip:example.com SIP/2.0
To: sip:user@example.com
From: sip:user@example.com;tag=998332
Max-Forwards: 70
Call-ID: regbadct.k345asrl3fdbv@10.0.0.1
CSeq: 1 REGISTER
Via: SIP/2.0/UDP 135.180.130.133:5060;branch=z9hG4bKkdjuw
Contact: sip:user@example.com?Route=%3Csip:sip.example.com%3E
l: 0

",
    );
    let c = m.values(HeaderName::Contact).next().unwrap();
    assert!(NameAddr::parse(c).is_none());
}
