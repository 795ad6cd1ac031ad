//! Arbitrary packets through the ACL filter and its connection tracker. Run with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run filter fuzz/corpus/filter` from the repository root.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mesh_packet::fuzzing::filter(data);
});
