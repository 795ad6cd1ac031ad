//! The ACL filter: the rules a node enforces on what arrives from the mesh, and a connection tracker that
//! remembers who opened each flow. A packet from the mesh passes if it belongs to a tracked flow, or opens
//! a flow a rule allows; replies to what this node (or the LAN behind it) opened always pass, and nothing
//! else does. Unlike Tailscale's filter (every non-SYN TCP packet accepted, UDP state capped at 512
//! flows, ICMP errors accepted unmatched), every packet is judged by its flow:
//! - TCP by state: only a SYN opens; established flows live 2 h 4 min idle, opening and closing ones 4 min
//!   (RFC 5382);
//! - UDP, ICMP echo and other protocols by a 2-minute idle timeout;
//! - an ICMP error passes only if it quotes a tracked flow;
//! - a later fragment passes (the first one, which carries the ports, was judged).
//!
//! A new rule set re-judges the flows peers opened; those it no longer allows are cut, and each is
//! answered (a TCP RST in the opener's window, an ICMP administratively-prohibited for the rest) so the
//! opener fails at once instead of timing out.
//!
//! Time is a parameter; the table is bounded and counts what it refuses.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use ipnet::IpNet;

use crate::build::{Builder, Transport};
use crate::wire::{self, Fragment, IpVersion, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

const PROTO_SCTP: u8 = 132;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// RFC 5382: an established TCP flow is kept at least 2 h 4 min idle; opening and closing ones 4 min.
pub const TCP_ESTABLISHED_IDLE: Duration = Duration::from_secs(2 * 3600 + 4 * 60);
pub const TCP_TRANSITORY_IDLE: Duration = Duration::from_secs(4 * 60);
/// UDP, ICMP and everything else.
pub const OTHER_IDLE: Duration = Duration::from_secs(120);
/// The most recent denied flows kept for `meshd doctor`.
pub const RECENT_DENIED: usize = 32;

/// The protocols a rule with no protocol list allows.
pub const DEFAULT_PROTOS: [u8; 4] = [PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6];

/// Destinations and ports of a rule; no `net`: any address this node accepts traffic for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DstRange {
    pub net: Option<IpNet>,
    pub first: u16,
    pub last: u16,
}

/// One allowing rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub src: Vec<IpNet>,
    pub dst: Vec<DstRange>,
    /// Empty: [`DEFAULT_PROTOS`].
    pub protos: Vec<u8>,
}

impl Rule {
    fn allows_proto(&self, proto: u8) -> bool {
        if self.protos.is_empty() { DEFAULT_PROTOS.contains(&proto) } else { self.protos.contains(&proto) }
    }
}

/// Whether `rules` let `src` open a flow to `dst`. `port` is the destination port for protocols with
/// ports; ICMP needs any port of the destination open (as in Tailscale); other protocols need a rule that
/// names them and opens every port.
pub fn allows(rules: &[Rule], src: IpAddr, dst: IpAddr, proto: u8, port: Option<u16>) -> bool {
    rules.iter().any(|rule| {
        rule.allows_proto(proto)
            && rule.src.iter().any(|net| net.contains(&src))
            && rule.dst.iter().any(|d| {
                d.net.is_none_or(|net| net.contains(&dst))
                    && match (proto, port) {
                        (_, Some(p)) => (d.first..=d.last).contains(&p),
                        (PROTO_ICMP | PROTO_ICMPV6, None) => true,
                        (_, None) => d.first == 0 && d.last == u16::MAX,
                    }
            })
    })
}

/// Why the filter refused a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// It would open a flow no rule allows.
    Denied,
    /// It belongs to no tracked flow and cannot open one: TCP other than a SYN, an echo reply or an ICMP
    /// error for nothing this side sent.
    NoFlow,
    /// The flow table is full; the flow was not opened.
    TableFull,
    /// Not a packet the filter can read.
    Unreadable,
}

/// Who opened a flow, from this node's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opener {
    /// This node, or the LAN behind it (replies come from the mesh).
    Local,
    /// The peer at the remote address.
    Remote,
}

/// A flow as seen from this node: the remote (mesh) end and the local end (this node or its LAN). Addresses
/// are kept as plain integers (IPv4 in the low 32 bits): the lookup is most of an established packet's cost,
/// and two `IpAddr` enums made the key half as large again and slower to hash and compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    // Halves, not u128: a u128 would align the table's entries to 16 bytes and pad each by 8.
    remote: (u64, u64),
    local: (u64, u64),
    pub remote_port: u16,
    pub local_port: u16,
    pub proto: u8,
    v6: bool,
}

