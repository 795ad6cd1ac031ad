//! wg-quick `.conf` files, read the way wg-quick and `wg setconf` read them, so existing files work unchanged.
//!
//! Also home to the value parsers both formats share (keys, prefixes, endpoints, MTU), so the two formats
//! cannot drift apart on what they accept.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use ipnet::IpNet;

use super::{ConfigError, Endpoint, InterfaceConfig, Key, PeerConfig, PrivateKey, StaticConfig};

/// Which keys each section takes, as wg-quick spells them, and whether a key may appear more than once.
const INTERFACE_KEYS: &[(&str, bool)] = &[
    ("PrivateKey", false),
    ("Address", true),
    ("ListenPort", false),
    ("MTU", false),
    // wg-quick's own shell behaviour: accepted so existing files load, and ignored because meshd does its
    // own routing and runs no hooks.
    ("DNS", true),
    ("Table", false),
    ("PreUp", true),
    ("PostUp", true),
    ("PreDown", true),
    ("PostDown", true),
    ("SaveConfig", false),
    ("FwMark", false),
];

const PEER_KEYS: &[(&str, bool)] = &[
    ("PublicKey", false),
    ("PresharedKey", false),
    ("Endpoint", false),
    ("AllowedIPs", true),
    ("PersistentKeepalive", false),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    Interface,
    Peer,
}

struct PeerDraft {
    header_line: usize,
    /// The key, its line, and the key name as written there (for the duplicate-peer error).
    public_key: Option<(Key, usize, String)>,
    preshared_key: Option<Key>,
    endpoint: Option<Endpoint>,
    allowed_ips: Vec<IpNet>,
    persistent_keepalive: Option<u16>,
}

