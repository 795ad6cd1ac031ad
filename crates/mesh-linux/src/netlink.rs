//! Addresses, routes, neighbours and policy rules over rtnetlink: what the route manager and the daemon's
//! host side ask of the kernel, one request each.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_core::NetlinkMessage;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use crate::plan::{Entry, Route};
use crate::{ROUTE_PROTOCOL, RoutingPolicy};

/// The kernel's `main` and `default` routing tables.
const TABLE_MAIN: u32 = 254;
const TABLE_DEFAULT: u32 = 253;

#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
    /// Cleared when the connection's driver ends: every request fails from then on, and the owner
    /// connects again (see `is_alive`).
    alive: Arc<AtomicBool>,
}

/// Runs a netlink connection's driver on the current runtime; the flag says whether it still runs. With a
/// `lifetime` the driver (and so the connection) ends after it: fault injection.
fn drive_for<F: std::future::Future<Output = ()> + Send + 'static>(
    connection: F,
    lifetime: Option<std::time::Duration>,
) -> Arc<AtomicBool> {
    let alive = Arc::new(AtomicBool::new(true));
    let flag = alive.clone();
    tokio::spawn(async move {
        match lifetime {
            Some(lifetime) => {
                let _ = tokio::time::timeout(lifetime, connection).await;
            }
            None => connection.await,
        }
        flag.store(false, Ordering::Relaxed);
    });
    alive
}

/// A route as a table dump found it: what the plan reads, and the kernel's message to delete it by.
#[derive(Debug, Clone)]
pub struct Listed {
    pub entry: Entry,
    message: RouteMessage,
}

fn io_err(what: &str, e: rtnetlink::Error) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EAFNOSUPPORT: i32 = 97;

/// Whether the kernel has no such address family (IPv6 disabled): that family is then skipped, not fatal.
fn family_unsupported(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -EAFNOSUPPORT)
}

/// Whether a netlink error is the kernel saying "no such entry" (deleting what is already gone).
fn is_not_found(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -ENOENT || m.raw_code() == -ESRCH)
}

impl Netlink {
    /// Opens a netlink connection; its driver runs on the current tokio runtime.
    pub fn connect() -> io::Result<Self> {
        Self::connect_plain(None)
    }

