use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;

use mesh_packet::wire::destination;

use crate::DropReason;
use crate::routes::PrefixTable;

pub type Key = [u8; 32];

/// Handshakes per second the node answers before it demands cookies (WireGuard's load defence). Handshake
/// initiations are counted twice (once to find the peer before the expensive key exchange, once inside
/// boringtun), so this is twice boringtun's per-device default of 100.
const HANDSHAKE_RATE_LIMIT: u64 = 200;

/// boringtun's timers have one-second resolution; four looks a second keep retries and keepalives on time.
const TIMER_INTERVAL: Duration = Duration::from_millis(250);

/// Room boringtun needs beyond a packet: the data header and tag, and never less than a handshake.
const OVERHEAD: usize = 32;
const MIN_BUFFER: usize = 148;

/// Idle output buffers kept for reuse, so steady traffic allocates nothing.
const BUFFER_POOL: usize = 256;

/// WireGuard's message type of a cookie reply.
const COOKIE_REPLY: u8 = 3;

/// What a peer is, as configured.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

impl fmt::Debug for PeerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerSpec")
            .field("public_key", &short_key(&self.public_key))
            .field("preshared_key", &self.preshared_key.map(|_| "<redacted>"))
            .field("endpoint", &self.endpoint)
            .field("allowed_ips", &self.allowed_ips)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .finish()
    }
}

fn short_key(key: &Key) -> String {
    key[..4].iter().map(|b| format!("{b:02x}")).collect::<String>() + "…"
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(u32);

impl PeerId {
    /// The peer's slot number, stable while it is configured (quotas are kept by it).
    pub fn number(self) -> u32 {
        self.0
    }
}

/// A datagram to send.
#[derive(Debug)]
pub struct Transmit {
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

/// A completed handshake: a new session with this peer, reached at this endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handshake {
    pub public_key: Key,
    pub endpoint: SocketAddr,
    /// Whether this node sent the initiation (else the peer did and this node answered).
    pub initiated_here: bool,
}

/// Handshakes kept for [`Node::poll_handshake`] when nobody collects them; older ones are dropped.
const HANDSHAKE_BACKLOG: usize = 64;

/// What a datagram turned into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// A decrypted IP packet of this many bytes, at the start of the output buffer, for the TUN device.
    Packet(usize),
    /// A handshake, keepalive or cookie: nothing for the TUN device (replies, if any, are queued).
    Control,
}

/// Node-wide counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NodeCounters {
    pub packets_to_network: u64,
    pub packets_to_tun: u64,
    drops: [u64; DropReason::COUNT],
}

impl NodeCounters {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }
}

/// The reason boringtun's error amounts to.
fn from_wireguard(e: &WireGuardError) -> DropReason {
    use WireGuardError as E;
    match e {
        E::InvalidMac | E::WrongKey | E::InvalidTai64nTimestamp | E::WrongTai64nTimestamp | E::UnexpectedPacket => {
            DropReason::HandshakeRejected
        }
        E::InvalidAeadTag | E::InvalidCounter | E::DuplicateCounter => DropReason::DataRejected,
        E::NoCurrentSession | E::ConnectionExpired | E::WrongIndex => DropReason::NoSession,
        E::UnderLoad => DropReason::UnderLoad,
        _ => DropReason::Malformed,
    }
}

/// A peer as it is now, for status output and the UAPI.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStatus {
    pub id: PeerId,
    pub public_key: Key,
    pub has_preshared_key: bool,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
    /// How long ago the current session's handshake completed, if there is a session.
    pub since_handshake: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

struct Peer {
    spec: PeerSpec,
    tunn: Tunn,
    /// The 24-bit index boringtun puts in the top of every session index of this peer.
    index: u32,
    endpoint: Option<SocketAddr>,
    rx_bytes: u64,
    tx_bytes: u64,
    rx_packets: u64,
    tx_packets: u64,
}

