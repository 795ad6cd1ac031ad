//! Zero-copy views of IPv4, IPv6, TCP, UDP and ICMP headers, and [`parse`], which walks a packet from the
//! IP header to its transport header once and records where everything is.
//!
//! The views follow smoltcp's `wire` shape (`new_checked`, getters over the borrowed bytes, setters when
//! the buffer is mutable). We keep our own rather than smoltcp's because the SNAT engine must also read the
//! packet embedded in an ICMP error, which is truncated by definition: smoltcp's checked views reject a
//! header whose length field exceeds the bytes present, and that is exactly the case here.

use core::net::{Ipv4Addr, Ipv6Addr};

pub const PROTO_HOPOPTS: u8 = 0;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ROUTING: u8 = 43;
pub const PROTO_FRAGMENT: u8 = 44;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_DSTOPTS: u8 = 60;

pub const IPV4_HEADER_LEN: usize = 20;
pub const IPV6_HEADER_LEN: usize = 40;
pub const TCP_HEADER_LEN: usize = 20;
pub const UDP_HEADER_LEN: usize = 8;
pub const ICMP_HEADER_LEN: usize = 8;

/// Where each header field is, by name: the one definition of the header layouts every reader and writer
/// of packet bytes uses (smoltcp's `mod field` pattern). A range is a multi-byte field, big-endian; a
/// `usize` is a single byte.
pub mod field {
    pub type Field = core::ops::Range<usize>;

    pub mod ipv4 {
        use super::Field;
        /// Version (high nibble) and header length in 32-bit words (low nibble).
        pub const VER_IHL: usize = 0;
        pub const TOTAL_LEN: Field = 2..4;
        pub const IDENT: Field = 4..6;
        /// Flags (top three bits: reserved, DF, MF) and the fragment offset in 8-byte units.
        pub const FLAGS_FRAG_OFFSET: Field = 6..8;
        pub const TTL: usize = 8;
        pub const PROTOCOL: usize = 9;
        pub const CHECKSUM: Field = 10..12;
        pub const SRC: Field = 12..16;
        pub const DST: Field = 16..20;
    }

    pub mod ipv6 {
        use super::Field;
        pub const PAYLOAD_LEN: Field = 4..6;
        pub const NEXT_HEADER: usize = 6;
        pub const HOP_LIMIT: usize = 7;
        pub const SRC: Field = 8..24;
        pub const DST: Field = 24..40;
    }

    /// An IPv6 extension header (hop-by-hop, routing, destination options) and the fragment header.
    pub mod ipv6_ext {
        use super::Field;
        pub const NEXT_HEADER: usize = 0;
        /// Length in 8-byte units, not counting the first 8 (not in the fragment header).
        pub const LEN: usize = 1;
        /// Routing header: segments left.
        pub const SEGMENTS_LEFT: usize = 3;
        /// Fragment header: offset in 8-byte units (top 13 bits) and the more-fragments flag (bit 0).
        pub const FRAG_OFFSET_MORE: Field = 2..4;
        pub const FRAG_IDENT: Field = 4..8;
    }

    pub mod tcp {
        use super::Field;
        pub const SRC_PORT: Field = 0..2;
        pub const DST_PORT: Field = 2..4;
        pub const SEQ: Field = 4..8;
        pub const ACK: Field = 8..12;
        /// Data offset in 32-bit words (high nibble).
        pub const DATA_OFFSET: usize = 12;
        pub const FLAGS: usize = 13;
        pub const WINDOW: Field = 14..16;
        pub const CHECKSUM: Field = 16..18;
        pub const URGENT: Field = 18..20;
        /// Where options start.
        pub const OPTIONS: usize = 20;
    }

    pub mod udp {
        use super::Field;
        pub const SRC_PORT: Field = 0..2;
        pub const DST_PORT: Field = 2..4;
        pub const LENGTH: Field = 4..6;
        pub const CHECKSUM: Field = 6..8;
    }

