//! The training loop: micro-batches of queries, gradient accumulation, clipping, AdamW with warm-up and decay,
//! evaluation, checkpoints and exact resume.
//!
//! Determinism: the data order of epoch e is a shuffle seeded by (seed, e), and step s covers a fixed slice of it,
//! so a run resumed from a checkpoint replays exactly the steps the uninterrupted run would have taken.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use serde::Serialize;
use serde_json::{json, Value};

use crate::data::args::RecordArgs;
use crate::data::batch::build_batch;
pub(crate) use crate::data::prepare::check_max_len;
use crate::data::prepare::tokenize_all;
pub use crate::data::prepare::{prepare, Prepared};
use crate::data::readers::read_records;
use crate::data::tokenize::TokenizedRecord;
use crate::data::DataError;
use crate::device::DTypeSpec;
use crate::dist::{self, Comm};
use crate::fsutil::write_atomic;
use crate::model::load::ModelArgs;
use crate::model::save::{link_pretrained, save_pretrained};
use crate::model::{load_model, CausalLm, ModelError, Weights};
use crate::rng::Rng;

use super::args::{LossArgs, OptimArgs};
use super::checkpoint::{
    load_checkpoint_state, save_checkpoint, CheckpointParts, LossScalerState, TrainerState,
};
use super::log::{read_metrics, MetricsLog, Progress};
use super::loss::{rrhf_loss, LossConfig, LossOutput};
use super::optim::{clip_grad_norm, global_grad_norm, AdamW};
use super::output::{clear_previous_run, latest_checkpoint, previous_run};
use super::plot::{plot_curves, Series};
use super::precision::{stored_dtype, LossScaler, Precision, ScaleOutcome};
use super::schedule::{lr_at, warmup_steps};
use crate::model::recompute::grads_by_recompute;

/// Everything `rrhf train` can be told (every field is a flag; `--config FILE.toml` may set any of them).
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct TrainConfig {
    /// Initial model (`--model`), `--device`, `--dtype` (the training dtype).
    #[command(flatten)]
    #[serde(flatten)]
    pub model: ModelArgs,
    /// Training records (RRHF JSONL, pairwise JSONL/Parquet, hh-rlhf raw, Alpaca).
    #[arg(long)]
    pub data: PathBuf,
    /// Output directory: final model, checkpoints, metrics.jsonl, args.json, loss.png.
    #[arg(long)]
    pub output: PathBuf,
    /// How --data and --eval-data are read and tokenised.
    #[command(flatten)]
    #[serde(flatten)]
    pub records: RecordArgs,
    /// The loss terms.
    #[command(flatten)]
    #[serde(flatten)]
    pub loss: LossArgs,
    /// Batching, precision and the optimizer.
    #[command(flatten)]
    #[serde(flatten)]
    pub optim: OptimArgs,
    /// Passes over the data.
    #[arg(long, default_value_t = 3)]
    pub epochs: u64,
    /// Stop after this many optimizer steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Held-out records: loss and ranking accuracy every --eval-every steps and at the end.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Write a checkpoint every N steps (and always at the end).
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Keep at most N checkpoints (0: all).
    #[arg(long, default_value_t = 0)]
    pub save_total_limit: usize,
    /// dtype of the final saved model (default: the dtype --model stores its weights in, else the training
    /// dtype); checkpoints always hold the f32 master weights, so a resumed run continues exactly.
    #[arg(long)]
    pub save_dtype: Option<DTypeSpec>,
    /// Continue from OUTPUT/checkpoint-N (same data and flags): the loss sequence equals an uninterrupted run.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Replace a previous run in --output (its metrics, checkpoints and model are removed first). Without it (or
    /// --resume) an output directory holding a run is refused and left untouched.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Print a plain progress line every N steps when stderr is not a terminal.
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
    /// Under mpirun/srun: end the job on every rank when a collective (the gradient all-reduce) waits longer than
    /// this many seconds for the others (a rank died or hangs). Must exceed the longest step, checkpoint save
    /// included (0: wait forever).
    #[arg(long, default_value_t = 1800.0)]
    pub collective_timeout_s: f64,
    /// Under mpirun/srun: 1 shards AdamW's state (ZeRO stage 1): each rank keeps the moments of 1/N of the
    /// parameters and updates those, then sends them to the others (one more broadcast of the weights per step;
    /// checkpoints still hold the whole state). 0: every rank keeps all of it.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub zero_stage: u8,
}

/// An error of `rrhf train` / `rrhf rank`.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{0}")]
    Config(String),
    /// `--output` holds a run and neither `--resume` nor `--overwrite` was given.
    #[error("{dir} holds a previous run ({found}); pass --resume {resume} to continue it, --overwrite to replace it, or choose another --output (nothing was written)")]
    OutputInUse {
        dir: PathBuf,
        found: String,
        resume: String,
    },
    /// `--resume` from a checkpoint written with other flags or data.
    #[error("--resume {checkpoint}: {flag} was {then} in the run that wrote this checkpoint and is {now} now; a resumed run must repeat it to continue that run exactly (start a new run to change it)")]
    ResumeMismatch {
        checkpoint: PathBuf,
        flag: String,
        then: String,
        now: String,
    },
    /// A NaN or infinite loss or gradient norm: the optimizer step was not taken.
    #[error("step {step}: {what} is {value} ({scope}: {records}); stopped before the optimizer step, so no weight took it and none was saved. {next}")]
    NonFinite {
        step: u64,
        what: &'static str,
        /// Whose records are listed: the micro-batch with the bad loss, or every one of the step (a bad gradient
        /// norm is only known for their sum).
        scope: &'static str,
        value: f64,
        records: String,
        next: String,
    },
    /// A weight about to be saved is not finite (refused rather than written).
    #[error("weight `{0}` holds NaN or infinite values after the update; refusing to save it")]
    NonFiniteWeight(String),
}

