//! The coordination server's HTTP API: what `meshd control ...` (administrators, with the admin token) and
//! `meshd up` (nodes, with their credential) talk to. JSON bodies; errors are an `ErrorBody` with a stable
//! code. The netmap is a long poll: a node asks with the version it has and gets the next one as soon as
//! anything changes, or the same one after a while, so changes reach every node within a second.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use ipnet::IpNet;
use mesh_proto::{ErrorBody, ErrorCode, RegisterRequest};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::control::{AdvertisedRoute, AuthKeyOptions, Control, ControlError, Snapshot};
use crate::limits::WriteLimiter;

/// How long a netmap request waits for a change before answering with what it has.
const LONG_POLL: Duration = Duration::from_secs(25);

/// A node that polled within this many seconds is online.
pub(crate) const ONLINE_WINDOW: u64 = 60;

/// A node needs one long poll; a few more cover a restart racing the old poll. More is a misbehaving or
/// stolen credential holding server resources.
const MAX_POLLS_PER_NODE: usize = 4;

/// Request bodies nodes and most verbs send are small; a policy file may be bigger.
pub(crate) const MAX_BODY: usize = 64 * 1024;
pub(crate) const MAX_POLICY_BODY: usize = 1024 * 1024;

pub struct AppState {
    control: Mutex<Control>,
    admin_hash: String,
    version: watch::Sender<u64>,
    clock: fn() -> u64,
    polls: Mutex<HashMap<u64, usize>>,
    writes: Mutex<WriteLimiter<u64>>,
    /// The latest snapshot and the second it was made in (online flags age with the clock).
    snapshot: tokio::sync::Mutex<Option<(u64, Arc<Snapshot>)>>,
    pub(crate) console: crate::console::ConsoleState,
    domain: String,
    metrics: crate::metrics::ControlMetrics,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

impl AppState {
    /// `admin_token` is kept only as a hash; `clock` gives Unix seconds (tests pass their own);
    /// `secure_cookies` is false only when the server speaks plain HTTP (the console's cookies).
    pub fn new(control: Control, admin_token: &str, clock: fn() -> u64, secure_cookies: bool) -> Arc<Self> {
        let version = control.version().unwrap_or(1);
        let domain = control.domain().to_string();
        Arc::new(Self {
            control: Mutex::new(control),
            admin_hash: hash(admin_token),
            version: watch::channel(version).0,
            clock,
            polls: Mutex::new(HashMap::new()),
            writes: Mutex::new(WriteLimiter::default()),
            snapshot: tokio::sync::Mutex::new(None),
            console: crate::console::ConsoleState::new(secure_cookies),
            domain,
            metrics: crate::metrics::ControlMetrics::default(),
        })
    }

    pub(crate) fn metrics(&self) -> &crate::metrics::ControlMetrics {
        &self.metrics
    }

    /// Nodes online, offline and expired, and the netmap version, read on the blocking pool.
    pub(crate) async fn node_counts(self: &Arc<Self>) -> Result<(i64, i64, i64, i64), ControlError> {
        blocking_work(self, |c, now| {
            let (mut online, mut offline, mut expired) = (0, 0, 0);
            for node in c.nodes()? {
                if node.expired {
                    expired += 1;
                } else if now.saturating_sub(node.last_seen) < ONLINE_WINDOW {
                    online += 1;
                } else {
                    offline += 1;
                }
            }
            Ok((online, offline, expired, c.version()? as i64))
        })
        .await
    }

    /// Unix seconds by the server's clock.
    pub(crate) fn now(&self) -> u64 {
        (self.clock)()
    }

    pub(crate) fn domain(&self) -> &str {
        &self.domain
    }

    /// Whether `token` is the admin token (compared as hashes, in constant time).
    pub(crate) fn is_admin_token(&self, token: &str) -> bool {
        crate::console::same_secret(&hash(token), &self.admin_hash)
    }

    /// The snapshot every netmap of the current version is spliced from: made by the first poll that
    /// needs it while the others wait for it, so a change costs one read of the store, not one per node.
    async fn snapshot(self: &Arc<Self>) -> Result<Arc<Snapshot>, ApiError> {
        let mut cached = self.snapshot.lock().await;
        let (now, version) = ((self.clock)(), *self.version.borrow());
        if let Some((at, snapshot)) = cached.as_ref()
            && *at == now
            && snapshot.version() >= version
        {
            return Ok(snapshot.clone());
        }
        let started = Instant::now();
        let snapshot =
            Arc::new(blocking(self, |c, now| c.snapshot(|n| now.saturating_sub(n.last_seen) < ONLINE_WINDOW)).await?);
        self.metrics.netmap_built(started.elapsed().as_secs_f64());
        *cached = Some((now, snapshot.clone()));
        Ok(snapshot)
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        lock(&self.control)
    }

