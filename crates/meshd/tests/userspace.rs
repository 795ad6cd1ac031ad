//! Userspace mode end to end, seed 003's story through the real coordination server: a database node and a
//! cache node run in kernel mode (tagged), with a real PostgreSQL and a real Redis; a "pod" namespace runs
//! meshd in userspace mode as an unprivileged user with every capability dropped (`setpriv`), configured by
//! its environment alone and joined with a reusable, ephemeral, tagged key under seed 003's ACL. In the pod,
//! the unmodified clients use the real names: `psql -h stackeye-db-prd` and `redis-cli -h
//! stackeye-valkey-prd` through forwards and the DNS stub, `curl --socks5-hostname` and `curl --proxy`
//! through the proxy; the database's port 22 stays closed to the pod. A peer reaches the pod's exposed port
//! and not another one. SIGTERM removes the ephemeral node from the server within 5 s, the next pod takes the
//! same name, and the pod wrote nothing to disk.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::MESHD;
use common::managed::{Control, Node, switched_mesh};
use mesh_netns::{Lab, stdout, wait_until};

mod common;

/// Seed 003's policy, plus the database node reaching the workers' ports 8081-8083 (so a refusal there is
/// the pod's `--expose` list at work, not the ACL), and a web port and a UDP echo on the database for the
/// proxy and UDP checks.
const POLICY: &str = r#"{
  "tagOwners": {"tag:stackeye-worker": [], "tag:stackeye-db": [], "tag:stackeye-cache": []},
  "acls": [
    {"action": "accept", "src": ["tag:stackeye-worker"], "dst": ["tag:stackeye-db:5432,8080,5353", "tag:stackeye-cache:6379"]},
    {"action": "accept", "src": ["tag:stackeye-db"], "dst": ["tag:stackeye-worker:8081,8082,8083"]},
  ],
}"#;

/// The unprivileged user the pod runs as (nobody).
const POD_UID: &str = "65534";

fn wait(limit_ms: u64, check: impl FnMut() -> bool) -> bool {
    wait_until(Duration::from_millis(limit_ms), Duration::from_millis(100), check)
}

fn listening(lab: &Lab, ns: usize, what: &str) -> bool {
    stdout(&lab.ns(ns).exec("ss", &["-ltnu"])).contains(what)
}

