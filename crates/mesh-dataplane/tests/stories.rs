//! The seeds' stories on the sans-IO data plane alone: whole [`Dataplane`]s on a simulated underlay that loses
//! and reorders datagrams, LAN hosts behind the routers that answer what reaches them, and one simulated
//! clock (the data planes' `now` and boringtun's mock clock advance together, event by event, so an hour of
//! NAT timeouts runs in a moment and every run is the same).
//!
//! - S1 (seed 000): a client reaches a VPC host through a router that SNATs to a dedicated address.
//! - S2 (seed 002): two routers serve their clusters to each other with sources preserved.
//! - The SNAT table against a reference model over an hour: endpoint-independent mappings kept while in use,
//!   reused across destinations, expired when idle, and a full pool that refuses and counts.
//!
//! Built only with `--features mock-clock`; `cargo xtask ci` runs it in its own invocation.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use mesh_dataplane::router::Served;
use mesh_dataplane::{Dataplane, DataplaneConfig, DropReason, Node, PeerSpec, SnatSettings};
use mesh_packet::build::Builder;
use mesh_packet::snat;
use mesh_packet::wire::{self, TCP_ACK, TCP_SYN};
use mock_instant::MockClock;
use smoltcp::wire::{Icmpv4Packet, IpAddress, Ipv4Packet, TcpPacket, UdpPacket};

mod common;
use common::{Rng, mesh_ip, private_key, underlay};

fn v4(text: &str) -> Ipv4Addr {
    text.parse().unwrap()
}

fn peer(i: usize, routes: &[&str]) -> PeerSpec {
    let mut allowed_ips = vec![IpNet::from(IpAddr::V4(mesh_ip(i)))];
    allowed_ips.extend(routes.iter().map(|r| r.parse::<IpNet>().unwrap()));
    PeerSpec {
        public_key: Node::public_key_of(private_key(i)),
        preshared_key: None,
        endpoint: Some(underlay(i)),
        allowed_ips,
        persistent_keepalive: None,
    }
}

/// Asserts every checksum of an IPv4 packet with smoltcp's verifiers, an implementation independent of ours.
fn assert_checksums(packet: &[u8]) {
    let ip = Ipv4Packet::new_checked(packet).expect("an IPv4 packet");
    assert!(ip.verify_checksum(), "IPv4 header checksum");
    let (src, dst) = (IpAddress::Ipv4(ip.src_addr()), IpAddress::Ipv4(ip.dst_addr()));
    let payload = ip.payload();
    match u8::from(ip.next_header()) {
        6 => assert!(TcpPacket::new_checked(payload).unwrap().verify_checksum(&src, &dst), "TCP checksum"),
        17 => assert!(UdpPacket::new_checked(payload).unwrap().verify_checksum(&src, &dst), "UDP checksum"),
        1 => assert!(Icmpv4Packet::new_checked(payload).unwrap().verify_checksum(), "ICMP checksum"),
        other => panic!("unexpected protocol {other}"),
    }
}

/// What a LAN host or an application needs of a packet: its protocol, endpoints and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    proto: u8,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    tcp_flags: u8,
    payload: Vec<u8>,
}

fn read(packet: &[u8]) -> Seen {
    assert_checksums(packet);
    let layout = wire::parse(packet).expect("a whole packet");
    let l4 = &packet[layout.l4_offset..layout.packet_len];
    let (src, dst) = (wire::source(packet).unwrap(), wire::destination(packet).unwrap());
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (src, dst) else { panic!("IPv4 only here") };
    let port = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
    let (ports, tcp_flags, payload) = match layout.protocol {
        wire::PROTO_TCP => ((port(0), port(2)), l4[13], &l4[usize::from(l4[12] >> 4) * 4..]),
        wire::PROTO_UDP => ((port(0), port(2)), 0, &l4[8..]),
        // An echo's identifier stands for both ports, as NAT treats it.
        _ => ((port(4), port(4)), l4[0], &l4[8..]),
    };
    Seen { proto: layout.protocol, src: (src, ports.0), dst: (dst, ports.1), tcp_flags, payload: payload.to_vec() }
}

