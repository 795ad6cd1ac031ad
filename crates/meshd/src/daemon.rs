//! `meshd daemon`: the Linux shell around the sans-IO [`Dataplane`]. One task owns the data plane and waits on
//! the TUN device, the UDP sockets, its timer, signals and the local sockets; each wake-up reads, hands what
//! it read to the data plane, and drains what the data plane wants sent, written or said. Every decision
//! about a packet is the data plane's. Static mode takes its peers from a file; managed mode (`managed.rs`)
//! from the coordination server.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use mesh_dataplane::netmap::AcceptRoutes;
use mesh_dataplane::router::Served;
use mesh_dataplane::{Dataplane, DataplaneConfig, Event, PeerSpec, SnatSettings};
use mesh_linux::RoutingPolicy;
use mesh_linux::netlink::Netlink;
use mesh_linux::tun::AsyncDevice;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UdpSocket, UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};

use crate::config::{self, Endpoint, StaticConfig};
use crate::error::Error;
use crate::{keys, local_api, service, uapi};

mod dns;
mod host;
mod managed;
mod metrics;
mod resolv_conf;
mod resolved;
pub mod userspace;

pub use metrics::CONTENT_TYPE as METRICS_CONTENT_TYPE;

pub use resolv_conf::{DirectStatus, parse as parse_resolv_conf};

use host::{Command, HostHandle, Lan, Routes};

pub const DEFAULT_TUN: &str = "mesh0";
pub const DEFAULT_PORT: u16 = 41641;
pub const DEFAULT_MTU: u16 = 1420;

#[derive(Debug, Clone)]
pub struct Options {
    /// Static mode: peers from this file. Without it the node is managed by a coordination server (`up`).
    pub config: Option<PathBuf>,
    /// The local API socket `up`, `set`, `status` and friends talk to (managed mode).
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub tun: Option<String>,
    pub port: Option<u16>,
    pub uapi_dir: PathBuf,
    pub policy: RoutingPolicy,
    /// Static mode: which of the peers' subnet routes go into the mesh table (`--accept-routes=CIDR,..`).
    pub accept: AcceptRoutes,
    /// Routes this node forwards into (a subnet router's advertised routes), each with or without SNAT.
    /// Static mode only: a managed node serves its approved routes.
    pub served: Vec<Served>,
    pub snat_addresses: Vec<IpAddr>,
    /// `--snat-source-share`: each peer's share of the SNAT engine.
    pub snat_source_share: u32,
    /// Where the runtime state for `meshd doctor` goes.
    pub run_dir: PathBuf,
    /// Userspace mode (`--tun userspace`): no TUN device, a stack in the process, and its ways in.
    pub userspace: Option<userspace::Options>,
    /// Join a coordination server at start, as `meshd up` would (a container configured by its environment).
    pub join: Option<crate::local_api::UpRequest>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
}

/// Peers as the node wants them, with host names resolved.
async fn peer_specs(config: &StaticConfig) -> Result<Vec<PeerSpec>, String> {
    let mut specs = Vec::with_capacity(config.peers.len());
    for peer in &config.peers {
        let endpoint = match &peer.endpoint {
            None => None,
            // An IPv4-mapped IPv6 address would go to the IPv6-only socket and never leave.
            Some(Endpoint::Addr(addr)) => Some(SocketAddr::new(addr.ip().to_canonical(), addr.port())),
            Some(Endpoint::Host { host, port }) => Some(resolve(host, *port).await?),
        };
        specs.push(PeerSpec {
            public_key: peer.public_key,
            preshared_key: peer.preshared_key,
            endpoint,
            allowed_ips: peer.allowed_ips.clone(),
            persistent_keepalive: peer.persistent_keepalive,
        });
    }
    Ok(specs)
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    let mut addrs = tokio::net::lookup_host((host, port)).await.map_err(|e| format!("cannot resolve {host}: {e}"))?;
    addrs.next().ok_or_else(|| format!("{host} has no address"))
}

fn allowed_prefixes(specs: &[PeerSpec]) -> Vec<IpNet> {
    let set: BTreeSet<IpNet> = specs.iter().flat_map(|s| s.allowed_ips.iter().map(IpNet::trunc)).collect();
    set.into_iter().collect()
}

/// A configuration re-read for SIGHUP, ready to apply.
struct Reloaded {
    specs: Vec<PeerSpec>,
    /// The private key the file names, when it names one (a reload never generates a key).
    key: Option<[u8; 32]>,
}

async fn load_for_reload(path: &Path, state_dir: &Path) -> Result<Reloaded, String> {
    let config = config::load(path).map_err(|e| e.to_string())?;
    let specs = peer_specs(&config).await.map_err(|e| format!("{}: {e}", path.display()))?;
    let key = match config.interface.private_key {
        config::PrivateKey::Generate => None,
        ref source => keys::load(source, state_dir).ok(),
    };
    Ok(Reloaded { specs, key })
}

