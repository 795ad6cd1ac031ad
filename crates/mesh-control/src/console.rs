//! The admin console: server-rendered pages under `/admin/` on the API's own listener, doing what the
//! `meshd control` verbs do through the same `Control` calls, so a change made here reaches nodes exactly as
//! one made through the API does.
//!
//! Safety: a session cookie (HttpOnly, SameSite=Strict, Secure unless the server is plain HTTP) made by
//! signing in with the admin token or a one-time link; a CSRF token in every state-changing form, checked
//! before the form is read; sign-ins limited per client address; a Content-Security-Policy that allows
//! nothing but the console's own stylesheet and script, which are embedded in the binary.

mod pages;
mod session;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use askama::Template;
use axum::extract::DefaultBodyLimit;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{any, get, post};
use axum::{Form, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::control::{AuthKeyOptions, ControlError};
use crate::http::{AppState, MAX_BODY, MAX_POLICY_BODY, blocking_work, lock};
use crate::limits::WriteLimiter;
use mesh_proto::ErrorCode;
use pages::*;
use session::{Flash, Session, Sessions, random_token};
pub use session::{LINK_LIFETIME, same_secret};

const SESSION_COOKIE: &str = "meshd_console";
/// Before sign-in: the value the sign-in form must carry back (a page on another site cannot read it, so
/// it cannot sign a browser in to a mesh of its choosing).
const LOGIN_COOKIE: &str = "meshd_console_login";
/// How long a sign-in form may be filled in (seconds).
const LOGIN_FORM_LIFETIME: u64 = 600;
/// Sign-in attempts per client address: a few at once, then one every ten seconds. The admin token has
/// 192 bits, so this is about not burning CPU and log lines, and about noticing.
const SIGN_IN_BURST: f64 = 5.0;
const SIGN_IN_PER_SECOND: f64 = 0.1;
/// Policy versions listed in the history.
const HISTORY: usize = 50;
/// A form's body: a policy as big as the API takes, URL-encoded (up to three bytes for one).
const MAX_FORM: usize = 3 * MAX_POLICY_BODY + 4096;
/// A sign-in form: a token and a CSRF field. Read before anyone is known, so kept small.
const MAX_SIGN_IN_FORM: usize = 4096;

/// Nothing but the console's own files: no inline script or style, no frames, forms only to itself.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

#[derive(Debug)]
pub struct ConsoleState {
    sessions: Mutex<Sessions>,
    sign_ins: Mutex<WriteLimiter<IpAddr>>,
    secure_cookies: bool,
}

impl ConsoleState {
    /// `secure_cookies`: false only when the server speaks plain HTTP, where a Secure cookie would never
    /// come back.
    pub fn new(secure_cookies: bool) -> Self {
        Self {
            sessions: Mutex::new(Sessions::default()),
            sign_ins: Mutex::new(WriteLimiter::new(SIGN_IN_BURST, SIGN_IN_PER_SECOND)),
            secure_cookies,
        }
    }

    /// A one-time sign-in link's path (for `meshd control admin-link`).
    pub fn create_link(&self, now: u64) -> String {
        format!("/admin/link?token={}", lock(&self.sessions).create_link(now))
    }

    fn cookie(&self, name: &str, value: &str, max_age: u64) -> HeaderValue {
        let secure = if self.secure_cookies { "; Secure" } else { "" };
        let text = format!("{name}={value}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}");
        HeaderValue::from_str(&text).expect("cookie values are hex")
    }
}

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin", get(|| async { Redirect::to("/admin/machines") }))
        .route("/admin/", get(|| async { Redirect::to("/admin/machines") }))
        .route("/admin/static/console.css", get(stylesheet))
        .route("/admin/static/console.js", get(script))
        .route("/admin/login", get(login_page).post(login).layer(DefaultBodyLimit::max(MAX_SIGN_IN_FORM)))
        .route("/admin/link", get(link_page).post(link_login).layer(DefaultBodyLimit::max(MAX_SIGN_IN_FORM)))
        .route("/admin/logout", post(logout))
        .route("/admin/machines", get(machines))
        .route("/admin/machines/{id}", get(machine))
        .route("/admin/machines/{id}/rename", post(rename))
        .route("/admin/machines/{id}/expire", get(confirm_expire).post(expire))
        .route("/admin/machines/{id}/delete", get(confirm_delete).post(delete))
        .route("/admin/routes", post(route_choice))
        .route("/admin/keys", get(keys).post(create_key))
        .route("/admin/keys/{id}/revoke", post(revoke_key))
        .route("/admin/policy", get(policy).post(policy_action))
        .route("/admin/dns", get(dns).post(dns_action))
        .route("/admin/dns/magic", post(magic_dns))
        .route("/admin/users", get(users).post(create_user))
        .route("/admin/users/delete", post(delete_user))
        // Only under /admin: the API keeps its own answers for paths it does not know.
        .route(
            "/admin/{*rest}",
            any(|| async { failure(StatusCode::NOT_FOUND, "No such page", "Nothing lives at this address.") }),
        )
        // route_layer: only what matched a console route; the API keeps its own answers for the rest.
        .route_layer(axum::middleware::map_response(security_headers))
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // A created key's secret is on a page: no cache may keep it, and "back" must not show it again.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn stylesheet() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], include_str!("../assets/console.css"))
}

