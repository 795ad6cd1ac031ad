//! MagicDNS with a real systemd-resolved: a Debian 12 root made by debootstrap (systemd, dbus,
//! systemd-resolved), booted with systemd as PID 1 in a podman container, runs a coordination server and
//! a node. The node finds resolved on the system bus and sets the TUN device's link DNS; programs asking
//! resolved's stub (127.0.0.53, through nss) then find mesh names, resolv.conf stays resolved's link, and
//! `meshd down` takes the link settings back. Root, podman with runc, and debootstrap (which `cargo xtask ci`
//! installs).

use std::path::Path;
use std::time::Duration;

use mesh_netns::podman::{DEBIAN_TEST_IMAGE, output_text as out, test_store};

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");

#[test]
fn a_real_systemd_resolved_sends_mesh_names_to_the_resolver_and_gets_its_link_back() {
    // The store and the image are built once into the target directory and reused (deploy.rs shares them).
    let podman = test_store(Path::new(env!("CARGO_TARGET_TMPDIR")));

    let name = format!("meshd-resolved-{}", std::process::id());
    let mount = format!("{MESHD}:/usr/local/bin/meshd:ro");
    // No network but loopback: the server and the node meet on 127.0.0.1. Privileged for the TUN device
    // and for systemd as PID 1.
    let mut c = podman.start(
        &name,
        &["--systemd=always", "--privileged", "--network", "none", "-v", &mount, DEBIAN_TEST_IMAGE, "/sbin/init"],
    );
    c.logs_on_failure =
        "tail -n 40 /var/log/meshd.log /var/log/control.log; journalctl -u systemd-resolved -n 20 --no-pager".into();
    assert!(
        c.wait_for("systemctl is-active systemd-resolved dbus", Duration::from_secs(60)),
        "systemd-resolved did not start: {}",
        out(&c.exec("systemctl --failed --no-pager"))
    );
    assert!(c.exec_ok("readlink /etc/resolv.conf").contains("/run/systemd/resolve/stub-resolv.conf"));

    c.exec_ok("install -d -m 700 /var/lib/control");
    c.exec_detached("exec meshd control serve --listen 127.0.0.1:8080 --insecure-http --data-dir /var/lib/control >/var/log/control.log 2>&1");
    c.exec_detached("exec meshd daemon >/var/log/meshd.log 2>&1");
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
