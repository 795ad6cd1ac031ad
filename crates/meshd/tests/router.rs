//! Subnet routing on real kernels, static mode: the S1 (SNAT, seed 000) and S2 (sources preserved, seed 002)
//! topologies with real meshd daemons, and what a router refuses.

mod common;

use std::time::Duration;

use common::*;
use mesh_netns::{Keys, Lab, stdout, wait_until};

struct Node {
    ns: usize,
    tun: String,
}

/// A meshd daemon with one peer; `extra` are more daemon flags.
fn start(
    lab: &mut Lab,
    ns: usize,
    name: &str,
    me: (&Keys, &str, u16),
    peer: (&Keys, &str, &str),
    extra: &[&str],
) -> Node {
    let tun = lab.unique(&name[..2]);
    let (keys, address, port) = me;
    let (peer_keys, endpoint, allowed) = peer;
    let config = meshd_toml(keys, address, port, &tun, peer_keys, endpoint, allowed);
    let path = lab.write(&format!("{name}.toml"), &config);
    let state = lab.path(&format!("{name}-state"));
    let run = lab.path(&format!("{name}-run"));
    let mut args = vec!["daemon", "--config", path.to_str().unwrap(), "--state-dir", state.to_str().unwrap()];
    args.extend(["--run-dir", run.to_str().unwrap()]);
    args.extend_from_slice(extra);
    lab.spawn(ns, name, MESHD, &args, &[("MESHD_LOG", "info")]);
    Node { ns, tun }
}

/// S1: VPC B's client reaches VPC A's server 10.0.12.50 through VPC A's router, which SNATs to 10.0.12.9.
struct S1 {
    lab: Lab,
    client: Node,
    router: Node,
    server: usize,
    /// The router's interface on the LAN.
    lan: String,
}

fn s1(name: &str) -> S1 {
    s1_with(name, |_, _, _| {})
}

/// S1, with `before(lab, router_ns, lan_interface)` run once the hosts exist and before any meshd starts.
fn s1_with(name: &str, before: impl FnOnce(&Lab, usize, &str)) -> S1 {
    let mut lab = Lab::new(name);
    let (c, r, s) = lab.subnet_router(["cl", "rt", "sv"]);
    let lan = stdout(&lab.ns(r).ip(&["-o", "addr", "show", "to", "10.0.12.1/24"]));
    let lan = lan.split_whitespace().nth(1).expect("the router's LAN interface").to_string();
    before(&lab, r, &lan);
    let (kc, kr) = (Keys::generate(), Keys::generate());
    let router = start(
        &mut lab,
        r,
        "router",
        (&kr, "100.64.0.1/32", 41641),
        (&kc, "192.168.90.2:41641", "100.64.0.2/32"),
        &["--advertise-routes=10.0.0.0/16", "--snat-address", "10.0.12.9"],
    );
    // The client also accepts a prefix the router does not serve, to show the router refuses it.
    let client = start(
        &mut lab,
        c,
        "client",
        (&kc, "100.64.0.2/32", 41641),
        (&kr, "192.168.90.1:41641", "100.64.0.1/32\", \"10.0.0.0/16\", \"10.9.0.0/16"),
        &[],
    );
    assert!(wait_for_ping(&lab, c, "10.0.12.50", Duration::from_secs(10)), "the client cannot reach the VPC server");
    S1 { lab, client, router, server: s, lan }
}

#[test]
fn s1_the_server_sees_the_snat_address_and_downloads_arrive_intact() {
    let S1 { mut lab, client, router, server, .. } = s1("s1");
    start_echo_services(&mut lab, server, "10.0.12.50");
    assert!(
        seen_source(&lab, client.ns, "10.0.12.50", false).starts_with("10.0.12.9"),
        "TCP source seen by the server"
    );
    assert!(seen_source(&lab, client.ns, "10.0.12.50", true).starts_with("10.0.12.9"), "UDP source seen by the server");

    let (served, received) = download(&mut lab, server, client.ns, "10.0.12.50", 10 << 20);
    assert_eq!(received.len(), served.len(), "10 MiB downloaded");
    assert!(received == served, "the download arrived changed");

    // The seed's checks on the client, and the router's plumbing.
    assert!(
        stdout(&lab.ns(client.ns).ip(&["route", "show", "table", "52"]))
            .contains(&format!("10.0.0.0/16 dev {}", client.tun))
    );
    assert!(stdout(&lab.ns(client.ns).ip(&["rule", "list"])).contains("5270:\tfrom all lookup 52"));
    assert!(
        stdout(&lab.ns(router.ns).ip(&["route", "show", "table", "52"]))
            .contains(&format!("10.0.12.9 dev {}", router.tun))
    );
    let neighbours = stdout(&lab.ns(router.ns).ip(&["neigh", "show", "proxy"]));
    assert!(neighbours.contains("10.0.12.9"), "{neighbours}");
}

