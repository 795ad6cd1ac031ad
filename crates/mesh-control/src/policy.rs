//! The policy file: HuJSON (JSON with comments and trailing commas) in the shape of Tailscale's. This issue
//! reads `tagOwners` and `autoApprovers.routes`; `groups` and `acls` are kept for the ACL work and checked
//! only for shape.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::Deserialize;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// Which owners may apply each tag: other tags (a key carrying `tag:ci` may apply `tag:worker` if
    /// `tag:ci` owns it) or, later, users and groups.
    #[serde(default)]
    pub tag_owners: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub auto_approvers: AutoApprovers,
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub acls: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AutoApprovers {
    /// Prefix → tags whose nodes get routes inside that prefix approved without an administrator.
    #[serde(default)]
    pub routes: BTreeMap<IpNet, Vec<String>>,
    /// Tags whose nodes are approved as exit nodes (their `0.0.0.0/0` and `::/0`) without an administrator.
    #[serde(default)]
    pub exit_node: Vec<String>,
}

/// A policy that does not parse, with where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError(pub String);

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PolicyError {}

impl Policy {
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let policy: Policy = json5::from_str(text).map_err(|e| PolicyError(format!("policy: {e}")))?;
        for (tag, owners) in &policy.tag_owners {
            if !tag.starts_with("tag:") {
                return Err(PolicyError(format!("policy: tagOwners: {tag:?} is not a tag (tags start with \"tag:\")")));
            }
            if owners.is_empty() {
                return Err(PolicyError(format!("policy: tagOwners: {tag} has no owners")));
            }
        }
        Ok(policy)
    }

    /// Whether a node whose auth key carries `key_tags` may have `tag`.
    pub fn may_apply(&self, key_tags: &[String], tag: &str) -> bool {
        key_tags.iter().any(|t| t == tag)
            || self.tag_owners.get(tag).is_some_and(|owners| owners.iter().any(|o| key_tags.contains(o)))
    }

    /// Whether a node with `tags` gets `prefix` approved by itself. A default route makes an exit node,
    /// which only `autoApprovers.exitNode` approves (as in Tailscale), never a `routes` entry.
    pub fn auto_approves(&self, prefix: &IpNet, tags: &[String]) -> bool {
        if prefix.prefix_len() == 0 {
            return self.auto_approvers.exit_node.iter().any(|a| tags.contains(a));
        }
        self.auto_approvers
            .routes
            .iter()
            .any(|(allowed, approvers)| allowed.contains(prefix) && approvers.iter().any(|a| tags.contains(a)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"{
        // Who may tag what.
        "tagOwners": {
            "tag:router": ["tag:infra"],
            "tag:worker": ["tag:ci"],
        },
        "autoApprovers": {
            "routes": {
                "10.0.0.0/16": ["tag:router"],
                "100.64.0.0/10": ["tag:worker"],
            },
        },
        "acls": [{"action": "accept", "src": ["tag:worker"], "dst": ["tag:db:5432"]}],
    }"#;

    #[test]
    fn reads_a_hujson_policy_in_tailscales_shape() {
        let p = Policy::parse(POLICY).unwrap();
        assert!(p.may_apply(&["tag:infra".into()], "tag:router"), "owned by a tag the key carries");
        assert!(p.may_apply(&["tag:router".into()], "tag:router"), "the key's own tag");
        assert!(!p.may_apply(&["tag:ci".into()], "tag:router"));
        let routers = ["tag:router".to_string()];
        assert!(p.auto_approves(&"10.0.12.0/24".parse().unwrap(), &routers));
        assert!(!p.auto_approves(&"10.1.0.0/16".parse().unwrap(), &routers));
        assert!(!p.auto_approves(&"10.0.12.0/24".parse().unwrap(), &["tag:worker".into()]));
    }

    #[test]
    fn refuses_bad_policies_with_a_reason() {
        assert!(Policy::parse("{ tagOwners: { \"router\": [\"tag:a\"] } }").unwrap_err().0.contains("is not a tag"));
        assert!(Policy::parse("{ \"tagOwners\": { \"tag:a\": [] } }").unwrap_err().0.contains("no owners"));
        assert!(Policy::parse("{ \"autoApprovers\": { \"routes\": { \"10.0.0.0/99\": [] } } }").is_err());
        assert!(Policy::parse("{ \"tagOwners\": ").is_err());
        assert_eq!(Policy::parse("{}").unwrap(), Policy::default());
    }
}
