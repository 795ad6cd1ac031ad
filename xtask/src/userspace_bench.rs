//! `cargo xtask bench userspace`: one TCP stream from a "pod" namespace to a server behind a mesh peer,
//! through userspace-mode meshd (a forward, and SOCKS5), beside kernel-TUN meshd on the same path and
//! onetun 0.3.10 forwarding the same port, in the same run; on a clean link and with 10 ms of delay and
//! 0.1 % loss. This machine's kernel has no netem (`tc ... netem` answers "Specified qdisc kind is
//! unknown"), so the impairment is a UDP relay between the two WireGuard endpoints that holds every
//! datagram 5 ms each way and drops 0.1 % of them each way: the same for every contender. Then the
//! userspace daemon's footprint: RSS idle, idle CPU over 60 s, and RSS with 100 active flows.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_netns::{Keys, Lab, stdout, wait_until};

const POD_LAN: &str = "192.168.91.1";
const PEER_LAN: &str = "192.168.91.2";
const POD_MESH: &str = "100.64.0.1";
const PEER_MESH: &str = "100.64.0.2";
const FORWARD_PORT: &str = "15201";
const HTTP_PORT: u16 = 8080;
/// What the HTTP server sends per request for the SOCKS5 measurement.
const HTTP_BODY: u64 = 4 << 30;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Userspace meshd, iperf3 through `--forward`.
    Forward,
    /// Userspace meshd, curl through `--socks5`.
    Socks5,
    /// Kernel-TUN meshd, iperf3 straight to the peer's mesh address.
    Kernel,
    /// onetun forwarding the same port.
    Onetun,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Forward => "meshd userspace, --forward",
            Mode::Socks5 => "meshd userspace, --socks5 (curl)",
            Mode::Kernel => "meshd kernel TUN",
            Mode::Onetun => "onetun 0.3.10",
        }
    }
}

pub fn run(seconds: u32) -> Result<bool> {
    if !crate::is_root() {
        bail!("the userspace bench builds network namespaces: run it as root");
    }
    let meshd = crate::build_release_meshd()?;
    let onetun = onetun()?;
    let mut rows = Vec::new();
    let impaired = Impairment { one_way: Duration::from_millis(5), loss_per_million: 1000 };
    for (condition, netem) in [("clean link", None), ("10 ms delay, 0.1 % loss", Some(impaired))] {
        println!("\n{condition}: one TCP stream, {seconds} s");
        for mode in [Mode::Forward, Mode::Socks5, Mode::Kernel, Mode::Onetun] {
            for reverse in [false, true] {
                if mode == Mode::Socks5 && !reverse {
                    continue;
                }
                // MESHD_BENCH_ONLY=TEXT: only the runs whose description contains it (e.g. "loss Forward up").
                let described = format!("{condition} {mode:?} {}", if reverse { "down" } else { "up" });
                if std::env::var("MESHD_BENCH_ONLY").is_ok_and(|only| !only.split(' ').all(|w| described.contains(w))) {
                    continue;
                }
                // A failed measurement is reported and counted as 0, and the others go on.
                let mbit = match measure(&meshd, &onetun, mode, reverse, netem, seconds) {
                    Ok(mbit) => mbit,
                    Err(e) => {
                        println!("  {} ({condition}): failed: {e:#}", mode.name());
                        0.0
                    }
                };
                let direction = if reverse { "download" } else { "upload" };
                println!("  {:<36} {direction:<8} {mbit:>8.0} Mbit/s", mode.name());
                rows.push((condition, mode, reverse, mbit));
            }
        }
    }
    println!("\n{:<26} {:<36} {:<8} {:>8}", "condition", "path", "", "Mbit/s");
    for (condition, mode, reverse, mbit) in &rows {
        let direction = if *reverse { "download" } else { "upload" };
        println!("{condition:<26} {:<36} {direction:<8} {mbit:>8.0}", mode.name());
    }
    let figure =
        |c: &str, m: Mode, r: bool| rows.iter().find(|x| x.0 == c && x.1 == m && x.2 == r).map_or(0.0, |x| x.3);
    for condition in ["clean link", "10 ms delay, 0.1 % loss"] {
        for reverse in [false, true] {
            let ours = figure(condition, Mode::Forward, reverse);
            let theirs = figure(condition, Mode::Onetun, reverse);
            let kernel = figure(condition, Mode::Kernel, reverse);
            println!(
                "{condition}, {}: userspace / onetun = {:.1}, userspace / kernel TUN = {:.2}",
                if reverse { "download" } else { "upload" },
                ours / theirs.max(1.0),
                ours / kernel.max(1.0)
            );
        }
    }
    if std::env::var("MESHD_BENCH_ONLY").is_err() {
        footprint(&meshd)?;
    }
    Ok(true)
}

