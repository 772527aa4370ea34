//! One handle over the architectures: hidden states, logits, and log-probabilities of chosen label tokens.

use candle_core::{DType, Tensor, Var};

use super::config::ModelConfig;
use super::error::{ModelError, Result};
use super::gpt2::Gpt2;
use super::gpt_neox::GptNeox;
use super::input::Input;
use super::llama::Llama;
use super::weights::Weights;

/// Bytes of `[rows, vocab]` f32 logits formed at once: bounds memory and keeps each buffer under the allocator's
/// mmap threshold (see `crate::tune_allocator`).
const LOGPROB_CHUNK_BYTES: usize = 24 << 20;

#[derive(Debug, Clone)]
enum Arch {
    Llama(Llama),
    Gpt2(Gpt2),
    GptNeox(GptNeox),
}

/// A causal language model with weights under Hugging Face names.
#[derive(Debug, Clone)]
pub struct CausalLm {
    config: ModelConfig,
    weights: Weights,
    arch: Arch,
}

/// Positions whose next-token log-probability is wanted: flat index `b * T + t` into the input and the label id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels {
    pub flat_positions: Vec<u32>,
    pub ids: Vec<u32>,
}

impl Labels {
    /// From a `[B][T]` table where negative entries mean "no label".
    pub fn from_table(table: &[Vec<i64>]) -> Self {
        let mut out = Self::default();
        let t = table.first().map_or(0, Vec::len);
        for (b, row) in table.iter().enumerate() {
            for (i, &l) in row.iter().enumerate() {
                if l >= 0 {
                    out.flat_positions.push((b * t + i) as u32);
                    out.ids.push(l as u32);
                }
            }
        }
        out
    }

    /// Number of labelled positions.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no position is labelled.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The masked forward of one input split into its stages (embeddings, each decoder block, the final norm), for
/// callers that run them one at a time (see `recompute.rs`). The mask and rotary tables are built once.
pub struct Stages<'a> {
    model: &'a CausalLm,
    input: &'a Input,
    mask: super::layers::AttnMask,
    rotary: Option<super::layers::Rotary>,
}

impl Stages<'_> {
    /// Decoder blocks.
    pub fn n_blocks(&self) -> usize {
        match &self.model.arch {
            Arch::Llama(m) => m.n_blocks(),
            Arch::Gpt2(m) => m.n_blocks(),
            Arch::GptNeox(m) => m.n_blocks(),
        }
    }

    /// The embeddings `[B, T, hidden]` (the first block's input).
    pub fn embed(&self) -> Result<Tensor> {
        let (ids, pos) = (&self.input.ids, &self.input.positions);
        match &self.model.arch {
            Arch::Llama(m) => m.embed(ids),
            Arch::Gpt2(m) => m.embed(ids, pos),
            Arch::GptNeox(m) => m.embed(ids),
        }
    }

    /// Block `i` applied to `x`.
    pub fn block(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        let dense = |l: &super::layers::Linear, x: &Tensor| l.forward(x);
        let mut attend =
            |_: usize, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64| -> Result<Tensor> {
                super::layers::attention(q, k, v, &self.mask, scale)
            };
        let rotary = || {
            self.rotary
                .as_ref()
                .ok_or_else(|| ModelError::Input("stages: no rotary tables".into()))
        };
        match &self.model.arch {
            Arch::Llama(m) => m.block_masked(i, x, rotary()?, &self.mask),
            Arch::Gpt2(m) => m.block(i, x, &mut attend),
            Arch::GptNeox(m) => m.block(i, x, rotary()?, &dense, &mut attend),
        }
    }

    /// The final norm: hidden states as [`CausalLm::hidden`] returns them.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        match &self.model.arch {
            Arch::Llama(m) => m.final_norm(x),
            Arch::Gpt2(m) => m.final_norm(x),
            Arch::GptNeox(m) => m.final_norm(x),
        }
    }
}

impl CausalLm {
    /// The stages of the masked forward over `input`.
    pub fn stages<'a>(&'a self, input: &'a Input) -> Result<Stages<'a>> {
        let dtype = self.dtype();
        let rotary = match &self.arch {
            Arch::Llama(m) => Some(m.rotary(&input.positions, dtype)?),
            Arch::Gpt2(_) => None,
            Arch::GptNeox(m) => Some(m.rotary(&input.positions, dtype)?),
        };
        Ok(Stages {
            model: self,
            input,
            mask: super::layers::AttnMask::new(&input.mask)?,
            rotary,
        })
    }

