//! The HTTP proxy's requests, from bytes an untrusted local client sent: `CONNECT host:port` (a tunnel) and
//! requests with an absolute URI (`GET http://host/path`), which go on to the origin in origin form with
//! one request per connection. The head is parsed by httparse (hyper's parser).

use base64::Engine;

use crate::spec::Target;

/// The largest request head taken; a longer one is refused (431).
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A tunnel: answer `200`, then bytes both ways.
    Connect { target: Target, auth: Option<(String, String)> },
    /// A plain request: `head` is the request rewritten for the origin; bytes after it follow as they are.
    Forward { target: Target, head: Vec<u8>, auth: Option<(String, String)> },
}

impl Request {
    pub fn target(&self) -> &Target {
        match self {
            Request::Connect { target, .. } | Request::Forward { target, .. } => target,
        }
    }

    pub fn auth(&self) -> Option<&(String, String)> {
        match self {
            Request::Connect { auth, .. } | Request::Forward { auth, .. } => auth.as_ref(),
        }
    }
}

/// A refusal: the status to answer with and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub status: u16,
    pub reason: String,
}

fn error(status: u16, reason: impl Into<String>) -> Error {
    Error { status, reason: reason.into() }
}

/// The whole response for a status, with a one-line body.
pub fn response(status: u16, text: &str) -> Vec<u8> {
    let phrase = match status {
        200 => "Connection established",
        400 => "Bad Request",
        403 => "Forbidden",
        407 => "Proxy Authentication Required",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    if status == 200 {
        return format!("HTTP/1.1 200 {phrase}\r\n\r\n").into_bytes();
    }
    let body = format!("{text}\n");
    let challenge = if status == 407 { "Proxy-Authenticate: Basic realm=\"meshd\"\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status} {phrase}\r\n{challenge}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn basic_credentials(value: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, encoded) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let (user, pass) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((user.to_string(), pass.to_string()))
}

/// `http://host[:port]/path?query` split into the target and the origin-form path.
fn absolute_uri(uri: &str) -> Result<(Target, String), Error> {
    let Some(rest) = uri.strip_prefix("http://").or_else(|| uri.strip_prefix("HTTP://")) else {
        return Err(error(400, "only http:// URIs and CONNECT are proxied"));
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(error(400, "credentials in the URI are not forwarded"));
    }
    let with_port = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:80")
    } else {
        authority.to_string()
    };
    let target: Target = with_port.parse().map_err(|e| error(400, e))?;
    let path = if path.starts_with('?') { format!("/{path}") } else { path.to_string() };
    Ok((target, path))
}

/// Parses a request head from what has arrived: `Ok(None)` until the head is whole.
pub fn request(buf: &[u8]) -> Result<Option<(Request, usize)>, Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let used = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(error(431, "request head too long")),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(error(431, "too many headers")),
        Err(e) => return Err(error(400, format!("not an HTTP request: {e}"))),
    };
    if used > MAX_HEAD {
        return Err(error(431, "request head too long"));
    }
    let method = parsed.method.unwrap_or_default();
    let uri = parsed.path.unwrap_or_default();
    let auth = parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("proxy-authorization"))
        .and_then(|h| basic_credentials(h.value));
    if method.eq_ignore_ascii_case("CONNECT") {
        let target: Target = uri.parse().map_err(|e| error(400, e))?;
        return Ok(Some((Request::Connect { target, auth }, used)));
    }
    let (target, path) = absolute_uri(uri)?;
    // The origin sees an ordinary request: origin form, no proxy headers, and the connection closes after it
    // (a client that reuses it for another host would otherwise reach the wrong server).
    let mut head = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
    // HTTP/1.1 needs a Host; an HTTP/1.0 client may have sent none.
    if !parsed.headers.iter().any(|h| h.name.eq_ignore_ascii_case("host")) {
        head.extend_from_slice(format!("Host: {target}\r\n").as_bytes());
    }
    for h in parsed.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        if name.starts_with("proxy-") || name == "connection" || name == "keep-alive" {
            continue;
        }
        head.extend_from_slice(h.name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(h.value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(Some((Request::Forward { target, head, auth }, used)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_names_the_target() {
        let text =
            b"CONNECT stackeye-db-prd:5432 HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic Ym9iOnB3\r\n\r\nrest";
        for cut in 0..text.len() - 4 {
            assert_eq!(request(&text[..cut]), Ok(None), "{cut}");
        }
        let (r, used) = request(text).unwrap().unwrap();
        assert_eq!(used, text.len() - 4);
        assert_eq!(r.target(), &Target { host: "stackeye-db-prd".into(), port: 5432 });
        assert_eq!(r.auth(), Some(&("bob".into(), "pw".into())));
        let (r, _) = request(b"CONNECT [fd7a::1]:443 HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(r.target().ip(), Some("fd7a::1".parse().unwrap()));
    }

    #[test]
    fn plain_requests_go_on_in_origin_form() {
        let text = b"GET http://web:8080/a?b=1 HTTP/1.1\r\nHost: web:8080\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n";
        let (r, _) = request(text).unwrap().unwrap();
        let Request::Forward { target, head, .. } = r else { panic!("{r:?}") };
        assert_eq!(target, Target { host: "web".into(), port: 8080 });
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "GET /a?b=1 HTTP/1.1\r\nHost: web:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let (r, _) = request(b"GET http://100.64.0.2 HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert_eq!(r.target().to_string(), "100.64.0.2:80");
        let Request::Forward { head, .. } = r else { panic!("{r:?}") };
        assert_eq!(head, b"GET / HTTP/1.1\r\nHost: 100.64.0.2:80\r\nConnection: close\r\n\r\n");
    }

    #[test]
    fn bad_requests_are_refused_with_a_status() {
        assert_eq!(request(b"GET /local HTTP/1.1\r\n\r\n").unwrap_err().status, 400);
        assert_eq!(request(b"GET https://x/ HTTP/1.1\r\n\r\n").unwrap_err().status, 400);
        assert_eq!(request(b"CONNECT nope HTTP/1.1\r\n\r\n").unwrap_err().status, 400);
        assert_eq!(request(b"\x05\x01\x00").unwrap_err().status, 400);
        assert_eq!(request(&vec![b'a'; MAX_HEAD]).unwrap_err().status, 431);
        let long = [b"GET http://a/ HTTP/1.1\r\nX: ".as_slice(), &vec![b'a'; MAX_HEAD]].concat();
        assert_eq!(request(&long).unwrap_err().status, 431);
        assert!(String::from_utf8(response(407, "who?")).unwrap().contains("Proxy-Authenticate"));
    }
}
