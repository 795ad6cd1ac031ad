//! The daemon's local API: HTTP/1.1 with JSON bodies on a Unix socket (mode 0600), which `meshd up`, `set`,
//! `status`, `ping`, `ip`, `down` and `logout` talk to. The server side only carries requests to the daemon's
//! event loop and waits for its answer; the loop owns all state.

use crate::error::Error;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use ipnet::IpNet;
use mesh_proto::RouteState;
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::prefs::PrefsPatch;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpRequest {
    #[serde(default)]
    pub prefs: PrefsPatch,
    #[serde(default)]
    pub auth_key: Option<String>,
    #[serde(default)]
    pub force_reauth: bool,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpReply {
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PingRequest {
    /// A peer's name (short or with the mesh domain) or one of its mesh addresses.
    pub peer: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PingReply {
    pub name: String,
    pub ip: IpAddr,
    pub rtt_us: u64,
}

/// Where a managed node stands with its coordination server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conn {
    /// Not asked to run (`down`, or never `up`).
    Stopped,
    /// Following the server, not yet with a netmap; the last trouble if there was one.
    Connecting(Option<String>),
    Running(UpReply),
    /// The server refused this node; it waits for a new `up`.
    Refused(String),
}

impl Conn {
    pub fn name(&self) -> &'static str {
        match self {
            Conn::Stopped => "stopped",
            Conn::Connecting(_) => "connecting",
            Conn::Running(_) => "running",
            Conn::Refused(_) => "needs-login",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub state: String,
    /// Why the node is not running, when it is not.
    pub message: Option<String>,
    pub node: Option<SelfStatus>,
    pub peers: Vec<PeerView>,
    /// What failed while the daemon ran and was brought back (a deleted TUN device recreated, say).
    #[serde(default)]
    pub recovered: Vec<String>,
    /// The ACL filter, when the node runs.
    #[serde(default)]
    pub acl: Option<AclStatus>,
    /// Userspace mode's stack and ways in, when the daemon runs in it.
    #[serde(default)]
    pub userspace: Option<UserspaceStatus>,
}

/// Userspace mode: what the app can use and what the stack carries.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UserspaceStatus {
    /// The process's effective capabilities: `none` in a sidecar run as it should be.
    pub capabilities: String,
    /// `LISTEN=NAME:PORT` each.
    pub forwards: Vec<String>,
    /// Mesh port → local address each.
    pub exposes: Vec<String>,
    pub dns: Option<String>,
    pub socks5: Option<String>,
    pub http_proxy: Option<String>,
    pub health: Option<String>,
    pub flows: usize,
    /// Bytes of flow buffers held, and the budget.
    pub buffered: usize,
    pub budget: usize,
    pub opened: u64,
    pub inbound: u64,
    pub refused: u64,
    pub failed: u64,
}

/// What the ACL filter holds and has refused.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AclStatus {
    /// How many rules the policy gives this node; none: the policy allows everything.
    pub rules: Option<usize>,
    pub flows: usize,
    /// Packets from the mesh the filter dropped, by reason.
    pub dropped: Vec<(String, u64)>,
    /// Flows peers opened that a policy change cut.
    pub revoked: u64,
    /// The latest refused flows, oldest first: "proto SRC:PORT -> DST:PORT reason, N s ago".
    pub recent_denied: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelfStatus {
    pub name: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub public_key: String,
    pub domain: String,
    pub listen_port: u16,
    /// Routes this node advertises: approved, primary.
    pub routes: Vec<RouteState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerView {
    pub name: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub public_key: String,
    pub online: Option<bool>,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Subnet routes reached through this peer (accepted and approved, with the peer as primary).
    pub routes: Vec<IpNet>,
    /// When the peer's key expires (Unix seconds), if the server gives keys a lifetime.
    #[serde(default)]
    pub key_expiry: Option<u64>,
}

/// The daemon's answer: bad input is the caller's to fix (400, exit status 2), anything else is not (500, 1).
pub type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// A request for the event loop.
#[derive(Debug)]
pub enum Request {
    Up(Box<UpRequest>, Reply<watch::Receiver<Conn>>),
    Set(PrefsPatch, Reply<()>),
    Down(Reply<()>),
    Logout(Reply<()>),
    Status(oneshot::Sender<Status>),
    /// Sends one echo request through the tunnel; the receiver yields the round trip.
    Ping(String, Reply<(String, IpAddr, oneshot::Receiver<Duration>)>),
    DnsStatus(oneshot::Sender<DnsStatus>),
    /// The metrics, in the Prometheus/OpenMetrics text format (`--metrics ADDR`).
    Metrics(oneshot::Sender<String>),
    /// Asks the resolver in the data plane (forwarding as it would); the reply is the answer, dig-like.
    DnsQuery {
        name: String,
        kind: String,
        reply: Reply<String>,
    },
}

/// `meshd dns status`: how the host's DNS is wired and what the resolver answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DnsStatus {
    pub mode: String,
    pub host: Option<crate::daemon::DirectStatus>,
    pub resolver: Option<ResolverStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResolverStatus {
    pub addresses: Vec<IpAddr>,
    pub domain: String,
    pub magic_dns: bool,
    pub names: Vec<String>,
    pub extra_records: usize,
    pub split: Vec<(String, Vec<SocketAddr>)>,
    pub upstreams: Vec<SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsQueryRequest {
    pub name: String,
    #[serde(default = "a_record")]
    pub kind: String,
}

fn a_record() -> String {
    "A".into()
}

type ApiError = (StatusCode, Json<serde_json::Value>);

fn error(status: StatusCode, message: impl Into<String>) -> ApiError {
    (status, Json(serde_json::json!({ "error": message.into() })))
}

async fn ask<T>(loop_tx: &mpsc::Sender<Request>, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    let gone = || error(StatusCode::SERVICE_UNAVAILABLE, "the daemon is shutting down");
    loop_tx.send(make(tx)).await.map_err(|_| gone())?;
    rx.await.map_err(|_| gone())?.map_err(|e| match e {
        Error::Input(message) => error(StatusCode::BAD_REQUEST, message),
        Error::System(message) => error(StatusCode::INTERNAL_SERVER_ERROR, message),
    })
}

async fn up(
    State(tx): State<mpsc::Sender<Request>>,
    Json(request): Json<UpRequest>,
) -> Result<Json<UpReply>, ApiError> {
    let timeout = Duration::from_millis(request.timeout_ms.clamp(100, 3_600_000));
    let mut conn = ask(&tx, |r| Request::Up(Box::new(request), r)).await?;
    let waited = tokio::time::timeout(timeout, conn.wait_for(|c| matches!(c, Conn::Running(_) | Conn::Refused(_))))
        .await
        .map(|r| r.map(|state| state.clone()));
    let state = conn.borrow().clone();
    match (waited, state) {
        (Ok(_), Conn::Running(reply)) => Ok(Json(reply)),
        (Ok(_), Conn::Refused(message)) => Err(error(StatusCode::FORBIDDEN, message)),
        (_, Conn::Connecting(Some(trouble))) => Err(error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("{trouble} (not connected within {timeout:?}; meshd keeps trying)"),
        )),
        _ => Err(error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("no netmap from the coordination server within {timeout:?}; meshd keeps trying"),
        )),
    }
}

async fn set(State(tx): State<mpsc::Sender<Request>>, Json(patch): Json<PrefsPatch>) -> Result<StatusCode, ApiError> {
    ask(&tx, |r| Request::Set(patch, r)).await.map(|()| StatusCode::NO_CONTENT)
}

async fn down(State(tx): State<mpsc::Sender<Request>>) -> Result<StatusCode, ApiError> {
    ask(&tx, Request::Down).await.map(|()| StatusCode::NO_CONTENT)
}

async fn logout(State(tx): State<mpsc::Sender<Request>>) -> Result<StatusCode, ApiError> {
    ask(&tx, Request::Logout).await.map(|()| StatusCode::NO_CONTENT)
}

async fn status(State(tx): State<mpsc::Sender<Request>>) -> Result<Json<Status>, ApiError> {
    let (reply, rx) = oneshot::channel();
    let gone = || error(StatusCode::SERVICE_UNAVAILABLE, "the daemon is shutting down");
    tx.send(Request::Status(reply)).await.map_err(|_| gone())?;
    rx.await.map(Json).map_err(|_| gone())
}

async fn dns_status(State(tx): State<mpsc::Sender<Request>>) -> Result<Json<DnsStatus>, ApiError> {
    let (reply, rx) = oneshot::channel();
    let gone = || error(StatusCode::SERVICE_UNAVAILABLE, "the daemon is shutting down");
    tx.send(Request::DnsStatus(reply)).await.map_err(|_| gone())?;
    rx.await.map(Json).map_err(|_| gone())
}

async fn dns_query(
    State(tx): State<mpsc::Sender<Request>>,
    Json(q): Json<DnsQueryRequest>,
) -> Result<String, ApiError> {
    ask(&tx, |reply| Request::DnsQuery { name: q.name, kind: q.kind, reply }).await
}

/// Up to five echo requests a second apart; the first answer wins.
async fn ping(
    State(tx): State<mpsc::Sender<Request>>,
    Json(request): Json<PingRequest>,
) -> Result<Json<PingReply>, ApiError> {
    for _ in 0..5 {
        let (name, ip, pong) = ask(&tx, |r| Request::Ping(request.peer.clone(), r)).await?;
        if let Ok(Ok(rtt)) = tokio::time::timeout(Duration::from_secs(1), pong).await {
            return Ok(Json(PingReply { name, ip, rtt_us: rtt.as_micros() as u64 }));
        }
    }
    Err(error(StatusCode::GATEWAY_TIMEOUT, format!("no answer from {} through the tunnel after 5 tries", request.peer)))
}

/// Binds the socket (mode 0600 before it takes its name, so no one connects in between) and serves it until
/// the daemon stops. Refuses when another daemon already answers there.
pub async fn listen(path: &Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::PermissionsExt;
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(format!(
            "another meshd daemon answers on {}; stop it or give this one --socket PATH",
            path.display()
        ));
    }
    let fail = |e: std::io::Error| format!("{}: cannot create the local API socket: {e}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let staging = path.with_extension("sock.new");
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging).map_err(fail)?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    std::fs::rename(&staging, path).map_err(fail)?;
    Ok(listener)
}

pub fn serve(listener: UnixListener, loop_tx: mpsc::Sender<Request>) -> tokio::task::JoinHandle<()> {
    let app = Router::new()
        .route("/v1/up", post(up))
        .route("/v1/set", post(set))
        .route("/v1/down", post(down))
        .route("/v1/logout", post(logout))
        .route("/v1/status", get(status))
        .route("/v1/ping", post(ping))
        .route("/v1/dns/status", get(dns_status))
        .route("/v1/dns/query", post(dns_query))
        .with_state(loop_tx);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "local API stopped");
        }
    })
}

