//! What a node does with packets that are not simply its own: the subnet-router path.
//!
//! From the mesh, a decrypted packet is delivered if it is for one of the node's own addresses, forwarded if
//! its destination lies in one of the routes this node serves (SNAT'd to the SNAT address unless that route
//! preserves sources), and dropped otherwise: a router is not an open relay. Toward the mesh, packets
//! addressed to the SNAT address are replies and are translated back. TCP SYNs crossing in either direction
//! get their MSS clamped to the tunnel.

use std::net::IpAddr;
use std::time::Instant;

use ipnet::IpNet;
use mesh_packet::mss;
use mesh_packet::snat::{self, Snat};
use mesh_packet::wire::{self, destination};

use crate::DropReason;
use crate::routes::PrefixTable;

/// A route this node serves, and whether traffic into it is SNAT'd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub prefix: IpNet,
    pub snat: bool,
}

/// What to do with a packet from the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromMesh {
    /// For this node.
    Local,
    /// Forwarded into a served route (rewritten if SNAT applies).
    Forwarded,
}

#[derive(Debug)]
pub struct Router {
    own: Vec<IpAddr>,
    served: PrefixTable<bool>,
    /// The broadcast addresses of the served IPv4 prefixes (/30 and wider): never forwarded into.
    broadcasts: Vec<IpAddr>,
    snat: Option<Snat>,
    mtu: u16,
}

impl Router {
    /// `own`: the node's mesh addresses; `served`: the routes it forwards into; `snat`: the engine, needed if
    /// any served route SNATs; `mtu`: the tunnel MTU for MSS clamping.
    pub fn new(own: Vec<IpAddr>, served: &[Served], snat: Option<Snat>, mtu: u16) -> Self {
        let mut router = Self { own, served: PrefixTable::default(), broadcasts: Vec::new(), snat, mtu };
        router.set_served(served);
        router
    }

    /// Replaces the addresses that count as this node: every address of the host, not only its mesh
    /// addresses, since a packet to any of them is delivered here rather than forwarded.
    pub fn set_own(&mut self, own: Vec<IpAddr>) {
        self.own = own;
    }

    /// Replaces the routes this node forwards into (a managed node's approvals change); flows already
    /// translated keep their SNAT state.
    pub fn set_served(&mut self, served: &[Served]) {
        let mut table = PrefixTable::default();
        for s in served {
            table.insert(s.prefix, s.snat);
        }
        self.served = table;
        self.broadcasts = served
            .iter()
            .filter_map(|s| match s.prefix {
                IpNet::V4(v4) if v4.prefix_len() <= 30 => Some(IpAddr::V4(v4.broadcast())),
                _ => None,
            })
            .collect();
    }

    /// Replaces the SNAT engine (a changed `--snat-address`); existing translations are dropped with it.
    pub fn set_snat(&mut self, snat: Option<Snat>) {
        self.snat = snat;
    }

    pub fn snat(&self) -> Option<&Snat> {
        self.snat.as_ref()
    }

    /// Where a packet from the mesh for `dst` would go: `None` to this host, `Some(snat)` forwarded into a
    /// served route (with SNAT or not), or why it goes nowhere. The ACL filter asks first, so that a packet
    /// the router refuses anyway opens no flow.
    pub fn destination(&self, dst: IpAddr, into_mesh: impl Fn(IpAddr) -> bool) -> Result<Option<bool>, DropReason> {
        if self.own.contains(&dst) {
            return Ok(None);
        }
        if !forwardable(dst) {
            return Err(DropReason::NotRouted);
        }
        if into_mesh(dst) || self.snat.as_ref().is_some_and(|s| s.is_snat_address(dst)) {
            return Err(DropReason::Hairpin);
        }
        self.served.lookup(dst).map(Some).ok_or(DropReason::NotRouted)
    }

    /// Decides on a decrypted packet from a peer, rewriting it in place when it is forwarded with SNAT.
    /// `into_mesh` says whether a destination is routed to a peer (the node's allowed-IPs table).
    pub fn from_mesh(
        &mut self,
        packet: &mut [u8],
        now: Instant,
        sender: Option<u64>,
        into_mesh: impl Fn(IpAddr) -> bool,
    ) -> Result<FromMesh, DropReason> {
        let dst = destination(packet).ok_or(DropReason::NotIp)?;
        match self.destination(dst, into_mesh)? {
            None => Ok(FromMesh::Local),
            Some(snat_on) => self.forward(packet, dst, snat_on, now, sender).map(|()| FromMesh::Forwarded),
        }
    }

