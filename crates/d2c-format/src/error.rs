//! Errors that name the file and the field, so a user can find what is wrong without a debugger.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The message already carries the OS error; it is deliberately not the error's `source`,
    /// or `{:#}` (anyhow's chain, as the CLI prints) would repeat it.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    /// The bytes of a file do not form what they claim to be.
    #[error("{path}: {field}: {reason}")]
    Format { path: PathBuf, field: String, reason: String },
    /// The file is well-formed but its content is not acceptable (wrong type key, shapes...).
    #[error("{path}: {field}: {reason}")]
    Invalid { path: PathBuf, field: String, reason: String },
    /// A mistake in how the tool was called: options, paths, budgets.
    #[error("{0}")]
    Usage(String),
    /// A factorisation that did not converge on the inputs (not the user's mistake, and not
    /// a bug either: the inputs help reproduce it).
    #[error("numerical failure: {0}")]
    Numerical(String),
    /// A broken internal invariant or a misused API: a bug in d2c-gguf.
    #[error("internal error (a bug in d2c-gguf, please report it): {0}")]
    Internal(String),
    #[error("llama.cpp: {0}")]
    Llama(String),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), error: source }
    }

    pub fn invalid(path: &Path, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid { path: path.to_path_buf(), field: field.into(), reason: reason.into() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
