//! Replays the committed fuzz corpora through the fuzz targets' bodies, so every CI run exercises them even
//! though fuzzing itself runs only by hand.

/// Feeds every file of `fuzz/corpus/<target>` to `body`; the seeds must be committed (at least `seeds`).
fn replay(target: &str, seeds: usize, body: impl Fn(&[u8])) {
    let dir = format!("{}/../../fuzz/corpus/{target}", env!("CARGO_MANIFEST_DIR"));
    let entries: Vec<_> =
        std::fs::read_dir(&dir).expect("fuzz corpus directory").collect::<Result<_, _>>().expect("readable");
    assert!(entries.len() >= seeds, "the {target} seed corpus is committed ({} files)", entries.len());
    for entry in entries {
        body(&std::fs::read(entry.path()).expect("readable seed"));
    }
}

#[test]
fn committed_corpus_replays_without_panic() {
    replay("translate", 12, mesh_packet::fuzzing::translate);
}

#[test]
fn committed_filter_corpus_replays_without_panic() {
    replay("filter", 8, mesh_packet::fuzzing::filter);
}
