//! Errors of the data layer: each names the file and, where it applies, the line (or Parquet row) and field.

use std::path::PathBuf;

/// Where in an input a problem is: file, 1-based line or row, and field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    /// 1-based line (JSONL) or row (Parquet); `None` for whole-file problems.
    pub line: Option<usize>,
    pub field: Option<String>,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        Ok(())
    }
}

/// An error while reading or writing data files.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A record is malformed.
    #[error("{at}: {msg}")]
    Invalid { at: Location, msg: String },
    /// The file holds no records.
    #[error("{0}: the file holds no records")]
    Empty(PathBuf),
    /// Options that cannot describe the data (e.g. `--max-len` beyond the model's positions).
    #[error("{0}")]
    Config(String),
    /// Tokenising a record failed.
    #[error(transparent)]
    Tokenize(#[from] crate::model::ModelError),
}

impl From<crate::fsutil::FsError> for DataError {
    fn from(e: crate::fsutil::FsError) -> Self {
        DataError::Io {
            path: e.path,
            source: e.source,
        }
    }
}

impl DataError {
    /// An invalid-record error at `path:line` (field optional).
    pub fn invalid(
        path: impl Into<PathBuf>,
        line: Option<usize>,
        field: Option<&str>,
        msg: impl Into<String>,
    ) -> Self {
        DataError::Invalid {
            at: Location {
                path: path.into(),
                line,
                field: field.map(String::from),
            },
            msg: msg.into(),
        }
    }

    /// Wraps an I/O error with its path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}