/// A web server on `addr:port` in `ns` whose index is `body` (Python's, which reads the whole request before
/// it answers, as real servers do).
fn http_responder(lab: &mut Lab, ns: usize, addr: &str, port: u16, body: &str) {
    let root = lab.path(&format!("www-{port}"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.html"), body).unwrap();
    let port_text = port.to_string();
    let args = ["-m", "http.server", &port_text, "--bind", addr, "--directory", root.to_str().unwrap()];
    lab.spawn(ns, &format!("http-{port}"), "python3", &args, &[]);
    let bound = format!("{addr}:{port}");
    assert!(wait(5000, || listening(lab, ns, &bound)), "nothing listens on {bound}");
}

/// A UDP echo on `addr:port` in `ns`.
fn udp_echo(lab: &mut Lab, ns: usize, addr: &str, port: u16) {
    let spec = format!("UDP4-RECVFROM:{port},bind={addr},fork");
    lab.spawn(ns, &format!("udp-echo-{port}"), "socat", &[&spec, "EXEC:cat"], &[]);
    let bound = format!("{addr}:{port}");
    assert!(wait(5000, || listening(lab, ns, &bound)), "nothing listens on UDP {bound}");
}

/// A SOCKS5 UDP ASSOCIATE client (no packaged client speaks it): sends `payload` to `name:port` through
/// the proxy's relay and prints the answer.
const SOCKS5_UDP_CLIENT: &str = r#"
import socket, struct, sys
proxy, target, port, payload = ("127.0.0.1", 1080), sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
c = socket.create_connection(proxy, timeout=5)
c.sendall(b"\x05\x01\x00"); assert c.recv(2) == b"\x05\x00"
c.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
r = c.recv(10); assert r[1] == 0, r
relay = (socket.inet_ntoa(r[4:8]), struct.unpack(">H", r[8:10])[0])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
name = target.encode()
u.sendto(b"\x00\x00\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", port) + payload, relay)
data, _ = u.recvfrom(65535)
assert data[:4] == b"\x00\x00\x00\x01", data
print(data[10:].decode())
"#;

/// Debian's PostgreSQL server, run by its own user in a fresh cluster under the lab directory, trusting
/// every client (the mesh and the ACL are what this test is about).
fn postgres(lab: &mut Lab, ns: usize) {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (cargo xtask ci installs it)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .find(|b| b.join("initdb").exists())
        .expect("initdb");
    let data = lab.path("pgdata");
    let sockets = lab.path("pgsock");
    for dir in [&data, &sockets] {
        std::fs::create_dir_all(dir).unwrap();
        assert!(mesh_netns::run("chown", &["postgres:postgres", dir.to_str().unwrap()]).status.success());
    }
    let as_postgres = ["--reuid", "postgres", "--regid", "postgres", "--init-groups", "--"];
    let initdb = bin.join("initdb");
    let mut args: Vec<&str> = as_postgres.to_vec();
    args.extend([
        initdb.to_str().unwrap(),
        "-D",
        data.to_str().unwrap(),
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
    ]);
    let out = mesh_netns::run("setpriv", &args);
    assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
    let hba = data.join("pg_hba.conf");
    let mut text = std::fs::read_to_string(&hba).unwrap();
    text.push_str("host all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n");
    std::fs::write(&hba, text).unwrap();
    let server = bin.join("postgres");
    let mut args: Vec<&str> = as_postgres.to_vec();
    args.extend([server.to_str().unwrap(), "-D", data.to_str().unwrap(), "-c", "listen_addresses=*", "-k"]);
    args.push(sockets.to_str().unwrap());
    lab.spawn(ns, "postgres", "setpriv", &args, &[]);
    assert!(wait(15_000, || listening(lab, ns, "0.0.0.0:5432")), "PostgreSQL did not start");
}

fn redis(lab: &mut Lab, ns: usize) {
    let args = ["--reuid", POD_UID, "--regid", POD_UID, "--clear-groups", "--", "redis-server", "--port", "6379"];
    let mut all = args.to_vec();
    all.extend(["--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"]);
    lab.spawn(ns, "redis", "setpriv", &all, &[]);
    assert!(wait(10_000, || listening(lab, ns, "0.0.0.0:6379")), "Redis did not start");
}

/// Files the pod's user owns in the places it could write to.
fn files_of_pod_user() -> BTreeSet<String> {
    let out = mesh_netns::run("find", &["/tmp", "/var/tmp", "/dev/shm", "/run", "/var/lib", "-xdev", "-user", POD_UID]);
    stdout(&out).lines().map(str::to_string).collect()
}

/// The pod: meshd in userspace mode as nobody, no capabilities, configured by its environment alone.
struct Pod {
    ns: usize,
    process: usize,
    socket: String,
}

impl Pod {
    fn start(lab: &mut Lab, ns: usize, control: &Control, key: &str, log: &str) -> Pod {
        // A copy of the binary the pod's user can run, wherever the checkout lives; a directory it can use
        // for the local API socket (and nothing else).
        let binary = lab.path("meshd-pod");
        if !binary.exists() {
            std::fs::copy(MESHD, &binary).unwrap();
        }
        let run = lab.path("pod-run");
        std::fs::create_dir_all(&run).unwrap();
        assert!(mesh_netns::run("chmod", &["1777", run.to_str().unwrap()]).status.success());
        let socket = run.join("meshd.sock").to_str().unwrap().to_string();
        let env = [
            ("MESHD_TUN", "userspace"),
            ("MESHD_STATE_DIR", "mem:"),
            ("MESHD_SOCKET", socket.as_str()),
            ("MESHD_UAPI_DIR", run.to_str().unwrap()),
            ("MESHD_CONTROL_URL", control.url.as_str()),
            ("MESHD_CA_CERT", control.ca.as_str()),
            ("MESHD_AUTH_KEY", key),
            ("MESHD_HOSTNAME", "stackeye-worker"),
            (
                "MESHD_FORWARD",
                "127.0.0.1:5432=stackeye-db-prd:5432,127.0.0.1:6379=stackeye-valkey-prd:6379,\
                 127.0.0.1:5353=stackeye-db-prd:5353/udp",
            ),
            ("MESHD_DNS", "127.0.0.53:53"),
            ("MESHD_DNS_UPSTREAM", "10.99.0.1"),
            ("MESHD_SOCKS5", "127.0.0.1:1080"),
            ("MESHD_HTTP_PROXY", "127.0.0.1:1080"),
            ("MESHD_EXPOSE", "8081=18081,8083=18083/udp"),
            ("MESHD_HEALTH", "127.0.0.1:9002"),
            ("MESHD_DRAIN", "3s"),
            ("MESHD_LOG", "debug,ureq=info,ureq_proto=info,rustls=info"),
        ];
        let unprivileged = [
            "--reuid",
            POD_UID,
            "--regid",
            POD_UID,
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
            binary.to_str().unwrap(),
            "daemon",
        ];
        let process = lab.spawn(ns, log, "setpriv", &unprivileged, &env);
        let pod = Pod { ns, process, socket };
        assert!(
            wait(20_000, || Path::new(&pod.socket).exists() && lab.process(process).log_text().contains("meshd is up")),
            "the pod's meshd did not start:\n{}",
            lab.process(process).log_text()
        );
        pod
    }

    fn cli(&self, lab: &Lab, args: &[&str]) -> (bool, String) {
        let mut all = args.to_vec();
        all.extend(["--socket", &self.socket]);
        let out = lab.ns(self.ns).exec(MESHD, &all);
        (out.status.success(), format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr)))
    }

    fn exec(&self, lab: &Lab, program: &str, args: &[&str]) -> (bool, String) {
        let out = lab.ns(self.ns).exec("timeout", &[&["20", program], args].concat());
        (out.status.success(), format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr)))
    }
}

