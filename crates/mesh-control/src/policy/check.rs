//! The policy's own `tests`: each says a source may (`accept`) or may not (`deny`) reach `host:port`. They
//! run on every `policy set` and `policy check`, and one failing assertion refuses the policy, as in
//! Tailscale. As there, a test names one port on one machine: a subnet, a port range or an autogroup is
//! not something a test can assert, and is reported as a failure rather than guessed at.

use std::net::IpAddr;

use ipnet::IpNet;

use super::compile::PolicyNode;
use super::parse::{Side, resolve_alias};
use super::{Alias, Policy, PolicyTest};

/// One assertion that does not hold, or cannot be asserted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestFailure {
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for TestFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "policy:{}: test failed: {}", self.line, self.message)
    }
}

/// Someone or something traffic comes from or goes to, as far as the rules can tell them apart.
#[derive(Debug, Default)]
struct Principal {
    user: Option<String>,
    tags: Vec<String>,
    addresses: Vec<IpAddr>,
}

pub(super) fn run(policy: &Policy, nodes: &[PolicyNode]) -> Result<(), Vec<TestFailure>> {
    let mut failures = Vec::new();
    for test in &policy.tests {
        check_one(policy, nodes, test, &mut failures);
    }
    if failures.is_empty() { Ok(()) } else { Err(failures) }
}

fn check_one(policy: &Policy, nodes: &[PolicyNode], test: &PolicyTest, failures: &mut Vec<TestFailure>) {
    let fail =
        |failures: &mut Vec<TestFailure>, message: String| failures.push(TestFailure { line: test.line, message });
    let sources = match principals(&test.src, Side::Src, policy, nodes) {
        Ok(p) => p,
        Err(e) => return fail(failures, format!("src {:?}: {e}", test.src)),
    };
    let proto = test.proto.unwrap_or(6);
    for (expect, targets) in [(true, &test.accept), (false, &test.deny)] {
        for target in targets {
            let Some((host, port)) = split_target(target) else {
                fail(failures, format!("{target:?}: write HOST:PORT with one port"));
                continue;
            };
            let port = match port.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => {
                    fail(failures, format!("{target:?}: a test names one port, 1-65535"));
                    continue;
                }
            };
            let dests = match principals(host, Side::Dst, policy, nodes) {
                Ok(p) => p,
                Err(e) => {
                    fail(failures, format!("{target:?}: {e}"));
                    continue;
                }
            };
            for src in &sources {
                for dst in &dests {
                    let allowed = allows(policy, nodes, src, dst, port, proto);
                    if allowed != expect {
                        let (want, got) = if expect { ("accept", "denied") } else { ("deny", "allowed") };
                        fail(failures, format!("{} → {target}: expected {want}, but it is {got}", test.src));
                    }
                }
            }
        }
    }
}

/// `host:port`, `[v6]:port` or `v6:port` (split at the last colon, as Tailscale does).
fn split_target(target: &str) -> Option<(&str, &str)> {
    if let Some(rest) = target.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        return Some((host, port));
    }
    target.rsplit_once(':')
}

/// Who a test's source or destination names. A group stands for each of its members.
fn principals(text: &str, side: Side, policy: &Policy, nodes: &[PolicyNode]) -> Result<Vec<Principal>, String> {
    let alias = resolve_alias(text, side, policy)?;
    let addresses_of = |keep: &dyn Fn(&PolicyNode) -> bool| -> Vec<IpAddr> {
        nodes.iter().filter(|n| keep(n)).flat_map(|n| n.addresses.iter().copied()).collect()
    };
    let user = |u: &str| Principal {
        user: Some(u.to_string()),
        tags: Vec::new(),
        addresses: addresses_of(&|n: &PolicyNode| n.tags.is_empty() && n.user.as_deref() == Some(u)),
    };
    let single = |net: IpNet| -> Result<Vec<Principal>, String> {
        if net.prefix_len() != net.max_prefix_len() {
            return Err("a test names one machine, not a subnet".into());
        }
        let address = net.addr();
        let owner = nodes.iter().find(|n| n.addresses.contains(&address));
        Ok(vec![Principal {
            user: owner.and_then(|n| if n.tags.is_empty() { n.user.clone() } else { None }),
            tags: owner.map(|n| n.tags.clone()).unwrap_or_default(),
            addresses: vec![address],
        }])
    };
    match alias {
        Alias::User(u) => Ok(vec![user(&u)]),
        Alias::Group(g) => Ok(policy.groups.get(&g).into_iter().flatten().map(|u| user(u)).collect()),
        Alias::Tag(t) => Ok(vec![Principal {
            user: None,
            addresses: addresses_of(&|n: &PolicyNode| n.tags.contains(&t)),
            tags: vec![t],
        }]),
        Alias::Host(_, net) | Alias::Prefix(net) => single(net),
        _ => Err("a test names a user, group, tag, host or IP address".into()),
    }
}

/// `pattern` names `user`: the same login, or `*@domain` and a login of that domain (as the compiler reads it).
fn user_matches(pattern: &str, user: &str) -> bool {
    match pattern.strip_prefix("*@") {
        Some(domain) => user.rsplit_once('@').is_some_and(|(_, d)| d == domain),
        None => pattern == user,
    }
}

fn matches(alias: &Alias, who: &Principal, policy: &Policy) -> bool {
    match alias {
        Alias::Any | Alias::DangerAll => true,
        Alias::User(u) => who.user.as_deref().is_some_and(|w| user_matches(u, w)),
        Alias::Group(g) => who.user.as_ref().is_some_and(|u| policy.groups.get(g).is_some_and(|m| m.contains(u))),
        Alias::Tag(t) => who.tags.contains(t),
        Alias::Member => who.user.is_some(),
        Alias::Tagged => !who.tags.is_empty(),
        Alias::Host(_, net) | Alias::Prefix(net) => who.addresses.iter().any(|a| net.contains(a)),
        Alias::SelfDevices | Alias::Internet => false,
    }
}

fn allows(policy: &Policy, nodes: &[PolicyNode], src: &Principal, dst: &Principal, port: u16, proto: u8) -> bool {
    let Some(rules) = &policy.rules else { return true };
    let has_exit = nodes.iter().any(PolicyNode::is_exit_node);
    rules.iter().any(|rule| {
        let proto_ok = if rule.protos.is_empty() {
            mesh_proto::DEFAULT_PROTOS.contains(&proto)
        } else {
            rule.protos.contains(&proto)
        };
        proto_ok
            && rule.src.iter().any(|a| matches(a, src, policy))
            && rule.dst.iter().any(|d| {
                let to = match &d.alias {
                    Alias::SelfDevices => src.user.is_some() && src.user == dst.user,
                    Alias::Internet => has_exit && dst.addresses.iter().any(is_public),
                    other => matches(other, dst, policy),
                };
                to && d.ports.iter().any(|p| p.contains(port))
            })
    })
}

fn is_public(address: &IpAddr) -> bool {
    super::compile::internet().iter().any(|n| n.contains(address))
}
