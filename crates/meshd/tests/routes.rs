//! The route manager on a real kernel: table 52 and the policy rules kept as meshd wants them, leftovers of a
//! killed run cleared, LAN-aware acceptance, and refusing a table another program owns.

mod common;

use std::time::Duration;

use common::*;
use mesh_netns::{Keys, Lab, stdout, wait_until};

/// Routes in table `id` of namespace `ns`, one per line; empty while the table does not exist.
fn table_n(lab: &Lab, ns: usize, id: &str) -> String {
    stdout(&lab.ns(ns).exec("ip", &["route", "show", "table", id]))
}

fn table(lab: &Lab, ns: usize) -> String {
    table_n(lab, ns, "52")
}

fn rules(lab: &Lab, ns: usize, family: &str) -> String {
    stdout(&lab.ns(ns).ip(&[family, "rule", "list"]))
}

/// How many lines of `text` contain `needle`.
fn count(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

/// Starts meshd in `a` with peer `b` whose allowed IPs are `allowed`, and waits until its routes are in.
fn meshd_with_routes(lab: &mut Lab, a: usize, allowed: &str) -> (usize, String) {
    let (ka, kb) = (Keys::generate(), Keys::generate());
    let tun = lab.unique("ma");
    let config = meshd_toml(&ka, "100.64.0.1/32", 51001, &tun, &kb, "192.168.77.2:51002", allowed);
    let meshd = start_meshd(lab, a, "meshd-a", &config);
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || table(lab, a).contains(&tun)),
        "routes never appeared"
    );
    (meshd, tun)
}

#[test]
fn a_flushed_table_and_a_deleted_rule_are_put_back_within_two_seconds() {
    let (mut lab, a, _b) = two_hosts("flush");
    let (meshd, tun) = meshd_with_routes(&mut lab, a, "100.64.0.2/32\", \"10.0.0.0/16");
    let before = table(&lab, a);
    assert_eq!(count(&before, &tun), 2, "{before}");

    lab.ns(a).ip(&["route", "flush", "table", "52"]);
    assert!(table(&lab, a).is_empty(), "flushed");
    assert!(
        wait_until(Duration::from_secs(2), Duration::from_millis(20), || table(&lab, a) == before),
        "table 52 not restored within 2 s: {}",
        table(&lab, a)
    );

    lab.ns(a).ip(&["rule", "del", "priority", "5270"]);
    lab.ns(a).ip(&["-6", "rule", "del", "priority", "5210"]);
    assert!(
        wait_until(Duration::from_secs(2), Duration::from_millis(20), || {
            rules(&lab, a, "-4").contains("5270:\tfrom all lookup 52")
                && rules(&lab, a, "-6").contains("5210:\tfrom all fwmark 0x80000/0xff0000 lookup main")
        }),
        "rules not restored within 2 s"
    );
    let log = lab.process(meshd).log_text();
    assert!(log.contains("restored a route something else removed"), "restorations are logged:\n{log}");
    assert!(log.contains("restored a policy rule something else removed"));
}

#[test]
fn sigkill_then_start_leaves_exactly_one_of_each_route_and_rule() {
    let (mut lab, a, _b) = two_hosts("kill");
    let (meshd, tun) = meshd_with_routes(&mut lab, a, "100.64.0.2/32\", \"10.0.0.0/16");
    lab.process(meshd).kill();
    // What a killed run leaves: its rules, and a route of its own the new run does not want (its TUN device
    // died with it, so a leftover of that kind is one without a device: a throw route).
    lab.ns(a).ip(&["route", "add", "throw", "10.99.0.0/16", "table", "52", "proto", "88"]);
    assert_eq!(count(&rules(&lab, a, "-4"), "lookup 52"), 1, "the rules survive SIGKILL");

    let config = std::fs::read_to_string(lab.path("meshd-a.conf.toml")).unwrap();
    start_meshd(&mut lab, a, "meshd-a2", &config);
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            let t = table(&lab, a);
            t.contains(&tun) && !t.contains("10.99.0.0/16")
        }),
        "the new run did not settle: {}",
        table(&lab, a)
    );
    let t = table(&lab, a);
    assert_eq!(count(&t, "100.64.0.2"), 1, "{t}");
    assert_eq!(count(&t, "10.0.0.0/16"), 1, "{t}");
    for family in ["-4", "-6"] {
        let r = rules(&lab, a, family);
        for priority in ["5210:", "5230:", "5250:", "5270:"] {
            assert_eq!(count(&r, priority), 1, "{family} {priority} in\n{r}");
        }
    }
}

