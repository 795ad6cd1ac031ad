use super::*;
use crate::build::{Builder, Transport};

const WORKER: [u8; 4] = [100, 64, 0, 1];
const DB: [u8; 4] = [100, 64, 0, 2];

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// The db's rules in seed 003: the worker may reach 5432.
fn db_rules() -> Vec<Rule> {
    vec![Rule {
        src: vec![net("100.64.0.1/32")],
        dst: vec![DstRange { net: Some(net("100.64.0.2/32")), first: 5432, last: 5432 }],
        protos: vec![],
    }]
}

fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8, seq: u32, ack: u32) -> Vec<u8> {
    Builder::v4(src, dst).transport(Transport::Tcp { src_port: sport, dst_port: dport, seq, ack, flags }, b"")
}

fn filter_with(rules: Option<Vec<Rule>>) -> Filter {
    let mut f = Filter::new(1000);
    f.set_rules(rules);
    f
}

#[test]
fn a_rule_opens_flows_to_its_port_and_nothing_else() {
    let now = Instant::now();
    let mut db = filter_with(Some(db_rules()));
    assert_eq!(db.inbound(&tcp(WORKER, DB, 40000, 5432, TCP_SYN, 1, 0), now), Ok(()));
    assert_eq!(db.inbound(&tcp(WORKER, DB, 40000, 5432, TCP_ACK, 2, 9), now), Ok(()), "the rest of the flow");
    assert_eq!(db.inbound(&tcp(WORKER, DB, 40001, 22, TCP_SYN, 1, 0), now), Err(Drop::Denied));
    assert_eq!(
        db.inbound(&Builder::v4(WORKER, DB).udp(40000, 5432, b"x"), now),
        Ok(()),
        "default protocols include UDP"
    );
    assert_eq!(db.inbound(&Builder::v4(WORKER, DB).echo(true, 7, 1, b""), now), Ok(()), "ICMP: any open port will do");
    assert_eq!(db.inbound(&Builder::v4([100, 64, 0, 3], DB).echo(true, 7, 1, b""), now), Err(Drop::Denied));
    let denied: Vec<_> = db.recent_denied().map(|d| (d.key.local_port, d.reason)).collect();
    assert_eq!(denied, vec![(22, Drop::Denied), (7, Drop::Denied)]);
}

#[test]
fn only_a_syn_opens_and_only_replies_to_what_this_side_opened_pass() {
    let now = Instant::now();
    // The worker's own filter: nothing may reach it.
    let mut worker = filter_with(Some(vec![]));
    assert_eq!(worker.inbound(&tcp(DB, WORKER, 5432, 40000, TCP_SYN, 1, 0), now), Err(Drop::Denied));
    assert_eq!(
        worker.inbound(&tcp(DB, WORKER, 5432, 40000, TCP_ACK, 1, 0), now),
        Err(Drop::NoFlow),
        "no mid-stream entry"
    );
    assert_eq!(worker.inbound(&Builder::v4(DB, WORKER).echo(false, 9, 1, b""), now), Err(Drop::NoFlow));
    // The worker opens; the replies pass.
    worker.outbound(&tcp(WORKER, DB, 40000, 5432, TCP_SYN, 1, 0), now);
    assert_eq!(worker.inbound(&tcp(DB, WORKER, 5432, 40000, TCP_SYN | TCP_ACK, 50, 2), now), Ok(()));
    worker.outbound(&Builder::v4(WORKER, DB).udp(5353, 53, b"q"), now);
    assert_eq!(worker.inbound(&Builder::v4(DB, WORKER).udp(53, 5353, b"a"), now), Ok(()));
    assert_eq!(worker.inbound(&Builder::v4(DB, WORKER).udp(53, 5354, b"a"), now), Err(Drop::Denied));
    worker.outbound(&Builder::v4(WORKER, DB).echo(true, 9, 1, b""), now);
    assert_eq!(worker.inbound(&Builder::v4(DB, WORKER).echo(false, 9, 1, b""), now), Ok(()));
    // An ICMP error passes only when it quotes a flow this side opened.
    let sent = Builder::v4(WORKER, DB).udp(5353, 53, b"q");
    let error = Builder::v4(DB, WORKER).icmp_error(3, 3, 0, &sent);
    assert_eq!(worker.inbound(&error, now), Ok(()));
    let stranger = Builder::v4(WORKER, DB).udp(6000, 53, b"q");
    assert_eq!(worker.inbound(&Builder::v4(DB, WORKER).icmp_error(3, 3, 0, &stranger), now), Err(Drop::NoFlow));
}

