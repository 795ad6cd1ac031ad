//! Arbitrary bytes as DNS queries to the node's resolver (and as an upstream's answer). Run with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run dns fuzz/corpus/dns` from the repository root.
#![no_main]

use std::sync::LazyLock;

static RESOLVER: LazyLock<mesh_dataplane::dns::Resolver> = LazyLock::new(mesh_dataplane::fuzzing::resolver);

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mesh_dataplane::fuzzing::dns(&RESOLVER, data);
});
