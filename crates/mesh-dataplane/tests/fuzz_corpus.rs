//! Replays the committed `netmap` and `datagram` fuzz corpora through the targets' bodies on every CI run.

#[test]
fn committed_netmap_corpus_replays_with_its_invariants() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/netmap");
    let entries: Vec<_> =
        std::fs::read_dir(dir).expect("fuzz corpus directory").collect::<Result<_, _>>().expect("readable");
    let mut parsed = 0;
    for entry in &entries {
        let data = std::fs::read(entry.path()).expect("readable seed");
        if let Ok(map) = serde_json::from_slice::<mesh_proto::NetMap>(&data) {
            mesh_dataplane::fuzzing::netmap(&map);
            parsed += 1;
        }
    }
    assert!(parsed >= 2, "the committed seeds include whole netmaps ({parsed} of {})", entries.len());
}

#[test]
fn committed_datagram_corpus_replays_into_a_node_with_a_live_session() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/datagram");
    let entries: Vec<_> =
        std::fs::read_dir(dir).expect("fuzz corpus directory").collect::<Result<_, _>>().expect("readable");
    assert!(entries.len() >= 2, "the seed corpus is committed ({} files)", entries.len());
    let (mut node, _) = mesh_dataplane::fuzzing::established_pair();
    for entry in entries {
        let data = std::fs::read(entry.path()).expect("readable seed");
        mesh_dataplane::fuzzing::datagram(&mut node, &data);
    }
}

#[test]
fn committed_dns_corpus_replays_into_the_resolver() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/dns");
    let entries: Vec<_> =
        std::fs::read_dir(dir).expect("fuzz corpus directory").collect::<Result<_, _>>().expect("readable");
    assert!(entries.len() >= 10, "the seed corpus is committed ({} files)", entries.len());
    let resolver = mesh_dataplane::fuzzing::resolver();
    for entry in entries {
        let data = std::fs::read(entry.path()).expect("readable seed");
        mesh_dataplane::fuzzing::dns(&resolver, &data);
    }
}
