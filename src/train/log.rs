//! Training logs: `metrics.jsonl` (one JSON object per step or evaluation). The progress line lives in
//! [`crate::progress`] (re-exported here).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::model::ModelError;
pub use crate::progress::Progress;

/// Appends JSON lines to `metrics.jsonl`, flushed after every line so a killed run keeps what it logged.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `path` for appending; when resuming at `keep_until_step`, lines of later steps (written after that
    /// checkpoint by the interrupted run) are dropped first, so the log reads like one uninterrupted run.
    pub fn open(path: &Path, keep_until_step: Option<u64>) -> Result<Self, ModelError> {
        match keep_until_step {
            Some(step) if path.exists() => {
                let f = File::open(path).map_err(|e| ModelError::io(path, e))?;
                let mut kept = String::new();
                for line in BufReader::new(f).lines() {
                    let line = line.map_err(|e| ModelError::io(path, e))?;
                    let s = serde_json::from_str::<Value>(&line)
                        .ok()
                        .and_then(|v| v.get("step").and_then(Value::as_u64));
                    if s.is_some_and(|s| s <= step) {
                        kept.push_str(&line);
                        kept.push('\n');
                    }
                }
                crate::fsutil::write_atomic(path, kept.as_bytes())?;
            }
            None if path.exists() => {
                std::fs::remove_file(path).map_err(|e| ModelError::io(path, e))?;
            }
            _ => {}
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| ModelError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one line.
    pub fn write(&mut self, v: &Value) -> Result<(), ModelError> {
        writeln!(self.file, "{v}").map_err(|e| ModelError::io(&self.path, e))?;
        self.file.flush().map_err(|e| ModelError::io(&self.path, e))
    }
}

/// Reads every line of a metrics file.
pub fn read_metrics(path: &Path) -> Result<Vec<Value>, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect())
}
