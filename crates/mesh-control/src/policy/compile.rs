//! Policy + nodes → each node's packet filter and the peers it may see, with the semantics Tailscale shows
//! (research/policy-dns-ha.md §1.4–1.5, checked against its captured behaviour in tests/conformance.rs):
//! - a node receives a rule when one of the rule's destinations is one of its addresses, overlaps one of its
//!   approved subnet routes, or is `*`; approved exit nodes receive `autogroup:internet`;
//! - `*` as a source is every mesh address and every approved subnet route (exit routes excluded);
//! - two nodes see each other when either may reach the other, a router counting as its subnets;
//! - `autogroup:self` is compiled once per user, not once per node.
//!
//! Node sets are bitsets so the peer sets of ten thousand nodes are rows of words, not pair scans.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use mesh_proto::{DstPorts, FilterRule};

use super::{Alias, Policy, PortRange};

/// A node as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyNode {
    pub id: u64,
    pub name: String,
    /// The owning user's login. A tagged node belongs to its tags, not to the user who made it.
    pub user: Option<String>,
    pub tags: Vec<String>,
    pub addresses: Vec<IpAddr>,
    /// Approved routes, exit routes (`0.0.0.0/0`, `::/0`) included.
    pub approved_routes: Vec<IpNet>,
}

impl PolicyNode {
    fn owner(&self) -> Option<&str> {
        if self.tags.is_empty() { self.user.as_deref() } else { None }
    }

    fn subnet_routes(&self) -> impl Iterator<Item = &IpNet> {
        self.approved_routes.iter().filter(|r| r.prefix_len() != 0)
    }

    pub fn is_exit_node(&self) -> bool {
        self.approved_routes.iter().any(|r| r.prefix_len() == 0)
    }

    fn host_nets(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.addresses.iter().map(|a| IpNet::from(*a))
    }
}

/// What `compile` decided, node by node in the order the nodes were given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// Each node's filter; `None` for every node when the policy has no rules (everything allowed). Shared,
    /// so following a change copies the untouched nodes' filters by reference.
    pub filters: Vec<Option<Arc<Vec<FilterRule>>>>,
    /// The policy line each filter rule comes from, parallel to `filters`.
    pub lines: Vec<Vec<usize>>,
    /// The indexes of the nodes each node may see.
    pub peers: Vec<Vec<usize>>,
    /// Per node, the subnet routes a `via` grant makes it reach through one router in particular.
    pub steering: Vec<BTreeMap<IpNet, usize>>,
}

impl Compiled {
    /// Whether `viewer`'s netmap gives `router` the `route`: when the viewer may send into the route
    /// through the router, or the route (as a source) may reach the viewer. Tailscale leaves other routes
    /// out of a peer's allowed IPs.
    pub fn may_use(&self, nodes: &[PolicyNode], viewer: usize, router: usize, route: &IpNet) -> bool {
        let (Some(at_router), Some(at_viewer)) = (&self.filters[router], &self.filters[viewer]) else {
            return true;
        };
        let from = &nodes[viewer];
        let exit = route.prefix_len() == 0;
        let into_route = |d: &DstPorts| match d.net {
            None => true,
            // Only destinations beyond the router's own addresses and subnets go out through an exit.
            Some(net) if exit => {
                !nodes[router].addresses.iter().any(|a| net.contains(a))
                    && !nodes[router].subnet_routes().any(|r| r.contains(&net))
            }
            Some(net) => overlaps(&net, route),
        };
        let forward = at_router.iter().any(|rule| {
            rule.src
                .iter()
                .any(|s| from.addresses.iter().any(|a| s.contains(a)) || from.subnet_routes().any(|r| overlaps(r, s)))
                && rule.dst.iter().any(into_route)
        });
        let back = || {
            at_viewer
                .iter()
                .any(|rule| rule.src.iter().any(|s| if exit { s.contains(route) } else { overlaps(s, route) }))
        };
        forward || back()
    }

    /// The routes `viewer`'s netmap gives `router`: of those the router serves for everyone (`served`), the
    /// ones the viewer may use and no `via` grant sends elsewhere for it, and the ones a `via` grant sends
    /// through this router.
    pub fn routes_through(&self, nodes: &[PolicyNode], viewer: usize, router: usize, served: &[IpNet]) -> Vec<IpNet> {
        let steering = &self.steering[viewer];
        let mut routes: Vec<IpNet> = served
            .iter()
            .filter(|r| steering.get(r).is_none_or(|k| *k == router) && self.may_use(nodes, viewer, router, r))
            .copied()
            .collect();
        for (route, _) in steering.iter().filter(|(_, k)| **k == router) {
            if !routes.contains(route) {
                routes.push(*route);
            }
        }
        routes
    }
}

