//! What the end-to-end tests share: hosts, meshd configurations and daemons, transfers.
#![allow(dead_code)]

use std::time::Duration;

use mesh_netns::{Keys, Lab, stdout, wait_until};

pub mod managed;

pub const MESHD: &str = env!("CARGO_BIN_EXE_meshd");

/// Two hosts on one LAN: `a` at 192.168.77.1, `b` at 192.168.77.2.
pub fn two_hosts(name: &str) -> (Lab, usize, usize) {
    let mut lab = Lab::new(name);
    let a = lab.netns("a");
    let b = lab.netns("b");
    lab.link(a, "192.168.77.1/24", b, "192.168.77.2/24");
    (lab, a, b)
}

/// A meshd TOML configuration with one peer.
pub fn meshd_toml(
    keys: &Keys,
    address: &str,
    port: u16,
    tun: &str,
    peer: &Keys,
    endpoint: &str,
    allowed: &str,
) -> String {
    format!(
        r#"# meshd's own format
[interface]
private_key = "{}"
addresses = ["{address}"]
listen_port = {port}
tun_name = "{tun}"
mtu = 1420

[[peers]]
public_key = "{}"
endpoint = "{endpoint}"
allowed_ips = ["{allowed}"]
"#,
        keys.private, peer.public
    )
}

pub fn start_meshd(lab: &mut Lab, ns: usize, name: &str, config: &str) -> usize {
    let path = lab.write(&format!("{name}.conf.toml"), config);
    let state = lab.path(&format!("{name}-state"));
    lab.spawn(
        ns,
        name,
        MESHD,
        &["daemon", "--config", path.to_str().unwrap(), "--state-dir", state.to_str().unwrap()],
        &[("MESHD_LOG", "debug")],
    )
}

pub fn wait_for_ping(lab: &Lab, ns: usize, addr: &str, limit: Duration) -> bool {
    wait_until(limit, Duration::from_millis(100), || lab.ns(ns).ping(addr))
}

/// Sends `size` random bytes over TCP from `from` to `to_addr:port` through socat and returns (sent, received).
pub fn tcp_transfer(lab: &mut Lab, from: usize, to: usize, to_addr: &str, size: usize) -> (Vec<u8>, Vec<u8>) {
    let payload: Vec<u8> = {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let source = lab.dir.join("payload.bin");
    let sink = lab.dir.join("received.bin");
    std::fs::write(&source, &payload).unwrap();
    let listen = format!("TCP-LISTEN:5001,bind={to_addr},reuseaddr");
    let out = format!("CREATE:{}", sink.display());
    let server = lab.spawn(to, "socat-server", "socat", &["-u", &listen, &out], &[]);
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            stdout(&lab.ns(to).exec("ss", &["-ltn"])).contains(&format!("{to_addr}:5001"))
        }),
        "socat did not listen"
    );
    let connect = format!("TCP:{to_addr}:5001");
    let input = format!("OPEN:{}", source.display());
    let sent = lab.ns(from).exec("timeout", &["30", "socat", "-u", &input, &connect]);
    assert!(sent.status.success(), "socat client failed: {}", String::from_utf8_lossy(&sent.stderr));
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(50), || !lab.process(server).running()),
        "the receiving socat did not finish"
    );
    (payload, std::fs::read(&sink).unwrap_or_default())
}

/// Asks a socat service at `addr` (TCP, or UDP if `udp`) which source address it saw.
pub fn seen_source(lab: &Lab, from: usize, addr: &str, udp: bool) -> String {
    let target = if udp { format!("UDP:{addr}:5353") } else { format!("TCP:{addr}:5300") };
    // UDP needs a datagram to answer; TCP answers the connection.
    let out = lab.ns(from).exec("sh", &["-c", &format!("echo hello | timeout 10 socat -T 4 - {target}")]);
    stdout(&out).trim().to_string()
}

/// Starts services on `ns` that answer with the peer address they see, over TCP 5300 and UDP 5353.
pub fn start_echo_services(lab: &mut Lab, ns: usize, bind: &str) {
    let tcp = format!("TCP-LISTEN:5300,bind={bind},reuseaddr,fork");
    lab.spawn(ns, "seen-tcp", "socat", &[&tcp, "SYSTEM:echo $SOCAT_PEERADDR"], &[]);
    let udp = format!("UDP-RECVFROM:5353,bind={bind},fork");
    lab.spawn(ns, "seen-udp", "socat", &[&udp, "SYSTEM:echo $SOCAT_PEERADDR"], &[]);
    let listening = |flags: &str, port: &str| {
        wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            stdout(&lab.ns(ns).exec("ss", &[flags])).contains(&format!("{bind}:{port}"))
        })
    };
    assert!(listening("-ltn", "5300"), "the TCP echo service did not listen");
    assert!(listening("-lun", "5353"), "the UDP echo service did not bind");
}

/// Sends `size` bytes from a socat file server at `addr` to `to` and returns (served, received).
pub fn download(lab: &mut Lab, server_ns: usize, to: usize, addr: &str, size: usize) -> (Vec<u8>, Vec<u8>) {
    let data: Vec<u8> = (0..size).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let file = lab.dir.join("served.bin");
    let got = lab.dir.join("downloaded.bin");
    std::fs::write(&file, &data).unwrap();
    let listen = format!("TCP-LISTEN:5001,bind={addr},reuseaddr");
    lab.spawn(server_ns, "file-server", "socat", &["-u", &format!("OPEN:{}", file.display()), &listen], &[]);
    assert!(wait_until(Duration::from_secs(5), Duration::from_millis(50), || stdout(
        &lab.ns(server_ns).exec("ss", &["-ltn"])
    )
    .contains(&format!("{addr}:5001"))));
    let out = lab
        .ns(to)
        .exec("timeout", &["60", "socat", "-u", &format!("TCP:{addr}:5001"), &format!("CREATE:{}", got.display())]);
    assert!(out.status.success(), "download failed: {}", String::from_utf8_lossy(&out.stderr));
    (data, std::fs::read(&got).unwrap_or_default())
}
