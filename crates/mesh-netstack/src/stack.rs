//! The TCP/IP stack of userspace mode: one smoltcp interface and its sockets, owned by the daemon's loop
//! (no second task, no channel per packet). Packets from the data plane are handed in as slices and read in
//! place; packets the stack sends go out through the caller's sink straight into the data plane. Every app
//! connection (a forward, the proxies, an exposed port) is one smoltcp socket paired with one tokio socket,
//! and bytes move between the two with the socket rings' own closures: from the app's socket into smoltcp's
//! send ring, and from smoltcp's receive ring into the app's socket, with no buffer in between.
//!
//! The loop waits on [`Stack::ready`] (an app socket that can move bytes, or a local connection made for an
//! exposed port), on packets, and on [`Stack::poll_at`]; it never spins: an app socket is only watched in the
//! direction its smoltcp ring has room for.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::spec::Expose;

mod udp;

pub use udp::{UDP_IDLE, UdpError, UdpId, UdpReply};

/// Sizes and bounds, all settable; the defaults fit a sidecar under a 128 MiB limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Each flow's receive ring, which is also its largest TCP window (256 KiB ≈ 200 Mbit/s at 10 ms).
    pub rx_buffer: usize,
    /// Each flow's send ring.
    pub tx_buffer: usize,
    /// All rings together may not pass this; a flow past it is refused and counted.
    pub budget: usize,
    /// Connections still opening (ours waiting for a SYN-ACK, exposed ones waiting for the local port).
    pub max_opening: usize,
    /// Idle time before a keepalive probe; a peer that answers none for [`Limits::timeout`] is given up.
    pub keepalive: Duration,
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            rx_buffer: 256 * 1024,
            tx_buffer: 128 * 1024,
            budget: 48 * 1024 * 1024,
            max_opening: 256,
            keepalive: Duration::from_secs(60),
            timeout: Duration::from_secs(180),
        }
    }
}

/// What the app hears before the flow's bytes, once the mesh side has opened (or failed to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Greeting {
    /// A forward: nothing; a failure closes the app's connection with a reset.
    Silent,
    /// A SOCKS5 CONNECT: the reply with the address used.
    Socks5,
    /// An HTTP CONNECT: `200`, or `504`.
    HttpConnect,
    /// A plain HTTP request: nothing (the origin answers), or `504`.
    HttpPlain,
}

/// Why a flow was refused before it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The buffer budget is spent.
    Budget,
    /// Too many connections are still opening.
    Opening,
    /// The node has no mesh address of the target's family yet.
    NoAddress,
    /// The stack stops taking new flows (the daemon is draining).
    Draining,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Budget => "the flow buffer budget is spent",
            Refusal::Opening => "too many connections are opening",
            Refusal::NoAddress => "this node has no mesh address of that family yet",
            Refusal::Draining => "meshd is stopping",
        })
    }
}

/// Counters for `status` and the benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub opened: u64,
    pub inbound: u64,
    pub refused_budget: u64,
    pub refused_opening: u64,
    pub failed: u64,
    pub closed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Ours: waiting for the SYN-ACK. Exposed: waiting for the local connection.
    Opening,
    Open,
}

struct Flow {
    /// `None` while an exposed port's local connection is still being made.
    stream: Option<TcpStream>,
    serial: u64,
    greeting: Greeting,
    phase: Phase,
    opened_at: Instant,
    /// Bytes for the app before the peer's (a proxy's reply), and how many went.
    to_app: Vec<u8>,
    to_app_sent: usize,
    /// Bytes for the peer before the app's (a plain HTTP request head).
    to_peer: Vec<u8>,
    to_peer_sent: usize,
    /// The app closed its sending side (or failed): FIN the peer once the ring is empty.
    app_done: bool,
    /// The peer's FIN was passed on to the app.
    peer_done: bool,
    /// A refused or failed flow: it ends once the app has heard why.
    ending: bool,
    /// The socket closed cleanly with bytes the app has not taken: they are in `to_app`, then the app's
    /// stream ends.
    finishing: bool,
    /// The peer sent its FIN (a reset or a timeout never set this).
    peer_fin: bool,
    inbound: bool,
}

