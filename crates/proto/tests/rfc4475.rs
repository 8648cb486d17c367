//! RFC 4475 torture messages: the valid ones parse and validate, the invalid ones are either
//! refused by `parse` (nothing can be answered) or by `validate` (answered 400/505).
//!
//! Messages are written with `\n` line ends and converted to CRLF, as on the wire.

use bytes::Bytes;
use careflow_proto::{HeaderName, Message, NameAddr, ParseErrorKind, ParseLimits, Via};

fn wire(s: &str) -> Bytes {
    Bytes::from(s.replace('\n', "\r\n"))
}

fn parse(s: &str) -> Result<Message, careflow_proto::ParseError> {
    Message::parse(wire(s), &ParseLimits::default())
}

fn valid(s: &str) -> Message {
    let m = parse(s).expect("parses");
    m.validate().expect("validates");
    m
}

fn invalid(s: &str) -> ParseErrorKind {
    match parse(s) {
        Err(e) => e.kind,
        Ok(m) => m.validate().expect_err("must be refused").kind,
    }
}

const WSINV: &str = "INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0
TO :
 sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n
from   : \"J Rosenberg \\\\\\\"\"       <sip:jdrosen@example.com>
  ;
  tag = 98asjd8
MaX-fOrWaRdS: 0068
Call-ID: wsinv.ndaksdj@192.0.2.1
Content-Length   : 150
cseq: 0009
  INVITE
Via  : SIP  /   2.0
 /UDP
    192.0.2.2;branch=390skdjuw
s :
NewFangledHeader:   newfangled value
 continued newfangled value
UnknownHeaderWithUnusualValue: ;;,,;;,;
Content-Type: application/sdp
Route:
 <sip:services.example.com;lr;unknownwith=value;unknown-no-value>
v:  SIP  / 2.0  / TCP     spindle.example.com   ;
  branch  =   z9hG4bK9ikj8  ,
 SIP  /    2.0   / UDP  192.168.255.111   ; branch=
 z9hG4bK30239
m:\"Quoted string \\\"\\\"\" <sip:jdrosen@example.com> ; newparam =
      newvalue ;
  secondparam ; q = 0.33

v=0
o=mhandley 29739 7272939 IN IP4 192.0.2.3
s=-
c=IN IP4 192.0.2.4
t=0 0
m=audio 49217 RTP/AVP 0 12
m=video 3227 RTP/AVP 31
a=rtpmap:31 LPC
";

#[test]
fn wsinv_short_tortuous_invite() {
    let m = valid(WSINV);
    assert_eq!(m.method_str(), "INVITE");
    assert_eq!(m.cseq(), Some((9, "INVITE")));
    assert_eq!(m.call_id(), Some("wsinv.ndaksdj@192.0.2.1"));
    assert_eq!(
        m.header(HeaderName::MaxForwards).map(str::trim),
        Some("0068")
    );
    let vias: Vec<_> = m
        .values(HeaderName::Via)
        .map(|v| Via::parse(v).unwrap())
        .collect();
    assert_eq!(vias.len(), 3);
    assert_eq!(vias[0].host.as_str(), "192.0.2.2");
    assert_eq!(vias[1].transport, "TCP");
    assert_eq!(vias[1].branch(), Some("z9hG4bK9ikj8"));
    assert_eq!(vias[2].branch(), Some("z9hG4bK30239"));
    assert_eq!(m.to().unwrap().tag(), Some("1918181833n"));
    assert_eq!(m.from().unwrap().tag(), Some("98asjd8"));
    let c = NameAddr::parse(m.values(HeaderName::Contact).next().unwrap()).unwrap();
    assert_eq!(c.params.get("q"), Some(Some("0.33")));
    assert_eq!(c.params.get("secondparam"), Some(None));
    assert_eq!(m.body().len(), 150);
    assert_eq!(
        m.other_header("unknownheaderwithunusualvalue"),
        Some(";;,,;;,;")
    );
}