type UapiRequest = (uapi::Request, oneshot::Sender<String>);

/// The sockets the daemon answers on: the WireGuard UAPI always, the local API for a managed node.
struct Listeners {
    uapi: Option<UnixListener>,
    api: Option<UnixListener>,
    metrics: Option<tokio::net::TcpListener>,
}

/// Datagrams one `poll_transmit` may hand over at once (they go out one `send_to` each until GSO lands).
const MAX_BATCH: usize = 64;

/// Datagrams a userspace node takes in one wake-up before its stack runs.
const USERSPACE_BATCH: usize = 32;

/// How many times a failed TUN device is recreated (with backoff from 100 ms to 5 s) before the daemon
/// stops with the reason.
const TUN_RECOVERY_ATTEMPTS: u32 = 8;

struct Daemon {
    options: Options,
    /// Every decision about a packet; its configuration is the node's wanted state.
    dataplane: Dataplane,
    mtu: u16,
    /// The mesh addresses on the TUN device.
    addresses: Vec<IpNet>,
    managed: Option<Box<managed::Managed>>,
    private_key: [u8; 32],
    /// The TUN device; none in userspace mode.
    tun: Option<AsyncDevice>,
    /// Userspace mode's stack and ways in.
    userspace: Option<Box<userspace::Userspace>>,
    tun_index: u32,
    tun_name: String,
    /// What failed and was brought back while the daemon ran (shown by status).
    recoveries: Vec<String>,
    udp4: UdpSocket,
    udp6: Option<UdpSocket>,
    listen_port: u16,
    /// For the few quick requests the loop makes itself (the TUN device's addresses, checking a SNAT
    /// address); everything slow goes to the host side.
    netlink: Netlink,
    host: HostHandle,
    /// The host's addresses, from the host side whenever they change.
    host_addresses: mpsc::UnboundedReceiver<host::HostEvent>,
    /// Where [`Dataplane::poll_transmit`] puts datagrams.
    transmit_buf: Vec<u8>,
    uapi_path: PathBuf,
    /// Whether this run bound the local API socket (and so may remove it).
    api_bound: bool,
    /// How the host's DNS stands, as the host side last reported it.
    host_dns: Option<resolv_conf::DirectStatus>,
    /// Where forwarded DNS queries' answers come back to the loop.
    dns_answers: mpsc::Sender<dns::Answered>,
    dns_answers_rx: Option<mpsc::Receiver<dns::Answered>>,
}

/// The signals the daemon handles, installed before it changes anything: a SIGTERM or SIGHUP during start-up
/// waits for the event loop instead of killing the process halfway with its routes in place.
struct Signals {
    hangup: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, Error> {
        Ok(Self {
            hangup: signal(SignalKind::hangup()).map_err(|e| Error::system("SIGHUP handler", e))?,
            terminate: signal(SignalKind::terminate()).map_err(|e| Error::system("SIGTERM handler", e))?,
            interrupt: signal(SignalKind::interrupt()).map_err(|e| Error::system("SIGINT handler", e))?,
        })
    }
}

/// What a run starts from: the static file's peers, or a managed node's preferences and cached netmap.
struct Setup {
    private_key: [u8; 32],
    specs: Vec<PeerSpec>,
    tun_name: String,
    mtu: u16,
    port: u16,
    addresses: Vec<IpNet>,
    served: Vec<Served>,
    snat_addresses: Vec<IpAddr>,
    /// The cached netmap's ACL rules, enforced from the first packet (`None`: everything allowed).
    filter: Option<Vec<mesh_proto::FilterRule>>,
    managed: Option<Box<managed::Managed>>,
}

async fn static_setup(options: &Options, path: &Path) -> Result<Setup, Error> {
    let config = config::load(path).map_err(|e| Error::Input(e.to_string()))?;
    let private_key = keys::load(&config.interface.private_key, &options.state_dir).map_err(Error::Input)?;
    let specs = peer_specs(&config).await.map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    Ok(Setup {
        private_key,
        specs,
        tun_name: options
            .tun
            .clone()
            .or_else(|| config.interface.tun_name.clone())
            .unwrap_or_else(|| DEFAULT_TUN.into()),
        mtu: config.interface.mtu.unwrap_or(DEFAULT_MTU),
        port: options.port.or(config.interface.listen_port).unwrap_or(DEFAULT_PORT),
        addresses: config.interface.addresses.clone(),
        served: options.served.clone(),
        snat_addresses: options.snat_addresses.clone(),
        filter: None,
        managed: None,
    })
}

