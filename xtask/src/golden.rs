//! `cargo xtask capture-golden`: records the real packets the golden tests of mesh-packet replay
//! (`crates/mesh-packet/tests/golden/`). The S1 topology with real meshd daemons (release build): a client,
//! a router serving 10.0.0.0/16 with SNAT to 10.0.12.9, and a server at 10.0.12.50 behind a 1280-byte LAN
//! link. tcpdump records both TUN devices while the client opens a TCP connection and sends more than the
//! LAN's MTU with DF set (so the router's kernel answers with ICMP fragmentation-needed), a UDP query and a
//! ping. What the client's TUN device shows is what the router's data plane received or sent through the
//! tunnel; what the router's TUN device shows is what its data plane wrote or read: the two sides of every
//! translation, byte for byte.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use mesh_netns::{Keys, Lab, stdout, wait_until};

pub fn run() -> Result<bool> {
    if !crate::is_root() {
        bail!("capturing builds network namespaces: run it as root");
    }
    let meshd = crate::build_release_meshd()?;
    let meshd = meshd.to_str().context("a UTF-8 path")?;
    let mut lab = Lab::for_tool("golden");
    let (c, r, s) = lab.subnet_router(["gc", "gr", "gs"]);
    let lan = stdout(&lab.ns(r).ip(&["-o", "addr", "show", "to", "10.0.12.1/24"]));
    let lan = lan.split_whitespace().nth(1).context("the router's LAN interface")?.to_string();
    lab.ns(r).ip(&["link", "set", &lan, "mtu", "1280"]);
    let (kc, kr) = (Keys::generate(), Keys::generate());
    let (tun_c, tun_r) = (lab.unique("tc"), lab.unique("tr"));
    let config = |keys: &Keys, address: &str, tun: &str, peer: &Keys, endpoint: &str, allowed: &str| {
        format!(
            "[interface]\nprivate_key = \"{}\"\naddresses = [\"{address}\"]\nlisten_port = 41641\ntun_name = \
             \"{tun}\"\nmtu = 1420\n\n[[peers]]\npublic_key = \"{}\"\nendpoint = \"{endpoint}\"\nallowed_ips = [{allowed}]\n",
            keys.private, peer.public
        )
    };
    let router =
        lab.write("router.toml", &config(&kr, "100.64.0.1/32", &tun_r, &kc, "192.168.90.2:41641", "\"100.64.0.2/32\""));
    let client = lab.write(
        "client.toml",
        &config(&kc, "100.64.0.2/32", &tun_c, &kr, "192.168.90.1:41641", "\"100.64.0.1/32\", \"10.0.0.0/16\""),
    );
    let (router_state, client_state) = (lab.path("router-state"), lab.path("client-state"));
    let router_args = [
        "daemon",
        "--config",
        router.to_str().unwrap_or_default(),
        "--state-dir",
        router_state.to_str().unwrap_or_default(),
        "--advertise-routes=10.0.0.0/16",
        "--snat-address",
        "10.0.12.9",
    ];
    lab.spawn(r, "meshd-router", meshd, &router_args, &[]);
    let client_args = [
        "daemon",
        "--config",
        client.to_str().unwrap_or_default(),
        "--state-dir",
        client_state.to_str().unwrap_or_default(),
    ];
    lab.spawn(c, "meshd-client", meshd, &client_args, &[]);
    if !wait_until(Duration::from_secs(10), Duration::from_millis(100), || lab.ns(c).ping("10.0.12.50")) {
        bail!("the client cannot reach 10.0.12.50 through the router");
    }
    // The server answers TCP (discarding what it gets) and UDP (echoing).
    lab.spawn(s, "tcp-sink", "socat", &["-u", "TCP-LISTEN:8080,reuseaddr", "OPEN:/dev/null"], &[]);
    lab.spawn(s, "udp-echo", "socat", &["UDP-RECVFROM:5353,fork", "SYSTEM:cat"], &[]);
    let out_dir = crate::root().join("crates/mesh-packet/tests/golden");
    std::fs::create_dir_all(&out_dir)?;
    let (client_pcap, router_pcap) = (out_dir.join("client-tun.pcap"), out_dir.join("router-tun.pcap"));
    let dump = |file: &std::path::Path, tun: &str| {
        let path = file.to_str().unwrap_or_default().to_string();
        // Immediate mode: without it the kernel hands packets over in blocks, and the last ones are still
        // in the buffer when tcpdump is stopped.
        let args = ["-i", tun, "--immediate-mode", "-U", "-s", "2000", "-w", &path];
        args.map(str::to_string)
    };
    let client_dump = dump(&client_pcap, &tun_c);
    let router_dump = dump(&router_pcap, &tun_r);
    let cd: Vec<&str> = client_dump.iter().map(String::as_str).collect();
    let rd: Vec<&str> = router_dump.iter().map(String::as_str).collect();
    let tcpdump_c = lab.spawn(c, "tcpdump-client", "tcpdump", &cd, &[]);
    let tcpdump_r = lab.spawn(r, "tcpdump-router", "tcpdump", &rd, &[]);
    std::thread::sleep(Duration::from_millis(700));

    let payload = lab.write("payload", &"x".repeat(4000));
    let sent = lab
        .ns(c)
        .exec("timeout", &["10", "socat", "-u", &format!("OPEN:{}", payload.display()), "TCP:10.0.12.50:8080"]);
    if !sent.status.success() {
        bail!("the TCP transfer failed: {}", String::from_utf8_lossy(&sent.stderr));
    }
    lab.ns(c).exec("sh", &["-c", "echo golden | timeout 5 socat -T 1 - UDP:10.0.12.50:5353,sourceport=40053"]);
    let ping = lab.ns(c).exec("ping", &["-c", "1", "-W", "2", "10.0.12.50"]);
    if !ping.status.success() {
        bail!("the ping failed: {}{}", stdout(&ping), String::from_utf8_lossy(&ping.stderr));
    }
    std::thread::sleep(Duration::from_millis(500));
    lab.process(tcpdump_c).stop(Duration::from_secs(3));
    lab.process(tcpdump_r).stop(Duration::from_secs(3));
    for file in [&client_pcap, &router_pcap] {
        let size = std::fs::metadata(file)?.len();
        println!("{} ({size} bytes)", file.display());
    }
    Ok(true)
}