impl Flow {
    fn new(stream: Option<TcpStream>, greeting: Greeting, inbound: bool, serial: u64, now: Instant) -> Self {
        Flow {
            stream,
            serial,
            greeting,
            phase: Phase::Opening,
            opened_at: now,
            to_app: Vec::new(),
            to_app_sent: 0,
            to_peer: Vec::new(),
            to_peer_sent: 0,
            app_done: false,
            peer_done: false,
            ending: false,
            finishing: false,
            peer_fin: false,
            inbound,
        }
    }

    /// Whether the app's socket should be watched for bytes to read: only while smoltcp's ring has room.
    fn wants_read(&self, socket: &tcp::Socket) -> bool {
        self.phase == Phase::Open
            && !self.app_done
            && !self.ending
            && !self.finishing
            && socket.may_send()
            && socket.send_queue() < socket.send_capacity()
            && self.to_peer_sent == self.to_peer.len()
    }

    fn wants_write(&self, socket: &tcp::Socket) -> bool {
        self.to_app_sent < self.to_app.len() || (self.phase == Phase::Open && socket.can_recv())
    }
}

/// One exposed port's listening sockets on one of the node's addresses.
struct Listener {
    expose: Expose,
    address: IpAddr,
    handles: Vec<SocketHandle>,
}

/// Listening sockets per exposed port and address: smoltcp has no backlog, so this many handshakes can be
/// under way at once; each one taken is replaced at once.
const BACKLOG: usize = 4;
/// How long an exposed port's local connection or one of ours may take to open.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Ports our connections come from.
const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;

/// The result of connecting to an exposed port's local socket.
type Connected = (SocketHandle, u64, io::Result<TcpStream>);

pub struct Stack {
    iface: Interface,
    sockets: SocketSet<'static>,
    flows: HashMap<SocketHandle, Flow>,
    listeners: Vec<Listener>,
    exposes: Vec<Expose>,
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
    limits: Limits,
    mtu: usize,
    epoch: Instant,
    /// Where [`TxToken`]s build each packet before the sink takes it (one buffer, reused).
    scratch: Vec<u8>,
    next_port: u16,
    next_serial: u64,
    connected_tx: mpsc::UnboundedSender<Connected>,
    connected_rx: mpsc::UnboundedReceiver<Connected>,
    counters: Counters,
    draining: bool,
    /// Sockets of finished flows, removed once their last packet (a reset) is out.
    retiring: Vec<SocketHandle>,
    associations: HashMap<SocketHandle, udp::Association>,
    exposes_udp: Vec<Expose>,
    exposed_udp: Vec<udp::ExposedUdp>,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("flows", &self.flows.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// The interface's device for one call: at most one packet in, every packet out through `sink`.
struct Link<'a, F> {
    inbound: Option<&'a [u8]>,
    scratch: &'a mut Vec<u8>,
    sink: &'a mut F,
    mtu: usize,
}

struct Rx<'a>(&'a [u8]);

struct Tx<'a, F> {
    scratch: &'a mut Vec<u8>,
    sink: &'a mut F,
}

impl smoltcp::phy::RxToken for Rx<'_> {
    fn consume<R, G: FnOnce(&[u8]) -> R>(self, f: G) -> R {
        f(self.0)
    }
}

impl<F: FnMut(&mut [u8])> smoltcp::phy::TxToken for Tx<'_, F> {
    fn consume<R, G: FnOnce(&mut [u8]) -> R>(self, len: usize, f: G) -> R {
        if self.scratch.len() < len {
            self.scratch.resize(len, 0);
        }
        let packet = &mut self.scratch[..len];
        let result = f(packet);
        (self.sink)(packet);
        result
    }
}

impl<F: FnMut(&mut [u8])> Device for Link<'_, F> {
    type RxToken<'b>
        = Rx<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b, F>
    where
        Self: 'b;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.inbound.take()?;
        Some((Rx(packet), Tx { scratch: self.scratch, sink: self.sink }))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(Tx { scratch: self.scratch, sink: self.sink })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

fn no_sink(_: &mut [u8]) {}

