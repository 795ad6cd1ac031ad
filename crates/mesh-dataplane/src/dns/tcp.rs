//! DNS over TCP at the resolver's addresses (RFC 7766), for clients that got a truncated UDP answer. A
//! small smoltcp interface owns just those addresses: the data plane hands it the TCP packets sent to them
//! and writes what it sends back into the TUN device. Messages are framed with their two-byte length;
//! answers may leave out of order, as the RFC allows.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpListenEndpoint};

/// Connections served at once per resolver address; a client past them is refused (its SYN reset) and
/// can retry.
const SOCKETS_PER_ADDRESS: usize = 4;
/// A connection with nothing going on is closed after this (RFC 7766 suggests seconds).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest DNS message plus its length prefix.
const MAX_FRAME: usize = 2 + 65_535;

/// Packets in and out of the interface, as owned buffers.
#[derive(Debug, Default)]
struct Queue {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl smoltcp::phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0; len];
        let result = f(&mut packet);
        self.0.push_back(packet);
        result
    }
}

impl Device for Queue {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((Rx(packet), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

/// One listening socket and the connection it serves.
struct Conn {
    handle: SocketHandle,
    listen: IpListenEndpoint,
    /// Bytes received and not yet a whole message.
    inbox: Vec<u8>,
    /// Grows with every new connection on the socket, so a late answer never reaches the next client.
    serial: u64,
    /// Answers still owed to this connection (forwarded queries).
    owed: usize,
    /// When the connection last moved (bytes in, an answer out), for the idle close.
    last: Instant,
}

/// A whole query read from a connection.
#[derive(Debug)]
pub(crate) struct TcpQuery {
    pub conn: usize,
    pub serial: u64,
    pub message: Vec<u8>,
}

pub(crate) struct TcpServer {
    iface: Interface,
    device: Queue,
    sockets: SocketSet<'static>,
    conns: Vec<Conn>,
    epoch: Instant,
    next_poll: Option<Instant>,
    /// Whole queries read and not yet taken.
    ready: VecDeque<TcpQuery>,
}

impl std::fmt::Debug for TcpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpServer").field("connections", &self.conns.len()).finish_non_exhaustive()
    }
}

impl TcpServer {
    /// Listens on port 53 of `addresses`. Each address gets its family's whole mesh range as on-link, so the
    /// answers go straight back to whichever mesh address asked.
    /// `first_serial` continues the serials of the server this one replaces, so an answer owed to a
    /// connection of the old one never matches a connection of the new one.
    pub fn new(addresses: &[IpAddr], mtu: u16, now: Instant, first_serial: u64) -> Self {
        let mut device = Queue { mtu: usize::from(mtu), ..Queue::default() };
        let epoch = now;
        let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut device, smol(epoch, now));
        iface.update_ip_addrs(|addrs| {
            for address in addresses {
                let prefix = if address.is_ipv4() { 10 } else { 48 };
                let _ = addrs.push(IpCidr::new(IpAddress::from(*address), prefix));
            }
        });
        let mut server = TcpServer {
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            conns: Vec::new(),
            epoch,
            next_poll: None,
            ready: VecDeque::new(),
        };
        for address in addresses {
            for _ in 0..SOCKETS_PER_ADDRESS {
                let listen = IpListenEndpoint { addr: Some(IpAddress::from(*address)), port: 53 };
                let handle = server.sockets.add(socket());
                server.conns.push(Conn { handle, listen, inbox: Vec::new(), serial: first_serial, owed: 0, last: now });
            }
        }
        server.relisten();
        server
    }

    /// A TCP packet to one of the resolver's addresses; the queries it completes wait in
    /// [`TcpServer::next_query`].
    pub fn handle_packet(&mut self, packet: &[u8], now: Instant) {
        self.device.rx.push_back(packet.to_vec());
        self.poll(now);
    }

