//! Allowed IPs: the longest-prefix table that says which peer a destination belongs to (outbound) and
//! whether a peer may use a source address (inbound).

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;

/// A longest-prefix-match table from IPv4 and IPv6 prefixes to values.
#[derive(Debug, Clone)]
pub struct PrefixTable<T> {
    v4: PrefixMap<Ipv4Net, T>,
    v6: PrefixMap<Ipv6Net, T>,
}

impl<T> Default for PrefixTable<T> {
    fn default() -> Self {
        Self { v4: PrefixMap::new(), v6: PrefixMap::new() }
    }
}

impl<T: Copy + PartialEq> PrefixTable<T> {
    /// Inserts `prefix` (host bits are cleared) and returns the value it replaced.
    pub fn insert(&mut self, prefix: IpNet, value: T) -> Option<T> {
        match prefix.trunc() {
            IpNet::V4(p) => self.v4.insert(p, value),
            IpNet::V6(p) => self.v6.insert(p, value),
        }
    }

    pub fn remove(&mut self, prefix: IpNet) -> Option<T> {
        match prefix.trunc() {
            IpNet::V4(p) => self.v4.remove(&p),
            IpNet::V6(p) => self.v6.remove(&p),
        }
    }

    /// Removes every prefix that maps to `value`.
    pub fn remove_value(&mut self, value: T) {
        self.v4.retain(|_, v| *v != value);
        self.v6.retain(|_, v| *v != value);
    }

    /// The value of the longest prefix containing `addr`.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<T> {
        match addr {
            IpAddr::V4(a) => self.v4.get_lpm(&Ipv4Net::from(a)).map(|(_, v)| *v),
            IpAddr::V6(a) => self.v6.get_lpm(&Ipv6Net::from(a)).map(|(_, v)| *v),
        }
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    /// What longest-prefix match means, written the slow and obvious way.
    fn naive(prefixes: &[(IpNet, u32)], addr: IpAddr) -> Option<u32> {
        prefixes.iter().filter(|(p, _)| p.contains(&addr)).max_by_key(|(p, _)| p.prefix_len()).map(|(_, v)| *v)
    }

    fn prefix() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(a, l)| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), l).unwrap().trunc())),
            (any::<u128>(), 0u8..=128)
                .prop_map(|(a, l)| IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), l).unwrap().trunc())),
        ]
    }

    proptest! {
        #[test]
        fn lookup_equals_a_naive_scan(
            prefixes in proptest::collection::vec(prefix(), 0..200),
            probes in proptest::collection::vec(prop_oneof![any::<u32>().prop_map(|a| IpAddr::from(Ipv4Addr::from(a))), any::<u128>().prop_map(|a| IpAddr::from(Ipv6Addr::from(a)))], 1..50),
        ) {
            let mut table = PrefixTable::default();
            let mut kept: Vec<(IpNet, u32)> = Vec::new();
            for (i, p) in prefixes.iter().enumerate() {
                table.insert(*p, i as u32);
                kept.retain(|(q, _)| q != p);
                kept.push((*p, i as u32));
            }
            // Probe both random addresses and addresses inside the prefixes.
            let inside = prefixes.iter().map(|p| p.network());
            for addr in probes.into_iter().chain(inside) {
                prop_assert_eq!(table.lookup(addr), naive(&kept, addr), "{}", addr);
            }
        }
    }

    #[test]
    fn holds_a_hundred_thousand_prefixes() {
        let mut table = PrefixTable::default();
        for i in 0..100_000u32 {
            let v4 = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap();
            table.insert(IpNet::V4(v4), i);
        }
        for i in 0..100_000u32 {
            let v6 = Ipv6Net::new(Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(i) << 64), 64).unwrap();
            table.insert(IpNet::V6(v6), i);
        }
        assert_eq!(table.len(), 200_000);
        assert_eq!(table.lookup(IpAddr::from(Ipv4Addr::new(10, 1, 134, 77))), Some((1 << 8) + 134));
        assert_eq!(table.lookup(IpAddr::from(Ipv4Addr::new(11, 0, 0, 1))), Some(65_536), "the /24s run past 11.0.0.0");
        assert_eq!(table.lookup(IpAddr::from(Ipv4Addr::new(12, 0, 0, 1))), None);
        table.remove_value(7);
        assert_eq!(table.lookup(IpAddr::from(Ipv4Addr::new(10, 0, 7, 1))), None);
    }
}
