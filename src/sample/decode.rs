//! The decoding primitives every strategy shares: options and results of generation, the model side
//! ([`Decoder`]: batched, KV-cached decoding with Hugging Face `generate` semantics), log-softmax, stop checks and
//! top-k selection.
//!
//! All prompts of a call are prefilled in one forward (left padded; position ids = cumsum(mask) − 1, pad keys
//! masked), then every step feeds one token per live sequence (prompts × beams or × samples) in one forward.
//! Sequences that can no longer change (finished rows, prompts whose beam search is decided) leave the batch.
//! The search rules live in `strategy_*.rs`; the model side in [`Decoder`].

use std::fmt;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::model::error::{ModelError, Result};
use crate::model::kv_cache::{exp_f32, KvCache};
use crate::model::CausalLm;

/// When beam search stops (Hugging Face's `early_stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStopping {
    /// Stop a prompt as soon as `num_beams` hypotheses are finished.
    True,
    /// Stop when the best running beam, at its current length, cannot beat the worst finished hypothesis.
    False,
    /// As `False`, but with a positive length penalty judge the running beam at the maximum length (canonical
    /// beam search).
    Never,
}

/// A decoding strategy.
#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    /// The most likely token at every step.
    Greedy,
    /// Beam search (transformers ≥ 4.50 `_beam_search`); `num_beams == 1` is greedy.
    Beam {
        num_beams: usize,
        length_penalty: f64,
        early_stopping: EarlyStopping,
    },
    /// Group (diverse) beam search with Hamming diversity (transformers 4.x `_group_beam_search`);
    /// `num_beam_groups == 1` is beam search.
    DiverseBeam {
        num_beams: usize,
        num_beam_groups: usize,
        diversity_penalty: f64,
        length_penalty: f64,
        early_stopping: EarlyStopping,
    },
    /// Multinomial sampling from `softmax(logits / temperature)` after top-k and top-p filtering (in that order,
    /// as transformers' warpers). `top_k: None` or `Some(0)` and `top_p: 1.0` disable the filters.
    Sample {
        temperature: f64,
        top_k: Option<usize>,
        top_p: f64,
    },
}

/// A check on a sequence's new token ids (e.g. stop strings on the decoded text); `true` ends the sequence.
pub type StopCheck = Arc<dyn Fn(&[u32]) -> bool + Send + Sync>;

/// Options of [`generate`](super::generate::generate).
#[derive(Clone)]
pub struct GenerateOptions {
    pub strategy: Strategy,
    /// Results per prompt: ≤ `num_beams` for beam strategies (the best ones); independent samples for `Sample`;
    /// 1 for `Greedy`.
    pub num_return_sequences: usize,
    pub max_new_tokens: usize,
    /// Generation of a sequence stops at any of these ids (`generation_config.eos_token_id`); the id is kept.
    pub stop_ids: Vec<u32>,
    /// The pad id: fills left padding, and finished beam groups emit it (it then counts in the diversity
    /// penalty of later groups, as in transformers).
    pub pad_id: u32,
    /// Seed of `Sample`: sample `j` of prompt `i` draws from its own stream of (seed, i, j), so results do not
    /// depend on which other sequences share the batch.
    pub seed: u64,
    /// Optional early stop on content (stop strings): called with a sequence's new ids; `true` = finished, the
    /// last token kept. In beam search a candidate it accepts finishes like one ending in a stop id.
    pub stop_check: Option<StopCheck>,
}

impl fmt::Debug for GenerateOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerateOptions")
            .field("strategy", &self.strategy)
            .field("num_return_sequences", &self.num_return_sequences)
            .field("max_new_tokens", &self.max_new_tokens)
            .field("stop_ids", &self.stop_ids)
            .field("pad_id", &self.pad_id)
            .field("seed", &self.seed)
            .field("stop_check", &self.stop_check.as_ref().map(|_| "<fn>"))
            .finish()
    }
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            strategy: Strategy::Greedy,
            num_return_sequences: 1,
            max_new_tokens: 128,
            stop_ids: Vec::new(),
            pad_id: 0,
            seed: 0,
            stop_check: None,
        }
    }
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// New tokens only (a final stop id included).
    pub ids: Vec<u32>,
    /// Σ log P(token | prefix) under the model (plain log-softmax of the logits: no temperature, no filtering,
    /// no diversity penalty).
    pub logprob_sum: f64,
    /// Beam strategies: transformers' sequence score (accumulated processed log-probs, diversity penalties
    /// included, divided by `len^length_penalty`); otherwise `logprob_sum`.
    pub score: f64,
    /// The sequence ended at a stop id or by `stop_check` (not by `max_new_tokens`).
    pub finished: bool,
}

