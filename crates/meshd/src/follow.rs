//! A managed node following its coordination server: register when it has no identity, report where it
//! can be reached and what it advertises, then long-poll the netmap.
//!
//! Two halves. [`Machine`] decides, without I/O: which call to make next, what an answer means (an event
//! for the daemon, a wait before the next call, or a stop), so every step of register → endpoints →
//! routes → poll and every kind of failure is a unit test. [`start`] drives it as one task on the
//! daemon's runtime with an async HTTPS client; dropping the [`Handle`] ends the task and the request in
//! flight at once. It only sends events to the daemon's loop, which applies them, so a slow or dead
//! server never stalls packets.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use mesh_proto::{
    EndpointsUpdate, ErrorBody, NetMap, RegisterRequest, RegisterResponse, RoutesUpdate, ServerKey, VERSION, proof,
};
use tokio::sync::mpsc;

use crate::control_http::Client;
use crate::prefs::Identity;

/// Everything the follower needs, fixed when it starts; a change of preferences starts a new one.
#[derive(Clone)]
pub struct Follow {
    pub control_url: String,
    pub ca_cert: Option<PathBuf>,
    pub identity: Option<Identity>,
    pub auth_key: Option<String>,
    /// This node's public key, base64.
    pub node_key: String,
    /// Its private key, to sign a registration with (proof of possession); never sent.
    pub node_private: NodePrivate,
    pub hostname: String,
    pub advertise_routes: Vec<IpNet>,
    pub tags: Vec<String>,
    /// The host's addresses with the WireGuard port, to report as endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// The netmap version the node has (0: none).
    pub since: u64,
    /// Marks the connections to the server so they bypass the mesh (see `control_http`).
    pub fwmark: Option<u32>,
}

impl std::fmt::Debug for Follow {
    // The auth key is a secret (the identity's credential and the private key redact themselves).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follow")
            .field("control_url", &self.control_url)
            .field("identity", &self.identity)
            .field("node_key", &self.node_key)
            .field("hostname", &self.hostname)
            .field("since", &self.since)
            .finish_non_exhaustive()
    }
}

/// A private key that a `{:?}` of what holds it does not print.
#[derive(Clone)]
pub struct NodePrivate(pub [u8; 32]);

impl std::fmt::Debug for NodePrivate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodePrivate(..)")
    }
}

#[derive(Debug)]
pub enum Event {
    Registered(Identity, RegisterResponse),
    NetMap(Box<NetMap>),
    /// The server could not be reached or failed; the follower keeps trying. The message says since when.
    Trouble(String),
    /// The server refused this node (a bad auth key, an expired or deleted node); the follower stopped.
    Refused(String),
}

/// Stops the follower when dropped: its task and the request in flight end at once.
#[derive(Debug)]
pub struct Handle {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long a netmap request may take: the server's long poll (25 s) and a margin.
const POLL_TIMEOUT: Duration = Duration::from_secs(40);
/// Any other request.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// One request to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    ServerKey,
    Register(String),
    Endpoints(String),
    Routes(String),
    NetMap { since: u64 },
}

impl Call {
    pub fn path(&self) -> String {
        match self {
            Call::ServerKey => "server-key".into(),
            Call::Register(_) => "register".into(),
            Call::Endpoints(_) => "endpoints".into(),
            Call::Routes(_) => "routes".into(),
            Call::NetMap { since } => format!("netmap?since={since}"),
        }
    }

    pub fn body(&self) -> Option<&str> {
        match self {
            Call::Register(b) | Call::Endpoints(b) | Call::Routes(b) => Some(b),
            Call::ServerKey | Call::NetMap { .. } => None,
        }
    }

    fn needs_credential(&self) -> bool {
        !matches!(self, Call::ServerKey | Call::Register(_))
    }

    pub fn timeout(&self) -> Duration {
        if matches!(self, Call::NetMap { .. }) { POLL_TIMEOUT } else { CALL_TIMEOUT }
    }
}

/// What to do after an answer.
#[derive(Debug, Default)]
pub struct Step {
    pub events: Vec<Event>,
    /// How long to wait before the next call.
    pub wait: Duration,
    /// The follower is done (refused); no more calls.
    pub stop: bool,
}

/// The follower's decisions, without I/O; time and randomness are parameters.
#[derive(Debug)]
pub struct Machine {
    follow: Follow,
    server_key: Option<[u8; 32]>,
    endpoints_sent: bool,
    routes_checked: bool,
    /// The server holds other routes than the node advertises: report them before polling again.
    routes_due: bool,
    backoff: Duration,
    /// When the server stopped answering (Unix seconds), until it answers again.
    unreachable_since: Option<u64>,
}

