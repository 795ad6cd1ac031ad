//! Replays the committed fuzz corpus through the fuzz target's body, so every CI run exercises it even
//! though fuzzing itself runs only by hand.

#[test]
fn committed_corpus_replays_without_panic() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/translate");
    let entries: Vec<_> =
        std::fs::read_dir(dir).expect("fuzz corpus directory").collect::<Result<_, _>>().expect("readable");
    assert!(entries.len() >= 12, "the seed corpus is committed ({} files)", entries.len());
    for entry in entries {
        let data = std::fs::read(entry.path()).expect("readable seed");
        mesh_packet::fuzzing::translate(&data);
    }
}

#[test]
fn committed_filter_corpus_replays_without_panic() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/filter");
    let entries: Vec<_> =
        std::fs::read_dir(dir).expect("fuzz corpus directory").collect::<Result<_, _>>().expect("readable");
    assert!(entries.len() >= 8, "the seed corpus is committed ({} files)", entries.len());
    for entry in entries {
        let data = std::fs::read(entry.path()).expect("readable seed");
        mesh_packet::fuzzing::filter(&data);
    }
}
