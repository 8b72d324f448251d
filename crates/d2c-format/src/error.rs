//! Errors that name the file and the field, so a user can find what is wrong without a debugger.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The bytes of a file do not form what they claim to be.
    #[error("{path}: {field}: {reason}")]
    Format { path: PathBuf, field: String, reason: String },
    /// The file is well-formed but its content is not acceptable (wrong type key, shapes...).
    #[error("{path}: {field}: {reason}")]
    Invalid { path: PathBuf, field: String, reason: String },
    #[error("{0}")]
    Usage(String),
    #[error("llama.cpp: {0}")]
    Llama(String),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }

    pub fn invalid(path: &Path, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid { path: path.to_path_buf(), field: field.into(), reason: reason.into() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
