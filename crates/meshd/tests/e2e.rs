//! End-to-end: real meshd daemons and real wireguard-go peers in network namespaces joined by veth links.
//! Needs root, iproute2, wireguard-tools, wireguard-go and socat (`cargo xtask ci` installs them).

mod common;

use std::time::{Duration, Instant};

use common::*;
use mesh_netns::{Keys, Lab, start_wireguard_go, stdout, wait_until};

/// meshd in host `a` (100.64.0.1, port 51001) peered with a wireguard-go in host `b` (100.64.0.2, port 51002).
struct Pair {
    dev_b: String,
    keys_a: Keys,
    keys_b: Keys,
}

/// Starts the meshd side; [`start_wg_side`] starts (or restarts) the other.
fn meshd_and_wireguard_go(lab: &mut Lab, a: usize) -> Pair {
    let (keys_a, keys_b) = (Keys::generate(), Keys::generate());
    let (tun_a, dev_b) = (lab.unique("ma"), lab.unique("wg"));
    let config = meshd_toml(&keys_a, "100.64.0.1/32", 51001, &tun_a, &keys_b, "192.168.77.2:51002", "100.64.0.2/32");
    start_meshd(lab, a, "meshd-a", &config);
    Pair { dev_b, keys_a, keys_b }
}

/// (Re)starts the pair's wireguard-go side, with `keepalive` if given; returns the process index.
fn start_wg_side(lab: &mut Lab, b: usize, pair: &Pair, keepalive: Option<u16>) -> usize {
    let (keys, peer) = (&pair.keys_b, &pair.keys_a.public);
    start_wireguard_go(
        lab,
        b,
        &pair.dev_b,
        keys,
        51002,
        "100.64.0.2/32",
        peer,
        "192.168.77.1:51001",
        "100.64.0.1/32",
        keepalive,
    )
}

#[test]
fn meshd_to_meshd_ping_and_a_verified_tcp_transfer() {
    let (mut lab, a, b) = two_hosts("m2m");
    let (ka, kb) = (Keys::generate(), Keys::generate());
    let (tun_a, tun_b) = (lab.unique("ma"), lab.unique("mb"));
    start_meshd(
        &mut lab,
        a,
        "meshd-a",
        &meshd_toml(&ka, "100.64.0.1/32", 51001, &tun_a, &kb, "192.168.77.2:51002", "100.64.0.2/32"),
    );
    start_meshd(
        &mut lab,
        b,
        "meshd-b",
        &meshd_toml(&kb, "100.64.0.2/32", 51002, &tun_b, &ka, "192.168.77.1:51001", "100.64.0.1/32"),
    );

    assert!(wait_for_ping(&lab, a, "100.64.0.2", Duration::from_secs(10)), "a cannot ping b through the mesh");
    assert!(lab.ns(b).ping("100.64.0.1"), "b cannot ping a");

    let (sent, received) = tcp_transfer(&mut lab, a, b, "100.64.0.2", 4 << 20);
    assert_eq!(received.len(), sent.len(), "bytes received");
    assert!(received == sent, "the payload arrived changed");

    // What the seed's authors checked by hand: the route in table 52 and the rules in front of it.
    let table = stdout(&lab.ns(a).ip(&["route", "show", "table", "52"]));
    assert!(table.contains(&format!("100.64.0.2 dev {tun_a} proto 88")), "{table}");
    let rules = stdout(&lab.ns(a).ip(&["rule", "list"]));
    for rule in [
        "5210:\tfrom all fwmark 0x80000/0xff0000 lookup main",
        "5230:\tfrom all fwmark 0x80000/0xff0000 lookup default",
        "5250:\tfrom all fwmark 0x80000/0xff0000 unreachable",
        "5270:\tfrom all lookup 52",
    ] {
        assert!(rules.contains(rule), "missing {rule:?} in\n{rules}");
    }
    let rules6 = stdout(&lab.ns(a).ip(&["-6", "rule", "list"]));
    assert!(rules6.contains("5270:\tfrom all lookup 52"), "{rules6}");
}

#[test]
fn sigterm_removes_everything_meshd_added() {
    let (mut lab, a, b) = two_hosts("term");
    let (ka, kb) = (Keys::generate(), Keys::generate());
    let tun = lab.unique("ma");
    let meshd = start_meshd(
        &mut lab,
        a,
        "meshd-a",
        &meshd_toml(&ka, "100.64.0.1/32", 51001, &tun, &kb, "192.168.77.2:51002", "100.64.0.2/32"),
    );
    let sock = lab.uapi_dir().join(format!("{tun}.sock"));
    assert!(wait_until(Duration::from_secs(5), Duration::from_millis(50), || sock.exists()));
    assert_eq!(lab.process(meshd).stop(Duration::from_secs(5)), Some(0), "clean exit on SIGTERM");
    let table = stdout(&lab.ns(a).ip(&["route", "show", "table", "52"]));
    assert!(table.is_empty(), "routes left behind: {table}");
    for family in ["-4", "-6"] {
        let rules = stdout(&lab.ns(a).ip(&[family, "rule", "list"]));
        assert!(!rules.contains("52") && !rules.contains("0x80000"), "rules left behind: {rules}");
    }
    assert!(!sock.exists(), "UAPI socket left behind");
    assert!(!lab.ns(a).exec("ip", &["link", "show", &tun]).status.success(), "TUN device left behind");
    let _ = b;
}

