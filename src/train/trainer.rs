//! The training loop: micro-batches of queries, gradient accumulation, clipping, AdamW with warm-up and decay,
//! evaluation, checkpoints and exact resume.
//!
//! Determinism: the data order of epoch e is a shuffle seeded by (seed, e), and step s covers a fixed slice of it,
//! so a run resumed from a checkpoint replays exactly the steps the uninterrupted run would have taken.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;
use serde_json::{json, Value};

use crate::data::args::RecordArgs;
use crate::data::batch::{build_batch, Layout};
use crate::data::readers::read_records;
use crate::data::tokenize::{tokenize_record, TokenizedRecord};
use crate::data::DataError;
use crate::device::DTypeSpec;
use crate::fsutil::write_atomic;
use crate::model::load::{LoadedModel, ModelArgs};
use crate::model::save::save_pretrained;
use crate::model::{load_model, CausalLm, ModelError};
use crate::rng::Rng;

use super::checkpoint::{load_checkpoint_state, save_checkpoint, CheckpointParts, TrainerState};
use super::log::{read_metrics, MetricsLog, Progress};
use super::loss::{rrhf_loss, LossConfig, SftReduction};
use super::optim::{clip_grad_norm, AdamW, AdamWConfig};
use super::plot::{plot_curves, Series};
use super::schedule::{lr_at, warmup_steps, ScheduleKind};

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
    /// Weight of the ranking loss (the paper: 1).
    #[arg(long, default_value_t = 1.0)]
    pub rank_weight: f64,
    /// Exponent of the response length in p_i.
    #[arg(long, default_value_t = 1.0)]
    pub length_penalty: f64,
    /// Margin λ per rank position in the ranking loss (0: the paper's loss).
    #[arg(long, default_value_t = 0.0)]
    pub margin: f64,
    /// Reduction of the SFT term over the best response's tokens: mean or sum (Eq. 4 literally).
    #[arg(long, default_value = "mean")]
    pub sft_reduction: SftReduction,
    /// Queries per micro-batch (all their responses go in one forward).
    #[arg(long, default_value_t = 4)]
    pub batch_queries: usize,
    /// Micro-batches per optimizer step (queries per step = batch_queries × grad_accum; the paper: 64).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    pub beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f64,
    /// Decoupled weight decay (not applied to biases and norms).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Fraction of the steps spent warming the learning rate up from 0.
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    /// Decay after warm-up: linear (the paper), cosine (the original scripts) or constant.
    #[arg(long, default_value = "linear")]
    pub schedule: ScheduleKind,
    /// Clip the global gradient norm to this (≤ 0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
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
    /// dtype of the final saved model (default: the training dtype); checkpoints keep the training dtype.
    #[arg(long)]
    pub save_dtype: Option<DTypeSpec>,
    /// Continue from OUTPUT/checkpoint-N (same data and flags): the loss sequence equals an uninterrupted run.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// packed: one row per query shared by its responses (faster); padded: one row per response.
    #[arg(long, default_value = "packed")]
    pub layout: Layout,
    /// Print a plain progress line every N steps when stderr is not a terminal.
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
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
}

/// Seed of epoch `e`'s shuffle.
fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    seed ^ epoch.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Records and tokenisation statistics of one input file.
pub struct Prepared {
    pub records: Vec<TokenizedRecord>,
    pub skipped: usize,
    pub truncated_queries: usize,
    pub truncated_responses: usize,
}

/// Reads and tokenises a file of scored records.
pub fn prepare(
    path: &std::path::Path,
    args: &RecordArgs,
    m: &LoadedModel,
) -> Result<Prepared, TrainError> {
    let opts = args.tokenize_options().map_err(TrainError::Config)?;
    let read = read_records(path, &args.read_options(true))?;
    let mut records = Vec::with_capacity(read.records.len());
    for r in &read.records {
        records.push(tokenize_record(&m.tokenizer, r, &opts)?);
    }
    Ok(Prepared {
        truncated_queries: records.iter().filter(|r| r.query_truncated).count(),
        truncated_responses: records.iter().map(|r| r.responses_truncated).sum(),
        skipped: read.skipped.len(),
        records,
    })
}

/// Loss terms of a set of queries, averaged, plus the tokens processed.
#[derive(Debug, Default, Clone, Copy)]
struct StepStats {
    loss: f64,
    rank_loss: f64,
    sft_loss: f64,
    rank_acc_sum: f64,
    rank_acc_n: usize,
    p_best: f64,
    p_worst: f64,
    queries: usize,
    tokens: usize,
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

    fn mean(&self, x: f64) -> f64 {
        x / self.queries.max(1) as f64
    }

