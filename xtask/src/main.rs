//! Project automation: `cargo xtask ci` is the one test command CI runs; `cargo xtask bench` runs the
//! benchmarks recorded in docs/benchmarks.md.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

mod demo;
mod dns_bench;
mod gap;
mod golden;
mod package;
mod routes;
mod runner;
mod throughput;
mod userspace_bench;

use runner::Tally;

/// Debian packages the tests need: namespaces and routes, the firewall, the reference WireGuard peer and
/// its configuration tool, throughput measurement, ping/ss inside namespaces, socat for TCP transfers, and
/// curl and openssl for the coordination server's HTTPS tests.
const PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "wireguard-go",
    "wireguard-tools",
    "iperf3",
    "iputils-ping",
    "procps",
    "socat",
    "curl",
    "openssl",
    // The DNS tests: a real resolver beside meshd's, and real clients.
    "dnsmasq-base",
    // Userspace mode's end-to-end test: the seed's real services and their real clients.
    "postgresql",
    "postgresql-client",
    "redis-server",
    "redis-tools",
    "python3",
    "bind9-dnsutils",
    // A real systemd-resolved, and the Debian package's units: a debootstrap root booted with systemd in
    // podman (runc); catatonit is the pause process of pods (`podman kube play`); lintian checks the package.
    "podman",
    "runc",
    "debootstrap",
    "catatonit",
    "lintian",
    "binutils",
    // The admin console's browser test: Debian's Chromium, driven by playwright-core (from npm) on Node.js.
    "chromium",
    "nodejs",
];

/// playwright-core for the console's browser test, pinned; installed by npm into target/playwright.
const PLAYWRIGHT_CORE_VERSION: &str = "1.65.1";

const USAGE: &str = "usage: cargo xtask <command>