fn bits(a: IpAddr) -> (u64, u64) {
    halves(match a {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    })
}

#[inline(always)]
fn halves(bits: u128) -> (u64, u64) {
    ((bits >> 64) as u64, bits as u64)
}

impl FlowKey {
    /// `remote` and `local` must be of one family.
    pub fn new(proto: u8, remote: IpAddr, remote_port: u16, local: IpAddr, local_port: u16) -> Self {
        FlowKey { remote: bits(remote), local: bits(local), remote_port, local_port, proto, v6: remote.is_ipv6() }
    }

    fn address(&self, (high, low): (u64, u64)) -> IpAddr {
        let bits = u128::from(high) << 64 | u128::from(low);
        if self.v6 { IpAddr::from(bits.to_be_bytes()) } else { IpAddr::from((bits as u32).to_be_bytes()) }
    }

    pub fn remote(&self) -> IpAddr {
        self.address(self.remote)
    }

    pub fn local(&self) -> IpAddr {
        self.address(self.local)
    }

    /// The same flow from the other end.
    fn reversed(self) -> Self {
        FlowKey {
            remote: self.local,
            local: self.remote,
            remote_port: self.local_port,
            local_port: self.remote_port,
            ..self
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TcpState {
    Opening,
    Established,
    Closing,
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    opener: Opener,
    tcp: TcpState,
    /// Seconds since the filter's epoch when the flow is forgotten.
    expires: u32,
    /// The remote end's latest acknowledgement: where this side's next TCP segment must start, so a reset
    /// sent in this side's name lands in the remote's window.
    remote_ack: u32,
    /// This side's latest acknowledgement, for a reset in the remote's name delivered to this host.
    local_ack: u32,
}

/// A flow that was cut, with what tells each end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub key: FlowKey,
    pub opener: Opener,
    /// For the remote end, through the tunnel: a TCP RST in its window or an ICMP administratively
    /// prohibited; none for ICMP flows.
    pub notice: Option<Vec<u8>>,
    /// For the local end (when it is this host): a TCP RST in the remote's name, so the local socket fails
    /// at once too.
    pub local_reset: Option<Vec<u8>>,
}

impl Revoked {
    fn of(key: &FlowKey, flow: &Flow, remote_reachable: bool) -> Self {
        Revoked {
            key: *key,
            opener: flow.opener,
            notice: if remote_reachable { notice(key, flow) } else { None },
            local_reset: local_reset(key, flow),
        }
    }
}

/// A refused flow, for `meshd doctor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    pub at: Instant,
    pub key: FlowKey,
    pub reason: Drop,
}

/// What a packet says about its flow.
#[derive(Debug, Clone, Copy)]
enum Seen {
    /// A packet of a flow: its key as if the sender were the remote end, TCP flags and acknowledgement.
    Flow { key: FlowKey, flags: u8, ack: u32, opens: bool },
    /// An ICMP error quoting a packet this side sent: the key of that packet's flow, this side local.
    Error { quoted: FlowKey },
    /// A later fragment: the first one was judged.
    LaterFragment,
}

/// Source and destination of an IP header, as integers.
#[inline(always)]
fn addresses(packet: &[u8], v6: bool) -> Option<((u64, u64), (u64, u64))> {
    if v6 {
        let src = u128::from_be_bytes(packet.get(8..24)?.try_into().ok()?);
        let dst = u128::from_be_bytes(packet.get(24..40)?.try_into().ok()?);
        Some((halves(src), halves(dst)))
    } else {
        let src = u32::from_be_bytes(packet.get(12..16)?.try_into().ok()?);
        let dst = u32::from_be_bytes(packet.get(16..20)?.try_into().ok()?);
        Some(((0, u64::from(src)), (0, u64::from(dst))))
    }
}

#[inline(always)]
fn read(packet: &[u8]) -> Option<Seen> {
    let layout = wire::parse(packet).ok()?;
    if matches!(layout.fragment, Fragment::Later { .. }) {
        return Some(Seen::LaterFragment);
    }
    let v6 = layout.version == IpVersion::V6;
    let (src, dst) = addresses(packet, v6)?;
    let l4 = packet.get(layout.l4_offset..layout.packet_len)?;
    let be16 = |at: usize| l4.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let proto = layout.protocol;
    let key = |remote_port, local_port| FlowKey { remote: src, local: dst, remote_port, local_port, proto, v6 };
    match proto {
        PROTO_TCP => {
            let flags = *l4.get(13)?;
            let ack = u32::from_be_bytes(l4.get(8..12)?.try_into().ok()?);
            let opens = flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN;
            Some(Seen::Flow { key: key(be16(0)?, be16(2)?), flags, ack, opens })
        }
        PROTO_UDP | PROTO_SCTP => Some(Seen::Flow { key: key(be16(0)?, be16(2)?), flags: 0, ack: 0, opens: true }),
        PROTO_ICMP | PROTO_ICMPV6 => {
            let msg_type = *l4.first()?;
            let (request, reply) = if v6 { (128, 129) } else { (8, 0) };
            let is_error = if v6 { (1..=4).contains(&msg_type) } else { matches!(msg_type, 3 | 4 | 5 | 11 | 12) };
            if msg_type == request || msg_type == reply {
                let ident = be16(4)?;
                Some(Seen::Flow { key: key(ident, ident), flags: 0, ack: 0, opens: msg_type == request })
            } else if is_error {
                let quoted = l4.get(wire::ICMP_HEADER_LEN..)?;
                let q = wire::parse_quoted(quoted).ok()?;
                let qv6 = q.version == IpVersion::V6;
                let (qs, qd) = addresses(quoted, qv6)?;
                let ql4 = quoted.get(q.l4_offset..)?;
                let qbe16 = |at: usize| ql4.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
                let (sp, dp) = match q.protocol {
                    PROTO_TCP | PROTO_UDP | PROTO_SCTP => (qbe16(0)?, qbe16(2)?),
                    PROTO_ICMP | PROTO_ICMPV6 => {
                        let ident = qbe16(4)?;
                        (ident, ident)
                    }
                    _ => (0, 0),
                };
                // This side sent the quoted packet: its destination is the remote end.
                let quoted =
                    FlowKey { remote: qd, local: qs, remote_port: dp, local_port: sp, proto: q.protocol, v6: qv6 };
                Some(Seen::Error { quoted })
            } else {
                // Neighbour discovery, router advertisements and the like are not flows; they open nothing.
                Some(Seen::Flow { key: key(0, 0), flags: 0, ack: 0, opens: false })
            }
        }
        _ => Some(Seen::Flow { key: key(0, 0), flags: 0, ack: 0, opens: true }),
    }
}

/// The filter of one node: its rules (none: everything allowed) and its flows.
#[derive(Debug)]
pub struct Filter {
    rules: Option<Vec<Rule>>,
    flows: HashMap<FlowKey, Flow, foldhash::fast::FixedState>,
    /// What flow expiry times count from: the first packet's time.
    epoch: Option<Instant>,
    max_flows: usize,
    next_sweep: u32,
    denied: VecDeque<Denied>,
    /// Flows not opened because the table was full.
    pub refused_full: u64,
}

impl Filter {
    /// A filter that allows everything until rules are set, tracking at most `max_flows` flows.
    pub fn new(max_flows: usize) -> Self {
        Self {
            rules: None,
            flows: HashMap::with_hasher(foldhash::fast::FixedState::with_seed(0x6d65_7368)),
            epoch: None,
            max_flows,
            next_sweep: 0,
            denied: VecDeque::new(),
            refused_full: 0,
        }
    }