/// ICMP echo requests the namespace's kernel has received (`InEchos` in its /proc/net/snmp).
fn echo_requests_received(lab: &Lab, ns: usize) -> u64 {
    let snmp = stdout(&lab.ns(ns).exec_ok("cat", &["/proc/net/snmp"]));
    let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp: "));
    let (names, values) = (icmp.next().expect("Icmp header"), icmp.next().expect("Icmp values"));
    let at = names.split_whitespace().position(|n| n == "InEchos").expect("InEchos");
    values.split_whitespace().nth(at).and_then(|v| v.parse().ok()).expect("a count")
}

#[test]
fn s1_the_router_refuses_what_it_does_not_serve_and_spoofed_sources() {
    let S1 { lab, client, router, server, .. } = s1("s1n");
    // Both refused destinations exist and can answer: a host at 10.9.0.1 (on the server, reached through the
    // router's LAN) with routes back to the client's mesh address and to the spoofed source, so only the
    // router's refusal can stop these pings. The router's own ping shows the host is there.
    let (r, sv) = (lab.ns(router.ns), lab.ns(server));
    let server_if = stdout(&sv.ip(&["-o", "addr", "show", "to", "10.0.12.50/24"]));
    let server_if = server_if.split_whitespace().nth(1).unwrap().to_string();
    sv.ip(&["addr", "add", "10.9.0.1/16", "dev", &server_if]);
    sv.ip(&["route", "add", "100.64.0.0/10", "via", "10.0.12.1"]);
    sv.ip(&["route", "add", "10.77.0.0/16", "via", "10.0.12.1"]);
    r.ip(&["route", "add", "10.9.0.0/16", "via", "10.0.12.50"]);
    r.ip(&["route", "add", "10.77.0.0/16", "via", "192.168.90.2"]);
    assert!(r.ping("10.9.0.1"), "the host behind the refused prefix answers the router");

    // A control: what the router serves arrives, and the counter sees it.
    let before = echo_requests_received(&lab, server);
    assert!(lab.ns(client.ns).ping("10.0.12.50"));
    assert!(echo_requests_received(&lab, server) > before, "the counter counts what arrives");

    // 10.9.0.1 is inside what the client sends to the router but outside what the router serves.
    let before = echo_requests_received(&lab, server);
    assert!(!lab.ns(client.ns).ping("10.9.0.1"));
    // A source the client does not own, through the tunnel to a prefix the router does serve.
    lab.ns(client.ns).ip(&["addr", "add", "10.77.0.1/32", "dev", "lo"]);
    let spoofed = lab.ns(client.ns).exec("ping", &["-c", "1", "-W", "1", "-I", "10.77.0.1", "10.0.12.50"]);
    assert!(!spoofed.status.success());
    assert_eq!(echo_requests_received(&lab, server), before, "a refused packet reached the LAN");
    let log = || std::fs::read_to_string(lab.path("router.log")).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(3), Duration::from_millis(100), || log().contains("reason=not_routed")
            && log().contains("reason=source_not_allowed")),
        "{}",
        log()
    );
}

#[test]
fn s1_doctor_checks_the_snat_plumbing() {
    let S1 { lab, router, .. } = s1("s1d");
    let run = lab.path("router-run");
    let doctor = |lab: &Lab| {
        stdout(&lab.ns(router.ns).exec(MESHD, &["doctor", "--tun", &router.tun, "--run-dir", run.to_str().unwrap()]))
    };
    let report = doctor(&lab);
    assert!(
        report.contains("OK    snat") && report.contains("OK    table") && report.contains("OK    ip_forward"),
        "{report}"
    );
    let lan = stdout(&lab.ns(router.ns).ip(&["-o", "addr", "show", "to", "10.0.12.1/24"]));
    let lan = lan.split_whitespace().nth(1).unwrap().to_string();
    lab.ns(router.ns).ip(&["neigh", "del", "proxy", "10.0.12.9", "dev", &lan]);
    let report = doctor(&lab);
    assert!(
        report.contains("FAIL  snat") && report.contains(&format!("ip neigh replace proxy 10.0.12.9 dev {lan}")),
        "{report}"
    );
}