/// A set of node indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }

    fn full(n: usize) -> Self {
        let mut b = Bits::new(n);
        for i in 0..n {
            b.insert(i);
        }
        b
    }

    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn contains(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    fn union(&mut self, other: &Bits) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= b;
        }
    }

    fn intersect(&self, other: &Bits) -> Bits {
        Bits(self.0.iter().zip(&other.0).map(|(a, b)| a & b).collect())
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, bits)| {
            let mut bits = *bits;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let i = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(w * 64 + i)
            })
        })
    }
}

/// Who the nodes are, indexed once per compile.
struct Directory<'a> {
    nodes: &'a [PolicyNode],
    by_user: BTreeMap<&'a str, Bits>,
    by_tag: BTreeMap<&'a str, Bits>,
    members: Bits,
    tagged: Bits,
    exits: Bits,
    /// Every approved subnet route (exit routes not included), for `*` as a source.
    subnet_routes: Vec<IpNet>,
    /// Every node address, sorted, for finding the nodes inside a prefix without a scan.
    by_address: Vec<(IpAddr, usize)>,
    /// Each approved subnet route with its router.
    routers: Vec<(IpNet, usize)>,
}

impl<'a> Directory<'a> {
    fn new(nodes: &'a [PolicyNode]) -> Self {
        let n = nodes.len();
        let mut d = Directory {
            nodes,
            by_user: BTreeMap::new(),
            by_tag: BTreeMap::new(),
            members: Bits::new(n),
            tagged: Bits::new(n),
            exits: Bits::new(n),
            subnet_routes: Vec::new(),
            by_address: Vec::new(),
            routers: Vec::new(),
        };
        for (i, node) in nodes.iter().enumerate() {
            if let Some(user) = node.owner() {
                d.by_user.entry(user).or_insert_with(|| Bits::new(n)).insert(i);
                d.members.insert(i);
            }
            for tag in &node.tags {
                d.by_tag.entry(tag).or_insert_with(|| Bits::new(n)).insert(i);
            }
            if !node.tags.is_empty() {
                d.tagged.insert(i);
            }
            if node.is_exit_node() {
                d.exits.insert(i);
            }
            d.subnet_routes.extend(node.subnet_routes().copied());
            d.by_address.extend(node.addresses.iter().map(|a| (*a, i)));
            d.routers.extend(node.subnet_routes().map(|r| (*r, i)));
        }
        d.by_address.sort_unstable();
        d.subnet_routes.sort();
        d.subnet_routes.dedup();
        d
    }

    /// A user's nodes; `*@domain` is every user of that domain.
    fn user(&self, user: &str) -> Bits {
        if let Some(domain) = user.strip_prefix("*@") {
            let mut b = Bits::new(self.nodes.len());
            for (_, nodes) in self.by_user.iter().filter(|(u, _)| u.rsplit_once('@').is_some_and(|(_, d)| d == domain))
            {
                b.union(nodes);
            }
            return b;
        }
        self.by_user.get(user).cloned().unwrap_or_else(|| Bits::new(self.nodes.len()))
    }

    /// The nodes an alias names as people or machines (not as address ranges).
    fn named(&self, alias: &Alias, policy: &Policy) -> Option<Bits> {
        let n = self.nodes.len();
        Some(match alias {
            Alias::User(u) => self.user(u),
            Alias::Group(g) => {
                let mut b = Bits::new(n);
                for member in policy.groups.get(g).into_iter().flatten() {
                    b.union(&self.user(member));
                }
                b
            }
            Alias::Tag(t) => self.by_tag.get(t.as_str()).cloned().unwrap_or_else(|| Bits::new(n)),
            Alias::Member => self.members.clone(),
            Alias::Tagged => self.tagged.clone(),
            _ => return None,
        })
    }

    /// Nodes with an address inside `net` or an approved subnet route overlapping it.
    fn touching(&self, net: &IpNet) -> Bits {
        let mut b = Bits::new(self.nodes.len());
        let (first, last) = (net.network(), net.broadcast());
        let start = self.by_address.partition_point(|(a, _)| *a < first);
        for (_, i) in self.by_address[start..].iter().take_while(|(a, _)| *a <= last) {
            b.insert(*i);
        }
        for (route, i) in &self.routers {
            if overlaps(route, net) {
                b.insert(*i);
            }
        }
        b
    }

