//! The tokenizer with the special ids every command agrees on (design.md, "Tokenisation").

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::error::{ModelError, Result};

/// A Hugging Face tokenizer plus the ids of BOS, EOS (appended to responses) and PAD, and the stop ids of
/// generation.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// Beginning-of-sequence id, if the tokenizer has one.
    pub bos_id: Option<u32>,
    /// End-of-sequence id appended to every response.
    pub eos_id: u32,
    /// Padding id (the EOS id when the tokenizer has no pad token).
    pub pad_id: u32,
    /// Ids that end generation (`generation_config.eos_token_id`, else `[eos_id]`).
    pub stop_ids: Vec<u32>,
}

/// The JSON side files that accompany a model: kept so that a saved model carries them unchanged.
#[derive(Debug, Clone, Default)]
pub struct SideFiles {
    /// `config.json` as read (unknown keys kept).
    pub config: Value,
    /// `tokenizer_config.json`, if any.
    pub tokenizer_config: Option<Value>,
    /// `generation_config.json`, if any.
    pub generation_config: Option<Value>,
    /// `special_tokens_map.json`, if any.
    pub special_tokens_map: Option<Value>,
}

/// A token given in tokenizer_config.json either as a string or as an AddedToken object.
fn token_text(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// An id or the first of a list of ids.
fn first_id(v: Option<&Value>) -> Option<u32> {
    match v? {
        Value::Number(n) => n.as_u64().map(|x| x as u32),
        Value::Array(a) => a.first().and_then(Value::as_u64).map(|x| x as u32),
        _ => None,
    }
}

fn all_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl TextTokenizer {
    /// Wraps a tokenizer; special ids come from the tokenizer config (token strings), then from the model config.
    pub fn new(inner: tokenizers::Tokenizer, path: &Path, side: &SideFiles) -> Result<Self> {
        let tc = side.tokenizer_config.as_ref();
        let by_name = |key: &str| -> Option<u32> {
            let text = tc.and_then(|c| c.get(key)).and_then(token_text)?;
            inner.token_to_id(text)
        };
        let cfg = &side.config;
        let gen = side.generation_config.as_ref();
        let eos_id = by_name("eos_token")
            .or_else(|| first_id(cfg.get("eos_token_id")))
            .or_else(|| first_id(gen.and_then(|g| g.get("eos_token_id"))))
            .ok_or_else(|| ModelError::Tokenizer {
                path: path.to_path_buf(),
                msg: "no EOS token: neither tokenizer_config.json `eos_token` nor config.json `eos_token_id` is set"
                    .into(),
            })?;
        let bos_id = by_name("bos_token")
            .or_else(|| first_id(cfg.get("bos_token_id")))
            .or_else(|| first_id(gen.and_then(|g| g.get("bos_token_id"))));
        let pad_id = by_name("pad_token")
            .or_else(|| first_id(cfg.get("pad_token_id")))
            .unwrap_or(eos_id);
        let mut stop_ids = all_ids(gen.and_then(|g| g.get("eos_token_id")));
        if stop_ids.is_empty() {
            stop_ids.push(eos_id);
        }
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            bos_id,
            eos_id,
            pad_id,
            stop_ids,
        })
    }

    /// Reads `tokenizer.json`.
    pub fn from_file(path: &Path, side: &SideFiles) -> Result<Self> {
        if !path.exists() {
            return Err(ModelError::MissingFile {
                path: path.to_path_buf(),
                what: "the tokenizer".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        Self::new(inner, path, side)
    }

    /// The underlying Hugging Face tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Ids of `text`; `add_special_tokens` applies the post-processor (BOS for LLaMA-style tokenizers).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc =
            self.inner
                .encode(text, add_special_tokens)
                .map_err(|e| ModelError::Tokenizer {
                    path: self.path.clone(),
                    msg: format!("encoding failed: {e}"),
                })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are dropped when `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Tokenizer {
                path: self.path.clone(),
                msg: format!("decoding failed: {e}"),
            })
    }

    /// Number of tokens including added ones.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Left truncation keeping BOS: the last `max_len` ids, with a leading `bos` kept in front of them when `ids`
/// starts with it (prompts, queries and reward-model inputs cut from the left); `ids` unchanged when it fits.
pub fn left_truncate_keeping_bos(ids: Vec<u32>, max_len: usize, bos: Option<u32>) -> Vec<u32> {
    if ids.len() <= max_len {
        return ids;
    }
    let keep_bos = bos.is_some() && ids.first() == bos.as_ref();
    let tail_len = max_len - usize::from(keep_bos);
    let mut out = Vec::with_capacity(max_len);
    if keep_bos {
        out.push(ids[0]);
    }
    out.extend_from_slice(&ids[ids.len() - tail_len..]);
    out
}
