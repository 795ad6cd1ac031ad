//! The node's private key: from the configuration, from a key file, or generated once into the state
//! directory. Key files are created 0600 and written atomically; their contents never reach a log.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::config::{Key, PrivateKey, base64_key, decode_key};

/// Resolves where the private key comes from into the key itself.
pub fn load(source: &PrivateKey, state_dir: &Path) -> Result<Key, String> {
    match source {
        PrivateKey::Inline(key) => Ok(*key),
        PrivateKey::File(path) => read_key_file(path),
        PrivateKey::Generate if state_dir == Path::new(crate::prefs::MEMORY) => {
            // Nothing on disk: a new key for each run (a sidecar's node lives as long as its pod).
            let mut key = [0u8; 32];
            random_bytes(&mut key)?;
            Ok(key)
        }
        PrivateKey::Generate => {
            let path = state_dir.join("private.key");
            if path.exists() { read_key_file(&path) } else { generate(&path) }
        }
    }
}

fn read_key_file(path: &Path) -> Result<Key, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: cannot read key file: {e}", path.display()))?;
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(file = %path.display(), "private key file is readable by others; chmod 600 it");
    }
    decode_key(text.trim()).map_err(|e| format!("{}: {e}", path.display()))
}

fn generate(path: &Path) -> Result<Key, String> {
    let dir = path.parent().expect("state files live in a directory");
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(|e| format!("{}: cannot create state directory: {e}", dir.display()))?;
        // Only a directory meshd made is narrowed; an existing one (say /var/lib) keeps its mode.
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    }
    let mut key = [0u8; 32];
    random_bytes(&mut key)?;
    write_private(path, format!("{}\n", base64_key(&key)).as_bytes())?;
    tracing::info!(file = %path.display(), "generated a new private key");
    Ok(key)
}

/// A managed node's state directory holds its private key and its credential: it must belong to the user
/// meshd runs as, and no one else may write to it (replace a file in it). Refused otherwise, naming the fix.
pub fn check_state_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(format!(
            "{}: the state directory belongs to uid {}, not to the user meshd runs as; chown it",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{}: others may write to the state directory (mode {:o}); chmod 700 it",
            dir.display(),
            meta.mode() & 0o777
        ));
    }
    Ok(())
}

/// Fills `buf` from the operating system's randomness.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), String> {
    fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf)).map_err(|e| format!("reading /dev/urandom: {e}"))
}

/// Writes `contents` to `path` with mode 0600: temp file, fsync, rename, so a crash leaves the old file or
/// the new one, never half of either.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let result = (|| {
        // A leftover temp file (or a link planted in its place) is removed, and the new one must be created
        // by us, so the 0600 mode really applies and the key is never written through a link.
        let _ = fs::remove_file(&tmp);
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok::<_, std::io::Error>(())
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("{}: cannot write: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_is_0600_and_reused() {
        let dir = std::env::temp_dir().join(format!("meshd-keys-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let first = load(&PrivateKey::Generate, &dir).unwrap();
        let mode = fs::metadata(dir.join("private.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load(&PrivateKey::Generate, &dir).unwrap(), first, "the same key after a restart");
        assert_eq!(load(&PrivateKey::File(dir.join("private.key")), &dir).unwrap(), first);
        fs::write(dir.join("bad.key"), "not a key").unwrap();
        let err = load(&PrivateKey::File(dir.join("bad.key")), &dir).unwrap_err();
        assert!(err.contains("bad.key"), "{err}");
        assert_eq!(check_state_dir(&dir), Ok(()), "a directory meshd made is 0700 and its own");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(check_state_dir(&dir).unwrap_err().contains("chmod 700"));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(check_state_dir(&dir), Ok(()), "readable is fine: the files in it are 0600");
        fs::remove_dir_all(&dir).unwrap();
    }
}
