//! HuJSON to `Policy`. jsonc-parser keeps every value's place in the text, so each refusal names its line
//! and column; its options are narrowed to HuJSON (comments and trailing commas, nothing of JSON5).

use std::collections::BTreeMap;
use std::fmt::Display;
use std::net::IpAddr;

use ipnet::IpNet;
use jsonc_parser::ast::{Array, Object, Value};
use jsonc_parser::{CollectOptions, ParseOptions};

use super::{Alias, AutoApprovers, Dst, Policy, PolicyError, PolicyTest, PortRange, Rule};

/// Sections of a Tailscale policy meshd reads past: they configure things meshd does not do (Tailscale
/// SSH, node attributes, DERP), and refusing them would refuse a file users already have.
const IGNORED_SECTIONS: &[&str] =
    &["ssh", "sshTests", "nodeAttrs", "derpMap", "disableIPv4", "randomizeClientPort", "OneCSNATRoute"];

/// Tailscale's protocol names (case-insensitive), as Headscale lists them.
const PROTOCOLS: &[(&str, u8)] = &[
    ("icmp", 1),
    ("igmp", 2),
    ("ipv4", 4),
    ("ip-in-ip", 4),
    ("tcp", 6),
    ("egp", 8),
    ("igp", 9),
    ("udp", 17),
    ("gre", 47),
    ("esp", 50),
    ("ah", 51),
    ("ipv6-icmp", 58),
    ("sctp", 132),
    ("fc", 133),
];

/// jsonc-parser narrowed to HuJSON: comments and trailing commas, nothing of JSON5 (the policy and the DNS
/// settings files).
pub(crate) fn hujson() -> ParseOptions {
    ParseOptions {
        allow_comments: true,
        allow_trailing_commas: true,
        allow_loose_object_property_names: false,
        allow_missing_commas: false,
        allow_single_quoted_strings: false,
        allow_hexadecimal_numbers: false,
        allow_unary_plus_numbers: false,
        ..ParseOptions::default()
    }
}

pub(super) fn parse(text: &str) -> Result<Policy, PolicyError> {
    let options = hujson();
    let parsed = jsonc_parser::parse_to_ast(text, &CollectOptions::default(), &options).map_err(|e| {
        let (line, column) = line_and_column(text, e.range().start);
        PolicyError(format!("policy:{line}:{column}: {}", e.kind()))
    })?;
    let reader = Reader { text };
    let Some(value) = parsed.value else {
        return Err(reader.error(0, "the file is empty; write {} for a policy that allows everything"));
    };
    reader.policy(&value)
}

/// 1-based line and column (in characters) of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

struct Reader<'t> {
    text: &'t str,
}

/// Where a value is, as a byte offset into the text.
trait Place {
    fn start(&self) -> usize;
}

impl Place for Value<'_> {
    fn start(&self) -> usize {
        match self {
            Value::StringLit(v) => v.range.start,
            Value::NumberLit(v) => v.range.start,
            Value::BooleanLit(v) => v.range.start,
            Value::Object(v) => v.range.start,
            Value::Array(v) => v.range.start,
            Value::NullKeyword(v) => v.range.start,
        }
    }
}

impl<'t> Reader<'t> {
    fn line(&self, at: usize) -> usize {
        line_and_column(self.text, at).0
    }

    fn error(&self, at: usize, message: impl Display) -> PolicyError {
        let (line, column) = line_and_column(self.text, at);
        PolicyError(format!("policy:{line}:{column}: {message}"))
    }

    fn object<'v, 'a>(&self, value: &'v Value<'a>, what: &str) -> Result<&'v Object<'a>, PolicyError> {
        value.as_object().ok_or_else(|| self.error(value.start(), format!("{what} must be an object {{...}}")))
    }

    fn array<'v, 'a>(&self, value: &'v Value<'a>, what: &str) -> Result<&'v Array<'a>, PolicyError> {
        value.as_array().ok_or_else(|| self.error(value.start(), format!("{what} must be a list [...]")))
    }