/// Parses the text of a wg-quick configuration file; `path` only names the file in errors.
pub(super) fn parse(path: &Path, text: &str) -> Result<StaticConfig, ConfigError> {
    let error = |line: usize, field: &str, message: &str| ConfigError {
        file: path.to_path_buf(),
        line,
        field: field.to_owned(),
        message: message.to_owned(),
    };

    let mut interface: Option<(usize, InterfaceConfig)> = None;
    let mut peers: Vec<PeerDraft> = Vec::new();
    let mut section: Option<Section> = None;
    // Canonical names of the single-valued keys already set in the current section.
    let mut seen: Vec<&'static str> = Vec::new();

    // Editors on Windows may prepend a byte-order mark, which would otherwise glue itself to `[Interface]`.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        // wg-quick drops everything from the first `#`; base64 never contains one, so keys are safe.
        let content = raw.split_once('#').map_or(raw, |(before, _)| before).trim();
        if content.is_empty() {
            continue;
        }

        if let Some(rest) = content.strip_prefix('[') {
            let Some(name) = rest.strip_suffix(']') else {
                return Err(error(line, "syntax", "expected a section header like [Peer]"));
            };
            let name = name.trim();
            seen.clear();
            if name.eq_ignore_ascii_case("Interface") {
                if let Some((first, _)) = &interface {
                    return Err(error(
                        line,
                        content,
                        &format!("second [Interface]; the first is at line {first} and only one is allowed"),
                    ));
                }
                interface = Some((
                    line,
                    InterfaceConfig {
                        private_key: PrivateKey::Generate,
                        addresses: Vec::new(),
                        listen_port: None,
                        tun_name: None,
                        mtu: None,
                    },
                ));
                section = Some(Section::Interface);
            } else if name.eq_ignore_ascii_case("Peer") {
                peers.push(PeerDraft {
                    header_line: line,
                    public_key: None,
                    preshared_key: None,
                    endpoint: None,
                    allowed_ips: Vec::new(),
                    persistent_keepalive: None,
                });
                section = Some(Section::Peer);
            } else {
                return Err(error(line, content, "unknown section; expected [Interface] or [Peer]"));
            }
            continue;
        }

        // Split at the first `=`: base64 values end in `=` padding, keys never contain one.
        let Some((key, value)) = content.split_once('=') else {
            return Err(error(line, "syntax", "expected KEY = VALUE or a [Section] header"));
        };
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() {
            return Err(error(line, "syntax", "expected KEY = VALUE, the key is missing"));
        }
        let Some(section) = section else {
            return Err(error(line, key, "outside any section; put it under [Interface] or [Peer]"));
        };
        let known = match section {
            Section::Interface => INTERFACE_KEYS,
            Section::Peer => PEER_KEYS,
        };
        let Some(&(canonical, repeatable)) = known.iter().find(|(name, _)| name.eq_ignore_ascii_case(key)) else {
            let message = match section {
                Section::Interface => "unknown key in [Interface]",
                Section::Peer => "unknown key in [Peer]",
            };
            return Err(error(line, key, message));
        };
        if !repeatable {
            if seen.contains(&canonical) {
                return Err(error(line, key, "given twice in one section; it takes a single value"));
            }
            seen.push(canonical);
        }
        let invalid = |message: &str| error(line, key, message);

        match section {
            Section::Interface => {
                let Some((_, iface)) = interface.as_mut() else {
                    unreachable!("section is Interface only after an [Interface] header");
                };
                match canonical {
                    "PrivateKey" => iface.private_key = PrivateKey::Inline(decode_key(value).map_err(invalid)?),
                    "Address" => {
                        for item in list_items(value) {
                            iface.addresses.push(parse_address(item).map_err(invalid)?);
                        }
                    }
                    "ListenPort" => iface.listen_port = Some(value.parse().map_err(|_| invalid(PORT_EXPECTED))?),
                    "MTU" => {
                        let mtu = value.parse().map_err(|_| invalid(MTU_EXPECTED))?;
                        iface.mtu = Some(check_mtu(mtu).map_err(invalid)?);
                    }
                    _ => {}
                }
            }
            Section::Peer => {
                let Some(peer) = peers.last_mut() else {
                    unreachable!("section is Peer only after a [Peer] header");
                };
                match canonical {
                    "PublicKey" => peer.public_key = Some((decode_key(value).map_err(invalid)?, line, key.to_owned())),
                    "PresharedKey" => peer.preshared_key = Some(decode_key(value).map_err(invalid)?),
                    "Endpoint" => peer.endpoint = Some(parse_endpoint(value).map_err(invalid)?),
                    "AllowedIPs" => {
                        for item in list_items(value) {
                            peer.allowed_ips.push(parse_allowed_ip(item).map_err(invalid)?);
                        }
                    }
                    "PersistentKeepalive" => {
                        peer.persistent_keepalive = if value.eq_ignore_ascii_case("off") {
                            None
                        } else {
                            keepalive(value.parse().map_err(|_| invalid("expected seconds from 0 to 65535, or off"))?)
                        };
                    }
                    _ => {}
                }
            }
        }
    }

    let Some((_, interface)) = interface else {
        return Err(error(0, "[Interface]", "missing; a wg-quick file needs exactly one"));
    };

    let mut first_seen: HashMap<Key, usize> = HashMap::new();
    let mut out = Vec::with_capacity(peers.len());
    for peer in peers {
        let Some((public_key, key_line, written)) = peer.public_key else {
            return Err(error(peer.header_line, "PublicKey", "missing; every [Peer] needs one"));
        };
        if let Some(first) = first_seen.insert(public_key, key_line) {
            return Err(error(
                key_line,
                &written,
                &format!("same key as the [Peer] whose PublicKey is at line {first}"),
            ));
        }
        out.push(PeerConfig {
            public_key,
            preshared_key: peer.preshared_key,
            endpoint: peer.endpoint,
            allowed_ips: peer.allowed_ips,
            persistent_keepalive: peer.persistent_keepalive,
        });
    }

    Ok(StaticConfig { interface, peers: out })
}

/// Items of a comma-separated value; empty items are skipped so a trailing comma is harmless.
fn list_items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|item| !item.is_empty())
}

// Value parsers shared with the TOML format. They return only the message; each format adds where.

pub(super) const KEY_EXPECTED: &str = "not a 32-byte base64 key";
pub(super) const PORT_EXPECTED: &str = "expected a port number from 0 to 65535";
pub(super) const MTU_EXPECTED: &str = "expected an MTU from 576 to 9000";
pub(super) const ADDRESS_EXPECTED: &str = "expected an address like 10.9.0.1/24 or 10.9.0.1";
pub(super) const ALLOWED_IP_EXPECTED: &str = "expected an address with prefix like 10.0.0.0/16";
pub(super) const ENDPOINT_EXPECTED: &str = "expected HOST:PORT";

/// A WireGuard key in standard padded base64, as `wg genkey` prints it.
pub fn decode_key(text: &str) -> Result<Key, &'static str> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).map_err(|_| KEY_EXPECTED)?;
    Key::try_from(bytes.as_slice()).map_err(|_| KEY_EXPECTED)
}

