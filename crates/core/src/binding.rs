//! A registered contact (one row of the location service).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// A SIP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP
    Udp,
    /// TCP
    Tcp,
    /// TLS over TCP
    Tls,
    /// WebSocket (RFC 7118)
    Ws,
    /// Secure WebSocket
    Wss,
}

impl Transport {
    /// Lower-case name, as used in config and storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
            Self::Tls => "tls",
            Self::Ws => "ws",
            Self::Wss => "wss",
        }
    }

    /// A one-byte code, for binary encodings (flow tokens, the registration journal); never
    /// renumber.
    pub fn code(self) -> u8 {
        match self {
            Self::Udp => 0,
            Self::Tcp => 1,
            Self::Tls => 2,
            Self::Ws => 3,
            Self::Wss => 4,
        }
    }

    /// The transport of a [`Transport::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Self::Udp,
            1 => Self::Tcp,
            2 => Self::Tls,
            3 => Self::Ws,
            4 => Self::Wss,
            _ => return None,
        })
    }

    /// The token written in a Via header.
    pub fn via_token(self) -> &'static str {
        match self {
            Self::Udp => "UDP",
            Self::Tcp => "TCP",
            Self::Tls => "TLS",
            Self::Ws => "WS",
            Self::Wss => "WSS",
        }
    }

    /// Connection-oriented transports need no retransmissions (RFC 3261 §17).
    pub fn is_reliable(self) -> bool {
        !matches!(self, Self::Udp)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Transport {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "udp" => Self::Udp,
            "tcp" => Self::Tcp,
            "tls" => Self::Tls,
            "ws" => Self::Ws,
            "wss" => Self::Wss,
            _ => return Err(()),
        })
    }
}

/// One binding of an address-of-record to a contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// Stable id, for deregistering one device from the API.
    pub id: u64,
    /// Address-of-record key `user@domain`.
    pub aor: String,
    /// The contact URI as registered.
    pub contact: String,
    /// Call-ID of the registering UA (RFC 3261 §10.3 step 7 ordering).
    pub call_id: String,
    /// CSeq of the last REGISTER that touched this binding.
    pub cseq: u32,
    /// Unix seconds when it expires.
    pub expires_at: u64,
    /// Unix seconds when it was first registered.
    pub registered_at: u64,
    /// `q` value times 1000, when given.
    pub q: Option<u16>,
    /// `+sip.instance` (RFC 5626), stored for outbound support.
    pub instance: Option<String>,
    /// `reg-id` (RFC 5626).
    pub reg_id: Option<u32>,
    /// Transport the REGISTER arrived over.
    pub transport: Transport,
    /// Source address of the REGISTER (where a NATed device is reachable).
    pub source: SocketAddr,
    /// User-Agent of the registering device.
    pub user_agent: Option<String>,
    /// The stream connection it registered over (this process's numbering); requests to the
    /// device go over it, and the binding ends with it. Not persisted: after a restart no
    /// connection survives.
    pub conn: Option<u64>,
    /// Path header values of the REGISTER (RFC 3327): the proxies between us and the device,
    /// nearest first; requests to the device are routed through them.
    pub path: Vec<String>,
    /// Registered through this process (always, unless several nodes share the location
    /// service): only then can this node reach the device's NAT mapping or connection.
    pub here: bool,
    /// The route to the node that holds this binding's flow when several nodes form a
    /// cluster (`<sip:OWNER-TOKEN@CLUSTER_ADDRESS;transport=tcp;lr>`, see
    /// `cluster::token`): any node reaches the device through it. `None` on a single node,
    /// and for devices every node can reach directly.
    pub owner: Option<String>,
}

impl Binding {
    /// The cluster node holding this binding's flow (its internal-link `IP:PORT`, from the
    /// owner route), when only that node can reach the device.
    pub fn owner_node(&self) -> Option<String> {
        let na = careflow_proto::NameAddr::parse(self.owner.as_deref()?)?;
        let host = na.uri.host.as_str();
        Some(match na.uri.port {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        })
    }

    /// Seconds left at `now` (0 once expired).
    pub fn expires_in(&self, now: u64) -> u64 {
        self.expires_at.saturating_sub(now)
    }

    /// A UDP device behind NAT: it registered itself (no Path) and its Contact names another
    /// IP than the one its REGISTER came from, so it is reached at that source address (and
    /// kept reachable with keep-alives). A Contact on the source's own IP is reachable as it
    /// is, whatever its port.
    pub fn behind_nat(&self) -> bool {
        self.transport == Transport::Udp
            && self.path.is_empty()
            && self.source.port() != 0
            && careflow_proto::Uri::parse(&self.contact)
                .is_none_or(|u| u.host.ip() != Some(self.source.ip()))
    }
}