#[test]
fn intmeth_wide_range_of_characters() {
    let s = "!interesting-Method0123456789_*+`.%indeed'~ sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com SIP/2.0
Via: SIP/2.0/TCP host1.example.com;branch=z9hG4bK-.!%66*_+`'~
To: \"BEL:\\\x07 NUL:\\\x00 DEL:\\\x7F\" <sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*@example.com>
From: token1~` token2'+_ token3*%!.- <sip:mundane@example.com> ;fromParam''~+*_!.-%=\"\u{440}\u{430}\u{431}\u{43e}\u{442}\u{430}\u{44e}\u{449}\u{438}\u{439}\";tag=_token~1'+`*%!-.
Call-ID: intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{
CSeq: 139122385 !interesting-Method0123456789_*+`.%indeed'~
Max-Forwards: 255
extensionHeader-!.%*+_`'~:\u{feff}\u{5927}\u{505c}\u{96fb}
Content-Length: 0

";
    let m = valid(s);
    assert_eq!(m.method(), careflow_proto::Method::Other);
    assert_eq!(m.from().unwrap().tag(), Some("_token~1'+`*%!-."));
    assert_eq!(m.request_uri().unwrap().host.as_str(), "example.com");
}

#[test]
fn esc01_valid_escaping() {
    let m = valid(
        "INVITE sip:sips%3Auser%40example.com@example.net SIP/2.0
To: sip:%75se%72@example.com
From: <sip:I%20have%20spaces@example.net>;tag=938
Max-Forwards: 87
i: esc01.239409asdfakjkn23onasd0-3234
CSeq: 234234 INVITE
Via: SIP/2.0/UDP host5.example.net;branch=z9hG4bKkdjuw
C: application/sdp
Contact:
  <sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31>
Content-Length: 0

",
    );
    assert_eq!(m.to().unwrap().uri.aor().unwrap(), "user@example.com");
    assert_eq!(m.request_uri().unwrap().host.as_str(), "example.net");
}

#[test]
fn escnull_and_esc02() {
    valid(
        "REGISTER sip:example.com SIP/2.0
To: sip:null-%00-null@example.com
From: sip:null-%00-null@example.com;tag=839923423
Max-Forwards: 70
Call-ID: escnull.39203ndfvkjdasfkq3w4otrq0adsfdfnavd
CSeq: 14398234 REGISTER
Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bKkdjuw
Contact: <sip:%00@host5.example.com>
Contact: <sip:%00%00@host5.example.com>
L:0

",
    );
    let m = valid(
        "RE%47IST%45R sip:registrar.example.com SIP/2.0
To: \"%Z%45\" <sip:resource@example.com>
From: \"%Z%45\" <sip:resource@example.com>;tag=f232jadfj23
Call-ID: esc02.asdfnqwo34rq23i34jrjasdcnl23nrlknsdf
Via: SIP/2.0/TCP host.example.com;branch=z9hG4bK209%fzsnel234
CSeq: 29344 RE%47IST%45R
Max-Forwards: 70
Contact: <sip:alias1@host1.example.com>
C%6Fntact: <sip:alias2@host2.example.com>
Contact: <sip:alias3@host3.example.com>
l: 0

",
    );
    // RE%47IST%45R is an unknown method, not REGISTER; C%6Fntact is an unknown header.
    assert_eq!(m.method(), careflow_proto::Method::Other);
    assert_eq!(m.values(HeaderName::Contact).count(), 2);
}

#[test]
fn lwsdisp_and_semiuri_and_transports() {
    valid(
        "OPTIONS sip:user@example.com SIP/2.0
To: sip:user@example.com
From: caller<sip:caller@example.com>;tag=323
Max-Forwards: 70
Call-ID: lwsdisp.1234abcd@funky.example.com
CSeq: 60 OPTIONS
Via: SIP/2.0/UDP funky.example.com;branch=z9hG4bKkdjuw
l: 0

",
    );
    let m = valid(
        "OPTIONS sip:user;par=u%40example.net@example.com SIP/2.0
To: sip:j_user@example.com
From: sip:caller@example.org;tag=33242
Max-Forwards: 3
Call-ID: semiuri.0ha0isndaksdj
CSeq: 8 OPTIONS
Accept: application/sdp, application/pkcs7-mime,
        multipart/mixed, multipart/signed,
        message/sip, message/sipfrag
Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKkdjuw
l: 0

",
    );
    assert_eq!(
        m.request_uri().unwrap().user,
        Some("user;par=u%40example.net")
    );
    valid(
        "OPTIONS sip:user@example.com SIP/2.0
To: sip:user@example.com
From: <sip:caller@example.com>;tag=323
Max-Forwards: 70
Call-ID:  transports.kijh4akdnaqjkwendsasfdj
Accept: application/sdp
CSeq: 60 OPTIONS
Via: SIP/2.0/UDP t1.example.com;branch=z9hG4bKkdjuw
Via: SIP/2.0/SCTP t2.example.com;branch=z9hG4bKklasjdhf
Via: SIP/2.0/TLS t3.example.com;branch=z9hG4bK2980unddj
Via: SIP/2.0/UNKNOWN t4.example.com;branch=z9hG4bKasd0f3en
Via: SIP/2.0/TCP t5.example.com;branch=z9hG4bK0a9idfnee
l: 0

",
    );
}