    fn string(&self, value: &Value<'_>, what: &str) -> Result<String, PolicyError> {
        match value {
            Value::StringLit(s) => Ok(s.value.to_string()),
            _ => Err(self.error(value.start(), format!("{what} must be a string \"...\""))),
        }
    }

    fn strings(&self, value: &Value<'_>, what: &str) -> Result<Vec<(usize, String)>, PolicyError> {
        self.array(value, what)?.elements.iter().map(|v| Ok((v.start(), self.string(v, what)?))).collect()
    }

    /// The properties of an object, refusing a name given twice (JSON would silently keep the last).
    fn properties<'v, 'a>(
        &self,
        object: &'v Object<'a>,
        what: &str,
    ) -> Result<Vec<(usize, String, &'v Value<'a>)>, PolicyError> {
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::with_capacity(object.properties.len());
        for p in &object.properties {
            let name = p.name.as_str().to_string();
            if !seen.insert(name.clone()) {
                return Err(self.error(p.range.start, format!("{what}: {name:?} is given twice")));
            }
            out.push((p.range.start, name, &p.value));
        }
        Ok(out)
    }

    fn policy(&self, value: &Value<'_>) -> Result<Policy, PolicyError> {
        let top = self.object(value, "a policy")?;
        let mut policy = Policy::default();
        let properties = self.properties(top, "the policy")?;
        // Aliases are checked against groups, hosts and tags, which may come after the rules in the file.
        let section = |name: &str| properties.iter().find(|(_, n, _)| n == name).map(|(at, _, v)| (*at, *v));
        if let Some((_, v)) = section("groups") {
            policy.groups = self.groups(v)?;
        }
        if let Some((_, v)) = section("hosts") {
            policy.hosts = self.hosts(v)?;
        }
        if let Some((_, v)) = section("tagOwners") {
            policy.tag_owners = self.tag_owners(v, &policy)?;
        }
        for (at, name, value) in &properties {
            match name.as_str() {
                "groups" | "hosts" | "tagOwners" => {}
                "autoApprovers" => policy.auto_approvers = self.auto_approvers(value, &policy)?,
                "acls" => {
                    let rules = self.acls(value, &policy)?;
                    policy.rules.get_or_insert_with(Vec::new).extend(rules);
                }
                "grants" => {
                    let rules = self.grants(value, &policy)?;
                    policy.rules.get_or_insert_with(Vec::new).extend(rules);
                }
                "tests" => policy.tests = self.tests(value)?,
                known if IGNORED_SECTIONS.contains(&known) => policy.ignored.push(known.to_string()),
                "postures" | "ipsets" => {
                    return Err(self.error(*at, format!("{name:?} is not supported by meshd; remove the section")));
                }
                other => {
                    return Err(self.error(
                        *at,
                        format!(
                            "unknown section {other:?}; a policy has groups, hosts, tagOwners, autoApprovers, acls, grants and tests"
                        ),
                    ));
                }
            }
        }
        if let Some(rules) = &mut policy.rules {
            rules.sort_by_key(|r| r.line);
        }
        Ok(policy)
    }

    fn groups(&self, value: &Value<'_>) -> Result<BTreeMap<String, Vec<String>>, PolicyError> {
        let mut groups = BTreeMap::new();
        for (at, name, members) in self.properties(self.object(value, "groups")?, "groups")? {
            if !name.starts_with("group:") || name.len() == "group:".len() {
                return Err(self.error(at, format!("groups: {name:?} must be named group:NAME")));
            }
            let mut list = Vec::new();
            for (at, member) in self.strings(members, &format!("{name}'s members"))? {
                if member.starts_with("group:") {
                    return Err(self.error(at, format!("{name}: groups cannot contain groups ({member})")));
                }
                if !member.contains('@') {
                    return Err(self.error(at, format!("{name}: {member:?} is not a user (write user@domain)")));
                }
                list.push(member);
            }
            groups.insert(name, list);
        }
        Ok(groups)
    }

