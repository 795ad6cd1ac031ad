//! UDP in the stack: associations the apps open (UDP forwards, SOCKS5 UDP ASSOCIATE), each one smoltcp UDP
//! socket on an ephemeral port of the node's address whose datagrams go back to its owner's channel; and
//! exposed UDP ports, each one smoltcp socket on the mesh port with a local tokio socket per peer endpoint,
//! connected to the app's port. Idle associations close after [`UDP_IDLE`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::udp;
use smoltcp::wire::{IpEndpoint, IpListenEndpoint};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::{Refusal, Stack};
use crate::spec::{Expose, Proto};

/// An association or an exposed peer with no datagram either way for this long is closed.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// Datagrams each direction of a UDP socket holds, and their bytes.
const UDP_SLOTS: usize = 64;
const UDP_BYTES: usize = 64 * 1024;
/// Peers at once per exposed UDP port.
const EXPOSED_PEERS: usize = 256;

/// A datagram from the mesh for an association's owner: `tag` is the app's address the owner gave.
#[derive(Debug)]
pub struct UdpReply {
    pub tag: SocketAddr,
    pub from: SocketAddr,
    pub data: Vec<u8>,
}

/// An association, valid until it closes (the handle alone may be reused by a later socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UdpId {
    handle: SocketHandle,
    serial: u64,
}

/// Why a datagram was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpError {
    /// The association closed (idle): open a new one.
    Gone,
    /// The socket's queue is full: the datagram is dropped, as UDP may.
    Full,
}

pub(super) struct Association {
    serial: u64,
    replies: mpsc::Sender<UdpReply>,
    tag: SocketAddr,
    last: Instant,
    /// A forward's association answers only from its target; a SOCKS5 one from wherever it sent to.
    pinned: bool,
    peer: Option<SocketAddr>,
}

/// One exposed UDP port on one address.
pub(super) struct ExposedUdp {
    expose: Expose,
    handle: SocketHandle,
    /// Per peer endpoint: the local socket toward the app, and when it last moved.
    peers: HashMap<IpEndpoint, (UdpSocket, Instant)>,
}

pub(super) fn udp_socket() -> udp::Socket<'static> {
    let buffer = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; UDP_SLOTS], vec![0; UDP_BYTES]);
    udp::Socket::new(buffer(), buffer())
}

fn endpoint(addr: SocketAddr) -> IpEndpoint {
    IpEndpoint::new(addr.ip().into(), addr.port())
}

fn socket_addr(endpoint: IpEndpoint) -> SocketAddr {
    SocketAddr::new(endpoint.addr.into(), endpoint.port)
}

impl Stack {
    /// What one UDP socket's buffers cost against the budget.
    pub(super) fn udp_cost() -> usize {
        2 * UDP_BYTES
    }

    /// Opens an association for datagrams to `family`'s addresses; what comes back goes to `replies` with
    /// `tag`. A `pinned` one takes answers only from the last address it sent to (a forward's target).
    pub fn udp_open(
        &mut self,
        family: IpAddr,
        replies: mpsc::Sender<UdpReply>,
        tag: SocketAddr,
        pinned: bool,
        now: Instant,
    ) -> Result<UdpId, Refusal> {
        if self.draining {
            return Err(Refusal::Draining);
        }
        if self.buffered() + Self::udp_cost() > self.limits.budget {
            self.counters.refused_budget += 1;
            return Err(Refusal::Budget);
        }
        let local = match family {
            IpAddr::V4(_) => self.v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.v6.map(IpAddr::V6),
        }
        .ok_or(Refusal::NoAddress)?;
        let port = self.local_port();
        let mut socket = udp_socket();
        socket.bind(IpListenEndpoint { addr: Some(local.into()), port }).map_err(|_| Refusal::NoAddress)?;
        let handle = self.sockets.add(socket);
        self.next_serial += 1;
        let serial = self.next_serial;
        self.associations.insert(handle, Association { serial, replies, tag, last: now, pinned, peer: None });
        self.counters.opened += 1;
        Ok(UdpId { handle, serial })
    }

    /// Sends one datagram of an association.
    pub fn udp_send(&mut self, id: UdpId, to: SocketAddr, data: &[u8], now: Instant) -> Result<(), UdpError> {
        let Some(association) = self.associations.get_mut(&id.handle).filter(|a| a.serial == id.serial) else {
            return Err(UdpError::Gone);
        };
        association.last = now;
        if association.pinned {
            association.peer = Some(to);
        }
        let socket = self.sockets.get_mut::<udp::Socket>(id.handle);
        socket.send_slice(data, endpoint(to)).map_err(|_| UdpError::Full)
    }

    /// Closes an association (its owner went away).
    pub fn udp_close(&mut self, id: UdpId) {
        if self.associations.get(&id.handle).is_some_and(|a| a.serial == id.serial) {
            self.associations.remove(&id.handle);
            self.sockets.remove(id.handle);
        }
    }