    /// ICMPv4 and ICMPv6 share this layout.
    pub mod icmp {
        use super::Field;
        pub const TYPE: usize = 0;
        pub const CODE: usize = 1;
        pub const CHECKSUM: Field = 2..4;
        pub const ECHO_IDENT: Field = 4..6;
        pub const ECHO_SEQ: Field = 6..8;
        /// An error message's quoted packet.
        pub const QUOTED: usize = 8;
    }
}

/// More extension headers than this is not a packet anyone sends on purpose; refusing bounds the walk.
const MAX_EXTENSION_HEADERS: usize = 8;

/// Why a packet was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Shorter than a header or a length field says.
    Truncated,
    /// A field holds a value no valid packet has (version, header length, total length).
    Malformed,
    /// Valid, but of a kind we deliberately do not handle (an IPv6 routing header still in transit, AH/ESP
    /// before the transport header, too many extension headers).
    Unsupported,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Error::Truncated => "packet truncated",
            Error::Malformed => "malformed packet",
            Error::Unsupported => "unsupported packet",
        })
    }
}

impl std::error::Error for Error {}

#[inline]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
fn put16(b: &mut [u8], at: usize, value: u16) {
    b[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

/// Whether a header is a whole packet's, or the one quoted inside an ICMP error, whose length fields may
/// exceed the bytes present (the quote is truncated by definition).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Extent {
    Whole,
    Quoted,
}

/// Which part of a fragmented datagram a packet is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// Offset zero with more fragments to come: it carries the transport header.
    First { id: u32 },
    /// Offset non-zero: no transport header, only the IP header identifies it.
    Later { id: u32 },
}

/// IP version of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpVersion {
    V4,
    V6,
}

/// Where the parts of an IP packet are, found by [`parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub version: IpVersion,
    /// The transport protocol (after IPv6 extension headers).
    pub protocol: u8,
    /// Offset of the transport header (meaningless for [`Fragment::Later`]).
    pub l4_offset: usize,
    /// Length of the IP datagram per its header; bytes beyond it in the buffer are not part of the packet.
    pub packet_len: usize,
    pub fragment: Fragment,
}

impl Layout {
    /// Length of the transport part present in this packet.
    pub fn l4_len(&self) -> usize {
        self.packet_len.saturating_sub(self.l4_offset)
    }
}

/// The destination address of an IPv4 or IPv6 packet, from its fixed header alone (nothing else is
/// checked: this is the routing decision's input, made before anything parses the rest).
#[inline]
pub fn destination(packet: &[u8]) -> Option<core::net::IpAddr> {
    match packet.first()? >> 4 {
        4 if packet.len() >= IPV4_HEADER_LEN => {
            Some(Ipv4Addr::from(<[u8; 4]>::try_from(&packet[field::ipv4::DST]).ok()?).into())
        }
        6 if packet.len() >= IPV6_HEADER_LEN => {
            Some(Ipv6Addr::from(<[u8; 16]>::try_from(&packet[field::ipv6::DST]).ok()?).into())
        }
        _ => None,
    }
}

/// The source address of an IPv4 or IPv6 packet, from its fixed header alone.
#[inline]
pub fn source(packet: &[u8]) -> Option<core::net::IpAddr> {
    match packet.first()? >> 4 {
        4 if packet.len() >= IPV4_HEADER_LEN => {
            Some(Ipv4Addr::from(<[u8; 4]>::try_from(&packet[field::ipv4::SRC]).ok()?).into())
        }
        6 if packet.len() >= IPV6_HEADER_LEN => {
            Some(Ipv6Addr::from(<[u8; 16]>::try_from(&packet[field::ipv6::SRC]).ok()?).into())
        }
        _ => None,
    }
}

/// Returns the IP version from the first nibble, if it is 4 or 6.
pub fn version(packet: &[u8]) -> Result<IpVersion, Error> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => Ok(IpVersion::V4),
        Some(6) => Ok(IpVersion::V6),
        Some(_) => Err(Error::Malformed),
        None => Err(Error::Truncated),
    }
}