#[test]
fn an_accepted_route_never_swallows_the_lan() {
    // Host a sits on LAN 10.0.5.0/24 with a neighbour; its peer b advertises 10.0.0.0/16 (VPC-wide), where
    // 10.0.12.50 lives behind b.
    let mut lab = Lab::new("lan");
    let a = lab.netns("a");
    let b = lab.netns("b");
    let n = lab.netns("n");
    lab.link(a, "192.168.77.1/24", b, "192.168.77.2/24");
    lab.link(a, "10.0.5.1/24", n, "10.0.5.9/24");
    lab.ns(b).ip(&["addr", "add", "10.0.12.50/32", "dev", "lo"]);
    let (ka, kb) = (Keys::generate(), Keys::generate());
    let (tun_a, tun_b) = (lab.unique("ma"), lab.unique("mb"));
    let meshd_a = start_meshd(
        &mut lab,
        a,
        "meshd-a",
        &meshd_toml(&ka, "100.64.0.1/32", 51001, &tun_a, &kb, "192.168.77.2:51002", "100.64.0.2/32\", \"10.0.0.0/16"),
    );
    start_meshd(
        &mut lab,
        b,
        "meshd-b",
        &meshd_toml(&kb, "100.64.0.2/32", 51002, &tun_b, &ka, "192.168.77.1:51001", "100.64.0.1/32"),
    );

    assert!(
        wait_for_ping(&lab, a, "10.0.12.50", Duration::from_secs(10)),
        "the VPC address behind b goes through the mesh"
    );
    assert!(lab.ns(a).ping("10.0.5.9"), "the LAN neighbour stays reachable directly");
    let t = table(&lab, a);
    assert!(t.contains("throw 10.0.5.0/24"), "{t}");
    let via = |dst: &str| stdout(&lab.ns(a).ip(&["route", "get", dst]));
    assert!(via("10.0.12.50").contains(&format!("dev {tun_a}")), "{}", via("10.0.12.50"));
    assert!(!via("10.0.5.9").contains(&tun_a), "{}", via("10.0.5.9"));

    // A clean stop removes the throw route too (routes through the TUN device would vanish with it anyway).
    assert_eq!(lab.process(meshd_a).stop(Duration::from_secs(5)), Some(0));
    let left = stdout(&lab.ns(a).exec("ip", &["route", "show", "table", "52"]));
    assert!(left.is_empty(), "left in table 52 after SIGTERM: {left}");
}

