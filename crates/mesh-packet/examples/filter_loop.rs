//! Judges one established TCP flow's packet N times with the ACL filter, inbound (from the mesh) or outbound:
//! the filter's counterpart of `snat_loop`, for exact instruction counts (`valgrind --tool=callgrind`) where
//! wall-clock benchmarks on a shared VM move by ±15 %. Run it twice with different N; the difference divided
//! by the difference in N is the cost per packet.
//!
//! `cargo build --release -p mesh-packet --example filter_loop`
//! `valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/filter_loop inbound 400000`

use std::hint::black_box;
use std::time::Instant;

use mesh_packet::build::Builder;
use mesh_packet::filter::{DstRange, Filter, Rule};

fn main() {
    let mut args = std::env::args().skip(1);
    let direction = args.next().unwrap_or_else(|| "inbound".into());
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let now = Instant::now();
    let mut filter = Filter::new(1024);
    filter.set_rules(Some(vec![Rule {
        src: vec!["100.64.0.0/10".parse().expect("prefix")],
        dst: vec![DstRange { net: None, first: 5432, last: 5432 }],
        protos: Vec::new(),
    }]));
    let payload = [0u8; 1380];
    let (client, db) = ([100, 64, 0, 1], [100, 64, 0, 2]);
    filter.inbound(&Builder::v4(client, db).tcp(40000, 5432, 0x02, b""), now).expect("the rule allows it");
    let (packet, inbound) = match direction.as_str() {
        "inbound" => (Builder::v4(client, db).tcp(40000, 5432, 0x10, &payload), true),
        "outbound" => (Builder::v4(db, client).tcp(5432, 40000, 0x10, &payload), false),
        other => panic!("inbound or outbound, not {other}"),
    };
    let mut ok = 0u64;
    for _ in 0..n {
        if inbound {
            ok += u64::from(filter.inbound(black_box(&packet), now).is_ok());
        } else {
            filter.outbound(black_box(&packet), now);
            ok += 1;
        }
    }
    assert_eq!(ok, n, "every packet passed");
}
