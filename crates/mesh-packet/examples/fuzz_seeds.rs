//! Writes the seed corpus of the `translate` fuzz target: one well-formed packet of each shape the
//! engine handles, prefixed by the control byte the target reads first.
//! `cargo run -p mesh-packet --example fuzz_seeds -- fuzz/corpus/translate`

use std::net::Ipv6Addr;

use mesh_packet::build::{Builder, fragment_v4, fragment_v6};
use mesh_packet::wire::{PROTO_FRAGMENT, PROTO_HOPOPTS, TCP_ACK, TCP_SYN};

fn main() -> std::io::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "fuzz/corpus/translate".into());
    std::fs::create_dir_all(&dir)?;
    let client = [100, 64, 0, 7];
    let server = [10, 0, 12, 50];
    let snat = [192, 0, 2, 1];
    let c6: Ipv6Addr = "fd7a:115c:a1e0::7".parse().expect("literal");
    let s6: Ipv6Addr = "fd00:a::50".parse().expect("literal");
    let n6: Ipv6Addr = "fd00::5".parse().expect("literal");
    let (c6, s6, n6) = (c6.octets(), s6.octets(), n6.octets());

    let syn = Builder::v4(client, server).tcp(51000, 443, TCP_SYN, b"");
    let translated_syn = Builder::v4(snat, server).tcp(40000, 443, TCP_SYN, b"");
    let big_udp = Builder::v4(client, server).ident(0x4242).udp(9000, 9001, &[7u8; 200]);
    let mut options = Builder::v4(client, server).udp(1, 2, b"opt");
    options.splice(20..20, [1, 1, 1, 0]);
    options[0] = 0x46;
    let total = options.len() as u16;
    options[2..4].copy_from_slice(&total.to_be_bytes());
    let mut hop_frag = Builder::v6(c6, s6).udp(1000, 53, b"x");
    hop_frag.splice(40..40, [PROTO_FRAGMENT, 0, 1, 4, 0, 0, 0, 0, 17, 0, 0, 1, 0, 0, 0, 7]);
    hop_frag[6] = PROTO_HOPOPTS;
    let payload = (hop_frag.len() - 40) as u16;
    hop_frag[4..6].copy_from_slice(&payload.to_be_bytes());

    let mut seeds: Vec<(&str, u8, Vec<u8>)> = vec![
        ("tcp-syn-v4", 0x00, syn.clone()),
        ("tcp-data-v4", 0x11, Builder::v4(client, server).tcp(51000, 443, TCP_ACK, b"GET / HTTP/1.1\r\n")),
        ("tcp-synack-reply-v4", 0x10, Builder::v4(server, snat).tcp(443, 40000, TCP_SYN | TCP_ACK, b"")),
        ("udp-v4", 0x00, Builder::v4(client, server).udp(5353, 53, b"query")),
        ("echo-v4", 0x00, Builder::v4(client, server).echo(true, 0x1234, 1, b"ping")),
        ("frag-needed-v4", 0x00, Builder::v4(server, snat).icmp_error(3, 4, 1300, &translated_syn)),
        (
            "port-unreachable-out-v4",
            0x00,
            Builder::v4(client, server).icmp_error(3, 3, 0, &Builder::v4(server, client).udp(53, 5353, b"late")),
        ),
        ("options-v4", 0x00, options),
        ("tcp-syn-v6", 0x00, Builder::v6(c6, s6).tcp(40000, 5432, TCP_SYN, b"")),
        ("echo-v6", 0x00, Builder::v6(c6, s6).echo(true, 7, 1, b"ping6")),
        (
            "too-big-v6",
            0x00,
            Builder::v6(s6, n6).icmp_error(2, 0, 1280, &Builder::v6(n6, s6).udp(40000, 53, &[1u8; 64])),
        ),
        ("hop-by-hop-fragment-v6", 0x00, hop_frag),
    ];
    for (i, f) in fragment_v4(&big_udp, 64).into_iter().enumerate() {
        seeds.push(if i == 0 { ("frag-first-v4", 0x00, f) } else { ("frag-later-v4", 0x00, f) });
    }
    let big6 = Builder::v6(c6, s6).udp(9000, 9001, &[3u8; 200]);
    if let Some(later) = fragment_v6(&big6, 64, 9).pop() {
        seeds.push(("frag-later-v6", 0x00, later));
    }
    for (name, control, packet) in seeds {
        let mut bytes = vec![control];
        bytes.extend_from_slice(&packet);
        std::fs::write(format!("{dir}/{name}"), bytes)?;
    }
    Ok(())
}
