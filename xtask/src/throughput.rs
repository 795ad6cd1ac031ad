//! `cargo xtask bench throughput`: one TCP stream (iperf3) from a client namespace to a router namespace
//! through a tunnel, with meshd at both ends and with wireguard-go at both ends, in the same run, beside the
//! bare veth link as the ceiling. Prints the figures and the ratio meshd / wireguard-go.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use mesh_netns::{Keys, Lab, start_wireguard_go, wait_until};

const CLIENT_LAN: &str = "192.168.90.1";
const ROUTER_LAN: &str = "192.168.90.2";
const CLIENT_MESH: &str = "100.64.0.1";
const ROUTER_MESH: &str = "100.64.0.2";
const ROUTER_LAN_SIDE: &str = "10.0.12.1";
const SERVER: &str = "10.0.12.50";
const SNAT_ADDRESS: &str = "10.0.12.9";

/// Where the iperf3 server runs: on the router itself, or on a LAN host behind it (the subnet-router case).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Topology {
    ToRouter,
    ThroughRouter,
}

pub fn run(seconds: u32) -> Result<bool> {
    if !crate::is_root() {
        bail!("the throughput bench builds network namespaces: run it as root");
    }
    let meshd = crate::build_release_meshd()?;

    println!("one TCP stream, {seconds} s each\n\nclient -> router (two namespaces)");
    let veth = measure("veth (no tunnel)", seconds, Topology::ToRouter, |_, _, _| Ok(ROUTER_LAN.to_string()))?;
    let wg = measure("wireguard-go", seconds, Topology::ToRouter, |lab, client, router| {
        wireguard_go_pair(lab, client, router, &format!("{ROUTER_MESH}/32"));
        Ok(ROUTER_MESH.to_string())
    })?;
    let ours = measure("meshd", seconds, Topology::ToRouter, |lab, client, router| {
        meshd_pair(lab, &meshd, client, router, &format!("{ROUTER_MESH}/32"), &[]);
        Ok(ROUTER_MESH.to_string())
    })?;

    println!("\nclient -> router -> LAN server 10.0.12.50 (three namespaces, the router translates sources)");
    let routed_plain = measure("routed, no tunnel", seconds, Topology::ThroughRouter, |lab, client, _| {
        lab.ns(client).ip(&["route", "add", "10.0.12.0/24", "via", ROUTER_LAN]);
        Ok(SERVER.to_string())
    })?;
    let routed_wg =
        measure("wireguard-go + nft masquerade", seconds, Topology::ThroughRouter, |lab, client, router| {
            let dr = wireguard_go_pair(lab, client, router, &format!("{ROUTER_MESH}/32,10.0.0.0/16"));
            let nft = |args: &[&str]| lab.ns(router).exec_ok("nft", args);
            nft(&["add", "table", "ip", "nat"]);
            nft(&["add", "chain", "ip", "nat", "post", "{ type nat hook postrouting priority 100 ; }"]);
            nft(&[
                "add",
                "rule",
                "ip",
                "nat",
                "post",
                "oifname",
                "!=",
                &dr,
                "ip",
                "saddr",
                "100.64.0.0/10",
                "masquerade",
            ]);
            Ok(SERVER.to_string())
        })?;
    let routed_ours = measure("meshd + userspace SNAT", seconds, Topology::ThroughRouter, |lab, client, router| {
        let client_allowed = format!("{ROUTER_MESH}/32\", \"10.0.0.0/16");
        let extra = ["--advertise-routes=10.0.0.0/16", "--snat-address", SNAT_ADDRESS];
        meshd_pair(lab, &meshd, client, router, &client_allowed, &extra);
        Ok(SERVER.to_string())
    })?;

    println!();
    println!("{:<32} {:>10}", "path", "Mbit/s");
    for (name, mbit) in [
        ("veth (no tunnel)", veth),
        ("wireguard-go", wg),
        ("meshd", ours),
        ("routed, no tunnel", routed_plain),
        ("wireguard-go + nft masquerade", routed_wg),
        ("meshd + userspace SNAT", routed_ours),
    ] {
        println!("{name:<32} {mbit:>10.0}");
    }
    println!("\nmeshd / wireguard-go = {:.2} (client -> router)", ours / wg);
    println!("meshd / wireguard-go = {:.2} (routed, with SNAT)", routed_ours / routed_wg);
    Ok(true)
}

