//! Reward models: Hugging Face sequence classifiers and the Dahoas/gptj-rm-static layout.
//!
//! - `LlamaForSequenceClassification`, `GPT2ForSequenceClassification`, `GPTNeoXForSequenceClassification`,
//!   `GPTJForSequenceClassification`: the causal body plus a bias-free `score` head, read at the last token whose id
//!   is not `config.pad_token_id` (transformers' rule; the last token when the config has no pad id).
//! - The Dahoas/gptj-rm-static layout (GPT-J body `transformer.*` + bias-free `v_head`, as trlx loads it): the reward
//!   is read at the first EOS. The checkpoint is a PyTorch pickle (`.pt`) without config or tokenizer: those come
//!   from explicit paths. A decoder of any supported family with a `v_head` is read the same way.
//! - `BertForSequenceClassification` (tanh pooler) and `DistilBertForSequenceClassification` (`pre_classifier` +
//!   ReLU): logits from `[CLS]`.
//!
//! Decoder inputs are truncated on the left (the end of a dialogue holds the response; BOS kept), encoder inputs on
//! the right (the trailing `[SEP]` kept), as the respective tokenizers are used.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::bert::{BertClassifier, BertConfig, DistilBertClassifier, DistilBertConfig};
use super::causal_lm::CausalLm;
use super::config::{ModelConfig, Reader};
use super::error::{ModelError, Result};
use super::gpt_j::{GptJ, GptJConfig};
use super::input::Input;
use super::load::read_json_opt;
pub use super::pickle::read_pickle;
use super::pickle::{is_buffer, is_pickle};
use super::tokenizer::left_truncate_keeping_bos;
use super::tokenizer::{SideFiles, TextTokenizer};
use super::weights::{read_safetensors, Weights};

/// Longest input of the Dahoas/gptj-rm-static layout (trlx truncates to the gpt2 tokenizer's 1024).
pub const GPTJ_RM_MAX_LEN: usize = 1024;

/// The architectures [`load_reward_model`] reads.
pub const SUPPORTED_REWARD_ARCHITECTURES: &[&str] = &[
    "LlamaForSequenceClassification",
    "GPT2ForSequenceClassification",
    "GPTNeoXForSequenceClassification",
    "GPTJForSequenceClassification",
    "GPT-J + v_head (Dahoas/gptj-rm-static; config GPTJForCausalLM / model_type gptj)",
    "BertForSequenceClassification",
    "DistilBertForSequenceClassification",
];

/// Where the reward is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readout {
    /// The last position whose id is not this pad id (the last position when `None`): transformers'
    /// `*ForSequenceClassification`.
    LastNonPad(Option<u32>),
    /// The first position holding this EOS id (the last position when there is none): the Dahoas/trlx reward model.
    FirstEos(u32),
    /// The first position (`[CLS]`), BERT-style classifiers.
    First,
}

/// Which side of a too-long input is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// Keep the end (and a leading BOS).
    Left,
    /// Keep the start (and the trailing special token).
    Right,
}

#[derive(Debug, Clone)]
enum Body {
    /// A causal body with its head `[num_labels, hidden]` (`score.weight` or `v_head.weight`).
    Decoder(Box<CausalLm>, Tensor),
    GptJ(Box<GptJ>, Tensor),
    Bert(Box<BertClassifier>),
    DistilBert(Box<DistilBertClassifier>),
}

/// Explicit paths for checkpoints that ship without their config or tokenizer (Dahoas/gptj-rm-static).
#[derive(Debug, Clone, Default)]
pub struct RewardLoadOptions {
    /// `config.json` (default: beside the weights).
    pub config: Option<PathBuf>,
    /// `tokenizer.json` (default: beside the weights).
    pub tokenizer: Option<PathBuf>,
    /// Longest input in tokens (default: the model's position limit; 1024 for the Dahoas layout).
    pub max_len: Option<usize>,
}

/// The tokenizer of a reward model with the special ids the input format needs.
#[derive(Debug, Clone)]
pub struct RewardTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
}

