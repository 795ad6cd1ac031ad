//! The route manager: keeps the mesh table and the policy rules equal to what meshd wants, whoever else
//! touches them.
//!
//! Every pass dumps the table and the rules, computes the difference ([`crate::plan`]) and applies only
//! that. A pass runs when the wanted routes change, when netlink announces a change to routes, rules or
//! addresses (so a deletion is put back within a fraction of a second), and every few seconds as a
//! fallback. Repairs draw on a small budget that refills slowly: if another program keeps undoing meshd's
//! routes, meshd backs off and says so instead of fighting it in a tight loop.

use std::io;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::RoutingPolicy;
use crate::netlink::Netlink;
use crate::plan::{self, Entry, Route, Skipped};

/// Repairs allowed in a burst, and how fast the allowance comes back.
const REPAIR_BURST: u32 = 10;
const REPAIR_REFILL: Duration = Duration::from_secs(5);

/// Why a pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// meshd's own wish changed (start, reload, new netmap): always applied.
    Change,
    /// The kernel's state may have drifted (an event, the periodic check): applied within the repair budget.
    Repair,
}

/// What a pass did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub added: Vec<Route>,
    pub removed: Vec<Entry>,
    /// Rules (IPv6?, priority) that had to be added.
    pub rules_added: Vec<(bool, u32)>,
    /// Accepted prefixes left out because a local network holds them.
    pub skipped: Vec<Skipped>,
    /// Routes of other programs in the table.
    pub foreign: Vec<Entry>,
    /// Wanted routes not installed because another program's route holds the prefix.
    pub conflicts: Vec<Route>,
    /// A repair was due but the budget was spent: nothing was changed.
    pub deferred: bool,
}

/// How many repairs may run now: a burst, then one more every [`REPAIR_REFILL`]. Time is given, not read.
#[derive(Debug, Clone, Copy)]
struct RepairBudget {
    left: u32,
    refilled: Option<Instant>,
}

impl RepairBudget {
    fn new() -> Self {
        Self { left: REPAIR_BURST, refilled: None }
    }

    fn take(&mut self, now: Instant) -> bool {
        let since = *self.refilled.get_or_insert(now);
        let refills = (now.saturating_duration_since(since).as_secs_f64() / REPAIR_REFILL.as_secs_f64()) as u32;
        if refills > 0 {
            self.left = (self.left + refills).min(REPAIR_BURST);
            self.refilled = Some(now);
        }
        if self.left == 0 {
            return false;
        }
        self.left -= 1;
        true
    }
}

#[derive(Debug)]
pub struct RouteManager {
    netlink: Netlink,
    policy: RoutingPolicy,
    tun_index: u32,
    accepted: Vec<IpNet>,
    advertised: Vec<IpNet>,
    pinned: Vec<IpNet>,
    budget: RepairBudget,
}

impl RouteManager {
    pub fn new(netlink: Netlink, policy: RoutingPolicy, tun_index: u32) -> Self {
        Self {
            netlink,
            policy,
            tun_index,
            accepted: Vec::new(),
            advertised: Vec::new(),
            pinned: Vec::new(),
            budget: RepairBudget::new(),
        }
    }

    /// The TUN device was recreated under a new index: the next pass routes into it (the kernel removed
    /// the old device's routes with it).
    pub fn set_tun_index(&mut self, tun_index: u32) {
        self.tun_index = tun_index;
    }

    /// A new connection, after the old one died.
    pub fn set_netlink(&mut self, netlink: Netlink) {
        self.netlink = netlink;
    }

    pub fn policy(&self) -> &RoutingPolicy {
        &self.policy
    }

    /// Refuses to share the table with another program: if it holds routes meshd did not install (for example
    /// a running Tailscale's), returns an error naming their device and the flag that picks another table.
    pub async fn check_table_free(&self) -> Result<(), String> {
        let entries = self.netlink.dump_table(self.policy.table).await.map_err(|e| e.to_string())?;
        // Routes of another program, or of another meshd through its own live device.
        let foreign: Vec<&Entry> = entries.iter().filter(|e| !e.is_ours(self.tun_index)).collect();
        let Some(first) = foreign.first() else { return Ok(()) };
        let device = first
            .device
            .clone()
            .unwrap_or_else(|| if first.throw { "a throw route".into() } else { "another device".into() });
        Err(format!(
            "routing table {} already holds {} route(s) meshd did not install, e.g. {} via {device} (is Tailscale \
             running?); choose another table with --table N",
            self.policy.table,
            foreign.len(),
            first.prefix
        ))
    }

