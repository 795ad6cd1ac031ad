//! Direct mode of host DNS: `/etc/resolv.conf` points at the mesh's resolver while meshd runs, and is put back
//! byte for byte when it stops, and on the next start after a crash. The original is kept in the state
//! directory (which outlives a reboot, unlike /run), so a node killed mid-run never leaves the host
//! pointing at a resolver nobody answers for longer than until meshd starts again.
//!
//! The file is rewritten in place (not renamed over), so a bind-mounted resolv.conf (`ip netns exec`,
//! containers) works; a symbolic link (systemd-resolved's stub, say) is replaced by a file and the link
//! comes back on restore. Another program rewriting the file is taken as the host's new configuration: it
//! becomes the original and ours goes back on top, at most a few times a minute, then meshd gives up with
//! one warning rather than fight.

use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How many rewrites by another program are answered within [`TRAMPLE_WINDOW`] before meshd gives up.
const MAX_TRAMPLES: usize = 5;
const TRAMPLE_WINDOW: Duration = Duration::from_secs(60);
/// The first line of the file meshd writes; a file starting with it is meshd's.
const HEADER: &str = "# resolv.conf(5) written by meshd";

/// What was at the path before meshd wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Original {
    File(String),
    Symlink(PathBuf),
    Missing,
}

impl Original {
    fn read(path: &Path) -> std::io::Result<Self> {
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Original::Missing),
            Err(e) => Err(e),
            Ok(meta) if meta.file_type().is_symlink() => Ok(Original::Symlink(fs::read_link(path)?)),
            Ok(_) => Ok(Original::File(fs::read_to_string(path)?)),
        }
    }

    /// Its text (through a link, which may be replaced by meshd's file meanwhile), for the nameservers and
    /// search list it names.
    fn text(&self, path: &Path) -> String {
        match self {
            Original::File(text) => text.clone(),
            Original::Symlink(target) => {
                let target = path.parent().map_or_else(|| target.clone(), |dir| dir.join(target));
                fs::read_to_string(target).unwrap_or_default()
            }
            Original::Missing => String::new(),
        }
    }
}

/// The parts of a resolv.conf meshd carries over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub nameservers: Vec<IpAddr>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

pub fn parse(text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                // `nameserver fe80::1%eth0` names a zone; the address alone is what a socket can use here
                // only for global addresses, so a scoped one is skipped.
                if let Some(ip) = words.next().and_then(|w| w.parse().ok()) {
                    parsed.nameservers.push(ip);
                }
            }
            // The last search or domain line wins, as in glibc.
            Some("search") | Some("domain") => parsed.search = words.map(str::to_string).collect(),
            Some("options") => parsed.options.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    parsed
}

/// What meshd wants the host to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub nameservers: Vec<IpAddr>,
    /// The mesh domain and the configured search domains, before the host's own.
    pub search: Vec<String>,
}

/// How direct mode stands, for `meshd dns status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectStatus {
    /// `direct` (meshd writes resolv.conf) or `systemd-resolved` (meshd sets the TUN device's link DNS).
    #[serde(default)]
    pub mode: String,
    pub path: PathBuf,
    /// Whether meshd's file is in place.
    pub active: bool,
    /// meshd stopped rewriting after another program kept replacing the file.
    pub gave_up: bool,
    /// What meshd wrote, when active.
    pub written: Option<String>,
    /// The nameservers of the host's own configuration (the resolver forwards to them).
    pub original_nameservers: Vec<IpAddr>,
    pub tramples: u64,
}

#[derive(Debug)]
pub struct Direct {
    path: PathBuf,
    backup: PathBuf,
    wanted: Option<Wanted>,
    /// What meshd last wrote (to tell its own file from another program's).
    written: Option<String>,
    original: Option<Original>,
    tramples: VecDeque<Instant>,
    total_tramples: u64,
    gave_up: bool,
}

