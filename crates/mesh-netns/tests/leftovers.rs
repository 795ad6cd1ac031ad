//! What `cargo xtask ci` does first: a killed run's namespaces, the processes still inside them and its lab
//! directories are removed, found by their name prefix alone.

use std::process::{Command, Stdio};
use std::time::Duration;

use mesh_netns::{clear_leftovers, wait_until};

#[test]
fn a_killed_runs_namespaces_processes_and_directories_are_cleared_by_prefix() {
    // A prefix no lab uses, so this test clears only what it made.
    let prefix = format!("mt-leftover{}-", std::process::id());
    let name = format!("{prefix}a");
    assert!(Command::new("ip").args(["netns", "add", &name]).status().unwrap().success());
    // What a killed test leaves: a process inside its namespace that nobody will stop.
    let mut orphan = Command::new("ip")
        .args(["netns", "exec", &name, "sleep", "300"])
        .stdout(Stdio::null())
        .spawn()
        .expect("sleep in the namespace");
    let dir = std::env::temp_dir().join(format!("meshd-lab-{prefix}x-1"));
    std::fs::create_dir_all(dir.join("run")).unwrap();
    let listed = |name: &str| {
        let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().any(|l| l.split_whitespace().next() == Some(name))
    };
    assert!(listed(&name));
    assert!(wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        let pids = Command::new("ip").args(["netns", "pids", &name]).output().unwrap();
        !pids.stdout.is_empty()
    }));

    let cleared = clear_leftovers(&prefix);
    assert_eq!(cleared, std::slice::from_ref(&name));
    assert!(!listed(&name), "the namespace is gone");
    let ended =
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || matches!(orphan.try_wait(), Ok(Some(_))));
    let _ = orphan.kill();
    let _ = orphan.wait();
    assert!(ended, "the process inside it was ended");
    assert!(!dir.exists(), "the lab directory is gone");
}
