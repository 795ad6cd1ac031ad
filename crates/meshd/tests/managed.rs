//! Managed nodes end to end: the coordination server in its own namespace with HTTPS from a test CA, nodes
//! joining with `meshd up`, netmaps, route approval by hand and by autoApprovers, auth-key errors, and a
//! data plane that outlives the control plane. All hosts share one switch (10.99.0.0/24, server at .1).

use std::time::Duration;

use common::managed::{Control, Node};
use mesh_netns::{Lab, wait_until};

mod common;

const POLICY: &str = r#"{
  // Routers tagged by their auth key get their routes inside 10.77.0.0/16 approved at once.
  "tagOwners": { "tag:router": ["tag:router"] },
  "autoApprovers": { "routes": { "10.77.0.0/16": ["tag:router"] } },
}"#;

/// A switch with the server and `n` node namespaces at 10.99.0.2.. .
fn mesh(name: &str, n: usize) -> (Lab, Control, Vec<usize>) {
    common::managed::switched_mesh(name, n, Some(POLICY))
}

fn wait(limit_ms: u64, check: impl FnMut() -> bool) -> bool {
    wait_until(Duration::from_millis(limit_ms), Duration::from_millis(50), check)
}

#[test]
fn three_nodes_join_ping_each_other_and_routes_wait_for_approval() {
    let (mut lab, control, hosts) = mesh("mgd", 3);
    let key = control.authkey(&lab, &["--reusable"]);
    // b routes for a LAN with one server at 10.88.0.50 and advertises it without SNAT; a and c accept routes.
    let lan = lab.netns("lan");
    lab.link(hosts[1], "10.88.0.1/24", lan, "10.88.0.50/24");
    lab.ns(lan).ip(&["route", "add", "100.64.0.0/10", "via", "10.88.0.1"]);
    let nodes: Vec<Node> = ["a", "b", "c"].iter().zip(&hosts).map(|(n, h)| Node::start(&mut lab, *h, n)).collect();
    let ip_a = nodes[0].up(&lab, &control, &key, &["--accept-routes"]);
    let ip_b = nodes[1].up(&lab, &control, &key, &["--advertise-routes", "10.88.0.0/24", "--snat-subnet-routes=false"]);
    let ip_c = nodes[2].up(&lab, &control, &key, &["--accept-routes"]);
    let ips = [ip_a.clone(), ip_b.clone(), ip_c.clone()];
    assert_eq!(ips, ["100.64.0.1", "100.64.0.2", "100.64.0.3"]);
    assert_eq!(nodes[1].cli(&lab, &["ip"]).1.lines().next(), Some("100.64.0.2"));

    // Every pair, both ways, within seconds of the last join.
    for (i, node) in nodes.iter().enumerate() {
        for (j, ip) in ips.iter().enumerate() {
            if i != j {
                assert!(wait(5000, || lab.ns(node.ns).ping(ip)), "{} cannot ping {ip}", node.name);
            }
        }
    }
    let (status, pong, err) = nodes[0].cli(&lab, &["ping", "c"]);
    assert_eq!(status, Some(0), "{err}");
    assert!(pong.starts_with("pong from c (100.64.0.3) through the tunnel in"), "{pong}");

    let status_a = nodes[0].status(&lab);
    assert_eq!(status_a["state"], "running");
    assert_eq!(status_a["node"]["name"], "a");
    let peers = status_a["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2);
    let c = peers.iter().find(|p| p["name"] == "c").unwrap();
    assert_eq!(c["endpoint"], "10.99.0.4:41641", "the address facing the server came first");
    assert!(c["last_handshake_secs"].as_u64().unwrap() < 60 && c["rx_bytes"].as_u64().unwrap() > 0, "{c}");
    assert_eq!(c["online"], true);
    assert!(nodes[0].cli(&lab, &["status"]).1.contains("100.64.0.3"), "the text status names the peers");

    // Advertised, not approved: in no peer's table, unreachable, shown as waiting. b advertised it when it
    // registered, so every netmap that lists b (the pings above needed one) already held the route.
    let (_, listed, _) = control.admin(&lab, &["routes", "list"]);
    assert!(listed.lines().any(|l| l.contains("10.88.0.0/24") && l.contains("false")), "{listed}");
    assert!(!nodes[0].table52(&lab).contains("10.88.0.0/24"), "{}", nodes[0].table52(&lab));
    assert!(!lab.ns(hosts[0]).ping("10.88.0.50"), "an unapproved route is unreachable");
    let routes_b = &nodes[1].status(&lab)["node"]["routes"];
    assert_eq!(routes_b[0]["approved"], false, "{routes_b}");

    let (status, _, err) = control.admin(&lab, &["routes", "approve", "2", "10.88.0.0/24"]);
    assert_eq!(status, Some(0), "{err}");
    for node in [&nodes[0], &nodes[2]] {
        assert!(
            wait(2000, || node.table52(&lab).contains("10.88.0.0/24 dev")),
            "{} did not install the approved route within 2 s: {}",
            node.name,
            node.table52(&lab)
        );
    }
    assert!(wait(3000, || lab.ns(hosts[0]).ping("10.88.0.50")), "the approved route carries traffic");
    let rules = mesh_netns::stdout(&lab.ns(hosts[0]).ip(&["rule", "list"]));
    assert!(rules.contains("5270:") && rules.contains("lookup 52"), "{rules}");

    // set changes only what it names: c stops accepting routes, keeps everything else.
    assert_eq!(nodes[2].cli(&lab, &["set", "--accept-routes=false"]).0, Some(0));
    assert!(wait(2000, || !nodes[2].table52(&lab).contains("10.88.0.0/24")), "{}", nodes[2].table52(&lab));
    assert!(lab.ns(hosts[2]).ping(&ip_a), "c is still in the mesh");

    // autoApprovers: a tag:router node's route in 10.77.0.0/16 is approved without an administrator.
    let router_key = control.authkey(&lab, &["--tags", "tag:router"]);
    let host_d = lab.netns("n3");
    let hub = control.ns;
    lab.switch(hub, "10.99.1.1/24", &[(host_d, "10.99.1.2/24")]);
    lab.ns(host_d).ip(&["route", "add", "10.99.0.0/24", "via", "10.99.1.1"]);
    for h in &hosts {
        lab.ns(*h).ip(&["route", "add", "10.99.1.0/24", "via", "10.99.0.1"]);
    }
    lab.ns(hub).exec_ok("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    let d = Node::start(&mut lab, host_d, "d");
    d.up(&lab, &control, &router_key, &["--advertise-routes", "10.77.1.0/24", "--snat-subnet-routes=false"]);
    assert_eq!(d.status(&lab)["node"]["routes"][0]["approved"], true);
    assert!(wait(2000, || nodes[0].table52(&lab).contains("10.77.1.0/24 dev")), "{}", nodes[0].table52(&lab));

    // A new address on c's host reaches the server as an endpoint without anyone running up again
    // (a DHCP renewal or roaming does this).
    let lan_c = mesh_netns::stdout(&lab.ns(hosts[2]).ip(&["-o", "-4", "addr", "show"]));
    let interface = lan_c.lines().find(|l| l.contains("10.99.0.4/")).and_then(|l| l.split_whitespace().nth(1)).unwrap();
    lab.ns(hosts[2]).ip(&["addr", "add", "10.99.0.104/24", "dev", interface]);
    assert!(
        wait(5000, || control.admin(&lab, &["nodes", "list"]).1.lines().any(|l| l.contains("10.99.0.104:41641"))),
        "{}",
        control.admin(&lab, &["nodes", "list"]).1
    );

    // down keeps the identity: the next up needs no key and gets the same address.
    assert_eq!(nodes[2].cli(&lab, &["down"]).0, Some(0));
    assert_eq!(nodes[2].status(&lab)["state"], "stopped");
    assert!(!lab.ns(hosts[0]).ping(&ip_c), "c left the mesh");
    let (status, again, err) = nodes[2].cli(&lab, &["up", "--timeout", "20s"]);
    assert_eq!((status, again.as_str()), (Some(0), ip_c.as_str()), "{err}");

    // logout deregisters: the node is gone from the server and from its peers.
    assert_eq!(nodes[2].cli(&lab, &["logout"]).0, Some(0));
    let (_, listed, _) = control.admin(&lab, &["nodes", "list"]);
    assert!(!listed.lines().any(|l| l.contains(" c ")), "{listed}");
    assert!(wait(2000, || nodes[0].status(&lab)["peers"].as_array().unwrap().len() == 2), "a dropped c");
}

#[test]
fn refused_keys_and_an_unreachable_server_are_one_clear_line() {
    let (mut lab, control, hosts) = mesh("mgk", 1);
    let node = Node::start(&mut lab, hosts[0], "a");
    let up = |key: &str, url: &str| {
        let args = ["up", "--control-url", url, "--ca-cert", &control.ca, "--auth-key", key, "--timeout", "3s"];
        node.cli(&lab, &args)
    };
    let check = |(status, out, err): (Option<i32>, String, String), wanted: &str| {
        assert_eq!(status, Some(1), "{err}");
        assert!(out.is_empty() && err.lines().count() == 1 && err.contains(wanted), "wanted {wanted:?}: {err}");
    };
    check(up("mkey-0000000000000000-0000000000000000", &control.url), "auth key");
    let revoked = control.authkey(&lab, &[]);
    assert_eq!(control.admin(&lab, &["authkey", "revoke", "1"]).0, Some(0));
    check(up(&revoked, &control.url), "revoked");
    let expiring = control.authkey(&lab, &["--expiry", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    check(up(&expiring, &control.url), "expired");
    check(up("mkey-x", "https://10.99.0.1:9"), "cannot reach the coordination server at https://10.99.0.1:9");

    // A single-use key joins one node; the second node is refused with the key's own error.
    let single = control.authkey(&lab, &[]);
    node.up(&lab, &control, &single, &[]);
    let other_host = lab.netns("n9");
    lab.switch(control.ns, "10.99.2.1/24", &[(other_host, "10.99.2.2/24")]);
    lab.ns(other_host).ip(&["route", "add", "10.99.0.0/24", "via", "10.99.2.1"]);
    let other = Node::start(&mut lab, other_host, "b");
    let args =
        ["up", "--control-url", &control.url, "--ca-cert", &control.ca, "--auth-key", &single, "--timeout", "3s"];
    check(other.cli(&lab, &args), "used");
    assert_eq!(other.status(&lab)["state"], "needs-login");
    // Nothing was half-applied: no mesh address, no routes.
    assert!(!mesh_netns::stdout(&lab.ns(other_host).ip(&["addr"])).contains("100.64."));
    // Bad input never reaches the server: SNAT without an address is refused naming both ways out.
    let (status, _, err) = node.cli(&lab, &["set", "--advertise-routes", "10.5.0.0/16"]);
    assert_eq!(status, Some(2));
    assert!(err.contains("--snat-address") && err.contains("--snat-subnet-routes=false"), "{err}");

    // A second daemon on the same local API socket is refused, and leaves the first one's socket alone.
    let socket = lab.path("a.sock");
    let (state, run) = (lab.path("second-state"), lab.path("second-run"));
    let second = lab.ns(hosts[0]).exec(
        "timeout",
        &[
            "10",
            common::MESHD,
            "daemon",
            "--socket",
            socket.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--tun",
            &lab.unique("m2"),
            "--port",
            "41642",
            "--run-dir",
            run.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        second.status.code() == Some(1) && err.contains("another meshd daemon answers"),
        "refused at the socket: {err}"
    );
    assert!(socket.exists(), "the first daemon's socket is still there");
    assert_eq!(node.status(&lab)["state"], "running");
}

#[test]
fn a_killed_node_keeps_its_identity_and_the_mesh_outlives_the_server() {
    let (mut lab, mut control, hosts) = mesh("mgr", 2);
    let key = control.authkey(&lab, &["--reusable"]);
    let a = Node::start(&mut lab, hosts[0], "a");
    let mut b = Node::start(&mut lab, hosts[1], "b");
    // a advertises a prefix nobody approves yet; b accepts routes.
    let ip_a = a.up(&lab, &control, &key, &["--advertise-routes", "10.66.0.0/24", "--snat-subnet-routes=false"]);
    let ip_b = b.up(&lab, &control, &key, &["--accept-routes"]);
    assert!(wait(5000, || lab.ns(hosts[0]).ping(&ip_b)));
    let key_b = b.status(&lab)["node"]["public_key"].clone();

    // SIGKILL and a plain restart: same key, same address, one node on the server, traffic again.
    lab.process(b.process).kill();
    b.restart(&mut lab, "b-after-kill");
    assert!(wait(5000, || b.status(&lab)["state"] == "running"), "{}", b.status(&lab));
    assert_eq!(b.status(&lab)["node"]["public_key"], key_b);
    assert_eq!(b.cli(&lab, &["ip"]).1.lines().next(), Some(ip_b.as_str()));
    let (_, nodes, _) = control.admin(&lab, &["nodes", "list"]);
    assert_eq!(nodes.lines().count(), 3, "a header and two nodes, no duplicate: {nodes}");
    assert!(wait(5000, || lab.ns(hosts[1]).ping(&ip_a)), "b reaches a after its restart");

    // The server goes away: tunnels keep carrying traffic, and a node restarted meanwhile comes back from
    // its cached netmap and says the server is out of reach.
    control.stop(&mut lab);
    assert!(wait(3000, || lab.ns(hosts[0]).ping(&ip_b)), "traffic without the control plane");
    lab.process(b.process).kill();
    b.restart(&mut lab, "b-without-server");
    assert!(wait(5000, || lab.ns(hosts[1]).ping(&ip_a)), "b restarted from its cache reaches a");
    let status = b.status(&lab);
    assert_eq!(status["node"]["ipv4"], ip_b.as_str());
    assert!(
        wait(5000, || b.status(&lab)["message"].as_str().is_some_and(|m| m.contains("cannot reach"))),
        "{}",
        b.status(&lab)
    );
    assert_eq!(b.status(&lab)["state"], "running", "it runs on its cache meanwhile");
    assert!(!b.table52(&lab).contains("10.66.0.0/24"), "nothing approved it yet");

    // The server returns, and a change made there afterwards reaches b without anyone telling b.
    control.restart(&mut lab);
    let (_, nodes, _) = control.admin(&lab, &["nodes", "list"]);
    assert_eq!(nodes.lines().count(), 3, "{nodes}");
    let (status, _, err) = control.admin(&lab, &["routes", "approve", "1", "10.66.0.0/24"]);
    assert_eq!(status, Some(0), "{err}");
    assert!(wait(15_000, || b.table52(&lab).contains("10.66.0.0/24 dev")), "{}", b.table52(&lab));
    assert!(wait(2000, || b.status(&lab)["message"].is_null()), "the trouble is gone: {}", b.status(&lab));

    // --force-reauth: a new node key, registered as a new node with a new address; a follows the change.
    let (status, new_ip, err) = b.cli(&lab, &["up", "--force-reauth", "--auth-key", &key, "--timeout", "20s"]);
    assert_eq!((status, new_ip.as_str()), (Some(0), "100.64.0.3"), "{err}");
    assert_ne!(b.status(&lab)["node"]["public_key"], key_b);
    assert!(wait(5000, || lab.ns(hosts[0]).ping("100.64.0.3")), "a reaches b under its new key");
    let (status, _, err) = b.cli(&lab, &["up", "--force-reauth", "--timeout", "5s"]);
    assert_eq!(status, Some(2), "a new registration needs a key: {err}");
    assert!(err.contains("--auth-key"), "{err}");
}

#[test]
fn a_peer_whose_key_expired_is_dropped_even_while_the_server_is_down() {
    let mut lab = Lab::new("mgx");
    let hub = lab.netns("cs");
    let hosts = [lab.netns("n0"), lab.netns("n1")];
    lab.switch(hub, "10.99.0.1/24", &[(hosts[0], "10.99.0.2/24"), (hosts[1], "10.99.0.3/24")]);
    let mut control = Control::start_with(&mut lab, hub, "10.99.0.1", None, &["--key-expiry", "15s"]);
    let key = control.authkey(&lab, &["--reusable"]);
    let a = Node::start(&mut lab, hosts[0], "a");
    let b = Node::start(&mut lab, hosts[1], "b");
    a.up(&lab, &control, &key, &[]);
    let ip_b = b.up(&lab, &control, &key, &[]);
    assert!(wait(5000, || lab.ns(hosts[0]).ping(&ip_b)), "a reaches b while b's key is good");
    let expiry = a.status(&lab)["peers"][0]["key_expiry"].as_u64();
    assert!(expiry.is_some(), "the netmap carries the expiry: {}", a.status(&lab));

    // The server goes away; nobody can tell a that b expired, and a drops b on time by itself.
    control.stop(&mut lab);
    assert!(wait(25_000, || a.status(&lab)["peers"].as_array().is_some_and(Vec::is_empty)), "{}", a.status(&lab));
    // Status leaves it out at the expiry second; the data plane follows within that second.
    assert!(
        wait(3000, || !a.table52(&lab).contains(&ip_b)),
        "{}\n{}",
        a.table52(&lab),
        lab.process(a.process).log_text()
    );
    assert!(!lab.ns(hosts[0]).ping(&ip_b), "no traffic to an expired peer");
    control.restart(&mut lab);
}

/// Regression: a deleted TUN device used to end the daemon ("reading the TUN device" failed once and the
/// loop returned). Now it is recreated with its addresses and routes, traffic resumes, and status says so.
#[test]
fn a_deleted_tun_device_is_recreated_and_traffic_resumes() {
    let (mut lab, control, hosts) = mesh("mgt", 2);
    let key = control.authkey(&lab, &["--reusable"]);
    let a = Node::start(&mut lab, hosts[0], "a");
    let b = Node::start(&mut lab, hosts[1], "b");
    a.up(&lab, &control, &key, &[]);
    let ip_b = b.up(&lab, &control, &key, &[]);
    assert!(wait(5000, || lab.ns(hosts[0]).ping(&ip_b)), "a reaches b");

    lab.ns(hosts[0]).ip(&["link", "del", &a.tun]);
    assert!(
        wait(10_000, || lab.ns(hosts[0]).ping(&ip_b)),
        "traffic resumes over the recreated device:\n{}",
        lab.process(a.process).log_text()
    );
    assert!(lab.process(a.process).running(), "the daemon lives on");
    assert!(a.table52(&lab).contains(&format!("{ip_b} dev {}", a.tun)), "{}", a.table52(&lab));
    let recovered = a.status(&lab)["recovered"].clone();
    assert!(recovered[0].as_str().is_some_and(|r| r.contains("recreated")), "{recovered}");
}

/// An exit node is an opt-in on both sides: the exit advertises it (and an administrator approves it), and
/// only a client that chose that exit sends its traffic there; accepting routes is not choosing an exit.
#[test]
fn an_exit_node_carries_only_the_traffic_of_clients_that_chose_it() {
    let (mut lab, control, hosts) = mesh("mge", 3);
    let internet = lab.netns("inet");
    lab.link(hosts[0], "198.18.5.1/24", internet, "198.18.5.50/24");
    let key = control.authkey(&lab, &["--reusable"]);
    let nodes: Vec<Node> = ["x", "c", "d"].iter().zip(&hosts).map(|(n, h)| Node::start(&mut lab, *h, n)).collect();
    let (x, c, d) = (&nodes[0], &nodes[1], &nodes[2]);

    let refused = ["up", "--control-url", &control.url, "--ca-cert", &control.ca, "--auth-key", &key];
    let (status, _, err) = x.cli(&lab, &[&refused[..], &["--advertise-routes", "0.0.0.0/0"]].concat());
    assert_eq!(status, Some(2), "{err}");
    assert!(err.contains("--advertise-exit-node"), "{err}");
    let ip_x = x.up(&lab, &control, &key, &["--advertise-exit-node", "--snat-address", "198.18.5.9"]);
    c.up(&lab, &control, &key, &["--exit-node", "x"]);
    d.up(&lab, &control, &key, &["--accept-routes"]);
    assert!(wait(5000, || lab.ns(hosts[1]).ping(&ip_x)), "c reaches x over the mesh");
    assert!(!lab.ns(hosts[1]).ping("198.18.5.50"), "not before an administrator approves the exit");

    // An IPv4 SNAT address only: x offers the IPv4 default route alone.
    let (status, _, err) = control.admin(&lab, &["routes", "approve", "x", "::/0"]);
    assert_eq!(status, Some(1), "{err}");
    let (status, _, err) = control.admin(&lab, &["routes", "approve", "x", "0.0.0.0/0"]);
    assert_eq!(status, Some(0), "{err}");
    assert!(wait(5000, || c.table52(&lab).contains("default dev")), "{}", c.table52(&lab));
    assert!(wait(5000, || lab.ns(hosts[1]).ping("198.18.5.50")), "c's traffic leaves through x");
    assert!(c.table52(&lab).contains("throw 10.99.0.0/24"), "the LAN stays on the LAN: {}", c.table52(&lab));
    assert!(!d.table52(&lab).contains("default"), "accepting routes is not choosing an exit: {}", d.table52(&lab));
    assert!(!lab.ns(hosts[2]).ping("198.18.5.50"));

    // Clearing the choice takes the default route away again.
    assert_eq!(c.cli(&lab, &["set", "--exit-node="]).0, Some(0));
    assert!(wait(3000, || !c.table52(&lab).contains("default")), "{}", c.table52(&lab));
    assert!(lab.ns(hosts[1]).ping(&ip_x), "c is still in the mesh");
}

/// Two nodes, `a` started with the fault `fault` injected; returns once a says in status it `recovered` from
/// it, with b's mesh address.
fn recovered_from(name: &str, fault: &str, recovered: &str) -> (Lab, Vec<usize>, Node, String) {
    let (mut lab, control, hosts) = mesh(name, 2);
    let key = control.authkey(&lab, &["--reusable"]);
    let a = Node::start_with_env(&mut lab, hosts[0], "a", &[(fault, "1500")]);
    let b = Node::start(&mut lab, hosts[1], "b");
    a.up(&lab, &control, &key, &[]);
    let ip_b = b.up(&lab, &control, &key, &[]);
    assert!(
        wait(15_000, || a.status(&lab)["recovered"].to_string().contains(recovered)),
        "{}\n{}",
        a.status(&lab),
        lab.process(a.process).log_text()
    );
    (lab, hosts, a, ip_b)
}

/// A dead netlink connection used to fail every route request until restart. With the fault injected (the
/// first connection's driver ends after 1.5 s), the host thread connects again, status says so, and table
/// 52 is repaired over the new connection.
#[test]
fn a_dead_netlink_connection_is_replaced_and_routes_are_still_repaired() {
    let (lab, hosts, a, ip_b) =
        recovered_from("mgn", "MESHD_FAULT_NETLINK_AFTER_MS", "netlink connection ended; connected again");
    lab.ns(hosts[0]).ip(&["route", "del", &ip_b, "table", "52"]);
    assert!(wait(8000, || a.table52(&lab).contains(&format!("{ip_b} dev"))), "{}", a.table52(&lab));
    assert!(wait(5000, || lab.ns(hosts[0]).ping(&ip_b)), "traffic again");
}

/// Ended route and address events used to disable event-driven repair for good (every repair waited for
/// the 5 s pass). With the fault injected, the host thread subscribes again, status says so, and a deleted
/// route comes back within the event-driven delay, not the periodic pass.
#[test]
fn ended_route_events_are_resubscribed_and_repairs_stay_fast() {
    let (lab, hosts, a, ip_b) =
        recovered_from("mgv", "MESHD_FAULT_EVENTS_AFTER_MS", "events stopped; subscribed again");
    lab.ns(hosts[0]).ip(&["route", "del", &ip_b, "table", "52"]);
    assert!(wait(2500, || a.table52(&lab).contains(&format!("{ip_b} dev"))), "{}", a.table52(&lab));
}
