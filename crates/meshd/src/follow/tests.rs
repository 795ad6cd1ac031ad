use mesh_proto::{ErrorCode, Peer, RouteState};

use super::*;

const NOW: u64 = 1_800_000_000;

fn follow(identity: bool) -> Follow {
    let private = [7u8; 32];
    Follow {
        control_url: "https://control.example:8443".into(),
        ca_cert: None,
        identity: identity.then(|| Identity {
            control_url: "https://control.example:8443".into(),
            node_id: 3,
            name: "router".into(),
            credential: "secret".into(),
            ephemeral: false,
        }),
        auth_key: Some("mkey-abc-def".into()),
        node_key: proof::encode_key(&proof::public_key(&private)),
        node_private: NodePrivate(private),
        hostname: "router".into(),
        advertise_routes: vec!["10.0.0.0/16".parse().unwrap()],
        tags: Vec::new(),
        endpoints: vec!["192.168.1.7:41641".parse().unwrap()],
        since: 0,
        fwmark: None,
    }
}

fn peer(id: u64) -> Peer {
    Peer {
        node_id: id,
        name: format!("node-{id}"),
        node_key: proof::encode_key(&[id as u8; 32]),
        ipv4: std::net::Ipv4Addr::new(100, 64, 0, id as u8),
        ipv6: format!("fd7a::{id}").parse().unwrap(),
        endpoints: Vec::new(),
        allowed_ips: Vec::new(),
        online: true,
        tags: Vec::new(),
        key_expiry: None,
    }
}

fn netmap(version: u64, routes: &[&str]) -> (u16, String) {
    let map = NetMap {
        version,
        domain: "mesh.internal".into(),
        node: peer(3),
        routes: routes
            .iter()
            .map(|r| RouteState { prefix: r.parse().unwrap(), approved: true, primary: true })
            .collect(),
        peers: vec![peer(4)],
        filter: None,
        dns: None,
    };
    (200, serde_json::to_string(&map).unwrap())
}

fn error(status: u16, code: ErrorCode) -> (u16, String) {
    (status, serde_json::to_string(&ErrorBody { code, message: format!("{code:?}") }).unwrap())
}

#[test]
fn a_new_node_fetches_the_server_key_registers_signed_reports_and_polls() {
    let mut m = Machine::new(follow(false));
    assert_eq!(m.next_call(NOW * 1000), Call::ServerKey);
    assert!(m.authorization(&Call::ServerKey).is_none());
    let server = [9u8; 32];
    let key = ServerKey { version: VERSION, public_key: proof::encode_key(&proof::public_key(&server)) };
    let step = m.handle(&Call::ServerKey, Ok((200, serde_json::to_string(&key).unwrap())), NOW, 0);
    assert!(step.events.is_empty() && step.wait.is_zero() && !step.stop);

    let register = m.next_call(NOW * 1000);
    let Call::Register(body) = &register else { panic!("{register:?}") };
    let request: RegisterRequest = serde_json::from_str(body).unwrap();
    assert_eq!(request.timestamp_ms, NOW * 1000);
    assert_eq!(proof::verify(&request, &server), Ok(()), "signed with the node key for this server");
    let response = RegisterResponse {
        version: VERSION,
        node_id: 3,
        name: "router".into(),
        ipv4: "100.64.0.3".parse().unwrap(),
        ipv6: "fd7a::3".parse().unwrap(),
        credential: "fresh".into(),
        domain: "mesh.internal".into(),
        ephemeral: true,
    };
    let step = m.handle(&register, Ok((200, serde_json::to_string(&response).unwrap())), NOW, 0);
    assert!(
        matches!(&step.events[..], [Event::Registered(i, _)] if i.node_id == 3 && i.credential == "fresh" && i.ephemeral)
    );

    let endpoints = m.next_call(NOW * 1000);
    assert!(matches!(&endpoints, Call::Endpoints(b) if b.contains("192.168.1.7:41641")), "{endpoints:?}");
    assert_eq!(m.authorization(&endpoints).as_deref(), Some("Node 3 fresh"));
    m.handle(&endpoints, Ok((204, String::new())), NOW, 0);
    assert_eq!(m.next_call(NOW * 1000), Call::NetMap { since: 0 });
}

#[test]
fn routes_the_server_holds_wrongly_are_reported_once_then_polling_goes_on() {
    let mut m = Machine::new(follow(true));
    let endpoints = m.next_call(0);
    m.handle(&endpoints, Ok((204, String::new())), NOW, 0);
    let poll = m.next_call(0);
    // The server still holds what the node advertised before a `set` made while it was away.
    let step = m.handle(&poll, Ok(netmap(5, &["10.9.0.0/16"])), NOW, 0);
    assert!(matches!(&step.events[..], [Event::NetMap(map)] if map.version == 5));
    let routes = m.next_call(0);
    assert!(matches!(&routes, Call::Routes(b) if b.contains("10.0.0.0/16")), "{routes:?}");
    m.handle(&routes, Ok((204, String::new())), NOW, 0);
    assert_eq!(m.next_call(0), Call::NetMap { since: 5 });
    // The same version again is nothing new.
    let step = m.handle(&Call::NetMap { since: 5 }, Ok(netmap(5, &["10.0.0.0/16"])), NOW, 0);
    assert!(step.events.is_empty());
    assert_eq!(m.next_call(0), Call::NetMap { since: 5 });
}

