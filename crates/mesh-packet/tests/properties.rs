//! Invariants of the packet layer, checked over generated packets.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::*;
use mesh_packet::build::{Builder, Transport};
use mesh_packet::checksum::{self, Delta};
use mesh_packet::snat::{Snat, SnatConfig};
use mesh_packet::wire::{self, TCP_ACK, TCP_SYN};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Flow {
    client: IpAddr,
    server: IpAddr,
    transport: Transport,
    payload: Vec<u8>,
}

fn transport() -> impl Strategy<Value = Transport> {
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            any::<u32>(),
            any::<u32>(),
            prop_oneof![Just(TCP_SYN), Just(TCP_ACK), Just(0x18u8)]
        )
            .prop_map(|(s, d, seq, ack, flags)| Transport::Tcp { src_port: s, dst_port: d, seq, ack, flags }),
        (any::<u16>(), any::<u16>()).prop_map(|(s, d)| Transport::Udp { src_port: s, dst_port: d }),
        (any::<u16>(), any::<u16>()).prop_map(|(ident, seq)| Transport::Echo { request: true, ident, seq }),
    ]
}

fn flow() -> impl Strategy<Value = Flow> {
    let v4 = (any::<[u8; 4]>(), any::<[u8; 4]>()).prop_map(|(c, s)| (IpAddr::from(c), IpAddr::from(s)));
    let v6 = (any::<[u8; 16]>(), any::<[u8; 16]>()).prop_map(|(c, s)| (IpAddr::from(c), IpAddr::from(s)));
    (prop_oneof![v4, v6], transport(), proptest::collection::vec(any::<u8>(), 0..1400))
        .prop_filter("client and server differ from the SNAT addresses", |((c, s), _, _)| {
            c != s && ![snat4(), snat6_ip()].contains(c) && ![snat4(), snat6_ip()].contains(s)
        })
        .prop_map(|((client, server), transport, payload)| Flow { client, server, transport, payload })
}

fn snat4() -> IpAddr {
    IpAddr::V4(SNAT)
}
fn snat6_ip() -> IpAddr {
    IpAddr::V6(snat6())
}

fn build(src: IpAddr, dst: IpAddr, t: Transport, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Builder::v4(s.octets(), d.octets()).transport(t, payload),
        (IpAddr::V6(s), IpAddr::V6(d)) => Builder::v6(s.octets(), d.octets()).transport(t, payload),
        _ => unreachable!("one family per flow"),
    }
}

/// The reply a server would send to `t`: ports swapped, echo request answered.
fn reply_transport(t: Transport) -> Transport {
    match t {
        Transport::Tcp { src_port, dst_port, seq, ack, flags } => {
            Transport::Tcp { src_port: dst_port, dst_port: src_port, seq: ack, ack: seq, flags }
        }
        Transport::Udp { src_port, dst_port } => Transport::Udp { src_port: dst_port, dst_port: src_port },
        Transport::Echo { ident, seq, .. } => Transport::Echo { request: false, ident, seq },
        other => other,
    }
}

/// The transport fields of an IP packet without extension headers, as the builder would take them.
fn read_transport(p: &[u8], original: Transport) -> Transport {
    let l4 = wire::parse(p).unwrap().l4_offset;
    let at = |o: usize| u16_at(p, l4 + o);
    match original {
        Transport::Tcp { seq, ack, flags, .. } => Transport::Tcp { src_port: at(0), dst_port: at(2), seq, ack, flags },
        Transport::Udp { .. } => Transport::Udp { src_port: at(0), dst_port: at(2) },
        Transport::Echo { request, seq, .. } => Transport::Echo { request, ident: at(4), seq },
        other => other,
    }
}

fn addrs(p: &[u8]) -> (IpAddr, IpAddr) {
    match p[0] >> 4 {
        4 => (IpAddr::V4(src4(p)), IpAddr::V4(dst4(p))),
        _ => (IpAddr::V6(src6(p)), IpAddr::V6(dst6(p))),
    }
}