impl Stack {
    /// `seed` must be random (initial sequence numbers and the first port come from it).
    pub fn new(mtu: u16, limits: Limits, now: Instant, seed: u64) -> Self {
        let mtu = usize::from(mtu);
        let mut scratch = Vec::with_capacity(mtu);
        let mut sink = no_sink;
        let mut link = Link { inbound: None, scratch: &mut scratch, sink: &mut sink, mtu };
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = seed;
        let mut iface = Interface::new(config, &mut link, smoltcp::time::Instant::ZERO);
        // Every destination is accepted: a flow to any mesh address and port ends here, and the data plane
        // has already decided which packets reach the node at all.
        iface.set_any_ip(true);
        let (connected_tx, connected_rx) = mpsc::unbounded_channel();
        Stack {
            iface,
            sockets: SocketSet::new(Vec::new()),
            flows: HashMap::new(),
            listeners: Vec::new(),
            exposes: Vec::new(),
            v4: None,
            v6: None,
            limits,
            mtu,
            epoch: now,
            scratch,
            next_port: EPHEMERAL.start() + (seed % u64::from(EPHEMERAL.end() - EPHEMERAL.start())) as u16,
            next_serial: 0,
            connected_tx,
            connected_rx,
            counters: Counters::default(),
            draining: false,
            retiring: Vec::new(),
            associations: HashMap::new(),
            exposes_udp: Vec::new(),
            exposed_udp: Vec::new(),
        }
    }