impl Direct {
    /// `path` is the host's resolv.conf; `state_dir` holds the original while meshd's file is in place. A
    /// backup left by a run that crashed is put back first.
    pub fn new(path: PathBuf, state_dir: &Path) -> Self {
        let direct = Direct {
            path,
            backup: state_dir.join("resolv.conf.meshd-backup"),
            wanted: None,
            written: None,
            original: None,
            tramples: VecDeque::new(),
            total_tramples: 0,
            gave_up: false,
        };
        if let Some(original) = direct.read_backup() {
            if !direct.is_ours() {
                // Something wrote a new one since (a DHCP client after a reboot): it is newer than the backup.
                tracing::info!(path = %direct.path.display(), "resolv.conf was rewritten since meshd stopped; its old backup is dropped");
                let _ = fs::remove_file(&direct.backup);
                return direct;
            }
            match direct.put_back(&original) {
                Ok(()) => {
                    tracing::info!(path = %direct.path.display(), "put back the resolv.conf a stopped meshd left")
                }
                Err(e) => {
                    tracing::error!(path = %direct.path.display(), "cannot put back the original resolv.conf: {e}")
                }
            }
        }
        direct
    }

    /// Whether the file at the path is one meshd wrote.
    fn is_ours(&self) -> bool {
        matches!(Original::read(&self.path), Ok(Original::File(text)) if text.starts_with(HEADER))
    }

    fn read_backup(&self) -> Option<Original> {
        let text = fs::read_to_string(&self.backup).ok()?;
        match serde_json::from_str(&text) {
            Ok(original) => Some(original),
            Err(e) => {
                tracing::error!(backup = %self.backup.display(), "the resolv.conf backup is unreadable ({e}); left as it is");
                None
            }
        }
    }

    /// The host's own resolv.conf as it is now or was before meshd wrote it.
    pub fn host_config(&self) -> Parsed {
        match &self.original {
            Some(original) => parse(&original.text(&self.path)),
            None => parse(&fs::read_to_string(&self.path).unwrap_or_default()),
        }
    }

    /// Points the host at `wanted` (or puts the original back for `None`).
    pub fn set(&mut self, wanted: Option<Wanted>) -> Result<(), String> {
        if wanted == self.wanted && (self.written.is_some() || self.gave_up || wanted.is_none()) {
            return Ok(());
        }
        self.wanted = wanted;
        match self.wanted.clone() {
            None => self.restore(),
            Some(_) if self.gave_up => Ok(()),
            Some(wanted) => self.write(&wanted),
        }
    }

    fn write(&mut self, wanted: &Wanted) -> Result<(), String> {
        if self.original.is_none()
            && let Some(backup) = self.read_backup()
        {
            // A backup that could not be put back (or a restore that failed) still holds the host's own
            // file: never replace it with meshd's.
            self.original = Some(backup);
        }
        if self.original.is_none() {
            let original = Original::read(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
            if matches!(&original, Original::File(text) if text.starts_with(HEADER)) {
                // Ours from a run whose backup is gone: there is nothing better to go back to than it.
                tracing::warn!(path = %self.path.display(), "resolv.conf is meshd's own but no backup exists");
            }
            let json = serde_json::to_vec(&original).map_err(|e| e.to_string())?;
            crate::keys::write_private(&self.backup, &json)?;
            self.original = Some(original);
        }
        let host = self.host_config();
        let text = render(wanted, &host, &self.backup);
        let target_is_link = fs::symlink_metadata(&self.path).is_ok_and(|m| m.file_type().is_symlink());
        if target_is_link {
            // Never through the link into another program's file: a file of our own takes its place.
            let staging = self.path.with_extension("meshd-new");
            fs::write(&staging, &text).and_then(|()| fs::rename(&staging, &self.path))
        } else {
            write_in_place(&self.path, &text)
        }
        .map_err(|e| format!("{}: {e}", self.path.display()))?;
        tracing::info!(path = %self.path.display(), "resolv.conf points at the mesh's resolver");
        self.written = Some(text);
        Ok(())
    }

    /// Puts the original back, byte for byte.
    pub fn restore(&mut self) -> Result<(), String> {
        let Some(original) = self.original.take() else { return Ok(()) };
        self.written = None;
        if self.gave_up {
            // The file is another program's now; only the backup goes.
            let _ = fs::remove_file(&self.backup);
            return Ok(());
        }
        self.put_back(&original)?;
        tracing::info!(path = %self.path.display(), "the original resolv.conf is back");
        Ok(())
    }

    fn put_back(&self, original: &Original) -> Result<(), String> {
        let path = &self.path;
        let result = match original {
            Original::File(text) => {
                if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
                    let _ = fs::remove_file(path);
                }
                write_in_place(path, text)
            }
            Original::Symlink(target) => {
                let staging = path.with_extension("meshd-link");
                let _ = fs::remove_file(&staging);
                std::os::unix::fs::symlink(target, &staging).and_then(|()| fs::rename(&staging, path))
            }
            Original::Missing => match fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        };
        result.map_err(|e| format!("{}: {e}", path.display()))?;
        let _ = fs::remove_file(&self.backup);
        Ok(())
    }

