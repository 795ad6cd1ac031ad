//! The Linux shell's I/O: the TUN device, UDP sockets that carry meshd's mark, and routes, rules and
//! addresses over rtnetlink. What it decides is about the kernel's state only: the route plan (`plan`, pure)
//! and the route manager's pacing of repairs; every decision about packets is the data plane's.
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
    /// The policy for a table, a mark and the first rule priority (`--table`, `--fwmark`,
    /// `--rule-priority`): the rules follow 20 apart, and the mask covers the mark byte by byte (0x80000 ->
    /// 0xff0000, as Tailscale's).
    pub fn new(table: u32, fwmark: u32, rule_priority: u32) -> Self {
        let fwmask = (0..4).map(|i| 0xffu32 << (i * 8)).filter(|byte| fwmark & byte != 0).fold(0, |a, b| a | b);
        Self {
            table,
            fwmark,
            fwmask,
            marked_main: rule_priority,
            marked_default: rule_priority + 20,
            marked_unreachable: rule_priority + 40,
            lookup_table: rule_priority + 60,
        }
    }

    pub fn priorities(&self) -> [u32; 4] {
        [self.marked_main, self.marked_default, self.marked_unreachable, self.lookup_table]
    }
}

/// The routing-protocol number on every route meshd installs, so `ip route show proto 88` lists exactly
/// meshd's routes and leftovers from a crash are recognisable.
pub const ROUTE_PROTOCOL: u8 = 88;
