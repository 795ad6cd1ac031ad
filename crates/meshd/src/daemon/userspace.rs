//! Userspace mode (`--tun userspace`): the same daemon with no TUN device, no routes and no privileges.
//! Packets the data plane would write into a TUN device go into a smoltcp stack in the process instead, and
//! what that stack sends goes back into the data plane as if read from one. Apps reach the mesh through the
//! forwards, the SOCKS5/HTTP proxy and the DNS stub bound here (loopback by default); peers reach the ports
//! the node exposes. On SIGTERM the ways in close, open flows drain, and a node that cannot outlive its pod
//! (an ephemeral key, or nothing on disk) logs out.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_dataplane::dns::{Answer, Resolver, ResolverConfig};
use std::collections::HashMap;

use mesh_netstack::{
    AppEvent, Credentials, Dial, Expose, Forward, Limits, Proto, Protocols, Stack, UdpError, UdpId, UdpOut,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, oneshot};

use super::{AbortOnDrop, Daemon};
use crate::error::Error;

/// What userspace mode's flags ask for.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub forwards: Vec<Forward>,
    pub exposes: Vec<Expose>,
    /// The DNS stub for the pod (`--dns 127.0.0.53:53`).
    pub dns: Option<SocketAddr>,
    /// Where the stub sends other names (default: the resolv.conf's servers).
    pub dns_upstreams: Vec<IpAddr>,
    pub socks5: Option<SocketAddr>,
    pub http_proxy: Option<SocketAddr>,
    pub proxy_auth: Option<Credentials>,
    /// `/livez` and `/readyz`.
    pub health: Option<SocketAddr>,
    pub limits: Limits,
    /// How long SIGTERM waits for open flows before the node logs out and stops.
    pub drain: Duration,
}

/// A `/readyz` request: answered with why the node is not ready, if it is not.
pub(super) type HealthAsk = oneshot::Sender<Result<(), String>>;

/// What woke the loop on the userspace side.
pub(super) enum Wake {
    /// An app socket can move bytes (the loop's drain does the moving).
    Io,
    App(AppEvent),
    Dns(Vec<u8>, SocketAddr),
    Health(HealthAsk),
}

pub(super) struct Userspace {
    pub stack: Stack,
    pub options: Options,
    events: mpsc::Receiver<AppEvent>,
    /// The association each UDP owner (a forward, a SOCKS5 association) has per app address and family.
    udp: HashMap<(u64, SocketAddr, bool), UdpId>,
    /// The listeners' accept loops; dropped (aborted) when the node stops taking new flows.
    listeners: Vec<AbortOnDrop>,
    /// Kept for its drop: the health server ends with the daemon.
    _health: Option<AbortOnDrop>,
    health_rx: mpsc::Receiver<HealthAsk>,
    dns: Option<Arc<UdpSocket>>,
    dns_buf: Vec<u8>,
    /// The DNS stub's view: the mesh's names, each forward's name answered with its local address, and the
    /// pod's own resolvers for everything else.
    pod_resolver: Resolver,
    /// The pod's resolvers from its resolv.conf, less the stub itself.
    pub pod_nameservers: Vec<IpAddr>,
    /// Set by SIGTERM: the loop ends once the flows are gone or this passes.
    pub draining_until: Option<Instant>,
}

impl std::fmt::Debug for Userspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Userspace").field("stack", &self.stack).finish_non_exhaustive()
    }
}

async fn bind_tcp(address: SocketAddr, flag: &str) -> Result<TcpListener, Error> {
    TcpListener::bind(address).await.map_err(|e| Error::Input(format!("{flag}: cannot listen on {address}: {e}")))
}

impl Options {
    /// Checks the flags together, before anything starts.
    pub fn check(&self) -> Result<(), Error> {
        mesh_netstack::spec::check(&self.forwards, &self.exposes).map_err(Error::Input)
    }
}

