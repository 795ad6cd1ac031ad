//! Policy files: parse, compile for a small mesh, run their tests. Run with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run policy fuzz/corpus/policy` from the repository root.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mesh_control::fuzzing::policy(data);
});