#[test]
fn idle_flows_expire_by_protocol() {
    let now = Instant::now();
    let mut worker = filter_with(Some(vec![]));
    worker.outbound(&Builder::v4(WORKER, DB).udp(5353, 53, b"q"), now);
    worker.outbound(&tcp(WORKER, DB, 40000, 5432, TCP_SYN, 1, 0), now);
    worker.inbound(&tcp(DB, WORKER, 5432, 40000, TCP_SYN | TCP_ACK, 50, 2), now).unwrap();
    let later = now + OTHER_IDLE + Duration::from_secs(1);
    assert_eq!(
        worker.inbound(&Builder::v4(DB, WORKER).udp(53, 5353, b"a"), later),
        Err(Drop::Denied),
        "a new flow now"
    );
    assert_eq!(
        worker.inbound(&tcp(DB, WORKER, 5432, 40000, TCP_ACK, 51, 2), later),
        Ok(()),
        "established TCP lives 2 h"
    );
    worker.handle_timeout(later);
    assert_eq!(worker.flows(), 1);
    let much_later = later + TCP_ESTABLISHED_IDLE + Duration::from_secs(1);
    worker.handle_timeout(much_later);
    assert_eq!(worker.flows(), 0);
}

#[test]
fn narrowing_the_rules_cuts_the_flows_peers_opened_and_tells_the_opener() {
    let now = Instant::now();
    let mut db = filter_with(Some(db_rules()));
    db.inbound(&tcp(WORKER, DB, 40000, 5432, TCP_SYN, 1000, 0), now).unwrap();
    db.inbound(&tcp(WORKER, DB, 40000, 5432, TCP_ACK, 1001, 7777), now).unwrap();
    db.inbound(&Builder::v4(WORKER, DB).udp(40000, 5432, b"x"), now).unwrap();
    db.outbound(&tcp(DB, WORKER, 33000, 80, TCP_SYN, 1, 0), now);
    assert!(db.set_rules(Some(db_rules())).is_empty(), "the same rules cut nothing");
    let mut revoked = db.set_rules(Some(vec![]));
    revoked.sort_by_key(|r| r.key.proto);
    assert_eq!(revoked.len(), 2, "both flows the worker opened; not the one the db opened");
    let rst = revoked[0].notice.as_ref().unwrap();
    let layout = wire::parse(rst).unwrap();
    let l4 = &rst[layout.l4_offset..];
    assert_eq!(wire::source(rst), Some(IpAddr::from(DB)));
    assert_eq!((u16::from_be_bytes([l4[2], l4[3]]), l4[13] & TCP_RST), (40000, TCP_RST));
    assert_eq!(u32::from_be_bytes(l4[4..8].try_into().unwrap()), 7777, "in the worker's window");
    let icmp = revoked[1].notice.as_ref().unwrap();
    let layout = wire::parse(icmp).unwrap();
    assert_eq!((icmp[layout.l4_offset], icmp[layout.l4_offset + 1]), (3, 13), "administratively prohibited");
    assert_eq!(db.inbound(&tcp(WORKER, DB, 40000, 5432, TCP_ACK, 1002, 7777), now), Err(Drop::Denied));
    // The cut flows stay cut: the local end's retransmission does not reopen them from this side.
    db.outbound(&tcp(DB, WORKER, 5432, 40000, TCP_ACK, 7777, 1002), now);
    assert_eq!(db.inbound(&tcp(WORKER, DB, 40000, 5432, TCP_ACK, 1002, 7777), now), Err(Drop::Denied));
    assert!(db.set_rules(Some(vec![])).is_empty(), "and are not cut twice");
    // Until the mark expires: then the flow is simply unknown.
    let later = now + TCP_TRANSITORY_IDLE + Duration::from_secs(1);
    assert_eq!(db.inbound(&tcp(WORKER, DB, 40000, 5432, TCP_ACK, 1002, 7777), later), Err(Drop::NoFlow));
}

