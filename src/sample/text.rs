//! Text handling of `rrhf sample`: stop strings (given, or the HH defaults), cutting a response at the first one,
//! the decoded continuation of a prompt, and left truncation of prompts keeping BOS.

use crate::model::tokenizer::left_truncate_keeping_bos;
use crate::model::{ModelError, TextTokenizer};

use super::prompts::Prompt;

/// The turn marker that makes a prompt file "HH-style" (default stop strings `Human:` and `Assistant:`).
const HH_HUMAN: &str = "\n\nHuman:";
/// Stop strings for HH-style prompts (the paper's anti-cheating truncation).
const HH_STOPS: [&str; 2] = ["Human:", "Assistant:"];
/// The stop strings of a run: `given` without empty ones (`--stop ""` turns stops off) or, when none is given,
/// `Human:` and `Assistant:` for HH-style prompts (any containing "\n\nHuman:") and none otherwise.
pub fn resolve_stops(given: &[String], prompts: &[Prompt]) -> Vec<String> {
    if given.is_empty() {
        if prompts.iter().any(|p| p.query.contains(HH_HUMAN)) {
            HH_STOPS.iter().map(|s| s.to_string()).collect()
        } else {
            Vec::new()
        }
    } else {
        given.iter().filter(|s| !s.is_empty()).cloned().collect()
    }
}

/// The byte offset of the first stop string in `text`, if any.
pub fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// `text` cut before its first stop string (trailing whitespace of the kept part dropped); whether it was cut.
pub fn cut_at_stop(text: &str, stops: &[String]) -> (String, bool) {
    match first_stop(text, stops) {
        Some(at) => (text[..at].trim_end().to_string(), true),
        None => (text.to_string(), false),
    }
}

/// The text of `new` as a continuation of `prompt`: the difference of the two decodes, so that a leading space
/// survives tokenizers that strip it from a lone first token (special tokens skipped).
pub(crate) fn continuation(
    tok: &TextTokenizer,
    prompt: &[u32],
    prompt_text: &str,
    new: &[u32],
) -> Result<String, ModelError> {
    let full: Vec<u32> = prompt.iter().chain(new).copied().collect();
    let text = tok.decode(&full, true)?;
    match text.strip_prefix(prompt_text) {
        Some(rest) => Ok(rest.to_string()),
        None => tok.decode(new, true),
    }
}

/// Prompt ids left-truncated to `max_len` tokens keeping BOS; whether it was cut.
pub fn truncate_prompt(ids: Vec<u32>, max_len: usize, bos: Option<u32>) -> (Vec<u32>, bool) {
    if ids.len() <= max_len {
        return (ids, false);
    }
    (left_truncate_keeping_bos(ids, max_len, bos), true)
}