impl RewardTokenizer {
    /// Ids of `text` with the tokenizer's special tokens (BOS, or `[CLS]`/`[SEP]`), as `tokenizer(text)` gives.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer {
                path: self.path.clone(),
                msg: format!("encoding failed: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }
}

/// A loaded reward model.
#[derive(Debug, Clone)]
pub struct RewardModel {
    /// The architecture as named in messages (`architectures[0]`, or the Dahoas layout).
    pub arch: String,
    body: Body,
    pub tokenizer: RewardTokenizer,
    /// Label names by index (`id2label`; `LABEL_i` where absent).
    pub labels: Vec<String>,
    pub readout: Readout,
    pub truncation: Truncation,
    /// Longest input in tokens.
    pub max_len: usize,
    /// Whether this is the Dahoas/gptj-rm-static layout (`prompt + " " + response + eos`, first EOS).
    pub value_head: bool,
    device: Device,
}

impl RewardModel {
    /// Number of outputs of the head.
    pub fn num_labels(&self) -> usize {
        self.labels.len()
    }

    /// Index of a label given by name (exact, then case-insensitive), by `LABEL_i` or by number.
    pub fn label_index(&self, name: &str) -> Result<usize> {
        if let Some(i) = self.labels.iter().position(|l| l == name) {
            return Ok(i);
        }
        if let Some(i) = self
            .labels
            .iter()
            .position(|l| l.eq_ignore_ascii_case(name))
        {
            return Ok(i);
        }
        let num = name.strip_prefix("LABEL_").unwrap_or(name);
        if let Ok(i) = num.parse::<usize>() {
            if i < self.labels.len() {
                return Ok(i);
            }
        }
        Err(ModelError::Input(format!(
            "label {name:?} is not one of the model's labels ({})",
            self.labels.join(", ")
        )))
    }

    /// Token ids of `text` (with the tokenizer's special tokens, plus EOS when `append_eos`), truncated to
    /// `max_len` on the model's side.
    pub fn encode(&self, text: &str, append_eos: bool) -> Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode(text)?;
        if append_eos {
            let eos = self.tokenizer.eos_id.ok_or_else(|| {
                ModelError::Input(format!(
                    "{}: the tokenizer has no EOS token to append",
                    self.tokenizer.path.display()
                ))
            })?;
            ids.push(eos);
        }
        Ok(truncate(
            ids,
            self.max_len,
            self.truncation,
            self.tokenizer.bos_id,
        ))
    }

    /// The position the reward is read at in `ids`.
    pub fn readout_position(&self, ids: &[u32]) -> usize {
        let last = ids.len().saturating_sub(1);
        match self.readout {
            Readout::First => 0,
            Readout::FirstEos(eos) => ids.iter().position(|&x| x == eos).unwrap_or(last),
            Readout::LastNonPad(None) => last,
            // transformers: argmax(arange(T) * (ids != pad)), 0 when every id is the pad id.
            Readout::LastNonPad(Some(pad)) => ids.iter().rposition(|&x| x != pad).unwrap_or(0),
        }
    }

    /// Head outputs (f32) of each row of token ids, read at [`RewardModel::readout_position`].
    pub fn logits(&self, rows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(i) = rows.iter().position(Vec::is_empty) {
            return Err(ModelError::Input(format!("row {i} tokenised to no tokens")));
        }
        let at: Vec<usize> = rows.iter().map(|r| self.readout_position(r)).collect();
        let out = match &self.body {
            Body::Decoder(m, head) => causal_head_logits(m, head, rows, &at, &self.device)?,
            Body::GptJ(m, head) => {
                let input = Input::causal(rows, 0, &self.device)?;
                read_head(&m.hidden(&input)?, head, &at)?
            }
            Body::Bert(m) => m.logits(&encoder_input(rows, &self.device)?)?,
            Body::DistilBert(m) => m.logits(&encoder_input(rows, &self.device)?)?,
        };
        Ok(out.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }
}

/// Head outputs `[B, num_labels]` of a causal reward model: rows right-padded, `head · hidden[b, at[b]]`.
pub fn causal_head_logits(
    model: &CausalLm,
    head: &Tensor,
    rows: &[Vec<u32>],
    at: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let input = Input::causal(rows, 0, device)?;
    read_head(&model.hidden(&input)?, head, at)
}

/// `head · hidden[b, at[b]]` for every row, `[B, num_labels]`.
fn read_head(hidden: &Tensor, head: &Tensor, at: &[usize]) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    let idx: Vec<u32> = at
        .iter()
        .enumerate()
        .map(|(i, &p)| (i * t + p) as u32)
        .collect();
    let picked = hidden
        .reshape((b * t, h))?
        .index_select(&Tensor::new(idx.as_slice(), hidden.device())?, 0)?;
    Ok(picked.matmul(&head.t()?)?)
}