async fn script() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], include_str!("../assets/console.js"))
}

fn render(page: impl Template) -> Response {
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering a console page");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

fn failure(status: StatusCode, title: &str, message: &str) -> Response {
    let page = ErrorPage { layout: Layout::signed_out(title), message: message.to_string() };
    (status, render(page)).into_response()
}

/// A refusal from the store, shown as a page that says why and leads back.
fn refused(e: ControlError, back: &str, layout: Layout) -> Response {
    let status = crate::http::ApiError::from(e.clone()).status();
    let page = RefusedPage { layout, message: e.message, back: back.to_string() };
    (status, render(page)).into_response()
}

/// The client's address, from the listener (none in tests that call the router directly).
struct Client(IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
        Ok(Self(peer.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))))
    }
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_string())
}

/// A signed-in administrator: a request without a live session is sent to sign in (a page) or refused (a
/// form).
struct Admin {
    cookie: String,
    session: Session,
}

impl Admin {
    /// The live session the request's cookie names, if any.
    fn of(state: &AppState, headers: &HeaderMap) -> Option<Self> {
        let cookie = cookie_value(headers, SESSION_COOKIE)?;
        let session = lock(&state.console.sessions).get(&cookie, state.now())?;
        Some(Self { cookie, session })
    }

    fn layout(&self, title: &str, active: &'static str) -> Layout {
        Layout { title: title.to_string(), active, csrf: Some(self.session.csrf.clone()), note: None }
    }

    /// A page's layout with the note a change's redirect named (`?done=`), if any.
    fn layout_noted(&self, title: &str, active: &'static str, done: &str) -> Layout {
        Layout { note: Note::from_code(done), ..self.layout(title, active) }
    }
}

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Response> {
        match Admin::of(state, &parts.headers) {
            Some(admin) => Ok(admin),
            None if parts.method == Method::GET || parts.method == Method::HEAD => {
                Err(Redirect::to("/admin/login").into_response())
            }
            None => Err(failure(
                StatusCode::FORBIDDEN,
                "Sign in first",
                "This change was refused: the browser is not signed in to the console (or its session ended).",
            )),
        }
    }
}

/// A state-changing form from a signed-in administrator, refused unless it carries the session's CSRF
/// token. The token is checked before the rest of the form is read.
struct AdminForm<T> {
    admin: Admin,
    form: T,
}

#[derive(Deserialize, Default)]
struct CsrfField {
    #[serde(default)]
    csrf: String,
}

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for AdminForm<T> {
    type Rejection = Response;

    async fn from_request(request: Request, state: &Arc<AppState>) -> Result<Self, Response> {
        let (mut parts, body) = request.into_parts();
        let admin = Admin::from_request_parts(&mut parts, state).await?;
        let bytes = axum::body::to_bytes(body, MAX_FORM).await.map_err(|_| {
            failure(
                StatusCode::BAD_REQUEST,
                "Form refused",
                "The form could not be read whole (or is larger than the server takes).",
            )
        })?;
        let csrf: CsrfField = serde_urlencoded::from_bytes(&bytes).unwrap_or_default();
        if !same_secret(&csrf.csrf, &admin.session.csrf) {
            return Err(failure(
                StatusCode::FORBIDDEN,
                "Form refused",
                "This form did not carry the console's token for this session, so it was refused. Reload the \
                 page and try again.",
            ));
        }
        let form = serde_urlencoded::from_bytes(&bytes)
            .map_err(|e| failure(StatusCode::BAD_REQUEST, "Form refused", &format!("The form is malformed: {e}")))?;
        Ok(Self { admin, form })
    }
}

/// After a change: back to a console page, with a note saying what was done.
fn done(path: &str, note: Note) -> Response {
    Redirect::to(&format!("{path}?done={}", note.code())).into_response()
}

