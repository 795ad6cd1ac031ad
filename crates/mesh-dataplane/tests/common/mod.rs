//! What the simulations share: node numbering (keys, underlay and mesh addresses by index) and a seeded
//! random source, so loss and reordering repeat exactly.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

pub fn mesh_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, 0, 1 + i as u8)
}

pub fn underlay(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1 + i as u8)), 41641)
}

pub fn private_key(i: usize) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[1] = 1 + i as u8; // not byte 0: X25519 clamping clears its low bits
    k[31] = 0x42;
    k
}

/// A deterministic random source (xorshift).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
