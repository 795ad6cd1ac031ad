//! A netmap as the coordination server sends it, into the node's peer configuration.
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run netmap fuzz/corpus/netmap`
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(map) = serde_json::from_slice::<mesh_proto::NetMap>(data) {
        mesh_dataplane::fuzzing::netmap(&map);
    }
});
