//! Saving a model in Hugging Face layout so that `AutoModelForCausalLM.from_pretrained(dir)` loads it unchanged.
//!
//! Every file is written to a temporary name and renamed into place, so a crash never leaves a half-written file.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::Value;

use super::error::{ModelError, Result};
use super::load::dtype_name;
use super::tokenizer::{SideFiles, TextTokenizer};
use super::weights::Weights;

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| ModelError::io(&tmp, e))?;
    f.sync_all().map_err(|e| ModelError::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    write_atomic(path, format!("{text}\n").as_bytes())
}

fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
        DType::F64 => safetensors::Dtype::F64,
        DType::U8 => safetensors::Dtype::U8,
        DType::U32 => safetensors::Dtype::U32,
        DType::I64 => safetensors::Dtype::I64,
        _ => safetensors::Dtype::F32,
    }
}

/// Serialises named tensors as safetensors bytes with transformers' `format: pt` metadata; floating-point
/// tensors are cast to `dtype`.
pub fn safetensors_bytes(
    tensors: &HashMap<String, Tensor>,
    dtype: Option<DType>,
) -> Result<Vec<u8>> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in names {
        let mut t = tensors[name].to_device(&candle_core::Device::Cpu)?;
        if let Some(d) = dtype {
            if t.dtype().is_float() && t.dtype() != d {
                t = t.to_dtype(d)?;
            }
        }
        let t = t.contiguous()?;
        let bytes = tensor_bytes(&t)?;
        owned.push((name.clone(), st_dtype(t.dtype()), t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| ModelError::Input(format!("tensor `{n}`: {e}")))
        })
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| ModelError::Input(format!("safetensors: {e}")))
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F64 => flat
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::U8 => flat.to_vec1::<u8>()?,
        DType::U32 => flat
            .to_vec1::<u32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::I64 => flat
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        other => {
            return Err(ModelError::Input(format!(
                "cannot save tensors of dtype {other:?}"
            )))
        }
    })
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
    let bytes = safetensors_bytes(weights.tensors(), dtype)?;
    write_atomic(&dir.join("model.safetensors"), &bytes)?;
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
