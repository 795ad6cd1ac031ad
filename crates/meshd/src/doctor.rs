//! `meshd doctor`: checks what users of subnet routers lose hours to (seed 002) and prints, for each, OK,
//! WARN or FAIL with the command that fixes it. The exit status is non-zero if anything failed.
//!
//! It asks the running daemon (over its UAPI socket) which prefixes it routes, computes the table it should
//! have with the route manager's own planning code, and compares that with what the kernel holds.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use crate::run_state::RunState;
use ipnet::IpNet;
use mesh_dataplane::netmap::AcceptRoutes;
use mesh_linux::RoutingPolicy;
use mesh_linux::netlink::Netlink;
use mesh_linux::plan;

#[derive(Debug, Clone)]
pub struct Options {
    /// The daemon's local API socket (a managed node's status: the ACL filter).
    pub socket: PathBuf,
    pub tun: String,
    pub uapi_dir: PathBuf,
    pub policy: RoutingPolicy,
    pub accept: AcceptRoutes,
    pub json: bool,
    pub run_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub summary: String,
    pub details: Vec<String>,
    pub fix: Vec<String>,
}

impl Check {
    fn new(name: &'static str, status: Status, summary: impl Into<String>) -> Self {
        Self { name, status, summary: summary.into(), details: Vec::new(), fix: Vec::new() }
    }
}

/// What the running daemon reports about itself.
#[derive(Debug, Default)]
struct Daemon {
    allowed_ips: Vec<IpNet>,
    endpoints: Vec<SocketAddr>,
}

fn ask_daemon(socket: &Path) -> Option<Daemon> {
    let mut stream = UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"get=1\n\n").ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let mut daemon = Daemon::default();
    for line in reply.lines() {
        match line.split_once('=') {
            Some(("allowed_ip", v)) => daemon.allowed_ips.extend(v.parse::<IpNet>().ok()),
            Some(("endpoint", v)) => daemon.endpoints.extend(v.parse::<SocketAddr>().ok()),
            _ => {}
        }
    }
    reply.contains("errno=0").then_some(daemon)
}