/// An invalid generation input or option.
pub(crate) fn bad(msg: impl Into<String>) -> ModelError {
    ModelError::Input(msg.into())
}

/// The model side of generation: prefill, one-token steps and row selection over a KV cache.
pub struct Decoder<'a> {
    model: &'a CausalLm,
    cache: KvCache,
    /// Position id of each live row's next token.
    pos: Vec<u32>,
    vocab: usize,
}

impl<'a> Decoder<'a> {
    /// Runs all prompts (left padded with `pad_id`, or id 0 if that is not a token) through the model in one
    /// forward; returns the decoder with one row per prompt and the next-token logits `[prompts × vocab]`.
    pub fn prefill(
        model: &'a CausalLm,
        prompts: &[Vec<u32>],
        pad_id: u32,
    ) -> Result<(Self, Logits)> {
        Self::prefill_with(model, prompts, pad_id, None)
    }

    /// As [`Decoder::prefill`] with a given cache (e.g. [`KvCache::new_tensor`] to test the other layout).
    pub fn prefill_with(
        model: &'a CausalLm,
        prompts: &[Vec<u32>],
        pad_id: u32,
        cache: Option<KvCache>,
    ) -> Result<(Self, Logits)> {
        let vocab = model.config().vocab_size();
        let pad = if (pad_id as usize) < vocab { pad_id } else { 0 };
        let b = prompts.len();
        let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let starts: Vec<usize> = prompts.iter().map(|p| t - p.len()).collect();
        let mut ids = Vec::with_capacity(b * t);
        let mut pos = Vec::with_capacity(b * t);
        for (p, &s) in prompts.iter().zip(&starts) {
            ids.extend(std::iter::repeat_n(pad, s));
            ids.extend_from_slice(p);
            pos.extend(std::iter::repeat_n(0u32, s));
            pos.extend(0..p.len() as u32);
        }
        let device = model.lm_head().device();
        let ids = Tensor::from_vec(ids, (b, t), device)?;
        let positions = Tensor::from_vec(pos, (b, t), device)?;
        let mut cache = cache.unwrap_or_else(|| model.kv_cache(starts));
        let hidden = model.hidden_step(&ids, &positions, &mut cache)?;
        let logits = Logits::from_tensor(&model.last_logits(&hidden)?, vocab)?;
        let dec = Self {
            model,
            cache,
            pos: prompts.iter().map(|p| p.len() as u32).collect(),
            vocab,
        };
        Ok((dec, logits))
    }

    /// Live rows.
    pub fn rows(&self) -> usize {
        self.pos.len()
    }

    /// Keeps rows `idx` in that order (repeats allowed): row `i` continues old row `idx[i]`.
    pub fn select(&mut self, idx: &[usize]) -> Result<()> {
        self.cache.select_rows(idx)?;
        self.pos = idx.iter().map(|&i| self.pos[i]).collect();
        Ok(())
    }

    /// Feeds one token per live row; returns the next-token logits `[rows × vocab]`.
    pub fn step(&mut self, tokens: &[u32]) -> Result<Logits> {
        let b = self.rows();
        if tokens.len() != b {
            return Err(bad(format!("{} tokens for {b} rows", tokens.len())));
        }
        let device = self.model.lm_head().device();
        let ids = Tensor::from_vec(tokens.to_vec(), (b, 1), device)?;
        let positions = Tensor::from_vec(self.pos.clone(), (b, 1), device)?;
        let hidden = self.model.hidden_step(&ids, &positions, &mut self.cache)?;
        for p in &mut self.pos {
            *p += 1;
        }
        Logits::from_tensor(&self.model.last_logits(&hidden)?, self.vocab)
    }
}

/// Next-token logits of the live rows, on the host.
#[derive(Debug, Clone)]
pub struct Logits {
    data: Vec<f32>,
    vocab: usize,
}

impl Logits {
    fn from_tensor(t: &Tensor, vocab: usize) -> Result<Self> {
        let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self { data, vocab })
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.vocab..(r + 1) * self.vocab]
    }

    /// Rows `idx` (repeats allowed).
    pub fn select(&self, idx: &[usize]) -> Self {
        let mut data = Vec::with_capacity(idx.len() * self.vocab);
        for &i in idx {
            data.extend_from_slice(self.row(i));
        }
        Self {
            data,
            vocab: self.vocab,
        }
    }
}

