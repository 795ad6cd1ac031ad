//! Helpers shared by the integration tests: an independent checksum oracle (smoltcp) and packet makers.
#![allow(dead_code)]

use std::net::{Ipv4Addr, Ipv6Addr};

use smoltcp::wire::{Icmpv4Packet, Icmpv6Packet, IpAddress, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 7);
pub const CLIENT2: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 8);
pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 12, 50);
pub const SERVER2: Ipv4Addr = Ipv4Addr::new(10, 0, 12, 51);
pub const SNAT: Ipv4Addr = Ipv4Addr::new(10, 0, 12, 9);
pub const ROUTER_ON_PATH: Ipv4Addr = Ipv4Addr::new(10, 0, 12, 1);

pub fn v6(s: &str) -> Ipv6Addr {
    s.parse().expect("valid IPv6 literal")
}

pub fn client6() -> Ipv6Addr {
    v6("fd7a:115c:a1e0::7")
}
pub fn server6() -> Ipv6Addr {
    v6("fd00:a::50")
}
pub fn snat6() -> Ipv6Addr {
    v6("fd00:a::9")
}

/// Asserts that every checksum in `packet` is correct, using smoltcp's verifiers rather than ours. For a
/// later fragment only the IP header can be checked; for a first fragment the transport checksum covers
/// data we do not have, so it is skipped too.
pub fn assert_checksums_valid(packet: &[u8]) {
    match packet[0] >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).expect("IPv4 header");
            assert!(ip.verify_checksum(), "IPv4 header checksum");
            if ip.more_frags() || ip.frag_offset() != 0 {
                return;
            }
            let (src, dst) = (IpAddress::Ipv4(ip.src_addr()), IpAddress::Ipv4(ip.dst_addr()));
            let payload = ip.payload();
            match u8::from(ip.next_header()) {
                6 => assert!(TcpPacket::new_checked(payload).unwrap().verify_checksum(&src, &dst), "TCP checksum"),
                17 => {
                    let udp = UdpPacket::new_checked(payload).unwrap();
                    assert!(udp.checksum() == 0 || udp.verify_checksum(&src, &dst), "UDP checksum");
                }
                1 => assert!(Icmpv4Packet::new_checked(payload).unwrap().verify_checksum(), "ICMP checksum"),
                other => panic!("unexpected protocol {other}"),
            }
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).expect("IPv6 header");
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            let payload = ip.payload();
            match u8::from(ip.next_header()) {
                6 => assert!(
                    TcpPacket::new_checked(payload).unwrap().verify_checksum(&src.into(), &dst.into()),
                    "TCP checksum"
                ),
                17 => assert!(
                    UdpPacket::new_checked(payload).unwrap().verify_checksum(&src.into(), &dst.into()),
                    "UDP checksum"
                ),
                58 => {
                    assert!(Icmpv6Packet::new_checked(payload).unwrap().verify_checksum(&src, &dst), "ICMPv6 checksum")
                }
                44 => {}
                other => panic!("unexpected next header {other}"),
            }
        }
        v => panic!("not an IP packet (version {v})"),
    }
}

/// Asserts that the IPv4 header quoted in an ICMPv4 error at `inner` has a valid header checksum.
pub fn assert_quoted_v4_header_valid(packet: &[u8], inner: usize) {
    let header_len = usize::from(packet[inner] & 0x0f) * 4;
    let sum = mesh_packet::checksum::fold(mesh_packet::checksum::sum(&packet[inner..inner + header_len], 0));
    assert_eq!(sum, 0xffff, "quoted IPv4 header checksum");
}

pub fn src4(p: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(p[12], p[13], p[14], p[15])
}
pub fn dst4(p: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(p[16], p[17], p[18], p[19])
}
pub fn src6(p: &[u8]) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&p[8..24]).unwrap())
}
pub fn dst6(p: &[u8]) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&p[24..40]).unwrap())
}
pub fn u16_at(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}