/// onetun from crates.io (`cargo install`), the anchor the issue names.
fn onetun() -> Result<PathBuf> {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo"));
    let binary = home.join("bin/onetun");
    if !binary.exists() {
        println!("installing onetun 0.3.10 (cargo install)");
        let ok =
            Command::new("cargo").args(["install", "onetun", "--version", "0.3.10", "--locked"]).status()?.success();
        if !ok {
            bail!("cargo install onetun failed");
        }
    }
    Ok(binary)
}

/// The pod and the peer, linked; the peer runs kernel meshd with the pod as its one peer and serves iperf3
/// and HTTP on its mesh address.
struct Setup {
    lab: Lab,
    pod: usize,
    peer: usize,
    pod_keys: Keys,
    peer_keys: Keys,
    /// Where the pod's WireGuard sends: the peer, or the impairing relay in front of it.
    endpoint: String,
    /// The peer's TUN device, where the decrypted streams can be captured.
    peer_tun: String,
    _relay: Option<Relay>,
}

/// Delay each way and loss each way, in millionths.
#[derive(Clone, Copy, Debug)]
struct Impairment {
    one_way: Duration,
    loss_per_million: u32,
}

/// The impairing relay's thread, stopped on drop.
struct Relay {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP relay in namespace `ns` on `listen` in front of `upstream`: every datagram waits `one_way`, and
/// `loss_per_million` of them are dropped, in both directions.
fn relay(ns: String, listen: SocketAddr, upstream: SocketAddr, impairment: Impairment) -> Result<Relay> {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let stopped = stop.clone();
    let thread = std::thread::spawn(move || {
        mesh_netns::enter_namespace(&ns);
        let socket = match UdpSocket::bind(listen) {
            Ok(s) => s,
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
        };
        let _ = ready_tx.send(Ok(()));
        let mut queue: VecDeque<(Instant, SocketAddr, Vec<u8>)> = VecDeque::new();
        let mut client: Option<SocketAddr> = None;
        let mut random: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut buf = vec![0u8; 65_535];
        while !stopped.load(Ordering::Relaxed) {
            let now = Instant::now();
            let wait =
                queue.front().map_or(Duration::from_millis(20), |(due, _, _)| due.saturating_duration_since(now));
            let _ = socket.set_read_timeout(Some(wait.max(Duration::from_micros(50))));
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                let to = if from == upstream {
                    client
                } else {
                    client = Some(from);
                    Some(upstream)
                };
                // xorshift: the same loss pattern on every run.
                random ^= random << 13;
                random ^= random >> 7;
                random ^= random << 17;
                let lost = (random % 1_000_000) < u64::from(impairment.loss_per_million);
                if let (Some(to), false) = (to, lost) {
                    queue.push_back((Instant::now() + impairment.one_way, to, buf[..n].to_vec()));
                }
            }
            let now = Instant::now();
            while queue.front().is_some_and(|(due, _, _)| *due <= now) {
                if let Some((_, to, data)) = queue.pop_front() {
                    let _ = socket.send_to(&data, to);
                }
            }
        }
    });
    ready.recv_timeout(Duration::from_secs(5)).context("the relay")?.map_err(anyhow::Error::msg)?;
    Ok(Relay { stop, thread: Some(thread) })
}

