//! The bodies of the fuzz targets, shared with the tests that replay their committed corpora.

/// Bytes a local app might send the proxies, and text for the specs: nothing may panic, and what parses
/// must be consistent.
pub fn proxy(data: &[u8]) {
    if let Ok(Some((methods, used))) = crate::socks5::greeting(data) {
        assert!(used <= data.len() && methods.len() + 2 == used);
    }
    if let Ok(Some((_, used))) = crate::socks5::credentials(data) {
        assert!(used <= data.len());
    }
    if let Ok(Some((request, used))) = crate::socks5::request(data) {
        assert!(used <= data.len() && !request.target.host.is_empty());
        // What parsed is a target the parser of specs takes back.
        let _ = request.target.to_string().parse::<crate::Target>();
    }
    if let Ok((_, at)) = crate::socks5::udp_header(data) {
        assert!(at <= data.len());
    }
    match crate::http::request(data) {
        Ok(Some((request, used))) => {
            assert!(used <= data.len() && used <= crate::http::MAX_HEAD);
            if let crate::http::Request::Forward { head, .. } = &request {
                // The head sent on is one whole request in origin form, with no proxy headers left.
                let text = String::from_utf8_lossy(head).to_ascii_lowercase();
                let line = text.split("\r\n").next().unwrap_or_default();
                assert!(line.split(' ').nth(1).is_some_and(|path| path.starts_with('/')), "{line}");
                assert!(text.ends_with("\r\nconnection: close\r\n\r\n") && !text.contains("\r\nproxy-"), "{text}");
            }
        }
        Ok(None) => assert!(data.len() < crate::http::MAX_HEAD),
        Err(_) => {}
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<crate::Forward>();
        let _ = text.parse::<crate::Expose>();
    }
}
