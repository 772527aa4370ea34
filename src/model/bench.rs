//! Benchmarks printed as tables (`rrhf bench ...`): throughput of the model layer on a fixed LLaMA config, and
//! the table format every benchmark prints.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::model::config::ModelConfig;
use crate::model::init::random_weights;
use crate::model::{CausalLm, Input, Labels, ModelError};
use crate::rng::Rng;

/// The benchmark shape of the foundation issue.
#[derive(Debug, Clone)]
pub struct ForwardBench {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub iters: usize,
}

impl Default for ForwardBench {
    fn default() -> Self {
        Self {
            hidden: 512,
            layers: 8,
            heads: 8,
            kv_heads: 8,
            intermediate: 1376,
            vocab: 32000,
            batch: 4,
            seq_len: 256,
            iters: 3,
        }
    }
}

/// One row of a benchmark table.
#[derive(Debug, Clone)]
pub struct BenchRow {
    pub what: String,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

impl ForwardBench {
    /// The LLaMA config of this benchmark.
    pub fn config(&self) -> Result<ModelConfig, ModelError> {
        let v = json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": self.vocab, "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": false
        });
        ModelConfig::from_value(&v, std::path::Path::new("<bench config>"))
    }

    /// Runs forward (label log-probs at every position) and forward + backward; the median of `iters` timed
    /// runs after one warm-up.
    pub fn run(&self, device: &Device, dtype: DType) -> Result<Vec<BenchRow>, ModelError> {
        let cfg = self.config()?;
        let model = CausalLm::new(cfg.clone(), random_weights(&cfg, 0.02, 0, dtype, device)?)?;
        let (trainable, vars) = model.trainable()?;
        let mut rng = Rng::new(1);
        let rows: Vec<Vec<u32>> = (0..self.batch)
            .map(|_| {
                (0..self.seq_len)
                    .map(|_| rng.below(self.vocab as u64) as u32)
                    .collect()
            })
            .collect();
        let input = Input::causal(&rows, 0, device)?;
        let table: Vec<Vec<i64>> = rows
            .iter()
            .map(|r| {
                (0..r.len())
                    .map(|t| r.get(t + 1).map_or(-1, |&x| x as i64))
                    .collect()
            })
            .collect();
        let labels = Labels::from_table(&table);
        let tokens = (self.batch * self.seq_len) as f64;
        let time = |f: &mut dyn FnMut() -> Result<(), ModelError>| -> Result<f64, ModelError> {
            f()?;
            let mut ts = Vec::new();
            for _ in 0..self.iters.max(1) {
                let t0 = Instant::now();
                f()?;
                device.synchronize()?;
                ts.push(t0.elapsed().as_secs_f64());
            }
            ts.sort_by(f64::total_cmp);
            Ok(ts[ts.len() / 2])
        };
        let fwd = time(&mut || {
            let lp = model.label_logprobs(&input, &labels)?;
            lp.sum_all()?.to_scalar::<f32>()?;
            Ok(())
        })?;
        let body = time(&mut || {
            let h = model.hidden(&input)?;
            h.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            Ok(())
        })?;
        let fwd_bwd = time(&mut || {
            let lp = trainable.label_logprobs(&input, &labels)?;
            let loss = lp.mean_all()?.neg()?;
            let grads = loss.backward()?;
            let g: &Tensor = grads
                .get(vars[0].1.as_tensor())
                .ok_or_else(|| ModelError::Input("no gradient for the first parameter".into()))?;
            g.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            Ok(())
        })?;
        Ok(vec![
            BenchRow {
                what: "forward".into(),
                seconds: fwd,
                tokens_per_s: tokens / fwd,
            },
            BenchRow {
                what: "  of which body".into(),
                seconds: body,
                tokens_per_s: tokens / body,
            },
            BenchRow {
                what: "forward+backward".into(),
                seconds: fwd_bwd,
                tokens_per_s: tokens / fwd_bwd,
            },
        ])
    }
}

/// Formats benchmark rows as an aligned table.
pub fn format_table(title: &str, rows: &[BenchRow]) -> String {
    let mut s = format!(
        "{title}\n{:<20} {:>10} {:>12}\n",
        "pass", "seconds", "tokens/s"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<20} {:>10.3} {:>12.1}\n",
            r.what, r.seconds, r.tokens_per_s
        ));
    }
    s
}
