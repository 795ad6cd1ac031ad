//! Hosts for end-to-end tests and benchmarks: network namespaces joined by veth links, processes started
//! inside them, and WireGuard keys. Everything is removed when its owner is dropped, on success and on
//! panic alike; processes are ended by the PID we started, never by name.
//!
//! Nothing a lab runs touches the host's own files: every process gets `MESHD_RUN_DIR` and
//! `MESHD_UAPI_DIR` inside the lab's directory and none of the caller's other `MESHD_*` variables, and
//! `wg`/`wireguard-go` (whose socket directory is compiled in) run in a private mount namespace where the
//! lab's directory is mounted over `/var/run/wireguard`. Namespace names start with a fixed prefix, so
//! [`clear_leftovers`] can remove what a killed run left behind.
//!
//! Needs root, `ip` (iproute2) and, for keys and reference peers, `wg` and `wireguard-go`. `cargo xtask ci`
//! installs them.
#![forbid(unsafe_code)]

pub mod podman;

use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Namespace tests share two CPUs and global names (`/var/run/wireguard/<dev>.sock`): one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The first characters of every namespace a test lab makes (tools such as the demo use [`TOOL_PREFIX`]).
pub const TEST_PREFIX: &str = "mt-";
/// The first characters of every namespace the demo and the benchmarks make.
pub const TOOL_PREFIX: &str = "mx-";

/// Where `wg` and `wireguard-go` look for their sockets; compiled into both.
const WIREGUARD_SOCKETS: &str = "/var/run/wireguard";

/// A command with none of the caller's `MESHD_*` variables, so a developer's or CI's environment never
/// changes what a test runs.
fn command(program: &str) -> Command {
    let mut c = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MESHD_") {
            c.env_remove(name);
        }
    }
    c
}

/// Removes the namespaces whose names start with `prefix`, ending the processes still inside them first
/// (they can only be ones an earlier, killed run started there), and the lab directories of such runs.
/// Returns the namespaces removed.
pub fn clear_leftovers(prefix: &str) -> Vec<String> {
    let listed = Command::new("ip").args(["netns", "list"]).output().map(|o| stdout(&o)).unwrap_or_default();
    let names: Vec<String> = listed
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(prefix))
        .map(str::to_string)
        .collect();
    for name in &names {
        let pids = Command::new("ip").args(["netns", "pids", name]).output().map(|o| stdout(&o)).unwrap_or_default();
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-s", "KILL", pid]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", name]).output();
    }
    if let Ok(entries) = fs::read_dir(NETNS_ETC) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir_prefix = lab_dir_prefix(prefix);
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&dir_prefix) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    names
}

/// Where `ip netns exec` finds files it bind-mounts over `/etc` for one namespace.
const NETNS_ETC: &str = "/etc/netns";

fn lab_dir_prefix(ns_prefix: &str) -> String {
    format!("meshd-lab-{ns_prefix}")
}

/// Runs a command and returns its output, panicking with everything it printed if it fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `check` every `every` until it holds or `limit` passes; returns whether it held.
pub fn wait_until(limit: Duration, every: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(every);
    }
}

/// A WireGuard key pair in base64, made with `wg genkey` / `wg pubkey`.
#[derive(Debug, Clone)]
pub struct Keys {
    pub private: String,
    pub public: String,
}

impl Keys {
    pub fn generate() -> Self {
        let private = stdout(&run("wg", &["genkey"])).trim().to_string();
        let mut child = Command::new("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cannot run wg pubkey");
        std::io::Write::write_all(child.stdin.as_mut().expect("piped"), private.as_bytes()).expect("write key");
        let out = child.wait_with_output().expect("wg pubkey");
        Keys { private, public: stdout(&out).trim().to_string() }
    }

    /// The private key in every spelling a leak could take: base64 as given, and hex as the UAPI writes it.
    pub fn private_spellings(&self) -> [String; 2] {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD.decode(&self.private).expect("wg genkey is base64");
        [self.private.clone(), hex::encode(bytes)]
    }
}

/// A process started inside a namespace, with its output in a log file.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends a signal by number (`kill -s`), to this process only.
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill").args(["-s", signal, &self.pid().to_string()]).status();
    }

    /// SIGTERM, then waits up to `limit` for a clean exit; SIGKILL if it does not come. Returns the exit code.
    pub fn stop(&mut self, limit: Duration) -> Option<i32> {
        if !self.running() {
            return self.child.try_wait().ok().flatten().and_then(|s| s.code());
        }
        self.signal("TERM");
        if wait_until(limit, Duration::from_millis(20), || !matches!(self.child.try_wait(), Ok(None))) {
            return self.child.try_wait().ok().flatten().and_then(|s| s.code());
        }
        self.kill();
        None
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// A network namespace, deleted (with its links) on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    /// The lab's directories that stand in for the host's `/run/meshd` and `/var/run/wireguard`.
    run_dir: PathBuf,
    uapi_dir: PathBuf,
}