impl Machine {
    pub fn new(follow: Follow) -> Self {
        Self {
            follow,
            server_key: None,
            endpoints_sent: false,
            routes_checked: false,
            routes_due: false,
            backoff: FIRST_BACKOFF,
            unreachable_since: None,
        }
    }

    /// Why the follower cannot even start, if it cannot.
    pub fn cannot_start(&self) -> Option<String> {
        (self.follow.identity.is_none() && self.follow.auth_key.is_none())
            .then(|| "this node is not registered: run meshd up with --auth-key KEY (or MESHD_AUTH_KEY)".into())
    }

    /// `Authorization` for `call`, if it needs the node's credential.
    pub fn authorization(&self, call: &Call) -> Option<String> {
        let identity = self.follow.identity.as_ref().filter(|_| call.needs_credential())?;
        Some(format!("Node {} {}", identity.node_id, identity.credential))
    }

    /// The next request; `now_ms` (Unix milliseconds) dates a registration.
    pub fn next_call(&self, now_ms: u64) -> Call {
        if self.follow.identity.is_none() {
            return match self.server_key {
                None => Call::ServerKey,
                Some(server) => Call::Register(self.registration(&server, now_ms)),
            };
        }
        if !self.endpoints_sent {
            let update = EndpointsUpdate { version: VERSION, endpoints: self.follow.endpoints.clone() };
            return Call::Endpoints(serde_json::to_string(&update).unwrap_or_default());
        }
        if self.routes_due {
            let update = RoutesUpdate { version: VERSION, advertise_routes: self.wanted_routes() };
            return Call::Routes(serde_json::to_string(&update).unwrap_or_default());
        }
        Call::NetMap { since: self.follow.since }
    }

    fn registration(&self, server: &[u8; 32], now_ms: u64) -> String {
        let mut request = RegisterRequest {
            version: VERSION,
            auth_key: self.follow.auth_key.clone().unwrap_or_default(),
            node_key: self.follow.node_key.clone(),
            hostname: self.follow.hostname.clone(),
            advertise_routes: self.follow.advertise_routes.clone(),
            tags: self.follow.tags.clone(),
            timestamp_ms: now_ms,
            proof: String::new(),
        };
        proof::sign(&mut request, &self.follow.node_private.0, server);
        serde_json::to_string(&request).unwrap_or_default()
    }

    fn wanted_routes(&self) -> Vec<IpNet> {
        let mut wanted = self.follow.advertise_routes.clone();
        wanted.sort();
        wanted.dedup();
        wanted
    }

    /// What the answer to `call` means: `answer` is the status code and body, or why there was none;
    /// `now` is Unix seconds, `random` spreads the backoff.
    pub fn handle(&mut self, call: &Call, answer: Result<(u16, String), String>, now: u64, random: u32) -> Step {
        let (status, text) = match answer {
            Ok(answer) => answer,
            Err(failure) => return self.passing(failure, now, random),
        };
        if !(200..300).contains(&status) {
            // Only an answer that names this node or its key as refused stops the follower; a server fault,
            // a rate limit or a proxy's error page is passing.
            return match serde_json::from_str::<ErrorBody>(&text) {
                Ok(e) if e.code.is_final() => {
                    Step { events: vec![Event::Refused(escape_controls(&e.message))], stop: true, ..Step::default() }
                }
                Ok(e) => self.passing(
                    format!(
                        "the coordination server at {} answered {status}: {}",
                        self.follow.control_url,
                        escape_controls(&e.message)
                    ),
                    now,
                    random,
                ),
                Err(_) => self.passing(
                    format!("the coordination server at {} answered {status}", self.follow.control_url),
                    now,
                    random,
                ),
            };
        }
        let mut step = Step::default();
        match call {
            Call::ServerKey => match serde_json::from_str::<ServerKey>(&text)
                .ok()
                .and_then(|k| proof::decode_key(&k.public_key))
            {
                Some(key) => self.server_key = Some(key),
                None => {
                    return self.passing("the coordination server sent an unreadable server key".into(), now, random);
                }
            },
            Call::Register(_) => match serde_json::from_str::<RegisterResponse>(&text) {
                Ok(response) => {
                    let identity = Identity {
                        control_url: self.follow.control_url.clone(),
                        node_id: response.node_id,
                        name: response.name.clone(),
                        credential: response.credential.clone(),
                        ephemeral: response.ephemeral,
                    };
                    self.follow.identity = Some(identity.clone());
                    step.events.push(Event::Registered(identity, response));
                }
                Err(e) => {
                    return self.passing(
                        format!("the coordination server sent an unreadable answer: {e}"),
                        now,
                        random,
                    );
                }
            },
            Call::Endpoints(_) => self.endpoints_sent = true,
            Call::Routes(_) => {
                self.routes_due = false;
                self.routes_checked = true;
            }
            Call::NetMap { .. } => {
                let map: NetMap = match serde_json::from_str(&text) {
                    Ok(map) => map,
                    Err(e) => {
                        let message = format!("the coordination server sent an unreadable netmap: {e}");
                        return self.passing(message, now, random);
                    }
                };
                if !self.routes_checked {
                    // What the server holds may predate a `set --advertise-routes` made while it was away.
                    let mut held: Vec<IpNet> = map.routes.iter().map(|r| r.prefix).collect();
                    held.sort();
                    self.routes_due = held != self.wanted_routes();
                    self.routes_checked = !self.routes_due;
                }
                if map.version != self.follow.since {
                    self.follow.since = map.version;
                    step.events.push(Event::NetMap(Box::new(map)));
                }
            }
        }
        self.backoff = FIRST_BACKOFF;
        self.unreachable_since = None;
        step
    }