/// `GET /metrics` on `listener` (`meshd daemon --metrics ADDR`), answered by the event loop. Plain HTTP and
/// no token, as Prometheus scrapes: bind it where only the monitoring can reach it.
pub fn serve_metrics(listener: tokio::net::TcpListener, loop_tx: mpsc::Sender<Request>) -> tokio::task::JoinHandle<()> {
    async fn metrics(State(tx): State<mpsc::Sender<Request>>) -> Result<axum::response::Response, ApiError> {
        use axum::response::IntoResponse;
        let (reply, answer) = oneshot::channel();
        let gone = || error(StatusCode::SERVICE_UNAVAILABLE, "the daemon is shutting down");
        tx.send(Request::Metrics(reply)).await.map_err(|_| gone())?;
        let text = answer.await.map_err(|_| gone())?;
        Ok(([(axum::http::header::CONTENT_TYPE, crate::daemon::METRICS_CONTENT_TYPE)], text).into_response())
    }
    let app = Router::new().route("/metrics", get(metrics)).with_state(loop_tx);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    })
}

/// The client side, for the CLI verbs: one request, the status code and body of the answer.
pub async fn call(socket: &PathBuf, method: &str, path: &str, body: Option<String>) -> Result<(u16, String), String> {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;

    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        format!("cannot reach the meshd daemon at {}: {e} (is `meshd daemon` running? --socket PATH)", socket.display())
    })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| format!("talking to the daemon: {e}"))?;
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "meshd")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| format!("talking to the daemon: {e}"))?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.map_err(|e| format!("reading the daemon's answer: {e}"))?;
    Ok((status, String::from_utf8_lossy(&bytes.to_bytes()).into_owned()))
}

/// The `error` line of a refusal.
pub fn error_text(status: u16, body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("the daemon answered {status}: {body}"))
}
