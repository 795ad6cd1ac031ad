//! The node verbs (`up`, `set`, `status`, `ping`, `ip`, `down`, `logout`): each is one request to the local
//! daemon over its Unix socket, printed for people (or as JSON where asked).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::error::Error;
use crate::follow::escape_controls;
use crate::local_api::{self, PingReply, Status, UpReply, UpRequest};
use mesh_dataplane::netmap::AcceptRoutes;

use crate::prefs::{Advertised, PrefsPatch};

/// How a node reaches its coordination server (`up`, `set`, and `daemon` joining at start).
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// The coordination server, e.g. https://control.example:8443.
    #[arg(long, env = "MESHD_CONTROL_URL")]
    pub control_url: Option<String>,
    /// A CA certificate (PEM) to trust for the server, when it is not in the public web PKI.
    #[arg(long, env = "MESHD_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Allow an http:// control URL (credentials cross the network unencrypted; the server needs
    /// --insecure-http too).
    #[arg(long, env = "MESHD_INSECURE_HTTP", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub insecure_http: Option<bool>,
}

impl ServerArgs {
    /// The CA path made absolute: the daemon that reads it runs elsewhere.
    pub fn ca_cert(&self) -> Option<PathBuf> {
        self.ca_cert.as_ref().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
    }
}

/// The preference flags `up` and `set` share; a flag not given leaves that preference as it is.
#[derive(Debug, Clone, clap::Args)]
pub struct PrefArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The name to register with (default: the host name).
    #[arg(long, env = "MESHD_HOSTNAME")]
    hostname: Option<String>,
    /// Subnets this node routes for the mesh; `CIDR:nosnat` keeps sources for that prefix. Empty clears.
    #[arg(long, env = "MESHD_ADVERTISE_ROUTES", value_name = "CIDR[:nosnat],..")]
    advertise_routes: Option<String>,
    /// Accept peers' subnet routes: all (no value or `true`), none (`false`), or only those inside the given
    /// prefixes.
    #[arg(long, env = "MESHD_ACCEPT_ROUTES", value_name = "BOOL|CIDR,..", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    accept_routes: Option<String>,
    /// Rewrite the source of forwarded traffic to --snat-address (true), or keep the mesh source (false).
    #[arg(long, env = "MESHD_SNAT_SUBNET_ROUTES", value_name = "BOOL", action = clap::ArgAction::Set)]
    snat_subnet_routes: Option<bool>,
    /// A free LAN address forwarded traffic appears from (one IPv4 and one IPv6 at most). Empty clears.
    #[arg(long, env = "MESHD_SNAT_ADDRESS", value_name = "IP,..")]
    snat_address: Option<String>,
    /// Tags to request for this node, e.g. tag:router (the auth key must allow them).
    #[arg(long, env = "MESHD_ADVERTISE_TAGS", value_name = "tag:a,..")]
    advertise_tags: Option<String>,
    /// Offer this node as an exit node (advertises 0.0.0.0/0 and ::/0; an administrator or
    /// autoApprovers.exitNode approves them).
    #[arg(long, env = "MESHD_ADVERTISE_EXIT_NODE", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    advertise_exit_node: Option<bool>,
    /// Send all traffic through this exit node (a peer's name or mesh IP); empty clears it.
    #[arg(long, env = "MESHD_EXIT_NODE", value_name = "PEER")]
    exit_node: Option<String>,
    /// Point this host's DNS at the mesh's resolver (default true): mesh names, split DNS and extra records
    /// resolve for every program; false leaves the host's DNS alone (100.100.100.100 still answers).
    #[arg(long, env = "MESHD_ACCEPT_DNS", value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    accept_dns: Option<bool>,
}

fn list(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty())
}