    fn hosts(&self, value: &Value<'_>) -> Result<BTreeMap<String, IpNet>, PolicyError> {
        let mut hosts = BTreeMap::new();
        for (at, name, address) in self.properties(self.object(value, "hosts")?, "hosts")? {
            if name.is_empty() || name.contains(':') || name.contains('@') || name == "*" {
                return Err(self.error(at, format!("hosts: {name:?} is not a host name (letters, digits, - and .)")));
            }
            let text = self.string(address, &format!("host {name}"))?;
            let net = parse_net(&text).ok_or_else(|| {
                self.error(address.start(), format!("host {name}: {text:?} is not an IP address or CIDR prefix"))
            })?;
            hosts.insert(name, net);
        }
        Ok(hosts)
    }

    fn tag_owners(&self, value: &Value<'_>, policy: &Policy) -> Result<BTreeMap<String, Vec<String>>, PolicyError> {
        let object = self.object(value, "tagOwners")?;
        let properties = self.properties(object, "tagOwners")?;
        let mut owners = BTreeMap::new();
        for (at, tag, list) in &properties {
            if !tag.starts_with("tag:") || tag.len() == "tag:".len() {
                return Err(self.error(*at, format!("tagOwners: {tag:?} is not a tag (tags start with \"tag:\")")));
            }
            let mut names = Vec::new();
            for (at, owner) in self.strings(list, &format!("{tag}'s owners"))? {
                self.owner(at, &owner, policy)?;
                names.push(owner);
            }
            owners.insert(tag.clone(), names);
        }
        Ok(owners)
    }

    /// An owner of a tag or an approver: a user, a group, a tag or an admin autogroup.
    fn owner(&self, at: usize, owner: &str, policy: &Policy) -> Result<(), PolicyError> {
        let known = if owner.starts_with("tag:") {
            // A key's own tags apply without tagOwners in meshd, so an owning or approving tag need not be
            // declared itself.
            owner.len() > "tag:".len()
        } else if owner.starts_with("group:") {
            policy.groups.contains_key(owner)
        } else if owner.starts_with("autogroup:") {
            matches!(owner, "autogroup:admin" | "autogroup:member" | "autogroup:tagged")
        } else {
            owner.contains('@')
        };
        if known { Ok(()) } else { Err(self.error(at, format!("{owner:?} is not a known user, group or tag"))) }
    }

    fn auto_approvers(&self, value: &Value<'_>, policy: &Policy) -> Result<AutoApprovers, PolicyError> {
        let mut approvers = AutoApprovers::default();
        for (at, name, value) in self.properties(self.object(value, "autoApprovers")?, "autoApprovers")? {
            match name.as_str() {
                "routes" => {
                    for (at, prefix, owners) in
                        self.properties(self.object(value, "autoApprovers.routes")?, "routes")?
                    {
                        let net: IpNet = prefix.parse().map_err(|_| {
                            self.error(at, format!("autoApprovers.routes: {prefix:?} is not a CIDR prefix"))
                        })?;
                        let mut names = Vec::new();
                        for (at, owner) in self.strings(owners, &format!("approvers of {prefix}"))? {
                            self.owner(at, &owner, policy)?;
                            names.push(owner);
                        }
                        approvers.routes.insert(net.trunc(), names);
                    }
                }
                "exitNode" => {
                    for (at, owner) in self.strings(value, "autoApprovers.exitNode")? {
                        self.owner(at, &owner, policy)?;
                        approvers.exit_node.push(owner);
                    }
                }
                other => {
                    return Err(self.error(at, format!("autoApprovers: unknown key {other:?} (routes or exitNode)")));
                }
            }
        }
        Ok(approvers)
    }

