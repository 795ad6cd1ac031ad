//! Two stacks wired back to back, with real tokio sockets on both ends: an app connects to a local
//! listener, its connection becomes a flow in stack A, A's packets go into stack B, B's exposed port
//! connects to a local echo server. Bytes must arrive whole and in order, also when the wire between the
//! stacks loses packets, and closes must travel both ways.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mesh_netstack::{Expose, Greeting, Limits, Stack};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const A: &str = "100.64.0.1";
const B: &str = "100.64.0.2";

/// Runs both stacks until `done` finishes; `drop_every`: the wire loses every Nth packet (0: none).
async fn wire<T>(a: &mut Stack, b: &mut Stack, drop_every: usize, done: impl std::future::Future<Output = T>) -> T {
    tokio::pin!(done);
    let mut count = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = Instant::now();
        // Packets in flight between the stacks, queued so neither stack is borrowed twice.
        let mut to_b: Vec<Vec<u8>> = Vec::new();
        let mut to_a: Vec<Vec<u8>> = Vec::new();
        a.poll(now, &mut |p: &mut [u8]| to_b.push(p.to_vec()));
        b.poll(now, &mut |p: &mut [u8]| to_a.push(p.to_vec()));
        while !to_a.is_empty() || !to_b.is_empty() {
            for p in std::mem::take(&mut to_b) {
                count += 1;
                if drop_every == 0 || !count.is_multiple_of(drop_every) {
                    b.receive(&p, now, &mut |q: &mut [u8]| to_a.push(q.to_vec()));
                }
            }
            for p in std::mem::take(&mut to_a) {
                count += 1;
                if drop_every == 0 || !count.is_multiple_of(drop_every) {
                    a.receive(&p, now, &mut |q: &mut [u8]| to_b.push(q.to_vec()));
                }
            }
            a.poll(now, &mut |p: &mut [u8]| to_b.push(p.to_vec()));
            b.poll(now, &mut |p: &mut [u8]| to_a.push(p.to_vec()));
        }
        let wake = [a.poll_at(now), b.poll_at(now)].into_iter().flatten().min().unwrap_or(now + Duration::from_secs(1));
        tokio::select! {
            out = &mut done => return out,
            () = a.ready() => {}
            () = b.ready() => {}
            () = tokio::time::sleep_until(wake.max(now).into()) => {}
            () = tokio::time::sleep_until(deadline) => panic!("the stacks did not finish within 60 s"),
        }
    }
}

async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A's app side: a connected pair, the app's end and the end A takes over.
async fn app_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (taken, _) = listener.accept().await.unwrap();
    (app, taken)
}

fn stacks(local: SocketAddr) -> (Stack, Stack) {
    let now = Instant::now();
    let mut a = Stack::new(1420, Limits::default(), now, 1);
    let mut b = Stack::new(1420, Limits::default(), now, 2);
    a.set_addresses(&[A.parse().unwrap()]);
    b.set_addresses(&[B.parse().unwrap()]);
    b.set_exposed(&[Expose { port: 7000, local, proto: mesh_netstack::Proto::Tcp }]);
    (a, b)
}

async fn echo_through(drop_every: usize, size: usize) {
    let (mut a, mut b) = stacks(echo_server().await);
    let (mut app, taken) = app_pair().await;
    let remote = SocketAddr::new(B.parse::<IpAddr>().unwrap(), 7000);
    a.connect(taken, remote, Greeting::Silent, Vec::new(), Instant::now()).map_err(|(r, _)| r).unwrap();
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    let sent = data.clone();
    let echoed = wire(&mut a, &mut b, drop_every, async move {
        let (mut r, mut w) = app.split();
        let write = async {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let read = r.read_to_end(&mut got);
        let (_, n) = tokio::join!(write, read);
        n.unwrap();
        got
    })
    .await;
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "the bytes came back changed");
    // Both flows end once both sides closed.
    wire(&mut a, &mut b, 0, tokio::time::sleep(Duration::from_millis(200))).await;
    assert_eq!((a.flows(), b.flows()), (0, 0), "finished flows are removed");
    assert_eq!(b.counters().inbound, 1);
}

#[tokio::test]
async fn bytes_cross_two_stacks_whole_and_in_order() {
    echo_through(0, 4 << 20).await;
}

#[tokio::test]
async fn bytes_cross_a_lossy_wire_whole_and_in_order() {
    // One packet in 50 lost: retransmission and the 32-gap reassembly carry it (slowly: smoltcp's
    // retransmission timeout is at least 1 s and it ignores SACK, so this size keeps the test short).
    echo_through(50, 256 << 10).await;
}

#[tokio::test]
async fn a_closed_port_resets_and_the_app_hears_it() {
    let (mut a, mut b) = stacks(echo_server().await);
    let (mut app, taken) = app_pair().await;
    // Port 7001 is not exposed: B resets the SYN, and the forward's app sees its connection reset.
    let remote = SocketAddr::new(B.parse::<IpAddr>().unwrap(), 7001);
    a.connect(taken, remote, Greeting::Silent, Vec::new(), Instant::now()).map_err(|(r, _)| r).unwrap();
    let read = wire(&mut a, &mut b, 0, async move {
        let mut buf = [0u8; 16];
        app.read(&mut buf).await
    })
    .await;
    assert!(matches!(read, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset), "{read:?}");
    assert_eq!(a.flows(), 0);
}

