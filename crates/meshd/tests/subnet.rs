//! Subnet routing through the real coordination server (design S1 and S2): routers and clients are managed
//! nodes that join with `meshd up`; routes reach peers only once approved, by hand (S1) or by autoApprovers
//! for the routers' tags (S2, as in seed 002). The control server lives in a namespace of its own.

mod common;

use std::time::Duration;

use common::managed::{Control, Node};
use common::{download, seen_source, start_echo_services};
use mesh_netns::{Lab, stdout, wait_until};

fn wait(limit_ms: u64, check: impl FnMut() -> bool) -> bool {
    wait_until(Duration::from_millis(limit_ms), Duration::from_millis(50), check)
}

#[test]
fn s1_through_the_control_server_snat_download_and_approval() {
    let mut lab = Lab::new("ms1");
    let (c, r, s) = lab.subnet_router(["cl", "rt", "sv"]);
    let cs = lab.netns("cs");
    lab.link(cs, "10.98.0.1/24", r, "10.98.0.2/24");
    lab.ns(cs).ip(&["route", "add", "192.168.90.0/24", "via", "10.98.0.2"]);
    lab.ns(c).ip(&["route", "add", "10.98.0.0/24", "via", "192.168.90.1"]);
    let control = Control::start(&mut lab, cs, "10.98.0.1", None);
    let key = control.authkey(&lab, &["--reusable"]);

    let router = Node::start(&mut lab, r, "router");
    let client = Node::start(&mut lab, c, "client");
    router.up(&lab, &control, &key, &["--advertise-routes", "10.0.0.0/16", "--snat-address", "10.0.12.9"]);
    client.up(&lab, &control, &key, &["--accept-routes"]);
    assert!(wait(5000, || lab.ns(c).ping("100.64.0.1")), "the client reaches the router's mesh address");

    // Negative: advertised but not approved, the VPC is unreachable and in no table.
    assert!(!client.table52(&lab).contains("10.0.0.0/16"), "{}", client.table52(&lab));
    assert!(!lab.ns(c).ping("10.0.12.50"), "an unapproved route is unreachable");

    assert_eq!(control.admin(&lab, &["routes", "approve", "1", "10.0.0.0/16"]).0, Some(0));
    assert!(wait(2000, || client.table52(&lab).contains(&format!("10.0.0.0/16 dev {}", client.tun))));
    assert!(wait(5000, || lab.ns(c).ping("10.0.12.50")), "the approved VPC is reachable");
    assert!(stdout(&lab.ns(c).ip(&["rule", "list"])).contains("5270:\tfrom all lookup 52"));

    start_echo_services(&mut lab, s, "10.0.12.50");
    assert!(seen_source(&lab, c, "10.0.12.50", false).starts_with("10.0.12.9"), "TCP seen from the SNAT address");
    assert!(seen_source(&lab, c, "10.0.12.50", true).starts_with("10.0.12.9"), "UDP seen from the SNAT address");
    let (served, received) = download(&mut lab, s, c, "10.0.12.50", 10 << 20);
    assert!(received.len() == served.len() && received == served, "10 MiB arrived intact");

    let status = router.status(&lab);
    assert_eq!(status["node"]["routes"][0]["approved"], true);
    assert_eq!(status["node"]["routes"][0]["primary"], true);
    assert!(client.cli(&lab, &["status"]).1.contains("routes 10.0.0.0/16"));

    // A new SNAT address on no LAN of the router's is refused in one line before anything changes: the
    // stored preferences, the old address's proxy entry and the translation all stay.
    let prefs = lab.path("router-state").join("prefs.json");
    let before = std::fs::read_to_string(&prefs).unwrap();
    let (status, _, err) = router.cli(&lab, &["set", "--snat-address", "10.200.0.9"]);
    assert_eq!(status, Some(2), "bad input: {err}");
    assert!(err.lines().count() == 1 && err.contains("10.200.0.9 lies in no subnet"), "{err}");
    assert_eq!(std::fs::read_to_string(&prefs).unwrap(), before, "the preferences are as they were");
    assert!(stdout(&lab.ns(r).ip(&["neigh", "show", "proxy"])).contains("10.0.12.9"), "the old address still answers");
    assert!(seen_source(&lab, c, "10.0.12.50", false).starts_with("10.0.12.9"), "and still translates");
    // One the LAN does hold moves the translation there.
    assert_eq!(router.cli(&lab, &["set", "--snat-address", "10.0.12.10"]).0, Some(0));
    assert!(wait(3000, || seen_source(&lab, c, "10.0.12.50", false).starts_with("10.0.12.10")));
    assert!(!stdout(&lab.ns(r).ip(&["neigh", "show", "proxy"])).contains("10.0.12.9 "), "the old entry is gone");
}