/// A mesh node: its key, its peers, and the routing between them.
pub struct Node {
    secret: StaticSecret,
    public: PublicKey,
    peers: Vec<Option<Peer>>,
    by_key: HashMap<Key, PeerId>,
    by_index: HashMap<u32, PeerId>,
    routes: PrefixTable<PeerId>,
    /// The peer the last decrypted packet came from (what `Received::Packet` was accepted from).
    last_sender: Option<PeerId>,
    limiter: Arc<RateLimiter>,
    rng: u64,
    transmits: VecDeque<Transmit>,
    buffers: Vec<Vec<u8>>,
    counters: NodeCounters,
    next_timer: Option<Instant>,
    scratch: Vec<u8>,
    handshakes: VecDeque<Handshake>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("public_key", &short_key(self.public.as_bytes()))
            .field("peers", &self.by_key.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// Why a peer could not be added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerError {
    Duplicate,
    OwnKey,
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerError::Duplicate => "a peer with this public key already exists",
            PeerError::OwnKey => "a peer cannot have the node's own public key",
        })
    }
}

impl std::error::Error for PeerError {}

impl Node {
    /// `seed` chooses session indices; the shell passes randomness, tests a constant.
    pub fn new(private_key: Key, seed: u64) -> Self {
        let secret = StaticSecret::from(private_key);
        let public = PublicKey::from(&secret);
        let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        Self {
            secret,
            public,
            peers: Vec::new(),
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            routes: PrefixTable::default(),
            last_sender: None,
            limiter,
            rng: seed | 1,
            transmits: VecDeque::new(),
            buffers: Vec::new(),
            counters: NodeCounters::default(),
            next_timer: None,
            scratch: vec![0; 65535 + OVERHEAD],
            handshakes: VecDeque::new(),
        }
    }

    /// The peer the packet of the last `Received::Packet` came from: the one whose allowed IPs hold its
    /// source, known from the check that accepted it without a second lookup.
    pub fn last_sender(&self) -> Option<PeerId> {
        self.last_sender
    }

    pub fn public_key(&self) -> Key {
        *self.public.as_bytes()
    }

    /// The public key for a private key (clamped as X25519 does).
    pub fn public_key_of(private_key: Key) -> Key {
        *PublicKey::from(&StaticSecret::from(private_key)).as_bytes()
    }

    pub fn counters(&self) -> &NodeCounters {
        &self.counters
    }

    fn next_index(&mut self) -> u32 {
        loop {
            // Enough to make session indices differ between runs; they are not secrets.
            let index = (crate::xorshift(&mut self.rng) & 0x00ff_ffff) as u32;
            if !self.by_index.contains_key(&index) {
                return index;
            }
        }
    }

    fn new_tunn(&self, spec: &PeerSpec, index: u32) -> Tunn {
        Tunn::new(
            self.secret.clone(),
            PublicKey::from(spec.public_key),
            spec.preshared_key,
            spec.persistent_keepalive.filter(|&k| k > 0),
            index,
            Some(self.limiter.clone()),
        )
    }

    pub fn add_peer(&mut self, spec: PeerSpec) -> Result<PeerId, PeerError> {
        if spec.public_key == *self.public.as_bytes() {
            return Err(PeerError::OwnKey);
        }
        if self.by_key.contains_key(&spec.public_key) {
            return Err(PeerError::Duplicate);
        }
        let index = self.next_index();
        let tunn = self.new_tunn(&spec, index);
        let slot = self.peers.iter().position(Option::is_none).unwrap_or(self.peers.len());
        let id = PeerId(slot as u32);
        for prefix in &spec.allowed_ips {
            self.routes.insert(*prefix, id);
        }
        self.by_key.insert(spec.public_key, id);
        self.by_index.insert(index, id);
        let peer =
            Peer { endpoint: spec.endpoint, spec, tunn, index, rx_bytes: 0, tx_bytes: 0, rx_packets: 0, tx_packets: 0 };
        if slot == self.peers.len() {
            self.peers.push(Some(peer));
        } else {
            self.peers[slot] = Some(peer);
        }
        Ok(id)
    }

    pub fn remove_peer(&mut self, id: PeerId) -> Option<PeerSpec> {
        let peer = self.peers.get_mut(id.0 as usize)?.take()?;
        self.by_key.remove(&peer.spec.public_key);
        self.by_index.remove(&peer.index);
        self.routes.remove_value(id);
        Some(peer.spec)
    }

