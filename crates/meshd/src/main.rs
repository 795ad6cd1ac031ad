//! The meshd binary: one executable for the node daemon and its verbs, the coordination server and its
//! administration verbs, and `doctor`.
#![forbid(unsafe_code)]

mod config;
mod control_client;
mod control_http;
mod control_serve;
mod daemon;
mod doctor;
mod error;
mod follow;
mod keys;
mod local_api;
mod node_cli;
mod prefs;
mod run_state;
mod service;
mod uapi;

use error::Error;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "meshd", about = "Userspace WireGuard mesh and subnet router", disable_version_flag = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How the daemons log to stderr: text for people, json (one object per line) for log collectors.
    #[arg(long, global = true, env = "MESHD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node daemon. With --config it runs static peers from a TOML or wg-quick file; without, it
    /// waits for `meshd up` and follows a coordination server.
    Daemon {
        /// Static configuration: meshd TOML, or a wg-quick .conf with [Interface] and [Peer] sections.
        #[arg(long, env = "MESHD_CONFIG")]
        config: Option<PathBuf>,
        /// The local API socket (mode 0600) that up, set, status and the other node verbs use.
        #[arg(long, env = "MESHD_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Where the generated private key and other state live.
        #[arg(long, env = "MESHD_STATE_DIR", default_value = daemon::default_state_dir().to_str())]
        state_dir: PathBuf,
        /// TUN device name (default: the config's, else mesh0), or `userspace`: no TUN device and no
        /// privileges; apps reach the mesh through --forward, --socks5, --http-proxy and --dns.
        #[arg(long, env = "MESHD_TUN")]
        tun: Option<String>,
        /// UDP port for WireGuard (default: the config's ListenPort, else 41641; 0 picks one).
        #[arg(long, env = "MESHD_PORT")]
        port: Option<u16>,
        /// Directory of the WireGuard UAPI socket (<tun>.sock) that `wg show` reads.
        #[arg(long, env = "MESHD_UAPI_DIR", default_value = "/var/run/wireguard")]
        uapi_dir: PathBuf,
        #[command(flatten)]
        routing: RoutingArgs,
        #[command(flatten)]
        router: RouterArgs,
        /// Where runtime state for `meshd doctor` is written.
        #[arg(long, env = "MESHD_RUN_DIR", default_value = "/run/meshd")]
        run_dir: PathBuf,
        #[command(flatten)]
        userspace: Box<UserspaceArgs>,
        #[command(flatten)]
        join: Box<JoinArgs>,
        /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP, no token: bind it where only the
        /// monitoring reaches, e.g. 127.0.0.1:9101).
        #[arg(long, env = "MESHD_METRICS", value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Check the routing state, rules, forwarding, firewall and MTU; print what is wrong and how to fix it.
    Doctor {
        /// TUN device of the meshd to check.
        #[arg(long, env = "MESHD_TUN", default_value = daemon::DEFAULT_TUN)]
        tun: String,
        /// Directory of the UAPI socket through which doctor asks meshd what it routes.
        #[arg(long, env = "MESHD_UAPI_DIR", default_value = "/var/run/wireguard")]
        uapi_dir: PathBuf,
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
        /// Where the daemon writes its runtime state.
        #[arg(long, env = "MESHD_RUN_DIR", default_value = "/run/meshd")]
        run_dir: PathBuf,
        #[command(flatten)]
        routing: RoutingArgs,
        #[command(flatten)]
        daemon: SocketArgs,
    },
    /// Join the mesh (or apply new preferences): register with --auth-key, follow the netmap. Prints the
    /// node's mesh IPv4 once connected.
    Up {
        #[command(flatten)]
        prefs: node_cli::PrefArgs,
        /// An auth key from `meshd control authkey create`, or file:PATH holding one.
        #[arg(long, env = "MESHD_AUTH_KEY", hide_env_values = true)]
        auth_key: Option<String>,
        /// Register again with a new node key (needs --auth-key).
        #[arg(long)]
        force_reauth: bool,
        /// How long to wait for the connection, e.g. 30s, 2m.
        #[arg(long, env = "MESHD_TIMEOUT", default_value = "30s")]
        timeout: String,
        #[command(flatten)]
        daemon: SocketArgs,
    },
    /// Change preferences; only the flags given change.
    Set {
        #[command(flatten)]
        prefs: node_cli::PrefArgs,
        #[command(flatten)]
        daemon: SocketArgs,
    },
    /// This node and its peers: addresses, endpoints, handshakes, transfer, routes.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        daemon: SocketArgs,
    },
    /// MagicDNS on this node: how the host's DNS is wired, and asking the mesh's resolver.
    Dns {
        #[command(subcommand)]
        command: NodeDnsCommand,
    },
    /// Ping a peer (by name or mesh IP) through the tunnel.
    Ping {
        peer: String,
        #[command(flatten)]
        daemon: SocketArgs,
    },
    /// Print this node's mesh addresses, or a peer's.
    Ip {
        peer: Option<String>,
        #[command(flatten)]
        daemon: SocketArgs,
    },
    /// Disconnect from the mesh; the node keeps its identity for the next `up`.
    Down {
        #[command(flatten)]
        daemon: SocketArgs,
    },
    /// Leave the mesh: the server deletes the node and this node forgets its identity.
    Logout {
        #[command(flatten)]
        daemon: SocketArgs,
    },
    /// The coordination server and its administration.
    Control {
        #[command(subcommand)]
        command: ControlCommand,
    },
    /// Print the version of meshd and of the protocols it speaks.
    Version {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

const DEFAULT_SOCKET: &str = "/run/meshd/meshd.sock";

/// How a node verb finds its daemon.
#[derive(Debug, Clone, clap::Args)]
struct SocketArgs {
    /// The daemon's local API socket.
    #[arg(long, env = "MESHD_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

/// Userspace mode's ways in (`--tun userspace`).
#[derive(Debug, clap::Args)]
struct UserspaceArgs {
    /// A local TCP port whose connections go to a mesh name or address, e.g.
    /// 127.0.0.1:5432=stackeye-db-prd:5432 (a bare port listens on 127.0.0.1); repeatable.
    #[arg(long = "forward", env = "MESHD_FORWARD", value_delimiter = ',', value_name = "LISTEN=NAME:PORT")]
    forwards: Vec<mesh_netstack::Forward>,
    /// A port peers may open on this node (the ACL permitting), served by this local port; every other
    /// port is closed. Repeatable.
    #[arg(long = "expose", env = "MESHD_EXPOSE", value_delimiter = ',', value_name = "PORT[=LOCALPORT]")]
    exposes: Vec<mesh_netstack::Expose>,
    /// A DNS server for the pod that answers mesh names (a forward's name with its local address) and asks
    /// the pod's resolvers for the rest, e.g. 127.0.0.53:53.
    #[arg(long, env = "MESHD_DNS", value_name = "ADDR")]
    dns: Option<std::net::SocketAddr>,
    /// Where the DNS stub sends names the mesh does not answer (default: the resolv.conf's servers, less the
    /// stub itself; give the cluster's DNS when the pod's resolv.conf points at the stub).
    #[arg(long, env = "MESHD_DNS_UPSTREAM", value_delimiter = ',', value_name = "IP,..")]
    dns_upstream: Vec<std::net::IpAddr>,
    /// A SOCKS5 proxy into the mesh (CONNECT), e.g. 127.0.0.1:1080.
    #[arg(long, env = "MESHD_SOCKS5", value_name = "ADDR")]
    socks5: Option<std::net::SocketAddr>,
    /// An HTTP proxy into the mesh (CONNECT and http:// requests); may be the SOCKS5 address too.
    #[arg(long, env = "MESHD_HTTP_PROXY", value_name = "ADDR")]
    http_proxy: Option<std::net::SocketAddr>,
    /// USER:PASSWORD (or file:PATH holding it) the proxies ask for.
    #[arg(long, env = "MESHD_PROXY_AUTH", hide_env_values = true)]
    proxy_auth: Option<String>,
    /// /livez and /readyz over HTTP, e.g. 127.0.0.1:9002.
    #[arg(long, env = "MESHD_HEALTH", value_name = "ADDR")]
    health: Option<std::net::SocketAddr>,
    /// How long SIGTERM lets open flows finish before the node logs out and stops.
    #[arg(long, env = "MESHD_DRAIN", default_value = "10s", value_parser = control_client::parse_duration)]
    drain: u64,
}

impl UserspaceArgs {
    fn options(self, userspace: bool) -> Result<Option<daemon::userspace::Options>, Error> {
        let given = !self.forwards.is_empty()
            || !self.exposes.is_empty()
            || self.dns.is_some()
            || self.socks5.is_some()
            || self.http_proxy.is_some()
            || self.health.is_some();
        if !userspace {
            return if given {
                Err(Error::Input(
                    "--forward, --expose, --dns, --socks5, --http-proxy and --health need --tun userspace".into(),
                ))
            } else {
                Ok(None)
            };
        }
        let proxy_auth = match self.proxy_auth {
            None => None,
            Some(text) => {
                let text = match text.strip_prefix("file:") {
                    Some(path) => std::fs::read_to_string(path)
                        .map_err(|e| Error::Input(format!("--proxy-auth file:{path}: cannot read: {e}")))?
                        .trim()
                        .to_string(),
                    None => text,
                };
                let Some((user, pass)) = text.split_once(':') else {
                    return Err(Error::Input("--proxy-auth: expected USER:PASSWORD".into()));
                };
                Some(mesh_netstack::Credentials { user: user.into(), pass: pass.into() })
            }
        };
        let options = daemon::userspace::Options {
            forwards: self.forwards,
            exposes: self.exposes,
            dns: self.dns,
            dns_upstreams: self.dns_upstream,
            socks5: self.socks5,
            http_proxy: self.http_proxy,
            proxy_auth,
            health: self.health,
            limits: mesh_netstack::Limits::default(),
            drain: std::time::Duration::from_secs(self.drain),
        };
        options.check()?;
        Ok(Some(options))
    }
}

/// Joining at start, for a container configured by its environment alone (the same as `meshd up` with
/// these flags once the daemon runs).
#[derive(Debug, clap::Args)]
struct JoinArgs {
    /// The coordination server to join at start (with --auth-key), as `meshd up` would.
    #[command(flatten)]
    server: node_cli::ServerArgs,
    /// An auth key, or file:PATH holding one.
    #[arg(long, env = "MESHD_AUTH_KEY", hide_env_values = true)]
    auth_key: Option<String>,
    #[arg(long, env = "MESHD_HOSTNAME")]
    hostname: Option<String>,
    #[arg(long, env = "MESHD_ADVERTISE_TAGS", value_delimiter = ',', value_name = "tag:a,..")]
    advertise_tags: Option<Vec<String>>,
    /// Point the host's DNS at the mesh's resolver once joined, as `meshd up --accept-dns` (a container
    /// with a read-only /etc wants false).
    #[arg(long, env = "MESHD_ACCEPT_DNS", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    accept_dns: Option<bool>,
}

impl JoinArgs {
    fn request(self, router: &RouterArgs, routing: &RoutingArgs) -> Result<Option<local_api::UpRequest>, Error> {
        let ca_cert = self.server.ca_cert();
        let Some(control_url) = self.server.control_url else {
            if self.auth_key.is_some() {
                return Err(Error::Input(
                    "--auth-key needs --control-url (or MESHD_CONTROL_URL) to join at start".into(),
                ));
            }
            return Ok(None);
        };
        Ok(Some(local_api::UpRequest {
            prefs: prefs::PrefsPatch {
                control_url: Some(control_url),
                ca_cert,
                insecure_http: self.server.insecure_http,
                hostname: self.hostname,
                advertise_tags: self.advertise_tags,
                accept_dns: self.accept_dns,
                // A router configured by env alone (a container) joins with its routes: the static mode's
                // --advertise-routes, --snat-subnet-routes and --snat-address become its preferences.
                advertise_routes: (!router.advertise_routes.is_empty()).then(|| {
                    router.advertise_routes.iter().map(|&(prefix, snat)| prefs::Advertised { prefix, snat }).collect()
                }),
                snat_subnet_routes: (!router.advertise_routes.is_empty()).then_some(router.snat_subnet_routes),
                snat_address: (!router.snat_address.is_empty()).then(|| router.snat_address.clone()),
                // A sidecar that reaches subnets behind routers (the seed's `acceptRoutes: true`).
                accept_routes: routing.accept_routes.clone(),
                ..prefs::PrefsPatch::default()
            },
            auth_key: node_cli::read_auth_key(self.auth_key)?,
            force_reauth: false,
            timeout_ms: 0,
        }))
    }
}

/// Where meshd's routes and rules go. The defaults are Tailscale's, so choose others when both run.
#[derive(Debug, clap::Args)]
struct RoutingArgs {
    /// Routing table for mesh routes.
    #[arg(long, env = "MESHD_TABLE", default_value_t = 52, value_parser = clap::value_parser!(u32).range(1..=0xffff_fffe))]
    table: u32,
    /// Mark on meshd's own sockets, so its encrypted traffic bypasses the mesh table (decimal or 0x hex).
    #[arg(long, env = "MESHD_FWMARK", default_value = "0x80000", value_parser = parse_u32)]
    fwmark: u32,
    /// Priority of the first policy rule; the others follow at +20, +40 and +60.
    #[arg(long, env = "MESHD_RULE_PRIORITY", default_value_t = 5210, value_parser = clap::value_parser!(u32).range(1..=32700))]
    rule_priority: u32,
    /// Route only subnet routes inside these prefixes (and their more-specifics) into the mesh (`true`: all,
    /// `false`: none); peers' own addresses always are. Without it, a static node routes every allowed IP.
    /// A node joining at start (--control-url) takes it as `meshd up --accept-routes` would.
    #[arg(long, env = "MESHD_ACCEPT_ROUTES", value_name = "BOOL|CIDR,..", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = mesh_dataplane::netmap::AcceptRoutes::parse)]
    accept_routes: Option<mesh_dataplane::netmap::AcceptRoutes>,
}

#[derive(Debug, Subcommand)]
enum ControlCommand {
    /// Run the coordination server.
    Serve {
        /// Address and port to listen on.
        #[arg(long, env = "MESHD_CONTROL_LISTEN", default_value = "0.0.0.0:8443")]
        listen: std::net::SocketAddr,
        /// Where the database and the admin token live.
        #[arg(long, env = "MESHD_CONTROL_DATA_DIR", default_value = "/var/lib/meshd-control")]
        data_dir: PathBuf,
        /// sqlite://PATH (default: <data-dir>/control.db).
        #[arg(long, env = "MESHD_CONTROL_DB")]
        db: Option<String>,
        /// Policy file (HuJSON, in the shape of Tailscale's). Replaces the stored policy when it differs;
        /// without it the stored one (from the last `policy set`) stays.
        #[arg(long, env = "MESHD_CONTROL_POLICY")]
        policy: Option<PathBuf>,
        /// The mesh's DNS domain.
        #[arg(long, env = "MESHD_CONTROL_DOMAIN", default_value = "mesh.internal")]
        domain: String,
        /// PEM certificate chain for HTTPS.
        #[arg(long, env = "MESHD_CONTROL_TLS_CERT")]
        tls_cert: Option<PathBuf>,
        /// PEM private key for HTTPS.
        #[arg(long, env = "MESHD_CONTROL_TLS_KEY")]
        tls_key: Option<PathBuf>,
        /// Serve plain HTTP (only on a network you trust).
        #[arg(long, env = "MESHD_CONTROL_INSECURE_HTTP")]
        insecure_http: bool,
        /// Seconds an ephemeral node may be offline before it is removed.
        #[arg(long, env = "MESHD_CONTROL_EPHEMERAL_TIMEOUT", default_value_t = 600)]
        ephemeral_timeout: u64,
        /// How long a node's key is trusted after it registers (e.g. 180d); peers drop it then by
        /// themselves, and it must re-register. Default: until an administrator expires it.
        #[arg(long, env = "MESHD_CONTROL_KEY_EXPIRY", value_name = "DUR", value_parser = control_client::parse_duration)]
        key_expiry: Option<u64>,
        /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP, no token: keep it off the internet).
        #[arg(long, env = "MESHD_CONTROL_METRICS", value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Auth keys: create, list, revoke.
    Authkey {
        #[command(subcommand)]
        command: AuthkeyCommand,
        #[command(flatten)]
        connection: ConnectionArgs,
    },
    /// Users, who own their untagged nodes: list, create, delete.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
        #[command(flatten)]
        connection: ConnectionArgs,
    },
    /// Nodes: list, delete, expire.
    Nodes {
        #[command(subcommand)]
        command: NodesCommand,
        #[command(flatten)]
        connection: ConnectionArgs,
    },
    /// Advertised routes: list, approve, reject.
    Routes {
        #[command(subcommand)]
        command: RoutesCommand,
        #[command(flatten)]
        connection: ConnectionArgs,
    },
    /// The policy: get, set, check.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
        #[command(flatten)]
        connection: ConnectionArgs,
    },
    /// The mesh's DNS settings (MagicDNS, split DNS, extra records): get, set.
    Dns {
        #[command(subcommand)]
        command: DnsCommand,
        #[command(flatten)]
        connection: ConnectionArgs,
    },
    /// Print a link that signs a browser in to the admin console (<server>/admin/) once, within 10 minutes.
    AdminLink {
        #[command(flatten)]
        connection: ConnectionArgs,
    },
}

