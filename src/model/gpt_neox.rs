//! `GPTNeoXForCausalLM` (Pythia): fused per-head QKV, partial rotary, optional parallel residual.

use candle_core::{Tensor, D};

use super::config::GptNeoxConfig;
use super::error::Result;
use super::input::Input;
use super::layers::{
    activate, attention, merge_heads, rope_inv_freq, Attend, AttnMask, Dense, LayerNorm, Linear,
    Rotary,
};
use super::weights::Weights;

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
    query_key_value: Linear,
    dense: Linear,
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
}

/// A GPT-NeoX decoder with its output layer (`embed_out`).
#[derive(Debug, Clone)]
pub struct GptNeox {
    cfg: GptNeoxConfig,
    embed_in: Tensor,
    blocks: Vec<Block>,
    final_layer_norm: LayerNorm,
    embed_out: Tensor,
    inv_freq: Vec<f64>,
}

impl GptNeox {
    /// Builds the model from weights under transformers' names (`gpt_neox.` prefix, `embed_out`).
    pub fn new(cfg: &GptNeoxConfig, w: &Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        let ln = |p: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: w.get(&format!("{p}.weight"), &[h])?,
                bias: w.get(&format!("{p}.bias"), &[h])?,
                eps: cfg.layer_norm_eps,
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
        // Grown, not sized by `num_hidden_layers`: the count comes from config.json, and a corrupt one (2^64 − 1) would abort
        // the allocation before the first missing layer weight is reported.
        let mut blocks = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let p = format!("gpt_neox.layers.{i}");
            let ab = cfg.attention_bias;
            blocks.push(Block {
                input_layernorm: ln(&format!("{p}.input_layernorm"))?,
                post_attention_layernorm: ln(&format!("{p}.post_attention_layernorm"))?,
                query_key_value: lin(&format!("{p}.attention.query_key_value"), 3 * h, h, ab)?,
                dense: lin(&format!("{p}.attention.dense"), h, h, ab)?,
                dense_h_to_4h: lin(
                    &format!("{p}.mlp.dense_h_to_4h"),
                    cfg.intermediate_size,
                    h,
                    true,
                )?,
                dense_4h_to_h: lin(
                    &format!("{p}.mlp.dense_4h_to_h"),
                    h,
                    cfg.intermediate_size,
                    true,
                )?,
            });
        }
        let embed_in = w.get("gpt_neox.embed_in.weight", &[cfg.vocab_size, h])?;
        let embed_out = if cfg.tie_word_embeddings {
            embed_in.clone()
        } else {
            w.get("embed_out.weight", &[cfg.vocab_size, h])?
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed_in,
            blocks,
            final_layer_norm: ln("gpt_neox.final_layer_norm")?,
            embed_out,
            inv_freq: rope_inv_freq(&cfg.rope),
        })
    }

    /// Final hidden states `[B, T, hidden]` after the final layer norm.
    pub fn hidden(&self, input: &Input) -> Result<Tensor> {
        let mask = AttnMask::new(&input.mask)?;
        self.body(
            &input.ids,
            &input.positions,
            &|l, x| l.forward(x),
            &mut |_, q, k, v, scale| attention(q, k, v, &mask, scale),
        )
    }

    /// The decoder stack over `ids` at `positions`, with the dense layers and attention supplied by the caller:
    /// the masked forward of training and scoring, or a decoding step against a KV cache.
    fn body(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        dense: &Dense,
        attend: &mut Attend,
    ) -> Result<Tensor> {
        let mut x = self.embed(ids)?;
        let rotary = self.rotary(positions, x.dtype())?;
        for layer in 0..self.blocks.len() {
            x = self.block(layer, &x, &rotary, dense, attend)?;
        }
        self.final_layer_norm.forward(&x)
    }

    /// Token embeddings `[B, T, hidden]`.
    pub(crate) fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self
            .embed_in
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))?)
    }

    /// Rotary tables for `positions`.
    pub(crate) fn rotary(&self, positions: &Tensor, dtype: candle_core::DType) -> Result<Rotary> {
        Rotary::new(&self.inv_freq, positions, dtype)
    }

    /// Decoder block `layer` applied to `x`.
    pub(crate) fn block(
        &self,
        layer: usize,
        x: &Tensor,
        rotary: &Rotary,
        dense: &Dense,
        attend: &mut Attend,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let blk = &self.blocks[layer];
        let (b, t, _) = x.dims3()?;
        let nh = c.num_attention_heads;
        let hd = c.hidden_size / nh;
        let scale = 1.0 / (hd as f64).sqrt();
        // The fused projection is laid out per head: [q_h, k_h, v_h] for each head h.
        let qkv = dense(&blk.query_key_value, &blk.input_layernorm.forward(x)?)?
            .reshape((b, t, nh, 3 * hd))?
            .transpose(1, 2)?;
        let q = rotary.apply(&qkv.narrow(D::Minus1, 0, hd)?)?;
        let k = rotary.apply(&qkv.narrow(D::Minus1, hd, hd)?)?;
        let v = qkv.narrow(D::Minus1, 2 * hd, hd)?;
        let a = dense(
            &blk.dense,
            &merge_heads(&attend(layer, &q, &k, &v, scale)?)?,
        )?;
        let mlp = |inp: &Tensor| -> Result<Tensor> {
            let m = activate(&dense(&blk.dense_h_to_4h, inp)?, c.hidden_act)?;
            dense(&blk.dense_4h_to_h, &m)
        };
        Ok(if c.use_parallel_residual {
            let m = mlp(&blk.post_attention_layernorm.forward(x)?)?;
            ((x + a)? + m)?
        } else {
            let x1 = (x + a)?;
            let m = mlp(&blk.post_attention_layernorm.forward(&x1)?)?;
            (x1 + m)?
        })
    }

    /// Decoder blocks.
    pub(crate) fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The final layer norm.
    pub(crate) fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.final_layer_norm.forward(x)
    }

    /// The output projection `[vocab, hidden]`.
    pub fn lm_head(&self) -> &Tensor {
        &self.embed_out
    }
}

impl GptNeox {
    /// Final hidden states `[B, Tq, hidden]` of `ids` (`[B, Tq]`) at `positions` (`[B, Tq]`), attending to the
    /// rows' cached keys and values, which this call extends (incremental decoding; see [`KvCache`]).
    ///
    /// [`KvCache`]: super::kv_cache::KvCache
    pub fn hidden_step(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        cache: &mut super::kv_cache::KvCache,
    ) -> Result<Tensor> {
        self.body(
            ids,
            positions,
            &|l, x| super::kv_cache::step_linear(x, &l.weight, l.bias.as_ref()),
            &mut |layer, q, k, v, scale| cache.attend(layer, q, k, v, scale),
        )
    }
}