    fn acls(&self, value: &Value<'_>, policy: &Policy) -> Result<Vec<Rule>, PolicyError> {
        let mut rules = Vec::new();
        for entry in &self.array(value, "acls")?.elements {
            let object = self.object(entry, "an acls entry")?;
            let (mut action, mut src, mut dst, mut proto) = (None, None, None, None);
            for (at, name, value) in self.properties(object, "an acls entry")? {
                match name.as_str() {
                    "action" => action = Some((value.start(), self.string(value, "action")?)),
                    "src" => src = Some(self.strings(value, "src")?),
                    "dst" => dst = Some(self.strings(value, "dst")?),
                    "proto" => proto = Some((value.start(), self.string(value, "proto")?)),
                    other => {
                        return Err(self.error(
                            at,
                            format!("acls: unknown key {other:?} (an entry has action, src, dst and proto)"),
                        ));
                    }
                }
            }
            let here = entry.start();
            match action {
                Some((_, a)) if a == "accept" => {}
                Some((at, a)) => {
                    return Err(self.error(at, format!("action={a:?} is not supported; rules only accept")));
                }
                None => return Err(self.error(here, "acls entry has no \"action\": \"accept\"")),
            }
            let src = src.ok_or_else(|| self.error(here, "acls entry has no \"src\""))?;
            let dst = dst.ok_or_else(|| self.error(here, "acls entry has no \"dst\""))?;
            let protos = match proto {
                None => Vec::new(),
                Some((_, p)) if p.is_empty() => Vec::new(),
                Some((at, p)) => vec![parse_proto(&p).map_err(|e| self.error(at, e))?],
            };
            let src = src.iter().map(|(at, s)| self.alias(*at, s, Side::Src, policy)).collect::<Result<Vec<_>, _>>()?;
            let mut dsts = Vec::new();
            for (at, d) in &dst {
                let (alias, ports) = d
                    .rsplit_once(':')
                    .ok_or_else(|| self.error(*at, format!("dst={d:?}: no port; write {d}:* or {d}:PORT")))?;
                let ports = parse_ports(ports).map_err(|e| self.error(*at, format!("dst={alias:?}: {e}")))?;
                check_ports_for(&protos, &ports).map_err(|e| self.error(*at, e))?;
                let alias = self.alias(*at, alias, Side::Dst, policy)?;
                dsts.push(Dst { alias, ports });
            }
            self.check_self(here, &src, &dsts, true)?;
            rules.push(Rule { line: self.line(here), src, dst: dsts, protos, via: Vec::new() });
        }
        Ok(rules)
    }

