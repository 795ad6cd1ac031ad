//! The daemon's host side, on a thread and netlink connection of its own: the routes and rules of the mesh
//! table (a pass when the wanted routes change, on netlink events, and every few seconds), the SNAT
//! plumbing (proxy neighbours, per-interface sysctls), forwarding sysctls, and the run-state file doctor
//! reads. The packet loop sends it commands and never waits for it: a 10 000-route dump, a disk write or a
//! slow kernel stalls routing work, not packets. It reports the host's addresses back when they change, so
//! the data plane knows what counts as this host.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use ipnet::IpNet;
use mesh_dataplane::netmap::AcceptRoutes;
use mesh_dataplane::router::Served;
use mesh_linux::manager::{Cause, Report, RouteManager};
use mesh_linux::netlink::{self, Netlink};
use mesh_linux::{RoutingPolicy, sysctl};
use tokio::sync::{mpsc, oneshot};

use super::resolv_conf::{self, Direct};
use super::resolved;
use crate::error::Error;
use crate::run_state::{self, RunState};

/// How often the route manager checks the kernel even without an event.
const ROUTE_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// The upstream servers systemd-resolved itself uses, which it lists in resolv.conf form.
const RESOLVED_UPSTREAMS: &str = "/run/systemd/resolve/resolv.conf";
/// How often meshd's resolv.conf is checked for another program's rewrite.
const RESOLV_CONF_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long after a netlink event the check runs, so a burst of events costs one pass.
const ROUTE_EVENT_DELAY: Duration = Duration::from_millis(100);

/// A SNAT address and the LAN interface that answers for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Lan {
    pub address: IpAddr,
    pub index: u32,
    pub name: String,
}

pub(super) enum Command {
    /// Start-up: refuse a table or rules another program owns, adopt what a crashed run saved, plumb the
    /// SNAT addresses, make the first pass, write the state.
    Start { routes: Routes, lans: Vec<Lan>, served: Vec<Served>, reply: oneshot::Sender<Result<(), Error>> },
    /// What is routed into the mesh changed: one pass.
    Routes(Routes),
    /// What the node serves changed (the state file says so).
    Served(Vec<Served>),
    /// The SNAT addresses changed: the old ones stop answering on their LANs, the new ones start.
    Snat { lans: Vec<Lan>, reply: oneshot::Sender<Result<(), Error>> },
    /// A router serves these: forwarding goes on for their families (and stays on).
    Forwarding(Vec<Served>),
    /// Point the host's DNS at the mesh's resolver (direct mode), or put the original back (`None`).
    Dns(Option<(resolv_conf::Wanted, resolved::LinkDns)>),
    /// Disk work that must not hold packets, done in the order sent (the netmap cache).
    Persist(Box<dyn FnOnce() + Send>),
    /// The TUN device was recreated with this index: route into it from now on, at once.
    Tun(u32),
    /// Removes everything the daemon added.
    Stop { reply: oneshot::Sender<()> },
}

/// The prefixes routed into the mesh and the node's own advertised ones (which stay local like a LAN).
#[derive(Debug, Clone, Default)]
pub(super) struct Routes {
    pub accepted: Vec<IpNet>,
    pub advertised: Vec<IpNet>,
}

/// What the host side needs to know from the start.
pub(super) struct Setup {
    pub policy: RoutingPolicy,
    /// Which subnet routes the table takes, for the state file (the daemon filters what it sends).
    pub accept: AcceptRoutes,
    pub tun_index: u32,
    pub state_path: PathBuf,
    /// A managed node's host DNS: the resolv.conf path and the state directory its original is kept in.
    pub resolv_conf: Option<(PathBuf, PathBuf)>,
    /// Userspace mode: the host is not touched (no routes, rules, sysctls, state file); the host side only
    /// watches the host's addresses and does the disk work.
    pub userspace: bool,
}