impl Userspace {
    /// Binds every way in before the daemon goes on, so a port in use stops it with the flag that asked.
    pub async fn start(options: Options, mtu: u16) -> Result<Self, Error> {
        options.check()?;
        // Bounded: a UDP owner's datagram past it is dropped, a TCP dial waits.
        let (events_tx, events) = mpsc::channel(1024);
        let mut listeners = Vec::new();
        for forward in &options.forwards {
            let flag = format!("--forward {forward}");
            let task = match forward.proto {
                Proto::Tcp => mesh_netstack::listen::spawn_forward(
                    bind_tcp(forward.listen, &flag).await?,
                    forward.target.clone(),
                    events_tx.clone(),
                ),
                Proto::Udp => mesh_netstack::listen::spawn_udp_forward(
                    UdpSocket::bind(forward.listen)
                        .await
                        .map_err(|e| Error::Input(format!("{flag}: cannot listen on {}: {e}", forward.listen)))?,
                    forward.target.clone(),
                    events_tx.clone(),
                ),
            };
            listeners.push(AbortOnDrop(task));
        }
        let same = options.socks5.is_some() && options.socks5 == options.http_proxy;
        for (address, protocols, flag) in [
            (options.socks5, Protocols { socks5: true, http: same }, "--socks5"),
            (options.http_proxy.filter(|_| !same), Protocols { socks5: false, http: true }, "--http-proxy"),
        ] {
            let Some(address) = address else { continue };
            let listener = bind_tcp(address, flag).await?;
            listeners.push(AbortOnDrop(mesh_netstack::listen::spawn_proxy(
                listener,
                protocols,
                options.proxy_auth.clone(),
                events_tx.clone(),
            )));
        }
        let dns = match options.dns {
            Some(address) => Some(Arc::new(UdpSocket::bind(address).await.map_err(|e| {
                let hint = if address.port() < 1024 {
                    " (a port below 1024 needs the sysctl net.ipv4.ip_unprivileged_port_start, a safe pod sysctl)"
                } else {
                    ""
                };
                Error::Input(format!("--dns: cannot listen on {address}: {e}{hint}"))
            })?)),
            None => None,
        };
        let (health_tx, health_rx) = mpsc::channel(16);
        let health = match options.health {
            Some(address) => Some(AbortOnDrop(serve_health(bind_tcp(address, "--health").await?, health_tx))),
            None => None,
        };
        let own_dns = options.dns.map(|a| a.ip());
        let from_resolv_conf = || {
            std::fs::read_to_string("/etc/resolv.conf")
                .map(|text| super::parse_resolv_conf(&text).nameservers)
                .unwrap_or_default()
        };
        let given = options.dns_upstreams.clone();
        let pod_nameservers = (if given.is_empty() { from_resolv_conf() } else { given })
            .into_iter()
            .filter(|ip| Some(*ip) != own_dns && !ip.is_unspecified())
            .collect();
        let mut stack = Stack::new(mtu, options.limits, Instant::now(), super::seed());
        stack.set_exposed(&options.exposes);
        for forward in &options.forwards {
            tracing::info!(listen = %forward.listen, target = %forward.target, "forward");
        }
        Ok(Userspace {
            stack,
            options,
            events,
            udp: HashMap::new(),
            listeners,
            _health: health,
            health_rx,
            dns,
            dns_buf: vec![0; 4096],
            pod_resolver: Resolver::new(ResolverConfig::default()),
            pod_nameservers,
            draining_until: None,
        })
    }

    /// Waits for an app socket, a new app connection, a DNS query or a health check.
    pub async fn wake(&mut self) -> Wake {
        let dns = self.dns.clone();
        let recv_dns = async {
            match &dns {
                Some(socket) => socket.recv_from(&mut self.dns_buf).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = self.stack.ready() => Wake::Io,
            Some(event) = self.events.recv() => Wake::App(event),
            Some(ask) = self.health_rx.recv() => Wake::Health(ask),
            Ok((n, from)) = recv_dns => Wake::Dns(self.dns_buf[..n].to_vec(), from),
        }
    }

    /// The DNS stub's resolver for the mesh's current names: each forward's name answers with the address
    /// its forward listens on (so `psql -h stackeye-db-prd` reaches the forward), other names as MagicDNS
    /// does, the rest from the pod's own resolvers.
    pub fn update_resolver(&mut self, mesh: Option<&ResolverConfig>) {
        let mut config = mesh.cloned().unwrap_or_default();
        let domain = config.domain.trim_end_matches('.').to_string();
        for forward in &self.options.forwards {
            if forward.target.ip().is_some() {
                continue;
            }
            let local = match forward.listen.ip() {
                ip if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                ip => ip,
            };
            let name = forward.target.host.clone();
            if !domain.is_empty() && !name.contains('.') {
                config.extra.push((format!("{name}.{domain}"), local));
            }
            config.extra.push((name, local));
        }
        let port53 = |ip: &IpAddr| SocketAddr::new(*ip, 53);
        config.upstreams = self.pod_nameservers.iter().map(port53).collect();
        self.pod_resolver = Resolver::new(config);
    }

    /// No new flows: the listeners close, exposed ports refuse; open flows go on.
    pub fn stop_accepting(&mut self) {
        self.listeners.clear();
        self.stack.stop_accepting();
    }
}

/// `/livez` (the process answers) and `/readyz` (asked of the loop), plain HTTP/1.1, one request each.
fn serve_health(listener: TcpListener, asks: mpsc::Sender<HealthAsk>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Some((mut stream, _)) = mesh_netstack::listen::accept(&listener).await else { continue };
            let asks = asks.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await else {
                    return;
                };
                let line = String::from_utf8_lossy(&buf[..n]);
                let path = line.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = match path {
                    "/livez" => (200, "ok".to_string()),
                    "/readyz" => {
                        let (tx, rx) = oneshot::channel();
                        let answer = match asks.send(tx).await {
                            Ok(()) => rx.await.unwrap_or_else(|_| Err("meshd is stopping".into())),
                            Err(_) => Err("meshd is stopping".into()),
                        };
                        match answer {
                            Ok(()) => (200, "ready".to_string()),
                            Err(why) => (503, why),
                        }
                    }
                    _ => (404, "not found: /livez or /readyz".to_string()),
                };
                let reply = format!(
                    "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
                    if status == 200 { "OK" } else { "Not Ready" },
                    body.len() + 1
                );
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    })
}

