use super::*;

const NOW: u64 = 1_800_000_000;

fn control(policy: &str) -> Control {
    Control::in_memory(Policy::parse(policy).unwrap(), "mesh.example").unwrap()
}

fn request(auth_key: &str, node: u8, hostname: &str) -> RegisterRequest {
    RegisterRequest {
        version: VERSION,
        auth_key: auth_key.into(),
        node_key: format!("node-key-{node}"),
        hostname: hostname.into(),
        advertise_routes: Vec::new(),
        tags: Vec::new(),
    }
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn allowed(map: &NetMap, peer: u64) -> Vec<String> {
    map.peers.iter().find(|p| p.node_id == peer).unwrap().allowed_ips.iter().map(ToString::to_string).collect()
}

#[test]
fn three_nodes_join_with_one_reusable_key_and_see_each_other() {
    let c = control("{}");
    let (_, key) = c.create_auth_key(&AuthKeyOptions { reusable: true, ..Default::default() }, NOW).unwrap();
    let regs: Vec<_> =
        (1..=3).map(|i| c.register(&request(&key, i, &format!("Host {i}.local")), NOW).unwrap()).collect();
    let addresses: std::collections::HashSet<_> = regs.iter().map(|r| r.ipv4).collect();
    assert_eq!(addresses.len(), 3);
    assert_eq!(regs[0].ipv4, Ipv4Addr::new(100, 64, 0, 1), "addresses start at the bottom of the range");
    assert_eq!(regs[0].name, "host-1-local");
    assert!(c.ula().unwrap().contains(&regs[0].ipv6));
    for r in &regs {
        let map = c.netmap(r.node_id, |_| true).unwrap();
        assert_eq!(map.peers.len(), 2);
        assert_eq!(map.domain, "mesh.example");
        for p in &map.peers {
            assert_eq!(p.allowed_ips.len(), 2, "a peer's mesh addresses, nothing else");
        }
    }
    assert_eq!(c.list_auth_keys().unwrap()[0].uses, 3);
}

#[test]
fn each_refused_key_has_its_own_error() {
    let c = control("{}");
    let (_, single) = c.create_auth_key(&AuthKeyOptions::default(), NOW).unwrap();
    c.register(&request(&single, 1, "a"), NOW).unwrap();
    assert_eq!(c.register(&request(&single, 2, "b"), NOW).unwrap_err().code, ErrorCode::AuthKeyUsed);

    let (revoked_key, revoked) =
        c.create_auth_key(&AuthKeyOptions { reusable: true, ..Default::default() }, NOW).unwrap();
    assert!(c.revoke_auth_key(revoked_key.id).unwrap());
    assert_eq!(c.register(&request(&revoked, 3, "c"), NOW).unwrap_err().code, ErrorCode::AuthKeyRevoked);

    let (_, short) =
        c.create_auth_key(&AuthKeyOptions { reusable: true, expiry: Some(60), ..Default::default() }, NOW).unwrap();
    c.register(&request(&short, 4, "d"), NOW + 59).unwrap();
    assert_eq!(c.register(&request(&short, 5, "e"), NOW + 60).unwrap_err().code, ErrorCode::AuthKeyExpired);

    for bogus in ["", "mkey-", "mkey-abc-def", "tskey-auth-xyz"] {
        assert_eq!(c.register(&request(bogus, 6, "f"), NOW).unwrap_err().code, ErrorCode::UnknownAuthKey);
    }
    // Change the last digit of the secret (to another digit, whatever it was).
    let last = if single.ends_with('0') { '1' } else { '0' };
    let tampered = format!("{}{last}", &single[..single.len() - 1]);
    assert_eq!(c.register(&request(&tampered, 7, "g"), NOW).unwrap_err().code, ErrorCode::UnknownAuthKey);
    let mut old = request(&short, 8, "h");
    old.version = 99;
    assert_eq!(c.register(&old, NOW).unwrap_err().code, ErrorCode::VersionMismatch);
}

#[test]
fn a_known_node_key_re_registers_the_same_node_never_already_exists() {
    let c = control("{}");
    let (_, single) = c.create_auth_key(&AuthKeyOptions::default(), NOW).unwrap();
    let first = c.register(&request(&single, 1, "router"), NOW).unwrap();
    // The same node comes back (state lost, `up` interrupted), even with its single-use key.
    let again = c.register(&request(&single, 1, "router"), NOW + 10).unwrap();
    assert_eq!(
        (again.node_id, again.ipv4, again.ipv6, again.name.clone()),
        (first.node_id, first.ipv4, first.ipv6, first.name.clone())
    );
    assert_ne!(again.credential, first.credential, "a fresh credential");
    assert_eq!(c.authenticate(first.node_id, &first.credential).unwrap_err().code, ErrorCode::Unauthorized);
    assert_eq!(c.authenticate(again.node_id, &again.credential).unwrap().id, first.node_id);
    assert_eq!(c.nodes().unwrap().len(), 1, "no duplicate");
}

#[test]
fn a_route_reaches_peers_only_once_approved() {
    let c = control("{}");
    let (_, key) = c.create_auth_key(&AuthKeyOptions { reusable: true, ..Default::default() }, NOW).unwrap();
    let mut router = request(&key, 1, "router");
    router.advertise_routes = vec![net("10.0.0.0/16")];
    let r = c.register(&router, NOW).unwrap();
    let client = c.register(&request(&key, 2, "client"), NOW).unwrap();
    assert_eq!(allowed(&c.netmap(client.node_id, |_| true).unwrap(), r.node_id).len(), 2, "not approved, not routed");
    let own = c.netmap(r.node_id, |_| true).unwrap();
    assert_eq!(own.routes, vec![RouteState { prefix: net("10.0.0.0/16"), approved: false, primary: false }]);

    let before = c.version().unwrap();
    assert!(c.set_route_approval(r.node_id, net("10.0.0.0/16"), true).unwrap());
    assert!(c.version().unwrap() > before, "an approval is a change every node sees");
    assert!(allowed(&c.netmap(client.node_id, |_| true).unwrap(), r.node_id).contains(&"10.0.0.0/16".to_string()));

    assert!(c.set_route_approval(r.node_id, net("10.0.0.0/16"), false).unwrap());
    assert_eq!(allowed(&c.netmap(client.node_id, |_| true).unwrap(), r.node_id).len(), 2, "rejected again");
}

#[test]
fn auto_approvers_approve_a_tagged_routers_route() {
    let c = control(
        r#"{ "tagOwners": { "tag:router": ["tag:infra"] }, "autoApprovers": { "routes": { "10.0.0.0/8": ["tag:router"] } } }"#,
    );
    let (_, infra) =
        c.create_auth_key(&AuthKeyOptions { tags: vec!["tag:infra".into()], ..Default::default() }, NOW).unwrap();
    let mut router = request(&infra, 1, "router");
    router.tags = vec!["tag:router".into()];
    router.advertise_routes = vec![net("10.0.0.0/16"), net("192.168.0.0/24")];
    let r = c.register(&router, NOW).unwrap();
    let routes = c.netmap(r.node_id, |_| true).unwrap().routes;
    assert!(routes.contains(&RouteState { prefix: net("10.0.0.0/16"), approved: true, primary: true }));
    assert!(
        routes.contains(&RouteState { prefix: net("192.168.0.0/24"), approved: false, primary: false }),
        "outside autoApprovers"
    );

    let (_, plain) = c.create_auth_key(&AuthKeyOptions::default(), NOW).unwrap();
    let mut sneaky = request(&plain, 2, "sneaky");
    sneaky.tags = vec!["tag:router".into()];
    assert_eq!(c.register(&sneaky, NOW).unwrap_err().code, ErrorCode::TagNotAllowed);
}

#[test]
fn two_routers_for_one_prefix_have_exactly_one_primary_chosen_stably() {
    let c = control(r#"{ "autoApprovers": { "routes": { "10.42.0.0/16": ["tag:router"] } } }"#);
    let (_, key) = c
        .create_auth_key(&AuthKeyOptions { reusable: true, tags: vec!["tag:router".into()], ..Default::default() }, NOW)
        .unwrap();
    let mut a = request(&key, 1, "router-a");
    a.advertise_routes = vec![net("10.42.0.0/16")];
    let mut b = request(&key, 2, "router-b");
    b.advertise_routes = vec![net("10.42.0.0/16")];
    let (ra, rb) = (c.register(&a, NOW).unwrap(), c.register(&b, NOW).unwrap());
    let client = c.register(&request(&key, 3, "client"), NOW).unwrap();
    for _ in 0..3 {
        let map = c.netmap(client.node_id, |_| true).unwrap();
        let carrying: Vec<u64> =
            map.peers.iter().filter(|p| p.allowed_ips.contains(&net("10.42.0.0/16"))).map(|p| p.node_id).collect();
        assert_eq!(carrying, vec![ra.node_id], "exactly one, the same each time");
    }
    assert!(!c.netmap(rb.node_id, |_| true).unwrap().routes[0].primary);
    c.delete_node(ra.node_id).unwrap();
    assert!(c.netmap(rb.node_id, |_| true).unwrap().routes[0].primary, "the other takes over when the first goes");
}

#[test]
fn expired_and_stale_ephemeral_nodes_leave_the_mesh() {
    let c = control("{}");
    let (_, eph) =
        c.create_auth_key(&AuthKeyOptions { reusable: true, ephemeral: true, ..Default::default() }, NOW).unwrap();
    let (_, key) = c.create_auth_key(&AuthKeyOptions { reusable: true, ..Default::default() }, NOW).unwrap();
    let pod = c.register(&request(&eph, 1, "worker-pod"), NOW).unwrap();
    let server = c.register(&request(&key, 2, "db"), NOW).unwrap();
    let laptop = c.register(&request(&key, 3, "laptop"), NOW).unwrap();
    c.touch(server.node_id, NOW + 500).unwrap();
    c.touch(laptop.node_id, NOW + 500).unwrap();
    assert_eq!(c.remove_stale_ephemeral(NOW + 100, 300).unwrap(), 0, "not offline long enough");
    assert_eq!(c.remove_stale_ephemeral(NOW + 400, 300).unwrap(), 1);
    assert!(c.nodes().unwrap().iter().all(|n| n.id != pod.node_id));

    c.expire_node(laptop.node_id).unwrap();
    assert_eq!(c.netmap(laptop.node_id, |_| true).unwrap_err().code, ErrorCode::NodeExpired);
    assert_eq!(c.authenticate(laptop.node_id, &laptop.credential).unwrap_err().code, ErrorCode::NodeExpired);
    assert!(c.netmap(server.node_id, |_| true).unwrap().peers.is_empty(), "peers drop the expired node");
}

/// A directory of its own per test and process, with no database in it yet.
fn fresh_database(test: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("mesh-control-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("control.db");
    let _ = std::fs::remove_file(&path);
    (dir, path)
}

#[test]
fn the_database_survives_a_restart() {
    let (dir, path) = fresh_database("restart");
    let (first, ula) = {
        let c = Control::open(&path, Policy::default(), "mesh.example").unwrap();
        let (_, key) = c.create_auth_key(&AuthKeyOptions::default(), NOW).unwrap();
        (c.register(&request(&key, 1, "a"), NOW).unwrap(), c.ula().unwrap())
    };
    let c = Control::open(&path, Policy::default(), "mesh.example").unwrap();
    assert_eq!(c.ula().unwrap(), ula, "the mesh keeps its IPv6 prefix");
    assert_eq!(c.authenticate(first.node_id, &first.credential).unwrap().ipv4, first.ipv4);
    let stored = std::fs::read(&path).unwrap();
    assert!(
        !stored.windows(first.credential.len()).any(|w| w == first.credential.as_bytes()),
        "credentials are stored hashed"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn endpoints(list: &[&str]) -> EndpointsUpdate {
    EndpointsUpdate { version: VERSION, endpoints: list.iter().map(|e| e.parse().unwrap()).collect() }
}

#[test]
fn reported_endpoints_reach_peers_and_only_a_change_bumps_the_version() {
    let c = control("{}");
    let (_, key) = c.create_auth_key(&AuthKeyOptions { reusable: true, ..Default::default() }, NOW).unwrap();
    let a = c.register(&request(&key, 1, "a"), NOW).unwrap();
    let b = c.register(&request(&key, 2, "b"), NOW).unwrap();
    let before = c.version().unwrap();
    let update = endpoints(&["192.0.2.7:41641", "[2001:db8::7]:41641", "192.0.2.7:41641"]);
    assert!(c.set_endpoints(a.node_id, &update).unwrap());
    let after = c.version().unwrap();
    assert!(after > before);
    let seen = c.netmap(b.node_id, |_| true).unwrap().peers[0].endpoints.clone();
    assert_eq!(seen, endpoints(&["192.0.2.7:41641", "[2001:db8::7]:41641"]).endpoints, "duplicates collapse");
    assert!(!c.set_endpoints(a.node_id, &update).unwrap(), "the same set again is no change");
    assert_eq!(c.version().unwrap(), after);
    assert!(c.set_endpoints(a.node_id, &endpoints(&[])).unwrap(), "a node may withdraw its endpoints");
    assert!(c.netmap(b.node_id, |_| true).unwrap().peers[0].endpoints.is_empty());
}

#[test]
fn endpoints_peers_cannot_use_are_refused_whole() {
    let c = control("{}");
    let (_, key) = c.create_auth_key(&AuthKeyOptions::default(), NOW).unwrap();
    let a = c.register(&request(&key, 1, "a"), NOW).unwrap();
    for bad in ["0.0.0.0:41641", "192.0.2.7:0", "127.0.0.1:41641", "[::1]:41641", "224.0.0.1:41641"] {
        let error = c.set_endpoints(a.node_id, &endpoints(&["192.0.2.7:41641", bad])).unwrap_err();
        assert_eq!(error.code, ErrorCode::BadRequest, "{bad}");
    }
    let many: Vec<String> = (1..=MAX_ENDPOINTS as u16 + 1).map(|p| format!("192.0.2.7:{p}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(c.set_endpoints(a.node_id, &endpoints(&many)).unwrap_err().code, ErrorCode::BadRequest);
    let old = EndpointsUpdate { version: VERSION + 1, endpoints: Vec::new() };
    assert_eq!(c.set_endpoints(a.node_id, &old).unwrap_err().code, ErrorCode::VersionMismatch);
    assert!(c.nodes().unwrap()[0].endpoints.is_empty(), "nothing of a refused report is kept");
}

#[test]
fn a_database_from_schema_1_upgrades_and_keeps_its_nodes() {
    let (dir, path) = fresh_database("upgrade");
    {
        let db = Connection::open(&path).unwrap();
        db.execute_batch("CREATE TABLE schema_version (version INTEGER NOT NULL);").unwrap();
        db.execute_batch(MIGRATIONS[0]).unwrap();
        db.execute_batch(
            "INSERT INTO schema_version (version) VALUES (1);
             INSERT INTO nodes (node_key, name, ipv4, ipv6, tags, credential_hash, ephemeral, last_seen, created_at)
             VALUES ('k', 'old-node', '100.64.0.1', 'fd00::1', '', 'x', 0, 1, 1);",
        )
        .unwrap();
    }
    let c = Control::open(&path, Policy::default(), "mesh.example").unwrap();
    let nodes = c.nodes().unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].name, "old-node");
    assert!(nodes[0].endpoints.is_empty());
    assert!(c.set_endpoints(nodes[0].id, &endpoints(&["192.0.2.9:41641"])).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}
