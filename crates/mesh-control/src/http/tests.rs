use std::time::Instant;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use mesh_proto::{NetMap, RegisterResponse, VERSION, proof};
use tower::ServiceExt;

use super::*;
use crate::policy::Policy;

const TOKEN: &str = "admin-secret";

fn clock() -> u64 {
    1_800_000_000
}

fn app() -> Router {
    app_and_state().0
}

fn app_and_state() -> (Router, Arc<AppState>) {
    let control = Control::in_memory(Policy::default(), "mesh.example").unwrap();
    let state = AppState::new(control, TOKEN, clock, true);
    (router(state.clone()), state)
}

/// Waits (at most 5 s) until `n` long polls wait on `state`, so what the test does next happens while they do.
async fn polls_waiting(state: &AppState, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while state.waiting_polls() < n {
        assert!(Instant::now() < deadline, "{} long polls waiting, wanted {n}", state.waiting_polls());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub(crate) async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    auth: Option<&str>,
    body: &str,
) -> (StatusCode, String) {
    let mut request = Request::builder().method(method).uri(uri).header("content-type", "application/json");
    if let Some(a) = auth {
        request = request.header("authorization", a);
    }
    let response = app.clone().oneshot(request.body(Body::from(body.to_string())).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn admin() -> Option<&'static str> {
    Some("Bearer admin-secret")
}

async fn new_key(app: &Router, body: &str) -> String {
    let (status, text) = call(app, "POST", "/api/v1/admin/authkeys", admin(), body).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["key"].as_str().unwrap().to_string()
}

/// A registration as node `node` (private key `[node; 32]`) sends it, signed with `signer`'s private key.
pub(crate) async fn signed_request(app: &Router, key: &str, node: u8, signer: u8, routes: &[&str]) -> String {
    let (_, text) = call(app, "GET", "/api/v1/server-key", None, "").await;
    let server: mesh_proto::ServerKey = serde_json::from_str(&text).unwrap();
    let mut request = RegisterRequest {
        version: VERSION,
        auth_key: key.into(),
        node_key: proof::encode_key(&proof::public_key(&[node; 32])),
        hostname: format!("node-{node}"),
        advertise_routes: routes.iter().map(|r| r.parse().unwrap()).collect(),
        tags: Vec::new(),
        timestamp_ms: clock() * 1000 + u64::from(signer),
        proof: String::new(),
    };
    proof::sign(&mut request, &[signer; 32], &proof::decode_key(&server.public_key).unwrap());
    serde_json::to_string(&request).unwrap()
}

pub(crate) async fn register(app: &Router, key: &str, node: u8, routes: &[&str]) -> RegisterResponse {
    let body = signed_request(app, key, node, node, routes).await;
    let (status, text) = call(app, "POST", "/api/v1/register", None, &body).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn node_auth(r: &RegisterResponse) -> String {
    format!("Node {} {}", r.node_id, r.credential)
}

#[tokio::test]
async fn admin_endpoints_need_the_token_and_never_show_key_secrets() {
    let app = app();
    assert_eq!(call(&app, "GET", "/api/v1/admin/authkeys", None, "").await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&app, "GET", "/api/v1/admin/authkeys", Some("Bearer wrong"), "").await.0, StatusCode::UNAUTHORIZED);
    let key = new_key(&app, r#"{"reusable": true, "tags": ["tag:router"], "expiry": 7776000}"#).await;
    let (_, listed) = call(&app, "GET", "/api/v1/admin/authkeys", admin(), "").await;
    assert!(listed.contains("tag:router") && !listed.contains(&key[key.len() - 20..]), "{listed}");
    assert_eq!(call(&app, "DELETE", "/api/v1/admin/authkeys/1", admin(), "").await.0, StatusCode::NO_CONTENT);
    assert_eq!(call(&app, "DELETE", "/api/v1/admin/authkeys/99", admin(), "").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn registration_errors_have_stable_codes() {
    let app = app();
    let node_key = proof::encode_key(&proof::public_key(&[5; 32]));
    let body =
        serde_json::json!({"version": VERSION, "auth_key": "mkey-nope-nope", "node_key": node_key, "hostname": "h"});
    let (status, text) = call(&app, "POST", "/api/v1/register", None, &body.to_string()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(serde_json::from_str::<ErrorBody>(&text).unwrap().code, ErrorCode::UnknownAuthKey);
    let (status, _) = call(&app, "POST", "/api/v1/register", None, r#"{"version": 1}"#).await;
    assert!(status.is_client_error(), "a malformed body is refused");
}

#[tokio::test]
async fn an_approval_reaches_a_waiting_long_poll_within_a_second() {
    let (app, state) = app_and_state();
    let key = new_key(&app, r#"{"reusable": true}"#).await;
    let router_node = register(&app, &key, 1, &["10.0.0.0/16"]).await;
    let client = register(&app, &key, 2, &[]).await;
    let (status, text) = call(&app, "GET", "/api/v1/netmap?since=0", Some(&node_auth(&client)), "").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let first: NetMap = serde_json::from_str(&text).unwrap();
    assert!(first.peers[0].allowed_ips.iter().all(|p| p.to_string() != "10.0.0.0/16"), "not approved yet");

    // The client waits for the next version; the administrator approves the router's route.
    let poll = {
        let (app, auth, uri) = (app.clone(), node_auth(&client), format!("/api/v1/netmap?since={}", first.version));
        tokio::spawn(async move { call(&app, "GET", &uri, Some(&auth), "").await })
    };
    polls_waiting(&state, 1).await;
    let started = Instant::now();
    let approve = format!(r#"{{"node": {}, "prefix": "10.0.0.0/16"}}"#, router_node.node_id);
    assert_eq!(call(&app, "POST", "/api/v1/admin/routes/approve", admin(), &approve).await.0, StatusCode::NO_CONTENT);
    let (status, text) = tokio::time::timeout(Duration::from_secs(2), poll).await.expect("the poll answered").unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(1), "the change arrived in {:?}", started.elapsed());
    let next: NetMap = serde_json::from_str(&text).unwrap();
    assert!(next.version > first.version);
    assert!(next.peers[0].allowed_ips.iter().any(|p| p.to_string() == "10.0.0.0/16"));

    let (_, routes) = call(&app, "GET", "/api/v1/admin/routes", admin(), "").await;
    assert!(routes.contains(r#""approved":true"#) && routes.contains(r#""primary":true"#), "{routes}");
    let unknown = r#"{"node": 99, "prefix": "10.0.0.0/16"}"#;
    assert_eq!(call(&app, "POST", "/api/v1/admin/routes/approve", admin(), unknown).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_node_needs_its_credential_and_an_expired_one_gets_no_netmap() {
    let app = app();
    let key = new_key(&app, r#"{"reusable": true}"#).await;
    let node = register(&app, &key, 1, &[]).await;
    assert_eq!(call(&app, "GET", "/api/v1/netmap", None, "").await.0, StatusCode::UNAUTHORIZED);
    let wrong = format!("Node {} not-the-credential", node.node_id);
    assert_eq!(call(&app, "GET", "/api/v1/netmap", Some(&wrong), "").await.0, StatusCode::UNAUTHORIZED);
    let (_, nodes) = call(&app, "GET", "/api/v1/admin/nodes", admin(), "").await;
    assert!(nodes.contains(r#""online":true"#), "registering counts as seen: {nodes}");
    let expire = format!("/api/v1/admin/nodes/{}/expire", node.node_id);
    assert_eq!(call(&app, "POST", &expire, admin(), "").await.0, StatusCode::NO_CONTENT);
    let (status, text) = call(&app, "GET", "/api/v1/netmap", Some(&node_auth(&node)), "").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(serde_json::from_str::<ErrorBody>(&text).unwrap().code, ErrorCode::NodeExpired);
}

#[tokio::test]
async fn policies_are_checked_before_they_are_set() {
    let app = app();
    let good = r#"{ // HuJSON
        "tagOwners": { "tag:router": ["tag:infra"], },
    }"#;
    assert_eq!(call(&app, "POST", "/api/v1/admin/policy/check", admin(), good).await.0, StatusCode::NO_CONTENT);
    let (status, text) =
        call(&app, "PUT", "/api/v1/admin/policy", admin(), r#"{"tagOwners": {"router": ["x"]}}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains("is not a tag"), "{text}");
    assert_eq!(
        call(&app, "GET", "/api/v1/admin/policy", admin(), "").await.1,
        "{}",
        "a refused policy changes nothing"
    );
    let (status, set) = call(&app, "PUT", "/api/v1/admin/policy", admin(), good).await;
    assert_eq!(status, StatusCode::OK);
    assert!(set.contains(r#""version":1"#), "{set}");
    assert_eq!(call(&app, "GET", "/api/v1/admin/policy", admin(), "").await.1, good);
}

#[tokio::test]
async fn a_nodes_reported_endpoints_wake_a_peers_long_poll() {
    let (app, state) = app_and_state();
    let key = new_key(&app, r#"{"reusable": true}"#).await;
    let a = register(&app, &key, 1, &[]).await;
    let b = register(&app, &key, 2, &[]).await;
    let (_, text) = call(&app, "GET", "/api/v1/netmap", Some(&node_auth(&b)), "").await;
    let version = serde_json::from_str::<NetMap>(&text).unwrap().version;
    let poll = {
        let app = app.clone();
        let auth = node_auth(&b);
        tokio::spawn(
            async move { call(&app, "GET", &format!("/api/v1/netmap?since={version}"), Some(&auth), "").await },
        )
    };
    let body = format!(r#"{{"version": {VERSION}, "endpoints": ["198.18.0.7:41641"]}}"#);
    assert_eq!(call(&app, "POST", "/api/v1/endpoints", None, &body).await.0, StatusCode::UNAUTHORIZED);
    polls_waiting(&state, 1).await;
    assert_eq!(call(&app, "POST", "/api/v1/endpoints", Some(&node_auth(&a)), &body).await.0, StatusCode::NO_CONTENT);
    // Far inside the server's 25 s long poll, so an answer here was woken by the report.
    let (status, text) = tokio::time::timeout(Duration::from_secs(5), poll).await.expect("the poll was woken").unwrap();
    assert_eq!(status, StatusCode::OK);
    let map: NetMap = serde_json::from_str(&text).unwrap();
    assert!(map.version > version);
    assert_eq!(map.peers[0].endpoints, vec!["198.18.0.7:41641".parse().unwrap()]);
    let loopback = format!(r#"{{"version": {VERSION}, "endpoints": ["127.0.0.1:41641"]}}"#);
    let (status, text) = call(&app, "POST", "/api/v1/endpoints", Some(&node_auth(&a)), &loopback).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
}

#[tokio::test]
async fn a_node_changes_its_routes_and_logs_itself_out() {
    let app = app();
    let key = new_key(&app, r#"{"reusable": true}"#).await;
    let router = register(&app, &key, 1, &["10.1.0.0/16"]).await;
    let client = register(&app, &key, 2, &[]).await;
    let approve = r#"{"node": 1, "prefix": "10.1.0.0/16"}"#;
    assert_eq!(call(&app, "POST", "/api/v1/admin/routes/approve", admin(), approve).await.0, StatusCode::NO_CONTENT);

    let update = r#"{"version": 1, "advertise_routes": ["10.1.0.0/16", "10.2.0.0/16"]}"#;
    let auth = node_auth(&router);
    assert_eq!(call(&app, "POST", "/api/v1/routes", None, update).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&app, "POST", "/api/v1/routes", Some(&auth), update).await.0, StatusCode::NO_CONTENT);
    let (_, routes) = call(&app, "GET", "/api/v1/admin/routes", admin(), "").await;
    let routes: serde_json::Value = serde_json::from_str(&routes).unwrap();
    let approved: Vec<(String, bool)> = routes
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["prefix"].as_str().unwrap().to_string(), r["approved"].as_bool().unwrap()))
        .collect();
    assert_eq!(approved, [("10.1.0.0/16".to_string(), true), ("10.2.0.0/16".to_string(), false)], "kept approval");

    assert_eq!(call(&app, "POST", "/api/v1/logout", Some(&auth), "").await.0, StatusCode::NO_CONTENT);
    let (_, map) = call(&app, "GET", "/api/v1/netmap?since=0", Some(&node_auth(&client)), "").await;
    let map: NetMap = serde_json::from_str(&map).unwrap();
    assert!(map.peers.is_empty(), "the logged-out node left every netmap");
    assert_eq!(call(&app, "POST", "/api/v1/routes", Some(&auth), update).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn node_takeover_with_a_valid_auth_key_and_the_victims_public_key_is_refused() {
    let (app, _) = app_and_state();
    let key = new_key(&app, r#"{"reusable": true}"#).await;
    let victim = register(&app, &key, 1, &["10.0.0.0/16"]).await;
    // The attacker holds a valid reusable key and the victim's public key (every netmap lists it), and signs
    // with its own private key: the server cannot be made to hand out the victim's credential.
    let forged = signed_request(&app, &key, 1, 66, &["10.66.0.0/16"]).await;
    let (status, text) = call(&app, "POST", "/api/v1/register", None, &forged).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    assert_eq!(serde_json::from_str::<ErrorBody>(&text).unwrap().code, ErrorCode::BadProof);
    let mut unsigned: serde_json::Value = serde_json::from_str(&forged).unwrap();
    unsigned["proof"] = "".into();
    let (status, _) = call(&app, "POST", "/api/v1/register", None, &unsigned.to_string()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // A recorded registration of the victim's own, replayed, is spent.
    let genuine = signed_request(&app, &key, 1, 1, &["10.0.0.0/16"]).await;
    let (status, text) = call(&app, "POST", "/api/v1/register", None, &genuine).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");

    // The victim keeps working with its credential, its routes untouched.
    let (status, text) = call(&app, "GET", "/api/v1/netmap?since=0", Some(&node_auth(&victim)), "").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let map: NetMap = serde_json::from_str(&text).unwrap();
    assert_eq!(map.routes.iter().map(|r| r.prefix.to_string()).collect::<Vec<_>>(), ["10.0.0.0/16"]);
}

#[tokio::test]
async fn a_used_single_use_key_never_re_registers_a_node() {
    let app = app();
    let single = new_key(&app, "{}").await;
    let first = register(&app, &single, 1, &[]).await;
    let again = signed_request(&app, &single, 1, 1, &[]).await;
    let (status, text) = call(&app, "POST", "/api/v1/register", None, &again).await;
    assert_eq!(
        (status, serde_json::from_str::<ErrorBody>(&text).unwrap().code),
        (StatusCode::FORBIDDEN, ErrorCode::AuthKeyUsed)
    );
    let (status, _) = call(&app, "GET", "/api/v1/netmap?since=0", Some(&node_auth(&first)), "").await;
    assert_eq!(status, StatusCode::OK, "the first credential still works");
}

#[tokio::test]
async fn metrics_count_requests_by_route_template_and_nodes_by_state() {
    let (app, state) = app_and_state();
    let key = new_key(&app, r#"{"reusable": true}"#).await;
    let node = register(&app, &key, 1, &[]).await;
    register(&app, &key, 2, &[]).await;
    let (status, _) = call(&app, "GET", "/api/v1/netmap?since=0", Some(&node_auth(&node)), "").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(&app, "DELETE", "/api/v1/admin/nodes/node-2", admin(), "").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(&app, "GET", "/api/v1/admin/nodes", None, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let text = crate::metrics::render(&state).await.unwrap();
    for line in [
        "meshd_control_nodes{state=\"online\"} 1",
        "meshd_control_nodes{state=\"offline\"} 0",
        "meshd_control_http_request_duration_seconds_count{route=\"/api/v1/register\",method=\"POST\",status=\"2xx\"} 2",
        "meshd_control_http_request_duration_seconds_count{route=\"/api/v1/admin/nodes/{id}\",method=\"DELETE\",status=\"2xx\"} 1",
        "meshd_control_http_request_duration_seconds_count{route=\"/api/v1/admin/nodes\",method=\"GET\",status=\"4xx\"} 1",
        "meshd_control_netmap_build_seconds_count 1",
        "meshd_control_long_polls 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    assert!(!text.contains("node-2"), "a node's name never becomes a label");
    assert!(text.ends_with("# EOF\n"));
}