impl PrefArgs {
    fn patch(&self) -> Result<PrefsPatch, String> {
        let advertise_routes = match &self.advertise_routes {
            None => None,
            Some(text) => Some(
                list(text)
                    .map(|item| crate::parse_served(item).map(|(prefix, snat)| Advertised { prefix, snat }))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("--advertise-routes: {e}"))?,
            ),
        };
        let snat_address = match &self.snat_address {
            None => None,
            Some(text) => Some(
                list(text)
                    .map(|a| a.parse().map_err(|_| format!("--snat-address: {a:?} is not an IP address")))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        Ok(PrefsPatch {
            control_url: self.server.control_url.clone(),
            ca_cert: self.server.ca_cert(),
            insecure_http: self.server.insecure_http,
            hostname: self.hostname.clone(),
            advertise_routes,
            accept_routes: self.accept_routes.as_deref().map(AcceptRoutes::parse).transpose()?,
            snat_subnet_routes: self.snat_subnet_routes,
            snat_address,
            advertise_tags: self.advertise_tags.as_deref().map(|t| list(t).map(str::to_string).collect()),
            advertise_exit_node: self.advertise_exit_node,
            exit_node: self.exit_node.as_ref().map(|e| e.trim().to_string()),
            accept_dns: self.accept_dns,
        })
    }
}

#[derive(Debug, Clone)]
pub enum Verb {
    Up { prefs: Box<PrefArgs>, auth_key: Option<String>, force_reauth: bool, timeout: String },
    Set(Box<PrefArgs>),
    Status { json: bool },
    Ping { peer: String },
    DnsStatus { json: bool },
    DnsQuery { name: String, kind: String },
    Ip { peer: Option<String> },
    Down,
    Logout,
}

pub fn run(socket: PathBuf, verb: Verb) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    crate::finish(runtime.block_on(execute(&socket, verb)))
}

/// One request; a refusal becomes its one line (bad input when the daemon says the request was wrong).
async fn request(socket: &PathBuf, method: &str, path: &str, body: Option<String>) -> Result<String, Error> {
    let (status, text) = local_api::call(socket, method, path, body).await.map_err(Error::System)?;
    match status {
        200..=299 => Ok(text),
        400 => Err(Error::Input(local_api::error_text(status, &text))),
        _ => Err(Error::System(local_api::error_text(status, &text))),
    }
}

fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, Error> {
    serde_json::from_str(text).map_err(|e| Error::System(format!("unexpected answer from the daemon: {e}")))
}

pub fn read_auth_key(given: Option<String>) -> Result<Option<String>, Error> {
    match given {
        Some(k) if k.starts_with("file:") => {
            let path = &k["file:".len()..];
            std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_string()))
                .map_err(|e| Error::Input(format!("--auth-key file:{path}: cannot read: {e}")))
        }
        other => Ok(other.filter(|k| !k.is_empty())),
    }
}

