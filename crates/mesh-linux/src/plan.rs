//! What the mesh routing table should hold, and what to change to get there. Pure: the manager dumps the
//! kernel's state, calls [`plan`], and applies the result, so every decision here is unit-tested.

use std::collections::BTreeSet;

use ipnet::IpNet;

use crate::ROUTE_PROTOCOL;

/// A route meshd wants in its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Route {
    /// `prefix dev <tun>`: into the mesh.
    Mesh(IpNet),
    /// `throw prefix`: leave the mesh table, so the main table (the LAN) decides.
    Throw(IpNet),
}

impl Route {
    pub fn prefix(&self) -> IpNet {
        match self {
            Route::Mesh(p) | Route::Throw(p) => *p,
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Mesh(p) => write!(f, "{p}"),
            Route::Throw(p) => write!(f, "throw {p}"),
        }
    }
}

/// A route found in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub prefix: IpNet,
    pub throw: bool,
    pub oif: Option<u32>,
    /// Name of the output device, when the dump could tell it.
    pub device: Option<String>,
    pub protocol: u8,
}

impl Entry {
    /// Installed by this meshd: its protocol number, and not through another live device (a second meshd
    /// on another TUN device uses the same number). A route through a device that is gone is a leftover.
    pub fn is_ours(&self, tun_index: u32) -> bool {
        self.protocol == ROUTE_PROTOCOL && (self.oif.is_none_or(|i| i == tun_index) || self.device.is_none())
    }

    /// The route this entry is, if meshd installed it through `tun_index`.
    fn as_route(&self, tun_index: u32) -> Option<Route> {
        if !self.is_ours(tun_index) {
            return None;
        }
        if self.throw {
            Some(Route::Throw(self.prefix))
        } else if self.oif == Some(tun_index) {
            Some(Route::Mesh(self.prefix))
        } else {
            None
        }
    }
}

/// An accepted prefix left out because it would take over part of a local network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub accepted: IpNet,
    pub local: IpNet,
}

/// The routes to install for `accepted` prefixes (peers' allowed IPs, accepted subnet routes), given the
/// host's `local` prefixes (directly connected subnets and its own advertised routes).
///
/// LAN-aware acceptance: an accepted prefix that contains a local one is installed with a `throw` route for
/// the local prefix, so the LAN stays on the LAN and the rest goes through the mesh. An accepted prefix equal
/// to or inside a local one is not installed at all: the LAN wins.
pub fn desired(accepted: impl IntoIterator<Item = IpNet>, local: &[IpNet]) -> (BTreeSet<Route>, Vec<Skipped>) {
    let mut routes = BTreeSet::new();
    let mut skipped = Vec::new();
    for prefix in accepted.into_iter().map(|p| p.trunc()) {
        if let Some(l) = local.iter().find(|l| l.contains(&prefix)) {
            skipped.push(Skipped { accepted: prefix, local: *l });
            continue;
        }
        routes.insert(Route::Mesh(prefix));
        for l in local.iter().filter(|l| prefix.contains(*l)) {
            routes.insert(Route::Throw(l.trunc()));
        }
    }
    (routes, skipped)
}

/// The difference between the table and what it should be.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub add: Vec<Route>,
    /// Entries meshd installed that are no longer wanted (or duplicates).
    pub remove: Vec<Entry>,
    /// Routes in the table that another program installed: meshd neither removes nor shadows them.
    pub foreign: Vec<Entry>,
    /// Wanted routes left out because a foreign route holds the same prefix.
    pub conflicts: Vec<Route>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

