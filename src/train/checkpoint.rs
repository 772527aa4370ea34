//! Checkpoints: `OUTPUT/checkpoint-{step}/` with the model in Hugging Face layout, `optimizer.safetensors` and
//! `trainer_state.json`. A checkpoint is written into a hidden temporary directory and renamed into place, so a
//! run killed mid-save leaves the previous checkpoints intact and no half-written one; an existing checkpoint of
//! the same step is renamed aside before the new one takes its name and removed only after (`fsutil::replace_dir`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::fsutil::{replace_dir, write_atomic};
use crate::model::save::{save_pretrained, write_safetensors};
use crate::model::tokenizer::{SideFiles, TextTokenizer};
use crate::model::weights::read_safetensors;
use crate::model::{ModelError, Weights};

/// Where training stands; enough to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    /// Steps of the whole run.
    pub total_steps: u64,
    /// Epoch of the next step (0-based).
    pub epoch: u64,
    /// Position of the next query within that epoch's shuffled order.
    pub epoch_offset: u64,
    /// The run's seed; epoch e shuffles with `Rng::new(epoch_seed(seed, e))`.
    pub seed: u64,
    /// Number of training records (a resumed run must see the same data).
    pub n_records: u64,
    /// Version of rrhf that wrote it.
    pub rrhf_version: String,
    /// Steps skipped so far for a non-finite loss or gradient norm (`--skip-nonfinite`).
    #[serde(default)]
    pub skipped_nonfinite: u64,
    /// AdamW updates done (steps minus skipped ones; its bias correction counts these). Absent in checkpoints of
    /// versions without `--skip-nonfinite`, where it equals `step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer_steps: Option<u64>,
    /// The flags (and data fingerprint) a resumed run must repeat to continue this one exactly, by flag name.
    /// Absent in checkpoints of older versions, which are then resumed without this check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<BTreeMap<String, serde_json::Value>>,
    /// f16 loss scaling where the run has it (the scale, the good steps towards its growth, overflow skips).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<LossScalerState>,
}

/// Where f16 dynamic loss scaling stands (part of [`TrainerState`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScalerState {
    pub scale: f64,
    pub good_steps: u64,
    pub overflow_skips: u64,
}

/// Name of the checkpoint directory of `step`.
pub fn checkpoint_dir(output: &Path, step: u64) -> PathBuf {
    output.join(format!("checkpoint-{step}"))
}

/// Everything a checkpoint holds, borrowed from the trainer.
pub struct CheckpointParts<'a> {
    pub weights: &'a Weights,
    pub tokenizer: &'a TextTokenizer,
    pub side: &'a SideFiles,
    pub optimizer: HashMap<String, Tensor>,
    pub state: &'a TrainerState,
    pub args_json: &'a serde_json::Value,
    pub save_dtype: Option<DType>,
}

/// Writes `checkpoint-{step}` atomically and then keeps at most `keep` checkpoints (oldest removed; 0 = all).
pub fn save_checkpoint(
    output: &Path,
    parts: &CheckpointParts,
    keep: usize,
) -> Result<PathBuf, ModelError> {
    let step = parts.state.step;
    let final_dir = checkpoint_dir(output, step);
    let tmp = output.join(format!(".checkpoint-{step}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    }
    save_pretrained(
        &tmp,
        parts.weights,
        parts.tokenizer,
        parts.side,
        parts.save_dtype,
    )?;
    write_safetensors(&tmp.join("optimizer.safetensors"), &parts.optimizer, None)?;
    fault_point(step);
    let state =
        serde_json::to_string_pretty(parts.state).map_err(|e| ModelError::Input(e.to_string()))?;
    write_atomic(&tmp.join("trainer_state.json"), state.as_bytes())?;
    let args = serde_json::to_string_pretty(parts.args_json)
        .map_err(|e| ModelError::Input(e.to_string()))?;
    write_atomic(&tmp.join("args.json"), args.as_bytes())?;
    // A resumed run rewrites checkpoints of steps after the one it resumed from: never leave a moment without one.
    replace_dir(&tmp, &final_dir)?;
    if keep > 0 {
        for dir in to_prune(list_checkpoints(output)?, step, keep) {
            std::fs::remove_dir_all(&dir).map_err(|e| ModelError::io(&dir, e))?;
        }
    }
    Ok(final_dir)
}

/// The checkpoints to remove after writing `step` so that at most `keep` remain: first any of a later step (left
/// by the run a resumed run continues from an earlier point; they belong to a continuation that no longer exists
/// and would otherwise outrank the new run's checkpoints), then the oldest.
fn to_prune(all: Vec<(u64, PathBuf)>, step: u64, keep: usize) -> Vec<PathBuf> {
    let (current, stale): (Vec<_>, Vec<_>) = all.into_iter().partition(|(s, _)| *s <= step);
    let excess = current.len().saturating_sub(keep);
    stale
        .into_iter()
        .chain(current.into_iter().take(excess))
        .map(|(_, d)| d)
        .collect()
}

/// Test hook: `RRHF_FAULT_ABORT_IN_SAVE=STEP` aborts the process in the middle of writing that step's checkpoint,
/// as a kill would, so tests can show the previous checkpoint survives.
fn fault_point(step: u64) {
    if std::env::var("RRHF_FAULT_ABORT_IN_SAVE")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        == Some(step)
    {
        std::process::abort();
    }
}

/// The complete checkpoints under `output`, oldest first.
pub fn list_checkpoints(output: &Path) -> Result<Vec<(u64, PathBuf)>, ModelError> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(output) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(ModelError::io(output, e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| ModelError::io(output, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads `trainer_state.json` and `optimizer.safetensors` of a checkpoint.
pub fn load_checkpoint_state(
    dir: &Path,
) -> Result<(TrainerState, HashMap<String, Tensor>), ModelError> {
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ModelError::MissingFile {
                path: state_path.clone(),
                what: "the trainer state of the checkpoint given to --resume".into(),
            }
        } else {
            ModelError::io(&state_path, e)
        }
    })?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: state_path.clone(),
        msg: e.to_string(),
    })?;
    let opt = read_safetensors(&dir.join("optimizer.safetensors"), DType::F32, &Device::Cpu)?;
    Ok((state, opt))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(steps: &[u64]) -> Vec<(u64, PathBuf)> {
        steps
            .iter()
            .map(|&s| (s, PathBuf::from(format!("checkpoint-{s}"))))
            .collect()
    }

    #[test]
    fn pruning_removes_stale_later_checkpoints_before_the_new_ones() {
        // Resumed from 3 with checkpoints 3, 6, 9 of the earlier run on disk; 6 was just rewritten.
        let gone = to_prune(dirs(&[3, 6, 9]), 6, 1);
        assert_eq!(
            gone,
            vec![PathBuf::from("checkpoint-9"), PathBuf::from("checkpoint-3")]
        );
        assert_eq!(
            to_prune(dirs(&[2, 4, 5]), 5, 2),
            vec![PathBuf::from("checkpoint-2")]
        );
        assert!(to_prune(dirs(&[2]), 2, 2).is_empty());
    }
}
