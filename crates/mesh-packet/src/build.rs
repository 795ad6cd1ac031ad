//! Builds well-formed packets with correct checksums: for tests, benches, fuzz seeds, and the messages the
//! data plane originates itself (ICMP errors).

use crate::checksum::{checksum, finish, pseudo_header_sum, sum};
use crate::wire::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// The transport header to put after the IP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp {
        src_port: u16,
        dst_port: u16,
        seq: u32,
        ack: u32,
        flags: u8,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
    },
    /// An ICMP echo request or reply (ICMPv4 or ICMPv6 by the IP version).
    Echo {
        request: bool,
        ident: u16,
        seq: u16,
    },
    /// An ICMP message with a 4-byte rest-of-header (zero unless `rest` says otherwise) whose payload is
    /// normally a quoted packet.
    Icmp {
        msg_type: u8,
        code: u8,
        rest: u32,
    },
}

/// Addresses and IP header fields of the packet to build.
#[derive(Debug, Clone)]
pub struct Builder {
    src: Vec<u8>,
    dst: Vec<u8>,
    ttl: u8,
    ident: u16,
}

impl Builder {
    pub fn v4(src: [u8; 4], dst: [u8; 4]) -> Self {
        Self { src: src.to_vec(), dst: dst.to_vec(), ttl: 64, ident: 0x4d45 }
    }

    pub fn v6(src: [u8; 16], dst: [u8; 16]) -> Self {
        Self { src: src.to_vec(), dst: dst.to_vec(), ttl: 64, ident: 0 }
    }

    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    /// The IPv4 identification field (ignored for IPv6).
    pub fn ident(mut self, ident: u16) -> Self {
        self.ident = ident;
        self
    }

    fn is_v4(&self) -> bool {
        self.src.len() == 4
    }

    pub fn tcp(self, src_port: u16, dst_port: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
        self.transport(Transport::Tcp { src_port, dst_port, seq: 1, ack: 0, flags }, payload)
    }

    pub fn udp(self, src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
        self.transport(Transport::Udp { src_port, dst_port }, payload)
    }

    pub fn echo(self, request: bool, ident: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
        self.transport(Transport::Echo { request, ident, seq }, payload)
    }

    /// An ICMP error quoting `quoted` (already truncated to what should be quoted).
    pub fn icmp_error(self, msg_type: u8, code: u8, rest: u32, quoted: &[u8]) -> Vec<u8> {
        self.transport(Transport::Icmp { msg_type, code, rest }, quoted)
    }

