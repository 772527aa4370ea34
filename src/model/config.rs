//! Model configs read from Hugging Face `config.json`; field names mirror transformers'.
//!
//! Both config generations are read: transformers < 5 keeps `rope_theta` / `rotary_pct` / `rope_scaling` at the top
//! level, transformers >= 5 nests them in `rope_parameters`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::error::{ModelError, Result};

/// The architectures this crate implements, by their `architectures[0]` name.
pub const SUPPORTED_ARCHITECTURES: &[&str] =
    &["LlamaForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM"];

/// The most positions a model has, from its raw `config.json` (or a GGUF's config), with the field it came from:
/// GPT-2's `n_positions` (a learned table: later positions have no embedding at all) or `max_position_embeddings`
/// (rotary models: the longest context they were trained for). `None` when the config names neither.
pub fn max_positions(raw: &Value) -> Option<(&'static str, usize)> {
    ["n_positions", "max_position_embeddings", "n_ctx"]
        .into_iter()
        .find_map(|key| Some((key, usize::try_from(raw.get(key)?.as_u64()?).ok()?)))
}

/// A pointwise activation named as in transformers' `ACT2FN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`.
    Silu,
    /// `gelu`: the exact erf form.
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `relu`.
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu" => Some(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }
}

/// How rotary frequencies are rescaled for long contexts (`rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// No rescaling.
    None,
    /// `linear`: positions are divided by `factor`.
    Linear { factor: f64 },
    /// `llama3`: low frequencies divided by `factor`, a smooth ramp between the two wavelength bounds.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Rotary position embedding parameters shared by LLaMA and GPT-NeoX.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base of the inverse frequencies (`rope_theta`, `rotary_emb_base`).
    pub theta: f64,
    /// Number of leading head dimensions that are rotated (even).
    pub rotary_dim: usize,
    /// Frequency rescaling.
    pub scaling: RopeScaling,
}

/// `LlamaForCausalLM` config.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub hidden_act: Activation,
    pub attention_dropout: f64,
}

/// `GPT2LMHeadModel` config.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_positions: usize,
    pub n_inner: usize,
    pub layer_norm_epsilon: f64,
    pub activation: Activation,
    pub scale_attn_weights: bool,
    pub scale_attn_by_inverse_layer_idx: bool,
    pub resid_pdrop: f64,
    pub embd_pdrop: f64,
    pub attn_pdrop: f64,
}

/// `GPTNeoXForCausalLM` config (Pythia).
#[derive(Debug, Clone, PartialEq)]
pub struct GptNeoxConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub layer_norm_eps: f64,
    pub rope: RopeConfig,
    pub use_parallel_residual: bool,
    pub hidden_act: Activation,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub hidden_dropout: f64,
    pub attention_dropout: f64,
}

/// A parsed model config.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Llama(LlamaConfig),
    Gpt2(Gpt2Config),
    GptNeox(GptNeoxConfig),
}

impl ModelConfig {
    /// Reads and parses `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ModelError::MissingFile {
                    path: path.to_path_buf(),
                    what: "the model config".into(),
                }
            } else {
                ModelError::io(path, e)
            }
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: path.to_path_buf(),
            msg: format!("invalid JSON: {e}"),
        })?;
        Self::from_value(&value, path)
    }

    /// Parses a config already read as JSON; `path` is only used in error messages.
    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        let r = Reader { v: value, path };
        let arch = match value.get("architectures").and_then(|a| a.get(0)) {
            Some(Value::String(s)) => s.clone(),
            _ => match r.opt_str("model_type")? {
                Some(t) => match t.as_str() {
                    "llama" => "LlamaForCausalLM".to_string(),
                    "gpt2" => "GPT2LMHeadModel".to_string(),
                    "gpt_neox" => "GPTNeoXForCausalLM".to_string(),
                    other => other.to_string(),
                },
                None => {
                    return Err(ModelError::Config {
                        path: path.to_path_buf(),
                        field: "architectures".into(),
                        msg: "missing (and no `model_type` to fall back on)".into(),
                    })
                }
            },
        };
        match arch.as_str() {
            "LlamaForCausalLM" => Ok(Self::Llama(parse_llama(&r)?)),
            "GPT2LMHeadModel" => Ok(Self::Gpt2(parse_gpt2(&r)?)),
            "GPTNeoXForCausalLM" => Ok(Self::GptNeox(parse_neox(&r)?)),
            _ => Err(ModelError::UnknownArchitecture {
                path: path.to_path_buf(),
                arch,
                supported: SUPPORTED_ARCHITECTURES.join(", "),
            }),
        }
    }

    /// Vocabulary size of the output layer.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Llama(c) => c.vocab_size,
            Self::Gpt2(c) => c.vocab_size,
            Self::GptNeox(c) => c.vocab_size,
        }
    }

    /// Width of the hidden states fed to the output layer.
    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Llama(c) => c.hidden_size,
            Self::Gpt2(c) => c.n_embd,
            Self::GptNeox(c) => c.hidden_size,
        }
    }

    /// Whether the output layer shares the token embedding matrix.
    pub fn tie_word_embeddings(&self) -> bool {
        match self {
            Self::Llama(c) => c.tie_word_embeddings,
            Self::Gpt2(_) => true,
            Self::GptNeox(c) => c.tie_word_embeddings,
        }
    }
}

