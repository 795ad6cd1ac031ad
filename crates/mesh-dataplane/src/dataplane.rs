//! One sans-IO object per node that decides everything about a packet: the WireGuard peers ([`Node`]), the
//! subnet router with its SNAT engine and MSS clamping ([`Router`]), `meshd ping`, and the drop counters.
//! The shell reads packets and datagrams, hands them over with the time, and drains what comes out; it
//! decides nothing about a packet itself.
//!
//! The order a packet meets the parts is fixed here:
//! - from the TUN device: router (replies to the SNAT address translated back, SYNs clamped), then the node
//!   (encrypted toward the peer whose allowed IPs hold the destination);
//! - from the network: node (decrypted, the source checked against the sending peer), then ping replies
//!   taken out, then the router (delivered if for this host, forwarded and maybe SNAT'd if for a served
//!   route, refused otherwise).
//!
//! The ACL filter goes between the node and the router on the way in; the MagicDNS resolver and the
//! userspace netstack take packets for their addresses at the same point, before the router.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use mesh_packet::build::Builder;
use mesh_packet::filter::{self, Filter};
use mesh_packet::snat::{self, Snat, SnatConfig};
use mesh_packet::wire::{self, Fragment, IcmpHeader, IpVersion};

use crate::dns::tcp::TcpServer;
use crate::dns::{self, Resolver, ResolverConfig};
use crate::router::{Router, Served};
use crate::xorshift;
use crate::{DropReason, Handshake, Key, Node, PeerSpec, PeerStatus, Received};

/// How long a `meshd ping` waits for its reply before it is forgotten.
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// A reason's drops are reported as an [`Event::Dropped`] at most this often, so a flood of garbage costs
/// a counter increment, not a log line.
pub const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// The most a batch of datagrams may carry: what one UDP segmentation-offload send takes (65 535 less the
/// IPv6 and UDP headers), so a batch can always leave in one.
const MAX_BATCH_BYTES: usize = 65_535 - 40 - 8;

/// Flows the ACL filter tracks at most (about 70 bytes each).
pub const MAX_TRACKED_FLOWS: usize = 1 << 20;

/// Queries waiting for an upstream's answer at most; past it new ones are dropped (the client asks again).
const MAX_PENDING_QUERIES: usize = 1024;
/// A query whose answer never came back is forgotten after this long (the shell gives up well before).
const PENDING_QUERY_LIFETIME: Duration = Duration::from_secs(30);

/// Events held for a shell that does not collect them; the oldest go first.
const EVENT_BACKLOG: usize = 1024;

/// What the node translates forwarded traffic to, and how much of it there is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnatSettings {
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// External ports (and ICMP identifiers) to hand out.
    pub ports: RangeInclusive<u16>,
    /// Flows per address family before new ones are refused.
    pub max_flows: u32,
    /// One source (peer) may hold at most 1/`source_share` of the flows, ports and fragment slots.
    pub source_share: u32,
}

impl Default for SnatSettings {
    fn default() -> Self {
        Self { ipv4: None, ipv6: None, ports: 1024..=65535, max_flows: 1 << 20, source_share: 8 }
    }
}

impl SnatSettings {
    /// The settings for `--snat-address` as given: at most one address per family.
    pub fn with_addresses(addresses: &[IpAddr]) -> Result<Self, ConfigError> {
        let mut settings = Self::default();
        for address in addresses {
            let taken = match address {
                IpAddr::V4(a) => settings.ipv4.replace(*a).is_some(),
                IpAddr::V6(a) => settings.ipv6.replace(*a).is_some(),
            };
            if taken {
                return Err(ConfigError::TwoSnatAddresses);
            }
        }
        Ok(settings)
    }

    pub fn addresses(&self) -> Vec<IpAddr> {
        self.ipv4.map(IpAddr::V4).into_iter().chain(self.ipv6.map(IpAddr::V6)).collect()
    }

    fn has_family(&self, prefix: &IpNet) -> bool {
        if prefix.addr().is_ipv4() { self.ipv4.is_some() } else { self.ipv6.is_some() }
    }
}

/// Everything the node should be, as a whole: [`Dataplane::configure`] applies the difference.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataplaneConfig {
    /// The node's own mesh addresses (its pings come from them).
    pub mesh_addresses: Vec<IpAddr>,
    /// Every other address of the host: a packet to any of them is delivered here, never forwarded.
    pub local_addresses: Vec<IpAddr>,
    pub peers: Vec<PeerSpec>,
    /// The routes this node forwards into, each with or without SNAT.
    pub served: Vec<Served>,
    pub snat: SnatSettings,
    /// The ACL rules for what arrives from the mesh; `None`: everything is allowed.
    pub filter: Option<Vec<mesh_proto::FilterRule>>,
    /// The MagicDNS resolver; `None`: queries to its addresses are routed like any other packet.
    pub dns: Option<ResolverConfig>,
}

/// Why a configuration was refused. Nothing of it was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    TwoSnatAddresses,
    /// A served route SNATs, but no SNAT address of its family is set.
    SnatWithoutAddress(IpNet),
    Snat(snat::ConfigError),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::TwoSnatAddresses => f.write_str("give at most one --snat-address per address family"),
            ConfigError::SnatWithoutAddress(prefix) => write!(
                f,
                "SNAT is on for {prefix} but no --snat-address of that family is set: give a free LAN address with \
                 --snat-address, or keep sources with --snat-subnet-routes=false"
            ),
            ConfigError::Snat(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Checks served routes against the SNAT settings: every route that SNATs has an address of its family.
pub fn check_snat(served: &[Served], snat: &SnatSettings) -> Result<(), ConfigError> {
    match served.iter().find(|s| s.snat && !snat.has_family(&s.prefix)) {
        Some(s) => Err(ConfigError::SnatWithoutAddress(s.prefix)),
        None => Ok(()),
    }
}

/// What a [`Dataplane::configure`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub peers_added: usize,
    pub peers_removed: usize,
    pub peers_changed: usize,
    /// The SNAT settings changed: a new engine replaced the old one and its translations.
    pub snat_replaced: bool,
}

