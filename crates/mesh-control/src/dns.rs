//! The mesh's DNS settings as an admin writes them (`meshd control dns set FILE`, HuJSON in Headscale's
//! shape), and node names as DNS labels.

use std::collections::BTreeMap;
use std::net::IpAddr;

use mesh_proto::{DnsConfig, ExtraRecord, RecordKind};
use serde::Deserialize;

/// Bounds, so one settings file cannot grow every netmap without limit.
const MAX_SPLIT_ZONES: usize = 256;
const MAX_RESOLVERS: usize = 16;
const MAX_SEARCH_DOMAINS: usize = 16;
const MAX_EXTRA_RECORDS: usize = 1024;

/// The resolver's own address: pointing nodes at it as an upstream would make every query loop.
const QUAD_100: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(100, 100, 100, 100));

/// The file's shape. Unknown keys are refused: a misspelt `magic_dsn` must not silently mean the default.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DnsFile {
    #[serde(default = "yes")]
    magic_dns: bool,
    #[serde(default)]
    nameservers: Nameservers,
    #[serde(default)]
    search_domains: Vec<String>,
    #[serde(default)]
    extra_records: Vec<ExtraRecordFile>,
    #[serde(default)]
    override_local_dns: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Nameservers {
    #[serde(default)]
    global: Vec<String>,
    #[serde(default)]
    split: BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtraRecordFile {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    value: String,
}

/// Reads DNS settings; `domain` is the mesh's, which no split zone may take over. Every refusal says what to
/// change.
pub fn parse(text: &str, domain: &str) -> Result<DnsConfig, String> {
    // The whole text first, as one value that must be an object: jsonc-parser's serde path alone takes
    // `[]]]]]` for an empty struct (found by the control_api fuzz target).
    match jsonc_parser::parse_to_value(text, &crate::policy::parse::hujson()).map_err(|e| format!("dns: {e}"))? {
        None | Some(jsonc_parser::JsonValue::Object(_)) => {}
        Some(_) => return Err("dns: the settings must be an object: {...}".into()),
    }
    let file: Option<DnsFile> =
        jsonc_parser::parse_to_serde_value(text, &crate::policy::parse::hujson()).map_err(|e| format!("dns: {e}"))?;
    let file = file.ok_or("dns: the file is empty; write {} for the defaults")?;
    let mut config = DnsConfig {
        magic_dns: file.magic_dns,
        override_local_dns: file.override_local_dns,
        nameservers: resolvers(&file.nameservers.global, "nameservers.global")?,
        ..DnsConfig::default()
    };
    if config.override_local_dns && config.nameservers.is_empty() {
        return Err("dns: override_local_dns needs nameservers.global: with none, names outside the mesh would \
                    not resolve at all"
            .into());
    }
    if file.nameservers.split.len() > MAX_SPLIT_ZONES {
        return Err(format!("dns: at most {MAX_SPLIT_ZONES} zones in nameservers.split"));
    }
    let mesh_zone = normalize_name(domain).unwrap_or_else(|_| domain.to_ascii_lowercase());
    for (zone, list) in &file.nameservers.split {
        let what = format!("nameservers.split \"{}\"", quoted(zone));
        let zone = normalize_name(zone).map_err(|e| format!("dns: {what}: {e}"))?;
        if zone == mesh_zone || mesh_zone.ends_with(&format!(".{zone}")) {
            return Err(format!(
                "dns: {what} would take {mesh_zone} away from the mesh's own names; split a zone outside it"
            ));
        }
        if config.split.insert(zone.clone(), resolvers(list, &what)?).is_some() {
            return Err(format!("dns: {what} is given twice (zones are case-insensitive)"));
        }
    }
    if file.search_domains.len() > MAX_SEARCH_DOMAINS {
        return Err(format!("dns: at most {MAX_SEARCH_DOMAINS} search_domains"));
    }
    for domain in &file.search_domains {
        let name = normalize_name(domain).map_err(|e| format!("dns: search_domains \"{}\": {e}", quoted(domain)))?;
        if !config.search_domains.contains(&name) {
            config.search_domains.push(name);
        }
    }
    if file.extra_records.len() > MAX_EXTRA_RECORDS {
        return Err(format!("dns: at most {MAX_EXTRA_RECORDS} extra_records"));
    }
    for record in &file.extra_records {
        let what = format!("extra_records \"{}\"", quoted(&record.name));
        let name = normalize_name(&record.name).map_err(|e| format!("dns: {what}: {e}"))?;
        let value: IpAddr = record
            .value
            .parse()
            .map_err(|_| format!("dns: {what}: \"{}\" is not an IP address", quoted(&record.value)))?;
        let kind = match (record.kind.as_str(), value) {
            ("A", IpAddr::V4(_)) => RecordKind::A,
            ("AAAA", IpAddr::V6(_)) => RecordKind::AAAA,
            ("A" | "AAAA", _) => {
                return Err(format!("dns: {what}: type {} does not fit the address {value}", record.kind));
            }
            (other, _) => {
                return Err(format!("dns: {what}: type \"{}\" is not served; use A or AAAA", quoted(other)));
            }
        };
        config.extra_records.push(ExtraRecord { name, kind, value });
    }
    Ok(config)
}

fn resolvers(list: &[String], what: &str) -> Result<Vec<IpAddr>, String> {
    if list.len() > MAX_RESOLVERS {
        return Err(format!("dns: at most {MAX_RESOLVERS} resolvers in {what}"));
    }
    let mut out = Vec::new();
    for text in list {
        let ip: IpAddr = text.parse().map_err(|_| {
            format!("dns: {what}: \"{}\" is not an IP address (resolvers are given by address, port 53)", quoted(text))
        })?;
        if ip == QUAD_100 || ip.is_unspecified() || ip.is_multicast() {
            return Err(format!("dns: {what}: {ip} cannot be a resolver"));
        }
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// A domain name as nodes compare it: lower case, no trailing dot, every label 1 to 63 letters, digits,
/// dashes or underscores (service names like `_ldap._tcp`), not starting or ending with a dash, at most
/// 253 characters.
pub fn normalize_name(text: &str) -> Result<String, String> {
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 {
        return Err("a domain name has 1 to 253 characters".into());
    }
    for label in name.split('.') {
        let valid = (1..=63).contains(&label.len())
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !valid {
            return Err(format!(
                "\"{}\" is not a valid label: 1 to 63 letters, digits and dashes, not starting or ending with a dash",
                quoted(label)
            ));
        }
    }
    Ok(name)
}

/// A hostname as a DNS label: lower case, every run of characters outside `[a-z0-9-]` one dash, no dash
/// at either end, at most 63 characters. `None` when nothing of it is left (`___`, an emoji).
pub fn label_of(hostname: &str) -> Option<String> {
    let mut label = String::with_capacity(hostname.len().min(63));
    let mut in_run = false;
    for c in hostname.chars().map(|c| c.to_ascii_lowercase()) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
            label.push(c);
            in_run = false;
        } else if !in_run {
            label.push('-');
            in_run = true;
        }
    }
    let label: String = label.trim_matches('-').chars().take(63).collect();
    let label = label.trim_end_matches('-');
    let has_alnum = label.bytes().any(|b| b.is_ascii_alphanumeric());
    has_alnum.then(|| label.to_string())
}

/// Whether `name` may be given to a node as it is (`nodes rename`).
pub fn is_label(name: &str) -> bool {
    label_of(name).as_deref() == Some(name)
}

/// At most 64 characters of untrusted text, with control characters escaped, for an error message.
fn quoted(text: &str) -> String {
    text.chars().take(64).flat_map(char::escape_default).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_become_labels_as_the_issue_and_seed_000_say() {
        assert_eq!(label_of("orchestrator.dev.cwiq.io").as_deref(), Some("orchestrator-dev-cwiq-io"));
        assert_eq!(label_of("Stackeye_DB prd").as_deref(), Some("stackeye-db-prd"));
        assert_eq!(label_of("a..@@b").as_deref(), Some("a-b"));
        assert_eq!(label_of("-x-").as_deref(), Some("x"));
        assert_eq!(label_of("___"), None);
        assert_eq!(label_of("💥"), None);
        assert_eq!(label_of(""), None);
        let long = "a".repeat(62) + ".b";
        assert_eq!(label_of(&long).as_deref(), Some("a".repeat(62).as_str()), "no dash left at the cut");
        assert!(is_label("db-prd"));
        assert!(!is_label("db.prd"));
        assert!(!is_label("DB"));
    }

    #[test]
    fn the_issues_example_file_parses() {
        let text = r#"{
            // seed 000: the company zone is answered inside VPC A
            "magic_dns": true,
            "nameservers": {
                "global": ["1.1.1.1"],
                "split": {"Shared.CWIQ.io.": ["10.0.0.2"], "corp.internal": []},
            },
            "search_domains": ["cwiq.io"],
            "extra_records": [{"name": "langfuse.cwiq.io", "type": "A", "value": "100.64.0.7"}],
        }"#;
        let config = parse(text, "mesh.internal").unwrap();
        assert!(config.magic_dns && !config.override_local_dns);
        assert_eq!(config.nameservers, vec!["1.1.1.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(config.split["shared.cwiq.io"], vec!["10.0.0.2".parse::<IpAddr>().unwrap()]);
        assert!(config.split["corp.internal"].is_empty());
        assert_eq!(config.search_domains, ["cwiq.io"]);
        assert_eq!(config.extra_records[0].name, "langfuse.cwiq.io");
        assert_eq!(parse("{}", "mesh.internal").unwrap(), DnsConfig::default());
    }

    #[test]
    fn bad_settings_are_refused_with_what_to_change() {
        let refused = |text: &str| parse(text, "mesh.internal").unwrap_err();
        assert!(refused(r#"{"magic_dsn": true}"#).contains("magic_dsn"));
        assert!(refused(r#"{"nameservers": {"global": ["dns.google"]}}"#).contains("not an IP address"));
        assert!(refused(r#"{"nameservers": {"global": ["100.100.100.100"]}}"#).contains("cannot be a resolver"));
        assert!(refused(r#"{"nameservers": {"split": {"mesh.internal": ["10.0.0.2"]}}}"#).contains("mesh's own"));
        assert!(refused(r#"{"nameservers": {"split": {"internal": ["10.0.0.2"]}}}"#).contains("mesh's own"));
        assert!(refused(r#"{"nameservers": {"split": {"a..b": ["10.0.0.2"]}}}"#).contains("valid label"));
        assert!(refused(r#"{"override_local_dns": true}"#).contains("nameservers.global"));
        assert!(
            refused(r#"{"extra_records": [{"name": "x.example", "type": "AAAA", "value": "10.0.0.1"}]}"#)
                .contains("does not fit")
        );
        assert!(
            refused(r#"{"extra_records": [{"name": "x.example", "type": "CNAME", "value": "10.0.0.1"}]}"#)
                .contains("A or AAAA")
        );
        assert!(refused("{\"magic_dns\": true,,}").starts_with("dns: "));
        // Not an object: jsonc-parser's serde path alone took `[]]]]]` for the defaults (the fuzz target).
        for text in ["[]]]]]", "[]", "true", "\"magic_dns\"", "{}}"] {
            assert!(refused(text).starts_with("dns: "), "{text}");
        }
        assert!(refused("").contains("empty"));
    }
}