/// Offset of the transport checksum within the transport header.
fn checksum_offset(protocol: u8) -> usize {
    match protocol {
        wire::PROTO_TCP => 16,
        wire::PROTO_UDP => 6,
        _ => 2,
    }
}

/// Recomputes the transport checksum of `p` from scratch, as a sender would.
fn full_transport_checksum(p: &[u8]) -> u16 {
    let layout = wire::parse(p).unwrap();
    let (src, dst): (Vec<u8>, Vec<u8>) = match addrs(p) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (s.octets().to_vec(), d.octets().to_vec()),
        (IpAddr::V6(s), IpAddr::V6(d)) => (s.octets().to_vec(), d.octets().to_vec()),
        _ => unreachable!(),
    };
    let at = checksum_offset(layout.protocol);
    let mut copy = p[layout.l4_offset..layout.packet_len].to_vec();
    copy[at..at + 2].copy_from_slice(&[0, 0]);
    let initial = if layout.protocol == wire::PROTO_ICMP {
        0
    } else {
        checksum::pseudo_header_sum(&src, &dst, layout.protocol, copy.len() as u32)
    };
    let c = checksum::finish(checksum::sum(&copy, initial));
    if layout.protocol == wire::PROTO_UDP && c == 0 { 0xffff } else { c }
}

fn stored_transport_checksum(p: &[u8]) -> u16 {
    let layout = wire::parse(p).unwrap();
    u16_at(p, layout.l4_offset + checksum_offset(layout.protocol))
}