#[test]
fn meshd_initiates_to_wireguard_go() {
    let (mut lab, a, b) = two_hosts("wgi");
    let pair = meshd_and_wireguard_go(&mut lab, a);
    start_wg_side(&mut lab, b, &pair, None);
    assert!(wait_for_ping(&lab, a, "100.64.0.2", Duration::from_secs(10)), "meshd -> wireguard-go");
    let (sent, received) = tcp_transfer(&mut lab, a, b, "100.64.0.2", 1 << 20);
    assert!(received == sent, "payload changed in transit ({} of {} bytes)", received.len(), sent.len());
}

#[test]
fn wireguard_go_initiates_to_meshd() {
    let (mut lab, a, b) = two_hosts("wgr");
    let pair = meshd_and_wireguard_go(&mut lab, a);
    start_wg_side(&mut lab, b, &pair, None);
    assert!(wait_for_ping(&lab, b, "100.64.0.1", Duration::from_secs(10)), "wireguard-go -> meshd");
    // wireguard-go made the handshake (meshd has no keepalive and nothing to send): meshd answered it.
    let show = stdout(&lab.ns(b).wg(&["show", &pair.dev_b, "latest-handshakes"]));
    let line =
        show.lines().find(|l| l.starts_with(&pair.keys_a.public)).unwrap_or_else(|| panic!("no meshd peer: {show}"));
    let when: u64 = line.split_whitespace().nth(1).and_then(|t| t.parse().ok()).expect("a handshake time");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(when > 0 && now.abs_diff(when) < 60, "wireguard-go's handshake with meshd at {when} is recent (now {now})");
}

#[test]
fn a_wg_quick_file_works_as_is_and_wg_show_reads_meshd() {
    let (mut lab, a, b) = two_hosts("wgq");
    let (ka, kb) = (Keys::generate(), Keys::generate());
    let (tun_a, dev_b) = (lab.unique("ma"), lab.unique("wg"));
    // A file as users have it, with wg-quick-only lines meshd must accept and leave alone.
    let conf = format!(
        "[Interface]\n# laptop\nPrivateKey = {}\nAddress = 100.64.0.1/32\nListenPort = 51001\nDNS = 10.0.0.2\n\
         PostUp = iptables -A FORWARD -i %i -j ACCEPT\nSaveConfig = false\n\n[Peer]\n# router\nPublicKey = {}\n\
         Endpoint = 192.168.77.2:51002\nAllowedIPs = 100.64.0.2/32, 10.77.0.0/16\nPersistentKeepalive = 25\n",
        ka.private, kb.public
    );
    let path = lab.write("wg0.conf", &conf);
    let state = lab.path("state-a");
    lab.spawn(
        a,
        "meshd-a",
        MESHD,
        &["daemon", "--config", path.to_str().unwrap(), "--tun", &tun_a, "--state-dir", state.to_str().unwrap()],
        // Debug and trace are where a key would slip out: the UAPI exchange and configuration dumps.
        &[("MESHD_LOG", "trace")],
    );
    start_wireguard_go(
        &mut lab,
        b,
        &dev_b,
        &kb,
        51002,
        "100.64.0.2/32",
        &ka.public,
        "192.168.77.1:51001",
        "100.64.0.1/32",
        None,
    );
    assert!(
        wait_for_ping(&lab, a, "100.64.0.2", Duration::from_secs(10)),
        "meshd with a wg-quick file -> wireguard-go"
    );

    let show = stdout(&lab.ns(a).wg(&["show", &tun_a]));
    for expected in [
        format!("peer: {}", kb.public),
        "endpoint: 192.168.77.2:51002".to_string(),
        "allowed ips: 100.64.0.2/32, 10.77.0.0/16".to_string(),
        "latest handshake:".to_string(),
        "persistent keepalive: every 25 seconds".to_string(),
        "listening port: 51001".to_string(),
    ] {
        assert!(show.contains(&expected), "wg show lacks {expected:?}:\n{show}");
    }
    let handshakes = stdout(&lab.ns(a).wg(&["show", &tun_a, "latest-handshakes"]));
    let when: u64 = handshakes.split_whitespace().nth(1).and_then(|t| t.parse().ok()).expect("a handshake time");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(now.abs_diff(when) < 60, "handshake {when} is recent (now {now})");
    let dump = stdout(&lab.ns(a).wg(&["show", &tun_a, "transfer"]));
    let rx: u64 = dump.split_whitespace().nth(1).and_then(|t| t.parse().ok()).unwrap_or(0);
    assert!(rx > 0, "transfer counted: {dump}");
    // The private key is the UAPI client's to hide (`wg show` read it in hex); the log never has it.
    let log = lab.process(0).log_text();
    assert!(log.contains("DEBUG") || log.contains("TRACE"), "the daemon logged at debug: {log}");
    for spelling in ka.private_spellings() {
        assert!(!log.contains(&spelling), "private key in the log");
    }
}