    /// Applies a changed configuration to an existing peer. The session survives changes of endpoint and
    /// allowed IPs; a new preshared key or keepalive needs a new handshake.
    pub fn update_peer(&mut self, id: PeerId, spec: PeerSpec) {
        let Some(old) = self.peers.get(id.0 as usize).and_then(Option::as_ref).map(|p| p.spec.clone()) else {
            return;
        };
        if old.allowed_ips != spec.allowed_ips {
            self.routes.remove_value(id);
            for prefix in &spec.allowed_ips {
                self.routes.insert(*prefix, id);
            }
        }
        let new_tunn = (old.preshared_key != spec.preshared_key
            || old.persistent_keepalive != spec.persistent_keepalive)
            .then(|| self.new_tunn(&spec, self.peers[id.0 as usize].as_ref().map_or(0, |p| p.index)));
        let peer = self.peers[id.0 as usize].as_mut().expect("checked above");
        if let Some(tunn) = new_tunn {
            peer.tunn = tunn;
        }
        if old.endpoint != spec.endpoint && spec.endpoint.is_some() {
            peer.endpoint = spec.endpoint;
        }
        peer.spec = spec;
    }

    /// Makes the peer set equal to `specs`: peers not listed are removed, new ones added, changed ones
    /// updated, and unchanged ones keep their sessions untouched. Returns (added, removed, changed).
    pub fn set_peers(&mut self, specs: Vec<PeerSpec>) -> (usize, usize, usize) {
        let wanted: std::collections::HashSet<Key> = specs.iter().map(|s| s.public_key).collect();
        let gone: Vec<PeerId> = self.by_key.iter().filter(|(k, _)| !wanted.contains(*k)).map(|(_, id)| *id).collect();
        for id in &gone {
            self.remove_peer(*id);
        }
        let (mut added, mut changed) = (0, 0);
        // In configuration order, so when two peers list one prefix the later one has it, every time (as
        // with `wg setconf`).
        for spec in specs {
            let key = spec.public_key;
            match self.by_key.get(&key).copied() {
                Some(id) => {
                    if self.peers[id.0 as usize].as_ref().is_some_and(|p| p.spec != spec) {
                        self.update_peer(id, spec);
                        changed += 1;
                    }
                }
                None => {
                    if self.add_peer(spec).is_ok() {
                        added += 1;
                    }
                }
            }
        }
        (added, gone.len(), changed)
    }

    pub fn peer_id(&self, public_key: &Key) -> Option<PeerId> {
        self.by_key.get(public_key).copied()
    }

