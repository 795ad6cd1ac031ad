//! The node's resolver (MagicDNS): it answers queries to `100.100.100.100` and `<mesh /48>::53` that the host
//! writes into the TUN device, before any routing, so it works with no host integration at all. Mesh names,
//! extra records and PTRs of mesh addresses are answered here; split zones and everything else are handed
//! to the shell to forward ([`Answer::Forward`]), since forwarding needs sockets.
//!
//! Messages are read and written with hickory-proto. Untrusted input: a query that does not parse gets
//! FORMERR when its header can be read and nothing otherwise; nothing in a query makes the answer larger
//! than the client said it can take.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The resolver's IPv4 address, as in Tailscale (inside the mesh's 100.64.0.0/10).
pub const RESOLVER_V4: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);
/// TTL of answers: short, so a renamed or moved node is found again within seconds.
pub const ANSWER_TTL: u32 = 5;
/// TTL of negative answers, carried by the SOA's minimum (RFC 2308).
pub const NEGATIVE_TTL: u32 = 10;
/// Largest UDP answer given to a client that sent no EDNS (RFC 1035).
const CLASSIC_UDP_SIZE: usize = 512;
/// Largest UDP answer at all, whatever a client offers (Tailscale's cap; keeps clear of fragmentation
/// trouble on most paths).
const MAX_UDP_SIZE: usize = 4095;
/// The payload size this resolver advertises in its own EDNS (the DNS flag day 2020 value).
const OWN_EDNS_SIZE: u16 = 1232;

/// The resolver's IPv6 address inside the mesh's ULA /48 (`<ula48>::53`).
pub fn resolver_v6(mesh_v6: Ipv6Addr) -> Ipv6Addr {
    let s = mesh_v6.segments();
    Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0x53)
}

/// What the resolver should know, as the netmap says it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResolverConfig {
    /// Where it answers: [`RESOLVER_V4`] and the /48's `::53`.
    pub addresses: Vec<IpAddr>,
    /// The mesh's domain (`mesh.internal`).
    pub domain: String,
    /// Answer node names (`NAME.<domain>` and bare `NAME`).
    pub magic_dns: bool,
    /// Every node's name (this node's too) and its mesh addresses.
    pub hosts: Vec<(String, Vec<IpAddr>)>,
    /// Names answered with fixed addresses (lower case, no trailing dot).
    pub extra: Vec<(String, IpAddr)>,
    /// Split zones (lower case, no trailing dot) and their resolvers; an empty list: answered here only.
    pub split: Vec<(String, Vec<SocketAddr>)>,
    /// Where every other name goes.
    pub upstreams: Vec<SocketAddr>,
    /// The mesh's address ranges, the reverse zones this resolver is authoritative for.
    pub mesh_v4: Option<Ipv4Net>,
    pub mesh_v6: Option<Ipv6Net>,
}

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The reply, ready to send back.
    Reply(Vec<u8>),
    /// Send the query, unchanged, to these resolvers in turn; the first reply is the answer.
    Forward(Vec<SocketAddr>),
    /// Not a DNS message at all: nothing to answer.
    Ignore,
}

/// The names a node has, for lookups (lower case, without trailing dot).
#[derive(Debug, Default, Clone)]
struct Addresses {
    v4: Vec<Ipv4Addr>,
    v6: Vec<Ipv6Addr>,
}

impl Addresses {
    fn add(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) if !self.v4.contains(&a) => self.v4.push(a),
            IpAddr::V6(a) if !self.v6.contains(&a) => self.v6.push(a),
            _ => {}
        }
    }
}

/// The resolver: its configuration compiled into lookup tables.
#[derive(Debug, Default)]
pub struct Resolver {
    config: ResolverConfig,
    /// The mesh zone as a name (`mesh.internal.`) and as text (`mesh.internal`).
    zone: Option<Name>,
    zone_text: String,
    /// `NAME.<domain>` → addresses (mesh names only with MagicDNS on).
    nodes: HashMap<String, Addresses>,
    /// Single-label names → addresses (bare node names).
    bare: HashMap<String, Addresses>,
    extra: HashMap<String, Addresses>,
    ptr: HashMap<IpAddr, Name>,
    /// Longest zone first, so the first match is the most specific.
    split: Vec<(String, Vec<SocketAddr>)>,
}