/// wireguard-go at both ends: the client reaching `client_allowed` through the router. Returns the router's
/// device name.
fn wireguard_go_pair(lab: &mut Lab, client: usize, router: usize, client_allowed: &str) -> String {
    let (kc, kr) = (Keys::generate(), Keys::generate());
    let (dc, dr) = (lab.unique("wgc"), lab.unique("wgr"));
    let (to_router, to_client) = (format!("{ROUTER_LAN}:51820"), format!("{CLIENT_LAN}:51820"));
    start_wireguard_go(lab, client, &dc, &kc, 51820, "100.64.0.1/32", &kr.public, &to_router, client_allowed, None);
    start_wireguard_go(lab, router, &dr, &kr, 51820, "100.64.0.2/32", &kc.public, &to_client, "100.64.0.1/32", None);
    dr
}

/// meshd at both ends: the client reaching `client_allowed` through the router, which runs with `router_extra`.
fn meshd_pair(
    lab: &mut Lab,
    meshd: &std::path::Path,
    client: usize,
    router: usize,
    client_allowed: &str,
    router_extra: &[&str],
) {
    let (kc, kr) = (Keys::generate(), Keys::generate());
    start_meshd(lab, meshd, client, "meshd-client", (&kc, CLIENT_MESH), (&kr, ROUTER_LAN, client_allowed), &[]);
    let router_allowed = format!("{CLIENT_MESH}/32");
    start_meshd(
        lab,
        meshd,
        router,
        "meshd-router",
        (&kr, ROUTER_MESH),
        (&kc, CLIENT_LAN, &router_allowed),
        router_extra,
    );
}

/// Starts meshd in `ns` with one peer; `me` is (keys, mesh address), `peer` is (keys, LAN address, allowed IPs).
fn start_meshd(
    lab: &mut Lab,
    binary: &std::path::Path,
    ns: usize,
    name: &str,
    me: (&Keys, &str),
    peer: (&Keys, &str, &str),
    extra: &[&str],
) {
    let tun = lab.unique(&name[6..8]);
    let config = format!(
        "[interface]\nprivate_key = \"{}\"\naddresses = [\"{}/32\"]\nlisten_port = 41641\ntun_name = \"{tun}\"\n\n\
         [[peers]]\npublic_key = \"{}\"\nendpoint = \"{}:41641\"\nallowed_ips = [\"{}\"]\n",
        me.0.private, me.1, peer.0.public, peer.1, peer.2
    );
    let path = lab.write(&format!("{name}.toml"), &config);
    let state = lab.path(&format!("{name}-state"));
    let run = lab.path(&format!("{name}-run"));
    let mut args = vec![
        "daemon",
        "--config",
        path.to_str().unwrap_or_default(),
        "--state-dir",
        state.to_str().unwrap_or_default(),
    ];
    args.extend(["--run-dir", run.to_str().unwrap_or_default()]);
    args.extend_from_slice(extra);
    lab.spawn(ns, name, binary.to_str().unwrap_or_default(), &args, &[("MESHD_LOG", "warn")]);
}

/// Builds the two namespaces, lets `setup` put a tunnel between them (returning the address to reach the
/// router at), waits until it answers, and runs iperf3 across it. Returns Mbit/s received.
fn measure(
    name: &str,
    seconds: u32,
    topology: Topology,
    setup: impl FnOnce(&mut Lab, usize, usize) -> Result<String>,
) -> Result<f64> {
    let mut lab = Lab::for_tool("bench");
    let client = lab.netns("bc");
    let router = lab.netns("br");
    lab.link(client, &format!("{CLIENT_LAN}/24"), router, &format!("{ROUTER_LAN}/24"));
    let server_ns = if topology == Topology::ThroughRouter {
        let server = lab.netns("bs");
        lab.link(router, &format!("{ROUTER_LAN_SIDE}/24"), server, &format!("{SERVER}/24"));
        lab.ns(server).ip(&["route", "add", "default", "via", ROUTER_LAN_SIDE]);
        lab.ns(router).exec_ok("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        server
    } else {
        router
    };
    let target = setup(&mut lab, client, router)?;
    if !wait_until(Duration::from_secs(10), Duration::from_millis(100), || lab.ns(client).ping(&target)) {
        bail!("{name}: {target} is not reachable");
    }
    lab.spawn(server_ns, "iperf3-server", "iperf3", &["-s", "-1", "-B", &target], &[]);
    let listening = || {
        let ss = lab.ns(server_ns).exec("ss", &["-ltn"]);
        String::from_utf8_lossy(&ss.stdout).contains(&format!("{target}:5201"))
    };
    if !wait_until(Duration::from_secs(5), Duration::from_millis(50), listening) {
        bail!("{name}: iperf3 server did not start");
    }
    let secs = seconds.to_string();
    let out = lab.ns(client).exec("iperf3", &["-c", &target, "-t", &secs, "-J"]);
    if !out.status.success() {
        bail!("{name}: iperf3 failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let bps = report["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 result")?;
    let mbit = bps / 1e6;
    println!("  {name:<32} {mbit:>8.0} Mbit/s");
    Ok(mbit)
}
