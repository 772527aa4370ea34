//! Training logs: `metrics.jsonl` (one JSON object per step or evaluation) and the progress line.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;

use crate::model::ModelError;

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

/// A progress line: redrawn in place on a terminal, plain lines every `every` steps otherwise.
pub struct Progress {
    total: u64,
    start_step: u64,
    started: Instant,
    tty: bool,
    every: u64,
}

impl Progress {
    /// Progress over `total` steps, starting at `start_step` (resume).
    pub fn new(total: u64, start_step: u64, every: u64) -> Self {
        Self {
            total,
            start_step,
            started: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            every: every.max(1),
        }
    }

    /// Reports step `step` (1-based: steps done) with its loss and throughput.
    pub fn step(&self, step: u64, loss: f64, tokens_per_s: f64) {
        self.report(
            step,
            "step",
            &format!("loss {loss:.4}  {tokens_per_s:.0} tok/s"),
        );
    }

    /// Reports `step` of the total (1-based: steps done) as `"{unit} {step}/{total} [bar] {detail}  ETA …"`.
    pub fn report(&self, step: u64, unit: &str, detail: &str) {
        let done = step - self.start_step;
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = if done > 0 {
            elapsed / done as f64 * (self.total - step) as f64
        } else {
            0.0
        };
        let bar = {
            let w = 30usize;
            let fill = (w as f64 * step as f64 / self.total.max(1) as f64) as usize;
            format!(
                "[{}{}]",
                "#".repeat(fill.min(w)),
                ".".repeat(w - fill.min(w))
            )
        };
        let line = format!(
            "{unit} {step}/{} {bar} {detail}  ETA {}",
            self.total,
            fmt_secs(eta)
        );
        if self.tty {
            eprint!("\r{line}\x1b[K");
            if step == self.total {
                eprintln!();
            }
        } else if step.is_multiple_of(self.every) || step == self.total || done == 1 {
            eprintln!("{line}");
        }
    }

    /// Prints a message on its own line (clearing a drawn progress line).
    pub fn message(&self, msg: &str) {
        if self.tty {
            eprintln!("\r{msg}\x1b[K");
        } else {
            eprintln!("{msg}");
        }
    }
}

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}
