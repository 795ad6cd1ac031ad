//! The Linux shell's I/O: the TUN device, UDP sockets that carry meshd's mark, and routes, rules and
//! addresses over rtnetlink. Nothing here decides anything; `meshd` wires it to the sans-IO node.
#![forbid(unsafe_code)]

pub mod manager;
pub mod netlink;
pub mod plan;
pub mod socket;
pub mod sysctl;
pub mod tun;

/// The Linux policy-routing contract (design.md §3): which table holds mesh routes, which mark meshd's own
/// traffic carries so it never loops into the mesh, and the priorities of the rules that route by both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingPolicy {
    pub table: u32,
    pub fwmark: u32,
    pub fwmask: u32,
    /// Marked traffic: look up `main`, then `default`, then nothing (unreachable).
    pub marked_main: u32,
    pub marked_default: u32,
    pub marked_unreachable: u32,
    /// Everything else: look up the mesh table.
    pub lookup_table: u32,
}

impl Default for RoutingPolicy {
    fn default() -> Self {
        Self {
            table: 52,
            fwmark: 0x80000,
            fwmask: 0xff0000,
            marked_main: 5210,
            marked_default: 5230,
            marked_unreachable: 5250,
            lookup_table: 5270,
        }
    }
}

impl RoutingPolicy {
    pub fn priorities(&self) -> [u32; 4] {
        [self.marked_main, self.marked_default, self.marked_unreachable, self.lookup_table]
    }
}

/// The routing-protocol number on every route meshd installs, so `ip route show proto 88` lists exactly
/// meshd's routes and leftovers from a crash are recognisable.
pub const ROUTE_PROTOCOL: u8 = 88;
