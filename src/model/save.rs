//! Saving a model in Hugging Face layout so that `AutoModelForCausalLM.from_pretrained(dir)` loads it unchanged.
//!
//! Every file is written to a temporary name and renamed into place (`crate::fsutil`), so a crash never leaves a
//! half-written file. Weights are streamed to disk tensor by tensor.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::Value;

use crate::fsutil::{link_or_copy, write_atomic, write_atomic_with};

use super::error::{ModelError, Result};
use super::load::dtype_name;
use super::tokenizer::{SideFiles, TextTokenizer};
use super::weights::Weights;

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    Ok(write_atomic(path, format!("{text}\n").as_bytes())?)
}

/// The header of a safetensors file and the order of the tensors in its data section.
struct StPlan {
    /// The 8-byte little-endian header length followed by the JSON header (padded with spaces to 8 bytes).
    head: Vec<u8>,
    /// (name, dtype to write) in data order.
    order: Vec<(String, DType)>,
}

/// Plans a safetensors file exactly as `safetensors::tensor::serialize` lays it out (tensors sorted by descending
/// dtype alignment, then name; transformers' `format: pt` metadata), so streamed files are byte-identical to the
/// ones the library writes. Only shapes and dtypes are read: no tensor data is touched.
fn plan_safetensors(tensors: &HashMap<String, Tensor>, dtype: Option<DType>) -> Result<StPlan> {
    let mut entries: Vec<(String, DType, Vec<usize>)> = tensors
        .iter()
        .map(|(name, t)| {
            let d = match dtype {
                Some(d) if t.dtype().is_float() => d,
                _ => t.dtype(),
            };
            (name.clone(), d, t.dims().to_vec())
        })
        .collect();
    for (name, d, _) in &entries {
        st_dtype(*d).map_err(|msg| ModelError::Input(format!("tensor `{name}`: {msg}")))?;
    }
    entries.sort_by(|(ln, ld, _), (rn, rd, _)| {
        let (l, r) = (st_dtype(*ld).ok(), st_dtype(*rd).ok());
        r.cmp(&l).then(ln.cmp(rn))
    });
    let mut infos = Vec::with_capacity(entries.len());
    let mut offset = 0usize;
    for (name, d, shape) in &entries {
        let n = shape.iter().product::<usize>() * d.size_in_bytes();
        infos.push((
            name.clone(),
            safetensors::tensor::TensorInfo {
                dtype: st_dtype(*d).map_err(ModelError::Input)?,
                shape: shape.clone(),
                data_offsets: (offset, offset + n),
            },
        ));
        offset += n;
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let metadata = safetensors::tensor::Metadata::new(Some(meta), infos)
        .map_err(|e| ModelError::Input(format!("safetensors: {e}")))?;
    let mut header = serde_json::to_string(&metadata)
        .map_err(|e| ModelError::Input(format!("safetensors header: {e}")))?
        .into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut head = (header.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(&header);
    Ok(StPlan {
        head,
        order: entries.into_iter().map(|(n, d, _)| (n, d)).collect(),
    })
}

fn st_dtype(d: DType) -> std::result::Result<safetensors::Dtype, String> {
    Ok(match d {
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
        DType::F32 => safetensors::Dtype::F32,
        DType::F64 => safetensors::Dtype::F64,
        DType::U8 => safetensors::Dtype::U8,
        DType::U32 => safetensors::Dtype::U32,
        DType::I64 => safetensors::Dtype::I64,
        other => return Err(format!("cannot save tensors of dtype {other:?}")),
    })
}

/// Streams named tensors as a safetensors file into `w`, one tensor at a time: at most one tensor's bytes are held
/// besides the tensors themselves, so saving a model does not need a second copy of its weights in memory.
/// Floating-point tensors are cast to `dtype`.
pub fn write_safetensors_to(
    w: &mut dyn Write,
    tensors: &HashMap<String, Tensor>,
    dtype: Option<DType>,
) -> Result<()> {
    let plan = plan_safetensors(tensors, dtype)?;
    stream_planned(w, &plan, tensors).map_err(|e| ModelError::Input(format!("safetensors: {e}")))
}

fn stream_planned(
    w: &mut dyn Write,
    plan: &StPlan,
    tensors: &HashMap<String, Tensor>,
) -> std::io::Result<()> {
    w.write_all(&plan.head)?;
    for (name, d) in &plan.order {
        let bad = |e: candle_core::Error| std::io::Error::other(format!("tensor `{name}`: {e}"));
        let mut t = tensors[name]
            .to_device(&candle_core::Device::Cpu)
            .map_err(bad)?;
        if t.dtype() != *d {
            t = t.to_dtype(*d).map_err(bad)?;
        }
        write_tensor_data(w, &t.flatten_all().map_err(bad)?).map_err(|e| match e {
            WriteError::Io(e) => e,
            WriteError::Candle(e) => bad(e),
        })?;
    }
    Ok(())
}

/// Writes named tensors as `path` (safetensors, atomically, streamed tensor by tensor).
pub fn write_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    dtype: Option<DType>,
) -> Result<()> {
    // Planned before the file is opened, so a bad dtype is reported as such, not as an I/O error.
    let plan = plan_safetensors(tensors, dtype)?;
    Ok(write_atomic_with(path, |w| {
        stream_planned(w, &plan, tensors)
    })?)
}

/// Serialises named tensors as safetensors bytes in memory (small tensors, tests); see [`write_safetensors_to`].
pub fn safetensors_bytes(
    tensors: &HashMap<String, Tensor>,
    dtype: Option<DType>,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    write_safetensors_to(&mut out, tensors, dtype)?;
    Ok(out)
}

enum WriteError {
    Io(std::io::Error),
    Candle(candle_core::Error),
}

/// Writes the little-endian bytes of a flat CPU tensor through a small buffer (no tensor-sized byte copy).
fn write_tensor_data(w: &mut dyn Write, flat: &Tensor) -> std::result::Result<(), WriteError> {
    fn put<T: Copy, const N: usize>(
        w: &mut dyn Write,
        v: &[T],
        le: impl Fn(T) -> [u8; N],
    ) -> std::result::Result<(), WriteError> {
        let mut buf = Vec::with_capacity(1 << 16);
        for chunk in v.chunks((1 << 16) / N) {
            buf.clear();
            for &x in chunk {
                buf.extend_from_slice(&le(x));
            }
            w.write_all(&buf).map_err(WriteError::Io)?;
        }
        Ok(())
    }
    let c = WriteError::Candle;
    match flat.dtype() {
        DType::F32 => put(w, &flat.to_vec1::<f32>().map_err(c)?, f32::to_le_bytes),
        DType::F64 => put(w, &flat.to_vec1::<f64>().map_err(c)?, f64::to_le_bytes),
        DType::BF16 => put(
            w,
            &flat.to_vec1::<half::bf16>().map_err(c)?,
            half::bf16::to_le_bytes,
        ),
        DType::F16 => put(
            w,
            &flat.to_vec1::<half::f16>().map_err(c)?,
            half::f16::to_le_bytes,
        ),
        DType::U8 => w
            .write_all(&flat.to_vec1::<u8>().map_err(c)?)
            .map_err(WriteError::Io),
        DType::U32 => put(w, &flat.to_vec1::<u32>().map_err(c)?, u32::to_le_bytes),
        DType::I64 => put(w, &flat.to_vec1::<i64>().map_err(c)?, i64::to_le_bytes),
        other => Err(WriteError::Io(std::io::Error::other(format!(
            "cannot save tensors of dtype {other:?}"
        )))),
    }
}

/// The files of a saved model (what [`save_pretrained`] writes), for linking them elsewhere.
pub const MODEL_FILES: &[&str] = &[
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Makes the model saved in `from` (by [`save_pretrained`]) appear in `to` too without writing it again: each
/// file is a hard link to `from`'s (a copy where hard links fail). Files are only ever replaced by rename, never
/// rewritten in place, so the two directories cannot change each other later.
pub fn link_pretrained(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| ModelError::io(to, e))?;
    for f in MODEL_FILES {
        let src = from.join(f);
        if src.exists() {
            link_or_copy(&src, &to.join(f))?;
        }
    }
    Ok(())
}

/// Saves weights, config, tokenizer and side files into `dir` (created if needed). `dtype` casts the saved
/// weights (`--save-dtype`); `None` keeps them as they are.
pub fn save_pretrained(
    dir: &Path,
    weights: &Weights,
    tokenizer: &TextTokenizer,
    side: &SideFiles,
    dtype: Option<DType>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    write_safetensors(&dir.join("model.safetensors"), weights.tensors(), dtype)?;
    let saved_dtype = dtype.unwrap_or_else(|| {
        weights
            .tensors()
            .values()
            .map(Tensor::dtype)
            .find(|d| d.is_float())
            .unwrap_or(DType::F32)
    });
    let mut config = side.config.clone();
    if let Value::Object(o) = &mut config {
        o.insert(
            "torch_dtype".into(),
            Value::String(dtype_name(saved_dtype).into()),
        );
    }
    write_json(&dir.join("config.json"), &config)?;
    let tok_json = tokenizer
        .inner()
        .to_string(false)
        .map_err(|e| ModelError::Tokenizer {
            path: dir.join("tokenizer.json"),
            msg: e.to_string(),
        })?;
    write_atomic(&dir.join("tokenizer.json"), tok_json.as_bytes())?;
    let gen = side.generation_config.clone().unwrap_or_else(|| {
        serde_json::json!({
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.stop_ids,
        })
    });
    write_json(&dir.join("generation_config.json"), &gen)?;
    if let Some(tc) = &side.tokenizer_config {
        write_json(&dir.join("tokenizer_config.json"), tc)?;
    }
    if let Some(sm) = &side.special_tokens_map {
        write_json(&dir.join("special_tokens_map.json"), sm)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn streamed_safetensors_equal_the_library_bytes() {
        let dev = Device::Cpu;
        let mut t = HashMap::new();
        t.insert(
            "b.weight".to_string(),
            Tensor::arange(0f32, 12.0, &dev)
                .unwrap()
                .reshape((3, 4))
                .unwrap(),
        );
        t.insert(
            "a.bias".to_string(),
            Tensor::new(&[0.5f32, -1.25], &dev).unwrap(),
        );
        t.insert("ids".to_string(), Tensor::new(&[7i64, 9], &dev).unwrap());
        t.insert("mask".to_string(), Tensor::new(&[1u8, 0, 1], &dev).unwrap());
        for dtype in [None, Some(DType::BF16), Some(DType::F16)] {
            // What the safetensors library itself writes (the bytes transformers loads).
            let owned: Vec<(String, Tensor)> = t
                .iter()
                .map(|(n, x)| {
                    let x = match dtype {
                        Some(d) if x.dtype().is_float() => x.to_dtype(d).unwrap(),
                        _ => x.clone(),
                    };
                    (n.clone(), x)
                })
                .collect();
            let bytes: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = owned
                .iter()
                .map(|(n, x)| {
                    let mut b = Vec::new();
                    write_tensor_data(&mut b, &x.flatten_all().unwrap())
                        .unwrap_or_else(|_| panic!("{n}"));
                    (
                        n.clone(),
                        st_dtype(x.dtype()).unwrap(),
                        x.dims().to_vec(),
                        b,
                    )
                })
                .collect();
            let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
                .iter()
                .map(|(n, d, s, b)| {
                    (
                        n.clone(),
                        safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                    )
                })
                .collect();
            let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
            let reference = safetensors::tensor::serialize(views, Some(meta)).unwrap();
            assert!(
                safetensors_bytes(&t, dtype).unwrap() == reference,
                "streamed bytes differ from safetensors::serialize for {dtype:?}"
            );
        }
    }
}