/// The packet a host sends back: endpoints swapped, the same payload, a SYN answered with SYN-ACK and an echo
/// request with its reply.
fn answer(seen: &Seen) -> Vec<u8> {
    let b = Builder::v4(seen.dst.0.octets(), seen.src.0.octets());
    match seen.proto {
        wire::PROTO_TCP => b.tcp(seen.dst.1, seen.src.1, TCP_SYN | TCP_ACK, &seen.payload),
        wire::PROTO_UDP => b.udp(seen.dst.1, seen.src.1, &seen.payload),
        _ => b.echo(false, seen.src.1, 1, &seen.payload),
    }
}

/// A LAN behind a router: one host that records what reaches it and answers it.
struct Lan {
    prefix: IpNet,
    received: Vec<Seen>,
}

struct Host {
    dataplane: Dataplane,
    lan: Option<Lan>,
    /// Packets the data plane wrote to the TUN device for this host's own applications.
    delivered: Vec<Seen>,
}

struct InFlight {
    at: Duration,
    seq: u64,
    from: usize,
    to: usize,
    bytes: Vec<u8>,
}

/// Hosts on a lossy, reordering underlay, driven event by event on one simulated clock.
struct World {
    start: Instant,
    elapsed: Duration,
    hosts: Vec<Host>,
    network: Vec<InFlight>,
    rng: Rng,
    loss_percent: u64,
    max_jitter_ms: u64,
    sent: u64,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl World {
    fn new(loss_percent: u64, max_jitter_ms: u64) -> Self {
        MockClock::set_time(Duration::ZERO);
        World {
            start: Instant::now(),
            elapsed: Duration::ZERO,
            hosts: Vec::new(),
            network: Vec::new(),
            rng: Rng(0x9e37_79b9_7f4a_7c15),
            loss_percent,
            max_jitter_ms,
            sent: 0,
            buf: Vec::new(),
            out: vec![0; 65_600],
        }
    }

    fn now(&self) -> Instant {
        self.start + self.elapsed
    }

    fn add(&mut self, config: DataplaneConfig, lan: Option<&str>) -> usize {
        let i = self.hosts.len();
        let mut dataplane = Dataplane::new(private_key(i), 7 + i as u64, 1420);
        dataplane.configure(config, self.now()).expect("a valid configuration");
        let lan = lan.map(|p| Lan { prefix: p.parse().unwrap(), received: Vec::new() });
        self.hosts.push(Host { dataplane, lan, delivered: Vec::new() });
        i
    }

    /// An application (or, on a router, its LAN through the kernel's routes) on host `i` sends `packet` into
    /// the TUN device.
    fn send(&mut self, i: usize, mut packet: Vec<u8>) {
        let now = self.now();
        let _ = self.hosts[i].dataplane.handle_tun_packet(&mut packet, now);
        self.collect(i);
    }

    /// Moves what host `i` wants to send onto the simulated wire, losing and delaying some.
    fn collect(&mut self, i: usize) {
        while let Some(t) = self.hosts[i].dataplane.poll_transmit(&mut self.buf, 16) {
            let to = (0..self.hosts.len()).find(|&j| underlay(j) == t.destination).expect("a known host");
            for datagram in self.buf[..t.size].chunks(t.segment_size) {
                self.sent += 1;
                if self.rng.next() % 100 < self.loss_percent {
                    continue;
                }
                let at = self.elapsed + Duration::from_millis(1 + self.rng.next() % self.max_jitter_ms.max(1));
                self.network.push(InFlight { at, seq: self.sent, from: i, to, bytes: datagram.to_vec() });
            }
        }
    }

    /// What the kernel of host `to` does with a packet the data plane wrote to its TUN device: a router hands
    /// one for its LAN to the LAN host, which answers through the same kernel back into the TUN device;
    /// anything else is for the host's own applications.
    fn through_kernel(&mut self, to: usize, packet: Vec<u8>) {
        let seen = read(&packet);
        let host = &mut self.hosts[to];
        match &mut host.lan {
            Some(lan) if lan.prefix.contains(&IpAddr::V4(seen.dst.0)) => {
                let reply = answer(&seen);
                lan.received.push(seen);
                self.send(to, reply);
            }
            _ => host.delivered.push(seen),
        }
    }

    fn deliver_due(&mut self) {
        self.network.sort_by_key(|d| (d.at, d.seq));
        let split = self.network.partition_point(|d| d.at <= self.elapsed);
        let due: Vec<InFlight> = self.network.drain(..split).collect();
        let now = self.now();
        for d in due {
            let result = self.hosts[d.to].dataplane.handle_datagram(underlay(d.from), &d.bytes, now, &mut self.out);
            if let Ok(Some(n)) = result {
                let packet = self.out[..n].to_vec();
                self.through_kernel(d.to, packet);
            }
            self.collect(d.to);
        }
    }

    /// Runs every event up to `elapsed + d`: arrivals and each data plane's timers, in time order.
    fn run_for(&mut self, d: Duration) {
        let end = self.elapsed + d;
        loop {
            let timers = self.hosts.iter().filter_map(|h| h.dataplane.poll_timeout());
            let next_timer = timers.min().map(|t| t.saturating_duration_since(self.start));
            let next_arrival = self.network.iter().map(|f| f.at).min();
            let next = [next_timer, next_arrival].into_iter().flatten().min().unwrap_or(end).max(self.elapsed);
            if next > end {
                break;
            }
            MockClock::advance(next - self.elapsed);
            self.elapsed = next;
            self.deliver_due();
            let now = self.now();
            for i in 0..self.hosts.len() {
                if self.hosts[i].dataplane.poll_timeout().is_some_and(|t| t <= now) {
                    self.hosts[i].dataplane.handle_timeout(now);
                }
                self.collect(i);
            }
            if next == end {
                break;
            }
        }
        MockClock::advance(end - self.elapsed);
        self.elapsed = end;
    }

    fn lan(&self, i: usize) -> &Lan {
        self.hosts[i].lan.as_ref().expect("a router")
    }
}

const CLIENT: usize = 0;
const ROUTER: usize = 1;

/// S1: a client (100.64.0.1) and a router (100.64.0.2) serving 10.0.0.0/16 with SNAT to 10.0.12.9.
fn s1_world(loss_percent: u64, snat: SnatSettings) -> World {
    let mut world = World::new(loss_percent, 30);
    world.add(
        DataplaneConfig {
            mesh_addresses: vec![mesh_ip(CLIENT).into()],
            peers: vec![peer(ROUTER, &["10.0.0.0/16"])],
            ..DataplaneConfig::default()
        },
        None,
    );
    world.add(
        DataplaneConfig {
            mesh_addresses: vec![mesh_ip(ROUTER).into()],
            local_addresses: vec![v4("10.0.12.1").into()],
            peers: vec![peer(CLIENT, &[])],
            served: vec![Served { prefix: "10.0.0.0/16".parse().unwrap(), snat: true }],
            snat,
            filter: None,
            dns: None,
        },
        Some("10.0.12.0/24"),
    );
    world
}

fn snat_to(address: &str) -> SnatSettings {
    SnatSettings::with_addresses(&[address.parse().unwrap()]).unwrap()
}

#[test]
fn s1_the_vpc_host_sees_only_the_snat_address_and_every_byte_under_loss() {
    let mut world = s1_world(10, snat_to("10.0.12.9"));
    let server = v4("10.0.12.50");
    let mut sent = BTreeMap::new();
    for i in 0..300u16 {
        let mut payload = i.to_be_bytes().to_vec();
        payload.extend((0..200u16).map(|b| (b * 31 + i) as u8));
        let b = Builder::v4(mesh_ip(CLIENT).octets(), server.octets());
        let packet = match i % 3 {
            0 => b.tcp(40_000 + i, 443, TCP_SYN, &payload),
            1 => b.udp(50_000 + i, 53, &payload),
            _ => b.echo(true, 7_000 + i, 1, &payload),
        };
        sent.insert(i, read(&packet));
        world.send(CLIENT, packet);
        world.run_for(Duration::from_millis(20));
    }
    world.run_for(Duration::from_secs(2));

    let lan = world.lan(ROUTER);
    // 10 % loss each way and the first packets before the handshake: most, not all, arrive.
    assert!(lan.received.len() >= 220, "{} of 300 reached the VPC host", lan.received.len());
    for seen in &lan.received {
        assert_eq!(seen.src.0, v4("10.0.12.9"), "the VPC host saw only the SNAT address: {seen:?}");
        assert_eq!(seen.dst.0, server);
        let original = sent.values().find(|s| s.payload == seen.payload).expect("a packet the client sent");
        assert_eq!(seen.proto, original.proto);
        if seen.proto != wire::PROTO_ICMP {
            assert_eq!(seen.dst.1, original.dst.1, "the service port is kept (an echo's identifier is mapped)");
        }
    }
    // The answers come back addressed to the client's own endpoint, from the server it asked.
    let delivered = &world.hosts[CLIENT].delivered;
    assert!(delivered.len() >= 160, "{} answers reached the client", delivered.len());
    for answer in delivered {
        let asked = sent.values().find(|s| s.payload == answer.payload).expect("an answer to a request");
        assert_eq!((answer.src, answer.dst), (asked.dst, asked.src), "translated back exactly: {answer:?}");
        if answer.proto == wire::PROTO_TCP {
            assert_eq!(answer.tcp_flags, TCP_SYN | TCP_ACK);
        }
    }
    // What was refused says why: nothing here, since every packet was for the served VPC.
    let router = &world.hosts[ROUTER].dataplane;
    assert_eq!(router.dropped(DropReason::NotRouted) + router.dropped(DropReason::SourceNotAllowed), 0);
}

#[test]
fn s2_two_clusters_reach_each_other_with_sources_preserved() {
    const R1: usize = 0;
    const R2: usize = 1;
    let mut world = World::new(10, 30);
    world.add(
        DataplaneConfig {
            mesh_addresses: vec![mesh_ip(R1).into()],
            local_addresses: vec![v4("10.42.0.1").into()],
            peers: vec![peer(R2, &["10.52.0.0/16"])],
            served: vec![Served { prefix: "10.42.0.0/16".parse().unwrap(), snat: false }],
            snat: SnatSettings::default(),
            filter: None,
            dns: None,
        },
        Some("10.42.0.0/16"),
    );
    world.add(
        DataplaneConfig {
            mesh_addresses: vec![mesh_ip(R2).into()],
            local_addresses: vec![v4("10.52.0.1").into()],
            peers: vec![peer(R1, &["10.42.0.0/16"])],
            served: vec![Served { prefix: "10.52.0.0/16".parse().unwrap(), snat: false }],
            snat: SnatSettings::default(),
            filter: None,
            dns: None,
        },
        Some("10.52.0.0/16"),
    );
    let (pod1, pod2) = (v4("10.42.0.10"), v4("10.52.0.10"));
    for i in 0..200u16 {
        // Each router's kernel routes its pods' traffic for the other cluster into its TUN device.
        let payload = i.to_be_bytes().repeat(50);
        world.send(R1, Builder::v4(pod1.octets(), pod2.octets()).udp(30_000 + i, 8080, &payload));
        world.send(R2, Builder::v4(pod2.octets(), pod1.octets()).tcp(31_000 + i, 5432, TCP_SYN, &payload));
        world.run_for(Duration::from_millis(25));
    }
    world.run_for(Duration::from_secs(2));
    for (router, from, to) in [(R2, pod1, pod2), (R1, pod2, pod1)] {
        let lan = world.lan(router);
        assert!(lan.received.len() >= 150, "{} of 200 reached {to}", lan.received.len());
        assert!(lan.received.iter().all(|s| s.src.0 == from && s.dst.0 == to), "sources preserved");
    }
    // The answers crossed back too, addressed to the pod that asked.
    let answers = |r: usize| world.hosts[r].delivered.len() + world.lan(r).received.len();
    assert!(answers(R1) > 200 && answers(R2) > 200);
    assert!(world.hosts.iter().all(|h| h.dataplane.snat().is_none()), "no SNAT engine at all");
}

/// The SNAT table as RFC 4787 describes it: one mapping per internal endpoint, shared by all its flows, alive
/// while any of them was used within the UDP timeout, its port unique among live mappings.
struct SnatModel {
    pool: usize,
    idle: Duration,
    /// Internal endpoint → (external port, last use per destination).
    mappings: HashMap<Endpoint, (u16, HashMap<Endpoint, Duration>)>,
}

type Endpoint = (Ipv4Addr, u16);

enum Expect {
    Translated,
    Refused,
}

impl SnatModel {
    fn expire(&mut self, now: Duration) {
        for (_, flows) in self.mappings.values_mut() {
            flows.retain(|_, used| now - *used <= self.idle);
        }
        self.mappings.retain(|_, (_, flows)| !flows.is_empty());
    }