    /// A source alias as the addresses a packet may come from, and the nodes that count as it.
    fn source(&self, alias: &Alias, policy: &Policy, mesh: &[IpNet]) -> (Vec<IpNet>, Bits) {
        let n = self.nodes.len();
        if let Some(nodes) = self.named(alias, policy) {
            let nets = nodes.iter().flat_map(|i| self.nodes[i].host_nets()).collect();
            return (nets, nodes);
        }
        match alias {
            Alias::Any => {
                let mut nets = mesh.to_vec();
                nets.extend(self.subnet_routes.iter().copied());
                (nets, Bits::full(n))
            }
            Alias::DangerAll => {
                (vec!["0.0.0.0/0".parse().expect("literal"), "::/0".parse().expect("literal")], Bits::full(n))
            }
            Alias::Host(_, net) | Alias::Prefix(net) => (vec![*net], self.touching(net)),
            _ => (Vec::new(), Bits::new(n)),
        }
    }
}

pub(super) fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// `autogroup:internet`: every public address, as Tailscale draws it (computed once).
pub fn internet() -> &'static [IpNet] {
    static INTERNET: std::sync::LazyLock<Vec<IpNet>> = std::sync::LazyLock::new(|| {
        let private: Vec<IpNet> = ["10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16"]
            .iter()
            .map(|p| p.parse().expect("literal"))
            .collect();
        let mut nets = Vec::new();
        cover("0.0.0.0/0".parse().expect("literal"), &private, &mut nets);
        nets.push("2000::/3".parse().expect("literal"));
        nets
    });
    &INTERNET
}

/// The prefixes covering `net` minus `holes`.
fn cover(net: IpNet, holes: &[IpNet], out: &mut Vec<IpNet>) {
    if holes.iter().any(|h| h.contains(&net)) {
        return;
    }
    if !holes.iter().any(|h| overlaps(h, &net)) {
        out.push(net);
        return;
    }
    if let Ok(halves) = net.subnets(net.prefix_len() + 1) {
        for half in halves {
            cover(half, holes, out);
        }
    }
}

/// The nodes carrying any of a `via` grant's tags.
fn via_nodes(dir: &Directory<'_>, via: &[String], n: usize) -> Bits {
    let mut nodes = Bits::new(n);
    for tag in via {
        if let Some(tagged) = dir.by_tag.get(tag.as_str()) {
            nodes.union(tagged);
        }
    }
    nodes
}

/// A rule as delivered to one node, before it is written out.
struct Delivered {
    /// Which rule, and for `autogroup:self` which user: deliveries of one are merged.
    from: (usize, Option<usize>),
    line: usize,
    src: Arc<[IpNet]>,
    dst: Vec<DstPorts>,
    protos: Vec<u8>,
}

fn dst_entries(nets: impl IntoIterator<Item = Option<IpNet>>, ports: &[PortRange]) -> Vec<DstPorts> {
    nets.into_iter().flat_map(|net| ports.iter().map(move |p| DstPorts { net, first: p.first, last: p.last })).collect()
}

/// Compiles `policy` for `nodes`; `mesh` is the mesh's own ranges (what `*` means as a source).
pub fn compile(policy: &Policy, nodes: &[PolicyNode], mesh: &[IpNet]) -> Compiled {
    compile_for(policy, nodes, mesh, None).0
}

/// Who a rule reaches, by node id: what decides whether a node change touches it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RuleReach {
    src_nets: Arc<[IpNet]>,
    src: Vec<u64>,
    targets: Vec<u64>,
}

/// A compilation kept to follow changes: when only nodes change, the rules whose reach changed are found,
/// and only the nodes they touch (and the changed nodes) are compiled again; every other node keeps what it
/// had.
#[derive(Debug, Clone)]
pub struct Kept {
    pub policy: Policy,
    pub nodes: Vec<PolicyNode>,
    pub compiled: Compiled,
    mesh: Vec<IpNet>,
    reach: Vec<RuleReach>,
    /// How many nodes the last update compiled (all of them for a first or a policy change).
    pub recompiled: usize,
}

impl Kept {
    pub fn new(policy: &Policy, nodes: &[PolicyNode], mesh: &[IpNet]) -> Self {
        let (compiled, reach) = compile_for(policy, nodes, mesh, None);
        Kept::of(policy, nodes, mesh, compiled, reach, nodes.len())
    }

