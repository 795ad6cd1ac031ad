//! Containers for the tests that need more than a namespace: systemd as PID 1 (systemd-resolved, the
//! Debian package's units), the container image, and `podman kube play`. Each podman store lives in a
//! directory the caller picks (under target/), never in the host's /var/lib/containers, and every
//! container a test starts is removed when its handle drops, passed or not.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub fn output_text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The Debian 12 image the container tests share: systemd as PID 1 with dbus, systemd-resolved and polkit
/// (MagicDNS through resolved, the Debian package's units), adduser (the package's users), and PostgreSQL
/// with its client (the database and the app of the sidecar test).
pub const DEBIAN_TEST_IMAGE: &str = "localhost/meshd-test-debian:bookworm-1";
const DEBIAN_TEST_PACKAGES: &[&str] =
    &["systemd", "systemd-sysv", "dbus", "systemd-resolved", "iproute2", "adduser", "postgresql", "postgresql-client"];

/// `apt-get install` inside a debootstrap root, with the host's resolver for the duration (the root's
/// resolv.conf is systemd-resolved's link, which has no one behind it in a chroot).
fn apt_install_in(root: &Path, packages: &[&str]) {
    let resolv = root.join("etc/resolv.conf");
    let link = std::fs::read_link(&resolv).ok();
    let _ = std::fs::remove_file(&resolv);
    std::fs::copy("/etc/resolv.conf", &resolv).expect("copying the host's resolv.conf");
    let o = Command::new("chroot")
        .arg(root)
        .args(["apt-get", "-qq", "install", "-y", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .expect("chroot runs");
    let _ = Command::new("chroot").arg(root).args(["apt-get", "clean"]).output();
    let _ = std::fs::remove_file(&resolv);
    if let Some(link) = link {
        std::os::unix::fs::symlink(link, &resolv).expect("restoring resolv.conf");
    }
    assert!(o.status.success(), "apt-get install {} in the root: {}", packages.join(" "), output_text(&o));
}

/// The store the container tests share, beside the build (`dir`: the tests' CARGO_TARGET_TMPDIR), with the
/// Debian test image in it. A pod's DNS server binds port 53 as a non-root user, and a router pod forwards,
/// which the pod specs ask for with sysctls that podman 4.3's kube play ignores; the store sets them for
/// every container instead.
pub fn test_store(dir: &Path) -> Podman {
    let podman = Podman::with_sysctls(
        &dir.join("containers"),
        &["net.ipv4.ip_unprivileged_port_start=53", "net.ipv4.ip_forward=1"],
    );
    podman.clear_leftovers();
    // polkitd fails to configure inside debootstrap's first pass; apt installs it once the root is whole.
    podman.debootstrap_image(DEBIAN_TEST_IMAGE, DEBIAN_TEST_PACKAGES, &["polkitd"]);
    podman
}

/// podman with its own store.
#[derive(Debug)]
pub struct Podman {
    dir: PathBuf,
}

impl Podman {
    pub fn new(dir: &Path) -> Podman {
        Podman::with_sysctls(dir, &[])
    }

    /// A store whose containers all get `sysctls` (podman 4.3's kube play ignores a pod's own).
    pub fn with_sysctls(dir: &Path, sysctls: &[&str]) -> Podman {
        std::fs::create_dir_all(dir).expect("creating the podman store's directory");
        let sysctls: Vec<String> = sysctls.iter().map(|s| format!("{s:?}")).collect();
        // Debian's podman works here with runc (crun refuses the hybrid cgroup layout) and these limits (the
        // defaults exceed the machine's hard limits). Networks the tests create live beside the store, not in
        // the host's /etc/cni.
        let conf = format!(
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\ndefault_sysctls = [{}]\n\
             [engine]\nruntime = \"runc\"\n[network]\nnetwork_config_dir = {:?}\n",
            sysctls.join(", "),
            dir.join("networks")
        );
        std::fs::write(dir.join("containers.conf"), conf).expect("writing containers.conf");
        Podman { dir: dir.to_path_buf() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.dir.join("containers.conf"));
        c.arg("--root").arg(self.dir.join("storage")).args(["--runroot", &self.runroot()]);
        c.args(args);
        c
    }

    /// podman's run-time state: it refuses a path longer than 50 characters (a checkout's target directory
    /// often is), so a short one in /run, the same for every run of one store (podman checks it matches).
    fn runroot(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.dir.hash(&mut hasher);
        format!("/run/meshd-podman-{:08x}", hasher.finish() as u32)
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("podman runs")
    }

    /// Runs podman and returns its stdout; panics with everything it printed when it fails.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "podman {}: {}", args.join(" "), output_text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn has_image(&self, tag: &str) -> bool {
        self.run(&["image", "exists", tag]).status.success()
    }

    /// A minimal Debian 12 root from debootstrap with `include`d packages, imported as `tag` (once: an
    /// existing tag is kept).
    pub fn debootstrap_image(&self, tag: &str, include: &[&str], afterwards: &[&str]) {
        if self.has_image(tag) {
            return;
        }
        let root = self.dir.join("root");
        let _ = std::fs::remove_dir_all(&root);
        let o = Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={}", include.join(",")), "bookworm"])
            .arg(&root)
            .arg("http://deb.debian.org/debian")
            .output()
            .expect("debootstrap runs");
        assert!(o.status.success(), "debootstrap: {}", output_text(&o));
        if !afterwards.is_empty() {
            apt_install_in(&root, afterwards);
        }
        let mut tar =
            Command::new("tar").arg("-C").arg(&root).args(["-c", "."]).stdout(Stdio::piped()).spawn().unwrap();
        // An imported root has no image configuration: give it the PATH a Debian image has.
        let path = "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
        let o =
            self.command(&["import", "--change", path, "-", tag]).stdin(tar.stdout.take().unwrap()).output().unwrap();
        assert!(tar.wait().unwrap().success(), "tar of the root failed");
        assert!(o.status.success(), "podman import: {}", output_text(&o));
        let _ = std::fs::remove_dir_all(&root);
    }

    /// Starts a container (`podman run -d --name NAME ARGS`) whose handle removes it on drop.
    pub fn start(&self, name: &str, args: &[&str]) -> Container<'_> {
        self.start_with_env(name, args, &[])
    }

    /// As [`Podman::start`], with `secrets` (name, value) passed through podman's environment (`-e NAME`
    /// with no value), so a key never appears in an argument list or a failure message.
    pub fn start_with_env(&self, name: &str, args: &[&str], secrets: &[(&str, &str)]) -> Container<'_> {
        let _ = self.run(&["rm", "-f", "-t", "0", name]);
        let mut all = vec!["run", "-d", "--name", name];
        for (key, _) in secrets {
            all.extend(["-e", key]);
        }
        all.extend(args);
        let mut command = self.command(&all);
        command.envs(secrets.iter().copied());
        let o = command.output().expect("podman runs");
        assert!(o.status.success(), "podman {}: {}", all.join(" "), output_text(&o));
        Container { podman: self, name: name.to_string(), logs_on_failure: String::new() }
    }

    /// Removes every pod, container, network (but podman's default), volume and secret a killed run left in this
    /// store: a test's fixed names and subnets would collide with them.
    pub fn clear_leftovers(&self) {
        let _ = self.run(&["pod", "rm", "--all", "--force", "--time", "0"]);
        let _ = self.run(&["rm", "--all", "--force", "--time", "0"]);
        let _ = self.run(&["network", "prune", "--force"]);
        let _ = self.run(&["volume", "prune", "--force"]);
        let _ = self.run(&["secret", "rm", "--all"]);
    }
}

