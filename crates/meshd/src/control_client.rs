//! `meshd control <verb>`: administration of the coordination server over its HTTPS API, with the admin
//! token. Output is plain text for people and one value per line where scripts want it (`authkey create`
//! prints only the key).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use ureq::tls::{PemItem, RootCerts, TlsConfig};

use crate::error::Error;
use crate::follow::escape_controls;

#[derive(Debug, Clone)]
pub struct Connection {
    pub url: String,
    /// The token itself, or `file:PATH`.
    pub admin_token: String,
    pub ca_cert: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub enum Verb {
    KeyCreate {
        reusable: bool,
        ephemeral: bool,
        tags: Vec<String>,
        expiry: Option<String>,
        user: Option<String>,
    },
    KeyList,
    KeyRevoke(u64),
    UserList,
    UserCreate(String),
    UserDelete(String),
    NodeList,
    /// A node by name or id.
    NodeDelete(String),
    NodeExpire(String),
    NodeRename {
        node: String,
        name: String,
    },
    RouteList,
    RouteSet {
        node: String,
        prefix: ipnet::IpNet,
        approve: bool,
    },
    PolicyGet,
    PolicySet(PathBuf),
    PolicyCheck(PathBuf),
    DnsGet,
    DnsSet(PathBuf),
    /// A one-time sign-in link to the admin console.
    AdminLink,
    /// SRC, DST:PORT[/PROTO].
    PolicyExplain {
        src: String,
        dst: String,
    },
}

/// Seconds in `90d`, `12h`, `30m` or `45s`.
/// A node name or id as one URL path segment: anything but the characters names are made of is
/// percent-encoded, so a typo cannot reach another route of the API.
fn path_segment(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub fn parse_duration(text: &str) -> Result<u64, String> {
    // Split before the last character, not the last byte: a non-ASCII unit is an error, not a panic.
    let at = text.char_indices().last().map_or(0, |(i, _)| i);
    let (number, unit) = text.split_at(at);
    let factor = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err(format!("{text:?}: expected a number and d, h, m or s, like 90d")),
    };
    let n = number.parse::<u64>().map_err(|_| format!("{text:?}: expected a number and d, h, m or s, like 90d"))?;
    n.checked_mul(factor).ok_or_else(|| format!("{text:?}: too long"))
}

pub fn run(connection: Connection, verb: Verb) -> ExitCode {
    crate::finish(execute(&connection, verb))
}

fn agent(connection: &Connection) -> Result<ureq::Agent, Error> {
    https_agent(connection.ca_cert.as_deref(), None).map_err(Error::Input)
}

/// An HTTPS client that trusts `ca_cert` (PEM) when given, else the public web PKI; a status code is an
/// answer, not an error. `timeout` bounds a whole request (a netmap long poll needs more than the default).
pub fn https_agent(
    ca_cert: Option<&std::path::Path>,
    timeout: Option<std::time::Duration>,
) -> Result<ureq::Agent, String> {
    let mut tls = TlsConfig::builder();
    if let Some(path) = ca_cert {
        let pem = std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let certs: Vec<_> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| if let Ok(PemItem::Certificate(c)) = item { Some(c) } else { None })
            .collect();
        if certs.is_empty() {
            return Err(format!("{}: no PEM certificate in it", path.display()));
        }
        tls = tls.root_certs(RootCerts::Specific(Arc::new(certs)));
    }
    Ok(ureq::Agent::config_builder()
        .tls_config(tls.build())
        .http_status_as_error(false)
        .timeout_connect(Some(std::time::Duration::from_secs(5)))
        .timeout_global(timeout)
        .build()
        .into())
}

fn token(connection: &Connection) -> Result<String, Error> {
    match connection.admin_token.strip_prefix("file:") {
        Some(path) => std::fs::read_to_string(path)
            .map(|t| t.trim().to_string())
            .map_err(|e| Error::Input(format!("{path}: cannot read the admin token: {e}"))),
        None if connection.admin_token.is_empty() => {
            Err(Error::Input("an admin token is needed: --admin-token TOKEN|file:PATH or MESHD_ADMIN_TOKEN".into()))
        }
        None => Ok(connection.admin_token.clone()),
    }
}

