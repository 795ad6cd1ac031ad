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
    /// A RST was seen, or a FIN from each end.
    Closing,
}

// `Flow::marks` bits.
const FIN_LOCAL: u8 = 1;
const FIN_REMOTE: u8 = 2;
const LOCAL_NEXT_KNOWN: u8 = 4;
const REMOTE_NEXT_KNOWN: u8 = 8;
/// Cut by a policy change: kept for a while so neither end's retransmissions revive it.
const REVOKED: u8 = 16;

/// 16 bytes: with the 40-byte key a table entry stays under 128 bytes even when the table is at its emptiest
/// after doubling.
#[derive(Debug, Clone, Copy)]
struct Flow {
    opener: Opener,
    tcp: TcpState,
    marks: u8,
    /// Seconds since the filter's epoch when the flow is forgotten.
    expires: u32,
    /// TCP: the sequence number the remote end expects next from this side (the end of what this side sent,
    /// or failing that the remote's latest acknowledgement), so a reset in this side's name is exactly in
    /// the remote's window (RFC 5961 answers any other with a challenge ACK).
    local_next: u32,
    /// TCP: the sequence number this side expects next from the remote end, for a reset in its name.
    remote_next: u32,
}

impl Flow {
    fn new(opener: Opener, tcp: TcpState) -> Self {
        Flow { opener, tcp, marks: 0, expires: 0, local_next: 0, remote_next: 0 }
    }

    fn revoked(&self) -> bool {
        self.marks & REVOKED != 0
    }
}

/// What a TCP segment says about the sequence space: who sent it, its flags, its sequence number, its
/// acknowledgement, and how much sequence space it uses.
#[derive(Debug, Clone, Copy)]
struct Segment {
    from_local: bool,
    flags: u8,
    seq: u32,
    ack: u32,
    len: u32,
}