    fn of(
        policy: &Policy,
        nodes: &[PolicyNode],
        mesh: &[IpNet],
        compiled: Compiled,
        reach: Vec<RuleReach>,
        recompiled: usize,
    ) -> Self {
        Kept { policy: policy.clone(), nodes: nodes.to_vec(), compiled, mesh: mesh.to_vec(), reach, recompiled }
    }

    /// This compilation brought to `policy` and `nodes`.
    pub fn update(&self, policy: &Policy, nodes: &[PolicyNode], mesh: &[IpNet]) -> Self {
        if *policy != self.policy || mesh != self.mesh.as_slice() || policy.rules.is_none() {
            return Kept::new(policy, nodes, mesh);
        }
        let n = nodes.len();
        let rules = policy.rules.as_deref().unwrap_or_default();
        let dir = Directory::new(nodes);
        // Each rule resolved once: its reach decides who is compiled again, then those are.
        let resolved = resolve(policy, rules, &dir, mesh);
        let reach = reach_of(&resolved, nodes);
        let index: HashMap<u64, usize> = nodes.iter().enumerate().map(|(i, x)| (x.id, i)).collect();
        let old_index: HashMap<u64, usize> = self.nodes.iter().enumerate().map(|(i, x)| (x.id, i)).collect();
        // Changed: joined, left or different; compiled again: those still here, and everyone a touched rule
        // reaches.
        let mut changed: HashSet<u64> =
            nodes.iter().filter(|x| old_index.get(&x.id).is_none_or(|w| self.nodes[*w] != **x)).map(|x| x.id).collect();
        changed.extend(self.nodes.iter().filter(|x| !index.contains_key(&x.id)).map(|x| x.id));
        let mut only = Bits::new(n);
        for id in &changed {
            if let Some(i) = index.get(id) {
                only.insert(*i);
            }
        }
        // A rule is touched when its reach changed or it reaches a changed node (whose addresses or routes
        // its receivers hold); everyone it reaches, before or after, is compiled again.
        for (before, after) in self.reach.iter().zip(&reach) {
            let touched = before != after
                || [before, after].iter().any(|r| r.src.iter().chain(&r.targets).any(|id| changed.contains(id)));
            if touched {
                for id in [before, after].iter().flat_map(|r| r.src.iter().chain(&r.targets)) {
                    if let Some(i) = index.get(id) {
                        only.insert(*i);
                    }
                }
            }
        }
        let mut compiled = emit(rules, &resolved, &dir, Some(&only));
        // Everyone else keeps what they had, their peers and steering renumbered to the new order.
        let renumber = |j: &usize| index.get(&self.nodes[*j].id).copied();
        // Nodes only joined at the end (ids grow): every old index still holds, nothing to renumber.
        let same_order = self.nodes.len() <= nodes.len() && self.nodes.iter().zip(nodes).all(|(a, b)| a.id == b.id);
        for (i, x) in nodes.iter().enumerate() {
            if only.contains(i) {
                continue;
            }
            let was = old_index[&x.id];
            compiled.filters[i] = self.compiled.filters[was].clone();
            compiled.lines[i] = self.compiled.lines[was].clone();
            compiled.peers[i] = if same_order {
                self.compiled.peers[was].clone()
            } else {
                let mut peers: Vec<usize> = self.compiled.peers[was].iter().filter_map(renumber).collect();
                peers.sort_unstable();
                peers
            };
            compiled.steering[i] =
                self.compiled.steering[was].iter().filter_map(|(r, j)| Some((*r, renumber(j)?))).collect();
        }
        Kept::of(policy, nodes, mesh, compiled, reach, only.iter().count())
    }
}

/// Compiles the nodes in `only` (all if none); the others get empty results. Every rule's reach is
/// returned either way.
fn compile_for(
    policy: &Policy,
    nodes: &[PolicyNode],
    mesh: &[IpNet],
    only: Option<&Bits>,
) -> (Compiled, Vec<RuleReach>) {
    let Some(rules) = &policy.rules else {
        let n = nodes.len();
        let compiled = Compiled {
            filters: vec![None; n],
            lines: vec![Vec::new(); n],
            peers: (0..n).map(|i| (0..n).filter(|j| *j != i).collect()).collect(),
            steering: vec![BTreeMap::new(); n],
        };
        return (compiled, Vec::new());
    };
    let dir = Directory::new(nodes);
    let resolved = resolve(policy, rules, &dir, mesh);
    let reach = reach_of(&resolved, nodes);
    (emit(rules, &resolved, &dir, only), reach)
}

