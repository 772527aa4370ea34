//! GPT-J (`GPTJModel`, the body of Dahoas/gptj-rm-static): parallel attention + MLP on one LayerNorm, bias-free
//! attention projections, and rotary embeddings on the first `rotary_dim` dims of each head in GPT-J's interleaved
//! layout (pairs `(x[2i], x[2i+1])`, transformers' `rotate_every_two`), not the rotate-half layout of LLaMA.

use candle_core::{DType, Tensor, D};

use super::config::Activation;
use super::error::Result;
use super::input::Input;
use super::layers::{activate, attention, merge_heads, split_heads, AttnMask, LayerNorm, Linear};
use super::weights::Weights;

/// `GPTJConfig` fields the forward needs.
#[derive(Debug, Clone, PartialEq)]
pub struct GptJConfig {
    pub vocab_size: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_positions: usize,
    /// Rotated dims per head (`rotary_dim`; the whole head when absent).
    pub rotary_dim: usize,
    pub n_inner: usize,
    pub layer_norm_epsilon: f64,
    pub activation: Activation,
}

impl GptJConfig {
    /// Dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    fc_in: Linear,
    fc_out: Linear,
}

/// The GPT-J decoder body (`transformer.*` weights), final hidden states after `ln_f`.
#[derive(Debug, Clone)]
pub struct GptJ {
    cfg: GptJConfig,
    wte: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    inv_freq: Vec<f32>,
}

impl GptJ {
    /// Builds the body from weights named as `GPTJForCausalLM` saves them (`transformer.` prefix).
    pub fn new(cfg: &GptJConfig, w: &Weights) -> Result<Self> {
        let e = cfg.n_embd;
        let ln = |p: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: w.get(&format!("{p}.weight"), &[e])?,
                bias: w.get(&format!("{p}.bias"), &[e])?,
                eps: cfg.layer_norm_epsilon,
            })
        };
        let lin = |p: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            Ok(Linear {
                weight: w.get(&format!("{p}.weight"), &[out, inp])?,
                bias: if bias {
                    Some(w.get(&format!("{p}.bias"), &[out])?)
                } else {
                    None
                },
            })
        };
        // Grown, not sized by `n_layer`: the count comes from config.json, and a corrupt one (2^64 − 1) would abort
        // the allocation before the first missing layer weight is reported.
        let mut blocks = Vec::new();
        for i in 0..cfg.n_layer {
            let p = format!("transformer.h.{i}");
            blocks.push(Block {
                ln_1: ln(&format!("{p}.ln_1"))?,
                q_proj: lin(&format!("{p}.attn.q_proj"), e, e, false)?,
                k_proj: lin(&format!("{p}.attn.k_proj"), e, e, false)?,
                v_proj: lin(&format!("{p}.attn.v_proj"), e, e, false)?,
                out_proj: lin(&format!("{p}.attn.out_proj"), e, e, false)?,
                fc_in: lin(&format!("{p}.mlp.fc_in"), cfg.n_inner, e, true)?,
                fc_out: lin(&format!("{p}.mlp.fc_out"), e, cfg.n_inner, true)?,
            });
        }
        // transformers: 1 / 10000^(arange(0, dim, 2) / dim), in float32.
        let r = cfg.rotary_dim;
        let inv_freq = (0..r / 2)
            .map(|i| 1.0f32 / 10000f32.powf((2 * i) as f32 / r as f32))
            .collect();
        Ok(Self {
            cfg: cfg.clone(),
            wte: w.get("transformer.wte.weight", &[cfg.vocab_size, e])?,
            blocks,
            ln_f: ln("transformer.ln_f")?,
            inv_freq,
        })
    }

    /// The config the body was built with.
    pub fn config(&self) -> &GptJConfig {
        &self.cfg
    }

    /// Final hidden states `[B, T, n_embd]` after `ln_f`.
    pub fn hidden(&self, input: &Input) -> Result<Tensor> {
        let (b, t) = input.dims();
        let c = &self.cfg;
        let hd = c.head_dim();
        let mut x = self
            .wte
            .index_select(&input.ids.flatten_all()?, 0)?
            .reshape((b, t, c.n_embd))?;
        let mask = AttnMask::new(&input.mask)?;
        let rot = InterleavedRotary::new(&self.inv_freq, &input.positions, x.dtype())?;
        let scale = 1.0 / (hd as f64).sqrt();
        for blk in &self.blocks {
            let h = blk.ln_1.forward(&x)?;
            let q = rot.apply(&split_heads(&blk.q_proj.forward(&h)?, c.n_head, hd)?)?;
            let k = rot.apply(&split_heads(&blk.k_proj.forward(&h)?, c.n_head, hd)?)?;
            let v = split_heads(&blk.v_proj.forward(&h)?, c.n_head, hd)?;
            let a = blk
                .out_proj
                .forward(&merge_heads(&attention(&q, &k, &v, &mask, scale)?)?)?;
            let m = blk
                .fc_out
                .forward(&activate(&blk.fc_in.forward(&h)?, c.activation)?)?;
            x = ((x + a)? + m)?;
        }
        self.ln_f.forward(&x)
    }
}

/// GPT-J's rotary embedding: pair `(x[2i], x[2i+1])` turned by `pos · inv_freq[i]` for the first `rotary_dim` dims.
struct InterleavedRotary {
    /// `[B, 1, T, r/2, 1]`.
    cos: Tensor,
    sin: Tensor,
    rotary_dim: usize,
}

impl InterleavedRotary {
    fn new(inv_freq: &[f32], positions: &Tensor, dtype: DType) -> Result<Self> {
        let (b, t) = positions.dims2()?;
        let half = inv_freq.len();
        let inv = Tensor::from_vec(inv_freq.to_vec(), (1, 1, half), positions.device())?;
        let angles = positions
            .to_dtype(DType::F32)?
            .reshape((b, t, 1))?
            .broadcast_mul(&inv)?;
        let shape = (b, 1, t, half, 1);
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?.reshape(shape)?,
            sin: angles.sin()?.to_dtype(dtype)?.reshape(shape)?,
            rotary_dim: 2 * half,
        })
    }

    /// Rotates `x` (`[B, H, T, head_dim]`).
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let r = self.rotary_dim;
        if r == 0 {
            return Ok(x.clone());
        }
        let (b, h, t, d) = x.dims4()?;
        let pairs = x.narrow(D::Minus1, 0, r)?.reshape((b, h, t, r / 2, 2))?;
        let even = pairs.narrow(D::Minus1, 0, 1)?;
        let odd = pairs.narrow(D::Minus1, 1, 1)?;
        let new_even = (even.broadcast_mul(&self.cos)? - odd.broadcast_mul(&self.sin)?)?;
        let new_odd = (odd.broadcast_mul(&self.cos)? + even.broadcast_mul(&self.sin)?)?;
        let rotated = Tensor::cat(&[&new_even, &new_odd], D::Minus1)?.reshape((b, h, t, r))?;
        Ok(if r < d {
            Tensor::cat(&[&rotated, &x.narrow(D::Minus1, r, d - r)?], D::Minus1)?
        } else {
            rotated
        })
    }
}
