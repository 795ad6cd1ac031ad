//! UDP sockets for WireGuard traffic. They carry the policy mark so the routing rules send meshd's own
//! encrypted packets through the main table, never back into the mesh.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

/// Opens a UDP socket on `port` (0 picks one) for one address family, with `SO_MARK` set.
pub fn bind_marked(v6: bool, port: u16, mark: u32) -> io::Result<UdpSocket> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    // Mark 0 is no mark: userspace mode routes nothing into the mesh, so its traffic cannot loop, and it
    // has no CAP_NET_ADMIN to set one.
    if mark != 0 {
        socket.set_mark(mark).map_err(|e| with_context(e, "setting SO_MARK (needs CAP_NET_ADMIN)"))?;
    }
    if v6 {
        // One socket per family: the IPv4 socket owns IPv4 traffic on this port.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Large buffers absorb bursts while the single event loop is busy encrypting.
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    let addr: SocketAddr = if v6 { (Ipv6Addr::UNSPECIFIED, port).into() } else { (Ipv4Addr::UNSPECIFIED, port).into() };
    socket.bind(&addr.into()).map_err(|e| with_context(e, &format!("binding UDP {addr}")))?;
    UdpSocket::from_std(socket.into())
}

fn with_context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}
