//! The policy file: HuJSON (JSON with comments and trailing commas) in the shape of Tailscale's. It says
//! who may apply which tags (`tagOwners`), which routes are approved by themselves (`autoApprovers`), and
//! who may reach what (`acls`, `grants`), with the `groups` and `hosts` those name and `tests` that must
//! hold. A policy is parsed and checked whole: anything wrong refuses all of it, with the line and column.
//!
//! `compile` turns a policy and the nodes into each node's packet filter and the peers it may see;
//! `check` runs the policy's own `tests`; `record` reads and writes Tailscale's captured behaviour so the
//! compiler can be compared with it.

use std::collections::BTreeMap;

use ipnet::IpNet;

mod check;
pub mod compile;
pub(crate) mod parse;
pub mod record;

pub use check::TestFailure;
pub use compile::{Compiled, PolicyNode, compile};
pub use parse::parse_proto;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Which owners may apply each tag: other tags (a key carrying `tag:ci` may apply `tag:worker` if
    /// `tag:ci` owns it), users or groups.
    pub tag_owners: BTreeMap<String, Vec<String>>,
    pub auto_approvers: AutoApprovers,
    pub groups: BTreeMap<String, Vec<String>>,
    pub hosts: BTreeMap<String, IpNet>,
    /// Every `acls` entry and `grants` entry, in file order. `None` when the file has neither section:
    /// then everything is allowed, as in Tailscale. An empty list allows nothing.
    pub rules: Option<Vec<Rule>>,
    pub tests: Vec<PolicyTest>,
    /// Sections Tailscale knows that meshd reads past without applying (`ssh`, `nodeAttrs`, ...), so a
    /// user's file loads and `policy check` can say what was not applied.
    pub ignored: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoApprovers {
    /// Prefix → owners whose nodes get routes inside that prefix approved without an administrator.
    pub routes: BTreeMap<IpNet, Vec<String>>,
    /// Owners whose nodes are approved as exit nodes (their `0.0.0.0/0` and `::/0`) without an
    /// administrator.
    pub exit_node: Vec<String>,
}

/// Who or what a rule names, resolved against the policy's own sections when parsed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Alias {
    /// `*`: every node, and as a source also every approved subnet route.
    Any,
    User(String),
    Group(String),
    Tag(String),
    /// A `hosts` entry, by name, with what it stands for.
    Host(String, IpNet),
    Prefix(IpNet),
    /// `autogroup:member`: every node owned by a user rather than by tags.
    Member,
    /// `autogroup:tagged`: every tagged node.
    Tagged,
    /// `autogroup:self` (destination only): the destination's user's own untagged nodes.
    SelfDevices,
    /// `autogroup:internet` (destination only): public addresses, through approved exit nodes.
    Internet,
    /// `autogroup:danger-all` (source only): any address at all, in the mesh or not.
    DangerAll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange { first: 0, last: 65535 };

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

/// One allowing rule: an `acls` entry, or one protocol group of a `grants` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Where it is written (1-based), for `explain` and error messages.
    pub line: usize,
    pub src: Vec<Alias>,
    pub dst: Vec<Dst>,
    /// IP protocol numbers; empty: TCP, UDP, ICMP and ICMPv6.
    pub protos: Vec<u8>,
    /// A grant's `via`: the subnet destinations are reached only through routers with one of these tags,
    /// for these sources, whichever router is primary for everyone else.
    pub via: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dst {
    pub alias: Alias,
    pub ports: Vec<PortRange>,
}

/// One entry of `tests`: traffic from `src` to each `accept` must be allowed, to each `deny` must not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyTest {
    pub line: usize,
    pub src: String,
    /// A protocol number, when the test names one.
    pub proto: Option<u8>,
    pub accept: Vec<String>,
    pub deny: Vec<String>,
}

/// A policy that is refused, with where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError(pub String);

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PolicyError {}

impl Policy {
    /// Reads and checks a whole policy file. It does not run the file's `tests`, which need the nodes
    /// (see `check_tests`): a server restarting with a stored policy must not lock itself out.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        parse::parse(text)
    }

    /// Whether a node whose auth key carries `key_tags` may have `tag`.
    pub fn may_apply(&self, key_tags: &[String], tag: &str) -> bool {
        key_tags.iter().any(|t| t == tag)
            || self.tag_owners.get(tag).is_some_and(|owners| owners.iter().any(|o| key_tags.contains(o)))
    }

    /// Whether a node with `tags` gets `prefix` approved by itself. A default route makes an exit node,
    /// which only `autoApprovers.exitNode` approves (as in Tailscale), never a `routes` entry.
    pub fn auto_approves(&self, prefix: &IpNet, tags: &[String]) -> bool {
        self.auto_approves_for(prefix, tags, None)
    }

    /// `auto_approves` for a node that may also be owned by `user` (approvers may name users and groups).
    pub fn auto_approves_for(&self, prefix: &IpNet, tags: &[String], user: Option<&str>) -> bool {
        let approves = |a: &String| {
            tags.contains(a)
                || user
                    .is_some_and(|u| a == u || self.groups.get(a).is_some_and(|members| members.iter().any(|m| m == u)))
        };
        if prefix.prefix_len() == 0 {
            return self.auto_approvers.exit_node.iter().any(approves);
        }
        self.auto_approvers
            .routes
            .iter()
            .any(|(allowed, approvers)| allowed.contains(prefix) && approvers.iter().any(approves))
    }

    /// Runs the policy's `tests` against `nodes`; every failing assertion is returned.
    pub fn check_tests(&self, nodes: &[PolicyNode]) -> Result<(), Vec<TestFailure>> {
        check::run(self, nodes)
    }
}

#[cfg(test)]
mod tests;
