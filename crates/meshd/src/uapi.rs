//! The WireGuard cross-platform userspace API (https://www.wireguard.com/xplatform/), read side: enough for
//! `wg show <tun>` and `wg showconf <tun>` to work against meshd. Changing configuration goes through
//! meshd's own configuration, so `set` is refused.

use std::fmt::Write;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use mesh_dataplane::PeerStatus;

/// What a `get` reply reports about the device. No `Debug`: it holds the private key.
pub struct Device<'a> {
    pub private_key: &'a [u8; 32],
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: &'a [PeerStatus],
}

/// The operation a client asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Get,
    Set,
    Unknown,
}

/// Reads the first line of a request (`get=1` or `set=1`).
pub fn parse_request(first_line: &str) -> Request {
    match first_line.trim_end() {
        "get=1" => Request::Get,
        "set=1" => Request::Set,
        _ => Request::Unknown,
    }
}

/// The reply to `get=1`, including the blank line that ends it.
pub fn get_reply(device: &Device<'_>, now: SystemTime) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "private_key={}", hex::encode(device.private_key));
    let _ = writeln!(out, "listen_port={}", device.listen_port);
    if device.fwmark != 0 {
        let _ = writeln!(out, "fwmark={}", device.fwmark);
    }
    for peer in device.peers {
        let _ = writeln!(out, "public_key={}", hex::encode(peer.public_key));
        if let Some(endpoint) = peer.endpoint {
            let _ = writeln!(out, "endpoint={}", format_endpoint(endpoint));
        }
        let handshake = peer
            .since_handshake
            .and_then(|ago| now.checked_sub(ago))
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .unwrap_or(Duration::ZERO);
        let _ = writeln!(out, "last_handshake_time_sec={}", handshake.as_secs());
        let _ = writeln!(out, "last_handshake_time_nsec={}", handshake.subsec_nanos());
        let _ = writeln!(out, "tx_bytes={}", peer.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", peer.rx_bytes);
        let _ = writeln!(out, "persistent_keepalive_interval={}", peer.persistent_keepalive.unwrap_or(0));
        for ip in &peer.allowed_ips {
            let _ = writeln!(out, "allowed_ip={ip}");
        }
        let _ = writeln!(out, "protocol_version=1");
    }
    out.push_str("errno=0\n\n");
    out
}

fn format_endpoint(endpoint: SocketAddr) -> String {
    // The protocol writes IPv6 endpoints bracketed, like SocketAddr's Display already does.
    endpoint.to_string()
}

/// The reply to anything but `get`: EPERM, because configuration is meshd's, not the API client's.
pub fn refusal() -> &'static str {
    "errno=1\n\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_dataplane::PeerStatus;

    #[test]
    fn get_reply_follows_the_protocol() {
        // Built through the node so the test uses real peer status values.
        let mut node = mesh_dataplane::Node::new([3; 32], 1);
        node.add_peer(mesh_dataplane::PeerSpec {
            public_key: [9; 32],
            preshared_key: None,
            endpoint: Some("192.0.2.7:51820".parse().unwrap()),
            allowed_ips: vec!["100.64.0.2/32".parse().unwrap(), "10.0.0.0/16".parse().unwrap()],
            persistent_keepalive: Some(25),
        })
        .unwrap();
        let peers: Vec<PeerStatus> = node.peer_status();
        let reply = get_reply(
            &Device { private_key: &[3; 32], listen_port: 41641, fwmark: 0x80000, peers: &peers },
            SystemTime::now(),
        );
        let expected_lines = [
            format!("private_key={}", "03".repeat(32)),
            "listen_port=41641".into(),
            "fwmark=524288".into(),
            format!("public_key={}", "09".repeat(32)),
            "endpoint=192.0.2.7:51820".into(),
            "last_handshake_time_sec=0".into(),
            "persistent_keepalive_interval=25".into(),
            "allowed_ip=100.64.0.2/32".into(),
            "allowed_ip=10.0.0.0/16".into(),
            "protocol_version=1".into(),
        ];
        for line in expected_lines {
            assert!(reply.lines().any(|l| l == line), "missing {line:?} in\n{reply}");
        }
        assert!(reply.ends_with("errno=0\n\n"));
        assert_eq!(parse_request("get=1\n"), Request::Get);
        assert_eq!(parse_request("set=1"), Request::Set);
        assert_eq!(parse_request("GET"), Request::Unknown);
    }
}
