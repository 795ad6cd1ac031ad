use super::*;

const NOW: u64 = 1_800_000_000;

fn control(policy: &str) -> Control {
    Control::in_memory(Policy::parse(policy).unwrap(), "mesh.example").unwrap()
}

fn node_private(node: u8) -> [u8; 32] {
    [node; 32]
}

/// What node `node` sends (its private key is `[node; 32]`); `signed` signs it for `c`.
fn request(auth_key: &str, node: u8, hostname: &str) -> RegisterRequest {
    RegisterRequest {
        version: VERSION,
        auth_key: auth_key.into(),
        node_key: proof::encode_key(&proof::public_key(&node_private(node))),
        hostname: hostname.into(),
        advertise_routes: Vec::new(),
        tags: Vec::new(),
        timestamp_ms: NOW * 1000,
        proof: String::new(),
    }
}

/// `c.register`, the request signed by the node it names at `now` (as the node's clock says).
fn join(c: &Control, request: &RegisterRequest, now: u64) -> Result<RegisterResponse, ControlError> {
    let mut signed = request.clone();
    let node = (0..=u8::MAX)
        .find(|n| proof::encode_key(&proof::public_key(&node_private(*n))) == request.node_key)
        .expect("a test node key");
    let server = proof::decode_key(&c.server_public_key().unwrap()).unwrap();
    signed.timestamp_ms = now * 1000;
    proof::sign(&mut signed, &node_private(node), &server);
    c.register(&signed, now)
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
    let regs: Vec<_> = (1..=3).map(|i| join(&c, &request(&key, i, &format!("Host {i}.local")), NOW).unwrap()).collect();
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
    join(&c, &request(&single, 1, "a"), NOW).unwrap();
    assert_eq!(join(&c, &request(&single, 2, "b"), NOW).unwrap_err().code, ErrorCode::AuthKeyUsed);

    let (revoked_key, revoked) =
        c.create_auth_key(&AuthKeyOptions { reusable: true, ..Default::default() }, NOW).unwrap();
    assert!(c.revoke_auth_key(revoked_key.id).unwrap());
    assert_eq!(join(&c, &request(&revoked, 3, "c"), NOW).unwrap_err().code, ErrorCode::AuthKeyRevoked);

    let (_, short) =
        c.create_auth_key(&AuthKeyOptions { reusable: true, expiry: Some(60), ..Default::default() }, NOW).unwrap();
    join(&c, &request(&short, 4, "d"), NOW + 59).unwrap();
    assert_eq!(join(&c, &request(&short, 5, "e"), NOW + 60).unwrap_err().code, ErrorCode::AuthKeyExpired);

    for bogus in ["", "mkey-", "mkey-abc-def", "tskey-auth-xyz"] {
        assert_eq!(join(&c, &request(bogus, 6, "f"), NOW).unwrap_err().code, ErrorCode::UnknownAuthKey);
    }
    // Change the last digit of the secret (to another digit, whatever it was).
    let last = if single.ends_with('0') { '1' } else { '0' };
    let tampered = format!("{}{last}", &single[..single.len() - 1]);
    assert_eq!(join(&c, &request(&tampered, 7, "g"), NOW).unwrap_err().code, ErrorCode::UnknownAuthKey);
    let mut old = request(&short, 8, "h");
    old.version = 99;
    assert_eq!(join(&c, &old, NOW).unwrap_err().code, ErrorCode::VersionMismatch);
}

#[test]
fn a_known_node_key_re_registers_the_same_node_never_already_exists() {
    let c = control("{}");
    let (_, single) = c.create_auth_key(&AuthKeyOptions::default(), NOW).unwrap();
    let first = join(&c, &request(&single, 1, "router"), NOW).unwrap();
    // A spent single-use key proves nothing about who holds it now, not even for the node it made.
    assert_eq!(join(&c, &request(&single, 1, "router"), NOW + 5).unwrap_err().code, ErrorCode::AuthKeyUsed);
    // The same node comes back (state lost, `up` interrupted) with a key the server still accepts.
    let (_, fresh) = c.create_auth_key(&AuthKeyOptions::default(), NOW).unwrap();
    let again = join(&c, &request(&fresh, 1, "router"), NOW + 10).unwrap();
    assert_eq!(
        (again.node_id, again.ipv4, again.ipv6, again.name.clone()),
        (first.node_id, first.ipv4, first.ipv6, first.name.clone())
    );
    assert_ne!(again.credential, first.credential, "a fresh credential");
    assert_eq!(c.authenticate(first.node_id, &first.credential, NOW).unwrap_err().code, ErrorCode::Unauthorized);
    assert_eq!(c.authenticate(again.node_id, &again.credential, NOW).unwrap().id, first.node_id);
    assert_eq!(c.nodes().unwrap().len(), 1, "no duplicate");
}

