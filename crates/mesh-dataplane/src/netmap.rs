//! What a node configures from a netmap: its peers, which of their subnet routes it accepts, and which of
//! its own advertised routes it may serve. Pure, so the daemon's follow loop only fetches and applies.

use std::collections::HashSet;

use base64::Engine;
use ipnet::IpNet;
use mesh_proto::NetMap;

use crate::{Key, PeerSpec};

/// Which peers' subnet routes this node sends into the mesh (Tailscale's `--accept-routes`). Mesh
/// addresses are always accepted; subnet routes only when asked for, so joining a mesh never reroutes a
/// host's LAN by surprise. The one type for it: stored in a managed node's preferences, applied to netmaps,
/// and (static mode, `meshd doctor`) to what goes into the mesh table.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AcceptRoutes {
    #[default]
    None,
    All,
    /// Only routes inside one of these prefixes (`--accept-routes=10.52.0.0/16,...`: the prefixes and their
    /// more-specifics).
    Within(Vec<IpNet>),
}

impl AcceptRoutes {
    /// `true`, `false`, or a list of prefixes, as `--accept-routes[=..]` takes it.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "" | "true" => Ok(Self::All),
            "false" => Ok(Self::None),
            list => list
                .split(',')
                .map(|p| p.trim().parse::<IpNet>().map(|n| n.trunc()))
                .collect::<Result<Vec<_>, _>>()
                .map(Self::Within)
                .map_err(|_| format!("--accept-routes={list}: expected true, false or prefixes like 10.52.0.0/16,..")),
        }
    }

    /// Whether a peer's subnet route is taken.
    pub fn accepts(&self, route: &IpNet) -> bool {
        match self {
            Self::None => false,
            Self::All => true,
            Self::Within(allowed) => allowed.iter().any(|a| a.contains(route)),
        }
    }

    /// Whether one of a peer's allowed IPs goes into the mesh table: a single address (a peer's own) always,
    /// a subnet as [`AcceptRoutes::accepts`] says.
    pub fn routes(&self, allowed_ip: &IpNet) -> bool {
        allowed_ip.prefix_len() == allowed_ip.max_prefix_len() || self.accepts(allowed_ip)
    }
}

/// A peer the netmap names that cannot be configured, and why; the rest of the mesh still is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedPeer {
    pub node_id: u64,
    pub name: String,
    pub reason: &'static str,
}

#[derive(Debug, Default)]
pub struct Peers {
    pub specs: Vec<PeerSpec>,
    pub skipped: Vec<SkippedPeer>,
}

fn decode_key(text: &str) -> Option<Key> {
    base64::engine::general_purpose::STANDARD.decode(text).ok()?.try_into().ok()
}

/// The peers to configure: each with its mesh addresses and the accepted routes it is primary for, and the
/// first endpoint it reported. A peer with a malformed key, this node's own key, or a key an earlier peer
/// already has is skipped and reported, never configured twice.
/// `now_unix` (seconds) decides which peers' keys have expired: those are skipped, whatever the server
/// said last, so a node that cannot reach its server still stops trusting them on time.
///
/// A default route is taken only from `exit_node` (a peer's name or mesh address), the node's explicit
/// choice; from any other peer it is never accepted, whatever `accept` says.
pub fn peers(
    map: &NetMap,
    accept: &AcceptRoutes,
    exit_node: Option<&str>,
    persistent_keepalive: Option<u16>,
    now_unix: u64,
) -> Peers {
    let mut out = Peers::default();
    let mesh_ula = mesh_ula_of(map);
    let mut seen: HashSet<Key> = decode_key(&map.node.node_key).into_iter().collect();
    let mesh_addresses =
        |p: &mesh_proto::Peer| [IpNet::from(std::net::IpAddr::V4(p.ipv4)), IpNet::from(std::net::IpAddr::V6(p.ipv6))];
    for peer in &map.peers {
        let skip = |reason| SkippedPeer { node_id: peer.node_id, name: peer.name.clone(), reason };
        let Some(key) = decode_key(&peer.node_key) else {
            out.skipped.push(skip("its node key is not a base64 WireGuard key"));
            continue;
        };
        if peer.key_expiry.is_some_and(|e| e <= now_unix) {
            out.skipped.push(skip("its key has expired"));
            continue;
        }
        if !MESH_V4.contains(&peer.ipv4) || !mesh_ula.is_some_and(|ula| ula.contains(&peer.ipv6)) {
            // A server that hands out 169.254.169.254 or a LAN address as a peer's mesh address would route
            // it into the mesh on every node, whatever --accept-routes says.
            out.skipped
                .push(skip("its mesh addresses are outside the mesh's ranges (100.64.0.0/10 and the mesh's ULA)"));
            continue;
        }
        if !seen.insert(key) {
            out.skipped.push(skip("its node key is this node's or an earlier peer's"));
            continue;
        }
        let own = mesh_addresses(peer);
        let mut allowed_ips: Vec<IpNet> = own.to_vec();
        // A default route carries all of the host's traffic into the mesh: only from the exit node this
        // node chose, never as an ordinary subnet route.
        let chosen_exit = exit_node.is_some_and(|e| is_peer(peer, e));
        let in_mesh = |p: &IpNet| match p {
            IpNet::V4(v4) => v4.contains(&MESH_V4) || MESH_V4.contains(v4),
            IpNet::V6(v6) => mesh_ula.is_some_and(|ula| v6.contains(&ula) || ula.contains(v6)),
        };
        allowed_ips.extend(
            peer.allowed_ips
                .iter()
                .filter(|p| !own.contains(p))
                // A subnet route over the mesh's own ranges would take other peers' addresses (an exit's
                // default route does not: every peer's own address is more specific).
                .filter(|p| {
                    if is_default_like(p) {
                        chosen_exit && p.prefix_len() == 0
                    } else {
                        !in_mesh(p) && accept.accepts(p)
                    }
                })
                .copied(),
        );
        out.specs.push(PeerSpec {
            public_key: key,
            preshared_key: None,
            endpoint: peer.endpoints.first().copied(),
            allowed_ips,
            persistent_keepalive,
        });
    }
    out
}