pub fn run(options: Options) -> ExitCode {
    if options.tun == "userspace" {
        // Nothing of the host's routing is meshd's in userspace mode; what there is to see is in status.
        println!(
            "userspace mode: meshd changes nothing on this host (no TUN device, routes or rules); see meshd status \
             and /readyz (docs/operations.md)"
        );
        return ExitCode::SUCCESS;
    }
    // Without root the UAPI socket (0600) refuses the connection while the kernel still shows the rules and
    // routes: doctor would take a running meshd's state for leftovers and advise deleting it.
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        eprintln!("meshd: doctor needs root to ask meshd and read the routing state; run it with sudo");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let checks = match runtime.block_on(checks(&options)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshd: doctor cannot read the routing state: {e} (run it as root)");
            return ExitCode::FAILURE;
        }
    };
    if options.json {
        println!("{}", to_json(&checks));
    } else {
        for check in &checks {
            println!("{:<4}  {:<11} {}", check.status.word(), check.name, check.summary);
            for detail in &check.details {
                println!("              {detail}");
            }
            for fix in &check.fix {
                println!("              fix: {fix}");
            }
        }
    }
    if checks.iter().any(|c| c.status == Status::Fail) { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn to_json(checks: &[Check]) -> String {
    let list: Vec<serde_json::Value> = checks
        .iter()
        .map(|c| {
            serde_json::json!({
                "check": c.name,
                "status": c.status.word(),
                "summary": c.summary,
                "details": c.details,
                "fix": c.fix,
            })
        })
        .collect();
    serde_json::json!({ "checks": list, "ok": !checks.iter().any(|c| c.status == Status::Fail) }).to_string()
}

/// The ACL filter of a managed node: its rules, what it dropped, the latest flows it refused. None when no
/// managed daemon answers on the local API.
async fn acl_check(socket: &Path) -> Option<Check> {
    let (status, text) = crate::local_api::call(&socket.to_path_buf(), "GET", "/v1/status", None).await.ok()?;
    if status != 200 {
        return None;
    }
    let acl = serde_json::from_str::<crate::local_api::Status>(&text).ok()?.acl?;
    let dropped: u64 = acl.dropped.iter().map(|(_, n)| n).sum();
    let summary = match acl.rules {
        None => "the policy has no rules: every peer reaches every port here".to_string(),
        Some(n) => format!("{n} rule(s), {} flow(s) tracked, {dropped} packet(s) dropped", acl.flows),
    };
    let mut c = Check::new("acl", Status::Ok, summary);
    for (reason, n) in &acl.dropped {
        c.details.push(format!("{reason}: {n}"));
    }
    for denied in &acl.recent_denied {
        c.details.push(format!("denied: {denied}"));
    }
    if !acl.recent_denied.is_empty() {
        c.fix.push("meshd control policy explain SRC DST:PORT   # which rule would allow a flow".into());
    }
    Some(c)
}

/// Host DNS of a managed node: whether resolv.conf points at the mesh's resolver, the systemd-resolved
/// symlink case, a search list missing the mesh domain, another program fighting over the file. None when no
/// managed daemon answers.
async fn dns_status(socket: &Path) -> Option<crate::local_api::DnsStatus> {
    let (status, text) = crate::local_api::call(&socket.to_path_buf(), "GET", "/v1/dns/status", None).await.ok()?;
    if status != 200 {
        return None;
    }
    serde_json::from_str(&text).ok()
}

fn dns_check(dns: &crate::local_api::DnsStatus) -> Option<Check> {
    let resolver = dns.resolver.as_ref()?;
    let path = Path::new("/etc/resolv.conf");
    let current = std::fs::read_to_string(path).unwrap_or_default();
    let parsed = crate::daemon::parse_resolv_conf(&current);
    let quad = std::net::IpAddr::from([100, 100, 100, 100]);
    let mut c = Check::new("dns", Status::Ok, dns.mode.clone());
    if let Ok(target) = std::fs::read_link(path) {
        c.details.push(format!("{} is a link to {}", path.display(), target.display()));
        if target.to_string_lossy().contains("systemd/resolve") {
            c.details.push(
                "systemd-resolved owns it; meshd's direct mode replaces the link while it runs and puts it back \
                 on stop (stub-resolv.conf forwards to 127.0.0.53; resolv.conf under /run/systemd/resolve lists \
                 the upstreams)"
                    .into(),
            );
        }
    }
    let resolved = dns.host.as_ref().is_some_and(|h| h.mode == "systemd-resolved" && h.active);
    let using = resolved || parsed.nameservers.first() == Some(&quad);
    let accept = !dns.mode.starts_with("off");
    if accept && !using {
        c.status = Status::Warn;
        c.summary = format!(
            "{} does not point at the mesh's resolver: mesh names resolve only with dig @100.100.100.100",
            path.display()
        );
        c.fix.push("meshd set --accept-dns=true   # or see which program rewrites it (meshd dns status)".into());
    }
    if let Some(host) = &dns.host {
        if host.gave_up {
            c.status = Status::Warn;
            c.details.push(format!(
                "another program rewrote {} {} times; meshd gave up",
                host.path.display(),
                host.tramples
            ));
            c.fix.push("stop the other program managing resolv.conf (NetworkManager, resolvconf, a DHCP hook), or run meshd up --accept-dns=false".into());
        } else if host.tramples > 0 {
            c.details
                .push(format!("another program rewrote resolv.conf {} times; meshd put its own back", host.tramples));
        }
    }
    if using
        && !resolved
        && resolver.magic_dns
        && !parsed.search.iter().any(|d| d.eq_ignore_ascii_case(&resolver.domain))
    {
        c.status = Status::Warn;
        c.details.push(format!("the search list lacks {}: bare names like db-prd will not resolve", resolver.domain));
    }
    if resolver.upstreams.is_empty() {
        c.status = c.status.max(Status::Warn);
        c.details.push("no upstream resolver: names outside the mesh get SERVFAIL (set nameservers.global)".into());
    }
    Some(c)
}

async fn checks(o: &Options) -> std::io::Result<Vec<Check>> {
    let netlink = Netlink::connect()?;
    let socket = o.uapi_dir.join(format!("{}.sock", o.tun));
    // meshd.service keeps the UAPI socket in its own runtime directory (it runs as its own user, which may
    // not write /var/run/wireguard), so doctor run from a shell without the unit's environment looks there too.
    let daemon = ask_daemon(&socket).or_else(|| ask_daemon(&o.run_dir.join(format!("{}.sock", o.tun))));
    let state = match &daemon {
        Some(_) => RunState::read(&o.run_dir.join(format!("{}.json", o.tun))),
        None => RunState::default(),
    };
    // The running daemon's own numbers and filter win over doctor's flags.
    let mut o = o.clone();
    if let Some(p) = state.policy {
        o.policy = RoutingPolicy::new(p.table, p.fwmark, p.rule_priority);
        o.accept = match &state.accept_routes {
            None => AcceptRoutes::All,
            Some(within) => AcceptRoutes::Within(within.clone()),
        };
    }
    let snat: Vec<(IpAddr, String)> = state.snat.iter().map(|s| (s.address, s.lan.clone())).collect();
    let o = &o;
    let table = o.policy.table;
    let tun_index = netlink.link_index(&o.tun).await.ok();
    let mut out = Vec::new();

    out.push(match (&daemon, tun_index) {
        (Some(d), Some(_)) => Check::new(
            "daemon",
            Status::Ok,
            format!("meshd runs on {} and routes {} prefix(es)", o.tun, d.allowed_ips.len()),
        ),
        _ => {
            let mut c = Check::new(
                "daemon",
                Status::Warn,
                format!("meshd is not running on {} (no answer on {})", o.tun, socket.display()),
            );
            c.fix.push("systemctl start meshd   # or: meshd daemon --config FILE".into());
            c
        }
    });

    // Policy rules.
    let rules = netlink.rule_status(&o.policy).await?;
    let mut c = if daemon.is_some() {
        if rules.missing.is_empty() {
            Check::new("rules", Status::Ok, format!("the {} policy rules are in place", rules.present))
        } else {
            let mut c = Check::new("rules", Status::Fail, format!("{} policy rule(s) missing", rules.missing.len()));
            for (v6, priority) in &rules.missing {
                c.details.push(format!("missing: {} rule {priority}", if *v6 { "IPv6" } else { "IPv4" }));
            }
            c.fix.push("meshd restores them within seconds; if not, restart meshd".into());
            c
        }
    } else if rules.present > 0 && o.run_dir.join(format!("{}.json", o.tun)).exists() {
        // The state file of a run that never stopped: these rules are its leftovers.
        let mut c = Check::new(
            "rules",
            Status::Fail,
            format!("{} meshd rule(s) left by a run that did not stop cleanly", rules.present),
        );
        for priority in o.policy.priorities() {
            c.fix.push(format!("ip rule del priority {priority}; ip -6 rule del priority {priority}"));
        }
        c
    } else if rules.present > 0 {
        let mut c = Check::new(
            "rules",
            Status::Warn,
            "rules at meshd's priorities belong to another program (Tailscale uses the same numbers)",
        );
        c.fix.push("give meshd others: --rule-priority N --fwmark M (and --table N)".into());
        c
    } else {
        Check::new("rules", Status::Ok, "no meshd rules (meshd is not running)")
    };
    if !rules.stray.is_empty() {
        c.status = c.status.max(Status::Warn);
        c.details.push(format!("{} duplicate or misshapen rule(s) at meshd's priorities", rules.stray.len()));
    }
    out.push(c);

    // The mesh table: what should be there against what is.
    let entries = netlink.dump_table(table).await?;
    let local = match tun_index {
        Some(i) => netlink.connected_prefixes(i).await?,
        None => Vec::new(),
    };
    let (mut desired, skipped) = match &daemon {
        Some(d) => plan::desired(d.allowed_ips.iter().copied().filter(|p| o.accept.routes(p)), &local),
        None => Default::default(),
    };
    // The SNAT addresses' host routes are pinned into the table by the daemon, and so are the resolver's
    // addresses of a managed node (asked over the local API: they are no peer's allowed IPs).
    desired.extend(snat.iter().map(|(a, _)| plan::Route::Mesh(IpNet::from(*a))));
    let dns = dns_status(&o.socket).await;
    let resolver = dns.as_ref().and_then(|d| d.resolver.as_ref()).filter(|_| daemon.is_some());
    desired.extend(resolver.into_iter().flat_map(|r| r.addresses.iter().map(|a| plan::Route::Mesh(IpNet::from(*a)))));
    let p = plan::plan(&desired, &entries, tun_index.unwrap_or(0));
    let mut c = if p.add.is_empty() && p.remove.is_empty() {
        Check::new("table", Status::Ok, format!("table {table} holds exactly the {} routes meshd wants", desired.len()))
    } else {
        Check::new(
            "table",
            Status::Fail,
            format!("table {table}: {} route(s) missing, {} stale", p.add.len(), p.remove.len()),
        )
    };
    for route in &p.add {
        c.details.push(format!("missing: {route}"));
        c.fix.push(match route {
            plan::Route::Mesh(prefix) => {
                format!("ip route replace {prefix} dev {} table {table} proto {}", o.tun, mesh_linux::ROUTE_PROTOCOL)
            }
            plan::Route::Throw(prefix) => {
                format!("ip route replace throw {prefix} table {table} proto {}", mesh_linux::ROUTE_PROTOCOL)
            }
        });
    }
    for entry in &p.remove {
        c.details.push(format!("stale: {}{}", if entry.throw { "throw " } else { "" }, entry.prefix));
        c.fix.push(format!(
            "ip route del {}{} table {table} proto {}",
            if entry.throw { "throw " } else { "" },
            entry.prefix,
            mesh_linux::ROUTE_PROTOCOL
        ));
    }
    for s in &skipped {
        c.details.push(format!("not routed: {} would take over the local network {}", s.accepted, s.local));
    }
    for route in &p.conflicts {
        c.status = c.status.max(Status::Warn);
        c.details.push(format!("not installed: {route} is held by another program's route (see table-owner)"));
    }
    out.push(c);

    // Another owner of the table (a running Tailscale, a hand-made route).
    out.push(if p.foreign.is_empty() {
        Check::new("table-owner", Status::Ok, format!("nothing but meshd routes through table {table}"))
    } else {
        let mut c = Check::new(
            "table-owner",
            Status::Warn,
            format!("table {table} holds {} route(s) meshd did not install", p.foreign.len()),
        );
        for e in &p.foreign {
            let via = e.device.clone().map(|d| format!(" via {d}")).unwrap_or_default();
            c.details.push(format!("{}{}{via}", if e.throw { "throw " } else { "" }, e.prefix));
        }
        // Another program's routes are its own to remove; the way out on meshd's side is a table of its own.
        c.fix.push("or give meshd a table of its own: meshd daemon --table 53 ...".into());
        c
    });

    out.push(forwarding_check(!state.served.is_empty()));
    if !snat.is_empty() {
        out.push(snat_check(&o.tun, &snat));
    }
    out.push(rp_filter_check(&o.tun));
    out.push(firewall_check(&o.tun));
    if let Some(d) = &daemon {
        out.push(mtu_check(&o.tun, &d.endpoints, o.policy.fwmark));
    }
    if let Some(check) = dns.as_ref().and_then(dns_check) {
        out.push(check);
    }
    if let Some(check) = acl_check(&o.socket).await {
        out.push(check);
    }
    Ok(out)
}

fn sysctl(key: &str) -> Option<String> {
    mesh_linux::sysctl::read(key).ok()
}

/// The plumbing that makes a SNAT address answer on its LAN (design.md §3): the proxy neighbour entry and
/// `proxy_delay=0` (the host route is part of the table check).
fn snat_check(tun: &str, snat: &[(IpAddr, String)]) -> Check {
    let mut c =
        Check::new("snat", Status::Ok, format!("the SNAT address plumbing is in place ({} address(es))", snat.len()));
    for (address, lan) in snat {
        let neighbours = Command::new("ip").args(["neigh", "show", "proxy", "dev", lan]).output();
        let proxied = neighbours
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().any(|w| w == address.to_string()));
        if !proxied {
            c.status = Status::Fail;
            c.details.push(format!("{lan} does not answer ARP for {address}: LAN hosts cannot reach it"));
            c.fix.push(format!("ip neigh replace proxy {address} dev {lan}"));
        }
        if address.is_ipv4() && sysctl(&format!("net/ipv4/neigh/{lan}/proxy_delay")).as_deref() != Some("0") {
            c.status = c.status.max(Status::Warn);
            c.details.push(format!("proxy_delay on {lan} is not 0: first contact with {address} waits up to 0.8 s"));
            c.fix.push(format!("sysctl -w net/ipv4/neigh/{lan}/proxy_delay=0"));
        }
    }
    if c.status != Status::Ok {
        c.summary = format!("the SNAT address plumbing is incomplete; replies may not reach {tun}");
    }
    c
}

