//! The app's ways in: local listeners for forwards and for the SOCKS5/HTTP proxy. Each accepted connection
//! is checked (the proxy's handshake, with a deadline) on a task of its own and handed to the daemon's loop
//! as a [`Dial`]; the loop resolves the target through MagicDNS and opens the flow in the [`crate::Stack`].

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use crate::stack::UdpReply;

use crate::http;
use crate::socks5::{self, Reply};
use crate::spec::Target;
use crate::stack::Greeting;

/// A proxy client has this long to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An app connection that wants a flow to `target`.
#[derive(Debug)]
pub struct Dial {
    pub stream: TcpStream,
    pub target: Target,
    pub greeting: Greeting,
    /// Bytes for the peer before the app's own (a rewritten request head, bytes the client sent early).
    pub to_peer: Vec<u8>,
    /// Which way in it came by, for logs.
    pub via: &'static str,
}

/// A datagram from an app for the mesh, from a UDP forward or a SOCKS5 association (`owner`).
#[derive(Debug)]
pub struct UdpOut {
    pub owner: u64,
    /// The app's address, which answers go back to.
    pub client: SocketAddr,
    pub target: Target,
    pub data: Vec<u8>,
    /// Answers only from the target (a forward), not from wherever the owner sent last (SOCKS5).
    pub pinned: bool,
    /// Where the owner takes answers; closed when the owner is gone (its associations close too).
    pub replies: mpsc::Sender<UdpReply>,
}

/// What the app side hands the daemon's loop.
#[derive(Debug)]
pub enum AppEvent {
    Dial(Dial),
    Datagram(UdpOut),
}

/// Answers waiting for one owner before the next is dropped.
const REPLY_QUEUE: usize = 256;
/// The largest datagram taken from an app.
const MAX_DATAGRAM: usize = 65_535;
/// Proxy handshakes under way at once; clients past them wait in the kernel's accept queue.
const MAX_HANDSHAKES: usize = 256;

/// The next connection; after an error other than the client giving up (out of descriptors, say) it waits a
/// little, so a listener that stays readable cannot spin the loop.
pub async fn accept(listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
    match listener.accept().await {
        Ok(accepted) => Some(accepted),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => None,
        Err(e) => {
            tracing::warn!(error = %e, "accepting a connection");
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

fn next_owner() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The username and password the proxy asks for.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub pass: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).finish_non_exhaustive()
    }
}

impl Credentials {
    /// Compares without stopping at the first difference, so timing does not reveal a prefix.
    fn matches(&self, user: &[u8], pass: &[u8]) -> bool {
        let same =
            |a: &[u8], b: &[u8]| a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
        same(self.user.as_bytes(), user) & same(self.pass.as_bytes(), pass)
    }
}

/// Tells the app its flow was refused, in its protocol's words, and closes it.
pub fn refuse(dial: Dial, reason: &str) {
    tracing::info!(via = dial.via, target = %dial.target, "refused: {reason}");
    let Dial { mut stream, greeting, .. } = dial;
    let bytes = match greeting {
        Greeting::Silent => {
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            return;
        }
        Greeting::Socks5 => socks5::reply(Reply::HostUnreachable, SocketAddr::from(([0, 0, 0, 0], 0))),
        Greeting::HttpConnect | Greeting::HttpPlain => http::response(502, reason),
    };
    tokio::spawn(async move {
        let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.write_all(&bytes)).await;
    });
}

/// Accepts a forward's connections: each one is a flow to `target`.
pub fn spawn_forward(
    listener: TcpListener,
    target: Target,
    events: mpsc::Sender<AppEvent>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Some((stream, _)) = accept(&listener).await else { continue };
            let _ = stream.set_nodelay(true);
            let dial = Dial {
                stream,
                target: target.clone(),
                greeting: Greeting::Silent,
                to_peer: Vec::new(),
                via: "forward",
            };
            if events.send(AppEvent::Dial(dial)).await.is_err() {
                return;
            }
        }
    })
}

/// A UDP forward: each app address is an association to `target`; answers go back to it.
pub fn spawn_udp_forward(
    socket: UdpSocket,
    target: Target,
    events: mpsc::Sender<AppEvent>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let owner = next_owner();
        let (replies, mut answers) = mpsc::channel(REPLY_QUEUE);
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            tokio::select! {
                received = socket.recv_from(&mut buf) => {
                    let Ok((n, client)) = received else { continue };
                    let data = buf[..n].to_vec();
                    let target = target.clone();
                    let out = UdpOut { owner, client, target, data, pinned: true, replies: replies.clone() };
                    // A busy loop drops the datagram rather than queue without bound.
                    if let Err(mpsc::error::TrySendError::Closed(_)) = events.try_send(AppEvent::Datagram(out)) {
                        return;
                    }
                }
                Some(answer) = answers.recv() => {
                    let _ = socket.send_to(&answer.data, answer.tag).await;
                }
            }
        }
    })
}

