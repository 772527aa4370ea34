//! Named weights under Hugging Face names, read from (sharded) safetensors, with shape-checked lookup.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use super::error::{ModelError, Result};

/// A set of named tensors plus a description of where they came from, for error messages.
#[derive(Debug, Clone)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    source: String,
}

impl Weights {
    /// Wraps tensors already in memory; `source` names their origin in errors.
    pub fn new(tensors: HashMap<String, Tensor>, source: impl Into<String>) -> Self {
        Self {
            tensors,
            source: source.into(),
        }
    }

    /// Where these weights came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// All tensors by name.
    pub fn tensors(&self) -> &HashMap<String, Tensor> {
        &self.tensors
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, which must have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                source_desc: self.source.clone(),
                name: name.to_string(),
            })?;
        if t.dims() != shape {
            return Err(ModelError::ShapeMismatch {
                source_desc: self.source.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        Ok(t.clone())
    }

    /// Reads `model.safetensors`, or the shards listed in `model.safetensors.index.json`, from a model directory.
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            shard_files(&index)?
        } else {
            return Err(ModelError::MissingFile {
                path: single,
                what: "model weights (neither model.safetensors nor model.safetensors.index.json exists)"
                    .into(),
            });
        };
        let mut tensors = HashMap::new();
        for f in &files {
            tensors.extend(read_safetensors(f, dtype, device)?);
        }
        let source = if files.len() == 1 {
            files[0].display().to_string()
        } else {
            format!("{} ({} shards)", index.display(), files.len())
        };
        Ok(Self::new(tensors, source))
    }

    /// Converts every floating-point tensor to `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let mut tensors = HashMap::with_capacity(self.tensors.len());
        for (k, v) in &self.tensors {
            let v = if v.dtype().is_float() && v.dtype() != dtype {
                v.to_dtype(dtype)?
            } else {
                v.clone()
            };
            tensors.insert(k.clone(), v);
        }
        Ok(Self::new(tensors, self.source.clone()))
    }

    /// Makes every floating-point tensor a trainable variable; returns the variables by name and weights that
    /// share their storage (so a model built from them sees optimizer updates and records gradients).
    pub fn to_vars(&self) -> Result<(Self, Vec<(String, Var)>)> {
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        let mut vars = Vec::with_capacity(names.len());
        let mut tensors = HashMap::with_capacity(names.len());
        for name in names {
            let t = &self.tensors[name];
            if !t.dtype().is_float() {
                tensors.insert(name.clone(), t.clone());
                continue;
            }
            let v = Var::from_tensor(t)?;
            tensors.insert(name.clone(), v.as_tensor().clone());
            vars.push((name.clone(), v));
        }
        Ok((Self::new(tensors, self.source.clone()), vars))
    }
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: index.to_path_buf(),
        msg: format!("invalid JSON: {e}"),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Json {
            path: index.to_path_buf(),
            msg: "missing object field `weight_map`".into(),
        })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = Vec::new();
    for (name, f) in map {
        let f = f.as_str().ok_or_else(|| ModelError::Json {
            path: index.to_path_buf(),
            msg: format!("weight_map[{name:?}] is not a file name"),
        })?;
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
    }
    files.sort();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Reads one safetensors file; floating-point tensors are converted to `dtype`.
pub fn read_safetensors(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let file = std::fs::File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ModelError::MissingFile {
                path: path.to_path_buf(),
                what: "a weight shard".into(),
            }
        } else {
            ModelError::io(path, e)
        }
    })?;
    // Mapped, not read: a checkpoint is then held in memory once (as tensors), not twice, while it loads.
    // SAFETY: the map is only read and is dropped before this function returns; the file must not be truncated
    // meanwhile (as with any memory-mapped checkpoint loader).
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, device).map_err(|e| {
            ModelError::Safetensors {
                path: path.to_path_buf(),
                msg: format!("tensor `{name}`: {e}"),
            }
        })?;
        let t = if t.dtype().is_float() && t.dtype() != dtype {
            t.to_dtype(dtype)?
        } else {
            t
        };
        out.insert(name, t);
    }
    Ok(out)
}