#[tokio::test]
async fn a_socks_client_hears_success_then_the_bytes() {
    let (mut a, mut b) = stacks(echo_server().await);
    let (mut app, taken) = app_pair().await;
    let remote = SocketAddr::new(B.parse::<IpAddr>().unwrap(), 7000);
    a.connect(taken, remote, Greeting::Socks5, Vec::new(), Instant::now()).map_err(|(r, _)| r).unwrap();
    let got = wire(&mut a, &mut b, 0, async move {
        let mut reply = [0u8; 10];
        app.read_exact(&mut reply).await.unwrap();
        app.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        app.read_exact(&mut echo).await.unwrap();
        (reply, echo)
    })
    .await;
    assert_eq!(&got.0[..4], &[5, 0, 0, 1]);
    assert_eq!(&got.0[4..8], &A.parse::<std::net::Ipv4Addr>().unwrap().octets());
    assert_eq!(&got.1, b"ping");
}

#[tokio::test]
async fn flows_past_the_budget_are_refused() {
    let limits = Limits { budget: 3 * (256 + 128) * 1024, ..Limits::default() };
    let mut a = Stack::new(1420, limits, Instant::now(), 3);
    a.set_addresses(&[A.parse().unwrap()]);
    let remote = SocketAddr::new(B.parse::<IpAddr>().unwrap(), 7000);
    let mut refused = 0;
    for _ in 0..5 {
        let (_app, taken) = app_pair().await;
        if a.connect(taken, remote, Greeting::Silent, Vec::new(), Instant::now()).is_err() {
            refused += 1;
        }
    }
    assert_eq!((a.flows(), refused, a.counters().refused_budget), (3, 2, 2));
}

async fn udp_echo_server() -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    addr
}

#[tokio::test]
async fn datagrams_cross_to_an_exposed_udp_port_and_back_to_their_owner() {
    let local = udp_echo_server().await;
    let now = Instant::now();
    let mut a = Stack::new(1420, Limits::default(), now, 4);
    let mut b = Stack::new(1420, Limits::default(), now, 5);
    a.set_addresses(&[A.parse().unwrap()]);
    b.set_addresses(&[B.parse().unwrap()]);
    b.set_exposed(&[Expose { port: 5353, local, proto: mesh_netstack::Proto::Udp }]);
    let (replies, mut answers) = tokio::sync::mpsc::channel(16);
    let app: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let remote = SocketAddr::new(B.parse::<IpAddr>().unwrap(), 5353);
    let id = a.udp_open(remote.ip(), replies, app, false, now).unwrap();
    for i in 0..3u8 {
        a.udp_send(id, remote, &[i; 100], Instant::now()).unwrap();
    }
    let got = wire(&mut a, &mut b, 0, async {
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(answers.recv().await.unwrap());
        }
        got
    })
    .await;
    for (i, reply) in got.iter().enumerate() {
        assert_eq!((reply.tag, reply.from), (app, remote));
        assert_eq!(reply.data, vec![i as u8; 100]);
    }
    // A port that is not exposed answers nothing; the association stays usable.
    let closed = SocketAddr::new(remote.ip(), 5354);
    a.udp_send(id, closed, b"lost", Instant::now()).unwrap();
    a.udp_send(id, remote, b"again", Instant::now()).unwrap();
    let reply = wire(&mut a, &mut b, 0, answers.recv()).await.unwrap();
    assert_eq!(reply.data, b"again");
    // Closed by its owner: sends fail with Gone.
    a.udp_close(id);
    assert_eq!(a.udp_send(id, remote, b"x", Instant::now()), Err(mesh_netstack::UdpError::Gone));
    assert_eq!(a.udp_associations(), 0);
}

#[tokio::test]
async fn a_slow_reader_gets_the_whole_reply_after_both_sides_closed() {
    // The app sends its request and half-closes; the server answers and closes; the app reads slowly, so the
    // end of the reply and the FIN sit in the stack when its socket is already in TIME-WAIT.
    let (mut a, mut b) = stacks(echo_server().await);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    app.set_recv_buffer_size(4096).unwrap();
    app.connect(&listener.local_addr().unwrap().into()).unwrap();
    app.set_nonblocking(true).unwrap();
    let mut app = TcpStream::from_std(app.into()).unwrap();
    let (taken, _) = listener.accept().await.unwrap();
    let remote = SocketAddr::new(B.parse::<IpAddr>().unwrap(), 7000);
    a.connect(taken, remote, Greeting::Silent, Vec::new(), Instant::now()).map_err(|(r, _)| r).unwrap();
    let size = 1 << 20;
    let got = wire(&mut a, &mut b, 0, async move {
        app.write_all(&vec![7u8; size]).await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            match app.read(&mut buf).await {
                Ok(0) => return Ok(got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    let got = got.expect("a clean end, not a reset");
    assert_eq!(got.len(), size, "the whole reply, not a truncated one");
}