/// The packet loop's end of the host side.
pub(super) struct HostHandle {
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HostHandle {
    /// Sends a command; the host side runs until [`HostHandle::stop`], so it is always there to take it.
    pub fn send(&self, command: Command) {
        let _ = self.commands.send(command);
    }

    /// Sends a command that answers, and the receiver of the answer.
    pub fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> oneshot::Receiver<T> {
        let (tx, rx) = oneshot::channel();
        self.send(command(tx));
        rx
    }

    /// Removes what the daemon added, waits for that, and ends the thread.
    pub async fn stop(&mut self) {
        let _ = self.ask(|reply| Command::Stop { reply }).await;
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Starts the host side on its own thread. The receiver gets the host's addresses whenever they change.
/// What the host side tells the daemon's loop.
#[derive(Debug)]
pub(super) enum HostEvent {
    /// The host's addresses, after they changed.
    Addresses(Vec<IpAddr>),
    /// Something failed and was brought back (for status).
    Recovered(String),
    /// How the host's DNS stands (after a change, or another program's rewrite).
    Dns(resolv_conf::DirectStatus),
}

pub(super) fn spawn(setup: Setup) -> Result<(HostHandle, mpsc::UnboundedReceiver<HostEvent>), Error> {
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (addresses_tx, addresses) = mpsc::unbounded_channel();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("meshd-host".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(Error::system("starting the host thread", e)));
                    return;
                }
            };
            runtime.block_on(async move {
                // Fault injection for the tests of supervision: the first connection, or the first event
                // subscription, dies after this long.
                let fault =
                    |name: &str| std::env::var(name).ok().and_then(|ms| ms.parse().ok()).map(Duration::from_millis);
                let host = Netlink::connect_strict_for(fault("MESHD_FAULT_NETLINK_AFTER_MS"))
                    .and_then(|netlink| Ok((netlink, Netlink::subscribe_for(fault("MESHD_FAULT_EVENTS_AFTER_MS"))?)))
                    .map_err(|e| Error::system("opening netlink", e));
                match host {
                    Ok((netlink, events)) => {
                        let _ = ready_tx.send(Ok(()));
                        Host::new(setup, netlink, addresses_tx).run(command_rx, events).await;
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        })
        .map_err(|e| Error::system("starting the host thread", e))?;
    ready.recv().map_err(|e| Error::system("starting the host thread", e))??;
    Ok((HostHandle { commands, thread: Some(thread) }, addresses))
}

/// The next route or address event; none ever while there is no subscription.
async fn next_event(events: &mut Option<netlink::Subscription>) -> Option<netlink::Event> {
    match events {
        Some(subscription) => subscription.events.next().await,
        None => std::future::pending().await,
    }
}

/// What one SNAT address needs on the host: its LAN interface answers ARP for it.
#[derive(Debug, Clone)]
struct Plumbing {
    lan: Lan,
}

struct Host {
    netlink: Netlink,
    routes: RouteManager,
    accept: AcceptRoutes,
    state_path: PathBuf,
    /// Whether this run got past its ownership checks and may tear routes and rules down: a run refused
    /// because another program owns them must leave them alone.
    installed: bool,
    plumbing: Vec<Plumbing>,
    saved_sysctls: Vec<sysctl::Saved>,
    served: Vec<Served>,
    deferred_logged: Option<Instant>,
    addresses: Vec<IpAddr>,
    addresses_tx: mpsc::UnboundedSender<HostEvent>,
    dns: Option<Direct>,
    /// systemd-resolved, when it owns the host's DNS (asked once, at the first DNS command).
    resolved: Option<zbus::Connection>,
    resolved_checked: bool,
    /// What resolved holds for the TUN device now.
    link_dns: Option<resolved::LinkDns>,
    tun_index: u32,
    userspace: bool,
}

impl Host {
    fn new(setup: Setup, netlink: Netlink, addresses_tx: mpsc::UnboundedSender<HostEvent>) -> Self {
        let routes = RouteManager::new(netlink.clone(), setup.policy, setup.tun_index);
        Host {
            netlink,
            routes,
            accept: setup.accept,
            state_path: setup.state_path,
            installed: false,
            plumbing: Vec::new(),
            saved_sysctls: Vec::new(),
            served: Vec::new(),
            deferred_logged: None,
            addresses: Vec::new(),
            // A resolv.conf a killed run left pointing at the mesh is put back here, before anything else.
            dns: setup.resolv_conf.map(|(path, state_dir)| Direct::new(path, &state_dir)),
            resolved: None,
            resolved_checked: false,
            link_dns: None,
            tun_index: setup.tun_index,
            userspace: setup.userspace,
            addresses_tx,
        }
    }

    fn report_dns(&self) {
        let Some(dns) = &self.dns else { return };
        let mut status = dns.status();
        if self.resolved.is_some() {
            status.mode = "systemd-resolved".into();
            // The resolver forwards to resolved's own upstreams, never to its stub: resolved routes the mesh's
            // search and split domains here, so the stub would send their other names straight back.
            let upstreams = std::fs::read_to_string(RESOLVED_UPSTREAMS).unwrap_or_default();
            status.original_nameservers = resolv_conf::parse(&upstreams).nameservers;
            status.active = self.link_dns.is_some();
            status.written = self.link_dns.as_ref().map(|l| {
                let servers: Vec<String> = l.servers.iter().map(ToString::to_string).collect();
                // The mesh's 64 reverse /16 zones in one mention, not 64 (they are always the same).
                let mut routing: Vec<String> =
                    l.routing.iter().filter(|d| !d.ends_with(".100.in-addr.arpa")).map(|d| format!("~{d}")).collect();
                routing.push("~64..127.100.in-addr.arpa".into());
                format!(
                    "link {}: DNS {}\nlink {}: domains {} {}\nlink {}: default route {}",
                    self.tun_index,
                    servers.join(" "),
                    self.tun_index,
                    l.search.join(" "),
                    routing.join(" "),
                    self.tun_index,
                    l.default_route
                )
            });
        }
        let _ = self.addresses_tx.send(HostEvent::Dns(status));
    }

    /// Points the host's DNS at the mesh's resolver (or takes it back): through systemd-resolved when it owns
    /// the host's DNS, else by writing resolv.conf.
    async fn set_dns(&mut self, wanted: Option<(resolv_conf::Wanted, resolved::LinkDns)>) {
        let Some(direct) = &mut self.dns else { return };
        if !self.resolved_checked && wanted.is_some() {
            self.resolved_checked = true;
            self.resolved = resolved::owns_host_dns(std::path::Path::new("/etc/resolv.conf")).await;
            if self.resolved.is_some() {
                tracing::info!("systemd-resolved owns the host's DNS: meshd sets the TUN device's link DNS over D-Bus");
            }
        }
        if self.resolved.is_none() {
            if let Err(e) = direct.set(wanted.map(|(w, _)| w)) {
                tracing::error!("host DNS: {e}");
            }
            return;
        }
        let link = wanted.map(|(_, link)| link);
        if link != self.link_dns {
            self.set_link_dns(link).await;
        }
    }

    /// Tells systemd-resolved the TUN device's DNS settings (or takes them back).
    async fn set_link_dns(&mut self, link: Option<resolved::LinkDns>) {
        let Some(connection) = &self.resolved else { return };
        let result = match &link {
            Some(link) => resolved::set_link(connection, self.tun_index, link).await,
            None => resolved::revert_link(connection, self.tun_index).await,
        };
        match result {
            Ok(()) => {
                tracing::info!(link = self.tun_index, "systemd-resolved: the TUN device's DNS set");
                self.link_dns = link;
            }
            Err(e) => tracing::error!("host DNS: {e}"),
        }
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>, events: netlink::Subscription) {
        let mut next_check = Instant::now() + ROUTE_CHECK_INTERVAL;
        let mut events = Some(events);
        let mut dns_check = tokio::time::interval(RESOLV_CONF_CHECK_INTERVAL);
        dns_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The host's resolvers as they are before anything is written, for the resolver to forward to.
        self.report_dns();
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Stop { reply }) => {
                        self.stop().await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(command) => self.command(command).await,
                    // The daemon went away without a stop (it panicked): still put the host back.
                    None => {
                        self.stop().await;
                        return;
                    }
                },
                event = next_event(&mut events) => match event {
                    Some((message, _)) => {
                        tracing::trace!(?message, "netlink event");
                        if netlink::is_relevant(&message, self.routes.policy().table) {
                            next_check = next_check.min(Instant::now() + ROUTE_EVENT_DELAY);
                        }
                    }
                    None => {
                        // Without events, repairs wait for the periodic pass; the next pass subscribes again.
                        tracing::error!("the route and address events stopped; subscribing again");
                        events = None;
                        next_check = next_check.min(Instant::now());
                    }
                },
                _ = dns_check.tick(), if self.dns.as_ref().is_some_and(Direct::is_active) => {
                    if self.dns.as_mut().is_some_and(|d| d.check(Instant::now())) {
                        self.report_dns();
                    }
                }
                _ = tokio::time::sleep_until(next_check.into()), if self.userspace => {
                    // Only the host's addresses matter here (the endpoints peers reach this node at).
                    self.report_addresses().await;
                    next_check = Instant::now() + ROUTE_CHECK_INTERVAL;
                }
                _ = tokio::time::sleep_until(next_check.into()), if self.installed => {
                    self.supervise(&mut events);
                    self.reconcile(Cause::Repair).await;
                    next_check = Instant::now() + ROUTE_CHECK_INTERVAL;
                }
            }
        }
    }