/// Which protocols a proxy listener speaks (both on one port: told apart by the first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocols {
    pub socks5: bool,
    pub http: bool,
}

/// Accepts proxy clients; each handshake runs on its own task with a deadline.
pub fn spawn_proxy(
    listener: TcpListener,
    protocols: Protocols,
    credentials: Option<Credentials>,
    events: mpsc::Sender<AppEvent>,
) -> tokio::task::JoinHandle<()> {
    let handshakes = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
            let Some((stream, from)) = accept(&listener).await else { continue };
            let _ = stream.set_nodelay(true);
            let (events, credentials) = (events.clone(), credentials.clone());
            tokio::spawn(async move {
                let shaken = handshake(stream, protocols, credentials.as_ref());
                let shaken = tokio::time::timeout(HANDSHAKE_TIMEOUT, shaken).await;
                drop(permit);
                match shaken {
                    Ok(Ok(Handshake::Dial(dial))) => {
                        let _ = events.send(AppEvent::Dial(dial)).await;
                    }
                    Ok(Ok(Handshake::Udp { control, relay, client, from })) => {
                        udp_associate(control, relay, client, from, events).await;
                    }
                    Ok(Err(e)) => tracing::debug!(client = %from, "proxy handshake refused: {e}"),
                    Err(_) => tracing::debug!(client = %from, "proxy handshake timed out"),
                }
            });
        }
    })
}

/// What a finished handshake asks for.
enum Handshake {
    Dial(Dial),
    /// SOCKS5 UDP ASSOCIATE: datagrams through `relay` for as long as `control` stays open, from `client`'s
    /// host only (and from `from`, when the request named where the client sends from).
    Udp {
        control: TcpStream,
        relay: UdpSocket,
        client: IpAddr,
        from: Option<SocketAddr>,
    },
}

/// Relays one SOCKS5 UDP association until its TCP connection closes.
async fn udp_associate(
    mut control: TcpStream,
    relay: UdpSocket,
    client_ip: IpAddr,
    declared: Option<SocketAddr>,
    events: mpsc::Sender<AppEvent>,
) {
    let owner = next_owner();
    let (replies, mut answers) = mpsc::channel(REPLY_QUEUE);
    // The client's UDP address: the one its request named, else the first that sends from its host (RFC 1928
    // §7). Another local process cannot take over an association whose client said where it sends from.
    let mut client: Option<SocketAddr> = declared;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut ignored = [0u8; 64];
    loop {
        tokio::select! {
            read = control.read(&mut ignored) => {
                if !matches!(read, Ok(n) if n > 0) {
                    return;
                }
            }
            received = relay.recv_from(&mut buf) => {
                let Ok((n, from)) = received else { continue };
                if from.ip() != client_ip || client.is_some_and(|c| c != from) {
                    continue;
                }
                client = Some(from);
                let Ok((target, at)) = socks5::udp_header(&buf[..n]) else { continue };
                let data = buf[at..n].to_vec();
                let out = UdpOut { owner, client: from, target, data, pinned: false, replies: replies.clone() };
                if let Err(mpsc::error::TrySendError::Closed(_)) = events.try_send(AppEvent::Datagram(out)) {
                    return;
                }
            }
            Some(answer) = answers.recv() => {
                let mut datagram = socks5::udp_reply_header(answer.from);
                datagram.extend_from_slice(&answer.data);
                let _ = relay.send_to(&datagram, answer.tag).await;
            }
        }
    }
}

