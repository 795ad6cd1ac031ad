//! Why the data plane refused a packet or datagram: one list for the WireGuard node, the router and the SNAT
//! engine, each with a stable name for logs and metrics and its own counter.

use std::fmt;

use mesh_packet::snat;

/// Why a packet or datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A datagram that is no WireGuard message (wrong type or length).
    Malformed,
    /// A well-formed message for a session index or public key we do not know.
    UnknownPeer,
    /// A handshake message that failed authentication or was replayed.
    HandshakeRejected,
    /// A handshake refused because of load; a cookie reply was sent instead.
    UnderLoad,
    /// A data message that failed decryption, or a replayed or too-old counter.
    DataRejected,
    /// A data message for a session that no longer exists.
    NoSession,
    /// A decrypted packet whose source is outside the sending peer's allowed IPs, or an ICMP error quoting
    /// a flow of another peer's.
    SourceNotAllowed,
    /// A packet that is not IPv4 or IPv6.
    NotIp,
    /// A packet from the TUN device for a destination no peer's allowed IPs cover.
    NoRoute,
    /// A packet for a peer with no known endpoint.
    NoEndpoint,
    /// From the mesh, for a destination that is neither this node nor a route it serves (or one no router
    /// forwards: multicast, broadcast, loopback, link-local, unspecified).
    NotRouted,
    /// From the mesh, for a destination that leads back into the mesh (another peer, the SNAT address): a
    /// router does not relay between peers.
    Hairpin,
    /// From the mesh, a packet no router forwards on any path: source-routed (IPv4 LSRR/SSRR options, an
    /// IPv6 routing header with segments left) or for a served IPv4 prefix's directed-broadcast address.
    Unforwardable,
    /// Refused by the SNAT engine (its own counters hold the detail).
    Snat(snat::DropReason),
    /// From the mesh, a packet that would open a flow the ACL policy does not allow.
    AclDenied,
    /// From the mesh, a packet of no tracked flow that cannot open one (TCP other than a SYN, an echo reply
    /// or ICMP error for nothing this side sent), while the policy has rules.
    AclNoFlow,
    /// From the mesh, a flow the policy allows but the full connection tracker could not hold.
    AclTableFull,
    /// From the mesh, a packet the ACL filter cannot read, while the policy has rules.
    AclUnreadable,
    /// To the resolver's address, a packet that is not a DNS query, or a query past the bound on queries
    /// waiting for an upstream.
    NotDns,
}

impl From<mesh_packet::filter::Drop> for DropReason {
    fn from(d: mesh_packet::filter::Drop) -> Self {
        match d {
            mesh_packet::filter::Drop::Denied => DropReason::AclDenied,
            mesh_packet::filter::Drop::NoFlow => DropReason::AclNoFlow,
            mesh_packet::filter::Drop::TableFull => DropReason::AclTableFull,
            mesh_packet::filter::Drop::Unreadable => DropReason::AclUnreadable,
        }
    }
}

impl DropReason {
    /// How many counters a full set of drop counts needs (every SNAT reason shares one).
    pub const COUNT: usize = 19;

    /// Each reason once (SNAT represented by one of its reasons, whose name is the SNAT engine's), for
    /// listing counters.
    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::Malformed,
        DropReason::UnknownPeer,
        DropReason::HandshakeRejected,
        DropReason::UnderLoad,
        DropReason::DataRejected,
        DropReason::NoSession,
        DropReason::SourceNotAllowed,
        DropReason::NotIp,
        DropReason::NoRoute,
        DropReason::NoEndpoint,
        DropReason::NotRouted,
        DropReason::Hairpin,
        DropReason::Unforwardable,
        DropReason::Snat(snat::DropReason::Unsolicited),
        DropReason::AclDenied,
        DropReason::AclNoFlow,
        DropReason::AclTableFull,
        DropReason::AclUnreadable,
        DropReason::NotDns,
    ];

    /// The slot of this reason's counter.
    pub fn index(self) -> usize {
        match self {
            DropReason::Malformed => 0,
            DropReason::UnknownPeer => 1,
            DropReason::HandshakeRejected => 2,
            DropReason::UnderLoad => 3,
            DropReason::DataRejected => 4,
            DropReason::NoSession => 5,
            DropReason::SourceNotAllowed => 6,
            DropReason::NotIp => 7,
            DropReason::NoRoute => 8,
            DropReason::NoEndpoint => 9,
            DropReason::NotRouted => 10,
            DropReason::Hairpin => 11,
            DropReason::Unforwardable => 12,
            DropReason::Snat(_) => 13,
            DropReason::AclDenied => 14,
            DropReason::AclNoFlow => 15,
            DropReason::AclTableFull => 16,
            DropReason::AclUnreadable => 17,
            DropReason::NotDns => 18,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::HandshakeRejected => "handshake_rejected",
            DropReason::UnderLoad => "under_load",
            DropReason::DataRejected => "data_rejected",
            DropReason::NoSession => "no_session",
            DropReason::SourceNotAllowed => "source_not_allowed",
            DropReason::NotIp => "not_ip",
            DropReason::NoRoute => "no_route",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::NotRouted => "not_routed",
            DropReason::Hairpin => "hairpin",
            DropReason::Unforwardable => "unforwardable",
            DropReason::Snat(reason) => reason.name(),
            DropReason::AclDenied => "acl_denied",
            DropReason::AclNoFlow => "acl_no_flow",
            DropReason::AclTableFull => "acl_table_full",
            DropReason::AclUnreadable => "acl_unreadable",
            DropReason::NotDns => "not_dns",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_slot_and_name() {
        let mut slots: Vec<usize> = DropReason::ALL.iter().map(|r| r.index()).collect();
        slots.dedup();
        assert_eq!(slots, (0..DropReason::COUNT).collect::<Vec<_>>());
        let mut names: Vec<&str> = DropReason::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT);
        assert_eq!(DropReason::Snat(snat::DropReason::Unsolicited).index(), DropReason::ALL[13].index());
    }
}
