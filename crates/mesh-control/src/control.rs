use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use mesh_proto::{
    EndpointsUpdate, ErrorCode, FilterRule, MAX_ENDPOINTS, NetMap, Peer, RegisterRequest, RegisterResponse, RouteState,
    RoutesUpdate, VERSION,
};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use crate::policy::compile::Kept;
use crate::policy::{Policy, PolicyNode};
use mesh_proto::proof;

/// The schema, one statement list per version. Plain SQL both SQLite and PostgreSQL accept, so a PostgreSQL
/// store can follow without a rewrite (INTEGER ids are assigned by the database in both).
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE auth_keys (
        id INTEGER PRIMARY KEY,
        lookup TEXT NOT NULL UNIQUE,
        hash TEXT NOT NULL,
        reusable INTEGER NOT NULL,
        ephemeral INTEGER NOT NULL,
        tags TEXT NOT NULL,
        expires_at INTEGER,
        revoked INTEGER NOT NULL DEFAULT 0,
        uses INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE nodes (
        id INTEGER PRIMARY KEY,
        node_key TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL UNIQUE,
        ipv4 TEXT NOT NULL UNIQUE,
        ipv6 TEXT NOT NULL UNIQUE,
        tags TEXT NOT NULL,
        credential_hash TEXT NOT NULL,
        ephemeral INTEGER NOT NULL,
        expired INTEGER NOT NULL DEFAULT 0,
        last_seen INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE routes (
        node_id INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
        prefix TEXT NOT NULL,
        approved INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (node_id, prefix)
    );
",
    "
    ALTER TABLE nodes ADD COLUMN endpoints TEXT NOT NULL DEFAULT '';
",
    "
    ALTER TABLE nodes ADD COLUMN registered_at_ms INTEGER NOT NULL DEFAULT 0;
",
    // The policy is state: every version kept with who set it. A node's tags from its key are kept apart
    // from those it asked for, so a narrower policy can take back only what it granted (tags a node had
    // before this migration count as its key's); likewise approvals the policy made, not an admin.
    "
    CREATE TABLE policies (
        version INTEGER PRIMARY KEY,
        text TEXT NOT NULL,
        set_by TEXT NOT NULL,
        set_at INTEGER NOT NULL
    );
    ALTER TABLE nodes ADD COLUMN key_tags TEXT NOT NULL DEFAULT '';
    UPDATE nodes SET key_tags = tags;
    ALTER TABLE routes ADD COLUMN auto_approved INTEGER NOT NULL DEFAULT 0;
",
    "
    ALTER TABLE nodes ADD COLUMN key_expiry INTEGER;
",
    // A deleted node's last registration time outlives it for a while, so a recorded registration of
    // it cannot bring it back within the clock window.
    "
    CREATE TABLE retired_keys (node_key TEXT PRIMARY KEY, registered_at_ms INTEGER NOT NULL);
",
    // Owners: a node belongs to the user its auth key was made for, unless it is tagged (then its tags
    // own it, as in Headscale and Tailscale).
    "
    CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at INTEGER NOT NULL);
    ALTER TABLE auth_keys ADD COLUMN user_id INTEGER;
    ALTER TABLE nodes ADD COLUMN user_id INTEGER;
",
    // DNS settings are state like the policy: every version kept with who set it.
    "
    CREATE TABLE dns_configs (
        version INTEGER PRIMARY KEY,
        text TEXT NOT NULL,
        set_by TEXT NOT NULL,
        set_at INTEGER NOT NULL
    );
",
];

/// How long a deleted node's registration time is kept: past the clock window (5 minutes either way), a
/// recorded registration is refused as stale anyway.
const RETIRED_FOR_MS: i64 = 10 * 60 * 1000;

/// Bounds on what one node may hand the server, so no registration can grow every netmap past what nodes
/// read (`MAX_ENDPOINTS` is in mesh-proto, which nodes also obey).
pub const MAX_ROUTES: usize = 256;
pub const MAX_TAGS: usize = 64;
const MAX_TAG_LEN: usize = 64;
const MAX_HOSTNAME_LEN: usize = 255;
const MAX_AUTH_KEY_LEN: usize = 128;

/// How stale a node's stored last-seen time may get while it polls (see `touch`).
pub const TOUCH_EVERY: u64 = 15;

/// The host part of the resolver's IPv6 address in the mesh's /48 (`<ula48>::53`).
const RESOLVER_V6_HOST: u64 = 0x53;

/// The mesh's IPv4 range (RFC 6598 shared address space, as Tailscale uses).
const MESH_V4: &str = "100.64.0.0/10";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlError {
    pub code: ErrorCode,
    pub message: String,
}

impl ControlError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub(crate) fn bad(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// A fault of the server's own: logged here with its detail, answered with none (the detail may name
    /// tables, paths or values, and is no business of the caller's).
    fn storage(e: rusqlite::Error) -> Self {
        tracing::error!(error = %e, "storage failed");
        Self::new(ErrorCode::Internal, "the coordination server failed; it has logged why")
    }
}

impl ControlError {
    fn damaged(what: &str) -> Self {
        tracing::error!("storage holds {what}");
        Self::new(ErrorCode::Internal, "the coordination server failed; it has logged why")
    }
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ControlError {}

impl From<rusqlite::Error> for ControlError {
    fn from(e: rusqlite::Error) -> Self {
        Self::storage(e)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthKeyOptions {
    pub reusable: bool,
    pub ephemeral: bool,
    pub tags: Vec<String>,
    /// Seconds from creation; `None` never expires.
    pub expiry: Option<u64>,
    /// The user whose untagged nodes this key makes (an existing user's name).
    pub user: Option<String>,
}

/// A user, who owns the untagged nodes registered with their auth keys.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct User {
    pub id: u64,
    pub name: String,
    pub nodes: u64,
}

/// An auth key as listed (never with its secret, which only its creator sees once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthKey {
    pub id: u64,
    pub lookup: String,
    pub reusable: bool,
    pub ephemeral: bool,
    pub tags: Vec<String>,
    pub expires_at: Option<u64>,
    pub revoked: bool,
    pub uses: u64,
    pub user: Option<String>,
}

/// A route a node advertises, as administrators list it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AdvertisedRoute {
    pub node: u64,
    pub name: String,
    pub prefix: IpNet,
    pub approved: bool,
    pub primary: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: u64,
    pub node_key: String,
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub tags: Vec<String>,
    pub ephemeral: bool,
    pub expired: bool,
    pub last_seen: u64,
    /// Where the node's WireGuard socket can be reached, as it last reported.
    pub endpoints: Vec<SocketAddr>,
    /// When its key stops being trusted (Unix seconds), if the server gives keys a lifetime.
    pub key_expiry: Option<u64>,
    /// The user who owns it; none for a tagged node (its tags own it).
    pub user: Option<String>,
}

/// A policy as stored: its text, version, and who set it when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPolicy {
    pub version: u64,
    pub text: String,
    pub set_by: String,
    pub set_at: u64,
}

/// What setting a policy took back (`node: tag`, `node: prefix`), for the log and the admin's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PolicyChange {
    pub version: u64,
    pub tags_revoked: Vec<String>,
    pub approvals_revoked: Vec<String>,
}

impl PolicyChange {
    /// Everything the new version took back: tags, then route approvals (`name: what` each).
    pub fn taken_back(&self) -> impl Iterator<Item = &String> {
        self.tags_revoked.iter().chain(&self.approvals_revoked)
    }
}

/// The coordination server's state.
#[derive(Debug)]
pub struct Control {
    db: Connection,
    policy: Policy,
    domain: String,
    /// The DNS settings in force (the defaults until `dns set`).
    dns: mesh_proto::DnsConfig,
    /// How long a registration's key is trusted (seconds); none: until an admin expires the node.
    key_lifetime: Option<u64>,
    /// The last compiled policy. Most new versions change nothing it depends on (an endpoint report, a
    /// node coming online), so they reuse it instead of compiling the whole mesh again.
    compiled: std::cell::RefCell<Option<Arc<PolicyView>>>,
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the operating system provides randomness");
    hex::encode(buf)
}

fn join(list: &[String]) -> String {
    list.join(",")
}

