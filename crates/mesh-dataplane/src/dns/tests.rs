use super::*;
use hickory_proto::op::Query;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn config() -> ResolverConfig {
    let (mesh_v4, mesh_v6) = mesh_ranges(&[ip("100.64.0.1"), ip("fd7a:115c:a1e0::1")]);
    ResolverConfig {
        addresses: vec![IpAddr::V4(RESOLVER_V4), IpAddr::V6(resolver_v6("fd7a:115c:a1e0::1".parse().unwrap()))],
        domain: "mesh.internal".into(),
        magic_dns: true,
        hosts: vec![
            ("orchestrator-dev-cwiq-io".into(), vec![ip("100.64.0.2"), ip("fd7a:115c:a1e0::2")]),
            ("stackeye-db-prd".into(), vec![ip("100.64.0.3"), ip("fd7a:115c:a1e0::3")]),
        ],
        extra: vec![("langfuse.cwiq.io".into(), ip("100.64.0.2"))],
        split: vec![
            ("cwiq.io".into(), vec!["10.9.9.9:53".parse().unwrap()]),
            ("shared.cwiq.io".into(), vec!["10.0.0.2:53".parse().unwrap()]),
            ("corp.internal".into(), vec![]),
        ],
        upstreams: vec!["192.0.2.53:53".parse().unwrap()],
        mesh_v4,
        mesh_v6,
    }
}

fn query(name: &str, kind: RecordType) -> Vec<u8> {
    let mut m = Message::new(4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
    m.to_vec().unwrap()
}

fn reply(resolver: &Resolver, name: &str, kind: RecordType) -> Message {
    match resolver.answer(&query(name, kind), false) {
        Answer::Reply(bytes) => Message::from_vec(&bytes).unwrap(),
        other => panic!("{name} {kind}: expected a reply, got {other:?}"),
    }
}

fn addresses(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => a.0.to_string(),
            RData::AAAA(a) => a.0.to_string(),
            RData::PTR(p) => p.0.to_ascii(),
            other => format!("{other:?}"),
        })
        .collect()
}

fn has_soa(m: &Message) -> bool {
    m.authorities.iter().any(|r| r.record_type() == RecordType::SOA && r.ttl == NEGATIVE_TTL)
}