/// Typed access to config fields with errors naming the file and field (also used by the reward-model configs).
pub(crate) struct Reader<'a> {
    pub(crate) v: &'a Value,
    pub(crate) path: &'a Path,
}

impl Reader<'_> {
    pub(crate) fn err(&self, field: &str, msg: impl Into<String>) -> ModelError {
        ModelError::Config {
            path: PathBuf::from(self.path),
            field: field.to_string(),
            msg: msg.into(),
        }
    }

    pub(crate) fn get(&self, field: &str) -> Option<&Value> {
        self.v.get(field).filter(|v| !v.is_null())
    }

    pub(crate) fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                self.err(field, format!("expected a non-negative integer, got {v}"))
            }),
        }
    }

    pub(crate) fn usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?
            .ok_or_else(|| self.err(field, "missing"))
    }

    pub(crate) fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a number, got {v}"))),
        }
    }

    pub(crate) fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected true or false, got {v}"))),
        }
    }

    pub(crate) fn opt_str(&self, field: &str) -> Result<Option<String>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| self.err(field, format!("expected a string, got {v}"))),
        }
    }

    pub(crate) fn activation(&self, field: &str, default: &str) -> Result<Activation> {
        let name = self.opt_str(field)?.unwrap_or_else(|| default.to_string());
        Activation::parse(&name).ok_or_else(|| {
            self.err(
                field,
                format!("unsupported activation {name:?} (supported: silu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu)"),
            )
        })
    }

    /// `rope_parameters` (transformers >= 5) as a sub-reader, if present.
    fn rope_parameters(&self) -> Option<Reader<'_>> {
        self.get("rope_parameters")
            .filter(|v| v.is_object())
            .map(|v| Reader { v, path: self.path })
    }

    /// The rope base: `rope_parameters.rope_theta`, then the given top-level keys. Absent everywhere is an error:
    /// a silent default would give wrong log-probs for models trained with another base.
    fn rope_theta(&self, top_level: &[&str]) -> Result<f64> {
        if let Some(rp) = self.rope_parameters() {
            if let Some(t) = rp.opt_f64("rope_theta")? {
                return Ok(t);
            }
        }
        for key in top_level {
            if let Some(t) = self.opt_f64(key)? {
                return Ok(t);
            }
        }
        Err(self.err(
            top_level[0],
            "missing: the rotary base is needed (neither `rope_parameters.rope_theta` nor a top-level key is present)",
        ))
    }

    fn rope_scaling(&self) -> Result<RopeScaling> {
        // transformers >= 5 puts the scaling type next to rope_theta in rope_parameters.
        let (sub, field) = match self.rope_parameters() {
            Some(rp) => (Some(rp), "rope_parameters"),
            None => (
                self.get("rope_scaling")
                    .filter(|v| v.is_object())
                    .map(|v| Reader { v, path: self.path }),
                "rope_scaling",
            ),
        };
        let Some(s) = sub else {
            return Ok(RopeScaling::None);
        };
        let kind = match s.opt_str("rope_type")? {
            Some(k) => k,
            None => s.opt_str("type")?.unwrap_or_else(|| "default".into()),
        };
        let factor = |s: &Reader| {
            s.opt_f64("factor")?
                .ok_or_else(|| self.err(&format!("{field}.factor"), "missing"))
        };
        match kind.as_str() {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear {
                factor: factor(&s)?,
            }),
            "llama3" => {
                let need = |k: &str| {
                    s.opt_f64(k)?
                        .ok_or_else(|| self.err(&format!("{field}.{k}"), "missing"))
                };
                Ok(RopeScaling::Llama3 {
                    factor: factor(&s)?,
                    low_freq_factor: need("low_freq_factor")?,
                    high_freq_factor: need("high_freq_factor")?,
                    original_max_position_embeddings: need("original_max_position_embeddings")?,
                })
            }
            other => Err(self.err(
                field,
                format!(
                    "unsupported rope scaling type {other:?} (supported: default, linear, llama3)"
                ),
            )),
        }
    }
}

