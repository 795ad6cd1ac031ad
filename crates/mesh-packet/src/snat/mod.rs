//! Source NAT for a subnet router, sans-IO: packets in, packets rewritten in place, time as a parameter.
//!
//! *Outbound* packets come from the mesh and leave toward the LAN: their source becomes the SNAT address
//! and a port (or ICMP echo identifier) from the pool. *Inbound* packets come from the LAN addressed to the
//! SNAT address: replies are translated back; anything without a session is dropped.
//!
//! Mappings are endpoint-independent (RFC 4787 REQ-1, RFC 5382 REQ-1, RFC 5508 REQ-3): an internal
//! address and port keep one external port whatever they talk to. Filtering is address-and-port
//! dependent: an inbound packet passes only from a remote endpoint the internal endpoint has sent to.
//! ICMP errors are translated with their quoted packet (RFC 5508), so path-MTU discovery works; later
//! fragments follow their first fragment by (source, destination, protocol, identification).
//!
//! Every refusal is a [`DropReason`] and is counted; a full table or pool refuses new flows and never evicts.

mod addr;
mod table;

use core::cell::Cell;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use core::ops::RangeInclusive;
use std::time::{Duration, Instant};

use crate::checksum::{Delta, adjust_at, adjust_udp_at};
use crate::wire::{self, Fragment, IcmpKind, IpVersion, Layout, PROTO_TCP, PROTO_UDP, field};
pub use addr::Family;
pub use table::Stats;
use table::{FlowKey, FragmentKey, Proto, Table, tcp};

/// Idle timeouts, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// RFC 5382 REQ-5: at least 2 h 4 min.
    pub tcp_established: u32,
    /// Partially open or closing TCP (RFC 5382 REQ-5: at least 4 min).
    pub tcp_transitory: u32,
    /// RFC 4787 REQ-5: at least 2 min, 5 min recommended.
    pub udp: u32,
    /// RFC 5508 REQ-1: 60 s.
    pub icmp: u32,
    /// How long later fragments may follow the first one.
    pub fragment: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { tcp_established: 7440, tcp_transitory: 240, udp: 300, icmp: 60, fragment: 5 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnatConfig {
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// External ports (and ICMP identifiers) to hand out, per protocol and address.
    pub ports: RangeInclusive<u16>,
    /// Flows per address family before new ones are refused.
    pub max_flows: u32,
    /// Datagrams per address family whose later fragments are awaited at once.
    pub max_fragments: u32,
    /// One source address may hold at most 1/`source_share` of the flows, of each protocol's external
    /// ports and of the fragment slots (1: no per-source limit). Each mesh peer sends from its own
    /// addresses, so this is a per-peer quota for ordinary nodes.
    pub source_share: u32,
    pub timeouts: Timeouts,
    /// Seeds the order in which external ports are handed out. [`SnatConfig::new`] draws it from the
    /// operating system's randomness; tests set it to make runs repeatable.
    pub seed: u64,
}

impl SnatConfig {
    pub fn new(ipv4: Option<Ipv4Addr>, ipv6: Option<Ipv6Addr>) -> Self {
        Self {
            ipv4,
            ipv6,
            ports: 1024..=65535,
            max_flows: 1 << 20,
            max_fragments: 4096,
            source_share: 8,
            timeouts: Timeouts::default(),
            seed: random_seed(),
        }
    }
}

/// The owner a packet is charged to when no peer is named: its source address, in a range of numbers
/// peers (below 2^32) never use. IPv6 addresses are folded to 62 bits, so a rare few may share a share.
pub fn owner_of_address(address: IpAddr) -> u64 {
    const BY_ADDRESS: u64 = 1 << 63;
    const V6: u64 = 1 << 62;
    match address {
        IpAddr::V4(v4) => BY_ADDRESS | u64::from(u32::from(v4)),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            BY_ADDRESS | V6 | ((bits as u64 ^ (bits >> 64) as u64) & (V6 - 1))
        }
    }
}

/// A seed from the standard library's per-process hash keys, which it draws from the operating system:
/// enough to make external ports unpredictable off-path without another dependency.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

/// The longest idle timeout accepted: thirty days.
pub const MAX_TIMEOUT: u32 = 30 * 24 * 3600;

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    NoAddress,
    EmptyPortRange,
    TimeoutOutOfRange,
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ConfigError::NoAddress => "SNAT needs an IPv4 or IPv6 address to translate to",
            ConfigError::EmptyPortRange => "the SNAT port range is empty or starts at 0",
            ConfigError::TimeoutOutOfRange => "SNAT timeouts must be between one second and thirty days",
        })
    }
}