/// Where one destination of a rule leads.
#[derive(Debug)]
enum Leads {
    /// `*`: every node, to anything it accepts.
    Any,
    /// `autogroup:internet` through these exit nodes.
    Internet,
    /// A host or prefix, to the nodes in it or routing into it.
    Net(IpNet),
    /// Nodes named as people or machines: each receives its own addresses.
    Nodes,
    /// `autogroup:self`: per user, that user's nodes.
    SelfDevices,
}

#[derive(Debug)]
struct ResolvedDst {
    leads: Leads,
    /// Who receives it (for `autogroup:self`, every user's nodes some source of theirs may reach from).
    targets: Bits,
    ports: Vec<PortRange>,
}

/// A rule's sources and destinations resolved against the nodes, once per compilation.
#[derive(Debug)]
struct Resolved {
    src_nets: Arc<[IpNet]>,
    src_nodes: Bits,
    dsts: Vec<ResolvedDst>,
}

fn resolve(policy: &Policy, rules: &[super::Rule], dir: &Directory<'_>, mesh: &[IpNet]) -> Vec<Resolved> {
    let n = dir.nodes.len();
    rules
        .iter()
        .map(|rule| {
            let mut src_nets = Vec::new();
            let mut src_nodes = Bits::new(n);
            for alias in &rule.src {
                let (nets, nodes) = dir.source(alias, policy, mesh);
                src_nets.extend(nets);
                src_nodes.union(&nodes);
            }
            src_nets.sort();
            src_nets.dedup();
            let via = (!rule.via.is_empty()).then(|| via_nodes(dir, &rule.via, n));
            let dsts = rule
                .dst
                .iter()
                .map(|dst| {
                    let (leads, targets) = match &dst.alias {
                        Alias::SelfDevices => {
                            let mut reached = Bits::new(n);
                            for own in dir.by_user.values() {
                                if !src_nodes.intersect(own).is_empty() {
                                    reached.union(own);
                                }
                            }
                            (Leads::SelfDevices, reached)
                        }
                        Alias::Any => (Leads::Any, Bits::full(n)),
                        // With `via`, only the exit nodes it names carry it (the client still picks one).
                        Alias::Internet => (
                            Leads::Internet,
                            via.as_ref().map_or_else(|| dir.exits.clone(), |v| dir.exits.intersect(v)),
                        ),
                        Alias::Host(_, net) | Alias::Prefix(net) => {
                            let touching = dir.touching(net);
                            (Leads::Net(*net), via.as_ref().map_or(touching.clone(), |v| touching.intersect(v)))
                        }
                        named => (Leads::Nodes, dir.named(named, policy).unwrap_or_else(|| Bits::new(n))),
                    };
                    ResolvedDst { leads, targets, ports: dst.ports.clone() }
                })
                .collect();
            Resolved { src_nets: src_nets.into(), src_nodes, dsts }
        })
        .collect()
}

fn reach_of(resolved: &[Resolved], nodes: &[PolicyNode]) -> Vec<RuleReach> {
    let ids = |bits: &Bits| bits.iter().map(|i| nodes[i].id).collect::<Vec<u64>>();
    resolved
        .iter()
        .map(|r| {
            let mut reached = Bits::new(nodes.len());
            for d in &r.dsts {
                reached.union(&d.targets);
            }
            RuleReach { src_nets: r.src_nets.clone(), src: ids(&r.src_nodes), targets: ids(&reached) }
        })
        .collect()
}