    fn secs(&mut self, now: Instant) -> u32 {
        let epoch = *self.epoch.get_or_insert(now);
        now.saturating_duration_since(epoch).as_secs().min(u64::from(u32::MAX)) as u32
    }

    pub fn rules(&self) -> Option<&[Rule]> {
        self.rules.as_deref()
    }

    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// The most recent refused flows, oldest first.
    pub fn recent_denied(&self) -> impl Iterator<Item = &Denied> {
        self.denied.iter()
    }

    /// Replaces the rules. Flows peers opened that the new rules do not allow are forgotten and returned,
    /// each with the notice for its opener.
    pub fn set_rules(&mut self, rules: Option<Vec<Rule>>) -> Vec<Revoked> {
        self.rules = rules;
        let Some(rules) = &self.rules else { return Vec::new() };
        let mut revoked = Vec::new();
        self.flows.retain(|key, flow| {
            if flow.opener == Opener::Local {
                return true;
            }
            let port = match key.proto {
                PROTO_TCP | PROTO_UDP | PROTO_SCTP => Some(key.local_port),
                _ => None,
            };
            if allows(rules, key.remote(), key.local(), key.proto, port) {
                return true;
            }
            revoked.push(Revoked::of(key, flow, true));
            false
        });
        revoked
    }

