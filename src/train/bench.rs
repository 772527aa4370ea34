//! `rrhf bench train`: one RRHF optimizer step (forward, backward, AdamW) on the benchmark LLaMA with k = 4
//! responses per query, in the packed and the padded layout.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};

use crate::data::batch::{build_batch, Layout};
use crate::data::tokenize::TokenizedRecord;
use crate::model::bench::{BenchRow, ForwardBench};
use crate::model::init::random_weights;
use crate::model::recompute::grads_by_recompute;
use crate::model::{CausalLm, ModelError};
use crate::rng::Rng;

use super::loss::{rrhf_loss, LossConfig};
use super::optim::{clip_grad_norm, AdamW, AdamWConfig};
use super::precision::Precision;

/// Shape of the training benchmark.
#[derive(Debug, Clone)]
pub struct TrainBench {
    pub model: ForwardBench,
    pub queries: usize,
    pub k: usize,
    pub query_len: usize,
    pub response_len: usize,
    pub iters: usize,
    /// Compute dtype: bf16/f16 train as `rrhf train --dtype` does (f32 masters, see `super::precision`).
    pub dtype: DType,
    /// Layouts timed, one row each.
    pub layouts: Vec<Layout>,
}

impl Default for TrainBench {
    fn default() -> Self {
        Self {
            model: ForwardBench::default(),
            queries: 2,
            k: 4,
            query_len: 128,
            response_len: 64,
            iters: 3,
            dtype: DType::F32,
            layouts: vec![Layout::Packed, Layout::Padded],
        }
    }
}

/// One layout's measurement of [`TrainBench::run_report`].
#[derive(Debug, Clone)]
pub struct TrainBenchResult {
    pub layout: Layout,
    /// Median seconds per optimizer step.
    pub step_s: f64,
    /// Tokens in the rows (padding included) and response tokens trained, per step.
    pub row_tokens: usize,
    pub response_tokens: usize,
    /// Parameters that multiply every token (all but the embedding lookup).
    pub compute_params: usize,
    /// (query, key) pairs the attention masks let through, over all rows.
    pub attention_pairs: u64,
    pub layers: usize,
    pub hidden: usize,
}

impl TrainBenchResult {
    /// Model FLOPs of one step: 6·N per row token (forward 2N, backward 4N) plus attention, 12·hidden per visible
    /// (query, key) pair and layer (QKᵀ and PV, 2·hidden each forward, ×3 with the backward).
    pub fn model_flops(&self) -> f64 {
        6.0 * self.compute_params as f64 * self.row_tokens as f64
            + 12.0 * self.layers as f64 * self.hidden as f64 * self.attention_pairs as f64
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "layout": self.layout.to_string(), "step_s": self.step_s, "row_tokens": self.row_tokens,
            "response_tokens": self.response_tokens,
            "row_tokens_per_s": self.row_tokens as f64 / self.step_s,
            "response_tokens_per_s": self.response_tokens as f64 / self.step_s,
            "compute_params": self.compute_params, "attention_pairs": self.attention_pairs,
            "model_flops_per_step": self.model_flops(),
            "model_tflops_per_s": self.model_flops() / self.step_s / 1e12,
        })
    }
}

