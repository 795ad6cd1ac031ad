//! The one error type of the binary: every verb and the daemon end in it, and it decides the exit status.

use std::fmt;
use std::process::ExitCode;

/// Why a verb or the daemon failed: bad input (exit status 2: change what was typed or configured) or the
/// system refusing or failing (1). Either is printed as one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    Input(String),
    System(String),
}

impl Error {
    /// The system refused `what`.
    pub fn system(what: &str, e: impl fmt::Display) -> Self {
        Error::System(format!("{what}: {e}"))
    }

    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Input(_) => ExitCode::from(2),
            Error::System(_) => ExitCode::FAILURE,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Input(message) | Error::System(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {}
