//! Runs the built binary the way a user does.

use std::process::Command;

use mesh_netns::Lab;

fn meshd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshd"))
}

#[test]
fn version_prints_and_exits_zero() {
    let out = meshd().arg("version").output().expect("run meshd");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert!(text.starts_with(&format!("meshd {}", env!("CARGO_PKG_VERSION"))), "{text}");
}

#[test]
fn unknown_verb_is_one_clear_error_with_status_2() {
    let out = meshd().arg("frobnicate").output().expect("run meshd");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).expect("utf-8");
    assert!(err.contains("unrecognized subcommand 'frobnicate'"), "{err}");
}

/// `meshd ARGS` in a namespace of the test's own, under a timeout: these check refusals, and were one
/// broken, the daemon would start and must neither change the host's routes nor hang the suite.
fn refused(lab: &Lab, ns: usize, args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["10", env!("CARGO_BIN_EXE_meshd")];
    all.extend_from_slice(args);
    let out = lab.ns(ns).exec("timeout", &all);
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_malformed_config_is_one_line_naming_file_line_and_field_with_status_2() {
    let mut lab = Lab::new("cli");
    let ns = lab.netns("cl");
    let path = lab.write(
        "wg0.conf",
        "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n\n[Peer]\nPublicKey = nope\n",
    );
    let state = lab.path("state");
    let (status, err) =
        refused(&lab, ns, &["daemon", "--config", path.to_str().unwrap(), "--state-dir", state.to_str().unwrap()]);
    assert_eq!(status, Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with(&format!("meshd: {}:5: PublicKey:", path.display())), "{err}");
    let (status, err) = refused(&lab, ns, &["daemon", "--config", "/nonexistent/meshd.toml"]);
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("/nonexistent/meshd.toml"), "{err}");
}

#[test]
fn snat_without_an_address_names_both_ways_out() {
    let mut lab = Lab::new("clisnat");
    let ns = lab.netns("cs");
    let path =
        lab.write("router.toml", "[interface]\nprivate_key = \"yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\"\n");
    let (config, state) = (path.to_str().unwrap(), lab.path("state"));
    let state = state.to_str().unwrap();
    let (status, err) =
        refused(&lab, ns, &["daemon", "--config", config, "--advertise-routes=10.0.0.0/16", "--state-dir", state]);
    assert_eq!(status, Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--snat-address") && err.contains("--snat-subnet-routes=false"), "{err}");
    // Everything else valid (forwarding on, as a router needs), so only the unknown mode can be refused.
    lab.ns(ns).exec_ok("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    let args = ["daemon", "--config", config, "--state-dir", state, "--snat-subnet-routes=false"];
    let (status, err) = refused(&lab, ns, &[&args[..], &["--advertise-routes=10.0.0.0/16:sometimes"]].concat());
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("10.0.0.0/16:sometimes") && err.contains("not a prefix"), "{err}");
}

/// `policy compile --record` answers a capture record in the record's own shapes, without a server; a
/// refused policy is one line and status 2.
#[test]
fn policy_compile_answers_a_capture_record_in_its_own_shapes() {
    let dir = std::env::temp_dir().join(format!("meshd-record-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let record = |acls: &str| {
        format!(
            r#"{{"id": "t", "policy": {{"tagOwners": {{"tag:worker": [], "tag:db": []}}, "acls": {acls}}},
               "topology": {{"users": [], "nodes": {{
                 "worker": {{"tags": ["tag:worker"], "ipv4": "100.64.0.1", "ipv6": "fd7a:115c:a1e0::1", "routable_ips": [], "approved_routes": []}},
                 "db": {{"tags": ["tag:db"], "ipv4": "100.64.0.2", "ipv6": "fd7a:115c:a1e0::2", "routable_ips": [], "approved_routes": []}}}}}}}}"#
        )
    };
    let good = dir.join("good.json");
    std::fs::write(&good, record(r#"[{"action": "accept", "src": ["tag:worker"], "dst": ["tag:db:5432"]}]"#)).unwrap();
    let out = meshd().args(["control", "policy", "compile", "--record"]).arg(&good).output().expect("run meshd");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let rules = &answer["nodes"]["db"]["rules"];
    assert_eq!(rules[0]["SrcIPs"], serde_json::json!(["100.64.0.1", "fd7a:115c:a1e0::1"]));
    assert_eq!(
        rules[0]["DstPorts"][0],
        serde_json::json!({"IP": "100.64.0.2", "Ports": {"First": 5432, "Last": 5432}})
    );
    assert_eq!(answer["nodes"]["worker"]["rules"], serde_json::json!([]));
    assert_eq!(answer["nodes"]["worker"]["peers"][0]["name"], "db");
    let bad = dir.join("bad.json");
    std::fs::write(&bad, record(r#"[{"action": "deny", "src": ["*"], "dst": ["*:*"]}]"#)).unwrap();
    let out = meshd().args(["control", "policy", "compile", "--record"]).arg(&bad).output().expect("run meshd");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("action=\"deny\" is not supported") && err.lines().count() == 1, "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
