//! `meshd control serve`: the coordination server. HTTPS by default; plain HTTP only when asked for with
//! `--insecure-http`, which it warns about. The first start writes an admin token into the data directory
//! (mode 0600) for the `meshd control` verbs.

use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_control::Control;
use mesh_control::http::{AppState, router};
use mesh_control::policy::Policy;
use mesh_control::serve::Limits;
use tokio::signal::unix::{SignalKind, signal};

use crate::error::Error;
use crate::keys;

#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub db: Option<String>,
    pub policy: Option<PathBuf>,
    pub domain: String,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub insecure_http: bool,
    pub ephemeral_timeout: u64,
    /// Seconds a registration's key is trusted; none: until an administrator expires the node.
    pub key_expiry: Option<u64>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The SQLite file a `--db` value names (PostgreSQL is refused until its store exists).
fn database_path(db: Option<&str>, data_dir: &Path) -> Result<PathBuf, Error> {
    match db {
        None => Ok(data_dir.join("control.db")),
        Some(url) => match url.split_once("://") {
            Some(("sqlite", path)) if !path.is_empty() => Ok(PathBuf::from(path)),
            Some(("postgres" | "postgresql", _)) => {
                Err(Error::Input("--db: PostgreSQL is not supported yet; use sqlite://PATH".into()))
            }
            _ => Err(Error::Input(format!("--db {url:?}: expected sqlite://PATH"))),
        },
    }
}

/// The admin token, made on the first start and kept 0600 in the data directory. Only a missing file makes
/// a new one: an unreadable or empty file refuses to start rather than silently replacing the token the
/// operator's scripts hold (or, worse, accepting an empty one).
fn admin_token(data_dir: &Path) -> Result<String, Error> {
    let path = data_dir.join("admin-token");
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().is_empty() => {
            return Err(Error::Input(format!(
                "{}: the admin token file is empty; delete it to have a new token made",
                path.display()
            )));
        }
        Ok(text) => {
            check_private_file(&path)?;
            return Ok(text.trim().to_string());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::system(&format!("reading {}", path.display()), e)),
    }
    let mut bytes = [0u8; 24];
    keys::random_bytes(&mut bytes).map_err(Error::System)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    keys::write_private(&path, format!("{token}\n").as_bytes()).map_err(Error::System)?;
    tracing::info!(file = %path.display(), "wrote the admin token (mode 0600)");
    Ok(token)
}

/// A secret file must be the server user's and readable by no one else; a wider one is refused, naming the
/// fix, rather than served from.
fn check_private_file(path: &Path) -> Result<(), Error> {
    check_private(path, "", "600")
}

/// The data directory holds the database (with the server's private key) and the admin token: no one but
/// the server's user may list or enter it, let alone replace files in it.
fn check_data_dir(dir: &Path) -> Result<(), Error> {
    check_private(dir, ": the data directory", "700")
}

/// `path` belongs to the user the server runs as and is closed to group and others; `what` names it in the
/// message, `mode` is the chmod that fixes it.
fn check_private(path: &Path, what: &str, mode: &str) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| Error::system(&format!("reading {}", path.display()), e))?;
    if meta.mode() & 0o077 != 0 {
        return Err(Error::Input(format!(
            "{}{what} is open to others (mode {:o}); chmod {mode} it",
            path.display(),
            meta.mode() & 0o777
        )));
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(Error::Input(format!(
            "{}{what} belongs to uid {}, not to the user the server runs as; chown it",
            path.display(),
            meta.uid()
        )));
    }
    Ok(())
}

/// Lifts the soft descriptor limit to the hard one: each connection and long poll holds a descriptor, and
/// distributions start services at 1 024.
fn raise_descriptor_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit { current: limit.maximum, maximum: limit.maximum };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(error = %e, "raising the descriptor limit");
        }
    }
}