/// The process's effective capabilities, for `status`: "none" in a sidecar run as it should be.
pub(super) fn capabilities() -> String {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = text.lines().find_map(|l| l.strip_prefix("CapEff:")).map(str::trim).unwrap_or("");
    match u64::from_str_radix(effective, 16) {
        Ok(0) => "none".into(),
        Ok(bits) => format!("{bits:#x}"),
        Err(_) => "unknown".into(),
    }
}

/// How long a forward target's session may be quiet and still count as fresh for `/readyz` (WireGuard
/// re-keys every two minutes while traffic flows).
const FRESH_HANDSHAKE: Duration = Duration::from_secs(180);

impl Daemon {
    /// A target's address: its own, or what MagicDNS gives its name now (so a forward follows the name to
    /// whichever address the current netmap gives it).
    fn resolve(&self, target: &mesh_netstack::Target) -> Option<IpAddr> {
        target.ip().or_else(|| self.dataplane.resolver()?.lookup(&target.host).into_iter().next())
    }

    /// An app connection wants a flow: its target is resolved through MagicDNS now (so a forward follows the
    /// name to whichever address the netmap gives it) and the flow opens in the stack.
    pub(super) fn dial(&mut self, dial: Dial) {
        let address = self.resolve(&dial.target);
        let Some(userspace) = self.userspace.as_mut() else { return };
        let Some(ip) = address else {
            mesh_netstack::listen::refuse(dial, "no mesh node or record has that name");
            return;
        };
        let Dial { stream, target, greeting, to_peer, via } = dial;
        tracing::debug!(via, target = %target, address = %ip, "opening a flow");
        if let Err((refusal, stream)) =
            userspace.stack.connect(stream, SocketAddr::new(ip, target.port), greeting, to_peer, Instant::now())
        {
            mesh_netstack::listen::refuse(
                Dial { stream, target, greeting, to_peer: Vec::new(), via },
                &refusal.to_string(),
            );
        }
    }

    /// A datagram from an app: its target resolved through MagicDNS, sent on the owner's association for
    /// that app address (opened on the first datagram, again after an idle close).
    pub(super) fn udp_datagram(&mut self, out: UdpOut) {
        let address = self.resolve(&out.target);
        let Some(userspace) = self.userspace.as_mut() else { return };
        let Some(ip) = address else {
            tracing::debug!(target = %out.target, "a datagram for a name the mesh does not have");
            return;
        };
        let now = Instant::now();
        let to = SocketAddr::new(ip, out.target.port);
        let key = (out.owner, out.client, ip.is_ipv4());
        for _ in 0..2 {
            let id = match userspace.udp.get(&key) {
                Some(id) => *id,
                None => match userspace.stack.udp_open(ip, out.replies.clone(), out.client, out.pinned, now) {
                    Ok(id) => {
                        if userspace.udp.len() >= 4096 {
                            // Forget associations the stack closed (idle, or their owner left).
                            let stack = &userspace.stack;
                            userspace.udp.retain(|_, id| stack.udp_alive(*id));
                        }
                        userspace.udp.insert(key, id);
                        id
                    }
                    Err(refusal) => {
                        tracing::debug!(target = %out.target, "a UDP association refused: {refusal}");
                        return;
                    }
                },
            };
            match userspace.stack.udp_send(id, to, &out.data, now) {
                Err(UdpError::Gone) => {
                    userspace.udp.remove(&key);
                }
                Ok(()) | Err(UdpError::Full) => return,
            }
        }
    }

    /// A query to the pod's DNS stub.
    pub(super) fn pod_dns_query(&mut self, query: Vec<u8>, from: SocketAddr) {
        let Some(userspace) = self.userspace.as_ref() else { return };
        let Some(socket) = userspace.dns.clone() else { return };
        match userspace.pod_resolver.answer(&query, false) {
            Answer::Reply(reply) => {
                let _ = socket.try_send_to(&reply, from);
            }
            Answer::Forward(upstreams) => {
                tokio::spawn(async move {
                    let answer = super::dns::ask_upstreams(&upstreams, &query).await;
                    if let Some(reply) = mesh_dataplane::dns::relay_answer(&query, answer.as_deref(), false) {
                        let _ = socket.send_to(&reply, from).await;
                    }
                });
            }
            Answer::Ignore => {}
        }
    }