    /// Builds the IP packet with `transport` and `payload`, all checksums filled in.
    pub fn transport(self, transport: Transport, payload: &[u8]) -> Vec<u8> {
        let v4 = self.is_v4();
        let (protocol, mut l4) = match transport {
            Transport::Tcp { src_port, dst_port, seq, ack, flags } => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&src_port.to_be_bytes());
                h[2..4].copy_from_slice(&dst_port.to_be_bytes());
                h[4..8].copy_from_slice(&seq.to_be_bytes());
                h[8..12].copy_from_slice(&ack.to_be_bytes());
                h[12] = 5 << 4;
                h[13] = flags;
                h[14..16].copy_from_slice(&65535u16.to_be_bytes());
                (PROTO_TCP, h)
            }
            Transport::Udp { src_port, dst_port } => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&src_port.to_be_bytes());
                h[2..4].copy_from_slice(&dst_port.to_be_bytes());
                h[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                (PROTO_UDP, h)
            }
            Transport::Echo { request, ident, seq } => {
                let msg_type = match (v4, request) {
                    (true, true) => 8,
                    (true, false) => 0,
                    (false, true) => 128,
                    (false, false) => 129,
                };
                let mut h = vec![msg_type, 0, 0, 0];
                h.extend_from_slice(&ident.to_be_bytes());
                h.extend_from_slice(&seq.to_be_bytes());
                (if v4 { PROTO_ICMP } else { PROTO_ICMPV6 }, h)
            }
            Transport::Icmp { msg_type, code, rest } => {
                let mut h = vec![msg_type, code, 0, 0];
                h.extend_from_slice(&rest.to_be_bytes());
                (if v4 { PROTO_ICMP } else { PROTO_ICMPV6 }, h)
            }
        };
        l4.extend_from_slice(payload);
        let checksum_at = match protocol {
            PROTO_TCP => 16,
            PROTO_UDP => 6,
            _ => 2,
        };
        let with_pseudo = protocol != PROTO_ICMP;
        let initial = if with_pseudo { pseudo_header_sum(&self.src, &self.dst, protocol, l4.len() as u32) } else { 0 };
        let mut c = finish(sum(&l4, initial));
        if protocol == PROTO_UDP && c == 0 {
            c = 0xffff;
        }
        l4[checksum_at..checksum_at + 2].copy_from_slice(&c.to_be_bytes());
        self.ip(protocol, &l4)
    }

    /// Wraps `l4` (used as is, checksum included) in an IP header.
    pub fn ip(self, protocol: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = if self.is_v4() {
            let mut h = vec![0u8; 20];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            h[4..6].copy_from_slice(&self.ident.to_be_bytes());
            h[6] = 0x40; // don't fragment
            h[8] = self.ttl;
            h[9] = protocol;
            h[12..16].copy_from_slice(&self.src);
            h[16..20].copy_from_slice(&self.dst);
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h
        } else {
            let mut h = vec![0u8; 40];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
            h[6] = protocol;
            h[7] = self.ttl;
            h[8..24].copy_from_slice(&self.src);
            h[24..40].copy_from_slice(&self.dst);
            h
        };
        p.extend_from_slice(l4);
        p
    }
}

/// Splits an IPv4 packet into fragments carrying at most `chunk` bytes of payload each (a multiple of 8),
/// as a router on the path would, with correct header checksums.
pub fn fragment_v4(packet: &[u8], chunk: usize) -> Vec<Vec<u8>> {
    assert!(chunk >= 8 && chunk.is_multiple_of(8), "fragment payloads are multiples of 8 bytes");
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    let payload = &packet[header_len..];
    payload
        .chunks(chunk)
        .enumerate()
        .map(|(i, part)| {
            let mut f = packet[..header_len].to_vec();
            let last = (i + 1) * chunk >= payload.len();
            let offset = ((i * chunk) / 8) as u16 | if last { 0 } else { 0x2000 };
            f[2..4].copy_from_slice(&((header_len + part.len()) as u16).to_be_bytes());
            f[6..8].copy_from_slice(&offset.to_be_bytes());
            f[10..12].copy_from_slice(&[0, 0]);
            let c = checksum(&f);
            f[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(part);
            f
        })
        .collect()
}

/// Splits an IPv6 packet (with no extension headers) into fragments with a fragment header.
pub fn fragment_v6(packet: &[u8], chunk: usize, ident: u32) -> Vec<Vec<u8>> {
    assert!(chunk >= 8 && chunk.is_multiple_of(8), "fragment payloads are multiples of 8 bytes");
    let next_header = packet[6];
    let payload = &packet[40..];
    payload
        .chunks(chunk)
        .enumerate()
        .map(|(i, part)| {
            let mut f = packet[..40].to_vec();
            f[6] = crate::wire::PROTO_FRAGMENT;
            f[4..6].copy_from_slice(&((8 + part.len()) as u16).to_be_bytes());
            let last = (i + 1) * chunk >= payload.len();
            let offset = ((i * chunk) as u16) | u16::from(!last);
            f.extend_from_slice(&[next_header, 0]);
            f.extend_from_slice(&offset.to_be_bytes());
            f.extend_from_slice(&ident.to_be_bytes());
            f.extend_from_slice(part);
            f
        })
        .collect()
}
