//! The console through its router, as a browser would use it (cookies, forms, redirects); the same flows in
//! a real browser against a real server are in meshd's `tests/console.rs`.

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;
use crate::control::Control;
use crate::http::router as full_router;
use crate::policy::Policy;

const TOKEN: &str = "admin-secret";

fn clock() -> u64 {
    1_800_000_000
}

fn app() -> Router {
    let control = Control::in_memory(Policy::default(), "mesh.example").unwrap();
    full_router(AppState::new(control, TOKEN, clock, true))
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn location(&self) -> &str {
        self.headers.get(header::LOCATION).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    fn set_cookies(&self) -> Vec<String> {
        self.headers.get_all(header::SET_COOKIE).iter().map(|v| v.to_str().unwrap().to_string()).collect()
    }

    /// The value a cookie is set to, if this answer sets it.
    fn cookie(&self, name: &str) -> Option<String> {
        self.set_cookies()
            .iter()
            .find_map(|c| c.strip_prefix(&format!("{name}=")).map(|v| v.split(';').next().unwrap().to_string()))
    }

    /// The value of the first hidden `csrf` field on the page.
    fn csrf(&self) -> String {
        let at = self.body.find("name=\"csrf\" value=\"").expect("a form with a CSRF token") + 19;
        self.body[at..at + 64].to_string()
    }
}

async fn send(app: &Router, method: &str, uri: &str, cookies: &str, form: &[(&str, &str)]) -> Answer {
    let mut request = Request::builder().method(method).uri(uri);
    if !cookies.is_empty() {
        request = request.header(header::COOKIE, cookies);
    }
    if method == "POST" {
        request = request.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    }
    let body = serde_urlencoded::to_string(form).unwrap();
    let response = app.clone().oneshot(request.body(Body::from(body)).unwrap()).await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Answer { status, headers, body: String::from_utf8_lossy(&bytes).into_owned() }
}

async fn api(app: &Router, method: &str, uri: &str, body: &str) -> (StatusCode, String) {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// Signs in with the admin token; returns the session cookie header and the session's CSRF token.
async fn sign_in(app: &Router) -> (String, String) {
    let page = send(app, "GET", "/admin/login", "", &[]).await;
    let login = page.cookie(LOGIN_COOKIE).unwrap();
    let cookies = format!("{LOGIN_COOKIE}={login}");
    let answer = send(app, "POST", "/admin/login", &cookies, &[("token", TOKEN), ("csrf", &page.csrf())]).await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.body);
    assert_eq!(answer.location(), "/admin/machines");
    let session = format!("{SESSION_COOKIE}={}", answer.cookie(SESSION_COOKIE).unwrap());
    let machines = send(app, "GET", "/admin/machines", &session, &[]).await;
    assert_eq!(machines.status, StatusCode::OK);
    (session, machines.csrf())
}

#[tokio::test]
async fn pages_need_a_session_and_forms_without_one_are_refused() {
    let app = app();
    for page in ["/admin/machines", "/admin/keys", "/admin/policy", "/admin/dns", "/admin/users", "/admin/machines/1"] {
        let answer = send(&app, "GET", page, "", &[]).await;
        assert_eq!((answer.status, answer.location()), (StatusCode::SEE_OTHER, "/admin/login"), "{page}");
    }
    let answer = send(&app, "POST", "/admin/users", "", &[("name", "mallory"), ("csrf", "x")]).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    let forged = format!("{SESSION_COOKIE}={}", "0".repeat(64));
    let answer = send(&app, "POST", "/admin/users", &forged, &[("name", "mallory")]).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(api(&app, "GET", "/api/v1/admin/users", "").await.1, "[]");
}

#[tokio::test]
async fn the_session_cookie_is_httponly_strict_secure_and_expires() {
    let app = app();
    let page = send(&app, "GET", "/admin/login", "", &[]).await;
    let login = page.cookie(LOGIN_COOKIE).unwrap();
    let cookies = format!("{LOGIN_COOKIE}={login}");
    let answer = send(&app, "POST", "/admin/login", &cookies, &[("token", TOKEN), ("csrf", &page.csrf())]).await;
    let session = answer.set_cookies().into_iter().find(|c| c.starts_with(SESSION_COOKIE)).unwrap();
    for attribute in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/admin", "Max-Age=28800"] {
        assert!(session.split("; ").any(|a| a == attribute), "{attribute} missing from {session}");
    }
    let control = Control::in_memory(Policy::default(), "mesh.example").unwrap();
    let plain = full_router(AppState::new(control, TOKEN, clock, false));
    let page = send(&plain, "GET", "/admin/login", "", &[]).await;
    assert!(!page.set_cookies()[0].contains("Secure"), "plain HTTP: a Secure cookie would never come back");
}