/// Something the shell should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new session with a peer.
    Handshake(Handshake),
    /// The reply to [`Dataplane::send_ping`] number `seq`, `rtt` after it was sent.
    Pong { to: IpAddr, seq: u16, rtt: Duration },
    /// `count` packets were dropped for `reason` since the last report of it (at most one report per reason
    /// every [`DROP_REPORT_INTERVAL`]); `latest_from` is the sender of the latest, for datagrams.
    Dropped { reason: DropReason, count: u64, latest_from: Option<SocketAddr> },
    /// A packet for this host's own stack (a reset for a connection the policy cut, a DNS answer): write it
    /// to the TUN device.
    Deliver(Vec<u8>),
    /// A DNS query the resolver cannot answer itself: send `query` to the `upstreams` in turn and hand the
    /// first answer (or `None` when none came) to [`Dataplane::dns_answered`] with `token`.
    DnsForward { token: u64, upstreams: Vec<SocketAddr>, query: Vec<u8> },
}

/// Datagrams to send, in the caller's buffer: `size` bytes, one datagram every `segment_size` bytes (the last
/// may be shorter), all to one destination. One datagram is a batch of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub destination: SocketAddr,
    pub size: usize,
    pub segment_size: usize,
}

impl Transmit {
    pub fn datagrams(&self) -> usize {
        self.size.div_ceil(self.segment_size)
    }
}

/// Per reason: when it was last reported, and what happened since.
#[derive(Debug, Clone, Copy, Default)]
struct DropReport {
    last: Option<Instant>,
    pending: u64,
}

#[derive(Debug)]
struct Pings {
    ident: u16,
    seq: u16,
    /// (sequence number, target, sent at), oldest first.
    pending: VecDeque<(u16, IpAddr, Instant)>,
}

pub struct Dataplane {
    node: Node,
    router: Router,
    filter: Filter,
    /// Flows peers opened that a new policy cut.
    revoked: u64,
    config: DataplaneConfig,
    rng: u64,
    pings: Pings,
    drops: [u64; DropReason::COUNT],
    reports: [DropReport; DropReason::COUNT],
    events: VecDeque<Event>,
    resolver: Option<Resolver>,
    /// DNS over TCP at the resolver's addresses.
    dns_tcp: Option<TcpServer>,
    mtu: u16,
    /// Forwarded queries by token: who asked, and the query (its answer is checked against it).
    dns_pending: HashMap<u64, PendingQuery>,
    dns_token: u64,
}

/// A query sent to an upstream, waiting for [`Dataplane::dns_answered`].
#[derive(Debug)]
struct PendingQuery {
    client: DnsClient,
    query: Vec<u8>,
    at: Instant,
}

/// Who asked a forwarded query.
#[derive(Debug, Clone, Copy)]
enum DnsClient {
    Udp { client: SocketAddr, resolver: IpAddr },
    Tcp { conn: usize, serial: u64 },
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane").field("node", &self.node).field("config", &self.config).finish_non_exhaustive()
    }
}

impl Dataplane {
    /// `seed` chooses session indices, SNAT ports and ping identifiers: the shell passes randomness, tests
    /// a constant. `mtu` is the tunnel's, for MSS clamping.
    pub fn new(private_key: Key, seed: u64, mtu: u16) -> Self {
        let mut rng = seed | 1;
        let ident = (xorshift(&mut rng) & 0xffff) as u16;
        Self {
            node: Node::new(private_key, xorshift(&mut rng)),
            router: Router::new(Vec::new(), &[], None, mtu),
            filter: Filter::new(MAX_TRACKED_FLOWS),
            revoked: 0,
            config: DataplaneConfig::default(),
            rng,
            pings: Pings { ident, seq: 0, pending: VecDeque::new() },
            drops: [0; DropReason::COUNT],
            reports: [DropReport::default(); DropReason::COUNT],
            events: VecDeque::new(),
            resolver: None,
            dns_tcp: None,
            mtu,
            dns_pending: HashMap::new(),
            dns_token: 0,
        }
    }

    /// Makes the node what `config` says. Everything is checked before anything changes, so a refused
    /// configuration leaves the running one whole. Unchanged peers keep their sessions, and the SNAT engine
    /// (with its translations) is replaced only when its settings change.
    pub fn configure(&mut self, config: DataplaneConfig, now: Instant) -> Result<Applied, ConfigError> {
        check_snat(&config.served, &config.snat)?;
        let snat_replaced = config.snat != self.config.snat;
        let engine = if snat_replaced && (config.snat.ipv4.is_some() || config.snat.ipv6.is_some()) {
            let mut snat_config = SnatConfig::new(config.snat.ipv4, config.snat.ipv6);
            snat_config.ports = config.snat.ports.clone();
            snat_config.max_flows = config.snat.max_flows;
            snat_config.source_share = config.snat.source_share;
            snat_config.seed = xorshift(&mut self.rng);
            Some(Snat::new(snat_config, now).map_err(ConfigError::Snat)?)
        } else {
            None
        };
        if snat_replaced {
            self.router.set_snat(engine);
        }
        self.router.set_served(&config.served);
        self.router.set_own(config.mesh_addresses.iter().chain(&config.local_addresses).copied().collect());
        // Before the peers change: a peer the new policy hides is still there to be told its flows ended.
        if config.filter != self.config.filter {
            let rules = config.filter.as_ref().map(|rules| rules.iter().map(filter::Rule::from).collect());
            let cut = self.filter.set_rules(rules);
            self.revoked += cut.len() as u64;
            self.tell(cut, &config, now);
        }
        let (peers_added, peers_removed, peers_changed) = self.node.set_peers(config.peers.clone());
        self.node.arm_timer(now);
        // A peer that left takes its flows along; the local ends learn at once rather than time out.
        let node = &self.node;
        let gone = self.filter.forget_unrouted(|remote| node.route(remote).is_some());
        self.tell(gone, &config, now);
        if config.dns != self.config.dns {
            let addresses = |c: &DataplaneConfig| c.dns.as_ref().map(|d| d.addresses.clone());
            if addresses(&config) != addresses(&self.config) {
                let serial = self.dns_tcp.as_ref().map_or(0, TcpServer::next_serial);
                self.dns_tcp = addresses(&config).map(|a| TcpServer::new(&a, self.mtu, now, serial));
                // Answers owed to the old server's connections have nowhere to go.
                self.dns_pending.retain(|_, p| !matches!(p.client, DnsClient::Tcp { .. }));
            }
            self.resolver = config.dns.clone().map(Resolver::new);
        }
        self.config = config;
        Ok(Applied { peers_added, peers_removed, peers_changed, snat_replaced })
    }