    /// Sets the prefixes meshd routes into the mesh (peers' allowed IPs, accepted subnet routes).
    pub fn set_accepted(&mut self, accepted: Vec<IpNet>) {
        self.accepted = accepted;
    }

    /// Routes into the mesh device that no filter or LAN check removes: the SNAT address's host route, which
    /// lies inside the LAN on purpose (replies to it must come to meshd).
    pub fn set_pinned(&mut self, pinned: Vec<IpNet>) {
        self.pinned = pinned;
    }

    /// Sets the node's own advertised routes: like connected subnets, they stay local.
    pub fn set_advertised(&mut self, advertised: Vec<IpNet>) {
        self.advertised = advertised;
    }

    /// The routes wanted now, given the host's connected subnets.
    pub async fn desired(&self) -> io::Result<(std::collections::BTreeSet<Route>, Vec<Skipped>)> {
        let mut local = self.netlink.connected_prefixes(self.tun_index).await?;
        local.extend(self.advertised.iter().map(IpNet::trunc));
        let (mut routes, skipped) = plan::desired(self.accepted.iter().copied(), &local);
        routes.extend(self.pinned.iter().map(|p| Route::Mesh(p.trunc())));
        Ok((routes, skipped))
    }

    /// One pass: compare and apply the difference. `now` paces repairs.
    pub async fn reconcile(&mut self, cause: Cause, now: Instant) -> io::Result<Report> {
        let (desired, skipped) = self.desired().await?;
        let listed = self.netlink.list_table(self.policy.table).await?;
        let table: Vec<Entry> = listed.iter().map(|l| l.entry.clone()).collect();
        let plan = plan::plan(&desired, &table, self.tun_index);
        let mut report =
            Report { skipped, foreign: plan.foreign.clone(), conflicts: plan.conflicts.clone(), ..Report::default() };
        // Rules count against the repair budget like routes: another manager deleting them must not make
        // meshd answer every 100 ms.
        let rules = self.netlink.rule_status(&self.policy).await?;
        let rules_drifted = !rules.missing.is_empty() || !rules.stray.is_empty();
        if cause == Cause::Repair && (!plan.is_empty() || rules_drifted) && !self.budget.take(now) {
            report.deferred = true;
            return Ok(report);
        }
        // One route the kernel refuses (an IPv6 prefix on a host without IPv6, say) must not keep every other
        // route and the rules from being installed: apply all, then report the first failure.
        let mut first_error = None;
        // Each stale route goes by the message the dump above returned for it: one table read per pass.
        for entry in &plan.remove {
            let Some(found) = listed.iter().find(|l| &l.entry == entry) else { continue };
            if let Err(e) = self.netlink.remove_listed(found).await {
                first_error.get_or_insert(e);
            }
        }
        for route in &plan.add {
            match self.netlink.add_planned(*route, self.tun_index, self.policy.table).await {
                Ok(()) => report.added.push(*route),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        report.removed = plan.remove;
        if rules_drifted {
            report.rules_added = self.netlink.ensure_rules(&self.policy).await?;
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        Ok(report)
    }

    /// Removes every route meshd installed in the table and its rules.
    pub async fn teardown(&mut self) -> io::Result<()> {
        let removed = self.netlink.remove_own_routes(self.policy.table).await;
        let rules = self.netlink.remove_rules(&self.policy).await;
        removed.and(rules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repairs_come_in_a_burst_then_one_per_refill() {
        let start = Instant::now();
        let mut budget = RepairBudget::new();
        assert!((0..REPAIR_BURST).all(|_| budget.take(start)), "a burst at once");
        assert!(!budget.take(start), "then nothing");
        assert!(!budget.take(start + REPAIR_REFILL / 2));
        assert!(budget.take(start + REPAIR_REFILL), "one more after a refill period");
        assert!(!budget.take(start + REPAIR_REFILL));
        let later = start + REPAIR_REFILL * 100;
        assert!((0..REPAIR_BURST).all(|_| budget.take(later)), "a long quiet refills the burst, no more");
        assert!(!budget.take(later));
    }
}
