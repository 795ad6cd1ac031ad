//! Addresses, routes and policy rules over rtnetlink.
//!
//! This is the simple version the data plane needs: install on start, remove on stop, and clear leftovers
//! of a previous run first. Reconciling against changes made by others comes with the route manager.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol, RouteScope};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use crate::{ROUTE_PROTOCOL, RoutingPolicy};

/// The kernel's `main` and `default` routing tables.
const TABLE_MAIN: u32 = 254;
const TABLE_DEFAULT: u32 = 253;

#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
}

fn io_err(what: &str, e: rtnetlink::Error) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

const ENOENT: i32 = 2;
const ESRCH: i32 = 3;

/// Whether a netlink error is the kernel saying "no such entry" (deleting what is already gone).
fn is_not_found(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -ENOENT || m.raw_code() == -ESRCH)
}

impl Netlink {
    /// Opens a netlink connection; its driver runs on the current tokio runtime.
    pub fn connect() -> io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self { handle })
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

    pub async fn del_route(&self, index: u32, prefix: IpNet, table: u32) -> io::Result<()> {
        match self.handle.route().del(Self::route_message(index, prefix, table)).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(io_err(&format!("removing route {prefix} from table {table}"), e)),
        }
    }

    /// Removes every route in `table` that carries meshd's protocol number: what a killed run left behind.
    /// Returns how many were removed.
    pub async fn remove_own_routes(&self, table: u32) -> io::Result<usize> {
        let mut removed = 0;
        for version in [IpVersion::V4, IpVersion::V6] {
            let request = match version {
                IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
                IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
            };
            let routes: Vec<RouteMessage> = self
                .handle
                .route()
                .get(request)
                .execute()
                .try_collect()
                .await
                .map_err(|e| io_err("listing routes", e))?;
            for route in routes {
                if route_table(&route) == table && route.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL) {
                    match self.handle.route().del(route).execute().await {
                        Ok(()) => removed += 1,
                        Err(e) if is_not_found(&e) => {}
                        Err(e) => return Err(io_err("removing a leftover route", e)),
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Installs the four policy rules for IPv4 and IPv6, after removing any rule already at those
    /// priorities that points at our table or matches our mark (a previous run's leftovers).
    pub async fn install_rules(&self, policy: &RoutingPolicy) -> io::Result<()> {
        self.remove_rules(policy).await?;
        for v6 in [false, true] {
            let marked = [
                (policy.marked_main, RuleAction::ToTable, TABLE_MAIN),
                (policy.marked_default, RuleAction::ToTable, TABLE_DEFAULT),
                (policy.marked_unreachable, RuleAction::Unreachable, 0),
            ];
            for (priority, action, table) in marked {
                self.add_rule(v6, priority, action, table, Some((policy.fwmark, policy.fwmask))).await?;
            }
            self.add_rule(v6, policy.lookup_table, RuleAction::ToTable, policy.table, None).await?;
        }
        Ok(())
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

    /// Removes the rules at the policy's priorities that belong to meshd (by table or by mark).
    pub async fn remove_rules(&self, policy: &RoutingPolicy) -> io::Result<()> {
        for version in [IpVersion::V4, IpVersion::V6] {
            let rules: Vec<RuleMessage> = self
                .handle
                .rule()
                .get(version)
                .execute()
                .try_collect()
                .await
                .map_err(|e| io_err("listing rules", e))?;
            for rule in rules {
                if is_ours(&rule, policy) {
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