fn split(text: &str) -> Vec<String> {
    text.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// Tags as users write them in policies: `tag:` and lower-case letters, digits and dashes.
fn check_tags(tags: &[String]) -> Result<(), ControlError> {
    if tags.len() > MAX_TAGS {
        return Err(ControlError::bad(format!("{} tags; at most {MAX_TAGS}", tags.len())));
    }
    for tag in tags {
        let name = tag.strip_prefix("tag:").unwrap_or_default();
        if name.is_empty()
            || tag.len() > MAX_TAG_LEN
            || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(ControlError::bad(format!(
                "{} is not a tag: write tag:NAME with lower-case letters, digits and dashes, at most {MAX_TAG_LEN} \
                 characters",
                quoted(tag, 80)
            )));
        }
    }
    Ok(())
}

/// A user name as Headscale and Tailscale take them (a login or an e-mail address): at most 64 characters,
/// no spaces or control characters, and nothing a policy would read as a selector (`tag:`, `group:`...).
fn check_user_name(name: &str) -> Result<(), ControlError> {
    let selector = ["tag:", "group:", "autogroup:"].iter().any(|p| name.starts_with(p)) || name == "*";
    if name.is_empty()
        || name.chars().count() > 64
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
        || selector
    {
        return Err(ControlError::bad(format!(
            "{} is not a user name: a login or an e-mail address, at most 64 characters, no spaces, not a selector",
            quoted(name, 80)
        )));
    }
    Ok(())
}

/// Text from a client, quoted and cut short, safe to put into a message (control characters escaped).
fn quoted(text: &str, max_chars: usize) -> String {
    let short: String = text.chars().take(max_chars).collect();
    format!("{short:?}")
}

/// What a registration may carry, checked before anything is looked up or stored.
fn check_registration(request: &RegisterRequest) -> Result<(), ControlError> {
    if request.auth_key.len() > MAX_AUTH_KEY_LEN {
        return Err(ControlError::new(ErrorCode::UnknownAuthKey, "the auth key is not known to this server"));
    }
    if proof::decode_key(&request.node_key).is_none() {
        return Err(ControlError::bad("the node key is not a 32-byte base64 WireGuard public key"));
    }
    if request.hostname.len() > MAX_HOSTNAME_LEN {
        return Err(ControlError::bad(format!("the hostname is longer than {MAX_HOSTNAME_LEN} bytes")));
    }
    check_routes(&request.advertise_routes)?;
    check_tags(&request.tags)
}

fn check_routes(routes: &[IpNet]) -> Result<(), ControlError> {
    if routes.len() > MAX_ROUTES {
        return Err(ControlError::bad(format!("{} routes advertised; at most {MAX_ROUTES}", routes.len())));
    }
    Ok(())
}

/// Addresses no peer should be sent to: link-local (which holds cloud metadata services at 169.254.169.254
/// and fe80::/10), broadcast, documentation, the other clouds' metadata addresses, and this host itself.
fn unreachable_endpoint(endpoint: &SocketAddr) -> bool {
    use std::net::IpAddr;
    const DOCUMENTATION: [&str; 5] =
        ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32", "3fff::/20"];
    const METADATA: [&str; 2] = ["100.100.100.200/32", "fd00:ec2::254/128"];
    let ip = endpoint.ip().to_canonical();
    let in_any = |list: &[&str]| list.iter().any(|n| n.parse::<IpNet>().is_ok_and(|n| n.contains(&ip)));
    let special = match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    endpoint.port() == 0
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_loopback()
        || special
        || in_any(&DOCUMENTATION)
        || in_any(&METADATA)
}

impl Control {
    /// Opens (creating and migrating as needed) the database at `path`.
    /// Opens the store with the policy it holds (an empty one if none was ever set).
    pub fn open(path: &Path, domain: &str) -> Result<Self, ControlError> {
        let db = Connection::open(path)?;
        // WAL: a write is one append and readers never wait for it. FULL: a credential handed out survives a
        // power cut, or its node would be refused as unknown with nothing to fix it.
        db.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;")?;
        let mut control = Self::with_connection(db, Policy::default(), domain)?;
        if let Some(stored) = control.stored_policy()? {
            control.policy = Policy::parse(&stored.text).map_err(|_| ControlError::damaged("an unreadable policy"))?;
        }
        Ok(control)
    }

    pub fn in_memory(policy: Policy, domain: &str) -> Result<Self, ControlError> {
        Self::with_connection(Connection::open_in_memory()?, policy, domain)
    }

