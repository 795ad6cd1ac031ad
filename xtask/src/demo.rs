//! `cargo xtask demo`: seed 000's scenario on this machine. A server in "VPC B" reaches 10.0.12.50 in
//! "VPC A" through a meshd subnet router that translates its source to the router's SNAT address, so VPC A's
//! firewall only has to allow that one address. Everything runs in network namespaces and is removed at the
//! end. Static mode for now: the coordination server joins the demo when it exists.

use std::time::Duration;

use anyhow::{Result, bail};
use mesh_netns::{Keys, Lab, stdout, wait_until};

pub fn run() -> Result<bool> {
    if !crate::is_root() {
        bail!("the demo builds network namespaces: run it as root");
    }
    let meshd = crate::build_release_meshd()?;
    let meshd = meshd.to_str().unwrap_or_default();

    let mut lab = Lab::new("demo");
    let (client, router, server) = lab.subnet_router(["vpcb", "rtra", "srva"]);
    step("VPC B's server (client) and VPC A's subnet router join the mesh; 10.0.12.50 serves HTTP in VPC A");
    println!("  client  100.64.0.2  underlay 192.168.90.2   accepts 10.0.0.0/16 from the router");
    println!(
        "  router  100.64.0.1  underlay 192.168.90.1   LAN 10.0.12.1/24, advertises 10.0.0.0/16, SNAT to 10.0.12.9"
    );
    println!("  server  10.0.12.50  (VPC A, no meshd)");

    let (kc, kr) = (Keys::generate(), Keys::generate());
    let (tun_c, tun_r) = (lab.unique("mc"), lab.unique("mr"));
    let config = |keys: &Keys, address: &str, tun: &str, peer: &Keys, endpoint: &str, allowed: &str| {
        format!(
            "[interface]\nprivate_key = \"{}\"\naddresses = [\"{address}\"]\nlisten_port = 41641\ntun_name = \"{tun}\"\n\n\
             [[peers]]\npublic_key = \"{}\"\nendpoint = \"{endpoint}\"\nallowed_ips = [{allowed}]\n",
            keys.private, peer.public
        )
    };
    let router_conf =
        lab.write("router.toml", &config(&kr, "100.64.0.1/32", &tun_r, &kc, "192.168.90.2:41641", "\"100.64.0.2/32\""));
    let client_conf = lab.write(
        "client.toml",
        &config(&kc, "100.64.0.2/32", &tun_c, &kr, "192.168.90.1:41641", "\"100.64.0.1/32\", \"10.0.0.0/16\""),
    );
    let run_dir = lab.path("run");
    let (router_conf, client_conf, run_dir) = (path(&router_conf), path(&client_conf), path(&run_dir));
    let router_state = path(&lab.path("router-state"));
    let client_state = path(&lab.path("client-state"));
    lab.spawn(
        router,
        "meshd-router",
        meshd,
        &[
            "daemon",
            "--config",
            &router_conf,
            "--state-dir",
            &router_state,
            "--run-dir",
            &run_dir,
            "--advertise-routes=10.0.0.0/16",
            "--snat-address",
            "10.0.12.9",
        ],
        &[],
    );
    lab.spawn(client, "meshd-client", meshd, &["daemon", "--config", &client_conf, "--state-dir", &client_state], &[]);
    // A one-line web server: socat hands each connection to this script, with the peer in SOCAT_PEERADDR.
    let script = lab.write(
        "http.sh",
        "#!/bin/sh\nread request\nprintf 'HTTP/1.0 200 OK\\r\\nContent-Type: text/plain\\r\\n\\r\\n'\n\
         echo \"hello from 10.0.12.50 in VPC A; your connection came from $SOCAT_PEERADDR\"\n",
    );
    let reply = format!("EXEC:sh {}", path(&script));
    lab.spawn(server, "http-server", "socat", &["TCP-LISTEN:80,bind=10.0.12.50,reuseaddr,fork", &reply], &[]);

    if !wait_until(Duration::from_secs(15), Duration::from_millis(200), || lab.ns(client).ping("10.0.12.50")) {
        bail!("the client never reached 10.0.12.50 through the mesh");
    }

    step("On the client: the peer, its handshake and transfer (wg show reads meshd)");
    show(&lab, client, "wg", &["show", &tun_c]);
    step("On the client: the accepted route is in table 52, behind rule 5270 (ip route show table 52; ip rule list)");
    show(&lab, client, "ip", &["route", "show", "table", "52"]);
    show(&lab, client, "ip", &["rule", "list"]);
    step("On the client: an HTTP request to 10.0.12.50 crosses the mesh");
    let out =
        lab.ns(client).exec("sh", &["-c", "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 5 socat - TCP:10.0.12.50:80"]);
    print!("{}", indent(&stdout(&out)));
    let seen_snat = stdout(&out).contains("came from 10.0.12.9");
    step("On the router: the SNAT address answers on the LAN, and meshd doctor agrees");
    show(&lab, router, "ip", &["route", "show", "table", "52"]);
    show(&lab, router, "ip", &["neigh", "show", "proxy"]);
    show(&lab, router, meshd, &["doctor", "--tun", &tun_r, "--run-dir", &run_dir]);

    step("Removing the namespaces, links and daemons");
    drop(lab);
    if seen_snat {
        println!("\nThe server saw the router's SNAT address 10.0.12.9, not the client: VPC A allows one address.");
        Ok(true)
    } else {
        bail!("the server did not see the SNAT address")
    }
}

fn path(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

fn step(title: &str) {
    println!("\n==> {title}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

fn show(lab: &Lab, ns: usize, program: &str, args: &[&str]) {
    let shown = if program.ends_with("meshd") { "meshd" } else { program };
    println!("  $ {shown} {}", args.join(" "));
    let out = lab.ns(ns).exec(program, args);
    print!("{}", indent(&stdout(&out)));
}