/// Walks an IPv4 or IPv6 packet to its transport header.
#[inline]
pub fn parse(packet: &[u8]) -> Result<Layout, Error> {
    parse_extent(packet, Extent::Whole)
}

/// Walks the packet quoted inside an ICMP error to its transport header: its length field may exceed the
/// bytes present, and only the IP header and the first bytes after it are required.
pub fn parse_quoted(packet: &[u8]) -> Result<Layout, Error> {
    parse_extent(packet, Extent::Quoted)
}

#[inline]
fn parse_extent(packet: &[u8], extent: Extent) -> Result<Layout, Error> {
    match version(packet)? {
        IpVersion::V4 => parse_v4(packet, extent),
        IpVersion::V6 => parse_v6(packet, extent),
    }
}

#[inline]
pub(crate) fn parse_v4(p: &[u8], extent: Extent) -> Result<Layout, Error> {
    let header = Ipv4Header::checked(p, extent)?;
    let header_len = header.header_len();
    let flags_offset = be16(p, field::ipv4::FLAGS_FRAG_OFFSET.start);
    let offset = flags_offset & 0x1fff;
    let more = flags_offset & 0x2000 != 0;
    let id = u32::from(header.ident());
    let fragment = match (offset, more) {
        (0, false) => Fragment::Whole,
        (0, true) => Fragment::First { id },
        _ => Fragment::Later { id },
    };
    if header_len > IPV4_HEADER_LEN {
        check_v4_options(&p[IPV4_HEADER_LEN..header_len])?;
    }
    let packet_len = if extent == Extent::Quoted { p.len() } else { usize::from(header.total_len()) };
    Ok(Layout { version: IpVersion::V4, protocol: header.protocol(), l4_offset: header_len, packet_len, fragment })
}

/// Refuses loose and strict source routing: with them the destination field is not the final one, so
/// neither a transport checksum nor a filter can be applied to what the header says.
fn check_v4_options(mut options: &[u8]) -> Result<(), Error> {
    const END: u8 = 0;
    const NOP: u8 = 1;
    const LSRR: u8 = 0x83;
    const SSRR: u8 = 0x89;
    while let Some(&kind) = options.first() {
        match kind {
            END => break,
            NOP => options = &options[1..],
            LSRR | SSRR => return Err(Error::Unsupported),
            _ => {
                let len = usize::from(*options.get(1).ok_or(Error::Malformed)?);
                if len < 2 || len > options.len() {
                    return Err(Error::Malformed);
                }
                options = &options[len..];
            }
        }
    }
    Ok(())
}

pub(crate) fn parse_v6(p: &[u8], extent: Extent) -> Result<Layout, Error> {
    let header = Ipv6Header::checked(p, extent)?;
    let packet_len =
        if extent == Extent::Quoted { p.len() } else { IPV6_HEADER_LEN + usize::from(header.payload_len()) };
    let mut next = header.next_header();
    let mut at = IPV6_HEADER_LEN;
    let mut fragment = Fragment::Whole;
    for _ in 0..MAX_EXTENSION_HEADERS {
        match next {
            PROTO_HOPOPTS | PROTO_ROUTING | PROTO_DSTOPTS => {
                let ext = p.get(at..at + 8).ok_or(Error::Truncated)?;
                if next == PROTO_ROUTING && ext[field::ipv6_ext::SEGMENTS_LEFT] != 0 {
                    // Segments left: the destination field is not the final one, so a transport checksum
                    // over the pseudo-header cannot be adjusted from what we see.
                    return Err(Error::Unsupported);
                }
                next = ext[field::ipv6_ext::NEXT_HEADER];
                at += (usize::from(ext[field::ipv6_ext::LEN]) + 1) * 8;
            }
            PROTO_FRAGMENT => {
                let ext = p.get(at..at + 8).ok_or(Error::Truncated)?;
                let offset_more = be16(ext, field::ipv6_ext::FRAG_OFFSET_MORE.start);
                let (offset, more) = (offset_more >> 3, offset_more & 1 != 0);
                let id = be32(ext, field::ipv6_ext::FRAG_IDENT.start);
                next = ext[field::ipv6_ext::NEXT_HEADER];
                at += 8;
                if offset != 0 {
                    fragment = Fragment::Later { id };
                    break;
                }
                if more {
                    fragment = Fragment::First { id };
                }
                // An atomic fragment (offset 0, no more) is a whole packet with a fragment header.
            }
            _ => break,
        }
    }
    if matches!(next, PROTO_HOPOPTS | PROTO_ROUTING | PROTO_DSTOPTS | PROTO_FRAGMENT)
        && !matches!(fragment, Fragment::Later { .. })
    {
        return Err(Error::Unsupported);
    }
    if at > packet_len {
        return Err(Error::Truncated);
    }
    Ok(Layout { version: IpVersion::V6, protocol: next, l4_offset: at, packet_len, fragment })
}

