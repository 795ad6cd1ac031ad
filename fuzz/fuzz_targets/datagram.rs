//! Arbitrary bytes into a mesh node, as a datagram from the network and as a packet from the TUN device.
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run datagram fuzz/corpus/datagram`
#![no_main]

use std::sync::Mutex;

use mesh_dataplane::Node;

static NODE: Mutex<Option<Node>> = Mutex::new(None);

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut guard = NODE.lock().unwrap_or_else(|e| e.into_inner());
    // Setting up sessions costs key exchanges; one node serves every input.
    let node = guard.get_or_insert_with(|| mesh_dataplane::fuzzing::established_pair().0);
    mesh_dataplane::fuzzing::datagram(node, data);
});
