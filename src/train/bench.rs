//! `rrhf bench train`: one RRHF optimizer step (forward, backward, AdamW) on the benchmark LLaMA with k = 4
//! responses per query, in the packed and the padded layout.

use std::time::Instant;

use candle_core::{DType, Device};

use crate::bench::{BenchRow, ForwardBench};
use crate::data::batch::{build_batch, Layout};
use crate::data::tokenize::TokenizedRecord;
use crate::model::init::random_weights;
use crate::model::{CausalLm, ModelError};
use crate::rng::Rng;

use super::loss::{rrhf_loss, LossConfig};
use super::optim::{clip_grad_norm, AdamW, AdamWConfig};

/// Shape of the training benchmark.
#[derive(Debug, Clone)]
pub struct TrainBench {
    pub model: ForwardBench,
    pub queries: usize,
    pub k: usize,
    pub query_len: usize,
    pub response_len: usize,
    pub iters: usize,
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
        }
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
        let cfg = self.model.config()?;
        let base = CausalLm::new(
            cfg.clone(),
            random_weights(&cfg, 0.02, 0, DType::F32, device)?,
        )?;
        let records = self.records();
        let refs: Vec<&TokenizedRecord> = records.iter().collect();
        let scores: Vec<Vec<f64>> = records.iter().map(|r| r.scores.clone()).collect();
        let response_tokens = (self.queries * self.k * self.response_len) as f64;
        let mut rows = Vec::new();
        for layout in [Layout::Packed, Layout::Padded] {
            let (model, vars) = base.trainable()?;
            let mut opt = AdamW::new(vars, AdamWConfig::default())?;
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
                let mut grads = opt.collect_grads(&store)?;
                clip_grad_norm(&mut grads, 1.0)?;
                opt.step(&grads, 1e-5)
            };
            step()?;
            let mut ts = Vec::new();
            for _ in 0..self.iters.max(1) {
                let t0 = Instant::now();
                step()?;
                device.synchronize()?;
                ts.push(t0.elapsed().as_secs_f64());
            }
            ts.sort_by(f64::total_cmp);
            let s = ts[ts.len() / 2];
            rows.push(BenchRow {
                what: format!("{layout} ({} tokens)", batch.tokens),
                seconds: s,
                tokens_per_s: response_tokens / s,
            });
        }
        Ok(rows)
    }
}