fn forwarding_check(serving: bool) -> Check {
    let v4 = sysctl("net/ipv4/ip_forward").as_deref() == Some("1");
    let v6 = sysctl("net/ipv6/conf/all/forwarding").as_deref() == Some("1");
    if v4 {
        let mut c = Check::new("ip_forward", Status::Ok, "IPv4 forwarding is on");
        if !v6 {
            c.details.push("IPv6 forwarding is off: IPv6 subnet routes through this node will not work".into());
            c.fix.push("sysctl -w net.ipv6.conf.all.forwarding=1".into());
        }
        c
    } else {
        let status = if serving { Status::Fail } else { Status::Warn };
        let mut c = Check::new(
            "ip_forward",
            status,
            "IPv4 forwarding is off: this node cannot route for others (a subnet router must)",
        );
        c.fix.push("sysctl -w net.ipv4.ip_forward=1   # and put it in /etc/sysctl.d/ to keep it".into());
        c
    }
}

fn rp_filter_check(tun: &str) -> Check {
    let all = sysctl("net/ipv4/conf/all/rp_filter").and_then(|v| v.parse::<u8>().ok()).unwrap_or(0);
    let dev = sysctl(&format!("net/ipv4/conf/{tun}/rp_filter")).and_then(|v| v.parse::<u8>().ok()).unwrap_or(0);
    // The kernel applies the larger of the two.
    if all.max(dev) == 1 {
        let mut c = Check::new(
            "rp_filter",
            Status::Warn,
            format!("strict reverse-path filtering on {tun} drops mesh packets whose return path differs"),
        );
        c.fix.push(format!(
            "sysctl -w net/ipv4/conf/{tun}/rp_filter=2{}",
            if all == 1 { " net.ipv4.conf.all.rp_filter=2" } else { "" }
        ));
        c
    } else {
        Check::new(
            "rp_filter",
            Status::Ok,
            format!("reverse-path filtering is {} on {tun}", if all.max(dev) == 2 { "loose" } else { "off" }),
        )
    }
}

