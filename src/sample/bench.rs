//! Generation benchmarks (`rrhf bench generate`): random-weight LLaMA of [`ForwardBench`], and a real model one
//! prompt at a time.

use std::time::Instant;

use candle_core::{DType, Device};

use crate::model::bench::{BenchRow, ForwardBench};
use crate::model::init::random_weights;
use crate::model::{CausalLm, ModelError};
use crate::rng::Rng;

/// Generation throughput (`rrhf bench generate`): greedy, beam search and diverse beam search on the LLaMA of
/// [`ForwardBench`] with random weights. No stop id, so every sequence runs to `new_tokens` (transformers'
/// counterpart, tools/bench_generate.py, sets `min_new_tokens = max_new_tokens`).
#[derive(Debug, Clone)]
pub struct GenerateBench {
    pub prompts: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub num_beams: usize,
    pub num_beam_groups: usize,
    pub iters: usize,
}

impl Default for GenerateBench {
    fn default() -> Self {
        Self {
            prompts: 4,
            prompt_len: 64,
            new_tokens: 64,
            num_beams: 4,
            num_beam_groups: 4,
            iters: 1,
        }
    }
}

impl GenerateBench {
    /// The strategies timed, by name.
    pub fn strategies(&self) -> Vec<(String, crate::sample::Strategy)> {
        use crate::sample::{EarlyStopping, Strategy};
        vec![
            ("greedy".into(), Strategy::Greedy),
            (
                format!("beam {}", self.num_beams),
                Strategy::Beam {
                    num_beams: self.num_beams,
                    length_penalty: 1.0,
                    early_stopping: EarlyStopping::False,
                },
            ),
            (
                format!("diverse beam {}x{}", self.num_beams, self.num_beam_groups),
                Strategy::DiverseBeam {
                    num_beams: self.num_beams,
                    num_beam_groups: self.num_beam_groups,
                    diversity_penalty: 1.0,
                    length_penalty: 1.0,
                    early_stopping: EarlyStopping::False,
                },
            ),
        ]
    }

    /// Times each strategy (median of `iters` runs after a short warm-up); `tokens_per_s` counts the tokens of
    /// the returned sequence per prompt (prompts × new tokens), not the beams' hidden work.
    pub fn run(&self, device: &Device, dtype: DType) -> Result<Vec<BenchRow>, ModelError> {
        use crate::sample::{generate, GenerateOptions};
        let cfg = ForwardBench::default().config()?;
        let model = CausalLm::new(cfg.clone(), random_weights(&cfg, 0.02, 0, dtype, device)?)?;
        let mut rng = Rng::new(1);
        let vocab = cfg.vocab_size() as u64;
        let prompts: Vec<Vec<u32>> = (0..self.prompts)
            .map(|_| {
                (0..self.prompt_len)
                    .map(|_| rng.below(vocab) as u32)
                    .collect()
            })
            .collect();
        let mut rows = Vec::new();
        for (name, strategy) in self.strategies() {
            let opts = GenerateOptions {
                strategy,
                num_return_sequences: 1,
                max_new_tokens: self.new_tokens,
                ..GenerateOptions::default()
            };
            let warm = GenerateOptions {
                max_new_tokens: self.new_tokens.min(4),
                ..opts.clone()
            };
            generate(&model, &prompts, &warm)?;
            let mut ts = Vec::new();
            for _ in 0..self.iters.max(1) {
                let t0 = Instant::now();
                let out = generate(&model, &prompts, &opts)?;
                device.synchronize()?;
                ts.push(t0.elapsed().as_secs_f64());
                let n: usize = out.iter().map(|o| o[0].ids.len()).sum();
                if n != self.prompts * self.new_tokens {
                    return Err(ModelError::Input(format!(
                        "{name}: generated {n} tokens, expected {}",
                        self.prompts * self.new_tokens
                    )));
                }
            }
            ts.sort_by(f64::total_cmp);
            let s = ts[ts.len() / 2];
            rows.push(BenchRow {
                what: name,
                seconds: s,
                tokens_per_s: (self.prompts * self.new_tokens) as f64 / s,
            });
        }
        Ok(rows)
    }
}

/// One strategy of [`RealGenerateBench`]: time, token count and the ids of every prompt.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RealGenerateRow {
    pub name: String,
    pub seconds: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
    /// The new ids of each prompt (its best sequence).
    pub ids: Vec<Vec<u32>>,
}

/// `rrhf bench generate --model DIR --prompts FILE`: one prompt at a time (as a user sampling one query), greedy
/// and beam search with `rrhf sample`'s defaults (length penalty 1.0, early stopping false), stopping at the
/// model's stop ids. Tokens/s counts the new tokens of the returned sequence (stop id included).
#[derive(Debug, Clone)]
pub struct RealGenerateBench {
    pub max_new_tokens: usize,
    pub num_beams: usize,
    /// "greedy" and/or "beam".
    pub strategies: Vec<String>,
}

impl RealGenerateBench {
    pub fn strategy(&self, name: &str) -> Result<(String, crate::sample::Strategy), ModelError> {
        use crate::sample::{EarlyStopping, Strategy};
        match name {
            "greedy" => Ok(("greedy".into(), Strategy::Greedy)),
            "beam" => Ok((
                format!("beam {}", self.num_beams),
                Strategy::Beam {
                    num_beams: self.num_beams,
                    length_penalty: 1.0,
                    early_stopping: EarlyStopping::False,
                },
            )),
            other => Err(ModelError::Input(format!(
                "bench generate: unknown strategy {other:?} (greedy or beam)"
            ))),
        }
    }

    /// Runs each strategy over `prompts`, one prompt per `generate` call, after an untimed warm-up call.
    pub fn run(
        &self,
        model: &CausalLm,
        prompts: &[Vec<u32>],
        stop_ids: &[u32],
        pad_id: u32,
        device: &Device,
    ) -> Result<Vec<RealGenerateRow>, ModelError> {
        use crate::sample::{generate, GenerateOptions};
        let mut rows = Vec::new();
        for s in &self.strategies {
            let (name, strategy) = self.strategy(s)?;
            let opts = GenerateOptions {
                strategy,
                num_return_sequences: 1,
                max_new_tokens: self.max_new_tokens,
                stop_ids: stop_ids.to_vec(),
                pad_id,
                ..GenerateOptions::default()
            };
            if let Some(p) = prompts.first() {
                let warm = GenerateOptions {
                    max_new_tokens: self.max_new_tokens.min(4),
                    ..opts.clone()
                };
                generate(model, std::slice::from_ref(p), &warm)?;
            }
            let mut ids = Vec::with_capacity(prompts.len());
            let t0 = Instant::now();
            for p in prompts {
                let mut out = generate(model, std::slice::from_ref(p), &opts)?;
                ids.push(std::mem::take(&mut out[0][0].ids));
            }
            device.synchronize()?;
            let seconds = t0.elapsed().as_secs_f64();
            let tokens: usize = ids.iter().map(Vec::len).sum();
            rows.push(RealGenerateRow {
                name,
                seconds,
                tokens,
                tokens_per_s: tokens as f64 / seconds,
                ids,
            });
        }
        Ok(rows)
    }
}
