//! The body of the `translate` fuzz target, shared with the test that replays the committed corpus so the
//! corpus is exercised on every CI run even though fuzzing itself is not.

use std::time::{Duration, Instant};

use crate::snat::{Snat, SnatConfig};

/// Feeds arbitrary bytes to the parser and to both directions of a SNAT engine that already holds a few
/// flows. The first byte chooses a direction and a time step; the rest is the packet.
pub fn translate(data: &[u8]) {
    let Some((&control, packet)) = data.split_first() else {
        return;
    };
    let start = Instant::now();
    let mut config = SnatConfig::new(Some([192, 0, 2, 1].into()), Some("fd00::5".parse().expect("valid address")));
    config.max_flows = 64;
    config.max_fragments = 8;
    config.ports = 40000..=40063;
    let mut snat = Snat::new(config, start).expect("valid config");
    let mut buf = packet.to_vec();
    let _ = if control & 1 == 0 { crate::wire::parse(&buf) } else { crate::wire::parse_quoted(&buf) };
    let mut clamped = packet.to_vec();
    crate::mss::clamp(&mut clamped, u16::from(control) * 8);
    let now = start + Duration::from_secs(u64::from(control >> 4) * 60);
    // Run the packet outbound first so inbound has state to match against, then inbound.
    let _ = snat.outbound(&mut buf, start);
    let _ = snat.inbound(&mut buf, now);
    let mut again = packet.to_vec();
    let _ = snat.inbound(&mut again, now);
    snat.handle_timeout(now + Duration::from_secs(10_000));
    let _ = snat.poll_timeout();
}

/// The body of the `filter` fuzz target: arbitrary packets through a filter with rules, in both directions
/// and over time, with the rules replaced midway. Nothing may panic, and the tracker stays within its bound.
/// The first byte chooses the direction and a time step; the rest is the packet.
pub fn filter(data: &[u8]) {
    use crate::filter::{DstRange, Filter, Rule};
    const MAX_FLOWS: usize = 16;
    let Some((&control, packet)) = data.split_first() else {
        return;
    };
    let start = Instant::now();
    let net = |s: &str| s.parse().expect("literal prefix");
    let rules = vec![
        Rule {
            src: vec![net("0.0.0.0/0"), net("::/0")],
            dst: vec![DstRange { net: None, first: 1, last: 1024 }],
            protos: vec![],
        },
        Rule {
            src: vec![net("100.64.0.0/10")],
            dst: vec![DstRange { net: Some(net("10.0.0.0/8")), first: 0, last: 65535 }],
            protos: vec![47, 6],
        },
    ];
    let mut filter = Filter::new(MAX_FLOWS);
    filter.set_rules(Some(rules.clone()));
    // The packet, then variations of it, so a tracked flow meets its own replies and later segments.
    for (step, bytes) in packet.chunks(packet.len().div_ceil(4).max(1)).enumerate() {
        let now = start + Duration::from_secs(u64::from(control >> 2) * step as u64 * 7);
        let _ = filter.inbound(packet, now);
        filter.outbound(packet, now);
        let _ = filter.inbound(bytes, now);
        assert!(filter.flows() <= MAX_FLOWS, "the tracker grew past its bound");
        if control & 1 == 1 {
            for cut in filter.set_rules(Some(rules[..1].to_vec())) {
                for notice in cut.notice.iter().chain(&cut.local_reset) {
                    crate::wire::parse(notice).expect("a notice the filter builds parses");
                }
            }
        }
        let _ = filter.forget_unrouted(|a| a.is_ipv4() == (control & 2 == 0));
        filter.handle_timeout(now);
    }
}