/// How the administration verbs reach the server.
#[derive(Debug, clap::Args)]
struct ConnectionArgs {
    /// The coordination server, e.g. https://control.example:8443.
    #[arg(long, global = true, env = "MESHD_CONTROL_URL", default_value = "")]
    control_url: String,
    /// The admin token, or file:PATH to read it from (serve writes <data-dir>/admin-token).
    #[arg(long, global = true, env = "MESHD_ADMIN_TOKEN", default_value = "", hide_env_values = true)]
    admin_token: String,
    /// A CA certificate (PEM) to trust for the server, when it is not in the public web PKI.
    #[arg(long, global = true, env = "MESHD_CA_CERT")]
    ca_cert: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum AuthkeyCommand {
    /// Create an auth key; prints only the key.
    Create {
        #[arg(long)]
        reusable: bool,
        #[arg(long)]
        ephemeral: bool,
        /// Tags nodes joining with the key get, e.g. tag:router,tag:infra.
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        /// Expiry such as 90d, 12h (default: never).
        #[arg(long)]
        expiry: Option<String>,
        /// The user whose untagged nodes the key makes (see `users create`).
        #[arg(long)]
        user: Option<String>,
    },
    List,
    Revoke {
        id: u64,
    },
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    List,
    /// NAME: a login or an e-mail address.
    Create {
        name: String,
    },
    /// Only a user who owns no nodes and no usable keys.
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum NodesCommand {
    List,
    /// NODE: its name or its id.
    Delete {
        node: String,
    },
    Expire {
        node: String,
    },
    /// Give a node a new name (its DNS names follow): NODE is its name or id, NAME a DNS label.
    Rename {
        node: String,
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum NodeDnsCommand {
    /// The host DNS mode (direct, off), what meshd wrote, the host's own resolvers, and what the resolver
    /// answers for and forwards where.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        daemon: SocketArgs,
    },
    /// Ask the mesh's resolver (as programs on this host do at 100.100.100.100).
    Query {
        name: String,
        /// A, AAAA, PTR, TXT, ... (default A).
        #[arg(default_value = "A")]
        kind: String,
        #[command(flatten)]
        daemon: SocketArgs,
    },
}

#[derive(Debug, Subcommand)]
enum DnsCommand {
    /// Print the DNS settings as they were set (`{}`: the defaults).
    Get,
    /// Replace the DNS settings with FILE (HuJSON: magic_dns, nameservers.global, nameservers.split,
    /// search_domains, extra_records, override_local_dns); refused whole if anything in it is wrong.
    Set { file: PathBuf },
}

#[derive(Debug, Subcommand)]
enum RoutesCommand {
    List,
    /// NODE: its name or its id.
    Approve {
        node: String,
        prefix: ipnet::IpNet,
    },
    Reject {
        node: String,
        prefix: ipnet::IpNet,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    Get,
    /// Replace the policy; refused whole if it does not parse or its tests fail.
    Set {
        file: PathBuf,
    },
    /// Check a policy (and run its tests against the nodes) without setting it.
    Check {
        file: PathBuf,
    },
    /// Which rule lets SRC reach DST:PORT[/PROTO] (nodes by name or address), or "denied by default".
    Explain {
        src: String,
        dst: String,
    },
    /// Compile one of Tailscale's captured records (shared/conformance) without a server: prints each
    /// node's rules and peers in the record's shapes, or one line and exit status 2 if the policy is refused.
    Compile {
        #[arg(long, value_name = "FILE")]
        record: PathBuf,
    },
}

/// What a subnet router serves and how.
#[derive(Debug, clap::Args)]
struct RouterArgs {
    /// Routes this node forwards into from the mesh (peers list them in its allowed IPs). A prefix may end in
    /// `:nosnat` (keep sources) or `:snat`, overriding --snat-subnet-routes for it.
    #[arg(long, env = "MESHD_ADVERTISE_ROUTES", value_name = "CIDR[:nosnat],..", value_delimiter = ',', value_parser = parse_served)]
    advertise_routes: Vec<(ipnet::IpNet, Option<bool>)>,
    /// Rewrite the source of forwarded packets to --snat-address (the default), or keep the mesh source.
    #[arg(long, env = "MESHD_SNAT_SUBNET_ROUTES", default_value_t = true, action = clap::ArgAction::Set)]
    snat_subnet_routes: bool,
    /// A free address on the LAN (e.g. a cloud secondary private IP) that forwarded traffic appears from; one
    /// IPv4 and one IPv6 at most.
    #[arg(long, env = "MESHD_SNAT_ADDRESS", value_name = "IP,..", value_delimiter = ',')]
    snat_address: Vec<std::net::IpAddr>,
    /// One peer may hold at most 1/N of the SNAT engine's flows, external ports and fragment slots, so
    /// no peer can take them from every other (1: no per-peer limit).
    #[arg(long, env = "MESHD_SNAT_SOURCE_SHARE", value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    snat_source_share: u32,
}

impl RouterArgs {
    fn served(&self) -> Vec<mesh_dataplane::router::Served> {
        self.advertise_routes
            .iter()
            .map(|(prefix, snat)| mesh_dataplane::router::Served {
                prefix: prefix.trunc(),
                snat: snat.unwrap_or(self.snat_subnet_routes),
            })
            .collect()
    }
}

pub(crate) fn parse_served(text: &str) -> Result<(ipnet::IpNet, Option<bool>), String> {
    let (prefix, mode) = match text.rsplit_once(':') {
        Some((p, "nosnat")) => (p, Some(false)),
        Some((p, "snat")) => (p, Some(true)),
        _ => (text, None),
    };
    let prefix: ipnet::IpNet =
        prefix.parse().map_err(|_| format!("{text:?} is not a prefix like 10.0.0.0/16 (optionally :nosnat)"))?;
    Ok((prefix, mode))
}

impl RoutingArgs {
    fn accept(&self) -> mesh_dataplane::netmap::AcceptRoutes {
        self.accept_routes.clone().unwrap_or(mesh_dataplane::netmap::AcceptRoutes::All)
    }

    fn policy(&self) -> mesh_linux::RoutingPolicy {
        mesh_linux::RoutingPolicy::new(self.table, self.fwmark, self.rule_priority)
    }
}

fn parse_u32(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    match parsed {
        Ok(0) => Err("the mark must not be 0".into()),
        Ok(v) => Ok(v),
        Err(_) => Err(format!("{text:?} is not a number (decimal or 0x hex)")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = cli.log_format;
    let init_logging = || init_logging(log_format);
    match cli.command {
        Command::Version { json } => {
            println!("{}", version_text(json));
            ExitCode::SUCCESS
        }
        Command::Doctor { tun, uapi_dir, json, routing, run_dir, daemon } => doctor::run(doctor::Options {
            socket: daemon.socket,
            tun,
            uapi_dir,
            policy: routing.policy(),
            accept: routing.accept(),
            json,
            run_dir,
        }),
        Command::Up { prefs, auth_key, force_reauth, timeout, daemon } => {
            node_cli::run(daemon.socket, node_cli::Verb::Up { prefs: Box::new(prefs), auth_key, force_reauth, timeout })
        }
        Command::Set { prefs, daemon } => node_cli::run(daemon.socket, node_cli::Verb::Set(Box::new(prefs))),
        Command::Status { json, daemon } => node_cli::run(daemon.socket, node_cli::Verb::Status { json }),
        Command::Ping { peer, daemon } => node_cli::run(daemon.socket, node_cli::Verb::Ping { peer }),
        Command::Dns { command: NodeDnsCommand::Status { json, daemon } } => {
            node_cli::run(daemon.socket, node_cli::Verb::DnsStatus { json })
        }
        Command::Dns { command: NodeDnsCommand::Query { name, kind, daemon } } => {
            node_cli::run(daemon.socket, node_cli::Verb::DnsQuery { name, kind })
        }
        Command::Ip { peer, daemon } => node_cli::run(daemon.socket, node_cli::Verb::Ip { peer }),
        Command::Down { daemon } => node_cli::run(daemon.socket, node_cli::Verb::Down),
        Command::Logout { daemon } => node_cli::run(daemon.socket, node_cli::Verb::Logout),
        Command::Daemon {
            config,
            socket,
            state_dir,
            tun,
            port,
            uapi_dir,
            routing,
            router,
            run_dir,
            userspace,
            join,
            metrics,
        } => {
            init_logging();
            let flags = userspace
                .options(tun.as_deref() == Some("userspace"))
                .and_then(|u| Ok((u, join.request(&router, &routing)?)));
            let (userspace, join) = match flags {
                Ok(parsed) => parsed,
                Err(e) => return block_on(async { Err(e) }),
            };
            let options = daemon::Options {
                config,
                socket,
                state_dir,
                tun,
                port,
                uapi_dir,
                policy: routing.policy(),
                accept: routing.accept(),
                served: router.served(),
                snat_addresses: router.snat_address.clone(),
                snat_source_share: router.snat_source_share,
                run_dir,
                userspace,
                join,
                metrics,
            };
            block_on(daemon::run(options))
        }
        Command::Control { command: ControlCommand::Authkey { command, connection } } => {
            use control_client::Verb;
            let verb = match command {
                AuthkeyCommand::Create { reusable, ephemeral, tags, expiry, user } => {
                    Verb::KeyCreate { reusable, ephemeral, tags, expiry, user }
                }
                AuthkeyCommand::List => Verb::KeyList,
                AuthkeyCommand::Revoke { id } => Verb::KeyRevoke(id),
            };
            admin(connection, verb)
        }
        Command::Control { command: ControlCommand::Users { command, connection } } => {
            use control_client::Verb;
            let verb = match command {
                UsersCommand::List => Verb::UserList,
                UsersCommand::Create { name } => Verb::UserCreate(name),
                UsersCommand::Delete { name } => Verb::UserDelete(name),
            };
            admin(connection, verb)
        }
        Command::Control { command: ControlCommand::Nodes { command, connection } } => {
            use control_client::Verb;
            let verb = match command {
                NodesCommand::List => Verb::NodeList,
                NodesCommand::Delete { node } => Verb::NodeDelete(node),
                NodesCommand::Expire { node } => Verb::NodeExpire(node),
                NodesCommand::Rename { node, name } => Verb::NodeRename { node, name },
            };
            admin(connection, verb)
        }
        Command::Control { command: ControlCommand::AdminLink { connection } } => {
            admin(connection, control_client::Verb::AdminLink)
        }
        Command::Control { command: ControlCommand::Dns { command, connection } } => {
            use control_client::Verb;
            let verb = match command {
                DnsCommand::Get => Verb::DnsGet,
                DnsCommand::Set { file } => Verb::DnsSet(file),
            };
            admin(connection, verb)
        }
        Command::Control { command: ControlCommand::Routes { command, connection } } => {
            use control_client::Verb;
            let verb = match command {
                RoutesCommand::List => Verb::RouteList,
                RoutesCommand::Approve { node, prefix } => Verb::RouteSet { node, prefix, approve: true },
                RoutesCommand::Reject { node, prefix } => Verb::RouteSet { node, prefix, approve: false },
            };
            admin(connection, verb)
        }
        Command::Control { command: ControlCommand::Policy { command: PolicyCommand::Compile { record }, .. } } => {
            finish(compile_record(&record))
        }
        Command::Control { command: ControlCommand::Policy { command, connection } } => {
            use control_client::Verb;
            let verb = match command {
                PolicyCommand::Get => Verb::PolicyGet,
                PolicyCommand::Set { file } => Verb::PolicySet(file),
                PolicyCommand::Check { file } => Verb::PolicyCheck(file),
                PolicyCommand::Explain { src, dst } => Verb::PolicyExplain { src, dst },
                PolicyCommand::Compile { .. } => unreachable!("answered without a server above"),
            };
            admin(connection, verb)
        }
        Command::Control {
            command:
                ControlCommand::Serve {
                    listen,
                    data_dir,
                    db,
                    policy,
                    domain,
                    tls_cert,
                    tls_key,
                    insecure_http,
                    ephemeral_timeout,
                    key_expiry,
                    metrics,
                },
        } => {
            init_logging();
            let options = control_serve::Options {
                listen,
                data_dir,
                db,
                policy,
                domain,
                tls_cert,
                tls_key,
                insecure_http,
                ephemeral_timeout,
                key_expiry,
                metrics,
            };
            block_on(control_serve::run(options))
        }
    }
}

/// `meshd control policy compile --record FILE`.
fn compile_record(path: &std::path::Path) -> Result<String, Error> {
    use mesh_control::policy::record::{RecordError, compile_record};
    let text = std::fs::read_to_string(path).map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    match compile_record(&text) {
        Ok(answer) => Ok(serde_json::to_string_pretty(&answer).expect("JSON values serialize")),
        Err(RecordError::Unreadable(e)) => Err(Error::Input(format!("{}: not a capture record: {e}", path.display()))),
        Err(RecordError::Refused(e)) => Err(Error::Input(e.replace('\n', "; "))),
    }
}

/// Prints a verb's output (if any) or its one-line error, and gives the exit status.
pub(crate) fn finish(result: Result<String, Error>) -> ExitCode {
    match result {
        Ok(output) => {
            if !output.is_empty() {
                println!("{output}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshd: {e}");
            e.exit_code()
        }
    }
}

fn admin(connection: ConnectionArgs, verb: control_client::Verb) -> ExitCode {
    if connection.control_url.is_empty() {
        eprintln!("meshd: --control-url (or MESHD_CONTROL_URL) names the coordination server");
        return ExitCode::from(2);
    }
    let connection = control_client::Connection {
        url: connection.control_url,
        admin_token: connection.admin_token,
        ca_cert: connection.ca_cert,
    };
    control_client::run(connection, verb)
}

/// Runs a command on a single-threaded runtime and turns its failure into one line and an exit status:
/// 2 for bad input, 1 for the system refusing.
fn block_on(task: impl std::future::Future<Output = Result<(), Error>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd: {e}");
            e.exit_code()
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESHD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        // One JSON object per line, the event's fields at the top level beside `timestamp`, `level` and
        // `message`: what Loki, Elasticsearch and journald's exporters take without a parser.
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_span_list(false).init(),
    }
}

fn version_text(json: bool) -> String {
    let version = env!("CARGO_PKG_VERSION");
    let commit = option_env!("MESHD_GIT_COMMIT").unwrap_or("unknown");
    if json {
        format!(r#"{{"version":"{version}","commit":"{commit}","wireguard":"1"}}"#)
    } else {
        format!("meshd {version} (commit {commit})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names_the_package_version() {
        assert_eq!(version_text(false), format!("meshd {} (commit unknown)", env!("CARGO_PKG_VERSION")));
        assert!(version_text(true).starts_with(r#"{"version":""#));
    }

    #[test]
    fn served_routes_take_a_snat_suffix() {
        assert_eq!(parse_served("10.0.0.0/16"), Ok(("10.0.0.0/16".parse().unwrap(), None)));
        assert_eq!(parse_served("10.42.0.0/16:nosnat"), Ok(("10.42.0.0/16".parse().unwrap(), Some(false))));
        assert_eq!(parse_served("fd00::/48:snat"), Ok(("fd00::/48".parse().unwrap(), Some(true))));
        assert!(parse_served("10.0.0.0/16:maybe").is_err());
        assert!(parse_served("nonsense").is_err());
    }

    #[test]
    fn marks_and_masks() {
        assert_eq!(parse_u32("0x80000"), Ok(0x80000));
        assert_eq!(parse_u32("524288"), Ok(0x80000));
        assert!(parse_u32("0").is_err());
        assert!(parse_u32("0xzz").is_err());
        let mask = |mark| mesh_linux::RoutingPolicy::new(52, mark, 5210).fwmask;
        assert_eq!(mask(0x80000), 0xff0000);
        assert_eq!(mask(0x1), 0xff);
        assert_eq!(mask(0x10100), 0xffff00);
        assert_eq!(mesh_linux::RoutingPolicy::new(52, 0x80000, 5210), mesh_linux::RoutingPolicy::default());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