#[test]
fn responses_with_odd_reasons() {
    let m = valid("SIP/2.0 200 = 2**3 * 5**2 \u{43d}\u{43e} \u{441}\u{442}\u{43e} \u{434}\u{435}\u{432}\u{44f}\u{43d}\u{43e}\u{441}\u{442}\u{43e} \u{434}\u{435}\u{432}\u{44f}\u{442}\u{44c} - \u{43f}\u{440}\u{43e}\u{441}\u{442}\u{43e}\u{435}
Via: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923
Call-ID: unreason.1234ksdfak3j2erwedfsASdf
CSeq: 35 INVITE
From: sip:user@example.com;tag=11141343
To: sip:user@example.edu;tag=2229
Content-Length: 0

");
    assert_eq!(m.status(), Some(200));
    let m = valid(
        "SIP/2.0 100 
Via: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2398ndaoe
Call-ID: noreason.asndj203insdf99223ndf
CSeq: 35 INVITE
From: <sip:user@example.com>;tag=39ansfi3
To: <sip:user@example.edu>;tag=902jndnke3
Content-Length: 0

",
    );
    assert_eq!(m.status(), Some(100));
}

#[test]
fn dblreq_extra_bytes_after_content_length_are_ignored() {
    let m = valid(
        "REGISTER sip:example.com SIP/2.0
To: sip:j.user@example.com
From: sip:j.user@example.com;tag=43251j3j324
Max-Forwards: 8
I: dblreq.0ha0isndaksdj99sdfafnl3lk233412
Contact: sip:j.user@host.example.com
CSeq: 8 REGISTER
Via: SIP/2.0/UDP 192.0.2.125;branch=z9hG4bKkdjuw23492
Content-Length: 0


INVITE sip:joe@example.com SIP/2.0
t: sip:joe@example.com
From: sip:caller@example.net;tag=141334
Max-Forwards: 8
Call-ID: dblreq.0ha0isnda977644900765@192.0.2.15
CSeq: 8 INVITE
Via: SIP/2.0/UDP 192.0.2.15;branch=z9hG4bKkdjuw380234
Content-Length: 0

",
    );
    assert_eq!(m.method(), careflow_proto::Method::Register);
    assert!(m.body().is_empty());
}

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

/// §3.1.1: other valid messages: unknown schemes (novelsc, unksm), RFC 2543 style (inv2543),
/// Max-Forwards of zero (zeromf).
#[test]
fn more_valid_messages() {
    let m = valid(
        "OPTIONS soap.beep://192.0.2.103:3002 SIP/2.0
To: sip:user@example.com
From: sip:caller@example.net;tag=384
Max-Forwards: 3
Call-ID: novelsc.asdfasser0q239nwsdfasdkl34
CSeq: 3923423 OPTIONS
Via: SIP/2.0/TCP host9.example.com;branch=z9hG4bKkdjuw39234
Content-Length: 0

",
    );
    assert!(!m.request_uri().unwrap().is_sip());
    valid(
        "OPTIONS nobodyKnowsThisScheme:totallyopaquecontent SIP/2.0
To: sip:user@example.com
From: sip:caller@example.net;tag=384
Max-Forwards: 3
Call-ID: unkscm.nasdfasser0q239nwsdfasdkl34
CSeq: 3923423 OPTIONS
Via: SIP/2.0/TCP host9.example.com;branch=z9hG4bKkdjuw39234
Content-Length: 0

",
    );
    let m = valid(
        "INVITE sip:UserB@example.com SIP/2.0
Via: SIP/2.0/UDP 192.0.2.15
From: <sip:UserA@example.com>
To: <sip:UserB@example.com>
Call-ID: 8912-87@192.0.2.15
CSeq: 1 INVITE
Max-Forwards: 70
Content-Length: 0

",
    );
    assert!(!m.top_via().unwrap().has_rfc3261_branch());
    valid(
        "OPTIONS sip:user@example.com SIP/2.0
To: sip:user@example.com
From: sip:caller@example.net;tag=3ghsd41
Call-ID: zeromf.jfasdlfnm2o2l43r5u0asdfas
CSeq: 39234321 OPTIONS
Via: SIP/2.0/UDP host1.example.com;branch=z9hG4bKkdjuw2349i
Max-Forwards: 0
Content-Length: 0

",
    );
}
