//! Runs `cargo test` and decides what it showed. The decision is a pure function of what cargo printed and
//! how it exited, so it is tested on recorded outputs: a test binary that dies before its result line, a
//! build error, a clean run.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

/// Pass and fail counts of the whole run: each test, plus each other check (fmt, clippy, a cargo invocation
/// that failed) as one.
#[derive(Debug, Default, PartialEq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    pub filtered: u64,
    pub failures: Vec<String>,
}

impl Tally {
    pub fn check(&mut self, name: &str, ok: bool) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
            self.failures.push(name.to_string());
        }
    }

    pub fn add(&mut self, other: Tally) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
        self.filtered += other.filtered;
        self.failures.extend(other.failures);
    }

    pub fn summary(&self) -> String {
        format!(
            "{} passed, {} failed, {} ignored, {} filtered out",
            self.passed, self.failed, self.ignored, self.filtered
        )
    }
}

/// Runs `cargo test` with `selection` through `cargo`, streaming its output, and returns what it showed.
/// What follows a `--` in `selection` goes to the test binaries.
pub fn run_tests(mut cargo: Command, selection: &[&str]) -> Result<Tally> {
    let (packages, binary_args) = match selection.iter().position(|a| *a == "--") {
        Some(at) => (&selection[..at], &selection[at..]),
        None => (selection, &[][..]),
    };
    let mut child = cargo
        .arg("test")
        .args(packages)
        .args(["--locked", "--no-fail-fast", "--color", "never"])
        .args(binary_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let stderr = child.stderr.take().expect("piped stderr");
    // cargo's own messages (build errors, which binary died and how) come on stderr; read them beside stdout.
    let errors = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            lines.push(line);
        }
        lines
    });
    let mut out = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        out.push(line);
    }
    let status = child.wait().context("waiting for cargo test")?;
    let errors = errors.join().unwrap_or_default();
    let invocation = format!("cargo test {}", selection.join(" "));
    Ok(decide(&invocation, &out, &errors, status.success(), &status.to_string()))
}

/// What one `cargo test` invocation showed. Every test binary must end with its result line; one that
/// starts (`running N tests`) and never reports died, and counts as failed with the tests it named as
/// failing. A non-zero exit always counts as one more failure, whatever was counted before it, since
/// only cargo knows everything that went wrong (a build error prints no test at all).
pub fn decide(invocation: &str, stdout: &[String], stderr: &[String], exit_ok: bool, exit: &str) -> Tally {
    let mut tally = Tally::default();
    let mut named_since_result: Vec<String> = Vec::new();
    let mut binary_open = false;
    let mut results = 0;
    let died = |tally: &mut Tally, named: &mut Vec<String>| {
        tally.failed += named.len().max(1) as u64;
        tally.failures.push(format!("a test binary died before its result line (in {invocation})"));
        tally.failures.append(named);
    };
    for line in stdout {
        if (line.starts_with("running ") && line.ends_with(" tests")) || line == "running 1 test" {
            if binary_open {
                died(&mut tally, &mut named_since_result);
            }
            binary_open = true;
        } else if let Some(name) = line.strip_prefix("test ").and_then(|rest| rest.strip_suffix(" ... FAILED")) {
            named_since_result.push(name.to_string());
        } else if let Some(counts) = parse_result_line(line) {
            results += 1;
            binary_open = false;
            tally.passed += counts.passed;
            tally.failed += counts.failed;
            tally.ignored += counts.ignored;
            tally.filtered += counts.filtered;
            tally.failures.append(&mut named_since_result);
        }
    }
    if binary_open {
        died(&mut tally, &mut named_since_result);
    }
    if !exit_ok {
        tally.failed += 1;
        let why: Vec<&str> = stderr
            .iter()
            .map(|l| l.trim())
            .filter(|l| l.starts_with("error") || l.contains("process didn't exit successfully"))
            .collect();
        tally.failures.push(format!("{invocation}: {exit}: {}", why.join(" | ")));
    } else if results == 0 && tally.failures.is_empty() {
        tally.check(&format!("{invocation}: printed no results"), false);
    }
    tally
}

#[derive(Debug, PartialEq)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
    filtered: u64,
}