/// An address with its prefix, or a bare address standing for just itself (/32 or /128).
fn parse_net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>().ok().or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

/// An interface address: host bits are the point (`10.9.0.1/24` is this node inside a /24), so they stay.
pub(super) fn parse_address(text: &str) -> Result<IpNet, &'static str> {
    parse_net(text).ok_or(ADDRESS_EXPECTED)
}

/// An allowed-IPs prefix. wg accepts host bits and ignores them, so files in the wild have them; they are
/// cleared here so later lookups and comparisons see one form per prefix.
pub(super) fn parse_allowed_ip(text: &str) -> Result<IpNet, &'static str> {
    parse_net(text).map(|net| net.trunc()).ok_or(ALLOWED_IP_EXPECTED)
}

/// `192.0.2.1:51820`, `[2001:db8::1]:51820`, or `host.example:51820` (resolved when the config is applied).
pub(super) fn parse_endpoint(text: &str) -> Result<Endpoint, &'static str> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return if addr.port() == 0 { Err(ENDPOINT_EXPECTED) } else { Ok(Endpoint::Addr(addr)) };
    }
    let (host, port) = text.rsplit_once(':').ok_or(ENDPOINT_EXPECTED)?;
    let port = port.parse::<u16>().ok().filter(|&p| p != 0).ok_or(ENDPOINT_EXPECTED)?;
    // Rejects what only looks like a host name because the address part was mistyped: an unbracketed IPv6
    // address (contains `:`), a bracketed one, or a dotted quad out of range (a DNS name's last label is
    // never all digits). Caught here, the error points at the line instead of failing at resolve time.
    let label_ok =
        |label: &str| !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let last = host.rsplit('.').next().unwrap_or_default();
    if !host.split('.').all(label_ok) || last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ENDPOINT_EXPECTED);
    }
    Ok(Endpoint::Host { host: host.to_owned(), port })
}

/// Below 576 IPv4 itself breaks; above 9000 no common link carries the packets without fragmenting them.
pub(super) fn check_mtu(mtu: u16) -> Result<u16, &'static str> {
    if (576..=9000).contains(&mtu) { Ok(mtu) } else { Err(MTU_EXPECTED) }
}