impl std::error::Error for ConfigError {}

/// Why a packet was not translated. Each has a counter in [`Counters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DropReason {
    /// Truncated or with impossible header fields.
    Malformed,
    /// Valid but not handled: an IPv6 routing header in transit, AH/ESP, too many extension headers.
    UnsupportedPacket,
    /// A transport protocol without ports (anything but TCP, UDP and ICMP).
    UnsupportedProtocol,
    /// An ICMP message that is neither echo nor an error (redirect, router advertisement, ...).
    UnsupportedIcmp,
    /// No SNAT address is configured for this IP version.
    NoAddressForFamily,
    /// An inbound packet not addressed to the SNAT address.
    NotForSnatAddress,
    /// An inbound packet with no live session: unsolicited, or for a session that has expired.
    Unsolicited,
    /// No external port is free for a new mapping.
    PoolExhausted,
    /// The flow table is at its limit.
    TableFull,
    /// A later fragment whose first fragment was not seen (or was too long ago).
    FragmentWithoutState,
    /// Too many fragmented datagrams in flight.
    FragmentTableFull,
    /// An ICMP error quoting a packet that belongs to no session.
    IcmpErrorWithoutSession,
    /// An outbound TCP reset for which no flow exists: nothing to reset, and not worth a mapping.
    OrphanReset,
    /// The packet's source already holds its share of the flows, external ports or fragment slots
    /// ([`SnatConfig::source_share`]), so one client cannot take them from every other.
    SourceOverQuota,
}

impl DropReason {
    pub const ALL: [DropReason; 14] = [
        DropReason::Malformed,
        DropReason::UnsupportedPacket,
        DropReason::UnsupportedProtocol,
        DropReason::UnsupportedIcmp,
        DropReason::NoAddressForFamily,
        DropReason::NotForSnatAddress,
        DropReason::Unsolicited,
        DropReason::PoolExhausted,
        DropReason::TableFull,
        DropReason::FragmentWithoutState,
        DropReason::FragmentTableFull,
        DropReason::IcmpErrorWithoutSession,
        DropReason::OrphanReset,
        DropReason::SourceOverQuota,
    ];

    /// A stable name for metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnsupportedPacket => "unsupported_packet",
            DropReason::UnsupportedProtocol => "unsupported_protocol",
            DropReason::UnsupportedIcmp => "unsupported_icmp",
            DropReason::NoAddressForFamily => "no_address_for_family",
            DropReason::NotForSnatAddress => "not_for_snat_address",
            DropReason::Unsolicited => "unsolicited",
            DropReason::PoolExhausted => "pool_exhausted",
            DropReason::TableFull => "table_full",
            DropReason::FragmentWithoutState => "fragment_without_state",
            DropReason::FragmentTableFull => "fragment_table_full",
            DropReason::IcmpErrorWithoutSession => "icmp_error_without_session",
            DropReason::OrphanReset => "orphan_reset",
            DropReason::SourceOverQuota => "source_over_quota",
        }
    }
}

impl From<wire::Error> for DropReason {
    fn from(e: wire::Error) -> Self {
        match e {
            wire::Error::Truncated | wire::Error::Malformed => DropReason::Malformed,
            wire::Error::Unsupported => DropReason::UnsupportedPacket,
        }
    }
}

/// Lifetime counters of an engine.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counters {
    pub outbound: u64,
    pub inbound: u64,
    pub flows_created: u64,
    pub flows_expired: u64,
    drops: [u64; DropReason::ALL.len()],
}

impl Counters {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    pub fn drops_total(&self) -> u64 {
        self.drops.iter().sum()
    }
}

/// Which side of the router a packet came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Outbound,
    Inbound,
}

/// The SNAT engine of a router: one table per address family.
#[derive(Debug)]
pub struct Snat {
    epoch: Instant,
    clock: Cell<SecondCache>,
    timeouts: Timeouts,
    v4: Option<Table<Ipv4Addr>>,
    v6: Option<Table<Ipv6Addr>>,
    counters: Counters,
    stats: Stats,
    /// External ports (and ICMP identifiers) per protocol and address.
    ports: u32,
}

