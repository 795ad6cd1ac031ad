//! meshd's own TOML format. Values are deserialized with their spans so that every error, including the
//! semantic ones found after serde is done, points at the line of the offending value.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::wgquick::{check_mtu, decode_key, keepalive, parse_address, parse_allowed_ip, parse_endpoint};
use super::{ConfigError, InterfaceConfig, Key, PeerConfig, PrivateKey, StaticConfig};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    // Optional for serde so that its absence is reported like wg-quick's, not as serde's spanless error.
    interface: Option<InterfaceToml>,
    #[serde(default)]
    peers: Vec<Spanned<PeerToml>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InterfaceToml {
    private_key: Option<Spanned<String>>,
    private_key_file: Option<Spanned<String>>,
    #[serde(default)]
    addresses: Vec<Spanned<String>>,
    listen_port: Option<u16>,
    tun_name: Option<Spanned<String>>,
    mtu: Option<Spanned<u16>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerToml {
    // Optional for serde so that a missing key is reported at the peer's own `[[peers]]` line.
    public_key: Option<Spanned<String>>,
    preshared_key: Option<Spanned<String>>,
    endpoint: Option<Spanned<String>>,
    #[serde(default)]
    allowed_ips: Vec<Spanned<String>>,
    persistent_keepalive: Option<u16>,
}

/// Parses the text of a meshd TOML configuration; `path` names the file in errors and anchors a relative
/// `private_key_file`.
pub(super) fn parse(path: &Path, text: &str) -> Result<StaticConfig, ConfigError> {
    let error = |span: Option<Range<usize>>, field: &str, message: &str| ConfigError {
        file: path.to_path_buf(),
        line: span.map_or(0, |span| line_of(text, span.start)),
        field: field.to_owned(),
        message: message.to_owned(),
    };

    let file: FileToml = toml::from_str(text).map_err(|e| {
        let field = e.span().and_then(|span| field_at(text, span.start)).unwrap_or_else(|| "toml".to_owned());
        error(e.span(), &field, e.message())
    })?;

    let Some(iface) = file.interface else {
        return Err(error(None, "interface", "missing; the file needs an [interface] table"));
    };

    let private_key = match (iface.private_key, iface.private_key_file) {
        (Some(_), Some(file)) => {
            return Err(error(
                Some(file.span()),
                "interface.private_key_file",
                "give private_key or private_key_file, not both",
            ));
        }
        (Some(key), None) => PrivateKey::Inline(
            decode_key(key.get_ref()).map_err(|m| error(Some(key.span()), "interface.private_key", m))?,
        ),
        (None, Some(file)) => {
            if file.get_ref().is_empty() {
                return Err(error(Some(file.span()), "interface.private_key_file", "expected a file path"));
            }
            // Relative to the config file, not the daemon's working directory, which under a service
            // manager is usually `/` and unrelated to where the user put the key.
            let dir = path.parent().unwrap_or(Path::new(""));
            PrivateKey::File(dir.join(PathBuf::from(file.into_inner())))
        }
        (None, None) => PrivateKey::Generate,
    };

    let addresses = iface
        .addresses
        .iter()
        .map(|a| parse_address(a.get_ref()).map_err(|m| error(Some(a.span()), "interface.addresses", m)))
        .collect::<Result<Vec<_>, _>>()?;

    let tun_name = iface
        .tun_name
        .map(|name| {
            check_tun_name(name.get_ref()).map_err(|m| error(Some(name.span()), "interface.tun_name", m))?;
            Ok(name.into_inner())
        })
        .transpose()?;

    let mtu = iface
        .mtu
        .map(|mtu| check_mtu(*mtu.get_ref()).map_err(|m| error(Some(mtu.span()), "interface.mtu", m)))
        .transpose()?;

    let interface = InterfaceConfig { private_key, addresses, listen_port: iface.listen_port, tun_name, mtu };

    let mut first_seen: HashMap<Key, usize> = HashMap::new();
    let mut peers = Vec::with_capacity(file.peers.len());
    for (i, peer) in file.peers.into_iter().enumerate() {
        let peer_span = peer.span();
        let peer = peer.into_inner();
        let field = |name: &str| format!("peers[{i}].{name}");

        let Some(public_key) = peer.public_key else {
            return Err(error(Some(peer_span), &field("public_key"), "missing; every peer needs one"));
        };
        let public_key_span = public_key.span();
        let key = decode_key(public_key.get_ref())
            .map_err(|m| error(Some(public_key_span.clone()), &field("public_key"), m))?;
        if let Some(first) = first_seen.insert(key, i) {
            return Err(error(Some(public_key_span), &field("public_key"), &format!("same key as peers[{first}]")));
        }

        let preshared_key = peer
            .preshared_key
            .map(|psk| decode_key(psk.get_ref()).map_err(|m| error(Some(psk.span()), &field("preshared_key"), m)))
            .transpose()?;

        let endpoint = peer
            .endpoint
            .map(|ep| parse_endpoint(ep.get_ref()).map_err(|m| error(Some(ep.span()), &field("endpoint"), m)))
            .transpose()?;

        let allowed_ips = peer
            .allowed_ips
            .iter()
            .map(|ip| parse_allowed_ip(ip.get_ref()).map_err(|m| error(Some(ip.span()), &field("allowed_ips"), m)))
            .collect::<Result<Vec<_>, _>>()?;

        peers.push(PeerConfig {
            public_key: key,
            preshared_key,
            endpoint,
            allowed_ips,
            persistent_keepalive: peer.persistent_keepalive.and_then(keepalive),
        });
    }

    Ok(StaticConfig { interface, peers })
}

/// Linux's rule for interface names (IFNAMSIZ less the NUL), narrowed to characters that need no quoting
/// in shells or in `ip` commands. `.` and `..` are refused by the kernel itself.
fn check_tun_name(name: &str) -> Result<(), &'static str> {
    let chars_ok = name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if (1..=15).contains(&name.len()) && chars_ok && name != "." && name != ".." {
        Ok(())
    } else {
        Err("expected 1 to 15 characters from A-Z a-z 0-9 _ . -")
    }
}