#[test]
fn a_table_another_program_uses_is_refused_with_the_way_out() {
    let (mut lab, a, _b) = two_hosts("own");
    // Something else (say, Tailscale) already routes through table 52.
    let device = stdout(&lab.ns(a).ip(&["-o", "link", "show", "type", "veth"]));
    let device = device.split(':').nth(1).unwrap().trim().split('@').next().unwrap().to_string();
    lab.ns(a).ip(&["route", "add", "100.100.100.100/32", "dev", &device, "table", "52"]);
    let (ka, kb) = (Keys::generate(), Keys::generate());
    let tun = lab.unique("ma");
    let config = meshd_toml(&ka, "100.64.0.1/32", 51001, &tun, &kb, "192.168.77.2:51002", "100.64.0.2/32");
    let refused = start_meshd(&mut lab, a, "meshd-refused", &config);
    assert!(wait_until(Duration::from_secs(5), Duration::from_millis(50), || !lab.process(refused).running()));
    let log = lab.process(refused).log_text();
    assert!(log.contains(&device) && log.contains("--table"), "the error names the device and the flag:\n{log}");
    assert_eq!(count(&table(&lab, a), "100.100.100.100"), 1, "the other program's route is untouched");
    assert!(!rules(&lab, a, "-4").contains("5270"), "nothing half-applied");

    let path = lab.path("meshd-refused.conf.toml");
    let state = lab.path("state-53");
    let args = ["daemon", "--config", path.to_str().unwrap(), "--state-dir", state.to_str().unwrap(), "--table", "53"];
    lab.spawn(a, "meshd-53", MESHD, &args, &[]);
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            table_n(&lab, a, "53").contains(&tun) && rules(&lab, a, "-4").contains("5270:\tfrom all lookup 53")
        }),
        "with --table 53 meshd starts and uses table 53"
    );
}

fn doctor(lab: &Lab, ns: usize, tun: &str, json: bool) -> (Option<i32>, String) {
    let mut args = vec!["doctor", "--tun", tun];
    if json {
        args.push("--json");
    }
    let out = lab.ns(ns).exec(MESHD, &args);
    (out.status.code(), stdout(&out))
}

#[test]
fn doctor_finds_a_forward_reject_ip_forward_off_and_stale_state() {
    let (mut lab, a, _b) = two_hosts("doc");
    // New namespaces inherit the host's ip_forward (container engines turn it on): say what this test means.
    lab.ns(a).exec_ok("sysctl", &["-qw", "net.ipv4.ip_forward=0"]);
    let (meshd, tun) = meshd_with_routes(&mut lab, a, "100.64.0.2/32");
    let (status, healthy) = doctor(&lab, a, &tun, false);
    assert!(healthy.contains("OK    rules") && healthy.contains("OK    table"), "{healthy}");
    assert!(healthy.contains("WARN  ip_forward"), "a host that does not forward: {healthy}");
    assert_eq!(status, Some(0), "warnings alone do not fail: {healthy}");

    // What seed 002's authors found by hand: firewalld's FORWARD reject.
    let nft = |args: &[&str]| lab.ns(a).exec_ok("nft", args);
    nft(&["add", "table", "inet", "firewalld"]);
    nft(&["add", "chain", "inet", "firewalld", "filter_FORWARD", "{ type filter hook forward priority 10 ; }"]);
    nft(&["add", "rule", "inet", "firewalld", "filter_FORWARD", "reject", "with", "icmpx", "admin-prohibited"]);
    let (status, report) = doctor(&lab, a, &tun, false);
    assert_eq!(status, Some(1), "{report}");
    assert!(report.contains("FAIL  firewall"), "{report}");
    assert!(report.contains("reject with icmpx admin-prohibited"), "{report}");
    assert!(
        report.contains(&format!("nft insert rule inet firewalld filter_FORWARD iifname \"{tun}\" accept")),
        "{report}"
    );

    // A meshd killed with SIGKILL leaves its rules and (here) a stale route behind.
    lab.process(meshd).kill();
    lab.ns(a).ip(&["route", "add", "throw", "10.99.0.0/16", "table", "52", "proto", "88"]);
    let (status, report) = doctor(&lab, a, &tun, false);
    assert_eq!(status, Some(1));
    assert!(report.contains("WARN  daemon"), "{report}");
    assert!(report.contains("FAIL  rules") && report.contains("ip rule del priority 5270"), "{report}");
    assert!(
        report.contains("stale: throw 10.99.0.0/16")
            && report.contains("ip route del throw 10.99.0.0/16 table 52 proto 88"),
        "{report}"
    );

    let (_, json) = doctor(&lab, a, &tun, true);
    let parsed: serde_json::Value = serde_json::from_str(&json).expect("doctor --json is JSON");
    assert_eq!(parsed["ok"], false);
    let failed: Vec<&str> = parsed["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "FAIL")
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["rules", "table", "firewall"]);
}