/// A view of an IPv4 header.
#[derive(Debug, Clone, Copy)]
pub struct Ipv4Header<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> Ipv4Header<T> {
    /// Checks version, header length and that the total length fits the buffer.
    #[inline]
    pub fn new_checked(buf: T) -> Result<Self, Error> {
        Self::checked(buf, Extent::Whole)
    }

    /// Checks version and header length of the header quoted in an ICMP error, whose total length may
    /// exceed what was quoted.
    #[inline]
    pub fn new_quoted(buf: T) -> Result<Self, Error> {
        Self::checked(buf, Extent::Quoted)
    }

    #[inline]
    fn checked(buf: T, extent: Extent) -> Result<Self, Error> {
        let b = buf.as_ref();
        if b.len() < IPV4_HEADER_LEN {
            return Err(Error::Truncated);
        }
        if b[field::ipv4::VER_IHL] >> 4 != 4 {
            return Err(Error::Malformed);
        }
        let header_len = usize::from(b[field::ipv4::VER_IHL] & 0x0f) * 4;
        if header_len < IPV4_HEADER_LEN {
            return Err(Error::Malformed);
        }
        if b.len() < header_len {
            return Err(Error::Truncated);
        }
        let total = usize::from(be16(b, field::ipv4::TOTAL_LEN.start));
        if total < header_len {
            return Err(Error::Malformed);
        }
        if extent == Extent::Whole && total > b.len() {
            return Err(Error::Truncated);
        }
        Ok(Self { buf })
    }