#[test]
fn a_route_reaches_peers_only_once_approved() {
    let c = control("{}");
    let (_, key) = c.create_auth_key(&AuthKeyOptions { reusable: true, ..Default::default() }, NOW).unwrap();
    let mut router = request(&key, 1, "router");
    router.advertise_routes = vec![net("10.0.0.0/16")];
    let r = join(&c, &router, NOW).unwrap();
    let client = join(&c, &request(&key, 2, "client"), NOW).unwrap();
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
    let r = join(&c, &router, NOW).unwrap();
    let routes = c.netmap(r.node_id, |_| true).unwrap().routes;
    assert!(routes.contains(&RouteState { prefix: net("10.0.0.0/16"), approved: true, primary: true }));
    assert!(
        routes.contains(&RouteState { prefix: net("192.168.0.0/24"), approved: false, primary: false }),
        "outside autoApprovers"
    );

    let (_, plain) = c.create_auth_key(&AuthKeyOptions::default(), NOW).unwrap();
    let mut sneaky = request(&plain, 2, "sneaky");
    sneaky.tags = vec!["tag:router".into()];
    assert_eq!(join(&c, &sneaky, NOW).unwrap_err().code, ErrorCode::TagNotAllowed);
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
    let (ra, rb) = (join(&c, &a, NOW).unwrap(), join(&c, &b, NOW).unwrap());
    let client = join(&c, &request(&key, 3, "client"), NOW).unwrap();
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
    let pod = join(&c, &request(&eph, 1, "worker-pod"), NOW).unwrap();
    let server = join(&c, &request(&key, 2, "db"), NOW).unwrap();
    let laptop = join(&c, &request(&key, 3, "laptop"), NOW).unwrap();
    c.touch(server.node_id, NOW + 500).unwrap();
    c.touch(laptop.node_id, NOW + 500).unwrap();
    assert_eq!(c.remove_stale_ephemeral(NOW + 100, 300).unwrap(), 0, "not offline long enough");
    assert_eq!(c.remove_stale_ephemeral(NOW + 400, 300).unwrap(), 1);
    assert!(c.nodes().unwrap().iter().all(|n| n.id != pod.node_id));

    c.expire_node(laptop.node_id).unwrap();
    assert_eq!(c.netmap(laptop.node_id, |_| true).unwrap_err().code, ErrorCode::NodeExpired);
    assert_eq!(c.authenticate(laptop.node_id, &laptop.credential, NOW).unwrap_err().code, ErrorCode::NodeExpired);
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
        let c = Control::open(&path, "mesh.example").unwrap();
        let (_, key) = c.create_auth_key(&AuthKeyOptions::default(), NOW).unwrap();
        (join(&c, &request(&key, 1, "a"), NOW).unwrap(), c.ula().unwrap())
    };
    let c = Control::open(&path, "mesh.example").unwrap();
    assert_eq!(c.ula().unwrap(), ula, "the mesh keeps its IPv6 prefix");
    assert_eq!(c.authenticate(first.node_id, &first.credential, NOW).unwrap().ipv4, first.ipv4);
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
    let a = join(&c, &request(&key, 1, "a"), NOW).unwrap();
    let b = join(&c, &request(&key, 2, "b"), NOW).unwrap();
    let before = c.version().unwrap();
    let update = endpoints(&["198.18.0.7:41641", "[2001:470::7]:41641", "198.18.0.7:41641"]);
    assert!(c.set_endpoints(a.node_id, &update).unwrap());
    let after = c.version().unwrap();
    assert!(after > before);
    let seen = c.netmap(b.node_id, |_| true).unwrap().peers[0].endpoints.clone();
    assert_eq!(seen, endpoints(&["198.18.0.7:41641", "[2001:470::7]:41641"]).endpoints, "duplicates collapse");
    assert!(!c.set_endpoints(a.node_id, &update).unwrap(), "the same set again is no change");
    assert_eq!(c.version().unwrap(), after);
    assert!(c.set_endpoints(a.node_id, &endpoints(&[])).unwrap(), "a node may withdraw its endpoints");
    assert!(c.netmap(b.node_id, |_| true).unwrap().peers[0].endpoints.is_empty());
}