/// 1-based line of a byte offset; an offset at or past the end (errors at end of input) is on the last line.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

/// The dotted path (`peers[1].allowed_ips`) of the key or value at `offset`, for errors that serde reports
/// with a span but no path. Arrays of scalars are named by the array, as the semantic errors name them.
fn field_at(text: &str, offset: usize) -> Option<String> {
    // Recoverable so that syntax errors get a path too when the broken spot is still inside a value.
    let (root, _) = DeTable::parse_recoverable(text);
    find_in_table(root.get_ref(), offset)
}

fn find_in_table(table: &DeTable<'_>, offset: usize) -> Option<String> {
    table.iter().find_map(|(key, value)| {
        if key.span().contains(&offset) {
            return Some(key.get_ref().to_string());
        }
        find_in_value(value, offset).map(|rest| format!("{}{rest}", key.get_ref()))
    })
}

/// The path below `value` leading to `offset`: empty for `value` itself.
fn find_in_value(value: &Spanned<DeValue<'_>>, offset: usize) -> Option<String> {
    // A `[table]`'s span is only its header, so children are searched before the table's own span.
    let inner = match value.get_ref() {
        DeValue::Table(table) => find_in_table(table, offset).map(|rest| format!(".{rest}")),
        DeValue::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let rest = find_in_value(item, offset)?;
            Some(if item.get_ref().is_table() { format!("[{i}]{rest}") } else { rest })
        }),
        _ => None,
    };
    inner.or_else(|| value.span().contains(&offset).then(String::new))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::super::Endpoint;
    use super::super::wgquick::{ALLOWED_IP_EXPECTED, ENDPOINT_EXPECTED, KEY_EXPECTED};
    use super::*;

    use crate::config::test_support::*;

    fn parse_text(text: &str) -> Result<StaticConfig, ConfigError> {
        parse(Path::new("/etc/meshd/meshd.toml"), text)
    }

    #[track_caller]
    fn assert_error(text: &str, line: usize, field: &str) -> ConfigError {
        assert_refused(parse, "/etc/meshd/meshd.toml", text, line, field)
    }

    fn realistic() -> String {
        format!(
            r#"# meshd on the office gateway
[interface]
private_key = "{PRIVATE}"
addresses = ["100.64.0.1/32", "fd7a:115c:a1e0::1/128", "10.9.0.1/24"]
listen_port = 41641
tun_name = "mesh0"
mtu = 1420

[[peers]] # laptop
public_key = "{PEER_A}"
preshared_key = "{PSK}"
endpoint = "[fd00::7]:41641"
allowed_ips = [
    "100.64.0.2/32",
    "192.168.7.1/24",  # host bits are cleared
    "fd7a:115c:a1e0::2",
]
persistent_keepalive = 25

[[peers]]
public_key = "{PEER_B}"
endpoint = "vpn.example.net:41641"
allowed_ips = ["0.0.0.0/0", "::/0"]
persistent_keepalive = 0
"#
        )
    }

    #[test]
    fn parses_realistic_file() {
        let config = parse_text(&realistic()).unwrap();
        assert_eq!(
            config.interface,
            InterfaceConfig {
                private_key: PrivateKey::Inline(key(PRIVATE)),
                addresses: vec![net("100.64.0.1/32"), net("fd7a:115c:a1e0::1/128"), net("10.9.0.1/24")],
                listen_port: Some(41641),
                tun_name: Some("mesh0".into()),
                mtu: Some(1420),
            }
        );
        assert_eq!(
            config.peers,
            vec![
                PeerConfig {
                    public_key: key(PEER_A),
                    preshared_key: Some(key(PSK)),
                    endpoint: Some(Endpoint::Addr("[fd00::7]:41641".parse::<SocketAddr>().unwrap())),
                    allowed_ips: vec![net("100.64.0.2/32"), net("192.168.7.0/24"), net("fd7a:115c:a1e0::2/128")],
                    persistent_keepalive: Some(25),
                },
                PeerConfig {
                    public_key: key(PEER_B),
                    preshared_key: None,
                    endpoint: Some(Endpoint::Host { host: "vpn.example.net".into(), port: 41641 }),
                    allowed_ips: vec![net("0.0.0.0/0"), net("::/0")],
                    persistent_keepalive: None,
                },
            ]
        );
    }

    #[test]
    fn same_config_as_wgquick() {
        let wg = format!(
            "[Interface]\nPrivateKey = {PRIVATE}\nAddress = 100.64.0.1/32\nListenPort = 41641\n\
             [Peer]\nPublicKey = {PEER_A}\nEndpoint = 198.51.100.7:41641\nAllowedIPs = 10.0.0.1/16\n"
        );
        let toml = format!(
            "[interface]\nprivate_key = \"{PRIVATE}\"\naddresses = [\"100.64.0.1/32\"]\nlisten_port = 41641\n\
             [[peers]]\npublic_key = \"{PEER_A}\"\nendpoint = \"198.51.100.7:41641\"\nallowed_ips = [\"10.0.0.1/16\"]\n"
        );
        let from_wg = super::super::wgquick::parse(Path::new("wg0.conf"), &wg).unwrap();
        assert_eq!(parse_text(&toml).unwrap(), from_wg);
    }

    #[test]
    fn empty_interface_generates_key() {
        let config = parse_text("[interface]\n").unwrap();
        assert_eq!(config.interface.private_key, PrivateKey::Generate);
        assert!(config.peers.is_empty());
    }

    #[test]
    fn relative_private_key_file_resolves_against_config_dir() {
        let config = parse_text("[interface]\nprivate_key_file = \"keys/node.key\"\n").unwrap();
        assert_eq!(config.interface.private_key, PrivateKey::File("/etc/meshd/keys/node.key".into()));

        let config = parse_text("[interface]\nprivate_key_file = \"/var/lib/meshd/key\"\n").unwrap();
        assert_eq!(config.interface.private_key, PrivateKey::File("/var/lib/meshd/key".into()));

        // A bare file name as the config path has an empty parent: the key path stays relative to the cwd,
        // which is where that config file is too.
        let config = parse(Path::new("meshd.toml"), "[interface]\nprivate_key_file = \"node.key\"\n").unwrap();
        assert_eq!(config.interface.private_key, PrivateKey::File("node.key".into()));
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
    fn error_unknown_field() {
        let err = assert_error("[interface]\nlisten_port = 1\nlisten_prot = 2\n", 3, "interface.listen_prot");
        assert!(err.message.starts_with("unknown field `listen_prot`"), "{err}");
        assert_error(
            &format!("[interface]\n\n[[peers]]\npublic_key = \"{PEER_A}\"\n\n[[peers]]\nallowed_ip = []\n"),
            7,
            "peers[1].allowed_ip",
        );
        assert_error("[interface]\n[extra]\n", 2, "extra");
    }

    #[test]
    fn error_bad_key() {
        let err = assert_error("[interface]\n\nprivate_key = \"not-a-key\"\n", 3, "interface.private_key");
        assert_eq!(err.message, KEY_EXPECTED);
        let text = format!(
            "[interface]\n[[peers]]\npublic_key = \"{PEER_A}\"\n\
             [[peers]]\npublic_key = \"{PEER_B}\"\npreshared_key = \"{}\"\n",
            &PSK[..40]
        );
        assert_error(&text, 6, "peers[1].preshared_key");
    }

    #[test]
    fn error_both_private_key_sources() {
        let text = format!("[interface]\nprivate_key = \"{PRIVATE}\"\nprivate_key_file = \"key\"\n");
        let err = assert_error(&text, 3, "interface.private_key_file");
        assert!(!err.to_string().contains(PRIVATE));
    }

    #[test]
    fn error_bad_values() {
        let err = assert_error(
            "[interface]\naddresses = [\n  \"100.64.0.1/32\",\n  \"100.64.0/32\",\n]\n",
            4,
            "interface.addresses",
        );
        assert_eq!(err.message, "expected an address like 10.9.0.1/24 or 10.9.0.1");
        assert_error("[interface]\ntun_name = \"mesh0-with-a-long-name\"\n", 2, "interface.tun_name");
        assert_error("[interface]\ntun_name = \"\"\n", 2, "interface.tun_name");
        assert_error("[interface]\ntun_name = \"mesh 0\"\n", 2, "interface.tun_name");
        assert_error("[interface]\ntun_name = \"..\"\n", 2, "interface.tun_name");
        assert_error("[interface]\nmtu = 70\n", 2, "interface.mtu");
        assert_error("[interface]\nprivate_key_file = \"\"\n", 2, "interface.private_key_file");
        let peer = format!("[interface]\n[[peers]]\npublic_key = \"{PEER_A}\"\n");
        let err = assert_error(
            &format!("{peer}allowed_ips = [\"10.0.0.0/16\", \"10.0.0.0/40\"]\n"),
            4,
            "peers[0].allowed_ips",
        );
        assert_eq!(err.message, ALLOWED_IP_EXPECTED);
        let err = assert_error(&format!("{peer}endpoint = \"198.51.100.7\"\n"), 4, "peers[0].endpoint");
        assert_eq!(err.message, ENDPOINT_EXPECTED);
    }

    #[test]
    fn tun_name_limits() {
        assert!(check_tun_name("a").is_ok());
        assert!(check_tun_name("mesh_0.v-6abcde").is_ok());
        assert!(check_tun_name("mesh_0.v-6abcdef").is_err());
        assert!(check_tun_name("mesh/0").is_err());
        assert!(check_tun_name("méš").is_err());
    }

    #[test]
    fn error_serde_types_carry_line_and_field() {
        let err = assert_error("[interface]\nlisten_port = 70000\n", 2, "interface.listen_port");
        assert!(err.message.contains("70000"), "{err}");
        assert_error("[interface]\naddresses = \"100.64.0.1/32\"\n", 2, "interface.addresses");
        assert_error("[interface]\naddresses = [\"100.64.0.1/32\", 7]\n", 2, "interface.addresses");
        let peer = format!("[interface]\n[[peers]]\npublic_key = \"{PEER_A}\"\n");
        assert_error(&format!("{peer}persistent_keepalive = -1\n"), 4, "peers[0].persistent_keepalive");
        assert_error("[interface]\npeers = 3\n", 2, "interface.peers");
        assert_error("[interface]\n\npeers = 3\n", 3, "interface.peers");
    }

    #[test]
    fn error_syntax_carries_line() {
        let err = assert_error("[interface]\nlisten_port = 1\nmtu = \n", 3, "toml");
        assert!(!err.message.is_empty());
        assert_error("[interface]\nlisten_port = 1\n[interface]\n", 3, "interface");
    }

    #[test]
    fn error_missing_interface() {
        let err = assert_error(&format!("[[peers]]\npublic_key = \"{PEER_A}\"\n"), 0, "interface");
        assert_eq!(err.to_string(), "/etc/meshd/meshd.toml: interface: missing; the file needs an [interface] table");
    }

    #[test]
    fn error_peer_without_public_key() {
        assert_error(
            &format!("[interface]\n[[peers]]\npublic_key = \"{PEER_A}\"\n\n[[peers]]\nallowed_ips = []\n"),
            5,
            "peers[1].public_key",
        );
    }

    #[test]
    fn error_duplicate_peer() {
        let text = format!(
            "[interface]\n[[peers]]\npublic_key = \"{PEER_A}\"\n[[peers]]\npublic_key = \"{PEER_B}\"\n\
             [[peers]]\npublic_key = \"{PEER_A}\"\n"
        );
        let err = assert_error(&text, 7, "peers[2].public_key");
        assert_eq!(err.message, "same key as peers[0]");
    }

    #[test]
    fn inline_peer_tables_get_paths() {
        let text = format!(
            "peers = [\n  {{ public_key = \"{PEER_A}\" }},\n  {{ public_key = \"{PEER_B}\", bogus = 1 }},\n]\n\
             [interface]\n"
        );
        assert_error(&text, 3, "peers[1].bogus");
    }

    #[test]
    fn line_of_offsets() {
        assert_eq!(line_of("a\nb\n", 0), 1);
        assert_eq!(line_of("a\nb\n", 2), 2);
        assert_eq!(line_of("a\nb\n", 4), 3);
        assert_eq!(line_of("a\nb\n", 99), 3);
    }
}