/// A route so wide it carries most of the host's traffic (`0.0.0.0/1` and `128.0.0.0/1` together are a
/// default route): only an exit node's `/0` is taken, and only from the chosen exit.
pub fn is_default_like(prefix: &IpNet) -> bool {
    match prefix {
        IpNet::V4(_) => prefix.prefix_len() < 8,
        IpNet::V6(_) => prefix.prefix_len() < 16,
    }
}

/// Whether `text` names `peer`: its name or one of its mesh addresses.
pub fn is_peer(peer: &mesh_proto::Peer, text: &str) -> bool {
    peer.name == text || peer.ipv4.to_string() == text || peer.ipv6.to_string() == text
}

/// The earliest key expiry among the peers still trusted at `now_unix`: when the peers must be
/// reconfigured next even if no netmap comes.
pub fn next_key_expiry(map: &NetMap, now_unix: u64) -> Option<u64> {
    map.peers.iter().filter_map(|p| p.key_expiry).filter(|e| *e > now_unix).min()
}

/// The mesh's IPv4 range (RFC 6598 shared address space).
pub const MESH_V4: ipnet::Ipv4Net = match ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(100, 64, 0, 0), 10) {
    Ok(net) => net,
    Err(_) => panic!("a /10 is a valid prefix"),
};

/// The mesh's IPv6 range: the ULA /48 this node's own address is in, if that address is a ULA.
fn mesh_ula_of(map: &NetMap) -> Option<ipnet::Ipv6Net> {
    let ula: ipnet::Ipv6Net = "fc00::/7".parse().expect("a literal prefix");
    ula.contains(&map.node.ipv6).then(|| ipnet::Ipv6Net::new(map.node.ipv6, 48).expect("a /48").trunc())
}

/// Whether this node's own addresses in `map` are mesh addresses; a netmap that would give this node a
/// host or LAN address is refused whole.
pub fn own_addresses_in_mesh(map: &NetMap) -> bool {
    MESH_V4.contains(&map.node.ipv4) && mesh_ula_of(map).is_some()
}

/// The advertised routes this node may forward to: the approved ones. An unapproved route is never served,
/// even to a peer that sends traffic for it anyway.
pub fn served_routes(map: &NetMap) -> Vec<IpNet> {
    map.routes.iter().filter(|r| r.approved).map(|r| r.prefix).collect()
}

#[cfg(test)]
mod tests {
    use mesh_proto::{Peer, RouteState};

    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn key_text(byte: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    }

