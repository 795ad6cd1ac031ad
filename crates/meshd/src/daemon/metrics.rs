//! The node's metrics (`meshd daemon --metrics ADDR`), read from the data plane at each scrape by the
//! event loop, which owns it. A registry is made per scrape with every value as it is now: the counters
//! the data plane keeps are its own, so nothing is counted twice. Labels are bounded: a peer is its node
//! name (or key in static mode), a drop its reason from a fixed list; no flow or address is ever a label.

use mesh_dataplane::DropReason;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::Daemon;
use crate::config;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    peer: String,
    /// `direct` with an endpoint, `none` without (a relay comes with NAT traversal).
    path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    /// Which part refused it: `node` (WireGuard), `router`, `snat`, `filter` (the ACL), `dns`.
    layer: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

fn layer_of(reason: DropReason) -> &'static str {
    match reason {
        DropReason::NotRouted | DropReason::Hairpin | DropReason::Unforwardable => "router",
        DropReason::Snat(_) => "snat",
        DropReason::AclDenied | DropReason::AclNoFlow | DropReason::AclTableFull | DropReason::AclUnreadable => {
            "filter"
        }
        DropReason::NotDns => "dns",
        _ => "node",
    }
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g = Gauge::<i64>::default();
    g.set(value);
    registry.register(name, help, g);
}

impl Daemon {
    /// The text a scrape gets.
    pub(super) fn metrics_text(&self) -> String {
        let mut registry = Registry::default();
        let names: Vec<(String, String)> = self
            .managed
            .as_ref()
            .and_then(|m| m.netmap.as_ref())
            .map(|map| map.peers.iter().map(|p| (p.node_key.clone(), p.name.clone())).collect())
            .unwrap_or_default();
        let name_of = |key: &[u8; 32]| {
            let key = config::base64_key(key);
            names.iter().find(|(k, _)| *k == key).map_or(key, |(_, name)| name.clone())
        };

        let rx_bytes = Family::<PeerLabels, Counter>::default();
        let tx_bytes = Family::<PeerLabels, Counter>::default();
        let rx_packets = Family::<PeerLabels, Counter>::default();
        let tx_packets = Family::<PeerLabels, Counter>::default();
        let handshake_age = Family::<PeerLabels, Gauge>::default();
        let path = Family::<PathLabels, Gauge>::default();
        let peers = self.dataplane.peer_status();
        gauge(&mut registry, "meshd_peers", "Peers configured", peers.len() as i64);
        for p in peers {
            let peer = PeerLabels { peer: name_of(&p.public_key) };
            rx_bytes.get_or_create(&peer).inc_by(p.rx_bytes);
            tx_bytes.get_or_create(&peer).inc_by(p.tx_bytes);
            rx_packets.get_or_create(&peer).inc_by(p.rx_packets);
            tx_packets.get_or_create(&peer).inc_by(p.tx_packets);
            if let Some(age) = p.since_handshake {
                handshake_age.get_or_create(&peer).set(age.as_secs() as i64);
            }
            let kind = if p.endpoint.is_some() { "direct" } else { "none" };
            path.get_or_create(&PathLabels { peer: peer.peer, path: kind }).set(1);
        }
        registry.register("meshd_peer_receive_bytes", "Bytes received from each peer (decrypted)", rx_bytes);
        registry.register("meshd_peer_transmit_bytes", "Bytes sent to each peer (before encryption)", tx_bytes);
        registry.register("meshd_peer_receive_packets", "Packets received from each peer", rx_packets);
        registry.register("meshd_peer_transmit_packets", "Packets sent to each peer", tx_packets);
        registry.register(
            "meshd_peer_handshake_age_seconds",
            "Seconds since each peer's current session's handshake (absent without a session)",
            handshake_age,
        );
        registry.register("meshd_peer_path", "How each peer is reached: 1 for its path (direct or none)", path);

        let drops = Family::<DropLabels, Counter>::default();
        for reason in DropReason::ALL.into_iter().filter(|r| !matches!(r, DropReason::Snat(_))) {
            drops
                .get_or_create(&DropLabels { layer: layer_of(reason), reason: reason.name() })
                .inc_by(self.dataplane.dropped(reason));
        }
        if let Some(snat) = self.dataplane.snat() {
            let counters = snat.counters();
            for reason in mesh_packet::snat::DropReason::ALL {
                drops
                    .get_or_create(&DropLabels { layer: "snat", reason: reason.name() })
                    .inc_by(counters.dropped(reason));
            }
            let packets = Family::<DirectionLabels, Counter>::default();
            packets.get_or_create(&DirectionLabels { direction: "outbound" }).inc_by(counters.outbound);
            packets.get_or_create(&DirectionLabels { direction: "inbound" }).inc_by(counters.inbound);
            registry.register("meshd_snat_packets", "Packets the SNAT engine translated, by direction", packets);
            counter(&mut registry, "meshd_snat_flows_created", "SNAT flows opened", counters.flows_created);
            gauge(&mut registry, "meshd_snat_flows", "Live SNAT flows", snat.flows() as i64);
            gauge(
                &mut registry,
                "meshd_snat_mappings",
                "External ports (and ICMP identifiers) in use",
                snat.mappings() as i64,
            );
            gauge(
                &mut registry,
                "meshd_snat_mapping_capacity",
                "Mappings the pool holds when full (ports for TCP, UDP and ICMP, per SNAT address); use = mappings / capacity",
                snat.mapping_capacity() as i64,
            );
        }
        registry.register("meshd_dropped_packets", "Packets and datagrams refused, by layer and reason", drops);

        let filter = self.dataplane.filter();
        gauge(&mut registry, "meshd_acl_flows", "Flows the ACL filter tracks", filter.flows() as i64);
        counter(
            &mut registry,
            "meshd_acl_revoked_flows",
            "Open flows a policy change took back (reset)",
            self.dataplane.revoked_flows(),
        );

        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("writing to a String");
        text
    }
}
