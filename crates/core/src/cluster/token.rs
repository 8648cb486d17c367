//! The owner token: (node id, node boot epoch, flow) with an HMAC of the cluster secret.
//!
//! A node that receives a REGISTER over a stream, or from a UDP device behind NAT, writes this
//! token into the binding (as the user part of a Path-style entry naming its cluster address).
//! Another node that looks the device up sends the request to the owner, which checks the token
//! (its own node id, its current boot epoch, a valid MAC) before it uses the flow. The boot epoch
//! makes every token of a previous life of the node stale at once. Hex, so it is a valid URI user
//! part as it is.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::flow::{Flow, push_hex, signature, unhex};

/// Bytes of the MAC kept in a token: 128 bits, the token is an authorization to use a flow.
const MAC_LEN: usize = 16;
/// Token layout version (the first byte).
const VERSION: u8 = 1;

/// A node of the cluster, stable across its restarts (derived from its cluster address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u64);

impl std::fmt::Display for NodeId {
    /// 16 hex digits: how a node is named in keys and announcements.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for NodeId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16).map(Self)
    }
}

impl NodeId {
    /// The id of the node whose internal link is at `address` (`CLUSTER_ADDRESS`): a hash that
    /// every node computes alike, so ids need no configuration of their own.
    pub fn of_address(address: &str) -> Self {
        let digest = Sha256::digest(address.trim().to_ascii_lowercase().as_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&digest[..8]);
        Self(u64::from_be_bytes(b))
    }
}

/// The cluster secrets: tokens are signed with `current`; `previous` is still accepted while
/// a rotation is under way (set the new secret as current and the old one as previous on every
/// node, then drop the previous one once bindings have been refreshed).
#[derive(Clone)]
pub struct ClusterKeys {
    current: [u8; 32],
    previous: Option<[u8; 32]>,
}

impl std::fmt::Debug for ClusterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach a log.
        f.debug_struct("ClusterKeys")
            .field("previous", &self.previous.is_some())
            .finish_non_exhaustive()
    }
}

impl ClusterKeys {
    /// Keys from the secret in use and, during a rotation, the one before it.
    pub fn new(current: [u8; 32], previous: Option<[u8; 32]>) -> Self {
        Self { current, previous }
    }
}

fn mac(key: &[u8; 32], body: &[u8]) -> [u8; MAC_LEN] {
    signature(key, b"careflow-owner", body)
}

/// Which node holds a device's flow, and the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnerToken {
    /// The node holding the flow.
    pub node: NodeId,
    /// That node's boot epoch when the flow was registered.
    pub epoch: u64,
    /// The flow on that node.
    pub flow: Flow,
}

impl OwnerToken {
    /// The token, signed with the current key.
    pub fn encode(&self, keys: &ClusterKeys) -> String {
        let mut body = Vec::with_capacity(48);
        body.push(VERSION);
        body.extend_from_slice(&self.node.0.to_be_bytes());
        body.extend_from_slice(&self.epoch.to_be_bytes());
        self.flow.write(&mut body);
        let tag = mac(&keys.current, &body);
        let mut s = String::with_capacity((body.len() + MAC_LEN) * 2);
        push_hex(&mut s, &body);
        push_hex(&mut s, &tag);
        s
    }

    /// Reads a token signed with either key; `None` for anything else (forged, mangled, of
    /// another cluster, another layout).
    pub fn decode(token: &str, keys: &ClusterKeys) -> Option<Self> {
        let raw = unhex(token)?;
        if raw.len() < 1 + 16 + MAC_LEN {
            return None;
        }
        let (body, tag) = raw.split_at(raw.len() - MAC_LEN);
        let ok = |key: &[u8; 32]| bool::from(mac(key, body).ct_eq(tag));
        if !(ok(&keys.current) || keys.previous.as_ref().is_some_and(ok)) {
            return None;
        }
        if body[0] != VERSION {
            return None;
        }
        let node = NodeId(u64::from_be_bytes(body.get(1..9)?.try_into().ok()?));
        let epoch = u64::from_be_bytes(body.get(9..17)?.try_into().ok()?);
        let flow = Flow::read(body.get(17..)?)?;
        Some(Self { node, epoch, flow })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Transport;

    fn token() -> OwnerToken {
        OwnerToken {
            node: NodeId::of_address("10.0.0.2:5090"),
            epoch: 1_796_000_000_123,
            flow: Flow {
                transport: Transport::Wss,
                conn: Some(77),
                addr: "198.51.100.9:53211".parse().expect("address"),
            },
        }
    }

    #[test]
    fn round_trips_and_is_a_uri_user_part() {
        let keys = ClusterKeys::new([1; 32], None);
        let t = token().encode(&keys);
        assert!(t.bytes().all(|c| c.is_ascii_hexdigit()), "{t}");
        assert_eq!(OwnerToken::decode(&t, &keys), Some(token()));
        let v6 = OwnerToken {
            flow: Flow {
                transport: Transport::Udp,
                conn: None,
                addr: "[2001:db8::7]:5060".parse().expect("address"),
            },
            ..token()
        };
        assert_eq!(OwnerToken::decode(&v6.encode(&keys), &keys), Some(v6));
    }

    #[test]
    fn a_rotation_accepts_the_previous_key_and_nothing_else() {
        let old = ClusterKeys::new([1; 32], None);
        let rotating = ClusterKeys::new([2; 32], Some([1; 32]));
        let done = ClusterKeys::new([2; 32], None);
        let signed_old = token().encode(&old);
        let signed_new = token().encode(&rotating);
        assert_eq!(OwnerToken::decode(&signed_old, &rotating), Some(token()));
        assert_eq!(OwnerToken::decode(&signed_new, &rotating), Some(token()));
        assert_eq!(OwnerToken::decode(&signed_new, &done), Some(token()));
        assert_eq!(OwnerToken::decode(&signed_old, &done), None);
        assert_eq!(OwnerToken::decode(&signed_new, &old), None);
    }

    #[test]
    fn forged_mangled_and_foreign_tokens_are_refused() {
        let keys = ClusterKeys::new([1; 32], None);
        let t = token().encode(&keys);
        // Every single changed digit is refused.
        for i in 0..t.len() {
            let mut b = t.clone().into_bytes();
            b[i] = if b[i] == b'0' { b'1' } else { b'0' };
            let forged = String::from_utf8(b).expect("hex");
            assert_eq!(OwnerToken::decode(&forged, &keys), None, "digit {i}");
        }
        assert_eq!(OwnerToken::decode(&t[..t.len() - 2], &keys), None);
        // A flow token (the Record-Route kind) is not an owner token, whatever its key.
        let flow = token().flow.encode(&[1; 32]);
        assert_eq!(OwnerToken::decode(&flow, &keys), None);
        assert_eq!(OwnerToken::decode("", &keys), None);
        assert_eq!(OwnerToken::decode("zz", &keys), None);
    }

    #[test]
    fn node_ids_are_stable_and_distinct() {
        assert_eq!(
            NodeId::of_address("10.0.0.2:5090"),
            NodeId::of_address(" 10.0.0.2:5090 ")
        );
        assert_ne!(
            NodeId::of_address("10.0.0.2:5090"),
            NodeId::of_address("10.0.0.3:5090")
        );
        assert!(!format!("{:?}", ClusterKeys::new([9; 32], Some([8; 32]))).contains('9'));
        let id = NodeId(0xfeed);
        assert_eq!(id.to_string(), "000000000000feed");
        assert_eq!("000000000000feed".parse::<NodeId>(), Ok(id));
    }
}
