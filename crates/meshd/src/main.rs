//! The meshd binary: one executable for the node daemon, its control verbs and the coordination server.
//! Only `version` exists so far; each verb arrives with the issue that builds it.

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
    }
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