    /// Forwards a packet [`Router::destination`] sent into a served route: refuses what no router forwards,
    /// clamps SYNs, and SNATs (charged to `sender`) when the route says so.
    pub fn forward(
        &mut self,
        packet: &mut [u8],
        dst: IpAddr,
        snat_on: bool,
        now: Instant,
        sender: Option<u64>,
    ) -> Result<(), DropReason> {
        // A directed broadcast would reach every host of a LAN with one packet; a routing header would steer
        // a packet past the router. The SNAT engine refuses source routing when it parses; the path that
        // keeps sources parses only here.
        if self.broadcasts.contains(&dst) || (!snat_on && may_route_itself(packet) && wire::parse(packet).is_err()) {
            return Err(DropReason::Unforwardable);
        }
        mss::clamp(packet, self.mtu);
        if snat_on {
            let engine = self.snat.as_mut().ok_or(DropReason::Snat(snat::DropReason::NoAddressForFamily))?;
            // Charged to the sending peer, whatever source addresses its allowed IPs let it use.
            match sender {
                Some(peer) => engine.outbound_from(packet, now, peer),
                None => engine.outbound(packet, now),
            }
            .map_err(DropReason::Snat)?;
        }
        Ok(())
    }

    /// Prepares a packet read from the TUN device for the mesh: replies to the SNAT address are translated
    /// back to the mesh client; forwarded SYNs are clamped.
    pub fn to_mesh(&mut self, packet: &mut [u8], now: Instant) -> Result<(), DropReason> {
        let dst = destination(packet).ok_or(DropReason::NotIp)?;
        if let Some(engine) = self.snat.as_mut()
            && engine.is_snat_address(dst)
        {
            engine.inbound(packet, now).map_err(DropReason::Snat)?;
        }
        mss::clamp(packet, self.mtu);
        Ok(())
    }

    /// When the SNAT engine next has translations to expire.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.snat.as_ref().and_then(Snat::poll_timeout)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(engine) = self.snat.as_mut() {
            engine.handle_timeout(now);
        }
    }
}

/// Whether a packet carries IPv4 options or IPv6 extension headers, the places source routing hides: only
/// those are parsed on the keep-source path, plain packets pass on one byte's look.
fn may_route_itself(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => packet[0] & 0x0f != 5,
        Some(6) => !matches!(packet.get(6), Some(6 | 17 | 58)),
        _ => true,
    }
}

