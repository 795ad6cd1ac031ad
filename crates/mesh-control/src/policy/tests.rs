use super::*;

const POLICY: &str = r#"{
    // Who may tag what.
    "tagOwners": {
        "tag:router": ["tag:infra"],
        "tag:worker": ["tag:ci"],
        "tag:db": [],
        "tag:infra": [],
        "tag:ci": [],
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
    let rules = p.rules.as_ref().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].line, 16);
    assert_eq!(rules[0].dst[0].alias, Alias::Tag("tag:db".into()));
    assert_eq!(rules[0].dst[0].ports, vec![PortRange { first: 5432, last: 5432 }]);
}

/// The message of a refused policy.
fn refusal(text: &str) -> String {
    Policy::parse(text).unwrap_err().0
}

#[test]
fn refuses_bad_policies_naming_line_column_and_what_to_change() {
    assert!(refusal("{ tagOwners: { \"router\": [\"tag:a\"] } }").contains("1:3:"), "JSON5 keys are not HuJSON");
    assert_eq!(
        refusal("{\n  \"tagOwners\": { \"router\": [] } }"),
        "policy:2:18: tagOwners: \"router\" is not a tag (tags start with \"tag:\")"
    );
    assert!(refusal("{ \"autoApprovers\": { \"routes\": { \"10.0.0.0/99\": [] } } }").contains("not a CIDR prefix"));
    assert!(refusal("{ \"tagOwners\": ").starts_with("policy:1:"));
    assert_eq!(
        refusal("{\n \"acls\": [\n  {\"action\": \"accept\", \"src\": [\"tag:nope\"], \"dst\": [\"*:*\"]}]}"),
        "policy:3:32: src=\"tag:nope\": tag not found: \"tag:nope\" (give it an owner in tagOwners)"
    );
    assert!(
        refusal(r#"{"acls": [{"action": "deny", "src": ["*"], "dst": ["*:*"]}]}"#)
            .contains("action=\"deny\" is not supported")
    );
    assert!(
        refusal(r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:ssh"]}]}"#)
            .contains("invalid first integer")
    );
    assert!(
        refusal(r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"], "proto": "icmp"}]}"#)
            .contains("only tcp, udp and sctp")
    );
    assert!(
        refusal(r#"{"acls": [{"action": "accept", "src": ["autogroup:self"], "dst": ["*:*"]}]}"#).contains("src side")
    );
    assert!(refusal(r#"{"tagOwners": {"tag:a": []}, "acls": [{"action": "accept", "src": ["tag:a"], "dst": ["autogroup:self:*"]}]}"#).contains("autogroup:self can only be used"));
    assert!(
        refusal(r#"{"grants": [{"src": ["*"], "dst": ["*"], "app": {"example.com/cap/x": [{}]}}]}"#)
            .contains("\"app\"")
    );
    assert!(
        refusal(r#"{"grants": [{"src": ["*"], "dst": ["0.0.0.0/0"], "ip": ["*"]}]}"#).contains("autogroup:internet")
    );
    assert!(
        refusal(r#"{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["tcp:0"]}]}"#).contains("first port must be >0")
    );
    assert!(refusal(r#"{"groups": {"group:a": ["group:b"]}}"#).contains("cannot contain groups"));
    assert!(refusal(r#"{"aclz": []}"#).contains("unknown section \"aclz\""));
    assert!(refusal(r#"{"hosts": {"h": "10.0.0.1"}, "hosts": {}}"#).contains("given twice"));
    assert!(refusal("").contains("empty"));
}

#[test]
fn no_rules_allows_everything_and_an_empty_list_allows_nothing() {
    assert_eq!(Policy::parse("{}").unwrap().rules, None);
    assert_eq!(Policy::parse("{\"acls\": []}").unwrap().rules, Some(vec![]));
    let p = Policy::parse("{\"ssh\": [], // Tailscale SSH\n}").unwrap();
    assert_eq!(p.ignored, vec!["ssh".to_string()]);
}

#[test]
fn a_via_grant_sends_its_sources_through_the_named_routers() {
    use std::net::IpAddr;
    let p = Policy::parse(
        r#"{
        "tagOwners": {"tag:a": [], "tag:b": [], "tag:ra": [], "tag:rb": []},
        "grants": [
            {"src": ["tag:a"], "dst": ["10.44.0.0/16"], "ip": ["*"], "via": ["tag:ra"]},
            {"src": ["tag:b"], "dst": ["10.44.0.0/16"], "ip": ["tcp:443"], "via": ["tag:rb"]},
        ],
    }"#,
    )
    .unwrap();
    let route: ipnet::IpNet = "10.44.0.0/16".parse().unwrap();
    let node = |id: u8, tag: &str, routes: Vec<ipnet::IpNet>| PolicyNode {
        id: u64::from(id),
        name: tag.to_string(),
        user: None,
        tags: vec![tag.to_string()],
        addresses: vec![IpAddr::from([100, 64, 0, id])],
        approved_routes: routes,
    };
    let nodes = [
        node(1, "tag:a", vec![]),
        node(2, "tag:b", vec![]),
        node(3, "tag:ra", vec![route]),
        node(4, "tag:rb", vec![route]),
    ];
    let compiled = compile(&p, &nodes, &["100.64.0.0/10".parse().unwrap()]);
    // Router ra is primary for everyone (first); b is sent through rb all the same.
    assert_eq!(compiled.routes_through(&nodes, 0, 2, &[route]), vec![route]);
    assert!(compiled.routes_through(&nodes, 0, 3, &[]).is_empty());
    assert!(compiled.routes_through(&nodes, 1, 2, &[route]).is_empty(), "b is not sent through ra");
    assert_eq!(compiled.routes_through(&nodes, 1, 3, &[]), vec![route]);
    assert_eq!(compiled.peers[1], vec![3], "b sees only its router");
    // Each router gets only its own grant's rule.
    let ports = |i: usize| compiled.filters[i].as_ref().unwrap().iter().map(|r| r.dst[0].last).collect::<Vec<_>>();
    assert_eq!((ports(2), ports(3)), (vec![65535], vec![443]));
    assert!(
        refusal(r#"{"grants": [{"src": ["*"], "dst": ["10.0.0.0/8"], "ip": ["*"], "via": ["group:x"]}]}"#)
            .contains("via can only be a tag")
    );
}

/// The policies docs/policy.md shows are ones meshd accepts.
#[test]
fn the_documented_policies_parse() {
    let doc = include_str!("../../../../docs/policy.md");
    let blocks: Vec<&str> = doc.split("```jsonc").skip(1).map(|b| b.split("```").next().unwrap()).collect();
    assert!(blocks.len() >= 3);
    for block in blocks {
        let policy = Policy::parse(block).unwrap_or_else(|e| panic!("{e}\n{block}"));
        assert!(policy.rules.is_some());
    }
}

/// A test's user is judged as the compiler resolves the rule: `user:*@domain` covers the domain's users.
#[test]
fn tests_read_domain_wildcards_as_the_compiler_does() {
    let text = r#"{
        "tagOwners": {"tag:db": []},
        "grants": [{"src": ["user:*@example.com"], "dst": ["tag:db"], "ip": ["tcp:5432"]}],
        "tests": [{"src": "alice@example.com", "deny": ["tag:db:5432"]}],
    }"#;
    let failures = Policy::parse(text).unwrap().check_tests(&[]).unwrap_err();
    assert!(failures[0].message.contains("expected deny, but it is allowed"), "{failures:?}");
}

/// Following node changes compiles only the nodes they touch, and gives exactly what compiling everything
/// gives, over a long run of random joins, leaves, retags and route changes.
#[test]
fn following_node_changes_matches_compiling_everything() {
    use std::net::IpAddr;
    let p = Policy::parse(
        r#"{
        "tagOwners": {"tag:a": [], "tag:b": [], "tag:r": []},
        "groups": {"group:g": ["u1@example.com", "u2@example.com"]},
        "grants": [
            {"src": ["tag:a"], "dst": ["tag:b"], "ip": ["tcp:22"]},
            {"src": ["group:g"], "dst": ["tag:a"], "ip": ["*"]},
            {"src": ["tag:b"], "dst": ["10.0.0.0/8"], "ip": ["tcp:443"], "via": ["tag:r"]},
            {"src": ["autogroup:member"], "dst": ["autogroup:self"], "ip": ["*"]},
            {"src": ["tag:r"], "dst": ["autogroup:internet"], "ip": ["*"]},
        ],
    }"#,
    )
    .unwrap();
    let mesh: Vec<ipnet::IpNet> = vec!["100.64.0.0/10".parse().unwrap()];
    let mut rng = 0x1234_5678_9abc_def1u64;
    let mut next = |bound: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % bound
    };
    let make = |id: u64, kind: u64, route: u64| {
        let (user, tags) = match kind {
            0 => (Some(format!("u{}@example.com", id % 3)), vec![]),
            1 => (None, vec!["tag:a".to_string()]),
            2 => (None, vec!["tag:b".to_string()]),
            _ => (None, vec!["tag:r".to_string()]),
        };
        let routes = match (kind, route) {
            (3, 0) => vec!["10.1.0.0/16".parse().unwrap()],
            (3, 1) => vec!["10.2.0.0/16".parse().unwrap(), "0.0.0.0/0".parse().unwrap()],
            _ => vec![],
        };
        PolicyNode {
            id,
            name: format!("n{id}"),
            user,
            tags,
            addresses: vec![IpAddr::from([100, 64, (id >> 8) as u8, id as u8])],
            approved_routes: routes,
        }
    };
    let mut nodes: Vec<PolicyNode> = (1..=12).map(|id| make(id, id % 4, id % 3)).collect();
    let mut kept = compile::Kept::new(&p, &nodes, &mesh);
    let mut next_id = 13;
    let mut partial = 0;
    for _ in 0..200 {
        match next(3) {
            0 => {
                nodes.push(make(next_id, next(4), next(3)));
                next_id += 1;
            }
            1 if nodes.len() > 2 => {
                nodes.remove(next(nodes.len() as u64) as usize);
            }
            _ => {
                let i = next(nodes.len() as u64) as usize;
                nodes[i] = make(nodes[i].id, next(4), next(3));
            }
        }
        kept = kept.update(&p, &nodes, &mesh);
        assert_eq!(kept.compiled, compile(&p, &nodes, &mesh), "after a change, with {} nodes", nodes.len());
        if kept.recompiled < nodes.len() {
            partial += 1;
        }
    }
    assert!(partial > 50, "most changes touched only some nodes ({partial} of 200)");
}
