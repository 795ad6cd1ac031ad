//! Per-interface sysctls meshd sets on interfaces it names, and puts back when it stops.

use std::io;
use std::path::PathBuf;

/// A key written with dots (`net.ipv4.ip_forward`) or, when an interface name may hold dots, with slashes.
fn path(key: &str) -> PathBuf {
    let relative = if key.contains('/') { key.to_string() } else { key.replace('.', "/") };
    PathBuf::from("/proc/sys").join(relative)
}

/// Reads a sysctl such as `net.ipv4.ip_forward`. Interface names may contain dots; pass those keys with `/`.
pub fn read(key: &str) -> io::Result<String> {
    std::fs::read_to_string(path(key)).map(|s| s.trim().to_string())
}

pub fn write(key: &str, value: &str) -> io::Result<()> {
    std::fs::write(path(key), value).map_err(|e| io::Error::new(e.kind(), format!("setting {key}={value}: {e}")))
}

/// `net.ipv4.neigh.<interface>.proxy_delay`, spelled so a dotted interface name survives.
pub fn proxy_delay_key(interface: &str) -> String {
    format!("net/ipv4/neigh/{interface}/proxy_delay")
}

/// A sysctl changed by meshd, with the value to put back.
#[derive(Debug, Clone)]
pub struct Saved {
    pub key: String,
    pub old: String,
}

/// Sets `key` to `value` and returns what it was, unless it already was `value`.
pub fn set(key: &str, value: &str) -> io::Result<Option<Saved>> {
    let old = read(key)?;
    if old == value {
        return Ok(None);
    }
    write(key, value)?;
    Ok(Some(Saved { key: key.to_string(), old }))
}

pub fn restore(saved: &Saved) -> io::Result<()> {
    write(&saved.key, &saved.old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_with_dotted_interface_names_keep_their_dots() {
        assert_eq!(path("net.ipv4.ip_forward"), PathBuf::from("/proc/sys/net/ipv4/ip_forward"));
        assert_eq!(path(&proxy_delay_key("eth0.100")), PathBuf::from("/proc/sys/net/ipv4/neigh/eth0.100/proxy_delay"));
    }
}