    fn rank_acc(&self) -> Option<f64> {
        (self.rank_acc_n > 0).then(|| self.rank_acc_sum / self.rank_acc_n as f64)
    }
}

/// The loss of `records` under `model` (micro-batches of `batch_queries`), with gradients accumulated into
/// `grads` when given (each micro-batch weighted by its share of the queries, so the result is the gradient of the
/// mean over all queries).
fn run_queries(
    model: &CausalLm,
    records: &[&TokenizedRecord],
    cfg: &TrainConfig,
    loss_cfg: &LossConfig,
    pad_id: u32,
    device: &Device,
    mut grads: Option<(&[candle_core::Var], &mut Vec<Option<Tensor>>)>,
) -> Result<StepStats, TrainError> {
    let mut stats = StepStats::default();
    let total = records.len();
    for chunk in records.chunks(cfg.batch_queries.max(1)) {
        let batch = build_batch(chunk, cfg.layout, pad_id, device)?;
        let scores: Vec<Vec<f64>> = chunk.iter().map(|r| r.scores.clone()).collect();
        let lp = model.label_logprobs(&batch.input, &batch.labels)?;
        let out = rrhf_loss(
            &lp,
            &batch.response_of_label,
            &batch.n_tokens,
            &scores,
            loss_cfg,
        )?;
        let loss_value = out.loss.to_scalar::<f32>()? as f64;
        if let Some((vars, acc)) = grads.as_mut() {
            let weight = chunk.len() as f64 / total as f64;
            let store = (&out.loss * weight)?.backward()?;
            for (slot, var) in acc.iter_mut().zip(vars.iter()) {
                if let Some(g) = store.get(var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        stats.add(&out, loss_value, batch.tokens);
    }
    Ok(stats)
}

/// Runs `rrhf train`.
pub fn train(cfg: &TrainConfig, args_json: &Value) -> Result<TrainSummary, TrainError> {
    if cfg.batch_queries == 0 || cfg.grad_accum == 0 {
        return Err(TrainError::Config(
            "--batch-queries and --grad-accum must be at least 1".into(),
        ));
    }
    let device = cfg.model.device.open()?;
    let dtype = cfg.model.dtype.dtype();
    // Length limits are checked before anything is loaded.
    cfg.records.tokenize_options().map_err(TrainError::Config)?;
    let resume_state = match &cfg.resume {
        Some(dir) => Some(load_checkpoint_state(dir)?),
        None => None,
    };
    // A resumed run continues from the checkpoint's weights (same architecture, tokenizer and side files).
    let model_path = cfg.resume.as_ref().unwrap_or(&cfg.model.model);
    let loaded = load_model(model_path, &device, dtype)?;
    let data = prepare(&cfg.data, &cfg.records, &loaded)?;
    let eval = match &cfg.eval_data {
        Some(p) => Some(prepare(p, &cfg.records, &loaded)?),
        None => None,
    };
    let n = data.records.len();
    let per_step = cfg.batch_queries * cfg.grad_accum;
    let steps_per_epoch = n.div_ceil(per_step) as u64;
    let total_steps = cfg.max_steps.unwrap_or(steps_per_epoch * cfg.epochs);
    if total_steps == 0 {
        return Err(TrainError::Config(
            "nothing to do: 0 training steps (check --epochs / --max-steps)".into(),
        ));
    }
    let warmup = warmup_steps(cfg.warmup_ratio, total_steps);
    let loss_cfg = LossConfig {
        rank_weight: cfg.rank_weight,
        length_penalty: cfg.length_penalty,
        margin: cfg.margin,
        sft_reduction: cfg.sft_reduction,
    };
    std::fs::create_dir_all(&cfg.output).map_err(|e| ModelError::io(&cfg.output, e))?;
    let args_text =
        serde_json::to_string_pretty(args_json).map_err(|e| TrainError::Config(e.to_string()))?;
    write_atomic(&cfg.output.join("args.json"), args_text.as_bytes())?;

    let (model, vars) = loaded.model.trainable()?;
    let mut optimizer = AdamW::new(
        vars.clone(),
        AdamWConfig {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
        },
    )?;
    let mut start_step = 0;
    if let Some((state, opt)) = &resume_state {
        if state.n_records != n as u64 || state.seed != cfg.seed || state.total_steps != total_steps
        {
            return Err(TrainError::Config(format!(
                "--resume: the checkpoint was written by a run with {} records, seed {} and {} steps; this run has {n}, {} and {total_steps}: pass the same data and flags",
                state.n_records, state.seed, state.total_steps, cfg.seed
            )));
        }
        optimizer.load_state(opt, state.step)?;
        start_step = state.step;
    }
    let mut metrics = MetricsLog::open(
        &cfg.output.join("metrics.jsonl"),
        resume_state.as_ref().map(|s| s.0.step),
    )?;
    let var_list: Vec<candle_core::Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let pad_id = loaded.tokenizer.pad_id;
    let progress = Progress::new(total_steps, start_step, cfg.log_every);
    progress.message(&format!(
        "rrhf train: {n} records ({} skipped, {} queries and {} responses truncated), {total_steps} steps of {per_step} queries, warm-up {warmup}, {} parameters, {} layout",
        data.skipped,
        data.truncated_queries,
        data.truncated_responses,
        vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
        cfg.layout
    ));

    let mut order: Vec<usize> = Vec::new();
    let mut order_epoch = u64::MAX;
    let mut last_loss = f64::NAN;
    let (mut tokens_done, mut time_spent) = (0usize, 0f64);
    for step in start_step..total_steps {
        let t0 = Instant::now();
        let epoch = step / steps_per_epoch;
        if epoch != order_epoch {
            order = (0..n).collect();
            Rng::new(epoch_seed(cfg.seed, epoch)).shuffle(&mut order);
            order_epoch = epoch;
        }
        let offset = ((step % steps_per_epoch) as usize) * per_step;
        let picked: Vec<&TokenizedRecord> = order[offset..(offset + per_step).min(n)]
            .iter()
            .map(|&i| &data.records[i])
            .collect();
        let lr = lr_at(cfg.schedule, cfg.lr, step, warmup, total_steps);
        let mut acc: Vec<Option<Tensor>> = vec![None; var_list.len()];
        let stats = run_queries(
            &model,
            &picked,
            cfg,
            &loss_cfg,
            pad_id,
            &device,
            Some((&var_list, &mut acc)),
        )?;
        let mut grads: Vec<Tensor> = Vec::with_capacity(acc.len());
        for (v, g) in var_list.iter().zip(acc) {
            grads.push(match g {
                Some(g) => g,
                // A parameter outside the graph of this step's loss gets a zero gradient (AdamW still decays it).
                None => Tensor::zeros(v.shape(), v.dtype(), v.device())?,
            });
        }
        let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
        optimizer.step(&grads, lr)?;
        let secs = t0.elapsed().as_secs_f64();
        tokens_done += stats.tokens;
        time_spent += secs;
        last_loss = stats.mean(stats.loss);
        let done = step + 1;
        metrics.write(&json!({
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
            "tokens": stats.tokens,
            "tokens_per_s": stats.tokens as f64 / secs,
            "step_s": secs,
        }))?;
        progress.step(done, last_loss, stats.tokens as f64 / secs);
        let is_last = done == total_steps;
        if let Some(ev) = &eval {
            if is_last || cfg.eval_every.is_some_and(|k| k > 0 && done % k == 0) {
                let refs: Vec<&TokenizedRecord> = ev.records.iter().collect();
                let s = run_queries(&model, &refs, cfg, &loss_cfg, pad_id, &device, None)?;
                metrics.write(&json!({
                    "step": done,
                    "eval_loss": s.mean(s.loss),
                    "eval_rank_loss": s.mean(s.rank_loss),
                    "eval_sft_loss": s.mean(s.sft_loss),
                    "eval_rank_acc": s.rank_acc(),
                    "eval_queries": s.queries,
                }))?;
                progress.message(&format!(
                    "eval at step {done}: loss {:.4}, rank acc {}",
                    s.mean(s.loss),
                    s.rank_acc().map_or("-".into(), |a| format!("{a:.3}"))
                ));
            }
        }
        if is_last || cfg.save_every.is_some_and(|k| k > 0 && done % k == 0) {
            let state = TrainerState {
                step: done,
                total_steps,
                epoch: done / steps_per_epoch,
                epoch_offset: (done % steps_per_epoch) * per_step as u64,
                seed: cfg.seed,
                n_records: n as u64,
                rrhf_version: env!("CARGO_PKG_VERSION").into(),
            };
            save_checkpoint(
                &cfg.output,
                &CheckpointParts {
                    weights: model.weights(),
                    tokenizer: &loaded.tokenizer,
                    side: &loaded.side,
                    optimizer: optimizer.state_tensors()?,
                    state: &state,
                    args_json,
                    save_dtype: None,
                },
                cfg.save_total_limit,
            )?;
        }
    }
    // The final model, in Hugging Face layout, at the top of the output directory.
    save_pretrained(
        &cfg.output,
        model.weights(),
        &loaded.tokenizer,
        &loaded.side,
        cfg.save_dtype.map(DTypeSpec::dtype).or(Some(dtype)),
    )?;
    plot_metrics(&cfg.output)?;
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
    })
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