/// Whether a router may forward to `dst` at all.
fn forwardable(dst: IpAddr) -> bool {
    match dst {
        IpAddr::V4(a) => {
            !(a.is_multicast() || a.is_broadcast() || a.is_loopback() || a.is_link_local() || a.is_unspecified())
        }
        IpAddr::V6(a) => !(a.is_multicast() || a.is_loopback() || a.is_unicast_link_local() || a.is_unspecified()),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use mesh_packet::build::Builder;
    use mesh_packet::snat::SnatConfig;
    use mesh_packet::wire::TCP_SYN;

    use super::*;

    fn router() -> Router {
        let snat = Snat::new(SnatConfig::new(Some(Ipv4Addr::new(10, 0, 12, 9)), None), Instant::now()).unwrap();
        let served = [
            Served { prefix: "10.0.0.0/16".parse().unwrap(), snat: true },
            Served { prefix: "10.42.0.0/16".parse().unwrap(), snat: false },
        ];
        Router::new(vec!["100.64.0.1".parse().unwrap()], &served, Some(snat), 1420)
    }

    /// `packet` (IPv4, no options) with an 8-byte loose-source-route option added to its header.
    fn with_source_route(packet: &[u8]) -> Vec<u8> {
        let mut out = packet[..20].to_vec();
        out.extend_from_slice(&[0x83, 7, 4, 10, 0, 0, 9, 0]);
        out.extend_from_slice(&packet[20..]);
        out[0] = 0x47;
        let total = out.len() as u16;
        out[2..4].copy_from_slice(&total.to_be_bytes());
        out[10..12].copy_from_slice(&[0, 0]);
        let sum: u32 = out[..28].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
        let folded = (sum & 0xffff) + (sum >> 16);
        out[10..12].copy_from_slice(&(!((folded & 0xffff) + (folded >> 16)) as u16).to_be_bytes());
        out
    }

    #[test]
    fn source_routed_and_directed_broadcast_packets_are_refused_on_both_paths() {
        let mut r = router();
        let now = Instant::now();
        let none = |_: IpAddr| false;
        for dst in [[10, 42, 255, 255], [10, 0, 255, 255]] {
            let mut broadcast = Builder::v4([100, 64, 0, 2], dst).udp(5000, 9, b"x");
            assert_eq!(r.from_mesh(&mut broadcast, now, None, none), Err(DropReason::Unforwardable), "{dst:?}");
        }
        for dst in [[10, 42, 1, 5], [10, 0, 12, 50]] {
            let plain = Builder::v4([100, 64, 0, 2], dst).udp(5000, 53, b"q");
            let mut routed = with_source_route(&plain);
            let refused = r.from_mesh(&mut routed, now, None, none);
            assert!(
                matches!(refused, Err(DropReason::Unforwardable) | Err(DropReason::Snat(_))),
                "{dst:?}: {refused:?}"
            );
        }
        let mut ordinary = Builder::v4([100, 64, 0, 2], [10, 42, 1, 5]).udp(5000, 53, b"q");
        assert_eq!(r.from_mesh(&mut ordinary, now, None, none), Ok(FromMesh::Forwarded));
    }

    #[test]
    fn routes_snats_preserves_and_refuses() {
        let mut r = router();
        let now = Instant::now();
        let none = |_: IpAddr| false;
        let mut local = Builder::v4([100, 64, 0, 2], [100, 64, 0, 1]).echo(true, 1, 1, b"");
        assert_eq!(r.from_mesh(&mut local, now, None, none), Ok(FromMesh::Local));

        let mut to_vpc = Builder::v4([100, 64, 0, 2], [10, 0, 12, 50]).tcp(40000, 443, TCP_SYN, b"");
        assert_eq!(r.from_mesh(&mut to_vpc, now, None, none), Ok(FromMesh::Forwarded));
        assert_eq!(&to_vpc[12..16], &[10, 0, 12, 9], "SNAT'd");
        let ext = u16::from_be_bytes([to_vpc[20], to_vpc[21]]);

        let mut to_pods = Builder::v4([100, 64, 0, 2], [10, 42, 1, 5]).udp(5000, 53, b"q");
        assert_eq!(r.from_mesh(&mut to_pods, now, None, none), Ok(FromMesh::Forwarded));
        assert_eq!(&to_pods[12..16], &[100, 64, 0, 2], "source preserved");

        let mut elsewhere = Builder::v4([100, 64, 0, 2], [8, 8, 8, 8]).udp(5000, 53, b"q");
        assert_eq!(r.from_mesh(&mut elsewhere, now, None, none), Err(DropReason::NotRouted));

        // No relaying between peers: a served destination another peer owns, or the SNAT address itself.
        let peer_owns_10_0_7 = |a: IpAddr| matches!(a, IpAddr::V4(v) if v.octets()[..3] == [10, 0, 7]);
        let mut to_peer = Builder::v4([100, 64, 0, 2], [10, 0, 7, 1]).udp(1, 2, b"");
        assert_eq!(r.from_mesh(&mut to_peer, now, None, peer_owns_10_0_7), Err(DropReason::Hairpin));
        let mut to_snat = Builder::v4([100, 64, 0, 2], [10, 0, 12, 9]).udp(1, 2, b"");
        assert_eq!(r.from_mesh(&mut to_snat, now, None, none), Err(DropReason::Hairpin));
        for special in [[224, 0, 0, 1], [255, 255, 255, 255], [127, 0, 0, 1], [169, 254, 1, 1]] {
            let mut p = Builder::v4([100, 64, 0, 2], special).udp(1, 2, b"");
            assert_eq!(r.from_mesh(&mut p, now, None, none), Err(DropReason::NotRouted), "{special:?}");
        }

        let mut reply = Builder::v4([10, 0, 12, 50], [10, 0, 12, 9]).tcp(443, ext, TCP_SYN | 0x10, b"");
        r.to_mesh(&mut reply, now).unwrap();
        assert_eq!(&reply[16..20], &[100, 64, 0, 2], "translated back");
        let mut unsolicited = Builder::v4([10, 0, 12, 66], [10, 0, 12, 9]).tcp(443, 999, TCP_SYN, b"");
        assert!(matches!(r.to_mesh(&mut unsolicited, now), Err(DropReason::Snat(snat::DropReason::Unsolicited))));
    }

    #[test]
    fn served_routes_change_at_run_time() {
        let mut r = router();
        let now = Instant::now();
        let none = |_: IpAddr| false;
        r.set_served(&[Served { prefix: "10.42.0.0/16".parse().unwrap(), snat: false }]);
        let mut to_vpc = Builder::v4([100, 64, 0, 2], [10, 0, 12, 50]).udp(5000, 53, b"q");
        assert_eq!(r.from_mesh(&mut to_vpc, now, None, none), Err(DropReason::NotRouted), "no longer served");
        let mut to_pods = Builder::v4([100, 64, 0, 2], [10, 42, 1, 5]).udp(5000, 53, b"q");
        assert_eq!(r.from_mesh(&mut to_pods, now, None, none), Ok(FromMesh::Forwarded));
        r.set_served(&[]);
        assert_eq!(r.from_mesh(&mut to_pods, now, None, none), Err(DropReason::NotRouted));
    }
}