/// `meshd up` with a tagged key under the seed's host name.
fn join(lab: &Lab, control: &Control, node: &Node, tag: &str, hostname: &str) {
    let key = control.authkey(lab, &["--reusable", "--tags", tag]);
    let args =
        ["up", "--control-url", &control.url, "--ca-cert", &control.ca, "--auth-key", &key, "--hostname", hostname];
    let (status, _, err) = node.cli(lab, &args);
    assert_eq!(status, Some(0), "up {hostname}: {err}");
}

fn running(lab: &Lab, pod: &Pod) -> bool {
    let (ok, text) = pod.cli(lab, &["status", "--json"]);
    ok && serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|s| s["state"] == "running")
}

fn node_names(lab: &Lab, control: &Control) -> String {
    let (status, out, err) = control.admin(lab, &["nodes", "list"]);
    assert_eq!(status, Some(0), "nodes list: {err}");
    out
}

#[test]
fn seed_003_a_sidecar_without_privileges_reaches_postgres_and_redis_by_name() {
    let (mut lab, control, hosts) = switched_mesh("us", 3, Some(POLICY));
    let (db_ns, cache_ns, pod_ns) = (hosts[0], hosts[1], hosts[2]);
    let db = Node::start(&mut lab, db_ns, "db");
    let cache = Node::start(&mut lab, cache_ns, "cache");
    join(&lab, &control, &db, "tag:stackeye-db", "stackeye-db-prd");
    join(&lab, &control, &cache, "tag:stackeye-cache", "stackeye-valkey-prd");
    postgres(&mut lab, db_ns);
    redis(&mut lab, cache_ns);
    http_responder(&mut lab, db_ns, "0.0.0.0", 8080, "hello from the database host");
    http_responder(&mut lab, db_ns, "0.0.0.0", 22, "SSH-2.0-not-for-workers");
    udp_echo(&mut lab, db_ns, "0.0.0.0", 5353);

    // The pod: apps resolve through the stub (binding port 53 unprivileged is a safe, per-pod sysctl), and
    // serve two local ports of which only one is exposed.
    let sysctl = lab.ns(pod_ns).exec("sysctl", &["-w", "net.ipv4.ip_unprivileged_port_start=0"]);
    assert!(sysctl.status.success());
    lab.ns(pod_ns).set_resolv_conf("nameserver 127.0.0.53\noptions ndots:1\n");
    http_responder(&mut lab, pod_ns, "127.0.0.1", 18081, "exposed pod service");
    http_responder(&mut lab, pod_ns, "127.0.0.1", 8082, "private pod service");
    udp_echo(&mut lab, pod_ns, "127.0.0.1", 18083);
    let before = files_of_pod_user();

    let worker_key = control.authkey(&lab, &["--reusable", "--ephemeral", "--tags", "tag:stackeye-worker"]);
    let pod = Pod::start(&mut lab, pod_ns, &control, &worker_key, "pod");
    assert!(wait(20_000, || running(&lab, &pod)), "the pod did not join: {}", pod.cli(&lab, &["status"]).1);
    let (ok, status) = pod.cli(&lab, &["status"]);
    assert!(ok, "{status}");
    assert!(status.contains("userspace mode: no TUN device, capabilities none"), "{status}");
    assert!(status.contains("forward 127.0.0.1:5432=stackeye-db-prd:5432"), "{status}");
    let pod_ip = {
        let json: serde_json::Value = serde_json::from_str(&pod.cli(&lab, &["status", "--json"]).1).unwrap();
        json["node"]["ipv4"].as_str().unwrap().to_string()
    };
    let (ok, doctor) = pod.cli(&lab, &["doctor", "--tun", "userspace"]);
    assert!(ok && doctor.contains("changes nothing on this host"), "{doctor}");
    // Nothing of the host was touched: no TUN device, no mesh table.
    let links = stdout(&lab.ns(pod_ns).ip(&["-o", "link"]));
    assert!(!links.contains("tun"), "{links}");
    assert!(stdout(&lab.ns(pod_ns).ip(&["rule"])).lines().count() <= 3, "no policy rules were added");

    // Ready once the forwards' targets have sessions (the check itself starts the handshakes).
    assert!(
        wait(20_000, || pod.exec(&lab, "curl", &["-sf", "http://127.0.0.1:9002/readyz"]).0),
        "never ready: {}",
        pod.exec(&lab, "curl", &["-s", "http://127.0.0.1:9002/readyz"]).1
    );
    assert!(pod.exec(&lab, "curl", &["-sf", "http://127.0.0.1:9002/livez"]).0);

    // The DNS stub: a forward's name answers with the forward's address, other mesh names with mesh
    // addresses, and other names go upstream (here: nothing answers there, so SERVFAIL, not a hang).
    let (_, answer) = pod.exec(&lab, "dig", &["@127.0.0.53", "+short", "+time=2", "stackeye-db-prd"]);
    assert_eq!(answer.trim(), "127.0.0.1");
    let (_, answer) = pod.exec(&lab, "dig", &["@127.0.0.53", "+short", "+time=2", "stackeye-db-prd.mesh.internal"]);
    assert_eq!(answer.trim(), "127.0.0.1");
    let (_, answer) = pod.exec(&lab, "dig", &["@127.0.0.53", "+short", "+time=2", "stackeye-worker.mesh.internal"]);
    assert_eq!(answer.trim(), pod_ip);

    // The unmodified clients, by the real names.
    let (ok, out) = pod.exec(&lab, "psql", &["-h", "stackeye-db-prd", "-U", "postgres", "-tAc", "select 40 + 2"]);
    assert!(ok && out.trim() == "42", "psql: {out}");
    let (ok, out) =
        pod.exec(&lab, "psql", &["-h", "stackeye-db-prd", "-U", "postgres", "-tAc", "select inet_client_addr()"]);
    assert!(ok && out.trim() == pod_ip, "the database sees the pod's mesh address: {out}");
    let (ok, out) = pod.exec(&lab, "redis-cli", &["-h", "stackeye-valkey-prd", "set", "seed", "003"]);
    assert!(ok && out.trim() == "OK", "redis-cli: {out}");
    let (ok, out) = pod.exec(&lab, "redis-cli", &["-h", "stackeye-valkey-prd", "get", "seed"]);
    assert!(ok && out.trim() == "003", "redis-cli: {out}");
    // A bigger value both ways: flow control across the stack, not just one segment.
    let set = "head -c 3000000 /dev/zero | tr '\\0' x | redis-cli -h stackeye-valkey-prd -x set big";
    let (ok, out) = pod.exec(&lab, "sh", &["-c", set]);
    assert!(ok && out.trim() == "OK", "redis-cli set big: {out}");
    let (ok, out) = pod.exec(&lab, "sh", &["-c", "redis-cli -h stackeye-valkey-prd get big | tr -d '\\n' | wc -c"]);
    assert!(ok && out.trim() == "3000000", "redis-cli get big: {out}");

    // UDP: a forward, and SOCKS5 UDP ASSOCIATE by name.
    let (ok, out) = pod.exec(&lab, "sh", &["-c", "echo datagram | socat -t 2 - UDP4:127.0.0.1:5353"]);
    assert!(ok && out.trim() == "datagram", "UDP forward: {out}");
    let (ok, out) = pod.exec(&lab, "python3", &["-c", SOCKS5_UDP_CLIENT, "stackeye-db-prd", "5353", "associated"]);
    assert!(ok && out.trim() == "associated", "SOCKS5 UDP ASSOCIATE: {out}");
    // Ping through the tunnel works as in kernel mode.
    let (ok, out) = pod.cli(&lab, &["ping", "stackeye-db-prd"]);
    assert!(ok && out.contains("pong"), "meshd ping: {out}");

    // The proxy, SOCKS5 and HTTP on one port, resolving mesh names itself.
    let (ok, out) =
        pod.exec(&lab, "curl", &["-sS", "--socks5-hostname", "127.0.0.1:1080", "http://stackeye-db-prd:8080/"]);
    assert!(ok && out.contains("hello from the database host"), "curl --socks5-hostname: {out}");
    let (ok, out) =
        pod.exec(&lab, "curl", &["-sS", "--proxy", "http://127.0.0.1:1080", "http://stackeye-db-prd:8080/"]);
    assert!(ok && out.contains("hello from the database host"), "curl --proxy: {out}");
    let (ok, out) = pod.exec(
        &lab,
        "curl",
        &["-sS", "--proxytunnel", "--proxy", "http://127.0.0.1:1080", "http://stackeye-db-prd:8080/"],
    );
    assert!(ok && out.contains("hello from the database host"), "curl through HTTP CONNECT: {out}");
    // The ACL still decides: port 22 on the database is not for workers.
    let start = Instant::now();
    let (ok, out) = pod.exec(
        &lab,
        "curl",
        &["-sS", "--max-time", "15", "--socks5-hostname", "127.0.0.1:1080", "http://stackeye-db-prd:22/"],
    );
    assert!(!ok && !out.contains("SSH-2.0"), "port 22 must stay closed to the pod: {out}");
    assert!(start.elapsed() < Duration::from_secs(16));
    let (ok, out) = pod.exec(&lab, "curl", &["-sS", "--socks5-hostname", "127.0.0.1:1080", "http://nobody-here:80/"]);
    assert!(!ok, "an unknown name is refused: {out}");

    // Inbound: a peer the ACL allows reaches the exposed port, and not the other one.
    let url = |port: u16| format!("http://{pod_ip}:{port}/");
    let out = lab.ns(db_ns).exec("curl", &["-sS", "--max-time", "10", &url(8081)]);
    let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("exposed pod service"), "a peer reaches the exposed port: {text}");
    let asked = Instant::now();
    let out = lab.ns(db_ns).exec("curl", &["-sS", "--max-time", "10", &url(8082)]);
    let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && !text.contains("private pod service"), "8082 is not exposed: {text}");
    // Refused with a reset at once, not left to time out.
    assert!(text.contains("Couldn't connect") && asked.elapsed() < Duration::from_secs(5), "{text}");

    let udp = format!("echo exposed | socat -t 2 - UDP4:{pod_ip}:8083");
    let out = lab.ns(db_ns).exec("timeout", &["10", "sh", "-c", &udp]);
    assert_eq!(stdout(&out).trim(), "exposed", "a peer reaches the exposed UDP port");

    // SIGTERM: the flows drain, the ephemeral node logs out and the server forgets it at once.
    assert!(node_names(&lab, &control).contains("stackeye-worker"));
    let stopped = Instant::now();
    let code = lab.process(pod.process).stop(Duration::from_secs(15));
    assert_eq!(code, Some(0), "{}", lab.process(pod.process).log_text());
    assert!(
        wait(5000, || !node_names(&lab, &control).contains("stackeye-worker")),
        "the ephemeral node is still listed: {}",
        node_names(&lab, &control)
    );
    assert!(stopped.elapsed() < Duration::from_secs(10), "stopping took {:?}", stopped.elapsed());
    assert!(lab.process(pod.process).log_text().contains("logged out"));
    assert!(!Path::new(&pod.socket).exists(), "the local API socket is removed");
    assert_eq!(files_of_pod_user(), before, "the pod wrote files with --state-dir mem:");

    // The next pod takes the same name, not stackeye-worker-1.
    let next = Pod::start(&mut lab, pod_ns, &control, &worker_key, "pod-again");
    assert!(wait(20_000, || running(&lab, &next)));
    let json: serde_json::Value = serde_json::from_str(&next.cli(&lab, &["status", "--json"]).1).unwrap();
    assert_eq!(json["node"]["name"], "stackeye-worker");
    lab.process(next.process).stop(Duration::from_secs(15));
}