impl From<crate::fsutil::FsError> for TrainError {
    fn from(e: crate::fsutil::FsError) -> Self {
        TrainError::Model(e.into())
    }
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Model(ModelError::Candle(e))
    }
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: u64,
    pub final_loss: f64,
    pub tokens_per_s: f64,
    pub skipped_records: usize,
    pub truncated_queries: usize,
    pub truncated_responses: usize,
    /// Steps skipped for a non-finite loss or gradient norm (`--skip-nonfinite`).
    pub skipped_nonfinite: u64,
}

/// Seed of epoch `e`'s shuffle.
pub(crate) fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    seed ^ epoch.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Whether two paths name the same existing directory (symlinks and `..` resolved).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The config of a model directory read on its own (cheap), so `--max-len` is checked before the weights load;
/// `None` for a GGUF file or an unreadable config (loading reports that one properly).
pub(crate) fn config_of(model: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(model.join("config.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// `crc32 XXXXXXXX of N bytes` of a file's contents: a resumed run must train on the same bytes.
pub(crate) fn data_fingerprint(path: &Path) -> Result<String, TrainError> {
    let mut f = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut crc = flate2::Crc::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
    }
    Ok(format!("crc32 {:08x} of {} bytes", crc.sum(), crc.amount()))
}

/// What a resumed run must repeat to continue a run exactly, by flag name (stored in `trainer_state.json`).
pub(crate) fn run_fingerprint(
    cfg: &TrainConfig,
    max_query_len: usize,
    data: String,
) -> BTreeMap<String, Value> {
    let mut run = BTreeMap::from([
        ("--batch-queries".into(), json!(cfg.optim.batch_queries)),
        ("--grad-accum".into(), json!(cfg.optim.grad_accum)),
        ("--max-len".into(), json!(cfg.records.max_len)),
        ("--max-query-len".into(), json!(max_query_len)),
        (
            "--format".into(),
            json!(cfg.records.read.format.to_string()),
        ),
        (
            "--prompt-template".into(),
            json!(cfg.records.read.prompt_template.to_string()),
        ),
        ("--rank-weight".into(), json!(cfg.loss.rank_weight)),
        ("--length-penalty".into(), json!(cfg.loss.length_penalty)),
        ("--margin".into(), json!(cfg.loss.margin)),
        (
            "--sft-reduction".into(),
            json!(cfg.loss.sft_reduction.to_string()),
        ),
        ("--data content".into(), json!(data)),
        ("--dtype".into(), json!(cfg.model.dtype.to_string())),
        // Each optimizer step's queries are dealt to the ranks, so the world size is part of the batch.
        (
            "world size (mpirun -np)".into(),
            json!(dist::world().size()),
        ),
    ]);
    // Only when set, so that checkpoints written before the flag existed still resume.
    if cfg.records.no_response_eos {
        run.insert("--no-response-eos".into(), json!(true));
    }
    run
}

/// Refuses to resume with a flag (or data) other than the checkpoint's run used, naming it and both values.
pub(crate) fn check_same_run(
    checkpoint: &Path,
    then: &BTreeMap<String, Value>,
    now: &BTreeMap<String, Value>,
) -> Result<(), TrainError> {
    for (flag, old) in then {
        let new = now.get(flag).unwrap_or(&Value::Null);
        if old != new {
            let show = |v: &Value| match v {
                Value::String(s) => s.clone(),
                Value::Null => "unset".into(),
                other => other.to_string(),
            };
            return Err(TrainError::ResumeMismatch {
                checkpoint: checkpoint.to_path_buf(),
                flag: flag.clone(),
                then: show(old),
                now: show(new),
            });
        }
    }
    Ok(())
}

/// Refuses weights with NaN or infinite values before they are saved (the step checks make this unreachable in a
/// normal run; it guards every path that writes weights).
pub(crate) fn check_finite_weights(w: &Weights) -> Result<(), TrainError> {
    let mut names: Vec<&String> = w.tensors().keys().collect();
    names.sort();
    for name in names {
        let t = &w.tensors()[name];
        if t.dtype().is_float() && !global_grad_norm(std::slice::from_ref(t))?.is_finite() {
            return Err(TrainError::NonFiniteWeight(name.clone()));
        }
    }
    Ok(())
}

/// Test hook: `RRHF_FAULT_NAN_AT_STEP=3,5` makes the loss of the first micro-batch of those steps (1-based) NaN
/// before its backward pass, as a numerically broken batch would, so tests can show what the trainer does then.
pub(crate) fn fault_nan_at(step: u64) -> bool {
    std::env::var("RRHF_FAULT_NAN_AT_STEP").is_ok_and(|v| {
        v.split(',')
            .any(|s| s.trim().parse::<u64>().ok() == Some(step))
    })
}

/// Test hook: `RRHF_FAULT_RANK_AT_STEP=R:S:kill` (or `:hang`) makes rank R, at the start of step S (1-based),
/// die by SIGKILL (or stop answering, alive), as a crashed node or a stuck process would, so tests can show that
/// the other ranks end the job instead of waiting forever.
fn fault_rank_at(comm: &Comm, step: u64) {
    let Ok(spec) = std::env::var("RRHF_FAULT_RANK_AT_STEP") else {
        return;
    };
    let parts: Vec<&str> = spec.split(':').collect();
    if parts.len() != 3
        || parts[0].parse::<usize>().ok() != Some(comm.rank())
        || parts[1].parse::<u64>().ok() != Some(step)
    {
        return;
    }
    match parts[2] {
        // SAFETY: kill(2) on this process's own id.
        "kill" => unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        },
        "hang" => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        _ => {}
    }
}

/// Loss terms of a set of queries, averaged, plus the tokens processed.
#[derive(Debug, Default, Clone)]
pub(crate) struct StepStats {
    pub(crate) loss: f64,
    pub(crate) rank_loss: f64,
    pub(crate) sft_loss: f64,
    rank_acc_sum: f64,
    rank_acc_n: usize,
    p_best: f64,
    p_worst: f64,
    pub(crate) queries: usize,
    pub(crate) tokens: usize,
    /// The first micro-batch (positions in the records given) whose loss was NaN or infinite, and that loss; the
    /// remaining micro-batches of the step are not run.
    nonfinite: Option<(std::ops::Range<usize>, f64)>,
}

impl StepStats {
    fn add(&mut self, out: &super::loss::LossOutput, loss: f64, tokens: usize) {
        let n = out.queries.len();
        self.loss += loss * n as f64;
        for q in &out.queries {
            self.rank_loss += q.rank_loss;
            self.sft_loss += q.sft_loss;
            self.p_best += q.p_best;
            self.p_worst += q.p_worst;
            if let Some(a) = q.rank_acc {
                self.rank_acc_sum += a;
                self.rank_acc_n += 1;
            }
        }
        self.queries += n;
        self.tokens += tokens;
    }

    pub(crate) fn mean(&self, x: f64) -> f64 {
        x / self.queries.max(1) as f64
    }

    pub(crate) fn rank_acc(&self) -> Option<f64> {
        (self.rank_acc_n > 0).then(|| self.rank_acc_sum / self.rank_acc_n as f64)
    }

    /// The statistics of the whole step from every rank's share: sums (in rank order), and the first micro-batch
    /// `k` (of `per` queries, out of `total`) whose loss was not finite on any rank, so that every rank reports, and
    /// decides, the same as one process would.
    fn reduce(self, comm: &Comm, per: usize, total: usize) -> StepStats {
        if !comm.is_parallel() {
            return self;
        }
        let (bad_k, bad_value) = match &self.nonfinite {
            Some((range, v)) => ((range.start / per) as f64, *v),
            None => (-1.0, 0.0),
        };
        let local = [
            self.loss,
            self.rank_loss,
            self.sft_loss,
            self.rank_acc_sum,
            self.rank_acc_n as f64,
            self.p_best,
            self.p_worst,
            self.queries as f64,
            self.tokens as f64,
            bad_k,
            bad_value,
        ];
        let all = comm.all_gather_f64("the step statistics", &local);
        let mut out = StepStats::default();
        let mut first_bad: Option<(f64, f64)> = None;
        for r in all.chunks(local.len()) {
            out.loss += r[0];
            out.rank_loss += r[1];
            out.sft_loss += r[2];
            out.rank_acc_sum += r[3];
            out.rank_acc_n += r[4] as usize;
            out.p_best += r[5];
            out.p_worst += r[6];
            out.queries += r[7] as usize;
            out.tokens += r[8] as usize;
            if r[9] >= 0.0 && first_bad.is_none_or(|(k, _)| r[9] < k) {
                first_bad = Some((r[9], r[10]));
            }
        }
        out.nonfinite = first_bad.map(|(k, v)| {
            let start = k as usize * per;
            (start..(start + per).min(total), v)
        });
        out
    }
}

/// The loss of `records` under `model` (micro-batches of `batch_queries`), with gradients accumulated into
/// `grads` when given (each micro-batch weighted by its share of the queries, so the result is the gradient of the
/// mean over all queries). The micro-batches are dealt round-robin to `comm`'s ranks (rank r runs r, r + N, ...):
/// the gradients are this rank's share (the caller sums them over ranks), the statistics those of all ranks.
/// `poison` (a test hook) makes the first micro-batch's loss NaN.
#[allow(clippy::too_many_arguments)]
fn run_queries(
    model: &CausalLm,
    records: &[&TokenizedRecord],
    comm: &Comm,
    cfg: &TrainConfig,
    loss_cfg: &LossConfig,
    pad_id: u32,
    device: &Device,
    mut grads: Option<(&[candle_core::Var], &mut Vec<Option<Tensor>>)>,
    poison: bool,
    loss_scale: f64,
) -> Result<StepStats, TrainError> {
    let mut stats = StepStats::default();
    let total = records.len();
    let per = cfg.optim.batch_queries.max(1);
    for (k, chunk) in records.chunks(per).enumerate() {
        if k % comm.size() != comm.rank() {
            continue;
        }
        let batch = build_batch(chunk, cfg.optim.layout, pad_id, device)?;
        let scores: Vec<Vec<f64>> = chunk.iter().map(|r| r.scores.clone()).collect();
        let weight = chunk.len() as f64 / total as f64;
        // The loss of this micro-batch from its label log-probs: the loss output, its value, and the tensor
        // to differentiate (weighted by the micro-batch's share of the step's queries).
        let loss_of = |lp: &Tensor| -> Result<(Tensor, (LossOutput, f64)), ModelError> {
            let out = rrhf_loss(
                lp,
                &batch.response_of_label,
                &batch.n_tokens,
                &scores,
                loss_cfg,
            )?;
            let loss = if poison && k == 0 {
                (&out.loss * f64::NAN)?
            } else {
                out.loss.clone()
            };
            let value = loss.to_scalar::<f32>()? as f64;
            Ok(((loss * (weight * loss_scale))?, (out, value)))
        };
        let (out, loss_value) = match grads.as_mut() {
            Some((vars, acc)) if cfg.optim.grad_checkpoint => {
                let ((out, value), step_grads) =
                    grads_by_recompute(model, &batch.input, &batch.labels, vars, loss_of)?;
                if value.is_finite() {
                    for (slot, g) in acc.iter_mut().zip(step_grads) {
                        if let Some(g) = g {
                            *slot = Some(match slot.take() {
                                Some(prev) => (prev + g)?,
                                None => g,
                            });
                        }
                    }
                }
                (out, value)
            }
            _ => {
                let lp = model.label_logprobs(&batch.input, &batch.labels)?;
                let (weighted, (out, value)) = loss_of(&lp)?;
                if value.is_finite() {
                    if let Some((vars, acc)) = grads.as_mut() {
                        let store = weighted.backward()?;
                        // Detached: a gradient as candle returns it still references this micro-batch's
                        // forward graph, which would stay alive until the optimizer step.
                        for (slot, var) in acc.iter_mut().zip(vars.iter()) {
                            if let Some(g) = store.get(var.as_tensor()) {
                                *slot = Some(match slot.take() {
                                    Some(prev) => (prev + g)?.detach(),
                                    None => g.detach(),
                                });
                            }
                        }
                    }
                }
                (out, value)
            }
        };
        if !loss_value.is_finite() && grads.is_some() {
            // Its gradients would poison the whole step: stop here and let the caller decide.
            stats.nonfinite = Some((k * per..k * per + chunk.len(), loss_value));
            break;
        }
        stats.add(&out, loss_value, batch.tokens);
    }
    Ok(stats.reduce(comm, per, total))
}

/// Test hook: `RRHF_DEBUG_GRAD_DUMP=DIR` appends, per optimizer step, the norm and a CRC-32 of this rank's
/// gradients as the optimizer receives them (after the all-reduce, before clipping) to `DIR/grads-rank{R}.jsonl`,
/// so a test can show that every rank steps with the same gradients.
fn debug_dump_grads(comm: &Comm, updates: u64, grads: &[Tensor]) -> Result<(), TrainError> {
    let Some(dir) = std::env::var_os("RRHF_DEBUG_GRAD_DUMP") else {
        return Ok(());
    };
    let (norm, crc) = dist::grad_digest(grads)?;
    let path = Path::new(&dir).join(format!("grads-rank{}.jsonl", comm.rank()));
    let line = json!({"rank": comm.rank(), "updates_before": updates, "norm": norm, "crc32": crc});
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{line}"))
        .map_err(|e| ModelError::io(&path, e))?;
    Ok(())
}

/// What one optimizer step did.
pub(crate) enum StepOutcome {
    /// The weights took the update; the step's loss terms and its gradient norm before clipping.
    Updated { stats: StepStats, grad_norm: f64 },
    /// `what` (the loss or the gradient norm) was `value`: no weight was updated. `blamed`: the positions, in the
    /// step's records, of the micro-batch with the bad loss, or all of them for a bad gradient norm (only known for
    /// their sum).
    NonFinite {
        what: &'static str,
        value: f64,
        blamed: std::ops::Range<usize>,
    },
    /// f16 gradients overflowed under loss scaling: no update, and the scale was halved.
    Overflow,
}

/// One optimizer step on `records`: the loss and its gradient accumulated over micro-batches, global-norm
/// clipping, and the AdamW update at `lr` unless the loss or the gradient norm is NaN or infinite. With
/// `precision` (mixed precision), the gradients of the compute copy update the f32 masters, which are then cast
/// back. `poison` (a test hook) makes the first micro-batch's loss NaN. Shared by `rrhf train` and `rrhf iterate --setting OP`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn optimizer_step(
    model: &CausalLm,
    records: &[&TokenizedRecord],
    cfg: &TrainConfig,
    loss_cfg: &LossConfig,
    pad_id: u32,
    device: &Device,
    (vars, optimizer): (&[candle_core::Var], &mut AdamW),
    lr: f64,
    poison: bool,
    mut precision: Option<&mut Precision>,
) -> Result<StepOutcome, TrainError> {
    let comm = dist::world();
    let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
    let loss_scale = precision.as_ref().map_or(1.0, |p| p.loss_scale());
    let stats = run_queries(
        model,
        records,
        comm,
        cfg,
        loss_cfg,
        pad_id,
        device,
        Some((vars, &mut acc)),
        poison,
        loss_scale,
    )?;
    if let Some((range, loss)) = &stats.nonfinite {
        return Ok(StepOutcome::NonFinite {
            what: LOSS,
            value: *loss,
            blamed: range.clone(),
        });
    }
    let mut grads: Vec<Tensor> = Vec::with_capacity(acc.len());
    for (v, g) in vars.iter().zip(acc) {
        grads.push(match g {
            Some(g) => g,
            // A parameter outside the graph of this step's loss gets a zero gradient (AdamW still decays it).
            None => Tensor::zeros(v.shape(), v.dtype(), v.device())?,
        });
    }
    if let Some(p) = precision.as_deref() {
        grads = p.master_grads(grads)?;
    }
    // Data parallel: the sum of every rank's share is the step's gradient, before clipping so that the clip (and
    // every decision below) uses the global norm and is the same on every rank.
    dist::all_reduce_sum_tensors(comm, &mut grads)?;
    debug_dump_grads(comm, optimizer.steps(), &grads)?;
    let grad_norm = clip_grad_norm(&mut grads, cfg.optim.max_grad_norm)?;
    // Under f16 loss scaling an overflow is expected (the scale is probed upwards): skip and halve, not an
    // error; a non-finite norm at the floor scale (or without scaling) is a real one.
    let outcome = match precision.as_mut().and_then(|p| p.scaler.as_mut()) {
        Some(s) => s.update(grad_norm),
        None if grad_norm.is_finite() => ScaleOutcome::Step,
        None => ScaleOutcome::NonFinite,
    };
    match outcome {
        ScaleOutcome::Overflow => Ok(StepOutcome::Overflow),
        ScaleOutcome::NonFinite => Ok(StepOutcome::NonFinite {
            what: "the gradient norm",
            value: grad_norm,
            blamed: 0..records.len(),
        }),
        ScaleOutcome::Step => {
            optimizer.step(&grads, lr)?;
            if optimizer.is_sharded() {
                // ZeRO-1: each rank updated its share; every rank needs all of them.
                dist::zero::broadcast_shards(comm, optimizer.params(), optimizer.shards())?;
            }
            if let Some(p) = precision {
                p.sync()?;
            }
            Ok(StepOutcome::Updated { stats, grad_norm })
        }
    }
}