    fn peer(id: u8, key: String, extra: &[&str]) -> Peer {
        let ipv4 = std::net::Ipv4Addr::new(100, 64, 0, id);
        let ipv6 = format!("fd7a:1::{id}").parse().unwrap();
        let mut allowed_ips = vec![IpNet::from(std::net::IpAddr::V4(ipv4)), IpNet::from(std::net::IpAddr::V6(ipv6))];
        allowed_ips.extend(extra.iter().map(|p| p.parse::<IpNet>().unwrap()));
        Peer {
            node_id: u64::from(id),
            name: format!("node-{id}"),
            node_key: key,
            ipv4,
            ipv6,
            endpoints: vec![
                format!("192.0.2.{id}:41641").parse().unwrap(),
                format!("[2001:db8::{id}]:41641").parse().unwrap(),
            ],
            allowed_ips,
            online: true,
            tags: Vec::new(),
            key_expiry: None,
        }
    }

    fn map(peers: Vec<Peer>) -> NetMap {
        NetMap {
            version: 7,
            domain: "mesh.example".into(),
            node: peer(1, key_text(1), &[]),
            routes: vec![
                RouteState { prefix: "10.1.0.0/16".parse().unwrap(), approved: true, primary: true },
                RouteState { prefix: "10.9.0.0/16".parse().unwrap(), approved: false, primary: false },
            ],
            peers,
            filter: None,
            dns: None,
        }
    }