#[test]
fn accept_routes_takes_only_the_listed_prefixes_and_every_peer_address() {
    let (mut lab, a, _b) = two_hosts("acc");
    let (ka, kb) = (Keys::generate(), Keys::generate());
    let tun = lab.unique("ma");
    let config = meshd_toml(
        &ka,
        "100.64.0.1/32",
        51001,
        &tun,
        &kb,
        "192.168.77.2:51002",
        "100.64.0.2/32\", \"10.0.0.0/16\", \"10.52.0.0/16\", \"10.52.9.0/24",
    );
    let path = lab.write("meshd-a.conf.toml", &config);
    let state = lab.path("state");
    let args = [
        "daemon",
        "--config",
        path.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--accept-routes=10.52.0.0/16",
    ];
    lab.spawn(a, "meshd-a", MESHD, &args, &[]);
    assert!(wait_until(Duration::from_secs(5), Duration::from_millis(50), || table(&lab, a).contains("10.52.9.0/24")));
    let t = table(&lab, a);
    assert!(t.contains("100.64.0.2 dev") && t.contains("10.52.0.0/16 dev"), "{t}");
    assert!(!t.contains("10.0.0.0/16"), "a prefix outside --accept-routes is not routed: {t}");
    let (_, report) = {
        let out = lab.ns(a).exec(MESHD, &["doctor", "--tun", &tun, "--accept-routes=10.52.0.0/16"]);
        (out.status.code(), stdout(&out))
    };
    assert!(report.contains("OK    table"), "doctor, told the same, agrees: {report}");
}

#[test]
fn rules_another_program_owns_are_refused_and_never_removed() {
    let (mut lab, a, _b) = two_hosts("rul");
    // Tailscale's rule, byte for byte what meshd would install.
    lab.ns(a).ip(&["rule", "add", "priority", "5210", "fwmark", "0x80000/0xff0000", "lookup", "main"]);
    let (ka, kb) = (Keys::generate(), Keys::generate());
    let tun = lab.unique("ma");
    let config = meshd_toml(&ka, "100.64.0.1/32", 51001, &tun, &kb, "192.168.77.2:51002", "100.64.0.2/32");
    let refused = start_meshd(&mut lab, a, "meshd-refused", &config);
    assert!(wait_until(Duration::from_secs(5), Duration::from_millis(50), || !lab.process(refused).running()));
    let log = lab.process(refused).log_text();
    assert!(log.contains("--rule-priority") && log.contains("--fwmark"), "{log}");

    let path = lab.path("meshd-refused.conf.toml");
    let state = lab.path("state-own");
    let args = [
        "daemon",
        "--config",
        path.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--rule-priority",
        "5310",
        "--fwmark",
        "0x40000",
        "--table",
        "53",
    ];
    let own = lab.spawn(a, "meshd-own", MESHD, &args, &[]);
    assert!(wait_until(Duration::from_secs(5), Duration::from_millis(50), || rules(&lab, a, "-4")
        .contains("5370:\tfrom all lookup 53")));
    // doctor, given no flags, plans with the running daemon's own numbers (both find the run directory
    // through MESHD_RUN_DIR, which the lab sets).
    let report = stdout(&lab.ns(a).exec(MESHD, &["doctor", "--tun", &tun]));
    assert!(report.contains("OK    rules") && report.contains("OK    table"), "{report}");
    assert_eq!(lab.process(own).stop(Duration::from_secs(5)), Some(0));
    let left = rules(&lab, a, "-4");
    assert!(
        left.contains("5210:\tfrom all fwmark 0x80000/0xff0000 lookup main"),
        "the other program's rule survives: {left}"
    );
    assert!(!left.contains("5370") && !left.contains("0x40000"), "meshd's own are gone: {left}");
}