#[tokio::test]
async fn every_state_changing_form_needs_the_sessions_csrf_token() {
    let app = app();
    let (session, csrf) = sign_in(&app).await;
    let (other_session, other_csrf) = sign_in(&app).await;
    assert_ne!(csrf, other_csrf);
    let forms: [(&str, Vec<(&str, &str)>); 6] = [
        ("/admin/users", vec![("name", "mallory")]),
        ("/admin/keys", vec![("reusable", "on")]),
        ("/admin/policy", vec![("text", "{}"), ("action", "save")]),
        ("/admin/dns/magic", vec![("on", "false")]),
        ("/admin/routes", vec![("node", "1"), ("prefix", "10.0.0.0/24"), ("action", "approve")]),
        ("/admin/logout", vec![]),
    ];
    for (path, fields) in &forms {
        for csrf in [None, Some(""), Some(other_csrf.as_str())] {
            let mut form = fields.clone();
            if let Some(token) = csrf {
                form.push(("csrf", token));
            }
            let answer = send(&app, "POST", path, &session, &form).await;
            assert_eq!(answer.status, StatusCode::FORBIDDEN, "{path} with {csrf:?}: {}", answer.body);
        }
    }
    assert_eq!(api(&app, "GET", "/api/v1/admin/users", "").await.1, "[]");
    assert_eq!(api(&app, "GET", "/api/v1/admin/authkeys", "").await.1, "[]");
    assert_eq!(api(&app, "GET", "/api/v1/admin/dns", "").await.1, "{}");
    // Still signed in, both of them; with its own token the form goes through.
    let answer = send(&app, "POST", "/admin/users", &session, &[("name", "alice@example.com"), ("csrf", &csrf)]).await;
    assert_eq!((answer.status, answer.location()), (StatusCode::SEE_OTHER, "/admin/users?done=user-created"));
    assert!(api(&app, "GET", "/api/v1/admin/users", "").await.1.contains("alice@example.com"));
    assert_eq!(send(&app, "GET", "/admin/users", &other_session, &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn sign_in_needs_the_forms_cookie_and_is_limited_per_client() {
    let app = app();
    let page = send(&app, "GET", "/admin/login", "", &[]).await;
    let no_cookie = send(&app, "POST", "/admin/login", "", &[("token", TOKEN), ("csrf", &page.csrf())]).await;
    assert_eq!(no_cookie.status, StatusCode::FORBIDDEN, "a sign-in posted from another site");
    assert!(no_cookie.cookie(SESSION_COOKIE).is_none());
    let cookies = format!("{LOGIN_COOKIE}={}", page.cookie(LOGIN_COOKIE).unwrap());
    let csrf = page.csrf();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses
            .push(send(&app, "POST", "/admin/login", &cookies, &[("token", "guess"), ("csrf", &csrf)]).await.status);
    }
    // The refusal without the form's cookie spent nothing: another site cannot lock the administrator out.
    assert_eq!(statuses, [StatusCode::UNAUTHORIZED; 5]);
    let right = send(&app, "POST", "/admin/login", &cookies, &[("token", TOKEN), ("csrf", &page.csrf())]).await;
    assert_eq!(right.status, StatusCode::TOO_MANY_REQUESTS, "even the right token waits its turn");
}

#[tokio::test]
async fn sign_out_ends_the_session() {
    let app = app();
    let (session, csrf) = sign_in(&app).await;
    let answer = send(&app, "POST", "/admin/logout", &session, &[("csrf", &csrf)]).await;
    assert_eq!((answer.status, answer.location()), (StatusCode::SEE_OTHER, "/admin/login"));
    assert_eq!(send(&app, "GET", "/admin/machines", &session, &[]).await.status, StatusCode::SEE_OTHER);
    let replay = send(&app, "POST", "/admin/users", &session, &[("name", "bob"), ("csrf", &csrf)]).await;
    assert_eq!(replay.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_sign_in_link_works_once() {
    let app = app();
    let (status, text) = api(&app, "POST", "/api/v1/admin/console-link", "").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let link: serde_json::Value = serde_json::from_str(&text).unwrap();
    let path = link["path"].as_str().unwrap();
    assert_eq!(link["expires_in"], 600);
    let page = send(&app, "GET", path, "", &[]).await;
    assert_eq!(page.status, StatusCode::OK);
    let token = path.split("token=").nth(1).unwrap();
    let cookies = format!("{LOGIN_COOKIE}={}", page.cookie(LOGIN_COOKIE).unwrap());
    let first = send(&app, "POST", "/admin/link", &cookies, &[("token", token), ("csrf", &page.csrf())]).await;
    assert_eq!(first.status, StatusCode::SEE_OTHER);
    assert!(first.cookie(SESSION_COOKIE).is_some());
    let again = send(&app, "POST", "/admin/link", &cookies, &[("token", token), ("csrf", &page.csrf())]).await;
    assert_eq!(again.status, StatusCode::UNAUTHORIZED);
    assert!(again.body.contains("used already"));
    let (status, _) = call_without_token(&app, "POST", "/api/v1/admin/console-link").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "only an administrator makes links");
}

async fn call_without_token(app: &Router, method: &str, uri: &str) -> (StatusCode, String) {
    let request = Request::builder().method(method).uri(uri).body(Body::empty()).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    (response.status(), String::new())
}

#[tokio::test]
async fn pages_carry_a_strict_content_security_policy() {
    let app = app();
    let (session, _) = sign_in(&app).await;
    for page in ["/admin/login", "/admin/machines", "/admin/static/console.css", "/admin/nothing-here"] {
        let answer = send(&app, "GET", page, &session, &[]).await;
        let csp = answer.headers.get(header::CONTENT_SECURITY_POLICY).unwrap().to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"), "{page}: {csp}");
        assert_eq!(answer.headers.get(header::CACHE_CONTROL).unwrap(), "no-store");
    }
    assert_eq!(send(&app, "GET", "/admin/nothing-here", &session, &[]).await.status, StatusCode::NOT_FOUND);
    let api_unknown = send(&app, "GET", "/api/v1/nothing-here", "", &[]).await;
    assert_eq!(api_unknown.status, StatusCode::NOT_FOUND);
    assert!(api_unknown.headers.get(header::CONTENT_SECURITY_POLICY).is_none(), "the API keeps its own answers");
}

#[tokio::test]
async fn a_refused_policy_names_its_line_and_saves_nothing_and_a_good_one_is_versioned() {
    let app = app();
    let (session, csrf) = sign_in(&app).await;
    let form = |text: &str, action: &str, base: &str| -> Vec<(String, String)> {
        [("text", text), ("action", action), ("base", base), ("csrf", csrf.as_str())]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let broken = "{\n  \"acls\": [\n    {\"action\": \"accept\" \"src\": [\"*\"], \"dst\": [\"*:*\"]}\n  ]\n}\n";
    let answer = send_owned(&app, "/admin/policy", &session, form(broken, "save", "0")).await;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(answer.body.contains("<a href=\"#line-3\">line 3</a>"), "{}", answer.body);
    assert!(answer.body.contains("id=\"line-3\" class=\"error-line\""));
    assert_eq!(api(&app, "GET", "/api/v1/admin/policy", "").await.1, "{}", "nothing saved");
    let good = "{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}]}\n";
    let diff = send_owned(&app, "/admin/policy", &session, form(good, "diff", "0")).await;
    assert_eq!(diff.status, StatusCode::OK);
    assert!(diff.body.contains("class=\"add\"") && diff.body.contains("class=\"del\""), "{}", diff.body);
    assert_eq!(api(&app, "GET", "/api/v1/admin/policy", "").await.1, "{}", "a diff saves nothing");
    // Browsers send a textarea's lines with CRLF; it is stored as a file or the API would have it.
    let saved = send_owned(&app, "/admin/policy", &session, form(&good.replace('\n', "\r\n"), "save", "0")).await;
    assert_eq!((saved.status, saved.location()), (StatusCode::SEE_OTHER, "/admin/policy?done=policy-saved"));
    let page = send(&app, "GET", saved.location(), &session, &[]).await;
    assert!(page.body.contains("Policy saved as a new version"), "{}", page.body);
    assert!(page.body.contains("admin console (0.0.0.0)"), "the history names the console");
    assert!(page.body.contains("name=\"base\" value=\"1\""));
    assert_eq!(api(&app, "GET", "/api/v1/admin/policy", "").await.1, good);
    // A page made before that save cannot save over it.
    let stale = send_owned(&app, "/admin/policy", &session, form("{}", "save", "0")).await;
    assert_eq!(stale.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(stale.body.contains("changed since this page was made: version 1"), "{}", stale.body);
    assert_eq!(api(&app, "GET", "/api/v1/admin/policy", "").await.1, good);
}

async fn send_owned(app: &Router, uri: &str, cookies: &str, form: Vec<(String, String)>) -> Answer {
    let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    send(app, "POST", uri, cookies, &form).await
}

#[tokio::test]
async fn what_a_page_shows_is_escaped() {
    let app = app();
    let (session, csrf) = sign_in(&app).await;
    let hostile = "</textarea><script>alert(1)</script>";
    let answer =
        send(&app, "POST", "/admin/policy", &session, &[("text", hostile), ("action", "check"), ("csrf", &csrf)]).await;
    assert!(!answer.body.contains("<script>alert"), "{}", answer.body);
    assert!(answer.body.contains("&#60;/textarea&#62;&#60;script&#62;"), "{}", answer.body);
    let answer = send(&app, "GET", "/admin/machines?q=%3Cscript%3E", &session, &[]).await;
    assert!(!answer.body.contains("<script>") && answer.body.contains("&#60;script&#62;"));
    let answer = send(&app, "GET", "/admin/machines?done=%3Cb%3Epay-bitcoin-here", &session, &[]).await;
    assert!(!answer.body.contains("pay-bitcoin-here"), "a note is one of a fixed set, not text from the address");
}

#[tokio::test]
async fn keys_made_in_the_console_are_shown_once_and_routes_approved_there_are_approved() {
    let app = app();
    let (session, csrf) = sign_in(&app).await;
    let form = [("reusable", "on"), ("ephemeral", "on"), ("tags", "tag:connector"), ("expiry", "1d"), ("csrf", &csrf)];
    let made = send(&app, "POST", "/admin/keys", &session, &form).await;
    assert_eq!((made.status, made.location()), (StatusCode::SEE_OTHER, "/admin/keys?done=key-created"));
    let answer = send(&app, "GET", made.location(), &session, &[]).await;
    let marker = "id=\"secret\" readonly value=\"";
    let at = answer.body.find(marker).unwrap() + marker.len();
    let secret: String = answer.body[at..].chars().take_while(|c| *c != '"').collect();
    assert!(secret.starts_with("mkey-") && secret.len() > 40, "{secret}");
    assert!(answer.body.contains("reusable, ephemeral, tags tag:connector, expires in 1 d"));
    let keys = api(&app, "GET", "/api/v1/admin/authkeys", "").await.1;
    assert!(keys.contains("\"tags\":[\"tag:connector\"]") && keys.contains("\"ephemeral\":true"), "{keys}");
    let reload = send(&app, "GET", made.location(), &session, &[]).await;
    assert!(!reload.body.contains(&secret) && !reload.body.contains("Copy it now"), "the secret is shown once");
    let keys = api(&app, "GET", "/api/v1/admin/authkeys", "").await.1;
    assert_eq!(keys.matches("\"id\"").count(), 1, "a reload makes no second key");

    crate::http::tests::register(&app, &secret, 7, &["10.77.0.0/24"]).await;
    let page = send(&app, "GET", "/admin/machines?q=connector", &session, &[]).await;
    assert!(page.body.contains("10.77.0.0/24") && page.body.contains("awaiting approval"), "{}", page.body);
    let approve = |name: &str, back: &str| -> Vec<(String, String)> {
        [("node", "1"), ("name", name), ("prefix", "10.77.0.0/24"), ("action", "approve"), ("back", back)]
            .iter()
            .chain(&[("csrf", csrf.as_str())])
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let other = send_owned(&app, "/admin/routes", &session, approve("node-8", "/admin/machines")).await;
    assert_eq!(other.status, StatusCode::CONFLICT, "a page that showed another machine under this id");
    assert!(api(&app, "GET", "/api/v1/admin/routes", "").await.1.contains("\"approved\":false"));
    let answer = send_owned(&app, "/admin/routes", &session, approve("node-7", "/admin/machines")).await;
    assert_eq!(answer.location(), "/admin/machines?done=approved");
    let routes = api(&app, "GET", "/api/v1/admin/routes", "").await.1;
    assert!(routes.contains("\"approved\":true"), "{routes}");
    for back in ["https://evil.example/", "/admin/../api/v1/admin/nodes", "//evil.example/admin/"] {
        let answer = send_owned(&app, "/admin/routes", &session, approve("node-7", back)).await;
        assert_eq!(answer.location(), "/admin/machines?done=approved", "back only to the console: {back}");
    }
}

#[tokio::test]
async fn deleting_a_machine_is_confirmed_by_its_name() {
    let app = app();
    let (session, csrf) = sign_in(&app).await;
    let (_, key) = api(&app, "POST", "/api/v1/admin/authkeys", "{}").await;
    let key: serde_json::Value = serde_json::from_str(&key).unwrap();
    crate::http::tests::register(&app, key["key"].as_str().unwrap(), 7, &[]).await;
    let confirm = send(&app, "GET", "/admin/machines/1/delete", &session, &[]).await;
    assert!(confirm.body.contains("Delete the machine <strong>node-7</strong>"), "{}", confirm.body);
    let stale = send(&app, "POST", "/admin/machines/1/delete", &session, &[("name", "node-8"), ("csrf", &csrf)]).await;
    assert_eq!(stale.status, StatusCode::CONFLICT, "a machine the administrator did not see named");
    assert!(api(&app, "GET", "/api/v1/admin/nodes", "").await.1.contains("node-7"));
    let answer = send(&app, "POST", "/admin/machines/1/delete", &session, &[("name", "node-7"), ("csrf", &csrf)]).await;
    assert_eq!(answer.location(), "/admin/machines?done=deleted");
    assert_eq!(api(&app, "GET", "/api/v1/admin/nodes", "").await.1, "[]");
}
