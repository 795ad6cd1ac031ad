//! The daemon's side of MagicDNS: the resolver's configuration from the netmap and the host's own
//! resolvers, the sockets that forward what the resolver cannot answer, and `meshd dns query`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use mesh_dataplane::dns::{self as core_dns, RESOLVER_V4, ResolverConfig};
use mesh_proto::{NetMap, RecordKind};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::resolv_conf::Wanted;
use super::resolved::LinkDns;

/// How long one upstream gets to answer before the next is asked.
const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a query may take over all its upstreams; the client gets SERVFAIL after it.
const FORWARD_DEADLINE: Duration = Duration::from_secs(4);
/// Largest answer read from an upstream (the resolver cuts it to the client's size).
const MAX_ANSWER: usize = 65_535;

/// The answer to one forwarded query, for [`mesh_dataplane::Dataplane::dns_answered`].
pub(super) type Answered = (u64, Option<Vec<u8>>);

/// The resolver as the netmap and the host's resolvers make it.
pub(super) fn resolver_config(map: &NetMap, host_nameservers: &[IpAddr]) -> ResolverConfig {
    let settings = map.dns.clone().unwrap_or_default();
    let own_v6 = core_dns::resolver_v6(map.node.ipv6);
    let addresses = vec![IpAddr::V4(RESOLVER_V4), IpAddr::V6(own_v6)];
    let mut hosts = vec![(map.node.name.clone(), vec![IpAddr::V4(map.node.ipv4), IpAddr::V6(map.node.ipv6)])];
    hosts.extend(map.peers.iter().map(|p| (p.name.clone(), vec![IpAddr::V4(p.ipv4), IpAddr::V6(p.ipv6)])));
    let port53 = |ips: &[IpAddr]| ips.iter().map(|ip| SocketAddr::new(*ip, 53)).collect::<Vec<_>>();
    // The host's own resolvers, unless the mesh overrides them; never the resolver itself (a loop).
    let host: Vec<IpAddr> = host_nameservers.iter().copied().filter(|ip| !addresses.contains(ip)).collect();
    let upstreams = if (settings.override_local_dns || host.is_empty()) && !settings.nameservers.is_empty() {
        port53(&settings.nameservers)
    } else {
        port53(&host)
    };
    let mesh_addresses = [IpAddr::V4(map.node.ipv4), IpAddr::V6(map.node.ipv6)];
    let (mesh_v4, mesh_v6) = core_dns::mesh_ranges(&mesh_addresses);
    ResolverConfig {
        addresses,
        domain: map.domain.clone(),
        magic_dns: settings.magic_dns,
        hosts,
        extra: settings
            .extra_records
            .iter()
            .filter(|r| matches!((r.kind, r.value), (RecordKind::A, IpAddr::V4(_)) | (RecordKind::AAAA, IpAddr::V6(_))))
            .map(|r| (r.name.clone(), r.value))
            .collect(),
        split: settings.split.iter().map(|(zone, ips)| (zone.clone(), port53(ips))).collect(),
        upstreams,
        mesh_v4,
        mesh_v6,
    }
}