    /// Builds the architecture named by `config` from `weights`.
    pub fn new(config: ModelConfig, weights: Weights) -> Result<Self> {
        let arch = match &config {
            ModelConfig::Llama(c) => Arch::Llama(Llama::new(c, &weights)?),
            ModelConfig::Gpt2(c) => Arch::Gpt2(Gpt2::new(c, &weights)?),
            ModelConfig::GptNeox(c) => Arch::GptNeox(GptNeox::new(c, &weights)?),
        };
        Ok(Self {
            config,
            weights,
            arch,
        })
    }

    /// The parsed config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The weights the model was built from (the trainable parameters, under HF names).
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// The floating-point dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.lm_head().dtype()
    }

    /// A copy of the model whose floating-point weights are trainable variables, and those variables by name.
    pub fn trainable(&self) -> Result<(Self, Vec<(String, Var)>)> {
        let (weights, vars) = self.weights.to_vars()?;
        Ok((Self::new(self.config.clone(), weights)?, vars))
    }

    /// Final hidden states `[B, T, hidden]`.
    pub fn hidden(&self, input: &Input) -> Result<Tensor> {
        match &self.arch {
            Arch::Llama(m) => m.hidden(input),
            Arch::Gpt2(m) => m.hidden(input),
            Arch::GptNeox(m) => m.hidden(input),
        }
    }

    /// The output projection `[vocab, hidden]`.
    pub fn lm_head(&self) -> &Tensor {
        match &self.arch {
            Arch::Llama(m) => m.lm_head(),
            Arch::Gpt2(m) => m.lm_head(),
            Arch::GptNeox(m) => m.lm_head(),
        }
    }

    /// Logits `[B, T, vocab]`.
    pub fn logits(&self, input: &Input) -> Result<Tensor> {
        let h = self.hidden(input)?;
        super::layers::matmul_2d(&h, &self.lm_head().t()?)
    }

    /// Log-probabilities (f32, `[N]`) of `labels.ids` at `labels.flat_positions`; logits are formed only at the
    /// labelled positions, a chunk of rows at a time.
    pub fn label_logprobs(&self, input: &Input, labels: &Labels) -> Result<Tensor> {
        let h = self.hidden(input)?;
        self.label_logprobs_from_hidden(&h, labels)
    }

    /// As [`CausalLm::label_logprobs`], from hidden states already computed.
    pub fn label_logprobs_from_hidden(&self, hidden: &Tensor, labels: &Labels) -> Result<Tensor> {
        let (b, t, hdim) = hidden.dims3()?;
        let vocab = self.config.vocab_size() as u32;
        if let Some(&bad) = labels.ids.iter().find(|&&l| l >= vocab) {
            return Err(ModelError::Input(format!(
                "label id {bad} is outside the vocabulary ({vocab})"
            )));
        }
        if let Some(&bad) = labels.flat_positions.iter().find(|&&p| p as usize >= b * t) {
            return Err(ModelError::Input(format!(
                "label position {bad} is outside the batch ({b}×{t})"
            )));
        }
        let device = hidden.device();
        if labels.is_empty() {
            return Ok(Tensor::zeros(0, DType::F32, device)?);
        }
        let flat = hidden.reshape((b * t, hdim))?;
        if flat.device().is_cpu()
            && flat.dtype() == DType::F32
            && self.lm_head().dtype() == DType::F32
        {
            return Ok(super::fused_head::head_logprobs(
                &flat,
                self.lm_head(),
                &labels.flat_positions,
                &labels.ids,
            )?);
        }
        let head_t = self.lm_head().t()?;
        let mut parts = Vec::new();
        let chunk_rows = (LOGPROB_CHUNK_BYTES / (4 * vocab as usize)).max(16);
        for start in (0..labels.len()).step_by(chunk_rows) {
            let end = (start + chunk_rows).min(labels.len());
            let idx = Tensor::new(&labels.flat_positions[start..end], device)?;
            let rows = flat.index_select(&idx, 0)?;
            let logits = if super::layers::fused_ok(&[&rows, self.lm_head()]) {
                super::fused_linear::linear(&rows, self.lm_head())?
            } else {
                rows.matmul(&head_t)?
            };
            let logits = if logits.dtype() == DType::F64 {
                logits
            } else {
                logits.to_dtype(DType::F32)?
            };
            parts.push(super::fused::label_logprobs(
                &logits,
                &labels.ids[start..end],
            )?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Log-probabilities `[B, T]` for a label table (negative = none, giving 0 there).
    pub fn label_logprob_table(&self, input: &Input, table: &[Vec<i64>]) -> Result<Tensor> {
        let (b, t) = input.dims();
        if table.len() != b || table.iter().any(|r| r.len() != t) {
            return Err(ModelError::Input(format!("label table must be {b}×{t}")));
        }
        let labels = Labels::from_table(table);
        let lp = self.label_logprobs(input, &labels)?;
        let device = lp.device();
        let idx = Tensor::new(labels.flat_positions.as_slice(), device)?;
        let zeros = Tensor::zeros(b * t, DType::F32, device)?;
        Ok(zeros.index_add(&idx, &lp, 0)?.reshape((b, t))?)
    }
}

/// Incremental decoding with a key/value cache.
impl CausalLm {
    /// Layers, key/value heads and head width: the shape of this model's key/value cache.
    pub fn kv_shape(&self) -> (usize, usize, usize) {
        match &self.config {
            ModelConfig::Llama(c) => (c.num_hidden_layers, c.num_key_value_heads, c.head_dim),
            ModelConfig::Gpt2(c) => (c.n_layer, c.n_head, c.n_embd / c.n_head),
            ModelConfig::GptNeox(c) => (
                c.num_hidden_layers,
                c.num_attention_heads,
                c.hidden_size / c.num_attention_heads,
            ),
        }
    }

    /// The largest position id the model can embed plus one, for models with learned positions (GPT-2).
    pub fn max_positions(&self) -> Option<usize> {
        match &self.config {
            ModelConfig::Gpt2(c) => Some(c.n_positions),
            _ => None,
        }
    }

    /// An empty key/value cache for rows whose first real slot is `starts[r]` (left padding), in the layout that
    /// suits the weights' device.
    pub fn kv_cache(&self, starts: Vec<usize>) -> super::kv_cache::KvCache {
        let (layers, kv_heads, head_dim) = self.kv_shape();
        super::kv_cache::KvCache::new(layers, kv_heads, head_dim, starts, self.lm_head().device())
    }

    /// Final hidden states `[B, Tq, hidden]` of `ids` (`[B, Tq]`, u32) at `positions` (`[B, Tq]`, u32), attending to
    /// the cached slots of each row and its own earlier new slots; appends the new keys and values to `cache`.
    pub fn hidden_step(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        cache: &mut super::kv_cache::KvCache,
    ) -> Result<Tensor> {
        if ids.dims2()? != positions.dims2()? || ids.dim(0)? != cache.rows() {
            return Err(ModelError::Input(format!(
                "hidden_step: ids {:?}, positions {:?} for a cache of {} rows",
                ids.dims(),
                positions.dims(),
                cache.rows()
            )));
        }
        let (ids, positions) = (ids.to_dtype(DType::U32)?, positions.to_dtype(DType::U32)?);
        match &self.arch {
            Arch::Llama(m) => m.hidden_step(&ids, &positions, cache),
            Arch::Gpt2(m) => m.hidden_step(&ids, &positions, cache),
            Arch::GptNeox(m) => m.hidden_step(&ids, &positions, cache),
        }
    }

    /// Makes decoding read bf16 copies of the weight matrices (`--decode-dtype bf16`): about half the bytes per
    /// token on the CPU, an approximation of the f32 policy. LLaMA-architecture models in f32 only; training and
    /// scoring never use the copies.
    pub fn enable_bf16_decode(&mut self) -> Result<()> {
        if self.lm_head().dtype() != DType::F32 || !self.lm_head().device().is_cpu() {
            return Err(ModelError::Input(
                "--decode-dtype bf16 is for f32 models on the CPU (with --dtype bf16 every step is bf16 already)"
                    .into(),
            ));
        }
        match &mut self.arch {
            Arch::Llama(m) => m.enable_bf16_decode(),
            _ => Err(ModelError::Input(
                "--decode-dtype bf16 is implemented for LLaMA-architecture models (LLaMA, SmolLM2, TinyLlama)".into(),
            )),
        }
    }

    /// Logits (f32, `[B, vocab]`) at the last position of hidden states `[B, T, hidden]`.
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (_, t, _) = hidden.dims3()?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        if let Arch::Llama(m) = &self.arch {
            let rows = last.dim(0)?;
            if let Some(head) = m.decode_head_bf16() {
                if last.dtype() == DType::F32
                    && last.device().is_cpu()
                    && rows <= super::decode_matmul::STEP_ROWS_MAX
                {
                    let k = last.dim(1)?;
                    let x = last.flatten_all()?.to_vec1::<f32>()?;
                    let y = super::decode_matmul::matmul_rows_w(
                        &x,
                        rows,
                        k,
                        super::decode_matmul::WeightRows::Bf16(head),
                    );
                    return Ok(Tensor::from_vec(y, (rows, head.len() / k), last.device())?);
                }
            }
        }
        let logits = super::kv_cache::step_linear(&last, self.lm_head(), None)?;
        Ok(if logits.dtype() == DType::F64 {
            logits
        } else {
            logits.to_dtype(DType::F32)?
        })
    }
}