const CLUSTERS: &str = r#"{
  "tagOwners": { "tag:homelab": ["tag:homelab"], "tag:oracle": ["tag:oracle"] },
  "autoApprovers": { "routes": {
    "10.42.0.0/16": ["tag:homelab"], "10.43.0.0/16": ["tag:homelab"],
    "10.52.0.0/16": ["tag:oracle"], "10.53.0.0/16": ["tag:oracle"],
  } },
}"#;

#[test]
fn s2_through_the_control_server_autoapproved_both_ways_sources_preserved() {
    let mut lab = Lab::new("ms2");
    let (r1, r2, h1, h2, cs) = (lab.netns("r1"), lab.netns("r2"), lab.netns("h1"), lab.netns("h2"), lab.netns("cs"));
    lab.link(r1, "192.168.90.1/24", r2, "192.168.90.2/24");
    lab.link(r1, "10.42.0.1/16", h1, "10.42.0.10/16");
    lab.link(r2, "10.52.0.1/16", h2, "10.52.0.10/16");
    lab.link(cs, "10.98.0.1/24", r1, "10.98.0.2/24");
    lab.ns(h1).ip(&["route", "add", "default", "via", "10.42.0.1"]);
    lab.ns(h2).ip(&["route", "add", "default", "via", "10.52.0.1"]);
    lab.ns(cs).ip(&["route", "add", "192.168.90.0/24", "via", "10.98.0.2"]);
    lab.ns(r2).ip(&["route", "add", "10.98.0.0/24", "via", "192.168.90.1"]);
    lab.ns(r1).exec_ok("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    let control = Control::start(&mut lab, cs, "10.98.0.1", Some(CLUSTERS));
    let homelab_key = control.authkey(&lab, &["--tags", "tag:homelab"]);
    let oracle_key = control.authkey(&lab, &["--tags", "tag:oracle"]);

    let homelab = Node::start(&mut lab, r1, "homelab");
    let oracle = Node::start(&mut lab, r2, "oracle");
    let flags = |routes: &'static str| ["--advertise-routes", routes, "--snat-subnet-routes=false", "--accept-routes"];
    homelab.up(&lab, &control, &homelab_key, &flags("10.42.0.0/16,10.43.0.0/16"));
    oracle.up(&lab, &control, &oracle_key, &flags("10.52.0.0/16,10.53.0.0/16"));

    // No administrator approved anything: the policy did, and the routes sit in table 52 only.
    for (node, theirs) in [(&homelab, "10.52.0.0/16"), (&oracle, "10.42.0.0/16")] {
        assert!(wait(2000, || node.table52(&lab).contains(theirs)), "{}: {}", node.name, node.table52(&lab));
        assert!(!stdout(&lab.ns(node.ns).ip(&["route", "show"])).contains(theirs), "never in the main table");
    }
    assert!(wait(5000, || lab.ns(h1).ping("10.52.0.10")), "cluster 1 -> cluster 2");
    assert!(lab.ns(h2).ping("10.42.0.10"), "cluster 2 -> cluster 1");
    start_echo_services(&mut lab, h2, "10.52.0.10");
    assert!(seen_source(&lab, h1, "10.52.0.10", false).starts_with("10.42.0.10"), "the source is preserved");
    start_echo_services(&mut lab, h1, "10.42.0.10");
    assert!(seen_source(&lab, h2, "10.42.0.10", true).starts_with("10.52.0.10"), "both ways, UDP too");
}