#[test]
fn userspace_flags_are_checked_before_anything_starts() {
    let lab = Lab::new("usflags");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(MESHD).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let state = lab.path("state");
    let state = state.to_str().unwrap();
    let (code, err) = run(&["daemon", "--state-dir", state, "--forward", "5432=db:5432"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("need --tun userspace"), "{err}");
    let (code, err) = run(&["daemon", "--tun", "userspace", "--state-dir", state, "--forward", "5432=db"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("needs a port"), "{err}");
    let twice = "5432=db:1,127.0.0.1:5432=cache:2";
    let (code, err) = run(&["daemon", "--tun", "userspace", "--state-dir", state, "--forward", twice]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("listen on the same tcp socket"), "{err}");
    assert!(!Path::new(state).exists(), "a refused start leaves nothing behind");
    let (code, err) = run(&["daemon", "--tun", "userspace", "--state-dir", "mem:", "--auth-key", "k"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("needs --control-url"), "{err}");
    // Joining at start with preferences `up` refuses stops the daemon with the reason (in a namespace of the
    // test's own, under `timeout`: were the refusal broken, the daemon would run there, not forever).
    let mut lab = lab;
    let ns = lab.netns("f");
    let socket = lab.path("f.sock");
    let args = [
        "10",
        MESHD,
        "daemon",
        "--tun",
        "userspace",
        "--state-dir",
        "mem:",
        "--socket",
        socket.to_str().unwrap(),
        "--control-url",
        "http://192.0.2.1:8443",
        "--auth-key",
        "mkey-x",
    ];
    let out = lab.ns(ns).exec("timeout", &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("plain HTTP") && err.contains("--insecure-http"), "{err}");
}
