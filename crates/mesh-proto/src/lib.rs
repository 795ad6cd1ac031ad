//! The messages between a node and the coordination server. Every message carries the protocol version it
//! was written with; a server answers a version it does not speak with an error naming both, so an old
//! node never misreads a new netmap.
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub mod proof;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// A WireGuard public key, as base64 text on the wire (the form `wg` prints).
pub type NodeKey = String;

/// A node asks to join the mesh with an auth key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub version: u32,
    pub auth_key: String,
    pub node_key: NodeKey,
    pub hostname: String,
    #[serde(default)]
    pub advertise_routes: Vec<IpNet>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// When the node made the request (Unix milliseconds): the server refuses one far from its own clock,
    /// or not newer than the node's last registration, so a captured request cannot be replayed.
    #[serde(default)]
    pub timestamp_ms: u64,
    /// `proof::sign` over everything above: the node holds the private key of `node_key`.
    #[serde(default)]
    pub proof: String,
}

impl std::fmt::Debug for RegisterRequest {
    // The auth key is a secret: a `{:?}` of the request must not print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterRequest")
            .field("node_key", &self.node_key)
            .field("hostname", &self.hostname)
            .field("advertise_routes", &self.advertise_routes)
            .field("tags", &self.tags)
            .field("timestamp_ms", &self.timestamp_ms)
            .finish_non_exhaustive()
    }
}

/// The server's static X25519 public key, which registrations are signed for (`GET /api/v1/server-key`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerKey {
    pub version: u32,
    pub public_key: String,
}

/// The server's answer: the node's identity in the mesh and the credential it uses from now on.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub version: u32,
    pub node_id: u64,
    /// The name the node got (the requested hostname, made unique in the mesh).
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// Presented with every later request; the server keeps only its hash.
    pub credential: String,
    pub domain: String,
    /// Joined with an ephemeral key: the node logs out when it stops for good (a sidecar's pod ends).
    #[serde(default)]
    pub ephemeral: bool,
}

impl std::fmt::Debug for RegisterResponse {
    // The credential is a secret: a `{:?}` of the answer must not print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterResponse")
            .field("node_id", &self.node_id)
            .field("name", &self.name)
            .field("ipv4", &self.ipv4)
            .field("ipv6", &self.ipv6)
            .finish_non_exhaustive()
    }
}

/// The most endpoints a node may report; more is a misbehaving node, not a bigger host.
pub const MAX_ENDPOINTS: usize = 16;

/// A node tells the server where its WireGuard socket can be reached, so peers can send the first
/// handshake there. Sent whenever the set changes; the server passes it on in every peer's netmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointsUpdate {
    pub version: u32,
    pub endpoints: Vec<SocketAddr>,
}

/// A node changes the routes it advertises without registering again (`meshd set --advertise-routes`).
/// Approvals of prefixes it keeps advertising stay; new ones wait for approval (or autoApprovers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesUpdate {
    pub version: u32,
    pub advertise_routes: Vec<IpNet>,
}

/// A node as its peers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub node_id: u64,
    pub name: String,
    pub node_key: NodeKey,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub endpoints: Vec<SocketAddr>,
    /// The peer's mesh addresses and the approved routes of which it is the primary router.
    pub allowed_ips: Vec<IpNet>,
    pub online: bool,
    pub tags: Vec<String>,
    /// When the peer's key stops being trusted (Unix seconds; none: never). A node drops the peer then
    /// by itself, even while it cannot reach the server.
    #[serde(default)]
    pub key_expiry: Option<u64>,
}

/// Routes a node advertises, and what became of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteState {
    pub prefix: IpNet,
    pub approved: bool,
    /// Whether this node is the one router peers send this prefix to.
    pub primary: bool,
}

/// One rule of a node's packet filter: traffic from the mesh to this node (or to a subnet it routes) is let
/// in when its source is in `src`, its destination and port in one of `dst`, and its protocol in
/// `protos`. Rules only allow; what no rule allows is dropped, except replies to flows the node opened.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FilterRule {
    /// Shared: one rule reaches many nodes with the same sources, and a large mesh's policy would otherwise
    /// copy its source lists once per receiving node.
    pub src: std::sync::Arc<[IpNet]>,
    pub dst: Vec<DstPorts>,
    /// IP protocol numbers; empty means TCP, UDP, ICMP and ICMPv6, as in Tailscale.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protos: Vec<u8>,
}

/// Destinations and a port range of a rule. No `net` means any address this node accepts traffic for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DstPorts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<IpNet>,
    pub first: u16,
    pub last: u16,
}

/// The protocols a rule with no `protos` allows.
pub const DEFAULT_PROTOS: [u8; 4] = mesh_packet::filter::DEFAULT_PROTOS;

