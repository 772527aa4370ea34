//! The training flag groups shared by `rrhf train` and `rrhf iterate` (one definition, so both commands take the
//! same flags with the same defaults).

use serde::Serialize;

use crate::data::batch::Layout;

use super::loss::{LossConfig, SftReduction};
use super::optim::AdamWConfig;
use super::schedule::ScheduleKind;

/// The terms of the RRHF loss.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct LossArgs {
    /// Weight of the ranking loss (the paper: 1).
    #[arg(long, default_value_t = 1.0)]
    pub rank_weight: f64,
    /// Exponent of the response length in p_i (of the loss; `rrhf iterate`: also of policy: rewards and of --pairs
    /// accuracy).
    #[arg(long, default_value_t = 1.0)]
    pub length_penalty: f64,
    /// Margin λ per rank position in the ranking loss (0: the paper's loss).
    #[arg(long, default_value_t = 0.0)]
    pub margin: f64,
    /// Reduction of the SFT term over the best response's tokens: mean or sum (Eq. 4 literally).
    #[arg(long, default_value = "mean")]
    pub sft_reduction: SftReduction,
}

/// How an optimizer step is computed (batches, precision, memory) and taken (AdamW, schedule, clipping).
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct OptimArgs {
    /// Queries per micro-batch (all their responses go in one forward).
    #[arg(long, default_value_t = 4)]
    pub batch_queries: usize,
    /// Micro-batches per optimizer step (queries per step = batch_queries × grad_accum; the paper: 64).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f64,
    /// AdamW β1.
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    /// AdamW β2.
    #[arg(long, default_value_t = 0.999)]
    pub beta2: f64,
    /// AdamW ε.
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
    /// Skip up to N optimizer steps whose loss or gradient norm is NaN or infinite (no update; counted in
    /// metrics.jsonl as `skipped_nonfinite`). 0: stop at the first one.
    #[arg(long, default_value_t = 0)]
    pub skip_nonfinite: u64,
    /// packed: one row per query shared by its responses (faster); padded: one row per response.
    #[arg(long, default_value = "packed")]
    pub layout: Layout,
    /// Keep only each decoder block's input in the forward and recompute the block in backward: one block's
    /// activations alive at a time instead of all of them (about a third more compute; same gradients).
    #[arg(long)]
    pub grad_checkpoint: bool,
    /// `--dtype f16`: initial loss scale (dynamic: halved on overflow, doubled after --loss-scale-window good
    /// steps).
    #[arg(long, default_value_t = 65536.0)]
    pub loss_scale: f64,
    /// `--dtype f16`: good steps in a row after which the loss scale doubles.
    #[arg(long, default_value_t = 2000)]
    pub loss_scale_window: u64,
}

impl LossArgs {
    /// The loss these flags describe.
    pub fn config(&self) -> LossConfig {
        LossConfig {
            rank_weight: self.rank_weight,
            length_penalty: self.length_penalty,
            margin: self.margin,
            sft_reduction: self.sft_reduction,
        }
    }
}

impl OptimArgs {
    /// The AdamW hyper-parameters of these flags.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.adam_eps,
            weight_decay: self.weight_decay,
        }
    }
}
