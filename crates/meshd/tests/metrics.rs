//! Metrics end to end: the coordination server's and the nodes' `--metrics` endpoints scraped while real
//! nodes join, a route is approved and traffic crosses a router; the numbers must move with what happens.
//! docs/metrics.md lists every metric.

use std::time::Duration;

use common::managed::{Control, Node};
use mesh_netns::{Lab, stdout, wait_until};

mod common;

/// One scrape of `url`, from inside namespace `ns`.
fn scrape(lab: &Lab, ns: usize, url: &str) -> String {
    let out = lab.ns(ns).exec("curl", &["-sS", "--max-time", "5", url]);
    assert!(out.status.success(), "scraping {url}: {}", String::from_utf8_lossy(&out.stderr));
    stdout(&out)
}

/// The value of the sample whose name and labels are exactly `series`.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn the_server_and_node_metrics_move_with_what_happens() {
    let mut lab = Lab::new("met");
    let hub = lab.netns("cs");
    let hosts: Vec<usize> = (0..2).map(|i| lab.netns(&format!("n{i}"))).collect();
    lab.switch(hub, "10.99.0.1/24", &[(hosts[0], "10.99.0.2/24"), (hosts[1], "10.99.0.3/24")]);
    let control = Control::start_with(&mut lab, hub, "10.99.0.1", None, &["--metrics", "10.99.0.1:9090"]);
    let url = "http://10.99.0.1:9090/metrics";

    let before = scrape(&lab, hub, url);
    assert_eq!(value(&before, "meshd_control_nodes{state=\"online\"}"), Some(0.0), "{before}");
    assert!(before.ends_with("# EOF\n"));

    let key = control.authkey(&lab, &["--reusable"]);
    let lan = lab.netns("lan");
    lab.link(hosts[0], "10.77.0.1/24", lan, "10.77.0.2/24");
    lab.ns(hosts[0]).exec_ok("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    let router = Node::start_with_env(&mut lab, hosts[0], "router", &[("MESHD_METRICS", "10.99.0.2:9101")]);
    let client = Node::start_with_env(&mut lab, hosts[1], "client", &[("MESHD_METRICS", "10.99.0.3:9101")]);
    router.up(&lab, &control, &key, &["--advertise-routes", "10.77.0.0/24", "--snat-address", "10.77.0.9"]);
    client.up(&lab, &control, &key, &["--accept-routes"]);
    let joined = scrape(&lab, hub, url);
    assert_eq!(value(&joined, "meshd_control_nodes{state=\"online\"}"), Some(2.0), "{joined}");
    let registered =
        "meshd_control_http_request_duration_seconds_count{route=\"/api/v1/register\",method=\"POST\",status=\"2xx\"}";
    assert_eq!(value(&joined, registered), Some(2.0), "{joined}");
    assert!(value(&joined, "meshd_control_long_polls").is_some_and(|n| n >= 2.0), "each node waits in a long poll");
    let builds = value(&joined, "meshd_control_netmap_build_seconds_count").unwrap();
    let version = value(&joined, "meshd_control_netmap_version").unwrap();

    let (status, _, err) = control.admin(&lab, &["routes", "approve", "router", "10.77.0.0/24"]);
    assert_eq!(status, Some(0), "{err}");
    assert!(wait_until(Duration::from_secs(5), Duration::from_millis(50), || client
        .table52(&lab)
        .contains("10.77.0.0/24")));
    let approved = scrape(&lab, hub, url);
    assert!(value(&approved, "meshd_control_netmap_version").unwrap() > version, "{approved}");
    assert!(value(&approved, "meshd_control_netmap_build_seconds_count").unwrap() > builds, "{approved}");
    let approvals = "meshd_control_http_request_duration_seconds_count{route=\"/api/v1/admin/routes/approve\",method=\"POST\",status=\"2xx\"}";
    assert_eq!(value(&approved, approvals), Some(1.0), "{approved}");
    for secret in [key.as_str(), "router"] {
        assert!(!approved.contains(secret), "{secret} in the metrics");
    }

    // The nodes: traffic through the router shows per peer; a packet for no peer is a drop by reason.
    assert!(lab.ns(hosts[1]).ping("10.77.0.2"), "no traffic through the router");
    let _ = lab.ns(hosts[1]).exec("ping", &["-c", "2", "-i", "0.2", "-W", "1", "100.64.0.99"]);
    let router_text = scrape(&lab, hosts[0], "http://10.99.0.2:9101/metrics");
    let client_text = scrape(&lab, hosts[1], "http://10.99.0.3:9101/metrics");
    let from_client = value(&router_text, "meshd_peer_receive_packets_total{peer=\"client\"}").unwrap_or(0.0);
    assert!(from_client >= 1.0, "{router_text}");
    assert!(value(&router_text, "meshd_peer_receive_bytes_total{peer=\"client\"}").unwrap_or(0.0) > 0.0);
    assert_eq!(value(&router_text, "meshd_peer_path{peer=\"client\",path=\"direct\"}"), Some(1.0), "{router_text}");
    assert!(value(&router_text, "meshd_peer_handshake_age_seconds{peer=\"client\"}").is_some_and(|s| s < 60.0));
    let no_route = "meshd_dropped_packets_total{layer=\"node\",reason=\"no_route\"}";
    assert!(value(&client_text, no_route).unwrap_or(0.0) >= 1.0, "{client_text}");
    assert!(value(&client_text, "meshd_peer_transmit_packets_total{peer=\"router\"}").unwrap_or(0.0) >= 1.0);
    assert_eq!(value(&client_text, "meshd_peers"), Some(1.0));
    assert!(client_text.ends_with("# EOF\n"));
    // SNAT: the ping's flow and its mapping, in a pool of 3 protocols x the port range.
    assert!(value(&router_text, "meshd_snat_flows_created_total").unwrap_or(0.0) >= 1.0, "{router_text}");
    assert_eq!(value(&router_text, "meshd_snat_packets_total{direction=\"outbound\"}").map(|n| n >= 1.0), Some(true));
    assert!(value(&router_text, "meshd_snat_mapping_capacity").unwrap_or(0.0) > 1000.0);

    // Every metric the alert rules and the dashboard use is one a scrape above has.
    let seen: String = [before.as_str(), approved.as_str(), router_text.as_str(), client_text.as_str()].concat();
    for file in ["deploy/monitoring/prometheus-rules.yaml", "deploy/monitoring/grafana-dashboard.json"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        let mut names: Vec<&str> = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("meshd_"))
            .collect();
        names.dedup();
        assert!(!names.is_empty(), "{file} uses no metric");
        for name in names {
            assert!(seen.lines().any(|l| l.starts_with(name)), "{file} uses {name}, which no scrape has");
        }
    }
}