    /// Checks that meshd's file is still in place; another program's rewrite becomes the new original and is
    /// covered again, until that happens too often. Returns whether the host's configuration changed (its
    /// nameservers may be new).
    pub fn check(&mut self, now: Instant) -> bool {
        let (Some(written), Some(wanted)) = (&self.written, self.wanted.clone()) else { return false };
        let current = Original::read(&self.path).ok();
        if matches!(&current, Some(Original::File(text)) if text == written) {
            return false;
        }
        let Some(current) = current else { return false };
        self.total_tramples += 1;
        self.tramples.push_back(now);
        while self.tramples.front().is_some_and(|t| now.duration_since(*t) > TRAMPLE_WINDOW) {
            self.tramples.pop_front();
        }
        // Whatever the other program wrote is the host's configuration from now on.
        self.original = Some(current.clone());
        if let Ok(json) = serde_json::to_vec(&current) {
            let _ = crate::keys::write_private(&self.backup, &json);
        }
        if self.tramples.len() > MAX_TRAMPLES {
            tracing::warn!(
                path = %self.path.display(),
                "another program keeps rewriting resolv.conf; meshd leaves it alone (mesh names still answer at \
                 100.100.100.100; see meshd doctor)"
            );
            self.gave_up = true;
            self.written = None;
            let _ = fs::remove_file(&self.backup);
            return true;
        }
        tracing::info!(path = %self.path.display(), "resolv.conf was rewritten by another program; meshd's goes back on top");
        if let Err(e) = self.write(&wanted) {
            tracing::warn!("{e}");
        }
        true
    }

    /// Whether meshd's file is in place.
    pub fn is_active(&self) -> bool {
        self.written.is_some()
    }

    pub fn status(&self) -> DirectStatus {
        DirectStatus {
            mode: "direct".into(),
            path: self.path.clone(),
            active: self.written.is_some(),
            gave_up: self.gave_up,
            written: self.written.clone(),
            original_nameservers: self.host_config().nameservers,
            tramples: self.total_tramples,
        }
    }
}

fn write_in_place(path: &Path, text: &str) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new().write(true).create(true).truncate(true).open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