/// A forward-hook chain that rejects or drops: firewalld's `reject with icmpx admin-prohibited` in its
/// FORWARD chain (seed 002, case 4), a `policy drop`, or iptables' FORWARD policy.
fn firewall_check(tun: &str) -> Check {
    let mut findings = Vec::new();
    let mut fixes = Vec::new();
    if let Ok(out) = Command::new("nft").args(["list", "ruleset"]).output()
        && out.status.success()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        for (family, table, chain, lines) in forward_chains(&text) {
            // Bridge chains see bridged frames, not routed mesh traffic.
            if family == "bridge" {
                continue;
            }
            if let Some(what) = blocks_mesh(&lines, tun) {
                findings.push(format!("nftables {family} {table} chain {chain}: {what}"));
                fixes.push(format!("nft insert rule {family} {table} {chain} iifname \"{tun}\" accept"));
                fixes.push(format!("nft insert rule {family} {table} {chain} oifname \"{tun}\" accept"));
            }
        }
    }
    if let Ok(out) = Command::new("iptables").args(["-S", "FORWARD"]).output() {
        let text = String::from_utf8_lossy(&out.stdout);
        let accepts_mesh = text.lines().any(|l| {
            (l.contains(&format!("-i {tun} ")) || l.contains(&format!("-o {tun} "))) && l.ends_with("-j ACCEPT")
        });
        let blocking = text
            .lines()
            .find(|l| *l == "-P FORWARD DROP" || *l == "-A FORWARD -j DROP" || l.starts_with("-A FORWARD -j REJECT"));
        if let Some(line) = blocking
            && !accepts_mesh
        {
            findings.push(format!("iptables: {line}"));
            fixes.push(format!("iptables -I FORWARD -i {tun} -j ACCEPT; iptables -I FORWARD -o {tun} -j ACCEPT"));
        }
    }
    if findings.is_empty() {
        return Check::new("firewall", Status::Ok, "no firewall rule rejects forwarded traffic");
    }
    let mut c =
        Check::new("firewall", Status::Fail, "the firewall rejects or drops forwarded traffic, mesh traffic included");
    c.details = findings;
    c.fix = fixes;
    c
}

