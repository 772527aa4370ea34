//! `GPT2LMHeadModel` (gpt2-medium is the paper's perplexity judge): learned positions, Conv1D layers, tied head.

use candle_core::Tensor;

use super::config::Gpt2Config;
use super::error::Result;
use super::input::Input;
use super::layers::{
    activate, attention, merge_heads, split_heads, Attend, AttnMask, Conv1D, LayerNorm,
};
use super::weights::Weights;

#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    c_attn: Conv1D,
    attn_proj: Conv1D,
    ln_2: LayerNorm,
    c_fc: Conv1D,
    mlp_proj: Conv1D,
}

/// A GPT-2 decoder with its (tied) output layer.
#[derive(Debug, Clone)]
pub struct Gpt2 {
    cfg: Gpt2Config,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
}

impl Gpt2 {
    /// Builds the model from weights under transformers' names (`transformer.` prefix).
    pub fn new(cfg: &Gpt2Config, w: &Weights) -> Result<Self> {
        let e = cfg.n_embd;
        let ln = |p: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: w.get(&format!("{p}.weight"), &[e])?,
                bias: w.get(&format!("{p}.bias"), &[e])?,
                eps: cfg.layer_norm_epsilon,
            })
        };
        let conv = |p: &str, inp: usize, out: usize| -> Result<Conv1D> {
            Ok(Conv1D {
                weight: w.get(&format!("{p}.weight"), &[inp, out])?,
                bias: w.get(&format!("{p}.bias"), &[out])?,
            })
        };
        // Grown, not sized by `n_layer`: the count comes from config.json, and a corrupt one (2^64 − 1) would abort
        // the allocation before the first missing layer weight is reported.
        let mut blocks = Vec::new();
        for i in 0..cfg.n_layer {
            let p = format!("transformer.h.{i}");
            blocks.push(Block {
                ln_1: ln(&format!("{p}.ln_1"))?,
                c_attn: conv(&format!("{p}.attn.c_attn"), e, 3 * e)?,
                attn_proj: conv(&format!("{p}.attn.c_proj"), e, e)?,
                ln_2: ln(&format!("{p}.ln_2"))?,
                c_fc: conv(&format!("{p}.mlp.c_fc"), e, cfg.n_inner)?,
                mlp_proj: conv(&format!("{p}.mlp.c_proj"), cfg.n_inner, e)?,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            wte: w.get("transformer.wte.weight", &[cfg.vocab_size, e])?,
            wpe: w.get("transformer.wpe.weight", &[cfg.n_positions, e])?,
            blocks,
            ln_f: ln("transformer.ln_f")?,
        })
    }

    /// Final hidden states `[B, T, n_embd]` after `ln_f`.
    pub fn hidden(&self, input: &Input) -> Result<Tensor> {
        let mask = AttnMask::new(&input.mask)?;
        self.body(&input.ids, &input.positions, &mut |_, q, k, v, scale| {
            attention(q, k, v, &mask, scale)
        })
    }

    /// The decoder stack over `ids` at `positions` with attention supplied by the caller: the masked forward of
    /// training and scoring, or a decoding step against a KV cache.
    fn body(&self, ids: &Tensor, positions: &Tensor, attend: &mut Attend) -> Result<Tensor> {
        let mut x = self.embed(ids, positions)?;
        for i in 0..self.blocks.len() {
            x = self.block(i, &x, attend)?;
        }
        self.ln_f.forward(&x)
    }

    /// Token plus position embeddings `[B, T, n_embd]`.
    pub(crate) fn embed(&self, ids: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let tok = self.wte.index_select(&ids.flatten_all()?, 0)?;
        let pos = self.wpe.index_select(&positions.flatten_all()?, 0)?;
        Ok((tok + pos)?.reshape((b, t, self.cfg.n_embd))?)
    }

    /// Decoder block `i` applied to `x`.
    pub(crate) fn block(&self, i: usize, x: &Tensor, attend: &mut Attend) -> Result<Tensor> {
        let c = &self.cfg;
        let blk = &self.blocks[i];
        let hd = c.n_embd / c.n_head;
        let mut scale = if c.scale_attn_weights {
            1.0 / (hd as f64).sqrt()
        } else {
            1.0
        };
        if c.scale_attn_by_inverse_layer_idx {
            scale /= (i + 1) as f64;
        }
        let qkv = blk.c_attn.forward(&blk.ln_1.forward(x)?)?;
        let q = split_heads(&qkv.narrow(2, 0, c.n_embd)?, c.n_head, hd)?;
        let k = split_heads(&qkv.narrow(2, c.n_embd, c.n_embd)?, c.n_head, hd)?;
        let v = split_heads(&qkv.narrow(2, 2 * c.n_embd, c.n_embd)?, c.n_head, hd)?;
        let a = merge_heads(&attend(i, &q, &k, &v, scale)?)?;
        let x = (x + blk.attn_proj.forward(&a)?)?;
        let m = activate(&blk.c_fc.forward(&blk.ln_2.forward(&x)?)?, c.activation)?;
        Ok((x + blk.mlp_proj.forward(&m)?)?)
    }

    /// Decoder blocks.
    pub(crate) fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The final layer norm.
    pub(crate) fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.ln_f.forward(x)
    }

    /// The output projection `[vocab, n_embd]` (the token embedding).
    pub fn lm_head(&self) -> &Tensor {
        &self.wte
    }
}

impl Gpt2 {
    /// Final hidden states `[B, Tq, n_embd]` of `ids` (`[B, Tq]`) at `positions` (`[B, Tq]`), attending to the
    /// rows' cached keys and values, which this call extends (incremental decoding; see [`KvCache`]).
    ///
    /// [`KvCache`]: super::kv_cache::KvCache
    pub fn hidden_step(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        cache: &mut super::kv_cache::KvCache,
    ) -> Result<Tensor> {
        self.body(ids, positions, &mut |layer, q, k, v, scale| {
            cache.attend(layer, q, k, v, scale)
        })
    }
}
