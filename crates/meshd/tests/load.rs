//! The coordination server under load, as issue 11 asks: one `meshd control serve` on loopback inside a
//! namespace, 3 000 idle TCP connections, 1 000 nodes long-polling their netmaps, and registrations at
//! 50/s for 30 s. The server must keep answering every node; how long each change (a registration) takes
//! to reach every node is printed for docs/benchmarks.md:
//! `cargo test --release -p meshd --test load -- --nocapture`.
//!
//! The load runs on a thread moved into the namespace, on a single-threaded runtime: one core for the
//! clients, leaving the other to the server on this two-core machine. Plain HTTP: the TLS cost per
//! request is the same whatever the load, and this measures the server's own work.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::MESHD;
use mesh_netns::Lab;
use mesh_proto::proof;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

mod common;

const ADDRESS: &str = "127.0.0.1:8443";
const IDLE: usize = 3_000;
const POLLERS: usize = 1_000;
const REGISTRATIONS_PER_SECOND: u64 = 50;
const WINDOW: Duration = Duration::from_secs(30);
/// After the window, how long nodes get to see the last change before the test calls it lost.
const DRAIN: Duration = Duration::from_secs(20);

/// One keep-alive HTTP/1.1 connection: just enough client for JSON requests with a content length.
struct Http {
    stream: BufReader<TcpStream>,
}

