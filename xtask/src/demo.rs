//! `cargo xtask demo`: seed 000's scenario on this machine. A server in "VPC B" reaches 10.0.12.50 in
//! "VPC A" through a meshd subnet router that translates its source to the router's SNAT address, so VPC A's
//! firewall only has to allow that one address. A coordination server (HTTPS, with a CA made for the demo)
//! hands out addresses and keys; the router's route reaches the client only once an administrator approves
//! it. Everything runs in network namespaces and is removed at the end.

use std::time::Duration;

use anyhow::{Result, bail};
use mesh_netns::{Lab, make_certificates, stdout, wait_until};

pub fn run() -> Result<bool> {
    if !crate::is_root() {
        bail!("the demo builds network namespaces: run it as root");
    }
    crate::install_packages()?;
    let meshd = crate::build_release_meshd()?;
    let meshd = meshd.to_str().unwrap_or_default();

    let mut lab = Lab::for_tool("demo");
    let (client, router, server) = lab.subnet_router(["vpcb", "rtra", "srva"]);
    let control = lab.netns("ctl");
    lab.link(control, "10.98.0.1/24", router, "10.98.0.2/24");
    lab.ns(control).ip(&["route", "add", "192.168.90.0/24", "via", "10.98.0.2"]);
    lab.ns(client).ip(&["route", "add", "10.98.0.0/24", "via", "192.168.90.1"]);
    step("Hosts: a coordination server, VPC B's server (the client), VPC A's subnet router, and 10.0.12.50 in VPC A");
    println!("  control  https://10.98.0.1:8443 (its own namespace, certificate from a demo CA)");
    println!("  client   underlay 192.168.90.2, joins with --accept-routes");
    println!("  router   underlay 192.168.90.1, LAN 10.0.12.1/24, advertises 10.0.0.0/16, SNAT to 10.0.12.9");
    println!("  server   10.0.12.50 serves HTTP (no meshd)");

    make_certificates(&lab, "10.98.0.1");
    let (cert, key, ca) = (path(&lab.path("server.pem")), path(&lab.path("server.key")), path(&lab.path("ca.pem")));
    let data = path(&lab.path("control-data"));
    let serve =
        ["control", "serve", "--listen", "10.98.0.1:8443", "--data-dir", &data, "--tls-cert", &cert, "--tls-key", &key];
    let control_process = lab.spawn(control, "meshd-control", meshd, &serve, &[]);
    if !wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        lab.process(control_process).log_text().contains("coordination server listening")
    }) {
        bail!("the coordination server did not start:\n{}", lab.process(control_process).log_text());
    }
    let token = format!("file:{data}/admin-token");
    let admin = |lab: &Lab, args: &[&str]| {
        let mut all = vec!["control"];
        all.extend_from_slice(args);
        all.extend(["--control-url", "https://10.98.0.1:8443", "--admin-token", &token, "--ca-cert", &ca]);
        lab.ns(control).exec(meshd, &all)
    };
    step("An administrator creates a reusable auth key (meshd control authkey create --reusable)");
    let auth_key = stdout(&admin(&lab, &["authkey", "create", "--reusable"])).trim().to_string();
    println!("    {}...", &auth_key[..auth_key.len().min(14)]);

    let run_dir = path(&lab.path("run"));
    let (tun_c, tun_r) = (lab.unique("mc"), lab.unique("mr"));
    let mut sockets = Vec::new();
    for (ns, name, tun) in [(router, "router", &tun_r), (client, "client", &tun_c)] {
        let socket = path(&lab.path(&format!("{name}.sock")));
        let state = path(&lab.path(&format!("{name}-state")));
        let args = ["daemon", "--socket", &socket, "--state-dir", &state, "--tun", tun, "--run-dir", &run_dir];
        lab.spawn(ns, &format!("meshd-{name}"), meshd, &args, &[]);
        if !wait_until(Duration::from_secs(10), Duration::from_millis(100), || std::path::Path::new(&socket).exists()) {
            bail!("the {name}'s daemon did not start");
        }
        sockets.push(socket);
    }
    let up = |lab: &Lab, ns: usize, socket: &str, name: &str, extra: &[&str]| -> Result<()> {
        let mut args = vec!["up", "--socket", socket, "--control-url", "https://10.98.0.1:8443", "--ca-cert", &ca];
        args.extend(["--auth-key", &auth_key, "--hostname", name]);
        args.extend_from_slice(extra);
        println!("  $ meshd {}", args.join(" ").replace(auth_key.as_str(), "mkey-..."));
        let out = lab.ns(ns).exec(meshd, &args);
        print!("{}", indent(&format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr))));
        if !out.status.success() {
            bail!("meshd up failed on the {name}");
        }
        Ok(())
    };
    step("Both join the mesh with meshd up");
    up(&lab, router, &sockets[0], "router", &["--advertise-routes", "10.0.0.0/16", "--snat-address", "10.0.12.9"])?;
    up(&lab, client, &sockets[1], "client", &["--accept-routes"])?;

    step("The route waits for approval; until then the client has no route to VPC A");
    show_out("meshd control routes list", &admin(&lab, &["routes", "list"]));
    println!("    client reaches 10.0.12.50: {}", lab.ns(client).ping("10.0.12.50"));
    step("The administrator approves it by the router's name (meshd control routes approve router 10.0.0.0/16)");
    show_out(
        "meshd control routes approve router 10.0.0.0/16",
        &admin(&lab, &["routes", "approve", "router", "10.0.0.0/16"]),
    );
    if !wait_until(Duration::from_secs(15), Duration::from_millis(200), || lab.ns(client).ping("10.0.12.50")) {
        bail!("the client never reached 10.0.12.50 through the mesh");
    }

    // A one-line web server: socat hands each connection to this script, with the peer in SOCAT_PEERADDR.
    let script = lab.write(
        "http.sh",
        "#!/bin/sh\nread request\nprintf 'HTTP/1.0 200 OK\\r\\nContent-Type: text/plain\\r\\n\\r\\n'\n\
         echo \"hello from 10.0.12.50 in VPC A; your connection came from $SOCAT_PEERADDR\"\n",
    );
    let reply = format!("EXEC:sh {}", path(&script));
    lab.spawn(server, "http-server", "socat", &["TCP-LISTEN:80,bind=10.0.12.50,reuseaddr,fork", &reply], &[]);
    if !wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        stdout(&lab.ns(server).exec("ss", &["-ltn"])).contains("10.0.12.50:80")
    }) {
        bail!("the demo's web server did not start");
    }

    step("On the client: meshd status (peers, endpoints, handshakes, routes)");
    show(&lab, client, meshd, &["status", "--socket", &sockets[1]]);
    step("On the client: the accepted route is in table 52, behind rule 5270");
    show(&lab, client, "ip", &["route", "show", "table", "52"]);
    show(&lab, client, "ip", &["rule", "list"]);
    step("On the client: an HTTP request to 10.0.12.50 crosses the mesh");
    let out =
        lab.ns(client).exec("sh", &["-c", "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 5 socat - TCP:10.0.12.50:80"]);
    print!("{}", indent(&stdout(&out)));
    let seen_snat = stdout(&out).contains("came from 10.0.12.9");
    step("On the router: its status, the SNAT address answering on the LAN, and meshd doctor");
    show(&lab, router, meshd, &["status", "--socket", &sockets[0]]);
    show(&lab, router, "ip", &["neigh", "show", "proxy"]);
    show(&lab, router, meshd, &["doctor", "--tun", &tun_r, "--run-dir", &run_dir, "--socket", &sockets[0]]);

    step("Removing the namespaces, links and daemons");
    drop(lab);
    if seen_snat {
        println!("\nThe server saw the router's SNAT address 10.0.12.9, not the client: VPC A allows one address.");
        Ok(true)
    } else {
        bail!("the server did not see the SNAT address")
    }
}

fn show_out(command: &str, out: &std::process::Output) {
    println!("  $ {command}");
    print!("{}", indent(&format!("{}{}", stdout(out), String::from_utf8_lossy(&out.stderr))));
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