/// Only console paths: a form's `back` field cannot send the browser anywhere else.
fn back_path(back: &str) -> &str {
    let safe = back.starts_with("/admin/")
        && back.bytes().all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b))
        && !back.contains("//")
        && !back.contains("..");
    if safe { back } else { "/admin/machines" }
}

// ---- signing in and out

#[derive(Deserialize)]
struct SignIn {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
}

async fn login_page(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if Admin::of(&state, &headers).is_some() {
        return Redirect::to("/admin/machines").into_response();
    }
    login_form(&state, None, StatusCode::OK)
}

/// A sign-in form's page (made with the token `csrf`), with the cookie the form must carry back.
fn sign_in_form(state: &AppState, csrf: &str, response: Response) -> Response {
    let mut response = response;
    response.headers_mut().append(header::SET_COOKIE, state.console.cookie(LOGIN_COOKIE, csrf, LOGIN_FORM_LIFETIME));
    response
}

fn login_form(state: &AppState, error: Option<&str>, status: StatusCode) -> Response {
    let csrf = random_token();
    let page = LoginPage { layout: Layout::signed_out("Sign in"), csrf: csrf.clone(), error: error.map(String::from) };
    sign_in_form(state, &csrf, (status, render(page)).into_response())
}

/// Whether this client may try to sign in now; takes one attempt. IPv6 clients are counted by their /64,
/// which one host can fill with addresses of its own.
fn may_try(state: &AppState, client: IpAddr) -> bool {
    let key = match client {
        IpAddr::V6(v6) => {
            let mut segments = v6.segments();
            segments[4..].fill(0);
            IpAddr::from(segments)
        }
        v4 => v4,
    };
    lock(&state.console.sign_ins).allow(key, Instant::now())
}

fn signed_in(state: &AppState, now: u64) -> Response {
    state.metrics().sign_in("ok");
    let (cookie, _) = lock(&state.console.sessions).create(now);
    let mut response = Redirect::to("/admin/machines").into_response();
    let headers = response.headers_mut();
    headers.append(header::SET_COOKIE, state.console.cookie(SESSION_COOKIE, &cookie, session::SESSION_LIFETIME));
    headers.append(header::SET_COOKIE, state.console.cookie(LOGIN_COOKIE, "", 0));
    response
}

fn pre_sign_in_matches(headers: &HeaderMap, csrf: &str) -> bool {
    cookie_value(headers, LOGIN_COOKIE).is_some_and(|c| !c.is_empty() && same_secret(&c, csrf))
}

/// What every sign-in (token or link) passes before its secret is looked at: the form's own cookie first
/// (a page on another site cannot send it, so it cannot spend this client's attempts and lock the
/// administrator out), then the per-client limit. The refusal, if any.
fn sign_in_refused(state: &AppState, client: IpAddr, headers: &HeaderMap, csrf: &str) -> Option<Response> {
    if !pre_sign_in_matches(headers, csrf) {
        state.metrics().sign_in("expired_form");
        return Some(login_form(state, Some("The sign-in form expired; try again."), StatusCode::FORBIDDEN));
    }
    if !may_try(state, client) {
        tracing::warn!(%client, "console sign-in attempts over the limit");
        state.metrics().sign_in("limited");
        let message = "Too many sign-in attempts from here; wait a minute.";
        return Some(login_form(state, Some(message), StatusCode::TOO_MANY_REQUESTS));
    }
    None
}

async fn login(
    State(state): State<Arc<AppState>>,
    Client(client): Client,
    headers: HeaderMap,
    Form(form): Form<SignIn>,
) -> Response {
    if let Some(refused) = sign_in_refused(&state, client, &headers, &form.csrf) {
        return refused;
    }
    if !state.is_admin_token(form.token.trim()) {
        tracing::info!(%client, "console sign-in with a wrong token");
        state.metrics().sign_in("wrong");
        return login_form(&state, Some("That is not the admin token."), StatusCode::UNAUTHORIZED);
    }
    tracing::info!(%client, "console sign-in");
    signed_in(&state, state.now())
}

#[derive(Deserialize)]
struct LinkQuery {
    #[serde(default)]
    token: String,
}

/// The link only shows a button: a link previewer or a prefetch that follows it uses nothing up.
async fn link_page(State(state): State<Arc<AppState>>, Query(q): Query<LinkQuery>) -> Response {
    let csrf = random_token();
    let page = LinkPage { layout: Layout::signed_out("Sign in"), token: q.token, csrf: csrf.clone() };
    sign_in_form(&state, &csrf, render(page))
}