impl TrainBench {
    /// Synthetic records: random ids, graded rewards.
    fn records(&self) -> Vec<TokenizedRecord> {
        let mut rng = Rng::new(5);
        let vocab = self.model.vocab as u64;
        let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.below(vocab) as u32).collect() };
        (0..self.queries)
            .map(|_| TokenizedRecord {
                query: ids(self.query_len),
                responses: (0..self.k).map(|_| ids(self.response_len)).collect(),
                scores: (0..self.k).map(|i| i as f64).collect(),
                query_truncated: false,
                responses_truncated: 0,
            })
            .collect()
    }

    /// Median seconds per optimizer step for each layout; tokens/s counts response tokens trained.
    pub fn run(&self, device: &Device) -> Result<Vec<BenchRow>, ModelError> {
        Ok(self
            .run_report(device)?
            .into_iter()
            .map(|r| BenchRow {
                what: format!("{} ({} tokens)", r.layout, r.row_tokens),
                seconds: r.step_s,
                tokens_per_s: r.response_tokens as f64 / r.step_s,
            })
            .collect())
    }

    /// The measurements behind [`TrainBench::run`], with what model FLOP/s need.
    pub fn run_report(&self, device: &Device) -> Result<Vec<TrainBenchResult>, ModelError> {
        if self.queries == 0 || self.k == 0 || self.query_len == 0 || self.response_len == 0 {
            return Err(ModelError::Input(
                "bench train: --queries, --k, --query-len and --response-len must be at least 1"
                    .into(),
            ));
        }
        let cfg = self.model.config()?;
        let base = CausalLm::new(
            cfg.clone(),
            random_weights(&cfg, 0.02, 0, DType::F32, device)?,
        )?;
        let records = self.records();
        let refs: Vec<&TokenizedRecord> = records.iter().collect();
        let scores: Vec<Vec<f64>> = records.iter().map(|r| r.scores.clone()).collect();
        let mut out = Vec::new();
        for &layout in &self.layouts {
            // As `rrhf train` does: the model computes in `dtype`, AdamW updates f32 masters.
            let (model, precision) = Precision::new(&base, self.dtype, None)?;
            let compute_params = precision
                .masters()
                .iter()
                .filter(|(name, _)| !name.contains("embed_tokens"))
                .map(|(_, v)| v.elem_count())
                .sum::<usize>();
            let vars = precision.compute_vars();
            let mut opt = AdamW::new(precision.masters().to_vec(), AdamWConfig::default())?;
            let batch = build_batch(&refs, layout, 0, device)?;
            let mut step = || -> Result<(), ModelError> {
                let lp = model.label_logprobs(&batch.input, &batch.labels)?;
                let out = rrhf_loss(
                    &lp,
                    &batch.response_of_label,
                    &batch.n_tokens,
                    &scores,
                    &LossConfig::default(),
                )?;
                let store = out.loss.backward()?;
                let grads = vars
                    .iter()
                    .map(|v| {
                        store.get(v.as_tensor()).cloned().ok_or_else(|| {
                            ModelError::Input("bench train: a parameter got no gradient".into())
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                drop(store);
                let mut grads = precision.master_grads(grads)?;
                clip_grad_norm(&mut grads, 1.0)?;
                opt.step(&grads, 1e-5)?;
                precision.sync()
            };
            step()?;
            device.synchronize()?;
            let mut ts = Vec::new();
            for _ in 0..self.iters.max(1) {
                let t0 = Instant::now();
                step()?;
                device.synchronize()?;
                ts.push(t0.elapsed().as_secs_f64());
            }
            ts.sort_by(f64::total_cmp);
            let (b, t) = batch.input.dims();
            let attention_pairs = batch
                .input
                .mask
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<u8>()?
                .iter()
                .map(|&m| u64::from(m != 0))
                .sum();
            out.push(TrainBenchResult {
                layout,
                step_s: ts[ts.len() / 2],
                row_tokens: b * t,
                response_tokens: batch.labels.len(),
                compute_params,
                attention_pairs,
                layers: self.model.layers,
                hidden: self.model.hidden,
            });
        }
        Ok(out)
    }
}

/// CPU time and memory of this process so far (`getrusage`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub user_s: f64,
    pub sys_s: f64,
    pub minor_faults: u64,
    /// Peak resident set size, bytes.
    pub max_rss: u64,
}

impl Usage {
    /// Now.
    pub fn now() -> Self {
        // SAFETY: getrusage fills the struct it is given.
        let r = unsafe {
            let mut r: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut r);
            r
        };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        Self {
            user_s: secs(r.ru_utime),
            sys_s: secs(r.ru_stime),
            minor_faults: r.ru_minflt as u64,
            max_rss: r.ru_maxrss as u64 * 1024,
        }
    }
}

/// `rrhf bench train --model DIR --data FILE`: RRHF optimizer steps on a real model and real records, tokenised
/// and packed as `rrhf train` does, one micro-batch of `batch_queries` queries per step.
#[derive(Debug, Clone)]
pub struct RealTrainBench {
    pub batch_queries: usize,
    /// Untimed steps first (allocator and caches warm up).
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    pub layout: Layout,
    /// Recompute each block in backward (`rrhf train --grad-checkpoint`).
    pub grad_checkpoint: bool,
}

/// What [`RealTrainBench::run`] measured.
#[derive(Debug, Clone)]
pub struct RealTrainReport {
    /// Parameters that cost 2 FLOPs per token forward (every matrix but the embedding lookup).
    pub compute_params: usize,
    pub steps: usize,
    /// Median seconds per step.
    pub step_s: f64,
    /// Row tokens (query + responses, as laid out) and response tokens per step, averaged.
    pub row_tokens: f64,
    pub response_tokens: f64,
    /// Per timed step.
    pub user_s: f64,
    pub sys_s: f64,
    pub minor_faults: f64,
    /// Peak resident set size of the process, bytes.
    pub max_rss: u64,
}

impl RealTrainReport {
    /// Achieved model FLOP/s: 6 · N · row tokens per second (forward 2N, backward 4N per token).
    pub fn gflops(&self) -> f64 {
        6.0 * self.compute_params as f64 * self.row_tokens / self.step_s / 1e9
    }

    /// The report as one JSON object (tools/bench_train.py reads it).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "engine": "rrhf", "steps": self.steps, "step_s": self.step_s, "row_tokens": self.row_tokens,
            "response_tokens": self.response_tokens, "response_tokens_per_s": self.response_tokens / self.step_s,
            "gflops": self.gflops(), "compute_params": self.compute_params, "user_s": self.user_s,
            "sys_s": self.sys_s, "minor_faults": self.minor_faults, "max_rss": self.max_rss,
        })
    }
}