pub fn plan(desired: &BTreeSet<Route>, table: &[Entry], tun_index: u32) -> Plan {
    let mut plan = Plan::default();
    let mut present = BTreeSet::new();
    for entry in table {
        if !entry.is_ours(tun_index) {
            plan.foreign.push(entry.clone());
            continue;
        }
        match entry.as_route(tun_index) {
            Some(route) if desired.contains(&route) && present.insert(route) => {}
            // Not wanted, a duplicate, or through a device that no longer exists.
            _ => plan.remove.push(entry.clone()),
        }
    }
    let held: BTreeSet<IpNet> = plan.foreign.iter().map(|e| e.prefix).collect();
    let (conflicts, add): (Vec<Route>, Vec<Route>) =
        desired.difference(&present).copied().partition(|r| held.contains(&r.prefix()));
    plan.add = add;
    plan.conflicts = conflicts;
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ours(prefix: &str, oif: u32) -> Entry {
        Entry { prefix: net(prefix), throw: false, oif: Some(oif), device: None, protocol: ROUTE_PROTOCOL }
    }

    #[test]
    fn an_accepted_route_around_the_lan_gets_a_throw_for_the_lan() {
        let (routes, skipped) = desired([net("10.0.0.0/16"), net("100.64.0.2/32")], &[net("10.0.5.0/24")]);
        assert_eq!(
            routes,
            BTreeSet::from([
                Route::Mesh(net("10.0.0.0/16")),
                Route::Mesh(net("100.64.0.2/32")),
                Route::Throw(net("10.0.5.0/24"))
            ])
        );
        assert!(skipped.is_empty());
    }

    #[test]
    fn an_accepted_route_inside_or_equal_to_the_lan_is_left_out() {
        let lan = [net("10.0.5.0/24"), net("192.168.1.0/24")];
        let (routes, skipped) = desired([net("10.0.5.128/25"), net("192.168.1.0/24"), net("10.9.0.0/16")], &lan);
        assert_eq!(routes, BTreeSet::from([Route::Mesh(net("10.9.0.0/16"))]));
        assert_eq!(skipped.len(), 2);
        assert_eq!(skipped[0], Skipped { accepted: net("10.0.5.128/25"), local: net("10.0.5.0/24") });
    }

    #[test]
    fn a_default_route_throws_every_local_prefix() {
        let lan = [net("10.0.5.0/24"), net("fd00:5::/64")];
        let (routes, _) = desired([net("0.0.0.0/0"), net("::/0")], &lan);
        assert!(routes.contains(&Route::Throw(net("10.0.5.0/24"))));
        assert!(routes.contains(&Route::Throw(net("fd00:5::/64"))));
        assert_eq!(routes.len(), 4);
    }

    #[test]
    fn the_plan_adds_what_is_missing_and_removes_only_our_stale_routes() {
        let (want, _) = desired([net("100.64.0.2/32"), net("10.0.0.0/16")], &[]);
        let table = vec![
            ours("100.64.0.2/32", 7),
            ours("100.64.0.2/32", 7), // a duplicate left by a crash
            ours("100.64.0.9/32", 7), // no longer wanted
            ours("100.64.0.3/32", 3), // through a device that is gone
            Entry {
                prefix: net("100.100.100.100/32"),
                throw: false,
                oif: Some(9),
                device: Some("tailscale0".into()),
                protocol: 3,
            },
        ];
        let p = plan(&want, &table, 7);
        assert_eq!(p.add, vec![Route::Mesh(net("10.0.0.0/16"))]);
        let removed: Vec<String> = p.remove.iter().map(|e| e.prefix.to_string()).collect();
        assert_eq!(removed, ["100.64.0.2/32", "100.64.0.9/32", "100.64.0.3/32"]);
        assert_eq!(p.foreign.len(), 1, "another program's route is reported, not touched");
    }

    #[test]
    fn another_meshd_and_another_program_are_left_alone() {
        let (want, _) = desired([net("10.0.0.0/16"), net("100.64.0.2/32")], &[]);
        let other_meshd = Entry { device: Some("mesh1".into()), ..ours("100.64.0.9/32", 9) };
        let foreign =
            Entry { prefix: net("10.0.0.0/16"), throw: false, oif: Some(4), device: Some("eth0".into()), protocol: 3 };
        let p = plan(&want, &[other_meshd.clone(), foreign.clone()], 7);
        assert!(p.remove.is_empty(), "another meshd's route through its live device is not stale: {p:?}");
        assert_eq!(p.foreign, vec![other_meshd, foreign]);
        assert_eq!(p.add, vec![Route::Mesh(net("100.64.0.2/32"))]);
        assert_eq!(p.conflicts, vec![Route::Mesh(net("10.0.0.0/16"))], "never replaced over a foreign route");
    }

    #[test]
    fn an_exact_table_needs_nothing() {
        let (want, _) = desired([net("100.64.0.2/32")], &[net("10.0.5.0/24")]);
        let table = vec![ours("100.64.0.2/32", 7)];
        assert!(plan(&want, &table, 7).is_empty());
    }
}
