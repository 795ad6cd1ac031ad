//! TCP MSS clamping: a SYN crossing the tunnel announces a maximum segment size that fits the tunnel MTU,
//! so neither side sends segments that would need fragmenting (or would be dropped by path-MTU black holes).

use crate::checksum::{Delta, adjust_at};
use crate::wire::{self, Fragment, IpVersion, PROTO_TCP, TCP_SYN, TcpHeader, field};

const OPTION_END: u8 = 0;
const OPTION_NOP: u8 = 1;
const OPTION_MSS: u8 = 2;

/// The largest MSS for an IP packet of at most `mtu` bytes.
pub fn max_mss(version: IpVersion, mtu: u16) -> u16 {
    let headers = match version {
        IpVersion::V4 => 40,
        IpVersion::V6 => 60,
    };
    mtu.saturating_sub(headers)
}

/// Lowers the MSS option of a TCP SYN (or SYN-ACK) to at most what fits `mtu`, adjusting the TCP checksum.
/// Returns whether the packet changed. Anything that is not an unfragmented TCP SYN with an MSS option larger
/// than the limit is left alone.
pub fn clamp(packet: &mut [u8], mtu: u16) -> bool {
    let Ok(layout) = wire::parse(packet) else { return false };
    if layout.protocol != PROTO_TCP || layout.fragment != Fragment::Whole || layout.l4_len() < wire::TCP_HEADER_LEN {
        return false;
    }
    let l4 = layout.l4_offset;
    let Ok(tcp) = TcpHeader::new_checked(&packet[l4..layout.packet_len]) else { return false };
    if tcp.flags() & TCP_SYN == 0 {
        return false;
    }
    let header_len = tcp.header_len();
    let limit = max_mss(layout.version, mtu);
    let mut at = l4 + field::tcp::OPTIONS;
    let end = l4 + header_len;
    while at < end {
        match packet[at] {
            OPTION_END => break,
            OPTION_NOP => at += 1,
            kind => {
                let Some(&len) = packet.get(at + 1) else { return false };
                let len = usize::from(len);
                if len < 2 || at + len > end {
                    return false;
                }
                if kind == OPTION_MSS && len == 4 {
                    let mss = u16::from_be_bytes([packet[at + 2], packet[at + 3]]);
                    if mss <= limit {
                        return false;
                    }
                    // The checksum sums 16-bit words aligned to the segment's start. The value's two bytes
                    // are one word when they start on an even offset, and straddle two words otherwise; only
                    // words inside the header are read (an MSS-only SYN ends right after the value).
                    let mut delta = Delta::default();
                    let even = (at + 2 - l4).is_multiple_of(2);
                    let span = if even { at + 2..at + 4 } else { at + 1..at + 5 };
                    let before: Vec<u16> = span.clone().step_by(2).map(|i| word(packet, i, end)).collect();
                    packet[at + 2..at + 4].copy_from_slice(&limit.to_be_bytes());
                    for (i, old) in span.step_by(2).zip(before) {
                        delta.word(old, word(packet, i, end));
                    }
                    adjust_at(packet, l4 + field::tcp::CHECKSUM.start, delta);
                    return true;
                }
                at += len;
            }
        }
    }
    false
}