    fn smol(&self, now: Instant) -> smoltcp::time::Instant {
        let micros = now.saturating_duration_since(self.epoch).as_micros();
        smoltcp::time::Instant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    /// The node's mesh addresses (from the netmap): flows come from them, exposed ports listen on them.
    pub fn set_addresses(&mut self, addresses: &[IpAddr]) {
        let v4 = addresses.iter().find_map(|a| match a {
            IpAddr::V4(v) => Some(*v),
            IpAddr::V6(_) => None,
        });
        let v6 = addresses.iter().find_map(|a| match a {
            IpAddr::V6(v) => Some(*v),
            IpAddr::V4(_) => None,
        });
        if (v4, v6) == (self.v4, self.v6) {
            return;
        }
        self.v4 = v4;
        self.v6 = v6;
        self.iface.update_ip_addrs(|addrs| {
            addrs.clear();
            if let Some(v4) = v4 {
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(v4), 32));
            }
            if let Some(v6) = v6 {
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(v6), 128));
            }
        });
        // Everything goes back into the data plane, which routes it; with an IP medium the gateway is unused.
        let routes = self.iface.routes_mut();
        routes.remove_default_ipv4_route();
        routes.remove_default_ipv6_route();
        if let Some(v4) = v4 {
            let _ = routes.add_default_ipv4_route(v4);
        }
        if let Some(v6) = v6 {
            let _ = routes.add_default_ipv6_route(v6);
        }
        self.relisten();
        self.relisten_udp();
        // Associations keep the address they were bound to: their owners open new ones on their next datagram.
        self.close_associations();
    }

    /// Ports peers may open (`--expose`); every other port answers with a reset.
    pub fn set_exposed(&mut self, exposes: &[Expose]) {
        self.exposes = exposes.iter().filter(|e| e.proto == crate::spec::Proto::Tcp).copied().collect();
        self.relisten();
        self.set_exposed_udp(exposes);
    }

    fn new_socket(&self) -> tcp::Socket<'static> {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; self.limits.rx_buffer]),
            tcp::SocketBuffer::new(vec![0; self.limits.tx_buffer]),
        );
        // Proxied flows carry requests and replies (SQL, Redis) that must leave at once; the app's own stack
        // already coalesced what it wrote.
        socket.set_nagle_enabled(false);
        socket.set_congestion_control(tcp::CongestionControl::Cubic);
        socket.set_keep_alive(Some(self.limits.keepalive.into()));
        socket.set_timeout(Some(self.limits.timeout.into()));
        socket
    }

    fn flow_cost(&self) -> usize {
        self.limits.rx_buffer + self.limits.tx_buffer
    }

    /// Buffers held now: every flow's and listening socket's rings, every UDP socket's queues.
    pub fn buffered(&self) -> usize {
        self.sockets
            .iter()
            .map(|(_, socket)| match socket {
                smoltcp::socket::Socket::Udp(_) => Self::udp_cost(),
                _ => self.flow_cost(),
            })
            .sum()
    }

    fn room_for_one(&self) -> bool {
        self.buffered() + self.flow_cost() <= self.limits.budget
    }

    fn opening(&self) -> usize {
        self.flows.values().filter(|f| f.phase == Phase::Opening).count()
    }

    /// Puts the exposed ports' listening sockets on the current addresses (old ones that took no connection
    /// go away).
    fn relisten(&mut self) {
        for listener in std::mem::take(&mut self.listeners) {
            for handle in listener.handles {
                self.sockets.remove(handle);
            }
        }
        if self.draining {
            return;
        }
        let addresses: Vec<IpAddr> = self.v4.map(IpAddr::V4).into_iter().chain(self.v6.map(IpAddr::V6)).collect();
        for expose in self.exposes.clone() {
            for &address in &addresses {
                let mut listener = Listener { expose, address, handles: Vec::new() };
                for _ in 0..BACKLOG {
                    if let Some(handle) = self.listen_one(address, expose.port) {
                        listener.handles.push(handle);
                    }
                }
                self.listeners.push(listener);
            }
        }
    }

    fn listen_one(&mut self, address: IpAddr, port: u16) -> Option<SocketHandle> {
        let mut socket = self.new_socket();
        // The SYN-ACK waits until the app's local port answered: a closed one is a reset, as in the kernel.
        socket.pause_synack(true);
        socket.listen(IpListenEndpoint { addr: Some(address.into()), port }).ok()?;
        Some(self.sockets.add(socket))
    }

    fn local_port(&mut self) -> u16 {
        let tcp =
            self.flows.keys().filter_map(|h| self.sockets.get::<tcp::Socket>(*h).local_endpoint().map(|e| e.port));
        let udp =
            self.associations.keys().map(|h| self.sockets.get::<smoltcp::socket::udp::Socket>(*h).endpoint().port);
        let used: std::collections::HashSet<u16> = tcp.chain(udp).collect();
        loop {
            let port = self.next_port;
            self.next_port = if port == *EPHEMERAL.end() { *EPHEMERAL.start() } else { port + 1 };
            if !used.contains(&port) {
                return port;
            }
        }
    }

    /// Opens a flow from the app's `stream` to `remote` across the mesh. `to_peer` goes first (a rewritten
    /// request head). The app hears `greeting` once the peer answers.
    pub fn connect(
        &mut self,
        stream: TcpStream,
        remote: SocketAddr,
        greeting: Greeting,
        to_peer: Vec<u8>,
        now: Instant,
    ) -> Result<(), (Refusal, TcpStream)> {
        let refusal = if self.draining {
            Some(Refusal::Draining)
        } else if !self.room_for_one() {
            self.counters.refused_budget += 1;
            Some(Refusal::Budget)
        } else if self.opening() >= self.limits.max_opening {
            self.counters.refused_opening += 1;
            Some(Refusal::Opening)
        } else {
            None
        };
        let local: Option<IpAddr> = match remote.ip() {
            IpAddr::V4(_) => self.v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.v6.map(IpAddr::V6),
        };
        let (local, refusal) = match (local, refusal) {
            (_, Some(r)) => (None, Some(r)),
            (None, None) => (None, Some(Refusal::NoAddress)),
            (Some(l), None) => (Some(l), None),
        };
        if let Some(refusal) = refusal {
            return Err((refusal, stream));
        }
        let local = local.expect("checked");
        let port = self.local_port();
        let mut socket = self.new_socket();
        if socket
            .connect(
                self.iface.context(),
                IpEndpoint::new(remote.ip().into(), remote.port()),
                (IpAddress::from(local), port),
            )
            .is_err()
        {
            return Err((Refusal::NoAddress, stream));
        }
        let handle = self.sockets.add(socket);
        self.next_serial += 1;
        let mut flow = Flow::new(Some(stream), greeting, false, self.next_serial, now);
        flow.to_peer = to_peer;
        self.flows.insert(handle, flow);
        self.counters.opened += 1;
        Ok(())
    }

    /// A packet from the data plane for this node.
    pub fn receive(&mut self, packet: &[u8], now: Instant, sink: &mut impl FnMut(&mut [u8])) {
        let at = self.smol(now);
        let mut link = Link { inbound: Some(packet), scratch: &mut self.scratch, sink, mtu: self.mtu };
        self.iface.poll_ingress_single(at, &mut link, &mut self.sockets);
    }

    /// Moves bytes between the apps and the stack, and sends what is due; call after every wake-up.
    pub fn poll(&mut self, now: Instant, sink: &mut impl FnMut(&mut [u8])) {
        while let Ok((handle, serial, result)) = self.connected_rx.try_recv() {
            self.connected(handle, serial, result);
        }
        self.take_accepted(now);
        self.pump(now);
        self.pump_udp(now);
        let at = self.smol(now);
        let mut link = Link { inbound: None, scratch: &mut self.scratch, sink, mtu: self.mtu };
        self.iface.poll(at, &mut link, &mut self.sockets);
        // What the egress pass freed (acknowledged bytes) can take more from the apps at once.
        self.pump(now);
        let mut link = Link { inbound: None, scratch: &mut self.scratch, sink, mtu: self.mtu };
        self.iface.poll_egress(at, &mut link, &mut self.sockets);
        for handle in self.retiring.drain(..) {
            self.sockets.remove(handle);
        }
    }

    /// When [`Stack::poll`] must run next even without a packet or an app.
    pub fn poll_at(&mut self, now: Instant) -> Option<Instant> {
        let stack = self.iface.poll_at(self.smol(now), &self.sockets).map(|at| {
            let micros = u64::try_from(at.total_micros()).unwrap_or(0);
            self.epoch + Duration::from_micros(micros)
        });
        [stack, self.udp_deadline()].into_iter().flatten().min()
    }

    /// Ready when an app socket can move bytes the stack has room for, or an exposed port's local connection
    /// was made. Registers for wake-ups otherwise.
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Poll::Ready(Some((handle, serial, result))) = self.connected_rx.poll_recv(cx) {
            self.connected(handle, serial, result);
            return Poll::Ready(());
        }
        for (handle, flow) in &self.flows {
            let Some(stream) = &flow.stream else { continue };
            let socket = self.sockets.get::<tcp::Socket>(*handle);
            if flow.wants_read(socket) && stream.poll_read_ready(cx).is_ready() {
                return Poll::Ready(());
            }
            if flow.wants_write(socket) && stream.poll_write_ready(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        self.poll_ready_udp(cx)
    }

    /// [`Stack::poll_ready`] as a future.
    pub async fn ready(&mut self) {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await
    }

    /// Listening sockets that took a connection become flows; a fresh listener takes each one's place.
    fn take_accepted(&mut self, now: Instant) {
        let mut taken = Vec::new();
        for (index, listener) in self.listeners.iter().enumerate() {
            for (slot, handle) in listener.handles.iter().enumerate() {
                let socket = self.sockets.get::<tcp::Socket>(*handle);
                if socket.state() != State::Listen {
                    taken.push((index, slot, *handle));
                }
            }
        }
        // Last first, so removing a slot never shifts one still to be replaced.
        for (index, slot, handle) in taken.into_iter().rev() {
            let (address, expose) = (self.listeners[index].address, self.listeners[index].expose);
            match self.listen_one(address, expose.port) {
                Some(fresh) => self.listeners[index].handles[slot] = fresh,
                None => {
                    self.listeners[index].handles.remove(slot);
                }
            }
            // Over the budget (the listener's own rings count already): the new connection is reset.
            if self.buffered() > self.limits.budget || self.opening() >= self.limits.max_opening {
                self.counters.refused_budget += 1;
                self.sockets.get_mut::<tcp::Socket>(handle).abort();
                self.flows.insert(handle, Flow { ending: true, ..Flow::new(None, Greeting::Silent, true, 0, now) });
                continue;
            }
            self.next_serial += 1;
            let serial = self.next_serial;
            let remote = self.sockets.get::<tcp::Socket>(handle).remote_endpoint();
            tracing::debug!(port = expose.port, local = %expose.local, remote = ?remote, "a peer opens an exposed port");
            self.flows.insert(handle, Flow::new(None, Greeting::Silent, true, serial, now));
            self.counters.inbound += 1;
            let done = self.connected_tx.clone();
            let local = expose.local;
            tokio::spawn(async move {
                let result = match tokio::time::timeout(OPEN_TIMEOUT, TcpStream::connect(local)).await {
                    Ok(r) => r,
                    Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")),
                };
                let _ = done.send((handle, serial, result));
            });
        }
    }

    fn connected(&mut self, handle: SocketHandle, serial: u64, result: io::Result<TcpStream>) {
        let Some(flow) = self.flows.get_mut(&handle).filter(|f| f.serial == serial) else { return };
        match result {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                // Open once the peer's handshake is complete too (see `pump_flow`).
                flow.stream = Some(stream);
                self.sockets.get_mut::<tcp::Socket>(handle).pause_synack(false);
            }
            Err(e) => {
                tracing::debug!(error = %e, "an exposed port's local socket refused");
                self.counters.failed += 1;
                self.sockets.get_mut::<tcp::Socket>(handle).abort();
                flow.ending = true;
            }
        }
    }

    fn pump(&mut self, now: Instant) {
        let mut finished = Vec::new();
        for (handle, flow) in &mut self.flows {
            let socket = self.sockets.get_mut::<tcp::Socket>(*handle);
            if pump_flow(flow, socket, now) {
                finished.push(*handle);
            }
        }
        for handle in finished {
            let state = self.sockets.get::<tcp::Socket>(handle).state();
            if let Some(flow) = self.flows.get(&handle) {
                tracing::debug!(%state, inbound = flow.inbound, app_done = flow.app_done, peer_done = flow.peer_done, ending = flow.ending, "flow over");
            }
            self.flows.remove(&handle);
            // Removed after the next egress pass, so a reset it owes the peer still goes out.
            self.retiring.push(handle);
            self.counters.closed += 1;
        }
    }

    /// No new flows: the exposed ports close. Flows that are open go on until they end.
    pub fn stop_accepting(&mut self) {
        self.draining = true;
        self.relisten();
        self.relisten_udp();
    }

    /// Ends every flow at once (the drain time is up): apps and peers get resets, not a clean end of a
    /// stream they did not finish. Poll once more to send them.
    pub fn abort_all(&mut self) {
        for (handle, flow) in self.flows.drain() {
            if let Some(stream) = &flow.stream {
                reset(stream);
            }
            self.sockets.get_mut::<tcp::Socket>(handle).abort();
            self.retiring.push(handle);
        }
        self.close_associations();
    }

    /// Flows open now.
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }
}