/// `a` is after `b` in sequence space.
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
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
    /// A packet of a flow: its key as if the sender were the remote end, TCP flags, sequence numbers and the
    /// sequence space it uses.
    Flow { key: FlowKey, flags: u8, seq: u32, ack: u32, len: u32, opens: bool },
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
            let seq = u32::from_be_bytes(l4.get(4..8)?.try_into().ok()?);
            let ack = u32::from_be_bytes(l4.get(8..12)?.try_into().ok()?);
            let header = usize::from(*l4.get(12)? >> 4) * 4;
            let data = l4.len().saturating_sub(header) as u32;
            let len = data + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
            let opens = flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN;
            Some(Seen::Flow { key: key(be16(0)?, be16(2)?), flags, seq, ack, len, opens })
        }
        PROTO_UDP | PROTO_SCTP => {
            Some(Seen::Flow { key: key(be16(0)?, be16(2)?), flags: 0, seq: 0, ack: 0, len: 0, opens: true })
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let msg_type = *l4.first()?;
            let (request, reply) = if v6 { (128, 129) } else { (8, 0) };
            // The errors the node's own cross-peer check covers; a redirect or source quench is none of a peer's
            // business and opens nothing.
            let is_error = if v6 { (1..=4).contains(&msg_type) } else { matches!(msg_type, 3 | 11 | 12) };
            if msg_type == request || msg_type == reply {
                let ident = be16(4)?;
                Some(Seen::Flow {
                    key: key(ident, ident),
                    flags: 0,
                    seq: 0,
                    ack: 0,
                    len: 0,
                    opens: msg_type == request,
                })
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
                Some(Seen::Flow { key: key(0, 0), flags: 0, seq: 0, ack: 0, len: 0, opens: false })
            }
        }
        _ => Some(Seen::Flow { key: key(0, 0), flags: 0, seq: 0, ack: 0, len: 0, opens: true }),
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
    /// The latest time seen, in seconds since the epoch (for expiries set outside a packet's call).
    last_secs: u32,
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
            last_secs: 0,
            denied: VecDeque::new(),
            refused_full: 0,
        }
    }

    fn secs(&mut self, now: Instant) -> u32 {
        let epoch = *self.epoch.get_or_insert(now);
        let secs = now.saturating_duration_since(epoch).as_secs().min(u64::from(u32::MAX)) as u32;
        self.last_secs = self.last_secs.max(secs);
        secs
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

    /// Replaces the rules. Flows peers opened that the new rules do not allow are cut and returned, each
    /// with the notices for its ends; each stays marked for a while (4 minutes) so that neither end's
    /// retransmissions open it again from this side.
    pub fn set_rules(&mut self, rules: Option<Vec<Rule>>) -> Vec<Revoked> {
        self.rules = rules;
        let Some(rules) = &self.rules else { return Vec::new() };
        let until = self.last_secs.saturating_add(TCP_TRANSITORY_IDLE.as_secs() as u32);
        let mut revoked = Vec::new();
        for (key, flow) in self.flows.iter_mut() {
            if flow.opener == Opener::Local || flow.revoked() {
                continue;
            }
            let port = match key.proto {
                PROTO_TCP | PROTO_UDP | PROTO_SCTP => Some(key.local_port),
                _ => None,
            };
            if allows(rules, key.remote(), key.local(), key.proto, port) {
                continue;
            }
            revoked.push(Revoked::of(key, flow, true));
            flow.marks |= REVOKED;
            flow.expires = until;
        }
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
            if !flow.revoked() {
                cut.push(Revoked::of(key, flow, false));
            }
            false
        });
        cut
    }

    /// Judges a packet that arrived from the mesh (decrypted, its source checked against the sender).
    pub fn inbound(&mut self, packet: &[u8], now: Instant) -> Result<(), Drop> {
        let seen = read(packet);
        let secs = self.secs(now);
        // The common case first, kept small: a packet of a tracked flow.
        if let Some(Seen::Flow { key, flags, seq, ack, len, .. }) = seen
            && let Some(flow) = self.flows.get_mut(&key)
            && flow.expires > secs
            && !flow.revoked()
        {
            advance(flow, key.proto, Segment { from_local: false, flags, seq, ack, len }, secs);
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
                Some(flow) if flow.expires > secs && !flow.revoked() => Ok(()),
                _ if open => Ok(()),
                _ => Err(self.deny(quoted, Drop::NoFlow, now)),
            },
            Seen::Flow { key, flags, seq, ack, len, opens } => {
                let proto = key.proto;
                if self.flows.get(&key).is_some_and(|f| f.revoked() && f.expires > secs) {
                    return Err(self.deny(key, Drop::Denied, now));
                }
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
                let mut flow = Flow::new(Opener::Remote, tcp);
                advance(&mut flow, proto, Segment { from_local: false, flags, seq, ack, len }, secs);
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
        let Some(Seen::Flow { key, flags, seq, ack, len, opens }) = read(packet) else { return };
        let secs = self.secs(now);
        // Sent by this side: the destination is the remote end.
        let key = key.reversed();
        let proto = key.proto;
        let segment = Segment { from_local: true, flags, seq, ack, len };
        if let Some(flow) = self.flows.get_mut(&key)
            && flow.expires > secs
        {
            // A cut flow stays cut: the local end's retransmissions do not reopen it.
            if !flow.revoked() {
                advance(flow, proto, segment, secs);
            }
            return;
        }
        if !opens && proto != PROTO_TCP {
            return;
        }
        let tcp = if proto == PROTO_TCP && !opens { TcpState::Established } else { TcpState::Opening };
        let mut flow = Flow::new(Opener::Local, tcp);
        advance(&mut flow, proto, segment, secs);
        self.insert(key, flow, secs);
    }

    fn insert(&mut self, key: FlowKey, flow: Flow, secs: u32) -> bool {
        if self.flows.len() >= self.max_flows {
            // At most one full sweep per interval: a table kept full must not cost a scan per packet.
            if secs >= self.next_sweep {
                self.sweep(secs);
            }
            if self.flows.len() >= self.max_flows && !self.make_room(flow.opener) {
                self.refused_full += 1;
                return false;
            }
        }
        self.flows.insert(key, flow);
        true
    }

    /// In a full table, a flow this side opens takes the place of one a peer opened (or one cut or closing),
    /// looking at a bounded number of entries: peers filling the table must not stop this node's own
    /// traffic. A peer's new flow gets no such room.
    fn make_room(&mut self, opener: Opener) -> bool {
        if opener != Opener::Local {
            return false;
        }
        let victim = self
            .flows
            .iter()
            .take(64)
            .find(|(_, f)| f.opener == Opener::Remote || f.revoked() || f.tcp == TcpState::Closing)
            .map(|(k, _)| *k);
        victim.is_some_and(|k| self.flows.remove(&k).is_some())
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

/// Moves a flow along with a packet in either direction: TCP state and sequence numbers, and its expiry.
fn advance(flow: &mut Flow, proto: u8, segment: Segment, secs: u32) {
    let idle = if proto == PROTO_TCP {
        let Segment { from_local, flags, seq, ack, len } = segment;
        if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 && flow.tcp == TcpState::Closing {
            // The same ports opened again after a close.
            flow.tcp = TcpState::Opening;
            flow.marks &= !(FIN_LOCAL | FIN_REMOTE | LOCAL_NEXT_KNOWN | REMOTE_NEXT_KNOWN);
        }
        let (sent, sent_known, acked, acked_known, fin) = if from_local {
            (&mut flow.local_next, LOCAL_NEXT_KNOWN, &mut flow.remote_next, REMOTE_NEXT_KNOWN, FIN_LOCAL)
        } else {
            (&mut flow.remote_next, REMOTE_NEXT_KNOWN, &mut flow.local_next, LOCAL_NEXT_KNOWN, FIN_REMOTE)
        };
        // The end of what the sender sent is what the other end expects next; the sender's acknowledgement
        // stands in for the other direction until that direction is seen.
        let end = seq.wrapping_add(len);
        if flow.marks & sent_known == 0 || after(end, *sent) {
            *sent = end;
            flow.marks |= sent_known;
        }
        if flags & TCP_ACK != 0 && (flow.marks & acked_known == 0 || after(ack, *acked)) {
            *acked = ack;
            flow.marks |= acked_known;
        }
        if flags & TCP_FIN != 0 {
            flow.marks |= fin;
        }
        if flags & TCP_RST != 0 || flow.marks & (FIN_LOCAL | FIN_REMOTE) == FIN_LOCAL | FIN_REMOTE {
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

/// A RST from the remote end to the local one, exactly where the local end expects the remote's next byte;
/// TCP only, and only once the remote end has been seen sending.
fn local_reset(key: &FlowKey, flow: &Flow) -> Option<Vec<u8>> {
    if key.proto != PROTO_TCP || flow.marks & REMOTE_NEXT_KNOWN == 0 {
        return None;
    }
    let builder = match (key.remote(), key.local()) {
        (IpAddr::V4(r), IpAddr::V4(l)) => Builder::v4(r.octets(), l.octets()),
        (IpAddr::V6(r), IpAddr::V6(l)) => Builder::v6(r.octets(), l.octets()),
        _ => return None,
    };
    let rst =
        reset(key.remote_port, key.local_port, flow.remote_next, flow.local_next, flow.marks & LOCAL_NEXT_KNOWN != 0);
    Some(builder.transport(rst, &[]))
}

/// A RST at exactly `seq` (the receiver's next expected number), acknowledging `ack` when it is known: a
/// receiver still waiting for its SYN to be answered takes a reset only if it acknowledges that SYN.
fn reset(src_port: u16, dst_port: u16, seq: u32, ack: u32, ack_known: bool) -> Transport {
    let flags = if ack_known { TCP_RST | TCP_ACK } else { TCP_RST };
    Transport::Tcp { src_port, dst_port, seq, ack: if ack_known { ack } else { 0 }, flags }
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
            reset(
                key.local_port,
                key.remote_port,
                flow.local_next,
                flow.remote_next,
                flow.marks & REMOTE_NEXT_KNOWN != 0,
            ),
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