/// Drops tokens beyond `max_len`: `Left` keeps the end (and a leading BOS), `Right` the start (and the last token,
/// the `[SEP]` a BERT post-processor appends).
pub fn truncate(ids: Vec<u32>, max_len: usize, side: Truncation, bos: Option<u32>) -> Vec<u32> {
    if ids.len() <= max_len || max_len == 0 {
        return ids;
    }
    match side {
        // BOS is kept only when a token of the end fits beside it.
        Truncation::Left => left_truncate_keeping_bos(ids, max_len, bos.filter(|_| max_len > 1)),
        Truncation::Right => {
            let mut out = ids[..max_len - 1].to_vec();
            out.push(ids[ids.len() - 1]);
            out
        }
    }
}

/// Right-padded rows with positions 0.. and a bidirectional mask over each row's real tokens.
fn encoder_input(rows: &[Vec<u32>], device: &Device) -> Result<Input> {
    let b = rows.len();
    let t = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = vec![vec![0u32; t]; b];
    let mut pos = vec![vec![0u32; t]; b];
    let mut mask = vec![0u8; b * t * t];
    for (r, row) in rows.iter().enumerate() {
        ids[r][..row.len()].copy_from_slice(row);
        for (q, p) in pos[r].iter_mut().enumerate() {
            *p = q as u32;
        }
        for q in 0..t {
            mask[(r * t + q) * t..(r * t + q) * t + row.len()].fill(1);
        }
    }
    Input::from_host(&ids, &pos, &mask, device)
}

/// `id2label` names in index order, `LABEL_i` where absent; `n` entries.
fn labels(c: &Reader, n: usize) -> Vec<String> {
    let map = c.get("id2label").and_then(Value::as_object);
    (0..n)
        .map(|i| {
            map.and_then(|m| m.get(&i.to_string()))
                .and_then(Value::as_str)
                .map_or_else(|| format!("LABEL_{i}"), str::to_string)
        })
        .collect()
}

/// The model families, from `architectures[0]` (or `model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Llama,
    Gpt2,
    GptNeox,
    GptJ,
    Bert,
    DistilBert,
}

fn family(v: &Value, path: &Path) -> Result<(Family, String)> {
    let arch = v
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .map(str::to_string);
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    let name = arch.clone().unwrap_or_else(|| model_type.to_string());
    let fam = match (arch.as_deref(), model_type) {
        (Some(a), _) if a.starts_with("Llama") => Family::Llama,
        (Some(a), _) if a.starts_with("GPT2") => Family::Gpt2,
        (Some(a), _) if a.starts_with("GPTNeoX") => Family::GptNeox,
        (Some(a), _) if a.starts_with("GPTJ") => Family::GptJ,
        (Some(a), _) if a.starts_with("DistilBert") => Family::DistilBert,
        (Some(a), _) if a.starts_with("Bert") => Family::Bert,
        (None, "llama") => Family::Llama,
        (None, "gpt2") => Family::Gpt2,
        (None, "gpt_neox") => Family::GptNeox,
        (None, "gptj") => Family::GptJ,
        (None, "bert") => Family::Bert,
        (None, "distilbert") => Family::DistilBert,
        _ => {
            return Err(ModelError::UnknownArchitecture {
                path: path.to_path_buf(),
                arch: name,
                supported: SUPPORTED_REWARD_ARCHITECTURES.join(", "),
            })
        }
    };
    Ok((fam, name))
}

fn read_json(path: &Path, what: &str) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ModelError::MissingFile {
                path: path.to_path_buf(),
                what: what.into(),
            }
        } else {
            ModelError::io(path, e)
        }
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        msg: format!("invalid JSON: {e}"),
    })
}

