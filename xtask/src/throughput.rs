//! `cargo xtask bench throughput`: one TCP stream (iperf3) from a client namespace to a router namespace
//! through a tunnel, with meshd at both ends and with wireguard-go at both ends, in the same run, beside the
//! bare veth link as the ceiling. Prints the figures and the ratio meshd / wireguard-go.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mesh_netns::{Keys, Lab, start_wireguard_go, wait_until};

const CLIENT_LAN: &str = "192.168.90.1";
const ROUTER_LAN: &str = "192.168.90.2";
const CLIENT_MESH: &str = "100.64.0.1";
const ROUTER_MESH: &str = "100.64.0.2";

pub fn run(seconds: u32) -> Result<bool> {
    if !is_root() {
        bail!("the throughput bench builds network namespaces: run it as root");
    }
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--locked", "-p", "meshd"])
        .current_dir(crate::root())
        .status()?;
    if !status.success() {
        bail!("building meshd failed");
    }
    let meshd = crate::root().join("target/release/meshd");

    println!("one TCP stream, {seconds} s each, client namespace -> router namespace over veth\n");
    let veth = measure("veth (no tunnel)", seconds, |_, _, _| Ok(ROUTER_LAN.to_string()))?;
    let wg = measure("wireguard-go", seconds, |lab, client, router| {
        let (kc, kr) = (Keys::generate(), Keys::generate());
        let (dc, dr) = (lab.unique("wgc"), lab.unique("wgr"));
        start_wireguard_go(
            lab,
            client,
            &dc,
            &kc,
            51820,
            "100.64.0.1/32",
            &kr.public,
            &format!("{ROUTER_LAN}:51820"),
            "100.64.0.2/32",
            None,
        );
        start_wireguard_go(
            lab,
            router,
            &dr,
            &kr,
            51820,
            "100.64.0.2/32",
            &kc.public,
            &format!("{CLIENT_LAN}:51820"),
            "100.64.0.1/32",
            None,
        );
        Ok(ROUTER_MESH.to_string())
    })?;
    let ours = measure("meshd", seconds, |lab, client, router| {
        let (kc, kr) = (Keys::generate(), Keys::generate());
        for (ns, name, keys, peer, addr, peer_addr, endpoint) in [
            (client, "meshd-client", &kc, &kr, CLIENT_MESH, ROUTER_MESH, ROUTER_LAN),
            (router, "meshd-router", &kr, &kc, ROUTER_MESH, CLIENT_MESH, CLIENT_LAN),
        ] {
            let tun = lab.unique(if ns == client { "mc" } else { "mr" });
            let config = format!(
                "[interface]\nprivate_key = \"{}\"\naddresses = [\"{addr}/32\"]\nlisten_port = 41641\ntun_name = \"{tun}\"\n\n\
                 [[peers]]\npublic_key = \"{}\"\nendpoint = \"{endpoint}:41641\"\nallowed_ips = [\"{peer_addr}/32\"]\n",
                keys.private, peer.public
            );
            let path = lab.write(&format!("{name}.toml"), &config);
            let state = lab.path(&format!("{name}-state"));
            let args = [
                "daemon",
                "--config",
                path.to_str().unwrap_or_default(),
                "--state-dir",
                state.to_str().unwrap_or_default(),
            ];
            lab.spawn(ns, name, meshd.to_str().unwrap_or_default(), &args, &[("MESHD_LOG", "warn")]);
        }
        Ok(ROUTER_MESH.to_string())
    })?;

    println!();
    println!("{:<20} {:>12}", "path", "Mbit/s");
    for (name, mbit) in [("veth (no tunnel)", veth), ("wireguard-go", wg), ("meshd", ours)] {
        println!("{name:<20} {mbit:>12.0}");
    }
    println!("\nmeshd / wireguard-go = {:.2}", ours / wg);
    Ok(true)
}

/// Builds the two namespaces, lets `setup` put a tunnel between them (returning the address to reach the
/// router at), waits until it answers, and runs iperf3 across it. Returns Mbit/s received.
fn measure(name: &str, seconds: u32, setup: impl FnOnce(&mut Lab, usize, usize) -> Result<String>) -> Result<f64> {
    let mut lab = Lab::new("bench");
    let client = lab.netns("bc");
    let router = lab.netns("br");
    lab.link(client, &format!("{CLIENT_LAN}/24"), router, &format!("{ROUTER_LAN}/24"));
    let target = setup(&mut lab, client, router)?;
    if !wait_until(Duration::from_secs(10), Duration::from_millis(100), || lab.ns(client).ping(&target)) {
        bail!("{name}: {target} is not reachable");
    }
    lab.spawn(router, "iperf3-server", "iperf3", &["-s", "-1", "-B", &target], &[]);
    let listening = || {
        let ss = lab.ns(router).exec("ss", &["-ltn"]);
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
    println!("{name:<20} {mbit:>8.0} Mbit/s");
    Ok(mbit)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