    #[inline]
    pub fn header_len(&self) -> usize {
        usize::from(self.buf.as_ref()[field::ipv4::VER_IHL] & 0x0f) * 4
    }
    #[inline]
    pub fn total_len(&self) -> u16 {
        be16(self.buf.as_ref(), field::ipv4::TOTAL_LEN.start)
    }
    #[inline]
    pub fn ident(&self) -> u16 {
        be16(self.buf.as_ref(), field::ipv4::IDENT.start)
    }
    #[inline]
    pub fn dont_fragment(&self) -> bool {
        self.buf.as_ref()[field::ipv4::FLAGS_FRAG_OFFSET.start] & 0x40 != 0
    }
    #[inline]
    pub fn ttl(&self) -> u8 {
        self.buf.as_ref()[field::ipv4::TTL]
    }
    #[inline]
    pub fn protocol(&self) -> u8 {
        self.buf.as_ref()[field::ipv4::PROTOCOL]
    }
    #[inline]
    pub fn checksum(&self) -> u16 {
        be16(self.buf.as_ref(), field::ipv4::CHECKSUM.start)
    }
    #[inline]
    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::from(<[u8; 4]>::try_from(&self.buf.as_ref()[field::ipv4::SRC]).expect("4 bytes"))
    }
    #[inline]
    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::from(<[u8; 4]>::try_from(&self.buf.as_ref()[field::ipv4::DST]).expect("4 bytes"))
    }
    /// Whether the header checksum is correct.
    #[inline]
    pub fn verify_checksum(&self) -> bool {
        crate::checksum::fold(crate::checksum::sum(&self.buf.as_ref()[..self.header_len()], 0)) == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Header<T> {
    /// Recomputes the header checksum from scratch.
    #[inline]
    pub fn fill_checksum(&mut self) {
        let len = self.header_len();
        let b = self.buf.as_mut();
        put16(b, field::ipv4::CHECKSUM.start, 0);
        let c = crate::checksum::checksum(&b[..len]);
        put16(b, field::ipv4::CHECKSUM.start, c);
    }
    #[inline]
    pub fn set_checksum(&mut self, value: u16) {
        put16(self.buf.as_mut(), field::ipv4::CHECKSUM.start, value);
    }
    #[inline]
    pub fn set_ttl(&mut self, value: u8) {
        self.buf.as_mut()[field::ipv4::TTL] = value;
    }
    #[inline]
    pub fn set_src(&mut self, addr: Ipv4Addr) {
        self.buf.as_mut()[field::ipv4::SRC].copy_from_slice(&addr.octets());
    }
    #[inline]
    pub fn set_dst(&mut self, addr: Ipv4Addr) {
        self.buf.as_mut()[field::ipv4::DST].copy_from_slice(&addr.octets());
    }
}

/// A view of the fixed IPv6 header.
#[derive(Debug, Clone, Copy)]
pub struct Ipv6Header<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> Ipv6Header<T> {
    /// Checks version and that the payload length fits the buffer.
    #[inline]
    pub fn new_checked(buf: T) -> Result<Self, Error> {
        Self::checked(buf, Extent::Whole)
    }

    /// Checks the version of the header quoted in an ICMPv6 error, whose payload length may exceed what was
    /// quoted.
    #[inline]
    pub fn new_quoted(buf: T) -> Result<Self, Error> {
        Self::checked(buf, Extent::Quoted)
    }

    #[inline]
    fn checked(buf: T, extent: Extent) -> Result<Self, Error> {
        let b = buf.as_ref();
        if b.len() < IPV6_HEADER_LEN {
            return Err(Error::Truncated);
        }
        if b[0] >> 4 != 6 {
            return Err(Error::Malformed);
        }
        if extent == Extent::Whole && IPV6_HEADER_LEN + usize::from(be16(b, field::ipv6::PAYLOAD_LEN.start)) > b.len() {
            return Err(Error::Truncated);
        }
        Ok(Self { buf })
    }
    #[inline]
    pub fn payload_len(&self) -> u16 {
        be16(self.buf.as_ref(), field::ipv6::PAYLOAD_LEN.start)
    }
    #[inline]
    pub fn next_header(&self) -> u8 {
        self.buf.as_ref()[field::ipv6::NEXT_HEADER]
    }
    #[inline]
    pub fn hop_limit(&self) -> u8 {
        self.buf.as_ref()[field::ipv6::HOP_LIMIT]
    }
    #[inline]
    pub fn src(&self) -> Ipv6Addr {
        Ipv6Addr::from(<[u8; 16]>::try_from(&self.buf.as_ref()[field::ipv6::SRC]).expect("16 bytes"))
    }
    #[inline]
    pub fn dst(&self) -> Ipv6Addr {
        Ipv6Addr::from(<[u8; 16]>::try_from(&self.buf.as_ref()[field::ipv6::DST]).expect("16 bytes"))
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Header<T> {
    #[inline]
    pub fn set_hop_limit(&mut self, value: u8) {
        self.buf.as_mut()[field::ipv6::HOP_LIMIT] = value;
    }
    #[inline]
    pub fn set_src(&mut self, addr: Ipv6Addr) {
        self.buf.as_mut()[field::ipv6::SRC].copy_from_slice(&addr.octets());
    }
    #[inline]
    pub fn set_dst(&mut self, addr: Ipv6Addr) {
        self.buf.as_mut()[field::ipv6::DST].copy_from_slice(&addr.octets());
    }
}

/// A view of a TCP header.
#[derive(Debug, Clone, Copy)]
pub struct TcpHeader<T> {
    buf: T,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

impl<T: AsRef<[u8]>> TcpHeader<T> {
    #[inline]
    pub fn new_checked(buf: T) -> Result<Self, Error> {
        let b = buf.as_ref();
        if b.len() < TCP_HEADER_LEN {
            return Err(Error::Truncated);
        }
        let data_offset = usize::from(b[field::tcp::DATA_OFFSET] >> 4) * 4;
        if data_offset < TCP_HEADER_LEN {
            return Err(Error::Malformed);
        }
        if data_offset > b.len() {
            return Err(Error::Truncated);
        }
        Ok(Self { buf })
    }
    #[inline]
    pub fn src_port(&self) -> u16 {
        be16(self.buf.as_ref(), field::tcp::SRC_PORT.start)
    }
    #[inline]
    pub fn dst_port(&self) -> u16 {
        be16(self.buf.as_ref(), field::tcp::DST_PORT.start)
    }
    #[inline]
    pub fn seq(&self) -> u32 {
        be32(self.buf.as_ref(), field::tcp::SEQ.start)
    }
    #[inline]
    pub fn header_len(&self) -> usize {
        usize::from(self.buf.as_ref()[field::tcp::DATA_OFFSET] >> 4) * 4
    }
    #[inline]
    pub fn flags(&self) -> u8 {
        self.buf.as_ref()[field::tcp::FLAGS]
    }
    #[inline]
    pub fn checksum(&self) -> u16 {
        be16(self.buf.as_ref(), field::tcp::CHECKSUM.start)
    }
    /// The options, between the fixed header and the data.
    #[inline]
    pub fn options(&self) -> &[u8] {
        &self.buf.as_ref()[field::tcp::OPTIONS..self.header_len()]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpHeader<T> {
    #[inline]
    pub fn set_src_port(&mut self, port: u16) {
        put16(self.buf.as_mut(), field::tcp::SRC_PORT.start, port);
    }
    #[inline]
    pub fn set_dst_port(&mut self, port: u16) {
        put16(self.buf.as_mut(), field::tcp::DST_PORT.start, port);
    }
    #[inline]
    pub fn set_checksum(&mut self, value: u16) {
        put16(self.buf.as_mut(), field::tcp::CHECKSUM.start, value);
    }
    /// The options, writable (MSS clamping rewrites one in place).
    #[inline]
    pub fn options_mut(&mut self) -> &mut [u8] {
        let end = self.header_len();
        &mut self.buf.as_mut()[field::tcp::OPTIONS..end]
    }
}

/// A view of a UDP header.
#[derive(Debug, Clone, Copy)]
pub struct UdpHeader<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> UdpHeader<T> {
    #[inline]
    pub fn new_checked(buf: T) -> Result<Self, Error> {
        let b = buf.as_ref();
        if b.len() < UDP_HEADER_LEN {
            return Err(Error::Truncated);
        }
        let len = usize::from(be16(b, field::udp::LENGTH.start));
        if len < UDP_HEADER_LEN {
            return Err(Error::Malformed);
        }
        if len > b.len() {
            return Err(Error::Truncated);
        }
        Ok(Self { buf })
    }
    #[inline]
    pub fn src_port(&self) -> u16 {
        be16(self.buf.as_ref(), field::udp::SRC_PORT.start)
    }
    #[inline]
    pub fn dst_port(&self) -> u16 {
        be16(self.buf.as_ref(), field::udp::DST_PORT.start)
    }
    #[inline]
    pub fn len(&self) -> u16 {
        be16(self.buf.as_ref(), field::udp::LENGTH.start)
    }
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() as usize == UDP_HEADER_LEN
    }
    #[inline]
    pub fn checksum(&self) -> u16 {
        be16(self.buf.as_ref(), field::udp::CHECKSUM.start)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpHeader<T> {
    #[inline]
    pub fn set_src_port(&mut self, port: u16) {
        put16(self.buf.as_mut(), field::udp::SRC_PORT.start, port);
    }
    #[inline]
    pub fn set_dst_port(&mut self, port: u16) {
        put16(self.buf.as_mut(), field::udp::DST_PORT.start, port);
    }
    #[inline]
    pub fn set_checksum(&mut self, value: u16) {
        put16(self.buf.as_mut(), field::udp::CHECKSUM.start, value);
    }
}

/// A view of an ICMPv4 or ICMPv6 header.
#[derive(Debug, Clone, Copy)]
pub struct IcmpHeader<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> IcmpHeader<T> {
    #[inline]
    pub fn new_checked(buf: T) -> Result<Self, Error> {
        if buf.as_ref().len() < ICMP_HEADER_LEN {
            return Err(Error::Truncated);
        }
        Ok(Self { buf })
    }
    #[inline]
    pub fn msg_type(&self) -> u8 {
        self.buf.as_ref()[field::icmp::TYPE]
    }
    #[inline]
    pub fn code(&self) -> u8 {
        self.buf.as_ref()[field::icmp::CODE]
    }
    #[inline]
    pub fn checksum(&self) -> u16 {
        be16(self.buf.as_ref(), field::icmp::CHECKSUM.start)
    }
    /// The echo identifier (meaningful for echo request and reply).
    #[inline]
    pub fn echo_ident(&self) -> u16 {
        be16(self.buf.as_ref(), field::icmp::ECHO_IDENT.start)
    }
    #[inline]
    pub fn echo_seq(&self) -> u16 {
        be16(self.buf.as_ref(), field::icmp::ECHO_SEQ.start)
    }
    /// The quoted packet of an error message.
    #[inline]
    pub fn error_payload(&self) -> &[u8] {
        &self.buf.as_ref()[field::icmp::QUOTED..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> IcmpHeader<T> {
    #[inline]
    pub fn set_echo_ident(&mut self, ident: u16) {
        put16(self.buf.as_mut(), field::icmp::ECHO_IDENT.start, ident);
    }
    #[inline]
    pub fn set_checksum(&mut self, value: u16) {
        put16(self.buf.as_mut(), field::icmp::CHECKSUM.start, value);
    }
}

/// ICMP message kinds that matter to address translation, for both ICMP versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpKind {
    EchoRequest,
    EchoReply,
    /// Destination unreachable, time exceeded, parameter problem and (ICMPv6) packet too big: they quote
    /// the packet that caused them.
    Error,
    Other,
}

pub fn icmp_kind(version: IpVersion, msg_type: u8) -> IcmpKind {
    match (version, msg_type) {
        (IpVersion::V4, 8) | (IpVersion::V6, 128) => IcmpKind::EchoRequest,
        (IpVersion::V4, 0) | (IpVersion::V6, 129) => IcmpKind::EchoReply,
        (IpVersion::V4, 3 | 11 | 12) | (IpVersion::V6, 1..=4) => IcmpKind::Error,
        _ => IcmpKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{Builder, Transport};

    #[test]
    fn parses_ipv4_with_options() {
        let mut pkt = Builder::v4([10, 0, 0, 1], [10, 0, 0, 2]).udp(1000, 53, b"hello");
        // Insert 4 bytes of options (NOP NOP NOP EOL) and fix lengths: the transport header moves.
        pkt.splice(20..20, [1, 1, 1, 0]);
        pkt[0] = 0x46;
        let total = pkt.len() as u16;
        pkt[2..4].copy_from_slice(&total.to_be_bytes());
        let layout = parse(&pkt).unwrap();
        assert_eq!(layout.l4_offset, 24);
        assert_eq!(layout.protocol, PROTO_UDP);
        assert_eq!(layout.fragment, Fragment::Whole);
    }

    #[test]
    fn refuses_ipv4_source_routing_and_bad_options() {
        let base = Builder::v4([10, 0, 0, 1], [10, 0, 0, 2]).udp(1000, 53, b"hello");
        for (options, expected) in [
            ([0x83, 7, 4, 10, 0, 0, 9, 0], Err(Error::Unsupported)),
            ([1, 0x89, 7, 4, 10, 0, 0, 9], Err(Error::Unsupported)),
            ([0x44, 9, 5, 0, 0, 0, 0, 0], Err(Error::Malformed)),
            ([0x94, 4, 0, 0, 1, 0, 0, 0], Ok(28)), // router alert, then NOP and END
        ] {
            let mut pkt = base.clone();
            pkt.splice(20..20, options);
            pkt[0] = 0x47;
            let total = pkt.len() as u16;
            pkt[2..4].copy_from_slice(&total.to_be_bytes());
            assert_eq!(parse(&pkt).map(|l| l.l4_offset), expected, "{options:x?}");
        }
    }

    #[test]
    fn ipv4_fragments_are_classified() {
        let mut pkt = Builder::v4([10, 0, 0, 1], [10, 0, 0, 2]).udp(1000, 53, b"hello");
        pkt[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        pkt[6] = 0x20; // more fragments, offset 0
        assert_eq!(parse(&pkt).unwrap().fragment, Fragment::First { id: 0x1234 });
        pkt[6] = 0x00;
        pkt[7] = 0x10; // offset 16 * 8
        assert_eq!(parse(&pkt).unwrap().fragment, Fragment::Later { id: 0x1234 });
    }

    #[test]
    fn refuses_bad_headers() {
        assert_eq!(parse(&[]), Err(Error::Truncated));
        assert_eq!(parse(&[0x55; 40]), Err(Error::Malformed));
        let mut pkt = Builder::v4([10, 0, 0, 1], [10, 0, 0, 2]).udp(1, 2, b"");
        pkt[0] = 0x44; // header length 16 bytes
        assert_eq!(parse(&pkt), Err(Error::Malformed));
        let pkt = Builder::v4([10, 0, 0, 1], [10, 0, 0, 2]).udp(1, 2, b"abc");
        assert_eq!(parse(&pkt[..pkt.len() - 1]), Err(Error::Truncated));
        assert!(parse_quoted(&pkt[..24]).is_ok(), "an ICMP quote may be truncated");
    }

    #[test]
    fn walks_ipv6_extension_headers() {
        let src = "fd00::1".parse::<Ipv6Addr>().unwrap().octets();
        let dst = "fd00::2".parse::<Ipv6Addr>().unwrap().octets();
        let mut pkt = Builder::v6(src, dst).udp(1000, 53, b"x");
        // Hop-by-hop options (8 bytes, PadN) then a fragment header with offset 0 and more fragments.
        let hop = [PROTO_FRAGMENT, 0, 1, 4, 0, 0, 0, 0];
        let frag = [PROTO_UDP, 0, 0, 1, 0, 0, 0, 7];
        pkt.splice(40..40, hop.into_iter().chain(frag));
        pkt[6] = PROTO_HOPOPTS;
        let payload = (pkt.len() - 40) as u16;
        pkt[4..6].copy_from_slice(&payload.to_be_bytes());
        let layout = parse(&pkt).unwrap();
        assert_eq!(layout.l4_offset, 56);
        assert_eq!(layout.protocol, PROTO_UDP);
        assert_eq!(layout.fragment, Fragment::First { id: 7 });
    }

    #[test]
    fn refuses_routing_header_in_transit() {
        let src = [0xfd; 16];
        let mut pkt = Builder::v6(src, src).transport(Transport::Udp { src_port: 1, dst_port: 2 }, b"");
        pkt.splice(40..40, [PROTO_UDP, 0, 0, 1, 0, 0, 0, 0]);
        pkt[6] = PROTO_ROUTING;
        let payload = (pkt.len() - 40) as u16;
        pkt[4..6].copy_from_slice(&payload.to_be_bytes());
        assert_eq!(parse(&pkt), Err(Error::Unsupported));
    }
}
