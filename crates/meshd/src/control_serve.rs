//! `meshd control serve`: the coordination server. HTTPS by default; plain HTTP only when asked for with
//! `--insecure-http`, which it warns about. The first start writes an admin token into the data directory
//! (mode 0600) for the `meshd control` verbs.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_control::Control;
use mesh_control::http::{AppState, router};
use mesh_control::policy::Policy;
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

/// The admin token, made on the first start and kept 0600 in the data directory.
fn admin_token(data_dir: &Path) -> Result<String, Error> {
    let path = data_dir.join("admin-token");
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Ok(text.trim().to_string());
    }
    let mut bytes = [0u8; 24];
    keys::random_bytes(&mut bytes).map_err(Error::System)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    keys::write_private(&path, format!("{token}\n").as_bytes()).map_err(Error::System)?;
    tracing::info!(file = %path.display(), "wrote the admin token (mode 0600)");
    Ok(token)
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
    let policy_text = match &o.policy {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|e| Error::Input(format!("{}: cannot read: {e}", path.display())))?
        }
        None => "{}".to_string(),
    };
    let policy = Policy::parse(&policy_text)
        .map_err(|e| Error::Input(format!("{}: {e}", o.policy.as_deref().unwrap_or(Path::new("policy")).display())))?;
    if !o.data_dir.exists() {
        std::fs::create_dir_all(&o.data_dir)
            .map_err(|e| Error::system(&format!("creating {}", o.data_dir.display()), e))?;
        let _ = std::fs::set_permissions(&o.data_dir, std::fs::Permissions::from_mode(0o700));
    }
    let token = admin_token(&o.data_dir)?;
    let control = Control::open(&db, policy, &o.domain).map_err(|e| Error::System(format!("{}: {e}", db.display())))?;
    let state = AppState::new(control, policy_text, &token, unix_now);
    let listener = tokio::net::TcpListener::bind(o.listen)
        .await
        .map_err(|e| Error::system(&format!("listening on {}", o.listen), e))?;
    let address = listener.local_addr().map_err(|e| Error::system("reading the listen address", e))?;
    if tls.is_none() {
        tracing::warn!("serving plain HTTP (--insecure-http): auth keys and credentials cross the network unencrypted");
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(url = %format!("{scheme}://{address}"), db = %db.display(), "coordination server listening");

    let cleaner = state.clone();
    let timeout = o.ephemeral_timeout;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            match cleaner.remove_stale_ephemeral(timeout) {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "removed ephemeral nodes offline too long"),
                Err(e) => tracing::warn!(error = %e, "removing ephemeral nodes"),
            }
        }
    });
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| Error::system("SIGTERM handler", e))?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| Error::system("SIGINT handler", e))?;
    tokio::select! {
        served = mesh_control::serve::serve(listener, router(state), tls) => served.map_err(|e| Error::system("serving", e)),
        _ = terminate.recv() => Ok(()),
        _ = interrupt.recv() => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