fn setup(meshd: &Path, netem: Option<Impairment>) -> Result<Setup> {
    let mut lab = Lab::for_tool("usbench");
    let pod = lab.netns("up");
    let peer = lab.netns("ur");
    lab.link(pod, &format!("{POD_LAN}/24"), peer, &format!("{PEER_LAN}/24"));
    let (endpoint, relay) = match netem {
        Some(impairment) => {
            let listen: SocketAddr = format!("{PEER_LAN}:41642").parse()?;
            let upstream: SocketAddr = format!("{PEER_LAN}:41641").parse()?;
            (listen.to_string(), Some(relay(lab.ns(peer).name.clone(), listen, upstream, impairment)?))
        }
        None => (format!("{PEER_LAN}:41641"), None),
    };
    let (pod_keys, peer_keys) = (Keys::generate(), Keys::generate());
    let peer_tun = lab.unique("ur");
    let config = format!(
        "[interface]\nprivate_key = \"{}\"\naddresses = [\"{PEER_MESH}/32\"]\nlisten_port = 41641\ntun_name = \"{}\"\n\n\
         [[peers]]\npublic_key = \"{}\"\nallowed_ips = [\"{POD_MESH}/32\"]\n",
        peer_keys.private, peer_tun, pod_keys.public
    );
    let path = lab.write("peer.toml", &config);
    let state = lab.path("peer-state");
    let args =
        ["daemon", "--config", path.to_str().unwrap_or_default(), "--state-dir", state.to_str().unwrap_or_default()];
    lab.spawn(peer, "meshd-peer", meshd.to_str().unwrap_or_default(), &args, &[("MESHD_LOG", "warn")]);
    if !wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        stdout(&lab.ns(peer).ip(&["-o", "addr"])).contains(PEER_MESH)
    }) {
        bail!("the peer's meshd did not come up");
    }
    lab.spawn(peer, "iperf3-server", "iperf3", &["-s", "-B", PEER_MESH], &[]);
    serve_http(&lab, peer)?;
    Ok(Setup { lab, pod, peer, pod_keys, peer_keys, endpoint, peer_tun, _relay: relay })
}

/// An HTTP server in `ns` on the peer's mesh address that answers every request with [`HTTP_BODY`] zero
/// bytes: fast enough that the tunnel, not the server, is measured.
fn serve_http(lab: &Lab, ns: usize) -> Result<()> {
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let name = lab.ns(ns).name.clone();
    std::thread::spawn(move || {
        mesh_netns::enter_namespace(&name);
        let listener = match TcpListener::bind((PEER_MESH, HTTP_PORT)) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
        };
        let _ = ready_tx.send(Ok(()));
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve_one(stream));
        }
    });
    ready.recv_timeout(Duration::from_secs(5)).context("HTTP server")?.map_err(anyhow::Error::msg)
}

fn serve_one(mut stream: TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let zeros = vec![0u8; 256 * 1024];
    let header = format!("HTTP/1.1 200 OK\r\nContent-Length: {HTTP_BODY}\r\nConnection: close\r\n\r\n");
    if stream.write_all(header.as_bytes()).is_err() {
        return;
    }
    let mut left = HTTP_BODY;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        if stream.write_all(&zeros[..n]).is_err() {
            return;
        }
        left -= n as u64;
    }
}

