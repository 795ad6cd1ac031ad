//! MagicDNS with a real systemd-resolved: a Debian 12 root made by debootstrap (systemd, dbus,
//! systemd-resolved), booted with systemd as PID 1 in a podman container, runs a coordination server and
//! a node. The node finds resolved on the system bus and sets the TUN device's link DNS; programs asking
//! resolved's stub (127.0.0.53, through nss) then find mesh names, resolv.conf stays resolved's link, and
//! `meshd down` takes the link settings back. Root, podman with runc, and debootstrap (which `cargo xtask ci`
//! installs); the root is built once into the target directory and reused.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");
const IMAGE: &str = "meshd-test-resolved:bookworm";

fn out(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Where the root, podman's storage and its configuration live: beside the build, never in the host's
/// /var/lib/containers.
fn cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("resolved-container")
}

/// podman's run-time state: it refuses a path longer than 50 characters (a checkout's target directory
/// often is), so a short one in /run, the same for every run of one checkout (podman checks it matches the
/// storage's).
fn runroot(dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut hasher);
    format!("/run/meshd-podman-{:08x}", hasher.finish() as u32)
}

struct Podman {
    dir: PathBuf,
}

impl Podman {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.dir.join("containers.conf"));
        c.args(["--root", self.dir.join("storage").to_str().unwrap(), "--runroot", &runroot(&self.dir)]);
        c.args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("podman runs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "podman {}: {}", args.join(" "), out(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

/// The container, removed (with everything in it) when the test ends, passed or not.
struct Container<'p> {
    podman: &'p Podman,
    name: String,
}

impl Container<'_> {
    fn exec(&self, script: &str) -> Output {
        self.podman.run(&["exec", &self.name, "sh", "-c", script])
    }

    fn exec_ok(&self, script: &str) -> String {
        let o = self.exec(script);
        assert!(o.status.success(), "{script}: {}", out(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn wait_for(&self, script: &str, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.exec(script).status.success() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.exec(
                "tail -n 40 /var/log/meshd.log /var/log/control.log; journalctl -u systemd-resolved -n 20 --no-pager",
            );
            eprintln!("----- container {} -----\n{}", self.name, out(&logs));
        }
        let _ = self.podman.run(&["rm", "-f", "-t", "2", &self.name]);
    }
}

/// The image, built once: debootstrap's minimal Debian 12 with systemd, dbus and systemd-resolved.
fn image(podman: &Podman) {
    if podman.run(&["image", "exists", IMAGE]).status.success() {
        return;
    }
    let root = podman.dir.join("root");
    let _ = std::fs::remove_dir_all(&root);
    let o = Command::new("debootstrap")
        .args(["--variant=minbase", "--include=systemd,systemd-sysv,dbus,systemd-resolved,iproute2", "bookworm"])
        .arg(&root)
        .arg("http://deb.debian.org/debian")
        .output()
        .expect("debootstrap runs");
    assert!(o.status.success(), "debootstrap: {}", out(&o));
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["-c", "."])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let o = podman.command(&["import", "-", IMAGE]).stdin(tar.stdout.take().unwrap()).output().unwrap();
    assert!(tar.wait().unwrap().success(), "tar of the root failed");
    assert!(o.status.success(), "podman import: {}", out(&o));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_real_systemd_resolved_sends_mesh_names_to_the_resolver_and_gets_its_link_back() {
    let dir = cache();
    std::fs::create_dir_all(&dir).unwrap();
    // Debian's podman works here with runc (crun refuses the hybrid cgroup layout) and these limits.
    std::fs::write(
        dir.join("containers.conf"),
        "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n[engine]\nruntime = \"runc\"\n",
    )
    .unwrap();
    let podman = Podman { dir };
    image(&podman);

    let name = format!("meshd-resolved-{}", std::process::id());
    let _ = podman.run(&["rm", "-f", &name]);
    let mount = format!("{MESHD}:/usr/local/bin/meshd:ro");
    // No network but loopback: the server and the node meet on 127.0.0.1. Privileged for the TUN device
    // and for systemd as PID 1.
    podman.ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "--systemd=always",
        "--privileged",
        "--network",
        "none",
        "-v",
        &mount,
        IMAGE,
        "/sbin/init",
    ]);
    let c = Container { podman: &podman, name };
    assert!(
        c.wait_for("systemctl is-active systemd-resolved dbus", Duration::from_secs(60)),
        "systemd-resolved did not start: {}",
        out(&c.exec("systemctl --failed --no-pager"))
    );
    assert!(c.exec_ok("readlink /etc/resolv.conf").contains("/run/systemd/resolve/stub-resolv.conf"));

    c.exec_ok("install -d -m 700 /var/lib/control");
    c.podman.ok(&["exec", "-d", &c.name, "sh", "-c", "exec meshd control serve --listen 127.0.0.1:8080 --insecure-http --data-dir /var/lib/control >/var/log/control.log 2>&1"]);
    c.podman.ok(&["exec", "-d", &c.name, "sh", "-c", "exec meshd daemon >/var/log/meshd.log 2>&1"]);
    assert!(
        c.wait_for("test -s /var/lib/control/admin-token && test -S /run/meshd/meshd.sock", Duration::from_secs(15))
    );
    let up = "meshd up --control-url http://127.0.0.1:8080 --insecure-http --hostname web.prod --timeout 20s \
              --auth-key $(meshd control authkey create --control-url http://127.0.0.1:8080 --admin-token file:/var/lib/control/admin-token)";
    let ip = c.exec_ok(up).trim().to_string();

    // resolved holds the link settings, and resolves mesh names through the resolver.
    assert!(
        c.wait_for("resolvectl dns mesh0 | grep -q 100.100.100.100", Duration::from_secs(10)),
        "{}",
        out(&c.exec("resolvectl status mesh0"))
    );
    let domains = c.exec_ok("resolvectl domain mesh0");
    assert!(domains.contains("mesh.internal") && domains.contains("~64.100.in-addr.arpa"), "{domains}");
    let query = c.exec_ok("resolvectl query web-prod.mesh.internal");
    assert!(query.contains(&ip) && query.contains("link: mesh0"), "{query}");
    // Every program, through nss and the stub: the bare name by the search domain, and the reverse.
    assert!(c.exec_ok("getent ahostsv4 web-prod").contains(&ip));
    assert!(c.exec_ok(&format!("resolvectl query {ip}")).contains("web-prod.mesh.internal"));
    assert!(c.exec_ok("readlink /etc/resolv.conf").contains("stub-resolv.conf"), "resolv.conf is left to resolved");
    assert!(c.exec_ok("meshd dns status").contains("mode: systemd-resolved"));

    // Down: resolved has nothing of meshd's left.
    c.exec_ok("meshd down");
    assert!(c.wait_for("! resolvectl dns mesh0 | grep -q 100.100.100.100", Duration::from_secs(10)));
    assert!(!c.exec("resolvectl query web-prod.mesh.internal").status.success(), "no route to mesh names after down");
}