    /// Sends each cut flow's notices: to the remote end through the tunnel (a peer gone meanwhile is fine),
    /// and to the local end when it is this host (a LAN host behind SNAT knows only the SNAT address, so a
    /// reset in the mesh client's name would not reach its socket).
    fn tell(&mut self, cut: Vec<filter::Revoked>, config: &DataplaneConfig, now: Instant) {
        for c in cut {
            if let Some(notice) = c.notice {
                let _ = self.node.handle_tun_packet(&notice, now);
            }
            if let Some(reset) = c.local_reset
                && config.mesh_addresses.contains(&c.key.local())
            {
                self.push_event(Event::Deliver(reset));
            }
        }
    }

    /// What the node is configured as.
    pub fn config(&self) -> &DataplaneConfig {
        &self.config
    }

    /// A packet read from the TUN device (rewritten in place: SNAT replies, MSS); its datagram, if any, is
    /// queued for [`Dataplane::poll_transmit`].
    pub fn handle_tun_packet(&mut self, packet: &mut [u8], now: Instant) -> Result<(), DropReason> {
        if let Some(resolver) = &self.resolver
            && wire::destination(packet).is_some_and(|d| resolver.answers_at(d))
        {
            let result = self.resolve(packet, now);
            if let Err(reason) = result {
                self.note_drop(reason, None, now);
            }
            return result;
        }
        let result = self.router.to_mesh(packet, now).and_then(|()| {
            self.filter.outbound(packet, now);
            self.node.handle_tun_packet(packet, now)
        });
        if let Err(reason) = result {
            self.note_drop(reason, None, now);
        }
        result
    }

    /// A datagram from the network. `Ok(Some(n))`: write `out[..n]` to the TUN device. `out` must hold at
    /// least the datagram's length.
    pub fn handle_datagram(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        out: &mut [u8],
    ) -> Result<Option<usize>, DropReason> {
        let result = self.datagram(from, datagram, now, out);
        if let Err(reason) = result {
            self.note_drop(reason, Some(from), now);
        }
        result
    }

    fn datagram(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        out: &mut [u8],
    ) -> Result<Option<usize>, DropReason> {
        let n = match self.node.handle_datagram(from, datagram, now, out)? {
            Received::Packet(n) => n,
            Received::Control => return Ok(None),
        };
        if self.take_pong(&out[..n], now) {
            return Ok(None);
        }
        // An ICMP error speaks for the flow it quotes: only the peer that flow belongs to may send one, or a
        // peer could reset or shrink (fake "fragmentation needed") another peer's connections.
        match quoted_flow(&out[..n]) {
            QuotedFlow::NotAnError => {}
            QuotedFlow::To(quoted) => {
                if self.node.route(quoted) != self.node.last_sender() {
                    return Err(DropReason::SourceNotAllowed);
                }
            }
            QuotedFlow::Unreadable => return Err(DropReason::SourceNotAllowed),
        }
        // Where it goes is decided once: before the filter, so a packet the router refuses anyway opens no
        // flow, and then acted on.
        let node = &self.node;
        let dst = wire::destination(&out[..n]);
        let decided = match dst {
            Some(d) => Some(self.router.destination(d, |x| node.route(x).is_some())?),
            None => None,
        };
        self.filter.inbound(&out[..n], now)?;
        let (Some(dst), Some(decided)) = (dst, decided) else { return Err(DropReason::NotIp) };
        if let Some(snat_on) = decided {
            // The node accepted the packet only from the peer that routes its source: that peer sent it.
            let sender = self.node.last_sender().map(|p| u64::from(p.number()));
            self.router.forward(&mut out[..n], dst, snat_on, now, sender)?;
        }
        Ok(Some(n))
    }

