//! What the SNAT engine needs to know about an address family, so one implementation serves both.

use core::fmt::Debug;
use core::hash::{Hash, Hasher};
use core::net::{Ipv4Addr, Ipv6Addr};

use crate::checksum::Delta;
use crate::wire::{self, IpVersion, Layout, PROTO_ICMP, PROTO_ICMPV6, field};

pub trait Family: Copy + Eq + Hash + Debug + 'static {
    const VERSION: IpVersion;
    const LEN: usize;
    /// Offsets of the source and destination addresses in the IP header.
    const SRC: usize;
    const DST: usize;
    const ICMP: u8;
    /// IPv4 has a header checksum; IPv6 does not, but its ICMP checksum covers the pseudo-header.
    const HAS_HEADER_CHECKSUM: bool;

    /// [`wire::parse`](crate::wire::parse) for a packet already known to be of this family.
    fn parse(packet: &[u8]) -> Result<Layout, wire::Error>;
    fn read(packet: &[u8], at: usize) -> Self;
    /// Writes `self` at `at`, recording the change of every word in `delta`.
    fn write(self, packet: &mut [u8], at: usize, delta: &mut Delta);
    fn hash_into<H: Hasher>(self, hasher: &mut H);
}

impl Family for Ipv4Addr {
    const VERSION: IpVersion = IpVersion::V4;
    const LEN: usize = 4;
    const SRC: usize = field::ipv4::SRC.start;
    const DST: usize = field::ipv4::DST.start;
    const ICMP: u8 = PROTO_ICMP;
    const HAS_HEADER_CHECKSUM: bool = true;

    #[inline]
    fn parse(packet: &[u8]) -> Result<Layout, wire::Error> {
        wire::parse_v4(packet, wire::Extent::Whole)
    }

    #[inline]
    fn read(packet: &[u8], at: usize) -> Self {
        Ipv4Addr::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3])
    }

    #[inline]
    fn write(self, packet: &mut [u8], at: usize, delta: &mut Delta) {
        let new = self.octets();
        delta.bytes(&packet[at..at + 4], &new);
        packet[at..at + 4].copy_from_slice(&new);
    }

    #[inline]
    fn hash_into<H: Hasher>(self, hasher: &mut H) {
        hasher.write_u32(self.to_bits());
    }
}

impl Family for Ipv6Addr {
    const VERSION: IpVersion = IpVersion::V6;
    const LEN: usize = 16;
    const SRC: usize = field::ipv6::SRC.start;
    const DST: usize = field::ipv6::DST.start;
    const ICMP: u8 = PROTO_ICMPV6;
    const HAS_HEADER_CHECKSUM: bool = false;

    #[inline]
    fn parse(packet: &[u8]) -> Result<Layout, wire::Error> {
        wire::parse_v6(packet, wire::Extent::Whole)
    }

    #[inline]
    fn read(packet: &[u8], at: usize) -> Self {
        Ipv6Addr::from(<[u8; 16]>::try_from(&packet[at..at + 16]).expect("16 bytes"))
    }

    #[inline]
    fn write(self, packet: &mut [u8], at: usize, delta: &mut Delta) {
        let new = self.octets();
        delta.bytes(&packet[at..at + 16], &new);
        packet[at..at + 16].copy_from_slice(&new);
    }

    #[inline]
    fn hash_into<H: Hasher>(self, hasher: &mut H) {
        hasher.write_u128(self.to_bits());
    }
}
