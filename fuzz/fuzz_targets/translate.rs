//! Parse and SNAT-translate arbitrary bytes in both directions. Run with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run translate fuzz/corpus/translate` from the repository root.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mesh_packet::fuzzing::translate(data);
});