#[test]
fn traffic_resumes_after_wireguard_go_restarts() {
    let (mut lab, a, b) = two_hosts("wgrs");
    let pair = meshd_and_wireguard_go(&mut lab, a);
    let wg = start_wg_side(&mut lab, b, &pair, Some(25));
    assert!(wait_for_ping(&lab, a, "100.64.0.2", Duration::from_secs(10)));

    lab.process(wg).kill();
    assert!(!lab.ns(a).ping("100.64.0.2"), "the peer is gone");
    let restarted = Instant::now();
    start_wg_side(&mut lab, b, &pair, Some(25));
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(200), || lab.ns(a).ping("100.64.0.2")),
        "traffic did not resume within 10 s of the restart"
    );
    eprintln!("traffic resumed {:?} after wireguard-go restarted", restarted.elapsed());
}

#[test]
fn sighup_adds_a_peer_and_keeps_the_running_session() {
    let mut lab = Lab::new("hup");
    let a = lab.netns("a");
    let b = lab.netns("b");
    let c = lab.netns("c");
    lab.link(a, "192.168.77.1/24", b, "192.168.77.2/24");
    lab.link(a, "192.168.78.1/24", c, "192.168.78.3/24");
    let (ka, kb, kc) = (Keys::generate(), Keys::generate(), Keys::generate());
    let (tun_a, dev_b, dev_c) = (lab.unique("ma"), lab.unique("wb"), lab.unique("wc"));
    let config = meshd_toml(&ka, "100.64.0.1/32", 51001, &tun_a, &kb, "192.168.77.2:51002", "100.64.0.2/32");
    let meshd = start_meshd(&mut lab, a, "meshd-a", &config);
    start_wireguard_go(
        &mut lab,
        b,
        &dev_b,
        &kb,
        51002,
        "100.64.0.2/32",
        &ka.public,
        "192.168.77.1:51001",
        "100.64.0.1/32",
        None,
    );
    start_wireguard_go(
        &mut lab,
        c,
        &dev_c,
        &kc,
        51003,
        "100.64.0.3/32",
        &ka.public,
        "192.168.78.1:51001",
        "100.64.0.1/32",
        None,
    );
    assert!(wait_for_ping(&lab, a, "100.64.0.2", Duration::from_secs(10)));
    assert!(!lab.ns(a).ping("100.64.0.3"), "c is not configured yet");
    let handshakes = |lab: &Lab| stdout(&lab.ns(a).wg(&["show", &tun_a, "latest-handshakes"]));
    let before = handshakes(&lab);

    let added = format!(
        "{config}\n[[peers]]\npublic_key = \"{}\"\nendpoint = \"192.168.78.3:51003\"\nallowed_ips = [\"100.64.0.3/32\"]\n",
        kc.public
    );
    lab.write("meshd-a.conf.toml", &added);
    lab.process(meshd).signal("HUP");
    assert!(wait_for_ping(&lab, a, "100.64.0.3", Duration::from_secs(10)), "the added peer is reachable");
    assert!(lab.ns(a).ping("100.64.0.2"), "the old peer still is");
    let after = handshakes(&lab);
    let line_b = |s: &str| s.lines().find(|l| l.starts_with(&kb.public)).map(str::to_string);
    assert_eq!(line_b(&before), line_b(&after), "b's session was kept, not renegotiated");
    assert!(stdout(&lab.ns(a).ip(&["route", "show", "table", "52"])).contains("100.64.0.3"));

    // A broken file on reload changes nothing.
    lab.write("meshd-a.conf.toml", "[interface]\nbogus = 1\n");
    lab.process(meshd).signal("HUP");
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || lab
            .process(meshd)
            .log_text()
            .contains("reload refused")),
        "{}",
        lab.process(meshd).log_text()
    );
    assert!(lab.process(meshd).running());
    assert!(lab.ns(a).ping("100.64.0.3"));
    assert!(lab.ns(a).ping("100.64.0.2"));
}
