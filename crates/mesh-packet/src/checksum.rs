//! Internet checksums (RFC 1071) and their incremental update (RFC 1624).
//!
//! The incremental form is what makes SNAT cheap: rewriting an address and a port touches a handful of
//! 16-bit words, so the checksum is adjusted by those words alone instead of summing 1,400 bytes again.

/// Ones'-complement sum of `data` as big-endian 16-bit words (an odd tail byte is padded with zero),
/// added to `initial`. The result is not folded.
pub fn sum(data: &[u8], initial: u32) -> u32 {
    let mut acc = u64::from(initial);
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let word = u64::from_be_bytes(chunk.try_into().expect("chunks_exact(8) yields 8 bytes"));
        // Adding the two 32-bit halves keeps every carry inside the u64; folding happens once at the end.
        acc += (word >> 32) + (word & 0xffff_ffff);
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for pair in &mut rest {
        acc += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = rest.remainder() {
        acc += u64::from(*last) << 8;
    }
    fold64(acc)
}

fn fold64(mut acc: u64) -> u32 {
    while acc > 0xffff_ffff {
        acc = (acc & 0xffff_ffff) + (acc >> 32);
    }
    acc as u32
}

/// Folds a 32-bit ones'-complement accumulator into 16 bits.
pub fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The checksum field value for data whose ones'-complement sum is `acc`.
pub fn finish(acc: u32) -> u16 {
    !fold(acc)
}

/// Full checksum of `data`: what a sender writes into a zeroed checksum field.
pub fn checksum(data: &[u8]) -> u16 {
    finish(sum(data, 0))
}

/// Sum of the TCP/UDP/ICMPv6 pseudo-header for IPv4 or IPv6 addresses (`src` and `dst` are 4 or 16 bytes).
pub fn pseudo_header_sum(src: &[u8], dst: &[u8], protocol: u8, length: u32) -> u32 {
    let acc = sum(src, 0);
    let acc = sum(dst, acc);
    fold64(u64::from(acc) + u64::from(protocol) + u64::from(length >> 16) + u64::from(length & 0xffff))
}

/// Accumulates the changes to 16-bit words of a checksummed region, then applies them to a checksum with
/// RFC 1624 equation 3: `HC' = ~(~HC + ~m + m')`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delta(u32);

impl Delta {
    /// Records that a word changed from `old` to `new`.
    #[inline]
    pub fn word(&mut self, old: u16, new: u16) {
        self.0 += u32::from(!old) + u32::from(new);
        // Keeps the accumulator from overflowing however many words are recorded.
        self.0 = (self.0 & 0xffff) + (self.0 >> 16);
    }

    /// Records a change of a run of bytes of even length (an address).
    #[inline]
    pub fn bytes(&mut self, old: &[u8], new: &[u8]) {
        debug_assert_eq!(old.len(), new.len());
        debug_assert!(old.len().is_multiple_of(2));
        for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
            self.word(u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([n[0], n[1]]));
        }
    }

    /// Adds every change recorded in `other`.
    #[inline]
    pub fn merge(&mut self, other: Delta) {
        self.0 += other.0;
        self.0 = (self.0 & 0xffff) + (self.0 >> 16);
    }

    /// The checksum after the recorded changes, given the checksum before them.
    #[inline]
    pub fn apply(self, checksum: u16) -> u16 {
        !fold(u32::from(!checksum) + self.0)
    }

    pub fn is_empty(self) -> bool {
        fold(self.0) == 0 || fold(self.0) == 0xffff
    }
}

/// Reads the big-endian checksum at `offset`, applies `delta` and writes it back.
#[inline]
pub fn adjust_at(buf: &mut [u8], offset: usize, delta: Delta) {
    let old = u16::from_be_bytes([buf[offset], buf[offset + 1]]);
    buf[offset..offset + 2].copy_from_slice(&delta.apply(old).to_be_bytes());
}

/// Like [`adjust_at`] for a UDP checksum: zero means "no checksum" over IPv4 and stays zero, and a computed
/// zero is sent as `0xffff` (RFC 768).
#[inline]
pub fn adjust_udp_at(buf: &mut [u8], offset: usize, delta: Delta) {
    let old = u16::from_be_bytes([buf[offset], buf[offset + 1]]);
    if old == 0 {
        return;
    }
    let new = match delta.apply(old) {
        0 => 0xffff,
        other => other,
    };
    buf[offset..offset + 2].copy_from_slice(&new.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // The worked example of RFC 1071 section 3: the sum of these words is 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data, 0)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(fold(sum(&[0x12, 0x34, 0x56], 0)), 0x1234 + 0x5600);
    }

    #[test]
    fn wide_and_narrow_paths_agree() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1421).collect();
        let narrow = data.chunks(2).fold(0u32, |acc, c| {
            let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
            u32::from(fold(acc + u32::from(w)))
        });
        assert_eq!(fold(sum(&data, 0)), fold(narrow));
    }

    #[test]
    fn delta_matches_recompute_for_one_word() {
        let mut data = vec![0x45, 0x00, 0x00, 0x54, 0x12, 0x34, 0x40, 0x00, 0x40, 0x01, 0, 0, 10, 0, 0, 1];
        let before = checksum(&data);
        let mut delta = Delta::default();
        delta.word(0x0a00, 0x6440);
        data[12..14].copy_from_slice(&0x6440u16.to_be_bytes());
        assert_eq!(delta.apply(before), checksum(&data));
    }
}