async fn execute(socket: &PathBuf, verb: Verb) -> Result<String, Error> {
    match verb {
        Verb::Up { prefs, auth_key: key, force_reauth, timeout } => {
            let timeout =
                crate::control_client::parse_duration(&timeout).map_err(|e| Error::Input(format!("--timeout {e}")))?;
            let up = UpRequest {
                prefs: prefs.patch().map_err(Error::Input)?,
                auth_key: read_auth_key(key)?,
                force_reauth,
                timeout_ms: timeout.saturating_mul(1000),
            };
            let body = serde_json::to_string(&up).map_err(|e| Error::System(e.to_string()))?;
            let reply: UpReply = parse(&request(socket, "POST", "/v1/up", Some(body)).await?)?;
            eprintln!("meshd: connected as {} ({}, {})", escape_controls(&reply.name), reply.ipv4, reply.ipv6);
            Ok(reply.ipv4.to_string())
        }
        Verb::Set(prefs) => {
            let body = serde_json::to_string(&prefs.patch().map_err(Error::Input)?)
                .map_err(|e| Error::System(e.to_string()))?;
            request(socket, "POST", "/v1/set", Some(body)).await.map(|_| String::new())
        }
        Verb::Down => request(socket, "POST", "/v1/down", None).await.map(|_| String::new()),
        Verb::Logout => request(socket, "POST", "/v1/logout", None).await.map(|_| String::new()),
        Verb::Status { json } => {
            let text = request(socket, "GET", "/v1/status", None).await?;
            if json {
                return Ok(text);
            }
            Ok(format_status(&parse(&text)?))
        }
        Verb::Ip { peer } => {
            let status: Status = parse(&request(socket, "GET", "/v1/status", None).await?)?;
            let (v4, v6) = match &peer {
                None => {
                    let node = status.node.ok_or_else(|| Error::System("not connected; run meshd up".into()))?;
                    (node.ipv4, node.ipv6)
                }
                Some(name) => {
                    let p = status
                        .peers
                        .iter()
                        .find(|p| &p.name == name || p.ipv4.is_some_and(|a| a.to_string() == *name))
                        .ok_or_else(|| Error::System(format!("no peer named {name} (see meshd status)")))?;
                    (p.ipv4, p.ipv6)
                }
            };
            Ok([v4.map(|a| a.to_string()), v6.map(|a| a.to_string())]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("\n"))
        }
        Verb::DnsStatus { json } => {
            let text = request(socket, "GET", "/v1/dns/status", None).await?;
            if json {
                return Ok(text);
            }
            Ok(format_dns_status(&parse(&text)?))
        }
        Verb::DnsQuery { name, kind } => {
            let body = serde_json::json!({ "name": name, "kind": kind }).to_string();
            request(socket, "POST", "/v1/dns/query", Some(body)).await.map(|text| escape_controls(&text))
        }
        Verb::Ping { peer } => {
            let body = serde_json::json!({ "peer": peer }).to_string();
            let reply: PingReply = parse(&request(socket, "POST", "/v1/ping", Some(body)).await?)?;
            Ok(format!(
                "pong from {} ({}) through the tunnel in {:.2} ms",
                escape_controls(&reply.name),
                reply.ip,
                reply.rtt_us as f64 / 1000.0
            ))
        }
    }
}

fn bytes(n: u64) -> String {
    match n {
        0..1024 => format!("{n} B"),
        1024..1_048_576 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1_048_576.0),
    }
}

fn format_status(status: &Status) -> String {
    let mut out = String::new();
    let none = || "-".to_string();
    match &status.node {
        Some(node) => {
            out.push_str(&format!(
                "{:<16} {:<24} {}.{}  this node ({}), port {}\n",
                node.ipv4.map_or_else(none, |a| a.to_string()),
                node.ipv6.map_or_else(none, |a| a.to_string()),
                escape_controls(&node.name),
                escape_controls(&node.domain),
                status.state,
                node.listen_port
            ));
            for r in &node.routes {
                let state = match (r.approved, r.primary) {
                    (false, _) => "advertised, awaiting approval",
                    (true, true) => "approved, primary",
                    (true, false) => "approved, standby",
                };
                out.push_str(&format!("  route {:<20} {state}\n", r.prefix.to_string()));
            }
        }
        None => out.push_str(&format!("this node: {}\n", status.state)),
    }
    if let Some(message) = &status.message {
        out.push_str(&format!("  {}\n", escape_controls(message)));
    }
    for recovered in &status.recovered {
        out.push_str(&format!("  recovered: {recovered}\n"));
    }
    if let Some(acl) = &status.acl {
        let rules = acl.rules.map_or("the policy allows everything".into(), |n| format!("{n} ACL rule(s)"));
        let dropped: u64 = acl.dropped.iter().map(|(_, n)| n).sum();
        let mut line = format!("  filter: {rules}, {} flow(s) tracked, {dropped} packet(s) dropped", acl.flows);
        for (reason, n) in &acl.dropped {
            line.push_str(&format!(" ({reason} {n})"));
        }
        if acl.revoked > 0 {
            line.push_str(&format!(", {} flow(s) cut by a policy change", acl.revoked));
        }
        out.push_str(&line);
        out.push('\n');
    }
    if let Some(u) = &status.userspace {
        out.push_str(&format!("  userspace mode: no TUN device, capabilities {}\n", u.capabilities));
        for f in &u.forwards {
            out.push_str(&format!("  forward {f}\n"));
        }
        for e in &u.exposes {
            out.push_str(&format!("  expose {e}\n"));
        }
        for (what, at) in [("dns", &u.dns), ("socks5", &u.socks5), ("http proxy", &u.http_proxy), ("health", &u.health)]
        {
            if let Some(at) = at {
                out.push_str(&format!("  {what} on {at}\n"));
            }
        }
        out.push_str(&format!(
            "  flows: {} open ({} of {} buffered), {} opened, {} from peers, {} refused, {} failed\n",
            u.flows,
            bytes(u.buffered as u64),
            bytes(u.budget as u64),
            u.opened,
            u.inbound,
            u.refused,
            u.failed
        ));
    }
    for p in &status.peers {
        let online = match p.online {
            Some(true) => "online",
            Some(false) => "offline",
            None => "",
        };
        let handshake = p.last_handshake_secs.map_or("no handshake".into(), |s| format!("handshake {s}s ago"));
        out.push_str(&format!(
            "{:<16} {:<24} {:<20} {:<8} {:<22} {}, rx {}, tx {}{}\n",
            p.ipv4.map_or_else(none, |a| a.to_string()),
            p.ipv6.map_or_else(none, |a| a.to_string()),
            escape_controls(&p.name),
            online,
            p.endpoint.map_or_else(none, |e| e.to_string()),
            handshake,
            bytes(p.rx_bytes),
            bytes(p.tx_bytes),
            if p.routes.is_empty() {
                String::new()
            } else {
                format!(", routes {}", p.routes.iter().map(ToString::to_string).collect::<Vec<_>>().join(","))
            }
        ));
    }
    out.trim_end().to_string()
}