    fn grants(&self, value: &Value<'_>, policy: &Policy) -> Result<Vec<Rule>, PolicyError> {
        let mut rules = Vec::new();
        for entry in &self.array(value, "grants")?.elements {
            let object = self.object(entry, "a grants entry")?;
            let (mut src, mut dst, mut ip, mut via, mut via_at) = (None, None, None, Vec::new(), None);
            for (at, name, value) in self.properties(object, "a grants entry")? {
                match name.as_str() {
                    "src" => src = Some(self.strings(value, "src")?),
                    "dst" => dst = Some(self.strings(value, "dst")?),
                    "ip" => ip = Some(self.strings(value, "ip")?),
                    "app" => {
                        return Err(self.error(
                            at,
                            "grants: \"app\" (application capabilities) is not supported by meshd yet; grant network access with \"ip\"",
                        ));
                    }
                    "via" => {
                        via_at = Some(at);
                        for (at, tag) in self.strings(value, "via")? {
                            if !tag.starts_with("tag:") {
                                return Err(self.error(at, format!("via={tag:?}: via can only be a tag")));
                            }
                            if !policy.tag_owners.contains_key(&tag) {
                                return Err(
                                    self.error(at, format!("tag {tag:?} not found (give it an owner in tagOwners)"))
                                );
                            }
                            via.push(tag);
                        }
                    }
                    other => {
                        return Err(
                            self.error(at, format!("grants: unknown key {other:?} (an entry has src, dst and ip)"))
                        );
                    }
                }
            }
            let here = entry.start();
            let src = src.ok_or_else(|| self.error(here, "grants entry has no \"src\""))?;
            let dst = dst.ok_or_else(|| self.error(here, "grants entry has no \"dst\""))?;
            let ip = ip.ok_or_else(|| self.error(here, "grants entry has no \"ip\" (say \"ip\": [\"*\"] for all)"))?;
            if ip.is_empty() {
                return Err(self.error(here, "grants entry has an empty \"ip\" list; say [\"*\"] for all traffic"));
            }
            let src = src.iter().map(|(at, s)| self.alias(*at, s, Side::Src, policy)).collect::<Result<Vec<_>, _>>()?;
            let mut aliases = Vec::new();
            for (at, d) in &dst {
                if let Ok(net) = d.parse::<IpNet>()
                    && net.prefix_len() == 0
                {
                    return Err(self.error(
                        *at,
                        format!("dst {d:?}: to allow all IP addresses, use \"*\" or \"autogroup:internet\""),
                    ));
                }
                aliases.push(self.alias(*at, d, Side::Dst, policy)?);
            }
            // One rule per protocol set: `tcp:443` and `udp:53` in one grant are two rules.
            let mut by_proto: BTreeMap<Vec<u8>, Vec<PortRange>> = BTreeMap::new();
            for (at, spec) in &ip {
                let (protos, ports) = parse_ip_spec(spec).map_err(|e| self.error(*at, e))?;
                by_proto.entry(protos).or_default().extend(ports);
            }
            if let Some(at) = via_at
                && !aliases.iter().all(|a| matches!(a, Alias::Host(..) | Alias::Prefix(_) | Alias::Internet))
            {
                return Err(self.error(
                    at,
                    "via steers routes: every dst of a via grant must be a host, a CIDR prefix or autogroup:internet",
                ));
            }
            let line = self.line(here);
            for (protos, ports) in by_proto {
                let dsts: Vec<Dst> = aliases.iter().map(|a| Dst { alias: a.clone(), ports: ports.clone() }).collect();
                self.check_self(here, &src, &dsts, false)?;
                rules.push(Rule { line, src: src.clone(), dst: dsts, protos, via: via.clone() });
            }
        }
        Ok(rules)
    }

    /// `autogroup:self` means "the destination's user's own devices", so the sources must be people: users,
    /// groups, `autogroup:member` (and in `acls`, `*`).
    fn check_self(&self, at: usize, src: &[Alias], dst: &[Dst], star_allowed: bool) -> Result<(), PolicyError> {
        if !dst.iter().any(|d| d.alias == Alias::SelfDevices) {
            return Ok(());
        }
        let people = |a: &Alias| {
            matches!(a, Alias::User(_) | Alias::Group(_) | Alias::Member) || (star_allowed && *a == Alias::Any)
        };
        if src.iter().all(people) {
            Ok(())
        } else {
            Err(self.error(at, "autogroup:self can only be used with users, groups, or supported autogroups in src"))
        }
    }

    fn alias(&self, at: usize, text: &str, side: Side, policy: &Policy) -> Result<Alias, PolicyError> {
        let what = match side {
            Side::Src => "src",
            Side::Dst => "dst",
        };
        resolve_alias(text, side, policy).map_err(|e| self.error(at, format!("{what}={text:?}: {e}")))
    }