#[test]
fn resets_land_exactly_where_each_end_expects_the_next_byte() {
    let now = Instant::now();
    let mut db = filter_with(Some(db_rules()));
    // Opening: the worker's SYN, nothing answered yet. Its reset must acknowledge the SYN to be taken.
    db.inbound(&tcp(WORKER, DB, 40000, 5432, TCP_SYN, 1000, 0), now).unwrap();
    let cut = db.set_rules(Some(vec![]));
    let rst = cut[0].notice.as_ref().unwrap();
    let l4 = &rst[wire::parse(rst).unwrap().l4_offset..];
    assert_eq!(l4[13], TCP_RST | TCP_ACK);
    assert_eq!(u32::from_be_bytes(l4[8..12].try_into().unwrap()), 1001, "acknowledges the SYN");
    // Established with data in flight from the db: the reset starts after the last byte the db sent.
    let mut db = filter_with(Some(db_rules()));
    db.inbound(&tcp(WORKER, DB, 40001, 5432, TCP_SYN, 1000, 0), now).unwrap();
    db.outbound(&tcp(DB, WORKER, 5432, 40001, TCP_SYN | TCP_ACK, 5000, 1001), now);
    db.inbound(&tcp(WORKER, DB, 40001, 5432, TCP_ACK, 1001, 5001), now).unwrap();
    let data = Builder::v4(DB, WORKER)
        .transport(Transport::Tcp { src_port: 5432, dst_port: 40001, seq: 5001, ack: 1001, flags: TCP_ACK }, &[7; 100]);
    db.outbound(&data, now);
    let cut = db.set_rules(Some(vec![]));
    let rst = cut[0].notice.as_ref().unwrap();
    let l4 = &rst[wire::parse(rst).unwrap().l4_offset..];
    assert_eq!(u32::from_be_bytes(l4[4..8].try_into().unwrap()), 5101, "past the 100 bytes in flight");
    let local = cut[0].local_reset.as_ref().unwrap();
    let l4 = &local[wire::parse(local).unwrap().l4_offset..];
    assert_eq!(u32::from_be_bytes(l4[4..8].try_into().unwrap()), 1001, "where the db expects the worker next");
}

#[test]
fn a_closed_flow_reopens_on_a_new_syn_and_half_closed_streams_stay_established() {
    let now = Instant::now();
    let mut worker = filter_with(Some(vec![]));
    worker.outbound(&tcp(WORKER, DB, 40000, 5432, TCP_SYN, 1, 0), now);
    worker.inbound(&tcp(DB, WORKER, 5432, 40000, TCP_SYN | TCP_ACK, 500, 2), now).unwrap();
    // The worker half-closes; the db keeps streaming for hours.
    worker.outbound(&tcp(WORKER, DB, 40000, 5432, TCP_FIN | TCP_ACK, 2, 501), now);
    let hour = now + Duration::from_secs(3600);
    assert_eq!(worker.inbound(&tcp(DB, WORKER, 5432, 40000, TCP_ACK, 501, 3), hour), Ok(()), "still established");
    // Both closed, then the same ports opened again: established again, not stuck closing.
    worker.inbound(&tcp(DB, WORKER, 5432, 40000, TCP_FIN | TCP_ACK, 501, 3), hour).unwrap();
    worker.outbound(&tcp(WORKER, DB, 40000, 5432, TCP_SYN, 9000, 0), hour);
    worker.inbound(&tcp(DB, WORKER, 5432, 40000, TCP_SYN | TCP_ACK, 7000, 9001), hour).unwrap();
    let later = hour + TCP_TRANSITORY_IDLE + Duration::from_secs(60);
    assert_eq!(worker.inbound(&tcp(DB, WORKER, 5432, 40000, TCP_ACK, 7001, 9001), later), Ok(()));
}

