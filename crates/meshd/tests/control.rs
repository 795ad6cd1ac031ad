//! The coordination server as operators run it: HTTPS with a certificate from a CA the test makes, the admin
//! token file, an auth key created and used over the API, state kept across a restart; plain HTTP only when
//! asked for. Everything runs inside a namespace the test creates.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::MESHD;
use mesh_netns::{Lab, stdout};

mod common;

fn make_certificates(lab: &Lab) {
    mesh_netns::make_certificates(lab, "127.0.0.1");
}

fn serve(lab: &mut Lab, ns: usize, name: &str, extra: &[&str]) -> usize {
    let data = lab.path("control-data");
    let mut args = vec!["control", "serve", "--listen", "127.0.0.1:8443", "--data-dir", data.to_str().unwrap()];
    args.extend_from_slice(extra);
    // At debug, where request bodies and headers would slip out if anything logged them.
    let p = lab.spawn(ns, name, MESHD, &args, &[("MESHD_LOG", "debug")]);
    common::managed::wait_for_server(lab, p);
    p
}

fn curl(lab: &Lab, ns: usize, args: &[&str]) -> (bool, String) {
    let mut all = vec!["-sS", "--max-time", "5", "-H", "content-type: application/json"];
    all.extend_from_slice(args);
    let out = lab.ns(ns).exec("curl", &all);
    (out.status.success(), format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr)))
}

/// The cell in column `name` of the row whose first cell is `id`, in a table a `list` verb printed.
fn column(table: &str, id: &str, name: &str) -> String {
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().expect("a header").split_whitespace().collect();
    let at = header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("no column {name}: {table}"));
    let row = lines.find(|l| l.split_whitespace().next() == Some(id)).unwrap_or_else(|| panic!("no row {id}: {table}"));
    row.split_whitespace().nth(at).unwrap_or_else(|| panic!("row {id} has no {name}: {table}")).to_string()
}

