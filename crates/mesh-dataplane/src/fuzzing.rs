//! The body of the `datagram` fuzz target, shared with the property test that runs it on every CI run.

use std::net::SocketAddr;
use std::time::Instant;

use crate::{Node, PeerSpec};

/// A node with two configured peers, one of them with a live session, so arbitrary bytes meet every branch:
/// unknown indices, the live session's index, handshake parsing.
pub fn established_pair() -> (Node, Node) {
    let key_a = [0x11; 32];
    let key_b = [0x22; 32];
    let mut a = Node::new(key_a, 1);
    let mut b = Node::new(key_b, 2);
    let endpoint_a: SocketAddr = ([192, 0, 2, 1], 41641).into();
    let endpoint_b: SocketAddr = ([192, 0, 2, 2], 41641).into();
    let spec = |key, endpoint, allowed: &str| PeerSpec {
        public_key: Node::public_key_of(key),
        preshared_key: None,
        endpoint: Some(endpoint),
        allowed_ips: vec![allowed.parse().expect("literal prefix")],
        persistent_keepalive: None,
    };
    a.add_peer(spec(key_b, endpoint_b, "100.64.0.2/32")).expect("new peer");
    a.add_peer(spec([0x33; 32], ([192, 0, 2, 3], 41641).into(), "100.64.0.3/32")).expect("new peer");
    b.add_peer(spec(key_a, endpoint_a, "100.64.0.1/32")).expect("new peer");
    // A ping from a to b triggers the handshake; carry it across so both hold a session.
    let mut ping = vec![0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 1, 0, 0, 100, 64, 0, 1, 100, 64, 0, 2];
    ping.extend_from_slice(&[8, 0, 0xf7, 0xff, 0, 0, 0, 0]);
    let _ = a.handle_tun_packet(&ping, Instant::now());
    let mut out = vec![0u8; 2048];
    for _ in 0..4 {
        while let Some(t) = a.poll_transmit() {
            let _ = b.handle_datagram(endpoint_a, &t.payload, Instant::now(), &mut out);
        }
        while let Some(t) = b.poll_transmit() {
            let _ = a.handle_datagram(endpoint_b, &t.payload, Instant::now(), &mut out);
        }
    }
    (a, b)
}

/// Feeds arbitrary bytes to a node as a datagram and as a TUN packet. The first byte, if it is 4, makes the
/// rest a data message for the live session's index, so the fuzzer reaches decryption, not just parsing.
pub fn datagram(node: &mut Node, data: &[u8]) {
    let mut out = vec![0u8; data.len() + 64];
    let from: SocketAddr = ([192, 0, 2, 2], 41641).into();
    let _ = node.handle_datagram(from, data, Instant::now(), &mut out);
    let _ = node.handle_tun_packet(data, Instant::now());
    node.handle_timeout(Instant::now());
    while let Some(t) = node.poll_transmit() {
        node.recycle(t.payload);
    }
}

/// The body of the `netmap` fuzz target: a netmap from the coordination server (untrusted to the node) turned
/// into peers under every acceptance setting. However odd the map, no key is configured twice, this node is
/// never its own peer, every peer keeps its mesh addresses, and only approved routes are served.
pub fn netmap(map: &mesh_proto::NetMap) {
    use crate::netmap::{AcceptRoutes, peers, served_routes};
    let within = AcceptRoutes::Within(vec!["10.0.0.0/8".parse().expect("literal prefix")]);
    for accept in [AcceptRoutes::None, AcceptRoutes::All, within] {
        let out = peers(map, &accept, None, Some(25), 1_800_000_000);
        let mut keys: Vec<_> = out.specs.iter().map(|s| s.public_key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), out.specs.len(), "a key configured twice");
        assert_eq!(out.specs.len() + out.skipped.len(), map.peers.len(), "every peer configured or reported");
        for spec in &out.specs {
            assert!(spec.allowed_ips.len() >= 2, "a peer lost its mesh addresses");
            if accept == AcceptRoutes::None {
                assert_eq!(spec.allowed_ips.len(), 2, "a subnet route accepted without --accept-routes");
            }
        }
    }
    for route in served_routes(map) {
        assert!(map.routes.iter().any(|r| r.prefix == route && r.approved), "{route} served unapproved");
    }
}

/// A resolver with a node, an extra record, split zones and upstreams, so queries meet every branch.
pub fn resolver() -> crate::dns::Resolver {
    use crate::dns::{RESOLVER_V4, ResolverConfig, mesh_ranges, resolver_v6};
    use std::net::IpAddr;
    let own: IpAddr = "fd7a:115c:a1e0::1".parse().expect("literal");
    let (mesh_v4, mesh_v6) = mesh_ranges(&["100.64.0.1".parse().expect("literal"), own]);
    crate::dns::Resolver::new(ResolverConfig {
        addresses: vec![
            IpAddr::V4(RESOLVER_V4),
            IpAddr::V6(resolver_v6("fd7a:115c:a1e0::1".parse().expect("literal"))),
        ],
        domain: "mesh.internal".into(),
        magic_dns: true,
        hosts: vec![(
            "db".into(),
            vec!["100.64.0.2".parse().expect("literal"), "fd7a:115c:a1e0::2".parse().expect("literal")],
        )],
        extra: vec![("langfuse.cwiq.io".into(), "100.64.0.2".parse().expect("literal"))],
        split: vec![
            ("shared.cwiq.io".into(), vec!["10.0.0.2:53".parse().expect("literal")]),
            ("corp.internal".into(), vec![]),
        ],
        upstreams: vec!["192.0.2.53:53".parse().expect("literal")],
        mesh_v4,
        mesh_v6,
    })
}

/// The body of the `dns` fuzz target: arbitrary bytes as a query over UDP and TCP, and as an upstream's
/// answer to itself. A reply is always a readable DNS message with the query's id, and a UDP reply never
/// exceeds what any client may be sent.
pub fn dns(resolver: &crate::dns::Resolver, data: &[u8]) {
    use crate::dns::Answer;
    for over_tcp in [false, true] {
        if let Answer::Reply(reply) = resolver.answer(data, over_tcp) {
            let message = hickory_proto::op::Message::from_vec(&reply).expect("a reply parses");
            assert_eq!(reply[..2], data[..2], "the reply carries the query's id");
            assert_eq!(message.metadata.message_type, hickory_proto::op::MessageType::Response);
            assert!(over_tcp || reply.len() <= 4095, "a UDP reply of {} bytes", reply.len());
        }
    }
    if let Some(relayed) = crate::dns::relay_answer(data, Some(data), false) {
        assert!(relayed.len() <= 4095);
    }
}
