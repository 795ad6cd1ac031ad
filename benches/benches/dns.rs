//! The MagicDNS resolver: queries for mesh names answered per second, by the resolver alone and through the
//! data plane (a UDP packet to 100.100.100.100 from the TUN device in, the answer packet out), in a mesh of
//! 1 000 nodes. The end-to-end figure beside a real resolver (dnsmasq) is `cargo xtask bench dns`.
//! Run: `cargo bench -p mesh-benches --bench dns`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use mesh_dataplane::dns::{RESOLVER_V4, Resolver, ResolverConfig, mesh_ranges, resolver_v6};
use mesh_dataplane::{Dataplane, DataplaneConfig, Event};
use mesh_packet::build::Builder;

const NODES: u32 = 1000;

fn config() -> ResolverConfig {
    let own: IpAddr = "fd7a:115c:a1e0::1".parse().expect("literal");
    let (mesh_v4, mesh_v6) = mesh_ranges(&["100.64.0.1".parse().expect("literal"), own]);
    ResolverConfig {
        addresses: vec![
            IpAddr::V4(RESOLVER_V4),
            IpAddr::V6(resolver_v6("fd7a:115c:a1e0::1".parse().expect("literal"))),
        ],
        domain: "mesh.internal".into(),
        magic_dns: true,
        hosts: (0..NODES)
            .map(|i| {
                let v4 = IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 1)) + i));
                let v6 = IpAddr::from([0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, i as u16 + 1]);
                (format!("node-{i}"), vec![v4, v6])
            })
            .collect(),
        extra: Vec::new(),
        split: Vec::new(),
        upstreams: vec!["192.0.2.53:53".parse().expect("literal")],
        mesh_v4,
        mesh_v6,
    }
}

fn query(name: &str) -> Vec<u8> {
    let mut m = Message::new(7, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("a name"), RecordType::A));
    m.to_vec().expect("encodes")
}

fn resolver(c: &mut Criterion) {
    let resolver = Resolver::new(config());
    let q = query("node-777.mesh.internal.");
    let mut group = c.benchmark_group("dns");
    group.throughput(Throughput::Elements(1));
    group.bench_function("resolver_answer_mesh_name", |b| b.iter(|| black_box(resolver.answer(black_box(&q), false))));
    let nx = query("nobody.mesh.internal.");
    group.bench_function("resolver_answer_nxdomain", |b| b.iter(|| black_box(resolver.answer(black_box(&nx), false))));

    let mut dataplane = Dataplane::new([7; 32], 1, 1420);
    let mesh = DataplaneConfig {
        mesh_addresses: vec!["100.64.0.1".parse().expect("literal")],
        dns: Some(config()),
        ..DataplaneConfig::default()
    };
    dataplane.configure(mesh, Instant::now()).expect("configured");
    let packet = Builder::v4([100, 64, 0, 1], RESOLVER_V4.octets()).udp(40000, 53, &q);
    group.bench_function("dataplane_tun_query_to_answer_packet", |b| {
        b.iter(|| {
            let mut p = packet.clone();
            let _ = dataplane.handle_tun_packet(&mut p, Instant::now());
            match dataplane.poll_event() {
                Some(Event::Deliver(answer)) => black_box(answer),
                other => panic!("expected the answer packet, got {other:?}"),
            };
        })
    });
    group.finish();
}

criterion_group!(benches, resolver);
criterion_main!(benches);
