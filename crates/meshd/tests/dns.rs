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
    // `name/address` answers that name (and its subnames) with one address; `name=address` adds one more
    // address record to the name.
    args.extend(records.iter().map(|r| match r.split_once('=') {
        Some((name, address)) => format!("--host-record={name},{address}"),
        None => format!("--address=/{r}"),
    }));
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
    // Sixty addresses under one name upstream too: too big for UDP, so meshd must fetch it over TCP.
    let mut upstream_records = vec!["www.example.test/192.0.2.80".to_string()];
    upstream_records.extend((0..60).map(|i| format!("many.example.test=192.0.2.{}", i + 100)));
    let upstream_records: Vec<&str> = upstream_records.iter().map(String::as_str).collect();
    dnsmasq(&mut lab, control.ns, "dnsmasq-upstream", "10.99.0.1", &upstream_records);
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
    // A forwarded answer the upstream truncated: meshd fetches it whole over TCP for the client's TCP retry.
    let many = dig(&lab, client.ns, &[at, "+noedns", "many.example.test", "+short"]);
    assert_eq!(many.lines().count(), 60, "{many}");
    assert_eq!(dig(&lab, client.ns, &[at, "+tcp", "sso.shared.cwiq.io", "+short"]), "10.0.12.50");
    let (_, query, err) = client.cli(&lab, &["dns", "query", "sso.shared.cwiq.io"]);
    assert!(query.contains("10.0.12.50") && query.contains("10.0.0.2:53"), "{query}{err}");
    let (_, status_text, _) = client.cli(&lab, &["dns", "status"]);
    assert!(
        status_text.contains("mode: direct") && status_text.contains("split: shared.cwiq.io -> 10.0.0.2:53"),
        "{status_text}"
    );
    let run = lab.path("client-run");
    let run = run.to_str().unwrap();
    let (_, doctor, _) = client.cli(&lab, &["doctor", "--tun", &client.tun, "--uapi-dir", run, "--run-dir", run]);
    assert!(doctor.contains("dns") && doctor.contains("direct: resolv.conf points at the mesh's resolver"), "{doctor}");
    // The resolver's routes in table 52 are meshd's own, not stale ones.
    assert!(doctor.contains("table 52 holds exactly"), "{doctor}");
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

/// What a recorded systemd-resolved was asked, one line per call.
#[derive(Clone, Default)]
struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Recorder {
    fn push(&self, line: String) {
        self.0.lock().unwrap().push(line);
    }

    fn calls(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// org.freedesktop.resolve1.Manager as systemd 252 defines the calls meshd makes, recording them.
struct FakeResolved(Recorder);

#[zbus::interface(name = "org.freedesktop.resolve1.Manager")]
impl FakeResolved {
    #[zbus(name = "SetLinkDNS")]
    fn set_link_dns(&self, ifindex: i32, addresses: Vec<(i32, Vec<u8>)>) {
        let list: Vec<String> = addresses
            .iter()
            .map(|(family, bytes)| match (family, bytes.len()) {
                (2, 4) => std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string(),
                (10, 16) => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes.as_slice()).unwrap()).to_string(),
                _ => format!("bad({family},{})", bytes.len()),
            })
            .collect();
        self.0.push(format!("SetLinkDNS {ifindex} {}", list.join(" ")));
    }

    #[zbus(name = "SetLinkDomains")]
    fn set_link_domains(&self, ifindex: i32, domains: Vec<(String, bool)>) {
        let list: Vec<String> =
            domains.iter().map(|(d, routing)| if *routing { format!("~{d}") } else { d.clone() }).collect();
        self.0.push(format!("SetLinkDomains {ifindex} {}", list.join(" ")));
    }

    #[zbus(name = "SetLinkDefaultRoute")]
    fn set_link_default_route(&self, ifindex: i32, enable: bool) {
        self.0.push(format!("SetLinkDefaultRoute {ifindex} {enable}"));
    }

    #[zbus(name = "SetLinkLLMNR")]
    fn set_link_llmnr(&self, ifindex: i32, mode: String) {
        self.0.push(format!("SetLinkLLMNR {ifindex} {mode}"));
    }

    #[zbus(name = "SetLinkMulticastDNS")]
    fn set_link_multicast_dns(&self, ifindex: i32, mode: String) {
        self.0.push(format!("SetLinkMulticastDNS {ifindex} {mode}"));
    }

    #[zbus(name = "SetLinkDNSSEC")]
    fn set_link_dnssec(&self, ifindex: i32, mode: String) {
        self.0.push(format!("SetLinkDNSSEC {ifindex} {mode}"));
    }

    #[zbus(name = "FlushCaches")]
    fn flush_caches(&self) {
        self.0.push("FlushCaches".into());
    }

    #[zbus(name = "RevertLink")]
    fn revert_link(&self, ifindex: i32) {
        self.0.push(format!("RevertLink {ifindex}"));
    }
}

