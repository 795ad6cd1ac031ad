//! The file a running daemon keeps in its run directory (`<run-dir>/<tun>.json`) for `meshd doctor` and for
//! the next run after a crash: the routing numbers it runs with, what it serves, its SNAT plumbing and the
//! sysctl values from before meshd. One type, written by the daemon and read by doctor and the daemon.

use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use mesh_dataplane::router::Served;
use mesh_linux::sysctl;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub table: u32,
    pub fwmark: u32,
    pub rule_priority: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedRoute {
    pub prefix: IpNet,
    pub snat: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnatPlumbing {
    pub address: IpAddr,
    /// The LAN interface that answers ARP or neighbour solicitations for the address.
    pub lan: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSysctl {
    pub key: String,
    pub old: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunState {
    pub policy: Option<Policy>,
    /// `None`: every accepted route; otherwise only those inside these prefixes (`--accept-routes=..`).
    pub accept_routes: Option<Vec<IpNet>>,
    pub served: Vec<ServedRoute>,
    pub snat: Vec<SnatPlumbing>,
    /// What to put back, so a run after a crash can still restore the values from before meshd.
    pub sysctls: Vec<SavedSysctl>,
}

impl RunState {
    /// The state at `path`, or the empty state if there is none or it cannot be read (a file from another
    /// version is no reason to fail: doctor then reports less, the daemon restores less).
    pub fn read(path: &Path) -> Self {
        std::fs::read_to_string(path).ok().and_then(|text| serde_json::from_str(&text).ok()).unwrap_or_default()
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string(self).map_err(std::io::Error::other)?)
    }

    pub fn served_routes(served: &[Served]) -> Vec<ServedRoute> {
        served.iter().map(|s| ServedRoute { prefix: s.prefix, snat: s.snat }).collect()
    }

    /// The sysctls to put back; any the daemon could not have saved itself are left out and logged.
    pub fn saved_sysctls(&self) -> Vec<sysctl::Saved> {
        self.sysctls
            .iter()
            .filter(|s| {
                let ok = sysctl::is_restorable(&s.key, &s.old);
                if !ok {
                    tracing::warn!(key = ?s.key, "the run-state file names a sysctl meshd never sets; not restoring it");
                }
                ok
            })
            .map(|s| sysctl::Saved { key: s.key.clone(), old: s.old.clone() })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_state_reads_back_and_a_broken_one_reads_as_empty() {
        let dir = std::env::temp_dir().join(format!("meshd-run-state-{}", std::process::id()));
        let path = dir.join("mesh0.json");
        let state = RunState {
            policy: Some(Policy { table: 52, fwmark: 0x80000, rule_priority: 5210 }),
            accept_routes: Some(vec!["10.52.0.0/16".parse().unwrap()]),
            served: vec![ServedRoute { prefix: "10.0.0.0/16".parse().unwrap(), snat: true }],
            snat: vec![SnatPlumbing { address: "10.0.12.9".parse().unwrap(), lan: "eth0.100".into() }],
            sysctls: vec![SavedSysctl { key: "net/ipv4/neigh/eth0.100/proxy_delay".into(), old: "80".into() }],
        };
        state.write(&path).unwrap();
        assert_eq!(RunState::read(&path), state);
        let mut tampered = state.clone();
        tampered.sysctls.push(SavedSysctl { key: "kernel/core_pattern".into(), old: "|/tmp/evil".into() });
        assert_eq!(tampered.saved_sysctls().len(), 1, "only the key meshd saved is restored");
        std::fs::write(&path, "{not json").unwrap();
        assert_eq!(RunState::read(&path), RunState::default());
        assert_eq!(RunState::read(&dir.join("missing.json")), RunState::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