fn parse_llama(r: &Reader) -> Result<LlamaConfig> {
    let hidden_size = r.usize("hidden_size")?;
    let num_attention_heads = r.usize("num_attention_heads")?;
    let head_dim = r
        .opt_usize("head_dim")?
        .unwrap_or(hidden_size / num_attention_heads.max(1));
    let num_key_value_heads = r
        .opt_usize("num_key_value_heads")?
        .unwrap_or(num_attention_heads);
    if num_attention_heads == 0
        || num_key_value_heads == 0
        || num_attention_heads % num_key_value_heads != 0
    {
        return Err(r.err(
            "num_key_value_heads",
            format!(
                "{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"
            ),
        ));
    }
    let partial = match r.rope_parameters() {
        Some(rp) => rp.opt_f64("partial_rotary_factor")?,
        None => r.opt_f64("partial_rotary_factor")?,
    }
    .unwrap_or(1.0);
    let partial = rotary_fraction(r, "partial_rotary_factor", partial)?;
    let rotary_dim = ((head_dim as f64 * partial) as usize) & !1;
    Ok(LlamaConfig {
        vocab_size: r.usize("vocab_size")?,
        hidden_size,
        intermediate_size: r.usize("intermediate_size")?,
        num_hidden_layers: r.usize("num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: r.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
        rope: RopeConfig {
            theta: r.rope_theta(&["rope_theta"])?,
            rotary_dim,
            scaling: r.rope_scaling()?,
        },
        tie_word_embeddings: r.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        attention_bias: r.opt_bool("attention_bias")?.unwrap_or(false),
        mlp_bias: r.opt_bool("mlp_bias")?.unwrap_or(false),
        hidden_act: r.activation("hidden_act", "silu")?,
        attention_dropout: r.opt_f64("attention_dropout")?.unwrap_or(0.0),
    })
}

fn parse_gpt2(r: &Reader) -> Result<Gpt2Config> {
    let n_embd = r.usize("n_embd")?;
    if r.opt_bool("add_cross_attention")?.unwrap_or(false) {
        return Err(r.err(
            "add_cross_attention",
            "cross-attention GPT-2 is not supported",
        ));
    }
    Ok(Gpt2Config {
        vocab_size: r.usize("vocab_size")?,
        n_embd,
        n_layer: r.usize("n_layer")?,
        n_head: r.usize("n_head")?,
        n_positions: r.usize("n_positions")?,
        n_inner: r.opt_usize("n_inner")?.unwrap_or(4 * n_embd),
        layer_norm_epsilon: r.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5),
        activation: r.activation("activation_function", "gelu_new")?,
        scale_attn_weights: r.opt_bool("scale_attn_weights")?.unwrap_or(true),
        scale_attn_by_inverse_layer_idx: r
            .opt_bool("scale_attn_by_inverse_layer_idx")?
            .unwrap_or(false),
        resid_pdrop: r.opt_f64("resid_pdrop")?.unwrap_or(0.1),
        embd_pdrop: r.opt_f64("embd_pdrop")?.unwrap_or(0.1),
        attn_pdrop: r.opt_f64("attn_pdrop")?.unwrap_or(0.1),
    })
}

/// The fraction of each head that rope rotates, checked to lie in [0, 1]: it sizes the rope tables, and a corrupt
/// value such as 1e308 would make `head_dim × fraction` saturate to `usize::MAX` and the table allocation abort.
fn rotary_fraction(r: &Reader, field: &str, p: f64) -> Result<f64> {
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        // Scientific notation for large values: `{}` writes 1e308 with all its 309 digits.
        let shown = if p.abs() >= 1e6 {
            format!("{p:e}")
        } else {
            p.to_string()
        };
        Err(r.err(
            field,
            format!("{shown} is not a fraction of the head dimension in [0, 1]"),
        ))
    }
}

