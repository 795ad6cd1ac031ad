//! Metrics end to end: the coordination server's `--metrics` endpoint scraped while real nodes join and a
//! route is approved; the numbers must move with what happens. docs/metrics.md lists every metric.

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
fn the_servers_metrics_move_with_what_happens() {
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
    let router = Node::start(&mut lab, hosts[0], "router");
    let client = Node::start(&mut lab, hosts[1], "client");
    router.up(&lab, &control, &key, &["--advertise-routes", "10.77.0.0/24", "--snat-subnet-routes=false"]);
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
}