impl Resolver {
    pub fn new(config: ResolverConfig) -> Self {
        let zone_text = config.domain.trim_end_matches('.').to_ascii_lowercase();
        let zone = Name::from_ascii(format!("{zone_text}.")).ok().filter(|_| !zone_text.is_empty());
        let mut resolver = Resolver { zone, zone_text, ..Resolver::default() };
        if config.magic_dns && resolver.zone.is_some() {
            for (name, addresses) in &config.hosts {
                let label = name.to_ascii_lowercase();
                let fqdn = format!("{label}.{}", resolver.zone_text);
                let Ok(ptr_name) = Name::from_ascii(format!("{fqdn}.")) else { continue };
                for ip in addresses {
                    resolver.nodes.entry(fqdn.clone()).or_default().add(*ip);
                    resolver.bare.entry(label.clone()).or_default().add(*ip);
                    resolver.ptr.entry(*ip).or_insert_with(|| ptr_name.clone());
                }
            }
        }
        for (name, ip) in &config.extra {
            resolver.extra.entry(name.trim_end_matches('.').to_ascii_lowercase()).or_default().add(*ip);
        }
        if let Some(zone) = &resolver.zone
            && let Ok(me) = Name::from_ascii("resolver").and_then(|n| n.append_domain(zone))
        {
            for ip in &config.addresses {
                resolver.ptr.insert(*ip, me.clone());
            }
        }
        resolver.split = config.split.clone();
        resolver.split.sort_by_key(|(zone, _)| std::cmp::Reverse(zone.len()));
        resolver.config = config;
        resolver
    }

    pub fn config(&self) -> &ResolverConfig {
        &self.config
    }

    /// The addresses a name has here (an extra record, a node's FQDN or bare name), IPv4 first; none for a
    /// name the mesh does not answer. For userspace mode's forwards and proxies, which dial by name.
    pub fn lookup(&self, name: &str) -> Vec<IpAddr> {
        let text = name.trim_end_matches('.').to_ascii_lowercase();
        let found = self.extra.get(&text).or_else(|| {
            if !self.config.magic_dns {
                return None;
            }
            self.nodes.get(&text).or_else(|| if text.contains('.') { None } else { self.bare.get(&text) })
        });
        found.map_or_else(Vec::new, |a| {
            a.v4.iter().map(|&v| IpAddr::V4(v)).chain(a.v6.iter().map(|&v| IpAddr::V6(v))).collect()
        })
    }

    /// Whether `ip` is one of the resolver's addresses.
    pub fn answers_at(&self, ip: IpAddr) -> bool {
        self.config.addresses.contains(&ip)
    }

    /// Answers one query (a UDP payload; `over_tcp`: no size limit but the message's own).
    pub fn answer(&self, query: &[u8], over_tcp: bool) -> Answer {
        let message = match Message::from_vec(query) {
            Ok(m) => m,
            Err(_) => return formerr(query),
        };
        if message.metadata.message_type != MessageType::Query {
            return Answer::Ignore;
        }
        let mut reply = response_to(&message);
        if message.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(OWN_EDNS_SIZE);
            reply.set_edns(edns);
        }
        let limit = answer_limit(&message, over_tcp);
        if message.metadata.op_code != OpCode::Query {
            reply.metadata.response_code = ResponseCode::NotImp;
            return finish(reply, limit);
        }
        let [question] = message.queries.as_slice() else {
            reply.metadata.response_code = ResponseCode::FormErr;
            return finish(reply, limit);
        };
        if question.query_class() != DNSClass::IN {
            reply.metadata.response_code = ResponseCode::NotImp;
            return finish(reply, limit);
        }
        let name = question.name();
        let text = name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
        let kind = question.query_type();