fn engine(now: Instant) -> Snat {
    // A small pool keeps thousands of engine constructions cheap in a debug build.
    let mut config = SnatConfig::new(Some(SNAT), Some(snat6()));
    config.ports = 30000..=30999;
    Snat::new(config, now).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Outbound then the server's reply inbound: the client receives exactly the reply the server would
    /// have sent it without NAT, byte for byte, checksums included.
    #[test]
    fn translate_then_reverse_restores_headers(f in flow()) {
        let now = Instant::now();
        let mut snat = engine(now);
        let mut out = build(f.client, f.server, f.transport, &f.payload);
        snat.outbound(&mut out, now).unwrap();
        let (nat_src, nat_dst) = addrs(&out);
        prop_assert!(snat.is_snat_address(nat_src));
        prop_assert_eq!(nat_dst, f.server);
        assert_checksums_valid(&out);

        let seen = read_transport(&out, f.transport);
        let mut reply = build(f.server, nat_src, reply_transport(seen), &f.payload);
        snat.inbound(&mut reply, now).unwrap();
        let expected = build(f.server, f.client, reply_transport(f.transport), &f.payload);
        prop_assert_eq!(reply, expected);
    }

    /// Every checksum the engine adjusts equals what a full recompute gives, bit for bit.
    #[test]
    fn incremental_checksums_equal_full_recompute(f in flow()) {
        let now = Instant::now();
        let mut snat = engine(now);
        let mut p = build(f.client, f.server, f.transport, &f.payload);
        snat.outbound(&mut p, now).unwrap();
        prop_assert_eq!(stored_transport_checksum(&p), full_transport_checksum(&p));
        if p[0] >> 4 == 4 {
            let mut header = p[..20].to_vec();
            header[10..12].copy_from_slice(&[0, 0]);
            prop_assert_eq!(u16_at(&p, 10), checksum::checksum(&header));
        }
    }

    /// RFC 1624 equation 3 over arbitrary data and arbitrary word changes equals a full recompute.
    #[test]
    fn delta_equals_full_recompute(
        mut data in proptest::collection::vec(any::<u8>(), 2..256),
        changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u16>()), 1..8),
    ) {
        if data.len() % 2 == 1 { data.pop(); }
        let before = checksum::checksum(&data);
        let mut delta = Delta::default();
        for (index, new) in changes {
            let at = index.index(data.len() / 2) * 2;
            let old = u16::from_be_bytes([data[at], data[at + 1]]);
            delta.word(old, new);
            data[at..at + 2].copy_from_slice(&new.to_be_bytes());
        }
        let after = checksum::checksum(&data);
        // Ones'-complement has two zeros; a sum that is all ones either way is the same checksum.
        let incremental = delta.apply(before);
        prop_assert!(incremental == after || (incremental, after) == (0xffff, 0) || (incremental, after) == (0, 0xffff),
            "incremental {incremental:#06x} full {after:#06x}");
    }

    /// ICMP errors quoting any prefix of a translated packet are translated back with valid checksums.
    #[test]
    fn icmp_errors_about_any_quote_length_are_valid(f in flow(), cut in 0usize..1400) {
        let now = Instant::now();
        let mut snat = engine(now);
        let mut out = build(f.client, f.server, f.transport, &f.payload);
        snat.outbound(&mut out, now).unwrap();
        let (nat_src, _) = addrs(&out);
        let header = if out[0] >> 4 == 4 { 20 } else { 40 };
        let quote_len = (header + 8 + cut).min(out.len());
        let quote = &out[..quote_len];
        let mut err = match (f.server, nat_src) {
            (IpAddr::V4(s), IpAddr::V4(d)) => Builder::v4(s.octets(), d.octets()).icmp_error(11, 0, 0, quote),
            (IpAddr::V6(s), IpAddr::V6(d)) => Builder::v6(s.octets(), d.octets()).icmp_error(3, 0, 0, quote),
            _ => unreachable!(),
        };
        snat.inbound(&mut err, now).unwrap();
        assert_checksums_valid(&err);
        let inner = header + 8;
        let original = build(f.client, f.server, f.transport, &f.payload);
        let mut quoted = err[inner..].to_vec();
        let mut expected = original[..quote_len].to_vec();
        // A quote that ends halfway through the transport checksum keeps that half as it was: the carry
        // into it depends on the byte that was cut off.
        let checksum_at = header + checksum_offset(wire::parse(&original).unwrap().protocol);
        if quote_len == checksum_at + 1 {
            quoted.pop();
            expected.pop();
        }
        prop_assert_eq!(quoted, expected, "the quote is the client's own packet again");
    }

    /// Nothing panics on arbitrary bytes, in either direction, with or without state.
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..1600)) {
        mesh_packet::fuzzing::translate(&data);
    }

    /// Nothing panics on valid packets with bytes flipped or cut short, the inputs most likely to reach
    /// deep into the parsers.
    #[test]
    fn damaged_packets_never_panic(
        f in flow(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        keep in any::<prop::sample::Index>(),
    ) {
        let now = Instant::now();
        let mut snat = engine(now);
        let mut p = build(f.client, f.server, f.transport, &f.payload);
        let mut established = p.clone();
        let _ = snat.outbound(&mut established, now);
        for (at, value) in flips {
            let i = at.index(p.len());
            p[i] ^= value;
        }
        p.truncate(keep.index(p.len() + 1));
        let mut q = p.clone();
        let _ = snat.outbound(&mut p, now);
        let _ = snat.inbound(&mut q, now + Duration::from_secs(1));
        let mut err = Builder::v4(SERVER.octets(), SNAT.octets()).icmp_error(3, 4, 0, &established[..established.len().min(60)]);
        let cut = keep.index(err.len() + 1);
        let _ = snat.inbound(&mut err[..cut], now);
        let _ = wire::parse_quoted(&q);
    }
}

#[test]
fn many_clients_get_distinct_ports() {
    let now = Instant::now();
    let mut snat = Snat::new(SnatConfig::new(Some(SNAT), None), now).unwrap();
    let mut seen = std::collections::HashSet::new();
    for i in 0..5000u32 {
        let client = Ipv4Addr::from(0x6440_0000 + i);
        let mut p = Builder::v4(client.octets(), SERVER.octets()).udp(4000, 53, b"");
        snat.outbound(&mut p, now).unwrap();
        assert!(seen.insert(u16_at(&p, 20)), "external port handed out twice");
    }
}
