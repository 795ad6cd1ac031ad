//! `cargo xtask package`: the Debian package (cargo-deb) and the container image, both from one release
//! build, into target/package/. The image is built without a registry: a root holding only the stripped
//! binary, the C libraries it links, and a passwd entry for its non-root user, imported by podman into a
//! private store and saved as an OCI archive (`podman load -i` takes it).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use mesh_netns::podman::Podman;

/// The cargo-deb CI uses, pinned so a new release cannot change the package.
const CARGO_DEB_VERSION: &str = "3.8.0";
/// The image's user: not root, and the uid distroless images use, so volume permissions carry over.
pub const IMAGE_UID: u32 = 65532;

pub struct Built {
    pub deb: PathBuf,
    pub image_archive: PathBuf,
    pub image_tag: String,
    pub image_bytes: u64,
}

pub fn run() -> Result<bool> {
    let built = build()?;
    println!("\nDebian package: {}", built.deb.display());
    println!(
        "container image: {} ({}, {:.1} MB; load it with `podman load -i {}`)",
        built.image_archive.display(),
        built.image_tag,
        built.image_bytes as f64 / 1e6,
        built.image_archive.display()
    );
    Ok(true)
}

pub fn build() -> Result<Built> {
    let binary = crate::build_release_meshd()?;
    let out = crate::root().join("target/package");
    std::fs::create_dir_all(&out)?;
    let deb = debian_package(&out)?;
    let (image_archive, image_tag, image_bytes) = image(&binary, &out)?;
    Ok(Built { deb, image_archive, image_tag, image_bytes })
}

/// The workspace's version, which meshd and xtask share.
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

fn debian_package(out: &Path) -> Result<PathBuf> {
    if !crate::install_cargo_tool("deb", CARGO_DEB_VERSION)? {
        bail!("cargo install cargo-deb failed");
    }
    let o = crate::cargo()
        .args(["deb", "-p", "meshd", "--no-build", "--strip", "-o"])
        .arg(out)
        .output()
        .context("running cargo deb")?;
    if !o.status.success() {
        bail!("cargo deb failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let path = String::from_utf8_lossy(&o.stdout).lines().last().unwrap_or_default().trim().to_string();
    if !path.ends_with(".deb") {
        bail!("cargo deb printed no package path: {}", String::from_utf8_lossy(&o.stdout));
    }
    Ok(PathBuf::from(path))
}

/// The image's root: the stripped binary, the libraries `ldd` names (glibc's loader, libc, libm,
/// libgcc_s), passwd and group with the non-root user, and its empty state and runtime directories.
fn stage_root(binary: &Path, root: &Path) -> Result<()> {
    if root.exists() {
        std::fs::remove_dir_all(root)?;
    }
    for dir in ["usr/bin", "etc", "tmp", "var/lib/meshd", "var/lib/meshd-control", "run/meshd"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    let ok = Command::new("strip")
        .arg("-o")
        .arg(root.join("usr/bin/meshd"))
        .arg(binary)
        .status()
        .context("running strip (binutils)")?
        .success();
    if !ok {
        bail!("strip failed");
    }
    let ldd = Command::new("ldd").arg(binary).output().context("running ldd")?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)".
        let Some(path) = line.split_whitespace().find(|w| w.starts_with('/')) else { continue };
        let real = std::fs::canonicalize(path).with_context(|| format!("resolving {path}"))?;
        let dest = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().expect("a library has a directory"))?;
        std::fs::copy(&real, &dest).with_context(|| format!("copying {}", real.display()))?;
    }
    let uid = IMAGE_UID;
    std::fs::write(
        root.join("etc/passwd"),
        format!("root:x:0:0:root:/root:/sbin/nologin\nmeshd:x:{uid}:{uid}:meshd:/var/lib/meshd:/sbin/nologin\n"),
    )?;
    std::fs::write(root.join("etc/group"), format!("root:x:0:\nmeshd:x:{uid}:\n"))?;
    // glibc's defaults differ by version; say it: hosts from /etc/hosts (which the runtime writes), then DNS.
    std::fs::write(root.join("etc/nsswitch.conf"), "passwd: files\ngroup: files\nhosts: files dns\n")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    for dir in ["var/lib/meshd", "var/lib/meshd-control", "run/meshd"] {
        let path = root.join(dir);
        std::os::unix::fs::chown(&path, Some(uid), Some(uid))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn image(binary: &Path, out: &Path) -> Result<(PathBuf, String, u64)> {
    let work = out.join("image");
    let root = work.join("root");
    stage_root(binary, &root)?;
    let podman = Podman::new(&work.join("podman"));
    let tag = format!("localhost/meshd:{}", version());
    let _ = podman.command(&["rmi", "-f", &tag]).output();
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["--numeric-owner", "--sort=name", "--mtime=@0", "-c", "."])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running tar")?;
    let changes = [
        format!("USER {IMAGE_UID}:{IMAGE_UID}"),
        "ENTRYPOINT [\"/usr/bin/meshd\"]".to_string(),
        "CMD [\"daemon\"]".to_string(),
        "WORKDIR /var/lib/meshd".to_string(),
        format!("LABEL org.opencontainers.image.title=meshd org.opencontainers.image.version={}", version()),
    ];
    // One ENV each: podman import reads the rest of the line as one value.
    let environment = [
        ("MESHD_STATE_DIR", "/var/lib/meshd"),
        ("MESHD_RUN_DIR", "/run/meshd"),
        ("MESHD_SOCKET", "/run/meshd/meshd.sock"),
        ("MESHD_UAPI_DIR", "/run/meshd"),
        ("MESHD_CONTROL_DATA_DIR", "/var/lib/meshd-control"),
    ];
    let changes = changes.into_iter().chain(environment.iter().map(|(k, v)| format!("ENV {k}={v}")));
    let mut import = podman.command(&["import"]);
    for change in changes {
        import.args(["--change", &change]);
    }
    let o = import.args(["-", &tag]).stdin(tar.stdout.take().expect("piped")).output()?;
    if !tar.wait()?.success() || !o.status.success() {
        bail!("podman import: {}", String::from_utf8_lossy(&o.stderr));
    }
    let size = podman.command(&["image", "inspect", "--format", "{{.Size}}", &tag]).output()?;
    let bytes: u64 = String::from_utf8_lossy(&size.stdout).trim().parse().context("reading the image size")?;
    let archive = out.join(format!("meshd-image-{}.tar", version()));
    let _ = std::fs::remove_file(&archive);
    let o = podman.command(&["save", "--format", "oci-archive", "-o"]).arg(&archive).arg(&tag).output()?;
    if !o.status.success() {
        bail!("podman save: {}", String::from_utf8_lossy(&o.stderr));
    }
    std::fs::remove_dir_all(&root)?;
    Ok((archive, tag, bytes))
}