/// Each wanted node's filter, peers and steering from the resolved rules.
fn emit(rules: &[super::Rule], resolved: &[Resolved], dir: &Directory<'_>, only: Option<&Bits>) -> Compiled {
    let nodes = dir.nodes;
    let n = nodes.len();
    let wanted = |i: usize| only.is_none_or(|o| o.contains(i));
    let internet = internet();
    // Rules arrive in order, so a node's deliveries of one rule are next to each other: merging into the
    // last one is enough, without a map per node.
    let mut delivered: Vec<Vec<Delivered>> = (0..n).map(|_| Vec::new()).collect();
    let mut sees: Vec<Bits> = (0..n).map(|i| if wanted(i) { Bits::new(n) } else { Bits(Vec::new()) }).collect();
    let mut steering: Vec<BTreeMap<IpNet, usize>> = vec![BTreeMap::new(); n];
    let mut see = |from: &Bits, to: &Bits| {
        for s in from.iter().filter(|s| wanted(*s)) {
            sees[s].union(to);
        }
        for t in to.iter().filter(|t| wanted(*t)) {
            sees[t].union(from);
        }
    };
    for (index, (rule, r)) in rules.iter().zip(resolved).enumerate() {
        // A rule that reaches none of the wanted nodes, as source or receiver, gives them nothing.
        if let Some(o) = only
            && r.src_nodes.intersect(o).is_empty()
            && r.dsts.iter().all(|d| d.targets.intersect(o).is_empty())
        {
            continue;
        }
        let deliver = |delivered: &mut Vec<Vec<Delivered>>,
                       target: usize,
                       key: Option<usize>,
                       src: &Arc<[IpNet]>,
                       dst: &dyn Fn() -> Vec<DstPorts>| {
            if !wanted(target) {
                return;
            }
            let list = &mut delivered[target];
            match list.last_mut() {
                Some(last) if last.from == (index, key) => last.dst.extend(dst()),
                _ => list.push(Delivered {
                    from: (index, key),
                    line: rule.line,
                    src: src.clone(),
                    dst: dst(),
                    protos: rule.protos.clone(),
                }),
            }
        };
        for dst in &r.dsts {
            let ports = &dst.ports;
            match dst.leads {
                Leads::SelfDevices => {
                    // Per user: the sources that are this user's own untagged nodes, to those same nodes.
                    for (index_of_user, own) in dir.by_user.values().enumerate() {
                        let from = r.src_nodes.intersect(own);
                        if from.is_empty() {
                            continue;
                        }
                        if own.iter().any(wanted) {
                            let src: Arc<[IpNet]> = from.iter().flat_map(|i| nodes[i].host_nets()).collect();
                            for t in own.iter() {
                                let entries = || dst_entries(nodes[t].host_nets().map(Some), ports);
                                deliver(&mut delivered, t, Some(index_of_user), &src, &entries);
                            }
                        }
                        see(&from, own);
                    }
                }
                Leads::Any => {
                    for t in 0..n {
                        deliver(&mut delivered, t, None, &r.src_nets, &|| dst_entries([None], ports));
                    }
                    see(&r.src_nodes, &dst.targets);
                }
                Leads::Internet => {
                    for t in dst.targets.iter() {
                        let entries = || dst_entries(internet.iter().copied().map(Some), ports);
                        deliver(&mut delivered, t, None, &r.src_nets, &entries);
                    }
                    see(&r.src_nodes, &dst.targets);
                }
                Leads::Net(net) => {
                    if !rule.via.is_empty() {
                        // The named routers carry it for these sources, whichever router is primary for others.
                        for t in dst.targets.iter() {
                            for route in nodes[t].subnet_routes().filter(|x| overlaps(x, &net)) {
                                for s in r.src_nodes.iter().filter(|s| *s != t && wanted(*s)) {
                                    steering[s].entry(*route).or_insert(t);
                                }
                            }
                        }
                    }
                    for t in dst.targets.iter() {
                        deliver(&mut delivered, t, None, &r.src_nets, &|| dst_entries([Some(net)], ports));
                    }
                    see(&r.src_nodes, &dst.targets);
                }
                Leads::Nodes => {
                    for t in dst.targets.iter() {
                        let entries = || dst_entries(nodes[t].host_nets().map(Some), ports);
                        deliver(&mut delivered, t, None, &r.src_nets, &entries);
                    }
                    see(&r.src_nodes, &dst.targets);
                }
            }
        }
    }
    let mut filters = Vec::with_capacity(n);
    let mut lines = Vec::with_capacity(n);
    for rules in delivered {
        let mut filter = Vec::with_capacity(rules.len());
        let mut at = Vec::with_capacity(rules.len());
        for d in rules {
            if d.src.is_empty() || d.dst.is_empty() {
                continue;
            }
            at.push(d.line);
            filter.push(FilterRule { src: d.src, dst: d.dst, protos: d.protos });
        }
        filters.push(Some(Arc::new(filter)));
        lines.push(at);
    }
    let peers = sees.iter().enumerate().map(|(i, row)| row.iter().filter(|j| *j != i).collect()).collect();
    Compiled { filters, lines, peers, steering }
}