    async fn command(&mut self, command: Command) {
        if self.userspace {
            match command {
                Command::Start { reply, .. } => {
                    self.report_addresses().await;
                    let _ = reply.send(Ok(()));
                }
                Command::Snat { reply, .. } => {
                    let _ = reply.send(Ok(()));
                }
                Command::Persist(write) => write(),
                _ => {}
            }
            return;
        }
        match command {
            Command::Start { routes, lans, served, reply } => {
                let _ = reply.send(self.start(routes, lans, served).await);
            }
            Command::Routes(routes) => {
                self.set_routes(routes);
                self.reconcile(Cause::Change).await;
            }
            Command::Served(served) => {
                self.served = served;
                self.write_state();
            }
            Command::Snat { lans, reply } => {
                self.unplumb().await;
                let result = self.plumb(lans).await;
                self.reconcile(Cause::Change).await;
                self.write_state();
                let _ = reply.send(result);
            }
            Command::Forwarding(served) => enable_forwarding(&served),
            Command::Dns(wanted) => {
                self.set_dns(wanted).await;
                self.report_dns();
            }
            Command::Persist(write) => write(),
            Command::Tun(index) => {
                self.tun_index = index;
                // A new device has no link DNS: resolved is told again.
                if let Some(link) = self.link_dns.take() {
                    self.set_link_dns(Some(link)).await;
                }
                self.routes.set_tun_index(index);
                self.reconcile(Cause::Change).await;
            }
            Command::Stop { .. } => unreachable!("handled by the loop"),
        }
    }

