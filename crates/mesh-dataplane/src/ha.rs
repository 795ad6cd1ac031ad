//! High availability for subnet routes, as pure logic with time passed in: a router's verdict on one
//! prefix's health from its probes (fall and rise counts, a link down at once), and a client's choice among
//! the routers of a prefix (priority, health, tunnel liveness, a hold-down before failing back).
//!
//! Not wired yet: the probes, the reports to the server, the candidates in the netmap and the switch of
//! allowed IPs come with the rest of the failover work (issue 19). These are the rules they will follow,
//! tested on their own first.

use std::time::{Duration, Instant};

/// How a prefix's health is probed; the defaults are issue 19's (1 s, 500 ms, 3, 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthSettings {
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failures that make a healthy prefix unhealthy.
    pub fall: u32,
    /// Consecutive successes that make an unhealthy prefix healthy again.
    pub rise: u32,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self { interval: Duration::from_secs(1), timeout: Duration::from_millis(500), fall: 3, rise: 3 }
    }
}

/// One prefix's health on its router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    settings: HealthSettings,
    /// None until the first result: a router that just started has not seen its LAN yet.
    healthy: Option<bool>,
    /// Consecutive results against the current verdict.
    against: u32,
    link_up: bool,
}

impl Health {
    pub fn new(settings: HealthSettings) -> Self {
        Self { settings, healthy: None, against: 0, link_up: true }
    }

    /// The verdict: unknown counts as unhealthy for choosing, so no traffic goes to a LAN nobody checked.
    pub fn healthy(&self) -> bool {
        self.link_up && self.healthy == Some(true)
    }

    /// Takes one probe round's result (success if any target answered in time); returns the new verdict
    /// when it changed. The first result decides at once; after that it takes `fall` failures or `rise`
    /// successes in a row, so one lost probe on a lossy LAN changes nothing.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        let before = self.healthy();
        match self.healthy {
            None => self.healthy = Some(ok),
            Some(current) if current == ok => self.against = 0,
            Some(_) => {
                self.against += 1;
                let needed = if ok { self.settings.rise } else { self.settings.fall };
                if self.against >= needed.max(1) {
                    self.healthy = Some(ok);
                    self.against = 0;
                }
            }
        }
        (self.healthy() != before).then(|| self.healthy())
    }

    /// The interface the prefix is reached through went down or came up: down is unhealthy at once, without
    /// waiting for probes to time out; up restores the probes' verdict.
    pub fn set_link(&mut self, up: bool) -> Option<bool> {
        let before = self.healthy();
        self.link_up = up;
        (self.healthy() != before).then(|| self.healthy())
    }
}

/// A router of a prefix as a client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub node: u64,
    /// Higher is preferred (`--route-priority`).
    pub priority: u32,
    /// Its last reported health for this prefix.
    pub healthy: bool,
    /// Its tunnel answers (a recent handshake or probe).
    pub tunnel_alive: bool,
}

impl Candidate {
    fn eligible(&self) -> bool {
        self.healthy && self.tunnel_alive
    }
}

/// A client's choice of router for one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chooser {
    current: Option<u64>,
    /// Wait this long with a better router eligible before leaving a working one.
    hold_down: Duration,
    /// Whether to go back to a better router at all once the current one works.
    preempt: bool,
    /// Since when the router now better than the current one has been eligible.
    better_since: Option<(u64, Instant)>,
}

fn best<'a>(candidates: impl Iterator<Item = &'a Candidate>) -> Option<&'a Candidate> {
    // Highest priority; among equals the lowest node id, so every client picks the same router.
    candidates.max_by(|a, b| a.priority.cmp(&b.priority).then(b.node.cmp(&a.node)))
}

impl Chooser {
    pub fn new(hold_down: Duration, preempt: bool) -> Self {
        Self { current: None, hold_down, preempt, better_since: None }
    }

    pub fn current(&self) -> Option<u64> {
        self.current
    }

    /// The router to use now. A failing current router is left at once for the best eligible one; a
    /// working one is left for a better one only after that one stayed eligible for the hold-down (and
    /// only with preemption), so a router that flaps does not drag traffic back and forth. With no
    /// eligible router, the best one whose tunnel works is used: a wrong health report must not cut a
    /// prefix off entirely.
    pub fn choose(&mut self, candidates: &[Candidate], now: Instant) -> Option<u64> {
        let current = self.current.and_then(|id| candidates.iter().find(|c| c.node == id));
        let Some(top) = best(candidates.iter().filter(|c| c.eligible())) else {
            self.better_since = None;
            if current.is_none_or(|c| !c.tunnel_alive) {
                self.current = best(candidates.iter().filter(|c| c.tunnel_alive)).map(|c| c.node);
            }
            return self.current;
        };
        match current {
            Some(c) if c.eligible() => {
                if top.node == c.node || top.priority <= c.priority || !self.preempt {
                    self.better_since = None;
                } else {
                    let since = match self.better_since {
                        Some((node, since)) if node == top.node => since,
                        _ => {
                            self.better_since = Some((top.node, now));
                            now
                        }
                    };
                    if now.saturating_duration_since(since) >= self.hold_down {
                        self.current = Some(top.node);
                        self.better_since = None;
                    }
                }
            }
            _ => {
                self.current = Some(top.node);
                self.better_since = None;
            }
        }
        self.current
    }

