//! Translates one established TCP flow's packet N times, outbound or inbound: a fixed workload whose
//! instruction count (`valgrind --tool=callgrind`) compares two builds of the engine exactly where wall-clock
//! benchmarks on a shared VM move by ±10 %. Run it twice with different N; the difference divided by the
//! difference in N is the cost per packet, without the set-up.
//!
//! `cargo build --release -p mesh-packet --example snat_loop`
//! `valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/snat_loop outbound 1000000`

use std::hint::black_box;
use std::time::Instant;

use mesh_packet::build::Builder;
use mesh_packet::snat::{Snat, SnatConfig};

fn main() {
    let mut args = std::env::args().skip(1);
    let direction = args.next().unwrap_or_else(|| "outbound".into());
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let now = Instant::now();
    let mut config = SnatConfig::new(Some([10, 0, 12, 9].into()), None);
    config.seed = 1;
    config.ports = 20000..=20000;
    let mut snat = Snat::new(config, now).expect("valid configuration");
    let payload = [0u8; 1380];
    let syn = Builder::v4([100, 64, 0, 2], [10, 0, 12, 50]).tcp(40000, 443, 0x02, &payload);
    let mut first = syn.clone();
    assert!(snat.outbound(&mut first, now).is_ok());
    let (template, outbound) = match direction.as_str() {
        "outbound" => (Builder::v4([100, 64, 0, 2], [10, 0, 12, 50]).tcp(40000, 443, 0x10, &payload), true),
        "inbound" => (Builder::v4([10, 0, 12, 50], [10, 0, 12, 9]).tcp(443, 20000, 0x10, &payload), false),
        other => panic!("outbound or inbound, not {other}"),
    };
    let mut packet = template.clone();
    let mut ok = 0u64;
    for _ in 0..n {
        packet[..40].copy_from_slice(&template[..40]);
        let result = if outbound {
            snat.outbound(black_box(&mut packet), now)
        } else {
            snat.inbound(black_box(&mut packet), now)
        };
        ok += u64::from(black_box(result).is_ok());
    }
    assert_eq!(ok, n, "every packet translated");
}