/// Runs the daemon until SIGTERM or SIGINT, then removes what it added.
pub async fn run(options: Options) -> Result<(), Error> {
    let signals = Signals::install()?;
    let setup = match &options.config {
        Some(path) => static_setup(&options, &path.clone()).await?,
        None => managed::setup(&options).await?,
    };
    let Setup { private_key, specs, tun_name, mtu, port, addresses, served, snat_addresses, filter, managed } = setup;
    let policy = options.policy;

    // Everything is checked before the host changes: a refusal here leaves nothing behind.
    let wanted = DataplaneConfig {
        mesh_addresses: addresses.iter().map(IpNet::addr).collect(),
        local_addresses: Vec::new(),
        peers: specs.clone(),
        served,
        snat: SnatSettings {
            source_share: options.snat_source_share,
            ..SnatSettings::with_addresses(&snat_addresses).map_err(|e| Error::Input(e.to_string()))?
        },
        filter,
        dns: None,
    };
    let mut dataplane = Dataplane::new(private_key, seed(), mtu);
    let applied = dataplane.configure(wanted, Instant::now()).map_err(|e| Error::Input(e.to_string()))?;
    let userspace_mode = options.userspace.is_some();
    if userspace_mode && !dataplane.config().served.is_empty() {
        return Err(Error::Input(
            "userspace mode cannot route subnets (it has no TUN device); run the router in kernel mode".into(),
        ));
    }
    // Static mode asks for forwarding; a managed router turns it on itself once its start is accepted.
    if managed.is_none() {
        check_forwarding(&dataplane.config().served).map_err(Error::System)?;
    }
    // Its listeners are bound before anything else starts: a port in use stops the daemon with nothing done.
    let userspace = match options.userspace.clone() {
        Some(o) => Some(Box::new(userspace::Userspace::start(o, mtu).await?)),
        None => None,
    };

    let netlink = Netlink::connect().map_err(|e| Error::system("opening netlink", e))?;
    let (tun, tun_index) = if userspace_mode {
        (None, 0)
    } else {
        let tun = mesh_linux::tun::create(&tun_name, mtu).map_err(|e| Error::System(e.to_string()))?;
        (Some(tun), netlink.link_index(&tun_name).await.map_err(|e| Error::System(e.to_string()))?)
    };
    let (host, host_addresses) = host::spawn(host::Setup {
        policy,
        // A managed node's netmap carries only the routes it accepts, so every allowed IP is routed.
        accept: if managed.is_some() { AcceptRoutes::All } else { options.accept.clone() },
        tun_index,
        state_path: options.run_dir.join(format!("{tun_name}.json")),
        resolv_conf: (managed.is_some() && !userspace_mode)
            .then(|| (PathBuf::from("/etc/resolv.conf"), options.state_dir.clone())),
        userspace: userspace_mode,
    })?;
    // Nothing routes into the mesh in userspace mode, so its sockets need no mark (and cannot set one).
    let fwmark = if userspace_mode { 0 } else { policy.fwmark };
    let udp4 = mesh_linux::socket::bind_marked(false, port, fwmark).map_err(|e| Error::System(e.to_string()))?;
    let listen_port = udp4.local_addr().map_err(|e| Error::system("reading the UDP port", e))?.port();
    let udp6 = match mesh_linux::socket::bind_marked(true, listen_port, fwmark) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no IPv6 socket; IPv6 endpoints are unreachable");
            None
        }
    };

    // Bounded by the data plane's own bound on queries waiting for an upstream.
    let (dns_answers, dns_answers_rx) = mpsc::channel(1024);
    let mut daemon = Daemon {
        tun_index,
        tun_name: tun_name.clone(),
        recoveries: Vec::new(),
        uapi_path: options.uapi_dir.join(format!("{tun_name}.sock")),
        options,
        dataplane,
        mtu,
        addresses: Vec::new(),
        managed,
        private_key,
        tun,
        userspace,
        udp4,
        udp6,
        listen_port,
        netlink,
        host,
        host_addresses,
        transmit_buf: Vec::new(),
        api_bound: false,
        host_dns: None,
        dns_answers,
        dns_answers_rx: Some(dns_answers_rx),
    };
    let result = daemon.start(&addresses).await;
    let result = match result {
        Ok(listeners) => {
            tracing::info!(
                tun = %tun_name,
                port = daemon.listen_port,
                peers = applied.peers_added,
                public_key = %config::base64_key(&daemon.dataplane.public_key()),
                "meshd is up"
            );
            let result = daemon.event_loop(listeners, signals).await;
            daemon.logout_at_exit().await;
            result
        }
        Err(e) => Err(e),
    };
    daemon.stop().await;
    result
}

