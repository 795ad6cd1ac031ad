//! What a managed node keeps on disk: the preferences `up` and `set` give it, its identity in the mesh (the
//! credential the server issued), and its last netmap. Each is one JSON file in the state directory, mode
//! 0600, replaced atomically, so a crash or an interrupted `up` leaves the old file or the new one.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use mesh_dataplane::netmap::AcceptRoutes;
use mesh_dataplane::router::Served;
use serde::{Deserialize, Serialize};

use crate::keys::write_private;

/// What an exit node advertises.
const EXIT_ROUTES: [&str; 2] = ["0.0.0.0/0", "::/0"];

/// A route this node advertises, and whether forwarded traffic into it is SNAT'd when it is approved
/// (`None`: follow `snat_subnet_routes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advertised {
    pub prefix: IpNet,
    pub snat: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Prefs {
    /// Whether the node should be connected: `up` sets it, `down` clears it, and a restarted daemon follows it.
    pub want_running: bool,
    pub control_url: String,
    pub ca_cert: Option<PathBuf>,
    /// An `http://` control URL is allowed only with this: the credential and auth key cross the
    /// network in the clear, so the node's operator must say so as well as the server's.
    pub insecure_http: bool,
    pub hostname: Option<String>,
    pub advertise_routes: Vec<Advertised>,
    pub accept_routes: AcceptRoutes,
    pub snat_subnet_routes: bool,
    pub snat_address: Vec<IpAddr>,
    pub advertise_tags: Vec<String>,
    /// Offer this node as an exit node: it advertises `0.0.0.0/0` and `::/0` (approved like any route,
    /// or by `autoApprovers.exitNode`) and forwards what peers send there.
    pub advertise_exit_node: bool,
    /// Send all traffic through this peer (its name or mesh address), if it is an approved exit node.
    pub exit_node: Option<String>,
    /// Point the host's DNS at the mesh's resolver (MagicDNS); it answers at 100.100.100.100 either way.
    pub accept_dns: bool,
}

impl Default for Prefs {
    fn default() -> Self {
        Self {
            want_running: false,
            control_url: String::new(),
            ca_cert: None,
            insecure_http: false,
            hostname: None,
            advertise_routes: Vec::new(),
            accept_routes: AcceptRoutes::None,
            snat_subnet_routes: true,
            snat_address: Vec::new(),
            advertise_tags: Vec::new(),
            advertise_exit_node: false,
            exit_node: None,
            accept_dns: true,
        }
    }
}

/// A change to the preferences: only the fields that are `Some` change (`meshd set` names only what it
/// changes, so a half-finished `up` can be mended field by field).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefsPatch {
    pub control_url: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub insecure_http: Option<bool>,
    pub hostname: Option<String>,
    pub advertise_routes: Option<Vec<Advertised>>,
    pub accept_routes: Option<AcceptRoutes>,
    pub snat_subnet_routes: Option<bool>,
    pub snat_address: Option<Vec<IpAddr>>,
    pub advertise_tags: Option<Vec<String>>,
    pub advertise_exit_node: Option<bool>,
    /// An empty name clears the choice.
    pub exit_node: Option<String>,
    pub accept_dns: Option<bool>,
}

impl Prefs {
    /// The preferences with `patch` applied; nothing else changes.
    pub fn patched(&self, patch: &PrefsPatch) -> Self {
        let mut p = self.clone();
        if let Some(v) = &patch.control_url {
            p.control_url = v.trim_end_matches('/').to_string();
        }
        if let Some(v) = &patch.ca_cert {
            p.ca_cert = Some(v.clone());
        }
        if let Some(v) = patch.insecure_http {
            p.insecure_http = v;
        }
        if let Some(v) = &patch.hostname {
            p.hostname = Some(v.clone());
        }
        if let Some(v) = &patch.advertise_routes {
            p.advertise_routes = v.iter().map(|a| Advertised { prefix: a.prefix.trunc(), snat: a.snat }).collect();
        }
        if let Some(v) = &patch.accept_routes {
            p.accept_routes = v.clone();
        }
        if let Some(v) = patch.snat_subnet_routes {
            p.snat_subnet_routes = v;
        }
        if let Some(v) = &patch.snat_address {
            p.snat_address = v.clone();
        }
        if let Some(v) = &patch.advertise_tags {
            p.advertise_tags = v.clone();
        }
        if let Some(v) = patch.advertise_exit_node {
            p.advertise_exit_node = v;
        }
        if let Some(v) = &patch.exit_node {
            p.exit_node = Some(v.clone()).filter(|name| !name.is_empty());
        }
        if let Some(v) = patch.accept_dns {
            p.accept_dns = v;
        }
        p
    }

