//! Tailscale's captured behaviour (`shared/conformance/ts-policy-captures`), read and answered in its own
//! shapes: `meshd control policy compile --record FILE` compiles one record's policy and topology without
//! a server and prints each node's rules and peers as the record writes them, so the two can be compared.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{Value, json};

use super::compile::{PolicyNode, compile};
use super::{Policy, PolicyError};

/// Tailscale's mesh ranges, which the records' addresses are in.
pub const TAILSCALE_MESH: [&str; 2] = ["100.64.0.0/10", "fd7a:115c:a1e0::/48"];

#[derive(Debug, Deserialize)]
struct Record {
    policy: Value,
    topology: Topology,
}

#[derive(Debug, Deserialize)]
struct Topology {
    #[serde(default)]
    users: Vec<User>,
    nodes: BTreeMap<String, Node>,
}

#[derive(Debug, Deserialize)]
struct User {
    name: String,
    #[serde(default)]
    email: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Node {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    ipv4: Option<IpAddr>,
    ipv6: Option<IpAddr>,
    #[serde(default, deserialize_with = "null_as_empty")]
    approved_routes: Vec<IpNet>,
    #[serde(default, deserialize_with = "null_as_empty")]
    routable_ips: Vec<IpNet>,
}

/// Some records write an empty list as `null`.
fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Ok(Option::<Vec<IpNet>>::deserialize(d)?.unwrap_or_default())
}

/// Why a record gives no compiled answer.
#[derive(Debug)]
pub enum RecordError {
    /// The record itself is not one (not JSON, fields missing).
    Unreadable(String),
    /// The policy is refused, as Tailscale refuses some: the one line to print.
    Refused(String),
}

impl From<PolicyError> for RecordError {
    fn from(e: PolicyError) -> Self {
        RecordError::Refused(e.0)
    }
}

/// Compiles one record and answers `{"nodes": {NAME: {"rules": [...], "peers": [...]}}}`.
pub fn compile_record(text: &str) -> Result<Value, RecordError> {
    let record: Record = serde_json::from_str(text).map_err(|e| RecordError::Unreadable(e.to_string()))?;
    let policy = Policy::parse(&record.policy.to_string())?;
    let emails: BTreeMap<&str, &str> = record
        .topology
        .users
        .iter()
        .map(|u| (u.name.as_str(), u.email.as_deref().unwrap_or(u.name.as_str())))
        .collect();
    let nodes: Vec<PolicyNode> = record
        .topology
        .nodes
        .iter()
        .enumerate()
        .map(|(i, (name, n))| PolicyNode {
            id: i as u64 + 1,
            name: name.clone(),
            user: n.user.as_deref().map(|u| emails.get(u).copied().unwrap_or(u).to_string()),
            tags: n.tags.clone(),
            addresses: n.ipv4.into_iter().chain(n.ipv6).collect(),
            // What the policy's autoApprovers approve is approved, as on a live server.
            approved_routes: {
                let user = n.user.as_deref().map(|u| emails.get(u).copied().unwrap_or(u));
                let mut routes = n.approved_routes.clone();
                for r in &n.routable_ips {
                    if !routes.contains(r) && policy.auto_approves_for(r, &n.tags, user) {
                        routes.push(*r);
                    }
                }
                routes
            },
        })
        .collect();
    if let Err(failures) = policy.check_tests(&nodes) {
        let first = failures.first().map(ToString::to_string).unwrap_or_default();
        return Err(RecordError::Refused(format!("test(s) failed: {first}")));
    }
    let mesh: Vec<IpNet> = TAILSCALE_MESH.iter().map(|m| m.parse().expect("literal")).collect();
    let compiled = compile(&policy, &nodes, &mesh);
    let primary = primaries(&nodes);
    let mut out = serde_json::Map::new();
    for (i, node) in nodes.iter().enumerate() {
        let rules: Vec<Value> = compiled.filters[i].iter().flat_map(|f| f.iter()).map(rule_json).collect();
        let peers: Vec<Value> = compiled.peers[i]
            .iter()
            .map(|&j| {
                let peer = &nodes[j];
                let served: Vec<IpNet> = primary
                    .iter()
                    .filter(|(_, owner)| **owner == j)
                    .map(|(prefix, _)| *prefix)
                    .chain(peer.approved_routes.iter().filter(|r| r.prefix_len() == 0).copied())
                    .collect();
                let routes = compiled.routes_through(&nodes, i, j, &served);
                let primary_routes: Vec<IpNet> = routes.iter().filter(|r| r.prefix_len() != 0).copied().collect();
                let mut allowed: Vec<IpNet> = peer.addresses.iter().map(|a| IpNet::from(*a)).collect();
                allowed.extend(&primary_routes);
                allowed.extend(routes.iter().filter(|r| r.prefix_len() == 0));
                json!({
                    "name": peer.name,
                    "allowed_ips": allowed.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "primary_routes": primary_routes.iter().map(ToString::to_string).collect::<Vec<_>>(),
                })
            })
            .collect();
        out.insert(node.name.clone(), json!({"rules": rules, "peers": peers}));
    }
    Ok(json!({ "nodes": out }))
}

/// Which node serves each approved subnet route: the first to have it approved (records carry no
/// registration order, so the first by name).
fn primaries(nodes: &[PolicyNode]) -> BTreeMap<IpNet, usize> {
    let mut primary = BTreeMap::new();
    for (i, node) in nodes.iter().enumerate() {
        for route in node.approved_routes.iter().filter(|r| r.prefix_len() != 0) {
            primary.entry(*route).or_insert(i);
        }
    }
    primary
}

fn address_text(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() { net.addr().to_string() } else { net.to_string() }
}

fn rule_json(rule: &mesh_proto::FilterRule) -> Value {
    let dst: Vec<Value> = rule
        .dst
        .iter()
        .map(|d| {
            json!({
                "IP": d.net.as_ref().map_or_else(|| "*".to_string(), address_text),
                "Ports": {"First": d.first, "Last": d.last},
            })
        })
        .collect();
    let mut out = json!({
        "SrcIPs": rule.src.iter().map(address_text).collect::<Vec<_>>(),
        "DstPorts": dst,
    });
    if !rule.protos.is_empty() {
        out["IPProto"] = json!(rule.protos);
    }
    out
}