/// How opening a flow to the peer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opened {
    Yes,
    /// The peer reset it (a closed port) or it failed at once.
    Refused,
    /// No answer within [`OPEN_TIMEOUT`] (the ACL drops it, or the peer is gone).
    TimedOut,
}

/// The greeting's bytes for the app: success with the local address used, or the failure in the app's
/// protocol's words.
fn greeting_bytes(greeting: Greeting, opened: Opened, socket: &tcp::Socket) -> Vec<u8> {
    use crate::socks5::Reply;
    match (greeting, opened) {
        (Greeting::Silent, _) | (Greeting::HttpPlain, Opened::Yes) => Vec::new(),
        (Greeting::Socks5, _) => {
            let bound = socket
                .local_endpoint()
                .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |e| SocketAddr::new(e.addr.into(), e.port));
            let code = match opened {
                Opened::Yes => Reply::Succeeded,
                Opened::Refused => Reply::ConnectionRefused,
                Opened::TimedOut => Reply::HostUnreachable,
            };
            crate::socks5::reply(code, bound)
        }
        (Greeting::HttpConnect, Opened::Yes) => crate::http::response(200, ""),
        (_, Opened::Refused) => crate::http::response(502, "the mesh target refused the connection"),
        (_, Opened::TimedOut) => crate::http::response(504, "the mesh target did not answer"),
    }
}

