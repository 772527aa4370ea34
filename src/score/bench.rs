//! `rrhf bench score`: reward-model scoring throughput on the benchmark LLaMA (`crate::bench::ForwardBench`'s
//! config, random weights) with a one-output score head, through the same forward as `--reward model:DIR`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::device::{DTypeSpec, DeviceSpec};
use crate::model::bench::{BenchRow, ForwardBench};
use crate::model::init::random_weights;
use crate::model::reward::causal_head_logits;
use crate::model::{CausalLm, ModelError};
use crate::rng::Rng;

/// Responses per forward and tokens per response of the benchmark.
#[derive(Debug, Clone)]
pub struct ScoreBench {
    pub batch: usize,
    pub seq_len: usize,
    pub iters: usize,
}

impl Default for ScoreBench {
    fn default() -> Self {
        Self {
            batch: 16,
            seq_len: 256,
            iters: 3,
        }
    }
}

impl ScoreBench {
    /// Median seconds per batch after one warm-up; the row's `tokens_per_s` holds responses/s.
    pub fn run(&self, device: &Device, dtype: DType) -> Result<BenchRow, ModelError> {
        let fb = ForwardBench::default();
        let cfg = fb.config()?;
        let model = CausalLm::new(cfg.clone(), random_weights(&cfg, 0.02, 0, dtype, device)?)?;
        let head = (Tensor::randn(0f32, 0.02, (1, fb.hidden), device)?).to_dtype(dtype)?;
        let mut rng = Rng::new(3);
        let rows: Vec<Vec<u32>> = (0..self.batch)
            .map(|_| {
                (0..self.seq_len)
                    .map(|_| rng.below(fb.vocab as u64) as u32)
                    .collect()
            })
            .collect();
        let at = vec![self.seq_len - 1; self.batch];
        let once = || -> Result<f64, ModelError> {
            let t0 = Instant::now();
            let l = causal_head_logits(&model, &head, &rows, &at, device)?;
            l.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            Ok(t0.elapsed().as_secs_f64())
        };
        once()?;
        let mut ts: Vec<f64> = (0..self.iters.max(1))
            .map(|_| once())
            .collect::<Result<_, _>>()?;
        ts.sort_by(f64::total_cmp);
        let s = ts[ts.len() / 2];
        Ok(BenchRow {
            what: format!("score {}×{}", self.batch, self.seq_len),
            seconds: s,
            tokens_per_s: self.batch as f64 / s,
        })
    }
}

/// `rrhf bench score`: prints the table.
pub fn run_cli(
    device: DeviceSpec,
    dtype: DTypeSpec,
    iters: usize,
    batch: usize,
    seq_len: usize,
) -> Result<(), ModelError> {
    let b = ScoreBench {
        batch,
        seq_len,
        iters,
    };
    let fb = ForwardBench::default();
    let row = b.run(&device.open()?, dtype.dtype())?;
    println!(
        "rrhf bench score: LLaMA hidden {} × {} layers, vocab {}, score head, {device}, {dtype}",
        fb.hidden, fb.layers, fb.vocab
    );
    println!(
        "{:<20} {:>10} {:>12} {:>12}",
        "pass", "seconds", "responses/s", "tokens/s"
    );
    println!(
        "{:<20} {:>10.3} {:>12.1} {:>12.0}",
        row.what,
        row.seconds,
        row.tokens_per_s,
        row.tokens_per_s * seq_len as f64
    );
    Ok(())
}