/// The tick of the second last seen, and where that second starts and ends, so packets arriving within one
/// second (nearly all of them) find their tick with two comparisons.
#[derive(Debug, Clone, Copy)]
struct SecondCache {
    start: Instant,
    end: Instant,
    tick: u32,
}

/// Wheel entries handled per [`Snat::handle_timeout`] call, so one call never stalls the data path.
const TIMEOUT_BUDGET: usize = 4096;

impl Snat {
    pub fn new(config: SnatConfig, now: Instant) -> Result<Self, ConfigError> {
        if config.ipv4.is_none() && config.ipv6.is_none() {
            return Err(ConfigError::NoAddress);
        }
        let (first, last) = (*config.ports.start(), *config.ports.end());
        if first == 0 || first > last {
            return Err(ConfigError::EmptyPortRange);
        }
        let t = config.timeouts;
        let timeouts = [t.tcp_established, t.tcp_transitory, t.udp, t.icmp, t.fragment];
        if timeouts.iter().any(|&s| s == 0 || s > MAX_TIMEOUT) {
            return Err(ConfigError::TimeoutOutOfRange);
        }
        let limits = table::Limits {
            max_flows: config.max_flows,
            max_fragments: config.max_fragments as usize,
            source_share: config.source_share.max(1),
        };
        Ok(Self {
            epoch: now,
            clock: Cell::new(SecondCache { start: now, end: now + Duration::from_secs(1), tick: 0 }),
            timeouts: t,
            v4: config.ipv4.map(|a| Table::new(a, first, last, limits, config.seed)),
            v6: config.ipv6.map(|a| Table::new(a, first, last, limits, config.seed ^ 0x6)),
            counters: Counters::default(),
            stats: Stats::default(),
            ports: u32::from(last - first) + 1,
        })
    }

    /// How many mappings the pool holds when full: its ports for each of TCP, UDP and ICMP, per address.
    pub fn mapping_capacity(&self) -> usize {
        let families = usize::from(self.v4.is_some()) + usize::from(self.v6.is_some());
        self.ports as usize * 3 * families
    }