    /// `/readyz`: the netmap is applied, and every forward's target has a name and a fresh session. A target
    /// without one is pinged, which starts the handshake, so readiness comes by itself.
    pub(super) fn readiness(&mut self) -> Result<(), String> {
        let Some(userspace) = self.userspace.as_ref() else { return Err("not in userspace mode".into()) };
        if userspace.draining_until.is_some() {
            return Err("stopping".into());
        }
        if self.addresses.is_empty() {
            return Err("no netmap yet".into());
        }
        let targets: Vec<_> = userspace.options.forwards.iter().map(|f| f.target.clone()).collect();
        let peers = self.dataplane.peer_status();
        let mut problems = Vec::new();
        for target in targets {
            let Some(ip) = self.resolve(&target) else {
                problems.push(format!("{}: no such name", target.host));
                continue;
            };
            let peer = peers.iter().find(|p| p.allowed_ips.iter().any(|net| net.contains(&ip)));
            let fresh = peer.and_then(|p| p.since_handshake).is_some_and(|age| age < FRESH_HANDSHAKE);
            if !fresh {
                let _ = self.dataplane.send_ping(ip, Instant::now());
                problems.push(format!("{target}: no fresh handshake with {ip} yet"));
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }
}

/// How long the logout of a node that cannot outlive its pod keeps trying (Kubernetes gives a pod 30 s
/// after SIGTERM by default; the drain took its share before).
const LOGOUT_DEADLINE: Duration = Duration::from_secs(5);

impl Daemon {
    /// Preferences a node without a TUN device cannot honour are refused, not half-applied.
    pub(super) fn check_userspace(&self, prefs: &crate::prefs::Prefs) -> Result<(), Error> {
        if self.userspace.is_some() && (!prefs.advertise_routes.is_empty() || prefs.advertise_exit_node) {
            return Err(Error::Input(
                "userspace mode cannot route subnets or be an exit node (it has no TUN device); run that node in \
                 kernel mode"
                    .into(),
            ));
        }
        Ok(())
    }

    pub(super) fn userspace_status(&self) -> Option<crate::local_api::UserspaceStatus> {
        let u = self.userspace.as_ref()?;
        let counters = u.stack.counters();
        Some(crate::local_api::UserspaceStatus {
            capabilities: capabilities(),
            forwards: u.options.forwards.iter().map(ToString::to_string).collect(),
            exposes: u.options.exposes.iter().map(|e| format!("{}/{} -> {}", e.port, e.proto, e.local)).collect(),
            dns: u.options.dns.map(|a| a.to_string()),
            socks5: u.options.socks5.map(|a| a.to_string()),
            http_proxy: u.options.http_proxy.map(|a| a.to_string()),
            health: u.options.health.map(|a| a.to_string()),
            flows: u.stack.flows(),
            buffered: u.stack.buffered(),
            budget: u.options.limits.budget,
            opened: counters.opened,
            inbound: counters.inbound,
            refused: counters.refused_budget + counters.refused_opening,
            failed: counters.failed,
        })
    }

    /// At the end of a userspace run: a node that cannot come back (joined with an ephemeral key, or with
    /// nothing on disk to come back with) logs out, so the server forgets it at once and the next pod can
    /// take its name. Tried again until [`LOGOUT_DEADLINE`].
    pub(super) async fn logout_at_exit(&mut self) {
        if self.userspace.is_none() {
            return;
        }
        let Some(m) = self.managed.as_ref() else { return };
        let Some(identity) = m.identity.clone() else { return };
        if !(identity.ephemeral || m.store.memory) {
            return;
        }
        let ca_cert = m.prefs.ca_cert.clone();
        let deadline = tokio::time::Instant::now() + LOGOUT_DEADLINE;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let told = super::managed::tell_logout(&identity, ca_cert.clone(), Duration::from_secs(2)).await;
            match told {
                Ok(()) => {
                    tracing::info!(node = identity.node_id, attempt, "logged out: the server forgot this node");
                    return;
                }
                Err(e) if tokio::time::Instant::now() + Duration::from_millis(500) < deadline => {
                    tracing::warn!(attempt, "logging out: {e}; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    tracing::error!(
                        "could not log out ({e}); the server removes the node once it has been offline for its \
                         ephemeral timeout, or an admin runs meshd control nodes delete {}",
                        identity.node_id
                    );
                    return;
                }
            }
        }
    }
}
