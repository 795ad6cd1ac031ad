//! MagicDNS end to end, through the real coordination server (seed 000's story): a node whose hostname is
//! `orchestrator.dev.cwiq.io` is found by name from another node whose resolv.conf meshd points at the mesh's
//! resolver (direct mode; each namespace has its own resolv.conf, which `ip netns exec` mounts); `dig` asks
//! 100.100.100.100 for A, AAAA, PTR and a name nobody has; an extra record answers with a mesh IP; the
//! company zone is answered by a real dnsmasq inside VPC A, reached through the subnet router with SNAT;
//! other names still resolve through the host's own resolver; and the original resolv.conf comes back
//! byte for byte on `down`, on SIGTERM, and after SIGKILL.

use std::time::Duration;

use common::managed::{Node, switched_mesh};
use mesh_netns::{Lab, stdout, wait_until};

mod common;

/// The client host's own resolv.conf, as DHCP would leave it: its resolver is a dnsmasq beside the server.
const CLIENT_RESOLV_CONF: &str = "# from DHCP\nnameserver 10.99.0.1\nsearch corp.test\noptions ndots:1\n";

fn wait(limit_ms: u64, check: impl FnMut() -> bool) -> bool {
    wait_until(Duration::from_millis(limit_ms), Duration::from_millis(100), check)
}

