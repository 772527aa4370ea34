//! Hyper-parameters: `llama.*` metadata to a `config.json`, and `rope_scaling` recovered from `rope_freqs.weight`
//! or `llama.rope.scaling.*`.

use std::io::{Read, Seek};
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device};
use serde_json::json;

use crate::model::error::Result;

use super::*;

pub(super) struct Hparams {
    pub(super) hidden: usize,
    pub(super) n_layers: usize,
    pub(super) ffn: usize,
    pub(super) n_heads: usize,
    pub(super) n_kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) rms_norm_eps: f64,
    pub(super) rope_theta: f64,
    pub(super) context_length: usize,
}

impl Hparams {
    pub(super) fn read(m: &Meta) -> Result<Self> {
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

/// `rope_scaling` for config.json: from `rope_freqs.weight` (llama3) or `llama.rope.scaling.*`.
pub(super) fn rope_scaling<R: Read + Seek>(
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
pub(super) const LLAMA3_ORIGINAL_CONTEXT: f64 = 8192.0;

pub(super) fn llama3_factor(wavelen: f64, factor: f64, low: f64, high: f64, old_ctx: f64) -> f64 {
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
pub(super) fn llama3_from_rope_factors(
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
