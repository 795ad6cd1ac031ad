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