    fn with_connection(db: Connection, policy: Policy, domain: &str) -> Result<Self, ControlError> {
        db.execute_batch(
            "PRAGMA foreign_keys = ON; CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);",
        )?;
        let current: i64 = db.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| r.get(0))?;
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            let tx = db.unchecked_transaction()?;
            tx.execute_batch(migration)?;
            tx.execute("INSERT INTO schema_version (version) VALUES (?1)", params![i as i64 + 1])?;
            tx.commit()?;
        }
        let mut control = Self {
            db,
            policy,
            domain: domain.to_string(),
            dns: mesh_proto::DnsConfig::default(),
            key_lifetime: None,
            compiled: Default::default(),
        };
        if let Some(stored) = control.stored_dns()? {
            control.dns = crate::dns::parse(&stored.text, domain).map_err(|e| {
                ControlError::damaged(&format!(
                    "the stored DNS settings (version {}) no longer parse: {e}",
                    stored.version
                ))
            })?;
        }
        if control.meta("ula")?.is_none() {
            // A random ULA /48 (RFC 4193) per mesh, chosen once.
            let mut global = [0u8; 5];
            getrandom::fill(&mut global).expect("the operating system provides randomness");
            let ula = Ipv6Net::new(
                Ipv6Addr::new(
                    0xfd00 | u16::from(global[0]),
                    u16::from_be_bytes([global[1], global[2]]),
                    u16::from_be_bytes([global[3], global[4]]),
                    0,
                    0,
                    0,
                    0,
                    0,
                ),
                48,
            )
            .expect("a /48");
            control.set_meta("ula", &ula.to_string())?;
            control.set_meta("version", "1")?;
        }
        if control.meta("server_private")?.is_none() {
            let mut private = [0u8; 32];
            getrandom::fill(&mut private).expect("the operating system provides randomness");
            control.set_meta("server_private", &hex::encode(private))?;
        }
        Ok(control)
    }

    fn meta(&self, key: &str) -> Result<Option<String>, ControlError> {
        Ok(self.db.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| r.get(0)).optional()?)
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<(), ControlError> {
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// The netmap version: it grows with every change any node could see.
    pub fn version(&self) -> Result<u64, ControlError> {
        Ok(self.meta("version")?.and_then(|v| v.parse().ok()).unwrap_or(1))
    }

    fn bump(&self) -> Result<u64, ControlError> {
        let next = self.version()? + 1;
        self.set_meta("version", &next.to_string())?;
        Ok(next)
    }

    pub fn ula(&self) -> Result<Ipv6Net, ControlError> {
        let text = self.meta("ula")?.ok_or_else(|| ControlError::damaged("no ULA prefix"))?;
        text.parse().map_err(|_| ControlError::damaged("a malformed ULA prefix"))
    }

    fn server_private(&self) -> Result<[u8; 32], ControlError> {
        let text = self.meta("server_private")?.unwrap_or_default();
        hex::decode(text)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| ControlError::damaged("a malformed server key"))
    }

    /// A route wider than /8 (IPv4) or /16 (IPv6) must be a default route, which makes an exit node: two
    /// halves of the address space are a default route no exit-node opt-in would see. Routes over the
    /// mesh's own range are stored (seed 003's connectors advertise 100.64.0.0/10 for their clusters), but
    /// nodes never route mesh addresses by them.
    fn check_route_ranges(&self, routes: &[IpNet]) -> Result<(), ControlError> {
        for route in routes {
            let wide = match route {
                IpNet::V4(_) => route.prefix_len() < 8,
                IpNet::V6(_) => route.prefix_len() < 16,
            };
            if wide && route.prefix_len() != 0 {
                return Err(ControlError::bad(format!(
                    "{route} is nearly a default route; advertise an exit node (--advertise-exit-node) instead"
                )));
            }
        }
        Ok(())
    }

    /// The key registrations are signed for, base64 (published at `GET /api/v1/server-key`).
    pub fn server_public_key(&self) -> Result<String, ControlError> {
        Ok(proof::encode_key(&proof::public_key(&self.server_private()?)))
    }

    /// The policy in force as it was written, with its version and who set it; `None` before any was set.
    pub fn stored_policy(&self) -> Result<Option<StoredPolicy>, ControlError> {
        self.latest_version("policies")
    }

    /// The newest row of a versioned document's table (`policies`, `dns_configs`).
    fn latest_version(&self, table: &'static str) -> Result<Option<StoredPolicy>, ControlError> {
        let sql = format!("SELECT version, text, set_by, set_at FROM {table} ORDER BY version DESC LIMIT 1");
        Ok(self
            .db
            .query_row(&sql, [], |r| {
                Ok(StoredPolicy {
                    version: r.get::<_, i64>(0)? as u64,
                    text: r.get(1)?,
                    set_by: r.get(2)?,
                    set_at: r.get::<_, i64>(3)? as u64,
                })
            })
            .optional()?)
    }

    /// Reads a policy and runs its `tests` against the nodes as they are; refused whole, with every failing
    /// assertion, if either fails.
    pub fn check_policy(&self, text: &str) -> Result<Policy, ControlError> {
        let policy = Policy::parse(text).map_err(|e| ControlError::bad(e.0))?;
        if policy.tests.is_empty() {
            return Ok(policy);
        }
        policy.check_tests(&self.nodes_under(&policy)?).map_err(|failures| {
            let lines: Vec<String> = failures.iter().map(ToString::to_string).collect();
            ControlError::bad(lines.join("\n"))
        })?;
        Ok(policy)
    }

    /// Replaces the policy (refused whole if it does not parse or its tests fail) and stores it as a new version. What the
    /// old policy granted and the new one does not is taken back at once: tags a node asked for that its
    /// key may no longer apply, and route approvals the old autoApprovers made.
    pub fn set_policy(&mut self, text: &str, set_by: &str, now: u64) -> Result<PolicyChange, ControlError> {
        let (policy, change) = self.apply_policy(text, set_by, now, true)?;
        self.policy = policy;
        self.bump()?;
        Ok(change)
    }

    /// What `set_policy` would take back, without storing anything: the same transaction, rolled back.
    pub fn preview_policy(&mut self, text: &str, now: u64) -> Result<PolicyChange, ControlError> {
        self.apply_policy(text, "preview", now, false).map(|(_, change)| change)
    }

    /// The stored policy versions, newest first, at most `limit` of them.
    pub fn policy_history(&self, limit: usize) -> Result<Vec<StoredPolicy>, ControlError> {
        let mut statement =
            self.db.prepare("SELECT version, text, set_by, set_at FROM policies ORDER BY version DESC LIMIT ?1")?;
        let rows = statement.query_map(params![limit as i64], |r| {
            Ok(StoredPolicy {
                version: r.get::<_, i64>(0)? as u64,
                text: r.get(1)?,
                set_by: r.get(2)?,
                set_at: r.get::<_, i64>(3)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The mesh's DNS domain (`NAME.<domain>` is what MagicDNS answers for a node).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    fn apply_policy(
        &mut self,
        text: &str,
        set_by: &str,
        now: u64,
        commit: bool,
    ) -> Result<(Policy, PolicyChange), ControlError> {
        let policy = self.check_policy(text)?;
        let tx = self.db.unchecked_transaction()?;
        let version: i64 = tx.query_row("SELECT COALESCE(MAX(version), 0) + 1 FROM policies", [], |r| r.get(0))?;
        tx.execute(
            "INSERT INTO policies (version, text, set_by, set_at) VALUES (?1, ?2, ?3, ?4)",
            params![version, text, set_by, now as i64],
        )?;
        let mut change = PolicyChange { version: version as u64, ..PolicyChange::default() };
        let mut tags_now: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        {
            let mut statement = tx.prepare("SELECT id, name, tags, key_tags FROM nodes")?;
            let rows = statement.query_map([], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?))
            })?;
            for row in rows {
                let (id, name, tags, key_tags) = row?;
                let (tags, key_tags) = (split(&tags), split(&key_tags));
                let kept: Vec<String> =
                    tags.iter().filter(|t| key_tags.contains(t) || policy.may_apply(&key_tags, t)).cloned().collect();
                for lost in tags.iter().filter(|t| !kept.contains(t)) {
                    change.tags_revoked.push(format!("{name}: {lost}"));
                }
                tags_now.insert(id, kept);
            }
        }
        for (id, tags) in &tags_now {
            tx.execute("UPDATE nodes SET tags = ?1 WHERE id = ?2 AND tags <> ?1", params![join(tags), *id as i64])?;
        }
        {
            let mut statement = tx.prepare(
                "SELECT r.node_id, n.name, r.prefix FROM routes r JOIN nodes n ON n.id = r.node_id WHERE r.auto_approved",
            )?;
            let rows = statement
                .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?;
            let mut revoke = Vec::new();
            for row in rows {
                let (node, name, prefix) = row?;
                let still = prefix.parse().is_ok_and(|p| {
                    policy.auto_approves(&p, tags_now.get(&node).map(Vec::as_slice).unwrap_or_default())
                });
                if !still {
                    revoke.push((node, prefix.clone()));
                    change.approvals_revoked.push(format!("{name}: {prefix}"));
                }
            }
            for (node, prefix) in revoke {
                tx.execute(
                    "UPDATE routes SET approved = 0, auto_approved = 0 WHERE node_id = ?1 AND prefix = ?2",
                    params![node as i64, prefix],
                )?;
            }
        }
        if commit {
            tx.commit()?;
        }
        Ok((policy, change))
    }

    /// Gives every key registered from now on `seconds` of trust (re-registering renews it).
    pub fn set_key_lifetime(&mut self, seconds: Option<u64>) {
        self.key_lifetime = seconds;
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Creates an auth key; returns it and its secret text, which is shown once and stored only hashed.
    pub fn create_auth_key(&self, options: &AuthKeyOptions, now: u64) -> Result<(AuthKey, String), ControlError> {
        check_tags(&options.tags)?;
        let user_id = match &options.user {
            Some(name) => Some(self.user_id(name)?),
            None => None,
        };
        let expires_at = match options.expiry {
            None => None,
            Some(seconds) => Some(
                now.checked_add(seconds)
                    .filter(|e| i64::try_from(*e).is_ok())
                    .ok_or_else(|| ControlError::bad(format!("an expiry of {seconds} seconds is too far away")))?,
            ),
        };
        let lookup = random_hex(6);
        let secret = random_hex(24);
        self.db.execute(
            "INSERT INTO auth_keys (lookup, hash, reusable, ephemeral, tags, expires_at, created_at, user_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                lookup,
                sha256_hex(&secret),
                options.reusable,
                options.ephemeral,
                join(&options.tags),
                expires_at.map(|e| e as i64),
                now as i64,
                user_id.map(|u| u as i64)
            ],
        )?;
        let id = self.db.last_insert_rowid() as u64;
        let key = AuthKey {
            id,
            lookup: lookup.clone(),
            reusable: options.reusable,
            ephemeral: options.ephemeral,
            tags: options.tags.clone(),
            expires_at,
            revoked: false,
            uses: 0,
            user: options.user.clone(),
        };
        Ok((key, format!("mkey-{lookup}-{secret}")))
    }

    pub fn list_auth_keys(&self) -> Result<Vec<AuthKey>, ControlError> {
        let mut statement = self.db.prepare(
            "SELECT id, lookup, reusable, ephemeral, tags, expires_at, revoked, uses,
                    (SELECT name FROM users WHERE users.id = auth_keys.user_id)
             FROM auth_keys ORDER BY id",
        )?;
        let rows = statement.query_map([], |r| {
            Ok(AuthKey {
                id: r.get::<_, i64>(0)? as u64,
                lookup: r.get(1)?,
                reusable: r.get(2)?,
                ephemeral: r.get(3)?,
                tags: split(&r.get::<_, String>(4)?),
                expires_at: r.get::<_, Option<i64>>(5)?.map(|e| e as u64),
                revoked: r.get(6)?,
                uses: r.get::<_, i64>(7)? as u64,
                user: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Adds a user: a login or an e-mail address, as Headscale and Tailscale name them.
    pub fn create_user(&self, name: &str, now: u64) -> Result<User, ControlError> {
        check_user_name(name)?;
        let exists: bool =
            self.db.query_row("SELECT EXISTS (SELECT 1 FROM users WHERE name = ?1)", params![name], |r| r.get(0))?;
        if exists {
            return Err(ControlError::bad(format!("there is already a user {}", quoted(name, 80))));
        }
        self.db.execute("INSERT INTO users (name, created_at) VALUES (?1, ?2)", params![name, now as i64])?;
        Ok(User { id: self.db.last_insert_rowid() as u64, name: name.to_string(), nodes: 0 })
    }

    pub fn list_users(&self) -> Result<Vec<User>, ControlError> {
        let mut statement = self.db.prepare(
            "SELECT id, name, (SELECT COUNT(*) FROM nodes WHERE nodes.user_id = users.id) FROM users ORDER BY name",
        )?;
        let rows = statement.query_map([], |r| {
            Ok(User { id: r.get::<_, i64>(0)? as u64, name: r.get(1)?, nodes: r.get::<_, i64>(2)? as u64 })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes a user who owns nothing any more: no nodes, no auth key still usable.
    pub fn delete_user(&self, name: &str) -> Result<(), ControlError> {
        let id = self.user_id(name)?;
        let (nodes, keys): (i64, i64) = self.db.query_row(
            "SELECT (SELECT COUNT(*) FROM nodes WHERE user_id = ?1),
                    (SELECT COUNT(*) FROM auth_keys WHERE user_id = ?1 AND NOT revoked)",
            params![id as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if nodes > 0 || keys > 0 {
            return Err(ControlError::bad(format!(
                "{} owns {nodes} node(s) and {keys} usable auth key(s): delete the nodes and revoke the keys first",
                quoted(name, 80)
            )));
        }
        self.db.execute("DELETE FROM users WHERE id = ?1", params![id as i64])?;
        Ok(())
    }

    fn user_id(&self, name: &str) -> Result<u64, ControlError> {
        let id: Option<i64> =
            self.db.query_row("SELECT id FROM users WHERE name = ?1", params![name], |r| r.get(0)).optional()?;
        id.map(|i| i as u64).ok_or_else(|| {
            ControlError::not_found(format!(
                "no user is named {} (meshd control users create NAME makes one)",
                quoted(name, 80)
            ))
        })
    }

    pub fn revoke_auth_key(&self, id: u64) -> Result<bool, ControlError> {
        Ok(self.db.execute("UPDATE auth_keys SET revoked = 1 WHERE id = ?1", params![id as i64])? == 1)
    }

    /// Finds the key a secret text names and checks it is usable now.
    fn check_auth_key(&self, text: &str, now: u64) -> Result<AuthKey, ControlError> {
        let unknown = || ControlError::new(ErrorCode::UnknownAuthKey, "the auth key is not known to this server");
        let rest = text.strip_prefix("mkey-").ok_or_else(unknown)?;
        let (lookup, secret) = rest.split_once('-').ok_or_else(unknown)?;
        let row: Option<(String, i64)> = self
            .db
            .query_row("SELECT hash, id FROM auth_keys WHERE lookup = ?1", params![lookup], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let Some((hash, id)) = row else { return Err(unknown()) };
        if hash != sha256_hex(secret) {
            return Err(unknown());
        }
        let key = self.list_auth_keys()?.into_iter().find(|k| k.id == id as u64).ok_or_else(unknown)?;
        if key.revoked {
            return Err(ControlError::new(
                ErrorCode::AuthKeyRevoked,
                "the auth key has been revoked; create a new one",
            ));
        }
        if key.expires_at.is_some_and(|e| e <= now) {
            return Err(ControlError::new(ErrorCode::AuthKeyExpired, "the auth key has expired; create a new one"));
        }
        Ok(key)
    }

    /// Registers a node, or re-registers the node that already has this node key (same id and addresses,
    /// a fresh credential): a known key is never "already exists".
    pub fn register(&self, request: &RegisterRequest, now: u64) -> Result<RegisterResponse, ControlError> {
        if request.version != VERSION {
            return Err(ControlError::new(
                ErrorCode::VersionMismatch,
                format!("this server speaks protocol {VERSION}, the node {}", request.version),
            ));
        }
        check_registration(request)?;
        self.check_route_ranges(&request.advertise_routes)?;
        let key = self.check_auth_key(&request.auth_key, now)?;
        if !key.reusable && key.uses > 0 {
            // Also for a node the server knows: a spent key proves nothing about who holds it now.
            return Err(ControlError::new(
                ErrorCode::AuthKeyUsed,
                "the auth key was for one node and is used; create a new one",
            ));
        }
        proof::verify(request, &self.server_private()?)
            .map_err(|e| ControlError::new(ErrorCode::BadProof, e.to_string()))?;
        let now_ms = u128::from(now) * 1000;
        if u128::from(request.timestamp_ms).abs_diff(now_ms) > u128::from(proof::MAX_CLOCK_SKEW_MS) {
            return Err(ControlError::new(
                ErrorCode::BadProof,
                "the registration's clock is more than 5 minutes from the server's; set the node's clock",
            ));
        }
        for tag in &request.tags {
            if !self.policy.may_apply(&key.tags, tag) {
                return Err(ControlError::new(ErrorCode::TagNotAllowed, format!("the auth key may not apply {tag}")));
            }
        }
        let mut tags = key.tags.clone();
        tags.extend(request.tags.iter().filter(|t| !key.tags.contains(t)).cloned());
        // A tagged node is owned by its tags; an untagged one by its key's user.
        let owner = match &key.user {
            Some(user) if tags.is_empty() => Some(self.user_id(user)? as i64),
            _ => None,
        };
        let credential = random_hex(24);

        let tx = self.db.unchecked_transaction()?;
        let existing = self.node_by_key(&request.node_key)?;
        let timestamp = i64::try_from(request.timestamp_ms).map_err(|_| ControlError::bad("timestamp out of range"))?;
        let key_expiry = self.key_lifetime.and_then(|l| now.checked_add(l)).map(|e| e.min(i64::MAX as u64) as i64);
        let node = match existing {
            Some(node) => {
                // Strictly newer than the last registration: a recorded request, even a fresh one, is spent.
                let changed = tx.execute(
                    "UPDATE nodes SET credential_hash = ?1, tags = ?2, expired = 0, last_seen = ?3, registered_at_ms = ?5,
                                      key_tags = ?6, key_expiry = ?7, user_id = ?8
                     WHERE id = ?4 AND registered_at_ms < ?5",
                    params![sha256_hex(&credential), join(&tags), now as i64, node.id as i64, timestamp, join(&key.tags), key_expiry, owner],
                )?;
                if changed == 0 {
                    return Err(ControlError::new(
                        ErrorCode::BadProof,
                        "this registration is not newer than the node's last one: a replay, or the node's clock \
                         went back; check the clock and run meshd up again",
                    ));
                }
                node
            }
            None => {
                tx.execute(
                    "DELETE FROM retired_keys WHERE registered_at_ms < ?1",
                    params![now_ms as i64 - RETIRED_FOR_MS],
                )?;
                let retired: Option<i64> = tx
                    .query_row(
                        "SELECT registered_at_ms FROM retired_keys WHERE node_key = ?1",
                        params![request.node_key],
                        |r| r.get(0),
                    )
                    .optional()?;
                if retired.is_some_and(|last| timestamp <= last) {
                    return Err(ControlError::new(
                        ErrorCode::BadProof,
                        "this registration is not newer than the deleted node's last one: a replay, or the node's \
                         clock went back; check the clock and run meshd up again",
                    ));
                }
                let id = self.next_node_id()?;
                let name = match crate::dns::label_of(&request.hostname) {
                    Some(label) => self.unique_name(&label)?,
                    None => {
                        // Named anyway, so it joins and nobody's netmap breaks; the admin can rename it.
                        let name = self.unique_name(&format!("node-{id}"))?;
                        tracing::warn!(
                            hostname = %request.hostname.escape_default(),
                            "the hostname has no letter or digit to make a DNS name of; the node is named {name} \
                             (meshd control nodes rename {name} NEW-NAME)"
                        );
                        name
                    }
                };
                let ipv4 = self.free_ipv4()?;
                tx.execute(
                    "INSERT INTO nodes (id, node_key, name, ipv4, ipv6, tags, credential_hash, ephemeral, last_seen, created_at,
                                        registered_at_ms, key_tags, key_expiry, user_id)
                     VALUES (?9, ?1, ?2, ?3, '::', ?4, ?5, ?6, ?7, ?7, ?8, ?10, ?11, ?12)",
                    params![request.node_key, name, ipv4.to_string(), join(&tags), sha256_hex(&credential), key.ephemeral, now as i64, timestamp, id as i64, join(&key.tags), key_expiry, owner],
                )?;
                let ipv6 = self.ipv6_for(id)?;
                tx.execute("UPDATE nodes SET ipv6 = ?1 WHERE id = ?2", params![ipv6.to_string(), id as i64])?;
                tx.execute("UPDATE auth_keys SET uses = uses + 1 WHERE id = ?1", params![key.id as i64])?;
                NodeRecord {
                    id,
                    node_key: request.node_key.clone(),
                    name,
                    ipv4,
                    ipv6,
                    tags: tags.clone(),
                    ephemeral: key.ephemeral,
                    expired: false,
                    last_seen: now,
                    endpoints: Vec::new(),
                    key_expiry: key_expiry.map(|e| e as u64),
                    user: key.user.clone().filter(|_| tags.is_empty()),
                }
            }
        };
        self.set_routes(node.id, &request.advertise_routes, &tags)?;
        tx.commit()?;
        self.bump()?;
        Ok(RegisterResponse {
            version: VERSION,
            node_id: node.id,
            name: node.name,
            ipv4: node.ipv4,
            ipv6: node.ipv6,
            credential,
            domain: self.domain.clone(),
            ephemeral: node.ephemeral,
        })
    }

    /// Records what a node advertises: new prefixes are approved if the policy's autoApprovers say so,
    /// prefixes it no longer advertises are dropped, approvals of kept prefixes stay.
    fn set_routes(&self, node: u64, advertised: &[IpNet], tags: &[String]) -> Result<(), ControlError> {
        let wanted: Vec<String> = advertised.iter().map(|p| p.trunc().to_string()).collect();
        let current = self.routes_of(node)?;
        for (prefix, _) in &current {
            if !wanted.contains(&prefix.to_string()) {
                self.db.execute(
                    "DELETE FROM routes WHERE node_id = ?1 AND prefix = ?2",
                    params![node as i64, prefix.to_string()],
                )?;
            }
        }
        for prefix in advertised.iter().map(IpNet::trunc) {
            let auto = self.policy.auto_approves(&prefix, tags);
            self.db.execute(
                "INSERT INTO routes (node_id, prefix, approved, auto_approved) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (node_id, prefix) DO UPDATE SET
                     approved = CASE WHEN routes.approved AND NOT routes.auto_approved THEN 1
                                     ELSE excluded.approved END,
                     auto_approved = CASE WHEN routes.approved AND NOT routes.auto_approved THEN 0
                                          ELSE excluded.auto_approved END",
                params![node as i64, prefix.to_string(), auto],
            )?;
        }
        Ok(())
    }

    fn routes_of(&self, node: u64) -> Result<Vec<(IpNet, bool)>, ControlError> {
        let mut statement =
            self.db.prepare("SELECT prefix, approved FROM routes WHERE node_id = ?1 ORDER BY prefix")?;
        let rows = statement.query_map(params![node as i64], |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (prefix, approved) = row?;
            if let Ok(p) = prefix.parse() {
                out.push((p, approved));
            }
        }
        Ok(out)
    }

    /// Every advertised route, with its node and what became of it.
    pub fn all_routes(&self) -> Result<Vec<AdvertisedRoute>, ControlError> {
        let nodes = self.nodes()?;
        let primaries = self.primaries()?;
        let mut out = Vec::new();
        for node in &nodes {
            for (prefix, approved) in self.routes_of(node.id)? {
                let primary = primaries.serves(&prefix, node.id);
                out.push(AdvertisedRoute { node: node.id, name: node.name.clone(), prefix, approved, primary });
            }
        }
        Ok(out)
    }

    /// Approves (or, with `approved = false`, rejects) a node's advertised route.
    pub fn set_route_approval(&self, node: u64, prefix: IpNet, approved: bool) -> Result<bool, ControlError> {
        let advertised: bool = self.db.query_row(
            "SELECT EXISTS (SELECT 1 FROM routes WHERE node_id = ?1 AND prefix = ?2)",
            params![node as i64, prefix.trunc().to_string()],
            |r| r.get(0),
        )?;
        if !advertised {
            let name: Option<String> = self
                .db
                .query_row("SELECT name FROM nodes WHERE id = ?1", params![node as i64], |r| r.get(0))
                .optional()?;
            let name = name.unwrap_or_else(|| format!("node {node}"));
            return Err(ControlError::not_found(format!("{name} does not advertise {}", prefix.trunc())));
        }
        let changed = self.db.execute(
            "UPDATE routes SET approved = ?1, auto_approved = 0
             WHERE node_id = ?2 AND prefix = ?3 AND (approved <> ?1 OR auto_approved <> 0)",
            params![approved, node as i64, prefix.trunc().to_string()],
        )? == 1;
        if changed {
            self.bump()?;
        }
        Ok(changed)
    }

    /// `base`, or `base-1`, `base-2`, ... (the base cut so the whole stays one DNS label).
    fn unique_name(&self, base: &str) -> Result<String, ControlError> {
        for n in 0.. {
            let name = if n == 0 {
                base.to_string()
            } else {
                let suffix = format!("-{n}");
                let cut: String = base.chars().take(63 - suffix.len()).collect();
                format!("{}{suffix}", cut.trim_end_matches('-'))
            };
            let taken: bool =
                self.db
                    .query_row("SELECT EXISTS (SELECT 1 FROM nodes WHERE name = ?1)", params![name], |r| r.get(0))?;
            if !taken {
                return Ok(name);
            }
        }
        unreachable!("some suffix is free")
    }

    /// The next free address after the last one handed out (from the bottom of the range once it is used
    /// up), so addresses stay small and a deleted node's address does not go to the next node at once:
    /// peers and firewalls may still hold it for the old node.
    fn free_ipv4(&self) -> Result<Ipv4Addr, ControlError> {
        let range: Ipv4Net = MESH_V4.parse().expect("a literal prefix");
        let mut statement = self.db.prepare("SELECT ipv4 FROM nodes")?;
        let used: std::collections::HashSet<Ipv4Addr> =
            statement.query_map([], |r| r.get::<_, String>(0))?.filter_map(|a| a.ok()?.parse().ok()).collect();
        let last: Option<Ipv4Addr> = self.meta("last_ipv4")?.and_then(|a| a.parse().ok());
        let chosen = range
            .hosts()
            .skip_while(|a| last.is_some_and(|l| *a <= l))
            .chain(range.hosts())
            // Every node's resolver answers at 100.100.100.100: no node may have it.
            .find(|a| !used.contains(a) && *a != Ipv4Addr::new(100, 100, 100, 100))
            .ok_or_else(|| ControlError::bad("the mesh's IPv4 range is full"))?;
        self.set_meta("last_ipv4", &chosen.to_string())?;
        Ok(chosen)
    }

    /// Node ids only grow: an id is never given to a second node, so an admin verb or a log line naming an
    /// old id never means a new machine.
    fn next_node_id(&self) -> Result<u64, ControlError> {
        let highest: i64 = self.db.query_row("SELECT COALESCE(MAX(id), 0) FROM nodes", [], |r| r.get(0))?;
        let last = self.meta("last_node_id")?.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let next = last.max(highest as u64) + 1;
        self.set_meta("last_node_id", &next.to_string())?;
        Ok(next)
    }

    /// `<ula48>::<id>`, skipping `::53`, where every node's resolver answers (the mapping stays one to one).
    fn ipv6_for(&self, id: u64) -> Result<Ipv6Addr, ControlError> {
        let ula = self.ula()?;
        let host = if id >= RESOLVER_V6_HOST { id + 1 } else { id };
        Ok(Ipv6Addr::from(u128::from(ula.network()) | u128::from(host)))
    }

    fn node_by_key(&self, node_key: &str) -> Result<Option<NodeRecord>, ControlError> {
        Ok(self.nodes_where("WHERE node_key = ?1", params![node_key])?.pop())
    }

    fn node_by_id(&self, id: u64) -> Result<Option<NodeRecord>, ControlError> {
        Ok(self.nodes_where("WHERE id = ?1", params![id as i64])?.pop())
    }

    pub fn nodes(&self) -> Result<Vec<NodeRecord>, ControlError> {
        self.nodes_where("", params![])
    }

    /// Nodes matching a fixed SQL filter; lookups of one node go through the unique indexes rather than
    /// reading the whole table, which registration and every authenticated request would otherwise do.
    fn nodes_where(&self, filter: &str, values: &[&dyn rusqlite::ToSql]) -> Result<Vec<NodeRecord>, ControlError> {
        let mut statement = self.db.prepare_cached(&format!(
            "SELECT id, node_key, name, ipv4, ipv6, tags, ephemeral, expired, last_seen, endpoints, key_expiry, \
                    (SELECT name FROM users WHERE users.id = nodes.user_id) \
             FROM nodes {filter} \
             ORDER BY id"
        ))?;
        let rows = statement.query_map(values, |r| {
            Ok(NodeRecord {
                id: r.get::<_, i64>(0)? as u64,
                node_key: r.get(1)?,
                name: r.get(2)?,
                ipv4: r.get::<_, String>(3)?.parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
                ipv6: r.get::<_, String>(4)?.parse().unwrap_or(Ipv6Addr::UNSPECIFIED),
                tags: split(&r.get::<_, String>(5)?),
                ephemeral: r.get(6)?,
                expired: r.get(7)?,
                last_seen: r.get::<_, i64>(8)? as u64,
                endpoints: split(&r.get::<_, String>(9)?).iter().filter_map(|e| e.parse().ok()).collect(),
                key_expiry: r.get::<_, Option<i64>>(10)?.map(|e| e as u64),
                user: r.get(11)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The node a credential belongs to, if it is live.
    pub fn authenticate(&self, node_id: u64, credential: &str, now: u64) -> Result<NodeRecord, ControlError> {
        let hash: Option<String> = self
            .db
            .query_row("SELECT credential_hash FROM nodes WHERE id = ?1", params![node_id as i64], |r| r.get(0))
            .optional()?;
        if hash.as_deref() != Some(sha256_hex(credential).as_str()) {
            return Err(ControlError::new(
                ErrorCode::Unauthorized,
                "unknown node or wrong credential; run meshd up again",
            ));
        }
        let node = self.node_by_id(node_id)?.expect("the row just read");
        if node.expired || node.key_expiry.is_some_and(|e| e <= now) {
            return Err(ControlError::new(
                ErrorCode::NodeExpired,
                "this node has expired; re-authenticate with meshd up --force-reauth",
            ));
        }
        Ok(node)
    }

    /// Records that a node was seen. Coarse on purpose: a write (and its fsync) only when the stored time
    /// is `TOUCH_EVERY` old, so a thousand nodes re-polling after every change do not cost a thousand
    /// commits; the online window is much wider than that.
    pub fn touch(&self, node: u64, now: u64) -> Result<(), ControlError> {
        self.db.execute(
            "UPDATE nodes SET last_seen = ?1 WHERE id = ?2 AND last_seen <= ?1 - ?3",
            params![now as i64, node as i64, TOUCH_EVERY as i64],
        )?;
        Ok(())
    }

    /// Records where a node can be reached. Only a change bumps the netmap version, so a node that reports
    /// the same endpoints on every reconnect does not wake the whole mesh.
    pub fn set_endpoints(&self, node: u64, update: &EndpointsUpdate) -> Result<bool, ControlError> {
        if update.version != VERSION {
            return Err(ControlError::new(
                ErrorCode::VersionMismatch,
                format!("this server speaks protocol {VERSION}, the node {}", update.version),
            ));
        }
        if update.endpoints.len() > MAX_ENDPOINTS {
            return Err(ControlError::new(
                ErrorCode::BadRequest,
                format!("{} endpoints reported; at most {MAX_ENDPOINTS} are kept", update.endpoints.len()),
            ));
        }
        if let Some(bad) = update.endpoints.iter().find(|e| unreachable_endpoint(e)) {
            return Err(ControlError::new(ErrorCode::BadRequest, format!("{bad} is not an address peers can reach")));
        }
        let mut endpoints: Vec<SocketAddr> = Vec::with_capacity(update.endpoints.len());
        for endpoint in &update.endpoints {
            if !endpoints.contains(endpoint) {
                endpoints.push(*endpoint);
            }
        }
        let text = endpoints.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        let changed = self
            .db
            .execute("UPDATE nodes SET endpoints = ?1 WHERE id = ?2 AND endpoints <> ?1", params![text, node as i64])?
            == 1;
        if changed {
            self.bump()?;
        }
        Ok(changed)
    }

    /// Replaces the routes a node advertises, applying autoApprovers to new ones; whether anything changed
    /// (a node repeating itself wakes nobody).
    pub fn set_advertised(&self, node: u64, update: &RoutesUpdate) -> Result<bool, ControlError> {
        if update.version != VERSION {
            return Err(ControlError::new(
                ErrorCode::VersionMismatch,
                format!("this server speaks protocol {VERSION}, the node {}", update.version),
            ));
        }
        check_routes(&update.advertise_routes)?;
        self.check_route_ranges(&update.advertise_routes)?;
        let record = self
            .node_by_id(node)?
            .ok_or_else(|| ControlError::new(ErrorCode::Unauthorized, "this node is no longer registered"))?;
        let tx = self.db.unchecked_transaction()?;
        let before = self.routes_of(node)?;
        self.set_routes(node, &update.advertise_routes, &record.tags)?;
        let changed = self.routes_of(node)? != before;
        if changed {
            self.bump()?;
        }
        tx.commit()?;
        Ok(changed)
    }

    /// The node an administrator names, by its name or its id. A text that is both one node's id and
    /// another's name is ambiguous rather than silently one of them.
    pub fn resolve_node(&self, text: &str) -> Result<u64, ControlError> {
        let by_name = self.nodes_where("WHERE name = ?1", params![text])?.pop().map(|n| n.id);
        let by_id = match text.parse::<u64>() {
            Ok(id) => self.node_by_id(id)?.map(|n| n.id),
            Err(_) => None,
        };
        match (by_name, by_id) {
            (Some(a), Some(b)) if a != b => Err(ControlError::not_found(format!(
                "{} is node {b}'s id and node {a}'s name; use the other node's name",
                quoted(text, 64)
            ))),
            (Some(id), _) | (None, Some(id)) => Ok(id),
            (None, None) => Err(ControlError::not_found(format!(
                "no node is named {} (meshd control nodes list shows names and ids)",
                quoted(text, 64)
            ))),
        }
    }

    /// Gives a node a new name (and with it its DNS names). Refused when the name is not a DNS label or
    /// another node has it.
    pub fn rename_node(&self, node: u64, name: &str) -> Result<(), ControlError> {
        if !crate::dns::is_label(name) {
            let hint = crate::dns::label_of(name).map(|l| format!("; for example {l}")).unwrap_or_default();
            return Err(ControlError::bad(format!(
                "\"{}\" is not a DNS label: 1 to 63 lower-case letters, digits and dashes{hint}",
                name.chars().take(64).flat_map(char::escape_default).collect::<String>()
            )));
        }
        let taken: Option<i64> =
            self.db.query_row("SELECT id FROM nodes WHERE name = ?1", params![name], |r| r.get(0)).optional()?;
        match taken {
            Some(id) if id as u64 == node => return Ok(()),
            Some(_) => {
                return Err(ControlError::bad(format!("another node is named {name}; rename or delete it first")));
            }
            None => {}
        }
        if self.db.execute("UPDATE nodes SET name = ?1 WHERE id = ?2", params![name, node as i64])? == 0 {
            return Err(ControlError::not_found(format!("no node {node}")));
        }
        self.bump()?;
        Ok(())
    }

    /// The DNS settings in force.
    pub fn dns(&self) -> &mesh_proto::DnsConfig {
        &self.dns
    }

    /// The DNS settings as they were written, with their version; `None` before any were set.
    pub fn stored_dns(&self) -> Result<Option<StoredPolicy>, ControlError> {
        self.latest_version("dns_configs")
    }

    /// Replaces the DNS settings (refused whole if they do not parse) and stores them as a new version;
    /// every node gets them with its next netmap.
    pub fn set_dns(&mut self, text: &str, set_by: &str, now: u64) -> Result<u64, ControlError> {
        let config = crate::dns::parse(text, &self.domain).map_err(ControlError::bad)?;
        let version: i64 =
            self.db.query_row("SELECT COALESCE(MAX(version), 0) + 1 FROM dns_configs", [], |r| r.get(0))?;
        self.db.execute(
            "INSERT INTO dns_configs (version, text, set_by, set_at) VALUES (?1, ?2, ?3, ?4)",
            params![version, text, set_by, now as i64],
        )?;
        self.dns = config;
        self.bump()?;
        Ok(version as u64)
    }

    pub fn delete_node(&self, node: u64) -> Result<bool, ControlError> {
        let tx = self.db.unchecked_transaction()?;
        self.retire("WHERE id = ?1", params![node as i64])?;
        let deleted = tx.execute("DELETE FROM nodes WHERE id = ?1", params![node as i64])? == 1;
        tx.commit()?;
        if deleted {
            self.bump()?;
        }
        Ok(deleted)
    }

    /// Keeps the registration times of the nodes `filter` selects, which are about to be deleted.
    fn retire(&self, filter: &str, values: &[&dyn rusqlite::ToSql]) -> Result<(), ControlError> {
        self.db.execute(
            &format!(
                "INSERT INTO retired_keys (node_key, registered_at_ms) SELECT node_key, registered_at_ms FROM nodes {filter} \
                 ON CONFLICT (node_key) DO UPDATE SET registered_at_ms = excluded.registered_at_ms"
            ),
            values,
        )?;
        Ok(())
    }

    pub fn expire_node(&self, node: u64) -> Result<bool, ControlError> {
        let expired = self.db.execute("UPDATE nodes SET expired = 1 WHERE id = ?1", params![node as i64])? == 1;
        if expired {
            self.bump()?;
        }
        Ok(expired)
    }

    /// Removes ephemeral nodes not seen for `offline_for` seconds; returns how many.
    pub fn remove_stale_ephemeral(&self, now: u64, offline_for: u64) -> Result<usize, ControlError> {
        let cutoff = now.saturating_sub(offline_for) as i64;
        let tx = self.db.unchecked_transaction()?;
        self.retire("WHERE ephemeral = 1 AND last_seen < ?1", params![cutoff])?;
        let removed = tx.execute("DELETE FROM nodes WHERE ephemeral = 1 AND last_seen < ?1", params![cutoff])?;
        tx.commit()?;
        if removed > 0 {
            self.bump()?;
        }
        Ok(removed)
    }

    /// Which node serves each approved prefix: the oldest live node approved for it, so the choice is
    /// stable until that node goes; except exit routes (`0.0.0.0/0`, `::/0`), which every approved exit
    /// node serves, since each client picks its own (`--exit-node`). One query for the whole mesh,
    /// because every netmap needs it and a per-node query made fan-out O(N²).
    fn primaries(&self) -> Result<Primaries, ControlError> {
        let mut statement = self.db.prepare(
            "SELECT r.prefix, r.node_id FROM routes r JOIN nodes n ON n.id = r.node_id \
             WHERE r.approved AND NOT n.expired ORDER BY r.node_id",
        )?;
        let rows = statement.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
        let mut primaries = Primaries::default();
        for row in rows {
            let (prefix, node) = row?;
            if let Ok(prefix) = prefix.parse::<IpNet>() {
                primaries.approved.entry(node).or_default().push(prefix);
                if prefix.prefix_len() == 0 {
                    primaries.exits.insert((prefix, node));
                } else {
                    primaries.single.entry(prefix).or_insert(node);
                }
            }
        }
        Ok(primaries)
    }

    /// Everything every netmap of this version is made of, read and serialized once: after a change every
    /// node asks at once, and building each of a thousand netmaps from the database held the store for
    /// seconds while registrations waited.
    pub fn snapshot(&self, online: impl Fn(&NodeRecord) -> bool) -> Result<Snapshot, ControlError> {
        let version = self.version()?;
        let nodes = self.nodes()?;
        let primaries = self.primaries()?;
        let served = primaries.served_by();
        let mut advertised: BTreeMap<u64, Vec<(IpNet, bool)>> = BTreeMap::new();
        let mut statement = self.db.prepare("SELECT node_id, prefix, approved FROM routes ORDER BY node_id, prefix")?;
        let rows = statement.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?, r.get(2)?)))?;
        for row in rows {
            let (node, prefix, approved) = row?;
            if let Ok(prefix) = prefix.parse() {
                advertised.entry(node).or_default().push((prefix, approved));
            }
        }
        let policy = self.policy_view(&nodes, &primaries)?;
        let mut entries = BTreeMap::new();
        for n in &nodes {
            let peer = peer_view(n, &served, online(n));
            let filter = policy.filter(n.id).map(|f| to_json(&f));
            let routes: Vec<RouteState> = advertised
                .get(&n.id)
                .into_iter()
                .flatten()
                .map(|(prefix, approved)| RouteState {
                    prefix: *prefix,
                    approved: *approved,
                    primary: primaries.serves(prefix, n.id),
                })
                .collect();
            // Any router's view may differ per viewer (routes it may not use, `via` grants), not only a
            // primary's.
            let routed = primaries.approved.contains_key(&n.id).then(|| peer.clone());
            entries.insert(
                n.id,
                SnapshotEntry { expired: n.expired, peer: to_json(&peer), routed, routes: to_json(&routes), filter },
            );
        }
        Ok(Snapshot {
            version,
            domain: serde_json::to_string(&self.domain).unwrap_or_default(),
            dns: to_json(&self.dns),
            entries,
            policy,
        })
    }

    /// The netmap of `node`, `online` deciding which nodes count as online.
    pub fn netmap(&self, node: u64, online: impl Fn(&NodeRecord) -> bool) -> Result<NetMap, ControlError> {
        let nodes = self.nodes()?;
        let me = nodes
            .iter()
            .find(|n| n.id == node)
            .ok_or_else(|| ControlError::new(ErrorCode::Unauthorized, "unknown node"))?;
        if me.expired {
            return Err(ControlError::new(ErrorCode::NodeExpired, "this node has expired"));
        }
        let primaries = self.primaries()?;
        let served = primaries.served_by();
        let view = |n: &NodeRecord| peer_view(n, &served, online(n));
        let policy = self.policy_view(&nodes, &primaries)?;
        let routes = self
            .routes_of(node)?
            .into_iter()
            .map(|(prefix, approved)| RouteState { prefix, approved, primary: primaries.serves(&prefix, node) })
            .collect();
        Ok(NetMap {
            version: self.version()?,
            domain: self.domain.clone(),
            node: view(me),
            routes,
            peers: nodes
                .iter()
                .filter(|n| n.id != node && !n.expired && policy.sees(node, n.id))
                .map(|n| policy.as_seen_by(node, view(n)))
                .collect(),
            filter: policy.filter(node),
            dns: Some(self.dns.clone()),
        })
    }

    /// Which rule lets `src` (a node's name or id, or an address) reach `dst` (the same, or an address behind a
    /// subnet router) on `port` with `proto`, as one sentence naming the policy line; or why not.
    pub fn explain(&self, src: &str, dst: &str, port: u16, proto: u8) -> Result<String, ControlError> {
        let nodes = self.nodes()?;
        let primaries = self.primaries()?;
        let view = self.policy_view(&nodes, &primaries)?;
        let address = |text: &str| -> Result<std::net::IpAddr, ControlError> {
            if let Ok(a) = text.parse() {
                return Ok(a);
            }
            let id = self.resolve_node(text)?;
            let n = nodes.iter().find(|n| n.id == id).expect("resolved");
            Ok(std::net::IpAddr::V4(n.ipv4))
        };
        let (from, to) = (address(src)?, address(dst)?);
        let what = format!("{src} -> {dst}:{port}/{}", proto_name(proto));
        // Where the packet is judged: the node with that address, or the routers whose approved routes hold it.
        let judges: Vec<usize> = match view.kept.nodes.iter().position(|n| n.addresses.contains(&to)) {
            Some(i) => vec![i],
            None => (0..view.kept.nodes.len())
                .filter(|i| view.kept.nodes[*i].approved_routes.iter().any(|r| r.prefix_len() != 0 && r.contains(&to)))
                .collect(),
        };
        if judges.is_empty() {
            return Ok(format!("{what}: no node has {to} and no approved route holds it, so nothing carries it"));
        }
        let port_for = matches!(proto, 6 | 17 | 132).then_some(port);
        for i in judges {
            let name = &view.kept.nodes[i].name;
            let Some(filter) = &view.kept.compiled.filters[i] else {
                return Ok(format!(
                    "{what}: allowed: the policy has no acls or grants, so everything is ({name} judges)"
                ));
            };
            for (rule, line) in filter.iter().zip(&view.kept.compiled.lines[i]) {
                // The data plane's own matching, so this says what the filter will do.
                let one = [mesh_packet::filter::Rule::from(rule)];
                if mesh_packet::filter::allows(&one, from, to, proto, port_for) {
                    return Ok(format!("{what}: allowed by the rule at policy line {line} ({name} judges)"));
                }
            }
        }
        Ok(format!("{what}: denied by default: no rule allows it"))
    }

    /// The policy compiled for the live nodes.
    fn policy_view(&self, nodes: &[NodeRecord], primaries: &Primaries) -> Result<Arc<PolicyView>, ControlError> {
        let live = self.policy_nodes(nodes, primaries);
        let previous = self.compiled.borrow().clone();
        if let Some(view) = &previous
            && view.kept.policy == self.policy
            && view.kept.nodes == live
        {
            return Ok(view.clone());
        }
        let mesh = [MESH_V4.parse().expect("literal"), IpNet::V6(self.ula()?)];
        // Node changes recompile only the nodes they touch (a policy change recompiles everyone).
        let kept = match &previous {
            Some(view) => view.kept.update(&self.policy, &live, &mesh),
            None => Kept::new(&self.policy, &live, &mesh),
        };
        let index = live.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
        let view = Arc::new(PolicyView { index, kept });
        *self.compiled.borrow_mut() = Some(view.clone());
        Ok(view)
    }

    /// The live nodes as they will be once `policy` is set: without the tags it no longer lets their keys
    /// apply and the route approvals its autoApprovers no longer make (what `set_policy` takes back), so its
    /// tests judge the mesh they will run in.
    fn nodes_under(&self, policy: &Policy) -> Result<Vec<PolicyNode>, ControlError> {
        let nodes = self.nodes()?;
        let primaries = self.primaries()?;
        let mut projected = self.policy_nodes(&nodes, &primaries);
        let mut key_tags: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        {
            let mut statement = self.db.prepare("SELECT id, key_tags FROM nodes")?;
            let rows = statement.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?)))?;
            for row in rows {
                let (id, tags) = row?;
                key_tags.insert(id, split(&tags));
            }
        }
        let mut auto: BTreeMap<u64, Vec<IpNet>> = BTreeMap::new();
        {
            let mut statement = self.db.prepare("SELECT node_id, prefix FROM routes WHERE auto_approved")?;
            let rows = statement.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?)))?;
            for row in rows {
                let (id, prefix) = row?;
                if let Ok(prefix) = prefix.parse() {
                    auto.entry(id).or_default().push(prefix);
                }
            }
        }
        for node in &mut projected {
            let keys = key_tags.get(&node.id).map(Vec::as_slice).unwrap_or_default();
            node.tags.retain(|t| keys.contains(t) || policy.may_apply(keys, t));
            // As `set_policy` and registration judge approvals: by the node's tags.
            let tags = node.tags.clone();
            let revoked: Vec<IpNet> =
                auto.get(&node.id).into_iter().flatten().filter(|r| !policy.auto_approves(r, &tags)).copied().collect();
            node.approved_routes.retain(|r| !revoked.contains(r));
        }
        Ok(projected)
    }

    /// The live nodes as the policy sees them.
    fn policy_nodes(&self, nodes: &[NodeRecord], primaries: &Primaries) -> Vec<PolicyNode> {
        nodes
            .iter()
            .filter(|n| !n.expired)
            .map(|n| PolicyNode {
                id: n.id,
                name: n.name.clone(),
                user: n.user.clone(),
                tags: n.tags.clone(),
                addresses: vec![std::net::IpAddr::V4(n.ipv4), std::net::IpAddr::V6(n.ipv6)],
                approved_routes: primaries.approved.get(&n.id).cloned().unwrap_or_default(),
            })
            .collect()
    }
}

fn proto_name(proto: u8) -> String {
    match proto {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "ipv6-icmp".into(),
        n => n.to_string(),
    }
}

/// The policy compiled for one version of the mesh: who sees whom, and each node's filter.
#[derive(Debug)]
struct PolicyView {
    index: BTreeMap<u64, usize>,
    /// The compilation, with what it was compiled from (to know when it still holds, and to follow changes).
    kept: Kept,
}

impl PolicyView {
    fn sees(&self, viewer: u64, peer: u64) -> bool {
        let (Some(v), Some(p)) = (self.index.get(&viewer), self.index.get(&peer)) else { return false };
        self.kept.compiled.filters[*v].is_none() || self.kept.compiled.peers[*v].binary_search(p).is_ok()
    }

    fn filter(&self, node: u64) -> Option<Vec<FilterRule>> {
        self.index.get(&node).and_then(|i| self.kept.compiled.filters[*i].as_deref().cloned())
    }

    /// `peer` as `viewer` sees it: only the routes it may use, and those a `via` grant sends through this
    /// peer for it (see `Compiled::routes_through`).
    fn as_seen_by(&self, viewer: u64, mut peer: Peer) -> Peer {
        if let (Some(v), Some(p)) = (self.index.get(&viewer), self.index.get(&peer.node_id)) {
            let own = [IpNet::from(std::net::IpAddr::V4(peer.ipv4)), IpNet::from(std::net::IpAddr::V6(peer.ipv6))];
            let served: Vec<IpNet> = peer.allowed_ips.iter().filter(|n| !own.contains(n)).copied().collect();
            peer.allowed_ips = own.to_vec();
            peer.allowed_ips.extend(self.kept.compiled.routes_through(&self.kept.nodes, *v, *p, &served));
        }
        peer
    }
}

/// Who serves which approved prefix (see `Control::primaries`).
#[derive(Debug, Default)]
struct Primaries {
    single: BTreeMap<IpNet, u64>,
    exits: std::collections::BTreeSet<(IpNet, u64)>,
    /// Every approved prefix of each live node, primary or not (the policy's routers).
    approved: BTreeMap<u64, Vec<IpNet>>,
}

impl Primaries {
    fn serves(&self, prefix: &IpNet, node: u64) -> bool {
        self.single.get(prefix) == Some(&node) || self.exits.contains(&(*prefix, node))
    }

    /// Each node's served prefixes, for its peers' allowed IPs.
    fn served_by(&self) -> BTreeMap<u64, Vec<IpNet>> {
        let mut served: BTreeMap<u64, Vec<IpNet>> = BTreeMap::new();
        for (prefix, id) in self.single.iter().map(|(p, id)| (*p, *id)).chain(self.exits.iter().copied()) {
            served.entry(id).or_default().push(prefix);
        }
        served
    }
}

/// A node as its peers see it: its mesh addresses and the approved routes it is primary for.
fn peer_view(n: &NodeRecord, served: &BTreeMap<u64, Vec<IpNet>>, online: bool) -> Peer {
    let mut allowed_ips = vec![IpNet::from(std::net::IpAddr::V4(n.ipv4)), IpNet::from(std::net::IpAddr::V6(n.ipv6))];
    allowed_ips.extend(served.get(&n.id).into_iter().flatten().copied());
    Peer {
        node_id: n.id,
        name: n.name.clone(),
        node_key: n.node_key.clone(),
        ipv4: n.ipv4,
        ipv6: n.ipv6,
        endpoints: n.endpoints.clone(),
        allowed_ips,
        online,
        tags: n.tags.clone(),
        key_expiry: n.key_expiry,
    }
}

/// The parts of a netmap as serde writes them, so a spliced netmap reads as the whole one would.
fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("netmap parts are plain data")
}

#[derive(Debug)]
struct SnapshotEntry {
    expired: bool,
    /// The node as a peer, serialized.
    peer: String,
    /// The node as a peer, when it serves routes: some viewers may not be given them all.
    routed: Option<Peer>,
    /// Its packet filter, serialized; none when the policy allows everything.
    filter: Option<String>,
    /// Its advertised routes and what became of them, serialized.
    routes: String,
}

/// Every node's part of the netmaps of one version, serialized once (see `Control::snapshot`).
#[derive(Debug)]
pub struct Snapshot {
    version: u64,
    domain: String,
    /// The DNS settings, serialized.
    dns: String,
    entries: BTreeMap<u64, SnapshotEntry>,
    policy: Arc<PolicyView>,
}

impl Snapshot {
    pub fn version(&self) -> u64 {
        self.version
    }

    /// `node`'s netmap as JSON, the same document `Control::netmap` serializes to: its own entry, and
    /// every other live node's as a peer.
    pub fn netmap_json(&self, node: u64) -> Result<String, ControlError> {
        let me = self.entries.get(&node).ok_or_else(|| ControlError::new(ErrorCode::Unauthorized, "unknown node"))?;
        if me.expired {
            return Err(ControlError::new(ErrorCode::NodeExpired, "this node has expired"));
        }
        let size: usize = self.entries.values().map(|e| e.peer.len() + 1).sum();
        let mut out = String::with_capacity(size + me.routes.len() + 128);
        out.push_str(&format!("{{\"version\":{},\"domain\":{},\"node\":", self.version, self.domain));
        out.push_str(&me.peer);
        out.push_str(",\"routes\":");
        out.push_str(&me.routes);
        out.push_str(",\"peers\":[");
        let mut first = true;
        for (id, entry) in &self.entries {
            if *id == node || entry.expired || !self.policy.sees(node, *id) {
                continue;
            }
            if !first {
                out.push(',');
            }
            first = false;
            match &entry.routed {
                Some(peer) => out.push_str(&to_json(&self.policy.as_seen_by(node, peer.clone()))),
                None => out.push_str(&entry.peer),
            }
        }
        out.push(']');
        if let Some(filter) = &me.filter {
            out.push_str(",\"filter\":");
            out.push_str(filter);
        }
        out.push_str(",\"dns\":");
        out.push_str(&self.dns);
        out.push('}');
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