    /// Whether `ip` is one of the addresses this engine translates to.
    pub fn is_snat_address(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.v4.as_ref().is_some_and(|t| t.addr == a),
            IpAddr::V6(a) => self.v6.as_ref().is_some_and(|t| t.addr == a),
        }
    }

    #[inline]
    fn tick(&self, now: Instant) -> u32 {
        let cached = self.clock.get();
        if cached.start <= now && now < cached.end {
            return cached.tick;
        }
        self.tick_slow(now)
    }

    #[cold]
    fn tick_slow(&self, now: Instant) -> u32 {
        let secs = now.saturating_duration_since(self.epoch).as_secs();
        // Capped far below u32::MAX so tick arithmetic (tick + timeout, tick + wheel size) cannot overflow;
        // the cap is 68 years of uptime.
        let tick = secs.min(u64::from(u32::MAX / 2)) as u32;
        let start = self.epoch + Duration::from_secs(secs);
        self.clock.set(SecondCache { start, end: start + Duration::from_secs(1), tick });
        tick
    }

    /// Translates a packet from the mesh toward the LAN in place. On `Err` the packet must be dropped; it may
    /// have been partly rewritten.
    pub fn outbound(&mut self, packet: &mut [u8], now: Instant) -> Result<(), DropReason> {
        let owner = wire::source(packet).map_or(0, owner_of_address);
        self.outbound_from(packet, now, owner)
    }

    /// [`Snat::outbound`] for a packet sent by `owner` (a mesh peer's number, below 2^32): the per-source
    /// shares ([`SnatConfig::source_share`]) are then the owner's, whatever source addresses it uses.
    pub fn outbound_from(&mut self, packet: &mut [u8], now: Instant, owner: u64) -> Result<(), DropReason> {
        let result = self.translate(packet, now, Direction::Outbound, owner);
        self.count(result, Direction::Outbound)
    }

    /// Translates a packet from the LAN addressed to the SNAT address back toward the mesh, in place.
    pub fn inbound(&mut self, packet: &mut [u8], now: Instant) -> Result<(), DropReason> {
        let result = self.translate(packet, now, Direction::Inbound, 0);
        self.count(result, Direction::Inbound)
    }

    #[inline]
    fn translate(&mut self, packet: &mut [u8], now: Instant, dir: Direction, owner: u64) -> Result<(), DropReason> {
        let tick = self.tick(now);
        let t = &self.timeouts;
        match wire::version(packet)? {
            IpVersion::V4 => {
                let table = self.v4.as_mut().ok_or(DropReason::NoAddressForFamily)?;
                translate(table, packet, tick, t, &mut self.stats, dir, owner)
            }
            IpVersion::V6 => {
                let table = self.v6.as_mut().ok_or(DropReason::NoAddressForFamily)?;
                translate(table, packet, tick, t, &mut self.stats, dir, owner)
            }
        }
    }

    #[inline]
    fn count(&mut self, result: Result<(), DropReason>, dir: Direction) -> Result<(), DropReason> {
        match result {
            Ok(()) if dir == Direction::Outbound => self.counters.outbound += 1,
            Ok(()) => self.counters.inbound += 1,
            Err(reason) => self.counters.drops[reason as usize] += 1,
        }
        result
    }

    /// Expires idle flows and fragment state up to `now`, a bounded amount of work per call.
    pub fn handle_timeout(&mut self, now: Instant) {
        let tick = self.tick(now);
        if let Some(t) = self.v4.as_mut() {
            t.expire(tick, TIMEOUT_BUDGET, &mut self.stats);
        }
        if let Some(t) = self.v6.as_mut() {
            t.expire(tick, TIMEOUT_BUDGET, &mut self.stats);
        }
    }

    /// When [`Snat::handle_timeout`] next has work; `None` while there is no state at all.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let next = [self.v4.as_ref().and_then(Table::next_tick), self.v6.as_ref().and_then(Table::next_tick)];
        next.into_iter().flatten().min().map(|tick| self.epoch + Duration::from_secs(u64::from(tick)))
    }

    pub fn counters(&self) -> Counters {
        Counters {
            flows_created: self.stats.flows_created,
            flows_expired: self.stats.flows_expired,
            ..self.counters.clone()
        }
    }

    /// Live flows, both families.
    pub fn flows(&self) -> usize {
        let v4 = self.v4.as_ref().map_or(0, |t| t.live_flows());
        let v6 = self.v6.as_ref().map_or(0, |t| t.live_flows());
        (v4 + v6) as usize
    }

    /// Live mappings (external ports in use), both families.
    pub fn mappings(&self) -> usize {
        self.v4.as_ref().map_or(0, |t| t.mapping_count()) + self.v6.as_ref().map_or(0, |t| t.mapping_count())
    }

    /// Datagrams whose later fragments are awaited, both families.
    pub fn pending_fragments(&self) -> usize {
        self.v4.as_ref().map_or(0, |t| t.fragment_count()) + self.v6.as_ref().map_or(0, |t| t.fragment_count())
    }
}

/// Where the identifying 16-bit fields of a transport header are: the port on our side of the router
/// (source outbound, destination inbound) and the remote one. ICMP echo has one identifier for both sides.
#[inline]
fn port_offsets(proto: Proto, dir: Direction) -> (usize, Option<usize>) {
    // TCP and UDP put their ports in the same places.
    const SRC: usize = field::udp::SRC_PORT.start;
    const DST: usize = field::udp::DST_PORT.start;
    match (proto, dir) {
        (Proto::Icmp, _) => (field::icmp::ECHO_IDENT.start, None),
        (_, Direction::Outbound) => (SRC, Some(DST)),
        (_, Direction::Inbound) => (DST, Some(SRC)),
    }
}

/// Where the IPv4 header checksum is (IPv6 has none).
const IPV4_CHECKSUM: usize = field::ipv4::CHECKSUM.start;

#[inline]
fn read16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