    /// A fault that passes: reported (with since when), retried after a jittered, growing wait.
    fn passing(&mut self, message: String, now: u64, random: u32) -> Step {
        let since = *self.unreachable_since.get_or_insert(now);
        let (next, wait) = next_backoff(self.backoff, random);
        self.backoff = next;
        Step {
            events: vec![Event::Trouble(format!(
                "{message} (control unreachable since {})",
                mesh_proto::utc_text(since)
            ))],
            wait,
            stop: false,
        }
    }
}

/// Starts following on the current runtime; the returned handle stops it.
pub fn start(follow: Follow, generation: u64, events: mpsc::Sender<(u64, Event)>) -> Handle {
    Handle { task: tokio::spawn(run(follow, generation, events)) }
}

async fn run(mut follow: Follow, generation: u64, events: mpsc::Sender<(u64, Event)>) {
    let client = match Client::new(&follow.control_url, follow.ca_cert.as_deref(), follow.fwmark) {
        Ok(client) => client,
        Err(e) => {
            let _ = events.send((generation, Event::Refused(e))).await;
            return;
        }
    };
    // Finding the address toward the server resolves its name: off the runtime's thread.
    let url = follow.control_url.clone();
    let toward = tokio::task::spawn_blocking(move || source_toward(&url)).await.ok().flatten();
    follow.endpoints = ordered_endpoints(follow.endpoints, toward);
    let mut machine = Machine::new(follow);
    if let Some(reason) = machine.cannot_start() {
        let _ = events.send((generation, Event::Refused(reason))).await;
        return;
    }
    loop {
        let call = machine.next_call(unix_ms());
        let auth = machine.authorization(&call);
        let answer = client.call(&call.path(), auth.as_deref(), call.body(), call.timeout()).await;
        let step = machine.handle(&call, answer, unix_ms() / 1000, random_u32());
        for event in step.events {
            if events.send((generation, event)).await.is_err() {
                return;
            }
        }
        if step.stop {
            return;
        }
        if !step.wait.is_zero() {
            tokio::time::sleep(step.wait).await;
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn random_u32() -> u32 {
    let mut random = [0u8; 4];
    let _ = crate::keys::random_bytes(&mut random);
    u32::from_ne_bytes(random)
}

/// The endpoints, the address this host reaches the server from first: it is the one most likely
/// reachable by peers too (a router's LAN address rarely is).
fn ordered_endpoints(mut endpoints: Vec<SocketAddr>, toward_server: Option<IpAddr>) -> Vec<SocketAddr> {
    if let Some(source) = toward_server
        && let Some(i) = endpoints.iter().position(|e| e.ip() == source)
    {
        let first = endpoints.remove(i);
        endpoints.insert(0, first);
    }
    endpoints.truncate(mesh_proto::MAX_ENDPOINTS);
    endpoints
}

/// Text from the server as it may be shown on a terminal: control characters escaped, so a hostile server
/// cannot move the cursor, clear the screen or forge lines in `status` or a log.
pub fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Doubles `backoff` up to `MAX_BACKOFF`, then spreads it by ±25% so a mesh of nodes that lost their
/// server at once does not come back in lockstep.
fn next_backoff(backoff: Duration, random: u32) -> (Duration, Duration) {
    let next = (backoff * 2).min(MAX_BACKOFF);
    let spread = next.as_millis() as u64 / 2;
    let jitter = if spread == 0 { 0 } else { u64::from(random) % spread };
    let wait = Duration::from_millis(next.as_millis() as u64 * 3 / 4 + jitter);
    (next, wait)
}

/// The local address the kernel would use toward the server (a connected UDP socket sends nothing).
fn source_toward(control_url: &str) -> Option<IpAddr> {
    let uri: hyper::Uri = control_url.parse().ok()?;
    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("http") { 80 } else { 443 });
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let server = std::net::ToSocketAddrs::to_socket_addrs(&(host, port)).ok()?.next()?;
    let socket = UdpSocket::bind(if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).ok()?;
    socket.connect(server).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

#[cfg(test)]
mod tests;
