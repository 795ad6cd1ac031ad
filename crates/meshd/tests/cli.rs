//! Runs the built binary the way a user does.

use std::process::Command;

fn meshd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshd"))
}

#[test]
fn version_prints_and_exits_zero() {
    let out = meshd().arg("version").output().expect("run meshd");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert!(text.starts_with(&format!("meshd {}", env!("CARGO_PKG_VERSION"))), "{text}");
}

#[test]
fn unknown_verb_is_one_clear_error_with_status_2() {
    let out = meshd().arg("frobnicate").output().expect("run meshd");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).expect("utf-8");
    assert!(err.contains("unrecognized subcommand 'frobnicate'"), "{err}");
}

#[test]
fn a_malformed_config_is_one_line_naming_file_line_and_field_with_status_2() {
    let dir = std::env::temp_dir().join(format!("meshd-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("wg0.conf");
    std::fs::write(
        &path,
        "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n\n[Peer]\nPublicKey = nope\n",
    )
    .unwrap();
    let out = meshd().args(["daemon", "--config", path.to_str().unwrap(), "--state-dir"]).arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with(&format!("meshd: {}:5: PublicKey:", path.display())), "{err}");
    let missing = meshd().args(["daemon", "--config", "/nonexistent/meshd.toml"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn snat_without_an_address_names_both_ways_out() {
    let dir = std::env::temp_dir().join(format!("meshd-cli-snat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("router.toml");
    std::fs::write(&path, "[interface]\nprivate_key = \"yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\"\n").unwrap();
    let out = meshd()
        .args(["daemon", "--config", path.to_str().unwrap(), "--advertise-routes=10.0.0.0/16", "--state-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--snat-address") && err.contains("--snat-subnet-routes=false"), "{err}");
    let bad = meshd().args(["daemon", "--config", "x", "--advertise-routes=10.0.0.0/16:sometimes"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}
