//! Arbitrary bytes from a local app as userspace mode's proxy requests: SOCKS5 greetings, credentials,
//! requests and UDP datagram headers, HTTP proxy request heads, and the --forward/--expose specs. Nothing
//! may panic, and what parses must be consistent. Run with `RUSTC_BOOTSTRAP=1 cargo fuzz run proxy
//! fuzz/corpus/proxy` from the repository root.
#![no_main]

use mesh_netstack::{http, socks5};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(Some((methods, used))) = socks5::greeting(data) {
        assert!(used <= data.len() && methods.len() + 2 == used);
    }
    if let Ok(Some((_, used))) = socks5::credentials(data) {
        assert!(used <= data.len());
    }
    if let Ok(Some((request, used))) = socks5::request(data) {
        assert!(used <= data.len() && !request.target.host.is_empty());
        // What parsed is a target the parser of specs takes back.
        let _ = request.target.to_string().parse::<mesh_netstack::Target>();
    }
    if let Ok((_, at)) = socks5::udp_header(data) {
        assert!(at <= data.len());
    }
    match http::request(data) {
        Ok(Some((request, used))) => {
            assert!(used <= data.len() && used <= http::MAX_HEAD);
            if let http::Request::Forward { head, .. } = &request {
                // The head sent on is one whole request in origin form, with no proxy headers left.
                let text = String::from_utf8_lossy(head).to_ascii_lowercase();
                let line = text.split("\r\n").next().unwrap_or_default();
                assert!(line.split(' ').nth(1).is_some_and(|path| path.starts_with('/')), "{line}");
                assert!(text.ends_with("\r\nconnection: close\r\n\r\n") && !text.contains("\r\nproxy-"), "{text}");
            }
        }
        Ok(None) => assert!(data.len() < http::MAX_HEAD),
        Err(_) => {}
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<mesh_netstack::Forward>();
        let _ = text.parse::<mesh_netstack::Expose>();
    }
});
