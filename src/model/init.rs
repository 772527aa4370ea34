//! Parameter names and shapes per architecture, and seeded random initialisation (benchmarks, tests).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;
use super::error::Result;
use super::weights::Weights;
use crate::rng::Rng;

/// Every trainable parameter of `config`'s architecture: HF name and shape.
pub fn param_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |n: String, s: &[usize]| out.push((n, s.to_vec()));
    match config {
        ModelConfig::Llama(c) => {
            let (h, q, kv, im) = (
                c.hidden_size,
                c.num_attention_heads * c.head_dim,
                c.num_key_value_heads * c.head_dim,
                c.intermediate_size,
            );
            add("model.embed_tokens.weight".into(), &[c.vocab_size, h]);
            for i in 0..c.num_hidden_layers {
                let p = format!("model.layers.{i}");
                add(format!("{p}.input_layernorm.weight"), &[h]);
                add(format!("{p}.post_attention_layernorm.weight"), &[h]);
                for (n, o, inp) in [
                    ("q_proj", q, h),
                    ("k_proj", kv, h),
                    ("v_proj", kv, h),
                    ("o_proj", h, q),
                ] {
                    add(format!("{p}.self_attn.{n}.weight"), &[o, inp]);
                    if c.attention_bias {
                        add(format!("{p}.self_attn.{n}.bias"), &[o]);
                    }
                }
                for (n, o, inp) in [
                    ("gate_proj", im, h),
                    ("up_proj", im, h),
                    ("down_proj", h, im),
                ] {
                    add(format!("{p}.mlp.{n}.weight"), &[o, inp]);
                    if c.mlp_bias {
                        add(format!("{p}.mlp.{n}.bias"), &[o]);
                    }
                }
            }
            add("model.norm.weight".into(), &[h]);
            if !c.tie_word_embeddings {
                add("lm_head.weight".into(), &[c.vocab_size, h]);
            }
        }
        ModelConfig::Gpt2(c) => {
            let e = c.n_embd;
            add("transformer.wte.weight".into(), &[c.vocab_size, e]);
            add("transformer.wpe.weight".into(), &[c.n_positions, e]);
            for i in 0..c.n_layer {
                let p = format!("transformer.h.{i}");
                for ln in ["ln_1", "ln_2"] {
                    add(format!("{p}.{ln}.weight"), &[e]);
                    add(format!("{p}.{ln}.bias"), &[e]);
                }
                for (n, inp, o) in [
                    ("attn.c_attn", e, 3 * e),
                    ("attn.c_proj", e, e),
                    ("mlp.c_fc", e, c.n_inner),
                    ("mlp.c_proj", c.n_inner, e),
                ] {
                    add(format!("{p}.{n}.weight"), &[inp, o]);
                    add(format!("{p}.{n}.bias"), &[o]);
                }
            }
            add("transformer.ln_f.weight".into(), &[e]);
            add("transformer.ln_f.bias".into(), &[e]);
        }
        ModelConfig::GptNeox(c) => {
            let (h, im) = (c.hidden_size, c.intermediate_size);
            add("gpt_neox.embed_in.weight".into(), &[c.vocab_size, h]);
            for i in 0..c.num_hidden_layers {
                let p = format!("gpt_neox.layers.{i}");
                for ln in ["input_layernorm", "post_attention_layernorm"] {
                    add(format!("{p}.{ln}.weight"), &[h]);
                    add(format!("{p}.{ln}.bias"), &[h]);
                }
                for (n, o, inp, bias) in [
                    ("attention.query_key_value", 3 * h, h, c.attention_bias),
                    ("attention.dense", h, h, c.attention_bias),
                    ("mlp.dense_h_to_4h", im, h, true),
                    ("mlp.dense_4h_to_h", h, im, true),
                ] {
                    add(format!("{p}.{n}.weight"), &[o, inp]);
                    if bias {
                        add(format!("{p}.{n}.bias"), &[o]);
                    }
                }
            }
            add("gpt_neox.final_layer_norm.weight".into(), &[h]);
            add("gpt_neox.final_layer_norm.bias".into(), &[h]);
            if !c.tie_word_embeddings {
                add("embed_out.weight".into(), &[c.vocab_size, h]);
            }
        }
    }
    out
}

/// Random weights: matrices and embeddings ~ N(0, std²), norm weights 1 and biases 0 (as transformers'
/// `_init_weights`), from a seeded generator so that runs are reproducible.
pub fn random_weights(
    config: &ModelConfig,
    std: f64,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Weights> {
    let mut rng = Rng::new(seed);
    let mut tensors = HashMap::new();
    for (name, shape) in param_shapes(config) {
        let n: usize = shape.iter().product();
        let is_norm = name.contains("norm") || name.contains("ln_");
        let data: Vec<f32> = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if is_norm {
            vec![1.0; n]
        } else {
            (0..n).map(|_| (rng.normal() * std) as f32).collect()
        };
        let t = Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?;
        tensors.insert(name, t);
    }
    Ok(Weights::new(tensors, format!("random init (seed {seed})")))
}