    /// Forgets the flows whose remote end no peer routes any more (the peer left the netmap): each is
    /// returned with a reset for the local end, since nothing can reach the remote one.
    pub fn forget_unrouted(&mut self, routed: impl Fn(IpAddr) -> bool) -> Vec<Revoked> {
        let mut cut = Vec::new();
        self.flows.retain(|key, flow| {
            if routed(key.remote()) {
                return true;
            }
            cut.push(Revoked::of(key, flow, false));
            false
        });
        cut
    }

    /// Judges a packet that arrived from the mesh (decrypted, its source checked against the sender).
    pub fn inbound(&mut self, packet: &[u8], now: Instant) -> Result<(), Drop> {
        let seen = read(packet);
        let secs = self.secs(now);
        // The common case first, kept small: a packet of a tracked flow.
        if let Some(Seen::Flow { key, flags, ack, .. }) = seen
            && let Some(flow) = self.flows.get_mut(&key)
            && flow.expires > secs
        {
            if flags & TCP_ACK != 0 {
                flow.remote_ack = ack;
            }
            advance(flow, key.proto, flags, secs);
            return Ok(());
        }
        self.inbound_untracked(seen, secs, now)
    }

    /// A packet from the mesh of no tracked flow: it opens one, is a reply or error let through, or is
    /// refused.
    #[inline(never)]
    fn inbound_untracked(&mut self, seen: Option<Seen>, secs: u32, now: Instant) -> Result<(), Drop> {
        let open = self.rules.is_none();
        let seen = match seen {
            Some(s) => s,
            None if open => return Ok(()),
            None => return Err(Drop::Unreadable),
        };
        match seen {
            Seen::LaterFragment => Ok(()),
            Seen::Error { quoted } => match self.flows.get(&quoted) {
                Some(flow) if flow.expires > secs => Ok(()),
                _ if open => Ok(()),
                _ => Err(self.deny(quoted, Drop::NoFlow, now)),
            },
            Seen::Flow { key, flags, ack, opens } => {
                let proto = key.proto;
                let is_reply = proto != PROTO_TCP && !opens;
                if !open && (is_reply || (proto == PROTO_TCP && !opens)) {
                    return Err(self.deny(key, Drop::NoFlow, now));
                }
                if let Some(rules) = &self.rules {
                    let port = matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP).then_some(key.local_port);
                    if !allows(rules, key.remote(), key.local(), proto, port) {
                        return Err(self.deny(key, Drop::Denied, now));
                    }
                }
                if is_reply {
                    return Ok(());
                }
                let tcp = if proto == PROTO_TCP && !opens { TcpState::Established } else { TcpState::Opening };
                let remote_ack = if flags & TCP_ACK != 0 { ack } else { 0 };
                let mut flow = Flow { opener: Opener::Remote, tcp, expires: 0, remote_ack, local_ack: 0 };
                advance(&mut flow, proto, flags, secs);
                if !self.insert(key, flow, secs) && !open {
                    return Err(self.deny(key, Drop::TableFull, now));
                }
                Ok(())
            }
        }
    }

    /// Records a packet this node sends into the mesh (after SNAT replies are translated back): it opens a
    /// flow, or keeps one alive.
    pub fn outbound(&mut self, packet: &[u8], now: Instant) {
        let Some(Seen::Flow { key, flags, ack, opens }) = read(packet) else { return };
        let secs = self.secs(now);
        // Sent by this side: the destination is the remote end.
        let key = key.reversed();
        let proto = key.proto;
        if let Some(flow) = self.flows.get_mut(&key)
            && flow.expires > secs
        {
            if flags & TCP_ACK != 0 {
                flow.local_ack = ack;
            }
            advance(flow, proto, flags, secs);
            return;
        }
        if !opens && proto != PROTO_TCP {
            return;
        }
        let tcp = if proto == PROTO_TCP && !opens { TcpState::Established } else { TcpState::Opening };
        let local_ack = if flags & TCP_ACK != 0 { ack } else { 0 };
        let mut flow = Flow { opener: Opener::Local, tcp, expires: 0, remote_ack: 0, local_ack };
        advance(&mut flow, proto, flags, secs);
        self.insert(key, flow, secs);
    }