    /// Timers: retransmissions, the idle close.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_poll.is_some_and(|t| t <= now) {
            self.poll(now);
        }
    }

    pub fn next_query(&mut self) -> Option<TcpQuery> {
        self.ready.pop_front()
    }

    /// Past every serial this server has used.
    pub fn next_serial(&self) -> u64 {
        self.conns.iter().map(|c| c.serial).max().unwrap_or(0) + 1
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_poll
    }

    /// Sends `answer` (none: nothing to say, the query is only settled) on connection `conn` if it is still
    /// the one that asked.
    pub fn answer(&mut self, conn: usize, serial: u64, answer: Option<&[u8]>, now: Instant) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        if c.serial != serial {
            return;
        }
        c.owed = c.owed.saturating_sub(1);
        c.last = now;
        let socket = self.sockets.get_mut::<tcp::Socket>(c.handle);
        if let Some(answer) = answer
            && let Ok(len) = u16::try_from(answer.len())
            // A frame goes out whole or not at all: a client cannot read half of one.
            && socket.may_send()
            && socket.send_capacity() - socket.send_queue() >= answer.len() + 2
        {
            let _ = socket.send_slice(&len.to_be_bytes());
            let _ = socket.send_slice(answer);
        }
        self.poll(now);
    }

    /// Packets the interface sent: write them to the TUN device.
    pub fn take_outgoing(&mut self) -> impl Iterator<Item = Vec<u8>> + '_ {
        self.device.tx.drain(..)
    }

    fn poll(&mut self, now: Instant) {
        let at = smol(self.epoch, now);
        // A connection's idle time starts when it opens, not when its socket began to listen.
        for c in &mut self.conns {
            if self.sockets.get::<tcp::Socket>(c.handle).state() == tcp::State::Listen {
                c.last = now;
            }
        }
        self.iface.poll(at, &mut self.device, &mut self.sockets);
        let mut idle_deadline: Option<Instant> = None;
        for (i, c) in self.conns.iter_mut().enumerate() {
            let socket = self.sockets.get_mut::<tcp::Socket>(c.handle);
            while socket.can_recv() && c.inbox.len() < MAX_FRAME {
                let mut buf = [0u8; 2048];
                let room = buf.len().min(MAX_FRAME - c.inbox.len());
                match socket.recv_slice(&mut buf[..room]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        c.inbox.extend_from_slice(&buf[..n]);
                        c.last = now;
                    }
                }
            }
            while c.inbox.len() >= 2 {
                let len = usize::from(u16::from_be_bytes([c.inbox[0], c.inbox[1]]));
                if c.inbox.len() < 2 + len {
                    break;
                }
                let message = c.inbox[2..2 + len].to_vec();
                c.inbox.drain(..2 + len);
                c.owed += 1;
                self.ready.push_back(TcpQuery { conn: i, serial: c.serial, message });
            }
            // The client finished sending and has every answer: close our side too. A connection idle past
            // the limit (or whose client sent more than a frame can hold) is closed as well.
            let done = socket.state() == tcp::State::CloseWait && c.owed == 0;
            let idle = socket.state() == tcp::State::Established
                && c.owed == 0
                && now.saturating_duration_since(c.last) >= IDLE_TIMEOUT;
            if done || idle || c.inbox.len() >= MAX_FRAME {
                socket.close();
            } else if socket.state() == tcp::State::Established && c.owed == 0 {
                let deadline = c.last + IDLE_TIMEOUT;
                idle_deadline = Some(idle_deadline.map_or(deadline, |d| d.min(deadline)));
            }
        }
        self.relisten();
        // Answers just queued and closes go out now rather than at the next timer.
        self.iface.poll(at, &mut self.device, &mut self.sockets);
        let stack = self
            .iface
            .poll_at(at, &self.sockets)
            .map(|t| self.epoch + Duration::from_micros(u64::try_from(t.total_micros()).unwrap_or(0)));
        self.next_poll = [stack, idle_deadline].into_iter().flatten().min();
    }

    /// Sockets whose connection ended listen again, with a new serial.
    fn relisten(&mut self) {
        for c in &mut self.conns {
            let socket = self.sockets.get_mut::<tcp::Socket>(c.handle);
            if socket.state() == tcp::State::Closed {
                c.serial += 1;
                c.inbox.clear();
                c.owed = 0;
                let _ = socket.listen(c.listen);
            }
        }
    }
}

fn socket() -> tcp::Socket<'static> {
    // Queries are small and read as they come; answers need room for the largest frame.
    let mut socket =
        tcp::Socket::new(tcp::SocketBuffer::new(vec![0; 4096]), tcp::SocketBuffer::new(vec![0; MAX_FRAME]));
    // A client that stops acknowledging is dropped rather than held for ever.
    socket.set_timeout(Some(smoltcp::time::Duration::from_secs(IDLE_TIMEOUT.as_secs())));
    socket.set_nagle_enabled(false);
    socket
}

fn smol(epoch: Instant, now: Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(
        i64::try_from(now.saturating_duration_since(epoch).as_micros()).unwrap_or(i64::MAX),
    )
}