commands:
  ci              install missing system packages (as root), then fmt, clippy and every test
  package         the Debian package and the container image, into target/package/ (root, podman)
  demo            subnet routing with SNAT in network namespaces, shown step by step (root)
  capture-golden  record the real packets mesh-packet's golden tests replay (root, needs tcpdump)
  bench [snat]    criterion benchmarks of the SNAT hot path and memory per flow
  bench routes [--count N]
                  time the route manager installing, checking and restoring N routes (root)
  bench gap [--count N] [--meshd PATH]
                  a ping every 10 ms through the tunnel while the route manager handles N routes (root)
  bench throughput [--seconds N]
                  iperf3 through meshd and through wireguard-go in namespaces, same run (root)
  bench dns [--seconds N]
                  queries per second for a mesh name through the TUN device, beside dnsmasq (root)
  bench userspace [--seconds N]
                  userspace mode (forward, SOCKS5) beside kernel-TUN meshd and onetun, clean and
                  with netem; RSS and idle CPU (root)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("demo") => demo::run(),
        Some("package") => package::run(),
        Some("capture-golden") => golden::run(),
        Some("bench") => bench(args.get(1).map(String::as_str), &args[args.len().min(2)..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace").to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn ci() -> Result<bool> {
    install_packages()?;
    section("leftovers of an earlier, killed run");
    let cleared = mesh_netns::clear_leftovers(mesh_netns::TEST_PREFIX);
    println!(
        "{} namespace(s) removed{}",
        cleared.len(),
        if cleared.is_empty() { String::new() } else { format!(": {}", cleared.join(" ")) }
    );
    let mut tally = Tally::default();

    section("cargo fmt --check");
    let ok = cargo().args(["fmt", "--all", "--", "--check"]).status().context("running cargo fmt")?.success();
    tally.check("cargo fmt --check", ok);

    section("cargo clippy -D warnings");
    let ok = cargo()
        .args(["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"])
        .status()
        .context("running cargo clippy")?
        .success();
    tally.check("cargo clippy", ok);
    // The simulations need boringtun's mock clock, a feature the workspace lint above leaves out.
    let ok = cargo()
        .args(["clippy", "-p", "mesh-dataplane", "--all-targets", "--features", "mock-clock", "--locked"])
        .args(["--", "-D", "warnings"])
        .status()
        .context("running cargo clippy on the simulations")?
        .success();
    tally.check("cargo clippy (simulations)", ok);

    // The fuzz targets are their own workspace (cargo fuzz builds them with sanitizers by hand); a check
    // build here keeps them compiling as the code under them changes.
    section("fuzz targets (check build)");
    let ok = cargo()
        .args(["check", "--manifest-path", "fuzz/Cargo.toml", "--bins", "--locked"])
        .status()
        .context("running cargo check on the fuzz targets")?
        .success();
    tally.check("fuzz targets build", ok);

    section("cargo deny (licences, duplicate versions, sources; deny.toml)");
    let ok = install_cargo_tool("deny", CARGO_DENY_VERSION)?
        && cargo()
            .args(["deny", "--locked", "check", "licenses", "bans", "sources"])
            .status()
            .context("running cargo deny")?
            .success();
    tally.check("cargo deny", ok);

    // The deployment tests install and run what users get: the .deb and the image, from a release build.
    section("package: the Debian package and the container image (cargo xtask package)");
    let package_dir = match package::build() {
        Ok(built) => {
            println!("{}\n{} ({} bytes)", built.deb.display(), built.image_archive.display(), built.image_bytes);
            tally.check("cargo xtask package", true);
            built.deb.parent().expect("the package's directory").to_path_buf()
        }
        Err(e) => {
            println!("packaging failed: {e:#}");
            tally.check("cargo xtask package", false);
            // The deployment tests then fail at once on an empty directory, rather than packaging again each
            // or testing an older package.
            let none = root().join("target/package-failed");
            let _ = std::fs::remove_dir_all(&none);
            std::fs::create_dir_all(&none)?;
            none
        }
    };
    section("playwright-core for the console's browser test (npm)");
    let ok = install_playwright().unwrap_or_else(|e| {
        println!("{e:#}");
        false
    });
    tally.check("playwright-core installed", ok);

    let tests = || {
        let mut c = cargo();
        c.env("MESHD_PACKAGE_DIR", &package_dir);
        c
    };

    // The deployment tests run on their own after the rest, with their output shown: the unit scores, the
    // image's size and lintian's verdict are figures docs/deploy.md records.
    section("cargo test (unit, integration, end-to-end)");
    tally.add(runner::run_tests(tests(), &["--workspace", "--", "--skip", "deploy_"])?);

    section("cargo test: deployment (the package, the image, the Kubernetes manifests)");
    tally.add(runner::run_tests(tests(), &["-p", "meshd", "--test", "deploy", "--", "--show-output"])?);

    // boringtun's mock clock stands still unless a test moves it, so the simulation is built on its own:
    // in the run above, that feature would have reached the daemon the end-to-end tests start.
    section("cargo test: deterministic data-plane simulation (mock clock)");
    tally.add(runner::run_tests(
        cargo(),
        &["-p", "mesh-dataplane", "--features", "mock-clock", "--test", "simulation", "--test", "stories"],
    )?);

    // The ACL benchmarks run once each in criterion's test mode: proof they still run, with nothing timed
    // (figures come from `cargo bench`, recorded in docs/benchmarks.md).
    section("benchmarks: ACL compile and filter, the DNS resolver, once each (criterion --test, untimed)");
    let ok = cargo()
        .args(["bench", "-p", "mesh-benches", "--bench", "policy", "--bench", "dns", "--locked", "--", "--test"])
        .status()
        .context("running the policy and DNS benchmarks")?
        .success();
    tally.check("policy and DNS benchmarks run", ok);

    println!();
    for failure in &tally.failures {
        println!("FAILED: {failure}");
    }
    println!("{}", tally.summary());
    Ok(tally.failed == 0)
}

/// The cargo-deny CI uses, pinned so a new release cannot change what passes.
const CARGO_DENY_VERSION: &str = "0.20.2";

/// Installs the cargo subcommand `cargo-NAME` at `version` from crates.io when it is missing or another
/// version (a few minutes, once): cargo-deny for CI, cargo-deb for the package.
pub(crate) fn install_cargo_tool(name: &str, version: &str) -> Result<bool> {
    let present = Command::new("cargo")
        .args([name, "--version"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(version));
    if present {
        return Ok(true);
    }
    println!("installing cargo-{name} {version}");
    Ok(cargo()
        .args(["install", "--locked", &format!("cargo-{name}"), "--version", version])
        .status()
        .with_context(|| format!("running cargo install cargo-{name}"))?
        .success())
}

/// Installs playwright-core at its pinned version into target/playwright (a second, once), where
/// meshd's tests/console.rs finds it. It has no dependencies and downloads no browser: the test drives
/// Debian's Chromium.
fn install_playwright() -> Result<bool> {
    let dir = root().join("target/playwright");
    let manifest = dir.join("node_modules/playwright-core/package.json");
    let installed = std::fs::read_to_string(&manifest)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok()?["version"].as_str().map(String::from));
    if installed.as_deref() == Some(PLAYWRIGHT_CORE_VERSION) {
        println!("playwright-core {PLAYWRIGHT_CORE_VERSION} present");
        return Ok(true);
    }
    std::fs::create_dir_all(&dir)?;
    let package = format!("playwright-core@{PLAYWRIGHT_CORE_VERSION}");
    Ok(Command::new("npm")
        .args(["install", "--no-save", "--no-audit", "--no-fund", "--prefix"])
        .arg(&dir)
        .arg(&package)
        .status()
        .context("running npm (the nodejs package brings it)")?
        .success())
}

fn section(title: &str) {
    println!("\n==> {title}");
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

pub(crate) fn install_packages() -> Result<()> {
    section("system packages");
    let mut missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if !has_kubectl() {
        missing.push("kubernetes-client");
    }
    // NodeSource's nodejs carries npm; Debian's splits it out.
    if Command::new("npm").arg("--version").output().is_err() {
        missing.push("npm");
    }
    if missing.is_empty() {
        println!("all present: {}", PACKAGES.join(" "));
        return Ok(());
    }
    if !is_root() {
        bail!("missing packages {}: run `cargo xtask ci` as root so it can install them", missing.join(" "));
    }
    println!("installing: {}", missing.join(" "));
    let quiet = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get (this needs a Debian machine)")?;
        if !status.success() {
            bail!("apt-get {} failed", args.join(" "));
        }
        Ok(())
    };
    quiet(&["-qq", "update"])?;
    let mut install = vec!["-qq", "install", "-y", "--no-install-recommends"];
    install.extend(&missing);
    quiet(&install)
}

/// `kubectl kustomize` builds the Kubernetes bases in the deploy test. This kind of machine has kubectl
/// (with kustomize v5); Debian's own kubernetes-client is the fallback where it is missing, though its
/// kustomize (v2, in kubectl 1.20) is too old for the bases, which the test then says.
fn has_kubectl() -> bool {
    Command::new("kubectl").args(["version", "--client"]).output().is_ok_and(|o| o.status.success())
}

/// Builds meshd in release mode and returns the binary's path (for the demo and the benches).
pub(crate) fn build_release_meshd() -> Result<PathBuf> {
    let status = cargo().args(["build", "--release", "--locked", "-p", "meshd"]).status()?;
    if !status.success() {
        bail!("building meshd failed");
    }
    Ok(root().join("target/release/meshd"))
}

pub(crate) fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn bench(which: Option<&str>, rest: &[String]) -> Result<bool> {
    match which {
        Some("routes") => {
            let count = match rest {
                [flag, n] if flag == "--count" => n.parse().context("--count takes a number")?,
                [] => 10_000,
                _ => bail!("usage: cargo xtask bench routes [--count N]"),
            };
            routes::run(count)
        }
        Some("gap") => {
            let (mut count, mut meshd) = (10_000, None);
            let mut rest = rest.iter();
            while let Some(flag) = rest.next() {
                match (flag.as_str(), rest.next()) {
                    ("--count", Some(n)) => count = n.parse().context("--count takes a number")?,
                    ("--meshd", Some(path)) => meshd = Some(PathBuf::from(path)),
                    _ => bail!("usage: cargo xtask bench gap [--count N] [--meshd PATH]"),
                }
            }
            gap::run(count, meshd)
        }
        Some("dns") => {
            let seconds = match rest {
                [flag, n] if flag == "--seconds" => n.parse().context("--seconds takes a number")?,
                [] => 10,
                _ => bail!("usage: cargo xtask bench dns [--seconds N]"),
            };
            dns_bench::run(seconds)
        }
        Some("throughput") => {
            let seconds = match rest {
                [flag, n] if flag == "--seconds" => n.parse().context("--seconds takes a number")?,
                [] => 10,
                _ => bail!("usage: cargo xtask bench throughput [--seconds N]"),
            };
            throughput::run(seconds)
        }
        None | Some("snat") => {
            let criterion = cargo().args(["bench", "-p", "mesh-benches", "--bench", "snat"]).status()?.success();
            let memory = cargo().args(["bench", "-p", "mesh-benches", "--bench", "flow_memory"]).status()?.success();
            Ok(criterion && memory)
        }
        Some("userspace") => {
            let seconds = match rest {
                [] => 10,
                [flag, n] if flag == "--seconds" => n.parse()?,
                _ => bail!("usage: cargo xtask bench userspace [--seconds N]"),
            };
            userspace_bench::run(seconds)
        }
        Some(other) => bail!("unknown benchmark {other:?}; known: snat, routes, gap, throughput, dns, userspace"),
    }
}
