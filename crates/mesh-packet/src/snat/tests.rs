use super::*;

#[test]
fn tcp_state_decides_the_timeout() {
    let t = Timeouts::default();
    let mut state = 0;
    update_tcp(&mut state, wire::TCP_SYN, Direction::Outbound);
    assert_eq!(timeout_for(state, &t), t.tcp_transitory, "half open");
    update_tcp(&mut state, wire::TCP_SYN | wire::TCP_ACK, Direction::Inbound);
    assert_eq!(timeout_for(state, &t), t.tcp_established);
    update_tcp(&mut state, wire::TCP_FIN | wire::TCP_ACK, Direction::Inbound);
    assert_eq!(timeout_for(state, &t), t.tcp_transitory, "half closed");
    // The client reuses its port for a new connection: the flow starts over.
    update_tcp(&mut state, wire::TCP_SYN, Direction::Outbound);
    assert_eq!(state, tcp::SYN_OUT);
    update_tcp(&mut state, wire::TCP_RST, Direction::Inbound);
    assert_eq!(timeout_for(state, &t), t.tcp_transitory, "reset");
}

fn timeout_for(state: u8, t: &Timeouts) -> u32 {
    let flow = table::Flow {
        int_addr: Ipv4Addr::LOCALHOST,
        remote_addr: Ipv4Addr::LOCALHOST,
        int_port: 1,
        remote_port: 1,
        ext_port: 1,
        mapping: 0,
        expires: 0,
        next_check: 0,
        proto: Proto::Tcp,
        tcp: state,
    };
    flow.timeout(t)
}