    pub fn peer_status(&self) -> Vec<PeerStatus> {
        let mut all: Vec<PeerStatus> = self
            .peers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i, p)))
            .map(|(i, p)| PeerStatus {
                id: PeerId(i as u32),
                public_key: p.spec.public_key,
                has_preshared_key: p.spec.preshared_key.is_some(),
                endpoint: p.endpoint,
                allowed_ips: p.spec.allowed_ips.clone(),
                persistent_keepalive: p.spec.persistent_keepalive,
                since_handshake: p.tunn.time_since_last_handshake(),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                rx_packets: p.rx_packets,
                tx_packets: p.tx_packets,
            })
            .collect();
        all.sort_by_key(|s| s.id);
        all
    }

    /// The peer whose allowed IPs hold `addr`.
    pub fn route(&self, addr: IpAddr) -> Option<PeerId> {
        self.routes.lookup(addr)
    }

    fn count(&mut self, reason: DropReason) -> DropReason {
        self.counters.drops[reason.index()] += 1;
        reason
    }

    fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut buf = self.buffers.pop().unwrap_or_default();
        buf.clear();
        buf.resize(len.max(MIN_BUFFER), 0);
        buf
    }

    /// Returns a transmitted payload's buffer for reuse.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.buffers.len() < BUFFER_POOL {
            buf.clear();
            self.buffers.push(buf);
        }
    }

    fn queue(&mut self, dst: SocketAddr, mut buf: Vec<u8>, len: usize) {
        buf.truncate(len);
        self.counters.packets_to_network += 1;
        self.transmits.push_back(Transmit { dst, payload: buf });
    }

    /// The next datagram to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Where the next datagram goes and how long it is, without taking it (to batch equal-sized datagrams
    /// to one destination).
    pub fn peek_transmit(&self) -> Option<(SocketAddr, usize)> {
        self.transmits.front().map(|t| (t.dst, t.payload.len()))
    }

    /// The next completed handshake, if any.
    pub fn poll_handshake(&mut self) -> Option<Handshake> {
        self.handshakes.pop_front()
    }

    fn note_handshake(&mut self, id: PeerId, endpoint: SocketAddr, initiated_here: bool) {
        let Some(peer) = self.peers[id.0 as usize].as_ref() else { return };
        if self.handshakes.len() == HANDSHAKE_BACKLOG {
            self.handshakes.pop_front();
        }
        self.handshakes.push_back(Handshake { public_key: peer.spec.public_key, endpoint, initiated_here });
    }

    /// Starts the timers at the first moment the node hears of time, so [`Node::poll_timeout`] never has to
    /// invent one.
    pub(crate) fn arm_timer(&mut self, now: Instant) {
        self.next_timer.get_or_insert(now);
    }

    /// Encrypts an IP packet read from the TUN device toward the peer whose allowed IPs hold its destination.
    pub fn handle_tun_packet(&mut self, packet: &[u8], now: Instant) -> Result<(), DropReason> {
        self.arm_timer(now);
        let Some(dst) = destination(packet) else { return Err(self.count(DropReason::NotIp)) };
        let Some(id) = self.routes.lookup(dst) else { return Err(self.count(DropReason::NoRoute)) };
        let mut buf = self.buffer(packet.len() + OVERHEAD);
        let peer = self.peers[id.0 as usize].as_mut().expect("routes point at live peers");
        let Some(endpoint) = peer.endpoint else {
            self.recycle(buf);
            return Err(self.count(DropReason::NoEndpoint));
        };
        match peer.tunn.encapsulate(packet, &mut buf) {
            TunnResult::WriteToNetwork(out) => {
                let len = out.len();
                if is_data(&buf) {
                    peer.tx_packets += 1;
                    peer.tx_bytes += packet.len() as u64;
                }
                self.queue(endpoint, buf, len);
            }
            // Queued inside boringtun until the handshake in progress completes.
            TunnResult::Done => self.recycle(buf),
            TunnResult::Err(e) => {
                self.recycle(buf);
                return Err(self.count(from_wireguard(&e)));
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => self.recycle(buf),
        }
        Ok(())
    }

    /// Handles a datagram from the network. A decrypted packet is written to the start of `out` (which must
    /// hold at least the datagram's length); replies (handshake responses, queued packets) are queued for
    /// [`Node::poll_transmit`].
    pub fn handle_datagram(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        out: &mut [u8],
    ) -> Result<Received, DropReason> {
        self.arm_timer(now);
        let Ok(packet) = Tunn::parse_incoming_packet(datagram) else { return Err(self.count(DropReason::Malformed)) };
        // Only a data message (a keepalive, when boringtun answers Done) authenticates the sender by its
        // session key; a cookie reply is keyed by public values and proves nothing about where the peer is.
        let is_data = matches!(packet, Packet::PacketData(_));
        // A handshake message answered (not with a cookie) means a new session: the peer's initiation
        // answered by our response, or our initiation's response answered by the first keepalive.
        let handshake = match packet {
            Packet::HandshakeInit(_) => Some(false),
            Packet::HandshakeResponse(_) => Some(true),
            _ => None,
        };
        let id = match packet {
            Packet::HandshakeInit(ref init) => {
                // Check the MAC and the load before the key exchange that tells us who is calling: that
                // exchange is the expensive part an attacker would make us repeat.
                let mut cookie = [0u8; 64];
                match self.limiter.verify_packet(Some(from.ip()), datagram, &mut cookie) {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(reply)) => {
                        let len = reply.len();
                        let mut buf = self.buffer(len);
                        buf[..len].copy_from_slice(reply);
                        self.queue(from, buf, len);
                        return Err(self.count(DropReason::UnderLoad));
                    }
                    Err(_) => return Err(self.count(DropReason::HandshakeRejected)),
                }
                let Ok(half) = parse_handshake_anon(&self.secret, &self.public, init) else {
                    return Err(self.count(DropReason::HandshakeRejected));
                };
                self.by_key.get(&half.peer_static_public).copied()
            }
            Packet::HandshakeResponse(ref p) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
            Packet::PacketCookieReply(ref p) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
            Packet::PacketData(ref p) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
        };
        let Some(id) = id else { return Err(self.count(DropReason::UnknownPeer)) };
        let peer = self.peers[id.0 as usize].as_mut().expect("indices point at live peers");
        match peer.tunn.decapsulate(Some(from.ip()), datagram, out) {
            TunnResult::WriteToTunnelV4(packet, src) => self.accept(id, from, IpAddr::V4(src), packet.len()),
            TunnResult::WriteToTunnelV6(packet, src) => self.accept(id, from, IpAddr::V6(src), packet.len()),
            TunnResult::WriteToNetwork(reply) if reply.first() == Some(&COOKIE_REPLY) => {
                // boringtun is under load and answers a handshake message (whose MAC anyone can compute)
                // with a cookie: nothing is proven, so the endpoint stays and nothing queued goes there.
                let len = reply.len();
                let mut buf = self.buffer(len);
                buf[..len].copy_from_slice(reply);
                self.queue(from, buf, len);
                Err(self.count(DropReason::UnderLoad))
            }
            TunnResult::WriteToNetwork(reply) => {
                // Our handshake response to a verified initiation, or the keepalive after a verified
                // response: the peer has proven its key, so its address is where it is now.
                peer.endpoint = Some(from);
                let len = reply.len();
                let mut buf = self.buffer(len);
                buf[..len].copy_from_slice(reply);
                self.queue(from, buf, len);
                if let Some(initiated_here) = handshake {
                    self.note_handshake(id, from, initiated_here);
                }
                self.flush_queued(id);
                Ok(Received::Control)
            }
            TunnResult::Done => {
                if is_data {
                    peer.endpoint = Some(from);
                }
                Ok(Received::Control)
            }
            TunnResult::Err(e) => Err(self.count(from_wireguard(&e))),
        }
    }

    /// Accepts a decrypted packet if its source belongs to the peer that sent it.
    fn accept(&mut self, id: PeerId, from: SocketAddr, src: IpAddr, len: usize) -> Result<Received, DropReason> {
        // boringtun trusts the IPv4 length field; an authenticated peer could still send less than a header.
        let header = if src.is_ipv4() { 20 } else { 40 };
        if len < header {
            return Err(self.count(DropReason::Malformed));
        }
        if self.routes.lookup(src) != Some(id) {
            return Err(self.count(DropReason::SourceNotAllowed));
        }
        let peer = self.peers[id.0 as usize].as_mut().expect("caller checked");
        // Roaming: the latest authenticated packet says where the peer is.
        peer.endpoint = Some(from);
        peer.rx_packets += 1;
        peer.rx_bytes += len as u64;
        self.counters.packets_to_tun += 1;
        self.last_sender = Some(id);
        Ok(Received::Packet(len))
    }

    /// Sends what boringtun queued while a handshake was in progress.
    fn flush_queued(&mut self, id: PeerId) {
        let mut scratch = std::mem::take(&mut self.scratch);
        loop {
            let peer = self.peers[id.0 as usize].as_mut().expect("caller checked");
            let Some(endpoint) = peer.endpoint else { break };
            match peer.tunn.decapsulate(None, &[], &mut scratch) {
                TunnResult::WriteToNetwork(out) => {
                    let len = out.len();
                    if is_data(out) {
                        peer.tx_packets += 1;
                        peer.tx_bytes += (len - OVERHEAD) as u64;
                    }
                    let mut buf = self.buffer(len);
                    buf[..len].copy_from_slice(&scratch[..len]);
                    self.queue(endpoint, buf, len);
                }
                _ => break,
            }
        }
        self.scratch = scratch;
    }

    /// Runs handshake retries, rekeys, keepalives and the load limiter's reset.
    pub fn handle_timeout(&mut self, now: Instant) {
        // A limiter shared between peers is reset by its owner, not by each peer's timers. It keeps its own
        // one-second gate, so calling it every tick resets it once a second on its own clock.
        self.limiter.reset_count();
        let mut scratch = std::mem::take(&mut self.scratch);
        for slot in 0..self.peers.len() {
            let Some(peer) = self.peers[slot].as_mut() else { continue };
            if let TunnResult::WriteToNetwork(out) = peer.tunn.update_timers(&mut scratch) {
                let len = out.len();
                match peer.endpoint {
                    Some(endpoint) => {
                        let mut buf = self.buffer(len);
                        buf[..len].copy_from_slice(&scratch[..len]);
                        self.queue(endpoint, buf, len);
                    }
                    None => {
                        self.counters.drops[DropReason::NoEndpoint.index()] += 1;
                    }
                }
            }
        }
        self.scratch = scratch;
        self.next_timer = Some(now + TIMER_INTERVAL);
    }

    /// When [`Node::handle_timeout`] should next run: never without peers, and not before the node has
    /// been given a time (by any `handle_*` call).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.by_key.is_empty() {
            return None;
        }
        self.next_timer
    }
}

