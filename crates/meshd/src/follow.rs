//! A managed node following its coordination server: register when it has no identity, report where it
//! can be reached and what it advertises, then long-poll the netmap. It runs on a thread of its own with a
//! blocking HTTPS client, so a slow or dead server never stalls packets; it only sends events to the
//! daemon's loop, which applies them. Dropping the handle stops it after the request in flight.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use mesh_proto::{
    EndpointsUpdate, ErrorBody, NetMap, RegisterRequest, RegisterResponse, RoutesUpdate, ServerKey, VERSION, proof,
};
use tokio::sync::mpsc;

use crate::control_client::https_agent;
use crate::prefs::Identity;

/// Everything the follower needs, fixed when it starts; a change of preferences starts a new one.
#[derive(Debug, Clone)]
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
    /// The server could not be reached or failed; the follower keeps trying.
    Trouble(String),
    /// The server refused this node (a bad auth key, an expired or deleted node); the follower stopped.
    Refused(String),
}

pub struct Handle {
    stop: Arc<AtomicBool>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How long a netmap request may take: the server's long poll (25 s) and a margin.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(40);
const MAX_BACKOFF: Duration = Duration::from_secs(8);

pub fn start(follow: Follow, generation: u64, events: mpsc::Sender<(u64, Event)>) -> Handle {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let spawned = std::thread::Builder::new().name("meshd-follow".into()).spawn(move || {
        let send = |event| events.blocking_send((generation, event)).is_ok();
        Follower { follow, stop: flag, send: &send }.run();
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start following the coordination server");
    }
    Handle { stop }
}

enum CallError {
    Unreachable(String),
    Refused(String),
}

struct Follower<'a> {
    follow: Follow,
    stop: Arc<AtomicBool>,
    send: &'a dyn Fn(Event) -> bool,
}

impl Follower<'_> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps in short slices so a stop is noticed quickly.
    fn pause(&self, how_long: Duration) {
        let until = Instant::now() + how_long;
        while !self.stopped() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn run(mut self) {
        let agent = match https_agent(self.follow.ca_cert.as_deref(), Some(REQUEST_TIMEOUT)) {
            Ok(a) => a,
            Err(e) => {
                (self.send)(Event::Refused(e));
                return;
            }
        };
        let mut backoff = Duration::from_millis(500);
        let (mut endpoints_sent, mut routes_checked) = (false, false);
        while !self.stopped() {
            let step = self.step(&agent, &mut endpoints_sent, &mut routes_checked);
            match step {
                Ok(()) => backoff = Duration::from_millis(500),
                Err(CallError::Refused(message)) => {
                    if !self.stopped() {
                        (self.send)(Event::Refused(message));
                    }
                    return;
                }
                Err(CallError::Unreachable(message)) => {
                    if self.stopped() || !(self.send)(Event::Trouble(message)) {
                        return;
                    }
                    let mut random = [0u8; 4];
                    let _ = crate::keys::random_bytes(&mut random);
                    let (next, wait) = next_backoff(backoff, u32::from_ne_bytes(random));
                    self.pause(wait);
                    backoff = next;
                }
            }
        }
    }

    fn step(
        &mut self,
        agent: &ureq::Agent,
        endpoints_sent: &mut bool,
        routes_checked: &mut bool,
    ) -> Result<(), CallError> {
        let Some(identity) = self.follow.identity.clone() else {
            let identity = self.register(agent)?;
            self.follow.identity = Some(identity);
            return Ok(());
        };
        let auth = format!("Node {} {}", identity.node_id, identity.credential);
        if !*endpoints_sent {
            let update = EndpointsUpdate { version: VERSION, endpoints: self.ordered_endpoints() };
            self.call(agent, "endpoints", Some(&auth), Some(serde_json::to_string(&update).unwrap_or_default()))?;
            *endpoints_sent = true;
        }
        let path = format!("netmap?since={}", self.follow.since);
        let text = self.call(agent, &path, Some(&auth), None)?;
        let map: NetMap = serde_json::from_str(&text)
            .map_err(|e| CallError::Unreachable(format!("the coordination server sent an unreadable netmap: {e}")))?;
        if !*routes_checked {
            // What the server holds may predate a `set --advertise-routes` made while it was unreachable.
            let mut held: Vec<IpNet> = map.routes.iter().map(|r| r.prefix).collect();
            let mut wanted = self.follow.advertise_routes.clone();
            held.sort();
            wanted.sort();
            wanted.dedup();
            if held != wanted {
                let update = RoutesUpdate { version: VERSION, advertise_routes: wanted };
                self.call(agent, "routes", Some(&auth), Some(serde_json::to_string(&update).unwrap_or_default()))?;
            }
            *routes_checked = true;
        }
        if map.version != self.follow.since && !self.stopped() {
            self.follow.since = map.version;
            if !(self.send)(Event::NetMap(Box::new(map))) {
                self.stop.store(true, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn register(&self, agent: &ureq::Agent) -> Result<Identity, CallError> {
        let Some(auth_key) = self.follow.auth_key.clone() else {
            return Err(CallError::Refused(
                "this node is not registered: run meshd up with --auth-key KEY (or MESHD_AUTH_KEY)".into(),
            ));
        };
        let text = self.call(agent, "server-key", None, None)?;
        let server = serde_json::from_str::<ServerKey>(&text)
            .ok()
            .and_then(|k| proof::decode_key(&k.public_key))
            .ok_or_else(|| CallError::Unreachable("the coordination server sent an unreadable server key".into()))?;
        let mut request = RegisterRequest {
            version: VERSION,
            auth_key,
            node_key: self.follow.node_key.clone(),
            hostname: self.follow.hostname.clone(),
            advertise_routes: self.follow.advertise_routes.clone(),
            tags: self.follow.tags.clone(),
            timestamp_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            proof: String::new(),
        };
        proof::sign(&mut request, &self.follow.node_private.0, &server);
        let text = self.call(agent, "register", None, Some(serde_json::to_string(&request).unwrap_or_default()))?;
        let response: RegisterResponse = serde_json::from_str(&text)
            .map_err(|e| CallError::Unreachable(format!("the coordination server sent an unreadable answer: {e}")))?;
        let identity = Identity {
            control_url: self.follow.control_url.clone(),
            node_id: response.node_id,
            name: response.name.clone(),
            credential: response.credential.clone(),
        };
        (self.send)(Event::Registered(identity.clone(), response));
        Ok(identity)
    }

    /// The endpoints, the address this host reaches the server from first: it is the one most likely
    /// reachable by peers too (a router's LAN address rarely is).
    fn ordered_endpoints(&self) -> Vec<SocketAddr> {
        let mut endpoints = self.follow.endpoints.clone();
        if let Some(source) = source_toward(&self.follow.control_url)
            && let Some(i) = endpoints.iter().position(|e| e.ip() == source)
        {
            let first = endpoints.remove(i);
            endpoints.insert(0, first);
        }
        endpoints.truncate(mesh_proto::MAX_ENDPOINTS);
        endpoints
    }

    fn call(
        &self,
        agent: &ureq::Agent,
        path: &str,
        auth: Option<&str>,
        body: Option<String>,
    ) -> Result<String, CallError> {
        let url = format!("{}/api/v1/{path}", self.follow.control_url);
        let unreachable = |e: ureq::Error| {
            CallError::Unreachable(format!("cannot reach the coordination server at {}: {e}", self.follow.control_url))
        };
        let mut response = match body {
            None => {
                let mut request = agent.get(&url);
                if let Some(a) = auth {
                    request = request.header("authorization", a);
                }
                request.call().map_err(unreachable)?
            }
            Some(body) => {
                let mut request = agent.post(&url).header("content-type", "application/json");
                if let Some(a) = auth {
                    request = request.header("authorization", a);
                }
                request.send(body).map_err(unreachable)?
            }
        };
        let status = response.status();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        if status.is_success() {
            return Ok(text);
        }
        // Only an answer that names this node or its key as refused stops the follower; a server fault, a
        // rate limit or a proxy's error page is passing, and it tries again.
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(e) if e.code.is_final() => Err(CallError::Refused(escape_controls(&e.message))),
            Ok(e) => Err(CallError::Unreachable(format!(
                "the coordination server at {} answered {status}: {}",
                self.follow.control_url,
                escape_controls(&e.message)
            ))),
            Err(_) => Err(CallError::Unreachable(format!(
                "the coordination server at {} answered {status}",
                self.follow.control_url
            ))),
        }
    }
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
    let uri: ureq::http::Uri = control_url.parse().ok()?;
    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("http") { 80 } else { 443 });
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let server = std::net::ToSocketAddrs::to_socket_addrs(&(host, port)).ok()?.next()?;
    let socket = UdpSocket::bind(if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).ok()?;
    socket.connect(server).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_from_the_server_are_escaped() {
        assert_eq!(escape_controls("evil\u{1b}[2J\nline"), "evil\\u{1b}[2J\\nline");
        assert_eq!(escape_controls("plain"), "plain");
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let (next, wait) = next_backoff(Duration::from_millis(500), 0);
        assert_eq!((next, wait), (Duration::from_secs(1), Duration::from_millis(750)));
        let (next, wait) = next_backoff(MAX_BACKOFF, u32::MAX);
        assert_eq!(next, MAX_BACKOFF);
        assert!(wait >= MAX_BACKOFF * 3 / 4 && wait < MAX_BACKOFF * 5 / 4, "{wait:?}");
    }

    #[test]
    fn the_source_toward_a_loopback_server_is_loopback() {
        assert_eq!(source_toward("https://127.0.0.1:8443"), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(source_toward("not a url"), None);
    }
}