/// What the host should use: for direct mode, resolv.conf's lines (the resolver first, the mesh domain
/// searched first); for systemd-resolved, the TUN device's link settings (the mesh domain, split zones and the
/// mesh's reverse zones routed to the resolver, everything else left where it went).
pub(super) fn host_wanted(map: &NetMap) -> (Wanted, LinkDns) {
    let settings = map.dns.clone().unwrap_or_default();
    let mut search = Vec::new();
    if settings.magic_dns {
        search.push(map.domain.clone());
    }
    search.extend(settings.search_domains.iter().cloned());
    let servers = vec![IpAddr::V4(RESOLVER_V4), IpAddr::V6(core_dns::resolver_v6(map.node.ipv6))];
    let mut routing: Vec<String> = settings.split.keys().cloned().collect();
    routing.extend(settings.extra_records.iter().map(|r| r.name.clone()));
    // The mesh's reverse zones, one per /16 of 100.64.0.0/10 (not all of 100.in-addr.arpa: the resolver
    // forwards PTRs outside the mesh back to the host, which would send them here again), and the /48's.
    routing.extend((64..128).map(|octet| format!("{octet}.100.in-addr.arpa")));
    let (_, mesh_v6) = core_dns::mesh_ranges(&[IpAddr::V6(map.node.ipv6)]);
    if let Some(zone) = mesh_v6.and_then(core_dns::reverse_name_v6) {
        routing.push(zone.to_ascii().trim_end_matches('.').to_string());
    }
    if settings.override_local_dns {
        routing.push(".".into());
    }
    routing.dedup();
    let link = LinkDns {
        servers: servers.clone(),
        search: search.clone(),
        routing,
        default_route: settings.override_local_dns,
    };
    (Wanted { nameservers: vec![IpAddr::V4(RESOLVER_V4)], search }, link)
}

/// Asks `upstreams` in turn, off the packet loop, and hands the first answer (or `None`) back.
pub(super) fn forward(token: u64, upstreams: Vec<SocketAddr>, query: Vec<u8>, answers: mpsc::Sender<Answered>) {
    tokio::spawn(async move {
        let answer = tokio::time::timeout(FORWARD_DEADLINE, ask_upstreams(&upstreams, &query)).await.ok().flatten();
        let _ = answers.send((token, answer)).await;
    });
}

/// The first upstream's answer whose id is the query's; each gets [`UPSTREAM_TIMEOUT`].
pub(super) async fn ask_upstreams(upstreams: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    let id = query.get(..2)?;
    for upstream in upstreams {
        match tokio::time::timeout(UPSTREAM_TIMEOUT, ask(*upstream, query, id)).await {
            Ok(Ok(answer)) => return Some(answer),
            Ok(Err(e)) => tracing::debug!(%upstream, error = %e, "DNS upstream failed"),
            Err(_) => tracing::debug!(%upstream, "DNS upstream did not answer in time"),
        }
    }
    None
}

async fn ask(upstream: SocketAddr, query: &[u8], id: &[u8]) -> std::io::Result<Vec<u8>> {
    let any: SocketAddr = if upstream.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("an address");
    // A fresh socket (random port) per query, connected so only the upstream's datagrams arrive.
    let socket = UdpSocket::bind(any).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; MAX_ANSWER];
    loop {
        let n = socket.recv(&mut buf).await?;
        if buf.get(..2) == Some(id) {
            buf.truncate(n);
            break;
        }
    }
    // Truncated (TC): the whole answer over TCP, so a client asking the resolver over TCP can have it; the
    // truncated one stands if TCP fails.
    if buf.get(2).is_some_and(|flags| flags & 0x02 != 0)
        && let Ok(whole) = ask_tcp(upstream, query, id).await
    {
        return Ok(whole);
    }
    Ok(buf)
}

async fn ask_tcp(upstream: SocketAddr, query: &[u8], id: &[u8]) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(upstream).await?;
    let len = u16::try_from(query.len()).map_err(|_| std::io::Error::other("query too long"))?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(query).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer).await?;
    if answer.get(..2) != Some(id) {
        return Err(std::io::Error::other("an answer to another query"));
    }
    Ok(answer)
}

/// A query for `meshd dns query NAME TYPE`.
pub(crate) fn build_query(name: &str, kind: &str) -> Result<Vec<u8>, String> {
    let kind: RecordType = kind.to_ascii_uppercase().parse().map_err(|_| format!("{kind:?} is not a record type"))?;
    let fqdn = if name.ends_with('.') { name.to_string() } else { format!("{name}.") };
    let name = Name::from_ascii(&fqdn).map_err(|e| format!("{name:?} is not a domain name: {e}"))?;
    let mut message = Message::new(rand_id(), MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name, kind));
    message.to_vec().map_err(|e| e.to_string())
}

