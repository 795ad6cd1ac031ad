//! Replays the committed `proxy` fuzz corpus through the target's body on every CI run.

#[test]
fn committed_proxy_corpus_replays_with_its_invariants() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/proxy");
    let entries: Vec<_> =
        std::fs::read_dir(dir).expect("fuzz corpus directory").collect::<Result<_, _>>().expect("readable");
    assert!(entries.len() >= 5, "the seed corpus is committed ({} files)", entries.len());
    for entry in entries {
        mesh_netstack::fuzzing::proxy(&std::fs::read(entry.path()).expect("readable seed"));
    }
}