fn parse_neox(r: &Reader) -> Result<GptNeoxConfig> {
    let hidden_size = r.usize("hidden_size")?;
    let heads = r.usize("num_attention_heads")?;
    if heads == 0 || hidden_size % heads != 0 {
        return Err(r.err(
            "num_attention_heads",
            format!("{heads} does not divide hidden_size = {hidden_size}"),
        ));
    }
    let head_dim = hidden_size / heads;
    let pct = match r
        .rope_parameters()
        .map(|rp| rp.opt_f64("partial_rotary_factor"))
    {
        Some(Ok(Some(p))) => p,
        Some(Err(e)) => return Err(e),
        _ => r.opt_f64("rotary_pct")?.unwrap_or(0.25),
    };
    let pct = rotary_fraction(r, "rotary_pct (or partial_rotary_factor)", pct)?;
    Ok(GptNeoxConfig {
        vocab_size: r.usize("vocab_size")?,
        hidden_size,
        intermediate_size: r.usize("intermediate_size")?,
        num_hidden_layers: r.usize("num_hidden_layers")?,
        num_attention_heads: heads,
        layer_norm_eps: r.opt_f64("layer_norm_eps")?.unwrap_or(1e-5),
        rope: RopeConfig {
            theta: r.rope_theta(&["rotary_emb_base", "rope_theta"])?,
            rotary_dim: (head_dim as f64 * pct) as usize,
            scaling: r.rope_scaling()?,
        },
        use_parallel_residual: r.opt_bool("use_parallel_residual")?.unwrap_or(true),
        hidden_act: r.activation("hidden_act", "gelu")?,
        tie_word_embeddings: r.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        attention_bias: r.opt_bool("attention_bias")?.unwrap_or(true),
        hidden_dropout: r.opt_f64("hidden_dropout")?.unwrap_or(0.0),
        attention_dropout: r.opt_f64("attention_dropout")?.unwrap_or(0.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_value(&v, Path::new("cfg/config.json"))
    }

    fn llama_base() -> Value {
        json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
               "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2})
    }

    #[test]
    fn rope_theta_is_read_from_both_config_generations() {
        let mut old = llama_base();
        old["rope_theta"] = json!(500000.0);
        let mut new = llama_base();
        new["rope_parameters"] = json!({"rope_theta": 500000.0, "rope_type": "default"});
        for v in [old, new] {
            let ModelConfig::Llama(c) = parse(v).unwrap() else {
                panic!()
            };
            assert_eq!(c.rope.theta, 500000.0);
            assert_eq!(c.rope.scaling, RopeScaling::None);
        }
    }

    #[test]
    fn missing_rope_theta_is_an_error_not_a_default() {
        let err = parse(llama_base()).unwrap_err().to_string();
        assert!(
            err.contains("cfg/config.json") && err.contains("rope_theta"),
            "{err}"
        );
    }

    #[test]
    fn rotary_fraction_outside_zero_one_is_refused_before_sizing_rope_tables() {
        let mut neox = json!({"architectures": ["GPTNeoXForCausalLM"], "vocab_size": 10, "hidden_size": 16,
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "rotary_emb_base": 1e4});
        neox["rotary_pct"] = json!(1e308);
        let err = parse(neox).unwrap_err().to_string();
        assert!(
            err.contains("cfg/config.json") && err.contains("rotary_pct") && err.contains("[0, 1]"),
            "{err}"
        );
        let mut llama = llama_base();
        llama["rope_theta"] = json!(1e4);
        llama["partial_rotary_factor"] = json!(-2.0);
        let err = parse(llama).unwrap_err().to_string();
        assert!(err.contains("partial_rotary_factor"), "{err}");
    }

    #[test]
    fn neox_partial_rotary_from_both_generations() {
        let base = json!({"architectures": ["GPTNeoXForCausalLM"], "vocab_size": 10, "hidden_size": 16,
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2});
        let mut old = base.clone();
        old["rotary_pct"] = json!(0.5);
        old["rotary_emb_base"] = json!(1000.0);
        let mut new = base;
        new["rope_parameters"] =
            json!({"rope_theta": 1000.0, "rope_type": "default", "partial_rotary_factor": 0.5});
        for v in [old, new] {
            let ModelConfig::GptNeox(c) = parse(v).unwrap() else {
                panic!()
            };
            assert_eq!(c.rope.rotary_dim, 4);
            assert_eq!(c.rope.theta, 1000.0);
        }
    }

    #[test]
    fn llama3_scaling_is_parsed() {
        let mut v = llama_base();
        v["rope_theta"] = json!(10000.0);
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let ModelConfig::Llama(c) = parse(v).unwrap() else {
            panic!()
        };
        assert!(matches!(c.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn unknown_architecture_names_file_and_value() {
        let err = parse(json!({"architectures": ["MambaForCausalLM"]}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cfg/config.json") && err.contains("MambaForCausalLM"),
            "{err}"
        );
    }

    #[test]
    fn unsupported_rope_type_is_rejected() {
        let mut v = llama_base();
        v["rope_theta"] = json!(10000.0);
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let err = parse(v).unwrap_err().to_string();
        assert!(err.contains("yarn"), "{err}");
    }
}