    /// Removes ephemeral nodes offline for `offline_for` seconds, telling the others.
    pub fn remove_stale_ephemeral(&self, offline_for: u64) -> Result<usize, ControlError> {
        let removed = self.control().remove_stale_ephemeral((self.clock)(), offline_for)?;
        if removed > 0 {
            self.changed_blocking();
        }
        Ok(removed)
    }

    /// How many netmap long polls are waiting for a change (each has subscribed before it checks the
    /// version, so a change made after this counts one is seen by it).
    pub fn waiting_polls(&self) -> usize {
        self.version.receiver_count()
    }

    /// Tells waiting long polls that something changed; from blocking work, which may wait for the store.
    fn changed_blocking(&self) {
        let version = self.control().version().unwrap_or(0);
        self.version.send_replace(version);
    }

    /// Tells waiting long polls that something changed. The version is read on the blocking pool: the
    /// store's lock may be held by a snapshot or an fsync, and an async thread must not wait for it.
    pub(crate) async fn changed(self: &Arc<Self>) {
        if let Ok(version) = blocking(self, |c, _| c.version()).await {
            self.version.send_replace(version);
        }
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs storage work on the blocking pool, so a slow query or fsync stalls no async thread and with it
/// no long poll; `now` is the server clock when the work starts.
async fn blocking<T: Send + 'static>(
    state: &Arc<AppState>,
    work: impl FnOnce(&mut Control, u64) -> Result<T, ControlError> + Send + 'static,
) -> Result<T, ApiError> {
    blocking_work(state, work).await.map_err(ApiError::from)
}

/// `blocking`, for callers that show the store's error themselves (the console).
pub(crate) async fn blocking_work<T: Send + 'static>(
    state: &Arc<AppState>,
    work: impl FnOnce(&mut Control, u64) -> Result<T, ControlError> + Send + 'static,
) -> Result<T, ControlError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let now = (state.clock)();
        work(&mut state.control(), now)
    })
    .await
    .unwrap_or_else(|e| {
        tracing::error!(error = %e, "storage work panicked");
        Err(ControlError::new(ErrorCode::Internal, "the coordination server failed; it has logged why"))
    })
}

/// A node's long poll, counted while it waits.
struct PollSlot {
    state: Arc<AppState>,
    node: u64,
}

impl PollSlot {
    fn take(state: &Arc<AppState>, node: u64) -> Option<Self> {
        let mut polls = lock(&state.polls);
        let count = polls.entry(node).or_default();
        if *count >= MAX_POLLS_PER_NODE {
            return None;
        }
        *count += 1;
        Some(Self { state: state.clone(), node })
    }
}

impl Drop for PollSlot {
    fn drop(&mut self) {
        let mut polls = lock(&self.state.polls);
        if let Some(count) = polls.get_mut(&self.node) {
            *count -= 1;
            if *count == 0 {
                polls.remove(&self.node);
            }
        }
    }
}

fn hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// An error as the API returns it.
#[derive(Debug)]
pub struct ApiError(StatusCode, ErrorBody);

impl ApiError {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self(status, ErrorBody { code, message: message.into() })
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.0
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let status = match e.code {
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::UnknownAuthKey
            | ErrorCode::AuthKeyRevoked
            | ErrorCode::AuthKeyExpired
            | ErrorCode::AuthKeyUsed
            | ErrorCode::TagNotAllowed
            | ErrorCode::NodeExpired
            | ErrorCode::BadProof => StatusCode::FORBIDDEN,
            ErrorCode::VersionMismatch => StatusCode::CONFLICT,
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, ErrorBody { code: e.code, message: e.message })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

fn require_admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let token = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match token {
        Some(t) if hash(t) == state.admin_hash => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "an admin token is needed (--admin-token)",
        )),
    }
}

/// `Authorization: Node <id> <credential>`.
async fn require_node(state: &Arc<AppState>, headers: &HeaderMap) -> Result<u64, ApiError> {
    let unauthorized =
        || ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, "a node credential is needed");
    let value = headers.get("authorization").and_then(|v| v.to_str().ok()).ok_or_else(unauthorized)?;
    let mut parts = value.strip_prefix("Node ").ok_or_else(unauthorized)?.split(' ');
    let id: u64 = parts.next().and_then(|i| i.parse().ok()).ok_or_else(unauthorized)?;
    let credential = parts.next().ok_or_else(unauthorized)?.to_string();
    blocking(state, move |c, now| c.authenticate(id, &credential, now).map(|n| n.id)).await
}