    fn allowed(peers: &Peers, index: usize) -> Vec<String> {
        peers.specs[index].allowed_ips.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn subnet_routes_are_accepted_only_when_asked_for() {
        let m = map(vec![peer(2, key_text(2), &["10.2.0.0/16", "192.168.7.0/24"]), peer(3, key_text(3), &[])]);
        let none = peers(&m, &AcceptRoutes::None, None, None, NOW);
        assert_eq!(allowed(&none, 0), ["100.64.0.2/32", "fd7a:1::2/128"], "mesh addresses only");
        let all = peers(&m, &AcceptRoutes::All, None, Some(25), NOW);
        assert_eq!(allowed(&all, 0), ["100.64.0.2/32", "fd7a:1::2/128", "10.2.0.0/16", "192.168.7.0/24"]);
        assert_eq!(all.specs[0].persistent_keepalive, Some(25));
        let within = peers(&m, &AcceptRoutes::Within(vec!["10.0.0.0/8".parse().unwrap()]), None, None, NOW);
        assert_eq!(allowed(&within, 0), ["100.64.0.2/32", "fd7a:1::2/128", "10.2.0.0/16"]);
        assert_eq!(all.specs[0].endpoint, Some("192.0.2.2:41641".parse().unwrap()), "the first reported endpoint");
        assert_eq!(all.specs[0].public_key, [2; 32]);
        assert_eq!(all.specs.len(), 2);
        assert!(all.skipped.is_empty());
    }

    #[test]
    fn a_malicious_server_cannot_route_host_addresses_or_everything_into_the_mesh() {
        let mut metadata = peer(2, key_text(2), &[]);
        metadata.ipv4 = "169.254.169.254".parse().unwrap();
        let mut lan_v6 = peer(3, key_text(3), &[]);
        lan_v6.ipv6 = "2001:470::1".parse().unwrap();
        let mut other_ula = peer(4, key_text(4), &[]);
        other_ula.ipv6 = "fd00:bad::4".parse().unwrap();
        let default_routes = peer(
            5,
            key_text(5),
            &[
                "0.0.0.0/0",
                "::/0",
                "10.5.0.0/16",
                "0.0.0.0/1",
                "128.0.0.0/1",
                "100.64.0.0/10",
                "100.64.0.1/32",
                "fd7a:1::/48",
            ],
        );
        let m = map(vec![metadata, lan_v6, other_ula, default_routes]);
        let all = peers(&m, &AcceptRoutes::All, None, None, NOW);
        assert_eq!(all.skipped.iter().map(|s| s.node_id).collect::<Vec<_>>(), [2, 3, 4], "refused and counted");
        assert_eq!(allowed(&all, 0), ["100.64.0.5/32", "fd7a:1::5/128", "10.5.0.0/16"], "no default route");
        // Only the exit node the node chose brings them, by name or by mesh address.
        for chosen in ["node-5", "100.64.0.5", "fd7a:1::5"] {
            let exit = peers(&m, &AcceptRoutes::None, Some(chosen), None, NOW);
            assert_eq!(allowed(&exit, 0), ["100.64.0.5/32", "fd7a:1::5/128", "0.0.0.0/0", "::/0"], "{chosen}");
        }
        assert_eq!(allowed(&peers(&m, &AcceptRoutes::All, Some("node-9"), None, NOW), 0).len(), 3);
        assert!(own_addresses_in_mesh(&m));
        let mut hijacked = m.clone();
        hijacked.node.ipv4 = "192.168.1.1".parse().unwrap();
        assert!(!own_addresses_in_mesh(&hijacked));
        let mut no_ula = m;
        no_ula.node.ipv6 = "2001:470::1".parse().unwrap();
        assert!(!own_addresses_in_mesh(&no_ula));
    }

    #[test]
    fn a_peer_whose_key_expired_is_dropped_by_the_node_itself() {
        let mut expiring = peer(2, key_text(2), &[]);
        expiring.key_expiry = Some(NOW + 60);
        let lasting = peer(3, key_text(3), &[]);
        let m = map(vec![expiring, lasting]);
        assert_eq!(peers(&m, &AcceptRoutes::None, None, None, NOW).specs.len(), 2);
        assert_eq!(next_key_expiry(&m, NOW), Some(NOW + 60));
        let later = peers(&m, &AcceptRoutes::None, None, None, NOW + 60);
        assert_eq!(later.specs.iter().map(|s| s.public_key[0]).collect::<Vec<_>>(), [3]);
        assert_eq!(later.skipped[0].reason, "its key has expired");
        assert_eq!(next_key_expiry(&m, NOW + 60), None);
    }

    #[test]
    fn bad_own_and_repeated_keys_skip_that_peer_only() {
        let m = map(vec![
            peer(2, "not base64!".into(), &[]),
            peer(3, base64::engine::general_purpose::STANDARD.encode([3u8; 31]), &[]),
            peer(4, key_text(1), &[]),
            peer(5, key_text(5), &[]),
            peer(6, key_text(5), &[]),
        ]);
        let out = peers(&m, &AcceptRoutes::All, None, None, NOW);
        assert_eq!(out.specs.len(), 1);
        assert_eq!(out.specs[0].public_key, [5; 32]);
        let skipped: Vec<u64> = out.skipped.iter().map(|s| s.node_id).collect();
        assert_eq!(skipped, [2, 3, 4, 6]);
    }

    #[test]
    fn a_peer_without_endpoints_waits_for_its_handshake() {
        let mut quiet = peer(2, key_text(2), &[]);
        quiet.endpoints.clear();
        assert_eq!(peers(&map(vec![quiet]), &AcceptRoutes::None, None, None, NOW).specs[0].endpoint, None);
    }

    #[test]
    fn only_approved_routes_are_served() {
        assert_eq!(served_routes(&map(Vec::new())), ["10.1.0.0/16".parse::<IpNet>().unwrap()]);
    }

    #[test]
    fn accepting_some_routes_takes_them_and_their_more_specifics_and_every_peer_address() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let accept = AcceptRoutes::Within(vec![net("10.52.0.0/16"), net("fd00:52::/48")]);
        for taken in ["10.52.0.0/16", "10.52.7.0/24", "fd00:52:0:1::/64", "100.64.0.2/32", "fd7a::2/128"] {
            assert!(accept.routes(&net(taken)), "{taken}");
        }
        for refused in ["10.0.0.0/8", "10.53.0.0/16", "0.0.0.0/0", "fd00::/16", "fd00:52:1::/64"] {
            assert!(!accept.routes(&net(refused)), "{refused}");
        }
        assert!(AcceptRoutes::All.routes(&net("0.0.0.0/0")));
        assert!(!AcceptRoutes::None.routes(&net("10.0.0.0/8")) && AcceptRoutes::None.routes(&net("100.64.0.2/32")));
    }

    #[test]
    fn accept_routes_parse_as_the_flag_takes_them_and_store_as_before() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(AcceptRoutes::parse("true"), Ok(AcceptRoutes::All));
        assert_eq!(AcceptRoutes::parse(""), Ok(AcceptRoutes::All));
        assert_eq!(AcceptRoutes::parse("false"), Ok(AcceptRoutes::None));
        assert_eq!(
            AcceptRoutes::parse("10.52.1.0/16, fd00::/48"),
            Ok(AcceptRoutes::Within(vec![net("10.52.0.0/16"), net("fd00::/48")]))
        );
        assert!(AcceptRoutes::parse("10.52.0.0/33").unwrap_err().contains("--accept-routes"));
        // The spelling preferences files already hold.
        assert_eq!(serde_json::to_string(&AcceptRoutes::None).unwrap(), r#""none""#);
        let within: AcceptRoutes = serde_json::from_str(r#"{"within":["10.52.0.0/16"]}"#).unwrap();
        assert_eq!(within, AcceptRoutes::Within(vec![net("10.52.0.0/16")]));
    }
}