/// A netmap rule as the data plane's filter (and `policy explain`) holds it.
impl From<&FilterRule> for mesh_packet::filter::Rule {
    fn from(rule: &FilterRule) -> Self {
        mesh_packet::filter::Rule {
            src: rule.src.to_vec(),
            dst: rule
                .dst
                .iter()
                .map(|d| mesh_packet::filter::DstRange { net: d.net, first: d.first, last: d.last })
                .collect(),
            protos: rule.protos.clone(),
        }
    }
}

/// Everything a node needs to configure itself: itself, its peers, the mesh's domain. `version` grows with
/// every change, so a node long-polling with the version it has gets the next one and nothing stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetMap {
    pub version: u64,
    pub domain: String,
    pub node: Peer,
    pub routes: Vec<RouteState>,
    pub peers: Vec<Peer>,
    /// The node's packet filter. `None`: the policy has no rules, everything is allowed (as in Tailscale,
    /// a policy with neither `acls` nor `grants`); an empty list allows nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Vec<FilterRule>>,
    /// The mesh's DNS settings; `None` from a server that has none, which a node reads as the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsConfig>,
}

/// What a node's resolver answers and where it sends the rest (`meshd control dns set`). Node names come
/// from the netmap's peers and the domain; this carries everything else.
/// Unknown fields are ignored (not refused): a newer server's additions must not make an older node refuse
/// its whole netmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    /// Whether nodes answer mesh names (`NAME` and `NAME.<domain>`) at all.
    pub magic_dns: bool,
    /// Upstreams for names outside the mesh. They replace the host's own only with `override_local_dns`;
    /// otherwise they serve when the host has none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<std::net::IpAddr>,
    /// Split DNS: a zone (lower case, no trailing dot) and the resolvers that answer for it. An empty list
    /// makes the zone local: extra records or NXDOMAIN.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub split: std::collections::BTreeMap<String, Vec<std::net::IpAddr>>,
    /// Appended to the host's search list after the mesh domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search_domains: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_records: Vec<ExtraRecord>,
    #[serde(default)]
    pub override_local_dns: bool,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            magic_dns: true,
            nameservers: Vec::new(),
            split: Default::default(),
            search_domains: Vec::new(),
            extra_records: Vec::new(),
            override_local_dns: false,
        }
    }
}

/// A name the mesh's resolvers answer with a fixed address (a service's private name pointing at a mesh
/// node, seed 000's LangFuse case).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtraRecord {
    /// Lower case, no trailing dot.
    pub name: String,
    #[serde(rename = "type")]
    pub kind: RecordKind,
    pub value: std::net::IpAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordKind {
    A,
    AAAA,
}

/// An error the server returns, with a stable code a node can act on and a sentence for the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    UnknownAuthKey,
    AuthKeyRevoked,
    AuthKeyExpired,
    AuthKeyUsed,
    TagNotAllowed,
    NodeExpired,
    BadRequest,
    /// What an admin verb names does not exist (or a name fits more than one node).
    NotFound,
    Unauthorized,
    VersionMismatch,
    /// The registration is not signed by the node key's private key, or is stale or replayed.
    BadProof,
    /// Too many writes from one node; it may try again later.
    RateLimited,
    /// The server failed on its own account (storage, say); a node retries.
    Internal,
}

impl ErrorCode {
    /// The answers that mean "not you, not with this", after which a node stops and waits for its user;
    /// everything else is a passing fault it retries.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::UnknownAuthKey
                | Self::AuthKeyRevoked
                | Self::AuthKeyExpired
                | Self::AuthKeyUsed
                | Self::TagNotAllowed
                | Self::NodeExpired
                | Self::Unauthorized
                | Self::VersionMismatch
                | Self::BadProof
        )
    }
}

/// `seconds` since the Unix epoch, for people (nodes' messages, the admin console), as `YYYY-MM-DD HH:MM:SS UTC` (civil-from-days, proleptic Gregorian).
pub fn utc_text(seconds: u64) -> String {
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rest / 3600, rest / 60 % 60, rest % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_shown_in_utc() {
        assert_eq!(utc_text(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_text(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_text(1_800_000_000), "2027-01-15 08:00:00 UTC");
    }

    #[test]
    fn a_register_request_round_trips_and_refuses_unknown_fields() {
        let request = RegisterRequest {
            version: VERSION,
            auth_key: "mkey-abc".into(),
            node_key: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into(),
            hostname: "router-a".into(),
            advertise_routes: vec!["10.0.0.0/16".parse().unwrap()],
            tags: vec!["tag:router".into()],
            timestamp_ms: 1,
            proof: String::new(),
        };
        let json = serde_json::to_string(&request).unwrap();
        assert_eq!(serde_json::from_str::<RegisterRequest>(&json).unwrap(), request);
        let extra = json.replacen('{', r#"{"surprise":1,"#, 1);
        assert!(serde_json::from_str::<RegisterRequest>(&extra).is_err());
        assert!(!format!("{request:?}").contains("mkey-abc"), "no auth key in Debug output");
        let code = serde_json::to_string(&ErrorCode::AuthKeyExpired).unwrap();
        assert_eq!(code, r#""auth_key_expired""#);
    }
}