/// What in a forward chain stops mesh traffic, if anything: walking the rules in order, an accept for the mesh
/// device first means no; an unconditional reject or drop (a bare verdict, perhaps with a counter or a
/// comment), or a drop policy at the end, means yes. Conditional rules (`ct state invalid drop`, rules for
/// other addresses) are not judged: doctor cannot evaluate their matches.
fn blocks_mesh(lines: &[String], tun: &str) -> Option<String> {
    for line in lines.iter().filter(|l| !l.contains("hook forward")) {
        if (line.contains(&format!("iifname \"{tun}\"")) || line.contains(&format!("oifname \"{tun}\"")))
            && line.ends_with("accept")
        {
            return None;
        }
        if is_unconditional_verdict(line) {
            return Some(line.clone());
        }
    }
    lines.iter().any(|l| l.contains("hook forward") && l.contains("policy drop")).then(|| "policy drop".to_string())
}

/// `reject`, `reject with icmpx admin-prohibited`, `drop`, optionally after `counter packets N bytes M` and
/// before `comment "..."`.
fn is_unconditional_verdict(line: &str) -> bool {
    let mut rule = line.trim();
    if let Some(at) = rule.find(" comment \"") {
        rule = &rule[..at];
    }
    if let Some(rest) = rule.strip_prefix("counter packets ") {
        rule = rest.splitn(4, ' ').nth(3).unwrap_or("");
    }
    rule == "drop" || rule == "reject" || rule.starts_with("reject with ")
}

