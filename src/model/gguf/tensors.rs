//! Tensors: the plan (GGUF name → Hugging Face name and shape), reading and dequantising, and the un-permute of
//! q/k rows.

use std::collections::HashSet;
use std::io::{Read, Seek};
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use crate::model::error::Result;

use super::*;

/// The ggml types this loader reads (those candle can dequantise).
pub(super) const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

pub(super) fn is_supported(t: GgmlDType) -> bool {
    !matches!(t, GgmlDType::Q8_1 | GgmlDType::Q8K)
}

/// ggml's names for its type codes (ggml.h `enum ggml_type`), for error messages.
pub(super) fn ggml_type_name(code: u32) -> &'static str {
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

pub(super) fn dtype_name(t: GgmlDType) -> &'static str {
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
pub(super) enum Permute {
    No,
    Heads(usize),
}

pub(super) struct Entry {
    pub(super) gguf_name: String,
    pub(super) hf_name: String,
    pub(super) shape: Vec<usize>,
    pub(super) permute: Permute,
}

pub(super) struct Plan {
    pub(super) entries: Vec<Entry>,
    pub(super) vocab_size: usize,
    pub(super) has_output: bool,
}

/// Maps every tensor of the file to its Hugging Face name and expected shape; rejects unknown
/// and missing tensors.
pub(super) fn plan_tensors(path: &Path, content: &Content, hp: &Hparams) -> Result<Plan> {
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
pub(super) fn unpermute(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let head_dim = rows / n_head;
    w.reshape((n_head, head_dim / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

pub(super) fn read_tensor<R: Read + Seek>(
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