#[test]
fn endpoints_peers_cannot_use_are_refused_whole() {
    let c = control("{}");
    let (_, key) = c.create_auth_key(&AuthKeyOptions::default(), NOW).unwrap();
    let a = join(&c, &request(&key, 1, "a"), NOW).unwrap();
    for bad in [
        "0.0.0.0:41641",
        "198.18.0.7:0",
        "127.0.0.1:41641",
        "[::1]:41641",
        "224.0.0.1:41641",
        // Metadata services and other addresses a malicious node would point its peers at.
        "169.254.169.254:80",
        "[fe80::1]:41641",
        "[fd00:ec2::254]:80",
        "100.100.100.200:80",
        "255.255.255.255:41641",
        "192.0.2.1:41641",
        "[2001:db8::1]:41641",
        "[::ffff:169.254.169.254]:80",
    ] {
        let error = c.set_endpoints(a.node_id, &endpoints(&["198.18.0.7:41641", bad])).unwrap_err();
        assert_eq!(error.code, ErrorCode::BadRequest, "{bad}");
    }
    let many: Vec<String> = (1..=MAX_ENDPOINTS as u16 + 1).map(|p| format!("198.18.0.7:{p}")).collect();
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
    let c = Control::open(&path, "mesh.example").unwrap();
    let nodes = c.nodes().unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].name, "old-node");
    assert!(nodes[0].endpoints.is_empty());
    assert!(c.set_endpoints(nodes[0].id, &endpoints(&["198.18.0.9:41641"])).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn version_bump_amplification_a_repeated_routes_report_wakes_nobody() {
    let c = control("{}");
    let (_, key) = c.create_auth_key(&AuthKeyOptions::default(), NOW).unwrap();
    let a = join(&c, &request(&key, 1, "a"), NOW).unwrap();
    let update = RoutesUpdate { version: VERSION, advertise_routes: vec![net("10.0.0.0/16")] };
    assert!(c.set_advertised(a.node_id, &update).unwrap());
    let version = c.version().unwrap();
    for _ in 0..5 {
        assert!(!c.set_advertised(a.node_id, &update).unwrap());
    }
    assert_eq!(c.version().unwrap(), version, "the same routes again bump nothing");
    assert!(!c.set_route_approval(a.node_id, net("10.0.0.0/16"), false).unwrap(), "rejecting a rejected route");
    assert_eq!(c.version().unwrap(), version);
}

#[test]
fn oversized_registrations_are_refused_before_anything_is_stored() {
    let c = control("{}");
    let (_, key) = c.create_auth_key(&AuthKeyOptions { reusable: true, ..Default::default() }, NOW).unwrap();
    let mut routes = request(&key, 1, "a");
    routes.advertise_routes =
        (0..=256u32).map(|i| IpNet::from(Ipv4Net::new(Ipv4Addr::from(i << 8), 24).unwrap())).collect();
    let mut tags = request(&key, 2, "b");
    tags.tags = (0..65).map(|i| format!("tag:t{i}")).collect();
    let mut bad_tag = request(&key, 3, "c");
    bad_tag.tags = vec!["tag:Evil\u{1b}[2J".into()];
    let mut long_name = request(&key, 4, "d");
    long_name.hostname = "x".repeat(256);
    let mut short_key = request(&key, 5, "e");
    short_key.node_key = proof::encode_key(&[5; 32])[..20].to_string();
    for (what, r) in
        [("routes", routes), ("tags", tags), ("tag grammar", bad_tag), ("hostname", long_name), ("key", short_key)]
    {
        assert_eq!(join_unsigned(&c, &r).unwrap_err().code, ErrorCode::BadRequest, "{what}");
    }
    assert!(c.nodes().unwrap().is_empty());
    // A hostname of any characters becomes a DNS label of at most 63.
    let odd = join(&c, &request(&key, 6, &format!("{}\u{7}.EXAMPLE", "Ab_".repeat(40))), NOW).unwrap();
    assert!(
        odd.name.len() <= 63 && odd.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    );
    let update = RoutesUpdate { version: VERSION, advertise_routes: vec![net("10.0.0.0/24"); 257] };
    assert_eq!(c.set_advertised(odd.node_id, &update).unwrap_err().code, ErrorCode::BadRequest);
}

/// A registration that fails its bounds fails before the proof is even checked.
fn join_unsigned(c: &Control, request: &RegisterRequest) -> Result<RegisterResponse, ControlError> {
    c.register(request, NOW)
}

#[test]
fn deleted_nodes_ids_and_addresses_are_not_reused_at_once() {
    let c = control("{}");
    let (_, key) = c.create_auth_key(&AuthKeyOptions { reusable: true, ..Default::default() }, NOW).unwrap();
    let a = join(&c, &request(&key, 1, "a"), NOW).unwrap();
    let b = join(&c, &request(&key, 2, "b"), NOW).unwrap();
    assert!(c.delete_node(b.node_id).unwrap());
    let new = join(&c, &request(&key, 3, "c"), NOW).unwrap();
    assert!(new.node_id > b.node_id, "id {} after deleted {}", new.node_id, b.node_id);
    assert_ne!(new.ipv4, b.ipv4);
    assert_ne!(new.ipv6, b.ipv6);
    assert_ne!(new.ipv4, a.ipv4);
}

#[test]
fn admin_verbs_resolve_node_names_and_ids() {
    let c = control("{}");
    let (_, key) = c.create_auth_key(&AuthKeyOptions { reusable: true, ..Default::default() }, NOW).unwrap();
    let router = join(&c, &request(&key, 1, "router-a"), NOW).unwrap();
    let numeric = join(&c, &request(&key, 2, &router.node_id.to_string()), NOW).unwrap();
    assert_eq!(c.resolve_node("router-a").unwrap(), router.node_id);
    assert_eq!(c.resolve_node(&numeric.node_id.to_string()).unwrap(), numeric.node_id);
    let unknown = c.resolve_node("nobody").unwrap_err();
    assert_eq!(unknown.code, ErrorCode::NotFound);
    assert!(unknown.message.contains("\"nobody\""), "{}", unknown.message);
    // "1" is the router's id and the other node's name.
    let ambiguous = c.resolve_node(&router.node_id.to_string()).unwrap_err();
    assert!(ambiguous.message.contains("name"), "{}", ambiguous.message);
}

#[test]
fn auth_key_expiry_arithmetic_cannot_overflow() {
    let c = control("{}");
    let error = c.create_auth_key(&AuthKeyOptions { expiry: Some(u64::MAX), ..Default::default() }, NOW).unwrap_err();
    assert_eq!(error.code, ErrorCode::BadRequest);
    let bad_tag = AuthKeyOptions { tags: vec!["tag:".into()], ..Default::default() };
    assert_eq!(c.create_auth_key(&bad_tag, NOW).unwrap_err().code, ErrorCode::BadRequest);
}

#[test]
fn a_stale_registration_is_refused_even_when_signed() {
    let c = control("{}");
    let (_, key) = c.create_auth_key(&AuthKeyOptions { reusable: true, ..Default::default() }, NOW).unwrap();
    // Signed at NOW - 10 minutes, presented now.
    let mut stale = request(&key, 1, "a");
    let server = proof::decode_key(&c.server_public_key().unwrap()).unwrap();
    stale.timestamp_ms = (NOW - 600) * 1000;
    proof::sign(&mut stale, &node_private(1), &server);
    assert_eq!(c.register(&stale, NOW).unwrap_err().code, ErrorCode::BadProof);
    assert!(c.nodes().unwrap().is_empty());
}

#[test]
fn storage_faults_are_internal_and_say_nothing_of_storage() {
    let c = control("{}");
    c.db.execute_batch("DROP TABLE routes").unwrap();
    let error = c.all_routes().unwrap_err();
    assert_eq!(error.code, ErrorCode::Internal);
    assert!(!error.message.contains("routes") && !error.message.contains("table"), "{}", error.message);
}

#[test]
fn a_netmap_spliced_from_the_snapshot_reads_as_the_one_built_for_the_node() {
    let c = control(r#"{"autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}}}"#);
    let options = AuthKeyOptions { reusable: true, tags: vec!["tag:router".into()], ..Default::default() };
    let (_, key) = c.create_auth_key(&options, NOW).unwrap();
    let mut router = request(&key, 1, "router");
    router.advertise_routes = vec![net("10.1.0.0/16"), net("192.168.0.0/24")];
    let r = join(&c, &router, NOW).unwrap();
    let a = join(&c, &request(&key, 2, "a"), NOW).unwrap();
    let b = join(&c, &request(&key, 3, "b"), NOW).unwrap();
    c.set_endpoints(a.node_id, &endpoints(&["198.18.0.7:41641"])).unwrap();
    c.expire_node(b.node_id).unwrap();
    let online = |n: &NodeRecord| n.id != a.node_id;
    let snapshot = c.snapshot(online).unwrap();
    for id in [r.node_id, a.node_id] {
        let spliced: NetMap = serde_json::from_str(&snapshot.netmap_json(id).unwrap()).unwrap();
        assert_eq!(spliced, c.netmap(id, online).unwrap());
    }
    assert_eq!(snapshot.netmap_json(b.node_id).unwrap_err().code, ErrorCode::NodeExpired);
    assert_eq!(snapshot.netmap_json(99).unwrap_err().code, ErrorCode::Unauthorized);
}

#[test]
fn narrowing_the_policy_takes_back_the_auto_approvals_and_tags_it_granted() {
    let wide = r#"{"tagOwners": {"tag:router": ["tag:infra"]},
                   "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}}}"#;
    let mut c = control("{}");
    c.set_policy(wide, "test", NOW).unwrap();
    let infra = AuthKeyOptions { reusable: true, tags: vec!["tag:infra".into()], ..Default::default() };
    let (_, key) = c.create_auth_key(&infra, NOW).unwrap();
    let mut router = request(&key, 1, "router");
    router.tags = vec!["tag:router".into()];
    router.advertise_routes = vec![net("10.1.0.0/16"), net("10.2.0.0/16"), net("192.168.5.0/24")];
    let r = join(&c, &router, NOW).unwrap();
    // An administrator also approves one the policy approved: that approval is theirs from now on.
    assert!(c.set_route_approval(r.node_id, net("10.2.0.0/16"), true).unwrap());
    assert!(c.set_route_approval(r.node_id, net("192.168.5.0/24"), true).unwrap(), "an admin's approval");
    let approved = |c: &Control| {
        c.all_routes().unwrap().iter().filter(|a| a.approved).map(|a| a.prefix.to_string()).collect::<Vec<_>>()
    };
    assert_eq!(approved(&c), ["10.1.0.0/16", "10.2.0.0/16", "192.168.5.0/24"]);

    let version = c.version().unwrap();
    let change = c.set_policy("{}", "test", NOW + 1).unwrap();
    assert_eq!(change.version, 2);
    assert_eq!(change.tags_revoked, ["router: tag:router"]);
    assert_eq!(change.approvals_revoked, ["router: 10.1.0.0/16"]);
    assert_eq!(approved(&c), ["10.2.0.0/16", "192.168.5.0/24"], "the admin's approvals stay");
    assert_eq!(c.nodes().unwrap()[0].tags, ["tag:infra"], "the key's own tag stays");
    assert!(c.version().unwrap() > version, "nodes hear of it");
    let stored = c.stored_policy().unwrap().unwrap();
    assert_eq!((stored.version, stored.text.as_str(), stored.set_by.as_str()), (2, "{}", "test"));
    assert_eq!(c.set_policy("{ not json", "test", NOW).unwrap_err().code, ErrorCode::BadRequest);
    assert_eq!(c.stored_policy().unwrap().unwrap().version, 2, "a refused policy is not stored");
}

#[test]
fn a_policy_set_survives_a_restart() {
    let dir = std::env::temp_dir().join(format!("meshd-policy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("control.db");
    let policy = r#"{"autoApprovers": {"routes": {"10.0.0.0/8": ["tag:router"]}}}"#;
    Control::open(&path, "mesh.example").unwrap().set_policy(policy, "admin API", NOW).unwrap();
    let c = Control::open(&path, "mesh.example").unwrap();
    assert!(c.policy().auto_approves(&net("10.1.0.0/16"), &["tag:router".into()]));
    assert_eq!(c.stored_policy().unwrap().unwrap().set_by, "admin API");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_key_lifetime_reaches_peers_and_ends_the_nodes_credential() {
    let mut c = control("{}");
    c.set_key_lifetime(Some(3600));
    let (_, key) = c.create_auth_key(&AuthKeyOptions { reusable: true, ..Default::default() }, NOW).unwrap();
    let a = join(&c, &request(&key, 1, "a"), NOW).unwrap();
    let b = join(&c, &request(&key, 2, "b"), NOW + 10).unwrap();
    let map = c.netmap(a.node_id, |_| true).unwrap();
    assert_eq!(map.peers[0].key_expiry, Some(NOW + 10 + 3600), "peers learn when to stop trusting b");
    assert!(c.authenticate(b.node_id, &b.credential, NOW + 3609).is_ok());
    assert_eq!(c.authenticate(b.node_id, &b.credential, NOW + 3610).unwrap_err().code, ErrorCode::NodeExpired);
    // Registering again renews it.
    let renewed = join(&c, &request(&key, 2, "b"), NOW + 4000).unwrap();
    assert!(c.authenticate(renewed.node_id, &renewed.credential, NOW + 4000).is_ok());
}

#[test]
fn every_approved_exit_node_serves_the_default_route_and_only_exit_node_approvers_approve_it() {
    let mut c = control("{}");
    c.set_policy(
        r#"{"autoApprovers": {"exitNode": ["tag:exit"], "routes": {"0.0.0.0/0": ["tag:router"]}}}"#,
        "test",
        NOW,
    )
    .unwrap();
    let key = |tags: &[&str]| {
        let options =
            AuthKeyOptions { reusable: true, tags: tags.iter().map(|t| t.to_string()).collect(), ..Default::default() };
        c.create_auth_key(&options, NOW).unwrap().1
    };
    let (exit_key, router_key, plain_key) = (key(&["tag:exit"]), key(&["tag:router"]), key(&[]));
    let default_route = |key: &str, node: u8, name: &str| {
        let mut r = request(key, node, name);
        r.advertise_routes = vec![net("0.0.0.0/0")];
        r
    };
    let a = join(&c, &default_route(&exit_key, 1, "exit-a"), NOW).unwrap();
    let b = join(&c, &default_route(&exit_key, 2, "exit-b"), NOW).unwrap();
    let r = join(&c, &default_route(&router_key, 3, "router"), NOW).unwrap();
    let client = join(&c, &request(&plain_key, 4, "client"), NOW).unwrap();
    let map = c.netmap(client.node_id, |_| true).unwrap();
    for exit in [a.node_id, b.node_id] {
        assert!(allowed(&map, exit).contains(&"0.0.0.0/0".to_string()), "both exits, not one primary");
    }
    assert!(!allowed(&map, r.node_id).contains(&"0.0.0.0/0".to_string()), "a routes approver is no exit approver");
}

#[test]
fn nearly_default_routes_are_refused() {
    let c = control("{}");
    let (_, key) = c.create_auth_key(&AuthKeyOptions { reusable: true, ..Default::default() }, NOW).unwrap();
    for bad in ["0.0.0.0/1", "128.0.0.0/1", "64.0.0.0/2", "fc00::/7", "::/1"] {
        let mut r = request(&key, 1, "r");
        r.advertise_routes = vec![net(bad)];
        assert_eq!(join(&c, &r, NOW).unwrap_err().code, ErrorCode::BadRequest, "{bad}");
    }
    let mut fine = request(&key, 1, "r");
    // A connector's route over the mesh range (seed 003) is stored; nodes do not route mesh addresses by it.
    fine.advertise_routes = vec![net("10.0.0.0/8"), net("0.0.0.0/0"), net("::/0"), net("100.64.0.0/10")];
    join(&c, &fine, NOW).unwrap();
}

#[test]
fn a_recorded_registration_cannot_bring_a_deleted_node_back() {
    let c = control("{}");
    let (_, key) = c.create_auth_key(&AuthKeyOptions { reusable: true, ..Default::default() }, NOW).unwrap();
    let server = proof::decode_key(&c.server_public_key().unwrap()).unwrap();
    let mut recorded = request(&key, 1, "victim");
    recorded.timestamp_ms = NOW * 1000;
    proof::sign(&mut recorded, &node_private(1), &server);
    let victim = c.register(&recorded, NOW).unwrap();
    assert!(c.delete_node(victim.node_id).unwrap());
    // Replayed a minute later, inside the clock window: refused.
    assert_eq!(c.register(&recorded, NOW + 60).unwrap_err().code, ErrorCode::BadProof);
    assert!(c.nodes().unwrap().is_empty());
    // The node itself, registering anew, is welcome.
    join(&c, &request(&key, 1, "victim"), NOW + 61).unwrap();
}

#[test]
fn untagged_nodes_belong_to_their_keys_user_and_tagged_ones_to_their_tags() {
    let c = control("{}");
    c.create_user("alice@example.com", NOW).unwrap();
    assert_eq!(c.create_user("alice@example.com", NOW).unwrap_err().code, ErrorCode::BadRequest, "no twin");
    for bad in ["", "tag:router", "group:admins", "two words", "*"] {
        assert_eq!(c.create_user(bad, NOW).unwrap_err().code, ErrorCode::BadRequest, "{bad:?}");
    }
    let nobody = AuthKeyOptions { user: Some("bob".into()), ..Default::default() };
    assert_eq!(c.create_auth_key(&nobody, NOW).unwrap_err().code, ErrorCode::NotFound);

    let alices = AuthKeyOptions { reusable: true, user: Some("alice@example.com".into()), ..Default::default() };
    let (listed, key) = c.create_auth_key(&alices, NOW).unwrap();
    assert_eq!(listed.user.as_deref(), Some("alice@example.com"));
    let laptop = join(&c, &request(&key, 1, "laptop"), NOW).unwrap();
    let tagged = AuthKeyOptions {
        tags: vec!["tag:server".into()],
        user: Some("alice@example.com".into()),
        ..Default::default()
    };
    let (_, server_key) = c.create_auth_key(&tagged, NOW).unwrap();
    let server = join(&c, &request(&server_key, 2, "server"), NOW).unwrap();
    let nodes = c.nodes().unwrap();
    let owner = |id: u64| nodes.iter().find(|n| n.id == id).unwrap().user.clone();
    assert_eq!(owner(laptop.node_id).as_deref(), Some("alice@example.com"));
    assert_eq!(owner(server.node_id), None, "tags own a tagged node");
    assert_eq!(c.list_users().unwrap()[0].nodes, 1);

    // Alice owns a node and usable keys: she stays until they are gone.
    let refused = c.delete_user("alice@example.com").unwrap_err();
    assert!(refused.message.contains("1 node(s)"), "{}", refused.message);
    assert!(c.delete_node(laptop.node_id).unwrap());
    for k in c.list_auth_keys().unwrap() {
        c.revoke_auth_key(k.id).unwrap();
    }
    c.delete_user("alice@example.com").unwrap();
    assert!(c.list_users().unwrap().is_empty());
    assert_eq!(c.delete_user("alice@example.com").unwrap_err().code, ErrorCode::NotFound);
}

/// Seed 003's policy: workers reach the database on 5432 and nothing else; nobody else reaches anything.
#[test]
fn netmaps_carry_each_nodes_filter_and_only_the_peers_the_policy_lets_it_see() {
    let mut c = control("{}");
    let policy = r#"{
        "tagOwners": {"tag:worker": [], "tag:db": [], "tag:other": []},
        "acls": [{"action": "accept", "src": ["tag:worker"], "dst": ["tag:db:5432"]}],
        "tests": [{"src": "tag:worker", "accept": ["tag:db:5432"], "deny": ["tag:db:22"]}],
    }"#;
    c.set_policy(policy, "test", NOW).unwrap();
    let key = |tag: &str| {
        let options = AuthKeyOptions { reusable: true, tags: vec![tag.into()], ..Default::default() };
        c.create_auth_key(&options, NOW).unwrap().1
    };
    let worker = join(&c, &request(&key("tag:worker"), 1, "worker"), NOW).unwrap();
    let db = join(&c, &request(&key("tag:db"), 2, "db"), NOW).unwrap();
    let other = join(&c, &request(&key("tag:other"), 3, "other"), NOW).unwrap();
    let online = |_: &NodeRecord| true;
    let peers = |id| -> Vec<String> { c.netmap(id, online).unwrap().peers.into_iter().map(|p| p.name).collect() };
    assert_eq!(peers(worker.node_id), vec!["db"]);
    assert_eq!(peers(db.node_id), vec!["worker"], "the db sees who may reach it");
    assert!(peers(other.node_id).is_empty());
    let db_map = c.netmap(db.node_id, online).unwrap();
    let filter = db_map.filter.clone().unwrap();
    assert_eq!(filter.len(), 1);
    assert_eq!(
        filter[0].src.to_vec(),
        vec![IpNet::from(std::net::IpAddr::V4(worker.ipv4)), IpNet::from(std::net::IpAddr::V6(worker.ipv6))]
    );
    assert!(filter[0].dst.iter().all(|d| d.first == 5432 && d.last == 5432));
    assert_eq!(c.netmap(worker.node_id, online).unwrap().filter, Some(vec![]), "nothing may reach the worker");
    let snapshot = c.snapshot(online).unwrap();
    for id in [worker.node_id, db.node_id, other.node_id] {
        let spliced: NetMap = serde_json::from_str(&snapshot.netmap_json(id).unwrap()).unwrap();
        assert_eq!(spliced, c.netmap(id, online).unwrap());
    }
    let explained = c.explain("worker", "db", 5432, 6).unwrap();
    assert_eq!(explained, "worker -> db:5432/tcp: allowed by the rule at policy line 3 (db judges)");
    assert!(c.explain("worker", "db", 22, 6).unwrap().ends_with("denied by default: no rule allows it"));
    assert!(c.explain("db", "worker", 5432, 6).unwrap().contains("denied by default"));
    assert!(c.explain("worker", "10.9.9.9", 443, 6).unwrap().contains("nothing carries it"));
    // A policy whose tests fail is refused whole, naming the assertion; the old one stays.
    let wrong = policy.replace("\"deny\": [\"tag:db:22\"]", "\"deny\": [\"tag:db:5432\"]");
    let refusal = c.set_policy(&wrong, "test", NOW).unwrap_err();
    assert!(refusal.message.contains("test failed: tag:worker → tag:db:5432: expected deny"), "{}", refusal.message);
    assert_eq!(c.stored_policy().unwrap().unwrap().text, policy);
}

/// A version that changes nothing the policy depends on (an endpoint report) reuses the compiled policy; a
/// new node or a new policy compiles again.
#[test]
fn the_compiled_policy_is_reused_until_its_inputs_change() {
    let mut c =
        control(r#"{"tagOwners": {"tag:a": []}, "acls": [{"action": "accept", "src": ["tag:a"], "dst": ["*:22"]}]}"#);
    let options = AuthKeyOptions { reusable: true, tags: vec!["tag:a".into()], ..Default::default() };
    let (_, key) = c.create_auth_key(&options, NOW).unwrap();
    let a = join(&c, &request(&key, 1, "a"), NOW).unwrap();
    // Each compiled view is held, so a new one cannot reuse an old one's address.
    let compiled = |c: &Control| {
        c.snapshot(|_| true).unwrap();
        c.compiled.borrow().clone().unwrap()
    };
    let first = compiled(&c);
    c.set_endpoints(a.node_id, &endpoints(&["198.18.0.7:41641"])).unwrap();
    assert!(Arc::ptr_eq(&compiled(&c), &first), "an endpoint report compiles nothing");
    join(&c, &request(&key, 2, "b"), NOW).unwrap();
    let second = compiled(&c);
    assert!(!Arc::ptr_eq(&second, &first), "a new node does");
    c.set_policy(r#"{"tagOwners": {"tag:a": []}, "acls": []}"#, "test", NOW).unwrap();
    assert!(!Arc::ptr_eq(&compiled(&c), &second), "and so does a new policy");
}

/// A `via` grant reaches the netmap: the client is given the subnet through the router the grant names,
/// though another router is primary for everyone else.
#[test]
fn a_via_grant_gives_its_sources_the_subnet_through_the_named_router() {
    let c = control(
        r#"{
        "tagOwners": {"tag:a": [], "tag:ra": [], "tag:rb": []},
        "autoApprovers": {"routes": {"10.44.0.0/16": ["tag:ra", "tag:rb"]}},
        "grants": [
            {"src": ["tag:a"], "dst": ["10.44.0.0/16"], "ip": ["*"], "via": ["tag:ra"]},
            {"src": ["tag:a"], "dst": ["tag:ra", "tag:rb"], "ip": ["*"]},
        ],
    }"#,
    );
    let key = |tag: &str| {
        let options = AuthKeyOptions { reusable: true, tags: vec![tag.into()], ..Default::default() };
        c.create_auth_key(&options, NOW).unwrap().1
    };
    let mut rb = request(&key("tag:rb"), 1, "rb");
    rb.advertise_routes = vec![net("10.44.0.0/16")];
    join(&c, &rb, NOW).unwrap();
    let mut ra = request(&key("tag:ra"), 2, "ra");
    ra.advertise_routes = vec![net("10.44.0.0/16")];
    join(&c, &ra, NOW).unwrap();
    let a = join(&c, &request(&key("tag:a"), 3, "a"), NOW).unwrap();
    let online = |_: &NodeRecord| true;
    let map = c.netmap(a.node_id, online).unwrap();
    let routes_of = |name: &str| -> Vec<IpNet> {
        let peer = map.peers.iter().find(|p| p.name == name).unwrap();
        peer.allowed_ips.iter().filter(|n| n.prefix_len() < 32).copied().filter(|n| n.addr().is_ipv4()).collect()
    };
    assert_eq!(routes_of("ra"), vec![net("10.44.0.0/16")], "through the router the grant names");
    assert!(routes_of("rb").is_empty(), "not through the primary");
    let snapshot = c.snapshot(online).unwrap();
    let spliced: NetMap = serde_json::from_str(&snapshot.netmap_json(a.node_id).unwrap()).unwrap();
    assert_eq!(spliced, map);
}

/// A policy's tests judge the mesh as it will be under that policy: a tag the new policy takes back no
/// longer counts for the node that had it.
#[test]
fn a_policys_tests_judge_the_tags_it_leaves_nodes() {
    let mut c = control(r#"{"tagOwners": {"tag:db": ["tag:ci"], "tag:ci": []}}"#);
    let options = AuthKeyOptions { reusable: true, tags: vec!["tag:ci".into()], ..Default::default() };
    let (_, key) = c.create_auth_key(&options, NOW).unwrap();
    let mut db = request(&key, 1, "db");
    db.tags = vec!["tag:db".into()];
    let db = join(&c, &db, NOW).unwrap();
    let db_ip = db.ipv4.to_string();
    // The new policy no longer lets tag:ci apply tag:db, and asserts the db's address is reachable as a db.
    let narrower = format!(
        r#"{{"tagOwners": {{"tag:db": [], "tag:ci": []}},
            "acls": [{{"action": "accept", "src": ["tag:ci"], "dst": ["tag:db:5432"]}}],
            "tests": [{{"src": "tag:ci", "accept": ["{db_ip}:5432"]}}]}}"#
    );
    let refusal = c.set_policy(&narrower, "test", NOW).unwrap_err();
    assert!(refusal.message.contains("expected accept"), "{}", refusal.message);
}

/// A node joining recompiles the nodes its rules reach, not the mesh.
#[test]
fn a_joining_node_recompiles_only_the_nodes_it_touches() {
    let c = control(
        r#"{"tagOwners": {"tag:a": [], "tag:b": [], "tag:c": []},
            "acls": [{"action": "accept", "src": ["tag:a"], "dst": ["tag:b:22"]}]}"#,
    );
    let key = |tag: &str| {
        let options = AuthKeyOptions { reusable: true, tags: vec![tag.into()], ..Default::default() };
        c.create_auth_key(&options, NOW).unwrap().1
    };
    for (i, tag) in [(1, "tag:a"), (2, "tag:b"), (3, "tag:c"), (4, "tag:c")] {
        join(&c, &request(&key(tag), i, &format!("n{i}")), NOW).unwrap();
    }
    let recompiled = |c: &Control| {
        c.snapshot(|_| true).unwrap();
        c.compiled.borrow().as_ref().unwrap().kept.recompiled
    };
    assert_eq!(recompiled(&c), 4, "the first compilation is whole");
    join(&c, &request(&key("tag:c"), 5, "n5"), NOW).unwrap();
    assert_eq!(recompiled(&c), 1, "a tag:c node touches no rule: only itself");
    join(&c, &request(&key("tag:b"), 6, "n6"), NOW).unwrap();
    assert_eq!(recompiled(&c), 3, "a tag:b node: itself, the other tag:b node and the tag:a node");
}

#[test]
fn names_are_dns_labels_with_numbered_collisions_and_admin_renames() {
    let c = control("{}");
    let (_, key) = c.create_auth_key(&AuthKeyOptions { reusable: true, ..Default::default() }, NOW).unwrap();
    let names: Vec<String> =
        [(1, "orchestrator.dev.cwiq.io"), (2, "Orchestrator_Dev.cwiq.io"), (3, "orchestrator-dev-cwiq-io"), (4, "___")]
            .iter()
            .map(|(n, h)| join(&c, &request(&key, *n, h), NOW).unwrap().name)
            .collect();
    assert_eq!(names[..3], ["orchestrator-dev-cwiq-io", "orchestrator-dev-cwiq-io-1", "orchestrator-dev-cwiq-io-2"]);
    assert_eq!(names[3], "node-4", "a hostname with nothing to make a label of still joins");
    let id = c.resolve_node("orchestrator-dev-cwiq-io-1").unwrap();
    assert!(c.rename_node(id, "orchestrator-dev-cwiq-io").unwrap_err().message.contains("another node"));
    assert!(c.rename_node(id, "Orchestrator.Dev").unwrap_err().message.contains("orchestrator-dev"));
    let before = c.version().unwrap();
    c.rename_node(id, "orchestrator-2").unwrap();
    assert!(c.version().unwrap() > before, "a rename reaches the netmaps");
    assert_eq!(c.netmap(id, |_| true).unwrap().node.name, "orchestrator-2");
}

#[test]
fn dns_settings_are_versioned_and_reach_every_netmap() {
    let mut c = control("{}");
    let (_, key) = c.create_auth_key(&AuthKeyOptions::default(), NOW).unwrap();
    let node = join(&c, &request(&key, 1, "a"), NOW).unwrap().node_id;
    assert_eq!(c.netmap(node, |_| true).unwrap().dns, Some(mesh_proto::DnsConfig::default()));
    assert!(c.stored_dns().unwrap().is_none());
    let text = r#"{"nameservers": {"split": {"shared.cwiq.io": ["10.0.0.2"]}}}"#;
    let before = c.version().unwrap();
    assert_eq!(c.set_dns(text, "test", NOW).unwrap(), 1);
    assert!(c.version().unwrap() > before);
    let dns = c.netmap(node, |_| true).unwrap().dns.unwrap();
    assert_eq!(dns.split["shared.cwiq.io"], vec!["10.0.0.2".parse::<std::net::IpAddr>().unwrap()]);
    let snapshot = c.snapshot(|_| true).unwrap();
    let from_snapshot: NetMap = serde_json::from_str(&snapshot.netmap_json(node).unwrap()).unwrap();
    assert_eq!(from_snapshot, c.netmap(node, |_| true).unwrap());
    // A refused file changes nothing.
    assert!(c.set_dns(r#"{"magic_dns": "yes"}"#, "test", NOW).is_err());
    assert_eq!(c.stored_dns().unwrap().unwrap().version, 1);
    assert_eq!(c.set_dns("{}", "test", NOW).unwrap(), 2);
    assert_eq!(c.dns(), &mesh_proto::DnsConfig::default());
}

#[test]
fn no_node_gets_the_resolvers_addresses() {
    let c = control("{}");
    let ula = c.ula().unwrap().network();
    let resolver = Ipv6Addr::from(u128::from(ula) | 0x53);
    let addresses: Vec<Ipv6Addr> = (1..200).map(|id| c.ipv6_for(id).unwrap()).collect();
    assert!(!addresses.contains(&resolver), "::53 is the resolver's");
    let unique: std::collections::HashSet<_> = addresses.iter().collect();
    assert_eq!(unique.len(), addresses.len(), "one address per id");
    c.set_meta("last_ipv4", "100.100.100.99").unwrap();
    assert_eq!(c.free_ipv4().unwrap(), Ipv4Addr::new(100, 100, 100, 101));
}