/// A reset for the app (linger 0), so a failed or reset flow is not mistaken for a clean end.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Moves what it can for one flow; `true` when the flow is over.
fn pump_flow(flow: &mut Flow, socket: &mut tcp::Socket, now: Instant) -> bool {
    // An exposed port's flow waits for its local connection; ours for the peer's SYN-ACK. Either opens only
    // once the handshake with the peer is complete: before that the socket can neither send nor receive, which
    // would read as the peer having closed.
    if flow.phase == Phase::Opening && flow.inbound && flow.stream.is_none() && !flow.ending {
        // A SYN followed by a reset puts a listening socket back to listening: that flow is over too.
        return matches!(socket.state(), State::Closed | State::Listen);
    }
    if flow.phase == Phase::Opening {
        let opened = match socket.state() {
            State::Established | State::CloseWait => Some(Opened::Yes),
            State::Closed | State::Listen => Some(Opened::Refused),
            _ if now.saturating_duration_since(flow.opened_at) > OPEN_TIMEOUT => {
                socket.abort();
                Some(Opened::TimedOut)
            }
            _ => None,
        };
        match opened {
            Some(Opened::Yes) => {
                flow.phase = Phase::Open;
                flow.to_app = greeting_bytes(flow.greeting, Opened::Yes, socket);
            }
            Some(failed) => {
                flow.to_app = greeting_bytes(flow.greeting, failed, socket);
                flow.ending = true;
                if let (Greeting::Silent, Some(stream)) = (flow.greeting, &flow.stream) {
                    reset(stream);
                }
            }
            None => {}
        }
    }
    let Some(stream) = &flow.stream else { return socket.state() == State::Closed || flow.ending };
    if matches!(socket.state(), State::CloseWait | State::LastAck | State::Closing | State::TimeWait) {
        flow.peer_fin = true;
    }

    // Peer to app: what is owed first (a greeting, or the rest of a closed stream), then the receive ring
    // straight into the app's socket.
    let mut app_broken = false;
    while flow.to_app_sent < flow.to_app.len() {
        match stream.try_write(&flow.to_app[flow.to_app_sent..]) {
            Ok(n) => flow.to_app_sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => {
                app_broken = true;
                break;
            }
        }
    }
    let delivered = flow.to_app_sent == flow.to_app.len();
    if flow.ending {
        // A refused or failed flow: done once the app has heard why.
        return delivered || app_broken;
    }
    if flow.finishing {
        // The socket is gone; the app gets the last bytes, then the end of the stream.
        if delivered && !app_broken {
            let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
        }
        return delivered || app_broken;
    }
    if delivered && flow.phase == Phase::Open {
        while socket.can_recv() && !app_broken {
            let moved = socket.recv(|data| match stream.try_write(data) {
                Ok(n) => (n, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => (0, 0),
                Err(_) => {
                    app_broken = true;
                    (0, 0)
                }
            });
            if !matches!(moved, Ok(n) if n > 0) {
                break;
            }
        }
        if !flow.peer_done && flow.peer_fin && socket.recv_queue() == 0 && socket.state() != State::Closed {
            // The peer's FIN: the app reads its end of the stream.
            let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
            flow.peer_done = true;
        }
    }

    // App to peer: a pending request head first, then the app's socket straight into the send ring.
    if flow.phase == Phase::Open && socket.may_send() && !app_broken {
        while flow.to_peer_sent < flow.to_peer.len() {
            match socket.send_slice(&flow.to_peer[flow.to_peer_sent..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => flow.to_peer_sent += n,
            }
        }
        // Twice at most: the free space may wrap around the end of the ring.
        for _ in 0..2 {
            if !flow.wants_read(socket) {
                break;
            }
            let read = socket.send(|room| match stream.try_read(room) {
                Ok(0) => (0, Some(Ok(()))),
                Ok(n) => (n, None),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => (0, Some(Err(false))),
                Err(_) => (0, Some(Err(true))),
            });
            match read {
                Ok(None) => {}
                // The app's end of the stream: FIN after what the ring still holds.
                Ok(Some(Ok(()))) => {
                    flow.app_done = true;
                    break;
                }
                // The app's connection failed (reset): the peer must not take it for a clean end.
                Ok(Some(Err(true))) => {
                    app_broken = true;
                    break;
                }
                Ok(Some(Err(false))) | Err(_) => break,
            }
        }
        if flow.app_done {
            socket.close();
        }
    }

    if app_broken {
        socket.abort();
        reset(stream);
        return true;
    }
    match socket.state() {
        State::Closed | State::TimeWait => {
            if !flow.peer_fin {
                // Reset by the peer, or timed out: the app must not take it for a clean end.
                reset(stream);
                return true;
            }
            // Closed cleanly. What the ring still holds moves to a buffer of the flow's own (smoltcp empties the
            // ring when TIME-WAIT ends), and the flow lasts until the app has it.
            let mut rest = Vec::new();
            while let Ok(n) = socket.recv(|data| {
                rest.extend_from_slice(data);
                (data.len(), data.len())
            }) {
                if n == 0 {
                    break;
                }
            }
            if rest.is_empty() && flow.peer_done {
                return true;
            }
            flow.to_app = rest;
            flow.to_app_sent = 0;
            flow.finishing = true;
            false
        }
        _ => false,
    }
}