/// The 16-bit word at `at`, a byte at `end` or beyond counting as the zero padding the checksum uses.
fn word(packet: &[u8], at: usize, end: usize) -> u16 {
    let byte = |i: usize| if i < end { packet[i] } else { 0 };
    u16::from_be_bytes([byte(at), byte(at + 1)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum;

    /// A SYN with options `opts` (already padded to a multiple of 4).
    fn syn(opts: &[u8], v6: bool) -> Vec<u8> {
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&443u16.to_be_bytes());
        tcp[12] = (((20 + opts.len()) / 4) << 4) as u8;
        tcp[13] = TCP_SYN;
        tcp.extend_from_slice(opts);
        let (src, dst): (Vec<u8>, Vec<u8>) =
            if v6 { (vec![0xfd; 16], vec![0xfe; 16]) } else { (vec![100, 64, 0, 1], vec![10, 0, 12, 50]) };
        let pseudo = checksum::pseudo_header_sum(&src, &dst, PROTO_TCP, tcp.len() as u32);
        let c = checksum::finish(checksum::sum(&tcp, pseudo));
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        let builder = if v6 {
            crate::build::Builder::v6(src.try_into().unwrap(), dst.try_into().unwrap())
        } else {
            crate::build::Builder::v4(src.try_into().unwrap(), dst.try_into().unwrap())
        };
        builder.ip(PROTO_TCP, &tcp)
    }

    fn mss_of(p: &[u8], l4: usize) -> u16 {
        let at = p[l4 + 20..].windows(2).position(|w| w == [2, 4]).unwrap() + l4 + 20;
        u16::from_be_bytes([p[at + 2], p[at + 3]])
    }

    fn tcp_checksum_ok(p: &[u8]) -> bool {
        let layout = wire::parse(p).unwrap();
        let (src, dst) =
            if layout.version == IpVersion::V4 { (&p[12..16], &p[16..20]) } else { (&p[8..24], &p[24..40]) };
        let seg = &p[layout.l4_offset..layout.packet_len];
        let pseudo = checksum::pseudo_header_sum(src, dst, PROTO_TCP, seg.len() as u32);
        checksum::fold(checksum::sum(seg, pseudo)) == 0xffff
    }

    #[test]
    fn lowers_a_large_mss_with_a_valid_checksum() {
        // MSS 1460 (LAN ethernet), then SACK-permitted, timestamps: the usual Linux SYN.
        let opts = [2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7];
        for v6 in [false, true] {
            let mut p = syn(&opts, v6);
            assert!(clamp(&mut p, 1420));
            let l4 = if v6 { 40 } else { 20 };
            assert_eq!(mss_of(&p, l4), if v6 { 1360 } else { 1380 });
            assert!(tcp_checksum_ok(&p));
        }
    }

    #[test]
    fn handles_an_odd_offset_option() {
        // A NOP first puts the MSS value at an odd offset within the segment.
        let opts = [1, 2, 4, 0x05, 0xb4, 1, 1, 0];
        let mut p = syn(&opts, false);
        assert!(clamp(&mut p, 1280));
        assert_eq!(mss_of(&p, 20), 1240);
        assert!(tcp_checksum_ok(&p));
    }

    #[test]
    fn an_mss_only_syn_ending_with_the_value_is_clamped_without_reading_past_it() {
        // The crash a review found: MSS as the last four bytes of the packet, nothing after it.
        for v6 in [false, true] {
            let mut p = syn(&[2, 4, 0x05, 0xb4], v6);
            assert!(clamp(&mut p, 1420));
            assert!(tcp_checksum_ok(&p));
        }
        // The odd case as close to the end as it can be: the value in the header's last bytes but one.
        let mut p = syn(&[1, 1, 1, 2, 4, 0x05, 0xb4, 0], false);
        assert!(clamp(&mut p, 1420));
        assert!(tcp_checksum_ok(&p));
    }

    #[test]
    fn leaves_small_mss_non_syn_and_odd_packets_alone() {
        let mut small = syn(&[2, 4, 0x04, 0x00], false);
        assert!(!clamp(&mut small, 1420), "1024 already fits");
        let mut ack = syn(&[2, 4, 0x05, 0xb4], false);
        ack[33] = 0x10;
        assert!(!clamp(&mut ack, 1420), "not a SYN");
        let mut broken = syn(&[2, 9, 0x05, 0xb4], false);
        assert!(!clamp(&mut broken, 1420), "an option running past the header");
        let mut udp = crate::build::Builder::v4([1, 1, 1, 1], [2, 2, 2, 2]).udp(1, 2, &[2, 4, 5, 0xb4]);
        assert!(!clamp(&mut udp, 1420));
    }
}

#[cfg(test)]
mod never_panic {
    use proptest::prelude::*;

    proptest! {
        /// Arbitrary bytes, and TCP SYNs with arbitrary options, never panic the clamp.
        #[test]
        fn clamping_arbitrary_packets_never_panics(data in proptest::collection::vec(any::<u8>(), 0..120), mtu in any::<u16>()) {
            let mut p = data.clone();
            super::clamp(&mut p, mtu);
            // The same bytes behind a valid IPv4 header, as a SYN whose options are the fuzzed bytes.
            let opts = &data[..data.len().min(40) / 4 * 4];
            let mut tcp = vec![0u8; 20];
            tcp[12] = (((20 + opts.len()) / 4) << 4) as u8;
            tcp[13] = crate::wire::TCP_SYN;
            tcp.extend_from_slice(opts);
            let mut packet = crate::build::Builder::v4([1, 2, 3, 4], [5, 6, 7, 8]).ip(crate::wire::PROTO_TCP, &tcp);
            super::clamp(&mut packet, mtu);
        }
    }
}