/// Sends one request and returns the body of a success, or the server's one-line error.
/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn call(connection: &Connection, method: &str, path: &str, body: Option<String>) -> Result<String, Error> {
    let agent = agent(connection)?;
    let url = format!("{}/api/v1/admin/{path}", connection.url.trim_end_matches('/'));
    let auth = format!("Bearer {}", token(connection)?);
    let unreachable =
        |e: ureq::Error| Error::System(format!("cannot reach the coordination server at {}: {e}", connection.url));
    let mut response = match (method, body) {
        ("GET", _) => agent.get(&url).header("authorization", &auth).call().map_err(unreachable)?,
        ("DELETE", _) => agent.delete(&url).header("authorization", &auth).call().map_err(unreachable)?,
        ("PUT", Some(b)) => agent.put(&url).header("authorization", &auth).send(b).map_err(unreachable)?,
        (_, b) => agent
            .post(&url)
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .send(b.unwrap_or_default())
            .map_err(unreachable)?,
    };
    let status = response.status();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    if status.is_success() {
        return Ok(text);
    }
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["message"].as_str().map(escape_controls))
        .unwrap_or_else(|| format!("the server answered {status}"));
    Err(Error::System(message))
}

fn json(text: &str) -> Result<serde_json::Value, Error> {
    serde_json::from_str(text).map_err(|e| Error::System(format!("unexpected answer from the server: {e}")))
}

