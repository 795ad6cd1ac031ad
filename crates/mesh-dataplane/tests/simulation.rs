//! Several nodes on a simulated network with loss, reordering and one simulated clock: the node's `now` and
//! boringtun's mock clock advance together, so minutes of protocol time (handshakes, rekeys, timeouts) run in
//! milliseconds and every run is the same.
//!
//! Built only with `--features mock-clock` (see Cargo.toml); `cargo xtask ci` runs it in its own invocation so
//! the mock clock never reaches the daemon.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use mesh_dataplane::{DropReason, Node, PeerSpec, Received};
use mesh_packet::build::Builder;
use mock_instant::MockClock;

mod common;
use common::{Rng, mesh_ip, private_key, underlay};

const STEP: Duration = Duration::from_millis(5);

struct InFlight {
    at: Duration,
    seq: u64,
    from: usize,
    to: usize,
    bytes: Vec<u8>,
}

struct Sim {
    start: Instant,
    elapsed: Duration,
    nodes: Vec<Option<Node>>,
    network: Vec<InFlight>,
    sent_seq: u64,
    rng: Rng,
    loss_percent: u64,
    max_jitter_ms: u64,
    /// Per (receiver, sender): the sequence numbers of the test packets that arrived intact.
    delivered: BTreeMap<(usize, usize), Vec<u32>>,
    out: Vec<u8>,
}

impl Sim {
    fn new(n: usize, loss_percent: u64, max_jitter_ms: u64) -> Self {
        MockClock::set_time(Duration::ZERO);
        let mut sim = Sim {
            start: Instant::now(),
            elapsed: Duration::ZERO,
            nodes: Vec::new(),
            network: Vec::new(),
            sent_seq: 0,
            rng: Rng(0x9e37_79b9_7f4a_7c15),
            loss_percent,
            max_jitter_ms,
            delivered: BTreeMap::new(),
            out: vec![0; 65_600],
        };
        for i in 0..n {
            let node = sim.make_node(i, n, 7 + i as u64);
            sim.nodes.push(Some(node));
        }
        sim
    }

    fn make_node(&self, i: usize, n: usize, seed: u64) -> Node {
        let mut node = Node::new(private_key(i), seed);
        for j in (0..n).filter(|&j| j != i) {
            node.add_peer(PeerSpec {
                public_key: Node::public_key_of(private_key(j)),
                preshared_key: None,
                endpoint: Some(underlay(j)),
                allowed_ips: vec![IpNet::from(IpAddr::V4(mesh_ip(j)))],
                persistent_keepalive: None,
            })
            .unwrap();
        }
        node
    }

    fn now(&self) -> Instant {
        self.start + self.elapsed
    }

    fn node(&mut self, i: usize) -> &mut Node {
        self.nodes[i].as_mut().expect("node is running")
    }

    /// Node `from` sends test packet `seq` to node `to` through its TUN side.
    fn send(&mut self, from: usize, to: usize, seq: u32) {
        let payload = seq.to_be_bytes().repeat(64);
        let packet = Builder::v4(mesh_ip(from).octets(), mesh_ip(to).octets()).udp(4000, 5000, &payload);
        let now = self.now();
        let _ = self.node(from).handle_tun_packet(&packet, now);
        self.collect(from);
    }

    /// Moves what node `i` wants to send onto the simulated wire, losing and delaying some.
    fn collect(&mut self, i: usize) {
        while let Some(t) = self.nodes[i].as_mut().and_then(Node::poll_transmit) {
            let to = (0..self.nodes.len()).find(|&j| underlay(j) == t.dst).expect("sent to a known node");
            self.sent_seq += 1;
            if !self.rng.chance(self.loss_percent) {
                let jitter = Duration::from_millis(1 + self.rng.below(self.max_jitter_ms.max(1)));
                let at = self.elapsed + jitter;
                self.network.push(InFlight { at, seq: self.sent_seq, from: i, to, bytes: t.payload.clone() });
            }
            self.node(i).recycle(t.payload);
        }
    }

