//! `LlamaForCausalLM` (LLaMA, Alpaca, TinyLlama, SmolLM2): GQA, tied embeddings, rope scaling.

use candle_core::Tensor;

use super::config::LlamaConfig;
use super::error::Result;
use super::input::Input;
use super::layers::{
    attention, gated, merge_heads, rope_inv_freq, split_heads, AttnMask, Linear, RmsNorm, Rotary,
};
use super::weights::Weights;

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// A LLaMA decoder with its output layer.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Tensor,
    inv_freq: Vec<f64>,
}

fn linear(w: &Weights, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    Ok(Linear {
        weight: w.get(&format!("{name}.weight"), &[out, inp])?,
        bias: if bias {
            Some(w.get(&format!("{name}.bias"), &[out])?)
        } else {
            None
        },
    })
}

impl Llama {
    /// Builds the model from weights under transformers' names.
    pub fn new(cfg: &LlamaConfig, w: &Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        let q_out = cfg.num_attention_heads * cfg.head_dim;
        let kv_out = cfg.num_key_value_heads * cfg.head_dim;
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: w.get(name, &[h])?,
                eps: cfg.rms_norm_eps,
            })
        };
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let ab = cfg.attention_bias;
            let mb = cfg.mlp_bias;
            let im = cfg.intermediate_size;
            blocks.push(Block {
                input_layernorm: norm(&format!("{p}.input_layernorm.weight"))?,
                q_proj: linear(w, &format!("{p}.self_attn.q_proj"), q_out, h, ab)?,
                k_proj: linear(w, &format!("{p}.self_attn.k_proj"), kv_out, h, ab)?,
                v_proj: linear(w, &format!("{p}.self_attn.v_proj"), kv_out, h, ab)?,
                o_proj: linear(w, &format!("{p}.self_attn.o_proj"), h, q_out, ab)?,
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                gate_proj: linear(w, &format!("{p}.mlp.gate_proj"), im, h, mb)?,
                up_proj: linear(w, &format!("{p}.mlp.up_proj"), im, h, mb)?,
                down_proj: linear(w, &format!("{p}.mlp.down_proj"), h, im, mb)?,
            });
        }
        let embed_tokens = w.get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            w.get("lm_head.weight", &[cfg.vocab_size, h])?
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            blocks,
            norm: norm("model.norm.weight")?,
            lm_head,
            inv_freq: rope_inv_freq(&cfg.rope),
        })
    }

    /// Final hidden states `[B, T, hidden]` after the last norm.
    pub fn hidden(&self, input: &Input) -> Result<Tensor> {
        let (b, t) = input.dims();
        let c = &self.cfg;
        let mut x = self
            .embed_tokens
            .index_select(&input.ids.flatten_all()?, 0)?
            .reshape((b, t, c.hidden_size))?;
        let mask = AttnMask::new(&input.mask)?;
        let rotary = Rotary::new(&self.inv_freq, &input.positions, x.dtype())?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        for blk in &self.blocks {
            let hs = blk.input_layernorm.forward(&x)?;
            let q = split_heads(&blk.q_proj.forward(&hs)?, c.num_attention_heads, c.head_dim)?;
            let k = split_heads(&blk.k_proj.forward(&hs)?, c.num_key_value_heads, c.head_dim)?;
            let v = split_heads(&blk.v_proj.forward(&hs)?, c.num_key_value_heads, c.head_dim)?;
            let (q, k) = (rotary.apply(&q)?, rotary.apply(&k)?);
            let a = merge_heads(&attention(&q, &k, &v, &mask, scale)?)?;
            x = (x + blk.o_proj.forward(&a)?)?;
            let hs = blk.post_attention_layernorm.forward(&x)?;
            let gate = blk.gate_proj.forward(&hs)?;
            let up = blk.up_proj.forward(&hs)?;
            x = (x + blk.down_proj.forward(&gated(&gate, &up, c.hidden_act)?)?)?;
        }
        self.norm.forward(&x)
    }

    /// The output projection `[vocab, hidden]`.
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }
}

impl Llama {
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
        let (b, t) = ids.dims2()?;
        let c = &self.cfg;
        let mut x = self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, c.hidden_size))?;
        let rotary = Rotary::new(&self.inv_freq, positions, x.dtype())?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let step = |l: &Linear, x: &Tensor| super::kv_cache::step_linear(x, &l.weight, l.bias.as_ref());
        for (layer, blk) in self.blocks.iter().enumerate() {
            let hs = blk.input_layernorm.forward(&x)?;
            let q = split_heads(&step(&blk.q_proj, &hs)?, c.num_attention_heads, c.head_dim)?;
            let k = split_heads(&step(&blk.k_proj, &hs)?, c.num_key_value_heads, c.head_dim)?;
            let v = split_heads(&step(&blk.v_proj, &hs)?, c.num_key_value_heads, c.head_dim)?;
            let (q, k) = (rotary.apply(&q)?, rotary.apply(&k)?);
            let a = merge_heads(&cache.attend(layer, &q, &k, &v, scale)?)?;
            x = (x + step(&blk.o_proj, &a)?)?;
            let hs = blk.post_attention_layernorm.forward(&x)?;
            let gate = step(&blk.gate_proj, &hs)?;
            let up = step(&blk.up_proj, &hs)?;
            x = (x + step(&blk.down_proj, &gated(&gate, &up, c.hidden_act)?)?)?;
        }
        self.norm.forward(&x)
    }
}