    /// Closes every association (the node's addresses changed, or the stack stops).
    pub(super) fn close_associations(&mut self) {
        for (handle, _) in self.associations.drain() {
            self.sockets.remove(handle);
        }
    }

    /// Whether an association is still open.
    pub fn udp_alive(&self, id: UdpId) -> bool {
        self.associations.get(&id.handle).is_some_and(|a| a.serial == id.serial)
    }

    /// Associations open now.
    pub fn udp_associations(&self) -> usize {
        self.associations.len()
    }

    pub(super) fn relisten_udp(&mut self) {
        for exposed in std::mem::take(&mut self.exposed_udp) {
            self.sockets.remove(exposed.handle);
        }
        if self.draining {
            return;
        }
        let addresses: Vec<IpAddr> = self.v4.map(IpAddr::V4).into_iter().chain(self.v6.map(IpAddr::V6)).collect();
        for expose in self.exposes_udp.clone() {
            for &address in &addresses {
                let mut socket = udp_socket();
                if socket.bind(IpListenEndpoint { addr: Some(address.into()), port: expose.port }).is_err() {
                    continue;
                }
                let handle = self.sockets.add(socket);
                self.exposed_udp.push(ExposedUdp { expose, handle, peers: HashMap::new() });
            }
        }
    }

    pub(super) fn set_exposed_udp(&mut self, exposes: &[Expose]) {
        self.exposes_udp = exposes.iter().filter(|e| e.proto == Proto::Udp).copied().collect();
        self.relisten_udp();
    }

    /// Moves datagrams: from the mesh to owners and exposed apps, from exposed apps to their peers; closes
    /// what has been idle.
    pub(super) fn pump_udp(&mut self, now: Instant) {
        let mut idle = Vec::new();
        for (handle, association) in &mut self.associations {
            let socket = self.sockets.get_mut::<udp::Socket>(*handle);
            while let Ok((data, meta)) = socket.recv() {
                let from = socket_addr(meta.endpoint);
                if association.pinned && association.peer != Some(from) {
                    continue;
                }
                association.last = now;
                let reply = UdpReply { tag: association.tag, from, data: data.to_vec() };
                // A full channel drops the datagram, as a full socket buffer would.
                let _ = association.replies.try_send(reply);
            }
            if association.replies.is_closed() || now.saturating_duration_since(association.last) > UDP_IDLE {
                idle.push(*handle);
            }
        }
        for handle in idle {
            self.associations.remove(&handle);
            self.sockets.remove(handle);
        }
        for exposed in &mut self.exposed_udp {
            let socket = self.sockets.get_mut::<udp::Socket>(exposed.handle);
            while let Ok((data, meta)) = socket.recv() {
                let peer = meta.endpoint;
                if !exposed.peers.contains_key(&peer) {
                    if exposed.peers.len() >= EXPOSED_PEERS {
                        self.counters.refused_budget += 1;
                        continue;
                    }
                    match connected_local(exposed.expose.local) {
                        Ok(local) => {
                            exposed.peers.insert(peer, (local, now));
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "an exposed UDP port's local socket");
                            continue;
                        }
                    }
                }
                if let Some((local, last)) = exposed.peers.get_mut(&peer) {
                    *last = now;
                    // Straight to the kernel: tokio knows a new socket is writable only after its driver
                    // has run, and a full socket buffer drops the datagram either way.
                    let _ = socket2::SockRef::from(&*local).send(data);
                }
            }
            let mut buf = [0u8; 65_535];
            for (peer, (local, last)) in &mut exposed.peers {
                while socket.can_send() {
                    match local.try_recv(&mut buf) {
                        Ok(n) => {
                            *last = now;
                            let _ = socket.send_slice(&buf[..n], *peer);
                        }
                        Err(_) => break,
                    }
                }
            }
            exposed.peers.retain(|_, (_, last)| now.saturating_duration_since(*last) <= UDP_IDLE);
        }
    }

    /// Ready when an exposed UDP port's app answered something its socket has room for.
    pub(super) fn poll_ready_udp(&self, cx: &mut Context<'_>) -> Poll<()> {
        for exposed in &self.exposed_udp {
            if !self.sockets.get::<udp::Socket>(exposed.handle).can_send() {
                continue;
            }
            for (local, _) in exposed.peers.values() {
                if local.poll_recv_ready(cx).is_ready() {
                    return Poll::Ready(());
                }
            }
        }
        Poll::Pending
    }

    /// When the next idle association or exposed peer closes.
    pub(super) fn udp_deadline(&self) -> Option<Instant> {
        let associations = self.associations.values().map(|a| a.last);
        let peers = self.exposed_udp.iter().flat_map(|e| e.peers.values().map(|(_, last)| *last));
        associations.chain(peers).min().map(|last| last + UDP_IDLE + Duration::from_millis(10))
    }
}

/// A local socket toward an exposed app, connected so only the app's answers arrive.
fn connected_local(app: SocketAddr) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = if app.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("an address");
    let socket = std::net::UdpSocket::bind(any)?;
    socket.connect(app)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}
