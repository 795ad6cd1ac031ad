//! Serving the API: HTTPS with rustls, or plain HTTP when the operator asks for it explicitly. Built to
//! outlive floods: accept errors (a full descriptor table, say) are logged and survived, a connection cap
//! stops accepting rather than failing, and every stage a client could stall has a deadline.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tower::ServiceExt;

/// Reads a PEM certificate chain and private key into a TLS configuration; errors name the file.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: cannot read certificates: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: not a PEM private key: {e}", key.display()))?;
    let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("{}: the key does not fit the certificate: {e}", cert.display()))?;
    Ok(Arc::new(config))
}

/// How much the server gives any one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections; past it the server stops accepting until one closes (the kernel's backlog holds
    /// the rest), instead of running out of descriptors.
    pub max_connections: usize,
    /// From accept to a finished TLS handshake.
    pub handshake: Duration,
    /// For a request's headers to arrive, also on an idle keep-alive connection: a connection that sends
    /// nothing is closed after this.
    pub headers: Duration,
    /// For a whole connection: a body that never arrives or an answer never read cannot hold a slot
    /// longer. Far above a long poll (25 s); clients open a connection per request.
    pub lifetime: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            handshake: Duration::from_secs(10),
            headers: Duration::from_secs(30),
            lifetime: Duration::from_secs(120),
        }
    }
}

/// How long to wait after a failed accept before the next: long enough that a full descriptor table
/// does not turn the loop into a busy spin, short enough that service resumes as soon as one frees.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// Accepts connections until the future is dropped, each served on its own task.
pub async fn serve(listener: TcpListener, app: Router, tls: Option<Arc<ServerConfig>>, limits: Limits) {
    let acceptor = tls.map(TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // HTTP/1 only: the automatic builder otherwise first reads to tell HTTP/2 from HTTP/1, a read with no
    // deadline, so a connection that never sends a byte would be held forever.
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.headers);
    let builder = Arc::new(builder);
    let mut failures: u64 = 0;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS, ECONNABORTED: all pass. Logged at the first and then every
                // thousandth, so a flood does not also flood the log.
                failures += 1;
                if failures % 1000 == 1 {
                    tracing::warn!(error = %e, failures, "accepting a connection failed; still serving");
                }
                drop(slot);
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        let (app, acceptor, builder) = (app.clone(), acceptor.clone(), builder.clone());
        tokio::spawn(async move {
            let _slot = slot;
            // The peer's address on every request: the console limits sign-ins per client.
            let app = app.map_request(move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                request
            });
            let service = TowerToHyperService::new(app);
            let deadline = tokio::time::Instant::now() + limits.lifetime;
            let result = match acceptor {
                Some(acceptor) => match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let served = builder.serve_connection(TokioIo::new(stream), service);
                        tokio::time::timeout_at(deadline, served).await.unwrap_or(Ok(()))
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
                None => {
                    let served = builder.serve_connection(TokioIo::new(tcp), service);
                    tokio::time::timeout_at(deadline, served).await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// Runs `test` on a thread moved into a network namespace of its own, so its sockets touch nothing of
    /// the host's; the namespace goes when the test ends, pass or fail.
    fn in_namespace<F: std::future::Future<Output = ()>>(name: &str, test: impl FnOnce() -> F + Send) {
        let mut lab = mesh_netns::Lab::new(name);
        let ns = lab.netns("s");
        let netns = lab.ns(ns);
        std::thread::scope(|s| {
            s.spawn(|| {
                netns.enter_on_this_thread();
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(test());
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        });
    }

    async fn server(limits: Limits) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = Router::new().route("/", get(|| async { "ok" }));
        tokio::spawn(serve(listener, app, None, limits));
        address
    }

    async fn get_ok(address: std::net::SocketAddr) -> bool {
        let Ok(Ok(mut tcp)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(address)).await else {
            return false;
        };
        let _ = tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
        let mut answer = String::new();
        let read = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_string(&mut answer)).await;
        read.is_ok() && answer.starts_with("HTTP/1.1 200")
    }

    #[test]
    fn an_idle_connection_is_closed_after_the_header_timeout() {
        in_namespace("srv", || async {
            let limits = Limits { headers: Duration::from_millis(300), ..Limits::default() };
            let address = server(limits).await;
            let mut idle = TcpStream::connect(address).await.unwrap();
            let start = Instant::now();
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf)).await;
            assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed, not left open: {read:?}");
            assert!(start.elapsed() < Duration::from_secs(5));
            assert!(get_ok(address).await);
        });
    }

    #[test]
    fn a_body_that_never_arrives_holds_its_connection_no_longer_than_the_lifetime() {
        in_namespace("srv", || async {
            let limits = Limits { lifetime: Duration::from_millis(400), ..Limits::default() };
            let address = server(limits).await;
            let mut slow = TcpStream::connect(address).await.unwrap();
            slow.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 65536\r\n\r\n").await.unwrap();
            let mut buf = [0u8; 256];
            let start = Instant::now();
            let read = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf)).await;
            assert!(matches!(read, Ok(Ok(_)) | Ok(Err(_))), "closed within its lifetime, not held: {read:?}");
            assert!(start.elapsed() < Duration::from_secs(3));
        });
    }

    #[test]
    fn connections_past_the_cap_wait_and_are_served_once_one_closes() {
        in_namespace("srv", || async {
            let limits = Limits { max_connections: 2, headers: Duration::from_millis(500), ..Limits::default() };
            let address = server(limits).await;
            let hogs = [TcpStream::connect(address).await.unwrap(), TcpStream::connect(address).await.unwrap()];
            // Both slots are held; the third connects (the kernel's backlog) and is served only once a hog is
            // closed by the header timeout, not before.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let start = Instant::now();
            assert!(get_ok_within(address, Duration::from_secs(5)).await);
            assert!(start.elapsed() >= Duration::from_millis(300), "served at once: the cap did nothing");
            drop(hogs);
        });
    }

    async fn get_ok_within(address: std::net::SocketAddr, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if get_ok(address).await {
                return true;
            }
        }
        false
    }
}
