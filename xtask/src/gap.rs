//! `cargo xtask bench gap`: does route work stall packets? Two meshd nodes in namespaces; node A's peer
//! carries N extra allowed IPs, so A's table 52 holds N + 1 routes. A ping through the tunnel every 10 ms
//! runs while A's route manager (1) makes its periodic checks, (2) restores N routes someone flushed, and
//! (3) replaces all N on a SIGHUP reload. The figure is the longest interval between two replies and the
//! longest round trip: with route work on the packet task they grow by the length of a pass.
//!
//! `--meshd PATH` measures another build (an older commit, for the figure beside today's).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mesh_netns::{Keys, Lab, stdout, wait_until};

const A_LAN: &str = "192.168.91.1";
const B_LAN: &str = "192.168.91.2";
const B_MESH: &str = "100.64.0.2";

/// What one run saw. A stall of the tunnel shows as a long round trip; a long interval between replies
/// with short round trips is the pinger itself sending late (two cores, four busy processes), which the
/// interval between sends tells apart.
struct Gaps {
    replies: usize,
    sent: usize,
    max_interval_ms: f64,
    max_send_interval_ms: f64,
    max_rtt_ms: f64,
}

pub fn run(count: u32, meshd: Option<PathBuf>) -> Result<bool> {
    if !crate::is_root() {
        bail!("the gap bench builds network namespaces: run it as root");
    }
    let meshd = match meshd {
        Some(path) => path,
        None => crate::build_release_meshd()?,
    };
    println!("ping every 10 ms through the tunnel while node A's table 52 holds {} routes\n", count + 1);
    let gaps = measure(&meshd, count)?;
    println!("{:<40} {:>9} {:>13} {:>13} {:>9}", "phase", "replies", "reply gap", "send gap", "max RTT");
    let (mut worst_rtt, mut worst_gap): (f64, f64) = (0.0, 0.0);
    for (phase, g) in &gaps {
        println!(
            "{phase:<40} {:>4}/{:<4} {:>10.1} ms {:>10.1} ms {:>6.1} ms",
            g.replies, g.sent, g.max_interval_ms, g.max_send_interval_ms, g.max_rtt_ms
        );
        worst_rtt = worst_rtt.max(g.max_rtt_ms);
        worst_gap = worst_gap.max(g.max_interval_ms);
    }
    println!(
        "\nlongest round trip {worst_rtt:.1} ms, longest gap between replies {worst_gap:.1} ms (target: no gap over 20 \
         ms beyond the pinger's own)"
    );
    Ok(true)
}

fn config(keys: &Keys, peer: &Keys, address: &str, endpoint: &str, tun: &str, allowed: &[String]) -> String {
    let allowed: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[interface]\nprivate_key = \"{}\"\naddresses = [\"{address}/32\"]\nlisten_port = 41641\ntun_name = \
         \"{tun}\"\n\n[[peers]]\npublic_key = \"{}\"\nendpoint = \"{endpoint}:41641\"\nallowed_ips = [{}]\n",
        keys.private,
        peer.public,
        allowed.join(", ")
    )
}

/// `count` /32 prefixes starting at `base` (10.128.0.0 or 10.192.0.0), all inside 10.128.0.0/9.
fn prefixes(base: u32, count: u32) -> Vec<String> {
    (0..count).map(|i| format!("{}/32", std::net::Ipv4Addr::from(base + i))).collect()
}