#[inline]
fn write16(p: &mut [u8], at: usize, value: u16, delta: &mut Delta) {
    delta.word(read16(p, at), value);
    p[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

/// The offset of the transport checksum, and whether it covers the IP pseudo-header.
#[inline]
fn l4_checksum<A: Family>(proto: Proto) -> (usize, bool) {
    match proto {
        Proto::Tcp => (field::tcp::CHECKSUM.start, true),
        Proto::Udp => (field::udp::CHECKSUM.start, true),
        Proto::Icmp => (field::icmp::CHECKSUM.start, !A::HAS_HEADER_CHECKSUM),
    }
}

/// Adjusts the transport checksum at `at` by the address and port changes it covers.
#[inline]
fn adjust_l4<A: Family>(p: &mut [u8], l4: usize, proto: Proto, addr: Delta, port: Delta) {
    let (offset, pseudo) = l4_checksum::<A>(proto);
    let mut d = port;
    if pseudo {
        d.merge(addr);
    }
    if proto == Proto::Udp {
        adjust_udp_at(p, l4 + offset, d);
    } else {
        adjust_at(p, l4 + offset, d);
    }
}

fn classify<A: Family>(p: &[u8], layout: &Layout) -> Result<Proto, DropReason> {
    let (proto, need) = match layout.protocol {
        PROTO_TCP => (Proto::Tcp, wire::TCP_HEADER_LEN),
        PROTO_UDP => (Proto::Udp, wire::UDP_HEADER_LEN),
        x if x == A::ICMP => (Proto::Icmp, wire::ICMP_HEADER_LEN),
        _ => return Err(DropReason::UnsupportedProtocol),
    };
    // A first fragment too short to hold the whole transport header is refused (RFC 1858).
    if layout.l4_len() < need {
        return Err(DropReason::Malformed);
    }
    if proto == Proto::Tcp && usize::from(p[layout.l4_offset + field::tcp::DATA_OFFSET] >> 4) * 4 < wire::TCP_HEADER_LEN
    {
        return Err(DropReason::Malformed);
    }
    Ok(proto)
}

#[allow(clippy::too_many_arguments)]
fn translate<A: Family>(
    table: &mut Table<A>,
    p: &mut [u8],
    now: u32,
    t: &Timeouts,
    stats: &mut table::Stats,
    dir: Direction,
    owner: u64,
) -> Result<(), DropReason> {
    let layout = A::parse(p)?;
    let p = &mut p[..layout.packet_len];
    let src = A::read(p, A::SRC);
    let dst = A::read(p, A::DST);
    if dir == Direction::Inbound && dst != table.addr {
        return Err(DropReason::NotForSnatAddress);
    }
    // Later fragments are recognised by the header they arrive with, which is the untranslated one.
    let fragment_key = |id| FragmentKey {
        src,
        dst,
        proto: if A::VERSION == IpVersion::V4 { layout.protocol } else { 0 },
        id,
        inbound: dir == Direction::Inbound,
    };
    match layout.fragment {
        Fragment::Later { id } => {
            let to = table.fragment(&fragment_key(id), now).ok_or(DropReason::FragmentWithoutState)?;
            let mut d = Delta::default();
            to.write(p, if dir == Direction::Outbound { A::SRC } else { A::DST }, &mut d);
            if A::HAS_HEADER_CHECKSUM {
                adjust_at(p, IPV4_CHECKSUM, d);
            }
            return Ok(());
        }
        // Refused before any flow state changes, so a dropped first fragment leaves nothing behind.
        Fragment::First { id } => table.fragment_room(&fragment_key(id), owner, now)?,
        _ => {}
    }
    let translated = translate_unfragmented(table, p, &layout, (src, dst), now, t, stats, (dir, owner))?;
    if let Fragment::First { id } = layout.fragment {
        table.remember_fragment(fragment_key(id), translated, owner, now, t);
    }
    Ok(())
}

/// Translates a whole packet or a first fragment; returns the address now in the rewritten header field.
#[allow(clippy::too_many_arguments)]
#[inline]
fn translate_unfragmented<A: Family>(
    table: &mut Table<A>,
    p: &mut [u8],
    layout: &Layout,
    (src, dst): (A, A),
    now: u32,
    t: &Timeouts,
    stats: &mut table::Stats,
    (dir, owner): (Direction, u64),
) -> Result<A, DropReason> {
    let proto = classify::<A>(p, layout)?;
    let l4 = layout.l4_offset;
    if proto == Proto::Icmp {
        match (wire::icmp_kind(A::VERSION, p[l4 + field::icmp::TYPE]), dir) {
            (IcmpKind::EchoRequest, Direction::Outbound) | (IcmpKind::EchoReply, Direction::Inbound) => {}
            (IcmpKind::Error, _) => return translate_icmp_error(table, p, layout, now, dir),
            (_, Direction::Inbound) => return Err(DropReason::Unsolicited),
            (_, Direction::Outbound) => return Err(DropReason::UnsupportedIcmp),
        }
    }

    let (own_port_at, remote_port_at) = port_offsets(proto, dir);
    let own_port = read16(p, l4 + own_port_at);
    let remote_port = remote_port_at.map_or(0, |at| read16(p, l4 + at));
    let tcp_flags = if proto == Proto::Tcp { p[l4 + field::tcp::FLAGS] } else { 0 };

    let (flow, new_addr, new_port) = match dir {
        Direction::Outbound => {
            let key = FlowKey { proto, int_addr: src, int_port: own_port, remote_addr: dst, remote_port };
            let flow = match table.find(&key) {
                Some(f) => f,
                None if tcp_flags & wire::TCP_RST != 0 => return Err(DropReason::OrphanReset),
                None => table.create(key, owner, now, t, stats)?,
            };
            let ext_port = table.flow(flow).ext_port;
            (flow, table.addr, ext_port)
        }
        Direction::Inbound => {
            let mapping = table.mapping_by_port(proto, own_port).ok_or(DropReason::Unsolicited)?;
            let m = *table.mapping(mapping);
            let key = FlowKey { proto, int_addr: m.int_addr, int_port: m.int_port, remote_addr: src, remote_port };
            let flow = table.find(&key).ok_or(DropReason::Unsolicited)?;
            if table.flow(flow).expires <= now {
                return Err(DropReason::Unsolicited);
            }
            (flow, m.int_addr, m.int_port)
        }
    };

    if proto == Proto::Tcp {
        update_tcp(&mut table.flow_mut(flow).tcp, tcp_flags, dir);
    }
    table.refresh(flow, now, t);

    let mut addr_delta = Delta::default();
    new_addr.write(p, if dir == Direction::Outbound { A::SRC } else { A::DST }, &mut addr_delta);
    if A::HAS_HEADER_CHECKSUM {
        adjust_at(p, IPV4_CHECKSUM, addr_delta);
    }
    let mut port_delta = Delta::default();
    write16(p, l4 + own_port_at, new_port, &mut port_delta);
    adjust_l4::<A>(p, l4, proto, addr_delta, port_delta);
    Ok(new_addr)
}

/// Tracks what decides a TCP flow's timeout. A new SYN from our side after a close reopens the flow (the
/// client reused its port); any packet from the remote side counts as a reply.
#[inline]
fn update_tcp(state: &mut u8, flags: u8, dir: Direction) {
    let syn = flags & wire::TCP_SYN != 0;
    match dir {
        Direction::Outbound => {
            if syn && flags & wire::TCP_ACK == 0 && *state & (tcp::FIN_OUT | tcp::FIN_IN | tcp::RST) != 0 {
                *state = 0;
            }
            if syn {
                *state |= tcp::SYN_OUT;
            }
            if flags & wire::TCP_FIN != 0 {
                *state |= tcp::FIN_OUT;
            }
        }
        Direction::Inbound => {
            *state |= tcp::REPLIED;
            if flags & wire::TCP_FIN != 0 {
                *state |= tcp::FIN_IN;
            }
        }
    }
    if flags & wire::TCP_RST != 0 {
        *state |= tcp::RST;
    }
}

/// Translates an ICMP error and the packet it quotes (RFC 5508 §4). Kept out of line: it is rare, and
/// inlining it would crowd the hot path.
///
/// Inbound, a LAN host or router reports on a packet we sent: the quote has the SNAT address and an
/// external port as its *source*; both go back to the internal endpoint, and so does the outer destination.
/// Outbound, a mesh host reports on a packet it received from the LAN: the quote has the internal endpoint
/// as its *destination*, which becomes the SNAT address and external port, and the outer source becomes the
/// SNAT address.
#[inline(never)]
fn translate_icmp_error<A: Family>(
    table: &mut Table<A>,
    p: &mut [u8],
    layout: &Layout,
    now: u32,
    dir: Direction,
) -> Result<A, DropReason> {
    let icmp = layout.l4_offset;
    let inner = icmp + field::icmp::QUOTED;
    let quoted = wire::parse_quoted(&p[inner..])?;
    if wire::version(&p[inner..])? != A::VERSION || matches!(quoted.fragment, Fragment::Later { .. }) {
        return Err(DropReason::IcmpErrorWithoutSession);
    }
    let (proto, ports_needed) = match quoted.protocol {
        PROTO_TCP => (Proto::Tcp, 4),
        PROTO_UDP => (Proto::Udp, 4),
        x if x == A::ICMP => (Proto::Icmp, 8),
        _ => return Err(DropReason::IcmpErrorWithoutSession),
    };
    let ql4 = inner + quoted.l4_offset;
    if ql4 + ports_needed > p.len() {
        return Err(DropReason::Malformed);
    }
    if proto == Proto::Icmp && wire::icmp_kind(A::VERSION, p[ql4 + field::icmp::TYPE]) == IcmpKind::Error {
        return Err(DropReason::IcmpErrorWithoutSession); // never an error about an error
    }
    let quoted_src = A::read(p, inner + A::SRC);
    let quoted_dst = A::read(p, inner + A::DST);
    // The quoted packet travelled in the opposite direction to the error about it.
    let quoted_dir = match dir {
        Direction::Inbound => Direction::Outbound,
        Direction::Outbound => Direction::Inbound,
    };
    let (quoted_own_at, quoted_remote_at) = port_offsets(proto, quoted_dir);
    let quoted_own = read16(p, ql4 + quoted_own_at);
    let quoted_remote = quoted_remote_at.map_or(0, |at| read16(p, ql4 + at));

    let (new_addr, new_port, quoted_addr_at, outer_addr_at) = match dir {
        Direction::Inbound => {
            if quoted_src != table.addr {
                return Err(DropReason::IcmpErrorWithoutSession);
            }
            let mapping = table.mapping_by_port(proto, quoted_own).ok_or(DropReason::IcmpErrorWithoutSession)?;
            let m = *table.mapping(mapping);
            let key = FlowKey {
                proto,
                int_addr: m.int_addr,
                int_port: m.int_port,
                remote_addr: quoted_dst,
                remote_port: quoted_remote,
            };
            let flow = table.find(&key).ok_or(DropReason::IcmpErrorWithoutSession)?;
            if table.flow(flow).expires <= now {
                return Err(DropReason::IcmpErrorWithoutSession);
            }
            (m.int_addr, m.int_port, A::SRC, A::DST)
        }
        Direction::Outbound => {
            // An error goes back to whoever sent the packet it quotes; anything else is a forgery aimed at
            // someone else's flow.
            if A::read(p, A::DST) != quoted_src {
                return Err(DropReason::IcmpErrorWithoutSession);
            }
            let key = FlowKey {
                proto,
                int_addr: quoted_dst,
                int_port: quoted_own,
                remote_addr: quoted_src,
                remote_port: quoted_remote,
            };
            let flow = table.find(&key).ok_or(DropReason::IcmpErrorWithoutSession)?;
            if table.flow(flow).expires <= now {
                return Err(DropReason::IcmpErrorWithoutSession);
            }
            let ext_port = table.flow(flow).ext_port;
            (table.addr, ext_port, A::DST, A::SRC)
        }
    };

    // Every word changed inside the ICMP message, for the ICMP checksum.
    let mut icmp_delta = Delta::default();
    let mut quoted_addr = Delta::default();
    new_addr.write(p, inner + quoted_addr_at, &mut quoted_addr);
    icmp_delta.merge(quoted_addr);
    if A::HAS_HEADER_CHECKSUM {
        let old = read16(p, inner + IPV4_CHECKSUM);
        write16(p, inner + IPV4_CHECKSUM, quoted_addr.apply(old), &mut icmp_delta);
    }
    let mut quoted_port = Delta::default();
    write16(p, ql4 + quoted_own_at, new_port, &mut quoted_port);
    icmp_delta.merge(quoted_port);
    let (checksum_at, pseudo) = l4_checksum::<A>(proto);
    // The quote may stop before the transport checksum (IPv4 routers need only quote 8 bytes).
    if ql4 + checksum_at + 2 <= p.len() {
        let old = read16(p, ql4 + checksum_at);
        let mut d = quoted_port;
        if pseudo {
            d.merge(quoted_addr);
        }
        let new = match (proto, old, d.apply(old)) {
            (Proto::Udp, 0, _) => 0,
            (Proto::Udp, _, 0) => 0xffff,
            (_, _, new) => new,
        };
        write16(p, ql4 + checksum_at, new, &mut icmp_delta);
    }

    let mut outer = Delta::default();
    new_addr.write(p, outer_addr_at, &mut outer);
    if A::HAS_HEADER_CHECKSUM {
        adjust_at(p, IPV4_CHECKSUM, outer);
    } else {
        icmp_delta.merge(outer); // the ICMPv6 checksum covers the pseudo-header
    }
    adjust_at(p, icmp + field::icmp::CHECKSUM.start, icmp_delta);
    Ok(new_addr)
}

#[cfg(test)]
mod tests;