    fn set_routes(&mut self, routes: Routes) {
        self.routes.set_accepted(routes.accepted);
        self.routes.set_advertised(routes.advertised);
    }

    async fn start(&mut self, routes: Routes, lans: Vec<Lan>, served: Vec<Served>) -> Result<(), Error> {
        // Before anything is installed: sharing the table or the rules with another manager would make both
        // wrong.
        self.routes.check_table_free().await.map_err(Error::System)?;
        self.check_rules_free().await?;
        self.installed = true;
        self.set_routes(routes);
        self.served = served;
        // A run that crashed left its sysctls set and its state file behind: adopt the values it saved, so
        // this run's stop puts back what was there before any meshd (this run would only see meshd's own).
        self.saved_sysctls = RunState::read(&self.state_path).saved_sysctls();
        self.plumb(lans).await?;
        // Leftovers of a killed run (routes with meshd's protocol, duplicate rules) go in this same pass.
        let report =
            self.routes.reconcile(Cause::Change, Instant::now()).await.map_err(|e| Error::System(e.to_string()))?;
        self.log_routes(&report, Cause::Change);
        self.report_addresses().await;
        self.write_state();
        Ok(())
    }

    /// Rules at meshd's priorities or with its mark are a previous meshd's leftovers only if that run left its
    /// state file (a clean stop removes it, SIGKILL does not); otherwise another program owns them. Tailscale's
    /// defaults are the same numbers, so shape alone cannot tell.
    async fn check_rules_free(&self) -> Result<(), Error> {
        let p = self.routes.policy();
        let rules = self.netlink.rule_status(p).await.map_err(|e| Error::System(e.to_string()))?;
        if (rules.present > 0 || !rules.stray.is_empty()) && !self.state_path.exists() {
            return Err(Error::System(format!(
                "policy rules at priorities {}-{} or with mark {:#x} already exist and meshd did not install them (is \
                 Tailscale running?); choose others with --rule-priority N --fwmark M",
                p.marked_main, p.lookup_table, p.fwmark
            )));
        }
        Ok(())
    }