pub async fn run(o: Options) -> Result<(), Error> {
    let tls = match (&o.tls_cert, &o.tls_key, o.insecure_http) {
        (Some(cert), Some(key), false) => Some(mesh_control::serve::tls_config(cert, key).map_err(Error::Input)?),
        (None, None, true) => None,
        (_, _, true) => {
            return Err(Error::Input("--insecure-http and --tls-cert/--tls-key exclude each other".into()));
        }
        _ => {
            return Err(Error::Input(
                "give --tls-cert and --tls-key, or --insecure-http for plain HTTP on a network you trust".into(),
            ));
        }
    };
    let db = database_path(o.db.as_deref(), &o.data_dir)?;
    let policy_file = match &o.policy {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::Input(format!("{}: cannot read: {e}", path.display())))?;
            Policy::parse(&text).map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
            Some((path, text))
        }
        None => None,
    };
    if !o.data_dir.exists() {
        std::fs::create_dir_all(&o.data_dir)
            .map_err(|e| Error::system(&format!("creating {}", o.data_dir.display()), e))?;
        std::fs::set_permissions(&o.data_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::system(&format!("narrowing {}", o.data_dir.display()), e))?;
    }
    check_data_dir(&o.data_dir)?;
    let token = admin_token(&o.data_dir)?;
    let mut control = open_database(&db, &o.domain)?;
    control.set_key_lifetime(o.key_expiry);
    if let Some((path, text)) = policy_file {
        apply_policy_file(&mut control, path, &text)?;
    }
    raise_descriptor_limit();
    let state = AppState::new(control, &token, unix_now, tls.is_some());
    let listener = tokio::net::TcpListener::bind(o.listen)
        .await
        .map_err(|e| Error::system(&format!("listening on {}", o.listen), e))?;
    let address = listener.local_addr().map_err(|e| Error::system("reading the listen address", e))?;
    if tls.is_none() {
        tracing::warn!("serving plain HTTP (--insecure-http): auth keys and credentials cross the network unencrypted");
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(url = %format!("{scheme}://{address}"), db = %db.display(), "coordination server listening");

    if let Some(at) = o.metrics {
        let listener = tokio::net::TcpListener::bind(at)
            .await
            .map_err(|e| Error::system(&format!("listening for metrics on {at}"), e))?;
        let app = mesh_control::http::metrics_router(state.clone());
        tracing::info!(url = %format!("http://{at}/metrics"), "serving metrics");
        // Ends with the runtime when the server stops.
        tokio::spawn(mesh_control::serve::serve(listener, app, None, Limits::default()));
    }
    crate::service::ready(&format!("listening on {scheme}://{address}"));

    let cleaner = state.clone();
    let timeout = o.ephemeral_timeout;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            let cleaner = cleaner.clone();
            let removed = tokio::task::spawn_blocking(move || cleaner.remove_stale_ephemeral(timeout)).await;
            match removed.unwrap_or(Ok(0)) {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "removed ephemeral nodes offline too long"),
                Err(e) => tracing::warn!(error = %e, "removing ephemeral nodes"),
            }
        }
    });
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| Error::system("SIGTERM handler", e))?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| Error::system("SIGINT handler", e))?;
    tokio::select! {
        () = mesh_control::serve::serve(listener, router(state), tls, Limits::default()) => {}
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    crate::service::stopping();
    Ok(())
}

/// `--policy FILE` replaces the stored policy when its text differs (a new version, set by the file);
/// without the flag the stored one stays, so `policy set` survives a restart.
fn apply_policy_file(control: &mut Control, path: &Path, text: &str) -> Result<(), Error> {
    let stored = control.stored_policy().map_err(|e| Error::System(e.to_string()))?;
    if stored.is_some_and(|p| p.text == text) {
        return Ok(());
    }
    let change = control
        .set_policy(text, &format!("file {}", path.display()), unix_now())
        .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    tracing::info!(version = change.version, file = %path.display(), "the policy file replaced the stored policy");
    for revoked in change.taken_back() {
        tracing::info!(version = change.version, "the new policy took back {revoked}");
    }
    Ok(())
}

/// Opens the database, creating it 0600: it holds the server's private key and every node's credential hash.
fn open_database(path: &Path, domain: &str) -> Result<Control, Error> {
    if !path.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::system(&format!("creating {}", path.display()), e))?;
    }
    check_private_file(path)?;
    let control = Control::open(path, domain).map_err(|e| Error::System(format!("{}: {e}", path.display())))?;
    // SQLite's side files (-wal, -shm, -journal) are made with the database's mode, so they are private too.
    Ok(control)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("meshd-serve-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    #[test]
    fn an_empty_or_exposed_admin_token_refuses_to_start_and_only_a_missing_one_is_made() {
        let dir = scratch("token");
        let made = admin_token(&dir).unwrap();
        assert_eq!(made.len(), 48);
        assert_eq!(admin_token(&dir).unwrap(), made, "kept across starts");
        let path = dir.join("admin-token");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(admin_token(&dir), Err(Error::Input(m)) if m.contains("chmod 600")));
        std::fs::write(&path, "\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(admin_token(&dir), Err(Error::Input(m)) if m.contains("empty")));
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(matches!(admin_token(&dir), Err(Error::System(_))), "unreadable is not missing");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_data_directory_open_to_others_is_refused() {
        let dir = scratch("datadir");
        assert!(check_data_dir(&dir).is_ok());
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(check_data_dir(&dir), Err(Error::Input(m)) if m.contains("chmod 700")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_database_is_created_private() {
        let dir = scratch("db");
        let path = dir.join("control.db");
        open_database(&path, "mesh.internal").unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(open_database(&path, "mesh.internal").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn database_urls() {
        let dir = Path::new("/var/lib/meshd-control");
        assert_eq!(database_path(None, dir).ok(), Some(dir.join("control.db")));
        assert_eq!(database_path(Some("sqlite:///tmp/c.db"), dir).ok(), Some(PathBuf::from("/tmp/c.db")));
        assert!(
            matches!(database_path(Some("postgres://db/mesh"), dir), Err(Error::Input(m)) if m.contains("not supported yet"))
        );
        assert!(database_path(Some("mysql://x"), dir).is_err());
        assert!(database_path(Some("sqlite://"), dir).is_err());
    }
}
