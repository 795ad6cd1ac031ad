//! The ACL policy end to end: the real coordination server compiles the seeds' policies, managed nodes
//! enforce them on the kernel's own TCP traffic, and a policy edit cuts what it no longer allows. All hosts
//! share one switch (10.99.0.0/24, server at .1).

use std::time::{Duration, Instant};

use common::managed::{Control, Node, switched_mesh};
use mesh_netns::{Lab, stdout, wait_until};

mod common;

/// Seed 003: worker pods reach the database on 5432 and the cache on 6379, and nothing else.
const SEED_003: &str = r#"{
  "tagOwners": {
    "tag:stackeye-worker": [],
    "tag:stackeye-db": [],
    "tag:stackeye-cache": [],
  },
  "acls": [
    {"action": "accept", "src": ["tag:stackeye-worker"], "dst": ["tag:stackeye-db:5432", "tag:stackeye-cache:6379"]},
  ],
  "tests": [
    {"src": "tag:stackeye-worker", "accept": ["tag:stackeye-db:5432", "tag:stackeye-cache:6379"], "deny": ["tag:stackeye-db:22"]},
  ],
}"#;

fn wait(limit_ms: u64, check: impl FnMut() -> bool) -> bool {
    wait_until(Duration::from_millis(limit_ms), Duration::from_millis(50), check)
}

/// Listens on `addr:port` in `ns`, holding each connection open without sending anything.
fn listen(lab: &mut Lab, ns: usize, addr: &str, port: u16) {
    let spec = format!("TCP-LISTEN:{port},bind={addr},reuseaddr,fork");
    lab.spawn(ns, &format!("listen-{port}"), "socat", &[&spec, "EXEC:sleep 120"], &[]);
    let bound = format!("{addr}:{port}");
    assert!(wait(5000, || stdout(&lab.ns(ns).exec("ss", &["-ltn"])).contains(&bound)), "nothing listens on {bound}");
}

/// Whether a TCP connection from `ns` to `addr:port` is accepted within two seconds.
fn connects(lab: &Lab, ns: usize, addr: &str, port: u16) -> bool {
    let target = format!("TCP:{addr}:{port},connect-timeout=2");
    lab.ns(ns).exec("timeout", &["5", "socat", "-u", "/dev/null", &target]).status.success()
}

fn tagged(control: &Control, lab: &Lab, tag: &str) -> String {
    control.authkey(lab, &["--reusable", "--tags", tag])
}