fn format_dns_status(status: &crate::local_api::DnsStatus) -> String {
    let mut out = format!("mode: {}", status.mode);
    if let Some(host) = &status.host {
        out.push_str(&format!("\nresolv.conf: {}", host.path.display()));
        let own: Vec<String> = host.original_nameservers.iter().map(ToString::to_string).collect();
        out.push_str(&format!(
            "\nthe host's own resolvers: {}",
            if own.is_empty() { "none".into() } else { own.join(", ") }
        ));
        if host.tramples > 0 {
            out.push_str(&format!("\nrewritten by another program: {} times", host.tramples));
        }
        if let Some(written) = &host.written {
            out.push_str("\nwritten:");
            for line in written.lines().filter(|l| !l.starts_with('#')) {
                out.push_str(&format!("\n  {}", escape_controls(line)));
            }
        }
    }
    match &status.resolver {
        None => out.push_str("\nresolver: off (not connected)"),
        Some(r) => {
            let at: Vec<String> = r.addresses.iter().map(ToString::to_string).collect();
            out.push_str(&format!(
                "\nresolver: {} (MagicDNS {})",
                at.join(", "),
                if r.magic_dns { "on" } else { "off" }
            ));
            if r.magic_dns {
                out.push_str(&format!(
                    "\nnames: {} in {} ({})",
                    r.names.len(),
                    escape_controls(&r.domain),
                    r.names.iter().take(8).map(|n| escape_controls(n)).collect::<Vec<_>>().join(", ")
                ));
            }
            if r.extra_records > 0 {
                out.push_str(&format!("\nextra records: {}", r.extra_records));
            }
            for (zone, to) in &r.split {
                let to: Vec<String> = to.iter().map(ToString::to_string).collect();
                let to = if to.is_empty() { "answered here only".to_string() } else { to.join(", ") };
                out.push_str(&format!("\nsplit: {} -> {to}", escape_controls(zone)));
            }
            let up: Vec<String> = r.upstreams.iter().map(ToString::to_string).collect();
            out.push_str(&format!(
                "\nother names go to: {}",
                if up.is_empty() { "nobody (SERVFAIL)".into() } else { up.join(", ") }
            ));
        }
    }
    out
}