async fn link_login(
    State(state): State<Arc<AppState>>,
    Client(client): Client,
    headers: HeaderMap,
    Form(form): Form<SignIn>,
) -> Response {
    if let Some(refused) = sign_in_refused(&state, client, &headers, &form.csrf) {
        return refused;
    }
    let now = state.now();
    if !lock(&state.console.sessions).redeem_link(&form.token, now) {
        tracing::info!(%client, "console sign-in with a spent, expired or unknown link");
        state.metrics().sign_in("wrong");
        return login_form(
            &state,
            Some("That sign-in link was used already or has expired; make a new one with meshd control admin-link."),
            StatusCode::UNAUTHORIZED,
        );
    }
    tracing::info!(%client, "console sign-in with a one-time link");
    signed_in(&state, now)
}

async fn logout(State(state): State<Arc<AppState>>, AdminForm { admin, .. }: AdminForm<CsrfField>) -> Response {
    lock(&state.console.sessions).remove(&admin.cookie);
    let mut response = Redirect::to("/admin/login").into_response();
    response.headers_mut().append(header::SET_COOKIE, state.console.cookie(SESSION_COOKIE, "", 0));
    response
}

// ---- machines

#[derive(Deserialize, Default)]
struct MachineFilter {
    #[serde(default)]
    q: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    done: String,
}

async fn machines(State(state): State<Arc<AppState>>, admin: Admin, Query(filter): Query<MachineFilter>) -> Response {
    let rows = match blocking_work(&state, |c, _| Ok((c.nodes()?, c.all_routes()?))).await {
        Ok((nodes, routes)) => machine_rows(&state, nodes, &routes),
        Err(e) => return refused(e, "/admin/machines", admin.layout("Machines", "machines")),
    };
    let total = rows.len();
    let needle = filter.q.trim().to_ascii_lowercase();
    let shown: Vec<MachineRow> = rows
        .into_iter()
        .filter(|m| needle.is_empty() || m.matches(&needle))
        .filter(|m| match filter.state.as_str() {
            "online" => m.online && !m.expired,
            "offline" => !m.online && !m.expired,
            "expired" => m.expired,
            _ => true,
        })
        .collect();
    let layout = admin.layout_noted("Machines", "machines", &filter.done);
    render(MachinesPage { layout, machines: shown, total, q: filter.q, state: filter.state })
}

async fn machine_by_id(state: &Arc<AppState>, id: u64) -> Result<Option<MachineRow>, ControlError> {
    let (nodes, routes) = blocking_work(state, |c, _| Ok((c.nodes()?, c.all_routes()?))).await?;
    Ok(machine_rows(state, nodes, &routes).into_iter().find(|m| m.id == id))
}

fn no_machine(admin: &Admin) -> Response {
    let layout = admin.layout("No such machine", "machines");
    let page = RefusedPage { layout, message: "No machine has that id.".into(), back: "/admin/machines".into() };
    (StatusCode::NOT_FOUND, render(page)).into_response()
}

async fn machine(
    State(state): State<Arc<AppState>>,
    admin: Admin,
    Path(id): Path<u64>,
    Query(filter): Query<MachineFilter>,
) -> Response {
    match machine_by_id(&state, id).await {
        Ok(Some(m)) => {
            let layout = admin.layout_noted(&m.name, "machines", &filter.done);
            render(MachinePage { layout, m })
        }
        Ok(None) => no_machine(&admin),
        Err(e) => refused(e, "/admin/machines", admin.layout("Machine", "machines")),
    }
}

#[derive(Deserialize)]
struct RenameForm {
    name: String,
}

async fn rename(State(state): State<Arc<AppState>>, Path(id): Path<u64>, f: AdminForm<RenameForm>) -> Response {
    let name = f.form.name.trim().to_string();
    match blocking_work(&state, move |c, _| c.rename_node(id, &name)).await {
        Ok(()) => {
            state.changed().await;
            done(&format!("/admin/machines/{id}"), Note::Renamed)
        }
        Err(e) => refused(e, &format!("/admin/machines/{id}"), f.admin.layout("Rename refused", "machines")),
    }
}

async fn confirm(state: &Arc<AppState>, admin: Admin, id: u64, action: ConfirmAction) -> Response {
    match machine_by_id(state, id).await {
        Ok(Some(m)) => {
            let layout = admin.layout(&format!("{} {}?", action.verb(), m.name), "machines");
            render(ConfirmPage { layout, m, action })
        }
        Ok(None) => no_machine(&admin),
        Err(e) => refused(e, "/admin/machines", admin.layout("Machine", "machines")),
    }
}