    fn connect_plain(lifetime: Option<std::time::Duration>) -> io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        Ok(Self { handle, alive: drive_for(connection, lifetime) })
    }

    /// Whether the connection still works; once it does not, nothing on it will again.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// Like [`Netlink::connect`], with `NETLINK_GET_STRICT_CHK` on where the kernel has it (4.20 and later):
    /// a route dump for one table then carries that table only, not every route of the host. On an older
    /// kernel the connection is a plain one, and dumps are filtered here instead.
    pub fn connect_strict() -> io::Result<Self> {
        Self::connect_strict_for(None)
    }

    /// [`Netlink::connect_strict`] whose connection dies after `lifetime`: fault injection, so tests can show
    /// that its owner notices and connects again.
    pub fn connect_strict_for(lifetime: Option<std::time::Duration>) -> io::Result<Self> {
        match rtnetlink::new_connection_with_strict_check() {
            Ok((connection, handle, _)) => Ok(Self { handle, alive: drive_for(connection, lifetime) }),
            Err(_) => Self::connect_plain(lifetime),
        }
    }

    pub async fn link_index(&self, name: &str) -> io::Result<u32> {
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(io::Error::new(io::ErrorKind::NotFound, format!("no link named {name}"))),
            Err(e) => Err(io_err(&format!("looking up link {name}"), e)),
        }
    }

    /// Puts `address` on the link (replacing an identical one, so a restart is idempotent).
    pub async fn add_address(&self, index: u32, address: IpNet) -> io::Result<()> {
        self.handle
            .address()
            .add(index, address.addr(), address.prefix_len())
            .replace()
            .execute()
            .await
            .map_err(|e| io_err(&format!("adding address {address}"), e))
    }

    /// Removes `address` from the link; an address already gone is fine.
    pub async fn del_address(&self, index: u32, address: IpNet) -> io::Result<()> {
        let addresses: Vec<_> =
            self.handle.address().get().execute().try_collect().await.map_err(|e| io_err("listing addresses", e))?;
        for message in addresses {
            let matches = message.header.index == index
                && message.header.prefix_len == address.prefix_len()
                && local_address(&message.attributes) == Some(address.addr());
            if matches {
                self.handle
                    .address()
                    .del(message)
                    .execute()
                    .await
                    .map_err(|e| io_err(&format!("removing address {address}"), e))?;
            }
        }
        Ok(())
    }

    fn route_message(index: u32, prefix: IpNet, table: u32) -> RouteMessage {
        let prefix = prefix.trunc();
        let mut message = match prefix {
            IpNet::V4(p) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(p.addr(), p.prefix_len())
                .output_interface(index)
                .table_id(table)
                .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
                .scope(RouteScope::Link)
                .build(),
            IpNet::V6(p) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(p.addr(), p.prefix_len())
                .output_interface(index)
                .table_id(table)
                .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
                .build(),
        };
        // The builder sets both the header byte and the attribute; tables above 255 need the attribute only.
        if table > 255 {
            message.header.table = 0;
        }
        message
    }

    /// Routes `prefix` into the device `index` in `table`, replacing any route for the same prefix there.
    pub async fn add_route(&self, index: u32, prefix: IpNet, table: u32) -> io::Result<()> {
        self.handle
            .route()
            .add(Self::route_message(index, prefix, table))
            .replace()
            .execute()
            .await
            .map_err(|e| io_err(&format!("adding route {prefix} to table {table}"), e))
    }

    /// Removes every route in `table` that carries meshd's protocol number: at a clean stop, and what a
    /// killed run left behind. Returns how many were removed.
    pub async fn remove_own_routes(&self, table: u32) -> io::Result<usize> {
        let mut removed = 0;
        for listed in self.list_table(table).await? {
            if listed.entry.protocol == ROUTE_PROTOCOL {
                self.remove_listed(&listed).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn throw_message(prefix: IpNet, table: u32) -> RouteMessage {
        let prefix = prefix.trunc();
        let mut message = match prefix {
            IpNet::V4(p) => RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(p.addr(), p.prefix_len()).build(),
            IpNet::V6(p) => RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(p.addr(), p.prefix_len()).build(),
        };
        message.header.kind = RouteType::Throw;
        message.header.protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
        message.header.scope = RouteScope::Universe;
        message.header.table = if table > 255 { 0 } else { table as u8 };
        message.attributes.push(RouteAttribute::Table(table));
        message
    }

    /// Installs one planned route.
    pub async fn add_planned(&self, route: Route, tun_index: u32, table: u32) -> io::Result<()> {
        match route {
            Route::Mesh(prefix) => self.add_route(tun_index, prefix, table).await,
            Route::Throw(prefix) => self
                .handle
                .route()
                .add(Self::throw_message(prefix, table))
                .replace()
                .execute()
                .await
                .map_err(|e| io_err(&format!("adding throw route {prefix} to table {table}"), e)),
        }
    }

    /// Removes a route exactly as the kernel listed it: a rebuilt message misses any leftover whose scope,
    /// type, metric or gateway differ (a blackhole, a route via a gateway), and would keep failing.
    pub async fn remove_listed(&self, listed: &Listed) -> io::Result<()> {
        match self.handle.route().del(listed.message.clone()).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(io_err(&format!("removing route {}", listed.entry.prefix), e)),
        }
    }

    /// Every route in `table`, both families.
    pub async fn dump_table(&self, table: u32) -> io::Result<Vec<Entry>> {
        Ok(self.list_table(table).await?.into_iter().map(|l| l.entry).collect())
    }

    /// Every route in `table`, both families, each with the kernel's own message. The request names the
    /// table, so a strict connection gets that table only; the filter here covers a plain one.
    pub async fn list_table(&self, table: u32) -> io::Result<Vec<Listed>> {
        let names = self.link_names().await?;
        let mut listed = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut request = RouteMessage::default();
            request.header.address_family = family;
            // A dump request's protocol, type and scope are filters under strict checking: left unset here.
            if table <= 255 {
                request.header.table = table as u8;
            } else {
                request.attributes.push(RouteAttribute::Table(table));
            }
            let routes: Vec<RouteMessage> = match self.handle.route().get(request).execute().try_collect().await {
                Ok(routes) => routes,
                Err(e) if family_unsupported(&e) => continue,
                Err(e) => return Err(io_err("listing routes", e)),
            };
            // A kernel without one family may answer its dump with every family's routes: keep only the
            // family asked for, or a route would be listed twice and removed as its own duplicate.
            let asked = |r: &RouteMessage| r.header.address_family == family && route_table(r) == table;
            for route in routes.into_iter().filter(asked) {
                let Some(prefix) = route_prefix(&route) else { continue };
                let oif =
                    route.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None });
                let entry = Entry {
                    prefix,
                    throw: route.header.kind == RouteType::Throw,
                    oif,
                    device: oif.and_then(|i| names.iter().find(|(j, _)| *j == i).map(|(_, n)| n.clone())),
                    protocol: u8::from(route.header.protocol),
                };
                listed.push(Listed { entry, message: route });
            }
        }
        Ok(listed)
    }

    async fn link_names(&self) -> io::Result<Vec<(u32, String)>> {
        let links: Vec<_> =
            self.handle.link().get().execute().try_collect().await.map_err(|e| io_err("listing links", e))?;
        Ok(links
            .into_iter()
            .filter_map(|l| {
                let name = l
                    .attributes
                    .iter()
                    .find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n.clone()) } else { None })?;
                Some((l.header.index, name))
            })
            .collect())
    }

    /// Prefixes of the subnets directly connected to this host, on every interface but loopback and
    /// `except` (the mesh device).
    pub async fn connected_prefixes(&self, except: u32) -> io::Result<Vec<IpNet>> {
        let links: Vec<_> =
            self.handle.link().get().execute().try_collect().await.map_err(|e| io_err("listing links", e))?;
        let loopback: Vec<u32> =
            links.iter().filter(|l| l.header.flags.contains(LinkFlags::Loopback)).map(|l| l.header.index).collect();
        let addresses: Vec<_> =
            self.handle.address().get().execute().try_collect().await.map_err(|e| io_err("listing addresses", e))?;
        let mut prefixes: Vec<IpNet> = addresses
            .into_iter()
            .filter(|a| a.header.index != except && !loopback.contains(&a.header.index))
            .filter_map(|a| {
                let addr = local_address(&a.attributes)?;
                IpNet::new(addr, a.header.prefix_len).ok().map(|n| n.trunc())
            })
            // A host address (/32, /128) is no subnet to protect.
            .filter(|n| n.prefix_len() < n.max_prefix_len())
            .collect();
        prefixes.sort();
        prefixes.dedup();
        Ok(prefixes)
    }

    /// Every address configured on the host, on any interface.
    pub async fn local_addresses(&self) -> io::Result<Vec<std::net::IpAddr>> {
        let addresses: Vec<_> =
            self.handle.address().get().execute().try_collect().await.map_err(|e| io_err("listing addresses", e))?;
        Ok(addresses.iter().filter_map(|a| local_address(&a.attributes)).collect())
    }

    /// The interface (index, name) whose directly connected subnet holds `addr`, other than `except`.
    pub async fn interface_with_subnet(
        &self,
        addr: std::net::IpAddr,
        except: u32,
    ) -> io::Result<Option<(u32, String)>> {
        let addresses: Vec<_> =
            self.handle.address().get().execute().try_collect().await.map_err(|e| io_err("listing addresses", e))?;
        let names = self.link_names().await?;
        for a in addresses.into_iter().filter(|a| a.header.index != except) {
            let Some(ip) = local_address(&a.attributes) else {
                continue;
            };
            if IpNet::new(ip, a.header.prefix_len)
                .is_ok_and(|n| n.prefix_len() < n.max_prefix_len() && n.contains(&addr))
            {
                let name = names.iter().find(|(i, _)| *i == a.header.index).map(|(_, n)| n.clone()).unwrap_or_default();
                return Ok(Some((a.header.index, name)));
            }
        }
        Ok(None)
    }

    /// Answers ARP (IPv4) or neighbour solicitations (IPv6) for `addr` on interface `index` on the host's
    /// behalf: `ip neigh add proxy <addr> dev <if>`.
    pub async fn add_proxy_neighbour(&self, index: u32, addr: std::net::IpAddr) -> io::Result<()> {
        self.handle
            .neighbours()
            .add(index, addr)
            .flags(NeighbourFlags::Proxy)
            .replace()
            .execute()
            .await
            .map_err(|e| io_err(&format!("adding proxy neighbour {addr}"), e))
    }

    pub async fn del_proxy_neighbour(&self, index: u32, addr: std::net::IpAddr) -> io::Result<()> {
        let mut message = NeighbourMessage::default();
        message.header.ifindex = index;
        message.header.family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        message.header.flags = NeighbourFlags::Proxy;
        message.attributes.push(NeighbourAttribute::Destination(match addr {
            std::net::IpAddr::V4(a) => NeighbourAddress::Inet(a),
            std::net::IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
        match self.handle.neighbours().del(message).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(io_err(&format!("removing proxy neighbour {addr}"), e)),
        }
    }

    /// The rules of one family; `None` when the kernel has no such family.
    async fn list_rules(&self, version: IpVersion) -> io::Result<Option<Vec<RuleMessage>>> {
        match self.handle.rule().get(version).execute().try_collect().await {
            Ok(rules) => Ok(Some(rules)),
            Err(e) if family_unsupported(&e) => Ok(None),
            Err(e) => Err(io_err("listing rules", e)),
        }
    }

    /// Makes the policy rules exactly the desired eight: adds the missing, removes duplicates and meshd
    /// rules of the wrong shape. Returns the priorities of the rules it added.
    pub async fn ensure_rules(&self, policy: &RoutingPolicy) -> io::Result<Vec<(bool, u32)>> {
        let status = self.rule_status(policy).await?;
        for rule in status.stray {
            match self.handle.rule().del(rule).execute().await {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(io_err("removing a stray rule", e)),
            }
        }
        for &(v6, priority) in &status.missing {
            let w = desired_rules(policy).into_iter().find(|w| w.priority == priority).expect("a wanted priority");
            self.add_rule(v6, w.priority, w.action, w.table, w.mark).await?;
        }
        Ok(status.missing)
    }

    /// Which of meshd's rules are missing, and which rules at its priorities are duplicates or of the wrong
    /// shape, without changing anything.
    pub async fn rule_status(&self, policy: &RoutingPolicy) -> io::Result<RuleStatus> {
        let mut status = RuleStatus::default();
        for (version, v6) in [(IpVersion::V4, false), (IpVersion::V6, true)] {
            let Some(rules) = self.list_rules(version).await? else { continue };
            let wanted = desired_rules(policy);
            let mut seen = vec![false; wanted.len()];
            for rule in rules.into_iter().filter(|r| is_ours(r, policy)) {
                match wanted.iter().position(|w| w.matches(&rule)) {
                    Some(i) if !seen[i] => seen[i] = true,
                    _ => status.stray.push(rule),
                }
            }
            for (w, present) in wanted.iter().zip(seen) {
                if present {
                    status.present += 1;
                } else {
                    status.missing.push((v6, w.priority));
                }
            }
        }
        Ok(status)
    }

    /// A netlink socket subscribed to route, rule and address changes (what `ip monitor` shows).
    pub fn subscribe() -> io::Result<Subscription> {
        Self::subscribe_for(None)
    }

    /// [`Netlink::subscribe`] whose events stop after `lifetime`: fault injection, so tests can show that
    /// its owner subscribes again.
    pub fn subscribe_for(lifetime: Option<std::time::Duration>) -> io::Result<Subscription> {
        use rtnetlink::MulticastGroup as G;
        let groups = [G::Ipv4Route, G::Ipv6Route, G::Ipv4Rule, G::Ipv6Rule, G::Ipv4Ifaddr, G::Ipv6Ifaddr];
        let (connection, handle, messages) = rtnetlink::new_multicast_connection(&groups)?;
        drive_for(connection, lifetime);
        Ok(Subscription { events: messages, _handle: handle })
    }

    async fn add_rule(
        &self,
        v6: bool,
        priority: u32,
        action: RuleAction,
        table: u32,
        mark: Option<(u32, u32)>,
    ) -> io::Result<()> {
        let mut request = self.handle.rule().add().priority(priority).action(action);
        if table != 0 {
            request = request.table_id(table);
        } else {
            // rtnetlink starts every rule at table main; an unreachable rule names no table at all.
            request.message_mut().header.table = 0;
        }
        if let Some((mark, mask)) = mark {
            request = request.fw_mark(mark);
            request.message_mut().attributes.push(RuleAttribute::FwMask(mask));
        }
        let result = if v6 { request.v6().execute().await } else { request.v4().execute().await };
        result.map_err(|e| io_err(&format!("adding rule {priority}"), e))
    }

    /// Removes the rules that are exactly meshd's (priority, action, table, mark and mask all equal).
    pub async fn remove_rules(&self, policy: &RoutingPolicy) -> io::Result<()> {
        let wanted = desired_rules(policy);
        for version in [IpVersion::V4, IpVersion::V6] {
            let Some(rules) = self.list_rules(version).await? else { continue };
            for rule in rules {
                if wanted.iter().any(|w| w.matches(&rule)) {
                    match self.handle.rule().del(rule).execute().await {
                        Ok(()) => {}
                        Err(e) if is_not_found(&e) => {}
                        Err(e) => return Err(io_err("removing a rule", e)),
                    }
                }
            }
        }
        Ok(())
    }
}

fn route_prefix(route: &RouteMessage) -> Option<IpNet> {
    let len = route.header.destination_prefix_length;
    let addr = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(std::net::IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(std::net::IpAddr::V6(*a)),
        _ => None,
    });
    let addr = match (addr, route.header.address_family) {
        (Some(a), _) => a,
        (None, AddressFamily::Inet) => std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (None, AddressFamily::Inet6) => std::net::IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    IpNet::new(addr, len).ok()
}

/// One of the policy rules meshd wants.
struct WantedRule {
    priority: u32,
    action: RuleAction,
    table: u32,
    mark: Option<(u32, u32)>,
}

impl WantedRule {
    fn matches(&self, rule: &RuleMessage) -> bool {
        // meshd's rules select by nothing but priority and mark: a rule with any other selector (source,
        // destination, interfaces, ports, uid, an inverted match) at the same priority is someone else's. The
        // kernel reports the suppress attributes on every rule, -1 meaning unset.
        let selects_more = rule.header.src_len != 0
            || rule.header.dst_len != 0
            || rule.header.tos != 0
            || !rule.header.flags.is_empty() || rule.attributes.iter().any(|a| {
            matches!(
                a,
                RuleAttribute::Source(_)
                    | RuleAttribute::Destination(_)
                    | RuleAttribute::Iifname(_)
                    | RuleAttribute::Oifname(_)
                    | RuleAttribute::UidRange(_)
                    | RuleAttribute::IpProtocol(_)
                    | RuleAttribute::SourcePortRange(_)
                    | RuleAttribute::DestinationPortRange(_)
            ) || matches!(a, RuleAttribute::SuppressPrefixLen(n) | RuleAttribute::SuppressIfGroup(n) if *n != u32::MAX)
        });
        if selects_more {
            return false;
        }
        let mut priority = None;
        let mut table = u32::from(rule.header.table);
        let (mut mark, mut mask) = (None, None);
        for attribute in &rule.attributes {
            match attribute {
                RuleAttribute::Priority(p) => priority = Some(*p),
                RuleAttribute::Table(t) => table = *t,
                RuleAttribute::FwMark(m) => mark = Some(*m),
                RuleAttribute::FwMask(m) => mask = Some(*m),
                _ => {}
            }
        }
        let want_table = if self.table == 0 { 0 } else { self.table };
        priority == Some(self.priority)
            && rule.header.action == self.action
            && (self.action != RuleAction::ToTable || table == want_table)
            && match self.mark {
                Some((m, k)) => mark == Some(m) && mask == Some(k),
                None => mark.is_none(),
            }
    }
}

fn desired_rules(policy: &RoutingPolicy) -> [WantedRule; 4] {
    let mark = Some((policy.fwmark, policy.fwmask));
    [
        WantedRule { priority: policy.marked_main, action: RuleAction::ToTable, table: TABLE_MAIN, mark },
        WantedRule { priority: policy.marked_default, action: RuleAction::ToTable, table: TABLE_DEFAULT, mark },
        WantedRule { priority: policy.marked_unreachable, action: RuleAction::Unreachable, table: 0, mark },
        WantedRule { priority: policy.lookup_table, action: RuleAction::ToTable, table: policy.table, mark: None },
    ]
}

/// Whether a netlink message from the subscription concerns meshd's state (a route in any table, a rule,
/// an address), so a reconcile is worth scheduling.
/// Route changes count only in `table`: a host with a busy main table (a BGP daemon, a Kubernetes node)
/// must not make meshd re-check its own table on every change elsewhere.
pub fn is_relevant(message: &NetlinkMessage<RouteNetlinkMessage>, table: u32) -> bool {
    use rtnetlink::packet_core::NetlinkPayload;
    match &message.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRoute(r) | RouteNetlinkMessage::NewRoute(r)) => {
            route_table(r) == table
        }
        NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::DelRule(_)
            | RouteNetlinkMessage::NewRule(_)
            | RouteNetlinkMessage::NewAddress(_)
            | RouteNetlinkMessage::DelAddress(_),
        ) => true,
        _ => false,
    }
}

