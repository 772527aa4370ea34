//! Loading a model from a Hugging Face directory or a GGUF file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::causal_lm::CausalLm;
use super::config::ModelConfig;
use super::error::{ModelError, Result};
use super::gguf::load_gguf;
use super::tokenizer::{SideFiles, TextTokenizer};
use super::weights::Weights;

/// A model ready to run: the network, its tokenizer, and the side files to carry into a saved copy.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub model: CausalLm,
    pub tokenizer: TextTokenizer,
    pub side: SideFiles,
    /// The directory or file it was read from.
    pub source: PathBuf,
}

impl LoadedModel {
    /// Refuses a `--max-len` longer than the positions a learned-position model (GPT-2) can embed, before any model
    /// work: the first long record would otherwise fail deep in the embedding with an index error.
    pub fn check_max_len(&self, max_len: usize) -> Result<()> {
        match self.model.max_positions() {
            Some(n) if max_len > n => Err(ModelError::Config {
                path: self.source.clone(),
                field: "n_positions".into(),
                msg: format!(
                    "the model embeds at most {n} positions but --max-len is {max_len}: pass --max-len {n} or less"
                ),
            }),
            _ => Ok(()),
        }
    }
}

/// The flags of every command that loads a model: `--model`, `--device`, `--dtype`.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct ModelArgs {
    /// A Hugging Face model directory or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: crate::device::DeviceSpec,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: crate::device::DTypeSpec,
}

impl ModelArgs {
    /// Opens the device and loads the model.
    pub fn load(&self) -> Result<(LoadedModel, Device)> {
        let device = self.device.open()?;
        let m = load_model(&self.model, &device, self.dtype.dtype())?;
        Ok((m, device))
    }
}

/// Whether `path` names a GGUF file (by extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// A JSON file's value, `None` when the file does not exist.
pub(crate) fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ModelError::Json {
                path: path.to_path_buf(),
                msg: format!("invalid JSON: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ModelError::io(path, e)),
    }
}

/// Loads a model directory (`config.json`, safetensors, `tokenizer.json`) or a `.gguf` file; floating-point
/// weights are converted to `dtype` on `device`.
pub fn load_model(path: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    if is_gguf(path) {
        return load_gguf_model(path, device, dtype);
    }
    if !path.exists() {
        return Err(ModelError::MissingFile {
            path: path.to_path_buf(),
            what: "the model (a Hugging Face directory or a .gguf file)".into(),
        });
    }
    let config_path = path.join("config.json");
    let raw = read_json_opt(&config_path)?.ok_or_else(|| ModelError::MissingFile {
        path: config_path.clone(),
        what: "the model config".into(),
    })?;
    let config = ModelConfig::from_value(&raw, &config_path)?;
    let side = SideFiles {
        config: raw,
        tokenizer_config: read_json_opt(&path.join("tokenizer_config.json"))?,
        generation_config: read_json_opt(&path.join("generation_config.json"))?,
        special_tokens_map: read_json_opt(&path.join("special_tokens_map.json"))?,
    };
    let weights = Weights::from_dir(path, dtype, device)?;
    let weights = normalise_names(&config, weights);
    let model = CausalLm::new(config, weights)?;
    let tokenizer = TextTokenizer::from_file(&path.join("tokenizer.json"), &side)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        side,
        source: path.to_path_buf(),
    })
}

fn load_gguf_model(path: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let g = load_gguf(path, device)?;
    let config = ModelConfig::from_value(&g.config, path)?;
    let weights = Weights::new(g.tensors, path.display().to_string()).to_dtype(dtype)?;
    let mut raw = g.config;
    raw["torch_dtype"] = Value::String(dtype_name(dtype).into());
    let side = SideFiles {
        config: raw,
        tokenizer_config: Some(g.tokenizer_config),
        generation_config: Some(g.generation_config),
        special_tokens_map: None,
    };
    let tokenizer = TextTokenizer::new(g.tokenizer, path, &side)?;
    let model = CausalLm::new(config, weights)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        side,
        source: path.to_path_buf(),
    })
}

/// transformers' name for a dtype (`torch_dtype` in config.json).
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// Puts weights under the names transformers' `*ForCausalLM` classes save, and drops non-parameter buffers
/// (rotary tables, causal-mask buffers) and head copies of tied embeddings, so that the weights are exactly the
/// trainable parameters.
fn normalise_names(config: &ModelConfig, weights: Weights) -> Weights {
    let tied = config.tie_word_embeddings();
    let source = weights.source().to_string();
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in weights.tensors() {
        let is_buffer = name.ends_with("rotary_emb.inv_freq")
            || name.ends_with(".attn.bias")
            || name.ends_with(".attn.masked_bias")
            || name.ends_with(".attention.bias")
            || name.ends_with(".attention.masked_bias");
        let is_tied_head = tied && (name == "lm_head.weight" || name == "embed_out.weight");
        if is_buffer || is_tied_head {
            continue;
        }
        let name = match config {
            // Original OpenAI GPT-2 checkpoints store the body without the `transformer.` prefix.
            ModelConfig::Gpt2(_)
                if !name.starts_with("transformer.") && name != "lm_head.weight" =>
            {
                format!("transformer.{name}")
            }
            _ => name.clone(),
        };
        out.insert(name, t.clone());
    }
    Weights::new(out, source)
}