/// Reads more of the handshake into `buf`; an end of stream is an error.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    if buf.len() >= http::MAX_HEAD {
        return Err("handshake too long".into());
    }
    let mut chunk = [0u8; 2048];
    let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("the client closed the connection".into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

async fn handshake(
    mut stream: TcpStream,
    protocols: Protocols,
    credentials: Option<&Credentials>,
) -> Result<Handshake, String> {
    let mut buf = Vec::new();
    read_more(&mut stream, &mut buf).await?;
    if buf[0] == socks5::VERSION {
        if !protocols.socks5 {
            return Err("a SOCKS5 client at the HTTP proxy".into());
        }
        return socks5_handshake(stream, buf, credentials).await;
    }
    if !protocols.http {
        return Err("not a SOCKS5 client".into());
    }
    http_handshake(stream, buf, credentials).await.map(Handshake::Dial)
}

/// Parses with `parse`, reading more until the message is whole; the bytes after it stay in `buf`.
async fn next_message<T>(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, socks5::Error>,
) -> Result<T, (String, Option<Reply>)> {
    loop {
        match parse(buf) {
            Ok(Some((value, used))) => {
                buf.drain(..used);
                return Ok(value);
            }
            Ok(None) => read_more(stream, buf).await.map_err(|e| (e, None))?,
            Err(e) => return Err((e.reason.to_string(), e.reply)),
        }
    }
}

async fn socks5_handshake(
    mut stream: TcpStream,
    mut buf: Vec<u8>,
    credentials: Option<&Credentials>,
) -> Result<Handshake, String> {
    let unbound = SocketAddr::from(([0, 0, 0, 0], 0));
    let methods = next_message(&mut stream, &mut buf, socks5::greeting).await.map_err(|e| e.0)?;
    let wanted = if credentials.is_some() { socks5::USER_PASS } else { socks5::NO_AUTH };
    if !methods.contains(&wanted) {
        let _ = stream.write_all(&[socks5::VERSION, socks5::NO_ACCEPTABLE]).await;
        return Err("the client offers no acceptable authentication method".into());
    }
    stream.write_all(&[socks5::VERSION, wanted]).await.map_err(|e| e.to_string())?;
    if let Some(credentials) = credentials {
        let (user, pass) = next_message(&mut stream, &mut buf, socks5::credentials).await.map_err(|e| e.0)?;
        if !credentials.matches(&user, &pass) {
            let _ = stream.write_all(&[1, 1]).await;
            return Err("wrong username or password".into());
        }
        stream.write_all(&[1, 0]).await.map_err(|e| e.to_string())?;
    }
    let request = match next_message(&mut stream, &mut buf, socks5::request).await {
        Ok(r) => r,
        Err((why, reply)) => {
            if let Some(code) = reply {
                let _ = stream.write_all(&socks5::reply(code, unbound)).await;
            }
            return Err(why);
        }
    };
    if request.command == socks5::Command::UdpAssociate {
        // The relay listens where the client reached the proxy (loopback by default).
        let local = stream.local_addr().map_err(|e| e.to_string())?;
        let peer = stream.peer_addr().map_err(|e| e.to_string())?;
        let relay = match UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await {
            Ok(r) => r,
            Err(e) => {
                let _ = stream.write_all(&socks5::reply(Reply::GeneralFailure, unbound)).await;
                return Err(format!("binding the UDP relay: {e}"));
            }
        };
        let bound = relay.local_addr().map_err(|e| e.to_string())?;
        stream.write_all(&socks5::reply(Reply::Succeeded, bound)).await.map_err(|e| e.to_string())?;
        // DST.ADDR/DST.PORT of an ASSOCIATE name where the client will send from (zeros: not known yet).
        let from = match (request.target.ip(), request.target.port) {
            (_, 0) => None,
            (Some(ip), port) if !ip.is_unspecified() => Some(SocketAddr::new(ip, port)),
            (_, port) => Some(SocketAddr::new(peer.ip(), port)),
        };
        return Ok(Handshake::Udp { control: stream, relay, client: peer.ip(), from });
    }
    let dial = Dial { stream, target: request.target, greeting: Greeting::Socks5, to_peer: buf, via: "socks5" };
    Ok(Handshake::Dial(dial))
}

async fn http_handshake(
    mut stream: TcpStream,
    mut buf: Vec<u8>,
    credentials: Option<&Credentials>,
) -> Result<Dial, String> {
    let (request, used) = loop {
        match http::request(&buf) {
            Ok(Some(parsed)) => break parsed,
            Ok(None) => read_more(&mut stream, &mut buf).await?,
            Err(e) => {
                let _ = stream.write_all(&http::response(e.status, &e.reason)).await;
                return Err(e.reason);
            }
        }
    };
    if let Some(credentials) = credentials {
        let given = request.auth();
        if !given.is_some_and(|(u, p)| credentials.matches(u.as_bytes(), p.as_bytes())) {
            let _ = stream.write_all(&http::response(407, "proxy authentication required")).await;
            return Err("missing or wrong proxy credentials".into());
        }
    }
    let rest = buf.split_off(used);
    Ok(match request {
        http::Request::Connect { target, .. } => {
            Dial { stream, target, greeting: Greeting::HttpConnect, to_peer: rest, via: "http" }
        }
        http::Request::Forward { target, mut head, .. } => {
            head.extend_from_slice(&rest);
            Dial { stream, target, greeting: Greeting::HttpPlain, to_peer: head, via: "http" }
        }
    })
}