/// The weight file(s) of `path`: a directory with (sharded) safetensors or one pickle, or a single file.
fn read_weights(path: &Path, dtype: DType, device: &Device) -> Result<Weights> {
    if path.is_dir() {
        if path.join("model.safetensors").exists()
            || path.join("model.safetensors.index.json").exists()
        {
            return Weights::from_dir(path, dtype, device);
        }
        let mut pickles: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| ModelError::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_pickle(p))
            .collect();
        pickles.sort();
        return match pickles.as_slice() {
            [one] => Ok(Weights::new(
                read_pickle(one, dtype, device)?,
                one.display().to_string(),
            )),
            [] => Err(ModelError::MissingFile {
                path: path.join("model.safetensors"),
                what: "reward model weights (no model.safetensors, index, or .pt/.pth/.bin file)"
                    .into(),
            }),
            many => Err(ModelError::Input(format!(
                "{}: several PyTorch pickles ({}); name the file instead of the directory",
                path.display(),
                many.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        };
    }
    if !path.exists() {
        return Err(ModelError::MissingFile {
            path: path.to_path_buf(),
            what: "the reward model (a directory, a .safetensors or a .pt file)".into(),
        });
    }
    let tensors = if is_pickle(path) {
        read_pickle(path, dtype, device)?
    } else {
        read_safetensors(path, dtype, device)?
    };
    Ok(Weights::new(tensors, path.display().to_string()))
}

/// Renames to the names the body constructors expect: `prefix.` on body tensors saved by a bare base model,
/// `LayerNorm.gamma/beta` of old BERT checkpoints; drops buffers.
fn normalise(weights: Weights, prefix: &str, heads: &[&str]) -> Weights {
    let source = weights.source().to_string();
    let mut out = HashMap::new();
    for (name, t) in weights.tensors() {
        if is_buffer(name) {
            continue;
        }
        let mut n = name
            .replace("LayerNorm.gamma", "LayerNorm.weight")
            .replace("LayerNorm.beta", "LayerNorm.bias");
        let is_head = heads.iter().any(|h| n.starts_with(h));
        if !is_head && !n.starts_with(&format!("{prefix}.")) {
            n = format!("{prefix}.{n}");
        }
        out.insert(n, t.clone());
    }
    Weights::new(out, source)
}

/// The head of a decoder reward model: `score.weight` (transformers) or `v_head.weight` (Dahoas / trlx).
fn decoder_head(w: &Weights, hidden: usize) -> Result<(Tensor, bool)> {
    for (name, value_head) in [("score.weight", false), ("v_head.weight", true)] {
        if let Some(t) = w.tensors().get(name) {
            if t.rank() != 2 || t.dim(1)? != hidden {
                return Err(ModelError::ShapeMismatch {
                    source_desc: w.source().to_string(),
                    name: name.into(),
                    expected: vec![t.dim(0).unwrap_or(1), hidden],
                    got: t.dims().to_vec(),
                });
            }
            return Ok((t.clone(), value_head));
        }
    }
    Err(ModelError::MissingTensor {
        source_desc: w.source().to_string(),
        name: "score.weight (or v_head.weight)".into(),
    })
}

/// Loads a reward model from a directory (config.json, weights, tokenizer.json) or a weight file, with optional
/// explicit config and tokenizer paths; weights in `dtype` on `device`.
pub fn load_reward_model(
    path: &Path,
    opts: &RewardLoadOptions,
    device: &Device,
    dtype: DType,
) -> Result<RewardModel> {
    let base = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let config_path = opts
        .config
        .clone()
        .unwrap_or_else(|| base.join("config.json"));
    let raw = read_json(
        &config_path,
        "the reward model config (give --rm-config for checkpoints that ship without one)",
    )?;
    let c = Reader {
        v: &raw,
        path: &config_path,
    };
    let (fam, arch) = family(&raw, &config_path)?;
    let weights = read_weights(path, dtype, device)?;

    let tok_path = opts
        .tokenizer
        .clone()
        .unwrap_or_else(|| base.join("tokenizer.json"));
    if !tok_path.exists() {
        return Err(ModelError::MissingFile {
            path: tok_path,
            what: "the reward model's tokenizer (give --rm-tokenizer)".into(),
        });
    }
    let tok_dir = tok_path.parent().unwrap_or(Path::new("."));
    let side = SideFiles {
        config: raw.clone(),
        tokenizer_config: read_json_opt(&tok_dir.join("tokenizer_config.json"))?,
        generation_config: None,
        special_tokens_map: read_json_opt(&tok_dir.join("special_tokens_map.json"))?,
    };
    let inner = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| ModelError::Tokenizer {
        path: tok_path.clone(),
        msg: e.to_string(),
    })?;
    let (bos_id, eos_id) = match fam {
        Family::Bert | Family::DistilBert => (None, None),
        _ => {
            let t = TextTokenizer::new(inner.clone(), &tok_path, &side)?;
            (t.bos_id, Some(t.eos_id))
        }
    };
    let tokenizer = RewardTokenizer {
        inner,
        path: tok_path,
        bos_id,
        eos_id,
    };
    let pad_id = c.opt_usize("pad_token_id")?.map(|x| x as u32);

    let (body, labels, readout, truncation, positions, value_head) = match fam {
        Family::Bert => {
            let cfg = BertConfig {
                vocab_size: c.usize("vocab_size")?,
                hidden_size: c.usize("hidden_size")?,
                num_hidden_layers: c.usize("num_hidden_layers")?,
                num_attention_heads: c.usize("num_attention_heads")?,
                intermediate_size: c.usize("intermediate_size")?,
                hidden_act: c.activation("hidden_act", "gelu")?,
                max_position_embeddings: c.usize("max_position_embeddings")?,
                type_vocab_size: c.opt_usize("type_vocab_size")?.unwrap_or(2),
                layer_norm_eps: c.opt_f64("layer_norm_eps")?.unwrap_or(1e-12),
            };
            if let Some(t) = c.opt_str("position_embedding_type")? {
                if t != "absolute" {
                    return Err(c.err(
                        "position_embedding_type",
                        format!("{t:?} is not supported (only absolute)"),
                    ));
                }
            }
            let w = normalise(weights, "bert", &["classifier."]);
            let n = label_count(&w, "classifier.weight")?;
            let m = BertClassifier::new(&cfg, n, &w)?;
            (
                Body::Bert(Box::new(m)),
                labels(&c, n),
                Readout::First,
                Truncation::Right,
                cfg.max_position_embeddings,
                false,
            )
        }
        Family::DistilBert => {
            let cfg = DistilBertConfig {
                vocab_size: c.usize("vocab_size")?,
                dim: c.usize("dim")?,
                n_layers: c.usize("n_layers")?,
                n_heads: c.usize("n_heads")?,
                hidden_dim: c.usize("hidden_dim")?,
                activation: c.activation("activation", "gelu")?,
                max_position_embeddings: c.usize("max_position_embeddings")?,
            };
            let w = normalise(weights, "distilbert", &["classifier.", "pre_classifier."]);
            let n = label_count(&w, "classifier.weight")?;
            let m = DistilBertClassifier::new(&cfg, n, &w)?;
            (
                Body::DistilBert(Box::new(m)),
                labels(&c, n),
                Readout::First,
                Truncation::Right,
                cfg.max_position_embeddings,
                false,
            )
        }
        Family::GptJ => {
            let n_embd = c.usize("n_embd")?;
            let n_head = c.usize("n_head")?;
            if n_head == 0 || n_embd % n_head != 0 {
                return Err(c.err(
                    "n_head",
                    format!("{n_head} does not divide n_embd = {n_embd}"),
                ));
            }
            let cfg = GptJConfig {
                vocab_size: c.usize("vocab_size")?,
                n_embd,
                n_layer: c.usize("n_layer")?,
                n_head,
                n_positions: c.usize("n_positions")?,
                rotary_dim: c.opt_usize("rotary_dim")?.unwrap_or(n_embd / n_head),
                n_inner: c.opt_usize("n_inner")?.unwrap_or(4 * n_embd),
                layer_norm_epsilon: c.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5),
                activation: c.activation("activation_function", "gelu_new")?,
            };
            if cfg.rotary_dim > cfg.head_dim() || !cfg.rotary_dim.is_multiple_of(2) {
                return Err(c.err(
                    "rotary_dim",
                    format!(
                        "{} must be even and at most the head dim {}",
                        cfg.rotary_dim,
                        cfg.head_dim()
                    ),
                ));
            }
            let w = normalise(weights, "transformer", &["v_head.", "score.", "lm_head."]);
            let (head, value_head) = decoder_head(&w, n_embd)?;
            let m = GptJ::new(&cfg, &w)?;
            let n = head.dim(0)?;
            let (readout, positions) = if value_head {
                (
                    Readout::FirstEos(eos_of(&tokenizer)?),
                    cfg.n_positions.min(GPTJ_RM_MAX_LEN),
                )
            } else {
                (Readout::LastNonPad(pad_id), cfg.n_positions)
            };
            (
                Body::GptJ(Box::new(m), head),
                labels(&c, n),
                readout,
                Truncation::Left,
                positions,
                value_head,
            )
        }
        Family::Llama | Family::Gpt2 | Family::GptNeox => {
            let (causal_name, prefix, head_name, positions_field) = match fam {
                Family::Llama => (
                    "LlamaForCausalLM",
                    "model",
                    "lm_head.weight",
                    "max_position_embeddings",
                ),
                Family::Gpt2 => ("GPT2LMHeadModel", "transformer", "", "n_positions"),
                _ => (
                    "GPTNeoXForCausalLM",
                    "gpt_neox",
                    "embed_out.weight",
                    "max_position_embeddings",
                ),
            };
            let mut as_causal = raw.clone();
            as_causal["architectures"] = Value::from(vec![causal_name]);
            let config = ModelConfig::from_value(&as_causal, &config_path)?;
            let w = normalise(
                weights,
                prefix,
                &["score.", "v_head.", "lm_head.", "embed_out."],
            );
            let (head, value_head) = decoder_head(&w, config.hidden_size())?;
            // The causal body wants an output layer it will not use: stand the embedding in for a missing one.
            let w =
                if !head_name.is_empty() && !config.tie_word_embeddings() && !w.contains(head_name)
                {
                    let embed = match fam {
                        Family::Llama => "model.embed_tokens.weight",
                        _ => "gpt_neox.embed_in.weight",
                    };
                    let mut t = w.tensors().clone();
                    if let Some(e) = t.get(embed).cloned() {
                        t.insert(head_name.to_string(), e);
                    }
                    Weights::new(t, w.source().to_string())
                } else {
                    w
                };
            let n = head.dim(0)?;
            let m = CausalLm::new(config, w)?;
            let readout = if value_head {
                Readout::FirstEos(eos_of(&tokenizer)?)
            } else {
                Readout::LastNonPad(pad_id)
            };
            let positions = c.opt_usize(positions_field)?.unwrap_or(usize::MAX);
            let positions = if value_head {
                positions.min(GPTJ_RM_MAX_LEN)
            } else {
                positions
            };
            (
                Body::Decoder(Box::new(m), head),
                labels(&c, n),
                readout,
                Truncation::Left,
                positions,
                value_head,
            )
        }
    };
    let arch = if value_head {
        format!("{arch} + v_head (Dahoas/gptj-rm-static layout)")
    } else {
        arch
    };
    Ok(RewardModel {
        arch,
        body,
        tokenizer,
        labels,
        readout,
        truncation,
        max_len: opts.max_len.unwrap_or(positions),
        value_head,
        device: device.clone(),
    })
}