#[test]
fn the_server_speaks_https_keeps_its_state_and_its_admin_token_is_private() {
    let mut lab = Lab::new("ctl");
    let ns = lab.netns("cs");
    make_certificates(&lab);
    let (cert, key, ca) = (lab.path("server.pem"), lab.path("server.key"), lab.path("ca.pem"));
    let tls = ["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    let server = serve(&mut lab, ns, "control", &tls);

    let token_file = lab.path("control-data").join("admin-token");
    assert_eq!(std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777, 0o600);
    let token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
    let bearer = format!("authorization: Bearer {token}");
    let ca = ca.to_str().unwrap();
    let base = "https://127.0.0.1:8443/api/v1";

    let (ok, created) = curl(
        &lab,
        ns,
        &["--cacert", ca, "-H", &bearer, "-d", r#"{"reusable": true}"#, &format!("{base}/admin/authkeys")],
    );
    assert!(ok, "{created}");
    let auth_key = serde_json::from_str::<serde_json::Value>(&created).unwrap()["key"].as_str().unwrap().to_string();
    assert!(auth_key.starts_with("mkey-"));

    let (ok, text) = curl(&lab, ns, &[&format!("{base}/admin/nodes")]);
    assert!(!ok, "an unknown CA is refused: {text}");

    let (ok, server_key) = curl(&lab, ns, &["--cacert", ca, &format!("{base}/server-key")]);
    assert!(ok, "{server_key}");
    let register = common::managed::signed_registration(&server_key, &auth_key, 1, "router", &[]);
    let (ok, registered) = curl(&lab, ns, &["--cacert", ca, "-d", &register, &format!("{base}/register")]);
    assert!(ok && registered.contains(r#""ipv4":"100.64.0.1""#), "{registered}");
    let credential = serde_json::from_str::<serde_json::Value>(&registered).unwrap()["credential"]
        .as_str()
        .expect("a node credential")
        .to_string();
    // The key (and its hex secret alone), the admin token and the node's credential never reach the log.
    let log = lab.process(server).log_text();
    assert!(log.contains("DEBUG"), "the server logged at debug: {log}");
    let secret = auth_key.rsplit('-').next().unwrap().to_string();
    for (what, value) in
        [("auth key", &auth_key), ("key secret", &secret), ("admin token", &token), ("credential", &credential)]
    {
        assert!(value.len() >= 16 && !log.contains(value.as_str()), "the {what} is in the log");
    }

    // A policy set through the API is state, not a flag.
    let policy = "{ // set over the API\n \"tagOwners\": { \"tag:router\": [\"tag:infra\"] } }";
    let (ok, set) = curl(
        &lab,
        ns,
        &["--cacert", ca, "-H", &bearer, "-X", "PUT", "--data-binary", policy, &format!("{base}/admin/policy")],
    );
    assert!(ok && set.contains(r#""version":1"#), "{set}");

    // A restart keeps the token, the database, the node and the policy.
    lab.process(server).stop(Duration::from_secs(5));
    serve(&mut lab, ns, "control-again", &tls);
    assert_eq!(std::fs::read_to_string(&token_file).unwrap().trim(), token);
    let (ok, nodes) = curl(&lab, ns, &["--cacert", ca, "-H", &bearer, &format!("{base}/admin/nodes")]);
    assert!(ok && nodes.contains(r#""name":"router""#), "{nodes}");
    let (ok, kept) = curl(&lab, ns, &["--cacert", ca, "-H", &bearer, &format!("{base}/admin/policy")]);
    assert!(ok && kept.contains("set over the API"), "the policy survived the restart: {kept}");
}

#[test]
fn plain_http_only_when_asked_for_and_loudly() {
    let mut lab = Lab::new("cth");
    let ns = lab.netns("ch");
    let data = lab.path("control-data");
    // In the test's namespace and under a timeout: were the refusal broken, a server would start, and it
    // must neither listen on the host nor hang the suite.
    let refused = lab.ns(ns).exec("timeout", &["10", MESHD, "control", "serve", "--data-dir", data.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(2));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.lines().count() == 1 && err.contains("--insecure-http") && err.contains("--tls-cert"), "{err}");

    let server = serve(&mut lab, ns, "control-http", &["--insecure-http"]);
    assert!(lab.process(server).log_text().contains("plain HTTP"), "the warning is logged");
    let (ok, text) = curl(&lab, ns, &["http://127.0.0.1:8443/api/v1/admin/nodes"]);
    assert!(ok && text.contains("unauthorized"), "{text}");
}

#[test]
fn the_admin_verbs_manage_keys_nodes_routes_and_policy() {
    let mut lab = Lab::new("cta");
    let ns = lab.netns("ca");
    make_certificates(&lab);
    let (cert, key, ca) = (lab.path("server.pem"), lab.path("server.key"), lab.path("ca.pem"));
    serve(&mut lab, ns, "control", &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    let token = format!("file:{}", lab.path("control-data").join("admin-token").display());
    let ca = ca.to_str().unwrap().to_string();
    let meshd = |args: &[&str]| {
        let mut all: Vec<&str> = vec!["control"];
        all.extend_from_slice(args);
        all.extend(["--control-url", "https://127.0.0.1:8443", "--admin-token", &token, "--ca-cert", &ca]);
        let out = lab.ns(ns).exec(MESHD, &all);
        (out.status.code(), stdout(&out).trim().to_string(), String::from_utf8_lossy(&out.stderr).trim().to_string())
    };

    let (status, auth_key, _) = meshd(&["authkey", "create", "--reusable", "--tags", "tag:router", "--expiry", "90d"]);
    assert_eq!(status, Some(0));
    assert!(auth_key.starts_with("mkey-") && !auth_key.contains('\n'), "only the key: {auth_key}");
    let server_key = curl(&lab, ns, &["--cacert", &ca, "https://127.0.0.1:8443/api/v1/server-key"]).1;
    let register = |key: &str, node: u8, name: &str| {
        let body = common::managed::signed_registration(&server_key, key, node, name, &["10.0.0.0/16"]);
        curl(&lab, ns, &["--cacert", &ca, "-d", &body, "https://127.0.0.1:8443/api/v1/register"]).1
    };
    assert!(register(&auth_key, 1, "router-a").contains("100.64.0.1"));

    let (_, routes, _) = meshd(&["routes", "list"]);
    assert!(routes.contains("10.0.0.0/16") && routes.contains("router-a") && routes.contains("false"), "{routes}");
    // By name, as operators know their machines (an id works too).
    assert_eq!(meshd(&["routes", "approve", "router-a", "10.0.0.0/16"]).0, Some(0));
    assert!(meshd(&["routes", "list"]).1.lines().nth(1).unwrap().contains("true"));
    assert!(meshd(&["nodes", "list"]).1.contains("tag:router"));
    let (status, _, err) = meshd(&["routes", "approve", "7", "10.0.0.0/16"]);
    assert_eq!(status, Some(1));
    assert!(err.starts_with("meshd: no node is named \"7\""), "{err}");
    let (status, _, err) = meshd(&["routes", "approve", "router-a", "10.9.0.0/16"]);
    assert_eq!(status, Some(1));
    assert_eq!(err, "meshd: router-a does not advertise 10.9.0.0/16");

    let revoked = || column(&meshd(&["authkey", "list"]).1, "1", "REVOKED");
    assert_eq!(revoked(), "false");
    assert_eq!(meshd(&["authkey", "revoke", "1"]).0, Some(0));
    assert!(register(&auth_key, 2, "router-b").contains("auth_key_revoked"));
    assert_eq!(revoked(), "true", "listed as revoked");

    // Users own their untagged nodes.
    assert_eq!(meshd(&["users", "create", "alice@example.com"]).0, Some(0));
    let (status, alice_key, err) = meshd(&["authkey", "create", "--user", "alice@example.com"]);
    assert_eq!(status, Some(0), "{err}");
    assert!(register(&alice_key, 3, "laptop").contains("100.64.0.2"));
    let nodes = meshd(&["nodes", "list"]).1;
    assert_eq!(column(&nodes, "2", "OWNER"), "alice@example.com", "{nodes}");
    assert!(meshd(&["users", "list"]).1.lines().any(|l| l.contains("alice@example.com") && l.ends_with('1')));
    let (status, _, err) = meshd(&["users", "delete", "alice@example.com"]);
    assert_eq!(status, Some(1));
    assert!(err.contains("owns 1 node(s)"), "{err}");
    let (status, _, err) = meshd(&["authkey", "create", "--user", "bob"]);
    assert_eq!(status, Some(1));
    assert!(err.contains("no user is named \"bob\""), "{err}");

    let bad = lab.write("bad-policy.hujson", r#"{"tagOwners": {"router": ["tag:x"]}}"#);
    let (status, _, err) = meshd(&["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(status, Some(1));
    assert!(err.contains("is not a tag"), "{err}");
    let good =
        lab.write("policy.hujson", "{ // comments are fine\n \"tagOwners\": { \"tag:router\": [\"tag:infra\"], },\n}");
    assert_eq!(meshd(&["policy", "set", good.to_str().unwrap()]).0, Some(0));
    assert!(meshd(&["policy", "get"]).1.contains("comments are fine"));

    // Bad input and unreachable servers are one line each.
    let out = lab.ns(ns).exec(MESHD, &["control", "nodes", "list"]);
    assert_eq!(out.status.code(), Some(2));
    let wrong = lab.ns(ns).exec(
        MESHD,
        &[
            "control",
            "nodes",
            "list",
            "--control-url",
            "https://127.0.0.1:8443",
            "--ca-cert",
            &ca,
            "--admin-token",
            "nope",
        ],
    );
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("admin token"));
    let away = lab
        .ns(ns)
        .exec(MESHD, &["control", "nodes", "list", "--control-url", "https://127.0.0.1:9", "--admin-token", "x"]);
    assert_eq!(away.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&away.stderr).contains("cannot reach the coordination server"));
}

/// Regression: an `accept()` error (here EMFILE, a descriptor table filled by idle connections) used to end
/// `meshd control serve`. Now it is logged and survived, and the server answers once the flood is gone.
#[test]
fn a_flood_of_idle_connections_past_the_descriptor_limit_does_not_end_the_server() {
    let mut lab = Lab::new("ctf");
    let ns = lab.netns("cs");
    let data = lab.path("control-data");
    let args = [
        "--nofile=64:64",
        MESHD,
        "control",
        "serve",
        "--listen",
        "127.0.0.1:8443",
        "--insecure-http",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let server = lab.spawn(ns, "control", "prlimit", &args, &[]);
    common::managed::wait_for_server(&mut lab, server);
    // 150 connections held open for 3 s by one shell (bash opens each with /dev/tcp): past 64 descriptors,
    // within what the listen backlog queues while the server cannot accept.
    let flood = "for i in $(seq 150); do exec {fd}<>/dev/tcp/127.0.0.1/8443 || exit 1; done; sleep 3";
    let out = lab.ns(ns).exec("timeout", &["20", "bash", "-c", flood]);
    assert!(out.status.success(), "the flood connected (the backlog takes what the server cannot): {out:?}");
    assert!(lab.process(server).running(), "the server survived:\n{}", lab.process(server).log_text());
    let (ok, text) = curl(&lab, ns, &["http://127.0.0.1:8443/api/v1/server-key"]);
    assert!(ok && text.contains("public_key"), "it answers after the flood: {text}");
    assert!(lab.process(server).log_text().contains("accepting a connection failed; still serving"));
}

/// Every line a daemon logs with `--log-format json` (or `MESHD_LOG_FORMAT=json`) is one JSON object with the
/// time, the level, the message and the event's fields at the top level; `text` is a node's credential,
/// an auth key and the admin token, none of which may appear.
fn assert_json_log(log: &str, secrets: &[&str]) -> Vec<serde_json::Value> {
    let events: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object: {l:?}: {e}")))
        .collect();
    for event in &events {
        assert!(event["timestamp"].is_string() && event["level"].is_string(), "{event}");
        assert!(event["message"].is_string(), "{event}");
    }
    for secret in secrets {
        assert!(!log.contains(secret), "a secret in the log");
    }
    events
}

#[test]
fn json_logs_are_one_object_a_line_for_both_daemons_and_hold_no_secret() {
    let mut lab = Lab::new("ctj");
    let ns = lab.netns("cj");
    let server = serve(&mut lab, ns, "control-json", &["--insecure-http", "--log-format", "json"]);
    let token = std::fs::read_to_string(lab.path("control-data").join("admin-token")).unwrap().trim().to_string();
    let auth = format!("authorization: Bearer {token}");
    let (ok, created) =
        curl(&lab, ns, &["-H", &auth, "-d", "{\"reusable\": true}", "http://127.0.0.1:8443/api/v1/admin/authkeys"]);
    assert!(ok, "{created}");
    let key = serde_json::from_str::<serde_json::Value>(&created).unwrap()["key"].as_str().unwrap().to_string();
    let node = common::managed::Node::start_with_env(&mut lab, ns, "json", &[("MESHD_LOG_FORMAT", "json")]);
    let (status, _, err) = node.cli(
        &lab,
        &[
            "up",
            "--control-url",
            "http://127.0.0.1:8443",
            "--insecure-http",
            "--auth-key",
            &key,
            "--hostname",
            "json",
            "--timeout",
            "20s",
        ],
    );
    assert_eq!(status, Some(0), "{err}");

    let events = assert_json_log(&lab.process(server).log_text(), &[&token, &key]);
    let listening = events.iter().find(|e| e["message"] == "coordination server listening").expect("the start event");
    assert_eq!(listening["url"], "http://127.0.0.1:8443", "fields at the top level: {listening}");
    let credential = std::fs::read_to_string(lab.path("json-state").join("identity.json")).unwrap_or_default();
    let credential = serde_json::from_str::<serde_json::Value>(&credential)
        .ok()
        .and_then(|v| v["credential"].as_str().map(String::from))
        .unwrap_or_default();
    assert!(credential.len() > 16, "the node's credential was read");
    let node_events = assert_json_log(&lab.process(node.process).log_text(), &[&token, &key, &credential]);
    assert!(node_events.iter().any(|e| e["message"] == "meshd is up"), "the node logged in JSON too");
}
