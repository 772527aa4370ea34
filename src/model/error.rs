//! Errors of the model layer; each names the file (and tensor or field) it concerns.

use std::path::PathBuf;

/// An error while loading, running or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file the model needs is absent.
    #[error("{path}: file not found ({what})")]
    MissingFile { path: PathBuf, what: String },
    /// A JSON file is not valid JSON or lacks a field.
    #[error("{path}: {msg}")]
    Json { path: PathBuf, msg: String },
    /// A config names an architecture this crate does not implement.
    #[error("{path}: unsupported architecture {arch:?} (supported: {supported})")]
    UnknownArchitecture {
        path: PathBuf,
        arch: String,
        supported: String,
    },
    /// A config field is missing or has an unusable value.
    #[error("{path}: field `{field}`: {msg}")]
    Config {
        path: PathBuf,
        field: String,
        msg: String,
    },
    /// A weight the architecture needs is not in the checkpoint.
    #[error("{source_desc}: tensor `{name}` is missing")]
    MissingTensor { source_desc: String, name: String },
    /// A weight has a shape other than the config implies.
    #[error("{source_desc}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        source_desc: String,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A safetensors file is corrupt (bad header, truncated data).
    #[error("{path}: invalid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    /// A GGUF file is corrupt or uses something unsupported.
    #[error("{path}: GGUF: {msg}")]
    Gguf { path: PathBuf, msg: String },
    /// The tokenizer could not be loaded or used.
    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// Bad arguments to a model call (shapes of ids, masks, labels).
    #[error("{0}")]
    Input(String),
    /// A tensor operation failed. (Not marked as the error's source: the message already holds it, and
    /// `{:#}` would print it twice.)
    #[error("tensor operation failed: {0}")]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::Candle(e)
    }
}

/// Result of the model layer.
pub type Result<T> = std::result::Result<T, ModelError>;

impl From<crate::fsutil::FsError> for ModelError {
    fn from(e: crate::fsutil::FsError) -> Self {
        ModelError::Io {
            path: e.path,
            source: e.source,
        }
    }
}

impl ModelError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
}