#[test]
fn node_names_answer_in_both_forms_and_case_insensitively() {
    let r = Resolver::new(config());
    for name in [
        "orchestrator-dev-cwiq-io.mesh.internal.",
        "Orchestrator-Dev-CWIQ-io.MESH.internal.",
        "orchestrator-dev-cwiq-io.",
    ] {
        let m = reply(&r, name, RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
        assert!(m.metadata.authoritative);
        assert_eq!(addresses(&m), ["100.64.0.2"], "{name}");
        assert_eq!(m.answers[0].ttl, ANSWER_TTL);
        assert_eq!(m.metadata.id, 4242);
    }
    let m = reply(&r, "stackeye-db-prd.mesh.internal.", RecordType::AAAA);
    assert_eq!(addresses(&m), ["fd7a:115c:a1e0::3"]);
}

#[test]
fn negative_answers_tell_nxdomain_from_nodata_and_carry_the_soa() {
    let r = Resolver::new(config());
    // A known name without records of the type: NOERROR, no answers, SOA.
    let m = reply(&r, "stackeye-db-prd.mesh.internal.", RecordType::MX);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty() && has_soa(&m));
    // An unknown name in the zone: NXDOMAIN with SOA.
    let m = reply(&r, "nobody.mesh.internal.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(has_soa(&m));
    // The apex exists.
    let m = reply(&r, "mesh.internal.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(has_soa(&m));
    let m = reply(&r, "mesh.internal.", RecordType::SOA);
    assert_eq!(m.answers.len(), 1);
    // A local split zone: NXDOMAIN without asking anyone.
    let m = reply(&r, "x.corp.internal.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn pointers_answer_for_mesh_addresses_in_both_families() {
    let r = Resolver::new(config());
    let m = reply(&r, "2.0.64.100.in-addr.arpa.", RecordType::PTR);
    assert_eq!(addresses(&m), ["orchestrator-dev-cwiq-io.mesh.internal."]);
    let v6 = "3.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa.";
    let m = reply(&r, v6, RecordType::PTR);
    assert_eq!(addresses(&m), ["stackeye-db-prd.mesh.internal."]);
    let m = reply(&r, "100.100.100.100.in-addr.arpa.", RecordType::PTR);
    assert_eq!(addresses(&m), ["resolver.mesh.internal."]);
    // A mesh address nobody has: NXDOMAIN from the reverse zone.
    let m = reply(&r, "99.0.64.100.in-addr.arpa.", RecordType::PTR);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(m.authorities.iter().any(|a| a.name.to_ascii() == "100.in-addr.arpa."));
    // Outside the mesh's ranges: not ours.
    assert_eq!(
        r.answer(&query("1.1.168.192.in-addr.arpa.", RecordType::PTR), false),
        Answer::Forward(config().upstreams)
    );
}

#[test]
fn extra_records_split_zones_and_the_rest_go_where_they_belong() {
    let r = Resolver::new(config());
    let m = reply(&r, "LangFuse.cwiq.io.", RecordType::A);
    assert_eq!(addresses(&m), ["100.64.0.2"]);
    let m = reply(&r, "langfuse.cwiq.io.", RecordType::AAAA);
    assert_eq!((m.metadata.response_code, m.answers.len()), (ResponseCode::NoError, 0));
    // Longest suffix wins.
    let shared = vec!["10.0.0.2:53".parse().unwrap()];
    assert_eq!(r.answer(&query("sso.shared.cwiq.io.", RecordType::A), false), Answer::Forward(shared));
    let company = vec!["10.9.9.9:53".parse().unwrap()];
    assert_eq!(r.answer(&query("www.cwiq.io.", RecordType::A), false), Answer::Forward(company));
    assert_eq!(r.answer(&query("example.org.", RecordType::A), false), Answer::Forward(config().upstreams));
    // No upstream at all: SERVFAIL, never silence.
    let r = Resolver::new(ResolverConfig { upstreams: vec![], ..config() });
    assert_eq!(reply(&r, "example.org.", RecordType::A).metadata.response_code, ResponseCode::ServFail);
}

#[test]
fn without_magic_dns_node_names_are_not_answered() {
    let r = Resolver::new(ResolverConfig { magic_dns: false, ..config() });
    assert_eq!(
        r.answer(&query("stackeye-db-prd.mesh.internal.", RecordType::A), false),
        Answer::Forward(config().upstreams)
    );
    // Extra records still are.
    assert_eq!(addresses(&reply(&r, "langfuse.cwiq.io.", RecordType::A)), ["100.64.0.2"]);
}

#[test]
fn a_large_answer_is_truncated_for_udp_and_whole_over_tcp() {
    let mut config = config();
    config.extra = (0..60).map(|i| ("big.cwiq.io".to_string(), IpAddr::V4(Ipv4Addr::new(100, 64, 1, i)))).collect();
    let r = Resolver::new(config);
    let q = query("big.cwiq.io.", RecordType::A);
    let Answer::Reply(udp) = r.answer(&q, false) else { panic!() };
    let udp = Message::from_vec(&udp).unwrap();
    assert!(udp.metadata.truncation && udp.answers.is_empty());
    assert_eq!(udp.metadata.id, 4242);
    let Answer::Reply(tcp) = r.answer(&q, true) else { panic!() };
    let tcp = Message::from_vec(&tcp).unwrap();
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 60);
}

#[test]
fn malformed_queries_get_formerr_or_nothing() {
    let r = Resolver::new(config());
    assert_eq!(r.answer(b"", false), Answer::Ignore);
    assert_eq!(r.answer(&[0u8; 5], false), Answer::Ignore);
    let mut junk = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    junk.extend_from_slice(&[0x3f, b'a']);
    let Answer::Reply(bytes) = r.answer(&junk, false) else { panic!("FORMERR expected") };
    let m = Message::from_vec(&bytes).unwrap();
    assert_eq!((m.metadata.id, m.metadata.response_code), (0x1234, ResponseCode::FormErr));
    // A response is never answered (no loops between two resolvers).
    let mut response = Message::response(7, OpCode::Query);
    response.add_query(Query::query(Name::from_ascii("x.").unwrap(), RecordType::A));
    assert_eq!(r.answer(&response.to_vec().unwrap(), false), Answer::Ignore);
}

#[test]
fn forwarded_answers_must_match_the_query() {
    let q = query("example.org.", RecordType::A);
    let mut good = Message::response(4242, OpCode::Query);
    good.add_query(Query::query(Name::from_ascii("example.org.").unwrap(), RecordType::A));
    good.add_answer(Record::from_rdata(
        Name::from_ascii("example.org.").unwrap(),
        60,
        RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
    ));
    let good = good.to_vec().unwrap();
    assert_eq!(relay_answer(&q, Some(&good), false), Some(good.clone()));
    let mut forged = Message::from_vec(&good).unwrap();
    forged.metadata.id = 1;
    let out = Message::from_vec(&relay_answer(&q, Some(&forged.to_vec().unwrap()), false).unwrap()).unwrap();
    assert_eq!((out.metadata.id, out.metadata.response_code), (4242, ResponseCode::ServFail));
    let out = Message::from_vec(&relay_answer(&q, None, false).unwrap()).unwrap();
    assert_eq!(out.metadata.response_code, ResponseCode::ServFail);
}

#[test]
fn reverse_names_round_trip() {
    assert_eq!(reverse_address("4.3.2.1.in-addr.arpa"), Some(ip("1.2.3.4")));
    assert_eq!(reverse_address("1.2.3.in-addr.arpa"), None);
    assert_eq!(reverse_name_v4("100.64.0.0/10".parse().unwrap()).unwrap().to_ascii(), "100.in-addr.arpa.");
    assert_eq!(
        reverse_name_v6("fd7a:115c:a1e0::/48".parse().unwrap()).unwrap().to_ascii(),
        "0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa."
    );
    assert_eq!(resolver_v6("fd7a:115c:a1e0::7".parse().unwrap()), "fd7a:115c:a1e0::53".parse::<Ipv6Addr>().unwrap());
}

#[test]
fn names_above_the_addresses_in_a_reverse_zone_are_nodata_not_nxdomain() {
    let r = Resolver::new(config());
    for name in [
        "64.100.in-addr.arpa.",
        "0.64.100.in-addr.arpa.",
        "0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa.",
        "0.0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa.",
    ] {
        let m = reply(&r, name, RecordType::PTR);
        assert_eq!((m.metadata.response_code, m.answers.len()), (ResponseCode::NoError, 0), "{name}");
        assert!(has_soa(&m), "{name}");
    }
    let apex = reply(&r, "0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa.", RecordType::SOA);
    assert_eq!(apex.answers.len(), 1);
    // Outside the mesh's /10 (100.1.x) and the whole 100.in-addr.arpa are not ours.
    assert_eq!(r.answer(&query("1.100.in-addr.arpa.", RecordType::PTR), false), Answer::Forward(config().upstreams));
    assert_eq!(r.answer(&query("100.in-addr.arpa.", RecordType::PTR), false), Answer::Forward(config().upstreams));
}

#[test]
fn lookup_finds_what_the_resolver_would_answer() {
    let r = Resolver::new(config());
    assert_eq!(r.lookup("stackeye-db-prd"), vec![ip("100.64.0.3"), ip("fd7a:115c:a1e0::3")]);
    assert_eq!(r.lookup("Stackeye-DB-prd.mesh.internal."), vec![ip("100.64.0.3"), ip("fd7a:115c:a1e0::3")]);
    assert_eq!(r.lookup("langfuse.cwiq.io"), vec![ip("100.64.0.2")]);
    assert!(r.lookup("stackeye-db-prd.example.org").is_empty());
    assert!(r.lookup("example.org").is_empty());
    let off = Resolver::new(ResolverConfig { magic_dns: false, ..config() });
    assert!(off.lookup("stackeye-db-prd").is_empty());
    assert_eq!(off.lookup("langfuse.cwiq.io"), vec![ip("100.64.0.2")]);
}