/// Both formats write "no keepalive" as 0.
pub(super) fn keepalive(seconds: u16) -> Option<u16> {
    (seconds != 0).then_some(seconds)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

    use super::*;

    use crate::config::test_support::*;

    fn parse_text(text: &str) -> Result<StaticConfig, ConfigError> {
        parse(Path::new("/etc/wireguard/wg0.conf"), text)
    }

    #[track_caller]
    fn assert_error(text: &str, line: usize, field: &str) -> ConfigError {
        assert_refused(parse, "/etc/wireguard/wg0.conf", text, line, field)
    }

    fn realistic() -> String {
        format!(
            "# wg0 on the office gateway\n\
             [Interface]\n\
             PrivateKey = {PRIVATE}\n\
             Address = 10.9.0.1/24, fd00:9::1/64\n\
             Address = 10.9.1.1\n\
             ListenPort = 51820\n\
             MTU = 1420\n\
             DNS = 10.9.0.53, office.lan\n\
             Table = off\n\
             PostUp = iptables -A FORWARD -i %i -j ACCEPT; iptables -t nat -A POSTROUTING -o eth0 -j MASQUERADE\n\
             PostDown = iptables -D FORWARD -i %i -j ACCEPT\n\
             SaveConfig = false\n\
             \n\
             [Peer] # laptop\n\
             PublicKey = {PEER_A}\n\
             PresharedKey = {PSK}\n\
             Endpoint = [fd00::7]:51820\n\
             AllowedIPs = 10.9.0.2/32 # the laptop itself\n\
             AllowedIPs = 192.168.7.1/24, fd00:9::2\n\
             PersistentKeepalive = 25\n\
             \n\
             [peer]\n\
             publickey = {PEER_B}\n\
             endpoint = vpn.example.net:51820\n\
             allowedips=0.0.0.0/0,::/0\n\
             persistentkeepalive = off\n"
        )
    }

    #[test]
    fn parses_realistic_file() {
        let config = parse_text(&realistic()).unwrap();
        assert_eq!(
            config.interface,
            InterfaceConfig {
                private_key: PrivateKey::Inline(key(PRIVATE)),
                addresses: vec![net("10.9.0.1/24"), net("fd00:9::1/64"), net("10.9.1.1/32")],
                listen_port: Some(51820),
                tun_name: None,
                mtu: Some(1420),
            }
        );
        assert_eq!(
            config.peers,
            vec![
                PeerConfig {
                    public_key: key(PEER_A),
                    preshared_key: Some(key(PSK)),
                    endpoint: Some(Endpoint::Addr(SocketAddr::V6(SocketAddrV6::new(
                        Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7),
                        51820,
                        0,
                        0
                    )))),
                    allowed_ips: vec![net("10.9.0.2/32"), net("192.168.7.0/24"), net("fd00:9::2/128")],
                    persistent_keepalive: Some(25),
                },
                PeerConfig {
                    public_key: key(PEER_B),
                    preshared_key: None,
                    endpoint: Some(Endpoint::Host { host: "vpn.example.net".into(), port: 51820 }),
                    allowed_ips: vec![net("0.0.0.0/0"), net("::/0")],
                    persistent_keepalive: None,
                },
            ]
        );
    }

    #[test]
    fn minimal_file_generates_key() {
        let config = parse_text("[Interface]\n").unwrap();
        assert_eq!(config.interface.private_key, PrivateKey::Generate);
        assert!(config.interface.addresses.is_empty());
        assert!(config.peers.is_empty());
    }

    #[test]
    fn ipv4_endpoint_and_zero_keepalive() {
        let text =
            format!("[Interface]\n[Peer]\nPublicKey = {PEER_A}\nEndpoint = 1.2.3.4:51820\nPersistentKeepalive = 0\n");
        let peer = &parse_text(&text).unwrap().peers[0];
        assert_eq!(peer.endpoint, Some(Endpoint::Addr(SocketAddr::from((Ipv4Addr::new(1, 2, 3, 4), 51820)))));
        assert_eq!(peer.persistent_keepalive, None);
    }

    #[test]
    fn debug_print_hides_secrets() {
        let config = parse_text(&realistic()).unwrap();
        let printed = format!("{config:?}");
        assert!(!printed.contains(PRIVATE), "{printed}");
        assert!(!printed.contains(PSK), "{printed}");
        assert!(printed.contains(PEER_A), "public keys are fine to print: {printed}");
    }

    #[test]
    fn error_unknown_key() {
        let err = assert_error("[Interface]\n# comment\nListenPrt = 51820\n", 3, "ListenPrt");
        assert_eq!(err.to_string(), "/etc/wireguard/wg0.conf:3: ListenPrt: unknown key in [Interface]");
    }

    #[test]
    fn error_key_from_other_section() {
        assert_error(&format!("[Interface]\n[Peer]\nPublicKey = {PEER_A}\nPrivateKey = {PRIVATE}\n"), 4, "PrivateKey");
    }

    #[test]
    fn error_duplicate_single_key() {
        assert_error("[Interface]\nListenPort = 1\nlistenport = 2\n", 3, "listenport");
        assert_error(&format!("[Interface]\n[Peer]\nPublicKey = {PEER_A}\nPublicKey = {PEER_B}\n"), 4, "PublicKey");
        assert_error("[Interface]\nTable = off\nTable = 1234\n", 3, "Table");
    }

    #[test]
    fn same_key_in_two_sections_is_not_a_duplicate() {
        let text = format!("[Interface]\n[Peer]\nPublicKey = {PEER_A}\n[Peer]\nPublicKey = {PEER_B}\n");
        assert_eq!(parse_text(&text).unwrap().peers.len(), 2);
    }

    #[test]
    fn error_key_outside_section() {
        assert_error("# header comment\nPrivateKey = abc\n[Interface]\n", 2, "PrivateKey");
    }

    #[test]
    fn error_missing_interface() {
        let err = assert_error(&format!("[Peer]\nPublicKey = {PEER_A}\n"), 0, "[Interface]");
        assert_eq!(err.to_string(), "/etc/wireguard/wg0.conf: [Interface]: missing; a wg-quick file needs exactly one");
        assert_error("# nothing here\n", 0, "[Interface]");
    }

    #[test]
    fn error_second_interface() {
        assert_error("[Interface]\nListenPort = 1\n\n[Interface]\n", 4, "[Interface]");
    }

    #[test]
    fn error_unknown_section_and_syntax() {
        assert_error("[Interface]\n[Peers]\n", 2, "[Peers]");
        assert_error("[Interface]\n[Peer\n", 2, "syntax");
        assert_error("[Interface]\nListenPort 51820\n", 2, "syntax");
        assert_error("[Interface]\n= 3\n", 2, "syntax");
    }

    #[test]
    fn error_duplicate_peer() {
        let text = format!(
            "[Interface]\n[Peer]\nPublicKey = {PEER_A}\n\n[Peer]\nAllowedIPs = 10.0.0.0/8\npublicKEY = {PEER_A}\n"
        );
        let err = assert_error(&text, 7, "publicKEY");
        assert!(err.message.contains("line 3"), "{err}");
    }

    #[test]
    fn error_peer_without_public_key() {
        assert_error("[Interface]\n\n[Peer]\nAllowedIPs = 10.0.0.0/8\n", 3, "PublicKey");
    }

    #[test]
    fn error_bad_values() {
        let err =
            assert_error("[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBm=\n", 2, "PrivateKey");
        assert_eq!(err.message, KEY_EXPECTED);
        // 33 bytes of valid base64.
        assert_error("[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmkA\n", 2, "PrivateKey");
        assert_error("[Interface]\nAddress = 10.9.0.1/24, 10.9.0.300\n", 2, "Address");
        assert_error("[Interface]\nListenPort = 65536\n", 2, "ListenPort");
        assert_error("[Interface]\nMTU = 575\n", 2, "MTU");
        assert_error("[Interface]\nMTU = 9001\n", 2, "MTU");
        let peer = format!("[Interface]\n[Peer]\nPublicKey = {PEER_A}\n");
        assert_error(&format!("{peer}PresharedKey = nope\n"), 4, "PresharedKey");
        assert_error(&format!("{peer}AllowedIPs = 10.0.0.0/33\n"), 4, "AllowedIPs");
        assert_error(&format!("{peer}Endpoint = 1.2.3.4\n"), 4, "Endpoint");
        assert_error(&format!("{peer}PersistentKeepalive = sometimes\n"), 4, "PersistentKeepalive");
    }

    #[test]
    fn mtu_bounds_are_inclusive() {
        assert_eq!(parse_text("[Interface]\nMTU = 576\n").unwrap().interface.mtu, Some(576));
        assert_eq!(parse_text("[Interface]\nMTU = 9000\n").unwrap().interface.mtu, Some(9000));
    }

    #[test]
    fn allowed_ips_host_bits_are_cleared() {
        assert_eq!(parse_allowed_ip("10.0.0.1/24"), Ok(net("10.0.0.0/24")));
        assert_eq!(parse_allowed_ip("fd00::1:2/112"), Ok(net("fd00::1:0/112")));
        assert_eq!(parse_allowed_ip("10.0.0.1"), Ok(net("10.0.0.1/32")));
        assert_eq!(parse_allowed_ip("fd00::1"), Ok(net("fd00::1/128")));
        assert_eq!(parse_allowed_ip("10.0.0.0/"), Err(ALLOWED_IP_EXPECTED));
        assert_eq!(parse_address("10.9.0.1/24"), Ok(net("10.9.0.1/24")));
    }

    #[test]
    fn endpoint_forms() {
        assert_eq!(parse_endpoint("1.2.3.4:51820"), Ok(Endpoint::Addr("1.2.3.4:51820".parse().unwrap())));
        assert_eq!(parse_endpoint("[fd00::1]:51820"), Ok(Endpoint::Addr("[fd00::1]:51820".parse().unwrap())));
        assert_eq!(parse_endpoint("host.name:51820"), Ok(Endpoint::Host { host: "host.name".into(), port: 51820 }));
        assert_eq!(parse_endpoint("localhost:1"), Ok(Endpoint::Host { host: "localhost".into(), port: 1 }));
        for bad in [
            "host.name",
            "host.name:",
            ":51820",
            "host.name:0",
            "host.name:65536",
            "1.2.3.4:0",
            "fd00::1:51820",
            "[fd00::1]",
            "[fd00::zz]:51820",
            "1.2.3.999:51820",
            "host..name:51820",
            "host name:51820",
        ] {
            assert_eq!(parse_endpoint(bad), Err(ENDPOINT_EXPECTED), "{bad}");
        }
    }

    #[test]
    fn crlf_and_byte_order_mark() {
        let text = format!("\u{feff}[Interface]\r\nListenPort = 7\r\n[Peer]\r\nPublicKey = {PEER_A}\r\n");
        let config = parse_text(&text).unwrap();
        assert_eq!(config.interface.listen_port, Some(7));
        assert_eq!(config.peers[0].public_key, key(PEER_A));
    }
}
