//! Bytes of heap per NAT flow, measured with a counting allocator (not estimated from struct sizes).
//! Run: `cargo bench -p mesh-benches --bench flow_memory`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use mesh_packet::build::Builder;
use mesh_packet::snat::{Snat, SnatConfig};
use mesh_packet::wire::TCP_SYN;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: delegates every call to the system allocator unchanged; only a counter is updated beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn measure(flows: u32, v6: bool) -> (f64, f64) {
    let now = Instant::now();
    let snat4 = Ipv4Addr::new(10, 0, 12, 9);
    let snat6: Ipv6Addr = "fd00:a::9".parse().expect("literal");
    let mut config = SnatConfig::new((!v6).then_some(snat4), v6.then_some(snat6));
    config.max_flows = flows + 1;
    let before = LIVE.load(Ordering::Relaxed);
    let mut snat = Snat::new(config, now).expect("valid config");
    let empty = LIVE.load(Ordering::Relaxed);
    let mut packet = Vec::with_capacity(128);
    for i in 0..flows {
        let endpoint = i % 50_000;
        let port = 10_000 + (endpoint % 1000) as u16;
        packet.clear();
        packet.extend_from_slice(&if v6 {
            let mut c = [0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            c[12..16].copy_from_slice(&(endpoint / 1000).to_be_bytes());
            let mut s = snat6.octets();
            s[12..16].copy_from_slice(&(0x50 + i / 50_000).to_be_bytes());
            Builder::v6(c, s).tcp(port, 443, TCP_SYN, b"")
        } else {
            let c = Ipv4Addr::from(0x6440_0000 + endpoint / 1000);
            let s = Ipv4Addr::from(0x0a00_0c32 + i / 50_000);
            Builder::v4(c.octets(), s.octets()).tcp(port, 443, TCP_SYN, b"")
        });
        snat.outbound(&mut packet, now).expect("room for the flow");
    }
    let full = LIVE.load(Ordering::Relaxed);
    assert_eq!(snat.flows(), flows as usize);
    drop(snat);
    let fixed = (empty - before) as f64;
    ((full - empty) as f64 / f64::from(flows), fixed)
}

/// Heap bytes per flow the ACL filter tracks: `flows` TCP flows opened by peers, counted by the allocator.
fn measure_filter(flows: u32, v6: bool) -> f64 {
    let now = Instant::now();
    let rules = vec![mesh_packet::filter::Rule {
        src: vec!["0.0.0.0/0".parse().expect("literal"), "::/0".parse().expect("literal")],
        dst: vec![mesh_packet::filter::DstRange { net: None, first: 0, last: 65535 }],
        protos: Vec::new(),
    }];
    let mut filter = mesh_packet::filter::Filter::new(flows as usize + 1);
    filter.set_rules(Some(rules));
    let before = LIVE.load(Ordering::Relaxed);
    for i in 0..flows {
        let port = 1024 + (i % 60_000) as u16;
        let host = i / 60_000;
        let packet = if v6 {
            let mut c = [0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            c[12..16].copy_from_slice(&host.to_be_bytes());
            Builder::v6(c, [0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
                .tcp(port, 443, TCP_SYN, b"")
        } else {
            Builder::v4((0x6440_0000 + host).to_be_bytes(), [100, 64, 0, 1]).tcp(port, 443, TCP_SYN, b"")
        };
        filter.inbound(&packet, now).expect("allowed");
    }
    let full = LIVE.load(Ordering::Relaxed);
    assert_eq!(filter.flows(), flows as usize);
    (full - before) as f64 / f64::from(flows)
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument from criterion-style invocations is ignored.
    println!("SNAT memory per flow (target <= 128 bytes), heap bytes counted by allocator");
    println!("{:<6} {:>10} {:>16} {:>22}", "family", "flows", "bytes/flow", "fixed (empty engine)");
    for v6 in [false, true] {
        for flows in [10_000u32, 100_000, 1_000_000] {
            let (per_flow, fixed) = measure(flows, v6);
            let family = if v6 { "IPv6" } else { "IPv4" };
            println!("{family:<6} {flows:>10} {per_flow:>16.1} {:>20.0} K", fixed / 1024.0);
        }
    }
    println!();
    println!("ACL filter memory per tracked flow (target <= 128 bytes), heap bytes counted by allocator");
    println!("{:<6} {:>10} {:>16}", "family", "flows", "bytes/flow");
    for v6 in [false, true] {
        for flows in [10_000u32, 100_000, 1_000_000] {
            let family = if v6 { "IPv6" } else { "IPv4" };
            println!("{family:<6} {flows:>10} {:>16.1}", measure_filter(flows, v6));
        }
    }
}
