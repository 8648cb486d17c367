//! STUN Binding (RFC 5389) as SIP Outbound uses it for keep-alives on UDP (RFC 5626 §4.4.2):
//! a UA sends Binding requests to the SIP port, and the answer tells it its public address
//! (so it notices when its NAT mapping changed). Only the Binding method is answered.

use std::net::{IpAddr, SocketAddr};

const MAGIC: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;

/// Whether a datagram is a STUN message rather than SIP (RFC 7983 demultiplexing: SIP starts
/// with a letter, STUN with two zero bits, and STUN carries the magic cookie).
pub fn is_stun(d: &[u8]) -> bool {
    d.len() >= 20
        && d[0] & 0xc0 == 0
        && d[4..8] == MAGIC
        && usize::from(u16::from_be_bytes([d[2], d[3]])) == d.len() - 20
}

/// The Binding success response to a Binding request from `source`; `None` for any other STUN
/// message (indications, other methods, responses), which is ignored.
pub fn binding_response(req: &[u8], source: SocketAddr) -> Option<Vec<u8>> {
    if !is_stun(req) || u16::from_be_bytes([req[0], req[1]]) != BINDING_REQUEST {
        return None;
    }
    let txid = &req[8..20];
    let port = source.port() ^ 0x2112;
    let mut attr = vec![0u8, 0, 0, 0];
    match source.ip() {
        IpAddr::V4(ip) => {
            attr[1] = 0x01;
            attr[2..4].copy_from_slice(&port.to_be_bytes());
            attr.extend(ip.octets().iter().zip(MAGIC.iter()).map(|(a, m)| a ^ m));
        }
        IpAddr::V6(ip) => {
            attr[1] = 0x02;
            attr[2..4].copy_from_slice(&port.to_be_bytes());
            let key = MAGIC.iter().chain(txid.iter());
            attr.extend(ip.octets().iter().zip(key).map(|(a, m)| a ^ m));
        }
    }
    let mut out = Vec::with_capacity(24 + attr.len());
    out.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    out.extend_from_slice(&((4 + attr.len()) as u16).to_be_bytes());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(txid);
    out.extend_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
    out.extend_from_slice(&(attr.len() as u16).to_be_bytes());
    out.extend_from_slice(&attr);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Vec<u8> {
        let mut r = vec![0x00, 0x01, 0x00, 0x00];
        r.extend_from_slice(&MAGIC);
        r.extend_from_slice(b"0123456789ab");
        r
    }

    #[test]
    fn answers_a_binding_request_with_the_xor_mapped_address() {
        // RFC 5769 §2.2 encodes 192.0.2.1:32853 as port 0xa147, address 0xe112a643.
        let src: SocketAddr = "192.0.2.1:32853".parse().unwrap();
        let r = binding_response(&request(), src).unwrap();
        assert_eq!(&r[0..2], &[0x01, 0x01]);
        assert_eq!(u16::from_be_bytes([r[2], r[3]]) as usize, r.len() - 20);
        assert_eq!(&r[8..20], b"0123456789ab");
        assert_eq!(&r[20..24], &[0x00, 0x20, 0x00, 0x08]);
        assert_eq!(
            &r[24..32],
            &[0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43]
        );
        assert!(is_stun(&r));
        let v6 = binding_response(&request(), "[2001:db8::1]:5060".parse().unwrap()).unwrap();
        assert_eq!(v6.len(), 20 + 4 + 20);
    }

    #[test]
    fn sip_and_other_stun_messages_are_not_answered() {
        assert!(!is_stun(b"OPTIONS sip:a@b SIP/2.0\r\n\r\n"));
        assert!(!is_stun(b"\r\n\r\n"));
        let mut indication = request();
        indication[1] = 0x11;
        assert!(is_stun(&indication));
        assert!(binding_response(&indication, "192.0.2.1:1".parse().unwrap()).is_none());
        let mut truncated = request();
        truncated[3] = 8;
        assert!(!is_stun(&truncated));
    }
}
