//! SNAT hot-path benchmarks, with a naive full-checksum rewrite as the baseline in the same run.
//!
//! Translation rewrites the packet in place, so each iteration first restores the header bytes the previous
//! iteration changed (a 40–68 byte copy). `restore_only` measures that copy alone so it can be subtracted.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mesh_packet::build::Builder;
use mesh_packet::checksum;
use mesh_packet::snat::{Snat, SnatConfig};
use mesh_packet::wire::{TCP_ACK, TCP_SYN};

const PACKET_LEN: usize = 1420;
const HEADERS: usize = 40;
const SNAT: Ipv4Addr = Ipv4Addr::new(10, 0, 12, 9);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 12, 50);

fn client(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x6440_0000 + i)
}

/// The i-th flow of a table: 50 000 internal endpoints (a mapping each, below the 64 512-port pool), each
/// talking to up to 20 servers, so a million flows fit one SNAT address.
fn flow_packet(i: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let endpoint = i % 50_000;
    let server = Ipv4Addr::from(u32::from(SERVER) + i / 50_000);
    Builder::v4(client(endpoint / 1000).octets(), server.octets()).tcp(
        10_000 + (endpoint % 1000) as u16,
        443,
        flags,
        payload,
    )
}

/// An engine holding `flows` established flows, created at `now`.
fn engine_with(flows: u32, now: Instant) -> Snat {
    let mut config = SnatConfig::new(Some(SNAT), None);
    config.max_flows = flows.max(1) + 1024;
    let mut snat = Snat::new(config, now).expect("valid config");
    for i in 0..flows {
        let mut p = flow_packet(i, TCP_SYN, b"");
        snat.outbound(&mut p, now).expect("room for the flow");
    }
    snat
}

fn payload() -> Vec<u8> {
    vec![0x5a; PACKET_LEN - HEADERS]
}

fn established(c: &mut Criterion) {
    let mut group = c.benchmark_group("snat_established_1420B");
    group.throughput(Throughput::Elements(1));
    let now = Instant::now();
    let payload = payload();
    let template = flow_packet(0, TCP_ACK, &payload);
    assert_eq!(template.len(), PACKET_LEN);

    group.bench_function("restore_only", |b| {
        let mut p = template.clone();
        b.iter(|| {
            p[..HEADERS].copy_from_slice(&template[..HEADERS]);
            black_box(&mut p);
        })
    });

    group.bench_function("baseline_full_recompute", |b| {
        let mut p = template.clone();
        b.iter(|| {
            p[..HEADERS].copy_from_slice(&template[..HEADERS]);
            naive_snat(black_box(&mut p), SNAT, 40_000);
        })
    });

    for flows in [1u32, 10_000, 1_000_000] {
        let mut snat = engine_with(flows, now);
        let mut p = template.clone();
        group.bench_with_input(BenchmarkId::new("outbound", flows), &flows, |b, _| {
            b.iter(|| {
                p[..HEADERS].copy_from_slice(&template[..HEADERS]);
                snat.outbound(black_box(&mut p), now).expect("established flow");
            })
        });
    }

    // The same million flows, visited in an order that defeats the cache: what a busy router sees.
    let flows = 1_000_000u32;
    let mut snat = engine_with(flows, now);
    let spread: Vec<Vec<u8>> =
        (0..4096u32).map(|i| flow_packet(i.wrapping_mul(2_654_435_761) % flows, TCP_ACK, b"")).collect();
    let mut packets = spread.clone();
    group.bench_function(BenchmarkId::new("outbound_spread", flows), |b| {
        let mut i = 0;
        b.iter(|| {
            let k = i & 4095;
            i += 1;
            packets[k][..HEADERS].copy_from_slice(&spread[k][..HEADERS]);
            snat.outbound(black_box(&mut packets[k]), now).expect("established flow");
        })
    });
    group.finish();
}

/// What a NAT without incremental checksums does: rewrite, then sum the header and the whole segment again.
fn naive_snat(p: &mut [u8], to: Ipv4Addr, port: u16) {
    p[12..16].copy_from_slice(&to.octets());
    p[20..22].copy_from_slice(&port.to_be_bytes());
    p[10..12].copy_from_slice(&[0, 0]);
    let c = checksum::checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[36..38].copy_from_slice(&[0, 0]);
    let pseudo = checksum::pseudo_header_sum(&p[12..16], &p[16..20], 6, (p.len() - 20) as u32);
    let c = checksum::finish(checksum::sum(&p[20..], pseudo));
    p[36..38].copy_from_slice(&c.to_be_bytes());
}

fn new_flow(c: &mut Criterion) {
    let mut group = c.benchmark_group("snat_new_flow");
    group.throughput(Throughput::Elements(1));
    // Each new flow is a new internal endpoint, so it also allocates a mapping and a port: the worst case.
    const CHUNK: u32 = 60_000;
    let syns: Vec<Vec<u8>> = (0..CHUNK)
        .map(|i| {
            Builder::v4(client(i / 1000).octets(), SERVER.octets()).tcp(10_000 + (i % 1000) as u16, 443, TCP_SYN, b"")
        })
        .collect();
    group.bench_function("tcp_syn_new_mapping", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(u64::from(CHUNK)) as usize;
                let now = Instant::now();
                let mut snat = Snat::new(SnatConfig::new(Some(SNAT), None), now).expect("valid config");
                let mut packets = syns[..n].to_vec();
                let start = Instant::now();
                for p in &mut packets {
                    snat.outbound(black_box(p), now).expect("room for the flow");
                }
                total += start.elapsed();
                drop(packets);
                drop(snat);
                left -= n as u64;
            }
            total
        })
    });
    group.finish();
}

fn reply(c: &mut Criterion) {
    let mut group = c.benchmark_group("snat_reply_1420B");
    group.throughput(Throughput::Elements(1));
    let now = Instant::now();
    let mut snat = engine_with(10_000, now);
    let mut out = flow_packet(0, TCP_ACK, b"");
    snat.outbound(&mut out, now).expect("established");
    let ext = u16::from_be_bytes([out[20], out[21]]);
    let template = Builder::v4(SERVER.octets(), SNAT.octets()).tcp(443, ext, TCP_ACK, &payload());
    let mut p = template.clone();
    group.bench_function("inbound_10000_flows", |b| {
        b.iter(|| {
            p[..HEADERS].copy_from_slice(&template[..HEADERS]);
            snat.inbound(black_box(&mut p), now).expect("reply to a live flow");
        })
    });
    group.finish();
}

fn icmp_error(c: &mut Criterion) {
    let mut group = c.benchmark_group("snat_icmp_error");
    group.throughput(Throughput::Elements(1));
    let now = Instant::now();
    let mut snat = engine_with(10_000, now);
    let mut out = flow_packet(0, TCP_ACK, &payload());
    snat.outbound(&mut out, now).expect("established");
    // Fragmentation needed, quoting as much as fits in 576 bytes (RFC 1812).
    let router = Ipv4Addr::new(10, 0, 12, 1);
    let template = Builder::v4(router.octets(), SNAT.octets()).icmp_error(3, 4, 1300, &out[..576 - 28]);
    let touched = 28 + HEADERS;
    let mut p = template.clone();
    group.bench_function("frag_needed_inbound", |b| {
        b.iter(|| {
            p[..touched].copy_from_slice(&template[..touched]);
            snat.inbound(black_box(&mut p), now).expect("error about a live flow");
        })
    });
    group.finish();
}

criterion_group!(benches, established, new_flow, reply, icmp_error);
criterion_main!(benches);