fn eos_of(t: &RewardTokenizer) -> Result<u32> {
    t.eos_id.ok_or_else(|| {
        ModelError::Input(format!(
            "{}: the tokenizer has no EOS token, which the value-head layout reads the reward at",
            t.path.display()
        ))
    })
}

fn label_count(w: &Weights, name: &str) -> Result<usize> {
    let t = w
        .tensors()
        .get(name)
        .ok_or_else(|| ModelError::MissingTensor {
            source_desc: w.source().to_string(),
            name: name.into(),
        })?;
    Ok(t.dim(0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_truncation_keeps_bos_and_the_end() {
        let ids: Vec<u32> = (1..=10).collect();
        assert_eq!(
            truncate(ids.clone(), 4, Truncation::Left, Some(1)),
            vec![1, 8, 9, 10]
        );
        assert_eq!(
            truncate(ids.clone(), 4, Truncation::Left, None),
            vec![7, 8, 9, 10]
        );
        assert_eq!(
            truncate(ids.clone(), 4, Truncation::Right, None),
            vec![1, 2, 3, 10]
        );
        assert_eq!(truncate(ids.clone(), 10, Truncation::Left, None), ids);
    }

    #[test]
    fn family_from_architecture_or_model_type() {
        let p = Path::new("c.json");
        let f = |v: Value| family(&v, p).map(|x| x.0);
        assert_eq!(
            f(serde_json::json!({"architectures": ["GPTJForCausalLM"]})).unwrap(),
            Family::GptJ
        );
        assert_eq!(
            f(serde_json::json!({"model_type": "distilbert"})).unwrap(),
            Family::DistilBert
        );
        let e = f(serde_json::json!({"architectures": ["T5ForConditionalGeneration"]}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("T5ForConditionalGeneration") && e.contains("c.json"),
            "{e}"
        );
    }
}