#[test]
fn icmp_redirects_and_source_quench_are_not_errors_a_flow_receives() {
    let now = Instant::now();
    let mut worker = filter_with(Some(vec![]));
    let sent = Builder::v4(WORKER, DB).udp(5353, 53, b"q");
    worker.outbound(&sent, now);
    for msg_type in [4, 5] {
        let icmp = Builder::v4(DB, WORKER).icmp_error(msg_type, 1, 0, &sent);
        assert_eq!(worker.inbound(&icmp, now), Err(Drop::NoFlow), "type {msg_type}");
    }
}

#[test]
fn without_rules_everything_passes_and_is_tracked_for_when_rules_come() {
    let now = Instant::now();
    let mut db = filter_with(None);
    assert_eq!(db.inbound(&tcp(WORKER, DB, 40000, 22, TCP_ACK, 1, 5), now), Ok(()));
    assert_eq!(db.inbound(&[0x45, 0, 0], now), Ok(()));
    assert_eq!(db.flows(), 1);
    let revoked = db.set_rules(Some(db_rules()));
    assert_eq!(revoked.len(), 1, "the first policy cuts what it does not allow");
}

#[test]
fn a_full_table_refuses_new_flows_and_counts_them() {
    let now = Instant::now();
    let mut db = Filter::new(2);
    db.set_rules(Some(db_rules()));
    for port in [40000, 40001] {
        db.inbound(&tcp(WORKER, DB, port, 5432, TCP_SYN, 1, 0), now).unwrap();
    }
    assert_eq!(db.inbound(&tcp(WORKER, DB, 40002, 5432, TCP_SYN, 1, 0), now), Err(Drop::TableFull));
    assert_eq!(db.refused_full, 1);
    // A flow this node opens takes a peer's place: peers filling the table do not stop the node's own traffic.
    db.outbound(&tcp(DB, WORKER, 33000, 80, TCP_SYN, 1, 0), now);
    assert_eq!(db.flows(), 2);
    assert_eq!(db.inbound(&tcp(WORKER, DB, 80, 33000, TCP_SYN | TCP_ACK, 9, 2), now), Ok(()), "its reply passes");
    // Expired flows make room.
    let later = now + TCP_TRANSITORY_IDLE + Duration::from_secs(1);
    assert_eq!(db.inbound(&tcp(WORKER, DB, 40002, 5432, TCP_SYN, 1, 0), later), Ok(()));
}

#[test]
fn a_tracked_flow_costs_at_most_128_bytes() {
    // hashbrown keeps one control byte per bucket and fills at most 7/8 of them.
    let per_flow = (std::mem::size_of::<(FlowKey, Flow)>() + 1) * 8 / 7;
    assert!(per_flow <= 128, "{per_flow} bytes per flow");
}

#[test]
fn a_peer_that_leaves_takes_its_flows_and_the_local_end_is_reset() {
    let now = Instant::now();
    let mut worker = filter_with(Some(vec![]));
    worker.outbound(&tcp(WORKER, DB, 40000, 5432, TCP_SYN, 1, 0), now);
    worker.inbound(&tcp(DB, WORKER, 5432, 40000, TCP_SYN | TCP_ACK, 500, 2), now).unwrap();
    worker.outbound(&tcp(WORKER, DB, 40000, 5432, TCP_ACK, 2, 501), now);
    assert!(worker.forget_unrouted(|_| true).is_empty());
    let cut = worker.forget_unrouted(|remote| remote != IpAddr::from(DB));
    assert_eq!(cut.len(), 1);
    assert_eq!((cut[0].opener, cut[0].notice.is_none()), (Opener::Local, true), "nobody to tell at the far end");
    let reset = cut[0].local_reset.as_ref().unwrap();
    let layout = wire::parse(reset).unwrap();
    let l4 = &reset[layout.l4_offset..];
    assert_eq!((wire::source(reset), wire::destination(reset)), (Some(IpAddr::from(DB)), Some(IpAddr::from(WORKER))));
    assert_eq!(u32::from_be_bytes(l4[4..8].try_into().unwrap()), 501, "in the worker's own window");
    assert_eq!(worker.flows(), 0);
}