async fn confirm_expire(State(state): State<Arc<AppState>>, admin: Admin, Path(id): Path<u64>) -> Response {
    confirm(&state, admin, id, ConfirmAction::Expire).await
}

async fn confirm_delete(State(state): State<Arc<AppState>>, admin: Admin, Path(id): Path<u64>) -> Response {
    confirm(&state, admin, id, ConfirmAction::Delete).await
}

#[derive(Deserialize)]
struct NamedForm {
    /// The name the confirmation showed: if the machine was renamed meanwhile, the change is refused rather
    /// than made to a machine the administrator did not see named.
    name: String,
}

/// Machine `id` is still the one a page showed as `shown`: ids of removed machines are used again, and a
/// machine may be renamed, between the page and the form.
fn still_named(c: &crate::Control, id: u64, shown: &str) -> Result<(), ControlError> {
    match c.nodes()?.into_iter().find(|n| n.id == id) {
        Some(n) if n.name == shown => Ok(()),
        Some(n) => Err(ControlError::new(
            ErrorCode::VersionMismatch,
            format!("machine {id} is now called {:?}, not {shown:?}; nothing was changed", n.name),
        )),
        None => Err(ControlError::not_found(format!("{shown:?} is no longer a machine of this mesh"))),
    }
}

async fn machine_change(state: &Arc<AppState>, id: u64, f: AdminForm<NamedForm>, action: ConfirmAction) -> Response {
    let shown = f.form.name;
    let result = blocking_work(state, move |c, _| {
        still_named(c, id, &shown)?;
        match action {
            ConfirmAction::Expire => c.expire_node(id),
            ConfirmAction::Delete => c.delete_node(id),
        }
    })
    .await;
    match result {
        Ok(_) => {
            state.changed().await;
            match action {
                ConfirmAction::Expire => done(&format!("/admin/machines/{id}"), Note::Expired),
                ConfirmAction::Delete => done("/admin/machines", Note::Deleted),
            }
        }
        Err(e) => refused(e, "/admin/machines", f.admin.layout("Refused", "machines")),
    }
}

async fn expire(State(state): State<Arc<AppState>>, Path(id): Path<u64>, f: AdminForm<NamedForm>) -> Response {
    machine_change(&state, id, f, ConfirmAction::Expire).await
}

async fn delete(State(state): State<Arc<AppState>>, Path(id): Path<u64>, f: AdminForm<NamedForm>) -> Response {
    machine_change(&state, id, f, ConfirmAction::Delete).await
}

#[derive(Deserialize)]
struct RouteForm {
    node: u64,
    /// The machine's name as the page showed it.
    name: String,
    prefix: String,
    action: String,
    #[serde(default)]
    back: String,
}

async fn route_choice(State(state): State<Arc<AppState>>, f: AdminForm<RouteForm>) -> Response {
    let back = back_path(&f.form.back).to_string();
    let layout = f.admin.layout("Route refused", "machines");
    let approve = match f.form.action.as_str() {
        "approve" => true,
        "reject" => false,
        _ => return refused(ControlError::bad("the action is approve or reject"), &back, layout),
    };
    let Ok(prefix) = f.form.prefix.parse::<ipnet::IpNet>() else {
        return refused(ControlError::bad("not a prefix"), &back, layout);
    };
    let (node, shown) = (f.form.node, f.form.name);
    let result = blocking_work(&state, move |c, _| {
        still_named(c, node, &shown)?;
        c.set_route_approval(node, prefix.trunc(), approve)
    })
    .await;
    match result {
        Ok(changed) => {
            if changed {
                state.changed().await;
            }
            tracing::info!(node, %prefix, approve, "route approval set in the console");
            done(&back, if approve { Note::Approved } else { Note::Rejected })
        }
        Err(e) => refused(e, &back, layout),
    }
}

// ---- keys

#[derive(Deserialize, Default)]
struct DoneQuery {
    #[serde(default)]
    done: String,
}