/// systemd-resolved cannot run on this machine (no systemd as PID 1, and its package would take over the
/// host's DNS), so the node talks to a recorded resolve1 on a private bus of a real dbus-daemon: the calls,
/// their D-Bus signatures and their order are checked, and resolv.conf is never touched.
#[test]
fn with_systemd_resolved_the_link_dns_is_set_over_d_bus_and_taken_back() {
    let (mut lab, control, hosts) = switched_mesh("dnr", 2, None);
    let bus = lab.path("system_bus_socket");
    let address = format!("unix:path={}", bus.display());
    let config = lab.write(
        "bus.conf",
        &format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>{address}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#
        ),
    );
    let daemon = lab.spawn(
        hosts[0],
        "dbus-daemon",
        "dbus-daemon",
        &["--nofork", "--nopidfile", "--config-file", config.to_str().unwrap()],
        &[],
    );
    assert!(wait(5000, || bus.exists()), "dbus-daemon did not start: {}", lab.process(daemon).log_text());

    let recorder = Recorder::default();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (fake, bus_address) = (FakeResolved(recorder.clone()), address.clone());
    let service = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let _connection = zbus::connection::Builder::address(bus_address.as_str())
                .name("org.freedesktop.resolve1")
                .serve_at("/org/freedesktop/resolve1", fake)
                .build()
                .await
                .unwrap();
            ready_tx.send(()).unwrap();
            // Held until the test is done; the bus answers from the connection's own task meanwhile.
            let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
        });
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).expect("the recorded resolved is on the bus");

    let stub = "# This is /run/systemd/resolve/stub-resolv.conf managed by man:systemd-resolved(8).\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n";
    lab.ns(hosts[0]).set_resolv_conf(stub);
    let env = [("DBUS_SYSTEM_BUS_ADDRESS", address.as_str())];
    let client = Node::start_with_env(&mut lab, hosts[0], "client", &env);
    let db = Node::start(&mut lab, hosts[1], "db");
    let key = control.authkey(&lab, &["--reusable"]);
    db.up(&lab, &control, &key, &[]);
    client.up(&lab, &control, &key, &[]);
    let index =
        stdout(&lab.ns(client.ns).exec("cat", &[&format!("/sys/class/net/{}/ifindex", client.tun)])).trim().to_string();
    let v6 = client.status(&lab)["node"]["ipv6"].as_str().unwrap().parse::<std::net::Ipv6Addr>().unwrap();
    let s = v6.segments();
    let resolver_v6 = std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0x53);

    assert!(wait(5000, || recorder.calls().iter().any(|c| c == "FlushCaches")), "calls: {:?}", recorder.calls());
    let calls = recorder.calls();
    assert_eq!(calls[0], format!("SetLinkDNS {index} 100.100.100.100 {resolver_v6}"), "{calls:?}");
    assert!(calls[1].starts_with(&format!("SetLinkDomains {index} mesh.internal ~64.100.in-addr.arpa")), "{calls:?}");
    assert!(calls[1].contains(" ~127.100.in-addr.arpa ") && calls[1].ends_with(".ip6.arpa"), "{calls:?}");
    assert_eq!(calls[2], format!("SetLinkDefaultRoute {index} false"));
    assert!(
        calls.contains(&format!("SetLinkLLMNR {index} no")) && calls.contains(&format!("SetLinkDNSSEC {index} no"))
    );
    assert_eq!(lab.ns(client.ns).resolv_conf(), stub, "resolved's file is left alone");
    let (_, status, _) = client.cli(&lab, &["dns", "status"]);
    // Never the stub as an upstream: resolved routes the mesh's domains here and would send their other names
    // straight back.
    assert!(status.contains("mode: systemd-resolved") && !status.contains("127.0.0.53:53"), "{status}");
    let (_, doctor, _) = client.cli(&lab, &["doctor", "--tun", &client.tun]);
    assert!(doctor.contains("systemd-resolved: the TUN device's link DNS"), "{doctor}");
    // The resolver answers at its address whatever the host integration.
    let db_v4 = db.status(&lab)["node"]["ipv4"].as_str().unwrap().to_string();
    assert_eq!(dig(&lab, client.ns, &["@100.100.100.100", "db.mesh.internal", "+short"]), db_v4);

    // A split zone set on the server becomes a routing domain of the link.
    let file = lab.write("dns.hujson", r#"{"nameservers": {"split": {"shared.cwiq.io": ["10.0.0.2"]}}}"#);
    assert_eq!(control.admin(&lab, &["dns", "set", file.to_str().unwrap()]).0, Some(0));
    assert!(wait(5000, || recorder
        .calls()
        .iter()
        .any(|c| c.starts_with("SetLinkDomains") && c.contains(" ~shared.cwiq.io"))));

    // Taken back on down and on SIGTERM.
    assert_eq!(client.cli(&lab, &["down"]).0, Some(0));
    assert!(wait(3000, || recorder.calls().last() == Some(&format!("RevertLink {index}"))), "{:?}", recorder.calls());
    client.up(&lab, &control, &key, &[]);
    let before = recorder.calls().len();
    assert!(wait(5000, || recorder.calls()[before..].iter().any(|c| c == "FlushCaches")));
    lab.process(client.process).stop(Duration::from_secs(10));
    assert_eq!(recorder.calls().last(), Some(&format!("RevertLink {index}")));
    assert_eq!(lab.ns(client.ns).resolv_conf(), stub);
    let _ = stop_tx.send(());
    service.join().unwrap();
}