        if let Some(found) = self.extra.get(&text) {
            reply.metadata.authoritative = true;
            answer_addresses(&mut reply, name, kind, found);
            return finish(reply, limit);
        }
        if self.config.magic_dns
            && let Some(zone) = self.zone.clone()
        {
            let in_zone = within(&text, &self.zone_text);
            let bare = !text.is_empty() && !text.contains('.');
            if in_zone || (bare && self.bare.contains_key(&text)) {
                reply.metadata.authoritative = true;
                let found = if bare { self.bare.get(&text) } else { self.nodes.get(&text) };
                match found {
                    Some(found) => {
                        answer_addresses(&mut reply, name, kind, found);
                        if reply.answers.is_empty() {
                            reply.add_authority(soa(&zone));
                        }
                    }
                    None if text == self.zone_text => match kind {
                        RecordType::SOA => {
                            reply.add_answer(soa(&zone));
                        }
                        _ => {
                            reply.add_authority(soa(&zone));
                        }
                    },
                    None => {
                        reply.metadata.response_code = ResponseCode::NXDomain;
                        reply.add_authority(soa(&zone));
                    }
                }
                return finish(reply, limit);
            }
        }
        if let Some(zone) = self.reverse_zone(&text) {
            reply.metadata.authoritative = true;
            let address = reverse_address(&text);
            match address.and_then(|ip| self.ptr.get(&ip)) {
                Some(target) if kind == RecordType::PTR => {
                    reply.add_answer(Record::from_rdata(name.clone(), ANSWER_TTL, RData::PTR(PTR(target.clone()))));
                }
                Some(_) => {
                    reply.add_authority(soa(&zone));
                }
                None if address.is_some() => {
                    reply.metadata.response_code = ResponseCode::NXDomain;
                    reply.add_authority(soa(&zone));
                }
                // A name above the addresses (the /48's apex, `5.64.100.in-addr.arpa`): it exists as a
                // branch, so NODATA, not NXDOMAIN (which RFC 8020 resolvers take for the whole subtree).
                None if kind == RecordType::SOA && name.to_lowercase() == zone => {
                    reply.add_answer(soa(&zone));
                }
                None => {
                    reply.add_authority(soa(&zone));
                }
            }
            return finish(reply, limit);
        }
        if let Some((_, resolvers)) = self.split.iter().find(|(zone, _)| within(&text, zone)) {
            if resolvers.is_empty() {
                // A zone kept local: only its extra records exist (answered above).
                reply.metadata.response_code = ResponseCode::NXDomain;
                return finish(reply, limit);
            }
            return Answer::Forward(resolvers.clone());
        }
        if self.config.upstreams.is_empty() {
            reply.metadata.response_code = ResponseCode::ServFail;
            return finish(reply, limit);
        }
        Answer::Forward(self.config.upstreams.clone())
    }

    /// The reverse zone a name falls in when it is one this resolver owns (the mesh's ranges, and the
    /// resolver's own addresses).
    fn reverse_zone(&self, text: &str) -> Option<Name> {
        let address = reverse_address(text);
        if let Some(ip) = address
            && self.config.addresses.contains(&ip)
        {
            return Name::from_ascii(format!("{text}.")).ok();
        }
        if let Some(v4) = self.config.mesh_v4
            && text.ends_with(".in-addr.arpa")
        {
            // The zone is the mesh range's whole octets: 64.100.in-addr.arpa for a /10 is too narrow, so the
            // whole 100.in-addr.arpa answers only for addresses inside the range.
            if let Some(IpAddr::V4(ip)) = address
                && v4.contains(&ip)
            {
                return reverse_name_v4(v4);
            }
            // A partial name inside the range (`64.100.in-addr.arpa`, `5.64.100.in-addr.arpa`): answered here
            // too, so it is never forwarded back to a host resolver that routes these zones here.
            if address.is_none()
                && let Some(rest) = text.strip_suffix(".in-addr.arpa")
            {
                let octets: Option<Vec<u8>> = rest.split('.').rev().map(|o| o.parse().ok()).collect();
                if let Some(octets) = octets
                    && (2..=3).contains(&octets.len())
                {
                    let mut full = [0u8; 4];
                    full[..octets.len()].copy_from_slice(&octets);
                    let whole_octets = usize::from(v4.prefix_len().div_ceil(8));
                    if octets.len() >= whole_octets && v4.contains(&Ipv4Addr::from(full)) {
                        return reverse_name_v4(v4);
                    }
                }
            }
        }
        if let Some(v6) = self.config.mesh_v6
            && text.ends_with(".ip6.arpa")
        {
            let zone = reverse_name_v6(v6)?;
            let zone_text = zone.to_ascii();
            if format!("{text}.").ends_with(&zone_text) {
                return Some(zone);
            }
        }
        None
    }
}