/// Runs `rrhf train`.
///
/// Everything that can be refused is checked before anything is written: flags, the output directory, the
/// checkpoint to resume from, the data (file:line), `--max-len` against the model, and that a resumed run repeats
/// the flags and data of the run it continues.
pub fn train(cfg: &TrainConfig, args_json: &Value) -> Result<TrainSummary, TrainError> {
    if cfg.optim.batch_queries == 0 || cfg.optim.grad_accum == 0 {
        return Err(TrainError::Config(
            "--batch-queries and --grad-accum must be at least 1".into(),
        ));
    }
    let comm = dist::world();
    if !(cfg.collective_timeout_s >= 0.0 && cfg.collective_timeout_s.is_finite()) {
        return Err(TrainError::Config(format!(
            "--collective-timeout-s {} must be a number of seconds ≥ 0 (0: no timeout)",
            cfg.collective_timeout_s
        )));
    }
    comm.set_collective_timeout(
        (cfg.collective_timeout_s > 0.0).then(|| Duration::from_secs_f64(cfg.collective_timeout_s)),
    );
    // Length limits are checked before anything is loaded.
    let tok_opts = cfg.records.tokenize_options().map_err(TrainError::Config)?;
    let previous = previous_run(&cfg.output)?;
    if !previous.is_empty() && cfg.resume.is_none() && !cfg.overwrite {
        let shown: Vec<&str> = previous.iter().take(4).map(String::as_str).collect();
        let more = previous.len().saturating_sub(shown.len());
        return Err(TrainError::OutputInUse {
            dir: cfg.output.clone(),
            found: if more > 0 {
                format!("{} and {more} more", shown.join(", "))
            } else {
                shown.join(", ")
            },
            resume: latest_checkpoint(&cfg.output).map_or_else(
                || cfg.output.join("checkpoint-N").display().to_string(),
                |p| p.display().to_string(),
            ),
        });
    }
    if cfg.overwrite && same_dir(&cfg.output, &cfg.model.model) {
        // Clearing it would delete the model being trained, and a run that then fails would leave nothing.
        return Err(TrainError::Config(format!(
            "--overwrite with --output {} would delete the --model it trains (the same directory); choose another \
             --output",
            cfg.output.display()
        )));
    }
    let device = cfg.model.device.open()?;
    let dtype = cfg.model.dtype.dtype();
    let resume_state = match &cfg.resume {
        Some(dir) => Some(load_checkpoint_state(dir)?),
        None => None,
    };
    // Bad records fail here, with their line, before the model is loaded.
    let read = read_records(&cfg.data, &cfg.records.read_options(true))?;
    // A resumed run continues from the checkpoint's weights (same architecture, tokenizer and side files).
    let model_path = cfg.resume.as_ref().unwrap_or(&cfg.model.model);
    if let Some(config) = config_of(model_path) {
        check_max_len(cfg.records.max_len, &config, model_path)?;
    }
    // Loaded in f32: these are the master weights; Precision casts the copy the model computes with.
    let loaded = load_model(model_path, &device, candle_core::DType::F32)?;
    // Again for GGUF files, whose config comes with the weights.
    check_max_len(cfg.records.max_len, &loaded.side.config, model_path)?;
    let data = tokenize_all(&cfg.data, read, &cfg.records, &loaded)?;
    let eval = match &cfg.eval_data {
        Some(p) => Some(prepare(p, &cfg.records, &loaded)?),
        None => None,
    };
    let n = data.records.len();
    // The global batch: every rank runs --grad-accum micro-batches of --batch-queries per step.
    let per_step = cfg.optim.batch_queries * cfg.optim.grad_accum * comm.size();
    let steps_per_epoch = n.div_ceil(per_step) as u64;
    let total_steps = cfg.max_steps.unwrap_or(steps_per_epoch * cfg.epochs);
    if total_steps == 0 {
        return Err(TrainError::Config(
            "nothing to do: 0 training steps (check --epochs / --max-steps)".into(),
        ));
    }
    let run = run_fingerprint(cfg, tok_opts.max_query_len, data_fingerprint(&cfg.data)?);
    // Ranks that read different data or flags would silently train on a mix: refuse.
    comm.check_same(
        "the training flags and --data content",
        &serde_json::to_string(&run).map_err(|e| TrainError::Config(e.to_string()))?,
    )
    .map_err(|e| TrainError::Config(e.to_string()))?;
    if let (Some((state, _)), Some(dir)) = (&resume_state, &cfg.resume) {
        // First by flag: a changed --batch-queries also changes the step count, and the flag is the better news.
        if let Some(then) = &state.run {
            check_same_run(dir, then, &run)?;
        }
        if state.n_records != n as u64 || state.seed != cfg.seed || state.total_steps != total_steps
        {
            return Err(TrainError::Config(format!(
                "--resume: the checkpoint was written by a run with {} records, seed {} and {} steps; this run has {n}, {} and {total_steps}: pass the same data and flags",
                state.n_records, state.seed, state.total_steps, cfg.seed
            )));
        }
    }
    let warmup = warmup_steps(cfg.optim.warmup_ratio, total_steps);
    let loss_cfg = cfg.loss.config();

    // Validated: from here on the output directory is written, by rank 0 only, and only once every rank has
    // looked at it (a rank still checking would otherwise find rank 0's new files and refuse them as a previous
    // run).
    comm.barrier("the check of --output on every rank");
    if comm.is_root() {
        if cfg.overwrite && !previous.is_empty() {
            clear_previous_run(&cfg.output)?;
        }
        std::fs::create_dir_all(&cfg.output).map_err(|e| ModelError::io(&cfg.output, e))?;
        let args_text = serde_json::to_string_pretty(args_json)
            .map_err(|e| TrainError::Config(e.to_string()))?;
        write_atomic(&cfg.output.join("args.json"), args_text.as_bytes())?;
    }

    let scaler = LossScaler::new(cfg.optim.loss_scale, cfg.optim.loss_scale_window)
        .map_err(|e| TrainError::Config(format!("--loss-scale / --loss-scale-window: {e}")))?;
    let (model, mut precision) = Precision::new(&loaded.model, dtype, Some(scaler))?;
    let vars = precision.masters().to_vec();
    let mut optimizer = if cfg.zero_stage == 1 && comm.is_parallel() {
        let sizes: Vec<usize> = vars.iter().map(|(_, v)| v.elem_count()).collect();
        let ranges = dist::zero::shard_ranges(&sizes, comm.size());
        let opt = AdamW::sharded(vars.clone(), cfg.optim.adamw(), ranges, comm.rank())?;
        let all: usize = sizes.iter().sum::<usize>() * 8;
        if comm.is_root() {
            eprintln!(
                "ZeRO-1: AdamW state sharded over {} ranks: {:.1} MB on rank 0 instead of {:.1} MB",
                comm.size(),
                opt.state_bytes() as f64 / 1e6,
                all as f64 / 1e6
            );
        }
        opt
    } else {
        AdamW::new(vars.clone(), cfg.optim.adamw())?
    };
    let mut start_step = 0;
    let mut skipped_nonfinite = 0u64;
    if let Some((state, opt)) = &resume_state {
        optimizer.load_state(opt, state.optimizer_steps.unwrap_or(state.step))?;
        start_step = state.step;
        skipped_nonfinite = state.skipped_nonfinite;
        if let (Some(s), Some(saved)) = (precision.scaler.as_mut(), &state.loss_scaler) {
            (s.scale, s.good_steps) = (saved.scale, saved.good_steps);
        }
    }
    let mut overflow_skips = resume_state
        .as_ref()
        .and_then(|(s, _)| s.loss_scaler.as_ref())
        .map_or(0, |s| s.overflow_skips);
    // Rank 0 logs for the job (its statistics are the whole step's); the other ranks stay silent.
    let mut metrics = if comm.is_root() {
        Some(MetricsLog::open(
            &cfg.output.join("metrics.jsonl"),
            resume_state.as_ref().map(|s| s.0.step),
        )?)
    } else {
        None
    };
    let mut log = |v: &Value| -> Result<(), TrainError> {
        match metrics.as_mut() {
            Some(m) => Ok(m.write(v)?),
            None => Ok(()),
        }
    };
    let var_list: Vec<candle_core::Var> = precision.compute_vars();
    let pad_id = loaded.tokenizer.pad_id;
    let progress = comm
        .is_root()
        .then(|| Progress::new(total_steps, start_step, cfg.log_every));
    let say = |msg: &str| {
        if let Some(p) = &progress {
            p.message(msg)
        }
    };
    let ranks = if comm.is_parallel() {
        format!(" over {} ranks", comm.size())
    } else {
        String::new()
    };
    say(&format!(
        "rrhf train: {n} records ({} skipped, {} queries and {} responses truncated), {total_steps} steps of {per_step} queries{ranks}, warm-up {warmup}, {} parameters, {} layout",
        data.skipped,
        data.truncated_queries,
        data.truncated_responses,
        vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
        cfg.optim.layout
    ));

    let mut order: Vec<usize> = Vec::new();
    let mut order_epoch = u64::MAX;
    let mut last_loss = f64::NAN;
    let (mut tokens_done, mut time_spent) = (0usize, 0f64);
    // The newest checkpoint whose weights are known good (named when a step has to stop the run).
    let mut last_checkpoint: Option<PathBuf> = cfg.resume.clone();
    let mut final_checkpoint: Option<PathBuf> = None;
    for step in start_step..total_steps {
        let t0 = Instant::now();
        let epoch = step / steps_per_epoch;
        if epoch != order_epoch {
            order = (0..n).collect();
            Rng::new(epoch_seed(cfg.seed, epoch)).shuffle(&mut order);
            order_epoch = epoch;
        }
        let offset = ((step % steps_per_epoch) as usize) * per_step;
        let picked_idx = &order[offset..(offset + per_step).min(n)];
        let picked: Vec<&TokenizedRecord> = picked_idx.iter().map(|&i| &data.records[i]).collect();
        let lr = lr_at(cfg.optim.schedule, cfg.optim.lr, step, warmup, total_steps);
        let done = step + 1;
        fault_rank_at(comm, done);
        comm.take_traffic();
        let (stats, nonfinite, grad_norm, overflow) = match optimizer_step(
            &model,
            &picked,
            cfg,
            &loss_cfg,
            pad_id,
            &device,
            (&var_list, &mut optimizer),
            lr,
            fault_nan_at(done),
            Some(&mut precision),
        )? {
            StepOutcome::Updated { stats, grad_norm } => (stats, None, grad_norm, false),
            // Which records to blame: the micro-batch whose loss was not finite, or every one of the step.
            StepOutcome::NonFinite {
                what,
                value,
                blamed,
            } => (
                StepStats::default(),
                Some((what, value, &picked_idx[blamed])),
                f64::NAN,
                false,
            ),
            StepOutcome::Overflow => (StepStats::default(), None, f64::NAN, true),
        };
        if let Some((what, value, blamed)) = nonfinite {
            let origins: Vec<String> = blamed.iter().map(|&i| data.origin(i)).collect();
            if skipped_nonfinite >= cfg.optim.skip_nonfinite {
                log(&json!({
                    "step": done,
                    "nonfinite": what,
                    "records": origins,
                    "stopped": true,
                }))?;
                return Err(nonfinite_error(
                    cfg,
                    done,
                    what,
                    value,
                    &origins,
                    last_checkpoint.as_deref(),
                    skipped_nonfinite,
                ));
            }
            skipped_nonfinite += 1;
            log(&json!({
                "step": done,
                "epoch": done as f64 / steps_per_epoch as f64,
                "skipped_nonfinite": skipped_nonfinite,
                "nonfinite": what,
                "records": origins,
                "lr": lr,
            }))?;
            say(&format!(
                "step {done}: {what} is {value}; step skipped, no update ({skipped_nonfinite} of at most {} skipped; records {})",
                cfg.optim.skip_nonfinite,
                origins.join(", ")
            ));
        } else if overflow {
            overflow_skips += 1;
            let scale = precision.loss_scale();
            log(&json!({
                "step": done,
                "epoch": done as f64 / steps_per_epoch as f64,
                "overflow": true,
                "loss_scale": scale,
                "overflow_skips": overflow_skips,
                "lr": lr,
            }))?;
            say(&format!(
                "step {done}: f16 gradients overflowed; step skipped, loss scale now {scale}"
            ));
        } else {
            let secs = t0.elapsed().as_secs_f64();
            tokens_done += stats.tokens;
            time_spent += secs;
            last_loss = stats.mean(stats.loss);
            let mut line = json!({
                "step": done,
                "epoch": done as f64 / steps_per_epoch as f64,
                "loss": last_loss,
                "rank_loss": stats.mean(stats.rank_loss),
                "sft_loss": stats.mean(stats.sft_loss),
                "rank_acc": stats.rank_acc(),
                "p_best": stats.mean(stats.p_best),
                "p_worst": stats.mean(stats.p_worst),
                "lr": lr,
                "grad_norm": grad_norm,
                "skipped_nonfinite": skipped_nonfinite,
                "tokens": stats.tokens,
                "tokens_per_s": stats.tokens as f64 / secs,
                "step_s": secs,
            });
            if let Some(s) = &precision.scaler {
                line["loss_scale"] = json!(s.scale);
                line["overflow_skips"] = json!(overflow_skips);
            }
            if comm.is_parallel() {
                // This rank's time in collectives (waiting for slower ranks included) and the payload it
                // all-reduced: gradients plus the step's statistics.
                let t = comm.take_traffic();
                line["comm_s"] = json!(t.secs);
                line["comm_bytes"] = json!(t.bytes);
                line["world_size"] = json!(comm.size());
            }
            log(&line)?;
            if let Some(p) = &progress {
                p.step(done, last_loss, stats.tokens as f64 / secs);
            }
        }
        let is_last = done == total_steps;
        if let Some(ev) = &eval {
            if is_last || cfg.eval_every.is_some_and(|k| k > 0 && done % k == 0) {
                let refs: Vec<&TokenizedRecord> = ev.records.iter().collect();
                let s = run_queries(
                    &model, &refs, comm, cfg, &loss_cfg, pad_id, &device, None, false, 1.0,
                )?;
                log(&json!({
                    "step": done,
                    "eval_loss": s.mean(s.loss),
                    "eval_rank_loss": s.mean(s.rank_loss),
                    "eval_sft_loss": s.mean(s.sft_loss),
                    "eval_rank_acc": s.rank_acc(),
                    "eval_queries": s.queries,
                }))?;
                say(&format!(
                    "eval at step {done}: loss {:.4}, rank acc {}",
                    s.mean(s.loss),
                    s.rank_acc().map_or("-".into(), |a| format!("{a:.3}"))
                ));
            }
        }
        let save = is_last || cfg.save_every.is_some_and(|k| k > 0 && done % k == 0);
        // Sharded state comes together on rank 0 first (a collective: every rank takes part).
        let mut gathered = match save && optimizer.is_sharded() {
            true => {
                let state_of = |i| {
                    optimizer
                        .param_state(i)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))
                };
                let (params, shards) = (optimizer.params(), optimizer.shards());
                Some(dist::zero::gather_state(comm, params, shards, state_of)?)
            }
            false => None,
        };
        if save && comm.is_root() {
            let masters = precision.master_weights(model.weights());
            check_finite_weights(&masters)?;
            let state = TrainerState {
                step: done,
                total_steps,
                epoch: done / steps_per_epoch,
                epoch_offset: (done % steps_per_epoch) * per_step as u64,
                seed: cfg.seed,
                n_records: n as u64,
                rrhf_version: env!("CARGO_PKG_VERSION").into(),
                skipped_nonfinite,
                optimizer_steps: Some(optimizer.steps()),
                run: Some(run.clone()),
                loss_scaler: precision.scaler.map(|s| LossScalerState {
                    scale: s.scale,
                    good_steps: s.good_steps,
                    overflow_skips,
                }),
            };
            let dir = save_checkpoint(
                &cfg.output,
                &CheckpointParts {
                    weights: &masters,
                    tokenizer: &loaded.tokenizer,
                    side: &loaded.side,
                    optimizer: match gathered.take() {
                        Some(state) => state,
                        None => optimizer.state_tensors()?,
                    },
                    state: &state,
                    args_json,
                    save_dtype: None,
                },
                cfg.save_total_limit,
            )?;
            if is_last {
                final_checkpoint = Some(dir.clone());
            }
            last_checkpoint = Some(dir);
        }
    }
    // The final model, in Hugging Face layout, at the top of the output directory. When the last checkpoint holds
    // exactly these files (the f32 masters), they are linked rather than written a second time.
    let save_dtype = cfg
        .save_dtype
        .map(DTypeSpec::dtype)
        .or_else(|| stored_dtype(&cfg.model.model))
        .unwrap_or(dtype);
    match final_checkpoint {
        _ if !comm.is_root() => {}
        Some(ck) if save_dtype == candle_core::DType::F32 => link_pretrained(&ck, &cfg.output)?,
        _ => {
            let masters = precision.master_weights(model.weights());
            check_finite_weights(&masters)?;
            save_pretrained(
                &cfg.output,
                &masters,
                &loaded.tokenizer,
                &loaded.side,
                Some(save_dtype),
            )?
        }
    }
    if comm.is_root() {
        plot_metrics(&cfg.output)?;
    }
    // Every rank returns once rank 0 has saved: a failure there ends the job rather than passing unnoticed.
    comm.barrier("the final save on rank 0");
    Ok(TrainSummary {
        steps: total_steps,
        final_loss: last_loss,
        tokens_per_s: if time_spent > 0.0 {
            tokens_done as f64 / time_spent
        } else {
            0.0
        },
        skipped_records: data.skipped,
        truncated_queries: data.truncated_queries,
        truncated_responses: data.truncated_responses,
        skipped_nonfinite,
    })
}