#[test]
fn s2_two_clusters_reach_each_other_both_ways_with_sources_preserved() {
    let mut lab = Lab::new("s2");
    let r1 = lab.netns("r1");
    let r2 = lab.netns("r2");
    let h1 = lab.netns("h1");
    let h2 = lab.netns("h2");
    lab.link(r1, "192.168.90.1/24", r2, "192.168.90.2/24");
    lab.link(r1, "10.42.0.1/16", h1, "10.42.0.10/16");
    lab.link(r2, "10.52.0.1/16", h2, "10.52.0.10/16");
    lab.ns(h1).ip(&["route", "add", "default", "via", "10.42.0.1"]);
    lab.ns(h2).ip(&["route", "add", "default", "via", "10.52.0.1"]);
    for r in [r1, r2] {
        lab.ns(r).exec_ok("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    }
    let (k1, k2) = (Keys::generate(), Keys::generate());
    start(
        &mut lab,
        r1,
        "r1-meshd",
        (&k1, "100.64.0.1/32", 41641),
        (&k2, "192.168.90.2:41641", "100.64.0.2/32\", \"10.52.0.0/16\", \"10.53.0.0/16"),
        &["--advertise-routes=10.42.0.0/16,10.43.0.0/16", "--snat-subnet-routes=false"],
    );
    start(
        &mut lab,
        r2,
        "r2-meshd",
        (&k2, "100.64.0.2/32", 41641),
        (&k1, "192.168.90.1:41641", "100.64.0.1/32\", \"10.42.0.0/16\", \"10.43.0.0/16"),
        &["--advertise-routes=10.52.0.0/16:nosnat,10.53.0.0/16:nosnat"],
    );
    assert!(wait_for_ping(&lab, h1, "10.52.0.10", Duration::from_secs(10)), "cluster 1 -> cluster 2");
    assert!(lab.ns(h2).ping("10.42.0.10"), "cluster 2 -> cluster 1");
    start_echo_services(&mut lab, h2, "10.52.0.10");
    assert!(seen_source(&lab, h1, "10.52.0.10", false).starts_with("10.42.0.10"), "the source is preserved");
    assert!(seen_source(&lab, h1, "10.52.0.10", true).starts_with("10.42.0.10"));
}

#[test]
fn a_router_restarted_after_a_crash_still_restores_the_original_proxy_delay() {
    // A value no kernel default has, set before any meshd runs: only a restore from what was read can
    // bring it back. (40 survives the kernel's centisecond-to-jiffy rounding at any HZ; 37 reads back as 36.)
    let S1 { mut lab, router, lan, .. } = s1_with("s1k", |lab, r, lan| {
        lab.ns(r).exec_ok("sysctl", &["-qw", &format!("net.ipv4.neigh.{lan}.proxy_delay=40")]);
    });
    let key = format!("/proc/sys/net/ipv4/neigh/{lan}/proxy_delay");
    let read = |lab: &Lab| stdout(&lab.ns(router.ns).exec("cat", &[&key])).trim().to_string();
    assert_eq!(read(&lab), "0", "set while the router runs");

    // SIGKILL: nothing is put back; the next run sees meshd's own 0.
    let first = 0; // the router was the first process the lab started
    lab.process(first).kill();
    assert_eq!(read(&lab), "0");
    let config = lab.path("router.toml");
    let (state, run) = (lab.path("router-state"), lab.path("router-run"));
    let args = [
        "daemon",
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
        "--advertise-routes=10.0.0.0/16",
        "--snat-address",
        "10.0.12.9",
    ];
    let again = lab.spawn(router.ns, "router-again", MESHD, &args, &[]);
    // The killed run's proxy entry is still there, so wait for the new run itself to be up.
    assert!(wait_until(Duration::from_secs(5), Duration::from_millis(50), || lab
        .process(again)
        .log_text()
        .contains("meshd is up")));
    assert_eq!(lab.process(again).stop(Duration::from_secs(5)), Some(0));
    assert_eq!(read(&lab), "40", "the value from before any meshd is back");
    assert!(!stdout(&lab.ns(router.ns).ip(&["neigh", "show", "proxy"])).contains("10.0.12.9"));
}
