//! Replays the committed `control_api` fuzz corpus through the target's body on every CI run.

#[test]
fn committed_corpus_replays_without_panic() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/control_api");
    let entries: Vec<_> =
        std::fs::read_dir(dir).expect("fuzz corpus directory").collect::<Result<_, _>>().expect("readable");
    assert!(entries.len() >= 7, "the seed corpus is committed ({} files)", entries.len());
    let mut target = mesh_control::fuzzing::Target::new();
    for entry in entries {
        let data = std::fs::read(entry.path()).expect("readable seed");
        target.feed(&data);
    }
}

#[test]
fn committed_policy_corpus_replays_without_panic() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/policy");
    let entries: Vec<_> =
        std::fs::read_dir(dir).expect("fuzz corpus directory").collect::<Result<_, _>>().expect("readable");
    assert!(entries.len() >= 8, "the seed corpus is committed ({} files)", entries.len());
    for entry in entries {
        let data = std::fs::read(entry.path()).expect("readable seed");
        mesh_control::fuzzing::policy(&data);
    }
}