    fn insert(&mut self, key: FlowKey, flow: Flow, secs: u32) -> bool {
        if self.flows.len() >= self.max_flows {
            self.sweep(secs);
            if self.flows.len() >= self.max_flows {
                self.refused_full += 1;
                return false;
            }
        }
        self.flows.insert(key, flow);
        true
    }

    fn sweep(&mut self, secs: u32) {
        self.flows.retain(|_, f| f.expires > secs);
        self.next_sweep = secs.saturating_add(SWEEP_EVERY);
    }

    fn deny(&mut self, key: FlowKey, reason: Drop, now: Instant) -> Drop {
        if self.denied.len() == RECENT_DENIED {
            self.denied.pop_front();
        }
        self.denied.push_back(Denied { at: now, key, reason });
        reason
    }

    /// When expired flows are next swept.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let epoch = self.epoch.filter(|_| !self.flows.is_empty())?;
        Some(epoch + Duration::from_secs(u64::from(self.next_sweep)))
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let secs = self.secs(now);
        if secs >= self.next_sweep {
            self.sweep(secs);
        }
    }
}

/// Expired flows are swept this often (seconds); a lookup never trusts an expired one meanwhile.
const SWEEP_EVERY: u32 = 10;

/// Moves a flow's TCP state along with the flags of a packet in either direction, and sets its expiry.
fn advance(flow: &mut Flow, proto: u8, flags: u8, secs: u32) {
    let idle = if proto == PROTO_TCP {
        if flags & (TCP_FIN | TCP_RST) != 0 {
            flow.tcp = TcpState::Closing;
        } else if flow.tcp == TcpState::Opening && flags & TCP_ACK != 0 {
            flow.tcp = TcpState::Established;
        }
        if flow.tcp == TcpState::Established { TCP_ESTABLISHED_IDLE } else { TCP_TRANSITORY_IDLE }
    } else {
        OTHER_IDLE
    };
    flow.expires = secs.saturating_add(idle.as_secs() as u32);
}

/// A RST from the remote end to the local one, in the local end's window; TCP only, and only once this side
/// acknowledged something (before that the local end has no window to hit).
fn local_reset(key: &FlowKey, flow: &Flow) -> Option<Vec<u8>> {
    if key.proto != PROTO_TCP || flow.local_ack == 0 {
        return None;
    }
    let builder = match (key.remote(), key.local()) {
        (IpAddr::V4(r), IpAddr::V4(l)) => Builder::v4(r.octets(), l.octets()),
        (IpAddr::V6(r), IpAddr::V6(l)) => Builder::v6(r.octets(), l.octets()),
        _ => return None,
    };
    let rst = Transport::Tcp {
        src_port: key.remote_port,
        dst_port: key.local_port,
        seq: flow.local_ack,
        ack: 0,
        flags: TCP_RST,
    };
    Some(builder.transport(rst, &[]))
}

/// What to tell the remote opener of a revoked flow: a RST in its window for TCP, an ICMP
/// administratively-prohibited (quoting its packet's headers) for UDP and the rest; nothing for ICMP.
fn notice(key: &FlowKey, flow: &Flow) -> Option<Vec<u8>> {
    let builder = match (key.local(), key.remote()) {
        (IpAddr::V4(l), IpAddr::V4(r)) => Builder::v4(l.octets(), r.octets()),
        (IpAddr::V6(l), IpAddr::V6(r)) => Builder::v6(l.octets(), r.octets()),
        _ => return None,
    };
    match key.proto {
        PROTO_TCP => Some(builder.transport(
            Transport::Tcp {
                src_port: key.local_port,
                dst_port: key.remote_port,
                seq: flow.remote_ack,
                ack: 0,
                flags: TCP_RST,
            },
            &[],
        )),
        PROTO_ICMP | PROTO_ICMPV6 => None,
        proto => {
            // The quoted packet: the opener's own, remote → local, headers only.
            let quoted_builder = match (key.remote(), key.local()) {
                (IpAddr::V4(r), IpAddr::V4(l)) => Builder::v4(r.octets(), l.octets()),
                (IpAddr::V6(r), IpAddr::V6(l)) => Builder::v6(r.octets(), l.octets()),
                _ => return None,
            };
            let quoted = if proto == PROTO_UDP {
                quoted_builder.udp(key.remote_port, key.local_port, &[])
            } else {
                quoted_builder.ip(proto, &[0; 8])
            };
            let (msg_type, code) = if key.v6 { (1, 1) } else { (3, 13) };
            Some(builder.icmp_error(msg_type, code, 0, &quoted))
        }
    }
}

#[cfg(test)]
mod tests;
