//! Static-mode configuration: a TOML file of meshd's own, or a wg-quick `.conf` file as users already have.
//!
//! Both become one [`StaticConfig`]. Errors name the file, the line and the field, so a user can fix the
//! file without guessing.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

/// A WireGuard key: 32 bytes, written in base64 (44 characters) in both file formats.
pub type Key = [u8; 32];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticConfig {
    pub interface: InterfaceConfig,
    pub peers: Vec<PeerConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    pub private_key: PrivateKey,
    /// Mesh addresses put on the TUN device, with their prefix length (e.g. `100.64.0.1/32`, `10.9.0.1/24`).
    pub addresses: Vec<IpNet>,
    pub listen_port: Option<u16>,
    /// TUN device name; `None` means the daemon's `--tun` or its default.
    pub tun_name: Option<String>,
    pub mtu: Option<u16>,
}

/// Where the private key comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum PrivateKey {
    /// Written in the file itself (wg-quick's `PrivateKey`, TOML's `private_key`).
    Inline(Key),
    /// A file holding the base64 key (TOML's `private_key_file`), relative paths against the config's dir.
    File(PathBuf),
    /// Neither given: generated once into the state directory (mode 0600) and reused.
    Generate,
}

impl fmt::Debug for PrivateKey {
    // Keys never reach logs, not even through a Debug print of the config.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrivateKey::Inline(_) => f.write_str("Inline(<redacted>)"),
            PrivateKey::File(p) => f.debug_tuple("File").field(p).finish(),
            PrivateKey::Generate => f.write_str("Generate"),
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    pub endpoint: Option<Endpoint>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

impl fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConfig")
            .field("public_key", &base64_key(&self.public_key))
            .field("preshared_key", &self.preshared_key.map(|_| "<redacted>"))
            .field("endpoint", &self.endpoint)
            .field("allowed_ips", &self.allowed_ips)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .finish()
    }
}

/// A peer's endpoint as written: an address, or a host name resolved when the config is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Addr(SocketAddr),
    Host { host: String, port: u16 },
}

/// One line saying what is wrong and where: `FILE:LINE: FIELD: PROBLEM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is the file as a whole (unreadable, a required section missing).
    pub line: usize,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}: {}", self.file.display(), self.field, self.message)
        } else {
            write!(f, "{}:{}: {}: {}", self.file.display(), self.line, self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

pub fn base64_key(key: &Key) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Reads and parses a static configuration. A file whose first section header is `[Interface]`, or whose
/// name ends in `.conf`, is read as wg-quick; anything else as TOML.
pub fn load(path: &Path) -> Result<StaticConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: 0,
        field: "file".into(),
        message: format!("cannot read: {e}"),
    })?;
    parse(path, &text)
}

/// Parses configuration text; `path` is used for error messages and for relative key-file paths.
///
/// The format follows the file name (`.toml`, `.conf`); otherwise a first section header of exactly
/// `[Interface]` means wg-quick, as wg-quick writes it, and anything else TOML (whose own section is the
/// lower-case `[interface]`).
pub fn parse(path: &Path, text: &str) -> Result<StaticConfig, ConfigError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => return toml_format::parse(path, text),
        Some("conf") => return wgquick::parse(path, text),
        _ => {}
    }
    // A header may carry a trailing comment (`[Interface] # main`).
    let first_header = text.lines().map(|l| l.split('#').next().unwrap_or("").trim()).find(|l| l.starts_with('['));
    if first_header == Some("[Interface]") { wgquick::parse(path, text) } else { toml_format::parse(path, text) }
}

mod toml_format;
mod wgquick;

/// Keys and helpers the tests of both file formats share.
#[cfg(test)]
pub(crate) mod test_support {
    use std::path::Path;

    use super::{ConfigError, IpNet, Key, StaticConfig, decode_key};

    // Keys as `wg genkey` / `wg pubkey` / `wg genpsk` print them.
    pub const PRIVATE: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    pub const PEER_A: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    pub const PEER_B: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";
    pub const PSK: &str = "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE=";

    pub fn key(b64: &str) -> Key {
        decode_key(b64).unwrap()
    }

    pub fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// Checks that `parse` refuses `text` (as the file at `path`) naming the line and field a user must fix.
    #[track_caller]
    pub fn assert_refused(
        parse: fn(&Path, &str) -> Result<StaticConfig, ConfigError>,
        path: &str,
        text: &str,
        line: usize,
        field: &str,
    ) -> ConfigError {
        let err = parse(Path::new(path), text).expect_err("config should be rejected");
        assert_eq!((err.line, err.field.as_str()), (line, field), "wrong place in {err}");
        assert_eq!(err.file, Path::new(path));
        err
    }
}

pub use wgquick::decode_key;

#[cfg(test)]
mod dispatch_tests {
    use super::*;

    #[test]
    fn the_file_name_decides_and_otherwise_the_header() {
        let toml = "[interface]\nprivate_key = \"yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\"\n";
        assert!(parse(Path::new("a.toml"), toml).is_ok());
        assert!(parse(Path::new("node"), toml).is_ok(), "lower-case [interface] is TOML");
        let wg = "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n";
        assert!(parse(Path::new("wg0.conf"), wg).is_ok());
        assert!(parse(Path::new("node"), wg).is_ok());
    }

    #[test]
    fn a_wg_quick_file_is_recognised_by_its_header_whatever_its_name() {
        let text = "[Interface] # main\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n";
        let config = parse(Path::new("/etc/meshd/node"), text).unwrap();
        assert!(matches!(config.interface.private_key, PrivateKey::Inline(_)));
    }
}

#[cfg(test)]
mod never_panic {
    use proptest::prelude::*;

    use super::*;

    const WG: &str = "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\nAddress = 100.64.0.1/32\n\
                      ListenPort = 51820\n\n[Peer]\nPublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\n\
                      Endpoint = [fd00::1]:51820\nAllowedIPs = 10.0.0.0/16, 100.64.0.2\nPersistentKeepalive = 25\n";
    const TOML: &str = "[interface]\nprivate_key = \"yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\"\n\
                        addresses = [\"100.64.0.1/32\"]\n[[peers]]\npublic_key = \"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\"\n\
                        allowed_ips = [\"10.0.0.0/16\"]\nendpoint = \"host.example:51820\"\n";

    proptest! {
        /// Configuration files are user input: any text gives a config or an error, never a panic.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
            let _ = parse(Path::new("x.conf"), &text);
            let _ = parse(Path::new("x.toml"), &text);
        }

        /// Valid files with bytes replaced or cut short reach deeper than random text does.
        #[test]
        fn damaged_files_never_panic(
            which in any::<bool>(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), "\\PC{0,3}"), 0..6),
            keep in any::<prop::sample::Index>(),
        ) {
            let mut text = if which { WG.to_string() } else { TOML.to_string() };
            for (at, with) in edits {
                let mut i = at.index(text.len());
                while !text.is_char_boundary(i) {
                    i -= 1;
                }
                // Replace one whole character (or append at the end).
                let end = text[i..].chars().next().map_or(i, |c| i + c.len_utf8());
                text.replace_range(i..end, &with);
            }
            let mut cut = keep.index(text.len() + 1);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            let _ = parse(Path::new(if which { "wg0.conf" } else { "meshd.toml" }), &text);
        }
    }

    #[test]
    fn the_seeds_themselves_parse() {
        assert!(parse(Path::new("wg0.conf"), WG).is_ok());
        assert!(parse(Path::new("meshd.toml"), TOML).is_ok());
    }
}
