//! Golden tests from real packets: `tests/golden/*.pcap` hold what tcpdump saw on the client's and the
//! router's TUN devices in the S1 topology with real meshd daemons (`cargo xtask capture-golden` records them
//! again). The client's side is what the router's data plane received from or sent into the tunnel; the
//! router's side is what it wrote to or read from its TUN device. So replaying one side through this crate's
//! MSS clamp and SNAT engine must give the other side byte for byte: a TCP SYN with Linux's options, the
//! SYN-ACK whose MSS the router clamped, ICMP fragmentation-needed quoting a SNAT'd data segment, a UDP
//! datagram and an ICMP echo. The external port each flow got is read from the capture and given to the
//! engine as its only port, the one choice the capture cannot fix by itself.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use mesh_packet::snat::{Snat, SnatConfig};
use mesh_packet::wire::{self, Fragment, IcmpHeader, Ipv4Header, TCP_ACK, TCP_SYN, TcpHeader, UdpHeader};

const CLIENT_TUN: &[u8] = include_bytes!("golden/client-tun.pcap");
const ROUTER_TUN: &[u8] = include_bytes!("golden/router-tun.pcap");

/// The tunnel MTU both daemons ran with.
const MTU: u16 = 1420;
const SNAT_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 12, 9);
const CLIENT: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

/// The packets of a classic pcap file with raw IP link type (what tcpdump writes for a TUN device).
fn packets(pcap: &[u8]) -> Vec<Vec<u8>> {
    let magic = u32::from_le_bytes(pcap[0..4].try_into().unwrap());
    assert!(magic == 0xa1b2_c3d4 || magic == 0xa1b2_3c4d, "a little-endian pcap file");
    let link_type = u32::from_le_bytes(pcap[20..24].try_into().unwrap());
    assert!(link_type == 101 || link_type == 12, "raw IP link type, got {link_type}");
    let (mut at, mut out) = (24, Vec::new());
    while at + 16 <= pcap.len() {
        let captured = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().unwrap()) as usize;
        let original = u32::from_le_bytes(pcap[at + 12..at + 16].try_into().unwrap()) as usize;
        assert_eq!(captured, original, "every packet captured whole");
        out.push(pcap[at + 16..at + 16 + captured].to_vec());
        at += 16 + captured;
    }
    out
}

fn ip(packet: &[u8]) -> Ipv4Header<&[u8]> {
    Ipv4Header::new_checked(packet).expect("a whole IPv4 packet")
}

fn tcp(packet: &[u8]) -> TcpHeader<&[u8]> {
    let layout = wire::parse(packet).expect("parses");
    TcpHeader::new_checked(&packet[layout.l4_offset..layout.packet_len]).expect("a TCP header")
}

fn find(packets: &[Vec<u8>], what: &str, matches: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    packets.iter().find(|p| matches(p)).unwrap_or_else(|| panic!("no {what} in the capture")).clone()
}

fn is_tcp(p: &[u8], flags: u8) -> bool {
    ip(p).protocol() == wire::PROTO_TCP && tcp(p).flags() == flags
}

fn is_frag_needed(p: &[u8]) -> bool {
    ip(p).protocol() == wire::PROTO_ICMP && {
        let icmp = IcmpHeader::new_checked(&p[ip(p).header_len()..]).unwrap();
        (icmp.msg_type(), icmp.code()) == (3, 4)
    }
}

/// An engine whose only external port is `port`, so it makes the choice the router made.
fn engine(port: u16, now: Instant) -> Snat {
    let mut config = SnatConfig::new(Some(SNAT_ADDRESS), None);
    config.ports = port..=port;
    Snat::new(config, now).unwrap()
}

#[test]
fn the_captures_parse_as_what_they_are() {
    let client = packets(CLIENT_TUN);
    let router = packets(ROUTER_TUN);
    assert!(client.len() >= 20 && router.len() >= 20, "{} and {} packets", client.len(), router.len());
    for p in client.iter().chain(&router) {
        let layout = wire::parse(p).expect("every captured packet parses");
        assert_eq!((layout.version, layout.fragment, layout.l4_offset), (wire::IpVersion::V4, Fragment::Whole, 20));
        assert_eq!(layout.packet_len, p.len());
        assert!(ip(p).verify_checksum());
    }
    // Linux's SYN: MSS, SACK permitted, timestamps, NOP, window scale: 20 bytes of options.
    let syn = find(&client, "SYN", |p| is_tcp(p, TCP_SYN));
    let header = tcp(&syn);
    assert_eq!((header.dst_port(), header.header_len(), header.options().len()), (8080, 40, 20));
    assert_eq!(&header.options()[..4], &[2, 4, 0x05, 0x64], "MSS 1380: the client's TUN MTU 1420 less 40");
    assert_eq!(ip(&syn).src(), CLIENT);
    assert!(ip(&syn).dont_fragment());
    // The router's kernel quoted the SNAT'd segment in its fragmentation-needed message.
    let error = find(&router, "fragmentation-needed", is_frag_needed);
    let quoted = IcmpHeader::new_checked(&error[20..]).unwrap().error_payload().to_vec();
    let layout = wire::parse_quoted(&quoted).expect("the quote parses");
    assert!(layout.packet_len < usize::from(Ipv4Header::new_quoted(&quoted[..]).unwrap().total_len()), "truncated");
    assert_eq!(Ipv4Header::new_quoted(&quoted[..]).unwrap().src(), SNAT_ADDRESS);
}

