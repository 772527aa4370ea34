//! The tokenizer: `tokenizer.ggml.*` metadata to a byte-level BPE `tokenizers::Tokenizer`, built as transformers'
//! `GGUFGPTConverter` builds it.

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

use crate::model::error::Result;

use super::*;

/// Llama 3's split (tiktoken's cl100k pattern), as in its `tokenizer.json`.
pub(super) const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` values understood.
pub(super) const KNOWN_PRE: &str = "default, gpt-2, smollm, llama-bpe, llama3, llama-v3, smaug-bpe";

/// llama.cpp's token types (`llama_token_type`).
pub(super) const TOKEN_TYPE_CONTROL: i128 = 3;
pub(super) const TOKEN_TYPE_USER_DEFINED: i128 = 4;

pub(super) struct TokInfo {
    pub(super) tokenizer: Tokenizer,
    pub(super) tokens_len: usize,
    pub(super) bos_id: Option<u32>,
    pub(super) eos_id: Option<u32>,
    pub(super) unk_id: Option<u32>,
    pub(super) pad_id: Option<u32>,
    pub(super) add_bos: bool,
    pub(super) add_eos: bool,
}

/// GPT-2's `bytes_to_unicode`: the printable character each byte is spelled with.
pub(super) fn byte_level_spelling() -> Vec<char> {
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
pub(super) fn pre_tokenizer(
    m: &Meta,
    pre: &str,
    add_prefix_space: bool,
) -> Result<PreTokenizerWrapper> {
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

pub(super) fn build_tokenizer(m: &Meta) -> Result<TokInfo> {
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