fn render(wanted: &Wanted, host: &Parsed, backup: &Path) -> String {
    let mut text = format!(
        "{HEADER}: names in the mesh answer at its resolver.\n# The original is kept in {} and comes back when \
         meshd stops.\n",
        backup.display()
    );
    for ip in &wanted.nameservers {
        text.push_str(&format!("nameserver {ip}\n"));
    }
    let mut search: Vec<&str> = wanted.search.iter().map(String::as_str).collect();
    for domain in &host.search {
        if !search.contains(&domain.as_str()) {
            search.push(domain);
        }
    }
    if !search.is_empty() {
        text.push_str(&format!("search {}\n", search.join(" ")));
    }
    if !host.options.is_empty() {
        text.push_str(&format!("options {}\n", host.options.join(" ")));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("meshd-resolv-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn wanted() -> Wanted {
        Wanted { nameservers: vec!["100.100.100.100".parse().unwrap()], search: vec!["mesh.internal".into()] }
    }

    const ORIGINAL: &str =
        "# from DHCP\nnameserver 10.1.0.2\nnameserver 10.1.0.3\nsearch corp.example\noptions ndots:2\n";

    #[test]
    fn the_original_comes_back_byte_for_byte_on_stop_and_after_a_crash() {
        let d = dir("restore");
        let path = d.join("resolv.conf");
        fs::write(&path, ORIGINAL).unwrap();
        let mut direct = Direct::new(path.clone(), &d);
        direct.set(Some(wanted())).unwrap();
        let ours = fs::read_to_string(&path).unwrap();
        assert!(ours.starts_with(HEADER));
        assert!(ours.contains("nameserver 100.100.100.100\n") && !ours.contains("10.1.0.2"));
        assert!(ours.contains("search mesh.internal corp.example\n") && ours.contains("options ndots:2\n"));
        assert_eq!(direct.host_config().nameservers.len(), 2, "the host's own resolvers stay known");
        direct.set(None).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), ORIGINAL);
        assert!(!d.join("resolv.conf.meshd-backup").exists());

        // A crash: the next start puts it back before anything else.
        {
            let mut crashed = Direct::new(path.clone(), &d);
            crashed.set(Some(wanted())).unwrap();
        }
        assert!(fs::read_to_string(&path).unwrap().starts_with(HEADER));
        let _next = Direct::new(path.clone(), &d);
        assert_eq!(fs::read_to_string(&path).unwrap(), ORIGINAL);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_backup_is_never_lost_and_never_applied_over_a_newer_file() {
        let d = dir("backup");
        let path = d.join("resolv.conf");
        fs::write(&path, ORIGINAL).unwrap();
        let mut direct = Direct::new(path.clone(), &d);
        direct.set(Some(wanted())).unwrap();
        // A restore that fails (the path cannot be written) keeps the backup; the next write must take the host's
        // file from it, not meshd's own from the path.
        let ours = fs::read_to_string(&path).unwrap();
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        assert!(direct.set(None).is_err());
        fs::remove_dir(&path).unwrap();
        fs::write(&path, &ours).unwrap();
        direct.set(Some(wanted())).unwrap();
        direct.set(None).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), ORIGINAL);

        // After a crash and a reboot, DHCP wrote a new file: it stays, and the stale backup goes.
        {
            let mut crashed = Direct::new(path.clone(), &d);
            crashed.set(Some(wanted())).unwrap();
        }
        fs::write(&path, "nameserver 10.1.0.99\n").unwrap();
        let _after_reboot = Direct::new(path.clone(), &d);
        assert_eq!(fs::read_to_string(&path).unwrap(), "nameserver 10.1.0.99\n");
        assert!(!d.join("resolv.conf.meshd-backup").exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_symlink_is_replaced_and_comes_back_as_a_symlink() {
        let d = dir("link");
        fs::write(d.join("stub-resolv.conf"), "nameserver 127.0.0.53\n").unwrap();
        let path = d.join("resolv.conf");
        std::os::unix::fs::symlink("stub-resolv.conf", &path).unwrap();
        let mut direct = Direct::new(path.clone(), &d);
        direct.set(Some(wanted())).unwrap();
        assert!(!fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
        assert_eq!(
            fs::read_to_string(d.join("stub-resolv.conf")).unwrap(),
            "nameserver 127.0.0.53\n",
            "not written through"
        );
        assert_eq!(direct.host_config().nameservers, vec!["127.0.0.53".parse::<IpAddr>().unwrap()]);
        direct.restore().unwrap();
        assert_eq!(fs::read_link(&path).unwrap(), PathBuf::from("stub-resolv.conf"));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn another_program_rewriting_the_file_is_followed_then_left_alone() {
        let d = dir("trample");
        let path = d.join("resolv.conf");
        fs::write(&path, ORIGINAL).unwrap();
        let mut direct = Direct::new(path.clone(), &d);
        direct.set(Some(wanted())).unwrap();
        let start = Instant::now();
        assert!(!direct.check(start), "our own file is no change");
        let dhcp = "nameserver 10.1.0.9\n";
        for i in 0..MAX_TRAMPLES {
            fs::write(&path, dhcp).unwrap();
            assert!(direct.check(start + Duration::from_secs(i as u64)));
            assert!(fs::read_to_string(&path).unwrap().starts_with(HEADER), "covered again");
            assert_eq!(direct.host_config().nameservers, vec!["10.1.0.9".parse::<IpAddr>().unwrap()]);
        }
        fs::write(&path, dhcp).unwrap();
        assert!(direct.check(start + Duration::from_secs(10)));
        assert!(direct.status().gave_up);
        assert_eq!(fs::read_to_string(&path).unwrap(), dhcp, "the other program's file stays");
        direct.set(None).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), dhcp);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn resolv_conf_lines_are_read_as_glibc_reads_them() {
        let parsed = parse(
            "nameserver 10.0.0.2 # comment\nnameserver fe80::1%eth0\nsearch a.example b.example\ndomain c.example\noptions rotate\n",
        );
        assert_eq!(parsed.nameservers, vec!["10.0.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(parsed.search, ["c.example"]);
        assert_eq!(parsed.options, ["rotate"]);
    }
}