/// Forwarding must be on for each family a router serves (static mode asks; `up` turns it on).
fn check_forwarding(served: &[Served]) -> Result<(), String> {
    match host::forwarding_off(served).first() {
        Some(key) => Err(format!("serving routes needs forwarding, which is off: sysctl -w {key}=1")),
        None => Ok(()),
    }
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

impl Daemon {
    async fn start(&mut self, addresses: &[IpNet]) -> Result<Listeners, Error> {
        // The local API goes first: a second daemon on the same socket is refused before it touches anything.
        let api = match &self.managed {
            Some(_) => Some(local_api::listen(&self.options.socket).await.map_err(Error::System)?),
            None => None,
        };
        self.api_bound = api.is_some();
        let lans = self.snat_lans(&self.dataplane.config().snat.addresses()).await?;
        let started = self.host.ask(|reply| Command::Start {
            routes: self.routes(),
            lans,
            served: self.dataplane.config().served.clone(),
            reply,
        });
        started.await.map_err(|e| Error::system("the host side", e))??;
        // `up --advertise-routes` was the consent to forwarding; given only now, a start refused because
        // another program owns the table leaves the host's sysctls alone.
        if let Some(m) = self.managed.as_ref().filter(|m| m.prefs.want_running) {
            self.host.send(Command::Forwarding(m.prefs.served()));
        }
        self.set_addresses(addresses.to_vec()).await.map_err(Error::System)?;
        let uapi = match self.listen_uapi() {
            Ok(listener) => Some(listener),
            // A sidecar often cannot write /var/run/wireguard; `meshd status` covers what `wg show` would.
            Err(e) if self.userspace.is_some() => {
                tracing::info!(path = %self.uapi_path.display(), error = %e, "no WireGuard UAPI socket");
                None
            }
            Err(e) => return Err(Error::system(&format!("listening on {}", self.uapi_path.display()), e)),
        };
        let metrics = match self.options.metrics {
            Some(at) => {
                let listener = tokio::net::TcpListener::bind(at)
                    .await
                    .map_err(|e| Error::system(&format!("listening for metrics on {at}"), e))?;
                tracing::info!(url = %format!("http://{at}/metrics"), "serving metrics");
                Some(listener)
            }
            None => None,
        };
        Ok(Listeners { uapi, api, metrics })
    }

    /// What the mesh table should route: every peer's allowed IPs, except the node's own advertised routes,
    /// which stay local like its LAN (never routed back into the mesh).
    fn routes(&self) -> Routes {
        let mut advertised = match &self.managed {
            Some(m) => m.prefs.advertised_prefixes(),
            None => self.dataplane.config().served.iter().map(|s| s.prefix).collect(),
        };
        // An exit node's default routes are not a LAN of its own: counted as local, they would keep every
        // peer's address out of the table.
        advertised.retain(|p| p.prefix_len() != 0);
        // A managed node's netmap carries only the routes it accepts, so every allowed IP is routed.
        let accept = if self.managed.is_some() { &AcceptRoutes::All } else { &self.options.accept };
        let mut accepted = allowed_prefixes(&self.dataplane.config().peers);
        accepted.retain(|p| accept.routes(p));
        // The resolver answers inside the TUN device: its addresses are routed there like a peer's.
        if let Some(dns) = &self.dataplane.config().dns {
            accepted.extend(dns.addresses.iter().map(|a| IpNet::from(*a)));
        }
        Routes { accepted, advertised }
    }

    /// Tells the host side what the routes and the served prefixes are now; it makes a pass on its own.
    fn update_host(&self) {
        self.host.send(Command::Routes(self.routes()));
        self.host.send(Command::Served(self.dataplane.config().served.clone()));
    }

    /// Puts exactly `wanted` on the TUN device: new addresses added, ones no longer wanted removed.
    async fn set_addresses(&mut self, wanted: Vec<IpNet>) -> Result<(), String> {
        if let Some(userspace) = self.userspace.as_mut() {
            userspace.stack.set_addresses(&wanted.iter().map(IpNet::addr).collect::<Vec<_>>());
            self.addresses = wanted;
            return Ok(());
        }
        for address in wanted.iter().filter(|a| !self.addresses.contains(a)) {
            self.netlink.add_address(self.tun_index, *address).await.map_err(|e| e.to_string())?;
        }
        for address in self.addresses.iter().filter(|a| !wanted.contains(a)) {
            if let Err(e) = self.netlink.del_address(self.tun_index, *address).await {
                tracing::warn!(error = %e, "removing an old mesh address");
            }
        }
        self.addresses = wanted;
        Ok(())
    }

    /// The LAN (index, name) each SNAT address answers on, checked against the host without changing it: an
    /// address must be free (no interface has it) and inside a subnet the host is connected to.
    async fn snat_lans(&self, addresses: &[IpAddr]) -> Result<Vec<Lan>, Error> {
        let local = self.netlink.local_addresses().await.map_err(|e| Error::System(e.to_string()))?;
        let mut lans = Vec::new();
        for &address in addresses {
            if local.contains(&address) {
                return Err(Error::Input(format!(
                    "--snat-address {address} is already an address of this host; SNAT needs a free address of the LAN \
                     (e.g. a secondary private IP not assigned to any interface)"
                )));
            }
            let Some((index, name)) = self
                .netlink
                .interface_with_subnet(address, self.tun_index)
                .await
                .map_err(|e| Error::System(e.to_string()))?
            else {
                return Err(Error::Input(format!(
                    "--snat-address {address} lies in no subnet this host is connected to; give a free address of the \
                     LAN the routed traffic should appear from"
                )));
            };
            lans.push(Lan { address, index, name });
        }
        Ok(lans)
    }

    /// Applies a new wanted state to the data plane; a refusal keeps the running one whole and says why.
    /// The ACL filter's state for `meshd status`.
    fn acl_status(&self) -> crate::local_api::AclStatus {
        use mesh_dataplane::DropReason;
        let filter = self.dataplane.filter();
        let now = Instant::now();
        let dropped =
            [DropReason::AclDenied, DropReason::AclNoFlow, DropReason::AclTableFull, DropReason::AclUnreadable]
                .into_iter()
                .map(|r| (r.name().to_string(), self.dataplane.dropped(r)))
                .filter(|(_, n)| *n > 0)
                .collect();
        let recent_denied = filter
            .recent_denied()
            .map(|d| {
                let k = d.key;
                format!(
                    "proto {} {} -> {} {}, {} s ago",
                    k.proto,
                    std::net::SocketAddr::new(k.remote(), k.remote_port),
                    std::net::SocketAddr::new(k.local(), k.local_port),
                    DropReason::from(d.reason).name(),
                    now.saturating_duration_since(d.at).as_secs()
                )
            })
            .collect();
        crate::local_api::AclStatus {
            rules: filter.rules().map(<[_]>::len),
            flows: filter.flows(),
            dropped,
            revoked: self.dataplane.revoked_flows(),
            recent_denied,
        }
    }

    fn reconfigure(&mut self, wanted: DataplaneConfig) -> bool {
        match self.dataplane.configure(wanted, Instant::now()) {
            Ok(applied) => {
                tracing::debug!(?applied, "data plane configured");
                true
            }
            Err(e) => {
                tracing::error!("configuration refused, keeping the running one: {e}");
                false
            }
        }
    }

    fn listen_uapi(&self) -> io::Result<UnixListener> {
        use std::os::unix::fs::PermissionsExt;
        if let Some(dir) = self.uapi_path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // Bound under a temporary name and made 0600 before it takes the real one, so no client can connect
        // in the moment between bind and chmod (the reply to `get` holds the private key).
        let staging = self.uapi_path.with_extension("sock.new");
        let _ = std::fs::remove_file(&staging);
        let listener = UnixListener::bind(&staging)?;
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staging, &self.uapi_path)?;
        Ok(listener)
    }

    /// The line `systemctl status meshd` shows once the daemon is ready.
    fn service_status(&self) -> String {
        let device = if self.userspace.is_some() {
            "userspace mode (no TUN device)".to_string()
        } else {
            format!("{} up, rules and routes in table {}", self.tun_name, self.options.policy.table)
        };
        format!("{device}; WireGuard on UDP {}", self.listen_port)
    }

    async fn stop(&mut self) {
        self.host.stop().await;
        let _ = std::fs::remove_file(&self.uapi_path);
        if let Some(m) = &self.managed {
            // Only this run's own socket: a second daemon refused at `listen` leaves the first one's alone.
            if self.api_bound {
                let _ = std::fs::remove_file(&self.options.socket);
            }
            if m.store.memory {
                tracing::info!("nothing kept: the state was in memory (--state-dir mem:)");
            } else {
                tracing::info!(prefs = %m.store.prefs_path().display(), "preferences and identity kept for the next start");
            }
        }
        if self.userspace.is_some() {
            tracing::info!("meshd stopped");
        } else {
            tracing::info!("meshd stopped; routes, rules and the UAPI socket removed");
        }
    }

    async fn event_loop(&mut self, listeners: Listeners, signals: Signals) -> Result<(), Error> {
        let Signals { mut hangup, mut terminate, mut interrupt } = signals;
        let uapi_listener = listeners.uapi;
        let (api_tx, mut api_rx) = mpsc::channel::<local_api::Request>(16);
        let api_task = listeners.api.map(|listener| AbortOnDrop(local_api::serve(listener, api_tx.clone())));
        let _metrics_task =
            listeners.metrics.map(|listener| AbortOnDrop(local_api::serve_metrics(listener, api_tx.clone())));
        let mut follow_rx = self.managed.as_mut().and_then(|m| m.events_rx.take());
        self.resume().await?;
        service::ready(&self.service_status());
        let (uapi_tx, mut uapi_rx) = mpsc::channel::<UapiRequest>(8);
        let (reload_tx, mut reload_rx) = mpsc::channel::<Result<Reloaded, String>>(1);
        let mut dns_answers = self.dns_answers_rx.take().expect("one event loop");

        let mut tun_buf = vec![0u8; 65_536];
        let mut udp4_buf = vec![0u8; 65_536];
        let mut udp6_buf = vec![0u8; 65_536];
        let mut out = vec![0u8; 65_536 + 64];
        // One timer for peer-key expiry, reset only when the next expiry changes (not made anew per packet).
        let key_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(key_timer);
        let mut key_timer_for: Option<u64> = None;
        loop {
            let now = Instant::now();
            let mut wake = self.dataplane.poll_timeout().unwrap_or_else(|| now + Duration::from_secs(1));
            if let Some(userspace) = self.userspace.as_mut() {
                let stack_wake = userspace.stack.poll_at(now);
                wake = [Some(wake), stack_wake, userspace.draining_until].into_iter().flatten().min().unwrap_or(wake);
            }
            let next_expiry = self.next_key_expiry();
            if next_expiry != key_timer_for {
                if let Some(at) = next_expiry {
                    key_timer.as_mut().reset(Self::deadline_of(at));
                }
                key_timer_for = next_expiry;
            }
            tokio::select! {
                read = recv_tun(self.tun.as_ref(), &mut tun_buf) => match read {
                    Ok(n) => {
                        let _ = self.dataplane.handle_tun_packet(&mut tun_buf[..n], Instant::now());
                    }
                    Err(e) => self.recover_tun(e).await?,
                },
                received = self.udp4.recv_from(&mut udp4_buf) => {
                    if let Ok((n, from)) = received {
                        self.datagram(from, &udp4_buf[..n], &mut out).await;
                        // Userspace mode: what else has arrived goes into the stack before it runs, so the app
                        // gets one write for many segments and the peer one ACK for several.
                        for _ in 1..USERSPACE_BATCH {
                            if self.userspace.is_none() {
                                break;
                            }
                            let Ok((n, from)) = self.udp4.try_recv_from(&mut udp4_buf) else { break };
                            self.datagram(from, &udp4_buf[..n], &mut out).await;
                        }
                    }
                }
                received = recv_optional(self.udp6.as_ref(), &mut udp6_buf) => {
                    if let Ok((n, from)) = received {
                        self.datagram(from, &udp6_buf[..n], &mut out).await;
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => self.dataplane.handle_timeout(Instant::now()),
                () = &mut key_timer, if key_timer_for.is_some() => {
                    key_timer_for = None;
                    self.key_expired().await;
                }
                Some(event) = self.host_addresses.recv() => match event {
                    host::HostEvent::Addresses(addresses) => {
                        let mut wanted = self.dataplane.config().clone();
                        wanted.local_addresses = addresses.clone();
                        self.reconfigure(wanted);
                        self.host_addresses_changed(&addresses).await;
                    }
                    host::HostEvent::Recovered(what) => self.recoveries.push(what),
                    host::HostEvent::Dns(status) => self.host_dns_changed(status),
                },
                Some((token, answer)) = dns_answers.recv() => self.dataplane.dns_answered(token, answer.as_deref(), Instant::now()),
                accepted = accept_optional(uapi_listener.as_ref()) => {
                    if let Ok((stream, _)) = accepted {
                        tokio::spawn(serve_uapi(stream, uapi_tx.clone()));
                    }
                }
                Some((request, reply)) = uapi_rx.recv() => {
                    let _ = reply.send(self.uapi_reply(&request));
                }
                Some(request) = api_rx.recv() => self.api_request(request).await,
                Some((generation, event)) = recv_follow(&mut follow_rx) => self.follow_event(generation, event).await,
                _ = hangup.recv() => {
                    let Some(config) = self.options.config.clone() else {
                        tracing::info!("SIGHUP ignored: a managed node takes changes through meshd set");
                        continue;
                    };
                    // Reading the file and resolving names happen off the loop, so a slow DNS server never
                    // stalls packets; the loop only applies the result.
                    let (state_dir, done) = (self.options.state_dir.clone(), reload_tx.clone());
                    tokio::spawn(async move {
                        let _ = done.send(load_for_reload(&config, &state_dir).await).await;
                    });
                }
                Some(loaded) = reload_rx.recv() => self.apply_reload(loaded).await,
                wake = userspace_wake(self.userspace.as_deref_mut()) => match wake {
                    userspace::Wake::Io => {}
                    userspace::Wake::App(mesh_netstack::AppEvent::Dial(dial)) => self.dial(dial),
                    userspace::Wake::App(mesh_netstack::AppEvent::Datagram(out)) => self.udp_datagram(out),
                    userspace::Wake::Dns(query, from) => self.pod_dns_query(query, from),
                    userspace::Wake::Health(ask) => {
                        let _ = ask.send(self.readiness());
                    }
                },
                _ = terminate.recv() => if self.begin_drain() {
                    self.drain().await;
                    break;
                },
                _ = interrupt.recv() => if self.begin_drain() {
                    self.drain().await;
                    break;
                },
            }
            self.drain().await;
            if self.drained() {
                // The resets of flows cut short go out before the loop ends.
                self.drain().await;
                break;
            }
        }
        drop(api_task);
        // A registration the server answered just before the signal: its identity is taken in, so a node that
        // logs out at exit (userspace, ephemeral or `mem:`) is not left behind on the server.
        if let Some(events) = follow_rx.as_mut() {
            while let Ok((generation, event)) = events.try_recv() {
                if matches!(event, crate::follow::Event::Registered(..)) {
                    self.follow_event(generation, event).await;
                }
            }
        }
        Ok(())
    }

    /// The TUN device failed (someone deleted it, say): recreated under its name with its addresses, and
    /// the host side routes into the new one. Retried with backoff a few times before the daemon gives up,
    /// so a device that cannot come back ends the daemon with the reason instead of a busy loop.
    async fn recover_tun(&mut self, error: io::Error) -> Result<(), Error> {
        let name = self.tun_name.clone();
        tracing::error!(tun = %name, error = %error, "the TUN device failed; recreating it");
        let mut wait = Duration::from_millis(100);
        for attempt in 1..=TUN_RECOVERY_ATTEMPTS {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
            let created = mesh_linux::tun::create(&name, self.mtu);
            let device = match created {
                Ok(device) => device,
                Err(e) => {
                    tracing::warn!(tun = %name, attempt, error = %e, "recreating the TUN device");
                    continue;
                }
            };
            let index = match self.netlink.link_index(&name).await {
                Ok(index) => index,
                Err(e) => {
                    tracing::warn!(tun = %name, attempt, error = %e, "finding the recreated TUN device");
                    continue;
                }
            };
            self.tun = Some(device);
            self.tun_index = index;
            let addresses = std::mem::take(&mut self.addresses);
            if let Err(e) = self.set_addresses(addresses).await {
                tracing::warn!(tun = %name, error = %e, "putting the mesh addresses back on the TUN device");
            }
            self.host.send(Command::Tun(index));
            self.update_host();
            self.recoveries.push(format!("the TUN device {name} was recreated after: {error}"));
            tracing::info!(tun = %name, index, "the TUN device is back");
            return Ok(());
        }
        Err(Error::system(&format!("recreating the TUN device {name} ({TUN_RECOVERY_ATTEMPTS} attempts)"), error))
    }

    async fn datagram(&mut self, from: SocketAddr, datagram: &[u8], out: &mut [u8]) {
        let now = Instant::now();
        let Ok(Some(n)) = self.dataplane.handle_datagram(from, datagram, now, out) else { return };
        self.deliver(&out[..n], now).await;
    }

    /// A packet for this node's own stack: the kernel's through the TUN device, or the one in the process.
    async fn deliver(&mut self, packet: &[u8], now: Instant) {
        if let Some(userspace) = self.userspace.as_mut() {
            let dataplane = &mut self.dataplane;
            userspace.stack.receive(packet, now, &mut |p: &mut [u8]| {
                let _ = dataplane.handle_tun_packet(p, now);
            });
        } else if let Some(tun) = &self.tun
            && let Err(e) = tun.send(packet).await
        {
            tracing::debug!(error = %e, "writing to the TUN device");
        }
    }

    /// Userspace mode: moves the apps' bytes and sends what the stack has due, into the data plane.
    fn poll_stack(&mut self) {
        let Some(userspace) = self.userspace.as_mut() else { return };
        let now = Instant::now();
        let dataplane = &mut self.dataplane;
        userspace.stack.poll(now, &mut |p: &mut [u8]| {
            let _ = dataplane.handle_tun_packet(p, now);
        });
    }

    /// SIGTERM or SIGINT: `true` to stop now. In userspace mode the first one stops new flows and lets the
    /// open ones finish (up to the drain time); a second one stops at once.
    fn begin_drain(&mut self) -> bool {
        service::stopping();
        let Some(userspace) = self.userspace.as_mut() else { return true };
        if userspace.draining_until.is_some() {
            userspace.stack.abort_all();
            return true;
        }
        let drain = userspace.options.drain;
        userspace.draining_until = Some(Instant::now() + drain);
        userspace.stop_accepting();
        tracing::info!(
            flows = userspace.stack.flows(),
            drain_s = drain.as_secs(),
            "stopping: no new flows; open ones may finish"
        );
        false
    }

    /// Whether a drain is over: no flows left, or its time is up.
    fn drained(&mut self) -> bool {
        let Some(userspace) = self.userspace.as_mut() else { return false };
        let Some(until) = userspace.draining_until else { return false };
        let flows = userspace.stack.flows();
        if flows > 0 && Instant::now() < until {
            return false;
        }
        if flows > 0 {
            tracing::warn!(flows, "the drain time is up; resetting the flows still open");
            userspace.stack.abort_all();
        }
        true
    }

    /// Sends what the data plane queued and acts on what it reported.
    async fn drain(&mut self) {
        self.poll_stack();
        self.flush().await;
        while let Some(event) = self.dataplane.poll_event() {
            match event {
                Event::Dropped { reason, count, latest_from: Some(from) } => {
                    tracing::warn!(reason = %reason, count, latest_from = %from, "dropped packets")
                }
                Event::Dropped { reason, count, latest_from: None } => {
                    tracing::info!(reason = %reason, count, "dropped packets")
                }
                Event::Handshake(h) => tracing::debug!(
                    peer = %config::base64_key(&h.public_key),
                    endpoint = %h.endpoint,
                    initiated_here = h.initiated_here,
                    "handshake completed"
                ),
                Event::Pong { seq, rtt, .. } => self.pong(seq, rtt),
                Event::Deliver(packet) => {
                    self.deliver(&packet, Instant::now()).await;
                    self.poll_stack();
                }
                Event::DnsForward { token, upstreams, query } => {
                    dns::forward(token, upstreams, query, self.dns_answers.clone())
                }
            }
        }
        // What the stack answered to delivered packets.
        if self.userspace.is_some() {
            self.flush().await;
        }
    }

    /// Sends every queued datagram. UDP may drop under pressure; nothing here waits for more than a send.
    async fn flush(&mut self) {
        while let Some(transmit) = self.dataplane.poll_transmit(&mut self.transmit_buf, MAX_BATCH) {
            let to = transmit.destination;
            let Some(socket) = (if to.is_ipv4() { Some(&self.udp4) } else { self.udp6.as_ref() }) else { continue };
            for datagram in self.transmit_buf[..transmit.size].chunks(transmit.segment_size) {
                let sent = match socket.try_send_to(datagram, to) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => socket.send_to(datagram, to).await,
                    other => other,
                };
                if let Err(e) = sent {
                    tracing::debug!(error = %e, to = %to, "sending");
                }
            }
        }
    }

    /// Applies a configuration re-read on SIGHUP: peers are added, removed or changed; unchanged peers keep
    /// their sessions. A file that did not parse, or names that did not resolve, change nothing.
    async fn apply_reload(&mut self, loaded: Result<Reloaded, String>) {
        let Reloaded { specs, key } = match loaded {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("reload refused, keeping the running configuration: {e}");
                return;
            }
        };
        if key.is_some_and(|k| k != self.private_key) {
            tracing::warn!("the private key changed; restart meshd to use it");
        }
        let mut wanted = self.dataplane.config().clone();
        wanted.peers = specs;
        match self.dataplane.configure(wanted, Instant::now()) {
            Ok(applied) => tracing::info!(
                added = applied.peers_added,
                removed = applied.peers_removed,
                changed = applied.peers_changed,
                "configuration reloaded"
            ),
            Err(e) => {
                tracing::error!("reload refused, keeping the running configuration: {e}");
                return;
            }
        }
        self.update_host();
    }

    fn uapi_reply(&self, request: &uapi::Request) -> String {
        match request {
            uapi::Request::Get => {
                let peers = self.dataplane.peer_status();
                let device = uapi::Device {
                    private_key: &self.private_key,
                    listen_port: self.listen_port,
                    fwmark: self.options.policy.fwmark,
                    peers: &peers,
                };
                uapi::get_reply(&device, SystemTime::now())
            }
            _ => uapi::refusal().to_string(),
        }
    }
}