#[test]
fn tcp_syn_syn_ack_and_fragmentation_needed_translate_exactly_as_the_router_did() {
    let (client, router) = (packets(CLIENT_TUN), packets(ROUTER_TUN));
    let now = Instant::now();
    let sent = find(&client, "SYN", |p| is_tcp(p, TCP_SYN));
    let forwarded = find(&router, "SNAT'd SYN", |p| is_tcp(p, TCP_SYN) && ip(p).src() == SNAT_ADDRESS);
    let port = tcp(&forwarded).src_port();
    let mut snat = engine(port, now);

    // From the mesh: clamp, then translate (Router::from_mesh's order).
    let mut packet = sent.clone();
    mesh_packet::mss::clamp(&mut packet, MTU);
    snat.outbound(&mut packet, now).unwrap();
    assert_eq!(packet, forwarded, "the SYN as the router wrote it to its TUN device");

    // Toward the mesh: translate back, then clamp (Router::to_mesh's order). The server offered MSS 1460.
    let answered = find(&router, "SYN-ACK", |p| is_tcp(p, TCP_SYN | TCP_ACK));
    assert_eq!(&tcp(&answered).options()[..4], &[2, 4, 0x05, 0xb4]);
    let mut packet = answered.clone();
    snat.inbound(&mut packet, now).unwrap();
    assert!(mesh_packet::mss::clamp(&mut packet, MTU), "the router clamped it");
    let delivered = find(&client, "SYN-ACK", |p| is_tcp(p, TCP_SYN | TCP_ACK));
    assert_eq!(packet, delivered, "the SYN-ACK as the client received it");

    // The LAN link's MTU is 1280: the router's kernel answers the SNAT address, quoting the translated
    // segment; the client must get it quoting its own.
    let mut packet = find(&router, "fragmentation-needed", is_frag_needed);
    snat.inbound(&mut packet, now).unwrap();
    let expected = find(&client, "fragmentation-needed", is_frag_needed);
    assert_eq!(packet, expected, "outer header, quoted header, quoted ports and every checksum");
    assert_eq!(ip(&packet).dst(), CLIENT);
}

#[test]
fn udp_and_icmp_echo_translate_exactly_as_the_router_did() {
    let (client, router) = (packets(CLIENT_TUN), packets(ROUTER_TUN));
    let now = Instant::now();
    let udp = |p: &[u8]| ip(p).protocol() == wire::PROTO_UDP;
    let udp_port = |p: &[u8]| UdpHeader::new_checked(&p[20..]).unwrap().src_port();
    let sent = find(&client, "UDP query", |p| udp(p) && ip(p).src() == CLIENT);
    let forwarded = find(&router, "SNAT'd UDP query", |p| udp(p) && ip(p).src() == SNAT_ADDRESS);
    assert_eq!(udp_port(&sent), 40053);
    let mut snat = engine(udp_port(&forwarded), now);
    let mut packet = sent.clone();
    snat.outbound(&mut packet, now).unwrap();
    assert_eq!(packet, forwarded);

    let echo = |p: &[u8], kind: u8| {
        ip(p).protocol() == wire::PROTO_ICMP && IcmpHeader::new_checked(&p[20..]).unwrap().msg_type() == kind
    };
    let request = find(&client, "echo request", |p| echo(p, 8) && ip(p).dst() == Ipv4Addr::new(10, 0, 12, 50));
    let forwarded = find(&router, "SNAT'd echo request", |p| echo(p, 8) && ip(p).src() == SNAT_ADDRESS);
    let ident = IcmpHeader::new_checked(&forwarded[20..]).unwrap().echo_ident();
    let mut snat = engine(ident, now);
    let mut packet = request.clone();
    snat.outbound(&mut packet, now).unwrap();
    assert_eq!(packet, forwarded, "the identifier is mapped like a port");
    let reply = find(&router, "echo reply", |p| echo(p, 0) && ip(p).dst() == SNAT_ADDRESS);
    let mut packet = reply.clone();
    snat.inbound(&mut packet, now).unwrap();
    let delivered = find(&client, "echo reply", |p| echo(p, 0) && ip(p).dst() == CLIENT);
    assert_eq!(packet, delivered);
    assert_eq!(wire::source(&delivered), Some(IpAddr::V4(Ipv4Addr::new(10, 0, 12, 50))));
}