/// (family, table, chain, lines) of every nftables chain hooked into forward.
fn forward_chains(ruleset: &str) -> Vec<(String, String, String, Vec<String>)> {
    let mut found = Vec::new();
    let (mut family, mut table) = (String::new(), String::new());
    let mut chain: Option<(String, Vec<String>)> = None;
    for line in ruleset.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("table ") {
            let mut parts = rest.trim_end_matches('{').split_whitespace();
            family = parts.next().unwrap_or("").to_string();
            table = parts.next().unwrap_or("").to_string();
        } else if let Some(rest) = t.strip_prefix("chain ") {
            chain = Some((rest.trim_end_matches('{').trim().to_string(), Vec::new()));
        } else if t == "}" {
            if let Some((name, lines)) = chain.take()
                && lines.iter().any(|l| l.contains("hook forward"))
            {
                found.push((family.clone(), table.clone(), name, lines));
            }
        } else if let Some((_, lines)) = chain.as_mut() {
            lines.push(t.to_string());
        }
    }
    found
}

/// WireGuard adds 60 bytes over IPv4 and 80 over IPv6; the tunnel MTU plus that must fit the path.
fn mtu_check(tun: &str, endpoints: &[SocketAddr], mark: u32) -> Check {
    let read_mtu =
        |dev: &str| std::fs::read_to_string(format!("/sys/class/net/{dev}/mtu")).ok()?.trim().parse::<u32>().ok();
    let Some(tun_mtu) = read_mtu(tun) else {
        return Check::new("mtu", Status::Warn, format!("cannot read the MTU of {tun}"));
    };
    let mut c = Check::new("mtu", Status::Ok, format!("{tun} MTU {tun_mtu} fits the path to every peer"));
    for endpoint in endpoints {
        let Some(dev) = route_device(endpoint.ip(), mark) else { continue };
        let Some(path_mtu) = read_mtu(&dev) else { continue };
        let overhead = if endpoint.is_ipv4() { 60 } else { 80 };
        if tun_mtu + overhead > path_mtu {
            c.status = Status::Warn;
            c.summary = format!("{tun} MTU {tun_mtu} is too large for the path to some peers");
            c.details.push(format!("{endpoint} via {dev} (MTU {path_mtu}) fits at most {}", path_mtu - overhead));
            c.fix.push(format!(
                "set mtu = {} in the [interface] section (or MTU = in wg-quick) and restart",
                path_mtu - overhead
            ));
        }
    }
    c
}