/// Starts the pod's side for `mode`; returns where the client connects and the process index.
fn start_pod(s: &mut Setup, meshd: &Path, onetun: &Path, mode: Mode) -> Result<usize> {
    let peer_endpoint = s.endpoint.clone();
    match mode {
        Mode::Onetun => {
            let forward = format!("127.0.0.1:{FORWARD_PORT}:{PEER_MESH}:5201:TCP");
            let args = [
                forward.as_str(),
                "--endpoint-addr",
                &peer_endpoint,
                "--endpoint-public-key",
                &s.peer_keys.public,
                "--private-key",
                &s.pod_keys.private,
                "--source-peer-ip",
                POD_MESH,
                "--keep-alive",
                "10",
                "--log",
                "error",
            ];
            Ok(s.lab.spawn(s.pod, "onetun", onetun.to_str().unwrap_or_default(), &args, &[]))
        }
        _ => {
            let tun = if mode == Mode::Kernel { s.lab.unique("up") } else { "userspace".into() };
            let config = format!(
                "[interface]\nprivate_key = \"{}\"\naddresses = [\"{POD_MESH}/32\"]\nlisten_port = 41641\n\n\
                 [[peers]]\npublic_key = \"{}\"\nendpoint = \"{peer_endpoint}\"\nallowed_ips = [\"{PEER_MESH}/32\"]\n\
                 persistent_keepalive = 10\n",
                s.pod_keys.private, s.peer_keys.public
            );
            let path = s.lab.write("pod.toml", &config);
            let state = s.lab.path("pod-state");
            let forward = format!("127.0.0.1:{FORWARD_PORT}={PEER_MESH}:5201");
            let mut args = vec![
                "daemon".to_string(),
                "--config".into(),
                path.to_string_lossy().into_owned(),
                "--state-dir".into(),
                state.to_string_lossy().into_owned(),
                "--tun".into(),
                tun,
            ];
            if mode != Mode::Kernel {
                args.extend(["--forward".into(), forward, "--socks5".into(), "127.0.0.1:1080".into()]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Ok(s.lab.spawn(s.pod, "meshd-pod", meshd.to_str().unwrap_or_default(), &args, &[("MESHD_LOG", "warn")]))
        }
    }
}

fn measure(
    meshd: &Path,
    onetun: &Path,
    mode: Mode,
    reverse: bool,
    netem: Option<Impairment>,
    seconds: u32,
) -> Result<f64> {
    let mut s = setup(meshd, netem)?;
    start_pod(&mut s, meshd, onetun, mode)?;
    let (host, port) = match mode {
        Mode::Kernel => (PEER_MESH, "5201"),
        _ => ("127.0.0.1", FORWARD_PORT),
    };
    if mode == Mode::Socks5 {
        return socks5_download(&s, seconds);
    }
    // The first connection may wait for the handshake; iperf3 retries are not its business.
    let up = wait_until(Duration::from_secs(15), Duration::from_millis(200), || {
        let probe = format!("TCP:{host}:{port},connect-timeout=1");
        let out = s.lab.ns(s.pod).exec("timeout", &["3", "socat", "-u", "/dev/null", &probe]);
        out.status.success()
    });
    if !up {
        bail!("{host}:{port} does not answer");
    }
    let secs = seconds.to_string();
    let mut args = vec!["-c", host, "-p", port, "-t", &secs, "-J"];
    if reverse {
        args.push("-R");
    }
    // MESHD_BENCH_CAPTURE=DIR: the decrypted TCP headers of each run, as the peer's TUN device sees them (to
    // see where a stream loses its time: retransmission timeouts, windows).
    if let Ok(dir) = std::env::var("MESHD_BENCH_CAPTURE") {
        let file = format!("{dir}/{mode:?}-{}-{}.pcap", if reverse { "down" } else { "up" }, netem.is_some());
        let args = ["-i", s.peer_tun.as_str(), "-s", "96", "-w", file.as_str(), "tcp"];
        s.lab.spawn(s.peer, "tcpdump", "tcpdump", &args, &[]);
    }
    // The probe above held the iperf3 server's one test slot for a moment (longer on a slow path): the
    // first attempt may be turned away.
    let mut last = String::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(1));
        let out = s.lab.ns(s.pod).exec("iperf3", &args);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
        if let Some(error) = report["error"].as_str() {
            last = error.to_string();
            continue;
        }
        let bps = report["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 result")?;
        return Ok(bps / 1e6);
    }
    bail!("iperf3: {last} ({} s, 3 attempts; peer namespace {})", seconds, s.lab.ns(s.peer).name)
}

