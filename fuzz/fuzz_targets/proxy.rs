//! Arbitrary bytes from a local app as userspace mode's proxy requests: SOCKS5 greetings, credentials,
//! requests and UDP datagram headers, HTTP proxy request heads, and the --forward/--expose specs. Nothing
//! may panic, and what parses must be consistent. Run with `RUSTC_BOOTSTRAP=1 cargo fuzz run proxy
//! fuzz/corpus/proxy` from the repository root.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mesh_netstack::fuzzing::proxy(data);
});
