//! The meshd binary: one executable for the node daemon, its control verbs and, later, the coordination
//! server. Each verb arrives with the issue that builds it.

mod config;
mod daemon;
mod keys;
mod uapi;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "meshd", about = "Userspace WireGuard mesh and subnet router", disable_version_flag = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node daemon. With --config it runs static peers from a TOML or wg-quick file.
    Daemon {
        /// Static configuration: meshd TOML, or a wg-quick .conf with [Interface] and [Peer] sections.
        #[arg(long, env = "MESHD_CONFIG")]
        config: PathBuf,
        /// Where the generated private key and other state live.
        #[arg(long, env = "MESHD_STATE_DIR", default_value = daemon::default_state_dir().to_str())]
        state_dir: PathBuf,
        /// TUN device name (default: the config's, else mesh0).
        #[arg(long, env = "MESHD_TUN")]
        tun: Option<String>,
        /// UDP port for WireGuard (default: the config's ListenPort, else 41641; 0 picks one).
        #[arg(long, env = "MESHD_PORT")]
        port: Option<u16>,
        /// Directory of the WireGuard UAPI socket (<tun>.sock) that `wg show` reads.
        #[arg(long, env = "MESHD_UAPI_DIR", default_value = "/var/run/wireguard")]
        uapi_dir: PathBuf,
    },
    /// Print the version of meshd and of the protocols it speaks.
    Version {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version { json } => {
            println!("{}", version_text(json));
            ExitCode::SUCCESS
        }
        Command::Daemon { config, state_dir, tun, port, uapi_dir } => {
            init_logging();
            let options = daemon::Options { config, state_dir, tun, port, uapi_dir };
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("meshd: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(daemon::run(options)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(daemon::Failure::Config(message)) => {
                    eprintln!("meshd: {message}");
                    ExitCode::from(2)
                }
                Err(daemon::Failure::System(message)) => {
                    eprintln!("meshd: {message}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESHD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .init();
}

fn version_text(json: bool) -> String {
    let version = env!("CARGO_PKG_VERSION");
    let commit = option_env!("MESHD_GIT_COMMIT").unwrap_or("unknown");
    if json {
        format!(r#"{{"version":"{version}","commit":"{commit}","wireguard":"1"}}"#)
    } else {
        format!("meshd {version} (commit {commit})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names_the_package_version() {
        assert_eq!(version_text(false), format!("meshd {} (commit unknown)", env!("CARGO_PKG_VERSION")));
        assert!(version_text(true).starts_with(r#"{"version":""#));
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
