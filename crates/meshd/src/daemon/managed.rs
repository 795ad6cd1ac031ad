//! The daemon as a managed node: preferences from `up`/`set`, peers, addresses and approved routes from the
//! coordination server's netmap. The data plane never waits for the server: a restarted node starts from
//! its cached netmap, and a server that goes away only stops changes, never traffic.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use mesh_dataplane::netmap;
use mesh_dataplane::router::Served;
use mesh_proto::NetMap;
use tokio::sync::{mpsc, oneshot, watch};

use super::host::{Command, Lan};
use super::{Daemon, Options, Setup};
use crate::config::{self, PrivateKey};
use crate::error::Error;
use crate::follow::{self, Event, Follow};
use crate::keys;
use crate::local_api::{Conn, PeerView, Request, SelfStatus, Status, UpReply, UpRequest};
use crate::prefs::{Identity, Prefs, PrefsPatch, Store};

pub(crate) struct Managed {
    pub store: Store,
    pub prefs: Prefs,
    pub identity: Option<Identity>,
    pub(super) netmap: Option<NetMap>,
    generation: u64,
    follower: Option<follow::Handle>,
    events_tx: mpsc::Sender<(u64, Event)>,
    pub events_rx: Option<mpsc::Receiver<(u64, Event)>>,
    conn: watch::Sender<Conn>,
    /// Who waits for the reply to each `meshd ping`, by the data plane's sequence number.
    pings: HashMap<u16, (Instant, oneshot::Sender<Duration>)>,
    /// Held in memory for the follower that registers with it, never written to disk.
    auth_key: Option<String>,
    /// Why the server cannot be reached right now, while the node runs on the netmap it has (shown by
    /// `status`; cleared by the next netmap).
    trouble: Option<String>,
    /// The endpoints the running follower reports, to notice when the host's addresses change them.
    endpoints: Vec<SocketAddr>,
    /// When the next configured peer's key expires (Unix seconds), set each time a netmap is applied.
    next_key_expiry: Option<u64>,
}

/// The routes this node forwards into: those it advertises that the server approved.
fn served_now(prefs: &Prefs, map: Option<&NetMap>) -> Vec<Served> {
    let approved = map.map(netmap::served_routes).unwrap_or_default();
    prefs.served().into_iter().filter(|s| approved.contains(&s.prefix)).collect()
}

fn mesh_addresses(map: &NetMap) -> Vec<IpNet> {
    vec![IpNet::from(IpAddr::V4(map.node.ipv4)), IpNet::from(IpAddr::V6(map.node.ipv6))]
}

pub(super) async fn setup(options: &Options) -> Result<Setup, Error> {
    let store = Store::new(&options.state_dir);
    let prefs = store.load_prefs().map_err(Error::Input)?;
    prefs.check().map_err(|e| Error::Input(format!("{}: {e}", store.prefs_path().display())))?;
    let identity = store.load_identity().map_err(Error::Input)?;
    let private_key = keys::load(&PrivateKey::Generate, &options.state_dir).map_err(Error::Input)?;
    if !store.memory {
        keys::check_state_dir(&options.state_dir).map_err(Error::Input)?;
    }
    let netmap = if identity.is_some() && prefs.want_running { store.load_netmap() } else { None };
    let (specs, addresses) = match &netmap {
        Some(map) => {
            tracing::info!(version = map.version, peers = map.peers.len(), "starting from the cached netmap");
            (
                netmap::peers(map, &prefs.accept_routes, prefs.exit_node.as_deref(), None, unix_now()).specs,
                mesh_addresses(map),
            )
        }
        None => (Vec::new(), Vec::new()),
    };
    let served = served_now(&prefs, netmap.as_ref());
    let (events_tx, events_rx) = mpsc::channel(16);
    let managed = Managed {
        store,
        identity,
        netmap,
        generation: 0,
        follower: None,
        events_tx,
        events_rx: Some(events_rx),
        conn: watch::channel(Conn::Stopped).0,
        pings: HashMap::new(),
        auth_key: None,
        trouble: None,
        endpoints: Vec::new(),
        next_key_expiry: None,
        prefs: prefs.clone(),
    };
    Ok(Setup {
        private_key,
        specs,
        tun_name: options.tun.clone().unwrap_or_else(|| super::DEFAULT_TUN.into()),
        mtu: super::DEFAULT_MTU,
        port: options.port.unwrap_or(super::DEFAULT_PORT),
        addresses,
        served,
        snat_addresses: prefs.snat_address.clone(),
        filter: managed.netmap.as_ref().and_then(|m| m.filter.clone()),
        managed: Some(Box::new(managed)),
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn endpoint_candidates(addresses: &[IpAddr], mesh: &[IpAddr], snat: &[IpAddr], port: u16) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = addresses
        .iter()
        .copied()
        .filter(|a| {
            !(a.is_loopback() || a.is_unspecified() || a.is_multicast() || mesh.contains(a) || snat.contains(a))
        })
        .filter(|a| match a {
            IpAddr::V4(v) => !v.is_link_local(),
            IpAddr::V6(v) => !v.is_unicast_link_local(),
        })
        .map(|a| SocketAddr::new(a, port))
        .collect();
    // The host lists its addresses in no stable order; sorted, an unchanged set compares equal.
    out.sort();
    out.dedup();
    out
}

/// The identity to present to `control_url`: only one that server issued. A credential never goes to
/// another URL, which `set --control-url` would otherwise hand the old server's credential to.
fn identity_for(identity: Option<&Identity>, control_url: &str) -> Option<Identity> {
    identity.filter(|i| i.control_url == control_url).cloned()
}

fn host_name(prefs: &Prefs) -> String {
    prefs.hostname.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
    })
}