/// curl through the SOCKS5 proxy, downloading from the peer for `seconds`.
fn socks5_download(s: &Setup, seconds: u32) -> Result<f64> {
    let url = format!("http://{PEER_MESH}:{HTTP_PORT}/");
    let ready = wait_until(Duration::from_secs(15), Duration::from_millis(200), || {
        let out = s.lab.ns(s.pod).exec(
            "curl",
            &["-s", "-o", "/dev/null", "--max-time", "1", "-r", "0-0", "--socks5-hostname", "127.0.0.1:1080", &url],
        );
        // A timeout after the first bytes is fine here: the path works.
        matches!(out.status.code(), Some(0) | Some(28))
    });
    if !ready {
        bail!("the SOCKS5 path does not answer");
    }
    let max = seconds.to_string();
    let out = s.lab.ns(s.pod).exec(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            &max,
            "-w",
            "%{size_download} %{time_total}",
            "--socks5-hostname",
            "127.0.0.1:1080",
            &url,
        ],
    );
    let text = stdout(&out);
    let mut parts = text.split_whitespace();
    let bytes: f64 = parts.next().and_then(|p| p.parse().ok()).context("curl size")?;
    let secs: f64 = parts.next().and_then(|p| p.parse().ok()).context("curl time")?;
    Ok(bytes * 8.0 / secs / 1e6)
}

fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Clock ticks of CPU the process used (user + system).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// RSS idle, CPU idle over 60 s, and peak RSS with 100 flows at once.
fn footprint(meshd: &Path) -> Result<()> {
    println!("\nuserspace meshd footprint");
    let mut s = setup(meshd, None)?;
    let onetun = PathBuf::new();
    let p = start_pod(&mut s, meshd, &onetun, Mode::Forward)?;
    let pid = s.lab.process(p).pid();
    let up = wait_until(Duration::from_secs(15), Duration::from_millis(200), || {
        let probe = format!("TCP:127.0.0.1:{FORWARD_PORT},connect-timeout=1");
        s.lab.ns(s.pod).exec("timeout", &["3", "socat", "-u", "/dev/null", &probe]).status.success()
    });
    if !up {
        bail!("the forward does not answer");
    }
    std::thread::sleep(Duration::from_secs(2));
    let idle_rss = proc_status(pid, "VmRSS:").context("VmRSS")?;
    println!("  RSS idle (one peer, session up, a forward and a proxy listening): {:.1} MB", idle_rss as f64 / 1024.0);
    let ticks = 100.0; // USER_HZ on Linux
    let before = cpu_ticks(pid).context("stat")?;
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(60));
    let used = (cpu_ticks(pid).context("stat")? - before) as f64 / ticks;
    println!(
        "  CPU idle over {:.0} s: {:.2} s ({:.3} % of one core; persistent keepalive every 10 s)",
        started.elapsed().as_secs_f64(),
        used,
        used / started.elapsed().as_secs_f64() * 100.0
    );
    let out = s.lab.ns(s.pod).exec("iperf3", &["-c", "127.0.0.1", "-p", FORWARD_PORT, "-t", "10", "-P", "100", "-J"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let bps = report["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0);
    let peak = proc_status(pid, "VmHWM:").context("VmHWM")?;
    println!(
        "  100 flows at once (iperf3 -P 100 through the forward): {:.0} Mbit/s in total, peak RSS {:.1} MB",
        bps / 1e6,
        peak as f64 / 1024.0
    );
    Ok(())
}
