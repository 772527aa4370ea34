//! `rrhf iterate`: the paper's IP-n and OP-k sampling policies (§4.1, Table 1, §5).
//!
//! - **IP-n** ([`ip`]): n iterations of sample → score → train → eval, each with the model the previous iteration
//!   trained (ρ*), every stage a library call of the command of the same name, its outputs in `OUTPUT/iter-i/`.
//!   A state file per iteration records the finished stages, so a rerun continues where a run stopped.
//! - **OP-k** ([`op`]): one process holds the policy (its weights the optimizer's variables), the reward and (with
//!   `--kl-coef`) the reference; every k optimizer steps the next queries are sampled with the current weights,
//!   scored, and trained on.
//!
//! The flags are the sampling, reward, training and evaluation flags of `rrhf sample`, `score`, `train` and
//! `eval`, grouped ([`args`]) and mapped onto those commands' configs in one place each.
//!
//! May import: every stage (`sample`, `score`, `train`, `eval`) and everything below them.

pub mod args;
pub mod ip;
pub mod op;
pub mod report;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Serialize;

use crate::data::args::RecordArgs;
use crate::data::DataError;
use crate::model::load::ModelArgs;
use crate::model::ModelError;
use crate::score::{RewardSpec, ScoreError};
use crate::train::trainer::TrainError;

pub use crate::score::args::RewardArgs;
pub use args::{EvalArgs, SamplingArgs, TrainArgs};

/// Which of the paper's iterated settings to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IterSetting {
    /// IP-n: sample with ρ*, the model of the previous iteration; train; repeat n times.
    Ip,
    /// OP-k: sample with the training policy π every k optimizer steps.
    Op,
}

impl FromStr for IterSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "IP" => Ok(Self::Ip),
            "OP" => Ok(Self::Op),
            _ => Err(format!("unknown setting {s:?}: use IP or OP")),
        }
    }
}

impl fmt::Display for IterSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ip => "IP",
            Self::Op => "OP",
        })
    }
}

impl Serialize for IterSetting {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Flags of `rrhf iterate`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct IterateConfig {
    /// IP (iterate: sample → score → train → eval, --iterations times) or OP (online: re-sample every
    /// --resample-every optimizer steps with the current weights).
    #[arg(long)]
    pub setting: IterSetting,
    /// IP: number of iterations n (default 2, the paper's IP-2).
    #[arg(long)]
    pub iterations: Option<usize>,
    /// OP: optimizer steps between two samplings (the paper's k; it used 32).
    #[arg(long)]
    pub resample_every: Option<u64>,
    /// OP: β of the KL penalty R̃ = R − β·(log π(y|x) − log ρ(y|x)) against the initial model (the paper: 0.01).
    #[arg(long)]
    pub kl_coef: Option<f64>,
    /// Initial model (`--model`), `--device`, `--dtype` (of every model of the run).
    #[command(flatten)]
    #[serde(flatten)]
    pub model: ModelArgs,
    /// Prompts: any record file `rrhf sample` reads (RRHF, pairwise, hh, Alpaca; JSONL, .gz, Parquet).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Reward, as `rrhf score`: model:DIR | judge:URL | vader | policy:DIR.
    #[arg(long)]
    pub reward: RewardSpec,
    /// Output directory (IP: iter-0/ … iter-n/, report.md, report.json, report.png; OP: the trained model,
    /// checkpoints, rounds/, metrics.jsonl, op.png).
    #[arg(long)]
    pub output: PathBuf,
    /// Seed of sampling (iteration i / round r samples with seed + i / seed + r) and of the training data order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// How --prompts is read, and the length limits of training (--max-len, --max-query-len).
    #[command(flatten)]
    #[serde(flatten)]
    pub records: RecordArgs,
    #[command(flatten, next_help_heading = "Sampling (as rrhf sample)")]
    #[serde(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten, next_help_heading = "Reward (as rrhf score)")]
    #[serde(flatten)]
    pub reward_args: RewardArgs,
    #[command(flatten, next_help_heading = "Training (as rrhf train)")]
    #[serde(flatten)]
    pub train: TrainArgs,
    #[command(
        flatten,
        next_help_heading = "Evaluation of each iteration (IP; as rrhf eval)"
    )]
    #[serde(flatten)]
    pub eval: EvalArgs,
    /// OP: continue from OUTPUT/checkpoint-N (same flags), as `rrhf train --resume`. IP needs no flag: a rerun
    /// with the same flags continues where the previous run stopped.
    #[arg(long)]
    pub resume: Option<PathBuf>,
}