    fn expect(&mut self, from: (Ipv4Addr, u16), now: Duration) -> Expect {
        self.expire(now);
        if self.mappings.contains_key(&from) || self.mappings.len() < self.pool {
            Expect::Translated
        } else {
            Expect::Refused
        }
    }

    /// Checks what the router did with a packet the model expected it to translate, and records it.
    fn translated(&mut self, from: (Ipv4Addr, u16), to: (Ipv4Addr, u16), port: u16, now: Duration) {
        if let Some((mapped, flows)) = self.mappings.get_mut(&from) {
            assert_eq!(*mapped, port, "{from:?} kept its mapping (to {to:?}): endpoint-independent");
            flows.insert(to, now);
            return;
        }
        let taken: Vec<u16> = self.mappings.values().map(|(p, _)| *p).collect();
        assert!(!taken.contains(&port), "{from:?} got port {port}, which a live mapping holds: {taken:?}");
        self.mappings.insert(from, (port, HashMap::from([(to, now)])));
    }
}

#[test]
fn the_snat_table_over_an_hour_matches_a_reference_model() {
    // Four external ports, so the pool runs out; UDP mappings idle out after 300 s (RFC 4787's 5 minutes).
    // The reference model knows the pool, not per-source shares (their own test is in mesh-packet).
    let settings = SnatSettings { ports: 20_000..=20_003, source_share: 1, ..snat_to("10.0.12.9") };
    let mut world = s1_world(10, settings);
    let idle = Duration::from_secs(u64::from(snat::Timeouts::default().udp));
    let mut model = SnatModel { pool: 4, idle, mappings: HashMap::new() };
    let servers = [v4("10.0.12.50"), v4("10.0.12.51"), v4("10.0.12.52")];
    let mut rng = Rng(0x5eed);
    let (mut translated, mut refused, mut reused_across_destinations) = (0, 0, 0);
    // One operation every 70 s, so an idle time is a multiple of 70 s plus the few seconds an operation takes:
    // never within seconds of the 300 s timeout, where the model and the table's one-second ticks may differ.
    for op in 0..60u64 {
        let at = Duration::from_secs(70 * op);
        world.run_for(at.saturating_sub(world.elapsed));
        let from = (mesh_ip(CLIENT), 1000 + (rng.next() % 7) as u16);
        let to = (servers[(rng.next() % 3) as usize], 53);
        let expected = model.expect(from, world.elapsed);
        let exhausted_before =
            world.hosts[ROUTER].dataplane.snat().unwrap().counters().dropped(snat::DropReason::PoolExhausted);
        // The underlay loses datagrams: send again until the router either translates the packet (the VPC
        // host sees it) or refuses it (its counter moves), as an application would retry.
        let payload = format!("op {op}").into_bytes();
        let outcome = (0..30).find_map(|_| {
            let packet = Builder::v4(from.0.octets(), to.0.octets()).udp(from.1, to.1, &payload);
            world.send(CLIENT, packet);
            world.run_for(Duration::from_millis(200));
            let router = &world.hosts[ROUTER].dataplane;
            if let Some(seen) = world.lan(ROUTER).received.iter().rev().find(|s| s.payload == payload) {
                return Some(Ok(seen.src.1));
            }
            let exhausted = router.snat().unwrap().counters().dropped(snat::DropReason::PoolExhausted);
            (exhausted > exhausted_before).then_some(Err(exhausted - exhausted_before))
        });
        match (expected, outcome.expect("the packet got through or was refused within 30 tries")) {
            (Expect::Translated, Ok(port)) => {
                if model.mappings.get(&from).is_some_and(|(_, flows)| !flows.contains_key(&to)) {
                    reused_across_destinations += 1;
                }
                model.translated(from, to, port, world.elapsed);
                translated += 1;
            }
            (Expect::Refused, Err(count)) => {
                assert!(count >= 1);
                refused += 1;
            }
            (Expect::Translated, Err(_)) => panic!("op {op}: {from:?} -> {to:?} refused with room in the pool"),
            (Expect::Refused, Ok(port)) => panic!("op {op}: {from:?} translated to {port} with the pool full"),
        }
        let live = world.hosts[ROUTER].dataplane.snat().unwrap().mappings();
        assert!(live >= model.mappings.len().min(4), "op {op}: the table holds {live} mappings");
    }
    // The hour went through every case the model knows.
    assert!(
        translated >= 20 && refused >= 3 && reused_across_destinations >= 3,
        "{translated} {refused} {reused_across_destinations}"
    );
    let counters = world.hosts[ROUTER].dataplane.snat().unwrap().counters();
    assert!(counters.dropped(snat::DropReason::PoolExhausted) >= refused, "every refusal was counted");
    assert_eq!(
        world.hosts[ROUTER].dataplane.dropped(DropReason::Snat(snat::DropReason::PoolExhausted)),
        counters.drops_total()
    );
}