fn is_data(message: &[u8]) -> bool {
    message.first() == Some(&4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_packet::build::Builder;

    fn key(i: u8) -> Key {
        let mut k = [7u8; 32];
        k[1] = i;
        k
    }

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, i], 41641))
    }

    fn spec(i: u8, allowed: &str) -> PeerSpec {
        PeerSpec {
            public_key: Node::public_key_of(key(i)),
            preshared_key: None,
            endpoint: Some(addr(i)),
            allowed_ips: allowed.split(',').map(|s| s.parse().unwrap()).collect(),
            persistent_keepalive: None,
        }
    }

    /// Two nodes that know each other: 1 owns 100.64.0.1, 2 owns 100.64.0.2 and 10.2.0.0/16.
    fn pair() -> (Node, Node) {
        let mut a = Node::new(key(1), 1);
        let mut b = Node::new(key(2), 2);
        a.add_peer(spec(2, "100.64.0.2/32,10.2.0.0/16")).unwrap();
        b.add_peer(spec(1, "100.64.0.1/32")).unwrap();
        (a, b)
    }

    /// Delivers everything in flight until both sides are quiet; returns the packets each got for its TUN.
    fn pump(a: &mut Node, b: &mut Node) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (mut to_a, mut to_b) = (Vec::new(), Vec::new());
        let mut out = vec![0u8; 70_000];
        for _ in 0..20 {
            let mut moved = false;
            while let Some(t) = a.poll_transmit() {
                moved = true;
                if let Ok(Received::Packet(n)) = b.handle_datagram(addr(1), &t.payload, Instant::now(), &mut out) {
                    to_b.push(out[..n].to_vec());
                }
            }
            while let Some(t) = b.poll_transmit() {
                moved = true;
                if let Ok(Received::Packet(n)) = a.handle_datagram(addr(2), &t.payload, Instant::now(), &mut out) {
                    to_a.push(out[..n].to_vec());
                }
            }
            if !moved {
                break;
            }
        }
        (to_a, to_b)
    }

    fn ping(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        Builder::v4(src, dst).echo(true, 1, 1, b"hello")
    }

    #[test]
    fn a_packet_crosses_after_the_handshake_it_triggers() {
        let (mut a, mut b) = pair();
        let packet = ping([100, 64, 0, 1], [100, 64, 0, 2]);
        a.handle_tun_packet(&packet, Instant::now()).unwrap();
        let (_, to_b) = pump(&mut a, &mut b);
        assert_eq!(to_b, vec![packet], "queued during the handshake, delivered after it");
        assert!(a.peer_status()[0].since_handshake.is_some());
        assert_eq!(b.peer_status()[0].rx_packets, 1);
    }

    #[test]
    fn a_spoofed_source_is_dropped_and_counted() {
        let (mut a, mut b) = pair();
        a.handle_tun_packet(&ping([100, 64, 0, 1], [100, 64, 0, 2]), Instant::now()).unwrap();
        pump(&mut a, &mut b);
        // Node 2 sends with a source it does not own.
        b.handle_tun_packet(&ping([100, 64, 0, 9], [100, 64, 0, 1]), Instant::now()).unwrap();
        let (to_a, _) = pump(&mut a, &mut b);
        assert!(to_a.is_empty());
        assert_eq!(a.counters().dropped(DropReason::SourceNotAllowed), 1);
        // Its subnet is its own.
        b.handle_tun_packet(&ping([10, 2, 3, 4], [100, 64, 0, 1]), Instant::now()).unwrap();
        let (to_a, _) = pump(&mut a, &mut b);
        assert_eq!(to_a.len(), 1);
    }

    #[test]
    fn garbage_and_replays_are_dropped_and_counted() {
        let (mut a, mut b) = pair();
        let mut out = vec![0u8; 2048];
        for junk in [&[][..], &[1, 0, 0, 0][..], &[4; 40][..], &[9; 200][..], &[1; 148][..]] {
            assert!(a.handle_datagram(addr(2), junk, Instant::now(), &mut out).is_err());
        }
        assert!(a.counters().dropped(DropReason::Malformed) + a.counters().dropped(DropReason::HandshakeRejected) >= 4);

        a.handle_tun_packet(&ping([100, 64, 0, 1], [100, 64, 0, 2]), Instant::now()).unwrap();
        pump(&mut a, &mut b);
        a.handle_tun_packet(&ping([100, 64, 0, 1], [100, 64, 0, 2]), Instant::now()).unwrap();
        let data = a.poll_transmit().unwrap().payload;
        assert_eq!(b.handle_datagram(addr(1), &data, Instant::now(), &mut out).unwrap(), Received::Packet(33));
        assert_eq!(b.handle_datagram(addr(1), &data, Instant::now(), &mut out), Err(DropReason::DataRejected));
        let mut flipped = data.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(b.handle_datagram(addr(1), &flipped, Instant::now(), &mut out), Err(DropReason::DataRejected));
        assert_eq!(b.counters().dropped(DropReason::DataRejected), 2);
    }

    #[test]
    fn packets_without_a_route_or_endpoint_are_refused() {
        let (mut a, _) = pair();
        assert_eq!(a.handle_tun_packet(&ping([100, 64, 0, 1], [8, 8, 8, 8]), Instant::now()), Err(DropReason::NoRoute));
        assert_eq!(a.handle_tun_packet(&[0x50; 40], Instant::now()), Err(DropReason::NotIp));
        let mut c = Node::new(key(3), 3);
        c.add_peer(PeerSpec { endpoint: None, ..spec(1, "100.64.0.1/32") }).unwrap();
        assert_eq!(
            c.handle_tun_packet(&ping([100, 64, 0, 3], [100, 64, 0, 1]), Instant::now()),
            Err(DropReason::NoEndpoint)
        );
    }

    #[test]
    fn the_endpoint_follows_the_latest_authenticated_packet() {
        let (mut a, mut b) = pair();
        a.handle_tun_packet(&ping([100, 64, 0, 1], [100, 64, 0, 2]), Instant::now()).unwrap();
        pump(&mut a, &mut b);
        b.handle_tun_packet(&ping([100, 64, 0, 2], [100, 64, 0, 1]), Instant::now()).unwrap();
        let data = b.poll_transmit().unwrap().payload;
        let roamed = SocketAddr::from(([198, 51, 100, 9], 6000));
        let mut out = vec![0u8; 2048];
        a.handle_datagram(roamed, &data, Instant::now(), &mut out).unwrap();
        assert_eq!(a.peer_status()[0].endpoint, Some(roamed));
        // A forged datagram from elsewhere does not move it.
        let _ = a.handle_datagram(addr(9), &data, Instant::now(), &mut out);
        assert_eq!(a.peer_status()[0].endpoint, Some(roamed));
    }

    #[test]
    fn a_cookie_under_load_does_not_move_the_endpoint() {
        let (mut a, mut b) = pair();
        // a starts a handshake; b answers, but the answer is captured instead of delivered.
        a.handle_tun_packet(&ping([100, 64, 0, 1], [100, 64, 0, 2]), Instant::now()).unwrap();
        let init = a.poll_transmit().unwrap().payload;
        let mut out = vec![0u8; 2048];
        b.handle_datagram(addr(1), &init, Instant::now(), &mut out).unwrap();
        let response = b.poll_transmit().unwrap().payload;
        // A flood of initiations from an unknown key (their MAC needs only a's public key) puts a under load.
        let mut flooder =
            Tunn::new(StaticSecret::from(key(77)), PublicKey::from(&StaticSecret::from(key(1))), None, None, 9, None);
        let attacker = SocketAddr::from(([203, 0, 113, 66], 4444));
        for _ in 0..(HANDSHAKE_RATE_LIMIT + 10) {
            let mut dst = vec![0u8; 256];
            if let TunnResult::WriteToNetwork(init) = flooder.format_handshake_initiation(&mut dst, true) {
                let _ = a.handle_datagram(attacker, init, Instant::now(), &mut out);
            }
        }
        // The captured response, replayed from elsewhere, draws a cookie: the endpoint must not follow it.
        assert_eq!(a.handle_datagram(attacker, &response, Instant::now(), &mut out), Err(DropReason::UnderLoad));
        assert_eq!(a.peer_status()[0].endpoint, Some(addr(2)));
    }

    #[test]
    fn a_forged_cookie_reply_does_not_move_the_endpoint() {
        let (mut a, _) = pair();
        a.handle_tun_packet(&ping([100, 64, 0, 1], [100, 64, 0, 2]), Instant::now()).unwrap();
        let init = a.poll_transmit().unwrap().payload;
        // Anyone who saw the initiation and knows b's public key can make a cookie reply that a accepts.
        let forger = RateLimiter::new(&PublicKey::from(&StaticSecret::from(key(2))), 0);
        let mut cookie = [0u8; 64];
        let Err(TunnResult::WriteToNetwork(reply)) = forger.verify_packet(Some(addr(9).ip()), &init, &mut cookie)
        else {
            panic!("a limiter at zero answers with a cookie");
        };
        let reply = reply.to_vec();
        let mut out = vec![0u8; 2048];
        assert_eq!(a.handle_datagram(addr(9), &reply, Instant::now(), &mut out), Ok(Received::Control));
        assert_eq!(a.peer_status()[0].endpoint, Some(addr(2)), "the endpoint stays");
    }

    #[test]
    fn reloading_keeps_unchanged_sessions() {
        let mut a = Node::new(key(1), 1);
        let mut b = Node::new(key(2), 2);
        a.add_peer(spec(2, "100.64.0.2/32")).unwrap();
        a.add_peer(spec(3, "100.64.0.3/32")).unwrap();
        b.add_peer(spec(1, "100.64.0.1/32")).unwrap();
        a.handle_tun_packet(&ping([100, 64, 0, 1], [100, 64, 0, 2]), Instant::now()).unwrap();
        pump(&mut a, &mut b);
        assert!(a.peer_status()[0].since_handshake.is_some());

        // Peer 3 goes, peer 4 arrives, peer 2 gains a subnet: its session survives.
        let (added, removed, changed) =
            a.set_peers(vec![spec(2, "100.64.0.2/32,10.2.0.0/16"), spec(4, "100.64.0.4/32")]);
        assert_eq!((added, removed, changed), (1, 1, 1));
        assert_eq!(a.route("100.64.0.3".parse().unwrap()), None);
        assert!(a.route("10.2.9.9".parse().unwrap()).is_some());
        let two = a.peer_status().into_iter().find(|p| p.public_key == Node::public_key_of(key(2))).unwrap();
        assert!(two.since_handshake.is_some(), "the session of an updated peer survives");
        a.handle_tun_packet(&ping([100, 64, 0, 1], [100, 64, 0, 2]), Instant::now()).unwrap();
        assert!(is_data(&a.poll_transmit().unwrap().payload), "sent at once, no new handshake");
        assert_eq!(a.set_peers(vec![spec(2, "100.64.0.2/32,10.2.0.0/16"), spec(4, "100.64.0.4/32")]), (0, 0, 0));
    }

    proptest::proptest! {
        /// Arbitrary bytes, as a datagram or as a TUN packet, never panic the node, with sessions live.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let (mut a, _) = crate::fuzzing::established_pair();
            crate::fuzzing::datagram(&mut a, &data);
        }

        /// Well-formed data messages for the live session with random contents are rejected, never panic.
        #[test]
        fn forged_data_for_a_live_session_is_rejected(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 16..200)) {
            let (mut a, mut b) = crate::fuzzing::established_pair();
            b.handle_tun_packet(&ping([100, 64, 0, 2], [100, 64, 0, 1]), Instant::now()).unwrap();
            let mut real = b.poll_transmit().unwrap().payload;
            // Keep the header (type, receiver index, counter), replace the ciphertext.
            real.truncate(16);
            real.extend_from_slice(&body);
            let mut out = vec![0u8; 2048];
            proptest::prop_assert!(a.handle_datagram(addr(2), &real, Instant::now(), &mut out).is_err());
        }
    }

    #[test]
    fn a_peer_cannot_be_added_twice_or_be_ourselves() {
        let mut a = Node::new(key(1), 1);
        a.add_peer(spec(2, "100.64.0.2/32")).unwrap();
        assert_eq!(a.add_peer(spec(2, "100.64.0.2/32")), Err(PeerError::Duplicate));
        assert_eq!(a.add_peer(spec(1, "100.64.0.1/32")), Err(PeerError::OwnKey));
    }
}
