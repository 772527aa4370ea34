//! GGUF input (llama architecture): dequantised tensors under Hugging Face names and the tokenizer from metadata.
//!
//! What is read, and how it maps to the Hugging Face side:
//! - tensors are read with candle's GGUF reader (which already reverses GGUF's dimension order into
//!   PyTorch's), dequantised to f32, renamed (`blk.{i}.attn_q.weight` → `model.layers.{i}.self_attn.q_proj.weight`,
//!   …), and `q_proj`/`k_proj` are un-permuted: llama.cpp's converter reorders their rows for its
//!   interleaved rope, and this undoes it exactly as transformers' GGUF loader does
//!   (`reverse_permute_weights`);
//! - `llama.*` metadata becomes a `config.json` for `LlamaForCausalLM`; a `rope_freqs.weight` tensor
//!   (Llama 3.1-style scaling, which llama.cpp stores as per-frequency factors) is turned back into
//!   `rope_scaling = {rope_type: "llama3", …}`;
//! - `tokenizer.ggml.*` metadata becomes a byte-level BPE `tokenizers::Tokenizer`, built the way
//!   transformers' `GGUFGPTConverter` builds it, with the pre-tokeniser `tokenizer.ggml.pre` names.
//!
//! Files: meta (typed metadata access), config (hyper-parameters, rope scaling), tensors (plan, dequantisation,
//! un-permute), tokenizer, header_scan (names a tensor whose type candle rejects), tests. May import: the rest of
//! `model` and the base modules.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use serde_json::json;
use tokenizers::Tokenizer;

use crate::model::error::{ModelError, Result};

mod config;
mod header_scan;
mod meta;
mod tensors;
#[cfg(test)]
mod tests;
mod tokenizer;

use config::*;
use header_scan::*;
use meta::*;
use tensors::*;
use tokenizer::*;

/// Everything read from a llama-architecture GGUF file, in Hugging Face terms.
#[derive(Debug)]
pub struct GgufModel {
    /// A `config.json` for `LlamaForCausalLM` (keys: architectures, model_type "llama", vocab_size, hidden_size,
    /// intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, rms_norm_eps, rope_theta,
    /// max_position_embeddings, tie_word_embeddings, bos_token_id, eos_token_id, rope_scaling if present (null otherwise), torch_dtype "float32",
    /// hidden_act "silu", attention_bias false, mlp_bias false, head_dim).
    pub config: serde_json::Value,
    /// Dequantised f32 tensors under HF names (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`,
    /// k_proj, v_proj, o_proj, `mlp.gate_proj/up_proj/down_proj`, `input_layernorm`, `post_attention_layernorm`,
    /// `model.norm.weight`, `lm_head.weight` only when the file has `output.weight`).
    pub tensors: HashMap<String, Tensor>,
    /// The tokenizer rebuilt from `tokenizer.ggml.*` metadata.
    pub tokenizer: Tokenizer,
    /// A `tokenizer_config.json` (bos_token, eos_token, add_bos_token, chat_template if `tokenizer.chat_template` is present, model_max_length).
    pub tokenizer_config: serde_json::Value,
    /// A `generation_config.json` (bos_token_id, eos_token_id).
    pub generation_config: serde_json::Value,
}

/// Reads a GGUF file; tensors are dequantised to f32 on `device`.
pub fn load_gguf(path: &Path, device: &Device) -> Result<GgufModel> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| header_error(path, &e))?;
    let meta = Meta {
        path,
        md: &content.metadata,
    };

    let arch = meta.str_req("general.architecture")?;
    if arch != "llama" {
        return Err(meta.err(
            "general.architecture",
            format!("architecture {arch:?} is not supported (only \"llama\" is)"),
        ));
    }
    let hp = Hparams::read(&meta)?;

    // The tokenizer first: it is cheap, and its failures should not wait for the tensors.
    let tok = build_tokenizer(&meta)?;

    // Map every tensor to its Hugging Face name before reading any of them.
    let plan = plan_tensors(path, &content, &hp)?;
    let vocab_size = plan.vocab_size;
    if let Some(v) = meta.usize_opt("llama.vocab_size")? {
        if v != vocab_size {
            return Err(meta.err(
                "llama.vocab_size",
                format!("is {v} but `token_embd.weight` has {vocab_size} rows"),
            ));
        }
    }
    if tok.tokens_len > vocab_size {
        return Err(meta.err(
            "tokenizer.ggml.tokens",
            format!(
                "holds {} tokens but `token_embd.weight` has only {vocab_size} rows",
                tok.tokens_len
            ),
        ));
    }

    let rope_scaling = rope_scaling(path, &meta, &content, &mut reader, &hp)?;

    let mut tensors = HashMap::with_capacity(plan.entries.len());
    for entry in &plan.entries {
        let t = read_tensor(path, &content, &mut reader, entry, device)?;
        tensors.insert(entry.hf_name.clone(), t);
    }

    let tie = !plan.has_output;
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hp.hidden,
        "intermediate_size": hp.ffn,
        "num_hidden_layers": hp.n_layers,
        "num_attention_heads": hp.n_heads,
        "num_key_value_heads": hp.n_kv_heads,
        "head_dim": hp.head_dim,
        "rms_norm_eps": hp.rms_norm_eps,
        "rope_theta": hp.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": hp.context_length,
        "tie_word_embeddings": tie,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "torch_dtype": "float32",
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
    });

    let name_of = |id: Option<u32>| id.and_then(|i| tok.tokenizer.id_to_token(i));
    let mut tokenizer_config = json!({
        "bos_token": name_of(tok.bos_id),
        "eos_token": name_of(tok.eos_id),
        "unk_token": name_of(tok.unk_id),
        "pad_token": name_of(tok.pad_id),
        "add_bos_token": tok.add_bos,
        "add_eos_token": tok.add_eos,
        "model_max_length": hp.context_length,
        "clean_up_tokenization_spaces": false,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let Some(t) = meta.str_opt("tokenizer.chat_template")? {
        tokenizer_config["chat_template"] = json!(t);
    }
    let mut generation_config = json!({});
    if let Some(b) = tok.bos_id {
        generation_config["bos_token_id"] = json!(b);
    }
    if let Some(e) = tok.eos_id {
        generation_config["eos_token_id"] = json!(e);
    }

    Ok(GgufModel {
        config,
        tensors,
        tokenizer: tok.tokenizer,
        tokenizer_config,
        generation_config,
    })
}

pub(super) fn gguf_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Gguf {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The error for a file whose header candle cannot read. An unknown tensor type is the one
/// failure whose message lacks the tensor: the header is scanned again to find it.
pub(super) fn header_error(path: &Path, e: &candle_core::Error) -> ModelError {
    let text = e.to_string();
    if text.contains("unknown dtype") {
        if let Some((name, code)) = find_unknown_tensor_type(path) {
            return gguf_err(
                path,
                format!(
                    "tensor `{name}` has ggml type {} ({code}), which is not supported (supported: {})",
                    ggml_type_name(code),
                    SUPPORTED_TYPES
                ),
            );
        }
    }
    gguf_err(path, format!("not a readable GGUF file: {text}"))
}