/// The keys page; a key made by the form just before is shown from the session's flash, once.
async fn keys(State(state): State<Arc<AppState>>, admin: Admin, Query(q): Query<DoneQuery>) -> Response {
    let mut layout = admin.layout_noted("Auth keys", "keys", &q.done);
    let created = match lock(&state.console.sessions).take_flash(&admin.cookie) {
        Some(Flash::Key { id, secret, summary }) => Some(CreatedKey { id, secret, summary }),
        _ => None,
    };
    if created.is_none() && layout.note == Some(Note::KeyCreated) {
        // A reload of the page that showed it: the secret is gone, and so is the note about copying it.
        layout.note = None;
    }
    let result = blocking_work(&state, |c, _| Ok((c.list_auth_keys()?, c.list_users()?))).await;
    match result {
        Ok((keys, users)) => {
            let now = state.now();
            let keys = keys.into_iter().rev().map(|k| KeyRow::new(k, now)).collect();
            let users = users.into_iter().map(|u| u.name).collect();
            render(KeysPage { layout, keys, users, created })
        }
        Err(e) => refused(e, "/admin/machines", layout),
    }
}

#[derive(Deserialize)]
struct KeyForm {
    #[serde(default)]
    reusable: Option<String>,
    #[serde(default)]
    ephemeral: Option<String>,
    #[serde(default)]
    tags: String,
    #[serde(default)]
    expiry: String,
    #[serde(default)]
    user: String,
}

/// Makes the key, leaves its secret in the session's flash and redirects: the page that shows it is a GET,
/// so a reload or the back button makes no second key and shows the secret no more.
async fn create_key(State(state): State<Arc<AppState>>, f: AdminForm<KeyForm>) -> Response {
    let form = f.form;
    let expiry = match form.expiry.as_str() {
        "" | "never" => None,
        text => match parse_expiry(text) {
            Some(seconds) => Some(seconds),
            None => {
                let layout = f.admin.layout("Key refused", "keys");
                return refused(ControlError::bad("pick an expiry from the list"), "/admin/keys", layout);
            }
        },
    };
    let options = AuthKeyOptions {
        reusable: form.reusable.is_some(),
        ephemeral: form.ephemeral.is_some(),
        tags: form.tags.split([',', ' ']).map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect(),
        expiry,
        user: Some(form.user.trim().to_string()).filter(|u| !u.is_empty()),
    };
    let summary = key_summary(&options);
    match blocking_work(&state, move |c, now| c.create_auth_key(&options, now)).await {
        Ok((key, secret)) => {
            tracing::info!(id = key.id, "auth key created in the console");
            lock(&state.console.sessions).set_flash(&f.admin.cookie, Flash::Key { id: key.id, secret, summary });
            done("/admin/keys", Note::KeyCreated)
        }
        Err(e) => refused(e, "/admin/keys", f.admin.layout("Key refused", "keys")),
    }
}

async fn revoke_key(State(state): State<Arc<AppState>>, Path(id): Path<u64>, f: AdminForm<CsrfField>) -> Response {
    match blocking_work(&state, move |c, _| c.revoke_auth_key(id)).await {
        Ok(true) => done("/admin/keys", Note::Revoked),
        Ok(false) => {
            refused(ControlError::not_found("no such auth key"), "/admin/keys", f.admin.layout("Refused", "keys"))
        }
        Err(e) => refused(e, "/admin/keys", f.admin.layout("Refused", "keys")),
    }
}

// ---- policy and DNS: an editor each, saved only over the version the page was made from

/// An editor's form. `base` is the stored version the page showed (0: none yet); a save over any other
/// is refused, so an old page cannot silently undo a newer change.
#[derive(Deserialize)]
struct EditorForm {
    text: String,
    action: String,
    #[serde(default)]
    base: u64,
}

impl EditorForm {
    /// The text as stored: line ends as the file and the API have them (browsers send a textarea's with
    /// CRLF), refused past the API's limit for this document.
    fn text(&self, limit: usize, what: &str) -> Result<String, ControlError> {
        let text = self.text.replace("\r\n", "\n");
        if text.len() > limit {
            return Err(ControlError::bad(format!("the {what} is larger than {} KiB", limit / 1024)));
        }
        Ok(text)
    }
}

/// Refuses a save over another version than the page's.
fn still_version(current: Option<&crate::StoredPolicy>, base: u64, what: &str) -> Result<(), ControlError> {
    match current {
        Some(c) if c.version != base => Err(ControlError::new(
            ErrorCode::VersionMismatch,
            format!(
                "the {what} changed since this page was made: version {} was saved by {}. Nothing was saved; \
                 reload the page (or Show changes against it) and save again",
                c.version, c.set_by
            ),
        )),
        None if base != 0 => {
            Err(ControlError::new(ErrorCode::VersionMismatch, format!("the {what} changed since this page was made")))
        }
        _ => Ok(()),
    }
}