/// The host's own address in an address message: `IFA_LOCAL` when present (on point-to-point links
/// `IFA_ADDRESS` is the far end), else `IFA_ADDRESS`.
fn local_address(attributes: &[AddressAttribute]) -> Option<std::net::IpAddr> {
    let local = attributes.iter().find_map(|a| if let AddressAttribute::Local(ip) = a { Some(*ip) } else { None });
    local.or_else(|| {
        attributes.iter().find_map(|a| if let AddressAttribute::Address(ip) = a { Some(*ip) } else { None })
    })
}

/// meshd's policy rules as the kernel holds them.
#[derive(Debug, Default)]
pub struct RuleStatus {
    pub present: usize,
    /// (IPv6?, priority) of each wanted rule that is not there.
    pub missing: Vec<(bool, u32)>,
    /// Duplicates, and rules at meshd's priorities for its table or mark that have the wrong shape.
    pub stray: Vec<RuleMessage>,
}

/// Route, rule and address changes as the kernel announces them.
#[derive(Debug)]
pub struct Subscription {
    pub events: Events,
    // The connection task stops when its last handle is gone, and the events with it.
    _handle: Handle,
}

/// One route, rule or address change, and where it came from.
pub type Event = (NetlinkMessage<RouteNetlinkMessage>, rtnetlink::sys::SocketAddr);

/// The receiving end of [`Netlink::subscribe`].
pub type Events = futures_channel::mpsc::UnboundedReceiver<Event>;

fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None })
        .unwrap_or(u32::from(route.header.table))
}

fn is_ours(rule: &RuleMessage, policy: &RoutingPolicy) -> bool {
    let mut priority = None;
    let mut table = u32::from(rule.header.table);
    let mut mark = None;
    for attribute in &rule.attributes {
        match attribute {
            RuleAttribute::Priority(p) => priority = Some(*p),
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::FwMark(m) => mark = Some(*m),
            _ => {}
        }
    }
    priority.is_some_and(|p| policy.priorities().contains(&p)) && (table == policy.table || mark == Some(policy.fwmark))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_whose_driver_ended_says_so() {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let alive = drive_for(
            async move {
                let _ = stopped.await;
            },
            None,
        );
        tokio::task::yield_now().await;
        assert!(alive.load(Ordering::Relaxed), "running");
        stop.send(()).unwrap();
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(!alive.load(Ordering::Relaxed), "the owner sees it ended and connects again");
    }
}
