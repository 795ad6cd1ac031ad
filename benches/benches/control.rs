//! The coordination server at 1 000 nodes: registering them, one node's netmap, and the fan-out after a
//! change (every node's netmap, which is what a change costs when every node long-polls).
//! Run: `cargo bench -p mesh-benches --bench control`.

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_control::policy::Policy;
use mesh_control::{AuthKeyOptions, Control};
use mesh_proto::{RegisterRequest, VERSION, proof};

const NODES: u64 = 1_000;
const NOW: u64 = 1_800_000_000;

/// 1 000 nodes on one reusable key; every tenth advertises a /24 that autoApprovers approve.
fn mesh() -> (Control, Duration) {
    let policy = Policy::parse(r#"{"autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}}}"#).expect("policy");
    let control = Control::in_memory(policy, "mesh.example").expect("control");
    let options = AuthKeyOptions { reusable: true, tags: vec!["tag:router".into()], ..Default::default() };
    let (_, key) = control.create_auth_key(&options, NOW).expect("key");
    let server = control.server_public_key().ok().and_then(|k| proof::decode_key(&k)).expect("server key");
    let start = Instant::now();
    for i in 0..NODES {
        let routes = if i % 10 == 0 {
            vec![format!("10.{}.{}.0/24", i / 256, i % 256).parse().expect("prefix")]
        } else {
            vec![]
        };
        let mut private = [0u8; 32];
        private[..8].copy_from_slice(&(i + 1).to_le_bytes());
        let mut request = RegisterRequest {
            version: VERSION,
            auth_key: key.clone(),
            node_key: proof::encode_key(&proof::public_key(&private)),
            hostname: format!("node-{i}"),
            advertise_routes: routes,
            tags: vec![],
            timestamp_ms: NOW * 1000,
            proof: String::new(),
        };
        // Signing is the node's work, but the server's check (one X25519) is part of what registering costs.
        proof::sign(&mut request, &private, &server);
        control.register(&request, NOW).expect("register");
    }
    (control, start.elapsed())
}

fn netmaps(c: &mut Criterion) {
    let (control, registering) = mesh();
    println!(
        "registering {NODES} nodes: {:.1} ms ({:.0} µs per node)",
        registering.as_secs_f64() * 1e3,
        registering.as_secs_f64() * 1e6 / NODES as f64
    );
    let mut group = c.benchmark_group("control_1000_nodes");
    group.sample_size(10);
    group.bench_function("netmap_of_one_node", |b| b.iter(|| control.netmap(500, |_| true).expect("netmap")));
    group.bench_function("fan_out_all_netmaps", |b| {
        b.iter(|| {
            for id in 1..=NODES {
                control.netmap(id, |_| true).expect("netmap");
            }
        })
    });
    group.finish();
}

criterion_group!(benches, netmaps);
criterion_main!(benches);