/// A podman network of a test's own (a bridge with no gateway and no NAT: nothing leaves it), removed on
/// drop; drop it after the containers on it.
#[derive(Debug)]
pub struct Network<'p> {
    podman: &'p Podman,
    pub name: String,
}

impl Podman {
    pub fn network(&self, name: &str, subnet: &str) -> Network<'_> {
        let _ = self.run(&["network", "rm", "-f", name]);
        self.ok(&["network", "create", "--internal", "--subnet", subnet, name]);
        Network { podman: self, name: name.to_string() }
    }
}

impl Drop for Network<'_> {
    fn drop(&mut self) {
        let _ = self.podman.run(&["network", "rm", "-f", &self.name]);
    }
}

/// A running container, removed (with everything in it) when the handle drops.
#[derive(Debug)]
pub struct Container<'p> {
    podman: &'p Podman,
    pub name: String,
    /// A shell command whose output is printed when the test fails, beside podman's logs.
    pub logs_on_failure: String,
}

impl Container<'_> {
    pub fn exec(&self, script: &str) -> Output {
        self.podman.run(&["exec", &self.name, "sh", "-c", script])
    }

    pub fn exec_ok(&self, script: &str) -> String {
        let o = self.exec(script);
        assert!(o.status.success(), "{script}: {}", output_text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs a program in the container without a shell (an image may have none).
    pub fn exec_program(&self, program_and_args: &[&str]) -> Output {
        let mut args = vec!["exec", self.name.as_str()];
        args.extend(program_and_args);
        self.podman.run(&args)
    }

    /// Starts `script` in the container and leaves it running.
    pub fn exec_detached(&self, script: &str) {
        self.podman.ok(&["exec", "-d", &self.name, "sh", "-c", script]);
    }

    /// Runs `script` every 200 ms until it succeeds or `limit` passes.
    pub fn wait_for(&self, script: &str, limit: Duration) -> bool {
        crate::wait_until(limit, Duration::from_millis(200), || self.exec(script).status.success())
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.podman.run(&["logs", "--tail", "40", &self.name]);
            eprintln!("----- container {} -----\n{}", self.name, output_text(&logs));
            if !self.logs_on_failure.is_empty() {
                eprintln!("{}", output_text(&self.exec(&self.logs_on_failure)));
            }
        }
        let _ = self.podman.run(&["rm", "-f", "-t", "2", &self.name]);
    }
}