/// A node that writes more often than any honest node would is told to slow down (and wakes nobody).
fn limit_writes(state: &AppState, node: u64) -> Result<(), ApiError> {
    if lock(&state.writes).allow(node, Instant::now()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            "too many changes from this node; try again in a few seconds",
        ))
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/v1/server-key", get(server_key))
        .route("/api/v1/register", post(register))
        .route("/api/v1/netmap", get(netmap))
        .route("/api/v1/endpoints", post(endpoints))
        .route("/api/v1/routes", post(advertise))
        .route("/api/v1/logout", post(logout))
        .route("/api/v1/admin/authkeys", post(create_key).get(list_keys))
        .route("/api/v1/admin/authkeys/{id}", delete(revoke_key))
        .route("/api/v1/admin/users", get(list_users).post(create_user))
        .route("/api/v1/admin/users/{name}", delete(delete_user))
        .route("/api/v1/admin/nodes", get(list_nodes))
        .route("/api/v1/admin/nodes/{id}", delete(delete_node))
        .route("/api/v1/admin/nodes/{id}/expire", post(expire_node))
        .route("/api/v1/admin/nodes/{id}/rename", post(rename_node))
        .route("/api/v1/admin/dns", get(get_dns).put(set_dns))
        .route("/api/v1/admin/routes", get(list_routes))
        .route("/api/v1/admin/routes/approve", post(approve_route))
        .route("/api/v1/admin/routes/reject", post(reject_route))
        .route("/api/v1/admin/policy", get(get_policy).put(set_policy).layer(DefaultBodyLimit::max(MAX_POLICY_BODY)))
        .route("/api/v1/admin/policy/check", post(check_policy).layer(DefaultBodyLimit::max(MAX_POLICY_BODY)))
        .route("/api/v1/admin/policy/explain", get(explain_policy))
        .route("/api/v1/admin/console-link", post(console_link))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .merge(crate::console::router())
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::metrics::record))
        .with_state(state)
}

/// `GET /metrics` on a listener of its own (`--metrics ADDR`): operators scrape it without the admin token,
/// so it is not on the API's port, which the internet may reach.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(state): State<Arc<AppState>>| async move {
                match crate::metrics::render(&state).await {
                    Ok(text) => {
                        ([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
                    }
                    Err(e) => ApiError::from(e).into_response(),
                }
            }),
        )
        .with_state(state)
}

#[derive(Debug, Serialize)]
struct ConsoleLink {
    /// The link's path on this server; it signs one browser in, once.
    path: String,
    expires_in: u64,
}

/// A one-time sign-in link to the console (`meshd control admin-link`), so a long token is not typed.
async fn console_link(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult<ConsoleLink> {
    require_admin(&state, &headers)?;
    let path = state.console.create_link(state.now());
    tracing::info!("made a one-time console sign-in link");
    Ok(Json(ConsoleLink { path, expires_in: crate::console::LINK_LIFETIME }))
}

async fn server_key(State(state): State<Arc<AppState>>) -> ApiResult<mesh_proto::ServerKey> {
    let public_key = blocking(&state, |c, _| c.server_public_key()).await?;
    Ok(Json(mesh_proto::ServerKey { version: mesh_proto::VERSION, public_key }))
}

async fn register(
    State(state): State<Arc<AppState>>,
    Json(request): Json<RegisterRequest>,
) -> ApiResult<mesh_proto::RegisterResponse> {
    let response = blocking(&state, move |c, now| c.register(&request, now)).await?;
    state.changed().await;
    Ok(Json(response))
}

#[derive(Debug, Deserialize)]
struct Since {
    #[serde(default)]
    since: u64,
}

async fn netmap(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(Since { since }): Query<Since>,
) -> Result<Response, ApiError> {
    let node = require_node(&state, &headers).await?;
    let Some(_slot) = PollSlot::take(&state, node) else {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            format!("this node already has {MAX_POLLS_PER_NODE} netmap requests waiting"),
        ));
    };
    blocking(&state, move |c, now| c.touch(node, now)).await?;
    let mut versions = state.version.subscribe();
    if *versions.borrow() <= since {
        // Wait for the next change, or answer with what there is when the poll times out.
        let _ = tokio::time::timeout(LONG_POLL, versions.wait_for(|v| *v > since)).await;
    }
    let netmap = state.snapshot().await?.netmap_json(node)?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], netmap).into_response())
}