    /// Makes each SNAT address appear on its LAN: replies to it are routed into the TUN device (a host route
    /// in the mesh table), its LAN interface answers ARP for it (a proxy neighbour entry, with
    /// `proxy_delay=0` so the first connection does not wait up to 0.8 s).
    async fn plumb(&mut self, lans: Vec<Lan>) -> Result<(), Error> {
        let mut pinned = Vec::new();
        for lan in lans {
            self.netlink.add_proxy_neighbour(lan.index, lan.address).await.map_err(|e| Error::System(e.to_string()))?;
            // IPv4 answers ARP for a proxy entry at once only with proxy_delay 0; IPv6 answers neighbour
            // solicitations for one only with proxy_ndp on.
            let (key, value) = if lan.address.is_ipv4() {
                (sysctl::proxy_delay_key(&lan.name), "0")
            } else {
                (sysctl::proxy_ndp_key(&lan.name), "1")
            };
            match sysctl::set(&key, value) {
                Ok(Some(saved)) if !self.saved_sysctls.iter().any(|s| s.key == saved.key) => {
                    self.saved_sysctls.push(saved)
                }
                Ok(_) => {}
                // A container's /proc/sys is read-only: without proxy_delay 0 the LAN's first ARP for the
                // address waits up to 0.8 s, which slows a first connection but breaks nothing (the runtime
                // can set it: --sysctl, or a pod sysctl). proxy_ndp is another matter: without it IPv6 never
                // answers.
                Err(e) if lan.address.is_ipv4() => tracing::warn!(
                    error = %e,
                    "cannot set proxy_delay: a first connection to the SNAT address may wait up to 0.8 s"
                ),
                Err(e) => return Err(Error::System(e.to_string())),
            }
            pinned.push(IpNet::from(lan.address));
            // Pinned as each one is plumbed: if a later address fails, the ones done still get their route.
            self.routes.set_pinned(pinned.clone());
            tracing::info!(snat_address = %lan.address, lan = %lan.name, "SNAT address answers on the LAN");
            self.plumbing.push(Plumbing { lan });
        }
        Ok(())
    }

    async fn unplumb(&mut self) {
        for p in std::mem::take(&mut self.plumbing) {
            if let Err(e) = self.netlink.del_proxy_neighbour(p.lan.index, p.lan.address).await {
                tracing::warn!(error = %e, "removing the old SNAT address");
            }
        }
        self.routes.set_pinned(Vec::new());
    }

    /// Brings back a dead netlink connection or event subscription (each pass tries again until one
    /// works), and tells the daemon.
    fn supervise(&mut self, events: &mut Option<netlink::Subscription>) {
        if !self.netlink.is_alive() {
            match Netlink::connect_strict() {
                Ok(netlink) => {
                    self.netlink = netlink.clone();
                    self.routes.set_netlink(netlink);
                    self.recovered("the netlink connection ended; connected again");
                }
                Err(e) => tracing::error!(error = %e, "the netlink connection ended; connecting again failed"),
            }
        }
        if events.is_none() {
            match Netlink::subscribe() {
                Ok(subscription) => {
                    *events = Some(subscription);
                    self.recovered("the route and address events stopped; subscribed again");
                }
                Err(e) => tracing::error!(error = %e, "subscribing to route and address events again failed"),
            }
        }
    }

    fn recovered(&self, what: &str) {
        tracing::warn!("{what}");
        let _ = self.addresses_tx.send(HostEvent::Recovered(what.to_string()));
    }

    async fn reconcile(&mut self, cause: Cause) {
        if !self.installed {
            return;
        }
        match self.routes.reconcile(cause, Instant::now()).await {
            Ok(report) => self.log_routes(&report, cause),
            Err(e) => tracing::error!(error = %e, "checking routes"),
        }
        // Route passes run on every address change, so they are where the host's addresses are read too.
        self.report_addresses().await;
    }

