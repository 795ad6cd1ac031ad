//! The ACL policy: compiling a large mesh's policy into every node's filter and peer set, and the filter's
//! cost per packet of an established flow (beside the SNAT figures, same packet size).
//! Run: `cargo bench -p mesh-benches --bench policy`.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mesh_control::policy::compile::Kept;
use mesh_control::policy::{Alias, Dst, Policy, PolicyNode, PortRange, Rule, compile};
use mesh_packet::build::{Builder, Transport};
use mesh_packet::filter::{DstRange, Filter};

const TAGS: usize = 100;
const USERS: usize = 500;

/// `nodes` nodes, half owned by one of 500 users, half tagged with one of 100 tags; every tenth tagged
/// node routes a /24 of its own.
fn mesh(nodes: usize) -> Vec<PolicyNode> {
    (0..nodes)
        .map(|i| {
            let tagged = i % 2 == 1;
            let v4 = IpAddr::from([100, 64 + (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            let v6 = IpAddr::from([0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, (i >> 16) as u16, i as u16]);
            PolicyNode {
                id: i as u64 + 1,
                name: format!("node{i}"),
                user: (!tagged).then(|| format!("user{}@example.com", i % USERS)),
                tags: if tagged { vec![format!("tag:t{}", i % TAGS)] } else { Vec::new() },
                addresses: vec![v4, v6],
                approved_routes: if tagged && i % 10 == 1 {
                    vec![format!("10.{}.{}.0/24", (i >> 8) as u8, i as u8).parse().expect("prefix")]
                } else {
                    Vec::new()
                },
            }
        })
        .collect()
}

/// `rules` rules in the shapes the seeds use: 60 % tag to tag on a port, 20 % a group of users to a tag,
/// 19 % a subnet through its routers, 1 % `autogroup:self` (each of which reaches every user's every node,
/// so it is the costly kind: at 10 % of the rules compiling took 1.1 s instead of about 0.3 s).
fn policy(rules: usize) -> Policy {
    let mut policy = Policy::default();
    for t in 0..TAGS {
        policy.tag_owners.insert(format!("tag:t{t}"), Vec::new());
    }
    for g in 0..10 {
        let members = (0..USERS).filter(|u| u % 10 == g).map(|u| format!("user{u}@example.com")).collect();
        policy.groups.insert(format!("group:g{g}"), members);
    }
    let list = (0..rules)
        .map(|i| {
            let port = PortRange { first: 1000 + i as u16, last: 1000 + i as u16 };
            let (src, dst) = match i % 100 {
                0..=59 => {
                    (Alias::Tag(format!("tag:t{}", i % TAGS)), Alias::Tag(format!("tag:t{}", (i * 7 + 3) % TAGS)))
                }
                60..=79 => (Alias::Group(format!("group:g{}", i % 10)), Alias::Tag(format!("tag:t{}", i % TAGS))),
                80..=98 => {
                    (Alias::Tag(format!("tag:t{}", i % TAGS)), Alias::Prefix("10.0.0.0/8".parse().expect("prefix")))
                }
                _ => (Alias::Member, Alias::SelfDevices),
            };
            Rule {
                line: i + 1,
                src: vec![src],
                dst: vec![Dst { alias: dst, ports: vec![port] }],
                protos: Vec::new(),
                via: Vec::new(),
            }
        })
        .collect();
    policy.rules = Some(list);
    policy
}

fn compiling(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy_compile");
    group.sample_size(10);
    let mesh_ranges = ["100.64.0.0/10".parse().expect("prefix"), "fd7a:115c:a1e0::/48".parse().expect("prefix")];
    for (nodes, rules) in [(1_000usize, 100usize), (10_000, 1_000)] {
        let (nodes_list, policy) = (mesh(nodes), policy(rules));
        let compiled = compile(&policy, &nodes_list, &mesh_ranges);
        let delivered: usize = compiled.filters.iter().flatten().map(|f| f.len()).sum();
        let visible: usize = compiled.peers.iter().map(Vec::len).sum();
        println!("{nodes} nodes x {rules} rules: {delivered} rules delivered, {visible} visible pairs");
        group.bench_with_input(BenchmarkId::new("nodes_x_rules", format!("{nodes}x{rules}")), &nodes, |b, _| {
            b.iter(|| black_box(compile(&policy, &nodes_list, &mesh_ranges)))
        });
        // One tagged node joins: only the nodes its rules reach are compiled again.
        let kept = Kept::new(&policy, &nodes_list, &mesh_ranges);
        let mut joined = nodes_list.clone();
        let mut newcomer = mesh(nodes + 2).pop().expect("a node");
        newcomer.id = nodes as u64 + 1;
        joined.push(newcomer);
        let updated = kept.update(&policy, &joined, &mesh_ranges);
        println!("{nodes} nodes x {rules} rules, one tagged node joins: {} nodes compiled again", updated.recompiled);
        group.bench_with_input(BenchmarkId::new("one_node_joins", format!("{nodes}x{rules}")), &nodes, |b, _| {
            b.iter(|| black_box(kept.update(&policy, &joined, &mesh_ranges)))
        });
    }
    group.finish();
}

fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    Builder::v4(src, dst).transport(Transport::Tcp { src_port: sport, dst_port: dport, seq: 1, ack: 1, flags }, payload)
}

fn filtering(c: &mut Criterion) {
    let mut group = c.benchmark_group("acl_filter_established_1420B");
    group.throughput(Throughput::Elements(1));
    let now = Instant::now();
    let db = [100, 64, 0, 2];
    let rules = vec![mesh_packet::filter::Rule {
        src: vec!["100.64.0.0/10".parse().expect("prefix")],
        dst: vec![DstRange { net: None, first: 5432, last: 5432 }],
        protos: Vec::new(),
    }];
    let payload = vec![0x5a; 1380];
    for flows in [1u32, 10_000, 1_000_000] {
        let mut filter = Filter::new(flows as usize + 16);
        filter.set_rules(Some(rules.clone()));
        let client = |i: u32| [100, 64 + (i >> 24) as u8 % 63, (i >> 16) as u8, (i >> 8) as u8];
        for i in 0..flows {
            let syn = tcp(client(i), db, 10_000 + (i & 0xff) as u16, 5432, 0x02, b"");
            filter.inbound(&syn, now).expect("allowed");
        }
        let inbound = tcp(client(0), db, 10_000, 5432, 0x10, &payload);
        group.bench_with_input(BenchmarkId::new("inbound", flows), &flows, |b, _| {
            b.iter(|| filter.inbound(black_box(&inbound), now).expect("established"))
        });
        let reply = tcp(db, client(0), 5432, 10_000, 0x10, &payload);
        group.bench_with_input(BenchmarkId::new("outbound", flows), &flows, |b, _| {
            b.iter(|| filter.outbound(black_box(&reply), now))
        });
    }
    group.finish();
}

criterion_group!(benches, compiling, filtering);
criterion_main!(benches);
