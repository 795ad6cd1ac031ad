//! The SNAT engine through its public API, with every rewritten packet checked by an independent
//! checksum implementation.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use mesh_packet::build::{Builder, fragment_v4, fragment_v6};
use mesh_packet::snat::{DropReason, Snat, SnatConfig};
use mesh_packet::wire::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

fn engine(now: Instant) -> Snat {
    Snat::new(SnatConfig::new(Some(SNAT), Some(snat6())), now).unwrap()
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Sends a TCP SYN from `client:port` to the server's HTTPS port and returns the external port.
fn open_tcp(snat: &mut Snat, client: Ipv4Addr, port: u16, now: Instant) -> u16 {
    let mut p = Builder::v4(client.octets(), SERVER.octets()).tcp(port, 443, TCP_SYN, b"");
    snat.outbound(&mut p, now).unwrap();
    u16_at(&p, 20)
}

#[test]
fn tcp_outbound_and_reply_round_trip() {
    let now = Instant::now();
    let mut snat = engine(now);
    let payload = vec![0xab; 1380];
    let original = Builder::v4(CLIENT.octets(), SERVER.octets()).tcp(51000, 443, TCP_SYN, &payload);
    let mut p = original.clone();
    snat.outbound(&mut p, now).unwrap();
    assert_eq!(src4(&p), SNAT);
    assert_eq!(dst4(&p), SERVER);
    let ext = u16_at(&p, 20);
    assert!(ext >= 1024);
    assert_eq!(u16_at(&p, 22), 443);
    assert_checksums_valid(&p);
    assert_eq!(p[40..], original[40..], "payload untouched");

    let mut reply = Builder::v4(SERVER.octets(), SNAT.octets()).tcp(443, ext, TCP_SYN | TCP_ACK, b"ok");
    snat.inbound(&mut reply, now).unwrap();
    assert_eq!(dst4(&reply), CLIENT);
    assert_eq!(u16_at(&reply, 22), 51000);
    assert_checksums_valid(&reply);
    let c = snat.counters();
    assert_eq!((c.outbound, c.inbound, c.flows_created), (1, 1, 1));
}

#[test]
fn udp_mapping_is_endpoint_independent_and_filtering_is_not() {
    let now = Instant::now();
    let mut snat = engine(now);
    let mut a = Builder::v4(CLIENT.octets(), SERVER.octets()).udp(5353, 53, b"query");
    let mut b = Builder::v4(CLIENT.octets(), SERVER2.octets()).udp(5353, 5000, b"query");
    snat.outbound(&mut a, now).unwrap();
    snat.outbound(&mut b, now).unwrap();
    assert_eq!(u16_at(&a, 20), u16_at(&b, 20), "one external port for one internal endpoint (RFC 4787 REQ-1)");
    assert_eq!(snat.mappings(), 1);
    assert_eq!(snat.flows(), 2);
    let ext = u16_at(&a, 20);

    // A third host has never been contacted: its packet to the mapped port is unsolicited.
    let stranger = Ipv4Addr::new(10, 0, 99, 99);
    let mut p = Builder::v4(stranger.octets(), SNAT.octets()).udp(53, ext, b"spoof");
    assert_eq!(snat.inbound(&mut p, now), Err(DropReason::Unsolicited));
    // A contacted host, but from another port.
    let mut p = Builder::v4(SERVER.octets(), SNAT.octets()).udp(54, ext, b"spoof");
    assert_eq!(snat.inbound(&mut p, now), Err(DropReason::Unsolicited));
    // An unmapped external port.
    let mut p = Builder::v4(SERVER.octets(), SNAT.octets()).udp(53, ext.wrapping_add(1).max(1024), b"x");
    assert_eq!(snat.inbound(&mut p, now), Err(DropReason::Unsolicited));
    assert_eq!(snat.counters().dropped(DropReason::Unsolicited), 3);

    let mut reply = Builder::v4(SERVER2.octets(), SNAT.octets()).udp(5000, ext, b"answer");
    snat.inbound(&mut reply, now).unwrap();
    assert_eq!((dst4(&reply), u16_at(&reply, 22)), (CLIENT, 5353));
    assert_checksums_valid(&reply);
}

#[test]
fn udp_without_checksum_keeps_none() {
    let now = Instant::now();
    let mut snat = engine(now);
    let mut p = Builder::v4(CLIENT.octets(), SERVER.octets()).udp(7000, 7001, b"nocsum");
    p[26..28].copy_from_slice(&[0, 0]);
    snat.outbound(&mut p, now).unwrap();
    assert_eq!(u16_at(&p, 26), 0);
    assert_checksums_valid(&p);
}

#[test]
fn icmp_echo_identifier_is_mapped_like_a_port() {
    let now = Instant::now();
    let mut snat = engine(now);
    let mut ping = Builder::v4(CLIENT.octets(), SERVER.octets()).echo(true, 0x1234, 1, b"abcdefgh");
    snat.outbound(&mut ping, now).unwrap();
    assert_eq!(src4(&ping), SNAT);
    let ext_id = u16_at(&ping, 24);
    assert_checksums_valid(&ping);

    let mut pong = Builder::v4(SERVER.octets(), SNAT.octets()).echo(false, ext_id, 1, b"abcdefgh");
    snat.inbound(&mut pong, now).unwrap();
    assert_eq!((dst4(&pong), u16_at(&pong, 24)), (CLIENT, 0x1234));
    assert_checksums_valid(&pong);

    // An echo request from the LAN to the SNAT address is unsolicited.
    let mut probe = Builder::v4(SERVER.octets(), SNAT.octets()).echo(true, 1, 1, b"");
    assert_eq!(snat.inbound(&mut probe, now), Err(DropReason::Unsolicited));
}

#[test]
fn icmpv6_echo_round_trip() {
    let now = Instant::now();
    let mut snat = engine(now);
    let mut ping = Builder::v6(client6().octets(), server6().octets()).echo(true, 77, 3, b"v6 ping");
    snat.outbound(&mut ping, now).unwrap();
    assert_eq!(src6(&ping), snat6());
    assert_checksums_valid(&ping);
    let ext_id = u16_at(&ping, 44);
    let mut pong = Builder::v6(server6().octets(), snat6().octets()).echo(false, ext_id, 3, b"v6 ping");
    snat.inbound(&mut pong, now).unwrap();
    assert_eq!((dst6(&pong), u16_at(&pong, 44)), (client6(), 77));
    assert_checksums_valid(&pong);
}

#[test]
fn tcp_over_ipv6_round_trip() {
    let now = Instant::now();
    let mut snat = engine(now);
    let mut p = Builder::v6(client6().octets(), server6().octets()).tcp(40000, 5432, TCP_SYN, b"");
    snat.outbound(&mut p, now).unwrap();
    assert_eq!(src6(&p), snat6());
    assert_checksums_valid(&p);
    let ext = u16_at(&p, 40);
    let mut r = Builder::v6(server6().octets(), snat6().octets()).tcp(5432, ext, TCP_SYN | TCP_ACK, b"");
    snat.inbound(&mut r, now).unwrap();
    assert_eq!((dst6(&r), u16_at(&r, 42)), (client6(), 40000));
    assert_checksums_valid(&r);
}

#[test]
fn fragmentation_needed_is_translated_with_its_quote() {
    let now = Instant::now();
    let mut snat = engine(now);
    let mut big = Builder::v4(CLIENT.octets(), SERVER.octets()).tcp(51000, 443, TCP_ACK, &[7u8; 1400]);
    snat.outbound(&mut big, now).unwrap();
    let ext = u16_at(&big, 20);

    for quote_len in [big.len().min(576 - 28), 20 + 8] {
        // A router on the LAN path cannot forward it: "fragmentation needed", next-hop MTU 1300.
        let mut err = Builder::v4(ROUTER_ON_PATH.octets(), SNAT.octets()).icmp_error(3, 4, 1300, &big[..quote_len]);
        snat.inbound(&mut err, now).unwrap();
        assert_eq!(dst4(&err), CLIENT);
        assert_checksums_valid(&err);
        let inner = 28;
        assert_quoted_v4_header_valid(&err, inner);
        assert_eq!(src4(&err[inner..]), CLIENT, "quoted source translated back");
        assert_eq!(u16_at(&err, inner + 20), 51000, "quoted source port translated back");
        if quote_len >= 40 {
            // The quoted TCP checksum must be what the client computed for its original packet.
            let original = Builder::v4(CLIENT.octets(), SERVER.octets()).tcp(51000, 443, TCP_ACK, &[7u8; 1400]);
            assert_eq!(u16_at(&err, inner + 36), u16_at(&original, 36));
        }
    }
    // An error quoting a flow that does not exist is dropped.
    let bogus = Builder::v4(SNAT.octets(), SERVER.octets()).tcp(ext.wrapping_add(7).max(1024), 443, TCP_ACK, b"");
    let mut err = Builder::v4(ROUTER_ON_PATH.octets(), SNAT.octets()).icmp_error(3, 4, 1300, &bogus[..28]);
    assert_eq!(snat.inbound(&mut err, now), Err(DropReason::IcmpErrorWithoutSession));
}

#[test]
fn icmpv6_packet_too_big_is_translated() {
    let now = Instant::now();
    let mut snat = engine(now);
    let mut big = Builder::v6(client6().octets(), server6().octets()).udp(6000, 6001, &[1u8; 1300]);
    snat.outbound(&mut big, now).unwrap();
    let router = v6("fd00:a::1");
    let mut err = Builder::v6(router.octets(), snat6().octets()).icmp_error(2, 0, 1280, &big[..1232]);
    snat.inbound(&mut err, now).unwrap();
    assert_eq!(dst6(&err), client6());
    assert_checksums_valid(&err);
    let original = Builder::v6(client6().octets(), server6().octets()).udp(6000, 6001, &[1u8; 1300]);
    assert_eq!(err[48..48 + 48], original[..48], "quoted headers are the client's own again");
}

#[test]
fn outbound_port_unreachable_about_a_reply_is_translated() {
    let now = Instant::now();
    let mut snat = engine(now);
    let mut q = Builder::v4(CLIENT.octets(), SERVER.octets()).udp(5000, 53, b"q");
    snat.outbound(&mut q, now).unwrap();
    let ext = u16_at(&q, 20);
    let mut reply = Builder::v4(SERVER.octets(), SNAT.octets()).udp(53, ext, b"late answer");
    snat.inbound(&mut reply, now).unwrap();
    // The client's socket is gone; its kernel answers with port unreachable quoting the reply it got.
    let mut err = Builder::v4(CLIENT.octets(), SERVER.octets()).icmp_error(3, 3, 0, &reply);
    snat.outbound(&mut err, now).unwrap();
    assert_eq!(src4(&err), SNAT);
    assert_checksums_valid(&err);
    assert_quoted_v4_header_valid(&err, 28);
    assert_eq!(dst4(&err[28..]), SNAT);
    assert_eq!(u16_at(&err, 28 + 22), ext);
    let what_server_sent = Builder::v4(SERVER.octets(), SNAT.octets()).udp(53, ext, b"late answer");
    assert_eq!(err[28..], what_server_sent[..], "the quote is exactly what the server sent");
}

#[test]
fn ipv4_fragments_follow_their_first_fragment() {
    let now = Instant::now();
    let mut snat = engine(now);
    let datagram = Builder::v4(CLIENT.octets(), SERVER.octets()).ident(0x7777).udp(9000, 9001, &[3u8; 3000]);
    let mut frags = fragment_v4(&datagram, 1280);
    assert_eq!(frags.len(), 3);
    for f in &mut frags {
        snat.outbound(f, now).unwrap();
        assert_eq!(src4(f), SNAT);
        assert_checksums_valid(f);
    }
    // Reassembled, the datagram has a valid UDP checksum over the translated addresses.
    let mut whole = frags[0][..20].to_vec();
    for f in &frags {
        whole.extend_from_slice(&f[20..]);
    }
    whole[6..8].copy_from_slice(&[0, 0]);
    let total = whole.len() as u16;
    whole[2..4].copy_from_slice(&total.to_be_bytes());
    whole[10..12].copy_from_slice(&[0, 0]);
    let c = mesh_packet::checksum::checksum(&whole[..20]);
    whole[10..12].copy_from_slice(&c.to_be_bytes());
    assert_checksums_valid(&whole);

    // Replies in fragments come back the same way, the later ones by IP identification alone.
    let ext = u16_at(&frags[0], 20);
    let reply = Builder::v4(SERVER.octets(), SNAT.octets()).ident(0x8888).udp(9001, ext, &[4u8; 2000]);
    for mut f in fragment_v4(&reply, 1024) {
        snat.inbound(&mut f, now).unwrap();
        assert_eq!(dst4(&f), CLIENT);
        assert_checksums_valid(&f);
    }

    // A later fragment of a datagram whose first fragment never came is dropped, and so is one that
    // arrives after the fragment timeout.
    let stray = Builder::v4(SERVER.octets(), SNAT.octets()).ident(0x9999).udp(9001, ext, &[5u8; 2000]);
    let mut later = fragment_v4(&stray, 1024).pop().unwrap();
    assert_eq!(snat.inbound(&mut later, now), Err(DropReason::FragmentWithoutState));
    let mut late = fragment_v4(&reply, 1024).pop().unwrap();
    assert_eq!(snat.inbound(&mut late, now + secs(6)), Err(DropReason::FragmentWithoutState));
}

#[test]
fn ipv6_fragments_follow_their_first_fragment() {
    let now = Instant::now();
    let mut snat = engine(now);
    let datagram = Builder::v6(client6().octets(), server6().octets()).udp(9000, 9001, &[3u8; 3000]);
    for mut f in fragment_v6(&datagram, 1232, 0xabcdef) {
        snat.outbound(&mut f, now).unwrap();
        assert_eq!(src6(&f), snat6());
    }
    let mut stray = fragment_v6(&datagram, 1232, 0x1111).pop().unwrap();
    assert_eq!(snat.outbound(&mut stray, now), Err(DropReason::FragmentWithoutState));
}

#[test]
fn timeouts_follow_protocol_and_tcp_state() {
    let t0 = Instant::now();
    let mut snat = engine(t0);
    // UDP: five minutes idle.
    let mut u = Builder::v4(CLIENT.octets(), SERVER.octets()).udp(1111, 53, b"");
    snat.outbound(&mut u, t0).unwrap();
    // TCP that never got an answer: transitory, four minutes.
    open_tcp(&mut snat, CLIENT, 2222, t0);
    // TCP established both ways: two hours four minutes.
    let ext = open_tcp(&mut snat, CLIENT, 3333, t0);
    let mut synack = Builder::v4(SERVER.octets(), SNAT.octets()).tcp(443, ext, TCP_SYN | TCP_ACK, b"");
    snat.inbound(&mut synack, t0).unwrap();
    assert_eq!(snat.flows(), 3);

    snat.handle_timeout(t0 + secs(239));
    assert_eq!(snat.flows(), 3);
    snat.handle_timeout(t0 + secs(241));
    assert_eq!(snat.flows(), 2, "half-open TCP gone after 240 s");
    snat.handle_timeout(t0 + secs(301));
    assert_eq!(snat.flows(), 1, "UDP gone after 300 s");
    snat.handle_timeout(t0 + secs(7439));
    assert_eq!(snat.flows(), 1, "established TCP lives at least 2 h 4 min");

    // Traffic refreshes it; a FIN moves it to the transitory timeout.
    let mut data = Builder::v4(CLIENT.octets(), SERVER.octets()).tcp(3333, 443, TCP_ACK, b"more");
    snat.outbound(&mut data, t0 + secs(7000)).unwrap();
    snat.handle_timeout(t0 + secs(7441));
    assert_eq!(snat.flows(), 1, "refreshed at 7000 s");
    let mut fin = Builder::v4(CLIENT.octets(), SERVER.octets()).tcp(3333, 443, TCP_FIN | TCP_ACK, b"");
    snat.outbound(&mut fin, t0 + secs(7500)).unwrap();
    snat.handle_timeout(t0 + secs(7500 + 241));
    assert_eq!(snat.flows(), 0, "closing TCP gone after the transitory timeout");
    assert_eq!(snat.mappings(), 0, "ports returned to the pool");
    assert_eq!(snat.poll_timeout(), None);
    assert_eq!(snat.counters().flows_expired, 3);
}

#[test]
fn a_reply_after_expiry_is_unsolicited_even_before_the_sweep() {
    let t0 = Instant::now();
    let mut snat = engine(t0);
    let mut u = Builder::v4(CLIENT.octets(), SERVER.octets()).udp(1111, 53, b"");
    snat.outbound(&mut u, t0).unwrap();
    let ext = u16_at(&u, 20);
    let mut r = Builder::v4(SERVER.octets(), SNAT.octets()).udp(53, ext, b"");
    assert_eq!(snat.inbound(&mut r, t0 + secs(301)), Err(DropReason::Unsolicited));
}

#[test]
fn a_long_idle_gap_expires_everything_in_one_pass() {
    let t0 = Instant::now();
    let mut snat = engine(t0);
    for port in 2000..2100 {
        open_tcp(&mut snat, CLIENT, port, t0 + secs(u64::from(port) * 37));
    }
    let day = t0 + secs(86_400 * 3);
    for _ in 0..10 {
        snat.handle_timeout(day);
    }
    assert_eq!(snat.flows(), 0);
    assert_eq!(snat.mappings(), 0);
}

#[test]
fn full_pool_refuses_new_mappings_and_keeps_old_ones() {
    let now = Instant::now();
    let mut config = SnatConfig::new(Some(SNAT), None);
    config.ports = 40000..=40001;
    config.source_share = 1; // the table's own limit, not one source's share
    let mut snat = Snat::new(config, now).unwrap();
    let a = open_tcp(&mut snat, CLIENT, 1000, now);
    let b = open_tcp(&mut snat, CLIENT, 1001, now);
    let mut p = Builder::v4(CLIENT.octets(), SERVER.octets()).tcp(1002, 443, TCP_SYN, b"");
    assert_eq!(snat.outbound(&mut p, now), Err(DropReason::PoolExhausted));
    assert_eq!(snat.counters().dropped(DropReason::PoolExhausted), 1);
    // A new flow from an endpoint that already has a mapping needs no new port.
    let mut p = Builder::v4(CLIENT.octets(), SERVER2.octets()).tcp(1000, 443, TCP_SYN, b"");
    snat.outbound(&mut p, now).unwrap();
    assert_eq!(u16_at(&p, 20), a);
    // Existing flows still pass both ways.
    for (port, ext) in [(1000, a), (1001, b)] {
        let mut r = Builder::v4(SERVER.octets(), SNAT.octets()).tcp(443, ext, TCP_ACK, b"");
        snat.inbound(&mut r, now).unwrap();
        assert_eq!(u16_at(&r, 22), port);
    }
    // UDP has a pool of its own.
    let mut u = Builder::v4(CLIENT.octets(), SERVER.octets()).udp(1002, 53, b"");
    snat.outbound(&mut u, now).unwrap();
}

#[test]
fn full_table_refuses_new_flows_and_recovers_after_expiry() {
    let t0 = Instant::now();
    let mut config = SnatConfig::new(Some(SNAT), None);
    config.max_flows = 2;
    config.source_share = 1; // the table's own limit, not one source's share
    let mut snat = Snat::new(config, t0).unwrap();
    open_tcp(&mut snat, CLIENT, 1000, t0);
    open_tcp(&mut snat, CLIENT, 1001, t0);
    let mut p = Builder::v4(CLIENT.octets(), SERVER.octets()).tcp(1002, 443, TCP_SYN, b"");
    assert_eq!(snat.outbound(&mut p.clone(), t0), Err(DropReason::TableFull));
    assert_eq!(snat.counters().dropped(DropReason::TableFull), 1);
    // Once the half-open flows time out, a new flow reclaims room without a separate timer call.
    snat.outbound(&mut p, t0 + secs(241)).unwrap();
}

#[test]
fn refusals_are_counted_by_reason() {
    let now = Instant::now();
    let mut snat = Snat::new(SnatConfig::new(Some(SNAT), None), now).unwrap();
    let mut gre = Builder::v4(CLIENT.octets(), SERVER.octets()).ip(47, &[0u8; 24]);
    assert_eq!(snat.outbound(&mut gre, now), Err(DropReason::UnsupportedProtocol));
    let mut v6 = Builder::v6(client6().octets(), server6().octets()).udp(1, 2, b"");
    assert_eq!(snat.outbound(&mut v6, now), Err(DropReason::NoAddressForFamily));
    let mut elsewhere = Builder::v4(SERVER.octets(), CLIENT.octets()).udp(1, 2, b"");
    assert_eq!(snat.inbound(&mut elsewhere, now), Err(DropReason::NotForSnatAddress));
    let mut rst = Builder::v4(CLIENT.octets(), SERVER.octets()).tcp(5, 6, TCP_RST, b"");
    assert_eq!(snat.outbound(&mut rst, now), Err(DropReason::OrphanReset));
    let mut redirect = Builder::v4(CLIENT.octets(), SERVER.octets()).icmp_error(5, 1, 0, &[0u8; 28]);
    assert_eq!(snat.outbound(&mut redirect, now), Err(DropReason::UnsupportedIcmp));
    assert_eq!(snat.outbound(&mut [0x45, 0, 0], now), Err(DropReason::Malformed));
    let c = snat.counters();
    assert_eq!(c.drops_total(), 6);
    assert_eq!(snat.flows(), 0, "no refusal leaves state behind");
}

#[test]
fn bad_configs_are_refused() {
    let now = Instant::now();
    assert!(Snat::new(SnatConfig::new(None, None), now).is_err());
    let mut c = SnatConfig::new(Some(SNAT), None);
    c.ports = 0..=10;
    assert!(Snat::new(c.clone(), now).is_err());
    c.ports = core::ops::RangeInclusive::new(10, 9);
    assert!(Snat::new(c.clone(), now).is_err());
    c.ports = 10..=10;
    c.timeouts.udp = 0;
    assert!(Snat::new(c, now).is_err());
}

#[test]
#[should_panic(expected = "TCP checksum")]
fn the_checksum_oracle_catches_a_wrong_checksum() {
    let mut p = Builder::v4(CLIENT.octets(), SERVER.octets()).tcp(1, 2, TCP_SYN, b"data");
    p[36] ^= 0x01;
    assert_checksums_valid(&p);
}

#[test]
fn an_outbound_icmp_error_must_go_to_the_sender_of_what_it_quotes() {
    let now = Instant::now();
    let mut snat = engine(now);
    let mut q = Builder::v4(CLIENT.octets(), SERVER.octets()).udp(5000, 53, b"q");
    snat.outbound(&mut q, now).unwrap();
    let ext = u16_at(&q, 20);
    let reply = Builder::v4(SERVER.octets(), CLIENT.octets()).udp(53, 5000, b"a");
    // Another mesh host forges "fragmentation needed" about CLIENT's flow, addressed elsewhere.
    let mut forged = Builder::v4(CLIENT2.octets(), SERVER2.octets()).icmp_error(3, 4, 552, &reply);
    assert_eq!(snat.outbound(&mut forged, now), Err(DropReason::IcmpErrorWithoutSession));
    // The same error about an expired flow is refused too.
    let mut late = Builder::v4(CLIENT.octets(), SERVER.octets()).icmp_error(3, 3, 0, &reply);
    assert_eq!(snat.outbound(&mut late, now + secs(400)), Err(DropReason::IcmpErrorWithoutSession));
    let _ = ext;
}

#[test]
fn ipv6_later_fragments_match_when_an_extension_header_follows_the_fragment_header() {
    let now = Instant::now();
    let mut snat = engine(now);
    let datagram = Builder::v6(client6().octets(), server6().octets()).udp(9000, 9001, &[3u8; 300]);
    // Put a destination-options header in the fragmentable part: Frag(next=60) -> DestOpts(next=17) -> UDP.
    let mut with_opts = datagram[..40].to_vec();
    with_opts[6] = 60;
    with_opts.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
    with_opts.extend_from_slice(&datagram[40..]);
    let payload = (with_opts.len() - 40) as u16;
    with_opts[4..6].copy_from_slice(&payload.to_be_bytes());
    let mut frags = fragment_v6(&with_opts, 128, 0x5151);
    assert!(frags.len() >= 3);
    for f in &mut frags {
        snat.outbound(f, now).unwrap();
        assert_eq!(src6(f), snat6());
    }
}

#[test]
fn repeated_first_fragments_use_one_entry() {
    let now = Instant::now();
    let mut config = SnatConfig::new(Some(SNAT), None);
    config.max_fragments = 2;
    config.source_share = 1; // the table's own limit, not one source's share
    let mut snat = Snat::new(config, now).unwrap();
    let datagram = Builder::v4(CLIENT.octets(), SERVER.octets()).ident(1).udp(9000, 9001, &[3u8; 300]);
    let first = fragment_v4(&datagram, 128).remove(0);
    for _ in 0..1000 {
        snat.outbound(&mut first.clone(), now).unwrap();
    }
    assert_eq!(snat.pending_fragments(), 1);
    // Two datagrams in flight fill the table; a third is refused without creating a flow.
    let other = Builder::v4(CLIENT.octets(), SERVER.octets()).ident(2).udp(9002, 9001, &[3u8; 300]);
    snat.outbound(&mut fragment_v4(&other, 128).remove(0), now).unwrap();
    let third = Builder::v4(CLIENT.octets(), SERVER.octets()).ident(3).udp(9003, 9001, &[3u8; 300]);
    let flows = snat.flows();
    assert_eq!(snat.outbound(&mut fragment_v4(&third, 128).remove(0), now), Err(DropReason::FragmentTableFull));
    assert_eq!(snat.flows(), flows, "a refused first fragment leaves no flow behind");
    // Once the first two have timed out there is room again.
    snat.outbound(&mut fragment_v4(&third, 128).remove(0), now + secs(6)).unwrap();
}

/// Regression (security review M3): one peer took every external port, every flow slot or every fragment
/// slot of a router, and new flows from every other peer were refused.
#[test]
fn one_source_cannot_exhaust_the_ports_flows_or_fragment_slots_of_every_other() {
    let now = Instant::now();
    let greedy = Ipv4Addr::new(100, 64, 0, 66);
    let mut config = SnatConfig::new(Some(SNAT), None);
    config.ports = 1024..=1087; // 64 ports: a share of 4 is 16 per source
    config.max_flows = 64;
    config.max_fragments = 8;
    config.source_share = 4;
    let mut snat = Snat::new(config, now).unwrap();

    // Ports: UDP from many source ports, one mapping each.
    let refused = (0..64u16)
        .filter(|i| {
            let mut p = Builder::v4(greedy.octets(), SERVER.octets()).udp(20000 + i, 53, b"q");
            snat.outbound(&mut p, now) == Err(DropReason::SourceOverQuota)
        })
        .count();
    assert_eq!(refused, 48, "16 mappings and no more");
    let mut fair = Builder::v4(CLIENT.octets(), SERVER.octets()).udp(5353, 53, b"q");
    assert_eq!(snat.outbound(&mut fair, now), Ok(()), "another peer still gets a port");

    // Flows: one TCP port to many remote ports shares one mapping but not the flow share.
    let refused = (0..32u16)
        .filter(|i| {
            let mut p = Builder::v4([100, 64, 0, 67], SERVER.octets()).tcp(40000, 1000 + i, TCP_SYN, b"");
            snat.outbound(&mut p, now) == Err(DropReason::SourceOverQuota)
        })
        .count();
    assert_eq!(refused, 16, "16 flows and no more");

    // Fragment slots: first fragments of distinct datagrams.
    let refused = (0..6u16)
        .filter(|i| {
            let datagram = Builder::v4([100, 64, 0, 68], SERVER.octets()).ident(100 + i).udp(7000, 53, &[0; 2000]);
            let mut first = fragment_v4(&datagram, 1280).remove(0);
            snat.outbound(&mut first, now) == Err(DropReason::SourceOverQuota)
        })
        .count();
    assert_eq!(refused, 4, "2 datagrams in flight and no more");
    assert_eq!(snat.counters().dropped(DropReason::SourceOverQuota), 48 + 16 + 4, "refusals are counted");
}

/// A peer named as the owner is held to one share across every source address it sends from.
#[test]
fn one_owner_gets_one_share_whatever_addresses_it_uses() {
    let now = Instant::now();
    let mut config = SnatConfig::new(Some(SNAT), None);
    config.ports = 1024..=1087;
    config.source_share = 4;
    let mut snat = Snat::new(config, now).unwrap();
    let sent = |snat: &mut Snat, host: u8, owner: u64| {
        let mut p = Builder::v4([192, 168, 50, host], SERVER.octets()).udp(5000, 53, b"q");
        snat.outbound_from(&mut p, now, owner)
    };
    let refused = (1..=40u8).filter(|h| sent(&mut snat, *h, 7) == Err(DropReason::SourceOverQuota)).count();
    assert_eq!(refused, 24, "16 mappings for owner 7 across 40 addresses");
    assert_eq!(sent(&mut snat, 41, 8), Ok(()), "another owner has its own share");
}
