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