fn execute(c: &Connection, verb: Verb) -> Result<String, Error> {
    match verb {
        Verb::KeyCreate { reusable, ephemeral, tags, expiry, user } => {
            let expiry = expiry.map(|e| parse_duration(&e)).transpose().map_err(Error::Input)?;
            let body = serde_json::json!({
                "reusable": reusable, "ephemeral": ephemeral, "tags": tags, "expiry": expiry, "user": user
            });
            let created = json(&call(c, "POST", "authkeys", Some(body.to_string()))?)?;
            Ok(created["key"].as_str().unwrap_or_default().to_string())
        }
        Verb::AdminLink => {
            let link = json(&call(c, "POST", "console-link", None)?)?;
            let path = link["path"].as_str().unwrap_or_default();
            // Printed for a terminal: only the shape the server makes, nothing it could smuggle in.
            let token = path.strip_prefix("/admin/link?token=").unwrap_or_default();
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Error::System("unexpected answer from the server: not a sign-in link".into()));
            }
            let minutes = link["expires_in"].as_u64().unwrap_or(600) / 60;
            eprintln!("Open this link in a browser within {minutes} minutes; it signs in once.");
            Ok(format!("{}{path}", c.url.trim_end_matches('/')))
        }
        Verb::UserList => {
            let users = json(&call(c, "GET", "users", None)?)?;
            let mut out = format!("{:<4} {:<40} {}", "ID", "NAME", "NODES");
            for u in users.as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "\n{:<4} {:<40} {}",
                    u["id"],
                    escape_controls(u["name"].as_str().unwrap_or("")),
                    u["nodes"]
                ));
            }
            Ok(out)
        }
        Verb::UserCreate(name) => {
            let body = serde_json::json!({"name": name}).to_string();
            call(c, "POST", "users", Some(body)).map(|_| format!("user {} created", escape_controls(&name)))
        }
        Verb::UserDelete(name) => call(c, "DELETE", &format!("users/{}", path_segment(&name)), None)
            .map(|_| format!("user {} deleted", escape_controls(&name))),
        Verb::KeyList => {
            let keys = json(&call(c, "GET", "authkeys", None)?)?;
            let mut out = format!(
                "{:<4} {:<9} {:<10} {:<8} {:>5} {:<12} {}",
                "ID", "REUSABLE", "EPHEMERAL", "REVOKED", "USES", "EXPIRES", "OWNER"
            );
            for k in keys.as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "\n{:<4} {:<9} {:<10} {:<8} {:>5} {:<12} {}",
                    k["id"],
                    k["reusable"],
                    k["ephemeral"],
                    k["revoked"],
                    k["uses"],
                    k["expires_at"].as_u64().map_or("never".into(), |e| e.to_string()),
                    k["tags"]
                        .as_array()
                        .map(|t| t.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","))
                        .filter(|t| !t.is_empty())
                        .or_else(|| k["user"].as_str().map(escape_controls))
                        .unwrap_or_default()
                ));
            }
            Ok(out)
        }
        Verb::KeyRevoke(id) => {
            call(c, "DELETE", &format!("authkeys/{id}"), None).map(|_| format!("auth key {id} revoked"))
        }
        Verb::NodeList => {
            let nodes = json(&call(c, "GET", "nodes", None)?)?;
            let mut out =
                format!("{:<4} {:<24} {:<16} {:<8} {:<24} {}", "ID", "NAME", "IPV4", "ONLINE", "OWNER", "ENDPOINTS");
            let joined = |v: &serde_json::Value| {
                v.as_array()
                    .map(|t| t.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","))
                    .unwrap_or_default()
            };
            for n in nodes.as_array().into_iter().flatten() {
                let tags = joined(&n["tags"]);
                out.push_str(&format!(
                    "\n{:<4} {:<24} {:<16} {:<8} {:<24} {}",
                    n["id"],
                    escape_controls(n["name"].as_str().unwrap_or("")),
                    n["ipv4"].as_str().unwrap_or(""),
                    if n["expired"].as_bool() == Some(true) { "expired".to_string() } else { n["online"].to_string() },
                    // A tagged node is owned by its tags, an untagged one by its user.
                    match (tags.is_empty(), n["user"].as_str()) {
                        (false, _) => tags,
                        (true, Some(user)) => escape_controls(user),
                        (true, None) => "-".to_string(),
                    },
                    joined(&n["endpoints"]),
                ));
            }
            Ok(out)
        }
        Verb::NodeDelete(node) => call(c, "DELETE", &format!("nodes/{}", path_segment(&node)), None)
            .map(|_| format!("node {} deleted", escape_controls(&node))),
        Verb::NodeExpire(node) => call(c, "POST", &format!("nodes/{}/expire", path_segment(&node)), None)
            .map(|_| format!("node {} expired", escape_controls(&node))),
        Verb::NodeRename { node, name } => {
            let body = serde_json::json!({ "name": name }).to_string();
            call(c, "POST", &format!("nodes/{}/rename", path_segment(&node)), Some(body))
                .map(|_| format!("node {} renamed {}", escape_controls(&node), escape_controls(&name)))
        }
        Verb::RouteList => {
            let routes = json(&call(c, "GET", "routes", None)?)?;
            let mut out = format!("{:<4} {:<24} {:<20} {:<9} {}", "NODE", "NAME", "PREFIX", "APPROVED", "PRIMARY");
            for r in routes.as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "\n{:<4} {:<24} {:<20} {:<9} {}",
                    r["node"],
                    escape_controls(r["name"].as_str().unwrap_or("")),
                    r["prefix"].as_str().unwrap_or(""),
                    r["approved"],
                    r["primary"]
                ));
            }
            Ok(out)
        }
        Verb::RouteSet { node, prefix, approve } => {
            let body = serde_json::json!({"node": node, "prefix": prefix.to_string()}).to_string();
            let path = if approve { "routes/approve" } else { "routes/reject" };
            call(c, "POST", path, Some(body)).map(|_| {
                format!("{prefix} of {} {}", escape_controls(&node), if approve { "approved" } else { "rejected" })
            })
        }
        Verb::PolicyGet => call(c, "GET", "policy", None),
        Verb::DnsGet => call(c, "GET", "dns", None),
        Verb::DnsSet(path) => {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
            let answer = json(&call(c, "PUT", "dns", Some(text))?)?;
            Ok(format!("DNS settings set (version {})", answer["version"]))
        }
        Verb::PolicySet(path) | Verb::PolicyCheck(path) if !path.exists() => {
            Err(Error::Input(format!("{}: no such file", path.display())))
        }
        Verb::PolicySet(path) => {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
            let change = json(&call(c, "PUT", "policy", Some(text))?)?;
            let mut out = format!("policy set (version {})", change["version"]);
            for (key, what) in [("tags_revoked", "tag taken back"), ("approvals_revoked", "route approval taken back")]
            {
                for item in change[key].as_array().into_iter().flatten() {
                    out.push_str(&format!("\n  {what}: {}", escape_controls(item.as_str().unwrap_or(""))));
                }
            }
            Ok(out)
        }
        Verb::PolicyExplain { src, dst } => {
            let (target, proto) = dst.split_once('/').unwrap_or((dst.as_str(), "tcp"));
            let (host, port) = target
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.trim_start_matches('[').trim_end_matches(']'), p.parse::<u16>().ok()?)))
                .ok_or_else(|| {
                    Error::Input(format!("{dst:?}: write DST:PORT or DST:PORT/PROTO (db:5432, 10.0.0.5:443/tcp)"))
                })?;
            let query =
                format!("policy/explain?src={}&dst={}&port={port}&proto={}", encode(&src), encode(host), encode(proto));
            call(c, "GET", &query, None).map(|text| escape_controls(&text))
        }
        Verb::PolicyCheck(path) => {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
            call(c, "POST", "policy/check", Some(text)).map(|_| "policy ok".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90d"), Ok(90 * 86_400));
        assert_eq!(parse_duration("12h"), Ok(43_200));
        assert_eq!(parse_duration("45s"), Ok(45));
        assert!(parse_duration("90").is_err());
        assert!(parse_duration("d").is_err());
        assert!(parse_duration("1.5h").is_err());
        assert!(parse_duration("99999999999999999d").is_err(), "overflow is an error, not a panic");
        assert!(parse_duration("9é").is_err() && parse_duration("").is_err(), "no panic on odd text");
    }
}
