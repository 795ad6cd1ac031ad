//! `cargo xtask bench dns`: queries per second for a mesh name, end to end through the TUN device to the
//! resolver in meshd's data plane, beside dnsmasq (Debian's) answering the same name in the same namespace,
//! with the same load tool (dnsperf) in the same run.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use mesh_netns::{Lab, make_certificates, stdout, wait_until};

const SERVER: &str = "10.98.0.1";
const NODE: &str = "10.98.0.2";

pub fn run(seconds: u32) -> Result<bool> {
    if !crate::is_root() {
        bail!("the DNS bench builds network namespaces: run it as root");
    }
    if !stdout(&std::process::Command::new("sh").args(["-c", "command -v dnsperf dnsmasq"]).output()?)
        .contains("dnsmasq")
    {
        let status = std::process::Command::new("apt-get")
            .args(["-qq", "install", "-y", "--no-install-recommends", "dnsperf", "dnsmasq-base"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("installing dnsperf")?;
        if !status.success() {
            bail!("apt-get install dnsperf dnsmasq-base failed");
        }
    }
    let meshd = crate::build_release_meshd()?;
    let meshd = meshd.to_str().context("utf-8 path")?.to_string();
    let mut lab = Lab::for_tool("xdns");
    let (cs, node) = (lab.netns("cs"), lab.netns("node"));
    lab.link(cs, &format!("{SERVER}/24"), node, &format!("{NODE}/24"));
    make_certificates(&lab, SERVER);
    let data = lab.path("control-data");
    let (cert, key, ca) = (lab.path("server.pem"), lab.path("server.key"), lab.path("ca.pem"));
    let listen = format!("{SERVER}:8443");
    let url = format!("https://{SERVER}:8443");
    let server = lab.spawn(
        cs,
        "control",
        &meshd,
        &[
            "control",
            "serve",
            "--listen",
            &listen,
            "--data-dir",
            path(&data),
            "--tls-cert",
            path(&cert),
            "--tls-key",
            path(&key),
        ],
        &[],
    );
    if !wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        lab.process(server).log_text().contains("coordination server listening")
    }) {
        bail!("the coordination server did not start");
    }
    let token = format!("file:{}", data.join("admin-token").display());
    let auth = lab.ns(cs).exec_ok(
        &meshd,
        &["control", "authkey", "create", "--control-url", &url, "--admin-token", &token, "--ca-cert", path(&ca)],
    );
    let auth = stdout(&auth).trim().to_string();
    let socket = lab.path("node.sock");
    let state = lab.path("node-state");
    let run = lab.path("node-run");
    let daemon = lab.spawn(
        node,
        "node",
        &meshd,
        &[
            "daemon",
            "--socket",
            path(&socket),
            "--state-dir",
            path(&state),
            "--tun",
            "mbench",
            "--uapi-dir",
            path(&run),
            "--run-dir",
            path(&run),
        ],
        &[],
    );
    if !wait_until(Duration::from_secs(10), Duration::from_millis(50), || socket.exists()) {
        bail!("the node did not start:\n{}", lab.process(daemon).log_text());
    }
    let up = lab.ns(node).exec_ok(
        &meshd,
        &[
            "up",
            "--socket",
            path(&socket),
            "--control-url",
            &url,
            "--ca-cert",
            path(&ca),
            "--auth-key",
            &auth,
            "--hostname",
            "bench",
            "--accept-dns=false",
        ],
    );
    let mesh_ip = stdout(&up).trim().to_string();
    lab.spawn(
        node,
        "dnsmasq",
        "dnsmasq",
        &[
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={NODE}"),
            "--pid-file=",
            "--user=root",
            "--cache-size=1000",
            &format!("--address=/bench.mesh.internal/{mesh_ip}"),
        ],
        &[],
    );
    std::thread::sleep(Duration::from_millis(500));
    let queries = lab.write("queries.txt", "bench.mesh.internal A\n");
    println!("one dnsperf client, up to 100 queries outstanding, {seconds} s each; the name answers {mesh_ip}\n");
    let mut figures = Vec::new();
    for (what, at) in [
        ("dnsmasq (in the namespace, no tunnel)", NODE),
        ("meshd's resolver (through the TUN device)", "100.100.100.100"),
    ] {
        let out = lab
            .ns(node)
            .exec("dnsperf", &["-s", at, "-d", path(&queries), "-l", &seconds.to_string(), "-c", "1", "-q", "100"]);
        let text = stdout(&out);
        let qps = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Queries per second:"))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .with_context(|| format!("dnsperf against {at}: {text}{}", String::from_utf8_lossy(&out.stderr)))?;
        let lost = text.lines().find(|l| l.contains("Queries lost")).unwrap_or("").trim().to_string();
        println!("{what:<44} {qps:>10.0} queries/s   {lost}");
        figures.push(qps);
    }
    println!("\nmeshd / dnsmasq: {:.2}", figures[1] / figures[0]);
    Ok(true)
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 lab path")
}