async fn policy_page(
    state: &Arc<AppState>,
    layout: Layout,
    edit: Option<PolicyEdit>,
    taken_back: Vec<String>,
) -> Response {
    let history = blocking_work(state, |c, _| c.policy_history(HISTORY)).await;
    match history {
        Ok(history) => {
            let page = PolicyPage::new(layout, history, edit, taken_back, state.now());
            let status = page.status();
            (status, render(page)).into_response()
        }
        Err(e) => refused(e, "/admin/machines", layout),
    }
}

async fn policy(State(state): State<Arc<AppState>>, admin: Admin, Query(q): Query<DoneQuery>) -> Response {
    let layout = admin.layout_noted("Policy", "policy", &q.done);
    let taken_back = match lock(&state.console.sessions).take_flash(&admin.cookie) {
        Some(Flash::TakenBack(items)) => items,
        _ => Vec::new(),
    };
    policy_page(&state, layout, None, taken_back).await
}

async fn policy_action(
    State(state): State<Arc<AppState>>,
    Client(client): Client,
    f: AdminForm<EditorForm>,
) -> Response {
    let layout = f.admin.layout("Policy", "policy");
    let (base, action) = (f.form.base, f.form.action.clone());
    let text = match f.form.text(MAX_POLICY_BODY, "policy") {
        Ok(text) => text,
        Err(e) => return refused(e, "/admin/policy", layout),
    };
    let submitted = text.clone();
    let outcome = match action.as_str() {
        "check" => {
            blocking_work(&state, move |c, _| c.check_policy(&text).map(|_| ())).await.map(|()| PolicyOutcome::Checked)
        }
        "diff" => {
            blocking_work(&state, move |c, now| {
                let old = c.stored_policy()?.map(|p| p.text).unwrap_or_else(|| "{}".into());
                let change = c.preview_policy(&text, now)?;
                Ok(PolicyOutcome::Diff { diff: line_diff(&old, &text), change })
            })
            .await
        }
        "save" => {
            let set_by = format!("admin console ({client})");
            let saved = blocking_work(&state, move |c, now| {
                still_version(c.stored_policy()?.as_ref(), base, "policy")?;
                c.set_policy(&text, &set_by, now)
            })
            .await;
            if let Ok(change) = saved {
                state.changed().await;
                tracing::info!(version = change.version, "policy set in the console");
                let taken_back: Vec<String> = change.taken_back().cloned().collect();
                for item in &taken_back {
                    tracing::info!(version = change.version, "the new policy took back {item}");
                }
                lock(&state.console.sessions).set_flash(&f.admin.cookie, Flash::TakenBack(taken_back));
                return done("/admin/policy", Note::PolicySaved);
            }
            saved.map(|_| PolicyOutcome::Checked)
        }
        _ => Err(ControlError::bad("the action is check, diff or save")),
    };
    policy_page(&state, layout, Some(PolicyEdit { text: submitted, base, outcome }), Vec::new()).await
}

async fn dns_page(state: &Arc<AppState>, layout: Layout, edit: Option<DnsEdit>) -> Response {
    let result =
        blocking_work(state, |c, _| Ok((c.stored_dns()?, c.dns().clone(), c.domain().to_string(), c.nodes()?))).await;
    match result {
        Ok((stored, config, domain, nodes)) => {
            let page = DnsPage::new(layout, stored, config, domain, nodes, edit, state.now());
            let status = page.status();
            (status, render(page)).into_response()
        }
        Err(e) => refused(e, "/admin/machines", layout),
    }
}

async fn dns(State(state): State<Arc<AppState>>, admin: Admin, Query(q): Query<DoneQuery>) -> Response {
    let layout = admin.layout_noted("DNS", "dns", &q.done);
    dns_page(&state, layout, None).await
}

async fn dns_action(State(state): State<Arc<AppState>>, Client(client): Client, f: AdminForm<EditorForm>) -> Response {
    let layout = f.admin.layout("DNS", "dns");
    let (base, action) = (f.form.base, f.form.action.clone());
    let text = match f.form.text(MAX_BODY, "DNS settings") {
        Ok(text) => text,
        Err(e) => return refused(e, "/admin/dns", layout),
    };
    let submitted = text.clone();
    let outcome = match action.as_str() {
        "check" => {
            blocking_work(&state, move |c, _| crate::dns::parse(&text, c.domain()).map_err(ControlError::bad)).await
        }
        "save" => {
            let set_by = format!("admin console ({client})");
            let saved = blocking_work(&state, move |c, now| {
                still_version(c.stored_dns()?.as_ref(), base, "DNS settings")?;
                c.set_dns(&text, &set_by, now)
            })
            .await;
            if let Ok(version) = saved {
                state.changed().await;
                tracing::info!(version, "DNS settings set in the console");
                return done("/admin/dns", Note::DnsSaved);
            }
            saved.map(|_| Default::default())
        }
        _ => Err(ControlError::bad("the action is check or save")),
    };
    let edit = DnsEdit { text: submitted, base, outcome: outcome.map(|_| ()).map_err(|e| e.message) };
    dns_page(&state, layout, Some(edit)).await
}