/// Reads `test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 3 filtered out; finished in 0.00s`.
fn parse_result_line(line: &str) -> Option<Counts> {
    let rest = line.strip_prefix("test result: ")?;
    let (_, counts) = rest.split_once(". ")?;
    let field = |suffix: &str| -> Option<u64> {
        counts.split("; ").find_map(|f| f.strip_suffix(suffix)).and_then(|n| n.trim().parse().ok())
    };
    Some(Counts {
        passed: field(" passed")?,
        failed: field(" failed")?,
        ignored: field(" ignored").unwrap_or(0),
        filtered: field(" filtered out").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn reads_cargo_result_lines() {
        let ok = "test result: ok. 12 passed; 0 failed; 2 ignored; 0 measured; 5 filtered out; finished in 0.00s";
        assert_eq!(parse_result_line(ok), Some(Counts { passed: 12, failed: 0, ignored: 2, filtered: 5 }));
        let bad = "test result: FAILED. 6 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.2s";
        assert_eq!(parse_result_line(bad), Some(Counts { passed: 6, failed: 1, ignored: 0, filtered: 0 }));
        assert_eq!(parse_result_line("test foo ... ok"), None);
    }

    #[test]
    fn a_clean_run_counts_every_binary_and_fails_nothing() {
        let out = lines(
            "\nrunning 2 tests\ntest a ... ok\ntest b ... ignored\n\n\
             test result: ok. 1 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s\n\n\
             running 1 test\ntest c ... ok\n\n\
             test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 4 filtered out; finished in 0.00s\n",
        );
        let t = decide("cargo test --workspace", &out, &lines("   Compiling x\n     Running unittests"), true, "0");
        assert_eq!((t.passed, t.failed, t.ignored, t.filtered), (2, 0, 1, 4));
        assert!(t.failures.is_empty(), "{:?}", t.failures);
    }

    #[test]
    fn a_binary_that_dies_after_naming_a_failure_fails_the_run() {
        // The first binary aborts (say a stack overflow) after one test failed; the second one is fine.
        let out = lines(
            "\nrunning 3 tests\ntest a ... ok\ntest b ... FAILED\n\n\
             running 1 test\ntest c ... ok\n\n\
             test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s\n",
        );
        let err = lines(
            "error: test failed, to rerun pass `-p meshd --test e2e`\n\nCaused by:\n  process didn't exit \
             successfully: `/t/e2e-1` (signal: 6, SIGABRT: process abort signal)\nerror: 1 target failed:",
        );
        let t = decide("cargo test --workspace", &out, &err, false, "exit status: 101");
        assert_eq!(t.passed, 1);
        assert_eq!(t.failed, 2, "b and the invocation: {:?}", t.failures);
        assert!(t.failures.iter().any(|f| f == "b"), "{:?}", t.failures);
        assert!(t.failures.iter().any(|f| f.contains("SIGABRT")), "{:?}", t.failures);
    }

    #[test]
    fn a_binary_that_dies_without_naming_anything_still_counts() {
        let out = lines("\nrunning 2 tests\n");
        let t = decide("cargo test -p x", &out, &[], false, "signal: 9 (SIGKILL)");
        assert_eq!(t.failed, 2, "the silent binary and the invocation: {:?}", t.failures);
        // Even if cargo somehow exited 0, a binary that never reported is a failure.
        let t = decide("cargo test -p x", &out, &[], true, "exit status: 0");
        assert_eq!(t.failed, 1, "{:?}", t.failures);
    }

    #[test]
    fn a_build_error_after_a_fmt_failure_is_counted_too() {
        let mut tally = Tally::default();
        tally.check("cargo fmt --check", false);
        let err = lines(
            "   Compiling meshd v0.1.0\nerror[E0425]: cannot find value `x` in this scope\nerror: could not compile `meshd`",
        );
        tally.add(decide("cargo test --workspace", &[], &err, false, "exit status: 101"));
        assert_eq!(tally.failed, 2, "{:?}", tally.failures);
        assert!(tally.failures[1].contains("E0425"), "{:?}", tally.failures);
        assert!(tally.summary().starts_with("0 passed, 2 failed"));
    }

    #[test]
    fn a_run_that_prints_no_result_fails() {
        let t = decide("cargo test -p x", &[], &[], true, "exit status: 0");
        assert_eq!(t.failed, 1);
    }
}