    fn step(&mut self) {
        self.elapsed += STEP;
        MockClock::advance(STEP);
        let now = self.now();
        // Deliver what is due, in arrival order: jitter reorders datagrams sent close together.
        self.network.sort_by_key(|d| (d.at, d.seq));
        let due: Vec<InFlight> = {
            let split = self.network.partition_point(|d| d.at <= self.elapsed);
            self.network.drain(..split).collect()
        };
        for d in due {
            let Some(node) = self.nodes[d.to].as_mut() else { continue };
            if let Ok(Received::Packet(len)) = node.handle_datagram(underlay(d.from), &d.bytes, now, &mut self.out) {
                let packet = &self.out[..len];
                let seq = u32::from_be_bytes(packet[28..32].try_into().unwrap());
                let intact = packet[28..].chunks(4).all(|c| c == seq.to_be_bytes());
                assert!(intact, "payload damaged in transit");
                self.delivered.entry((d.to, d.from)).or_default().push(seq);
            }
            self.collect(d.to);
        }
        for i in 0..self.nodes.len() {
            let Some(node) = self.nodes[i].as_mut() else { continue };
            if node.poll_timeout().is_some_and(|t| t <= now) {
                node.handle_timeout(now);
            }
            self.collect(i);
        }
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.elapsed + d;
        while self.elapsed < end {
            self.step();
        }
    }

    fn delivered(&self, to: usize, from: usize) -> &[u32] {
        self.delivered.get(&(to, from)).map_or(&[], Vec::as_slice)
    }
}

#[test]
fn handshakes_complete_and_traffic_flows_under_loss_and_reordering() {
    let n = 4;
    let mut sim = Sim::new(n, 10, 40);
    let per_pair = 200u32;
    for seq in 0..per_pair {
        for from in 0..n {
            for to in (0..n).filter(|&t| t != from) {
                sim.send(from, to, seq);
            }
        }
        sim.run_for(Duration::from_millis(50));
    }
    sim.run_for(Duration::from_secs(2));
    for from in 0..n {
        for to in (0..n).filter(|&t| t != from) {
            let got = sim.delivered(to, from);
            // 10 % loss each way, plus what is lost before the first handshake completes.
            assert!(got.len() as u32 >= per_pair * 8 / 10, "{from}->{to}: {} of {per_pair}", got.len());
            let mut sorted = got.to_vec();
            sorted.dedup();
            assert_eq!(sorted.len(), got.len(), "{from}->{to}: a packet was delivered twice");
        }
    }
    let reordered = sim.delivered.values().any(|v| v.windows(2).any(|w| w[0] > w[1]));
    assert!(reordered, "the network did reorder packets, and the receivers accepted them");
    for i in 0..n {
        assert!(sim.node(i).peer_status().iter().all(|p| p.since_handshake.is_some()), "node {i} has every session");
    }
}

#[test]
fn rekeying_loses_no_packets() {
    let mut sim = Sim::new(2, 0, 5);
    let total = 3000u32; // one packet each way every 100 ms for 300 s: past two rekeys (every 120 s)
    for seq in 0..total {
        sim.send(0, 1, seq);
        sim.send(1, 0, seq);
        sim.run_for(Duration::from_millis(100));
    }
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.delivered(1, 0).len() as u32, total, "0->1 lost packets across rekeys");
    assert_eq!(sim.delivered(0, 1).len() as u32, total, "1->0 lost packets across rekeys");
    let since = sim.node(0).peer_status()[0].since_handshake.expect("a session");
    assert!(since < Duration::from_secs(125), "the session was renewed (current one is {since:?} old after 300 s)");
}

#[test]
fn a_restarted_peer_is_reachable_again() {
    let mut sim = Sim::new(2, 0, 5);
    for seq in 0..50 {
        sim.send(0, 1, seq);
        sim.run_for(Duration::from_millis(100));
    }
    assert_eq!(sim.delivered(1, 0).len(), 50);

    // Node 1 restarts: same key, no memory of the session node 0 still uses.
    sim.nodes[1] = None;
    sim.run_for(Duration::from_secs(2));
    // A restart draws new randomness, so its session indices differ from before.
    sim.nodes[1] = Some(sim.make_node(1, 2, 0xdead_beef));
    let restarted_at = sim.elapsed;
    let mut seq = 50;
    while sim.delivered(1, 0).len() < 51 {
        sim.send(0, 1, seq);
        seq += 1;
        sim.run_for(Duration::from_millis(100));
        assert!(
            sim.elapsed - restarted_at < Duration::from_secs(30),
            "node 0 never re-handshook with the restarted node"
        );
    }
    assert!(
        sim.node(1).counters().dropped(DropReason::UnknownPeer) > 0,
        "old-session packets were dropped and counted"
    );
    // Both directions work again.
    let before = sim.delivered(0, 1).len();
    sim.send(1, 0, 9999);
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.delivered(0, 1).len(), before + 1);
}