/// What [`TrainError::NonFinite`] names when the loss itself is not finite.
pub(crate) const LOSS: &str = "the loss";

/// The error that stops a run at a non-finite step, saying which records and what to do next.
pub(crate) fn nonfinite_error(
    cfg: &TrainConfig,
    step: u64,
    what: &'static str,
    value: f64,
    origins: &[String],
    last_checkpoint: Option<&Path>,
    skipped: u64,
) -> TrainError {
    const SHOWN: usize = 16;
    let mut records = origins
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if origins.len() > SHOWN {
        records += &format!(" and {} more", origins.len() - SHOWN);
    }
    let resume = match last_checkpoint {
        Some(ck) => format!(
            "The last good checkpoint is {}; continue from it with --resume once the cause is fixed",
            ck.display()
        ),
        None => "No checkpoint was written before it (--save-every N writes some)".into(),
    };
    let skip = if cfg.optim.skip_nonfinite > 0 {
        format!(
            ", or allow more than the {skipped} skipped steps --skip-nonfinite {} allows",
            cfg.optim.skip_nonfinite
        )
    } else {
        ", or pass --skip-nonfinite N to skip up to N such steps".into()
    };
    TrainError::NonFinite {
        step,
        what,
        scope: if what == LOSS {
            "records of the micro-batch"
        } else {
            "records of the step"
        },
        value,
        records,
        next: format!("{resume}{skip}."),
    }
}

/// Draws `loss.png` from `metrics.jsonl` (the paper's Figure 3: the loss terms against the step).
pub fn plot_metrics(output: &std::path::Path) -> Result<(), TrainError> {
    let lines = read_metrics(&output.join("metrics.jsonl"))?;
    let series = |key: &str| -> Series {
        let pts = lines
            .iter()
            .filter_map(|v| Some((v.get("step")?.as_f64()?, v.get(key)?.as_f64()?)))
            .collect();
        Series::new(key, pts)
    };
    plot_curves(
        &output.join("loss.png"),
        "rrhf train",
        &[
            (
                "loss",
                vec![
                    series("loss"),
                    series("rank_loss"),
                    series("sft_loss"),
                    series("eval_loss"),
                ],
            ),
            (
                "ranking accuracy",
                vec![series("rank_acc"), series("eval_rank_acc")],
            ),
        ],
    )?;
    Ok(())
}