#[test]
fn seed_003_workers_reach_the_database_and_cache_ports_only_and_a_policy_edit_resets_them() {
    let (mut lab, control, hosts) = switched_mesh("acl", 3, Some(SEED_003));
    let names = ["worker", "db", "cache"];
    let nodes: Vec<Node> = names.iter().zip(&hosts).map(|(n, h)| Node::start(&mut lab, *h, n)).collect();
    let (worker, db, cache) = (&nodes[0], &nodes[1], &nodes[2]);
    let ip_worker = worker.up(&lab, &control, &tagged(&control, &lab, "tag:stackeye-worker"), &[]);
    let ip_db = db.up(&lab, &control, &tagged(&control, &lab, "tag:stackeye-db"), &[]);
    let ip_cache = cache.up(&lab, &control, &tagged(&control, &lab, "tag:stackeye-cache"), &[]);
    for port in [5432, 22] {
        listen(&mut lab, db.ns, &ip_db, port);
    }
    for port in [6379, 22] {
        listen(&mut lab, cache.ns, &ip_cache, port);
    }
    listen(&mut lab, worker.ns, &ip_worker, 8080);

    assert!(wait(8000, || connects(&lab, worker.ns, &ip_db, 5432)), "the worker reaches the database");
    assert!(connects(&lab, worker.ns, &ip_cache, 6379), "and the cache");
    assert!(!connects(&lab, worker.ns, &ip_db, 22), "but not ssh on the database");
    assert!(!connects(&lab, worker.ns, &ip_cache, 22), "nor on the cache");
    assert!(!connects(&lab, db.ns, &ip_worker, 8080), "the database cannot open connections to the worker");
    assert!(lab.ns(worker.ns).ping(&ip_db), "ICMP follows the open port");
    assert!(!lab.ns(db.ns).ping(&ip_worker));
    // The database and the cache may not reach each other, so they do not even see each other.
    let peers = |n: &Node| -> Vec<String> {
        n.status(&lab)["peers"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(peers(db), ["worker"]);
    assert_eq!(peers(worker).len(), 2);
    let status = db.status(&lab);
    assert!(status["acl"]["rules"].as_u64().unwrap() >= 1, "{status}");
    assert!(status["acl"]["dropped"].as_array().unwrap().iter().any(|d| d[0] == "acl_denied"), "{status}");
    let (_, text, _) = db.cli(&lab, &["status"]);
    assert!(text.contains("filter: 1 ACL rule(s)") && text.contains("acl_denied"), "{text}");
    let (_, doctor, _) = db.cli(&lab, &["doctor", "--tun", &db.tun]);
    let denied = format!("denied: proto 6 {ip_worker}:");
    assert!(
        doctor.contains("acl ") && doctor.contains(&denied) && doctor.contains(&format!("{ip_db}:22 acl_denied")),
        "{doctor}"
    );

    let (code, why, err) = control.admin(&lab, &["policy", "explain", "worker", "db:5432"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(why, "worker -> db:5432/tcp: allowed by the rule at policy line 8 (db judges)");
    let (_, why, _) = control.admin(&lab, &["policy", "explain", "worker", "db:22"]);
    assert!(why.ends_with("denied by default: no rule allows it"), "{why}");

    // An open connection from the worker to the database, idle. (bash and cat, not socat: socat reads a
    // reset as an ordinary end of stream.)
    let script = format!("exec 3<>/dev/tcp/{ip_db}/5432; cat <&3");
    let held = lab.spawn(worker.ns, "held", "bash", &["-c", &script], &[]);
    assert!(
        wait(3000, || stdout(&lab.ns(worker.ns).exec("ss", &["-tn", "state", "established"]))
            .contains(&format!("{ip_db}:5432"))),
        "the held connection is established"
    );
    // The edit takes the database away from the worker; its connection is reset, not left to time out.
    let narrower = SEED_003
        .replace("\"tag:stackeye-db:5432\", ", "")
        .replace("\"accept\": [\"tag:stackeye-db:5432\", ", "\"accept\": [")
        .replace("\"deny\": [\"tag:stackeye-db:22\"]", "\"deny\": [\"tag:stackeye-db:5432\"]");
    let file = lab.write("narrower.hujson", &narrower);
    let edited = Instant::now();
    let (code, _, err) = control.admin(&lab, &["policy", "set", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(wait(3000, || !lab.process(held).running()), "the held connection was not reset");
    let cut_after = edited.elapsed();
    lab.process(held).stop(Duration::from_secs(1));
    let log = lab.process(held).log_text();
    assert!(log.contains("Connection reset by peer"), "the connection was reset, not ended: {log}");
    println!("connection reset {cut_after:?} after the policy edit");
    assert!(cut_after < Duration::from_secs(2), "reset after {cut_after:?}");
    assert!(!connects(&lab, worker.ns, &ip_db, 5432), "and new ones are refused");
    assert!(connects(&lab, worker.ns, &ip_cache, 6379), "the cache stays reachable");
    assert!(db.status(&lab)["acl"]["revoked"].as_u64().unwrap() >= 1);

    // A policy whose own tests fail is refused whole; the one in force stays.
    let failing = lab.write(
        "failing.hujson",
        &SEED_003.replace("\"deny\": [\"tag:stackeye-db:22\"]", "\"deny\": [\"tag:stackeye-db:5432\"]"),
    );
    let (code, _, err) = control.admin(&lab, &["policy", "set", failing.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("test failed: tag:stackeye-worker → tag:stackeye-db:5432: expected deny"), "{err}");
}

/// Seed 000: a `tag:dev` server reaches 443 behind the subnet router, which enforces the rule, and not 22.
#[test]
fn seed_000_the_subnet_router_enforces_the_policy_for_the_lan_behind_it() {
    let policy = r#"{
      "tagOwners": {"tag:dev": [], "tag:router": [], "tag:ops": []},
      "autoApprovers": {"routes": {"10.0.0.0/16": ["tag:router"]}},
      "grants": [{"src": ["tag:dev"], "dst": ["10.0.0.0/16"], "ip": ["tcp:443"]}],
    }"#;
    let (mut lab, control, hosts) = switched_mesh("acs", 3, Some(policy));
    let lan = lab.netns("lan");
    lab.link(hosts[1], "10.0.0.1/24", lan, "10.0.0.50/24");
    let nodes: Vec<Node> =
        ["dev", "router", "ops"].iter().zip(&hosts).map(|(n, h)| Node::start(&mut lab, *h, n)).collect();
    let (dev, router, ops) = (&nodes[0], &nodes[1], &nodes[2]);
    router.up(
        &lab,
        &control,
        &tagged(&control, &lab, "tag:router"),
        &["--advertise-routes", "10.0.0.0/16", "--snat-address", "10.0.0.9"],
    );
    dev.up(&lab, &control, &tagged(&control, &lab, "tag:dev"), &["--accept-routes"]);
    ops.up(&lab, &control, &tagged(&control, &lab, "tag:ops"), &["--accept-routes"]);
    for port in [443, 22] {
        listen(&mut lab, lan, "10.0.0.50", port);
    }
    assert!(wait(8000, || connects(&lab, dev.ns, "10.0.0.50", 443)), "dev reaches 443 behind the router");
    assert!(!connects(&lab, dev.ns, "10.0.0.50", 22), "but not 22: the router drops it");
    assert!(router.status(&lab)["acl"]["dropped"].as_array().unwrap().iter().any(|d| d[0] == "acl_denied"));
    // ops has no rule: it does not see the router (nor anyone), so it has no route into the LAN at all.
    assert_eq!(ops.status(&lab)["peers"], serde_json::json!([]));
    assert!(!connects(&lab, ops.ns, "10.0.0.50", 443));
    let (_, why, _) = control.admin(&lab, &["policy", "explain", "dev", "10.0.0.50:443"]);
    assert_eq!(why, "dev -> 10.0.0.50:443/tcp: allowed by the rule at policy line 4 (router judges)");
}

/// `autogroup:self`: each user's own devices reach each other, and nobody else's.
#[test]
fn autogroup_self_lets_a_users_devices_reach_each_other_only() {
    let policy = r#"{"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}]}"#;
    let (lab_, control, hosts) = switched_mesh("acm", 3, Some(policy));
    let mut lab = lab_;
    for user in ["alice@example.com", "bob@example.com"] {
        let (code, _, err) = control.admin(&lab, &["users", "create", user]);
        assert_eq!(code, Some(0), "{err}");
    }
    let alice = control.authkey(&lab, &["--reusable", "--user", "alice@example.com"]);
    let bob = control.authkey(&lab, &["--reusable", "--user", "bob@example.com"]);
    let nodes: Vec<Node> =
        ["laptop", "desktop", "phone"].iter().zip(&hosts).map(|(n, h)| Node::start(&mut lab, *h, n)).collect();
    let laptop = nodes[0].up(&lab, &control, &alice, &[]);
    let desktop = nodes[1].up(&lab, &control, &alice, &[]);
    let phone = nodes[2].up(&lab, &control, &bob, &[]);
    assert!(wait(8000, || lab.ns(nodes[0].ns).ping(&desktop)), "alice's laptop reaches her desktop");
    assert!(lab.ns(nodes[1].ns).ping(&laptop), "and back");
    assert!(!lab.ns(nodes[2].ns).ping(&laptop), "bob's phone does not reach alice's devices");
    assert!(!lab.ns(nodes[0].ns).ping(&phone), "nor the other way");
    assert!(nodes[2].status(&lab)["peers"].as_array().unwrap().is_empty(), "bob sees nobody");
}