#[derive(Deserialize)]
struct MagicForm {
    on: String,
}

/// Turns MagicDNS on or off by changing that one value in the stored settings, keeping the rest of the text
/// (and its comments) as written.
async fn magic_dns(State(state): State<Arc<AppState>>, Client(client): Client, f: AdminForm<MagicForm>) -> Response {
    let on = f.form.on == "true";
    let set_by = format!("admin console ({client})");
    let result = blocking_work(&state, move |c, now| {
        let text = c.stored_dns()?.map_or_else(|| "{}".to_string(), |s| s.text);
        let text = set_magic_dns(&text, on).map_err(ControlError::bad)?;
        c.set_dns(&text, &set_by, now)
    })
    .await;
    match result {
        Ok(_) => {
            state.changed().await;
            done("/admin/dns", if on { Note::MagicOn } else { Note::MagicOff })
        }
        Err(e) => refused(e, "/admin/dns", f.admin.layout("DNS", "dns")),
    }
}

// ---- users

async fn users(State(state): State<Arc<AppState>>, admin: Admin, Query(q): Query<DoneQuery>) -> Response {
    let layout = admin.layout_noted("Users", "users", &q.done);
    match blocking_work(&state, |c, _| c.list_users()).await {
        Ok(users) => render(UsersPage { layout, users }),
        Err(e) => refused(e, "/admin/machines", layout),
    }
}

#[derive(Deserialize)]
struct UserForm {
    name: String,
}

async fn create_user(State(state): State<Arc<AppState>>, f: AdminForm<UserForm>) -> Response {
    let name = f.form.name.trim().to_string();
    match blocking_work(&state, move |c, now| c.create_user(&name, now)).await {
        Ok(_) => done("/admin/users", Note::UserCreated),
        Err(e) => refused(e, "/admin/users", f.admin.layout("Users", "users")),
    }
}

async fn delete_user(State(state): State<Arc<AppState>>, f: AdminForm<UserForm>) -> Response {
    let name = f.form.name;
    match blocking_work(&state, move |c, _| c.delete_user(&name)).await {
        Ok(()) => done("/admin/users", Note::UserDeleted),
        Err(e) => refused(e, "/admin/users", f.admin.layout("Users", "users")),
    }
}

/// For the `control_api` fuzz target: untrusted bytes as each form the console reads, and as the DNS
/// settings its MagicDNS switch edits. Nothing may panic; the switch keeps valid settings valid, with
/// MagicDNS as asked; a form's `back` never leads off the console.
pub fn fuzz_forms(data: &[u8]) {
    let _ = serde_urlencoded::from_bytes::<CsrfField>(data);
    let _ = serde_urlencoded::from_bytes::<SignIn>(data);
    let _ = serde_urlencoded::from_bytes::<KeyForm>(data);
    if let Ok(form) = serde_urlencoded::from_bytes::<EditorForm>(data) {
        let text = form.text(MAX_BODY, "settings").unwrap_or_default();
        assert!(!text.contains("\r\n") && text.len() <= MAX_BODY);
    }
    let _ = serde_urlencoded::from_bytes::<NamedForm>(data);
    if let Ok(form) = serde_urlencoded::from_bytes::<RouteForm>(data) {
        let back = back_path(&form.back);
        assert!(back.starts_with("/admin/") && !back.contains("//"), "{back:?}");
        let _ = form.prefix.parse::<ipnet::IpNet>();
        let _ = parse_expiry(&form.action);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = pages::error_line(text);
        let valid = crate::dns::parse(text, "mesh.example").is_ok();
        for on in [true, false] {
            match set_magic_dns(text, on) {
                Ok(edited) if valid => {
                    let config = crate::dns::parse(&edited, "mesh.example").expect("still valid settings");
                    assert_eq!(config.magic_dns, on);
                }
                Ok(_) => {}
                Err(_) => assert!(!valid, "valid settings refused by the switch"),
            }
        }
    }
}

#[cfg(test)]
mod tests;
