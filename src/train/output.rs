//! The output directory of `rrhf train`: what counts as a previous run in it, and clearing one (`--overwrite`).
//!
//! A previous run is never replaced silently: its metrics, checkpoints and model would otherwise be mixed with the
//! new run's (metrics.jsonl truncated, stale checkpoints outranking new ones when pruning by step number).

use std::path::{Path, PathBuf};

use crate::model::save::MODEL_FILES;
use crate::model::ModelError;

/// Files whose presence marks a directory as holding a run of `rrhf train`.
const RUN_MARKERS: &[&str] = &[
    "args.json",
    "metrics.jsonl",
    "model.safetensors",
    "model.safetensors.index.json",
];

/// Everything else a run writes at the top of its output (cleared by `--overwrite` with the markers).
const RUN_FILES: &[&str] = &["loss.png", "trainer_state.json", "optimizer.safetensors"];

fn is_checkpoint(name: &str) -> bool {
    // `checkpoint-N`, and the hidden `.checkpoint-N.tmp` / aside copies a killed save may leave.
    name.starts_with("checkpoint-") || name.starts_with(".checkpoint-")
}

fn is_marker(name: &str) -> bool {
    RUN_MARKERS.contains(&name) || is_checkpoint(name)
}

/// Whether `name` is something `rrhf train` writes (or a temporary file of one).
fn is_run_file(name: &str) -> bool {
    // A temporary file of `NAME.EXT` is `.NAME.EXT.<pid>.<n>.tmp` (crate::fsutil).
    let base = match name.strip_prefix('.') {
        Some(n) => n.split('.').take(2).collect::<Vec<_>>().join("."),
        None => name.to_string(),
    };
    let hidden_temp = name.starts_with('.') && (name.ends_with(".tmp") || name.ends_with(".old"));
    let known = |n: &str| {
        is_marker(n)
            || RUN_FILES.contains(&n)
            || MODEL_FILES.contains(&n)
            || (n.starts_with("model-") && n.ends_with(".safetensors"))
    };
    known(name) || (hidden_temp && known(&base))
}

/// The entries of `dir` that show it holds a previous run (sorted); empty when `dir` is absent or holds none.
pub fn previous_run(dir: &Path) -> Result<Vec<String>, ModelError> {
    Ok(entries(dir)?.into_iter().filter(|n| is_marker(n)).collect())
}

/// Removes what a previous run wrote in `dir` (files and checkpoints) and nothing else, so an `--output` that also
/// holds other files (data, notes) keeps them.
pub fn clear_previous_run(dir: &Path) -> Result<(), ModelError> {
    for name in entries(dir)? {
        if !is_run_file(&name) {
            continue;
        }
        let path = dir.join(&name);
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| ModelError::io(&path, e))?;
    }
    Ok(())
}

fn entries(dir: &Path) -> Result<Vec<String>, ModelError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ModelError::io(dir, e)),
    };
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| ModelError::io(dir, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// The newest complete checkpoint in `dir`, to suggest to `--resume`.
pub fn latest_checkpoint(dir: &Path) -> Option<PathBuf> {
    super::checkpoint::list_checkpoints(dir)
        .ok()?
        .pop()
        .map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_files_are_recognised_and_others_are_not() {
        for n in [
            "args.json",
            "metrics.jsonl",
            "loss.png",
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "config.json",
            "checkpoint-12",
            ".checkpoint-12.tmp",
            ".checkpoint-12.4242.0.old",
            ".model.safetensors.4242.3.tmp",
        ] {
            assert!(is_run_file(n), "{n}");
        }
        for n in ["train.jsonl", "notes.txt", ".git", "checkpoints.md.bak"] {
            assert!(!is_run_file(n), "{n}");
        }
        assert!(is_marker("checkpoint-3") && !is_marker("config.json"));
    }
}