/// Aborts a spawned task when the owner goes away (the local API server dies with the event loop).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn recv_follow(
    events: &mut Option<mpsc::Receiver<(u64, crate::follow::Event)>>,
) -> Option<(u64, crate::follow::Event)> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_tun(tun: Option<&AsyncDevice>, buf: &mut [u8]) -> io::Result<usize> {
    match tun {
        Some(t) => t.recv(buf).await,
        None => std::future::pending().await,
    }
}

async fn accept_optional(listener: Option<&UnixListener>) -> io::Result<(UnixStream, tokio::net::unix::SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn userspace_wake(userspace: Option<&mut userspace::Userspace>) -> userspace::Wake {
    match userspace {
        Some(u) => u.wake().await,
        None => std::future::pending().await,
    }
}

async fn recv_optional(socket: Option<&UdpSocket>, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    match socket {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// Reads one request from a UAPI client, has the event loop answer it, and writes the answer.
async fn serve_uapi(stream: UnixStream, requests: mpsc::Sender<UapiRequest>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read);
    let read = tokio::time::timeout(Duration::from_secs(2), reader.read_line(&mut line)).await;
    if !matches!(read, Ok(Ok(n)) if n > 0) {
        return;
    }
    let (tx, rx) = oneshot::channel();
    if requests.send((uapi::parse_request(&line), tx)).await.is_err() {
        return;
    }
    if let Ok(reply) = rx.await {
        let _ = write.write_all(reply.as_bytes()).await;
    }
}

/// The default state directory, overridable with `--state-dir`.
pub fn default_state_dir() -> &'static Path {
    Path::new("/var/lib/meshd")
}
