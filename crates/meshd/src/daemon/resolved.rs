//! The systemd-resolved mode of host DNS: when resolved owns the host's DNS, meshd does not touch
//! /etc/resolv.conf but tells resolved over D-Bus (org.freedesktop.resolve1.Manager, the calls Tailscale's
//! resolved manager makes) that the TUN device has a DNS server, the mesh's resolver, for the mesh domain,
//! its split zones and reverse zones (routing-only `~` domains), plus the search domains. Programs asking
//! 127.0.0.53 then reach the mesh for those names only, and every other name goes where it went before.
//! resolved forgets a link's settings when the link goes away, so a crash leaves nothing to put back.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use zbus::Connection;

const DESTINATION: &str = "org.freedesktop.resolve1";
const PATH: &str = "/org/freedesktop/resolve1";
const MANAGER: &str = "org.freedesktop.resolve1.Manager";
/// resolved answers in milliseconds; one that does not within this is treated as gone.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// What resolved should hold for the TUN device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkDns {
    pub servers: Vec<IpAddr>,
    /// Search domains (also routed here).
    pub search: Vec<String>,
    /// Routing-only domains (`~zone`): split zones, the reverse zones; `.` routes everything (override).
    pub routing: Vec<String>,
    /// Whether this link takes queries no other link's domain matches (override_local_dns).
    pub default_route: bool,
}

/// Whether systemd-resolved owns the host's DNS, as Tailscale decides it: /etc/resolv.conf is resolved's
/// file (a link into /run/systemd/resolve) or names only its stub 127.0.0.53, and resolved answers on the
/// system bus.
pub async fn owns_host_dns(resolv_conf: &Path) -> Option<Connection> {
    let linked = std::fs::read_link(resolv_conf).is_ok_and(|t| t.to_string_lossy().contains("/run/systemd/resolve/"));
    let text = std::fs::read_to_string(resolv_conf).unwrap_or_default();
    let servers = super::resolv_conf::parse(&text).nameservers;
    let stub_only = !servers.is_empty() && servers.iter().all(|s| *s == IpAddr::from([127, 0, 0, 53]));
    if !linked && !stub_only {
        return None;
    }
    let connect = async {
        let connection = zbus::connection::Builder::system().method_timeout(CALL_TIMEOUT).build().await.ok()?;
        let reply = connection
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "NameHasOwner",
                &(DESTINATION,),
            )
            .await
            .ok()?;
        let owned: bool = reply.body().deserialize().ok()?;
        owned.then_some(connection)
    };
    let found = tokio::time::timeout(CALL_TIMEOUT * 2, connect).await.ok().flatten();
    if found.is_none() {
        tracing::info!(
            "/etc/resolv.conf is systemd-resolved's but resolved does not answer on the system bus; using direct mode"
        );
    }
    found
}

async fn call<B>(connection: &Connection, method: &str, body: &B) -> Result<(), String>
where
    B: serde::Serialize + zbus::zvariant::DynamicType,
{
    match tokio::time::timeout(
        CALL_TIMEOUT,
        connection.call_method(Some(DESTINATION), PATH, Some(MANAGER), method, body),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("systemd-resolved {method}: {e}")),
        Err(_) => Err(format!("systemd-resolved {method}: no answer within {CALL_TIMEOUT:?}")),
    }
}

/// Gives link `ifindex` the mesh's DNS settings.
pub async fn set_link(connection: &Connection, ifindex: u32, dns: &LinkDns) -> Result<(), String> {
    let index = i32::try_from(ifindex).map_err(|_| format!("interface index {ifindex} out of range"))?;
    let servers: Vec<(i32, Vec<u8>)> = dns
        .servers
        .iter()
        .map(|ip| match ip {
            IpAddr::V4(v4) => (libc_af_inet(), v4.octets().to_vec()),
            IpAddr::V6(v6) => (libc_af_inet6(), v6.octets().to_vec()),
        })
        .collect();
    let domains: Vec<(String, bool)> =
        dns.search.iter().map(|d| (d.clone(), false)).chain(dns.routing.iter().map(|d| (d.clone(), true))).collect();
    call(connection, "SetLinkDNS", &(index, servers)).await?;
    call(connection, "SetLinkDomains", &(index, domains)).await?;
    call(connection, "SetLinkDefaultRoute", &(index, dns.default_route)).await?;
    // The mesh's names are not for multicast name resolution, and the resolver does not sign its answers.
    for (method, value) in [("SetLinkLLMNR", "no"), ("SetLinkMulticastDNS", "no"), ("SetLinkDNSSEC", "no")] {
        if let Err(e) = call(connection, method, &(index, value)).await {
            tracing::debug!("{e}");
        }
    }
    if let Err(e) = call(connection, "FlushCaches", &()).await {
        tracing::debug!("{e}");
    }
    Ok(())
}

/// Drops everything meshd told resolved about link `ifindex`.
pub async fn revert_link(connection: &Connection, ifindex: u32) -> Result<(), String> {
    let index = i32::try_from(ifindex).map_err(|_| format!("interface index {ifindex} out of range"))?;
    call(connection, "RevertLink", &(index,)).await
}

/// Address family numbers as resolved expects them (Linux's AF_INET and AF_INET6).
fn libc_af_inet() -> i32 {
    2
}

fn libc_af_inet6() -> i32 {
    10
}
