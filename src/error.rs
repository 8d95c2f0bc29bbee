//! The one error type of cronpost: a message for a person and a sysexits(3)
//! exit code for the shell, so every failure ends as one clear line.

use std::fmt;

/// Exit codes from sysexits(3); the only codes `cronpost` exits with besides 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitCode {
    /// 64: the command line was wrong.
    Usage = 64,
    /// 65: input data was wrong (payload, NDJSON line, unknown topic).
    DataErr = 65,
    /// 66: an input file does not exist or cannot be read.
    NoInput = 66,
    /// 69: a service (the database) is unavailable.
    Unavailable = 69,
    /// 70: an internal error, a bug.
    Software = 70,
    /// 71: the system refused (fork failed).
    OsErr = 71,
    /// 73: an output file (the database) cannot be created or written.
    CantCreate = 73,
    /// 74: an I/O error (disk full, ...).
    IoErr = 74,
    /// 75: a temporary failure (database busy); trying again later may work.
    TempFail = 75,
    /// 77: permission denied.
    NoPerm = 77,
    /// 78: the configuration is wrong.
    Config = 78,
}

/// An error: what went wrong, where, and which exit code it ends with.
#[derive(Debug)]
pub struct Error {
    /// The exit code the process ends with.
    pub code: ExitCode,
    /// One line for a person.
    pub message: String,
}

/// Result with the cronpost [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with an explicit exit code.
    pub fn new(code: ExitCode, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
        }
    }

    /// Bad command-line usage (64).
    pub fn usage(message: impl Into<String>) -> Error {
        Error::new(ExitCode::Usage, message)
    }

    /// Bad input data (65).
    pub fn data(message: impl Into<String>) -> Error {
        Error::new(ExitCode::DataErr, message)
    }

    /// Bad configuration (78).
    pub fn config(message: impl Into<String>) -> Error {
        Error::new(ExitCode::Config, message)
    }

    /// An internal error (70).
    pub fn software(message: impl Into<String>) -> Error {
        Error::new(ExitCode::Software, message)
    }

    /// An I/O error, classified by its kind.
    pub fn io(context: impl fmt::Display, err: std::io::Error) -> Error {
        use std::io::ErrorKind::*;
        let code = match err.kind() {
            NotFound => ExitCode::NoInput,
            PermissionDenied => ExitCode::NoPerm,
            _ => ExitCode::IoErr,
        };
        Error::new(code, format!("{context}: {err}"))
    }

    /// For a file that could not be created: 73 unless permission (77).
    pub fn with_code_for_create(mut self) -> Error {
        if self.code != ExitCode::NoPerm {
            self.code = ExitCode::CantCreate;
        }
        self
    }

    /// Prefixes the message with where it happened.
    pub fn context(mut self, context: impl fmt::Display) -> Error {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}