    async fn report_addresses(&mut self) {
        match self.netlink.local_addresses().await {
            Ok(addresses) if addresses != self.addresses => {
                self.addresses = addresses.clone();
                let _ = self.addresses_tx.send(HostEvent::Addresses(addresses));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading the host's addresses"),
        }
    }

    /// What `meshd doctor` needs to know beyond the UAPI: served routes and the SNAT plumbing.
    fn write_state(&self) {
        let p = self.routes.policy();
        let state = RunState {
            policy: Some(run_state::Policy { table: p.table, fwmark: p.fwmark, rule_priority: p.marked_main }),
            accept_routes: match &self.accept {
                AcceptRoutes::All => None,
                AcceptRoutes::None => Some(Vec::new()),
                AcceptRoutes::Within(list) => Some(list.clone()),
            },
            served: RunState::served_routes(&self.served),
            snat: self
                .plumbing
                .iter()
                .map(|p| run_state::SnatPlumbing { address: p.lan.address, lan: p.lan.name.clone() })
                .collect(),
            sysctls: self
                .saved_sysctls
                .iter()
                .map(|s| run_state::SavedSysctl { key: s.key.clone(), old: s.old.clone() })
                .collect(),
        };
        if let Err(e) = state.write(&self.state_path) {
            tracing::warn!(error = %e, file = %self.state_path.display(), "cannot write the state doctor reads");
        }
    }

    fn log_routes(&mut self, report: &Report, cause: Cause) {
        let table = self.routes.policy().table;
        for route in &report.conflicts {
            tracing::warn!(route = %route, table, "not installed: another program's route holds this prefix");
        }
        for skipped in &report.skipped {
            tracing::warn!(
                accepted = %skipped.accepted, local = %skipped.local,
                "not routing an accepted prefix into the mesh: it would take over a local network"
            );
        }
        if cause == Cause::Repair {
            for route in &report.added {
                tracing::info!(route = %route, table, "restored a route something else removed");
            }
            for entry in &report.removed {
                tracing::info!(route = %entry.prefix, table, "removed a stale or duplicate meshd route");
            }
            for (v6, priority) in &report.rules_added {
                tracing::info!(priority, ipv6 = v6, "restored a policy rule something else removed");
            }
        }
        if report.deferred && self.deferred_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
            tracing::warn!(table, "routes or rules keep being changed by another program; meshd is backing off");
            self.deferred_logged = Some(Instant::now());
        }
    }

    async fn stop(&mut self) {
        if let Some(connection) = &self.resolved
            && self.link_dns.take().is_some()
            && let Err(e) = resolved::revert_link(connection, self.tun_index).await
        {
            tracing::error!("host DNS: {e}");
        }
        if let Some(dns) = &mut self.dns
            && let Err(e) = dns.restore()
        {
            tracing::error!("host DNS: {e}");
        }
        if !self.installed {
            return;
        }
        if let Err(e) = self.routes.teardown().await {
            tracing::warn!(error = %e, "cleanup");
        }
        self.unplumb().await;
        for saved in std::mem::take(&mut self.saved_sysctls) {
            if let Err(e) = sysctl::restore(&saved) {
                tracing::warn!(error = %e, "cleanup");
            }
        }
        let _ = std::fs::remove_file(&self.state_path);
    }
}

/// A router forwards: `up --advertise-routes` is the consent design.md asks for before turning on
/// forwarding, which then stays on (a router restarting must not cut its LAN off in between).
pub(super) fn enable_forwarding(served: &[Served]) {
    for key in forwarding_off(served) {
        match sysctl::set(key, "1") {
            Ok(_) => tracing::info!(sysctl = key, "turned forwarding on to serve advertised routes"),
            Err(e) => tracing::warn!(sysctl = key, error = %e, "cannot turn forwarding on"),
        }
    }
}

/// The forwarding sysctls serving `served` needs that are off: one per address family served.
pub(super) fn forwarding_off(served: &[Served]) -> Vec<&'static str> {
    [(false, "net.ipv4.ip_forward"), (true, "net.ipv6.conf.all.forwarding")]
        .into_iter()
        .filter(|(v6, key)| {
            served.iter().any(|s| s.prefix.addr().is_ipv6() == *v6) && sysctl::read(key).is_ok_and(|v| v == "0")
        })
        .map(|(_, key)| key)
        .collect()
}