/// A dnsmasq in `ns` on `listen`, answering `records` (`name/address`) and nothing else.
fn dnsmasq(lab: &mut Lab, ns: usize, name: &str, listen: &str, records: &[&str]) -> usize {
    let mut args = vec![
        "--keep-in-foreground".to_string(),
        "--conf-file=/dev/null".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--bind-interfaces".into(),
        format!("--listen-address={listen}"),
        "--pid-file=".into(),
        "--user=root".into(),
        "--log-queries".into(),
        "--log-facility=-".into(),
    ];
    args.extend(records.iter().map(|r| format!("--address=/{r}")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = lab.spawn(ns, name, "dnsmasq", &args, &[]);
    let listening = format!("{listen}:53");
    assert!(
        wait(5000, || stdout(&lab.ns(ns).exec("ss", &["-lun"])).contains(&listening)),
        "dnsmasq did not start:\n{}",
        lab.process(p).log_text()
    );
    p
}

/// `dig @SERVER ARGS +short` (or the full answer without +short).
fn dig(lab: &Lab, ns: usize, args: &[&str]) -> String {
    let mut all = vec!["+time=2", "+tries=2"];
    all.extend_from_slice(args);
    stdout(&lab.ns(ns).exec("dig", &all)).trim().to_string()
}

fn getent(lab: &Lab, ns: usize, database: &str, name: &str) -> String {
    stdout(&lab.ns(ns).exec("getent", &[database, name])).trim().to_string()
}

#[test]
fn seed_000_names_split_dns_and_extra_records_resolve_and_the_original_resolv_conf_comes_back() {
    let (mut lab, control, hosts) = switched_mesh("dns", 3, None);
    let vpc = lab.netns("vpc");
    lab.link(hosts[2], "10.0.0.1/24", vpc, "10.0.0.2/24");
    // The host's own resolver (beside the server) and the company's (inside VPC A).
    dnsmasq(&mut lab, control.ns, "dnsmasq-upstream", "10.99.0.1", &["www.example.test/192.0.2.80"]);
    let vpc_resolver = dnsmasq(&mut lab, vpc, "dnsmasq-vpc", "10.0.0.2", &["sso.shared.cwiq.io/10.0.12.50"]);
    lab.ns(hosts[0]).set_resolv_conf(CLIENT_RESOLV_CONF);

    let mut client = Node::start(&mut lab, hosts[0], "client");
    let orchestrator = Node::start(&mut lab, hosts[1], "orch");
    let router = Node::start(&mut lab, hosts[2], "router");
    let key = control.authkey(&lab, &["--reusable"]);
    let (status, _, err) = orchestrator.cli(
        &lab,
        &[
            "up",
            "--control-url",
            &control.url,
            "--ca-cert",
            &control.ca,
            "--auth-key",
            &key,
            "--hostname",
            "orchestrator.dev.cwiq.io",
        ],
    );
    assert_eq!(status, Some(0), "up: {err}");
    router.up(&lab, &control, &key, &["--advertise-routes", "10.0.0.0/16", "--snat-address", "10.0.0.9"]);
    let (status, _, err) = control.admin(&lab, &["routes", "approve", "router", "10.0.0.0/16"]);
    assert_eq!(status, Some(0), "approve: {err}");
    client.up(&lab, &control, &key, &["--accept-routes"]);

    let orch = orchestrator.status(&lab)["node"].clone();
    assert_eq!(orch["name"], "orchestrator-dev-cwiq-io", "dots become dashes");
    let (orch_v4, orch_v6) = (orch["ipv4"].as_str().unwrap().to_string(), orch["ipv6"].as_str().unwrap().to_string());

    // Direct mode: the client's resolv.conf points at the resolver, the host's search list kept after ours.
    assert!(wait(5000, || lab.ns(client.ns).resolv_conf().contains("nameserver 100.100.100.100")));
    let written = lab.ns(client.ns).resolv_conf();
    assert!(written.contains("search mesh.internal corp.test\n") && written.contains("options ndots:1\n"), "{written}");
    assert!(!written.contains("10.99.0.1"), "{written}");

    // Names, as any program on the host resolves them.
    assert!(wait(5000, || getent(&lab, client.ns, "ahostsv4", "orchestrator-dev-cwiq-io").contains(&orch_v4)));
    let hosts_line = getent(&lab, client.ns, "hosts", "orchestrator-dev-cwiq-io");
    assert!(hosts_line.contains(&orch_v4) || hosts_line.contains(&orch_v6), "getent hosts: {hosts_line}");
    assert!(
        lab.ns(client.ns)
            .exec("ping", &["-c", "1", "-W", "3", "orchestrator-dev-cwiq-io.mesh.internal"])
            .status
            .success()
    );

    // The resolver itself, record by record.
    let at = "@100.100.100.100";
    assert_eq!(dig(&lab, client.ns, &[at, "orchestrator-dev-cwiq-io.mesh.internal", "A", "+short"]), orch_v4);
    assert_eq!(dig(&lab, client.ns, &[at, "orchestrator-dev-cwiq-io.mesh.internal", "AAAA", "+short"]), orch_v6);
    assert_eq!(dig(&lab, client.ns, &[at, "-x", &orch_v4, "+short"]), "orchestrator-dev-cwiq-io.mesh.internal.");
    assert_eq!(dig(&lab, client.ns, &[at, "-x", &orch_v6, "+short"]), "orchestrator-dev-cwiq-io.mesh.internal.");
    let missing = dig(&lab, client.ns, &[at, "nobody.mesh.internal", "A"]);
    assert!(missing.contains("status: NXDOMAIN") && missing.contains("SOA"), "{missing}");
    let nodata = dig(&lab, client.ns, &[at, "orchestrator-dev-cwiq-io.mesh.internal", "MX"]);
    assert!(nodata.contains("status: NOERROR") && nodata.contains("ANSWER: 0") && nodata.contains("SOA"), "{nodata}");
    // Over IPv6 too, at the mesh /48's ::53.
    let v6_resolver = format!("@{}", dig_v6_resolver(&orch_v6));
    assert_eq!(dig(&lab, client.ns, &[&v6_resolver, "orchestrator-dev-cwiq-io.mesh.internal", "A", "+short"]), orch_v4);

    // Not mesh names: the host's own resolver still answers them.
    assert!(getent(&lab, client.ns, "ahostsv4", "www.example.test").contains("192.0.2.80"));

    // Split DNS and an extra record, set on the server and on the node within seconds.
    // Sixty addresses under one name: an answer too big for UDP, which dig then asks again over TCP.
    let big: Vec<String> =
        (0..60).map(|i| format!(r#"{{"name": "big.cwiq.io", "type": "A", "value": "100.64.1.{i}"}}"#)).collect();
    let settings = format!(
        r#"{{
          // seed 000: the company zone is answered inside VPC A; LangFuse's private name is a mesh IP
          "nameservers": {{"split": {{"shared.cwiq.io": ["10.0.0.2"]}}}},
          "extra_records": [{{"name": "langfuse.cwiq.io", "type": "A", "value": "{orch_v4}"}}, {}],
        }}"#,
        big.join(", ")
    );
    let file = lab.write("dns.hujson", &settings);
    let (status, out, err) = control.admin(&lab, &["dns", "set", file.to_str().unwrap()]);
    assert_eq!(status, Some(0), "dns set: {err}");
    assert_eq!(out, "DNS settings set (version 1)");
    assert!(wait(3000, || dig(&lab, client.ns, &[at, "langfuse.cwiq.io", "+short"]) == orch_v4), "the extra record");
    assert!(
        wait(5000, || getent(&lab, client.ns, "ahostsv4", "sso.shared.cwiq.io").contains("10.0.12.50")),
        "the split zone through the router: {}",
        dig(&lab, client.ns, &[at, "sso.shared.cwiq.io"])
    );
    // DNS over TCP: asked directly, after a truncated UDP answer, and for a forwarded name.
    assert_eq!(dig(&lab, client.ns, &[at, "+tcp", "orchestrator-dev-cwiq-io.mesh.internal", "+short"]), orch_v4);
    let udp_only = dig(&lab, client.ns, &[at, "+noedns", "+ignore", "big.cwiq.io"]);
    assert!(udp_only.contains(" tc") && udp_only.contains("ANSWER: 0"), "UDP truncates: {udp_only}");
    assert_eq!(
        dig(&lab, client.ns, &[at, "+noedns", "big.cwiq.io", "+short"]).lines().count(),
        60,
        "dig retried over TCP"
    );
    assert_eq!(dig(&lab, client.ns, &[at, "+tcp", "www.example.test", "+short"]), "192.0.2.80");
    assert_eq!(dig(&lab, client.ns, &[at, "+tcp", "sso.shared.cwiq.io", "+short"]), "10.0.12.50");
    let (_, query, err) = client.cli(&lab, &["dns", "query", "sso.shared.cwiq.io"]);
    assert!(query.contains("10.0.12.50") && query.contains("10.0.0.2:53"), "{query}{err}");
    let (_, status_text, _) = client.cli(&lab, &["dns", "status"]);
    assert!(
        status_text.contains("mode: direct") && status_text.contains("split: shared.cwiq.io -> 10.0.0.2:53"),
        "{status_text}"
    );
    let (_, doctor, _) = client.cli(&lab, &["doctor", "--tun", &client.tun]);
    assert!(doctor.contains("dns") && doctor.contains("direct: resolv.conf points at the mesh's resolver"), "{doctor}");
    let (_, got, _) = control.admin(&lab, &["dns", "get"]);
    assert!(got.contains("langfuse.cwiq.io"));

    // The original comes back byte for byte: on down, on SIGTERM, and after SIGKILL (at the next start).
    let (status, _, err) = client.cli(&lab, &["down"]);
    assert_eq!(status, Some(0), "down: {err}");
    assert!(wait(3000, || lab.ns(client.ns).resolv_conf() == CLIENT_RESOLV_CONF), "down restores");
    client.up(&lab, &control, &key, &["--accept-routes"]);
    assert!(wait(5000, || lab.ns(client.ns).resolv_conf().contains("100.100.100.100")));
    lab.process(client.process).stop(Duration::from_secs(10));
    assert_eq!(lab.ns(client.ns).resolv_conf(), CLIENT_RESOLV_CONF, "SIGTERM restores");
    client.restart(&mut lab, "client-again");
    assert!(wait(10_000, || lab.ns(client.ns).resolv_conf().contains("100.100.100.100")), "a restart takes it again");
    lab.process(client.process).kill();
    assert!(lab.ns(client.ns).resolv_conf().contains("100.100.100.100"), "SIGKILL leaves meshd's file");
    client.restart(&mut lab, "client-after-kill");
    assert!(lab.process(client.process).log_text().contains("put back the resolv.conf a stopped meshd left"));
    let (status, _, err) = client.cli(&lab, &["down"]);
    assert_eq!(status, Some(0), "down: {err}");
    assert!(wait(3000, || lab.ns(client.ns).resolv_conf() == CLIENT_RESOLV_CONF), "the backup survived the crash");
    // --accept-dns=false leaves the host alone, and the resolver still answers at its address.
    client.up(&lab, &control, &key, &["--accept-routes", "--accept-dns=false"]);
    assert_eq!(lab.ns(client.ns).resolv_conf(), CLIENT_RESOLV_CONF);
    let (_, doctor, _) = client.cli(&lab, &["doctor", "--tun", &client.tun]);
    assert!(doctor.contains("off (--accept-dns=false)"), "{doctor}");
    assert!(wait(3000, || dig(&lab, client.ns, &[at, "orchestrator-dev-cwiq-io.mesh.internal", "+short"]) == orch_v4));

    // Never black-holed: with the split resolver gone only its zone fails (SERVFAIL, not silence), and with
    // the coordination server gone the last configuration keeps answering.
    lab.process(vpc_resolver).stop(Duration::from_secs(5));
    let gone = dig(&lab, client.ns, &[at, "sso.shared.cwiq.io"]);
    assert!(gone.contains("status: SERVFAIL"), "{gone}");
    assert_eq!(dig(&lab, client.ns, &[at, "www.example.test", "+short"]), "192.0.2.80");
    control.stop(&mut lab);
    assert_eq!(dig(&lab, client.ns, &[at, "orchestrator-dev-cwiq-io.mesh.internal", "+short"]), orch_v4);
    assert_eq!(dig(&lab, client.ns, &[at, "langfuse.cwiq.io", "+short"]), orch_v4);
    assert_eq!(dig(&lab, client.ns, &[at, "www.example.test", "+short"]), "192.0.2.80");
}

/// The resolver's IPv6 address: the mesh /48 of a node's address, then `::53`.
fn dig_v6_resolver(node_v6: &str) -> String {
    let ip: std::net::Ipv6Addr = node_v6.parse().unwrap();
    let s = ip.segments();
    std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0x53).to_string()
}
