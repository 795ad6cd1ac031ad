//! The node's HTTPS client for its coordination server, on the daemon's runtime: hyper over tokio-rustls
//! (both already in the tree through the server). A request in flight is a future like any other, so
//! dropping it (a follower replaced or stopped) ends it at once, which a blocking client on a thread
//! cannot do.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;

/// The most a node reads of one answer: far above a netmap of thousands of peers, far below what would
/// hurt a small host. A larger answer is refused, not truncated.
const MAX_ANSWER: usize = 32 * 1024 * 1024;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the server is and how to trust it.
#[derive(Clone)]
pub struct Client {
    base: String,
    host: String,
    port: u16,
    tls: Option<TlsConnector>,
    /// Set on the connection (SO_MARK) so the routing rules send it by the main table, never into the
    /// mesh: through an exit node, the server would be out of reach whenever the tunnel is.
    fwmark: Option<u32>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).finish_non_exhaustive()
    }
}

/// How a request ended without an answer (an answer with any status code is `Ok`).
pub type Failure = String;

impl Client {
    /// A client for `control_url` (`https://HOST[:PORT]`, or `http://` when the preferences allow it),
    /// trusting `ca_cert` (PEM) when given, else the public web PKI.
    pub fn new(control_url: &str, ca_cert: Option<&Path>, fwmark: Option<u32>) -> Result<Self, String> {
        let uri: hyper::Uri = control_url.parse().map_err(|e| format!("--control-url {control_url}: {e}"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("--control-url {control_url}: expected https://HOST[:PORT]")),
        };
        let host = uri.host().ok_or_else(|| format!("--control-url {control_url}: no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https { Some(connector(ca_cert)?) } else { None };
        Ok(Self { base: control_url.trim_end_matches('/').to_string(), host, port, tls, fwmark })
    }

    /// One request on a connection of its own; the status code and body of the answer, or why there
    /// was none within `timeout`.
    pub async fn call(
        &self,
        path: &str,
        auth: Option<&str>,
        body: Option<&str>,
        timeout: Duration,
    ) -> Result<(u16, String), Failure> {
        match tokio::time::timeout(timeout, self.exchange(path, auth, body)).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer from {} within {} s", self.base, timeout.as_secs())),
        }
    }

    async fn exchange(&self, path: &str, auth: Option<&str>, body: Option<&str>) -> Result<(u16, String), Failure> {
        let unreachable =
            |e: &dyn std::fmt::Display| format!("cannot reach the coordination server at {}: {e}", self.base);
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, self.connect()).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(unreachable(&e)),
            Err(_) => return Err(unreachable(&"connecting timed out")),
        };
        let request = self.request(path, auth, body).map_err(|e| unreachable(&e))?;
        let (status, bytes) = match &self.tls {
            Some(tls) => {
                let name = ServerName::try_from(self.host.clone()).map_err(|e| unreachable(&e))?;
                let stream = tls.connect(name, tcp).await.map_err(|e| unreachable(&e))?;
                send(stream, request).await.map_err(|e| unreachable(&e))?
            }
            None => send(tcp, request).await.map_err(|e| unreachable(&e))?,
        };
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }

    async fn connect(&self) -> std::io::Result<tokio::net::TcpStream> {
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address");
        for address in tokio::net::lookup_host((self.host.as_str(), self.port)).await? {
            let socket =
                if address.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
            if let Some(mark) = self.fwmark {
                socket2::SockRef::from(&socket).set_mark(mark)?;
            }
            match socket.connect(address).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn request(
        &self,
        path: &str,
        auth: Option<&str>,
        body: Option<&str>,
    ) -> Result<hyper::Request<Full<Bytes>>, String> {
        let mut request = hyper::Request::builder()
            .method(if body.is_some() { "POST" } else { "GET" })
            .uri(format!("{}/api/v1/{path}", self.base))
            .header("host", self.authority());
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        request.body(Full::new(Bytes::from(body.unwrap_or_default().to_string()))).map_err(|e| e.to_string())
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

async fn send<S>(stream: S, request: hyper::Request<Full<Bytes>>) -> Result<(u16, Bytes), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    // The connection is driven alongside the request, so both end together when the caller drops this.
    let exchange = async {
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    tokio::pin!(exchange);
    tokio::select! {
        result = &mut exchange => result,
        ended = connection => match ended {
            Ok(()) => exchange.await,
            Err(e) => Err(e.to_string()),
        },
    }
}

fn connector(ca_cert: Option<&Path>) -> Result<TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_cert {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: cannot read: {e}", path.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{}: no PEM certificate in it", path.display()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}
