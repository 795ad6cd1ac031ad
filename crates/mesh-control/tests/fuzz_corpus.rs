//! Replays the committed `control_api` and `policy` fuzz corpora through the targets' bodies on every CI run.

/// Feeds every file of `fuzz/corpus/<target>` to `body`; the seeds must be committed (at least `seeds`).
fn replay(target: &str, seeds: usize, mut body: impl FnMut(&[u8])) {
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
    let mut target = mesh_control::fuzzing::Target::new();
    replay("control_api", 7, |data| target.feed(data));
}

#[test]
fn committed_policy_corpus_replays_without_panic() {
    replay("policy", 8, mesh_control::fuzzing::policy);
}
