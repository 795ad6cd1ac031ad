//! `cargo xtask bench routes`: how long the route manager takes to install 10 000 routes into a table, to
//! confirm a table that already matches (the periodic check), and to put back a flushed table.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use ipnet::{IpNet, Ipv4Net};
use mesh_linux::RoutingPolicy;
use mesh_linux::manager::{Cause, RouteManager};
use mesh_linux::netlink::Netlink;
use mesh_netns::Lab;

pub fn run(count: u32) -> Result<bool> {
    let mut lab = Lab::for_tool("routes");
    let ns = lab.netns("rt");
    // A veth pair stands in for the TUN device (this kernel may lack the dummy module).
    let dummy = lab.unique("dm");
    let peer = lab.unique("dp");
    lab.ns(ns).ip(&["link", "add", &dummy, "type", "veth", "peer", "name", &peer]);
    lab.ns(ns).ip(&["link", "set", &dummy, "up"]);
    lab.ns(ns).ip(&["link", "set", &peer, "up"]);
    let name = lab.ns(ns).name.clone();
    // The netlink socket must live in the namespace: run the measurement on a thread that enters it.
    let handle = std::thread::spawn(move || -> Result<Vec<(String, f64)>> {
        let file = std::fs::File::open(format!("/run/netns/{name}")).context("opening the namespace")?;
        nix_setns(&file)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(measure(&dummy, count))
    });
    let results = handle.join().map_err(|_| anyhow::anyhow!("measurement thread panicked"))??;
    println!("route manager, {count} IPv4 /32 routes into table 52 (one netlink request each)\n");
    for (what, secs) in &results {
        println!("{what:<40} {:>8.3} s  ({:.1} µs per route)", secs, secs * 1e6 / f64::from(count));
    }
    Ok(true)
}

async fn measure(dummy: &str, count: u32) -> Result<Vec<(String, f64)>> {
    let netlink = Netlink::connect()?;
    let index = netlink.link_index(dummy).await?;
    let mut manager = RouteManager::new(netlink.clone(), RoutingPolicy::default(), index);
    let prefixes: Vec<IpNet> =
        (0..count).map(|i| IpNet::V4(Ipv4Net::new((0x0a00_0000 + i).into(), 32).expect("valid prefix"))).collect();
    manager.set_accepted(prefixes);

    let mut results = Vec::new();
    let start = Instant::now();
    let report = manager.reconcile(Cause::Change, Instant::now()).await?;
    results.push(("install (empty table -> N routes)".to_string(), start.elapsed().as_secs_f64()));
    if report.added.len() != count as usize {
        bail!("installed {} routes, expected {count}", report.added.len());
    }
    let start = Instant::now();
    let report = manager.reconcile(Cause::Repair, Instant::now()).await?;
    results.push(("check (table already right)".to_string(), start.elapsed().as_secs_f64()));
    if !report.added.is_empty() || !report.removed.is_empty() || !report.rules_added.is_empty() {
        bail!("a matching table was changed");
    }
    let flushed = std::process::Command::new("ip").args(["route", "flush", "table", "52"]).status()?;
    if !flushed.success() {
        bail!("ip route flush failed");
    }
    let start = Instant::now();
    let report = manager.reconcile(Cause::Change, Instant::now()).await?;
    results.push(("restore after `ip route flush table 52`".to_string(), start.elapsed().as_secs_f64()));
    if report.added.len() != count as usize {
        bail!("restored {} routes, expected {count}", report.added.len());
    }
    manager.teardown().await?;
    Ok(results)
}

/// Moves this thread into the network namespace of `file` (setns(2) through the `ip` tool is not possible
/// for a thread, so the syscall is made here).
fn nix_setns(file: &std::fs::File) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a valid, open namespace file descriptor affects only the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