/// The device meshd's own (marked) packets to `ip` leave through: without the mark, an accepted route or an
/// exit node would send the lookup into the tunnel itself.
fn route_device(ip: IpAddr, mark: u32) -> Option<String> {
    let out =
        Command::new("ip").args(["route", "get", &ip.to_string(), "mark", &format!("{mark:#x}")]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words.find(|w| *w == "dev")?;
    words.next().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_firewalld_style_forward_rejects() {
        let ruleset = r#"table inet firewalld {
	chain filter_FORWARD {
		type filter hook forward priority filter + 10; policy accept;
		ct state { established, related } accept
		jump filter_FORWARD_POLICIES
		reject with icmpx admin-prohibited
	}
	chain filter_INPUT {
		type filter hook input priority filter + 10; policy accept;
		reject with icmpx admin-prohibited
	}
}
table ip filter {
	chain FORWARD {
		type filter hook forward priority filter; policy drop;
	}
}
"#;
        let chains = forward_chains(ruleset);
        assert_eq!(chains.len(), 2, "only forward-hook chains");
        assert_eq!(
            (chains[0].0.as_str(), chains[0].1.as_str(), chains[0].2.as_str()),
            ("inet", "firewalld", "filter_FORWARD")
        );
        assert!(chains[0].3.iter().any(|l| l == "reject with icmpx admin-prohibited"));
        assert_eq!(chains[1].2, "FORWARD");
        assert_eq!(blocks_mesh(&chains[0].3, "mesh0").as_deref(), Some("reject with icmpx admin-prohibited"));
        assert_eq!(blocks_mesh(&chains[1].3, "mesh0").as_deref(), Some("policy drop"));
    }

    #[test]
    fn conditional_rules_and_an_earlier_mesh_accept_are_not_blocks() {
        let lines = |ls: &[&str]| ls.iter().map(|l| l.to_string()).collect::<Vec<_>>();
        let harmless = lines(&[
            "type filter hook forward priority filter; policy accept;",
            "ct state invalid drop",
            "ip daddr 10.9.9.9 reject",
        ]);
        assert_eq!(blocks_mesh(&harmless, "mesh0"), None);
        let fixed = lines(&["type filter hook forward priority 0; policy drop;", "iifname \"mesh0\" accept", "reject"]);
        assert_eq!(blocks_mesh(&fixed, "mesh0"), None, "doctor's own fix, applied, clears the finding");
        let counted = lines(&[
            "type filter hook forward priority 0; policy accept;",
            "counter packets 12 bytes 960 drop comment \"lockdown\"",
        ]);
        assert!(blocks_mesh(&counted, "mesh0").is_some());
    }

    #[test]
    fn json_lists_every_check() {
        let mut c = Check::new("table", Status::Fail, "table 52: 1 route(s) missing, 0 stale");
        c.fix.push("ip route replace 10.0.0.0/16 dev mesh0 table 52 proto 88".into());
        let json: serde_json::Value =
            serde_json::from_str(&to_json(&[c, Check::new("rules", Status::Ok, "ok")])).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["checks"][0]["status"], "FAIL");
        assert_eq!(json["checks"][1]["check"], "rules");
    }
}
