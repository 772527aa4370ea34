//! Tokenisation of records (design.md, "Tokenisation"): query and responses separately, EOS on responses, no
//! BOS inside, truncation to `max_len` that keeps the query's end and cuts responses on the right.

use crate::model::tokenizer::left_truncate_keeping_bos;
use crate::model::{ModelError, TextTokenizer};

use super::record::Record;

/// Length limits of one sequence (query + one response).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenizeOptions {
    /// Tokens of query + response, at most.
    pub max_len: usize,
    /// Tokens of the query, at most (left-truncated beyond).
    pub max_query_len: usize,
    /// Whether each response ends in EOS (the default). Off for continuations cut at a token budget (`rrhf
    /// sample --max-new-tokens`), where an appended EOS would teach the model to stop there; an empty response
    /// keeps its EOS even then.
    pub response_eos: bool,
}

impl TokenizeOptions {
    /// `max_query_len` defaults to `max(max_len − 64, max_len / 2)`: room for at least a short answer.
    pub fn new(max_len: usize, max_query_len: Option<usize>) -> Result<Self, String> {
        if max_len < 2 {
            return Err(format!("--max-len must be at least 2, got {max_len}"));
        }
        let mql = max_query_len.unwrap_or_else(|| max_len.saturating_sub(64).max(max_len / 2));
        if mql == 0 || mql >= max_len {
            return Err(format!(
                "--max-query-len must be between 1 and --max-len − 1 = {}, got {mql}",
                max_len - 1
            ));
        }
        Ok(Self {
            max_len,
            max_query_len: mql,
            response_eos: true,
        })
    }
}

/// A record as token ids, ready for batching.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedRecord {
    /// Query ids (BOS first where the tokenizer adds one).
    pub query: Vec<u32>,
    /// Response ids, each ending in EOS unless it was cut (or `response_eos` is off).
    pub responses: Vec<Vec<u32>>,
    /// One reward per response (empty when the record is unscored).
    pub scores: Vec<f64>,
    /// Whether the query was left-truncated.
    pub query_truncated: bool,
    /// How many responses were cut on the right.
    pub responses_truncated: usize,
}

impl TokenizedRecord {
    /// Tokens of the k separate rows `[query, response_i]`.
    pub fn padded_tokens(&self) -> usize {
        self.responses
            .iter()
            .map(|r| self.query.len() + r.len())
            .sum()
    }

    /// Tokens of the one packed row `[query, response_1, …, response_k]`.
    pub fn packed_tokens(&self) -> usize {
        self.query.len() + self.responses.iter().map(Vec::len).sum::<usize>()
    }
}

/// Tokenises one record under the shared contract.
pub fn tokenize_record(
    tok: &TextTokenizer,
    rec: &Record,
    opts: &TokenizeOptions,
) -> Result<TokenizedRecord, ModelError> {
    let mut query = tok.encode(&rec.query, true)?;
    let mut query_truncated = false;
    if query.len() > opts.max_query_len {
        query_truncated = true;
        query = left_truncate_keeping_bos(query, opts.max_query_len, tok.bos_id);
    }
    let budget = opts.max_len - query.len();
    let mut responses = Vec::with_capacity(rec.responses.len());
    let mut responses_truncated = 0;
    for (i, r) in rec.responses.iter().enumerate() {
        let mut ids = tok.encode(r, false)?;
        // An empty response is the model stopping at once: it keeps its EOS (and has a token to score). A response
        // the generator cut at its token budget did not end: no EOS.
        if (opts.response_eos && !rec.unfinished(i)) || ids.is_empty() {
            ids.push(tok.eos_id);
        }
        if ids.len() > budget {
            ids.truncate(budget);
            responses_truncated += 1;
        }
        responses.push(ids);
    }
    Ok(TokenizedRecord {
        query,
        responses,
        scores: rec.scores.clone().unwrap_or_default(),
        query_truncated,
        responses_truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_query_budget_leaves_room() {
        assert_eq!(TokenizeOptions::new(192, None).unwrap().max_query_len, 128);
        assert_eq!(TokenizeOptions::new(16, None).unwrap().max_query_len, 8);
        assert!(TokenizeOptions::new(16, Some(16)).is_err());
        assert!(TokenizeOptions::new(1, None).is_err());
    }
}