impl Http {
    async fn connect() -> io::Result<Self> {
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(ADDRESS)).await??;
        Ok(Self { stream: BufReader::new(stream) })
    }

    async fn request(&mut self, method: &str, path: &str, auth: &str, body: &str) -> io::Result<(u16, Vec<u8>)> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: control\r\n");
        if !auth.is_empty() {
            head.push_str(&format!("authorization: {auth}\r\n"));
        }
        if !body.is_empty() {
            head.push_str(&format!("content-type: application/json\r\ncontent-length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        head.push_str(body);
        self.stream.get_mut().write_all(head.as_bytes()).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let status: u16 = line.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or(io::ErrorKind::InvalidData)?;
        let mut length = 0;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().map_err(|_| io::ErrorKind::InvalidData)?;
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await?;
        Ok((status, body))
    }
}

/// The netmap's version without parsing a few hundred kilobytes of peers: it is the first field.
fn version_of(netmap: &[u8]) -> Option<u64> {
    let rest = netmap.strip_prefix(b"{\"version\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

struct Registrar {
    auth_key: String,
    server: [u8; 32],
    next: u64,
}

impl Registrar {
    /// A signed registration of a new node; returns its `Node id credential` authorization.
    async fn register(&mut self, http: &mut Http) -> Result<String, String> {
        self.next += 1;
        // Bytes 1..9: X25519 clears the low bits of byte 0, which would make neighbours one key.
        let mut private = [0x5a; 32];
        private[1..9].copy_from_slice(&self.next.to_le_bytes());
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let mut request = mesh_proto::RegisterRequest {
            version: mesh_proto::VERSION,
            auth_key: self.auth_key.clone(),
            node_key: proof::encode_key(&proof::public_key(&private)),
            hostname: format!("load-{}", self.next),
            advertise_routes: Vec::new(),
            tags: Vec::new(),
            timestamp_ms: now_ms,
            proof: String::new(),
        };
        proof::sign(&mut request, &private, &self.server);
        let body = serde_json::to_string(&request).unwrap();
        let (status, answer) =
            http.request("POST", "/api/v1/register", "", &body).await.map_err(|e| format!("register: {e}"))?;
        if status != 200 {
            return Err(format!("register answered {status}: {}", String::from_utf8_lossy(&answer)));
        }
        let response: mesh_proto::RegisterResponse = serde_json::from_slice(&answer).map_err(|e| e.to_string())?;
        Ok(format!("Node {} {}", response.node_id, response.credential))
    }
}

/// A node's long-poll loop: the time each new version arrived, until `stop`.
async fn poll(auth: String, stop: Arc<AtomicBool>) -> Result<Vec<(u64, Instant)>, String> {
    let mut seen = Vec::new();
    let mut since = 0;
    let mut http = Http::connect().await.map_err(|e| format!("connect: {e}"))?;
    let mut failures = 0;
    while !stop.load(Ordering::Relaxed) {
        let path = format!("/api/v1/netmap?since={since}");
        let request = http.request("GET", &path, &auth, "");
        // The server answers within its 25 s long poll; the margin catches a server that stopped answering.
        let answer = match tokio::time::timeout(Duration::from_secs(40), request).await {
            Ok(Ok((200, body))) => body,
            Ok(Ok((status, body))) => return Err(format!("netmap {status}: {}", String::from_utf8_lossy(&body))),
            Ok(Err(e)) => {
                failures += 1;
                if failures > 3 {
                    return Err(format!("netmap: {e}"));
                }
                http = Http::connect().await.map_err(|e| format!("reconnect: {e}"))?;
                continue;
            }
            Err(_) => return Err("a netmap request got no answer within 40 s".into()),
        };
        let version = version_of(&answer).ok_or("a netmap without a version")?;
        if version > since {
            seen.push((version, Instant::now()));
            since = version;
        }
    }
    Ok(seen)
}

struct Report {
    registered: usize,
    failed: Vec<String>,
    /// For each registration in the window: the time from sending it to the last node seeing it.
    latencies: Vec<Duration>,
    missed: usize,
    window: Duration,
    answered_after: Duration,
}

async fn load(auth_key: String) -> Report {
    let mut admin = Http::connect().await.expect("connect");
    let (_, text) = admin.request("GET", "/api/v1/server-key", "", "").await.expect("server key");
    let key: mesh_proto::ServerKey = serde_json::from_slice(&text).unwrap();
    let mut registrar = Registrar { auth_key, server: proof::decode_key(&key.public_key).unwrap(), next: 0 };

    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(ADDRESS).await.expect("an idle connection"));
    }
    let mut nodes = Vec::with_capacity(POLLERS);
    for _ in 0..POLLERS {
        nodes.push(registrar.register(&mut admin).await.expect("a polling node registers"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let pollers: Vec<_> = nodes.into_iter().map(|auth| tokio::spawn(poll(auth, stop.clone()))).collect();
    // Every node has its first netmap before the window opens.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let own = registrar_auth(&mut registrar, &mut admin).await;
    let (_, map) = admin.request("GET", "/api/v1/netmap?since=0", &own, "").await.unwrap();
    let base = version_of(&map).expect("a version");
    // Offered load: a registration every 20 ms, each from a new connection as a joining node's would be,
    // whether or not the earlier ones were answered yet.
    let start = Instant::now();
    let mut sent = Vec::new();
    let mut registering = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / REGISTRATIONS_PER_SECOND));
    while start.elapsed() < WINDOW {
        tick.tick().await;
        sent.push(Instant::now());
        let mut joining = Registrar { auth_key: registrar.auth_key.clone(), server: registrar.server, next: 0 };
        registrar.next += 1;
        joining.next = 1_000_000 + registrar.next;
        registering.push(tokio::spawn(async move {
            let mut http = Http::connect().await.map_err(|e| format!("connect: {e}"))?;
            joining.register(&mut http).await
        }));
    }
    let window = start.elapsed();
    let mut failed = Vec::new();
    for joined in registering {
        match joined.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => failed.push(e),
            Err(e) => failed.push(e.to_string()),
        }
    }
    tokio::time::sleep(DRAIN.min(Duration::from_secs(5))).await;
    let answered = Instant::now();
    let mut fresh = Http::connect().await.expect("connect after the load");
    let (status, _) = fresh.request("GET", "/api/v1/server-key", "", "").await.expect("an answer after the load");
    assert_eq!(status, 200);
    let answered_after = answered.elapsed();
    stop.store(true, Ordering::Relaxed);

    // Version base + k was made by the k-th registration to commit, which was sent no later than the k-th
    // one sent: measuring from that send time can only overstate how long the change took.
    let mut first_seen: Vec<HashMap<u64, Instant>> = Vec::new();
    let deadline = Instant::now() + DRAIN;
    for poller in pollers {
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(30);
        match tokio::time::timeout(left, poller).await {
            Ok(Ok(Ok(seen))) => first_seen.push(seen.into_iter().collect()),
            Ok(Ok(Err(e))) => failed.push(e),
            other => failed.push(format!("a poller did not finish: {:?}", other.is_err())),
        }
    }
    let mut latencies = Vec::new();
    let mut missed = 0;
    for (k, at) in sent.iter().enumerate() {
        let version = base + k as u64 + 1;
        let mut slowest = Duration::ZERO;
        let mut all = true;
        for seen in &first_seen {
            // The first netmap at or past this version carries the change.
            match seen.iter().filter(|(v, _)| **v >= version).map(|(_, t)| *t).min() {
                Some(t) => slowest = slowest.max(t.saturating_duration_since(*at)),
                None => all = false,
            }
        }
        if all {
            latencies.push(slowest);
        } else {
            missed += 1;
        }
    }
    drop(idle);
    Report { registered: sent.len(), failed, latencies, missed, window, answered_after }
}

/// The registrar's own node, to read the current version with.
async fn registrar_auth(registrar: &mut Registrar, http: &mut Http) -> String {
    registrar.register(http).await.expect("the registrar's node")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[test]
fn load_3000_idle_connections_1000_long_polls_and_50_registrations_a_second() {
    let mut lab = Lab::new("load");
    let ns = lab.netns("ld");
    let data = lab.path("control-data");
    let args = ["control", "serve", "--listen", ADDRESS, "--insecure-http", "--data-dir", data.to_str().unwrap()];
    let server = lab.spawn(ns, "control", MESHD, &args, &[]);
    common::managed::wait_for_server(&mut lab, server);
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap().trim().to_string();

    let netns = lab.ns(ns);
    let report = std::thread::scope(|s| {
        s.spawn(|| {
            netns.enter_on_this_thread();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let mut admin = Http::connect().await.expect("connect");
                let body = r#"{"reusable": true}"#;
                let (status, key) = admin
                    .request("POST", "/api/v1/admin/authkeys", &format!("Bearer {token}"), body)
                    .await
                    .expect("an auth key");
                assert_eq!(status, 200);
                let key: serde_json::Value = serde_json::from_slice(&key).unwrap();
                load(key["key"].as_str().unwrap().to_string()).await
            })
        })
        .join()
        .expect("the load thread")
    });
    assert!(lab.process(server).running(), "the server survived:\n{}", lab.process(server).log_text());

    let mut sorted = report.latencies.clone();
    sorted.sort();
    println!(
        "load: {IDLE} idle connections, {POLLERS} long polls, {} registrations in {:.1} s ({:.1}/s); \
         a change reaches all {POLLERS} nodes: p50 {:?}, p99 {:?}, max {:?}; a fresh request after the load \
         answered in {:?}",
        report.registered,
        report.window.as_secs_f64(),
        report.registered as f64 / report.window.as_secs_f64(),
        percentile(&sorted, 0.50),
        percentile(&sorted, 0.99),
        sorted.last().copied().unwrap_or_default(),
        report.answered_after,
    );
    assert!(report.failed.is_empty(), "every request was answered: {:?}", &report.failed[..report.failed.len().min(5)]);
    assert_eq!(report.missed, 0, "every change reached every node");
    assert!(report.registered as u64 >= WINDOW.as_secs() * REGISTRATIONS_PER_SECOND / 2, "registrations kept going");
}