impl Daemon {
    fn managed_mut(&mut self) -> &mut Managed {
        self.managed.as_mut().expect("only a managed daemon gets here")
    }

    /// Called once the event loop runs: a node that was up before its restart follows its server again.
    pub(super) async fn resume(&mut self) -> Result<(), Error> {
        if let Some(request) = self.options.join.take() {
            // `meshd daemon --control-url URL --auth-key KEY`: the daemon runs `up` itself. Preferences it
            // refuses stop the daemon (a container restarts it with the reason in its log), not a node
            // that runs on without a mesh.
            let (_, pending) = self.up(request).await?;
            // The SNAT plumbing a router's flags ask for is done by the host thread; a failure there stops
            // the daemon with its reason, as a refused flag does (it was lost unheard before).
            if let Some(plumbed) = pending {
                plumbed.await.map_err(|_| Error::System("the host thread stopped".into()))??;
            }
            tracing::info!("joining the mesh as the daemon's flags ask");
            return Ok(());
        }
        let Some(m) = &self.managed else { return Ok(()) };
        if m.prefs.want_running {
            if let Some(map) = &m.netmap {
                let reply = UpReply { name: map.node.name.clone(), ipv4: map.node.ipv4, ipv6: map.node.ipv6 };
                m.conn.send_replace(Conn::Running(reply));
            }
            self.start_following().await;
        }
        Ok(())
    }

    /// Starts a follower for the current preferences and identity; the one before it (if any) stops.
    /// The endpoints to report for the host's `addresses`: every one peers could reach this node's
    /// WireGuard port at, so not the mesh's own addresses, the SNAT addresses, loopback or link-local.
    fn endpoint_candidates(&self, addresses: &[IpAddr]) -> Vec<SocketAddr> {
        let mesh: Vec<IpAddr> = self.addresses.iter().map(IpNet::addr).collect();
        endpoint_candidates(addresses, &mesh, &self.dataplane.config().snat.addresses(), self.listen_port)
    }

    /// When the next peer's key expires (Unix seconds), if any does.
    pub(super) fn next_key_expiry(&self) -> Option<u64> {
        self.managed.as_ref()?.next_key_expiry
    }