    fn tests(&self, value: &Value<'_>) -> Result<Vec<PolicyTest>, PolicyError> {
        let mut tests = Vec::new();
        for entry in &self.array(value, "tests")?.elements {
            let object = self.object(entry, "a tests entry")?;
            let mut test = PolicyTest {
                line: self.line(entry.start()),
                src: String::new(),
                proto: None,
                accept: vec![],
                deny: vec![],
            };
            let mut has_src = false;
            for (at, name, value) in self.properties(object, "a tests entry")? {
                match name.as_str() {
                    "src" => {
                        test.src = self.string(value, "src")?;
                        has_src = true;
                    }
                    "proto" => {
                        let p = self.string(value, "proto")?;
                        test.proto = Some(parse_proto(&p).map_err(|e| self.error(value.start(), e))?);
                    }
                    "accept" => test.accept = self.strings(value, "accept")?.into_iter().map(|(_, s)| s).collect(),
                    "deny" => test.deny = self.strings(value, "deny")?.into_iter().map(|(_, s)| s).collect(),
                    other => {
                        return Err(self.error(
                            at,
                            format!("tests: unknown key {other:?} (a test has src, proto, accept and deny)"),
                        ));
                    }
                }
            }
            if !has_src || test.src.is_empty() {
                return Err(self.error(entry.start(), "test(s) failed: a test needs a \"src\""));
            }
            tests.push(test);
        }
        Ok(tests)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Src,
    Dst,
}

pub(super) fn parse_net(text: &str) -> Option<IpNet> {
    if let Ok(net) = text.parse::<IpNet>() {
        return (net.trunc() == net).then_some(net);
    }
    text.parse::<IpAddr>().ok().map(IpNet::from)
}

/// What a selector names, checked against the policy's groups, hosts and tags.
pub(super) fn resolve_alias(text: &str, side: Side, policy: &Policy) -> Result<Alias, String> {
    if text == "*" {
        return Ok(Alias::Any);
    }
    if text.starts_with("group:") {
        return if policy.groups.contains_key(text) {
            Ok(Alias::Group(text.to_string()))
        } else {
            Err(format!("group not found: {text:?} (define it in groups)"))
        };
    }
    if text.starts_with("tag:") {
        return if policy.tag_owners.contains_key(text) {
            Ok(Alias::Tag(text.to_string()))
        } else {
            Err(format!("tag not found: {text:?} (give it an owner in tagOwners)"))
        };
    }
    if let Some(name) = text.strip_prefix("autogroup:") {
        return match (name, side) {
            ("member", _) => Ok(Alias::Member),
            ("tagged", _) => Ok(Alias::Tagged),
            ("self", Side::Dst) => Ok(Alias::SelfDevices),
            ("self", Side::Src) => Err("\"autogroup:self\" not valid on the src side of a rule".into()),
            ("internet", Side::Dst) => Ok(Alias::Internet),
            ("internet", Side::Src) => Err("autogroup:internet is only a destination".into()),
            ("danger-all", Side::Src) => Ok(Alias::DangerAll),
            ("danger-all", Side::Dst) => Err("cannot use autogroup:danger-all as a dst".into()),
            _ => Err(format!(
                "unknown autogroup {text:?} (meshd has autogroup:member, tagged, self, internet and danger-all)"
            )),
        };
    }
    if let Some(user) = text.strip_prefix("user:") {
        return if user.contains('@') && !user.starts_with('@') {
            Ok(Alias::User(user.to_string()))
        } else {
            Err("write user:NAME@DOMAIN or user:*@DOMAIN".into())
        };
    }
    if text.contains('@') {
        return Ok(Alias::User(text.to_string()));
    }
    if let Some(net) = policy.hosts.get(text) {
        return Ok(Alias::Host(text.to_string(), *net));
    }
    if let Some(net) = parse_net(text) {
        return Ok(Alias::Prefix(net));
    }
    if text.parse::<IpNet>().is_ok() {
        return Err("the prefix has host bits set; write the network address".into());
    }
    Err("not a user (user@domain), group:, tag:, autogroup:, host name, IP or CIDR prefix".into())
}

/// `*`, or a comma-separated list of ports and ranges.
pub(super) fn parse_ports(text: &str) -> Result<Vec<PortRange>, String> {
    if text == "*" {
        return Ok(vec![PortRange::ALL]);
    }
    text.split(',').map(parse_port_range).collect()
}

fn parse_port_range(text: &str) -> Result<PortRange, String> {
    let number = |s: &str, which: &str| {
        s.parse::<u16>().map_err(|_| format!("port range {text:?}: invalid {which} integer (ports are 1-65535 or *)"))
    };
    let (first, last) = match text.split_once('-') {
        Some((a, b)) => (number(a, "first")?, number(b, "last")?),
        None => {
            let p = number(text, "first")?;
            (p, p)
        }
    };
    if first == 0 {
        return Err(format!("port range {text:?}: first port must be >0, or use '*' for wildcard"));
    }
    if last < first {
        return Err(format!("port range {text:?}: the last port is below the first"));
    }
    Ok(PortRange { first, last })
}

pub fn parse_proto(text: &str) -> Result<u8, String> {
    let lower = text.to_ascii_lowercase();
    if let Some((_, n)) = PROTOCOLS.iter().find(|(name, _)| *name == lower) {
        return Ok(*n);
    }
    if !lower.is_empty()
        && lower.bytes().all(|b| b.is_ascii_digit())
        && !lower.starts_with('0')
        && let Ok(n) = lower.parse::<u8>()
    {
        return Ok(n);
    }
    Err(format!("proto {text:?}: not a protocol (tcp, udp, icmp, sctp, ... or a number 1-255)"))
}

/// Only protocols with ports may name ports; every other protocol takes `*`.
fn check_ports_for(protos: &[u8], ports: &[PortRange]) -> Result<(), String> {
    let has_ports = |p: &u8| matches!(p, 6 | 17 | 132);
    if protos.is_empty() || protos.iter().all(has_ports) || ports == [PortRange::ALL] {
        Ok(())
    } else {
        Err("only tcp, udp and sctp have ports; use * with this protocol".into())
    }
}

/// A grant's `ip` entry: `*`, ports (`22`, `80-443`), or `proto:ports` (`tcp:443`, `icmp:*`).
fn parse_ip_spec(text: &str) -> Result<(Vec<u8>, Vec<PortRange>), String> {
    if text == "*" {
        return Ok((Vec::new(), vec![PortRange::ALL]));
    }
    match text.split_once(':') {
        Some((proto, ports)) => {
            let proto = parse_proto(proto)?;
            let ports = parse_ports(ports)?;
            check_ports_for(&[proto], &ports)?;
            Ok((vec![proto], ports))
        }
        None if text.bytes().next().is_some_and(|b| b.is_ascii_digit()) => Ok((Vec::new(), parse_ports(text)?)),
        None => Err(format!("ip {text:?}: write PROTO:PORTS (icmp:*, tcp:443), PORTS or *")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_lines_and_character_columns() {
        assert_eq!(line_and_column("{\n  \"é\": x", 10), (2, 8));
        assert_eq!(line_and_column("abc", 0), (1, 1));
    }

    #[test]
    fn ports_and_protocols_read_as_tailscale_reads_them() {
        assert_eq!(parse_ports("*").unwrap(), vec![PortRange::ALL]);
        assert_eq!(
            parse_ports("22,80-443").unwrap(),
            vec![PortRange { first: 22, last: 22 }, PortRange { first: 80, last: 443 }]
        );
        assert!(parse_ports("ssh").unwrap_err().contains("invalid first integer"));
        assert!(parse_ports("0").unwrap_err().contains("first port must be >0"));
        assert!(parse_ports("99999").is_err());
        assert!(parse_ports("-1").is_err());
        assert_eq!(parse_proto("TCP").unwrap(), 6);
        assert_eq!(parse_proto("47").unwrap(), 47);
        assert!(parse_proto("047").is_err());
        assert!(parse_proto("*").is_err());
        assert_eq!(parse_ip_spec("47").unwrap(), (vec![], vec![PortRange { first: 47, last: 47 }]));
        assert_eq!(parse_ip_spec("icmp:*").unwrap(), (vec![1], vec![PortRange::ALL]));
        assert!(parse_ip_spec("icmp").is_err());
        assert!(parse_ip_spec("icmp:22").is_err());
    }
}