fn rand_id() -> u16 {
    let mut bytes = [0u8; 2];
    let _ = crate::keys::random_bytes(&mut bytes);
    u16::from_be_bytes(bytes)
}

/// An answer as `dig +noall +answer` would show it, with the response code and where it came from.
pub(crate) fn describe(answer: &[u8], from: &str) -> String {
    let Ok(message) = Message::from_vec(answer) else { return format!("an unreadable answer from {from}") };
    let mut out = format!(
        "{} from {from}{}",
        message.metadata.response_code,
        if message.metadata.authoritative { " (authoritative)" } else { "" }
    );
    for record in message.answers.iter().chain(&message.authorities) {
        out.push_str(&format!(
            "\n{}\t{}\t{}\t{}",
            record.name.to_ascii(),
            record.ttl,
            record.record_type(),
            record.data
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::{DnsConfig, Peer};

    fn peer(id: u64, name: &str) -> Peer {
        Peer {
            node_id: id,
            name: name.into(),
            node_key: String::new(),
            ipv4: format!("100.64.0.{id}").parse().unwrap(),
            ipv6: format!("fd7a:115c:a1e0::{id}").parse().unwrap(),
            endpoints: vec![],
            allowed_ips: vec![],
            online: true,
            tags: vec![],
            key_expiry: None,
        }
    }

    fn map(dns: DnsConfig) -> NetMap {
        NetMap {
            version: 1,
            domain: "mesh.internal".into(),
            node: peer(1, "me"),
            routes: vec![],
            peers: vec![peer(2, "db")],
            filter: None,
            dns: Some(dns),
        }
    }

    #[test]
    fn upstreams_are_the_hosts_unless_the_mesh_overrides_them() {
        let host: Vec<IpAddr> = vec!["10.1.0.2".parse().unwrap(), "100.100.100.100".parse().unwrap()];
        let global = DnsConfig { nameservers: vec!["9.9.9.9".parse().unwrap()], ..DnsConfig::default() };
        let config = resolver_config(&map(global.clone()), &host);
        assert_eq!(config.upstreams, vec!["10.1.0.2:53".parse::<SocketAddr>().unwrap()], "never itself");
        assert_eq!(config.addresses[1], "fd7a:115c:a1e0::53".parse::<IpAddr>().unwrap());
        assert_eq!(config.hosts.len(), 2);
        let config = resolver_config(&map(DnsConfig { override_local_dns: true, ..global.clone() }), &host);
        assert_eq!(config.upstreams, vec!["9.9.9.9:53".parse::<SocketAddr>().unwrap()]);
        let config = resolver_config(&map(global), &[]);
        assert_eq!(
            config.upstreams,
            vec!["9.9.9.9:53".parse::<SocketAddr>().unwrap()],
            "the mesh's when the host has none"
        );
    }

    #[test]
    fn the_host_searches_the_mesh_domain_first() {
        let settings = DnsConfig { search_domains: vec!["cwiq.io".into()], ..DnsConfig::default() };
        assert_eq!(host_wanted(&map(settings.clone())).0.search, ["mesh.internal", "cwiq.io"]);
        assert_eq!(host_wanted(&map(DnsConfig { magic_dns: false, ..settings.clone() })).0.search, ["cwiq.io"]);
        let split = DnsConfig { split: [("shared.cwiq.io".to_string(), vec![])].into(), ..settings };
        let (_, link) = host_wanted(&map(split));
        assert_eq!(link.search, ["mesh.internal", "cwiq.io"]);
        assert!(link.routing.contains(&"shared.cwiq.io".to_string()));
        assert!(
            link.routing.contains(&"64.100.in-addr.arpa".to_string())
                && link.routing.contains(&"127.100.in-addr.arpa".to_string())
        );
        assert!(!link.routing.contains(&"100.in-addr.arpa".to_string()), "PTRs outside the mesh would loop");
        assert!(link.routing.contains(&"0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa".to_string()));
        assert!(!link.default_route);
    }
}