    /// Runs what is due: WireGuard's timers (handshake retries, keepalives, rekeys), SNAT expiry, forgotten
    /// pings.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.node.poll_timeout().is_some_and(|t| t <= now) {
            self.node.handle_timeout(now);
        }
        if self.router.poll_timeout().is_some_and(|t| t <= now) {
            self.router.handle_timeout(now);
        }
        if self.filter.poll_timeout().is_some_and(|t| t <= now) {
            self.filter.handle_timeout(now);
        }
        if let Some(tcp) = &mut self.dns_tcp
            && tcp.poll_timeout().is_some_and(|t| t <= now)
        {
            tcp.handle_timeout(now);
            self.serve_tcp(now);
        }
        while self.pings.pending.front().is_some_and(|(_, _, sent)| now.duration_since(*sent) >= PING_TIMEOUT) {
            self.pings.pending.pop_front();
        }
    }

    /// When [`Dataplane::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let ping = self.pings.pending.front().map(|(_, _, sent)| *sent + PING_TIMEOUT);
        let dns = self.dns_tcp.as_ref().and_then(TcpServer::poll_timeout);
        [self.node.poll_timeout(), self.router.poll_timeout(), self.filter.poll_timeout(), ping, dns]
            .into_iter()
            .flatten()
            .min()
    }

    /// Moves the next datagrams to send into `buf` (cleared first): up to `max_datagrams` of equal size to one
    /// destination, the last one possibly shorter, as UDP segmentation offload sends them.
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>, max_datagrams: usize) -> Option<Transmit> {
        buf.clear();
        let first = self.node.poll_transmit()?;
        let (destination, segment_size) = (first.dst, first.payload.len());
        buf.extend_from_slice(&first.payload);
        self.node.recycle(first.payload);
        let mut count = 1;
        while count < max_datagrams {
            match self.node.peek_transmit() {
                Some((dst, len)) if dst == destination && len <= segment_size && buf.len() + len <= MAX_BATCH_BYTES => {
                    let next = self.node.poll_transmit().expect("peeked");
                    buf.extend_from_slice(&next.payload);
                    self.node.recycle(next.payload);
                    count += 1;
                    if len < segment_size {
                        break;
                    }
                }
                _ => break,
            }
        }
        Some(Transmit { destination, size: buf.len(), segment_size })
    }

    /// A packet to the resolver's address: a UDP query is answered (or handed out to forward).
    fn resolve(&mut self, packet: &[u8], now: Instant) -> Result<(), DropReason> {
        let layout = wire::parse(packet).map_err(|_| DropReason::NotDns)?;
        if layout.protocol == wire::PROTO_TCP
            && let Some(tcp) = &mut self.dns_tcp
        {
            tcp.handle_packet(&packet[..layout.packet_len], now);
            self.serve_tcp(now);
            return Ok(());
        }
        if layout.protocol != wire::PROTO_UDP || layout.fragment != Fragment::Whole {
            return Err(DropReason::NotDns);
        }
        let udp = &packet[layout.l4_offset..layout.packet_len];
        if udp.len() < 8 || u16::from_be_bytes([udp[2], udp[3]]) != 53 {
            return Err(DropReason::NotDns);
        }
        let (Some(source), Some(resolver_ip)) = (wire::source(packet), wire::destination(packet)) else {
            return Err(DropReason::NotDns);
        };
        let client = SocketAddr::new(source, u16::from_be_bytes([udp[0], udp[1]]));
        let query = &udp[8..];
        let resolver = self.resolver.as_ref().expect("checked by the caller");
        match resolver.answer(query, false) {
            dns::Answer::Reply(reply) => {
                self.push_event(Event::Deliver(dns_reply(resolver_ip, client, &reply)));
                Ok(())
            }
            dns::Answer::Forward(upstreams) => {
                let client = DnsClient::Udp { client, resolver: resolver_ip };
                if self.forward_query(client, query.to_vec(), upstreams, now) {
                    Ok(())
                } else {
                    Err(DropReason::NotDns)
                }
            }
            dns::Answer::Ignore => Err(DropReason::NotDns),
        }
    }

    /// Answers the queries DNS-over-TCP connections completed, and sends what the TCP stack wrote.
    fn serve_tcp(&mut self, now: Instant) {
        while let Some(query) = self.dns_tcp.as_mut().and_then(TcpServer::next_query) {
            let Some(resolver) = &self.resolver else { break };
            let (conn, serial) = (query.conn, query.serial);
            let reply = match resolver.answer(&query.message, true) {
                dns::Answer::Reply(reply) => Some(reply),
                dns::Answer::Forward(upstreams) => {
                    if self.forward_query(DnsClient::Tcp { conn, serial }, query.message, upstreams, now) {
                        continue;
                    }
                    None
                }
                dns::Answer::Ignore => None,
            };
            if let Some(tcp) = &mut self.dns_tcp {
                tcp.answer(conn, serial, reply.as_deref(), now);
            }
        }
        let outgoing: Vec<Vec<u8>> = self.dns_tcp.as_mut().map(|t| t.take_outgoing().collect()).unwrap_or_default();
        for packet in outgoing {
            self.push_event(Event::Deliver(packet));
        }
    }

    /// Hands a query the resolver cannot answer to the shell ([`Event::DnsForward`]); false when too many
    /// already wait for an upstream.
    fn forward_query(&mut self, client: DnsClient, query: Vec<u8>, upstreams: Vec<SocketAddr>, now: Instant) -> bool {
        self.dns_pending.retain(|_, p| now.duration_since(p.at) < PENDING_QUERY_LIFETIME);
        if self.dns_pending.len() >= MAX_PENDING_QUERIES {
            return false;
        }
        self.dns_token += 1;
        let token = self.dns_token;
        self.dns_pending.insert(token, PendingQuery { client, query: query.clone(), at: now });
        self.push_event(Event::DnsForward { token, upstreams, query });
        true
    }

    /// The answer to a forwarded query ([`Event::DnsForward`]), or `None` when no upstream gave one (the
    /// client then gets SERVFAIL at once rather than waiting for its own timeout).
    pub fn dns_answered(&mut self, token: u64, answer: Option<&[u8]>, now: Instant) {
        let Some(pending) = self.dns_pending.remove(&token) else { return };
        match pending.client {
            DnsClient::Udp { client, resolver } => {
                if let Some(reply) = dns::relay_answer(&pending.query, answer, false) {
                    self.push_event(Event::Deliver(dns_reply(resolver, client, &reply)));
                }
            }
            DnsClient::Tcp { conn, serial } => {
                let reply = dns::relay_answer(&pending.query, answer, true);
                if let Some(tcp) = &mut self.dns_tcp {
                    tcp.answer(conn, serial, reply.as_deref(), now);
                }
                self.serve_tcp(now);
            }
        }
    }

    /// The resolver, for questions from the shell itself (`meshd dns query`).
    pub fn resolver(&self) -> Option<&Resolver> {
        self.resolver.as_ref()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front().or_else(|| self.node.poll_handshake().map(Event::Handshake))
    }

    /// Sends one ICMP echo request from this node's mesh address of `to`'s family through the tunnel; the
    /// reply comes back as [`Event::Pong`] with the returned sequence number and is not written to the TUN.
    pub fn send_ping(&mut self, to: IpAddr, now: Instant) -> Result<u16, DropReason> {
        let Some(from) = self.config.mesh_addresses.iter().find(|a| a.is_ipv4() == to.is_ipv4()).copied() else {
            return Err(DropReason::NoRoute);
        };
        self.pings.seq = self.pings.seq.wrapping_add(1);
        let (ident, seq) = (self.pings.ident, self.pings.seq);
        let packet = match (from, to) {
            (IpAddr::V4(f), IpAddr::V4(t)) => Builder::v4(f.octets(), t.octets()),
            (IpAddr::V6(f), IpAddr::V6(t)) => Builder::v6(f.octets(), t.octets()),
            _ => unreachable!("same family"),
        }
        .echo(true, ident, seq, b"meshd ping");
        self.filter.outbound(&packet, now);
        self.node.handle_tun_packet(&packet, now)?;
        self.pings.pending.retain(|(s, _, _)| *s != seq);
        self.pings.pending.push_back((seq, to, now));
        Ok(seq)
    }

    /// Whether a decrypted packet answers one of our pings (then it is consumed here).
    fn take_pong(&mut self, packet: &[u8], now: Instant) -> bool {
        if self.pings.pending.is_empty() {
            return false;
        }
        let Ok(layout) = wire::parse(packet) else { return false };
        let reply_type = match layout.version {
            IpVersion::V4 if layout.protocol == wire::PROTO_ICMP => 0,
            IpVersion::V6 if layout.protocol == wire::PROTO_ICMPV6 => 129,
            _ => return false,
        };
        let Ok(icmp) = IcmpHeader::new_checked(&packet[layout.l4_offset..layout.packet_len]) else { return false };
        if icmp.msg_type() != reply_type || icmp.echo_ident() != self.pings.ident {
            return false;
        }
        let (seq, source) = (icmp.echo_seq(), wire::source(packet));
        let Some(i) = self.pings.pending.iter().position(|(s, to, _)| *s == seq && Some(*to) == source) else {
            return false;
        };
        let (_, to, sent) = self.pings.pending.remove(i).expect("found");
        self.push_event(Event::Pong { to, seq, rtt: now.duration_since(sent) });
        true
    }

    fn note_drop(&mut self, reason: DropReason, from: Option<SocketAddr>, now: Instant) {
        let slot = reason.index();
        self.drops[slot] += 1;
        let report = &mut self.reports[slot];
        report.pending += 1;
        if report.last.is_none_or(|t| now.duration_since(t) >= DROP_REPORT_INTERVAL) {
            let count = std::mem::take(&mut report.pending);
            report.last = Some(now);
            self.push_event(Event::Dropped { reason, count, latest_from: from });
        }
    }

    fn push_event(&mut self, event: Event) {
        if self.events.len() == EVENT_BACKLOG {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Packets dropped for `reason` since the start (every SNAT reason shares one count; the engine's own
    /// counters have the detail).
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    pub fn public_key(&self) -> Key {
        self.node.public_key()
    }

    pub fn peer_status(&self) -> Vec<PeerStatus> {
        self.node.peer_status()
    }

    /// The SNAT engine, when SNAT addresses are set.
    /// The ACL filter: its rules, flows and recent refusals.
    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// Flows peers opened that a policy change cut.
    pub fn revoked_flows(&self) -> u64 {
        self.revoked
    }

    pub fn snat(&self) -> Option<&Snat> {
        self.router.snat()
    }
}

/// A UDP packet from the resolver's port 53 to the client.
fn dns_reply(resolver: IpAddr, client: SocketAddr, payload: &[u8]) -> Vec<u8> {
    match (resolver, client.ip()) {
        (IpAddr::V4(r), IpAddr::V4(c)) => Builder::v4(r.octets(), c.octets()),
        (IpAddr::V6(r), IpAddr::V6(c)) => Builder::v6(r.octets(), c.octets()),
        _ => unreachable!("both come from one packet's header"),
    }
    .udp(53, client.port(), payload)
}

/// What an ICMP or ICMPv6 error speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QuotedFlow {
    /// Not an ICMP error (or a later fragment, which carries no ICMP header and means nothing alone).
    NotAnError,
    /// An error about a packet sent to this address.
    To(IpAddr),
    /// An error whose quote cannot be read, or that comes in fragments (errors are small enough never to
    /// need them): refused, since the kernel behind would still act on what it can read.
    Unreadable,
}

fn quoted_flow(packet: &[u8]) -> QuotedFlow {
    // Every decrypted packet comes through here: TCP and UDP leave after one byte is looked at, and only
    // ICMP (or IPv6 with extension headers in front) is parsed.
    let maybe_icmp = match packet.first().map(|b| b >> 4) {
        Some(4) => packet.get(9) == Some(&wire::PROTO_ICMP),
        Some(6) => matches!(packet.get(6), Some(0 | 43 | 44 | 51 | 60 | 58)),
        _ => false,
    };
    if !maybe_icmp {
        return QuotedFlow::NotAnError;
    }
    // Anything that does not parse is the router's and the node's to refuse on their own grounds.
    let Ok(layout) = wire::parse(packet) else { return QuotedFlow::NotAnError };
    if matches!(layout.fragment, Fragment::Later { .. }) {
        return QuotedFlow::NotAnError;
    }
    let is_error = match layout.version {
        IpVersion::V4 => {
            layout.protocol == wire::PROTO_ICMP && matches!(packet.get(layout.l4_offset), Some(3 | 11 | 12))
        }
        IpVersion::V6 => layout.protocol == wire::PROTO_ICMPV6 && matches!(packet.get(layout.l4_offset), Some(1..=4)),
    };
    if !is_error {
        return QuotedFlow::NotAnError;
    }
    if matches!(layout.fragment, Fragment::First { .. }) {
        return QuotedFlow::Unreadable;
    }
    let Some(quoted) = packet.get(layout.l4_offset + 8..layout.packet_len) else { return QuotedFlow::Unreadable };
    if wire::parse_quoted(quoted).is_err() {
        return QuotedFlow::Unreadable;
    }
    wire::destination(quoted).map_or(QuotedFlow::Unreadable, QuotedFlow::To)
}

#[cfg(test)]
mod tests {
    use mesh_packet::wire::TCP_SYN;

    use super::*;

    const ROUTER: usize = 0;
    const CLIENT: usize = 1;

    fn key(i: usize) -> Key {
        let mut k = [0u8; 32];
        k[1] = 1 + i as u8;
        k[31] = 0x42;
        k
    }

    fn underlay(i: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1 + i as u8)), 41641)
    }

    fn mesh_ip(i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1 + i as u8))
    }

    fn peer(i: usize, extra: &[&str]) -> PeerSpec {
        let mut allowed_ips = vec![IpNet::from(mesh_ip(i))];
        allowed_ips.extend(extra.iter().map(|p| p.parse::<IpNet>().unwrap()));
        PeerSpec {
            public_key: Node::public_key_of(key(i)),
            preshared_key: None,
            endpoint: Some(underlay(i)),
            allowed_ips,
            persistent_keepalive: None,
        }
    }

    fn router_config() -> DataplaneConfig {
        DataplaneConfig {
            mesh_addresses: vec![mesh_ip(ROUTER)],
            local_addresses: vec!["10.0.12.1".parse().unwrap()],
            peers: vec![peer(CLIENT, &[])],
            served: vec![Served { prefix: "10.0.0.0/16".parse().unwrap(), snat: true }],
            snat: SnatSettings::with_addresses(&["10.0.12.9".parse().unwrap()]).unwrap(),
            filter: None,
            dns: None,
        }
    }

    fn client_config() -> DataplaneConfig {
        DataplaneConfig {
            mesh_addresses: vec![mesh_ip(CLIENT)],
            peers: vec![peer(ROUTER, &["10.0.0.0/16"])],
            ..DataplaneConfig::default()
        }
    }

    /// A router and a client on a perfect wire; `exchange` carries datagrams until both are quiet and
    /// returns what each wrote to its TUN device.
    struct Pair {
        planes: [Dataplane; 2],
        now: Instant,
    }

    impl Pair {
        fn new() -> Self {
            let now = Instant::now();
            let mut router = Dataplane::new(key(ROUTER), 1, 1420);
            let mut client = Dataplane::new(key(CLIENT), 2, 1420);
            router.configure(router_config(), now).unwrap();
            client.configure(client_config(), now).unwrap();
            Pair { planes: [router, client], now }
        }

        fn exchange(&mut self) -> [Vec<Vec<u8>>; 2] {
            let mut tun: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
            let (mut buf, mut out) = (Vec::new(), vec![0u8; 2048]);
            for _ in 0..10 {
                let mut quiet = true;
                for from in [ROUTER, CLIENT] {
                    while let Some(t) = self.planes[from].poll_transmit(&mut buf, 64) {
                        quiet = false;
                        let to = [ROUTER, CLIENT].into_iter().find(|&i| underlay(i) == t.destination).unwrap();
                        for datagram in buf[..t.size].chunks(t.segment_size) {
                            if let Ok(Some(n)) =
                                self.planes[to].handle_datagram(underlay(from), datagram, self.now, &mut out)
                            {
                                tun[to].push(out[..n].to_vec());
                            }
                        }
                    }
                }
                if quiet {
                    break;
                }
            }
            tun
        }
    }

    #[test]
    fn the_router_snats_what_it_serves_and_translates_replies_back() {
        let mut pair = Pair::new();
        let now = pair.now;
        let mut syn = Builder::v4([100, 64, 0, 2], [10, 0, 12, 50]).tcp(40000, 443, TCP_SYN, b"");
        pair.planes[CLIENT].handle_tun_packet(&mut syn, now).unwrap();
        let [at_router, _] = pair.exchange();
        assert_eq!(at_router.len(), 1, "the SYN crossed the tunnel once the handshake was done");
        let forwarded = &at_router[0];
        assert_eq!(wire::source(forwarded), Some("10.0.12.9".parse().unwrap()), "SNAT'd to the SNAT address");
        let port = u16::from_be_bytes([forwarded[20], forwarded[21]]);

        let mut reply = Builder::v4([10, 0, 12, 50], [10, 0, 12, 9]).tcp(443, port, TCP_SYN | 0x10, b"");
        pair.planes[ROUTER].handle_tun_packet(&mut reply, now).unwrap();
        let [_, at_client] = pair.exchange();
        assert_eq!(at_client.len(), 1);
        assert_eq!(wire::destination(&at_client[0]), Some(mesh_ip(CLIENT)), "translated back to the client");
        assert_eq!(pair.planes[ROUTER].snat().unwrap().flows(), 1);
    }

    #[test]
    fn refusals_are_counted_and_reported_once_per_interval() {
        let mut pair = Pair::new();
        let now = pair.now;
        let mut warm = Builder::v4([100, 64, 0, 2], [100, 64, 0, 1]).udp(1, 2, b"hi");
        pair.planes[CLIENT].handle_tun_packet(&mut warm, now).unwrap();
        pair.exchange();
        while pair.planes[ROUTER].poll_event().is_some() {}
        // The client's allowed IPs send 10.0.0.0/16 to the router; the router serves it, but not 10.9.
        let mut client = Dataplane::new(key(CLIENT), 2, 1420);
        let mut config = client_config();
        config.peers = vec![peer(ROUTER, &["10.0.0.0/16", "10.9.0.0/16"])];
        client.configure(config, now).unwrap();
        pair.planes[CLIENT] = client;
        for i in 0..3 {
            let mut p = Builder::v4([100, 64, 0, 2], [10, 9, 0, 1]).udp(1000 + i, 53, b"q");
            pair.planes[CLIENT].handle_tun_packet(&mut p, now).unwrap();
            pair.exchange();
        }
        let router = &mut pair.planes[ROUTER];
        assert_eq!(router.dropped(DropReason::NotRouted), 3);
        let reports: Vec<Event> = std::iter::from_fn(|| router.poll_event())
            .filter(|e| matches!(e, Event::Dropped { reason: DropReason::NotRouted, .. }))
            .collect();
        assert_eq!(reports.len(), 1, "one report for three drops within the interval: {reports:?}");
        // Later, the next drop reports the ones in between.
        pair.now = now + DROP_REPORT_INTERVAL;
        let mut p = Builder::v4([100, 64, 0, 2], [10, 9, 0, 1]).udp(999, 53, b"q");
        pair.planes[CLIENT].handle_tun_packet(&mut p, pair.now).unwrap();
        pair.exchange();
        let event = std::iter::from_fn(|| pair.planes[ROUTER].poll_event())
            .find(|e| matches!(e, Event::Dropped { reason: DropReason::NotRouted, .. }));
        assert!(
            matches!(event, Some(Event::Dropped { count: 3, latest_from: Some(from), .. }) if from == underlay(CLIENT)),
            "{event:?}"
        );
    }

    #[test]
    fn a_peer_with_many_source_addresses_still_gets_one_share_of_the_snat_pool() {
        let mut pair = Pair::new();
        let now = pair.now;
        // The client is a subnet router itself: it may send from all of 192.168.50.0/24.
        let mut config = router_config();
        config.peers = vec![peer(CLIENT, &["192.168.50.0/24"])];
        config.snat.ports = 20_000..=20_007;
        config.snat.source_share = 4;
        pair.planes[ROUTER].configure(config, now).unwrap();
        let mut client = client_config();
        client.mesh_addresses.push("192.168.50.1".parse().unwrap());
        pair.planes[CLIENT].configure(client, now).unwrap();
        for host in 1..=6u8 {
            let mut udp = Builder::v4([192, 168, 50, host], [10, 0, 12, 50]).udp(5000, 53, b"q");
            pair.planes[CLIENT].handle_tun_packet(&mut udp, now).unwrap();
        }
        let [at_router, _] = pair.exchange();
        assert_eq!(at_router.len(), 2, "8 ports, a share of 4: two mappings for this peer, however many sources");
        assert_eq!(pair.planes[ROUTER].dropped(DropReason::Snat(snat::DropReason::SourceOverQuota)), 4);
    }

    #[test]
    fn a_peers_icmp_error_for_another_peers_flow_is_refused() {
        let mut pair = Pair::new();
        let now = pair.now;
        // "Fragmentation needed, MTU 68" for the packet LAN host 10.0.12.50 sent to another peer's address
        // (100.64.0.3): the client is not that peer, so it may not speak for the flow.
        let quoted = Builder::v4([10, 0, 12, 50], [100, 64, 0, 3]).tcp(443, 40000, TCP_SYN, b"");
        let mut forged = Builder::v4([100, 64, 0, 2], [10, 0, 12, 50]).icmp_error(3, 4, 68, &quoted[..28]);
        pair.planes[CLIENT].handle_tun_packet(&mut forged, now).unwrap();
        let [at_router, _] = pair.exchange();
        assert!(at_router.is_empty(), "{at_router:?}");
        assert_eq!(pair.planes[ROUTER].dropped(DropReason::SourceNotAllowed), 1);
        // A quote the check cannot read (an unknown IPv4 option in the quoted header) is refused too: the
        // kernel behind would still act on it.
        let mut odd = quoted[..28].to_vec();
        odd.splice(20..20, [0x99, 4, 0, 0]);
        odd[0] = 0x46;
        let mut unreadable = Builder::v4([100, 64, 0, 2], [10, 0, 12, 50]).icmp_error(3, 3, 0, &odd);
        pair.planes[CLIENT].handle_tun_packet(&mut unreadable, now).unwrap();
        pair.exchange();
        assert_eq!(pair.planes[ROUTER].dropped(DropReason::SourceNotAllowed), 2);
        // An error about the client's own flow passes this check (and is then the SNAT engine's to judge).
        let own = Builder::v4([10, 0, 12, 50], [100, 64, 0, 2]).tcp(443, 40000, TCP_SYN, b"");
        let mut genuine = Builder::v4([100, 64, 0, 2], [10, 0, 12, 50]).icmp_error(3, 4, 1280, &own[..28]);
        pair.planes[CLIENT].handle_tun_packet(&mut genuine, now).unwrap();
        pair.exchange();
        assert_eq!(pair.planes[ROUTER].dropped(DropReason::SourceNotAllowed), 2);
    }

    #[test]
    fn a_ping_is_answered_as_a_pong_event_and_never_reaches_the_tun() {
        let mut pair = Pair::new();
        let now = pair.now;
        let seq = pair.planes[CLIENT].send_ping(mesh_ip(ROUTER), now).unwrap();
        let [at_router, _] = pair.exchange();
        // The router's kernel answers echo requests; here the test plays the kernel.
        assert_eq!(at_router.len(), 1);
        let request = &at_router[0];
        let ident = u16::from_be_bytes([request[24], request[25]]);
        // A forged reply (right ident and sequence, from another address the router's peer may send from)
        // is not the pong: it goes to the TUN like any other packet.
        let mut forged = Builder::v4([10, 0, 12, 50], [100, 64, 0, 2]).echo(false, ident, seq, b"meshd ping");
        pair.planes[ROUTER].handle_tun_packet(&mut forged, now).unwrap();
        pair.exchange();
        let mut events: Vec<Event> = std::iter::from_fn(|| pair.planes[CLIENT].poll_event()).collect();
        assert!(events.iter().all(|e| !matches!(e, Event::Pong { .. })), "a reply from another address is no pong");
        let mut reply = Builder::v4([100, 64, 0, 1], [100, 64, 0, 2]).echo(false, ident, seq, b"meshd ping");
        pair.now = now + Duration::from_millis(7);
        pair.planes[ROUTER].handle_tun_packet(&mut reply, pair.now).unwrap();
        let [_, at_client] = pair.exchange();
        assert!(at_client.is_empty(), "the pong is the dataplane's, not the kernel's");
        events.extend(std::iter::from_fn(|| pair.planes[CLIENT].poll_event()));
        assert!(
            events.contains(&Event::Pong { to: mesh_ip(ROUTER), seq, rtt: Duration::from_millis(7) }),
            "{events:?}"
        );
        assert!(events.iter().any(|e| matches!(e, Event::Handshake(h) if h.initiated_here)), "{events:?}");
        assert_eq!(pair.planes[CLIENT].send_ping("fd00::1".parse().unwrap(), now), Err(DropReason::NoRoute));
    }

    #[test]
    fn a_refused_configuration_changes_nothing_and_an_unchanged_one_keeps_everything() {
        let mut pair = Pair::new();
        let now = pair.now;
        let mut syn = Builder::v4([100, 64, 0, 2], [10, 0, 12, 50]).tcp(40000, 443, TCP_SYN, b"");
        pair.planes[CLIENT].handle_tun_packet(&mut syn, now).unwrap();
        pair.exchange();
        let router = &mut pair.planes[ROUTER];
        let before = router.config().clone();

        let mut bad = router_config();
        bad.served.push(Served { prefix: "fd00:1::/64".parse().unwrap(), snat: true });
        bad.peers.clear();
        let err = router.configure(bad, now).unwrap_err();
        assert_eq!(err, ConfigError::SnatWithoutAddress("fd00:1::/64".parse().unwrap()));
        assert!(err.to_string().contains("--snat-subnet-routes=false"), "{err}");
        assert_eq!(router.config(), &before);
        assert_eq!(router.peer_status().len(), 1, "the peers stayed");
        assert_eq!(router.snat().unwrap().flows(), 1, "and so did the translations");

        let applied = router.configure(router_config(), now).unwrap();
        assert_eq!(applied, Applied::default(), "nothing to change");
        assert_eq!(router.snat().unwrap().flows(), 1);
        let mut moved = router_config();
        moved.snat = SnatSettings::with_addresses(&["10.0.12.10".parse().unwrap()]).unwrap();
        assert!(router.configure(moved, now).unwrap().snat_replaced);
        assert_eq!(router.snat().unwrap().flows(), 0, "a new address starts a new engine");
        assert_eq!(
            SnatSettings::with_addresses(&["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()]),
            Err(ConfigError::TwoSnatAddresses)
        );
    }

    #[test]
    fn equal_datagrams_to_one_peer_leave_as_one_batch() {
        let mut pair = Pair::new();
        let now = pair.now;
        let mut first = Builder::v4([100, 64, 0, 2], [100, 64, 0, 1]).udp(1, 2, &[0; 100]);
        pair.planes[CLIENT].handle_tun_packet(&mut first, now).unwrap();
        pair.exchange();
        for _ in 0..5 {
            let mut p = Builder::v4([100, 64, 0, 2], [100, 64, 0, 1]).udp(1, 2, &[0; 100]);
            pair.planes[CLIENT].handle_tun_packet(&mut p, now).unwrap();
        }
        let mut short = Builder::v4([100, 64, 0, 2], [100, 64, 0, 1]).udp(1, 2, &[0; 10]);
        pair.planes[CLIENT].handle_tun_packet(&mut short, now).unwrap();
        let mut buf = Vec::new();
        let t = pair.planes[CLIENT].poll_transmit(&mut buf, 4).unwrap();
        assert_eq!((t.datagrams(), t.destination), (4, underlay(ROUTER)), "at most max_datagrams");
        assert_eq!(t.size, 4 * t.segment_size);
        let t = pair.planes[CLIENT].poll_transmit(&mut buf, 64).unwrap();
        assert_eq!(t.datagrams(), 2, "one more full one and the shorter last");
        assert!(t.size < 2 * t.segment_size);
        assert!(pair.planes[CLIENT].poll_transmit(&mut buf, 64).is_none());

        // Full-sized datagrams: a batch stops where one offloaded send would overflow.
        for _ in 0..60 {
            let mut p = Builder::v4([100, 64, 0, 2], [100, 64, 0, 1]).udp(1, 2, &[0; 1300]);
            pair.planes[CLIENT].handle_tun_packet(&mut p, now).unwrap();
        }
        let t = pair.planes[CLIENT].poll_transmit(&mut buf, 64).unwrap();
        assert!(t.size <= MAX_BATCH_BYTES && t.size + t.segment_size > MAX_BATCH_BYTES, "{t:?}");
    }

    /// The router enforces the policy for the subnet behind it, and a policy change that takes the access
    /// away resets the client's open connection through the tunnel.
    #[test]
    fn the_router_enforces_the_policy_for_its_subnet_and_resets_revoked_flows() {
        let mut pair = Pair::new();
        let now = pair.now;
        let https_only = vec![mesh_proto::FilterRule {
            src: vec!["100.64.0.2/32".parse().unwrap()].into(),
            dst: vec![mesh_proto::DstPorts { net: Some("10.0.0.0/16".parse().unwrap()), first: 443, last: 443 }],
            protos: vec![],
        }];
        pair.planes[ROUTER].configure(DataplaneConfig { filter: Some(https_only), ..router_config() }, now).unwrap();
        let mut syn = Builder::v4([100, 64, 0, 2], [10, 0, 12, 50]).tcp(40000, 443, TCP_SYN, b"");
        pair.planes[CLIENT].handle_tun_packet(&mut syn, now).unwrap();
        let mut ssh = Builder::v4([100, 64, 0, 2], [10, 0, 12, 50]).tcp(40001, 22, TCP_SYN, b"");
        pair.planes[CLIENT].handle_tun_packet(&mut ssh, now).unwrap();
        let [at_router, _] = pair.exchange();
        assert_eq!(at_router.len(), 1, "443 forwarded, 22 refused");
        assert_eq!(pair.planes[ROUTER].dropped(DropReason::AclDenied), 1);
        assert_eq!(pair.planes[ROUTER].filter().flows(), 1);
        // The policy no longer allows it: the client gets a RST for its connection at once.
        pair.planes[ROUTER].configure(DataplaneConfig { filter: Some(vec![]), ..router_config() }, now).unwrap();
        assert_eq!(pair.planes[ROUTER].revoked_flows(), 1);
        let [_, at_client] = pair.exchange();
        assert_eq!(at_client.len(), 1, "{at_client:?}");
        let rst = &at_client[0];
        let layout = wire::parse(rst).unwrap();
        let tcp = &rst[layout.l4_offset..];
        assert_eq!(wire::source(rst), Some(IpAddr::from([10, 0, 12, 50])));
        assert_eq!((u16::from_be_bytes([tcp[2], tcp[3]]), tcp[13] & 0x04), (40000, 0x04));
    }
}