    /// Every advertised route with its SNAT choice settled, the exit routes last.
    pub fn served(&self) -> Vec<Served> {
        let mut served: Vec<Served> = self
            .advertise_routes
            .iter()
            .map(|a| Served { prefix: a.prefix, snat: a.snat.unwrap_or(self.snat_subnet_routes) })
            .collect();
        if self.advertise_exit_node {
            // With SNAT, a family is offered only when it has an address to translate to.
            let snat = self.snat_subnet_routes;
            let offered =
                |prefix: &IpNet| !snat || self.snat_address.iter().any(|a| a.is_ipv4() == prefix.addr().is_ipv4());
            served.extend(
                EXIT_ROUTES
                    .iter()
                    .map(|p| p.parse::<IpNet>().expect("literal"))
                    .filter(offered)
                    .map(|prefix| Served { prefix, snat }),
            );
        }
        served
    }

    pub fn advertised_prefixes(&self) -> Vec<IpNet> {
        self.served().iter().map(|s| s.prefix).collect()
    }

    /// Whether the preferences hang together; one line saying what to change if not. Checked before they are
    /// stored, so a refused `up` or `set` changes nothing.
    pub fn check(&self) -> Result<(), String> {
        if self.advertise_exit_node && !self.served().iter().any(|s| s.prefix.prefix_len() == 0) {
            return Err("--advertise-exit-node translates what it forwards to --snat-address: give a free LAN \
                        address, or keep sources with --snat-subnet-routes=false (then the host must masquerade)"
                .into());
        }
        if let Some(default) = self.advertise_routes.iter().find(|a| mesh_dataplane::netmap::is_default_like(&a.prefix))
        {
            return Err(format!(
                "--advertise-routes {}: a default route (or one nearly as wide) makes an exit node; use \
                 --advertise-exit-node",
                default.prefix
            ));
        }
        if self.want_running && self.control_url.is_empty() {
            return Err("no coordination server: give --control-url URL (or MESHD_CONTROL_URL)".into());
        }
        if !self.control_url.is_empty()
            && !self.control_url.starts_with("https://")
            && !self.control_url.starts_with("http://")
        {
            return Err(format!("--control-url {}: expected https://HOST[:PORT]", self.control_url));
        }
        if self
            .control_url
            .split_once("://")
            .is_some_and(|(_, rest)| rest.split('/').next().unwrap_or("").contains('@'))
        {
            return Err("--control-url: no user or password in the URL (it would show in every message); the node \
                        authenticates with its key"
                .into());
        }
        if self.control_url.starts_with("http://") && !self.insecure_http {
            return Err(format!(
                "--control-url {}: plain HTTP sends the auth key and this node's credential unencrypted; use \
                 https://, or add --insecure-http on a network you trust",
                self.control_url
            ));
        }
        mesh_dataplane::check_snat(&self.served(), &self.snat_settings()?).map_err(|e| e.to_string())
    }

    /// What `--snat-address` asks of the data plane; refused if it names two addresses of one family.
    pub fn snat_settings(&self) -> Result<mesh_dataplane::SnatSettings, String> {
        mesh_dataplane::SnatSettings::with_addresses(&self.snat_address).map_err(|e| e.to_string())
    }
}

/// The node's registration: who the server says it is and the credential it presents.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub control_url: String,
    pub node_id: u64,
    pub name: String,
    pub credential: String,
    /// Joined with an ephemeral key (a sidecar logs such a node out when it stops).
    #[serde(default)]
    pub ephemeral: bool,
}