    /// When `choose` should run again to fail back, if a better router is waiting out the hold-down.
    pub fn next_check(&self) -> Option<Instant> {
        self.better_since.map(|(_, since)| since + self.hold_down)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(node: u64, priority: u32, healthy: bool, tunnel_alive: bool) -> Candidate {
        Candidate { node, priority, healthy, tunnel_alive }
    }

    #[test]
    fn the_first_result_decides_then_it_takes_fall_or_rise_in_a_row() {
        let mut h = Health::new(HealthSettings::default());
        assert!(!h.healthy(), "unknown is not healthy");
        assert_eq!(h.record(true), Some(true));
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None, "a success in between starts the count again");
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), Some(false), "the third failure in a row");
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(true), "the third success in a row");
    }

    #[test]
    fn thirty_percent_loss_never_flaps_with_fall_three() {
        let mut h = Health::new(HealthSettings::default());
        h.record(true);
        // Every third probe lost, and then two in a row now and again: never three.
        let pattern = [true, true, false, true, false, false, true, true, false, true, true, false];
        let changes: Vec<bool> = pattern.iter().cycle().take(1200).filter_map(|&ok| h.record(ok)).collect();
        assert!(changes.is_empty(), "{changes:?}");
    }

    #[test]
    fn a_link_down_is_unhealthy_at_once_and_up_restores_the_probes_verdict() {
        let mut h = Health::new(HealthSettings::default());
        h.record(true);
        assert_eq!(h.set_link(false), Some(false));
        assert_eq!(h.record(true), None, "probes cannot override a down link");
        assert_eq!(h.set_link(true), Some(true));
    }

    #[test]
    fn a_failing_router_is_left_at_once_for_the_best_eligible_one() {
        let now = Instant::now();
        let mut chooser = Chooser::new(Duration::from_secs(10), true);
        let mut routers = [c(1, 200, true, true), c(2, 100, true, true), c(3, 100, true, true)];
        assert_eq!(chooser.choose(&routers, now), Some(1), "the highest priority");
        routers[0].healthy = false;
        assert_eq!(chooser.choose(&routers, now), Some(2), "at once; the lower id among equals");
        routers[1].tunnel_alive = false;
        assert_eq!(chooser.choose(&routers, now), Some(3), "a dead tunnel fails over too");
    }

    #[test]
    fn fail_back_waits_out_the_hold_down_and_a_flapping_router_restarts_it() {
        let start = Instant::now();
        let mut chooser = Chooser::new(Duration::from_secs(10), true);
        let mut routers = [c(1, 200, false, true), c(2, 100, true, true)];
        assert_eq!(chooser.choose(&routers, start), Some(2));
        routers[0].healthy = true;
        assert_eq!(chooser.choose(&routers, start + Duration::from_secs(1)), Some(2), "held down");
        assert_eq!(chooser.next_check(), Some(start + Duration::from_secs(11)));
        routers[0].healthy = false;
        assert_eq!(chooser.choose(&routers, start + Duration::from_secs(5)), Some(2));
        routers[0].healthy = true;
        assert_eq!(chooser.choose(&routers, start + Duration::from_secs(6)), Some(2), "the hold-down starts again");
        assert_eq!(chooser.choose(&routers, start + Duration::from_secs(15)), Some(2));
        assert_eq!(chooser.choose(&routers, start + Duration::from_secs(16)), Some(1), "back after 10 s eligible");
        assert_eq!(chooser.next_check(), None);
    }

    #[test]
    fn without_preemption_a_working_router_is_kept() {
        let start = Instant::now();
        let mut chooser = Chooser::new(Duration::from_secs(10), false);
        let mut routers = [c(1, 200, false, true), c(2, 100, true, true)];
        assert_eq!(chooser.choose(&routers, start), Some(2));
        routers[0].healthy = true;
        assert_eq!(chooser.choose(&routers, start + Duration::from_secs(3600)), Some(2));
        routers[1].healthy = false;
        assert_eq!(chooser.choose(&routers, start + Duration::from_secs(3601)), Some(1), "until it fails");
    }

    #[test]
    fn with_no_healthy_router_the_best_live_tunnel_serves_and_with_none_nothing_changes() {
        let now = Instant::now();
        let mut chooser = Chooser::new(Duration::from_secs(10), true);
        let mut routers = [c(1, 100, false, true), c(2, 200, false, false)];
        assert_eq!(chooser.choose(&routers, now), Some(1), "a wrong health report does not cut the prefix off");
        routers[0].tunnel_alive = false;
        assert_eq!(chooser.choose(&routers, now), None);
        assert_eq!(chooser.choose(&[], now), None);
    }
}