/// An error of `rrhf iterate`, with the iteration (IP) or round (OP) and stage it happened in.
#[derive(Debug, thiserror::Error)]
pub enum IterateError {
    /// A file that cannot be read or written.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A model that cannot be loaded, run or saved.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The reward could not be loaded, or failed while scoring.
    #[error("--reward {spec}: {cause}")]
    Reward {
        spec: String,
        cause: Box<ScoreError>,
    },
    /// A stage (`sample`, `score`, `train`, `eval`) of an iteration or round failed.
    #[error("{at}, {stage}: {cause}")]
    Stage {
        at: String,
        stage: &'static str,
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A plot could not be drawn or written.
    #[error(transparent)]
    Plot(#[from] crate::plot::PlotError),
    /// Training stopped (a non-finite loss or gradient, a refused output or resume).
    #[error(transparent)]
    Train(#[from] TrainError),
    /// Flags that do not fit together, or input that cannot be used.
    #[error("{0}")]
    Config(String),
    /// The test hook `RRHF_ITERATE_STOP_AFTER` stopped the run after a stage, as a kill would.
    #[error("stopped after {0} (RRHF_ITERATE_STOP_AFTER)")]
    StoppedByHook(String),
}

impl From<candle_core::Error> for IterateError {
    fn from(e: candle_core::Error) -> Self {
        IterateError::Model(ModelError::Candle(e))
    }
}

impl From<crate::fsutil::FsError> for IterateError {
    fn from(e: crate::fsutil::FsError) -> Self {
        IterateError::Model(e.into())
    }
}

/// Wraps a stage's error with where it happened.
fn stage_err<E: std::error::Error + Send + Sync + 'static>(
    at: impl Into<String>,
    stage: &'static str,
) -> impl FnOnce(E) -> IterateError {
    let at = at.into();
    move |e| IterateError::Stage {
        at,
        stage,
        cause: Box::new(e),
    }
}

/// Checks the flags common to both settings that need no file.
fn check_common(cfg: &IterateConfig) -> Result<(), IterateError> {
    if matches!(cfg.reward, RewardSpec::Labels) {
        return Err(IterateError::Config(
            "--reward labels keeps scores that are in the data; fresh samples have none: use model:DIR, judge:URL, \
             vader or policy:DIR"
                .into(),
        ));
    }
    if !cfg.model.model.exists() {
        return Err(IterateError::Config(format!(
            "--model {}: no such directory or file",
            cfg.model.model.display()
        )));
    }
    cfg.records
        .tokenize_options()
        .map_err(IterateError::Config)?;
    // --max-len against the model's positions, before any model work (GGUF files are checked when loaded).
    if let Some(config) = crate::train::trainer::config_of(&cfg.model.model) {
        crate::data::prepare::check_max_len(cfg.records.max_len, &config, &cfg.model.model)?;
    }
    Ok(())
}

/// `rrhf iterate` for the command line.
pub fn run_cli(cfg: &IterateConfig) -> Result<(), IterateError> {
    match cfg.setting {
        IterSetting::Ip => {
            let s = ip::run_ip(cfg)?;
            if !crate::dist::world().is_root() {
                return Ok(());
            }
            print!("{}", s.markdown);
            for (i, done) in &s.timings {
                let stages: Vec<String> = done
                    .iter()
                    .map(|d| format!("{} {:.2} s", d.stage, d.seconds))
                    .collect();
                eprintln!("iter-{i}: {}", stages.join(", "));
            }
            eprintln!(
                "IP-{}: {} stages run, {} already done; report.md, report.json and report.png in {}",
                s.timings.len() - 1,
                s.stages_run,
                s.stages_skipped,
                cfg.output.display()
            );
        }
        IterSetting::Op => {
            // OP samples inside its training loop, on one process.
            crate::dist::world()
                .require_single("iterate --setting OP")
                .map_err(|e| IterateError::Config(e.to_string()))?;
            let s = op::run_op(cfg)?;
            let kl = s
                .last_kl
                .map_or(String::new(), |k| format!(", mean KL {k:.4}"));
            eprintln!(
                "OP-{}: {} rounds, {} steps; last round mean reward {:.4}{kl}; metrics.jsonl, op.png and the model \
                 in {}",
                cfg.resample_every.unwrap_or(0),
                s.rounds,
                s.steps,
                s.last_reward,
                cfg.output.display()
            );
        }
    }
    Ok(())
}

/// Test hook: `RRHF_ITERATE_STOP_AFTER=LABEL` (e.g. `iter-1/score`, `round-2`) stops the run right after that
/// stage's completion marker is written, as a kill at that moment would.
fn stop_hook(label: &str) -> Result<(), IterateError> {
    match std::env::var("RRHF_ITERATE_STOP_AFTER") {
        Ok(v) if v == label => Err(IterateError::StoppedByHook(label.into())),
        _ => Ok(()),
    }
}