/// `log Σ exp(row)`.
pub fn logsumexp(row: &[f32]) -> f32 {
    let mx = max_f32(row);
    if !mx.is_finite() {
        return mx;
    }
    mx + sum_exp_shifted(row, mx).ln()
}

/// Log-softmax of `row` in f32, as torch computes it: `x − max − log Σ exp(x − max)`.
pub fn log_softmax_into(row: &[f32], out: &mut Vec<f32>) {
    let mx = max_f32(row);
    let lse = sum_exp_shifted(row, mx).ln();
    out.clear();
    out.extend(row.iter().map(|&x| (x - mx) - lse));
}

/// `Σ e^(x − m)` over `row` (16 lanes, f32 as torch's vectorised softmax), at the widest SIMD level.
fn sum_exp_shifted(row: &[f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn v4(row: &[f32], m: f32) -> f32 {
            sum_exp_generic(row, m)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn v3(row: &[f32], m: f32) -> f32 {
            sum_exp_generic(row, m)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected at run time.
            return unsafe { v4(row, m) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected at run time.
            return unsafe { v3(row, m) };
        }
    }
    sum_exp_generic(row, m)
}

/// The largest entry (over 16 lanes, so that it vectorises).
fn max_f32(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &x in chunks.remainder() {
        m = m.max(x);
    }
    m
}

#[inline(always)]
fn sum_exp_generic(row: &[f32], m: f32) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let mut chunks = row.chunks_exact(L);
    for c in &mut chunks {
        for i in 0..L {
            acc[i] += exp_f32(c[i] - m);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for &x in chunks.remainder() {
        s += exp_f32(x - m);
    }
    s
}

/// Whether a sequence whose new ids are `ids` (last one just chosen) stops.
pub(crate) fn hits_stop(opts: &GenerateOptions, ids: &[u32]) -> bool {
    ids.last().is_some_and(|t| opts.stop_ids.contains(t))
        || opts.stop_check.as_ref().is_some_and(|f| f(ids))
}

/// The best `k` of `(score, index)` pairs fed in any order: sorted by score descending, then index ascending.
pub(crate) struct TopK {
    k: usize,
    items: Vec<(f32, usize)>,
}

impl TopK {
    pub(crate) fn new(k: usize) -> Self {
        Self {
            k,
            items: Vec::with_capacity(k + 1),
        }
    }

    /// The score a candidate must beat to enter (−∞ while not full).
    #[inline]
    pub(crate) fn floor(&self) -> f32 {
        if self.items.len() < self.k {
            f32::NEG_INFINITY
        } else {
            self.items[self.k - 1].0
        }
    }

    /// Offers one candidate; indices must be offered in increasing order (ties keep the earlier one first).
    #[inline]
    pub(crate) fn push(&mut self, score: f32, index: usize) {
        if self.k == 0 || (self.items.len() >= self.k && score <= self.floor()) || score.is_nan() {
            return;
        }
        let at = self.items.partition_point(|&(s, _)| s >= score);
        self.items.insert(at, (score, index));
        self.items.truncate(self.k);
    }

    /// Offers `base + row[v]` for every v, as indices `offset + v`.
    pub(crate) fn push_row(&mut self, row: &[f32], base: f32, offset: usize) {
        for (v, &x) in row.iter().enumerate() {
            let s = base + x;
            if s > self.floor() || self.items.len() < self.k {
                self.push(s, offset + v);
            }
        }
    }

    pub(crate) fn into_sorted(self) -> Vec<(f32, usize)> {
        self.items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_is_accurate() {
        let mut rng = crate::rng::Rng::new(3);
        let row: Vec<f32> = (0..1000).map(|_| (rng.normal() * 8.0) as f32).collect();
        let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
        let mut out = Vec::new();
        log_softmax_into(&row, &mut out);
        for (&x, &y) in row.iter().zip(&out) {
            assert!((y as f64 - (x as f64 - lse)).abs() < 1e-5);
        }
        assert!((logsumexp(&row) as f64 - lse).abs() < 1e-5);
        assert_eq!(exp_f32(-200.0), 0.0);
        let mut worst = 0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            worst = worst.max(((exp_f32(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs());
            x += 0.0137;
        }
        assert!(worst < 1e-6, "{worst}");
    }

    #[test]
    fn top_k_keeps_the_best_in_order() {
        let mut t = TopK::new(3);
        for (i, s) in [0.5f32, 2.0, -1.0, 2.0, 7.0, 0.5].iter().enumerate() {
            t.push(*s, i);
        }
        assert_eq!(t.into_sorted(), vec![(7.0, 4), (2.0, 1), (2.0, 3)]);
    }
}