/// The largest answer `query`'s client takes: a whole message over TCP; over UDP 512 bytes without EDNS,
/// its EDNS size otherwise, never more than [`MAX_UDP_SIZE`].
fn answer_limit(query: &Message, over_tcp: bool) -> usize {
    if over_tcp {
        return usize::from(u16::MAX);
    }
    query.edns.as_ref().map_or(CLASSIC_UDP_SIZE, |e| usize::from(e.max_payload())).clamp(CLASSIC_UDP_SIZE, MAX_UDP_SIZE)
}

/// Whether `name` is `zone` or a name under it (both lower case, no trailing dot); no allocation, as it runs
/// for every query.
fn within(name: &str, zone: &str) -> bool {
    name == zone
        || (name.len() > zone.len() && name.ends_with(zone) && name.as_bytes()[name.len() - zone.len() - 1] == b'.')
}

/// The empty response to `query`: its id, opcode, question and recursion-desired flag.
fn response_to(query: &Message) -> Message {
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_queries(query.queries.iter().cloned());
    reply
}

/// A reply for a query whose header can be read but whose body cannot.
fn formerr(query: &[u8]) -> Answer {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return Answer::Ignore;
    }
    let id = u16::from_be_bytes([query[0], query[1]]);
    let mut reply = Message::response(id, OpCode::Query);
    reply.metadata.response_code = ResponseCode::FormErr;
    finish(reply, CLASSIC_UDP_SIZE)
}

/// Encodes a reply, truncated (TC set, answers dropped) when it is larger than the client takes, so it asks
/// again over TCP.
fn finish(reply: Message, limit: usize) -> Answer {
    let Ok(bytes) = reply.to_vec() else { return Answer::Ignore };
    if bytes.len() <= limit {
        return Answer::Reply(bytes);
    }
    let mut truncated = reply.truncate();
    truncated.metadata.id = reply.metadata.id;
    match truncated.to_vec() {
        Ok(bytes) => Answer::Reply(bytes),
        Err(_) => Answer::Ignore,
    }
}

fn answer_addresses(reply: &mut Message, name: &Name, kind: RecordType, found: &Addresses) {
    let records: Vec<RData> = match kind {
        RecordType::A => found.v4.iter().map(|a| RData::A(A(*a))).collect(),
        RecordType::AAAA => found.v6.iter().map(|a| RData::AAAA(AAAA(*a))).collect(),
        RecordType::ANY => {
            found.v4.iter().map(|a| RData::A(A(*a))).chain(found.v6.iter().map(|a| RData::AAAA(AAAA(*a)))).collect()
        }
        _ => Vec::new(),
    };
    for rdata in records {
        reply.add_answer(Record::from_rdata(name.clone(), ANSWER_TTL, rdata));
    }
}

/// The SOA of a zone this resolver owns; its minimum is the negative TTL.
fn soa(zone: &Name) -> Record {
    let mname = Name::from_ascii("resolver").and_then(|n| n.append_domain(zone)).unwrap_or_else(|_| zone.clone());
    let rname = Name::from_ascii("hostmaster").and_then(|n| n.append_domain(zone)).unwrap_or_else(|_| zone.clone());
    Record::from_rdata(
        zone.clone(),
        NEGATIVE_TTL,
        RData::SOA(SOA::new(mname, rname, 1, 3600, 600, 86400, NEGATIVE_TTL)),
    )
}