fn measure(meshd: &Path, count: u32) -> Result<Vec<(String, Gaps)>> {
    let mut lab = Lab::for_tool("gap");
    let (a, b) = (lab.netns("ga"), lab.netns("gb"));
    lab.link(a, &format!("{A_LAN}/24"), b, &format!("{B_LAN}/24"));
    let (ka, kb) = (Keys::generate(), Keys::generate());
    let (tun_a, tun_b) = (lab.unique("ta"), lab.unique("tb"));
    let mut allowed_a = vec![format!("{B_MESH}/32")];
    allowed_a.extend(prefixes(0x0a80_0000, count));
    let config_a = lab.write("a.toml", &config(&ka, &kb, "100.64.0.1", B_LAN, &tun_a, &allowed_a));
    let config_b = lab.write("b.toml", &config(&kb, &ka, B_MESH, A_LAN, &tun_b, &["100.64.0.1/32".into()]));
    let binary = meshd.to_str().context("a UTF-8 path")?;
    let spawn = |lab: &mut Lab, ns: usize, name: &str, config: &Path| {
        let state = lab.path(&format!("{name}-state"));
        let args = ["daemon", "--config", config.to_str().unwrap_or_default(), "--state-dir"];
        let mut args = args.to_vec();
        args.push(state.to_str().unwrap_or_default());
        lab.spawn(ns, name, binary, &args, &[("MESHD_LOG", "warn")])
    };
    let node_a = spawn(&mut lab, a, "meshd-a", &config_a);
    spawn(&mut lab, b, "meshd-b", &config_b);
    // `ip route show table 52` fails while the table does not exist yet: that is zero routes.
    let routes = |lab: &Lab| stdout(&lab.ns(a).exec("ip", &["route", "show", "table", "52"])).lines().count();
    let installed = wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
        routes(&lab) > count as usize && lab.ns(a).ping(B_MESH)
    });
    if !installed {
        bail!("node A did not install {} routes and reach B ({} routes)", count + 1, routes(&lab));
    }

    let mut phases = Vec::new();
    // The periodic check runs every 5 s: 12 s of pings see two of them.
    phases.push(("steady, periodic checks (12 s)".to_string(), ping_for(&lab, a, 1200, || Ok(()))?));
    let flush = || {
        let out = lab.ns(a).exec("ip", &["route", "flush", "table", "52", "root", "10.128.0.0/9"]);
        if !out.status.success() {
            bail!("ip route flush failed");
        }
        Ok(())
    };
    phases.push((format!("restore {count} flushed routes"), ping_for(&lab, a, 500, flush)?));
    let restored = wait_until(Duration::from_secs(30), Duration::from_millis(200), || routes(&lab) > count as usize);
    if !restored {
        bail!("node A did not restore the flushed routes ({} routes)", routes(&lab));
    }
    // A reload that swaps every one of the N prefixes for another: N removed, N added.
    let mut swapped = vec![format!("{B_MESH}/32")];
    swapped.extend(prefixes(0x0ac0_0000, count));
    lab.write("a.toml", &config(&ka, &kb, "100.64.0.1", B_LAN, &tun_a, &swapped));
    let pid = lab.process(node_a).pid().to_string();
    let reload = || {
        let sent = std::process::Command::new("kill").args(["-s", "HUP", &pid]).status()?;
        if !sent.success() {
            bail!("kill -HUP failed");
        }
        Ok(())
    };
    phases.push((format!("SIGHUP: replace all {count} routes"), ping_for(&lab, a, 500, reload)?));
    let swapped_in = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        stdout(&lab.ns(a).exec("ip", &["route", "show", "table", "52", "root", "10.192.0.0/10"])).lines().count()
            == count as usize
    });
    if !swapped_in {
        bail!("node A did not install the reloaded routes");
    }
    Ok(phases)
}

/// Pings B's mesh address from `ns` every 10 ms, `packets` times, doing `during` 200 ms after the start.
fn ping_for(lab: &Lab, ns: usize, packets: u32, during: impl FnOnce() -> Result<()>) -> Result<Gaps> {
    let name = lab.ns(ns).name.clone();
    let count = packets.to_string();
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", &name, "ping", "-D", "-n", "-i", "0.01", "-W", "1", "-c", &count, B_MESH])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting ping")?;
    std::thread::sleep(Duration::from_millis(200));
    during()?;
    let out = child.wait_with_output().context("waiting for ping")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // `[1764430000.123456] 64 bytes from 100.64.0.2: icmp_seq=1 ttl=64 time=0.321 ms`
    let (mut stamps, mut sends) = (Vec::new(), Vec::new());
    let mut max_rtt_ms: f64 = 0.0;
    for line in text.lines().filter(|l| l.contains("bytes from")) {
        let stamp = line.strip_prefix('[').and_then(|l| l.split(']').next()).and_then(|s| s.parse::<f64>().ok());
        let rtt = line.split("time=").nth(1).and_then(|t| t.split_whitespace().next()).and_then(|t| t.parse().ok());
        if let (Some(stamp), Some(rtt)) = (stamp, rtt) {
            stamps.push(stamp);
            sends.push(stamp - rtt / 1000.0);
            max_rtt_ms = max_rtt_ms.max(rtt);
        }
    }
    let widest = |t: &[f64]| t.windows(2).map(|w| (w[1] - w[0]) * 1000.0).fold(0.0, f64::max);
    Ok(Gaps {
        replies: stamps.len(),
        sent: packets as usize,
        max_interval_ms: widest(&stamps),
        max_send_interval_ms: widest(&sends),
        max_rtt_ms,
    })
}