impl std::fmt::Debug for Identity {
    // The credential is a secret; it never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("control_url", &self.control_url)
            .field("node_id", &self.node_id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The files of a managed node, all in its state directory; or nothing on disk at all (`--state-dir mem:`,
/// a sidecar whose identity ends with its pod).
#[derive(Debug, Clone)]
pub struct Store {
    pub dir: PathBuf,
    pub memory: bool,
}

/// The `--state-dir` that keeps everything in memory.
pub const MEMORY: &str = "mem:";

impl Store {
    pub fn new(dir: &Path) -> Self {
        Store { dir: dir.to_path_buf(), memory: dir == Path::new(MEMORY) }
    }

    pub fn prefs_path(&self) -> PathBuf {
        self.dir.join("prefs.json")
    }

    pub fn identity_path(&self) -> PathBuf {
        self.dir.join("identity.json")
    }

    pub fn netmap_path(&self) -> PathBuf {
        self.dir.join("netmap.json")
    }

    pub fn load_prefs(&self) -> Result<Prefs, String> {
        if self.memory {
            return Ok(Prefs::default());
        }
        load_json(&self.prefs_path()).map(Option::unwrap_or_default)
    }

    pub fn save_prefs(&self, prefs: &Prefs) -> Result<(), String> {
        if self.memory {
            return Ok(());
        }
        save_json(&self.dir, &self.prefs_path(), prefs)
    }

    pub fn load_identity(&self) -> Result<Option<Identity>, String> {
        if self.memory {
            return Ok(None);
        }
        load_json(&self.identity_path())
    }

    pub fn save_identity(&self, identity: &Identity) -> Result<(), String> {
        if self.memory {
            return Ok(());
        }
        save_json(&self.dir, &self.identity_path(), identity)
    }

    /// The last netmap; a damaged cache is ignored (the server sends a fresh one), never fatal.
    pub fn load_netmap(&self) -> Option<mesh_proto::NetMap> {
        if self.memory {
            return None;
        }
        match load_json(&self.netmap_path()) {
            Ok(map) => map,
            Err(e) => {
                tracing::warn!("ignoring the cached netmap: {e}");
                None
            }
        }
    }

    pub fn save_netmap(&self, map: &mesh_proto::NetMap) -> Result<(), String> {
        if self.memory {
            return Ok(());
        }
        save_json(&self.dir, &self.netmap_path(), map)
    }

    /// Forgets the registration and what came with it (`logout`, `up --force-reauth`).
    pub fn forget_identity(&self) {
        if self.memory {
            return;
        }
        let _ = std::fs::remove_file(self.identity_path());
        let _ = std::fs::remove_file(self.netmap_path());
    }
}

fn load_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: cannot read: {e}", path.display())),
    }
}

fn save_json<T: Serialize>(dir: &Path, path: &Path, value: &T) -> Result<(), String> {
    if !dir.exists() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    let text = serde_json::to_vec_pretty(value).map_err(|e| format!("{}: {e}", path.display()))?;
    write_private(path, &text)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn a_plain_http_control_url_needs_insecure_http_on_the_node_too() {
        let plain = Prefs { want_running: true, control_url: "http://c.example:8080".into(), ..Prefs::default() };
        assert!(plain.check().unwrap_err().contains("--insecure-http"));
        let allowed = plain.patched(&PrefsPatch { insecure_http: Some(true), ..PrefsPatch::default() });
        assert_eq!(allowed.check(), Ok(()));
        let with_password = Prefs { control_url: "https://user:secret@c.example".into(), ..plain.clone() };
        assert!(with_password.check().unwrap_err().contains("no user or password"));
        let https = Prefs { control_url: "https://c.example".into(), ..plain };
        assert_eq!(https.check(), Ok(()));
    }

    #[test]
    fn a_patch_changes_only_what_it_names() {
        let before = Prefs {
            want_running: true,
            control_url: "https://c.example".into(),
            advertise_routes: vec![Advertised { prefix: net("10.0.0.0/16"), snat: None }],
            snat_address: vec!["10.0.12.9".parse().unwrap()],
            ..Prefs::default()
        };
        let after = before.patched(&PrefsPatch { accept_routes: Some(AcceptRoutes::All), ..PrefsPatch::default() });
        assert_eq!(after.accept_routes, AcceptRoutes::All);
        assert_eq!(Prefs { accept_routes: AcceptRoutes::All, ..before.clone() }, after, "nothing else moved");
        let url =
            before.patched(&PrefsPatch { control_url: Some("https://c.example:8443/".into()), ..Default::default() });
        assert_eq!(url.control_url, "https://c.example:8443");
    }

    #[test]
    fn snat_without_an_address_names_both_ways_out() {
        let prefs = Prefs {
            control_url: "https://c".into(),
            advertise_routes: vec![Advertised { prefix: net("10.0.0.0/16"), snat: None }],
            ..Prefs::default()
        };
        let err = prefs.check().unwrap_err();
        assert!(err.contains("--snat-address") && err.contains("--snat-subnet-routes=false"), "{err}");
        assert!(Prefs { snat_subnet_routes: false, ..prefs.clone() }.check().is_ok());
        let per_prefix = Prefs {
            advertise_routes: vec![Advertised { prefix: net("10.0.0.0/16"), snat: Some(false) }],
            ..prefs.clone()
        };
        assert!(per_prefix.check().is_ok(), "a :nosnat prefix needs no address");
        assert!(
            Prefs { want_running: true, control_url: String::new(), ..per_prefix }
                .check()
                .unwrap_err()
                .contains("--control-url")
        );
    }

    #[test]
    fn files_are_0600_and_survive_a_round_trip() {
        let dir = std::env::temp_dir().join(format!("meshd-prefs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::new(&dir);
        assert_eq!(store.load_prefs().unwrap(), Prefs::default(), "no file yet: defaults");
        assert_eq!(store.load_identity().unwrap(), None);
        let prefs = Prefs { want_running: true, control_url: "https://c".into(), ..Prefs::default() };
        store.save_prefs(&prefs).unwrap();
        let identity = Identity {
            control_url: "https://c".into(),
            node_id: 3,
            name: "a".into(),
            credential: "s3cret".into(),
            ephemeral: false,
        };
        store.save_identity(&identity).unwrap();
        assert_eq!(store.load_prefs().unwrap(), prefs);
        assert_eq!(store.load_identity().unwrap(), Some(identity.clone()));
        for path in [store.prefs_path(), store.identity_path()] {
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "{}", path.display());
        }
        assert!(!format!("{identity:?}").contains("s3cret"), "the credential stays out of logs");
        std::fs::write(store.netmap_path(), "{broken").unwrap();
        assert!(store.load_netmap().is_none(), "a damaged cache is ignored");
        store.forget_identity();
        assert_eq!(store.load_identity().unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
