//! Arbitrary bytes as the coordination server's request bodies and policy files, into a live store.
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run control_api fuzz/corpus/control_api`
#![no_main]

use std::sync::Mutex;

use mesh_control::fuzzing::Target;

static TARGET: Mutex<Option<Target>> = Mutex::new(None);

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut guard = TARGET.lock().unwrap_or_else(|e| e.into_inner());
    guard.get_or_insert_with(Target::new).feed(data);
});
