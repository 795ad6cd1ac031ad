//! Replays the committed `netmap` fuzz corpus through the target's body on every CI run.

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