    /// `at` (Unix seconds) on the loop's clock.
    pub(super) fn deadline_of(at: u64) -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(at.saturating_sub(unix_now()))
    }

    /// A peer's key expired: the netmap at hand is applied again, which leaves that peer out, whether or
    /// not the server can be reached to say so.
    pub(super) async fn key_expired(&mut self) {
        if let Some(map) = self.managed.as_ref().and_then(|m| m.netmap.clone()) {
            tracing::info!("a peer's key expired; dropping it");
            self.apply_netmap(map).await;
        }
    }

    /// The host's addresses changed (the host thread reports them after each address event): a following
    /// node whose endpoints change with them reports the new ones at once, so peers do not keep sending
    /// handshakes to an address this host no longer has (DHCP renewals, roaming).
    pub(super) async fn host_addresses_changed(&mut self, addresses: &[IpAddr]) {
        let Some(m) = self.managed.as_ref() else { return };
        // Not while registering: restarting then could lose the server's answer, and with a single-use
        // key the retry would be refused as a spent key. The endpoints go with the first report anyway.
        if m.follower.is_none() || m.identity.is_none() {
            return;
        }
        let endpoints = self.endpoint_candidates(addresses);
        if endpoints != self.managed_mut().endpoints {
            tracing::info!(endpoints = ?endpoints, "the host's addresses changed; reporting new endpoints");
            self.start_following().await;
        }
    }

    async fn start_following(&mut self) {
        let endpoints: Vec<SocketAddr> = match self.netlink.local_addresses().await {
            Ok(list) => self.endpoint_candidates(&list),
            Err(e) => {
                tracing::warn!(error = %e, "reading the host's addresses for endpoints");
                Vec::new()
            }
        };
        let node_key = config::base64_key(&self.dataplane.public_key());
        let private_key = self.private_key;
        let fwmark = if self.userspace.is_some() { None } else { Some(self.options.policy.fwmark) };
        let m = self.managed_mut();
        m.generation += 1;
        let follow = Follow {
            control_url: m.prefs.control_url.clone(),
            ca_cert: m.prefs.ca_cert.clone(),
            identity: identity_for(m.identity.as_ref(), &m.prefs.control_url),
            auth_key: m.auth_key.clone(),
            node_key,
            node_private: follow::NodePrivate(private_key),
            hostname: host_name(&m.prefs),
            advertise_routes: m.prefs.advertised_prefixes(),
            tags: m.prefs.advertise_tags.clone(),
            endpoints: endpoints.clone(),
            since: 0,
            fwmark,
        };
        m.endpoints = endpoints;
        m.trouble = None;
        m.follower = Some(follow::start(follow, m.generation, m.events_tx.clone()));
        if !matches!(*m.conn.borrow(), Conn::Running(_)) {
            m.conn.send_replace(Conn::Connecting(None));
        }
    }

    pub(super) async fn follow_event(&mut self, generation: u64, event: Event) {
        let m = self.managed_mut();
        if generation != m.generation {
            return;
        }
        match event {
            Event::Registered(identity, response) => {
                tracing::info!(name = %response.name, ipv4 = %response.ipv4, ipv6 = %response.ipv6, "registered");
                let (store, saved) = (m.store.clone(), identity.clone());
                m.identity = Some(identity);
                // Through the host side's queue, in order with the netmap cache's writes (see `forget`).
                self.host.send(Command::Persist(Box::new(move || {
                    if let Err(e) = store.save_identity(&saved) {
                        tracing::error!("cannot keep the node's identity: {e}");
                    }
                })));
                let m = self.managed_mut();
                // The key did its job; a later re-registration needs a new `up --auth-key`.
                m.auth_key = None;
            }
            Event::NetMap(map) => self.apply_netmap(*map).await,
            Event::Trouble(message) => {
                tracing::warn!("{message}");
                if matches!(*m.conn.borrow(), Conn::Connecting(_)) {
                    m.conn.send_replace(Conn::Connecting(Some(message.clone())));
                }
                m.trouble = Some(message);
            }
            Event::Refused(message) => {
                tracing::error!("the coordination server refused this node: {message}");
                m.follower = None;
                m.conn.send_replace(Conn::Refused(message));
            }
        }
    }

    /// Configures the node from a netmap: its mesh addresses, its peers and the routes it accepts from them,
    /// the approved routes it serves. Unchanged peers keep their sessions.
    async fn apply_netmap(&mut self, map: NetMap) {
        if !netmap::own_addresses_in_mesh(&map) {
            // Taking it would put a host or LAN address on the TUN device and route it into the mesh.
            let message = format!(
                "the coordination server gave this node {} and {}, outside the mesh's ranges; the netmap was \
                 refused and the last good one stays",
                map.node.ipv4, map.node.ipv6
            );
            tracing::error!("{message}");
            self.managed_mut().trouble = Some(message);
            return;
        }
        let now = unix_now();
        // Kept before the peers are configured, so an expiry passing meanwhile still has its timer.
        self.managed_mut().next_key_expiry = netmap::next_key_expiry(&map, now);
        let m = self.managed.as_ref().expect("managed");
        let peers = netmap::peers(&map, &m.prefs.accept_routes, m.prefs.exit_node.as_deref(), None, now);
        for skipped in &peers.skipped {
            let name = crate::follow::escape_controls(&skipped.name);
            tracing::warn!(peer = %name, node_id = skipped.node_id, "not configured: {}", skipped.reason);
        }
        let mut wanted = self.dataplane.config().clone();
        wanted.served = served_now(&m.prefs, Some(&map));
        wanted.mesh_addresses = mesh_addresses(&map).iter().map(IpNet::addr).collect();
        wanted.peers = peers.specs;
        wanted.filter = map.filter.clone();
        wanted.dns = Some(super::dns::resolver_config(&map, &self.host_nameservers()));
        let host_dns = m.prefs.accept_dns.then(|| super::dns::host_wanted(&map));
        let applied = match self.dataplane.configure(wanted, Instant::now()) {
            Ok(applied) => applied,
            Err(e) => {
                tracing::error!(version = map.version, "netmap not applied: {e}");
                return;
            }
        };
        if let Err(e) = self.set_addresses(mesh_addresses(&map)).await {
            tracing::error!("cannot put the mesh address on the TUN device: {e}");
        }
        if let Some(userspace) = self.userspace.as_mut() {
            userspace.update_resolver(self.dataplane.resolver().map(|r| r.config()));
        }
        self.update_host();
        self.host.send(Command::Dns(host_dns));
        tracing::info!(
            version = map.version,
            added = applied.peers_added,
            removed = applied.peers_removed,
            changed = applied.peers_changed,
            "netmap applied"
        );
        // Written on the host side, in order, so a slow disk never holds packets.
        let (store, cached) = (self.managed_mut().store.clone(), map.clone());
        self.host.send(Command::Persist(Box::new(move || {
            if let Err(e) = store.save_netmap(&cached) {
                tracing::warn!("cannot cache the netmap: {e}");
            }
        })));
        let m = self.managed_mut();
        m.trouble = None;
        m.conn.send_replace(Conn::Running(UpReply {
            name: map.node.name.clone(),
            ipv4: map.node.ipv4,
            ipv6: map.node.ipv6,
        }));
        m.netmap = Some(map);
    }

    /// Takes the node off the mesh: no peers, no addresses, no routes. The identity stays.
    async fn disconnect(&mut self) {
        let m = self.managed_mut();
        m.follower = None;
        m.generation += 1;
        m.conn.send_replace(Conn::Stopped);
        let mut wanted = self.dataplane.config().clone();
        (wanted.peers, wanted.served, wanted.mesh_addresses) = (Vec::new(), Vec::new(), Vec::new());
        wanted.dns = None;
        self.reconfigure(wanted);
        self.host.send(Command::Dns(None));
        if let Err(e) = self.set_addresses(Vec::new()).await {
            tracing::warn!("removing the mesh addresses: {e}");
        }
        self.update_host();
    }

    /// Only a managed daemon serves the local API, so only it gets here.
    pub(super) async fn api_request(&mut self, request: Request) {
        match request {
            Request::Up(up, reply) => match self.up(*up).await {
                Ok((conn, pending)) => answer_after(pending, reply, conn),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Request::Set(patch, reply) => match self.set(patch).await {
                Ok(pending) => answer_after(pending, reply, ()),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Request::Down(reply) => {
                let result = self.down().await;
                let _ = reply.send(result);
            }
            Request::Logout(reply) => match self.logout().await {
                // The server is told off the loop: it may take seconds to answer, or never.
                Ok(tell) => {
                    tokio::spawn(async move {
                        let _ = reply.send(tell.await);
                    });
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Request::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Request::Ping(peer, reply) => {
                let _ = reply.send(self.ping(&peer));
            }
            Request::DnsStatus(reply) => {
                let _ = reply.send(self.dns_status());
            }
            Request::Metrics(reply) => {
                let _ = reply.send(self.metrics_text());
            }
            Request::DnsQuery { name, kind, reply } => match self.dns_query(&name, &kind) {
                Ok(DnsQueryJob::Done(text)) => {
                    let _ = reply.send(Ok(text));
                }
                // Off the loop: upstreams may take seconds.
                Ok(DnsQueryJob::Forward(upstreams, query)) => {
                    tokio::spawn(async move {
                        let from = upstreams.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
                        let text = match super::dns::ask_upstreams(&upstreams, &query).await {
                            Some(answer) => super::dns::describe(&answer, &format!("upstream {from}")),
                            None => format!("SERVFAIL: no answer from {from}"),
                        };
                        let _ = reply.send(Ok(text));
                    });
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
        }
    }

    /// Stores preferences after checking them, before anything acts on them.
    fn store_prefs(&mut self, prefs: Prefs) -> Result<(), Error> {
        prefs.check().map_err(Error::Input)?;
        let m = self.managed_mut();
        m.store.save_prefs(&prefs).map_err(Error::System)?;
        m.prefs = prefs;
        Ok(())
    }

    async fn up(&mut self, request: UpRequest) -> Result<(watch::Receiver<Conn>, Option<Pending>), Error> {
        let m = self.managed.as_ref().expect("managed");
        let mut prefs = m.prefs.patched(&request.prefs);
        prefs.want_running = true;
        let auth_key = request.auth_key.filter(|k| !k.is_empty());
        let refused = matches!(*m.conn.borrow(), Conn::Refused(_));
        let other_server = m.identity.as_ref().is_some_and(|i| i.control_url != prefs.control_url);
        let reauth = request.force_reauth || refused || other_server || m.identity.is_none();
        if reauth && auth_key.is_none() {
            if request.force_reauth {
                return Err(Error::Input("--force-reauth registers a new node key: give --auth-key KEY too".into()));
            }
            return Err(Error::Input(match (&m.identity, other_server) {
                (Some(i), true) => format!(
                    "this node is registered with {}; give --auth-key KEY to join {}",
                    i.control_url, prefs.control_url
                ),
                _ if refused => "the coordination server refused this node; give a new --auth-key KEY".into(),
                _ => "this node is not registered yet: give --auth-key KEY (or MESHD_AUTH_KEY)".into(),
            }));
        }
        prefs.check().map_err(Error::Input)?;
        self.check_userspace(&prefs)?;
        let snat = self.checked_snat(&prefs).await?;
        self.store_prefs(prefs)?;
        if request.force_reauth {
            self.new_node_key().await?;
        }
        let pending = match snat {
            Some((snat, lans)) => Some(self.replumb(snat, lans)?),
            None => None,
        };
        let m = self.managed_mut();
        if reauth {
            m.identity = None;
            m.conn.send_replace(Conn::Connecting(None));
        }
        m.auth_key = auth_key;
        let served = m.prefs.served();
        self.host.send(Command::Forwarding(served));
        self.start_following().await;
        Ok((self.managed_mut().conn.subscribe(), pending))
    }

    /// `up --force-reauth`: a new node key, and with it a new registration.
    async fn new_node_key(&mut self) -> Result<(), Error> {
        let path = self.options.state_dir.join("private.key");
        let _ = std::fs::remove_file(&path);
        let key = keys::load(&PrivateKey::Generate, &self.options.state_dir).map_err(Error::System)?;
        self.private_key = key;
        // A new key is a new node: new sessions, new SNAT translations; the wanted state carries over.
        let wanted = self.dataplane.config().clone();
        self.dataplane = mesh_dataplane::Dataplane::new(key, super::seed(), self.mtu);
        self.reconfigure(wanted);
        self.forget_identity_files();
        tracing::info!(public_key = %config::base64_key(&self.dataplane.public_key()), "new node key");
        Ok(())
    }

    /// The SNAT settings new preferences ask for, when they differ from the running ones, checked against
    /// the host before anything is stored: each address must be free and on a connected LAN. `None` when
    /// they stay as they are.
    async fn checked_snat(&self, prefs: &Prefs) -> Result<Option<(mesh_dataplane::SnatSettings, Vec<Lan>)>, Error> {
        let snat = mesh_dataplane::SnatSettings {
            source_share: self.options.snat_source_share,
            ..prefs.snat_settings().map_err(Error::Input)?
        };
        if snat == self.dataplane.config().snat {
            return Ok(None);
        }
        let lans = self.snat_lans(&snat.addresses()).await?;
        Ok(Some((snat, lans)))
    }

    /// A changed `--snat-address`: the data plane translates to the new one, and the host side moves the
    /// plumbing (the old address stops answering on its LAN, the new one starts). Returns the host side's
    /// answer to wait for, off the loop.
    fn replumb(&mut self, snat: mesh_dataplane::SnatSettings, lans: Vec<Lan>) -> Result<Pending, Error> {
        let m = self.managed.as_ref().expect("managed");
        let mut wanted = self.dataplane.config().clone();
        wanted.served = served_now(&m.prefs, m.netmap.as_ref());
        wanted.snat = snat;
        self.dataplane.configure(wanted, Instant::now()).map_err(|e| Error::Input(e.to_string()))?;
        Ok(self.host.ask(|reply| Command::Snat { lans, reply }))
    }

    async fn set(&mut self, patch: PrefsPatch) -> Result<Option<Pending>, Error> {
        let m = self.managed.as_ref().expect("managed");
        let before = m.prefs.clone();
        let prefs = before.patched(&patch);
        prefs.check().map_err(Error::Input)?;
        self.check_userspace(&prefs)?;
        let snat = self.checked_snat(&prefs).await?;
        self.store_prefs(prefs.clone())?;
        let pending = match snat {
            Some((snat, lans)) => Some(self.replumb(snat, lans)?),
            None => None,
        };
        if !prefs.want_running {
            return Ok(pending);
        }
        self.host.send(Command::Forwarding(prefs.served()));
        let server_side = prefs.control_url != before.control_url
            || prefs.ca_cert != before.ca_cert
            || prefs.advertised_prefixes() != before.advertised_prefixes()
            || prefs.advertise_tags != before.advertise_tags;
        if server_side && self.managed_mut().identity.is_some() {
            self.start_following().await;
        }
        // What is decided locally (which routes to accept, SNAT per prefix) applies to the netmap at hand.
        if let Some(map) = self.managed_mut().netmap.clone() {
            self.apply_netmap(map).await;
        }
        Ok(pending)
    }

    async fn down(&mut self) -> Result<(), Error> {
        let mut prefs = self.managed_mut().prefs.clone();
        prefs.want_running = false;
        self.store_prefs(prefs)?;
        self.disconnect().await;
        tracing::info!("down: disconnected from the mesh; the node keeps its identity");
        Ok(())
    }

    /// Deletes the identity and the cached netmap through the host side's queue, after any netmap write
    /// still queued there, which would otherwise bring the old netmap back.
    fn forget_identity_files(&mut self) {
        let store = self.managed_mut().store.clone();
        self.host.send(Command::Persist(Box::new(move || store.forget_identity())));
    }

    /// Leaves the mesh for good: the server deletes the node, and this node forgets its identity. Returns
    /// the call that tells the server, to run off the loop.
    async fn logout(&mut self) -> Result<Telling, Error> {
        let m = self.managed_mut();
        if m.identity.is_none() {
            return Err(Error::Input("this node is not registered".into()));
        }
        let ca_cert = m.prefs.ca_cert.clone();
        let mut prefs = m.prefs.clone();
        prefs.want_running = false;
        // Stored first: if that fails, the node is still registered, here and on disk.
        self.store_prefs(prefs)?;
        let identity = self.managed_mut().identity.take().expect("checked above");
        self.disconnect().await;
        self.forget_identity_files();
        self.managed_mut().netmap = None;
        Ok(Box::pin(async move {
            match tell_logout(&identity, ca_cert, Duration::from_secs(10)).await {
                Ok(()) => {
                    tracing::info!("logged out");
                    Ok(())
                }
                Err(e) => Err(Error::System(format!(
                    "logged out here, but the coordination server at {} was not told ({e}); an admin can run meshd \
                     control nodes delete {}",
                    identity.control_url, identity.node_id
                ))),
            }
        }))
    }

    pub(super) fn status(&self) -> Status {
        let peers_now = self.dataplane.peer_status();
        let now_key = |key: &[u8; 32]| peers_now.iter().find(|p| &p.public_key == key);
        let m = self.managed.as_ref().expect("managed");
        let conn = m.conn.borrow().clone();
        let message = match &conn {
            Conn::Connecting(trouble) => trouble.clone(),
            Conn::Refused(m) => Some(m.clone()),
            Conn::Stopped => Some("not connected; run meshd up".into()),
            Conn::Running(_) => m.trouble.clone(),
        };
        let node = m.netmap.as_ref().map(|map| SelfStatus {
            name: map.node.name.clone(),
            ipv4: Some(map.node.ipv4),
            ipv6: Some(map.node.ipv6),
            public_key: config::base64_key(&self.dataplane.public_key()),
            domain: map.domain.clone(),
            listen_port: self.listen_port,
            routes: map.routes.clone(),
        });
        let mut peers = Vec::new();
        if let Some(map) = &m.netmap
            && matches!(conn, Conn::Running(_))
        {
            let now = unix_now();
            // A peer whose key expired is not configured any more; it is not listed either.
            for peer in map.peers.iter().filter(|p| p.key_expiry.is_none_or(|e| e > now)) {
                let key = config::decode_key(&peer.node_key).ok();
                let live = key.as_ref().and_then(now_key);
                let own = [IpNet::from(IpAddr::V4(peer.ipv4)), IpNet::from(IpAddr::V6(peer.ipv6))];
                peers.push(PeerView {
                    name: peer.name.clone(),
                    ipv4: Some(peer.ipv4),
                    ipv6: Some(peer.ipv6),
                    public_key: peer.node_key.clone(),
                    online: Some(peer.online),
                    endpoint: live.and_then(|p| p.endpoint),
                    last_handshake_secs: live.and_then(|p| p.since_handshake).map(|d| d.as_secs()),
                    rx_bytes: live.map_or(0, |p| p.rx_bytes),
                    tx_bytes: live.map_or(0, |p| p.tx_bytes),
                    routes: live
                        .map(|p| p.allowed_ips.iter().filter(|r| !own.contains(r)).copied().collect())
                        .unwrap_or_default(),
                    key_expiry: peer.key_expiry,
                });
            }
        }
        let acl = matches!(conn, Conn::Running(_)).then(|| self.acl_status());
        let userspace = self.userspace_status();
        Status { state: conn.name().into(), message, node, peers, recovered: self.recoveries.clone(), acl, userspace }
    }

    /// The host's own resolvers (from its resolv.conf as it was before meshd wrote it).
    fn host_nameservers(&self) -> Vec<IpAddr> {
        if let Some(userspace) = &self.userspace {
            return userspace.pod_nameservers.clone();
        }
        self.host_dns.as_ref().map(|s| s.original_nameservers.clone()).unwrap_or_default()
    }

    /// The host side's report on its DNS: the resolver follows the host's resolvers when they change.
    pub(super) fn host_dns_changed(&mut self, status: super::resolv_conf::DirectStatus) {
        let before = self.host_nameservers();
        let changed = status.original_nameservers != before;
        self.host_dns = Some(status);
        let Some(map) = self.managed.as_ref().and_then(|m| m.netmap.as_ref()) else { return };
        if changed && self.dataplane.config().dns.is_some() {
            let mut wanted = self.dataplane.config().clone();
            wanted.dns = Some(super::dns::resolver_config(map, &self.host_nameservers()));
            self.reconfigure(wanted);
        }
    }

    /// `meshd dns status`.
    pub(super) fn dns_status(&self) -> crate::local_api::DnsStatus {
        let m = self.managed.as_ref().expect("managed");
        let resolver = self.dataplane.resolver().map(|r| {
            let c = r.config();
            crate::local_api::ResolverStatus {
                addresses: c.addresses.clone(),
                domain: c.domain.clone(),
                magic_dns: c.magic_dns,
                names: c.hosts.iter().map(|(name, _)| name.clone()).collect(),
                extra_records: c.extra.len(),
                split: c.split.iter().map(|(zone, to)| (zone.clone(), to.clone())).collect(),
                upstreams: c.upstreams.clone(),
            }
        });
        let host = self.host_dns.clone();
        let mode = match (&host, m.prefs.accept_dns) {
            (_, false) => "off (--accept-dns=false): the host's DNS is left alone",
            (Some(h), true) if h.gave_up => "direct, given up: another program keeps rewriting resolv.conf",
            (Some(h), true) if h.active && h.mode == "systemd-resolved" => {
                "systemd-resolved: the TUN device's link DNS points at the mesh's resolver"
            }
            (Some(h), true) if h.active => "direct: resolv.conf points at the mesh's resolver",
            _ => "not applied (not connected)",
        };
        crate::local_api::DnsStatus { mode: mode.into(), host, resolver }
    }

    /// `meshd dns query`: asked of the resolver in the data plane; what it forwards is forwarded here.
    pub(super) fn dns_query(&self, name: &str, kind: &str) -> Result<DnsQueryJob, Error> {
        let resolver = self.dataplane.resolver().ok_or_else(|| Error::System("not connected; run meshd up".into()))?;
        let query = super::dns::build_query(name, kind).map_err(Error::Input)?;
        Ok(match resolver.answer(&query, true) {
            mesh_dataplane::dns::Answer::Reply(reply) => {
                DnsQueryJob::Done(super::dns::describe(&reply, "the mesh's resolver"))
            }
            mesh_dataplane::dns::Answer::Forward(upstreams) => DnsQueryJob::Forward(upstreams, query),
            mesh_dataplane::dns::Answer::Ignore => DnsQueryJob::Done("no answer".into()),
        })
    }

    /// Sends one ICMP echo request from this node's mesh address to a peer's, through the tunnel.
    fn ping(&mut self, target: &str) -> Result<(String, IpAddr, oneshot::Receiver<Duration>), Error> {
        let m = self.managed_mut();
        let Some(map) = &m.netmap else { return Err(Error::System("not connected; run meshd up".into())) };
        let domain_suffix = format!(".{}", map.domain);
        let wanted = target.strip_suffix(&domain_suffix).unwrap_or(target);
        let peer = map
            .peers
            .iter()
            .find(|p| p.name == wanted || p.ipv4.to_string() == target || p.ipv6.to_string() == target)
            .ok_or_else(|| {
                Error::Input(format!("no peer named or addressed {target} in the netmap (see meshd status)"))
            })?;
        let (name, ip) = (peer.name.clone(), IpAddr::V4(peer.ipv4));
        let now = Instant::now();
        m.pings.retain(|_, (sent, _)| now.duration_since(*sent) < mesh_dataplane::PING_TIMEOUT);
        let seq = self
            .dataplane
            .send_ping(ip, now)
            .map_err(|reason| Error::System(format!("cannot send to {name}: {}", reason.name())))?;
        let (tx, rx) = oneshot::channel();
        self.managed_mut().pings.insert(seq, (now, tx));
        Ok((name, ip, rx))
    }

    /// The data plane's answer to one of our pings.
    pub(super) fn pong(&mut self, seq: u16, rtt: Duration) {
        if let Some((_, reply)) = self.managed.as_mut().and_then(|m| m.pings.remove(&seq)) {
            let _ = reply.send(rtt);
        }
    }
}

/// What `meshd dns query` still needs after the resolver looked at it.
pub(super) enum DnsQueryJob {
    Done(String),
    Forward(Vec<SocketAddr>, Vec<u8>),
}

/// The host side's answer to a change it makes, for a local API reply to wait on.
type Pending = oneshot::Receiver<Result<(), Error>>;

/// Tells the server the node leaves for good; it deletes the node. A 401 means it is gone already.
pub(super) async fn tell_logout(
    identity: &Identity,
    ca_cert: Option<std::path::PathBuf>,
    timeout: Duration,
) -> Result<(), String> {
    let url = format!("{}/api/v1/logout", identity.control_url);
    let auth = format!("Node {} {}", identity.node_id, identity.credential);
    tokio::task::spawn_blocking(move || {
        let agent = crate::control_client::https_agent(ca_cert.as_deref(), Some(timeout))?;
        let response = agent.post(&url).header("authorization", &auth).send("").map_err(|e| e.to_string())?;
        match response.status().as_u16() {
            204 | 401 => Ok(()),
            other => Err(format!("it answered {other}")),
        }
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r)
}

/// The rest of a logout that waits for the coordination server.
type Telling = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Error>> + Send>>;

/// Answers `reply` with `value` once the host side has done its part (if it has one), without the loop
/// waiting for it.
fn answer_after<T: Send + 'static>(pending: Option<Pending>, reply: oneshot::Sender<Result<T, Error>>, value: T) {
    let Some(pending) = pending else {
        let _ = reply.send(Ok(value));
        return;
    };
    tokio::spawn(async move {
        let result = match pending.await {
            Ok(done) => done.map(|()| value),
            Err(_) => Err(Error::System("meshd is stopping".into())),
        };
        let _ = reply.send(result);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_the_hosts_reachable_addresses_in_a_stable_order() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let addresses = [
            ip("192.168.1.7"),
            ip("127.0.0.1"),
            ip("100.64.0.3"),
            ip("169.254.3.3"),
            ip("fe80::1"),
            ip("10.0.12.9"),
            ip("2001:470::7"),
        ];
        let got = endpoint_candidates(&addresses, &[ip("100.64.0.3")], &[ip("10.0.12.9")], 41641);
        let want: Vec<SocketAddr> = vec!["192.168.1.7:41641".parse().unwrap(), "[2001:470::7]:41641".parse().unwrap()];
        assert_eq!(got, want);
        let mut reversed = addresses;
        reversed.reverse();
        assert_eq!(endpoint_candidates(&reversed, &[ip("100.64.0.3")], &[ip("10.0.12.9")], 41641), want);
    }

    #[test]
    fn a_changed_control_url_never_gets_the_old_servers_credential() {
        let identity = Identity {
            control_url: "https://old.example".into(),
            node_id: 3,
            name: "router".into(),
            credential: "secret".into(),
            ephemeral: false,
        };
        assert!(identity_for(Some(&identity), "https://evil.example").is_none());
        assert_eq!(identity_for(Some(&identity), "https://old.example").map(|i| i.node_id), Some(3));
        assert!(identity_for(None, "https://old.example").is_none());
    }
}