impl Netns {
    fn new(name: String, run_dir: PathBuf, uapi_dir: PathBuf) -> Self {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name, run_dir, uapi_dir };
        // A resolv.conf of its own (a copy of the host's), which `ip netns exec` mounts over /etc/resolv.conf:
        // a daemon pointing DNS at the mesh changes its namespace's file, never the host's.
        ns.set_resolv_conf(&fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
        ns.ip(&["link", "set", "lo", "up"]);
        // A new namespace inherits the host's ip_forward, which container engines turn on; a host here
        // forwards only where its test says so.
        ns.exec_ok("sysctl", &["-qw", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"]);
        ns
    }

    /// Moves the calling thread into this network namespace, so the sockets it (and every thread it
    /// starts, such as an async runtime's workers) opens from now on are the namespace's. For load
    /// generators that would cost too much as one process per connection; use it on a thread of its own.
    pub fn enter_on_this_thread(&self) {
        enter_namespace(&self.name);
    }

    /// `program args` inside the namespace, with the lab's environment.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = command("ip");
        c.args(["netns", "exec", &self.name, program]).args(args);
        c.env("MESHD_RUN_DIR", &self.run_dir).env("MESHD_UAPI_DIR", &self.uapi_dir);
        c
    }

    /// Like [`Netns::command`], in a private mount namespace that sees the lab's socket directory at
    /// `/var/run/wireguard`: for `wg` and `wireguard-go`, which cannot be told another one.
    pub fn wireguard_command(&self, program: &str, args: &[&str]) -> Command {
        let uapi = self.uapi_dir.to_str().expect("utf-8 lab path");
        let mut all = vec!["--mount", "--propagation", "private", "sh", "-c"];
        all.extend([r#"mount --bind "$0" "$1" && shift && exec "$@""#, uapi, WIREGUARD_SOCKETS, program]);
        all.extend_from_slice(args);
        self.command("unshare", &all)
    }

    /// `wg ARGS` inside the namespace, reading the sockets of the lab's devices; panics if it fails.
    pub fn wg(&self, args: &[&str]) -> Output {
        let out = self.wireguard_command("wg", args).output().expect("cannot run wg");
        assert!(
            out.status.success(),
            "wg {} in {} failed: {}{}",
            args.join(" "),
            self.name,
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a command inside the namespace and returns its output without judging it.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        self.command(program, args).output().unwrap_or_else(|e| panic!("cannot run {program} in {}: {e}", self.name))
    }

    /// Like [`Netns::exec`] but panics with the output if the command fails.
    pub fn exec_ok(&self, program: &str, args: &[&str]) -> Output {
        let out = self.exec(program, args);
        assert!(
            out.status.success(),
            "{program} {} in {} failed: {}{}",
            args.join(" "),
            self.name,
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Replaces the namespace's own resolv.conf (what programs run in it see at /etc/resolv.conf).
    pub fn set_resolv_conf(&self, text: &str) {
        let dir = self.etc_dir();
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        fs::write(dir.join("resolv.conf"), text).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }

    /// The namespace's resolv.conf as it is now.
    pub fn resolv_conf(&self) -> String {
        fs::read_to_string(self.etc_dir().join("resolv.conf")).unwrap_or_default()
    }

    fn etc_dir(&self) -> PathBuf {
        Path::new(NETNS_ETC).join(&self.name)
    }

    /// Whether `ping` from this namespace reaches `addr` (one echo, one second).
    pub fn ping(&self, addr: &str) -> bool {
        self.exec("ping", &["-c", "1", "-W", "1", "-q", addr]).status.success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(self.etc_dir());
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A set of namespaces, processes and files for one test. Processes stop first, then namespaces go, then
/// the directory. If the test is panicking, the processes' logs are printed first.
#[derive(Debug)]
pub struct Lab {
    processes: Vec<Process>,
    namespaces: Vec<Netns>,
    pub dir: PathBuf,
    tag: String,
    prefix: &'static str,
    links: u32,
    _serial: MutexGuard<'static, ()>,
}

impl Lab {
    /// A new lab for a test; waits for any other lab in this process to finish first.
    pub fn new(name: &str) -> Self {
        Self::with_prefix(name, TEST_PREFIX)
    }

    /// A new lab for the demo or a benchmark: its namespaces are not a test's leftovers.
    pub fn for_tool(name: &str) -> Self {
        Self::with_prefix(name, TOOL_PREFIX)
    }

    fn with_prefix(name: &str, prefix: &'static str) -> Self {
        let serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{}", std::process::id() % 100_000, n);
        let dir = std::env::temp_dir().join(format!("{}{name}-{tag}", lab_dir_prefix(prefix)));
        let _ = fs::remove_dir_all(&dir);
        for sub in ["", "run", "wireguard"] {
            fs::create_dir_all(dir.join(sub)).expect("lab directory");
        }
        // The mount point for the lab's socket directory; wireguard-tools makes the same directory.
        fs::create_dir_all(WIREGUARD_SOCKETS).expect("/var/run/wireguard");
        Lab { processes: Vec::new(), namespaces: Vec::new(), dir, tag, prefix, links: 0, _serial: serial }
    }

    /// What stands in for `/run/meshd` for every meshd the lab runs (`MESHD_RUN_DIR`).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// What stands in for `/var/run/wireguard` for every process the lab runs (`MESHD_UAPI_DIR`).
    pub fn uapi_dir(&self) -> PathBuf {
        self.dir.join("wireguard")
    }

    /// A unique short name (interface and namespace names are limited to 15 bytes).
    pub fn unique(&self, prefix: &str) -> String {
        let name = format!("{prefix}{}", self.tag);
        assert!(name.len() <= 15, "{name} is too long for an interface name");
        name
    }

    pub fn netns(&mut self, prefix: &str) -> usize {
        let name = format!("{}{}", self.prefix, self.unique(prefix));
        let ns = Netns::new(name, self.run_dir(), self.uapi_dir());
        self.namespaces.push(ns);
        self.namespaces.len() - 1
    }

    pub fn ns(&self, i: usize) -> &Netns {
        &self.namespaces[i]
    }

    /// The subnet-router shape (design S1): a client on an underlay 192.168.90.0/24 with a router (.1) that
    /// forwards into a LAN 10.0.12.0/24 (router .1) holding one server at 10.0.12.50. Namespace name prefixes
    /// are given as `[client, router, server]`; returns their indices in that order.
    pub fn subnet_router(&mut self, names: [&str; 3]) -> (usize, usize, usize) {
        let (client, router, server) = (self.netns(names[0]), self.netns(names[1]), self.netns(names[2]));
        self.link(client, "192.168.90.2/24", router, "192.168.90.1/24");
        self.link(router, "10.0.12.1/24", server, "10.0.12.50/24");
        self.ns(router).exec_ok("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        (client, router, server)
    }

    /// Joins two namespaces with a veth pair and addresses (`a_addr`, `b_addr` with prefix, e.g. 10.1.0.1/24).
    pub fn link(&mut self, a: usize, a_addr: &str, b: usize, b_addr: &str) -> (String, String) {
        self.links += 1;
        let a_if = self.unique(&format!("v{}a", self.links));
        let b_if = self.unique(&format!("v{}b", self.links));
        let (na, nb) = (&self.namespaces[a], &self.namespaces[b]);
        na.ip(&["link", "add", &a_if, "type", "veth", "peer", "name", &b_if, "netns", &nb.name]);
        na.ip(&["addr", "add", a_addr, "dev", &a_if]);
        nb.ip(&["addr", "add", b_addr, "dev", &b_if]);
        na.ip(&["link", "set", &a_if, "up"]);
        nb.ip(&["link", "set", &b_if, "up"]);
        (a_if, b_if)
    }

    /// A switch: a bridge in namespace `hub` holding `hub_addr`, and a veth from each member (with its
    /// address) plugged into it, so every member and the hub share one subnet.
    pub fn switch(&mut self, hub: usize, hub_addr: &str, members: &[(usize, &str)]) {
        let bridge = self.unique(&format!("br{}", self.links));
        let h = &self.namespaces[hub];
        h.ip(&["link", "add", &bridge, "type", "bridge"]);
        h.ip(&["addr", "add", hub_addr, "dev", &bridge]);
        h.ip(&["link", "set", &bridge, "up"]);
        for &(member, addr) in members {
            self.links += 1;
            let hub_if = self.unique(&format!("v{}h", self.links));
            let member_if = self.unique(&format!("v{}m", self.links));
            let (h, m) = (&self.namespaces[hub], &self.namespaces[member]);
            h.ip(&["link", "add", &hub_if, "type", "veth", "peer", "name", &member_if, "netns", &m.name]);
            h.ip(&["link", "set", &hub_if, "master", &bridge, "up"]);
            m.ip(&["addr", "add", addr, "dev", &member_if]);
            m.ip(&["link", "set", &member_if, "up"]);
        }
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.join(name);
        fs::write(&path, contents).expect("write lab file");
        path
    }

    /// Starts `program args` inside namespace `ns`, output to `<dir>/<name>.log`; returns its index.
    pub fn spawn(&mut self, ns: usize, name: &str, program: &str, args: &[&str], env: &[(&str, &str)]) -> usize {
        let command = self.namespaces[ns].command(program, args);
        self.spawn_command(name, command, env)
    }

    /// Starts a command made by [`Netns::command`] or [`Netns::wireguard_command`]; returns its index.
    pub fn spawn_command(&mut self, name: &str, mut command: Command, env: &[(&str, &str)]) -> usize {
        let log = self.dir.join(format!("{name}.log"));
        let file = fs::File::create(&log).expect("log file");
        let program = format!("{:?}", command.get_program());
        let child = command
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        self.processes.push(Process { name: name.to_string(), child, log });
        self.processes.len() - 1
    }

    pub fn process(&mut self, i: usize) -> &mut Process {
        &mut self.processes[i]
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in &self.processes {
                eprintln!("----- {} ({}) -----\n{}", p.name, p.log.display(), p.log_text());
            }
        }
        for mut p in self.processes.drain(..) {
            p.stop(Duration::from_secs(3));
        }
        self.namespaces.clear();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A CA and a certificate for `ip` signed by it, in the lab directory (`ca.pem`, `server.pem`, `server.key`),
/// for a coordination server speaking HTTPS to nodes that trust only that CA.
pub fn make_certificates(lab: &Lab, ip: &str) {
    let dir = lab.dir.to_str().expect("utf-8 path");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=meshd test CA"]);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=control"]);
    lab.write("san.ext", &format!("subjectAltName=IP:{ip}\n"));
    let sign = [
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    ];
    for args in [ca, csr, sign.to_vec()] {
        let out = Command::new("openssl").args(&args).current_dir(dir).output().expect("openssl runs");
        assert!(out.status.success(), "openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
}

/// Starts wireguard-go as device `dev` in namespace `ns`, with `keys`, `listen_port` and one peer, addresses
/// and a route for the peer's allowed IPs; returns the process index.
#[allow(clippy::too_many_arguments)]
pub fn start_wireguard_go(
    lab: &mut Lab,
    ns: usize,
    dev: &str,
    keys: &Keys,
    listen_port: u16,
    address: &str,
    peer_public: &str,
    peer_endpoint: &str,
    peer_allowed: &str,
    keepalive: Option<u16>,
) -> usize {
    let sock = lab.uapi_dir().join(format!("{dev}.sock"));
    // A killed wireguard-go leaves its socket file; waiting for it would then wait for nothing.
    let _ = fs::remove_file(&sock);
    let command = lab.ns(ns).wireguard_command("wireguard-go", &["-f", dev]);
    let proc_index = lab.spawn_command(
        &format!("wireguard-go-{dev}"),
        command,
        &[("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")],
    );
    let ready = || sock.exists() && lab.ns(ns).exec("ip", &["link", "show", dev]).status.success();
    assert!(wait_until(Duration::from_secs(5), Duration::from_millis(20), ready), "wireguard-go did not start");
    let key_file = lab.write(&format!("{dev}.key"), &keys.private);
    let n = lab.ns(ns);
    n.ip(&["addr", "add", address, "dev", dev]);
    n.ip(&["link", "set", dev, "up"]);
    let port = listen_port.to_string();
    let key_path = key_file.to_str().expect("utf-8 path");
    let mut args = vec!["set", dev, "private-key", key_path, "listen-port", &port, "peer", peer_public];
    args.extend(["allowed-ips", peer_allowed, "endpoint", peer_endpoint]);
    let keepalive = keepalive.map(|k| k.to_string());
    if let Some(k) = &keepalive {
        args.extend(["persistent-keepalive", k.as_str()]);
    }
    n.wg(&args);
    for prefix in peer_allowed.split(',') {
        n.ip(&["route", "replace", prefix, "dev", dev]);
    }
    proc_index
}

/// Moves the calling thread into the network namespace `name` (see [`Netns::enter_on_this_thread`]), for a
/// thread that outlives the borrow of its [`Netns`].
pub fn enter_namespace(name: &str) {
    let path = format!("/run/netns/{}", name);
    let fd = rustix::fs::open(
        path.as_str(),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .unwrap_or_else(|e| panic!("{path}: {e}"));
    rustix::thread::move_into_link_name_space(fd.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
        .unwrap_or_else(|e| panic!("entering {}: {e}", name));
}