/// The address a full reverse name stands for (`4.3.2.1.in-addr.arpa` → 1.2.3.4; 32 nibbles of ip6.arpa).
fn reverse_address(text: &str) -> Option<IpAddr> {
    if let Some(rest) = text.strip_suffix(".in-addr.arpa") {
        let octets: Vec<u8> = rest.split('.').map(|o| o.parse().ok()).collect::<Option<_>>()?;
        let [d, c, b, a] = octets.as_slice() else { return None };
        return Some(IpAddr::V4(Ipv4Addr::new(*a, *b, *c, *d)));
    }
    let rest = text.strip_suffix(".ip6.arpa")?;
    let nibbles: Vec<u8> = rest
        .split('.')
        .map(|n| if n.len() == 1 { u8::from_str_radix(n, 16).ok() } else { None })
        .collect::<Option<_>>()?;
    if nibbles.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, pair) in nibbles.rchunks(2).enumerate() {
        bytes[i] = (pair[1] << 4) | pair[0];
    }
    Some(IpAddr::V6(Ipv6Addr::from(bytes)))
}

/// The reverse zone of a v4 range, cut at its last whole octet (100.64.0.0/10 → 100.in-addr.arpa).
fn reverse_name_v4(net: Ipv4Net) -> Option<Name> {
    let whole = usize::from(net.prefix_len() / 8);
    let octets = net.network().octets();
    let labels: Vec<String> = octets[..whole].iter().rev().map(u8::to_string).collect();
    Name::from_ascii(format!("{}.in-addr.arpa.", labels.join("."))).ok()
}

/// The reverse zone of a v6 range, cut at its last whole nibble (a /48 → 12 nibbles of ip6.arpa).
pub fn reverse_name_v6(net: Ipv6Net) -> Option<Name> {
    let whole = usize::from(net.prefix_len() / 4);
    let bytes = net.network().octets();
    let nibbles: Vec<String> =
        (0..whole).map(|i| format!("{:x}", (bytes[i / 2] >> if i % 2 == 0 { 4 } else { 0 }) & 0xf)).rev().collect();
    Name::from_ascii(format!("{}.ip6.arpa.", nibbles.join("."))).ok()
}

/// The ranges the resolver is authoritative for, from a node's mesh addresses.
pub fn mesh_ranges(mesh_addresses: &[IpAddr]) -> (Option<Ipv4Net>, Option<Ipv6Net>) {
    let v4 = mesh_addresses.iter().any(IpAddr::is_ipv4).then(|| "100.64.0.0/10".parse().expect("a prefix"));
    let v6 = mesh_addresses.iter().find_map(|a| match a {
        IpAddr::V6(v6) => IpNet::new(IpAddr::V6(*v6), 48).ok().and_then(|n| match n.trunc() {
            IpNet::V6(n) => Some(n),
            IpNet::V4(_) => None,
        }),
        IpAddr::V4(_) => None,
    });
    (v4, v6)
}

/// A forwarded query's answer made fit for the client: its id and question must be the query's (else the
/// client gets SERVFAIL, as it does when every upstream failed), and it is cut to the client's size.
pub fn relay_answer(query: &[u8], answer: Option<&[u8]>, over_tcp: bool) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let limit = answer_limit(&query, over_tcp);
    if let Some(bytes) = answer
        && let Ok(message) = Message::from_vec(bytes)
        && message.metadata.id == query.metadata.id
        && message.metadata.message_type == MessageType::Response
        && message.queries == query.queries
    {
        if bytes.len() <= limit {
            return Some(bytes.to_vec());
        }
        return match finish(message, limit) {
            Answer::Reply(bytes) => Some(bytes),
            _ => None,
        };
    }
    let mut reply = response_to(&query);
    reply.metadata.response_code = ResponseCode::ServFail;
    match finish(reply, limit) {
        Answer::Reply(bytes) => Some(bytes),
        _ => None,
    }
}

pub(crate) mod tcp;

#[cfg(test)]
mod tests;