#[test]
fn server_faults_and_rate_limits_are_retried_with_backoff_and_say_since_when() {
    let mut m = Machine::new(follow(true));
    let call = m.next_call(0);
    let answers = [
        Ok(error(500, ErrorCode::Internal)),
        Ok(error(429, ErrorCode::RateLimited)),
        Ok((502, "<html>bad gateway</html>".to_string())),
        Ok(error(400, ErrorCode::BadRequest)),
        Err("cannot reach the coordination server at https://control.example:8443: connection refused".to_string()),
    ];
    let mut waits = Vec::new();
    for (i, answer) in answers.into_iter().enumerate() {
        let step = m.handle(&call, answer, NOW + i as u64 * 10, 0);
        assert!(!step.stop, "a passing fault never stops the node");
        let [Event::Trouble(message)] = &step.events[..] else { panic!("{:?}", step.events) };
        assert!(message.ends_with("(control unreachable since 2027-01-15 08:00:00 UTC)"), "{message}");
        waits.push(step.wait);
    }
    assert_eq!(waits[0], Duration::from_millis(750));
    assert!(waits.windows(2).all(|w| w[0] <= w[1]) && waits[4] <= MAX_BACKOFF * 5 / 4, "{waits:?}");
    // An answer again: the backoff and the since-when start over.
    m.handle(&call, Ok((204, String::new())), NOW + 60, 0);
    let step = m.handle(&m.next_call(0), Ok(error(503, ErrorCode::Internal)), NOW + 100, 0);
    assert_eq!(step.wait, Duration::from_millis(750));
    assert!(matches!(&step.events[..], [Event::Trouble(m)] if m.contains("08:01:40")), "{:?}", step.events);
}

#[test]
fn only_the_servers_explicit_refusals_stop_the_node() {
    for code in [ErrorCode::UnknownAuthKey, ErrorCode::NodeExpired, ErrorCode::Unauthorized, ErrorCode::BadProof] {
        let mut m = Machine::new(follow(true));
        let call = m.next_call(0);
        let step = m.handle(&call, Ok(error(403, code)), NOW, 0);
        assert!(step.stop, "{code:?}");
        assert!(matches!(&step.events[..], [Event::Refused(_)]), "{code:?}");
    }
    let m = Machine::new(Follow { auth_key: None, ..follow(false) });
    assert!(m.cannot_start().unwrap().contains("--auth-key"));
    assert!(Machine::new(follow(true)).cannot_start().is_none());
}

#[test]
fn control_characters_from_the_server_are_escaped() {
    assert_eq!(escape_controls("evil\u{1b}[2J\nline"), "evil\\u{1b}[2J\\nline");
    assert_eq!(escape_controls("plain"), "plain");
    let mut m = Machine::new(follow(true));
    let body =
        serde_json::to_string(&ErrorBody { code: ErrorCode::NodeExpired, message: "gone\u{1b}[2J".into() }).unwrap();
    let call = m.next_call(0);
    let step = m.handle(&call, Ok((403, body)), NOW, 0);
    assert!(matches!(&step.events[..], [Event::Refused(m)] if m == "gone\\u{1b}[2J"));
}

#[test]
fn backoff_grows_to_its_cap_with_jitter() {
    let (next, wait) = next_backoff(Duration::from_millis(500), 0);
    assert_eq!((next, wait), (Duration::from_secs(1), Duration::from_millis(750)));
    let (next, wait) = next_backoff(MAX_BACKOFF, u32::MAX);
    assert_eq!(next, MAX_BACKOFF);
    assert!(wait >= MAX_BACKOFF * 3 / 4 && wait < MAX_BACKOFF * 5 / 4, "{wait:?}");
}

#[test]
fn the_address_toward_the_server_is_reported_first() {
    let e = |s: &str| s.parse::<SocketAddr>().unwrap();
    let ordered =
        ordered_endpoints(vec![e("10.0.12.1:41641"), e("192.168.1.7:41641")], Some("192.168.1.7".parse().unwrap()));
    assert_eq!(ordered, [e("192.168.1.7:41641"), e("10.0.12.1:41641")]);
    assert_eq!(source_toward("https://127.0.0.1:8443"), Some("127.0.0.1".parse().unwrap()));
    assert_eq!(source_toward("not a url"), None);
}