async fn endpoints(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(update): Json<mesh_proto::EndpointsUpdate>,
) -> Result<StatusCode, ApiError> {
    let node = require_node(&state, &headers).await?;
    limit_writes(&state, node)?;
    if blocking(&state, move |c, _| c.set_endpoints(node, &update)).await? {
        state.changed().await;
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn advertise(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(update): Json<mesh_proto::RoutesUpdate>,
) -> Result<StatusCode, ApiError> {
    let node = require_node(&state, &headers).await?;
    limit_writes(&state, node)?;
    if blocking(&state, move |c, _| c.set_advertised(node, &update)).await? {
        state.changed().await;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// A node leaves the mesh for good (`meshd logout`); its peers drop it with the next netmap.
async fn logout(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<StatusCode, ApiError> {
    let node = require_node(&state, &headers).await?;
    if blocking(&state, move |c, _| c.delete_node(node)).await? {
        state.changed().await;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct CreateKey {
    #[serde(default)]
    reusable: bool,
    #[serde(default)]
    ephemeral: bool,
    #[serde(default)]
    tags: Vec<String>,
    /// Seconds until it expires; none never expires.
    expiry: Option<u64>,
    /// The user whose untagged nodes it makes.
    #[serde(default)]
    user: Option<String>,
}

#[derive(Debug, Serialize)]
struct CreatedKey {
    id: u64,
    key: String,
}

async fn create_key(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(body): Json<CreateKey>,
) -> ApiResult<CreatedKey> {
    require_admin(&state, &headers)?;
    let options = AuthKeyOptions {
        reusable: body.reusable,
        ephemeral: body.ephemeral,
        tags: body.tags,
        expiry: body.expiry,
        user: body.user,
    };
    let (key, secret) = blocking(&state, move |c, now| c.create_auth_key(&options, now)).await?;
    Ok(Json(CreatedKey { id: key.id, key: secret }))
}

#[derive(Debug, Serialize)]
struct KeyView {
    id: u64,
    reusable: bool,
    ephemeral: bool,
    tags: Vec<String>,
    expires_at: Option<u64>,
    revoked: bool,
    uses: u64,
    user: Option<String>,
}

async fn list_keys(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult<Vec<KeyView>> {
    require_admin(&state, &headers)?;
    let keys = blocking(&state, |c, _| c.list_auth_keys()).await?;
    Ok(Json(
        keys.into_iter()
            .map(|k| KeyView {
                id: k.id,
                reusable: k.reusable,
                ephemeral: k.ephemeral,
                tags: k.tags,
                expires_at: k.expires_at,
                revoked: k.revoked,
                uses: k.uses,
                user: k.user,
            })
            .collect(),
    ))
}

#[derive(Debug, Deserialize)]
struct NewUser {
    name: String,
}

async fn create_user(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(body): Json<NewUser>,
) -> ApiResult<crate::User> {
    require_admin(&state, &headers)?;
    Ok(Json(blocking(&state, move |c, now| c.create_user(&body.name, now)).await?))
}

async fn list_users(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult<Vec<crate::User>> {
    require_admin(&state, &headers)?;
    Ok(Json(blocking(&state, |c, _| c.list_users()).await?))
}

async fn delete_user(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    require_admin(&state, &headers)?;
    blocking(&state, move |c, _| c.delete_user(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn not_found(what: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, ErrorCode::BadRequest, format!("no such {what}"))
}

async fn revoke_key(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Result<StatusCode, ApiError> {
    require_admin(&state, &headers)?;
    if blocking(&state, move |c, _| c.revoke_auth_key(id)).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found("auth key"))
    }
}

#[derive(Debug, Serialize)]
struct NodeView {
    id: u64,
    name: String,
    ipv4: std::net::Ipv4Addr,
    ipv6: std::net::Ipv6Addr,
    tags: Vec<String>,
    ephemeral: bool,
    expired: bool,
    online: bool,
    endpoints: Vec<std::net::SocketAddr>,
    user: Option<String>,
}

async fn list_nodes(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult<Vec<NodeView>> {
    require_admin(&state, &headers)?;
    let now = (state.clock)();
    let nodes = blocking(&state, |c, _| c.nodes()).await?;
    Ok(Json(
        nodes
            .into_iter()
            .map(|n| NodeView {
                online: now.saturating_sub(n.last_seen) < ONLINE_WINDOW,
                id: n.id,
                name: n.name,
                ipv4: n.ipv4,
                ipv6: n.ipv6,
                tags: n.tags,
                ephemeral: n.ephemeral,
                expired: n.expired,
                endpoints: n.endpoints,
                user: n.user,
            })
            .collect(),
    ))
}

/// `nodes/{node}`: the node's name or id.
async fn delete_node(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(node): Path<String>,
) -> Result<StatusCode, ApiError> {
    require_admin(&state, &headers)?;
    blocking(&state, move |c, _| {
        let id = c.resolve_node(&node)?;
        c.delete_node(id)
    })
    .await?;
    state.changed().await;
    Ok(StatusCode::NO_CONTENT)
}

async fn expire_node(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(node): Path<String>,
) -> Result<StatusCode, ApiError> {
    require_admin(&state, &headers)?;
    blocking(&state, move |c, _| {
        let id = c.resolve_node(&node)?;
        c.expire_node(id)
    })
    .await?;
    state.changed().await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct Rename {
    name: String,
}

async fn rename_node(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(node): Path<String>,
    Json(rename): Json<Rename>,
) -> Result<StatusCode, ApiError> {
    require_admin(&state, &headers)?;
    blocking(&state, move |c, _| {
        let id = c.resolve_node(&node)?;
        c.rename_node(id, &rename.name)
    })
    .await?;
    state.changed().await;
    Ok(StatusCode::NO_CONTENT)
}

/// The DNS settings as they were written (`{}` before any were set: the defaults).
async fn get_dns(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<String, ApiError> {
    require_admin(&state, &headers)?;
    let stored = blocking(&state, |c, _| c.stored_dns()).await?;
    Ok(stored.map_or_else(|| "{}".to_string(), |p| p.text))
}

#[derive(Debug, Serialize)]
struct DnsVersion {
    version: u64,
}

async fn set_dns(State(state): State<Arc<AppState>>, headers: HeaderMap, body: String) -> ApiResult<DnsVersion> {
    require_admin(&state, &headers)?;
    let version = blocking(&state, move |c, now| c.set_dns(&body, "admin API", now)).await?;
    tracing::info!(version, "DNS settings set");
    state.changed().await;
    Ok(Json(DnsVersion { version }))
}

async fn list_routes(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult<Vec<AdvertisedRoute>> {
    require_admin(&state, &headers)?;
    Ok(Json(blocking(&state, |c, _| c.all_routes()).await?))
}

/// A node by name or id: JSON numbers (what older clients send) and strings both.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum NodeRef {
    Id(u64),
    Text(String),
}

impl NodeRef {
    fn text(self) -> String {
        match self {
            Self::Id(id) => id.to_string(),
            Self::Text(text) => text,
        }
    }
}

#[derive(Debug, Deserialize)]
struct RouteChoice {
    node: NodeRef,
    prefix: IpNet,
}

async fn approve_route(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(r): Json<RouteChoice>,
) -> Result<StatusCode, ApiError> {
    set_route(&state, &headers, r, true).await
}

async fn reject_route(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(r): Json<RouteChoice>,
) -> Result<StatusCode, ApiError> {
    set_route(&state, &headers, r, false).await
}

async fn set_route(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    r: RouteChoice,
    approved: bool,
) -> Result<StatusCode, ApiError> {
    require_admin(state, headers)?;
    let changed = blocking(state, move |c, _| {
        let node = c.resolve_node(&r.node.text())?;
        c.set_route_approval(node, r.prefix.trunc(), approved)
    })
    .await?;
    if changed {
        state.changed().await;
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn get_policy(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<String, ApiError> {
    require_admin(&state, &headers)?;
    let stored = blocking(&state, |c, _| c.stored_policy()).await?;
    Ok(stored.map_or_else(|| "{}".to_string(), |p| p.text))
}

/// Replaces the policy; answers with its version and what the change took back.
async fn set_policy(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: String,
) -> ApiResult<crate::PolicyChange> {
    require_admin(&state, &headers)?;
    let change = blocking(&state, move |c, now| c.set_policy(&body, "admin API", now)).await?;
    for revoked in change.taken_back() {
        tracing::info!(version = change.version, "the new policy took back {revoked}");
    }
    state.changed().await;
    Ok(Json(change))
}

#[derive(Debug, Deserialize)]
struct ExplainQuery {
    src: String,
    dst: String,
    port: u16,
    #[serde(default)]
    proto: Option<String>,
}

/// Which rule allows a flow, or that none does.
async fn explain_policy(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<ExplainQuery>,
) -> Result<String, ApiError> {
    require_admin(&state, &headers)?;
    let proto = match q.proto.as_deref() {
        None | Some("") => 6,
        Some(p) => crate::policy::parse_proto(p)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e))?,
    };
    blocking(&state, move |c, _| c.explain(&q.src, &q.dst, q.port, proto)).await
}

async fn check_policy(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: String,
) -> Result<StatusCode, ApiError> {
    require_admin(&state, &headers)?;
    blocking(&state, move |c, _| c.check_policy(&body).map(|_| ())).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
pub(crate) mod tests;