impl RealTrainBench {
    /// Runs `warmup + steps` steps over `records` (cycled), timing the last `steps`. The loaded weights are
    /// dropped once the trainable copy exists, as `rrhf train` does.
    pub fn run(
        &self,
        model: CausalLm,
        records: &[TokenizedRecord],
        pad_id: u32,
        device: &Device,
    ) -> Result<RealTrainReport, ModelError> {
        if records.is_empty() || self.batch_queries == 0 {
            return Err(ModelError::Input(
                "bench train: no records, or --batch-queries 0".into(),
            ));
        }
        // Shadowing would keep the loaded weights alive to the end of the run: drop them here.
        let (model, vars) = {
            let base = model;
            base.trainable()?
        };
        let compute_params = vars
            .iter()
            .filter(|(name, _)| !name.contains("embed_tokens") && !name.contains("wte"))
            .map(|(_, v)| v.elem_count())
            .sum::<usize>()
            + if model.config().tie_word_embeddings() {
                model.lm_head().elem_count()
            } else {
                0
            };
        let var_list: Vec<candle_core::Var> = vars.iter().map(|(_, v)| v.clone()).collect();
        let mut opt = AdamW::new(vars, AdamWConfig::default())?;
        let mut times = Vec::new();
        let (mut row_tokens, mut response_tokens) = (0usize, 0usize);
        let mut start = Usage::default();
        for i in 0..self.warmup + self.steps {
            if i == self.warmup {
                start = Usage::now();
            }
            let chunk: Vec<&TokenizedRecord> = (0..self.batch_queries)
                .map(|j| &records[(i * self.batch_queries + j) % records.len()])
                .collect();
            let scores: Vec<Vec<f64>> = chunk.iter().map(|r| r.scores.clone()).collect();
            let t0 = Instant::now();
            let batch = build_batch(&chunk, self.layout, pad_id, device)?;
            let loss_of = |lp: &Tensor| -> Result<(Tensor, ()), ModelError> {
                let out = rrhf_loss(
                    lp,
                    &batch.response_of_label,
                    &batch.n_tokens,
                    &scores,
                    &LossConfig::default(),
                )?;
                Ok((out.loss, ()))
            };
            let mut grads = if self.grad_checkpoint {
                let (_, g) =
                    grads_by_recompute(&model, &batch.input, &batch.labels, &var_list, loss_of)?;
                g.into_iter()
                    .zip(&var_list)
                    .map(|(g, v)| g.map_or_else(|| v.zeros_like(), Ok))
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                let lp = model.label_logprobs(&batch.input, &batch.labels)?;
                let store = loss_of(&lp)?.0.backward()?;
                opt.collect_grads(&store)?
            };
            clip_grad_norm(&mut grads, 1.0)?;
            opt.step(&grads, 1e-5)?;
            device.synchronize()?;
            if i >= self.warmup {
                times.push(t0.elapsed().as_secs_f64());
                // Tokens computed, padding included (the same count as PyTorch's padded rows).
                let (b, t) = batch.input.dims();
                row_tokens += b * t;
                response_tokens += batch.labels.len();
            }
        }
        let end = Usage::now();
        let n = self.steps.max(1) as f64;
        times.sort_by(f64::total_cmp);
        Ok(RealTrainReport {
            compute_params,
            steps: self.steps,
            step_s: times.get(times.len() / 2).copied().unwrap_or(f64::NAN),
            row_tokens: row_tokens as f64 / n,
            response_tokens: response_tokens as f64 / n,
            user_s: (end.user_s - start.user_s) / n,
            sys_s: (end.sys_s - start.sys_s) / n,
            minor_faults: (end.minor_faults - start.minor_faults) as f64 / n,
            max_rss: end.max_rss,
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// `rrhf bench adamw`: the fused AdamW against candle_nn's (moved from optim.rs).

type NamedVars = Vec<(String, Var)>;

const BENCH_LR: f64 = 1e-4;
const BENCH_WD: f64 = 0.01;

/// ~100 random f32 CPU parameters (`layer{i}.weight`) with `n_params` elements in all, and their gradients.
fn bench_setup(n_params: usize) -> Result<(NamedVars, Vec<Tensor>), ModelError> {
    let dev = Device::Cpu;
    let n_tensors = 100.min(n_params.max(1));
    let per = n_params / n_tensors;
    let mut params = Vec::with_capacity(n_tensors);
    let mut grads = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let n = if i + 1 == n_tensors {
            n_params - per * (n_tensors - 1)
        } else {
            per
        };
        let var = Var::from_tensor(&Tensor::randn(0f32, 0.02, n, &dev)?)?;
        params.push((format!("layer{i}.weight"), var));
        grads.push(Tensor::randn(0f32, 1e-3, n, &dev)?);
    }
    Ok((params, grads))
}

/// Seconds per step of the fused AdamW, mean of `iters` steps after one warm-up step (which also touches the
/// freshly allocated moments); `threads` None = the default.
fn time_fused(
    params: &[(String, Var)],
    grads: &[Tensor],
    iters: usize,
    threads: Option<usize>,
) -> Result<f64, ModelError> {
    let iters = iters.max(1);
    let cfg = AdamWConfig {
        weight_decay: BENCH_WD,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(params.to_vec(), cfg)?;
    if let Some(t) = threads {
        opt.set_threads(t);
    }
    opt.step(grads, BENCH_LR)?;
    let t0 = std::time::Instant::now();
    for _ in 0..iters {
        opt.step(grads, BENCH_LR)?;
    }
    Ok(t0.elapsed().as_secs_f64() / iters as f64)
}

/// Times one optimizer step on `n_params` f32 parameters on CPU split into ~100 tensors (names `layer{i}.weight`,
/// weight decay 0.01, lr 1e-4): returns (seconds per step of this crate's fused AdamW, seconds per step of
/// `candle_nn::optim::AdamW`), each the mean of `iters` steps after one warm-up step.
pub fn bench_adamw(n_params: usize, iters: usize) -> Result<(f64, f64), ModelError> {
    use candle_nn::optim::Optimizer;

    let iters = iters.max(1);
    let dev = Device::Cpu;
    let (params, grads) = bench_setup(n_params)?;
    let fused = time_fused(&params, &grads, iters, None)?;

    // candle's AdamW takes a GradStore, which only backward() builds: d(Σ var·g)/d var = g.
    let mut loss = Tensor::zeros((), DType::F32, &dev)?;
    for ((_, var), g) in params.iter().zip(&grads) {
        loss = (loss + (var.as_tensor() * g)?.sum_all()?)?;
    }
    let store = loss.backward()?;
    drop(loss);
    let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
    let mut copt = candle_nn::optim::AdamW::new(
        vars,
        candle_nn::optim::ParamsAdamW {
            lr: BENCH_LR,
            weight_decay: BENCH_WD,
            ..Default::default()
        },
    )?;
    copt.step(&store)?;
    let t0 = std::time::Instant::now();
    for _ in 0..iters {
        copt.step(&store)?;
    }
    let candle = t0.elapsed().as_secs_f64() / iters as f64;
    Ok((fused, candle))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cargo test --release --lib train::bench::tests::bench_adamw_45m -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_adamw_45m() {
        let n: usize = std::env::var("RRHF_BENCH_ADAMW_PARAMS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(45_000_000);
        let (params, grads) = bench_setup(n).unwrap();
        for t in [1, 2] {
            let s = time_fused(&params, &grads, 3, Some(t)).unwrap();
            println!("fused AdamW {n} params, {t} thread(s): {s:.4} s/step");
        }
        drop((params, grads));
        let (fused, candle) = bench_adamw(n, 3).unwrap();
        println!(
            "AdamW {n} params: fused {fused:.4} s/step, candle_nn {candle:.4} s/step ({:.1}x)",
            candle / fused
        );
    }
}
