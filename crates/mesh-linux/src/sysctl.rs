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

/// `net.ipv6.conf.<interface>.proxy_ndp`, spelled so a dotted interface name survives.
pub fn proxy_ndp_key(interface: &str) -> String {
    format!("net/ipv6/conf/{interface}/proxy_ndp")
}

/// Whether a saved sysctl read back from the run-state file is one meshd itself could have saved: one of
/// the two per-interface keys above with a real interface name, and a plain number to put back. Anything
/// else (a key with `..`, `kernel/core_pattern`, a value that is a command) is not written under
/// /proc/sys, whoever edited the file.
pub fn is_restorable(key: &str, value: &str) -> bool {
    let interface = key
        .strip_prefix("net/ipv4/neigh/")
        .and_then(|rest| rest.strip_suffix("/proxy_delay"))
        .or_else(|| key.strip_prefix("net/ipv6/conf/").and_then(|rest| rest.strip_suffix("/proxy_ndp")));
    let interface_ok = interface.is_some_and(|name| {
        // The kernel's rules for interface names: 1 to 15 bytes, no '/', no whitespace, not "." or "..".
        (1..=15).contains(&name.len())
            && name != "."
            && name != ".."
            && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
    });
    interface_ok && (1..=10).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit())
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
    fn only_keys_meshd_saves_are_restored_from_the_run_state_file() {
        assert!(is_restorable(&proxy_delay_key("eth0.100"), "80"));
        assert!(is_restorable(&proxy_ndp_key("lan0"), "0"));
        for (key, value) in [
            ("kernel/core_pattern", "1"),
            ("net/ipv4/neigh/../../../kernel/core_pattern/proxy_delay", "1"),
            ("net/ipv4/neigh/../proxy_delay", "1"),
            ("net/ipv4/neigh/averyveryverylongname/proxy_delay", "1"),
            ("net/ipv4/neigh/eth0/proxy_delay", "|/tmp/x"),
            ("net/ipv4/neigh/eth0/proxy_delay", ""),
            ("net.ipv4.ip_forward", "0"),
        ] {
            assert!(!is_restorable(key, value), "{key}={value}");
        }
    }

    #[test]
    fn keys_with_dotted_interface_names_keep_their_dots() {
        assert_eq!(path("net.ipv4.ip_forward"), PathBuf::from("/proc/sys/net/ipv4/ip_forward"));
        assert_eq!(path(&proxy_delay_key("eth0.100")), PathBuf::from("/proc/sys/net/ipv4/neigh/eth0.100/proxy_delay"));
    }
}
